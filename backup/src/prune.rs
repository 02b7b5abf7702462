//! Prune: choose the points to keep by policy, delete the others, then the
//! chunks (and bad-chunk marks) no remaining point references.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::Serialize;

use crate::point::PointMeta;
use crate::repo::Repository;
use crate::{iso_week, utc_day, BackupError};

/// Which points of each VM prune keeps: the rules of Proxmox Backup Server.
///
/// The points of a VM are taken newest first. `keep_last` keeps the newest
/// N. Then `keep_daily` keeps, for each of the N newest UTC days that have a
/// point not kept yet, that day's newest point; the day's other points are
/// removed (a later rule does not keep them) and a day that already has a
/// kept point does not count. `keep_weekly` does the same with ISO weeks over
/// what is left. Every other point is deleted. Each rule given must be at
/// least 1, and at least one rule must be given: then a VM's newest point,
/// the base of its next incremental, is always kept.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PrunePolicy {
    /// Keep the newest N points.
    pub keep_last: Option<usize>,
    /// Keep the newest point of each of the last N days that have one.
    pub keep_daily: Option<usize>,
    /// Keep the newest point of each of the last N ISO weeks that have one.
    pub keep_weekly: Option<usize>,
}

impl PrunePolicy {
    /// Keep the newest `n` points of each VM.
    pub fn last(n: usize) -> Self {
        Self {
            keep_last: Some(n),
            ..Self::default()
        }
    }

    fn check(&self) -> Result<(), BackupError> {
        for (name, v) in [
            ("--keep-last", self.keep_last),
            ("--keep-daily", self.keep_daily),
            ("--keep-weekly", self.keep_weekly),
        ] {
            if v == Some(0) {
                return Err(BackupError::InvalidArgument(format!(
                    "{name} must be at least 1 (a VM's newest point is the base of its next incremental)"
                )));
            }
        }
        if *self == Self::default() {
            return Err(BackupError::InvalidArgument(
                "give at least one of --keep-last, --keep-daily, --keep-weekly".into(),
            ));
        }
        Ok(())
    }

    /// For the points of one VM, newest first: which to keep.
    fn select(&self, points: &[&PointMeta]) -> Vec<bool> {
        let mut marks: Vec<Option<bool>> = vec![None; points.len()];
        let rules: [(Option<usize>, Period); 3] = [
            (self.keep_last, |p| p.point.clone()),
            (self.keep_daily, |p| utc_day(p.time)),
            (self.keep_weekly, |p| iso_week(p.time)),
        ];
        for (keep, period) in rules {
            if let Some(keep) = keep {
                mark_selections(&mut marks, points, keep, period);
            }
        }
        marks.into_iter().map(|m| m == Some(true)).collect()
    }
}

/// The period a point falls in, for a rule: the point itself, its day, its week.
type Period = fn(&PointMeta) -> String;

/// Proxmox Backup Server's `mark_selections`: over `points` (newest first),
/// keep the newest unmarked point of each of the first `keep` periods that
/// have no kept point yet; mark the others of those periods removed.
fn mark_selections(marks: &mut [Option<bool>], points: &[&PointMeta], keep: usize, period: Period) {
    let covered: HashSet<String> = points
        .iter()
        .zip(marks.iter())
        .filter(|(_, m)| **m == Some(true))
        .map(|(p, _)| period(p))
        .collect();
    let mut kept: HashSet<String> = HashSet::new();
    for (p, mark) in points.iter().zip(marks.iter_mut()) {
        if mark.is_some() {
            continue;
        }
        let id = period(p);
        if covered.contains(&id) {
            continue;
        }
        if kept.contains(&id) {
            *mark = Some(false);
        } else {
            if kept.len() >= keep {
                break;
            }
            kept.insert(id);
            *mark = Some(true);
        }
    }
}

/// What `backup prune` did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PruneReport {
    /// The policy applied.
    pub policy: PrunePolicy,
    /// Points deleted, oldest first.
    pub deleted_points: Vec<String>,
    /// Points kept, oldest first.
    pub kept: Vec<String>,
    /// How many points were kept.
    pub kept_points: u64,
    /// Chunk files deleted.
    pub deleted_chunks: u64,
    /// Their bytes.
    pub freed_bytes: u64,
    /// Bad-chunk marks deleted (no kept point references them).
    pub deleted_bad_marks: u64,
    /// Temporary files of interrupted runs removed.
    pub tmp_files_removed: u64,
}

/// Applies `policy` (see [`PrunePolicy`]) to each VM's points and deletes
/// the points it does not keep, then every chunk that no kept point references.
///
/// Every point's index is read before anything is deleted: with a point
/// that cannot be read, nothing is deleted (the error names it) since the
/// chunks it references are unknown. Points go first, chunks after, so an
/// interrupted prune never leaves a point with a missing chunk. A restore or
/// a mounted point that is reading makes prune fail ([`BackupError::Busy`])
/// rather than delete chunks under it.
pub fn prune(repo: &Repository, policy: &PrunePolicy) -> Result<PruneReport, BackupError> {
    policy.check()?;
    let _lock = repo.lock_exclusive()?;
    let _readers = repo.try_lock_no_readers()?;
    let mut report = PruneReport {
        policy: *policy,
        tmp_files_removed: repo.clean_tmp()?,
        ..PruneReport::default()
    };
    let mut points = Vec::new();
    for id in repo.point_ids()? {
        points.push(repo.load_point(&id)?);
    }
    let mut by_vm: BTreeMap<&str, Vec<&PointMeta>> = BTreeMap::new();
    for p in &points {
        by_vm.entry(p.meta.vm.as_str()).or_default().push(&p.meta);
    }
    let mut keep: HashMap<String, bool> = HashMap::new();
    for metas in by_vm.values_mut() {
        // Newest first: by time, then by ID (IDs grow with every backup).
        metas.sort_by(|a, b| (b.time, b.point.len(), &b.point).cmp(&(a.time, a.point.len(), &a.point)));
        for (m, k) in metas.iter().zip(policy.select(metas)) {
            keep.insert(m.point.clone(), k);
        }
    }
    let mut referenced = HashSet::new();
    for p in &points {
        if keep[&p.meta.point] {
            report.kept.push(p.meta.point.clone());
            referenced.extend(p.index.iter().flatten().map(|&(_, h)| h));
        } else {
            repo.delete_point(&p.meta.point)?;
            report.deleted_points.push(p.meta.point.clone());
        }
    }
    report.kept_points = report.kept.len() as u64;
    for (h, path) in repo.chunk_files()? {
        if !referenced.contains(&h) {
            let size = std::fs::metadata(&path).map_or(0, |m| m.len());
            std::fs::remove_file(&path).map_err(BackupError::io("cannot delete chunk", &path))?;
            report.deleted_chunks += 1;
            report.freed_bytes += size;
        }
    }
    let stale: Vec<_> = repo
        .bad_chunks()?
        .into_iter()
        .filter(|h| !referenced.contains(h))
        .collect();
    repo.clear_bad(&stale)?;
    report.deleted_bad_marks = stale.len() as u64;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(point: u64, time: u64) -> PointMeta {
        PointMeta {
            version: 1,
            point: format!("{point:08}"),
            vm: "vm".into(),
            kind: "incremental".into(),
            reason: String::new(),
            parent: None,
            time,
            time_utc: String::new(),
            seconds: 0.0,
            bytes_read: 0,
            bytes_stored: 0,
            changed_areas: 0,
            changed_bytes: 0,
            disks: Vec::new(),
        }
    }

    /// The IDs kept, for points at `times` (hours since 2024-01-01, a Monday), oldest first.
    fn kept(policy: PrunePolicy, hours: &[u64]) -> Vec<u64> {
        const T0: u64 = 1_704_067_200;
        let metas: Vec<PointMeta> = hours
            .iter()
            .enumerate()
            .map(|(i, h)| meta(i as u64 + 1, T0 + h * 3600))
            .collect();
        let mut newest_first: Vec<&PointMeta> = metas.iter().collect();
        newest_first.reverse();
        let mut out: Vec<u64> = newest_first
            .iter()
            .zip(policy.select(&newest_first))
            .filter(|(_, k)| *k)
            .map(|(m, _)| m.point.parse().unwrap())
            .collect();
        out.sort();
        out
    }

    #[test]
    fn keep_last() {
        assert_eq!(kept(PrunePolicy::last(2), &[0, 1, 2, 3]), vec![3, 4]);
        assert_eq!(kept(PrunePolicy::last(9), &[0, 1]), vec![1, 2]);
    }

    #[test]
    fn keep_daily_keeps_the_newest_of_each_day() {
        // Day 0: points 1-3; day 1: 4; day 3: 5, 6.
        let hours = [1, 5, 20, 30, 75, 80];
        let daily = |n| PrunePolicy {
            keep_daily: Some(n),
            ..PrunePolicy::default()
        };
        assert_eq!(kept(daily(2), &hours), vec![4, 6]);
        assert_eq!(kept(daily(7), &hours), vec![3, 4, 6]);
        // keep-last 2 covers day 3; daily 2 then keeps days 1 and 0.
        let both = PrunePolicy {
            keep_last: Some(2),
            keep_daily: Some(2),
            ..PrunePolicy::default()
        };
        assert_eq!(kept(both, &hours), vec![3, 4, 5, 6]);
    }

    #[test]
    fn keep_weekly_uses_iso_weeks_and_what_daily_left() {
        // 2024-01-01 is a Monday: weeks start at hours 0, 168, 336.
        let hours = [1, 100, 170, 200, 340, 341];
        let weekly = |n| PrunePolicy {
            keep_weekly: Some(n),
            ..PrunePolicy::default()
        };
        assert_eq!(kept(weekly(2), &hours), vec![4, 6]);
        assert_eq!(kept(weekly(5), &hours), vec![2, 4, 6]);
        // Daily 1 keeps 6 and removes 5 (same day); weekly 2 skips week 3
        // (covered) and keeps the newest of weeks 2 and 1.
        let both = PrunePolicy {
            keep_daily: Some(1),
            keep_weekly: Some(2),
            ..PrunePolicy::default()
        };
        assert_eq!(kept(both, &hours), vec![2, 4, 6]);
    }

    #[test]
    fn policies_are_checked() {
        assert!(PrunePolicy::default().check().is_err());
        assert!(PrunePolicy::last(0).check().is_err());
        assert!(PrunePolicy::last(1).check().is_ok());
    }
}
