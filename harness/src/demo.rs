//! `cbtsim demo`: a narrated walk-through of changed-block tracking.

use std::io::Write;
use std::path::Path;

use backup::{backup_vm, restore_to_file, verify, BackupOptions, Repository};
use tracker::Granularity;
use vadp::{changed_areas, DiskArea};
use workloads::{format_size, human, SizeStyle};

use sim::{DiskSpec, Host};

use crate::HarnessError;

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

/// What the demo measured, for tests and `--json`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DemoReport {
    /// Disk size.
    pub disk_size: u64,
    /// Bytes in the `*` answer at the first snapshot.
    pub allocated_bytes: u64,
    /// Areas changed between the two snapshots.
    pub changed_areas: Vec<(u64, u64)>,
    /// Their total size.
    pub changed_bytes: u64,
    /// Bytes read back from the second snapshot and checked.
    pub verified_bytes: u64,
    /// The first snapshot's change ID.
    pub change_id_1: String,
    /// The second snapshot's change ID.
    pub change_id_2: String,
    /// The full backup: bytes read from its snapshot and stored in the repository.
    pub full_backup: BackupBytes,
    /// The incremental backup: bytes read and stored.
    pub incremental_backup: BackupBytes,
    /// Bytes of the restored image checked against what the guest wrote.
    pub restore_checked_bytes: u64,
}

/// What a backup of the demo read and stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct BackupBytes {
    /// Bytes read from the backup's snapshot.
    pub bytes_read: u64,
    /// Bytes of new chunk files written to the repository.
    pub bytes_stored: u64,
}

/// A deterministic, non-zero pattern for a write: byte `i` of a write tagged `tag`.
fn pattern(tag: u8, i: usize) -> u8 {
    (tag.wrapping_mul(31) ^ (i as u8).wrapping_mul(7)) | 1
}

fn fill(tag: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| pattern(tag, i)).collect()
}

/// Runs the walk-through in `dir`, narrating to `out`.
pub fn run(dir: &Path, out: &mut dyn Write) -> Result<DemoReport, HarnessError> {
    run_with_maps(dir, out, false)
}

/// Draws disk 0 of the demo's VM in the terminal ([`diskmap::term`]): at
/// snapshot `at`, or now (through a snapshot taken for the map and removed),
/// with the epochs of the older snapshots, or of the last `history` change IDs.
fn show_map(
    host: &Host,
    vm: &sim::Vm,
    at: Option<&str>,
    since: Option<&str>,
    history: Option<u32>,
    out: &mut dyn Write,
) -> Result<(), HarnessError> {
    let snapshots = |vm: &sim::Vm| -> Vec<(String, Option<String>)> {
        vm.snapshots()
            .into_iter()
            .map(|s| (s.name, s.disks[0].change_id.clone()))
            .collect()
    };
    let draw = |name: &str, label: &str| -> Result<diskmap::DiskMap, HarnessError> {
        let (chain, cid) = diskmap::chain(&snapshots(vm), name, history)?;
        Ok(diskmap::compute(
            host,
            &diskmap::MapQuery {
                vm: vm.name(),
                disk: 0,
                snapshot: name,
                label,
                change_id: cid.as_deref(),
                granularity: vm.granularity(0)?.bytes(),
                chain: &chain,
                since,
                shape: diskmap::Shape::TERMINAL,
            },
        )?)
    };
    let map = match at {
        Some(s) => draw(s, s)?,
        None => {
            vm.create_snapshot("demo-map")?;
            let map = draw("demo-map", "now");
            vm.remove_snapshot("demo-map")?;
            map?
        }
    };
    let _ = write!(out, "{}", diskmap::term::render(&map));
    Ok(())
}

/// [`run`], and with `maps` the disk's map after the steps that change it
/// (in the terminal's colors).
pub fn run_with_maps(dir: &Path, out: &mut dyn Write, maps: bool) -> Result<DemoReport, HarnessError> {
    let say = |out: &mut dyn Write, s: String| {
        let _ = writeln!(out, "{s}");
    };
    let disk_size = 64 * GIB;
    let host = Host::open(dir)?;
    say(out, format!("1. A host with a datastore at {}", dir.display()));
    let vm = host.create_vm(
        "demo-vm",
        &[DiskSpec {
            capacity: disk_size,
            granularity: Granularity::DEFAULT,
        }],
    )?;
    say(
        out,
        format!(
            "   VM \"demo-vm\" with one thin {} disk (sparse: nothing is allocated yet)",
            format_size(disk_size, SizeStyle::Exact)
        ),
    );
    vadp::DataProtection::enable_change_tracking(&host, "demo-vm")?;
    say(
        out,
        "2. Change tracking (CBT) is on: every guest write marks its 64 KiB blocks in a lock-free bitmap".into(),
    );

    // The guest installs its OS: a few regions.
    let first: [(u64, usize, u8); 3] = [
        (0, MIB as usize, 1),
        (10 * GIB, 256 * 1024, 2),
        (40 * GIB + 12_345, 100_000, 3),
    ];
    let mut expected: Vec<(u64, Vec<u8>)> = Vec::new();
    for &(off, len, tag) in &first {
        let data = fill(tag, len);
        vm.write(0, off, &data)?;
        expected.push((off, data));
    }
    say(
        out,
        "3. The guest writes 1 MiB at 0, 256 KiB at 10 GiB, and 100,000 bytes at 40 GiB + 12,345 (unaligned)".into(),
    );

    let s1 = vm.create_snapshot("backup-1")?;
    let cid1 = s1.disks[0].change_id.clone().expect("CBT is on");
    say(
        out,
        format!("4. Snapshot \"backup-1\": I/O stunned for an O(1) epoch switch; change ID {cid1}"),
    );
    if maps {
        show_map(&host, &vm, Some("backup-1"), None, None, out)?;
    }
    let all: Vec<DiskArea> = changed_areas(&host, "demo-vm", "backup-1", 0, "*").collect::<Result<_, _>>()?;
    let allocated: u64 = all.iter().map(|a| a.length).sum();
    say(
        out,
        format!(
            "5. QueryChangedDiskAreas(\"*\") at backup-1: {} areas, {} allocated (what a full backup reads):",
            all.len(),
            human(allocated)
        ),
    );
    for a in &all {
        say(
            out,
            format!("     [{:>14} .. {:>14})  {}", a.start, a.end(), human(a.length)),
        );
    }

    // The guest keeps working: overwrite, and write somewhere new.
    let second: [(u64, usize, u8); 3] = [
        (512 * 1024, 4096, 4),
        (10 * GIB + 65_535, 2, 5),
        (63 * GIB, 3 * MIB as usize, 6),
    ];
    for &(off, len, tag) in &second {
        let data = fill(tag, len);
        vm.write(0, off, &data)?;
        expected.push((off, data));
    }
    say(
        out,
        "6. The guest writes 4 KiB at 512 KiB, 2 bytes at 10 GiB + 65,535 (two blocks), 3 MiB at 63 GiB".into(),
    );
    let s2 = vm.create_snapshot("backup-2")?;
    let cid2 = s2.disks[0].change_id.clone().expect("CBT is on");
    say(out, format!("7. Snapshot \"backup-2\": change ID {cid2}"));
    if maps {
        show_map(&host, &vm, Some("backup-2"), None, None, out)?;
    }
    let changed: Vec<DiskArea> = changed_areas(&host, "demo-vm", "backup-2", 0, &cid1).collect::<Result<_, _>>()?;
    let changed_bytes: u64 = changed.iter().map(|a| a.length).sum();
    say(
        out,
        format!(
            "8. QueryChangedDiskAreas since {cid1}: {} areas, {} = {:.5}% of the disk:",
            changed.len(),
            human(changed_bytes),
            100.0 * changed_bytes as f64 / disk_size as f64
        ),
    );
    for a in &changed {
        say(
            out,
            format!("     [{:>14} .. {:>14})  {}", a.start, a.end(), human(a.length)),
        );
    }
    if maps {
        show_map(&host, &vm, Some("backup-2"), Some(&cid1), None, out)?;
    }

    // Read the changed areas from the snapshot, as an incremental backup
    // would, and check them against what the guest wrote.
    let image_of = |expected: &[(u64, Vec<u8>)], off: u64, len: u64| -> Vec<u8> {
        let mut v = vec![0u8; len as usize];
        for (o, d) in expected {
            let (s, e) = (*o, *o + d.len() as u64);
            let (lo, hi) = (s.max(off), e.min(off + len));
            if lo < hi {
                v[(lo - off) as usize..(hi - off) as usize].copy_from_slice(&d[(lo - s) as usize..(hi - s) as usize]);
            }
        }
        v
    };
    let mut verified = 0u64;
    for a in &changed {
        let mut buf = vec![0u8; a.length as usize];
        vm.read_snapshot("backup-2", 0, a.start, &mut buf)?;
        if buf != image_of(&expected, a.start, a.length) {
            return Err(HarnessError::Check {
                path: dir.to_owned(),
                reason: format!(
                    "snapshot data differs from what the guest wrote in [{}, {})",
                    a.start,
                    a.end()
                ),
            });
        }
        verified += a.length;
    }
    // And nothing the guest wrote after backup-1 lies outside the changed areas.
    for &(off, len, _) in &second {
        let covered = changed.iter().any(|a| a.start <= off && off + len as u64 <= a.end());
        if !covered {
            return Err(HarnessError::Check {
                path: dir.to_owned(),
                reason: format!("write at {off} is missing from the changed areas"),
            });
        }
    }
    say(
        out,
        format!(
            "9. Read {} of changed areas from backup-2 and checked them byte for byte: identical",
            human(verified)
        ),
    );
    vm.remove_snapshot("backup-1")?;
    vm.remove_snapshot("backup-2")?;
    say(
        out,
        "10. Both snapshots removed (deltas consolidated); change IDs stay valid for the next incremental".into(),
    );
    if maps {
        say(
            out,
            "    The disk now, its epochs told apart by the removed snapshots' change IDs:".into(),
        );
        show_map(&host, &vm, None, None, Some(2), out)?;
    }

    // The same flow, done by the backup client: a full backup, more guest
    // writes, an incremental, and a verified restore.
    let repo = Repository::create_or_open(&dir.join("repo"))?;
    let opts = BackupOptions::default();
    let full = backup_vm(&host, "demo-vm", &repo, &opts, &())?;
    say(out, format!("11. Backup client, point {} ({}: {}): read {}, stored {} (zero chunks are not stored; chunks are deduplicated and compressed)", full.point, full.kind, full.reason, human(full.bytes_read), human(full.bytes_stored)));
    let third: [(u64, usize, u8); 2] = [(10 * GIB, 8192, 7), (20 * GIB + 1, 70_000, 8)];
    for &(off, len, tag) in &third {
        let data = fill(tag, len);
        vm.write(0, off, &data)?;
        expected.push((off, data));
    }
    let inc = backup_vm(&host, "demo-vm", &repo, &opts, &())?;
    say(out, format!("12. The guest writes 8 KiB at 10 GiB and 70,000 bytes at 20 GiB + 1; incremental point {}: read {} (= the changed areas, {}), stored {}", inc.point, human(inc.bytes_read), human(inc.changed_bytes), human(inc.bytes_stored)));
    if maps {
        show_map(&host, &vm, None, None, Some(4), out)?;
    }
    let image = dir.join("restored-disk0.img");
    restore_to_file(&repo, &inc.point, 0, &image, true, &())?;
    let mut checked = 0u64;
    let file = std::fs::File::open(&image).map_err(|source| HarnessError::Io {
        path: image.clone(),
        source,
    })?;
    let size = file
        .metadata()
        .map_err(|source| HarnessError::Io {
            path: image.clone(),
            source,
        })?
        .len();
    let mut probes: Vec<(u64, u64)> = expected.iter().map(|(o, d)| (*o, d.len() as u64)).collect();
    probes.extend([(5 * GIB, MIB), (disk_size - MIB, MIB)]); // never written: zeros
    for (off, len) in probes {
        let mut buf = vec![0u8; len as usize];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut buf, off).map_err(|source| HarnessError::Io {
            path: image.clone(),
            source,
        })?;
        if size != disk_size || buf != image_of(&expected, off, len) {
            return Err(HarnessError::Check {
                path: image.clone(),
                reason: format!("restored image differs at [{off}, {})", off + len),
            });
        }
        checked += len;
    }
    let ok = verify(&repo, &())?.ok;
    say(out, format!("13. Restored point {} to a sparse {} image and checked {} against what the guest wrote: identical; repository verify: {}", inc.point, format_size(size, SizeStyle::Exact), human(checked), if ok { "ok" } else { "FAILED" }));
    if !ok {
        return Err(HarnessError::Check {
            path: dir.join("repo"),
            reason: "repository verification failed".into(),
        });
    }
    Ok(DemoReport {
        full_backup: BackupBytes {
            bytes_read: full.bytes_read,
            bytes_stored: full.bytes_stored,
        },
        incremental_backup: BackupBytes {
            bytes_read: inc.bytes_read,
            bytes_stored: inc.bytes_stored,
        },
        restore_checked_bytes: checked,
        disk_size,
        allocated_bytes: allocated,
        changed_areas: changed.iter().map(|a| (a.start, a.length)).collect(),
        changed_bytes,
        verified_bytes: verified,
        change_id_1: cid1,
        change_id_2: cid2,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn demo_reports_exactly_the_changed_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let mut out = Vec::new();
        let r = super::run(dir.path(), &mut out).unwrap();
        let k64 = 65536;
        let g = 1u64 << 30;
        assert_eq!(
            r.changed_areas,
            vec![(8 * k64, k64), (10 * g, 2 * k64), (63 * g, 3 << 20)]
        );
        assert_eq!(r.verified_bytes, r.changed_bytes);
        assert!(String::from_utf8(out).unwrap().contains("identical"));
        // The incremental reads only what changed since the full backup.
        assert!(
            r.incremental_backup.bytes_read < r.full_backup.bytes_read / 4,
            "{:?} vs {:?}",
            r.incremental_backup,
            r.full_backup
        );
        assert!(r.restore_checked_bytes > 0);
    }
}
