//! `cbtsim serve` as a real process, with real clients: libnbd's nbdinfo
//! and nbdcopy, QEMU's qemu-img and qemu-io, fio's nbd engine, and the
//! control socket's client. Each test that needs an outside tool skips with
//! a printed reason when it is missing, and fails under CI=true.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use service::{client, ErrorKind, GuestRun, Request, Response, ServeStatus, WriteData};
use vadp::DiskArea;

const MIB: u64 = 1 << 20;
const GRAN: u64 = 64 << 10;
const SIZE: u64 = 16 * MIB;

/// Whether outside tool `name` is on PATH; missing: skip (print why), or
/// panic under CI=true.
fn tool(name: &str) -> bool {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
        .unwrap_or(false);
    if !found {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{name} is required under CI=true (apt-get install qemu-utils libnbd-bin fio)");
        }
        eprintln!("skipping: {name} is not installed (apt-get install qemu-utils libnbd-bin fio)");
    }
    found
}

/// Runs a command; panics with its output unless it succeeds.
fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs a command that must fail; returns its stderr.
fn run_fails(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(!out.status.success(), "{cmd:?} succeeded but should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A `cbtsim serve` process on a datastore, on free loopback ports.
struct Serve {
    child: Child,
    status: ServeStatus,
    ds: PathBuf,
}

fn serve_cmd(ds: &Path) -> Command {
    serve_on(ds, "127.0.0.1:0")
}

fn serve_on(ds: &Path, nbd: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_cbtsim"));
    c.env_remove("CBTSIM_DATASTORE")
        .env_remove("CBTSIM_PASSWORD")
        .arg("--datastore")
        .arg(ds)
        .args([
            "serve",
            "--plain-http",
            "--listen",
            "127.0.0.1:0",
            "--nbd",
            nbd,
            "--json",
        ]);
    c
}

impl Serve {
    fn start(ds: &Path) -> Serve {
        Self::start_with(ds, &[])
    }

    fn start_with(ds: &Path, extra: &[&str]) -> Serve {
        let mut child = serve_cmd(ds)
            .args(extra)
            .env("CBTSIM_PASSWORD", "secret")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
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
        }
    }

    fn call(&self, r: Request) -> Response {
        client::call(&self.ds, &r, &()).unwrap_or_else(|e| panic!("{r:?}: {e}"))
    }

    fn uri(&self, export: &str) -> String {
        self.status.nbd_uri(export)
    }

    fn port(&self) -> u16 {
        self.status.nbd.rsplit(':').next().unwrap().parse().unwrap()
    }

    /// SIGTERM; returns the exit status and stderr.
    fn stop(mut self) -> (std::process::ExitStatus, String) {
        rustix_kill(self.child.id());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                let mut err = String::new();
                std::io::Read::read_to_string(&mut self.child.stderr.take().unwrap(), &mut err).unwrap();
                return (s, err);
            }
            assert!(Instant::now() < deadline, "serve did not stop within 30 s of SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Sends SIGTERM (through kill(1): the test needs no unsafe code).
fn rustix_kill(pid: u32) {
    let ok = Command::new("kill").args(["-TERM", &pid.to_string()]).status().unwrap();
    assert!(ok.success());
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn create(s: &Serve, vm: &str) {
    s.call(Request::VmCreate {
        vm: vm.into(),
        disks: vec![SIZE],
        granularity: GRAN,
    });
}

fn write(s: &Serve, offset: u64, byte: u8, length: u64) {
    s.call(Request::DiskWrite {
        vm: "web01".into(),
        disk: 0,
        offset,
        data: WriteData::Pattern { byte, length },
    });
}

fn snapshot(s: &Serve, name: &str) -> String {
    match s.call(Request::SnapshotCreate {
        vm: "web01".into(),
        name: name.into(),
    }) {
        Response::SnapshotCreated(i) => i.disks[0].change_id.clone().unwrap(),
        r => panic!("{r:?}"),
    }
}

fn query(s: &Serve, snap: &str, since: &str) -> Vec<DiskArea> {
    match s.call(Request::Query {
        vm: "web01".into(),
        snapshot: snap.into(),
        disk: 0,
        since: since.into(),
    }) {
        Response::ChangedAreas(c) => c.areas,
        r => panic!("{r:?}"),
    }
}

/// The content of the disk at `snap` (or live), read through the socket.
fn content(s: &Serve, dir: &Path, snap: Option<&str>) -> Vec<u8> {
    let out = dir.join(format!("content-{}.raw", snap.unwrap_or("live")));
    s.call(Request::DiskRead {
        vm: "web01".into(),
        disk: 0,
        offset: 0,
        length: SIZE,
        snapshot: snap.map(str::to_owned),
        out: Some(out.clone()),
    });
    std::fs::read(out).unwrap()
}

/// `nbdinfo --map --json` as (offset, length, type) entries.
fn nbdinfo_map(uri: &str, context: Option<&str>) -> Vec<(u64, u64, u64)> {
    let map = context.map_or_else(|| "--map".to_owned(), |c| format!("--map={c}"));
    let out = run(Command::new("nbdinfo").args(["--json", &map, uri]));
    let v: Value = serde_json::from_str(&out).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["offset"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["type"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Entries with `pred(type)` as areas, merged.
fn areas(entries: &[(u64, u64, u64)], pred: impl Fn(u64) -> bool) -> Vec<DiskArea> {
    let mut out: Vec<DiskArea> = Vec::new();
    for &(start, length, _) in entries.iter().filter(|e| pred(e.2)) {
        match out.last_mut() {
            Some(l) if l.end() == start => l.length += length,
            _ => out.push(DiskArea { start, length }),
        }
    }
    out
}

/// `qemu-img map --output=json` as (start, length, data) entries.
fn qemu_img_map(args: &[&str]) -> Vec<(u64, u64, u64)> {
    let out = run(Command::new("qemu-img").args(["map", "--output=json"]).args(args));
    let v: Value = serde_json::from_str(&out).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["start"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                u64::from(e["data"].as_bool().unwrap()),
            )
        })
        .collect()
}

/// Image options of export `export` (QEMU's raw driver over NBD), with a
/// dirty bitmap for `x-dirty-bitmap` or a byte window.
fn image_opts(port: u16, export: &str, bitmap: Option<&str>) -> String {
    let mut s = format!("driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},export={export}");
    if let Some(b) = bitmap {
        s.push_str(&format!(",x-dirty-bitmap=qemu:dirty-bitmap:{b}"));
    }
    s
}

/// A VM `web01` with data, two snapshots and writes between them:
/// returns (cid1, cid2).
fn populate(s: &Serve) -> (String, String) {
    create(s, "web01");
    write(s, 0, 0x11, 3 * MIB);
    write(s, 8 * MIB, 0x22, MIB);
    let c1 = snapshot(s, "s1");
    write(s, MIB + 7, 0x33, 100_000);
    write(s, 12 * MIB, 0x44, 4096);
    s.call(Request::DiskUnmap {
        vm: "web01".into(),
        disk: 0,
        offset: 8 * MIB,
        length: GRAN,
    });
    let c2 = snapshot(s, "s2");
    (c1, c2)
}

#[test]
fn nbdinfo_lists_and_maps_what_the_query_answers() {
    if !tool("nbdinfo") || !tool("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let s = Serve::start(dir.path());
    let (c1, c2) = populate(&s);
    let out = run(Command::new("nbdinfo").args(["--json", "--list", &s.uri("")]));
    let v: Value = serde_json::from_str(&out).unwrap();
    let exports = v["exports"].as_array().unwrap();
    let names: Vec<&str> = exports.iter().map(|e| e["export-name"].as_str().unwrap()).collect();
    assert_eq!(names, ["web01/0", "web01/0@s1", "web01/0@s2"]);
    assert_eq!(exports[0]["is_read_only"], false);
    assert_eq!(exports[2]["is_read_only"], true);
    assert_eq!(exports[2]["export-size"], SIZE);
    let contexts: Vec<&str> = exports[2]["contexts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert_eq!(
        contexts,
        [
            "base:allocation".to_owned(),
            format!("qemu:dirty-bitmap:{c1}"),
            format!("qemu:dirty-bitmap:{c2}")
        ]
    );
    let uri = s.uri("web01/0@s2");
    // base:allocation: data exactly where `*` answers.
    let alloc = nbdinfo_map(&uri, None);
    assert_eq!(areas(&alloc, |t| t == 0), query(&s, "s2", "*"));
    assert_eq!(areas(&alloc, |t| t == 3).len(), 3, "holes read as zeroes: {alloc:?}");
    // The dirty bitmap: exactly the query since c1, block for block.
    let dirty = nbdinfo_map(&uri, Some(&format!("qemu:dirty-bitmap:{c1}")));
    let want = query(&s, "s2", &c1);
    assert_eq!(areas(&dirty, |t| t & 1 == 1), want);
    assert_eq!(want.len(), 3);
    assert_eq!(dirty.iter().map(|e| e.1).sum::<u64>(), SIZE);
    // qemu-img with x-dirty-bitmap: dirty shows as "data": false.
    let m = qemu_img_map(&["--image-opts", &image_opts(s.port(), "web01/0@s2", Some(&c1))]);
    assert_eq!(areas(&m, |d| d == 0), want);
    // Unknown, malformed and newer change IDs are not offered: the clients fail cleanly.
    let c1_of_s1 = s.uri("web01/0@s1");
    for bad in [
        "qemu:dirty-bitmap:00000000-0000-0000-0000-000000000000/1".to_owned(),
        "qemu:dirty-bitmap:nope".to_owned(),
    ] {
        run_fails(Command::new("nbdinfo").args([&format!("--map={bad}"), &uri]));
    }
    run_fails(Command::new("nbdinfo").args([&format!("--map=qemu:dirty-bitmap:{c2}"), &c1_of_s1]));
    run_fails(Command::new("nbdinfo").args(["--map", &s.uri("web01/0@nope")]));
    // The live disk: everything is data (no allocation query for it).
    assert_eq!(nbdinfo_map(&s.uri("web01/0"), None), [(0, SIZE, 0)]);
}

#[test]
fn qemu_img_and_nbdcopy_copy_a_snapshot_and_writes_land_as_guest_writes() {
    if !tool("qemu-img") || !tool("nbdcopy") || !tool("qemu-io") || !tool("fio") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let s = Serve::start(dir.path());
    let (_, c2) = populate(&s);
    let s1 = content(&s, dir.path(), Some("s1"));
    let copy = dir.path().join("copy.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", &s.uri("web01/0@s1")])
        .arg(&copy));
    assert!(
        std::fs::read(&copy).unwrap() == s1,
        "qemu-img convert copies snapshot s1"
    );
    let copy2 = dir.path().join("copy2.raw");
    run(Command::new("nbdcopy").arg(s.uri("web01/0@s2")).arg(&copy2));
    assert!(std::fs::read(&copy2).unwrap() == content(&s, dir.path(), Some("s2")));
    // Writes through the live export are guest writes: they show in the
    // next query, granule for granule.
    let live = s.uri("web01/0");
    run(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x5a 5243392 70000", &live]));
    run(Command::new("qemu-io").args(["-f", "raw", "-c", "write -z 10485760 131072", "-c", "flush", &live]));
    run(Command::new("qemu-io").args(["-f", "raw", "-c", "discard 14680064 65536", &live]));
    let fio = Command::new("fio").arg("--enghelp=nbd").output().unwrap();
    assert!(
        fio.status.success() || std::env::var("CI").as_deref() != Ok("true"),
        "fio lacks the nbd engine"
    );
    let fio_ok = fio.status.success();
    if fio_ok {
        run(Command::new("fio").current_dir(dir.path()).args([
            "--name=w",
            "--ioengine=nbd",
            &format!("--uri={live}"),
            "--rw=write",
            "--bs=64k",
            "--size=256k",
            "--offset=3m",
            "--iodepth=4",
            "--thread",
            "--buffer_pattern=0xab",
            "--output-format=terse",
        ]));
    }
    snapshot(&s, "s3");
    let mut want = vec![
        DiskArea {
            start: 5 * MIB,
            length: 2 * GRAN,
        },
        DiskArea {
            start: 10 * MIB,
            length: 2 * GRAN,
        },
        DiskArea {
            start: 14 * MIB,
            length: GRAN,
        },
    ];
    if fio_ok {
        want.insert(
            0,
            DiskArea {
                start: 3 * MIB,
                length: 256 << 10,
            },
        );
    }
    assert_eq!(query(&s, "s3", &c2), want);
    let s3 = content(&s, dir.path(), Some("s3"));
    assert!(s3[5243392..5243392 + 70000].iter().all(|&b| b == 0x5a));
    assert!(s3[10 * MIB as usize..(10 * MIB + 2 * GRAN) as usize]
        .iter()
        .all(|&b| b == 0));
    if fio_ok {
        assert!(s3[3 * MIB as usize..(3 * MIB + (256 << 10)) as usize]
            .iter()
            .all(|&b| b == 0xab));
    }
    // A snapshot export refuses writes.
    let err = run_fails(Command::new("qemu-io").args(["-f", "raw", "-c", "write 0 4k", &s.uri("web01/0@s3")]));
    assert!(err.contains("ermission denied") || err.contains("read-only"), "{err}");
}

#[test]
fn an_incremental_backup_with_nbd_tools_restores_byte_identical() {
    if !tool("nbdinfo") || !tool("nbdcopy") || !tool("qemu-img") {
        return;
    }
    // The virtnbdbackup flow: a full copy of snapshot 1, then snapshot 2,
    // the extents dirty since snapshot 1's change ID, copied into the image.
    let dir = tempfile::tempdir().unwrap();
    let s = Serve::start(dir.path());
    create(&s, "web01");
    write(&s, 0, 0x11, 5 * MIB);
    let c1 = snapshot(&s, "s1");
    let img = dir.path().join("backup.raw");
    run(Command::new("nbdcopy").arg(s.uri("web01/0@s1")).arg(&img));
    write(&s, 2 * MIB + 3, 0x22, 300_000);
    write(&s, 9 * MIB, 0x33, 2 * MIB);
    s.call(Request::DiskUnmap {
        vm: "web01".into(),
        disk: 0,
        offset: 4 * MIB,
        length: MIB,
    });
    snapshot(&s, "s2");
    let uri = s.uri("web01/0@s2");
    let dirty = areas(&nbdinfo_map(&uri, Some(&format!("qemu:dirty-bitmap:{c1}"))), |t| {
        t & 1 == 1
    });
    assert_eq!(dirty.len(), 3);
    for a in &dirty {
        // QEMU's raw driver takes a byte window of the export and of the image.
        let src = format!(
            "driver=raw,offset={},size={},file.driver=nbd,file.server.type=inet,file.server.host=127.0.0.1,file.server.port={},file.export=web01/0@s2",
            a.start,
            a.length,
            s.port()
        );
        let dst = format!(
            "driver=raw,offset={},size={},file.driver=file,file.filename={}",
            a.start,
            a.length,
            img.display()
        );
        run(Command::new("qemu-img").args(["convert", "-n", "--image-opts", &src, "--target-image-opts", &dst]));
    }
    let restored = std::fs::read(&img).unwrap();
    let s2 = content(&s, dir.path(), Some("s2"));
    assert!(restored != content(&s, dir.path(), Some("s1")));
    assert!(restored == s2, "the incremental image is snapshot 2, byte for byte");
}

#[test]
fn a_second_terminal_snapshots_and_queries_while_the_guest_writes() {
    let dir = tempfile::tempdir().unwrap();
    let s = Serve::start(dir.path());
    s.call(Request::VmCreate {
        vm: "web01".into(),
        disks: vec![64 * MIB],
        granularity: GRAN,
    });
    let c0 = snapshot(&s, "s0");
    let Response::GuestStarted { id, .. } = s.call(Request::GuestRun(GuestRun {
        vm: "web01".into(),
        profile: "oltp-db".into(),
        disk: 0,
        threads: 2,
        seed: 3,
        ops: None,
        seconds: None,
        verify: false,
        snapshot_every: None,
        detach: true,
    })) else {
        panic!()
    };
    std::thread::sleep(Duration::from_millis(300));
    // Another client, as from a second terminal.
    let ds = dir.path().to_owned();
    let other = std::thread::spawn(move || {
        let call = |r: Request| client::call(&ds, &r, &()).unwrap();
        call(Request::SnapshotCreate {
            vm: "web01".into(),
            name: "mid".into(),
        });
        let Response::ChangedAreas(c) = call(Request::Query {
            vm: "web01".into(),
            snapshot: "mid".into(),
            disk: 0,
            since: c0,
        }) else {
            panic!()
        };
        let Response::Guests(g) = call(Request::GuestList {}) else {
            panic!()
        };
        (c.changed_bytes, g)
    });
    let (changed, guests) = other.join().unwrap();
    assert!(changed > 0);
    assert_eq!(guests[0].state, service::action::GuestState::Running);
    // A reserved error kind comes back typed over the socket.
    let e = client::call(
        &s.ds,
        &Request::SnapshotRevert {
            vm: "web01".into(),
            name: "s0".into(),
        },
        &(),
    )
    .unwrap_err();
    assert_eq!(e.kind, ErrorKind::InUse);
    let Response::Guest(r) = s.call(Request::GuestStop { id }) else {
        panic!()
    };
    assert!(r.writes > 0);
    let (status, _) = s.stop();
    assert!(status.success());
}

#[test]
fn sigterm_is_clean_and_change_ids_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let s = Serve::start(dir.path());
    create(&s, "web01");
    write(&s, 0, 1, MIB);
    let c1 = snapshot(&s, "s1");
    // A guest running at SIGTERM stops with the service.
    s.call(Request::GuestRun(GuestRun {
        vm: "web01".into(),
        profile: "os-idle".into(),
        disk: 0,
        threads: 1,
        seed: 0,
        ops: None,
        seconds: None,
        verify: false,
        snapshot_every: None,
        detach: true,
    }));
    let (status, err) = s.stop();
    assert!(status.success(), "{err}");
    assert!(err.contains("stopped"), "{err}");
    assert!(!dir.path().join(".cbtsim/serve.json").exists());
    assert!(!dir.path().join(".cbtsim/control.sock").exists());
    // The next serve answers the change ID issued before the SIGTERM.
    let s = Serve::start(dir.path());
    write(&s, 6 * MIB, 2, 10);
    snapshot(&s, "s2");
    // (The guest's writes before the SIGTERM are in the answer too.)
    let a = query(&s, "s2", &c1);
    assert!(
        a.iter().any(|x| x.start <= 6 * MIB && x.end() >= 6 * MIB + GRAN),
        "{a:?}"
    );
    s.stop();
}

#[test]
fn a_second_serve_fails_naming_the_first_and_no_password_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let first = Serve::start(dir.path());
    let out = serve_cmd(dir.path()).env("CBTSIM_PASSWORD", "x").output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already served by cbtsim serve pid"), "{err}");
    assert!(err.contains(&first.status.pid.to_string()), "{err}");
    assert!(err.contains(&first.status.nbd), "{err}");
    // While serve owns the datastore, CLI commands go through it.
    create(&first, "web01");
    let out = cli(dir.path(), &["snapshot", "list", "web01"]);
    assert_eq!(out.0, Some(0), "{}", out.2);
    assert_eq!(out.1, "VM web01 has no snapshots\n");
    first.stop();
    let other = tempfile::tempdir().unwrap();
    let out = serve_cmd(other.path()).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no password"), "{err}");
    let empty = other.path().join("pw");
    std::fs::write(&empty, "\n").unwrap();
    let out = serve_cmd(other.path())
        .arg("--password-file")
        .arg(&empty)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("no password"));
    let out = serve_on(other.path(), "0.0.0.0:0")
        .env("CBTSIM_PASSWORD", "x")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--allow-remote"));
}

// ---- cbtsim commands from "a second terminal": through the serve, as without one ----

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

/// A command that must succeed and print one JSON document.
fn cli_json(ds: &Path, args: &[&str]) -> Value {
    let (code, out, err) = cli(ds, args);
    assert_eq!(code, Some(0), "cbtsim {args:?} failed: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("cbtsim {args:?}: not one JSON document ({e}): {out}"))
}

/// The shape of a JSON document: objects keep their keys, arrays the shape of their
/// first element, every other value becomes null.
fn shape(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(m.iter().map(|(k, v)| (k.clone(), shape(v))).collect()),
        Value::Array(a) => Value::Array(a.first().map(shape).into_iter().collect()),
        _ => Value::Null,
    }
}

/// The same command on a datastore without a serve and on one with: `{ds}` and `{aux}`
/// in the arguments name each side's datastore and a scratch directory.
struct Both<'a> {
    local: (&'a Path, &'a Path),
    served: (&'a Path, &'a Path),
}

impl Both<'_> {
    fn args(side: (&Path, &Path), args: &[&str]) -> Vec<String> {
        args.iter()
            .map(|a| {
                a.replace("{ds}", side.0.to_str().unwrap())
                    .replace("{aux}", side.1.to_str().unwrap())
            })
            .collect()
    }

    /// Runs `args` on both sides; the JSON documents must have the same shape.
    fn json(&self, args: &[&str]) -> (Value, Value) {
        let l = Self::args(self.local, args);
        let s = Self::args(self.served, args);
        let l = cli_json(self.local.0, &l.iter().map(String::as_str).collect::<Vec<_>>());
        let s = cli_json(self.served.0, &s.iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(shape(&l), shape(&s), "cbtsim {args:?}: local {l} vs through serve {s}");
        (l, s)
    }

    /// Runs `args` on both sides; both must fail alike: exit code and message.
    fn fails(&self, args: &[&str], needle: &str) {
        let l = cli(self.local.0, args);
        let s = cli(self.served.0, args);
        assert_ne!(l.0, Some(0), "cbtsim {args:?} succeeded");
        assert_eq!((l.0, &l.2), (s.0, &s.2), "cbtsim {args:?}: local vs through serve");
        assert!(l.2.contains(needle), "{}", l.2);
        assert!(s.1.is_empty(), "{}", s.1);
    }
}

#[test]
fn every_command_goes_through_a_running_serve_with_the_same_output() {
    let (ld, la, sd, sa) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let s = Serve::start(sd.path());
    let both = Both {
        local: (ld.path(), la.path()),
        served: (sd.path(), sa.path()),
    };
    both.json(&["vm", "create", "web01", "--disk", "16M", "--disk", "4M", "--json"]);
    both.json(&["disk", "write", "web01", "0", "0", "1M", "--json"]);
    let (c1, _) = both.json(&["snapshot", "create", "web01", "s1", "--json"]);
    let cid = c1["disks"][0]["change_id"].as_str().unwrap().to_owned();
    std::fs::write(la.path().join("data"), [7u8; 65536]).unwrap();
    std::fs::write(sa.path().join("data"), [7u8; 65536]).unwrap();
    both.json(&[
        "disk",
        "write",
        "web01",
        "0",
        "4M",
        "64K",
        "--from",
        "{aux}/data",
        "--json",
    ]);
    both.json(&["snapshot", "create", "web01", "s2", "--json"]);
    // The served side answers its own change IDs.
    let (sc, _) = (cli_json(sd.path(), &["snapshot", "show", "web01", "s1", "--json"]), ());
    let scid = sc["disks"][0]["change_id"].as_str().unwrap().to_owned();
    let lq = cli_json(
        ld.path(),
        &["query", "web01", "--snapshot", "s2", "--since", &cid, "--json"],
    );
    let sq = cli_json(
        sd.path(),
        &["query", "web01", "--snapshot", "s2", "--since", &scid, "--json"],
    );
    assert_eq!(shape(&lq), shape(&sq));
    assert_eq!(lq["changed_areas"], serde_json::json!([[4 * MIB, GRAN]]));
    assert_eq!(sq["changed_areas"], lq["changed_areas"]);
    both.json(&["snapshot", "list", "web01", "--json"]);
    both.json(&["snapshot", "show", "web01", "s1", "--json"]);
    let (lv, sv) = both.json(&["vm", "show", "web01", "--json"]);
    assert_eq!(lv["disks"][0]["layers"], 3);
    assert_eq!(sv["disks"][0]["layers"], 3);
    both.json(&["disk", "list", "web01", "--json"]);
    both.json(&["vm", "list", "--json"]);
    let (lr, sr) = both.json(&[
        "disk",
        "read",
        "web01",
        "0",
        "4M",
        "64K",
        "--snapshot",
        "s2",
        "--out",
        "{aux}/out",
        "--json",
    ]);
    assert_eq!(
        (lr["capacity"].as_u64(), sr["capacity"].as_u64()),
        (Some(SIZE), Some(SIZE))
    );
    assert_eq!(std::fs::read(sa.path().join("out")).unwrap(), vec![7u8; 65536]);
    both.json(&["disk", "unmap", "web01", "0", "8M", "64K", "--json"]);
    both.json(&["disk", "extend", "web01", "1", "8M", "--json"]);
    both.json(&["vm", "cbt", "web01", "on", "--json"]);
    both.json(&["vm", "power", "web01", "on", "--json"]);
    let (lb, sb) = both.json(&["backup", "run", "web01", "--repo", "{aux}/repo", "--json"]);
    both.json(&["snapshot", "remove", "web01", "s1", "--json"]);
    both.json(&["snapshot", "revert", "web01", "s2", "--json"]);
    both.json(&[
        "guest",
        "run",
        "web01",
        "--profile",
        "oltp-db",
        "--ops",
        "300",
        "--json",
    ]);
    let lp = lb["point"].as_str().unwrap();
    let sp = sb["point"].as_str().unwrap();
    let l = cli_json(
        ld.path(),
        &[
            "restore",
            "--repo",
            la.path().join("repo").to_str().unwrap(),
            "--point",
            lp,
            "--to-vm",
            "copy",
            "--json",
        ],
    );
    let r = cli_json(
        sd.path(),
        &[
            "restore",
            "--repo",
            sa.path().join("repo").to_str().unwrap(),
            "--point",
            sp,
            "--to-vm",
            "copy",
            "--json",
        ],
    );
    assert_eq!(shape(&l), shape(&r));
    both.json(&["vm", "delete", "copy", "--json"]);

    // Errors: the same message and exit code.
    both.fails(&["snapshot", "create", "nosuch", "s9"], "no VM named \"nosuch\"");
    both.fails(
        &["query", "web01", "--snapshot", "s2", "--since", "garbage"],
        "malformed change ID",
    );
    both.fails(&["disk", "write", "web01", "0", "16M", "1"], "outside disk 0");
    both.fails(&["vm", "create", "web01", "--disk", "1M"], "already exists");
    both.fails(&["guest", "stop", "99"], "no guest workload 99");
    // The serve did it all: it still owns the datastore.
    assert!(s.status.control.exists());
    let (status, err) = s.stop();
    assert!(status.success(), "{err}");
}

#[test]
fn a_backup_from_a_second_terminal_while_the_guest_writes_restores_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let aux = tempfile::tempdir().unwrap();
    let ds = dir.path();
    let repo = aux.path().join("repo");
    let repo = repo.to_str().unwrap();
    let s = Serve::start(ds);
    cli_json(
        ds,
        &["vm", "create", "web01", "--disk", "16M", "--disk", "4M", "--json"],
    );
    cli_json(
        ds,
        &["disk", "write", "web01", "0", "0", "4M", "--pattern", "3", "--json"],
    );
    let g = cli_json(
        ds,
        &[
            "guest",
            "run",
            "web01",
            "--profile",
            "oltp-db",
            "--threads",
            "2",
            "--detach",
            "--json",
        ],
    );
    let id = g["id"].as_u64().unwrap();
    let running = |ds: &Path| {
        let l = cli_json(ds, &["guest", "list", "--json"]);
        l.as_array()
            .unwrap()
            .iter()
            .any(|x| x["id"] == id && x["state"] == "running" && x["ops"].as_u64().unwrap() > 0)
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !running(ds) {
        assert!(Instant::now() < deadline, "the guest never ran");
        std::thread::sleep(Duration::from_millis(20));
    }
    // While it writes: a snapshot, a query, a full backup, a removal (consolidating
    // under writes), writes and reads of the other disk, vm show.
    let b0 = cli_json(ds, &["snapshot", "create", "web01", "b0", "--json"]);
    let c0 = b0["disks"][0]["change_id"].as_str().unwrap().to_owned();
    cli_json(ds, &["query", "web01", "--snapshot", "b0", "--since", "*", "--json"]);
    let p1 = cli_json(ds, &["backup", "run", "web01", "--repo", repo, "--json"]);
    assert_eq!(p1["kind"], "full");
    cli_json(ds, &["snapshot", "create", "web01", "b1", "--json"]);
    let q = cli_json(ds, &["query", "web01", "--snapshot", "b1", "--since", &c0, "--json"]);
    assert!(q["changed_bytes"].as_u64().unwrap() > 0, "the guest wrote: {q}");
    cli_json(ds, &["snapshot", "remove", "web01", "b0", "--json"]);
    cli_json(
        ds,
        &["disk", "write", "web01", "1", "1M", "64K", "--pattern", "9", "--json"],
    );
    let out = aux.path().join("d1");
    cli_json(
        ds,
        &[
            "disk",
            "read",
            "web01",
            "1",
            "1M",
            "64K",
            "--out",
            out.to_str().unwrap(),
            "--json",
        ],
    );
    assert_eq!(std::fs::read(&out).unwrap(), vec![9u8; 65536]);
    let v = cli_json(ds, &["vm", "show", "web01", "--json"]);
    assert_eq!(v["snapshots"].as_array().unwrap().len(), 1);
    assert!(running(ds), "the guest wrote all along");
    let r = cli_json(ds, &["guest", "stop", "web01", "--json"]);
    assert_eq!((r["id"].as_u64(), r["state"].as_str()), (Some(id), Some("stopped")));
    assert!(r["writes"].as_u64().unwrap() > 0);
    // Now frozen: an incremental on the backup taken under writes must restore to exactly
    // the snapshot's content (a block the first backup got wrong and that did not change
    // since would show here).
    cli_json(ds, &["snapshot", "create", "web01", "s", "--json"]);
    let p2 = cli_json(ds, &["backup", "run", "web01", "--repo", repo, "--json"]);
    assert_eq!(
        (p2["kind"].as_str(), &p2["parent"]),
        (Some("incremental"), &p1["point"])
    );
    let img = aux.path().join("img");
    let snap = aux.path().join("snap");
    let (code, _, err) = cli(
        ds,
        &[
            "restore",
            "--repo",
            repo,
            "--point",
            p2["point"].as_str().unwrap(),
            "--disk",
            "0",
            "--to",
            img.to_str().unwrap(),
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    cli_json(
        ds,
        &[
            "disk",
            "read",
            "web01",
            "0",
            "0",
            "16M",
            "--snapshot",
            "s",
            "--out",
            snap.to_str().unwrap(),
            "--json",
        ],
    );
    assert!(
        std::fs::read(&img).unwrap() == std::fs::read(&snap).unwrap(),
        "restore != snapshot"
    );
    s.stop();
}

/// Sends SIGINT to `pid`.
fn interrupt(pid: u32) {
    let ok = Command::new("kill").args(["-INT", &pid.to_string()]).status().unwrap();
    assert!(ok.success());
}

/// `cbtsim guest run` in the background; Ctrl-C once it runs. Returns its exit code,
/// stdout and stderr.
fn guest_run_then_ctrl_c(ds: &Path, until_running: impl Fn() -> bool) -> (Option<i32>, String, String) {
    let child = Command::new(env!("CARGO_BIN_EXE_cbtsim"))
        .env_remove("CBTSIM_DATASTORE")
        .arg("--datastore")
        .arg(ds)
        .args([
            "guest",
            "run",
            "web01",
            "--profile",
            "os-idle",
            "--seconds",
            "60",
            "--json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !until_running() {
        assert!(Instant::now() < deadline, "the guest never ran");
        std::thread::sleep(Duration::from_millis(20));
    }
    interrupt(child.id());
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn ctrl_c_on_guest_run_stops_the_workload_and_prints_its_report() {
    // Through a serve: the workload stops in the service.
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path();
    let s = Serve::start(ds);
    cli_json(ds, &["vm", "create", "web01", "--disk", "16M", "--json"]);
    let running = || {
        let l = cli_json(ds, &["guest", "list", "--json"]);
        l.as_array().unwrap().iter().any(|x| x["state"] == "running")
    };
    let (code, out, err) = guest_run_then_ctrl_c(ds, running);
    assert_ne!(code, Some(0));
    assert!(
        err.contains("interrupted: guest workload 1 on VM web01 was stopped"),
        "{err}"
    );
    let r: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["state"], "stopped");
    assert!(r["elapsed_s"].as_f64().unwrap() < 30.0);
    let l = cli_json(ds, &["guest", "list", "--json"]);
    assert_eq!(l[0]["state"], "stopped");
    s.stop();
    // Without one: the same, in the command's own process (which holds the VM once the
    // workload runs).
    let in_use = || cli(ds, &["snapshot", "list", "web01"]).2.contains("in use");
    let (code, out, err) = guest_run_then_ctrl_c(ds, in_use);
    assert_ne!(code, Some(0));
    assert!(err.contains("interrupted"), "{err}");
    let r: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["state"], "stopped");
}

#[test]
fn a_killed_serve_leaves_nothing_that_confuses_the_commands() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path();
    let mut s = Serve::start(ds);
    cli_json(ds, &["vm", "create", "web01", "--disk", "16M", "--json"]);
    let g = cli_json(
        ds,
        &["guest", "run", "web01", "--profile", "os-idle", "--detach", "--json"],
    );
    assert_eq!(g["vm"], "web01");
    s.child.kill().unwrap();
    s.child.wait().unwrap();
    assert!(ds.join(".cbtsim/control.sock").exists(), "left behind");
    assert!(ds.join(".cbtsim/serve.json").exists(), "left behind");
    // The commands open the datastore themselves.
    let c = cli_json(ds, &["snapshot", "create", "web01", "s1", "--json"]);
    assert!(c["disks"][0]["change_id"].is_string());
    assert_eq!(cli_json(ds, &["guest", "list", "--json"]), serde_json::json!([]));
    let (code, out, err) = cli(ds, &["guest", "run", "web01", "--profile", "os-idle", "--detach"]);
    assert_ne!(code, Some(0));
    assert!(out.is_empty());
    assert!(err.contains("start `cbtsim serve`"), "{err}");
    // And a new serve takes over.
    let s = Serve::start(ds);
    let l = cli_json(ds, &["snapshot", "list", "web01", "--json"]);
    assert_eq!(l[0]["name"], "s1");
    s.stop();
}

#[test]
fn serve_repo_exports_backup_points_that_copy_as_a_restore_does() {
    if !tool("qemu-img") || !tool("nbdinfo") || !tool("qemu-io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let aux = tempfile::tempdir().unwrap();
    let ds = dir.path();
    let repo = aux.path().join("repo");
    let repo_s = repo.to_str().unwrap();
    // A first point before the serve (the repository must exist), a second through it.
    cli_json(
        ds,
        &["vm", "create", "web01", "--disk", "16M", "--disk", "2M", "--json"],
    );
    cli_json(
        ds,
        &["disk", "write", "web01", "0", "1M", "3M", "--pattern", "5", "--json"],
    );
    let p1 = cli_json(ds, &["backup", "run", "web01", "--repo", repo_s, "--json"]);
    let s = Serve::start_with(ds, &["--repo", repo_s]);
    assert_eq!(
        s.status.repository.as_deref(),
        Some(repo.canonicalize().unwrap().as_path())
    );
    cli_json(
        ds,
        &["disk", "write", "web01", "0", "2M", "64K", "--pattern", "6", "--json"],
    );
    cli_json(
        ds,
        &["disk", "write", "web01", "1", "0", "4K", "--pattern", "7", "--json"],
    );
    let p2 = cli_json(ds, &["backup", "run", "web01", "--repo", repo_s, "--json"]);
    let (p1, p2) = (p1["point"].as_str().unwrap(), p2["point"].as_str().unwrap());
    let list = run(Command::new("nbdinfo").args(["--json", "--list", &s.uri("")]));
    for name in [format!("repo:{p1}/0"), format!("repo:{p2}/0"), format!("repo:{p2}/1")] {
        assert!(list.contains(&format!("\"{name}\"")), "{name} not listed: {list}");
    }
    for (point, disk) in [(p1, "0"), (p2, "0"), (p2, "1")] {
        let copy = aux.path().join(format!("copy-{point}-{disk}"));
        let restored = aux.path().join(format!("restored-{point}-{disk}"));
        run(Command::new("qemu-img")
            .args([
                "convert",
                "-f",
                "raw",
                "-O",
                "raw",
                &s.uri(&format!("repo:{point}/{disk}")),
            ])
            .arg(&copy));
        let (code, _, err) = cli(
            ds,
            &[
                "restore",
                "--repo",
                repo_s,
                "--point",
                point,
                "--disk",
                disk,
                "--to",
                restored.to_str().unwrap(),
            ],
        );
        assert_eq!(code, Some(0), "{err}");
        assert!(
            std::fs::read(&copy).unwrap() == std::fs::read(&restored).unwrap(),
            "repo:{point}/{disk} copies as its restore"
        );
    }
    // Read-only, and unknown points, disks and names are refused.
    let w = run_fails(Command::new("qemu-io").args(["-f", "raw", "-c", "write 0 4k", &s.uri(&format!("repo:{p2}/0"))]));
    assert!(w.contains("read-only") || w.contains("ermission"), "{w}");
    for bad in ["repo:ffffffff/0", &format!("repo:{p2}/9"), "repo:../0"] {
        run_fails(Command::new("qemu-img").args(["info", &s.uri(bad)]));
    }
    s.stop();
    // A serve without --repo has no such exports.
    let s = Serve::start(ds);
    let err = run_fails(Command::new("qemu-img").args(["info", &s.uri(&format!("repo:{p2}/0"))]));
    assert!(err.contains("no repository") || err.contains("repo:"), "{err}");
    s.stop();
}
