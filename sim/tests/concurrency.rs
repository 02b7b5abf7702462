//! Writers on several threads while another thread takes, compares and
//! removes snapshots: every byte that differs between two frozen views lies
//! inside the areas reported between their change IDs.

mod common;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use common::*;
use rand::{Rng, SeedableRng};

fn run(granularity: u64, writers: usize, total_writes: u64, min_checks: u32) {
    let (_d, host) = host();
    let cap = 32 * MIB;
    let vm = host.create_vm("vm", &[spec(cap, granularity)]).unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let mut threads: Vec<_> = (0..writers)
        .map(|t| {
            let (vm, done, written) = (vm.clone(), done.clone(), written.clone());
            std::thread::spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(t as u64);
                let mut buf = vec![0u8; 16 * 1024];
                let mut i = 0u64;
                while !done.load(Ordering::Relaxed) {
                    i += 1;
                    let len = rng.gen_range(1..=8192u64);
                    let off = rng.gen_range(0..=cap - len);
                    let fill = (t as u8) ^ (i as u8) | 1;
                    buf[..len as usize].fill(fill);
                    if rng.gen_ratio(1, 50) {
                        vm.unmap(0, off, len).unwrap();
                    } else {
                        vm.write(0, off, &buf[..len as usize]).unwrap();
                    }
                    written.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();

    let mut rng = rand::rngs::StdRng::seed_from_u64(99);
    let s0 = vm.create_snapshot("s0").unwrap();
    let mut prev_img = image(&vm, "s0", 0);
    let mut prev_cid = s0.disks[0].change_id.clone().unwrap();
    let mut prev_name = "s0".to_string();
    let mut kept = vec!["s0".to_string()];
    let (mut checks, mut i) = (0, 0);
    loop {
        let finished = written.load(Ordering::Relaxed) >= total_writes && checks >= min_checks;
        if finished {
            done.store(true, Ordering::Relaxed);
            for t in threads.drain(..) {
                t.join().unwrap();
            }
        }
        i += 1;
        let name = format!("s{i}");
        let info = vm.create_snapshot(&name).unwrap();
        let img = image(&vm, &name, 0);
        let reported = areas(&vm, &name, 0, &prev_cid);
        let missed = missed_bytes(&prev_img, &img, &reported);
        assert_eq!(
            missed, 0,
            "snapshot {name}: {missed} changed bytes not reported since {prev_name}"
        );
        // `*` covers every non-zero byte.
        let all = areas(&vm, &name, 0, "*");
        assert_eq!(
            missed_bytes(&vec![0; img.len()], &img, &all),
            0,
            "`*` misses data at {name}"
        );
        checks += 1;
        // Remove snapshots in varied orders: the newest (consolidating the
        // live delta while writers write), the previous one (a middle
        // delta), or keep it for a while.
        match rng.gen_range(0..3) {
            0 => vm.remove_snapshot(&name).unwrap(),
            1 => {
                kept.push(name.clone());
                if kept.len() > 1 {
                    let victim = kept.remove(rng.gen_range(0..kept.len() - 1));
                    vm.remove_snapshot(&victim).unwrap();
                }
            }
            _ => {
                kept.push(name.clone());
                while kept.len() > 4 {
                    vm.remove_snapshot(&kept.remove(0)).unwrap();
                }
            }
        }
        prev_img = img;
        prev_cid = info.disks[0].change_id.clone().unwrap();
        prev_name = name;
        if finished {
            break;
        }
    }
    assert!(written.load(Ordering::Relaxed) >= total_writes);
    let mut stun = vm.stun_times_ns();
    stun.sort_unstable();
    let q = |p: f64| stun[((stun.len() - 1) as f64 * p) as usize] / 1000;
    eprintln!(
        "granularity {granularity}: {} writes, {checks} checks, chain {} layers, stun p50 {} us p99 {} us max {} us",
        written.load(Ordering::Relaxed),
        vm.chain_len(0).unwrap(),
        q(0.5),
        q(0.99),
        q(1.0)
    );
}

#[test]
fn a_million_writes_against_snapshots_and_consolidation_64k() {
    run(64 * 1024, 3, 1_000_000, 30);
}

#[test]
fn concurrent_writes_at_fine_granularity_4k() {
    run(4 * 1024, 2, 200_000, 15);
}
