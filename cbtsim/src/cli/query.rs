//! `cbtsim query`: QueryChangedDiskAreas of a snapshot's disk, paged to the disk's end by
//! the checked pager [`vadp::changed_areas`].

use clap::Args;
use service::{Request, Response};

use super::dispatch::{answer, request};
use super::{disk_arg, exact, Ctx};

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
    let r = request(
        ctx,
        Request::Query {
            vm: a.vm.clone(),
            snapshot: a.snapshot.clone(),
            disk: d,
            since: a.since.clone(),
        },
        &(),
    )?;
    let c = answer!(r, Response::ChangedAreas(c) => c);
    let areas: Vec<(u64, u64)> = c.areas.iter().map(|x| (x.start, x.length)).collect();
    if a.json {
        let out = QueryOut {
            disk_size: c.disk_size,
            granularity: c.granularity,
            since: &c.since,
            change_id: c.change_id,
            changed_areas: areas,
            changed_bytes: c.changed_bytes,
        };
        println!("{}", serde_json::to_string(&out)?);
    } else {
        println!(
            "disk {d} of snapshot {} ({}, granularity {}), changed since {}: {} area(s), {} bytes",
            c.snapshot,
            exact(c.disk_size),
            exact(c.granularity),
            c.since,
            areas.len(),
            c.changed_bytes
        );
        for (s, l) in &areas {
            println!("{s} +{l}");
        }
        if let Some(cid) = c.change_id {
            println!("this snapshot's change ID: {cid}");
        }
    }
    Ok(())
}
