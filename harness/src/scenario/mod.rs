//! Scenarios: a host of VMs running workload profiles at once, each checked as it runs.
//!
//! A scenario is a TOML file ([`Scenario::parse`]); [`run`] creates its VMs in a datastore,
//! drives them all concurrently ([`crate::drive`]), and returns a [`ScenarioReport`]: ops,
//! bytes, per-epoch changed bytes and share of the disk, write latency percentiles, the
//! over-report ratio and missed blocks (which must be 0), per VM and for the host.
//!
//! ```toml
//! name = "two databases"
//! seed = 1                  # workloads' seed (VM i gets seed + i unless it sets its own)
//! ops = 200000              # per VM (or: seconds = 30)
//! snapshot_every = 20000    # ops of a VM between snapshot + changed-areas query
//! # backup_every = 100000   # ops of a VM between backups through the vadp backup client
//! # repository = "backups"  # their repository (default: DATASTORE/.backups)
//! # flush = false           # count guest flushes without applying them
//!
//! [[vm]]
//! name = "db"               # with count = 2: db-01, db-02
//! count = 2
//! profile = "oltp-db"
//! threads = 2               # vCPU threads per disk
//! disk_size = "8G"          # one disk (or [[vm.disk]] tables, below)
//! granularity = "64K"       # default 64K
//!
//! [[vm]]
//! name = "files"
//! profile = "file-server"
//! [[vm.disk]]
//! size = "4G"
//! [[vm.disk]]
//! size = "16G"
//! granularity = "4K"
//! profile = "log-append"    # a disk may run its own profile and threads
//! ```
//! Sizes are a number of bytes or a string of [`workloads::size`]'s grammar (`"64K"`,
//! `"64KiB"`, `"2T"`). Every
//! top-level key but `name` and `seed` may be set per VM too. An error names the file,
//! line and key: `db.toml:7: key 'vm[0].threads': invalid type: string "two", expected i64`.
//!
//! # Backups
//! With `backup_every`, the [`backup`] client backs each VM up into the repository
//! while its guest keeps writing (after the check of the first epoch past every multiple
//! of the period). When the guest has stopped, one last incremental backup is taken,
//! restored to a file and compared byte for byte with the VM's disks: any difference
//! ([`BackupCheck::mismatched_bytes`], must be 0) means an incremental of the chain
//! missed a change.
//!
//! # Layout
//! `parse` reads and checks a file into a [`Scenario`] (each error names the file, line
//! and key); `run` creates the VMs and drives them ([`run`], [`ScenarioReport`]).

mod parse;
mod run;

use std::path::PathBuf;

use backup::BackupError;

use crate::drive::{DriveError, DrivePlan};
pub use run::{run, BackupCheck, ScenarioReport};
use sim::{DiskSpec, SimError};

/// Why a scenario could not be loaded or run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ScenarioError {
    /// The file could not be read.
    #[error("cannot read scenario {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A key has a bad value, is unknown, or is missing.
    #[error("{file}:{line}: key '{key}': {message}")]
    Key {
        /// The file.
        file: String,
        /// 1-based line.
        line: usize,
        /// The key's path, like `vm[1].disk[0].size`.
        key: String,
        /// What is wrong.
        message: String,
    },
    /// The file is not valid TOML.
    #[error("{file}:{line}:{column}: {message}")]
    Syntax {
        /// The file.
        file: String,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What is wrong.
        message: String,
    },
    /// A VM of the scenario failed.
    #[error("VM {vm:?} failed")]
    Vm {
        /// The VM.
        vm: String,
        /// The cause.
        #[source]
        source: Box<DriveError>,
    },
    /// The simulated host failed.
    #[error(transparent)]
    Sim(#[from] SimError),
    /// The final backup or its check failed.
    #[error("backup of VM {vm:?} failed")]
    Backup {
        /// The VM.
        vm: String,
        /// The cause.
        #[source]
        source: BackupError,
    },
    /// Reading a restored image failed.
    #[error("cannot read restored image {path}")]
    Restored {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// One VM of a scenario, ready to create and drive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmPlan {
    /// Its name.
    pub name: String,
    /// Its disks.
    pub disks: Vec<DiskSpec>,
    /// What runs on it (with its backup schedule).
    pub plan: DrivePlan,
}

/// A parsed and checked scenario.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scenario {
    /// Its name (the file's stem when the file has none).
    pub name: String,
    /// Its description.
    pub description: String,
    /// The VMs, with `count` expanded.
    pub vms: Vec<VmPlan>,
    /// The backup repository (`None`: `DATASTORE/.backups`), for VMs with `backup_every`.
    pub repository: Option<PathBuf>,
}

impl Scenario {
    /// Total vCPU threads of the host.
    pub fn threads(&self) -> u64 {
        self.vms
            .iter()
            .flat_map(|v| &v.plan.loads)
            .map(|l| u64::from(l.threads))
            .sum()
    }
}
