//! `cbtsim backup run|list|verify|prune` and `cbtsim restore`: the backup
//! client of `vadp::backup` over this host.

use std::path::PathBuf;

use anyhow::{bail, Context as _};
use backup::{self, PointListing, PrunePolicy, Repository};
use clap::{Args, Subcommand, ValueEnum};
use service::action::{RepairOutcome, RestoreOutcome};
use service::{Request, Response};
use workloads::human;

use super::dispatch::{answer, request, Backend};
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
    /// Re-hash every chunk and check every point; a bad chunk is moved aside into
    /// REPO/bad/ (the next backup stores it again); exits non-zero on any problem.
    Verify {
        /// The repository directory.
        #[arg(long, value_name = "DIR")]
        repo: PathBuf,
        /// Then read the bad chunks again from snapshots of the VMs of the datastore,
        /// where their data has not changed since.
        #[arg(long)]
        repair: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Keep points by policy (as Proxmox Backup Server: last, then daily, then weekly,
    /// per VM, days and ISO weeks in UTC); delete the rest and the chunks only they used.
    Prune {
        /// The repository directory.
        #[arg(long, value_name = "DIR")]
        repo: PathBuf,
        /// Keep the newest N points of each VM.
        #[arg(long, value_name = "N")]
        keep_last: Option<usize>,
        /// Keep the newest point of each of the last N days that have one.
        #[arg(long, value_name = "N")]
        keep_daily: Option<usize>,
        /// Keep the newest point of each of the last N ISO weeks that have one.
        #[arg(long, value_name = "N")]
        keep_weekly: Option<usize>,
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
    /// Replace FILE if it exists.
    #[arg(long, requires = "to")]
    pub force: bool,
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

/// `dir` made absolute (the service may run in another directory).
fn absolute(dir: &std::path::Path) -> anyhow::Result<PathBuf> {
    std::path::absolute(dir).with_context(|| format!("invalid repository path {}", dir.display()))
}

fn open_repo(dir: &std::path::Path) -> anyhow::Result<Repository> {
    Repository::open(dir).with_context(|| format!("cannot open repository {}", dir.display()))
}

/// Runs `cbtsim backup ...`.
pub fn run(ctx: &Ctx, cmd: &BackupCmd) -> anyhow::Result<()> {
    match cmd {
        BackupCmd::Run(a) => {
            let req = Request::BackupRun {
                vm: a.vm.clone(),
                repository: absolute(&a.repo)?,
                full: a.full,
                no_compress: a.compression == CompressionArg::None,
            };
            let r = answer!(request(ctx, req, &bar())?, Response::Backup(b) => b);
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
                if r.healed_chunks > 0 {
                    println!(
                        "  stored again {} chunk(s) that verify had marked bad (older points that use them restore again)",
                        r.healed_chunks
                    );
                }
            }
        }
        BackupCmd::List { repo, json } => {
            let points = backup::list(&open_repo(repo)?)?;
            if *json {
                println!("{}", serde_json::to_string(&points)?);
            } else if points.is_empty() {
                println!("no restore points in {}", repo.display());
            } else {
                print_list(&points);
            }
        }
        BackupCmd::Verify {
            repo: dir,
            repair,
            json,
        } => {
            let repo = open_repo(dir)?;
            let r = backup::verify(&repo, &bar())?;
            let fixed: Option<RepairOutcome> = if *repair && !r.ok {
                drop(repo);
                let req = Request::BackupRepair {
                    repository: absolute(dir)?,
                };
                Some(answer!(request(ctx, req, &bar())?, Response::Repaired(f) => f))
            } else {
                None
            };
            if *json {
                #[derive(serde::Serialize)]
                struct Out<'a> {
                    #[serde(flatten)]
                    verify: &'a backup::VerifyReport,
                    repair: Option<&'a RepairOutcome>,
                }
                let out = Out {
                    verify: &r,
                    repair: fixed.as_ref(),
                };
                println!("{}", serde_json::to_string(&out)?);
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
                for m in &r.moved_aside {
                    println!("  moved aside: {m}");
                }
                for c in &r.bad_chunks {
                    println!("  chunk {c} is still marked bad");
                }
                for p in &r.corrupt_points {
                    println!("  corrupt point file {p}");
                }
                if let Some(f) = &fixed {
                    println!(
                        "  repair: {} of {} bad chunk(s) read again from the VMs ({} read)",
                        f.repaired.len(),
                        f.bad_chunks,
                        human(f.bytes_read)
                    );
                    for c in &f.unrepaired {
                        println!("  not repairable (no VM holds its data any more): {c}");
                    }
                }
                if r.ok {
                    println!("  ok");
                } else {
                    println!("  the next backup of each affected VM stores the bad chunks again (run one with --full to be sure)");
                }
            }
            let unrepaired = fixed.as_ref().map_or(usize::MAX, |f| f.unrepaired.len());
            if !r.ok && unrepaired > 0 {
                bail!(
                    "repository {} is damaged: {} corrupt and {} missing chunk(s) moved aside, {} marked bad before, {} corrupt point file(s); points affected: {}",
                    dir.display(),
                    r.corrupt_chunks.len(),
                    r.missing_chunks.len(),
                    r.bad_chunks.len(),
                    r.corrupt_points.len(),
                    r.affected_points.join(", ")
                );
            }
        }
        BackupCmd::Prune {
            repo,
            keep_last,
            keep_daily,
            keep_weekly,
            json,
        } => {
            let policy = PrunePolicy {
                keep_last: *keep_last,
                keep_daily: *keep_daily,
                keep_weekly: *keep_weekly,
            };
            let r = backup::prune(&open_repo(repo)?, &policy)?;
            if *json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "deleted {} point(s) [{}], kept {} [{}]; deleted {} chunk(s), freed {}",
                    r.deleted_points.len(),
                    r.deleted_points.join(", "),
                    r.kept_points,
                    r.kept.join(", "),
                    r.deleted_chunks,
                    human(r.freed_bytes)
                );
            }
        }
    }
    Ok(())
}

/// `backup list`, as a table.
fn print_list(points: &[PointListing]) {
    println!(
        "{:<9} {:<16} {:<11} {:<20} {:<9} {:<9} {:>10} {:>10} {:>10} {:>7}",
        "POINT", "VM", "KIND", "TIME (UTC)", "PARENT", "BASE", "SIZE", "DATA", "STORED", "SECONDS"
    );
    for p in points {
        let m = &p.meta;
        // The full point at the root of the chain, or "pruned" where a link is gone.
        let base = match (p.chain.last(), p.chain_pruned) {
            (_, true) => "pruned",
            (Some(b), false) => b.as_str(),
            (None, false) => "-",
        };
        println!(
            "{:<9} {:<16} {:<11} {:<20} {:<9} {:<9} {:>10} {:>10} {:>10} {:>7.2}",
            m.point,
            m.vm,
            m.kind,
            m.time_utc,
            m.parent.as_deref().unwrap_or("-"),
            base,
            human(p.disk_bytes),
            human(p.data_bytes),
            human(m.bytes_stored),
            m.seconds
        );
    }
}

/// Runs `cbtsim restore ...`.
pub fn restore(ctx: &Ctx, a: &RestoreArgs) -> anyhow::Result<()> {
    let bar = bar();
    let r: RestoreOutcome = match (&a.to, &a.to_vm, a.disk) {
        (Some(to), None, Some(disk)) => {
            // Only the repository and a file: no VM of the datastore is involved.
            let repo = open_repo(&a.repo)?;
            if !a.force && to.symlink_metadata().is_ok() {
                bail!("{} already exists; pass --force to replace it", to.display());
            }
            backup::restore_to_file(&repo, &a.point, disk, to, a.force, &bar)
                .with_context(|| format!("restore of point {} disk {disk} to {} failed", a.point, to.display()))?
                .into()
        }
        (None, Some(vm), None) => {
            let req = Request::RestoreToVm {
                repository: absolute(&a.repo)?,
                point: a.point.clone(),
                vm: vm.clone(),
            };
            // The datastore is created if missing, as `vm create` does.
            let r = Backend::open_or_create(ctx)?.call(req, &bar)?;
            answer!(r, Response::Restored(r) => r)
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
