//! Options every benchmark binary takes.

use std::path::PathBuf;

use clap::Args;

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

    /// Checks the thread list.
    pub fn check(&self) -> anyhow::Result<()> {
        if self.threads.is_empty() || self.threads.contains(&0) {
            anyhow::bail!("--threads needs one or more counts of at least 1");
        }
        Ok(())
    }
}

/// Parses a size with an optional binary suffix (`512`, `4K`, `64G`, `2T`), for size options.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits);
    let num: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 4K, 64G, 2T)"))?;
    let shift = match unit.to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KIB" => 10,
        "M" | "MIB" => 20,
        "G" | "GIB" => 30,
        "T" | "TIB" => 40,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use K, M, G or T)")),
    };
    num.checked_mul(1 << shift).ok_or_else(|| format!("{s:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("4K"), Ok(4096));
        assert_eq!(parse_size("64g"), Ok(64 << 30));
        assert_eq!(parse_size("2T"), Ok(2 << 40));
        assert!(parse_size("2X").is_err());
        assert!(parse_size("T").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
