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
//! can be over-reported but never lost (`tests/safety.rs` pins both down).
//!
//! ```text
//!  vm/mod.rs          the Vm: create/open, the gate and the stun, disks, CBT, power
//!  vm/io.rs           guest writes, unmaps, reads (the hot path)
//!  vm/snapshot.rs     snapshot create, list, remove, revert
//!  vm/consolidate.rs  merging a removed snapshot's delta while the guest writes
//!  vm/query.rs        QueryChangedDiskAreas, snapshot capacity and reads
//! ```

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crossbeam_utils::sync::{ShardedLock, ShardedLockReadGuard, ShardedLockWriteGuard};
use parking_lot::Mutex;
use tracker::{Granularity, Tracker, MAX_CAPACITY};
use vadp::SnapshotDisk;

use crate::config::{DiskConfig, VmConfig, CONFIG_VERSION};
use crate::error::SimError;
use crate::layer::{Layer, MAX_GRAIN};

mod consolidate;
mod io;
mod query;
mod snapshot;

/// How many of the most recent stun times a VM keeps.
pub const STUN_LOG: usize = 1 << 16;
/// Most snapshots a VM may have (as ESXi).
pub const MAX_SNAPSHOTS: usize = 32;
/// Default cap on areas per `QueryChangedDiskAreas` page (VMware's observed value).
pub const DEFAULT_MAX_AREAS: usize = 2000;

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

/// Opens a disk's tracker; a damaged one is set aside and recreated (a new
/// tracking session, its first epoch after every snapshot the VM has).
fn open_tracker(path: &Path, dc: &DiskConfig, newest: u64) -> Result<Tracker, SimError> {
    match Tracker::open(path) {
        Err(tracker::TrackerError::BadFile { .. }) => {
            let g = Granularity::new(dc.granularity)?;
            Ok(Tracker::recreate(path, dc.capacity, g, newest + 1)?)
        }
        r => Ok(r?),
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
    // Readers (`Host::view`) hold the lock shared for the moment a listing or
    // a query takes: wait for them a little. A writer holds it exclusively for
    // as long as it keeps the VM open: give up at once.
    let deadline = Instant::now() + std::time::Duration::from_secs(2);
    loop {
        match f.try_lock() {
            Ok(()) => return Ok(f),
            Err(std::fs::TryLockError::Error(e)) => return Err(io_err(&path)(e)),
            Err(std::fs::TryLockError::WouldBlock) => {}
        }
        let readers_only = match f.try_lock_shared() {
            Ok(()) => {
                let _ = f.unlock();
                true
            }
            Err(_) => false,
        };
        if !readers_only || Instant::now() >= deadline {
            return Err(SimError::VmInUse(name.to_owned()));
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
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
            pending_revert: None,
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

    /// Opens the VM stored in `dir`, taking its lock, and finishes whatever a
    /// killed process left half done: an epoch its snapshot never closed, a
    /// revert not yet marked, pins of removed snapshots, a consolidation, the
    /// files of layers no chain names (DESIGN.md, the crash protocol).
    pub(crate) fn open(dir: &Path) -> Result<Self, SimError> {
        let cfg = VmConfig::load(&dir.join("vm.json"))?;
        let lock = lock_vm(dir, &cfg.name)?;
        let vm = Self::open_locked(dir, cfg, lock, Vec::new())?;
        vm.finish_revert()?;
        vm.consolidate()?;
        Ok(vm)
    }

    /// Opens the VM with its lock held; `created` are trackers already open
    /// (a new VM's), the others are opened from their files.
    fn open_locked(dir: &Path, cfg: VmConfig, lock: File, created: Vec<Tracker>) -> Result<Self, SimError> {
        let mut created = created.into_iter();
        let mut disks = Vec::new();
        let mut io_disks = Vec::new();
        for (i, dc) in cfg.disks.iter().enumerate() {
            let ddir = dir.join(format!("disk{i}"));
            let newest = cfg.snapshots.iter().map(|s| s.disks[i].seq).max().unwrap_or(0);
            let tracker = match created.next() {
                Some(t) => t,
                None => open_tracker(&ddir.join("disk.ctk"), dc, newest)?,
            };
            // A crash between saving a new snapshot and its stun leaves a
            // snapshot whose epoch was never closed. Its view is the disk as
            // it is now (its delta was never written), so close the epoch now,
            // before any write: otherwise the next snapshot would get its
            // sequence, and the two would share a change ID.
            while tracker.last_closed() < newest {
                tracker.close_epoch()?;
            }
            // The pins are exactly the live snapshots: a process killed
            // between removing a snapshot and unpinning it left a stale one.
            let live: Vec<u64> = cfg.snapshots.iter().map(|s| s.disks[i].seq).collect();
            tracker.retain_pins(&live)?;
            if cfg.cbt {
                tracker.enable()?;
            } else {
                tracker.disable()?;
            }
            if dc.capacity > tracker.capacity() {
                // Killed between saving an extend and its stun.
                tracker.resize(dc.capacity)?;
            }
            let grain_shift = tracker.granularity().shift().min(MAX_GRAIN.trailing_zeros());
            let chain = cfg
                .chain_layers(i)
                .map(|(pos, id)| Layer::open(&ddir, id, (pos > 0).then_some(grain_shift)).map(Arc::new))
                .collect::<Result<Vec<_>, _>>()?;
            if tracker.needs_allocation() {
                // Damaged tracking state was recreated: `*` is what the layers hold.
                let mut areas = Vec::new();
                for l in &chain {
                    l.allocated(&mut |off, len| areas.push((off, len)))?;
                }
                tracker.seed_allocation(areas)?;
            }
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

    /// A new, empty delta layer for disk `d`, its id taken from `cfg`
    /// (which the caller saves before the delta joins the chain).
    fn new_delta(&self, cfg: &mut VmConfig, d: usize) -> Result<Arc<Layer>, SimError> {
        let id = cfg.next_layer;
        cfg.next_layer += 1;
        let shared = &self.disks[d];
        Ok(Arc::new(Layer::open(&shared.dir, id, Some(shared.grain_shift))?))
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
