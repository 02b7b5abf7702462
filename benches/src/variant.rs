//! Every tracker a benchmark compares, behind one enum.
//!
//! A round dispatches on the enum once, with [`with_tracker!`](crate::with_tracker),
//! and runs a loop monomorphised for that tracker type, so no variant pays an
//! indirect call per write and `()` ("tracking off") really compiles to nothing.

use std::collections::VecDeque;
use std::path::Path;

use anyhow::Context;
use parking_lot::Mutex;
use tempfile::TempDir;
use tracker::{Granularity, Tracker, TrackerOptions};

use crate::baselines::{FetchOrBitmap, LockedBitmap, PerChangeIdBitmaps};

/// Our tracker in a change-tracking file of its own temporary directory,
/// with the pins (live snapshots) it keeps.
#[derive(Debug)]
pub struct OwnedTracker {
    /// The tracker.
    pub tracker: Tracker,
    keep: usize,
    pins: Mutex<VecDeque<u64>>,
    _dir: TempDir,
}

impl OwnedTracker {
    /// A tracker for `capacity` bytes at `granularity` bytes per block, with
    /// its file in a new temporary directory under `dir`. [`new_epoch`](Self::new_epoch)
    /// keeps the last `keep` closed epochs retained: the oldest of them pinned,
    /// the others unfolded after it.
    pub fn create(dir: &Path, capacity: u64, granularity: u64, keep: usize) -> anyhow::Result<Self> {
        Self::create_with(dir, capacity, granularity, keep, &TrackerOptions::default())
    }

    /// [`create`](Self::create) with tracker options (durable tracking).
    pub fn create_with(
        dir: &Path,
        capacity: u64,
        granularity: u64,
        keep: usize,
        opts: &TrackerOptions,
    ) -> anyhow::Result<Self> {
        let tmp = tempfile::Builder::new()
            .prefix("cbt-bench-")
            .tempdir_in(dir)
            .with_context(|| format!("cannot create a temporary directory in {}", dir.display()))?;
        let g = Granularity::new(granularity)?;
        let tracker = Tracker::create_with(&tmp.path().join("disk.ctk"), capacity, g, opts)?;
        Ok(Self {
            tracker,
            keep,
            pins: Mutex::new(VecDeque::new()),
            _dir: tmp,
        })
    }

    /// Closes an epoch as a snapshot does (the caller has quiesced the
    /// writers), settles, and releases the oldest pins beyond `keep`.
    pub fn new_epoch(&self) -> anyhow::Result<u64> {
        let seq = self.tracker.close_epoch()?;
        self.tracker.settle();
        let mut pins = self.pins.lock();
        pins.push_back(seq);
        // Only the oldest kept epoch holds a tracker pin (a disk holds at most
        // 64): the epoch map holds epochs up to the oldest pin, so every later
        // one stays unfolded, as if each had its live snapshot.
        if pins.len() > 1 {
            self.tracker.unpin(seq);
        }
        while pins.len() > self.keep {
            let old = pins.pop_front().expect("non-empty");
            let front = *pins.front().expect("keep is at least 1");
            self.tracker.pin(front)?;
            self.tracker.unpin(old);
        }
        self.tracker.settle();
        Ok(seq)
    }

    /// How many closed epochs are pinned now.
    pub fn pinned(&self) -> usize {
        self.pins.lock().len()
    }
}

/// A tracker under test.
#[derive(Debug)]
pub enum Variant {
    /// Tracking off: `()`, the no-op tracker.
    Off,
    /// Ours: `tracker::Tracker` (durable or not).
    Ours(Box<OwnedTracker>),
    /// One bitmap behind a mutex (QEMU).
    Locked(LockedBitmap),
    /// A bitmap per change ID, all set (libvirt checkpoints over QEMU).
    PerChangeId(PerChangeIdBitmaps),
    /// A lock-free bitmap without test-before-set.
    FetchOr(FetchOrBitmap),
}

impl Variant {
    /// A short name for tables and JSON.
    pub fn name(&self) -> String {
        match self {
            Self::Off => "off".into(),
            Self::Ours(o) if o.tracker.is_durable() => "ours-durable".into(),
            Self::Ours(_) => "ours".into(),
            Self::Locked(_) => "locked".into(),
            Self::PerChangeId(b) => format!("per-cid-{}", b.count()),
            Self::FetchOr(_) => "fetch-or".into(),
        }
    }

    /// Starts a fresh epoch before a timed round (writers idle): our tracker
    /// closes an epoch, the baselines clear their bitmaps.
    pub fn reset(&self) -> anyhow::Result<()> {
        match self {
            Self::Off => {}
            Self::Ours(o) => {
                o.new_epoch()?;
            }
            Self::Locked(b) => b.clear(),
            Self::PerChangeId(b) => b.clear(),
            Self::FetchOr(b) => b.clear(),
        }
        Ok(())
    }
}

/// Evaluates `$body` with `$t` bound to the variant's tracker (`&T` where
/// `T: MarkDirty`), once per arm, so the body is monomorphised per tracker.
#[macro_export]
macro_rules! with_tracker {
    ($variant:expr, |$t:ident| $body:expr) => {
        match $variant {
            $crate::variant::Variant::Off => {
                let $t = &();
                $body
            }
            $crate::variant::Variant::Ours(o) => {
                let $t = &o.tracker;
                $body
            }
            $crate::variant::Variant::Locked(b) => {
                let $t = b;
                $body
            }
            $crate::variant::Variant::PerChangeId(b) => {
                let $t = b;
                $body
            }
            $crate::variant::Variant::FetchOr(b) => {
                let $t = b;
                $body
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracker::{MarkDirty, Since};

    fn marks<T: MarkDirty + ?Sized>(t: &T) {
        t.mark(0, 4096);
        t.mark(1 << 20, 4096);
    }

    #[test]
    fn new_epoch_keeps_the_last_pins_and_the_marks() {
        let o = OwnedTracker::create(&std::env::temp_dir(), 1 << 30, 65536, 2).unwrap();
        let v = Variant::Ours(Box::new(o));
        with_tracker!(&v, |t| marks(t));
        let Variant::Ours(o) = &v else { unreachable!() };
        let s1 = o.new_epoch().unwrap();
        v.reset().unwrap();
        v.reset().unwrap();
        assert_eq!(o.pinned(), 2);
        // The first epoch was folded but its marks still answer `*`.
        let last = o.tracker.last_closed();
        let page = o
            .tracker
            .changed_areas(Since::Allocated, last, 1 << 30, 0, 100)
            .unwrap();
        assert_eq!(page.areas, vec![(0, 65536), (1 << 20, 65536)]);
        assert!(s1 < last);
    }

    #[test]
    fn names() {
        assert_eq!(Variant::Off.name(), "off");
        assert_eq!(
            Variant::PerChangeId(PerChangeIdBitmaps::new(1 << 20, 4096, 8)).name(),
            "per-cid-8"
        );
        assert_eq!(Variant::Locked(LockedBitmap::new(1 << 20, 4096)).name(), "locked");
    }
}
