//! The trackers ours is measured against, each a [`MarkDirty`].
//!
//! | type | models | per write |
//! |---|---|---|
//! | [`LockedBitmap`] | QEMU: `bdrv_set_dirty` takes the dirty-bitmap mutex | lock, `word |= mask`, unlock |
//! | [`PerChangeIdBitmaps`] | libvirt checkpoints over QEMU: one enabled bitmap per retained checkpoint | lock, set the bits in *every* bitmap, unlock |
//! | [`FetchOrBitmap`] | a naive lock-free bitmap | `fetch_or` without testing first |
//!
//! QEMU's `hb_set_elem` stores unconditionally (`*elem |= mask`), so the
//! locked baselines do too. They are flat (one level): QEMU's `HBitmap` also
//! updates summary levels, so these baselines are, if anything, cheaper than
//! what they model.

use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use tracker::MarkDirty;

/// Calls `f(word, mask)` for each 64-bit word of bits `first..=last`.
#[inline]
fn for_each_word(first: u64, last: u64, mut f: impl FnMut(usize, u64)) {
    let (fw, lw) = (first / 64, last / 64);
    for w in fw..=lw {
        let lo = if w == fw { first % 64 } else { 0 };
        let hi = if w == lw { last % 64 } else { 63 };
        f(w as usize, (u64::MAX >> (63 - hi)) & (u64::MAX << lo));
    }
}

/// The blocks `[first, last]` a write of `len > 0` bytes at `offset` touches.
#[inline]
fn blocks(offset: u64, len: u64, shift: u32) -> (u64, u64) {
    (offset >> shift, (offset + len - 1) >> shift)
}

/// A zeroed vector whose pages are already faulted in.
fn faulted(words: usize) -> Vec<u64> {
    let mut v = vec![0u64; words];
    // `vec![0; n]` maps untouched zero pages; writing them now keeps page
    // faults out of the first measured round.
    v.iter_mut().for_each(|w| *w = std::hint::black_box(0));
    v
}

/// One flat bitmap behind a mutex taken on every write (QEMU's bitmap mutex).
#[derive(Debug)]
pub struct LockedBitmap {
    shift: u32,
    words: Mutex<Vec<u64>>,
}

impl LockedBitmap {
    /// A bitmap for `capacity` bytes at `granularity` bytes per bit (a power of two).
    pub fn new(capacity: u64, granularity: u64) -> Self {
        let shift = granularity.trailing_zeros();
        Self {
            shift,
            words: Mutex::new(faulted(capacity.div_ceil(granularity).div_ceil(64) as usize)),
        }
    }

    /// Clears every bit (a new epoch).
    pub fn clear(&self) {
        self.words.lock().fill(0);
    }

    /// Whether `block` is marked.
    pub fn is_marked(&self, block: u64) -> bool {
        self.words.lock()[(block / 64) as usize] & (1 << (block % 64)) != 0
    }
}

impl MarkDirty for LockedBitmap {
    #[inline]
    fn mark(&self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let (first, last) = blocks(offset, len, self.shift);
        let mut words = self.words.lock();
        for_each_word(first, last, |w, m| words[w] |= m);
    }
}

/// A bitmap per retained change ID, every one set on every write, all behind
/// one mutex (libvirt keeps one enabled QEMU bitmap per checkpoint, and QEMU
/// walks the list of enabled bitmaps under its mutex).
#[derive(Debug)]
pub struct PerChangeIdBitmaps {
    shift: u32,
    maps: Mutex<Vec<Vec<u64>>>,
}

impl PerChangeIdBitmaps {
    /// `n` bitmaps for `capacity` bytes at `granularity` bytes per bit.
    pub fn new(capacity: u64, granularity: u64, n: usize) -> Self {
        let words = capacity.div_ceil(granularity).div_ceil(64) as usize;
        Self {
            shift: granularity.trailing_zeros(),
            maps: Mutex::new((0..n).map(|_| faulted(words)).collect()),
        }
    }

    /// How many bitmaps a write sets.
    pub fn count(&self) -> usize {
        self.maps.lock().len()
    }

    /// Clears every bitmap.
    pub fn clear(&self) {
        self.maps.lock().iter_mut().for_each(|m| m.fill(0));
    }

    /// Whether `block` is marked in bitmap `i`.
    pub fn is_marked(&self, i: usize, block: u64) -> bool {
        self.maps.lock()[i][(block / 64) as usize] & (1 << (block % 64)) != 0
    }
}

impl MarkDirty for PerChangeIdBitmaps {
    #[inline]
    fn mark(&self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let (first, last) = blocks(offset, len, self.shift);
        let mut maps = self.maps.lock();
        for map in maps.iter_mut() {
            for_each_word(first, last, |w, m| map[w] |= m);
        }
    }
}

/// A flat lock-free bitmap that `fetch_or`s every time, without testing first.
#[derive(Debug)]
pub struct FetchOrBitmap {
    shift: u32,
    words: Vec<AtomicU64>,
}

impl FetchOrBitmap {
    /// A bitmap for `capacity` bytes at `granularity` bytes per bit.
    pub fn new(capacity: u64, granularity: u64) -> Self {
        let words = capacity.div_ceil(granularity).div_ceil(64) as usize;
        Self {
            shift: granularity.trailing_zeros(),
            // Built word by word, so every page is written (faulted in) now.
            words: (0..words).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Clears every bit. Requires quiescent writers for an exact result.
    pub fn clear(&self) {
        // Relaxed: called between rounds; the pool's barrier orders it.
        self.words.iter().for_each(|w| w.store(0, Ordering::Relaxed));
    }

    /// Whether `block` is marked.
    pub fn is_marked(&self, block: u64) -> bool {
        self.words[(block / 64) as usize].load(Ordering::Relaxed) & (1 << (block % 64)) != 0
    }
}

impl MarkDirty for FetchOrBitmap {
    #[inline]
    fn mark(&self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let (first, last) = blocks(offset, len, self.shift);
        // Relaxed: only atomicity matters here; readers come after a barrier.
        for_each_word(first, last, |w, m| {
            self.words[w].fetch_or(m, Ordering::Relaxed);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: u64 = 64 * 1024;

    fn marked(f: impl Fn(u64) -> bool, n: u64) -> Vec<u64> {
        (0..n).filter(|&b| f(b)).collect()
    }

    #[test]
    fn locked_marks_exactly_the_touched_blocks() {
        let b = LockedBitmap::new(1 << 30, G);
        b.mark(65535, 2); // unaligned: blocks 0 and 1
        b.mark(63 * G, 2 * G); // across a word boundary: 63, 64
        b.mark(10 * G, 0); // empty: nothing
        assert_eq!(marked(|x| b.is_marked(x), 16384), vec![0, 1, 63, 64]);
        b.clear();
        assert!(marked(|x| b.is_marked(x), 16384).is_empty());
    }

    #[test]
    fn per_change_id_sets_every_bitmap() {
        let b = PerChangeIdBitmaps::new(1 << 30, G, 8);
        assert_eq!(b.count(), 8);
        b.mark(130 * G + 1, G);
        for i in 0..8 {
            assert_eq!(marked(|x| b.is_marked(i, x), 16384), vec![130, 131]);
        }
        b.clear();
        assert!(!b.is_marked(7, 130));
    }

    #[test]
    fn fetch_or_marks_exactly_the_touched_blocks() {
        let b = FetchOrBitmap::new(1 << 30, G);
        b.mark(0, 200 * G);
        b.mark(16383 * G, 512);
        let want: Vec<u64> = (0..200).chain([16383]).collect();
        assert_eq!(marked(|x| b.is_marked(x), 16384), want);
        b.clear();
        assert!(!b.is_marked(199));
    }
}
