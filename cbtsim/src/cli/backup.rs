//! `cbtsim backup run|list|verify|prune` and `cbtsim restore`: the backup
//! client of `vadp::backup` over this host.

use std::path::PathBuf;

use anyhow::{bail, Context as _};
use backup::{self, BackupOptions, Compression, Repository};
use clap::{Args, Subcommand, ValueEnum};
use workloads::human;

use super::progress::Bar;
use super::Ctx;

/// `cbtsim backup ...`
#[derive(Debug, Subcommand)]
pub enum BackupCmd {
    /// Back up a VM: full the first time (or when tracking was reset), incremental after.
    Run(RunArgs),
    /// List the restore points of a repository.
    List {
        /// The repository directory.
        #[arg(long, value_name = "DIR")]
        repo: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Re-hash every chunk and check every point; exits non-zero on any problem.
    Verify {
        /// The repository directory.
        #[arg(long, value_name = "DIR")]
        repo: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Keep the newest N points of each VM; delete the rest and the chunks only they used.
    Prune {
        /// The repository directory.
        #[arg(long, value_name = "DIR")]
        repo: PathBuf,
        /// Points to keep per VM (at least 1).
        #[arg(long, value_name = "N")]
        keep_last: usize,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// How `backup run` stores new chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CompressionArg {
    /// zstd level 1, where it helps.
    Zstd,
    /// Raw.
    None,
}

/// Arguments of `cbtsim backup run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The VM to back up.
    pub vm: String,
    /// The repository directory (created when missing or empty).
    #[arg(long, value_name = "DIR")]
    pub repo: PathBuf,
    /// Read every allocated area even if an incremental is possible.
    #[arg(long)]
    pub full: bool,
    /// How to store new chunks.
    #[arg(long, value_enum, default_value = "zstd")]
    pub compression: CompressionArg,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `cbtsim restore`.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["to", "to_vm"])))]
pub struct RestoreArgs {
    /// The repository directory.
    #[arg(long, value_name = "DIR")]
    pub repo: PathBuf,
    /// The restore point's ID (see `backup list`).
    #[arg(long, value_name = "ID")]
    pub point: String,
    /// The disk to restore to a file.
    #[arg(long, value_name = "N", requires = "to")]
    pub disk: Option<usize>,
    /// Write the disk as a raw image file (its full size, sparse where zero).
    #[arg(long, value_name = "FILE", requires = "disk")]
    pub to: Option<PathBuf>,
    /// Create this VM in the datastore with the point's disks and content.
    #[arg(long, value_name = "NEWVM")]
    pub to_vm: Option<String>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// A progress bar with MB/s on stderr, only when it is a terminal.
fn bar() -> Bar {
    const TEMPLATE: &str = "{prefix:20} {bar:30} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}";
    Bar::stderr(TEMPLATE, TEMPLATE)
}

fn mb_per_s(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / 1e6 / secs.max(1e-9)
}

fn open_repo(dir: &std::path::Path) -> anyhow::Result<Repository> {
    Repository::open(dir).with_context(|| format!("cannot open repository {}", dir.display()))
}

/// Runs `cbtsim backup ...`.
pub fn run(ctx: &Ctx, cmd: &BackupCmd) -> anyhow::Result<()> {
    match cmd {
        BackupCmd::Run(a) => {
            let host = ctx.host()?;
            let repo = Repository::create_or_open(&a.repo)
                .with_context(|| format!("cannot open repository {}", a.repo.display()))?;
            let opts = BackupOptions {
                full: a.full,
                compression: match a.compression {
                    CompressionArg::Zstd => Compression::Zstd,
                    CompressionArg::None => Compression::None,
                },
            };
            let r = backup::backup_vm(&host, &a.vm, &repo, &opts, &bar())
                .with_context(|| format!("backup of VM {} failed", a.vm))?;
            if a.json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!("point {} of VM {}: {} ({})", r.point, r.vm, r.kind, r.reason);
                println!(
                    "  read {} in {} changed area(s), stored {} new, {:.2} s ({:.1} MB/s read)",
                    human(r.bytes_read),
                    r.changed_areas,
                    human(r.bytes_stored),
                    r.seconds,
                    mb_per_s(r.bytes_read, r.seconds)
                );
            }
        }
        BackupCmd::List { repo, json } => {
            let points = open_repo(repo)?.points()?;
            if *json {
                println!("{}", serde_json::to_string(&points)?);
            } else if points.is_empty() {
                println!("no restore points in {}", repo.display());
            } else {
                println!(
                    "{:<9} {:<16} {:<11} {:<20} {:>10} {:>10} {:>7}  change IDs",
                    "POINT", "VM", "KIND", "TIME (UTC)", "READ", "STORED", "SECONDS"
                );
                for p in &points {
                    let cids: Vec<&str> = p.disks.iter().map(|d| d.change_id.as_deref().unwrap_or("-")).collect();
                    println!(
                        "{:<9} {:<16} {:<11} {:<20} {:>10} {:>10} {:>7.2}  {}",
                        p.point,
                        p.vm,
                        p.kind,
                        p.time_utc,
                        human(p.bytes_read),
                        human(p.bytes_stored),
                        p.seconds,
                        cids.join(" ")
                    );
                }
            }
        }
        BackupCmd::Verify { repo, json } => {
            let r = backup::verify(&open_repo(repo)?, &bar())?;
            if *json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "{} point(s), {} chunk(s) ({}) re-hashed; {} unreferenced chunk(s)",
                    r.points,
                    r.chunks,
                    human(r.chunk_bytes),
                    r.unreferenced_chunks
                );
                for c in &r.corrupt_chunks {
                    println!("  corrupt chunk {c}");
                }
                for c in &r.missing_chunks {
                    println!("  missing chunk {c}");
                }
                for p in &r.corrupt_points {
                    println!("  corrupt point file {p}");
                }
                if r.ok {
                    println!("  ok");
                }
            }
            if !r.ok {
                bail!(
                    "repository {} is damaged: {} corrupt and {} missing chunk(s), {} corrupt point file(s); points affected: {}",
                    repo.display(),
                    r.corrupt_chunks.len(),
                    r.missing_chunks.len(),
                    r.corrupt_points.len(),
                    r.affected_points.join(", ")
                );
            }
        }
        BackupCmd::Prune { repo, keep_last, json } => {
            let r = backup::prune(&open_repo(repo)?, *keep_last)?;
            if *json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "deleted {} point(s) [{}], kept {}; deleted {} chunk(s), freed {}",
                    r.deleted_points.len(),
                    r.deleted_points.join(", "),
                    r.kept_points,
                    r.deleted_chunks,
                    human(r.freed_bytes)
                );
            }
        }
    }
    Ok(())
}

/// Runs `cbtsim restore ...`.
pub fn restore(ctx: &Ctx, a: &RestoreArgs) -> anyhow::Result<()> {
    let repo = open_repo(&a.repo)?;
    let bar = bar();
    let r = match (&a.to, &a.to_vm, a.disk) {
        (Some(to), None, Some(disk)) => backup::restore_to_file(&repo, &a.point, disk, to, &bar)
            .with_context(|| format!("restore of point {} disk {disk} to {} failed", a.point, to.display()))?,
        (None, Some(vm), None) => {
            sim::check_name(vm)?;
            let host = ctx.host()?;
            backup::restore_to_vm(&repo, &a.point, &host, vm, &bar)
                .with_context(|| format!("restore of point {} to VM {vm} failed", a.point))?
        }
        _ => bail!("give either --disk N --to FILE, or --to-vm NEWVM"),
    };
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "restored point {} of VM {} to {}: {} disk(s), {} ({} of data) in {:.2} s ({:.1} MB/s)",
            r.point,
            r.vm,
            r.target,
            r.disks,
            human(r.capacity),
            human(r.bytes_written),
            r.seconds,
            mb_per_s(r.bytes_written, r.seconds)
        );
    }
    Ok(())
}
