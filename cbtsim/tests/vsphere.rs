//! The vSphere API of `cbtsim serve` against the real client: pyvmomi
//! scripts (tests/vsphere/*.py) written as the VDDK programming guide
//! describes a CBT backup, run unchanged against a real `cbtsim serve`.
//!
//! pyvmomi lives in a virtual environment that `.ci/run` makes at
//! `target/pyvmomi-venv` (or give its python as `CBTSIM_PYVMOMI_PYTHON`).
//! Without it these tests skip with a printed reason, and fail under CI=true.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use serde_json::Value;
use service::{client, Request, Response, ServeStatus, WriteData};
use vadp::DiskArea;

const MIB: u64 = 1 << 20;

/// The python of the pyvmomi virtual environment, or none (skip; a panic
/// under CI=true).
fn pyvmomi() -> Option<PathBuf> {
    let python = std::env::var_os("CBTSIM_PYVMOMI_PYTHON").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/pyvmomi-venv/bin/python"),
        PathBuf::from,
    );
    let ok = Command::new(&python)
        .args(["-c", "import pyVmomi, pyVim.task"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        return Some(python);
    }
    let why = format!(
        "pyvmomi is not installed at {} (python3 -m venv target/pyvmomi-venv && target/pyvmomi-venv/bin/pip install pyvmomi, as .ci/run does)",
        python.display()
    );
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{why}: required under CI=true");
    }
    eprintln!("skipping: {why}");
    None
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vsphere").join(name)
}

/// A `cbtsim serve` process on free loopback ports.
struct Serve {
    child: Child,
    status: ServeStatus,
    ds: PathBuf,
    https: bool,
}

impl Serve {
    fn start(ds: &Path, https: bool, extra: &[&str]) -> Serve {
        let mut c = Command::new(env!("CARGO_BIN_EXE_cbtsim"));
        c.env_remove("CBTSIM_DATASTORE")
            .env("CBTSIM_PASSWORD", "s3cret")
            .arg("--datastore")
            .arg(ds)
            .args(["serve", "--listen", "127.0.0.1:0", "--nbd", "127.0.0.1:0", "--json"])
            .args(extra);
        if !https {
            c.arg("--plain-http");
        }
        let mut child = c.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let status: ServeStatus = match serde_json::from_str(&line) {
            Ok(s) => s,
            Err(e) => {
                let _ = child.kill();
                let out = child.wait_with_output().unwrap();
                panic!("serve printed {line:?} ({e}): {}", String::from_utf8_lossy(&out.stderr))
            }
        };
        Serve {
            child,
            status,
            ds: ds.to_owned(),
            https,
        }
    }

    fn call(&self, r: Request) -> Response {
        client::call(&self.ds, &r, &()).unwrap_or_else(|e| panic!("{r:?}: {e}"))
    }

    fn port(&self) -> u16 {
        let web = self.status.web.trim_end_matches('/');
        web.rsplit(':').next().unwrap().parse().unwrap()
    }

    /// Runs a script with the connection arguments and `args`; returns
    /// its stdout, panicking with its output unless it succeeds.
    fn python(&self, python: &Path, name: &str, args: &[&str]) -> String {
        let port = self.port().to_string();
        let out = Command::new(python)
            .arg(script(name))
            .args(["--protocol", if self.https { "https" } else { "http" }])
            .args(["--port", &port, "--password", "s3cret"])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{name} {args:?} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn write(&self, vm: &str, offset: u64, byte: u8, length: u64) {
        self.call(Request::DiskWrite {
            vm: vm.into(),
            disk: 0,
            offset,
            data: WriteData::Pattern { byte, length },
        });
    }

    /// The live disk's content, read through the control socket.
    fn content(&self, vm: &str, dir: &Path, size: u64) -> Vec<u8> {
        let out = dir.join(format!("{vm}-live.raw"));
        self.call(Request::DiskRead {
            vm: vm.into(),
            disk: 0,
            offset: 0,
            length: size,
            snapshot: None,
            out: Some(out.clone()),
        });
        std::fs::read(out).unwrap()
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn create(s: &Serve, vm: &str, size: u64, granularity: u64) {
    s.call(Request::VmCreate {
        vm: vm.into(),
        disks: vec![size],
        granularity,
    });
}

/// One run of the backup tool: its report of disk 2000.
fn backup(s: &Serve, py: &Path, vm: &str, dir: &Path) -> Value {
    let nbd = s.status.nbd.clone();
    let state = dir.join("state.json");
    let out = s.python(
        py,
        "backup_flow.py",
        &[
            "--nbd",
            &nbd,
            "--vm",
            vm,
            "--state",
            state.to_str().unwrap(),
            "--image-dir",
            dir.to_str().unwrap(),
        ],
    );
    let v: Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{out:?}: {e}"));
    v["disks"][0].clone()
}

/// The restored image (the backup's raw image of disk 2000) equals the live disk.
fn assert_restores(s: &Serve, vm: &str, dir: &Path, size: u64) {
    let image = std::fs::read(dir.join("disk-2000.raw")).unwrap();
    let live = s.content(vm, dir, size);
    assert_eq!(image.len(), live.len(), "image and disk sizes differ");
    if let Some(i) = image.iter().zip(&live).position(|(a, b)| a != b) {
        panic!("the restore differs from the disk at byte {i}");
    }
}

#[test]
fn pyvmomi_backs_up_full_and_incremental_across_revert_extend_and_a_tracking_reset() {
    let Some(py) = pyvmomi() else { return };
    let dir = tempfile::tempdir().unwrap();
    // HTTPS with the datastore's certificate; two areas per answer, so the
    // tool pages.
    let s = Serve::start(&dir.path().join("ds"), true, &["--max-areas", "2"]);
    let images = dir.path().join("backup");
    std::fs::create_dir(&images).unwrap();
    let size = 16 * MIB;
    create(&s, "web01", size, 64 << 10);
    for (i, off) in [0, 3 * MIB + 17, 9 * MIB - 100, size - 4096].into_iter().enumerate() {
        s.write("web01", off, 0x10 + i as u8, 4096);
    }
    let full = backup(&s, &py, "web01", &images);
    assert_eq!(full["kind"], "full", "{full}");
    assert_eq!(full["since"], "*");
    assert_eq!(
        (full["areas"].as_u64(), full["calls"].as_u64()),
        (Some(4), Some(2)),
        "{full}"
    );
    let cid = full["change_id"].as_str().unwrap();
    assert!(
        cid.len() > 48 && cid.as_bytes()[23] == b'-' && cid.split('/').count() == 2,
        "a change ID in VMware's shape: {cid}"
    );
    assert_restores(&s, "web01", &images, size);

    s.write("web01", 5 * MIB, 0xaa, 100_000);
    s.write("web01", 0, 0xab, 1);
    let incr = backup(&s, &py, "web01", &images);
    assert_eq!(incr["kind"], "incremental", "{incr}");
    assert_eq!(incr["since"], full["change_id"]);
    assert_eq!(incr["areas"], 2, "{incr}");
    assert_eq!(incr["bytes"], 3 * (64 << 10), "{incr}");
    assert_restores(&s, "web01", &images, size);

    // A revert and a disk extend between two backups.
    let ops = |args: &[&str]| {
        s.python(&py, "ops.py", &[&["--vm", "web01"], args].concat());
    };
    s.write("web01", 2 * MIB, 0x21, 8192);
    ops(&["snapshot", "before upgrade"]);
    s.write("web01", 7 * MIB, 0x22, 65536); // undone by the revert
    s.write("web01", 2 * MIB, 0x23, 4096); // undone by the revert
    ops(&["revert", "before upgrade"]);
    ops(&["remove", "before upgrade"]);
    let grown = 24 * MIB;
    ops(&["extend", "2000", &grown.to_string()]);
    s.write("web01", size - 512, 0x24, 4096); // across the old end
    s.write("web01", 20 * MIB, 0x25, 65536);
    let after = backup(&s, &py, "web01", &images);
    assert_eq!(after["kind"], "incremental", "{after}");
    assert_eq!(after["capacity"], grown);
    assert_restores(&s, "web01", &images, grown);

    // Tracking off and on: the recorded change ID is a FileFault, and the
    // tool falls back to a full backup.
    ops(&["cbt", "off"]);
    ops(&["cbt", "on"]);
    s.write("web01", 11 * MIB, 0x26, 4096);
    let reset = backup(&s, &py, "web01", &images);
    assert_eq!(reset["kind"], "full (change ID no longer valid)", "{reset}");
    assert_restores(&s, "web01", &images, grown);
}

#[test]
fn pyvmomi_sees_typed_faults() {
    let Some(py) = pyvmomi() else { return };
    let dir = tempfile::tempdir().unwrap();
    let s = Serve::start(&dir.path().join("ds"), false, &[]);
    create(&s, "db01", 8 * MIB, 64 << 10);
    s.write("db01", MIB, 1, 4096);
    let out = s.python(&py, "faults.py", &["--vm", "db01"]);
    let last = out.lines().last().unwrap_or_default();
    assert!(last.ends_with(" passed, 0 failed") && !last.starts_with("0 "), "{out}");
    assert!(!out.contains("FAIL"), "{out}");
}

#[test]
fn pyvmomi_paging_a_single_call_sees_only_the_first_window() {
    let Some(py) = pyvmomi() else { return };
    let dir = tempfile::tempdir().unwrap();
    let s = Serve::start(&dir.path().join("ds"), false, &[]);
    // 2500 separate changed areas at 4 KiB granularity: more than the 2000
    // that one answer holds (the default --max-areas, as ESXi).
    let n = 2500u64;
    let size = n * 8192 + 4 * MIB;
    create(&s, "big01", size, 4096);
    for i in 0..n {
        s.write("big01", i * 8192, 1 + (i % 200) as u8, 512);
    }
    let out = s.python(&py, "paging.py", &["--vm", "big01"]);
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["single"]["areas"], 2000, "{}", v["single"]);
    let single_end = v["single"]["end"].as_u64().unwrap();
    assert!(single_end < size, "the first window ends before the disk does");
    assert_eq!(single_end, 1999 * 8192 + 4096, "the window ends at its last area");
    assert_eq!(v["calls"], 2);
    let paged: Vec<DiskArea> = v["paged"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| DiskArea {
            start: a[0].as_u64().unwrap(),
            length: a[1].as_u64().unwrap(),
        })
        .collect();
    let expected: Vec<DiskArea> = (0..n)
        .map(|i| DiskArea {
            start: i * 8192,
            length: 4096,
        })
        .collect();
    assert_eq!(paged, expected, "the paging loop finds every area");
}

#[test]
fn pyvmomi_backs_up_while_the_guest_writes_and_the_next_incremental_is_exact() {
    let Some(py) = pyvmomi() else { return };
    let dir = tempfile::tempdir().unwrap();
    let s = Serve::start(&dir.path().join("ds"), false, &[]);
    let images = dir.path().join("backup");
    std::fs::create_dir(&images).unwrap();
    let size = 32 * MIB;
    create(&s, "app01", size, 64 << 10);
    let Response::GuestStarted { id, .. } = s.call(Request::GuestRun(service::GuestRun {
        vm: "app01".into(),
        profile: "oltp-db".into(),
        disk: 0,
        threads: 2,
        seed: 11,
        ops: None,
        seconds: None,
        verify: false,
        snapshot_every: None,
        detach: true,
    })) else {
        panic!("no guest started")
    };
    // Two backups while the guest writes (requests of both kinds served at once).
    let full = backup(&s, &py, "app01", &images);
    assert_eq!(full["kind"], "full", "{full}");
    let during = backup(&s, &py, "app01", &images);
    assert_eq!(during["kind"], "incremental", "{during}");
    let Response::Guest(report) = s.call(Request::GuestStop { id }) else {
        panic!("no guest report")
    };
    assert!(report.writes > 0, "the guest wrote while the backups ran");
    // The image holds the disk as of the last snapshot; the incremental
    // since it must bring it to the disk as the guest left it.
    let last = backup(&s, &py, "app01", &images);
    assert_eq!(last["kind"], "incremental", "{last}");
    assert_restores(&s, "app01", &images, size);
}
