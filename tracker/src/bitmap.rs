//! A lock-free flat bitmap of atomic words in a mapped file region, with one
//! summary bit per 4 KiB page of bitmap.
//!
//! ```text
//! region:   [ leaf: one bit per block, in 4 KiB pages ........ ][ summary ]
//! summary:  bit p set  <=  some word of leaf page p may be non-zero
//! ```
//!
//! The leaf is flat, so marking a block touches one leaf word: a block marked
//! before costs one shared load (test-before-set: a hot block never bounces a
//! cache line between writers), a first touch one `fetch_or` on the line the
//! test just loaded. Only the writer that finds a leaf word zero looks at the
//! summary, and sets the page's bit only if it is clear: the summary is set
//! once per leaf page per epoch, so it stays in cache, shared by every writer
//! (one bit per 32768 blocks: 4 KiB of summary covers 1 Gi blocks, a 64 TiB
//! disk at 64 KiB granularity). Iteration and [`drain`](AtomicBitmap::drain)
//! walk the summary and read only the leaf pages it names, so they cost time
//! in proportion to the pages written, not to the bitmap's size; the file is
//! sparse, so pages never written cost no memory.
//!
//! # Crash safety
//! The region is a shared file mapping: every store is in the page cache the
//! moment it is made, and a killed process loses none. The order of the stores
//! keeps one invariant at every instant: **a non-zero leaf word has its page's
//! summary bit set**. A writer sets the summary bit *before* it makes a leaf
//! word non-zero, and `drain` clears a page's words *before* its summary bit.
//! So a process killed at any instruction leaves at worst a summary bit over
//! an empty page (harmless: the page is read and found empty), never a set
//! bit that iteration cannot find. Two consequences matter with several
//! writers: a writer that finds a word non-zero sets no summary bit, and it may
//! rely on that, because whoever made the word non-zero stored the summary bit
//! first (that store is `Release`, so neither the compiler nor the CPU moves
//! the summary store after it; on x86 it is the same instruction as `Relaxed`);
//! and a drain stopped half way leaves every word it has not cleared reachable
//! for the next one. The unit tests kill a mark and a drain before each of
//! their stores, one after the other.
//!
//! # Memory ordering
//! Marking uses `Relaxed` operations. Iteration and clearing are only exact
//! once every marker has finished: the host guarantees that with its I/O gate
//! (a snapshot stuns I/O before the bitmap is frozen), and the gate's lock
//! provides the happens-before edge. [`test`](AtomicBitmap::test) and
//! [`test_and_set`](AtomicBitmap::test_and_set) take an ordering for callers
//! that publish data through a bit (the copy-on-write grain maps of `sim`).

use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::mmap::Region;

/// Words per 4 KiB page of bitmap: one summary bit covers this many leaf words.
pub const PAGE_WORDS: usize = 512;

/// Where the leaf and the summary lie inside the region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapLayout {
    /// Words of the leaf, whole pages.
    leaf_words: usize,
    /// Words of the summary (one bit per leaf page), whole pages.
    summary_words: usize,
}

impl BitmapLayout {
    /// The layout of a bitmap of `nbits` bits.
    pub fn new(nbits: u64) -> Self {
        let leaf_words = (nbits.div_ceil(64).max(1) as usize).next_multiple_of(PAGE_WORDS);
        let pages = leaf_words / PAGE_WORDS;
        let summary_words = pages.div_ceil(64).next_multiple_of(PAGE_WORDS);
        Self {
            leaf_words,
            summary_words,
        }
    }

    /// Bytes the bitmap needs (whole pages).
    pub fn bytes(&self) -> u64 {
        (self.leaf_words + self.summary_words) as u64 * 8
    }
}

/// A flat bitmap of atomic words with a page summary, backed by a mapped file region.
#[derive(Debug)]
pub struct AtomicBitmap {
    region: Region,
    /// Words of the leaf, which starts the region; the summary follows it.
    leaf_words: usize,
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
        debug_assert_eq!(region.words().len(), layout.leaf_words + layout.summary_words);
        Ok(Self {
            region,
            leaf_words: layout.leaf_words,
        })
    }

    /// The leaf words.
    #[inline]
    fn leaf(&self) -> &[AtomicU64] {
        &self.region.words()[..self.leaf_words]
    }

    /// The summary words.
    #[inline]
    fn summary(&self) -> &[AtomicU64] {
        &self.region.words()[self.leaf_words..]
    }

    /// Sets every bit in `first..=last` (bits of the leaf: the caller keeps
    /// them below the `nbits` of the layout). Lock-free; test-before-set. One
    /// bit (a write inside one block) takes the fast path: one load, and on a
    /// first touch one `fetch_or`.
    #[inline(always)]
    pub fn set_range(&self, first: u64, last: u64) {
        if first == last {
            self.set_bit(first);
        } else {
            self.set_span(first, last);
        }
    }

    /// [`set_range`](Self::set_range) of more than one bit.
    #[inline(never)]
    fn set_span(&self, first: u64, last: u64) {
        let (fw, lw) = ((first / 64) as usize, (last / 64) as usize);
        let (lo, hi) = (u64::MAX << (first % 64), u64::MAX >> (63 - last % 64));
        if fw == lw {
            self.or_word(fw, lo & hi);
            return;
        }
        self.or_word(fw, lo);
        for w in fw + 1..lw {
            self.or_word(w, u64::MAX);
        }
        self.or_word(lw, hi);
    }

    /// Sets one bit of the leaf: [`or_word`](Self::or_word) with the test
    /// written as a bit test, so a re-mark builds no mask.
    #[inline(always)]
    fn set_bit(&self, bit: u64) {
        let w = (bit / 64) as usize;
        debug_assert!(w < self.leaf_words, "word {w} is past the leaf");
        let word = &self.region.words()[w];
        // Relaxed: see the module doc.
        let old = word.load(Ordering::Relaxed);
        if (old >> (bit % 64)) & 1 == 0 {
            self.or_new(word, w, old, 1 << (bit % 64));
        }
    }

    /// ORs `mask` into leaf word `w`. Test-before-set.
    #[inline]
    pub fn or_leaf_word(&self, w: usize, mask: u64) {
        self.or_word(w, mask);
    }

    #[inline(always)]
    fn or_word(&self, w: usize, mask: u64) {
        debug_assert!(w < self.leaf_words, "word {w} is past the leaf");
        // The whole region, not `leaf()`: one bounds check on the write path
        // instead of two. A word past the leaf (a caller's bug) would land in
        // the summary: more pages read by a drain, never a bit lost.
        let word = &self.region.words()[w];
        // Relaxed: see the module doc; ordering comes from the host's I/O gate.
        let old = word.load(Ordering::Relaxed);
        if old & mask != mask {
            self.or_new(word, w, old, mask);
        }
    }

    /// ORs `mask` into leaf word `w` (`word`), which held `old` when the
    /// caller loaded it. A word that was non-zero already has its summary
    /// bit: whoever made it non-zero set the bit first. A word that was zero
    /// gets it here, before the word becomes non-zero.
    #[inline(always)]
    fn or_new(&self, word: &AtomicU64, w: usize, old: u64, mask: u64) {
        if old == 0 {
            self.note_page(w);
            kill_point();
            // Release: the summary store above is not moved after this one.
            word.fetch_or(mask, Ordering::Release);
        } else {
            kill_point();
            word.fetch_or(mask, Ordering::Relaxed);
        }
    }

    /// Sets the summary bit of the page holding leaf word `w` (test-before-set).
    /// Called before the word is made non-zero (see the module doc).
    #[inline]
    fn note_page(&self, w: usize) {
        let page = w / PAGE_WORDS;
        let s = &self.region.words()[self.leaf_words + page / 64];
        let bit = 1u64 << (page % 64);
        // Relaxed: summary bits are read only after the gate quiesces writers.
        if s.load(Ordering::Relaxed) & bit == 0 {
            kill_point();
            s.fetch_or(bit, Ordering::Relaxed);
        }
    }

    /// Tests one bit with the given ordering.
    #[inline]
    pub fn test(&self, bit: u64, order: Ordering) -> bool {
        self.leaf()[(bit / 64) as usize].load(order) & (1 << (bit % 64)) != 0
    }

    /// Sets one bit with the given ordering (at least `Release`, so that the
    /// summary bit is stored first); returns whether it was set before.
    #[inline]
    pub fn test_and_set(&self, bit: u64, order: Ordering) -> bool {
        let w = (bit / 64) as usize;
        let mask = 1u64 << (bit % 64);
        self.note_page(w);
        let order = match order {
            Ordering::Relaxed => Ordering::Release,
            Ordering::Acquire => Ordering::AcqRel,
            o => o,
        };
        kill_point();
        self.leaf()[w].fetch_or(mask, order) & mask != 0
    }

    /// Faults in, writable, the pages that setting `bit` writes (its leaf
    /// word and its summary word), changing nothing: for a caller that must
    /// not take a page fault at the moment it sets the bit.
    pub fn prefault(&self, bit: u64) {
        let w = (bit / 64) as usize;
        if w < self.leaf_words {
            self.region.populate_words(w, 1);
            self.region.populate_words(self.leaf_words + w / PAGE_WORDS / 64, 1);
        }
    }

    /// Sets the summary bit of every leaf page among `pages` that holds a
    /// non-zero word. After a power loss the pages of the region reached the
    /// disk in any order, so a leaf word may be set while its summary bit is
    /// not: iteration would skip it, and a later mark of the same word would
    /// not set the bit either (the word is not zero). Recovery calls this on
    /// the leaf pages the file holds data for.
    pub(crate) fn resummarize(&self, pages: impl IntoIterator<Item = usize>) {
        let leaf = self.leaf();
        for p in pages {
            let mut words = leaf.iter().skip(p * PAGE_WORDS).take(PAGE_WORDS);
            if let Some(w) = words.position(|w| w.load(Ordering::Relaxed) != 0) {
                self.note_page(p * PAGE_WORDS + w);
            }
        }
    }

    /// Bytes of the leaf, which starts the region (for finding its pages in the file).
    pub(crate) fn leaf_bytes(&self) -> u64 {
        self.leaf_words as u64 * 8
    }

    /// Counts the set bits (reads only the pages the summary names).
    pub fn count(&self) -> u64 {
        let mut n = 0;
        self.for_each_word(0, |_, b| n += u64::from(b.count_ones()));
        n
    }

    /// Calls `f(word_index, bits)` for every non-zero leaf word at or after
    /// `from_word`, in increasing order. Requires quiescent writers for an
    /// exact answer.
    pub fn for_each_word(&self, from_word: usize, mut f: impl FnMut(usize, u64)) {
        let leaf = self.leaf();
        let first_page = from_word / PAGE_WORDS;
        for (i, s) in self.summary().iter().enumerate().skip(first_page / 64) {
            let mut pages = s.load(Ordering::Relaxed);
            while pages != 0 {
                let page = i * 64 + pages.trailing_zeros() as usize;
                pages &= pages - 1;
                if page < first_page {
                    continue;
                }
                let lo = (page * PAGE_WORDS).max(from_word);
                for (w, word) in leaf.iter().enumerate().take((page + 1) * PAGE_WORDS).skip(lo) {
                    let bits = word.load(Ordering::Relaxed);
                    if bits != 0 {
                        f(w, bits);
                    }
                }
            }
        }
    }

    /// Like [`for_each_word`](Self::for_each_word) from word 0, and clears
    /// every word it visits and then the summary. Requires quiescent writers.
    pub fn drain(&self, f: impl FnMut(usize, u64)) {
        self.drain_pages(usize::MAX, f);
    }

    /// [`drain`](Self::drain) of at most `max_pages` leaf pages (the first
    /// ones): a test stops here to model a process killed half way through.
    /// A page's words are cleared before its summary bit, so at every instant
    /// a non-zero word still has its summary bit.
    pub(crate) fn drain_pages(&self, mut max_pages: usize, mut f: impl FnMut(usize, u64)) {
        let leaf = self.leaf();
        for (i, s) in self.summary().iter().enumerate() {
            let mut pages = s.load(Ordering::Relaxed);
            while pages != 0 {
                if max_pages == 0 {
                    return;
                }
                max_pages -= 1;
                let bit = pages & pages.wrapping_neg();
                pages &= pages - 1;
                let page = i * 64 + bit.trailing_zeros() as usize;
                for (w, word) in leaf.iter().enumerate().skip(page * PAGE_WORDS).take(PAGE_WORDS) {
                    // Plain load and store, no read-modify-write: writers are quiescent.
                    let bits = word.load(Ordering::Relaxed);
                    if bits != 0 {
                        kill_point();
                        word.store(0, Ordering::Relaxed);
                        f(w, bits);
                    }
                }
                kill_point();
                s.fetch_and(!bit, Ordering::Relaxed);
            }
        }
    }

    /// Writes dirty pages back to the file.
    pub fn flush(&self) -> io::Result<()> {
        self.region.flush()
    }

    /// Checks the crash-safety invariant (every non-zero leaf word has its
    /// page's summary bit) by reading the whole leaf. For tests.
    #[cfg(test)]
    pub(crate) fn invariant_holds(&self) -> bool {
        let summary = self.summary();
        self.leaf().iter().enumerate().all(|(w, word)| {
            let page = w / PAGE_WORDS;
            word.load(Ordering::Relaxed) == 0 || summary[page / 64].load(Ordering::Relaxed) & (1 << (page % 64)) != 0
        })
    }
}

/// Where a store of the bitmap is about to happen. In unit tests, a test can
/// make it panic once a number of stores were made, as if the process was
/// killed there (see the tests); elsewhere it is nothing.
#[inline(always)]
fn kill_point() {
    #[cfg(test)]
    tests::kill_point();
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::cell::Cell;
    use std::collections::BTreeSet;

    fn bitmap(nbits: u64) -> (tempfile::NamedTempFile, AtomicBitmap) {
        let f = tempfile::NamedTempFile::new().unwrap();
        let layout = BitmapLayout::new(nbits);
        f.as_file().set_len(layout.bytes()).unwrap();
        let b = AtomicBitmap::map(f.as_file(), 0, layout).unwrap();
        (f, b)
    }

    /// The same file mapped again: what a process that reopens it after a kill sees.
    fn remap(f: &tempfile::NamedTempFile, nbits: u64) -> AtomicBitmap {
        AtomicBitmap::map(f.as_file(), 0, BitmapLayout::new(nbits)).unwrap()
    }

    fn bits(b: &AtomicBitmap, from: usize) -> BTreeSet<u64> {
        let mut out = BTreeSet::new();
        let mut last = None;
        b.for_each_word(from, |w, mut bits| {
            assert!(last < Some(w), "words in increasing order");
            last = Some(w);
            while bits != 0 {
                out.insert(w as u64 * 64 + bits.trailing_zeros() as u64);
                bits &= bits - 1;
            }
        });
        out
    }

    #[test]
    fn layout_is_leaf_then_one_summary_bit_per_page() {
        // 64 TiB at 64 KiB: 2^30 blocks, 128 MiB of leaf, 32768 pages: 4 KiB of summary.
        let l = BitmapLayout::new(1 << 30);
        assert_eq!(l.leaf_words, 1 << 24);
        assert_eq!(l.summary_words, PAGE_WORDS);
        assert_eq!(l.bytes(), (128 << 20) + 4096);
        // Small bitmaps still take a whole page of each.
        assert_eq!(BitmapLayout::new(1).bytes(), 8192);
        assert_eq!(BitmapLayout::new((1 << 30) + 1).summary_words, 2 * PAGE_WORDS);
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
        assert!(b.invariant_holds());
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
        assert!(b.summary().iter().all(|s| s.load(Ordering::Relaxed) == 0));
        // Marking after a drain works again, summaries included.
        b.set_range(99_999, 99_999);
        assert_eq!(bits(&b, 0).into_iter().collect::<Vec<_>>(), vec![99_999]);
    }

    #[test]
    fn test_and_set_reports_previous_state() {
        let (_f, b) = bitmap(1000);
        assert!(!b.test_and_set(700, Ordering::AcqRel));
        assert!(b.test_and_set(700, Ordering::AcqRel));
        assert!(b.test(700, Ordering::Acquire));
        assert_eq!(bits(&b, 0).into_iter().collect::<Vec<_>>(), vec![700]);
        assert_eq!(b.count(), 1);
    }

    #[test]
    fn concurrent_markers_lose_no_bit() {
        let (_f, b) = bitmap(1 << 20);
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let b = &b;
                s.spawn(move || {
                    // Interleaved blocks: every word and page is shared by all threads.
                    for i in 0..20_000u64 {
                        let blk = (i * 4 + t) * 13 % (1 << 20);
                        b.set_range(blk, blk);
                    }
                });
            }
        });
        let want: BTreeSet<u64> = (0..4u64)
            .flat_map(|t| (0..20_000u64).map(move |i| (i * 4 + t) * 13 % (1 << 20)))
            .collect();
        assert_eq!(bits(&b, 0), want);
        assert!(b.invariant_holds());
    }

    /// One operation of the model test.
    #[derive(Debug, Clone)]
    enum Op {
        Range(u64, u64),
        TestAndSet(u64),
        OrWord(usize, u64),
    }

    /// 3 leaf pages and a bit: ranges straddle words and pages.
    const NBITS: u64 = 3 * 32768 + 1;

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0..NBITS, 0..200u64).prop_map(|(a, n)| Op::Range(a, (a + n).min(NBITS - 1))),
            (0..NBITS).prop_map(Op::TestAndSet),
            (0..NBITS.div_ceil(64) as usize, any::<u64>())
                .prop_map(|(w, m)| {
                    let last = NBITS.div_ceil(64) as usize - 1;
                    // The last word holds only NBITS % 64 valid bits.
                    (w, if w == last { m & 1 } else { m })
                })
                .prop_map(|(w, m)| Op::OrWord(w, m)),
        ]
    }

    fn push_bits(out: &mut Vec<u64>, w: usize, mut m: u64) {
        while m != 0 {
            out.push(w as u64 * 64 + u64::from(m.trailing_zeros()));
            m &= m - 1;
        }
    }

    fn apply(b: &AtomicBitmap, model: &mut BTreeSet<u64>, op: &Op) {
        match *op {
            Op::Range(a, z) => {
                b.set_range(a, z);
                model.extend(a..=z);
            }
            Op::TestAndSet(x) => {
                assert_eq!(b.test_and_set(x, Ordering::AcqRel), model.contains(&x));
                model.insert(x);
            }
            Op::OrWord(w, m) => {
                b.or_leaf_word(w, m);
                model.extend((0..64).filter(|i| m & (1 << i) != 0).map(|i| w as u64 * 64 + i));
            }
        }
    }

    thread_local! {
        /// Stores this thread may still make before it is "killed" (`None`: no limit).
        static STORES_LEFT: Cell<Option<usize>> = const { Cell::new(None) };
    }

    /// The unwinding payload of a "kill".
    struct Killed;

    pub(super) fn kill_point() {
        match STORES_LEFT.get() {
            None => {}
            // Unwinds without the panic hook: no message for an expected kill.
            Some(0) => std::panic::resume_unwind(Box::new(Killed)),
            Some(n) => STORES_LEFT.set(Some(n - 1)),
        }
    }

    /// Runs `f`, killed before its store number `n` (0: before the first).
    /// Returns whether it completed.
    fn killed_before_store(n: usize, f: impl FnOnce()) -> bool {
        STORES_LEFT.set(Some(n));
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        STORES_LEFT.set(None);
        match r {
            Ok(()) => true,
            Err(e) if e.is::<Killed>() => false,
            Err(e) => std::panic::resume_unwind(e),
        }
    }

    /// Every shape of a mark: one bit of a fresh word, of a word that has bits,
    /// a range over two pages, a claim, a word.
    fn mark_shapes() -> Vec<Op> {
        vec![
            Op::Range(70_000, 70_000),
            Op::Range(5 * 64 + 1, 5 * 64 + 1),
            Op::Range(32_700, 32_900),
            Op::TestAndSet(40_000),
            Op::TestAndSet(5 * 64 + 2),
            Op::OrWord(1000, 0xff00),
        ]
    }

    /// The bits `op` sets.
    fn op_bits(op: &Op) -> BTreeSet<u64> {
        match *op {
            Op::Range(a, z) => (a..=z).collect(),
            Op::TestAndSet(x) => [x].into(),
            Op::OrWord(w, m) => {
                let mut v = Vec::new();
                push_bits(&mut v, w, m);
                v.into_iter().collect()
            }
        }
    }

    /// Marks already there before the mark that is killed.
    fn premarked() -> ((tempfile::NamedTempFile, AtomicBitmap), BTreeSet<u64>) {
        let (f, b) = bitmap(NBITS);
        let mut model = BTreeSet::new();
        for op in [Op::Range(5 * 64, 5 * 64), Op::Range(33_000, 33_100)] {
            apply(&b, &mut model, &op);
        }
        ((f, b), model)
    }

    #[test]
    fn a_mark_killed_before_any_of_its_stores_leaves_every_bit_reachable() {
        for op in mark_shapes() {
            for n in 0.. {
                assert!(n < 16, "{op:?} makes at most a few stores");
                let ((f, b), before) = premarked();
                let mut after = before.clone();
                after.extend(op_bits(&op));
                let done = killed_before_store(n, || apply(&b, &mut before.clone(), &op));
                drop(b);
                let b = remap(&f, NBITS);
                assert!(b.invariant_holds(), "{op:?} killed before store {n}");
                let found = bits(&b, 0);
                assert!(
                    found.is_superset(&before) && found.is_subset(&after),
                    "{op:?} killed before store {n}"
                );
                if done {
                    assert_eq!(found, after, "{op:?}");
                    break;
                }
            }
        }
    }

    #[test]
    fn a_mark_completed_beside_one_killed_half_way_is_reachable() {
        // Writer A is killed part way through a mark of word 6 (or of a range
        // that covers it); writer B, which saw what A stored, marks another bit
        // of the same word and completes. B's mark must be found after the
        // kill: if A made the word non-zero before it set the page's summary
        // bit, B would find the word non-zero, set no summary bit, and its
        // mark would be unreachable.
        let a_marks = [
            Op::Range(6 * 64 + 5, 6 * 64 + 5),
            Op::Range(6 * 64 + 60, 7 * 64 + 3),
            Op::TestAndSet(6 * 64 + 5),
            Op::OrWord(6, 0b1111),
        ];
        let b_marks = [
            Op::Range(6 * 64 + 40, 6 * 64 + 40),
            Op::TestAndSet(6 * 64 + 41),
            Op::OrWord(6, 1 << 50),
        ];
        for a in &a_marks {
            for b_op in &b_marks {
                for n in 0.. {
                    assert!(n < 16);
                    let (f, b) = bitmap(NBITS);
                    let done = killed_before_store(n, || apply(&b, &mut BTreeSet::new(), a));
                    match *b_op {
                        Op::TestAndSet(x) => drop(b.test_and_set(x, Ordering::AcqRel)),
                        _ => apply(&b, &mut BTreeSet::new(), b_op),
                    }
                    let mine = op_bits(b_op);
                    drop(b);
                    let b = remap(&f, NBITS);
                    assert!(b.invariant_holds(), "{a:?} killed before store {n}, then {b_op:?}");
                    assert!(
                        bits(&b, 0).is_superset(&mine),
                        "{b_op:?} is lost after {a:?} was killed before store {n}"
                    );
                    if done {
                        break;
                    }
                }
            }
        }
    }

    #[test]
    fn a_drain_killed_before_any_of_its_stores_leaves_the_rest_reachable() {
        // Several words in each of three pages.
        let ops = [
            Op::Range(3, 3),
            Op::Range(640, 700),
            Op::Range(32_000, 33_000),
            Op::OrWord(1100, 7),
            Op::Range(NBITS - 1, NBITS - 1),
        ];
        let mut model = BTreeSet::new();
        for n in 0.. {
            assert!(n < 200);
            let (f, b) = bitmap(NBITS);
            model.clear();
            for op in &ops {
                apply(&b, &mut model, op);
            }
            let mut got = Vec::new();
            let done = killed_before_store(n, || b.drain(|w, m| push_bits(&mut got, w, m)));
            drop(b);
            let b = remap(&f, NBITS);
            assert!(b.invariant_holds(), "drain killed before store {n}");
            let first = got.len();
            b.drain(|w, m| push_bits(&mut got, w, m));
            let all: BTreeSet<u64> = got.iter().copied().collect();
            assert_eq!(all.len(), got.len(), "killed before store {n}: no bit drained twice");
            assert_eq!(all, model, "killed before store {n}: the two drains return every bit");
            if done {
                assert_eq!(first, got.len(), "a completed drain leaves nothing");
                break;
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Against a `BTreeSet`: set, test, iterate from any word, count,
        /// drain; the invariant after every step.
        #[test]
        fn matches_a_set(ops in prop::collection::vec(op(), 1..60), from in 0..NBITS.div_ceil(64) as usize) {
            let (_f, b) = bitmap(NBITS);
            let mut model = BTreeSet::new();
            for op in &ops {
                apply(&b, &mut model, op);
                prop_assert!(b.invariant_holds());
            }
            prop_assert_eq!(&bits(&b, 0), &model);
            let later: BTreeSet<u64> = model.range(from as u64 * 64..).copied().collect();
            prop_assert_eq!(bits(&b, from), later);
            prop_assert_eq!(b.count(), model.len() as u64);
            for &x in model.iter().take(20) {
                prop_assert!(b.test(x, Ordering::Relaxed));
            }
            let mut drained = BTreeSet::new();
            b.drain(|w, mut m| {
                while m != 0 {
                    drained.insert(w as u64 * 64 + u64::from(m.trailing_zeros()));
                    m &= m - 1;
                }
            });
            prop_assert_eq!(drained, model);
            prop_assert!(bits(&b, 0).is_empty());
        }

        /// A drain killed after `k` pages, then the file mapped again (a new
        /// process) and drained again: the two drains together return every
        /// bit exactly once, and the invariant holds after the kill.
        #[test]
        fn a_drain_killed_half_way_loses_nothing(ops in prop::collection::vec(op(), 1..40), k in 0..4usize) {
            let (f, b) = bitmap(NBITS);
            let mut model = BTreeSet::new();
            for op in &ops {
                apply(&b, &mut model, op);
            }
            let mut got = Vec::new();
            b.drain_pages(k, |w, m| push_bits(&mut got, w, m));
            drop(b);
            let b = remap(&f, NBITS);
            prop_assert!(b.invariant_holds());
            b.drain(|w, m| push_bits(&mut got, w, m));
            let n = got.len();
            let got: BTreeSet<u64> = got.into_iter().collect();
            prop_assert_eq!(n, got.len(), "no bit returned twice");
            prop_assert_eq!(got, model);
        }
    }
}
