//! `cbtsim demo`.

use clap::Args;

/// Arguments of `cbtsim demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Print the result as JSON after the narration.
    #[arg(long)]
    pub json: bool,
    /// Keep the datastore in this directory instead of a temporary one.
    #[arg(long)]
    pub keep: Option<std::path::PathBuf>,
}

pub fn run(args: &DemoArgs) -> anyhow::Result<()> {
    let tmp;
    let dir = match &args.keep {
        Some(d) => d.clone(),
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().join("datastore")
        }
    };
    let stdout = std::io::stdout();
    let mut out: Box<dyn std::io::Write> = if args.json {
        Box::new(std::io::stderr())
    } else {
        Box::new(stdout.lock())
    };
    let report = harness::demo::run(&dir, &mut out)?;
    drop(out);
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    }
    Ok(())
}
