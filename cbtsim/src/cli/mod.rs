//! Command handlers of the `cbtsim` binary: argument structs, output
//! formatting, and one library call each. No tracking logic lives here.
//!
//! `vm`, `disk`, `snapshot` and `query` drive the host step by step, in the manner of
//! govc or vim-cmd. Every handler validates all of its input before it changes anything,
//! so an error leaves the datastore as it was. Sizes and offsets are parsed by the
//! handlers (with [`workloads::parse_size`], not by clap) so that a malformed one gives
//! the same one-line error as any other failure.

pub mod backup;
pub mod demo;
pub mod disk;
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
use std::sync::Arc;

use anyhow::{bail, ensure, Context as _};
use sim::{Host, Vm};
use workloads::{format_size, parse_size, SizeStyle};

/// What every command gets from the top-level arguments.
#[derive(Debug, Clone)]
pub struct Ctx {
    /// `--datastore` / `CBTSIM_DATASTORE`.
    pub datastore: Option<PathBuf>,
}

impl Ctx {
    /// Opens the datastore, or says how to name one.
    pub fn host(&self) -> anyhow::Result<Host> {
        let Some(dir) = &self.datastore else {
            bail!("no datastore: pass --datastore DIR or set CBTSIM_DATASTORE");
        };
        Host::open(dir).with_context(|| format!("cannot open datastore {}", dir.display()))
    }
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

/// The size rule of `vm create` and scenario files: a whole number of 512-byte sectors
/// from 1 MiB (what the workload profiles need) to 64 TiB.
fn check_disk_size(n: u64) -> anyhow::Result<()> {
    let min = workloads::MIN_DISK_SIZE;
    let max = tracker::MAX_CAPACITY;
    ensure!(
        n >= min && n.is_multiple_of(512) && n <= max,
        "a disk is a multiple of 512 bytes from {min} (1 MiB) to {max} (64 TiB), found {n}"
    );
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

/// Opens the datastore, which must exist (only `vm create` makes one).
fn existing_host(ctx: &Ctx) -> anyhow::Result<Host> {
    if let Some(dir) = &ctx.datastore {
        ensure!(dir.is_dir(), "datastore {} does not exist", dir.display());
    }
    ctx.host()
}

/// Opens VM `name` of the datastore read-only (listings and queries write nothing).
fn vm_view(ctx: &Ctx, name: &str) -> anyhow::Result<sim::VmView> {
    Ok(existing_host(ctx)?.view(name)?)
}

/// Opens VM `name` of the datastore, which must exist.
fn existing_vm(ctx: &Ctx, name: &str) -> anyhow::Result<Arc<Vm>> {
    Ok(existing_host(ctx)?.vm(name)?)
}
