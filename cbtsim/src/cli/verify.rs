//! `cbtsim verify`: runs [`harness::verify::run`] and prints its report.

use super::progress::{catch_interrupts, Bar};
use super::{check_run_limits, scratch_dir, size_arg, Ctx};
use anyhow::{bail, Context as _};
use clap::Args;
use harness::verify::{VerifyConfig, VerifyReport};
use tracker::Granularity;

/// Arguments of `cbtsim verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Run this many seconds (default 10 when --ops is not given).
    #[arg(long, value_name = "N")]
    pub seconds: Option<f64>,
    /// Writer threads, 1 to 256; 1 runs everything on one thread, reproducibly.
    #[arg(long, value_name = "N", default_value_t = 2)]
    pub threads: u64,
    /// Seed of every random choice (default: from the clock, printed).
    #[arg(long, value_name = "N")]
    pub seed: Option<u64>,
    /// Stop after this many lifecycle operations.
    #[arg(long, value_name = "N")]
    pub ops: Option<u64>,
    /// The disk's initial size; it is extended up to twice that.
    #[arg(long, value_name = "SIZE", default_value = "24M")]
    pub disk_size: String,
    /// Tracking granularity.
    #[arg(long, value_name = "SIZE", default_value = "64K")]
    pub granularity: String,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Runs `cbtsim verify`. Its temporary datastore is made in `--datastore` when given
/// (else /dev/shm or the temporary directory) and removed at the end, on Ctrl-C too.
pub fn run(ctx: &Ctx, a: &VerifyArgs) -> anyhow::Result<()> {
    let disk_size = size_arg("--disk-size", &a.disk_size)?;
    let g = size_arg("--granularity", &a.granularity)?;
    let granularity = Granularity::new(g).with_context(|| format!("invalid --granularity {:?}", a.granularity))?;
    check_run_limits(a.threads, a.ops, a.seconds)?;
    let dir = scratch_dir(ctx)?;
    let seed = a.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    let cfg = VerifyConfig {
        seconds: match (a.seconds, a.ops) {
            (None, None) => Some(10.0),
            (s, _) => s,
        },
        ops: a.ops,
        threads: a.threads as usize,
        seed,
        disk_size,
        granularity,
        dir,
        ..VerifyConfig::default()
    };
    const TEMPLATE: &str = "{elapsed_precise} {bar:30} {msg}";
    catch_interrupts()?;
    let report = harness::verify::run(&cfg, &Bar::stderr(TEMPLATE, TEMPLATE))?;
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_human(&report);
    }
    if report.interrupted {
        bail!(
            "interrupted after {} operations (seed {}); the temporary datastore was removed",
            report.ops,
            report.seed
        );
    }
    if !report.passed {
        let first = report.violation_messages.first().map_or("", String::as_str);
        bail!(
            "verify found {} violation(s), {} missed block(s); first: {first} (seed {})",
            report.violations,
            report.missed_blocks,
            report.seed
        );
    }
    Ok(())
}

fn print_human(r: &VerifyReport) {
    println!(
        "verify: seed {}, {} writer thread(s), {:.1} s",
        r.seed, r.threads, r.seconds
    );
    let ops: Vec<String> = r.op_counts.iter().map(|(k, v)| format!("{k} {v}")).collect();
    println!("  {} lifecycle operations: {}", r.ops, ops.join(", "));
    println!(
        "  {} writes, {} unmaps; disk {} -> up to {} bytes, {} extends across a power of two",
        r.writes, r.unmaps, r.disk_size, r.max_disk_size, r.extends_across_pow2
    );
    println!(
        "  {} snapshots, {} checks against frozen views, {} frozen re-reads, {} exact-content checks",
        r.snapshots, r.checks, r.frozen_checks, r.data_checks
    );
    let exp: Vec<String> = r.expected.iter().map(|(k, v)| format!("{k} {v}")).collect();
    println!("  {} expected typed errors: {}", r.expected_errors, exp.join(", "));
    println!(
        "  stun ({} times): p50 {:.0} us, p99 {:.0} us, max {:.0} us",
        r.stuns, r.stun_p50_us, r.stun_p99_us, r.stun_max_us
    );
    println!(
        "  missed blocks {}, over-reported bytes {}, violations {}",
        r.missed_blocks, r.extra_bytes, r.violations
    );
    for m in &r.violation_messages {
        println!("  VIOLATION: {m}");
    }
    println!("{}", if r.passed { "PASSED" } else { "FAILED" });
}
