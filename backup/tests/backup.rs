//! The backup client against an in-memory host with exact change tracking
//! (end-to-end tests against the simulated host are in cbtsim/tests/backup.rs).

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::Mutex;

use backup::{
    backup_vm, list, prune, repair, restore_to_file, restore_to_vm, verify, BackupError, BackupOptions, ChunkHash,
    Compression, PointImage, PrunePolicy, Repository,
};
use vadp::{
    DataProtection, DiskArea, DiskChangeInfo, NotFoundKind, RestoreDisk, RestoreTarget, SnapshotDisk, SnapshotInfo,
    VadpError,
};

const K: u64 = 1024;
const M: u64 = 1024 * K;

/// A snapshot's disk images.
type Images = Vec<Vec<u8>>;

#[derive(Debug, Default)]
struct MemDisk {
    data: Vec<u8>,
    g: u64,
    /// Per block, the epochs in which it was written.
    writes: Vec<BTreeSet<u64>>,
}

#[derive(Debug)]
struct MemSnap {
    seq: u64,
    images: Vec<Vec<u8>>,
}

#[derive(Debug, Default)]
struct MemVm {
    disks: Vec<MemDisk>,
    snaps: HashMap<String, MemSnap>,
    session: u64,
    /// Epoch of the last snapshot; writes land in `seq + 1`.
    seq: u64,
    /// Epoch where the current session started (everything before: unknown).
    session_start: u64,
}

/// An in-memory host: exact tracking, pages of at most 3 areas, faults on demand.
#[derive(Debug, Default)]
struct MemHost {
    vms: Mutex<HashMap<String, MemVm>>,
    /// Every snapshot's images when it was taken.
    taken: Mutex<HashMap<(String, String), Images>>,
    /// read_snapshot fails at or past this offset.
    fail_read_at: Mutex<Option<u64>>,
    /// read_snapshot panics (a killed process, in-process).
    panic_on_read: Mutex<bool>,
    removed: Mutex<Vec<String>>,
    bytes_read: Mutex<u64>,
    /// `QueryChangedDiskAreas` calls answered.
    pages: Mutex<u64>,
}

impl MemHost {
    fn add_vm(&self, name: &str, disks: &[(u64, u64)]) {
        let vm = MemVm {
            disks: disks
                .iter()
                .map(|&(cap, g)| MemDisk {
                    data: vec![0; cap as usize],
                    g,
                    writes: vec![BTreeSet::new(); cap.div_ceil(g) as usize],
                })
                .collect(),
            session: 1,
            ..MemVm::default()
        };
        self.vms.lock().unwrap().insert(name.into(), vm);
    }

    fn write(&self, vm: &str, disk: usize, off: u64, data: &[u8]) {
        let mut vms = self.vms.lock().unwrap();
        let v = vms.get_mut(vm).unwrap();
        let epoch = v.seq + 1;
        let d = &mut v.disks[disk];
        d.data[off as usize..off as usize + data.len()].copy_from_slice(data);
        for b in off / d.g..(off + data.len() as u64).div_ceil(d.g) {
            d.writes[b as usize].insert(epoch);
        }
    }

    fn fill(&self, vm: &str, disk: usize, off: u64, len: u64, seed: u8) {
        // Non-zero, and different in every chunk and for every seed.
        let data: Vec<u8> = (0..len)
            .map(|i| {
                let x =
                    (off + i).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ u64::from(seed).wrapping_mul(0xD6E8_FEB8_6659_FD93);
                (x.wrapping_mul(0xBF58_476D_1CE4_E5B9) >> 40) as u8 | 1
            })
            .collect();
        self.write(vm, disk, off, &data);
    }

    fn extend(&self, vm: &str, disk: usize, cap: u64) {
        let mut vms = self.vms.lock().unwrap();
        let d = &mut vms.get_mut(vm).unwrap().disks[disk];
        d.data.resize(cap as usize, 0);
        d.writes.resize(cap.div_ceil(d.g) as usize, BTreeSet::new());
    }

    /// Tracking is reset (an unclean shutdown): old change IDs are refused.
    fn reset_tracking(&self, vm: &str) {
        let mut vms = self.vms.lock().unwrap();
        let v = vms.get_mut(vm).unwrap();
        v.session += 1;
        v.session_start = v.seq + 1;
    }

    fn taken(&self, vm: &str, snap: &str) -> Vec<Vec<u8>> {
        self.taken.lock().unwrap()[&(vm.to_owned(), snap.to_owned())].clone()
    }

    fn snapshot_count(&self, vm: &str) -> usize {
        self.vms.lock().unwrap()[vm].snaps.len()
    }
}

fn not_found(what: NotFoundKind, name: &str) -> VadpError {
    VadpError::NotFound {
        what,
        name: name.into(),
    }
}

impl DataProtection for MemHost {
    fn query_changed_disk_areas(
        &self,
        vm: &str,
        snapshot: &str,
        disk: usize,
        start: u64,
        change_id: &str,
    ) -> Result<DiskChangeInfo, VadpError> {
        *self.pages.lock().unwrap() += 1;
        let vms = self.vms.lock().unwrap();
        let v = vms.get(vm).ok_or_else(|| not_found(NotFoundKind::Vm, vm))?;
        let s = v
            .snaps
            .get(snapshot)
            .ok_or_else(|| not_found(NotFoundKind::Snapshot, snapshot))?;
        let d = v
            .disks
            .get(disk)
            .ok_or_else(|| not_found(NotFoundKind::Disk, &disk.to_string()))?;
        let cap = s.images[disk].len() as u64;
        if start >= cap {
            return Err(VadpError::OffsetOutOfRange { start, capacity: cap });
        }
        let whole = change_id == "*" && s.seq >= v.session_start && v.session > 1;
        let since = if change_id == "*" {
            0
        } else {
            let (sess, seq) = change_id
                .split_once('/')
                .and_then(|(a, b)| Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()?)))
                .ok_or_else(|| VadpError::MalformedChangeId {
                    change_id: change_id.into(),
                    reason: "expected <session>/<sequence>".into(),
                })?;
            if sess != v.session {
                return Err(VadpError::TrackingReset {
                    change_id: change_id.into(),
                    reason: "it predates a reset".into(),
                });
            }
            seq
        };
        let blocks: Vec<u64> = (start / d.g..cap.div_ceil(d.g))
            .filter(|&b| whole || d.writes[b as usize].range(since + 1..=s.seq).next().is_some())
            .collect();
        let mut areas: Vec<DiskArea> = Vec::new();
        for b in blocks {
            let (lo, hi) = ((b * d.g).max(start), ((b + 1) * d.g).min(cap));
            let n = areas.len();
            match areas.last_mut() {
                Some(a) if a.end() == lo => a.length += hi - lo,
                _ if n == 3 => break,
                _ => areas.push(DiskArea {
                    start: lo,
                    length: hi - lo,
                }),
            }
        }
        let end = if areas.len() == 3 { areas[2].end() } else { cap };
        Ok(DiskChangeInfo {
            start_offset: start,
            length: end - start,
            changed_area: areas,
        })
    }

    fn disk_capacity(&self, vm: &str, snapshot: &str, disk: usize) -> Result<u64, VadpError> {
        let vms = self.vms.lock().unwrap();
        let s = vms[vm]
            .snaps
            .get(snapshot)
            .ok_or_else(|| not_found(NotFoundKind::Snapshot, snapshot))?;
        Ok(s.images[disk].len() as u64)
    }

    fn read_snapshot(
        &self,
        vm: &str,
        snapshot: &str,
        disk: usize,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), VadpError> {
        let crash = *self.panic_on_read.lock().unwrap();
        assert!(!crash, "injected crash");
        if self
            .fail_read_at
            .lock()
            .unwrap()
            .is_some_and(|f| offset + buf.len() as u64 > f)
        {
            return Err(VadpError::host("injected read error"));
        }
        let vms = self.vms.lock().unwrap();
        let s = vms[vm]
            .snaps
            .get(snapshot)
            .ok_or_else(|| not_found(NotFoundKind::Snapshot, snapshot))?;
        buf.copy_from_slice(&s.images[disk][offset as usize..offset as usize + buf.len()]);
        *self.bytes_read.lock().unwrap() += buf.len() as u64;
        Ok(())
    }

    fn create_snapshot(&self, vm: &str, name: &str) -> Result<SnapshotInfo, VadpError> {
        let mut vms = self.vms.lock().unwrap();
        let v = vms.get_mut(vm).ok_or_else(|| not_found(NotFoundKind::Vm, vm))?;
        if v.snaps.contains_key(name) {
            return Err(VadpError::host(format!("snapshot {name} exists")));
        }
        v.seq += 1;
        let images: Vec<Vec<u8>> = v.disks.iter().map(|d| d.data.clone()).collect();
        let info = SnapshotInfo {
            name: name.into(),
            disks: v
                .disks
                .iter()
                .enumerate()
                .map(|(i, d)| SnapshotDisk {
                    disk: i,
                    capacity: d.data.len() as u64,
                    granularity: d.g,
                    change_id: Some(format!("{}/{}", v.session, v.seq)),
                })
                .collect(),
        };
        self.taken
            .lock()
            .unwrap()
            .insert((vm.into(), name.into()), images.clone());
        v.snaps.insert(name.into(), MemSnap { seq: v.seq, images });
        Ok(info)
    }

    fn remove_snapshot(&self, vm: &str, name: &str) -> Result<(), VadpError> {
        let mut vms = self.vms.lock().unwrap();
        let v = vms.get_mut(vm).ok_or_else(|| not_found(NotFoundKind::Vm, vm))?;
        v.snaps
            .remove(name)
            .ok_or_else(|| not_found(NotFoundKind::Snapshot, name))?;
        self.removed.lock().unwrap().push(name.into());
        Ok(())
    }

    fn enable_change_tracking(&self, _vm: &str) -> Result<(), VadpError> {
        Ok(())
    }
}

impl RestoreTarget for MemHost {
    fn create_vm(&self, name: &str, disks: &[RestoreDisk]) -> Result<(), VadpError> {
        let d: Vec<(u64, u64)> = disks.iter().map(|d| (d.capacity, d.granularity)).collect();
        self.add_vm(name, &d);
        Ok(())
    }

    fn write(&self, vm: &str, disk: usize, offset: u64, data: &[u8]) -> Result<(), VadpError> {
        MemHost::write(self, vm, disk, offset, data);
        Ok(())
    }

    fn delete_vm(&self, name: &str) -> Result<(), VadpError> {
        self.vms.lock().unwrap().remove(name);
        Ok(())
    }
}

fn repo() -> (tempfile::TempDir, Repository) {
    let dir = tempfile::tempdir().unwrap();
    let repo = Repository::create_or_open(&dir.path().join("repo")).unwrap();
    (dir, repo)
}

fn run(host: &MemHost, vm: &str, repo: &Repository) -> backup::BackupReport {
    backup_vm(host, vm, repo, &BackupOptions::default(), &()).unwrap()
}

fn restored(repo: &Repository, point: &str, disk: usize, dir: &Path) -> Vec<u8> {
    let to = dir.join(format!("restore-{point}-{disk}.img"));
    restore_to_file(repo, point, disk, &to, true, &()).unwrap();
    std::fs::read(to).unwrap()
}

fn snap_of(point: &str) -> String {
    format!("cbtsim-backup-{point}")
}

#[test]
fn full_then_incrementals_restore_every_point_and_read_only_changes() {
    let (dir, repo) = repo();
    let host = MemHost::default();
    host.add_vm("a", &[(8 * M, 64 * K), (2 * M + 4 * K, 128 * K)]);
    host.fill("a", 0, 0, M, 3);
    host.fill("a", 0, 5 * M + 100, 3000, 5);
    host.fill("a", 1, 2 * M, 4 * K, 7); // the short last chunk
    let r1 = run(&host, "a", &repo);
    assert_eq!(r1.kind, "full");
    assert!(r1.reason.contains("first backup"), "{}", r1.reason);
    assert_eq!(r1.bytes_read, r1.changed_bytes);
    assert_eq!(r1.bytes_read, M + 64 * K + 4 * K);
    let mut points = vec![r1];
    for round in 0..6u8 {
        host.fill("a", 0, u64::from(round) * 1100 * K, 10 * K, round + 11);
        host.fill("a", 1, u64::from(round) * 300 * K, 1, round + 1);
        if round == 3 {
            host.write("a", 0, 0, &vec![0; 64 * K as usize]); // a chunk becomes zero
        }
        let before = *host.bytes_read.lock().unwrap();
        let r = run(&host, "a", &repo);
        assert_eq!(r.kind, "incremental", "{}", r.reason);
        assert_eq!(r.parent.as_deref(), Some(points.last().unwrap().point.as_str()));
        assert_eq!(
            r.bytes_read, r.changed_bytes,
            "an incremental reads the changed areas only"
        );
        assert_eq!(*host.bytes_read.lock().unwrap() - before, r.bytes_read);
        assert!(r.changed_bytes <= 2 * 64 * K + 2 * 128 * K);
        points.push(r);
    }
    for p in &points {
        let images = host.taken("a", &snap_of(&p.point));
        for (disk, img) in images.iter().enumerate() {
            assert!(
                restored(&repo, &p.point, disk, dir.path()) == *img,
                "point {} disk {disk}",
                p.point
            );
        }
    }
    assert_eq!(host.snapshot_count("a"), 0, "every snapshot was removed");
    let list = repo.points().unwrap();
    assert_eq!(list.len(), 7);
    assert!(list.iter().all(|p| p.disks.iter().all(|d| d.change_id.is_some())));
    assert!(verify(&repo, &()).unwrap().ok);
}

/// A full and an incremental backup whose changed areas take the host's pages of 3 areas
/// by the hundred: both restore byte for byte. A pager that stopped early would leave
/// most of the disk out of both.
#[test]
fn backups_whose_changed_areas_span_hundreds_of_pages_restore_identically() {
    let (dir, repo) = repo();
    let host = MemHost::default();
    let (cap, g) = (16 * M, 4 * K);
    host.add_vm("a", &[(cap, g)]);
    // Every other block: 2048 areas that do not touch.
    for b in (0..cap / g).step_by(2) {
        host.fill("a", 0, b * g + 7, 512, 1);
    }
    let full = run(&host, "a", &repo);
    let pages_full = *host.pages.lock().unwrap();
    // Every third block, new bytes: 1366 areas, a third of them in blocks left zero so far.
    for b in (0..cap / g).step_by(3) {
        host.fill("a", 0, b * g + 1000, 100, 2);
    }
    let inc = run(&host, "a", &repo);
    let pages_inc = *host.pages.lock().unwrap() - pages_full;
    assert_eq!(
        (full.kind.as_str(), inc.kind.as_str()),
        ("full", "incremental"),
        "{}",
        inc.reason
    );
    assert_eq!((full.changed_areas, inc.changed_areas), (2048, 1366));
    assert_eq!(
        (full.changed_bytes, inc.changed_bytes),
        (2048 * g, 1366 * g),
        "every changed block, whole"
    );
    assert!(
        pages_full >= 2048 / 3 && pages_inc >= 1366 / 3,
        "{pages_full} and {pages_inc} pages"
    );
    for p in [&full, &inc] {
        let image = &host.taken("a", &snap_of(&p.point))[0];
        assert!(
            restored(&repo, &p.point, 0, dir.path()) == *image,
            "point {} ({}) restores differently",
            p.point,
            p.kind
        );
    }
}

#[test]
fn tracking_reset_forces_a_full_backup_with_its_reason() {
    let (dir, repo) = repo();
    let host = MemHost::default();
    host.add_vm("a", &[(4 * M, 64 * K)]);
    host.fill("a", 0, 0, 100 * K, 3);
    run(&host, "a", &repo);
    host.fill("a", 0, 3 * M, 10 * K, 4);
    host.reset_tracking("a");
    let r = run(&host, "a", &repo);
    assert_eq!(r.kind, "full");
    assert!(
        r.reason.contains("rejected") && r.reason.contains("predates a reset"),
        "{}",
        r.reason
    );
    assert_eq!(r.parent, None);
    assert_eq!(r.bytes_read, 4 * M, "after a reset `*` is the whole disk");
    assert_eq!(
        restored(&repo, &r.point, 0, dir.path()),
        host.taken("a", &snap_of(&r.point))[0]
    );
    let r = run(&host, "a", &repo);
    assert_eq!((r.kind.as_str(), r.bytes_read), ("incremental", 0));
    let r = backup_vm(
        &host,
        "a",
        &repo,
        &BackupOptions {
            full: true,
            ..Default::default()
        },
        &(),
    )
    .unwrap();
    assert_eq!(r.kind, "full");
    assert_eq!(r.reason, "a full backup was requested");
    assert_eq!(r.bytes_stored, 0, "every chunk is already in the repository");
}

#[test]
fn an_extended_disk_keeps_old_data_and_reads_zeros_past_the_old_end() {
    let (dir, repo) = repo();
    let host = MemHost::default();
    host.add_vm("a", &[(M + 512, 64 * K)]);
    host.fill("a", 0, 0, M + 512, 3);
    run(&host, "a", &repo);
    host.extend("a", 0, 3 * M);
    host.fill("a", 0, 2 * M, 512, 9);
    let r = run(&host, "a", &repo);
    assert_eq!(r.kind, "incremental");
    assert_eq!(r.bytes_read, 64 * K);
    let img = restored(&repo, &r.point, 0, dir.path());
    assert_eq!(img.len() as u64, 3 * M);
    assert_eq!(img, host.taken("a", &snap_of(&r.point))[0]);
    assert_eq!(repo.points().unwrap()[1].disks[0].capacity, 3 * M);
}

#[test]
fn fine_granularity_reads_whole_chunks() {
    let (dir, repo) = repo();
    let host = MemHost::default();
    host.add_vm("a", &[(2 * M, 4 * K)]);
    host.fill("a", 0, 0, 4 * K, 1);
    run(&host, "a", &repo);
    host.fill("a", 0, 8 * K, 4 * K, 2);
    let r = run(&host, "a", &repo);
    assert_eq!((r.changed_bytes, r.bytes_read), (4 * K, 64 * K));
    assert_eq!(
        restored(&repo, &r.point, 0, dir.path()),
        host.taken("a", &snap_of(&r.point))[0]
    );
}

#[test]
fn a_failed_backup_removes_its_snapshot_and_commits_nothing() {
    let (dir, repo) = repo();
    let host = MemHost::default();
    host.add_vm("a", &[(8 * M, 64 * K)]);
    host.fill("a", 0, 0, 8 * M, 3);
    let first = run(&host, "a", &repo);
    host.fill("a", 0, 0, 8 * M, 4);
    *host.fail_read_at.lock().unwrap() = Some(6 * M);
    let e = backup_vm(&host, "a", &repo, &BackupOptions::default(), &()).unwrap_err();
    assert!(matches!(e, BackupError::Host { .. }), "{e}");
    assert_eq!(host.snapshot_count("a"), 0);
    assert_eq!(repo.points().unwrap().len(), 1);
    *host.fail_read_at.lock().unwrap() = None;
    // In-process crash: the snapshot stays and the journal names it.
    *host.panic_on_read.lock().unwrap() = true;
    let crashed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        backup_vm(&host, "a", &repo, &BackupOptions::default(), &())
    }));
    assert!(crashed.is_err());
    assert_eq!(host.snapshot_count("a"), 1);
    *host.panic_on_read.lock().unwrap() = false;
    let r = run(&host, "a", &repo);
    assert_eq!(host.snapshot_count("a"), 0, "the left-over snapshot was removed");
    assert_eq!(r.kind, "incremental");
    assert_eq!(r.parent, Some(first.point.clone()));
    assert_eq!(
        restored(&repo, &r.point, 0, dir.path()),
        host.taken("a", &snap_of(&r.point))[0]
    );
    assert_eq!(
        restored(&repo, &first.point, 0, dir.path()),
        host.taken("a", &snap_of(&first.point))[0]
    );
    let v = verify(&repo, &()).unwrap();
    assert!(v.ok, "{v:?}");
}

#[test]
fn chunks_are_shared_across_vms_and_compression_is_optional() {
    let (dir, repo) = repo();
    let host = MemHost::default();
    for vm in ["a", "b"] {
        host.add_vm(vm, &[(4 * M, 64 * K)]);
        host.fill(vm, 0, 0, 2 * M, 3);
    }
    let a = backup_vm(
        &host,
        "a",
        &repo,
        &BackupOptions {
            compression: Compression::None,
            ..Default::default()
        },
        &(),
    )
    .unwrap();
    assert!(a.bytes_stored > 2 * M);
    let b = run(&host, "b", &repo);
    assert_eq!(b.bytes_stored, 0);
    assert_eq!(b.kind, "full", "b's first backup");
    host.add_vm("c", &[(4 * M, 64 * K)]);
    host.write("c", 0, 0, &vec![7u8; M as usize]);
    let c = run(&host, "c", &repo);
    assert!(c.bytes_stored < 64 * K, "constant data compresses: {}", c.bytes_stored);
    assert_eq!(
        restored(&repo, &c.point, 0, dir.path()),
        host.taken("c", &snap_of(&c.point))[0]
    );
    // Restore into a new VM of the target.
    restore_to_vm(&repo, &b.point, &host, "b2", &()).unwrap();
    assert_eq!(
        host.vms.lock().unwrap()["b2"].disks[0].data,
        host.taken("b", &snap_of(&b.point))[0]
    );
    let e = restore_to_file(&repo, &b.point, 1, &dir.path().join("x"), false, &()).unwrap_err();
    assert!(matches!(e, BackupError::NoSuchDisk { .. }), "{e}");
    let e = restore_to_file(&repo, "99", 0, &dir.path().join("x"), false, &()).unwrap_err();
    assert!(matches!(e, BackupError::NoSuchPoint(_)), "{e}");
}

#[test]
fn verify_names_corrupt_and_missing_chunks_and_the_points_they_affect() {
    let (_dir, repo) = repo();
    let host = MemHost::default();
    host.add_vm("a", &[(4 * M, 64 * K)]);
    host.fill("a", 0, 0, 64 * K, 3);
    host.fill("a", 0, M, 64 * K, 4);
    let p1 = run(&host, "a", &repo);
    host.fill("a", 0, 2 * M, 64 * K, 5);
    let p2 = run(&host, "a", &repo);
    host.fill("a", 0, M, 64 * K, 6);
    let p3 = run(&host, "a", &repo);
    assert!(verify(&repo, &()).unwrap().ok);
    // The chunk at 0 is in all three points; the one at 2 MiB in p2 and p3.
    let at = |off: u64| host.taken("a", &snap_of(&p1.point))[0][off as usize..(off + 64 * K) as usize].to_vec();
    let h0 = backup::ChunkHash::of(&at(0));
    let p = repo.chunk_path(h0);
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[100] ^= 0x40;
    std::fs::write(&p, bytes).unwrap();
    // Read before verify: the hash check catches it.
    let e = restore_to_file(&repo, &p1.point, 0, &repo.root().join("../img"), false, &()).unwrap_err();
    assert!(matches!(e, BackupError::CorruptChunk { .. }), "{e}");
    assert!(!repo.root().join("../img").exists());
    let v = verify(&repo, &()).unwrap();
    assert!(!v.ok);
    assert_eq!(v.corrupt_chunks, vec![h0.to_string()]);
    assert_eq!(
        v.affected_points,
        vec![p1.point.clone(), p2.point.clone(), p3.point.clone()]
    );
    // Moved aside, named in the report; a restore now names it as bad.
    assert!(!p.exists() && repo.bad_path(h0).is_file());
    assert_eq!(v.moved_aside, vec![repo.bad_path(h0).display().to_string()]);
    let e = restore_to_file(&repo, &p1.point, 0, &repo.root().join("../img"), false, &()).unwrap_err();
    assert!(matches!(e, BackupError::BadChunk(h) if h == h0), "{e}");
    // A second verify lists it as bad (already moved), not as newly corrupt.
    let v = verify(&repo, &()).unwrap();
    assert_eq!(
        (v.corrupt_chunks.len(), v.bad_chunks.clone()),
        (0, vec![h0.to_string()])
    );
    let h2 = backup::ChunkHash::of(&host.taken("a", &snap_of(&p2.point))[0][2 * M as usize..(2 * M + 64 * K) as usize]);
    std::fs::remove_file(repo.chunk_path(h2)).unwrap();
    let v = verify(&repo, &()).unwrap();
    assert_eq!(
        (v.corrupt_chunks.len(), v.missing_chunks.clone(), v.bad_chunks.clone()),
        (0, vec![h2.to_string()], vec![h0.to_string()])
    );
    assert!(repo.bad_path(h2).is_file(), "a missing chunk is recorded as bad");
    assert_eq!(v.affected_points.len(), 3);
    // A damaged point file.
    let pf = repo.root().join("points").join(format!("{}.point", p2.point));
    let mut bytes = std::fs::read(&pf).unwrap();
    let n = bytes.len();
    bytes[n - 40] ^= 1;
    std::fs::write(&pf, bytes).unwrap();
    let v = verify(&repo, &()).unwrap();
    assert_eq!(v.corrupt_points, vec![p2.point.clone()]);
    // A backup does not build on a corrupt parent... p3 is the parent; corrupt it too.
    let pf3 = repo.root().join("points").join(format!("{}.point", p3.point));
    std::fs::write(&pf3, b"garbage").unwrap();
    let r = run(&host, "a", &repo);
    assert_eq!(r.kind, "full");
    assert!(r.reason.contains("unreadable"), "{}", r.reason);
}

#[test]
fn prune_keeps_the_newest_points_of_each_vm_and_collects_orphans() {
    let (dir, repo) = repo();
    let host = MemHost::default();
    host.add_vm("a", &[(4 * M, 64 * K)]);
    host.add_vm("b", &[(4 * M, 64 * K)]);
    let mut ids = Vec::new();
    for round in 0..5u8 {
        host.fill("a", 0, u64::from(round) * 512 * K, 64 * K, round + 1);
        host.fill("a", 0, 3 * M, 64 * K, round + 50); // overwritten each time
        ids.push(run(&host, "a", &repo).point);
    }
    host.fill("b", 0, 0, 64 * K, 99);
    let b = run(&host, "b", &repo).point;
    // An orphan chunk and a temporary file, as an interrupted backup leaves them.
    let orphan = backup::ChunkHash::of(b"orphan");
    std::fs::create_dir_all(repo.chunk_path(orphan).parent().unwrap()).unwrap();
    std::fs::write(repo.chunk_path(orphan), b"\0orphan").unwrap();
    std::fs::write(repo.root().join("tmp/chunk.1.1"), b"partial").unwrap();
    assert_eq!(verify(&repo, &()).unwrap().unreferenced_chunks, 1);
    assert!(matches!(
        prune(&repo, &PrunePolicy::last(0)),
        Err(BackupError::InvalidArgument(_))
    ));
    let r = prune(&repo, &PrunePolicy::last(2)).unwrap();
    assert_eq!(r.deleted_points, ids[..3].to_vec());
    assert_eq!(r.kept_points, 3);
    // Three overwritten chunks at 3 MiB and the orphan.
    assert_eq!(r.deleted_chunks, 4);
    assert_eq!(r.tmp_files_removed, 1);
    let v = verify(&repo, &()).unwrap();
    assert!(v.ok && v.unreferenced_chunks == 0, "{v:?}");
    for id in [&ids[3], &ids[4], &b] {
        let vm = if *id == b { "b" } else { "a" };
        assert_eq!(restored(&repo, id, 0, dir.path()), host.taken(vm, &snap_of(id))[0]);
    }
    // With an unreadable point, prune deletes nothing.
    let pf = repo.root().join("points").join(format!("{}.point", ids[3]));
    std::fs::write(&pf, b"garbage").unwrap();
    assert!(matches!(
        prune(&repo, &PrunePolicy::last(1)),
        Err(BackupError::CorruptPoint { .. })
    ));
    assert_eq!(std::fs::read_dir(repo.root().join("points")).unwrap().count(), 3);
}

/// The chunk of `vm`'s disk 0 at `off`, as `point` saw it.
fn chunk_at(host: &MemHost, vm: &str, point: &str, off: u64) -> ChunkHash {
    ChunkHash::of(&host.taken(vm, &snap_of(point))[0][off as usize..(off + 64 * K) as usize])
}

fn corrupt(repo: &Repository, h: ChunkHash) {
    let p = repo.chunk_path(h);
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[7] ^= 0x10;
    std::fs::write(&p, bytes).unwrap();
}

#[test]
fn a_backup_after_verify_stores_bad_chunks_again_and_heals_older_points() {
    let (dir, repo) = repo();
    let host = MemHost::default();
    host.add_vm("a", &[(4 * M, 64 * K)]);
    host.fill("a", 0, 0, 256 * K, 1);
    let p1 = run(&host, "a", &repo);
    let h = chunk_at(&host, "a", &p1.point, 64 * K);
    corrupt(&repo, h);
    assert!(!verify(&repo, &()).unwrap().ok);
    // A forced full backup: before, it deduplicated against the corrupt chunk,
    // stored 0 bytes and made a point that did not restore.
    let full = backup_vm(
        &host,
        "a",
        &repo,
        &BackupOptions {
            full: true,
            ..Default::default()
        },
        &(),
    )
    .unwrap();
    assert_eq!(full.healed_chunks, 1, "{full:?}");
    assert!(full.bytes_stored > 0 && full.bytes_stored <= 64 * K + 1, "{full:?}");
    let want = host.taken("a", &snap_of(&full.point))[0].clone();
    assert_eq!(restored(&repo, &full.point, 0, dir.path()), want);
    // The good copy heals the older point too; the mark is gone.
    assert_eq!(restored(&repo, &p1.point, 0, dir.path()), want);
    assert!(!repo.bad_path(h).exists());
    let v = verify(&repo, &()).unwrap();
    assert!(v.ok, "{v:?}");

    // Without --full: an incremental would carry the bad chunk over from its
    // parent, so the backup is full, and says why.
    host.fill("a", 0, 2 * M, 64 * K, 2);
    let p3 = run(&host, "a", &repo);
    corrupt(&repo, h);
    assert!(!verify(&repo, &()).unwrap().ok);
    host.fill("a", 0, 3 * M, 64 * K, 3);
    let p4 = run(&host, "a", &repo);
    assert_eq!(p4.kind, "full");
    assert!(
        p4.reason
            .contains(&format!("previous point {} references 1 chunk(s)", p3.point)),
        "{}",
        p4.reason
    );
    assert_eq!(p4.healed_chunks, 1);
    for p in [&p1, &full, &p3, &p4] {
        assert_eq!(
            restored(&repo, &p.point, 0, dir.path()),
            host.taken("a", &snap_of(&p.point))[0],
            "{}",
            p.point
        );
    }
    assert!(verify(&repo, &()).unwrap().ok);
    // The next one builds on p4 again.
    assert_eq!(run(&host, "a", &repo).kind, "incremental");
}

#[test]
fn a_chunk_deleted_by_hand_is_stored_again_without_verify() {
    let (dir, repo) = repo();
    let host = MemHost::default();
    host.add_vm("a", &[(2 * M, 64 * K)]);
    host.fill("a", 0, 0, 128 * K, 1);
    let p1 = run(&host, "a", &repo);
    std::fs::remove_file(repo.chunk_path(chunk_at(&host, "a", &p1.point, 0))).unwrap();
    let full = backup_vm(
        &host,
        "a",
        &repo,
        &BackupOptions {
            full: true,
            ..Default::default()
        },
        &(),
    )
    .unwrap();
    assert!(full.bytes_stored > 0, "{full:?}");
    assert_eq!(
        restored(&repo, &full.point, 0, dir.path()),
        host.taken("a", &snap_of(&full.point))[0]
    );
}

#[test]
fn repair_reads_bad_chunks_again_where_the_vm_still_has_them() {
    let (dir, repo) = repo();
    let host = MemHost::default();
    host.add_vm("a", &[(2 * M, 64 * K)]);
    host.fill("a", 0, 0, 128 * K, 1);
    let p1 = run(&host, "a", &repo);
    let (h0, h1) = (
        chunk_at(&host, "a", &p1.point, 0),
        chunk_at(&host, "a", &p1.point, 64 * K),
    );
    // The guest overwrites the second chunk: only the first can be repaired.
    host.fill("a", 0, 64 * K, 64 * K, 9);
    corrupt(&repo, h0);
    corrupt(&repo, h1);
    let v = verify(&repo, &()).unwrap();
    assert_eq!(v.corrupt_chunks.len(), 2);
    let r = repair(&repo, &host, &()).unwrap();
    assert_eq!(r.bad_chunks, 2);
    assert_eq!(r.repaired, vec![h0.to_string()]);
    assert_eq!(r.unrepaired, vec![h1.to_string()]);
    assert_eq!(host.snapshot_count("a"), 0, "the repair snapshot is removed");
    assert!(repo.chunk_path(h0).is_file() && !repo.bad_path(h0).exists());
    let v = verify(&repo, &()).unwrap();
    assert_eq!(v.bad_chunks, vec![h1.to_string()]);
    let e = restore_to_file(&repo, &p1.point, 0, &dir.path().join("x"), false, &()).unwrap_err();
    assert!(matches!(e, BackupError::BadChunk(h) if h == h1), "{e}");
}

#[test]
fn restore_to_an_existing_file_needs_overwrite() {
    let (dir, repo) = repo();
    let host = MemHost::default();
    host.add_vm("a", &[(M, 64 * K)]);
    host.fill("a", 0, 0, 64 * K, 1);
    let p = run(&host, "a", &repo);
    let to = dir.path().join("img");
    std::fs::write(&to, b"precious").unwrap();
    let e = restore_to_file(&repo, &p.point, 0, &to, false, &()).unwrap_err();
    assert!(matches!(e, BackupError::Exists(_)), "{e}");
    assert_eq!(std::fs::read(&to).unwrap(), b"precious");
    restore_to_file(&repo, &p.point, 0, &to, true, &()).unwrap();
    assert_eq!(std::fs::read(&to).unwrap(), host.taken("a", &snap_of(&p.point))[0]);
}

#[test]
fn a_point_image_reads_any_range_as_a_restore_would() {
    let (dir, repo) = repo();
    let host = MemHost::default();
    // A granularity of 256 KiB: chunks of 256 KiB; an odd capacity.
    host.add_vm("a", &[(3 * M + 4 * K, 256 * K)]);
    host.fill("a", 0, 100, 700 * K, 1);
    host.fill("a", 0, 3 * M, 4 * K, 2);
    let p = run(&host, "a", &repo);
    let want = restored(&repo, &p.point, 0, dir.path());
    let img = PointImage::open(&repo, &p.point, 0).unwrap();
    assert_eq!(img.capacity(), want.len() as u64);
    for (off, len) in [
        (0, 1),
        (99, 2),
        (0, 3 * M as usize),
        (256 * K - 3, 10),
        (3 * M, 4096),
        (M, 300 * 1024),
    ] {
        let mut buf = vec![0xeeu8; len];
        img.read_at(off, &mut buf).unwrap();
        assert!(buf == want[off as usize..off as usize + len], "{off} +{len}");
    }
    let mut buf = [0u8; 2];
    assert!(img.read_at(3 * M + 4 * K - 1, &mut buf).is_err());
    // While it is open prune refuses to run; a backup runs.
    assert!(matches!(prune(&repo, &PrunePolicy::last(1)), Err(BackupError::Busy(_))));
    run(&host, "a", &repo);
    drop(img);
    prune(&repo, &PrunePolicy::last(1)).unwrap();
    assert!(PointImage::open(&repo, &p.point, 1).is_err());
}

/// Seconds since the epoch of 2024-01-01 (a Monday) plus `hours`.
fn at_hours(hours: u64) -> u64 {
    1_704_067_200 + hours * 3600
}

#[test]
fn every_keep_policy_leaves_points_that_restore() {
    // Points of VM a at these hours after Monday 2024-01-01 00:00 UTC; VM b once.
    let hours = [1, 5, 20, 30, 75, 80, 170, 200, 340, 341];
    let policies = [
        (PrunePolicy::last(3), vec![8, 9, 10]),
        (
            PrunePolicy {
                keep_daily: Some(3),
                ..PrunePolicy::default()
            },
            vec![7, 8, 10], // the newest of days 14, 8 and 7
        ),
        (
            PrunePolicy {
                keep_weekly: Some(2),
                ..PrunePolicy::default()
            },
            vec![8, 10],
        ),
        (
            PrunePolicy {
                keep_last: Some(1),
                keep_daily: Some(2),
                keep_weekly: Some(3),
            },
            // last: 10; daily: day 14 is covered, then days 8 and 7; weekly:
            // weeks 3 and 2 are covered, then week 1's newest.
            vec![6, 7, 8, 10],
        ),
    ];
    for (i, (policy, want)) in policies.into_iter().enumerate() {
        let (dir, repo) = repo();
        let host = MemHost::default();
        host.add_vm("a", &[(4 * M, 64 * K)]);
        host.add_vm("b", &[(M, 64 * K)]);
        let mut ids = Vec::new();
        for (n, &h) in hours.iter().enumerate() {
            host.fill("a", 0, n as u64 * 256 * K, 64 * K, n as u8 + 1);
            host.fill("a", 0, 3 * M, 64 * K, n as u8 + 100);
            let opts = BackupOptions {
                time: Some(at_hours(h)),
                ..Default::default()
            };
            ids.push(backup_vm(&host, "a", &repo, &opts, &()).unwrap().point);
        }
        host.fill("b", 0, 0, 64 * K, 7);
        let b = run(&host, "b", &repo).point;
        let r = prune(&repo, &policy).unwrap();
        let mut want_ids: Vec<String> = want.iter().map(|&n| ids[n - 1].clone()).collect();
        want_ids.push(b.clone());
        assert_eq!(r.kept, want_ids, "policy {policy:?}");
        for id in &r.kept {
            let vm = if *id == b { "b" } else { "a" };
            assert_eq!(
                restored(&repo, id, 0, dir.path()),
                host.taken(vm, &snap_of(id))[0],
                "{id}"
            );
        }
        let v = verify(&repo, &()).unwrap();
        assert!(v.ok && v.unreferenced_chunks == 0, "{v:?}");
        // The listing shows the chains as they are now.
        let l = list(&repo).unwrap();
        assert_eq!(l.len(), r.kept.len());
        let newest = l.iter().find(|p| p.meta.point == ids[9]).unwrap();
        assert_eq!(newest.meta.parent.as_deref(), Some(ids[8].as_str()));
        assert!(newest.chain_pruned, "policy {i}: {newest:?}");
    }
}

#[test]
fn list_shows_chains_and_sizes() {
    let (_dir, repo) = repo();
    let host = MemHost::default();
    host.add_vm("a", &[(4 * M, 64 * K), (M, 128 * K)]);
    host.fill("a", 0, 0, 200 * K, 1);
    let p1 = run(&host, "a", &repo);
    host.fill("a", 1, 0, 64 * K, 2);
    let p2 = run(&host, "a", &repo);
    let p3 = run(&host, "a", &repo);
    let l = list(&repo).unwrap();
    assert_eq!(l.len(), 3);
    assert!(l[0].chain.is_empty() && !l[0].chain_pruned);
    assert_eq!(l[2].chain, vec![p2.point.clone(), p1.point.clone()]);
    assert_eq!(l[2].disk_bytes, 5 * M);
    // 200 KiB on disk 0 = 4 chunks of 64 KiB; 64 KiB on disk 1 = 1 chunk of 128 KiB.
    assert_eq!(l[2].data_bytes, 4 * 64 * K + 128 * K);
    assert_eq!(l[2].meta.point, p3.point);
    let json = serde_json::to_value(&l[2]).unwrap();
    assert_eq!(json["point"], p3.point.as_str());
    assert_eq!(json["chain"][1], p1.point.as_str());
}

#[test]
fn a_restore_to_a_vm_that_fails_deletes_the_vm() {
    let (_dir, repo) = repo();
    let host = MemHost::default();
    host.add_vm("a", &[(2 * M, 64 * K)]);
    host.fill("a", 0, 0, 192 * K, 1);
    let p = run(&host, "a", &repo);
    // The last chunk is corrupt: its presence passes, its read fails after the VM exists.
    corrupt(&repo, chunk_at(&host, "a", &p.point, 128 * K));
    let e = restore_to_vm(&repo, &p.point, &host, "b", &()).unwrap_err();
    assert!(matches!(e, BackupError::RestoreFailed { .. }), "{e}");
    assert!(e.to_string().contains("the partly written VM was deleted"), "{e}");
    assert!(!host.vms.lock().unwrap().contains_key("b"));
}
