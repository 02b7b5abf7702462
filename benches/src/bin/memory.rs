//! `memory`: change-tracking file bytes per TiB fully written, at several
//! granularities, and for a 62 TiB disk with 1 GiB written. See
//! `benches/README.md`.

use std::time::Instant;

use benches::charts;
use benches::cli::{parse_size, Common};
use benches::report::{Report, Row};
use benches::variant::OwnedTracker;
use benches::{human_size, GIB, MIB, TIB};
use clap::Parser;

/// Tracker bytes against written data.
#[derive(Debug, Parser)]
#[command(name = "memory")]
struct Opts {
    #[command(flatten)]
    common: Common,
    /// Granularities, comma separated.
    #[arg(long, value_parser = parse_size, value_delimiter = ',', default_value = "4K,64K,1M")]
    granularities: Vec<u64>,
    /// How much to write fully before scaling to 1 TiB [default: 1T; with --quick 64G at 4K, 1T otherwise].
    #[arg(long, value_parser = parse_size)]
    written: Option<u64>,
    /// The large sparse disk.
    #[arg(long, value_parser = parse_size, default_value = "62T")]
    sparse_disk: u64,
    /// Bytes written on the large sparse disk.
    #[arg(long, value_parser = parse_size, default_value = "1G")]
    sparse_written: u64,
}

/// File bytes after `marks`, with the epoch pinned (unfolded, heap) and then folded.
struct Measured {
    pinned_file: u64,
    pinned_heap: u64,
    folded_file: u64,
    secs: f64,
}

fn measure(dir: &std::path::Path, cap: u64, g: u64, marks: &[(u64, u64)]) -> anyhow::Result<Measured> {
    let t0 = Instant::now();
    // Two pins: a snapshot before the writes and one after, so the written
    // epoch stays unfolded (the epoch map holds epochs up to the oldest pin).
    let o = OwnedTracker::create(dir, cap, g, 2)?;
    o.new_epoch()?;
    for &(off, len) in marks {
        o.tracker.mark(off, len);
    }
    o.new_epoch()?;
    let pinned = o.tracker.stats();
    anyhow::ensure!(
        marks.is_empty() || pinned.unfolded_epochs == 1,
        "the written epoch should be unfolded"
    );
    o.new_epoch()?; // releases the first pin: the written epoch folds into the epoch map
    let folded = o.tracker.stats();
    anyhow::ensure!(folded.unfolded_epochs == 0, "the written epoch should be folded");
    // Skip the clean-close flush of a large file: the figures are taken.
    o.tracker.abandon();
    Ok(Measured {
        pinned_file: pinned.file_bytes,
        pinned_heap: pinned.unfolded_bytes,
        folded_file: folded.file_bytes,
        secs: t0.elapsed().as_secs_f64(),
    })
}

fn main() -> anyhow::Result<()> {
    let o = Opts::parse();
    o.common.check()?;
    let dir = o.common.mem_dir();
    let mut rep = Report::new("memory", o.common.json);
    rep.note(&format!(
        "memory: granularities {}, files in {} (file bytes = allocated blocks of the sparse file)",
        o.granularities
            .iter()
            .map(|&g| human_size(g))
            .collect::<Vec<_>>()
            .join(","),
        dir.display()
    ));
    let empty = measure(&dir, TIB, 65536, &[])?;
    rep.section("an empty tracker");
    rep.push(
        Row::new()
            .text("granularity", "64K")
            .int("file_bytes", empty.folded_file),
    );

    rep.section("fully written (per TiB = file bytes x 1 TiB / written; scaled = measured on less than 1 TiB)");
    for &g in &o.granularities {
        let written = o
            .written
            .unwrap_or(if o.common.quick && g < 65536 { 64 * GIB } else { TIB });
        let m = measure(&dir, written, g, &[(0, written)])?;
        let per_tib = |b: u64| (b as f64 * TIB as f64 / written as f64) as u64;
        rep.push(
            Row::new()
                .text("granularity", human_size(g))
                .text("written", human_size(written))
                .flag("scaled", written != TIB)
                .int("pinned_file_per_tib", per_tib(m.pinned_file))
                .int("pinned_heap_per_tib", per_tib(m.pinned_heap))
                .int("folded_file_per_tib", per_tib(m.folded_file))
                .num("folded_mib_per_tib", per_tib(m.folded_file) as f64 / MIB as f64)
                .num("secs", m.secs),
        );
    }

    let cap = o.sparse_disk;
    let w = o.sparse_written;
    rep.section(&format!("{} disk with {} written", human_size(cap), human_size(w)));
    for &g in &o.granularities {
        // Contiguous, and scattered as 64 KiB writes spread evenly.
        let pieces = (w / 65536).max(1);
        let scattered: Vec<(u64, u64)> = (0..pieces).map(|i| (cap / pieces * i / 65536 * 65536, 65536)).collect();
        for (layout, marks) in [("contiguous", vec![(0, w)]), ("scattered-64K", scattered)] {
            let m = measure(&dir, cap, g, &marks)?;
            rep.push(
                Row::new()
                    .text("granularity", human_size(g))
                    .text("layout", layout)
                    .int("pinned_file_bytes", m.pinned_file)
                    .int("pinned_heap_bytes", m.pinned_heap)
                    .int("folded_file_bytes", m.folded_file)
                    .num("folded_mib", m.folded_file as f64 / MIB as f64)
                    .num("secs", m.secs),
            );
        }
    }
    let rows = rep.rows().to_vec();
    rep.finish();
    if let Some(dir) = o.common.chart_dir()? {
        // Per granularity: the ctk file (and heap) per TiB written, in MiB.
        let written: Vec<&Row> = rows
            .iter()
            .filter(|(s, _)| s.starts_with("fully written"))
            .map(|(_, r)| r)
            .collect();
        let cats: Vec<String> = written
            .iter()
            .filter_map(|r| charts::text(r, "granularity").map(|g| format!("granularity {g}")))
            .collect();
        let mib = |key: &str| -> Vec<f64> {
            written
                .iter()
                .map(|r| charts::num(r, key).map_or(f64::NAN, |b| b / MIB as f64))
                .collect()
        };
        charts::bars(
            &dir.join("memory.svg"),
            "ctk file per TiB written: the written epoch pinned, and folded",
            "MiB per TiB written",
            &cats,
            &[
                ("pinned: file".to_owned(), mib("pinned_file_per_tib")),
                ("pinned: heap".to_owned(), mib("pinned_heap_per_tib")),
                ("folded: file".to_owned(), mib("folded_file_per_tib")),
            ],
        )?;
    }
    Ok(())
}
