//! Running a scenario: its VMs created in a datastore and driven at once, each checked as
//! it runs, with scheduled backups and a final backup restored and compared.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Instant;

use backup::{backup_vm, restore_to_file, BackupError, BackupOptions, BackupReport, Progress, Repository};
use serde::Serialize;

use super::{Scenario, ScenarioError};
use crate::drive::{self, BackupHook, DriveError, DriveReport, Latency, OpCounts};
use sim::{Host, SimError, Vm};

/// What a scenario run did and found.
#[derive(Debug, Clone, Serialize)]
pub struct ScenarioReport {
    /// The scenario's name.
    pub name: String,
    /// VMs run.
    pub vm_count: usize,
    /// vCPU threads in all.
    pub threads: u64,
    /// Wall time, in seconds.
    pub elapsed_s: f64,
    /// Ops of all VMs.
    pub counts: OpCounts,
    /// Ops per second, all VMs.
    pub ops_per_s: f64,
    /// Guest write latency over all VMs.
    pub write_latency: Latency,
    /// Epochs checked (per disk).
    pub epochs_checked: u64,
    /// Bytes the tracker reported since each disk's first change ID, summed.
    pub changed_bytes: u64,
    /// Bytes truly changed, summed.
    pub true_changed_bytes: u64,
    /// `changed_bytes / true_changed_bytes`.
    pub over_report_ratio: f64,
    /// Missed blocks over every check of every VM (must be 0).
    pub missed_blocks: u64,
    /// Backups taken (scheduled and final), all VMs.
    pub backups: u64,
    /// The final backup of each VM with a backup schedule, restored and compared.
    pub backup_checks: Vec<BackupCheck>,
    /// Bytes of restored images that differ from the VMs' disks (must be 0).
    pub backup_mismatched_bytes: u64,
    /// Per VM.
    pub vms: Vec<DriveReport>,
}

/// A VM's final backup, restored and compared with its disks.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BackupCheck {
    /// The VM.
    pub vm: String,
    /// The backup (the last of the VM's chain).
    pub backup: BackupReport,
    /// Bytes compared (every disk, whole).
    pub compared_bytes: u64,
    /// Bytes that differ (must be 0).
    pub mismatched_bytes: u64,
}

/// The scenario's backup client for one VM.
struct VmBackup<'a> {
    host: &'a Host,
    vm: &'a str,
    repo: &'a Repository,
}

impl BackupHook for VmBackup<'_> {
    fn backup(&self) -> Result<BackupReport, BackupError> {
        backup_vm(self.host, self.vm, self.repo, &BackupOptions::default(), &())
    }
}

/// Bytes compared per read.
const COMPARE_PIECE: u64 = 4 << 20;

/// Backs up `vm` (its guest stopped), restores each disk to a file in `scratch` and
/// compares it with the disk.
fn check_final_backup(b: &VmBackup<'_>, vm: &Vm, scratch: &Path) -> Result<BackupCheck, ScenarioError> {
    let backup_err = |source| ScenarioError::Backup {
        vm: b.vm.to_owned(),
        source,
    };
    let backup = b.backup().map_err(backup_err)?;
    let (mut compared, mut mismatched) = (0, 0);
    for d in 0..vm.disk_count() {
        let file = scratch.join(format!("{}.disk{d}.img", b.vm));
        restore_to_file(b.repo, &backup.point, d, &file, true, &()).map_err(backup_err)?;
        let read_err = |source| ScenarioError::Restored {
            path: file.clone(),
            source,
        };
        let f = std::fs::File::open(&file).map_err(read_err)?;
        let image_len = f.metadata().map_err(read_err)?.len();
        let cap = vm.capacity(d)?;
        mismatched += image_len.abs_diff(cap);
        let (mut a, mut c) = (Vec::new(), Vec::new());
        let mut off = 0;
        while off < cap.min(image_len) {
            let n = COMPARE_PIECE.min(cap.min(image_len) - off) as usize;
            a.resize(n, 0);
            c.resize(n, 0);
            f.read_exact_at(&mut a, off).map_err(read_err)?;
            vm.read(d, off, &mut c)?;
            if a != c {
                mismatched += a.iter().zip(&c).filter(|(x, y)| x != y).count() as u64;
            }
            off += n as u64;
        }
        compared += cap;
        drop(f);
        let _ = std::fs::remove_file(&file);
    }
    Ok(BackupCheck {
        vm: b.vm.to_owned(),
        backup,
        compared_bytes: compared,
        mismatched_bytes: mismatched,
    })
}

/// Creates the scenario's VMs in `datastore` and runs them all at once.
///
/// Fails if a VM of the same name exists there, or if any VM fails (after all stopped).
/// Missed blocks and backup mismatches are not errors here: they are in the report (and
/// must be 0). `progress(i)` watches the drive of VM `i` of [`Scenario::vms`] (see
/// [`drive::drive`]); `&|_| &()` watches nothing.
pub fn run<'p>(
    s: &Scenario,
    datastore: &Path,
    progress: &dyn Fn(usize) -> &'p dyn Progress,
) -> Result<ScenarioReport, ScenarioError> {
    let host = Host::open(datastore)?;
    let mut vms = Vec::new();
    for v in &s.vms {
        vms.push(host.create_vm(&v.name, &v.disks)?);
    }
    let backups_on = s.vms.iter().any(|v| v.plan.backup_every.is_some());
    let repo = if backups_on {
        let root = s.repository.clone().unwrap_or_else(|| datastore.join(".backups"));
        let repo = Repository::create_or_open(&root).map_err(|source| ScenarioError::Backup {
            vm: s
                .vms
                .iter()
                .find(|v| v.plan.backup_every.is_some())
                .map(|v| v.name.clone())
                .unwrap_or_default(),
            source,
        })?;
        Some(repo)
    } else {
        None
    };
    // Restored images go here (a name starting with '.' is never a VM's).
    let scratch = tempfile::Builder::new()
        .prefix(".restore-")
        .tempdir_in(datastore)
        .map_err(|source| SimError::Io {
            path: datastore.to_owned(),
            source,
        })?;
    let started = Instant::now();
    type VmResult = Result<(DriveReport, Option<BackupCheck>), ScenarioError>;
    let results: Vec<VmResult> = std::thread::scope(|scope| {
        let handles: Vec<_> = s
            .vms
            .iter()
            .zip(&vms)
            .enumerate()
            .map(|(i, (plan, vm))| {
                let (host, repo, scratch) = (&host, repo.as_ref(), scratch.path());
                let p = progress(i);
                scope.spawn(move || {
                    let hook = repo.filter(|_| plan.plan.backup_every.is_some()).map(|repo| VmBackup {
                        host,
                        vm: &plan.name,
                        repo,
                    });
                    let vm_err = |source| ScenarioError::Vm {
                        vm: plan.name.clone(),
                        source: Box::new(source),
                    };
                    drive::drive_with_backups(vm, &plan.plan, p, hook.as_ref().map(|h| h as &dyn BackupHook))
                        .map_err(vm_err)
                        .and_then(|r| {
                            let check = hook.as_ref().map(|h| check_final_backup(h, vm, scratch)).transpose()?;
                            Ok((r, check))
                        })
                })
            })
            .collect();
        handles
            .into_iter()
            .zip(&s.vms)
            .map(|(h, v)| {
                h.join().unwrap_or_else(|_| {
                    Err(ScenarioError::Vm {
                        vm: v.name.clone(),
                        source: Box::new(DriveError::Panicked(v.name.clone())),
                    })
                })
            })
            .collect()
    });
    let elapsed_s = started.elapsed().as_secs_f64();
    let mut reports = Vec::new();
    let mut backup_checks = Vec::new();
    for r in results {
        let (report, check) = r?;
        reports.push(report);
        backup_checks.extend(check);
    }
    let mut counts = OpCounts::default();
    let mut hist = drive::new_histogram();
    let (mut changed, mut truth, mut epochs, mut missed) = (0, 0, 0, 0);
    for r in &reports {
        counts.add(&r.counts);
        hist.add(&r.write_histogram)
            .expect("histograms of the same bounds merge");
        missed += r.missed_blocks;
        for d in &r.disks {
            epochs += d.epochs.len() as u64;
            if let Some(c) = d.cumulative {
                changed += c.changed_bytes;
                truth += c.true_changed_bytes;
            }
        }
    }
    Ok(ScenarioReport {
        name: s.name.clone(),
        vm_count: reports.len(),
        threads: s.threads(),
        elapsed_s,
        ops_per_s: counts.ops as f64 / elapsed_s.max(1e-9),
        counts,
        write_latency: Latency::of(&hist),
        epochs_checked: epochs,
        changed_bytes: changed,
        true_changed_bytes: truth,
        over_report_ratio: if truth == 0 { 1.0 } else { changed as f64 / truth as f64 },
        missed_blocks: missed,
        backups: reports.iter().map(|r| r.backups.len() as u64).sum::<u64>() + backup_checks.len() as u64,
        backup_mismatched_bytes: backup_checks.iter().map(|c| c.mismatched_bytes).sum(),
        backup_checks,
        vms: reports,
    })
}
