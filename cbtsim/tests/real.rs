//! Real guests on an attached disk: `cbtsim disk attach` as /dev/loopN of a running
//! `cbtsim serve`, ext4 made and written on it while backups run, the points restored,
//! mounted and checked with e2fsck; `cbtsim guest run --real` with ext4, xfs and
//! PostgreSQL. They need root, FUSE, loop devices and the tools (e2fsprogs, xfsprogs,
//! fio, postgresql): where one is missing they skip with the reason, and fail under
//! CI=true. Whatever happens, a guard unmounts what the test mounted below its
//! directory and releases the loop devices over its files.

use std::io::{BufRead, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use service::real::{self, FsKind, RealKind};

/// Whether this machine can run real guests of `kind` on `fs`: if not, skip (print why),
/// or panic under CI=true.
fn can_run(kind: RealKind, fs: FsKind) -> bool {
    let missing = real::missing(kind, fs, real::DEFAULT_PG_USER);
    if missing.is_empty() {
        return true;
    }
    let why = missing.join("; ");
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "CI=true: the real-guest tests must run: {why}"
    );
    eprintln!("skipping: {why}");
    false
}

/// Unmounts everything mounted below a directory and releases the loop devices over its
/// files, when dropped (declared before the serve, so it runs after the serve stopped).
struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut mounts: Vec<String> = info
            .lines()
            .filter_map(|l| l.split(' ').nth(4).map(|m| m.replace("\\040", " ")))
            .filter(|m| Path::new(m).starts_with(&self.0))
            .collect();
        // Deepest first.
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in mounts {
            eprintln!("cleanup: unmounting {m}");
            let _ = Command::new("umount").arg("-l").arg(&m).status();
        }
        for e in std::fs::read_dir("/sys/block").into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let backing = std::fs::read_to_string(e.path().join("loop/backing_file")).unwrap_or_default();
            if name.starts_with("loop") && Path::new(backing.trim()).starts_with(&self.0) {
                eprintln!("cleanup: releasing /dev/{name}");
                let _ = Command::new("losetup").arg("-d").arg(format!("/dev/{name}")).status();
            }
        }
    }
}

/// A `cbtsim serve` on a datastore; stopped with SIGTERM when dropped (so that it
/// detaches its disks), killed if it does not stop.
struct Serve {
    child: Child,
}

impl Serve {
    fn start(ds: &Path) -> Serve {
        let mut child = Command::new(env!("CARGO_BIN_EXE_cbtsim"))
            .env_remove("CBTSIM_DATASTORE")
            .env("CBTSIM_PASSWORD", "secret")
            .arg("--datastore")
            .arg(ds)
            .args([
                "serve",
                "--plain-http",
                "--listen",
                "127.0.0.1:0",
                "--nbd",
                "127.0.0.1:0",
                "--json",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(line.starts_with('{'), "serve printed {line:?}");
        Serve { child }
    }

    /// SIGTERM and wait; its exit status and stderr.
    fn stop(mut self) -> (std::process::ExitStatus, String) {
        self.terminate()
    }

    fn terminate(&mut self) -> (std::process::ExitStatus, String) {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).unwrap();
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                let mut err = String::new();
                if let Some(mut e) = self.child.stderr.take() {
                    std::io::Read::read_to_string(&mut e, &mut err).unwrap();
                }
                return (s, err);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let s = self.child.wait().unwrap();
                return (s, "killed: did not stop within 60 s of SIGTERM".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.terminate();
        }
    }
}

/// Runs `cbtsim --datastore DS ARGS`: exit code, stdout, stderr.
fn cli(ds: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_cbtsim"))
        .env_remove("CBTSIM_DATASTORE")
        .arg("--datastore")
        .arg(ds)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

fn cli_ok(ds: &Path, args: &[&str]) -> String {
    let (code, out, err) = cli(ds, args);
    assert_eq!(code, Some(0), "cbtsim {args:?} failed: {err}");
    out
}

fn cli_json(ds: &Path, args: &[&str]) -> Value {
    let out = cli_ok(ds, args);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("cbtsim {args:?}: not JSON ({e}): {out}"))
}

fn cli_fails(ds: &Path, args: &[&str], needle: &str) {
    let (code, out, err) = cli(ds, args);
    assert_ne!(code, Some(0), "cbtsim {args:?} succeeded: {out}");
    assert!(err.contains(needle), "cbtsim {args:?}: {err:?} does not say {needle:?}");
}

/// Runs a command; its stdout, or a panic with its output.
fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn mount(device: &Path, dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    run(Command::new("mount").arg(device).arg(dir));
}

fn umount(dir: &Path) {
    run(Command::new("umount").arg(dir));
}

/// The loop devices whose backing file lies below `dir`.
fn loops_below(dir: &Path) -> Vec<String> {
    std::fs::read_dir("/sys/block")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let b = std::fs::read_to_string(e.path().join("loop/backing_file")).ok()?;
            Path::new(b.trim())
                .starts_with(dir)
                .then(|| e.file_name().to_string_lossy().into_owned())
        })
        .collect()
}

fn mounted(dir: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    info.lines()
        .any(|l| l.split(' ').nth(4).is_some_and(|m| Path::new(m) == dir))
}

/// Writes `data` to `path` and fsyncs it and its directory.
fn write_durably(path: &Path, data: &[u8]) {
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
    std::fs::File::open(path.parent().unwrap()).unwrap().sync_all().unwrap();
}

/// Restores disk 0 of `point` to `image`, mounts it (the journal is replayed, as after a
/// power cut), returns the content of `files` (None where missing), unmounts it and checks
/// it with `e2fsck -fn`.
fn restore_and_check(ds: &Path, repo: &Path, point: &str, image: &Path, files: &[&str]) -> Vec<Option<Vec<u8>>> {
    cli_ok(
        ds,
        &[
            "restore",
            "--repo",
            repo.to_str().unwrap(),
            "--point",
            point,
            "--disk",
            "0",
            "--to",
            image.to_str().unwrap(),
            "--force",
        ],
    );
    let dev = run(Command::new("losetup").args(["--find", "--show"]).arg(image));
    let dev = PathBuf::from(dev.trim());
    let dir = image.with_extension("mnt");
    mount(&dev, &dir);
    let got = files.iter().map(|f| std::fs::read(dir.join(f)).ok()).collect();
    umount(&dir);
    run(Command::new("losetup").arg("-d").arg(&dev));
    let out = Command::new("e2fsck").arg("-fn").arg(image).output().unwrap();
    assert!(
        out.status.success(),
        "e2fsck -fn of point {point} ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    got
}

#[test]
fn ext4_on_an_attached_disk_is_backed_up_while_mounted_and_restores_clean() {
    if !can_run(RealKind::Ext4, FsKind::Ext4) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let _cleanup = Cleanup(dir.path().to_owned());
    let ds = dir.path().join("ds");
    let repo = dir.path().join("repo");
    cli_ok(&ds, &["vm", "create", "g", "--disk", "384M", "--granularity", "4K"]);
    cli_fails(&ds, &["disk", "attach", "g"], "start `cbtsim serve`");
    assert_eq!(cli_ok(&ds, &["disk", "attachments"]).trim(), "no attached disks");

    let serve = Serve::start(&ds);
    let a = cli_json(&ds, &["disk", "attach", "g", "--json"]);
    let dev = PathBuf::from(a["device"].as_str().unwrap());
    assert!(dev.to_str().unwrap().starts_with("/dev/loop"), "{a}");
    assert_eq!(a["size"], 384u64 << 20);
    cli_fails(&ds, &["disk", "attach", "g"], "already attached");
    cli_fails(&ds, &["disk", "attach", "g", "--disk", "1"], "has no disk 1");
    let list = cli_json(&ds, &["disk", "attachments", "--json"]);
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list[0]["device"], a["device"]);
    cli_fails(&ds, &["vm", "power", "g", "off"], "attached");
    cli_fails(&ds, &["disk", "extend", "g", "0", "512M"], "attached");
    cli_fails(
        &ds,
        &["guest", "run", "g", "--profile", "os-idle", "--ops", "10"],
        "attached",
    );

    run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&dev));
    let mnt = dir.path().join("mnt");
    mount(&dev, &mnt);
    let one: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    write_durably(&mnt.join("one"), &one);
    let p1 = cli_json(&ds, &["backup", "run", "g", "--repo", repo.to_str().unwrap(), "--json"]);
    cli_fails(&ds, &["disk", "detach", "g"], "mounted");
    let two = vec![0x5au8; 1 << 20];
    write_durably(&mnt.join("two"), &two);
    std::fs::remove_file(mnt.join("one")).unwrap();
    std::fs::File::open(&mnt).unwrap().sync_all().unwrap();
    let p2 = cli_json(&ds, &["backup", "run", "g", "--repo", repo.to_str().unwrap(), "--json"]);
    assert_eq!(p2["kind"], "incremental", "{p2}");
    assert!(p2["changed_bytes"].as_u64().unwrap() >= 1 << 20, "{p2}");
    umount(&mnt);
    let d = cli_json(&ds, &["disk", "detach", "g", "--json"]);
    assert_eq!(d["device"], a["device"]);
    assert!(loops_below(dir.path()).is_empty(), "{:?}", loops_below(dir.path()));
    cli_fails(&ds, &["disk", "detach", "g"], "not attached");

    let img = dir.path().join("p1.img");
    let got = restore_and_check(&ds, &repo, p1["point"].as_str().unwrap(), &img, &["one", "two"]);
    assert_eq!(got, [Some(one), None]);
    let got = restore_and_check(&ds, &repo, p2["point"].as_str().unwrap(), &img, &["one", "two"]);
    assert_eq!(got, [None, Some(two)]);

    // A serve that stops while a file system is mounted on an attached disk unmounts it
    // and detaches.
    let a = cli_json(&ds, &["disk", "attach", "g", "--json"]);
    let dev = PathBuf::from(a["device"].as_str().unwrap());
    mount(&dev, &mnt);
    write_durably(&mnt.join("three"), b"three");
    let (status, err) = serve.stop();
    assert!(status.success(), "serve: {err}");
    assert!(!mounted(&mnt), "still mounted after the serve stopped: {err}");
    assert!(loops_below(dir.path()).is_empty(), "{:?}", loops_below(dir.path()));
}

/// Runs `guest run VM --real ARGS --json` on a fresh VM of a served datastore; its report.
fn real_run(vm_disk: &str, args: &[&str]) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let _cleanup = Cleanup(dir.path().to_owned());
    let ds = dir.path().join("ds");
    let repo = dir.path().join("repo");
    let work = dir.path().join("work");
    cli_ok(&ds, &["vm", "create", "g", "--disk", vm_disk, "--granularity", "4K"]);
    let _serve = Serve::start(&ds);
    let mut all = vec![
        "guest",
        "run",
        "g",
        "--repo",
        repo.to_str().unwrap(),
        "--work-dir",
        work.to_str().unwrap(),
        "--json",
    ];
    all.extend_from_slice(args);
    let (code, out, err) = cli(&ds, &all);
    eprintln!("{err}");
    let report: Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("guest run --real: not JSON ({e}): {out}\n{err}"));
    assert_eq!(code, Some(0), "{report:#}");
    assert_eq!(report["ok"], true, "{:#}", report["problems"]);
    assert!(loops_below(dir.path()).is_empty(), "{:?}", loops_below(dir.path()));
    assert!(!mounted(&work.join("mnt")));
    assert_eq!(cli_json(&ds, &["disk", "attachments", "--json"]), serde_json::json!([]));
    report
}

/// Checks what every real run reports: points at the interval, each restored clean, and
/// the later ones incremental with what truly differs inside what was reported.
fn check_points(r: &Value, at_least: usize) {
    let points = r["points"].as_array().unwrap();
    assert!(points.len() >= at_least, "{} points: {r:#}", points.len());
    assert_eq!(points[0]["kind"], "full");
    for p in &points[1..] {
        assert_eq!(p["kind"], "incremental", "{p}");
        assert!(p["fsck_ok"].as_bool().unwrap(), "{p}");
        let (d4, changed) = (
            p["differing_4k_bytes"].as_u64().unwrap(),
            p["changed_bytes"].as_u64().unwrap(),
        );
        assert!(d4 <= changed, "{p}");
        assert!(
            p["differing_64k_bytes"].as_u64().unwrap() <= p["bytes_read"].as_u64().unwrap(),
            "{p}"
        );
    }
    let f = &r["figures"];
    assert!(f["incrementals"].as_u64().unwrap() >= (at_least - 1) as u64, "{f}");
    assert!(f["over_report"].as_f64().unwrap() >= 1.0, "{f}");
    assert!(
        f["over_report_64k"].as_f64().unwrap() >= f["over_report"].as_f64().unwrap(),
        "{f}"
    );
}

#[test]
fn guest_run_real_ext4_and_xfs_check_every_point() {
    for (kind, fs) in [("ext4", FsKind::Ext4), ("xfs", FsKind::Xfs)] {
        let k = if fs == FsKind::Ext4 {
            RealKind::Ext4
        } else {
            RealKind::Xfs
        };
        if !can_run(k, fs) {
            continue;
        }
        let r = real_run(
            "512M",
            &[
                "--real",
                kind,
                "--seconds",
                "6",
                "--backup-every",
                "2",
                "--threads",
                "2",
            ],
        );
        check_points(&r, 3);
        let points = r["points"].as_array().unwrap();
        let last = points.last().unwrap();
        assert!(last["files_checked"].as_u64().unwrap() > 0, "{last}");
        assert_eq!(last["files_bad"], 0);
        assert!(r["work"]["files_written"].as_u64().unwrap() > 0);
        assert!(r["work"]["fio_writes"].as_u64().unwrap() > 0);
    }
}

#[test]
fn guest_run_real_postgres_recovers_every_acknowledged_transaction() {
    if !can_run(RealKind::Postgres, FsKind::Ext4) {
        return;
    }
    let r = real_run(
        "1G",
        &[
            "--real",
            "postgres",
            "--seconds",
            "20",
            "--backup-every",
            "5",
            "--threads",
            "2",
        ],
    );
    check_points(&r, 4);
    let pgbench = &r["work"]["pgbench"];
    assert!(pgbench["transactions"].as_u64().unwrap() > 0, "{pgbench}");
    assert_eq!(pgbench["failed"], 0);
    let points = r["points"].as_array().unwrap();
    for p in points {
        let db = &p["database"];
        assert_eq!(db["amcheck_ok"], true, "{p}");
        assert_eq!(db["balances_agree"], true, "{p}");
        assert_eq!(db["clients_out_of_bounds"], 0, "{p}");
        assert!(
            db["ledger_rows"].as_u64().unwrap() >= db["acked_before_backup"].as_u64().unwrap(),
            "{p}"
        );
    }
    // The last point was taken while pgbench committed: it holds transactions, and every
    // one acknowledged before its backup began.
    let last = &points.last().unwrap()["database"];
    assert!(last["acked_before_backup"].as_u64().unwrap() > 0, "{last}");
    let f = &r["figures"];
    assert!(f["transactions"].as_u64().unwrap() > 0, "{f}");
    assert!(f["changed_bytes_per_transaction"].as_f64().unwrap() > 0.0, "{f}");
}
