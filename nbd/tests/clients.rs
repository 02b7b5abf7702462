//! Real NBD clients against the server: libnbd's nbdinfo and nbdcopy,
//! QEMU's qemu-img and qemu-io, fio's nbd engine. Each test skips with a
//! printed reason when its tool is missing, and fails under CI=true.

mod common;

use std::process::Command;

use common::*;
use nbd::{proto, Command as Cmd, MemoryExports, Server};
use serde_json::Value;

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

/// `nbdinfo --map --json` as (offset, length, flag bit 0 set) entries.
fn nbdinfo_map(uri: &str, context: Option<&str>) -> Vec<(u64, u64, bool)> {
    let map = match context {
        Some(c) => format!("--map={c}"),
        None => "--map".to_string(),
    };
    let out = run(Command::new("nbdinfo").args(["--json", &map, uri]));
    let v: Value = serde_json::from_str(&out).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["offset"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["type"].as_u64().unwrap() & 1 == 1,
            )
        })
        .collect()
}

/// `qemu-img map --output=json` as (start, length, data) entries.
fn qemu_img_map(args: &[&str]) -> Vec<(u64, u64, bool)> {
    let out = run(Command::new("qemu-img").args(["map", "--output=json"]).args(args));
    let v: Value = serde_json::from_str(&out).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["start"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["data"].as_bool().unwrap(),
            )
        })
        .collect()
}

fn image_opts(port: u16, export: &str, bitmap: Option<&str>) -> String {
    let mut s = format!("driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},export={export}");
    if let Some(b) = bitmap {
        // Commas would need doubling in image options; our names have none.
        s.push_str(&format!(",x-dirty-bitmap=qemu:dirty-bitmap:{b}"));
    }
    s
}

fn not(v: Vec<bool>) -> Vec<bool> {
    v.into_iter().map(|b| !b).collect()
}

#[test]
fn nbdinfo_lists_exports_descriptions_and_contexts() {
    if !tool("nbdinfo") {
        return;
    }
    let (server, _) = start();
    let out = run(Command::new("nbdinfo").args(["--json", "--list", &server.uri("")]));
    let v: Value = serde_json::from_str(&out).unwrap();
    let exports = v["exports"].as_array().unwrap();
    let names: Vec<&str> = exports.iter().map(|e| e["export-name"].as_str().unwrap()).collect();
    assert_eq!(names, ["disk", "ro", "small"]);
    let disk = &exports[0];
    assert_eq!(disk["description"], "test disk");
    assert_eq!(disk["export-size"], SIZE);
    assert_eq!(disk["is_read_only"], false);
    assert_eq!(disk["can_multi_conn"], true);
    let contexts: Vec<&str> = disk["contexts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert_eq!(
        contexts,
        [
            "base:allocation",
            &format!("qemu:dirty-bitmap:{BITMAP}"),
            &format!("qemu:dirty-bitmap:{BITMAP2}")
        ]
    );
    assert_eq!(exports[1]["is_read_only"], true);
    assert_eq!(exports[1]["description"], "read-only disk");
    assert_eq!(exports[2]["block_size_minimum"], 512);
}

#[test]
fn nbdinfo_maps_allocation_and_dirty_bitmaps() {
    if !tool("nbdinfo") {
        return;
    }
    let (server, exports) = start();
    let disk = exports.get("disk").unwrap();
    let uri = server.uri("disk");
    let holes = granules(&nbdinfo_map(&uri, None), GRAN, SIZE);
    assert_eq!(not(holes), disk.allocation());
    for name in [BITMAP, BITMAP2] {
        let dirty = granules(
            &nbdinfo_map(&uri, Some(&format!("qemu:dirty-bitmap:{name}"))),
            GRAN,
            SIZE,
        );
        assert_eq!(dirty, disk.bitmap(name).unwrap(), "{name}");
        assert!(dirty.iter().any(|&d| d), "{name} has dirty granules");
    }
    // An unknown bitmap is not negotiated: nbdinfo refuses to map it.
    run_fails(Command::new("nbdinfo").args(["--map=qemu:dirty-bitmap:nope", &uri]));
}

#[test]
fn qemu_img_maps_allocation_and_dirty_bitmaps() {
    if !tool("qemu-img") {
        return;
    }
    let (server, exports) = start();
    let disk = exports.get("disk").unwrap();
    let port = tcp_addr(&server).port();
    let data = granules(&qemu_img_map(&["-f", "raw", &server.uri("disk")]), GRAN, SIZE);
    assert_eq!(data, disk.allocation());
    for name in [BITMAP, BITMAP2] {
        // x-dirty-bitmap reports dirty areas as "data": false.
        let opts = image_opts(port, "disk", Some(name));
        let data = granules(&qemu_img_map(&["--image-opts", &opts]), GRAN, SIZE);
        assert_eq!(not(data), disk.bitmap(name).unwrap(), "{name}");
    }
}

#[test]
fn qemu_img_convert_copies_the_content() {
    if !tool("qemu-img") {
        return;
    }
    let (server, exports) = start();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("copy.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", &server.uri("disk")])
        .arg(&out));
    assert!(std::fs::read(&out).unwrap() == contents(&exports, "disk"));
}

#[test]
fn qemu_io_writes_appear_in_the_export_and_its_bitmaps() {
    if !tool("qemu-io") {
        return;
    }
    let (server, exports) = start();
    let disk = exports.get("disk").unwrap();
    disk.clear_bitmaps();
    let before = disk.contents();
    let uri = server.uri("disk");
    run(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x5a 5243392 70000", &uri]));
    run(Command::new("qemu-io").args(["-f", "raw", "-c", "write -z 10485760 131072", "-c", "flush", &uri]));
    run(Command::new("qemu-io").args(["-f", "raw", "-c", "write -f 0 512", &uri])); // FUA
    let after = disk.contents();
    let mut expect = before.clone();
    expect[5243392..5243392 + 70000].fill(0x5a);
    expect[10485760..10485760 + 131072].fill(0);
    expect[..512].fill(0xcd); // qemu-io's default pattern, the FUA write
    assert!(after == expect, "export holds exactly the writes");
    let dirty = disk.bitmap(BITMAP).unwrap();
    let want: Vec<usize> = vec![0, 80, 81, 160, 161];
    let got: Vec<usize> = dirty.iter().enumerate().filter(|(_, &d)| d).map(|(i, _)| i).collect();
    assert_eq!(got, want);
    // qemu-io reads it back through the server too.
    run(Command::new("qemu-io").args(["-r", "-f", "raw", "-c", "read -P 0x5a 5243392 70000", &uri]));
}

#[test]
fn nbdcopy_copies_out_and_in() {
    if !tool("nbdcopy") {
        return;
    }
    let (server, exports) = start();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.raw");
    run(Command::new("nbdcopy").arg(server.uri("disk")).arg(&out));
    assert!(std::fs::read(&out).unwrap() == contents(&exports, "disk"));
    // Into the export: a file with data, a hole, and data.
    let mut input = vec![0u8; SIZE as usize];
    input[..3 * MIB as usize].copy_from_slice(&pattern(42, 3 * MIB as usize));
    input[(14 * MIB) as usize..].copy_from_slice(&pattern(43, 2 * MIB as usize));
    let inp = dir.path().join("in.raw");
    std::fs::write(&inp, &input).unwrap();
    run(Command::new("nbdcopy").arg(&inp).arg(server.uri("disk")));
    assert!(contents(&exports, "disk") == input);
}

#[test]
fn fio_nbd_engine_writes_and_verifies() {
    if !tool("fio") {
        return;
    }
    let (server, exports) = start();
    let dir = tempfile::tempdir().unwrap();
    let base = [
        "--ioengine=nbd",
        "--thread",
        "--iodepth=8",
        "--bs=64k",
        "--size=1M",
        "--offset=6M",
        "--output-format=terse",
    ];
    let uri = format!("--uri={}", server.uri("disk"));
    let help = Command::new("fio").arg("--enghelp=nbd").output().unwrap();
    if !help.status.success() {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "fio lacks the nbd engine");
        eprintln!("skipping: this fio has no nbd engine");
        return;
    }
    run(Command::new("fio").current_dir(dir.path()).args(base).args([
        "--name=pattern",
        "--rw=write",
        "--buffer_pattern=0xab",
        "--scramble_buffers=0",
        &uri,
    ]));
    let written = direct(&exports, "disk", 6 * MIB, MIB as usize);
    assert!(written.iter().all(|&b| b == 0xab), "fio's pattern is in the export");
    // Random writes, then fio reads them back and checks them.
    run(Command::new("fio").current_dir(dir.path()).args(base).args([
        "--name=verify",
        "--rw=randwrite",
        "--verify=crc32c",
        "--do_verify=1",
        &uri,
    ]));
}

#[test]
fn read_only_export_refuses_writes() {
    let (server, exports) = start();
    let before = contents(&exports, "ro");
    // Over the wire: EPERM for write, zero and trim, nothing changes.
    let mut c = Raw::handshake(tcp_addr(&server));
    let (_, flags, _) = c.go("ro", true, &[]);
    assert_ne!(flags & proto::TFLAG_READ_ONLY, 0);
    c.request(Cmd::Write, 0, 1, 0, 4);
    c.send(b"abcd");
    assert_eq!(c.reply(0).0.error(), 1);
    c.request(Cmd::WriteZeroes, 0, 2, 0, 4096);
    assert_eq!(c.reply(0).0.error(), 1);
    c.request(Cmd::Trim, 0, 3, 0, 4096);
    assert_eq!(c.reply(0).0.error(), 1);
    // Without structured replies, the same as simple replies.
    let mut c = Raw::handshake(tcp_addr(&server));
    c.go("ro", false, &[]);
    c.request(Cmd::Write, 0, 4, 4096, 2);
    c.send(b"xy");
    assert_eq!(c.reply(0).0, Reply::Simple { error: 1, cookie: 4 });
    if tool("qemu-io") {
        let err = run_fails(Command::new("qemu-io").args(["-f", "raw", "-c", "write 0 4k", &server.uri("ro")]));
        assert!(err.contains("ermission denied") || err.contains("read-only"), "{err}");
    }
    if tool("nbdcopy") {
        let dir = tempfile::tempdir().unwrap();
        let inp = dir.path().join("in.raw");
        std::fs::write(&inp, vec![1u8; 4 * MIB as usize]).unwrap();
        run_fails(Command::new("nbdcopy").arg(&inp).arg(server.uri("ro")));
    }
    assert!(contents(&exports, "ro") == before);
}

#[test]
fn unix_socket_serves_real_clients() {
    if !tool("nbdinfo") || !tool("qemu-img") {
        return;
    }
    let exports = test_exports();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nbd.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let server = Server::new(exports.clone()).serve_unix(listener).unwrap();
    let uri = server.uri("disk");
    assert!(uri.starts_with("nbd+unix:///disk?socket="), "{uri}");
    let dirty = granules(
        &nbdinfo_map(&uri, Some(&format!("qemu:dirty-bitmap:{BITMAP}"))),
        GRAN,
        SIZE,
    );
    assert_eq!(dirty, exports.get("disk").unwrap().bitmap(BITMAP).unwrap());
    let out = dir.path().join("copy.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", &uri])
        .arg(&out));
    assert!(std::fs::read(&out).unwrap() == contents(&exports, "disk"));
}

#[test]
fn many_clients_at_once() {
    let exports = test_exports();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let server = Server::new(exports.clone()).serve_tcp(listener).unwrap();
    let addr = tcp_addr(&server);
    let threads: Vec<_> = (0..16u64)
        .map(|i| {
            std::thread::spawn(move || {
                let mut c = Raw::handshake(addr);
                c.go("disk", i % 2 == 0, &[]);
                let off = 4 * MIB + i * 65536;
                let data = pattern(i, 65536);
                for round in 0..20 {
                    c.request(Cmd::Write, 0, round, off, 65536);
                    c.send(&data);
                    assert_eq!(c.reply(0).0.error(), 0);
                    c.request(Cmd::Read, 0, round, off, 65536);
                    let got = if i % 2 == 0 {
                        c.structured_read(off, 65536).unwrap()
                    } else {
                        c.reply(65536).1
                    };
                    assert!(got == data);
                }
                c.request(Cmd::Disc, 0, 0, 0, 0);
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    for i in 0..16u64 {
        assert!(direct(&exports, "disk", 4 * MIB + i * 65536, 65536) == pattern(i, 65536));
    }
}

#[test]
fn shutdown_cuts_live_connections() {
    let exports = std::sync::Arc::new(MemoryExports::new());
    exports.insert("d", std::sync::Arc::new(nbd::MemoryExport::new(MIB, GRAN)));
    let server = Server::new(exports.clone())
        .serve_tcp(std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .unwrap();
    let addr = tcp_addr(&server);
    let mut a = Raw::handshake(addr);
    a.go("d", true, &[]);
    let _b = Raw::connect(addr); // still in the handshake
    while server.connections() < 2 {
        std::thread::yield_now();
    }
    server.shutdown();
    assert!(a.closed());
    // The listener is gone with the accept thread.
    assert!(std::net::TcpStream::connect(addr).is_err());
}
