//! The file-tree work of ext4 and xfs runs: writer threads that create files
//! of seeded sizes and contents, fsync each (and its directory), remember
//! their checksums off the disk, and delete the oldest to stay within a
//! budget; fio writes files beside them.

use std::collections::VecDeque;
use std::fs::File;
use std::io::Write as _;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use backup::Progress;
use parking_lot::Mutex;
use serde::Serialize;

use super::sys::{self, ChildGuard};
use super::{schedule, Clock, RealError, RealRun, Taken, WorkReport};

/// Smallest and largest file the writers write.
const MIN_FILE: u64 = 1 << 10;
const MAX_FILE: u64 = 256 << 10;
/// Files per directory.
const PER_DIR: u64 = 100;
/// The share of the disk the file tree may hold, all writers together.
const BUDGET_SHARE: u64 = 4;
/// fio's file and rate: 4 KiB random writes, fsync every 16.
const FIO_SIZE: &str = "32M";
const FIO_IOPS: &str = "200";

/// A file a writer wrote.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct FileRec {
    /// Its path below the mount point.
    pub(crate) path: String,
    pub(crate) size: u64,
    /// BLAKE3 of its content (hex).
    pub(crate) blake3: String,
    /// When its fsync and its directory's returned, seconds since the work began.
    pub(crate) durable_s: f64,
    /// When its deletion began.
    pub(crate) deleted_s: Option<f64>,
}

/// The checksums of the files written, kept off the disk.
#[derive(Debug, Default)]
pub(crate) struct FileLog {
    recs: Mutex<Vec<FileRec>>,
}

impl FileLog {
    fn push(&self, r: FileRec) -> usize {
        let mut v = self.recs.lock();
        v.push(r);
        v.len() - 1
    }

    fn deleting(&self, i: usize, at: f64) {
        self.recs.lock()[i].deleted_s = Some(at);
    }

    /// The files that must be in a snapshot taken between `sent_s` and
    /// `done_s`: durable before `sent_s`, their deletion not begun by `done_s`.
    pub(crate) fn expected(&self, sent_s: f64, done_s: f64) -> Vec<FileRec> {
        self.recs
            .lock()
            .iter()
            .filter(|r| r.durable_s < sent_s && r.deleted_s.is_none_or(|d| d > done_s))
            .cloned()
            .collect()
    }

    /// Writes the log as JSON lines (for a look afterwards).
    pub(crate) fn save(&self, path: &Path) -> Result<(), RealError> {
        let mut out = String::new();
        for r in self.recs.lock().iter() {
            out.push_str(&serde_json::to_string(r).unwrap_or_default());
            out.push('\n');
        }
        std::fs::write(path, out).map_err(|e| RealError::io(format!("cannot write {}", path.display()), e))
    }
}

/// What a writer did.
#[derive(Debug, Default)]
struct Written {
    files: u64,
    bytes: u64,
    deleted: u64,
}

/// The content of file `n` of writer `w`: its size and bytes, from the seed.
fn content(seed: u64, w: u32, n: u64) -> Vec<u8> {
    let key = blake3::hash(format!("cbtsim real guest {seed}/{w}/{n}").as_bytes());
    let k = key.as_bytes();
    let pick = u64::from_le_bytes(k[..8].try_into().expect("8 bytes"));
    let size = MIN_FILE + pick % (MAX_FILE - MIN_FILE + 1);
    let mut buf = vec![0u8; size as usize];
    blake3::Hasher::new_keyed(k).finalize_xof().fill(&mut buf);
    buf
}

fn fsync_dir(dir: &Path) -> Result<(), RealError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| RealError::io(format!("cannot fsync directory {}", dir.display()), e))
}

/// One writer: files under `mnt/wW/`, until `stop`.
fn writer(
    mnt: &Path,
    w: u32,
    seed: u64,
    budget: u64,
    clock: &Clock,
    stop: &AtomicBool,
    log: &FileLog,
) -> Result<Written, RealError> {
    let io = |what: &str, p: &Path| {
        let m = format!("{what} {}", p.display());
        move |e| RealError::io(m, e)
    };
    let top = mnt.join(format!("w{w}"));
    std::fs::create_dir(&top).map_err(io("cannot create", &top))?;
    fsync_dir(mnt)?;
    let mut live: VecDeque<(usize, std::path::PathBuf, u64)> = VecDeque::new();
    let mut live_bytes = 0;
    let mut done = Written::default();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let dir = top.join(format!("d{:05}", n / PER_DIR));
        if n.is_multiple_of(PER_DIR) {
            std::fs::create_dir(&dir).map_err(io("cannot create", &dir))?;
            fsync_dir(&top)?;
        }
        let data = content(seed, w, n);
        let path = dir.join(format!("f{n:07}"));
        let mut f = File::create(&path).map_err(io("cannot create", &path))?;
        f.write_all(&data).map_err(io("cannot write", &path))?;
        f.sync_all().map_err(io("cannot fsync", &path))?;
        drop(f);
        fsync_dir(&dir)?;
        let rel = path.strip_prefix(mnt).unwrap_or(&path).to_string_lossy().into_owned();
        let i = log.push(FileRec {
            path: rel,
            size: data.len() as u64,
            blake3: blake3::hash(&data).to_hex().to_string(),
            durable_s: clock.now_s(),
            deleted_s: None,
        });
        done.files += 1;
        done.bytes += data.len() as u64;
        live_bytes += data.len() as u64;
        live.push_back((i, path, data.len() as u64));
        while live_bytes > budget {
            let Some((i, p, size)) = live.pop_front() else { break };
            // Marked before the unlink: from now on the file may be gone.
            log.deleting(i, clock.now_s());
            std::fs::remove_file(&p).map_err(io("cannot delete", &p))?;
            live_bytes -= size;
            done.deleted += 1;
        }
        n += 1;
    }
    Ok(done)
}

/// fio's random writes on a file of the mounted file system for `seconds`.
fn start_fio(mnt: &Path, work: &Path, seconds: f64) -> Result<ChildGuard, RealError> {
    let dir = mnt.join("fio");
    sys::mkdir(&dir)?;
    let fio = sys::find_tool("fio").unwrap_or_else(|| "fio".into());
    let mut cmd = Command::new(fio);
    cmd.arg("--name=cbtsim-real")
        .arg(format!("--directory={}", dir.display()))
        .arg(format!("--size={FIO_SIZE}"))
        .args([
            "--bs=4k",
            "--rw=randwrite",
            "--ioengine=psync",
            "--fsync=16",
            "--time_based",
        ])
        .arg(format!("--runtime={}", seconds.ceil() as u64))
        .arg(format!("--rate_iops={FIO_IOPS}"))
        .arg("--output-format=json")
        .arg(format!("--output={}", work.join("fio.json").display()));
    ChildGuard::spawn("fio", &mut cmd, &work.join("fio.out"), &work.join("fio.err"))
}

/// (bytes written, writes) from fio's JSON output.
fn fio_result(work: &Path) -> Result<(u64, u64), RealError> {
    let path = work.join("fio.json");
    let text =
        std::fs::read_to_string(&path).map_err(|e| RealError::io(format!("cannot read {}", path.display()), e))?;
    // fio may print notes before the JSON document.
    let json = text.find('{').map_or("", |i| &text[i..]);
    let v: serde_json::Value =
        serde_json::from_str(json).map_err(|e| RealError::failed("reading fio's output", e.to_string()))?;
    let w = &v["jobs"][0]["write"];
    match (w["io_bytes"].as_u64(), w["total_ios"].as_u64()) {
        (Some(b), Some(n)) => Ok((b, n)),
        _ => Err(RealError::failed("reading fio's output", "no write figures in it")),
    }
}

/// The file-tree work with the backup schedule: returns the backups taken
/// and what was written.
pub(crate) fn work(
    r: &RealRun,
    mnt: &Path,
    work: &Path,
    log: &FileLog,
    progress: &dyn Progress,
) -> Result<(Vec<Taken>, WorkReport), RealError> {
    let statvfs = rustix::fs::statvfs(mnt).map_err(|e| RealError::io("statvfs of the mounted disk", e.into()))?;
    let fs_bytes = statvfs.f_blocks * statvfs.f_frsize;
    let budget = fs_bytes / BUDGET_SHARE / u64::from(r.writers);
    progress.note(&format!(
        "work: {} writer(s) (files of 1-256 KiB, fsynced, oldest deleted beyond {} each) and fio (4 KiB random writes, {FIO_IOPS}/s) for {} s, a backup every {} s",
        r.writers,
        workloads::human(budget),
        r.seconds,
        r.backup_every
    ));
    let fio = start_fio(mnt, work, r.seconds)?;
    let clock = Clock { t0: Instant::now() };
    let stop = AtomicBool::new(false);
    let (taken, written) = std::thread::scope(|s| {
        let handles: Vec<_> = (0..r.writers)
            .map(|w| {
                let (clock, stop) = (&clock, &stop);
                s.spawn(move || {
                    let out = writer(mnt, w, r.seed, budget, clock, stop, log);
                    if out.is_err() {
                        stop.store(true, Ordering::Relaxed);
                    }
                    out
                })
            })
            .collect();
        let taken = schedule(r, &clock, &stop, progress);
        stop.store(true, Ordering::Relaxed);
        let written: Vec<Result<Written, RealError>> = handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(RealError::failed("a file writer", "panicked")))
            })
            .collect();
        (taken, written)
    });
    let taken = taken?;
    let mut report = WorkReport::default();
    for w in written {
        let w = w?;
        report.files_written += w.files;
        report.file_bytes_written += w.bytes;
        report.files_deleted += w.deleted;
    }
    if !fio.wait(Duration::from_secs(60))? {
        let err = std::fs::read_to_string(work.join("fio.err")).unwrap_or_default();
        return Err(RealError::failed("fio", sys::tail(&err, 8)));
    }
    let (b, n) = fio_result(work)?;
    report.fio_bytes_written = Some(b);
    report.fio_writes = Some(n);
    progress.note(&format!(
        "wrote {} file(s) ({}), deleted {}; fio wrote {} in {n} writes",
        report.files_written,
        workloads::human(report.file_bytes_written),
        report.files_deleted,
        workloads::human(b)
    ));
    Ok((taken, report))
}

/// Checks the files a snapshot taken between `sent_s` and `done_s` must
/// hold, on its restored file system mounted at `mnt`: (checked, bad, the
/// first few problems).
pub(crate) fn check(mnt: &Path, log: &FileLog, sent_s: f64, done_s: f64) -> (u64, u64, Vec<String>) {
    let expected = log.expected(sent_s, done_s);
    let mut bad = 0;
    let mut problems = Vec::new();
    for r in &expected {
        let why = match std::fs::read(mnt.join(&r.path)) {
            Ok(data) if blake3::hash(&data).to_hex().as_str() == r.blake3 => continue,
            Ok(data) => format!(
                "file {} (fsynced at {:.2} s) has other content ({} bytes, {} expected)",
                r.path,
                r.durable_s,
                data.len(),
                r.size
            ),
            Err(e) => format!("file {} (fsynced at {:.2} s) is missing: {e}", r.path, r.durable_s),
        };
        bad += 1;
        if problems.len() < 5 {
            problems.push(why);
        }
    }
    (expected.len() as u64, bad, problems)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contents_are_seeded_and_sized_within_bounds() {
        let a = content(7, 0, 3);
        assert_eq!(a, content(7, 0, 3));
        assert_ne!(a, content(8, 0, 3));
        assert_ne!(a, content(7, 1, 3));
        for n in 0..50 {
            let len = content(1, 0, n).len() as u64;
            assert!((MIN_FILE..=MAX_FILE).contains(&len), "{len}");
        }
    }

    fn rec(path: &str, data: &[u8], durable_s: f64, deleted_s: Option<f64>) -> FileRec {
        FileRec {
            path: path.into(),
            size: data.len() as u64,
            blake3: blake3::hash(data).to_hex().to_string(),
            durable_s,
            deleted_s,
        }
    }

    #[test]
    fn a_point_must_hold_the_files_durable_before_it_and_not_yet_deleted() {
        let log = FileLog::default();
        log.push(rec("a", b"a", 1.0, None));
        log.push(rec("b", b"b", 1.0, Some(2.5))); // deletion began during the backup: may be gone
        log.push(rec("c", b"c", 1.0, Some(3.5))); // deleted after the backup
        log.push(rec("d", b"d", 2.1, None)); // durable after the backup was asked for
        let names: Vec<String> = log.expected(2.0, 3.0).into_iter().map(|r| r.path).collect();
        assert_eq!(names, ["a", "c"]);
    }

    #[test]
    fn the_check_finds_a_missing_and_a_changed_file() {
        let dir = tempfile::tempdir().unwrap();
        let log = FileLog::default();
        for (name, data) in [("ok", b"same"), ("changed", b"orig"), ("gone", b"here")] {
            log.push(rec(name, data, 0.5, None));
        }
        std::fs::write(dir.path().join("ok"), b"same").unwrap();
        std::fs::write(dir.path().join("changed"), b"ORIG").unwrap();
        let (checked, bad, problems) = check(dir.path(), &log, 1.0, 1.5);
        assert_eq!((checked, bad), (3, 2));
        assert!(
            problems
                .iter()
                .any(|p| p.contains("changed") && p.contains("other content")),
            "{problems:?}"
        );
        assert!(
            problems.iter().any(|p| p.contains("gone") && p.contains("missing")),
            "{problems:?}"
        );
    }
}
