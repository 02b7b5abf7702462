//! The configurable synthetic generator: op mix, block size mix, access distribution,
//! sequential streams, alignment and flushes, over a region of the disk.
//!
//! # Design
//! A [`Generator`] draws, for each operation: flush (every `flush_every` ops), else the kind
//! (read/write/unmap by weight), the length (from a [`SizeMix`]), then the offset: with
//! probability `sequential_pct`% from one of `streams` sequential cursors (round robin),
//! otherwise a block of the [`Distribution`] over the region's `align`-sized slots. Offsets
//! are `region start + align_offset + k * align`; a length that would run past the region's
//! end is clipped there, and a sequential cursor that reaches the end wraps to the start.
//! So every op lies inside the region, hence inside the disk.
//!
//! Randomness comes from two seeds: `seed` fixes the *layout* (where the hot blocks and the
//! sequential cursors are), `stream` the *draws*. Generators that share a seed and a region
//! but differ in stream hit the same hot blocks independently: the threads of one VM.

use std::fmt;
use std::str::FromStr;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::dist::{Distribution, Sampler};
use crate::error::WorkloadError;
use crate::op::{derive_seed, IoOp};
use crate::size::{format_size, parse_size, SizeStyle};

/// The sector size: every offset and length a generator makes is a multiple of it.
pub const SECTOR: u64 = 512;

/// A source of guest I/O operations.
pub trait Workload {
    /// The next operation. Workloads are endless: this never runs out.
    fn next_op(&mut self) -> IoOp;
    /// The workload's name (a profile name, or the name given to a [`Generator`]).
    fn name(&self) -> &str;
}

impl<W: Workload + ?Sized> Workload for Box<W> {
    fn next_op(&mut self) -> IoOp {
        (**self).next_op()
    }
    fn name(&self) -> &str {
        (**self).name()
    }
}

/// A mix of block sizes with percentages, like fio's `bssplit` (`"4k/50:8k/30:64k/20"`).
///
/// Entries without a percentage share what the others leave equally (`"4k/50:8k:16k"` is
/// 50/25/25); a single size needs none (`"8k"`). Sizes must be non-zero multiples of 512.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SizeMix {
    /// `(size in bytes, cumulative percent)`, the last cumulative value being 100.
    entries: Vec<(u64, u32)>,
}

impl SizeMix {
    /// Every op of `size` bytes (a multiple of 512).
    pub fn fixed(size: u64) -> Result<Self, WorkloadError> {
        format_size(size, SizeStyle::Short).parse()
    }

    /// The `(size, percent)` pairs.
    pub fn entries(&self) -> impl Iterator<Item = (u64, u32)> + '_ {
        let mut prev = 0;
        self.entries.iter().map(move |&(size, cum)| {
            let pct = cum - prev;
            prev = cum;
            (size, pct)
        })
    }

    /// The mean size in bytes.
    pub fn mean(&self) -> f64 {
        self.entries().map(|(s, p)| s as f64 * p as f64 / 100.0).sum()
    }

    /// The largest size.
    pub fn max(&self) -> u64 {
        self.entries.iter().map(|e| e.0).max().unwrap_or(SECTOR)
    }

    /// Draws a size.
    pub fn sample(&self, rng: &mut impl Rng) -> u64 {
        let r = rng.gen_range(0..100);
        self.entries
            .iter()
            .find(|&&(_, cum)| r < cum)
            .map_or(self.entries[self.entries.len() - 1].0, |e| e.0)
    }
}

impl FromStr for SizeMix {
    type Err = WorkloadError;

    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let bad = |reason: String| WorkloadError::BadSizeMix {
            spec: spec.to_string(),
            reason,
        };
        let mut parsed = Vec::new();
        for item in spec.trim().split(':') {
            let (size_s, pct_s) = match item.split_once('/') {
                Some((s, p)) => (s, Some(p)),
                None => (item, None),
            };
            let size =
                parse_size(size_s).map_err(|_| bad(format!("size {size_s:?} is not a size like 512, 4k or 1m")))?;
            if size == 0 || size % SECTOR != 0 {
                return Err(bad(format!("size {size_s:?} is not a non-zero multiple of 512 bytes")));
            }
            let pct = match pct_s {
                Some(p) => Some(
                    p.trim()
                        .parse::<u32>()
                        .map_err(|_| bad(format!("percentage {p:?} is not a whole number")))?,
                ),
                None => None,
            };
            parsed.push((size, pct));
        }
        let given: u32 = parsed.iter().filter_map(|e| e.1).sum();
        let open = parsed.iter().filter(|e| e.1.is_none()).count() as u32;
        if given > 100 || (open == 0 && given != 100) {
            return Err(bad(format!("percentages add up to {given}, not 100")));
        }
        let (share, mut extra) = match open {
            0 => (0, 0),
            _ => ((100 - given) / open, (100 - given) % open),
        };
        let mut cum = 0;
        let mut entries = Vec::new();
        for (size, pct) in parsed {
            let pct = pct.unwrap_or_else(|| share + std::mem::take(&mut extra));
            cum += pct;
            if pct > 0 {
                entries.push((size, cum));
            }
        }
        if entries.is_empty() {
            return Err(bad("no size has a non-zero percentage".into()));
        }
        Ok(SizeMix { entries })
    }
}

impl fmt::Display for SizeMix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (size, pct)) in self.entries().enumerate() {
            if i > 0 {
                write!(f, ":")?;
            }
            // fio writes its sizes in lower case.
            let size = format_size(size, SizeStyle::Short).to_ascii_lowercase();
            write!(f, "{size}/{pct}")?;
        }
        Ok(())
    }
}

/// The settings of a [`Generator`]. Build one with [`GeneratorConfig::new`] and struct
/// update syntax:
///
/// ```
/// use workloads::{GeneratorConfig, Distribution};
/// let cfg = GeneratorConfig {
///     read: 70,
///     write: 30,
///     sizes: "4k/50:8k/30:64k/20".parse()?,
///     distribution: "zipf:0.99".parse()?,
///     flush_every: 100,
///     ..GeneratorConfig::new(1 << 30)
/// };
/// # Ok::<(), workloads::WorkloadError>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct GeneratorConfig {
    /// The disk's size in bytes (a multiple of 512).
    pub disk_size: u64,
    /// `(start, len)` of the part of the disk the generator addresses; `None` is the whole
    /// disk, following it when it grows.
    pub region: Option<(u64, u64)>,
    /// Weight of reads among data ops.
    pub read: u32,
    /// Weight of writes among data ops.
    pub write: u32,
    /// Weight of unmaps among data ops.
    pub unmap: u32,
    /// Sizes of writes, and of reads and unmaps unless they have their own.
    pub sizes: SizeMix,
    /// Sizes of reads, if not `sizes`.
    pub read_sizes: Option<SizeMix>,
    /// Sizes of unmaps, if not `sizes`.
    pub unmap_sizes: Option<SizeMix>,
    /// Where random (non-sequential) ops go, over the region's `align`-sized slots.
    pub distribution: Distribution,
    /// Percent of data ops taken from the sequential streams (0-100).
    pub sequential_pct: u32,
    /// Number of sequential streams, each with its own cursor.
    pub streams: u32,
    /// Random offsets are multiples of this from `region start + align_offset` (>= 512,
    /// a multiple of 512).
    pub align: u64,
    /// Shift of the alignment grid, e.g. `63 * 512` for an old MBR partition start.
    pub align_offset: u64,
    /// Emit a [`IoOp::Flush`] every this many ops (0: never).
    pub flush_every: u64,
}

impl GeneratorConfig {
    /// Defaults: whole disk, writes only, 4 KiB, uniform, 4 KiB aligned, random, no flush.
    pub fn new(disk_size: u64) -> Self {
        GeneratorConfig {
            disk_size,
            region: None,
            read: 0,
            write: 1,
            unmap: 0,
            sizes: SizeMix {
                entries: vec![(4096, 100)],
            },
            read_sizes: None,
            unmap_sizes: None,
            distribution: Distribution::Uniform,
            sequential_pct: 0,
            streams: 1,
            align: 4096,
            align_offset: 0,
            flush_every: 0,
        }
    }

    /// `[start, end)` of the region on a disk of `disk_size`.
    fn bounds(&self) -> (u64, u64) {
        match self.region {
            None => (0, self.disk_size),
            Some((start, len)) => (start, start.saturating_add(len).min(self.disk_size)),
        }
    }

    fn validate(&self) -> Result<(), WorkloadError> {
        let bad = |m: String| Err(WorkloadError::BadConfig(m));
        if self.disk_size == 0 || !self.disk_size.is_multiple_of(SECTOR) {
            return Err(WorkloadError::BadDiskSize {
                size: self.disk_size,
                reason: "not a non-zero multiple of 512 bytes".into(),
            });
        }
        if let Some((start, len)) = self.region {
            if start % SECTOR != 0 || len % SECTOR != 0 || len == 0 {
                return bad(format!(
                    "region ({start}, {len}) is not a non-empty range of whole sectors"
                ));
            }
            if start.checked_add(len).is_none_or(|end| end > self.disk_size) {
                return bad(format!(
                    "region ({start}, {len}) runs past the disk's end at {}",
                    self.disk_size
                ));
            }
        }
        if self.read + self.write + self.unmap == 0 {
            return bad("read, write and unmap weights are all zero".into());
        }
        if self.align < SECTOR || !self.align.is_multiple_of(SECTOR) {
            return bad(format!("align {} is not a multiple of 512 bytes", self.align));
        }
        let (start, end) = self.bounds();
        if !self.align_offset.is_multiple_of(SECTOR) || start + self.align_offset >= end {
            return bad(format!(
                "align_offset {} is not a multiple of 512 inside the region",
                self.align_offset
            ));
        }
        if self.sequential_pct > 100 {
            return bad(format!("sequential_pct {} is over 100", self.sequential_pct));
        }
        if self.streams == 0 {
            return bad("streams is 0".into());
        }
        Ok(())
    }
}

/// A [`Workload`] made from a [`GeneratorConfig`] (see the module docs for how it draws).
#[derive(Clone, Debug)]
pub struct Generator {
    name: String,
    cfg: GeneratorConfig,
    seed: u64,
    stream: u64,
    rng: ChaCha8Rng,
    sampler: Sampler,
    cursors: Vec<u64>,
    next_cursor: usize,
    ops: u64,
}

/// Fractional part of `x * golden ratio`: a well-spread sequence in [0, 1).
fn spread(x: u64) -> f64 {
    (x as f64 * 0.618_033_988_749_895).fract()
}

impl Generator {
    /// A generator whose layout is fixed by `seed` and whose draws by `stream` (use the
    /// thread number for the threads of one VM).
    pub fn new(name: impl Into<String>, cfg: GeneratorConfig, seed: u64, stream: u64) -> Result<Self, WorkloadError> {
        cfg.validate()?;
        let mut rng = ChaCha8Rng::seed_from_u64(derive_seed(seed, 0x9e4));
        rng.set_stream(stream);
        let sampler = Self::make_sampler(&cfg, seed, stream);
        let (start, end) = cfg.bounds();
        let base = start + cfg.align_offset;
        let slots = (end - base) / cfg.align;
        // Stream 0's first cursor starts at the region's start; the others spread out.
        let cursors = (0..cfg.streams as u64)
            .map(|i| {
                let frac = spread(i * 7 + stream * 13);
                base + (slots as f64 * frac) as u64 * cfg.align
            })
            .collect();
        Ok(Generator {
            name: name.into(),
            cfg,
            seed,
            stream,
            rng,
            sampler,
            cursors,
            next_cursor: 0,
            ops: 0,
        })
    }

    fn make_sampler(cfg: &GeneratorConfig, seed: u64, stream: u64) -> Sampler {
        let (start, end) = cfg.bounds();
        let slots = (end - start - cfg.align_offset) / cfg.align;
        let mut sampler = cfg.distribution.sampler(slots, seed);
        sampler.set_stream(stream);
        sampler
    }

    /// The configuration.
    pub fn config(&self) -> &GeneratorConfig {
        &self.cfg
    }

    /// Tells the generator the disk now has `size` bytes (after an [`IoOp::Extend`]); a
    /// whole-disk generator then spreads over the new size (its hot blocks are laid out
    /// anew over the larger range).
    pub fn set_disk_size(&mut self, size: u64) {
        let old = self.cfg.bounds();
        self.cfg.disk_size = size;
        if self.cfg.bounds() != old {
            self.sampler = Self::make_sampler(&self.cfg, self.seed, self.stream);
        }
    }

    /// The next data op (read, write or unmap), ignoring `flush_every`.
    pub(crate) fn next_data_op(&mut self) -> IoOp {
        let c = &self.cfg;
        let r = self.rng.gen_range(0..c.read + c.write + c.unmap);
        let mix = if r < c.read {
            c.read_sizes.as_ref().unwrap_or(&c.sizes)
        } else if r < c.read + c.write {
            &c.sizes
        } else {
            c.unmap_sizes.as_ref().unwrap_or(&c.sizes)
        };
        let len = mix.sample(&mut self.rng);
        let (read, write) = (c.read, c.write);
        let (offset, len) = if self.rng.gen_range(0..100) < c.sequential_pct {
            self.sequential(len)
        } else {
            self.random(len)
        };
        if r < read {
            IoOp::Read { offset, len }
        } else if r < read + write {
            IoOp::Write {
                offset,
                len,
                seed: self.rng.gen(),
            }
        } else {
            IoOp::Unmap { offset, len }
        }
    }

    fn random(&mut self, len: u64) -> (u64, u64) {
        let (start, end) = self.cfg.bounds();
        let offset = start + self.cfg.align_offset + self.sampler.next_index() * self.cfg.align;
        (offset, len.min(end - offset))
    }

    fn sequential(&mut self, len: u64) -> (u64, u64) {
        let (start, end) = self.cfg.bounds();
        let i = self.next_cursor;
        self.next_cursor = (i + 1) % self.cursors.len();
        let cursor = &mut self.cursors[i];
        if *cursor >= end {
            *cursor = start + self.cfg.align_offset;
        }
        let offset = *cursor;
        let len = len.min(end - offset);
        *cursor += len;
        (offset, len)
    }
}

impl Workload for Generator {
    fn next_op(&mut self) -> IoOp {
        self.ops += 1;
        if self.cfg.flush_every > 0 && self.ops.is_multiple_of(self.cfg.flush_every) {
            return IoOp::Flush;
        }
        self.next_data_op()
    }

    fn name(&self) -> &str {
        &self.name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gen(cfg: GeneratorConfig) -> Generator {
        Generator::new("t", cfg, 1, 0).unwrap()
    }

    #[test]
    fn size_mix_parsing() {
        let m: SizeMix = "4k/50:8k/30:64k/20".parse().unwrap();
        assert_eq!(
            m.entries().collect::<Vec<_>>(),
            vec![(4096, 50), (8192, 30), (65536, 20)]
        );
        assert_eq!(m.to_string(), "4k/50:8k/30:64k/20");
        let m: SizeMix = "4k/50:8k:16k".parse().unwrap();
        assert_eq!(
            m.entries().collect::<Vec<_>>(),
            vec![(4096, 50), (8192, 25), (16384, 25)]
        );
        assert_eq!("1m".parse::<SizeMix>().unwrap().max(), 1 << 20);
        assert_eq!(SizeMix::fixed(3584).unwrap().to_string(), "3584/100");
        let err = |s: &str| s.parse::<SizeMix>().unwrap_err().to_string();
        assert!(err("4k/50:8k/40").contains("add up to 90"));
        assert!(err("4x/100").contains("\"4x\""));
        assert!(err("100/100").contains("multiple of 512"));
        assert!(err("4k/abc").contains("\"abc\""));
    }

    #[test]
    fn size_mix_shares() {
        let m: SizeMix = "4k/50:8k/30:64k/20".parse().unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let n = 100_000;
        let fours = (0..n).filter(|_| m.sample(&mut rng) == 4096).count();
        assert!((fours as f64 / n as f64 - 0.5).abs() < 0.01);
        assert!((m.mean() - (2048.0 + 0.3 * 8192.0 + 0.2 * 65536.0)).abs() < 1e-9);
    }

    #[test]
    fn ops_stay_inside_region_and_disk() {
        let disk = 10 * 1024 * 1024 + 3 * 512;
        let cfg = GeneratorConfig {
            read: 1,
            write: 2,
            unmap: 1,
            sizes: "512/10:4k/40:64k/30:1m/20".parse().unwrap(),
            sequential_pct: 50,
            streams: 3,
            distribution: "zipf:1.2".parse().unwrap(),
            align_offset: 63 * 512,
            ..GeneratorConfig::new(disk)
        };
        let mut g = gen(cfg.clone());
        for _ in 0..50_000 {
            let (off, len) = g.next_op().range().unwrap();
            assert!(len > 0 && off % 512 == 0 && len % 512 == 0);
            assert!(off + len <= disk, "{off} + {len}");
        }
        let region = (1 << 20, 3 << 20);
        let mut g = gen(GeneratorConfig {
            region: Some(region),
            ..cfg
        });
        for _ in 0..50_000 {
            let (off, len) = g.next_op().range().unwrap();
            assert!(off >= region.0 && off + len <= region.0 + region.1);
        }
    }

    #[test]
    fn sequential_stream_wraps_and_covers_the_region() {
        let disk = 1 << 20;
        let mut g = gen(GeneratorConfig {
            sizes: "48k".parse().unwrap(),
            sequential_pct: 100,
            ..GeneratorConfig::new(disk)
        });
        let mut next = 0;
        for _ in 0..100 {
            let (off, len) = g.next_op().range().unwrap();
            assert_eq!(off, next);
            next = if off + len == disk { 0 } else { off + len };
        }
    }

    #[test]
    fn alignment_and_offset() {
        let mut g = gen(GeneratorConfig {
            align_offset: 63 * 512,
            ..GeneratorConfig::new(1 << 30)
        });
        for _ in 0..1000 {
            let (off, _) = g.next_op().range().unwrap();
            assert_eq!((off / 512) % 8, 7);
        }
    }

    #[test]
    fn op_mix_and_flushes() {
        let mut g = gen(GeneratorConfig {
            read: 70,
            write: 20,
            unmap: 10,
            flush_every: 10,
            ..GeneratorConfig::new(1 << 30)
        });
        let ops: Vec<IoOp> = (0..100_000).map(|_| g.next_op()).collect();
        let count = |f: fn(&IoOp) -> bool| ops.iter().filter(|o| f(o)).count() as f64 / 90_000.0;
        assert_eq!(ops.iter().filter(|o| **o == IoOp::Flush).count(), 10_000);
        assert!((count(|o| matches!(o, IoOp::Read { .. })) - 0.7).abs() < 0.01);
        assert!((count(|o| matches!(o, IoOp::Unmap { .. })) - 0.1).abs() < 0.01);
    }

    #[test]
    fn extend_spreads_over_new_size() {
        let mut g = gen(GeneratorConfig::new(1 << 20));
        g.set_disk_size(2 << 20);
        let beyond = (0..1000).filter(|_| g.next_op().range().unwrap().0 >= 1 << 20).count();
        assert!(beyond > 300);
    }

    #[test]
    fn streams_are_reproducible_and_independent() {
        let cfg = GeneratorConfig::new(1 << 30);
        let run = |seed, stream| {
            let mut g = Generator::new("t", cfg.clone(), seed, stream).unwrap();
            (0..50).map(|_| g.next_op()).collect::<Vec<_>>()
        };
        assert_eq!(run(1, 0), run(1, 0));
        assert_ne!(run(1, 0), run(1, 1));
        assert_ne!(run(1, 0), run(2, 0));
    }

    #[test]
    fn invalid_configs_are_refused() {
        let base = GeneratorConfig::new(1 << 20);
        let err = |cfg: GeneratorConfig| Generator::new("t", cfg, 0, 0).unwrap_err().to_string();
        assert!(err(GeneratorConfig {
            disk_size: 1000,
            ..base.clone()
        })
        .contains("1000"));
        assert!(err(GeneratorConfig {
            write: 0,
            ..base.clone()
        })
        .contains("all zero"));
        assert!(err(GeneratorConfig {
            align: 1000,
            ..base.clone()
        })
        .contains("align 1000"));
        assert!(err(GeneratorConfig {
            region: Some((0, 2 << 20)),
            ..base.clone()
        })
        .contains("past"));
        assert!(err(GeneratorConfig {
            streams: 0,
            ..base.clone()
        })
        .contains("streams"));
        assert!(err(GeneratorConfig {
            align_offset: 1 << 20,
            ..base
        })
        .contains("align_offset"));
    }
}
