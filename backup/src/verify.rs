//! Verify: re-hash every chunk, check every point's index, move bad chunks
//! aside, and name the points they affect; repair: read bad chunks again
//! from the VMs where their data has not changed.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use serde::Serialize;

use crate::repo::Repository;
use crate::store::{self, ChunkHash};
use crate::{BackupError, Progress};
use vadp::{DataProtection, VadpError};

/// What `backup verify` found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    /// Points checked.
    pub points: u64,
    /// Chunk files re-hashed.
    pub chunks: u64,
    /// Their bytes on disk.
    pub chunk_bytes: u64,
    /// Chunks found corrupt by this run (content does not match the name, or
    /// does not decode): each was moved aside into `bad/`.
    pub corrupt_chunks: Vec<String>,
    /// Chunks some point references that are not in the repository, found by
    /// this run: each was recorded in `bad/`.
    pub missing_chunks: Vec<String>,
    /// Chunks marked bad by an earlier run that points still reference.
    pub bad_chunks: Vec<String>,
    /// Where this run moved or recorded the chunks it found bad.
    pub moved_aside: Vec<String>,
    /// Points whose file is unreadable or fails its checksum.
    pub corrupt_points: Vec<String>,
    /// Points that cannot be restored as they were: they reference a corrupt,
    /// missing or bad chunk, or their own file is corrupt.
    pub affected_points: Vec<String>,
    /// Chunks no point references (left by an interrupted backup; prune removes them).
    pub unreferenced_chunks: u64,
    /// Whether nothing is wrong.
    pub ok: bool,
}

/// Checks the whole repository. Problems found are in the report (`ok` is
/// false); the error is for a repository that cannot be read at all.
///
/// A corrupt chunk is moved into `bad/`, and a missing one recorded there, so
/// that the next backup reading the same data stores it again instead of
/// deduplicating against it (see the [crate docs](crate)). `progress` gets
/// one phase, in bytes of chunk files.
pub fn verify(repo: &Repository, progress: &dyn Progress) -> Result<VerifyReport, BackupError> {
    let _lock = repo.lock_shared()?;
    let mut r = VerifyReport::default();
    let users = chunk_users(repo, &mut r)?;
    let mut affected: BTreeSet<String> = r.corrupt_points.iter().cloned().collect();
    let files = repo.chunk_files()?;
    let sizes: Vec<u64> = files
        .iter()
        .map(|(_, p)| std::fs::metadata(p).map_or(0, |m| m.len()))
        .collect();
    progress.begin("verify chunks", Some(sizes.iter().sum()));
    let mut present = HashSet::new();
    let mut corrupt = Vec::new();
    for ((h, path), size) in files.iter().zip(sizes) {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            // Moved aside by a verify running beside this one.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(BackupError::io("cannot read chunk", path)(e)),
        };
        r.chunks += 1;
        r.chunk_bytes += bytes.len() as u64;
        if store::decode(*h, &bytes).is_err() {
            corrupt.push(*h);
        } else {
            present.insert(*h);
        }
        if !users.contains_key(h) {
            r.unreferenced_chunks += 1;
        }
        progress.advance(size);
    }
    progress.end();
    let marked = repo.bad_chunks()?;
    let mut absent: Vec<&ChunkHash> = users.keys().filter(|h| !present.contains(*h)).collect();
    absent.sort();
    for h in absent {
        affected.extend(users[h].iter().cloned());
        if corrupt.contains(h) {
            continue;
        }
        if marked.contains(h) {
            r.bad_chunks.push(h.to_string());
        } else {
            r.missing_chunks.push(h.to_string());
            r.moved_aside.push(repo.mark_bad(*h)?.display().to_string());
        }
    }
    for h in &corrupt {
        r.corrupt_chunks.push(h.to_string());
        r.moved_aside.push(repo.mark_bad(*h)?.display().to_string());
    }
    r.affected_points = affected.into_iter().collect();
    r.affected_points.sort_by(|a, b| (a.len(), a).cmp(&(b.len(), b)));
    r.ok = r.corrupt_chunks.is_empty()
        && r.missing_chunks.is_empty()
        && r.bad_chunks.is_empty()
        && r.corrupt_points.is_empty();
    Ok(r)
}

/// For every chunk the points reference, the points (in order) that do;
/// counts the points and lists the corrupt point files in `r`.
fn chunk_users(repo: &Repository, r: &mut VerifyReport) -> Result<HashMap<ChunkHash, Vec<String>>, BackupError> {
    let mut users: HashMap<ChunkHash, Vec<String>> = HashMap::new();
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
            Err(BackupError::CorruptPoint { .. }) => r.corrupt_points.push(id),
            Err(e) => return Err(e),
        }
    }
    Ok(users)
}

/// What `backup verify --repair` did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RepairReport {
    /// Chunks marked bad that points reference.
    pub bad_chunks: u64,
    /// Those read again from a VM (whose data at that place had not changed)
    /// and stored: every point that references them restores again.
    pub repaired: Vec<String>,
    /// Those whose data is no longer on any VM (changed since, or the VM is gone).
    pub unrepaired: Vec<String>,
    /// Bytes read from the VMs' snapshots.
    pub bytes_read: u64,
}

/// Where a bad chunk's data was on a VM: disk, byte offset, length.
type Place = (usize, u64, u64);

/// Re-reads the chunks marked bad from live snapshots of the VMs that the
/// points referencing them were taken from: for each VM with such chunks, a
/// snapshot (`cbtsim-repair`) is taken, every place where a point had a bad
/// chunk is read, and where the data there still hashes to the chunk's name
/// it is stored again and the bad mark cleared. Run [`verify`] first (it
/// marks the bad chunks). `progress` gets a phase per VM, in bytes to read.
pub fn repair<H: DataProtection + ?Sized>(
    repo: &Repository,
    host: &H,
    progress: &dyn Progress,
) -> Result<RepairReport, BackupError> {
    let _lock = repo.lock_exclusive()?;
    repo.clean_tmp()?;
    let bad = repo.bad_chunks()?;
    // Per VM, per bad chunk, the places points saw it.
    let mut wanted: BTreeMap<String, BTreeMap<ChunkHash, BTreeSet<Place>>> = BTreeMap::new();
    for id in repo.point_ids()? {
        let Ok(p) = repo.load_point(&id) else { continue };
        for (d, entries) in p.index.iter().enumerate() {
            let dm = &p.meta.disks[d];
            for &(n, h) in entries.iter().filter(|(_, h)| bad.contains(h)) {
                let off = n * dm.chunk_size;
                let len = dm.chunk_size.min(dm.capacity - off);
                wanted
                    .entry(p.meta.vm.clone())
                    .or_default()
                    .entry(h)
                    .or_default()
                    .insert((d, off, len));
            }
        }
    }
    let mut all: BTreeSet<ChunkHash> = BTreeSet::new();
    let mut fixed: Vec<ChunkHash> = Vec::new();
    let mut r = RepairReport::default();
    for (vm, chunks) in &wanted {
        all.extend(chunks.keys());
        let todo: Vec<(ChunkHash, Place)> = chunks
            .iter()
            .filter(|(h, _)| !fixed.contains(h))
            .flat_map(|(h, places)| places.iter().map(move |p| (*h, *p)))
            .collect();
        if todo.is_empty() {
            continue;
        }
        let snap = "cbtsim-repair";
        // One left by a repair that died (an error here: there is none, or no VM).
        let _ = host.remove_snapshot(vm, snap);
        match host.create_snapshot(vm, snap) {
            Ok(_) => {}
            // The VM is gone: its chunks stay unrepaired.
            Err(VadpError::NotFound { .. }) => continue,
            Err(e) => return Err(BackupError::host(format!("creating snapshot {snap:?} of VM {vm}"))(e)),
        }
        progress.begin(&format!("repair {vm}"), Some(todo.iter().map(|(_, p)| p.2).sum()));
        let result = (|| {
            for (h, (disk, off, len)) in todo {
                if fixed.contains(&h) {
                    continue;
                }
                let mut buf = vec![0u8; len as usize];
                // A disk that shrank or went away since: that place cannot help.
                if host.read_snapshot(vm, snap, disk, off, &mut buf).is_err() {
                    continue;
                }
                r.bytes_read += len;
                progress.advance(len);
                if ChunkHash::of(&buf) == h {
                    repo.write_chunk(h, &buf, true)?;
                    fixed.push(h);
                }
            }
            Ok::<(), BackupError>(())
        })();
        progress.end();
        let removed = host
            .remove_snapshot(vm, snap)
            .map_err(BackupError::host(format!("removing snapshot {snap:?} of VM {vm}")));
        result?;
        removed?;
    }
    if !fixed.is_empty() {
        repo.sync_chunks()?;
        repo.clear_bad(&fixed)?;
    }
    r.bad_chunks = all.len() as u64;
    r.repaired = fixed.iter().map(ToString::to_string).collect();
    r.repaired.sort();
    r.unrepaired = all
        .iter()
        .filter(|h| !fixed.contains(h))
        .map(ToString::to_string)
        .collect();
    Ok(r)
}
