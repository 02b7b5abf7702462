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
        let mut child = serve_cmd(ds)
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
    // While serve owns the datastore, a plain CLI command cannot open the VM.
    create(&first, "web01");
    let out = Command::new(env!("CARGO_BIN_EXE_cbtsim"))
        .env_remove("CBTSIM_DATASTORE")
        .arg("--datastore")
        .arg(dir.path())
        .args(["snapshot", "list", "web01"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("in use"));
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
