//! Helpers the tests that run `cbtsim` as a process share (each file under
//! `tests/` is its own crate; not every one uses every helper).
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

/// Runs `cbtsim --datastore DS ARGS...` (ignoring any `CBTSIM_DATASTORE` of
/// the environment).
pub fn run_in(ds: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cbtsim"))
        .env_remove("CBTSIM_DATASTORE")
        .arg("--datastore")
        .arg(ds)
        .args(args)
        .output()
        .unwrap()
}

/// Runs a command that must succeed; returns its stdout.
pub fn ok(ds: &Path, args: &[&str]) -> String {
    let out = run_in(ds, args);
    assert!(
        out.status.success(),
        "cbtsim {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs a command that must succeed and print one JSON document.
pub fn json(ds: &Path, args: &[&str]) -> Value {
    let s = ok(ds, args);
    serde_json::from_str(&s).unwrap_or_else(|e| panic!("cbtsim {args:?}: not one JSON document ({e}): {s}"))
}
