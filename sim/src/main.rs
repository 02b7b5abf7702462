//! `cbtsim`: the command line of the simulated host. Thin: it parses
//! arguments, calls one library function per command and prints the result.

mod cli;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// A userspace simulator of an ESXi-style host with changed-block tracking.
#[derive(Debug, Parser)]
#[command(name = "cbtsim", version, about)]
struct Cli {
    /// The datastore directory holding the VMs.
    #[arg(long, global = true, env = "CBTSIM_DATASTORE", value_name = "DIR")]
    datastore: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// A narrated walk-through: write, snapshot, query, read back.
    Demo(cli::demo::DemoArgs),
}

fn main() -> ExitCode {
    let args = Cli::parse();
    let ctx = cli::Ctx {
        datastore: args.datastore,
    };
    let _ = &ctx;
    let result = match &args.cmd {
        Cmd::Demo(a) => cli::demo::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cbtsim: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
