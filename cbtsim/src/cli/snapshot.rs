//! `cbtsim snapshot`: create (printing each disk's change ID), list, remove, revert.

use clap::Subcommand;
use service::{Request, Response};

use super::dispatch::{answer, request};
use super::{inspect, print_json, Ctx};

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
    /// Show one snapshot: when it was taken, each disk's capacity and change ID.
    Show {
        /// The VM.
        vm: String,
        /// The snapshot.
        snap: String,
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
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Revert the VM to a snapshot (newer snapshots are deleted).
    Revert {
        /// The VM.
        vm: String,
        /// The snapshot.
        snap: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `snapshot remove|revert --json`.
#[derive(Debug, serde::Serialize)]
struct Done<'a> {
    vm: &'a str,
    snapshot: &'a str,
    /// removed, reverted
    done: &'static str,
    /// The VM's snapshots now, oldest first.
    snapshots: Vec<String>,
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
            let r = request(
                ctx,
                Request::SnapshotCreate {
                    vm: vm.clone(),
                    name: snap.clone(),
                },
                &(),
            )?;
            let info = answer!(r, Response::SnapshotCreated(i) => i);
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
            let r = request(ctx, Request::SnapshotList { vm: vm.clone() }, &())?;
            let snaps = answer!(r, Response::Snapshots { snapshots, .. } => snapshots);
            if *json {
                print_json(&snaps)?;
            } else if snaps.is_empty() {
                println!("VM {vm} has no snapshots");
            } else {
                snaps.iter().for_each(inspect::print_snapshot);
            }
        }
        SnapshotCmd::Show { vm, snap, json } => {
            let r = request(ctx, Request::SnapshotList { vm: vm.clone() }, &())?;
            let snaps = answer!(r, Response::Snapshots { snapshots, .. } => snapshots);
            let Some(s) = snaps.into_iter().find(|s| s.name == *snap) else {
                return Err(sim::SimError::NoSuchSnapshot {
                    vm: vm.clone(),
                    name: snap.clone(),
                }
                .into());
            };
            if *json {
                print_json(&s)?;
            } else {
                inspect::print_snapshot(&s);
            }
        }
        SnapshotCmd::Remove { vm, snap, json } => {
            let r = request(
                ctx,
                Request::SnapshotRemove {
                    vm: vm.clone(),
                    name: snap.clone(),
                },
                &(),
            )?;
            let snapshots = answer!(r, Response::SnapshotRemoved { snapshots, .. } => snapshots);
            if *json {
                return print_json(&Done {
                    vm,
                    snapshot: snap,
                    done: "removed",
                    snapshots,
                });
            }
            println!("removed snapshot {snap} of VM {vm}");
        }
        SnapshotCmd::Revert { vm, snap, json } => {
            let r = request(
                ctx,
                Request::SnapshotRevert {
                    vm: vm.clone(),
                    name: snap.clone(),
                },
                &(),
            )?;
            let snapshots = answer!(r, Response::Reverted { snapshots, .. } => snapshots);
            if *json {
                return print_json(&Done {
                    vm,
                    snapshot: snap,
                    done: "reverted",
                    snapshots,
                });
            }
            println!("reverted VM {vm} to snapshot {snap}");
        }
    }
    Ok(())
}
