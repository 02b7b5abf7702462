//! A VM's configuration file (`vm.json`), written atomically after every
//! lifecycle operation, so the datastore is consistent between commands.

use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::SimError;

/// A VM's persistent configuration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VmConfig {
    /// Format version.
    pub version: u32,
    /// The VM's name.
    pub name: String,
    /// Change tracking on or off.
    pub cbt: bool,
    /// Power state.
    pub powered_on: bool,
    /// The disks.
    pub disks: Vec<DiskConfig>,
    /// Snapshots, oldest first.
    pub snapshots: Vec<SnapshotConfig>,
    /// The next layer id to hand out.
    pub next_layer: u64,
    /// A revert saved before its stun and not finished yet: per disk, the
    /// sequence of the snapshot reverted to. The next open marks what the
    /// revert changed back (marking again is harmless), then clears it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_revert: Option<Vec<u64>>,
}

/// A disk's persistent configuration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DiskConfig {
    /// Live capacity in bytes.
    pub capacity: u64,
    /// Tracking granularity in bytes.
    pub granularity: u64,
    /// Layer ids, base first; the last is the live top.
    pub chain: Vec<u64>,
}

/// A snapshot's persistent record.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SnapshotConfig {
    /// Its name.
    pub name: String,
    /// Seconds since the Unix epoch.
    pub created: u64,
    /// Per disk.
    pub disks: Vec<SnapshotDiskConfig>,
}

/// A snapshot's view of one disk.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SnapshotDiskConfig {
    /// The tracker epoch the snapshot closed.
    pub seq: u64,
    /// The disk's capacity at the snapshot.
    pub capacity: u64,
    /// The topmost layer of the snapshot's view.
    pub view_top: u64,
}

/// 2: a delta's grain map (`L<id>.map`) is a flat bitmap with one summary bit
/// per 4 KiB page (`tracker::AtomicBitmap`); 1 had summary levels.
pub(crate) const CONFIG_VERSION: u32 = 2;

impl VmConfig {
    pub(crate) fn load(path: &Path) -> Result<Self, SimError> {
        let text = std::fs::read_to_string(path).map_err(|source| SimError::Io {
            path: path.to_owned(),
            source,
        })?;
        let c: Self = serde_json::from_str(&text).map_err(|e| SimError::Config {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        if c.version != CONFIG_VERSION {
            return Err(SimError::Config {
                path: path.to_owned(),
                reason: format!("version {} is not supported", c.version),
            });
        }
        Ok(c)
    }

    /// Writes to a temporary file, syncs it, and renames it over `path`.
    pub(crate) fn save(&self, path: &Path) -> Result<(), SimError> {
        let io = |source| SimError::Io {
            path: path.to_owned(),
            source,
        };
        let tmp = path.with_extension("json.tmp");
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        let text = serde_json::to_vec_pretty(self).expect("config serialises");
        f.write_all(&text).map_err(io)?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }
}
