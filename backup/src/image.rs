//! A point's disk read in place: random reads of the image a restore would
//! write, straight from the chunks (what a FUSE mount or an NBD export serves).

use std::fs::File;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::point::{DiskMeta, PointMeta};
use crate::repo::Repository;
use crate::store::ChunkHash;
use crate::BackupError;

/// Decoded chunks kept for reads that follow each other (a kernel reads
/// 128 KiB at a time; a chunk is up to 1 MiB).
const CACHED_CHUNKS: usize = 8;

/// Disk `disk` of a restore point, readable at any offset without restoring it.
///
/// Holds the repository's readers' lock while it lives, so prune cannot
/// delete its chunks (prune fails instead); backups run meanwhile. Every
/// chunk is checked against its hash before its bytes are returned.
#[derive(Debug)]
pub struct PointImage {
    repo: Repository,
    meta: PointMeta,
    disk: DiskMeta,
    index: Vec<(u64, ChunkHash)>,
    cache: Mutex<Vec<(u64, Arc<Vec<u8>>)>>,
    _readers: File,
}

impl PointImage {
    /// Opens disk `disk` of point `id`.
    pub fn open(repo: &Repository, id: &str, disk: usize) -> Result<Self, BackupError> {
        let readers = repo.lock_readers()?;
        let mut p = repo.load_point(id)?;
        if disk >= p.meta.disks.len() {
            return Err(BackupError::NoSuchDisk {
                point: p.meta.point.clone(),
                disk,
                count: p.meta.disks.len(),
            });
        }
        let index = std::mem::take(&mut p.index[disk]);
        Ok(Self {
            repo: repo.clone(),
            disk: p.meta.disks[disk].clone(),
            meta: p.meta,
            index,
            cache: Mutex::new(Vec::new()),
            _readers: readers,
        })
    }

    /// The point's header.
    pub fn meta(&self) -> &PointMeta {
        &self.meta
    }

    /// The disk's size in bytes.
    pub fn capacity(&self) -> u64 {
        self.disk.capacity
    }

    /// Chunk `n`'s data (`None`: zeros), checked.
    fn chunk(&self, n: u64) -> Result<Option<Arc<Vec<u8>>>, BackupError> {
        let Ok(i) = self.index.binary_search_by_key(&n, |&(c, _)| c) else {
            return Ok(None);
        };
        let mut cache = self.cache.lock();
        if let Some(pos) = cache.iter().position(|(c, _)| *c == n) {
            let hit = cache.remove(pos);
            cache.push(hit.clone());
            return Ok(Some(hit.1));
        }
        drop(cache);
        let h = self.index[i].1;
        let data = self.repo.read_chunk(h)?;
        let cs = self.disk.chunk_size;
        if data.len() as u64 > cs.min(self.disk.capacity - n * cs) {
            return Err(BackupError::CorruptChunk {
                hash: h,
                reason: format!("{} bytes do not fit chunk {n}", data.len()),
            });
        }
        let data = Arc::new(data);
        let mut cache = self.cache.lock();
        if cache.len() == CACHED_CHUNKS {
            cache.remove(0);
        }
        cache.push((n, data.clone()));
        Ok(Some(data))
    }

    /// Fills `buf` with the image's bytes at `offset` (zeros where the point
    /// holds none). The range must lie inside the disk.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BackupError> {
        let cap = self.disk.capacity;
        if !matches!(offset.checked_add(buf.len() as u64), Some(end) if end <= cap) {
            return Err(BackupError::InvalidArgument(format!(
                "a read of {} bytes at {offset} runs past the disk's end at {cap}",
                buf.len()
            )));
        }
        let cs = self.disk.chunk_size;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let n = pos / cs;
            let within = (pos - n * cs) as usize;
            let take = (cs as usize - within).min(buf.len() - done);
            let out = &mut buf[done..done + take];
            match self.chunk(n)? {
                Some(data) => {
                    // A chunk shorter than the range (never, from a backup) reads as zeros past its end.
                    let have = data.len().saturating_sub(within).min(take);
                    out[..have].copy_from_slice(&data[within..within + have]);
                    out[have..].fill(0);
                }
                None => out.fill(0),
            }
            done += take;
        }
        Ok(())
    }
}
