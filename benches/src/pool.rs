//! A/B interleaving on a fixed set of worker threads.
//!
//! [`interleaved`] runs `rounds` rounds; in each, every variant gets one short
//! timed run on all workers, the order rotating from round to round. A slow
//! patch of the machine (another process compiling, frequency changes) then
//! hits every variant, and the per-round ratios that the binaries report
//! cancel it. Workers are spawned once and synchronised with barriers, so
//! thread start-up is never timed; a round's wall time runs from the first
//! worker's start to the last worker's end, as each worker clocks itself.
//!
//! Each worker also reads its own CPU time (`CLOCK_THREAD_CPUTIME_ID`)
//! around its run. On a machine shared with other busy processes, wall time
//! includes the time a worker was preempted; CPU time does not, so CPU-time
//! ratios are far less noisy. CPU time also leaves out time a thread sleeps
//! waiting for a lock, which is why both are reported.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

const STOP: usize = usize::MAX;

/// The CPU time the calling thread has used so far.
pub fn thread_cpu_time() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

/// Seconds per round of each variant, `[variant][round]`.
#[derive(Debug, Clone, Default)]
pub struct Timings {
    /// Wall time from the first worker's start to the last worker's end.
    pub wall: Vec<Vec<f64>>,
    /// CPU time of all workers together.
    pub cpu: Vec<Vec<f64>>,
}

/// Runs `rounds` rounds of `variants` variants on `threads` workers and
/// returns the wall and CPU seconds of each round.
///
/// Before each timed run, with every worker idle, `reset(variant)` prepares
/// the variant (a new epoch, cleared bitmaps). Then every worker runs
/// `work(thread, variant)`. A panic in a worker aborts the process (the
/// others would wait at the barrier for ever).
pub fn interleaved<R, W>(threads: usize, variants: usize, rounds: usize, mut reset: R, work: W) -> Timings
where
    R: FnMut(usize),
    W: Fn(usize, usize) + Sync,
{
    assert!(threads > 0 && variants > 0, "need at least one thread and one variant");
    let barrier = Barrier::new(threads + 1);
    let cmd = AtomicUsize::new(STOP);
    let spans: Vec<Mutex<Option<(Instant, Instant, Duration)>>> = (0..threads).map(|_| Mutex::new(None)).collect();
    let mut times = Timings {
        wall: vec![Vec::with_capacity(rounds); variants],
        cpu: vec![Vec::with_capacity(rounds); variants],
    };
    std::thread::scope(|s| {
        for (t, span) in spans.iter().enumerate() {
            let (barrier, cmd, work) = (&barrier, &cmd, &work);
            s.spawn(move || loop {
                barrier.wait();
                // The barrier orders this load after the coordinator's store.
                let v = cmd.load(Ordering::Relaxed);
                if v == STOP {
                    break;
                }
                let cpu0 = thread_cpu_time();
                let start = Instant::now();
                if catch_unwind(AssertUnwindSafe(|| work(t, v))).is_err() {
                    std::process::abort();
                }
                let end = Instant::now();
                *span.lock() = Some((start, end, thread_cpu_time().saturating_sub(cpu0)));
                barrier.wait();
            });
        }
        for r in 0..rounds {
            for k in 0..variants {
                let v = (r + k) % variants;
                reset(v);
                cmd.store(v, Ordering::Relaxed);
                barrier.wait();
                barrier.wait();
                let (mut first, mut last) = (None::<Instant>, None::<Instant>);
                let mut cpu = Duration::ZERO;
                for span in &spans {
                    let (s0, e0, c0) = span.lock().take().expect("every worker ran the round");
                    first = Some(first.map_or(s0, |f| f.min(s0)));
                    last = Some(last.map_or(e0, |l| l.max(e0)));
                    cpu += c0;
                }
                let secs = match (first, last) {
                    (Some(f), Some(l)) => l.duration_since(f).as_secs_f64(),
                    _ => unreachable!("at least one worker"),
                };
                times.wall[v].push(secs);
                times.cpu[v].push(cpu.as_secs_f64());
            }
        }
        cmd.store(STOP, Ordering::Relaxed);
        barrier.wait();
    });
    times
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    #[test]
    fn every_variant_runs_every_round_on_every_thread() {
        let runs: Vec<AtomicU64> = (0..3).map(|_| AtomicU64::new(0)).collect();
        let mut resets = vec![0; 3];
        let times = interleaved(
            2,
            3,
            4,
            |v| resets[v] += 1,
            |_, v| {
                runs[v].fetch_add(1, Ordering::Relaxed);
                if v == 2 {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
            },
        );
        assert_eq!(resets, vec![4, 4, 4]);
        for r in &runs {
            assert_eq!(r.load(Ordering::Relaxed), 8);
        }
        assert!(times.wall.iter().chain(&times.cpu).all(|t| t.len() == 4));
        // The slow variant's rounds are timed as slow; a sleep uses no CPU time.
        assert!(times.wall[2].iter().all(|&t| t >= 0.005));
        assert!(times.cpu[2].iter().all(|&t| t < 0.005));
    }

    #[test]
    fn cpu_time_advances_with_work_only() {
        let t0 = thread_cpu_time();
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = std::hint::black_box(x.wrapping_add(i));
        }
        let busy = thread_cpu_time() - t0;
        std::thread::sleep(std::time::Duration::from_millis(20));
        let idle = thread_cpu_time() - t0 - busy;
        assert!(busy > Duration::from_micros(100), "busy {busy:?}");
        assert!(idle < Duration::from_millis(5), "idle {idle:?}");
    }
}
