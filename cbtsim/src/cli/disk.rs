//! `cbtsim disk`: guest writes, reads (of the live disk or a snapshot), unmaps and extends.

use std::io::Read;
use std::path::PathBuf;

use anyhow::{ensure, Context as _};
use backup::Progress;
use clap::Subcommand;
use sim::{SimError, Vm};

use super::progress::Bar;
use super::{bytes_word, disk_arg, exact, existing_vm, print_json, size_arg, vm_view, Ctx};

/// Bytes per chunk when writing or reading large ranges.
const CHUNK: u64 = 4 << 20;
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

/// DISK, OFFSET and LENGTH.
fn range_args(disk: &str, offset: &str, length: &str) -> anyhow::Result<(usize, u64, u64)> {
    Ok((
        disk_arg(disk)?,
        size_arg("OFFSET", offset)?,
        size_arg("LENGTH", length)?,
    ))
}

/// Runs `f(done, n)` over `len` bytes in pieces of at most [`CHUNK`] (`done` bytes before
/// the piece, `n` in it), with a progress bar on stderr drawn from 256 MiB when stderr is a
/// terminal.
fn in_chunks(len: u64, mut f: impl FnMut(u64, usize) -> anyhow::Result<()>) -> anyhow::Result<()> {
    const TEMPLATE: &str = "{bar:40} {bytes}/{total_bytes} {bytes_per_sec}";
    let bar = if len < (256 << 20) {
        Bar::hidden()
    } else {
        Bar::stderr(TEMPLATE, TEMPLATE)
    };
    bar.begin("", Some(len));
    let mut done = 0;
    while done < len {
        let n = CHUNK.min(len - done);
        f(done, n as usize)?;
        done += n;
        bar.advance(n);
    }
    bar.end();
    Ok(())
}

/// Writes `data` at `at` of `f`, leaving a hole where a 4 KiB block of it is all zeros.
fn write_sparse(f: &std::fs::File, at: u64, data: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    const BLOCK: usize = 4096;
    let mut i = 0;
    while i < data.len() {
        // A run of non-zero blocks, written at once.
        let start = i;
        while i < data.len() && data[i..(i + BLOCK).min(data.len())].iter().any(|&b| b != 0) {
            i = (i + BLOCK).min(data.len());
        }
        if i > start {
            f.write_all_at(&data[start..i], at + start as u64)?;
        }
        while i < data.len() && data[i..(i + BLOCK).min(data.len())].iter().all(|&b| b == 0) {
            i = (i + BLOCK).min(data.len());
        }
    }
    Ok(())
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
            let v = existing_vm(ctx, vm)?;
            let cap = v.capacity(d)?;
            check_range(&v, d, off, len, cap)?;
            ensure!(v.powered_on(), "VM {vm:?} is powered off");
            let mut buf = vec![byte; CHUNK.min(len) as usize];
            in_chunks(len, |done, n| {
                if let (Some(f), Some(p)) = (&mut file, from) {
                    f.read_exact(&mut buf[..n])
                        .with_context(|| format!("cannot read --from {}", p.display()))?;
                }
                Ok(v.write(d, off + done, &buf[..n])?)
            })?;
            if *json {
                return print_json(&IoOut {
                    vm,
                    disk: d,
                    op: "write",
                    offset: off,
                    length: len,
                    out: None,
                    snapshot: None,
                    capacity: cap,
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
            let v = existing_vm(ctx, vm)?;
            let cap = match snapshot {
                Some(s) => v.snapshot_capacity(s, d)?,
                None => v.capacity(d)?,
            };
            check_range(&v, d, off, len, cap)?;
            let dir = match out.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
                _ => PathBuf::from("."),
            };
            let tmp = tempfile::Builder::new()
                .prefix(".cbtsim-read")
                .tempfile_in(&dir)
                .with_context(|| format!("cannot create a file in {}", dir.display()))?;
            let mut buf = vec![0u8; CHUNK.min(len) as usize];
            in_chunks(len, |done, n| {
                match snapshot {
                    Some(s) => v.read_snapshot(s, d, off + done, &mut buf[..n])?,
                    None => v.read(d, off + done, &mut buf[..n])?,
                }
                write_sparse(tmp.as_file(), done, &buf[..n]).with_context(|| format!("cannot write {}", out.display()))
            })?;
            // Holes up to the end: the zeros of the range are never written.
            tmp.as_file()
                .set_len(len)
                .with_context(|| format!("cannot write {}", out.display()))?;
            tmp.as_file()
                .sync_all()
                .with_context(|| format!("cannot write {}", out.display()))?;
            tmp.persist(out)
                .map_err(|e| e.error)
                .with_context(|| format!("cannot write {}", out.display()))?;
            if *json {
                return print_json(&IoOut {
                    vm,
                    disk: d,
                    op: "read",
                    offset: off,
                    length: len,
                    out: Some(out.display().to_string()),
                    snapshot: snapshot.as_deref(),
                    capacity: cap,
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
            let v = existing_vm(ctx, vm)?;
            v.unmap(d, off, len)?;
            if *json {
                return print_json(&IoOut {
                    vm,
                    disk: d,
                    op: "unmap",
                    offset: off,
                    length: len,
                    out: None,
                    snapshot: None,
                    capacity: v.capacity(d)?,
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
            let v = existing_vm(ctx, vm)?;
            let old = v.capacity(d)?;
            v.extend_disk(d, size)?;
            if *json {
                return print_json(&IoOut {
                    vm,
                    disk: d,
                    op: "extend",
                    offset: old,
                    length: size - old,
                    out: None,
                    snapshot: None,
                    capacity: size,
                });
            }
            println!("disk {d} of VM {vm} is now {}", exact(size));
        }
        DiskCmd::List { vm, json } => {
            let info = super::inspect::vm_info(&vm_view(ctx, vm)?)?;
            if *json {
                return print_json(&info.disks);
            }
            super::inspect::print_disks(&info.disks);
        }
    }
    Ok(())
}
