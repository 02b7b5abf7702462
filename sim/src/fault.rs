//! Test-only fault injection and pause points (cargo feature
//! `fault-injection`, which only sim's own tests turn on: normal builds do
//! not contain this module nor the calls to it, so the write path pays nothing).
//!
//! A hook belongs to one thread: a test installs it on the thread that does
//! an operation (a guest write, a snapshot removal) and it runs at every
//! [`Point`] that thread passes. It may block there, to order that thread
//! against another one deterministically, or fail the operation there.
//!
//! ```text
//!  guest_io:     BeforeGate ─▶ [gate] mark ─▶ Marked ─▶ ExtentWrite per extent chunk ─▶ [/gate]
//!  consolidate:  Consolidating { round } right before a layer is merged into its parent,
//!                Unlinked { round } once the merged layer left the chain (the stun is over)
//!  revert:       Reverting after the reverted configuration is saved, before the stun
//! ```

use std::cell::RefCell;
use std::io;
use std::path::PathBuf;

use crate::error::SimError;

/// Where a thread is.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Point {
    /// A guest write or unmap, about to take the I/O gate (nothing marked yet).
    BeforeGate {
        /// The disk.
        disk: usize,
        /// Where.
        offset: u64,
        /// How much.
        len: u64,
    },
    /// A guest write or unmap holding the gate, marked, before any data is copied.
    Marked {
        /// The disk.
        disk: usize,
        /// Where.
        offset: u64,
        /// How much.
        len: u64,
    },
    /// A layer is about to copy `len` bytes at `offset` into one of its
    /// extents (guest data, a copy-on-write grain or a merge). Failing here
    /// leaves the chunks before it written: a write that fails half way.
    ExtentWrite {
        /// The layer's id.
        layer: u64,
        /// Disk offset.
        offset: u64,
        /// Bytes of this chunk.
        len: u64,
    },
    /// Snapshot removal is about to merge a layer into its parent. `round` is
    /// 0 for a frozen layer (the guest writes elsewhere), else the round of
    /// merging the live top while a helper delta on top takes the writes.
    Consolidating {
        /// The disk.
        disk: usize,
        /// 0, or 1.. while a helper delta is the live top.
        round: usize,
    },
    /// Snapshot removal merged a layer and unlinked it from the chain; the stun
    /// is over and the guest writes again, but the layer's files are not deleted
    /// yet, and a helper delta merged inside the stun is still named by the
    /// saved configuration.
    Unlinked {
        /// The disk.
        disk: usize,
        /// As in `Consolidating`.
        round: usize,
    },
    /// A revert saved the reverted configuration (and its journal) and is
    /// about to stun and mark what it changes back.
    Reverting,
}

type Hook = Box<dyn FnMut(&Point) -> io::Result<()>>;

thread_local! {
    static HOOK: RefCell<Option<Hook>> = const { RefCell::new(None) };
}

/// Installs `hook` for this thread until the guard is dropped. Returning an
/// error from the hook fails the operation at that point with
/// [`SimError::Io`].
pub fn set_hook(hook: impl FnMut(&Point) -> io::Result<()> + 'static) -> HookGuard {
    HOOK.with(|h| *h.borrow_mut() = Some(Box::new(hook)));
    HookGuard(std::marker::PhantomData)
}

/// Removes this thread's hook when dropped.
#[derive(Debug)]
pub struct HookGuard(std::marker::PhantomData<*const ()>);

impl Drop for HookGuard {
    fn drop(&mut self) {
        HOOK.with(|h| h.borrow_mut().take());
    }
}

/// Runs this thread's hook at `point`.
pub(crate) fn hit(point: Point) -> Result<(), SimError> {
    HOOK.with(|h| {
        // A hook that itself does I/O through the VM does not recurse.
        let Ok(mut hook) = h.try_borrow_mut() else {
            return Ok(());
        };
        match hook.as_mut() {
            Some(f) => f(&point).map_err(|source| SimError::Io {
                path: PathBuf::from(format!("<fault injected at {point:?}>")),
                source,
            }),
            None => Ok(()),
        }
    })
}
