//! `cbtsim query`: QueryChangedDiskAreas of a snapshot's disk, paged to the disk's end by
//! the checked pager [`vadp::changed_areas`].

use anyhow::Context as _;
use clap::Args;

use super::{disk_arg, exact, vm_view, Ctx};

/// `cbtsim query`: QueryChangedDiskAreas, paged through the whole disk.
#[derive(Debug, Args)]
pub struct QueryArgs {
    /// The VM.
    pub vm: String,
    /// The snapshot whose disk is asked about.
    #[arg(long, value_name = "SNAP")]
    pub snapshot: String,
    /// The disk's index.
    #[arg(long, value_name = "DISK", default_value = "0")]
    pub disk: String,
    /// A change ID, or `*` for every allocated area.
    #[arg(long, value_name = "CHANGE_ID")]
    pub since: String,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `query --json`.
#[derive(Debug, serde::Serialize)]
struct QueryOut<'a> {
    disk_size: u64,
    granularity: u64,
    since: &'a str,
    change_id: Option<String>,
    changed_areas: Vec<(u64, u64)>,
    changed_bytes: u64,
}

/// Runs `cbtsim query`.
pub fn run(ctx: &Ctx, a: &QueryArgs) -> anyhow::Result<()> {
    let d = disk_arg(&a.disk)?;
    let since = a.since.trim();
    if since != "*" {
        since
            .parse::<tracker::ChangeId>()
            .with_context(|| format!("invalid --since {since:?}"))?;
    }
    // Read-only: a query takes no exclusive lock and writes nothing.
    let v = vm_view(ctx, &a.vm)?;
    let cap = v.snapshot_capacity(&a.snapshot, d)?;
    let granularity = v.granularity(d)?;
    let change_id = v
        .snapshots()
        .into_iter()
        .find(|s| s.name == a.snapshot)
        .and_then(|s| s.disks.into_iter().nth(d))
        .and_then(|sd| sd.change_id);
    let areas = vadp::changed_areas(&v, &a.vm, &a.snapshot, d, since)
        .map(|r| r.map(|x| (x.start, x.length)))
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("query of disk {d} of snapshot {} since {since}", a.snapshot))?;
    let changed_bytes = areas.iter().map(|&(_, l)| l).sum();
    if a.json {
        let out = QueryOut {
            disk_size: cap,
            granularity,
            since,
            change_id,
            changed_areas: areas,
            changed_bytes,
        };
        println!("{}", serde_json::to_string(&out)?);
    } else {
        println!(
            "disk {d} of snapshot {} ({}, granularity {}), changed since {since}: {} area(s), {changed_bytes} bytes",
            a.snapshot,
            exact(cap),
            exact(granularity),
            areas.len()
        );
        for (s, l) in &areas {
            println!("{s} +{l}");
        }
        if let Some(c) = change_id {
            println!("this snapshot's change ID: {c}");
        }
    }
    Ok(())
}
