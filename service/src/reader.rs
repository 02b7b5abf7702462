//! What read-only requests (snapshot list, query, vm show) read a VM
//! through: the VM the service keeps open, or, in a service of one command
//! ([`Service::local`](crate::Service::local)), a read-only view
//! ([`sim::VmView`]) that takes the VM's locks shared and writes nothing, so
//! readers do not exclude each other.

use std::sync::Arc;

use sim::{SimError, SnapshotSummary, Vm, VmView};
use vadp::DataProtection;

use crate::action::{DiskDetails, SnapshotEntry, VmDetails};

/// A VM opened for reading.
pub(crate) enum Reader {
    /// Open for writing too (the service's own handle).
    Open(Arc<Vm>),
    /// Opened read-only.
    View(VmView),
}

impl Reader {
    /// The VM's snapshots, oldest first.
    pub(crate) fn snapshots(&self) -> Vec<SnapshotSummary> {
        match self {
            Reader::Open(v) => v.snapshots(),
            Reader::View(v) => v.snapshots(),
        }
    }

    /// The capacity of `disk` at snapshot `snap`.
    pub(crate) fn snapshot_capacity(&self, snap: &str, disk: usize) -> Result<u64, SimError> {
        match self {
            Reader::Open(v) => v.snapshot_capacity(snap, disk),
            Reader::View(v) => v.snapshot_capacity(snap, disk),
        }
    }

    /// The tracking granularity of `disk` in bytes.
    pub(crate) fn granularity(&self, disk: usize) -> Result<u64, SimError> {
        match self {
            Reader::Open(v) => Ok(v.granularity(disk)?.bytes()),
            Reader::View(v) => v.granularity(disk),
        }
    }

    /// The data-protection API of the VM (queries; a view refuses writes).
    pub(crate) fn protection(&self) -> &dyn DataProtection {
        match self {
            Reader::Open(v) => &**v,
            Reader::View(v) => v,
        }
    }

    /// Everything `vm show` tells about the VM.
    pub(crate) fn details(&self) -> Result<VmDetails, SimError> {
        let (name, powered_on, cbt, count) = match self {
            Reader::Open(v) => (v.name().to_owned(), v.powered_on(), v.cbt(), v.disk_count()),
            Reader::View(v) => {
                let c = v.config();
                (c.name.clone(), c.powered_on, c.cbt, c.disks.len())
            }
        };
        let mut disks = Vec::with_capacity(count);
        for d in 0..count {
            let (capacity, change_id, layers, allocated_bytes) = match self {
                Reader::Open(v) => {
                    let t = v.tracker(d)?;
                    (
                        v.capacity(d)?,
                        t.change_id(t.last_closed()).map(|c| c.to_string()),
                        v.chain_len(d)?,
                        v.allocated_bytes(d)?,
                    )
                }
                Reader::View(v) => (
                    v.config().disks[d].capacity,
                    v.current_change_id(d)?,
                    v.chain_len(d)?,
                    v.allocated_bytes(d)?,
                ),
            };
            disks.push(DiskDetails {
                disk: d,
                capacity,
                granularity: self.granularity(d)?,
                change_id,
                layers,
                allocated_bytes,
            });
        }
        let snapshots: Vec<SnapshotEntry> = self.snapshots().into_iter().map(SnapshotEntry::from).collect();
        let consolidation_needed = disks.iter().any(|d| d.layers > snapshots.len() + 1);
        Ok(VmDetails {
            name,
            powered_on,
            cbt,
            disks,
            snapshots,
            consolidation_needed,
        })
    }
}
