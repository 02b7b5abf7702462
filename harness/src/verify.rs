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
//!   tracking state: a change ID from before a CBT toggle or a crash must fail
//!   with `TrackingReset`, a query while CBT is off with `TrackingDisabled`, a
//!   change ID newer than the snapshot with `ChangeIdAfterSnapshot`, guest I/O
//!   while powered off with `PoweredOff`. A revert to a snapshot taken before
//!   a crash starts a new session too (the crash lost what it would mark). Those are *expected errors*; an
//!   answer where the model expects an error, or the reverse, is a violation.
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
//! kept, the trackers are not closed), the real kill is tested separately.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use parking_lot::{Mutex, RwLock};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use tracker::Granularity;
use vadp::VadpError;

use sim::{DiskSpec, Host, SimError, Vm};

/// The VM's name in the temporary datastore.
const VM_NAME: &str = "verify";
/// Areas per query page: small, so that paging is exercised.
const PAGE_AREAS: usize = 64;
/// Change IDs kept as baselines (with their images).
const MAX_BASELINES: usize = 6;
/// Largest write or unmap.
const MAX_IO: u64 = 128 << 10;
/// Most guest operations between two lifecycle operations (single-threaded).
const MAX_INLINE_IO: u32 = 400;
/// Model sessions within which an old change ID must give `TrackingReset`
/// (the tracker remembers 32 ended sessions; a model session ends at most 2).
const REMEMBERED_SESSIONS: u64 = 16;
/// Violation messages kept in the report (all are counted).
const MAX_MESSAGES: usize = 20;

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
            dir: None,
        }
    }
}

/// Where a run is, for a progress bar.
#[derive(Debug, Clone)]
pub struct Progress {
    /// Lifecycle operations done.
    pub ops: u64,
    /// Queries compared against frozen views.
    pub checks: u64,
    /// Guest writes and unmaps done.
    pub writes: u64,
    /// Violations found.
    pub violations: u64,
    /// Time since the start.
    pub elapsed: Duration,
    /// How far along, 0.0 to 1.0.
    pub fraction: f64,
}

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
}

impl VerifyReport {
    /// Whether the run found nothing wrong.
    pub fn passed(&self) -> bool {
        self.violations == 0 && self.missed_blocks == 0
    }
}

/// What comparing two images against a reported answer found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Comparison {
    /// Blocks with a differing byte outside the areas.
    pub missed_blocks: u64,
    /// Differing bytes outside the areas.
    pub missed_bytes: u64,
    /// Reported bytes in blocks with no difference.
    pub extra_bytes: u64,
    /// Blocks with a difference.
    pub changed_blocks: u64,
}

/// Compares `old` (zero-extended) with `new` over `new`'s length, block by
/// block of `granularity` bytes, against the reported `areas` (sorted,
/// non-overlapping, inside `new`).
pub fn compare(old: &[u8], new: &[u8], areas: &[(u64, u64)], granularity: u64) -> Comparison {
    let g = granularity as usize;
    let len = new.len();
    let blocks = len.div_ceil(g);
    let mut covered = vec![0u64; blocks];
    for &(s, l) in areas {
        let (s, e) = (s as usize, (s + l) as usize);
        let mut p = s;
        while p < e {
            let b = p / g;
            let be = ((b + 1) * g).min(e);
            covered[b] += (be - p) as u64;
            p = be;
        }
    }
    let inside = |i: usize| {
        let k = areas.partition_point(|&(s, _)| s as usize <= i);
        k > 0 && {
            let (s, l) = areas[k - 1];
            i < (s + l) as usize
        }
    };
    let zeros = vec![0u8; g];
    let mut c = Comparison::default();
    for (b, &cov) in covered.iter().enumerate() {
        let (s, e) = (b * g, ((b + 1) * g).min(len));
        let n = &new[s..e];
        let o = if s < old.len() {
            &old[s..e.min(old.len())]
        } else {
            &[][..]
        };
        let differs = o != &n[..o.len()] || n[o.len()..] != zeros[..n.len() - o.len()];
        if !differs {
            c.extra_bytes += cov;
            continue;
        }
        c.changed_blocks += 1;
        if cov == (e - s) as u64 {
            continue;
        }
        let missed = (s..e)
            .filter(|&i| old.get(i).copied().unwrap_or(0) != new[i] && !inside(i))
            .count() as u64;
        if missed > 0 {
            c.missed_blocks += 1;
            c.missed_bytes += missed;
        }
    }
    c
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Op {
    Create,
    RemoveNewest,
    RemoveMiddle,
    RemoveOldest,
    Revert,
    Extend,
    CbtOff,
    CbtOn,
    PowerCycle,
    Restart,
    Crash,
    Recheck,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Create => "create",
            Op::RemoveNewest => "remove_newest",
            Op::RemoveMiddle => "remove_middle",
            Op::RemoveOldest => "remove_oldest",
            Op::Revert => "revert",
            Op::Extend => "extend",
            Op::CbtOff => "cbt_off",
            Op::CbtOn => "cbt_on",
            Op::PowerCycle => "power_cycle",
            Op::Restart => "restart",
            Op::Crash => "crash",
            Op::Recheck => "recheck",
        }
    }
}

/// A kept snapshot, as the model knows it.
#[derive(Debug, Clone)]
struct Snap {
    name: String,
    order: u64,
    session: u64,
    cid: Option<String>,
    image: Arc<Vec<u8>>,
}

/// A change ID a backup application kept, with the image it backed up.
#[derive(Debug, Clone)]
struct Baseline {
    name: String,
    order: u64,
    session: u64,
    cid: String,
    image: Arc<Vec<u8>>,
}

/// The model: what the VM's state must be.
#[derive(Debug)]
struct Model {
    snaps: Vec<Snap>,
    baselines: VecDeque<Baseline>,
    /// Tracking session: bumped when CBT goes on again and at a crash.
    session: u64,
    session_uuid: Option<String>,
    seen_uuids: HashSet<String>,
    cbt: bool,
    capacity: u64,
    /// Exact live content (single-threaded runs only).
    shadow: Option<Vec<u8>>,
    next_order: u64,
    /// `next_order` at the last crash: a revert to a snapshot older than
    /// that cannot be tracked (the crash lost the epochs after it), so it
    /// starts a new session.
    crash_order: u64,
}

/// Counters shared with the writer threads.
#[derive(Debug, Default)]
struct Stats {
    writes: AtomicU64,
    unmaps: AtomicU64,
    checks: AtomicU64,
    missed_blocks: AtomicU64,
    extra_bytes: AtomicU64,
    frozen_checks: AtomicU64,
    data_checks: AtomicU64,
    violations: AtomicU64,
    messages: Mutex<Vec<String>>,
    expected: Mutex<BTreeMap<String, u64>>,
}

impl Stats {
    fn violation(&self, msg: String) {
        self.violations.fetch_add(1, Ordering::Relaxed);
        let mut m = self.messages.lock();
        if m.len() < MAX_MESSAGES {
            m.push(msg);
        }
    }

    fn expected(&self, kind: &str) {
        *self.expected.lock().entry(kind.to_owned()).or_default() += 1;
    }
}

/// What the writer threads and the lifecycle thread share.
#[derive(Debug)]
struct World {
    host: Host,
    /// The open VM. Writers hold the read side for each I/O; restart, crash
    /// and revert take the write side to pause them.
    slot: RwLock<Option<Arc<Vm>>>,
    stop: AtomicBool,
    stats: Stats,
}

impl World {
    fn vm(&self) -> Arc<Vm> {
        self.slot.read().clone().expect("the VM is open")
    }
}

/// One random guest write or unmap.
fn guest_io(vm: &Vm, rng: &mut ChaCha8Rng, buf: &mut [u8], stats: &Stats, shadow: Option<&mut Vec<u8>>) {
    let cap = match vm.capacity(0) {
        Ok(c) => c,
        Err(e) => return stats.violation(format!("capacity: {e}")),
    };
    let aligned = rng.gen_ratio(9, 10);
    let len = if aligned {
        512 * rng.gen_range(1..=MAX_IO / 512)
    } else {
        rng.gen_range(1..=8192u64)
    }
    .min(cap);
    let mut off = if rng.gen_ratio(1, 8) {
        // Near the end: after an extend these are writes past the old end.
        cap - len - rng.gen_range(0..=(cap - len).min(64 << 10))
    } else {
        rng.gen_range(0..=cap - len)
    };
    if aligned {
        off &= !511;
    }
    let unmap = rng.gen_ratio(1, 20);
    let seed: u64 = rng.gen();
    let data = &mut buf[..len as usize];
    let res = if unmap {
        vm.unmap(0, off, len)
    } else {
        workloads::fill_pattern(seed, off, data);
        vm.write(0, off, data)
    };
    match res {
        Ok(()) => {
            if unmap {
                stats.unmaps.fetch_add(1, Ordering::Relaxed);
            } else {
                stats.writes.fetch_add(1, Ordering::Relaxed);
            }
            if let Some(s) = shadow {
                let r = off as usize..(off + len) as usize;
                if unmap {
                    s[r].fill(0);
                } else {
                    s[r].copy_from_slice(data);
                }
            }
        }
        Err(SimError::PoweredOff(_)) => {
            stats.expected("powered_off");
            std::thread::sleep(Duration::from_micros(200));
        }
        // A revert shrank the disk between our capacity read and the write.
        Err(SimError::OutOfRange { .. }) if vm.capacity(0).is_ok_and(|c| c < off + len) => {
            stats.expected("out_of_range_after_revert");
        }
        Err(e) => stats.violation(format!("guest I/O of {len} bytes at {off}: {e}")),
    }
}

fn writer(world: &World, seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut buf = vec![0u8; MAX_IO as usize];
    while !world.stop.load(Ordering::Relaxed) {
        let g = world.slot.read();
        let Some(vm) = g.as_ref() else { return };
        guest_io(vm, &mut rng, &mut buf, &world.stats, None);
    }
}

/// The expected outcome of a query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Answer,
    Disabled,
    Reset { sessions_ago: u64 },
    AfterSnapshot,
}

/// The lifecycle side of a run.
struct Lifecycle<'a> {
    cfg: &'a VerifyConfig,
    world: &'a World,
    model: Model,
    rng: ChaCha8Rng,
    inline: bool,
    buf: Vec<u8>,
    op_counts: BTreeMap<String, u64>,
    snapshots: u64,
    extends_across_pow2: u64,
    max_disk_size: u64,
    stun: Histogram<u64>,
}

/// Runs the torture test. `progress` is called after every lifecycle operation.
///
/// Returns an error only when the run could not be set up or the VM could not
/// be reopened; everything else it finds is in the report.
pub fn run(cfg: &VerifyConfig, progress: &mut dyn FnMut(&Progress)) -> Result<VerifyReport, SimError> {
    let g = cfg.granularity.bytes();
    if !cfg.disk_size.is_multiple_of(512) || cfg.disk_size < g.max(MAX_IO) || cfg.disk_size > 1 << 30 {
        return Err(SimError::BadSize {
            size: cfg.disk_size,
            reason: format!(
                "verify needs a whole number of sectors, at least the granularity and {MAX_IO} bytes, at most 1 GiB"
            ),
        });
    }
    let shm = std::path::Path::new("/dev/shm");
    let dir = match &cfg.dir {
        Some(d) => d.clone(),
        None if shm.is_dir() => shm.to_owned(),
        None => std::env::temp_dir(),
    };
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
    vm.set_max_areas(PAGE_AREAS);
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
            crash_order: 0,
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
        let r = lc.run_ops(start, progress);
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
    Ok(lc.report(start.elapsed()))
}

impl Lifecycle<'_> {
    fn run_ops(&mut self, start: Instant, progress: &mut dyn FnMut(&Progress)) -> Result<(), SimError> {
        let mut ops = 0u64;
        loop {
            let elapsed = start.elapsed();
            let by_ops = self.cfg.ops.map(|n| ops as f64 / n.max(1) as f64);
            let by_time = self.cfg.seconds.map(|s| elapsed.as_secs_f64() / s.max(1e-9));
            let fraction = by_ops.into_iter().chain(by_time).fold(0.0f64, f64::max);
            if fraction >= 1.0 || (by_ops.is_none() && by_time.is_none()) {
                return Ok(());
            }
            if self.inline {
                let vm = self.world.vm();
                for _ in 0..self.rng.gen_range(0..=MAX_INLINE_IO) {
                    guest_io(
                        &vm,
                        &mut self.rng,
                        &mut self.buf,
                        &self.world.stats,
                        self.model.shadow.as_mut(),
                    );
                }
            }
            let op = self.choose();
            *self.op_counts.entry(op.name().to_owned()).or_default() += 1;
            self.apply(op)?;
            self.check_listing();
            ops += 1;
            let st = &self.world.stats;
            progress(&Progress {
                ops,
                checks: st.checks.load(Ordering::Relaxed),
                writes: st.writes.load(Ordering::Relaxed) + st.unmaps.load(Ordering::Relaxed),
                violations: st.violations.load(Ordering::Relaxed),
                elapsed: start.elapsed(),
                fraction: fraction.min(1.0),
            });
        }
    }

    fn choose(&mut self) -> Op {
        let m = &self.model;
        let n = m.snaps.len();
        let max_cap = 2 * self.cfg.disk_size;
        let weights = [
            (Op::Create, if n < self.cfg.max_snapshots { 30 } else { 0 }),
            (Op::RemoveNewest, if n > 0 { 6 } else { 0 }),
            (Op::RemoveMiddle, if n > 2 { 6 } else { 0 }),
            (Op::RemoveOldest, if n > 1 { 6 } else { 0 }),
            (Op::Revert, if n > 0 { 5 } else { 0 }),
            (Op::Extend, if m.capacity + 512 <= max_cap { 6 } else { 0 }),
            (Op::CbtOff, if m.cbt { 2 } else { 0 }),
            (Op::CbtOn, if m.cbt { 0 } else { 20 }),
            (Op::PowerCycle, 3),
            (Op::Restart, 3),
            (Op::Crash, 1),
            (Op::Recheck, if n > 0 { 8 } else { 0 }),
        ];
        let total: u32 = weights.iter().map(|w| w.1).sum();
        let mut r = self.rng.gen_range(0..total);
        for (op, w) in weights {
            if r < w {
                return op;
            }
            r -= w;
        }
        unreachable!("r < total")
    }

    fn apply(&mut self, op: Op) -> Result<(), SimError> {
        match op {
            Op::Create => self.create(),
            Op::RemoveNewest => self.remove(self.model.snaps.len() - 1),
            Op::RemoveOldest => self.remove(0),
            Op::RemoveMiddle => {
                let i = self.rng.gen_range(1..self.model.snaps.len() - 1);
                self.remove(i)
            }
            Op::Revert => {
                let i = self.rng.gen_range(0..self.model.snaps.len());
                self.revert(i)
            }
            Op::Extend => self.extend(),
            Op::CbtOff | Op::CbtOn => {
                let on = op == Op::CbtOn;
                if let Err(e) = self.world.vm().set_cbt(on) {
                    self.world
                        .stats
                        .violation(format!("CBT {}: {e}", if on { "on" } else { "off" }));
                    return Ok(());
                }
                self.model.cbt = on;
                if on {
                    self.new_session();
                }
                Ok(())
            }
            Op::PowerCycle => self.power_cycle(),
            Op::Restart => self.reopen(false),
            Op::Crash => {
                self.reopen(true)?;
                self.new_session();
                self.model.crash_order = self.model.next_order;
                Ok(())
            }
            Op::Recheck => {
                let i = self.rng.gen_range(0..self.model.snaps.len());
                self.recheck(i);
                Ok(())
            }
        }
    }

    fn new_session(&mut self) {
        self.model.session += 1;
        self.model.session_uuid = None;
    }

    fn violation(&self, msg: String) {
        self.world.stats.violation(msg);
    }

    /// Reads a whole snapshot disk.
    fn image(&self, vm: &Vm, snap: &str) -> Result<Vec<u8>, SimError> {
        let cap = vm.snapshot_capacity(snap, 0)?;
        let mut buf = vec![0u8; cap as usize];
        vm.read_snapshot(snap, 0, 0, &mut buf)?;
        Ok(buf)
    }

    fn create(&mut self) -> Result<(), SimError> {
        let vm = self.world.vm();
        let order = self.model.next_order;
        self.model.next_order += 1;
        let name = format!("s{order}");
        let info = match vm.create_snapshot(&name) {
            Ok(i) => i,
            Err(e) => {
                self.violation(format!("create {name}: {e}"));
                return Ok(());
            }
        };
        self.snapshots += 1;
        let cid = info.disks[0].change_id.clone();
        if cid.is_some() != self.model.cbt {
            self.violation(format!(
                "snapshot {name}: change ID {cid:?} with CBT {}",
                self.model.cbt
            ));
        }
        if let Some(c) = &cid {
            self.check_session(&name, c);
        }
        if info.disks[0].capacity != self.model.capacity {
            self.violation(format!(
                "snapshot {name}: capacity {} where the model has {}",
                info.disks[0].capacity, self.model.capacity
            ));
        }
        let image = Arc::new(self.image(&vm, &name)?);
        if let Some(shadow) = &self.model.shadow {
            self.world.stats.data_checks.fetch_add(1, Ordering::Relaxed);
            if shadow[..] != image[..] {
                let at = shadow.iter().zip(image.iter()).position(|(a, b)| a != b);
                self.violation(format!("snapshot {name} differs from the exact model at {at:?}"));
            }
        }
        let snap = Snap {
            name: name.clone(),
            order,
            session: self.model.session,
            cid: cid.clone(),
            image: image.clone(),
        };
        drop(vm);
        self.check_all_allocated(&snap);
        let baselines: Vec<Baseline> = self.model.baselines.iter().cloned().collect();
        for b in &baselines {
            self.check_pair(&snap, b);
        }
        if let Some(c) = cid {
            let b = Baseline {
                name,
                order,
                session: self.model.session,
                cid: c,
                image,
            };
            self.check_pair(&snap, &b);
            self.model.baselines.push_back(b);
            if self.model.baselines.len() > MAX_BASELINES {
                self.model.baselines.pop_front();
            }
        }
        self.model.snaps.push(snap);
        Ok(())
    }

    /// Every change ID of one session shares its UUID; a new session has a new one.
    fn check_session(&mut self, snap: &str, cid: &str) {
        let uuid = cid.split('/').next().unwrap_or("").to_owned();
        match &self.model.session_uuid {
            Some(u) if *u == uuid => {}
            Some(u) => self.violation(format!("snapshot {snap}: session {uuid} where {u} was current")),
            None => {
                if !self.model.seen_uuids.insert(uuid.clone()) {
                    self.violation(format!("snapshot {snap}: a new tracking session reuses UUID {uuid}"));
                }
                self.model.session_uuid = Some(uuid);
            }
        }
    }

    fn query(&self, snap: &str, since: &str) -> Result<Vec<(u64, u64)>, VadpError> {
        vadp::changed_areas(&self.world.host, VM_NAME, snap, 0, since)
            .map(|r| r.map(|a| (a.start, a.length)))
            .collect()
    }

    /// `*` at `snap` covers every non-zero byte.
    fn check_all_allocated(&self, snap: &Snap) {
        let st = &self.world.stats;
        match (self.model.cbt, self.query(&snap.name, "*")) {
            (true, Ok(areas)) => {
                let c = compare(&[], &snap.image, &areas, self.cfg.granularity.bytes());
                st.checks.fetch_add(1, Ordering::Relaxed);
                st.missed_blocks.fetch_add(c.missed_blocks, Ordering::Relaxed);
                if c.missed_blocks > 0 {
                    self.violation(format!(
                        "`*` at {} misses {} blocks of data ({} bytes)",
                        snap.name, c.missed_blocks, c.missed_bytes
                    ));
                }
            }
            (false, Err(VadpError::TrackingDisabled)) => st.expected("tracking_disabled"),
            (cbt, r) => self.violation(format!("`*` at {} with CBT {cbt}: {r:?}", snap.name)),
        }
    }

    /// The query at `at` since `base`'s change ID: exact per the frozen
    /// views, or the typed error the model expects.
    fn check_pair(&self, at: &Snap, base: &Baseline) {
        let m = &self.model;
        let expect = if !m.cbt {
            Expect::Disabled
        } else if base.session != m.session {
            Expect::Reset {
                sessions_ago: m.session - base.session,
            }
        } else if base.order > at.order {
            Expect::AfterSnapshot
        } else {
            Expect::Answer
        };
        let st = &self.world.stats;
        let got = self.query(&at.name, &base.cid);
        let what = || format!("query at {} since {} ({})", at.name, base.name, base.cid);
        match (expect, got) {
            (Expect::Answer, Ok(areas)) => {
                let c = compare(&base.image, &at.image, &areas, self.cfg.granularity.bytes());
                st.checks.fetch_add(1, Ordering::Relaxed);
                st.missed_blocks.fetch_add(c.missed_blocks, Ordering::Relaxed);
                st.extra_bytes.fetch_add(c.extra_bytes, Ordering::Relaxed);
                if c.missed_blocks > 0 {
                    self.violation(format!(
                        "{}: {} changed blocks ({} bytes) not reported",
                        what(),
                        c.missed_blocks,
                        c.missed_bytes
                    ));
                }
            }
            (Expect::Disabled, Err(VadpError::TrackingDisabled)) => st.expected("tracking_disabled"),
            (Expect::Reset { .. }, Err(VadpError::TrackingReset { .. })) => st.expected("tracking_reset"),
            (Expect::Reset { sessions_ago }, Err(VadpError::ForeignChangeId { .. }))
                if sessions_ago > REMEMBERED_SESSIONS =>
            {
                st.expected("foreign_change_id")
            }
            (Expect::AfterSnapshot, Err(VadpError::ChangeIdAfterSnapshot { .. })) => {
                st.expected("change_id_after_snapshot")
            }
            (e, Ok(areas)) => self.violation(format!(
                "{}: answered {} areas where the model expects {e:?}",
                what(),
                areas.len()
            )),
            (e, Err(err)) => self.violation(format!("{}: error {err:?} where the model expects {e:?}", what())),
        }
    }

    /// Re-reads a kept snapshot (it must be unchanged) and checks it against every baseline.
    fn recheck(&mut self, i: usize) {
        let snap = self.model.snaps[i].clone();
        let vm = self.world.vm();
        match self.image(&vm, &snap.name) {
            Ok(img) => {
                self.world.stats.frozen_checks.fetch_add(1, Ordering::Relaxed);
                if img[..] != snap.image[..] {
                    self.violation(format!("snapshot {} changed after it was taken", snap.name));
                }
            }
            Err(e) => self.violation(format!("re-read of {}: {e}", snap.name)),
        }
        drop(vm);
        if self.model.cbt && snap.session == self.model.session {
            self.check_all_allocated(&snap);
        }
        let baselines: Vec<Baseline> = self.model.baselines.iter().cloned().collect();
        for b in &baselines {
            self.check_pair(&snap, b);
        }
    }

    fn remove(&mut self, i: usize) -> Result<(), SimError> {
        let name = self.model.snaps[i].name.clone();
        if let Err(e) = self.world.vm().remove_snapshot(&name) {
            self.violation(format!("remove {name}: {e}"));
            return Ok(());
        }
        self.model.snaps.remove(i);
        Ok(())
    }

    fn revert(&mut self, i: usize) -> Result<(), SimError> {
        let target = self.model.snaps[i].clone();
        // A real host reverts a stopped VM: pause the writers.
        let g = self.world.slot.write();
        let vm = g.as_ref().expect("the VM is open");
        if let Err(e) = vm.revert_to_snapshot(&target.name) {
            self.violation(format!("revert to {}: {e}", target.name));
            return Ok(());
        }
        self.model.snaps.truncate(i + 1);
        if target.order < self.model.crash_order {
            self.new_session();
        }
        self.model.capacity = target.image.len() as u64;
        if let Some(s) = &mut self.model.shadow {
            s.clone_from(&target.image);
        }
        let mut live = vec![0u8; target.image.len()];
        match vm.capacity(0).and_then(|c| {
            if c != live.len() as u64 {
                self.violation(format!("after revert to {}: capacity {c}", target.name));
            }
            vm.read(0, 0, &mut live)
        }) {
            Ok(()) => {
                self.world.stats.data_checks.fetch_add(1, Ordering::Relaxed);
                if live[..] != target.image[..] {
                    self.violation(format!("after revert to {} the live disk differs from it", target.name));
                }
            }
            Err(e) => self.violation(format!("read after revert to {}: {e}", target.name)),
        }
        Ok(())
    }

    fn extend(&mut self) -> Result<(), SimError> {
        let cur = self.model.capacity;
        let max = 2 * self.cfg.disk_size;
        let mut new = if self.rng.gen_ratio(1, 3) {
            // Just past the next power of two.
            (cur + 1).next_power_of_two() + 512 * self.rng.gen_range(0..4)
        } else {
            self.rng.gen_range(cur + 512..=max)
        };
        new = (new.min(max) / 512) * 512;
        if new <= cur {
            new = cur + 512;
        }
        if let Err(e) = self.world.vm().extend_disk(0, new) {
            self.violation(format!("extend {cur} -> {new}: {e}"));
            return Ok(());
        }
        if (cur + 1).next_power_of_two() <= new {
            self.extends_across_pow2 += 1;
        }
        self.model.capacity = new;
        self.max_disk_size = self.max_disk_size.max(new);
        if let Some(s) = &mut self.model.shadow {
            s.resize(new as usize, 0);
        }
        Ok(())
    }

    fn power_cycle(&mut self) -> Result<(), SimError> {
        let vm = self.world.vm();
        if let Err(e) = vm.set_power(false) {
            self.violation(format!("power off: {e}"));
            return Ok(());
        }
        match vm.write(0, 0, &[1]) {
            Err(SimError::PoweredOff(_)) => self.world.stats.expected("powered_off"),
            r => self.violation(format!("a write while powered off gave {r:?}")),
        }
        drop(vm);
        if self.rng.gen_ratio(1, 3) {
            self.reopen(false)?;
        }
        if let Err(e) = self.world.vm().set_power(true) {
            self.violation(format!("power on: {e}"));
        }
        Ok(())
    }

    /// Closes the VM (cleanly, or as a crash would) and opens it again from
    /// the datastore, with the writers paused.
    fn reopen(&mut self, crash: bool) -> Result<(), SimError> {
        let world = self.world;
        let mut g = world.slot.write();
        let mut vm = g.take().expect("the VM is open");
        drop(world.host.close_vm(VM_NAME));
        self.stun.add(crate::drive::stun_histogram(&vm)).ok();
        let deadline = Instant::now() + Duration::from_secs(30);
        let vm = loop {
            match Arc::try_unwrap(vm) {
                Ok(v) => break v,
                Err(a) if Instant::now() < deadline => {
                    vm = a;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(_) => {
                    world.stop.store(true, Ordering::Relaxed);
                    return Err(SimError::VmInUse(VM_NAME.into()));
                }
            }
        };
        if crash {
            vm.crash();
        } else {
            drop(vm);
        }
        let vm = match world.host.vm(VM_NAME) {
            Ok(v) => v,
            Err(e) => {
                world.stop.store(true, Ordering::Relaxed);
                return Err(e);
            }
        };
        vm.set_max_areas(PAGE_AREAS);
        *g = Some(vm);
        Ok(())
    }

    /// The VM's snapshots and their change IDs are what the model says.
    fn check_listing(&mut self) {
        let listed = self.world.vm().snapshots();
        let names: Vec<&str> = listed.iter().map(|s| s.name.as_str()).collect();
        let model: Vec<&str> = self.model.snaps.iter().map(|s| s.name.as_str()).collect();
        if names != model {
            self.violation(format!("snapshots {names:?} where the model has {model:?}"));
            return;
        }
        for (l, s) in listed.iter().zip(&self.model.snaps) {
            let want = (self.model.cbt && s.session == self.model.session)
                .then(|| s.cid.clone())
                .flatten();
            if l.disks[0].change_id != want {
                self.violation(format!(
                    "snapshot {}: change ID {:?} where the model has {want:?}",
                    s.name, l.disks[0].change_id
                ));
            }
        }
    }

    fn report(&self, elapsed: Duration) -> VerifyReport {
        let st = &self.world.stats;
        let expected = st.expected.lock().clone();
        let us = |ns: u64| ns as f64 / 1000.0;
        VerifyReport {
            ops: self.op_counts.values().sum(),
            snapshots: self.snapshots,
            checks: st.checks.load(Ordering::Relaxed),
            missed_blocks: st.missed_blocks.load(Ordering::Relaxed),
            extra_bytes: st.extra_bytes.load(Ordering::Relaxed),
            writes: st.writes.load(Ordering::Relaxed),
            unmaps: st.unmaps.load(Ordering::Relaxed),
            expected_errors: expected.values().sum(),
            expected,
            violations: st.violations.load(Ordering::Relaxed),
            violation_messages: st.messages.lock().clone(),
            op_counts: self.op_counts.clone(),
            frozen_checks: st.frozen_checks.load(Ordering::Relaxed),
            data_checks: st.data_checks.load(Ordering::Relaxed),
            extends_across_pow2: self.extends_across_pow2,
            disk_size: self.cfg.disk_size,
            max_disk_size: self.max_disk_size,
            granularity: self.cfg.granularity.bytes(),
            threads: if self.inline { 0 } else { self.cfg.threads },
            seed: self.cfg.seed,
            seconds: elapsed.as_secs_f64(),
            stuns: self.stun.len(),
            stun_p50_us: us(self.stun.value_at_quantile(0.5)),
            stun_p99_us: us(self.stun.value_at_quantile(0.99)),
            stun_max_us: us(self.stun.max()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::compare;

    #[test]
    fn compare_finds_unreported_differences_and_counts_extra() {
        let g = 16;
        let old = vec![0u8; 64];
        let mut new = old.clone();
        new[3] = 1; // block 0
        new[40] = 2; // block 2
                     // Both reported; block 1 reported without a change.
        let c = compare(&old, &new, &[(0, 48)], g);
        assert_eq!((c.missed_blocks, c.extra_bytes, c.changed_blocks), (0, 16, 2));
        // Block 2 not reported.
        let c = compare(&old, &new, &[(0, 16)], g);
        assert_eq!((c.missed_blocks, c.missed_bytes), (1, 1));
        // A partial area that covers the changed byte is enough; one that does not is not.
        assert_eq!(compare(&old, &new, &[(0, 4), (40, 1)], g).missed_blocks, 0);
        assert_eq!(compare(&old, &new, &[(0, 3), (40, 1)], g).missed_blocks, 1);
    }

    #[test]
    fn compare_zero_extends_a_shorter_old_image() {
        let old = vec![5u8; 20];
        let mut new = vec![5u8; 40];
        new[25..].fill(0);
        // Bytes 20..25 are new non-zero data past the old end: must be reported.
        assert_eq!(compare(&old, &new, &[], 16).missed_blocks, 1);
        assert_eq!(compare(&old, &new, &[(16, 16)], 16).missed_blocks, 0);
        // The new zero range past the old end is not a change.
        new[20..25].fill(0);
        assert_eq!(compare(&old, &new, &[], 16), Default::default());
        // Past the new image's end nothing is compared.
        assert_eq!(compare(&new, &old, &[], 16).missed_blocks, 0);
    }
}
