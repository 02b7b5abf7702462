//! Command handlers of the `cbtsim` binary: argument structs, output
//! formatting, and one library call each. No tracking logic lives here.

pub mod backup;
pub mod demo;
pub mod host;
pub mod serve;
pub mod verify;
pub mod workload;

use std::path::PathBuf;

use anyhow::{bail, Context as _};
use sim::Host;

/// What every command gets from the top-level arguments.
#[derive(Debug, Clone)]
pub struct Ctx {
    /// `--datastore` / `CBTSIM_DATASTORE`.
    pub datastore: Option<PathBuf>,
}

impl Ctx {
    /// Opens the datastore, or says how to name one.
    pub fn host(&self) -> anyhow::Result<Host> {
        let Some(dir) = &self.datastore else {
            bail!("no datastore: pass --datastore DIR or set CBTSIM_DATASTORE");
        };
        Host::open(dir).with_context(|| format!("cannot open datastore {}", dir.display()))
    }
}

/// Parses a size with an optional binary suffix: `512`, `64K`, `2T`, `1.5G` is refused.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                'B' => 1,
                _ => return Err(format!("invalid size {s:?}: unknown suffix {c:?} (use K, M, G or T)")),
            };
            (&t[..i], m)
        }
        _ => (t, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid size {s:?}: expected a whole number with an optional K/M/G/T suffix"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("invalid size {s:?}: too large"))
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("2t"), Ok(2 << 40));
        assert!(parse_size("1.5G").is_err());
        assert!(parse_size("12Q").unwrap_err().contains("suffix"));
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
