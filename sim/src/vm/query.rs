//! What a backup asks of a snapshot: its changed areas, its capacity, its data.

use std::sync::Arc;

use tracker::Since;
use vadp::{DiskArea, DiskChangeInfo};

use super::{check_range, Vm};
use crate::config::{SnapshotDiskConfig, VmConfig};
use crate::error::SimError;
use crate::layer::{read_chain, Layer};

impl Vm {
    /// Reads `disk` as it was at snapshot `snap` (what a backup reads).
    pub fn read_snapshot(&self, snap: &str, disk: usize, offset: u64, buf: &mut [u8]) -> Result<(), SimError> {
        let (view, capacity) = self.snapshot_view(snap, disk)?;
        check_range(disk, offset, buf.len() as u64, capacity)?;
        read_chain(&view, offset, buf)
    }

    fn snapshot_view(&self, snap: &str, disk: usize) -> Result<(Vec<Arc<Layer>>, u64), SimError> {
        let cfg = self.meta.lock();
        let sd = self.snap_disk(&cfg, snap, disk)?;
        let io = self.gate();
        let chain = &self.disk_io(&io, disk)?.chain;
        let top = chain
            .iter()
            .position(|l| l.id == sd.view_top)
            .expect("a snapshot's view is in the chain");
        Ok((chain[..=top].to_vec(), sd.capacity))
    }

    pub(super) fn snap_disk<'a>(
        &self,
        cfg: &'a VmConfig,
        snap: &str,
        disk: usize,
    ) -> Result<&'a SnapshotDiskConfig, SimError> {
        let s = cfg
            .snapshots
            .iter()
            .find(|s| s.name == snap)
            .ok_or_else(|| SimError::NoSuchSnapshot {
                vm: self.name.clone(),
                name: snap.to_owned(),
            })?;
        self.shared(disk)?;
        Ok(&s.disks[disk])
    }

    /// `QueryChangedDiskAreas` on snapshot `snap` of `disk`, since
    /// `change_id` (`*` for the allocated areas), one page from `start_offset`.
    pub fn query_changed_disk_areas(
        &self,
        snap: &str,
        disk: usize,
        start_offset: u64,
        change_id: &str,
    ) -> Result<DiskChangeInfo, SimError> {
        let max = self.max_areas.load(std::sync::atomic::Ordering::Relaxed);
        self.query_changed_disk_areas_max(snap, disk, start_offset, change_id, max)
    }

    /// [`query_changed_disk_areas`](Self::query_changed_disk_areas) with at
    /// most `max_areas` areas in the page (at least 1) instead of the VM's
    /// own limit: for front ends with a limit of their own.
    pub fn query_changed_disk_areas_max(
        &self,
        snap: &str,
        disk: usize,
        start_offset: u64,
        change_id: &str,
        max_areas: usize,
    ) -> Result<DiskChangeInfo, SimError> {
        let since = match change_id.trim() {
            "*" => Since::Allocated,
            s => Since::Change(s.parse()?),
        };
        let cfg = self.meta.lock();
        let sd = self.snap_disk(&cfg, snap, disk)?;
        let page =
            self.disks[disk]
                .tracker
                .changed_areas(since, sd.seq, sd.capacity, start_offset, max_areas.max(1))?;
        Ok(DiskChangeInfo {
            start_offset: page.start_offset,
            length: page.length,
            changed_area: page
                .areas
                .into_iter()
                .map(|(start, length)| DiskArea { start, length })
                .collect(),
        })
    }

    /// The capacity of `disk` at snapshot `snap`.
    pub fn snapshot_capacity(&self, snap: &str, disk: usize) -> Result<u64, SimError> {
        let cfg = self.meta.lock();
        Ok(self.snap_disk(&cfg, snap, disk)?.capacity)
    }
}
