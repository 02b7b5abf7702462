//! Crash states for tests (feature `crash-states`): what a power loss could
//! leave of a tracker's files.
//!
//! A recorder on the test's thread watches the tracker's storage boundary:
//!
//! ```text
//! Page(p, bytes)        page p of the ctk file now holds bytes (in the page cache only)
//! Synced(a, z)          pages a..z of the ctk file were written back and are durable
//! FileSynced(name, b)   an epoch file's content is durable under its (temporary) name
//! Renamed / Unlinked    a change of the directory, durable once the directory is synced
//! DirSynced             every change of the directory so far is durable
//! Note(tag)             the test's own event (a guest write, a saved configuration)
//! ```
//! Pages are found by scanning the file's data ranges (`SEEK_DATA`, the file
//! is sparse) at every hook and [`checkpoint`]; an msync (`Region::flush`)
//! and the epoch files' fsyncs, renames and directory syncs report
//! themselves. [`CrashLog::build`] then writes, for a point `k` of the log,
//! the state a power loss just before event `k` may leave: every page as of
//! its last sync, or (chosen at random, the kernel writes pages back when it
//! likes) any later version of it seen before `k`; the epoch files of every
//! directory change synced before `k`, and a random prefix of the later ones.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

const PAGE: u64 = 4096;

thread_local! {
    static REC: RefCell<Option<Recorder>> = const { RefCell::new(None) };
    static BOOT: std::cell::Cell<Option<uuid::Uuid>> = const { std::cell::Cell::new(None) };
}

/// Makes the trackers this thread opens or creates from now on see `id` as
/// the boot they run in (`None`: the real one): a test's reboot, after which
/// a file left open is recovered as after a power loss.
pub fn set_boot_id(id: Option<uuid::Uuid>) {
    BOOT.set(id);
}

/// The boot id a test set for this thread.
pub(crate) fn boot_id() -> Option<uuid::Uuid> {
    BOOT.get()
}

#[derive(Debug, Clone)]
enum Event {
    Page(u64, Arc<[u8]>),
    Synced(u64, u64),
    FileSynced(String, Arc<[u8]>),
    Renamed(String, String),
    Unlinked(String),
    DirSynced,
    Note(u64),
}

#[derive(Debug)]
struct Recorder {
    file: File,
    dev: u64,
    ino: u64,
    dir: PathBuf,
    name: String,
    len: u64,
    latest: BTreeMap<u64, Arc<[u8]>>,
    base_pages: BTreeMap<u64, Arc<[u8]>>,
    base_files: BTreeMap<String, Arc<[u8]>>,
    events: Vec<Event>,
    failed: Option<io::Error>,
}

/// What a recording saw: the durable start, and every event after it.
#[derive(Debug, Clone)]
pub struct CrashLog {
    name: String,
    len: u64,
    base_pages: BTreeMap<u64, Arc<[u8]>>,
    base_files: BTreeMap<String, Arc<[u8]>>,
    events: Vec<Event>,
}

/// Starts recording the tracker at `ctk` on this thread. Everything in its
/// files now counts as durable (the caller has synced it: closed the
/// tracker cleanly, or [`Tracker::sync`](crate::Tracker::sync)ed it).
pub fn record(ctk: &Path) -> io::Result<()> {
    let file = File::open(ctk)?;
    let m = file.metadata()?;
    let dir = ctk.parent().map_or_else(|| PathBuf::from("."), Path::to_owned);
    let name = ctk
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| io::Error::other("the ctk path has no file name"))?
        .to_owned();
    let mut rec = Recorder {
        file,
        dev: m.dev(),
        ino: m.ino(),
        dir,
        name,
        len: m.len(),
        latest: BTreeMap::new(),
        base_pages: BTreeMap::new(),
        base_files: BTreeMap::new(),
        events: Vec::new(),
        failed: None,
    };
    rec.scan()?;
    rec.events.clear();
    rec.base_pages = rec.latest.clone();
    for e in std::fs::read_dir(&rec.dir)? {
        let e = e?;
        let n = e.file_name().to_string_lossy().into_owned();
        if n != rec.name && n.starts_with(&rec.name) {
            rec.base_files.insert(n, std::fs::read(e.path())?.into());
        }
    }
    REC.with(|r| *r.borrow_mut() = Some(rec));
    Ok(())
}

/// Records the page versions the tracker's file holds now (the test calls
/// this after each step, so later crash states can hold them).
pub fn checkpoint() {
    with(|r| r.scan());
}

/// Records the test's own event `tag` at this point (after a checkpoint).
pub fn note(tag: u64) {
    with(|r| {
        r.scan()?;
        r.events.push(Event::Note(tag));
        Ok(())
    });
}

/// Stops recording on this thread and returns the log; an error if a scan failed.
pub fn finish() -> io::Result<CrashLog> {
    let rec = REC
        .with(|r| r.borrow_mut().take())
        .ok_or_else(|| io::Error::other("nothing was recorded on this thread"))?;
    if let Some(e) = rec.failed {
        return Err(e);
    }
    Ok(CrashLog {
        name: rec.name,
        len: rec.len,
        base_pages: rec.base_pages,
        base_files: rec.base_files,
        events: rec.events,
    })
}

fn with(f: impl FnOnce(&mut Recorder) -> io::Result<()>) {
    REC.with(|r| {
        if let Some(rec) = r.borrow_mut().as_mut() {
            if rec.failed.is_none() {
                if let Err(e) = f(rec) {
                    rec.failed = Some(e);
                }
            }
        }
    });
}

/// The hook of `Region::flush`: `len` bytes at `offset` of file (`dev`, `ino`) are durable.
pub(crate) fn synced(dev: u64, ino: u64, offset: u64, len: u64) {
    with(|r| {
        if (dev, ino) != (r.dev, r.ino) {
            return Ok(());
        }
        r.scan()?;
        r.events
            .push(Event::Synced(offset / PAGE, (offset + len).div_ceil(PAGE)));
        Ok(())
    });
}

/// The hook of an epoch file's fsync: `path` durably holds `bytes`.
pub(crate) fn file_synced(path: &Path, bytes: &[u8]) {
    with(|r| {
        if let Some(n) = r.ours(path) {
            r.scan()?;
            r.events.push(Event::FileSynced(n, bytes.into()));
        }
        Ok(())
    });
}

/// The hook of a rename in the tracker's directory.
pub(crate) fn renamed(from: &Path, to: &Path) {
    with(|r| {
        if let (Some(a), Some(b)) = (r.ours(from), r.ours(to)) {
            r.events.push(Event::Renamed(a, b));
        }
        Ok(())
    });
}

/// The hook of an unlink in the tracker's directory.
pub(crate) fn unlinked(path: &Path) {
    with(|r| {
        if let Some(n) = r.ours(path) {
            r.events.push(Event::Unlinked(n));
        }
        Ok(())
    });
}

/// The hook of a directory sync of the tracker's directory (`ctk` names its file).
pub(crate) fn dir_synced(ctk: &Path) {
    with(|r| {
        if r.ours(ctk).is_some() {
            r.scan()?;
            r.events.push(Event::DirSynced);
        }
        Ok(())
    });
}

impl Recorder {
    /// The name of `path` if it is one of the tracker's files in its directory.
    fn ours(&self, path: &Path) -> Option<String> {
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let n = path.file_name()?.to_str()?;
        (dir == self.dir && n.starts_with(&self.name)).then(|| n.to_owned())
    }

    /// Records every page of the file's data ranges that changed since it was last seen.
    fn scan(&mut self) -> io::Result<()> {
        use rustix::fs::{seek, SeekFrom};
        let mut off = 0;
        let mut buf = vec![0u8; PAGE as usize];
        while off < self.len {
            let data = match seek(&self.file, SeekFrom::Data(off)) {
                Ok(d) => d,
                Err(rustix::io::Errno::NXIO) => break,
                Err(e) => return Err(e.into()),
            };
            let hole = seek(&self.file, SeekFrom::Hole(data))?;
            for p in data / PAGE..hole.div_ceil(PAGE) {
                self.file.read_exact_at(&mut buf, p * PAGE)?;
                let same = match self.latest.get(&p) {
                    Some(old) => **old == *buf,
                    None => buf.iter().all(|&b| b == 0),
                };
                if !same {
                    let b: Arc<[u8]> = buf.as_slice().into();
                    self.latest.insert(p, b.clone());
                    self.events.push(Event::Page(p, b));
                }
            }
            off = hole;
        }
        Ok(())
    }
}

impl CrashLog {
    /// Events recorded.
    pub fn len(&self) -> usize {
        self.events.len()
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// The points to crash at: just before each event that made something
    /// durable (a write-back, an fsync, a directory sync), and the end.
    pub fn sync_points(&self) -> Vec<usize> {
        let mut v: Vec<usize> = self
            .events
            .iter()
            .enumerate()
            .filter(|(_, e)| matches!(e, Event::Synced(..) | Event::FileSynced(..) | Event::DirSynced))
            .map(|(i, _)| i)
            .collect();
        v.push(self.events.len());
        v
    }

    /// The test's notes recorded before point `k`, in order.
    pub fn notes(&self, k: usize) -> Vec<u64> {
        self.events[..k]
            .iter()
            .filter_map(|e| match e {
                Event::Note(t) => Some(*t),
                _ => None,
            })
            .collect()
    }

    /// Writes into `dir` (empty) what a power loss just before event `k`
    /// may leave, choosing with `rng`; returns the path of the ctk file.
    pub fn build(&self, k: usize, rng: &mut dyn FnMut() -> u64, dir: &Path) -> io::Result<PathBuf> {
        let mut durable = self.base_pages.clone();
        let mut latest = self.base_pages.clone();
        let mut later: BTreeMap<u64, Vec<Arc<[u8]>>> = BTreeMap::new();
        let mut files = self.base_files.clone();
        let mut contents: BTreeMap<String, Arc<[u8]>> = BTreeMap::new();
        let mut unsynced: Vec<&Event> = Vec::new();
        let apply = |files: &mut BTreeMap<String, Arc<[u8]>>, contents: &BTreeMap<String, Arc<[u8]>>, e: &Event| match e
        {
            Event::Renamed(a, b) => {
                files.remove(a);
                if let Some(c) = contents.get(a) {
                    files.insert(b.clone(), c.clone());
                }
            }
            Event::Unlinked(a) => {
                files.remove(a);
            }
            _ => {}
        };
        for e in &self.events[..k] {
            match e {
                Event::Page(p, b) => {
                    latest.insert(*p, b.clone());
                    later.entry(*p).or_default().push(b.clone());
                }
                Event::Synced(a, z) => {
                    for (p, b) in latest.range(*a..*z) {
                        durable.insert(*p, b.clone());
                        later.remove(p);
                    }
                }
                Event::FileSynced(n, b) => {
                    contents.insert(n.clone(), b.clone());
                }
                Event::Renamed(..) | Event::Unlinked(..) => unsynced.push(e),
                Event::DirSynced => {
                    for e in unsynced.drain(..) {
                        apply(&mut files, &contents, e);
                    }
                }
                Event::Note(_) => {}
            }
        }
        // The directory's later changes: a random prefix reached the disk.
        let n = (rng() % (unsynced.len() as u64 + 1)) as usize;
        for e in &unsynced[..n] {
            apply(&mut files, &contents, e);
        }
        // Each page not synced since it changed: its durable version, or any later one.
        for (p, versions) in later {
            let pick = (rng() % (versions.len() as u64 + 1)) as usize;
            if pick > 0 {
                durable.insert(p, versions[pick - 1].clone());
            }
        }
        let ctk = dir.join(&self.name);
        let f = File::create_new(&ctk)?;
        f.set_len(self.len)?;
        for (p, b) in &durable {
            if b.iter().any(|&x| x != 0) {
                f.write_all_at(b, p * PAGE)?;
            }
        }
        for (n, b) in &files {
            std::fs::write(dir.join(n), b)?;
        }
        Ok(ctk)
    }
}
