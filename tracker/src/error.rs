//! Typed errors of the tracker.

use std::io;
use std::path::PathBuf;

use crate::ChangeId;

/// Opening, creating or persisting a change-tracking file failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrackerError {
    /// An I/O error on the change-tracking file.
    #[error("change-tracking file {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The file is not a change-tracking file this version understands.
    #[error("change-tracking file {path} is invalid: {reason}")]
    BadFile {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// Another process (or handle) has the file open.
    #[error("change-tracking file {path} is in use by another process")]
    InUse {
        /// The file.
        path: PathBuf,
    },
    /// The granularity is not a power of two from 512 B to 1 GiB.
    #[error("granularity {0} is not a power of two from 512 B to 1 GiB")]
    BadGranularity(u64),
    /// The capacity is above what the tracker supports.
    #[error("capacity {capacity} bytes is above the maximum of {max} bytes")]
    CapacityTooLarge {
        /// Asked for.
        capacity: u64,
        /// The limit.
        max: u64,
    },
    /// A disk never shrinks.
    #[error("cannot shrink a tracked disk from {from} to {to} bytes")]
    Shrink {
        /// Current capacity.
        from: u64,
        /// Asked for.
        to: u64,
    },
    /// More distinct snapshot sequences pinned than the header holds.
    #[error("at most {0} snapshots of a disk can be live at once")]
    TooManyPins(usize),
    /// An epoch counter would overflow its 32-bit field.
    #[error("the disk has used all 2^32 epochs; reset change tracking")]
    EpochsExhausted,
}

/// Why a changed-areas query could not be answered. Callers match on this.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum QueryError {
    /// Change tracking is off for this disk.
    #[error("change tracking is not enabled on this disk")]
    TrackingDisabled,
    /// The change ID belongs to a tracking session that has since been reset.
    #[error("change ID {change_id} is from before a tracking reset ({reason}); a full backup is needed")]
    TrackingReset {
        /// The rejected change ID.
        change_id: ChangeId,
        /// Why tracking was reset.
        reason: String,
    },
    /// The change ID was never issued for this disk.
    #[error("change ID {0} was not issued for this disk")]
    ForeignChangeId(ChangeId),
    /// The change ID's sequence is after the point being queried.
    #[error("change ID {change_id} is newer than the snapshot being queried (sequence {at})")]
    ChangeIdAfterSnapshot {
        /// The rejected change ID.
        change_id: ChangeId,
        /// The snapshot's sequence.
        at: u64,
    },
    /// The snapshot's point is no longer kept (it was removed).
    #[error("sequence {0} is not a live snapshot of this disk")]
    PointNotRetained(u64),
    /// The start offset is at or past the end of the disk.
    #[error("start offset {start} is at or beyond the disk's capacity of {capacity} bytes")]
    OffsetOutOfRange {
        /// Asked for.
        start: u64,
        /// The capacity at the queried point.
        capacity: u64,
    },
}
