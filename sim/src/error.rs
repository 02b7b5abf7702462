//! Typed errors of the simulated host.

use std::io;
use std::path::PathBuf;

use tracker::{ParseChangeIdError, QueryError, TrackerError};

/// What went wrong in a host operation. Every message names what was wrong.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SimError {
    /// No VM of that name in the datastore.
    #[error("no VM named {0:?} in the datastore")]
    NoSuchVm(String),
    /// A VM of that name exists already.
    #[error("a VM named {0:?} already exists")]
    VmExists(String),
    /// Another process (or handle) has the VM open.
    #[error("VM {0:?} is in use by another process")]
    VmInUse(String),
    /// A name with characters we do not allow.
    #[error("invalid name {0:?}: use 1-64 letters, digits, '-', '_' or '.', not starting with '.'")]
    BadName(String),
    /// No such disk.
    #[error("VM {vm:?} has no disk {disk} (it has {count})")]
    NoSuchDisk {
        /// The VM.
        vm: String,
        /// Asked for.
        disk: usize,
        /// How many it has.
        count: usize,
    },
    /// No such snapshot.
    #[error("VM {vm:?} has no snapshot named {name:?}")]
    NoSuchSnapshot {
        /// The VM.
        vm: String,
        /// Asked for.
        name: String,
    },
    /// A snapshot of that name exists already.
    #[error("VM {vm:?} already has a snapshot named {name:?}")]
    SnapshotExists {
        /// The VM.
        vm: String,
        /// Asked for.
        name: String,
    },
    /// Too many snapshots.
    #[error("VM {0:?} already has the maximum of 32 snapshots")]
    TooManySnapshots(String),
    /// An I/O range outside the disk; nothing was changed.
    #[error("I/O of {len} bytes at offset {offset} is outside disk {disk} ({capacity} bytes)")]
    OutOfRange {
        /// The disk.
        disk: usize,
        /// Where.
        offset: u64,
        /// How much.
        len: u64,
        /// The disk's size.
        capacity: u64,
    },
    /// The VM is powered off; guest I/O is refused.
    #[error("VM {0:?} is powered off")]
    PoweredOff(String),
    /// A disk size that is not allowed.
    #[error("invalid disk size {size}: {reason}")]
    BadSize {
        /// Asked for.
        size: u64,
        /// Why not.
        reason: String,
    },
    /// The change-tracking layer failed.
    #[error(transparent)]
    Tracker(#[from] TrackerError),
    /// A changed-areas query could not be answered.
    #[error(transparent)]
    Query(#[from] QueryError),
    /// A data-protection API call failed.
    #[error(transparent)]
    Vadp(#[from] vadp::VadpError),
    /// A change ID that does not parse.
    #[error(transparent)]
    ChangeId(#[from] ParseChangeIdError),
    /// File I/O failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A configuration file is damaged.
    #[error("{path}: {reason}")]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

impl From<SimError> for vadp::VadpError {
    fn from(e: SimError) -> Self {
        use vadp::VadpError as V;
        let msg = e.to_string();
        match e {
            SimError::NoSuchVm(_) | SimError::NoSuchDisk { .. } | SimError::NoSuchSnapshot { .. } => V::NotFound(msg),
            SimError::ChangeId(_) => V::MalformedChangeId(msg),
            SimError::Vadp(v) => v,
            SimError::Query(q) => match q {
                QueryError::TrackingDisabled => V::TrackingDisabled,
                QueryError::TrackingReset { .. } => V::TrackingReset(msg),
                QueryError::ForeignChangeId(_) => V::ForeignChangeId(msg),
                QueryError::ChangeIdAfterSnapshot { .. } => V::ChangeIdAfterSnapshot(msg),
                QueryError::OffsetOutOfRange { start, capacity } => V::OffsetOutOfRange { start, capacity },
                _ => V::Host(msg),
            },
            SimError::OutOfRange {
                offset, len, capacity, ..
            } => V::ReadOutOfRange { offset, len, capacity },
            _ => V::Host(msg),
        }
    }
}
