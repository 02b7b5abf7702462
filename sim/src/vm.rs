//! A virtual machine: its disks, the I/O gate, snapshots and lifecycle.
//!
//! ```text
//!  vCPU threads ──write──▶ gate (ShardedLock, read side) ──▶ top layer (COW) + tracker.mark
//!  snapshot/remove/revert/extend ──▶ gate (write side = stun) ──▶ O(1) switch
//! ```
//! Guest I/O holds the read side of a [`ShardedLock`] (one shard per thread,
//! so vCPUs do not contend). Every operation that changes what a write means
//! (which layer it lands in, which epoch it belongs to, the capacity) takes
//! the write side: the *stun*. While stunned it does only O(1) work; copying
//! (consolidation) and draining/folding the tracker happen outside it.
//!
//! The ordering invariant follows: a write holds the gate from its mark to
//! the end of its data copy, so it lies wholly before or wholly after any
//! epoch switch; and it is marked before its data lands, so a failed write
//! can be over-reported but never lost.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crossbeam_utils::sync::{ShardedLock, ShardedLockReadGuard, ShardedLockWriteGuard};
use parking_lot::Mutex;
use tracker::{Granularity, Since, Tracker, MAX_CAPACITY};
use vadp::{DiskArea, DiskChangeInfo, SnapshotDisk, SnapshotInfo};

use crate::config::{DiskConfig, SnapshotConfig, SnapshotDiskConfig, VmConfig, CONFIG_VERSION};
use crate::error::SimError;
use crate::layer::{read_chain, Layer, Src, MAX_GRAIN};

/// How many of the most recent stun times a VM keeps.
pub const STUN_LOG: usize = 1 << 16;
/// Most snapshots a VM may have (as ESXi).
pub const MAX_SNAPSHOTS: usize = 32;
/// Default cap on areas per `QueryChangedDiskAreas` page (VMware's observed value).
pub const DEFAULT_MAX_AREAS: usize = 2000;
/// Consolidation finishes under the stun once the helper delta holds at most
/// this many grains (a few hundred microseconds of copying).
const SMALL_HELPER_GRAINS: u64 = 256;
/// Rounds of consolidation before the helper delta is kept as the live top.
const MAX_MERGE_ROUNDS: usize = 8;

/// The shape of a new disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskSpec {
    /// Capacity in bytes.
    pub capacity: u64,
    /// Tracking granularity.
    pub granularity: Granularity,
}

/// A summary of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SnapshotSummary {
    /// Its name.
    pub name: String,
    /// Seconds since the Unix epoch.
    pub created: u64,
    /// Per disk: capacity and change ID (absent when CBT was off).
    pub disks: Vec<SnapshotDisk>,
}

#[derive(Debug)]
struct DiskIo {
    capacity: u64,
    chain: Vec<Arc<Layer>>,
}

#[derive(Debug)]
struct VmIo {
    powered_on: bool,
    disks: Vec<DiskIo>,
}

#[derive(Debug)]
struct DiskShared {
    dir: PathBuf,
    tracker: Tracker,
    grain_shift: u32,
}

/// A virtual machine of the simulated host.
#[derive(Debug)]
pub struct Vm {
    name: String,
    dir: PathBuf,
    _lock: File,
    io: ShardedLock<VmIo>,
    disks: Vec<DiskShared>,
    /// The configuration; holding it serialises lifecycle operations.
    meta: Mutex<VmConfig>,
    /// The most recent stun times (ns), oldest first.
    stun_ns: Mutex<std::collections::VecDeque<u64>>,
    max_areas: std::sync::atomic::AtomicUsize,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SimError + '_ {
    move |source| SimError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Names of VMs and snapshots: safe as file names, unambiguous in a CLI.
pub fn check_name(name: &str) -> Result<(), SimError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(SimError::BadName(name.to_owned()))
    }
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn lock_vm(dir: &Path, name: &str) -> Result<File, SimError> {
    let path = dir.join("vm.lock");
    let f = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_err(&path))?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(std::fs::TryLockError::WouldBlock) => Err(SimError::VmInUse(name.to_owned())),
        Err(std::fs::TryLockError::Error(e)) => Err(io_err(&path)(e)),
    }
}

impl Vm {
    /// Creates a VM in `dir` (which must not exist) with CBT on and power on.
    pub(crate) fn create(dir: &Path, name: &str, specs: &[DiskSpec]) -> Result<Self, SimError> {
        check_name(name)?;
        if specs.is_empty() {
            return Err(SimError::BadSize {
                size: 0,
                reason: "a VM needs at least one disk".into(),
            });
        }
        for s in specs {
            check_capacity(s.capacity)?;
        }
        std::fs::create_dir(dir).map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => SimError::VmExists(name.to_owned()),
            _ => io_err(dir)(e),
        })?;
        let cfg = VmConfig {
            version: CONFIG_VERSION,
            name: name.to_owned(),
            cbt: true,
            powered_on: true,
            disks: specs
                .iter()
                .map(|s| DiskConfig {
                    capacity: s.capacity,
                    granularity: s.granularity.bytes(),
                    chain: vec![0],
                })
                .collect(),
            snapshots: Vec::new(),
            next_layer: 1,
        };
        let lock = lock_vm(dir, name)?;
        let mut trackers = Vec::new();
        for (i, s) in specs.iter().enumerate() {
            let ddir = dir.join(format!("disk{i}"));
            std::fs::create_dir(&ddir).map_err(io_err(&ddir))?;
            trackers.push(Tracker::create(&ddir.join("disk.ctk"), s.capacity, s.granularity)?);
        }
        cfg.save(&dir.join("vm.json"))?;
        // Keep the locks we hold: releasing and retaking them races with a
        // child process forked elsewhere in this process, which holds our
        // lock's file description until it execs.
        Self::open_locked(dir, cfg, lock, trackers)
    }

    /// Opens the VM stored in `dir`, taking its lock.
    pub(crate) fn open(dir: &Path) -> Result<Self, SimError> {
        let cfg = VmConfig::load(&dir.join("vm.json"))?;
        let lock = lock_vm(dir, &cfg.name)?;
        Self::open_locked(dir, cfg, lock, Vec::new())
    }

    /// Opens the VM with its lock held; `created` are trackers already open
    /// (a new VM's), the others are opened from their files.
    fn open_locked(dir: &Path, cfg: VmConfig, lock: File, created: Vec<Tracker>) -> Result<Self, SimError> {
        let mut created = created.into_iter();
        let mut disks = Vec::new();
        let mut io_disks = Vec::new();
        for (i, dc) in cfg.disks.iter().enumerate() {
            let ddir = dir.join(format!("disk{i}"));
            let tracker = match created.next() {
                Some(t) => t,
                None => Tracker::open(&ddir.join("disk.ctk"))?,
            };
            // A crash between saving a new snapshot and its stun leaves a
            // snapshot whose epoch was never closed. Its view is the disk as
            // it is now (its delta was never written), so close the epoch now,
            // before any write: otherwise the next snapshot would get its
            // sequence, and the two would share a change ID.
            let newest = cfg.snapshots.iter().map(|s| s.disks[i].seq).max().unwrap_or(0);
            while tracker.last_closed() < newest {
                tracker.close_epoch()?;
            }
            // Re-apply the pins of live snapshots (lost if tracking was reset).
            let pinned = tracker.pins();
            for s in &cfg.snapshots {
                if !pinned.contains(&s.disks[i].seq) {
                    tracker.pin(s.disks[i].seq);
                }
            }
            if cfg.cbt {
                tracker.enable()?;
            }
            let grain_shift = tracker.granularity().shift().min(MAX_GRAIN.trailing_zeros());
            let chain = cfg
                .chain_layers(i)
                .map(|(pos, id)| Layer::open(&ddir, id, (pos > 0).then_some(grain_shift)).map(Arc::new))
                .collect::<Result<Vec<_>, _>>()?;
            io_disks.push(DiskIo {
                capacity: dc.capacity,
                chain,
            });
            disks.push(DiskShared {
                dir: ddir,
                tracker,
                grain_shift,
            });
        }
        Ok(Self {
            name: cfg.name.clone(),
            dir: dir.to_owned(),
            _lock: lock,
            io: ShardedLock::new(VmIo {
                powered_on: cfg.powered_on,
                disks: io_disks,
            }),
            disks,
            meta: Mutex::new(cfg),
            stun_ns: Mutex::new(std::collections::VecDeque::new()),
            max_areas: DEFAULT_MAX_AREAS.into(),
        })
    }

    /// The VM's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Number of disks.
    pub fn disk_count(&self) -> usize {
        self.disks.len()
    }

    /// The live capacity of `disk`.
    pub fn capacity(&self, disk: usize) -> Result<u64, SimError> {
        let io = self.gate();
        Ok(self.disk_io(&io, disk)?.capacity)
    }

    /// The tracker of `disk` (for statistics and benchmarks).
    pub fn tracker(&self, disk: usize) -> Result<&Tracker, SimError> {
        Ok(&self.shared(disk)?.tracker)
    }

    /// The tracking granularity of `disk`.
    pub fn granularity(&self, disk: usize) -> Result<Granularity, SimError> {
        Ok(self.shared(disk)?.tracker.granularity())
    }

    /// A copy of the configuration.
    pub fn config(&self) -> VmConfig {
        self.meta.lock().clone()
    }

    /// Caps the number of areas one query page returns (default 2000).
    pub fn set_max_areas(&self, n: usize) {
        self.max_areas.store(n.max(1), std::sync::atomic::Ordering::Relaxed);
    }

    fn shared(&self, disk: usize) -> Result<&DiskShared, SimError> {
        self.disks.get(disk).ok_or_else(|| SimError::NoSuchDisk {
            vm: self.name.clone(),
            disk,
            count: self.disks.len(),
        })
    }

    fn disk_io<'a>(&self, io: &'a VmIo, disk: usize) -> Result<&'a DiskIo, SimError> {
        io.disks.get(disk).ok_or_else(|| SimError::NoSuchDisk {
            vm: self.name.clone(),
            disk,
            count: self.disks.len(),
        })
    }

    fn gate(&self) -> ShardedLockReadGuard<'_, VmIo> {
        self.io.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Stuns guest I/O: waits for in-flight I/O, blocks new I/O until dropped.
    fn stun(&self) -> Stun<'_> {
        let start = Instant::now();
        let guard = self.io.write().unwrap_or_else(PoisonError::into_inner);
        Stun {
            guard,
            start,
            hist: &self.stun_ns,
        }
    }

    // ---- guest I/O ------------------------------------------------------

    /// A guest write of `data` at `offset` of `disk`.
    pub fn write(&self, disk: usize, offset: u64, data: &[u8]) -> Result<(), SimError> {
        self.guest_io(disk, offset, data.len() as u64, Src::Bytes(data))
    }

    /// A guest unmap (TRIM): the range reads as zeros afterwards, and counts as changed.
    pub fn unmap(&self, disk: usize, offset: u64, len: u64) -> Result<(), SimError> {
        self.guest_io(disk, offset, len, Src::Zero)
    }

    fn guest_io(&self, disk: usize, offset: u64, len: u64, src: Src<'_>) -> Result<(), SimError> {
        fault_point!(crate::fault::Point::BeforeGate { disk, offset, len });
        let io = self.gate();
        if !io.powered_on {
            return Err(SimError::PoweredOff(self.name.clone()));
        }
        let d = self.disk_io(&io, disk)?;
        check_range(disk, offset, len, d.capacity)?;
        if len == 0 {
            return Ok(());
        }
        // Mark first: a write that fails half-way is over-reported, never lost.
        self.disks[disk].tracker.mark(offset, len);
        fault_point!(crate::fault::Point::Marked { disk, offset, len });
        let (top, below) = d.chain.split_last().expect("a chain has a base layer");
        if !below.is_empty() {
            top.cow(offset, len, below)?;
        }
        top.write_raw(offset, len, src)
    }

    /// A guest read of the live disk.
    pub fn read(&self, disk: usize, offset: u64, buf: &mut [u8]) -> Result<(), SimError> {
        let io = self.gate();
        let d = self.disk_io(&io, disk)?;
        check_range(disk, offset, buf.len() as u64, d.capacity)?;
        read_chain(&d.chain, offset, buf)
    }

    /// Reads `disk` as it was at snapshot `snap` (what a backup reads).
    pub fn read_snapshot(&self, snap: &str, disk: usize, offset: u64, buf: &mut [u8]) -> Result<(), SimError> {
        let (view, capacity) = self.snapshot_view(snap, disk)?;
        check_range(disk, offset, buf.len() as u64, capacity)?;
        read_chain(&view, offset, buf)
    }

    fn snapshot_view(&self, snap: &str, disk: usize) -> Result<(Vec<Arc<Layer>>, u64), SimError> {
        let cfg = self.meta.lock();
        let sd = self.snap_disk(&cfg, snap, disk)?;
        let io = self.gate();
        let chain = &self.disk_io(&io, disk)?.chain;
        let top = chain
            .iter()
            .position(|l| l.id == sd.view_top)
            .expect("a snapshot's view is in the chain");
        Ok((chain[..=top].to_vec(), sd.capacity))
    }

    fn snap_disk<'a>(&self, cfg: &'a VmConfig, snap: &str, disk: usize) -> Result<&'a SnapshotDiskConfig, SimError> {
        let s = cfg
            .snapshots
            .iter()
            .find(|s| s.name == snap)
            .ok_or_else(|| SimError::NoSuchSnapshot {
                vm: self.name.clone(),
                name: snap.to_owned(),
            })?;
        self.shared(disk)?;
        Ok(&s.disks[disk])
    }

    // ---- snapshots ------------------------------------------------------

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
            let id = next.next_layer;
            next.next_layer += 1;
            new_layers.push(Arc::new(Layer::open(&d.dir, id, Some(d.grain_shift))?));
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
            self.consolidate(&mut cfg, d, sd.view_top)?;
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

    /// Saves the configuration with the chains and capacities as they are now.
    fn save(&self, cfg: &mut VmConfig) -> Result<(), SimError> {
        let io = self.gate();
        for (d, dio) in io.disks.iter().enumerate() {
            cfg.disks[d].chain = dio.chain.iter().map(|l| l.id).collect();
            cfg.disks[d].capacity = dio.capacity;
        }
        drop(io);
        cfg.save(&self.dir.join("vm.json"))
    }

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

    /// Merges the layer above `p_id` into `p_id` (its snapshot is gone).
    fn consolidate(&self, cfg: &mut VmConfig, d: usize, p_id: u64) -> Result<(), SimError> {
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
            c.delete_files();
            return Ok(());
        }
        // C is the live top: freeze it behind a helper delta H, merge C while
        // the guest writes into H, unlink C; repeat with H until it is small
        // enough to merge inside a stun.
        let shared = &self.disks[d];
        for round in 1..=MAX_MERGE_ROUNDS {
            let id = cfg.next_layer;
            cfg.next_layer += 1;
            let h = Arc::new(Layer::open(&shared.dir, id, Some(shared.grain_shift))?);
            self.save_with_top(cfg, d, h.id)?;
            self.stun().guard.disks[d].chain.push(h.clone());
            fault_point!(crate::fault::Point::Consolidating { disk: d, round });
            c.merge_into(&p)?;
            self.save_without(cfg, d, c.id)?;
            let small = h.grain_count() <= SMALL_HELPER_GRAINS;
            {
                let mut stun = self.stun();
                let chain = &mut stun.guard.disks[d].chain;
                chain.retain(|l| l.id != c.id);
                if small {
                    h.merge_into(&p)?;
                    chain.retain(|l| l.id != h.id);
                }
            }
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
            let id = next.next_layer;
            next.next_layer += 1;
            new_layers.push(Arc::new(Layer::open(&d.dir, id, Some(d.grain_shift))?));
            let sd = &target.disks[i];
            let chain = &mut next.disks[i].chain;
            let pos = chain.iter().position(|&l| l == sd.view_top).expect("view in chain");
            chain.truncate(pos + 1);
            chain.push(id);
            next.disks[i].capacity = sd.capacity;
        }
        next.save(&self.dir.join("vm.json"))?;
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
        for l in dropped {
            l.delete_files();
        }
        *cfg = next;
        Ok(())
    }

    // ---- disks, CBT, power ----------------------------------------------

    /// Grows `disk` to `new_size` bytes while the guest runs. Earlier change
    /// IDs stay valid. The new range reads as zeros and does not count as
    /// changed until written (it held nothing before).
    pub fn extend_disk(&self, disk: usize, new_size: u64) -> Result<(), SimError> {
        let mut cfg = self.meta.lock();
        let shared = self.shared(disk)?;
        check_capacity(new_size)?;
        let cur = cfg.disks[disk].capacity;
        if new_size < cur {
            return Err(SimError::BadSize {
                size: new_size,
                reason: format!("disk {disk} is {cur} bytes; disks cannot shrink"),
            });
        }
        // Saved first: a crash after this never loses a write past the old end.
        let mut next = cfg.clone();
        next.disks[disk].capacity = new_size;
        next.save(&self.dir.join("vm.json"))?;
        {
            let mut stun = self.stun();
            if new_size > shared.tracker.capacity() {
                shared.tracker.resize(new_size)?;
            }
            stun.guard.disks[disk].capacity = new_size;
        }
        *cfg = next;
        Ok(())
    }

    /// Turns change tracking on or off for every disk. Off then on starts a
    /// new tracking session: earlier change IDs fail with a typed error.
    pub fn set_cbt(&self, on: bool) -> Result<(), SimError> {
        let mut cfg = self.meta.lock();
        for d in &self.disks {
            if on {
                d.tracker.enable()?;
            } else {
                d.tracker.disable()?;
            }
        }
        cfg.cbt = on;
        cfg.save(&self.dir.join("vm.json"))
    }

    /// Whether change tracking is on.
    pub fn cbt(&self) -> bool {
        self.meta.lock().cbt
    }

    /// Powers the VM on or off. Off waits for in-flight I/O, refuses new
    /// guest I/O and writes everything back to the datastore.
    pub fn set_power(&self, on: bool) -> Result<(), SimError> {
        let mut cfg = self.meta.lock();
        {
            let mut stun = self.stun();
            stun.guard.powered_on = on;
        }
        if !on {
            self.flush()?;
        }
        cfg.powered_on = on;
        self.save(&mut cfg)
    }

    /// Whether the VM is powered on.
    pub fn powered_on(&self) -> bool {
        self.gate().powered_on
    }

    /// Writes dirty data pages back to the files.
    pub fn flush(&self) -> Result<(), SimError> {
        // Take the layers, then write back without holding the gate, so a
        // snapshot never waits behind a flush.
        let layers: Vec<Arc<Layer>> = self.gate().disks.iter().flat_map(|d| d.chain.iter().cloned()).collect();
        for l in &layers {
            l.flush()?;
        }
        Ok(())
    }

    /// Bytes of data the disk's layers occupy in the datastore.
    pub fn allocated_bytes(&self, disk: usize) -> Result<u64, SimError> {
        let io = self.gate();
        Ok(self.disk_io(&io, disk)?.chain.iter().map(|l| l.allocated_bytes()).sum())
    }

    /// Number of layers in `disk`'s chain (base + deltas).
    pub fn chain_len(&self, disk: usize) -> Result<usize, SimError> {
        let io = self.gate();
        Ok(self.disk_io(&io, disk)?.chain.len())
    }

    /// The most recent stun times in nanoseconds (at most [`STUN_LOG`]),
    /// oldest first: snapshot create/remove/revert/extend and power changes.
    pub fn stun_times_ns(&self) -> Vec<u64> {
        self.stun_ns.lock().iter().copied().collect()
    }

    // ---- the data-protection query ----------------------------------------

    /// `QueryChangedDiskAreas` on snapshot `snap` of `disk`, since
    /// `change_id` (`*` for the allocated areas), one page from `start_offset`.
    pub fn query_changed_disk_areas(
        &self,
        snap: &str,
        disk: usize,
        start_offset: u64,
        change_id: &str,
    ) -> Result<DiskChangeInfo, SimError> {
        let since = match change_id.trim() {
            "*" => Since::Allocated,
            s => Since::Change(s.parse()?),
        };
        let cfg = self.meta.lock();
        let sd = self.snap_disk(&cfg, snap, disk)?;
        let max = self.max_areas.load(std::sync::atomic::Ordering::Relaxed);
        let page = self.disks[disk]
            .tracker
            .changed_areas(since, sd.seq, sd.capacity, start_offset, max)?;
        Ok(DiskChangeInfo {
            start_offset: page.start_offset,
            length: page.length,
            changed_area: page
                .areas
                .into_iter()
                .map(|(start, length)| DiskArea { start, length })
                .collect(),
        })
    }

    /// The capacity of `disk` at snapshot `snap`.
    pub fn snapshot_capacity(&self, snap: &str, disk: usize) -> Result<u64, SimError> {
        let cfg = self.meta.lock();
        Ok(self.snap_disk(&cfg, snap, disk)?.capacity)
    }

    /// Drops the VM as a crash would: trackers are not closed cleanly, so
    /// the next open resets tracking. For fault-injection tests.
    pub fn crash(self) {
        for d in &self.disks {
            d.tracker.abandon();
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.flush();
    }
}

impl VmConfig {
    fn chain_layers(&self, disk: usize) -> impl Iterator<Item = (usize, u64)> + '_ {
        self.disks[disk].chain.iter().copied().enumerate()
    }
}

/// The write side of the gate, timed into the stun histogram.
struct Stun<'a> {
    guard: ShardedLockWriteGuard<'a, VmIo>,
    start: Instant,
    hist: &'a Mutex<std::collections::VecDeque<u64>>,
}

impl Drop for Stun<'_> {
    fn drop(&mut self) {
        let ns = self.start.elapsed().as_nanos().min(u128::from(u64::MAX)) as u64;
        let mut log = self.hist.lock();
        if log.len() == STUN_LOG {
            log.pop_front();
        }
        log.push_back(ns.max(1));
    }
}

fn check_range(disk: usize, offset: u64, len: u64, capacity: u64) -> Result<(), SimError> {
    match offset.checked_add(len) {
        Some(end) if end <= capacity => Ok(()),
        _ => Err(SimError::OutOfRange {
            disk,
            offset,
            len,
            capacity,
        }),
    }
}

fn check_capacity(size: u64) -> Result<(), SimError> {
    if size == 0 {
        return Err(SimError::BadSize {
            size,
            reason: "a disk cannot be empty".into(),
        });
    }
    if size > MAX_CAPACITY {
        return Err(SimError::BadSize {
            size,
            reason: format!("the maximum is {MAX_CAPACITY} bytes (64 TiB)"),
        });
    }
    if !size.is_multiple_of(512) {
        return Err(SimError::BadSize {
            size,
            reason: "a disk is a whole number of 512-byte sectors".into(),
        });
    }
    Ok(())
}
