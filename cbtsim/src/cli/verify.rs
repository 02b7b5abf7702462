//! `cbtsim verify`: runs [`harness::verify::run`] and prints its report; with `--kill`,
//! [`harness::verify::kill::run`], whose workers are this executable again
//! (`cbtsim verify --kill-worker DIR --seed S`, hidden from `--help`).

use std::path::{Path, PathBuf};

use super::progress::{catch_interrupts, Bar};
use super::{check_run_limits, scratch_dir, size_arg, Ctx};
use anyhow::{bail, Context as _};
use clap::Args;
use harness::verify::kill::{KillConfig, KillReport};
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
    /// The disk's initial size; it is extended up to twice that [default: 24M, with --kill 16M].
    #[arg(long, value_name = "SIZE")]
    pub disk_size: Option<String>,
    /// Tracking granularity [default: 64K, with --kill 16K].
    #[arg(long, value_name = "SIZE")]
    pub granularity: Option<String>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Kill real worker processes (SIGKILL) at random instants of their work, checking
    /// the VM after each kill; --threads is the workers' writer threads.
    #[arg(long, conflicts_with = "ops")]
    pub kill: bool,
    /// With --kill: stop after this many kills (default 100 when --seconds is not given).
    #[arg(long, value_name = "N", requires = "kill")]
    pub kills: Option<u64>,
    /// A worker of a --kill run (started by the run itself).
    #[arg(long, value_name = "DIR", hide = true, conflicts_with = "kill")]
    pub kill_worker: Option<PathBuf>,
}

/// Runs `cbtsim verify`. Its temporary datastore is made in `--datastore` when given
/// (else /dev/shm or the temporary directory) and removed at the end, on Ctrl-C too.
pub fn run(ctx: &Ctx, a: &VerifyArgs) -> anyhow::Result<()> {
    if let Some(dir) = &a.kill_worker {
        let seed = a.seed.context("--kill-worker needs --seed")?;
        harness::verify::kill::worker(dir, seed, &mut std::io::stdout().lock())?;
        return Ok(());
    }
    let (size_default, g_default) = if a.kill { ("16M", "16K") } else { ("24M", "64K") };
    let size = a.disk_size.as_deref().unwrap_or(size_default);
    let disk_size = size_arg("--disk-size", size)?;
    let g_arg = a.granularity.as_deref().unwrap_or(g_default);
    let g = size_arg("--granularity", g_arg)?;
    let granularity = Granularity::new(g).with_context(|| format!("invalid --granularity {g_arg:?}"))?;
    check_run_limits(a.threads, a.ops, a.seconds)?;
    let dir = scratch_dir(ctx)?;
    let seed = a.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    if a.kill {
        return run_kill(a, disk_size, granularity, seed, dir);
    }
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

/// `cbtsim verify --kill`.
fn run_kill(
    a: &VerifyArgs,
    disk_size: u64,
    granularity: Granularity,
    seed: u64,
    dir: Option<PathBuf>,
) -> anyhow::Result<()> {
    if a.kills == Some(0) {
        bail!("invalid --kills 0: give at least 1");
    }
    let cfg = KillConfig {
        kills: match (a.kills, a.seconds) {
            (None, None) => Some(100),
            (k, _) => k,
        },
        seconds: a.seconds,
        seed,
        disk_size,
        granularity,
        writers: a.threads,
        dir,
    };
    let exe = std::env::current_exe().context("cannot find this executable to start workers")?;
    let spawn = |dir: &Path, seed: u64| {
        let mut cmd = std::process::Command::new(&exe);
        cmd.env_remove("CBTSIM_DATASTORE")
            .args(["verify", "--kill-worker"])
            .arg(dir)
            .args(["--seed", &seed.to_string()]);
        cmd
    };
    const TEMPLATE: &str = "{elapsed_precise} {bar:30} {pos}/{len} {msg}";
    const UNKNOWN: &str = "{elapsed_precise} {pos} {msg}";
    catch_interrupts()?;
    let report = harness::verify::kill::run(&cfg, &spawn, &Bar::stderr(TEMPLATE, UNKNOWN))?;
    // A failed run ended at its violation: replay up to it.
    let mut replay = format!("replay the same rounds: cbtsim verify --kill --seed {}", report.seed);
    match (cfg.kills, cfg.seconds) {
        (Some(k), _) if report.passed => replay += &format!(" --kills {k}"),
        (None, Some(s)) if report.passed => replay += &format!(" --seconds {s}"),
        _ => replay += &format!(" --kills {}", report.kills),
    }
    replay += &format!(" --threads {}", cfg.writers);
    for (flag, value) in [("--disk-size", &a.disk_size), ("--granularity", &a.granularity)] {
        if let Some(v) = value {
            replay += &format!(" {flag} {v}");
        }
    }
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_kill(&report, &replay);
    }
    if report.interrupted {
        bail!(
            "interrupted after {} kills (seed {}); the temporary directory was removed",
            report.kills,
            report.seed
        );
    }
    if !report.passed {
        let first = report.violation_messages.first().map_or("", String::as_str);
        bail!(
            "verify --kill found {} violation(s), {} missed byte(s), {} lost byte(s); first: {first}; {replay}",
            report.violations,
            report.missed_bytes,
            report.lost_bytes
        );
    }
    Ok(())
}

fn print_kill(r: &KillReport, replay: &str) {
    println!(
        "verify --kill: seed {}, {} kills ({} chained: the next worker recovered), {} writer thread(s), {:.1} s",
        r.seed, r.kills, r.chained_kills, r.writers, r.seconds
    );
    let list = |m: &std::collections::BTreeMap<String, u64>| {
        m.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ")
    };
    println!("  aimed at: {}", list(&r.aimed_at));
    println!("  killed during: {}", list(&r.killed_during));
    println!("  operations started: {}", list(&r.ops_started));
    println!(
        "  {} checks against frozen images: {} missed bytes ({} blocks), {} over-reported bytes",
        r.checks, r.missed_bytes, r.missed_blocks, r.extra_bytes
    );
    let t = &r.reopen;
    println!(
        "  {} opens after a kill (recovery included): median {:.2} ms, p99 {:.2} ms, max {:.2} ms, mean {:.2} ms",
        t.count, t.median_ms, t.p99_ms, t.max_ms, t.mean_ms
    );
    println!(
        "  {} bytes read back after kills ({} checks of the whole disk; {} kills with a write in flight): {} lost",
        r.durable_bytes_checked, r.whole_disk_durability_checks, r.kills_mid_write, r.lost_bytes
    );
    println!(
        "  {} snapshots recorded, {} frozen re-reads; {} restore points checked ({} full), {} repository verifications; {} CBT toggles, {} expected TrackingReset",
        r.snapshots_seen, r.frozen_checks, r.points_checked, r.full_points, r.repository_verifies, r.cbt_toggles, r.expected_resets
    );
    if let Some(f) = &r.final_backup {
        println!(
            "  last backup: point {} {} ({}), read {} bytes; restore {}",
            f.point,
            f.kind,
            f.reason,
            f.bytes_read,
            if f.restored_identical {
                "byte-identical"
            } else {
                "DIFFERS"
            }
        );
    }
    for m in &r.violation_messages {
        println!("  VIOLATION: {m}");
    }
    if let Some(d) = &r.kept_dir {
        println!("  the run's directory is kept: {d}");
    }
    println!("{}", if r.passed { "PASSED" } else { "FAILED" });
    println!("{replay}");
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
