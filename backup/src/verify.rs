//! Verify: re-hash every chunk, check every point's index, and name the
//! points that a bad or missing chunk affects.

use std::collections::{BTreeSet, HashMap};

use serde::Serialize;

use crate::repo::Repository;
use crate::store::{self, ChunkHash};
use crate::{BackupError, Progress};

/// What `backup verify` found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    /// Points checked.
    pub points: u64,
    /// Chunk files re-hashed.
    pub chunks: u64,
    /// Their bytes on disk.
    pub chunk_bytes: u64,
    /// Chunks whose content does not match their name (or does not decode).
    pub corrupt_chunks: Vec<String>,
    /// Chunks some point references that are not in the repository.
    pub missing_chunks: Vec<String>,
    /// Points whose file is unreadable or fails its checksum.
    pub corrupt_points: Vec<String>,
    /// Points that cannot be restored as they were: they reference a corrupt
    /// or missing chunk, or their own file is corrupt.
    pub affected_points: Vec<String>,
    /// Chunks no point references (left by an interrupted backup; prune removes them).
    pub unreferenced_chunks: u64,
    /// Whether nothing is wrong.
    pub ok: bool,
}

/// Checks the whole repository. Problems found are in the report (`ok` is
/// false); the error is for a repository that cannot be read at all.
/// `progress` gets one phase, in bytes of chunk files.
pub fn verify(repo: &Repository, progress: &dyn Progress) -> Result<VerifyReport, BackupError> {
    let _lock = repo.lock_shared()?;
    let mut r = VerifyReport::default();
    let mut users: HashMap<ChunkHash, Vec<String>> = HashMap::new();
    let mut affected = BTreeSet::new();
    for id in repo.point_ids()? {
        r.points += 1;
        match repo.load_point(&id) {
            Ok(p) => {
                for &(_, h) in p.index.iter().flatten() {
                    let u = users.entry(h).or_default();
                    if u.last() != Some(&id) {
                        u.push(id.clone());
                    }
                }
            }
            Err(BackupError::CorruptPoint { .. }) => {
                r.corrupt_points.push(id.clone());
                affected.insert(id);
            }
            Err(e) => return Err(e),
        }
    }
    let files = repo.chunk_files()?;
    let sizes: Vec<u64> = files
        .iter()
        .map(|(_, p)| std::fs::metadata(p).map_or(0, |m| m.len()))
        .collect();
    progress.begin("verify chunks", Some(sizes.iter().sum()));
    let mut present = std::collections::HashSet::new();
    for ((h, path), size) in files.iter().zip(sizes) {
        let bytes = std::fs::read(path).map_err(BackupError::io("cannot read chunk", path))?;
        r.chunks += 1;
        r.chunk_bytes += bytes.len() as u64;
        present.insert(*h);
        if store::decode(*h, &bytes).is_err() {
            r.corrupt_chunks.push(h.to_string());
            affected.extend(users.get(h).into_iter().flatten().cloned());
        }
        if !users.contains_key(h) {
            r.unreferenced_chunks += 1;
        }
        progress.advance(size);
    }
    progress.end();
    let mut missing: Vec<&ChunkHash> = users.keys().filter(|h| !present.contains(*h)).collect();
    missing.sort();
    for h in missing {
        r.missing_chunks.push(h.to_string());
        affected.extend(users[h].iter().cloned());
    }
    r.affected_points = affected.into_iter().collect();
    r.affected_points.sort_by(|a, b| (a.len(), a).cmp(&(b.len(), b)));
    r.ok = r.corrupt_chunks.is_empty() && r.missing_chunks.is_empty() && r.corrupt_points.is_empty();
    Ok(r)
}
