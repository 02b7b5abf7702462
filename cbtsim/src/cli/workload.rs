//! `cbtsim replay`, `cbtsim run`, `cbtsim guest run` and `cbtsim workloads list`.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::{Args, Subcommand};
use harness::drive::{DriveReport, OpCounts};
use harness::replay::{self, ReplayOptions, ReplayReport};
use harness::scenario::{self, Scenario, ScenarioReport};
use indicatif::{MultiProgress, ProgressDrawTarget};
use service::{GuestReport, GuestRun, GuestState, Request, Response};
use tracker::Granularity;
use workloads::{human, parse_size, TraceFormat};

use super::dispatch::{answer, request, Backend};
use super::progress::{catch_interrupts, interrupted, Bar};
use super::{check_run_limits, print_json, scratch_dir, Ctx};

/// Arguments of `cbtsim replay`.
#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// The trace file.
    pub trace: PathBuf,
    /// Its format: msr, vscsi, cloudphysics-csv, blkparse, fio-iolog, alibaba or tencent.
    #[arg(long, value_parser = parse_format)]
    pub format: TraceFormat,
    /// The disk's size (default: the smallest multiple of the granularity covering the trace).
    #[arg(long, value_parser = parse_size, value_name = "SIZE")]
    pub disk_size: Option<u64>,
    /// The tracking granularity.
    #[arg(long, value_parser = parse_size, default_value = "64K", value_name = "SIZE")]
    pub granularity: u64,
    /// Replay only this device's records (MSR host_disk, blkparse major,minor, ...).
    #[arg(long, value_name = "ID")]
    pub device: Option<String>,
    /// Skip malformed lines (and count them) instead of failing.
    #[arg(long)]
    pub skip_bad: bool,
    /// Print one JSON document.
    #[arg(long)]
    pub json: bool,
}

fn parse_format(s: &str) -> Result<TraceFormat, String> {
    s.parse().map_err(|e: workloads::TraceError| e.to_string())
}

/// Arguments of `cbtsim run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The scenario file (TOML), or the name of a built-in one: teaching, databases,
    /// edge-cases, host-32, profiles-1m, vdi-morning (the files of scenarios/, built
    /// into the binary, so `cbtsim run teaching` works from any directory).
    pub scenario: PathBuf,
    /// Print one JSON document.
    #[arg(long)]
    pub json: bool,
}

/// `cbtsim guest ...`.
#[derive(Debug, Subcommand)]
pub enum GuestCmd {
    /// Run a workload profile on a VM of the datastore (inside its `cbtsim serve` when one
    /// runs; Ctrl-C stops the workload and prints its report so far).
    Run(GuestRunArgs),
    /// The guest workloads of the running `cbtsim serve` (running ones first).
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Stop a guest workload of the running `cbtsim serve` and print its report.
    Stop {
        /// The workload's ID, or a VM (its one running workload).
        target: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Arguments of `cbtsim guest run`.
#[derive(Debug, Args)]
pub struct GuestRunArgs {
    /// The VM.
    pub vm: String,
    /// The workload profile (see `cbtsim workloads list`).
    #[arg(long)]
    pub profile: String,
    /// Ops to run, all threads together (default 10000; with --detach: until stopped).
    #[arg(long, conflicts_with = "seconds")]
    pub ops: Option<u64>,
    /// Run for this many seconds instead.
    #[arg(long)]
    pub seconds: Option<f64>,
    /// vCPU threads, 1 to 256.
    #[arg(long, default_value_t = 1)]
    pub threads: u32,
    /// The workload's seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The disk to drive.
    #[arg(long, default_value_t = 0)]
    pub disk: usize,
    /// Check the tracker with a shadow model: a snapshot before, at the end and every
    /// --snapshot-every ops (each removed after its query).
    #[arg(long)]
    pub verify: bool,
    /// With --verify: ops between snapshots.
    #[arg(long, requires = "verify")]
    pub snapshot_every: Option<u64>,
    /// Start the workload inside the running `cbtsim serve` and return at once, printing
    /// its ID (`guest list`, `guest stop` manage it).
    #[arg(long)]
    pub detach: bool,
    /// Print one JSON document.
    #[arg(long)]
    pub json: bool,
}

/// `cbtsim workloads ...`.
#[derive(Debug, Subcommand)]
pub enum WorkloadsCmd {
    /// List the workload profiles.
    List {
        /// Print one JSON document.
        #[arg(long)]
        json: bool,
    },
}

/// `N writes SIZE, N reads SIZE, N unmaps SIZE, N flushes, N extends`.
fn op_kinds(c: &OpCounts) -> String {
    format!(
        "{} writes {}, {} reads {}, {} unmaps {}, {} flushes, {} extends",
        c.writes,
        human(c.bytes_written),
        c.reads,
        human(c.bytes_read),
        c.unmaps,
        human(c.bytes_unmapped),
        c.flushes,
        c.extends
    )
}

fn pct(share: f64) -> String {
    format!("{:.3}%", share * 100.0)
}

/// Runs `cbtsim replay`. Its temporary datastore is made in `--datastore` when given
/// (else the temporary directory) and removed at the end, on Ctrl-C too.
pub fn replay(ctx: &Ctx, a: &ReplayArgs) -> anyhow::Result<()> {
    let granularity =
        Granularity::new(a.granularity).with_context(|| format!("invalid --granularity {}", a.granularity))?;
    let opts = ReplayOptions {
        disk_size: a.disk_size,
        granularity,
        device: a.device.clone(),
        skip_bad: a.skip_bad,
        workdir: scratch_dir(ctx)?,
    };
    const SPINNER: &str = "{spinner} {elapsed_precise} {pos} records replayed";
    let bar = Bar::stderr(SPINNER, SPINNER).ticking(Duration::from_millis(200));
    catch_interrupts()?;
    let r = replay::replay_trace(&a.trace, a.format, &opts, &bar)?;
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        print_replay(a, &r);
    }
    if r.missed_blocks > 0 {
        bail!("{} changed blocks are missing from the changed areas", r.missed_blocks);
    }
    Ok(())
}

fn print_replay(a: &ReplayArgs, r: &ReplayReport) {
    println!(
        "replayed {} ({}) on a {} disk ({} bytes), granularity {}",
        a.trace.display(),
        a.format,
        human(r.disk_size),
        r.disk_size,
        human(r.granularity)
    );
    println!(
        "  {} writes ({}), {} discards ({}); {} reads and {} flushes not replayed; {} bad lines skipped, {} other records",
        r.writes,
        human(r.bytes_written),
        r.discards,
        human(r.bytes_discarded),
        r.reads,
        r.flushes,
        r.skipped_lines,
        r.ignored_records
    );
    println!(
        "  changed since {}: {} areas, {} ({} bytes, {} of the disk)",
        r.change_id,
        r.changed_areas.len(),
        human(r.changed_bytes),
        r.changed_bytes,
        pct(r.changed_bytes as f64 / r.disk_size as f64)
    );
    println!(
        "  truly changed {} -> over-report {:.3}x; missed blocks {}",
        human(r.true_changed_bytes),
        r.over_report_ratio,
        r.missed_blocks
    );
    for (s, l) in r.changed_areas.iter().take(10) {
        println!("    [{s:>15} .. {:>15})  {}", s + l, human(*l));
    }
    if r.changed_areas.len() > 10 {
        println!("    ... {} more (--json lists all)", r.changed_areas.len() - 10);
    }
    println!(
        "  time: scan {:.2} s, replay {:.2} s, query {:.3} s, total {:.2} s",
        r.scan_seconds, r.replay_seconds, r.query_seconds, r.seconds
    );
}

/// Progress bars of a scenario: one per VM, on stderr, while it is a terminal.
fn bars(s: &Scenario) -> (Option<MultiProgress>, Vec<Bar>) {
    if !std::io::stderr().is_terminal() {
        return (None, s.vms.iter().map(|_| Bar::hidden()).collect());
    }
    let mp = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
    let width = s.vms.iter().map(|v| v.name.len()).max().unwrap_or(4);
    let known = format!("{{prefix:{width}}} {{bar:30}} {{pos}}/{{len}} ops {{per_sec}} {{msg}}");
    let unknown = format!("{{prefix:{width}}} {{spinner}} {{elapsed}} {{pos}} ops {{per_sec}} {{msg}}");
    let bars = s.vms.iter().map(|_| Bar::in_multi(&mp, &known, &unknown)).collect();
    (Some(mp), bars)
}

/// The scenarios of the repository's scenarios/ directory, built in.
const BUILT_IN: [(&str, &str); 6] = [
    ("teaching", include_str!("../../../scenarios/teaching.toml")),
    ("databases", include_str!("../../../scenarios/databases.toml")),
    ("edge-cases", include_str!("../../../scenarios/edge-cases.toml")),
    ("host-32", include_str!("../../../scenarios/host-32.toml")),
    ("profiles-1m", include_str!("../../../scenarios/profiles-1m.toml")),
    ("vdi-morning", include_str!("../../../scenarios/vdi-morning.toml")),
];

/// The scenario at `path`, or the built-in one it names (`teaching`, `teaching.toml` or
/// `scenarios/teaching.toml` where no such file exists).
fn load_scenario(path: &std::path::Path) -> anyhow::Result<Scenario> {
    if path.exists() {
        return Ok(Scenario::load(path)?);
    }
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or_default();
    let under_scenarios = path
        .parent()
        .is_none_or(|p| p.as_os_str().is_empty() || p.ends_with("scenarios"));
    let ext_ok = path.extension().is_none_or(|e| e == "toml");
    match BUILT_IN.iter().find(|(name, _)| *name == stem) {
        Some((name, text)) if under_scenarios && ext_ok => {
            let mut s = Scenario::parse(text, &format!("{name}.toml (built in)"))?;
            if s.name.is_empty() {
                s.name = (*name).to_owned();
            }
            Ok(s)
        }
        _ => {
            let names: Vec<&str> = BUILT_IN.iter().map(|(n, _)| *n).collect();
            bail!(
                "no scenario file {} and no built-in scenario of that name (built in: {})",
                path.display(),
                names.join(", ")
            )
        }
    }
}

/// Runs `cbtsim run`.
pub fn run(ctx: &Ctx, a: &RunArgs) -> anyhow::Result<()> {
    let s = load_scenario(&a.scenario)?;
    let tmp;
    let dir = match &ctx.datastore {
        Some(d) => d.clone(),
        None => {
            tmp = tempfile::Builder::new().prefix("cbtsim-run-").tempdir()?;
            tmp.path().to_owned()
        }
    };
    let (mp, bars) = bars(&s);
    let r = scenario::run(&s, &dir, &|i| &bars[i]);
    if let Some(mp) = mp {
        let _ = mp.clear();
    }
    let r = r?;
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        print_scenario(&s, &r);
    }
    if r.missed_blocks > 0 {
        bail!(
            "{} changed blocks were missing from the tracker's answers",
            r.missed_blocks
        );
    }
    if r.backup_mismatched_bytes > 0 {
        bail!(
            "{} bytes of the restored final backups differ from the VMs' disks",
            r.backup_mismatched_bytes
        );
    }
    Ok(())
}

fn print_scenario(s: &Scenario, r: &ScenarioReport) {
    println!(
        "scenario {:?}: {} VMs, {} vCPU threads, {:.1} s",
        r.name, r.vm_count, r.threads, r.elapsed_s
    );
    if !s.description.is_empty() {
        println!("  {}", s.description);
    }
    println!("  {} ops ({:.0}/s): {}", r.counts.ops, r.ops_per_s, op_kinds(&r.counts));
    let l = &r.write_latency;
    println!(
        "  write latency p50 {:.1} us, p99 {:.1} us, p99.9 {:.1} us, max {:.1} us",
        l.p50_us, l.p99_us, l.p999_us, l.max_us
    );
    println!(
        "  {} epochs checked; changed since the first change IDs {} vs {} truly changed: over-report {:.3}x; missed blocks {}",
        r.epochs_checked,
        human(r.changed_bytes),
        human(r.true_changed_bytes),
        r.over_report_ratio,
        r.missed_blocks
    );
    if r.backups > 0 {
        let stored: u64 = r.vms.iter().flat_map(|v| &v.backups).map(|b| b.bytes_stored).sum();
        println!(
            "  {} backups ({} stored by the scheduled ones); final backups restored and compared: {} differing bytes",
            r.backups,
            human(stored),
            r.backup_mismatched_bytes
        );
    }
    let epoch_lines: usize = r.vms.iter().flat_map(|v| &v.disks).map(|d| d.epochs.len()).sum();
    for v in &r.vms {
        print_vm(v, epoch_lines <= 40);
    }
}

fn print_vm(v: &DriveReport, each_epoch: bool) {
    let l = &v.write_latency;
    println!(
        "  {}: {} ops, {} written, write p50/p99/p99.9 {:.1}/{:.1}/{:.1} us, stun p99 {:.1} us, missed {}",
        v.vm,
        v.counts.ops,
        human(v.counts.bytes_written),
        l.p50_us,
        l.p99_us,
        l.p999_us,
        v.stun.p99_us,
        v.missed_blocks
    );
    for d in &v.disks {
        if let Some(c) = d.cumulative {
            println!(
                "    disk {} {} ({}, {} blocks, {} threads): changed {} = {} of the disk, over-report {:.3}x",
                d.disk,
                d.profile,
                human(d.capacity),
                human(d.granularity),
                d.threads,
                human(c.changed_bytes),
                pct(c.share_of_disk),
                c.over_report_ratio
            );
        }
        if each_epoch {
            for e in &d.epochs {
                println!(
                    "      epoch {:>3}: {:>8} ops, changed {:>10} = {:>8} of the disk, over-report {:.3}x, missed {}",
                    e.epoch,
                    e.ops,
                    human(e.check.changed_bytes),
                    pct(e.check.share_of_disk),
                    e.check.over_report_ratio,
                    e.check.missed_blocks
                );
            }
        } else if !d.epochs.is_empty() {
            let n = d.epochs.len() as f64;
            let mean = d.epochs.iter().map(|e| e.check.changed_bytes as f64).sum::<f64>() / n;
            let max = d.epochs.iter().map(|e| e.check.share_of_disk).fold(0.0, f64::max);
            println!(
                "      {} epochs: mean changed {} per epoch, largest {} of the disk (--json lists each)",
                d.epochs.len(),
                human(mean as u64),
                pct(max)
            );
        }
    }
}

/// Runs `cbtsim guest ...`.
pub fn guest(ctx: &Ctx, cmd: &GuestCmd) -> anyhow::Result<()> {
    match cmd {
        GuestCmd::Run(a) => guest_run(ctx, a),
        GuestCmd::List { json } => {
            let list = answer!(request(ctx, Request::GuestList {}, &())?, Response::Guests(g) => g);
            if *json {
                println!("{}", serde_json::to_string(&list)?);
            } else if list.is_empty() {
                println!("no guest workloads");
            } else {
                println!(
                    "{:>4}  {:<16} {:<18} {:>4}  {:<8} {:>12} {:>9}",
                    "ID", "VM", "PROFILE", "DISK", "STATE", "OPS", "SECONDS"
                );
                for g in &list {
                    println!(
                        "{:>4}  {:<16} {:<18} {:>4}  {:<8} {:>12} {:>9.1}",
                        g.id,
                        g.vm,
                        g.profile,
                        g.disk,
                        state_name(g.state),
                        g.ops,
                        g.seconds
                    );
                }
            }
            Ok(())
        }
        GuestCmd::Stop { target, json } => {
            let backend = Backend::open(ctx)?;
            let id = match target.trim().parse::<u64>() {
                Ok(id) => id,
                Err(_) => running_on(&backend, target)?,
            };
            let r = backend.call(Request::GuestStop { id }, &())?;
            let report = answer!(r, Response::Guest(g) => g);
            if *json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print_guest(&report);
            }
            Ok(())
        }
    }
}

/// The one running guest workload of VM `vm`.
fn running_on(backend: &Backend, vm: &str) -> anyhow::Result<u64> {
    let list = answer!(backend.call(Request::GuestList {}, &())?, Response::Guests(g) => g);
    let ids: Vec<u64> = list
        .iter()
        .filter(|g| g.vm == vm && g.state == GuestState::Running)
        .map(|g| g.id)
        .collect();
    match ids[..] {
        [id] => Ok(id),
        [] => bail!("no guest workload runs on VM {vm:?}"),
        _ => bail!(
            "{} guest workloads run on VM {vm:?} (IDs {}): give an ID",
            ids.len(),
            ids.iter().map(u64::to_string).collect::<Vec<_>>().join(", ")
        ),
    }
}

fn state_name(s: GuestState) -> &'static str {
    match s {
        GuestState::Running => "running",
        GuestState::Finished => "finished",
        GuestState::Stopped => "stopped",
        GuestState::Failed => "failed",
    }
}

fn print_guest(r: &GuestReport) {
    println!(
        "guest workload {} on VM {}: profile {} on disk {}, {} threads, {}, {:.2} s, {:.0} ops/s",
        r.id,
        r.vm,
        r.profile,
        r.disk,
        r.threads,
        state_name(r.state),
        r.elapsed_s,
        r.ops_per_s
    );
    println!(
        "  {} ops: {} writes {}, {} reads, {} unmaps, {} flushes",
        r.ops,
        r.writes,
        human(r.bytes_written),
        r.reads,
        r.unmaps,
        r.flushes
    );
    let [p50, p99, p999, max] = r.write_latency_us;
    println!("  write latency p50 {p50:.1} us, p99 {p99:.1} us, p99.9 {p999:.1} us, max {max:.1} us");
    if r.epochs_checked > 0 {
        println!(
            "  verified: {} epochs checked against the shadow model; missed blocks {}",
            r.epochs_checked, r.missed_blocks
        );
    }
}

/// Runs `cbtsim guest run`: the workload runs inside the service (the datastore's serve,
/// or one of this process), started detached and then waited for, so that Ctrl-C can stop
/// it by its ID.
fn guest_run(ctx: &Ctx, a: &GuestRunArgs) -> anyhow::Result<()> {
    check_run_limits(u64::from(a.threads), a.ops, a.seconds)?;
    if a.snapshot_every == Some(0) {
        bail!("invalid --snapshot-every 0: give at least 1");
    }
    let backend = Backend::open(ctx)?;
    if a.detach && !backend.is_serve() {
        bail!(
            "--detach needs a running host: start `cbtsim serve` on this datastore (a detached workload runs inside it)"
        );
    }
    let ops = match (a.ops, a.seconds, a.detach) {
        (None, None, false) => Some(10_000),
        (ops, _, _) => ops,
    };
    let run = GuestRun {
        vm: a.vm.clone(),
        profile: a.profile.clone(),
        disk: a.disk,
        threads: a.threads,
        seed: a.seed,
        ops,
        seconds: a.seconds,
        verify: a.verify,
        snapshot_every: a.snapshot_every,
        detach: true,
    };
    if !a.detach {
        // Caught before the start, so that no Ctrl-C leaves the workload running.
        catch_interrupts()?;
    }
    let r = backend.call(Request::GuestRun(run), &())?;
    let (id, vm) = answer!(r, Response::GuestStarted { id, vm } => (id, vm));
    if a.detach {
        if a.json {
            print_json(&serde_json::json!({ "id": id, "vm": vm }))?;
        } else {
            println!("guest workload {id} runs on VM {vm} (cbtsim guest stop {id} stops it)");
        }
        return Ok(());
    }
    const TEMPLATE: &str = "{elapsed_precise} {bar:30} {pos} ops {per_sec}";
    const SPINNER: &str = "{elapsed_precise} {spinner} {pos} ops {per_sec}";
    let bar = Bar::stderr(TEMPLATE, SPINNER).ticking(Duration::from_millis(200));
    let waited = AtomicBool::new(false);
    let report = std::thread::scope(|s| {
        // Ctrl-C (or SIGTERM) stops the workload; its report comes back to the wait.
        s.spawn(|| {
            while !waited.load(Ordering::Relaxed) {
                if interrupted() {
                    let _ = backend.call(Request::GuestStop { id }, &());
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        let r = backend.call(Request::GuestWait { id }, &bar);
        waited.store(true, Ordering::Relaxed);
        r
    })?;
    let report = answer!(report, Response::Guest(g) => g);
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_guest(&report);
    }
    if interrupted() {
        bail!("interrupted: guest workload {id} on VM {vm} was stopped");
    }
    if let Some(e) = &report.error {
        bail!("guest workload {id} on VM {vm} failed: {e}");
    }
    Ok(())
}

/// Runs `cbtsim workloads ...`.
pub fn workloads(cmd: &WorkloadsCmd) -> anyhow::Result<()> {
    let WorkloadsCmd::List { json } = cmd;
    let list = workloads::profiles();
    if *json {
        println!("{}", serde_json::to_string(list)?);
        return Ok(());
    }
    for p in list {
        println!("{:<18} {}", p.name, p.description);
        println!("{:<18} parameters: {}", "", p.parameters);
        println!("{:<18} source: {}", "", p.source);
    }
    Ok(())
}
