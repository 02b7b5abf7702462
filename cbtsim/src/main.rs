//! `cbtsim`: the command line of the simulated host. Thin: it parses
//! arguments, calls one library function per command and prints the result.
//! Sizes follow `workloads::size` (`64K`, `64KiB`, `2T`); long commands draw
//! one kind of progress bar (`cli::progress`) on a terminal.
//!
//! # Example
//! ```text
//! $ export CBTSIM_DATASTORE=/tmp/ds
//! $ cbtsim vm create web01 --disk 64M --disk 2T
//! created VM web01 with 2 disk(s): 64 MiB, 2 TiB (granularity 64 KiB, CBT on, powered on)
//! $ S1=$(cbtsim snapshot create web01 s1 --json | jq -r '.disks[0].change_id')
//! $ cbtsim disk write web01 0 1M 64KiB
//! $ cbtsim snapshot create web01 s2
//! $ cbtsim query web01 --snapshot s2 --since "$S1"
//! $ cbtsim map web01 --snapshot s2 --since "$S1" --svg web01.svg
//! $ cbtsim backup run web01 --repo /tmp/repo
//! ```

mod cli;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// A userspace simulator of an ESXi-style host with changed-block tracking.
#[derive(Debug, Parser)]
#[command(name = "cbtsim", version, about)]
struct Cli {
    /// The datastore directory holding the VMs. `replay`, `verify` and `demo` make their
    /// temporary datastore inside it (and remove it when they end).
    #[arg(long, global = true, env = "CBTSIM_DATASTORE", value_name = "DIR")]
    datastore: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// A narrated walk-through: write, snapshot, query, read back.
    Demo(cli::demo::DemoArgs),
    /// Back up VMs into a repository: run, list, verify, prune.
    #[command(subcommand)]
    Backup(cli::backup::BackupCmd),
    /// Restore a point's disk to an image file, or the whole point to a new VM.
    Restore(cli::backup::RestoreArgs),
    /// Create, list and configure VMs.
    #[command(subcommand)]
    Vm(cli::vm::VmCmd),
    /// Guest I/O on a VM's disk: write, read, unmap, extend.
    #[command(subcommand)]
    Disk(cli::disk::DiskCmd),
    /// Create, list, remove and revert to snapshots.
    #[command(subcommand)]
    Snapshot(cli::snapshot::SnapshotCmd),
    /// Mount a restore point's disks read-only as image files (FUSE), without restoring them.
    Mount(cli::mount::MountArgs),
    /// The changed areas of a snapshot's disk since a change ID (QueryChangedDiskAreas, paged).
    Query(cli::query::QueryArgs),
    /// A disk drawn as cells colored by the epoch (change ID) that last wrote them.
    Map(cli::map::MapArgs),
    /// A torture test: random lifecycle operations under concurrent writes, checked.
    Verify(cli::verify::VerifyArgs),
    /// Replay a block I/O trace into a fresh VM and report the changed areas.
    Replay(cli::workload::ReplayArgs),
    /// Run a scenario: a host of VMs running workload profiles, checked as they run.
    Run(cli::workload::RunArgs),
    /// Drive a VM of the datastore with a guest workload.
    #[command(subcommand)]
    Guest(cli::workload::GuestCmd),
    /// The named workload profiles.
    #[command(subcommand)]
    Workloads(cli::workload::WorkloadsCmd),
    /// Run the host as a service: HTTPS, NBD exports of the disks and snapshots, a control socket.
    Serve(cli::serve::ServeArgs),
}

fn main() -> ExitCode {
    let args = Cli::parse();
    let ctx = cli::Ctx {
        datastore: args.datastore,
    };
    let result = match &args.cmd {
        Cmd::Demo(a) => cli::demo::run(&ctx, a),
        Cmd::Backup(c) => cli::backup::run(&ctx, c),
        Cmd::Restore(a) => cli::backup::restore(&ctx, a),
        Cmd::Vm(c) => cli::vm::run(&ctx, c),
        Cmd::Disk(c) => cli::disk::run(&ctx, c),
        Cmd::Snapshot(c) => cli::snapshot::run(&ctx, c),
        Cmd::Query(a) => cli::query::run(&ctx, a),
        Cmd::Map(a) => cli::map::run(&ctx, a),
        Cmd::Mount(a) => cli::mount::run(a),
        Cmd::Verify(a) => cli::verify::run(&ctx, a),
        Cmd::Replay(a) => cli::workload::replay(&ctx, a),
        Cmd::Run(a) => cli::workload::run(&ctx, a),
        Cmd::Guest(c) => cli::workload::guest(&ctx, c),
        Cmd::Workloads(c) => cli::workload::workloads(c),
        Cmd::Serve(a) => cli::serve::run(&ctx, a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cbtsim: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
