//! The backup client end to end on the simulated host: several VMs with
//! guest writers running during backups, every restore point checked byte
//! for byte against the snapshot it was taken from, the CLI, a backup
//! killed in a child process, a corrupt chunk, prune, tracking resets.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backup::{
    backup_vm, prune, restore_to_file, restore_to_vm, verify, BackupOptions, BackupReport, ChunkHash, PrunePolicy,
    Repository,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sim::{DiskSpec, Host, Vm};
use tracker::Granularity;
use vadp::{DataProtection, DiskChangeInfo, SnapshotInfo, VadpError};
use workloads::fill_pattern;

const K: u64 = 1024;
const M: u64 = 1024 * K;

fn spec(capacity: u64, g: u64) -> DiskSpec {
    DiskSpec {
        capacity,
        granularity: Granularity::new(g).unwrap(),
    }
}

/// A disk image: its size and BLAKE3.
type Image = (u64, ChunkHash);

/// The host as a backup sees it, recording what the backup does: bytes read
/// per snapshot, and, just before each snapshot is removed, the BLAKE3 of
/// each of its disks' full image (read through the same API), which the
/// restored images must match.
struct Recorder<'a> {
    host: &'a Host,
    images: Mutex<HashMap<(String, String), Vec<Image>>>,
    read: Mutex<HashMap<(String, String), u64>>,
}

impl<'a> Recorder<'a> {
    fn new(host: &'a Host) -> Self {
        Self {
            host,
            images: Mutex::default(),
            read: Mutex::default(),
        }
    }

    fn image(&self, vm: &str, point: &str) -> Vec<Image> {
        self.images.lock().unwrap()[&(vm.to_owned(), format!("cbtsim-backup-{point}"))].clone()
    }

    fn bytes_read(&self, vm: &str, point: &str) -> u64 {
        self.read.lock().unwrap()[&(vm.to_owned(), format!("cbtsim-backup-{point}"))]
    }
}

impl DataProtection for Recorder<'_> {
    fn query_changed_disk_areas(
        &self,
        vm: &str,
        snap: &str,
        disk: usize,
        start: u64,
        cid: &str,
    ) -> Result<DiskChangeInfo, VadpError> {
        self.host.query_changed_disk_areas(vm, snap, disk, start, cid)
    }
    fn disk_capacity(&self, vm: &str, snap: &str, disk: usize) -> Result<u64, VadpError> {
        self.host.disk_capacity(vm, snap, disk)
    }
    fn read_snapshot(&self, vm: &str, snap: &str, disk: usize, offset: u64, buf: &mut [u8]) -> Result<(), VadpError> {
        *self.read.lock().unwrap().entry((vm.into(), snap.into())).or_default() += buf.len() as u64;
        self.host.read_snapshot(vm, snap, disk, offset, buf)
    }
    fn create_snapshot(&self, vm: &str, name: &str) -> Result<SnapshotInfo, VadpError> {
        let info = self.host.create_snapshot(vm, name)?;
        self.read.lock().unwrap().insert((vm.into(), name.into()), 0);
        Ok(info)
    }
    fn remove_snapshot(&self, vm: &str, name: &str) -> Result<(), VadpError> {
        let v = self.host.vm(vm)?;
        let mut disks = Vec::new();
        for d in 0..v.disk_count() {
            let cap = v.snapshot_capacity(name, d)?;
            let mut img = vec![0u8; cap as usize];
            self.host.read_snapshot(vm, name, d, 0, &mut img)?;
            disks.push((cap, ChunkHash::of(&img)));
        }
        self.images.lock().unwrap().insert((vm.into(), name.into()), disks);
        self.host.remove_snapshot(vm, name)
    }
    fn enable_change_tracking(&self, vm: &str) -> Result<(), VadpError> {
        self.host.enable_change_tracking(vm)
    }
}

/// Fills every disk of `vm` with pattern data.
fn fill_disks(vm: &Vm, seed: u64) {
    let mut buf = vec![0u8; 4 * M as usize];
    for d in 0..vm.disk_count() {
        let cap = vm.capacity(d).unwrap();
        let mut off = 0;
        while off < cap {
            let n = (cap - off).min(buf.len() as u64) as usize;
            fill_pattern(seed + d as u64, off, &mut buf[..n]);
            vm.write(d, off, &buf[..n]).unwrap();
            off += n as u64;
        }
    }
}

/// A guest thread: random 4-64 KiB writes (and some unmaps) until `stop`.
fn writer(vm: Arc<Vm>, seed: u64, stop: &AtomicBool) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut buf = vec![0u8; 64 * K as usize];
    let caps: Vec<u64> = (0..vm.disk_count()).map(|d| vm.capacity(d).unwrap()).collect();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let d = rng.gen_range(0..caps.len());
        let len = rng.gen_range(1..=16u64) * 4 * K;
        let off = rng.gen_range(0..(caps[d] - len) / 512) * 512;
        if rng.gen_ratio(1, 20) {
            vm.unmap(d, off, len).unwrap();
        } else {
            fill_pattern(seed ^ (n << 20), off, &mut buf[..len as usize]);
            vm.write(d, off, &buf[..len as usize]).unwrap();
        }
        n += 1;
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Bytes of chunk files, and of point files, in the repository.
fn repo_bytes(repo: &Path) -> (u64, u64) {
    fn walk(p: &Path) -> u64 {
        std::fs::read_dir(p)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let m = e.metadata().unwrap();
                if m.is_dir() {
                    walk(&e.path())
                } else {
                    m.len()
                }
            })
            .sum()
    }
    (walk(&repo.join("chunks")), walk(&repo.join("points")))
}

fn restored_hash(repo: &Repository, point: &str, disk: usize, dir: &Path) -> Image {
    let to = dir.join("restore.img");
    restore_to_file(repo, point, disk, &to, true, &()).unwrap();
    let img = std::fs::read(&to).unwrap();
    std::fs::remove_file(&to).unwrap();
    (img.len() as u64, ChunkHash::of(&img))
}

#[test]
fn three_vms_with_writers_fifteen_points_each_restores_identically() {
    let dir = tempfile::tempdir().unwrap();
    let host = Host::open(&dir.path().join("ds")).unwrap();
    let repo = Repository::create_or_open(&dir.path().join("repo")).unwrap();
    let vms = [
        ("db", vec![spec(48 * M, 64 * K), spec(16 * M, 256 * K)]),
        ("web", vec![spec(32 * M, 64 * K)]),
        ("fine", vec![spec(16 * M, 4 * K)]), // granularity below the 64 KiB chunk
    ];
    for (i, (name, disks)) in vms.iter().enumerate() {
        fill_disks(&host.create_vm(name, disks).unwrap(), i as u64 * 100);
    }
    let rec = Recorder::new(&host);
    let stop = AtomicBool::new(false);
    let mut reports: Vec<BackupReport> = Vec::new();
    let (mut grew_chunks, mut grew_points, mut changed) = (0u64, 0u64, 0u64);
    std::thread::scope(|s| {
        for (i, (name, _)) in vms.iter().enumerate() {
            let vm = host.vm(name).unwrap();
            let stop = &stop;
            s.spawn(move || writer(vm, 1000 + i as u64, stop));
        }
        for round in 0..4 {
            std::thread::sleep(Duration::from_millis(150));
            if round == 1 {
                // Extend web's disk while its guest writes; write past the old end.
                let web = host.vm("web").unwrap();
                web.extend_disk(0, 40 * M).unwrap();
                web.write(0, 36 * M + 512, &[9u8; 100_000]).unwrap();
            }
            if round == 2 {
                // Tracking turned off: the stored change ID dies with the session.
                host.vm("fine").unwrap().set_cbt(false).unwrap();
            }
            for (name, _) in &vms {
                let before = repo_bytes(repo.root());
                let r = backup_vm(&rec, name, &repo, &BackupOptions::default(), &()).unwrap();
                let after = repo_bytes(repo.root());
                assert_eq!(rec.bytes_read(name, &r.point), r.bytes_read, "{r:?}");
                match (round, *name) {
                    (0, _) => assert_eq!(r.kind, "full"),
                    (2, "fine") => {
                        assert_eq!(r.kind, "full", "{r:?}");
                        assert!(r.reason.contains("change tracking was turned off"), "{}", r.reason);
                    }
                    _ => {
                        assert_eq!(r.kind, "incremental", "{r:?}");
                        if *name == "fine" {
                            assert!(r.bytes_read >= r.changed_bytes && r.bytes_read % (64 * K) == 0);
                        } else {
                            assert_eq!(r.bytes_read, r.changed_bytes, "an incremental reads the changed areas");
                        }
                        assert!(r.changed_bytes > 0, "the writers ran");
                        grew_chunks += after.0 - before.0;
                        grew_points += after.1 - before.1;
                        changed += r.changed_bytes;
                    }
                }
                reports.push(r);
            }
        }
        stop.store(true, Ordering::Relaxed);
    });
    // Once more with the guests idle.
    for (name, _) in &vms {
        reports.push(backup_vm(&rec, name, &repo, &BackupOptions::default(), &()).unwrap());
    }
    assert_eq!(reports.len(), 15);
    for r in &reports {
        let want = rec.image(&r.vm, &r.point);
        for (d, w) in want.iter().enumerate() {
            let got = restored_hash(&repo, &r.point, d, dir.path());
            assert_eq!(&got, w, "point {} ({} {}) disk {d}", r.point, r.vm, r.kind);
        }
    }
    assert_eq!(
        repo.points().unwrap()[4].disks[0].capacity,
        40 * M,
        "web's second point"
    );
    // Restore the last point of db into a new VM and compare its disks.
    let last_db = reports.iter().rev().find(|r| r.vm == "db").unwrap();
    restore_to_vm(&repo, &last_db.point, &host, "db-restored", &()).unwrap();
    let restored = host.vm("db-restored").unwrap();
    for (d, (cap, h)) in rec.image("db", &last_db.point).into_iter().enumerate() {
        let mut img = vec![0u8; cap as usize];
        restored.read(d, 0, &mut img).unwrap();
        assert_eq!(ChunkHash::of(&img), h, "db-restored disk {d}");
        assert_eq!(
            restored.granularity(d).unwrap(),
            host.vm("db").unwrap().granularity(d).unwrap()
        );
    }
    let v = verify(&repo, &()).unwrap();
    assert!(v.ok && v.unreferenced_chunks == 0, "{v:?}");
    let ratio = (grew_chunks + grew_points) as f64 / changed as f64;
    println!(
        "repository growth over {} incrementals: chunks {grew_chunks} + indexes {grew_points} bytes \
         for {changed} changed bytes: ratio {ratio:.3}",
        reports.iter().filter(|r| r.kind == "incremental").count()
    );
    assert!(
        grew_chunks <= changed + changed / 1000,
        "chunks grow by at most the changed data"
    );
    assert!(ratio > 0.5 && ratio < 1.1, "ratio {ratio}");
}

#[test]
fn tracking_resets_between_backups_force_a_full_backup_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().join("ds");
    let host = Host::open(&ds).unwrap();
    let repo = Repository::create_or_open(&dir.path().join("repo")).unwrap();
    let vm = host.create_vm("a", &[spec(8 * M, 64 * K)]).unwrap();
    vm.write(0, 0, &[1u8; 300_000]).unwrap();
    let rec = Recorder::new(&host);
    let opts = BackupOptions::default();
    let r1 = backup_vm(&rec, "a", &repo, &opts, &()).unwrap();
    assert_eq!(r1.kind, "full");
    vm.set_cbt(false).unwrap();
    vm.write(0, 4 * M, &[2u8; 5000]).unwrap(); // untracked
    vm.set_cbt(true).unwrap();
    let r2 = backup_vm(&rec, "a", &repo, &opts, &()).unwrap();
    assert_eq!(r2.kind, "full");
    assert!(
        r2.reason.contains("rejected") && r2.reason.contains("turned off"),
        "{}",
        r2.reason
    );
    // A killed host does not reset tracking: the next backup is incremental
    // and reads only the block written before the kill.
    vm.write(0, 6 * M, &[3u8; 5000]).unwrap();
    drop(vm);
    let vm = Arc::into_inner(host.close_vm("a").unwrap()).unwrap();
    vm.crash();
    let r3 = backup_vm(&rec, "a", &repo, &opts, &()).unwrap();
    assert_eq!(
        (r3.kind.as_str(), r3.bytes_read),
        ("incremental", 64 * K),
        "{}",
        r3.reason
    );
    // Damaged tracking state does reset it: a full backup, with the reason,
    // that reads what the disk holds, not its whole capacity.
    drop(host.close_vm("a"));
    let ctk = ds.join("a/disk0/disk.ctk");
    let f = std::fs::OpenOptions::new().write(true).open(&ctk).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0x5a; 4096], 0).unwrap();
    drop(f);
    let r4 = backup_vm(&rec, "a", &repo, &opts, &()).unwrap();
    assert_eq!(r4.kind, "full");
    assert!(r4.reason.contains("damaged"), "{}", r4.reason);
    assert!(r4.bytes_read < M, "read {} bytes of an 8 MiB disk", r4.bytes_read);
    let r5 = backup_vm(&rec, "a", &repo, &opts, &()).unwrap();
    assert_eq!((r5.kind.as_str(), r5.bytes_read), ("incremental", 0));
    for r in [&r1, &r2, &r3, &r4, &r5] {
        assert_eq!(
            restored_hash(&repo, &r.point, 0, dir.path()),
            rec.image("a", &r.point)[0]
        );
    }
}

/// On the simulated host answering 5 areas per query page: a full and an incremental
/// backup of thousands of areas each restore identically (each backup's pager must go to
/// the disk's end, hundreds of pages).
#[test]
fn backups_of_thousands_of_areas_in_pages_of_five_restore_identically() {
    let dir = tempfile::tempdir().unwrap();
    let host = Host::open(&dir.path().join("ds")).unwrap();
    let repo = Repository::create_or_open(&dir.path().join("repo")).unwrap();
    let (cap, g) = (16 * M, 4 * K);
    let vm = host.create_vm("a", &[spec(cap, g)]).unwrap();
    vm.set_max_areas(5);
    let rec = Recorder::new(&host);
    let mut buf = [0u8; 512];
    let mut reports = Vec::new();
    // Every other block, then every third block: 2048 and 1366 areas that do not touch.
    for (seed, every) in [(1, 2), (2, 3)] {
        for b in (0..cap / g).step_by(every) {
            fill_pattern(seed, b * g + 7, &mut buf);
            vm.write(0, b * g + 7, &buf).unwrap();
        }
        reports.push(backup_vm(&rec, "a", &repo, &BackupOptions::default(), &()).unwrap());
    }
    let (full, inc) = (&reports[0], &reports[1]);
    assert_eq!((full.kind.as_str(), inc.kind.as_str()), ("full", "incremental"));
    assert_eq!((full.changed_areas, inc.changed_areas), (2048, 1366));
    assert_eq!((full.changed_bytes, inc.changed_bytes), (2048 * g, 1366 * g));
    for r in [full, inc] {
        assert_eq!(
            restored_hash(&repo, &r.point, 0, dir.path()),
            rec.image("a", &r.point)[0],
            "point {} ({})",
            r.point,
            r.kind
        );
    }
}

fn cbtsim(ds: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cbtsim"))
        .arg("--datastore")
        .arg(ds)
        .args(args)
        .output()
        .unwrap()
}

fn json_ok(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Runs `f` on VM `name` of the datastore, then closes it so a child process can open it.
fn with_vm<T>(ds: &Path, name: &str, f: impl FnOnce(&Vm) -> T) -> T {
    let host = Host::open(ds).unwrap();
    let vm = host.vm(name).unwrap();
    let out = f(&vm);
    drop(vm);
    drop(host.close_vm(name));
    out
}

fn live_image(ds: &Path, vm: &str, disk: usize) -> Vec<u8> {
    with_vm(ds, vm, |v| {
        let mut img = vec![0u8; v.capacity(disk).unwrap() as usize];
        v.read(disk, 0, &mut img).unwrap();
        img
    })
}

#[test]
fn cli_run_list_restore_verify_prune() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().join("ds");
    let repo = dir.path().join("repo");
    let r = repo.to_str().unwrap();
    {
        let host = Host::open(&ds).unwrap();
        let vm = host
            .create_vm("app", &[spec(64 * M, 64 * K), spec(8 * M, 64 * K)])
            .unwrap();
        let mut buf = vec![0u8; 4 * M as usize];
        fill_pattern(7, 0, &mut buf);
        vm.write(0, 0, &buf).unwrap();
        vm.write(1, M, &buf[..64 * K as usize]).unwrap();
    }
    let full = json_ok(&cbtsim(&ds, &["backup", "run", "app", "--repo", r, "--json"]));
    for f in [
        "point",
        "vm",
        "kind",
        "reason",
        "bytes_read",
        "bytes_stored",
        "changed_areas",
        "seconds",
    ] {
        assert!(full.get(f).is_some(), "{f} missing from {full}");
    }
    assert_eq!(full["kind"], "full");
    assert_eq!(full["bytes_read"], 4 * M + 64 * K);
    with_vm(&ds, "app", |vm| vm.write(0, 10 * M, &[5u8; 200 * 1024]).unwrap());
    let inc = json_ok(&cbtsim(&ds, &["backup", "run", "app", "--repo", r, "--json"]));
    assert_eq!(inc["kind"], "incremental");
    assert_eq!(
        (inc["bytes_read"].as_u64(), inc["changed_areas"].as_u64()),
        (Some(256 * K), Some(1))
    );
    let list = json_ok(&cbtsim(&ds, &["backup", "list", "--repo", r, "--json"]));
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 2);
    assert!(list[1]["disks"][1]["change_id"].as_str().unwrap().contains('/'));
    assert!(list[1]["time"].as_u64().unwrap() > 0);
    assert_eq!(list[1]["point"], inc["point"]);
    let text = cbtsim(&ds, &["backup", "list", "--repo", r]);
    assert!(String::from_utf8_lossy(&text.stdout).contains("incremental"));
    // Restore a disk to a file: full size, sparse, identical to the (idle) VM.
    let img = dir.path().join("app0.img");
    let out = cbtsim(
        &ds,
        &[
            "restore",
            "--repo",
            r,
            "--point",
            "2",
            "--disk",
            "0",
            "--to",
            img.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let live = live_image(&ds, "app", 0);
    assert!(std::fs::read(&img).unwrap() == live);
    {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(&img).unwrap();
        assert!(m.blocks() * 512 < 16 * M, "the image is sparse ({} blocks)", m.blocks());
    }
    // Restore the whole point into a new VM.
    let out = cbtsim(
        &ds,
        &[
            "restore",
            "--repo",
            r,
            "--point",
            inc["point"].as_str().unwrap(),
            "--to-vm",
            "app2",
        ],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(live_image(&ds, "app2", 0) == live);
    assert!(live_image(&ds, "app2", 1) == live_image(&ds, "app", 1));
    // Errors: one line, non-zero exit.
    let out = cbtsim(
        &ds,
        &["restore", "--repo", r, "--point", "99", "--disk", "0", "--to", "x.img"],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.starts_with("cbtsim: error:") && err.contains("no restore point"),
        "{err}"
    );
    let out = cbtsim(&ds, &["backup", "run", "nosuch", "--repo", r]);
    assert!(!out.status.success());
    // A corrupt chunk: verify names it and every point that uses it.
    assert_eq!(
        json_ok(&cbtsim(&ds, &["backup", "verify", "--repo", r, "--json"]))["ok"],
        true
    );
    let h = {
        let mut first = vec![0u8; 64 * K as usize];
        fill_pattern(7, 0, &mut first);
        ChunkHash::of(&first)
    };
    let chunk = repo.join("chunks").join(&h.to_string()[..2]).join(h.to_string());
    let mut bytes = std::fs::read(&chunk).unwrap();
    bytes[1000] ^= 1;
    std::fs::write(&chunk, bytes).unwrap();
    let out = cbtsim(&ds, &["backup", "verify", "--repo", r, "--json"]);
    assert!(!out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["corrupt_chunks"], serde_json::json!([h.to_string()]));
    assert_eq!(v["affected_points"], serde_json::json!(["00000001", "00000002"]));
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("cbtsim: error: repository"));
    // Prune keeps the newest point.
    let p = json_ok(&cbtsim(
        &ds,
        &["backup", "prune", "--repo", r, "--keep-last", "1", "--json"],
    ));
    assert_eq!(p["deleted_points"], serde_json::json!(["00000001"]));
}

#[test]
fn a_backup_killed_midway_leaves_the_repository_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().join("ds");
    let repo_dir = dir.path().join("repo");
    let r = repo_dir.to_str().unwrap();
    {
        let host = Host::open(&ds).unwrap();
        host.create_vm("big", &[spec(1024 * M, 64 * K)])
            .unwrap()
            .write(0, 0, &[1u8; 1 << 20])
            .unwrap();
    }
    let first = json_ok(&cbtsim(&ds, &["backup", "run", "big", "--repo", r, "--json"]));
    let points_before = std::fs::read_dir(repo_dir.join("points")).unwrap().count();
    let before = std::fs::read(repo_dir.join("points").join("00000001.point")).unwrap();
    with_vm(&ds, "big", |vm| {
        let mut buf = vec![0u8; 4 * M as usize];
        for i in 0..128 {
            fill_pattern(i, i * 4 * M, &mut buf);
            vm.write(0, i * 4 * M, &buf).unwrap();
        }
    });
    let chunks_before = walk_count(&repo_dir.join("chunks"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_cbtsim"))
        .arg("--datastore")
        .arg(&ds)
        .args(["backup", "run", "big", "--repo", r, "--json"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Kill it once it has stored some chunks of the 512 MiB it must copy.
    let t = Instant::now();
    while walk_count(&repo_dir.join("chunks")) < chunks_before + 100 {
        assert!(t.elapsed() < Duration::from_secs(60), "the child stored nothing");
        assert!(
            child.try_wait().unwrap().is_none(),
            "the child exited before it could be killed"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    assert!(
        !status.success(),
        "the child finished before the kill: make the disk bigger"
    );
    assert!(
        walk_count(&repo_dir.join("chunks")) < chunks_before + 8192,
        "killed midway"
    );
    // The repository is as it was: same points, each intact.
    assert_eq!(
        std::fs::read_dir(repo_dir.join("points")).unwrap().count(),
        points_before
    );
    assert_eq!(
        std::fs::read(repo_dir.join("points").join("00000001.point")).unwrap(),
        before
    );
    let repo = Repository::open(&repo_dir).unwrap();
    let v = verify(&repo, &()).unwrap();
    assert!(v.ok && v.unreferenced_chunks > 0, "orphans only: {v:?}");
    // The killed backup left its snapshot; the VM's tracking was not closed
    // cleanly, and resumes in the same session: the next backup is incremental.
    assert_eq!(with_vm(&ds, "big", |vm| vm.snapshots().len()), 1);
    let next = json_ok(&cbtsim(&ds, &["backup", "run", "big", "--repo", r, "--json"]));
    assert_eq!(next["kind"], "incremental", "{next}");
    assert_eq!(
        with_vm(&ds, "big", |vm| vm.snapshots().len()),
        0,
        "the left-over snapshot was removed"
    );
    assert_ne!(next["point"], first["point"]);
    let img = dir.path().join("big.img");
    let out = cbtsim(
        &ds,
        &[
            "restore",
            "--repo",
            r,
            "--point",
            next["point"].as_str().unwrap(),
            "--disk",
            "0",
            "--to",
            img.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        std::fs::read(&img).unwrap() == live_image(&ds, "big", 0),
        "the next backup is correct"
    );
    std::fs::remove_file(&img).unwrap();
    let p = prune(&repo, &PrunePolicy::last(1)).unwrap();
    assert_eq!(p.deleted_points, vec!["00000001".to_owned()]);
    let v = verify(&repo, &()).unwrap();
    assert!(v.ok && v.unreferenced_chunks == 0, "{v:?}");
}

fn walk_count(p: &Path) -> usize {
    let Ok(rd) = std::fs::read_dir(p) else { return 0 };
    rd.flatten()
        .map(|e| if e.path().is_dir() { walk_count(&e.path()) } else { 1 })
        .sum()
}

/// The figures of the closing note: a 64 GiB disk under the
/// `oltp-db` and `os-idle` profiles; an installed guest (the first
/// `CBTSIM_MEASURE_GIB` GiB written, default 4), `CBTSIM_MEASURE_OPS` ops of
/// the profile (default 100000), a full backup, as many ops again, an
/// incremental. Run:
/// `cargo test --release -p sim --test backup -- --ignored --nocapture measure`.
#[test]
#[ignore = "measurement: writes several GiB; run in release"]
fn measure_full_and_incremental_on_64g() {
    let env = |k: &str, d: u64| std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d);
    let (gib, ops) = (env("CBTSIM_MEASURE_GIB", 4), env("CBTSIM_MEASURE_OPS", 100_000));
    let dir = std::env::var_os("CBTSIM_MEASURE_DIR").map(PathBuf::from);
    let tmp = tempfile::tempdir_in(dir.unwrap_or_else(std::env::temp_dir)).unwrap();
    for profile in ["oltp-db", "os-idle"] {
        let root = tmp.path().join(profile);
        let host = Host::open(&root.join("ds")).unwrap();
        let repo = Repository::create_or_open(&root.join("repo")).unwrap();
        let vm = host.create_vm("m", &[spec(64 << 30, 64 * K)]).unwrap();
        let t = Instant::now();
        let mut buf = vec![0u8; 4 * M as usize];
        for i in 0..gib * 256 {
            fill_pattern(i, i * 4 * M, &mut buf);
            vm.write(0, i * 4 * M, &buf).unwrap();
        }
        println!(
            "{profile}: wrote the first {gib} GiB in {:.1} s",
            t.elapsed().as_secs_f64()
        );
        let mut guest = workloads::profile(profile, 64 << 30, 42, 0).unwrap();
        let mut run_ops = |n: u64| {
            let t = Instant::now();
            let (mut data, mut written) = (Vec::new(), 0u64);
            for _ in 0..n {
                match guest.next_op() {
                    workloads::IoOp::Write { offset, len, seed } => {
                        data.resize(len as usize, 0);
                        fill_pattern(seed, offset, &mut data);
                        vm.write(0, offset, &data).unwrap();
                        written += len;
                    }
                    workloads::IoOp::Unmap { offset, len } => vm.unmap(0, offset, len).unwrap(),
                    _ => {}
                }
            }
            vm.flush().unwrap();
            sync_all();
            println!(
                "  {n} ops ({written} bytes written) in {:.1} s",
                t.elapsed().as_secs_f64()
            );
        };
        run_ops(ops);
        let full = backup_vm(&host, "m", &repo, &BackupOptions::default(), &()).unwrap();
        run_ops(ops);
        let inc = backup_vm(&host, "m", &repo, &BackupOptions::default(), &()).unwrap();
        let mbs = |r: &BackupReport| r.bytes_read as f64 / 1e6 / r.seconds;
        println!(
            "  full: read {} stored {} in {:.2} s = {:.0} MB/s\n  \
             incremental: read {} stored {} ({} areas) in {:.2} s = {:.0} MB/s\n  \
             incremental/full: read {:.4}, stored {:.4}",
            full.bytes_read,
            full.bytes_stored,
            full.seconds,
            mbs(&full),
            inc.bytes_read,
            inc.bytes_stored,
            inc.changed_areas,
            inc.seconds,
            mbs(&inc),
            inc.bytes_read as f64 / full.bytes_read as f64,
            inc.bytes_stored as f64 / full.bytes_stored as f64,
        );
        assert_eq!(inc.kind, "incremental");
        // Everything again, every chunk already stored: reading, hashing and
        // zero checks only (the datastore's pages are hotter now).
        let again = backup_vm(
            &host,
            "m",
            &repo,
            &BackupOptions {
                full: true,
                ..Default::default()
            },
            &(),
        )
        .unwrap();
        println!(
            "  full again (all chunks deduplicated): read {} stored {} in {:.2} s = {:.0} MB/s",
            again.bytes_read,
            again.bytes_stored,
            again.seconds,
            mbs(&again)
        );
        drop(vm);
        drop(host);
        std::fs::remove_dir_all(&root).unwrap();
    }
}

/// Writes dirty pages back so a backup's own `syncfs` times only its own data.
fn sync_all() {
    let _ = Command::new("sync").status();
}

fn fails_with(out: &Output, needle: &str) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        err.starts_with("cbtsim: error:") && err.contains(needle),
        "{err:?} should mention {needle:?}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err:?}");
    err
}

/// The closing condition: after verify flagged corrupt chunks, a full backup
/// stores them again and its point restores (before: "0 B new", and a point that did not).
#[test]
fn cli_a_full_backup_heals_a_repository_with_corrupt_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().join("ds");
    let repo = dir.path().join("repo");
    let r = repo.to_str().unwrap();
    {
        let host = Host::open(&ds).unwrap();
        let vm = host.create_vm("app", &[spec(16 * M, 64 * K)]).unwrap();
        let mut buf = vec![0u8; 2 * M as usize];
        fill_pattern(3, 0, &mut buf);
        vm.write(0, 0, &buf).unwrap();
    }
    let first = json_ok(&cbtsim(&ds, &["backup", "run", "app", "--repo", r, "--json"]));
    // Damage three chunks.
    let chunks: Vec<PathBuf> = {
        let mut v = Vec::new();
        for sub in std::fs::read_dir(repo.join("chunks")).unwrap() {
            for f in std::fs::read_dir(sub.unwrap().path()).unwrap() {
                v.push(f.unwrap().path());
            }
        }
        v.sort();
        v.truncate(3);
        v
    };
    for c in &chunks {
        let mut b = std::fs::read(c).unwrap();
        b[5] ^= 0xff;
        std::fs::write(c, b).unwrap();
    }
    let out = cbtsim(&ds, &["backup", "verify", "--repo", r, "--json"]);
    fails_with(&out, "is damaged");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["corrupt_chunks"].as_array().unwrap().len(), 3);
    assert_eq!(v["moved_aside"].as_array().unwrap().len(), 3);
    assert_eq!(
        std::fs::read_dir(repo.join("bad")).unwrap().count(),
        3,
        "moved into REPO/bad/"
    );
    let text = cbtsim(&ds, &["backup", "verify", "--repo", r]);
    assert!(String::from_utf8_lossy(&text.stdout).contains("still marked bad"));
    let full = json_ok(&cbtsim(&ds, &["backup", "run", "app", "--repo", r, "--full", "--json"]));
    assert_eq!(full["healed_chunks"], 3, "{full}");
    assert!(full["bytes_stored"].as_u64().unwrap() > 0, "{full}");
    let live = live_image(&ds, "app", 0);
    for p in [&full["point"], &first["point"]] {
        let img = dir.path().join("img");
        let out = cbtsim(
            &ds,
            &[
                "restore",
                "--repo",
                r,
                "--point",
                p.as_str().unwrap(),
                "--disk",
                "0",
                "--to",
                img.to_str().unwrap(),
                "--force",
            ],
        );
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(std::fs::read(&img).unwrap() == live, "point {p}");
    }
    assert_eq!(
        json_ok(&cbtsim(&ds, &["backup", "verify", "--repo", r, "--json"]))["ok"],
        true
    );
}

#[test]
fn cli_verify_repair_reads_bad_chunks_from_the_vm() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().join("ds");
    let repo = dir.path().join("repo");
    let r = repo.to_str().unwrap();
    with_vm_new(&ds, "app", |vm| vm.write(0, 0, &[7u8; 300_000]).unwrap());
    json_ok(&cbtsim(&ds, &["backup", "run", "app", "--repo", r, "--json"]));
    let h = ChunkHash::of(&[7u8; 64 * 1024]);
    let path = repo.join("chunks").join(&h.to_string()[..2]).join(h.to_string());
    std::fs::write(&path, b"\x00garbage").unwrap();
    let v = json_ok(&cbtsim(&ds, &["backup", "verify", "--repo", r, "--repair", "--json"]));
    assert_eq!(v["ok"], false, "the verify part reports what it found");
    assert_eq!(v["repair"]["repaired"], serde_json::json!([h.to_string()]));
    assert_eq!(
        json_ok(&cbtsim(&ds, &["backup", "verify", "--repo", r, "--json"]))["ok"],
        true
    );
}

/// Creates VM `name` with one 8 MiB disk, runs `f` on it, closes it.
fn with_vm_new(ds: &Path, name: &str, f: impl FnOnce(&Vm)) {
    let host = Host::open(ds).unwrap();
    let vm = host.create_vm(name, &[spec(8 * M, 64 * K)]).unwrap();
    f(&vm);
    drop(vm);
    drop(host.close_vm(name));
}

#[test]
fn cli_restore_does_not_replace_a_file_without_force() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().join("ds");
    let repo = dir.path().join("repo");
    let r = repo.to_str().unwrap();
    with_vm_new(&ds, "app", |vm| vm.write(0, 0, &[1u8; 4096]).unwrap());
    json_ok(&cbtsim(&ds, &["backup", "run", "app", "--repo", r, "--json"]));
    let img = dir.path().join("precious.img");
    std::fs::write(&img, b"do not lose me").unwrap();
    let args = [
        "restore",
        "--repo",
        r,
        "--point",
        "1",
        "--disk",
        "0",
        "--to",
        img.to_str().unwrap(),
    ];
    fails_with(&cbtsim(&ds, &args), "already exists; pass --force");
    assert_eq!(std::fs::read(&img).unwrap(), b"do not lose me");
    let mut forced = args.to_vec();
    forced.push("--force");
    let out = cbtsim(&ds, &forced);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 8 * M);
    // --force goes with --to only (clap's usage error).
    let out = cbtsim(
        &ds,
        &["restore", "--repo", r, "--point", "1", "--to-vm", "x", "--force"],
    );
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("--to <FILE>"));
}

/// Prune through the command line with each keep policy, over points whose times the
/// library set (two a day for ten days, then a week apart): every point left restores.
#[test]
fn cli_prune_with_each_policy_keeps_restorable_points() {
    const DAY: u64 = 86_400;
    let t0 = 1_704_067_200; // Monday 2024-01-01 00:00 UTC
    let mut times: Vec<u64> = (0..10)
        .flat_map(|d| [t0 + d * DAY + 3600, t0 + d * DAY + 7200])
        .collect();
    times.extend([t0 + 20 * DAY, t0 + 27 * DAY, t0 + 34 * DAY]);
    let cases: [(&[&str], usize); 4] = [
        (&["--keep-last", "4"], 4),
        (&["--keep-daily", "3"], 3),
        (&["--keep-weekly", "3"], 3),
        // last: days 34 and 27; daily: days 20 and 9; weekly: weeks 5 to 2 are
        // covered, then week 1's newest (day 6).
        (&["--keep-last", "2", "--keep-daily", "2", "--keep-weekly", "4"], 5),
    ];
    for (args, kept) in cases {
        let dir = tempfile::tempdir().unwrap();
        let ds = dir.path().join("ds");
        let repo_dir = dir.path().join("repo");
        let r = repo_dir.to_str().unwrap();
        let mut images = HashMap::new();
        {
            let host = Host::open(&ds).unwrap();
            let vm = host.create_vm("app", &[spec(8 * M, 64 * K)]).unwrap();
            let repo = Repository::create_or_open(&repo_dir).unwrap();
            let rec = Recorder::new(&host);
            let mut buf = vec![0u8; 64 * K as usize];
            for (i, &t) in times.iter().enumerate() {
                fill_pattern(i as u64, 0, &mut buf);
                vm.write(0, (i as u64 % 100) * 64 * K, &buf).unwrap();
                let opts = BackupOptions {
                    time: Some(t),
                    ..Default::default()
                };
                let p = backup_vm(&rec, "app", &repo, &opts, &()).unwrap();
                images.insert(p.point.clone(), rec.image("app", &p.point)[0]);
            }
        }
        let mut cmd = vec!["backup", "prune", "--repo", r, "--json"];
        cmd.extend_from_slice(args);
        let p = json_ok(&cbtsim(&ds, &cmd));
        let left: Vec<String> = p["kept"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_owned())
            .collect();
        assert_eq!(left.len(), kept, "{args:?}: {p}");
        assert_eq!(
            left.last().unwrap(),
            &format!("{:08}", times.len()),
            "the newest is kept"
        );
        let list = json_ok(&cbtsim(&ds, &["backup", "list", "--repo", r, "--json"]));
        assert_eq!(list.as_array().unwrap().len(), kept);
        for id in &left {
            let img = dir.path().join(format!("{id}.img"));
            let out = cbtsim(
                &ds,
                &[
                    "restore",
                    "--repo",
                    r,
                    "--point",
                    id,
                    "--disk",
                    "0",
                    "--to",
                    img.to_str().unwrap(),
                ],
            );
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            let got = std::fs::read(&img).unwrap();
            assert_eq!(
                (got.len() as u64, ChunkHash::of(&got)),
                images[id],
                "{args:?}: point {id}"
            );
        }
        assert_eq!(
            json_ok(&cbtsim(&ds, &["backup", "verify", "--repo", r, "--json"]))["unreferenced_chunks"],
            0
        );
    }
    let d = tempfile::tempdir().unwrap();
    let r = d.path().join("repo");
    Repository::create_or_open(&r).unwrap();
    let r = r.to_str().unwrap();
    fails_with(
        &cbtsim(d.path(), &["backup", "prune", "--repo", r]),
        "give at least one of --keep-last",
    );
    fails_with(
        &cbtsim(d.path(), &["backup", "prune", "--repo", r, "--keep-daily", "0"]),
        "--keep-daily must be at least 1",
    );
}

#[test]
fn cli_list_shows_parent_base_and_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().join("ds");
    let repo = dir.path().join("repo");
    let r = repo.to_str().unwrap();
    with_vm_new(&ds, "app", |vm| vm.write(0, 0, &[1u8; 100_000]).unwrap());
    for _ in 0..3 {
        json_ok(&cbtsim(&ds, &["backup", "run", "app", "--repo", r, "--json"]));
    }
    let l = json_ok(&cbtsim(&ds, &["backup", "list", "--repo", r, "--json"]));
    assert_eq!(l[2]["parent"], "00000002");
    assert_eq!(l[2]["chain"], serde_json::json!(["00000002", "00000001"]));
    assert_eq!(
        (l[2]["disk_bytes"].as_u64(), l[2]["data_bytes"].as_u64()),
        (Some(8 * M), Some(128 * K))
    );
    assert!(l[2]["time_utc"].as_str().unwrap().ends_with('Z'));
    let text = String::from_utf8(cbtsim(&ds, &["backup", "list", "--repo", r]).stdout).unwrap();
    let header = text.lines().next().unwrap();
    for col in ["PARENT", "BASE", "SIZE", "DATA", "STORED"] {
        assert!(header.contains(col), "{header}");
    }
    let last = text.lines().nth(3).unwrap();
    assert!(
        last.contains("00000002") && last.contains("00000001") && last.contains("8.0 MiB"),
        "{last}"
    );
}

/// A restore into a new VM that fails half-way deletes that VM (before: it stayed,
/// listed like any healthy VM).
#[test]
fn cli_a_failed_restore_to_a_vm_leaves_no_vm() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().join("ds");
    let repo = dir.path().join("repo");
    let r = repo.to_str().unwrap();
    with_vm_new(&ds, "app", |vm| {
        vm.write(0, 0, &[3u8; 64 * 1024]).unwrap();
        vm.write(0, 4 * M, &[4u8; 64 * 1024]).unwrap();
    });
    json_ok(&cbtsim(&ds, &["backup", "run", "app", "--repo", r, "--json"]));
    let h = ChunkHash::of(&[4u8; 64 * 1024]);
    let path = repo.join("chunks").join(&h.to_string()[..2]).join(h.to_string());
    std::fs::write(&path, b"\x00not it").unwrap();
    let out = cbtsim(&ds, &["restore", "--repo", r, "--point", "1", "--to-vm", "copy"]);
    fails_with(&out, "the partly written VM was deleted");
    assert!(!ds.join("copy").exists());
    let list = json_ok(&cbtsim(&ds, &["vm", "list", "--json"]));
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
}
