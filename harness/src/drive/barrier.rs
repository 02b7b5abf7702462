//! The epoch barrier: the vCPU threads of a VM meet here every `snapshot_every` ops; the
//! last to arrive (the leader) takes the epoch's snapshot and hands it to the verifier.
//!
//! # Design
//! Threads take their ops from a shared ticket counter (`claimed`) until the epoch's
//! budget (`epoch_limit`) is spent, add what they did to `epoch_done` and their shadow's
//! changes to `epoch_truth`, and wait at the barrier. The leader runs
//! [`Shared::lead_epoch`] while all others wait: it sums the epoch, takes the snapshot,
//! sends the verifier a [`Job`], and sets the next budget; a second barrier releases
//! everyone. So every op lies on a known side of every snapshot.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::Barrier;
use std::time::Instant;

use parking_lot::Mutex;

use super::{DiskLoad, DriveError, DrivePlan, Limit};
use crate::apply::coalesce;
use sim::Vm;

/// A snapshot for the verifier to check.
pub(super) struct Job {
    pub(super) epoch: u64,
    pub(super) snapshot: String,
    /// Per load: the snapshot's change ID of its disk.
    pub(super) change_ids: Vec<String>,
    /// Per load: the bytes truly changed in the epoch.
    pub(super) truth: Vec<Vec<(u64, u64)>>,
    pub(super) ops: u64,
    pub(super) last: bool,
    /// Run a backup after the check.
    pub(super) backup: bool,
}

/// State shared by the vCPU threads of one drive.
pub(super) struct Shared<'a> {
    pub(super) vm: &'a Vm,
    pub(super) plan: &'a DrivePlan,
    pub(super) barrier: Barrier,
    pub(super) deadline: Option<Instant>,
    /// Ops claimed in this epoch (may overshoot `epoch_limit` by one per thread).
    pub(super) claimed: AtomicU64,
    /// Ops allowed in this epoch.
    pub(super) epoch_limit: AtomicU64,
    /// Ops done in this epoch (added by each thread before the barrier).
    pub(super) epoch_done: AtomicU64,
    /// Set on error: threads stop at once.
    pub(super) stop: AtomicBool,
    /// Set by the leader between the two barriers: the drive is over.
    pub(super) done: AtomicBool,
    /// Leader-only state (behind a lock only to share it).
    pub(super) lead: Mutex<Lead>,
    /// Per load: the changes the threads closed this epoch.
    pub(super) epoch_truth: Mutex<Vec<Vec<(u64, u64)>>>,
    pub(super) error: Mutex<Option<DriveError>>,
    pub(super) jobs: Mutex<Option<SyncSender<Job>>>,
}

pub(super) struct Lead {
    pub(super) epoch: u64,
    pub(super) total_done: u64,
    /// Backups scheduled so far.
    pub(super) backups: u64,
}

impl Shared<'_> {
    pub(super) fn fail(&self, e: DriveError) {
        self.error.lock().get_or_insert(e);
        // Relaxed: threads only need to see it eventually; the barrier orders the rest.
        self.stop.store(true, Ordering::Relaxed);
    }

    pub(super) fn time_up(&self) -> bool {
        self.deadline.is_some_and(|d| Instant::now() >= d)
    }

    pub(super) fn failed(&self) -> bool {
        self.error.lock().is_some()
    }

    fn snapshot_name(&self, epoch: u64) -> String {
        format!("{}-{epoch}", self.plan.snapshot_prefix)
    }

    /// Run by the last thread to reach the epoch barrier, while all others wait.
    pub(super) fn lead_epoch(&self) {
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

pub(super) fn change_ids(vm: &Vm, loads: &[DiskLoad], info: &vadp::SnapshotInfo) -> Result<Vec<String>, DriveError> {
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
