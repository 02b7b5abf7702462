//! Random lifecycle operations against a plain model of the disk's bytes.
//!
//! For every live snapshot and every change ID ever issued (also those of
//! snapshots since removed or reverted away), every byte that differs between
//! the change ID's point and the snapshot lies in the reported areas; `*`
//! covers every non-zero byte; change IDs from before a CBT reset fail with a
//! typed error. Proptest shrinks any failure to a short sequence.

mod common;
use common::*;
use proptest::prelude::*;
use sim::SimError;
use tracker::QueryError;

#[derive(Debug, Clone)]
enum Op {
    Write { off: u64, len: u64, byte: u8 },
    Unmap { off: u64, len: u64 },
    Snapshot,
    Remove(usize),
    Revert(usize),
    Extend(u64),
    CbtOff,
    CbtOn,
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0u64..1 << 20, 1u64..20_000, 1u8..=255).prop_map(|(off, len, byte)| Op::Write { off, len, byte }),
        1 => (0u64..1 << 20, 1u64..40_000).prop_map(|(off, len)| Op::Unmap { off, len }),
        3 => Just(Op::Snapshot),
        2 => (0usize..8).prop_map(Op::Remove),
        1 => (0usize..8).prop_map(Op::Revert),
        1 => (1u64..64).prop_map(|n| Op::Extend(n * 8192)),
        1 => Just(Op::CbtOff),
        1 => Just(Op::CbtOn),
        1 => Just(Op::Reopen),
    ]
}

/// A point in time whose change ID a backup could have stored.
struct Point {
    image: Vec<u8>,
    change_id: String,
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn lifecycle_matches_the_model(gshift in 9u32..=14, ops in prop::collection::vec(op(), 1..60)) {
        let g = 1u64 << gshift;
        let (dir, host) = host();
        let mut cap = 512 * 1024 + 512 * 3; // an odd number of sectors
        host.create_vm("vm", &[spec(cap, g)]).unwrap();
        let mut model = vec![0u8; cap as usize];
        let mut live: Vec<(String, Vec<u8>)> = Vec::new(); // name, image
        let mut points: Vec<Point> = Vec::new(); // change IDs of the current session
        let mut stale: Vec<String> = Vec::new(); // change IDs from before a reset
        let mut cbt = true;
        let mut n = 0;
        let mut host = host;
        for op in ops {
            let vm = host.vm("vm").unwrap();
            match op {
                Op::Write { off, len, byte } => {
                    let off = off % cap;
                    let len = len.min(cap - off);
                    vm.write(0, off, &vec![byte; len as usize]).unwrap();
                    model[off as usize..(off + len) as usize].fill(byte);
                }
                Op::Unmap { off, len } => {
                    let off = off % cap;
                    let len = len.min(cap - off);
                    vm.unmap(0, off, len).unwrap();
                    model[off as usize..(off + len) as usize].fill(0);
                }
                Op::Snapshot => {
                    n += 1;
                    let name = format!("s{n}");
                    match vm.create_snapshot(&name) {
                        Ok(info) => {
                            prop_assert_eq!(info.disks[0].change_id.is_some(), cbt);
                            if let Some(id) = &info.disks[0].change_id {
                                points.push(Point { image: model.clone(), change_id: id.clone() });
                            }
                            live.push((name, model.clone()));
                        }
                        Err(SimError::TooManySnapshots(_)) => prop_assert_eq!(live.len(), 32),
                        Err(e) => panic!("snapshot: {e}"),
                    }
                }
                Op::Remove(i) if !live.is_empty() => {
                    let (name, _) = live.remove(i % live.len());
                    vm.remove_snapshot(&name).unwrap();
                }
                Op::Revert(i) if !live.is_empty() => {
                    let i = i % live.len();
                    vm.revert_to_snapshot(&live[i].0).unwrap();
                    live.truncate(i + 1);
                    model = live[i].1.clone();
                    cap = model.len() as u64;
                }
                Op::Remove(_) | Op::Revert(_) => {}
                Op::Extend(by) => {
                    cap += by;
                    vm.extend_disk(0, cap).unwrap();
                    model.resize(cap as usize, 0);
                }
                Op::CbtOff => {
                    vm.set_cbt(false).unwrap();
                    if cbt {
                        stale.extend(points.drain(..).map(|p| p.change_id));
                    }
                    cbt = false;
                }
                Op::CbtOn => {
                    vm.set_cbt(true).unwrap();
                    cbt = true;
                }
                Op::Reopen => {
                    drop(vm);
                    drop(host);
                    host = sim::Host::open(dir.path()).unwrap();
                }
            }
            let vm = host.vm("vm").unwrap();
            prop_assert_eq!(vm.capacity(0).unwrap(), cap);
            // Check every live snapshot against the model and every point.
            for (name, img) in &live {
                prop_assert_eq!(&image(&vm, name, 0), img, "snapshot {} is not frozen", name);
                if !cbt {
                    let e = vm.query_changed_disk_areas(name, 0, 0, "*").unwrap_err();
                    prop_assert!(matches!(e, SimError::Query(QueryError::TrackingDisabled)), "{}", e);
                    continue;
                }
                let all = areas(&vm, name, 0, "*");
                prop_assert_eq!(missed_bytes(&vec![0; img.len()], img, &all), 0, "`*` misses data at {}", name);
                for p in &points {
                    match vm.query_changed_disk_areas(name, 0, 0, &p.change_id) {
                        Ok(_) => {
                            let got = areas(&vm, name, 0, &p.change_id);
                            let missed = missed_bytes(&p.image, img, &got);
                            prop_assert_eq!(missed, 0, "{} bytes missed at {} since {}", missed, name, p.change_id);
                            for &(s, l) in &got {
                                prop_assert!(s % g == 0 || s == 0, "area start {} not on a block boundary", s);
                                prop_assert!((s + l) % g == 0 || s + l == img.len() as u64, "area end not on a block or the disk end");
                            }
                        }
                        // A change ID newer than this snapshot: a typed refusal.
                        Err(SimError::Query(QueryError::ChangeIdAfterSnapshot { .. })) => {}
                        Err(e) => panic!("query at {name} since {}: {e}", p.change_id),
                    }
                }
                for id in &stale {
                    let e = vm.query_changed_disk_areas(name, 0, 0, id).unwrap_err();
                    prop_assert!(matches!(e, SimError::Query(QueryError::TrackingReset { .. })), "{}", e);
                }
            }
        }
    }
}
