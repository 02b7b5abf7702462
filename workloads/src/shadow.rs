//! The shadow disk: a reference model of what a run wrote, to verify the tracker's answers
//! and the data a backup copies.
//!
//! # Design
//! [`ShadowDisk`] keeps, per byte range, the seed of the write that last wrote it (a
//! `BTreeMap` of non-overlapping extents `start -> (end, seed)`; unwritten and unmapped
//! bytes are absent and read as zero), so [`ShadowDisk::expected`] can recompute any range
//! with [`fill_pattern`]. Next to it, the bytes changed since the last checkpoint are a
//! coalesced extent set; [`ShadowDisk::checkpoint`] closes that set, and queries between
//! two checkpoints take the union of the closed sets in between.
//!
//! A *change* is a write or an unmap (an unmap changes the content to zeroes: a backup that
//! skipped it would restore stale data). Growing the disk changes nothing: the new area
//! reads as zeroes. Memory is proportional to the number of distinct extents, not to the
//! disk size.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::op::{fill_pattern, IoOp};

/// A checkpoint of a [`ShadowDisk`] (the `n`-th, from 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct CheckpointId(pub u64);

/// Why the shadow refused an operation or a query.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ShadowError {
    /// An operation reaches past the disk's end.
    #[error("{op} of {len} bytes at {offset} runs past the disk's end at {size}")]
    OutOfRange {
        /// The operation.
        op: &'static str,
        /// Its offset.
        offset: u64,
        /// Its length.
        len: u64,
        /// The disk's size.
        size: u64,
    },
    /// An extend to a size that is not larger.
    #[error("cannot extend the disk from {size} to {new_size} bytes")]
    Shrink {
        /// The current size.
        size: u64,
        /// The size asked for.
        new_size: u64,
    },
    /// No such checkpoint was taken.
    #[error("unknown checkpoint {0:?}")]
    UnknownCheckpoint(CheckpointId),
    /// The first checkpoint of a query is later than the second.
    #[error("checkpoint {from:?} is later than {to:?}")]
    Order {
        /// The first checkpoint.
        from: CheckpointId,
        /// The second one.
        to: CheckpointId,
    },
    /// A granularity of zero.
    #[error("the granularity must be at least 1 byte")]
    ZeroGranularity,
}

/// A coalesced set of byte ranges: `start -> end`, non-overlapping, non-adjacent.
type RangeSet = BTreeMap<u64, u64>;

/// Adds `[s, e)` to a coalesced set.
fn set_insert(set: &mut RangeSet, mut s: u64, mut e: u64) {
    if s >= e {
        return;
    }
    if let Some((&ls, &le)) = set.range(..=s).next_back() {
        if le >= s {
            s = ls;
            e = e.max(le);
        }
    }
    let covered: Vec<(u64, u64)> = set.range(s..=e).map(|(&a, &b)| (a, b)).collect();
    for (a, b) in covered {
        set.remove(&a);
        e = e.max(b);
    }
    set.insert(s, e);
}

/// Removes `[s, e)` from a map of non-overlapping extents `start -> (end, value)`,
/// splitting the extents it cuts.
fn carve<V: Copy>(map: &mut BTreeMap<u64, (u64, V)>, s: u64, e: u64) {
    if let Some((&ls, &(le, v))) = map.range(..s).next_back() {
        if le > s {
            map.insert(ls, (s, v));
            if le > e {
                map.insert(e, (le, v));
            }
        }
    }
    let inside: Vec<u64> = map.range(s..e).map(|(&k, _)| k).collect();
    for k in inside {
        let (ke, v) = map.remove(&k).expect("listed key");
        if ke > e {
            map.insert(e, (ke, v));
        }
    }
}

/// Sorts and coalesces `(start, len)` areas, dropping empty ones.
fn normalize(areas: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut set = RangeSet::new();
    for &(s, l) in areas {
        set_insert(&mut set, s, s.saturating_add(l));
    }
    set.into_iter().map(|(s, e)| (s, e - s)).collect()
}

/// A reference model of a disk's content and of what changed between checkpoints.
#[derive(Clone, Debug, Default)]
pub struct ShadowDisk {
    size: u64,
    /// `start -> (end, seed)` of written bytes; absent bytes are zero.
    data: BTreeMap<u64, (u64, u64)>,
    /// Bytes changed since the last checkpoint.
    open: RangeSet,
    /// Per checkpoint `n`: the bytes changed between checkpoint `n-1` (or creation) and
    /// `n`, and the disk's size at `n`.
    closed: Vec<(RangeSet, u64)>,
}

impl ShadowDisk {
    /// An all-zero disk of `size` bytes with no checkpoint yet.
    pub fn new(size: u64) -> Self {
        ShadowDisk {
            size,
            ..Default::default()
        }
    }

    /// The disk's current size.
    pub fn size(&self) -> u64 {
        self.size
    }

    fn check(&self, op: &'static str, offset: u64, len: u64) -> Result<(), ShadowError> {
        if offset.checked_add(len).is_some_and(|end| end <= self.size) {
            Ok(())
        } else {
            Err(ShadowError::OutOfRange {
                op,
                offset,
                len,
                size: self.size,
            })
        }
    }

    /// Records a write of `len` bytes at `offset` with content seed `seed`.
    pub fn write(&mut self, offset: u64, len: u64, seed: u64) -> Result<(), ShadowError> {
        self.check("write", offset, len)?;
        if len > 0 {
            carve(&mut self.data, offset, offset + len);
            self.data.insert(offset, (offset + len, seed));
            set_insert(&mut self.open, offset, offset + len);
        }
        Ok(())
    }

    /// Records an unmap: the range reads as zeroes from now on.
    pub fn unmap(&mut self, offset: u64, len: u64) -> Result<(), ShadowError> {
        self.check("unmap", offset, len)?;
        if len > 0 {
            carve(&mut self.data, offset, offset + len);
            set_insert(&mut self.open, offset, offset + len);
        }
        Ok(())
    }

    /// Grows the disk to `new_size` bytes; the new area reads as zeroes.
    pub fn extend(&mut self, new_size: u64) -> Result<(), ShadowError> {
        if new_size <= self.size {
            return Err(ShadowError::Shrink {
                size: self.size,
                new_size,
            });
        }
        self.size = new_size;
        Ok(())
    }

    /// Applies an operation (reads and flushes change nothing, but a read must be in range).
    pub fn apply(&mut self, op: &IoOp) -> Result<(), ShadowError> {
        match *op {
            IoOp::Write { offset, len, seed } => self.write(offset, len, seed),
            IoOp::Read { offset, len } => self.check("read", offset, len),
            IoOp::Unmap { offset, len } => self.unmap(offset, len),
            IoOp::Flush => Ok(()),
            IoOp::Extend { new_size } => self.extend(new_size),
        }
    }

    /// The written extents `(offset, len, seed)` in order; the rest of the disk is zero.
    pub fn written(&self) -> impl Iterator<Item = (u64, u64, u64)> + '_ {
        self.data.iter().map(|(&s, &(e, seed))| (s, e - s, seed))
    }

    /// The bytes the disk must hold at `[offset, offset + len)`.
    ///
    /// # Panics
    /// If the range runs past the disk's end.
    pub fn expected(&self, offset: u64, len: u64) -> Vec<u8> {
        if let Err(e) = self.check("expected", offset, len) {
            panic!("{e}");
        }
        let end = offset + len;
        let mut buf = vec![0u8; len as usize];
        let first = self.data.range(..=offset).next_back().map_or(offset, |(&s, _)| s);
        for (&s, &(e, seed)) in self.data.range(first..end) {
            let (from, to) = (s.max(offset), e.min(end));
            if from < to {
                fill_pattern(seed, from, &mut buf[(from - offset) as usize..(to - offset) as usize]);
            }
        }
        buf
    }

    /// Closes the current change set: later changes count after this checkpoint.
    pub fn checkpoint(&mut self) -> CheckpointId {
        let changes = std::mem::take(&mut self.open);
        self.closed.push((changes, self.size));
        CheckpointId(self.closed.len() as u64 - 1)
    }

    /// The disk's size at a checkpoint.
    pub fn size_at(&self, c: CheckpointId) -> Result<u64, ShadowError> {
        self.closed
            .get(c.0 as usize)
            .map(|&(_, size)| size)
            .ok_or(ShadowError::UnknownCheckpoint(c))
    }

    /// The exact bytes changed (written or unmapped) after checkpoint `a` and up to
    /// checkpoint `b`: sorted, coalesced `(start, len)` areas.
    pub fn changed_bytes_exact(&self, a: CheckpointId, b: CheckpointId) -> Result<Vec<(u64, u64)>, ShadowError> {
        self.size_at(a)?;
        self.size_at(b)?;
        if a > b {
            return Err(ShadowError::Order { from: a, to: b });
        }
        let mut union = RangeSet::new();
        for (set, _) in &self.closed[a.0 as usize + 1..=b.0 as usize] {
            for (&s, &e) in set {
                set_insert(&mut union, s, e);
            }
        }
        Ok(union.into_iter().map(|(s, e)| (s, e - s)).collect())
    }

    /// The blocks of `granularity` bytes changed after `a` and up to `b`, as a tracker
    /// must report them: every block a change touched, coalesced into byte areas, the last
    /// block clipped at the disk's end (its size at `b`).
    pub fn changed_between(
        &self,
        a: CheckpointId,
        b: CheckpointId,
        granularity: u64,
    ) -> Result<Vec<(u64, u64)>, ShadowError> {
        if granularity == 0 {
            return Err(ShadowError::ZeroGranularity);
        }
        let size = self.size_at(b)?;
        let g = granularity;
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (s, len) in self.changed_bytes_exact(a, b)? {
            let start = s / g * g;
            let end = (s + len).div_ceil(g).saturating_mul(g).min(size);
            match out.last_mut() {
                Some((ls, ll)) if *ls + *ll >= start => *ll = end - *ls,
                _ => out.push((start, end - start)),
            }
        }
        Ok(out)
    }
}

/// How a tracker's report of changed areas compares with the truth.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    /// Blocks of the granularity that hold a changed byte the report does not cover:
    /// data a backup would lose. Must be 0.
    pub missed_blocks: u64,
    /// Changed bytes the report does not cover.
    pub missed_bytes: u64,
    /// Reported bytes that did not change (false positives: allowed, but cost copying).
    pub extra_bytes: u64,
    /// Reported bytes over truly changed bytes (1.0 when both are empty; infinite when
    /// only the truth is empty).
    pub over_report_ratio: f64,
}

impl Verdict {
    /// Whether nothing was missed.
    pub fn is_safe(&self) -> bool {
        self.missed_bytes == 0
    }
}

/// Compares `reported` areas with the `expected` ones (from [`ShadowDisk::changed_between`]
/// or [`ShadowDisk::changed_bytes_exact`]); both are `(start, len)` byte areas, in any
/// order, possibly overlapping. `granularity` (> 0) counts missed blocks.
pub fn check_report(expected: &[(u64, u64)], reported: &[(u64, u64)], granularity: u64) -> Verdict {
    let g = granularity.max(1);
    let expected = normalize(expected);
    let reported = normalize(reported);
    let total = |v: &[(u64, u64)]| v.iter().map(|a| a.1).sum::<u64>();
    let (exp_bytes, rep_bytes) = (total(&expected), total(&reported));

    let mut covered = 0; // bytes of expected inside reported
    let mut missed_blocks = 0;
    let mut last_block: Option<u64> = None; // last missed block counted
    let mut j = 0;
    for &(s, l) in &expected {
        let e = s + l;
        let mut pos = s;
        while j < reported.len() && reported[j].0 + reported[j].1 <= s {
            j += 1;
        }
        let mut k = j;
        while pos < e {
            // The next reported area that may cover `pos`.
            let (gap_end, cover_end) = match reported.get(k) {
                Some(&(rs, rl)) if rs < e => (rs.max(pos), (rs + rl).min(e)),
                _ => (e, e),
            };
            if gap_end > pos {
                // [pos, gap_end) is missed.
                let (first, last) = (pos / g, (gap_end - 1) / g);
                let first = last_block.map_or(first, |b| first.max(b + 1));
                missed_blocks += (last + 1).saturating_sub(first);
                last_block = Some(last_block.map_or(last, |b| b.max(last)));
            }
            if cover_end > gap_end {
                covered += cover_end - gap_end;
            }
            pos = cover_end.max(gap_end);
            k += 1;
        }
    }
    let over_report_ratio = match (exp_bytes, rep_bytes) {
        (0, 0) => 1.0,
        (0, _) => f64::INFINITY,
        (e, r) => r as f64 / e as f64,
    };
    Verdict {
        missed_blocks,
        missed_bytes: exp_bytes - covered,
        extra_bytes: rep_bytes - covered,
        over_report_ratio,
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn write_overwrite_unmap_expected() {
        let mut d = ShadowDisk::new(4096);
        d.write(0, 1024, 1).unwrap();
        d.write(512, 1024, 2).unwrap();
        d.unmap(256, 128).unwrap();
        let got = d.expected(0, 4096);
        let mut want = vec![0u8; 4096];
        fill_pattern(1, 0, &mut want[..512]);
        fill_pattern(2, 512, &mut want[512..1536]);
        want[256..384].fill(0);
        assert_eq!(got, want);
        assert_eq!(d.expected(300, 10), want[300..310]);
        assert_eq!(
            d.written().collect::<Vec<_>>(),
            vec![(0, 256, 1), (384, 128, 1), (512, 1024, 2)]
        );
    }

    #[test]
    fn checkpoints_and_changes() {
        let mut d = ShadowDisk::new(10_000);
        let c0 = d.checkpoint();
        d.write(100, 10, 1).unwrap();
        d.write(5000, 1, 2).unwrap();
        let c1 = d.checkpoint();
        d.unmap(9990, 10).unwrap();
        d.extend(20_000).unwrap();
        d.write(19_999, 1, 3).unwrap();
        let c2 = d.checkpoint();
        assert_eq!(d.changed_bytes_exact(c0, c1).unwrap(), vec![(100, 10), (5000, 1)]);
        assert_eq!(d.changed_between(c0, c1, 4096).unwrap(), vec![(0, 8192)]);
        // Clipped at the size of the time: 10,000 at c1.
        assert_eq!(
            d.changed_between(c1, c2, 4096).unwrap(),
            vec![(8192, 4096), (16384, 3616)]
        );
        assert_eq!(d.changed_between(c0, c0, 512).unwrap(), vec![]);
        assert_eq!(d.changed_between(c0, c2, 1 << 20).unwrap(), vec![(0, 20_000)]);
        assert_eq!(
            d.changed_between(c2, c0, 1),
            Err(ShadowError::Order { from: c2, to: c0 })
        );
        assert_eq!(
            d.changed_between(c0, CheckpointId(9), 1),
            Err(ShadowError::UnknownCheckpoint(CheckpointId(9)))
        );
        assert_eq!(d.changed_between(c0, c1, 0), Err(ShadowError::ZeroGranularity));
    }

    #[test]
    fn out_of_range_and_shrink() {
        let mut d = ShadowDisk::new(1024);
        assert!(d.write(1000, 25, 0).is_err());
        assert!(d.apply(&IoOp::Read { offset: 1024, len: 1 }).is_err());
        assert!(d.unmap(u64::MAX, 2).is_err());
        assert_eq!(
            d.extend(1024),
            Err(ShadowError::Shrink {
                size: 1024,
                new_size: 1024
            })
        );
        d.apply(&IoOp::Extend { new_size: 2048 }).unwrap();
        d.apply(&IoOp::Write {
            offset: 1024,
            len: 1024,
            seed: 5,
        })
        .unwrap();
        assert_eq!(d.size(), 2048);
    }

    #[test]
    fn check_report_counts() {
        let truth = [(0, 4096), (8192, 4096)];
        let v = check_report(&truth, &truth, 4096);
        assert_eq!((v.missed_blocks, v.missed_bytes, v.extra_bytes), (0, 0, 0));
        assert_eq!(v.over_report_ratio, 1.0);
        assert!(v.is_safe());
        let v = check_report(&truth, &[(0, 16384)], 4096);
        assert_eq!((v.missed_blocks, v.extra_bytes, v.over_report_ratio), (0, 8192, 2.0));
        let v = check_report(&truth, &[(0, 512)], 512);
        assert_eq!((v.missed_blocks, v.missed_bytes, v.extra_bytes), (15, 7680, 0));
        assert!(!v.is_safe());
        assert_eq!(check_report(&[], &[], 1).over_report_ratio, 1.0);
        assert_eq!(check_report(&[], &[(0, 1)], 1).over_report_ratio, f64::INFINITY);
    }

    /// An operation of the property test.
    #[derive(Clone, Debug)]
    enum Op {
        Write(u64, u64, u64),
        Unmap(u64, u64),
        Extend(u64),
        Checkpoint,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u64..3000, 1u64..700, any::<u64>()).prop_map(|(o, l, s)| Op::Write(o, l, s)),
            2 => (0u64..3000, 1u64..900).prop_map(|(o, l)| Op::Unmap(o, l)),
            1 => (1u64..600).prop_map(Op::Extend),
            2 => Just(Op::Checkpoint),
        ]
    }

    /// The naive model: a byte array and, per epoch, a changed flag per byte.
    struct Naive {
        bytes: Vec<u8>,
        /// `(changed flags, size at the checkpoint)` per closed epoch.
        closed: Vec<(Vec<bool>, usize)>,
        open: Vec<bool>,
    }

    impl Naive {
        fn changed(&self, a: usize, b: usize) -> Vec<bool> {
            let mut c = vec![false; self.bytes.len()];
            for (flags, _) in &self.closed[a + 1..=b] {
                for (i, &f) in flags.iter().enumerate() {
                    c[i] |= f;
                }
            }
            c
        }

        /// Runs of `true` in `flags` as areas.
        fn runs(flags: &[bool]) -> Vec<(u64, u64)> {
            let mut out: Vec<(u64, u64)> = Vec::new();
            for (i, &f) in flags.iter().enumerate() {
                if f {
                    match out.last_mut() {
                        Some((s, l)) if *s + *l == i as u64 => *l += 1,
                        _ => out.push((i as u64, 1)),
                    }
                }
            }
            out
        }

        fn blocks(&self, changed: &[bool], b: usize, g: usize) -> Vec<(u64, u64)> {
            let size = self.closed[b].1;
            let mut flags = vec![false; size];
            for (i, _) in changed.iter().enumerate().filter(|(_, &c)| c) {
                let blk = i / g;
                for f in &mut flags[blk * g..((blk + 1) * g).min(size)] {
                    *f = true;
                }
            }
            Self::runs(&flags)
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        #[test]
        fn shadow_matches_naive_model(
            ops in proptest::collection::vec(op(), 1..40),
            initial in 1u64..3000,
            report in proptest::collection::vec((0u64..5000, 1u64..800), 0..6),
        ) {
            let mut d = ShadowDisk::new(initial);
            let mut n = Naive { bytes: vec![0; initial as usize], closed: Vec::new(), open: vec![false; initial as usize] };
            d.checkpoint();
            n.closed.push((vec![false; initial as usize], initial as usize));
            for op in ops {
                let size = n.bytes.len() as u64;
                match op {
                    Op::Write(o, l, s) => {
                        let r = d.write(o, l, s);
                        prop_assert_eq!(r.is_ok(), o + l <= size);
                        if r.is_ok() {
                            fill_pattern(s, o, &mut n.bytes[o as usize..(o + l) as usize]);
                            n.open[o as usize..(o + l) as usize].fill(true);
                        }
                    }
                    Op::Unmap(o, l) => {
                        let r = d.unmap(o, l);
                        prop_assert_eq!(r.is_ok(), o + l <= size);
                        if r.is_ok() {
                            n.bytes[o as usize..(o + l) as usize].fill(0);
                            n.open[o as usize..(o + l) as usize].fill(true);
                        }
                    }
                    Op::Extend(by) => {
                        d.extend(size + by).unwrap();
                        n.bytes.resize((size + by) as usize, 0);
                        n.open.resize((size + by) as usize, false);
                    }
                    Op::Checkpoint => {
                        d.checkpoint();
                        let len = n.bytes.len();
                        n.closed.push((std::mem::replace(&mut n.open, vec![false; len]), len));
                    }
                }
            }
            d.checkpoint();
            let len = n.bytes.len();
            n.closed.push((std::mem::replace(&mut n.open, vec![false; len]), len));
            for (flags, _) in &mut n.closed {
                flags.resize(len, false);
            }

            prop_assert_eq!(d.expected(0, d.size()), n.bytes.clone());
            let cps = n.closed.len();
            for a in 0..cps {
                for b in a..cps {
                    let (ca, cb) = (CheckpointId(a as u64), CheckpointId(b as u64));
                    let changed = n.changed(a, b);
                    let truth = Naive::runs(&changed);
                    prop_assert_eq!(&d.changed_bytes_exact(ca, cb).unwrap(), &truth);
                    for g in [1u64, 7, 512, 4096] {
                        let blocks = d.changed_between(ca, cb, g).unwrap();
                        prop_assert_eq!(&blocks, &n.blocks(&changed, b, g as usize));
                        let v = check_report(&blocks, &blocks, g);
                        prop_assert!(v.is_safe() && v.extra_bytes == 0);
                        // Against an arbitrary report, byte by byte.
                        let mut rep = vec![false; 6000];
                        for &(s, l) in &report {
                            rep[s as usize..(s + l) as usize].fill(true);
                        }
                        let mut want_missed = 0;
                        let mut want_blocks = std::collections::BTreeSet::new();
                        let mut want_covered = 0;
                        for &(s, l) in &truth {
                            for i in s..s + l {
                                if rep[i as usize] { want_covered += 1 } else {
                                    want_missed += 1;
                                    want_blocks.insert(i / g);
                                }
                            }
                        }
                        let rep_total = rep.iter().filter(|&&x| x).count() as u64;
                        let v = check_report(&truth, &report, g);
                        prop_assert_eq!(v.missed_bytes, want_missed);
                        prop_assert_eq!(v.missed_blocks, want_blocks.len() as u64);
                        prop_assert_eq!(v.extra_bytes, rep_total - want_covered);
                    }
                }
            }
        }
    }
}
