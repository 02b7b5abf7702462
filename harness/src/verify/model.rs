//! What a run knows the VM's state must be, and what its threads share.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};

use super::MAX_MESSAGES;
use sim::{Host, Vm};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Op {
    Create,
    RemoveNewest,
    RemoveMiddle,
    RemoveOldest,
    Revert,
    Extend,
    CbtOff,
    CbtOn,
    PowerCycle,
    Restart,
    Crash,
    Recheck,
}

impl Op {
    pub(super) fn name(self) -> &'static str {
        match self {
            Op::Create => "create",
            Op::RemoveNewest => "remove_newest",
            Op::RemoveMiddle => "remove_middle",
            Op::RemoveOldest => "remove_oldest",
            Op::Revert => "revert",
            Op::Extend => "extend",
            Op::CbtOff => "cbt_off",
            Op::CbtOn => "cbt_on",
            Op::PowerCycle => "power_cycle",
            Op::Restart => "restart",
            Op::Crash => "crash",
            Op::Recheck => "recheck",
        }
    }
}

/// A kept snapshot, as the model knows it.
#[derive(Debug, Clone)]
pub(super) struct Snap {
    pub(super) name: String,
    pub(super) order: u64,
    pub(super) session: u64,
    pub(super) cid: Option<String>,
    pub(super) image: Arc<Vec<u8>>,
}

/// A change ID a backup application kept, with the image it backed up.
#[derive(Debug, Clone)]
pub(super) struct Baseline {
    pub(super) name: String,
    pub(super) order: u64,
    pub(super) session: u64,
    pub(super) cid: String,
    pub(super) image: Arc<Vec<u8>>,
}

/// The model: what the VM's state must be.
#[derive(Debug)]
pub(super) struct Model {
    pub(super) snaps: Vec<Snap>,
    pub(super) baselines: VecDeque<Baseline>,
    /// Tracking session: bumped when CBT goes on again (a crash keeps it).
    pub(super) session: u64,
    pub(super) session_uuid: Option<String>,
    pub(super) seen_uuids: HashSet<String>,
    pub(super) cbt: bool,
    pub(super) capacity: u64,
    /// Exact live content (single-threaded runs only).
    pub(super) shadow: Option<Vec<u8>>,
    pub(super) next_order: u64,
}

/// Counters shared with the writer threads.
#[derive(Debug, Default)]
pub(super) struct Stats {
    pub(super) writes: AtomicU64,
    pub(super) unmaps: AtomicU64,
    pub(super) checks: AtomicU64,
    pub(super) missed_blocks: AtomicU64,
    pub(super) query_pages: AtomicU64,
    pub(super) multi_page_answers: AtomicU64,
    pub(super) extra_bytes: AtomicU64,
    pub(super) frozen_checks: AtomicU64,
    pub(super) data_checks: AtomicU64,
    pub(super) violations: AtomicU64,
    pub(super) messages: Mutex<Vec<String>>,
    pub(super) expected: Mutex<BTreeMap<String, u64>>,
}

impl Stats {
    pub(super) fn violation(&self, msg: String) {
        self.violations.fetch_add(1, Ordering::Relaxed);
        let mut m = self.messages.lock();
        if m.len() < MAX_MESSAGES {
            m.push(msg);
        }
    }

    pub(super) fn expected(&self, kind: &str) {
        *self.expected.lock().entry(kind.to_owned()).or_default() += 1;
    }
}

/// What the writer threads and the lifecycle thread share.
#[derive(Debug)]
pub(super) struct World {
    pub(super) host: Host,
    /// The open VM. Writers hold the read side for each I/O; restart, crash
    /// and revert take the write side to pause them.
    pub(super) slot: RwLock<Option<Arc<Vm>>>,
    pub(super) stop: AtomicBool,
    pub(super) stats: Stats,
}

impl World {
    pub(super) fn vm(&self) -> Arc<Vm> {
        self.slot.read().clone().expect("the VM is open")
    }
}

/// The expected outcome of a query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Expect {
    Answer,
    Disabled,
    Reset { sessions_ago: u64 },
    AfterSnapshot,
}
