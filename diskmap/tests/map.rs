//! Maps of a real simulated host: every cell's color against a model of
//! what the guest wrote when, the answer's cells, a 62 TiB disk, and the
//! three renderings.

use std::time::Instant;

use diskmap::{chain, compute, DiskMap, Layout, MapQuery, Shape, OLDER, UNWRITTEN};
use sim::{DiskSpec, Host};
use tracker::Granularity;

const MIB: u64 = 1 << 20;

fn snapshots(vm: &sim::Vm) -> Vec<(String, Option<String>)> {
    vm.snapshots()
        .into_iter()
        .map(|s| (s.name, s.disks[0].change_id.clone()))
        .collect()
}

fn map_at(host: &Host, vm: &sim::Vm, at: &str, since: Option<&str>, history: Option<u32>, shape: Shape) -> DiskMap {
    let (points, cid) = chain(&snapshots(vm), at, history).unwrap();
    compute(
        host,
        &MapQuery {
            vm: vm.name(),
            disk: 0,
            snapshot: at,
            label: at,
            change_id: cid.as_deref(),
            granularity: vm.granularity(0).unwrap().bytes(),
            chain: &points,
            since,
            shape,
        },
    )
    .unwrap()
}

#[test]
fn cells_show_the_newest_epoch_that_wrote_them() {
    let dir = tempfile::tempdir().unwrap();
    let host = Host::open(dir.path()).unwrap();
    let cap = 64 * MIB;
    let vm = host
        .create_vm(
            "vm",
            &[DiskSpec {
                capacity: cap,
                granularity: Granularity::new(65536).unwrap(),
            }],
        )
        .unwrap();
    // Epoch by epoch: (offset, length) writes; the model remembers the
    // newest epoch per 64 KiB block (0 = before s1).
    let epochs: [&[(u64, u64)]; 4] = [
        &[(0, MIB), (40 * MIB, 3 * MIB)],
        &[(512 * 1024, 4096), (10 * MIB + 65535, 2)],
        &[(20 * MIB, 100_000), (41 * MIB, 1)],
        &[(63 * MIB, MIB)],
    ];
    let mut newest = vec![None::<u8>; (cap / 65536) as usize];
    for (e, writes) in epochs.iter().enumerate() {
        for &(off, len) in *writes {
            vm.write(0, off, &vec![7u8; len as usize]).unwrap();
            for b in off / 65536..=(off + len - 1) / 65536 {
                newest[b as usize] = Some(e as u8);
            }
        }
        vm.create_snapshot(&format!("s{}", e + 1)).unwrap();
    }
    // At s4, the change IDs of s1..s3 are drawn: epoch 0 is grey (older),
    // epoch k is class OLDER + k.
    let s1 = snapshots(&vm)[0].1.clone().unwrap();
    let map = map_at(&host, &vm, "s4", Some(&s1), None, Shape::PICTURE);
    assert_eq!(map.epochs.len(), 3);
    assert_eq!(map.epochs[0].from.as_deref(), Some("s1"));
    assert_eq!(map.epochs[2].to, "s4");
    assert_eq!(map.geometry.cell_bytes, 65536);
    for (b, n) in newest.iter().enumerate() {
        let want = n.map_or(UNWRITTEN, |e| OLDER + e);
        assert_eq!(map.cells[b], want, "block {b}");
    }
    // Bytes per epoch: whole blocks last written then.
    let blocks = |e: u8| newest.iter().filter(|n| **n == Some(e)).count() as u64 * 65536;
    assert_eq!(map.older_bytes, blocks(0));
    for k in 1..4u8 {
        assert_eq!(map.epochs[k as usize - 1].bytes, blocks(k), "epoch {k}");
    }
    // The answer since s1: every block written after s1.
    let a = map.since.as_ref().unwrap();
    let want: Vec<u32> = (0..newest.len() as u32)
        .filter(|&b| newest[b as usize].is_some_and(|e| e >= 1))
        .collect();
    assert_eq!(a.cells, want);
    assert_eq!(a.bytes, want.len() as u64 * 65536);

    // Coarser cells keep the newest epoch of their blocks.
    let small = map_at(&host, &vm, "s4", None, None, Shape::TERMINAL);
    assert_eq!(small.geometry.cell_bytes, 65536);
    let tiny = map_at(
        &host,
        &vm,
        "s4",
        None,
        None,
        Shape {
            layout: Layout::Hilbert,
            max_cells: 64,
            columns: 8,
        },
    );
    assert_eq!(tiny.geometry.cell_bytes, MIB);
    for c in 0..64usize {
        let want = newest[c * 16..(c + 1) * 16]
            .iter()
            .flatten()
            .max()
            .map_or(UNWRITTEN, |e| OLDER + e);
        assert_eq!(tiny.cells[c], want, "cell {c}");
    }

    // After the snapshots are removed, their change IDs still tell the epochs apart (history).
    for s in ["s1", "s2", "s3"] {
        vm.remove_snapshot(s).unwrap();
    }
    let h = map_at(&host, &vm, "s4", None, Some(3), Shape::PICTURE);
    assert_eq!(h.cells, map.cells);
    assert!(h.epochs.iter().all(|e| e.from.is_none()));
    let plain = map_at(&host, &vm, "s4", None, None, Shape::PICTURE);
    assert!(plain.epochs.is_empty());
    assert_eq!(plain.older_bytes, plain.allocated_bytes);

    // The renderings name what they show.
    let svg = diskmap::svg::render(&map);
    assert!(
        svg.contains("class=\"hits\" data-cells=\"") && svg.contains(&s1),
        "{svg}"
    );
    assert_eq!(svg.matches("class=\"epoch\"").count(), 4);
    let term = diskmap::term::render(&map);
    assert!(term.contains("after s1") && term.contains('▀'), "{term}");
    let json = serde_json::to_string(&map).unwrap();
    assert_eq!(serde_json::from_str::<DiskMap>(&json).unwrap(), map);
}

#[test]
fn a_62_tib_disk_costs_what_was_written() {
    let dir = tempfile::tempdir().unwrap();
    let host = Host::open(dir.path()).unwrap();
    let cap = 62u64 << 40;
    let vm = host
        .create_vm(
            "big",
            &[DiskSpec {
                capacity: cap,
                granularity: Granularity::DEFAULT,
            }],
        )
        .unwrap();
    vm.write(0, 0, &[1u8; 4096]).unwrap();
    vm.create_snapshot("s1").unwrap();
    vm.write(0, cap - 4096, &[2u8; 4096]).unwrap();
    vm.write(0, 30 << 40, &[3u8; 100]).unwrap();
    vm.create_snapshot("s2").unwrap();
    let s1 = snapshots(&vm)[0].1.clone().unwrap();
    let t = Instant::now();
    let map = map_at(&host, &vm, "s2", Some(&s1), None, Shape::PICTURE);
    let took = t.elapsed();
    assert_eq!(map.geometry.cell_bytes, 16 << 30);
    assert_eq!(map.geometry.cells, 3968);
    assert_eq!(map.cells[0], OLDER);
    assert_eq!(map.cells[3967], OLDER + 1);
    assert_eq!(map.cells[(30u64 << 40) as usize / (16 << 30)], OLDER + 1);
    assert_eq!(map.unwritten_cells, 3965);
    assert_eq!(map.since.as_ref().unwrap().bytes, 2 * 65536);
    // Not a speed test: a bound that a walk over the disk's 10^9 blocks could not meet.
    assert!(took.as_secs() < 20, "{took:?}");
    let h = map_at(
        &host,
        &vm,
        "s2",
        None,
        None,
        Shape::PICTURE.with_layout(Layout::Hilbert),
    );
    assert_eq!(h.geometry.columns, 64);
    assert!(diskmap::svg::render(&h).contains("class=\"beyond\""));
}
