//! Named workload profiles: synthetic guests with the shapes of real ones.
//!
//! [`profile`] makes one; [`profiles`] lists them with their parameters and where the
//! numbers come from. Each profile is reproducible from `(disk size, seed, thread)`:
//! `seed` fixes the layout (where the hot blocks, the log and the WAL are), `thread` the
//! draws, so the threads of one VM hit the same hot data independently.
//!
//! | profile | shape | sources of the numbers |
//! |---|---|---|
//! | `os-idle` | 60% reads (4-64 KiB, zipf 1.2), hot-file writes 4-16 KiB on the same hot blocks, a sequential event log of 512 B-4 KiB records in the last 1% of the disk, flush every 16 ops | illustrative, no measured source |
//! | `oltp-db` | 8 KiB pages, zipf 0.99, 70/30 read/write, over the first 95%; a circular WAL in the last 5% with 512 B-60 KiB writes; every 20,000 ops a checkpoint burst of 256 writes of 8 KiB-1 MiB onto the hot pages; flush every 8 ops | REFERENCE.md s7: zipf 0.99 (YCSB), SQL Server log writes 512 B-60 KB, checkpoints 8 KB-1 MB; the 70/30 mix and the burst period are assumptions |
//! | `file-server` | Iometer "File Server": 80/20 read/write, 100% random, 512 B 10%, 1 KiB 5%, 2 KiB 5%, 4 KiB 60%, 8 KiB 2%, 16 KiB 4%, 32 KiB 4%, 64 KiB 10%, sector aligned, uniform | Intel's Iometer access specification as published in storage reviews (tweakers.net, thessdreview.com) |
//! | `vdi` | boot (first 30,000 ops of each thread): 13/87 read/write, larger partly sequential reads; then 15/85; writes of mean 9.2 KiB, zipf 0.99 | REFERENCE.md s7: boot 13/87, ~9 KB writes; the steady 15/85 is the whole-desktop view (REFERENCE's 0.2/99.8 is for a PVS write-cache disk, which sees no reads) |
//! | `log-append` | sequential appends of 4-256 KiB; every 8th append closes a file with a 512 B-3.5 KiB tail and a flush, the next file starting on a 4 KiB boundary; the log is circular and old files 64 MiB at a time are unmapped half a disk behind the head, at the rate appends write | illustrative |
//! | `legacy-misaligned` | 72% of ops on a 4 KiB grid shifted by 63 sectors, 28% at any sector, so ~75% of writes start at LBA 7 mod 8; 58.7% writes; sizes 512 B 7%, 4 KiB 18%, 64 KiB 25%, 68 KiB 17% and 8-32 KiB for the rest; zipf 0.9 | the CloudPhysics vscsi trace (`shared/traces/README.md`) |
//! | `cloud-mixed` | 48% writes; each write with probability 0.1 goes to fresh space (an allocation frontier) and otherwise rewrites already-written space, recent data more often, so a written 4 KiB page is written ~10 times; reads zipf 0.9; sizes from the medians of the traces' size percentiles; flush every 32 ops | the 106 CloudPhysics traces' features (`block_features.csv`): write fraction p50 0.48, writes per unique written 4 KiB page p50 9.7, write size p5..p99 1.5K/4K/4K/8K/12K/18K/57K/117K |
//! | `edge-cases` | thread 0: a script (last sector, first sector, writes across a 64 KiB and the last 4 KiB boundary, unmap then rewrite of the tail), a full-disk format pass of 4 MiB writes, then the mix below and, after 5,000 mixed ops, an `Extend` by ~25% to an odd number of sectors followed by writes at the new end and across the old one. Every thread: 1-4 MiB bulk writes, 512 B-7.5 KiB writes at any sector (half of them in the last 1% of the disk), unmaps of 4 KiB-16 MiB, reads; flush every 50 | illustrative: exercises clipping at the disk's end, boundaries and growth |
//!
//! Disks must be at least [`MIN_DISK_SIZE`] and a whole number of 512-byte sectors; an odd
//! number of sectors (not a multiple of 4 KiB) is allowed and is what `edge-cases` is for.
//!
//! # Limitations
//! Profiles carry no timing: [`ProfileInfo::nominal_iops`] is a hint for the simulator's
//! pacing. Only thread 0 of `edge-cases` extends the disk; its other threads keep using the
//! original size.

use std::collections::VecDeque;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::dist::{Distribution, Sampler};
use crate::error::WorkloadError;
use crate::gen::{Generator, GeneratorConfig, SizeMix, Workload, SECTOR};
use crate::op::{derive_seed, IoOp};

/// The smallest disk a profile accepts.
pub const MIN_DISK_SIZE: u64 = 1 << 20;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

/// What a named profile is, for listings and the CLI.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ProfileInfo {
    /// The name [`profile`] takes.
    pub name: &'static str,
    /// One line on what the profile models.
    pub description: &'static str,
    /// Its main parameters.
    pub parameters: &'static str,
    /// Where the numbers come from.
    pub source: &'static str,
    /// A suggested rate per thread, in ops per second (profiles carry no timing).
    pub nominal_iops: u32,
}

static PROFILES: &[ProfileInfo] = &[
    ProfileInfo {
        name: "os-idle",
        description: "an idle guest OS: mostly reads, small writes to a few hot files and a log",
        parameters: "60% reads 4-64k zipf:1.2; 25% writes 4-16k on the same hot blocks; \
                     15% sequential log writes 512-4k in the last 1%; flush every 16",
        source: "illustrative, no measured source",
        nominal_iops: 10,
    },
    ProfileInfo {
        name: "oltp-db",
        description: "an OLTP database: random 8 KiB pages, a circular WAL, checkpoint bursts",
        parameters: "85% data 8k zipf:0.99 70/30 r/w on the first 95%; 15% WAL 512-60k \
                     sequential in the last 5%; 256 writes 8k-1m every 20000 ops; flush every 8",
        source: "REFERENCE.md s7 (zipf 0.99, SQL Server log 512 B-60 KB, checkpoints 8 KB-1 MB); \
                 70/30 and the burst period assumed",
        nominal_iops: 2000,
    },
    ProfileInfo {
        name: "file-server",
        description: "Iometer's File Server access specification",
        parameters: "80/20 r/w, 100% random uniform, 512/10:1k/5:2k/5:4k/60:8k/2:16k/4:32k/4:64k/10, \
                     512-byte aligned",
        source: "Intel Iometer File Server specification (as published by tweakers.net, thessdreview.com)",
        nominal_iops: 500,
    },
    ProfileInfo {
        name: "vdi",
        description: "a virtual desktop: a write-heavy boot, then a write-heavy steady state",
        parameters: "boot 30000 ops 13/87 r/w; steady 15/85; writes 4k/60:8k/15:16k/15:32k/10 \
                     (mean 9.2 KiB) zipf:0.99; flush every 64",
        source: "REFERENCE.md s7 (boot 13/87, ~9 KB writes); steady 15/85 whole-desktop view",
        nominal_iops: 30,
    },
    ProfileInfo {
        name: "log-append",
        description: "an append-only log: sequential appends, partial tails, old files unmapped",
        parameters: "appends 4k/40:16k/25:64k/25:256k/10; every 8th a 512-3584 B tail + flush; \
                     64 MiB unmapped half a disk behind the head at the append rate",
        source: "illustrative",
        nominal_iops: 200,
    },
    ProfileInfo {
        name: "legacy-misaligned",
        description: "a guest with an old 63-sector partition offset, like the CloudPhysics trace",
        parameters: "72% on a 4k grid + 63 sectors, 28% any sector (~75% of writes at LBA 7 mod 8); \
                     58.7% writes; 512/7:4k/18:8k/10:16k/10:32k/13:64k/25:68k/17; zipf:0.9",
        source: "shared/traces/README.md (CloudPhysics vscsi trace)",
        nominal_iops: 16,
    },
    ProfileInfo {
        name: "cloud-mixed",
        description: "a median production VM of the CloudPhysics traces",
        parameters: "48% writes; 10% of writes to fresh space, the rest rewrite written space \
                     (~9.7 writes per written 4 KiB page); sizes from the traces' medians; flush every 32",
        source: "block_features.csv of 106 CloudPhysics traces (write fraction p50 0.48, \
                 writes per unique page p50 9.7, size percentiles)",
        nominal_iops: 100,
    },
    ProfileInfo {
        name: "edge-cases",
        description: "boundaries: last sector of odd-sized disks, format pass, bulk writes, unmaps, extend",
        parameters: "thread 0: script + format pass (4 MiB writes) + Extend by ~25% after 5000 ops; \
                     all: 1-4 MiB writes, 512 B-7.5 KiB writes at any sector, unmaps 4k-16m, reads",
        source: "illustrative",
        nominal_iops: 100,
    },
];

/// The named profiles, in a stable order.
pub fn profiles() -> &'static [ProfileInfo] {
    PROFILES
}

/// Makes the named profile over a disk of `disk_size` bytes (see the module docs).
///
/// `seed` makes the run reproducible; different `thread` values give independent streams
/// over the same layout.
pub fn profile(name: &str, disk_size: u64, seed: u64, thread: u32) -> Result<Box<dyn Workload + Send>, WorkloadError> {
    if disk_size < MIN_DISK_SIZE || !disk_size.is_multiple_of(SECTOR) {
        return Err(WorkloadError::BadDiskSize {
            size: disk_size,
            reason: format!("profiles need a multiple of 512 bytes of at least {MIN_DISK_SIZE}"),
        });
    }
    let t = u64::from(thread);
    Ok(match name {
        "os-idle" => Box::new(os_idle(disk_size, seed, t)?),
        "oltp-db" => Box::new(oltp_db(disk_size, seed, t)?),
        "file-server" => Box::new(file_server(disk_size, seed, t)?),
        "vdi" => Box::new(vdi(disk_size, seed, t)?),
        "log-append" => Box::new(LogAppend::new(disk_size, seed, t)?),
        "legacy-misaligned" => Box::new(legacy_misaligned(disk_size, seed, t)?),
        "cloud-mixed" => Box::new(CloudMixed::new(disk_size, seed, t)?),
        "edge-cases" => Box::new(EdgeCases::new(disk_size, seed, t)?),
        _ => {
            return Err(WorkloadError::UnknownProfile {
                name: name.to_string(),
                known: PROFILES.iter().map(|p| p.name).collect::<Vec<_>>().join(", "),
            })
        }
    })
}

fn mix(s: &str) -> SizeMix {
    s.parse().expect("built-in size mix")
}

fn dist(s: &str) -> Distribution {
    s.parse().expect("built-in distribution")
}

/// The last `pct`% of the disk (at least `min` bytes), starting on a 4 KiB boundary:
/// `(start, len)`.
fn tail_region(disk: u64, pct: u64, min: u64) -> (u64, u64) {
    let len = (disk / 100 * pct).max(min);
    let start = (disk - len) / (4 * KIB) * (4 * KIB);
    (start, disk - start)
}

/// The golden-ratio sequence, to spread threads' starting points over the disk.
fn spread(disk: u64, thread: u64) -> u64 {
    let frac = (thread as f64 * 0.618_033_988_749_895).fract();
    (disk as f64 * frac) as u64 / (4 * KIB) * (4 * KIB)
}

/// A weighted choice among generators, in phases, with optional periodic bursts.
#[derive(Debug)]
struct Mixed {
    name: &'static str,
    seed: u64,
    thread: u64,
    rng: ChaCha8Rng,
    /// `(ops in the phase, weighted parts)`; the last phase lasts forever.
    phases: Vec<(u64, Vec<(u32, Generator)>)>,
    phase: usize,
    phase_ops: u64,
    /// `(every, count, generator)`: `count` ops from `generator` every `every` ops.
    burst: Option<(u64, u64, Generator)>,
    burst_left: u64,
    flush_every: u64,
    ops: u64,
    generators: u64,
}

impl Mixed {
    fn new(name: &'static str, seed: u64, thread: u64, flush_every: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(derive_seed(seed, 0x313d));
        rng.set_stream(thread);
        Mixed {
            name,
            seed,
            thread,
            rng,
            phases: Vec::new(),
            phase: 0,
            phase_ops: 0,
            burst: None,
            burst_left: 0,
            flush_every,
            ops: 0,
            generators: 0,
        }
    }

    /// A generator whose layout is keyed by `layout` (parts with equal keys and configs
    /// hit the same hot blocks) and whose draws are its own.
    fn generator(&mut self, layout: u64, cfg: GeneratorConfig) -> Result<Generator, WorkloadError> {
        self.generators += 1;
        let stream = (self.thread << 16) | self.generators;
        Generator::new(self.name, cfg, derive_seed(self.seed, layout), stream)
    }

    /// Starts a phase of `ops` ops (the last phase lasts forever).
    fn phase(mut self, ops: u64) -> Self {
        self.phases.push((ops, Vec::new()));
        self
    }

    /// Adds a part to the current phase.
    fn part(mut self, weight: u32, layout: u64, cfg: GeneratorConfig) -> Result<Self, WorkloadError> {
        let g = self.generator(layout, cfg)?;
        self.phases.last_mut().expect("a phase").1.push((weight, g));
        Ok(self)
    }

    fn burst(mut self, every: u64, count: u64, layout: u64, cfg: GeneratorConfig) -> Result<Self, WorkloadError> {
        let g = self.generator(layout, cfg)?;
        self.burst = Some((every, count, g));
        Ok(self)
    }

    fn set_disk_size(&mut self, size: u64) {
        let gens = self.phases.iter_mut().flat_map(|p| p.1.iter_mut().map(|(_, g)| g));
        for g in gens.chain(self.burst.as_mut().map(|b| &mut b.2)) {
            g.set_disk_size(size);
        }
    }
}

impl Workload for Mixed {
    fn next_op(&mut self) -> IoOp {
        self.ops += 1;
        if let Some((every, count, _)) = &self.burst {
            if self.ops.is_multiple_of(*every) {
                self.burst_left = *count;
            }
        }
        if self.flush_every > 0 && self.ops.is_multiple_of(self.flush_every) {
            return IoOp::Flush;
        }
        if let Some((_, _, g)) = &mut self.burst {
            if self.burst_left > 0 {
                self.burst_left -= 1;
                return g.next_data_op();
            }
        }
        if self.phase_ops >= self.phases[self.phase].0 && self.phase + 1 < self.phases.len() {
            self.phase += 1;
            self.phase_ops = 0;
        }
        self.phase_ops += 1;
        let parts = &mut self.phases[self.phase].1;
        let total: u32 = parts.iter().map(|p| p.0).sum();
        let mut r = self.rng.gen_range(0..total);
        for (weight, g) in parts.iter_mut() {
            if r < *weight {
                return g.next_data_op();
            }
            r -= *weight;
        }
        unreachable!("r < total weight")
    }

    fn name(&self) -> &str {
        self.name
    }
}

/// `os-idle`: see the module docs.
fn os_idle(disk: u64, seed: u64, thread: u64) -> Result<Mixed, WorkloadError> {
    let log = tail_region(disk, 1, 64 * KIB);
    let data = Some((0, log.0));
    Mixed::new("os-idle", seed, thread, 16)
        .phase(u64::MAX)
        .part(
            60,
            1,
            GeneratorConfig {
                region: data,
                read: 1,
                write: 0,
                sizes: mix("4k/40:16k/20:32k/20:64k/20"),
                distribution: dist("zipf:1.2"),
                ..GeneratorConfig::new(disk)
            },
        )?
        .part(
            25,
            1,
            GeneratorConfig {
                region: data,
                sizes: mix("4k/70:8k/20:16k/10"),
                distribution: dist("zipf:1.2"),
                ..GeneratorConfig::new(disk)
            },
        )?
        .part(
            15,
            2,
            GeneratorConfig {
                region: Some(log),
                sizes: mix("512/30:1k/20:4k/50"),
                sequential_pct: 100,
                ..GeneratorConfig::new(disk)
            },
        )
}

/// `oltp-db`: see the module docs.
fn oltp_db(disk: u64, seed: u64, thread: u64) -> Result<Mixed, WorkloadError> {
    let wal = tail_region(disk, 5, 64 * KIB);
    let data = Some((0, wal.0));
    let pages = |sizes: &str, read| GeneratorConfig {
        region: data,
        read,
        write: 30,
        sizes: mix(sizes),
        distribution: dist("zipf:0.99"),
        align: 8 * KIB,
        ..GeneratorConfig::new(disk)
    };
    Mixed::new("oltp-db", seed, thread, 8)
        .phase(u64::MAX)
        .part(85, 1, pages("8k", 70))?
        .part(
            15,
            2,
            GeneratorConfig {
                region: Some(wal),
                sizes: mix("512/20:4k/30:8k/20:16k/15:32k/10:60k/5"),
                sequential_pct: 100,
                ..GeneratorConfig::new(disk)
            },
        )?
        // Same layout key as the pages: checkpoints write back the hot pages.
        .burst(20_000, 256, 1, pages("8k/40:64k/30:256k/20:1m/10", 0))
}

/// `file-server`: see the module docs.
fn file_server(disk: u64, seed: u64, thread: u64) -> Result<Generator, WorkloadError> {
    let cfg = GeneratorConfig {
        read: 80,
        write: 20,
        sizes: mix("512/10:1k/5:2k/5:4k/60:8k/2:16k/4:32k/4:64k/10"),
        align: SECTOR,
        ..GeneratorConfig::new(disk)
    };
    Generator::new("file-server", cfg, derive_seed(seed, 1), thread)
}

/// `vdi`: see the module docs.
fn vdi(disk: u64, seed: u64, thread: u64) -> Result<Mixed, WorkloadError> {
    let writes = GeneratorConfig {
        sizes: mix("4k/60:8k/15:16k/15:32k/10"),
        distribution: dist("zipf:0.99"),
        ..GeneratorConfig::new(disk)
    };
    let reads = |sizes: &str, sequential_pct| GeneratorConfig {
        read: 1,
        write: 0,
        sizes: mix(sizes),
        sequential_pct,
        streams: 4,
        ..writes.clone()
    };
    Mixed::new("vdi", seed, thread, 64)
        .phase(30_000)
        .part(13, 1, reads("4k/30:32k/40:64k/30", 50))?
        .part(87, 1, writes.clone())?
        .phase(u64::MAX)
        .part(15, 1, reads("4k/50:8k/20:32k/20:64k/10", 0))?
        .part(85, 1, writes)
}

/// `legacy-misaligned`: see the module docs.
fn legacy_misaligned(disk: u64, seed: u64, thread: u64) -> Result<Mixed, WorkloadError> {
    let partition = GeneratorConfig {
        read: 413,
        write: 587,
        sizes: mix("512/7:4k/18:8k/10:16k/10:32k/13:64k/25:68k/17"),
        distribution: dist("zipf:0.9"),
        align_offset: 63 * SECTOR,
        ..GeneratorConfig::new(disk)
    };
    // 72% + 28% / 8 (the any-sector ops that happen to land on 7 mod 8) = 75.5%.
    Mixed::new("legacy-misaligned", seed, thread, 0)
        .phase(u64::MAX)
        .part(72, 1, partition.clone())?
        .part(
            28,
            2,
            GeneratorConfig {
                align: SECTOR,
                align_offset: 0,
                ..partition
            },
        )
}

/// `log-append`: see the module docs.
#[derive(Debug)]
struct LogAppend {
    rng: ChaCha8Rng,
    disk: u64,
    cursor: u64,
    sizes: SizeMix,
    appends: u32,
    flush_next: bool,
    ops: u64,
    segment: u64,
    unmap_every: u64,
}

impl LogAppend {
    /// Appends per file; the next one writes the file's tail.
    const FILE_APPENDS: u32 = 8;

    fn new(disk: u64, seed: u64, thread: u64) -> Result<Self, WorkloadError> {
        let mut rng = ChaCha8Rng::seed_from_u64(derive_seed(seed, 0x109));
        rng.set_stream(thread);
        let sizes = mix("4k/40:16k/25:64k/25:256k/10");
        let segment = (64 * MIB).min(disk / 16 / (4 * KIB) * (4 * KIB)).max(4 * KIB);
        // Unmap at the rate the appends write (a file is FILE_APPENDS appends, a tail of
        // 2 KiB on average and a flush): the log keeps about half the disk.
        let file_ops = f64::from(Self::FILE_APPENDS + 2);
        let per_op = (f64::from(Self::FILE_APPENDS) * sizes.mean() + 2048.0) / file_ops;
        let unmap_every = ((segment as f64 / per_op) as u64).max(16);
        Ok(LogAppend {
            rng,
            disk,
            cursor: spread(disk, thread),
            sizes,
            appends: 0,
            flush_next: false,
            ops: 0,
            segment,
            unmap_every,
        })
    }
}

impl Workload for LogAppend {
    fn next_op(&mut self) -> IoOp {
        self.ops += 1;
        if std::mem::take(&mut self.flush_next) {
            return IoOp::Flush;
        }
        if self.ops.is_multiple_of(self.unmap_every) {
            let behind = (self.cursor + self.disk - self.disk / 2) % self.disk;
            let offset = behind / (4 * KIB) * (4 * KIB);
            let len = self.segment.min(self.disk - offset);
            return IoOp::Unmap { offset, len };
        }
        if self.cursor >= self.disk {
            self.cursor = 0;
        }
        let offset = self.cursor;
        let tail = self.appends == Self::FILE_APPENDS;
        let len = if tail {
            self.rng.gen_range(1..=7) * SECTOR
        } else {
            self.sizes.sample(&mut self.rng)
        };
        let len = len.min(self.disk - offset);
        self.cursor = offset + len;
        if tail {
            // The file is closed and synced; the next file starts on a 4 KiB boundary.
            self.appends = 0;
            self.flush_next = true;
            self.cursor = self.cursor.div_ceil(4 * KIB) * (4 * KIB);
        } else {
            self.appends += 1;
        }
        IoOp::Write {
            offset,
            len,
            seed: self.rng.gen(),
        }
    }

    fn name(&self) -> &str {
        "log-append"
    }
}

/// `cloud-mixed`: see the module docs.
#[derive(Debug)]
struct CloudMixed {
    rng: ChaCha8Rng,
    disk: u64,
    /// Where this thread's written space starts (4 KiB aligned).
    origin: u64,
    /// Bytes of written space from `origin` (circularly), at most `disk`.
    allocated: u64,
    write_sizes: SizeMix,
    read_sizes: SizeMix,
    reads: Sampler,
    ops: u64,
}

impl CloudMixed {
    /// Write fraction: block_features.csv p50 (0.48).
    const WRITE_FRACTION: f64 = 0.48;
    /// Share of writes that go to fresh space: 1/9.7 (block_features.csv p50 of writes per
    /// unique written 4 KiB page), checked by `cloud_mixed_is_calibrated`.
    const FRESH: f64 = 1.0 / 9.7;
    const FLUSH_EVERY: u64 = 32;

    fn new(disk: u64, seed: u64, thread: u64) -> Result<Self, WorkloadError> {
        let mut rng = ChaCha8Rng::seed_from_u64(derive_seed(seed, 0xc10d));
        rng.set_stream(thread);
        let mut reads = dist("zipf:0.9").sampler(disk / (4 * KIB), derive_seed(seed, 1));
        reads.set_stream(thread);
        Ok(CloudMixed {
            rng,
            disk,
            origin: spread(disk, thread),
            allocated: 0,
            write_sizes: mix("1k/3:2k/3:4k/57:8k/12:12k/8:16k/5:32k/5:64k/5:128k/2"),
            read_sizes: mix("4k/35:8k/25:16k/12:32k/12:64k/14:128k/2"),
            reads,
            ops: 0,
        })
    }
}

impl Workload for CloudMixed {
    fn next_op(&mut self) -> IoOp {
        self.ops += 1;
        if self.ops.is_multiple_of(Self::FLUSH_EVERY) {
            return IoOp::Flush;
        }
        if self.rng.gen::<f64>() >= Self::WRITE_FRACTION {
            let offset = self.reads.next_index() * 4 * KIB;
            let len = self.read_sizes.sample(&mut self.rng).min(self.disk - offset);
            return IoOp::Read { offset, len };
        }
        let len = self.write_sizes.sample(&mut self.rng);
        let fresh = self.allocated < self.disk && self.rng.gen::<f64>() < Self::FRESH;
        let rel = if self.allocated == 0 || fresh {
            self.allocated
        } else {
            // Rewrite: recent data is hotter (P(newest x%) = x^(1/3)).
            // It ends inside written space where it fits, so only fresh writes add pages.
            let pages = self.allocated.div_ceil(4 * KIB);
            let back = (pages as f64 * self.rng.gen::<f64>().powi(3)) as u64;
            let rel = (pages - 1 - back.min(pages - 1)) * 4 * KIB;
            rel.min(self.allocated.saturating_sub(len) / (4 * KIB) * (4 * KIB))
        };
        let offset = (self.origin + rel) % self.disk;
        let len = len.min(self.disk - offset);
        self.allocated = self.allocated.max(rel + len).min(self.disk);
        IoOp::Write {
            offset,
            len,
            seed: self.rng.gen(),
        }
    }

    fn name(&self) -> &str {
        "cloud-mixed"
    }
}

/// `edge-cases`: see the module docs.
#[derive(Debug)]
struct EdgeCases {
    rng: ChaCha8Rng,
    size: u64,
    script: VecDeque<IoOp>,
    /// Cursor of the format pass, while it runs.
    format: Option<u64>,
    /// Mixed ops left before the `Extend`, on thread 0.
    extend_in: Option<u64>,
    mix: Mixed,
}

impl EdgeCases {
    const FORMAT_CHUNK: u64 = 4 * MIB;
    const EXTEND_AFTER: u64 = 5_000;
    const EXTEND_PCT: u64 = 25;

    fn new(disk: u64, seed: u64, thread: u64) -> Result<Self, WorkloadError> {
        let mut rng = ChaCha8Rng::seed_from_u64(derive_seed(seed, 0xed6e));
        rng.set_stream(thread);
        let any_sector = |sizes: &str| GeneratorConfig {
            sizes: mix(sizes),
            align: SECTOR,
            ..GeneratorConfig::new(disk)
        };
        let mix = Mixed::new("edge-cases", seed, thread, 50)
            .phase(u64::MAX)
            .part(35, 1, any_sector("1m/25:2m/25:3m/25:4m/25"))?
            .part(
                35,
                2,
                GeneratorConfig {
                    // Half of the small writes land in the last 1% of the disk.
                    distribution: dist("zoned:50/99:50/1"),
                    ..any_sector("512/40:1k/20:3584/20:7680/20")
                },
            )?
            .part(
                20,
                3,
                GeneratorConfig {
                    write: 0,
                    unmap: 1,
                    sizes: mix("4k/20:64k/30:1m/30:16m/20"),
                    ..GeneratorConfig::new(disk)
                },
            )?
            .part(
                10,
                4,
                GeneratorConfig {
                    read: 1,
                    write: 0,
                    ..any_sector("4k/50:1m/50")
                },
            )?;
        let mut e = EdgeCases {
            rng,
            size: disk,
            script: VecDeque::new(),
            format: None,
            extend_in: None,
            mix,
        };
        if thread == 0 {
            let last = disk - SECTOR;
            e.write(last, SECTOR);
            e.write(0, SECTOR);
            e.write(64 * KIB - 2 * SECTOR, 4 * SECTOR);
            e.write(disk - 9 * SECTOR, 9 * SECTOR);
            e.script.push_back(IoOp::Read {
                offset: last,
                len: SECTOR,
            });
            e.script.push_back(IoOp::Unmap {
                offset: disk - 16 * KIB,
                len: 16 * KIB,
            });
            e.write(last, SECTOR);
            e.script.push_back(IoOp::Flush);
            e.format = Some(0);
            e.extend_in = Some(Self::EXTEND_AFTER);
        }
        Ok(e)
    }

    fn write(&mut self, offset: u64, len: u64) {
        let seed = self.rng.gen();
        self.script.push_back(IoOp::Write { offset, len, seed });
    }
}

impl Workload for EdgeCases {
    fn next_op(&mut self) -> IoOp {
        if let Some(op) = self.script.pop_front() {
            return op;
        }
        if let Some(cursor) = self.format {
            let len = Self::FORMAT_CHUNK.min(self.size - cursor);
            self.format = (cursor + len < self.size).then_some(cursor + len);
            return IoOp::Write {
                offset: cursor,
                len,
                seed: self.rng.gen(),
            };
        }
        match self.extend_in {
            Some(0) => {
                self.extend_in = None;
                let old = self.size;
                let mut new_size = old + old / 100 * Self::EXTEND_PCT / SECTOR * SECTOR;
                if (new_size / SECTOR).is_multiple_of(2) {
                    new_size += SECTOR;
                }
                self.size = new_size;
                self.mix.set_disk_size(new_size);
                self.write(new_size - SECTOR, SECTOR);
                self.write(old - 4 * KIB, 8 * KIB);
                self.script.push_back(IoOp::Read {
                    offset: old - 4 * KIB,
                    len: 8 * KIB,
                });
                self.script.push_back(IoOp::Flush);
                return IoOp::Extend { new_size };
            }
            Some(ref mut n) => *n -= 1,
            None => {}
        }
        self.mix.next_op()
    }

    fn name(&self) -> &str {
        "edge-cases"
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    fn run(name: &str, disk: u64, seed: u64, thread: u32, n: usize) -> Vec<IoOp> {
        let mut w = profile(name, disk, seed, thread).unwrap();
        assert_eq!(w.name(), name);
        (0..n).map(|_| w.next_op()).collect()
    }

    fn writes(ops: &[IoOp]) -> impl Iterator<Item = (u64, u64)> + '_ {
        ops.iter().filter_map(|o| match *o {
            IoOp::Write { offset, len, .. } => Some((offset, len)),
            _ => None,
        })
    }

    #[test]
    fn every_profile_stays_inside_the_disk() {
        let odd = 10 * 1024 * MIB + 3 * SECTOR;
        for p in profiles() {
            for disk in [MIN_DISK_SIZE, MIN_DISK_SIZE + SECTOR, odd] {
                for thread in [0, 3] {
                    let mut size = disk;
                    let mut w = profile(p.name, disk, 7, thread).unwrap();
                    for _ in 0..30_000 {
                        let op = w.next_op();
                        if let IoOp::Extend { new_size } = op {
                            assert!(new_size > size && new_size % SECTOR == 0);
                            size = new_size;
                        }
                        if let Some((off, len)) = op.range() {
                            let ctx = format!("{} disk {disk} op {op:?}", p.name);
                            assert!(len > 0 && off % SECTOR == 0 && len % SECTOR == 0, "{ctx}");
                            assert!(off + len <= size, "{ctx}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn profiles_are_reproducible_and_threads_independent() {
        for p in profiles() {
            let a = run(p.name, 1 << 30, 1, 0, 300);
            assert_eq!(a, run(p.name, 1 << 30, 1, 0, 300), "{}", p.name);
            assert_ne!(a, run(p.name, 1 << 30, 1, 1, 300), "{}", p.name);
            assert_ne!(a, run(p.name, 1 << 30, 2, 0, 300), "{}", p.name);
        }
    }

    #[test]
    fn unknown_profile_and_bad_sizes() {
        let err = profile("nope", 1 << 30, 0, 0).err().unwrap().to_string();
        assert!(err.contains("\"nope\"") && err.contains("oltp-db"), "{err}");
        assert!(profile("vdi", 1000 * 1000, 0, 0).is_err());
        assert!(profile("vdi", (1 << 30) + 1, 0, 0).is_err());
    }

    fn read_fraction(ops: &[IoOp]) -> f64 {
        let reads = ops.iter().filter(|o| matches!(o, IoOp::Read { .. })).count();
        reads as f64 / (reads + writes(ops).count()) as f64
    }

    #[test]
    fn vdi_boot_then_steady_state() {
        let ops = run("vdi", 16 << 30, 3, 0, 100_000);
        // Flushes are every 64th op: boot covers about the first 30,000 * 64/63 ops.
        assert!((read_fraction(&ops[..30_000]) - 0.13).abs() < 0.015);
        assert!((read_fraction(&ops[32_000..]) - 0.15).abs() < 0.015);
        let w: Vec<_> = writes(&ops).collect();
        let mean = w.iter().map(|w| w.1).sum::<u64>() as f64 / w.len() as f64;
        assert!((mean / 1024.0 - 9.2).abs() < 0.3, "mean write {mean}");
    }

    #[test]
    fn oltp_wal_and_checkpoints() {
        let disk = 64 << 30;
        let (wal_start, _) = tail_region(disk, 5, 64 * KIB);
        let ops = run("oltp-db", disk, 3, 0, 60_000);
        let data: Vec<_> = writes(&ops).filter(|w| w.0 < wal_start).collect();
        assert!(data.iter().all(|w| w.0 % (8 * KIB) == 0));
        // Outside bursts data writes are single pages; bursts write up to 1 MiB.
        assert!(data.iter().any(|w| w.1 == MIB));
        let wal: Vec<_> = writes(&ops).filter(|w| w.0 >= wal_start).collect();
        assert!(wal.windows(2).filter(|p| p[0].0 + p[0].1 == p[1].0).count() > wal.len() * 9 / 10);
        assert!(wal.iter().all(|w| w.1 <= 60 * KIB));
        // Burst starting at op 20,000: 256 writes of 8 KiB-1 MiB.
        assert!(ops[20_000..20_200]
            .iter()
            .all(|o| matches!(o, IoOp::Write { .. } | IoOp::Flush)));
    }

    #[test]
    fn legacy_misaligned_matches_the_trace() {
        let ops = run("legacy-misaligned", 32 << 30, 5, 0, 200_000);
        let w: Vec<_> = writes(&ops).collect();
        let share = |f: &dyn Fn(&(u64, u64)) -> bool| w.iter().filter(|x| f(x)).count() as f64 / w.len() as f64;
        let at7 = share(&|w| (w.0 / SECTOR) % 8 == 7);
        assert!((at7 - 0.755).abs() < 0.01, "LBA 7 mod 8: {at7}");
        assert!((1.0 - read_fraction(&ops) - 0.587).abs() < 0.01);
        let two_blocks = share(&|w| (w.0 + w.1 - 1) / (4 * KIB) > w.0 / (4 * KIB));
        eprintln!("legacy-misaligned: LBA 7 mod 8 {at7:.3}, >= 2 4K blocks {two_blocks:.3}");
        assert!(two_blocks > 0.85, "span >= 2 4K blocks: {two_blocks}");
    }

    #[test]
    fn cloud_mixed_is_calibrated() {
        let ops = run("cloud-mixed", 64 << 30, 11, 0, 400_000);
        let wf = 1.0 - read_fraction(&ops);
        assert!((wf - 0.48).abs() < 0.01, "write fraction {wf}");
        let mut touched = 0u64;
        let mut unique = HashSet::new();
        for (off, len) in writes(&ops) {
            for page in off / (4 * KIB)..(off + len).div_ceil(4 * KIB) {
                touched += 1;
                unique.insert(page);
            }
        }
        let per_page = touched as f64 / unique.len() as f64;
        eprintln!("cloud-mixed: write fraction {wf:.3}, writes per unique 4 KiB page {per_page:.2}");
        assert!((per_page - 9.7).abs() < 1.0, "writes per unique page {per_page}");
    }

    #[test]
    fn log_append_is_sequential_with_tails_and_unmaps() {
        let disk = 4 << 30;
        let ops = run("log-append", disk, 1, 0, 50_000);
        let w: Vec<_> = writes(&ops).collect();
        let tails = w.iter().filter(|w| w.1 < 4 * KIB).count();
        assert!((tails as f64 / w.len() as f64 - 1.0 / 9.0).abs() < 0.01);
        let contiguous = w
            .windows(2)
            .filter(|p| p[1].0 == (p[0].0 + p[0].1).div_ceil(4 * KIB) * 4 * KIB);
        assert!(contiguous.count() >= w.len() - 2);
        let unmapped: u64 = ops
            .iter()
            .filter_map(|o| match o {
                IoOp::Unmap { len, .. } => Some(*len),
                _ => None,
            })
            .sum();
        let written: u64 = w.iter().map(|w| w.1).sum();
        assert!(
            (unmapped as f64 / written as f64 - 1.0).abs() < 0.1,
            "{unmapped} vs {written}"
        );
    }

    #[test]
    fn edge_cases_script_format_and_extend() {
        let disk = MIN_DISK_SIZE * 8 + 3 * SECTOR;
        let ops = run("edge-cases", disk, 1, 0, 20_000);
        assert!(matches!(ops[0], IoOp::Write { offset, len: 512, .. } if offset == disk - 512));
        // The format pass covers the whole disk with 4 MiB writes, the last one clipped.
        let format: Vec<_> = writes(&ops).skip(5).take(3).collect();
        assert_eq!(format, vec![(0, 4 * MIB), (4 * MIB, 4 * MIB), (8 * MIB, 3 * SECTOR)]);
        let ext: Vec<u64> = ops
            .iter()
            .filter_map(|o| match o {
                IoOp::Extend { new_size } => Some(*new_size),
                _ => None,
            })
            .collect();
        assert_eq!(ext.len(), 1);
        assert!(ext[0] > disk + disk / 5 && (ext[0] / SECTOR) % 2 == 1);
        assert!(writes(&ops).any(|w| w.0 + w.1 == ext[0]));
        assert!(writes(&ops).any(|w| w.0 + w.1 == disk));
        assert!(!run("edge-cases", disk, 1, 1, 20_000)
            .iter()
            .any(|o| matches!(o, IoOp::Extend { .. })));
    }

    #[test]
    fn profile_infos_are_complete() {
        let names: HashSet<_> = profiles().iter().map(|p| p.name).collect();
        assert_eq!(names.len(), 8);
        for p in profiles() {
            assert!(!p.description.is_empty() && !p.source.is_empty() && p.nominal_iops > 0);
        }
    }
}
