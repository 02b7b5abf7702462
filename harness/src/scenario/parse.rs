//! Reading a scenario file: TOML into raw tables, then every value checked, with the
//! file, line and key of the first bad one.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;
use toml::Spanned;
use tracker::{Granularity, MAX_CAPACITY};

use super::{Scenario, ScenarioError, VmPlan};
use crate::drive::{DiskLoad, DrivePlan, Limit};
use sim::DiskSpec;

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
