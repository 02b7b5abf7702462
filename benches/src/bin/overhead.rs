//! `overhead`: write-path throughput with tracking off (`()`) and on (ours),
//! and the baselines (QEMU-style locked bitmap, libvirt-style bitmap per
//! change ID), A/B interleaved in one process, every write through `sim`'s
//! real write path (`Vm::write_with`). See `benches/README.md`.

use benches::baselines::{LockedBitmap, PerChangeIdBitmaps};
use benches::charts;
use benches::cli::{parse_size, Common};
use benches::report::{Report, Row};
use benches::stats::{median, quantile, ratios, verdict_at_least};
use benches::variant::{OwnedTracker, Variant};
use benches::writepath::{bytes_of, measure, profile_writes, random_4k, sequential, source, summarise, BenchVm, Write};
use benches::{human_size, MIB};
use clap::Parser;

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
    for (goal, [q1, med, q3], target) in goals {
        rep.push(
            Row::new()
                .text("goal", goal)
                .num("cpu_ratio", med)
                .num("cpu_q1", q1)
                .num("cpu_q3", q3)
                .text("target", format!(">= {target}"))
                .text("met", verdict_at_least(q1, med, q3, target)),
        );
    }
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
