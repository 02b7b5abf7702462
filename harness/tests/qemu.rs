//! Cross-check against QEMU, a real peer: the same writes go into a qcow2 image carrying a
//! persistent dirty bitmap (through `qemu-io`) and into a fresh cbtsim VM; QEMU's dirty
//! extents (`qemu-nbd -B` + `qemu-img map`) must equal cbtsim's changed areas since the
//! change ID taken before the writes, byte for byte, at several granularities.
//!
//! Skips with a printed reason when qemu-img, qemu-io or qemu-nbd is missing, except
//! under `CI=true`, where a missing tool fails the test.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use harness::replay::{replay_ops, replay_trace, ReplayOptions};
use rand::{Rng, SeedableRng};
use tracker::Granularity;
use workloads::{IoOp, TraceFormat, TraceReader};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

/// Whether the QEMU tools are here; prints why not (or panics under `CI=true`).
fn qemu_available() -> bool {
    let missing: Vec<&str> = ["qemu-img", "qemu-io", "qemu-nbd"]
        .into_iter()
        .filter(|t| Command::new(t).arg("--version").output().is_err())
        .collect();
    if missing.is_empty() {
        return true;
    }
    let reason = format!(
        "{} not found (Debian/Ubuntu: apt-get install qemu-utils)",
        missing.join(", ")
    );
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("CI=true and the QEMU cross-check cannot run: {reason}");
    }
    eprintln!("skipped: the QEMU cross-check needs {reason}");
    false
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Kills the forked qemu-nbd server when dropped.
struct NbdServer {
    pid_file: std::path::PathBuf,
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(&self.pid_file) {
            let _ = Command::new("kill").arg(pid.trim()).status();
        }
    }
}

/// QEMU's dirty areas after `writes` on a fresh qcow2 of `size` bytes with a persistent
/// bitmap of `g`-byte blocks: sorted, coalesced `(start, len)`.
fn qemu_dirty(size: u64, g: u64, writes: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.qcow2");
    let img_s = img.to_str().unwrap();
    run(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2", img_s, &size.to_string()]));
    run(Command::new("qemu-img").args(["bitmap", "--add", "--granularity", &g.to_string(), img_s, "b0"]));

    // All writes in one qemu-io process, through stdin; write-back caching (qemu-io's
    // default, write-through, syncs every write and is ~20 times slower).
    let mut child = Command::new("qemu-io")
        .args(["-t", "writeback", "-f", "qcow2", img_s])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("qemu-io starts");
    let mut script = String::new();
    for &(off, len) in writes {
        script.push_str(&format!("write -P 0xab {off} {len}\n"));
    }
    let mut stdin = child.stdin.take().unwrap();
    let feeder = std::thread::spawn(move || stdin.write_all(script.as_bytes()));
    let out = child.wait_with_output().unwrap();
    feeder.join().unwrap().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "qemu-io failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout.matches("wrote ").count(),
        writes.len(),
        "qemu-io did not do every write: {}{}",
        stdout
            .lines()
            .find(|l| !l.contains("wrote") && !l.contains("ops;"))
            .unwrap_or(""),
        String::from_utf8_lossy(&out.stderr)
    );

    let sock = dir.path().join("n.sock");
    let pid_file = dir.path().join("n.pid");
    run(Command::new("qemu-nbd").args([
        "-t",
        "-r",
        "-f",
        "qcow2",
        "-B",
        "b0",
        "-x",
        "exp",
        "-k",
        sock.to_str().unwrap(),
        "--fork",
        "--pid-file",
        pid_file.to_str().unwrap(),
        img_s,
    ]));
    let _server = NbdServer { pid_file };
    let opts = format!(
        "driver=nbd,server.type=unix,server.path={},export=exp,x-dirty-bitmap=qemu:dirty-bitmap:b0",
        sock.display()
    );
    let map = run(Command::new("qemu-img").args(["map", "--output=json", "--image-opts", &opts]));
    let entries: Vec<serde_json::Value> = serde_json::from_str(&map).unwrap_or_else(|e| panic!("{e}: {map}"));
    let mut dirty: Vec<(u64, u64)> = Vec::new();
    // In this mode an entry with "data": false is dirty.
    for e in entries.iter().filter(|e| e["data"] == false) {
        let (s, l) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        match dirty.last_mut() {
            Some((ls, ll)) if *ls + *ll == s => *ll += l,
            _ => dirty.push((s, l)),
        }
    }
    dirty
}

fn opts(g: u64) -> ReplayOptions {
    ReplayOptions {
        granularity: Granularity::new(g).unwrap(),
        ..ReplayOptions::default()
    }
}

/// cbtsim's changed areas after the same writes on a fresh VM.
fn cbtsim_dirty(size: u64, g: u64, writes: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let ops = writes.iter().enumerate().map(|(i, &(offset, len))| IoOp::Write {
        offset,
        len,
        seed: i as u64,
    });
    let r = replay_ops(ops, size, &opts(g)).unwrap();
    assert_eq!(r.missed_blocks, 0);
    r.changed_areas
}

fn check(what: &str, size: u64, g: u64, writes: &[(u64, u64)]) {
    let qemu = qemu_dirty(size, g, writes);
    let ours = cbtsim_dirty(size, g, writes);
    assert!(!qemu.is_empty(), "{what}: QEMU reported nothing");
    assert_eq!(ours, qemu, "{what}, granularity {g}: cbtsim vs QEMU");
}

/// A disk that is not a multiple of any granularity above 512: 256 MiB + 3 sectors.
const ODD: u64 = 256 * MIB + 3 * 512;

#[test]
fn random_unaligned_writes_match_qemu() {
    if !qemu_available() {
        return;
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x9e3779b9);
    let mut writes = Vec::new();
    for i in 0..600 {
        let len = match i % 4 {
            0 => rng.gen_range(1..=16),
            1 => rng.gen_range(1..=8 * KIB),
            2 => rng.gen_range(1..=200 * KIB),
            _ => 512 * rng.gen_range(1..=64),
        };
        // A quarter of the writes cluster in the last 2 MiB, the rest anywhere.
        let lo = if i % 4 == 3 { ODD - 2 * MIB } else { 0 };
        let off = rng.gen_range(lo..=ODD - len);
        writes.push((off, len));
    }
    for g in [64 * KIB, 4 * KIB] {
        check("random unaligned writes", ODD, g, &writes);
    }
}

#[test]
fn edge_case_writes_match_qemu() {
    if !qemu_available() {
        return;
    }
    for g in [64 * KIB, 4 * KIB, 512, MIB] {
        let last_full = ODD / g * g;
        let writes = [
            (0, 1),                            // the first byte
            (ODD - 1, 1),                      // the last byte of the odd-sized disk
            (g - 1, 2),                        // two bytes across the first block boundary
            (5 * g, g),                        // exactly one aligned block
            (9 * g + 1, g - 2),                // inside one block, touching neither edge
            ((last_full - 3).min(ODD - 4), 4), // across the last full block into the partial one
            (17 * g + 7, 3 * g + 5),
            (ODD / 2, 1),
        ];
        check("edge-case writes", ODD, g, &writes);
    }
}

#[test]
fn a_misaligned_workload_matches_qemu() {
    if !qemu_available() {
        return;
    }
    // The legacy-misaligned profile's writes (63-sector partition offset, 512 B-68 KiB).
    let size = 64 * MIB;
    let mut w = workloads::profile("legacy-misaligned", size, 11, 0).unwrap();
    let writes: Vec<(u64, u64)> = std::iter::from_fn(|| Some(w.next_op()))
        .filter_map(|op| match op {
            IoOp::Write { offset, len, .. } => Some((offset, len)),
            _ => None,
        })
        .take(1500)
        .collect();
    for g in [64 * KIB, 4 * KIB] {
        check("legacy-misaligned writes", size, g, &writes);
    }
}

/// A small synthetic MSR Cambridge trace: cbtsim replays the file through its parser,
/// QEMU gets the same writes.
#[test]
fn a_trace_replay_matches_qemu() {
    if !qemu_available() {
        return;
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let mut text = String::from("Timestamp,Hostname,DiskNumber,Type,Offset,Size,ResponseTime\n");
    let mut t = 128_166_372_000_000_000u64;
    for i in 0..400 {
        t += rng.gen_range(1..100_000);
        let kind = if i % 3 == 2 { "Read" } else { "Write" };
        let off = 512 * rng.gen_range(0..(200 * MIB / 512));
        let len = 512 * rng.gen_range(1..=256u64);
        text.push_str(&format!(
            "{t},src1,{},{kind},{off},{len},{}\n",
            i % 2,
            rng.gen_range(100..9999)
        ));
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("src1.csv");
    std::fs::write(&path, &text).unwrap();
    let records: Vec<_> = TraceReader::open(&path, TraceFormat::Msr)
        .unwrap()
        .device("src1_1")
        .collect::<Result<_, _>>()
        .unwrap();
    let writes: Vec<(u64, u64)> = records
        .iter()
        .filter(|r| r.kind == workloads::TraceOpKind::Write)
        .map(|r| (r.offset, r.len))
        .collect();
    assert!(writes.len() > 100);
    for g in [64 * KIB, 4 * KIB] {
        let mut o = opts(g);
        o.device = Some("src1_1".into());
        let r = replay_trace(Path::new(&path), TraceFormat::Msr, &o, &()).unwrap();
        assert_eq!(r.writes, writes.len() as u64);
        let qemu = qemu_dirty(r.disk_size, g, &writes);
        assert_eq!(r.changed_areas, qemu, "trace replay, granularity {g}: cbtsim vs QEMU");
    }
}
