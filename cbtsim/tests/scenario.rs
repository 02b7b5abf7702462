//! Scenarios and guest workloads: the shipped examples parse and run, every check finds
//! no missed block, and the commands (`run`, `guest run`, `workloads list`) print what
//! the issue specifies and fail with one line naming the file, line and key.

use std::path::{Path, PathBuf};
use std::process::Command;

use harness::drive::Limit;
use harness::scenario::{run, Scenario, ScenarioError};
use sim::{DiskSpec, Host};
use tracker::Granularity;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

fn spec(capacity: u64, granularity: u64) -> DiskSpec {
    DiskSpec {
        capacity,
        granularity: Granularity::new(granularity).unwrap(),
    }
}

/// A host in a fresh temporary directory.
fn host() -> (tempfile::TempDir, Host) {
    let dir = tempfile::tempdir().unwrap();
    let host = Host::open(dir.path()).unwrap();
    (dir, host)
}

fn scenarios_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios")
}

fn cbtsim(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_cbtsim")).args(args).output().unwrap()
}

#[test]
fn every_shipped_scenario_parses() {
    let mut seen = Vec::new();
    for e in std::fs::read_dir(scenarios_dir()).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "toml") {
            let s = Scenario::load(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            assert!(!s.vms.is_empty());
            seen.push((p.file_stem().unwrap().to_string_lossy().into_owned(), s.vms.len()));
        }
    }
    seen.sort();
    assert!(seen.contains(&("teaching".into(), 1)), "{seen:?}");
    assert!(seen.contains(&("host-32".into(), 32)), "{seen:?}");
}

#[test]
fn the_teaching_scenario_runs_clean() {
    let mut s = Scenario::load(&scenarios_dir().join("teaching.toml")).unwrap();
    // Guest flushes msync the datastore: slow on a busy machine, and they change nothing
    // the tracker sees.
    s.vms[0].plan.apply_flush = false;
    let (_dir, host) = host();
    let r = run(&s, host.root(), &|_| &()).unwrap();
    assert_eq!(r.counts.ops, 20_000);
    assert_eq!(r.missed_blocks, 0);
    assert_eq!(r.epochs_checked, 4);
    assert!(r.over_report_ratio >= 1.0);
}

#[test]
fn a_host_of_vms_with_several_disks_and_threads_misses_nothing() {
    let text = r#"
        name = "mixed"
        seed = 5
        ops = 6000
        snapshot_every = 1500
        flush = false

        [[vm]]
        name = "web"
        count = 2
        profile = "file-server"
        threads = 2
        disk_size = "64M"
        granularity = "4K"

        [[vm]]
        name = "db"
        profile = "oltp-db"
        threads = 2
        [[vm.disk]]
        size = "96M"
        [[vm.disk]]
        size = 33555968            # 32 MiB + 3 sectors
        granularity = "16K"
        profile = "edge-cases"
        threads = 1
    "#;
    let s = Scenario::parse(text, "mixed.toml").unwrap();
    assert_eq!(s.vms.len(), 3);
    assert_eq!(s.threads(), 2 + 2 + 3);
    let (_dir, host) = host();
    let r = run(&s, host.root(), &|_| &()).unwrap();
    assert_eq!(r.vm_count, 3);
    assert_eq!(r.counts.ops, 3 * 6000);
    assert_eq!(r.missed_blocks, 0);
    assert_eq!(r.write_latency.count, r.counts.writes);
    let db = r.vms.iter().find(|v| v.vm == "db").unwrap();
    assert_eq!(db.disks.len(), 2);
    assert_eq!(db.disks[1].granularity, 16 * KIB);
    assert_eq!(db.disks[0].counts.ops + db.disks[1].counts.ops, 6000);
    for v in &r.vms {
        for d in &v.disks {
            // 6000 ops in epochs of 1500, each checked, plus the cumulative check.
            let ops: Vec<u64> = d.epochs.iter().map(|e| e.ops).collect();
            assert_eq!(ops, vec![1500; 4], "{} disk {}", v.vm, d.disk);
            for e in &d.epochs {
                assert_eq!(e.check.missed_blocks, 0);
                assert!(e.check.share_of_disk > 0.0 && e.check.share_of_disk <= 1.0);
                assert!(e.check.changed_bytes >= e.check.true_changed_bytes);
            }
            let c = d.cumulative.unwrap();
            assert_eq!(c.missed_blocks, 0);
            assert!(c.true_changed_bytes > 0);
        }
    }
    // The VMs stay in the datastore, their drive snapshots removed.
    for v in ["web-01", "web-02", "db"] {
        assert!(host.vm(v).unwrap().snapshots().is_empty());
    }
}

#[test]
fn a_timed_scenario_stops_on_time() {
    let s = Scenario::parse(
        "seconds = 0.5\nsnapshot_every = 500\n[[vm]]\nname = \"v\"\nprofile = \"cloud-mixed\"\nthreads = 3\ndisk_size = \"32M\"\n",
        "t.toml",
    )
    .unwrap();
    assert!(matches!(s.vms[0].plan.limit, Limit::Time(_)));
    let (_dir, host) = host();
    let r = run(&s, host.root(), &|_| &()).unwrap();
    assert!(r.counts.ops > 0);
    assert!(r.elapsed_s >= 0.5 && r.elapsed_s < 30.0, "{}", r.elapsed_s);
    assert_eq!(r.missed_blocks, 0);
}

#[test]
fn a_vm_name_taken_in_the_datastore_fails_cleanly() {
    let (_dir, host) = host();
    host.create_vm("v", &[spec(16 * MIB, 65536)]).unwrap();
    let s = Scenario::parse(
        "ops = 10\n[[vm]]\nname = \"v\"\nprofile = \"vdi\"\ndisk_size = \"16M\"\n",
        "s.toml",
    )
    .unwrap();
    let e = run(&s, host.root(), &|_| &()).unwrap_err();
    assert!(matches!(e, ScenarioError::Sim(_)), "{e}");
}

#[test]
fn cli_run_prints_json_and_names_the_key_of_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        "ops = 2000\nsnapshot_every = 1000\n[[vm]]\nname = \"a\"\nprofile = \"log-append\"\ndisk_size = \"16M\"\n",
    )
    .unwrap();
    let out = cbtsim(&["run", good.to_str().unwrap(), "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["counts"]["ops"], 2000);
    assert_eq!(v["missed_blocks"], 0);
    let epoch = &v["vms"][0]["disks"][0]["epochs"][1];
    assert_eq!(epoch["epoch"], 2);
    for k in ["changed_bytes", "share_of_disk", "over_report_ratio", "missed_blocks"] {
        assert!(epoch.get(k).is_some(), "{k} in {epoch}");
    }
    for k in ["p50_us", "p99_us", "p999_us"] {
        assert!(v["write_latency"][k].as_f64().unwrap() > 0.0);
    }

    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "ops = 2000\n\n[[vm]]\nname = \"a\"\nprofile = \"log-append\"\ndisk_size = \"16M\"\nthreds = 2\n",
    )
    .unwrap();
    let out = cbtsim(&["run", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with(&format!(
            "cbtsim: error: {}:7: key 'threds': unknown field",
            bad.display()
        )),
        "{err}"
    );

    std::fs::write(
        &bad,
        "ops = 2000\nbackup_every = -5\n[[vm]]\nname = \"a\"\nprofile = \"vdi\"\ndisk_size = \"16M\"\n",
    )
    .unwrap();
    let out = cbtsim(&["run", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(":2: key 'backup_every': must be at least 1, found -5"),
        "{err}"
    );
}

#[test]
fn scheduled_backups_restore_to_the_disks_exactly() {
    // Backups run while the guests write; the last incremental of each chain, restored,
    // must equal the disk byte for byte.
    let text = r#"
        ops = 6000
        snapshot_every = 1000
        backup_every = 2000
        flush = false

        [[vm]]
        name = "db"
        profile = "oltp-db"
        threads = 2
        disk_size = "32M"
        granularity = "4K"

        [[vm]]
        name = "edge"
        profile = "edge-cases"
        disk_size = 16778752       # 16 MiB + 3 sectors
    "#;
    let s = Scenario::parse(text, "b.toml").unwrap();
    let (_dir, host) = host();
    let r = run(&s, host.root(), &|_| &()).unwrap();
    assert_eq!(r.missed_blocks, 0);
    for v in &r.vms {
        assert_eq!(v.backups.len(), 3, "{}: a backup after ops 2000, 4000, 6000", v.vm);
        assert_eq!(v.backups[0].kind, "full");
        assert_eq!(v.backups[1].kind, "incremental");
    }
    assert_eq!(r.backups, 2 * 4);
    assert_eq!(r.backup_checks.len(), 2);
    for c in &r.backup_checks {
        assert_eq!(c.backup.kind, "incremental");
        assert!(c.compared_bytes >= 16 << 20);
        assert_eq!(c.mismatched_bytes, 0, "{}", c.vm);
    }
    assert_eq!(r.backup_mismatched_bytes, 0);
    assert!(host.root().join(".backups").is_dir());
}

#[test]
fn cli_guest_run_drives_a_datastore_vm() {
    let (dir, host) = host();
    host.create_vm("app", &[spec(64 * MIB, 65536)]).unwrap();
    drop(host); // release the VM's lock for the command
    let ds = dir.path().to_str().unwrap();
    let out = cbtsim(&[
        "--datastore",
        ds,
        "guest",
        "run",
        "app",
        "--profile",
        "oltp-db",
        "--ops",
        "3000",
        "--threads",
        "2",
        "--json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ops"], 3000);
    assert_eq!(
        (v["state"].as_str(), v["threads"].as_u64()),
        (Some("finished"), Some(2))
    );
    assert_eq!(v["epochs_checked"], 0, "no verification: no snapshots taken");

    let out = cbtsim(&[
        "--datastore",
        ds,
        "guest",
        "run",
        "app",
        "--profile",
        "vdi",
        "--ops",
        "3000",
        "--seed",
        "9",
        "--verify",
        "--snapshot-every",
        "1000",
        "--json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["missed_blocks"], 0);
    // Three epochs of 1000 ops and the cumulative check since the first snapshot.
    assert_eq!(v["epochs_checked"], 4);
    let snaps = cbtsim(&["--datastore", ds, "snapshot", "list", "app", "--json"]);
    assert_eq!(
        String::from_utf8_lossy(&snaps.stdout).trim(),
        "[]",
        "the verifier's snapshots are removed"
    );

    let out = cbtsim(&["--datastore", ds, "guest", "run", "app", "--profile", "nope"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no workload profile \"nope\""), "{err}");
    let out = cbtsim(&["--datastore", ds, "guest", "run", "ghost", "--profile", "vdi"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no VM named \"ghost\""));
}

#[test]
fn cli_workloads_list_names_every_profile() {
    let out = cbtsim(&["workloads", "list", "--json"]);
    assert!(out.status.success());
    let v: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = v.iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "os-idle",
            "oltp-db",
            "file-server",
            "vdi",
            "log-append",
            "legacy-misaligned",
            "cloud-mixed",
            "edge-cases"
        ]
    );
    let out = cbtsim(&["workloads", "list"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("oltp-db"));
}
