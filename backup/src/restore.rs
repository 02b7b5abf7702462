//! Restore: a point's disk to a raw image file, or a whole point to a new VM.

use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::point::Point;
use crate::repo::{sync_dir, Repository};
use crate::{BackupError, Progress};
use vadp::{RestoreDisk, RestoreTarget};

/// What a restore did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RestoreReport {
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

fn disk_total(p: &Point, disk: usize) -> u64 {
    let cs = p.meta.disks[disk].chunk_size;
    let cap = p.meta.disks[disk].capacity;
    p.index[disk].iter().map(|&(n, _)| cs.min(cap - n * cs)).sum()
}

/// Reads every chunk of `disk` of `p` in order and hands it to `sink` with
/// its offset. Each chunk is checked against its hash before it is used.
fn each_chunk(
    repo: &Repository,
    p: &Point,
    disk: usize,
    progress: &dyn Progress,
    mut sink: impl FnMut(u64, &[u8]) -> Result<(), BackupError>,
) -> Result<u64, BackupError> {
    let d = &p.meta.disks[disk];
    let mut written = 0;
    for &(n, h) in &p.index[disk] {
        let data = repo.read_chunk(h)?;
        let off = n * d.chunk_size;
        if data.len() as u64 > d.chunk_size.min(d.capacity - off) {
            return Err(BackupError::CorruptChunk {
                hash: h,
                reason: format!(
                    "{} bytes do not fit chunk {n} of disk {disk} of point {}",
                    data.len(),
                    p.meta.point
                ),
            });
        }
        sink(off, &data)?;
        written += data.len() as u64;
        progress.advance(data.len() as u64);
    }
    Ok(written)
}

/// Writes `disk` of point `id` to `to` as a raw image of the disk's full
/// size, sparse where the point holds zeros. The file appears atomically
/// (written beside it, fsynced, renamed); a file already at `to` is replaced
/// only with `overwrite`, else the restore fails with
/// [`BackupError::Exists`] before reading anything (and, should one appear
/// meanwhile, at the rename). `progress` gets one phase, in bytes of data.
pub fn restore_to_file(
    repo: &Repository,
    id: &str,
    disk: usize,
    to: &Path,
    overwrite: bool,
    progress: &dyn Progress,
) -> Result<RestoreReport, BackupError> {
    let started = Instant::now();
    if !overwrite && to.symlink_metadata().is_ok() {
        return Err(BackupError::Exists(to.to_owned()));
    }
    let _readers = repo.lock_readers()?;
    let p = repo.load_point(id)?;
    if disk >= p.meta.disks.len() {
        return Err(BackupError::NoSuchDisk {
            point: p.meta.point.clone(),
            disk,
            count: p.meta.disks.len(),
        });
    }
    let capacity = p.meta.disks[disk].capacity;
    let dir = match to.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => std::path::PathBuf::from("."),
    };
    let name = to
        .file_name()
        .ok_or_else(|| BackupError::InvalidArgument(format!("{} is not a file name", to.display())))?;
    let tmp = dir.join(format!(".{}.restore-{}", name.to_string_lossy(), std::process::id()));
    let result = (|| {
        let f = File::create(&tmp).map_err(BackupError::io("cannot create", &tmp))?;
        f.set_len(capacity).map_err(BackupError::io("cannot size", &tmp))?;
        progress.begin(&format!("point {id} disk {disk}"), Some(disk_total(&p, disk)));
        let written = each_chunk(repo, &p, disk, progress, |off, data| {
            f.write_all_at(data, off).map_err(BackupError::io("cannot write", &tmp))
        })?;
        progress.end();
        f.sync_all().map_err(BackupError::io("cannot sync", &tmp))?;
        if overwrite {
            fs::rename(&tmp, to).map_err(BackupError::io("cannot rename into place", to))?;
        } else {
            let cwd = rustix::fs::CWD;
            match rustix::fs::renameat_with(cwd, &tmp, cwd, to, rustix::fs::RenameFlags::NOREPLACE) {
                Ok(()) => {}
                Err(rustix::io::Errno::EXIST) => return Err(BackupError::Exists(to.to_owned())),
                Err(e) => return Err(BackupError::io("cannot rename into place", to)(e.into())),
            }
        }
        sync_dir(&dir)?;
        Ok(written)
    })();
    let written = result.inspect_err(|_| {
        let _ = fs::remove_file(&tmp);
    })?;
    Ok(RestoreReport {
        point: p.meta.point.clone(),
        vm: p.meta.vm.clone(),
        target: to.display().to_string(),
        disks: 1,
        capacity,
        bytes_written: written,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Creates VM `new_vm` on `target` with the disks of point `id` and writes
/// their content. Every chunk is checked to be present before the VM is
/// created; a failure after that deletes the VM again
/// ([`BackupError::RestoreFailed`]), or, where even that fails, is
/// [`BackupError::PartialRestore`] naming the VM left behind.
/// `progress` gets a phase per disk, in bytes of data.
pub fn restore_to_vm(
    repo: &Repository,
    id: &str,
    target: &dyn RestoreTarget,
    new_vm: &str,
    progress: &dyn Progress,
) -> Result<RestoreReport, BackupError> {
    let started = Instant::now();
    let _readers = repo.lock_readers()?;
    let p = repo.load_point(id)?;
    for &(_, h) in p.index.iter().flatten() {
        if !repo.has_chunk(h) {
            return Err(repo.absent(h));
        }
    }
    let disks: Vec<RestoreDisk> = p
        .meta
        .disks
        .iter()
        .map(|d| RestoreDisk {
            capacity: d.capacity,
            granularity: d.granularity,
        })
        .collect();
    target
        .create_vm(new_vm, &disks)
        .map_err(BackupError::host(format!("creating VM {new_vm}")))?;
    let mut written = 0;
    for disk in 0..disks.len() {
        progress.begin(&format!("point {id} disk {disk}"), Some(disk_total(&p, disk)));
        let result = each_chunk(repo, &p, disk, progress, |off, data| {
            target
                .write(new_vm, disk, off, data)
                .map_err(BackupError::host(format!("writing disk {disk} of VM {new_vm}")))
        });
        progress.end();
        match result {
            Ok(n) => written += n,
            // A half-written VM must not look like a restored one: delete it.
            Err(e) => {
                return Err(match target.delete_vm(new_vm) {
                    Ok(()) => BackupError::RestoreFailed {
                        vm: new_vm.to_owned(),
                        source: Box::new(e),
                    },
                    Err(del) => BackupError::PartialRestore {
                        vm: new_vm.to_owned(),
                        source: Box::new(e),
                        delete_error: del.to_string(),
                    },
                })
            }
        }
    }
    Ok(RestoreReport {
        point: p.meta.point.clone(),
        vm: p.meta.vm.clone(),
        target: new_vm.to_owned(),
        disks: disks.len(),
        capacity: disks.iter().map(|d| d.capacity).sum(),
        bytes_written: written,
        seconds: started.elapsed().as_secs_f64(),
    })
}
