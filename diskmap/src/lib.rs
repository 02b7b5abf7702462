//! Pictures of a disk for teaching changed-block tracking: which epoch (which
//! change ID) last wrote each part of the disk, drawn from nothing but the
//! answers of `QueryChangedDiskAreas` (the [`vadp::DataProtection`] API).
//!
//! ```text
//!  DataProtection ──changed_areas(*), (c1), .. (cn), (since)──▶ compute ──▶ DiskMap (cells, epochs, answer)
//!                                                                         ├─▶ svg::render   (cbtsim map --svg, the live page)
//!                                                                         ├─▶ png::render   (cbtsim map --png; feature "png")
//!                                                                         └─▶ term::render  (cbtsim map, cbtsim demo --map)
//! ```
//!
//! * A **cell** is a run of the disk: a power-of-two number of tracking
//!   blocks, chosen so the whole disk fits in [`Shape::max_cells`] cells (a
//!   1 GiB disk in 64 x 64 cells of 256 KiB; 62 TiB in cells of 16 GiB).
//! * A cell shows the **newest epoch** among its blocks: one color per
//!   change ID, the epoch after it (until the next change ID or the point
//!   drawn). Grey: allocated, last written before the oldest change ID
//!   drawn. White: never written. (A cell is not shaded by how much of it
//!   was written: a 4 KiB write colors its whole cell.)
//! * With a **since** change ID, the cells that its answer touches are
//!   marked and outlined, and the answer's share of the disk is exact (from
//!   its areas, not from the cells).
//!
//! Computing costs time in proportion to the areas answered and the cells,
//! not to the capacity ([`compute()`]).
//!
//! # Example
//! ```
//! use diskmap::{ChangePoint, DiskMap, MapQuery, Shape};
//! # use vadp::{DataProtection, DiskArea, DiskChangeInfo, SnapshotInfo, VadpError};
//! # /// A host whose disk of 64 MiB was written at 0 (before "u/1") and at 32 MiB (after it).
//! # struct Toy;
//! # impl DataProtection for Toy {
//! #     fn query_changed_disk_areas(&self, _: &str, _: &str, _: usize, start: u64, cid: &str) -> Result<DiskChangeInfo, VadpError> {
//! #         let mut areas = vec![DiskArea { start: 0, length: 1 << 20 }, DiskArea { start: 32 << 20, length: 4096 }];
//! #         if cid != "*" { areas.remove(0); }
//! #         Ok(DiskChangeInfo { start_offset: start, length: (64 << 20) - start, changed_area: areas })
//! #     }
//! #     fn disk_capacity(&self, _: &str, _: &str, _: usize) -> Result<u64, VadpError> { Ok(64 << 20) }
//! #     fn read_snapshot(&self, _: &str, _: &str, _: usize, _: u64, _: &mut [u8]) -> Result<(), VadpError> { Ok(()) }
//! #     fn create_snapshot(&self, _: &str, _: &str) -> Result<SnapshotInfo, VadpError> { unimplemented!() }
//! #     fn remove_snapshot(&self, _: &str, _: &str) -> Result<(), VadpError> { Ok(()) }
//! #     fn enable_change_tracking(&self, _: &str) -> Result<(), VadpError> { Ok(()) }
//! # }
//! let chain = [ChangePoint { change_id: "u/1".into(), snapshot: Some("s1".into()) }];
//! let map: DiskMap = diskmap::compute(&Toy, &MapQuery {
//!     vm: "web01", disk: 0, snapshot: "s2", label: "s2", change_id: Some("u/2"),
//!     granularity: 65536, chain: &chain, since: Some("u/1"), shape: Shape::TERMINAL,
//! })?;
//! assert_eq!(map.geometry.cell_bytes, 64 << 10);
//! assert_eq!(map.older_bytes, 1 << 20);      // written before u/1: grey
//! assert_eq!(map.epochs[0].bytes, 4096);     // written after u/1
//! assert_eq!(map.cells[0], diskmap::OLDER);
//! assert_eq!(map.cells[512], diskmap::OLDER + 1);
//! assert_eq!(map.since.as_ref().unwrap().cells, vec![512]);
//! let svg = diskmap::svg::render(&map);
//! assert!(svg.starts_with("<svg"));
//! # Ok::<(), diskmap::MapError>(())
//! ```

pub mod compute;
pub mod geometry;
#[cfg(feature = "png")]
pub mod png;
pub mod svg;
pub mod term;

pub use compute::{chain, compute, MapQuery};
pub use geometry::{Geometry, Layout, Shape, MAX_CELLS};

use serde::{Deserialize, Serialize};

/// The class of a cell never written.
pub const UNWRITTEN: u8 = 0;
/// The class of a cell written, but only before the oldest change ID drawn.
pub const OLDER: u8 = 1;

/// A change ID whose epoch gets a color.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangePoint {
    /// The change ID.
    pub change_id: String,
    /// The snapshot that issued it, if it still exists.
    pub snapshot: Option<String>,
}

/// One epoch of a map: what was written after a change ID and before the next.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Epoch {
    /// The change ID it starts at.
    pub change_id: String,
    /// The snapshot that issued it, if it still exists.
    pub from: Option<String>,
    /// Where it ends: the next change ID's snapshot (or the change ID), or the point drawn.
    pub to: String,
    /// Bytes last written in this epoch (whole tracking blocks).
    pub bytes: u64,
    /// Cells whose newest epoch this is.
    pub cells: u32,
    /// Its color, `#rrggbb`.
    pub color: String,
}

/// The answer since a change ID, as drawn.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SinceAnswer {
    /// The change ID (or `*`).
    pub change_id: String,
    /// Areas answered.
    pub areas: u64,
    /// Their bytes.
    pub bytes: u64,
    /// `bytes` over the capacity.
    pub share: f64,
    /// The cells the areas touch, ascending.
    pub cells: Vec<u32>,
}

/// A disk's map: one class per cell, the epochs' legend, and the answer
/// since a change ID.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiskMap {
    /// The VM.
    pub vm: String,
    /// The disk.
    pub disk: usize,
    /// The point drawn: a snapshot's name, or `now`.
    pub at: String,
    /// Its change ID for the disk, if any.
    pub at_change_id: Option<String>,
    /// The disk's capacity at that point.
    pub capacity: u64,
    /// The tracking granularity.
    pub granularity: u64,
    /// The cells' size and layout.
    pub geometry: Geometry,
    /// Per cell: [`UNWRITTEN`], [`OLDER`], or `OLDER + 1 + i` for `epochs[i]`.
    pub cells: Vec<u8>,
    /// Per class, its color (`#rrggbb`).
    pub colors: Vec<String>,
    /// Cells of class [`OLDER`].
    pub older_cells: u32,
    /// Cells of class [`UNWRITTEN`].
    pub unwritten_cells: u32,
    /// Bytes allocated (the answer of `*`).
    pub allocated_bytes: u64,
    /// Of those, bytes last written before the oldest epoch.
    pub older_bytes: u64,
    /// The epochs, oldest first.
    pub epochs: Vec<Epoch>,
    /// The answer since a change ID, if asked.
    pub since: Option<SinceAnswer>,
    /// What could not be drawn (change IDs left out, and why).
    pub notes: Vec<String>,
}

impl DiskMap {
    /// The class of cell `i` ([`UNWRITTEN`] past the end).
    pub fn class(&self, i: u32) -> u8 {
        self.cells.get(i as usize).copied().unwrap_or(UNWRITTEN)
    }

    /// What a class stands for, for legends (change IDs shortened, see [`short_id`]).
    pub fn describe(&self, class: u8) -> String {
        match class {
            UNWRITTEN => "never written".into(),
            OLDER => match self.epochs.first() {
                Some(e) => format!(
                    "written before {}",
                    e.from.clone().unwrap_or_else(|| short_id(&e.change_id))
                ),
                None => "written (no older change ID to tell epochs apart)".into(),
            },
            c => {
                let e = &self.epochs[usize::from(c - OLDER - 1)];
                let from = e.from.clone().unwrap_or_else(|| short_id(&e.change_id));
                format!("after {from} until {}", short_id(&e.to))
            }
        }
    }
}

/// A change ID of the form `SESSION/SEQUENCE` with the session cut to 8
/// characters (`d3220466…/2`); anything else as it is.
pub fn short_id(s: &str) -> String {
    match s.rsplit_once('/') {
        Some((session, seq)) if session.len() > 9 && session.is_char_boundary(8) => {
            format!("{}…/{seq}", &session[..8])
        }
        _ => s.to_owned(),
    }
}

/// Why a map could not be drawn.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MapError {
    /// A query failed.
    #[error(transparent)]
    Vadp(#[from] vadp::VadpError),
    /// The query since the change ID to outline failed.
    #[error("query since {change_id}: {source}")]
    Since {
        /// The change ID.
        change_id: String,
        /// Why.
        #[source]
        source: vadp::VadpError,
    },
    /// No such snapshot.
    #[error("no snapshot named {0:?}")]
    NoSnapshot(String),
    /// Something else about the request.
    #[error("{0}")]
    InvalidArgument(String),
}

/// White for never written, grey for older, then one color per epoch.
const WHITE: &str = "#ffffff";
const GREY: &str = "#bdbdbd";
/// Distinct colors for up to nine epochs (Tableau 10 without its grey).
const EPOCH_COLORS: [&str; 9] = [
    "#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#b07aa1", "#76b7b2", "#edc948", "#9c755f", "#ff9da7",
];

/// The colors of a map with `epochs` epochs, indexed by class.
pub fn palette(epochs: usize) -> Vec<String> {
    let mut out = vec![WHITE.to_owned(), GREY.to_owned()];
    if epochs <= EPOCH_COLORS.len() {
        out.extend(EPOCH_COLORS[..epochs].iter().map(|c| (*c).to_owned()));
    } else {
        // Evenly spread hues, oldest blue-violet to newest red.
        out.extend((0..epochs).map(|i| hsl(240.0 * (1.0 - i as f64 / (epochs - 1) as f64), 0.65, 0.5)));
    }
    out
}

fn hsl(h: f64, s: f64, l: f64) -> String {
    let c = (1.0 - (2.0 * l - 1.0).abs()) * s;
    let x = c * (1.0 - ((h / 60.0) % 2.0 - 1.0).abs());
    let (r, g, b) = match (h / 60.0) as u32 {
        0 => (c, x, 0.0),
        1 => (x, c, 0.0),
        2 => (0.0, c, x),
        3 => (0.0, x, c),
        4 => (x, 0.0, c),
        _ => (c, 0.0, x),
    };
    let m = l - c / 2.0;
    let v = |f: f64| ((f + m) * 255.0).round().clamp(0.0, 255.0) as u8;
    format!("#{:02x}{:02x}{:02x}", v(r), v(g), v(b))
}

/// `#rrggbb` as numbers (black if malformed).
pub fn rgb(color: &str) -> (u8, u8, u8) {
    let n = color
        .strip_prefix('#')
        .and_then(|h| u32::from_str_radix(h, 16).ok())
        .unwrap_or(0);
    ((n >> 16) as u8, (n >> 8) as u8, n as u8)
}

/// `n` bytes for people: `64 KiB`, `1.5 GiB`, `100 bytes`.
pub fn human(n: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < 1024 {
        return if n == 1 { "1 byte".into() } else { format!("{n} bytes") };
    }
    let mut v = n as f64 / 1024.0;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if v.fract() == 0.0 {
        format!("{v:.0} {}", UNITS[u])
    } else if v < 10.0 {
        format!("{v:.2} {}", UNITS[u])
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// A share as a percentage with enough digits to be non-zero when it is.
pub fn percent(share: f64) -> String {
    let p = share * 100.0;
    if p == 0.0 || p >= 10.0 {
        format!("{p:.1}%")
    } else if p >= 0.1 {
        format!("{p:.2}%")
    } else {
        format!("{p:.2e}%")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn palettes_are_distinct() {
        for n in [0, 1, 9, 10, 40] {
            let p = palette(n);
            assert_eq!(p.len(), n + 2);
            let set: std::collections::HashSet<_> = p.iter().collect();
            assert_eq!(set.len(), p.len(), "{p:?}");
            assert!(p.iter().all(|c| c.len() == 7 && c.starts_with('#')), "{p:?}");
        }
        assert_eq!(rgb("#4e79a7"), (0x4e, 0x79, 0xa7));
    }

    #[test]
    fn sizes_read_well() {
        assert_eq!(human(1), "1 byte");
        assert_eq!(human(65536), "64 KiB");
        assert_eq!(human(62 << 40), "62 TiB");
        assert_eq!(human(1536 << 20), "1.50 GiB");
        assert_eq!(percent(0.5), "50.0%");
        assert_eq!(percent(0.0123), "1.23%");
    }
}
