//! Driving a VM with guest workloads, and checking its change tracking as it runs.
//!
//! [`drive`] runs named workload profiles ([`workloads::profile`]) on the disks of a
//! [`Vm`], each on several vCPU threads, and applies every [`IoOp`] to the VM: writes carry
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

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use backup::{BackupError, BackupReport, Progress};
use hdrhistogram::Histogram;
use parking_lot::Mutex;
use serde::Serialize;
use vadp::VadpError;
use workloads::{check_report, human, IoOp, ShadowDisk, ShadowError, Workload, WorkloadError};

use crate::apply::{apply_op, changed_areas, coalesce};
use sim::{SimError, Vm};

/// How long a drive runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// This many ops of the VM in all (all disks and threads together).
    Ops(u64),
    /// This long.
    Time(Duration),
}

/// One disk's workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskLoad {
    /// The disk of the VM.
    pub disk: usize,
    /// A profile name of [`workloads::profiles`].
    pub profile: String,
    /// vCPU threads issuing the profile's ops on this disk.
    pub threads: u32,
}

/// What to run on a VM, and how to check it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrivePlan {
    /// The disks' workloads (at least one).
    pub loads: Vec<DiskLoad>,
    /// Seed of the workloads (the same seed gives the same op streams).
    pub seed: u64,
    /// When to stop.
    pub limit: Limit,
    /// Keep shadow models and check the tracker's answers with snapshots.
    pub verify: bool,
    /// With `verify`: ops of the VM between two snapshots (`None`: only at the end).
    pub snapshot_every: Option<u64>,
    /// Apply guest flushes as [`Vm::flush`] (otherwise they are only counted).
    pub apply_flush: bool,
    /// Prefix of the snapshots the drive takes (`PREFIX-0`, `PREFIX-1`, ...).
    pub snapshot_prefix: String,
    /// With `verify` and a [`BackupHook`]: ops of the VM between backups. A backup runs
    /// after the check of the first epoch that ends past each multiple, while the guest
    /// keeps writing.
    pub backup_every: Option<u64>,
}

impl DrivePlan {
    /// A plan for one profile on disk 0, verified, with a snapshot only at the end.
    pub fn new(profile: &str, threads: u32, limit: Limit) -> Self {
        DrivePlan {
            loads: vec![DiskLoad {
                disk: 0,
                profile: profile.to_owned(),
                threads,
            }],
            seed: 0,
            limit,
            verify: true,
            snapshot_every: None,
            apply_flush: true,
            snapshot_prefix: "cbtsim-drive".to_owned(),
            backup_every: None,
        }
    }

    fn thread_count(&self) -> usize {
        self.loads.iter().map(|l| l.threads as usize).sum()
    }
}

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

/// Latency percentiles, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct Latency {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// Largest.
    pub max_us: f64,
}

impl Latency {
    /// The percentiles of a histogram of nanoseconds.
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Latency::default();
        }
        let us = |ns: u64| ns as f64 / 1000.0;
        Latency {
            count: h.len(),
            p50_us: us(h.value_at_quantile(0.5)),
            p99_us: us(h.value_at_quantile(0.99)),
            p999_us: us(h.value_at_quantile(0.999)),
            max_us: us(h.max()),
        }
    }
}

/// A new histogram of nanoseconds (1 ns to 1 hour, 3 significant figures).
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000_000, 3).expect("valid histogram bounds")
}

/// Counts of the ops a drive applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct OpCounts {
    /// All ops.
    pub ops: u64,
    /// Reads.
    pub reads: u64,
    /// Writes.
    pub writes: u64,
    /// Unmaps.
    pub unmaps: u64,
    /// Flushes.
    pub flushes: u64,
    /// Disk extends.
    pub extends: u64,
    /// Bytes read.
    pub bytes_read: u64,
    /// Bytes written.
    pub bytes_written: u64,
    /// Bytes unmapped.
    pub bytes_unmapped: u64,
}

impl OpCounts {
    /// Adds another count into this one.
    pub fn add(&mut self, o: &OpCounts) {
        self.ops += o.ops;
        self.reads += o.reads;
        self.writes += o.writes;
        self.unmaps += o.unmaps;
        self.flushes += o.flushes;
        self.extends += o.extends;
        self.bytes_read += o.bytes_read;
        self.bytes_written += o.bytes_written;
        self.bytes_unmapped += o.bytes_unmapped;
    }
}

/// A tracker's answer for one disk over some span, against the shadow's truth.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Check {
    /// Bytes in the reported changed areas.
    pub changed_bytes: u64,
    /// Number of reported areas (coalesced).
    pub changed_areas: u64,
    /// `changed_bytes` over the disk's capacity at the snapshot.
    pub share_of_disk: f64,
    /// Bytes truly changed (written or unmapped), from the shadow models.
    pub true_changed_bytes: u64,
    /// `changed_bytes / true_changed_bytes` (1.0 when both are 0).
    pub over_report_ratio: f64,
    /// Blocks of the granularity holding a changed byte that no area covers. Must be 0.
    pub missed_blocks: u64,
    /// Time the paged query took, in microseconds.
    pub query_us: u64,
}

impl Check {
    /// Compares `reported` areas with the exact changed bytes `truth`.
    pub fn new(truth: &[(u64, u64)], reported: &[(u64, u64)], granularity: u64, capacity: u64) -> Self {
        let v = check_report(truth, reported, granularity);
        let changed_bytes: u64 = reported.iter().map(|a| a.1).sum();
        Check {
            changed_bytes,
            changed_areas: reported.len() as u64,
            share_of_disk: changed_bytes as f64 / capacity.max(1) as f64,
            true_changed_bytes: truth.iter().map(|a| a.1).sum(),
            over_report_ratio: v.over_report_ratio,
            missed_blocks: v.missed_blocks,
            query_us: 0,
        }
    }
}

/// One epoch (the span between two snapshots) of one disk.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct EpochReport {
    /// 1 for the span from the first change ID to the first scheduled snapshot.
    pub epoch: u64,
    /// Ops of the VM in the epoch.
    pub ops: u64,
    /// The check of the epoch's changed areas.
    #[serde(flatten)]
    pub check: Check,
}

/// What a drive did on one disk.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DiskReport {
    /// The disk.
    pub disk: usize,
    /// Its profile.
    pub profile: String,
    /// Its vCPU threads.
    pub threads: u32,
    /// Its capacity at the end.
    pub capacity: u64,
    /// Its tracking granularity.
    pub granularity: u64,
    /// Ops on this disk.
    pub counts: OpCounts,
    /// Per epoch (with `verify`).
    pub epochs: Vec<EpochReport>,
    /// Everything since the first change ID, queried at the last snapshot (with `verify`).
    pub cumulative: Option<Check>,
}

/// What a drive did.
#[derive(Debug, Clone, Serialize)]
pub struct DriveReport {
    /// The VM.
    pub vm: String,
    /// The workloads' seed.
    pub seed: u64,
    /// Wall time of the run, in seconds.
    pub elapsed_s: f64,
    /// Ops per second.
    pub ops_per_s: f64,
    /// All ops of the VM.
    pub counts: OpCounts,
    /// Latency of guest writes.
    pub write_latency: Latency,
    /// Snapshots taken (and removed) by the drive.
    pub snapshots: u64,
    /// Stun times of the VM (snapshot create/remove, extend) during the drive's life.
    pub stun: Latency,
    /// Per driven disk.
    pub disks: Vec<DiskReport>,
    /// Missed blocks over every check (must be 0).
    pub missed_blocks: u64,
    /// The scheduled backups, in order.
    pub backups: Vec<BackupReport>,
    /// The write latency histogram (ns), to merge reports.
    #[serde(skip)]
    pub write_histogram: Histogram<u64>,
}

/// One vCPU thread's part of the plan.
struct ThreadSpec {
    /// Index into `plan.loads`.
    load: usize,
    disk: usize,
    /// Thread number within its disk's load (0 is the one that may extend).
    thread: u32,
}

/// A snapshot for the verifier to check.
struct Job {
    epoch: u64,
    snapshot: String,
    /// Per load: the snapshot's change ID of its disk.
    change_ids: Vec<String>,
    /// Per load: the bytes truly changed in the epoch.
    truth: Vec<Vec<(u64, u64)>>,
    ops: u64,
    last: bool,
    /// Run a backup after the check.
    backup: bool,
}

/// State shared by the vCPU threads of one drive.
struct Shared<'a> {
    vm: &'a Vm,
    plan: &'a DrivePlan,
    barrier: Barrier,
    deadline: Option<Instant>,
    /// Ops claimed in this epoch (may overshoot `epoch_limit` by one per thread).
    claimed: AtomicU64,
    /// Ops allowed in this epoch.
    epoch_limit: AtomicU64,
    /// Ops done in this epoch (added by each thread before the barrier).
    epoch_done: AtomicU64,
    /// Set on error: threads stop at once.
    stop: AtomicBool,
    /// Set by the leader between the two barriers: the drive is over.
    done: AtomicBool,
    /// Leader-only state (behind a lock only to share it).
    lead: Mutex<Lead>,
    /// Per load: the changes the threads closed this epoch.
    epoch_truth: Mutex<Vec<Vec<(u64, u64)>>>,
    error: Mutex<Option<DriveError>>,
    jobs: Mutex<Option<SyncSender<Job>>>,
}

struct Lead {
    epoch: u64,
    total_done: u64,
    /// Backups scheduled so far.
    backups: u64,
}

impl Shared<'_> {
    fn fail(&self, e: DriveError) {
        self.error.lock().get_or_insert(e);
        // Relaxed: threads only need to see it eventually; the barrier orders the rest.
        self.stop.store(true, Ordering::Relaxed);
    }

    fn time_up(&self) -> bool {
        self.deadline.is_some_and(|d| Instant::now() >= d)
    }

    fn failed(&self) -> bool {
        self.error.lock().is_some()
    }

    fn snapshot_name(&self, epoch: u64) -> String {
        format!("{}-{epoch}", self.plan.snapshot_prefix)
    }

    /// Run by the last thread to reach the epoch barrier, while all others wait.
    fn lead_epoch(&self) {
        let mut lead = self.lead.lock();
        // The barrier orders these loads after every thread's stores.
        let ops = self.epoch_done.swap(0, Ordering::Relaxed);
        lead.total_done += ops;
        let time_up = self.time_up();
        let remaining = match self.plan.limit {
            Limit::Ops(n) => n.saturating_sub(lead.total_done),
            Limit::Time(_) => u64::MAX,
        };
        let done = self.failed() || time_up || remaining == 0;
        if self.plan.verify && !self.failed() {
            lead.epoch += 1;
            let fresh = vec![Vec::new(); self.plan.loads.len()];
            let truth = std::mem::replace(&mut *self.epoch_truth.lock(), fresh);
            let due = self.plan.backup_every.map_or(0, |b| lead.total_done / b);
            let backup = due > lead.backups;
            lead.backups = due;
            let truth = truth.into_iter().map(coalesce).collect();
            if let Err(e) = self.send_job(lead.epoch, ops, truth, done, backup) {
                self.fail(e);
            }
        }
        let next = self.plan.snapshot_every.unwrap_or(u64::MAX).min(remaining);
        self.epoch_limit.store(next, Ordering::Relaxed);
        self.claimed.store(0, Ordering::Relaxed);
        self.done.store(done || self.failed(), Ordering::Relaxed);
    }

    fn send_job(
        &self,
        epoch: u64,
        ops: u64,
        truth: Vec<Vec<(u64, u64)>>,
        last: bool,
        backup: bool,
    ) -> Result<(), DriveError> {
        let snapshot = self.snapshot_name(epoch);
        let info = self.vm.create_snapshot(&snapshot)?;
        let change_ids = change_ids(self.vm, &self.plan.loads, &info)?;
        let job = Job {
            epoch,
            snapshot,
            change_ids,
            truth,
            ops,
            last,
            backup,
        };
        let tx = self.jobs.lock();
        match tx.as_ref().map(|tx| tx.send(job)) {
            Some(Ok(())) => Ok(()),
            // The verifier stopped: it recorded why.
            _ => Err(DriveError::Panicked(self.vm.name().to_owned())),
        }
    }
}

fn change_ids(vm: &Vm, loads: &[DiskLoad], info: &vadp::SnapshotInfo) -> Result<Vec<String>, DriveError> {
    loads
        .iter()
        .map(|l| {
            info.disks
                .get(l.disk)
                .and_then(|d| d.change_id.clone())
                .ok_or_else(|| DriveError::TrackingOff(vm.name().to_owned()))
        })
        .collect()
}

/// What one vCPU thread did.
struct ThreadResult {
    load: usize,
    counts: OpCounts,
    writes: Histogram<u64>,
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

/// The VM's recent stun times as a histogram (ns).
pub fn stun_histogram(vm: &Vm) -> Histogram<u64> {
    let mut h = Histogram::new(3).expect("3 significant figures is valid");
    for ns in vm.stun_times_ns() {
        let _ = h.record(ns);
    }
    h
}

fn validate(vm: &Vm, plan: &DrivePlan, has_backup_hook: bool) -> Result<Vec<ThreadSpec>, DriveError> {
    let bad = |m: String| Err(DriveError::BadPlan(m));
    if plan.loads.is_empty() {
        return bad("no disk to drive".into());
    }
    if plan.snapshot_every == Some(0) {
        return bad("snapshot_every must be at least 1 op".into());
    }
    if plan.snapshot_every.is_some() && !plan.verify {
        return bad("scheduled snapshots need verification on".into());
    }
    match plan.backup_every {
        Some(0) => return bad("backup_every must be at least 1 op".into()),
        Some(_) if !plan.verify || !has_backup_hook => {
            return bad("scheduled backups need verification on and a backup client".into())
        }
        _ => {}
    }
    if plan.thread_count() > 1024 {
        return bad(format!("{} threads is too many (at most 1024)", plan.thread_count()));
    }
    let mut seen = Vec::new();
    let mut specs = Vec::new();
    for (i, l) in plan.loads.iter().enumerate() {
        vm.capacity(l.disk)?;
        if seen.contains(&l.disk) {
            return bad(format!("disk {} is driven twice", l.disk));
        }
        seen.push(l.disk);
        if l.threads == 0 {
            return bad(format!("disk {} has 0 threads", l.disk));
        }
        for t in 0..l.threads {
            specs.push(ThreadSpec {
                load: i,
                disk: l.disk,
                thread: t,
            });
        }
    }
    if plan.verify && !vm.cbt() {
        return Err(DriveError::TrackingOff(vm.name().to_owned()));
    }
    Ok(specs)
}

/// How often a thread reports its ops to [`Progress`].
const PROGRESS_BATCH: u64 = 256;

/// One vCPU thread: ops until the epoch's budget is spent, then the barrier.
fn vcpu(
    shared: &Shared<'_>,
    spec: &ThreadSpec,
    mut w: Box<dyn Workload + Send>,
    mut shadow: Option<ShadowDisk>,
    progress: &dyn Progress,
) -> ThreadResult {
    let mut counts = OpCounts::default();
    let mut writes = new_histogram();
    let mut buf: Vec<u8> = Vec::new();
    let mut mark = shadow.as_mut().map(|s| s.checkpoint());
    let mut unreported = 0;
    loop {
        let mut ops = 0;
        // Relaxed: `stop` is a hint to stop early; the barrier below orders everything
        // the leader reads.
        while !shared.stop.load(Ordering::Relaxed) && !shared.time_up() {
            // Relaxed: a ticket counter; only its value matters, reset under the barrier.
            if shared.claimed.fetch_add(1, Ordering::Relaxed) >= shared.epoch_limit.load(Ordering::Relaxed) {
                break;
            }
            let op = w.next_op();
            let applied = apply(shared, spec, &op, &mut buf, &mut counts, &mut writes).and_then(|()| {
                shadow
                    .as_mut()
                    .map_or(Ok(()), |s| s.apply(&op).map_err(DriveError::from))
            });
            if let Err(e) = applied {
                shared.fail(e);
                break;
            }
            ops += 1;
            unreported += 1;
            if unreported == PROGRESS_BATCH {
                progress.advance(unreported);
                unreported = 0;
            }
        }
        shared.epoch_done.fetch_add(ops, Ordering::Relaxed);
        if let (Some(s), Some(from)) = (shadow.as_mut(), mark) {
            let to = s.checkpoint();
            match s.changed_bytes_exact(from, to) {
                Ok(changed) => shared.epoch_truth.lock()[spec.load].extend(changed),
                Err(e) => shared.fail(e.into()),
            }
            mark = Some(to);
        }
        if shared.barrier.wait().is_leader() {
            shared.lead_epoch();
        }
        shared.barrier.wait();
        if shared.done.load(Ordering::Relaxed) {
            break;
        }
    }
    progress.advance(unreported);
    ThreadResult {
        load: spec.load,
        counts,
        writes,
    }
}

/// Applies one op to the VM ([`apply_op`]), counting it; a write's time goes into `writes`.
fn apply(
    shared: &Shared<'_>,
    spec: &ThreadSpec,
    op: &IoOp,
    buf: &mut Vec<u8>,
    c: &mut OpCounts,
    writes: &mut Histogram<u64>,
) -> Result<(), DriveError> {
    c.ops += 1;
    let took = match op {
        IoOp::Flush if !shared.plan.apply_flush => Duration::ZERO,
        _ => apply_op(shared.vm, spec.disk, op, buf)?,
    };
    match *op {
        IoOp::Write { len, .. } => {
            let ns = took.as_nanos().min(u128::from(u64::MAX)) as u64;
            writes.saturating_record(ns.max(1));
            c.writes += 1;
            c.bytes_written += len;
        }
        IoOp::Read { len, .. } => {
            c.reads += 1;
            c.bytes_read += len;
        }
        IoOp::Unmap { len, .. } => {
            c.unmaps += 1;
            c.bytes_unmapped += len;
        }
        IoOp::Flush => c.flushes += 1,
        IoOp::Extend { .. } => c.extends += 1,
    }
    Ok(())
}

type Checked = (Vec<(usize, EpochReport)>, Vec<(usize, Check)>, Vec<BackupReport>);

/// The verifier: checks each snapshot the leader sends, then removes it.
fn verify_loop(
    vm: &Vm,
    loads: &[DiskLoad],
    granularities: &[u64],
    first_ids: &[String],
    rx: Receiver<Job>,
    progress: &dyn Progress,
    backups: Option<&dyn BackupHook>,
) -> Result<Checked, DriveError> {
    let mut done_backups = Vec::new();
    let mut prev: Vec<String> = first_ids.to_vec();
    let mut union: Vec<BTreeMap<u64, u64>> = vec![BTreeMap::new(); loads.len()];
    let mut epochs = Vec::new();
    let mut cumulative = Vec::new();
    for job in rx {
        for (i, load) in loads.iter().enumerate() {
            let cap = vm.snapshot_capacity(&job.snapshot, load.disk)?;
            let t = Instant::now();
            let reported = changed_areas(vm, &job.snapshot, load.disk, &prev[i])?.areas;
            let query_us = t.elapsed().as_micros() as u64;
            let mut check = Check::new(&job.truth[i], &reported, granularities[i], cap);
            check.query_us = query_us;
            let e = EpochReport {
                epoch: job.epoch,
                ops: job.ops,
                check,
            };
            progress.note(&format!(
                "epoch {}: {} changed, missed {}",
                e.epoch,
                human(e.check.changed_bytes),
                e.check.missed_blocks
            ));
            epochs.push((i, e));
            for &(s, l) in &job.truth[i] {
                range_insert(&mut union[i], s, s + l);
            }
            prev[i] = job.change_ids[i].clone();
            if job.last {
                let t = Instant::now();
                let reported = changed_areas(vm, &job.snapshot, load.disk, &first_ids[i])?.areas;
                let query_us = t.elapsed().as_micros() as u64;
                let truth: Vec<(u64, u64)> = union[i].iter().map(|(&s, &e)| (s, e - s)).collect();
                let mut c = Check::new(&truth, &reported, granularities[i], cap);
                c.query_us = query_us;
                cumulative.push((i, c));
            }
        }
        vm.remove_snapshot(&job.snapshot)?;
        if let (true, Some(b)) = (job.backup, backups) {
            done_backups.push(b.backup()?);
        }
    }
    Ok((epochs, cumulative, done_backups))
}

/// Adds `[s, e)` to a coalesced set of ranges `start -> end`.
fn range_insert(set: &mut BTreeMap<u64, u64>, mut s: u64, mut e: u64) {
    if let Some((&ls, &le)) = set.range(..=s).next_back() {
        if le >= s {
            s = ls;
            e = e.max(le);
        }
    }
    let inside: Vec<(u64, u64)> = set.range(s..=e).map(|(&a, &b)| (a, b)).collect();
    for (a, b) in inside {
        set.remove(&a);
        e = e.max(b);
    }
    set.insert(s, e);
}

#[cfg(test)]
mod tests {
    use super::*;
    use sim::{DiskSpec, Host};
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
    fn coalesce_merges_touching_and_overlapping_areas() {
        assert_eq!(
            coalesce(vec![(10, 5), (0, 10), (20, 1), (14, 2)]),
            vec![(0, 16), (20, 1)]
        );
        let mut set = BTreeMap::new();
        range_insert(&mut set, 10, 20);
        range_insert(&mut set, 0, 5);
        range_insert(&mut set, 5, 10);
        assert_eq!(set.into_iter().collect::<Vec<_>>(), vec![(0, 20)]);
    }

    #[test]
    fn a_check_that_misses_a_changed_block_says_so() {
        // The verification must be able to fail: drop one area of a true answer.
        let truth = [(0, 4096), (1 << 20, 10)];
        let c = Check::new(&truth, &[(0, 65536)], 65536, 1 << 30);
        assert_eq!(c.missed_blocks, 1);
        let ok = Check::new(&truth, &[(0, 65536), (1 << 20, 65536)], 65536, 1 << 30);
        assert_eq!(ok.missed_blocks, 0);
        assert!((ok.over_report_ratio - 131072.0 / 4106.0).abs() < 1e-9);
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
