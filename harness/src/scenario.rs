//! Scenarios: a host of VMs running workload profiles at once, each checked as it runs.
//!
//! A scenario is a TOML file ([`Scenario::parse`]); [`run`] creates its VMs in a datastore,
//! drives them all concurrently ([`crate::drive`]), and returns a [`ScenarioReport`]: ops,
//! bytes, per-epoch changed bytes and share of the disk, write latency percentiles, the
//! over-report ratio and missed blocks (which must be 0), per VM and for the host.
//!
//! ```toml
//! name = "two databases"
//! seed = 1                  # workloads' seed (VM i gets seed + i unless it sets its own)
//! ops = 200000              # per VM (or: seconds = 30)
//! snapshot_every = 20000    # ops of a VM between snapshot + changed-areas query
//! # backup_every = 100000   # ops of a VM between backups through the vadp backup client
//! # repository = "backups"  # their repository (default: DATASTORE/.backups)
//! # flush = false           # count guest flushes without applying them
//!
//! [[vm]]
//! name = "db"               # with count = 2: db-01, db-02
//! count = 2
//! profile = "oltp-db"
//! threads = 2               # vCPU threads per disk
//! disk_size = "8G"          # one disk (or [[vm.disk]] tables, below)
//! granularity = "64K"       # default 64K
//!
//! [[vm]]
//! name = "files"
//! profile = "file-server"
//! [[vm.disk]]
//! size = "4G"
//! [[vm.disk]]
//! size = "16G"
//! granularity = "4K"
//! profile = "log-append"    # a disk may run its own profile and threads
//! ```
//! Sizes are a number of bytes or a string of [`workloads::size`]'s grammar (`"64K"`,
//! `"64KiB"`, `"2T"`). Every
//! top-level key but `name` and `seed` may be set per VM too. An error names the file,
//! line and key: `db.toml:7: key 'vm[0].threads': invalid type: string "two", expected i64`.
//!
//! # Backups
//! With `backup_every`, the [`vadp::backup`] client backs each VM up into the repository
//! while its guest keeps writing (after the check of the first epoch past every multiple
//! of the period). When the guest has stopped, one last incremental backup is taken,
//! restored to a file and compared byte for byte with the VM's disks: any difference
//! ([`BackupCheck::mismatched_bytes`], must be 0) means an incremental of the chain
//! missed a change.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize};
use toml::Spanned;
use tracker::{Granularity, MAX_CAPACITY};

use std::os::unix::fs::FileExt;

use backup::{backup_vm, restore_to_file, BackupError, BackupOptions, BackupReport, Progress, Repository};

use crate::drive::{self, BackupHook, DiskLoad, DriveError, DrivePlan, DriveReport, Latency, Limit, OpCounts};
use sim::{DiskSpec, Host, SimError, Vm};

/// Why a scenario could not be loaded or run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ScenarioError {
    /// The file could not be read.
    #[error("cannot read scenario {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A key has a bad value, is unknown, or is missing.
    #[error("{file}:{line}: key '{key}': {message}")]
    Key {
        /// The file.
        file: String,
        /// 1-based line.
        line: usize,
        /// The key's path, like `vm[1].disk[0].size`.
        key: String,
        /// What is wrong.
        message: String,
    },
    /// The file is not valid TOML.
    #[error("{file}:{line}:{column}: {message}")]
    Syntax {
        /// The file.
        file: String,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What is wrong.
        message: String,
    },
    /// A VM of the scenario failed.
    #[error("VM {vm:?} failed")]
    Vm {
        /// The VM.
        vm: String,
        /// The cause.
        #[source]
        source: Box<DriveError>,
    },
    /// The simulated host failed.
    #[error(transparent)]
    Sim(#[from] SimError),
    /// The final backup or its check failed.
    #[error("backup of VM {vm:?} failed")]
    Backup {
        /// The VM.
        vm: String,
        /// The cause.
        #[source]
        source: BackupError,
    },
    /// Reading a restored image failed.
    #[error("cannot read restored image {path}")]
    Restored {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// A byte size as written in a scenario: a number or a string with a suffix.
#[derive(Debug, Clone, PartialEq)]
enum RawSize {
    Bytes(i64),
    Text(String),
}

impl<'de> Deserialize<'de> for RawSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = RawSize;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a size: a number of bytes or a string like \"64K\"")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<RawSize, E> {
                Ok(RawSize::Bytes(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<RawSize, E> {
                Ok(RawSize::Bytes(i64::try_from(v).unwrap_or(-1)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawSize, E> {
                Ok(RawSize::Text(v.to_owned()))
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDisk {
    size: Spanned<RawSize>,
    granularity: Option<Spanned<RawSize>>,
    profile: Option<Spanned<String>>,
    threads: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVm {
    name: Spanned<String>,
    count: Option<Spanned<i64>>,
    profile: Option<Spanned<String>>,
    threads: Option<Spanned<i64>>,
    disk_size: Option<Spanned<RawSize>>,
    granularity: Option<Spanned<RawSize>>,
    #[serde(default)]
    disk: Vec<RawDisk>,
    seed: Option<Spanned<i64>>,
    ops: Option<Spanned<i64>>,
    seconds: Option<Spanned<f64>>,
    snapshot_every: Option<Spanned<i64>>,
    backup_every: Option<Spanned<i64>>,
    flush: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScenario {
    name: Option<String>,
    description: Option<String>,
    seed: Option<Spanned<i64>>,
    ops: Option<Spanned<i64>>,
    seconds: Option<Spanned<f64>>,
    snapshot_every: Option<Spanned<i64>>,
    backup_every: Option<Spanned<i64>>,
    repository: Option<String>,
    flush: Option<bool>,
    #[serde(default)]
    vm: Vec<Spanned<RawVm>>,
}

/// One VM of a scenario, ready to create and drive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmPlan {
    /// Its name.
    pub name: String,
    /// Its disks.
    pub disks: Vec<DiskSpec>,
    /// What runs on it (with its backup schedule).
    pub plan: DrivePlan,
}

/// A parsed and checked scenario.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scenario {
    /// Its name (the file's stem when the file has none).
    pub name: String,
    /// Its description.
    pub description: String,
    /// The VMs, with `count` expanded.
    pub vms: Vec<VmPlan>,
    /// The backup repository (`None`: `DATASTORE/.backups`), for VMs with `backup_every`.
    pub repository: Option<PathBuf>,
}

/// Turns a span into a 1-based line and column.
fn line_col(text: &str, at: usize) -> (usize, usize) {
    let before = &text[..at.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, col)
}

/// The key written before the value at `at` on its line (`key = value`), if any.
fn key_before(text: &str, at: usize) -> Option<String> {
    let before = &text[..at.min(text.len())];
    let line = &before[before.rfind('\n').map_or(0, |i| i + 1)..];
    let eq = line.rfind('=')?;
    let key = line[..eq].trim_end();
    let start = key
        .rfind(|c: char| c.is_whitespace() || c == '{' || c == ',')
        .map_or(0, |i| i + 1);
    let key = key[start..].trim_matches('"');
    (!key.is_empty()).then(|| key.to_owned())
}

struct Ctx<'a> {
    file: &'a str,
    text: &'a str,
}

impl Ctx<'_> {
    fn err(&self, span: Range<usize>, key: impl Into<String>, message: impl Into<String>) -> ScenarioError {
        ScenarioError::Key {
            file: self.file.to_owned(),
            line: line_col(self.text, span.start).0,
            key: key.into(),
            message: message.into(),
        }
    }

    fn toml_error(&self, e: toml::de::Error) -> ScenarioError {
        let message = e.message().trim().to_owned();
        let Some(span) = e.span() else {
            return ScenarioError::Syntax {
                file: self.file.to_owned(),
                line: 1,
                column: 1,
                message,
            };
        };
        let named = ["unknown field `", "missing field `"]
            .iter()
            .find_map(|p| message.strip_prefix(p))
            .and_then(|rest| rest.split('`').next())
            .map(str::to_owned);
        match named.or_else(|| key_before(self.text, span.start)) {
            Some(key) => self.err(span, key, message),
            None => {
                let (line, column) = line_col(self.text, span.start);
                ScenarioError::Syntax {
                    file: self.file.to_owned(),
                    line,
                    column,
                    message,
                }
            }
        }
    }

    fn count(&self, v: &Option<Spanned<i64>>, key: &str, min: i64) -> Result<Option<u64>, ScenarioError> {
        match v {
            None => Ok(None),
            Some(s) if *s.get_ref() >= min => Ok(Some(*s.get_ref() as u64)),
            Some(s) => Err(self.err(s.span(), key, format!("must be at least {min}, found {}", s.get_ref()))),
        }
    }

    fn size(&self, v: &Spanned<RawSize>, key: &str) -> Result<u64, ScenarioError> {
        match v.get_ref() {
            RawSize::Bytes(n) if *n > 0 => Ok(*n as u64),
            RawSize::Bytes(n) => Err(self.err(v.span(), key, format!("a size must be positive, found {n}"))),
            RawSize::Text(t) => workloads::parse_size(t).map_err(|e| self.err(v.span(), key, e.to_string())),
        }
    }

    fn disk_size(&self, v: &Spanned<RawSize>, key: &str) -> Result<u64, ScenarioError> {
        let n = self.size(v, key)?;
        let min = workloads::MIN_DISK_SIZE;
        if n < min || n & 511 != 0 || n > MAX_CAPACITY {
            return Err(self.err(
                v.span(),
                key,
                format!("a disk is a multiple of 512 bytes from {min} (1 MiB) to {MAX_CAPACITY} (64 TiB), found {n}"),
            ));
        }
        Ok(n)
    }

    fn granularity(&self, v: &Option<Spanned<RawSize>>, key: &str) -> Result<Option<Granularity>, ScenarioError> {
        let Some(v) = v else { return Ok(None) };
        let n = self.size(v, key)?;
        Granularity::new(n)
            .map(Some)
            .map_err(|e| self.err(v.span(), key, e.to_string()))
    }

    fn profile(&self, v: &Spanned<String>, key: &str) -> Result<String, ScenarioError> {
        let name = v.get_ref();
        if workloads::profiles().iter().any(|p| p.name == name) {
            return Ok(name.clone());
        }
        let known: Vec<&str> = workloads::profiles().iter().map(|p| p.name).collect();
        Err(self.err(
            v.span(),
            key,
            format!("unknown profile {name:?} (known: {})", known.join(", ")),
        ))
    }

    fn seconds(&self, v: &Spanned<f64>, key: &str) -> Result<Duration, ScenarioError> {
        let s = *v.get_ref();
        if !(s > 0.0 && s <= 86_400.0) {
            return Err(self.err(
                v.span(),
                key,
                format!("must be more than 0 and at most 86400, found {s}"),
            ));
        }
        Ok(Duration::from_secs_f64(s))
    }
}

impl Scenario {
    /// Reads and checks a scenario file.
    pub fn load(path: &Path) -> Result<Self, ScenarioError> {
        let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut s = Self::parse(&text, &path.display().to_string())?;
        if s.name.is_empty() {
            s.name = path
                .file_stem()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        }
        Ok(s)
    }

    /// Parses and checks scenario text; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Self, ScenarioError> {
        let cx = Ctx { file, text };
        let raw: RawScenario = toml::from_str(text).map_err(|e| cx.toml_error(e))?;
        if raw.vm.is_empty() {
            return Err(cx.err(0..0, "vm", "a scenario needs at least one [[vm]] table"));
        }
        let top_ops = cx.count(&raw.ops, "ops", 1)?;
        if let (Some(_), Some(s)) = (&raw.ops, &raw.seconds) {
            return Err(cx.err(s.span(), "seconds", "give either ops or seconds, not both"));
        }
        let top_seconds = raw.seconds.as_ref().map(|s| cx.seconds(s, "seconds")).transpose()?;
        let top_snap = cx.count(&raw.snapshot_every, "snapshot_every", 1)?;
        let top_backup = cx.count(&raw.backup_every, "backup_every", 1)?;
        let seed = cx.count(&raw.seed, "seed", 0)?.unwrap_or(0);

        let mut vms = Vec::new();
        let mut names = std::collections::HashSet::new();
        for (i, svm) in raw.vm.iter().enumerate() {
            let span = svm.span();
            let v = svm.get_ref();
            let k = |key: &str| format!("vm[{i}].{key}");
            let base = v.name.get_ref();
            sim::check_name(base).map_err(|e| cx.err(v.name.span(), k("name"), e.to_string()))?;
            let count = cx.count(&v.count, &k("count"), 1)?.unwrap_or(1);
            if count > 1000 {
                return Err(cx.err(
                    v.count.as_ref().map_or(span.clone(), Spanned::span),
                    k("count"),
                    "at most 1000 VMs",
                ));
            }
            let profile = v.profile.as_ref().map(|p| cx.profile(p, &k("profile"))).transpose()?;
            let threads = cx.count(&v.threads, &k("threads"), 1)?.unwrap_or(1);
            let granularity = cx
                .granularity(&v.granularity, &k("granularity"))?
                .unwrap_or(Granularity::DEFAULT);

            let mut disks = Vec::new();
            let mut loads = Vec::new();
            match (&v.disk_size, v.disk.is_empty()) {
                (Some(ds), false) => {
                    return Err(cx.err(
                        ds.span(),
                        k("disk_size"),
                        "give either disk_size or [[vm.disk]] tables, not both",
                    ))
                }
                (None, true) => {
                    return Err(cx.err(span, k("disk_size"), "missing: give disk_size or [[vm.disk]] tables"));
                }
                (Some(ds), true) => {
                    let capacity = cx.disk_size(ds, &k("disk_size"))?;
                    let Some(profile) = profile.clone() else {
                        return Err(cx.err(span, k("profile"), "missing: every VM runs a profile"));
                    };
                    disks.push(DiskSpec { capacity, granularity });
                    loads.push(DiskLoad {
                        disk: 0,
                        profile,
                        threads: threads as u32,
                    });
                }
                (None, false) => {
                    for (j, d) in v.disk.iter().enumerate() {
                        let dk = |key: &str| format!("vm[{i}].disk[{j}].{key}");
                        let capacity = cx.disk_size(&d.size, &dk("size"))?;
                        let g = cx
                            .granularity(&d.granularity, &dk("granularity"))?
                            .unwrap_or(granularity);
                        let p = match &d.profile {
                            Some(p) => cx.profile(p, &dk("profile"))?,
                            None => profile.clone().ok_or_else(|| {
                                cx.err(d.size.span(), dk("profile"), "missing: no profile here or on the VM")
                            })?,
                        };
                        let t = cx.count(&d.threads, &dk("threads"), 1)?.unwrap_or(threads);
                        disks.push(DiskSpec {
                            capacity,
                            granularity: g,
                        });
                        loads.push(DiskLoad {
                            disk: j,
                            profile: p,
                            threads: t as u32,
                        });
                    }
                }
            }
            let total_threads: u64 = loads.iter().map(|l| u64::from(l.threads)).sum();
            if total_threads > 256 {
                return Err(cx.err(
                    span,
                    k("threads"),
                    format!("{total_threads} threads on one VM; at most 256"),
                ));
            }
            if let (Some(_), Some(s)) = (&v.ops, &v.seconds) {
                return Err(cx.err(s.span(), k("seconds"), "give either ops or seconds, not both"));
            }
            let limit = match (cx.count(&v.ops, &k("ops"), 1)?, &v.seconds) {
                (Some(n), _) => Limit::Ops(n),
                (None, Some(s)) => Limit::Time(cx.seconds(s, &k("seconds"))?),
                (None, None) => match (top_ops, top_seconds) {
                    (Some(n), _) => Limit::Ops(n),
                    (None, Some(d)) => Limit::Time(d),
                    (None, None) => {
                        return Err(cx.err(span, "ops", "missing: give ops or seconds (at the top or per VM)"))
                    }
                },
            };
            let snapshot_every = cx.count(&v.snapshot_every, &k("snapshot_every"), 1)?.or(top_snap);
            let backup_every = cx.count(&v.backup_every, &k("backup_every"), 1)?.or(top_backup);
            let vm_seed = cx.count(&v.seed, &k("seed"), 0)?;
            for n in 0..count {
                let name = if count == 1 {
                    base.clone()
                } else {
                    format!("{base}-{:0w$}", n + 1, w = count.to_string().len().max(2))
                };
                if !names.insert(name.clone()) {
                    return Err(cx.err(v.name.span(), k("name"), format!("VM name {name:?} is used twice")));
                }
                let index = vms.len() as u64;
                vms.push(VmPlan {
                    name,
                    disks: disks.clone(),
                    plan: DrivePlan {
                        loads: loads.clone(),
                        seed: vm_seed.unwrap_or(seed.wrapping_add(index)),
                        limit,
                        verify: true,
                        snapshot_every,
                        apply_flush: v.flush.or(raw.flush).unwrap_or(true),
                        snapshot_prefix: "scenario".into(),
                        backup_every,
                    },
                });
            }
        }
        Ok(Scenario {
            name: raw.name.unwrap_or_default(),
            description: raw.description.unwrap_or_default(),
            vms,
            repository: raw.repository.map(PathBuf::from),
        })
    }

    /// Total vCPU threads of the host.
    pub fn threads(&self) -> u64 {
        self.vms
            .iter()
            .flat_map(|v| &v.plan.loads)
            .map(|l| u64::from(l.threads))
            .sum()
    }
}

/// What a scenario run did and found.
#[derive(Debug, Clone, Serialize)]
pub struct ScenarioReport {
    /// The scenario's name.
    pub name: String,
    /// VMs run.
    pub vm_count: usize,
    /// vCPU threads in all.
    pub threads: u64,
    /// Wall time, in seconds.
    pub elapsed_s: f64,
    /// Ops of all VMs.
    pub counts: OpCounts,
    /// Ops per second, all VMs.
    pub ops_per_s: f64,
    /// Guest write latency over all VMs.
    pub write_latency: Latency,
    /// Epochs checked (per disk).
    pub epochs_checked: u64,
    /// Bytes the tracker reported since each disk's first change ID, summed.
    pub changed_bytes: u64,
    /// Bytes truly changed, summed.
    pub true_changed_bytes: u64,
    /// `changed_bytes / true_changed_bytes`.
    pub over_report_ratio: f64,
    /// Missed blocks over every check of every VM (must be 0).
    pub missed_blocks: u64,
    /// Backups taken (scheduled and final), all VMs.
    pub backups: u64,
    /// The final backup of each VM with a backup schedule, restored and compared.
    pub backup_checks: Vec<BackupCheck>,
    /// Bytes of restored images that differ from the VMs' disks (must be 0).
    pub backup_mismatched_bytes: u64,
    /// Per VM.
    pub vms: Vec<DriveReport>,
}

/// A VM's final backup, restored and compared with its disks.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BackupCheck {
    /// The VM.
    pub vm: String,
    /// The backup (the last of the VM's chain).
    pub backup: BackupReport,
    /// Bytes compared (every disk, whole).
    pub compared_bytes: u64,
    /// Bytes that differ (must be 0).
    pub mismatched_bytes: u64,
}

/// The scenario's backup client for one VM.
struct VmBackup<'a> {
    host: &'a Host,
    vm: &'a str,
    repo: &'a Repository,
}

impl BackupHook for VmBackup<'_> {
    fn backup(&self) -> Result<BackupReport, BackupError> {
        backup_vm(self.host, self.vm, self.repo, &BackupOptions::default(), &())
    }
}

/// Bytes compared per read.
const COMPARE_PIECE: u64 = 4 << 20;

/// Backs up `vm` (its guest stopped), restores each disk to a file in `scratch` and
/// compares it with the disk.
fn check_final_backup(b: &VmBackup<'_>, vm: &Vm, scratch: &Path) -> Result<BackupCheck, ScenarioError> {
    let backup_err = |source| ScenarioError::Backup {
        vm: b.vm.to_owned(),
        source,
    };
    let backup = b.backup().map_err(backup_err)?;
    let (mut compared, mut mismatched) = (0, 0);
    for d in 0..vm.disk_count() {
        let file = scratch.join(format!("{}.disk{d}.img", b.vm));
        restore_to_file(b.repo, &backup.point, d, &file, &()).map_err(backup_err)?;
        let read_err = |source| ScenarioError::Restored {
            path: file.clone(),
            source,
        };
        let f = std::fs::File::open(&file).map_err(read_err)?;
        let image_len = f.metadata().map_err(read_err)?.len();
        let cap = vm.capacity(d)?;
        mismatched += image_len.abs_diff(cap);
        let (mut a, mut c) = (Vec::new(), Vec::new());
        let mut off = 0;
        while off < cap.min(image_len) {
            let n = COMPARE_PIECE.min(cap.min(image_len) - off) as usize;
            a.resize(n, 0);
            c.resize(n, 0);
            f.read_exact_at(&mut a, off).map_err(read_err)?;
            vm.read(d, off, &mut c)?;
            if a != c {
                mismatched += a.iter().zip(&c).filter(|(x, y)| x != y).count() as u64;
            }
            off += n as u64;
        }
        compared += cap;
        drop(f);
        let _ = std::fs::remove_file(&file);
    }
    Ok(BackupCheck {
        vm: b.vm.to_owned(),
        backup,
        compared_bytes: compared,
        mismatched_bytes: mismatched,
    })
}

/// Creates the scenario's VMs in `datastore` and runs them all at once.
///
/// Fails if a VM of the same name exists there, or if any VM fails (after all stopped).
/// Missed blocks and backup mismatches are not errors here: they are in the report (and
/// must be 0). `progress(i)` watches the drive of VM `i` of [`Scenario::vms`] (see
/// [`drive::drive`]); `&|_| &()` watches nothing.
pub fn run<'p>(
    s: &Scenario,
    datastore: &Path,
    progress: &dyn Fn(usize) -> &'p dyn Progress,
) -> Result<ScenarioReport, ScenarioError> {
    let host = Host::open(datastore)?;
    let mut vms = Vec::new();
    for v in &s.vms {
        vms.push(host.create_vm(&v.name, &v.disks)?);
    }
    let backups_on = s.vms.iter().any(|v| v.plan.backup_every.is_some());
    let repo = if backups_on {
        let root = s.repository.clone().unwrap_or_else(|| datastore.join(".backups"));
        let repo = Repository::create_or_open(&root).map_err(|source| ScenarioError::Backup {
            vm: s
                .vms
                .iter()
                .find(|v| v.plan.backup_every.is_some())
                .map(|v| v.name.clone())
                .unwrap_or_default(),
            source,
        })?;
        Some(repo)
    } else {
        None
    };
    // Restored images go here (a name starting with '.' is never a VM's).
    let scratch = tempfile::Builder::new()
        .prefix(".restore-")
        .tempdir_in(datastore)
        .map_err(|source| SimError::Io {
            path: datastore.to_owned(),
            source,
        })?;
    let started = Instant::now();
    type VmResult = Result<(DriveReport, Option<BackupCheck>), ScenarioError>;
    let results: Vec<VmResult> = std::thread::scope(|scope| {
        let handles: Vec<_> = s
            .vms
            .iter()
            .zip(&vms)
            .enumerate()
            .map(|(i, (plan, vm))| {
                let (host, repo, scratch) = (&host, repo.as_ref(), scratch.path());
                let p = progress(i);
                scope.spawn(move || {
                    let hook = repo.filter(|_| plan.plan.backup_every.is_some()).map(|repo| VmBackup {
                        host,
                        vm: &plan.name,
                        repo,
                    });
                    let vm_err = |source| ScenarioError::Vm {
                        vm: plan.name.clone(),
                        source: Box::new(source),
                    };
                    drive::drive_with_backups(vm, &plan.plan, p, hook.as_ref().map(|h| h as &dyn BackupHook))
                        .map_err(vm_err)
                        .and_then(|r| {
                            let check = hook.as_ref().map(|h| check_final_backup(h, vm, scratch)).transpose()?;
                            Ok((r, check))
                        })
                })
            })
            .collect();
        handles
            .into_iter()
            .zip(&s.vms)
            .map(|(h, v)| {
                h.join().unwrap_or_else(|_| {
                    Err(ScenarioError::Vm {
                        vm: v.name.clone(),
                        source: Box::new(DriveError::Panicked(v.name.clone())),
                    })
                })
            })
            .collect()
    });
    let elapsed_s = started.elapsed().as_secs_f64();
    let mut reports = Vec::new();
    let mut backup_checks = Vec::new();
    for r in results {
        let (report, check) = r?;
        reports.push(report);
        backup_checks.extend(check);
    }
    let mut counts = OpCounts::default();
    let mut hist = drive::new_histogram();
    let (mut changed, mut truth, mut epochs, mut missed) = (0, 0, 0, 0);
    for r in &reports {
        counts.add(&r.counts);
        hist.add(&r.write_histogram)
            .expect("histograms of the same bounds merge");
        missed += r.missed_blocks;
        for d in &r.disks {
            epochs += d.epochs.len() as u64;
            if let Some(c) = d.cumulative {
                changed += c.changed_bytes;
                truth += c.true_changed_bytes;
            }
        }
    }
    Ok(ScenarioReport {
        name: s.name.clone(),
        vm_count: reports.len(),
        threads: s.threads(),
        elapsed_s,
        ops_per_s: counts.ops as f64 / elapsed_s.max(1e-9),
        counts,
        write_latency: Latency::of(&hist),
        epochs_checked: epochs,
        changed_bytes: changed,
        true_changed_bytes: truth,
        over_report_ratio: if truth == 0 { 1.0 } else { changed as f64 / truth as f64 },
        missed_blocks: missed,
        backups: reports.iter().map(|r| r.backups.len() as u64).sum::<u64>() + backup_checks.len() as u64,
        backup_mismatched_bytes: backup_checks.iter().map(|c| c.mismatched_bytes).sum(),
        backup_checks,
        vms: reports,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        Scenario::parse(text, "s.toml").unwrap_err().to_string()
    }

    #[test]
    fn a_small_scenario_parses_with_defaults() {
        let s = Scenario::parse(
            "ops = 100\n[[vm]]\nname = \"a\"\nprofile = \"vdi\"\ndisk_size = \"8M\"\ncount = 3\n",
            "s.toml",
        )
        .unwrap();
        let names: Vec<&str> = s.vms.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(names, ["a-01", "a-02", "a-03"]);
        let v = &s.vms[1];
        assert_eq!(v.disks[0].capacity, 8 << 20);
        assert_eq!(v.disks[0].granularity, Granularity::DEFAULT);
        assert_eq!(v.plan.limit, Limit::Ops(100));
        assert_eq!(v.plan.seed, 1);
        assert_eq!(v.plan.loads[0].threads, 1);
    }

    #[test]
    fn errors_name_the_line_and_the_key() {
        let base = "ops = 10\n[[vm]]\nname = \"a\"\nprofile = \"vdi\"\n";
        assert_eq!(
            err(&format!("{base}disk_size = \"8X\"\n")),
            "s.toml:5: key 'vm[0].disk_size': invalid size \"8X\": unknown suffix \"X\" (use K, M, G or T)"
        );
        assert!(err(&format!("{base}disk_size = \"8M\"\nthread = 2\n"))
            .starts_with("s.toml:6: key 'thread': unknown field"));
        assert!(err(&format!("{base}disk_size = \"8M\"\nthreads = \"two\"\n"))
            .starts_with("s.toml:6: key 'threads': invalid type"));
        assert!(err(&format!("{base}disk_size = \"8M\"\ngranularity = \"3K\"\n"))
            .starts_with("s.toml:6: key 'vm[0].granularity':"));
        assert!(
            err("ops = 10\n[[vm]]\nname = \"a\"\nprofile = \"oltp\"\ndisk_size = 1048576\n")
                .starts_with("s.toml:4: key 'vm[0].profile': unknown profile \"oltp\"")
        );
        assert!(err("ops = 1\nseconds = 2\n[[vm]]\nname = \"a\"\n").starts_with("s.toml:2: key 'seconds':"));
        assert!(err("[[vm]]\nname = \"a\"\nprofile = \"vdi\"\ndisk_size = \"8M\"\n")
            .starts_with("s.toml:1: key 'ops': missing"));
        assert!(err("ops = 1\n[[vm]]\nprofile = \"vdi\"\n").contains("key 'name': missing field"));
        assert!(err("ops = 1\n[[vm\n").starts_with("s.toml:2:"));
        assert!(err(&format!("{base}disk_size = \"8M\"\nbackup_every = 0\n"))
            .contains("s.toml:6: key 'vm[0].backup_every': must be at least 1"));
    }
}
