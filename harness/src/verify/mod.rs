//! A torture test of change tracking across the VM lifecycle (`cbtsim verify`).
//!
//! One VM with one small disk in a temporary datastore. Writer threads do
//! random writes and unmaps (content from [`workloads::fill_pattern`]) while
//! a lifecycle thread does random operations: snapshot create, remove (the
//! newest, one in the middle, the oldest), revert, extend (across power-of-two
//! boundaries), CBT off and on, power off and on, a clean process restart
//! (close the VM and reopen it from the datastore) and a crash (drop it
//! without closing its trackers).
//!
//! # What is checked
//! * **The invariant**, by frozen views: each snapshot's image is read right
//!   after it is taken. For every kept change ID (a *baseline*, kept after its
//!   snapshot is removed, as a backup application keeps it) and every
//!   snapshot, the query "since the baseline, at the snapshot" must report
//!   every byte that differs between the two images. A block with an
//!   unreported difference is a *missed block*. Reported blocks without any
//!   difference are counted as `extra_bytes` (for information: a block
//!   rewritten with equal bytes is legitimately reported).
//! * `*` covers every non-zero byte of each new snapshot.
//! * **Typed errors where no exact answer exists**, against a model of the
//!   tracking state: a change ID from before a CBT toggle must fail with
//!   `TrackingReset`, a query while CBT is off with `TrackingDisabled`, a
//!   change ID newer than the snapshot with `ChangeIdAfterSnapshot`, guest I/O
//!   while powered off with `PoweredOff`. A crash keeps the tracking session:
//!   every change ID from before it must still answer exactly. Those are
//!   *expected errors*; an answer where the model expects an error, or the
//!   reverse, is a violation.
//! * Snapshot images stay frozen (re-read and compared later), a revert
//!   makes the live disk equal to its snapshot, the snapshot list and change
//!   IDs survive a restart, and (single-threaded) every snapshot equals an
//!   exact shadow copy of the disk.
//!
//! # Reproducibility
//! With at most one thread, writes and lifecycle operations alternate on one
//! thread and everything follows from the seed: the same `seed` and `ops`
//! give the same operations and the same counts.
//!
//! # Limitations
//! One disk per VM; revert, restart and crash pause the writers (a real host
//! reverts and restarts a stopped VM); the crash is in-process (the data is
//! kept, the trackers are not closed); real processes killed with SIGKILL are [`kill`].
//!
//! # Layout
//! `model` holds what the run knows the VM's state must be (snapshots, baselines,
//! tracking sessions) and the counters the threads share, `lifecycle` the writers and the
//! lifecycle operations, `checks` the comparisons of query answers with frozen images.
//! [`kill`] is the same invariant checked across real processes killed with SIGKILL.

mod checks;
pub mod kill;
mod lifecycle;
mod model;

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use backup::Progress;
use hdrhistogram::Histogram;
use parking_lot::RwLock;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use tracker::Granularity;

pub use checks::{compare, Comparison};
use lifecycle::{writer, Lifecycle};
use model::{Model, Stats, World};
use sim::{DiskSpec, Host, SimError};

/// The VM's name in the temporary datastore.
pub(super) const VM_NAME: &str = "verify";
/// Change IDs kept as baselines (with their images).
pub(super) const MAX_BASELINES: usize = 6;
/// Largest write or unmap.
pub(super) const MAX_IO: u64 = 128 << 10;
/// Most guest operations between two lifecycle operations (single-threaded).
pub(super) const MAX_INLINE_IO: u32 = 400;
/// Model sessions within which an old change ID must give `TrackingReset`
/// (the tracker remembers 32 ended sessions; a model session ends at most 2).
pub(super) const REMEMBERED_SESSIONS: u64 = 16;
/// Violation messages kept in the report (all are counted).
pub(super) const MAX_MESSAGES: usize = 20;

/// What to run.
#[derive(Debug, Clone)]
pub struct VerifyConfig {
    /// Stop after this long (`None`: only `ops` stops it).
    pub seconds: Option<f64>,
    /// Stop after this many lifecycle operations.
    pub ops: Option<u64>,
    /// Writer threads; 0 or 1 runs writes and lifecycle inline on one thread (reproducible).
    pub threads: usize,
    /// Seed of every random choice.
    pub seed: u64,
    /// The disk's initial size; it is extended up to twice that.
    pub disk_size: u64,
    /// Tracking granularity.
    pub granularity: Granularity,
    /// Most snapshots kept at once.
    pub max_snapshots: usize,
    /// Most changed areas the VM answers per query page ([`Vm::set_max_areas`](sim::Vm::set_max_areas); the
    /// default 64 is small so that paging is exercised, a few make every answer span
    /// many pages).
    pub max_areas: usize,
    /// Where to make the temporary datastore (default: `/dev/shm` where it
    /// exists, since what is tested is tracking, not `fsync`; else the
    /// system's temporary directory).
    pub dir: Option<PathBuf>,
}

impl Default for VerifyConfig {
    fn default() -> Self {
        Self {
            seconds: Some(10.0),
            ops: None,
            threads: 2,
            seed: 1,
            disk_size: 24 << 20,
            granularity: Granularity::DEFAULT,
            max_snapshots: 6,
            max_areas: 64,
            dir: None,
        }
    }
}

/// The units of a run's progress: a run is [`PROGRESS_TOTAL`] of them, spent as its ops
/// or its time run out, whichever is further along.
pub const PROGRESS_TOTAL: u64 = 1000;

/// The result of a run. It passed when `violations == 0` (which implies `missed_blocks == 0`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyReport {
    /// Lifecycle operations.
    pub ops: u64,
    /// Snapshots created.
    pub snapshots: u64,
    /// Query answers compared against frozen views (pairs and `*`).
    pub checks: u64,
    /// Blocks with a changed byte the answer did not report (must be 0).
    pub missed_blocks: u64,
    /// `QueryChangedDiskAreas` pages the checks fetched.
    pub query_pages: u64,
    /// Checked answers that took more than one page.
    pub multi_page_answers: u64,
    /// Reported bytes in blocks where nothing differed (over-reporting, allowed).
    pub extra_bytes: u64,
    /// Guest writes.
    pub writes: u64,
    /// Guest unmaps.
    pub unmaps: u64,
    /// Typed errors the model expected (tracking reset, tracking off, ...).
    pub expected_errors: u64,
    /// `expected_errors` by kind.
    pub expected: BTreeMap<String, u64>,
    /// Everything that broke a rule (missed blocks, wrong errors, changed views, ...).
    pub violations: u64,
    /// The first violations, described.
    pub violation_messages: Vec<String>,
    /// Lifecycle operations by kind.
    pub op_counts: BTreeMap<String, u64>,
    /// Snapshot images re-read and found unchanged.
    pub frozen_checks: u64,
    /// Live disk or snapshot content compared with the model's exact copy.
    pub data_checks: u64,
    /// Extends that crossed a power-of-two size.
    pub extends_across_pow2: u64,
    /// Initial disk size.
    pub disk_size: u64,
    /// Largest disk size reached.
    pub max_disk_size: u64,
    /// Tracking granularity.
    pub granularity: u64,
    /// Writer threads (0: inline).
    pub threads: usize,
    /// The seed.
    pub seed: u64,
    /// Wall-clock seconds.
    pub seconds: f64,
    /// Stuns (guest I/O blocked by a lifecycle operation).
    pub stuns: u64,
    /// Median stun, microseconds.
    pub stun_p50_us: f64,
    /// 99th percentile stun, microseconds.
    pub stun_p99_us: f64,
    /// Longest stun, microseconds.
    pub stun_max_us: f64,
    /// The run was interrupted (Ctrl-C) before its end: what it checked is above.
    pub interrupted: bool,
    /// Whether the run found nothing wrong: no violation, no missed block.
    pub passed: bool,
}

/// Runs the torture test. `progress` gets one phase of [`PROGRESS_TOTAL`] units, advanced
/// and noted (ops, checks, writes, violations) after every lifecycle operation.
///
/// Returns an error only when the run could not be set up or the VM could not
/// be reopened; everything else it finds is in the report.
pub fn run(cfg: &VerifyConfig, progress: &dyn Progress) -> Result<VerifyReport, SimError> {
    let g = cfg.granularity.bytes();
    if !cfg.disk_size.is_multiple_of(512) || cfg.disk_size < g.max(MAX_IO) || cfg.disk_size > 1 << 30 {
        return Err(SimError::BadSize {
            size: cfg.disk_size,
            reason: format!(
                "verify needs a whole number of sectors, at least the granularity and {MAX_IO} bytes, at most 1 GiB"
            ),
        });
    }
    let dir = scratch_parent(cfg.dir.as_deref());
    let tmp = tempfile::Builder::new()
        .prefix("cbtsim-verify")
        .tempdir_in(&dir)
        .map_err(|source| SimError::Io { path: dir, source })?;
    let host = Host::open(&tmp.path().join("datastore"))?;
    let vm = host.create_vm(
        VM_NAME,
        &[DiskSpec {
            capacity: cfg.disk_size,
            granularity: cfg.granularity,
        }],
    )?;
    vm.set_max_areas(cfg.max_areas);
    let world = World {
        host,
        slot: RwLock::new(Some(vm)),
        stop: AtomicBool::new(false),
        stats: Stats::default(),
    };
    let inline = cfg.threads <= 1;
    let mut lc = Lifecycle {
        cfg,
        world: &world,
        model: Model {
            snaps: Vec::new(),
            baselines: VecDeque::new(),
            session: 0,
            session_uuid: None,
            seen_uuids: HashSet::new(),
            cbt: true,
            capacity: cfg.disk_size,
            shadow: inline.then(|| vec![0u8; cfg.disk_size as usize]),
            next_order: 0,
        },
        rng: ChaCha8Rng::seed_from_u64(cfg.seed),
        inline,
        buf: vec![0u8; MAX_IO as usize],
        op_counts: BTreeMap::new(),
        snapshots: 0,
        extends_across_pow2: 0,
        max_disk_size: cfg.disk_size,
        stun: Histogram::new(3).expect("3 significant figures is valid"),
    };
    let start = Instant::now();
    let result = std::thread::scope(|s| {
        let writers: Vec<_> = (0..if inline { 0 } else { cfg.threads })
            .map(|i| {
                let seed = cfg.seed ^ (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
                let w = &world;
                s.spawn(move || writer(w, seed))
            })
            .collect();
        progress.begin("verify", Some(PROGRESS_TOTAL));
        let r = lc.run_ops(start, progress);
        progress.end();
        world.stop.store(true, Ordering::Relaxed);
        for w in writers {
            if w.join().is_err() {
                world.stats.violation("a writer thread panicked".into());
            }
        }
        r
    });
    result?;
    // A last snapshot after the writers stopped, checked against every baseline.
    lc.create()?;
    lc.stun.add(crate::drive::stun_histogram(&world.vm())).ok();
    let mut report = lc.report(start.elapsed());
    report.interrupted = progress.cancelled();
    Ok(report)
}

/// Where a run makes its scratch directory: `dir` when given, else `/dev/shm`
/// where it exists (what is tested is tracking, not `fsync`), else the
/// system's temporary directory.
pub(crate) fn scratch_parent(dir: Option<&std::path::Path>) -> std::path::PathBuf {
    let shm = std::path::Path::new("/dev/shm");
    match dir {
        Some(d) => d.to_owned(),
        None if shm.is_dir() => shm.to_owned(),
        None => std::env::temp_dir(),
    }
}
