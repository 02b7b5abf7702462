//! [`Request::Map`](crate::Request::Map): a disk's map (which epoch last
//! wrote each part of it), computed by [`diskmap`] from the host's
//! `QueryChangedDiskAreas` answers, like a backup application would see them.
//!
//! A map is drawn at a snapshot. Without one, it is drawn *now*: the service
//! takes a snapshot for the map, draws it, and removes it again (a stun and
//! a consolidation, as for any backup), under the VM's lifecycle lock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use diskmap::{DiskMap, Layout, MapError, MapQuery, Shape, MAX_CELLS};
use serde::{Deserialize, Serialize};

use crate::action::{ActionError, ErrorKind};
use crate::exec::Service;
use crate::reader::Reader;

/// A map to draw ([`Request::Map`](crate::Request::Map)).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MapRequest {
    /// The VM.
    pub vm: String,
    /// The disk's index.
    #[serde(default)]
    pub disk: usize,
    /// The snapshot whose disk is drawn; absent: now (a snapshot is taken
    /// for the map and removed).
    #[serde(default)]
    pub snapshot: Option<String>,
    /// Mark and outline the answer since this change ID (or `*`).
    #[serde(default)]
    pub since: Option<String>,
    /// Color the epochs of the `history` change IDs issued before the
    /// point's, whether or not their snapshots still exist, instead of
    /// those of the older snapshots (1 to 254).
    #[serde(default)]
    pub history: Option<u32>,
    /// Grid or Hilbert curve.
    #[serde(default)]
    pub layout: Layout,
    /// Most cells (default 4096, at most 65536).
    #[serde(default)]
    pub max_cells: Option<u32>,
    /// Cells per row of a grid (default 64).
    #[serde(default)]
    pub columns: Option<u32>,
}

impl MapRequest {
    /// A map of `vm`'s disk `disk` now, with the defaults.
    pub fn now(vm: &str, disk: usize) -> Self {
        MapRequest {
            vm: vm.to_owned(),
            disk,
            snapshot: None,
            since: None,
            history: None,
            layout: Layout::Grid,
            max_cells: None,
            columns: None,
        }
    }

    fn shape(&self) -> Result<Shape, ActionError> {
        let max_cells = self.max_cells.unwrap_or(Shape::PICTURE.max_cells);
        if !(1..=MAX_CELLS).contains(&max_cells) {
            return Err(ActionError::invalid(format!(
                "invalid max_cells {max_cells}: give 1 to {MAX_CELLS}"
            )));
        }
        let columns = self.columns.unwrap_or(Shape::PICTURE.columns);
        if !(1..=1024).contains(&columns) {
            return Err(ActionError::invalid(format!(
                "invalid columns {columns}: give 1 to 1024"
            )));
        }
        Ok(Shape {
            layout: self.layout,
            max_cells,
            columns,
        })
    }
}

/// How the names of the snapshots taken for maps of now begin.
pub const TRANSIENT_PREFIX: &str = "cbtsim-map-";

/// Whether snapshot `name` is one the service takes for a moment (for a
/// map of now, or a verified guest workload's epochs): no epoch of a map,
/// not in the page's chain.
pub fn is_transient(name: &str) -> bool {
    name.starts_with(TRANSIENT_PREFIX) || name.starts_with(crate::guest::SNAPSHOT_PREFIX)
}

/// Numbers the snapshots taken for maps.
static TRANSIENT: AtomicU64 = AtomicU64::new(0);

impl From<MapError> for ActionError {
    fn from(e: MapError) -> Self {
        match e {
            MapError::Vadp(v) => v.into(),
            MapError::Since { change_id, source } => {
                ActionError::from(source).context(format_args!("query since {change_id}"))
            }
            MapError::NoSnapshot(name) => ActionError::new(ErrorKind::NotFound, format!("no snapshot named {name:?}")),
            e => ActionError::invalid(e.to_string()),
        }
    }
}

impl Service {
    /// Draws the map of `r` (see the module docs).
    pub(crate) fn map(&self, r: MapRequest) -> Result<DiskMap, ActionError> {
        let shape = r.shape()?;
        if let Some(h) = r.history {
            if !(1..=254).contains(&h) {
                return Err(ActionError::invalid(format!("invalid history {h}: give 1 to 254")));
            }
        }
        let since = r.since.as_deref().map(str::trim);
        if let Some(s) = since.filter(|s| *s != "*") {
            s.parse::<tracker::ChangeId>()?;
        }
        let draw = |v: &Reader, snapshot: &str, label: &str| -> Result<DiskMap, ActionError> {
            let granularity = v.granularity(r.disk)?;
            // Snapshots the service takes for a moment are no epochs of the VM.
            let snaps: Vec<(String, Option<String>)> = v
                .snapshots()
                .into_iter()
                .filter(|s| s.name == snapshot || !is_transient(&s.name))
                .map(|s| {
                    let cid = s.disks.get(r.disk).and_then(|d| d.change_id.clone());
                    (s.name, cid)
                })
                .collect();
            let (chain, change_id) = diskmap::chain(&snaps, snapshot, r.history)?;
            let q = MapQuery {
                vm: &r.vm,
                disk: r.disk,
                snapshot,
                label,
                change_id: change_id.as_deref(),
                granularity,
                chain: &chain,
                since,
                shape,
            };
            diskmap::compute(v.protection(), &q).map_err(|e| {
                ActionError::from(e).context(format_args!("map of disk {} of VM {} at {label}", r.disk, r.vm))
            })
        };
        match &r.snapshot {
            // Read-only: through a view in a service of one command.
            Some(s) => draw(&self.reader(&r.vm)?, s, s),
            None => {
                let v = self.host().vm(&r.vm)?;
                v.capacity(r.disk)?;
                let secs = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
                let name = format!(
                    "{TRANSIENT_PREFIX}{secs:x}-{}",
                    TRANSIENT.fetch_add(1, Ordering::Relaxed)
                );
                self.create_snapshot(&r.vm, &name)
                    .map_err(|e| e.context("taking a snapshot for a map of now"))?;
                let map = draw(&Reader::Open(v), &name, "now");
                let removed = self.remove_snapshot(&r.vm, &name);
                let map = map?;
                removed.map_err(|e| e.context(format_args!("removing the map's snapshot {name}")))?;
                Ok(map)
            }
        }
    }
}
