//! `cbtsim disk`: guest writes, reads (of the live disk or a snapshot), unmaps and extends.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::Subcommand;
use service::{Request, Response, WriteData};

use super::dispatch::{answer, request};
use super::progress::Bar;
use super::{bytes_word, disk_arg, exact, print_json, size_arg, Ctx};

/// Transfers from this size on draw a progress bar (on a terminal).
const BAR_FROM: u64 = 256 << 20;
/// The byte `disk write` writes without `--pattern` or `--from`.
const DEFAULT_PATTERN: u8 = 0xab;

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
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List a VM's disks: capacity, granularity, layers, allocated bytes, current change ID.
    List {
        /// The VM.
        vm: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
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
        /// Print JSON.
        #[arg(long)]
        json: bool,
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
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Grow a disk while the VM runs (disks never shrink).
    Extend {
        /// The VM.
        vm: String,
        /// The disk's index.
        disk: String,
        /// The new size.
        new_size: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `disk write|unmap|read|extend --json`.
#[derive(Debug, serde::Serialize)]
struct IoOut<'a> {
    vm: &'a str,
    disk: usize,
    /// What was done: write, unmap, read, extend.
    op: &'static str,
    offset: u64,
    length: u64,
    /// Where `read` wrote the bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    out: Option<String>,
    /// The snapshot `read` read.
    #[serde(skip_serializing_if = "Option::is_none")]
    snapshot: Option<&'a str>,
    /// The disk's capacity after the command.
    capacity: u64,
}

fn byte_arg(s: &str) -> anyhow::Result<u8> {
    let t = s.trim();
    let v = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) => u8::from_str_radix(hex, 16),
        None => t.parse(),
    };
    v.map_err(|_| anyhow::anyhow!("invalid --pattern {s:?}: expected a byte, 0-255 or 0x00-0xff"))
}

/// DISK, OFFSET and LENGTH.
fn range_args(disk: &str, offset: &str, length: &str) -> anyhow::Result<(usize, u64, u64)> {
    Ok((
        disk_arg(disk)?,
        size_arg("OFFSET", offset)?,
        size_arg("LENGTH", length)?,
    ))
}

/// A progress bar with MB/s for a transfer of `len` bytes, drawn from [`BAR_FROM`] when
/// stderr is a terminal.
fn transfer_bar(len: u64) -> Bar {
    const TEMPLATE: &str = "{bar:40} {bytes}/{total_bytes} {bytes_per_sec}";
    if len < BAR_FROM {
        Bar::hidden()
    } else {
        Bar::stderr(TEMPLATE, TEMPLATE)
    }
}

/// `path` made absolute (the service may run in another directory).
fn absolute(what: &str, path: &Path) -> anyhow::Result<PathBuf> {
    std::path::absolute(path).with_context(|| format!("invalid {what} {}", path.display()))
}

/// Runs `cbtsim disk ...`.
pub fn run(ctx: &Ctx, cmd: &DiskCmd) -> anyhow::Result<()> {
    match cmd {
        DiskCmd::Write {
            vm,
            disk,
            offset,
            length,
            pattern,
            from,
            json,
        } => {
            let (d, off, len) = range_args(disk, offset, length)?;
            let byte = pattern.as_deref().map(byte_arg).transpose()?.unwrap_or(DEFAULT_PATTERN);
            let data = match from {
                Some(p) => WriteData::File {
                    path: absolute("--from", p)?,
                    length: len,
                },
                None => WriteData::Pattern { byte, length: len },
            };
            let r = request(
                ctx,
                Request::DiskWrite {
                    vm: vm.clone(),
                    disk: d,
                    offset: off,
                    data,
                },
                &transfer_bar(len),
            )?;
            let io = answer!(r, Response::Written(io) => io);
            if *json {
                return print_json(&IoOut {
                    vm,
                    disk: d,
                    op: "write",
                    offset: off,
                    length: len,
                    out: None,
                    snapshot: None,
                    capacity: io.capacity,
                });
            }
            println!("wrote {} at offset {off} of disk {d} of VM {vm}", bytes_word(len));
        }
        DiskCmd::Read {
            vm,
            disk,
            offset,
            length,
            out,
            snapshot,
            json,
        } => {
            let (d, off, len) = range_args(disk, offset, length)?;
            let r = request(
                ctx,
                Request::DiskRead {
                    vm: vm.clone(),
                    disk: d,
                    offset: off,
                    length: len,
                    snapshot: snapshot.clone(),
                    out: Some(absolute("--out", out)?),
                },
                &transfer_bar(len),
            )?;
            let (io, written) = answer!(r, Response::Read { io, out: Some(o), .. } => (io, o));
            if *json {
                return print_json(&IoOut {
                    vm,
                    disk: d,
                    op: "read",
                    offset: off,
                    length: len,
                    out: Some(written.display().to_string()),
                    snapshot: snapshot.as_deref(),
                    capacity: io.capacity,
                });
            }
            let at = snapshot
                .as_ref()
                .map_or_else(|| "the live disk".to_owned(), |s| format!("snapshot {s}"));
            println!(
                "read {} at offset {off} of disk {d} ({at}) into {}",
                bytes_word(len),
                out.display()
            );
        }
        DiskCmd::Unmap {
            vm,
            disk,
            offset,
            length,
            json,
        } => {
            let (d, off, len) = range_args(disk, offset, length)?;
            let r = request(
                ctx,
                Request::DiskUnmap {
                    vm: vm.clone(),
                    disk: d,
                    offset: off,
                    length: len,
                },
                &(),
            )?;
            let io = answer!(r, Response::Unmapped(io) => io);
            if *json {
                return print_json(&IoOut {
                    vm,
                    disk: d,
                    op: "unmap",
                    offset: off,
                    length: len,
                    out: None,
                    snapshot: None,
                    capacity: io.capacity,
                });
            }
            println!("unmapped {} at offset {off} of disk {d} of VM {vm}", bytes_word(len));
        }
        DiskCmd::Extend {
            vm,
            disk,
            new_size,
            json,
        } => {
            let d = disk_arg(disk)?;
            let size = size_arg("NEWSIZE", new_size)?;
            let r = request(
                ctx,
                Request::DiskExtend {
                    vm: vm.clone(),
                    disk: d,
                    size,
                },
                &(),
            )?;
            let (size, old) = answer!(r, Response::Extended { size, old_size, .. } => (size, old_size));
            if *json {
                return print_json(&IoOut {
                    vm,
                    disk: d,
                    op: "extend",
                    offset: old,
                    length: size.saturating_sub(old),
                    out: None,
                    snapshot: None,
                    capacity: size,
                });
            }
            println!("disk {d} of VM {vm} is now {}", exact(size));
        }
        DiskCmd::List { vm, json } => {
            let r = request(ctx, Request::VmShow { vm: vm.clone() }, &())?;
            let info = answer!(r, Response::VmDetails(d) => d);
            if *json {
                return print_json(&info.disks);
            }
            super::inspect::print_disks(&info.disks);
        }
    }
    Ok(())
}
