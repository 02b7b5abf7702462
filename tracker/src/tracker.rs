//! The change tracker of one virtual disk.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::Mutex;
use uuid::Uuid;

use crate::bitmap::AtomicBitmap;
use crate::ctk::{Header, Layout, ResetReason, HEADER_BYTES, MAX_PAST_SESSIONS, MAX_PINS, STATE_CLEAN, STATE_OPEN};
use crate::epochmap::EpochMap;
use crate::epochs;
use crate::mmap::Region;
use crate::sparse::SparseBits;
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
    /// The tracker was not closed cleanly last time and was recovered.
    pub recovered: bool,
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
/// frozen one is drained into its epoch file and a [`SparseBits`]. Closed
/// epochs are folded into the per-block "epoch last written" map once no
/// live snapshot (a *pin*) is older than them; until then they stay
/// separate, so a query at any live snapshot is exact: the epoch map holds
/// only epochs at or before the oldest pin.
///
/// # Crash safety
/// Everything a query needs is in the file or beside it at every instant:
/// marks in the mapped bitmaps, folded epochs in the mapped epoch map,
/// unfolded epochs in epoch files, counters and pins in a double-buffered
/// header. The order of each step (DESIGN.md, "the crash protocol") makes a
/// process killed at any instant reopen in the same tracking session with
/// every change ID answering exactly; only damaged files reset it.
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
    recovered: bool,
    /// Opened by [`TrackerView::open`]: mapped read-only, never written.
    read_only: bool,
}

/// A change-tracking file opened read-only, to answer queries without writing
/// anything (not even the header a writable open marks as in use): what
/// `snapshot list` or `query` need. It takes the file's lock shared, so it
/// fails with [`TrackerError::InUse`] while a writer has it open, and readers
/// do not exclude each other. A file a killed process left is read as
/// [`Tracker::open`] would recover it (the frozen bitmap of a pending epoch,
/// the epoch files), in memory only; damaged state reads as a reset.
#[derive(Debug)]
pub struct TrackerView(Tracker);

#[derive(Debug)]
struct Cold {
    path: PathBuf,
    header_region: Region,
    h: Header,
    emap: EpochMap,
    unfolded: BTreeMap<u64, SparseBits>,
    sync_drains: u64,
    /// The header page was updated without writing it back.
    header_unsynced: bool,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> TrackerError + '_ {
    move |source| TrackerError::Io {
        path: path.to_owned(),
        source,
    }
}

impl Tracker {
    /// Creates a new change-tracking file for a disk of `capacity` bytes.
    /// Tracking starts enabled, in a fresh session.
    pub fn create(path: &Path, capacity: u64, granularity: Granularity) -> Result<Self, TrackerError> {
        Self::create_at(path, capacity, granularity, 1, false)
    }

    /// Replaces a damaged change-tracking file with a new one: a new session
    /// whose first epoch is at least `next_epoch` (after every snapshot the
    /// host still has), so sequences never go back. Earlier change IDs of any
    /// session answer [`QueryError::TrackingReset`]. Until the host calls
    /// [`seed_allocation`](Self::seed_allocation), `*` answers the whole disk.
    /// The damaged file is kept as `<file>.damaged`.
    pub fn recreate(
        path: &Path,
        capacity: u64,
        granularity: Granularity,
        next_epoch: u64,
    ) -> Result<Self, TrackerError> {
        let mut aside = path.as_os_str().to_owned();
        aside.push(".damaged");
        if path.exists() {
            std::fs::rename(path, PathBuf::from(aside)).map_err(io_err(path))?;
        }
        let (old, temps) = epochs::list(path);
        for e in old {
            epochs::remove(path, e);
        }
        for t in temps {
            let _ = std::fs::remove_file(t);
        }
        Self::create_at(path, capacity, granularity, next_epoch.max(2), true)
    }

    fn create_at(
        path: &Path,
        capacity: u64,
        granularity: Granularity,
        first_epoch: u64,
        recreated: bool,
    ) -> Result<Self, TrackerError> {
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
            generation: 0,
            state: STATE_OPEN,
            granularity_shift: granularity.shift,
            enabled: true,
            allocation_unknown: recreated,
            recreated,
            capacity,
            max_blocks,
            cur_epoch: first_epoch,
            last_closed: first_epoch - 1,
            folded: first_epoch - 1,
            session_start: first_epoch,
            // A recreated file knows nothing of the epochs before it.
            marks_lost_through: if recreated { first_epoch } else { 0 },
            active: 0,
            pending: 0,
            session: Uuid::new_v4(),
            past: Vec::new(),
            pins: Vec::new(),
        };
        let t = Self::assemble(path, file, h, layout, false)?;
        t.cold.lock().write_header(true).map_err(io_err(path))?;
        Ok(t)
    }

    /// Opens an existing change-tracking file, in the same tracking session,
    /// whether it was closed cleanly or its process was killed: a frozen
    /// bitmap not yet written to its epoch file is written now, a fold that
    /// was interrupted is done again. If an epoch file is missing or damaged
    /// the session is reset (earlier change IDs fail with
    /// [`QueryError::TrackingReset`]) and `*` needs the host's
    /// [`seed_allocation`](Self::seed_allocation). A damaged header is
    /// [`TrackerError::BadFile`]: the host then calls [`recreate`](Self::recreate).
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
        let h = Header::read(&page).map_err(bad)?;
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
        let recovered = h.state != STATE_CLEAN;
        let t = Self::assemble(path, file, h, layout, recovered)?;
        {
            let mut c = t.cold.lock();
            let active = t.active.load(Ordering::Relaxed);
            if c.h.pending != 0 {
                // Killed between a snapshot and its drain: the frozen bitmap
                // still holds the epoch; write it out now.
                c.drain_pending(&t.bitmaps, active).map_err(io_err(path))?;
            } else {
                // Whatever the inactive bitmap holds was written to its epoch
                // file already (killed before it was cleared).
                t.bitmaps[1 - active].drain(|_, _| {});
            }
            let (folded, last) = (c.h.folded, c.h.last_closed);
            match epochs::load(path, folded, last, 0) {
                Some(unfolded) => c.unfolded = unfolded,
                None => {
                    // An epoch after the fold horizon is lost: answers that
                    // need it cannot be exact any more.
                    reset_session(&mut c.h, ResetReason::Corrupt);
                    c.h.allocation_unknown = true;
                    c.h.folded = c.h.last_closed;
                    c.h.marks_lost_through = c.h.cur_epoch;
                    c.unfolded.clear();
                    let (have, _) = epochs::list(path);
                    for e in have {
                        epochs::remove(path, e);
                    }
                }
            }
            // An interrupted fold is done again (folding is idempotent).
            c.fold();
            c.h.state = STATE_OPEN;
            c.write_header(true).map_err(io_err(path))?;
        }
        Ok(t)
    }

    fn assemble(path: &Path, file: File, h: Header, layout: Layout, recovered: bool) -> Result<Self, TrackerError> {
        let e = io_err(path);
        let b0 = AtomicBitmap::map(&file, layout.bitmap_offsets[0], layout.bitmap.clone()).map_err(io_err(path))?;
        let b1 = AtomicBitmap::map(&file, layout.bitmap_offsets[1], layout.bitmap.clone()).map_err(io_err(path))?;
        let emap = EpochMap::map(&file, layout.emap_offset, layout.emap.clone()).map_err(io_err(path))?;
        let header_region = Region::map(&file, 0, HEADER_BYTES as usize).map_err(e)?;
        Ok(Self {
            path: path.to_owned(),
            granularity: Granularity {
                shift: h.granularity_shift,
            },
            active: AtomicUsize::new(h.active as usize),
            bitmaps: [b0, b1],
            file,
            cold: Mutex::new(Cold {
                path: path.to_owned(),
                header_region,
                h,
                emap,
                unfolded: BTreeMap::new(),
                sync_drains: 0,
                header_unsynced: false,
            }),
            abandoned: false.into(),
            recovered,
            read_only: false,
        })
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
    /// Always inlined: in a loop of writes the re-mark is a handful of
    /// instructions, and a call would cost as much again.
    #[inline(always)]
    pub fn mark(&self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let s = self.granularity.shift;
        // Relaxed: `active` changes only while writers are quiesced by the
        // host's I/O gate, whose lock orders this load after the change.
        // (`& 1`: the index is 0 or 1, and the compiler then knows it.)
        let b = &self.bitmaps[self.active.load(Ordering::Relaxed) & 1];
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
            c.write_header(true).map_err(io_err(&self.path))?;
        }
        Ok(())
    }

    /// Turns change tracking off: the session ends, its change IDs become invalid.
    pub fn disable(&self) -> Result<(), TrackerError> {
        let mut c = self.cold.lock();
        if c.h.enabled {
            retire_session(&mut c.h, ResetReason::Disabled);
            c.h.enabled = false;
            c.write_header(true).map_err(io_err(&self.path))?;
        }
        Ok(())
    }

    /// Writes the frozen bitmap of the last epoch switch (if any) to its
    /// epoch file and folds closed epochs no live snapshot needs. Runs off
    /// the I/O path; a host calls it after a snapshot, before taking the next
    /// one, and after removing one. An I/O error leaves the epoch frozen (the
    /// next call, or the next `close_epoch`, tries again).
    pub fn settle(&self) {
        let mut c = self.cold.lock();
        let active = self.active.load(Ordering::Relaxed);
        if c.drain_pending(&self.bitmaps, active).is_ok() {
            c.fold();
        }
        if c.header_unsynced {
            let _ = c.write_header(true);
        }
    }

    /// Closes the current epoch and returns its sequence number, pinned for
    /// the snapshot that asked (release it with [`unpin`](Self::unpin)).
    ///
    /// **The caller must have quiesced every writer of this disk** (the host's
    /// snapshot stun): a write whose data lands after the switch must mark
    /// the new epoch. O(1) when [`settle`](Self::settle) ran since the last
    /// switch; otherwise the previous frozen bitmap is drained here. No file
    /// I/O: the header page is updated in the mapping (where a killed process
    /// leaves it) and written back by the next `settle`.
    pub fn close_epoch(&self) -> Result<u64, TrackerError> {
        let mut c = self.cold.lock();
        let old = self.active.load(Ordering::Relaxed);
        if c.h.pending != 0 {
            c.sync_drains += 1;
            c.drain_pending(&self.bitmaps, old).map_err(io_err(&self.path))?;
        }
        let e = c.h.cur_epoch;
        if e >= u64::from(u32::MAX) {
            return Err(TrackerError::EpochsExhausted);
        }
        if c.h.pins.len() >= MAX_PINS {
            return Err(TrackerError::TooManyPins(MAX_PINS));
        }
        // Relaxed: writers are quiesced; the host's gate publishes this store.
        self.active.store(1 - old, Ordering::Relaxed);
        c.h.pending = e;
        c.h.active = (1 - old) as u64;
        c.h.last_closed = e;
        c.h.cur_epoch = e + 1;
        add_pin(&mut c.h.pins, e);
        // Only the mapped page changes here: a synchronous write-back inside
        // the stun waits on the file system (measured: p99 13 ms at 1 GiB,
        // 67 ms at 1 TiB on ext4). `settle`, which the host calls right after
        // the stun, writes it back; a killed process leaves it in the page cache.
        c.write_header(false).map_err(io_err(&self.path))?;
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
        if let Some(i) = c.h.pins.iter().position(|&(s, _)| s == seq) {
            c.h.pins[i].1 -= 1;
            if c.h.pins[i].1 == 0 {
                c.h.pins.remove(i);
            }
        }
        let _ = c.write_header(false);
        let active = self.active.load(Ordering::Relaxed);
        if c.drain_pending(&self.bitmaps, active).is_ok() {
            c.fold();
        }
        let _ = c.write_header(true);
    }

    /// Pins `seq` again (a host re-applying a live snapshot).
    pub fn pin(&self, seq: u64) -> Result<(), TrackerError> {
        let mut c = self.cold.lock();
        if c.h.pins.len() >= MAX_PINS && !c.h.pins.iter().any(|&(s, _)| s == seq) {
            return Err(TrackerError::TooManyPins(MAX_PINS));
        }
        add_pin(&mut c.h.pins, seq);
        c.write_header(true).map_err(io_err(&self.path))
    }

    /// Makes the pins exactly `live` (the host's live snapshots, after a
    /// reopen): pins of snapshots the host no longer has (a process killed
    /// between removing a snapshot and unpinning it) are released and folded.
    pub fn retain_pins(&self, live: &[u64]) -> Result<(), TrackerError> {
        let mut c = self.cold.lock();
        let mut pins: Vec<(u64, u32)> = Vec::new();
        for &s in live {
            add_pin(&mut pins, s);
        }
        if pins.len() > MAX_PINS {
            return Err(TrackerError::TooManyPins(MAX_PINS));
        }
        c.h.pins = pins;
        c.write_header(false).map_err(io_err(&self.path))?;
        let active = self.active.load(Ordering::Relaxed);
        if c.drain_pending(&self.bitmaps, active).is_ok() {
            c.fold();
        }
        c.write_header(true).map_err(io_err(&self.path))
    }

    /// Sequences currently pinned.
    pub fn pins(&self) -> Vec<u64> {
        self.cold.lock().h.pins.iter().map(|&(s, _)| s).collect()
    }

    /// Reverting the disk to the snapshot at `seq`: every block written after
    /// `seq` is changed back by the revert, so it is marked in the current
    /// epoch. Change IDs issued after `seq` stay valid and keep answering
    /// correctly. **The caller must have quiesced every writer.** Marking
    /// again is harmless, so a host may repeat it after a crash.
    ///
    /// If `seq` is older than the fold horizon, or than the epoch that was
    /// open when damaged state reset tracking (only after damage: a live
    /// snapshot otherwise pins it, and a killed process loses no marks), the
    /// marks of the epochs after it are lost and what the revert changes back
    /// is not known: a new session starts, so earlier change IDs fail with
    /// `TrackingReset` instead of answering incompletely.
    pub fn rewind_to(&self, seq: u64) -> Result<(), QueryError> {
        let mut c = self.cold.lock();
        if seq > c.h.last_closed {
            return Err(QueryError::PointNotRetained(seq));
        }
        let active = &self.bitmaps[self.active.load(Ordering::Relaxed)];
        if c.h.pending > seq {
            // Epochs in the frozen bitmap changed back too.
            self.bitmaps[1 - self.active.load(Ordering::Relaxed)].for_each_word(0, |w, m| active.or_leaf_word(w, m));
        }
        for bits in c.unfolded.range(seq + 1..).map(|(_, b)| b) {
            bits.for_each_word(|w, m| active.or_leaf_word(w as usize, m));
        }
        if seq < c.h.folded || seq < c.h.marks_lost_through {
            reset_session(&mut c.h, ResetReason::Corrupt);
            let _ = c.write_header(false);
        }
        Ok(())
    }

    /// Grows the tracked capacity. **The caller must have quiesced every
    /// writer.** No file I/O inside the caller's stun: the header page is
    /// written back by the next `settle`.
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
        c.write_header(false).map_err(io_err(&self.path))
    }

    /// Whether `*` needs the host's allocation (the state was damaged and
    /// nothing has been seeded yet).
    pub fn needs_allocation(&self) -> bool {
        self.cold.lock().h.allocation_unknown
    }

    /// Seeds what `*` answers after damage: every block of these byte ranges
    /// (what the host's layers hold) counts as written before the current
    /// session. Then `*` answers from the tracker again.
    pub fn seed_allocation(&self, ranges: impl IntoIterator<Item = (u64, u64)>) -> Result<(), TrackerError> {
        let mut c = self.cold.lock();
        let epoch = u32::try_from(c.h.folded.max(1)).map_err(|_| TrackerError::EpochsExhausted)?;
        let s = self.granularity.shift;
        let mut bits = SparseBits::default();
        for (off, len) in ranges {
            if len == 0 {
                continue;
            }
            let (first, last) = (off >> s, (off + len - 1) >> s);
            let (fw, lw) = (first / 64, last / 64);
            for w in fw..=lw {
                let lo = if w == fw { first % 64 } else { 0 };
                let hi = if w == lw { last % 64 } else { 63 };
                bits.or_word(w, (u64::MAX >> (63 - hi)) & (u64::MAX << lo));
            }
        }
        bits.for_each_word(|w, m| c.emap.fold_word(w, m, epoch));
        c.emap.flush().map_err(io_err(&self.path))?;
        c.h.allocation_unknown = false;
        c.write_header(true).map_err(io_err(&self.path))
    }

    /// One page of the areas changed between `since` and the closed epoch
    /// `at` (a live snapshot's sequence), for a disk of `capacity` bytes at
    /// that point, from byte `start`, with at most `max_areas` areas.
    ///
    /// `*` is answered at any point, also one older than the fold horizon: it
    /// then includes blocks written after `at` (an over-report, never less).
    /// A query writes nothing.
    pub fn changed_areas(
        &self,
        since: Since,
        at: u64,
        capacity: u64,
        start: u64,
        max_areas: usize,
    ) -> Result<AreaPage, QueryError> {
        let c = self.cold.lock();
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
                    None if h.recreated => QueryError::TrackingReset {
                        change_id: id,
                        reason: ResetReason::Corrupt.describe().into(),
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
        if at > h.last_closed || (at < h.folded && since != Since::Allocated) {
            return Err(QueryError::PointNotRetained(at));
        }
        let g = self.granularity;
        let first = start >> g.shift;
        let end_block = g.blocks(capacity);
        // The epoch still in the frozen bitmap, read without draining it (a
        // query writes nothing; the bitmap has no writers).
        let frozen = (h.pending > s && h.pending <= at).then(|| {
            let mut bits = SparseBits::default();
            self.bitmaps[1 - self.active.load(Ordering::Relaxed)].for_each_word(0, |w, m| bits.or_word(w as u64, m));
            bits
        });
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
        if let Some(bits) = &frozen {
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
            recovered: self.recovered,
        }
    }

    /// The sequence of the last closed epoch.
    pub fn last_closed(&self) -> u64 {
        self.cold.lock().h.last_closed
    }

    /// Drops the tracker without a clean close, as a killed process would:
    /// nothing more is written. For fault injection and tests.
    pub fn abandon(&self) {
        self.abandoned.store(true, Ordering::Relaxed);
    }

    /// Writes all state back to the file, marks it closed cleanly, and
    /// releases it.
    pub fn close(self) -> Result<(), TrackerError> {
        self.persist()
    }

    fn persist(&self) -> Result<(), TrackerError> {
        let e = || io_err(&self.path);
        let mut c = self.cold.lock();
        let active = self.active.load(Ordering::Relaxed);
        c.drain_pending(&self.bitmaps, active).map_err(e())?;
        c.fold();
        for b in &self.bitmaps {
            b.flush().map_err(e())?;
        }
        c.emap.flush().map_err(e())?;
        c.h.state = STATE_CLEAN;
        c.write_header(true).map_err(e())?;
        Ok(())
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        let clean = self.cold.lock().h.state == STATE_CLEAN;
        if !clean && !self.abandoned.load(Ordering::Relaxed) && !self.read_only {
            // Best effort; an error leaves the file marked open, and the next
            // open recovers it as after a crash.
            let _ = self.persist();
        }
    }
}

impl Cold {
    /// Writes the header into its slot of the mapped page; `sync` writes the
    /// page back to the file too.
    fn write_header(&mut self, sync: bool) -> io::Result<()> {
        let Self { header_region, h, .. } = self;
        let Some(page) = header_region.bytes_mut() else {
            return Ok(()); // a read-only view writes nothing
        };
        h.write(page);
        if sync {
            self.header_unsynced = false;
            header_region.flush()?;
            // Writing the page back left it write-protected: the next update
            // through the mapping would take a page fault, and `close_epoch`
            // updates it inside the host's stun. Fault it in now.
            header_region.populate_words(0, HEADER_BYTES as usize / 8);
            Ok(())
        } else {
            self.header_unsynced = true;
            Ok(())
        }
    }

    /// Writes the frozen bitmap (the one not `active`) of the pending epoch
    /// to its epoch file, records that in the header, then clears the bitmap.
    /// Killed at any step, the next open finds either the epoch still
    /// pending with the bitmap intact, or its file complete.
    fn drain_pending(&mut self, bitmaps: &[AtomicBitmap; 2], active: usize) -> io::Result<()> {
        let epoch = self.h.pending;
        if epoch == 0 {
            return Ok(());
        }
        let frozen = &bitmaps[1 - active];
        let mut bits = SparseBits::default();
        frozen.for_each_word(0, |w, m| bits.or_word(w as u64, m));
        epochs::write(&self.path, epoch, &bits)?;
        crash_point("drain: epoch file written")?;
        self.unfolded.insert(epoch, bits);
        self.h.pending = 0;
        self.write_header(true)?;
        crash_point("drain: header written")?;
        clear(frozen)
    }

    /// Folds every closed, written-out epoch up to the oldest pin into the
    /// epoch map. The map is written back before the header records the new
    /// horizon, and epoch files go only after that: killed in between, the
    /// next open folds the same epochs again (folding keeps the newest epoch
    /// of a block, so it is idempotent).
    fn fold(&mut self) {
        if self.h.pending != 0 {
            return;
        }
        let target = self.h.pins.iter().map(|&(s, _)| s).min().unwrap_or(self.h.last_closed);
        if target <= self.h.folded {
            return;
        }
        let mut done = Vec::new();
        while let Some(entry) = self.unfolded.first_entry() {
            if *entry.key() > target {
                break;
            }
            let (epoch, bits) = entry.remove_entry();
            bits.for_each_word(|w, m| self.emap.fold_word(w, m, epoch as u32));
            done.push(epoch);
            if crash_point("fold: one epoch folded").is_err() {
                return;
            }
        }
        if self.emap.flush().is_err() {
            return;
        }
        self.h.folded = target;
        if self.write_header(true).is_ok() && crash_point("fold: header written").is_ok() {
            for e in done {
                epochs::remove(&self.path, e);
            }
        }
    }
}

/// Clears a drained bitmap (every bit of it is in its epoch file). In unit
/// tests, the crash point "drain: clearing" stops after its first leaf page,
/// as a process killed half way through would.
fn clear(frozen: &AtomicBitmap) -> io::Result<()> {
    #[cfg(test)]
    if CRASH_AT.get() == Some("drain: clearing") {
        CRASH_AT.set(None);
        frozen.drain_pages(1, |_, _| {});
        return Err(io::Error::other("crash point: drain: clearing"));
    }
    frozen.drain(|_, _| {});
    Ok(())
}

#[cfg(test)]
thread_local! {
    /// The step at which a unit test makes this thread's tracker stop as a
    /// killed process would (the test then abandons the tracker).
    static CRASH_AT: std::cell::Cell<Option<&'static str>> = const { std::cell::Cell::new(None) };
}

/// A point of the crash protocol: in unit tests, fails when the test asked
/// to stop here; compiled to nothing otherwise.
#[inline]
fn crash_point(_name: &'static str) -> io::Result<()> {
    #[cfg(test)]
    if CRASH_AT.get() == Some(_name) {
        CRASH_AT.set(None);
        return Err(io::Error::other(format!("crash point: {_name}")));
    }
    Ok(())
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
        let mut h = Header::read(&page).map_err(bad)?;
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
        // The epoch still in the frozen bitmap is read from it by queries.
        let unfolded = (h.folded + 1..=h.last_closed)
            .filter(|&e| e != h.pending)
            .map(|e| epochs::read(path, e).map(|b| (e, b)))
            .collect::<Option<BTreeMap<u64, SparseBits>>>();
        let unfolded = match unfolded {
            Some(u) => u,
            None => {
                // As `Tracker::open` would reset it, in memory only.
                reset_session(&mut h, ResetReason::Corrupt);
                h.allocation_unknown = true;
                h.folded = h.last_closed;
                h.pending = 0;
                BTreeMap::new()
            }
        };
        let recovered = h.state != STATE_CLEAN;
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
                path: path.to_owned(),
                header_region,
                h,
                emap,
                unfolded,
                sync_drains: 0,
                header_unsynced: false,
            }),
            abandoned: false.into(),
            recovered,
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

fn add_pin(pins: &mut Vec<(u64, u32)>, seq: u64) {
    match pins.iter_mut().find(|(s, _)| *s == seq) {
        Some((_, n)) => *n += 1,
        None => pins.push((seq, 1)),
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

#[cfg(test)]
mod crash_tests {
    //! A process killed at each step of the crash protocol reopens in the
    //! same session with every answer exact.

    use super::*;

    const GIB: u64 = 1 << 30;

    fn areas(t: &Tracker, since: Since, at: u64) -> Vec<(u64, u64)> {
        t.changed_areas(since, at, GIB, 0, usize::MAX).unwrap().areas
    }

    /// Three snapshots with writes between them; snapshot 1 is removed
    /// (folding epochs 1..), with the kill at `point`, then every answer is
    /// compared with a run that was not killed.
    fn run(point: &'static str) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.ctk");
        let t = Tracker::create(&p, GIB, Granularity::DEFAULT).unwrap();
        t.mark(0, 1);
        let e1 = t.close_epoch().unwrap();
        t.settle();
        t.mark(3 << 16, 1);
        t.mark(0, 1);
        let e2 = t.close_epoch().unwrap();
        t.settle();
        t.mark(7 << 16, 1);
        let e3 = t.close_epoch().unwrap();
        // `settle` writes e3 out and `unpin(e1)` folds e1 and e2: each step
        // of both can be the one that is killed.
        CRASH_AT.set(Some(point));
        t.settle();
        t.unpin(e1);
        let hit = CRASH_AT.get().is_none();
        CRASH_AT.set(None);
        assert!(hit, "the run passed crash point {point:?}");
        let ids: Vec<ChangeId> = [e1, e2, e3].iter().map(|&e| t.change_id(e).unwrap()).collect();
        t.abandon();
        drop(t);

        let t = Tracker::open(&p).unwrap();
        assert_eq!(t.change_id(e1), Some(ids[0]), "{point}: the same session");
        // Snapshot 1 is gone as far as the host knows: it re-applies its pins.
        t.retain_pins(&[e2, e3]).unwrap();
        let b = |n: u64| (n << 16, 1 << 16);
        assert_eq!(areas(&t, Since::Change(ids[0]), e3), vec![b(0), b(3), b(7)], "{point}");
        assert_eq!(areas(&t, Since::Change(ids[0]), e2), vec![b(0), b(3)], "{point}");
        assert_eq!(areas(&t, Since::Change(ids[1]), e3), vec![b(7)], "{point}");
        assert_eq!(areas(&t, Since::Allocated, e3), vec![b(0), b(3), b(7)], "{point}");
        // And it goes on: a later snapshot, the rest folded.
        t.mark(9 << 16, 1);
        let e4 = t.close_epoch().unwrap();
        t.unpin(e2);
        t.unpin(e3);
        t.settle();
        assert_eq!(areas(&t, Since::Change(ids[2]), e4), vec![b(9)], "{point}");
        assert_eq!(
            areas(&t, Since::Change(ids[0]), e4),
            vec![b(0), b(3), b(7), b(9)],
            "{point}"
        );
    }

    #[test]
    fn killed_after_the_epoch_file_is_written() {
        run("drain: epoch file written");
    }

    #[test]
    fn killed_after_the_drain_is_recorded_before_the_bitmap_is_cleared() {
        run("drain: header written");
    }

    /// Killed half way through clearing a drained bitmap (its first leaf
    /// page cleared, a later one not): the bits left behind are cleared on
    /// open, so when that bitmap is active again its epoch holds only its own
    /// writes.
    #[test]
    fn killed_half_way_through_clearing_a_drained_bitmap() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.ctk");
        let cap = 16 * GIB;
        // One leaf page covers 32768 blocks: block 100_000 lies in page 3.
        let b = |n: u64| (n << 16, 1 << 16);
        let t = Tracker::create(&p, cap, Granularity::DEFAULT).unwrap();
        t.mark(0, 1);
        t.mark(100_000 << 16, 1);
        let e1 = t.close_epoch().unwrap();
        CRASH_AT.set(Some("drain: clearing"));
        t.settle();
        assert!(CRASH_AT.get().is_none(), "the run passed the crash point");
        let id1 = t.change_id(e1).unwrap();
        t.abandon();
        drop(t);

        let t = Tracker::open(&p).unwrap();
        t.retain_pins(&[e1]).unwrap();
        let all = |t: &Tracker, since, at| t.changed_areas(since, at, cap, 0, usize::MAX).unwrap().areas;
        t.mark(5 << 16, 1);
        let e2 = t.close_epoch().unwrap();
        t.settle();
        // This epoch marks the bitmap the kill left half cleared.
        t.mark(7 << 16, 1);
        let e3 = t.close_epoch().unwrap();
        t.settle();
        let id2 = t.change_id(e2).unwrap();
        assert_eq!(all(&t, Since::Change(id2), e3), vec![b(7)]);
        assert_eq!(all(&t, Since::Change(id1), e3), vec![b(5), b(7)]);
        assert_eq!(all(&t, Since::Allocated, e3), vec![b(0), b(5), b(7), b(100_000)]);
    }

    #[test]
    fn killed_in_the_middle_of_a_fold() {
        run("fold: one epoch folded");
    }

    #[test]
    fn killed_after_a_fold_is_recorded_before_its_files_are_removed() {
        run("fold: header written");
    }
}
