//! `cbtsim guest run VM --real ext4|xfs|postgres`: a real guest on an attached disk,
//! backed up while it writes, every point restored and checked (`service::real`).

use anyhow::{bail, Context as _};
use backup::Progress;
use service::real::{self, FsKind, RealKind, RealReport, RealRun};
use workloads::human;

use super::progress::{catch_interrupts, interrupted};
use super::workload::GuestRunArgs;
use super::Ctx;

/// The run's steps as lines on stderr; Ctrl-C stops it.
struct Notes;

impl Progress for Notes {
    fn note(&self, note: &str) {
        eprintln!("cbtsim: {note}");
    }

    fn cancelled(&self) -> bool {
        interrupted()
    }
}

/// Runs `cbtsim guest run VM --real KIND`.
pub fn run(ctx: &Ctx, a: &GuestRunArgs, kind: RealKind) -> anyhow::Result<()> {
    let Some(datastore) = &ctx.datastore else {
        bail!("no datastore: pass --datastore DIR or set CBTSIM_DATASTORE");
    };
    let Some(repo) = &a.repo else {
        bail!("--real needs --repo DIR: the backups go there");
    };
    if kind != RealKind::Postgres {
        if let Some(flag) = [("--pg-user", a.pg_user.is_some()), ("--scale", a.scale.is_some())]
            .iter()
            .find_map(|(f, given)| given.then_some(f))
        {
            bail!("{flag} is for --real postgres");
        }
    }
    let fs = match (kind, a.fs) {
        (RealKind::Postgres, fs) => fs.unwrap_or(FsKind::Ext4),
        (RealKind::Ext4, None | Some(FsKind::Ext4)) => FsKind::Ext4,
        (RealKind::Xfs, None | Some(FsKind::Xfs)) => FsKind::Xfs,
        (_, Some(fs)) => bail!(
            "--fs {} is for --real postgres (--real ext4 and xfs are their own file system)",
            fs.name()
        ),
    };
    let tmp;
    let work_dir = match &a.work_dir {
        Some(d) => d.clone(),
        None => {
            tmp = tempfile::Builder::new()
                .prefix("cbtsim-real-")
                .tempdir()
                .context("cannot create a work directory")?;
            tmp.path().to_owned()
        }
    };
    let run = RealRun {
        datastore: datastore.clone(),
        vm: a.vm.clone(),
        disk: a.disk,
        kind,
        fs,
        seconds: a.seconds.unwrap_or(60.0),
        backup_every: a.backup_every.unwrap_or(10.0),
        repository: repo.clone(),
        work_dir,
        writers: a.threads,
        seed: a.seed,
        pg_user: a.pg_user.clone().unwrap_or_else(|| real::DEFAULT_PG_USER.to_owned()),
        pg_scale: a.scale.unwrap_or(1),
    };
    // Caught before anything starts: Ctrl-C stops the work and cleans up.
    catch_interrupts()?;
    let r = real::run(&run, &Notes)?;
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        print(&r, a.work_dir.is_some());
    }
    if !r.ok {
        bail!(
            "{} check(s) failed on the restored points: {}",
            r.problems.len(),
            r.problems.first().map_or("", |p| p.lines().next().unwrap_or(""))
        );
    }
    Ok(())
}

fn opt_human(v: Option<u64>) -> String {
    v.map_or_else(|| "-".to_owned(), human)
}

fn ratio(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_owned(), |x| format!("{x:.2}x"))
}

fn print(r: &RealReport, kept: bool) {
    let what = match r.kind {
        RealKind::Postgres => format!("postgres on {}", r.fs.name()),
        _ => r.fs.name().to_owned(),
    };
    println!(
        "real guest {what} on disk {} of VM {} ({}, {}, tracked at {}): {:.0} s of work, a backup every {:.0} s",
        r.disk,
        r.vm,
        r.device.display(),
        human(r.capacity),
        human(r.granularity),
        r.seconds,
        r.backup_every
    );
    let w = &r.work;
    match &w.pgbench {
        Some(p) => println!(
            "  pgbench: {} client(s), scale {}: {} transactions committed ({:.0}/s), {} failed",
            p.clients, p.scale, p.transactions, p.tps, p.failed
        ),
        None => println!(
            "  files: {} written and fsynced ({}), {} deleted; fio: {} in {} writes",
            w.files_written,
            human(w.file_bytes_written),
            w.files_deleted,
            opt_human(w.fio_bytes_written),
            w.fio_writes.unwrap_or(0)
        ),
    }
    println!(
        "  {:<9} {:<11} {:>6} {:>10} {:>10} {:>10} {:>10}  CHECKS",
        "POINT", "KIND", "AT s", "CHANGED", "READ", "STORED", "DIFFERING"
    );
    for p in &r.points {
        let mut checks = vec![if p.fsck_ok { "fsck clean" } else { "fsck FAILED" }.to_owned()];
        if let (Some(n), Some(bad)) = (p.files_checked, p.files_bad) {
            checks.push(format!("{} of {n} files ok", n - bad));
        }
        if let Some(db) = &p.database {
            checks.push(format!(
                "db up in {:.1} s, amcheck {}, balances {}, {} rows >= {} acked",
                db.start_s,
                if db.amcheck_ok { "ok" } else { "FAILED" },
                if db.balances_agree { "agree" } else { "DISAGREE" },
                db.ledger_rows,
                db.acked_before_backup
            ));
        } else if r.kind == RealKind::Postgres {
            checks.push("db FAILED".into());
        }
        println!(
            "  {:<9} {:<11} {:>6.1} {:>10} {:>10} {:>10} {:>10}  {}",
            p.point,
            p.kind,
            p.at_s,
            human(p.changed_bytes),
            human(p.bytes_read),
            human(p.bytes_stored),
            opt_human(p.differing_bytes),
            checks.join(", ")
        );
    }
    let f = &r.figures;
    if f.incrementals > 0 {
        println!("  figures over {} incremental(s):", f.incrementals);
        println!(
            "    per minute: {} reported changed at {}, {} read by the backup (64 KiB chunks), {} stored",
            opt_human(f.changed_bytes_per_minute.map(|v| v as u64)),
            human(r.granularity),
            opt_human(f.read_bytes_per_minute.map(|v| v as u64)),
            opt_human(f.stored_bytes_per_minute.map(|v| v as u64))
        );
        if let Some(t) = f.transactions {
            println!(
                "    per pgbench transaction ({t} committed): {} reported changed, {} read",
                opt_human(f.changed_bytes_per_transaction.map(|v| v as u64)),
                opt_human(f.read_bytes_per_transaction.map(|v| v as u64))
            );
        }
        println!(
            "    truly different between points: {} ({} in 4 KiB blocks, {} in 64 KiB blocks)",
            human(f.differing_bytes),
            human(f.differing_4k_bytes),
            human(f.differing_64k_bytes)
        );
        println!(
            "    over-report: {} at {}, {} at 64 KiB",
            ratio(f.over_report),
            human(r.granularity),
            ratio(f.over_report_64k)
        );
    }
    if r.ok {
        println!("  every check passed");
    } else {
        for p in &r.problems {
            println!("  PROBLEM: {p}");
        }
    }
    if kept {
        println!("  logs, checksums and the last checked image: {}", r.work_dir.display());
    }
}
