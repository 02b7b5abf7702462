//! The write path's ordering rules, each pinned down by a test that fails
//! every time the rule is broken (not only under a lucky interleaving):
//!
//! * a write is marked before its data lands, so a write that fails half way
//!   is over-reported, never lost (an injected failure after the first chunk);
//! * a write is marked while holding the I/O gate, so it lies wholly before
//!   or after a snapshot's epoch switch (a write paused at the gate while a
//!   snapshot is taken);
//! * writes that land in consolidation's helper delta are marked (writers
//!   write fresh blocks while a removal is paused with the helper on top);
//! * the checked pager returns every area of many small pages.
//!
//! Pause and failure points come from `sim::fault` (the `fault-injection`
//! feature, which sim's tests turn on).

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use common::*;
use parking_lot::Mutex;
use sim::fault::{set_hook, HookGuard, Point};
use sim::{Vm, EXTENT_BYTES};

fn cid(info: &vadp::SnapshotInfo) -> String {
    info.disks[0].change_id.clone().expect("CBT is on")
}

/// Whether `[s, s + l)` lies inside one of `areas`.
fn covered(areas: &[(u64, u64)], s: u64, l: u64) -> bool {
    areas.iter().any(|&(a, n)| a <= s && s + l <= a + n)
}

/// Fails this thread's next write into an extent after `ok` chunks were written.
fn fail_after_chunks(ok: usize) -> HookGuard {
    let mut chunks = 0;
    set_hook(move |p| {
        if matches!(p, Point::ExtentWrite { .. }) {
            chunks += 1;
            if chunks > ok {
                return Err(std::io::Error::other("injected: the device failed"));
            }
        }
        Ok(())
    })
}

#[test]
fn a_write_that_fails_half_way_is_reported_never_lost() {
    // The write spans the boundary of extents 0 and 1: its first chunk lands,
    // the second fails. Into the base layer, and into a delta.
    for delta in [false, true] {
        let (_d, host) = host();
        let g = 64 * KIB;
        let vm = host.create_vm("vm", &[spec(2 * EXTENT_BYTES, g)]).unwrap();
        let (lo, span) = (EXTENT_BYTES - g, 2 * g); // the window around the boundary
        vm.write(0, lo, &vec![1; span as usize]).unwrap();
        let c0 = cid(&vm.create_snapshot("s0").unwrap());
        if !delta {
            // The base is the live top again; the change ID stays valid.
            vm.remove_snapshot("s0").unwrap();
        }
        assert_eq!(vm.chain_len(0).unwrap(), if delta { 2 } else { 1 });
        let off = EXTENT_BYTES - 4096;
        let data = vec![0xa5u8; 8192];
        {
            let _fail = fail_after_chunks(1);
            let e = vm.write(0, off, &data).unwrap_err();
            assert!(e.to_string().contains("injected"), "{e}");
        }
        vm.create_snapshot("s1").unwrap();
        let mut after = vec![0u8; span as usize];
        vm.read_snapshot("s1", 0, lo, &mut after).unwrap();
        let first = (off - lo) as usize;
        assert_eq!(
            &after[first..first + 4096],
            &data[..4096],
            "delta {delta}: the first chunk landed"
        );
        let reported = areas(&vm, "s1", 0, &c0);
        for (i, &b) in after.iter().enumerate() {
            if b != 1 {
                assert!(
                    covered(&reported, lo + i as u64, 1),
                    "delta {delta}: byte {} differs from s0 but is not reported since s0: {reported:?}",
                    lo + i as u64
                );
            }
        }
    }
}

/// Runs `vm.write(0, offset, data)` on a new thread that pauses at the first
/// pause point `at` accepts until the returned sender says go; returns once
/// the writer is paused there.
fn paused_writer(
    vm: &Arc<Vm>,
    offset: u64,
    data: Vec<u8>,
    at: fn(&Point) -> bool,
) -> (mpsc::Sender<()>, std::thread::JoinHandle<Result<(), sim::SimError>>) {
    let (paused_tx, paused_rx) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let vm = vm.clone();
    let writer = std::thread::spawn(move || {
        let mut once = true;
        let _pause = set_hook(move |p| {
            if once && at(p) {
                once = false;
                paused_tx.send(()).unwrap();
                go_rx.recv().unwrap();
            }
            Ok(())
        });
        vm.write(0, offset, &data)
    });
    paused_rx.recv().expect("the writer reaches its pause point");
    (go_tx, writer)
}

#[test]
fn a_write_paused_before_the_gate_belongs_after_a_snapshot_taken_meanwhile() {
    let (_d, host) = host();
    let g = 64 * KIB;
    let vm = host.create_vm("vm", &[spec(16 * MIB, g)]).unwrap();
    let c0 = cid(&vm.create_snapshot("s0").unwrap());
    let (go, writer) = paused_writer(&vm, 5 * MIB, vec![7; 4096], |p| matches!(p, Point::BeforeGate { .. }));
    // The writer holds nothing yet: the snapshot completes without it.
    let c1 = cid(&vm.create_snapshot("s1").unwrap());
    go.send(()).unwrap();
    writer.join().unwrap().unwrap();
    vm.create_snapshot("s2").unwrap();
    let mut buf = [0u8; 4096];
    vm.read_snapshot("s1", 0, 5 * MIB, &mut buf).unwrap();
    assert_eq!(buf, [0; 4096], "the write is not in s1");
    vm.read_snapshot("s2", 0, 5 * MIB, &mut buf).unwrap();
    assert_eq!(buf, [7; 4096], "the write is in s2");
    // Exactly: its mark belongs to the epoch s2 closed, not to s1's.
    assert_eq!(
        areas(&vm, "s2", 0, &c1),
        vec![(5 * MIB, g)],
        "a write that landed after s1 is missing since s1"
    );
    assert_eq!(areas(&vm, "s1", 0, &c0), vec![], "s1's epoch claims a write s1 lacks");
}

#[test]
fn a_write_paused_inside_the_gate_lands_before_a_snapshot_that_waits_for_it() {
    let (_d, host) = host();
    let g = 64 * KIB;
    let vm = host.create_vm("vm", &[spec(16 * MIB, g)]).unwrap();
    let c0 = cid(&vm.create_snapshot("s0").unwrap());
    let (go, writer) = paused_writer(&vm, 3 * MIB, vec![9; 4096], |p| matches!(p, Point::Marked { .. }));
    // The writer holds the gate, marked and not yet copied: a snapshot
    // started now must wait for it, so the write is wholly before it.
    let snap = {
        let vm = vm.clone();
        std::thread::spawn(move || vm.create_snapshot("s1").map(|i| cid(&i)))
    };
    // Give the snapshot time to reach the stun (the assertions below hold
    // whichever way this goes; the pause makes the interesting order likely).
    std::thread::sleep(Duration::from_millis(50));
    go.send(()).unwrap();
    writer.join().unwrap().unwrap();
    let c1 = snap.join().unwrap().unwrap();
    vm.create_snapshot("s2").unwrap();
    let mut buf = [0u8; 4096];
    vm.read_snapshot("s1", 0, 3 * MIB, &mut buf).unwrap();
    assert_eq!(buf, [9; 4096], "the write is in s1");
    assert_eq!(areas(&vm, "s1", 0, &c0), vec![(3 * MIB, g)]);
    assert_eq!(areas(&vm, "s2", 0, &c1), vec![], "s2's epoch claims a write of s1's");
}

/// Which snapshot a removal consolidates.
#[derive(Debug, Clone, Copy)]
enum Victim {
    /// The newest: its delta is the live top, merged behind helper deltas.
    Newest,
    /// One in the middle: frozen layers, the guest writes to the top.
    Middle,
}

/// Writer threads write a moving frontier of fresh 4 KiB blocks (each
/// written once) while a snapshot is removed; the removal pauses right before
/// its merge until the writers have written `during` more blocks. Every
/// written block must be reported since the change ID taken before the
/// writers started, and hold its data.
fn fresh_blocks_during_consolidation(victim: Victim) {
    let (_d, host) = host();
    let g = 4 * KIB;
    let cap = GIB;
    let blocks = cap / g;
    let vm = host.create_vm("vm", &[spec(cap, g)]).unwrap();
    // Some data in every layer, so that merges have work to do.
    let preload = |vm: &Vm, seed: u8| {
        for i in 0..64u64 {
            vm.write(0, i * 256 * KIB, &[seed; 16 * 1024]).unwrap();
        }
    };
    preload(&vm, 1);
    vm.create_snapshot("s0").unwrap();
    preload(&vm, 2);
    // The change ID before the writers start: of the newest snapshot, even
    // the one being removed (a backup keeps it).
    let s1 = cid(&vm.create_snapshot("s1").unwrap());
    let (before, round) = match victim {
        Victim::Newest => (s1, 1),
        Victim::Middle => {
            preload(&vm, 3);
            (cid(&vm.create_snapshot("s2").unwrap()), 0)
        }
    };
    // Fresh blocks start above the preloaded 16 MiB.
    let first = 16 * MIB / g;
    let next = Arc::new(AtomicU64::new(first));
    let written = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let log = Arc::new(Mutex::new(Vec::new()));
    let writers: Vec<_> = (0..2)
        .map(|_| {
            let (vm, next, written, stop, log) = (vm.clone(), next.clone(), written.clone(), stop.clone(), log.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let b = next.fetch_add(1, Ordering::Relaxed);
                    assert!(b < blocks, "the frontier ran out of fresh blocks");
                    vm.write(0, b * g, &pattern(b)).unwrap();
                    log.lock().push(b);
                    written.fetch_add(1, Ordering::Release);
                    std::thread::sleep(Duration::from_micros(50));
                }
            })
        })
        .collect();
    // The removal pauses before its merge (with the helper delta as the live
    // top for the newest snapshot) until `during` more writes completed.
    let during = 300;
    let (paused_tx, paused_rx) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let remover = {
        let vm = vm.clone();
        std::thread::spawn(move || {
            let mut once = true;
            let _pause = set_hook(move |p| {
                if once && matches!(p, Point::Consolidating { round: r, .. } if *r == round) {
                    once = false;
                    paused_tx.send(()).unwrap();
                    go_rx.recv().unwrap();
                }
                Ok(())
            });
            vm.remove_snapshot("s1")
        })
    };
    paused_rx.recv().expect("the removal reaches its merge");
    // Writes in flight when the pause began may have started before it.
    let start = written.load(Ordering::Acquire) + 2;
    let deadline = Instant::now() + Duration::from_secs(60);
    while written.load(Ordering::Acquire) < start + during {
        assert!(Instant::now() < deadline, "the writers made no progress");
        std::thread::sleep(Duration::from_millis(1));
    }
    go_tx.send(()).unwrap();
    remover.join().unwrap().unwrap();
    // A few more writes after the removal, then stop.
    let after = written.load(Ordering::Acquire) + 50;
    while written.load(Ordering::Acquire) < after {
        std::thread::sleep(Duration::from_millis(1));
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }
    vm.create_snapshot("end").unwrap();
    let reported = areas(&vm, "end", 0, &before);
    let log = log.lock();
    assert!(log.len() as u64 >= during + 50);
    let blocks: BTreeSet<u64> = log.iter().copied().collect();
    assert_eq!(blocks.len(), log.len(), "every block is written once");
    let mut buf = vec![0u8; g as usize];
    for &b in &blocks {
        assert!(
            covered(&reported, b * g, g),
            "{victim:?}: block {b} written during the removal is not reported since {before}"
        );
        vm.read_snapshot("end", 0, b * g, &mut buf).unwrap();
        assert!(buf == pattern(b), "{victim:?}: block {b} lost its data");
    }
}

/// The content of fresh block `b`: never zero, different per block.
fn pattern(b: u64) -> Vec<u8> {
    (0..4096u64).map(|i| ((b * 31 + i) % 251 + 1) as u8).collect()
}

#[test]
fn fresh_blocks_written_while_the_newest_snapshot_is_removed_are_reported() {
    fresh_blocks_during_consolidation(Victim::Newest);
}

#[test]
fn fresh_blocks_written_while_a_middle_snapshot_is_removed_are_reported() {
    fresh_blocks_during_consolidation(Victim::Middle);
}

#[test]
fn thousands_of_areas_over_pages_of_three_all_come_back() {
    let (_d, host) = host();
    let g = 4 * KIB;
    let cap = 64 * MIB;
    let vm = host.create_vm("vm", &[spec(cap, g)]).unwrap();
    vm.set_max_areas(3);
    let c0 = cid(&vm.create_snapshot("s0").unwrap());
    // Every other block of a scattered set: no two areas coalesce.
    let mut model = BTreeSet::new();
    let mut x = 12345u64;
    while model.len() < 3000 {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        model.insert((x >> 33) % (cap / g / 2) * 2);
    }
    for &b in &model {
        vm.write(0, b * g + 100, &[5; 10]).unwrap();
    }
    vm.create_snapshot("s1").unwrap();
    let want: Vec<(u64, u64)> = model.iter().map(|&b| (b * g, g)).collect();
    let first = vm.query_changed_disk_areas("s1", 0, 0, &c0).unwrap();
    assert_eq!(first.changed_area.len(), 3, "one page holds three areas");
    assert_eq!(areas(&vm, "s1", 0, &c0), want, "since s0, through the VM");
    assert_eq!(areas(&vm, "s1", 0, "*"), want, "`*`, through the VM");
    let via_host: Vec<(u64, u64)> = vadp::changed_areas(&host, "vm", "s1", 0, &c0)
        .map(|a| a.map(|a| (a.start, a.length)))
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(via_host, want, "through the host");
}
