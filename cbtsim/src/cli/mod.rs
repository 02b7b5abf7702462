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
pub mod mount;
pub mod progress;
pub mod query;
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

/// Opens the datastore, which must exist (only `vm create` makes one).
fn existing_host(ctx: &Ctx) -> anyhow::Result<Host> {
    if let Some(dir) = &ctx.datastore {
        ensure!(dir.is_dir(), "datastore {} does not exist", dir.display());
    }
    ctx.host()
}

/// Opens VM `name` of the datastore, which must exist.
fn existing_vm(ctx: &Ctx, name: &str) -> anyhow::Result<Arc<Vm>> {
    Ok(existing_host(ctx)?.vm(name)?)
}
