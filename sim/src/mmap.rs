//! The one place in `sim` that maps disk extents and copies through raw pointers.
//!
//! Guest I/O reaches a virtual disk from many vCPU threads at once, as it
//! reaches a real disk: concurrent I/O to the same bytes has unspecified
//! content, as on hardware. So the mapping is treated as shared memory and
//! only ever accessed through raw copies (as rust-vmm's vm-memory does), never
//! through `&[u8]`/`&mut [u8]` slices that would claim exclusive access.

use std::fs::File;
use std::io;

use memmap2::{MmapOptions, MmapRaw};

/// A shared, writable mapping of a whole extent file.
#[derive(Debug)]
pub(crate) struct Extent {
    map: MmapRaw,
}

impl Extent {
    /// Maps the first `len` bytes of `file`.
    ///
    /// The caller keeps the file at least `len` bytes long and never
    /// truncates it while mapped (the VM's lock file keeps other processes away).
    pub(crate) fn map(file: &File, len: u64) -> io::Result<Self> {
        let map = MmapOptions::new().len(len as usize).map_raw(file)?;
        Ok(Self { map })
    }

    fn check(&self, offset: u64, len: usize) {
        assert!(offset as usize + len <= self.map.len(), "extent access out of bounds");
    }

    /// Copies `buf.len()` bytes at `offset` out of the extent.
    pub(crate) fn read(&self, offset: u64, buf: &mut [u8]) {
        self.check(offset, buf.len());
        // SAFETY: the range was checked to lie inside the mapping, which lives
        // as long as `self`; `buf` is a distinct allocation, so the regions do
        // not overlap. Racing guest writes to the same bytes give unspecified
        // bytes, as on a real disk, never out-of-bounds access.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.map.as_ptr().wrapping_add(offset as usize),
                buf.as_mut_ptr(),
                buf.len(),
            )
        }
    }

    /// Copies `data` into the extent at `offset`.
    pub(crate) fn write(&self, offset: u64, data: &[u8]) {
        self.check(offset, data.len());
        // SAFETY: in bounds (checked), the mapping outlives the call, and
        // `data` cannot overlap a file mapping we hand out no slices of.
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                self.map.as_mut_ptr().wrapping_add(offset as usize),
                data.len(),
            )
        }
    }

    /// Zeroes `len` bytes at `offset`.
    pub(crate) fn zero(&self, offset: u64, len: usize) {
        self.check(offset, len);
        // SAFETY: in bounds (checked) and the mapping outlives the call.
        unsafe { std::ptr::write_bytes(self.map.as_mut_ptr().wrapping_add(offset as usize), 0, len) }
    }

    /// Faults in the pages of `[offset, offset + len)` writable, as writes to
    /// them would, without changing a byte (`MADV_POPULATE_WRITE`, Linux 5.14
    /// and later): what a writer does before it takes the I/O gate, so that
    /// the stun never waits for it inside a page fault. Best effort: an
    /// older kernel refuses the advice and the write takes its faults as before.
    pub(crate) fn populate(&self, offset: u64, len: usize) {
        self.check(offset, len);
        #[cfg(target_os = "linux")]
        let _ = self
            .map
            .advise_range(memmap2::Advice::PopulateWrite, offset as usize, len);
    }

    /// Writes dirty pages back to the file.
    pub(crate) fn flush(&self) -> io::Result<()> {
        self.map.flush()
    }
}
