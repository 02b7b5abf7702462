//! The repository directory: layout, locking, chunk files, point files and
//! the journal of backups in progress. See the module docs of
//! [`backup`](super) for the layout and the commit order.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::point::{parse_header, Point, PointMeta};
use crate::store::{self, ChunkHash};
use crate::BackupError;

const FORMAT: &str = "cbtsim-backup-repository";
const VERSION: u32 = 1;
/// The repository's subdirectories.
const DIRS: [&str; 5] = ["chunks", "points", "pending", "tmp", "bad"];

#[derive(Debug, Serialize, Deserialize)]
struct RepoConfig {
    format: String,
    version: u32,
}

/// The snapshot of a backup in progress, recorded before it is created so
/// that the next backup of the VM can remove it if that backup dies.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Pending {
    pub snapshot: String,
    pub point: String,
}

/// A backup repository directory.
#[derive(Debug, Clone)]
pub struct Repository {
    root: PathBuf,
}

/// Unique names for temporary files of this process.
static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> BackupError {
    BackupError::io(op, path)
}

/// Fsyncs a directory so the names created or removed in it are durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), BackupError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("cannot sync directory", dir))
}

impl Repository {
    /// Opens the repository at `root`, creating it when the directory does
    /// not exist or is empty.
    pub fn create_or_open(root: &Path) -> Result<Self, BackupError> {
        fs::create_dir_all(root).map_err(io("cannot create repository directory", root))?;
        if !root.join("repo.json").exists() {
            let empty = fs::read_dir(root).map_err(io("cannot read", root))?.next().is_none();
            if !empty {
                return Err(BackupError::NotARepository {
                    path: root.to_owned(),
                    reason: "the directory is not empty and has no repo.json".into(),
                });
            }
            let repo = Self { root: root.to_owned() };
            for d in DIRS {
                let p = root.join(d);
                fs::create_dir_all(&p).map_err(io("cannot create", &p))?;
            }
            let cfg = RepoConfig {
                format: FORMAT.into(),
                version: VERSION,
            };
            repo.write_atomic(
                &root.join("repo.json"),
                &serde_json::to_vec_pretty(&cfg).expect("config serialises"),
            )?;
        }
        Self::open(root)
    }

    /// Opens an existing repository.
    pub fn open(root: &Path) -> Result<Self, BackupError> {
        let not = |reason: String| BackupError::NotARepository {
            path: root.to_owned(),
            reason,
        };
        let cfg_path = root.join("repo.json");
        let bytes = match fs::read(&cfg_path) {
            Ok(b) => b,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                return Err(not("it has no repo.json (run a backup into it first)".into()))
            }
            Err(e) => return Err(io("cannot read", &cfg_path)(e)),
        };
        let cfg: RepoConfig = serde_json::from_slice(&bytes).map_err(|e| not(format!("repo.json: {e}")))?;
        if cfg.format != FORMAT || cfg.version != VERSION {
            return Err(not(format!("format {:?} version {}", cfg.format, cfg.version)));
        }
        for d in DIRS {
            let p = root.join(d);
            fs::create_dir_all(&p).map_err(io("cannot create", &p))?;
        }
        Ok(Self { root: root.to_owned() })
    }

    /// The repository directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn lock_file(&self, name: &str) -> Result<(File, PathBuf), BackupError> {
        let path = self.root.join(name);
        let f = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io("cannot open", &path))?;
        Ok((f, path))
    }

    /// Waits for and takes the writer lock (backup, prune); released on drop.
    pub(crate) fn lock_exclusive(&self) -> Result<File, BackupError> {
        let (f, path) = self.lock_file("lock")?;
        f.lock().map_err(io("cannot lock", &path))?;
        Ok(f)
    }

    /// Waits for and takes a shared writer lock (verify); released on drop.
    pub(crate) fn lock_shared(&self) -> Result<File, BackupError> {
        let (f, path) = self.lock_file("lock")?;
        f.lock_shared().map_err(io("cannot lock", &path))?;
        Ok(f)
    }

    /// Takes the readers' lock shared (restore, a mounted point: whatever reads
    /// chunks of points that prune could delete); released on drop. Backups do
    /// not take it, so they run while a point is mounted.
    pub(crate) fn lock_readers(&self) -> Result<File, BackupError> {
        let (f, path) = self.lock_file("readers.lock")?;
        f.lock_shared().map_err(io("cannot lock", &path))?;
        Ok(f)
    }

    /// Takes the readers' lock exclusively without waiting (prune), or says
    /// that a restore or a mount is reading.
    pub(crate) fn try_lock_no_readers(&self) -> Result<File, BackupError> {
        let (f, path) = self.lock_file("readers.lock")?;
        match f.try_lock() {
            Ok(()) => Ok(f),
            Err(std::fs::TryLockError::WouldBlock) => Err(BackupError::Busy(
                "a restore or a mounted point is reading the repository".into(),
            )),
            Err(std::fs::TryLockError::Error(e)) => Err(io("cannot lock", &path)(e)),
        }
    }

    /// Writes `data` to `path` atomically: temporary file, fsync, rename, fsync directory.
    pub(crate) fn write_atomic(&self, path: &Path, data: &[u8]) -> Result<(), BackupError> {
        let tmp = self.tmp_path("file");
        let mut f = File::create(&tmp).map_err(io("cannot create", &tmp))?;
        f.write_all(data).map_err(io("cannot write", &tmp))?;
        f.sync_all().map_err(io("cannot sync", &tmp))?;
        drop(f);
        fs::rename(&tmp, path).map_err(io("cannot rename into place", path))?;
        sync_dir(path.parent().expect("repository paths have a parent"))
    }

    pub(crate) fn tmp_path(&self, what: &str) -> PathBuf {
        let n = TMP_SEQ.fetch_add(1, Ordering::Relaxed); // uniqueness only
        self.root.join("tmp").join(format!("{what}.{}.{n}", std::process::id()))
    }

    // ---- chunks -----------------------------------------------------------

    /// Where chunk `h` lives.
    pub fn chunk_path(&self, h: ChunkHash) -> PathBuf {
        let hex = h.to_string();
        self.root.join("chunks").join(&hex[..2]).join(hex)
    }

    /// Reads, decodes and checks chunk `h`.
    pub(crate) fn read_chunk(&self, h: ChunkHash) -> Result<Vec<u8>, BackupError> {
        let path = self.chunk_path(h);
        match fs::read(&path) {
            Ok(b) => store::decode(h, &b),
            Err(e) if e.kind() == ErrorKind::NotFound => Err(self.absent(h)),
            Err(e) => Err(io("cannot read chunk", &path)(e)),
        }
    }

    /// The error for chunk `h`, absent from `chunks/`: marked bad, or missing.
    pub(crate) fn absent(&self, h: ChunkHash) -> BackupError {
        if self.bad_path(h).exists() {
            BackupError::BadChunk(h)
        } else {
            BackupError::MissingChunk(h)
        }
    }

    /// Whether chunk `h` is in `chunks/` (not checked).
    pub(crate) fn has_chunk(&self, h: ChunkHash) -> bool {
        self.chunk_path(h).is_file()
    }

    // ---- chunks marked bad -------------------------------------------------

    /// Where chunk `h` goes once verify found it bad: `bad/HASH` holds the
    /// damaged file (or is empty for a chunk that was missing).
    pub fn bad_path(&self, h: ChunkHash) -> PathBuf {
        self.root.join("bad").join(h.to_string())
    }

    /// The chunks marked bad.
    pub(crate) fn bad_chunks(&self) -> Result<HashSet<ChunkHash>, BackupError> {
        let dir = self.root.join("bad");
        let mut out = HashSet::new();
        for e in fs::read_dir(&dir).map_err(io("cannot read", &dir))? {
            let name = e.map_err(io("cannot read", &dir))?.file_name();
            if let Some(h) = name.to_str().and_then(ChunkHash::from_hex) {
                out.insert(h);
            }
        }
        Ok(out)
    }

    /// Marks chunk `h` bad: moves its file aside into `bad/` (an empty marker
    /// when it is missing), so that no backup deduplicates against it and the
    /// next backup that reads the same data stores it again. Returns the
    /// marker's path.
    pub(crate) fn mark_bad(&self, h: ChunkHash) -> Result<PathBuf, BackupError> {
        let to = self.bad_path(h);
        let from = self.chunk_path(h);
        match fs::rename(&from, &to) {
            Ok(()) => {
                sync_dir(from.parent().expect("chunk paths have a parent"))?;
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {
                if !to.exists() {
                    File::create(&to).map_err(io("cannot create", &to))?;
                }
            }
            Err(e) => return Err(io("cannot move aside", &from)(e)),
        }
        sync_dir(&self.root.join("bad"))?;
        Ok(to)
    }

    /// Removes the bad marks of `hashes` (a good copy of each is durable in
    /// `chunks/` again, or no point references it any more).
    pub(crate) fn clear_bad(&self, hashes: &[ChunkHash]) -> Result<(), BackupError> {
        for &h in hashes {
            let p = self.bad_path(h);
            match fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(io("cannot delete", &p)(e)),
            }
        }
        if !hashes.is_empty() {
            sync_dir(&self.root.join("bad"))?;
        }
        Ok(())
    }

    /// Writes chunk `h` (not yet durable: see [`Self::sync_chunks`]).
    /// Returns the bytes written.
    pub(crate) fn write_chunk(&self, h: ChunkHash, data: &[u8], compress: bool) -> Result<u64, BackupError> {
        let bytes = store::encode(data, compress);
        let path = self.chunk_path(h);
        let dir = path.parent().expect("chunk paths have a parent");
        if !dir.exists() {
            fs::create_dir_all(dir).map_err(io("cannot create", dir))?;
        }
        let tmp = self.tmp_path("chunk");
        fs::write(&tmp, &bytes).map_err(io("cannot write", &tmp))?;
        #[cfg(not(target_os = "linux"))]
        File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(io("cannot sync", &tmp))?;
        fs::rename(&tmp, &path).map_err(io("cannot rename into place", &path))?;
        Ok(bytes.len() as u64)
    }

    /// Makes every chunk written so far durable (with their directory
    /// entries) before a point that references them is committed.
    pub(crate) fn sync_chunks(&self) -> Result<(), BackupError> {
        #[cfg(target_os = "linux")]
        {
            let dir = File::open(&self.root).map_err(io("cannot open", &self.root))?;
            rustix::fs::syncfs(&dir).map_err(|e| io("cannot syncfs", &self.root)(std::io::Error::from(e)))?;
        }
        #[cfg(not(target_os = "linux"))]
        {
            for (_, path) in self.chunk_files()? {
                sync_dir(path.parent().expect("chunk paths have a parent"))?;
            }
        }
        Ok(())
    }

    /// Every chunk file, by name. Files with other names are ignored.
    pub(crate) fn chunk_files(&self) -> Result<Vec<(ChunkHash, PathBuf)>, BackupError> {
        let top = self.root.join("chunks");
        let mut out = Vec::new();
        for sub in fs::read_dir(&top).map_err(io("cannot read", &top))? {
            let sub = sub.map_err(io("cannot read", &top))?.path();
            if !sub.is_dir() {
                continue;
            }
            for f in fs::read_dir(&sub).map_err(io("cannot read", &sub))? {
                let p = f.map_err(io("cannot read", &sub))?.path();
                let h = p.file_name().and_then(|n| n.to_str()).and_then(ChunkHash::from_hex);
                if let Some(h) = h {
                    out.push((h, p));
                }
            }
        }
        out.sort();
        Ok(out)
    }

    // ---- points -----------------------------------------------------------

    /// A point's file; `7` names point `00000007`.
    fn point_path(&self, id: &str) -> Result<PathBuf, BackupError> {
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
            return Err(BackupError::NoSuchPoint(id.to_owned()));
        }
        let id = match id.parse::<u64>() {
            Ok(n) if id.len() < 8 => format!("{n:08}"),
            _ => id.to_owned(),
        };
        Ok(self.root.join("points").join(format!("{id}.point")))
    }

    /// The IDs of every committed point, oldest first.
    pub(crate) fn point_ids(&self) -> Result<Vec<String>, BackupError> {
        let dir = self.root.join("points");
        let mut ids = Vec::new();
        for e in fs::read_dir(&dir).map_err(io("cannot read", &dir))? {
            let name = e.map_err(io("cannot read", &dir))?.file_name();
            let Some(id) = name.to_str().and_then(|n| n.strip_suffix(".point")) else {
                continue;
            };
            if !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()) {
                ids.push(id.to_owned());
            }
        }
        ids.sort_by(|a, b| (a.len(), a).cmp(&(b.len(), b)));
        Ok(ids)
    }

    /// The header of every point, oldest first (index and checksum not read:
    /// [`verify`](crate::verify) checks those).
    pub fn points(&self) -> Result<Vec<PointMeta>, BackupError> {
        self.point_ids()?.iter().map(|id| self.point_meta(id)).collect()
    }

    /// The header of point `id`.
    pub fn point_meta(&self, id: &str) -> Result<PointMeta, BackupError> {
        let path = self.point_path(id)?;
        let f = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => return Err(BackupError::NoSuchPoint(id.to_owned())),
            Err(e) => return Err(io("cannot open", &path)(e)),
        };
        let mut line = Vec::new();
        BufReader::new(f)
            .read_until(b'\n', &mut line)
            .map_err(io("cannot read", &path))?;
        parse_header(&path, line.strip_suffix(b"\n").unwrap_or(&line))
    }

    /// Point `id` with its index, checksum verified.
    pub(crate) fn load_point(&self, id: &str) -> Result<Point, BackupError> {
        let path = self.point_path(id)?;
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == ErrorKind::NotFound => return Err(BackupError::NoSuchPoint(id.to_owned())),
            Err(e) => return Err(io("cannot read", &path)(e)),
        };
        let p = Point::decode(&path, &bytes)?;
        if Some(p.meta.point.as_str()) != path.file_stem().and_then(|s| s.to_str()) {
            return Err(BackupError::CorruptPoint {
                path,
                reason: format!("it names itself {:?}", p.meta.point),
            });
        }
        Ok(p)
    }

    /// The ID the next point gets: one more than the highest, 8 digits.
    pub(crate) fn next_point_id(&self) -> Result<String, BackupError> {
        let last = self
            .point_ids()?
            .last()
            .map_or(0, |id| id.parse::<u64>().unwrap_or(u64::MAX - 1));
        Ok(format!("{:08}", last + 1))
    }

    /// Commits `p`: its chunks must already be durable.
    pub(crate) fn commit_point(&self, p: &Point) -> Result<(), BackupError> {
        let path = self.point_path(&p.meta.point)?;
        self.write_atomic(&path, &p.encode())
    }

    /// Deletes point `id` (durably).
    pub(crate) fn delete_point(&self, id: &str) -> Result<(), BackupError> {
        let path = self.point_path(id)?;
        fs::remove_file(&path).map_err(io("cannot delete", &path))?;
        sync_dir(&self.root.join("points"))
    }

    // ---- the journal of backups in progress ------------------------------

    fn pending_path(&self, vm: &str) -> PathBuf {
        let safe = !vm.starts_with('.') && vm.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        let name = if safe {
            vm.to_owned()
        } else {
            let hex: String = vm.bytes().map(|b| format!("{b:02x}")).collect();
            format!("x-{hex}")
        };
        self.root.join("pending").join(format!("{name}.json"))
    }

    pub(crate) fn read_pending(&self, vm: &str) -> Result<Option<Pending>, BackupError> {
        let path = self.pending_path(vm);
        match fs::read(&path) {
            // A torn record (a crash while writing it) means the snapshot was never created.
            Ok(b) => Ok(serde_json::from_slice(&b).ok()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io("cannot read", &path)(e)),
        }
    }

    pub(crate) fn write_pending(&self, vm: &str, p: &Pending) -> Result<(), BackupError> {
        let path = self.pending_path(vm);
        self.write_atomic(&path, &serde_json::to_vec(p).expect("serialises"))
    }

    pub(crate) fn clear_pending(&self, vm: &str) -> Result<(), BackupError> {
        let path = self.pending_path(vm);
        match fs::remove_file(&path) {
            Ok(()) => sync_dir(&self.root.join("pending")),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io("cannot delete", &path)(e)),
        }
    }

    /// Removes temporary files left by interrupted runs (call under the writer lock).
    pub(crate) fn clean_tmp(&self) -> Result<u64, BackupError> {
        let dir = self.root.join("tmp");
        let mut n = 0;
        for e in fs::read_dir(&dir).map_err(io("cannot read", &dir))? {
            let p = e.map_err(io("cannot read", &dir))?.path();
            fs::remove_file(&p).map_err(io("cannot delete", &p))?;
            n += 1;
        }
        Ok(n)
    }
}
