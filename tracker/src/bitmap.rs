//! A lock-free hierarchical bitmap of atomic words, in a mapped file region.
//!
//! ```text
//! level 2:  [1.......]                 one bit per level-1 word
//! level 1:  [1.......][........]       one bit per level-0 word
//! level 0:  [..1.1...][........] ...   one bit per block
//! ```
//!
//! A set bit in level `k + 1` means "the word below may be non-zero". Marking
//! is test-before-set at every level: a bit that is already set costs one
//! shared load and no store, so re-marking a hot block never bounces a cache
//! line between writers, and the summary levels are written only on a
//! block's first touch. Iteration walks the summary levels, so it costs time
//! proportional to the words that are set, not to the bitmap's size.
//!
//! Summary bits are set before the bits below them (top down) and cleared
//! after them (bottom up), so every set bit is reachable from the top at every
//! instant: a process killed between any two stores, of any of its writers or
//! of a drain, leaves every mark that a completed write relies on findable.
//!
//! # Memory ordering
//! Marking uses `Relaxed` operations. Iteration and clearing (`drain`) are
//! only correct once every marker has finished: the host guarantees that
//! with its I/O gate (a snapshot stuns I/O before the bitmap is frozen), and
//! the gate's lock provides the happens-before edge.

use std::fs::File;
use std::io;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::mmap::Region;

/// Word ranges of each level inside the region, level 0 first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapLayout {
    levels: Vec<Range<usize>>,
}

impl BitmapLayout {
    /// The layout of a bitmap of `nbits` bits.
    pub fn new(nbits: u64) -> Self {
        let mut levels = Vec::new();
        let mut start = 0usize;
        let mut words = nbits.div_ceil(64).max(1) as usize;
        loop {
            levels.push(start..start + words);
            start += words;
            if words == 1 {
                break;
            }
            words = words.div_ceil(64);
        }
        Self { levels }
    }

    /// Bytes the bitmap needs, rounded up to whole pages.
    pub fn bytes(&self) -> u64 {
        let words = self.levels.last().map_or(0, |r| r.end) as u64;
        (words * 8).next_multiple_of(4096)
    }
}

/// A hierarchical bitmap of atomic words backed by a mapped file region.
#[derive(Debug)]
pub struct AtomicBitmap {
    region: Region,
    /// Words of level 0, which starts the region: the write path needs only
    /// this, not the layout's table.
    leaf_words: usize,
    layout: BitmapLayout,
}

impl AtomicBitmap {
    /// Maps a bitmap of `layout` at `offset` in `file` (a multiple of the
    /// page size). The file must be at least `offset + layout.bytes()` long,
    /// locked by the caller and never truncated while mapped.
    pub fn map(file: &File, offset: u64, layout: BitmapLayout) -> io::Result<Self> {
        Self::with_region(Region::map(file, offset, layout.bytes() as usize)?, layout)
    }

    /// As [`map`](Self::map), read-only: for a tracker that only answers queries.
    pub(crate) fn map_read_only(file: &File, offset: u64, layout: BitmapLayout) -> io::Result<Self> {
        Self::with_region(Region::map_read_only(file, offset, layout.bytes() as usize)?, layout)
    }

    fn with_region(region: Region, layout: BitmapLayout) -> io::Result<Self> {
        let leaf_words = layout.levels[0].end;
        debug_assert_eq!(layout.levels[0].start, 0);
        Ok(Self {
            region,
            leaf_words,
            layout,
        })
    }

    /// Counts the set bits (walks only non-empty words).
    pub fn count(&self) -> u64 {
        let mut n = 0;
        self.for_each_word(0, |_, b| n += u64::from(b.count_ones()));
        n
    }

    #[inline]
    fn level(&self, k: usize) -> &[AtomicU64] {
        &self.region.words()[self.layout.levels[k].clone()]
    }

    /// Level 0, without a look at the layout table.
    #[inline]
    fn leaf(&self) -> &[AtomicU64] {
        &self.region.words()[..self.leaf_words]
    }

    /// Sets every bit in `first..=last`. Lock-free; test-before-set.
    #[inline]
    pub fn set_range(&self, first: u64, last: u64) {
        let leaf = self.leaf();
        let (fw, lw) = ((first / 64) as usize, (last / 64) as usize);
        for w in fw..=lw {
            let lo = if w == fw { first % 64 } else { 0 };
            let hi = if w == lw { last % 64 } else { 63 };
            let mask = (u64::MAX >> (63 - hi)) & (u64::MAX << lo);
            self.or_word(leaf, w, mask);
        }
    }

    /// ORs `mask` into leaf word `w` and keeps the summary levels up to date.
    #[inline]
    pub fn or_leaf_word(&self, w: usize, mask: u64) {
        self.or_word(self.leaf(), w, mask);
    }

    #[inline]
    fn or_word(&self, leaf: &[AtomicU64], w: usize, mask: u64) {
        let word = &leaf[w];
        // Relaxed: see the module doc; ordering comes from the host's I/O gate.
        if word.load(Ordering::Relaxed) & mask != mask {
            self.set_summaries(w);
            // Release: the summary bits are stored before the leaf bits.
            word.fetch_or(mask, Ordering::Release);
        }
    }

    /// Sets leaf word `w`'s bit in every summary level, top down, before the
    /// caller sets the leaf bits: a set bit is reachable from the top at every
    /// instant. A process killed between two stores (of this writer or of
    /// another one that the writer saw) then loses no mark that a completed
    /// write relies on: the bits a writer finds set have their summaries set
    /// already, so it never depends on another writer finishing them.
    #[inline]
    fn set_summaries(&self, w: usize) {
        for k in (1..self.layout.levels.len()).rev() {
            let lvl = self.level(k);
            // The level-(k - 1) word above leaf word `w`.
            let child = w >> (6 * (k - 1));
            let (i, bit) = (child / 64, 1u64 << (child % 64));
            // Test before set: a summary bit is set once per epoch, then only read.
            if lvl[i].load(Ordering::Relaxed) & bit == 0 {
                lvl[i].fetch_or(bit, Ordering::Release);
            }
        }
    }

    /// Tests one bit with the given ordering.
    #[inline]
    pub fn test(&self, bit: u64, order: Ordering) -> bool {
        self.leaf()[(bit / 64) as usize].load(order) & (1 << (bit % 64)) != 0
    }

    /// Sets one bit with the given ordering; returns whether it was set before.
    #[inline]
    pub fn test_and_set(&self, bit: u64, order: Ordering) -> bool {
        let w = (bit / 64) as usize;
        let mask = 1u64 << (bit % 64);
        let word = &self.leaf()[w];
        if word.load(Ordering::Relaxed) & mask == 0 {
            self.set_summaries(w); // summaries first, as in `set_range`
        }
        // At least Release: the summary bits are stored before the leaf bit.
        let order = match order {
            Ordering::Relaxed => Ordering::Release,
            Ordering::Acquire => Ordering::AcqRel,
            o => o,
        };
        word.fetch_or(mask, order) & mask != 0
    }

    /// Calls `f(word_index, bits)` for every non-zero leaf word at or after
    /// `from_word`, in increasing order. Requires quiescent writers for an
    /// exact answer.
    pub fn for_each_word(&self, from_word: usize, mut f: impl FnMut(usize, u64)) {
        self.walk(from_word, false, &mut f);
    }

    /// Like [`for_each_word`](Self::for_each_word) from word 0, and clears every
    /// word it visits, summary levels included. Requires quiescent writers.
    pub fn drain(&self, mut f: impl FnMut(usize, u64)) {
        self.walk(0, true, &mut f);
    }

    fn walk(&self, from_word: usize, clear: bool, f: &mut dyn FnMut(usize, u64)) {
        let top = self.layout.levels.len() - 1;
        self.walk_level(top, 0, from_word, clear, f);
    }

    /// Visits word `idx` of level `k` (`k > 0`: a summary word). Clearing goes
    /// bottom up (a summary word after the words below it): a drain stopped half
    /// way leaves every bit it has not cleared reachable, for the next drain.
    fn walk_level(&self, k: usize, idx: usize, from_word: usize, clear: bool, f: &mut dyn FnMut(usize, u64)) {
        let lvl = self.level(k);
        if k == 0 {
            let bits = if clear {
                lvl[idx].swap(0, Ordering::Relaxed)
            } else {
                lvl[idx].load(Ordering::Relaxed)
            };
            if bits != 0 && idx >= from_word {
                f(idx, bits);
            }
            return;
        }
        let bits = lvl[idx].load(Ordering::Relaxed);
        // Each level-k bit covers 64^k leaf words.
        let span = 1usize << (6 * k);
        let mut rest = bits;
        while rest != 0 {
            let b = rest.trailing_zeros() as usize;
            rest &= rest - 1;
            let child = idx * 64 + b;
            if (child + 1) * span / 64 <= from_word && !clear {
                continue;
            }
            self.walk_level(k - 1, child, from_word, clear, f);
        }
        if clear && bits != 0 {
            lvl[idx].fetch_and(!bits, Ordering::Relaxed);
        }
    }

    /// Writes dirty pages back to the file.
    pub fn flush(&self) -> io::Result<()> {
        self.region.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn bitmap(nbits: u64) -> (tempfile::NamedTempFile, AtomicBitmap) {
        let f = tempfile::NamedTempFile::new().unwrap();
        let layout = BitmapLayout::new(nbits);
        f.as_file().set_len(layout.bytes()).unwrap();
        let b = AtomicBitmap::map(f.as_file(), 0, layout).unwrap();
        (f, b)
    }

    fn bits(b: &AtomicBitmap, from: usize) -> BTreeSet<u64> {
        let mut out = BTreeSet::new();
        b.for_each_word(from, |w, mut bits| {
            while bits != 0 {
                out.insert(w as u64 * 64 + bits.trailing_zeros() as u64);
                bits &= bits - 1;
            }
        });
        out
    }

    #[test]
    fn layout_has_one_word_on_top() {
        let l = BitmapLayout::new(1 << 37);
        assert_eq!(l.levels.len(), 7);
        assert_eq!(l.levels.last().unwrap().len(), 1);
        assert_eq!(BitmapLayout::new(1).levels.len(), 1);
    }

    #[test]
    fn set_ranges_and_iterate_sparse() {
        let (_f, b) = bitmap(1 << 30);
        b.set_range(5, 5);
        b.set_range(63, 65);
        b.set_range(1 << 29, (1 << 29) + 200);
        b.set_range((1 << 30) - 1, (1 << 30) - 1);
        let got = bits(&b, 0);
        let mut want: BTreeSet<u64> = [5, 63, 64, 65, (1 << 30) - 1].into_iter().collect();
        want.extend((1 << 29)..=(1 << 29) + 200);
        assert_eq!(got, want);
        // Starting later skips earlier words only.
        let later = bits(&b, 1);
        assert!(!later.contains(&5) && later.contains(&64));
    }

    #[test]
    fn drain_clears_everything() {
        let (_f, b) = bitmap(100_000);
        for i in (0..100_000).step_by(777) {
            b.set_range(i, i + 3);
        }
        let mut n = 0;
        b.drain(|_, bits| n += bits.count_ones());
        assert!(n > 0);
        assert!(bits(&b, 0).is_empty());
        // Marking after a drain works again, summaries included.
        b.set_range(99_999, 99_999);
        assert_eq!(bits(&b, 0).into_iter().collect::<Vec<_>>(), vec![99_999]);
    }

    /// The bits of level `k`, as (word, bit) pairs.
    fn level_bits(b: &AtomicBitmap, k: usize) -> Vec<(usize, u32)> {
        let mut out = Vec::new();
        for (i, w) in b.level(k).iter().enumerate() {
            let mut x = w.load(Ordering::Relaxed);
            while x != 0 {
                out.push((i, x.trailing_zeros()));
                x &= x - 1;
            }
        }
        out
    }

    #[test]
    fn a_mark_is_reachable_even_where_another_writer_stopped_half_way() {
        // A process killed in the middle of one writer's mark: what that writer
        // stored must not hide a mark another writer completed meanwhile. The
        // half-way state is built by hand: another writer's bit in leaf word 6,
        // and its summary bit in level 1 only (as the old bottom-up order left it).
        let (_f, b) = bitmap(1 << 30);
        assert!(b.layout.levels.len() > 3);
        b.leaf()[6].fetch_or(1 << 5, Ordering::Relaxed);
        b.level(1)[0].fetch_or(1 << 6, Ordering::Relaxed);
        // This writer marks another block of the same words and returns: its
        // write completes. Its mark must be reachable from the top now.
        b.set_range(6 * 64 + 9, 6 * 64 + 9);
        assert!(bits(&b, 0).contains(&(6 * 64 + 9)), "the completed mark is reachable");
        // Another word under the same summaries, and a claim by test_and_set.
        let (_f, b) = bitmap(1 << 30);
        b.level(1)[0].fetch_or(1 << 7, Ordering::Relaxed);
        assert!(!b.test_and_set(7 * 64 + 1, Ordering::AcqRel));
        assert!(bits(&b, 0).contains(&(7 * 64 + 1)));
    }

    #[test]
    fn every_set_bit_has_its_summary_bits() {
        // After marks of every shape, each level's bits are covered by the level above.
        let (_f, b) = bitmap(1 << 24);
        b.set_range(3, 3);
        b.set_range(60, 70);
        b.set_range(1 << 20, (1 << 20) + 5000);
        b.test_and_set((1 << 24) - 1, Ordering::Relaxed);
        for k in 0..b.layout.levels.len() - 1 {
            for (w, _) in level_bits(&b, k) {
                let (pw, pbit) = (w / 64, w % 64);
                assert!(
                    b.level(k + 1)[pw].load(Ordering::Relaxed) & (1 << pbit) != 0,
                    "level {k} word {w} has bits but no summary bit"
                );
            }
        }
    }

    #[test]
    fn a_drain_stopped_half_way_leaves_the_rest_reachable() {
        // A process killed in the middle of a drain: what it has not cleared yet
        // must still be found by the next drain (at the next open).
        let (_f, b) = bitmap(1 << 30);
        let marked: Vec<u64> = (0..40).map(|i| i * 3_000_017 % (1 << 30)).collect();
        for &m in &marked {
            b.set_range(m, m);
        }
        let mut seen = 0;
        let stopped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            b.drain(|_, _| {
                seen += 1;
                assert!(seen < 10, "killed here");
            })
        }));
        assert!(stopped.is_err());
        let left = bits(&b, 0);
        assert_eq!(left.len(), marked.len() - 10, "every word not drained yet is still reachable");
        b.drain(|_, _| {});
        assert!(bits(&b, 0).is_empty());
        for k in 0..b.layout.levels.len() {
            assert!(level_bits(&b, k).is_empty(), "level {k} cleared");
        }
    }

    #[test]
    fn test_and_set_reports_previous_state() {
        let (_f, b) = bitmap(1000);
        assert!(!b.test_and_set(700, Ordering::AcqRel));
        assert!(b.test_and_set(700, Ordering::AcqRel));
        assert!(b.test(700, Ordering::Acquire));
        assert_eq!(bits(&b, 0).into_iter().collect::<Vec<_>>(), vec![700]);
    }
}
