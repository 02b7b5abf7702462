//! What a drive runs: the plan, and its checks before anything starts.

use std::time::Duration;

use super::DriveError;
use sim::Vm;

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
    /// With `verify` and a [`BackupHook`](super::BackupHook): ops of the VM between backups. A backup runs
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

/// One vCPU thread's part of the plan.
pub(super) struct ThreadSpec {
    /// Index into `plan.loads`.
    pub(super) load: usize,
    pub(super) disk: usize,
    /// Thread number within its disk's load (0 is the one that may extend).
    pub(super) thread: u32,
}

pub(super) fn validate(vm: &Vm, plan: &DrivePlan, has_backup_hook: bool) -> Result<Vec<ThreadSpec>, DriveError> {
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
