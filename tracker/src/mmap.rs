//! The one place in this crate that maps files and reinterprets mapped bytes.
//!
//! Everything else sees safe slices of atomics: `&[AtomicU64]` for bitmaps and
//! `&[AtomicU32]` for the epoch map.

use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicU32, AtomicU64};

use memmap2::{Mmap, MmapMut, MmapOptions};

/// A mapping of one page-aligned region of a file: shared and writable, or (for a
/// tracker opened read-only) private and read-only.
#[derive(Debug)]
pub(crate) struct Region {
    map: Map,
    /// The mapping's address and length in 64-bit words, kept beside it so
    /// that the write path reaches the words without a look at which kind of
    /// mapping this is.
    addr: usize,
    words: usize,
}

#[derive(Debug)]
enum Map {
    Rw(MmapMut),
    Ro(Mmap),
}

impl Map {
    fn as_ptr(&self) -> *const u8 {
        match self {
            Map::Rw(m) => m.as_ptr(),
            Map::Ro(m) => m.as_ptr(),
        }
    }

    fn len(&self) -> usize {
        match self {
            Map::Rw(m) => m.len(),
            Map::Ro(m) => m.len(),
        }
    }
}

impl Region {
    /// Maps `len` bytes of `file` at `offset` (a multiple of the page size).
    ///
    /// The caller keeps the file at least `offset + len` bytes long and holds
    /// an exclusive lock on it for as long as the region lives.
    pub(crate) fn map(file: &File, offset: u64, len: usize) -> io::Result<Self> {
        assert!(len > 0, "empty regions are never mapped");
        // SAFETY: the tracker owns this file: it holds an exclusive advisory
        // lock on it for the life of the mapping, never truncates it while
        // mapped, and no other mapping of the same bytes exists in this
        // process except through this `Region`. All access goes through
        // atomics or `&mut self`, so concurrent modification is not UB.
        let map = unsafe { MmapOptions::new().offset(offset).len(len).map_mut(file)? };
        Ok(Self::new(Map::Rw(map)))
    }

    /// Maps `len` bytes of `file` at `offset` read-only and private: nothing is ever
    /// written through it, so the file (and its modification time) stays as it is.
    ///
    /// The caller holds a shared lock on the file for as long as the region lives (no
    /// writer has it open) and only loads from the words.
    pub(crate) fn map_read_only(file: &File, offset: u64, len: usize) -> io::Result<Self> {
        assert!(len > 0, "empty regions are never mapped");
        // SAFETY: a private, read-only mapping of a file that the caller keeps at least
        // `offset + len` bytes long: the shared lock it holds excludes every writer
        // (they take the lock exclusively), so the bytes do not change under it.
        let map = unsafe { MmapOptions::new().offset(offset).len(len).map_copy_read_only(file)? };
        Ok(Self::new(Map::Ro(map)))
    }

    fn new(map: Map) -> Self {
        let (addr, words) = (map.as_ptr() as usize, map.len() / 8);
        Self { map, addr, words }
    }

    /// The region as 64-bit atomic words.
    #[inline]
    pub(crate) fn words(&self) -> &[AtomicU64] {
        debug_assert_eq!(self.addr % std::mem::align_of::<AtomicU64>(), 0);
        // SAFETY: `addr` and `words` are those of `self.map`, which lives as
        // long as `&self`. The mapping is page-aligned (so aligned for
        // AtomicU64), valid for `8 * words` bytes, and every bit
        // pattern is a valid u64. AtomicU64 has the size and alignment of
        // u64; all mutation of these bytes goes through atomic operations,
        // and a read-only region is only ever loaded from (a tracker opened
        // read-only stores nothing; 64-bit atomic loads of read-only memory
        // are plain loads).
        unsafe { std::slice::from_raw_parts(self.addr as *const AtomicU64, self.words) }
    }

    /// Faults in, writable, the pages holding words `w..w + n` as a store to
    /// them would, changing nothing (`MADV_POPULATE_WRITE`, Linux 5.14 and
    /// later). Best effort; nothing for a read-only region.
    pub(crate) fn populate_words(&self, w: usize, n: usize) {
        if w + n > self.words {
            return;
        }
        #[cfg(target_os = "linux")]
        if let Map::Rw(m) = &self.map {
            let _ = m.advise_range(memmap2::Advice::PopulateWrite, 8 * w, 8 * n);
        }
    }

    /// The region as 32-bit atomic words.
    #[inline]
    pub(crate) fn words32(&self) -> &[AtomicU32] {
        let bytes = self.map.as_ptr();
        debug_assert_eq!(bytes as usize % std::mem::align_of::<AtomicU32>(), 0);
        // SAFETY: as in `words`: page-aligned, valid for the borrow, any bit
        // pattern is a valid u32, and all mutation goes through atomics.
        unsafe { std::slice::from_raw_parts(bytes.cast::<AtomicU32>(), self.map.len() / 4) }
    }

    /// The region as plain bytes (the header); `None` for a read-only mapping.
    pub(crate) fn bytes_mut(&mut self) -> Option<&mut [u8]> {
        match &mut self.map {
            Map::Rw(m) => Some(m),
            Map::Ro(_) => None,
        }
    }

    /// Writes dirty pages back to the file (nothing to do for a read-only mapping).
    pub(crate) fn flush(&self) -> io::Result<()> {
        match &self.map {
            Map::Rw(m) => m.flush(),
            Map::Ro(_) => Ok(()),
        }
    }
}
