//! A VADP-style data-protection API: the types, the host's side of it, and the checked pager.
//!
//! The host (the `sim` crate) implements [`DataProtection`]: create and
//! remove snapshots, ask which areas of a snapshot's disk changed since a
//! change ID (`QueryChangedDiskAreas`), and read a snapshot's disk. The types
//! mirror VMware's: [`DiskChangeInfo`] covers a window of the disk and holds
//! at most a bounded number of [`DiskArea`]s; callers page.
//!
//! Paging by hand is how real backup tools lost data on disks over 2 TB
//! (they called once, from offset 0). [`changed_areas`] pages to the end by
//! itself and checks every window, so no caller has to.
//!
//! # Example
//! ```
//! use vadp::{changed_areas, DataProtection, DiskArea, DiskChangeInfo, VadpError, SnapshotInfo};
//!
//! /// A toy host: one disk of 10 MiB where 1 MiB at every 3 MiB changed,
//! /// answering at most 2 areas per call.
//! struct Toy;
//! impl DataProtection for Toy {
//!     fn query_changed_disk_areas(&self, _vm: &str, _snap: &str, _disk: usize, start: u64, _cid: &str)
//!         -> Result<DiskChangeInfo, VadpError> {
//!         let mib = 1 << 20;
//!         let all: Vec<DiskArea> = (0..4).map(|i| DiskArea { start: i * 3 * mib, length: mib }).collect();
//!         let page: Vec<DiskArea> = all.into_iter().filter(|a| a.start >= start).take(2).collect();
//!         let length = if page.len() == 2 { page[1].start + page[1].length - start } else { 10 * mib - start };
//!         Ok(DiskChangeInfo { start_offset: start, length, changed_area: page })
//!     }
//!     fn disk_capacity(&self, _vm: &str, _snap: &str, _disk: usize) -> Result<u64, VadpError> { Ok(10 << 20) }
//!     fn read_snapshot(&self, _: &str, _: &str, _: usize, _: u64, _: &mut [u8]) -> Result<(), VadpError> { Ok(()) }
//!     fn create_snapshot(&self, _: &str, _: &str) -> Result<SnapshotInfo, VadpError> { unimplemented!() }
//!     fn remove_snapshot(&self, _: &str, _: &str) -> Result<(), VadpError> { Ok(()) }
//!     fn enable_change_tracking(&self, _: &str) -> Result<(), VadpError> { Ok(()) }
//! }
//! let areas: Vec<DiskArea> = changed_areas(&Toy, "vm", "snap", 0, "*").collect::<Result<_, _>>()?;
//! assert_eq!(areas.len(), 4); // two pages, paged by the iterator
//! # Ok::<(), VadpError>(())
//! ```

use serde::{Deserialize, Serialize};

/// A changed area of a disk, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct DiskArea {
    /// First byte.
    pub start: u64,
    /// Bytes.
    pub length: u64,
}

impl DiskArea {
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.start + self.length
    }
}

/// One answer of `QueryChangedDiskAreas`: the window
/// `[start_offset, start_offset + length)` and the changed areas inside it,
/// sorted, non-overlapping and coalesced. The next call starts at
/// `start_offset + length`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskChangeInfo {
    /// Where the window starts.
    pub start_offset: u64,
    /// Bytes the window covers.
    pub length: u64,
    /// Changed areas inside the window.
    pub changed_area: Vec<DiskArea>,
}

/// A disk of a snapshot, as a backup application sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotDisk {
    /// The disk's index in the VM.
    pub disk: usize,
    /// The disk's size at the snapshot, in bytes.
    pub capacity: u64,
    /// The tracking granularity in bytes.
    pub granularity: u64,
    /// `backing.changeId`: absent when change tracking is off.
    pub change_id: Option<String>,
}

/// A snapshot, as returned by [`DataProtection::create_snapshot`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    /// The snapshot's name.
    pub name: String,
    /// One entry per disk.
    pub disks: Vec<SnapshotDisk>,
}

/// Why a data-protection call failed.
///
/// Each variant carries what it is about (which change ID, which snapshot);
/// [`kind`](Self::kind) gives a stable [`ErrorKind`] to match on. Anything
/// else the host reports is [`Host`](Self::Host), which keeps the host's own
/// error (and its `io::Error`, if any) as the source.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VadpError {
    /// No such VM, snapshot or disk.
    #[error("no {what} named {name:?}")]
    NotFound {
        /// What was looked for.
        what: NotFoundKind,
        /// Its name (a disk's index for a disk).
        name: String,
    },
    /// The change ID is not of the form `<uuid>/<sequence>` nor `*`.
    #[error("malformed change ID {change_id:?}: {reason}")]
    MalformedChangeId {
        /// What was given.
        change_id: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The change ID predates a tracking reset: the caller needs a full backup.
    #[error("change ID {change_id} is from before a tracking reset ({reason}); a full backup is needed")]
    TrackingReset {
        /// The rejected change ID.
        change_id: String,
        /// Why tracking was reset.
        reason: String,
    },
    /// The change ID was not issued for this disk.
    #[error("change ID {change_id} was not issued for this disk")]
    ForeignChangeId {
        /// The rejected change ID.
        change_id: String,
    },
    /// The change ID is newer than the snapshot queried.
    #[error("change ID {change_id} is newer than the snapshot being queried (sequence {at})")]
    ChangeIdAfterSnapshot {
        /// The rejected change ID.
        change_id: String,
        /// The snapshot's sequence.
        at: u64,
    },
    /// Change tracking is off.
    #[error("change tracking is not enabled on this disk")]
    TrackingDisabled,
    /// The start offset is at or past the disk's end.
    #[error("start offset {start} is at or beyond the disk's capacity of {capacity} bytes")]
    OffsetOutOfRange {
        /// Asked for.
        start: u64,
        /// The disk's size at the snapshot.
        capacity: u64,
    },
    /// A read past the end of the snapshot's disk.
    #[error("read of {len} bytes at {offset} goes past the end of the disk ({capacity} bytes)")]
    ReadOutOfRange {
        /// Where.
        offset: u64,
        /// How much.
        len: u64,
        /// The disk's size.
        capacity: u64,
    },
    /// The host broke a paging rule (an empty or out-of-order window).
    #[error("the host returned an invalid page: {reason}")]
    BadPage {
        /// Which rule, and where.
        reason: String,
    },
    /// Anything else the host reports, with the host's own error as the source.
    #[error(transparent)]
    Host(Box<dyn std::error::Error + Send + Sync>),
}

/// What a [`VadpError::NotFound`] looked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum NotFoundKind {
    /// A VM.
    Vm,
    /// A snapshot.
    Snapshot,
    /// A disk.
    Disk,
}

impl std::fmt::Display for NotFoundKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Vm => "VM",
            Self::Snapshot => "snapshot",
            Self::Disk => "disk",
        })
    }
}

/// The kind of a [`VadpError`]: stable, for callers to match on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// [`VadpError::NotFound`].
    NotFound,
    /// [`VadpError::MalformedChangeId`].
    MalformedChangeId,
    /// [`VadpError::TrackingReset`].
    TrackingReset,
    /// [`VadpError::ForeignChangeId`].
    ForeignChangeId,
    /// [`VadpError::ChangeIdAfterSnapshot`].
    ChangeIdAfterSnapshot,
    /// [`VadpError::TrackingDisabled`].
    TrackingDisabled,
    /// [`VadpError::OffsetOutOfRange`].
    OffsetOutOfRange,
    /// [`VadpError::ReadOutOfRange`].
    ReadOutOfRange,
    /// [`VadpError::BadPage`].
    BadPage,
    /// [`VadpError::Host`].
    Host,
}

impl VadpError {
    /// A host error with only a message (for hosts without an error type of their own).
    pub fn host(message: impl Into<String>) -> Self {
        Self::Host(message.into().into())
    }

    /// The kind of error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::NotFound { .. } => ErrorKind::NotFound,
            Self::MalformedChangeId { .. } => ErrorKind::MalformedChangeId,
            Self::TrackingReset { .. } => ErrorKind::TrackingReset,
            Self::ForeignChangeId { .. } => ErrorKind::ForeignChangeId,
            Self::ChangeIdAfterSnapshot { .. } => ErrorKind::ChangeIdAfterSnapshot,
            Self::TrackingDisabled => ErrorKind::TrackingDisabled,
            Self::OffsetOutOfRange { .. } => ErrorKind::OffsetOutOfRange,
            Self::ReadOutOfRange { .. } => ErrorKind::ReadOutOfRange,
            Self::BadPage { .. } => ErrorKind::BadPage,
            Self::Host(_) => ErrorKind::Host,
        }
    }

    /// Whether the right reaction is a full backup (the change ID is no good).
    pub fn needs_full_backup(&self) -> bool {
        matches!(
            self.kind(),
            ErrorKind::TrackingReset
                | ErrorKind::ForeignChangeId
                | ErrorKind::MalformedChangeId
                | ErrorKind::ChangeIdAfterSnapshot
        )
    }
}

/// The host side of the API: what a hypervisor offers a backup application.
pub trait DataProtection {
    /// `QueryChangedDiskAreas`: the areas of `disk` of `snapshot` that changed
    /// since `change_id` (`*` for every allocated area), in one window from
    /// `start_offset`. `start_offset >= capacity` is an error.
    fn query_changed_disk_areas(
        &self,
        vm: &str,
        snapshot: &str,
        disk: usize,
        start_offset: u64,
        change_id: &str,
    ) -> Result<DiskChangeInfo, VadpError>;

    /// The size of `disk` at `snapshot`, in bytes.
    fn disk_capacity(&self, vm: &str, snapshot: &str, disk: usize) -> Result<u64, VadpError>;

    /// Reads `buf.len()` bytes of `disk` of `snapshot` at `offset`.
    fn read_snapshot(
        &self,
        vm: &str,
        snapshot: &str,
        disk: usize,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), VadpError>;

    /// Creates a snapshot (the point a backup reads) and returns each disk's change ID.
    fn create_snapshot(&self, vm: &str, name: &str) -> Result<SnapshotInfo, VadpError>;

    /// Removes a snapshot, consolidating its delta.
    fn remove_snapshot(&self, vm: &str, name: &str) -> Result<(), VadpError>;

    /// Turns change tracking on for every disk of the VM (no-op when on).
    fn enable_change_tracking(&self, vm: &str) -> Result<(), VadpError>;
}

/// Every changed area of a snapshot's disk since `change_id`, paging through
/// `QueryChangedDiskAreas` to the end of the disk by itself.
///
/// Checks each window: it must start where the last ended, be non-empty, and
/// hold only sorted areas inside it; a host that breaks this yields
/// [`VadpError::BadPage`] instead of a silently short answer.
pub fn changed_areas<'a, H: DataProtection + ?Sized>(
    host: &'a H,
    vm: &'a str,
    snapshot: &'a str,
    disk: usize,
    change_id: &'a str,
) -> ChangedAreas<'a, H> {
    ChangedAreas {
        host,
        vm,
        snapshot,
        disk,
        change_id,
        next: 0,
        capacity: None,
        page: Vec::new().into_iter(),
        done: false,
        pages: 0,
    }
}

/// Iterator returned by [`changed_areas`].
#[derive(Debug)]
pub struct ChangedAreas<'a, H: ?Sized> {
    host: &'a H,
    vm: &'a str,
    snapshot: &'a str,
    disk: usize,
    change_id: &'a str,
    next: u64,
    capacity: Option<u64>,
    page: std::vec::IntoIter<DiskArea>,
    done: bool,
    pages: u64,
}

impl<H: DataProtection + ?Sized> ChangedAreas<'_, H> {
    /// `QueryChangedDiskAreas` calls made so far (how many pages the answer took).
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Starts paging at byte `offset` instead of 0 (an NBD block-status
    /// request asks about a range in the middle of the disk). The windows
    /// are checked the same way; an offset at or past the end yields nothing.
    pub fn starting_at(mut self, offset: u64) -> Self {
        self.next = offset;
        self
    }

    fn fetch(&mut self) -> Result<bool, VadpError> {
        let capacity = match self.capacity {
            Some(c) => c,
            None => {
                let c = self.host.disk_capacity(self.vm, self.snapshot, self.disk)?;
                self.capacity = Some(c);
                c
            }
        };
        if self.next >= capacity {
            return Ok(false);
        }
        self.pages += 1;
        let info = self
            .host
            .query_changed_disk_areas(self.vm, self.snapshot, self.disk, self.next, self.change_id)?;
        let end = info.start_offset.checked_add(info.length).filter(|&e| e <= capacity);
        let bad = |reason: String| Err(VadpError::BadPage { reason });
        if info.start_offset != self.next {
            return bad(format!(
                "window starts at {} but {} was asked",
                info.start_offset, self.next
            ));
        }
        let Some(end) = end.filter(|_| info.length > 0) else {
            return bad(format!(
                "window of {} bytes at {} on a disk of {capacity}",
                info.length, info.start_offset
            ));
        };
        let mut last = info.start_offset;
        for a in &info.changed_area {
            if a.length == 0 || a.start < last || a.end() > end {
                return bad(format!(
                    "area {}+{} is empty, unsorted or outside its window",
                    a.start, a.length
                ));
            }
            last = a.end();
        }
        self.next = end;
        self.page = info.changed_area.into_iter();
        Ok(true)
    }
}

impl<H: DataProtection + ?Sized> Iterator for ChangedAreas<'_, H> {
    type Item = Result<DiskArea, VadpError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(a) = self.page.next() {
                return Some(Ok(a));
            }
            if self.done {
                return None;
            }
            match self.fetch() {
                Ok(true) => {}
                Ok(false) => {
                    self.done = true;
                    return None;
                }
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
            }
        }
    }
}

/// Where a restore to a new VM writes: the host side, kept apart from
/// [`DataProtection`] (which only reads).
pub trait RestoreTarget {
    /// Creates VM `name` with these disks (it must not exist).
    fn create_vm(&self, name: &str, disks: &[RestoreDisk]) -> Result<(), VadpError>;
    /// Writes `data` at `offset` of `disk` of VM `vm`.
    fn write(&self, vm: &str, disk: usize, offset: u64, data: &[u8]) -> Result<(), VadpError>;
    /// Deletes VM `name` (a restore that failed after creating it cleans up).
    fn delete_vm(&self, name: &str) -> Result<(), VadpError>;
}

/// The shape of a disk to create for a restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreDisk {
    /// Capacity in bytes.
    pub capacity: u64,
    /// Tracking granularity in bytes.
    pub granularity: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A host answering from a script of pages (by start offset) on a disk of 100 bytes.
    struct Scripted(Vec<DiskChangeInfo>);

    impl DataProtection for Scripted {
        fn query_changed_disk_areas(
            &self,
            _vm: &str,
            _snapshot: &str,
            _disk: usize,
            start: u64,
            _change_id: &str,
        ) -> Result<DiskChangeInfo, VadpError> {
            match self.0.iter().find(|p| p.start_offset == start) {
                Some(p) => Ok(p.clone()),
                None => self
                    .0
                    .first()
                    .cloned()
                    .ok_or(VadpError::OffsetOutOfRange { start, capacity: 100 }),
            }
        }
        fn disk_capacity(&self, _: &str, _: &str, _: usize) -> Result<u64, VadpError> {
            Ok(100)
        }
        fn read_snapshot(&self, _: &str, _: &str, _: usize, _: u64, _: &mut [u8]) -> Result<(), VadpError> {
            Ok(())
        }
        fn create_snapshot(&self, _: &str, _: &str) -> Result<SnapshotInfo, VadpError> {
            Err(VadpError::host("not in this script"))
        }
        fn remove_snapshot(&self, _: &str, _: &str) -> Result<(), VadpError> {
            Ok(())
        }
        fn enable_change_tracking(&self, _: &str) -> Result<(), VadpError> {
            Ok(())
        }
    }

    fn page(start_offset: u64, length: u64, areas: &[(u64, u64)]) -> DiskChangeInfo {
        DiskChangeInfo {
            start_offset,
            length,
            changed_area: areas
                .iter()
                .map(|&(start, length)| DiskArea { start, length })
                .collect(),
        }
    }

    fn run(pages: Vec<DiskChangeInfo>) -> Result<Vec<(u64, u64)>, VadpError> {
        changed_areas(&Scripted(pages), "vm", "s", 0, "*")
            .map(|a| a.map(|a| (a.start, a.length)))
            .collect()
    }

    #[test]
    fn pages_to_the_end_of_the_disk() {
        let got = run(vec![
            page(0, 30, &[(0, 10), (20, 10)]),
            page(30, 40, &[(60, 10)]),
            page(70, 30, &[]),
        ]);
        assert_eq!(got.unwrap(), vec![(0, 10), (20, 10), (60, 10)]);
    }

    #[test]
    fn a_host_breaking_a_paging_rule_gets_bad_page() {
        for (why, pages) in [
            ("empty window", vec![page(0, 0, &[])]),
            ("window past the end", vec![page(0, 101, &[])]),
            ("window starting elsewhere", vec![page(0, 50, &[]), page(40, 60, &[])]),
            ("area outside its window", vec![page(0, 50, &[(40, 20)])]),
            ("unsorted areas", vec![page(0, 100, &[(50, 10), (10, 10)])]),
            ("empty area", vec![page(0, 100, &[(50, 0)])]),
        ] {
            let e = run(pages).expect_err(why);
            assert_eq!(e.kind(), ErrorKind::BadPage, "{why}: {e}");
        }
    }

    #[test]
    fn kinds_and_full_backup() {
        let reset = VadpError::TrackingReset {
            change_id: "u/3".into(),
            reason: "the host did not shut down cleanly".into(),
        };
        assert_eq!(reset.kind(), ErrorKind::TrackingReset);
        assert!(reset.needs_full_backup());
        assert!(reset.to_string().contains("u/3") && reset.to_string().contains("full backup"));
        let missing = VadpError::NotFound {
            what: NotFoundKind::Snapshot,
            name: "s9".into(),
        };
        assert_eq!(missing.to_string(), "no snapshot named \"s9\"");
        assert!(!missing.needs_full_backup());
        assert!(!VadpError::TrackingDisabled.needs_full_backup());
        let io = VadpError::Host(Box::new(std::io::Error::other("disk on fire")));
        assert_eq!(io.kind(), ErrorKind::Host);
        assert_eq!(io.to_string(), "disk on fire");
    }
}
