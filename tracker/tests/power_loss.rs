//! Power loss: the crash-state generator (`tracker::crash_states`).
//!
//! A random workload runs against a tracker (guest writes, snapshots with the
//! guest writing on while the host settles, removals, settles, clean
//! reopens) while a recorder logs what reaches the disk: every page version
//! of the ctk file, every write-back and fsync, every change of the
//! directory, and the workload's own events ("this write's data may be
//! durable from now on", "the host saved its configuration"). Then, at
//! every point where something became durable, the files a power loss could
//! leave there (each page at its last sync or any later version, chosen at
//! random; a random prefix of the unsynced directory changes) are built in a
//! fresh directory and opened as after a reboot (another boot id), the host
//! recovers as `sim` does (closes the epochs of snapshots it saved, re-pins
//! its live ones) and takes one more snapshot. Every change ID of a
//! snapshot the host had saved must then either answer, at every live
//! snapshot and the new one, with every block written after it (up to that
//! snapshot), or fail with `TrackingReset`.
//!
//! Durable tracking must pass at every point with no reset at all; with the
//! rule broken on purpose the generator must find missed blocks; default
//! tracking must answer `TrackingReset`, never less. Seeds are printed;
//! `CBT_POWER_LOSS_SEEDS=N` runs more of them.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use tracker::crash_states::{self, CrashLog};
use tracker::{
    BrokenRule, ChangeId, Granularity, QueryError, Since, Tracker, TrackerError, TrackerOptions, TrackerView,
};
use uuid::Uuid;

const MIB: u64 = 1 << 20;
/// A 1 GiB disk of 64 KiB blocks in 64 intent regions of 16 MiB.
const CAP: u64 = 1 << 30;
const G: u64 = 64 << 10;
const REGION: u64 = 16 * MIB;
const BLOCKS: u64 = CAP / G;
const STEPS: usize = 40;

const WRITE: u64 = 1 << 32;
const CONFIG: u64 = 2 << 32;

/// SplitMix64.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A scratch directory in memory where there is one (syncs are cheap there).
fn scratch() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        tempfile::tempdir_in(shm).unwrap()
    } else {
        tempfile::tempdir().unwrap()
    }
}

/// What a workload did, and what the recorder saw.
struct Workload {
    opts: TrackerOptions,
    /// Blocks `first..=last` written in epoch `e`, by index (notes `WRITE | i`).
    writes: Vec<(u64, u64, u64)>,
    /// The live snapshots after each save of the host's configuration, and
    /// the revert it journals, if any (notes `CONFIG | i`).
    configs: Vec<(Vec<u64>, Option<u64>)>,
    /// The change ID of every snapshot taken.
    ids: BTreeMap<u64, ChangeId>,
    log: CrashLog,
}

/// A guest write of blocks around a random place, as `sim` does it: the
/// power-loss rule's check (and its slow path), the mark, then the data
/// (which may reach the disk from this moment on).
fn write(t: &Tracker, rng: &mut Rng, writes: &mut Vec<(u64, u64, u64)>) {
    let first = rng.below(BLOCKS);
    let last = (first + rng.below(3)).min(BLOCKS - 1);
    let off = first * G + rng.below(G);
    let end = last * G + 1 + rng.below(G - 1);
    let len = end.max(off + 1) - off;
    if !t.intents_durable(off, len) {
        t.sync_intents(off, len).unwrap();
    }
    assert!(t.intents_durable(off, len));
    t.mark(off, len);
    writes.push((off / G, (off + len - 1) / G, t.last_closed() + 1));
    crash_states::note(WRITE | (writes.len() as u64 - 1));
}

/// What a workload does besides writes, snapshots, removals and settles.
#[derive(Debug, Clone, Copy, Default)]
struct Extra {
    /// Durable tracking is turned off and on.
    toggles: bool,
    /// Reverts, as `sim` does them: journal, rewind, sync the marks, clear
    /// the journal (`false`: without the sync).
    reverts: Option<bool>,
}

fn run_workload(seed: u64, opts: TrackerOptions, extra: Extra, dir: &Path) -> Workload {
    let mut rng = Rng(seed);
    let p = dir.join("d.ctk");
    let mut t = Tracker::create_with(&p, CAP, Granularity::new(G).unwrap(), &opts).unwrap();
    t.sync().unwrap();
    crash_states::record(&p).unwrap();
    let mut writes = Vec::new();
    let mut configs: Vec<(Vec<u64>, Option<u64>)> = Vec::new();
    let mut live: Vec<u64> = Vec::new();
    let mut ids = BTreeMap::new();
    let save = |configs: &mut Vec<(Vec<u64>, Option<u64>)>, live: &[u64], revert: Option<u64>| {
        configs.push((live.to_vec(), revert));
        crash_states::note(CONFIG | (configs.len() as u64 - 1));
    };
    for _ in 0..STEPS {
        match rng.below(24) {
            12..=14 if live.len() < 6 => {
                // The host saves the snapshot in its configuration, then
                // closes the epoch in the stun; the guest writes on while the
                // host settles after it.
                let seq = t.last_closed() + 1;
                live.push(seq);
                save(&mut configs, &live, None);
                assert_eq!(t.close_epoch().unwrap(), seq);
                ids.insert(seq, t.change_id(seq).unwrap());
                crash_states::checkpoint();
                for _ in 0..rng.below(3) {
                    write(&t, &mut rng, &mut writes);
                }
                t.settle();
            }
            15..=16 if !live.is_empty() => {
                let seq = live.remove(rng.below(live.len() as u64) as usize);
                save(&mut configs, &live, None);
                t.unpin(seq);
            }
            17 => t.settle(),
            18 => {
                t.close().unwrap();
                t = Tracker::open_with(&p, &opts).unwrap();
            }
            19 => {
                // Killed (the page cache keeps everything) and reopened in the same boot.
                let durable = t.is_durable();
                t.abandon();
                drop(t);
                t = Tracker::open_with(&p, &opts.clone().durable(durable)).unwrap();
            }
            20 | 21 if extra.toggles => t.set_durable(!t.is_durable()).unwrap(),
            22 | 23 if extra.reverts.is_some() && !live.is_empty() => {
                // The journal (with the reverted chain) is saved first: from
                // then on the disk reads as the target, so every block
                // written after it changed again, in the open epoch.
                let target = live[rng.below(live.len() as u64) as usize];
                let newer: Vec<u64> = live.iter().copied().filter(|&s| s > target).collect();
                live.retain(|&s| s <= target);
                save(&mut configs, &live, Some(target));
                let cur = t.last_closed() + 1;
                let back: BTreeSet<(u64, u64)> = writes
                    .iter()
                    .filter(|&&(_, _, e)| e > target)
                    .map(|&(a, z, _)| (a, z))
                    .collect();
                for (a, z) in back {
                    writes.push((a, z, cur));
                    crash_states::note(WRITE | (writes.len() as u64 - 1));
                }
                t.rewind_to(target).unwrap();
                for s in newer {
                    t.unpin(s);
                }
                if extra.reverts == Some(true) && t.is_durable() {
                    t.sync().unwrap();
                }
                save(&mut configs, &live, None);
            }
            _ => write(&t, &mut rng, &mut writes),
        }
        crash_states::checkpoint();
    }
    let log = crash_states::finish().unwrap();
    drop(t);
    Workload {
        opts,
        writes,
        configs,
        ids,
        log,
    }
}

#[derive(Debug, Default)]
struct Outcome {
    states: u64,
    answered: u64,
    reset: u64,
    recovered_regions: u64,
    missed: Vec<String>,
}

/// The blocks an answer covers.
fn covered(areas: &[(u64, u64)]) -> BTreeSet<u64> {
    areas.iter().flat_map(|&(s, l)| s / G..(s + l).div_ceil(G)).collect()
}

/// Builds the crash state at point `k`, recovers it as the host would, and
/// checks every change ID the host could have handed out.
fn check(w: &Workload, k: usize, rng: &mut Rng, out: &mut Outcome) {
    let notes = w.log.notes(k);
    let writes: Vec<(u64, u64, u64)> = notes
        .iter()
        .filter(|&&n| n & WRITE != 0)
        .map(|&n| w.writes[(n & 0xffff_ffff) as usize])
        .collect();
    let saved: Vec<&(Vec<u64>, Option<u64>)> = notes
        .iter()
        .filter(|&&n| n & CONFIG != 0)
        .map(|&n| &w.configs[(n & 0xffff_ffff) as usize])
        .collect();
    let (live, revert) = saved.last().map_or_else(|| (Vec::new(), None), |c| (*c).clone());
    let known: BTreeSet<u64> = saved.iter().flat_map(|c| c.0.iter().copied()).collect();

    let dir = scratch();
    let p = w.log.build(k, &mut || rng.next(), dir.path()).unwrap();
    out.states += 1;
    // Opened in another boot.
    crash_states::set_boot_id(Some(Uuid::new_v4()));
    let opened = Tracker::open_with(&p, &w.opts);
    crash_states::set_boot_id(None);
    let t = match opened {
        Ok(t) => t,
        // The host would recreate it: every change ID is then a reset.
        Err(TrackerError::BadFile { .. }) => {
            out.reset += known.len() as u64;
            return;
        }
        Err(e) => panic!("point {k}: {e}"),
    };
    out.recovered_regions += t.stats().recovered_regions;
    // What `sim` does on open: close the epochs of snapshots it saved, pin
    // exactly its live ones; then one more snapshot closes the open epoch.
    let newest = live.iter().copied().max().unwrap_or(0);
    while t.last_closed() < newest {
        t.close_epoch().unwrap();
    }
    t.retain_pins(&live).unwrap();
    if let Some(target) = revert {
        // A journalled revert is marked again.
        t.rewind_to(target).unwrap();
    }
    let now = t.close_epoch().unwrap();
    t.settle();
    let points: Vec<u64> = live.iter().copied().chain([now]).collect();
    for &c in &known {
        let id = w.ids[&c];
        for &at in points.iter().filter(|&&at| at >= c) {
            let want: BTreeSet<u64> = writes
                .iter()
                .filter(|&&(_, _, e)| e > c && (at == now || e <= at))
                .flat_map(|&(a, z, _)| a..=z)
                .collect();
            match t.changed_areas(Since::Change(id), at, CAP, 0, usize::MAX) {
                Ok(page) => {
                    out.answered += 1;
                    let got = covered(&page.areas);
                    let missed: Vec<u64> = want.difference(&got).copied().collect();
                    if !missed.is_empty() {
                        out.missed
                            .push(format!("point {k}: since {c} at {at}: blocks {missed:?} missed"));
                    }
                }
                Err(QueryError::TrackingReset { .. }) => out.reset += 1,
                Err(e) => panic!("point {k}: since {c} at {at}: {e}"),
            }
        }
    }
    // `*` covers everything written (the whole disk while the allocation is unknown).
    let all = t.changed_areas(Since::Allocated, now, CAP, 0, usize::MAX).unwrap();
    let want: BTreeSet<u64> = writes.iter().flat_map(|&(a, z, _)| a..=z).collect();
    let missed: Vec<u64> = want.difference(&covered(&all.areas)).copied().collect();
    if !missed.is_empty() {
        out.missed
            .push(format!("point {k}: * at {now}: blocks {missed:?} missed"));
    }
    // Tracking goes on exactly: what the recovery left in the bitmaps hides
    // no later write (after a reset too: `now` is of the new session).
    let mut later = Vec::new();
    for _ in 0..8 {
        write(&t, rng, &mut later);
    }
    let next = t.close_epoch().unwrap();
    let id = t.change_id(now).unwrap();
    let got = covered(
        &t.changed_areas(Since::Change(id), next, CAP, 0, usize::MAX)
            .unwrap()
            .areas,
    );
    let missed: Vec<u64> = later
        .iter()
        .flat_map(|&(a, z, _)| a..=z)
        .filter(|b| !got.contains(b))
        .collect();
    if !missed.is_empty() {
        out.missed
            .push(format!("point {k}: since {now} at {next}: blocks {missed:?} missed"));
    }
}

/// Runs the workload of each seed and checks every crash state of it.
fn explore(seeds: impl IntoIterator<Item = u64>, opts: &TrackerOptions, extra: Extra, stop_at_miss: bool) -> Outcome {
    let mut out = Outcome::default();
    for seed in seeds {
        let dir = scratch();
        let w = run_workload(seed, opts.clone(), extra, dir.path());
        let mut rng = Rng(seed ^ 0xc4a5);
        let points = w.log.sync_points();
        let before = out.missed.len();
        for &k in &points {
            check(&w, k, &mut rng, &mut out);
        }
        println!(
            "seed {seed}: {} writes, {} events, {} crash states, {} missed",
            w.writes.len(),
            w.log.len(),
            points.len(),
            out.missed.len() - before
        );
        if stop_at_miss && !out.missed.is_empty() {
            break;
        }
    }
    out
}

fn seeds(default: u64) -> std::ops::Range<u64> {
    let n = std::env::var("CBT_POWER_LOSS_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default);
    0..n
}

fn durable() -> TrackerOptions {
    TrackerOptions::new().durable(true).region_bytes(REGION)
}

#[test]
fn durable_tracking_answers_every_change_id_after_any_power_loss() {
    let reverts = Extra {
        reverts: Some(true),
        ..Extra::default()
    };
    let out = explore(seeds(24), &durable(), reverts, false);
    println!("{out:?}");
    assert!(out.missed.is_empty(), "{:#?}", &out.missed[..out.missed.len().min(10)]);
    assert_eq!(out.reset, 0, "durable tracking never resets after a power loss");
    assert!(out.answered > 100 && out.states > 100, "{out:?}");
    assert!(out.recovered_regions > 0, "recovery applied intents");
}

#[test]
fn the_generator_finds_the_blocks_intents_save() {
    let out = explore(
        seeds(20),
        &durable().break_rule(BrokenRule::NoIntents),
        Extra::default(),
        true,
    );
    println!("{:?}", out.missed.first());
    assert!(
        !out.missed.is_empty(),
        "without intents a power loss loses marks: {out:?}"
    );
}

#[test]
fn the_generator_finds_an_epoch_switch_not_synced_in_the_stun() {
    let out = explore(
        seeds(20),
        &durable().break_rule(BrokenRule::NoSwitchSync),
        Extra::default(),
        true,
    );
    println!("{:?}", out.missed.first());
    assert!(
        !out.missed.is_empty(),
        "an unsynced switch loses the new epoch's writes: {out:?}"
    );
}

#[test]
fn default_tracking_resets_after_a_power_loss_and_never_answers_short() {
    let extra = Extra {
        toggles: false,
        reverts: Some(true),
    };
    let out = explore(seeds(8), &TrackerOptions::new().region_bytes(REGION), extra, false);
    println!("{out:?}");
    assert!(out.missed.is_empty(), "{:#?}", &out.missed[..out.missed.len().min(10)]);
    assert!(out.reset > 0, "{out:?}");
}

/// Durable tracking turned off and on while the guest writes (each in a
/// stun, as the host does): a power loss is recovered by the mode in force.
#[test]
fn turning_durable_tracking_off_and_on_never_answers_short() {
    let extra = Extra {
        toggles: true,
        reverts: Some(true),
    };
    let out = explore(seeds(12), &durable(), extra, false);
    println!("{out:?}");
    assert!(out.missed.is_empty(), "{:#?}", &out.missed[..out.missed.len().min(10)]);
    assert!(out.answered > 0 && out.reset > 0, "both modes were hit: {out:?}");
}

/// A revert's marks are no guest write's: no intent covers them. Without the
/// host's sync before it clears the revert's journal, a power loss loses
/// them (which is why `sim` syncs there).
#[test]
fn the_generator_finds_a_revert_not_synced_before_its_journal_is_cleared() {
    let extra = Extra {
        toggles: false,
        reverts: Some(false),
    };
    let out = explore(seeds(40), &durable(), extra, true);
    println!("{:?}", out.missed.first());
    assert!(!out.missed.is_empty(), "an unsynced revert loses its marks: {out:?}");
}

/// A read-only view cannot recover what a power loss (or reboot) left: it
/// fails with a typed error until a writable open has recovered the file.
#[test]
fn a_view_of_a_file_left_open_in_another_boot_asks_for_a_writable_open() {
    let dir = scratch();
    let p = dir.path().join("d.ctk");
    let g = Granularity::new(G).unwrap();
    // Opened in another boot, then the host stops without a clean close.
    crash_states::set_boot_id(Some(Uuid::new_v4()));
    let t = Tracker::create_with(&p, CAP, g, &durable()).unwrap();
    crash_states::set_boot_id(None);
    t.mark(0, 1);
    let e = t.close_epoch().unwrap();
    let id = t.change_id(e).unwrap();
    t.abandon();
    drop(t);
    assert!(matches!(TrackerView::open(&p), Err(TrackerError::Unrecovered { .. })));
    let t = Tracker::open_with(&p, &durable()).unwrap();
    t.close().unwrap();
    let v = TrackerView::open(&p).unwrap();
    assert_eq!(v.changed_areas(Since::Change(id), e, CAP, 0, 10).unwrap().areas, vec![]);
    assert_eq!(
        v.changed_areas(Since::Allocated, e, CAP, 0, 10).unwrap().areas,
        vec![(0, G)]
    );
}
