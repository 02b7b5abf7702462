//! `cbtsim map`: a disk drawn as cells colored by the epoch (change ID) that
//! last wrote them, from the host's QueryChangedDiskAreas answers
//! ([`diskmap`], through [`service::Request::Map`]). In the terminal (half
//! blocks, 24-bit color), as SVG (`--svg`), PNG (`--png`) or JSON (`--json`).

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::Args;
use diskmap::{DiskMap, Layout, Shape};
use service::{MapRequest, Request, Response};

use super::dispatch::{answer, request as request_to};
use super::{disk_arg, print_json, Ctx};

/// Arguments of `cbtsim map`.
#[derive(Debug, Args)]
pub struct MapArgs {
    /// The VM.
    pub vm: String,
    /// The disk's index.
    #[arg(long, value_name = "DISK", default_value = "0")]
    pub disk: String,
    /// Draw the disk at this snapshot. Without it: now (a snapshot is taken
    /// for the map and removed again, as a backup would).
    #[arg(long, value_name = "SNAP")]
    pub snapshot: Option<String>,
    /// Mark and outline the answer since this change ID (or `*`), and print
    /// its share of the disk.
    #[arg(long, value_name = "CHANGE_ID")]
    pub since: Option<String>,
    /// Color the epochs of the last N change IDs, also of snapshots since
    /// removed (a scenario's), instead of those of the older snapshots.
    #[arg(long, value_name = "N")]
    pub history: Option<u32>,
    /// `grid` (rows from offset 0 at the top left) or `hilbert` (a Hilbert
    /// curve: a run of the disk stays a compact blob).
    #[arg(long, default_value = "grid")]
    pub layout: Layout,
    /// Most cells (default: 4096 for pictures and JSON, 1024 in the terminal).
    #[arg(long, value_name = "N")]
    pub cells: Option<u32>,
    /// Write the picture as SVG.
    #[arg(long, value_name = "FILE")]
    pub svg: Option<PathBuf>,
    /// Write the picture as PNG.
    #[arg(long, value_name = "FILE")]
    pub png: Option<PathBuf>,
    /// Print the map as JSON: cells, epochs, the answer's cells.
    #[arg(long)]
    pub json: bool,
}

/// Runs `cbtsim map`.
pub fn run(ctx: &Ctx, a: &MapArgs) -> anyhow::Result<()> {
    let disk = disk_arg(&a.disk)?;
    let picture = a.svg.is_some() || a.png.is_some() || a.json;
    let shape = if picture { Shape::PICTURE } else { Shape::TERMINAL };
    let request = MapRequest {
        vm: a.vm.clone(),
        disk,
        snapshot: a.snapshot.clone(),
        since: a.since.clone(),
        history: a.history,
        layout: a.layout,
        max_cells: Some(a.cells.unwrap_or(shape.max_cells)),
        columns: Some(shape.columns),
    };
    // To the datastore's serve, or a service of this process.
    let map = answer!(request_to(ctx, Request::Map(request), &())?, Response::Map(m) => *m);
    if let Some(path) = &a.svg {
        write(path, diskmap::svg::render(&map).as_bytes())?;
    }
    if let Some(path) = &a.png {
        let (png, fonts) = diskmap::png::render(&map)?;
        write(path, &png)?;
        if !fonts {
            eprintln!("cbtsim: warning: no font found on this system: the PNG has no text (the SVG has)");
        }
    }
    if a.json {
        return print_json(&map);
    }
    if picture {
        print!("{}", summary(&map, a));
    } else {
        print!("{}", diskmap::term::render(&map));
    }
    Ok(())
}

fn write(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    std::fs::write(path, bytes).with_context(|| format!("cannot write {}", path.display()))
}

/// What was drawn, in words, for files written.
fn summary(map: &DiskMap, a: &MapArgs) -> String {
    let g = &map.geometry;
    let mut s = String::new();
    for (what, path) in [("SVG", &a.svg), ("PNG", &a.png)] {
        if let Some(p) = path {
            s.push_str(&format!("wrote {what} {}\n", p.display()));
        }
    }
    let at = match &map.at_change_id {
        Some(c) => format!("{} ({c})", map.at),
        None => map.at.clone(),
    };
    s.push_str(&format!(
        "VM {} disk {} at {at}: {} in {} cells of {}\n",
        map.vm,
        map.disk,
        diskmap::human(map.capacity),
        g.cells,
        diskmap::human(g.cell_bytes)
    ));
    s.push_str(&diskmap::term::legend(map, false));
    s
}
