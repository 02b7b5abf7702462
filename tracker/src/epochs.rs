//! Epoch files: closed epochs that are not folded yet, one file each.
//!
//! ```text
//! disk.ctk            header, bitmaps, epoch map
//! disk.ctk.e12        the blocks written in epoch 12 (SparseBits, checksummed)
//! disk.ctk.e13        ...
//! ```
//! An epoch is written to its file when its frozen bitmap is drained (off the
//! I/O path, after the snapshot's stun), before the bitmap is cleared, and
//! the file is removed once the epoch is folded into the epoch map and the
//! header records that. Every closed epoch after the fold horizon has a file,
//! empty epochs included, so a missing file is damage, not "nothing written".
//! Files are written to a temporary name, synced and renamed, so a file that
//! exists is complete.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::ctk::checksum;
use crate::sparse::{take_u64, SparseBits};

const MAGIC: u64 = u64::from_le_bytes(*b"CBTEPOC2");

/// The file of epoch `epoch` of the tracker at `ctk`.
pub(crate) fn path(ctk: &Path, epoch: u64) -> PathBuf {
    let mut p = ctk.as_os_str().to_owned();
    p.push(format!(".e{epoch}"));
    PathBuf::from(p)
}

/// Writes epoch `epoch`'s blocks durably (temporary file, fsync, rename,
/// directory fsync).
pub(crate) fn write(ctk: &Path, epoch: u64, bits: &SparseBits) -> io::Result<()> {
    let mut buf = Vec::with_capacity(32 + bits.heap_bytes() as usize);
    buf.extend_from_slice(&MAGIC.to_le_bytes());
    buf.extend_from_slice(&epoch.to_le_bytes());
    bits.encode(&mut buf);
    let sum = checksum(&buf);
    buf.extend_from_slice(&sum.to_le_bytes());
    let dst = path(ctk, epoch);
    let mut tmp = dst.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = File::create(&tmp)?;
    f.write_all(&buf)?;
    f.sync_all()?;
    std::fs::rename(&tmp, &dst)?;
    sync_dir(ctk)
}

/// Reads epoch `epoch`'s file; `None` if it is missing or damaged.
pub(crate) fn read(ctk: &Path, epoch: u64) -> Option<SparseBits> {
    let data = std::fs::read(path(ctk, epoch)).ok()?;
    let (body, sum) = data.split_at_checked(data.len().checked_sub(8)?)?;
    if checksum(body).to_le_bytes() != sum {
        return None;
    }
    let mut input = body;
    if take_u64(&mut input)? != MAGIC || take_u64(&mut input)? != epoch {
        return None;
    }
    let bits = SparseBits::decode(&mut input)?;
    input.is_empty().then_some(bits)
}

/// The epochs that have a file (complete or not), and leftover temporary files.
pub(crate) fn list(ctk: &Path) -> (Vec<u64>, Vec<PathBuf>) {
    let (dir, name) = split(ctk);
    let prefix = format!("{name}.e");
    let mut epochs = Vec::new();
    let mut temps = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let file = entry.file_name();
        let Some(rest) = file.to_str().and_then(|f| f.strip_prefix(&prefix)) else {
            continue;
        };
        if rest.ends_with(".tmp") {
            temps.push(entry.path());
        } else if let Ok(e) = rest.parse::<u64>() {
            epochs.push(e);
        }
    }
    epochs.sort_unstable();
    (epochs, temps)
}

/// Removes epoch `epoch`'s file (it was folded).
pub(crate) fn remove(ctk: &Path, epoch: u64) {
    let _ = std::fs::remove_file(path(ctk, epoch));
}

/// Loads the files of epochs `(folded, last_closed]` except `pending` (whose
/// blocks are still in the frozen bitmap), and removes files outside that
/// range (folded already, or left by a reset). `None` if any needed file is
/// missing or damaged.
pub(crate) fn load(ctk: &Path, folded: u64, last_closed: u64, pending: u64) -> Option<BTreeMap<u64, SparseBits>> {
    let (have, temps) = list(ctk);
    for t in temps {
        let _ = std::fs::remove_file(t);
    }
    for &e in &have {
        if e <= folded || e > last_closed {
            remove(ctk, e);
        }
    }
    let mut out = BTreeMap::new();
    for e in folded + 1..=last_closed {
        if e == pending {
            continue;
        }
        out.insert(e, read(ctk, e)?);
    }
    Some(out)
}

fn split(ctk: &Path) -> (&Path, String) {
    let dir = ctk
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = ctk
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    (dir, name)
}

/// Makes a rename in the tracker's directory durable.
pub(crate) fn sync_dir(ctk: &Path) -> io::Result<()> {
    File::open(split(ctk).0)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_read_list_and_damage() {
        let dir = tempfile::tempdir().unwrap();
        let ctk = dir.path().join("d.ctk");
        let mut bits = SparseBits::default();
        bits.or_word(7, 0b1011);
        bits.or_word(100_000, 1);
        write(&ctk, 3, &bits).unwrap();
        write(&ctk, 4, &SparseBits::default()).unwrap();
        assert_eq!(read(&ctk, 3), Some(bits.clone()));
        assert_eq!(read(&ctk, 4), Some(SparseBits::default()));
        assert_eq!(list(&ctk).0, vec![3, 4]);
        // A file for the wrong epoch, or a damaged one, is not accepted.
        std::fs::copy(path(&ctk, 3), path(&ctk, 5)).unwrap();
        assert_eq!(read(&ctk, 5), None);
        let mut data = std::fs::read(path(&ctk, 3)).unwrap();
        data[20] ^= 1;
        std::fs::write(path(&ctk, 3), data).unwrap();
        assert_eq!(read(&ctk, 3), None);
        // Loading drops what is outside the range and needs every epoch inside it.
        assert_eq!(load(&ctk, 3, 4, 0).map(|m| m.len()), Some(1));
        assert_eq!(
            list(&ctk).0,
            vec![4],
            "3 (folded) and 5 (past the last closed) are gone"
        );
        assert_eq!(load(&ctk, 2, 4, 0), None, "epoch 3 is missing");
        assert!(load(&ctk, 2, 4, 3).is_some(), "epoch 3 is still in the frozen bitmap");
    }
}
