//! A backup client over [`DataProtection`](vadp::DataProtection): full and
//! incremental backups of VMs into a deduplicating repository, restore,
//! verification and pruning.
//!
//! # The flow (the real VADP order)
//! [`backup_vm`] turns change tracking on, creates a snapshot, and for each
//! disk asks `QueryChangedDiskAreas` for the areas changed since the change
//! ID stored with the VM's previous point (`*`, the allocated areas, for a
//! first or forced full backup). It reads those areas from the snapshot,
//! stores their chunks, commits a new point that records the snapshot's
//! change IDs, and removes the snapshot, on error paths too. A change ID the
//! host rejects ([`VadpError::needs_full_backup`](vadp::VadpError::needs_full_backup):
//! tracking reset, foreign ID...) makes that disk's backup full, and the
//! point's `reason` says why: an incremental is never built on a bad ID.
//!
//! # Design
//! ```text
//! REPO/
//!   repo.json                      format marker and version
//!   lock                           flock: exclusive for backup and prune, shared for verify
//!   readers.lock                   flock: shared for restores and mounted points, tried by prune
//!   chunks/ab/ab12...ef            one file per chunk, named by the BLAKE3 of its content
//!   bad/ab12...ef                  a chunk verify found corrupt, moved aside (empty: found missing)
//!   points/00000007.point          one restore point: JSON header, chunk index, checksum
//!   pending/VM.json                the snapshot of a backup in progress (cleaned up next run)
//!   tmp/                           files being written (renamed into place when complete)
//! ```
//! - **Chunks** are fixed-size pieces of a disk: chunk `n` covers bytes
//!   `[n*c, (n+1)*c)` with `c = clamp(granularity, 64 KiB, 1 MiB)`. With a
//!   granularity of 64 KiB or more a chunk divides a tracking block, so an
//!   incremental reads exactly the changed areas; with a finer granularity a
//!   changed area is read out to whole 64 KiB chunks. All-zero chunks are not
//!   stored. A chunk file is a tag byte (0 raw, 1 zstd) and the data; its
//!   name is the hash of the uncompressed data, so equal chunks of any point
//!   or VM are stored once.
//! - **Points** ([`PointMeta`]) hold, per disk, a sorted index from chunk
//!   number to chunk hash, so every point is a complete image: an incremental
//!   point is its parent's index with the changed chunks replaced (or
//!   dropped, when they became zero). A chunk missing from the index reads
//!   as zeros.
//! - **Commit**: chunks are written to `tmp/` and renamed into `chunks/`;
//!   one `syncfs` makes them durable; then the point file is written to
//!   `tmp/`, fsynced, renamed into `points/` and the directory fsynced. A
//!   backup killed at any moment leaves every committed point as it was;
//!   the chunks it wrote are orphans that [`prune`] collects. A backup
//!   deduplicates only against chunks that a committed point references (or
//!   that it wrote itself), never against an orphan that a crash may have
//!   left incomplete.
//! - **Prune** deletes point files first, then the chunks no remaining point
//!   references; killed half-way it leaves fewer points and some orphans,
//!   never a point with a missing chunk. Keep policies ([`PrunePolicy`]) are
//!   those of Proxmox Backup Server: `keep-last`, then `keep-daily`, then
//!   `keep-weekly`, each per VM (days and ISO weeks in UTC). Every point is a
//!   complete index, so every point prune keeps restores on its own.
//! - **Bad chunks**: [`verify`] moves a chunk whose content does not match
//!   its name into `bad/` (and records a missing one there), as Proxmox
//!   Backup Server does. A backup never deduplicates against a chunk that is
//!   marked bad or absent from `chunks/`: it stores it again, and once that
//!   copy is durable the mark is cleared, which heals every older point that
//!   references the same chunk. An incremental whose parent references a
//!   bad chunk is made full instead. A chunk damaged since the last verify is
//!   not known bad: a backup deduplicates against it like any stored chunk.
//!
//! # Limitations
//! - A disk extended since the previous point: the range past the old
//!   capacity that the host does not report as changed is zeros in the new
//!   point (the host's contract: a new range reads as zeros until written).
//! - A disk that shrank or whose granularity changed gets a full backup.
//! - `syncfs` flushes the whole file system the repository lives on, which
//!   may include a datastore's dirty pages; on other systems than Linux each
//!   chunk file is fsynced.
//! - A restore to a new VM that fails half-way deletes that VM (where the
//!   deletion fails too, the error names the partly written VM); every chunk's
//!   presence is checked before the VM is created.
//!
//! # Example
//! A repository, checked, with a [`Progress`] that counts the bytes it is told about
//! (a backup needs a host: see `harness::demo` or the `cbtsim backup` command):
//! ```
//! use std::sync::atomic::{AtomicU64, Ordering};
//! use backup::{Progress, Repository};
//!
//! #[derive(Default)]
//! struct Bytes(AtomicU64);
//! impl Progress for Bytes {
//!     fn advance(&self, n: u64) {
//!         self.0.fetch_add(n, Ordering::Relaxed);
//!     }
//! }
//!
//! let dir = tempfile::tempdir()?;
//! let repo = Repository::create_or_open(&dir.path().join("repo"))?;
//! let seen = Bytes::default();
//! let report = backup::verify(&repo, &seen)?;
//! assert!(report.ok && report.points == 0);
//! assert_eq!(seen.0.load(Ordering::Relaxed), 0, "an empty repository has no chunk bytes");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod image;
mod list;
mod point;
mod prune;
mod repo;
mod restore;
mod run;
mod store;
mod verify;

use std::path::PathBuf;

pub use image::PointImage;
pub use list::{list, PointListing};
pub use point::{DiskMeta, PointMeta};
pub use prune::{prune, PrunePolicy, PruneReport};
pub use repo::Repository;
pub use restore::{restore_to_file, restore_to_vm, RestoreReport};
pub use run::{backup_vm, BackupOptions, BackupReport, Compression};
pub use store::ChunkHash;
pub use verify::{repair, verify, RepairReport, VerifyReport};

use vadp::VadpError;

/// Smallest chunk: a finer tracking granularity is read out to this size.
pub const MIN_CHUNK: u64 = 64 << 10;
/// Largest chunk: a coarser granularity is split into chunks of this size.
pub const MAX_CHUNK: u64 = 1 << 20;

/// The chunk size used for a disk of tracking granularity `granularity`.
pub fn chunk_size(granularity: u64) -> u64 {
    granularity.clamp(MIN_CHUNK, MAX_CHUNK)
}

/// What went wrong in a backup, restore, verify or prune.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackupError {
    /// A file-system operation failed.
    #[error("{op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On which file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The host refused a data-protection call.
    #[error("{op} failed")]
    Host {
        /// Which call, on what.
        op: String,
        /// The host's answer.
        #[source]
        source: VadpError,
    },
    /// The directory is not a backup repository (or one of another version).
    #[error("{path} is not a cbtsim backup repository: {reason}")]
    NotARepository {
        /// The directory.
        path: PathBuf,
        /// Why not.
        reason: String,
    },
    /// No point with this ID.
    #[error("no restore point {0:?} in the repository")]
    NoSuchPoint(String),
    /// The point has no such disk.
    #[error("point {point} has {count} disk(s); there is no disk {disk}")]
    NoSuchDisk {
        /// The point.
        point: String,
        /// Asked for.
        disk: usize,
        /// Disks in the point.
        count: usize,
    },
    /// A point file is unreadable or fails its checksum.
    #[error("restore point file {path} is corrupt: {reason}")]
    CorruptPoint {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A chunk a point references is not in the repository.
    #[error("chunk {0} is missing from the repository")]
    MissingChunk(ChunkHash),
    /// A chunk verify found corrupt (or missing) and moved aside into `bad/`.
    #[error("chunk {0} was marked bad by verify (moved to bad/); a backup that reads the same data stores it again")]
    BadChunk(ChunkHash),
    /// Another process holds what this operation needs.
    #[error("the repository is busy: {0}")]
    Busy(String),
    /// The target file exists and the caller did not ask to replace it.
    #[error("{0} already exists")]
    Exists(PathBuf),
    /// A chunk's content does not match its name, or cannot be decoded.
    #[error("chunk {hash} is corrupt: {reason}")]
    CorruptChunk {
        /// The chunk.
        hash: ChunkHash,
        /// What is wrong.
        reason: String,
    },
    /// The point was committed but the backup snapshot could not be removed.
    #[error("point {point} was committed, but snapshot {snapshot:?} could not be removed (the next backup retries)")]
    SnapshotNotRemoved {
        /// The committed point.
        point: String,
        /// The snapshot left on the VM.
        snapshot: String,
        /// The host's answer.
        #[source]
        source: Box<VadpError>,
    },
    /// A restore to a new VM failed after the VM was created; the VM was deleted.
    #[error("restore into VM {vm:?} failed; the partly written VM was deleted")]
    RestoreFailed {
        /// The new VM.
        vm: String,
        /// What failed.
        #[source]
        source: Box<BackupError>,
    },
    /// A restore to a new VM failed after the VM was created, and deleting it failed too.
    #[error("restore into VM {vm:?} failed and the VM could not be deleted ({delete_error}); it is partly written: delete it")]
    PartialRestore {
        /// The new VM.
        vm: String,
        /// What failed.
        #[source]
        source: Box<BackupError>,
        /// Why it could not be deleted.
        delete_error: String,
    },
    /// A caller's argument is out of range.
    #[error("{0}")]
    InvalidArgument(String),
}

impl BackupError {
    pub(crate) fn io(op: &'static str, path: &std::path::Path) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.to_owned();
        move |source| Self::Io { op, path, source }
    }

    pub(crate) fn host(op: impl Into<String>) -> impl FnOnce(VadpError) -> Self {
        let op = op.into();
        move |source| Self::Host { op, source }
    }
}

/// Progress of a long operation: the one progress mechanism of the workspace.
///
/// An operation runs one or more *phases* (a disk to back up, a drive of a VM, a trace
/// to replay): [`begin`](Self::begin) names a phase and says how many units it has when
/// that is known, [`advance`](Self::advance) counts units done, [`note`](Self::note) says
/// how it is going in words, [`end`](Self::end) closes it. The operation picks the unit
/// and says which in its docs: the backup client counts bytes, the harness counts ops or
/// records. The command line draws an indicatif bar; `()` reports nothing. Calls may come
/// from several threads at once.
///
/// It lives here because the backup client is the lowest crate with a long operation to
/// report; the harness (drives, replays, scenarios, the torture verifier) uses the same
/// trait, so that the command line has one progress bar to implement.
pub trait Progress: Sync {
    /// A phase starts: `label` names it; `total` is how many units it has, if known.
    fn begin(&self, _label: &str, _total: Option<u64>) {}
    /// `n` more units are done.
    fn advance(&self, _n: u64) {}
    /// How the phase is going, in a few words.
    fn note(&self, _note: &str) {}
    /// The phase is over.
    fn end(&self) {}
    /// Whether the operation should stop (the user pressed Ctrl-C). Operations that
    /// may run long ask between steps and stop with an error that says so, after
    /// cleaning up what they made.
    fn cancelled(&self) -> bool {
        false
    }
}

impl Progress for () {}

/// `(year, month, day)` of day `days` since 1970-01-01 (Howard Hinnant's civil_from_days).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Days since 1970-01-01 of `(year, month, day)` (Howard Hinnant's days_from_civil).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `YYYY-MM-DDTHH:MM:SSZ` (ISO 8601, UTC) for seconds since the Unix epoch.
pub fn format_utc(secs: u64) -> String {
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    let rem = secs % 86_400;
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// The UTC day of `secs` since the Unix epoch, `YYYY-MM-DD`.
pub fn utc_day(secs: u64) -> String {
    format_utc(secs)[..10].to_owned()
}

/// The ISO 8601 week of `secs` since the Unix epoch (UTC), `YYYY-Www`: weeks
/// start on Monday, and week 1 is the one with the year's first Thursday.
pub fn iso_week(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    // 1970-01-01 was a Thursday: Monday = 0.
    let weekday = (days + 3).rem_euclid(7);
    let thursday = days - weekday + 3;
    let (year, _, _) = civil_from_days(thursday);
    let week = (thursday - days_from_civil(year, 1, 1)) / 7 + 1;
    format!("{year:04}-W{week:02}")
}

#[cfg(test)]
mod tests {
    use crate::*;

    #[test]
    fn chunk_sizes_clamp_the_granularity() {
        assert_eq!(chunk_size(512), 64 << 10);
        assert_eq!(chunk_size(64 << 10), 64 << 10);
        assert_eq!(chunk_size(256 << 10), 256 << 10);
        assert_eq!(chunk_size(1 << 30), 1 << 20);
    }

    #[test]
    fn iso_weeks() {
        let at = |y, m, d| (days_from_civil(y, m, d) * 86_400 + 3600) as u64;
        assert_eq!(iso_week(at(1970, 1, 1)), "1970-W01");
        assert_eq!(
            iso_week(at(2021, 1, 3)),
            "2020-W53",
            "a Sunday belongs to the week before"
        );
        assert_eq!(iso_week(at(2021, 1, 4)), "2021-W01");
        assert_eq!(iso_week(at(2024, 12, 30)), "2025-W01", "a Monday of the next ISO year");
        assert_eq!(iso_week(at(2026, 11, 24)), "2026-W48");
        assert_eq!(utc_day(at(2000, 2, 29)), "2000-02-29");
        for days in [0, 10_957, 20_000, 30_000] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }

    #[test]
    fn utc_dates() {
        assert_eq!(format_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(format_utc(1_795_545_000), "2026-11-24T18:30:00Z");
    }
}
