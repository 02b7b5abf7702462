//! Prune: delete old points, then the chunks no remaining point references.

use std::collections::{BTreeMap, HashSet};

use serde::Serialize;

use crate::repo::Repository;
use crate::BackupError;

/// What `backup prune` did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PruneReport {
    /// Points deleted, oldest first.
    pub deleted_points: Vec<String>,
    /// Points kept.
    pub kept_points: u64,
    /// Chunk files deleted.
    pub deleted_chunks: u64,
    /// Their bytes.
    pub freed_bytes: u64,
    /// Temporary files of interrupted runs removed.
    pub tmp_files_removed: u64,
}

/// Keeps the newest `keep_last` points of each VM and deletes the others,
/// then every chunk that no kept point references.
///
/// Every point's index is read before anything is deleted: with a point
/// that cannot be read, nothing is deleted (the error names it) since the
/// chunks it references are unknown. Points go first, chunks after, so an
/// interrupted prune never leaves a point with a missing chunk.
pub fn prune(repo: &Repository, keep_last: usize) -> Result<PruneReport, BackupError> {
    if keep_last == 0 {
        return Err(BackupError::InvalidArgument(
            "--keep-last must be at least 1 (a VM's newest point is the base of its next incremental)".into(),
        ));
    }
    let _lock = repo.lock_exclusive()?;
    let mut report = PruneReport {
        tmp_files_removed: repo.clean_tmp()?,
        ..PruneReport::default()
    };
    let mut by_vm: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut points = Vec::new();
    for id in repo.point_ids()? {
        let p = repo.load_point(&id)?;
        by_vm.entry(p.meta.vm.clone()).or_default().push(id);
        points.push(p);
    }
    let mut doomed: HashSet<String> = HashSet::new();
    for ids in by_vm.values() {
        doomed.extend(ids[..ids.len().saturating_sub(keep_last)].iter().cloned());
    }
    let mut referenced = HashSet::new();
    for p in &points {
        if doomed.contains(&p.meta.point) {
            repo.delete_point(&p.meta.point)?;
            report.deleted_points.push(p.meta.point.clone());
        } else {
            report.kept_points += 1;
            referenced.extend(p.index.iter().flatten().map(|&(_, h)| h));
        }
    }
    for (h, path) in repo.chunk_files()? {
        if !referenced.contains(&h) {
            let size = std::fs::metadata(&path).map_or(0, |m| m.len());
            std::fs::remove_file(&path).map_err(BackupError::io("cannot delete chunk", &path))?;
            report.deleted_chunks += 1;
            report.freed_bytes += size;
        }
    }
    Ok(report)
}
