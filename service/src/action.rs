//! One enum of actions ([`Request`]), one of results ([`Response`]), one of
//! errors ([`ActionError`] with its stable [`ErrorKind`]).
//!
//! Every front end (the control socket, NBD, the HTTPS server, later the
//! CLI and a vSphere API) turns what it is asked into a [`Request`], hands it
//! to [`Service::execute`](crate::Service::execute), and renders the typed
//! result its own way. All three types are serde types: on the control socket
//! they travel as JSON, one document per line.
//!
//! ```
//! use service::{ErrorKind, Request};
//!
//! let r: Request = serde_json::from_str(r#"{"action": "snapshot-create", "vm": "web01", "name": "s1"}"#)?;
//! assert_eq!(r, Request::SnapshotCreate { vm: "web01".into(), name: "s1".into() });
//! let bad = serde_json::from_str::<Request>(r#"{"action": "snapshot-create", "vm": "web01", "nmae": "s1"}"#);
//! assert!(bad.is_err()); // unknown fields are refused, never ignored
//! assert_eq!(serde_json::to_string(&ErrorKind::TrackingReset)?, r#""tracking-reset""#);
//! # Ok::<(), serde_json::Error>(())
//! ```

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use vadp::{DiskArea, SnapshotDisk, SnapshotInfo};

/// The default tracking granularity of a new VM's disks (64 KiB).
pub const DEFAULT_GRANULARITY: u64 = 64 << 10;

/// An operation on the host. Names and fields are the JSON form
/// (`{"action": "disk-write", "vm": ..., ...}`); unknown fields are refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// Create a VM (CBT on, powered on).
    VmCreate {
        /// Its name.
        vm: String,
        /// Capacity of each disk in bytes.
        disks: Vec<u64>,
        /// Tracking granularity of every disk in bytes.
        #[serde(default = "default_granularity")]
        granularity: u64,
    },
    /// The VMs of the datastore.
    VmList {},
    /// Turn change tracking on or off (off then on starts a new tracking session).
    VmCbt {
        /// The VM.
        vm: String,
        /// On or off.
        on: bool,
    },
    /// Power the VM on or off.
    VmPower {
        /// The VM.
        vm: String,
        /// On or off.
        on: bool,
    },
    /// A guest write.
    DiskWrite {
        /// The VM.
        vm: String,
        /// The disk's index.
        disk: usize,
        /// Byte offset.
        offset: u64,
        /// What to write.
        data: WriteData,
    },
    /// Read a range of the live disk or of a snapshot.
    DiskRead {
        /// The VM.
        vm: String,
        /// The disk's index.
        disk: usize,
        /// Byte offset.
        offset: u64,
        /// Bytes to read.
        length: u64,
        /// Read the disk as it was at this snapshot.
        #[serde(default)]
        snapshot: Option<String>,
        /// Write the bytes to this file (an absolute path, replaced
        /// atomically) instead of returning them (at most
        /// [`MAX_INLINE_READ`](crate::MAX_INLINE_READ) bytes inline).
        #[serde(default)]
        out: Option<PathBuf>,
    },
    /// A guest unmap (TRIM): the range reads as zeros and counts as changed.
    DiskUnmap {
        /// The VM.
        vm: String,
        /// The disk's index.
        disk: usize,
        /// Byte offset.
        offset: u64,
        /// Bytes.
        length: u64,
    },
    /// Grow a disk (disks never shrink).
    DiskExtend {
        /// The VM.
        vm: String,
        /// The disk's index.
        disk: usize,
        /// The new capacity in bytes.
        size: u64,
    },
    /// Create a snapshot; the result holds each disk's change ID.
    SnapshotCreate {
        /// The VM.
        vm: String,
        /// The snapshot's name.
        name: String,
    },
    /// The VM's snapshots, oldest first.
    SnapshotList {
        /// The VM.
        vm: String,
    },
    /// Remove a snapshot, consolidating its delta.
    SnapshotRemove {
        /// The VM.
        vm: String,
        /// The snapshot.
        name: String,
    },
    /// Revert the VM to a snapshot (newer snapshots are deleted).
    SnapshotRevert {
        /// The VM.
        vm: String,
        /// The snapshot.
        name: String,
    },
    /// The changed areas of a snapshot's disk since a change ID
    /// (`QueryChangedDiskAreas`, paged to the end of the disk and checked).
    Query {
        /// The VM.
        vm: String,
        /// The snapshot whose disk is asked about.
        snapshot: String,
        /// The disk's index.
        #[serde(default)]
        disk: usize,
        /// A change ID, or `*` for every allocated area.
        since: String,
    },
    /// Back the VM up into a repository (created if missing).
    BackupRun {
        /// The VM.
        vm: String,
        /// The repository directory (an absolute path).
        repository: PathBuf,
        /// Back up every allocated area even when an incremental is possible.
        #[serde(default)]
        full: bool,
        /// Store chunks uncompressed.
        #[serde(default)]
        no_compress: bool,
    },
    /// Run a workload profile on a VM's disk, on threads inside the host.
    GuestRun(GuestRun),
    /// The guest workloads run since the service started (running ones first).
    GuestList {},
    /// Stop a guest workload; waits for it and returns its report.
    GuestStop {
        /// The workload's ID, as [`Response::GuestStarted`] gave it.
        id: u64,
    },
    /// A disk's map: which epoch (change ID) last wrote each part of it.
    Map(crate::map::MapRequest),
    /// The restore points of a repository, oldest first.
    BackupList {
        /// The repository directory (an absolute path).
        repository: PathBuf,
    },

    // What the command line needs beyond the above (`cbtsim` sends every
    // command on a datastore as a request, to its serve or to a service of
    // its own).
    /// Delete a VM and all its files (no workload, export or other process
    /// may hold it).
    VmDelete {
        /// The VM.
        vm: String,
    },
    /// A VM in detail: each disk's capacity, granularity, current change ID
    /// and layers, its snapshots, whether a consolidation is pending.
    VmShow {
        /// The VM.
        vm: String,
    },
    /// Wait for a guest workload's end (reporting its ops as progress) and
    /// return its report.
    GuestWait {
        /// The workload's ID.
        id: u64,
    },
    /// Restore a backup point into a new VM of the datastore.
    RestoreToVm {
        /// The repository directory (an absolute path).
        repository: PathBuf,
        /// The point's ID.
        point: String,
        /// The new VM's name.
        vm: String,
    },
    /// Read the chunks that `backup verify` marked bad again from snapshots
    /// of the VMs, where their data has not changed since.
    BackupRepair {
        /// The repository directory (an absolute path).
        repository: PathBuf,
    },
    /// One page of `QueryChangedDiskAreas`, as the vSphere API answers it:
    /// the window from `start_offset` with at most `max_areas` areas (the
    /// caller pages; [`Request::Query`] pages for it).
    QueryPage {
        /// The VM.
        vm: String,
        /// The snapshot whose disk is asked about.
        snapshot: String,
        /// The disk's index.
        #[serde(default)]
        disk: usize,
        /// Where the window starts (below the disk's capacity at the snapshot).
        #[serde(default)]
        start_offset: u64,
        /// A change ID, or `*` for every allocated area.
        since: String,
        /// The most areas in the page (1 or more; 2000 if absent, as ESXi).
        #[serde(default)]
        max_areas: Option<usize>,
    },
    /// Each disk's current change ID (its newest snapshot's, as the VM's
    /// `backing.changeId` shows it on vSphere).
    VmChangeIds {
        /// The VM.
        vm: String,
    },
}

fn default_granularity() -> u64 {
    DEFAULT_GRANULARITY
}

fn default_threads() -> u32 {
    1
}

/// What a [`Request::DiskWrite`] writes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub enum WriteData {
    /// `length` copies of `byte`.
    Pattern {
        /// The byte.
        byte: u8,
        /// How many.
        length: u64,
    },
    /// These bytes, base64-encoded (standard alphabet, padded).
    Base64(String),
    /// The first `length` bytes of a file (an absolute path).
    File {
        /// The file.
        path: PathBuf,
        /// How many bytes.
        length: u64,
    },
}

/// A guest workload to run ([`Request::GuestRun`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestRun {
    /// The VM.
    pub vm: String,
    /// A workload profile (`cbtsim workloads list`).
    pub profile: String,
    /// The disk to drive.
    #[serde(default)]
    pub disk: usize,
    /// vCPU threads (1 to 256).
    #[serde(default = "default_threads")]
    pub threads: u32,
    /// The workload's seed.
    #[serde(default)]
    pub seed: u64,
    /// Stop after this many ops (all threads together).
    #[serde(default)]
    pub ops: Option<u64>,
    /// Stop after this many seconds. Without `ops` and `seconds` the
    /// workload runs until stopped ([`Request::GuestStop`]) or the service
    /// shuts down.
    #[serde(default)]
    pub seconds: Option<f64>,
    /// Check the tracker against a shadow model with snapshots as it runs.
    #[serde(default)]
    pub verify: bool,
    /// With `verify`: ops between snapshots.
    #[serde(default)]
    pub snapshot_every: Option<u64>,
    /// Return at once with the workload's ID instead of waiting for its end.
    #[serde(default)]
    pub detach: bool,
}

/// The result of a [`Request`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result", content = "data", rename_all = "kebab-case")]
pub enum Response {
    /// [`Request::VmCreate`].
    VmCreated(VmInfo),
    /// [`Request::VmList`].
    Vms(Vec<VmInfo>),
    /// [`Request::VmCbt`].
    Cbt {
        /// The VM.
        vm: String,
        /// Whether tracking was on before.
        was: bool,
        /// Whether it is on now.
        on: bool,
    },
    /// [`Request::VmPower`].
    Power {
        /// The VM.
        vm: String,
        /// Whether it is on now.
        on: bool,
    },
    /// [`Request::DiskWrite`].
    Written(IoDone),
    /// [`Request::DiskRead`].
    Read {
        /// What was read.
        io: IoDone,
        /// The snapshot read, if not the live disk.
        snapshot: Option<String>,
        /// The file written, or
        out: Option<PathBuf>,
        /// the bytes, base64-encoded.
        data: Option<String>,
    },
    /// [`Request::DiskUnmap`].
    Unmapped(IoDone),
    /// [`Request::DiskExtend`].
    Extended {
        /// The VM.
        vm: String,
        /// The disk.
        disk: usize,
        /// Its new capacity.
        size: u64,
        /// Its capacity before.
        old_size: u64,
    },
    /// [`Request::SnapshotCreate`]: the snapshot and each disk's change ID.
    SnapshotCreated(SnapshotInfo),
    /// [`Request::SnapshotList`].
    Snapshots {
        /// The VM.
        vm: String,
        /// Oldest first.
        snapshots: Vec<SnapshotEntry>,
    },
    /// [`Request::SnapshotRemove`].
    SnapshotRemoved {
        /// The VM.
        vm: String,
        /// The snapshot.
        name: String,
        /// The VM's snapshots now, oldest first.
        snapshots: Vec<String>,
    },
    /// [`Request::SnapshotRevert`].
    Reverted {
        /// The VM.
        vm: String,
        /// The snapshot.
        name: String,
        /// The VM's snapshots now, oldest first.
        snapshots: Vec<String>,
    },
    /// [`Request::Query`].
    ChangedAreas(ChangedAreas),
    /// [`Request::BackupRun`].
    Backup(BackupOutcome),
    /// [`Request::GuestRun`] with `detach`.
    GuestStarted {
        /// The workload's ID.
        id: u64,
        /// The VM.
        vm: String,
    },
    /// [`Request::GuestRun`] without `detach`, and [`Request::GuestStop`].
    Guest(GuestReport),
    /// [`Request::GuestList`].
    Guests(Vec<GuestStatus>),
    /// [`Request::Map`].
    Map(Box<diskmap::DiskMap>),
    /// [`Request::BackupList`].
    BackupPoints(Vec<BackupPoint>),
    /// [`Request::VmDelete`].
    VmDeleted {
        /// The VM.
        vm: String,
    },
    /// [`Request::VmShow`].
    VmDetails(VmDetails),
    /// [`Request::RestoreToVm`].
    Restored(RestoreOutcome),
    /// [`Request::BackupRepair`].
    Repaired(RepairOutcome),
    /// [`Request::QueryPage`]: one window and the changed areas inside it.
    ChangedAreaPage(vadp::DiskChangeInfo),
    /// [`Request::VmChangeIds`]: per disk, absent while tracking is off.
    ChangeIds(Vec<Option<String>>),
}

/// A restore point, as [`Request::BackupList`] lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackupPoint {
    /// The point's ID.
    pub point: String,
    /// The VM backed up.
    pub vm: String,
    /// `full` or `incremental`.
    pub kind: String,
    /// The point an incremental was built on.
    pub parent: Option<String>,
    /// When its snapshot was taken, `YYYY-MM-DDTHH:MM:SSZ`.
    pub time_utc: String,
    /// Bytes read from the snapshot.
    pub bytes_read: u64,
    /// Bytes of new chunks stored.
    pub bytes_stored: u64,
    /// Bytes of the changed (or, for a full backup, allocated) areas.
    pub changed_bytes: u64,
    /// Per disk, the snapshot's change ID: the next incremental queries since it.
    pub change_ids: Vec<Option<String>>,
}

impl From<backup::PointListing> for BackupPoint {
    fn from(p: backup::PointListing) -> Self {
        let m = p.meta;
        BackupPoint {
            change_ids: m.disks.iter().map(|d| d.change_id.clone()).collect(),
            point: m.point,
            vm: m.vm,
            kind: m.kind,
            parent: m.parent,
            time_utc: m.time_utc,
            bytes_read: m.bytes_read,
            bytes_stored: m.bytes_stored,
            changed_bytes: m.changed_bytes,
        }
    }
}

/// A VM, as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    /// Its name.
    pub name: String,
    /// Power state.
    pub powered_on: bool,
    /// Change tracking on.
    pub cbt: bool,
    /// Disk capacities in bytes.
    pub disks: Vec<u64>,
    /// Snapshot names, oldest first.
    pub snapshots: Vec<String>,
}

impl From<sim::VmSummary> for VmInfo {
    fn from(v: sim::VmSummary) -> Self {
        VmInfo {
            name: v.name,
            powered_on: v.powered_on,
            cbt: v.cbt,
            disks: v.disks,
            snapshots: v.snapshots,
        }
    }
}

/// A range of a disk that was written, read or unmapped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoDone {
    /// The VM.
    pub vm: String,
    /// The disk.
    pub disk: usize,
    /// Where.
    pub offset: u64,
    /// Bytes.
    pub length: u64,
    /// The disk's capacity (of the snapshot read, for a read of a snapshot).
    pub capacity: u64,
}

/// A snapshot, as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotEntry {
    /// Its name.
    pub name: String,
    /// Seconds since the Unix epoch.
    pub created: u64,
    /// The same, ISO 8601 in UTC.
    pub created_utc: String,
    /// Per disk: capacity, granularity and change ID (absent when CBT was off).
    pub disks: Vec<SnapshotDisk>,
}

impl From<sim::SnapshotSummary> for SnapshotEntry {
    fn from(s: sim::SnapshotSummary) -> Self {
        SnapshotEntry {
            name: s.name,
            created: s.created,
            created_utc: backup::format_utc(s.created),
            disks: s.disks,
        }
    }
}

/// A VM in detail ([`Request::VmShow`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmDetails {
    /// Its name.
    pub name: String,
    /// Power state.
    pub powered_on: bool,
    /// Change tracking on.
    pub cbt: bool,
    /// Its disks.
    pub disks: Vec<DiskDetails>,
    /// Its snapshots, oldest first.
    pub snapshots: Vec<SnapshotEntry>,
    /// Whether a disk has more layers than its snapshots explain: a removal
    /// merged while the guest wrote faster, and kept a helper delta as the
    /// live top (correct, one more layer to read through); the next snapshot
    /// removal merges it.
    pub consolidation_needed: bool,
}

/// One disk of a [`VmDetails`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskDetails {
    /// Index.
    pub disk: usize,
    /// Live capacity in bytes.
    pub capacity: u64,
    /// Tracking granularity in bytes.
    pub granularity: u64,
    /// The change ID of the newest closed epoch (the newest snapshot's) if
    /// tracking is on and it belongs to the current session.
    pub change_id: Option<String>,
    /// Layers of the disk's chain: the base and one delta per snapshot, plus
    /// one where a consolidation could not finish.
    pub layers: usize,
    /// Bytes the layers hold in the datastore.
    pub allocated_bytes: u64,
}

/// What a restore did ([`Request::RestoreToVm`]; the backup client's report).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RestoreOutcome {
    /// The point restored.
    pub point: String,
    /// The VM it was taken from.
    pub vm: String,
    /// The file or VM written.
    pub target: String,
    /// Disks restored.
    pub disks: usize,
    /// Their total size.
    pub capacity: u64,
    /// Bytes of non-zero chunks written (the rest is left sparse).
    pub bytes_written: u64,
    /// Seconds taken.
    pub seconds: f64,
}

impl From<backup::RestoreReport> for RestoreOutcome {
    fn from(r: backup::RestoreReport) -> Self {
        RestoreOutcome {
            point: r.point,
            vm: r.vm,
            target: r.target,
            disks: r.disks,
            capacity: r.capacity,
            bytes_written: r.bytes_written,
            seconds: r.seconds,
        }
    }
}

/// What a repair did ([`Request::BackupRepair`]; the backup client's report).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepairOutcome {
    /// Chunks marked bad that points reference.
    pub bad_chunks: u64,
    /// Those read again from a VM and stored.
    pub repaired: Vec<String>,
    /// Those whose data is no longer on any VM.
    pub unrepaired: Vec<String>,
    /// Bytes read from the VMs' snapshots.
    pub bytes_read: u64,
}

impl From<backup::RepairReport> for RepairOutcome {
    fn from(r: backup::RepairReport) -> Self {
        RepairOutcome {
            bad_chunks: r.bad_chunks,
            repaired: r.repaired,
            unrepaired: r.unrepaired,
            bytes_read: r.bytes_read,
        }
    }
}

/// The answer of a [`Request::Query`]: every changed area of the disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangedAreas {
    /// The VM.
    pub vm: String,
    /// The snapshot.
    pub snapshot: String,
    /// The disk.
    pub disk: usize,
    /// The disk's capacity at the snapshot.
    pub disk_size: u64,
    /// The tracking granularity.
    pub granularity: u64,
    /// The change ID (or `*`) asked about.
    pub since: String,
    /// The snapshot's own change ID for this disk (absent when CBT was off).
    pub change_id: Option<String>,
    /// Sorted, non-overlapping changed areas.
    pub areas: Vec<DiskArea>,
    /// Bytes in `areas`.
    pub changed_bytes: u64,
}

/// The outcome of a [`Request::BackupRun`] (the backup client's report).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackupOutcome {
    /// The new point's ID.
    pub point: String,
    /// The VM.
    pub vm: String,
    /// `full` or `incremental`.
    pub kind: String,
    /// Why this kind.
    pub reason: String,
    /// Bytes read from the snapshot.
    pub bytes_read: u64,
    /// Bytes of new chunk files written.
    pub bytes_stored: u64,
    /// Areas the change query returned, over all disks.
    pub changed_areas: u64,
    /// Bytes in those areas.
    pub changed_bytes: u64,
    /// Seconds from the start to the commit.
    pub seconds: f64,
    /// The point an incremental was built on.
    pub parent: Option<String>,
    /// Chunks marked bad by verify that this backup stored again (healing
    /// every point that references them).
    #[serde(default)]
    pub healed_chunks: u64,
}

impl From<backup::BackupReport> for BackupOutcome {
    fn from(r: backup::BackupReport) -> Self {
        BackupOutcome {
            point: r.point,
            vm: r.vm,
            kind: r.kind,
            reason: r.reason,
            bytes_read: r.bytes_read,
            bytes_stored: r.bytes_stored,
            changed_areas: r.changed_areas,
            changed_bytes: r.changed_bytes,
            seconds: r.seconds,
            parent: r.parent,
            healed_chunks: r.healed_chunks,
        }
    }
}

/// Where a guest workload is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GuestState {
    /// Running.
    Running,
    /// Ran to its limit.
    Finished,
    /// Stopped by [`Request::GuestStop`] or the service's shutdown.
    Stopped,
    /// Failed (the report's `error` says why).
    Failed,
}

/// A guest workload, as listed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuestStatus {
    /// Its ID.
    pub id: u64,
    /// The VM.
    pub vm: String,
    /// The profile.
    pub profile: String,
    /// The disk.
    pub disk: usize,
    /// Where it is.
    pub state: GuestState,
    /// Ops done so far.
    pub ops: u64,
    /// Seconds since it started.
    pub seconds: f64,
}

/// What a guest workload did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuestReport {
    /// Its ID.
    pub id: u64,
    /// The VM.
    pub vm: String,
    /// The profile.
    pub profile: String,
    /// The disk.
    pub disk: usize,
    /// vCPU threads.
    pub threads: u32,
    /// How it ended.
    pub state: GuestState,
    /// Wall time in seconds.
    pub elapsed_s: f64,
    /// Ops per second.
    pub ops_per_s: f64,
    /// Ops done.
    pub ops: u64,
    /// Writes.
    pub writes: u64,
    /// Bytes written.
    pub bytes_written: u64,
    /// Reads.
    pub reads: u64,
    /// Unmaps.
    pub unmaps: u64,
    /// Flushes.
    pub flushes: u64,
    /// Write latency percentiles in microseconds: p50, p99, p99.9, max.
    pub write_latency_us: [f64; 4],
    /// With `verify`: epochs checked against the shadow model.
    pub epochs_checked: u64,
    /// With `verify`: changed blocks missing from the tracker's answers (must be 0).
    pub missed_blocks: u64,
    /// Why it failed, for [`GuestState::Failed`].
    pub error: Option<ActionError>,
}

/// A stable, machine-readable class of [`ActionError`]. Front ends map it to
/// their own codes (an exit status, an HTTP status, a SOAP fault, an errno).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorKind {
    /// No such VM, disk, snapshot, restore point or guest workload.
    NotFound,
    /// A VM or snapshot of that name exists already.
    AlreadyExists,
    /// Held by another process or operation (a VM, a repository, a disk a
    /// workload is driving).
    InUse,
    /// An argument the host refuses (a bad name, size, granularity, path).
    InvalidArgument,
    /// A range outside the disk.
    OutOfRange,
    /// The VM is powered off.
    PoweredOff,
    /// A limit was reached (32 snapshots, 2^32 epochs).
    LimitReached,
    /// Change tracking is off.
    TrackingDisabled,
    /// The change ID predates a tracking reset: a full backup is needed.
    TrackingReset,
    /// The change ID was not issued for this disk.
    ForeignChangeId,
    /// The change ID is newer than the snapshot queried.
    ChangeIdAfterSnapshot,
    /// The change ID does not parse.
    MalformedChangeId,
    /// A file or repository is damaged.
    Corrupt,
    /// File I/O failed.
    Io,
    /// A check failed: a workload found missed blocks, a backup a bad chunk.
    CheckFailed,
    /// The request itself is malformed (not JSON, an unknown action or
    /// field, a missing field).
    InvalidRequest,
    /// The request is larger than the front end accepts.
    TooLarge,
    /// The service is shutting down.
    ShuttingDown,
    /// A front end could not reach the service, or lost it mid-request.
    Unavailable,
    /// Anything else.
    Internal,
}

impl ErrorKind {
    /// The kebab-case name (as in JSON).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::NotFound => "not-found",
            ErrorKind::AlreadyExists => "already-exists",
            ErrorKind::InUse => "in-use",
            ErrorKind::InvalidArgument => "invalid-argument",
            ErrorKind::OutOfRange => "out-of-range",
            ErrorKind::PoweredOff => "powered-off",
            ErrorKind::LimitReached => "limit-reached",
            ErrorKind::TrackingDisabled => "tracking-disabled",
            ErrorKind::TrackingReset => "tracking-reset",
            ErrorKind::ForeignChangeId => "foreign-change-id",
            ErrorKind::ChangeIdAfterSnapshot => "change-id-after-snapshot",
            ErrorKind::MalformedChangeId => "malformed-change-id",
            ErrorKind::Corrupt => "corrupt",
            ErrorKind::Io => "io",
            ErrorKind::CheckFailed => "check-failed",
            ErrorKind::InvalidRequest => "invalid-request",
            ErrorKind::TooLarge => "too-large",
            ErrorKind::ShuttingDown => "shutting-down",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Internal => "internal",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why an action failed: a stable [`ErrorKind`] and a message for people
/// (the whole chain of causes, `: `-separated).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct ActionError {
    /// The class of error.
    pub kind: ErrorKind,
    /// What went wrong.
    pub message: String,
}

impl ActionError {
    /// An error of `kind` saying `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        ActionError {
            kind,
            message: message.into(),
        }
    }

    /// An [`ErrorKind::InvalidArgument`].
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidArgument, message)
    }

    /// The same error with `context: ` before its message.
    pub fn context(mut self, context: impl fmt::Display) -> Self {
        self.message = format!("{context}: {}", self.message);
        self
    }
}

/// `e` and its sources, `: `-separated (each source once).
pub(crate) fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.ends_with(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

fn tracker_kind(e: &tracker::TrackerError) -> ErrorKind {
    use tracker::TrackerError as T;
    match e {
        T::Io { .. } => ErrorKind::Io,
        T::BadFile { .. } => ErrorKind::Corrupt,
        T::InUse { .. } => ErrorKind::InUse,
        T::BadGranularity(_) | T::CapacityTooLarge { .. } | T::Shrink { .. } => ErrorKind::InvalidArgument,
        T::EpochsExhausted => ErrorKind::LimitReached,
        _ => ErrorKind::Internal,
    }
}

fn query_kind(e: &tracker::QueryError) -> ErrorKind {
    use tracker::QueryError as Q;
    match e {
        Q::TrackingDisabled => ErrorKind::TrackingDisabled,
        Q::TrackingReset { .. } => ErrorKind::TrackingReset,
        Q::ForeignChangeId(_) => ErrorKind::ForeignChangeId,
        Q::ChangeIdAfterSnapshot { .. } => ErrorKind::ChangeIdAfterSnapshot,
        Q::PointNotRetained(_) => ErrorKind::NotFound,
        Q::OffsetOutOfRange { .. } => ErrorKind::OutOfRange,
        _ => ErrorKind::Internal,
    }
}

fn vadp_kind(e: &vadp::VadpError) -> ErrorKind {
    use vadp::ErrorKind as V;
    match e.kind() {
        V::MalformedChangeId => ErrorKind::MalformedChangeId,
        V::TrackingReset => ErrorKind::TrackingReset,
        V::ForeignChangeId => ErrorKind::ForeignChangeId,
        V::ChangeIdAfterSnapshot => ErrorKind::ChangeIdAfterSnapshot,
        V::TrackingDisabled => ErrorKind::TrackingDisabled,
        V::OffsetOutOfRange | V::ReadOutOfRange => ErrorKind::OutOfRange,
        V::NotFound => ErrorKind::NotFound,
        // The host's own error keeps its kind.
        V::Host => match e {
            vadp::VadpError::Host(source) => match source.downcast_ref::<sim::SimError>() {
                Some(s) => sim_kind(s),
                None => ErrorKind::Internal,
            },
            _ => ErrorKind::Internal,
        },
        _ => ErrorKind::Internal,
    }
}

fn sim_kind(e: &sim::SimError) -> ErrorKind {
    use sim::SimError as S;
    match e {
        S::NoSuchVm(_) | S::NoSuchDisk { .. } | S::NoSuchSnapshot { .. } => ErrorKind::NotFound,
        S::VmExists(_) | S::SnapshotExists { .. } => ErrorKind::AlreadyExists,
        S::VmInUse(_) => ErrorKind::InUse,
        S::BadName(_) | S::BadSize { .. } => ErrorKind::InvalidArgument,
        S::TooManySnapshots(_) => ErrorKind::LimitReached,
        S::OutOfRange { .. } => ErrorKind::OutOfRange,
        S::PoweredOff(_) => ErrorKind::PoweredOff,
        S::Tracker(t) => tracker_kind(t),
        S::Query(q) => query_kind(q),
        S::Vadp(v) => vadp_kind(v),
        S::ChangeId(_) => ErrorKind::MalformedChangeId,
        S::Io { .. } => ErrorKind::Io,
        S::Config { .. } => ErrorKind::Corrupt,
        _ => ErrorKind::Internal,
    }
}

fn backup_kind(e: &backup::BackupError) -> ErrorKind {
    use backup::BackupError as B;
    match e {
        B::Io { .. } => ErrorKind::Io,
        B::Host { source, .. } => vadp_kind(source),
        B::SnapshotNotRemoved { source, .. } => vadp_kind(source),
        B::NotARepository { .. } | B::InvalidArgument(_) => ErrorKind::InvalidArgument,
        B::NoSuchPoint(_) | B::NoSuchDisk { .. } => ErrorKind::NotFound,
        B::CorruptPoint { .. } | B::MissingChunk(_) | B::CorruptChunk { .. } => ErrorKind::Corrupt,
        B::PartialRestore { source, .. } => backup_kind(source),
        _ => ErrorKind::Internal,
    }
}

fn drive_kind(e: &harness::drive::DriveError) -> ErrorKind {
    use harness::drive::DriveError as D;
    match e {
        D::BadPlan(_) | D::Workload { .. } => ErrorKind::InvalidArgument,
        D::TrackingOff(_) => ErrorKind::TrackingDisabled,
        D::Sim(s) => sim_kind(s),
        D::Backup(b) => backup_kind(b),
        D::Shadow(_) | D::Panicked(_) => ErrorKind::Internal,
        _ => ErrorKind::Internal,
    }
}

impl From<sim::SimError> for ActionError {
    fn from(e: sim::SimError) -> Self {
        ActionError::new(sim_kind(&e), chain(&e))
    }
}

impl From<vadp::VadpError> for ActionError {
    fn from(e: vadp::VadpError) -> Self {
        ActionError::new(vadp_kind(&e), chain(&e))
    }
}

impl From<backup::BackupError> for ActionError {
    fn from(e: backup::BackupError) -> Self {
        ActionError::new(backup_kind(&e), chain(&e))
    }
}

impl From<harness::drive::DriveError> for ActionError {
    fn from(e: harness::drive::DriveError) -> Self {
        ActionError::new(drive_kind(&e), chain(&e))
    }
}

impl From<tracker::ParseChangeIdError> for ActionError {
    fn from(e: tracker::ParseChangeIdError) -> Self {
        ActionError::new(ErrorKind::MalformedChangeId, e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_survive_the_conversions() {
        let e: ActionError = sim::SimError::NoSuchVm("x".into()).into();
        assert_eq!(e.kind, ErrorKind::NotFound);
        let q = tracker::QueryError::TrackingReset {
            change_id: tracker::ChangeId {
                session: Default::default(),
                seq: 3,
            },
            reason: "CBT was turned off".into(),
        };
        let e: ActionError = sim::SimError::Query(q.clone()).into();
        assert_eq!(e.kind, ErrorKind::TrackingReset);
        assert!(e.message.contains("full backup"), "{}", e.message);
        // Through the vadp conversion (what the backup client sees), and
        // wrapped by the backup client.
        let v: vadp::VadpError = sim::SimError::Query(q).into();
        let b = backup::BackupError::Host {
            op: "querying disk 0".into(),
            source: v,
        };
        let e: ActionError = b.into();
        assert_eq!(e.kind, ErrorKind::TrackingReset);
        assert!(
            e.message.starts_with("querying disk 0 failed: change ID"),
            "{}",
            e.message
        );
        let e: ActionError = sim::SimError::OutOfRange {
            disk: 0,
            offset: 1,
            len: 2,
            capacity: 1,
        }
        .into();
        assert_eq!(e.kind, ErrorKind::OutOfRange);
    }

    #[test]
    fn errors_and_kinds_round_trip_as_json() {
        for k in [
            ErrorKind::NotFound,
            ErrorKind::ChangeIdAfterSnapshot,
            ErrorKind::InvalidRequest,
        ] {
            let json = serde_json::to_string(&k).unwrap();
            assert_eq!(json, format!("\"{}\"", k.as_str()));
            assert_eq!(serde_json::from_str::<ErrorKind>(&json).unwrap(), k);
        }
        let e = ActionError::new(ErrorKind::InUse, "VM \"a\" is in use");
        let back: ActionError = serde_json::from_str(&serde_json::to_string(&e).unwrap()).unwrap();
        assert_eq!(back, e);
    }

    #[test]
    fn requests_round_trip_and_refuse_unknown_fields() {
        let reqs = [
            Request::VmCreate {
                vm: "a".into(),
                disks: vec![1 << 20],
                granularity: 4096,
            },
            Request::VmList {},
            Request::DiskWrite {
                vm: "a".into(),
                disk: 0,
                offset: 4096,
                data: WriteData::Pattern { byte: 7, length: 10 },
            },
            Request::DiskWrite {
                vm: "a".into(),
                disk: 0,
                offset: 0,
                data: WriteData::Base64("aGVsbG8=".into()),
            },
            Request::GuestRun(GuestRun {
                vm: "a".into(),
                profile: "oltp".into(),
                disk: 0,
                threads: 2,
                seed: 1,
                ops: None,
                seconds: Some(1.5),
                verify: true,
                snapshot_every: Some(100),
                detach: true,
            }),
            Request::GuestStop { id: 3 },
            Request::VmDelete { vm: "a".into() },
            Request::VmShow { vm: "a".into() },
            Request::GuestWait { id: 3 },
            Request::RestoreToVm {
                repository: "/r".into(),
                point: "p1".into(),
                vm: "b".into(),
            },
            Request::BackupRepair {
                repository: "/r".into(),
            },
        ];
        for r in reqs {
            let json = serde_json::to_string(&r).unwrap();
            assert_eq!(serde_json::from_str::<Request>(&json).unwrap(), r, "{json}");
        }
        let defaults: Request = serde_json::from_str(r#"{"action":"vm-create","vm":"a","disks":[1048576]}"#).unwrap();
        assert_eq!(
            defaults,
            Request::VmCreate {
                vm: "a".into(),
                disks: vec![1 << 20],
                granularity: DEFAULT_GRANULARITY
            }
        );
        for bad in [
            r#"{"action":"vm-list","extra":1}"#,
            r#"{"action":"vm-explode"}"#,
            r#"{"vm":"a"}"#,
            r#"{"action":"disk-unmap","vm":"a","disk":0,"offset":-1,"length":1}"#,
            r#"{"action":"guest-run","vm":"a","profile":"p","threds":2}"#,
        ] {
            assert!(serde_json::from_str::<Request>(bad).is_err(), "{bad} parsed");
        }
    }

    #[test]
    fn responses_round_trip() {
        let rs = [
            Response::Vms(vec![VmInfo {
                name: "a".into(),
                powered_on: true,
                cbt: true,
                disks: vec![1 << 20],
                snapshots: vec!["s1".into()],
            }]),
            Response::Cbt {
                vm: "a".into(),
                was: true,
                on: false,
            },
            Response::GuestStarted { id: 1, vm: "a".into() },
            Response::ChangedAreas(ChangedAreas {
                vm: "a".into(),
                snapshot: "s".into(),
                disk: 0,
                disk_size: 1 << 20,
                granularity: 65536,
                since: "*".into(),
                change_id: None,
                areas: vec![DiskArea {
                    start: 0,
                    length: 65536,
                }],
                changed_bytes: 65536,
            }),
        ];
        for r in rs {
            let json = serde_json::to_string(&r).unwrap();
            assert_eq!(serde_json::from_str::<Response>(&json).unwrap(), r, "{json}");
        }
    }
}
