//! The `verify` torture test as a library: reproducible single-threaded,
//! exercising every lifecycle operation, clean under concurrent writers.

use std::sync::atomic::{AtomicU64, Ordering};

use harness::verify::{run, VerifyConfig, VerifyReport};
use harness::Progress;
use tracker::Granularity;

fn config(threads: usize, seed: u64) -> VerifyConfig {
    VerifyConfig {
        seconds: None,
        ops: Some(150),
        threads,
        seed,
        disk_size: 3 << 20,
        granularity: Granularity::new(16 << 10).unwrap(),
        ..VerifyConfig::default()
    }
}

fn assert_passed(r: &VerifyReport) {
    assert!(
        r.passed,
        "violations: {} missed blocks: {} first: {:?}",
        r.violations, r.missed_blocks, r.violation_messages
    );
    assert!(r.checks > 0 && r.snapshots > 0, "{r:?}");
}

#[test]
fn single_threaded_runs_are_reproducible_from_the_seed() {
    let a = run(&config(0, 9), &()).unwrap();
    let b = run(&config(1, 9), &()).unwrap(); // one thread is inline too
    assert_passed(&a);
    let key = |r: &VerifyReport| {
        (
            r.ops,
            r.snapshots,
            r.checks,
            r.extra_bytes,
            r.writes,
            r.unmaps,
            r.expected.clone(),
            r.op_counts.clone(),
            r.frozen_checks,
            r.data_checks,
            r.max_disk_size,
        )
    };
    assert_eq!(key(&a), key(&b));
    let c = run(&config(0, 10), &()).unwrap();
    assert_passed(&c);
    assert_ne!(key(&a), key(&c), "another seed, another run");
}

#[test]
fn every_lifecycle_operation_and_expected_error_is_exercised() {
    /// What a run reports as its progress.
    #[derive(Default)]
    struct Count {
        total: AtomicU64,
        advanced: AtomicU64,
        notes: AtomicU64,
    }
    impl Progress for Count {
        fn begin(&self, _label: &str, total: Option<u64>) {
            self.total.store(total.unwrap_or(0), Ordering::Relaxed);
        }
        fn advance(&self, n: u64) {
            self.advanced.fetch_add(n, Ordering::Relaxed);
        }
        fn note(&self, _note: &str) {
            self.notes.fetch_add(1, Ordering::Relaxed);
        }
    }
    let count = Count::default();
    let r = run(
        &VerifyConfig {
            ops: Some(400),
            ..config(0, 3)
        },
        &count,
    )
    .unwrap();
    assert_passed(&r);
    assert_eq!(count.notes.into_inner(), 400, "progress after every operation");
    let (advanced, total) = (count.advanced.into_inner(), count.total.into_inner());
    assert!(advanced <= total && total > 0, "{advanced} of {total}");
    for op in [
        "create",
        "remove_newest",
        "remove_middle",
        "remove_oldest",
        "revert",
        "extend",
        "cbt_off",
        "cbt_on",
        "power_cycle",
        "restart",
        "crash",
        "recheck",
    ] {
        assert!(
            r.op_counts.get(op).copied().unwrap_or(0) > 0,
            "{op} never ran: {:?}",
            r.op_counts
        );
    }
    for e in [
        "tracking_reset",
        "tracking_disabled",
        "powered_off",
        "change_id_after_snapshot",
    ] {
        assert!(r.expected.get(e).copied().unwrap_or(0) > 0, "no {e}: {:?}", r.expected);
    }
    assert!(r.extends_across_pow2 > 0 && r.max_disk_size > r.disk_size);
    assert!(r.data_checks > 0 && r.frozen_checks > 0);
}

#[test]
fn concurrent_writers_and_lifecycle_find_nothing() {
    let r = run(
        &VerifyConfig {
            seconds: Some(8.0),
            ops: None,
            threads: 2,
            seed: 77,
            disk_size: 8 << 20,
            ..VerifyConfig::default()
        },
        &(),
    )
    .unwrap();
    assert_passed(&r);
    assert_eq!(r.threads, 2);
    assert!(r.writes > 1000, "{} writes", r.writes);
    eprintln!(
        "{} ops, {} checks, {} writes, stun p50 {:.0} us p99 {:.0} us",
        r.ops, r.checks, r.writes, r.stun_p50_us, r.stun_p99_us
    );
}

#[test]
fn bad_configurations_are_refused() {
    for disk_size in [1000, 64 << 10, 2 << 30] {
        let cfg = VerifyConfig {
            disk_size,
            ..config(0, 1)
        };
        assert!(run(&cfg, &()).is_err(), "disk size {disk_size}");
    }
}

/// With two areas per page on a 16 MiB disk tracked at 4 KiB, most answers take many
/// pages: every check then depends on the pager going to the disk's end.
#[test]
fn answers_that_span_many_pages_are_paged_and_checked() {
    let r = run(
        &VerifyConfig {
            ops: Some(100),
            max_areas: 2,
            disk_size: 16 << 20,
            granularity: Granularity::new(4096).unwrap(),
            ..config(0, 4)
        },
        &(),
    )
    .unwrap();
    assert_passed(&r);
    assert!(
        r.multi_page_answers * 2 > r.checks && r.query_pages > 10 * r.checks,
        "{} checks, {} of them over several pages, {} pages in all",
        r.checks,
        r.multi_page_answers,
        r.query_pages
    );
}
