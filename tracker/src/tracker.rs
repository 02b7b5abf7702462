//! The change tracker of one virtual disk.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::Mutex;
use uuid::Uuid;

use crate::bitmap::AtomicBitmap;
use crate::ctk::{Header, Layout, ResetReason, HEADER_BYTES, MAX_PAST_SESSIONS, STATE_CLEAN, STATE_OPEN};
use crate::epochmap::EpochMap;
use crate::mmap::Region;
use crate::sparse::{take_u64, SparseBits};
use crate::{ChangeId, QueryError, TrackerError};

/// The largest capacity a tracked disk may have or grow to (64 TiB).
pub const MAX_CAPACITY: u64 = 64 << 40;

/// The tracking granularity of a disk: a power of two from 512 B to 1 GiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Granularity {
    shift: u32,
}

impl Granularity {
    /// 64 KiB, the default (as VMware and QEMU).
    pub const DEFAULT: Self = Self { shift: 16 };

    /// Checks that `bytes` is a power of two from 512 B to 1 GiB.
    pub fn new(bytes: u64) -> Result<Self, TrackerError> {
        if bytes.is_power_of_two() && (512..=1 << 30).contains(&bytes) {
            Ok(Self {
                shift: bytes.trailing_zeros(),
            })
        } else {
            Err(TrackerError::BadGranularity(bytes))
        }
    }

    /// Bytes per block.
    pub fn bytes(self) -> u64 {
        1 << self.shift
    }

    /// log2 of [`bytes`](Self::bytes).
    pub fn shift(self) -> u32 {
        self.shift
    }

    /// Blocks needed to cover `capacity` bytes.
    pub fn blocks(self, capacity: u64) -> u64 {
        capacity.div_ceil(self.bytes())
    }
}

/// What a query is relative to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Since {
    /// `*`: every block written since the disk was created.
    Allocated,
    /// Every block written after this change ID.
    Change(ChangeId),
}

/// One page of a changed-areas answer, in bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AreaPage {
    /// Where the window starts.
    pub start_offset: u64,
    /// How many bytes the window covers; the next page starts at
    /// `start_offset + length`.
    pub length: u64,
    /// Sorted, non-overlapping, coalesced `(start, length)` areas inside the window.
    pub areas: Vec<(u64, u64)>,
}

/// Figures about a tracker's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrackerStats {
    /// Bytes the change-tracking file occupies (allocated blocks of the sparse file).
    pub file_bytes: u64,
    /// Heap bytes held by closed epochs that live snapshots still pin.
    pub unfolded_bytes: u64,
    /// Closed epochs not folded yet.
    pub unfolded_epochs: usize,
    /// Times a snapshot had to drain the previous epoch inside the stun.
    pub sync_drains: u64,
}

/// The change tracker of one virtual disk.
///
/// * [`mark`](Self::mark) is the write path: lock-free, allocation-free,
///   test-before-set, O(blocks touched), independent of retained change IDs.
/// * [`close_epoch`](Self::close_epoch) is the O(1) epoch switch a snapshot
///   makes while the host has I/O stunned.
/// * Everything else (draining the frozen bitmap, folding into the epoch map,
///   queries) runs off the I/O path under a cold-path mutex.
///
/// # Design
/// Two marking bitmaps alternate: writers mark the active one; at an epoch
/// switch it is frozen and the other (already clean) becomes active. The
/// frozen one is drained into a [`SparseBits`] for its epoch. Closed epochs
/// are folded into the per-block "epoch last written" map once no live
/// snapshot (a *pin*) is older than them; until then they stay separate, so
/// a query at any live snapshot is exact: the epoch map holds only epochs
/// at or before the oldest pin.
#[derive(Debug)]
pub struct Tracker {
    path: PathBuf,
    file: File,
    granularity: Granularity,
    bitmaps: [AtomicBitmap; 2],
    /// Index of the bitmap writers mark. Changed only while the host has
    /// quiesced all writers (see `close_epoch`).
    active: AtomicUsize,
    cold: Mutex<Cold>,
    abandoned: std::sync::atomic::AtomicBool,
    /// Opened by [`TrackerView::open`]: mapped read-only, never written.
    read_only: bool,
}

/// A change-tracking file opened read-only, to answer queries without writing
/// anything (not even the header a writable open marks as in use): what
/// `snapshot list` or `query` need. It takes the file's lock shared, so it fails
/// with [`TrackerError::InUse`] while a writer has it open, and readers do not
/// exclude each other. A file not closed cleanly is read as [`Tracker::open`]
/// would reset it (earlier change IDs fail with `TrackingReset`), in memory only.
#[derive(Debug)]
pub struct TrackerView(Tracker);

#[derive(Debug)]
struct Cold {
    header_region: Region,
    h: Header,
    emap: EpochMap,
    unfolded: BTreeMap<u64, SparseBits>,
    /// The frozen bitmap and its epoch, if not yet drained.
    pending: Option<(usize, u64)>,
    pins: BTreeMap<u64, u32>,
    sync_drains: u64,
    /// `close_epoch` updated the header page without writing it back.
    header_unsynced: bool,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> TrackerError + '_ {
    move |source| TrackerError::Io {
        path: path.to_owned(),
        source,
    }
}

fn sidecar(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".epochs");
    PathBuf::from(p)
}

impl Tracker {
    /// Creates a new change-tracking file for a disk of `capacity` bytes.
    /// Tracking starts enabled, in a fresh session.
    pub fn create(path: &Path, capacity: u64, granularity: Granularity) -> Result<Self, TrackerError> {
        if capacity > MAX_CAPACITY {
            return Err(TrackerError::CapacityTooLarge {
                capacity,
                max: MAX_CAPACITY,
            });
        }
        let max_blocks = granularity.blocks(MAX_CAPACITY);
        let layout = Layout::new(max_blocks);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(io_err(path))?;
        lock(&file, path)?;
        file.set_len(layout.file_len).map_err(io_err(path))?;
        let h = Header {
            state: STATE_OPEN,
            granularity_shift: granularity.shift,
            enabled: true,
            allocation_unknown: false,
            capacity,
            max_blocks,
            cur_epoch: 1,
            last_closed: 0,
            folded: 0,
            session_start: 1,
            marks_lost_through: 0,
            active: 0,
            session: Uuid::new_v4(),
            past: Vec::new(),
        };
        Self::assemble(path, file, h, layout, BTreeMap::new(), BTreeMap::new())
    }

    /// Opens an existing change-tracking file. If it was not closed cleanly,
    /// or its sidecar is missing or damaged, tracking is reset: a new session
    /// begins, every earlier change ID fails with
    /// [`QueryError::TrackingReset`], and `*` answers the whole disk (marks
    /// made just before a crash may not have reached the file).
    pub fn open(path: &Path) -> Result<Self, TrackerError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io_err(path))?;
        lock(&file, path)?;
        let bad = |reason: String| TrackerError::BadFile {
            path: path.to_owned(),
            reason,
        };
        let mut page = vec![0u8; HEADER_BYTES as usize];
        std::io::Read::read_exact(&mut &file, &mut page).map_err(|e| bad(format!("cannot read the header: {e}")))?;
        let mut h = Header::decode(&page).map_err(bad)?;
        let granularity = Granularity {
            shift: h.granularity_shift,
        };
        if h.max_blocks != granularity.blocks(MAX_CAPACITY) {
            return Err(bad("block count does not match the granularity".into()));
        }
        let layout = Layout::new(h.max_blocks);
        let len = file.metadata().map_err(io_err(path))?.len();
        if len < layout.file_len {
            return Err(bad(format!("file is {len} bytes, expected {}", layout.file_len)));
        }
        let side = if h.state == STATE_CLEAN {
            read_sidecar(&sidecar(path))
        } else {
            None
        };
        let (pins, unfolded) = match side {
            Some(s) => s,
            None => {
                let reason = if h.state == STATE_CLEAN {
                    ResetReason::Corrupt
                } else {
                    ResetReason::Unclean
                };
                reset_session(&mut h, reason);
                h.allocation_unknown = true;
                // Epochs after the fold horizon are lost: nothing older than
                // the new session may be asked for any more.
                h.folded = h.last_closed;
                // And the open epoch may have lost marks (those not yet in
                // the file): a revert to any point before it cannot know all
                // it changes back.
                h.marks_lost_through = h.cur_epoch;
                (BTreeMap::new(), BTreeMap::new())
            }
        };
        h.state = STATE_OPEN;
        let t = Self::assemble(path, file, h, layout, pins, unfolded)?;
        // Whatever the inactive bitmap holds belongs to no live epoch any more.
        let inactive = 1 - t.active.load(Ordering::Relaxed);
        t.bitmaps[inactive].drain(|_, _| {});
        Ok(t)
    }

    fn assemble(
        path: &Path,
        file: File,
        h: Header,
        layout: Layout,
        pins: BTreeMap<u64, u32>,
        unfolded: BTreeMap<u64, SparseBits>,
    ) -> Result<Self, TrackerError> {
        let e = io_err(path);
        let b0 = AtomicBitmap::map(&file, layout.bitmap_offsets[0], layout.bitmap.clone()).map_err(io_err(path))?;
        let b1 = AtomicBitmap::map(&file, layout.bitmap_offsets[1], layout.bitmap.clone()).map_err(io_err(path))?;
        let emap = EpochMap::map(&file, layout.emap_offset, layout.emap.clone()).map_err(io_err(path))?;
        let header_region = Region::map(&file, 0, HEADER_BYTES as usize).map_err(e)?;
        let t = Self {
            path: path.to_owned(),
            granularity: Granularity {
                shift: h.granularity_shift,
            },
            active: AtomicUsize::new(h.active as usize),
            bitmaps: [b0, b1],
            file,
            cold: Mutex::new(Cold {
                header_region,
                h,
                emap,
                unfolded,
                pending: None,
                pins,
                sync_drains: 0,
                header_unsynced: false,
            }),
            abandoned: false.into(),
            read_only: false,
        };
        t.cold.lock().write_header().map_err(io_err(path))?;
        Ok(t)
    }

    /// The tracking granularity.
    pub fn granularity(&self) -> Granularity {
        self.granularity
    }

    /// The live capacity in bytes.
    pub fn capacity(&self) -> u64 {
        self.cold.lock().h.capacity
    }

    /// The change-tracking file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records a guest write (or unmap) of `[offset, offset + len)`: marks
    /// blocks `offset / g ..= (offset + len - 1) / g` in the active epoch.
    ///
    /// The caller has checked the range against the capacity. Lock-free,
    /// allocation-free; a block already marked in this epoch costs one load.
    #[inline]
    pub fn mark(&self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let s = self.granularity.shift;
        // Relaxed: `active` changes only while writers are quiesced by the
        // host's I/O gate, whose lock orders this load after the change.
        let b = &self.bitmaps[self.active.load(Ordering::Relaxed)];
        b.set_range(offset >> s, (offset + len - 1) >> s);
    }

    /// Whether change tracking is enabled (change IDs are issued and queries answered).
    pub fn is_enabled(&self) -> bool {
        self.cold.lock().h.enabled
    }

    /// The current tracking session, if enabled.
    pub fn session(&self) -> Option<Uuid> {
        let c = self.cold.lock();
        c.h.enabled.then_some(c.h.session)
    }

    /// Turns change tracking on. Turning it on after it was off starts a new
    /// session: change IDs of the old one fail with `TrackingReset`. Blocks
    /// are marked whether tracking is on or not (that is what `*` answers).
    pub fn enable(&self) -> Result<(), TrackerError> {
        let mut c = self.cold.lock();
        if !c.h.enabled {
            c.h.session = Uuid::new_v4();
            c.h.session_start = c.h.cur_epoch;
            c.h.enabled = true;
            c.write_header().map_err(io_err(&self.path))?;
        }
        Ok(())
    }

    /// Turns change tracking off: the session ends, its change IDs become invalid.
    pub fn disable(&self) -> Result<(), TrackerError> {
        let mut c = self.cold.lock();
        if c.h.enabled {
            retire_session(&mut c.h, ResetReason::Disabled);
            c.h.enabled = false;
            c.write_header().map_err(io_err(&self.path))?;
        }
        Ok(())
    }

    /// Drains the frozen bitmap of the last epoch switch (if any) and folds
    /// closed epochs no live snapshot needs. Runs off the I/O path; a host
    /// calls it after a snapshot, before taking the next one, and after
    /// removing one.
    pub fn settle(&self) {
        let mut c = self.cold.lock();
        if c.header_unsynced {
            // Best effort, as in `fold`: the header is trusted only after a clean close.
            let _ = c.write_header();
        }
        c.drain_pending(&self.bitmaps);
        c.fold();
    }

    /// Closes the current epoch and returns its sequence number, pinned for
    /// the snapshot that asked (release it with [`unpin`](Self::unpin)).
    ///
    /// **The caller must have quiesced every writer of this disk** (the host's
    /// snapshot stun): a write whose data lands after the switch must mark
    /// the new epoch. O(1) when [`settle`](Self::settle) ran since the last
    /// switch; otherwise the previous frozen bitmap is drained here. No file
    /// I/O: the header is written back by the next `settle`.
    pub fn close_epoch(&self) -> Result<u64, TrackerError> {
        let mut c = self.cold.lock();
        if c.pending.is_some() {
            c.sync_drains += 1;
            c.drain_pending(&self.bitmaps);
        }
        let e = c.h.cur_epoch;
        if e >= u64::from(u32::MAX) {
            return Err(TrackerError::EpochsExhausted);
        }
        let old = self.active.load(Ordering::Relaxed);
        // Relaxed: writers are quiesced; the host's gate publishes this store.
        self.active.store(1 - old, Ordering::Relaxed);
        c.pending = Some((old, e));
        c.h.active = (1 - old) as u64;
        c.h.last_closed = e;
        c.h.cur_epoch = e + 1;
        *c.pins.entry(e).or_default() += 1;
        // Only the mapped page changes here: a synchronous write-back inside
        // the stun waits on the file system (measured: p99 13 ms at 1 GiB,
        // 67 ms at 1 TiB on ext4). `settle`, which the host calls right after
        // the stun, writes it back; a killed process leaves it in the page
        // cache, and the header is trusted only after a clean close anyway.
        let Cold { header_region, h, .. } = &mut *c;
        if let Some(bytes) = header_region.bytes_mut() {
            h.encode(bytes);
        }
        c.header_unsynced = true;
        Ok(e)
    }

    /// The change ID of closed epoch `seq`, if tracking is on and `seq`
    /// belongs to the current session.
    pub fn change_id(&self, seq: u64) -> Option<ChangeId> {
        let c = self.cold.lock();
        (c.h.enabled && seq >= c.h.session_start && seq <= c.h.last_closed).then_some(ChangeId {
            session: c.h.session,
            seq,
        })
    }

    /// Releases a pin taken by `close_epoch`; folds what no pin needs.
    pub fn unpin(&self, seq: u64) {
        let mut c = self.cold.lock();
        if let Some(n) = c.pins.get_mut(&seq) {
            *n -= 1;
            if *n == 0 {
                c.pins.remove(&seq);
            }
        }
        c.drain_pending(&self.bitmaps);
        c.fold();
    }

    /// Pins `seq` again (a host re-applying its live snapshots after a
    /// reopen that reset tracking).
    pub fn pin(&self, seq: u64) {
        *self.cold.lock().pins.entry(seq).or_default() += 1;
    }

    /// Sequences currently pinned.
    pub fn pins(&self) -> Vec<u64> {
        self.cold.lock().pins.keys().copied().collect()
    }

    /// Reverting the disk to the snapshot at `seq`: every block written after
    /// `seq` is changed back by the revert, so it is marked in the current
    /// epoch. Change IDs issued after `seq` stay valid and keep answering
    /// correctly. **The caller must have quiesced every writer.**
    ///
    /// If `seq` is older than the fold horizon or than the epoch that was open
    /// when an unclean close reset tracking (a live snapshot otherwise pins
    /// it), marks of the epochs after it are lost and what the revert changes
    /// back is not known: a new session
    /// starts, so earlier change IDs fail with `TrackingReset` instead of
    /// answering incompletely.
    pub fn rewind_to(&self, seq: u64) -> Result<(), QueryError> {
        let mut c = self.cold.lock();
        c.drain_pending(&self.bitmaps);
        if seq > c.h.last_closed {
            return Err(QueryError::PointNotRetained(seq));
        }
        let active = &self.bitmaps[self.active.load(Ordering::Relaxed)];
        for bits in c.unfolded.range(seq + 1..).map(|(_, b)| b) {
            bits.for_each_word(|w, m| active.or_leaf_word(w as usize, m));
        }
        // The revert changes back every block written after `seq`: known
        // only if the epochs after it are unfolded and none lost marks at a
        // reset (`marks_lost_through` is the epoch open at the reset, so a
        // revert to the last snapshot before a crash needs a new session too).
        if seq < c.h.folded || seq < c.h.marks_lost_through {
            reset_session(&mut c.h, ResetReason::Unclean);
            let _ = c.write_header();
        }
        Ok(())
    }

    /// Grows the tracked capacity. **The caller must have quiesced every writer.**
    pub fn resize(&self, capacity: u64) -> Result<(), TrackerError> {
        let mut c = self.cold.lock();
        if capacity > MAX_CAPACITY {
            return Err(TrackerError::CapacityTooLarge {
                capacity,
                max: MAX_CAPACITY,
            });
        }
        if capacity < c.h.capacity {
            return Err(TrackerError::Shrink {
                from: c.h.capacity,
                to: capacity,
            });
        }
        c.h.capacity = capacity;
        c.write_header().map_err(io_err(&self.path))
    }

    /// One page of the areas changed between `since` and the closed epoch
    /// `at` (a live snapshot's sequence), for a disk of `capacity` bytes at
    /// that point, from byte `start`, with at most `max_areas` areas.
    pub fn changed_areas(
        &self,
        since: Since,
        at: u64,
        capacity: u64,
        start: u64,
        max_areas: usize,
    ) -> Result<AreaPage, QueryError> {
        let mut c = self.cold.lock();
        c.drain_pending(&self.bitmaps);
        let h = &c.h;
        if !h.enabled {
            return Err(QueryError::TrackingDisabled);
        }
        let s = match since {
            Since::Allocated => 0,
            Since::Change(id) if id.session == h.session => {
                if id.seq > h.last_closed || id.seq < h.session_start {
                    return Err(QueryError::ForeignChangeId(id));
                }
                if id.seq > at {
                    return Err(QueryError::ChangeIdAfterSnapshot { change_id: id, at });
                }
                id.seq
            }
            Since::Change(id) => {
                return Err(match h.past.iter().find(|(u, _)| *u == id.session) {
                    Some((_, r)) => QueryError::TrackingReset {
                        change_id: id,
                        reason: r.describe().into(),
                    },
                    None => QueryError::ForeignChangeId(id),
                })
            }
        };
        if start >= capacity {
            return Err(QueryError::OffsetOutOfRange { start, capacity });
        }
        if since == Since::Allocated && h.allocation_unknown {
            return Ok(AreaPage {
                start_offset: start,
                length: capacity - start,
                areas: vec![(start, capacity - start)],
            });
        }
        if at < h.folded || at > h.last_closed {
            return Err(QueryError::PointNotRetained(at));
        }
        let g = self.granularity;
        let first = start >> g.shift;
        let end_block = g.blocks(capacity);
        let mut sources: Vec<Box<dyn Iterator<Item = (u64, u64)> + '_>> = Vec::new();
        if s < h.folded {
            sources.push(Box::new(EmapRuns {
                emap: &c.emap,
                pos: first,
                end: end_block,
                since: s as u32,
            }));
        }
        for (_, bits) in c.unfolded.range(s + 1..at + 1) {
            sources.push(Box::new(bits.runs_from(first)));
        }
        let mut areas = Vec::new();
        let mut full = false;
        for (b, n) in union_runs(sources) {
            let lo = (b << g.shift).max(start);
            let hi = ((b + n) << g.shift).min(capacity);
            if lo >= hi {
                continue;
            }
            if areas.len() == max_areas.max(1) {
                full = true;
                break;
            }
            areas.push((lo, hi - lo));
        }
        let length = match areas.last() {
            Some(&(s0, l)) if full => s0 + l - start,
            _ => capacity - start,
        };
        Ok(AreaPage {
            start_offset: start,
            length,
            areas,
        })
    }

    /// Figures about the tracker's state.
    pub fn stats(&self) -> TrackerStats {
        let c = self.cold.lock();
        let file_bytes = self.file.metadata().map(|m| m.blocks() * 512).unwrap_or(0);
        TrackerStats {
            file_bytes,
            unfolded_bytes: c.unfolded.values().map(SparseBits::heap_bytes).sum(),
            unfolded_epochs: c.unfolded.len(),
            sync_drains: c.sync_drains,
        }
    }

    /// The sequence of the last closed epoch.
    pub fn last_closed(&self) -> u64 {
        self.cold.lock().h.last_closed
    }

    /// Drops the tracker without a clean close, as a crash would: the next
    /// [`open`](Self::open) resets tracking. For fault injection and tests.
    pub fn abandon(&self) {
        self.cold.lock().h.state = STATE_OPEN;
        self.abandoned.store(true, Ordering::Relaxed);
    }

    /// Writes all state to the file so that a later [`open`](Self::open)
    /// finds it clean, and releases the file.
    pub fn close(self) -> Result<(), TrackerError> {
        self.persist()
    }

    fn persist(&self) -> Result<(), TrackerError> {
        let e = || io_err(&self.path);
        let mut c = self.cold.lock();
        c.drain_pending(&self.bitmaps);
        c.fold();
        for b in &self.bitmaps {
            b.flush().map_err(e())?;
        }
        c.emap.flush().map_err(e())?;
        write_sidecar(&sidecar(&self.path), &c.pins, &c.unfolded).map_err(e())?;
        c.h.state = STATE_CLEAN;
        c.write_header().map_err(e())?;
        Ok(())
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        let clean = self.cold.lock().h.state == STATE_CLEAN;
        if !clean && !self.abandoned.load(Ordering::Relaxed) && !self.read_only {
            // Best effort; an error leaves the file marked open, so the next
            // open resets tracking instead of trusting it.
            let _ = self.persist();
        }
    }
}

impl Cold {
    fn write_header(&mut self) -> io::Result<()> {
        self.header_unsynced = false;
        let Self { header_region, h, .. } = self;
        match header_region.bytes_mut() {
            Some(bytes) => h.encode(bytes),
            None => return Ok(()), // read-only
        }
        header_region.flush()
    }

    fn drain_pending(&mut self, bitmaps: &[AtomicBitmap; 2]) {
        if let Some((idx, epoch)) = self.pending.take() {
            let mut bits = SparseBits::default();
            bitmaps[idx].drain(|w, m| bits.or_word(w as u64, m));
            if !bits.is_empty() {
                self.unfolded.insert(epoch, bits);
            }
        }
    }

    /// Folds every closed, drained epoch up to the oldest pin into the epoch map.
    fn fold(&mut self) {
        if self.pending.is_some() {
            return;
        }
        let target = self.pins.keys().next().copied().unwrap_or(self.h.last_closed);
        while let Some(entry) = self.unfolded.first_entry() {
            if *entry.key() > target {
                break;
            }
            let (epoch, bits) = entry.remove_entry();
            bits.for_each_word(|w, m| self.emap.fold_word(w, m, epoch as u32));
        }
        if target > self.h.folded {
            self.h.folded = target;
            let _ = self.write_header();
        }
    }
}

impl TrackerView {
    /// Opens the change-tracking file at `path` read-only (see the type's docs).
    pub fn open(path: &Path) -> Result<Self, TrackerError> {
        let file = File::open(path).map_err(io_err(path))?;
        match file.try_lock_shared() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Err(TrackerError::InUse { path: path.to_owned() }),
            Err(std::fs::TryLockError::Error(e)) => return Err(io_err(path)(e)),
        }
        let bad = |reason: String| TrackerError::BadFile {
            path: path.to_owned(),
            reason,
        };
        let mut page = vec![0u8; HEADER_BYTES as usize];
        std::io::Read::read_exact(&mut &file, &mut page).map_err(|e| bad(format!("cannot read the header: {e}")))?;
        let mut h = Header::decode(&page).map_err(bad)?;
        let granularity = Granularity {
            shift: h.granularity_shift,
        };
        if h.max_blocks != granularity.blocks(MAX_CAPACITY) {
            return Err(bad("block count does not match the granularity".into()));
        }
        let layout = Layout::new(h.max_blocks);
        let len = file.metadata().map_err(io_err(path))?.len();
        if len < layout.file_len {
            return Err(bad(format!("file is {len} bytes, expected {}", layout.file_len)));
        }
        let side = if h.state == STATE_CLEAN {
            read_sidecar(&sidecar(path))
        } else {
            None
        };
        let (pins, unfolded) = match side {
            Some(s) => s,
            None => {
                // As `Tracker::open` would reset it, in memory only.
                let reason = if h.state == STATE_CLEAN {
                    ResetReason::Corrupt
                } else {
                    ResetReason::Unclean
                };
                reset_session(&mut h, reason);
                h.allocation_unknown = true;
                h.folded = h.last_closed;
                (BTreeMap::new(), BTreeMap::new())
            }
        };
        let e = io_err(path);
        let b0 = AtomicBitmap::map_read_only(&file, layout.bitmap_offsets[0], layout.bitmap.clone()).map_err(e)?;
        let b1 = AtomicBitmap::map_read_only(&file, layout.bitmap_offsets[1], layout.bitmap.clone())
            .map_err(io_err(path))?;
        let emap = EpochMap::map_read_only(&file, layout.emap_offset, layout.emap.clone()).map_err(io_err(path))?;
        let header_region = Region::map_read_only(&file, 0, HEADER_BYTES as usize).map_err(io_err(path))?;
        Ok(Self(Tracker {
            path: path.to_owned(),
            granularity,
            active: AtomicUsize::new(h.active as usize),
            bitmaps: [b0, b1],
            file,
            cold: Mutex::new(Cold {
                header_region,
                h,
                emap,
                unfolded,
                pending: None,
                pins,
                sync_drains: 0,
                header_unsynced: false,
            }),
            abandoned: false.into(),
            read_only: true,
        }))
    }

    /// The tracking granularity.
    pub fn granularity(&self) -> Granularity {
        self.0.granularity()
    }

    /// Whether change tracking is enabled.
    pub fn is_enabled(&self) -> bool {
        self.0.is_enabled()
    }

    /// The sequence of the last closed epoch.
    pub fn last_closed(&self) -> u64 {
        self.0.last_closed()
    }

    /// The change ID of closed epoch `seq` (see [`Tracker::change_id`]).
    pub fn change_id(&self, seq: u64) -> Option<ChangeId> {
        self.0.change_id(seq)
    }

    /// One page of changed areas (see [`Tracker::changed_areas`]).
    pub fn changed_areas(
        &self,
        since: Since,
        at: u64,
        capacity: u64,
        start: u64,
        max_areas: usize,
    ) -> Result<AreaPage, QueryError> {
        self.0.changed_areas(since, at, capacity, start, max_areas)
    }
}

/// Records the current session as ended for `reason`.
fn retire_session(h: &mut Header, reason: ResetReason) {
    if h.past.len() == MAX_PAST_SESSIONS {
        h.past.remove(0);
    }
    h.past.push((h.session, reason));
}

/// Ends the current session and starts a new one at the current epoch.
fn reset_session(h: &mut Header, reason: ResetReason) {
    retire_session(h, reason);
    h.session = Uuid::new_v4();
    h.session_start = h.cur_epoch;
}

fn lock(file: &File, path: &Path) -> Result<(), TrackerError> {
    file.try_lock().map_err(|e| match e {
        std::fs::TryLockError::WouldBlock => TrackerError::InUse { path: path.to_owned() },
        std::fs::TryLockError::Error(source) => TrackerError::Io {
            path: path.to_owned(),
            source,
        },
    })
}

const SIDECAR_MAGIC: u64 = u64::from_le_bytes(*b"CBTEPOC1");

type SidecarState = (BTreeMap<u64, u32>, BTreeMap<u64, SparseBits>);

fn write_sidecar(path: &Path, pins: &BTreeMap<u64, u32>, unfolded: &BTreeMap<u64, SparseBits>) -> io::Result<()> {
    let mut buf = Vec::new();
    buf.extend_from_slice(&SIDECAR_MAGIC.to_le_bytes());
    buf.extend_from_slice(&(pins.len() as u64).to_le_bytes());
    for (&p, &n) in pins {
        buf.extend_from_slice(&p.to_le_bytes());
        buf.extend_from_slice(&u64::from(n).to_le_bytes());
    }
    buf.extend_from_slice(&(unfolded.len() as u64).to_le_bytes());
    for (&e, bits) in unfolded {
        buf.extend_from_slice(&e.to_le_bytes());
        bits.encode(&mut buf);
    }
    let sum = checksum(&buf);
    buf.extend_from_slice(&sum.to_le_bytes());
    let tmp = path.with_extension("epochs.tmp");
    let mut f = File::create(&tmp)?;
    f.write_all(&buf)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

fn read_sidecar(path: &Path) -> Option<SidecarState> {
    let data = std::fs::read(path).ok()?;
    let (body, sum) = data.split_at_checked(data.len().checked_sub(8)?)?;
    if checksum(body).to_le_bytes() != sum {
        return None;
    }
    let mut input = body;
    if take_u64(&mut input)? != SIDECAR_MAGIC {
        return None;
    }
    let mut pins = BTreeMap::new();
    for _ in 0..take_u64(&mut input)? {
        let p = take_u64(&mut input)?;
        pins.insert(p, u32::try_from(take_u64(&mut input)?).ok()?);
    }
    let mut unfolded = BTreeMap::new();
    for _ in 0..take_u64(&mut input)? {
        let e = take_u64(&mut input)?;
        unfolded.insert(e, SparseBits::decode(&mut input)?);
    }
    input.is_empty().then_some((pins, unfolded))
}

/// FNV-1a over the bytes: enough to catch a torn or damaged sidecar.
fn checksum(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// Runs of blocks whose folded epoch is after `since`.
struct EmapRuns<'a> {
    emap: &'a EpochMap,
    pos: u64,
    end: u64,
    since: u32,
}

impl Iterator for EmapRuns<'_> {
    type Item = (u64, u64);

    fn next(&mut self) -> Option<(u64, u64)> {
        let b = self.emap.next_newer(self.pos, self.end, self.since)?;
        let mut n = 1;
        while b + n < self.end && self.emap.get(b + n) > self.since {
            n += 1;
        }
        self.pos = b + n + 1;
        Some((b, n))
    }
}

/// The union of several sorted run streams, coalesced.
fn union_runs<'a>(
    mut sources: Vec<Box<dyn Iterator<Item = (u64, u64)> + 'a>>,
) -> impl Iterator<Item = (u64, u64)> + 'a {
    let mut heads: Vec<Option<(u64, u64)>> = sources.iter_mut().map(|s| s.next()).collect();
    let mut cur: Option<(u64, u64)> = None; // (start, end)
    std::iter::from_fn(move || loop {
        let next = heads.iter().enumerate().filter_map(|(i, h)| h.map(|r| (r.0, i))).min();
        match next {
            Some((_, i)) => {
                let (s, n) = heads[i].take().expect("head present");
                heads[i] = sources[i].next();
                match cur {
                    Some((cs, ce)) if s <= ce => cur = Some((cs, ce.max(s + n))),
                    Some((cs, ce)) => {
                        cur = Some((s, s + n));
                        return Some((cs, ce - cs));
                    }
                    None => cur = Some((s, s + n)),
                }
            }
            None => return cur.take().map(|(cs, ce)| (cs, ce - cs)),
        }
    })
}
