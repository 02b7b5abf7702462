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

#[test]
fn unclean_shutdown_resets_tracking_with_a_typed_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("d.ctk");
    let t = Tracker::create(&p, 64 * GIB, Granularity::DEFAULT).unwrap();
    t.mark(0, 1);
    let e1 = t.close_epoch().unwrap();
    let id1 = t.change_id(e1).unwrap();
    t.abandon(); // no clean close: as if the process died
    drop(t); // releases the file lock without persisting

    let t = Tracker::open(&p).unwrap();
    t.pin(e1);
    let e2 = t.close_epoch().unwrap();
    let err = t.changed_areas(Since::Change(id1), e2, 64 * GIB, 0, 10).unwrap_err();
    assert!(matches!(err, QueryError::TrackingReset { .. }), "{err}");
    assert!(err.to_string().contains("did not shut down cleanly"));
    // `*` cannot be trusted either: it answers the whole disk, never less.
    assert_eq!(areas(&t, Since::Allocated, e2, 64 * GIB), vec![(0, 64 * GIB)]);
}

#[test]
fn damaged_sidecar_resets_tracking() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("d.ctk");
    let t = Tracker::create(&p, GIB, Granularity::DEFAULT).unwrap();
    let e1 = t.close_epoch().unwrap();
    let id1 = t.change_id(e1).unwrap();
    t.close().unwrap();
    let side = dir.path().join("d.ctk.epochs");
    let mut data = std::fs::read(&side).unwrap();
    data[9] ^= 0xff;
    std::fs::write(&side, data).unwrap();
    let t = Tracker::open(&p).unwrap();
    let e2 = t.close_epoch().unwrap();
    let err = t.changed_areas(Since::Change(id1), e2, GIB, 0, 10).unwrap_err();
    assert!(matches!(err, QueryError::TrackingReset { .. }), "{err}");
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
fn rewind_to_the_last_point_before_an_unclean_close_starts_a_new_session() {
    // The epoch open at the crash may have lost marks, so a revert to the
    // last snapshot before it cannot know everything it changes back, even
    // though that snapshot is exactly at the fold horizon the reset set.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("d.ctk");
    let t = Tracker::create(&p, GIB, Granularity::DEFAULT).unwrap();
    let s1 = t.close_epoch().unwrap(); // the snapshot reverted to later
    t.mark(3 * 65536, 1); // may not reach the file before the crash
    t.abandon();
    drop(t);
    let t = Tracker::open(&p).unwrap();
    t.pin(s1);
    t.mark(0, 1);
    let s2 = t.close_epoch().unwrap();
    let id2 = t.change_id(s2).expect("the new session issues change IDs");
    t.rewind_to(s1).unwrap();
    let s3 = t.close_epoch().unwrap();
    let err = t.changed_areas(Since::Change(id2), s3, GIB, 0, 10).unwrap_err();
    assert!(matches!(err, QueryError::TrackingReset { .. }), "{err}");
    // A point after the reset reverts within the session, and survives a clean close.
    let id3 = t.change_id(s3).unwrap();
    t.mark(7 * 65536, 1);
    t.close().unwrap();
    let t = Tracker::open(&p).unwrap();
    t.pin(s3);
    t.rewind_to(s3).unwrap();
    let s4 = t.close_epoch().unwrap();
    assert_eq!(areas(&t, Since::Change(id3), s4, GIB), vec![(7 * 65536, 65536)]);
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
