//! The benchmarks' data path: a tracker marks the write, then the bytes are
//! copied into a memory-mapped sparse file.
//!
//! "Tracking off" and "tracking on" differ only in the tracker type:
//! [`BenchDisk`] is generic over [`MarkDirty`], and `()` marks nothing, so the
//! untracked path is the tracked one with the mark compiled out.
//!
//! # Design
//! The data file is a *window*: a logical disk offset lands at
//! `offset % window` (pulled back so the write fits), so a tracker can see a
//! 1 TiB disk (and pay its real cache misses) while the copies go to a 1 GiB
//! working set that fits in memory. The file is unlinked at creation and
//! pre-faulted by [`DataFile::prefault`], so page faults and writeback stay
//! out of the measurement.
//!
//! This is the one module of the crate with `unsafe`: raw copies into the
//! shared mapping, as `sim`'s extent module does (rust-vmm's vm-memory does
//! the same): concurrent writers to the same bytes leave unspecified bytes, as
//! on a real disk, and no `&[u8]` to the mapping is ever handed out.

use std::fs::File;
use std::io;
use std::path::Path;

use memmap2::{MmapOptions, MmapRaw};
use tracker::MarkDirty;

/// A shared, writable mapping of an unnamed sparse file.
#[derive(Debug)]
pub struct DataFile {
    map: MmapRaw,
    _file: File,
}

impl DataFile {
    /// Creates an unnamed file of `len` bytes (a multiple of 4 KiB) in `dir` and maps it.
    pub fn create(dir: &Path, len: u64) -> io::Result<Self> {
        if len == 0 || !len.is_multiple_of(4096) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("a data window of {len} bytes is not a positive multiple of 4 KiB"),
            ));
        }
        let file = tempfile::tempfile_in(dir)?;
        file.set_len(len)?;
        let map = MmapOptions::new().len(len as usize).map_raw(&file)?;
        Ok(Self { map, _file: file })
    }

    /// The window's length in bytes.
    pub fn len(&self) -> u64 {
        self.map.len() as u64
    }

    /// Always false: a window is never empty.
    pub fn is_empty(&self) -> bool {
        self.map.len() == 0
    }

    /// Writes every page once, so later copies never fault.
    pub fn prefault(&self) {
        let chunk = vec![0x5au8; 1 << 20];
        let mut off = 0;
        while off < self.len() {
            let n = chunk.len().min((self.len() - off) as usize);
            self.copy_in(off, &chunk[..n]);
            off += n as u64;
        }
    }

    /// Where a write of `len` bytes at logical `offset` lands in the window.
    #[inline]
    pub fn slot(&self, offset: u64, len: u64) -> u64 {
        let w = self.len();
        assert!(len <= w, "a write of {len} bytes does not fit the {w}-byte data window");
        let d = offset % w;
        if d + len > w {
            w - len
        } else {
            d
        }
    }

    /// Copies `data` into the window at `at`.
    #[inline]
    pub fn copy_in(&self, at: u64, data: &[u8]) {
        assert!(
            at.checked_add(data.len() as u64).is_some_and(|end| end <= self.len()),
            "copy out of the data window"
        );
        // SAFETY: the range was checked to lie inside the mapping, which lives
        // as long as `self`; `data` cannot overlap a mapping we hand out no
        // slices of. Racing writers to the same bytes leave unspecified bytes,
        // never an out-of-bounds access.
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                self.map.as_mut_ptr().wrapping_add(at as usize),
                data.len(),
            )
        }
    }

    /// Copies bytes out of the window at `at` (for tests).
    pub fn copy_out(&self, at: u64, buf: &mut [u8]) {
        assert!(
            at.checked_add(buf.len() as u64).is_some_and(|end| end <= self.len()),
            "copy out of the data window"
        );
        // SAFETY: in bounds (checked), the mapping outlives the call, and
        // `buf` is a distinct allocation.
        unsafe {
            std::ptr::copy_nonoverlapping(self.map.as_ptr().wrapping_add(at as usize), buf.as_mut_ptr(), buf.len())
        }
    }
}

/// A disk for benchmarks: `write` = `tracker.mark` + a copy into the window.
#[derive(Debug)]
pub struct BenchDisk<'a, T: ?Sized> {
    data: &'a DataFile,
    tracker: &'a T,
}

impl<'a, T: MarkDirty + ?Sized> BenchDisk<'a, T> {
    /// A disk writing into `data`, marking `tracker`.
    pub fn new(data: &'a DataFile, tracker: &'a T) -> Self {
        Self { data, tracker }
    }

    /// A guest write of `buf` at logical `offset`: mark first (as `sim` does),
    /// then copy.
    #[inline]
    pub fn write(&self, offset: u64, buf: &[u8]) {
        let len = buf.len() as u64;
        self.tracker.mark(offset, len);
        self.data.copy_in(self.data.slot(offset, len), buf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use parking_lot::Mutex;

    #[derive(Default)]
    struct Log(Mutex<Vec<(u64, u64)>>);
    impl MarkDirty for Log {
        fn mark(&self, offset: u64, len: u64) {
            self.0.lock().push((offset, len));
        }
    }

    #[test]
    fn writes_mark_then_land_in_the_window() {
        let data = DataFile::create(&std::env::temp_dir(), 64 * 1024).unwrap();
        data.prefault();
        let log = Log::default();
        let disk = BenchDisk::new(&data, &log);
        disk.write(4096, &[7u8; 512]);
        // A logical offset past the window wraps; one that would straddle its end is pulled back.
        disk.write((1 << 40) + 8192, &[9u8; 4096]);
        disk.write(64 * 1024 - 512, &[3u8; 4096]);
        assert_eq!(
            *log.0.lock(),
            vec![(4096, 512), ((1 << 40) + 8192, 4096), (64 * 1024 - 512, 4096)]
        );
        let mut buf = [0u8; 4096];
        data.copy_out(4096, &mut buf[..512]);
        assert!(buf[..512].iter().all(|&b| b == 7));
        data.copy_out(8192, &mut buf);
        assert!(buf.iter().all(|&b| b == 9));
        data.copy_out(60 * 1024, &mut buf);
        assert!(buf.iter().all(|&b| b == 3));
    }

    #[test]
    fn bad_window_sizes_are_refused() {
        assert!(DataFile::create(&std::env::temp_dir(), 0).is_err());
        assert!(DataFile::create(&std::env::temp_dir(), 1000).is_err());
    }
}
