//! Command handlers of the `cbtsim` binary: argument structs, output
//! formatting, and one library call each. No tracking logic lives here.

pub mod backup;
pub mod demo;
pub mod host;
pub mod progress;
pub mod verify;
pub mod workload;

use std::path::PathBuf;

use anyhow::{bail, Context as _};
use sim::Host;

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
