//! `cbtsim snapshot`: create (printing each disk's change ID), list, remove, revert.

use clap::Subcommand;

use super::{exact, existing_vm, Ctx};

/// `cbtsim snapshot ...`
#[derive(Debug, Subcommand)]
pub enum SnapshotCmd {
    /// Create a snapshot and print each disk's change ID.
    Create {
        /// The VM.
        vm: String,
        /// The snapshot's name.
        snap: String,
        /// Print JSON: {"snapshot": NAME, "disks": [{"disk": 0, "change_id": "..."}]}.
        #[arg(long)]
        json: bool,
    },
    /// List the VM's snapshots, oldest first.
    List {
        /// The VM.
        vm: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove a snapshot, consolidating its delta.
    Remove {
        /// The VM.
        vm: String,
        /// The snapshot.
        snap: String,
    },
    /// Revert the VM to a snapshot (newer snapshots are deleted).
    Revert {
        /// The VM.
        vm: String,
        /// The snapshot.
        snap: String,
    },
}

/// `snapshot create --json`: one disk's change ID.
#[derive(Debug, serde::Serialize)]
struct CreatedDisk {
    disk: usize,
    change_id: Option<String>,
}

/// `snapshot create --json`.
#[derive(Debug, serde::Serialize)]
struct Created {
    snapshot: String,
    disks: Vec<CreatedDisk>,
}

/// Runs `cbtsim snapshot ...`.
pub fn run(ctx: &Ctx, cmd: &SnapshotCmd) -> anyhow::Result<()> {
    match cmd {
        SnapshotCmd::Create { vm, snap, json } => {
            sim::check_name(snap)?;
            let v = existing_vm(ctx, vm)?;
            let info = v.create_snapshot(snap)?;
            if *json {
                let out = Created {
                    snapshot: info.name,
                    disks: info
                        .disks
                        .into_iter()
                        .map(|d| CreatedDisk {
                            disk: d.disk,
                            change_id: d.change_id,
                        })
                        .collect(),
                };
                println!("{}", serde_json::to_string(&out)?);
            } else {
                println!("created snapshot {} of VM {vm}", info.name);
                for d in &info.disks {
                    let cid = d.change_id.as_deref().unwrap_or("(none: change tracking is off)");
                    println!("disk {}: change ID {cid}", d.disk);
                }
            }
        }
        SnapshotCmd::List { vm, json } => {
            let v = existing_vm(ctx, vm)?;
            let snaps = v.snapshots();
            if *json {
                println!("{}", serde_json::to_string(&snaps)?);
            } else if snaps.is_empty() {
                println!("VM {vm} has no snapshots");
            } else {
                for s in &snaps {
                    println!("{} (created {})", s.name, s.created);
                    for d in &s.disks {
                        let cid = d.change_id.as_deref().unwrap_or("none");
                        println!("  disk {}: {}  change ID {cid}", d.disk, exact(d.capacity));
                    }
                }
            }
        }
        SnapshotCmd::Remove { vm, snap } => {
            let v = existing_vm(ctx, vm)?;
            v.remove_snapshot(snap)?;
            println!("removed snapshot {snap} of VM {vm}");
        }
        SnapshotCmd::Revert { vm, snap } => {
            let v = existing_vm(ctx, vm)?;
            v.revert_to_snapshot(snap)?;
            println!("reverted VM {vm} to snapshot {snap}");
        }
    }
    Ok(())
}
