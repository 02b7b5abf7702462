//! The registry of managed objects: hostd-style IDs for the host's VMs
//! (`1`, `2`, ...), snapshots (`1-snapshot-2`) and tasks, the fixed objects
//! of a host agent (`ServiceInstance`, `ha-folder-root`, ...), and the data
//! objects each one's properties are made of, built from what
//! [`Service::execute`](crate::Service::execute) answers.
//!
//! IDs live as long as the service: a VM keeps its number for the life of
//! the process, a snapshot is known by its VM, name and creation time (so a
//! snapshot removed and made again under the same name gets a new ID).

use std::collections::{BTreeMap, HashMap};

use crate::action::{SnapshotEntry, VmInfo};

use super::change_id;
use super::value::{MoRef, Obj, Val};

/// The datastore's name in file paths (`[datastore1] web01/web01.vmdk`).
pub const DATASTORE: &str = "datastore1";
/// The key of the first disk (ESXi numbers disks from 2000).
pub const FIRST_DISK_KEY: i32 = 2000;
/// The key of the SCSI controller the disks hang on.
const CONTROLLER_KEY: i32 = 1000;
/// Tasks remembered; older ones are forgotten (ManagedObjectNotFound).
const MAX_TASKS: usize = 1000;

/// What a managed object reference names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entity {
    /// `ServiceInstance`.
    ServiceInstance,
    /// `ha-folder-root`.
    RootFolder,
    /// `ha-datacenter`.
    Datacenter,
    /// `ha-folder-vm`.
    VmFolder,
    /// `ha-property-collector`.
    PropertyCollector,
    /// `ViewManager`.
    ViewManager,
    /// `ha-sessionmgr`.
    SessionManager,
    /// A container view of a session.
    ContainerView(String),
    /// A property filter of a session.
    PropertyFilter(String),
    /// A VM, by name.
    Vm(String),
    /// A snapshot: the VM, the snapshot's name and its creation time.
    Snapshot(SnapKey),
    /// A task, by ID.
    Task(String),
}

/// How a snapshot is known.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SnapKey {
    /// The VM.
    pub vm: String,
    /// The host's name of the snapshot.
    pub name: String,
    /// Seconds since the Unix epoch.
    pub created: u64,
}

/// What the API knows of a snapshot beyond the host's record.
#[derive(Debug, Clone)]
struct SnapMeta {
    id: String,
    number: i32,
    /// The name the client gave (the host's name may differ: it allows
    /// fewer characters and no duplicates).
    display: Option<String>,
    description: String,
    quiesced: bool,
    powered_on: bool,
}

/// A finished task.
#[derive(Debug, Clone)]
pub struct TaskRecord {
    /// `TaskInfo`.
    pub info: Obj,
}

/// The IDs handed out, and the tasks.
#[derive(Debug, Default)]
pub struct Registry {
    vm_ids: HashMap<String, u32>,
    vm_names: HashMap<u32, String>,
    next_vm: u32,
    snaps: HashMap<SnapKey, SnapMeta>,
    snap_ids: HashMap<String, SnapKey>,
    next_snap: HashMap<String, i32>,
    tasks: BTreeMap<u64, (String, TaskRecord)>,
    task_ids: HashMap<String, u64>,
    next_task: u64,
}

impl Registry {
    /// The ID of VM `name`, handed out on first sight.
    pub fn vm_id(&mut self, name: &str) -> String {
        if let Some(id) = self.vm_ids.get(name) {
            return id.to_string();
        }
        self.next_vm += 1;
        let id = self.next_vm;
        self.vm_ids.insert(name.to_owned(), id);
        self.vm_names.insert(id, name.to_owned());
        id.to_string()
    }

    /// A reference to VM `name`.
    pub fn vm_ref(&mut self, name: &str) -> MoRef {
        MoRef::new("VirtualMachine", self.vm_id(name))
    }

    /// The ID of a snapshot, handed out on first sight.
    pub fn snap_id(&mut self, key: &SnapKey) -> String {
        self.meta(key).id.clone()
    }

    fn meta(&mut self, key: &SnapKey) -> &mut SnapMeta {
        if !self.snaps.contains_key(key) {
            let vm_id = self.vm_id(&key.vm);
            let n = self.next_snap.entry(key.vm.clone()).or_insert(0);
            *n += 1;
            let id = format!("{vm_id}-snapshot-{n}");
            self.snap_ids.insert(id.clone(), key.clone());
            self.snaps.insert(
                key.clone(),
                SnapMeta {
                    id,
                    number: *n,
                    display: None,
                    description: String::new(),
                    quiesced: false,
                    powered_on: false,
                },
            );
        }
        self.snaps.get_mut(key).expect("inserted above")
    }

    /// Records what a client said when it created snapshot `key`.
    pub fn snapshot_created(&mut self, key: &SnapKey, display: &str, description: &str, quiesced: bool, on: bool) {
        let m = self.meta(key);
        m.display = Some(display.to_owned());
        m.description = description.to_owned();
        m.quiesced = quiesced;
        m.powered_on = on;
    }

    /// A reference to a snapshot.
    pub fn snap_ref(&mut self, key: &SnapKey) -> MoRef {
        MoRef::new("VirtualMachineSnapshot", self.snap_id(key))
    }

    /// Stores a task; returns its reference.
    pub fn add_task(&mut self, id: String, info: Obj) -> MoRef {
        self.next_task += 1;
        self.tasks.insert(self.next_task, (id.clone(), TaskRecord { info }));
        self.task_ids.insert(id.clone(), self.next_task);
        while self.tasks.len() > MAX_TASKS {
            if let Some((_, (old, _))) = self.tasks.pop_first() {
                self.task_ids.remove(&old);
            }
        }
        MoRef::new("Task", id)
    }

    /// The next task number.
    pub fn task_number(&self) -> u64 {
        self.next_task + 1
    }

    /// A stored task.
    pub fn task(&self, id: &str) -> Option<&TaskRecord> {
        self.task_ids.get(id).and_then(|n| self.tasks.get(n)).map(|(_, t)| t)
    }

    /// What `r` names, for the objects this registry numbers (VMs,
    /// snapshots, tasks) and the fixed ones; session objects are the
    /// session's to resolve. Whether a VM or snapshot still exists is for
    /// the caller to check against the host.
    pub fn resolve(&self, r: &MoRef) -> Option<Entity> {
        let e = match (r.ty.as_str(), r.id.as_str()) {
            ("ServiceInstance", "ServiceInstance") => Entity::ServiceInstance,
            ("Folder", "ha-folder-root") => Entity::RootFolder,
            ("Datacenter", "ha-datacenter") => Entity::Datacenter,
            ("Folder", "ha-folder-vm") => Entity::VmFolder,
            ("PropertyCollector", "ha-property-collector") => Entity::PropertyCollector,
            ("ViewManager", "ViewManager") => Entity::ViewManager,
            ("SessionManager", "ha-sessionmgr") => Entity::SessionManager,
            ("VirtualMachine", id) => Entity::Vm(self.vm_names.get(&id.parse().ok()?)?.clone()),
            ("VirtualMachineSnapshot", id) => Entity::Snapshot(self.snap_ids.get(id)?.clone()),
            ("Task", id) if self.task_ids.contains_key(id) => Entity::Task(id.to_owned()),
            _ => return None,
        };
        Some(e)
    }

    /// The name a client sees for a snapshot (the one it gave, if known).
    pub fn display_name(&mut self, key: &SnapKey) -> String {
        self.meta(key).display.clone().unwrap_or_else(|| key.name.clone())
    }

    /// `VirtualMachineSnapshotInfo` of a VM with `snaps` (oldest first; a
    /// chain: each one the child of the one before), or none.
    pub fn snapshot_info(&mut self, vm: &str, snaps: &[SnapshotEntry]) -> Option<Obj> {
        let last = snaps.last()?;
        let current = self.snap_ref(&key_of(vm, last));
        let vm_ref = self.vm_ref(vm);
        let mut tree: Option<Obj> = None;
        for s in snaps.iter().rev() {
            let key = key_of(vm, s);
            let r = self.snap_ref(&key);
            let m = self.meta(&key).clone();
            let node = Obj::new("VirtualMachineSnapshotTree")
                .with("snapshot", r)
                .with("vm", vm_ref.clone())
                .with("name", Val::str(m.display.unwrap_or_else(|| s.name.clone())))
                .with("description", Val::str(m.description))
                .with("id", Val::Int(m.number))
                .with("createTime", Val::Time(s.created))
                .with("state", power_state(m.powered_on))
                .with("quiesced", Val::Bool(m.quiesced))
                .with(
                    "childSnapshotList",
                    Val::Array(
                        "VirtualMachineSnapshotTree",
                        tree.take().map(Val::Obj).into_iter().collect(),
                    ),
                );
            tree = Some(node);
        }
        Some(
            Obj::new("VirtualMachineSnapshotInfo")
                .with("currentSnapshot", current)
                .with(
                    "rootSnapshotList",
                    Val::Array("VirtualMachineSnapshotTree", tree.map(Val::Obj).into_iter().collect()),
                ),
        )
    }
}

/// The key of snapshot `s` of `vm`.
pub fn key_of(vm: &str, s: &SnapshotEntry) -> SnapKey {
    SnapKey {
        vm: vm.to_owned(),
        name: s.name.clone(),
        created: s.created,
    }
}

/// `poweredOn` or `poweredOff`.
pub fn power_state(on: bool) -> Val {
    Val::Enum("VirtualMachinePowerState", if on { "poweredOn" } else { "poweredOff" })
}

/// The datastore path of disk `disk` of `vm`.
pub fn disk_file(vm: &str, disk: usize) -> String {
    if disk == 0 {
        format!("[{DATASTORE}] {vm}/{vm}.vmdk")
    } else {
        format!("[{DATASTORE}] {vm}/{vm}_{disk}.vmdk")
    }
}

/// The disk index of device key `key` on a VM with `disks` disks.
pub fn disk_index(key: i32, disks: usize) -> Option<usize> {
    let i = usize::try_from(key.checked_sub(FIRST_DISK_KEY)?).ok()?;
    (i < disks).then_some(i)
}

/// A stable UUID for a name (FNV-1a, twice), in the 8-4-4-4-12 shape.
pub fn name_uuid(salt: &str, name: &str) -> String {
    let fnv = |seed: u64| {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed;
        for b in salt.bytes().chain([0]).chain(name.bytes()) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h
    };
    let (a, b) = (fnv(1), fnv(2));
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xffff,
        b >> 48,
        b & 0xffff_ffff_ffff
    )
}

/// One disk as a VM's configuration shows it.
#[derive(Debug, Clone)]
pub struct DiskView {
    /// Capacity in bytes.
    pub capacity: u64,
    /// The change ID, in VMware's shape (absent with tracking off).
    pub change_id: Option<String>,
}

/// `VirtualMachineConfigInfo` of `vm` with `disks` and tracking `cbt`
/// (of the VM now, or of a snapshot).
pub fn config_info(vm: &str, disks: &[DiskView], cbt: bool) -> Obj {
    let mut devices = vec![Val::Obj(
        Obj::new("ParaVirtualSCSIController")
            .with("key", Val::Int(CONTROLLER_KEY))
            .with(
                "deviceInfo",
                Obj::new("Description")
                    .with("label", Val::str("SCSI controller 0"))
                    .with("summary", Val::str("VMware paravirtual SCSI")),
            )
            .with("controllerKey", Val::Int(100))
            .with("unitNumber", Val::Int(3))
            .with("busNumber", Val::Int(0))
            .with(
                "device",
                Val::Array(
                    "int",
                    (0..disks.len()).map(|i| Val::Int(FIRST_DISK_KEY + i as i32)).collect(),
                ),
            )
            .with("hotAddRemove", Val::Bool(true))
            .with("sharedBus", Val::Enum("VirtualSCSISharing", "noSharing"))
            .with("scsiCtlrUnitNumber", Val::Int(7)),
    )];
    for (i, d) in disks.iter().enumerate() {
        let backing = Obj::new("VirtualDiskFlatVer2BackingInfo")
            .with("fileName", Val::str(disk_file(vm, i)))
            .with("diskMode", Val::str("persistent"))
            .with("split", Val::Bool(false))
            .with("writeThrough", Val::Bool(false))
            .with("thinProvisioned", Val::Bool(true))
            .with("uuid", Val::str(name_uuid("disk", &format!("{vm}/{i}"))))
            .opt("changeId", d.change_id.clone().map(Val::Str))
            .with("digestEnabled", Val::Bool(false))
            .with("sharing", Val::str("sharingNone"));
        let capacity = i64::try_from(d.capacity).unwrap_or(i64::MAX);
        devices.push(Val::Obj(
            Obj::new("VirtualDisk")
                .with("key", Val::Int(FIRST_DISK_KEY + i as i32))
                .with(
                    "deviceInfo",
                    Obj::new("Description")
                        .with("label", Val::str(format!("Hard disk {}", i + 1)))
                        .with("summary", Val::str(format!("{} KB", d.capacity / 1024))),
                )
                .with("backing", backing)
                .with("controllerKey", Val::Int(CONTROLLER_KEY))
                .with("unitNumber", Val::Int(i as i32 + i32::from(i >= 7)))
                .with("capacityInKB", Val::Long(capacity / 1024))
                .with("capacityInBytes", Val::Long(capacity)),
        ));
    }
    Obj::new("VirtualMachineConfigInfo")
        .with("changeVersion", Val::str("1"))
        .with("modified", Val::Time(0))
        .with("name", Val::str(vm))
        .with("guestFullName", Val::str("Other Linux (64-bit)"))
        .with("version", Val::str("vmx-21"))
        .with("uuid", Val::str(name_uuid("bios", vm)))
        .with("instanceUuid", Val::str(name_uuid("instance", vm)))
        .with("template", Val::Bool(false))
        .with("guestId", Val::str("otherLinux64Guest"))
        .with("annotation", Val::str("a cbtsim VM"))
        .with(
            "files",
            Obj::new("VirtualMachineFileInfo")
                .with("vmPathName", Val::str(format!("[{DATASTORE}] {vm}/{vm}.vmx")))
                .with("snapshotDirectory", Val::str(format!("[{DATASTORE}] {vm}/")))
                .with("suspendDirectory", Val::str(format!("[{DATASTORE}] {vm}/")))
                .with("logDirectory", Val::str(format!("[{DATASTORE}] {vm}/"))),
        )
        .with(
            "hardware",
            Obj::new("VirtualHardware")
                .with("numCPU", Val::Int(1))
                .with("numCoresPerSocket", Val::Int(1))
                .with("memoryMB", Val::Int(1024))
                .with("virtualICH7MPresent", Val::Bool(false))
                .with("virtualSMCPresent", Val::Bool(false))
                .with("device", Val::Array("VirtualDevice", devices)),
        )
        .with("changeTrackingEnabled", Val::Bool(cbt))
}

/// The disks of a VM now, with their current change IDs (the host's form).
pub fn live_disks(v: &VmInfo, change_ids: &[Option<String>]) -> Vec<DiskView> {
    v.disks
        .iter()
        .enumerate()
        .map(|(i, &capacity)| DiskView {
            capacity,
            change_id: change_ids
                .get(i)
                .cloned()
                .flatten()
                .as_deref()
                .map(change_id::to_vmware),
        })
        .collect()
}

/// The disks of a snapshot, with their change IDs in VMware's shape.
pub fn snapshot_disks(s: &SnapshotEntry) -> Vec<DiskView> {
    s.disks
        .iter()
        .map(|d| DiskView {
            capacity: d.capacity,
            change_id: d.change_id.as_deref().map(change_id::to_vmware),
        })
        .collect()
}

/// `VirtualMachineRuntimeInfo`.
pub fn runtime_info(v: &VmInfo) -> Obj {
    Obj::new("VirtualMachineRuntimeInfo")
        .with(
            "connectionState",
            Val::Enum("VirtualMachineConnectionState", "connected"),
        )
        .with("powerState", power_state(v.powered_on))
        .with(
            "faultToleranceState",
            Val::Enum("VirtualMachineFaultToleranceState", "notConfigured"),
        )
        .with("toolsInstallerMounted", Val::Bool(false))
        .with("consolidationNeeded", Val::Bool(false))
}

/// `VirtualMachineSummary`.
pub fn summary(r: &MoRef, v: &VmInfo) -> Obj {
    Obj::new("VirtualMachineSummary")
        .with("vm", r.clone())
        .with("runtime", runtime_info(v))
        .with(
            "config",
            Obj::new("VirtualMachineConfigSummary")
                .with("name", Val::str(v.name.clone()))
                .with("template", Val::Bool(false))
                .with("vmPathName", Val::str(format!("[{DATASTORE}] {0}/{0}.vmx", v.name)))
                .with("memorySizeMB", Val::Int(1024))
                .with("numCpu", Val::Int(1))
                .with("numEthernetCards", Val::Int(0))
                .with("numVirtualDisks", Val::Int(v.disks.len() as i32))
                .with("uuid", Val::str(name_uuid("bios", &v.name)))
                .with("instanceUuid", Val::str(name_uuid("instance", &v.name)))
                .with("guestId", Val::str("otherLinux64Guest"))
                .with("guestFullName", Val::str("Other Linux (64-bit)")),
        )
        .with("overallStatus", Val::Enum("ManagedEntityStatus", "green"))
}

/// `VirtualMachineCapability`: what a backup client checks.
pub fn capability() -> Obj {
    Obj::new("VirtualMachineCapability")
        .with("snapshotOperationsSupported", Val::Bool(true))
        .with("multipleSnapshotsSupported", Val::Bool(true))
        .with("snapshotConfigSupported", Val::Bool(true))
        .with("poweredOffSnapshotsSupported", Val::Bool(true))
        .with("memorySnapshotsSupported", Val::Bool(false))
        .with("revertToSnapshotSupported", Val::Bool(true))
        .with("quiescedSnapshotsSupported", Val::Bool(true))
        .with("disableSnapshotsSupported", Val::Bool(false))
        .with("lockSnapshotsSupported", Val::Bool(false))
        .with("consolePreferencesSupported", Val::Bool(false))
        .with("cpuFeatureMaskSupported", Val::Bool(false))
        .with("s1AcpiManagementSupported", Val::Bool(false))
        .with("settingScreenResolutionSupported", Val::Bool(false))
        .with("toolsAutoUpdateSupported", Val::Bool(false))
        .with("vmNpivWwnSupported", Val::Bool(false))
        .with("npivWwnOnNonRdmVmSupported", Val::Bool(false))
        .with("swapPlacementSupported", Val::Bool(false))
        .with("toolsSyncTimeSupported", Val::Bool(false))
        .with("virtualMmuUsageSupported", Val::Bool(false))
        .with("diskSharesSupported", Val::Bool(false))
        .with("bootOptionsSupported", Val::Bool(false))
        .with("settingVideoRamSizeSupported", Val::Bool(false))
        .with("changeTrackingSupported", Val::Bool(true))
}

/// `ServiceContent`.
pub fn service_content() -> Obj {
    Obj::new("ServiceContent")
        .with("rootFolder", MoRef::new("Folder", "ha-folder-root"))
        .with(
            "propertyCollector",
            MoRef::new("PropertyCollector", "ha-property-collector"),
        )
        .with("viewManager", MoRef::new("ViewManager", "ViewManager"))
        .with(
            "about",
            Obj::new("AboutInfo")
                .with("name", Val::str("cbtsim"))
                .with(
                    "fullName",
                    Val::str(format!(
                        "cbtsim {} (the vSphere API of changed block tracking)",
                        env!("CARGO_PKG_VERSION")
                    )),
                )
                .with("vendor", Val::str("cbtsim"))
                .with("version", Val::str("8.0.3"))
                .with("build", Val::str("0"))
                .with("localeVersion", Val::str("INTL"))
                .with("localeBuild", Val::str("000"))
                .with("osType", Val::str("vmnix-x86"))
                .with("productLineId", Val::str("embeddedEsx"))
                .with("apiType", Val::str("HostAgent"))
                .with("apiVersion", Val::str("8.0.3.0"))
                .with("instanceUuid", Val::str(name_uuid("host", "cbtsim"))),
        )
        .with("sessionManager", MoRef::new("SessionManager", "ha-sessionmgr"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_hostd_style_and_stable() {
        let mut r = Registry::default();
        assert_eq!(r.vm_id("b"), "1");
        assert_eq!(r.vm_id("a"), "2");
        assert_eq!(r.vm_id("b"), "1");
        let k = SnapKey {
            vm: "a".into(),
            name: "s".into(),
            created: 5,
        };
        assert_eq!(r.snap_id(&k), "2-snapshot-1");
        let k2 = SnapKey {
            created: 6,
            ..k.clone()
        };
        assert_eq!(r.snap_id(&k2), "2-snapshot-2");
        assert_eq!(
            r.resolve(&MoRef::new("VirtualMachineSnapshot", "2-snapshot-1")),
            Some(Entity::Snapshot(k))
        );
        assert_eq!(
            r.resolve(&MoRef::new("VirtualMachine", "2")),
            Some(Entity::Vm("a".into()))
        );
        assert_eq!(r.resolve(&MoRef::new("VirtualMachine", "9")), None);
        assert_eq!(r.resolve(&MoRef::new("VirtualMachine", "-1")), None);
        assert_eq!(disk_index(2001, 2), Some(1));
        assert_eq!(disk_index(2002, 2), None);
        assert_eq!(disk_index(1999, 2), None);
        assert_eq!(disk_index(i32::MIN, 2), None);
        assert_eq!(name_uuid("x", "a"), name_uuid("x", "a"));
        assert_ne!(name_uuid("x", "a"), name_uuid("x", "b"));
    }
}
