//! Applying guest ops to a VM, and asking it what changed: the two things every driver of
//! the harness (drive, replay, the torture verifier) does, written once.
//!
//! # Design
//! The harness holds a [`Vm`], not a host; a VM answers the data-protection API for its
//! own name, so [`changed_areas`] lets [`vadp::changed_areas`] page it: the same checked
//! pager a backup application uses, so a short or out-of-order page is an error here too.
//! The pager counts its pages, which lets the torture verifier show that its answers
//! really spanned many.

use std::time::{Duration, Instant};

use sim::{SimError, Vm};
use vadp::VadpError;
use workloads::{fill_pattern, IoOp};

/// Largest piece a long write or read is applied in (what `buf` grows to at most).
pub const APPLY_CHUNK: u64 = 8 << 20;

/// Applies one guest op to disk `disk` of `vm`, and returns how long the VM's calls took
/// (not counting filling the buffer).
///
/// A write carries [`fill_pattern`] content and a read lands in `buf`, both in pieces of
/// at most [`APPLY_CHUNK`] bytes (`buf` is reused from op to op); an unmap, a flush
/// ([`Vm::flush`]) and an extend go to the matching call. An extend only grows the disk:
/// to a size at or below its capacity it does nothing (a workload's idea of the size may
/// lag behind the disk's). Ops a caller does not want applied (the flushes of a drive
/// that only counts them, the reads of a replay) it leaves out.
pub fn apply_op(vm: &Vm, disk: usize, op: &IoOp, buf: &mut Vec<u8>) -> Result<Duration, SimError> {
    let mut took = Duration::ZERO;
    let mut timed = |r: &mut dyn FnMut() -> Result<(), SimError>| {
        let t = Instant::now();
        let r = r();
        took += t.elapsed();
        r
    };
    match *op {
        IoOp::Write { offset, len, seed } => {
            for (at, n) in pieces(offset, len) {
                buf.resize(n, 0);
                fill_pattern(seed, at, buf);
                timed(&mut || vm.write(disk, at, buf))?;
            }
        }
        IoOp::Read { offset, len } => {
            for (at, n) in pieces(offset, len) {
                buf.resize(n, 0);
                timed(&mut || vm.read(disk, at, buf))?;
            }
        }
        IoOp::Unmap { offset, len } => timed(&mut || vm.unmap(disk, offset, len))?,
        IoOp::Flush => timed(&mut || vm.flush())?,
        IoOp::Extend { new_size } => {
            if new_size > vm.capacity(disk)? {
                timed(&mut || vm.extend_disk(disk, new_size))?;
            }
        }
    }
    Ok(took)
}

/// `[offset, offset + len)` in pieces of at most [`APPLY_CHUNK`] bytes.
fn pieces(offset: u64, len: u64) -> impl Iterator<Item = (u64, usize)> {
    (0..len.div_ceil(APPLY_CHUNK)).map(move |i| {
        let done = i * APPLY_CHUNK;
        (offset + done, (len - done).min(APPLY_CHUNK) as usize)
    })
}

/// A changed-area answer, with how many pages it took.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Paged {
    /// The changed areas `(start, length)`, sorted and coalesced.
    pub areas: Vec<(u64, u64)>,
    /// `QueryChangedDiskAreas` calls made.
    pub pages: u64,
}

/// Every changed area of `disk` of snapshot `snapshot` of `vm` since `change_id`, paged
/// to the end of the disk by the checked pager [`vadp::changed_areas`] (each page's window
/// is checked, so a host that answers short gives an error, never a short answer). The VM
/// answers the data-protection API for its own name.
pub fn changed_areas(vm: &Vm, snapshot: &str, disk: usize, change_id: &str) -> Result<Paged, VadpError> {
    let mut pager = vadp::changed_areas(vm, vm.name(), snapshot, disk, change_id);
    let mut areas = Vec::new();
    for a in pager.by_ref() {
        let a = a?;
        push_area(&mut areas, a.start, a.length);
    }
    Ok(Paged {
        areas,
        pages: pager.pages(),
    })
}

/// Appends `(start, len)` to sorted areas, merging it with the last when they touch.
pub(crate) fn push_area(out: &mut Vec<(u64, u64)>, start: u64, len: u64) {
    if len == 0 {
        return;
    }
    match out.last_mut() {
        Some((s, l)) if *s + *l >= start => *l = (*l).max(start + len - *s),
        _ => out.push((start, len)),
    }
}

/// Sorts and coalesces areas.
pub(crate) fn coalesce(mut v: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    v.sort_unstable();
    let mut out = Vec::with_capacity(v.len());
    for (s, l) in v {
        push_area(&mut out, s, l);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use sim::{DiskSpec, Host};
    use tracker::Granularity;

    #[test]
    fn coalesce_merges_touching_and_overlapping_areas() {
        assert_eq!(
            coalesce(vec![(10, 5), (0, 10), (20, 1), (14, 2)]),
            vec![(0, 16), (20, 1)]
        );
    }

    #[test]
    fn pieces_cover_the_range_in_chunks() {
        let p: Vec<_> = pieces(100, 2 * APPLY_CHUNK + 1).collect();
        let c = APPLY_CHUNK as usize;
        assert_eq!(p, [(100, c), (100 + APPLY_CHUNK, c), (100 + 2 * APPLY_CHUNK, 1)]);
        assert_eq!(pieces(5, 0).count(), 0);
    }

    #[test]
    fn ops_reach_the_vm_and_answers_span_pages() {
        let dir = tempfile::tempdir().unwrap();
        let host = Host::open(dir.path()).unwrap();
        let g = 4096;
        let vm = host
            .create_vm(
                "v",
                &[DiskSpec {
                    capacity: 1 << 20,
                    granularity: Granularity::new(g).unwrap(),
                }],
            )
            .unwrap();
        let base = vm.create_snapshot("a").unwrap().disks[0].change_id.clone().unwrap();
        let mut buf = Vec::new();
        // Every other block: 16 areas that do not touch.
        for i in 0..16 {
            let op = IoOp::Write {
                offset: 2 * i * g,
                len: 100,
                seed: i,
            };
            apply_op(&vm, 0, &op, &mut buf).unwrap();
        }
        apply_op(&vm, 0, &IoOp::Extend { new_size: 1 << 19 }, &mut buf).unwrap();
        assert_eq!(vm.capacity(0).unwrap(), 1 << 20, "an extend never shrinks");
        apply_op(&vm, 0, &IoOp::Extend { new_size: 2 << 20 }, &mut buf).unwrap();
        assert_eq!(vm.capacity(0).unwrap(), 2 << 20);
        apply_op(&vm, 0, &IoOp::Read { offset: 0, len: 100 }, &mut buf).unwrap();
        let mut want = vec![0u8; 100];
        fill_pattern(0, 0, &mut want);
        assert_eq!(buf, want, "a read lands in the buffer");
        vm.create_snapshot("b").unwrap();
        vm.set_max_areas(3);
        let p = changed_areas(&vm, "b", 0, &base).unwrap();
        let want: Vec<(u64, u64)> = (0..16).map(|i| (2 * i * g, g)).collect();
        assert_eq!(p.areas, want);
        assert!(p.pages >= 6, "16 areas in pages of 3: {} pages", p.pages);
    }
}
