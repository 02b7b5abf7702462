//! The host: a datastore directory of VMs, and the data-protection API.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::config::VmConfig;
use crate::error::SimError;
use crate::view::VmView;
use crate::vm::{check_name, DiskSpec, Vm};

/// A simulated ESXi-style host over a datastore directory.
///
/// ```text
/// DATASTORE/
///   VM/vm.json            configuration (atomic rewrite per operation)
///   VM/vm.lock            held while a process has the VM open
///   VM/disk0/disk.ctk     change tracking (+ disk.ctk.epochs at clean close)
///   VM/disk0/L0.0000.ext  base layer, 16 GiB sparse extents
///   VM/disk0/L3.map       a delta's grain map; L3.*.ext its data
/// ```
#[derive(Debug)]
pub struct Host {
    root: PathBuf,
    vms: Mutex<HashMap<String, Arc<Vm>>>,
}

/// One line of `vm list`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct VmSummary {
    /// The VM's name.
    pub name: String,
    /// Power state.
    pub powered_on: bool,
    /// Change tracking on.
    pub cbt: bool,
    /// Disk capacities in bytes.
    pub disks: Vec<u64>,
    /// Snapshot names, oldest first.
    pub snapshots: Vec<String>,
}

impl Host {
    /// Opens (creating if needed) the datastore at `root`.
    pub fn open(root: &Path) -> Result<Self, SimError> {
        std::fs::create_dir_all(root).map_err(|source| SimError::Io {
            path: root.to_owned(),
            source,
        })?;
        Ok(Self {
            root: root.to_owned(),
            vms: Mutex::new(HashMap::new()),
        })
    }

    /// The datastore directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Creates a VM with the given disks (CBT on, powered on).
    pub fn create_vm(&self, name: &str, disks: &[DiskSpec]) -> Result<Arc<Vm>, SimError> {
        check_name(name)?;
        let mut vms = self.vms.lock();
        let vm = Arc::new(Vm::create(&self.root.join(name), name, disks)?);
        vms.insert(name.to_owned(), vm.clone());
        Ok(vm)
    }

    /// The VM named `name`, opened on first use (taking its lock).
    pub fn vm(&self, name: &str) -> Result<Arc<Vm>, SimError> {
        check_name(name).map_err(|_| SimError::NoSuchVm(name.to_owned()))?;
        let mut vms = self.vms.lock();
        if let Some(vm) = vms.get(name) {
            return Ok(vm.clone());
        }
        let dir = self.root.join(name);
        if !dir.join("vm.json").exists() {
            return Err(SimError::NoSuchVm(name.to_owned()));
        }
        let vm = Arc::new(Vm::open(&dir)?);
        vms.insert(name.to_owned(), vm.clone());
        Ok(vm)
    }

    /// VM `name` opened read-only ([`VmView`]): for listings and queries, which then
    /// write nothing and do not exclude each other.
    pub fn view(&self, name: &str) -> Result<VmView, SimError> {
        check_name(name).map_err(|_| SimError::NoSuchVm(name.to_owned()))?;
        let dir = self.root.join(name);
        if !dir.join("vm.json").exists() {
            return Err(SimError::NoSuchVm(name.to_owned()));
        }
        if VmConfig::load(&dir.join("vm.json"))?.pending_revert.is_some() && !self.vms.lock().contains_key(name) {
            // A killed process left a revert whose marks a read-only view
            // cannot make: recover once with a writable open, then read.
            drop(Vm::open(&dir)?);
        }
        VmView::open(&dir)
    }

    /// Closes the VM's handle in this process (it is reopened on next use).
    /// Returns the VM if other handles still hold it.
    pub fn close_vm(&self, name: &str) -> Option<Arc<Vm>> {
        self.vms.lock().remove(name)
    }

    /// Deletes VM `name` and all its files. It must exist and no other process or
    /// handle may have it open ([`SimError::VmInUse`]). The directory is renamed away
    /// first (under the VM's lock), so a deletion killed half-way leaves no VM that
    /// looks whole: only a `.deleting-*` directory, which the next deletion removes.
    pub fn delete_vm(&self, name: &str) -> Result<(), SimError> {
        let vm = self.vm(name)?; // exists, and not open in another process
        let mut vms = self.vms.lock();
        vms.remove(name);
        // This handle and `vm`: anything more is a caller still using it.
        if Arc::strong_count(&vm) > 1 {
            vms.insert(name.to_owned(), vm);
            return Err(SimError::VmInUse(name.to_owned()));
        }
        drop(vms);
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| SimError::Io { path, source }
        };
        let dir = self.root.join(name);
        let trash = self.root.join(format!(".deleting-{name}"));
        if trash.exists() {
            std::fs::remove_dir_all(&trash).map_err(io(&trash))?;
        }
        // Renamed while this process still holds the VM's lock and files.
        std::fs::rename(&dir, &trash).map_err(io(&dir))?;
        drop(vm);
        std::fs::remove_dir_all(&trash).map_err(io(&trash))
    }

    /// Every VM of the datastore, read from their configurations (no locks taken).
    pub fn list(&self) -> Result<Vec<VmSummary>, SimError> {
        let mut out = Vec::new();
        let rd = std::fs::read_dir(&self.root).map_err(|source| SimError::Io {
            path: self.root.clone(),
            source,
        })?;
        for e in rd.flatten() {
            let p = e.path().join("vm.json");
            if p.exists() {
                let c = VmConfig::load(&p)?;
                out.push(VmSummary {
                    name: c.name,
                    powered_on: c.powered_on,
                    cbt: c.cbt,
                    disks: c.disks.iter().map(|d| d.capacity).collect(),
                    snapshots: c.snapshots.into_iter().map(|s| s.name).collect(),
                });
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }
}
