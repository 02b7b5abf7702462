//! Command handlers of the `cbtsim` binary: argument structs, output
//! formatting, and one library call each. No tracking logic lives here.
//!
//! `vm`, `disk`, `snapshot`, `query`, `guest`, `backup run`, `backup verify --repair` and
//! `restore --to-vm` drive the host step by step, in the manner of govc or vim-cmd: each
//! parses its arguments into a `service::Request`, sends it through [`dispatch`] (to the
//! datastore's `cbtsim serve` when one runs, else to a service of this process) and
//! renders the `Response`; so the output and exit code are the same either way. The
//! service validates all of a request before it changes anything, so an error leaves the
//! datastore as it was. Sizes and offsets are parsed by the handlers (with
//! [`workloads::parse_size`], not by clap) so that a malformed one gives the same
//! one-line error as any other failure. Commands on a repository alone (`backup list`,
//! `verify`, `prune`, `restore --to FILE`, `mount`) open it here: no VM is involved.

pub mod backup;
pub mod demo;
pub mod disk;
pub mod dispatch;
pub mod inspect;
pub mod map;
pub mod mount;
pub mod progress;
pub mod query;
pub mod serve;
pub mod snapshot;
pub mod verify;
pub mod vm;
pub mod workload;

use std::path::PathBuf;

use anyhow::{bail, ensure};
use workloads::{format_size, parse_size, SizeStyle};

/// What every command gets from the top-level arguments.
#[derive(Debug, Clone)]
pub struct Ctx {
    /// `--datastore` / `CBTSIM_DATASTORE`.
    pub datastore: Option<PathBuf>,
}

/// Most vCPU or writer threads a command runs (a scenario: per VM, all its disks together).
pub const MAX_THREADS: u64 = 256;
/// The longest run, in seconds (a day).
pub const MAX_SECONDS: f64 = 86_400.0;

/// Checks `--threads`, `--ops` and `--seconds` with the bounds that `guest run`, `verify`
/// and scenario files share: 1 to 256 threads, at least 1 op, more than 0 and at most
/// 86400 seconds.
fn check_run_limits(threads: u64, ops: Option<u64>, seconds: Option<f64>) -> anyhow::Result<()> {
    if !(1..=MAX_THREADS).contains(&threads) {
        bail!("invalid --threads {threads}: give 1 to {MAX_THREADS}");
    }
    if ops == Some(0) {
        bail!("invalid --ops 0: give at least 1");
    }
    if let Some(s) = seconds {
        if !(s > 0.0 && s <= MAX_SECONDS) {
            bail!("invalid --seconds {s}: give more than 0 and at most {MAX_SECONDS}");
        }
    }
    Ok(())
}

/// "1 byte", "2 bytes".
fn bytes_word(n: u64) -> String {
    if n == 1 {
        "1 byte".to_owned()
    } else {
        format!("{n} bytes")
    }
}

/// Prints `value` as one line of JSON.
fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string(value)?);
    Ok(())
}

/// Parses a size argument, naming it in the error.
fn size_arg(what: &str, s: &str) -> anyhow::Result<u64> {
    parse_size(s).map_err(|e| anyhow::anyhow!("invalid {what}: {e}"))
}

fn disk_arg(s: &str) -> anyhow::Result<usize> {
    s.trim()
        .parse()
        .map_err(|_| anyhow::anyhow!("invalid DISK {s:?}: expected a disk index (0, 1, ...)"))
}

/// A capacity or granularity, exactly (`1536 MiB`, `100000256 bytes`).
fn exact(bytes: u64) -> String {
    format_size(bytes, SizeStyle::Exact)
}

/// Where `replay`, `verify` and `demo` make their temporary datastore: inside
/// `--datastore` when given (which must exist), else `None` (the default place).
fn scratch_dir(ctx: &Ctx) -> anyhow::Result<Option<PathBuf>> {
    match &ctx.datastore {
        Some(d) => {
            ensure!(d.is_dir(), "--datastore {} is not a directory", d.display());
            Ok(Some(d.clone()))
        }
        None => Ok(None),
    }
}
