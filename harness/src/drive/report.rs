//! What a drive found: op counts, latencies, and each check of the tracker's answers.

use backup::BackupReport;
use hdrhistogram::Histogram;
use serde::Serialize;
use workloads::check_report;

use sim::Vm;

/// Latency percentiles, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct Latency {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// Largest.
    pub max_us: f64,
}

impl Latency {
    /// The percentiles of a histogram of nanoseconds.
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Latency::default();
        }
        let us = |ns: u64| ns as f64 / 1000.0;
        Latency {
            count: h.len(),
            p50_us: us(h.value_at_quantile(0.5)),
            p99_us: us(h.value_at_quantile(0.99)),
            p999_us: us(h.value_at_quantile(0.999)),
            max_us: us(h.max()),
        }
    }
}

/// A new histogram of nanoseconds (1 ns to 1 hour, 3 significant figures).
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000_000, 3).expect("valid histogram bounds")
}

/// Counts of the ops a drive applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct OpCounts {
    /// All ops.
    pub ops: u64,
    /// Reads.
    pub reads: u64,
    /// Writes.
    pub writes: u64,
    /// Unmaps.
    pub unmaps: u64,
    /// Flushes.
    pub flushes: u64,
    /// Disk extends.
    pub extends: u64,
    /// Bytes read.
    pub bytes_read: u64,
    /// Bytes written.
    pub bytes_written: u64,
    /// Bytes unmapped.
    pub bytes_unmapped: u64,
}

impl OpCounts {
    /// Adds another count into this one.
    pub fn add(&mut self, o: &OpCounts) {
        self.ops += o.ops;
        self.reads += o.reads;
        self.writes += o.writes;
        self.unmaps += o.unmaps;
        self.flushes += o.flushes;
        self.extends += o.extends;
        self.bytes_read += o.bytes_read;
        self.bytes_written += o.bytes_written;
        self.bytes_unmapped += o.bytes_unmapped;
    }
}

/// A tracker's answer for one disk over some span, against the shadow's truth.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Check {
    /// Bytes in the reported changed areas.
    pub changed_bytes: u64,
    /// Number of reported areas (coalesced).
    pub changed_areas: u64,
    /// `changed_bytes` over the disk's capacity at the snapshot.
    pub share_of_disk: f64,
    /// Bytes truly changed (written or unmapped), from the shadow models.
    pub true_changed_bytes: u64,
    /// `changed_bytes / true_changed_bytes` (1.0 when both are 0).
    pub over_report_ratio: f64,
    /// Blocks of the granularity holding a changed byte that no area covers. Must be 0.
    pub missed_blocks: u64,
    /// Time the paged query took, in microseconds.
    pub query_us: u64,
}

impl Check {
    /// Compares `reported` areas with the exact changed bytes `truth`.
    pub fn new(truth: &[(u64, u64)], reported: &[(u64, u64)], granularity: u64, capacity: u64) -> Self {
        let v = check_report(truth, reported, granularity);
        let changed_bytes: u64 = reported.iter().map(|a| a.1).sum();
        Check {
            changed_bytes,
            changed_areas: reported.len() as u64,
            share_of_disk: changed_bytes as f64 / capacity.max(1) as f64,
            true_changed_bytes: truth.iter().map(|a| a.1).sum(),
            over_report_ratio: v.over_report_ratio,
            missed_blocks: v.missed_blocks,
            query_us: 0,
        }
    }
}

/// One epoch (the span between two snapshots) of one disk.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct EpochReport {
    /// 1 for the span from the first change ID to the first scheduled snapshot.
    pub epoch: u64,
    /// Ops of the VM in the epoch.
    pub ops: u64,
    /// The check of the epoch's changed areas.
    #[serde(flatten)]
    pub check: Check,
}

/// What a drive did on one disk.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DiskReport {
    /// The disk.
    pub disk: usize,
    /// Its profile.
    pub profile: String,
    /// Its vCPU threads.
    pub threads: u32,
    /// Its capacity at the end.
    pub capacity: u64,
    /// Its tracking granularity.
    pub granularity: u64,
    /// Ops on this disk.
    pub counts: OpCounts,
    /// Per epoch (with `verify`).
    pub epochs: Vec<EpochReport>,
    /// Everything since the first change ID, queried at the last snapshot (with `verify`).
    pub cumulative: Option<Check>,
}

/// What a drive did.
#[derive(Debug, Clone, Serialize)]
pub struct DriveReport {
    /// The VM.
    pub vm: String,
    /// The workloads' seed.
    pub seed: u64,
    /// Wall time of the run, in seconds.
    pub elapsed_s: f64,
    /// Ops per second.
    pub ops_per_s: f64,
    /// All ops of the VM.
    pub counts: OpCounts,
    /// Latency of guest writes.
    pub write_latency: Latency,
    /// Snapshots taken (and removed) by the drive.
    pub snapshots: u64,
    /// Stun times of the VM (snapshot create/remove, extend) during the drive's life.
    pub stun: Latency,
    /// Per driven disk.
    pub disks: Vec<DiskReport>,
    /// Missed blocks over every check (must be 0).
    pub missed_blocks: u64,
    /// The scheduled backups, in order.
    pub backups: Vec<BackupReport>,
    /// The write latency histogram (ns), to merge reports.
    #[serde(skip)]
    pub write_histogram: Histogram<u64>,
}

/// The VM's recent stun times as a histogram (ns).
pub fn stun_histogram(vm: &Vm) -> Histogram<u64> {
    let mut h = Histogram::new(3).expect("3 significant figures is valid");
    for ns in vm.stun_times_ns() {
        let _ = h.record(ns);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_check_that_misses_a_changed_block_says_so() {
        // The verification must be able to fail: drop one area of a true answer.
        let truth = [(0, 4096), (1 << 20, 10)];
        let c = Check::new(&truth, &[(0, 65536)], 65536, 1 << 30);
        assert_eq!(c.missed_blocks, 1);
        let ok = Check::new(&truth, &[(0, 65536), (1 << 20, 65536)], 65536, 1 << 30);
        assert_eq!(ok.missed_blocks, 0);
        assert!((ok.over_report_ratio - 131072.0 / 4106.0).abs() < 1e-9);
    }
}
