//! The data-protection API ([`vadp::DataProtection`]) on a VM and on the host.
//!
//! ```text
//!  backup client ─┐                                ┌─▶ Host ── vm(name) ──┐
//!  harness drive ─┼─ vadp::changed_areas ─▶ impl DataProtection          ├─▶ Vm: queries, reads,
//!  sim tests ─────┘   (the checked pager)          └─▶ Vm (its own name) ──┘   snapshots (SimError)
//! ```
//! A [`Vm`] is a capability of its own: it answers the API for its own name
//! (any other name is [`NotFound`](vadp::VadpError::NotFound)), so whoever
//! holds a VM pages its changed areas with the checked [`vadp::changed_areas`]
//! instead of paging by hand. The host's implementation finds the VM by name
//! and delegates to it: one implementation of each call.

use vadp::{DataProtection, DiskChangeInfo, SnapshotInfo, VadpError};

use crate::error::SimError;
use crate::{Host, Vm};

impl Vm {
    /// The VM itself, if `vm` names it.
    fn named(&self, vm: &str) -> Result<&Self, VadpError> {
        if vm == self.name() {
            Ok(self)
        } else {
            Err(SimError::NoSuchVm(vm.to_owned()).into())
        }
    }
}

impl DataProtection for Vm {
    fn query_changed_disk_areas(
        &self,
        vm: &str,
        snapshot: &str,
        disk: usize,
        start_offset: u64,
        change_id: &str,
    ) -> Result<DiskChangeInfo, VadpError> {
        Ok(self
            .named(vm)?
            .query_changed_disk_areas(snapshot, disk, start_offset, change_id)?)
    }

    fn disk_capacity(&self, vm: &str, snapshot: &str, disk: usize) -> Result<u64, VadpError> {
        Ok(self.named(vm)?.snapshot_capacity(snapshot, disk)?)
    }

    fn read_snapshot(
        &self,
        vm: &str,
        snapshot: &str,
        disk: usize,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), VadpError> {
        Ok(self.named(vm)?.read_snapshot(snapshot, disk, offset, buf)?)
    }

    fn create_snapshot(&self, vm: &str, name: &str) -> Result<SnapshotInfo, VadpError> {
        Ok(self.named(vm)?.create_snapshot(name)?)
    }

    fn remove_snapshot(&self, vm: &str, name: &str) -> Result<(), VadpError> {
        Ok(self.named(vm)?.remove_snapshot(name)?)
    }

    fn enable_change_tracking(&self, vm: &str) -> Result<(), VadpError> {
        let me = self.named(vm)?;
        if !me.cbt() {
            me.set_cbt(true)?;
        }
        Ok(())
    }
}

impl DataProtection for Host {
    fn query_changed_disk_areas(
        &self,
        vm: &str,
        snapshot: &str,
        disk: usize,
        start_offset: u64,
        change_id: &str,
    ) -> Result<DiskChangeInfo, VadpError> {
        DataProtection::query_changed_disk_areas(&*self.vm(vm)?, vm, snapshot, disk, start_offset, change_id)
    }

    fn disk_capacity(&self, vm: &str, snapshot: &str, disk: usize) -> Result<u64, VadpError> {
        DataProtection::disk_capacity(&*self.vm(vm)?, vm, snapshot, disk)
    }

    fn read_snapshot(
        &self,
        vm: &str,
        snapshot: &str,
        disk: usize,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), VadpError> {
        DataProtection::read_snapshot(&*self.vm(vm)?, vm, snapshot, disk, offset, buf)
    }

    fn create_snapshot(&self, vm: &str, name: &str) -> Result<SnapshotInfo, VadpError> {
        DataProtection::create_snapshot(&*self.vm(vm)?, vm, name)
    }

    fn remove_snapshot(&self, vm: &str, name: &str) -> Result<(), VadpError> {
        DataProtection::remove_snapshot(&*self.vm(vm)?, vm, name)
    }

    fn enable_change_tracking(&self, vm: &str) -> Result<(), VadpError> {
        DataProtection::enable_change_tracking(&*self.vm(vm)?, vm)
    }
}
