//! Drives the simulated host the way guests, backup schedules and testers do.
//!
//! * [`drive`]: guest workload profiles on vCPU threads, checked against a
//!   shadow model epoch by epoch (`cbtsim guest run`).
//! * [`replay`]: a block trace replayed into a fresh VM (`cbtsim replay`).
//! * [`scenario`]: TOML scenarios, hosts of VMs running profiles with
//!   scheduled snapshots and backups (`cbtsim run`).
//! * [`verify`]: the torture verifier, random lifecycle operations under
//!   concurrent writes, every pair of points in time compared (`cbtsim verify`).
//! * [`demo`]: the narrated walk-through (`cbtsim demo`).
//!
//! What they all do is written once: [`apply_op`] applies a workload's
//! [`IoOp`](workloads::IoOp) to a VM, [`changed_areas`] asks a VM what changed
//! through the checked pager [`vadp::changed_areas`], and every long run
//! reports through [`Progress`] (the backup client's trait).
//!
//! The harness talks to the host through its public API (`sim`), to the
//! backup client through `backup`, and to workload generators through
//! `workloads`; it adds no tracking logic of its own.
//!
//! # Example
//! The narrated demo, then one write and the query that must report it:
//! ```
//! use harness::{apply_op, changed_areas};
//! use sim::{DiskSpec, Host};
//! use tracker::Granularity;
//! use workloads::IoOp;
//!
//! let dir = tempfile::tempdir()?;
//! let mut narration = Vec::new();
//! let report = harness::demo::run(&dir.path().join("demo"), &mut narration)?;
//! assert!(report.changed_bytes > 0);
//! assert_eq!(report.verified_bytes, report.changed_bytes);
//!
//! let host = Host::open(&dir.path().join("ds"))?;
//! let disk = DiskSpec { capacity: 1 << 20, granularity: Granularity::new(4096)? };
//! let vm = host.create_vm("v", &[disk])?;
//! let before = vm.create_snapshot("a")?.disks[0].change_id.clone().expect("CBT is on");
//! apply_op(&vm, 0, &IoOp::Write { offset: 8192, len: 100, seed: 1 }, &mut Vec::new())?;
//! vm.create_snapshot("b")?;
//! assert_eq!(changed_areas(&vm, "b", 0, &before)?.areas, [(8192, 4096)]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod apply;
pub mod demo;
pub mod drive;
pub mod replay;
pub mod scenario;
pub mod verify;

use std::path::PathBuf;

pub use apply::{apply_op, changed_areas, Paged, APPLY_CHUNK};

/// How every long run of the harness reports its progress: the backup client's trait, so
/// that drives, replays, scenarios, the torture verifier and backups share one mechanism
/// (and the command line one bar). Each run's docs say what its units are.
pub use backup::Progress;

/// What went wrong in a harness run that is not a finding of the run itself.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HarnessError {
    /// The host failed.
    #[error(transparent)]
    Sim(#[from] sim::SimError),
    /// The backup client failed.
    #[error(transparent)]
    Backup(#[from] backup::BackupError),
    /// A data-protection call failed.
    #[error(transparent)]
    Vadp(#[from] vadp::VadpError),
    /// File I/O failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A check the run makes failed: what was read back is not what was written.
    #[error("{path}: {reason}")]
    Check {
        /// Where.
        path: PathBuf,
        /// What differs.
        reason: String,
    },
    /// A disk's map could not be drawn.
    #[error(transparent)]
    Map(#[from] diskmap::MapError),
}
