//! `cbtsim mount`: a restore point mounted read-only through FUSE reads, with
//! `qemu-img convert`, byte for byte as `cbtsim restore` writes it. Skipped with a
//! printed reason where FUSE or qemu-img is missing; under `CI=true` that fails instead.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use sim::{DiskSpec, Host};
use tracker::Granularity;
use workloads::fill_pattern;

mod common;
use common::{ok, run_in as cbtsim};

const M: u64 = 1 << 20;

/// Why this machine cannot run the test, if it cannot.
fn missing() -> Option<String> {
    if !Path::new("/dev/fuse").exists() {
        return Some("/dev/fuse does not exist".into());
    }
    if Command::new("qemu-img").arg("--version").output().is_err() {
        return Some("qemu-img is not installed (apt-get install qemu-utils)".into());
    }
    None
}

/// The mount process; killed and the directory unmounted, whatever happens.
struct Mounted {
    child: Child,
    dir: PathBuf,
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = Command::new("umount").arg("-l").arg(&self.dir).output();
    }
}

#[test]
fn a_mounted_point_reads_as_its_restore() {
    if let Some(why) = missing() {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "CI=true: {why}");
        eprintln!("skipped: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().join("ds");
    let repo = dir.path().join("repo");
    let r = repo.to_str().unwrap();
    {
        let host = Host::open(&ds).unwrap();
        let spec = |capacity, g| DiskSpec {
            capacity,
            granularity: Granularity::new(g).unwrap(),
        };
        // An odd size and 256 KiB chunks on disk 1.
        let vm = host
            .create_vm("app", &[spec(48 * M, 64 << 10), spec(20 * M + 512, 256 << 10)])
            .unwrap();
        let mut buf = vec![0u8; 3 * M as usize];
        fill_pattern(1, 0, &mut buf);
        vm.write(0, 5 * M + 100, &buf).unwrap();
        vm.write(1, 20 * M - 1000, &buf[..1200]).unwrap();
    }
    ok(&ds, &["backup", "run", "app", "--repo", r]);
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_cbtsim"))
        .args(["mount", "--repo", r, "--point", "1", "--json"])
        .arg(&mnt)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let mut m = Mounted {
        child,
        dir: mnt.clone(),
    };
    if line.is_empty() {
        let status = m.child.wait().unwrap();
        let mut err = String::new();
        std::io::Read::read_to_string(m.child.stderr.as_mut().unwrap(), &mut err).unwrap();
        let why = format!("cbtsim mount failed ({status}): {err}");
        assert!(std::env::var("CI").as_deref() != Ok("true"), "CI=true: {why}");
        eprintln!("skipped: {why}");
        return;
    }
    let info: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(info["files"][1]["name"], "disk1.img");
    assert_eq!(info["files"][1]["size"], 20 * M + 512);
    for d in 0..2 {
        let restored = dir.path().join(format!("restored{d}.img"));
        let converted = dir.path().join(format!("converted{d}.img"));
        ok(
            &ds,
            &[
                "restore",
                "--repo",
                r,
                "--point",
                "1",
                "--disk",
                &d.to_string(),
                "--to",
                restored.to_str().unwrap(),
            ],
        );
        let out = Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw"])
            .arg(mnt.join(format!("disk{d}.img")))
            .arg(&converted)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "qemu-img: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            std::fs::read(&converted).unwrap() == std::fs::read(&restored).unwrap(),
            "disk {d}: the mounted image differs from the restore"
        );
    }
    // Read-only; prune waits for no one (it refuses while a point is mounted).
    assert!(std::fs::OpenOptions::new()
        .write(true)
        .open(mnt.join("disk0.img"))
        .is_err());
    let out = cbtsim(&ds, &["backup", "prune", "--repo", r, "--keep-last", "1"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("mounted point"));
    // SIGTERM unmounts and exits cleanly.
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(m.child.id() as i32).unwrap(),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    let status = m.child.wait().unwrap();
    assert!(status.success(), "{status}");
    assert_eq!(std::fs::read_dir(&mnt).unwrap().count(), 0, "unmounted");
    // Bad input: a missing point, a non-empty directory.
    let out = cbtsim(&ds, &["mount", "--repo", r, "--point", "9", mnt.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no restore point"));
    let out = cbtsim(
        &ds,
        &["mount", "--repo", r, "--point", "1", dir.path().to_str().unwrap()],
    );
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("is not empty"));
}
