//! Region intents: what makes durable tracking survive a power loss.
//!
//! A killed process leaves every store into the mapped file in the page
//! cache, so the marks survive it without a sync on the write path. A power
//! loss keeps only what reached the disk: the pages the kernel chose to write
//! back, and what was synced. A guest data page may reach the disk right
//! after its copy while the mark that covers it does not. Durable tracking
//! adds the rule of md's write-intent bitmap:
//!
//! ```text
//! file:    intents[side][region] = the newest epoch whose writes into the region
//!          bitmap[side] covers (u32 per 2^region_shift bytes of disk, two arrays)
//! memory:  stamp[region] = the newest epoch whose intent for the region is durable
//! ```
//! A guest write of epoch `e` checks `stamp[region] >= e` (one load, no lock;
//! it passes for every write but a region's first in an epoch) and otherwise
//! stores `e` into its side's intent, syncs the intent pages and only then
//! raises the stamp: the intent is durable before the data it covers. After a
//! power loss the next open ORs every block of every region whose intent
//! names the open epoch into the active bitmap, and of every region naming
//! the pending epoch into the frozen one: whole regions, an over-report, never
//! a missed block. Because an intent holds its epoch, one from an older epoch
//! of the same side is simply not applied: nothing is ever cleared.
//!
//! Syncs are batched: a writer stores its intent, then takes a ticket; the
//! writer that gets the lock syncs once for every ticket taken before it
//! started, so writers that first touch regions at the same time share it
//! (and one that finds its regions stamped by a writer before it, under the
//! lock, does not sync at all).

use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

use crate::bitmap::AtomicBitmap;
use crate::mmap::Region;

/// Bytes of one side's intent array for `regions` regions: a `u32` each, whole pages.
pub(crate) fn side_bytes(regions: u64) -> u64 {
    (regions * 4).next_multiple_of(4096)
}

/// The intent arrays of a writable tracker and the stamps of this process.
#[derive(Debug)]
pub(crate) struct Intents {
    /// Both sides' arrays, side 0 first, mapped from the file.
    file: Region,
    /// `u32` entries of one side (whole pages).
    side_entries: usize,
    /// log2 of a region's bytes.
    shift: u32,
    /// Per region, the newest epoch whose intent is durable (anonymous
    /// memory: pages of regions never written are never allocated).
    stamps: Region,
    /// Tickets taken by writers after storing their intents.
    tickets: AtomicU64,
    /// The newest ticket a completed sync covers; held while syncing.
    synced: Mutex<u64>,
    /// Syncs done (statistics).
    syncs: AtomicU64,
}

impl Intents {
    /// Maps the intent arrays of `regions` regions of `1 << shift` bytes at
    /// `offset` in `file` (the caller holds the file's lock).
    pub(crate) fn map(file: &File, offset: u64, regions: u64, shift: u32) -> io::Result<Self> {
        let side = side_bytes(regions);
        Ok(Self {
            file: Region::map(file, offset, 2 * side as usize)?,
            side_entries: side as usize / 4,
            shift,
            stamps: Region::anon(side as usize)?,
            tickets: AtomicU64::new(0),
            synced: Mutex::new(0),
            syncs: AtomicU64::new(0),
        })
    }

    /// log2 of a region's bytes.
    pub(crate) fn shift(&self) -> u32 {
        self.shift
    }

    /// Whether a write of `[offset, offset + len)` (`len > 0`, inside the
    /// disk) in `epoch` is covered by durable intents: one load for a write
    /// inside one region.
    #[inline(always)]
    pub(crate) fn ready(&self, offset: u64, len: u64, epoch: u32) -> bool {
        let (first, last) = (offset >> self.shift, (offset + len - 1) >> self.shift);
        let stamps = self.stamps.words32();
        // Acquire: pairs with the Release that raised the stamp after the
        // sync returned, so the caller's data stores come after the sync.
        if first == last {
            stamps[first as usize].load(Ordering::Acquire) >= epoch
        } else {
            self.stamped(first, last, epoch)
        }
    }

    /// Whether every region of `first..=last` has a durable intent for `epoch` or later.
    fn stamped(&self, first: u64, last: u64, epoch: u32) -> bool {
        let stamps = self.stamps.words32();
        (first..=last).all(|r| stamps[r as usize].load(Ordering::Acquire) >= epoch)
    }

    /// Makes the intents of regions `first..=last` for `epoch` on `side`
    /// durable, then raises their stamps.
    ///
    /// A writer that read an epoch which has closed since (it runs outside
    /// the host's I/O gate, which then checks again) stores an intent for an
    /// epoch it does not write in, and raises a stamp below the current epoch:
    /// at most an over-report after a power loss, and a stamp never trusted.
    /// `fetch_max` keeps a slow writer from lowering what a faster one stored.
    pub(crate) fn make_durable(&self, side: usize, epoch: u32, first: u64, last: u64) -> io::Result<()> {
        let arr = self.side(side);
        for r in first..=last {
            // Relaxed: published to the syncing thread by the ticket's AcqRel.
            arr[r as usize].fetch_max(epoch, Ordering::Relaxed);
        }
        let ticket = self.tickets.fetch_add(1, Ordering::AcqRel) + 1;
        let mut synced = self.synced.lock();
        // A sync that started after this ticket was taken covers it; one of
        // the same regions and epoch (a writer that got here first) too.
        if *synced < ticket && !self.stamped(first, last, epoch) {
            // Every ticket up to `upto` was taken after its intents were
            // stored, so this sync writes them all.
            let upto = self.tickets.load(Ordering::Acquire);
            self.file.flush()?;
            *synced = upto;
            self.syncs.fetch_add(1, Ordering::Relaxed);
        }
        // Under the lock, so the next writer of these regions sees them.
        let stamps = self.stamps.words32();
        for r in first..=last {
            stamps[r as usize].fetch_max(epoch, Ordering::Release);
        }
        Ok(())
    }

    /// Syncs of the intent arrays so far (each covers every intent stored before it).
    pub(crate) fn syncs(&self) -> u64 {
        self.syncs.load(Ordering::Relaxed)
    }

    /// After a power loss: sets in `bitmap` every block (of `1 << gshift`
    /// bytes, below `capacity`) of every region whose intent on `side` names
    /// `epoch`. Returns how many regions it applied.
    pub(crate) fn apply(&self, side: usize, epoch: u64, capacity: u64, gshift: u32, bitmap: &AtomicBitmap) -> u64 {
        let blocks = capacity.div_ceil(1 << gshift);
        let regions = capacity.div_ceil(1 << self.shift).min(self.side_entries as u64);
        let mut n = 0;
        for (r, e) in self.side(side).iter().take(regions as usize).enumerate() {
            if u64::from(e.load(Ordering::Relaxed)) == epoch {
                let first = ((r as u64) << self.shift) >> gshift;
                let end = ((r as u64 + 1) << self.shift >> gshift).min(blocks);
                bitmap.set_range(first, end - 1);
                n += 1;
            }
        }
        n
    }

    fn side(&self, side: usize) -> &[std::sync::atomic::AtomicU32] {
        &self.file.words32()[side * self.side_entries..(side + 1) * self.side_entries]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bitmap::BitmapLayout;

    #[test]
    fn durable_intents_raise_stamps_and_apply_whole_regions() {
        let f = tempfile::NamedTempFile::new().unwrap();
        let regions = 16;
        f.as_file().set_len(2 * side_bytes(regions)).unwrap();
        let i = Intents::map(f.as_file(), 0, regions, 20).unwrap();
        assert!(!i.ready(0, 1, 1));
        i.make_durable(1, 7, 2, 3).unwrap();
        assert!(i.ready(2 << 20, 2 << 20, 7), "regions 2 and 3");
        assert!(!i.ready(2 << 20, (2 << 20) + 1, 7), "region 4 too");
        assert!(!i.ready(2 << 20, 1, 8), "a later epoch");
        // A slow writer of an older epoch lowers nothing.
        i.make_durable(1, 5, 3, 3).unwrap();
        assert!(i.ready(3 << 20, 1, 7));

        let bl = BitmapLayout::new(1 << 10);
        let g = tempfile::NamedTempFile::new().unwrap();
        g.as_file().set_len(bl.bytes()).unwrap();
        let b = AtomicBitmap::map(g.as_file(), 0, bl).unwrap();
        // 64 KiB blocks, 16 per region; the disk ends in the middle of region 3.
        let cap = (3 << 20) + (5 << 16);
        assert_eq!(i.apply(0, 7, cap, 16, &b), 0, "side 0 has none");
        assert_eq!(i.apply(1, 5, cap, 16, &b), 0, "epoch 5 was raised to 7");
        assert_eq!(i.apply(1, 7, cap, 16, &b), 2);
        let mut set = Vec::new();
        b.for_each_word(0, |w, mut m| {
            while m != 0 {
                set.push(w as u64 * 64 + u64::from(m.trailing_zeros()));
                m &= m - 1;
            }
        });
        assert_eq!(set, (32..53).collect::<Vec<u64>>());
    }

    /// Writers making intents durable at once, on shared and own regions:
    /// every one ends stamped and stored on its side.
    #[test]
    fn concurrent_writers_share_syncs_and_lose_no_intent() {
        let f = tempfile::NamedTempFile::new().unwrap();
        let regions = 64;
        f.as_file().set_len(2 * side_bytes(regions)).unwrap();
        let i = Intents::map(f.as_file(), 0, regions, 20).unwrap();
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let i = &i;
                s.spawn(move || {
                    for r in 0..16 {
                        // Region r is shared by all threads; 16 + 4r + t is this thread's own.
                        i.make_durable(0, 3, r, r).unwrap();
                        i.make_durable(0, 3, 16 + 4 * r + t, 16 + 4 * r + t).unwrap();
                    }
                });
            }
        });
        assert!(i.ready(0, regions << 20, 3), "every region stamped");
        assert!(i
            .side(0)
            .iter()
            .take(regions as usize)
            .all(|e| e.load(Ordering::Relaxed) == 3));
        assert!(i.side(1).iter().all(|e| e.load(Ordering::Relaxed) == 0));
        assert!(i.syncs() > 0);
    }
}
