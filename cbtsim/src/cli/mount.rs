//! `cbtsim mount`: a restore point's disks as read-only image files in a FUSE file system,
//! read in place from the repository ([`backup::PointImage`]), so that `qemu-img`,
//! `nbdfuse`, `guestfish` or `cp` read a point without restoring it first.
//!
//! The mount holds the repository's readers' lock (prune refuses to run meanwhile; backups
//! go on). It runs in the foreground until Ctrl-C, SIGTERM or `fusermount3 -u DIR`.
//!
//! # Limitations
//! Linux only. Mounting needs /dev/fuse and root or the `fusermount3` helper (Debian's
//! `fuse3`). A chunk that fails its hash check makes the read fail with EIO (the
//! error goes to stderr), never returns wrong bytes.

use std::ffi::OsStr;
use std::path::PathBuf;
use std::time::{Duration, UNIX_EPOCH};

use anyhow::{ensure, Context as _};
use backup::{PointImage, Repository};
use clap::Args;
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, INodeNo, LockOwner, MountOption, OpenFlags,
    ReplyAttr, ReplyData, ReplyDirectory, ReplyEntry, ReplyOpen, Request,
};
use signal_hook::consts::{SIGINT, SIGTERM};
use workloads::human;

/// Arguments of `cbtsim mount`.
#[derive(Debug, Args)]
pub struct MountArgs {
    /// The repository directory.
    #[arg(long, value_name = "DIR")]
    pub repo: PathBuf,
    /// The restore point's ID (see `backup list`).
    #[arg(long, value_name = "ID")]
    pub point: String,
    /// Show only this disk (default: every disk of the point, as diskN.img).
    #[arg(long, value_name = "N")]
    pub disk: Option<usize>,
    /// An empty directory to mount on.
    pub dir: PathBuf,
    /// Print one JSON line once mounted: {"mountpoint", "point", "vm", "files": [{"name", "size"}]}.
    #[arg(long)]
    pub json: bool,
}

/// How long the kernel may cache names and attributes: they never change.
const TTL: Duration = Duration::from_secs(3600);

/// The file system: the root directory and one file per disk (inode 2 + index).
struct PointFs {
    files: Vec<(String, PointImage)>,
    uid: u32,
    gid: u32,
}

impl PointFs {
    fn attr(&self, ino: INodeNo) -> Option<FileAttr> {
        let n = u64::from(ino);
        let (kind, size, perm, nlink) = if n == 1 {
            (FileType::Directory, 0, 0o555, 2)
        } else {
            let (_, img) = self.files.get(usize::try_from(n.checked_sub(2)?).ok()?)?;
            (FileType::RegularFile, img.capacity(), 0o444, 1)
        };
        let time = UNIX_EPOCH + Duration::from_secs(self.files.first().map_or(0, |f| f.1.meta().time));
        Some(FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: time,
            mtime: time,
            ctime: time,
            crtime: time,
            kind,
            perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            flags: 0,
            blksize: 65536,
        })
    }

    fn image(&self, ino: INodeNo) -> Option<&PointImage> {
        let i = usize::try_from(u64::from(ino).checked_sub(2)?).ok()?;
        self.files.get(i).map(|(_, img)| img)
    }
}

impl Filesystem for PointFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let found = (u64::from(parent) == 1)
            .then(|| self.files.iter().position(|(n, _)| OsStr::new(n) == name))
            .flatten()
            .and_then(|i| self.attr(INodeNo(i as u64 + 2)));
        match found {
            Some(a) => reply.entry(&TTL, &a, fuser::Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if self.image(ino).is_none() {
            reply.error(Errno::ENOENT);
        } else if flags.acc_mode() != fuser::OpenAccMode::O_RDONLY {
            reply.error(Errno::EROFS);
        } else {
            reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE);
        }
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
        let Some(img) = self.image(ino) else {
            return reply.error(Errno::ENOENT);
        };
        let cap = img.capacity();
        let len = u64::from(size).min(cap.saturating_sub(offset)) as usize;
        let mut buf = vec![0u8; len];
        match img.read_at(offset, &mut buf) {
            Ok(()) => reply.data(&buf),
            Err(e) => {
                eprintln!("cbtsim mount: read of {len} bytes at {offset} failed: {e}");
                reply.error(Errno::EIO);
            }
        }
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        if u64::from(ino) != 1 {
            return reply.error(Errno::ENOTDIR);
        }
        let mut entries = vec![
            (1, FileType::Directory, ".".to_owned()),
            (1, FileType::Directory, "..".to_owned()),
        ];
        for (i, (name, _)) in self.files.iter().enumerate() {
            entries.push((i as u64 + 2, FileType::RegularFile, name.clone()));
        }
        for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(ino), (i + 1) as u64, kind, name) {
                break;
            }
        }
        reply.ok();
    }
}

/// The JSON line `mount --json` prints.
#[derive(Debug, serde::Serialize)]
struct Mounted<'a> {
    mountpoint: String,
    point: &'a str,
    vm: &'a str,
    files: Vec<MountedFile<'a>>,
}

#[derive(Debug, serde::Serialize)]
struct MountedFile<'a> {
    name: &'a str,
    size: u64,
}

/// Runs `cbtsim mount`: mounts, waits for Ctrl-C, SIGTERM or an unmount, unmounts.
pub fn run(a: &MountArgs) -> anyhow::Result<()> {
    let repo = Repository::open(&a.repo).with_context(|| format!("cannot open repository {}", a.repo.display()))?;
    let meta = repo.point_meta(&a.point)?;
    let disks: Vec<usize> = match a.disk {
        Some(d) => vec![d],
        None => (0..meta.disks.len()).collect(),
    };
    let mut files = Vec::new();
    for d in disks {
        let img = PointImage::open(&repo, &a.point, d)?;
        files.push((format!("disk{d}.img"), img));
    }
    let dir = &a.dir;
    ensure!(dir.is_dir(), "mount point {} is not a directory", dir.display());
    let empty = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read mount point {}", dir.display()))?
        .next()
        .is_none();
    ensure!(empty, "mount point {} is not empty", dir.display());
    let info = Mounted {
        mountpoint: dir.display().to_string(),
        point: &meta.point,
        vm: &meta.vm,
        files: files
            .iter()
            .map(|(n, i)| MountedFile {
                name: n,
                size: i.capacity(),
            })
            .collect(),
    };
    let summary: Vec<String> = info
        .files
        .iter()
        .map(|f| format!("{} ({})", f.name, human(f.size)))
        .collect();
    let line = if a.json {
        serde_json::to_string(&info)?
    } else {
        format!(
            "mounted point {} of VM {} ({}) read-only at {}: {}; Ctrl-C or `fusermount3 -u {}` unmounts",
            meta.point,
            meta.vm,
            meta.time_utc,
            dir.display(),
            summary.join(", "),
            dir.display()
        )
    };
    let mut cfg = fuser::Config::default();
    cfg.mount_options = vec![
        MountOption::RO,
        MountOption::FSName(format!("cbtsim:{}", meta.point)),
        MountOption::Subtype("cbtsim".into()),
        MountOption::DefaultPermissions,
    ];
    let fs = PointFs {
        files,
        uid: rustix::process::getuid().as_raw(),
        gid: rustix::process::getgid().as_raw(),
    };
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM]).context("cannot watch for signals")?;
    let session = fuser::spawn_mount(fs, dir, &cfg)
        .with_context(|| format!("cannot mount a FUSE file system on {}", dir.display()))?;
    println!("{line}");
    let target = dir.clone();
    std::thread::spawn(move || {
        if signals.forever().next().is_some() {
            // The session's loop ends once the kernel lets go of the mount.
            if let Err(e) = rustix::mount::unmount(&target, rustix::mount::UnmountFlags::DETACH) {
                eprintln!("cbtsim mount: cannot unmount {}: {e}", target.display());
            }
        }
    });
    session.join().context("the FUSE session failed")?;
    Ok(())
}
