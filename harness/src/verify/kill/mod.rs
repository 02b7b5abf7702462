//! The crash torture with real processes (`cbtsim verify --kill`).
//!
//! The parent makes a datastore with one VM and a backup repository in a temporary
//! directory, and then, round after round, starts a *worker*: a real process (the caller
//! says how to start one: `cbtsim verify --kill-worker DIR --seed S`) that opens the VM
//! (recovering whatever the previous one left half done) and works on it until it is
//! killed ([`worker`]): writer threads write and unmap, a lifecycle thread creates,
//! removes (newest: consolidation of the live top behind helper deltas while the writers
//! write; middle; oldest), reverts, extends, settles, consolidates, toggles CBT (rarely)
//! and runs backups into the repository. Each round aims its kill at one target, in a
//! shuffled rotation so that every target gets as many rounds ([`TARGETS`]): the start
//! and recovery (`open`), the writers alone between two operations (`write`), or an
//! operation (snapshot, remove, backup, revert, extend, cbt), which the worker then
//! favours. The parent waits for the event (the worker prints a marker line before and
//! after each operation), then a random time drawn from its seeded generator, and sends
//! SIGKILL. Each kill is counted by what it interrupted (`killed_during`, read from the
//! markers), which need not be what it aimed at (`aimed_at`).
//!
//! # What is checked after a kill (in this process, model-free)
//! About two kills in three are checked at once; after the others the next worker starts
//! at once, so that recovery itself is killed too (its open is then what the next kill
//! may interrupt, and a worker that cannot open the VM ends by itself: a violation), and
//! the check after that kill covers both. A check opens the VM (recovery runs; its time
//! is `reopen`) and:
//! * **The VM opens**, has no layer left to consolidate and no orphaned layer file.
//! * **Acknowledged writes survive**: every byte reads back as the newest write the
//!   worker's writers were told was done, or as the write in flight (`acks`). Where
//!   one worker ran since the last check and did not revert, every other byte must
//!   hold what the last check read (`whole_disk_durability_checks`): a kill inside a
//!   consolidation, a copy-on-write or a recovery must change no byte.
//! * **Snapshots stay frozen**: each snapshot the parent has seen is read again and must be
//!   unchanged. A snapshot is recorded the first time a check sees it.
//! * **No missed byte**: every change ID the parent has seen (of a snapshot, of a committed
//!   restore point, of its own check snapshots) is kept with its frozen image (a
//!   *baseline*, kept after the snapshot is gone, as a backup application keeps it). At a
//!   new snapshot, the answer since each baseline of the current tracking session must
//!   cover every byte that differs (`missed_bytes`), and `*` every non-zero byte.
//! * **The session survives kills**: a baseline's change ID must answer, never
//!   `TrackingReset`, unless the worker toggled CBT since (it prints `start cbt`), which
//!   starts a new session; then it must fail with `TrackingReset`.
//! * **Backups**: a committed point reads back (its chunks are checked) as a baseline,
//!   which checks its content against the VM; a point is full only where the tracking
//!   session changed since the previous point; the repository verifies every tenth check.
//!
//! The first violation ends the run and keeps its directory (`kept_dir`).
//!
//! At the end the parent backs the VM up once more: incremental, and its restore is
//! byte-identical to the disk. (Where a CBT toggle left no point of the current tracking
//! session, no backup could be incremental: the parent then backs up first and kills one
//! more worker, which toggles nothing, before that last backup.)
//!
//! # Replay
//! Every choice (the workers' seeds and operations, the waits) follows from `seed`; the
//! instants of the kills depend on timing, so a replay with the same seed repeats the
//! same rounds, not the same instants. A message names its round and worker seed; a
//! worker can also be run by hand on a kept directory.
//!
//! # Limitations
//! One disk. A revert goes only to a snapshot of the current capacity (a revert that
//! shrinks the disk makes the next backup full, which would hide whether a kill did), so
//! the disk only grows: extends are small (at most 64 KiB) and stop at twice the
//! initial size (after some thousands of rounds). The opens timed are the parent's; a
//! worker's open after a chained kill is not timed.
//! Power loss (what a kill leaves in the page cache is lost too) is not simulated here.

mod acks;
mod worker;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backup::{backup_vm, restore_to_file, BackupOptions, PointImage, Progress, Repository};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use sim::{DiskSpec, Host, SimError, Vm};
use tracker::Granularity;
use vadp::VadpError;

use super::compare;
use crate::apply::changed_areas;
use crate::HarnessError;
use acks::Acks;
pub use worker::worker;

/// The VM's name in the run's datastore.
const VM_NAME: &str = "kill";
/// The run directory's datastore, repository, acknowledgement log, plan, worker stderr.
const DATASTORE: &str = "datastore";
const REPO: &str = "repo";
const ACKS: &str = "acks";
const PLAN: &str = "kill.json";
const STDERR: &str = "worker.err";
/// Baselines kept: the oldest of the session and the newest others.
const MAX_BASELINES: usize = 6;
/// Violation messages kept in the report (all are counted).
const MAX_MESSAGES: usize = 20;
/// The longest wait for the operation a round aims at; then it kills anyway.
const AIM_WAIT: Duration = Duration::from_millis(500);

/// What the parent tells its workers (`DIR/kill.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Plan {
    writers: u64,
    max_capacity: u64,
    max_snapshots: usize,
    /// Whether workers may toggle CBT (not in the rounds before the last backup).
    cbt_toggles: bool,
    /// The operation the round aims its kill at (a prefix of its name): the
    /// worker makes it ten times as likely as otherwise.
    favor: Option<String>,
}

impl Plan {
    fn load(dir: &Path) -> Result<Self, HarnessError> {
        let path = dir.join(PLAN);
        let text = std::fs::read(&path).map_err(|source| HarnessError::Io {
            path: path.clone(),
            source,
        })?;
        serde_json::from_slice(&text).map_err(|e| HarnessError::Check {
            path,
            reason: format!("not a kill plan: {e}"),
        })
    }

    fn save(&self, dir: &Path) -> Result<(), HarnessError> {
        let path = dir.join(PLAN);
        std::fs::write(&path, serde_json::to_vec(self).expect("a plan serialises")).map_err(io(&path))
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct KillConfig {
    /// Stop after this many kills (`None`: only `seconds` stops it).
    pub kills: Option<u64>,
    /// Stop after this long.
    pub seconds: Option<f64>,
    /// Seed of every choice.
    pub seed: u64,
    /// The disk's initial size; workers extend it up to twice that.
    pub disk_size: u64,
    /// Tracking granularity.
    pub granularity: Granularity,
    /// Writer threads per worker.
    pub writers: u64,
    /// Where to make the run directory (default: `/dev/shm` where it exists, else the
    /// system's temporary directory).
    pub dir: Option<PathBuf>,
}

impl Default for KillConfig {
    fn default() -> Self {
        Self {
            kills: Some(100),
            seconds: None,
            seed: 1,
            disk_size: 16 << 20,
            granularity: Granularity::new(16 << 10).expect("16 KiB is a granularity"),
            writers: 2,
            dir: None,
        }
    }
}

/// The last backup of a run and its restore.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FinalBackup {
    /// The point.
    pub point: String,
    /// `full` or `incremental`.
    pub kind: String,
    /// Why.
    pub reason: String,
    /// Bytes read from the snapshot.
    pub bytes_read: u64,
    /// Bytes the host reported changed.
    pub changed_bytes: u64,
    /// The restored image equals the disk.
    pub restored_identical: bool,
}

/// How long the opens after a kill took (the VM's recovery included), in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReopenTimes {
    /// Opens measured: one per check.
    pub count: u64,
    /// The fastest.
    pub min_ms: f64,
    /// The median.
    pub median_ms: f64,
    /// The 99th percentile (nearest rank).
    pub p99_ms: f64,
    /// The slowest.
    pub max_ms: f64,
    /// The mean.
    pub mean_ms: f64,
}

impl ReopenTimes {
    fn of(times: &[Duration]) -> Self {
        if times.is_empty() {
            return Self::default();
        }
        let mut ms: Vec<f64> = times.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        ms.sort_by(f64::total_cmp);
        let rank = |q: f64| ms[((q * ms.len() as f64).ceil() as usize).clamp(1, ms.len()) - 1];
        Self {
            count: ms.len() as u64,
            min_ms: ms[0],
            median_ms: rank(0.5),
            p99_ms: rank(0.99),
            max_ms: ms[ms.len() - 1],
            mean_ms: ms.iter().sum::<f64>() / ms.len() as f64,
        }
    }
}

/// The result of a run. It passed when `violations == 0` (which implies no missed or lost byte).
#[derive(Debug, Clone, Default, Serialize)]
pub struct KillReport {
    /// Worker processes killed with SIGKILL.
    pub kills: u64,
    /// Kills after which the next worker started without a check in between (its
    /// recovery is what the next kill may interrupt).
    pub chained_kills: u64,
    /// Kills counted by what they interrupted: `open` (start and recovery), an operation,
    /// or `write` (only the writers were at work).
    pub killed_during: BTreeMap<String, u64>,
    /// The parent's opens of the VM right after a kill (recovery included).
    pub reopen: ReopenTimes,
    /// Checked kills at which a write was in flight.
    pub kills_mid_write: u64,
    /// Rounds by what they aimed at (see `killed_during` for what they hit).
    pub aimed_at: BTreeMap<String, u64>,
    /// Operations the workers started, by kind.
    pub ops_started: BTreeMap<String, u64>,
    /// Query answers compared against frozen images (baselines and `*`).
    pub checks: u64,
    /// Bytes that changed and were not reported (must be 0).
    pub missed_bytes: u64,
    /// Tracking blocks holding them.
    pub missed_blocks: u64,
    /// Reported bytes in blocks where nothing differed (over-reporting, allowed).
    pub extra_bytes: u64,
    /// Bytes read back after kills whose content the checks knew: the bytes of the
    /// killed worker's acknowledged writes, and in a whole-disk check every byte.
    pub durable_bytes_checked: u64,
    /// Checks that knew every byte of the disk: the last check's image and the
    /// acknowledged writes of the one worker since (see [`Run::check_durability`]).
    pub whole_disk_durability_checks: u64,
    /// Bytes that did not read back as written (must be 0).
    pub lost_bytes: u64,
    /// Snapshots read again and found unchanged.
    pub frozen_checks: u64,
    /// Snapshots recorded.
    pub snapshots_seen: u64,
    /// Committed restore points read back and checked.
    pub points_checked: u64,
    /// Of those, full ones (the first, and after a CBT toggle).
    pub full_points: u64,
    /// Change IDs that failed with `TrackingReset` because the worker toggled CBT.
    pub expected_resets: u64,
    /// CBT toggles the workers started.
    pub cbt_toggles: u64,
    /// Repository verifications (all passed unless a violation says otherwise).
    pub repository_verifies: u64,
    /// The last backup.
    pub final_backup: Option<FinalBackup>,
    /// Everything that broke a rule.
    pub violations: u64,
    /// The first violations, described.
    pub violation_messages: Vec<String>,
    /// The seed.
    pub seed: u64,
    /// Initial disk size.
    pub disk_size: u64,
    /// Tracking granularity.
    pub granularity: u64,
    /// Writer threads per worker.
    pub writers: u64,
    /// Wall-clock seconds.
    pub seconds: f64,
    /// Where the run's directory was kept (datastore, repository, the last worker's
    /// acknowledgement log): after a violation, which ends the run.
    pub kept_dir: Option<String>,
    /// The run was interrupted (Ctrl-C) before its end.
    pub interrupted: bool,
    /// No violation.
    pub passed: bool,
}

/// What a round aims its kill at, with the longest wait in µs: `open`, that long
/// after the worker started (its start and recovery); `write`, after an operation
/// ended (the writers alone); else after the worker's marker `start TARGET…`. The
/// worker favours the target operation, so that it comes soon. The short ones
/// (extend, cbt: ~0.1 ms) are over soon after their marker reaches the parent.
const TARGETS: [(&str, u64); 8] = [
    ("open", 20_000),
    ("write", 300),
    ("snapshot", 600),
    ("remove", 3_000),
    ("backup", 20_000),
    ("revert", 600),
    ("extend", 50),
    ("cbt", 50),
];

/// A round's kill instant: this long after the event `target` names (see [`TARGETS`]).
#[derive(Debug, Clone, Copy)]
struct Aim {
    target: &'static str,
    wait: Duration,
}

/// A change ID kept with the image it stands for.
#[derive(Debug, Clone)]
struct Baseline {
    what: String,
    cid: String,
    image: Arc<Vec<u8>>,
    /// CBT toggles seen before it was recorded.
    toggles: u64,
}

/// A committed point, as far as the next point's kind is concerned.
#[derive(Debug, Clone)]
struct SeenPoint {
    id: String,
    session: Option<String>,
    capacity: u64,
}

fn session_of(cid: &str) -> &str {
    cid.split('/').next().unwrap_or("")
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> HarnessError + '_ {
    move |source| HarnessError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Reads a whole snapshot disk.
fn snapshot_image(vm: &Vm, snap: &str) -> Result<Vec<u8>, SimError> {
    let mut buf = vec![0u8; vm.snapshot_capacity(snap, 0)? as usize];
    vm.read_snapshot(snap, 0, 0, &mut buf)?;
    Ok(buf)
}

/// Reads the whole live disk.
fn live_image(vm: &Vm) -> Result<Vec<u8>, SimError> {
    let mut buf = vec![0u8; vm.capacity(0)? as usize];
    vm.read(0, 0, &mut buf)?;
    Ok(buf)
}

/// Runs the torture: `spawn(dir, seed)` makes the command of one worker (which must call
/// [`worker`] with `dir` and `seed`, its markers on stdout). `progress` gets one phase,
/// in kills when `kills` is set.
///
/// Returns an error only when the run could not be set up; everything it finds is in
/// the report.
pub fn run(
    cfg: &KillConfig,
    spawn: &dyn Fn(&Path, u64) -> Command,
    progress: &dyn Progress,
) -> Result<KillReport, HarnessError> {
    if !cfg.disk_size.is_multiple_of(512) || !(1 << 20..=256 << 20).contains(&cfg.disk_size) {
        return Err(SimError::BadSize {
            size: cfg.disk_size,
            reason: "verify --kill needs a whole number of sectors, 1 MiB to 256 MiB".into(),
        }
        .into());
    }
    let parent = super::scratch_parent(cfg.dir.as_deref());
    let tmp = tempfile::Builder::new()
        .prefix("cbtsim-kill")
        .tempdir_in(&parent)
        .map_err(io(&parent))?;
    let dir = tmp.path().to_owned();
    let plan = Plan {
        writers: cfg.writers.max(1),
        max_capacity: 2 * cfg.disk_size,
        max_snapshots: 4,
        cbt_toggles: true,
        favor: None,
    };
    plan.save(&dir)?;
    let host = Host::open(&dir.join(DATASTORE))?;
    let repo = Repository::create_or_open(&dir.join(REPO))?;
    {
        // The first point, so that every later backup has one to build on.
        let vm = host.create_vm(
            VM_NAME,
            &[DiskSpec {
                capacity: cfg.disk_size,
                granularity: cfg.granularity,
            }],
        )?;
        backup_vm(&*vm, VM_NAME, &repo, &BackupOptions::default(), &())?;
        drop(host.close_vm(VM_NAME));
    }
    let mut r = Run {
        cfg,
        dir,
        plan,
        host,
        repo,
        rng: ChaCha8Rng::seed_from_u64(cfg.seed),
        report: KillReport {
            seed: cfg.seed,
            disk_size: cfg.disk_size,
            granularity: cfg.granularity.bytes(),
            writers: cfg.writers.max(1),
            ..KillReport::default()
        },
        baselines: VecDeque::new(),
        snaps: HashMap::new(),
        points: Vec::new(),
        toggles: 0,
        toggles_checked: 0,
        checked: 0,
        reopens: Vec::new(),
        aims: Vec::new(),
        base: Some(Arc::new(vec![0; cfg.disk_size as usize])),
        workers_since_check: 0,
    };
    let start = Instant::now();
    progress.begin("verify --kill", cfg.kills);
    let result = r.rounds(start, spawn, progress);
    progress.end();
    result?;
    if !progress.cancelled() && r.report.violations == 0 {
        r.finish(spawn)?;
    }
    r.report.seconds = start.elapsed().as_secs_f64();
    r.report.reopen = ReopenTimes::of(&r.reopens);
    r.report.interrupted = progress.cancelled();
    r.report.passed = r.report.violations == 0;
    if !r.report.passed {
        r.report.kept_dir = Some(tmp.keep().display().to_string());
    }
    Ok(r.report)
}

/// The state of a run.
struct Run<'a> {
    cfg: &'a KillConfig,
    dir: PathBuf,
    plan: Plan,
    host: Host,
    repo: Repository,
    rng: ChaCha8Rng,
    report: KillReport,
    baselines: VecDeque<Baseline>,
    /// Snapshots seen, by name and change ID (a backup killed before it committed its
    /// point leaves a snapshot whose name the next backup gives to a new one), with their
    /// images.
    snaps: HashMap<(String, Option<String>), Arc<Vec<u8>>>,
    points: Vec<SeenPoint>,
    /// CBT toggles the workers started, in all rounds so far.
    toggles: u64,
    /// `toggles` at the last check.
    toggles_checked: u64,
    /// Checks done.
    checked: u64,
    /// How long each check's open took.
    reopens: Vec<Duration>,
    /// The disk's content at the last check (at the start: zeros).
    base: Option<Arc<Vec<u8>>>,
    /// Workers started since the last check.
    workers_since_check: u64,
    /// The targets of the next rounds (indices into [`TARGETS`]): each target in
    /// turn, in a shuffled order, so that every one is aimed at as often.
    aims: Vec<usize>,
}

/// What one round saw of its worker.
struct Round {
    phase: String,
    /// Set when the worker ended before it was killed: how, and its stderr.
    exited: Option<String>,
}

impl Run<'_> {
    fn violation(&mut self, msg: String) {
        self.report.violations += 1;
        if self.report.violation_messages.len() < MAX_MESSAGES {
            self.report.violation_messages.push(msg);
        }
    }

    fn rounds(
        &mut self,
        start: Instant,
        spawn: &dyn Fn(&Path, u64) -> Command,
        progress: &dyn Progress,
    ) -> Result<(), HarnessError> {
        loop {
            let chain = self.rng.gen_ratio(1, 3);
            let (ctx, fatal) = self.kill(spawn)?;
            progress.advance(1);
            let last = fatal
                || progress.cancelled()
                || self.cfg.kills.is_some_and(|k| self.report.kills >= k)
                || self.cfg.seconds.is_some_and(|s| start.elapsed().as_secs_f64() >= s);
            if chain && !last {
                self.report.chained_kills += 1;
                continue;
            }
            let ok = self.check(&ctx)?;
            progress.note(&format!(
                "{} kills, {} checks, {} missed bytes, {} lost bytes, {} violations",
                self.report.kills,
                self.report.checks,
                self.report.missed_bytes,
                self.report.lost_bytes,
                self.report.violations
            ));
            // The first violation ends the run, its directory kept as the kill left it
            // (and the check found it).
            if last || !ok || self.report.violations > 0 {
                break;
            }
        }
        Ok(())
    }

    /// One round: a worker started and killed. Returns how to name the round in messages,
    /// and whether the worker ended by itself (a violation that ends the run).
    fn kill(&mut self, spawn: &dyn Fn(&Path, u64) -> Command) -> Result<(String, bool), HarnessError> {
        let wseed: u64 = self.rng.gen();
        if self.aims.is_empty() {
            self.aims = (0..TARGETS.len()).collect();
            self.aims.shuffle(&mut self.rng);
        }
        let (target, max) = TARGETS[self.aims.pop().expect("refilled")];
        let aim = Aim {
            target,
            wait: Duration::from_micros(self.rng.gen_range(0..=max)),
        };
        *self.report.aimed_at.entry(target.to_owned()).or_default() += 1;
        self.plan.favor = (target != "open" && target != "write").then(|| target.to_owned());
        self.plan.save(&self.dir)?;
        self.workers_since_check += 1;
        let r = self.round(spawn(&self.dir, wseed), aim)?;
        self.report.kills += 1;
        *self.report.killed_during.entry(r.phase.clone()).or_default() += 1;
        let ctx = format!(
            "round {} (worker seed {wseed}, killed during {})",
            self.report.kills, r.phase
        );
        let fatal = r.exited.is_some();
        if let Some(how) = r.exited {
            self.violation(format!("{ctx}: the worker ended before it was killed: {how}"));
        }
        Ok((ctx, fatal))
    }

    /// Starts a worker with `cmd`, kills it at the instant `aim` says, and reads what it printed.
    fn round(&mut self, mut cmd: Command, aim: Aim) -> Result<Round, HarnessError> {
        let acks = self.dir.join(ACKS);
        match std::fs::remove_file(&acks) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(&acks)(e)),
            _ => {}
        }
        let err_path = self.dir.join(STDERR);
        let err = File::create(&err_path).map_err(io(&err_path))?;
        // Its own process group: a Ctrl-C meant for the run stops the run, which kills the worker.
        let mut child = cmd
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(err)
            .spawn()
            .map_err(io(Path::new("the worker")))?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, rx) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut lines = Vec::new();
        // A sleep lasts at least ~60 µs more than asked (timer slack): short
        // waits spin, so that a kill can land inside a 0.1 ms operation.
        let wait = |d: Duration| {
            if d >= Duration::from_millis(1) {
                std::thread::sleep(d);
            } else {
                let until = Instant::now() + d;
                while Instant::now() < until {
                    std::hint::spin_loop();
                }
            }
        };
        match aim.target {
            "open" => {}
            "write" => wait_for(&rx, &mut lines, &mut child, |l| l.starts_with("done ")),
            op => wait_for(&rx, &mut lines, &mut child, |l| {
                l.strip_prefix("start ").is_some_and(|o| o.starts_with(op))
            }),
        }
        wait(aim.wait);
        let ended = child.try_wait().map_err(io(Path::new("the worker")))?;
        if ended.is_none() {
            // SIGKILL: nothing of the worker runs after this.
            let _ = child.kill();
        }
        let status = child.wait().map_err(io(Path::new("the worker")))?;
        let _ = reader.join();
        lines.extend(rx.try_iter());
        let mut open_done = false;
        let mut current: Option<&str> = None;
        for l in &lines {
            if l == "done open" {
                open_done = true;
            } else if let Some(op) = l.strip_prefix("start ") {
                current = Some(op);
                if op != "open" {
                    *self.report.ops_started.entry(op.to_owned()).or_default() += 1;
                }
                if op == "cbt" {
                    self.toggles += 1;
                    self.report.cbt_toggles += 1;
                }
            } else if l.starts_with("done ") {
                current = None;
            }
        }
        let phase = if open_done { current.unwrap_or("write") } else { "open" };
        let exited = ended.map(|_| {
            let err = std::fs::read_to_string(&err_path).unwrap_or_default();
            let tail: String = err
                .chars()
                .rev()
                .take(600)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            format!("{status}: {}", tail.trim())
        });
        Ok(Round {
            phase: phase.to_owned(),
            exited,
        })
    }

    /// Opens the VM after a kill and checks it (see the module docs). Returns false when
    /// the run cannot go on (the VM does not open).
    fn check(&mut self, ctx: &str) -> Result<bool, HarnessError> {
        let t = Instant::now();
        let vm = match self.host.vm(VM_NAME) {
            Ok(vm) => {
                self.reopens.push(t.elapsed());
                vm
            }
            Err(e) => {
                self.violation(format!("{ctx}: the VM does not open: {e}"));
                return Ok(false);
            }
        };
        let r = self.check_open(&vm, ctx);
        self.workers_since_check = 0;
        if r.is_err() {
            self.base = None;
        }
        drop(self.host.close_vm(VM_NAME));
        drop(vm);
        self.toggles_checked = self.toggles;
        self.checked += 1;
        r.map(|()| true)
    }

    fn check_open(&mut self, vm: &Vm, ctx: &str) -> Result<(), HarnessError> {
        let g = vm.granularity(0)?.bytes();
        if vm.needs_consolidation() {
            self.violation(format!("{ctx}: a layer is left to consolidate after the open"));
        }
        self.check_orphans(vm, ctx)?;
        if !vm.cbt() {
            if self.toggles > self.toggles_checked {
                vm.set_cbt(true)?; // a worker was killed between CBT off and on
            } else {
                self.violation(format!("{ctx}: CBT is off though no worker turned it off"));
                vm.set_cbt(true)?;
            }
        }
        self.check_durability(vm, ctx)?;
        // Snapshots: the known ones are unchanged, new ones are recorded.
        let listed = vm.snapshots();
        let key = |s: &sim::SnapshotSummary| (s.name.clone(), s.disks[0].change_id.clone());
        self.snaps.retain(|k, _| listed.iter().any(|s| key(s) == *k));
        for s in &listed {
            let image = snapshot_image(vm, &s.name)?;
            match self.snaps.get(&key(s)) {
                Some(old) => {
                    self.report.frozen_checks += 1;
                    if old[..] != image[..] {
                        let at = old.iter().zip(image.iter()).position(|(a, b)| a != b);
                        self.violation(format!(
                            "{ctx}: snapshot {} changed since it was recorded (first difference at {at:?}, sizes {} and {})",
                            s.name,
                            old.len(),
                            image.len()
                        ));
                    }
                }
                None => {
                    let image = Arc::new(image);
                    self.report.snapshots_seen += 1;
                    if let Some(cid) = &s.disks[0].change_id {
                        self.add_baseline(Baseline {
                            what: format!("snapshot {}", s.name),
                            cid: cid.clone(),
                            image: image.clone(),
                            toggles: self.toggles_checked,
                        });
                    }
                    self.snaps.insert(key(s), image);
                }
            }
        }
        self.check_points(ctx)?;
        // A new snapshot, checked against every baseline.
        let name = format!("check-{}", self.checked);
        let info = vm.create_snapshot(&name)?;
        let cid = info.disks[0].change_id.clone().ok_or_else(|| HarnessError::Check {
            path: VM_NAME.into(),
            reason: format!("{ctx}: snapshot {name} has no change ID with CBT on"),
        })?;
        let now = Arc::new(snapshot_image(vm, &name)?);
        match changed_areas(vm, &name, 0, "*") {
            Ok(all) => {
                let c = compare(&[], &now, &all.areas, g);
                self.report.checks += 1;
                self.count_missed(ctx, &format!("`*` at {name}"), c);
            }
            Err(e) => self.violation(format!("{ctx}: `*` at {name}: {e}")),
        }
        let session = session_of(&cid).to_owned();
        let mut keep = VecDeque::new();
        for b in std::mem::take(&mut self.baselines) {
            let what = format!("the answer at {name} since {} ({})", b.what, b.cid);
            let toggled = self.toggles > b.toggles;
            let answer = changed_areas(vm, &name, 0, &b.cid);
            if session_of(&b.cid) == session {
                match answer {
                    Ok(a) => {
                        let c = compare(&b.image, &now, &a.areas, g);
                        self.report.checks += 1;
                        self.count_missed(ctx, &what, c);
                        keep.push_back(b);
                    }
                    Err(e) => self.violation(format!("{ctx}: {what}: {e} (the session did not change)")),
                }
            } else {
                match answer {
                    Err(VadpError::TrackingReset { .. }) if toggled => self.report.expected_resets += 1,
                    Err(e) if !toggled => self.violation(format!(
                        "{ctx}: {what}: {e}: the tracking session changed with no CBT toggle"
                    )),
                    other => self.violation(format!(
                        "{ctx}: {what}: {other:?} where a change ID of an ended session must give TrackingReset"
                    )),
                }
            }
        }
        self.baselines = keep;
        self.base = Some(now.clone());
        self.add_baseline(Baseline {
            what: format!("check snapshot {name}"),
            cid,
            image: now,
            toggles: self.toggles,
        });
        vm.remove_snapshot(&name)?;
        if self.checked.is_multiple_of(10) {
            self.verify_repository(ctx)?;
        }
        Ok(())
    }

    fn count_missed(&mut self, ctx: &str, what: &str, c: super::Comparison) {
        self.report.missed_bytes += c.missed_bytes;
        self.report.missed_blocks += c.missed_blocks;
        self.report.extra_bytes += c.extra_bytes;
        if c.missed_bytes > 0 {
            self.violation(format!(
                "{ctx}: {what} misses {} changed bytes in {} blocks",
                c.missed_bytes, c.missed_blocks
            ));
        }
    }

    /// Keeps `b`: the oldest baseline and the newest others.
    fn add_baseline(&mut self, b: Baseline) {
        self.baselines.push_back(b);
        if self.baselines.len() > MAX_BASELINES {
            self.baselines.remove(1);
        }
    }

    /// No layer file that the chain does not name.
    fn check_orphans(&mut self, vm: &Vm, ctx: &str) -> Result<(), HarnessError> {
        let chain = vm.config().disks[0].chain.clone();
        let dir = self.dir.join(DATASTORE).join(VM_NAME).join("disk0");
        let mut orphans = Vec::new();
        for e in std::fs::read_dir(&dir).map_err(io(&dir))?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let id = name
                .strip_prefix('L')
                .and_then(|n| n.split('.').next())
                .and_then(|n| n.parse::<u64>().ok());
            if id.is_some_and(|id| !chain.contains(&id)) {
                orphans.push(name);
            }
        }
        if !orphans.is_empty() {
            self.violation(format!(
                "{ctx}: orphaned layer files after the open: {orphans:?} (chain {chain:?})"
            ));
        }
        Ok(())
    }

    /// Every acknowledged write of the killed worker reads back; where the check
    /// knows the image the worker started from, every other byte holds it.
    fn check_durability(&mut self, vm: &Vm, ctx: &str) -> Result<(), HarnessError> {
        let path = self.dir.join(ACKS);
        let acks = match Acks::read(&path, self.plan.writers) {
            Ok(a) => a,
            // Killed before it made one (in its open): it wrote nothing.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Acks {
                gen: Some(0),
                writers: Vec::new(),
            },
            Err(e) => return Err(io(&path)(e)),
        };
        let Some(gen) = acks.gen.filter(|g| g % 2 == 0) else {
            return Ok(()); // killed inside a revert: the content changed back
        };
        let live = live_image(vm)?;
        // The whole disk is known where one worker ran since the last check, did
        // not revert, and its log holds all its writes.
        let base = self
            .base
            .as_deref()
            .filter(|_| self.workers_since_check == 1 && gen == 0 && acks.complete());
        let d = acks::check(&acks, gen, &live, base.map(|b| &b[..]));
        self.report.durable_bytes_checked += d.checked;
        self.report.whole_disk_durability_checks += u64::from(base.is_some());
        self.report.lost_bytes += d.lost;
        self.report.kills_mid_write += u64::from(d.in_flight);
        if let Some(l) = d.first_lost {
            self.violation(format!(
                "{ctx}: {} bytes do not read back as written; the first at {} holds {:#04x}, not {:#04x} \
                 (written by {}; in flight: {:?})",
                d.lost,
                l.at,
                l.got,
                l.want,
                l.by.map_or(
                    "no write of this worker: the image it started from".to_owned(),
                    |r| format!("{r:?}")
                ),
                l.flight
            ));
        }
        Ok(())
    }

    /// New committed points: read back as baselines; full only after a session change.
    fn check_points(&mut self, ctx: &str) -> Result<(), HarnessError> {
        let seen: HashSet<String> = self.points.iter().map(|p| p.id.clone()).collect();
        for meta in self.repo.points()? {
            if seen.contains(&meta.point) || meta.vm != VM_NAME {
                continue;
            }
            let img = PointImage::open(&self.repo, &meta.point, 0)?;
            let mut image = vec![0u8; img.capacity() as usize];
            img.read_at(0, &mut image)?;
            drop(img);
            self.report.points_checked += 1;
            let cid = meta.disks[0].change_id.clone();
            let point = SeenPoint {
                id: meta.point.clone(),
                session: cid.as_deref().map(|c| session_of(c).to_owned()),
                capacity: meta.disks[0].capacity,
            };
            if meta.kind == "full" {
                self.report.full_points += 1;
                if let Some(prev) = self.points.last() {
                    if prev.session.is_some() && prev.session == point.session && point.capacity >= prev.capacity {
                        self.violation(format!(
                            "{ctx}: point {} is full ({}) though point {} is of the same tracking session",
                            meta.point, meta.reason, prev.id
                        ));
                    }
                }
            }
            self.points.push(point);
            if let Some(cid) = cid {
                self.add_baseline(Baseline {
                    what: format!("point {}", meta.point),
                    cid,
                    image: Arc::new(image),
                    toggles: self.toggles_checked,
                });
            }
        }
        Ok(())
    }

    fn verify_repository(&mut self, ctx: &str) -> Result<(), HarnessError> {
        let v = backup::verify(&self.repo, &())?;
        self.report.repository_verifies += 1;
        if !v.ok {
            self.violation(format!(
                "{ctx}: the repository does not verify: corrupt {:?}, missing {:?}, points affected {:?}",
                v.corrupt_chunks, v.missing_chunks, v.affected_points
            ));
        }
        Ok(())
    }

    /// Whether the newest point the checks saw is of another tracking session than
    /// the VM's (a worker toggled CBT since it): then no backup can be incremental.
    fn session_changed_since_the_last_point(&mut self) -> Result<bool, HarnessError> {
        let vm = self.host.vm(VM_NAME)?;
        let session = vm.tracker(0)?.session().map(|u| u.to_string());
        drop(self.host.close_vm(VM_NAME));
        drop(vm);
        Ok(self.points.last().is_none_or(|p| p.session != session))
    }

    /// The last backup, after a kill: incremental, restored byte-identical. Where a CBT
    /// toggle left no point of the current session, the parent backs up first and kills
    /// one more worker, which toggles nothing.
    fn finish(&mut self, spawn: &dyn Fn(&Path, u64) -> Command) -> Result<(), HarnessError> {
        for tries in 0.. {
            if !self.session_changed_since_the_last_point()? {
                break;
            }
            if tries == 3 {
                self.violation("no point of the current tracking session after 3 backups".into());
                return Ok(());
            }
            let vm = self.host.vm(VM_NAME)?;
            backup_vm(&*vm, VM_NAME, &self.repo, &BackupOptions::default(), &())?;
            drop(self.host.close_vm(VM_NAME));
            drop(vm);
            self.plan.cbt_toggles = false;
            self.plan.save(&self.dir)?;
            let (ctx, fatal) = self.kill(spawn)?;
            if fatal || !self.check(&ctx)? || self.report.violations > 0 {
                return Ok(());
            }
        }
        let vm = self.host.vm(VM_NAME)?;
        let r = backup_vm(&*vm, VM_NAME, &self.repo, &BackupOptions::default(), &())?;
        if r.kind != "incremental" {
            self.violation(format!("the backup after the last kill is {} ({})", r.kind, r.reason));
        }
        let path = self.dir.join("restored.img");
        restore_to_file(&self.repo, &r.point, 0, &path, true, &())?;
        let restored = std::fs::read(&path).map_err(io(&path))?;
        let live = live_image(&vm)?;
        let identical = restored == live;
        if !identical {
            let at = restored.iter().zip(live.iter()).position(|(a, b)| a != b);
            self.violation(format!(
                "the restore of the last point {} differs from the disk (sizes {} and {}, first difference at {at:?})",
                r.point,
                restored.len(),
                live.len()
            ));
        }
        drop(self.host.close_vm(VM_NAME));
        drop(vm);
        self.verify_repository("at the end")?;
        self.report.final_backup = Some(FinalBackup {
            point: r.point,
            kind: r.kind,
            reason: r.reason,
            bytes_read: r.bytes_read,
            changed_bytes: r.changed_bytes,
            restored_identical: identical,
        });
        Ok(())
    }
}

/// Reads the worker's lines into `lines` until one matches, the worker ends, or
/// [`AIM_WAIT`] passes.
fn wait_for(rx: &mpsc::Receiver<String>, lines: &mut Vec<String>, child: &mut Child, hit: impl Fn(&str) -> bool) {
    let deadline = Instant::now() + AIM_WAIT;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left.min(Duration::from_millis(50))) {
            Ok(line) => {
                let found = hit(&line);
                lines.push(line);
                if found {
                    return;
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if !matches!(child.try_wait(), Ok(None)) {
                    return;
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
    }
}
