//! Helpers shared by the sim integration tests.
#![allow(dead_code)]

use sim::{DiskSpec, Host, Vm};
use tracker::Granularity;

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * KIB;
pub const GIB: u64 = 1024 * MIB;

pub fn spec(capacity: u64, granularity: u64) -> DiskSpec {
    DiskSpec {
        capacity,
        granularity: Granularity::new(granularity).unwrap(),
    }
}

/// A host in a fresh temporary directory.
pub fn host() -> (tempfile::TempDir, Host) {
    let dir = tempfile::tempdir().unwrap();
    let host = Host::open(dir.path()).unwrap();
    (dir, host)
}

/// Every changed area of a snapshot's disk, paged by the checked pager
/// ([`vadp::changed_areas`]) through the VM's own `DataProtection`.
pub fn areas(vm: &Vm, snap: &str, disk: usize, since: &str) -> Vec<(u64, u64)> {
    vadp::changed_areas(vm, vm.name(), snap, disk, since)
        .map(|a| a.map(|a| (a.start, a.length)))
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("changed areas at {snap} since {since}: {e}"))
}

/// Reads a whole snapshot disk.
pub fn image(vm: &Vm, snap: &str, disk: usize) -> Vec<u8> {
    let cap = vm.snapshot_capacity(snap, disk).unwrap();
    let mut buf = vec![0u8; cap as usize];
    vm.read_snapshot(snap, disk, 0, &mut buf).unwrap();
    buf
}

/// Checks the invariant between two images: every byte of `new` that differs
/// from `old` lies in `areas`. Returns the number of differing bytes outside
/// them (must be 0). Bytes past the end of `old` count as zeros (an extend's
/// new range); bytes past the end of `new` do not exist at that point (a
/// revert restores the snapshot's smaller capacity), so they are not compared.
pub fn missed_bytes(old: &[u8], new: &[u8], areas: &[(u64, u64)]) -> u64 {
    let len = new.len();
    let mut inside = vec![false; len];
    for &(s, l) in areas {
        inside[s as usize..(s + l) as usize].fill(true);
    }
    let get = |v: &[u8], i: usize| v.get(i).copied().unwrap_or(0);
    (0..len).filter(|&i| get(old, i) != get(new, i) && !inside[i]).count() as u64
}
