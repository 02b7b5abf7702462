//! Chunk names (BLAKE3) and the chunk file encoding: a tag byte, then the
//! data raw or zstd-compressed.

use std::fmt;

use crate::{BackupError, MAX_CHUNK};

/// The BLAKE3 hash of a chunk's uncompressed content: its name.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkHash(pub [u8; 32]);

impl ChunkHash {
    /// The hash of `data`.
    pub fn of(data: &[u8]) -> Self {
        Self(*blake3::hash(data).as_bytes())
    }

    /// Parses 64 lowercase or uppercase hex digits.
    pub fn from_hex(s: &str) -> Option<Self> {
        if s.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(Self(out))
    }
}

impl fmt::Display for ChunkHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for ChunkHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkHash({self})")
    }
}

const TAG_RAW: u8 = 0;
const TAG_ZSTD: u8 = 1;
/// zstd level: fast; backup throughput matters more than the last percent.
const ZSTD_LEVEL: i32 = 1;

/// The bytes of a chunk file for `data`: compressed only when that is smaller.
pub(crate) fn encode(data: &[u8], compress: bool) -> Vec<u8> {
    if compress {
        if let Ok(z) = zstd::bulk::compress(data, ZSTD_LEVEL) {
            if z.len() + 1 < data.len() {
                let mut out = Vec::with_capacity(z.len() + 1);
                out.push(TAG_ZSTD);
                out.extend_from_slice(&z);
                return out;
            }
        }
    }
    let mut out = Vec::with_capacity(data.len() + 1);
    out.push(TAG_RAW);
    out.extend_from_slice(data);
    out
}

/// Decodes a chunk file's bytes and checks them against `hash`.
pub(crate) fn decode(hash: ChunkHash, file: &[u8]) -> Result<Vec<u8>, BackupError> {
    let corrupt = |reason: String| BackupError::CorruptChunk { hash, reason };
    let data = match file.split_first() {
        Some((&TAG_RAW, rest)) => rest.to_vec(),
        Some((&TAG_ZSTD, rest)) => zstd::bulk::decompress(rest, MAX_CHUNK as usize)
            .map_err(|e| corrupt(format!("zstd data does not decode: {e}")))?,
        Some((&t, _)) => return Err(corrupt(format!("unknown encoding tag {t}"))),
        None => return Err(corrupt("the file is empty".into())),
    };
    if data.is_empty() || data.len() as u64 > MAX_CHUNK {
        return Err(corrupt(format!("{} bytes of data", data.len())));
    }
    let actual = ChunkHash::of(&data);
    if actual != hash {
        return Err(corrupt(format!("its content hashes to {actual}")));
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let h = ChunkHash::of(b"abc");
        assert_eq!(ChunkHash::from_hex(&h.to_string()), Some(h));
        assert_eq!(ChunkHash::from_hex("zz"), None);
    }

    #[test]
    fn encode_decode_both_ways() {
        let zeros_and_text: Vec<u8> = (0..65536u32).map(|i| (i % 7) as u8).collect();
        let h = ChunkHash::of(&zeros_and_text);
        let z = encode(&zeros_and_text, true);
        assert_eq!(z[0], TAG_ZSTD);
        assert!(z.len() < 4096);
        assert_eq!(decode(h, &z).unwrap(), zeros_and_text);
        let raw = encode(&zeros_and_text, false);
        assert_eq!(raw[0], TAG_RAW);
        assert_eq!(decode(h, &raw).unwrap(), zeros_and_text);
    }

    #[test]
    fn decode_rejects_a_flipped_byte() {
        let data = vec![5u8; 1000];
        let h = ChunkHash::of(&data);
        let mut raw = encode(&data, false);
        raw[10] ^= 1;
        assert!(matches!(decode(h, &raw), Err(BackupError::CorruptChunk { .. })));
        let mut z = encode(&data, true);
        let last = z.len() - 1;
        z[last] ^= 0xff;
        assert!(decode(h, &z).is_err());
        assert!(decode(h, &[]).is_err());
    }
}
