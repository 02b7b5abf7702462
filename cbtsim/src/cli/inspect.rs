//! What `vm show`, `disk list`, `snapshot list` and `snapshot show` print: a VM's state
//! gathered in one struct, printed as a table or as JSON. Times are ISO 8601 (UTC).

use backup::format_utc;
use serde::Serialize;
use sim::VmView;
use workloads::human;

use super::exact;

/// One disk of a VM as `vm show` and `disk list` print it.
#[derive(Debug, Serialize)]
pub struct DiskInfo {
    /// Index.
    pub disk: usize,
    /// Live capacity in bytes.
    pub capacity: u64,
    /// Tracking granularity in bytes.
    pub granularity: u64,
    /// The change ID of the newest closed epoch (the newest snapshot's) if tracking is
    /// on and it belongs to the current session.
    pub change_id: Option<String>,
    /// Layers of the disk's chain: the base and one delta per snapshot, plus one where
    /// a consolidation could not finish.
    pub layers: usize,
    /// Bytes the layers hold in the datastore.
    pub allocated_bytes: u64,
}

/// One snapshot.
#[derive(Debug, Serialize)]
pub struct SnapshotInfo {
    /// Its name.
    pub name: String,
    /// Seconds since the Unix epoch.
    pub created: u64,
    /// The same, ISO 8601 in UTC.
    pub created_utc: String,
    /// Per disk: capacity, granularity and change ID at the snapshot.
    pub disks: Vec<vadp::SnapshotDisk>,
}

/// A VM as `vm show` prints it.
#[derive(Debug, Serialize)]
pub struct VmInfo {
    /// Its name.
    pub name: String,
    /// Power state.
    pub powered_on: bool,
    /// Change tracking on.
    pub cbt: bool,
    /// Its disks.
    pub disks: Vec<DiskInfo>,
    /// Its snapshots, oldest first.
    pub snapshots: Vec<SnapshotInfo>,
    /// Whether a disk has more layers than its snapshots explain: a removal merged
    /// while the guest wrote faster, and kept a helper delta as the live top (correct,
    /// one more layer to read through); the next snapshot removal merges it.
    pub consolidation_needed: bool,
}

/// The snapshots of `vm`, with ISO 8601 times.
pub fn snapshots(vm: &VmView) -> Vec<SnapshotInfo> {
    vm.snapshots()
        .into_iter()
        .map(|s| SnapshotInfo {
            created_utc: format_utc(s.created),
            name: s.name,
            created: s.created,
            disks: s.disks,
        })
        .collect()
}

/// Everything `vm show` prints about `vm`.
pub fn vm_info(vm: &VmView) -> anyhow::Result<VmInfo> {
    let snapshots = snapshots(vm);
    let cfg = vm.config();
    let mut disks = Vec::new();
    for (d, dc) in cfg.disks.iter().enumerate() {
        disks.push(DiskInfo {
            disk: d,
            capacity: dc.capacity,
            granularity: vm.granularity(d)?,
            change_id: vm.current_change_id(d)?,
            layers: vm.chain_len(d)?,
            allocated_bytes: vm.allocated_bytes(d)?,
        });
    }
    let consolidation_needed = disks.iter().any(|d| d.layers > snapshots.len() + 1);
    Ok(VmInfo {
        name: vm.name().to_owned(),
        powered_on: cfg.powered_on,
        cbt: cfg.cbt,
        disks,
        snapshots,
        consolidation_needed,
    })
}

fn on_off(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}

/// `disk list`, as a table.
pub fn print_disks(disks: &[DiskInfo]) {
    println!(
        "{:<5} {:>18} {:>12} {:>7} {:>11}  CURRENT CHANGE ID",
        "DISK", "CAPACITY", "GRANULARITY", "LAYERS", "ALLOCATED"
    );
    for d in disks {
        println!(
            "{:<5} {:>18} {:>12} {:>7} {:>11}  {}",
            d.disk,
            exact(d.capacity),
            exact(d.granularity),
            d.layers,
            human(d.allocated_bytes),
            d.change_id.as_deref().unwrap_or("-")
        );
    }
}

/// One snapshot, its disks indented.
pub fn print_snapshot(s: &SnapshotInfo) {
    println!("{} (created {})", s.name, s.created_utc);
    for d in &s.disks {
        let cid = d.change_id.as_deref().unwrap_or("none");
        println!("  disk {}: {}  change ID {cid}", d.disk, exact(d.capacity));
    }
}

/// `vm show`.
pub fn print_vm(v: &VmInfo) {
    println!("VM {}: power {}, CBT {}", v.name, on_off(v.powered_on), on_off(v.cbt));
    print_disks(&v.disks);
    if v.snapshots.is_empty() {
        println!("no snapshots");
    }
    for s in &v.snapshots {
        print_snapshot(s);
    }
    if v.consolidation_needed {
        println!("consolidation needed: a disk keeps a helper delta; the next snapshot removal merges it");
    } else {
        println!("consolidation: none pending");
    }
}
