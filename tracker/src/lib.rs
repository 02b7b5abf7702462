//! Lock-free changed-block tracking with change IDs: the VMkernel's half of CBT.
//!
//! A [`Tracker`] records, for one virtual disk, which blocks of
//! [`Granularity`] bytes each guest write touched, and answers "which areas
//! changed between change ID `c` and the snapshot at sequence `t`" exactly,
//! for any earlier `c` of the current tracking session.
//!
//! * The write path ([`Tracker::mark`]) is lock-free and allocation-free: one
//!   flat atomic bitmap, test-before-set, so re-marking a hot block is one
//!   load and a first touch one `fetch_or` (a summary bit per 4 KiB page of
//!   bitmap, set once per page and epoch, lets draining skip untouched pages).
//!   Its cost does not depend on how many change IDs are retained.
//! * Each snapshot closes an epoch ([`Tracker::close_epoch`], O(1), under
//!   the host's I/O stun). Closed epochs are drained and folded into a
//!   per-block "epoch last written" map off the I/O path (after Linux
//!   dm-era); max-summary levels (one entry per 16) make queries cost time
//!   in proportion to what changed.
//! * State lives in a memory-mapped sparse file with a versioned header (the
//!   `-ctk` file), so memory grows with the regions written, not capacity.
//! * Anything that cannot be answered exactly is a typed [`QueryError`]:
//!   tracking off, a change ID from before a reset, a foreign change ID.
//!
//! # Example
//! ```
//! use tracker::{Granularity, Since, Tracker};
//!
//! let dir = tempfile::tempdir()?;
//! let gib = 1 << 30;
//! let t = Tracker::create(&dir.path().join("disk0.ctk"), 64 * gib, Granularity::DEFAULT)?;
//! t.mark(0, 4096);                      // a guest write
//! let s1 = t.close_epoch()?;            // snapshot 1 (host has I/O stunned)
//! t.settle();                           // off the I/O path
//! let cid = t.change_id(s1).unwrap();   // what a backup stores
//! t.mark(65535, 2);                     // unaligned: touches blocks 0 and 1
//! let s2 = t.close_epoch()?;
//! let page = t.changed_areas(Since::Change(cid), s2, 64 * gib, 0, 2000)?;
//! assert_eq!(page.areas, vec![(0, 128 * 1024)]);
//! assert_eq!(page.length, 64 * gib);    // the whole disk in one page
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod bitmap;
mod change_id;
mod ctk;
mod epochmap;
mod epochs;
mod error;
mod mmap;
mod sparse;
mod tracker;

pub use bitmap::{AtomicBitmap, BitmapLayout};
pub use change_id::{ChangeId, ParseChangeIdError};
pub use ctk::ResetReason;
pub use error::{QueryError, TrackerError};
pub use sparse::SparseBits;
pub use tracker::{AreaPage, Granularity, Since, Tracker, TrackerStats, TrackerView, MAX_CAPACITY};

/// Something the write path tells about every guest write.
///
/// `()` does nothing: the baseline for measuring tracking overhead.
pub trait MarkDirty: Send + Sync {
    /// Records a write of `[offset, offset + len)`.
    fn mark(&self, offset: u64, len: u64);
}

impl MarkDirty for () {
    #[inline]
    fn mark(&self, _offset: u64, _len: u64) {}
}

impl MarkDirty for Tracker {
    #[inline(always)]
    fn mark(&self, offset: u64, len: u64) {
        Tracker::mark(self, offset, len);
    }
}
