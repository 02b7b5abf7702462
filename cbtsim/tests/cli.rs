//! The `cbtsim` command line, run as a real process: the issue's scripted
//! flow with its `--json` outputs, and bad input (one-line errors, non-zero
//! exit, the datastore unchanged).

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

mod common;
use common::{json, ok, run_in};

const MIB: u64 = 1 << 20;

/// Everything a failed command could have changed: the VM's configuration
/// and the names of the datastore's files.
fn state(ds: &Path) -> (Vec<u8>, Vec<PathBuf>) {
    fn walk(p: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(p).unwrap().flatten() {
            let path = e.path();
            if path.is_dir() {
                walk(&path, out);
            }
            out.push(path);
        }
    }
    let mut files = Vec::new();
    walk(ds, &mut files);
    files.sort();
    (std::fs::read(ds.join("web01/vm.json")).unwrap(), files)
}

/// Runs a command that must fail: one line naming what was wrong (containing
/// `needle`), a non-zero exit, and the datastore unchanged.
fn fails(ds: &Path, args: &[&str], needle: &str) {
    let before = state(ds);
    let out = run_in(ds, args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "cbtsim {args:?} succeeded");
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "cbtsim {args:?}: one line, got {err:?}"
    );
    assert!(err.starts_with("cbtsim: error: "), "{err}");
    assert!(
        err.contains(needle),
        "cbtsim {args:?}: {err:?} should mention {needle:?}"
    );
    assert!(
        out.stdout.is_empty(),
        "cbtsim {args:?} printed {:?}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(state(ds) == before, "cbtsim {args:?} changed the datastore");
}

fn areas(v: &Value) -> Vec<(u64, u64)> {
    v["changed_areas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| (a[0].as_u64().unwrap(), a[1].as_u64().unwrap()))
        .collect()
}

fn change_ids(v: &Value) -> Vec<String> {
    v["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["change_id"].as_str().unwrap().to_owned())
        .collect()
}

/// A datastore with VM web01: disk 0 of 64 MiB, disk 1 of 2 TiB.
fn datastore() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    ok(
        d.path(),
        &[
            "vm",
            "create",
            "web01",
            "--disk",
            "64M",
            "--disk",
            "2T",
            "--granularity",
            "64K",
        ],
    );
    d
}

#[test]
fn the_scripted_flow_of_the_issue() {
    let d = datastore();
    let ds = d.path();
    let list = json(ds, &["vm", "list", "--json"]);
    assert_eq!(list[0]["name"], "web01");
    assert_eq!(list[0]["disks"], serde_json::json!([64 * MIB, 2u64 << 40]));
    assert_eq!(
        (list[0]["cbt"].as_bool(), list[0]["powered_on"].as_bool()),
        (Some(true), Some(true))
    );

    ok(ds, &["disk", "write", "web01", "0", "0", "1M"]);
    let from = ds.join("data.bin");
    let payload: Vec<u8> = (0..64 * 1024u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&from, &payload).unwrap();
    ok(
        ds,
        &[
            "disk",
            "write",
            "web01",
            "1",
            "1T",
            "64K",
            "--from",
            from.to_str().unwrap(),
        ],
    );

    let s1 = json(ds, &["snapshot", "create", "web01", "s1", "--json"]);
    assert_eq!(s1["snapshot"], "s1");
    assert_eq!(s1["disks"][1]["disk"], 1);
    let c1 = change_ids(&s1);
    let q = json(
        ds,
        &[
            "query",
            "web01",
            "--snapshot",
            "s1",
            "--disk",
            "0",
            "--since",
            "*",
            "--json",
        ],
    );
    assert_eq!(areas(&q), vec![(0, MIB)]);
    assert_eq!(q["changed_bytes"], MIB);
    assert_eq!(
        (q["disk_size"].as_u64(), q["granularity"].as_u64()),
        (Some(64 * MIB), Some(65536))
    );
    assert_eq!(
        (q["since"].as_str(), q["change_id"].as_str()),
        (Some("*"), Some(c1[0].as_str()))
    );
    let q = json(
        ds,
        &[
            "query",
            "web01",
            "--snapshot",
            "s1",
            "--disk",
            "1",
            "--since",
            "*",
            "--json",
        ],
    );
    assert_eq!(areas(&q), vec![(1 << 40, 65536)], "paged through the whole 2 TiB disk");

    ok(ds, &["disk", "write", "web01", "0", "10M", "4K", "--pattern", "0x5a"]);
    ok(ds, &["disk", "unmap", "web01", "0", "0", "64K"]);
    ok(ds, &["disk", "extend", "web01", "0", "200M"]);
    ok(ds, &["disk", "write", "web01", "0", "150M", "512", "--pattern", "7"]);
    let c2 = change_ids(&json(ds, &["snapshot", "create", "web01", "s2", "--json"]));
    let q = json(
        ds,
        &[
            "query",
            "web01",
            "--snapshot",
            "s2",
            "--disk",
            "0",
            "--since",
            &c1[0],
            "--json",
        ],
    );
    assert_eq!(areas(&q), vec![(0, 65536), (10 * MIB, 65536), (150 * MIB, 65536)]);
    assert_eq!(q["disk_size"], 200 * MIB);
    let q = json(
        ds,
        &[
            "query",
            "web01",
            "--snapshot",
            "s2",
            "--disk",
            "1",
            "--since",
            &c1[1],
            "--json",
        ],
    );
    assert!(areas(&q).is_empty());

    // Reads, from a snapshot and from the live disk.
    let out = ds.join("out.bin");
    let o = out.to_str().unwrap();
    ok(
        ds,
        &[
            "disk",
            "read",
            "web01",
            "0",
            "10M",
            "4K",
            "--out",
            o,
            "--snapshot",
            "s2",
        ],
    );
    assert_eq!(std::fs::read(&out).unwrap(), vec![0x5a; 4096]);
    ok(
        ds,
        &["disk", "read", "web01", "0", "0", "4K", "--out", o, "--snapshot", "s1"],
    );
    assert_eq!(
        std::fs::read(&out).unwrap(),
        vec![0xab; 4096],
        "the default pattern, frozen in s1"
    );
    ok(ds, &["disk", "read", "web01", "0", "0", "4K", "--out", o]);
    assert_eq!(std::fs::read(&out).unwrap(), vec![0; 4096], "unmapped on the live disk");
    ok(ds, &["disk", "read", "web01", "1", "1T", "64K", "--out", o]);
    assert_eq!(std::fs::read(&out).unwrap(), payload);

    let snaps = json(ds, &["snapshot", "list", "web01", "--json"]);
    assert_eq!(snaps.as_array().unwrap().len(), 2);
    assert_eq!(snaps[1]["disks"][0]["change_id"].as_str(), Some(c2[0].as_str()));

    // The backup flow: remove the old snapshot, its change ID still answers.
    ok(ds, &["snapshot", "remove", "web01", "s1"]);
    let q = json(ds, &["query", "web01", "--snapshot", "s2", "--since", &c1[0], "--json"]);
    assert_eq!(areas(&q).len(), 3);

    // Power off: guest I/O refused; on again.
    ok(ds, &["vm", "power", "web01", "off"]);
    fails(ds, &["disk", "write", "web01", "0", "0", "1"], "powered off");
    ok(ds, &["vm", "power", "web01", "on"]);
    ok(ds, &["disk", "write", "web01", "0", "0", "1"]);

    // Revert to s2, then a new snapshot: c2 answers with what the revert changed back.
    ok(ds, &["snapshot", "revert", "web01", "s2"]);
    ok(ds, &["snapshot", "create", "web01", "s3"]);
    let q = json(ds, &["query", "web01", "--snapshot", "s3", "--since", &c2[0], "--json"]);
    assert_eq!(areas(&q), vec![(0, 65536)]);

    // CBT off and on: a new session; the old change IDs fail, typed and in one line.
    ok(ds, &["vm", "cbt", "web01", "off"]);
    fails(
        ds,
        &["query", "web01", "--snapshot", "s3", "--since", &c2[0]],
        "not enabled",
    );
    ok(ds, &["vm", "cbt", "web01", "on"]);
    fails(
        ds,
        &["query", "web01", "--snapshot", "s3", "--since", &c2[0]],
        "tracking reset",
    );
    let s4 = json(ds, &["snapshot", "create", "web01", "s4", "--json"]);
    assert_ne!(change_ids(&s4)[0].split('/').next(), c2[0].split('/').next());

    // Human-readable output works too.
    assert!(ok(ds, &["vm", "list"]).contains("web01"));
    assert!(ok(ds, &["snapshot", "list", "web01"]).contains("s4"));
    let h = ok(ds, &["query", "web01", "--snapshot", "s2", "--since", "*"]);
    assert!(h.contains("area(s)"), "{h}");
    assert!(ok(ds, &["snapshot", "create", "web01", "s5"]).contains("change ID"));

    // The datastore can come from the environment.
    let out = Command::new(env!("CARGO_BIN_EXE_cbtsim"))
        .env("CBTSIM_DATASTORE", ds)
        .args(["vm", "list", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["snapshots"], serde_json::json!(["s2", "s3", "s4", "s5"]));
}

#[test]
fn bad_input_gives_one_line_and_changes_nothing() {
    let d = datastore();
    let ds = d.path();
    ok(ds, &["disk", "write", "web01", "0", "0", "1M"]);
    let c1 = change_ids(&json(ds, &["snapshot", "create", "web01", "s1", "--json"]));
    let cid = c1[0].as_str();

    // Unknown VM, snapshot, disk.
    fails(
        ds,
        &["disk", "write", "nosuch", "0", "0", "4K"],
        "no VM named \"nosuch\"",
    );
    fails(ds, &["snapshot", "create", "nosuch", "s9"], "no VM named");
    fails(ds, &["vm", "cbt", "nosuch", "off"], "no VM named");
    fails(
        ds,
        &["query", "web01", "--snapshot", "nosuch", "--since", "*"],
        "no snapshot named \"nosuch\"",
    );
    fails(ds, &["snapshot", "remove", "web01", "nosuch"], "no snapshot named");
    fails(ds, &["snapshot", "revert", "web01", "nosuch"], "no snapshot named");
    let out = ds.join("out.bin");
    let o = out.to_str().unwrap();
    fails(
        ds,
        &[
            "disk",
            "read",
            "web01",
            "0",
            "0",
            "4K",
            "--out",
            o,
            "--snapshot",
            "nosuch",
        ],
        "no snapshot",
    );
    fails(ds, &["disk", "write", "web01", "5", "0", "4K"], "has no disk 5");
    fails(ds, &["disk", "write", "web01", "x", "0", "4K"], "invalid DISK");
    fails(
        ds,
        &["query", "web01", "--snapshot", "s1", "--disk", "2", "--since", "*"],
        "has no disk 2",
    );

    // Malformed sizes and values.
    fails(ds, &["disk", "write", "web01", "0", "12Q", "4K"], "invalid OFFSET");
    fails(ds, &["disk", "write", "web01", "0", "0", "1.5K"], "invalid LENGTH");
    fails(ds, &["disk", "extend", "web01", "0", "lots"], "invalid NEWSIZE");
    fails(ds, &["disk", "extend", "web01", "0", "100000001"], "512-byte sectors");
    fails(
        ds,
        &["disk", "write", "web01", "0", "0", "4K", "--pattern", "300"],
        "invalid --pattern",
    );
    fails(ds, &["vm", "create", "web02", "--disk", "10X"], "invalid --disk");
    fails(
        ds,
        &["vm", "create", "web02", "--disk", "1G", "--granularity", "3K"],
        "granularity",
    );
    fails(
        ds,
        &["vm", "create", "web02", "--disk", "65T"],
        "to 70368744177664 (64 TiB)",
    );
    fails(ds, &["vm", "create", "web02", "--disk", "512"], "from 1048576 (1 MiB)");
    fails(ds, &["vm", "create", "bad/name", "--disk", "1G"], "invalid name");
    fails(ds, &["vm", "create", "web01", "--disk", "1G"], "already exists");
    fails(
        ds,
        &["snapshot", "create", "web01", "s1"],
        "already has a snapshot named",
    );
    fails(ds, &["snapshot", "create", "web01", "bad name"], "invalid name");

    // Malformed and foreign change IDs.
    fails(
        ds,
        &["query", "web01", "--snapshot", "s1", "--since", "garbage"],
        "malformed change ID",
    );
    let bad_seq = format!("{}/x", cid.split('/').next().unwrap());
    fails(
        ds,
        &["query", "web01", "--snapshot", "s1", "--since", &bad_seq],
        "malformed change ID",
    );
    let foreign = "5f0c3f5e-3f2a-4d4b-9d7e-0a1b2c3d4e5f/1";
    fails(
        ds,
        &["query", "web01", "--snapshot", "s1", "--since", foreign],
        "not issued",
    );

    // Offsets past the end (disk 0 is 64 MiB).
    fails(ds, &["disk", "write", "web01", "0", "64M", "1"], "outside disk 0");
    fails(ds, &["disk", "write", "web01", "0", "63M", "2M"], "outside disk 0");
    fails(
        ds,
        &["disk", "write", "web01", "0", "18446744073709551615", "2"],
        "outside disk 0",
    );
    fails(ds, &["disk", "unmap", "web01", "0", "64M", "512"], "outside disk 0");
    fails(
        ds,
        &["disk", "read", "web01", "0", "63M", "2M", "--out", o],
        "outside disk 0",
    );
    fails(ds, &["disk", "extend", "web01", "0", "32M"], "cannot shrink");

    // A failed read leaves an existing output file as it was; a short --from writes nothing.
    std::fs::write(&out, b"keep").unwrap();
    fails(ds, &["disk", "read", "web01", "0", "63M", "2M", "--out", o], "outside");
    assert_eq!(std::fs::read(&out).unwrap(), b"keep");
    fails(
        ds,
        &["disk", "write", "web01", "0", "0", "1M", "--from", o],
        "fewer than the 1048576 to write",
    );
    let missing = ds.join("nowhere/out.bin");
    fails(
        ds,
        &[
            "disk",
            "read",
            "web01",
            "0",
            "0",
            "4K",
            "--out",
            missing.to_str().unwrap(),
        ],
        "nowhere",
    );
    fails(
        ds,
        &[
            "disk",
            "write",
            "web01",
            "0",
            "0",
            "4K",
            "--from",
            missing.to_str().unwrap(),
        ],
        "nowhere",
    );

    // A datastore that does not exist is not created by a command that needs one.
    let none = ds.join("no-such-datastore");
    let out2 = run_in(&none, &["vm", "list"]);
    assert!(!out2.status.success());
    assert!(String::from_utf8_lossy(&out2.stderr).contains("does not exist"));
    assert!(!none.exists());
    let out3 = Command::new(env!("CARGO_BIN_EXE_cbtsim"))
        .env_remove("CBTSIM_DATASTORE")
        .args(["vm", "list"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out3.stderr).contains("no datastore"));
    assert!(!out3.status.success());

    // After all of that, the VM still answers as before.
    ok(ds, &["snapshot", "create", "web01", "s2"]);
    let q = json(ds, &["query", "web01", "--snapshot", "s2", "--since", cid, "--json"]);
    assert!(areas(&q).is_empty(), "no failed command wrote anything: {q}");
    assert!(!ds.join("web02").exists());
}

#[test]
fn verify_json_is_one_document_and_reproducible_single_threaded() {
    let d = tempfile::tempdir().unwrap();
    let args = [
        "verify",
        "--threads",
        "1",
        "--seed",
        "11",
        "--ops",
        "25",
        "--disk-size",
        "4M",
        "--json",
    ];
    let a = json(d.path(), &args);
    let b = json(d.path(), &args);
    for k in [
        "ops",
        "snapshots",
        "checks",
        "missed_blocks",
        "extra_bytes",
        "writes",
        "expected_errors",
        "op_counts",
    ] {
        assert_eq!(a[k], b[k], "{k} differs between two runs with the same seed");
    }
    assert_eq!(a["ops"], 25);
    assert_eq!(a["missed_blocks"], 0);
    assert!(a["seconds"].as_f64().is_some());
    let out = run_in(d.path(), &["verify", "--disk-size", "3Q"]);
    assert!(!out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stderr).trim_end().lines().count(), 1);
}

#[test]
fn two_processes_on_one_vm_get_vm_in_use() {
    let d = tempfile::tempdir().unwrap();
    let host = sim::Host::open(d.path()).unwrap();
    let spec = sim::DiskSpec {
        capacity: 4 * MIB,
        granularity: tracker::Granularity::DEFAULT,
    };
    let vm = host.create_vm("vm", &[spec]).unwrap();
    vm.write(0, 0, &[1; 10]).unwrap();
    let json = std::fs::read(d.path().join("vm/vm.json")).unwrap();
    // Another process.
    let out = Command::new(env!("CARGO_BIN_EXE_cbtsim"))
        .arg("--datastore")
        .arg(d.path())
        .args(["disk", "write", "vm", "0", "0", "4K"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("VM \"vm\" is in use"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    // Another host in this process (another open of the lock file) too.
    let other = sim::Host::open(d.path()).unwrap();
    assert!(matches!(other.vm("vm"), Err(sim::SimError::VmInUse(_))));
    assert_eq!(
        std::fs::read(d.path().join("vm/vm.json")).unwrap(),
        json,
        "nothing changed"
    );
    let mut b = [0u8; 10];
    vm.read(0, 0, &mut b).unwrap();
    assert_eq!(b, [1; 10]);
    // Once this process lets go, the other can open it.
    drop(vm);
    drop(host);
    assert!(other.vm("vm").is_ok());
}

/// Every command that prints has --json, one document; times are ISO 8601; counts of one
/// byte are singular; new read-only views: vm show, disk list, snapshot show.
#[test]
fn every_printing_command_has_json_and_iso_times() {
    let d = datastore();
    let ds = d.path();
    let v = json(ds, &["vm", "create", "web02", "--disk", "1M", "--json"]);
    assert_eq!(
        (v["vm"].as_str(), v["disks"][0]["capacity"].as_u64()),
        (Some("web02"), Some(MIB))
    );
    let w = json(ds, &["disk", "write", "web01", "0", "0", "1", "--json"]);
    assert_eq!((w["op"].as_str(), w["length"].as_u64()), (Some("write"), Some(1)));
    assert!(ok(ds, &["disk", "write", "web01", "0", "0", "1"]).starts_with("wrote 1 byte at"));
    let u = json(ds, &["disk", "unmap", "web01", "0", "0", "512", "--json"]);
    assert_eq!(u["op"], "unmap");
    let e = json(ds, &["disk", "extend", "web01", "0", "128M", "--json"]);
    assert_eq!(
        (e["capacity"].as_u64(), e["length"].as_u64()),
        (Some(128 * MIB), Some(64 * MIB))
    );
    let c = json(ds, &["vm", "cbt", "web01", "on", "--json"]);
    assert_eq!(
        (c["cbt"].as_bool(), c["change_ids_invalidated"].as_bool()),
        (Some(true), Some(false))
    );
    let p = json(ds, &["vm", "power", "web01", "off", "--json"]);
    assert_eq!(p["powered_on"], false);
    json(ds, &["vm", "power", "web01", "on", "--json"]);
    json(ds, &["snapshot", "create", "web01", "s1", "--json"]);
    json(ds, &["snapshot", "create", "web01", "s2", "--json"]);
    let list = json(ds, &["snapshot", "list", "web01", "--json"]);
    let iso = list[0]["created_utc"].as_str().unwrap().to_owned();
    assert!(
        iso.len() == 20 && iso.ends_with('Z') && iso.as_bytes()[10] == b'T',
        "{iso}"
    );
    let text = ok(ds, &["snapshot", "list", "web01"]);
    assert!(
        text.contains(&format!("(created {iso})")),
        "human output in ISO 8601: {text}"
    );
    let show = json(ds, &["snapshot", "show", "web01", "s2", "--json"]);
    assert_eq!(show["name"], "s2");
    assert_eq!(show["disks"][0]["capacity"], 128 * MIB);
    fails(ds, &["snapshot", "show", "web01", "nosuch"], "no snapshot named");
    let vm = json(ds, &["vm", "show", "web01", "--json"]);
    assert_eq!(vm["disks"][1]["capacity"], 2u64 << 40);
    assert_eq!(vm["disks"][0]["granularity"], 65536);
    assert_eq!(vm["disks"][0]["layers"], 3, "the base and a delta per snapshot");
    assert_eq!(
        vm["disks"][0]["change_id"], show["disks"][0]["change_id"],
        "the newest snapshot's"
    );
    assert_eq!(vm["consolidation_needed"], false);
    assert_eq!(vm["snapshots"].as_array().unwrap().len(), 2);
    assert!(ok(ds, &["vm", "show", "web01"]).contains("consolidation: none pending"));
    let c = json(ds, &["vm", "consolidate", "web01", "--json"]);
    assert_eq!(
        (
            c["was_needed"].clone(),
            c["merged_layers"].clone(),
            c["still_needed"].clone()
        ),
        (false.into(), 0.into(), false.into())
    );
    assert!(ok(ds, &["vm", "consolidate", "web01"]).contains("no consolidation was needed"));
    fails(ds, &["vm", "consolidate", "nosuch"], "nosuch");
    let disks = json(ds, &["disk", "list", "web01", "--json"]);
    assert_eq!(disks.as_array().unwrap().len(), 2);
    assert!(ok(ds, &["disk", "list", "web01"]).contains("CURRENT CHANGE ID"));
    let r = json(ds, &["snapshot", "remove", "web01", "s1", "--json"]);
    assert_eq!(
        (r["done"].as_str(), r["snapshots"].clone()),
        (Some("removed"), serde_json::json!(["s2"]))
    );
    let r = json(ds, &["snapshot", "revert", "web01", "s2", "--json"]);
    assert_eq!(r["done"], "reverted");
    let out = ds.join("r.bin");
    let rd = json(
        ds,
        &[
            "disk",
            "read",
            "web01",
            "0",
            "0",
            "1",
            "--out",
            out.to_str().unwrap(),
            "--json",
        ],
    );
    assert_eq!((rd["op"].as_str(), rd["length"].as_u64()), (Some("read"), Some(1)));
}

/// `disk read --out` leaves holes where the disk reads zeros.
#[test]
fn disk_read_writes_a_sparse_file() {
    use std::os::unix::fs::MetadataExt;
    let d = datastore();
    let ds = d.path();
    ok(ds, &["disk", "write", "web01", "0", "8M", "64K", "--pattern", "9"]);
    let out = ds.join("img");
    ok(
        ds,
        &["disk", "read", "web01", "0", "0", "64M", "--out", out.to_str().unwrap()],
    );
    let m = std::fs::metadata(&out).unwrap();
    assert_eq!(m.len(), 64 * MIB);
    assert!(
        m.blocks() * 512 <= 1 << 20,
        "{} bytes allocated for 64 KiB of data",
        m.blocks() * 512
    );
    let data = std::fs::read(&out).unwrap();
    assert!(data[8 << 20..(8 << 20) + 65536].iter().all(|&b| b == 9));
    assert_eq!(data.iter().filter(|&&b| b != 0).count(), 65536);
}

/// The same bounds for --threads, --ops and --seconds in guest run and verify (and
/// scenario files); scenarios ship in the binary.
#[test]
fn run_limits_agree_and_scenarios_are_built_in() {
    let d = datastore();
    let ds = d.path();
    for (args, needle) in [
        (&["verify", "--threads", "0"][..], "invalid --threads 0: give 1 to 256"),
        (
            &["verify", "--threads", "300"][..],
            "invalid --threads 300: give 1 to 256",
        ),
        (&["verify", "--ops", "0"][..], "invalid --ops 0: give at least 1"),
        (
            &["verify", "--seconds", "0"][..],
            "invalid --seconds 0: give more than 0",
        ),
        (
            &["guest", "run", "web01", "--profile", "oltp-db", "--threads", "0"][..],
            "invalid --threads 0: give 1 to 256",
        ),
        (
            &["guest", "run", "web01", "--profile", "oltp-db", "--ops", "0"][..],
            "invalid --ops 0: give at least 1",
        ),
        (
            &["guest", "run", "web01", "--profile", "oltp-db", "--seconds", "0"][..],
            "invalid --seconds 0: give more than 0",
        ),
    ] {
        fails(ds, args, needle);
    }
    let scratch = tempfile::tempdir().unwrap();
    let v = json(
        scratch.path(),
        &["verify", "--threads", "1", "--ops", "3", "--disk-size", "4M", "--json"],
    );
    assert_eq!(
        (v["passed"].as_bool(), v["interrupted"].as_bool()),
        (Some(true), Some(false))
    );
    assert_eq!(
        std::fs::read_dir(scratch.path()).unwrap().count(),
        0,
        "its temporary datastore is removed"
    );
    // From a directory without scenarios/: the built-in one.
    let out = Command::new(env!("CARGO_BIN_EXE_cbtsim"))
        .env_remove("CBTSIM_DATASTORE")
        .current_dir(scratch.path())
        .args(["run", "scenarios/teaching.toml", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["missed_blocks"], 0);
    let demo = json(scratch.path(), &["demo", "--json"]);
    assert!(
        demo["full_backup"]["bytes_read"].as_u64().unwrap()
            > demo["incremental_backup"]["bytes_read"].as_u64().unwrap()
    );
    assert_eq!(
        std::fs::read_dir(scratch.path()).unwrap().count(),
        0,
        "demo's datastore went in --datastore and is gone"
    );
}

#[test]
fn vm_delete_removes_the_vm_and_refuses_bad_names() {
    let d = datastore();
    let ds = d.path();
    ok(ds, &["vm", "create", "gone", "--disk", "4M"]);
    let r = json(ds, &["vm", "delete", "gone", "--json"]);
    assert_eq!(r["deleted"], true);
    assert!(!ds.join("gone").exists());
    let names: Vec<Value> = json(ds, &["vm", "list", "--json"]).as_array().unwrap().clone();
    assert_eq!(names.len(), 1);
    fails(ds, &["vm", "delete", "gone"], "no VM named \"gone\"");
    fails(ds, &["vm", "delete", "../web01"], "no VM named");
    assert!(ds.join("web01/vm.json").exists());
}

/// Everything under `dir`: each file's path, length and modification time.
fn mtimes(dir: &Path) -> Vec<(PathBuf, u64, std::time::SystemTime)> {
    fn walk(p: &Path, out: &mut Vec<(PathBuf, u64, std::time::SystemTime)>) {
        for e in std::fs::read_dir(p).unwrap().flatten() {
            let m = e.metadata().unwrap();
            if m.is_dir() {
                walk(&e.path(), out);
            } else {
                out.push((e.path(), m.len(), m.modified().unwrap()));
            }
        }
    }
    let mut v = Vec::new();
    walk(dir, &mut v);
    v.sort();
    v
}

/// Read-only commands write nothing (before: they opened the VM for writing, which
/// rewrote the trackers' headers and sidecars) and do not exclude each other.
#[test]
fn read_only_commands_write_nothing_and_share_the_vm() {
    let d = datastore();
    let ds = d.path();
    ok(ds, &["disk", "write", "web01", "0", "0", "1M"]);
    let c1 = change_ids(&json(ds, &["snapshot", "create", "web01", "s1", "--json"]));
    ok(ds, &["disk", "write", "web01", "0", "4M", "64K"]);
    ok(ds, &["snapshot", "create", "web01", "s2"]);
    let before = mtimes(ds);
    std::thread::sleep(std::time::Duration::from_millis(20));
    let q = json(ds, &["query", "web01", "--snapshot", "s2", "--since", &c1[0], "--json"]);
    assert_eq!(areas(&q), vec![(4 * MIB, 65536)]);
    ok(ds, &["snapshot", "list", "web01"]);
    ok(ds, &["snapshot", "show", "web01", "s1"]);
    ok(ds, &["vm", "show", "web01"]);
    ok(ds, &["disk", "list", "web01"]);
    assert!(
        mtimes(ds) == before,
        "a read-only command changed a file of the datastore"
    );
    // Another reader holding the VM does not keep them out; a writer does.
    let host = sim::Host::open(ds).unwrap();
    let view = host.view("web01").unwrap();
    assert_eq!(view.snapshots().len(), 2);
    let q2 = json(ds, &["query", "web01", "--snapshot", "s2", "--since", &c1[0], "--json"]);
    assert_eq!(q2, q);
    ok(ds, &["snapshot", "list", "web01"]);
    let out = run_in(ds, &["disk", "write", "web01", "0", "0", "1"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("in use"),
        "a writer waits for readers"
    );
    drop(view);
    let _vm = host.vm("web01").unwrap();
    let out = run_in(ds, &["snapshot", "list", "web01"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("in use"),
        "readers wait for a writer"
    );
}

/// Durable (power-loss safe) tracking: set at `vm create` or with `vm
/// durable`, shown by `vm show`; change IDs stay valid across the switch.
#[test]
fn durable_tracking_is_a_vm_setting() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path();
    let v = json(
        ds,
        &["vm", "create", "web01", "--disk", "64M", "--durable-tracking", "--json"],
    );
    assert_eq!(v["durable_tracking"], true);
    assert_eq!(json(ds, &["vm", "show", "web01", "--json"])["durable_tracking"], true);
    assert!(ok(ds, &["vm", "show", "web01"]).contains("durable tracking on"));
    ok(ds, &["disk", "write", "web01", "0", "0", "4096"]);
    let s1 = json(ds, &["snapshot", "create", "web01", "s1", "--json"]);
    let cid = s1["disks"][0]["change_id"].as_str().unwrap().to_owned();
    let d = json(ds, &["vm", "durable", "web01", "off", "--json"]);
    assert_eq!(
        (d["was"].as_bool(), d["durable_tracking"].as_bool()),
        (Some(true), Some(false))
    );
    assert_eq!(json(ds, &["vm", "show", "web01", "--json"])["durable_tracking"], false);
    ok(ds, &["disk", "write", "web01", "0", "1048576", "4096"]);
    ok(ds, &["vm", "durable", "web01", "on"]);
    json(ds, &["snapshot", "create", "web01", "s2", "--json"]);
    let q = json(
        ds,
        &[
            "query",
            "web01",
            "--snapshot",
            "s2",
            "--disk",
            "0",
            "--since",
            &cid,
            "--json",
        ],
    );
    assert_eq!(areas(&q), vec![(MIB, 65536)]);
    assert!(run_in(ds, &["vm", "durable", "web01", "maybe"]).status.code() != Some(0));
}
