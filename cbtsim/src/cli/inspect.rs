//! How `vm show`, `disk list`, `snapshot list` and `snapshot show` print the service's
//! answers ([`VmDetails`], [`SnapshotEntry`]) as tables. Times are ISO 8601 (UTC).

use service::action::SnapshotEntry;
use service::{DiskDetails, VmDetails};
use workloads::human;

use super::exact;

fn on_off(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}

/// `disk list`, as a table.
pub fn print_disks(disks: &[DiskDetails]) {
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
pub fn print_snapshot(s: &SnapshotEntry) {
    println!("{} (created {})", s.name, s.created_utc);
    for d in &s.disks {
        let cid = d.change_id.as_deref().unwrap_or("none");
        println!("  disk {}: {}  change ID {cid}", d.disk, exact(d.capacity));
    }
}

/// `vm show`.
pub fn print_vm(v: &VmDetails) {
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
