//! [`Service`]: the host, opened once, and the one function every front end
//! calls, [`Service::execute`].

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use backup::{BackupOptions, Compression, Progress, Repository};
use base64::Engine as _;
use parking_lot::{Mutex, RwLock};
use sim::{DiskSpec, Host, Vm};
use tracker::Granularity;
use vadp::{DataProtection, DiskChangeInfo, SnapshotInfo, VadpError};

use crate::action::{
    ActionError, ChangedAreas, ErrorKind, IoDone, Request, Response, SnapshotEntry, VmInfo, WriteData,
};
use crate::guest::Guests;
use crate::reader::Reader;

/// Bytes per call to the host when writing or reading large ranges.
const CHUNK: u64 = 4 << 20;
/// The most bytes a [`Request::DiskRead`] returns inline (larger reads need `out`).
pub const MAX_INLINE_READ: u64 = 4 << 20;

/// Whether a snapshot may still be read through an export: set once, under
/// the write lock, before the snapshot is removed. Readers hold the read lock
/// for the whole read, so a removal waits for reads in flight and every read
/// after it fails: never a read of a snapshot that is gone, nor of a new one
/// that took its name.
#[derive(Debug, Default)]
pub(crate) struct Liveness {
    gone: RwLock<bool>,
}

impl Liveness {
    /// Runs `f` if the snapshot is still there (under the read lock).
    pub(crate) fn read<T>(&self, f: impl FnOnce() -> T) -> Option<T> {
        let gone = self.gone.read();
        if *gone {
            None
        } else {
            Some(f())
        }
    }
}

/// The host as a service: one process owns the datastore and keeps its VMs
/// open; every front end calls [`execute`](Self::execute).
///
/// Lifecycle operations on one VM (snapshot create, remove, revert, and the
/// snapshots a backup takes) are serialised by a per-VM lock here, and every
/// snapshot removal goes through [`Liveness`], so an NBD export of a snapshot
/// fails cleanly once its snapshot is gone.
#[derive(Debug)]
pub struct Service {
    host: Host,
    /// (VM, snapshot) -> liveness, for snapshots with an export open or
    /// being removed.
    watched: Mutex<HashMap<(String, String), Arc<Liveness>>>,
    /// Per-VM lifecycle locks.
    lifecycle: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    pub(crate) guests: Guests,
    stopping: AtomicBool,
    /// Read-only requests read through read-only views ([`Service::local`])
    /// instead of the VMs this service keeps open.
    views: bool,
}

impl Service {
    /// Opens the datastore at `root` (creating it if needed) and every VM in
    /// it, taking their locks: while the service runs no other process can
    /// open them.
    pub fn open(root: &Path) -> Result<Self, ActionError> {
        let host = Host::open(root)?;
        for v in host.list()? {
            host.vm(&v.name)
                .map_err(|e| ActionError::from(e).context(format_args!("cannot open VM {:?}", v.name)))?;
        }
        Ok(Self::over(host, false))
    }

    /// The datastore at `root` (created if needed) for the requests of one
    /// command, in its own process (`cbtsim` without a serve): VMs are opened
    /// when a request needs them, and read-only requests (snapshot list,
    /// query, vm show) read through read-only views, which write nothing and
    /// let other readers in.
    pub fn local(root: &Path) -> Result<Self, ActionError> {
        Ok(Self::over(Host::open(root)?, true))
    }

    fn over(host: Host, views: bool) -> Self {
        Service {
            host,
            watched: Mutex::new(HashMap::new()),
            lifecycle: Mutex::new(HashMap::new()),
            guests: Guests::default(),
            stopping: AtomicBool::new(false),
            views,
        }
    }

    /// VM `vm` for a read-only request.
    pub(crate) fn reader(&self, vm: &str) -> Result<Reader, ActionError> {
        Ok(if self.views {
            Reader::View(self.host.view(vm)?)
        } else {
            Reader::Open(self.host.vm(vm)?)
        })
    }

    /// The datastore directory.
    pub fn root(&self) -> &Path {
        self.host.root()
    }

    pub(crate) fn host(&self) -> &Host {
        &self.host
    }

    /// Refuses new requests ([`ErrorKind::ShuttingDown`]) and stops every
    /// guest workload, waiting for them. Idempotent.
    pub fn shut_down(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.guests.stop_all();
    }

    /// Whether [`shut_down`](Self::shut_down) was called.
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Runs one request. `progress` hears about long transfers (writes and
    /// reads of many chunks, backups, guest workloads that wait).
    pub fn execute(&self, request: Request, progress: &dyn Progress) -> Result<Response, ActionError> {
        if self.is_stopping() {
            return Err(ActionError::new(
                ErrorKind::ShuttingDown,
                "the service is shutting down",
            ));
        }
        match request {
            Request::VmCreate { vm, disks, granularity } => {
                sim::check_name(&vm)?;
                let g = Granularity::new(granularity)
                    .map_err(|e| ActionError::invalid(format!("invalid granularity {granularity}: {e}")))?;
                if disks.is_empty() {
                    return Err(ActionError::invalid("a VM needs at least one disk"));
                }
                for &n in &disks {
                    check_disk_size(n)?;
                }
                let specs: Vec<DiskSpec> = disks
                    .iter()
                    .map(|&capacity| DiskSpec {
                        capacity,
                        granularity: g,
                    })
                    .collect();
                let v = self.host.create_vm(&vm, &specs)?;
                Ok(Response::VmCreated(self.info(&v)))
            }
            Request::VmList {} => Ok(Response::Vms(self.host.list()?.into_iter().map(VmInfo::from).collect())),
            Request::VmCbt { vm, on } => {
                let v = self.host.vm(&vm)?;
                let _l = self.lock_lifecycle(&vm);
                let was = v.cbt();
                v.set_cbt(on)?;
                Ok(Response::Cbt { vm, was, on })
            }
            Request::VmPower { vm, on } => {
                self.host.vm(&vm)?.set_power(on)?;
                Ok(Response::Power { vm, on })
            }
            Request::DiskWrite { vm, disk, offset, data } => self.write(vm, disk, offset, data, progress),
            Request::DiskRead {
                vm,
                disk,
                offset,
                length,
                snapshot,
                out,
            } => self.read(vm, disk, offset, length, snapshot, out, progress),
            Request::DiskUnmap {
                vm,
                disk,
                offset,
                length,
            } => {
                let v = self.host.vm(&vm)?;
                v.unmap(disk, offset, length)?;
                Ok(Response::Unmapped(IoDone {
                    capacity: v.capacity(disk)?,
                    vm,
                    disk,
                    offset,
                    length,
                }))
            }
            Request::DiskExtend { vm, disk, size } => {
                let v = self.host.vm(&vm)?;
                let old_size = v.capacity(disk)?;
                v.extend_disk(disk, size)?;
                Ok(Response::Extended {
                    vm,
                    disk,
                    size,
                    old_size,
                })
            }
            Request::SnapshotCreate { vm, name } => Ok(Response::SnapshotCreated(self.create_snapshot(&vm, &name)?)),
            Request::SnapshotList { vm } => {
                let snapshots = self
                    .reader(&vm)?
                    .snapshots()
                    .into_iter()
                    .map(SnapshotEntry::from)
                    .collect();
                Ok(Response::Snapshots { vm, snapshots })
            }
            Request::SnapshotRemove { vm, name } => {
                self.remove_snapshot(&vm, &name)?;
                let snapshots = self.snapshot_names(&vm)?;
                Ok(Response::SnapshotRemoved { vm, name, snapshots })
            }
            Request::SnapshotRevert { vm, name } => {
                self.revert(&vm, &name)?;
                let snapshots = self.snapshot_names(&vm)?;
                Ok(Response::Reverted { vm, name, snapshots })
            }
            Request::Query {
                vm,
                snapshot,
                disk,
                since,
            } => Ok(Response::ChangedAreas(self.query(vm, snapshot, disk, since)?)),
            Request::BackupRun {
                vm,
                repository,
                full,
                no_compress,
            } => {
                let repository = absolute("repository", repository)?;
                let repo = Repository::create_or_open(&repository).map_err(|e| {
                    ActionError::from(e).context(format_args!("cannot open repository {}", repository.display()))
                })?;
                let opts = BackupOptions {
                    full,
                    compression: if no_compress {
                        Compression::None
                    } else {
                        Compression::Zstd
                    },
                    time: None,
                };
                let report = backup::backup_vm(&Guarded(self), &vm, &repo, &opts, progress)
                    .map_err(|e| ActionError::from(e).context(format_args!("backup of VM {vm} failed")))?;
                Ok(Response::Backup(report.into()))
            }
            Request::GuestRun(run) => {
                let v = self.host.vm(&run.vm)?;
                self.guests.run(v, run, progress)
            }
            Request::GuestList {} => Ok(Response::Guests(self.guests.list())),
            Request::GuestStop { id } => Ok(Response::Guest(self.guests.stop(id)?)),
            Request::Map(m) => Ok(Response::Map(Box::new(self.map(m)?))),
            Request::BackupList { repository } => {
                let repository = absolute("repository", repository)?;
                let repo = Repository::open(&repository)?;
                Ok(Response::BackupPoints(
                    backup::list(&repo)?.into_iter().map(Into::into).collect(),
                ))
            }
            Request::VmDelete { vm } => self.delete_vm(vm),
            Request::VmShow { vm } => Ok(Response::VmDetails(self.reader(&vm)?.details()?)),
            Request::GuestWait { id } => Ok(Response::Guest(self.guests.wait_for(id, progress)?)),
            Request::RestoreToVm { repository, point, vm } => self.restore_to_vm(repository, point, vm, progress),
            Request::BackupRepair { repository } => self.repair(repository, progress),
            Request::QueryPage {
                vm,
                snapshot,
                disk,
                start_offset,
                since,
                max_areas,
            } => {
                let max = max_areas.unwrap_or(sim::DEFAULT_MAX_AREAS);
                if max == 0 {
                    return Err(ActionError::invalid("max_areas must be at least 1"));
                }
                let page =
                    self.host
                        .vm(&vm)?
                        .query_changed_disk_areas_max(&snapshot, disk, start_offset, &since, max)?;
                Ok(Response::ChangedAreaPage(page))
            }
            Request::VmChangeIds { vm } => {
                let v = self.host.vm(&vm)?;
                let ids = (0..v.disk_count())
                    .map(|d| {
                        let t = v.tracker(d)?;
                        Ok(t.change_id(t.last_closed()).map(|c| c.to_string()))
                    })
                    .collect::<Result<_, sim::SimError>>()?;
                Ok(Response::ChangeIds(ids))
            }
        }
    }

    /// The names of `vm`'s snapshots, oldest first (after a change: through the VM the
    /// change opened).
    fn snapshot_names(&self, vm: &str) -> Result<Vec<String>, ActionError> {
        Ok(self.host.vm(vm)?.snapshots().into_iter().map(|s| s.name).collect())
    }

    fn delete_vm(&self, vm: String) -> Result<Response, ActionError> {
        if let Some(id) = self.guests.running_on(&vm) {
            return Err(ActionError::new(
                ErrorKind::InUse,
                format!("guest workload {id} is running on VM {vm:?}: stop it before deleting the VM"),
            ));
        }
        let _l = self.lock_lifecycle(&vm);
        self.host.delete_vm(&vm)?;
        Ok(Response::VmDeleted { vm })
    }

    fn open_repository(repository: PathBuf) -> Result<Repository, ActionError> {
        let repository = absolute("repository", repository)?;
        Repository::open(&repository)
            .map_err(|e| ActionError::from(e).context(format_args!("cannot open repository {}", repository.display())))
    }

    fn restore_to_vm(
        &self,
        repository: PathBuf,
        point: String,
        vm: String,
        progress: &dyn Progress,
    ) -> Result<Response, ActionError> {
        sim::check_name(&vm)?;
        let repo = Self::open_repository(repository)?;
        let r = backup::restore_to_vm(&repo, &point, &self.host, &vm, progress)
            .map_err(|e| ActionError::from(e).context(format_args!("restore of point {point} to VM {vm} failed")))?;
        Ok(Response::Restored(r.into()))
    }

    fn repair(&self, repository: PathBuf, progress: &dyn Progress) -> Result<Response, ActionError> {
        let repo = Self::open_repository(repository)?;
        Ok(Response::Repaired(
            backup::repair(&repo, &Guarded(self), progress)?.into(),
        ))
    }

    fn info(&self, v: &Vm) -> VmInfo {
        VmInfo {
            name: v.name().to_owned(),
            powered_on: v.powered_on(),
            cbt: v.cbt(),
            disks: (0..v.disk_count()).filter_map(|d| v.capacity(d).ok()).collect(),
            snapshots: v.snapshots().into_iter().map(|s| s.name).collect(),
        }
    }

    fn write(
        &self,
        vm: String,
        disk: usize,
        offset: u64,
        data: WriteData,
        progress: &dyn Progress,
    ) -> Result<Response, ActionError> {
        let v = self.host.vm(&vm)?;
        let (length, mut source): (u64, Box<dyn Read>) = match data {
            WriteData::Pattern { byte, length } => (length, Box::new(std::io::repeat(byte))),
            WriteData::Base64(s) => {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(s.as_bytes())
                    .map_err(|e| ActionError::invalid(format!("data is not valid base64: {e}")))?;
                (bytes.len() as u64, Box::new(std::io::Cursor::new(bytes)))
            }
            WriteData::File { path, length } => {
                let path = absolute("file", path)?;
                let f = std::fs::File::open(&path).map_err(|e| io_error("cannot open", &path, e))?;
                let have = f.metadata().map_err(|e| io_error("cannot stat", &path, e))?.len();
                if have < length {
                    return Err(ActionError::invalid(format!(
                        "{} holds {have} bytes, fewer than the {length} to write",
                        path.display()
                    )));
                }
                (length, Box::new(f))
            }
        };
        // Checked up front, so a bad range writes nothing.
        let capacity = v.capacity(disk)?;
        check_range(&vm, disk, offset, length, capacity)?;
        if !v.powered_on() {
            return Err(sim::SimError::PoweredOff(vm).into());
        }
        progress.begin("write", Some(length));
        let mut buf = vec![0u8; CHUNK.min(length) as usize];
        let mut done = 0;
        while done < length {
            let n = CHUNK.min(length - done) as usize;
            source
                .read_exact(&mut buf[..n])
                .map_err(|e| ActionError::new(ErrorKind::Io, format!("cannot read the data to write: {e}")))?;
            v.write(disk, offset + done, &buf[..n])?;
            done += n as u64;
            progress.advance(n as u64);
        }
        progress.end();
        Ok(Response::Written(IoDone {
            vm,
            disk,
            offset,
            length,
            capacity,
        }))
    }

    #[allow(clippy::too_many_arguments)]
    fn read(
        &self,
        vm: String,
        disk: usize,
        offset: u64,
        length: u64,
        snapshot: Option<String>,
        out: Option<PathBuf>,
        progress: &dyn Progress,
    ) -> Result<Response, ActionError> {
        let v = self.host.vm(&vm)?;
        let capacity = match &snapshot {
            Some(s) => v.snapshot_capacity(s, disk)?,
            None => v.capacity(disk)?,
        };
        check_range(&vm, disk, offset, length, capacity)?;
        let read = |at: u64, buf: &mut [u8]| -> Result<(), ActionError> {
            match &snapshot {
                Some(s) => Ok(v.read_snapshot(s, disk, at, buf)?),
                None => Ok(v.read(disk, at, buf)?),
            }
        };
        let io = IoDone {
            vm: vm.clone(),
            disk,
            offset,
            length,
            capacity,
        };
        let Some(out) = out else {
            if length > MAX_INLINE_READ {
                return Err(ActionError::new(
                    ErrorKind::TooLarge,
                    format!("a read of {length} bytes is over the {MAX_INLINE_READ} returned inline: give a file"),
                ));
            }
            let mut buf = vec![0u8; length as usize];
            read(offset, &mut buf)?;
            return Ok(Response::Read {
                io,
                snapshot,
                out: None,
                data: Some(base64::engine::general_purpose::STANDARD.encode(&buf)),
            });
        };
        let out = absolute("out", out)?;
        let dir = out.parent().unwrap_or(Path::new("/"));
        let tmp = tempfile::Builder::new()
            .prefix(".cbtsim-read")
            .tempfile_in(dir)
            .map_err(|e| io_error("cannot create a file in", dir, e))?;
        progress.begin("read", Some(length));
        let mut buf = vec![0u8; CHUNK.min(length) as usize];
        let mut done = 0;
        while done < length {
            let n = CHUNK.min(length - done) as usize;
            read(offset + done, &mut buf[..n])?;
            write_sparse(tmp.as_file(), done, &buf[..n]).map_err(|e| io_error("cannot write", &out, e))?;
            done += n as u64;
            progress.advance(n as u64);
        }
        progress.end();
        // Holes up to the end: the zeros of the range are never written.
        tmp.as_file()
            .set_len(length)
            .map_err(|e| io_error("cannot write", &out, e))?;
        tmp.as_file()
            .sync_all()
            .map_err(|e| io_error("cannot write", &out, e))?;
        tmp.persist(&out).map_err(|e| io_error("cannot write", &out, e.error))?;
        Ok(Response::Read {
            io,
            snapshot,
            out: Some(out),
            data: None,
        })
    }

    fn query(&self, vm: String, snapshot: String, disk: usize, since: String) -> Result<ChangedAreas, ActionError> {
        let since = since.trim().to_owned();
        if since != "*" {
            since.parse::<tracker::ChangeId>()?;
        }
        let v = self.reader(&vm)?;
        let disk_size = v.snapshot_capacity(&snapshot, disk)?;
        let granularity = v.granularity(disk)?;
        let change_id = v
            .snapshots()
            .into_iter()
            .find(|s| s.name == snapshot)
            .and_then(|s| s.disks.into_iter().nth(disk))
            .and_then(|d| d.change_id);
        let areas = vadp::changed_areas(v.protection(), &vm, &snapshot, disk, &since)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| {
                ActionError::from(e).context(format_args!(
                    "query of disk {disk} of snapshot {snapshot} of VM {vm} since {since}"
                ))
            })?;
        let changed_bytes = areas.iter().map(|a| a.length).sum();
        Ok(ChangedAreas {
            vm,
            snapshot,
            disk,
            disk_size,
            granularity,
            since,
            change_id,
            areas,
            changed_bytes,
        })
    }

    fn lock_lifecycle(&self, vm: &str) -> parking_lot::ArcMutexGuard<parking_lot::RawMutex, ()> {
        let m = self.lifecycle.lock().entry(vm.to_owned()).or_default().clone();
        m.lock_arc()
    }

    pub(crate) fn create_snapshot(&self, vm: &str, name: &str) -> Result<SnapshotInfo, ActionError> {
        let v = self.host.vm(vm)?;
        let _l = self.lock_lifecycle(vm);
        Ok(v.create_snapshot(name)?)
    }

    /// The liveness of snapshot `snap` of `vm`, for an export about to open it.
    pub(crate) fn watch(&self, vm: &str, snap: &str) -> Arc<Liveness> {
        self.watched
            .lock()
            .entry((vm.to_owned(), snap.to_owned()))
            .or_default()
            .clone()
    }

    /// Runs `remove`, which deletes snapshots `names` of `vm`, after marking
    /// them gone for their exports (waiting for reads in flight).
    fn retiring<T>(&self, vm: &str, names: &[String], remove: impl FnOnce() -> T) -> T {
        let marks: Vec<Arc<Liveness>> = names.iter().map(|n| self.watch(vm, n)).collect();
        for m in &marks {
            *m.gone.write() = true;
        }
        let out = remove();
        let mut watched = self.watched.lock();
        for (n, m) in names.iter().zip(&marks) {
            let key = (vm.to_owned(), n.clone());
            if watched.get(&key).is_some_and(|w| Arc::ptr_eq(w, m)) {
                watched.remove(&key);
            }
        }
        out
    }

    pub(crate) fn remove_snapshot(&self, vm: &str, name: &str) -> Result<(), ActionError> {
        let v = self.host.vm(vm)?;
        let _l = self.lock_lifecycle(vm);
        if !v.snapshots().iter().any(|s| s.name == name) {
            return Err(sim::SimError::NoSuchSnapshot {
                vm: vm.to_owned(),
                name: name.to_owned(),
            }
            .into());
        }
        Ok(self.retiring(vm, &[name.to_owned()], || v.remove_snapshot(name))?)
    }

    fn revert(&self, vm: &str, name: &str) -> Result<(), ActionError> {
        let v = self.host.vm(vm)?;
        if let Some(id) = self.guests.running_on(vm) {
            return Err(ActionError::new(
                ErrorKind::InUse,
                format!("guest workload {id} is running on VM {vm:?}: stop it before reverting"),
            ));
        }
        let _l = self.lock_lifecycle(vm);
        let snaps = v.snapshots();
        let Some(idx) = snaps.iter().position(|s| s.name == name) else {
            return Err(sim::SimError::NoSuchSnapshot {
                vm: vm.to_owned(),
                name: name.to_owned(),
            }
            .into());
        };
        let newer: Vec<String> = snaps[idx + 1..].iter().map(|s| s.name.clone()).collect();
        Ok(self.retiring(vm, &newer, || v.revert_to_snapshot(name))?)
    }
}

/// The host as the backup client sees it: snapshots it takes and removes go
/// through the service's lifecycle locks and export liveness.
struct Guarded<'a>(&'a Service);

impl DataProtection for Guarded<'_> {
    fn query_changed_disk_areas(
        &self,
        vm: &str,
        snapshot: &str,
        disk: usize,
        start_offset: u64,
        change_id: &str,
    ) -> Result<DiskChangeInfo, VadpError> {
        self.0
            .host
            .query_changed_disk_areas(vm, snapshot, disk, start_offset, change_id)
    }

    fn disk_capacity(&self, vm: &str, snapshot: &str, disk: usize) -> Result<u64, VadpError> {
        self.0.host.disk_capacity(vm, snapshot, disk)
    }

    fn read_snapshot(
        &self,
        vm: &str,
        snapshot: &str,
        disk: usize,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), VadpError> {
        self.0.host.read_snapshot(vm, snapshot, disk, offset, buf)
    }

    fn create_snapshot(&self, vm: &str, name: &str) -> Result<SnapshotInfo, VadpError> {
        let v = self.0.host.vm(vm)?;
        let _l = self.0.lock_lifecycle(vm);
        Ok(v.create_snapshot(name)?)
    }

    fn remove_snapshot(&self, vm: &str, name: &str) -> Result<(), VadpError> {
        let v = self.0.host.vm(vm)?;
        let _l = self.0.lock_lifecycle(vm);
        Ok(self.0.retiring(vm, &[name.to_owned()], || v.remove_snapshot(name))?)
    }

    fn enable_change_tracking(&self, vm: &str) -> Result<(), VadpError> {
        let v = self.0.host.vm(vm)?;
        let _l = self.0.lock_lifecycle(vm);
        self.0.host.enable_change_tracking(v.name())
    }
}

fn check_range(vm: &str, disk: usize, offset: u64, len: u64, capacity: u64) -> Result<(), ActionError> {
    match offset.checked_add(len) {
        Some(end) if end <= capacity => Ok(()),
        _ => Err(ActionError::from(sim::SimError::OutOfRange {
            disk,
            offset,
            len,
            capacity,
        })
        .context(format_args!("VM {vm:?}"))),
    }
}

/// The size rule of a new disk (as for scenario files): a whole number of
/// 512-byte sectors from 1 MiB (what the workload profiles need) to 64 TiB.
fn check_disk_size(n: u64) -> Result<(), ActionError> {
    let (min, max) = (workloads::MIN_DISK_SIZE, tracker::MAX_CAPACITY);
    if n >= min && n.is_multiple_of(512) && n <= max {
        Ok(())
    } else {
        Err(ActionError::invalid(format!(
            "a disk is a multiple of 512 bytes from {min} (1 MiB) to {max} (64 TiB), found {n}"
        )))
    }
}

/// Writes `data` at `at` of `f`, leaving a hole where a 4 KiB block of it is
/// all zeros.
fn write_sparse(f: &std::fs::File, at: u64, data: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    const BLOCK: usize = 4096;
    let mut i = 0;
    while i < data.len() {
        // A run of non-zero blocks, written at once.
        let start = i;
        while i < data.len() && data[i..(i + BLOCK).min(data.len())].iter().any(|&b| b != 0) {
            i = (i + BLOCK).min(data.len());
        }
        if i > start {
            f.write_all_at(&data[start..i], at + start as u64)?;
        }
        while i < data.len() && data[i..(i + BLOCK).min(data.len())].iter().all(|&b| b == 0) {
            i = (i + BLOCK).min(data.len());
        }
    }
    Ok(())
}

/// Paths travel between processes: only absolute ones are taken.
fn absolute(what: &str, p: PathBuf) -> Result<PathBuf, ActionError> {
    if p.is_absolute() {
        Ok(p)
    } else {
        Err(ActionError::invalid(format!(
            "{what} path {} is relative: the service needs an absolute path",
            p.display()
        )))
    }
}

fn io_error(what: &str, path: &Path, e: std::io::Error) -> ActionError {
    let kind = match e.kind() {
        std::io::ErrorKind::NotFound => ErrorKind::NotFound,
        std::io::ErrorKind::PermissionDenied => ErrorKind::InvalidArgument,
        _ => ErrorKind::Io,
    };
    ActionError::new(kind, format!("{what} {}: {e}", path.display()))
}
