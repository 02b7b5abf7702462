//! `cbtsim map` and `cbtsim demo --map`, run as real processes.

use std::process::Command;

use serde_json::Value;

mod common;
use common::{ok, run_in};

const MIB: u64 = 1 << 20;

#[test]
fn map_draws_epochs_and_the_answer_in_every_format() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path();
    ok(ds, &["vm", "create", "db", "--disk", "64M"]);
    ok(ds, &["disk", "write", "db", "0", "0", "1M"]);
    let s1: Value = serde_json::from_str(&ok(ds, &["snapshot", "create", "db", "s1", "--json"])).unwrap();
    let cid = s1["disks"][0]["change_id"].as_str().unwrap().to_owned();
    ok(ds, &["disk", "write", "db", "0", "32M", "1M"]);
    ok(ds, &["snapshot", "create", "db", "s2"]);

    // JSON: the cells, the epochs, the answer.
    let j: Value =
        serde_json::from_str(&ok(ds, &["map", "db", "--snapshot", "s2", "--since", &cid, "--json"])).unwrap();
    assert_eq!(j["at"], "s2");
    assert_eq!(j["geometry"]["cells"], 1024);
    assert_eq!(j["epochs"][0]["from"], "s1");
    assert_eq!(j["epochs"][0]["bytes"], MIB);
    assert_eq!(j["older_bytes"], MIB);
    assert_eq!(j["since"]["bytes"], MIB);
    assert_eq!(j["since"]["cells"].as_array().unwrap().len(), 16);

    // SVG and PNG files, and a summary naming them and the share of the disk.
    let svg = ds.join("db.svg");
    let png = ds.join("db.png");
    let out = ok(
        ds,
        &[
            "map",
            "db",
            "--snapshot",
            "s2",
            "--since",
            &cid,
            "--svg",
            svg.to_str().unwrap(),
            "--png",
            png.to_str().unwrap(),
        ],
    );
    assert!(out.contains("wrote SVG") && out.contains("1.56% of the disk"), "{out}");
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.starts_with("<svg") && text.contains("after s1 until s2"), "{text}");
    assert!(std::fs::read(&png).unwrap().starts_with(b"\x89PNG\r\n\x1a\n"));

    // The terminal: half blocks in 24-bit color, and a legend.
    let out = ok(ds, &["map", "db", "--layout", "hilbert"]);
    assert!(out.contains('▀') && out.contains("\x1b[38;2;"), "{out}");
    assert!(out.contains("after s1 until s2") && out.contains("at now"), "{out}");
    // Drawing now leaves no snapshot behind.
    let list = ok(ds, &["snapshot", "list", "db", "--json"]);
    assert_eq!(list.matches("\"name\"").count(), 2, "{list}");

    // Bad input: a one-line error, non-zero exit.
    for args in [
        &["map", "nope"][..],
        &["map", "db", "--snapshot", "s9"],
        &["map", "db", "--since", "junk"],
        &["map", "db", "--disk", "4"],
        &["map", "db", "--layout", "spiral"],
    ] {
        let out = run_in(ds, args);
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.trim().is_empty(), "{args:?}: no error message");
    }
}

#[test]
fn demo_shows_maps_only_when_asked_or_on_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let plain = ok(dir.path(), &["demo"]);
    assert!(!plain.contains('▀') && !plain.contains("\x1b["), "{plain}");
    let maps = ok(dir.path(), &["demo", "--map"]);
    assert!(maps.contains("VM demo-vm disk 0 at backup-2"), "{maps}");
    assert!(maps.contains("after backup-1 until backup-2"), "{maps}");
    assert!(maps.contains("changed since") && maps.contains('▀'), "{maps}");
    // The narration is the same, maps aside.
    for line in plain
        .lines()
        .filter(|l| !l.contains("change ID") && !l.contains("since ") && !l.contains("datastore at"))
    {
        if line.starts_with("11.") || line.starts_with("12.") || line.starts_with("13.") {
            continue; // point IDs and sizes differ by the maps' snapshots
        }
        assert!(maps.contains(line), "{line:?} missing with --map");
    }
}

#[test]
fn map_goes_through_a_running_serve() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path();
    ok(ds, &["vm", "create", "db", "--disk", "16M"]);
    ok(ds, &["disk", "write", "db", "0", "0", "1M"]);
    ok(ds, &["snapshot", "create", "db", "s1"]);
    let mut serve = Command::new(env!("CARGO_BIN_EXE_cbtsim"))
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
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(serve.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    // The datastore is the serve's: the map is drawn by it, over the control socket.
    let out = run_in(ds, &["map", "db", "--snapshot", "s1", "--json"]);
    let term = Command::new("kill")
        .args(["-TERM", &serve.id().to_string()])
        .status()
        .unwrap();
    let stopped = serve.wait().unwrap();
    assert!(
        out.status.success(),
        "map while serving ({line}): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (j["at"].as_str(), j["allocated_bytes"].as_u64()),
        (Some("s1"), Some(MIB))
    );
    assert!(term.success() && stopped.success(), "{stopped:?}");
}
