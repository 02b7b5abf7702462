//! Guest I/O operations and the deterministic content of writes.

use serde::{Deserialize, Serialize};

/// One guest I/O operation, in bytes.
///
/// Workloads only produce operations that lie inside the disk as the workload knows it
/// (`offset + len <= disk size`), with `len > 0` and `offset` and `len` multiples of 512.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum IoOp {
    /// Write `len` bytes at `offset`; the bytes are [`fill_pattern`]`(seed, offset, ..)`.
    Write {
        /// Byte offset on the disk.
        offset: u64,
        /// Length in bytes.
        len: u64,
        /// Seed of the written content (see [`fill_pattern`]).
        seed: u64,
    },
    /// Read `len` bytes at `offset`.
    Read {
        /// Byte offset on the disk.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
    /// Discard (SCSI UNMAP / TRIM) `len` bytes at `offset`: they read back as zeroes.
    Unmap {
        /// Byte offset on the disk.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
    /// Flush the guest's write cache (SCSI SYNCHRONIZE CACHE).
    Flush,
    /// Grow the disk to `new_size` bytes; the new area reads as zeroes.
    Extend {
        /// The disk's size after the operation, in bytes.
        new_size: u64,
    },
}

impl IoOp {
    /// The byte range `(offset, len)` the operation addresses, if any.
    pub fn range(&self) -> Option<(u64, u64)> {
        match *self {
            IoOp::Write { offset, len, .. } | IoOp::Read { offset, len } | IoOp::Unmap { offset, len } => {
                Some((offset, len))
            }
            IoOp::Flush | IoOp::Extend { .. } => None,
        }
    }
}

/// The splitmix64 finaliser: a fast bijective mix of 64 bits.
pub(crate) fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Derives an independent seed from `seed` and a label (a sub-stream number, a thread...).
pub(crate) fn derive_seed(seed: u64, label: u64) -> u64 {
    splitmix64(splitmix64(seed) ^ label.wrapping_mul(0xD6E8_FEB8_6659_FD93))
}

/// Every byte of a pattern has its lowest bit set, so written data is never zero.
const NONZERO: u64 = 0x0101_0101_0101_0101;

/// The 8 pattern bytes of the aligned word `word` (byte offsets `8*word .. 8*word+8`).
fn pattern_word(seed: u64, word: u64) -> [u8; 8] {
    (splitmix64(seed ^ splitmix64(word)) | NONZERO).to_le_bytes()
}

/// Fills `buf` with the content a write with `seed` puts at absolute byte `offset`.
///
/// The byte at absolute disk offset `p` depends only on `(seed, p)`: the same write always
/// produces the same bytes, any sub-range of a write can be recomputed on its own (what the
/// [`ShadowDisk`](crate::ShadowDisk) does), and two writes with different seeds almost
/// surely differ. Every byte has its lowest bit set, so a written range is never all-zero
/// and can always be told apart from an unwritten or unmapped one.
///
/// Cost: one splitmix64 per 8 bytes.
pub fn fill_pattern(seed: u64, offset: u64, buf: &mut [u8]) {
    let mut pos = 0;
    while pos < buf.len() {
        let abs = offset.wrapping_add(pos as u64);
        let word = pattern_word(seed, abs / 8);
        let start = (abs % 8) as usize;
        let n = (8 - start).min(buf.len() - pos);
        buf[pos..pos + n].copy_from_slice(&word[start..start + n]);
        pos += n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_depends_only_on_seed_and_absolute_offset() {
        let mut whole = vec![0u8; 4096];
        fill_pattern(7, 1000, &mut whole);
        for (start, len) in [(0usize, 1usize), (3, 5), (7, 9), (100, 3996), (4095, 1)] {
            let mut part = vec![0u8; len];
            fill_pattern(7, 1000 + start as u64, &mut part);
            assert_eq!(part, whole[start..start + len]);
        }
    }

    #[test]
    fn pattern_is_never_zero_and_differs_between_seeds() {
        let mut a = vec![0u8; 512];
        let mut b = vec![0u8; 512];
        fill_pattern(1, 0, &mut a);
        fill_pattern(2, 0, &mut b);
        assert!(a.iter().all(|&x| x != 0));
        assert_ne!(a, b);
        let mut one = [0u8; 1];
        for seed in 0..1000 {
            fill_pattern(seed, seed * 3, &mut one);
            assert_ne!(one[0], 0);
        }
    }

    #[test]
    fn range_of_ops() {
        assert_eq!(
            IoOp::Write {
                offset: 1,
                len: 2,
                seed: 3
            }
            .range(),
            Some((1, 2))
        );
        assert_eq!(IoOp::Flush.range(), None);
        assert_eq!(IoOp::Extend { new_size: 9 }.range(), None);
    }
}
