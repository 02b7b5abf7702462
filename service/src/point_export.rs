//! Backup points as read-only NBD exports: `repo:POINT/DISK` (with `cbtsim serve --repo
//! DIR`) serves disk `DISK` of restore point `POINT` straight from the repository's
//! chunks ([`backup::PointImage`]: read in place, every chunk checked against its hash),
//! byte for byte the image a restore would write. A client copies it (`qemu-img
//! convert`, `nbdcopy`) or boots from it without restoring first.
//!
//! While such an export is open it holds the repository's readers' lock, so prune
//! refuses to delete its chunks; backups go on meanwhile. A chunk that fails its check
//! is an `EIO` on the read, never wrong bytes.

use backup::{BackupError, PointImage, Repository};
use nbd::{BlockSize, Export, ExportError, ExportListing, OpenError};

/// The prefix of a point export's name.
pub const PREFIX: &str = "repo:";

/// Parses `repo:POINT/DISK` into the point and the disk; `None` if `name` is not one.
pub fn parse(name: &str) -> Option<(&str, usize)> {
    let (point, disk) = name.strip_prefix(PREFIX)?.split_once('/')?;
    let ok_point = !point.is_empty() && point.len() <= 64 && point.bytes().all(|b| b.is_ascii_alphanumeric());
    let ok_disk = !disk.is_empty() && disk.len() <= 6 && disk.bytes().all(|b| b.is_ascii_digit());
    if !ok_point || !ok_disk {
        return None;
    }
    Some((point, disk.parse().ok()?))
}

/// The exports of every point of `repo`.
pub fn list(repo: &Repository) -> Vec<ExportListing> {
    let mut out = Vec::new();
    for p in repo.points().unwrap_or_default() {
        for d in &p.disks {
            out.push(ExportListing {
                name: format!("{PREFIX}{}/{}", p.point, d.disk),
                description: format!(
                    "backup point {} of VM {} ({}, {}) disk {}, {} bytes, read-only",
                    p.point, p.vm, p.kind, p.time_utc, d.disk, d.capacity
                ),
            });
        }
    }
    out
}

/// Opens export `name` (`repo:POINT/DISK`) of `repo`; `None` as the repository: this
/// serve has none.
pub fn open(repo: Option<&Repository>, name: &str) -> Result<PointExport, OpenError> {
    let Some((point, disk)) = parse(name) else {
        return Err(OpenError::Unknown(format!(
            "{name} (a backup point's export is repo:POINT/DISK)"
        )));
    };
    let Some(repo) = repo else {
        return Err(OpenError::Unknown(format!(
            "{name}: this serve has no repository (start it with --repo DIR)"
        )));
    };
    let image = PointImage::open(repo, point, disk).map_err(|e| match e {
        BackupError::NoSuchPoint(_) | BackupError::NoSuchDisk { .. } => {
            OpenError::Unknown(format!("{name}: {}", crate::action::chain(&e)))
        }
        e => OpenError::Unavailable(format!("{name}: {}", crate::action::chain(&e))),
    })?;
    Ok(PointExport {
        image,
        name: name.to_owned(),
    })
}

/// Disk `DISK` of point `POINT`, read-only.
#[derive(Debug)]
pub struct PointExport {
    image: PointImage,
    name: String,
}

impl Export for PointExport {
    fn size(&self) -> u64 {
        self.image.capacity()
    }

    fn is_read_only(&self) -> bool {
        true
    }

    fn block_size(&self) -> BlockSize {
        BlockSize::new(1, 64 << 10, 32 << 20).unwrap_or_default()
    }

    fn description(&self) -> String {
        let m = self.image.meta();
        format!(
            "{}: backup point of VM {} taken {}, read-only",
            self.name, m.vm, m.time_utc
        )
    }

    fn can_multi_conn(&self) -> bool {
        true
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), ExportError> {
        self.image
            .read_at(offset, buf)
            .map_err(|e| ExportError::Io(crate::action::chain(&e)))
    }

    fn write(&self, _offset: u64, _data: &[u8]) -> Result<(), ExportError> {
        Err(ExportError::ReadOnly)
    }

    fn flush(&self) -> Result<(), ExportError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn point_export_names() {
        assert_eq!(parse("repo:00000001/0"), Some(("00000001", 0)));
        assert_eq!(parse("repo:ab12/3"), Some(("ab12", 3)));
        for bad in [
            "",
            "repo:",
            "repo:/0",
            "repo:p/",
            "repo:p/x",
            "repo:../0",
            "repo:p/0/1",
            "repo:p@s/0",
            "web01/0",
            "repo:p/99999999999",
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }
}
