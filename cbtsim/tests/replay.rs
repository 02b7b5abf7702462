//! Trace replay: every format gives the tracker's exact answer, errors name file, line
//! and field, and the `cbtsim replay` command prints what the issue specifies.

use std::path::{Path, PathBuf};
use std::process::Command;

use harness::replay::{replay_trace, ReplayError, ReplayOptions};
use tracker::Granularity;
use workloads::TraceFormat;

const K64: u64 = 65536;

fn opts(g: u64) -> ReplayOptions {
    ReplayOptions {
        granularity: Granularity::new(g).unwrap(),
        ..ReplayOptions::default()
    }
}

fn write_file(dir: &Path, name: &str, content: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, content).unwrap();
    p
}

/// One vscsi v1 record: sn, len, nSG, cmd, ver, lbn, ts.
fn vscsi(cmd: u16, lbn: u64, len: u32) -> Vec<u8> {
    let mut r = Vec::new();
    r.extend_from_slice(&1u32.to_le_bytes());
    r.extend_from_slice(&len.to_le_bytes());
    r.extend_from_slice(&1u32.to_le_bytes());
    r.extend_from_slice(&cmd.to_le_bytes());
    r.extend_from_slice(&0x0100u16.to_le_bytes());
    r.extend_from_slice(&lbn.to_le_bytes());
    r.extend_from_slice(&7u64.to_le_bytes());
    r
}

/// The same four ops in every format: a write of 4 KiB at sector 127 (crosses the first
/// 64 KiB boundary), a read at 1 MiB, a 512-byte write at sector 4095, and a write of
/// 64 KiB at 10 MiB. Discards exist only in blkparse and fio iologs.
fn same_ops_in_every_format() -> Vec<(TraceFormat, Vec<u8>)> {
    let text = |s: &str| s.as_bytes().to_vec();
    let mut bin = vscsi(0x2a, 127, 4096);
    bin.extend(vscsi(0x28, 2048, 4096));
    bin.extend(vscsi(0x2a, 4095, 512));
    bin.extend(vscsi(0x12, 0, 36)); // INQUIRY: not a record
    bin.extend(vscsi(0x2a, 20480, 65536));
    vec![
        (
            TraceFormat::Msr,
            text(
                "128166372003061629,web,0,Write,65024,4096,100\n\
                 128166372003061630,web,0,Read,1048576,4096,100\n\
                 128166372003061631,web,0,Write,2096640,512,100\n\
                 128166372003061632,web,0,Write,10485760,65536,100\n",
            ),
        ),
        (TraceFormat::Vscsi, bin),
        (
            TraceFormat::CloudphysicsCsv,
            text("version,time,op,size,lbn\n1,0.5,2a,4096,127\n1,0.6,28,4096,2048\n1,0.7,2a,512,4095\n1,0.8,2a,65536,20480\n"),
        ),
        (
            TraceFormat::Blkparse,
            text(
                "  8,0    1        1     0.000000000  1234  Q  WS 127 + 8 [fio]\n\
                   8,0    1        2     0.000001000  1234  G  WS 127 + 8 [fio]\n\
                   8,0    1        3     0.000002000  1234  Q   R 2048 + 8 [fio]\n\
                   8,0    1        4     0.000003000  1234  Q   W 4095 + 1 [fio]\n\
                   8,0    1        5     0.000004000  1234  Q   W 20480 + 128 [fio]\n\
                 CPU0 (8,0):\n Reads Queued:           1,        4KiB\n",
            ),
        ),
        (
            TraceFormat::FioIolog,
            text(
                "fio version 3 iolog\n0 /dev/sdb add\n0 /dev/sdb open\n1 /dev/sdb write 65024 4096\n\
                 2 /dev/sdb read 1048576 4096\n3 /dev/sdb write 2096640 512\n4 /dev/sdb write 10485760 65536\n\
                 5 /dev/sdb close\n",
            ),
        ),
        (
            TraceFormat::Alibaba,
            text("3,W,65024,4096,1577808000000000\n3,R,1048576,4096,1577808000000001\n3,W,2096640,512,1577808000000002\n3,W,10485760,65536,1577808000000003\n"),
        ),
        (
            TraceFormat::Tencent,
            text("1538323200,127,8,1,1283\n1538323200,2048,8,0,1283\n1538323201,4095,1,1,1283\n1538323201,20480,128,1,1283\n"),
        ),
    ]
}

#[test]
fn every_format_replays_to_the_same_exact_answer() {
    let dir = tempfile::tempdir().unwrap();
    for (format, content) in same_ops_in_every_format() {
        let path = write_file(dir.path(), &format!("t.{format}"), &content);
        let r = replay_trace(&path, format, &opts(K64), &()).unwrap_or_else(|e| panic!("{format}: {e}"));
        // 64 KiB blocks 0 and 1 (the write across 65536), 31 (the sector at 2 MiB - 512),
        // 160 (10 MiB); the disk is the smallest multiple of 64 KiB covering the trace.
        assert_eq!(
            r.changed_areas,
            vec![(0, 2 * K64), (31 * K64, K64), (160 * K64, K64)],
            "{format}"
        );
        assert_eq!(r.disk_size, 161 * K64, "{format}");
        assert_eq!(
            (r.writes, r.reads, r.bytes_written),
            (3, 1, 4096 + 512 + 65536),
            "{format}"
        );
        assert_eq!(r.true_changed_bytes, 4096 + 512 + 65536, "{format}");
        assert_eq!(r.missed_blocks, 0, "{format}");
        assert_eq!(r.changed_bytes, 4 * K64, "{format}");
    }
}

#[test]
fn discards_are_changes_and_devices_can_be_picked() {
    let dir = tempfile::tempdir().unwrap();
    let trace = write_file(
        dir.path(),
        "blk.txt",
        b"  8,0    0        1     0.000000000  1  Q   W 0 + 8 [a]\n\
          8,16   0        2     0.000001000  1  Q   W 4096 + 8 [a]\n\
          8,0    0        3     0.000002000  1  Q   D 256 + 256 [a]\n\
          8,0    0        4     0.000003000  1  Q  FWS 0 + 0 [a]\n",
    );
    let mut o = opts(4096);
    o.device = Some("8,0".into());
    let r = replay_trace(&trace, TraceFormat::Blkparse, &o, &()).unwrap();
    assert_eq!(r.changed_areas, vec![(0, 4096), (128 << 10, 128 << 10)]);
    assert_eq!((r.writes, r.discards, r.flushes), (1, 1, 1));
    assert_eq!(r.disk_size, 256 << 10, "device 8,16's write at 2 MiB is not replayed");
    o.device = Some("8,16".into());
    o.disk_size = Some(4 << 20);
    let r = replay_trace(&trace, TraceFormat::Blkparse, &o, &()).unwrap();
    assert_eq!(r.changed_areas, vec![(2 << 20, 4096)]);
    assert_eq!(r.disk_size, 4 << 20);
}

#[test]
fn a_bad_line_names_file_line_and_field_or_is_skipped_under_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let trace = write_file(
        dir.path(),
        "bad.csv",
        b"version,time,op,size,lbn\n1,0.5,2a,4096,0\n1,0.6,2a,40x6,8\n1,0.7,2a,512,16\n",
    );
    let e = replay_trace(&trace, TraceFormat::CloudphysicsCsv, &opts(4096), &()).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, ReplayError::Trace(_)));
    assert!(msg.contains("bad.csv:3: field 'size'"), "{msg}");
    let mut o = opts(4096);
    o.skip_bad = true;
    let r = replay_trace(&trace, TraceFormat::CloudphysicsCsv, &o, &()).unwrap();
    assert_eq!(r.skipped_lines, 1);
    assert_eq!(r.changed_areas, vec![(0, 4096), (8192, 4096)]);
}

#[test]
fn a_record_past_a_given_disk_size_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let trace = write_file(dir.path(), "a.csv", b"3,W,0,4096,1\n3,W,1048576,4096,2\n");
    let mut o = opts(K64);
    o.disk_size = Some(1 << 20);
    let e = replay_trace(&trace, TraceFormat::Alibaba, &o, &()).unwrap_err();
    assert!(
        e.to_string()
            .contains("record 2 (write of 4096 bytes at offset 1048576)"),
        "{e}"
    );
}

fn cbtsim(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_cbtsim")).args(args).output().unwrap()
}

#[test]
fn cli_replay_prints_the_documented_json() {
    let dir = tempfile::tempdir().unwrap();
    let (format, content) = same_ops_in_every_format().swap_remove(0);
    let path = write_file(dir.path(), "msr.csv", &content);
    let out = cbtsim(&[
        "replay",
        path.to_str().unwrap(),
        "--format",
        format.name(),
        "--granularity",
        "4K",
        "--json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["granularity"], 4096);
    assert_eq!(v["disk_size"], 10485760 + 65536);
    assert_eq!(v["writes"], 3);
    assert_eq!(v["bytes_written"], 4096 + 512 + 65536);
    let areas: Vec<(u64, u64)> = serde_json::from_value(v["changed_areas"].clone()).unwrap();
    assert_eq!(areas, vec![(61440, 8192), (2093056, 4096), (10485760, 65536)]);
    assert_eq!(v["changed_bytes"], 8192 + 4096 + 65536);
    assert!(v["seconds"].as_f64().unwrap() > 0.0);

    let bad = write_file(
        dir.path(),
        "bad.csv",
        b"128166372003061629,web,0,Write,65024,4096,100\n1,web,0,Wrte,0,512,1\n",
    );
    let out = cbtsim(&["replay", bad.to_str().unwrap(), "--format", "msr"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("cbtsim: error: ") && err.contains("bad.csv:2: field 'type'"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    let out = cbtsim(&[
        "replay",
        bad.to_str().unwrap(),
        "--format",
        "msr",
        "--skip-bad",
        "--json",
    ]);
    assert!(out.status.success());
    let out = cbtsim(&["replay", bad.to_str().unwrap(), "--format", "nope"]);
    assert!(!out.status.success());
}

/// The real VMware trace of `shared/traces` (not part of the repository): at 4 KiB the
/// tracker must report exactly the trace's unique written 4 KiB blocks, measured
/// independently as 208,696 (`shared/traces/README.md`).
#[test]
fn cloudphysics_trace_replays_to_its_unique_blocks() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/traces/cloudphysics/cloudPhysicsIO.vscsi");
    if !path.exists() {
        eprintln!(
            "skipped: {} is absent (it is not part of the repository)",
            path.display()
        );
        return;
    }
    let r = replay_trace(&path, TraceFormat::Vscsi, &opts(4096), &()).unwrap();
    assert_eq!(r.writes, 66_898);
    assert_eq!(r.reads, 46_974);
    assert_eq!(r.changed_bytes, 208_696 * 4096);
    assert_eq!(r.missed_blocks, 0);
    assert!(
        r.over_report_ratio >= 1.0 && r.over_report_ratio < 1.02,
        "{}",
        r.over_report_ratio
    );
}

/// A command that must fail with one line containing `needle`.
fn fails(args: &[&str], needle: &str) -> String {
    let out = cbtsim(args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "{args:?} succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(err.contains(needle), "{args:?}: {err:?} should mention {needle:?}");
    assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: one line: {err:?}");
    assert!(out.stdout.is_empty(), "{args:?} printed a report");
    err
}

/// Before, each of these printed "0 writes" and exited 0.
#[test]
fn cli_replay_of_a_trace_without_records_fails_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let msr = write_file(
        dir.path(),
        "msr.csv",
        b"128166372003061629,usr,0,Write,8192,4096,1331\n",
    );
    let m = msr.to_str().unwrap();
    let empty = write_file(dir.path(), "empty.csv", b"");
    let e = empty.to_str().unwrap();
    fails(
        &["replay", e, "--format", "msr"],
        "no valid msr record: the trace is empty",
    );
    fails(
        &["replay", m, "--format", "blkparse"],
        "no valid blkparse record: line 1 is not one: \"128166372003061629,usr,0,Write,8192,4096,1331\"",
    );
    fails(
        &["replay", m, "--format", "alibaba", "--skip-bad"],
        "1 malformed line(s) skipped",
    );
    fails(
        &["replay", m, "--format", "msr", "--device", "db_0"],
        "matches none of its 1 records (devices: usr_0)",
    );
    // Binary data read as text: one short line, not megabytes.
    let mut junk = vec![0u8; 300_000];
    for (i, b) in junk.iter_mut().enumerate() {
        *b = (i * 7 % 251) as u8 | 0x80;
    }
    let bin = write_file(dir.path(), "junk.bin", &junk);
    let err = fails(&["replay", bin.to_str().unwrap(), "--format", "msr"], "junk.bin:");
    assert!(err.len() < 1000, "{} bytes of error", err.len());
}

#[test]
fn cli_replay_makes_its_temporary_datastore_in_the_given_one() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().join("scratch");
    std::fs::create_dir(&ds).unwrap();
    let msr = write_file(dir.path(), "t.csv", b"1,usr,0,Write,0,512,1\n");
    let out = Command::new(env!("CARGO_BIN_EXE_cbtsim"))
        .env_remove("CBTSIM_DATASTORE")
        .args([
            "--datastore",
            ds.to_str().unwrap(),
            "replay",
            msr.to_str().unwrap(),
            "--format",
            "msr",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read_dir(&ds).unwrap().count(), 0, "removed at the end");
    let none = dir.path().join("nowhere");
    let out = Command::new(env!("CARGO_BIN_EXE_cbtsim"))
        .env_remove("CBTSIM_DATASTORE")
        .args([
            "--datastore",
            none.to_str().unwrap(),
            "replay",
            msr.to_str().unwrap(),
            "--format",
            "msr",
        ])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a directory"));
}

/// Ctrl-C during a long replay: the temporary datastore is removed, the exit is non-zero.
#[test]
fn cli_replay_interrupted_removes_its_temporary_datastore() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().join("scratch");
    std::fs::create_dir(&ds).unwrap();
    // A long trace: 4 million 512-byte writes over 2 GiB.
    let mut text = String::with_capacity(4_000_000 * 24);
    for i in 0..4_000_000u64 {
        text.push_str(&format!("{i},usr,0,Write,{},512,1\n", (i * 7919 % 4_194_304) * 512));
    }
    let trace = write_file(dir.path(), "long.csv", text.as_bytes());
    let child = Command::new(env!("CARGO_BIN_EXE_cbtsim"))
        .env_remove("CBTSIM_DATASTORE")
        .args([
            "--datastore",
            ds.to_str().unwrap(),
            "replay",
            trace.to_str().unwrap(),
            "--format",
            "msr",
        ])
        .args(["--disk-size", "2G"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the replay has made its datastore.
    let t = std::time::Instant::now();
    while std::fs::read_dir(&ds).unwrap().count() == 0 {
        assert!(t.elapsed().as_secs() < 30, "no temporary datastore appeared");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    std::thread::sleep(std::time::Duration::from_millis(200));
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(child.id() as i32).unwrap(),
        rustix::process::Signal::INT,
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("interrupted"), "{err}");
    assert_eq!(
        std::fs::read_dir(&ds).unwrap().count(),
        0,
        "the temporary datastore is gone"
    );
}
