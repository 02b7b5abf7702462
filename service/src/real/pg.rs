//! The PostgreSQL work: a cluster made with `initdb` on the mounted disk,
//! `pgbench -i`, then pgbench with a script that also writes a ledger row
//! per transaction, while the schedule backs the disk up; and the check of a
//! restored point's database.
//!
//! The server and `initdb` run as an unprivileged user (they refuse root)
//! through `runuser`; the clients (psql, pgbench, pg_amcheck) run as this
//! process and connect over a Unix socket in the work directory (trust
//! authentication, no TCP).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use backup::Progress;

use super::sys::{self, ChildGuard};
use super::{as_user, schedule, Clock, DbCheck, PgbenchReport, RealError, RealRun, Taken, WorkReport};

/// The programs a run uses, all from one PostgreSQL installation.
const PROGRAMS: [&str; 6] = ["initdb", "pg_ctl", "postgres", "pgbench", "psql", "pg_amcheck"];
/// The ports (socket names) of the live server and of a check's.
const PORT: u16 = 5432;
const CHECK_PORT: u16 = 5433;
/// The server's settings beyond the defaults (durability settings stay at
/// theirs: fsync, synchronous_commit and full_page_writes on). Checkpoints
/// every 30 s, so that a run of a minute or two shows them.
const SETTINGS: &str = "\n# cbtsim real guest\nshared_buffers = 32MB\ncheckpoint_timeout = 30s\nmax_wal_size = 128MB\nmin_wal_size = 32MB\n";

/// pgbench's TPC-B-like transaction, plus one ledger row naming its client.
const SCRIPT: &str = "\\set aid random(1, 100000 * :scale)
\\set bid random(1, 1 * :scale)
\\set tid random(1, 10 * :scale)
\\set delta random(-5000, 5000)
BEGIN;
UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid;
SELECT abalance FROM pgbench_accounts WHERE aid = :aid;
UPDATE pgbench_tellers SET tbalance = tbalance + :delta WHERE tid = :tid;
UPDATE pgbench_branches SET bbalance = bbalance + :delta WHERE bid = :bid;
INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (:tid, :bid, :aid, :delta, CURRENT_TIMESTAMP);
INSERT INTO ledger (client) VALUES (:client_id);
END;
";

/// The directory of a PostgreSQL installation's programs.
#[derive(Debug)]
pub(crate) struct Bins {
    dir: PathBuf,
}

impl Bins {
    /// `pg_config --bindir`, else the newest /usr/lib/postgresql/*/bin,
    /// holding every program a run uses; or why there is none.
    pub(crate) fn find() -> Result<Bins, String> {
        let mut candidates: Vec<PathBuf> = Vec::new();
        if let Some(pg_config) = sys::find_tool("pg_config") {
            if let Ok(out) = Command::new(pg_config).arg("--bindir").output() {
                let dir = String::from_utf8_lossy(&out.stdout).trim().to_owned();
                if out.status.success() && !dir.is_empty() {
                    candidates.push(dir.into());
                }
            }
        }
        let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let v = e.file_name().to_string_lossy().parse::<u32>().ok()?;
                Some((v, e.path().join("bin")))
            })
            .collect();
        versions.sort_by_key(|v| std::cmp::Reverse(v.0));
        candidates.extend(versions.into_iter().map(|(_, d)| d));
        let mut partial = Vec::new();
        for dir in candidates {
            let missing: Vec<&str> = PROGRAMS.iter().copied().filter(|p| !dir.join(p).is_file()).collect();
            if missing.is_empty() {
                return Ok(Bins { dir });
            }
            if missing.len() < PROGRAMS.len() {
                partial.push(format!("{} lacks {}", dir.display(), missing.join(", ")));
            }
        }
        let mut why = "PostgreSQL is not installed (apt-get install postgresql)".to_owned();
        if !partial.is_empty() {
            why = format!("{why}: {}", partial.join("; "));
        }
        Err(why)
    }

    fn tool(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// A PostgreSQL server of this run; stopped (immediately) when dropped.
struct Server<'a> {
    bins: &'a Bins,
    user: &'a str,
    /// Where the user's commands run (a directory it can enter).
    work: &'a Path,
    data: PathBuf,
    /// The socket's directory: a short path of its own (a socket's path is
    /// limited to about 100 bytes).
    sock: tempfile::TempDir,
    port: u16,
    log: PathBuf,
    running: bool,
}

impl<'a> Server<'a> {
    /// A server over data directory `data`, its socket in a new directory
    /// of the user's and its log at `log`.
    fn new(
        bins: &'a Bins,
        user: &'a str,
        ids: (u32, u32),
        work: &'a Path,
        data: PathBuf,
        port: u16,
        log: PathBuf,
    ) -> Result<Self, RealError> {
        let sock = tempfile::Builder::new()
            .prefix("cbtsim-pg-")
            .tempdir_in("/tmp")
            .map_err(|e| RealError::io("cannot create a socket directory in /tmp", e))?;
        sys::chown(sock.path(), ids)?;
        std::fs::write(&log, "").map_err(|e| RealError::io(format!("cannot create {}", log.display()), e))?;
        sys::chown(&log, ids)?;
        Ok(Server {
            bins,
            user,
            work,
            data,
            sock,
            port,
            log,
            running: false,
        })
    }

    fn pg_ctl(&self) -> Command {
        let mut c = as_user(self.user, self.work, &self.bins.tool("pg_ctl"));
        c.arg("-D").arg(&self.data);
        c
    }

    /// Starts it and waits until it accepts connections (after a crash
    /// recovery, where one is needed); the seconds that took.
    fn start(&mut self) -> Result<f64, RealError> {
        let started = Instant::now();
        let opts = format!(
            "-c listen_addresses='' -c unix_socket_directories='{}' -c port={}",
            self.sock.path().display(),
            self.port
        );
        // Marked first: a start that times out may leave it running.
        self.running = true;
        let r = sys::run_status(
            "starting PostgreSQL",
            self.pg_ctl()
                .arg("-l")
                .arg(&self.log)
                .args(["-w", "-t", "300", "-o", &opts, "start"]),
        )?;
        if !r.0 {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            return Err(RealError::failed(
                "starting PostgreSQL",
                format!("{}\nits log:\n{}", sys::tail(&r.1, 4), sys::tail(&log, 12)),
            ));
        }
        Ok(started.elapsed().as_secs_f64())
    }

    /// Stops it cleanly (a fast shutdown: a checkpoint, then exit).
    fn stop(&mut self) -> Result<(), RealError> {
        sys::run(
            "stopping PostgreSQL",
            self.pg_ctl().args(["-m", "fast", "-w", "-t", "300", "stop"]),
        )?;
        self.running = false;
        Ok(())
    }

    /// A client program with the connection arguments.
    fn client(&self, program: &str) -> Command {
        let mut c = Command::new(self.bins.tool(program));
        c.arg("-h")
            .arg(self.sock.path())
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-U")
            .arg(self.user)
            .current_dir(self.work)
            .env("LC_ALL", "C");
        c
    }

    /// Runs `sql` with psql; its unaligned output.
    fn psql(&self, sql: &str) -> Result<String, RealError> {
        sys::run(
            "psql",
            self.client("psql")
                .args(["-AtX", "-v", "ON_ERROR_STOP=1", "-d", "postgres", "-c", sql]),
        )
    }
}

impl Drop for Server<'_> {
    fn drop(&mut self) {
        if self.running {
            let _ = self
                .pg_ctl()
                .args(["-m", "immediate", "-w", "-t", "60", "stop"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

/// The transactions pgbench reported committed, per client: their
/// completion times (microseconds since the Unix epoch), in order.
#[derive(Debug, Default)]
pub(crate) struct Ledger {
    per_client: BTreeMap<u32, Vec<u64>>,
    failed: u64,
}

impl Ledger {
    /// Reads pgbench's per-transaction logs (`PREFIX.PID[.THREAD]`): `client
    /// txn latency script epoch_s epoch_us ...`; a latency that is not a
    /// number is a failed or skipped transaction.
    fn read(work: &Path, prefix: &str) -> Result<Ledger, RealError> {
        let mut l = Ledger::default();
        let dir = std::fs::read_dir(work).map_err(|e| RealError::io(format!("cannot list {}", work.display()), e))?;
        let mut files = 0;
        for e in dir.flatten() {
            if !e.file_name().to_string_lossy().starts_with(&format!("{prefix}.")) {
                continue;
            }
            files += 1;
            let text = std::fs::read_to_string(e.path())
                .map_err(|err| RealError::io(format!("cannot read {}", e.path().display()), err))?;
            for line in text.lines() {
                let f: Vec<&str> = line.split_whitespace().collect();
                let parsed = (|| -> Option<(u32, bool, u64)> {
                    let client = f.first()?.parse().ok()?;
                    let ok = f.get(2)?.parse::<f64>().is_ok();
                    let s: u64 = f.get(4)?.parse().ok()?;
                    let us: u64 = f.get(5)?.parse().ok()?;
                    Some((client, ok, s * 1_000_000 + us))
                })();
                match parsed {
                    Some((c, true, t)) => l.per_client.entry(c).or_default().push(t),
                    Some((_, false, _)) => l.failed += 1,
                    None => {
                        return Err(RealError::failed(
                            "reading pgbench's log",
                            format!("{}: unexpected line {line:?}", e.path().display()),
                        ))
                    }
                }
            }
        }
        if files == 0 {
            return Err(RealError::failed("reading pgbench's log", "pgbench wrote no log"));
        }
        for v in l.per_client.values_mut() {
            v.sort_unstable();
        }
        Ok(l)
    }

    /// Transactions committed, all clients.
    pub(crate) fn total(&self) -> u64 {
        self.per_client.values().map(|v| v.len() as u64).sum()
    }

    /// Client `c`'s transactions reported committed before `t_us`.
    fn acked_before(&self, c: u32, t_us: u64) -> u64 {
        self.per_client
            .get(&c)
            .map_or(0, |v| v.partition_point(|&t| t < t_us) as u64)
    }

    /// Transactions (all clients) reported committed in `[a_us, b_us)`.
    pub(crate) fn between(&self, a_us: u64, b_us: u64) -> u64 {
        self.per_client
            .values()
            .map(|v| (v.partition_point(|&t| t < b_us) - v.partition_point(|&t| t < a_us)) as u64)
            .sum()
    }
}

/// The PostgreSQL work with the backup schedule.
pub(crate) fn work(
    r: &RealRun,
    mnt: &Path,
    work: &Path,
    progress: &dyn Progress,
) -> Result<(Vec<Taken>, WorkReport, Ledger), RealError> {
    let bins = Bins::find().map_err(RealError::Unsupported)?;
    let user = r.pg_user.as_str();
    let ids = sys::user_ids(user).ok_or_else(|| RealError::Unsupported(format!("user {user:?} does not exist")))?;
    let data = mnt.join("pgdata");
    sys::mkdir(&data)?;
    sys::chown(&data, ids)?;
    sys::chmod(&data, 0o700)?;
    let (reach, _) = sys::run_status(
        "checking the work directory",
        as_user(
            user,
            Path::new("/"),
            &sys::find_tool("test").unwrap_or_else(|| "test".into()),
        )
        .arg("-w")
        .arg(&data),
    )?;
    if !reach {
        return Err(RealError::Unsupported(format!(
            "user {user} cannot reach {}: every directory above the work directory must be searchable by it (chmod o+x), or give --work-dir under /tmp",
            data.display()
        )));
    }
    progress.note(&format!(
        "initdb as user {user} on {} ({})",
        data.display(),
        bins.dir.display()
    ));
    sys::run(
        "initdb",
        as_user(user, work, &bins.tool("initdb")).arg("-D").arg(&data).args([
            "-A",
            "trust",
            "-U",
            user,
            "--locale=C",
            "-E",
            "UTF8",
            "--no-instructions",
        ]),
    )?;
    let conf = data.join("postgresql.conf");
    let mut text =
        std::fs::read_to_string(&conf).map_err(|e| RealError::io(format!("cannot read {}", conf.display()), e))?;
    text.push_str(SETTINGS);
    std::fs::write(&conf, text).map_err(|e| RealError::io(format!("cannot write {}", conf.display()), e))?;
    let mut server = Server::new(&bins, user, ids, work, data, PORT, work.join("postgres.log"))?;
    server.start()?;
    progress.note(&format!("pgbench -i -s {}", r.pg_scale));
    sys::run(
        "pgbench -i",
        server
            .client("pgbench")
            .args(["-i", "-q", "-s", &r.pg_scale.to_string(), "postgres"]),
    )?;
    server.psql("CREATE TABLE ledger (id bigserial PRIMARY KEY, client int NOT NULL, at timestamptz NOT NULL DEFAULT clock_timestamp())")?;
    let script = work.join("ledger.sql");
    std::fs::write(&script, SCRIPT).map_err(|e| RealError::io(format!("cannot write {}", script.display()), e))?;
    let seconds = r.seconds.ceil() as u64;
    progress.note(&format!(
        "pgbench: {} client(s) for {seconds} s (TPC-B-like + a ledger row per transaction), a backup every {} s",
        r.writers, r.backup_every
    ));
    let prefix = "pgbench-log";
    let pgbench = ChildGuard::spawn(
        "pgbench",
        server
            .client("pgbench")
            .args([
                "-n",
                "-j",
                "1",
                "-c",
                &r.writers.to_string(),
                "-T",
                &seconds.to_string(),
            ])
            .arg("-f")
            .arg(&script)
            .arg("-l")
            .arg(format!("--log-prefix={}", work.join(prefix).display()))
            .arg("postgres"),
        &work.join("pgbench.out"),
        &work.join("pgbench.err"),
    )?;
    let clock = Clock { t0: Instant::now() };
    let taken = schedule(r, &clock, &AtomicBool::new(false), progress)?;
    let ok = pgbench.wait(Duration::from_secs(seconds + 120))?;
    let out = std::fs::read_to_string(work.join("pgbench.out")).unwrap_or_default();
    if !ok {
        let err = std::fs::read_to_string(work.join("pgbench.err")).unwrap_or_default();
        return Err(RealError::failed("pgbench", sys::tail(&format!("{out}\n{err}"), 12)));
    }
    progress.note("pgbench done: stopping PostgreSQL");
    server.stop()?;
    let ledger = Ledger::read(work, prefix)?;
    let tps = out
        .lines()
        .find_map(|l| l.strip_prefix("tps = "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    let report = WorkReport {
        pgbench: Some(PgbenchReport {
            clients: r.writers,
            scale: r.pg_scale,
            transactions: ledger.total(),
            tps,
            failed: ledger.failed,
        }),
        ..WorkReport::default()
    };
    progress.note(&format!(
        "pgbench committed {} transactions ({tps:.0}/s), {} failed",
        ledger.total(),
        ledger.failed
    ));
    Ok((taken, report, ledger))
}

/// Checks the database of a restored point mounted at `mnt`: PostgreSQL
/// starts on it (crash recovery), pg_amcheck passes, the balances agree and
/// the ledger holds every transaction acknowledged before the backup was
/// asked for. Returns the check and its problems (a server that does not
/// start is a problem, not an error).
pub(crate) fn check(
    r: &RealRun,
    mnt: &Path,
    work: &Path,
    point: &str,
    taken: &Taken,
    ledger: &Ledger,
) -> Result<(Option<DbCheck>, Vec<String>), RealError> {
    let bins = Bins::find().map_err(RealError::Unsupported)?;
    let user = r.pg_user.as_str();
    let ids = sys::user_ids(user).ok_or_else(|| RealError::Unsupported(format!("user {user:?} does not exist")))?;
    let data = mnt.join("pgdata");
    let mut problems = Vec::new();
    if !data.join("PG_VERSION").is_file() {
        problems.push(format!(
            "the restored file system has no database cluster at {}",
            data.display()
        ));
        return Ok((None, problems));
    }
    // The lock file of the server that ran at the snapshot: a restore removes
    // it (as pg_basebackup leaves it out), since its PID means nothing here.
    let _ = std::fs::remove_file(data.join("postmaster.pid"));
    let mut server = Server::new(
        &bins,
        user,
        ids,
        work,
        data,
        CHECK_PORT,
        work.join(format!("check-{point}.log")),
    )?;
    let start_s = match server.start() {
        Ok(s) => s,
        Err(e) => {
            problems.push(format!("PostgreSQL did not start on the restored data: {e}"));
            return Ok((None, problems));
        }
    };
    let (amcheck_ok, out) = sys::run_status(
        "pg_amcheck",
        server
            .client("pg_amcheck")
            .args(["--install-missing", "--heapallindexed", "postgres"]),
    )?;
    if !amcheck_ok {
        problems.push(format!("pg_amcheck found problems:\n{}", sys::tail(&out, 10)));
    }
    let sums = server.psql(
        "SELECT (SELECT count(*) FROM ledger), (SELECT count(*) FROM pgbench_history), \
         (SELECT sum(abalance) FROM pgbench_accounts), (SELECT sum(tbalance) FROM pgbench_tellers), \
         (SELECT sum(bbalance) FROM pgbench_branches)",
    )?;
    let f: Vec<&str> = sums.trim().split('|').collect();
    let ledger_rows: u64 = f.first().and_then(|v| v.parse().ok()).unwrap_or(0);
    let balances_agree = f.len() == 5 && f[0] == f[1] && f[2] == f[3] && f[3] == f[4];
    if !balances_agree {
        problems.push(format!(
            "half transactions: ledger rows | history rows | sum of accounts | tellers | branches = {}",
            sums.trim()
        ));
    }
    let rows = server.psql("SELECT client, count(*) FROM ledger GROUP BY client ORDER BY client")?;
    let mut db: BTreeMap<u32, u64> = BTreeMap::new();
    for line in rows.lines().filter(|l| !l.is_empty()) {
        let mut it = line.split('|');
        match (
            it.next().and_then(|c| c.parse().ok()),
            it.next().and_then(|n| n.parse().ok()),
        ) {
            (Some(c), Some(n)) => {
                db.insert(c, n);
            }
            _ => {
                return Err(RealError::failed(
                    "reading the ledger",
                    format!("unexpected line {line:?}"),
                ))
            }
        }
    }
    let mut clients: Vec<u32> = db.keys().copied().collect();
    clients.extend(ledger.per_client.keys().copied());
    clients.sort_unstable();
    clients.dedup();
    let (mut acked_before, mut acked_by_end, mut out_of_bounds) = (0, 0, 0);
    for c in clients {
        let n = db.get(&c).copied().unwrap_or(0);
        let lo = ledger.acked_before(c, taken.sent_us);
        let hi = ledger.acked_before(c, taken.done_us);
        acked_before += lo;
        acked_by_end += hi;
        if n < lo {
            out_of_bounds += 1;
            problems.push(format!(
                "client {c}: {n} ledger rows, but pgbench saw {lo} of its transactions committed before the backup was asked for: {} committed transaction(s) lost",
                lo - n
            ));
        } else if n > hi + 1 {
            out_of_bounds += 1;
            problems.push(format!(
                "client {c}: {n} ledger rows, more than the {hi} (+1 in flight) it saw committed by the backup's end"
            ));
        }
    }
    server.stop()?;
    Ok((
        Some(DbCheck {
            start_s,
            amcheck_ok,
            balances_agree,
            acked_before_backup: acked_before,
            acked_by_backup_end: acked_by_end,
            ledger_rows,
            clients_out_of_bounds: out_of_bounds,
        }),
        problems,
    ))
}

#[cfg(test)]
mod tests {
    use super::Ledger;

    #[test]
    fn the_ledger_reads_pgbench_logs_and_counts_per_client_by_time() {
        let dir = tempfile::tempdir().unwrap();
        // client txn latency script epoch_s epoch_us; "failed" is a failed transaction.
        std::fs::write(
            dir.path().join("log.123"),
            "0 0 900 0 100 000010\n1 0 800 0 100 000020\n0 1 700 0 100 500000\n1 1 failed 0 101 000000\n0 2 600 0 101 000001\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("log.123.1"), "2 0 500 0 100 000030\n").unwrap();
        std::fs::write(dir.path().join("other.1"), "not a pgbench log\n").unwrap();
        let l = Ledger::read(dir.path(), "log").unwrap();
        assert_eq!(l.total(), 5);
        assert_eq!(l.failed, 1);
        assert_eq!(l.acked_before(0, 100_000_010), 0);
        assert_eq!(l.acked_before(0, 100_000_011), 1);
        assert_eq!(l.acked_before(0, 200_000_000), 3);
        assert_eq!(l.acked_before(7, 200_000_000), 0);
        assert_eq!(l.between(100_000_000, 100_500_000), 3);
        assert_eq!(l.between(100_000_000, 101_000_002), 5);
    }

    #[test]
    fn a_log_line_that_is_not_pgbench_s_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("log.1"), "0 0 900\n").unwrap();
        assert!(Ledger::read(dir.path(), "log").is_err());
        assert!(Ledger::read(dir.path(), "nothing").is_err());
    }
}
