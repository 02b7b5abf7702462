//! The worker: a real process that opens the VM (recovering what the previous one left)
//! and works on it until it is killed. Writer threads write and unmap in the chunks they
//! own, recording each write in the acknowledgement log; the lifecycle thread does random
//! operations and prints `start OP` / `done OP` before and after each, so the parent knows
//! what a kill interrupted.

use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use backup::{backup_vm, BackupOptions, Compression, Repository};
use parking_lot::{Mutex, RwLock};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sim::{Host, Vm};

use super::acks::{AckLog, Rec, CHUNK};
use super::{Plan, ACKS, DATASTORE, REPO, VM_NAME};
use crate::HarnessError;

/// A worker that was never killed gives up after this long (its parent is gone).
const LIFETIME: Duration = Duration::from_secs(60);
/// Largest write or unmap: a whole chunk (1 MiB, a guest's large I/O). Its copy
/// takes long enough (~0.1 ms) that kills land inside it, between its mark and
/// its end, not only between two writes.
const MAX_IO: u64 = CHUNK;
/// Longest pause of a writer between two writes, microseconds.
const PAUSE_US: u64 = 100;

/// A lifecycle operation of the worker; its name is what the markers and the parent's
/// histogram say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Op {
    Snapshot,
    RemoveNewest,
    RemoveMiddle,
    RemoveOldest,
    Revert,
    Extend,
    Settle,
    Backup,
    Consolidate,
    Cbt,
}

impl Op {
    pub(super) const ALL: [Op; 10] = [
        Op::Snapshot,
        Op::RemoveNewest,
        Op::RemoveMiddle,
        Op::RemoveOldest,
        Op::Revert,
        Op::Extend,
        Op::Settle,
        Op::Backup,
        Op::Consolidate,
        Op::Cbt,
    ];

    pub(super) fn name(self) -> &'static str {
        match self {
            Op::Snapshot => "snapshot",
            Op::RemoveNewest => "remove_newest",
            Op::RemoveMiddle => "remove_middle",
            Op::RemoveOldest => "remove_oldest",
            Op::Revert => "revert",
            Op::Extend => "extend",
            Op::Settle => "settle",
            Op::Backup => "backup",
            Op::Consolidate => "consolidate",
            Op::Cbt => "cbt",
        }
    }
}

fn check(reason: String) -> HarnessError {
    HarnessError::Check {
        path: VM_NAME.into(),
        reason,
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> HarnessError + '_ {
    move |source| HarnessError::Io {
        path: path.to_owned(),
        source,
    }
}

/// What the lifecycle thread and the writers share.
struct Shared<'a> {
    vm: &'a Vm,
    acks: &'a AckLog,
    /// The acknowledgement log's generation; a revert holds the write side (pausing the
    /// writers), a write the read side.
    gen: RwLock<u64>,
    stop: AtomicBool,
    failed: Mutex<Option<HarnessError>>,
    writers: u64,
}

impl Shared<'_> {
    fn fail(&self, e: HarnessError) {
        self.failed.lock().get_or_insert(e);
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Runs a worker on the run directory `dir` with `seed` until it is killed, printing its
/// markers to `out`. It returns only when something failed (an operation, or `out`: the
/// parent is gone), or after a minute.
pub fn worker(dir: &Path, seed: u64, out: &mut dyn Write) -> Result<(), HarnessError> {
    let plan = Plan::load(dir)?;
    let mut mark = |line: &str| writeln!(out, "{line}").and_then(|()| out.flush()).map_err(io(dir));
    mark("start open")?;
    let host = Host::open(&dir.join(DATASTORE))?;
    let vm = host.vm(VM_NAME)?;
    mark("done open")?;
    let repo = Repository::create_or_open(&dir.join(REPO))?;
    let acks_path = dir.join(ACKS);
    let acks = AckLog::create(&acks_path).map_err(io(&acks_path))?;
    let shared = Shared {
        vm: &vm,
        acks: &acks,
        gen: RwLock::new(0),
        stop: AtomicBool::new(false),
        failed: Mutex::new(None),
        writers: plan.writers,
    };
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    std::thread::scope(|s| {
        for k in 0..plan.writers {
            let wseed: u64 = rng.gen();
            let shared = &shared;
            s.spawn(move || {
                if let Err(e) = writer(shared, k, wseed) {
                    shared.fail(e);
                }
            });
        }
        let r = lifecycle(&shared, &plan, &repo, &mut rng, seed, &mut mark);
        shared.stop.store(true, Ordering::Relaxed);
        r
    })?;
    match shared.failed.into_inner() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Writer `k`: random writes and unmaps in its own chunks, each logged.
fn writer(sh: &Shared<'_>, k: u64, seed: u64) -> Result<(), HarnessError> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut buf = vec![0u8; MAX_IO as usize];
    let n = sh.writers;
    let mut seq = 0;
    while !sh.stop.load(Ordering::Relaxed) {
        let gen = sh.gen.read();
        let cap = sh.vm.capacity(0)?;
        let chunks = cap.div_ceil(CHUNK);
        if k >= chunks {
            drop(gen);
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        // Three writes in four go to the writer's first two chunks (a hot set, so that
        // an incremental backup has less to read than the whole disk).
        let mine = (chunks - k).div_ceil(n);
        let among = if rng.gen_ratio(3, 4) { mine.min(2) } else { mine };
        let c = k + n * rng.gen_range(0..among);
        let (start, end) = (c * CHUNK, ((c + 1) * CHUNK).min(cap));
        let span = end - start;
        let (offset, len) = if rng.gen_ratio(7, 8) {
            // Sector-aligned (the disk and its chunks are whole sectors), mostly small.
            let most = match rng.gen_range(0..16) {
                0..=1 => MAX_IO,
                2..=3 => 64 << 10,
                _ => 16 << 10,
            };
            let len = (512 * rng.gen_range(1..=most / 512)).min(span);
            (start + 512 * rng.gen_range(0..=(span - len) / 512), len)
        } else {
            let len = rng.gen_range(1..=8192u64).min(span);
            (start + rng.gen_range(0..=span - len), len)
        };
        seq += 1;
        let r = Rec {
            seq,
            offset,
            len,
            seed: rng.gen(),
            unmap: rng.gen_ratio(1, 16),
            gen: *gen,
        };
        let log = |e| HarnessError::Io {
            path: "acks".into(),
            source: e,
        };
        sh.acks.in_flight(k, &r).map_err(log)?;
        if r.unmap {
            sh.vm.unmap(0, offset, len)?;
        } else {
            let b = &mut buf[..len as usize];
            r.content(b);
            sh.vm.write(0, offset, b)?;
        }
        sh.acks.acknowledged(k, &r).map_err(log)?;
        drop(gen);
        // A guest that also thinks: the lifecycle thread and the parent get CPU time.
        std::thread::sleep(Duration::from_micros(rng.gen_range(0..=PAUSE_US)));
    }
    Ok(())
}

/// The lifecycle thread: random operations, each between its markers.
fn lifecycle(
    sh: &Shared<'_>,
    plan: &Plan,
    repo: &Repository,
    rng: &mut ChaCha8Rng,
    seed: u64,
    mark: &mut dyn FnMut(&str) -> Result<(), HarnessError>,
) -> Result<(), HarnessError> {
    let started = Instant::now();
    let vm = sh.vm;
    for i in 0u64.. {
        if sh.stop.load(Ordering::Relaxed) || started.elapsed() > LIFETIME {
            return Ok(());
        }
        if rng.gen_ratio(1, 2) {
            // Time between operations: kills land while only the writers work.
            std::thread::sleep(Duration::from_micros(rng.gen_range(0..2000)));
        }
        let snaps = vm.snapshots();
        let n = snaps.len();
        let cap = vm.capacity(0)?;
        // A revert keeps the capacity (see the module docs of `kill`).
        let revertible: Vec<&str> = snaps
            .iter()
            .filter(|s| s.disks[0].capacity == cap)
            .map(|s| s.name.as_str())
            .collect();
        let weight = |op: Op| match op {
            Op::Snapshot => (n < plan.max_snapshots) as u32 * 25,
            Op::RemoveNewest => (n >= 1) as u32 * 10,
            Op::RemoveMiddle => (n >= 3) as u32 * 5,
            Op::RemoveOldest => (n >= 2) as u32 * 6 + (n > plan.max_snapshots) as u32 * 100,
            Op::Revert => (!revertible.is_empty()) as u32 * 3,
            Op::Extend => (cap < plan.max_capacity) as u32 * 3,
            Op::Settle => 6,
            Op::Backup => 8,
            Op::Consolidate => 2,
            Op::Cbt => plan.cbt_toggles as u32,
        };
        let favored = |op: Op| plan.favor.as_deref().is_some_and(|f| op.name().starts_with(f));
        let weight = |op: Op| weight(op) * if favored(op) { 10 } else { 1 };
        let total: u32 = Op::ALL.iter().map(|&o| weight(o)).sum();
        let mut pick = rng.gen_range(0..total);
        let op = *Op::ALL
            .iter()
            .find(|&&o| {
                let w = weight(o);
                if pick < w {
                    return true;
                }
                pick -= w;
                false
            })
            .expect("pick < total");
        mark(&format!("start {}", op.name()))?;
        let fail = |e: &dyn std::fmt::Display| check(format!("{} failed: {e}", op.name()));
        match op {
            Op::Snapshot => {
                let name = format!("w{:08x}-{i}", seed as u32);
                vm.create_snapshot(&name).map_err(|e| fail(&e))?;
            }
            Op::RemoveNewest | Op::RemoveMiddle | Op::RemoveOldest => {
                let at = match op {
                    Op::RemoveNewest => n - 1,
                    Op::RemoveOldest => 0,
                    _ => rng.gen_range(1..n - 1),
                };
                vm.remove_snapshot(&snaps[at].name).map_err(|e| fail(&e))?;
            }
            Op::Revert => {
                let target = revertible[rng.gen_range(0..revertible.len())];
                let mut gen = sh.gen.write();
                let log = |e| HarnessError::Io {
                    path: "acks".into(),
                    source: e,
                };
                sh.acks.set_gen(*gen + 1).map_err(log)?;
                vm.revert_to_snapshot(target).map_err(|e| fail(&e))?;
                *gen += 2;
                sh.acks.set_gen(*gen).map_err(log)?;
            }
            Op::Extend => {
                // Small steps: the disk only grows (see `kill`'s docs), and there are many.
                let to = (cap + 512 * rng.gen_range(1..=128)).min(plan.max_capacity);
                vm.extend_disk(0, to).map_err(|e| fail(&e))?;
            }
            Op::Settle => {
                for d in 0..vm.disk_count() {
                    vm.tracker(d)?.settle();
                }
            }
            Op::Backup => {
                let opts = BackupOptions {
                    compression: if rng.gen() {
                        Compression::Zstd
                    } else {
                        Compression::None
                    },
                    ..BackupOptions::default()
                };
                backup_vm(vm, VM_NAME, repo, &opts, &()).map_err(|e| fail(&e))?;
            }
            Op::Consolidate => {
                vm.consolidate().map_err(|e| fail(&e))?;
            }
            Op::Cbt => {
                vm.set_cbt(false).map_err(|e| fail(&e))?;
                vm.set_cbt(true).map_err(|e| fail(&e))?;
            }
        }
        mark(&format!("done {}", op.name()))?;
    }
    Ok(())
}
