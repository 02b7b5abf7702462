//! A VM opened read-only: what `snapshot list`, `vm show` and `query` need, with nothing
//! written (no lock taken exclusively, no tracker header marked in use, no mtime touched).

use std::fs::File;
use std::path::Path;

use tracker::{Since, TrackerView};
use vadp::{DataProtection, DiskChangeInfo, SnapshotDisk, SnapshotInfo, VadpError};

use crate::config::{SnapshotDiskConfig, VmConfig};
use crate::error::SimError;
use crate::vm::{SnapshotSummary, DEFAULT_MAX_AREAS};

/// A VM of the datastore opened for reading only ([`Host::view`](crate::Host::view)).
///
/// It takes the VM's lock and its trackers' locks shared: it fails with
/// [`SimError::VmInUse`] while a process has the VM open for writing, and readers do
/// not exclude each other. It reads the configuration once; its trackers answer as a
/// writable open would (a tracker not closed cleanly reads as reset), in memory only.
/// A snapshot whose epoch a crash left open (which a writable open closes) has no
/// change ID in a view.
#[derive(Debug)]
pub struct VmView {
    cfg: VmConfig,
    trackers: Vec<TrackerView>,
    allocated: Vec<u64>,
    _lock: File,
}

impl VmView {
    pub(crate) fn open(dir: &Path) -> Result<Self, SimError> {
        let cfg = VmConfig::load(&dir.join("vm.json"))?;
        let path = dir.join("vm.lock");
        let io = |source| SimError::Io {
            path: path.clone(),
            source,
        };
        let lock = File::open(&path).map_err(io)?;
        match lock.try_lock_shared() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Err(SimError::VmInUse(cfg.name.clone())),
            Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
        }
        let mut trackers = Vec::new();
        let mut allocated = Vec::new();
        for i in 0..cfg.disks.len() {
            let ddir = dir.join(format!("disk{i}"));
            trackers.push(TrackerView::open(&ddir.join("disk.ctk"))?);
            allocated.push(layer_bytes(&ddir));
        }
        Ok(Self {
            cfg,
            trackers,
            allocated,
            _lock: lock,
        })
    }

    /// The configuration as read.
    pub fn config(&self) -> &VmConfig {
        &self.cfg
    }

    /// The VM's name.
    pub fn name(&self) -> &str {
        &self.cfg.name
    }

    /// The tracking granularity of `disk`, in bytes.
    pub fn granularity(&self, disk: usize) -> Result<u64, SimError> {
        Ok(self.tracker(disk)?.granularity().bytes())
    }

    /// Layers of `disk`'s chain (the base and its deltas).
    pub fn chain_len(&self, disk: usize) -> Result<usize, SimError> {
        self.tracker(disk)?;
        Ok(self.cfg.disks[disk].chain.len())
    }

    /// Bytes the layers of `disk` occupy in the datastore.
    pub fn allocated_bytes(&self, disk: usize) -> Result<u64, SimError> {
        self.tracker(disk)?;
        Ok(self.allocated[disk])
    }

    /// The change ID of `disk`'s newest closed epoch (its newest snapshot's), if
    /// tracking is on and it belongs to the current session.
    pub fn current_change_id(&self, disk: usize) -> Result<Option<String>, SimError> {
        let t = self.tracker(disk)?;
        Ok(t.change_id(t.last_closed()).map(|c| c.to_string()))
    }

    /// The capacity of `disk` at snapshot `snap`.
    pub fn snapshot_capacity(&self, snap: &str, disk: usize) -> Result<u64, SimError> {
        Ok(self.snap_disk(snap, disk)?.capacity)
    }

    /// The snapshots, oldest first.
    pub fn snapshots(&self) -> Vec<SnapshotSummary> {
        self.cfg
            .snapshots
            .iter()
            .map(|s| SnapshotSummary {
                name: s.name.clone(),
                created: s.created,
                disks: s
                    .disks
                    .iter()
                    .enumerate()
                    .map(|(i, sd)| SnapshotDisk {
                        disk: i,
                        capacity: sd.capacity,
                        granularity: self.trackers[i].granularity().bytes(),
                        change_id: self.trackers[i].change_id(sd.seq).map(|c| c.to_string()),
                    })
                    .collect(),
            })
            .collect()
    }

    fn tracker(&self, disk: usize) -> Result<&TrackerView, SimError> {
        self.trackers.get(disk).ok_or_else(|| SimError::NoSuchDisk {
            vm: self.cfg.name.clone(),
            disk,
            count: self.trackers.len(),
        })
    }

    fn snap_disk(&self, snap: &str, disk: usize) -> Result<&SnapshotDiskConfig, SimError> {
        self.tracker(disk)?;
        let s = self
            .cfg
            .snapshots
            .iter()
            .find(|s| s.name == snap)
            .ok_or_else(|| SimError::NoSuchSnapshot {
                vm: self.cfg.name.clone(),
                name: snap.to_owned(),
            })?;
        Ok(&s.disks[disk])
    }

    fn named(&self, vm: &str) -> Result<&Self, VadpError> {
        if vm == self.cfg.name {
            Ok(self)
        } else {
            Err(SimError::NoSuchVm(vm.to_owned()).into())
        }
    }

    fn refuse(&self, what: &str) -> VadpError {
        VadpError::host(format!("VM {} is open read-only: cannot {what}", self.cfg.name))
    }
}

/// Bytes allocated to the layer files (`L*`) of a disk directory.
fn layer_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(rd) = std::fs::read_dir(dir) else { return 0 };
    rd.flatten()
        .filter(|e| e.file_name().to_str().is_some_and(|n| n.starts_with('L')))
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.blocks() * 512)
        .sum()
}

/// The queries of the data-protection API; everything that would write is refused.
impl DataProtection for VmView {
    fn query_changed_disk_areas(
        &self,
        vm: &str,
        snapshot: &str,
        disk: usize,
        start_offset: u64,
        change_id: &str,
    ) -> Result<DiskChangeInfo, VadpError> {
        let v = self.named(vm)?;
        let since = match change_id.trim() {
            "*" => Since::Allocated,
            s => Since::Change(s.parse().map_err(SimError::from)?),
        };
        let sd = v.snap_disk(snapshot, disk)?;
        let page = v.trackers[disk]
            .changed_areas(since, sd.seq, sd.capacity, start_offset, DEFAULT_MAX_AREAS)
            .map_err(SimError::from)?;
        Ok(crate::vm::change_info(page))
    }

    fn disk_capacity(&self, vm: &str, snapshot: &str, disk: usize) -> Result<u64, VadpError> {
        Ok(self.named(vm)?.snap_disk(snapshot, disk)?.capacity)
    }

    fn read_snapshot(&self, vm: &str, _: &str, _: usize, _: u64, _: &mut [u8]) -> Result<(), VadpError> {
        Err(self.named(vm)?.refuse("read snapshot data"))
    }

    fn create_snapshot(&self, vm: &str, _: &str) -> Result<SnapshotInfo, VadpError> {
        Err(self.named(vm)?.refuse("create a snapshot"))
    }

    fn remove_snapshot(&self, vm: &str, _: &str) -> Result<(), VadpError> {
        Err(self.named(vm)?.refuse("remove a snapshot"))
    }

    fn enable_change_tracking(&self, vm: &str) -> Result<(), VadpError> {
        Err(self.named(vm)?.refuse("change tracking settings"))
    }
}
