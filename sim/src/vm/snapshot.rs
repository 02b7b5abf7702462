//! Snapshots: create, list, remove (consolidating), revert.

use vadp::{SnapshotDisk, SnapshotInfo};

use super::{check_name, now_secs, SnapshotSummary, Vm, MAX_SNAPSHOTS};
use crate::config::{SnapshotConfig, SnapshotDiskConfig, VmConfig};
use crate::error::SimError;

impl Vm {
    /// Creates snapshot `name`: stuns I/O briefly, closes an epoch on every
    /// disk (issuing its change ID) and redirects writes to new deltas.
    ///
    /// Crash safety: the configuration naming the new snapshot and deltas is
    /// saved before the stun, so a crash at any point leaves a datastore whose
    /// every view is a valid point in time.
    pub fn create_snapshot(&self, name: &str) -> Result<SnapshotInfo, SimError> {
        check_name(name)?;
        let mut cfg = self.meta.lock();
        if cfg.snapshots.iter().any(|s| s.name == name) {
            return Err(SimError::SnapshotExists {
                vm: self.name.clone(),
                name: name.to_owned(),
            });
        }
        if cfg.snapshots.len() >= MAX_SNAPSHOTS {
            return Err(SimError::TooManySnapshots(self.name.clone()));
        }
        // Everything that costs time happens before the stun.
        let mut next = cfg.clone();
        let mut new_layers = Vec::new();
        let mut snap_disks = Vec::new();
        for (i, d) in self.disks.iter().enumerate() {
            d.tracker.settle();
            let delta = self.new_delta(&mut next, i)?;
            let id = delta.id;
            new_layers.push(delta);
            let view_top = *next.disks[i].chain.last().expect("base layer");
            // Lifecycle operations are serialised by `meta`, so the epoch the
            // stun will close is known now.
            let seq = d.tracker.last_closed() + 1;
            snap_disks.push(SnapshotDiskConfig {
                seq,
                capacity: next.disks[i].capacity,
                view_top,
            });
            next.disks[i].chain.push(id);
        }
        let snap = SnapshotConfig {
            name: name.to_owned(),
            created: now_secs(),
            disks: snap_disks,
        };
        next.snapshots.push(snap.clone());
        next.save(&self.dir.join("vm.json"))?;
        {
            let mut stun = self.stun();
            for (i, d) in stun.guard.disks.iter_mut().enumerate() {
                let seq = self.disks[i].tracker.close_epoch()?;
                debug_assert_eq!(seq, snap.disks[i].seq);
                d.chain.push(new_layers[i].clone());
            }
        }
        for d in &self.disks {
            d.tracker.settle();
        }
        *cfg = next;
        Ok(SnapshotInfo {
            name: name.to_owned(),
            disks: self.snapshot_disks(&snap),
        })
    }

    fn snapshot_disks(&self, s: &SnapshotConfig) -> Vec<SnapshotDisk> {
        s.disks
            .iter()
            .enumerate()
            .map(|(i, sd)| SnapshotDisk {
                disk: i,
                capacity: sd.capacity,
                granularity: self.disks[i].tracker.granularity().bytes(),
                change_id: self.disks[i].tracker.change_id(sd.seq).map(|c| c.to_string()),
            })
            .collect()
    }

    /// The snapshots, oldest first.
    pub fn snapshots(&self) -> Vec<SnapshotSummary> {
        let cfg = self.meta.lock();
        cfg.snapshots
            .iter()
            .map(|s| SnapshotSummary {
                name: s.name.clone(),
                created: s.created,
                disks: self.snapshot_disks(s),
            })
            .collect()
    }

    /// Removes snapshot `name`, consolidating its delta while the guest keeps
    /// writing. Works for any snapshot of the chain, not only the newest.
    ///
    /// Crash safety: the snapshot leaves the configuration first; a layer
    /// joins the configuration before it joins the chain, and leaves it only
    /// after its data was merged into its parent; files go last.
    pub fn remove_snapshot(&self, name: &str) -> Result<(), SimError> {
        let mut cfg = self.meta.lock();
        let idx = self.snapshot_index(&cfg, name)?;
        let snap = cfg.snapshots.remove(idx);
        self.save(&mut cfg)?;
        for (d, sd) in snap.disks.iter().enumerate() {
            self.merge_above(&mut cfg, d, sd.view_top)?;
            self.disks[d].tracker.unpin(sd.seq);
        }
        Ok(())
    }

    fn snapshot_index(&self, cfg: &VmConfig, name: &str) -> Result<usize, SimError> {
        cfg.snapshots
            .iter()
            .position(|s| s.name == name)
            .ok_or_else(|| SimError::NoSuchSnapshot {
                vm: self.name.clone(),
                name: name.to_owned(),
            })
    }

    /// Reverts the VM to snapshot `name`: every disk's content becomes the
    /// snapshot's; newer snapshots are deleted (a chain, not a tree). The
    /// blocks the revert changes back are marked as changed, so change IDs
    /// issued after the snapshot keep answering correctly.
    pub fn revert_to_snapshot(&self, name: &str) -> Result<(), SimError> {
        let mut cfg = self.meta.lock();
        let idx = self.snapshot_index(&cfg, name)?;
        let target = cfg.snapshots[idx].clone();
        let mut next = cfg.clone();
        let newer: Vec<SnapshotConfig> = next.snapshots.drain(idx + 1..).collect();
        let mut new_layers = Vec::new();
        for (i, d) in self.disks.iter().enumerate() {
            d.tracker.settle();
            let delta = self.new_delta(&mut next, i)?;
            let id = delta.id;
            new_layers.push(delta);
            let sd = &target.disks[i];
            let chain = &mut next.disks[i].chain;
            let pos = chain.iter().position(|&l| l == sd.view_top).expect("view in chain");
            chain.truncate(pos + 1);
            chain.push(id);
            next.disks[i].capacity = sd.capacity;
        }
        // Journalled: killed after this save, the next open marks what the
        // revert changes back (the chain it names is already the reverted one).
        next.pending_revert = Some(target.disks.iter().map(|d| d.seq).collect());
        next.save(&self.dir.join("vm.json"))?;
        fault_point!(crate::fault::Point::Reverting);
        let mut dropped = Vec::new();
        {
            let mut stun = self.stun();
            for (d, dio) in stun.guard.disks.iter_mut().enumerate() {
                let sd = &target.disks[d];
                self.disks[d].tracker.rewind_to(sd.seq)?;
                let pos = dio
                    .chain
                    .iter()
                    .position(|l| l.id == sd.view_top)
                    .expect("view in chain");
                dropped.extend(dio.chain.drain(pos + 1..));
                dio.chain.push(new_layers[d].clone());
                dio.capacity = sd.capacity;
            }
        }
        for s in &newer {
            for (d, sd) in s.disks.iter().enumerate() {
                self.disks[d].tracker.unpin(sd.seq);
            }
        }
        next.pending_revert = None;
        next.save(&self.dir.join("vm.json"))?;
        for l in dropped {
            l.delete_files();
        }
        *cfg = next;
        Ok(())
    }

    /// Finishes a revert that a killed process saved but may not have marked:
    /// marks again what it changes back (before any guest write), then clears
    /// the journal.
    pub(super) fn finish_revert(&self) -> Result<(), SimError> {
        let mut cfg = self.meta.lock();
        let Some(seqs) = cfg.pending_revert.clone() else {
            return Ok(());
        };
        {
            let _stun = self.stun();
            for (d, &seq) in seqs.iter().enumerate() {
                self.disks[d].tracker.rewind_to(seq)?;
            }
        }
        cfg.pending_revert = None;
        cfg.save(&self.dir.join("vm.json"))
    }
}
