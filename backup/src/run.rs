//! One backup of a VM: snapshot, query, read, store, commit, remove the snapshot.

use std::collections::{BTreeMap, HashSet};
use std::sync::mpsc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::point::{DiskMeta, Point, PointMeta, POINT_VERSION};
use crate::repo::{Pending, Repository};
use crate::store::ChunkHash;
use crate::{chunk_size, format_utc, BackupError, Progress};
use vadp::{changed_areas, DataProtection, DiskArea, SnapshotDisk, VadpError};

/// How new chunks are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    /// zstd (level 1), kept only where it makes the chunk smaller.
    #[default]
    Zstd,
    /// Raw.
    None,
}

/// Options of [`backup_vm`].
#[derive(Debug, Clone, Copy, Default)]
pub struct BackupOptions {
    /// Back up every allocated area even when an incremental is possible.
    pub full: bool,
    /// How to store new chunks.
    pub compression: Compression,
    /// The time recorded in the point, seconds since the Unix epoch (`None`:
    /// the clock). Prune's daily and weekly policies group points by it; tests
    /// and imports set it.
    pub time: Option<u64>,
}

/// The outcome of one backup (what `backup run --json` prints).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackupReport {
    /// The new point's ID.
    pub point: String,
    /// The VM.
    pub vm: String,
    /// `full` or `incremental`.
    pub kind: String,
    /// Why this kind (for a full backup: why not incremental).
    pub reason: String,
    /// Bytes read from the snapshot.
    pub bytes_read: u64,
    /// Bytes of new chunk files written.
    pub bytes_stored: u64,
    /// Areas the change query returned, over all disks.
    pub changed_areas: u64,
    /// Seconds from the start to the commit (the snapshot's removal after it is not counted).
    pub seconds: f64,
    /// Bytes in those areas.
    pub changed_bytes: u64,
    /// The point an incremental was built on.
    pub parent: Option<String>,
    /// Chunks marked bad by verify that this backup stored again (healing
    /// every point that references them).
    pub healed_chunks: u64,
}

/// What a disk's incremental builds on (the parent's change ID and chunk
/// index), or why the disk gets a full backup.
type Base<'p> = Result<(String, &'p [(u64, ChunkHash)]), String>;

/// Bytes read from a snapshot per call.
const READ_BATCH: u64 = 4 << 20;
/// Chunks queued between the reader and the writer thread.
const QUEUE: usize = 16;

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn is_zero(data: &[u8]) -> bool {
    let mut words = data.chunks_exact(16);
    let body = words
        .by_ref()
        .all(|w| u128::from_ne_bytes(w.try_into().expect("16 bytes")) == 0);
    body && words.remainder().iter().all(|&b| b == 0)
}

/// Backs up `vm` into `repo` (see the [module docs](super) for the flow).
///
/// The snapshot is removed on every path once it was created; if removing
/// it fails after the point was committed, the error is
/// [`BackupError::SnapshotNotRemoved`] and the next backup retries.
/// `progress` gets a phase per disk, in bytes to read.
pub fn backup_vm<H: DataProtection + ?Sized>(
    host: &H,
    vm: &str,
    repo: &Repository,
    opts: &BackupOptions,
    progress: &dyn Progress,
) -> Result<BackupReport, BackupError> {
    let started = Instant::now();
    let _lock = repo.lock_exclusive()?;
    repo.clean_tmp()?;
    if let Some(p) = repo.read_pending(vm)? {
        match host.remove_snapshot(vm, &p.snapshot) {
            Ok(()) | Err(VadpError::NotFound { .. }) => {}
            Err(e) => {
                return Err(BackupError::host(format!(
                    "removing snapshot {:?} of VM {vm} left by an interrupted backup",
                    p.snapshot
                ))(e))
            }
        }
        repo.clear_pending(vm)?;
    }
    host.enable_change_tracking(vm)
        .map_err(BackupError::host(format!("enabling change tracking on VM {vm}")))?;
    let id = repo.next_point_id()?;
    let snap = format!("cbtsim-backup-{id}");
    // Journal first: if this process dies, the next backup removes the snapshot.
    repo.write_pending(
        vm,
        &Pending {
            snapshot: snap.clone(),
            point: id.clone(),
        },
    )?;
    let info = host
        .create_snapshot(vm, &snap)
        .map_err(BackupError::host(format!("creating snapshot {snap:?} of VM {vm}")))?;
    let job = Job {
        host,
        vm,
        repo,
        opts,
        progress,
        snap: &snap,
        id: &id,
        started,
    };
    let result = job.run(&info.disks);
    let removed = host.remove_snapshot(vm, &snap);
    match (result, removed) {
        (Ok(report), Ok(())) => {
            repo.clear_pending(vm)?;
            Ok(report)
        }
        (Ok(report), Err(source)) => Err(BackupError::SnapshotNotRemoved {
            point: report.point,
            snapshot: snap,
            source: Box::new(source),
        }),
        (Err(e), Ok(())) => {
            // A stale record only names a snapshot that no longer exists.
            let _ = repo.clear_pending(vm);
            Err(e)
        }
        // The journal keeps the snapshot's name for the next run.
        (Err(e), Err(_)) => Err(e),
    }
}

struct Job<'a, H: ?Sized> {
    host: &'a H,
    vm: &'a str,
    repo: &'a Repository,
    opts: &'a BackupOptions,
    progress: &'a dyn Progress,
    snap: &'a str,
    id: &'a str,
    started: Instant,
}

/// What one disk's backup produced.
struct DiskResult {
    meta: DiskMeta,
    index: Vec<(u64, ChunkHash)>,
    reason: Option<String>,
    bytes_read: u64,
    bytes_stored: u64,
}

impl<H: DataProtection + ?Sized> Job<'_, H> {
    fn run(&self, disks: &[SnapshotDisk]) -> Result<BackupReport, BackupError> {
        let time = self.opts.time.unwrap_or_else(now_secs);
        let ids = self.repo.point_ids()?;
        let bad = self.repo.bad_chunks()?;
        // The parent: the VM's newest point (a point whose header cannot be
        // read cannot be attributed: skipped), whose index must read back intact.
        let newest = ids
            .iter()
            .rev()
            .find(|id| self.repo.point_meta(id).is_ok_and(|m| m.vm == self.vm));
        let (parent, parent_problem) = match newest {
            None => (None, Some(format!("first backup of VM {}", self.vm))),
            Some(id) => match self.repo.load_point(id) {
                Ok(p) => {
                    let n = p.index.iter().flatten().filter(|(_, h)| bad.contains(h)).count();
                    if n == 0 {
                        (Some(p), None)
                    } else {
                        // Its unchanged chunks would carry the damage into the new point.
                        let why = format!("the previous point {id} references {n} chunk(s) that verify marked bad");
                        (None, Some(why))
                    }
                }
                Err(e) => (None, Some(format!("the previous point {id} is unreadable ({e})"))),
            },
        };
        // Chunks that committed points reference, less those marked bad: a
        // backup deduplicates against them once it saw their file in `chunks/`.
        let mut dedup = Dedup {
            referenced: HashSet::new(),
            stored: HashSet::new(),
            bad: &bad,
            healed: Vec::new(),
        };
        for id in &ids {
            if let Ok(p) = self.repo.load_point(id) {
                dedup.referenced.extend(p.index.iter().flatten().map(|&(_, h)| h));
            }
        }
        dedup.referenced.retain(|h| !bad.contains(h));
        let mut results = Vec::new();
        for d in disks {
            let pd = parent
                .as_ref()
                .map(|p| (p, p.meta.disks.get(d.disk), p.index.get(d.disk)));
            let base = match (self.opts.full, &pd) {
                (true, _) => Err("a full backup was requested".to_owned()),
                (false, None) => Err(parent_problem.clone().unwrap_or_default()),
                (false, Some((p, pm, pi))) => self.incremental_base(d, &p.meta.point, *pm, *pi),
            };
            results.push(self.back_up_disk(d, base, &mut dedup)?);
        }
        if results.iter().any(|r| r.bytes_stored > 0) {
            self.repo.sync_chunks()?;
        }
        // The good copies are durable: the chunks are no longer bad.
        self.repo.clear_bad(&dedup.healed)?;
        let full = results.iter().any(|r| r.reason.is_some());
        let parent_id = parent.as_ref().filter(|_| !full).map(|p| p.meta.point.clone());
        let reason = if full {
            let mut rs: Vec<String> = Vec::new();
            for r in results.iter().filter_map(|r| r.reason.clone()) {
                if !rs.contains(&r) {
                    rs.push(r);
                }
            }
            rs.join("; ")
        } else {
            format!("changes since point {}", parent_id.as_deref().unwrap_or_default())
        };
        let sum = |f: fn(&DiskResult) -> u64| results.iter().map(f).sum::<u64>();
        let meta = PointMeta {
            version: POINT_VERSION,
            point: self.id.to_owned(),
            vm: self.vm.to_owned(),
            kind: if full { "full" } else { "incremental" }.into(),
            reason,
            parent: parent_id,
            time,
            time_utc: format_utc(time),
            seconds: 0.0,
            bytes_read: sum(|r| r.bytes_read),
            bytes_stored: sum(|r| r.bytes_stored),
            changed_areas: sum(|r| r.meta.changed_areas),
            changed_bytes: sum(|r| r.meta.changed_bytes),
            disks: results.iter().map(|r| r.meta.clone()).collect(),
        };
        let mut point = Point {
            meta,
            index: results.into_iter().map(|r| r.index).collect(),
        };
        point.meta.seconds = self.started.elapsed().as_secs_f64();
        self.repo.commit_point(&point)?;
        let m = point.meta;
        Ok(BackupReport {
            point: m.point,
            vm: m.vm,
            kind: m.kind,
            reason: m.reason,
            bytes_read: m.bytes_read,
            bytes_stored: m.bytes_stored,
            changed_areas: m.changed_areas,
            seconds: m.seconds,
            changed_bytes: m.changed_bytes,
            parent: m.parent,
            healed_chunks: dedup.healed.len() as u64,
        })
    }

    /// The change ID and index an incremental of disk `d` builds on, or why
    /// it cannot be incremental.
    fn incremental_base<'p>(
        &self,
        d: &SnapshotDisk,
        parent: &str,
        pm: Option<&DiskMeta>,
        pi: Option<&'p Vec<(u64, ChunkHash)>>,
    ) -> Base<'p> {
        let i = d.disk;
        let (Some(pm), Some(pi)) = (pm, pi) else {
            return Err(format!("disk {i} is new since point {parent}"));
        };
        if pm.chunk_size != chunk_size(d.granularity) {
            return Err(format!(
                "disk {i}'s tracking granularity changed since point {parent} ({} -> {})",
                pm.granularity, d.granularity
            ));
        }
        if d.capacity < pm.capacity {
            return Err(format!(
                "disk {i} shrank since point {parent} ({} -> {} bytes)",
                pm.capacity, d.capacity
            ));
        }
        match &pm.change_id {
            Some(c) => Ok((c.clone(), pi)),
            None => Err(format!(
                "point {parent} has no change ID for disk {i} (change tracking was off)"
            )),
        }
    }

    fn query(&self, disk: usize, since: &str) -> Result<Vec<DiskArea>, VadpError> {
        changed_areas(self.host, self.vm, self.snap, disk, since).collect()
    }

    fn back_up_disk(&self, d: &SnapshotDisk, base: Base<'_>, dedup: &mut Dedup<'_>) -> Result<DiskResult, BackupError> {
        let i = d.disk;
        let query_err = |since: &str| {
            BackupError::host(format!(
                "QueryChangedDiskAreas(VM {}, snapshot {}, disk {i}, since {since:?})",
                self.vm, self.snap
            ))
        };
        // Every area is collected before any data is read: an answer that
        // fails half-way never yields a partial incremental.
        let (areas, reason, mut index) = match base {
            Ok((cid, parent_index)) => match self.query(i, &cid) {
                Ok(areas) => (areas, None, parent_index.iter().copied().collect()),
                Err(e) if e.needs_full_backup() => {
                    let why = format!("the host rejected disk {i}'s change ID {cid} ({e})");
                    let areas = self.query(i, "*").map_err(query_err("*"))?;
                    (areas, Some(why), BTreeMap::new())
                }
                Err(e) => return Err(query_err(&cid)(e)),
            },
            Err(why) => {
                let areas = self.query(i, "*").map_err(query_err("*"))?;
                (areas, Some(why), BTreeMap::new())
            }
        };
        let cs = chunk_size(d.granularity);
        // The chunks the areas touch, in order, without repeats (areas are sorted).
        let mut chunks: Vec<u64> = Vec::new();
        for a in &areas {
            for n in a.start / cs..a.end().div_ceil(cs) {
                if chunks.last() != Some(&n) {
                    chunks.push(n);
                }
            }
        }
        let to_read: u64 = chunks.iter().map(|&n| cs.min(d.capacity - n * cs)).sum();
        self.progress.begin(&format!("{} disk {i}", self.vm), Some(to_read));
        let (bytes_read, bytes_stored) = self.copy_chunks(d, cs, &chunks, &mut index, dedup)?;
        self.progress.end();
        let meta = DiskMeta {
            disk: i,
            capacity: d.capacity,
            granularity: d.granularity,
            chunk_size: cs,
            change_id: d.change_id.clone(),
            kind: if reason.is_some() { "full" } else { "incremental" }.into(),
            changed_areas: areas.len() as u64,
            changed_bytes: areas.iter().map(|a| a.length).sum(),
            chunks: index.len() as u64,
        };
        Ok(DiskResult {
            meta,
            index: index.into_iter().collect(),
            reason,
            bytes_read,
            bytes_stored,
        })
    }

    /// Reads `chunks` of disk `d` from the snapshot, updates `index` and
    /// stores new chunks (a writer thread compresses and writes while this
    /// one reads and hashes). Returns (bytes read, bytes stored).
    fn copy_chunks(
        &self,
        d: &SnapshotDisk,
        cs: u64,
        chunks: &[u64],
        index: &mut BTreeMap<u64, ChunkHash>,
        dedup: &mut Dedup<'_>,
    ) -> Result<(u64, u64), BackupError> {
        let compress = self.opts.compression == Compression::Zstd;
        let repo = self.repo;
        std::thread::scope(|s| {
            let (tx, rx) = mpsc::sync_channel::<(ChunkHash, Vec<u8>)>(QUEUE);
            let writer = s.spawn(move || -> Result<u64, BackupError> {
                let mut stored = 0;
                for (h, data) in rx {
                    stored += repo.write_chunk(h, &data, compress)?;
                }
                Ok(stored)
            });
            let read = self.read_chunks(d, cs, chunks, index, dedup, &tx);
            drop(tx);
            let stored = writer.join().expect("the chunk writer does not panic");
            // A writer error stops the reader (its sends fail): report the writer's.
            let stored = stored?;
            Ok((read?, stored))
        })
    }

    fn read_chunks(
        &self,
        d: &SnapshotDisk,
        cs: u64,
        chunks: &[u64],
        index: &mut BTreeMap<u64, ChunkHash>,
        dedup: &mut Dedup<'_>,
        tx: &mpsc::SyncSender<(ChunkHash, Vec<u8>)>,
    ) -> Result<u64, BackupError> {
        let per_batch = (READ_BATCH / cs).max(1) as usize;
        let mut buf = vec![0u8; (per_batch as u64 * cs) as usize];
        let mut bytes_read = 0;
        let mut k = 0;
        while k < chunks.len() {
            // A batch: consecutive chunk numbers, at most `per_batch`.
            let first = chunks[k];
            let mut n = 1;
            while n < per_batch && k + n < chunks.len() && chunks[k + n] == first + n as u64 {
                n += 1;
            }
            let off = first * cs;
            let len = (n as u64 * cs).min(d.capacity - off);
            let buf = &mut buf[..len as usize];
            self.host
                .read_snapshot(self.vm, self.snap, d.disk, off, buf)
                .map_err(BackupError::host(format!(
                    "reading {len} bytes at {off} of disk {} of snapshot {}",
                    d.disk, self.snap
                )))?;
            bytes_read += len;
            for (j, data) in buf.chunks(cs as usize).enumerate() {
                let num = first + j as u64;
                if is_zero(data) {
                    index.remove(&num);
                    continue;
                }
                let h = ChunkHash::of(data);
                index.insert(num, h);
                if dedup.must_store(h, self.repo) && tx.send((h, data.to_vec())).is_err() {
                    // The writer stopped on an error; it reports it.
                    return Ok(bytes_read);
                }
            }
            self.progress.advance(len);
            k += n;
        }
        Ok(bytes_read)
    }
}

/// Which chunks a backup may deduplicate against.
struct Dedup<'a> {
    /// Referenced by committed points and not marked bad; not yet seen in `chunks/`.
    referenced: HashSet<ChunkHash>,
    /// In `chunks/`: seen there, or written by this backup.
    stored: HashSet<ChunkHash>,
    /// Marked bad by verify.
    bad: &'a HashSet<ChunkHash>,
    /// Bad chunks this backup writes again.
    healed: Vec<ChunkHash>,
}

impl Dedup<'_> {
    /// Whether chunk `h` must be written: not stored by this backup, and not
    /// a committed point's chunk whose file is in `chunks/` (a chunk marked
    /// bad, missing, or only an orphan of an interrupted backup is written).
    fn must_store(&mut self, h: ChunkHash, repo: &Repository) -> bool {
        if self.stored.contains(&h) {
            return false;
        }
        let reuse = self.referenced.remove(&h) && repo.has_chunk(h);
        self.stored.insert(h);
        if !reuse && self.bad.contains(&h) {
            self.healed.push(h);
        }
        !reuse
    }
}

#[cfg(test)]
mod tests {
    use super::is_zero;

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[]));
        assert!(is_zero(&[0; 100]));
        for i in 0..100 {
            let mut v = vec![0u8; 100];
            v[i] = 1;
            assert!(!is_zero(&v), "{i}");
        }
    }
}
