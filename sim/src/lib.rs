//! A simulated ESXi-style host with in-kernel-style change tracking.
//!
//! A [`Host`] keeps VMs in a datastore directory. Each [`Vm`] has virtual
//! disks backed by sparse, memory-mapped extent files (a 62 TiB disk costs
//! nothing until written). The guest write path ([`Vm::write`]) goes through
//! a per-VM I/O gate, lands in the top layer of the disk's chain
//! (copy-on-write when a snapshot exists) and marks the change tracker
//! (the `tracker` crate): lock-free, no allocation. Snapshots stun I/O for an
//! O(1) epoch switch, consolidation and revert keep tracking exact, and the
//! host and each VM answer the `vadp` data-protection API, so callers page
//! changed areas with the checked `vadp::changed_areas`. A killed host
//! resumes tracking exactly; a host that lost power (or rebooted without a
//! clean stop) resumes it only for VMs with durable tracking
//! ([`Vm::set_durable_tracking`]: a region's intent is synced before the
//! first write of an epoch into it, off the gate), and resets it otherwise.
//!
//! Features: `bench` adds `Vm::write_with` (the write path marking another
//! `tracker::MarkDirty`, for the benchmarks); `fault-injection` adds the
//! `fault` module's pause and failure points (only sim's own tests use it).
//!
//! # Example
//! ```
//! use sim::{DiskSpec, Host};
//! use tracker::Granularity;
//!
//! let dir = tempfile::tempdir()?;
//! let host = Host::open(dir.path())?;
//! let vm = host.create_vm("web01", &[DiskSpec { capacity: 64 << 30, granularity: Granularity::DEFAULT }])?;
//! vm.write(0, 1 << 20, b"hello")?;
//! let s1 = vm.create_snapshot("s1")?;                     // change ID per disk
//! let cid = s1.disks[0].change_id.clone().unwrap();
//! vm.write(0, 5 << 30, &[7u8; 4096])?;                    // the guest keeps writing
//! let s2 = vm.create_snapshot("s2")?;
//! let page = vm.query_changed_disk_areas("s2", 0, 0, &cid)?;
//! assert_eq!(page.changed_area.len(), 1);
//! assert_eq!(page.changed_area[0].start, 5 << 30);
//! let mut buf = [0u8; 5];
//! vm.read_snapshot("s1", 0, 1 << 20, &mut buf)?;
//! assert_eq!(&buf, b"hello");
//! # drop(s2);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

/// A pause or fault point (see `fault`): expands to nothing unless the
/// `fault-injection` feature is on.
macro_rules! fault_point {
    ($point:expr) => {
        #[cfg(feature = "fault-injection")]
        $crate::fault::hit($point)?;
    };
}

mod config;
mod error;
#[cfg(feature = "fault-injection")]
pub mod fault;
mod host;
mod layer;
mod mmap;
mod protection;
mod restore_target;
mod view;
mod vm;

pub use config::{DiskConfig, SnapshotConfig, SnapshotDiskConfig, VmConfig};
pub use error::SimError;
pub use host::{Host, VmSummary};
pub use layer::EXTENT_BYTES;
pub use view::VmView;
pub use vm::{check_name, DiskSpec, SnapshotSummary, Vm, DEFAULT_MAX_AREAS, MAX_SNAPSHOTS, STUN_LOG};
