//! Replaying a block I/O trace (or any op sequence) into a fresh VM, and what the tracker
//! then reports.
//!
//! [`replay_trace`] streams a trace ([`workloads::TraceReader`]) into a VM of a temporary
//! datastore: a change ID is taken before the first op, the trace's writes (with
//! [`workloads::fill_pattern`] content) and discards are applied in order, a snapshot is
//! taken, and every changed area since the first change ID is read through the paging
//! API ([`vadp::changed_areas`]). Reads and flushes of the trace are counted, not replayed.
//! Without a disk size, a first streaming pass finds the trace's end, and the disk is the
//! smallest multiple of the granularity that covers it.
//!
//! [`replay_ops`] does the same for a list of [`IoOp`]s (offsets and lengths in bytes, any
//! alignment): the QEMU cross-check replays the same writes into QEMU and cbtsim with it.
//!
//! A [`ShadowDisk`] follows the replay, so the report also says whether a changed block
//! was missed (never, or it is a bug) and how much the granularity over-reports.
//!
//! # Limitations
//! The shadow's memory grows with the number of distinct extents written (about 100 bytes
//! each), not with the trace's length; the disk's data lands in sparse files of the
//! temporary datastore (the trace's unique written bytes).

use std::path::{Path, PathBuf};
use std::time::Instant;

use backup::Progress;
use serde::Serialize;
use tracker::{Granularity, MAX_CAPACITY};
use vadp::VadpError;
use workloads::{check_report, IoOp, ShadowDisk, ShadowError, TraceError, TraceFormat, TraceReader};

use crate::apply::{apply_op, changed_areas};
use sim::{DiskSpec, Host, SimError};

/// How to replay a trace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayOptions {
    /// The disk's size (`None`: the smallest multiple of the granularity covering the trace).
    pub disk_size: Option<u64>,
    /// The tracking granularity.
    pub granularity: Granularity,
    /// Replay only this device's records.
    pub device: Option<String>,
    /// Skip malformed lines (counted) instead of failing.
    pub skip_bad: bool,
    /// The directory the temporary datastore is made in (`None`: the system's temporary
    /// directory); it is removed when the replay ends, however it ends.
    pub workdir: Option<PathBuf>,
}

impl Default for ReplayOptions {
    fn default() -> Self {
        ReplayOptions {
            disk_size: None,
            granularity: Granularity::DEFAULT,
            device: None,
            skip_bad: false,
            workdir: None,
        }
    }
}

/// What a replay did and what the tracker reported.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReplayReport {
    /// The disk's size.
    pub disk_size: u64,
    /// The tracking granularity.
    pub granularity: u64,
    /// Writes replayed.
    pub writes: u64,
    /// Bytes they wrote.
    pub bytes_written: u64,
    /// Every area changed since the first change ID: `[start, length]`, sorted, coalesced.
    pub changed_areas: Vec<(u64, u64)>,
    /// Their total length.
    pub changed_bytes: u64,
    /// Discards replayed.
    pub discards: u64,
    /// Bytes they discarded.
    pub bytes_discarded: u64,
    /// Reads of the trace (counted, not replayed).
    pub reads: u64,
    /// Flushes of the trace (counted, not replayed).
    pub flushes: u64,
    /// Malformed lines skipped (with `skip_bad`).
    pub skipped_lines: u64,
    /// Records of other kinds the parser passed over.
    pub ignored_records: u64,
    /// Bytes truly changed (written or discarded), from the shadow model.
    pub true_changed_bytes: u64,
    /// `changed_bytes / true_changed_bytes`.
    pub over_report_ratio: f64,
    /// Changed blocks the answer misses (must be 0).
    pub missed_blocks: u64,
    /// The change ID taken before the first op.
    pub change_id: String,
    /// Seconds spent finding the trace's end (0 with a given disk size).
    pub scan_seconds: f64,
    /// Seconds spent applying the ops.
    pub replay_seconds: f64,
    /// Seconds spent in the paged query.
    pub query_seconds: f64,
    /// All of it, in seconds.
    pub seconds: f64,
}

/// Why a replay failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReplayError {
    /// The trace could not be read or parsed.
    #[error(transparent)]
    Trace(#[from] TraceError),
    /// An op lies beyond the disk's end.
    #[error("{what} {index} ({kind} of {len} bytes at offset {offset}) runs past the disk's end at {disk_size}; pass a larger disk size")]
    OutOfRange {
        /// "record" (of a trace) or "op".
        what: &'static str,
        /// 1-based index among the replayed records or ops.
        index: u64,
        /// "write" or "discard".
        kind: &'static str,
        /// Its offset.
        offset: u64,
        /// Its length.
        len: u64,
        /// The disk's size.
        disk_size: u64,
    },
    /// The trace needs a disk larger than the simulator allows.
    #[error("the trace reaches byte {end}, beyond the largest disk ({MAX_CAPACITY} bytes)")]
    TooLarge {
        /// The trace's end.
        end: u64,
    },
    /// The simulated host failed.
    #[error(transparent)]
    Sim(#[from] SimError),
    /// The paged query failed.
    #[error(transparent)]
    Vadp(#[from] VadpError),
    /// The shadow model refused an op.
    #[error(transparent)]
    Shadow(#[from] ShadowError),
    /// The user interrupted the replay (its temporary datastore is removed).
    #[error("interrupted after {records} records; the temporary datastore was removed")]
    Interrupted {
        /// Records replayed.
        records: u64,
    },
    /// The temporary datastore could not be made.
    #[error("cannot create a temporary datastore in {path}")]
    Workdir {
        /// Where.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

fn open(path: &Path, format: TraceFormat, opts: &ReplayOptions) -> Result<TraceReader, TraceError> {
    let mut r = TraceReader::open(path, format)?.skip_bad(opts.skip_bad);
    if let Some(d) = &opts.device {
        r = r.device(d.clone());
    }
    Ok(r)
}

/// The end (largest `offset + len`) of a trace's records, in one streaming pass.
pub fn trace_end(path: &Path, format: TraceFormat, opts: &ReplayOptions) -> Result<u64, ReplayError> {
    let mut end = 0u64;
    for rec in open(path, format, opts)? {
        let rec = rec?;
        end = end.max(rec.offset.saturating_add(rec.len));
    }
    Ok(end)
}

/// The smallest multiple of `granularity` covering `end` bytes (at least one block).
pub fn covering_size(end: u64, granularity: Granularity) -> Result<u64, ReplayError> {
    let g = granularity.bytes();
    let size = end.max(1).div_ceil(g).checked_mul(g).filter(|&s| s <= MAX_CAPACITY);
    size.ok_or(ReplayError::TooLarge { end })
}

/// Replays a trace file (see the module docs). `progress` gets one phase, in records
/// replayed (the total is not known), advanced every [`PROGRESS_BATCH`] records.
pub fn replay_trace(
    path: &Path,
    format: TraceFormat,
    opts: &ReplayOptions,
    progress: &dyn Progress,
) -> Result<ReplayReport, ReplayError> {
    progress.begin("replay", None);
    let r = replay_trace_file(path, format, opts, progress);
    progress.end();
    r
}

/// Records replayed between two calls of [`Progress::advance`].
pub const PROGRESS_BATCH: u64 = 4096;

fn replay_trace_file(
    path: &Path,
    format: TraceFormat,
    opts: &ReplayOptions,
    progress: &dyn Progress,
) -> Result<ReplayReport, ReplayError> {
    let started = Instant::now();
    let disk_size = match opts.disk_size {
        Some(s) => s,
        None => covering_size(trace_end(path, format, opts)?, opts.granularity)?,
    };
    let scan_seconds = started.elapsed().as_secs_f64();
    let mut reader = open(path, format, opts)?;
    let mut n = 0u64;
    let ops = (&mut reader).map(|rec| {
        n += 1;
        if n.is_multiple_of(PROGRESS_BATCH) {
            progress.advance(PROGRESS_BATCH);
            if progress.cancelled() {
                return Err(ReplayError::Interrupted { records: n });
            }
        }
        Ok(rec?.to_op(n))
    });
    let mut report = replay(ops, "record", disk_size, opts)?;
    progress.advance(n % PROGRESS_BATCH);
    report.skipped_lines = reader.skipped();
    report.ignored_records = reader.ignored();
    report.scan_seconds = scan_seconds;
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// Replays ops (in bytes, any alignment) into a fresh disk of `disk_size` bytes.
pub fn replay_ops(
    ops: impl IntoIterator<Item = IoOp>,
    disk_size: u64,
    opts: &ReplayOptions,
) -> Result<ReplayReport, ReplayError> {
    let started = Instant::now();
    let mut r = replay(ops.into_iter().map(Ok::<_, ReplayError>), "op", disk_size, opts)?;
    r.seconds = started.elapsed().as_secs_f64();
    Ok(r)
}

fn replay(
    ops: impl Iterator<Item = Result<IoOp, ReplayError>>,
    what: &'static str,
    disk_size: u64,
    opts: &ReplayOptions,
) -> Result<ReplayReport, ReplayError> {
    let base = match &opts.workdir {
        Some(d) => d.clone(),
        None => std::env::temp_dir(),
    };
    let tmp = tempfile::Builder::new()
        .prefix("cbtsim-replay-")
        .tempdir_in(&base)
        .map_err(|source| ReplayError::Workdir { path: base, source })?;
    let host = Host::open(tmp.path())?;
    let g = opts.granularity;
    let vm = host.create_vm(
        "replay",
        &[DiskSpec {
            capacity: disk_size,
            granularity: g,
        }],
    )?;
    // The change ID before: a snapshot, removed at once (its change ID stays valid).
    let before = vm.create_snapshot("before")?;
    let change_id = before.disks[0]
        .change_id
        .clone()
        .ok_or(SimError::Query(tracker::QueryError::TrackingDisabled))?;
    vm.remove_snapshot("before")?;
    let mut shadow = ShadowDisk::new(disk_size);
    let first = shadow.checkpoint();

    let mut r = ReplayReport {
        disk_size,
        granularity: g.bytes(),
        writes: 0,
        bytes_written: 0,
        changed_areas: Vec::new(),
        changed_bytes: 0,
        discards: 0,
        bytes_discarded: 0,
        reads: 0,
        flushes: 0,
        skipped_lines: 0,
        ignored_records: 0,
        true_changed_bytes: 0,
        over_report_ratio: 0.0,
        missed_blocks: 0,
        change_id: change_id.clone(),
        scan_seconds: 0.0,
        replay_seconds: 0.0,
        query_seconds: 0.0,
        seconds: 0.0,
    };
    let t = Instant::now();
    let mut buf = Vec::new();
    for (i, op) in ops.enumerate() {
        let op = op?;
        let index = i as u64 + 1;
        if let Some((offset, len)) = op.range() {
            let kind = match op {
                IoOp::Write { .. } => "write",
                IoOp::Unmap { .. } => "discard",
                _ => "read",
            };
            if kind != "read" && !matches!(offset.checked_add(len), Some(e) if e <= disk_size) {
                return Err(ReplayError::OutOfRange {
                    what,
                    index,
                    kind,
                    offset,
                    len,
                    disk_size,
                });
            }
        }
        match op {
            // Counted, not replayed.
            IoOp::Read { .. } => {
                r.reads += 1;
                continue;
            }
            IoOp::Flush => {
                r.flushes += 1;
                continue;
            }
            IoOp::Write { len, .. } => {
                r.writes += 1;
                r.bytes_written += len;
            }
            IoOp::Unmap { len, .. } => {
                r.discards += 1;
                r.bytes_discarded += len;
            }
            IoOp::Extend { .. } => {}
        }
        apply_op(&vm, 0, &op, &mut buf)?;
        shadow.apply(&op)?;
    }
    r.replay_seconds = t.elapsed().as_secs_f64();
    let last = shadow.checkpoint();
    vm.create_snapshot("after")?;
    let t = Instant::now();
    r.changed_areas = changed_areas(&vm, "after", 0, &change_id)?.areas;
    r.query_seconds = t.elapsed().as_secs_f64();
    r.changed_bytes = r.changed_areas.iter().map(|a| a.1).sum();
    let truth = shadow.changed_bytes_exact(first, last)?;
    let v = check_report(&truth, &r.changed_areas, g.bytes());
    r.true_changed_bytes = truth.iter().map(|a| a.1).sum();
    r.over_report_ratio = v.over_report_ratio;
    r.missed_blocks = v.missed_blocks;
    r.disk_size = vm.snapshot_capacity("after", 0)?;
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn covering_size_rounds_up_to_the_granularity() {
        let g = Granularity::new(65536).unwrap();
        assert_eq!(covering_size(0, g).unwrap(), 65536);
        assert_eq!(covering_size(65536, g).unwrap(), 65536);
        assert_eq!(covering_size(65537, g).unwrap(), 131072);
        assert!(matches!(covering_size(u64::MAX, g), Err(ReplayError::TooLarge { .. })));
    }

    #[test]
    fn ops_replay_reports_every_touched_block() {
        let opts = ReplayOptions {
            granularity: Granularity::new(4096).unwrap(),
            ..ReplayOptions::default()
        };
        let size = (1 << 20) + 512;
        let ops = [
            IoOp::Write {
                offset: 4095,
                len: 2,
                seed: 1,
            },
            IoOp::Write {
                offset: size - 1,
                len: 1,
                seed: 2,
            },
            IoOp::Unmap {
                offset: 65536,
                len: 8192,
            },
            IoOp::Read { offset: 0, len: 512 },
        ];
        let r = replay_ops(ops, size, &opts).unwrap();
        assert_eq!(r.changed_areas, vec![(0, 8192), (65536, 8192), (1 << 20, 512)]);
        assert_eq!((r.writes, r.discards, r.reads), (2, 1, 1));
        assert_eq!(r.missed_blocks, 0);
        assert_eq!(r.true_changed_bytes, 2 + 1 + 8192);
        let e = replay_ops(
            [IoOp::Write {
                offset: size,
                len: 1,
                seed: 0,
            }],
            size,
            &opts,
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("op 1 (write of 1 bytes at offset 1049088)"),
            "{e}"
        );
    }
}
