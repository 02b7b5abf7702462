//! `mark`: nanoseconds per mark (first touch and re-mark) on one thread, and
//! mark throughput over threads for disjoint regions and one hot region.
//! See `benches/README.md`.

use std::hint::black_box;

use benches::baselines::{FetchOrBitmap, LockedBitmap};
use benches::charts;
use benches::cli::{parse_size, Common};
use benches::pool::thread_cpu_time;
use benches::report::{Report, Row};
use benches::rng::SplitMix64;
use benches::stats::{median, quantile, ratios, verdict_at_least, verdict_at_most};
use benches::variant::{OwnedTracker, Variant};
use benches::writepath::Scrubber;
use benches::{human_size, with_tracker};
use clap::Parser;
use tracker::MarkDirty;

/// Mark cost: first touch, re-mark, and throughput over threads.
#[derive(Debug, Parser)]
#[command(name = "mark")]
struct Opts {
    #[command(flatten)]
    common: Common,
    /// Disk size the trackers cover (blocks = size / granularity, rounded down to a power of two).
    #[arg(long, value_parser = parse_size, default_value = "1T")]
    disk_size: u64,
    /// Tracking granularity.
    #[arg(long, value_parser = parse_size, default_value = "64K")]
    granularity: u64,
    /// Rounds [default: 15, 5 with --quick].
    #[arg(long)]
    rounds: Option<usize>,
    /// Marks per pattern per round (per thread in the threads section)
    /// [default: 1048576, 262144 with --quick].
    #[arg(long)]
    marks: Option<usize>,
    /// Blocks of the hot region all threads hit.
    #[arg(long, default_value_t = 64)]
    hot_blocks: u64,
}

/// Marks a 4 KiB write at each offset.
#[inline(never)]
fn mark_all<T: MarkDirty + ?Sized>(t: &T, offsets: &[u64]) {
    for &o in offsets {
        t.mark(black_box(o), 4096);
    }
}

/// CPU nanoseconds per mark (this thread's CPU time: preemption by other
/// processes is not counted).
fn timed<T: MarkDirty + ?Sized>(t: &T, offsets: &[u64]) -> f64 {
    let t0 = thread_cpu_time();
    mark_all(t, offsets);
    (thread_cpu_time() - t0).as_secs_f64() * 1e9 / offsets.len() as f64
}

/// What a goal asks of the figures.
#[derive(Debug, Clone, Copy)]
enum Goal {
    AtMost(f64),
    AtLeast(f64),
    /// Reported only (the goal is for a thread count not measured).
    Info,
}

const PATTERNS: [&str; 4] = ["first-seq", "re-mark-seq", "first-random", "re-mark-random"];

fn main() -> anyhow::Result<()> {
    let o = Opts::parse();
    o.common.check()?;
    let quick = o.common.quick;
    let rounds = o.rounds.unwrap_or(if quick { 5 } else { 15 }).max(1);
    let n = o.marks.unwrap_or(if quick { 1 << 18 } else { 1 << 20 });
    let g = o.granularity;
    let blocks = 1u64 << (o.disk_size / g).max(2).ilog2();
    let cap = blocks * g;
    let n = n.min(blocks as usize);
    let dir = o.common.mem_dir();
    let mut rep = Report::new("mark", o.common.json);
    rep.note(&format!(
        "mark: {} blocks of {} ({} disk), {rounds} rounds, {n} marks per pattern, tracker in {}",
        blocks,
        human_size(g),
        human_size(cap),
        dir.display()
    ));

    // Distinct blocks: consecutive, and an odd-multiplier permutation of a power-of-two range.
    let seq: Vec<u64> = (0..n as u64).map(|b| b * g).collect();
    let rnd: Vec<u64> = (0..n as u64)
        .map(|i| (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) & (blocks - 1)) * g)
        .collect();

    let ours = OwnedTracker::create(&dir, cap, g, 0)?;
    // Warm map: fault in every page of both marking bitmaps, then clear them.
    for _ in 0..2 {
        ours.tracker.mark(0, cap);
        ours.new_epoch()?;
    }
    let variants = [
        Variant::Off,
        Variant::Ours(Box::new(ours)),
        Variant::FetchOr(FetchOrBitmap::new(cap, g)),
        Variant::Locked(LockedBitmap::new(cap, g)),
    ];

    // ns[variant][pattern][round]. Every first-touch pass starts on a fresh
    // epoch with cold caches (a baseline's clear would otherwise leave its
    // whole bitmap in cache, which a write path hours after a snapshot never has).
    let mut ns = vec![vec![Vec::new(); PATTERNS.len()]; variants.len()];
    let mut scrub = Scrubber::new();
    for r in 0..rounds {
        for k in 0..variants.len() {
            let v = (r + k) % variants.len();
            let var = &variants[v];
            var.reset()?;
            scrub.scrub();
            let (a, b) = with_tracker!(var, |t| (timed(t, &seq), timed(t, &seq)));
            var.reset()?;
            scrub.scrub();
            let (c, d) = with_tracker!(var, |t| (timed(t, &rnd), timed(t, &rnd)));
            for (p, x) in [a, b, c, d].into_iter().enumerate() {
                ns[v][p].push(x);
            }
        }
    }
    rep.section(
        "one thread: CPU ns per mark of a 4 KiB write, cold caches, pages faulted in \
         (net = minus the same loop with tracking off)",
    );
    let mut goals = Vec::new();
    for (v, var) in variants.iter().enumerate() {
        for (p, pat) in PATTERNS.iter().enumerate() {
            let raw = median(&mut ns[v][p].clone());
            let mut net: Vec<f64> = ns[v][p].iter().zip(&ns[0][p]).map(|(x, y)| x - y).collect();
            rep.push(
                Row::new()
                    .text("tracker", var.name())
                    .text("pattern", *pat)
                    .num("ns", raw)
                    .num("net_ns", median(&mut net))
                    .num("min_ns", ns[v][p].iter().copied().fold(f64::INFINITY, f64::min))
                    .int("rounds", rounds as u64),
            );
        }
    }
    // Goals, on per-round figures (every round measures every variant): a
    // re-mark costs at most 2 ns net; a first touch at most 1.25 times the
    // bare fetch_or bitmap's net cost.
    let quartiles = |mut v: Vec<f64>| [quantile(&mut v, 0.25), median(&mut v), quantile(&mut v, 0.75)];
    for (p, pat) in PATTERNS.iter().enumerate() {
        let net = |v: usize| -> Vec<f64> { ns[v][p].iter().zip(&ns[0][p]).map(|(x, y)| x - y).collect() };
        if pat.starts_with("first") {
            let (ours, fetch_or) = (net(1), net(2));
            let r: Vec<f64> = ours.iter().zip(&fetch_or).map(|(a, b)| a / b).collect();
            goals.push((
                format!("{pat}: ours / fetch-or, net ns"),
                quartiles(r),
                Goal::AtMost(1.25),
            ));
        } else {
            goals.push((format!("{pat}: ours, net ns"), quartiles(net(1)), Goal::AtMost(2.0)));
        }
    }

    // Threads: disjoint regions and one hot region.
    let region = (blocks / o.common.threads.iter().copied().max().unwrap_or(1) as u64).max(o.hot_blocks);
    let tvariants = [&variants[1], &variants[2], &variants[3]];
    rep.section(
        "threads: marks per second (scaling: wall-time throughput over 1 thread's; cpu_scaling: \
         threads x marks per CPU-second over 1 thread's, i.e. the scaling if every thread had a core)",
    );
    let mut base: Vec<Option<(f64, f64)>> = vec![None; 2 * tvariants.len()];
    for &threads in &o.common.threads {
        let streams = |hot: bool| -> Vec<Vec<u64>> {
            (0..threads)
                .map(|t| {
                    let mut rng = SplitMix64::new(77 + t as u64);
                    let (lo, len) = if hot {
                        (0, o.hot_blocks)
                    } else {
                        ((t as u64 * region) % blocks, region)
                    };
                    (0..n).map(|_| (lo + rng.below(len)) * g).collect()
                })
                .collect()
        };
        for (pi, pat) in ["disjoint", "hot"].into_iter().enumerate() {
            let s = streams(pat == "hot");
            let failed = parking_lot::Mutex::new(None);
            let times = benches::pool::interleaved(
                threads,
                tvariants.len(),
                rounds,
                |v| {
                    if let Err(e) = tvariants[v].reset() {
                        failed.lock().get_or_insert(e);
                    }
                },
                |t, v| with_tracker!(tvariants[v], |tr| mark_all(tr, &s[t])),
            );
            if let Some(e) = failed.into_inner() {
                return Err(e);
            }
            let total = (threads * n) as f64;
            let rate =
                |t: &[Vec<f64>]| -> Vec<Vec<f64>> { t.iter().map(|r| r.iter().map(|s| total / s).collect()).collect() };
            // Wall: marks per second; CPU: marks per CPU-second of all threads.
            let (wall, cpu) = (rate(&times.wall), rate(&times.cpu));
            for (v, var) in tvariants.iter().enumerate() {
                let mps = median(&mut wall[v].clone()) / 1e6;
                let per_cpu = median(&mut cpu[v].clone()) / 1e6;
                let key = pi * tvariants.len() + v;
                if threads == 1 {
                    base[key] = Some((mps, per_cpu));
                }
                let scaling = base[key].map_or(f64::NAN, |b| mps / b.0);
                let cpu_scaling = base[key].map_or(f64::NAN, |b| threads as f64 * per_cpu / b.1);
                rep.push(
                    Row::new()
                        .text("pattern", pat)
                        .text("tracker", var.name())
                        .int("threads", threads as u64)
                        .num("mmarks_s", mps)
                        .num("cpu_ns_per_mark", 1e3 / per_cpu)
                        .num("scaling", scaling)
                        .num("cpu_scaling", cpu_scaling)
                        .num("vs_ours", median(&mut ratios(&wall[v], &wall[0])))
                        .int("rounds", rounds as u64),
                );
                if v == 0 && pat == "disjoint" && threads > 1 {
                    let what = format!("disjoint cpu_scaling, ours, {threads} threads (wall: {scaling:.2}x)");
                    let goal = if threads >= 16 { Goal::AtLeast(12.0) } else { Goal::Info };
                    goals.push((what, [cpu_scaling; 3], goal));
                }
                if v == 0 && pat == "hot" && threads > 1 {
                    // No collapse: the CPU cost of a mark at most doubles.
                    let what = format!("hot region cpu_scaling, ours, {threads} threads");
                    goals.push((what, [cpu_scaling; 3], Goal::AtLeast(threads as f64 / 2.0)));
                }
                if v == 1 && pat == "disjoint" && threads >= 16 {
                    let what = format!("disjoint Mmarks/s at {threads} threads, ours / fetch-or");
                    let r = ratios(&wall[0], &wall[1]);
                    goals.push((what, quartiles(r), Goal::AtLeast(1.0)));
                }
            }
        }
    }
    rep.section("goals (median and quartiles of per-round figures)");
    for (goal, [q1, med, q3], target) in goals {
        let row = Row::new()
            .text("goal", goal)
            .num("measured", med)
            .num("q1", q1)
            .num("q3", q3);
        rep.push(match target {
            Goal::AtMost(t) => row
                .text("target", format!("<= {t}"))
                .text("met", verdict_at_most(q1, med, q3, t)),
            Goal::AtLeast(t) => row
                .text("target", format!(">= {t}"))
                .text("met", verdict_at_least(q1, med, q3, t)),
            Goal::Info => row
                .text("target", "the goal is for 16 threads")
                .text("met", "not measurable with fewer threads"),
        });
    }
    let rows = rep.rows().to_vec();
    rep.finish();
    if let Some(dir) = o.common.chart_dir()? {
        let series = charts::series_of(
            &rows,
            "one thread",
            |r| charts::text(r, "tracker").map(str::to_owned),
            |r| {
                let p = PATTERNS.iter().position(|p| Some(*p) == charts::text(r, "pattern"))?;
                Some((p as f64, charts::num(r, "ns")?))
            },
        );
        let bars: Vec<(String, Vec<f64>)> = series
            .into_iter()
            .map(|(name, pts)| {
                let mut v = vec![f64::NAN; PATTERNS.len()];
                for (x, y) in pts {
                    v[x as usize] = y;
                }
                (name, v)
            })
            .collect();
        let cats: Vec<String> = PATTERNS.iter().map(|p| p.to_string()).collect();
        charts::bars(
            &dir.join("mark-cost.svg"),
            "Mark cost of a 4 KiB write, one thread, cold caches",
            "CPU ns per mark",
            &cats,
            &bars,
        )?;
        let series = charts::series_of(
            &rows,
            "threads",
            |r| {
                Some(format!(
                    "{}, {}",
                    charts::text(r, "tracker")?,
                    charts::text(r, "pattern")?
                ))
            },
            |r| Some((charts::num(r, "threads")?, charts::num(r, "mmarks_s")?)),
        );
        charts::lines(
            &dir.join("mark-threads.svg"),
            "Marks per second against threads",
            "threads",
            "million marks per second",
            &series,
            charts::XScale::Linear,
            &|x| format!("{x:.0}"),
            true,
        )?;
    }
    Ok(())
}
