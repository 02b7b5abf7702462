//! A compact set of blocks for a closed epoch that cannot be folded yet.
//!
//! Chunks of 4096 bits (512 bytes) are allocated only where blocks were
//! written, so a frozen epoch costs about one bit per written block when
//! writes are dense and one chunk per touched 4096-block range when sparse.

use std::collections::BTreeMap;

const CHUNK_WORDS: usize = 64;
const CHUNK_BITS: u64 = 64 * CHUNK_WORDS as u64;

/// A sparse bit set over block indices, iterated in order.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SparseBits {
    chunks: BTreeMap<u64, Box<[u64; CHUNK_WORDS]>>,
}

impl SparseBits {
    /// ORs the 64 bits of leaf word `word` (blocks `word*64 ..`).
    pub fn or_word(&mut self, word: u64, bits: u64) {
        if bits == 0 {
            return;
        }
        let chunk = self
            .chunks
            .entry(word / CHUNK_WORDS as u64)
            .or_insert_with(|| Box::new([0; CHUNK_WORDS]));
        chunk[(word % CHUNK_WORDS as u64) as usize] |= bits;
    }

    /// Calls `f(word, bits)` for every non-zero word, in order.
    pub fn for_each_word(&self, mut f: impl FnMut(u64, u64)) {
        for (&c, words) in &self.chunks {
            for (i, &w) in words.iter().enumerate() {
                if w != 0 {
                    f(c * CHUNK_WORDS as u64 + i as u64, w);
                }
            }
        }
    }

    /// Number of blocks in the set.
    pub fn len(&self) -> u64 {
        self.chunks
            .values()
            .flat_map(|c| c.iter())
            .map(|w| u64::from(w.count_ones()))
            .sum()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    /// Heap bytes held (chunks only).
    pub fn heap_bytes(&self) -> u64 {
        self.chunks.len() as u64 * (CHUNK_WORDS as u64 * 8 + 32)
    }

    /// Runs of set blocks `(first, len)` starting at or after `from`, in order.
    pub fn runs_from(&self, from: u64) -> SparseRuns<'_> {
        SparseRuns {
            chunks: self.chunks.range(from / CHUNK_BITS..),
            cur: None,
            pos: from,
            pending: None,
        }
    }

    /// Serialises as little-endian words: chunk count, then per chunk its
    /// index and 64 words.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&(self.chunks.len() as u64).to_le_bytes());
        for (&c, words) in &self.chunks {
            out.extend_from_slice(&c.to_le_bytes());
            for w in words.iter() {
                out.extend_from_slice(&w.to_le_bytes());
            }
        }
    }

    /// The inverse of [`encode`](Self::encode); `None` if `input` is short.
    pub fn decode(input: &mut &[u8]) -> Option<Self> {
        let n = take_u64(input)?;
        let mut chunks = BTreeMap::new();
        for _ in 0..n {
            let c = take_u64(input)?;
            let mut words = Box::new([0u64; CHUNK_WORDS]);
            for w in words.iter_mut() {
                *w = take_u64(input)?;
            }
            chunks.insert(c, words);
        }
        Some(Self { chunks })
    }
}

pub(crate) fn take_u64(input: &mut &[u8]) -> Option<u64> {
    let (head, rest) = input.split_first_chunk::<8>()?;
    *input = rest;
    Some(u64::from_le_bytes(*head))
}

/// Iterator over coalesced runs of a [`SparseBits`].
#[derive(Debug)]
pub struct SparseRuns<'a> {
    chunks: std::collections::btree_map::Range<'a, u64, Box<[u64; CHUNK_WORDS]>>,
    cur: Option<(u64, &'a [u64; CHUNK_WORDS])>,
    /// Next block to look at.
    pos: u64,
    /// A run being extended.
    pending: Option<(u64, u64)>,
}

impl SparseRuns<'_> {
    /// The next set block at or after `self.pos`, advancing through chunks.
    fn next_block(&mut self) -> Option<u64> {
        loop {
            if let Some((c, words)) = self.cur {
                let base = c * CHUNK_BITS;
                let end = base + CHUNK_BITS;
                while self.pos < end {
                    let off = self.pos - base;
                    let w = words[(off / 64) as usize] >> (off % 64);
                    if w != 0 {
                        self.pos += u64::from(w.trailing_zeros());
                        return Some(self.pos);
                    }
                    self.pos = base + (off / 64 + 1) * 64;
                }
                self.cur = None;
            }
            let (&c, words) = self.chunks.next()?;
            self.cur = Some((c, words));
            self.pos = self.pos.max(c * CHUNK_BITS);
        }
    }
}

impl Iterator for SparseRuns<'_> {
    type Item = (u64, u64);

    fn next(&mut self) -> Option<(u64, u64)> {
        loop {
            match (self.next_block(), self.pending) {
                (Some(b), Some((s, l))) if b == s + l => {
                    self.pending = Some((s, l + 1));
                    self.pos = b + 1;
                }
                (Some(b), pending) => {
                    self.pending = Some((b, 1));
                    self.pos = b + 1;
                    if pending.is_some() {
                        return pending;
                    }
                }
                (None, pending) => {
                    self.pending = None;
                    return pending;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from_blocks(blocks: &[u64]) -> SparseBits {
        let mut s = SparseBits::default();
        for &b in blocks {
            s.or_word(b / 64, 1 << (b % 64));
        }
        s
    }

    #[test]
    fn runs_coalesce_across_words_and_chunks() {
        let mut blocks: Vec<u64> = (60..70).collect();
        blocks.extend(4090..4100);
        blocks.push(1 << 40);
        let s = from_blocks(&blocks);
        let runs: Vec<_> = s.runs_from(0).collect();
        assert_eq!(runs, vec![(60, 10), (4090, 10), (1 << 40, 1)]);
        assert_eq!(
            s.runs_from(65).collect::<Vec<_>>(),
            vec![(65, 5), (4090, 10), (1 << 40, 1)]
        );
        assert_eq!(s.runs_from(5000).collect::<Vec<_>>(), vec![(1 << 40, 1)]);
        assert_eq!(s.len(), 21);
    }

    #[test]
    fn encode_roundtrip() {
        let s = from_blocks(&[1, 2, 3, 99_999, 1 << 33]);
        let mut buf = Vec::new();
        s.encode(&mut buf);
        let mut input = &buf[..];
        assert_eq!(SparseBits::decode(&mut input), Some(s));
        assert!(input.is_empty());
        assert_eq!(SparseBits::decode(&mut &buf[..buf.len() - 1]), None);
    }
}
