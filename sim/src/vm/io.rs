//! Guest I/O: writes, unmaps and reads of the live disk.
//!
//! The write path is generic over what it marks ([`MarkDirty`], as rust-vmm's
//! vm-memory is over its dirty `Bitmap`): [`Vm::write`] and [`Vm::unmap`]
//! mark the disk's change tracker; with the `bench` feature,
//! [`Vm::write_with`] runs the same path with another marker, `()` for
//! tracking off, so benchmarks measure the real write, I/O gate included.
//! Either way it takes no lock (the gate's read side is a per-thread shard)
//! and allocates nothing.

use std::sync::Arc;

use tracker::MarkDirty;

use super::{check_range, Vm};
use crate::error::SimError;
use crate::layer::{read_chain, Src};

impl Vm {
    /// A guest write of `data` at `offset` of `disk`.
    pub fn write(&self, disk: usize, offset: u64, data: &[u8]) -> Result<(), SimError> {
        let tracker = &self.shared(disk)?.tracker;
        self.guest_io(tracker, disk, offset, data.len() as u64, Src::Bytes(data))
    }

    /// A guest unmap (TRIM): the range reads as zeros afterwards, and counts as changed.
    pub fn unmap(&self, disk: usize, offset: u64, len: u64) -> Result<(), SimError> {
        let tracker = &self.shared(disk)?.tracker;
        self.guest_io(tracker, disk, offset, len, Src::Zero)
    }

    /// For benchmarks: [`write`](Self::write) marking `marker` instead of
    /// the disk's change tracker (`&()` is tracking off). The disk's change
    /// tracking never sees these writes, so this exists only with the
    /// `bench` feature.
    #[cfg(feature = "bench")]
    pub fn write_with<M: MarkDirty + ?Sized>(
        &self,
        marker: &M,
        disk: usize,
        offset: u64,
        data: &[u8],
    ) -> Result<(), SimError> {
        self.shared(disk)?;
        self.guest_io(marker, disk, offset, data.len() as u64, Src::Bytes(data))
    }

    /// The write path: under the gate, check, mark `marker`, copy.
    ///
    /// A write that would create an extent file or fault in fresh pages of
    /// the top layer (its first write to a grain of a new delta), or with
    /// durable tracking sync a region's intent, does that first without the
    /// gate, then takes it again: a stun never waits for a writer inside a
    /// page fault or a sync it could have done before. Such a write
    /// holds a reference to the layer while the gate is not held (the only
    /// case that touches a reference count); the write itself runs only
    /// under the gate, after it checked everything again.
    #[inline]
    fn guest_io<M: MarkDirty + ?Sized>(
        &self,
        marker: &M,
        disk: usize,
        offset: u64,
        len: u64,
        src: Src<'_>,
    ) -> Result<(), SimError> {
        fault_point!(crate::fault::Point::BeforeGate { disk, offset, len });
        let (mut prefaulted, mut synced) = (0, 0);
        loop {
            let io = self.gate();
            if !io.powered_on {
                return Err(SimError::PoweredOff(self.name.clone()));
            }
            let d = self.disk_io(&io, disk)?;
            check_range(disk, offset, len, d.capacity)?;
            if len == 0 {
                return Ok(());
            }
            let (top, below) = d.chain.split_last().expect("a chain has a base layer");
            // At most twice: a layer that keeps changing under a writer
            // (snapshot after snapshot) cannot make it loop.
            if prefaulted < 2 && !top.ready(offset, len, src) {
                let top = Arc::clone(top);
                drop(io);
                top.prefault(offset, len, src)?;
                prefaulted += 1;
                continue;
            }
            // Durable tracking: the first write of an epoch into a region
            // syncs the region's intent before its data lands. That waits on
            // the file system, so it runs without the gate (a snapshot in
            // between closes the epoch it was for: check again); after two
            // tries, under the gate.
            if !marker.intents_durable(offset, len) {
                if synced < 2 {
                    drop(io);
                    marker.sync_intents(offset, len)?;
                    synced += 1;
                    continue;
                }
                marker.sync_intents(offset, len)?;
            }
            // Mark first: a write that fails half-way is over-reported, never lost.
            marker.mark(offset, len);
            fault_point!(crate::fault::Point::Marked { disk, offset, len });
            if below.is_empty() {
                return top.write_raw(offset, len, src);
            }
            // Grains the write covers whole become present only once its data is
            // in them: killed before, the delta does not hold them (old content).
            let written = top
                .cow(offset, len, below)
                .and_then(|()| top.write_raw(offset, len, src));
            top.publish(offset, len);
            return written;
        }
    }

    /// A guest read of the live disk.
    pub fn read(&self, disk: usize, offset: u64, buf: &mut [u8]) -> Result<(), SimError> {
        let io = self.gate();
        let d = self.disk_io(&io, disk)?;
        check_range(disk, offset, buf.len() as u64, d.capacity)?;
        read_chain(&d.chain, offset, buf)
    }
}
