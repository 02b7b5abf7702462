//! Real guests: a real file system and a real database writing into a
//! tracked disk, backed up while they write, and every backup point restored
//! and checked the way a backup engineer would (`cbtsim guest run VM --real
//! ext4|xfs|postgres`).
//!
//! ```text
//!  this process                               the datastore's `cbtsim serve` (root)
//!  ────────────                               ─────────────────────────────────────
//!  disk attach ─────────────────────────────▶ /dev/loopN over its FUSE file (attach)
//!  mkfs, mount /dev/loopN on WORK/mnt
//!  writers: files + fsync + checksums  ─┐
//!  fio on files, or PostgreSQL+pgbench ─┴──▶ guest writes: tracked, stunned by snapshots
//!  every N s: backup run ───────────────────▶ snapshot, QueryChangedDiskAreas, read, remove
//!  stop, unmount, disk detach
//!  per point: restore to an image, mount it (journal replay), check the files
//!  or start PostgreSQL on it (crash recovery), unmount, fsck -n
//! ```
//!
//! # What is checked, and why it means something
//! A snapshot of an attached disk is crash-consistent: what a power cut at
//! that instant would leave. So each restored point is treated as a disk
//! after a power cut: it is mounted (the journal is replayed, as at boot),
//! and then:
//! * **files** (ext4, xfs): every file whose `fsync` (and its directory's)
//!   returned before its backup was asked for, and whose deletion had not
//!   begun when the backup was committed, is there with its checksum. The
//!   checksums are kept in this process (and in `WORK/files.jsonl`), never on
//!   the disk. Files written after the snapshot may or may not be there;
//!   nothing is claimed about them.
//! * **PostgreSQL**: the server starts on the restored data directory (crash
//!   recovery from the WAL), `pg_amcheck --heapallindexed` finds nothing, the
//!   pgbench balances agree (the sums over accounts, tellers and branches are
//!   equal: no half transaction), and every transaction pgbench reported
//!   committed before the backup was asked for is there. pgbench runs a
//!   TPC-B-like script that also inserts one row per transaction into a
//!   `ledger` table with its client's number, and logs each committed
//!   transaction with its completion time (`--log`, in `WORK`, off the
//!   disk). A client's transactions run one after another, so the restored
//!   `ledger` must hold, per client, at least as many rows as the client saw
//!   commits before the backup was asked for, and at most one more than it
//!   saw by the time the backup was committed.
//! * every point's file system passes `e2fsck -fn` / `xfs_repair -n`.
//!
//! # Figures for teaching
//! With the VM tracked at 4 KiB ([`Figures`]): the bytes changed per minute
//! and per pgbench transaction, and the over-report: what CBT reported at
//! 4 KiB, and what the backup read (the areas out to its 64 KiB chunks,
//! exactly what a 64 KiB tracker would have reported), against the bytes
//! that truly differ between consecutive restored points.
//!
//! # Why a command, not a scenario step
//! Scenarios run a host of their own inside one process, replayable from a
//! seed and checked against a shadow model. A real guest needs what a
//! scenario cannot give: a serve that owns the VM and its device, root, the
//! kernel's file systems and a database server, and its writes are not
//! replayable. So it is a command on a datastore served by `cbtsim serve`.
//!
//! # Cleanup
//! Every mount, loop device, attached disk and child process of a run is a
//! guard that undoes itself when dropped: on success, on errors and on
//! Ctrl-C ([`Progress::cancelled`]) alike.

mod check;
mod files;
mod pg;
mod sys;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use backup::Progress;
use serde::Serialize;

use crate::action::{ActionError, ErrorKind, Request, Response};
use crate::{attach, client};

/// What runs on the attached disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RealKind {
    /// ext4 with a file tree written, fsynced and deleted, and fio on files.
    Ext4,
    /// The same on xfs.
    Xfs,
    /// PostgreSQL (on ext4, or xfs with [`RealRun::fs`]): initdb, pgbench -i, pgbench.
    Postgres,
}

/// The file system made on the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FsKind {
    /// ext4 (checked with `e2fsck -fn`).
    Ext4,
    /// xfs (checked with `xfs_repair -n`).
    Xfs,
}

impl FsKind {
    /// Its name for `mount -t`.
    pub fn name(self) -> &'static str {
        match self {
            FsKind::Ext4 => "ext4",
            FsKind::Xfs => "xfs",
        }
    }
}

impl std::str::FromStr for RealKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "ext4" => Ok(RealKind::Ext4),
            "xfs" => Ok(RealKind::Xfs),
            "postgres" | "postgresql" => Ok(RealKind::Postgres),
            _ => Err(format!("unknown real guest {s:?}: give ext4, xfs or postgres")),
        }
    }
}

impl std::str::FromStr for FsKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "ext4" => Ok(FsKind::Ext4),
            "xfs" => Ok(FsKind::Xfs),
            _ => Err(format!("unknown file system {s:?}: give ext4 or xfs")),
        }
    }
}

/// The smallest disk a run accepts (xfs needs 300 MiB).
pub const MIN_DISK: u64 = 320 << 20;
/// The unprivileged user PostgreSQL runs as by default.
pub const DEFAULT_PG_USER: &str = "postgres";

/// A real-guest run ([`run`]).
#[derive(Debug, Clone)]
pub struct RealRun {
    /// The datastore, served by a running `cbtsim serve`.
    pub datastore: PathBuf,
    /// The VM (powered on; tracked at 4 KiB for the 4 KiB figures).
    pub vm: String,
    /// Its disk to attach (everything on it is overwritten).
    pub disk: usize,
    /// What runs on it.
    pub kind: RealKind,
    /// The file system: for ext4 and xfs runs their own; for PostgreSQL the one under it.
    pub fs: FsKind,
    /// How long the work runs, in seconds.
    pub seconds: f64,
    /// Seconds between backups (the first at the start of the work).
    pub backup_every: f64,
    /// The backup repository (created when missing).
    pub repository: PathBuf,
    /// A directory outside the disk: mount points, checksums, pgbench's
    /// logs, restored images (created when missing).
    pub work_dir: PathBuf,
    /// File-tree writer threads, or pgbench clients.
    pub writers: u32,
    /// Seeds the file tree's sizes and contents.
    pub seed: u64,
    /// The unprivileged user PostgreSQL runs as.
    pub pg_user: String,
    /// pgbench's scale (100 000 accounts each).
    pub pg_scale: u32,
}

/// Why a run failed.
#[derive(Debug, thiserror::Error)]
pub enum RealError {
    /// This machine or datastore cannot run it: not root, no FUSE or loop
    /// devices, a tool missing, no serve. Nothing was changed.
    #[error("{0}")]
    Unsupported(String),
    /// The service refused or failed a request.
    #[error(transparent)]
    Service(#[from] ActionError),
    /// A step failed.
    #[error("{what}: {detail}")]
    Failed {
        /// The step.
        what: String,
        /// What went wrong (a tool's status and the end of its output).
        detail: String,
    },
    /// A file operation failed.
    #[error("{what}: {source}")]
    Io {
        /// The operation.
        what: String,
        /// The error.
        source: std::io::Error,
    },
    /// The backup repository failed.
    #[error("{what}: {source}")]
    Backup {
        /// The operation.
        what: String,
        /// The error.
        source: backup::BackupError,
    },
    /// Stopped by the user (Ctrl-C); everything was cleaned up.
    #[error("interrupted: the work stopped, the disk was detached")]
    Interrupted,
}

impl RealError {
    pub(crate) fn failed(what: &str, detail: impl Into<String>) -> Self {
        RealError::Failed {
            what: what.to_owned(),
            detail: detail.into(),
        }
    }

    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        RealError::Io {
            what: what.into(),
            source,
        }
    }

    /// Whether the machine lacks something the run needs (root, FUSE, loop
    /// devices, a tool, a serve), rather than the run failing.
    pub fn is_unsupported(&self) -> bool {
        match self {
            RealError::Unsupported(_) => true,
            RealError::Service(e) => e.kind == ErrorKind::Unsupported,
            _ => false,
        }
    }
}

/// What a run did and found ([`run`]).
#[derive(Debug, Clone, Serialize)]
pub struct RealReport {
    /// The VM.
    pub vm: String,
    /// Its disk.
    pub disk: usize,
    /// What ran.
    pub kind: RealKind,
    /// The file system.
    pub fs: FsKind,
    /// The block device it ran on.
    pub device: PathBuf,
    /// The disk's capacity.
    pub capacity: u64,
    /// Its tracking granularity.
    pub granularity: u64,
    /// Seconds the work ran (backups taken meanwhile).
    pub seconds: f64,
    /// Seconds between backups.
    pub backup_every: f64,
    /// The work done.
    pub work: WorkReport,
    /// Each backup point of the run, restored and checked.
    pub points: Vec<PointReport>,
    /// The figures for teaching.
    pub figures: Figures,
    /// Every check that failed (empty: all passed).
    pub problems: Vec<String>,
    /// Whether every check passed.
    pub ok: bool,
    /// Where the logs and the last checked image are.
    pub work_dir: PathBuf,
}

/// The work a run did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct WorkReport {
    /// Files written and fsynced (file-tree runs).
    pub files_written: u64,
    /// Their bytes.
    pub file_bytes_written: u64,
    /// Files deleted.
    pub files_deleted: u64,
    /// Bytes fio wrote (file-tree runs).
    pub fio_bytes_written: Option<u64>,
    /// fio's writes.
    pub fio_writes: Option<u64>,
    /// pgbench (PostgreSQL runs).
    pub pgbench: Option<PgbenchReport>,
}

/// What pgbench did.
#[derive(Debug, Clone, Serialize)]
pub struct PgbenchReport {
    /// Clients.
    pub clients: u32,
    /// Scale.
    pub scale: u32,
    /// Transactions it reported committed (its log).
    pub transactions: u64,
    /// Transactions per second, as pgbench reported.
    pub tps: f64,
    /// Transactions that failed.
    pub failed: u64,
}

/// One backup point of a run, restored and checked.
#[derive(Debug, Clone, Serialize)]
pub struct PointReport {
    /// Its ID in the repository.
    pub point: String,
    /// `full` or `incremental`.
    pub kind: String,
    /// When its backup was asked for, in seconds since the work began.
    pub at_s: f64,
    /// Seconds the backup took (to its commit).
    pub backup_s: f64,
    /// Changed areas of the attached disk the query returned.
    pub changed_areas: u64,
    /// Their bytes (at the disk's granularity).
    pub changed_bytes: u64,
    /// Bytes the backup read (the areas out to its chunks).
    pub bytes_read: u64,
    /// Bytes of new chunks stored (deduplicated, compressed).
    pub bytes_stored: u64,
    /// Bytes that differ from the previous point of the run (restored images compared).
    pub differing_bytes: Option<u64>,
    /// Bytes of the 4 KiB blocks that differ.
    pub differing_4k_bytes: Option<u64>,
    /// Bytes of the 64 KiB blocks that differ.
    pub differing_64k_bytes: Option<u64>,
    /// Whether `e2fsck -fn` / `xfs_repair -n` passed (after the journal replay of a mount).
    pub fsck_ok: bool,
    /// Files checked against their checksums (file-tree runs).
    pub files_checked: Option<u64>,
    /// Of those, missing or different.
    pub files_bad: Option<u64>,
    /// The database check (PostgreSQL runs).
    pub database: Option<DbCheck>,
    /// What failed at this point.
    pub problems: Vec<String>,
}

/// The database of a restored point.
#[derive(Debug, Clone, Serialize)]
pub struct DbCheck {
    /// Seconds PostgreSQL took to start (crash recovery).
    pub start_s: f64,
    /// Whether `pg_amcheck --heapallindexed` passed.
    pub amcheck_ok: bool,
    /// Whether the pgbench balances agree (accounts, tellers, branches).
    pub balances_agree: bool,
    /// Transactions pgbench saw committed before the backup was asked for.
    pub acked_before_backup: u64,
    /// Transactions pgbench saw committed by the backup's commit.
    pub acked_by_backup_end: u64,
    /// Ledger rows in the restored database.
    pub ledger_rows: u64,
    /// Clients whose rows fall outside their bounds.
    pub clients_out_of_bounds: u64,
}

/// The figures for teaching, over the run's incremental points.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Figures {
    /// Incremental points they are taken over.
    pub incrementals: usize,
    /// Bytes reported changed per minute (at the disk's granularity).
    pub changed_bytes_per_minute: Option<f64>,
    /// Bytes the backups read per minute (64 KiB chunks).
    pub read_bytes_per_minute: Option<f64>,
    /// Bytes the backups stored per minute (deduplicated, compressed).
    pub stored_bytes_per_minute: Option<f64>,
    /// pgbench transactions committed over the incrementals' intervals.
    pub transactions: Option<u64>,
    /// Bytes reported changed per committed transaction (at the disk's granularity).
    pub changed_bytes_per_transaction: Option<f64>,
    /// Bytes read per committed transaction (64 KiB chunks).
    pub read_bytes_per_transaction: Option<f64>,
    /// Bytes reported changed, all incrementals.
    pub reported_bytes: u64,
    /// Bytes read, all incrementals.
    pub read_bytes: u64,
    /// Bytes that truly differ between consecutive points.
    pub differing_bytes: u64,
    /// Bytes of the 4 KiB blocks that differ.
    pub differing_4k_bytes: u64,
    /// Bytes of the 64 KiB blocks that differ.
    pub differing_64k_bytes: u64,
    /// Reported / differing bytes, at the disk's granularity.
    pub over_report: Option<f64>,
    /// Read / differing bytes: at 64 KiB (the backup's chunks), when the
    /// disk is tracked at 64 KiB or finer.
    pub over_report_64k: Option<f64>,
}

/// A backup the schedule took.
#[derive(Debug, Clone)]
pub(crate) struct Taken {
    pub(crate) outcome: backup::BackupReport,
    /// Asked for / committed, in seconds since the work began.
    pub(crate) sent_s: f64,
    pub(crate) done_s: f64,
    /// The same in microseconds since the Unix epoch (pgbench's log clock).
    pub(crate) sent_us: u64,
    pub(crate) done_us: u64,
}

fn epoch_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// What the run needs from this machine that is missing (empty: nothing).
pub fn missing(kind: RealKind, fs: FsKind, pg_user: &str) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(why) = attach::missing_support() {
        out.push(why);
    }
    let mut tools = vec![("mount", "mount"), ("losetup", "mount")];
    match fs {
        FsKind::Ext4 => tools.extend([("mkfs.ext4", "e2fsprogs"), ("e2fsck", "e2fsprogs")]),
        FsKind::Xfs => tools.extend([("mkfs.xfs", "xfsprogs"), ("xfs_repair", "xfsprogs")]),
    }
    match kind {
        RealKind::Ext4 | RealKind::Xfs => tools.push(("fio", "fio")),
        RealKind::Postgres => tools.push(("runuser", "util-linux")),
    }
    out.extend(tools.into_iter().filter_map(|(t, p)| sys::tool(t, p).err()));
    if kind == RealKind::Postgres {
        if let Err(e) = pg::Bins::find() {
            out.push(e);
        }
        if sys::user_ids(pg_user).is_none() {
            out.push(format!(
                "user {pg_user:?} does not exist: PostgreSQL refuses to run as root (useradd --system {pg_user})"
            ));
        }
    }
    out
}

/// The attached disk of a run; detached when dropped (what is mounted on it
/// is unmounted first).
struct AttachedDisk<'a> {
    datastore: &'a Path,
    vm: String,
    disk: usize,
    device: PathBuf,
    attached: bool,
}

impl<'a> AttachedDisk<'a> {
    fn new(datastore: &'a Path, vm: &str, disk: usize) -> Result<Self, RealError> {
        let r = client::call(
            datastore,
            &Request::DiskAttach {
                vm: vm.to_owned(),
                disk,
            },
            &(),
        )?;
        let Response::Attached(a) = r else {
            return Err(RealError::failed(
                "disk attach",
                "the service gave an unexpected answer",
            ));
        };
        Ok(AttachedDisk {
            datastore,
            vm: vm.to_owned(),
            disk,
            device: a.device,
            attached: true,
        })
    }

    fn detach(mut self) -> Result<(), RealError> {
        self.attached = false;
        client::call(
            self.datastore,
            &Request::DiskDetach {
                vm: self.vm.clone(),
                disk: self.disk,
            },
            &(),
        )?;
        Ok(())
    }
}

impl Drop for AttachedDisk<'_> {
    fn drop(&mut self) {
        if self.attached {
            for m in attach::mounts_of(&self.device) {
                let _ = attach::unmount(&m);
            }
            let _ = client::call(
                self.datastore,
                &Request::DiskDetach {
                    vm: self.vm.clone(),
                    disk: self.disk,
                },
                &(),
            );
        }
    }
}

/// The run's clock and what the schedule needs.
pub(crate) struct Clock {
    pub(crate) t0: Instant,
}

impl Clock {
    pub(crate) fn now_s(&self) -> f64 {
        self.t0.elapsed().as_secs_f64()
    }
}

/// Takes a backup every `r.backup_every` seconds (the first at once) until
/// `r.seconds` have passed since `clock.t0`, or `stop` is set (a worker
/// failed); stops early with [`RealError::Interrupted`] on Ctrl-C.
fn schedule(r: &RealRun, clock: &Clock, stop: &AtomicBool, progress: &dyn Progress) -> Result<Vec<Taken>, RealError> {
    let repository = std::path::absolute(&r.repository)
        .map_err(|e| RealError::io(format!("invalid repository path {}", r.repository.display()), e))?;
    let mut taken = Vec::new();
    let mut next: f64 = 0.0;
    loop {
        // Wait for the next slot, or the end of the work.
        let target = next.min(r.seconds);
        while clock.now_s() < target {
            if progress.cancelled() {
                return Err(RealError::Interrupted);
            }
            if stop.load(Ordering::Relaxed) {
                return Ok(taken);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if next >= r.seconds {
            return Ok(taken);
        }
        let sent_s = clock.now_s();
        let sent_us = epoch_us();
        let req = Request::BackupRun {
            vm: r.vm.clone(),
            repository: repository.clone(),
            full: false,
            no_compress: false,
        };
        let outcome = match client::call(&r.datastore, &req, &())? {
            Response::Backup(b) => b,
            _ => return Err(RealError::failed("backup run", "the service gave an unexpected answer")),
        };
        let t = Taken {
            outcome,
            sent_s,
            done_s: clock.now_s(),
            sent_us,
            done_us: epoch_us(),
        };
        progress.note(&format!(
            "{:6.1} s  backup: point {} ({}), {} changed in {} area(s), {:.2} s",
            t.sent_s,
            t.outcome.point,
            t.outcome.kind,
            workloads::human(t.outcome.changed_bytes),
            t.outcome.changed_areas,
            t.done_s - t.sent_s
        ));
        taken.push(t);
        next += r.backup_every;
        // A backup slower than the interval: the next one right away.
        next = next.max(clock.now_s());
    }
}

fn validate(r: &RealRun) -> Result<(), RealError> {
    let bad = |m: String| Err(RealError::Service(ActionError::invalid(m)));
    if !(r.seconds > 0.0 && r.seconds <= 86_400.0) {
        return bad(format!(
            "invalid --seconds {}: give more than 0 and at most 86400",
            r.seconds
        ));
    }
    if !(r.backup_every >= 1.0 && r.backup_every <= 86_400.0) {
        return bad(format!(
            "invalid --backup-every {}: give 1 to 86400 seconds",
            r.backup_every
        ));
    }
    if !(1..=64).contains(&r.writers) {
        return bad(format!(
            "invalid --threads {}: give 1 to 64 writers or clients",
            r.writers
        ));
    }
    if !(1..=1000).contains(&r.pg_scale) {
        return bad(format!("invalid --scale {}: give 1 to 1000", r.pg_scale));
    }
    Ok(())
}

/// Runs a real guest on disk `r.disk` of VM `r.vm` (attached through the
/// datastore's serve), backs it up every `r.backup_every` seconds while it
/// works, then restores and checks every point (see the [module
/// docs](self)). The disk's content is replaced. `progress` hears each step
/// as a note; its [`cancelled`](Progress::cancelled) stops the run, cleanly.
///
/// A check that fails is in the report's `problems` (not an error): the
/// error is for a run that could not be carried out.
pub fn run(r: &RealRun, progress: &dyn Progress) -> Result<RealReport, RealError> {
    validate(r)?;
    let kind_fs = match r.kind {
        RealKind::Ext4 => FsKind::Ext4,
        RealKind::Xfs => FsKind::Xfs,
        RealKind::Postgres => r.fs,
    };
    let missing = missing(r.kind, kind_fs, &r.pg_user);
    if !missing.is_empty() {
        return Err(RealError::Unsupported(format!(
            "a real-guest run needs: {}",
            missing.join("; ")
        )));
    }
    if !client::is_serving(&r.datastore) {
        return Err(RealError::Unsupported(format!(
            "a real-guest run needs a running host: start `cbtsim serve` (as root) on datastore {}",
            r.datastore.display()
        )));
    }
    let details = match client::call(&r.datastore, &Request::VmShow { vm: r.vm.clone() }, &())? {
        Response::VmDetails(d) => d,
        _ => return Err(RealError::failed("vm show", "the service gave an unexpected answer")),
    };
    let Some(disk) = details.disks.get(r.disk).cloned() else {
        return Err(RealError::Service(ActionError::new(
            ErrorKind::NotFound,
            format!("VM {:?} has no disk {}", r.vm, r.disk),
        )));
    };
    if disk.capacity < MIN_DISK {
        return Err(RealError::Service(ActionError::invalid(format!(
            "disk {} of VM {:?} is {}: a real guest needs at least {} (cbtsim vm create {} --disk 1G --granularity 4K)",
            r.disk,
            r.vm,
            workloads::human(disk.capacity),
            workloads::human(MIN_DISK),
            r.vm
        ))));
    }
    sys::mkdir(&r.work_dir)?;
    let work = std::path::absolute(&r.work_dir)
        .map_err(|e| RealError::io(format!("invalid work directory {}", r.work_dir.display()), e))?;
    // PostgreSQL's user reaches its socket and log directories through it.
    sys::chmod(&work, 0o755)?;

    progress.note(&format!("attaching disk {} of VM {}", r.disk, r.vm));
    let attached = AttachedDisk::new(&r.datastore, &r.vm, r.disk)?;
    let device = attached.device.clone();
    progress.note(&format!("{}: mkfs.{}", device.display(), kind_fs.name()));
    check::mkfs(kind_fs, &device)?;
    let mount = sys::Mount::new(&device, &work.join("mnt"), kind_fs.name(), "")?;
    progress.note(&format!("mounted {} on {}", device.display(), mount.dir().display()));

    let file_log = files::FileLog::default();
    let (taken, work_report, ledger) = match r.kind {
        RealKind::Ext4 | RealKind::Xfs => {
            let (taken, w) = files::work(r, mount.dir(), &work, &file_log, progress)?;
            (taken, w, None)
        }
        RealKind::Postgres => {
            let (taken, w, ledger) = pg::work(r, mount.dir(), &work, progress)?;
            (taken, w, Some(ledger))
        }
    };
    progress.note("work done: unmounting and detaching");
    mount.unmount()?;
    attached.detach()?;
    if taken.is_empty() {
        return Err(RealError::failed("the backup schedule", "no backup was taken"));
    }
    file_log.save(&work.join("files.jsonl"))?;

    let inputs = check::Inputs {
        run: r,
        fs: kind_fs,
        work: &work,
        files: (r.kind != RealKind::Postgres).then_some(&file_log),
        ledger: ledger.as_ref(),
    };
    let points = check::check_points(&inputs, &taken, progress)?;
    let figures = check::figures(&points, &taken, disk.granularity, ledger.as_ref());
    let problems: Vec<String> = points
        .iter()
        .flat_map(|p| p.problems.iter().map(move |m| format!("point {}: {m}", p.point)))
        .collect();
    Ok(RealReport {
        vm: r.vm.clone(),
        disk: r.disk,
        kind: r.kind,
        fs: kind_fs,
        device,
        capacity: disk.capacity,
        granularity: disk.granularity,
        seconds: r.seconds,
        backup_every: r.backup_every,
        work: work_report,
        points,
        figures,
        ok: problems.is_empty(),
        problems,
        work_dir: work,
    })
}

/// `cmd` as user `user` (through `runuser`), in directory `dir`.
pub(crate) fn as_user(user: &str, dir: &Path, program: &Path) -> Command {
    let mut c = Command::new(sys::find_tool("runuser").unwrap_or_else(|| "runuser".into()));
    c.args(["-u", user, "--"])
        .arg(program)
        .current_dir(dir)
        .env("LC_ALL", "C");
    c
}
