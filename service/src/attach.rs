//! Attached disks: a VM's live disk as a block device of this machine
//! (`cbtsim disk attach VM DISK` prints `/dev/loopN`), so that `mkfs`,
//! `mount`, a database or `fio` run on it as they would in a guest.
//!
//! ```text
//!  ext4 / xfs on /dev/loopN ──▶ loop driver ──▶ DATASTORE/.cbtsim/attach/VM/DISK/disk
//!                                               (a FUSE file of this process, direct I/O)
//!                                                  │ write, read, fsync, fallocate
//!                                                  ▼
//!                                 sim::Vm::write / read / flush / unmap  (guest I/O)
//! ```
//!
//! # Why the service's own FUSE file, not NBD + `nbdfuse`
//! Both end in a loop device over a FUSE file; the difference is who serves
//! the file. Here it is the serve process itself (the [`fuser`] crate, one
//! session per attached disk), so:
//! * a write through the device is [`Vm::write`] on the VM the service keeps
//!   open: tracked, gated and stunned like a write of a guest workload or of
//!   the NBD export, with no socket and no second process in between;
//! * the serve owns the session: detaching is the serve's business, and a
//!   serve that stops detaches first (the device's file systems are
//!   unmounted, the loop device released, the FUSE file unmounted) before it
//!   closes the VMs: never an orphaned `nbdfuse` holding a connection to a
//!   serve that is gone;
//! * nothing to install beyond the kernel's loop and FUSE drivers and
//!   `losetup` (util-linux); `nbdfuse` (libnbd-bin) is not needed.
//!
//! # Flushes and caches
//! The file is opened with `FOPEN_DIRECT_IO`: the kernel keeps no page cache
//! of it, so every write of the loop device reaches [`Vm::write`] before the
//! loop device completes it, and every read sees the VM's data. A flush of the
//! device (the guest file system's `fsync`, a journal commit's cache flush,
//! a FUA write) becomes an `fsync` of the backing file, which is
//! [`Vm::flush`]: the VM's layers written back to the datastore. A discard
//! (`fstrim`, `mkfs`'s initial discard) becomes `fallocate(PUNCH_HOLE)`,
//! which is [`Vm::unmap`]: it reads as zeros and counts as changed.
//!
//! # Snapshots of an attached disk
//! Nothing special: a snapshot stuns the VM's I/O gate like any other, so
//! the writes the loop device has completed are in it and those it has not
//! are not. That is a crash-consistent image: what a power cut at that
//! instant would leave, which a journalling file system and a database
//! recover from.
//!
//! # While a disk is attached
//! Reverting the VM, deleting it, powering it off and growing the disk are
//! refused (the device would change or fail under the mounted file system),
//! and so is a guest workload on the disk (it would write over the file
//! system); detach first. Detaching refuses while the device is mounted or
//! open (`umount` first). A serve that stops unmounts the device's file
//! systems itself (they are written back through the still-running FUSE
//! session), then detaches. Only a serve attaches: a command's own service
//! ends with the command.
//!
//! # Needs
//! Linux, root (loop devices), `/dev/fuse`, `/dev/loop-control` and
//! `losetup`. What is missing is named in an [`ErrorKind::Unsupported`]
//! error.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, INodeNo, LockOwner, MountOption, OpenFlags,
    ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyWrite, Request, WriteFlags,
};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use sim::{SimError, Vm};

use crate::action::{ActionError, ErrorKind};

/// The name of the FUSE file in its mount directory.
pub const FILE_NAME: &str = "disk";
/// The FUSE sessions' threads per attached disk.
const FUSE_THREADS: usize = 4;
/// How long detaching waits for the loop device and the FUSE mount to let go.
const LET_GO: Duration = Duration::from_secs(10);

/// An attached disk ([`Request::DiskAttach`](crate::Request::DiskAttach)).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    /// The VM.
    pub vm: String,
    /// The disk's index.
    pub disk: usize,
    /// The block device (`/dev/loopN`).
    pub device: PathBuf,
    /// The FUSE file the loop device reads and writes.
    pub file: PathBuf,
    /// The device's size in bytes (the disk's capacity when attached).
    pub size: u64,
}

/// One attached disk: what the service keeps.
#[derive(Debug)]
struct Attached {
    info: Attachment,
    mountpoint: PathBuf,
    /// The FUSE connection's number under /sys/fs/fuse/connections.
    connection: Option<u64>,
    session: Option<fuser::BackgroundSession>,
}

/// The attached disks of a service, by (VM, disk).
#[derive(Debug, Default)]
pub(crate) struct Attachments {
    all: Mutex<HashMap<(String, usize), Attached>>,
}

fn unsupported(message: impl Into<String>) -> ActionError {
    ActionError::new(ErrorKind::Unsupported, message)
}

fn io_err(what: impl std::fmt::Display, e: impl std::fmt::Display) -> ActionError {
    ActionError::new(ErrorKind::Io, format!("{what}: {e}"))
}

/// Why this machine cannot attach a disk, if it cannot.
pub fn missing_support() -> Option<String> {
    if !cfg!(target_os = "linux") {
        return Some("attaching a disk needs Linux (loop devices and FUSE)".into());
    }
    if !rustix::process::geteuid().is_root() {
        return Some("attaching a disk needs root (loop devices): run cbtsim serve as root".into());
    }
    if !Path::new("/dev/fuse").exists() {
        return Some(
            "FUSE is missing: /dev/fuse does not exist (modprobe fuse, or give the container /dev/fuse)".into(),
        );
    }
    if !Path::new("/dev/loop-control").exists() {
        return Some(
            "loop devices are missing: /dev/loop-control does not exist (modprobe loop, or give the container the loop devices)"
                .into(),
        );
    }
    if Command::new("losetup").arg("--version").output().is_err() {
        return Some("losetup is not installed (apt-get install mount)".into());
    }
    None
}

/// Runs `cmd`; its stdout, or an error with its stderr.
fn run(cmd: &mut Command) -> Result<String, String> {
    match cmd.output() {
        Ok(out) if out.status.success() => Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned()),
        Ok(out) => Err(format!(
            "{:?} failed ({}): {}",
            cmd,
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => Err(format!("cannot run {cmd:?}: {e}")),
    }
}

/// The mount points of block device `device` (from /proc/self/mountinfo).
pub fn mounts_of(device: &Path) -> Vec<PathBuf> {
    let Ok(st) = rustix::fs::stat(device) else {
        return Vec::new();
    };
    let id = format!("{}:{}", rustix::fs::major(st.st_rdev), rustix::fs::minor(st.st_rdev));
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f.get(2) == Some(&id.as_str())).then(|| f.get(4).map(|m| PathBuf::from(unescape(m))))?
        })
        .collect()
}

/// Whether something is mounted at `dir` (from /proc/self/mountinfo).
pub fn is_mount_point(dir: &Path) -> bool {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .any(|l| l.split(' ').nth(4).is_some_and(|m| Path::new(&unescape(m)) == dir))
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether block device `device` is mounted or held open exclusively.
fn device_busy(device: &Path) -> bool {
    use rustix::fs::{Mode, OFlags};
    matches!(
        rustix::fs::open(device, OFlags::RDONLY | OFlags::EXCL | OFlags::CLOEXEC, Mode::empty()),
        Err(rustix::io::Errno::BUSY)
    )
}

/// The loop devices whose backing file is `file` (from /sys/block).
fn loops_backed_by(file: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/sys/block") else {
        return out;
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        let Ok(b) = std::fs::read_to_string(e.path().join("loop/backing_file")) else {
            continue;
        };
        let b = b.trim();
        if Path::new(b) == file || b.strip_suffix(" (deleted)").is_some_and(|b| Path::new(b) == file) {
            out.push(PathBuf::from("/dev").join(name));
        }
    }
    out
}

/// Whether loop device `device` still has a backing file.
fn loop_bound(device: &Path) -> bool {
    let Some(name) = device.file_name() else {
        return false;
    };
    Path::new("/sys/block").join(name).join("loop/backing_file").exists()
}

/// Unmounts `dir`: plainly (the file system is written back), else lazily.
pub(crate) fn unmount(dir: &Path) -> Result<(), String> {
    use rustix::mount::{unmount, UnmountFlags};
    let deadline = Instant::now() + LET_GO;
    loop {
        match unmount(dir, UnmountFlags::empty()) {
            Ok(()) | Err(rustix::io::Errno::INVAL) | Err(rustix::io::Errno::NOENT) => return Ok(()),
            Err(rustix::io::Errno::BUSY) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => {
                return match unmount(dir, UnmountFlags::DETACH) {
                    Ok(()) => Err(format!("{} was busy ({e}): unmounted lazily", dir.display())),
                    Err(e2) => Err(format!("cannot unmount {}: {e}; lazily: {e2}", dir.display())),
                }
            }
        }
    }
}

/// Releases loop device `device` and waits until it has let go of its file.
pub(crate) fn release_loop(device: &Path) -> Result<(), String> {
    run(Command::new("losetup").arg("-d").arg(device))?;
    let deadline = Instant::now() + LET_GO;
    while loop_bound(device) {
        if Instant::now() >= deadline {
            return Err(format!(
                "{} still holds its file after losetup -d (open elsewhere?)",
                device.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

impl Attachments {
    /// Attaches disk `disk` of `vm` (opened by the service) below `root`'s
    /// state directory.
    pub(crate) fn attach(&self, root: &Path, vm: Arc<Vm>, disk: usize) -> Result<Attachment, ActionError> {
        let name = vm.name().to_owned();
        let mut all = self.all.lock();
        if let Some(a) = all.get(&(name.clone(), disk)) {
            return Err(ActionError::new(
                ErrorKind::AlreadyExists,
                format!(
                    "disk {disk} of VM {name:?} is already attached as {}",
                    a.info.device.display()
                ),
            ));
        }
        if let Some(why) = missing_support() {
            return Err(unsupported(why));
        }
        let size = vm.capacity(disk)?;
        if !vm.powered_on() {
            return Err(SimError::PoweredOff(name).into());
        }
        let mountpoint = root
            .join(crate::client::STATE_DIR)
            .join("attach")
            .join(&name)
            .join(disk.to_string());
        let file = mountpoint.join(FILE_NAME);
        // What a killed serve left: loop devices over the dead file, the mount.
        for dev in loops_backed_by(&file) {
            let _ = release_loop(&dev);
        }
        if is_mount_point(&mountpoint) {
            let _ = rustix::mount::unmount(&mountpoint, rustix::mount::UnmountFlags::DETACH);
        }
        std::fs::create_dir_all(&mountpoint)
            .map_err(|e| io_err(format_args!("cannot create {}", mountpoint.display()), e))?;
        let mut cfg = fuser::Config::default();
        cfg.mount_options = vec![
            MountOption::FSName(format!("cbtsim:{name}/{disk}")),
            MountOption::Subtype("cbtsim".into()),
            MountOption::NoExec,
            MountOption::NoSuid,
            MountOption::NoDev,
        ];
        cfg.n_threads = Some(FUSE_THREADS);
        let fs = DiskFile {
            vm,
            disk,
            size,
            created: std::time::SystemTime::now(),
        };
        let session = fuser::spawn_mount(fs, &mountpoint, &cfg).map_err(|e| {
            unsupported(format!(
                "cannot mount the disk's FUSE file on {}: {e}",
                mountpoint.display()
            ))
        })?;
        let connection = rustix::fs::stat(&mountpoint)
            .ok()
            .filter(|st| rustix::fs::major(st.st_dev) == 0)
            .map(|st| u64::from(rustix::fs::minor(st.st_dev)));
        let mut attached = Attached {
            info: Attachment {
                vm: name.clone(),
                disk,
                device: PathBuf::new(),
                file: file.clone(),
                size,
            },
            mountpoint,
            connection,
            session: Some(session),
        };
        match run(Command::new("losetup").args(["--find", "--show"]).arg(&file)) {
            Ok(dev) if dev.starts_with("/dev/") => attached.info.device = PathBuf::from(dev),
            other => {
                let why = match other {
                    Ok(out) => format!("losetup printed {out:?}, not a device"),
                    Err(e) => e,
                };
                let _ = attached.let_go(false);
                return Err(unsupported(format!("cannot set up a loop device for the disk: {why}")));
            }
        }
        let info = attached.info.clone();
        all.insert((name, disk), attached);
        Ok(info)
    }

    /// Detaches disk `disk` of `vm`: refused while its device is mounted or open.
    pub(crate) fn detach(&self, vm: &str, disk: usize) -> Result<Attachment, ActionError> {
        let mut all = self.all.lock();
        let key = (vm.to_owned(), disk);
        let Some(a) = all.get(&key) else {
            return Err(ActionError::new(
                ErrorKind::NotFound,
                format!("disk {disk} of VM {vm:?} is not attached"),
            ));
        };
        if device_busy(&a.info.device) {
            let at: Vec<String> = mounts_of(&a.info.device)
                .iter()
                .map(|m| m.display().to_string())
                .collect();
            let what = if at.is_empty() {
                "is open".to_owned()
            } else {
                format!("is mounted on {}", at.join(", "))
            };
            return Err(ActionError::new(
                ErrorKind::InUse,
                format!(
                    "{} (disk {disk} of VM {vm:?}) {what}: unmount it first",
                    a.info.device.display()
                ),
            ));
        }
        let mut a = all.remove(&key).expect("looked up above");
        let info = a.info.clone();
        a.let_go(false)
            .map_err(|e| io_err(format_args!("detaching disk {disk} of VM {vm:?}"), e))?;
        Ok(info)
    }

    /// The attached disks, by VM and disk.
    pub(crate) fn list(&self) -> Vec<Attachment> {
        let mut v: Vec<Attachment> = self.all.lock().values().map(|a| a.info.clone()).collect();
        v.sort_by(|a, b| (&a.vm, a.disk).cmp(&(&b.vm, b.disk)));
        v
    }

    /// The device of an attached disk of `vm`, if any.
    pub(crate) fn device_of(&self, vm: &str) -> Option<PathBuf> {
        self.all
            .lock()
            .values()
            .find(|a| a.info.vm == vm)
            .map(|a| a.info.device.clone())
    }

    /// The device of disk `disk` of `vm`, if it is attached.
    pub(crate) fn device_of_disk(&self, vm: &str, disk: usize) -> Option<PathBuf> {
        self.all
            .lock()
            .get(&(vm.to_owned(), disk))
            .map(|a| a.info.device.clone())
    }

    /// Detaches everything, unmounting what is mounted on the devices first
    /// (the serve stops). Returns what did not go cleanly.
    pub(crate) fn detach_all(&self) -> Vec<String> {
        let all: Vec<Attached> = self.all.lock().drain().map(|(_, a)| a).collect();
        let mut warnings = Vec::new();
        for mut a in all {
            if let Err(e) = a.let_go(true) {
                warnings.push(format!("disk {} of VM {}: {e}", a.info.disk, a.info.vm));
            }
        }
        warnings
    }
}

impl Drop for Attachments {
    fn drop(&mut self) {
        self.detach_all();
    }
}

impl Attached {
    /// Releases the loop device (with `force`: after unmounting its file
    /// systems) and unmounts the FUSE file. A step that fails does not stop
    /// the next; the first failure is returned.
    fn let_go(&mut self, force: bool) -> Result<(), String> {
        let mut first: Option<String> = None;
        let mut note = |r: Result<(), String>| {
            if let Err(e) = r {
                first.get_or_insert(e);
            }
        };
        let dev = self.info.device.clone();
        if !dev.as_os_str().is_empty() {
            if force {
                for m in mounts_of(&dev) {
                    note(unmount(&m));
                }
            }
            note(release_loop(&dev));
        }
        if let Some(session) = self.session.take() {
            note(unmount(&self.mountpoint));
            if is_mount_point(&self.mountpoint) || loop_bound(&dev) {
                // Still held (a lazily unmounted file system): cut the
                // connection, so the session ends and lets go of the VM.
                if let Some(c) = self.connection {
                    let _ = std::fs::write(format!("/sys/fs/fuse/connections/{c}/abort"), "1");
                }
            }
            if session.join().is_err() {
                note(Err("the FUSE session ended with an error".into()));
            }
        }
        let _ = std::fs::remove_dir(&self.mountpoint);
        first.map_or(Ok(()), Err)
    }
}

/// The FUSE file system of one attached disk: a directory with one file.
struct DiskFile {
    vm: Arc<Vm>,
    disk: usize,
    size: u64,
    created: std::time::SystemTime,
}

/// The root directory's inode and the file's.
const ROOT: u64 = 1;
const FILE: u64 = 2;
/// Attributes never change (the size is fixed while attached).
const TTL: Duration = Duration::from_secs(3600);

impl DiskFile {
    fn attr(&self, ino: INodeNo) -> Option<FileAttr> {
        let (kind, size, perm, nlink) = match u64::from(ino) {
            ROOT => (FileType::Directory, 0, 0o700, 2),
            FILE => (FileType::RegularFile, self.size, 0o600, 1),
            _ => return None,
        };
        let t = self.created.max(UNIX_EPOCH);
        Some(FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: t,
            mtime: t,
            ctime: t,
            crtime: t,
            kind,
            perm,
            nlink,
            uid: 0,
            gid: 0,
            rdev: 0,
            flags: 0,
            blksize: 4096,
        })
    }

    /// The errno of a failed VM call.
    fn errno(e: &SimError) -> Errno {
        match e {
            SimError::OutOfRange { .. } => Errno::EINVAL,
            _ => Errno::EIO,
        }
    }
}

impl Filesystem for DiskFile {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match (u64::from(parent), name == OsStr::new(FILE_NAME)) {
            (ROOT, true) => match self.attr(INodeNo(FILE)) {
                Some(a) => reply.entry(&TTL, &a, fuser::Generation(0)),
                None => reply.error(Errno::ENOENT),
            },
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(Errno::ENOENT),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<std::time::SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<std::time::SystemTime>,
        _chgtime: Option<std::time::SystemTime>,
        _bkuptime: Option<std::time::SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        // The disk's size, owner and mode are fixed; times are ignored.
        if mode.is_some() || uid.is_some() || gid.is_some() || size.is_some_and(|s| s != self.size) {
            return reply.error(Errno::EPERM);
        }
        match self.attr(ino) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if u64::from(ino) != FILE {
            return reply.error(Errno::EISDIR);
        }
        // No page cache: every write reaches the VM before it completes.
        reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO);
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        if u64::from(ino) != FILE {
            return reply.error(Errno::EISDIR);
        }
        let len = u64::from(size).min(self.size.saturating_sub(offset)) as usize;
        let mut buf = vec![0u8; len];
        match self.vm.read(self.disk, offset, &mut buf) {
            Ok(()) => reply.data(&buf),
            Err(e) => reply.error(Self::errno(&e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if u64::from(ino) != FILE {
            return reply.error(Errno::EISDIR);
        }
        if offset.checked_add(data.len() as u64).is_none_or(|end| end > self.size) {
            return reply.error(Errno::ENOSPC);
        }
        match self.vm.write(self.disk, offset, data) {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(Self::errno(&e)),
        }
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        // Closing a descriptor: nothing is buffered here.
        reply.ok();
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        match self.vm.flush() {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(Self::errno(&e)),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        const KEEP_SIZE: i32 = 0x01;
        const PUNCH_HOLE: i32 = 0x02;
        const ZERO_RANGE: i32 = 0x10;
        if u64::from(ino) != FILE {
            return reply.error(Errno::EISDIR);
        }
        if offset.checked_add(length).is_none_or(|end| end > self.size) {
            return reply.error(Errno::ENOSPC);
        }
        let r = match mode & !KEEP_SIZE {
            // Allocation: every byte of the disk is there already.
            0 => Ok(()),
            // A discard or zeroing: a guest unmap (reads as zeros, counts as changed).
            PUNCH_HOLE | ZERO_RANGE => self.vm.unmap(self.disk, offset, length),
            _ => return reply.error(Errno::EOPNOTSUPP),
        };
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(Self::errno(&e)),
        }
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        if u64::from(ino) != ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let entries = [
            (ROOT, FileType::Directory, "."),
            (ROOT, FileType::Directory, ".."),
            (FILE, FileType::RegularFile, FILE_NAME),
        ];
        for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(ino), (i + 1) as u64, kind, name) {
                break;
            }
        }
        reply.ok();
    }
}

#[cfg(test)]
mod tests {
    use super::unescape;

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape(r"/mnt/a\040b"), "/mnt/a b");
        assert_eq!(unescape(r"/x\134y"), r"/x\y");
        assert_eq!(unescape(r"/plain"), "/plain");
        assert_eq!(unescape(r"/short\04"), r"/short\04");
    }
}
