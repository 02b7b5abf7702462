//! One vCPU thread of a drive: ops until the epoch's budget is spent, then the barrier.

use std::sync::atomic::Ordering;
use std::time::Duration;

use backup::Progress;
use hdrhistogram::Histogram;
use workloads::{IoOp, ShadowDisk, Workload};

use super::barrier::Shared;
use super::plan::ThreadSpec;
use super::{new_histogram, DriveError, OpCounts};
use crate::apply::apply_op;

/// What one vCPU thread did.
pub(super) struct ThreadResult {
    pub(super) load: usize,
    pub(super) counts: OpCounts,
    pub(super) writes: Histogram<u64>,
}

/// How often a thread reports its ops to [`Progress`].
const PROGRESS_BATCH: u64 = 256;

/// One vCPU thread: ops until the epoch's budget is spent, then the barrier.
pub(super) fn vcpu(
    shared: &Shared<'_>,
    spec: &ThreadSpec,
    mut w: Box<dyn Workload + Send>,
    mut shadow: Option<ShadowDisk>,
    progress: &dyn Progress,
) -> ThreadResult {
    let mut counts = OpCounts::default();
    let mut writes = new_histogram();
    let mut buf: Vec<u8> = Vec::new();
    let mut mark = shadow.as_mut().map(|s| s.checkpoint());
    let mut unreported = 0;
    loop {
        let mut ops = 0;
        // Relaxed: `stop` is a hint to stop early; the barrier below orders everything
        // the leader reads.
        while !shared.stop.load(Ordering::Relaxed) && !shared.time_up() {
            // Relaxed: a ticket counter; only its value matters, reset under the barrier.
            if shared.claimed.fetch_add(1, Ordering::Relaxed) >= shared.epoch_limit.load(Ordering::Relaxed) {
                break;
            }
            let op = w.next_op();
            let applied = apply(shared, spec, &op, &mut buf, &mut counts, &mut writes).and_then(|()| {
                shadow
                    .as_mut()
                    .map_or(Ok(()), |s| s.apply(&op).map_err(DriveError::from))
            });
            if let Err(e) = applied {
                shared.fail(e);
                break;
            }
            ops += 1;
            unreported += 1;
            if unreported == PROGRESS_BATCH {
                progress.advance(unreported);
                unreported = 0;
            }
        }
        shared.epoch_done.fetch_add(ops, Ordering::Relaxed);
        if let (Some(s), Some(from)) = (shadow.as_mut(), mark) {
            let to = s.checkpoint();
            match s.changed_bytes_exact(from, to) {
                Ok(changed) => shared.epoch_truth.lock()[spec.load].extend(changed),
                Err(e) => shared.fail(e.into()),
            }
            mark = Some(to);
        }
        if shared.barrier.wait().is_leader() {
            shared.lead_epoch();
        }
        shared.barrier.wait();
        if shared.done.load(Ordering::Relaxed) {
            break;
        }
    }
    progress.advance(unreported);
    ThreadResult {
        load: spec.load,
        counts,
        writes,
    }
}

/// Applies one op to the VM ([`apply_op`]), counting it; a write's time goes into `writes`.
fn apply(
    shared: &Shared<'_>,
    spec: &ThreadSpec,
    op: &IoOp,
    buf: &mut Vec<u8>,
    c: &mut OpCounts,
    writes: &mut Histogram<u64>,
) -> Result<(), DriveError> {
    c.ops += 1;
    let took = match op {
        IoOp::Flush if !shared.plan.apply_flush => Duration::ZERO,
        _ => apply_op(shared.vm, spec.disk, op, buf)?,
    };
    match *op {
        IoOp::Write { len, .. } => {
            let ns = took.as_nanos().min(u128::from(u64::MAX)) as u64;
            writes.saturating_record(ns.max(1));
            c.writes += 1;
            c.bytes_written += len;
        }
        IoOp::Read { len, .. } => {
            c.reads += 1;
            c.bytes_read += len;
        }
        IoOp::Unmap { len, .. } => {
            c.unmaps += 1;
            c.bytes_unmapped += len;
        }
        IoOp::Flush => c.flushes += 1,
        IoOp::Extend { .. } => c.extends += 1,
    }
    Ok(())
}
