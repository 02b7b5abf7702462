//! `cbtsim demo`.

use anyhow::Context as _;
use clap::Args;

use super::{scratch_dir, Ctx};

/// Arguments of `cbtsim demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Print the result as JSON after the narration.
    #[arg(long)]
    pub json: bool,
    /// Keep the datastore in this directory instead of a temporary one.
    #[arg(long)]
    pub keep: Option<std::path::PathBuf>,
    /// Show the disk's map after the steps that change it (the default when
    /// stdout is a terminal and without --json).
    #[arg(long)]
    pub map: bool,
}

/// Runs `cbtsim demo`: its datastore is `--keep DIR` (kept), else a temporary one made in
/// `--datastore` when given (else the temporary directory) and removed at the end.
pub fn run(ctx: &Ctx, args: &DemoArgs) -> anyhow::Result<()> {
    let tmp;
    let dir = match &args.keep {
        Some(d) => d.clone(),
        None => {
            let b = tempfile::Builder::new().prefix("cbtsim-demo-").clone();
            tmp = match scratch_dir(ctx)? {
                Some(d) => b.tempdir_in(&d),
                None => b.tempdir(),
            }
            .context("cannot create a temporary datastore")?;
            tmp.path().join("datastore")
        }
    };
    let stdout = std::io::stdout();
    let mut out: Box<dyn std::io::Write> = if args.json {
        Box::new(std::io::stderr())
    } else {
        Box::new(stdout.lock())
    };
    let maps = args.map || (!args.json && std::io::IsTerminal::is_terminal(&std::io::stdout()));
    let report = harness::demo::run_with_maps(&dir, &mut out, maps)?;
    drop(out);
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    }
    Ok(())
}
