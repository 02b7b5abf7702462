//! The host as a running service: one process owns the datastore, keeps its
//! VMs open, and serves them to several front ends at once.
//!
//! # One enum of actions, one of results, one of errors
//! Every front end turns what it is asked into a [`Request`], calls
//! [`Service::execute`], and renders the [`Response`] or the [`ActionError`]
//! (a stable [`ErrorKind`] and a message) its own way. No front end reaches
//! into the host, and a new front end adds no host logic.
//!
//! ```text
//!  control socket (JSON lines) ──┐
//!  HTTPS (axum; /sdk, the page /)┼──▶ Request ──▶ Service::execute ──▶ sim::Host, backup, harness::drive, diskmap
//!  cbtsim, no serve (in-process)─┘                    │
//!  NBD (exports VM/DISK[@SNAP]) ──▶ sim::Vm read/write/unmap, QueryChangedDiskAreas
//! ```
//!
//! * [`action`]: the three types, serde (JSON on the socket).
//! * [`Service`]: the host, its per-VM lifecycle locks, the liveness of
//!   snapshots that NBD exports read, and guest workloads on threads.
//! * [`control`] and [`client`]: the control socket (one request per
//!   connection, progress events, then the result) and its client, which
//!   every `cbtsim` command on the datastore uses while a serve runs; without
//!   one, the command runs the same request on a [`Service::local`] of its
//!   own.
//! * [`export`]: the NBD backend over the host ([`HostExports`]); with a
//!   repository, [`point_export`] serves its backup points read-only.
//! * [`http`]: the HTTPS router (basic authentication, rustls).
//! * [`vsphere`]: the vSphere API of change tracking at `/sdk` (SOAP,
//!   its own logins).
//! * [`map`]: [`Request::Map`], a disk's map per change ID ([`diskmap`]),
//!   at a snapshot or now (a snapshot taken for the map and removed).
//! * `web`: the live page at `/` (plain HTML, CSS and JavaScript built in)
//!   and its JSON endpoints, which send [`Request`]s to [`Service::execute`].
//! * [`daemon`]: `cbtsim serve`: the lock and status files, starting and
//!   stopping the front ends in order.
//!
//! # Example
//! ```
//! use service::{Request, Response, Service};
//!
//! let dir = tempfile::tempdir()?;
//! let svc = Service::open(dir.path())?;
//! svc.execute(Request::VmCreate { vm: "web01".into(), disks: vec![64 << 20], granularity: 65536 }, &())?;
//! let Response::SnapshotCreated(s1) = svc.execute(Request::SnapshotCreate { vm: "web01".into(), name: "s1".into() }, &())? else { unreachable!() };
//! let cid = s1.disks[0].change_id.clone().unwrap();
//! svc.execute(Request::DiskUnmap { vm: "web01".into(), disk: 0, offset: 1 << 20, length: 4096 }, &())?;
//! svc.execute(Request::SnapshotCreate { vm: "web01".into(), name: "s2".into() }, &())?;
//! let Response::ChangedAreas(c) = svc.execute(Request::Query { vm: "web01".into(), snapshot: "s2".into(), disk: 0, since: cid }, &())? else { unreachable!() };
//! assert_eq!(c.areas.len(), 1);
//! let err = svc.execute(Request::SnapshotRemove { vm: "web01".into(), name: "nope".into() }, &()).unwrap_err();
//! assert_eq!(err.kind, service::ErrorKind::NotFound);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod action;
pub mod client;
pub mod control;
pub mod daemon;
mod exec;
pub mod export;
mod guest;
pub mod http;
pub mod map;
pub mod point_export;
mod reader;
pub mod vsphere;
mod web;

pub use action::{
    ActionError, DiskDetails, ErrorKind, GuestReport, GuestRun, GuestState, GuestStatus, Request, Response,
    SnapshotEntry, VmDetails, WriteData,
};
pub use daemon::{Daemon, ServeConfig, ServeError, ServeStatus};
pub use exec::{Service, MAX_INLINE_READ};
pub use export::HostExports;
pub use guest::{SLICE_OPS, SLICE_TIME};
pub use map::MapRequest;
