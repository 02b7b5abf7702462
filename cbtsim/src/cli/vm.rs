//! `cbtsim vm`: create, list, change tracking on or off, power on or off.

use clap::{Subcommand, ValueEnum};
use service::{Request, Response};

use super::dispatch::{answer, request, Backend};
use super::{exact, print_json, size_arg, Ctx};

/// `on` or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnOff {
    /// Turn it on.
    On,
    /// Turn it off.
    Off,
}

impl OnOff {
    fn on(self) -> bool {
        self == Self::On
    }
}

/// `cbtsim vm ...`
#[derive(Debug, Subcommand)]
pub enum VmCmd {
    /// Create a VM (CBT on, powered on).
    Create {
        /// The VM's name.
        vm: String,
        /// A disk's size (K/M/G/T suffixes); repeat for more disks.
        #[arg(long = "disk", value_name = "SIZE", required = true)]
        disks: Vec<String>,
        /// Tracking granularity of every disk.
        #[arg(long, value_name = "SIZE", default_value = "64K")]
        granularity: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show a VM: power, CBT, each disk (capacity, granularity, current change ID, layers),
    /// its snapshots and whether a consolidation is pending.
    Show {
        /// The VM.
        vm: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete a VM and all its files (it must not be open elsewhere).
    Delete {
        /// The VM.
        vm: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the VMs of the datastore.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Turn change tracking on or off (off then on starts a new tracking session).
    Cbt {
        /// The VM.
        vm: String,
        /// `on` or `off`.
        state: OnOff,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Power the VM on or off.
    Power {
        /// The VM.
        vm: String,
        /// `on` or `off`.
        state: OnOff,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// One disk of `vm create --json`.
#[derive(Debug, serde::Serialize)]
struct CreatedDisk {
    disk: usize,
    capacity: u64,
    granularity: u64,
}

/// `vm create --json`.
#[derive(Debug, serde::Serialize)]
struct Created<'a> {
    vm: &'a str,
    disks: Vec<CreatedDisk>,
    cbt: bool,
    powered_on: bool,
}

/// `vm cbt --json`.
#[derive(Debug, serde::Serialize)]
struct CbtOut<'a> {
    vm: &'a str,
    cbt: bool,
    was: bool,
    /// Whether change IDs issued before are no longer valid.
    change_ids_invalidated: bool,
}

/// `vm power --json`.
#[derive(Debug, serde::Serialize)]
struct PowerOut<'a> {
    vm: &'a str,
    powered_on: bool,
}

/// Runs `cbtsim vm ...`.
pub fn run(ctx: &Ctx, cmd: &VmCmd) -> anyhow::Result<()> {
    match cmd {
        VmCmd::Create {
            vm,
            disks,
            granularity,
            json,
        } => {
            let g = size_arg("--granularity", granularity)?;
            let sizes = disks
                .iter()
                .map(|d| size_arg("--disk", d))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let r = Backend::open_or_create(ctx)?.call(
                Request::VmCreate {
                    vm: vm.clone(),
                    disks: sizes,
                    granularity: g,
                },
                &(),
            )?;
            let v = answer!(r, Response::VmCreated(v) => v);
            if *json {
                let disks = v
                    .disks
                    .iter()
                    .enumerate()
                    .map(|(disk, &capacity)| CreatedDisk {
                        disk,
                        capacity,
                        granularity: g,
                    })
                    .collect();
                return print_json(&Created {
                    vm: &v.name,
                    disks,
                    cbt: v.cbt,
                    powered_on: v.powered_on,
                });
            }
            let sizes: Vec<String> = v.disks.iter().map(|&c| exact(c)).collect();
            println!(
                "created VM {} with {} disk(s): {} (granularity {}, CBT {}, powered {})",
                v.name,
                v.disks.len(),
                sizes.join(", "),
                exact(g),
                on_off(v.cbt),
                on_off(v.powered_on)
            );
        }
        VmCmd::Delete { vm, json } => {
            let r = request(ctx, Request::VmDelete { vm: vm.clone() }, &())?;
            let vm = answer!(r, Response::VmDeleted { vm } => vm);
            if *json {
                return print_json(&serde_json::json!({ "vm": vm, "deleted": true }));
            }
            println!("deleted VM {vm}");
        }
        VmCmd::Show { vm, json } => {
            let r = request(ctx, Request::VmShow { vm: vm.clone() }, &())?;
            let info = answer!(r, Response::VmDetails(d) => d);
            if *json {
                return print_json(&info);
            }
            super::inspect::print_vm(&info);
        }
        VmCmd::List { json } => {
            let vms = answer!(request(ctx, Request::VmList {}, &())?, Response::Vms(v) => v);
            if *json {
                println!("{}", serde_json::to_string(&vms)?);
            } else if vms.is_empty() {
                println!("no VMs");
            } else {
                for v in &vms {
                    let disks: Vec<String> = v.disks.iter().map(|&c| exact(c)).collect();
                    println!(
                        "{}  power {}  cbt {}  disks [{}]  snapshots [{}]",
                        v.name,
                        on_off(v.powered_on),
                        on_off(v.cbt),
                        disks.join(", "),
                        v.snapshots.join(", ")
                    );
                }
            }
        }
        VmCmd::Cbt { vm, state, json } => {
            let r = request(
                ctx,
                Request::VmCbt {
                    vm: vm.clone(),
                    on: state.on(),
                },
                &(),
            )?;
            let (was, on) = answer!(r, Response::Cbt { was, on, .. } => (was, on));
            if *json {
                return print_json(&CbtOut {
                    vm,
                    cbt: on,
                    was,
                    change_ids_invalidated: was != on,
                });
            }
            let msg = match (was, on) {
                (true, true) => "was already on",
                (false, false) => "was already off",
                (false, true) => "is on (a new tracking session: earlier change IDs are no longer valid)",
                (true, false) => "is off (change IDs issued so far are no longer valid)",
            };
            println!("change tracking of VM {vm} {msg}");
        }
        VmCmd::Power { vm, state, json } => {
            let r = request(
                ctx,
                Request::VmPower {
                    vm: vm.clone(),
                    on: state.on(),
                },
                &(),
            )?;
            let on = answer!(r, Response::Power { on, .. } => on);
            if *json {
                return print_json(&PowerOut { vm, powered_on: on });
            }
            println!("VM {vm} is powered {}", on_off(on));
        }
    }
    Ok(())
}

fn on_off(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}
