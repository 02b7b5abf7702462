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

/// Typed all the way: each error the API names becomes its variant, with its
/// data; everything else is [`VadpError::Host`](vadp::VadpError::Host) with
/// this error (and its `io::Error`, if any) kept as the source.
impl From<SimError> for vadp::VadpError {
    fn from(e: SimError) -> Self {
        use vadp::{NotFoundKind, VadpError as V};
        match e {
            SimError::NoSuchVm(name) => V::NotFound {
                what: NotFoundKind::Vm,
                name,
            },
            SimError::NoSuchSnapshot { name, .. } => V::NotFound {
                what: NotFoundKind::Snapshot,
                name,
            },
            SimError::NoSuchDisk { disk, .. } => V::NotFound {
                what: NotFoundKind::Disk,
                name: disk.to_string(),
            },
            SimError::ChangeId(p) => V::MalformedChangeId {
                change_id: p.input,
                reason: p.reason.to_owned(),
            },
            SimError::Vadp(v) => v,
            SimError::Query(q) => match q {
                QueryError::TrackingDisabled => V::TrackingDisabled,
                QueryError::TrackingReset { change_id, reason } => V::TrackingReset {
                    change_id: change_id.to_string(),
                    reason,
                },
                QueryError::ForeignChangeId(id) => V::ForeignChangeId {
                    change_id: id.to_string(),
                },
                QueryError::ChangeIdAfterSnapshot { change_id, at } => V::ChangeIdAfterSnapshot {
                    change_id: change_id.to_string(),
                    at,
                },
                QueryError::OffsetOutOfRange { start, capacity } => V::OffsetOutOfRange { start, capacity },
                q => V::Host(Box::new(SimError::Query(q))),
            },
            SimError::OutOfRange {
                offset, len, capacity, ..
            } => V::ReadOutOfRange { offset, len, capacity },
            e => V::Host(Box::new(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vadp::{ErrorKind, NotFoundKind, VadpError};

    #[test]
    fn errors_keep_their_kind_data_and_source() {
        let v = VadpError::from(SimError::NoSuchSnapshot {
            vm: "web".into(),
            name: "s1".into(),
        });
        assert!(matches!(
            &v,
            VadpError::NotFound { what: NotFoundKind::Snapshot, name } if name == "s1"
        ));
        let id: tracker::ChangeId = "52dec081-0000-4000-8000-000000000001/7".parse().unwrap();
        let v = VadpError::from(SimError::Query(QueryError::ChangeIdAfterSnapshot {
            change_id: id,
            at: 3,
        }));
        assert!(matches!(&v, VadpError::ChangeIdAfterSnapshot { change_id, at: 3 } if *change_id == id.to_string()));
        assert!(v.needs_full_backup());
        let v = VadpError::from(SimError::ChangeId("x/1".parse::<tracker::ChangeId>().unwrap_err()));
        assert!(matches!(&v, VadpError::MalformedChangeId { change_id, .. } if change_id == "x/1"));
        // An I/O error stays the source, under the host's own error.
        let v = VadpError::from(SimError::Io {
            path: "/ds/vm/disk0/L0.0000.ext".into(),
            source: io::Error::other("disk on fire"),
        });
        assert_eq!(v.kind(), ErrorKind::Host);
        assert!(v.to_string().contains("L0.0000.ext"), "{v}");
        let source = std::error::Error::source(&v).expect("the io::Error is the source");
        assert!(source.downcast_ref::<io::Error>().is_some());
    }
}
