//! `cbtsim vm`, `disk`, `snapshot` and `query`: driving the host step by step,
//! in the manner of govc or vim-cmd.
//!
//! Every handler validates all of its input before it changes anything, so
//! an error leaves the datastore as it was. Sizes and offsets are parsed here
//! (not by clap) so that a malformed one gives the same one-line error as any
//! other failure.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{ensure, Context as _};
use backup::Progress;
use clap::{Args, Subcommand, ValueEnum};
use sim::{DiskSpec, Host, SimError, Vm};
use tracker::Granularity;
use workloads::{format_size, parse_size, SizeStyle};

use super::progress::Bar;
use super::Ctx;

/// Bytes per chunk when writing or reading large ranges.
const CHUNK: u64 = 4 << 20;
/// The byte `disk write` writes without `--pattern` or `--from`.
const DEFAULT_PATTERN: u8 = 0xab;

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
    },
    /// Power the VM on or off.
    Power {
        /// The VM.
        vm: String,
        /// `on` or `off`.
        state: OnOff,
    },
}

/// `cbtsim disk ...`
#[derive(Debug, Subcommand)]
pub enum DiskCmd {
    /// A guest write: a repeated byte, or the contents of a file.
    Write {
        /// The VM.
        vm: String,
        /// The disk's index (0, 1, ...).
        disk: String,
        /// Byte offset (K/M/G/T suffixes).
        offset: String,
        /// Bytes to write (K/M/G/T suffixes).
        length: String,
        /// The byte to write (decimal or 0x..); default 0xab.
        #[arg(long, value_name = "BYTE", conflicts_with = "from")]
        pattern: Option<String>,
        /// Write LENGTH bytes read from this file.
        #[arg(long, value_name = "FILE")]
        from: Option<PathBuf>,
    },
    /// Read a range of the live disk, or of a snapshot, into a file.
    Read {
        /// The VM.
        vm: String,
        /// The disk's index.
        disk: String,
        /// Byte offset.
        offset: String,
        /// Bytes to read.
        length: String,
        /// Where to write the bytes (replaced atomically).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// Read the disk as it was at this snapshot.
        #[arg(long, value_name = "SNAP")]
        snapshot: Option<String>,
    },
    /// A guest unmap (TRIM): the range reads as zeros and counts as changed.
    Unmap {
        /// The VM.
        vm: String,
        /// The disk's index.
        disk: String,
        /// Byte offset.
        offset: String,
        /// Bytes to unmap.
        length: String,
    },
    /// Grow a disk while the VM runs (disks never shrink).
    Extend {
        /// The VM.
        vm: String,
        /// The disk's index.
        disk: String,
        /// The new size.
        new_size: String,
    },
}

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

/// `cbtsim query`: QueryChangedDiskAreas, paged through the whole disk.
#[derive(Debug, Args)]
pub struct QueryArgs {
    /// The VM.
    pub vm: String,
    /// The snapshot whose disk is asked about.
    #[arg(long, value_name = "SNAP")]
    pub snapshot: String,
    /// The disk's index.
    #[arg(long, value_name = "DISK", default_value = "0")]
    pub disk: String,
    /// A change ID, or `*` for every allocated area.
    #[arg(long, value_name = "CHANGE_ID")]
    pub since: String,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Parses a size argument, naming it in the error.
fn size_arg(what: &str, s: &str) -> anyhow::Result<u64> {
    parse_size(s).map_err(|e| anyhow::anyhow!("invalid {what}: {e}"))
}

fn disk_arg(s: &str) -> anyhow::Result<usize> {
    s.trim()
        .parse()
        .map_err(|_| anyhow::anyhow!("invalid DISK {s:?}: expected a disk index (0, 1, ...)"))
}

fn byte_arg(s: &str) -> anyhow::Result<u8> {
    let t = s.trim();
    let v = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) => u8::from_str_radix(hex, 16),
        None => t.parse(),
    };
    v.map_err(|_| anyhow::anyhow!("invalid --pattern {s:?}: expected a byte, 0-255 or 0x00-0xff"))
}

/// A capacity or granularity, exactly (`1536 MiB`, `100000256 bytes`).
fn human(bytes: u64) -> String {
    format_size(bytes, SizeStyle::Exact)
}

/// Opens the datastore, which must exist (only `vm create` makes one).
fn existing_host(ctx: &Ctx) -> anyhow::Result<Host> {
    if let Some(dir) = &ctx.datastore {
        ensure!(dir.is_dir(), "datastore {} does not exist", dir.display());
    }
    ctx.host()
}

fn open_vm(host: &Host, name: &str) -> anyhow::Result<Arc<Vm>> {
    Ok(host.vm(name)?)
}

/// Checks `disk` exists and `[offset, offset+len)` lies inside `capacity`.
fn check_range(vm: &Vm, disk: usize, offset: u64, len: u64, capacity: u64) -> anyhow::Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= capacity => Ok(()),
        _ => Err(SimError::OutOfRange {
            disk,
            offset,
            len,
            capacity,
        })
        .with_context(|| format!("VM {:?}", vm.name())),
    }
}

/// A progress bar on stderr for a transfer of `len` bytes, drawn only from 256 MiB and
/// when stderr is a terminal; its phase has begun.
fn bar(len: u64) -> Bar {
    const TEMPLATE: &str = "{bar:40} {bytes}/{total_bytes} {bytes_per_sec}";
    let bar = if len < (256 << 20) {
        Bar::hidden()
    } else {
        Bar::stderr(TEMPLATE, TEMPLATE)
    };
    bar.begin("", Some(len));
    bar
}

/// Runs `cbtsim vm ...`.
pub fn vm(ctx: &Ctx, cmd: &VmCmd) -> anyhow::Result<()> {
    match cmd {
        VmCmd::Create { vm, disks, granularity } => {
            sim::check_name(vm)?;
            let g = size_arg("--granularity", granularity)?;
            let g = Granularity::new(g).with_context(|| format!("invalid --granularity {granularity:?}"))?;
            let specs = disks
                .iter()
                .map(|d| {
                    Ok(DiskSpec {
                        capacity: size_arg("--disk", d)?,
                        granularity: g,
                    })
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let host = ctx.host()?;
            let v = host.create_vm(vm, &specs)?;
            let sizes: Vec<String> = specs.iter().map(|s| human(s.capacity)).collect();
            println!(
                "created VM {} with {} disk(s): {} (granularity {}, CBT on, powered on)",
                v.name(),
                specs.len(),
                sizes.join(", "),
                human(g.bytes())
            );
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
                    let disks: Vec<String> = v.disks.iter().map(|&c| human(c)).collect();
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
        VmCmd::Cbt { vm, state } => {
            let host = existing_host(ctx)?;
            let v = open_vm(&host, vm)?;
            let was = v.cbt();
            v.set_cbt(state.on())?;
            let msg = match (was, state.on()) {
                (true, true) => "was already on",
                (false, false) => "was already off",
                (false, true) => "is on (a new tracking session: earlier change IDs are no longer valid)",
                (true, false) => "is off (change IDs issued so far are no longer valid)",
            };
            println!("change tracking of VM {vm} {msg}");
        }
        VmCmd::Power { vm, state } => {
            let host = existing_host(ctx)?;
            let v = open_vm(&host, vm)?;
            v.set_power(state.on())?;
            println!("VM {vm} is powered {}", if state.on() { "on" } else { "off" });
        }
    }
    Ok(())
}

/// Runs `cbtsim disk ...`.
pub fn disk(ctx: &Ctx, cmd: &DiskCmd) -> anyhow::Result<()> {
    match cmd {
        DiskCmd::Write {
            vm,
            disk,
            offset,
            length,
            pattern,
            from,
        } => {
            let d = disk_arg(disk)?;
            let off = size_arg("OFFSET", offset)?;
            let len = size_arg("LENGTH", length)?;
            let byte = pattern.as_deref().map(byte_arg).transpose()?.unwrap_or(DEFAULT_PATTERN);
            let mut file = match from {
                Some(p) => {
                    // Checked up front: a short file must not leave a partial write.
                    let f = std::fs::File::open(p).with_context(|| format!("cannot open --from {}", p.display()))?;
                    let have = f.metadata().with_context(|| format!("--from {}", p.display()))?.len();
                    ensure!(
                        have >= len,
                        "--from {} holds {have} bytes, fewer than LENGTH {len}",
                        p.display()
                    );
                    Some(f)
                }
                None => None,
            };
            let host = existing_host(ctx)?;
            let v = open_vm(&host, vm)?;
            let cap = v.capacity(d)?;
            check_range(&v, d, off, len, cap)?;
            ensure!(v.powered_on(), "VM {vm:?} is powered off");
            let pb = bar(len);
            let mut buf = vec![byte; CHUNK.min(len) as usize];
            let mut done = 0;
            while done < len {
                let n = CHUNK.min(len - done) as usize;
                if let (Some(f), Some(p)) = (&mut file, from) {
                    f.read_exact(&mut buf[..n])
                        .with_context(|| format!("cannot read --from {}", p.display()))?;
                }
                v.write(d, off + done, &buf[..n])?;
                done += n as u64;
                pb.advance(n as u64);
            }
            pb.end();
            println!("wrote {len} bytes at offset {off} of disk {d} of VM {vm}");
        }
        DiskCmd::Read {
            vm,
            disk,
            offset,
            length,
            out,
            snapshot,
        } => {
            let d = disk_arg(disk)?;
            let off = size_arg("OFFSET", offset)?;
            let len = size_arg("LENGTH", length)?;
            let host = existing_host(ctx)?;
            let v = open_vm(&host, vm)?;
            let cap = match snapshot {
                Some(s) => v.snapshot_capacity(s, d)?,
                None => v.capacity(d)?,
            };
            check_range(&v, d, off, len, cap)?;
            let dir = match out.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
                _ => PathBuf::from("."),
            };
            let mut tmp = tempfile::Builder::new()
                .prefix(".cbtsim-read")
                .tempfile_in(&dir)
                .with_context(|| format!("cannot create a file in {}", dir.display()))?;
            let pb = bar(len);
            let mut buf = vec![0u8; CHUNK.min(len) as usize];
            let mut done = 0;
            while done < len {
                let n = CHUNK.min(len - done) as usize;
                match snapshot {
                    Some(s) => v.read_snapshot(s, d, off + done, &mut buf[..n])?,
                    None => v.read(d, off + done, &mut buf[..n])?,
                }
                tmp.write_all(&buf[..n])
                    .with_context(|| format!("cannot write {}", out.display()))?;
                done += n as u64;
                pb.advance(n as u64);
            }
            pb.end();
            tmp.as_file()
                .sync_all()
                .with_context(|| format!("cannot write {}", out.display()))?;
            tmp.persist(out)
                .map_err(|e| e.error)
                .with_context(|| format!("cannot write {}", out.display()))?;
            let at = snapshot
                .as_ref()
                .map_or_else(|| "the live disk".to_owned(), |s| format!("snapshot {s}"));
            println!(
                "read {len} bytes at offset {off} of disk {d} ({at}) into {}",
                out.display()
            );
        }
        DiskCmd::Unmap {
            vm,
            disk,
            offset,
            length,
        } => {
            let d = disk_arg(disk)?;
            let off = size_arg("OFFSET", offset)?;
            let len = size_arg("LENGTH", length)?;
            let host = existing_host(ctx)?;
            let v = open_vm(&host, vm)?;
            v.unmap(d, off, len)?;
            println!("unmapped {len} bytes at offset {off} of disk {d} of VM {vm}");
        }
        DiskCmd::Extend { vm, disk, new_size } => {
            let d = disk_arg(disk)?;
            let size = size_arg("NEWSIZE", new_size)?;
            let host = existing_host(ctx)?;
            let v = open_vm(&host, vm)?;
            v.extend_disk(d, size)?;
            println!("disk {d} of VM {vm} is now {}", human(size));
        }
    }
    Ok(())
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
pub fn snapshot(ctx: &Ctx, cmd: &SnapshotCmd) -> anyhow::Result<()> {
    match cmd {
        SnapshotCmd::Create { vm, snap, json } => {
            sim::check_name(snap)?;
            let host = existing_host(ctx)?;
            let v = open_vm(&host, vm)?;
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
            let host = existing_host(ctx)?;
            let v = open_vm(&host, vm)?;
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
                        println!("  disk {}: {}  change ID {cid}", d.disk, human(d.capacity));
                    }
                }
            }
        }
        SnapshotCmd::Remove { vm, snap } => {
            let host = existing_host(ctx)?;
            let v = open_vm(&host, vm)?;
            v.remove_snapshot(snap)?;
            println!("removed snapshot {snap} of VM {vm}");
        }
        SnapshotCmd::Revert { vm, snap } => {
            let host = existing_host(ctx)?;
            let v = open_vm(&host, vm)?;
            v.revert_to_snapshot(snap)?;
            println!("reverted VM {vm} to snapshot {snap}");
        }
    }
    Ok(())
}

/// `query --json`.
#[derive(Debug, serde::Serialize)]
struct QueryOut<'a> {
    disk_size: u64,
    granularity: u64,
    since: &'a str,
    change_id: Option<String>,
    changed_areas: Vec<(u64, u64)>,
    changed_bytes: u64,
}

/// Runs `cbtsim query`.
pub fn query(ctx: &Ctx, a: &QueryArgs) -> anyhow::Result<()> {
    let d = disk_arg(&a.disk)?;
    let since = a.since.trim();
    if since != "*" {
        since
            .parse::<tracker::ChangeId>()
            .with_context(|| format!("invalid --since {since:?}"))?;
    }
    let host = existing_host(ctx)?;
    let v = open_vm(&host, &a.vm)?;
    let cap = v.snapshot_capacity(&a.snapshot, d)?;
    let granularity = v.granularity(d)?.bytes();
    let change_id = v
        .snapshots()
        .into_iter()
        .find(|s| s.name == a.snapshot)
        .and_then(|s| s.disks.into_iter().nth(d))
        .and_then(|sd| sd.change_id);
    let areas = vadp::changed_areas(&host, &a.vm, &a.snapshot, d, since)
        .map(|r| r.map(|x| (x.start, x.length)))
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("query of disk {d} of snapshot {} since {since}", a.snapshot))?;
    let changed_bytes = areas.iter().map(|&(_, l)| l).sum();
    if a.json {
        let out = QueryOut {
            disk_size: cap,
            granularity,
            since,
            change_id,
            changed_areas: areas,
            changed_bytes,
        };
        println!("{}", serde_json::to_string(&out)?);
    } else {
        println!(
            "disk {d} of snapshot {} ({}, granularity {}), changed since {since}: {} area(s), {changed_bytes} bytes",
            a.snapshot,
            human(cap),
            human(granularity),
            areas.len()
        );
        for (s, l) in &areas {
            println!("{s} +{l}");
        }
        if let Some(c) = change_id {
            println!("this snapshot's change ID: {c}");
        }
    }
    Ok(())
}
