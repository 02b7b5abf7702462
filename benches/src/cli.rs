//! Options every benchmark binary takes.

use std::path::PathBuf;

use clap::Args;

/// The size parser of every size option ([`workloads::size`]'s grammar).
pub use workloads::parse_size;

/// `--quick`, `--json`, `--threads`, `--dir`.
#[derive(Debug, Clone, Args)]
pub struct Common {
    /// A smoke run: fewer and shorter rounds, smaller sizes (under a minute on 2 cores).
    #[arg(long)]
    pub quick: bool,
    /// Print one JSON object per result line instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Thread counts to measure, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    pub threads: Vec<usize>,
    /// Directory for the benchmark's sparse files (default: /dev/shm when it
    /// exists, so page writeback does not add noise; else the temp dir).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Also draw the results as SVG charts into this directory (created if missing).
    #[arg(long, value_name = "DIR")]
    pub charts: Option<PathBuf>,
}

impl Common {
    /// Where to put in-memory benchmark files: `--dir`, else /dev/shm, else the temp dir.
    pub fn mem_dir(&self) -> PathBuf {
        self.dir.clone().unwrap_or_else(|| {
            let shm = PathBuf::from("/dev/shm");
            if shm.is_dir() {
                shm
            } else {
                std::env::temp_dir()
            }
        })
    }

    /// Where to put files that should live on a real file system: `--dir`, else the temp dir.
    pub fn disk_dir(&self) -> PathBuf {
        self.dir.clone().unwrap_or_else(std::env::temp_dir)
    }

    /// The chart directory, created, if `--charts` was given.
    pub fn chart_dir(&self) -> anyhow::Result<Option<PathBuf>> {
        match &self.charts {
            Some(d) => {
                std::fs::create_dir_all(d).map_err(|e| anyhow::anyhow!("--charts {}: {e}", d.display()))?;
                Ok(Some(d.clone()))
            }
            None => Ok(None),
        }
    }

    /// Checks the thread list.
    pub fn check(&self) -> anyhow::Result<()> {
        if self.threads.is_empty() || self.threads.contains(&0) {
            anyhow::bail!("--threads needs one or more counts of at least 1");
        }
        Ok(())
    }
}
