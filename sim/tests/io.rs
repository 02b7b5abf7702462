//! Guest I/O, snapshot views and the query, through the host.

mod common;
use common::*;
use sim::SimError;
use vadp::{NotFoundKind, VadpError};

#[test]
fn unaligned_writes_last_byte_and_odd_sized_disk() {
    let (_d, host) = host();
    let cap = 10 * 64 * KIB + 1536; // not a multiple of the granularity
    let vm = host.create_vm("vm", &[spec(cap, 64 * KIB)]).unwrap();
    let s0 = vm.create_snapshot("s0").unwrap();
    let cid = s0.disks[0].change_id.clone().unwrap();
    vm.write(0, 64 * KIB - 1, &[1, 2]).unwrap(); // spans blocks 0 and 1
    vm.write(0, cap - 1, &[9]).unwrap(); // the last byte
    vm.write(0, 5 * 64 * KIB + 100, &[3; 300]).unwrap();
    vm.create_snapshot("s1").unwrap();
    assert_eq!(
        areas(&vm, "s1", 0, &cid),
        vec![(0, 128 * KIB), (5 * 64 * KIB, 64 * KIB), (10 * 64 * KIB, 1536)]
    );
    let img = image(&vm, "s1", 0);
    assert_eq!(&img[64 * KIB as usize - 1..64 * KIB as usize + 1], &[1, 2]);
    assert_eq!(img[cap as usize - 1], 9);
    assert!(image(&vm, "s0", 0).iter().all(|&b| b == 0), "the older view is frozen");
}

#[test]
fn out_of_range_io_is_rejected_and_changes_nothing() {
    let (_d, host) = host();
    let cap = 4 * MIB;
    let vm = host.create_vm("vm", &[spec(cap, 64 * KIB)]).unwrap();
    let s0 = vm.create_snapshot("s0").unwrap();
    let cid = s0.disks[0].change_id.clone().unwrap();
    let err = vm.write(0, cap - 10, &[1; 11]).unwrap_err();
    assert!(matches!(err, SimError::OutOfRange { .. }), "{err}");
    assert!(err.to_string().contains("outside disk 0"));
    assert!(matches!(
        vm.write(0, u64::MAX - 1, &[1; 4]),
        Err(SimError::OutOfRange { .. })
    ));
    assert!(matches!(vm.unmap(0, cap, 1), Err(SimError::OutOfRange { .. })));
    assert!(matches!(vm.write(1, 0, &[1]), Err(SimError::NoSuchDisk { .. })));
    let mut buf = [0u8; 11];
    assert!(matches!(
        vm.read(0, cap - 10, &mut buf),
        Err(SimError::OutOfRange { .. })
    ));
    vm.create_snapshot("s1").unwrap();
    assert!(
        areas(&vm, "s1", 0, &cid).is_empty(),
        "a rejected write must not be tracked"
    );
    assert!(
        image(&vm, "s1", 0).iter().all(|&b| b == 0),
        "a rejected write must not land"
    );
}

#[test]
fn paging_returns_every_area_and_rejects_the_end() {
    let (_d, host) = host();
    let cap = 64 * MIB;
    let vm = host.create_vm("vm", &[spec(cap, 4 * KIB)]).unwrap();
    vm.set_max_areas(7);
    for i in 0..100u64 {
        vm.write(0, i * 16 * KIB, &[1; 10]).unwrap();
    }
    vm.create_snapshot("s").unwrap();
    let all = areas(&vm, "s", 0, "*");
    assert_eq!(all.len(), 100);
    assert!(all
        .iter()
        .enumerate()
        .all(|(i, &a)| a == (i as u64 * 16 * KIB, 4 * KIB)));
    // One page holds at most 7 areas, and the window ends at the last one.
    let p = vm.query_changed_disk_areas("s", 0, 0, "*").unwrap();
    assert_eq!(p.changed_area.len(), 7);
    assert_eq!(p.length, 6 * 16 * KIB + 4 * KIB);
    // A start offset inside a changed area clips it.
    let p = vm.query_changed_disk_areas("s", 0, 16 * KIB + 100, "*").unwrap();
    assert_eq!(
        (p.changed_area[0].start, p.changed_area[0].length),
        (16 * KIB + 100, 4 * KIB - 100)
    );
    // start_offset == capacity is an error.
    let err = vm.query_changed_disk_areas("s", 0, cap, "*").unwrap_err();
    assert!(
        matches!(err, SimError::Query(tracker::QueryError::OffsetOutOfRange { .. })),
        "{err}"
    );
    // The vadp iterator pages by itself.
    let it: Vec<_> = vadp::changed_areas(&host, "vm", "s", 0, "*")
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(it.len(), 100);
}

#[test]
fn bad_change_ids_get_typed_errors() {
    let (_d, host) = host();
    let a = host.create_vm("a", &[spec(GIB, 64 * KIB)]).unwrap();
    let b = host.create_vm("b", &[spec(GIB, 64 * KIB)]).unwrap();
    a.create_snapshot("s").unwrap();
    let sb = b.create_snapshot("s").unwrap();
    let foreign = sb.disks[0].change_id.clone().unwrap();
    let e = vadp::DataProtection::query_changed_disk_areas(&host, "a", "s", 0, 0, &foreign).unwrap_err();
    assert!(
        matches!(&e, VadpError::ForeignChangeId { change_id } if *change_id == foreign),
        "{e}"
    );
    let e = vadp::DataProtection::query_changed_disk_areas(&host, "a", "s", 0, 0, "52 de c0/81").unwrap_err();
    assert!(
        matches!(&e, VadpError::MalformedChangeId { change_id, .. } if change_id == "52 de c0/81"),
        "{e}"
    );
    let e = vadp::DataProtection::query_changed_disk_areas(&host, "a", "nope", 0, 0, "*").unwrap_err();
    assert!(
        matches!(&e, VadpError::NotFound { what: NotFoundKind::Snapshot, name } if name == "nope"),
        "{e}"
    );
    assert_eq!(e.kind(), vadp::ErrorKind::NotFound);
    let e = vadp::DataProtection::query_changed_disk_areas(&host, "zz", "s", 0, 0, "*").unwrap_err();
    assert!(
        matches!(&e, VadpError::NotFound { what: NotFoundKind::Vm, name } if name == "zz"),
        "{e}"
    );
    // A VM answers for its own name only.
    let e = vadp::DataProtection::disk_capacity(&*a, "b", "s", 0).unwrap_err();
    assert!(
        matches!(&e, VadpError::NotFound { what: NotFoundKind::Vm, name } if name == "b"),
        "{e}"
    );
}

#[test]
fn huge_sparse_disk_is_instant_and_cheap() {
    let (d, host) = host();
    let cap = 62 << 40;
    let t = std::time::Instant::now();
    let vm = host.create_vm("big", &[spec(cap, 64 * KIB)]).unwrap();
    vm.write(0, cap - 4096, &[0xab; 4096]).unwrap();
    vm.write(0, 0, &[0xcd; 4096]).unwrap();
    vm.create_snapshot("s").unwrap();
    assert_eq!(areas(&vm, "s", 0, "*"), vec![(0, 64 * KIB), (cap - 64 * KIB, 64 * KIB)]);
    let mut buf = [0u8; 4096];
    vm.read_snapshot("s", 0, cap - 4096, &mut buf).unwrap();
    assert_eq!(buf, [0xab; 4096]);
    assert!(
        t.elapsed().as_secs() < 30,
        "creating and using a 62 TiB disk took {:?}",
        t.elapsed()
    );
    let used = du(d.path());
    assert!(used < 64 << 20, "a 62 TiB disk with 8 KiB written uses {used} bytes");
}

fn du(p: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut n = 0;
    for e in std::fs::read_dir(p).unwrap().flatten() {
        let m = e.metadata().unwrap();
        n += if m.is_dir() { du(&e.path()) } else { m.blocks() * 512 };
    }
    n
}

/// Records every mark.
#[derive(Default)]
struct Log(parking_lot::Mutex<Vec<(u64, u64)>>);

impl tracker::MarkDirty for Log {
    fn mark(&self, offset: u64, len: u64) {
        self.0.lock().push((offset, len));
    }
}

#[test]
fn write_with_runs_the_write_path_with_another_marker() {
    let (_d, host) = host();
    let cap = 4 * MIB;
    let vm = host.create_vm("vm", &[spec(cap, 64 * KIB)]).unwrap();
    let s0 = vm.create_snapshot("s0").unwrap();
    let cid = s0.disks[0].change_id.clone().unwrap();
    // Tracking off: the data lands (through the delta), nothing is tracked.
    vm.write_with(&(), 0, MIB, &[3; 5000]).unwrap();
    // Another marker sees exactly the writes the path accepts.
    let log = Log::default();
    vm.write_with(&log, 0, 2 * MIB + 7, &[4; 100]).unwrap();
    assert!(matches!(
        vm.write_with(&log, 0, cap - 10, &[1; 11]),
        Err(SimError::OutOfRange { .. })
    ));
    assert!(matches!(
        vm.write_with(&log, 1, 0, &[1]),
        Err(SimError::NoSuchDisk { .. })
    ));
    vm.set_power(false).unwrap();
    assert!(matches!(vm.write_with(&log, 0, 0, &[1]), Err(SimError::PoweredOff(_))));
    vm.set_power(true).unwrap();
    assert_eq!(*log.0.lock(), vec![(2 * MIB + 7, 100)]);
    vm.create_snapshot("s1").unwrap();
    let mut buf = vec![0u8; 5000];
    vm.read_snapshot("s1", 0, MIB, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 3), "the untracked write landed");
    assert_eq!(
        areas(&vm, "s1", 0, &cid),
        vec![],
        "the disk's tracker saw neither write"
    );
}
