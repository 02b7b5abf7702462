//! Driving a VM with guest workloads, and checking its change tracking as it runs.
//!
//! [`drive`] runs named workload profiles ([`workloads::profile`]) on the disks of a
//! [`Vm`], each on several vCPU threads, and applies every [`IoOp`](workloads::IoOp) to the VM: writes carry
//! [`workloads::fill_pattern`] content, unmaps, reads, flushes and extends go to the
//! matching [`Vm`] calls. Write latency goes into an HDR histogram.
//!
//! With [`DrivePlan::verify`] each thread also feeds a [`ShadowDisk`], the drive takes a
//! snapshot before the first op (the *first change ID*) and then one every
//! [`DrivePlan::snapshot_every`] ops of the VM and at the end; a verifier thread queries
//! each snapshot's changed areas since the previous change ID through the paging API,
//! compares them with what the shadows say changed ([`workloads::check_report`]), and
//! removes the snapshot (consolidating its delta while the guest keeps writing). At the
//! end it also queries everything since the first change ID. With a [`BackupHook`] and
//! [`DrivePlan::backup_every`] ([`drive_with_backups`]) the verifier also runs a backup
//! on that schedule, while the guest writes (the scenarios run the `vadp` backup client).
//!
//! ```text
//!  vCPU threads ──IoOp──▶ Vm (write/unmap/read/flush/extend) + own ShadowDisk
//!        │ every N ops: all threads meet at a barrier, close their shadow epoch
//!        ▼
//!  leader: create_snapshot ──job──▶ verifier: query since previous change ID,
//!                                   check against the shadows, remove_snapshot
//! ```
//!
//! # Design
//! Epochs are cut at a quiescent point: the vCPU threads of the VM stop at a barrier, each
//! closes its own shadow's epoch, the last to arrive takes the snapshot, and all resume.
//! So every op lies on a known side of every snapshot, and the shadow's truth is exact:
//! [`Check::missed_blocks`] must be 0, and [`Check::over_report_ratio`] is the tracker's
//! true over-report (reported bytes over bytes written or unmapped). Threads take their
//! ops from a shared counter, so an epoch is exactly `snapshot_every` ops however the
//! threads are scheduled. Each thread has its own shadow (no lock on the I/O path); the
//! truth of a disk is the union of its threads' changes.
//!
//! # Limitations
//! Because epochs are cut at a barrier, a snapshot never meets a write in flight here
//! (the concurrency tests of the `sim` crate cover that case). Several threads writing
//! the same bytes make their content a race, so only the *set* of changed bytes is
//! checked, not the data. A guest flush is [`Vm::flush`] (an `msync` of the disks'
//! mapped files) unless [`DrivePlan::apply_flush`] is off.
//!
//! # Layout
//! `plan` holds what to run ([`DrivePlan`]) and its validation, `report` what a drive
//! found ([`DriveReport`]), `barrier` the epoch barrier where the vCPU threads meet and the leader takes a
//! snapshot, `vcpu` a vCPU thread's loop, and `verifier` the thread that checks each
//! snapshot against the shadows.

mod barrier;
mod plan;
mod report;
mod vcpu;
mod verifier;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::sync_channel;
use std::sync::Barrier;
use std::time::Instant;

use backup::{BackupError, BackupReport, Progress};
use parking_lot::Mutex;
use vadp::VadpError;
use workloads::{ShadowDisk, ShadowError, WorkloadError};

use barrier::{change_ids, Job, Lead, Shared};
use plan::validate;
pub use plan::{DiskLoad, DrivePlan, Limit};
pub use report::{new_histogram, stun_histogram, Check, DiskReport, DriveReport, EpochReport, Latency, OpCounts};
use sim::{SimError, Vm};
use vcpu::vcpu;
use verifier::verify_loop;

/// Why a drive could not run to its end.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DriveError {
    /// The plan is inconsistent.
    #[error("invalid drive plan: {0}")]
    BadPlan(String),
    /// A profile could not be made for a disk.
    #[error("VM {vm:?} disk {disk}: cannot run profile {profile:?}")]
    Workload {
        /// The VM.
        vm: String,
        /// The disk.
        disk: usize,
        /// The profile.
        profile: String,
        /// The cause.
        #[source]
        source: WorkloadError,
    },
    /// Verifying needs change tracking.
    #[error("VM {0:?} has change tracking off: turn it on to verify a drive")]
    TrackingOff(String),
    /// An operation of the simulated host failed.
    #[error(transparent)]
    Sim(#[from] SimError),
    /// A changed-area query failed.
    #[error(transparent)]
    Vadp(#[from] VadpError),
    /// A workload made an op its shadow refused (a workload bug).
    #[error("shadow model refused an op")]
    Shadow(#[from] ShadowError),
    /// A thread of the drive panicked.
    #[error("a thread of the drive of VM {0:?} panicked")]
    Panicked(String),
    /// A scheduled backup failed.
    #[error("scheduled backup failed")]
    Backup(#[from] BackupError),
}

/// Runs a backup of the driven VM (the scenario runs the `vadp` backup client).
pub trait BackupHook: Sync {
    /// Backs the VM up; called on the verifier thread while the guest writes.
    fn backup(&self) -> Result<BackupReport, BackupError>;
}

/// Runs `plan` on `vm` (see the module docs) and reports what it did and found.
///
/// The VM must be powered on; with `verify`, change tracking must be on and the drive's
/// snapshot names free. Guest I/O errors stop the drive and are returned. `progress` gets
/// one phase, labelled with the VM's name, in ops (the total is known with
/// [`Limit::Ops`]), with a note after each checked epoch.
pub fn drive(vm: &Vm, plan: &DrivePlan, progress: &dyn Progress) -> Result<DriveReport, DriveError> {
    drive_with_backups(vm, plan, progress, None)
}

/// [`drive`], with `backups` run on the schedule of [`DrivePlan::backup_every`].
pub fn drive_with_backups(
    vm: &Vm,
    plan: &DrivePlan,
    progress: &dyn Progress,
    backups: Option<&dyn BackupHook>,
) -> Result<DriveReport, DriveError> {
    let total = match plan.limit {
        Limit::Ops(n) => Some(n),
        Limit::Time(_) => None,
    };
    progress.begin(vm.name(), total);
    let r = run_drive(vm, plan, progress, backups);
    progress.end();
    r
}

fn run_drive(
    vm: &Vm,
    plan: &DrivePlan,
    progress: &dyn Progress,
    backups: Option<&dyn BackupHook>,
) -> Result<DriveReport, DriveError> {
    let specs = validate(vm, plan, backups.is_some())?;
    let mut workloads = Vec::new();
    let mut shadows = Vec::new();
    for s in &specs {
        let load = &plan.loads[s.load];
        let cap = vm.capacity(s.disk)?;
        let seed = plan.seed ^ (s.disk as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let w = workloads::profile(&load.profile, cap, seed, s.thread).map_err(|source| DriveError::Workload {
            vm: vm.name().to_owned(),
            disk: s.disk,
            profile: load.profile.clone(),
            source,
        })?;
        workloads.push(w);
        shadows.push(plan.verify.then(|| ShadowDisk::new(cap)));
    }
    let first_ids = if plan.verify {
        let name = format!("{}-0", plan.snapshot_prefix);
        let info = vm.create_snapshot(&name)?;
        let ids = change_ids(vm, &plan.loads, &info);
        vm.remove_snapshot(&name)?;
        ids?
    } else {
        Vec::new()
    };
    let started = Instant::now();
    let shared = Shared {
        vm,
        plan,
        barrier: Barrier::new(specs.len()),
        deadline: match plan.limit {
            Limit::Time(d) => Some(started + d),
            Limit::Ops(_) => None,
        },
        claimed: AtomicU64::new(0),
        epoch_limit: AtomicU64::new(match plan.limit {
            Limit::Ops(n) => n.min(plan.snapshot_every.unwrap_or(u64::MAX)),
            Limit::Time(_) => plan.snapshot_every.unwrap_or(u64::MAX),
        }),
        epoch_done: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        done: AtomicBool::new(false),
        lead: Mutex::new(Lead {
            epoch: 0,
            total_done: 0,
            backups: 0,
        }),
        epoch_truth: Mutex::new(vec![Vec::new(); plan.loads.len()]),
        error: Mutex::new(None),
        jobs: Mutex::new(None),
    };
    let (tx, rx) = sync_channel::<Job>(2);
    *shared.jobs.lock() = Some(tx);
    let granularities = plan
        .loads
        .iter()
        .map(|l| Ok(vm.granularity(l.disk)?.bytes()))
        .collect::<Result<Vec<u64>, SimError>>()?;

    let (results, verdicts) = std::thread::scope(|scope| {
        let verifier = scope.spawn(|| {
            verify_loop(vm, &plan.loads, &granularities, &first_ids, rx, progress, backups).inspect_err(|_| {
                shared.stop.store(true, Ordering::Relaxed);
            })
        });
        let handles: Vec<_> = specs
            .iter()
            .zip(workloads)
            .zip(shadows)
            .map(|((spec, w), shadow)| {
                let shared = &shared;
                scope.spawn(move || vcpu(shared, spec, w, shadow, progress))
            })
            .collect();
        let mut results = Vec::new();
        let mut panicked = false;
        for h in handles {
            match h.join() {
                Ok(r) => results.push(r),
                Err(_) => panicked = true,
            }
        }
        shared.jobs.lock().take();
        let verdicts = verifier.join();
        if panicked {
            shared.fail(DriveError::Panicked(vm.name().to_owned()));
        }
        (results, verdicts)
    });
    let elapsed = started.elapsed().as_secs_f64();
    let epochs_checked = match verdicts {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => return Err(e),
        Err(_) => return Err(DriveError::Panicked(vm.name().to_owned())),
    };
    if let Some(e) = shared.error.into_inner() {
        return Err(e);
    }
    let lead = shared.lead.into_inner();

    let mut counts = OpCounts::default();
    let mut write_histogram = new_histogram();
    let mut disks: Vec<DiskReport> = plan
        .loads
        .iter()
        .zip(&granularities)
        .map(|(l, &g)| {
            Ok(DiskReport {
                disk: l.disk,
                profile: l.profile.clone(),
                threads: l.threads,
                capacity: vm.capacity(l.disk)?,
                granularity: g,
                counts: OpCounts::default(),
                epochs: Vec::new(),
                cumulative: None,
            })
        })
        .collect::<Result<_, SimError>>()?;
    for r in &results {
        counts.add(&r.counts);
        disks[r.load].counts.add(&r.counts);
        write_histogram
            .add(&r.writes)
            .expect("histograms of the same bounds merge");
    }
    let (per_epoch, cumulative, backup_reports) = epochs_checked;
    for (load, e) in per_epoch {
        disks[load].epochs.push(e);
    }
    for (load, c) in cumulative {
        disks[load].cumulative = Some(c);
    }
    let missed_blocks = disks
        .iter()
        .map(|d| {
            d.epochs.iter().map(|e| e.check.missed_blocks).sum::<u64>() + d.cumulative.map_or(0, |c| c.missed_blocks)
        })
        .sum();
    Ok(DriveReport {
        vm: vm.name().to_owned(),
        seed: plan.seed,
        elapsed_s: elapsed,
        ops_per_s: counts.ops as f64 / elapsed.max(1e-9),
        counts,
        write_latency: Latency::of(&write_histogram),
        snapshots: if plan.verify { lead.epoch + 1 } else { 0 },
        stun: Latency::of(&stun_histogram(vm)),
        disks,
        missed_blocks,
        backups: backup_reports,
        write_histogram,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use sim::{DiskSpec, Host};
    use std::time::Duration;
    use tracker::Granularity;

    fn vm(cap: u64, g: u64) -> (tempfile::TempDir, std::sync::Arc<Vm>) {
        let dir = tempfile::tempdir().unwrap();
        let host = Host::open(dir.path()).unwrap();
        let vm = host
            .create_vm(
                "v",
                &[DiskSpec {
                    capacity: cap,
                    granularity: Granularity::new(g).unwrap(),
                }],
            )
            .unwrap();
        (dir, vm)
    }

    #[test]
    fn epochs_are_exactly_the_scheduled_ops_and_nothing_is_missed() {
        let (_d, vm) = vm(64 << 20, 4096);
        let mut plan = DrivePlan::new("oltp-db", 3, Limit::Ops(10_000));
        plan.snapshot_every = Some(3_000);
        plan.seed = 7;
        let r = drive(&vm, &plan, &()).unwrap();
        assert_eq!(r.counts.ops, 10_000);
        let ops: Vec<u64> = r.disks[0].epochs.iter().map(|e| e.ops).collect();
        assert_eq!(ops, vec![3_000, 3_000, 3_000, 1_000]);
        assert_eq!(r.missed_blocks, 0);
        let cum = r.disks[0].cumulative.unwrap();
        assert!(cum.true_changed_bytes > 0 && cum.over_report_ratio >= 1.0);
        assert!(r.write_latency.count > 0 && r.write_latency.count == r.counts.writes);
        assert_eq!(r.snapshots, 5);
        // Every drive snapshot was removed.
        assert!(vm.snapshots().is_empty());
    }

    #[test]
    fn the_same_seed_gives_the_same_changes() {
        let run = || {
            let (_d, vm) = vm(32 << 20, 65536);
            let mut plan = DrivePlan::new("edge-cases", 1, Limit::Ops(6_000));
            plan.seed = 3;
            let r = drive(&vm, &plan, &()).unwrap();
            assert_eq!(r.missed_blocks, 0);
            assert_eq!(r.counts.extends, 1, "edge-cases extends the disk once");
            (r.disks[0].cumulative.unwrap().changed_bytes, r.disks[0].capacity)
        };
        assert_eq!(run(), run());
    }

    #[test]
    fn a_timed_drive_without_verification_takes_no_snapshot() {
        let (_d, vm) = vm(16 << 20, 65536);
        let mut plan = DrivePlan::new("file-server", 2, Limit::Time(Duration::from_millis(200)));
        plan.verify = false;
        let r = drive(&vm, &plan, &()).unwrap();
        assert!(r.counts.ops > 0);
        assert_eq!(r.snapshots, 0);
        assert!(r.disks[0].epochs.is_empty());
    }

    #[test]
    fn bad_plans_are_refused() {
        let (_d, vm) = vm(16 << 20, 65536);
        let mut plan = DrivePlan::new("vdi", 0, Limit::Ops(1));
        assert!(matches!(drive(&vm, &plan, &()), Err(DriveError::BadPlan(_))));
        plan.loads[0].threads = 1;
        plan.loads[0].profile = "nope".into();
        let e = drive(&vm, &plan, &()).unwrap_err();
        assert!(matches!(e, DriveError::Workload { .. }), "{e}");
        plan.loads[0].profile = "vdi".into();
        plan.loads[0].disk = 3;
        assert!(matches!(
            drive(&vm, &plan, &()),
            Err(DriveError::Sim(SimError::NoSuchDisk { .. }))
        ));
    }
}
