//! The checks of a run's backup points and its figures: each point restored
//! to an image, compared with the previous one, mounted (the journal
//! replayed, as after a power cut), its files or database checked, and its
//! file system checked with `e2fsck -fn` / `xfs_repair -n`.

use std::fs::File;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use backup::{Progress, Repository};

use super::files::FileLog;
use super::pg::Ledger;
use super::sys::{self, LoopImage, Mount};
use super::{Figures, FsKind, PointReport, RealError, RealRun, Taken};

const KIB4: usize = 4 << 10;
const KIB64: usize = 64 << 10;
/// The backup's chunk size for disks tracked at 64 KiB or finer.
const CHUNK_64K: u64 = 64 << 10;

/// What the checks need from the run.
pub(crate) struct Inputs<'a> {
    pub(crate) run: &'a RealRun,
    pub(crate) fs: FsKind,
    pub(crate) work: &'a Path,
    /// The file tree's checksums (file-tree runs).
    pub(crate) files: Option<&'a FileLog>,
    /// pgbench's committed transactions (PostgreSQL runs).
    pub(crate) ledger: Option<&'a Ledger>,
}

/// Makes file system `fs` on `device`, without a discard of the whole
/// device first (the first backup then reads what mkfs wrote, not the disk),
/// and with ext4's inode tables and journal written now rather than by a
/// kernel thread while the work runs.
pub(crate) fn mkfs(fs: FsKind, device: &Path) -> Result<(), RealError> {
    let mut cmd = match fs {
        FsKind::Ext4 => {
            let mut c = Command::new(sys::find_tool("mkfs.ext4").unwrap_or_else(|| "mkfs.ext4".into()));
            c.args(["-q", "-F", "-E", "nodiscard,lazy_itable_init=0,lazy_journal_init=0"]);
            c
        }
        FsKind::Xfs => {
            let mut c = Command::new(sys::find_tool("mkfs.xfs").unwrap_or_else(|| "mkfs.xfs".into()));
            c.args(["-q", "-f", "-K"]);
            c
        }
    };
    sys::run(&format!("mkfs.{}", fs.name()), cmd.arg(device))?;
    Ok(())
}

/// `e2fsck -fn` / `xfs_repair -n` of an image file: (clean, its output).
fn fsck(fs: FsKind, image: &Path) -> Result<(bool, String), RealError> {
    let mut cmd = match fs {
        FsKind::Ext4 => {
            let mut c = Command::new(sys::find_tool("e2fsck").unwrap_or_else(|| "e2fsck".into()));
            c.arg("-fn");
            c
        }
        FsKind::Xfs => {
            let mut c = Command::new(sys::find_tool("xfs_repair").unwrap_or_else(|| "xfs_repair".into()));
            c.args(["-n", "-f"]);
            c
        }
    };
    sys::run_status("checking the restored file system", cmd.arg(image))
}

fn fsck_name(fs: FsKind) -> &'static str {
    match fs {
        FsKind::Ext4 => "e2fsck -fn",
        FsKind::Xfs => "xfs_repair -n",
    }
}

/// Restores disk `disk` of point `point` to image file `to` (replaced).
fn restore(repo: &Repository, point: &str, disk: usize, to: &Path) -> Result<(), RealError> {
    backup::restore_to_file(repo, point, disk, to, true, &()).map_err(|source| RealError::Backup {
        what: format!("restoring disk {disk} of point {point} to {}", to.display()),
        source,
    })?;
    Ok(())
}

/// How two images differ: bytes, and bytes of the 4 KiB and 64 KiB blocks
/// that differ.
#[derive(Debug, Default, Clone, Copy)]
struct Diff {
    bytes: u64,
    bytes_4k: u64,
    bytes_64k: u64,
}

/// Reads as much of `buf` as `f` has; the bytes read.
fn read_full(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Compares images `a` and `b` (a shorter one reads as zeros past its end).
fn diff(a: &Path, b: &Path) -> Result<Diff, RealError> {
    let open = |p: &Path| File::open(p).map_err(|e| RealError::io(format!("cannot open {}", p.display()), e));
    let (mut fa, mut fb) = (open(a)?, open(b)?);
    let mut ba = vec![0u8; 1 << 20];
    let mut bb = vec![0u8; 1 << 20];
    let mut d = Diff::default();
    loop {
        let na = read_full(&mut fa, &mut ba).map_err(|e| RealError::io(format!("cannot read {}", a.display()), e))?;
        let nb = read_full(&mut fb, &mut bb).map_err(|e| RealError::io(format!("cannot read {}", b.display()), e))?;
        let n = na.max(nb);
        if n == 0 {
            return Ok(d);
        }
        ba[na..n].fill(0);
        bb[nb..n].fill(0);
        for (xa, xb) in ba[..n].chunks(KIB64).zip(bb[..n].chunks(KIB64)) {
            if xa == xb {
                continue;
            }
            d.bytes_64k += xa.len() as u64;
            for (ya, yb) in xa.chunks(KIB4).zip(xb.chunks(KIB4)) {
                if ya != yb {
                    d.bytes_4k += ya.len() as u64;
                    d.bytes += ya.iter().zip(yb).filter(|(p, q)| p != q).count() as u64;
                }
            }
        }
    }
}

fn remove(p: &Path) {
    let _ = std::fs::remove_file(p);
}

/// Restores and checks each point `taken` (in order).
pub(crate) fn check_points(
    inputs: &Inputs<'_>,
    taken: &[Taken],
    progress: &dyn Progress,
) -> Result<Vec<PointReport>, RealError> {
    let r = inputs.run;
    let work = inputs.work;
    let repo = Repository::open(&r.repository).map_err(|source| RealError::Backup {
        what: format!("opening repository {}", r.repository.display()),
        source,
    })?;
    let images = work.join("images");
    sys::mkdir(&images)?;
    let check_img = work.join("check.img");
    let check_dir = work.join("check");
    let mut prev: Option<(String, PathBuf)> = None;
    let mut reports = Vec::new();
    for t in taken {
        if progress.cancelled() {
            if let Some((_, p)) = prev {
                remove(&p);
            }
            return Err(RealError::Interrupted);
        }
        let id = t.outcome.point.as_str();
        let meta = repo.point_meta(id).map_err(|source| RealError::Backup {
            what: format!("reading point {id}"),
            source,
        })?;
        let dm = meta.disks.iter().find(|d| d.disk == r.disk).cloned();
        let mut problems = Vec::new();
        // The image as restored, kept until the next point is compared with it.
        let pristine = images.join(format!("point-{id}.img"));
        restore(&repo, id, r.disk, &pristine)?;
        let d = match &prev {
            Some((_, p)) => Some(diff(p, &pristine)?),
            None => None,
        };
        let follows = prev.as_ref().map(|(pid, _)| pid.clone());
        if let Some((_, p)) = prev.take() {
            remove(&p);
        }
        prev = Some((id.to_owned(), pristine));
        // An incremental on the previous point must have reported every block
        // that differs from it (a necessary condition of no missed blocks).
        if let (Some(d), Some(dm)) = (d, &dm) {
            if t.outcome.kind == "incremental" && t.outcome.parent == follows {
                if dm.granularity == 4096 && d.bytes_4k > dm.changed_bytes {
                    problems.push(format!(
                        "{} bytes of 4 KiB blocks differ from the previous point, but only {} were reported changed",
                        d.bytes_4k, dm.changed_bytes
                    ));
                }
                if dm.chunk_size == CHUNK_64K && d.bytes_64k > t.outcome.bytes_read {
                    problems.push(format!(
                        "{} bytes of 64 KiB blocks differ from the previous point, but the backup read only {}",
                        d.bytes_64k, t.outcome.bytes_read
                    ));
                }
            }
        }
        // A copy to mount: the mount replays the journal into it.
        restore(&repo, id, r.disk, &check_img)?;
        let mut files_checked = None;
        let mut files_bad = None;
        let mut database = None;
        {
            let lp = LoopImage::new(&check_img)?;
            let opts = match inputs.fs {
                // The live file system had the same UUID.
                FsKind::Xfs => "nouuid",
                FsKind::Ext4 => "",
            };
            match Mount::new(lp.device(), &check_dir, inputs.fs.name(), opts) {
                Ok(m) => {
                    if let Some(log) = inputs.files {
                        let (n, bad, ps) = super::files::check(m.dir(), log, t.sent_s, t.done_s);
                        files_checked = Some(n);
                        files_bad = Some(bad);
                        problems.extend(ps);
                        if bad > 5 {
                            problems.push(format!("... {bad} files missing or different in all"));
                        }
                    }
                    if let Some(ledger) = inputs.ledger {
                        let (db, ps) = super::pg::check(r, m.dir(), work, id, t, ledger)?;
                        database = db;
                        problems.extend(ps);
                    }
                    m.unmount()?;
                }
                Err(e) => problems.push(format!("the restored file system does not mount: {e}")),
            }
            lp.release()?;
        }
        let (fsck_ok, out) = fsck(inputs.fs, &check_img)?;
        if !fsck_ok {
            problems.push(format!(
                "{} found problems:\n{}",
                fsck_name(inputs.fs),
                sys::tail(&out, 10)
            ));
        }
        let report = PointReport {
            point: id.to_owned(),
            kind: t.outcome.kind.clone(),
            at_s: t.sent_s,
            backup_s: t.done_s - t.sent_s,
            changed_areas: dm.as_ref().map_or(t.outcome.changed_areas, |d| d.changed_areas),
            changed_bytes: dm.as_ref().map_or(t.outcome.changed_bytes, |d| d.changed_bytes),
            bytes_read: t.outcome.bytes_read,
            bytes_stored: t.outcome.bytes_stored,
            differing_bytes: d.map(|d| d.bytes),
            differing_4k_bytes: d.map(|d| d.bytes_4k),
            differing_64k_bytes: d.map(|d| d.bytes_64k),
            fsck_ok,
            files_checked,
            files_bad,
            database,
            problems,
        };
        progress.note(&point_line(inputs.fs, &report));
        reports.push(report);
    }
    if let Some((_, p)) = prev {
        remove(&p);
    }
    let _ = std::fs::remove_dir(&images);
    Ok(reports)
}

/// One line about a checked point.
fn point_line(fs: FsKind, p: &PointReport) -> String {
    let mut s = format!(
        "point {} ({}, at {:.1} s): restored; {} {}",
        p.point,
        p.kind,
        p.at_s,
        fsck_name(fs),
        if p.fsck_ok { "clean" } else { "FAILED" }
    );
    if let (Some(n), Some(bad)) = (p.files_checked, p.files_bad) {
        s.push_str(&format!("; {n} fsynced files checked, {bad} bad"));
    }
    if let Some(db) = &p.database {
        s.push_str(&format!(
            "; PostgreSQL started in {:.1} s, pg_amcheck {}, {} ledger rows >= {} acknowledged before the backup",
            db.start_s,
            if db.amcheck_ok { "clean" } else { "FAILED" },
            db.ledger_rows,
            db.acked_before_backup
        ));
    }
    if !p.problems.is_empty() {
        s.push_str(&format!(" -- {} problem(s)", p.problems.len()));
    }
    s
}

/// The figures over the incremental points that follow another point of
/// the run.
pub(crate) fn figures(points: &[PointReport], taken: &[Taken], granularity: u64, ledger: Option<&Ledger>) -> Figures {
    let mut f = Figures::default();
    let (mut seconds, mut stored, mut txns) = (0.0, 0u64, 0u64);
    for i in 1..points.len().min(taken.len()) {
        let (p, t, before) = (&points[i], &taken[i], &taken[i - 1]);
        if p.kind != "incremental" || t.outcome.parent.as_deref() != Some(before.outcome.point.as_str()) {
            continue;
        }
        f.incrementals += 1;
        seconds += t.sent_s - before.sent_s;
        f.reported_bytes += p.changed_bytes;
        f.read_bytes += p.bytes_read;
        stored += p.bytes_stored;
        f.differing_bytes += p.differing_bytes.unwrap_or(0);
        f.differing_4k_bytes += p.differing_4k_bytes.unwrap_or(0);
        f.differing_64k_bytes += p.differing_64k_bytes.unwrap_or(0);
        if let Some(l) = ledger {
            txns += l.between(before.sent_us, t.sent_us);
        }
    }
    if f.incrementals == 0 || seconds <= 0.0 {
        return f;
    }
    let per_min = |b: u64| Some(b as f64 / seconds * 60.0);
    f.changed_bytes_per_minute = per_min(f.reported_bytes);
    f.read_bytes_per_minute = per_min(f.read_bytes);
    f.stored_bytes_per_minute = per_min(stored);
    if ledger.is_some() {
        f.transactions = Some(txns);
        if txns > 0 {
            f.changed_bytes_per_transaction = Some(f.reported_bytes as f64 / txns as f64);
            f.read_bytes_per_transaction = Some(f.read_bytes as f64 / txns as f64);
        }
    }
    if f.differing_bytes > 0 {
        f.over_report = Some(f.reported_bytes as f64 / f.differing_bytes as f64);
        if granularity <= CHUNK_64K {
            f.over_report_64k = Some(f.read_bytes as f64 / f.differing_bytes as f64);
        }
    }
    f
}

#[cfg(test)]
mod tests {
    use super::diff;

    #[test]
    fn diff_counts_bytes_and_the_4k_and_64k_blocks_they_fall_in() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = vec![0u8; 3 << 20];
        let mut b = a.clone();
        b[10] = 1; // block 0
        b[11] = 1;
        b[(64 << 10) + 5000] = 9; // another 64 KiB block, second 4 KiB block of it
        b[(2 << 20) + 100] = 3; // past the first 1 MiB buffer
        a[(3 << 20) - 1] = 4; // the last byte
        let (pa, pb) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&pa, &a).unwrap();
        std::fs::write(&pb, &b).unwrap();
        let d = diff(&pa, &pb).unwrap();
        assert_eq!(d.bytes, 5);
        assert_eq!(d.bytes_4k, 4 * 4096);
        assert_eq!(d.bytes_64k, 4 * 65536);
        // A shorter image reads as zeros past its end.
        std::fs::write(&pb, &a[..1 << 20]).unwrap();
        assert_eq!(diff(&pa, &pb).unwrap().bytes, 1);
        assert_eq!(diff(&pa, &pa).unwrap().bytes_64k, 0);
    }
}
