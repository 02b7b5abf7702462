//! Guest workloads inside the host: `harness::drive` on threads of the
//! service, listed and stopped by ID.
//!
//! A workload runs as a sequence of drives ("slices") of at most
//! [`SLICE_OPS`] ops or [`SLICE_TIME`], each a fresh workload of the profile
//! seeded `seed + slice`, so that a stop takes effect within one slice. With
//! `verify` each slice is a verified drive of its own (a snapshot before and
//! after, checked against its shadow model); missed blocks add up over the
//! slices. The drive's snapshots get names unique to the service's run, so
//! they never collide with a snapshot an export or a user names.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use backup::Progress;
use harness::drive::{self, DiskLoad, DrivePlan, Latency, Limit};
use parking_lot::{Condvar, Mutex};
use sim::Vm;

use crate::action::{ActionError, ErrorKind, GuestReport, GuestRun, GuestState, GuestStatus, Response};

/// How the names of a verified workload's snapshots begin.
pub(crate) const SNAPSHOT_PREFIX: &str = "cbtsim-guest-";

/// Most ops of one slice.
pub const SLICE_OPS: u64 = 5_000;
/// Longest slice.
pub const SLICE_TIME: Duration = Duration::from_millis(250);
/// Finished workloads kept for `guest list` and `guest stop`.
const KEEP_FINISHED: usize = 64;

#[derive(Debug)]
struct Guest {
    id: u64,
    run: GuestRun,
    started: Instant,
    stop: AtomicBool,
    ops: AtomicU64,
    report: Mutex<Option<GuestReport>>,
    ended: Condvar,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Guest {
    fn status(&self) -> GuestStatus {
        let state = self.report.lock().as_ref().map_or(GuestState::Running, |r| r.state);
        GuestStatus {
            id: self.id,
            vm: self.run.vm.clone(),
            profile: self.run.profile.clone(),
            disk: self.run.disk,
            state,
            ops: self.ops.load(Ordering::Relaxed),
            seconds: self.started.elapsed().as_secs_f64(),
        }
    }

    /// Waits for the end and returns the report.
    fn wait(&self) -> GuestReport {
        if let Some(h) = self.thread.lock().take() {
            let _ = h.join();
        }
        let mut r = self.report.lock();
        loop {
            if let Some(r) = r.as_ref() {
                return r.clone();
            }
            self.ended.wait(&mut r);
        }
    }
}

/// The guest workloads of a service.
#[derive(Debug)]
pub(crate) struct Guests {
    next: AtomicU64,
    token: u64,
    all: Mutex<BTreeMap<u64, Arc<Guest>>>,
}

impl Default for Guests {
    fn default() -> Self {
        Guests {
            next: AtomicU64::new(1),
            token: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            all: Mutex::new(BTreeMap::new()),
        }
    }
}

/// Forwards a drive's op counts to the guest's counter and a [`Progress`].
struct Ops<'a> {
    guest: &'a Guest,
    progress: &'a dyn Progress,
}

impl Progress for Ops<'_> {
    fn begin(&self, label: &str, total: Option<u64>) {
        self.progress.begin(label, total);
    }

    fn advance(&self, n: u64) {
        self.guest.ops.fetch_add(n, Ordering::Relaxed);
        self.progress.advance(n);
    }

    fn note(&self, note: &str) {
        self.progress.note(note);
    }

    fn end(&self) {
        self.progress.end();
    }
}

fn validate(vm: &Vm, run: &GuestRun) -> Result<(), ActionError> {
    vm.capacity(run.disk)?;
    if !workloads::profiles().iter().any(|p| p.name == run.profile) {
        let names: Vec<&str> = workloads::profiles().iter().map(|p| p.name).collect();
        return Err(ActionError::new(
            ErrorKind::NotFound,
            format!(
                "no workload profile {:?} (there are: {})",
                run.profile,
                names.join(", ")
            ),
        ));
    }
    if run.threads == 0 || run.threads > 256 {
        return Err(ActionError::invalid(format!(
            "invalid threads {}: give 1 to 256",
            run.threads
        )));
    }
    if run.ops == Some(0) {
        return Err(ActionError::invalid("invalid ops 0: give at least 1"));
    }
    if let Some(s) = run.seconds {
        if !(s > 0.0 && s <= 86_400.0) {
            return Err(ActionError::invalid(format!(
                "invalid seconds {s}: give more than 0 and at most 86400"
            )));
        }
    }
    if run.snapshot_every.is_some() && !run.verify {
        return Err(ActionError::invalid("snapshot_every needs verify"));
    }
    if run.snapshot_every == Some(0) {
        return Err(ActionError::invalid("invalid snapshot_every 0: give at least 1"));
    }
    Ok(())
}

impl Guests {
    /// Starts `run` on `vm`: detached on a thread of its own, or on the
    /// caller's thread (reporting ops to `progress`).
    pub(crate) fn run(&self, vm: Arc<Vm>, run: GuestRun, progress: &dyn Progress) -> Result<Response, ActionError> {
        validate(&vm, &run)?;
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let guest = Arc::new(Guest {
            id,
            run,
            started: Instant::now(),
            stop: AtomicBool::new(false),
            ops: AtomicU64::new(0),
            report: Mutex::new(None),
            ended: Condvar::new(),
            thread: Mutex::new(None),
        });
        {
            let mut all = self.all.lock();
            all.insert(id, guest.clone());
            let finished: Vec<u64> = all
                .iter()
                .filter(|(_, g)| g.report.lock().is_some())
                .map(|(&id, _)| id)
                .collect();
            for old in finished.iter().take(finished.len().saturating_sub(KEEP_FINISHED)) {
                all.remove(old);
            }
        }
        let token = self.token;
        if guest.run.detach {
            let g = guest.clone();
            let handle = std::thread::Builder::new()
                .name(format!("guest-{id}"))
                .spawn(move || run_slices(&g, &vm, token, &()))
                .map_err(|e| ActionError::new(ErrorKind::Internal, format!("cannot start a thread: {e}")))?;
            *guest.thread.lock() = Some(handle);
            return Ok(Response::GuestStarted {
                id,
                vm: guest.run.vm.clone(),
            });
        }
        progress.begin("guest ops", guest.run.ops);
        run_slices(&guest, &vm, token, progress);
        progress.end();
        Ok(Response::Guest(guest.wait()))
    }

    pub(crate) fn list(&self) -> Vec<GuestStatus> {
        let mut out: Vec<GuestStatus> = self.all.lock().values().map(|g| g.status()).collect();
        out.sort_by_key(|s| (s.state != GuestState::Running, s.id));
        out
    }

    /// Stops workload `id` (if it still runs) and returns its report.
    pub(crate) fn stop(&self, id: u64) -> Result<GuestReport, ActionError> {
        let g = self
            .all
            .lock()
            .get(&id)
            .cloned()
            .ok_or_else(|| ActionError::new(ErrorKind::NotFound, format!("no guest workload {id}")))?;
        g.stop.store(true, Ordering::SeqCst);
        Ok(g.wait())
    }

    /// Waits for workload `id` to end, reporting its ops to `progress`
    /// (polled every 100 ms), and returns its report.
    pub(crate) fn wait_for(&self, id: u64, progress: &dyn Progress) -> Result<GuestReport, ActionError> {
        let g = self
            .all
            .lock()
            .get(&id)
            .cloned()
            .ok_or_else(|| ActionError::new(ErrorKind::NotFound, format!("no guest workload {id}")))?;
        progress.begin("guest ops", g.run.ops);
        let mut told = 0;
        let report = {
            let mut r = g.report.lock();
            loop {
                let ops = g.ops.load(Ordering::Relaxed);
                progress.advance(ops.saturating_sub(told));
                told = told.max(ops);
                if let Some(r) = r.as_ref() {
                    break r.clone();
                }
                g.ended.wait_for(&mut r, Duration::from_millis(100));
            }
        };
        progress.end();
        // The thread lets go of the VM before this returns (a command of its own process
        // closes the VM cleanly right after).
        if let Some(h) = g.thread.lock().take() {
            let _ = h.join();
        }
        Ok(report)
    }

    /// A workload running on `vm`, if any.
    pub(crate) fn running_on(&self, vm: &str) -> Option<u64> {
        self.all
            .lock()
            .values()
            .find(|g| g.run.vm == vm && g.report.lock().is_none())
            .map(|g| g.id)
    }

    /// Stops every workload and waits for them.
    pub(crate) fn stop_all(&self) {
        let all: Vec<Arc<Guest>> = self.all.lock().values().cloned().collect();
        for g in &all {
            g.stop.store(true, Ordering::SeqCst);
        }
        for g in &all {
            g.wait();
        }
    }
}

/// Runs the guest's slices until its limit, a stop, or an error, and
/// publishes its report.
fn run_slices(g: &Guest, vm: &Vm, token: u64, progress: &dyn Progress) {
    let run = &g.run;
    let deadline = run.seconds.map(|s| g.started + Duration::from_secs_f64(s));
    let mut hist = drive::new_histogram();
    let mut report = GuestReport {
        id: g.id,
        vm: run.vm.clone(),
        profile: run.profile.clone(),
        disk: run.disk,
        threads: run.threads,
        state: GuestState::Finished,
        elapsed_s: 0.0,
        ops_per_s: 0.0,
        ops: 0,
        writes: 0,
        bytes_written: 0,
        reads: 0,
        unmaps: 0,
        flushes: 0,
        write_latency_us: [0.0; 4],
        epochs_checked: 0,
        missed_blocks: 0,
        error: None,
    };
    for slice in 0u64.. {
        if g.stop.load(Ordering::SeqCst) {
            report.state = GuestState::Stopped;
            break;
        }
        let left_ops = run.ops.map(|n| n.saturating_sub(report.ops));
        let left_time = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        if left_ops == Some(0) || left_time == Some(Duration::ZERO) {
            break;
        }
        let limit = match (left_ops, left_time) {
            (Some(n), _) => Limit::Ops(n.min(SLICE_OPS)),
            (None, Some(t)) => Limit::Time(t.min(SLICE_TIME)),
            (None, None) => Limit::Time(SLICE_TIME),
        };
        let plan = DrivePlan {
            loads: vec![DiskLoad {
                disk: run.disk,
                profile: run.profile.clone(),
                threads: run.threads,
            }],
            seed: run.seed.wrapping_add(slice),
            limit,
            verify: run.verify,
            snapshot_every: run.snapshot_every,
            apply_flush: true,
            snapshot_prefix: format!("{SNAPSHOT_PREFIX}{token:x}-{}-{slice}", g.id),
            backup_every: None,
        };
        match drive::drive(vm, &plan, &Ops { guest: g, progress }) {
            Ok(r) => {
                report.ops += r.counts.ops;
                report.writes += r.counts.writes;
                report.bytes_written += r.counts.bytes_written;
                report.reads += r.counts.reads;
                report.unmaps += r.counts.unmaps;
                report.flushes += r.counts.flushes;
                report.missed_blocks += r.missed_blocks;
                report.epochs_checked += r
                    .disks
                    .iter()
                    .map(|d| d.epochs.len() as u64 + u64::from(d.cumulative.is_some()))
                    .sum::<u64>();
                let _ = hist.add(&r.write_histogram);
            }
            Err(e) => {
                report.state = GuestState::Failed;
                report.error = Some(e.into());
                break;
            }
        }
    }
    if report.state != GuestState::Failed && report.missed_blocks > 0 {
        report.state = GuestState::Failed;
        report.error = Some(ActionError::new(
            ErrorKind::CheckFailed,
            format!(
                "{} changed blocks were missing from the tracker's answers",
                report.missed_blocks
            ),
        ));
    }
    let elapsed = g.started.elapsed().as_secs_f64();
    report.elapsed_s = elapsed;
    report.ops_per_s = report.ops as f64 / elapsed.max(1e-9);
    let l = Latency::of(&hist);
    report.write_latency_us = [l.p50_us, l.p99_us, l.p999_us, l.max_us];
    *g.report.lock() = Some(report);
    g.ended.notify_all();
}
