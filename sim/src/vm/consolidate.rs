//! Consolidation: merging a removed snapshot's delta into its parent while the guest writes.

use super::Vm;
use crate::config::VmConfig;
use crate::error::SimError;

/// Consolidation finishes under the stun once the helper delta holds at most
/// this many grains (a few hundred microseconds of copying).
const SMALL_HELPER_GRAINS: u64 = 256;
/// Rounds of consolidation before the helper delta is kept as the live top.
const MAX_MERGE_ROUNDS: usize = 8;

impl Vm {
    /// Saves the configuration with `layer` in disk `d`'s chain on top.
    fn save_with_top(&self, cfg: &mut VmConfig, d: usize, layer: u64) -> Result<(), SimError> {
        let mut next = cfg.clone();
        self.save(&mut next)?;
        next.disks[d].chain.push(layer);
        next.save(&self.dir.join("vm.json"))?;
        *cfg = next;
        Ok(())
    }

    /// Saves the configuration without `layer` in disk `d`'s chain.
    fn save_without(&self, cfg: &mut VmConfig, d: usize, layer: u64) -> Result<(), SimError> {
        self.save(cfg)?;
        cfg.disks[d].chain.retain(|&l| l != layer);
        cfg.save(&self.dir.join("vm.json"))
    }

    /// Merges every layer that no snapshot needs into the layer below it:
    /// what a removal killed half way left, or the helper delta a removal
    /// kept as the live top because the guest wrote faster than it merged
    /// (vSphere's "consolidation needed"). Then deletes the files of layers
    /// that no chain names. Returns how many layers were merged. The VM's
    /// open calls it; a running host may call it at any time.
    pub fn consolidate(&self) -> Result<usize, SimError> {
        let mut cfg = self.meta.lock();
        let mut merged = 0;
        // Bounded: with a guest writing faster than a merge copies, a removal
        // may keep a helper delta again; the next call continues.
        for _ in 0..MAX_MERGE_ROUNDS {
            let Some((d, p)) = self.unneeded_layer(&cfg) else {
                break;
            };
            self.merge_above(&mut cfg, d, p)?;
            merged += 1;
        }
        self.remove_orphans(&cfg)?;
        Ok(merged)
    }

    /// Whether a layer of some disk is not needed by any snapshot (see
    /// [`consolidate`](Self::consolidate)).
    pub fn needs_consolidation(&self) -> bool {
        self.unneeded_layer(&self.meta.lock()).is_some()
    }

    /// A disk and the id of a layer below its live top that is not the view of
    /// any snapshot: the layer above it belongs merged into it.
    fn unneeded_layer(&self, cfg: &VmConfig) -> Option<(usize, u64)> {
        cfg.disks.iter().enumerate().find_map(|(d, dc)| {
            let below_top = &dc.chain[..dc.chain.len().saturating_sub(1)];
            below_top
                .iter()
                .find(|&&id| !cfg.snapshots.iter().any(|s| s.disks[d].view_top == id))
                .map(|&id| (d, id))
        })
    }

    /// Deletes layer files (`L<id>.map`, `L<id>.<k>.ext`) of layers that no
    /// chain names: left by a process killed between unlinking a layer from
    /// the configuration and deleting its files.
    fn remove_orphans(&self, cfg: &VmConfig) -> Result<(), SimError> {
        for (d, dc) in cfg.disks.iter().enumerate() {
            let dir = &self.disks[d].dir;
            let rd = std::fs::read_dir(dir).map_err(|source| SimError::Io {
                path: dir.clone(),
                source,
            })?;
            for entry in rd.flatten() {
                let name = entry.file_name();
                let id = name
                    .to_str()
                    .and_then(|n| n.strip_prefix('L'))
                    .and_then(|n| n.split('.').next())
                    .and_then(|n| n.parse::<u64>().ok());
                if let Some(id) = id {
                    if !dc.chain.contains(&id) {
                        let _ = std::fs::remove_file(entry.path());
                    }
                }
            }
        }
        Ok(())
    }

    /// Merges the layer above `p_id` into `p_id` (its snapshot is gone).
    pub(super) fn merge_above(&self, cfg: &mut VmConfig, d: usize, p_id: u64) -> Result<(), SimError> {
        let (p, mut c, c_is_top) = {
            let io = self.gate();
            let chain = &io.disks[d].chain;
            let pos = chain
                .iter()
                .position(|l| l.id == p_id)
                .expect("a snapshot's view is in the chain");
            (chain[pos].clone(), chain[pos + 1].clone(), pos + 2 == chain.len())
        };
        if !c_is_top {
            // Both layers are frozen: copy, then unlink C in a brief stun.
            fault_point!(crate::fault::Point::Consolidating { disk: d, round: 0 });
            c.merge_into(&p)?;
            for s in &mut cfg.snapshots {
                if s.disks[d].view_top == c.id {
                    s.disks[d].view_top = p_id;
                }
            }
            self.save_without(cfg, d, c.id)?;
            self.stun().guard.disks[d].chain.retain(|l| l.id != c.id);
            fault_point!(crate::fault::Point::Unlinked { disk: d, round: 0 });
            c.delete_files();
            return Ok(());
        }
        // C is the live top: freeze it behind a helper delta H, merge C while
        // the guest writes into H, unlink C; repeat with H until it is small
        // enough to merge inside a stun.
        for round in 1..=MAX_MERGE_ROUNDS {
            let h = self.new_delta(cfg, d)?;
            self.save_with_top(cfg, d, h.id)?;
            self.stun().guard.disks[d].chain.push(h.clone());
            fault_point!(crate::fault::Point::Consolidating { disk: d, round });
            c.merge_into(&p)?;
            self.save_without(cfg, d, c.id)?;
            let small = h.grain_count() <= SMALL_HELPER_GRAINS;
            if small {
                // The merge below runs inside the stun: fault in the pages it
                // writes first (grains the guest adds meanwhile still fault).
                h.prefault_merge(&p)?;
            }
            {
                let mut stun = self.stun();
                let chain = &mut stun.guard.disks[d].chain;
                chain.retain(|l| l.id != c.id);
                if small {
                    h.merge_into(&p)?;
                    // The guest writes into P once the stun ends, while the saved
                    // configuration still names H above P until `save_without`
                    // below: a process killed in between must not reopen H's
                    // older copies over those writes. Empty H first.
                    h.forget_grains();
                    chain.retain(|l| l.id != h.id);
                }
            }
            fault_point!(crate::fault::Point::Unlinked { disk: d, round });
            c.delete_files();
            if small {
                self.save_without(cfg, d, h.id)?;
                h.delete_files();
                return Ok(());
            }
            if round == MAX_MERGE_ROUNDS {
                // The guest writes faster than we merge: keep H as the live
                // top (one extra delta), correct and bounded.
                return Ok(());
            }
            c = h;
        }
        Ok(())
    }
}
