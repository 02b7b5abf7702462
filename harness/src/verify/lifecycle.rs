//! The writers and the lifecycle operations of a run: snapshot create, remove, revert,
//! extend, CBT off and on, power cycles, restarts and crashes, each kept in step with the
//! model.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backup::Progress;
use hdrhistogram::Histogram;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use workloads::IoOp;

use super::model::{Baseline, Model, Op, Snap, Stats, World};
use super::{VerifyConfig, VerifyReport, MAX_BASELINES, MAX_INLINE_IO, MAX_IO, PROGRESS_TOTAL, VM_NAME};
use crate::apply::apply_op;
use sim::{SimError, Vm};

/// One random guest write or unmap.
pub(super) fn guest_io(vm: &Vm, rng: &mut ChaCha8Rng, buf: &mut Vec<u8>, stats: &Stats, shadow: Option<&mut Vec<u8>>) {
    let cap = match vm.capacity(0) {
        Ok(c) => c,
        Err(e) => return stats.violation(format!("capacity: {e}")),
    };
    let aligned = rng.gen_ratio(9, 10);
    let len = if aligned {
        512 * rng.gen_range(1..=MAX_IO / 512)
    } else {
        rng.gen_range(1..=8192u64)
    }
    .min(cap);
    let mut off = if rng.gen_ratio(1, 8) {
        // Near the end: after an extend these are writes past the old end.
        cap - len - rng.gen_range(0..=(cap - len).min(64 << 10))
    } else {
        rng.gen_range(0..=cap - len)
    };
    if aligned {
        off &= !511;
    }
    let unmap = rng.gen_ratio(1, 20);
    let seed: u64 = rng.gen();
    let op = if unmap {
        IoOp::Unmap { offset: off, len }
    } else {
        IoOp::Write { offset: off, len, seed }
    };
    match apply_op(vm, 0, &op, buf) {
        Ok(_) => {
            if unmap {
                stats.unmaps.fetch_add(1, Ordering::Relaxed);
            } else {
                stats.writes.fetch_add(1, Ordering::Relaxed);
            }
            if let Some(s) = shadow {
                let r = &mut s[off as usize..(off + len) as usize];
                if unmap {
                    r.fill(0);
                } else {
                    workloads::fill_pattern(seed, off, r);
                }
            }
        }
        Err(SimError::PoweredOff(_)) => {
            stats.expected("powered_off");
            std::thread::sleep(Duration::from_micros(200));
        }
        // A revert shrank the disk between our capacity read and the write.
        Err(SimError::OutOfRange { .. }) if vm.capacity(0).is_ok_and(|c| c < off + len) => {
            stats.expected("out_of_range_after_revert");
        }
        Err(e) => stats.violation(format!("guest I/O of {len} bytes at {off}: {e}")),
    }
}

pub(super) fn writer(world: &World, seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut buf = vec![0u8; MAX_IO as usize];
    while !world.stop.load(Ordering::Relaxed) {
        let g = world.slot.read();
        let Some(vm) = g.as_ref() else { return };
        guest_io(vm, &mut rng, &mut buf, &world.stats, None);
    }
}

/// The lifecycle side of a run.
pub(super) struct Lifecycle<'a> {
    pub(super) cfg: &'a VerifyConfig,
    pub(super) world: &'a World,
    pub(super) model: Model,
    pub(super) rng: ChaCha8Rng,
    pub(super) inline: bool,
    pub(super) buf: Vec<u8>,
    pub(super) op_counts: BTreeMap<String, u64>,
    pub(super) snapshots: u64,
    pub(super) extends_across_pow2: u64,
    pub(super) max_disk_size: u64,
    pub(super) stun: Histogram<u64>,
}

impl Lifecycle<'_> {
    pub(super) fn run_ops(&mut self, start: Instant, progress: &dyn Progress) -> Result<(), SimError> {
        let mut ops = 0u64;
        let mut shown = 0u64;
        loop {
            let elapsed = start.elapsed();
            let by_ops = self.cfg.ops.map(|n| ops as f64 / n.max(1) as f64);
            let by_time = self.cfg.seconds.map(|s| elapsed.as_secs_f64() / s.max(1e-9));
            let fraction = by_ops.into_iter().chain(by_time).fold(0.0f64, f64::max);
            if fraction >= 1.0 || (by_ops.is_none() && by_time.is_none()) || progress.cancelled() {
                return Ok(());
            }
            if self.inline {
                let vm = self.world.vm();
                for _ in 0..self.rng.gen_range(0..=MAX_INLINE_IO) {
                    guest_io(
                        &vm,
                        &mut self.rng,
                        &mut self.buf,
                        &self.world.stats,
                        self.model.shadow.as_mut(),
                    );
                }
            }
            let op = self.choose();
            *self.op_counts.entry(op.name().to_owned()).or_default() += 1;
            self.apply(op)?;
            self.check_listing();
            ops += 1;
            let st = &self.world.stats;
            let at = (fraction.min(1.0) * PROGRESS_TOTAL as f64) as u64;
            progress.advance(at.saturating_sub(shown));
            shown = shown.max(at);
            progress.note(&format!(
                "{ops} ops, {} checks, {} writes, {} violations",
                st.checks.load(Ordering::Relaxed),
                st.writes.load(Ordering::Relaxed) + st.unmaps.load(Ordering::Relaxed),
                st.violations.load(Ordering::Relaxed)
            ));
        }
    }

    fn choose(&mut self) -> Op {
        let m = &self.model;
        let n = m.snaps.len();
        let max_cap = 2 * self.cfg.disk_size;
        let weights = [
            (Op::Create, if n < self.cfg.max_snapshots { 30 } else { 0 }),
            (Op::RemoveNewest, if n > 0 { 6 } else { 0 }),
            (Op::RemoveMiddle, if n > 2 { 6 } else { 0 }),
            (Op::RemoveOldest, if n > 1 { 6 } else { 0 }),
            (Op::Revert, if n > 0 { 5 } else { 0 }),
            (Op::Extend, if m.capacity + 512 <= max_cap { 6 } else { 0 }),
            (Op::CbtOff, if m.cbt { 2 } else { 0 }),
            (Op::CbtOn, if m.cbt { 0 } else { 20 }),
            (Op::PowerCycle, 3),
            (Op::Restart, 3),
            (Op::Crash, 1),
            (Op::Recheck, if n > 0 { 8 } else { 0 }),
        ];
        let total: u32 = weights.iter().map(|w| w.1).sum();
        let mut r = self.rng.gen_range(0..total);
        for (op, w) in weights {
            if r < w {
                return op;
            }
            r -= w;
        }
        unreachable!("r < total")
    }

    fn apply(&mut self, op: Op) -> Result<(), SimError> {
        match op {
            Op::Create => self.create(),
            Op::RemoveNewest => self.remove(self.model.snaps.len() - 1),
            Op::RemoveOldest => self.remove(0),
            Op::RemoveMiddle => {
                let i = self.rng.gen_range(1..self.model.snaps.len() - 1);
                self.remove(i)
            }
            Op::Revert => {
                let i = self.rng.gen_range(0..self.model.snaps.len());
                self.revert(i)
            }
            Op::Extend => self.extend(),
            Op::CbtOff | Op::CbtOn => {
                let on = op == Op::CbtOn;
                if let Err(e) = self.world.vm().set_cbt(on) {
                    self.world
                        .stats
                        .violation(format!("CBT {}: {e}", if on { "on" } else { "off" }));
                    return Ok(());
                }
                self.model.cbt = on;
                if on {
                    self.new_session();
                }
                Ok(())
            }
            Op::PowerCycle => self.power_cycle(),
            Op::Restart => self.reopen(false),
            // A killed process loses no mark: tracking resumes in the same
            // session, every change ID exact (DESIGN.md, the crash protocol).
            Op::Crash => self.reopen(true),
            Op::Recheck => {
                let i = self.rng.gen_range(0..self.model.snaps.len());
                self.recheck(i);
                Ok(())
            }
        }
    }

    pub(super) fn new_session(&mut self) {
        self.model.session += 1;
        self.model.session_uuid = None;
    }

    pub(super) fn violation(&self, msg: String) {
        self.world.stats.violation(msg);
    }

    /// Reads a whole snapshot disk.
    pub(super) fn image(&self, vm: &Vm, snap: &str) -> Result<Vec<u8>, SimError> {
        let cap = vm.snapshot_capacity(snap, 0)?;
        let mut buf = vec![0u8; cap as usize];
        vm.read_snapshot(snap, 0, 0, &mut buf)?;
        Ok(buf)
    }

    pub(super) fn create(&mut self) -> Result<(), SimError> {
        let vm = self.world.vm();
        let order = self.model.next_order;
        self.model.next_order += 1;
        let name = format!("s{order}");
        let info = match vm.create_snapshot(&name) {
            Ok(i) => i,
            Err(e) => {
                self.violation(format!("create {name}: {e}"));
                return Ok(());
            }
        };
        self.snapshots += 1;
        let cid = info.disks[0].change_id.clone();
        if cid.is_some() != self.model.cbt {
            self.violation(format!(
                "snapshot {name}: change ID {cid:?} with CBT {}",
                self.model.cbt
            ));
        }
        if let Some(c) = &cid {
            self.check_session(&name, c);
        }
        if info.disks[0].capacity != self.model.capacity {
            self.violation(format!(
                "snapshot {name}: capacity {} where the model has {}",
                info.disks[0].capacity, self.model.capacity
            ));
        }
        let image = Arc::new(self.image(&vm, &name)?);
        if let Some(shadow) = &self.model.shadow {
            self.world.stats.data_checks.fetch_add(1, Ordering::Relaxed);
            if shadow[..] != image[..] {
                let at = shadow.iter().zip(image.iter()).position(|(a, b)| a != b);
                self.violation(format!("snapshot {name} differs from the exact model at {at:?}"));
            }
        }
        let snap = Snap {
            name: name.clone(),
            order,
            session: self.model.session,
            cid: cid.clone(),
            image: image.clone(),
        };
        drop(vm);
        self.check_all_allocated(&snap);
        let baselines: Vec<Baseline> = self.model.baselines.iter().cloned().collect();
        for b in &baselines {
            self.check_pair(&snap, b);
        }
        if let Some(c) = cid {
            let b = Baseline {
                name,
                order,
                session: self.model.session,
                cid: c,
                image,
            };
            self.check_pair(&snap, &b);
            self.model.baselines.push_back(b);
            if self.model.baselines.len() > MAX_BASELINES {
                self.model.baselines.pop_front();
            }
        }
        self.model.snaps.push(snap);
        Ok(())
    }

    fn remove(&mut self, i: usize) -> Result<(), SimError> {
        let name = self.model.snaps[i].name.clone();
        if let Err(e) = self.world.vm().remove_snapshot(&name) {
            self.violation(format!("remove {name}: {e}"));
            return Ok(());
        }
        self.model.snaps.remove(i);
        Ok(())
    }

    fn revert(&mut self, i: usize) -> Result<(), SimError> {
        let target = self.model.snaps[i].clone();
        // A real host reverts a stopped VM: pause the writers.
        let g = self.world.slot.write();
        let vm = g.as_ref().expect("the VM is open");
        if let Err(e) = vm.revert_to_snapshot(&target.name) {
            self.violation(format!("revert to {}: {e}", target.name));
            return Ok(());
        }
        self.model.snaps.truncate(i + 1);
        self.model.capacity = target.image.len() as u64;
        if let Some(s) = &mut self.model.shadow {
            s.clone_from(&target.image);
        }
        let mut live = vec![0u8; target.image.len()];
        match vm.capacity(0).and_then(|c| {
            if c != live.len() as u64 {
                self.violation(format!("after revert to {}: capacity {c}", target.name));
            }
            vm.read(0, 0, &mut live)
        }) {
            Ok(()) => {
                self.world.stats.data_checks.fetch_add(1, Ordering::Relaxed);
                if live[..] != target.image[..] {
                    self.violation(format!("after revert to {} the live disk differs from it", target.name));
                }
            }
            Err(e) => self.violation(format!("read after revert to {}: {e}", target.name)),
        }
        Ok(())
    }

    fn extend(&mut self) -> Result<(), SimError> {
        let cur = self.model.capacity;
        let max = 2 * self.cfg.disk_size;
        let mut new = if self.rng.gen_ratio(1, 3) {
            // Just past the next power of two.
            (cur + 1).next_power_of_two() + 512 * self.rng.gen_range(0..4)
        } else {
            self.rng.gen_range(cur + 512..=max)
        };
        new = (new.min(max) / 512) * 512;
        if new <= cur {
            new = cur + 512;
        }
        if let Err(e) = self.world.vm().extend_disk(0, new) {
            self.violation(format!("extend {cur} -> {new}: {e}"));
            return Ok(());
        }
        if (cur + 1).next_power_of_two() <= new {
            self.extends_across_pow2 += 1;
        }
        self.model.capacity = new;
        self.max_disk_size = self.max_disk_size.max(new);
        if let Some(s) = &mut self.model.shadow {
            s.resize(new as usize, 0);
        }
        Ok(())
    }

    fn power_cycle(&mut self) -> Result<(), SimError> {
        let vm = self.world.vm();
        if let Err(e) = vm.set_power(false) {
            self.violation(format!("power off: {e}"));
            return Ok(());
        }
        match vm.write(0, 0, &[1]) {
            Err(SimError::PoweredOff(_)) => self.world.stats.expected("powered_off"),
            r => self.violation(format!("a write while powered off gave {r:?}")),
        }
        drop(vm);
        if self.rng.gen_ratio(1, 3) {
            self.reopen(false)?;
        }
        if let Err(e) = self.world.vm().set_power(true) {
            self.violation(format!("power on: {e}"));
        }
        Ok(())
    }

    /// Closes the VM (cleanly, or as a crash would) and opens it again from
    /// the datastore, with the writers paused.
    fn reopen(&mut self, crash: bool) -> Result<(), SimError> {
        let world = self.world;
        let mut g = world.slot.write();
        let mut vm = g.take().expect("the VM is open");
        drop(world.host.close_vm(VM_NAME));
        self.stun.add(crate::drive::stun_histogram(&vm)).ok();
        let deadline = Instant::now() + Duration::from_secs(30);
        let vm = loop {
            match Arc::try_unwrap(vm) {
                Ok(v) => break v,
                Err(a) if Instant::now() < deadline => {
                    vm = a;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(_) => {
                    world.stop.store(true, Ordering::Relaxed);
                    return Err(SimError::VmInUse(VM_NAME.into()));
                }
            }
        };
        if crash {
            vm.crash();
        } else {
            drop(vm);
        }
        let vm = match world.host.vm(VM_NAME) {
            Ok(v) => v,
            Err(e) => {
                world.stop.store(true, Ordering::Relaxed);
                return Err(e);
            }
        };
        vm.set_max_areas(self.cfg.max_areas);
        *g = Some(vm);
        Ok(())
    }

    /// The VM's snapshots and their change IDs are what the model says.
    fn check_listing(&mut self) {
        let listed = self.world.vm().snapshots();
        let names: Vec<&str> = listed.iter().map(|s| s.name.as_str()).collect();
        let model: Vec<&str> = self.model.snaps.iter().map(|s| s.name.as_str()).collect();
        if names != model {
            self.violation(format!("snapshots {names:?} where the model has {model:?}"));
            return;
        }
        for (l, s) in listed.iter().zip(&self.model.snaps) {
            let want = (self.model.cbt && s.session == self.model.session)
                .then(|| s.cid.clone())
                .flatten();
            if l.disks[0].change_id != want {
                self.violation(format!(
                    "snapshot {}: change ID {:?} where the model has {want:?}",
                    s.name, l.disks[0].change_id
                ));
            }
        }
    }

    pub(super) fn report(&self, elapsed: Duration) -> VerifyReport {
        let st = &self.world.stats;
        let expected = st.expected.lock().clone();
        let us = |ns: u64| ns as f64 / 1000.0;
        VerifyReport {
            ops: self.op_counts.values().sum(),
            snapshots: self.snapshots,
            checks: st.checks.load(Ordering::Relaxed),
            missed_blocks: st.missed_blocks.load(Ordering::Relaxed),
            query_pages: st.query_pages.load(Ordering::Relaxed),
            multi_page_answers: st.multi_page_answers.load(Ordering::Relaxed),
            extra_bytes: st.extra_bytes.load(Ordering::Relaxed),
            writes: st.writes.load(Ordering::Relaxed),
            unmaps: st.unmaps.load(Ordering::Relaxed),
            expected_errors: expected.values().sum(),
            expected,
            violations: st.violations.load(Ordering::Relaxed),
            violation_messages: st.messages.lock().clone(),
            op_counts: self.op_counts.clone(),
            frozen_checks: st.frozen_checks.load(Ordering::Relaxed),
            data_checks: st.data_checks.load(Ordering::Relaxed),
            extends_across_pow2: self.extends_across_pow2,
            disk_size: self.cfg.disk_size,
            max_disk_size: self.max_disk_size,
            granularity: self.cfg.granularity.bytes(),
            threads: if self.inline { 0 } else { self.cfg.threads },
            seed: self.cfg.seed,
            seconds: elapsed.as_secs_f64(),
            stuns: self.stun.len(),
            stun_p50_us: us(self.stun.value_at_quantile(0.5)),
            stun_p99_us: us(self.stun.value_at_quantile(0.99)),
            stun_max_us: us(self.stun.max()),
            interrupted: false,
            passed: st.violations.load(Ordering::Relaxed) == 0 && st.missed_blocks.load(Ordering::Relaxed) == 0,
        }
    }
}
