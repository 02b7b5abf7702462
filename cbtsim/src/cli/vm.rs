//! `cbtsim vm`: create, list, change tracking on or off, power on or off.

use anyhow::Context as _;
use clap::{Subcommand, ValueEnum};
use sim::DiskSpec;
use tracker::Granularity;

use super::{check_disk_size, exact, existing_host, existing_vm, print_json, size_arg, vm_view, Ctx};

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
            sim::check_name(vm)?;
            let g = size_arg("--granularity", granularity)?;
            let g = Granularity::new(g).with_context(|| format!("invalid --granularity {granularity:?}"))?;
            let specs = disks
                .iter()
                .map(|d| {
                    let capacity = size_arg("--disk", d)?;
                    check_disk_size(capacity).with_context(|| format!("invalid --disk {d:?}"))?;
                    Ok(DiskSpec {
                        capacity,
                        granularity: g,
                    })
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let host = ctx.host()?;
            let v = host.create_vm(vm, &specs)?;
            if *json {
                let disks = specs
                    .iter()
                    .enumerate()
                    .map(|(disk, s)| CreatedDisk {
                        disk,
                        capacity: s.capacity,
                        granularity: g.bytes(),
                    })
                    .collect();
                return print_json(&Created {
                    vm: v.name(),
                    disks,
                    cbt: true,
                    powered_on: true,
                });
            }
            let sizes: Vec<String> = specs.iter().map(|s| exact(s.capacity)).collect();
            println!(
                "created VM {} with {} disk(s): {} (granularity {}, CBT on, powered on)",
                v.name(),
                specs.len(),
                sizes.join(", "),
                exact(g.bytes())
            );
        }
        VmCmd::Delete { vm, json } => {
            existing_host(ctx)?.delete_vm(vm)?;
            if *json {
                return print_json(&serde_json::json!({ "vm": vm, "deleted": true }));
            }
            println!("deleted VM {vm}");
        }
        VmCmd::Show { vm, json } => {
            let info = super::inspect::vm_info(&vm_view(ctx, vm)?)?;
            if *json {
                return print_json(&info);
            }
            super::inspect::print_vm(&info);
        }
        VmCmd::List { json } => {
            let host = existing_host(ctx)?;
            let vms = host.list()?;
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
                        if v.powered_on { "on" } else { "off" },
                        if v.cbt { "on" } else { "off" },
                        disks.join(", "),
                        v.snapshots.join(", ")
                    );
                }
            }
        }
        VmCmd::Cbt { vm, state, json } => {
            let v = existing_vm(ctx, vm)?;
            let was = v.cbt();
            v.set_cbt(state.on())?;
            if *json {
                return print_json(&CbtOut {
                    vm,
                    cbt: state.on(),
                    was,
                    change_ids_invalidated: was != state.on(),
                });
            }
            let msg = match (was, state.on()) {
                (true, true) => "was already on",
                (false, false) => "was already off",
                (false, true) => "is on (a new tracking session: earlier change IDs are no longer valid)",
                (true, false) => "is off (change IDs issued so far are no longer valid)",
            };
            println!("change tracking of VM {vm} {msg}");
        }
        VmCmd::Power { vm, state, json } => {
            let v = existing_vm(ctx, vm)?;
            v.set_power(state.on())?;
            if *json {
                return print_json(&PowerOut {
                    vm,
                    powered_on: state.on(),
                });
            }
            println!("VM {vm} is powered {}", if state.on() { "on" } else { "off" });
        }
    }
    Ok(())
}
