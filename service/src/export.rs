//! The NBD front end: the host's disks as NBD exports ([`HostExports`]).
//!
//! | export name | what | writes |
//! | --- | --- | --- |
//! | `VM/DISK` | the live disk | guest writes ([`Vm::write`], trims and zeroing as [`Vm::unmap`]): tracked, gated, stunned like any other |
//! | `VM/DISK@SNAPSHOT` | the snapshot's frozen view | `EPERM` |
//! | `repo:POINT/DISK` | a backup point's disk, with `serve --repo` ([`point_export`](crate::point_export)) | `EPERM` |
//!
//! Metadata contexts:
//! * `base:allocation` on a snapshot: the `*` answer of
//!   `QueryChangedDiskAreas` at that snapshot (the areas ever written) is
//!   data, the rest is a hole that reads as zeroes. With change tracking off
//!   there is no such answer and everything is reported as data. On the live
//!   disk the host's public API has no allocation query, so everything is
//!   reported as data (always correct, only slower to copy).
//! * `qemu:dirty-bitmap:CHANGE_ID` on a snapshot: the areas changed between
//!   that change ID and the snapshot, exactly what the query answers
//!   (`NBD_STATE_DIRTY`). Listing `qemu:dirty-bitmap:` offers the change IDs
//!   of this and the older snapshots of the disk; any change ID the query
//!   accepts can be selected (it is parsed as a [`tracker::ChangeId`] and
//!   tried). A query that fails while a client asks for block status is an
//!   NBD error, never a short answer.
//!
//! A snapshot removed (or reverted away) while its export is open: every
//! later request of that export fails with `EIO` ("snapshot removed").
//! Nothing here is host logic: each call is one host operation.

use std::sync::Arc;

use nbd::{
    BlockSize, Export, ExportError, ExportListing, Exports, Extent, OpenError, BASE_ALLOCATION, QEMU_DIRTY_BITMAP,
    STATE_DIRTY, STATE_HOLE, STATE_ZERO,
};
use sim::{SimError, Vm};
use vadp::VadpError;

use crate::exec::{Liveness, Service};

/// Block status answers stop after this many extents (the client asks again
/// for the rest), so one request costs a bounded amount of work.
const MAX_STATUS_EXTENTS: usize = 4096;

/// What an export name names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportName {
    /// The VM.
    pub vm: String,
    /// The disk's index.
    pub disk: usize,
    /// The snapshot, or the live disk.
    pub snapshot: Option<String>,
}

impl ExportName {
    /// Parses `VM/DISK` or `VM/DISK@SNAPSHOT`.
    pub fn parse(name: &str) -> Option<ExportName> {
        let (vm, rest) = name.split_once('/')?;
        let (disk, snapshot) = match rest.split_once('@') {
            Some((d, s)) => (d, Some(s.to_owned())),
            None => (rest, None),
        };
        let ok_disk = !disk.is_empty() && disk.len() <= 6 && disk.bytes().all(|b| b.is_ascii_digit());
        if sim::check_name(vm).is_err() || !ok_disk || snapshot.as_deref().is_some_and(|s| sim::check_name(s).is_err())
        {
            return None;
        }
        Some(ExportName {
            vm: vm.to_owned(),
            disk: disk.parse().ok()?,
            snapshot,
        })
    }
}

impl std::fmt::Display for ExportName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.vm, self.disk)?;
        if let Some(s) = &self.snapshot {
            write!(f, "@{s}")?;
        }
        Ok(())
    }
}

/// The exports of a [`Service`]'s host (and of a backup repository's points, see
/// [`point_export`](crate::point_export)).
#[derive(Debug)]
pub struct HostExports {
    service: Arc<Service>,
    repository: Option<backup::Repository>,
}

impl HostExports {
    /// The exports of `service`'s VMs.
    pub fn new(service: Arc<Service>) -> Self {
        HostExports {
            service,
            repository: None,
        }
    }

    /// Also the points of `repository`, as `repo:POINT/DISK` (read-only).
    pub fn with_repository(mut self, repository: backup::Repository) -> Self {
        self.repository = Some(repository);
        self
    }
}

fn human(bytes: u64) -> String {
    const UNITS: [(&str, u32); 4] = [("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)];
    for (u, s) in UNITS {
        if bytes >= 1 << s && bytes.is_multiple_of(1 << s) {
            return format!("{} {u}", bytes >> s);
        }
    }
    format!("{bytes} bytes")
}

impl Exports for HostExports {
    fn list(&self) -> Vec<ExportListing> {
        let host = self.service.host();
        let mut out = Vec::new();
        for summary in host.list().unwrap_or_default() {
            let Ok(vm) = host.vm(&summary.name) else {
                continue;
            };
            let snaps = vm.snapshots();
            for disk in 0..vm.disk_count() {
                let Ok(cap) = vm.capacity(disk) else {
                    continue;
                };
                out.push(ExportListing {
                    name: format!("{}/{disk}", summary.name),
                    description: format!("VM {} disk {disk}, live ({}), read-write", summary.name, human(cap)),
                });
                for s in &snaps {
                    let Some(d) = s.disks.get(disk) else {
                        continue;
                    };
                    let cid = d.change_id.as_deref().unwrap_or("none: change tracking was off");
                    out.push(ExportListing {
                        name: format!("{}/{disk}@{}", summary.name, s.name),
                        description: format!(
                            "VM {} disk {disk} at snapshot {} ({}), read-only, change ID {cid}",
                            summary.name,
                            s.name,
                            human(d.capacity)
                        ),
                    });
                }
            }
        }
        if let Some(repo) = &self.repository {
            out.extend(crate::point_export::list(repo));
        }
        out
    }

    fn open(&self, name: &str) -> Result<Arc<dyn Export>, OpenError> {
        if self.service.is_stopping() {
            return Err(OpenError::Shutdown);
        }
        if name.starts_with(crate::point_export::PREFIX) {
            return Ok(Arc::new(crate::point_export::open(self.repository.as_ref(), name)?));
        }
        let Some(n) = ExportName::parse(name) else {
            return Err(OpenError::Unknown(format!(
                "{name} (export names are VM/DISK or VM/DISK@SNAPSHOT)"
            )));
        };
        let unknown = |e: SimError| OpenError::Unknown(format!("{name}: {e}"));
        let vm = self.service.host().vm(&n.vm).map_err(unknown)?;
        match n.snapshot {
            None => {
                let size = vm.capacity(n.disk).map_err(unknown)?;
                let granularity = vm.granularity(n.disk).map_err(unknown)?.bytes();
                Ok(Arc::new(LiveExport {
                    vm,
                    disk: n.disk,
                    size,
                    granularity,
                }))
            }
            Some(snap) => {
                let live = self.service.watch(&n.vm, &snap);
                let size = live
                    .read(|| vm.snapshot_capacity(&snap, n.disk))
                    .ok_or_else(|| OpenError::Unavailable(format!("snapshot {snap} of VM {} is being removed", n.vm)))?
                    .map_err(unknown)?;
                let granularity = vm.granularity(n.disk).map_err(unknown)?.bytes();
                Ok(Arc::new(SnapshotExport {
                    service: self.service.clone(),
                    vm,
                    disk: n.disk,
                    snap,
                    size,
                    granularity,
                    live,
                }))
            }
        }
    }
}

fn block_size(granularity: u64) -> BlockSize {
    // Any alignment works (the host takes byte ranges); prefer whole
    // tracking blocks, at most 2 MiB.
    let preferred = granularity.clamp(4096, 2 << 20) as u32;
    BlockSize::new(1, preferred, 32 << 20).unwrap_or_default()
}

fn export_error(e: SimError) -> ExportError {
    match e {
        SimError::OutOfRange { .. } => ExportError::NoSpace(e.to_string()),
        SimError::PoweredOff(_) => ExportError::Io(e.to_string()),
        e => ExportError::Io(crate::action::chain(&e)),
    }
}

/// A VM's live disk.
#[derive(Debug)]
struct LiveExport {
    vm: Arc<Vm>,
    disk: usize,
    size: u64,
    granularity: u64,
}

impl Export for LiveExport {
    fn size(&self) -> u64 {
        self.size
    }

    fn is_read_only(&self) -> bool {
        false
    }

    fn block_size(&self) -> BlockSize {
        block_size(self.granularity)
    }

    fn description(&self) -> String {
        format!("VM {} disk {}, live, read-write", self.vm.name(), self.disk)
    }

    fn can_multi_conn(&self) -> bool {
        // Every connection writes into the same mapped layers, and a flush
        // writes back the whole VM.
        true
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), ExportError> {
        self.vm.read(self.disk, offset, buf).map_err(export_error)
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), ExportError> {
        self.vm.write(self.disk, offset, data).map_err(export_error)
    }

    fn flush(&self) -> Result<(), ExportError> {
        self.vm.flush().map_err(export_error)
    }

    fn trim(&self, offset: u64, len: u64) -> Result<(), ExportError> {
        self.vm.unmap(self.disk, offset, len).map_err(export_error)
    }

    fn write_zeroes(&self, offset: u64, len: u64, _may_trim: bool) -> Result<(), ExportError> {
        // A guest unmap reads as zeroes afterwards and counts as changed.
        self.vm.unmap(self.disk, offset, len).map_err(export_error)
    }

    fn meta_contexts(&self) -> Vec<String> {
        vec![BASE_ALLOCATION.to_owned()]
    }

    fn block_status(
        &self,
        context: &str,
        _offset: u64,
        length: u64,
        extents: &mut Vec<Extent>,
    ) -> Result<(), ExportError> {
        if context != BASE_ALLOCATION {
            return Err(ExportError::Invalid(format!("no metadata context {context:?}")));
        }
        // No allocation query for the live disk: all data.
        extents.push(Extent { length, flags: 0 });
        Ok(())
    }
}

/// A snapshot's view of a disk: read-only.
#[derive(Debug)]
struct SnapshotExport {
    service: Arc<Service>,
    vm: Arc<Vm>,
    disk: usize,
    snap: String,
    size: u64,
    granularity: u64,
    live: Arc<Liveness>,
}

impl SnapshotExport {
    fn gone(&self) -> ExportError {
        ExportError::Io(format!("snapshot {} of VM {} was removed", self.snap, self.vm.name()))
    }

    /// The change ID in a `qemu:dirty-bitmap:` context name, if it parses.
    fn change_id(context: &str) -> Option<&str> {
        let cid = context.strip_prefix(QEMU_DIRTY_BITMAP)?;
        cid.parse::<tracker::ChangeId>().ok().map(|_| cid)
    }

    /// Appends the status of `[offset, offset + length)`: the areas the
    /// query since `since` answers get `inside`, the rest `outside`.
    fn areas(
        &self,
        since: &str,
        offset: u64,
        length: u64,
        inside: u32,
        outside: u32,
        extents: &mut Vec<Extent>,
    ) -> Result<(), VadpError> {
        let end = offset + length;
        let mut pos = offset;
        let pager =
            vadp::changed_areas(self.service.host(), self.vm.name(), &self.snap, self.disk, since).starting_at(offset);
        for area in pager {
            let area = area?;
            if area.start >= end {
                break;
            }
            if area.start > pos {
                extents.push(Extent {
                    length: area.start - pos,
                    flags: outside,
                });
            }
            let stop = area.end().min(end);
            extents.push(Extent {
                length: stop - area.start.max(pos),
                flags: inside,
            });
            pos = stop;
            if pos >= end || extents.len() >= MAX_STATUS_EXTENTS {
                return Ok(());
            }
        }
        if pos < end {
            extents.push(Extent {
                length: end - pos,
                flags: outside,
            });
        }
        Ok(())
    }
}

fn status_error(e: VadpError) -> ExportError {
    use vadp::ErrorKind as K;
    match e.kind() {
        K::NotFound | K::Host | K::BadPage => ExportError::Io(crate::action::chain(&e)),
        _ => ExportError::Invalid(e.to_string()),
    }
}

impl Export for SnapshotExport {
    fn size(&self) -> u64 {
        self.size
    }

    fn is_read_only(&self) -> bool {
        true
    }

    fn block_size(&self) -> BlockSize {
        block_size(self.granularity)
    }

    fn description(&self) -> String {
        format!(
            "VM {} disk {} at snapshot {}, read-only",
            self.vm.name(),
            self.disk,
            self.snap
        )
    }

    fn can_multi_conn(&self) -> bool {
        true
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), ExportError> {
        self.live
            .read(|| self.vm.read_snapshot(&self.snap, self.disk, offset, buf))
            .ok_or_else(|| self.gone())?
            .map_err(|e| match e {
                SimError::NoSuchSnapshot { .. } => self.gone(),
                e => export_error(e),
            })
    }

    fn write(&self, _offset: u64, _data: &[u8]) -> Result<(), ExportError> {
        Err(ExportError::ReadOnly)
    }

    fn flush(&self) -> Result<(), ExportError> {
        Ok(())
    }

    fn meta_contexts(&self) -> Vec<String> {
        let mut out = vec![BASE_ALLOCATION.to_owned()];
        // The change IDs of this snapshot and the older ones.
        for s in self.vm.snapshots() {
            if let Some(cid) = s.disks.get(self.disk).and_then(|d| d.change_id.clone()) {
                out.push(format!("{QEMU_DIRTY_BITMAP}{cid}"));
            }
            if s.name == self.snap {
                break;
            }
        }
        out
    }

    fn has_meta_context(&self, name: &str) -> bool {
        if name == BASE_ALLOCATION {
            return true;
        }
        let Some(cid) = Self::change_id(name) else {
            return false;
        };
        // Accepted when the query accepts it: one page from the start.
        self.live
            .read(|| self.vm.query_changed_disk_areas(&self.snap, self.disk, 0, cid).is_ok())
            .unwrap_or(false)
    }

    fn block_status(
        &self,
        context: &str,
        offset: u64,
        length: u64,
        extents: &mut Vec<Extent>,
    ) -> Result<(), ExportError> {
        let answer = if context == BASE_ALLOCATION {
            self.live.read(|| {
                match self.areas("*", offset, length, 0, STATE_HOLE | STATE_ZERO, extents) {
                    // No allocation answer without tracking: all data.
                    Err(VadpError::TrackingDisabled) => {
                        extents.clear();
                        extents.push(Extent { length, flags: 0 });
                        Ok(())
                    }
                    r => r,
                }
            })
        } else if let Some(cid) = Self::change_id(context) {
            self.live
                .read(|| self.areas(cid, offset, length, STATE_DIRTY, 0, extents))
        } else {
            return Err(ExportError::Invalid(format!("no metadata context {context:?}")));
        };
        match answer {
            None => Err(self.gone()),
            Some(Ok(())) => Ok(()),
            Some(Err(e)) => {
                extents.clear();
                Err(status_error(e))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ExportName;

    #[test]
    fn export_names() {
        let n = ExportName::parse("web01/0").unwrap();
        assert_eq!((n.vm.as_str(), n.disk, n.snapshot), ("web01", 0, None));
        let n = ExportName::parse("web01/12@s-1.a").unwrap();
        assert_eq!((n.disk, n.snapshot.as_deref()), (12, Some("s-1.a")));
        assert_eq!(n.to_string(), "web01/12@s-1.a");
        for bad in [
            "",
            "web01",
            "web01/",
            "/0",
            "web01/x",
            "web01/-1",
            "web01/0@",
            "web01/0@a/b",
            "a b/0",
            ".x/0",
            "web01/0@.s",
            "web01/99999999999999999999",
        ] {
            assert_eq!(ExportName::parse(bad), None, "{bad:?}");
        }
    }
}
