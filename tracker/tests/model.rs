//! The tracker against a plain model: a set of blocks per epoch, through
//! snapshots, removals, settles, clean reopens and killed processes.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use tracker::{Granularity, QueryError, Since, Tracker};

#[derive(Debug, Clone)]
enum Op {
    Write {
        off: u64,
        len: u64,
    },
    Snapshot,
    Remove(usize),
    Settle,
    /// The process is killed and the tracker reopened.
    Crash,
    /// A clean close and reopen.
    Reopen,
}

fn op(cap: u64) -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..cap, 1..cap / 8).prop_map(move |(off, len)| Op::Write { off, len: len.min(cap - off) }),
        2 => Just(Op::Snapshot),
        1 => (0..8usize).prop_map(Op::Remove),
        1 => Just(Op::Settle),
        1 => Just(Op::Crash),
        1 => Just(Op::Reopen),
    ]
}

/// Blocks written in epochs `(s, t]`, as coalesced byte areas.
fn model_areas(epochs: &BTreeMap<u64, BTreeSet<u64>>, s: u64, t: u64, g: u64, cap: u64) -> Vec<(u64, u64)> {
    let blocks: BTreeSet<u64> = epochs
        .range(s + 1..t + 1)
        .flat_map(|(_, b)| b.iter().copied())
        .collect();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for b in blocks {
        let (lo, hi) = (b * g, ((b + 1) * g).min(cap));
        match out.last_mut() {
            Some((s0, l)) if *s0 + *l == lo => *l += hi - lo,
            _ => out.push((lo, hi - lo)),
        }
    }
    out
}

fn all_areas(t: &Tracker, since: Since, at: u64, cap: u64, page: usize) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < cap {
        let p = t.changed_areas(since, at, cap, start, page).unwrap();
        assert!(p.length > 0);
        for a in &p.areas {
            assert!(
                a.0 >= start && a.0 + a.1 <= start + p.length,
                "area {a:?} outside window"
            );
        }
        out.extend(p.areas);
        start += p.length;
    }
    // Pages may split one area at a page boundary only if the caller's
    // window ended inside it; windows end at area ends, so never.
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn queries_match_the_model(
        gshift in 9u32..=14,
        cap_blocks in 1u64..300,
        tail in 0u64..512,
        ops in prop::collection::vec(op(300 * 16384 + 512), 1..120),
        page in 1usize..20,
    ) {
        let g = 1u64 << gshift;
        let cap = cap_blocks * g + tail.min(g - 1);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.ctk");
        let mut t = Tracker::create(&path, cap, Granularity::new(g).unwrap()).unwrap();
        let mut epochs: BTreeMap<u64, BTreeSet<u64>> = BTreeMap::new();
        let mut cur = 1u64;
        let mut live: Vec<u64> = Vec::new();
        let mut ids = Vec::new();
        for op in ops {
            match op {
                Op::Write { off, len } => {
                    let off = off % cap;
                    let len = len.clamp(1, cap - off);
                    t.mark(off, len);
                    epochs.entry(cur).or_default().extend(off / g..=(off + len - 1) / g);
                }
                Op::Snapshot => {
                    let e = t.close_epoch().unwrap();
                    prop_assert_eq!(e, cur);
                    cur += 1;
                    live.push(e);
                    ids.push(t.change_id(e).unwrap());
                }
                Op::Remove(i) if !live.is_empty() => {
                    let e = live.remove(i % live.len());
                    t.unpin(e);
                }
                Op::Remove(_) => {}
                Op::Settle => t.settle(),
                Op::Crash => {
                    t.abandon();
                    drop(t);
                    t = Tracker::open(&path).unwrap();
                    prop_assert!(t.stats().recovered);
                }
                Op::Reopen => {
                    t.close().unwrap();
                    t = Tracker::open(&path).unwrap();
                }
            }
            // Query at every live snapshot since every earlier change ID, and `*`.
            for &at in &live {
                let want = model_areas(&epochs, 0, at, g, cap);
                prop_assert_eq!(all_areas(&t, Since::Allocated, at, cap, page), want);
                for id in ids.iter().filter(|id| id.seq <= at) {
                    let want = model_areas(&epochs, id.seq, at, g, cap);
                    prop_assert_eq!(all_areas(&t, Since::Change(*id), at, cap, page), want, "since {} at {}", id, at);
                }
                if let Some(id) = ids.iter().find(|id| id.seq > at) {
                    let err = t.changed_areas(Since::Change(*id), at, cap, 0, 10).unwrap_err();
                    prop_assert!(matches!(err, QueryError::ChangeIdAfterSnapshot { .. }), "unexpected error: {}", err);
                }
            }
        }
    }
}
