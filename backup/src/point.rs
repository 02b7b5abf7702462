//! Restore points: the header a listing shows, and the chunk index.
//!
//! A point file is one line of JSON ([`PointMeta`]), then for each disk in
//! order its index entries (chunk number as u64 little-endian, then the
//! 32-byte chunk hash; chunk numbers strictly increasing), then the BLAKE3
//! hash of everything before it. A torn or altered file fails that check.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::store::ChunkHash;
use crate::BackupError;

/// Version of the point file format.
pub const POINT_VERSION: u32 = 1;
const ENTRY: usize = 8 + 32;

/// One disk of a restore point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskMeta {
    /// The disk's index in the VM.
    pub disk: usize,
    /// The disk's size at the snapshot, in bytes.
    pub capacity: u64,
    /// Tracking granularity at the snapshot.
    pub granularity: u64,
    /// Bytes per chunk of this disk.
    pub chunk_size: u64,
    /// The snapshot's change ID: the next incremental queries since it.
    pub change_id: Option<String>,
    /// `full` or `incremental`.
    pub kind: String,
    /// Changed areas the query returned (for a full backup: allocated areas).
    pub changed_areas: u64,
    /// Their bytes.
    pub changed_bytes: u64,
    /// Non-zero chunks in the index.
    pub chunks: u64,
}

/// A restore point as listed: what `backup list` shows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PointMeta {
    /// Format version.
    pub version: u32,
    /// The point's ID (sortable).
    pub point: String,
    /// The VM backed up.
    pub vm: String,
    /// `full` if any disk was backed up in full, else `incremental`.
    pub kind: String,
    /// Why this kind.
    pub reason: String,
    /// The point an incremental was built on.
    pub parent: Option<String>,
    /// When the snapshot was taken, seconds since the Unix epoch.
    pub time: u64,
    /// The same, as `YYYY-MM-DDTHH:MM:SSZ`.
    pub time_utc: String,
    /// Seconds from the backup's start to its commit.
    pub seconds: f64,
    /// Bytes read from the snapshot.
    pub bytes_read: u64,
    /// Bytes of new chunk files written to the repository.
    pub bytes_stored: u64,
    /// Changed areas over all disks.
    pub changed_areas: u64,
    /// Their bytes.
    pub changed_bytes: u64,
    /// One per disk.
    pub disks: Vec<DiskMeta>,
}

/// A point with its index: per disk, sorted `(chunk number, hash)`.
#[derive(Debug, Clone)]
pub(crate) struct Point {
    pub meta: PointMeta,
    pub index: Vec<Vec<(u64, ChunkHash)>>,
}

impl Point {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = serde_json::to_vec(&self.meta).expect("a point header serialises");
        out.push(b'\n');
        for disk in &self.index {
            for (n, h) in disk {
                out.extend_from_slice(&n.to_le_bytes());
                out.extend_from_slice(&h.0);
            }
        }
        let sum = blake3::hash(&out);
        out.extend_from_slice(sum.as_bytes());
        out
    }

    pub fn decode(path: &Path, bytes: &[u8]) -> Result<Self, BackupError> {
        let bad = |reason: String| BackupError::CorruptPoint {
            path: path.to_owned(),
            reason,
        };
        if bytes.len() < 32 {
            return Err(bad(format!("{} bytes is too short", bytes.len())));
        }
        let (body, sum) = bytes.split_at(bytes.len() - 32);
        if blake3::hash(body).as_bytes() != sum {
            return Err(bad("checksum mismatch".into()));
        }
        let nl = body
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| bad("no header line".into()))?;
        let meta = parse_header(path, &body[..nl])?;
        let mut rest = &body[nl + 1..];
        let mut index = Vec::with_capacity(meta.disks.len());
        for d in &meta.disks {
            let n = usize::try_from(d.chunks).unwrap_or(usize::MAX);
            let need = n.checked_mul(ENTRY).filter(|&b| b <= rest.len());
            let Some(need) = need else {
                return Err(bad(format!("disk {} index is truncated", d.disk)));
            };
            let (mine, tail) = rest.split_at(need);
            rest = tail;
            let mut entries = Vec::with_capacity(n);
            let chunks_in_disk = d.capacity.div_ceil(d.chunk_size.max(1));
            for e in mine.chunks_exact(ENTRY) {
                let num = u64::from_le_bytes(e[..8].try_into().expect("8 bytes"));
                let hash = ChunkHash(e[8..].try_into().expect("32 bytes"));
                if entries.last().is_some_and(|&(p, _)| p >= num) || num >= chunks_in_disk {
                    return Err(bad(format!(
                        "disk {} index entry for chunk {num} is out of order or past the disk's end",
                        d.disk
                    )));
                }
                entries.push((num, hash));
            }
            index.push(entries);
        }
        if !rest.is_empty() {
            return Err(bad(format!("{} unexpected bytes after the index", rest.len())));
        }
        Ok(Self { meta, index })
    }
}

/// Parses and checks a point header (the first line of a point file).
pub(crate) fn parse_header(path: &Path, line: &[u8]) -> Result<PointMeta, BackupError> {
    let bad = |reason: String| BackupError::CorruptPoint {
        path: path.to_owned(),
        reason,
    };
    let meta: PointMeta = serde_json::from_slice(line).map_err(|e| bad(format!("header: {e}")))?;
    if meta.version != POINT_VERSION {
        return Err(bad(format!(
            "format version {} (expected {POINT_VERSION})",
            meta.version
        )));
    }
    for (i, d) in meta.disks.iter().enumerate() {
        if d.disk != i || d.chunk_size == 0 || !d.chunk_size.is_power_of_two() {
            return Err(bad(format!("disk entry {i} is malformed")));
        }
    }
    Ok(meta)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Point {
        let disk = |i, chunks| DiskMeta {
            disk: i,
            capacity: 10 << 20,
            granularity: 65536,
            chunk_size: 65536,
            change_id: Some("u/3".into()),
            kind: "full".into(),
            changed_areas: 1,
            changed_bytes: 65536,
            chunks,
        };
        Point {
            meta: PointMeta {
                version: POINT_VERSION,
                point: "00000001".into(),
                vm: "vm".into(),
                kind: "full".into(),
                reason: "first".into(),
                parent: None,
                time: 0,
                time_utc: String::new(),
                seconds: 0.5,
                bytes_read: 1,
                bytes_stored: 1,
                changed_areas: 1,
                changed_bytes: 1,
                disks: vec![disk(0, 2), disk(1, 1)],
            },
            index: vec![
                vec![(0, ChunkHash::of(b"a")), (7, ChunkHash::of(b"b"))],
                vec![(159, ChunkHash::of(b"c"))],
            ],
        }
    }

    #[test]
    fn round_trip() {
        let p = sample();
        let bytes = p.encode();
        let q = Point::decode(Path::new("x"), &bytes).unwrap();
        assert_eq!(q.meta, p.meta);
        assert_eq!(q.index, p.index);
    }

    #[test]
    fn any_flipped_byte_or_truncation_is_detected() {
        let bytes = sample().encode();
        for i in (0..bytes.len()).step_by(7) {
            let mut b = bytes.clone();
            b[i] ^= 0x20;
            assert!(Point::decode(Path::new("x"), &b).is_err(), "byte {i}");
        }
        assert!(Point::decode(Path::new("x"), &bytes[..bytes.len() - 1]).is_err());
    }

    #[test]
    fn entries_past_the_end_are_rejected() {
        let mut p = sample();
        p.index[1][0].0 = 160; // 10 MiB / 64 KiB = 160 chunks: 0..=159
        assert!(Point::decode(Path::new("x"), &p.encode()).is_err());
    }
}
