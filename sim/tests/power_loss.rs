//! A host back after a power loss or a reboot without a clean stop (another
//! boot id than the tracking files recorded): a VM with durable tracking
//! answers every change ID, over-reporting whole regions written in the open
//! epoch; a VM without resets tracking (`TrackingReset`) and `*` reads what
//! the layers hold. And the write path keeps the rule: a write's region
//! intent is durable before its data lands.
//!
//! The page cache is not really lost here (the tracker's own tests build the
//! states a power loss may leave, `tracker/tests/power_loss.rs`): these check
//! the host's side: its write path, its open and its views.

mod common;

use std::sync::Arc;

use common::*;
use sim::{Host, SimError, Vm};
use tracker::crash_states::set_boot_id;
use uuid::Uuid;

fn cid(info: &vadp::SnapshotInfo) -> String {
    info.disks[0].change_id.clone().expect("CBT is on")
}

/// Closes the VM's handle in this host and drops it as a crash would, then
/// makes this thread's host run in a new boot.
fn stop_and_reboot(host: &Host, vm: Arc<Vm>) {
    drop(host.close_vm(vm.name()));
    Arc::try_unwrap(vm).expect("no other handle").crash();
    set_boot_id(Some(Uuid::new_v4()));
}

/// Snapshots s1 and s2 with writes between them, and writes after s2 (the
/// open epoch): returns the images of s1 and s2 and their change IDs.
fn history(vm: &Vm) -> ([Vec<u8>; 2], [String; 2]) {
    vm.write(0, 0, &[1; 4096]).unwrap();
    let c1 = cid(&vm.create_snapshot("s1").unwrap());
    vm.write(0, 5 * MIB, &[2; 8192]).unwrap();
    let c2 = cid(&vm.create_snapshot("s2").unwrap());
    vm.write(0, 9 * MIB + 100, &[3; 300]).unwrap();
    vm.write(0, 40 * MIB, &[4; 65536]).unwrap();
    ([image(vm, "s1", 0), image(vm, "s2", 0)], [c1, c2])
}

fn missed(vm: &Vm, old: &[u8], at: &str, since: &str) -> u64 {
    missed_bytes(old, &image(vm, at, 0), &areas(vm, at, 0, since))
}

#[test]
fn a_durable_vm_answers_every_change_id_after_a_reboot() {
    let (_d, host) = host();
    let vm = host.create_vm("vm", &[spec(64 * MIB, 64 * KIB)]).unwrap();
    vm.set_durable_tracking(true).unwrap();
    let ([i1, i2], [c1, c2]) = history(&vm);
    stop_and_reboot(&host, vm);
    let vm = host.vm("vm").unwrap();
    // The disk is one 1 GiB intent region: the open epoch's intent covers it.
    assert_eq!(vm.tracker(0).unwrap().stats().recovered_regions, 1);
    assert!(vm.durable_tracking() && vm.tracker(0).unwrap().is_durable());
    vm.create_snapshot("s3").unwrap();
    assert_eq!(missed(&vm, &i1, "s2", &c1), 0);
    assert_eq!(missed(&vm, &i1, "s3", &c1), 0);
    assert_eq!(missed(&vm, &i2, "s3", &c2), 0);
    assert_eq!(
        areas(&vm, "s2", 0, &c1),
        vec![(5 * MIB, 64 * KIB)],
        "closed epochs stay exact"
    );
    assert_eq!(
        areas(&vm, "s3", 0, &c2),
        vec![(0, 64 * MIB)],
        "the open epoch's region is whole"
    );
    set_boot_id(None);
}

#[test]
fn a_default_vm_resets_tracking_after_a_reboot_and_star_reads_the_layers() {
    let (_d, host) = host();
    let vm = host.create_vm("vm", &[spec(64 * MIB, 64 * KIB)]).unwrap();
    let (_, [c1, _]) = history(&vm);
    stop_and_reboot(&host, vm);
    // A read-only view recovers through one writable open first.
    let view = host.view("vm").unwrap();
    drop(view);
    let vm = host.vm("vm").unwrap();
    vm.create_snapshot("s3").unwrap();
    match vm.query_changed_disk_areas("s3", 0, 0, &c1) {
        Err(SimError::Query(tracker::QueryError::TrackingReset { .. })) => {}
        r => panic!("expected TrackingReset, got {r:?}"),
    }
    let all = areas(&vm, "s3", 0, "*");
    assert_eq!(
        all.iter().map(|a| a.1).sum::<u64>(),
        4 * 64 * KIB,
        "what the layers hold: {all:?}"
    );
    set_boot_id(None);
}

#[test]
fn durable_writes_make_their_region_intent_durable_first() {
    let (_d, host) = host();
    let vm = host.create_vm("vm", &[spec(4 * GIB, 64 * KIB)]).unwrap();
    let t = || vm.tracker(0).unwrap();
    assert!(
        !vm.durable_tracking() && t().intents_durable(3 * GIB, 1),
        "not durable: always"
    );
    vm.set_durable_tracking(true).unwrap();
    assert!(!t().intents_durable(3 * GIB, 1));
    vm.write(0, 3 * GIB, &[7; 4096]).unwrap();
    assert!(
        t().intents_durable(3 * GIB, 4096),
        "the write synced its region's intent"
    );
    assert!(!t().intents_durable(GIB, 1), "only its own region");
    // A write across two regions syncs both.
    vm.write(0, 2 * GIB - 4096, &[7; 8192]).unwrap();
    assert!(t().intents_durable(GIB, 1) && t().intents_durable(2 * GIB, 1));
    // A snapshot opens a new epoch: the intents are for the old one.
    vm.create_snapshot("s1").unwrap();
    assert!(!t().intents_durable(3 * GIB, 1));
    vm.write(0, 3 * GIB + 8192, &[8; 4096]).unwrap();
    assert!(t().intents_durable(3 * GIB, 1));
    // The setting is the VM's: it survives a reopen, and turns off.
    drop(host.close_vm("vm"));
    drop(vm);
    let vm = host.vm("vm").unwrap();
    assert!(vm.durable_tracking() && vm.tracker(0).unwrap().is_durable());
    vm.set_durable_tracking(false).unwrap();
    assert!(vm.tracker(0).unwrap().intents_durable(0, 1));
    drop(host.close_vm("vm"));
    drop(vm);
    assert!(!host.vm("vm").unwrap().durable_tracking());
}

/// A revert's marks are no guest write's: with durable tracking they are
/// written back before the revert's journal is cleared, and after a reboot
/// change IDs issued after the reverted-to snapshot still answer.
#[test]
fn a_durable_revert_survives_a_reboot() {
    let (_d, host) = host();
    let vm = host.create_vm("vm", &[spec(64 * MIB, 64 * KIB)]).unwrap();
    vm.set_durable_tracking(true).unwrap();
    vm.write(0, 0, &[1; 4096]).unwrap();
    vm.create_snapshot("s1").unwrap();
    vm.write(0, 3 * MIB, &[2; 4096]).unwrap();
    let c2 = cid(&vm.create_snapshot("s2").unwrap());
    let i2 = image(&vm, "s2", 0);
    vm.revert_to_snapshot("s1").unwrap();
    vm.create_snapshot("s3").unwrap();
    stop_and_reboot(&host, vm);
    let vm = host.vm("vm").unwrap();
    vm.create_snapshot("s4").unwrap();
    assert_eq!(missed(&vm, &i2, "s3", &c2), 0, "what the revert changed back");
    assert_eq!(missed(&vm, &i2, "s4", &c2), 0);
    set_boot_id(None);
}
