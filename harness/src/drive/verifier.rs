//! The verifier thread of a drive: checks each snapshot the leader sends against the
//! shadows' truth, then removes it (while the guest keeps writing), and runs the scheduled
//! backups.

use std::collections::BTreeMap;
use std::sync::mpsc::Receiver;
use std::time::Instant;

use backup::{BackupReport, Progress};
use workloads::human;

use super::barrier::Job;
use super::{BackupHook, Check, DiskLoad, DriveError, EpochReport};
use crate::apply::changed_areas;
use sim::Vm;

type Checked = (Vec<(usize, EpochReport)>, Vec<(usize, Check)>, Vec<BackupReport>);

/// The verifier: checks each snapshot the leader sends, then removes it.
pub(super) fn verify_loop(
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

    #[test]
    fn range_insert_merges_touching_and_overlapping_ranges() {
        let mut set = BTreeMap::new();
        range_insert(&mut set, 10, 20);
        range_insert(&mut set, 0, 5);
        range_insert(&mut set, 5, 10);
        assert_eq!(set.into_iter().collect::<Vec<_>>(), vec![(0, 20)]);
    }
}
