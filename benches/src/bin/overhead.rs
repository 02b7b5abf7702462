//! `overhead`: write-path throughput with tracking off (`()`) and on (ours),
//! and the baselines (QEMU-style locked bitmap, libvirt-style bitmap per
//! change ID), A/B interleaved in one process, every write through `sim`'s
//! real write path (`Vm::write_with`). `--durable`: off, ours and ours with
//! durable (power-loss safe) tracking instead. See `benches/README.md`.

use benches::baselines::{LockedBitmap, PerChangeIdBitmaps};
use benches::charts;
use benches::cli::{parse_size, Common};
use benches::report::{Report, Row};
use benches::stats::{median, quantile, ratios, verdict_at_least};
use benches::variant::{OwnedTracker, Variant};
use benches::writepath::{bytes_of, measure, profile_writes, random_4k, sequential, source, summarise, BenchVm, Write};
use benches::{human_size, MIB};
use clap::Parser;
use tracker::TrackerOptions;

/// Write-path throughput, tracking off vs on, and the baselines, interleaved.
#[derive(Debug, Parser)]
#[command(name = "overhead")]
struct Opts {
    #[command(flatten)]
    common: Common,
    /// Disk sizes, comma separated: every case runs on a VM disk of each size.
    #[arg(long, value_parser = parse_size, value_delimiter = ',', default_value = "1G,1T")]
    disk_sizes: Vec<u64>,
    /// Tracking granularity.
    #[arg(long, value_parser = parse_size, default_value = "64K")]
    granularity: u64,
    /// Rounds per case [default: 21, 7 with --quick].
    #[arg(long)]
    rounds: Option<usize>,
    /// Bytes each thread writes per round [default: 64M, 16M with --quick].
    #[arg(long, value_parser = parse_size)]
    round_bytes: Option<u64>,
    /// Cases: 4k-random, 64k-seq and profile names, comma separated [default: all].
    #[arg(long, value_delimiter = ',')]
    cases: Vec<String>,
    /// Time one write in this many for the latency histogram.
    #[arg(long, default_value_t = 16)]
    sample_every: usize,
    /// Durable tracking's cost instead of the baselines: off, ours and
    /// ours-durable side by side (cases 4k-random and 64k-seq unless --cases).
    #[arg(long)]
    durable: bool,
    /// With --durable: where the trackers' files go [default: the temp dir,
    /// a real file system, since what durable tracking costs is its syncs].
    #[arg(long)]
    ctk_dir: Option<std::path::PathBuf>,
}

const RANDOM: &str = "4k-random";
const SEQ: &str = "64k-seq";

fn streams(case: &str, disk: u64, threads: usize, round_bytes: u64) -> anyhow::Result<Vec<Vec<Write>>> {
    (0..threads)
        .map(|t| match case {
            RANDOM => Ok(random_4k(disk, (round_bytes / 4096) as usize, 1000 + t as u64)),
            SEQ => {
                let start = disk / threads as u64 * t as u64 / 65536 * 65536;
                Ok(sequential(disk, start, 65536, (round_bytes / 65536) as usize))
            }
            name => profile_writes(name, disk, t as u32, round_bytes),
        })
        .collect()
}

fn main() -> anyhow::Result<()> {
    let o = Opts::parse();
    o.common.check()?;
    let quick = o.common.quick;
    let rounds = o.rounds.unwrap_or(if quick { 7 } else { 21 }).max(1);
    let round_bytes = o.round_bytes.unwrap_or(if quick { 16 * MIB } else { 64 * MIB });
    if o.durable {
        return durable(&o, rounds, round_bytes);
    }
    let cases: Vec<String> = if o.cases.is_empty() {
        [RANDOM, SEQ]
            .into_iter()
            .map(String::from)
            .chain(workloads::profiles().iter().map(|p| p.name.to_string()))
            .collect()
    } else {
        o.cases.clone()
    };
    let dir = o.common.mem_dir();
    let mut rep = Report::new("overhead", o.common.json);
    rep.note(&format!(
        "overhead: VM disks {} in {}, granularity {}, {rounds} rounds of {} per thread, threads {:?}",
        o.disk_sizes
            .iter()
            .map(|&d| human_size(d))
            .collect::<Vec<_>>()
            .join(","),
        dir.display(),
        human_size(o.granularity),
        human_size(round_bytes),
        o.common.threads
    ));
    let g = o.granularity;
    let mut goals = Vec::new();
    rep.section(
        "write path (ratio: wall-time throughput / tracking off; cpu_ratio: the same per CPU-second, \
         cpu_q1/cpu_q3 its quartiles over rounds; vs_ours: cpu_ratio against ours)",
    );
    for &cap in &o.disk_sizes {
        let variants = [
            Variant::Off,
            Variant::Ours(Box::new(OwnedTracker::create(&dir, cap, g, 0)?)),
            Variant::Locked(LockedBitmap::new(cap, g)),
            Variant::PerChangeId(PerChangeIdBitmaps::new(cap, g, 1)),
            Variant::PerChangeId(PerChangeIdBitmaps::new(cap, g, 8)),
            Variant::PerChangeId(PerChangeIdBitmaps::new(cap, g, 64)),
        ];
        for case in &cases {
            let with_baselines = case == RANDOM || case == SEQ;
            let used = if with_baselines { &variants[..] } else { &variants[..2] };
            // A fresh VM per case: the disk holds only the pages this case's
            // streams touch (faulted in by the warm-up round).
            let bench = BenchVm::create(&dir, cap, g)?;
            for &threads in &o.common.threads {
                let s = streams(case, cap, threads, round_bytes)?;
                let longest = s.iter().flatten().map(|&(_, l)| l as usize).max().unwrap_or(4096);
                let src = source(longest);
                let bytes: u64 = s.iter().map(|x| bytes_of(x)).sum();
                let writes: u64 = s.iter().map(|x| x.len() as u64).sum();
                let m = measure(used, &bench.vm, &s, &src, rounds, o.sample_every)?;
                let off_ns = summarise(&m, 0, 0, 1, bytes, writes).cpu_ns_per_write;
                for (i, v) in used.iter().enumerate() {
                    let sm = summarise(&m, i, 0, 1, bytes, writes);
                    let h = &m[i].hist;
                    rep.push(
                        Row::new()
                            .text("case", case.as_str())
                            .text("disk", human_size(cap))
                            .int("threads", threads as u64)
                            .text("tracker", v.name())
                            .num("mib_s", sm.mib_s)
                            .num("ratio", sm.ratio)
                            .num("cpu_ratio", sm.cpu_ratio)
                            .num("cpu_q1", sm.cpu_q1)
                            .num("cpu_q3", sm.cpu_q3)
                            .num("vs_ours", sm.vs_ref)
                            .num("cpu_ns_write", sm.cpu_ns_per_write)
                            .num("net_ns_write", sm.cpu_ns_per_write - off_ns)
                            .int("p50_ns", h.value_at_quantile(0.5))
                            .int("p99_ns", h.value_at_quantile(0.99))
                            .int("p999_ns", h.value_at_quantile(0.999))
                            .int("rounds", rounds as u64),
                    );
                    if i == 1 && (case == RANDOM || case == SEQ) {
                        let target = if case == RANDOM { 0.97 } else { 0.99 };
                        let what = format!("{case} ratio, {} disk, {threads} thread(s)", human_size(cap));
                        goals.push((what, [sm.cpu_q1, sm.cpu_ratio, sm.cpu_q3], target));
                    }
                }
                if case == RANDOM && with_baselines {
                    // Per-round CPU throughput of ours over the locked bitmap's.
                    let mut r = ratios(&m[2].cpu, &m[1].cpu);
                    let q = [quantile(&mut r, 0.25), median(&mut r), quantile(&mut r, 0.75)];
                    let what = format!("{case}, {} disk, {threads} thread(s): ours / locked", human_size(cap));
                    goals.push((what, q, 1.0));
                }
            }
        }
    }
    rep.section("goals (per-round CPU-time ratios: median and quartiles)");
    goals_section(&mut rep, ["cpu_q1", "cpu_ratio", "cpu_q3"], goals);
    let rows = rep.rows().to_vec();
    rep.finish();
    if let Some(dir) = o.common.chart_dir()? {
        for case in [RANDOM, SEQ] {
            for &cap in &o.disk_sizes {
                let disk = human_size(cap);
                let series = charts::series_of(
                    &rows,
                    "write path",
                    |r| {
                        (charts::text(r, "case") == Some(case) && charts::text(r, "disk") == Some(disk.as_str()))
                            .then(|| charts::text(r, "tracker").map(str::to_owned))
                            .flatten()
                    },
                    |r| Some((charts::num(r, "threads")?, charts::num(r, "cpu_ratio")?)),
                );
                charts::lines(
                    &dir.join(format!("overhead-{case}-{disk}.svg")),
                    &format!("Write path, {case} on a {disk} disk: throughput per CPU-second / tracking off"),
                    "writer threads",
                    "tracked / untracked (cpu_ratio)",
                    &series,
                    charts::XScale::Linear,
                    &|x| format!("{x:.0}"),
                    false,
                )?;
            }
        }
    }
    Ok(())
}

/// A (goal, [q1, median, q3] of per-round ratios, target) per row; `keys`
/// names the three columns.
fn goals_section(rep: &mut Report, keys: [&'static str; 3], goals: Vec<(String, [f64; 3], f64)>) {
    for (goal, [q1, med, q3], target) in goals {
        rep.push(
            Row::new()
                .text("goal", goal)
                .num(keys[1], med)
                .num(keys[0], q1)
                .num(keys[2], q3)
                .text("target", format!(">= {target}"))
                .text("met", verdict_at_least(q1, med, q3, target)),
        );
    }
}

/// `--durable`: tracking off, ours, and ours with durable tracking, their
/// files in `--ctk-dir`, interleaved over the same writes. Every round starts
/// a new epoch, so every region a round touches costs one intent sync (or
/// less: writers that first touch regions together share one).
fn durable(o: &Opts, rounds: usize, round_bytes: u64) -> anyhow::Result<()> {
    let cases: Vec<String> = if o.cases.is_empty() {
        vec![RANDOM.into(), SEQ.into()]
    } else {
        o.cases.clone()
    };
    let dir = o.common.mem_dir();
    let ctk_dir = o.ctk_dir.clone().unwrap_or_else(|| o.common.disk_dir());
    let g = o.granularity;
    let mut rep = Report::new("overhead", o.common.json);
    rep.note(&format!(
        "overhead --durable: VM disks {} in {}, trackers in {}, granularity {}, {rounds} rounds of {} per thread, threads {:?}",
        o.disk_sizes.iter().map(|&d| human_size(d)).collect::<Vec<_>>().join(","),
        dir.display(),
        ctk_dir.display(),
        human_size(g),
        human_size(round_bytes),
        o.common.threads
    ));
    rep.section(
        "durable tracking (ratio / cpu_ratio: against tracking off, wall / CPU time; vs_ours: wall-time \
         throughput against ours, its quartiles vs_ours_q1/q3; syncs: intent syncs per round; us_per_sync: \
         median per-round wall time over ours, per sync)",
    );
    let mut goals = Vec::new();
    for &cap in &o.disk_sizes {
        let variants = [
            Variant::Off,
            Variant::Ours(Box::new(OwnedTracker::create(&ctk_dir, cap, g, 0)?)),
            Variant::Ours(Box::new(OwnedTracker::create_with(
                &ctk_dir,
                cap,
                g,
                0,
                &TrackerOptions::new().durable(true),
            )?)),
        ];
        for case in &cases {
            let bench = BenchVm::create(&dir, cap, g)?;
            for &threads in &o.common.threads {
                let s = streams(case, cap, threads, round_bytes)?;
                let longest = s.iter().flatten().map(|&(_, l)| l as usize).max().unwrap_or(4096);
                let src = source(longest);
                let bytes: u64 = s.iter().map(|x| bytes_of(x)).sum();
                let writes: u64 = s.iter().map(|x| x.len() as u64).sum();
                let syncs_before = durable_syncs(&variants[2]);
                let m = measure(&variants, &bench.vm, &s, &src, rounds, o.sample_every)?;
                // The warm-up round and the timed ones.
                let syncs = (durable_syncs(&variants[2]) - syncs_before) as f64 / (rounds + 1) as f64;
                let off_ns = summarise(&m, 0, 0, 1, bytes, writes).cpu_ns_per_write;
                // What a sync adds to a round: the median of per-round wall
                // time differences, durable - ours, over the syncs per round.
                let mut extra: Vec<f64> = m[2].secs.iter().zip(&m[1].secs).map(|(d, o)| d - o).collect();
                let us_per_sync = median(&mut extra) * 1e6 / syncs.max(1.0);
                for (i, v) in variants.iter().enumerate() {
                    let sm = summarise(&m, i, 0, 1, bytes, writes);
                    let mut w = ratios(&m[1].secs, &m[i].secs);
                    let h = &m[i].hist;
                    rep.push(
                        Row::new()
                            .text("case", case.as_str())
                            .text("disk", human_size(cap))
                            .int("threads", threads as u64)
                            .text("tracker", v.name())
                            .num("mib_s", sm.mib_s)
                            .num("ratio", sm.ratio)
                            .num("cpu_ratio", sm.cpu_ratio)
                            .num("vs_ours", median(&mut w))
                            .num("vs_ours_q1", quantile(&mut w, 0.25))
                            .num("vs_ours_q3", quantile(&mut w, 0.75))
                            .num("cpu_ns_write", sm.cpu_ns_per_write)
                            .num("net_ns_write", sm.cpu_ns_per_write - off_ns)
                            .num("syncs", if i == 2 { syncs } else { 0.0 })
                            .num("us_per_sync", if i == 2 && syncs > 0.0 { us_per_sync } else { 0.0 })
                            .int("p50_ns", h.value_at_quantile(0.5))
                            .int("p99_ns", h.value_at_quantile(0.99))
                            .int("p999_ns", h.value_at_quantile(0.999))
                            .int("rounds", rounds as u64),
                    );
                    if i == 2 {
                        let what = format!(
                            "{case}, {} disk, {threads} thread(s): durable / ours, wall time",
                            human_size(cap)
                        );
                        let q = [quantile(&mut w, 0.25), median(&mut w), quantile(&mut w, 0.75)];
                        goals.push((what, q, 0.97));
                    }
                }
            }
        }
    }
    rep.section("is durable tracking's cost negligible? (per-round wall-time throughput, durable / ours)");
    goals_section(&mut rep, ["q1", "wall_ratio", "q3"], goals);
    rep.finish();
    Ok(())
}

/// Intent syncs of an `Ours` variant so far.
fn durable_syncs(v: &Variant) -> u64 {
    match v {
        Variant::Ours(o) => o.tracker.stats().intent_syncs,
        _ => 0,
    }
}
