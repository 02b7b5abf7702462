//! Tracking sessions, persistence and typed errors.

use tracker::{ChangeId, Granularity, QueryError, Since, Tracker, TrackerError};

const GIB: u64 = 1 << 30;

fn areas(t: &Tracker, since: Since, at: u64, cap: u64) -> Vec<(u64, u64)> {
    t.changed_areas(since, at, cap, 0, usize::MAX).unwrap().areas
}

#[test]
fn marks_exactly_the_blocks_a_write_touches() {
    let dir = tempfile::tempdir().unwrap();
    let cap = 10 * 65536 + 1000; // not a multiple of the granularity
    let t = Tracker::create(&dir.path().join("d.ctk"), cap, Granularity::DEFAULT).unwrap();
    t.mark(65535, 2); // two blocks
    t.mark(cap - 1, 1); // the last byte: last block, clipped
    t.mark(3 * 65536, 65536); // exactly one block
    let e = t.close_epoch().unwrap();
    let got = areas(&t, Since::Allocated, e, cap);
    assert_eq!(got, vec![(0, 2 * 65536), (3 * 65536, 65536), (10 * 65536, 1000)]);
}

#[test]
fn change_ids_survive_a_clean_close() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("d.ctk");
    let t = Tracker::create(&p, 64 * GIB, Granularity::DEFAULT).unwrap();
    t.mark(0, 1);
    let e1 = t.close_epoch().unwrap();
    let id1 = t.change_id(e1).unwrap();
    t.mark(GIB, 1);
    let e2 = t.close_epoch().unwrap(); // e1 and e2 stay pinned: unfolded epochs persist
    t.mark(2 * GIB, 1); // active epoch, persisted through the mapping
    t.close().unwrap();

    let t = Tracker::open(&p).unwrap();
    assert_eq!(t.change_id(e1), Some(id1));
    assert_eq!(areas(&t, Since::Change(id1), e2, 64 * GIB), vec![(GIB, 65536)]);
    let e3 = t.close_epoch().unwrap();
    assert_eq!(
        areas(&t, Since::Change(id1), e3, 64 * GIB),
        vec![(GIB, 65536), (2 * GIB, 65536)]
    );
    // A second handle on the same file is refused.
    assert!(matches!(Tracker::open(&p), Err(TrackerError::InUse { .. })));
}

/// Drops a tracker as a killed process would: nothing more is written.
fn kill(t: Tracker) {
    t.abandon();
    drop(t);
}

#[test]
fn a_killed_process_resumes_the_same_session_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("d.ctk");
    let t = Tracker::create(&p, 64 * GIB, Granularity::DEFAULT).unwrap();
    t.mark(0, 1);
    let e1 = t.close_epoch().unwrap();
    t.settle();
    let id1 = t.change_id(e1).unwrap();
    t.mark(GIB, 1);
    // Killed right after a snapshot, before its epoch was written out.
    let e2 = t.close_epoch().unwrap();
    t.mark(2 * GIB, 1);
    kill(t);

    let t = Tracker::open(&p).unwrap();
    assert!(t.stats().recovered);
    assert_eq!(t.change_id(e1), Some(id1), "the same session");
    assert_eq!(t.pins(), vec![e1, e2], "pins survive");
    assert_eq!(areas(&t, Since::Change(id1), e2, 64 * GIB), vec![(GIB, 65536)]);
    assert_eq!(
        areas(&t, Since::Allocated, e2, 64 * GIB),
        vec![(0, 65536), (GIB, 65536)]
    );
    // The open epoch kept its marks too.
    let e3 = t.close_epoch().unwrap();
    assert_eq!(
        areas(&t, Since::Change(id1), e3, 64 * GIB),
        vec![(GIB, 65536), (2 * GIB, 65536)]
    );
    // Killed after removing snapshots (folded), then again with nothing pending.
    t.unpin(e1);
    t.unpin(e2);
    kill(t);
    let t = Tracker::open(&p).unwrap();
    assert_eq!(t.pins(), vec![e3]);
    assert_eq!(
        areas(&t, Since::Change(id1), e3, 64 * GIB),
        vec![(GIB, 65536), (2 * GIB, 65536)]
    );
    t.close().unwrap();
    let t = Tracker::open(&p).unwrap();
    assert!(!t.stats().recovered, "closed cleanly");
}

#[test]
fn retain_pins_releases_what_the_host_no_longer_has() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("d.ctk");
    let t = Tracker::create(&p, GIB, Granularity::DEFAULT).unwrap();
    let e1 = t.close_epoch().unwrap();
    t.mark(0, 1);
    let e2 = t.close_epoch().unwrap();
    t.settle();
    assert_eq!(t.stats().unfolded_epochs, 1, "epoch 2 waits for the pin of epoch 1");
    // The host removed snapshot 1 but was killed before unpinning it.
    t.retain_pins(&[e2]).unwrap();
    assert_eq!(t.pins(), vec![e2]);
    assert_eq!(t.stats().unfolded_epochs, 0, "folded once the stale pin went");
    let id1 = t.change_id(e1).unwrap();
    assert_eq!(areas(&t, Since::Change(id1), e2, GIB), vec![(0, 65536)]);
}

#[test]
fn a_damaged_epoch_file_resets_tracking_and_star_waits_for_the_host() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("d.ctk");
    let t = Tracker::create(&p, GIB, Granularity::DEFAULT).unwrap();
    t.mark(0, 1);
    let e1 = t.close_epoch().unwrap();
    t.mark(5 * 65536, 1);
    let e2 = t.close_epoch().unwrap(); // pinned behind e1: stays in its file
    t.settle();
    let id1 = t.change_id(e1).unwrap();
    t.close().unwrap();
    let file = dir.path().join(format!("d.ctk.e{e2}"));
    let mut data = std::fs::read(&file).unwrap();
    data[20] ^= 0xff;
    std::fs::write(&file, data).unwrap();

    let t = Tracker::open(&p).unwrap();
    let e3 = t.close_epoch().unwrap();
    let err = t.changed_areas(Since::Change(id1), e3, GIB, 0, 10).unwrap_err();
    assert!(matches!(err, QueryError::TrackingReset { .. }), "{err}");
    assert!(err.to_string().contains("damaged"), "{err}");
    // `*` cannot be answered from what is left: the whole disk, never less...
    assert!(t.needs_allocation());
    assert_eq!(areas(&t, Since::Allocated, e3, GIB), vec![(0, GIB)]);
    // ...until the host seeds what its layers hold.
    t.seed_allocation([(0, 4096), (5 * 65536, 10)]).unwrap();
    assert!(!t.needs_allocation());
    assert_eq!(
        areas(&t, Since::Allocated, e3, GIB),
        vec![(0, 65536), (5 * 65536, 65536)]
    );
    // The new session is exact from its first change ID on.
    let id3 = t.change_id(e3).unwrap();
    t.mark(9 * 65536, 1);
    let e4 = t.close_epoch().unwrap();
    assert_eq!(areas(&t, Since::Change(id3), e4, GIB), vec![(9 * 65536, 65536)]);
}

#[test]
fn a_damaged_header_is_a_typed_error_and_the_host_recreates_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("d.ctk");
    let t = Tracker::create(&p, GIB, Granularity::DEFAULT).unwrap();
    let e1 = t.close_epoch().unwrap();
    let id1 = t.change_id(e1).unwrap();
    t.close().unwrap();
    // The file is sparse and large: overwrite the header page only.
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0x5a; 4096], 0).unwrap();
    drop(f);
    assert!(matches!(Tracker::open(&p), Err(TrackerError::BadFile { .. })));
    let t = Tracker::recreate(&p, GIB, Granularity::DEFAULT, e1 + 1).unwrap();
    assert!(dir.path().join("d.ctk.damaged").exists());
    let e2 = t.close_epoch().unwrap();
    assert!(e2 > e1, "sequences never go back");
    let err = t.changed_areas(Since::Change(id1), e2, GIB, 0, 10).unwrap_err();
    assert!(matches!(err, QueryError::TrackingReset { .. }), "{err}");
    assert!(t.needs_allocation());
}

#[test]
fn cbt_off_then_on_starts_a_new_session() {
    let dir = tempfile::tempdir().unwrap();
    let t = Tracker::create(&dir.path().join("d.ctk"), GIB, Granularity::DEFAULT).unwrap();
    let e1 = t.close_epoch().unwrap();
    let id1 = t.change_id(e1).unwrap();
    t.disable().unwrap();
    assert_eq!(t.change_id(e1), None);
    let e2 = t.close_epoch().unwrap();
    assert_eq!(
        t.changed_areas(Since::Allocated, e2, GIB, 0, 10).unwrap_err(),
        QueryError::TrackingDisabled
    );
    t.enable().unwrap();
    t.mark(100, 1);
    let e3 = t.close_epoch().unwrap();
    let id3 = t.change_id(e3).unwrap();
    assert_ne!(id3.session, id1.session);
    let err = t.changed_areas(Since::Change(id1), e3, GIB, 0, 10).unwrap_err();
    assert!(matches!(err, QueryError::TrackingReset { .. }));
    // A snapshot taken while tracking was off has no change ID, but `*` at
    // it is still exact: blocks are marked whether tracking is on or not.
    assert_eq!(t.change_id(e2), None);
    assert_eq!(areas(&t, Since::Allocated, e3, GIB), vec![(0, 65536)]);
}

#[test]
fn malformed_foreign_and_future_change_ids_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let a = Tracker::create(&dir.path().join("a.ctk"), GIB, Granularity::DEFAULT).unwrap();
    let b = Tracker::create(&dir.path().join("b.ctk"), GIB, Granularity::DEFAULT).unwrap();
    let ea = a.close_epoch().unwrap();
    let eb = b.close_epoch().unwrap();
    let idb = b.change_id(eb).unwrap();
    assert_eq!(
        a.changed_areas(Since::Change(idb), ea, GIB, 0, 10).unwrap_err(),
        QueryError::ForeignChangeId(idb)
    );
    let future = ChangeId {
        session: a.change_id(ea).unwrap().session,
        seq: 99,
    };
    assert_eq!(
        a.changed_areas(Since::Change(future), ea, GIB, 0, 10).unwrap_err(),
        QueryError::ForeignChangeId(future)
    );
    assert!("not-a-change-id".parse::<ChangeId>().is_err());
    assert_eq!(
        a.changed_areas(Since::Allocated, ea, GIB, GIB, 10).unwrap_err(),
        QueryError::OffsetOutOfRange {
            start: GIB,
            capacity: GIB
        }
    );
}

#[test]
fn rewind_marks_what_the_revert_changed_back() {
    let dir = tempfile::tempdir().unwrap();
    let t = Tracker::create(&dir.path().join("d.ctk"), GIB, Granularity::DEFAULT).unwrap();
    let s1 = t.close_epoch().unwrap(); // snapshot to revert to
    t.mark(0, 1);
    let s2 = t.close_epoch().unwrap();
    let id2 = t.change_id(s2).unwrap();
    t.unpin(s2);
    t.mark(5 * 65536, 1);
    t.rewind_to(s1).unwrap(); // blocks 0 and 5 go back to their content at s1
    let s3 = t.close_epoch().unwrap();
    // Since id2 the disk changed at block 0 (written before id2, reverted after).
    assert_eq!(
        areas(&t, Since::Change(id2), s3, GIB),
        vec![(0, 65536), (5 * 65536, 65536)]
    );
}

#[test]
fn rewind_to_the_last_point_before_a_kill_is_exact() {
    // A killed process loses no mark: the epoch open at the kill kept its
    // marks in the mapping, so a revert to the last snapshot before the kill
    // marks everything it changes back, in the same session.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("d.ctk");
    let t = Tracker::create(&p, GIB, Granularity::DEFAULT).unwrap();
    let s1 = t.close_epoch().unwrap(); // the snapshot reverted to later
    t.mark(3 * 65536, 1); // written before the kill
    kill(t);
    let t = Tracker::open(&p).unwrap();
    t.mark(0, 1);
    let s2 = t.close_epoch().unwrap();
    let id2 = t.change_id(s2).unwrap();
    t.rewind_to(s1).unwrap(); // changes blocks 0 and 3 back
    let s3 = t.close_epoch().unwrap();
    assert_eq!(
        areas(&t, Since::Change(id2), s3, GIB),
        vec![(0, 65536), (3 * 65536, 65536)]
    );
}

#[test]
fn rewind_to_a_point_before_damaged_state_starts_a_new_session() {
    // Damaged state loses the marks of the epochs it held, so a revert to a
    // snapshot from before the damage cannot know all it changes back, even
    // the last one, exactly at the fold horizon the reset set.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("d.ctk");
    let t = Tracker::create(&p, GIB, Granularity::DEFAULT).unwrap();
    t.close_epoch().unwrap(); // pins what follows in its epoch file
    t.mark(3 * 65536, 1);
    let s2 = t.close_epoch().unwrap(); // pinned behind s1: in its epoch file
    t.settle();
    t.close().unwrap();
    std::fs::remove_file(dir.path().join(format!("d.ctk.e{s2}"))).unwrap();
    let t = Tracker::open(&p).unwrap();
    t.mark(0, 1);
    let s3 = t.close_epoch().unwrap();
    let id3 = t.change_id(s3).expect("the new session issues change IDs");
    t.rewind_to(s2).unwrap();
    let s4 = t.close_epoch().unwrap();
    let err = t.changed_areas(Since::Change(id3), s4, GIB, 0, 10).unwrap_err();
    assert!(matches!(err, QueryError::TrackingReset { .. }), "{err}");
    // A point after the reset reverts within the session, and survives a clean close.
    let id4 = t.change_id(s4).unwrap();
    t.mark(7 * 65536, 1);
    t.close().unwrap();
    let t = Tracker::open(&p).unwrap();
    t.rewind_to(s4).unwrap();
    let s5 = t.close_epoch().unwrap();
    assert_eq!(areas(&t, Since::Change(id4), s5, GIB), vec![(7 * 65536, 65536)]);
}

#[test]
fn extend_keeps_change_ids_and_reports_writes_past_the_old_end() {
    let dir = tempfile::tempdir().unwrap();
    let old = 128 * GIB;
    let t = Tracker::create(&dir.path().join("d.ctk"), old, Granularity::DEFAULT).unwrap();
    let e1 = t.close_epoch().unwrap();
    let id1 = t.change_id(e1).unwrap();
    let new = 3 * 1024 * GIB;
    t.resize(new).unwrap();
    t.mark(old - 1, 2); // across the old end
    t.mark(2048 * GIB, 4096); // far past the 2 TiB boundary
    let e2 = t.close_epoch().unwrap();
    let got = areas(&t, Since::Change(id1), e2, new);
    assert_eq!(got, vec![(128 * GIB - 65536, 2 * 65536), (2048 * GIB, 65536)]);
    assert!(matches!(t.resize(GIB), Err(TrackerError::Shrink { .. })));
    assert!(matches!(t.resize(65 << 40), Err(TrackerError::CapacityTooLarge { .. })));
}

#[test]
fn huge_sparse_disk_costs_little() {
    let dir = tempfile::tempdir().unwrap();
    let cap = 62 << 40;
    let t = Tracker::create(&dir.path().join("d.ctk"), cap, Granularity::DEFAULT).unwrap();
    // 1 GiB written in 16 regions spread over the disk.
    for r in 0..16u64 {
        t.mark(r * (cap / 16), 64 << 20);
    }
    let e = t.close_epoch().unwrap();
    t.unpin(e);
    t.settle();
    let e2 = t.close_epoch().unwrap();
    let page = t.changed_areas(Since::Allocated, e2, cap, 0, 2000).unwrap();
    assert_eq!(page.areas.len(), 16);
    assert_eq!(page.areas.iter().map(|a| a.1).sum::<u64>(), 1 << 30);
    let bytes = t.stats().file_bytes;
    assert!(
        bytes < 8 << 20,
        "tracker state is {bytes} bytes for 1 GiB written on 62 TiB"
    );
}
