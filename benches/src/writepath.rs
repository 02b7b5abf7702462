//! Write-path measurement shared by `overhead` and `retained`: the write
//! streams (4 KiB random, 64 KiB sequential, the workload profiles' writes)
//! and an interleaved run of several trackers over the same streams.
//!
//! Every write goes through `sim`'s real write path, [`Vm::write_with`]: the
//! I/O gate, the range checks, the mark, the copy into the disk's sparse
//! memory-mapped extent. The variants differ only in what is marked: `()`
//! (tracking off, the mark compiles to nothing), our tracker, or a baseline.
//! `Vm::write` is the same generic code with the disk's own `Tracker`.
//!
//! Every round replays each thread's same pre-generated stream, after the
//! variant's [`reset`](crate::variant::Variant::reset) (a fresh epoch), so
//! every round of every variant does exactly the same writes, first touches
//! included. After the reset a [`Scrubber`] writes a buffer twice the size of
//! a large last-level cache, so every round starts with cold caches: a
//! baseline that clears its whole bitmap would otherwise start with the
//! bitmap hot in cache, which a real write path, between snapshots hours
//! apart, never has. One untimed warm-up round per variant comes first: it
//! faults in the disk pages the streams touch (every round writes the same
//! ones), so page faults stay out of the timed rounds. One write in
//! `sample_every` is timed into a latency histogram.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use hdrhistogram::Histogram;
use parking_lot::Mutex;
use sim::{DiskSpec, Host, SimError, Vm};
use tempfile::TempDir;
use tracker::{Granularity, MarkDirty};
use workloads::IoOp;

use crate::rng::SplitMix64;
use crate::stats::{latency_histogram, median, quantile, ratios};
use crate::variant::Variant;

/// One write: logical offset and length.
pub type Write = (u64, u32);

/// `n` aligned 4 KiB writes at uniformly random offsets of a `disk`-byte disk.
pub fn random_4k(disk: u64, n: usize, seed: u64) -> Vec<Write> {
    let mut rng = SplitMix64::new(seed);
    let pages = disk / 4096;
    (0..n).map(|_| (rng.below(pages) * 4096, 4096)).collect()
}

/// `n` sequential writes of `size` bytes from `start` (wrapping at `disk`).
pub fn sequential(disk: u64, start: u64, size: u32, n: usize) -> Vec<Write> {
    let size64 = u64::from(size);
    (0..n as u64)
        .map(|i| ((start + i * size64) % (disk - disk % size64), size))
        .collect()
}

/// The writes of profile `name` (thread `thread` of its VM) until they add
/// up to `bytes`; reads, unmaps, flushes and extends are skipped. Gives up
/// after a million ops without reaching `bytes`.
pub fn profile_writes(name: &str, disk: u64, thread: u32, bytes: u64) -> anyhow::Result<Vec<Write>> {
    let mut w = workloads::profile(name, disk, 42, thread)?;
    let (mut out, mut sum) = (Vec::new(), 0u64);
    for _ in 0..1_000_000 {
        if sum >= bytes {
            break;
        }
        if let IoOp::Write { offset, len, .. } = w.next_op() {
            out.push((offset, u32::try_from(len)?));
            sum += len;
        }
    }
    Ok(out)
}

/// Total bytes of a stream.
pub fn bytes_of(ops: &[Write]) -> u64 {
    ops.iter().map(|&(_, l)| u64::from(l)).sum()
}

/// A VM with one disk in a temporary datastore: what the write-path
/// benchmarks write to.
#[derive(Debug)]
pub struct BenchVm {
    /// The VM; disk 0 is the one written.
    pub vm: Arc<Vm>,
    _host: Host,
    _dir: TempDir,
}

impl BenchVm {
    /// A VM with one sparse disk of `capacity` bytes (its own tracker at
    /// `granularity` is not what the benchmarks mark) in a new temporary
    /// directory under `dir`.
    pub fn create(dir: &Path, capacity: u64, granularity: u64) -> anyhow::Result<Self> {
        let tmp = tempfile::Builder::new()
            .prefix("cbt-bench-vm-")
            .tempdir_in(dir)
            .with_context(|| format!("cannot create a temporary directory in {}", dir.display()))?;
        let host = Host::open(tmp.path())?;
        let spec = DiskSpec {
            capacity,
            granularity: Granularity::new(granularity)?,
        };
        let vm = host.create_vm("bench", &[spec])?;
        Ok(Self {
            vm,
            _host: host,
            _dir: tmp,
        })
    }
}

/// Replays `ops` on disk 0 of `vm` through the real write path, marking
/// `tracker`; every `every`-th write is timed into `hist`.
#[inline(never)]
pub fn replay<T: MarkDirty + ?Sized>(
    vm: &Vm,
    tracker: &T,
    ops: &[Write],
    src: &[u8],
    every: usize,
    hist: &mut Histogram<u64>,
) -> Result<(), SimError> {
    for (i, &(off, len)) in ops.iter().enumerate() {
        let buf = &src[..len as usize];
        if i % every == 0 {
            let t0 = Instant::now();
            vm.write_with(tracker, 0, off, buf)?;
            let _ = hist.record((t0.elapsed().as_nanos() as u64).max(1));
        } else {
            vm.write_with(tracker, 0, off, buf)?;
        }
    }
    Ok(())
}

/// What one variant measured.
#[derive(Debug)]
pub struct Measured {
    /// Wall seconds of each round.
    pub secs: Vec<f64>,
    /// CPU seconds of each round, all threads together.
    pub cpu: Vec<f64>,
    /// Sampled write latencies (ns), all rounds and threads.
    pub hist: Histogram<u64>,
}

/// Figures of one variant against the untracked one and a reference.
#[derive(Debug, Clone, Copy)]
pub struct Summary {
    /// Median throughput, MiB/s (wall time).
    pub mib_s: f64,
    /// Median of per-round throughput ratios against the untracked variant (wall time).
    pub ratio: f64,
    /// Lower quartile of those ratios.
    pub ratio_q1: f64,
    /// Upper quartile of those ratios.
    pub ratio_q3: f64,
    /// Median of per-round ratios of CPU time, untracked / this variant:
    /// throughput per CPU-second against tracking off.
    pub cpu_ratio: f64,
    /// Lower quartile of the CPU-time ratios.
    pub cpu_q1: f64,
    /// Upper quartile of the CPU-time ratios.
    pub cpu_q3: f64,
    /// Median of per-round CPU-time ratios against the reference variant.
    pub vs_ref: f64,
    /// CPU time per write (median round), ns.
    pub cpu_ns_per_write: f64,
}

/// Runs `rounds` interleaved rounds of every variant; thread `t` replays
/// `streams[t]` on disk 0 of `vm` (at least as large as every stream's
/// offsets). Writes copy from `src` (at least as long as the longest write).
pub fn measure(
    variants: &[Variant],
    vm: &Vm,
    streams: &[Vec<Write>],
    src: &[u8],
    rounds: usize,
    sample_every: usize,
) -> anyhow::Result<Vec<Measured>> {
    let hists: Vec<Mutex<Histogram<u64>>> = variants.iter().map(|_| Mutex::new(latency_histogram())).collect();
    let failed = Mutex::new(None);
    let recording = AtomicBool::new(false);
    let mut scrub = Scrubber::new();
    let mut reset = |v: usize| {
        if let Err(e) = variants[v].reset() {
            failed
                .lock()
                .get_or_insert(e.context("resetting a tracker between rounds failed"));
        }
        scrub.scrub();
    };
    let work = |t: usize, v: usize| {
        let mut h = latency_histogram();
        let r = crate::with_tracker!(&variants[v], |tr| replay(
            vm,
            tr,
            &streams[t],
            src,
            sample_every.max(1),
            &mut h
        ));
        if let Err(e) = r {
            failed
                .lock()
                .get_or_insert(anyhow::Error::new(e).context("a benchmark write failed"));
        }
        // Relaxed: set by the coordinator before the barrier that starts the round.
        if recording.load(Ordering::Relaxed) {
            hists[v].lock().add(&h).expect("same histogram bounds");
        }
    };
    crate::pool::interleaved(streams.len(), variants.len(), 1, &mut reset, work);
    recording.store(true, Ordering::Relaxed);
    let t = crate::pool::interleaved(streams.len(), variants.len(), rounds, &mut reset, work);
    if let Some(e) = failed.into_inner() {
        return Err(e);
    }
    Ok(t.wall
        .into_iter()
        .zip(t.cpu)
        .zip(hists)
        .map(|((secs, cpu), h)| Measured {
            secs,
            cpu,
            hist: h.into_inner(),
        })
        .collect())
}

/// Summarises variant `v` against `off` and `reference` (indices into `m`),
/// for rounds that wrote `bytes` and `writes` in total over all threads.
pub fn summarise(m: &[Measured], v: usize, off: usize, reference: usize, bytes: u64, writes: u64) -> Summary {
    let thr = |i: usize| -> Vec<f64> { m[i].secs.iter().map(|s| bytes as f64 / s / (1 << 20) as f64).collect() };
    let (tv, toff) = (thr(v), thr(off));
    let mut r = ratios(&tv, &toff);
    let mut c = ratios(&m[off].cpu, &m[v].cpu);
    let mut cpu = m[v].cpu.clone();
    Summary {
        mib_s: median(&mut tv.clone()),
        ratio: median(&mut r),
        ratio_q1: quantile(&mut r, 0.25),
        ratio_q3: quantile(&mut r, 0.75),
        cpu_ratio: median(&mut c),
        cpu_q1: quantile(&mut c, 0.25),
        cpu_q3: quantile(&mut c, 0.75),
        vs_ref: median(&mut ratios(&m[reference].cpu, &m[v].cpu)),
        cpu_ns_per_write: median(&mut cpu) / writes as f64 * 1e9,
    }
}

/// Evicts the caches by writing and reading a buffer of [`Scrubber::BYTES`].
#[derive(Debug)]
pub struct Scrubber {
    buf: Vec<u64>,
    pass: u64,
}

impl Scrubber {
    /// Twice the 32 MiB last-level cache of the machines these figures come from.
    pub const BYTES: usize = 64 << 20;

    /// A scrubber with its buffer faulted in.
    pub fn new() -> Self {
        let mut s = Self {
            buf: vec![0; Self::BYTES / 8],
            pass: 0,
        };
        s.scrub();
        s
    }

    /// Writes one word per cache line of the buffer, then reads them back.
    pub fn scrub(&mut self) {
        self.pass += 1;
        for w in self.buf.iter_mut().step_by(8) {
            *w = self.pass;
        }
        let sum: u64 = self.buf.iter().step_by(8).sum();
        std::hint::black_box(sum);
    }
}

impl Default for Scrubber {
    fn default() -> Self {
        Self::new()
    }
}

/// A copy source of `len` bytes of a fixed non-zero pattern.
pub fn source(len: usize) -> Vec<u8> {
    let mut rng = SplitMix64::new(0x5eed);
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        v.extend_from_slice(&(rng.next_u64() | 0x0101_0101_0101_0101).to_le_bytes());
    }
    v.truncate(len);
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::baselines::LockedBitmap;

    #[test]
    fn streams_stay_inside_the_disk() {
        let disk = 1 << 30;
        assert!(random_4k(disk, 1000, 1)
            .iter()
            .all(|&(o, l)| o % 4096 == 0 && o + u64::from(l) <= disk));
        let s = sequential(disk, disk - 65536, 65536, 3);
        assert_eq!(s, vec![(disk - 65536, 65536), (0, 65536), (65536, 65536)]);
        let p = profile_writes("oltp-db", disk, 0, 1 << 20).unwrap();
        assert!(bytes_of(&p) >= 1 << 20);
        assert!(p.iter().all(|&(o, l)| o + u64::from(l) <= disk));
        assert!(profile_writes("no-such-profile", disk, 0, 1).is_err());
    }

    #[test]
    fn measure_runs_every_variant_and_marks() {
        let bench = BenchVm::create(&std::env::temp_dir(), 1 << 30, 65536).unwrap();
        let variants = vec![Variant::Off, Variant::Locked(LockedBitmap::new(1 << 30, 65536))];
        let streams = vec![random_4k(1 << 30, 100, 1), random_4k(1 << 30, 100, 2)];
        let src = source(4096);
        let m = measure(&variants, &bench.vm, &streams, &src, 3, 4).unwrap();
        assert_eq!(m.len(), 2);
        assert!(m
            .iter()
            .all(|x| x.secs.len() == 3 && x.cpu.len() == 3 && x.hist.len() == 3 * 2 * 25));
        // The last round's writes are marked (reset runs before a round, not after).
        let Variant::Locked(b) = &variants[1] else {
            unreachable!()
        };
        assert!(streams.iter().flatten().all(|&(o, _)| b.is_marked(o >> 16)));
        let s = summarise(&m, 1, 0, 1, 2 * 100 * 4096, 200);
        assert!(s.ratio > 0.0 && s.mib_s > 0.0 && s.cpu_ratio > 0.0 && s.cpu_ns_per_write > 0.0);
        assert_eq!(s.vs_ref, 1.0);
        // The data went through the VM (whose own tracker saw none of it).
        let mut buf = vec![0u8; 4096];
        let (off, _) = streams[0][0];
        bench.vm.read(0, off, &mut buf).unwrap();
        assert_eq!(buf, src);
        bench.vm.create_snapshot("s").unwrap();
        let all = bench.vm.query_changed_disk_areas("s", 0, 0, "*").unwrap();
        assert!(all.changed_area.is_empty(), "{all:?}");
        // A stream past the disk's end is an error, not a silent skip.
        let past = vec![vec![(1u64 << 30, 4096u32)]];
        assert!(measure(&variants, &bench.vm, &past, &src, 1, 1).is_err());
    }
}
