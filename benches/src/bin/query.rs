//! `query`: time to page through every changed area against disk size and
//! against the number of changed areas, and snapshot stun times against disk
//! size while a guest writes. See `benches/README.md`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use benches::charts;
use benches::cli::{parse_size, Common};
use benches::report::{Report, Row};
use benches::rng::SplitMix64;
use benches::stats::{latency_histogram, median};
use benches::variant::OwnedTracker;
use benches::{human_size, GIB, TIB};
use clap::Parser;
use sim::{DiskSpec, Host};
use tracker::{Granularity, Since, Tracker};

/// Query paging time and snapshot stun time against disk size.
#[derive(Debug, Parser)]
#[command(name = "query")]
struct Opts {
    #[command(flatten)]
    common: Common,
    /// Disk sizes for the paging-vs-size and stun-vs-size sections.
    #[arg(long, value_parser = parse_size, value_delimiter = ',', default_value = "1G,64G,1T,16T,64T")]
    sizes: Vec<u64>,
    /// Changed areas in the paging-vs-size section.
    #[arg(long, default_value_t = 1000)]
    areas: u64,
    /// Disk size of the paging-vs-areas section.
    #[arg(long, value_parser = parse_size, default_value = "1T")]
    areas_disk: u64,
    /// Area counts of the paging-vs-areas section [default: 10,100,1000,10000,100000; up to 10000 with --quick].
    #[arg(long, value_delimiter = ',')]
    area_counts: Vec<u64>,
    /// Areas per page (the API's page limit).
    #[arg(long, default_value_t = 2000)]
    max_areas: usize,
    /// Tracking granularity.
    #[arg(long, value_parser = parse_size, default_value = "64K")]
    granularity: u64,
    /// Timed repetitions of each paging run [default: 15, 5 with --quick].
    #[arg(long)]
    reps: Option<usize>,
    /// Snapshot create/remove cycles per disk size [default: 40, 3 with --quick].
    #[arg(long)]
    cycles: Option<usize>,
    /// Sections to run, comma separated: size, areas, stun.
    #[arg(long, value_delimiter = ',', default_value = "size,areas,stun")]
    sections: Vec<String>,
    /// The pace of each guest writer in the stun section, 4 KiB writes per second.
    #[arg(long, default_value_t = 20_000)]
    guest_iops: u64,
    /// Guest writer threads in the stun section.
    #[arg(long, default_value_t = 2)]
    writers: usize,
    /// Directory of the stun section's datastore [default: the temp dir: a real
    /// file system, since a snapshot writes its change-tracking header].
    #[arg(long)]
    datastore_dir: Option<std::path::PathBuf>,
}

/// Where the stun section's guest writes: a window this large in the middle of the disk.
const HOT_WINDOW: u64 = 64 << 20;

/// A tracker with `n` one-block areas spread evenly over `cap` bytes,
/// closed in an epoch after an empty one. Returns the tracker, the change ID
/// before the writes (`e1`) and the snapshot after them (`e2`).
fn build(dir: &std::path::Path, cap: u64, g: u64, n: u64) -> anyhow::Result<(OwnedTracker, u64, u64)> {
    let o = OwnedTracker::create(dir, cap, g, 2)?;
    let t = &o.tracker;
    let e1 = o.new_epoch()?;
    let blocks = cap / g;
    anyhow::ensure!(
        blocks >= 2 * n,
        "{} is too small for {n} separate areas",
        human_size(cap)
    );
    for i in 0..n {
        t.mark(i * blocks / n * g, g);
    }
    let e2 = o.new_epoch()?;
    Ok((o, e1, e2))
}

/// Pages through every area changed since `since` at `at`; returns (areas, pages).
fn page_all(t: &Tracker, since: Since, at: u64, cap: u64, max_areas: usize) -> anyhow::Result<(u64, u64)> {
    let (mut start, mut areas, mut pages) = (0, 0u64, 0u64);
    while start < cap {
        let p = t.changed_areas(since, at, cap, start, max_areas)?;
        areas += p.areas.len() as u64;
        pages += 1;
        start = p.start_offset + p.length;
    }
    Ok((areas, pages))
}

/// Median microseconds of `reps` full paging runs; checks the area count.
fn time_paging(
    t: &Tracker,
    since: Since,
    at: u64,
    cap: u64,
    max_areas: usize,
    want: u64,
    reps: usize,
) -> anyhow::Result<(f64, u64)> {
    let mut us = Vec::new();
    let mut pages = 0;
    for _ in 0..reps {
        let t0 = Instant::now();
        let (areas, p) = page_all(t, since, at, cap, max_areas)?;
        us.push(t0.elapsed().as_secs_f64() * 1e6);
        anyhow::ensure!(areas == want, "paging found {areas} areas, expected {want}");
        pages = p;
    }
    Ok((median(&mut us), pages))
}

/// Both paths: the newest epoch unfolded (a live snapshot pins the change ID's
/// epoch) and folded into the epoch map (no snapshot pins it any more).
fn both_paths(
    dir: &std::path::Path,
    cap: u64,
    g: u64,
    n: u64,
    max_areas: usize,
    reps: usize,
) -> anyhow::Result<[(f64, u64); 2]> {
    let (o, e1, e2) = build(dir, cap, g, n)?;
    let t = &o.tracker;
    let cid = t
        .change_id(e1)
        .ok_or_else(|| anyhow::anyhow!("no change ID for epoch {e1}"))?;
    let unfolded = time_paging(t, Since::Change(cid), e2, cap, max_areas, n, reps)?;
    anyhow::ensure!(
        t.stats().unfolded_epochs >= 1,
        "the written epoch should still be unfolded"
    );
    // Two more epochs release e1 and e2: everything up to e3 folds.
    o.new_epoch()?;
    let e4 = o.new_epoch()?;
    // The pins are now e3 and e4: every epoch up to e3 is folded, and only
    // e4 (empty, but every closed epoch after the horizon is kept) is not.
    anyhow::ensure!(
        t.stats().unfolded_epochs == 1,
        "every epoch up to the oldest pin should be folded"
    );
    let folded = time_paging(t, Since::Change(cid), e4, cap, max_areas, n, reps)?;
    Ok([unfolded, folded])
}

fn main() -> anyhow::Result<()> {
    let o = Opts::parse();
    o.common.check()?;
    let quick = o.common.quick;
    let reps = o.reps.unwrap_or(if quick { 5 } else { 15 }).max(1);
    let cycles = o.cycles.unwrap_or(if quick { 3 } else { 40 }).max(1);
    let counts = if o.area_counts.is_empty() {
        if quick {
            vec![10, 100, 1000, 10_000]
        } else {
            vec![10, 100, 1000, 10_000, 100_000]
        }
    } else {
        o.area_counts.clone()
    };
    let g = o.granularity;
    let dir = o.common.mem_dir();
    let mut rep = Report::new("query", o.common.json);
    rep.note(&format!(
        "query: sizes {}, {} areas, {} per page, granularity {}, {reps} reps, trackers in {}",
        o.sizes.iter().map(|&s| human_size(s)).collect::<Vec<_>>().join(","),
        o.areas,
        o.max_areas,
        human_size(g),
        dir.display()
    ));

    for s in &o.sections {
        anyhow::ensure!(
            ["size", "areas", "stun"].contains(&s.as_str()),
            "unknown section {s:?} (size, areas, stun)"
        );
    }
    let run = |s: &str| o.sections.iter().any(|x| x == s);
    let mut goals = Vec::new();
    // Per disk size: the stun times of creates and of removes, for the charts.
    let mut stun_hists = Vec::new();
    if run("size") {
        rep.section("paging vs disk size (one-block areas spread evenly; vs_64g = time / time at 64G)");
        let mut by_size = Vec::new();
        for &cap in &o.sizes {
            let r = both_paths(&dir, cap, g, o.areas, o.max_areas, reps)?;
            by_size.push((cap, r));
        }
        let at64 = by_size.iter().find(|(c, _)| *c == 64 * GIB).map(|(_, r)| *r);
        for (cap, r) in &by_size {
            for (path, (us, pages)) in ["unfolded", "folded"].iter().zip(r) {
                let i = usize::from(*path == "folded");
                let vs = at64.map_or(f64::NAN, |a| us / a[i].0);
                rep.push(
                    Row::new()
                        .text("disk", human_size(*cap))
                        .text("path", *path)
                        .int("areas", o.areas)
                        .int("pages", *pages)
                        .num("us", *us)
                        .num("vs_64g", vs),
                );
                if *cap == 64 * TIB && at64.is_some() {
                    goals.push((format!("paging {} areas, 64T / 64G, {path}", o.areas), vs, 2.0));
                }
            }
        }
    }
    if run("areas") {
        rep.section("paging vs changed areas");
        for &n in &counts {
            let r = both_paths(&dir, o.areas_disk, g, n, o.max_areas, reps)?;
            for (path, (us, pages)) in ["unfolded", "folded"].iter().zip(r) {
                rep.push(
                    Row::new()
                        .text("disk", human_size(o.areas_disk))
                        .text("path", *path)
                        .int("areas", n)
                        .int("pages", pages)
                        .num("us", us)
                        .num("ns_per_area", us * 1e3 / n as f64),
                );
            }
        }
    }
    if run("stun") {
        rep.section("snapshot stun vs disk size (create + remove while a guest thread writes)");
        let ds_parent = o.datastore_dir.clone().unwrap_or_else(|| o.common.disk_dir());
        let ds = tempfile::Builder::new()
            .prefix("cbt-bench-ds-")
            .tempdir_in(&ds_parent)?;
        let host = Host::open(ds.path())?;
        for (i, &cap) in o.sizes.iter().enumerate() {
            let vm = host.create_vm(
                &format!("stun{i}"),
                &[DiskSpec {
                    capacity: cap,
                    granularity: Granularity::new(g)?,
                }],
            )?;
            // Some writes spread over the whole disk, so the tracker is not empty.
            let spread = 256u64;
            for k in 0..spread {
                vm.write(0, (cap / spread * k) / 65536 * 65536, &[0xa5u8; 65536])?;
            }
            let stop = AtomicBool::new(false);
            let writes = AtomicU64::new(0);
            let hot_len = HOT_WINDOW.min(cap);
            let hot = (cap / 2).min(cap - hot_len) / 4096 * 4096;
            // Stun times of snapshot creates and of removes (consolidation), apart.
            let mut by_op = [latency_histogram(), latency_histogram()];
            // How late a thread that sleeps 1 ms wakes up: the machine's
            // scheduling delay, which bounds every stun that waits for a thread.
            let sched = parking_lot::Mutex::new(latency_histogram());
            std::thread::scope(|s| -> anyhow::Result<()> {
                let (stop_probe, sched) = (&stop, &sched);
                s.spawn(move || {
                    let mut h = latency_histogram();
                    // Relaxed: a stop flag.
                    while !stop_probe.load(Ordering::Relaxed) {
                        let t0 = Instant::now();
                        std::thread::sleep(Duration::from_millis(1));
                        let late = t0.elapsed().saturating_sub(Duration::from_millis(1));
                        let _ = h.record((late.as_nanos() as u64).max(1));
                    }
                    *sched.lock() = h;
                });
                let writers: Vec<_> = (0..o.writers.max(1) as u64)
                    .map(|w| {
                        let (vm, stop, writes) = (&vm, &stop, &writes);
                        s.spawn(move || -> anyhow::Result<()> {
                            let mut rng = SplitMix64::new(5 + w);
                            let buf = [0x3cu8; 4096];
                            let start = Instant::now();
                            let mut n = 0u64;
                            // Relaxed: a stop flag; nothing is published through it.
                            while !stop.load(Ordering::Relaxed) {
                                vm.write(0, hot + rng.below(hot_len / 4096) * 4096, &buf)?;
                                n += 1;
                                // Pace to `guest_iops`: sleep whenever ahead of schedule.
                                let due = Duration::from_secs_f64(n as f64 / o.guest_iops.max(1) as f64);
                                if let Some(ahead) = due.checked_sub(start.elapsed()) {
                                    std::thread::sleep(ahead);
                                }
                            }
                            writes.fetch_add(n, Ordering::Relaxed);
                            Ok(())
                        })
                    })
                    .collect();
                let mut stuns = |op: usize, f: &dyn Fn() -> Result<(), sim::SimError>| -> anyhow::Result<()> {
                    let before = vm.stun_times_ns().len();
                    f()?;
                    for &ns in vm.stun_times_ns().get(before..).unwrap_or_default() {
                        by_op[op]
                            .record(ns)
                            .map_err(|e| anyhow::anyhow!("stun histogram: {e:?}"))?;
                    }
                    Ok(())
                };
                let mut result = Ok(());
                for c in 0..cycles {
                    result = stuns(0, &|| vm.create_snapshot(&format!("s{c}")).map(drop));
                    if result.is_err() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                    if c > 0 {
                        result = stuns(1, &|| vm.remove_snapshot(&format!("s{}", c - 1)));
                        if result.is_err() {
                            break;
                        }
                    }
                }
                if result.is_ok() {
                    result = stuns(1, &|| vm.remove_snapshot(&format!("s{}", cycles - 1)));
                }
                stop.store(true, Ordering::Relaxed);
                for w in writers {
                    w.join().map_err(|_| anyhow::anyhow!("a writer thread panicked"))??;
                }
                result
            })?;
            let mut all = by_op[0].clone();
            all.add(&by_op[1])
                .map_err(|e| anyhow::anyhow!("stun histogram: {e:?}"))?;
            for (op, h) in [("create", &by_op[0]), ("remove", &by_op[1]), ("all", &all)] {
                let p99 = h.value_at_quantile(0.99) as f64 / 1e3;
                rep.push(
                    Row::new()
                        .text("disk", human_size(cap))
                        .text("op", op)
                        .int("stuns", h.len())
                        .num("p50_us", h.value_at_quantile(0.5) as f64 / 1e3)
                        .num("p99_us", p99)
                        .num("max_us", h.max() as f64 / 1e3)
                        .int("guest_writes", writes.load(Ordering::Relaxed)),
                );
                if op != "remove" {
                    goals.push((format!("stun p99 at {}, {op} (us)", human_size(cap)), p99, 1000.0));
                }
            }
            let sched = sched.into_inner();
            rep.push(
                Row::new()
                    .text("disk", human_size(cap))
                    .text("op", "wakeup lateness (1 ms sleep)")
                    .int("stuns", sched.len())
                    .num("p50_us", sched.value_at_quantile(0.5) as f64 / 1e3)
                    .num("p99_us", sched.value_at_quantile(0.99) as f64 / 1e3)
                    .num("max_us", sched.max() as f64 / 1e3)
                    .int("guest_writes", writes.load(Ordering::Relaxed)),
            );
            stun_hists.push((cap, by_op));
            drop(vm);
            host.close_vm(&format!("stun{i}"));
        }
        rep.note(&format!(
            "stun: {cycles} create/remove cycles per size, {} guest writers of {} 4 KiB writes/s each into {}, datastore in {}",
            o.writers.max(1),
            o.guest_iops,
            human_size(HOT_WINDOW),
            ds_parent.display()
        ));
    }

    rep.section("goals");
    for (goal, measured, target) in goals {
        rep.push(
            Row::new()
                .text("goal", goal)
                .num("measured", measured)
                .text(
                    "target",
                    if target == 2.0 {
                        "<= 2".to_string()
                    } else {
                        format!("< {target}")
                    },
                )
                .flag(
                    "met",
                    if target == 2.0 {
                        measured <= target
                    } else {
                        measured < target
                    },
                ),
        );
    }
    let rows = rep.rows().to_vec();
    rep.finish();
    if let Some(dir) = o.common.chart_dir()? {
        let disk_bytes = |r: &Row| parse_size(charts::text(r, "disk")?).ok().map(|b| b as f64);
        let series = charts::series_of(
            &rows,
            "paging vs disk size",
            |r| Some(format!("{} path", charts::text(r, "path")?)),
            |r| Some((disk_bytes(r)?, charts::num(r, "us")?)),
        );
        charts::lines(
            &dir.join("query-size.svg"),
            &format!("QueryChangedDiskAreas of {} one-block areas, paged to the end", o.areas),
            "disk size",
            "microseconds",
            &series,
            charts::XScale::Log2,
            &charts::size_label,
            true,
        )?;
        let series = charts::series_of(
            &rows,
            "paging vs changed areas",
            |r| Some(format!("{} path", charts::text(r, "path")?)),
            |r| Some((charts::num(r, "areas")?, charts::num(r, "us")?)),
        );
        charts::lines(
            &dir.join("query-areas.svg"),
            &format!(
                "QueryChangedDiskAreas on a {} disk against changed areas",
                human_size(o.areas_disk)
            ),
            "changed areas",
            "microseconds",
            &series,
            charts::XScale::Log10,
            &charts::count_label,
            true,
        )?;
        // Stun histograms: the share of stuns per bucket of microseconds
        // (bucket k holds (4^(k-1), 4^k] us), one bar per disk size.
        const BUCKETS: usize = 12;
        let bucket = |ns: u64| -> usize {
            let us = (ns as f64 / 1e3).max(1.0);
            ((us.log2() / 2.0).ceil() as usize).min(BUCKETS - 1)
        };
        for (op, name) in [(0, "create"), (1, "remove")] {
            let shares: Vec<(String, Vec<f64>)> = stun_hists
                .iter()
                .map(|(cap, h): &(u64, [hdrhistogram::Histogram<u64>; 2])| {
                    let h = &h[op];
                    let mut counts = [0u64; BUCKETS];
                    for v in h.iter_recorded() {
                        counts[bucket(v.value_iterated_to())] += v.count_at_value();
                    }
                    let total = h.len().max(1) as f64;
                    let shares = counts.iter().map(|&n| 100.0 * n as f64 / total).collect();
                    (format!("{} disk", human_size(*cap)), shares)
                })
                .collect();
            let used = |k: usize| shares.iter().any(|(_, v)| v[k] > 0.0);
            let (Some(lo), Some(hi)) = ((0..BUCKETS).find(|&k| used(k)), (0..BUCKETS).rfind(|&k| used(k))) else {
                continue;
            };
            let label = |us: u64| {
                if us >= 1000 {
                    format!("{} ms", us / 1000)
                } else {
                    format!("{us} us")
                }
            };
            let cats: Vec<String> = (lo..=hi).map(|k| format!("<= {}", label(1u64 << (2 * k)))).collect();
            let shares: Vec<(String, Vec<f64>)> = shares.into_iter().map(|(n, v)| (n, v[lo..=hi].to_vec())).collect();
            charts::bars(
                &dir.join(format!("stun-{name}.svg")),
                &format!(
                    "Stun times of snapshot {name}s while a guest writes ({} stuns per size)",
                    stun_hists.first().map_or(0, |(_, h)| h[op].len())
                ),
                "% of stuns",
                &cats,
                &shares,
            )?;
        }
    }
    Ok(())
}
