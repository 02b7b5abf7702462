//! `retained`: write-path and mark cost with 1, 8, 64 and 1024 change IDs
//! retained (closed epochs kept pinned, as live snapshots keep them), A/B
//! interleaved with tracking off; writes go through `sim`'s real write path.
//! See `benches/README.md`.

use std::hint::black_box;

use benches::charts;
use benches::cli::{parse_size, Common};
use benches::pool::thread_cpu_time;
use benches::report::{Report, Row};
use benches::stats::{median, ratios};
use benches::variant::{OwnedTracker, Variant};
use benches::writepath::{bytes_of, measure, random_4k, source, summarise, BenchVm, Scrubber};
use benches::{human_size, MIB};
use clap::Parser;
use tracker::MarkDirty;

/// Write-path cost against the number of retained change IDs.
#[derive(Debug, Parser)]
#[command(name = "retained")]
struct Opts {
    #[command(flatten)]
    common: Common,
    /// Retained change IDs per tracker, comma separated: closed epochs kept
    /// unfolded by pins, as live snapshots keep them.
    #[arg(long, value_delimiter = ',', default_value = "1,8,64,1024")]
    keep: Vec<usize>,
    /// Disk size.
    #[arg(long, value_parser = parse_size, default_value = "1T")]
    disk_size: u64,
    /// Tracking granularity.
    #[arg(long, value_parser = parse_size, default_value = "64K")]
    granularity: u64,
    /// Rounds [default: 21, 7 with --quick].
    #[arg(long)]
    rounds: Option<usize>,
    /// Bytes each thread writes per round [default: 64M, 16M with --quick].
    #[arg(long, value_parser = parse_size)]
    round_bytes: Option<u64>,
    /// Random 4 KiB writes marked into each retained epoch when it is built.
    #[arg(long, default_value_t = 32)]
    writes_per_epoch: usize,
}

#[inline(never)]
fn mark_all<T: MarkDirty + ?Sized>(t: &T, offsets: &[(u64, u32)]) {
    for &(o, l) in offsets {
        t.mark(black_box(o), u64::from(l));
    }
}

fn main() -> anyhow::Result<()> {
    let o = Opts::parse();
    o.common.check()?;
    anyhow::ensure!(
        !o.keep.is_empty() && !o.keep.contains(&0),
        "--keep needs counts of at least 1"
    );
    let quick = o.common.quick;
    let rounds = o.rounds.unwrap_or(if quick { 7 } else { 21 }).max(1);
    let round_bytes = o.round_bytes.unwrap_or(if quick { 16 * MIB } else { 64 * MIB });
    let (cap, g) = (o.disk_size, o.granularity);
    let dir = o.common.mem_dir();
    let mut rep = Report::new("retained", o.common.json);
    rep.note(&format!(
        "retained: keep {:?}, VM disk {}, granularity {}, {rounds} rounds of {} per thread, \
         {} writes per retained epoch, files in {}",
        o.keep,
        human_size(cap),
        human_size(g),
        human_size(round_bytes),
        o.writes_per_epoch,
        dir.display()
    ));

    let mut variants = vec![Variant::Off];
    for (i, &k) in o.keep.iter().enumerate() {
        // k + 1 pins: the epoch map holds every epoch up to the oldest pin, so
        // the k epochs after it stay unfolded (the worst case for retention).
        let t = OwnedTracker::create(&dir, cap, g, k + 1)?;
        t.new_epoch()?;
        let writes = random_4k(cap, o.writes_per_epoch * k, 9000 + i as u64);
        for epoch in writes.chunks(o.writes_per_epoch.max(1)) {
            for &(off, len) in epoch {
                t.tracker.mark(off, u64::from(len));
            }
            t.new_epoch()?;
        }
        let unfolded = t.tracker.stats().unfolded_epochs;
        anyhow::ensure!(unfolded == k, "expected {k} unfolded epochs, found {unfolded}");
        variants.push(Variant::Ours(Box::new(t)));
    }
    let name = |v: usize| {
        if v == 0 {
            "off".to_string()
        } else {
            format!("ours-{}", o.keep[v - 1])
        }
    };
    let retained = |v: usize| match &variants[v] {
        Variant::Ours(t) => {
            let s = t.tracker.stats();
            (s.unfolded_epochs as u64, s.unfolded_bytes)
        }
        _ => (0, 0),
    };
    let mut goals = Vec::new();

    // Mark only: the most sensitive view (no copy to hide behind).
    let marks = random_4k(cap, if quick { 1 << 18 } else { 1 << 20 }, 4242);
    let mut ns = vec![Vec::new(); variants.len()];
    let mut scrub = Scrubber::new();
    for r in 0..rounds {
        for k in 0..variants.len() {
            let v = (r + k) % variants.len();
            variants[v].reset()?;
            scrub.scrub();
            let t0 = thread_cpu_time();
            benches::with_tracker!(&variants[v], |t| mark_all(t, &marks));
            ns[v].push((thread_cpu_time() - t0).as_secs_f64() * 1e9 / marks.len() as f64);
        }
    }
    rep.section("mark only: CPU ns per mark of a random 4 KiB write on a fresh epoch (cold cache)");
    for v in 1..variants.len() {
        let mut cost = ratios(&ns[v], &ns[1]);
        let c = median(&mut cost);
        rep.push(
            Row::new()
                .text("tracker", name(v))
                .int("unfolded_epochs", retained(v).0)
                .num("ns", median(&mut ns[v].clone()))
                .num("cost_vs_first", c)
                .int("unfolded_heap_bytes", retained(v).1),
        );
        if o.keep[v - 1] == 1024 {
            goals.push((format!("mark cost, 1024 retained / {} retained", o.keep[0]), c));
        }
    }

    rep.section(
        "write path: random 4 KiB writes (cost_vs_first = CPU time per write / the first keep count's, \
         median of per-round ratios)",
    );
    let bench = BenchVm::create(&dir, cap, g)?;
    let src = source(4096);
    for &threads in &o.common.threads {
        let streams: Vec<_> = (0..threads)
            .map(|t| random_4k(cap, (round_bytes / 4096) as usize, 1000 + t as u64))
            .collect();
        let bytes: u64 = streams.iter().map(|s| bytes_of(s)).sum();
        let writes: u64 = streams.iter().map(|s| s.len() as u64).sum();
        let m = measure(&variants, &bench.vm, &streams, &src, rounds, 16)?;
        for v in 0..variants.len() {
            let sm = summarise(&m, v, 0, 1, bytes, writes);
            let h = &m[v].hist;
            let cost = if v == 0 { f64::NAN } else { 1.0 / sm.vs_ref };
            rep.push(
                Row::new()
                    .text("tracker", name(v))
                    .int("threads", threads as u64)
                    .num("mib_s", sm.mib_s)
                    .num("ratio", sm.ratio)
                    .num("cpu_ratio", sm.cpu_ratio)
                    .num("cost_vs_first", cost)
                    .num("cpu_ns_write", sm.cpu_ns_per_write)
                    .int("p50_ns", h.value_at_quantile(0.5))
                    .int("p99_ns", h.value_at_quantile(0.99))
                    .int("p999_ns", h.value_at_quantile(0.999))
                    .int("rounds", rounds as u64),
            );
            if v > 0 && o.keep[v - 1] == 1024 {
                goals.push((
                    format!(
                        "write cost at {threads} thread(s), 1024 retained / {} retained",
                        o.keep[0]
                    ),
                    cost,
                ));
            }
        }
    }
    rep.section("goals");
    for (goal, c) in goals {
        rep.push(
            Row::new()
                .text("goal", goal)
                .num("measured", c)
                .text("target", "<= 1.05")
                .flag("met", c <= 1.05),
        );
    }
    let rows = rep.rows().to_vec();
    rep.finish();
    if let Some(dir) = o.common.chart_dir()? {
        let series = charts::series_of(
            &rows,
            "mark only",
            |_| Some("CPU ns per mark".to_owned()),
            |r| Some((charts::num(r, "unfolded_epochs")?.max(1.0), charts::num(r, "ns")?)),
        );
        charts::lines(
            &dir.join("retained-mark.svg"),
            "Mark cost against retained (unfolded) change IDs",
            "unfolded epochs",
            "CPU ns per mark",
            &series,
            charts::XScale::Log10,
            &charts::count_label,
            true,
        )?;
    }
    Ok(())
}
