//! A compact set of blocks for a closed epoch that cannot be folded yet.
//!
//! Chunks of 4096 bits (512 bytes, and a mask of their non-zero words) are
//! allocated only where blocks were written, so a frozen epoch costs about one
//! bit per written block when writes are dense and one chunk per touched
//! 4096-block range when sparse. Iteration goes from one non-zero word to the
//! next through the mask, so a sparse chunk costs as little as a dense one.

use std::collections::BTreeMap;

const CHUNK_WORDS: usize = 64;
const CHUNK_BITS: u64 = 64 * CHUNK_WORDS as u64;

/// A sparse bit set over block indices, iterated in order.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SparseBits {
    chunks: BTreeMap<u64, Box<Chunk>>,
}

/// 4096 bits, and which of their words are non-zero.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Chunk {
    nonzero: u64,
    words: [u64; CHUNK_WORDS],
}

impl Chunk {
    fn new() -> Box<Self> {
        Box::new(Self {
            nonzero: 0,
            words: [0; CHUNK_WORDS],
        })
    }

    fn or_word(&mut self, i: usize, bits: u64) {
        self.words[i] |= bits;
        if bits != 0 {
            self.nonzero |= 1 << i;
        }
    }

    /// The first set bit at or after bit `off` of the chunk.
    fn next_from(&self, off: u64) -> Option<u64> {
        let wi = (off / 64) as usize;
        let rest = self.words[wi] >> (off % 64);
        if rest != 0 {
            return Some(off + u64::from(rest.trailing_zeros()));
        }
        // Non-zero words after `wi` (two shifts: `wi + 1` may be 64).
        let later = self.nonzero & (u64::MAX << wi << 1);
        (later != 0).then(|| {
            let w = later.trailing_zeros() as usize;
            w as u64 * 64 + u64::from(self.words[w].trailing_zeros())
        })
    }
}

impl SparseBits {
    /// ORs the 64 bits of leaf word `word` (blocks `word*64 ..`).
    pub fn or_word(&mut self, word: u64, bits: u64) {
        if bits == 0 {
            return;
        }
        let chunk = self.chunks.entry(word / CHUNK_WORDS as u64).or_insert_with(Chunk::new);
        chunk.or_word((word % CHUNK_WORDS as u64) as usize, bits);
    }

    /// Calls `f(word, bits)` for every non-zero word, in order.
    pub fn for_each_word(&self, mut f: impl FnMut(u64, u64)) {
        for (&c, chunk) in &self.chunks {
            let mut nonzero = chunk.nonzero;
            while nonzero != 0 {
                let i = nonzero.trailing_zeros() as usize;
                nonzero &= nonzero - 1;
                f(c * CHUNK_WORDS as u64 + i as u64, chunk.words[i]);
            }
        }
    }

    /// Number of blocks in the set.
    pub fn len(&self) -> u64 {
        self.chunks
            .values()
            .flat_map(|c| c.words.iter())
            .map(|w| u64::from(w.count_ones()))
            .sum()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    /// Heap bytes held (chunks only).
    pub fn heap_bytes(&self) -> u64 {
        self.chunks.len() as u64 * (CHUNK_WORDS as u64 * 8 + 8 + 32)
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
        for (&c, chunk) in &self.chunks {
            out.extend_from_slice(&c.to_le_bytes());
            for w in chunk.words.iter() {
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
            let mut chunk = Chunk::new();
            for i in 0..CHUNK_WORDS {
                chunk.or_word(i, take_u64(input)?);
            }
            chunks.insert(c, chunk);
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
    chunks: std::collections::btree_map::Range<'a, u64, Box<Chunk>>,
    cur: Option<(u64, &'a Chunk)>,
    /// Next block to look at.
    pos: u64,
    /// A run being extended.
    pending: Option<(u64, u64)>,
}

impl SparseRuns<'_> {
    /// The next set block at or after `self.pos`, advancing through chunks.
    fn next_block(&mut self) -> Option<u64> {
        loop {
            if let Some((c, chunk)) = self.cur {
                let base = c * CHUNK_BITS;
                if self.pos < base + CHUNK_BITS {
                    if let Some(off) = chunk.next_from(self.pos - base) {
                        self.pos = base + off;
                        return Some(self.pos);
                    }
                }
                self.cur = None;
            }
            let (&c, chunk) = self.chunks.next()?;
            self.cur = Some((c, chunk));
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

    proptest::proptest! {
        /// Runs from any block, words and length against a `BTreeSet`, for
        /// blocks clustered in a few chunks (runs across words and chunks).
        #[test]
        fn matches_a_set(blocks in proptest::collection::vec(0..3 * CHUNK_BITS, 0..200), from in 0..3 * CHUNK_BITS) {
            let s = from_blocks(&blocks);
            let set: std::collections::BTreeSet<u64> = blocks.iter().copied().collect();
            let mut want = Vec::new();
            for &b in set.range(from..) {
                match want.last_mut() {
                    Some((start, len)) if *start + *len == b => *len += 1,
                    _ => want.push((b, 1)),
                }
            }
            proptest::prop_assert_eq!(s.runs_from(from).collect::<Vec<_>>(), want);
            proptest::prop_assert_eq!(s.len(), set.len() as u64);
            let mut words = Vec::new();
            s.for_each_word(|w, bits| words.push((w, bits)));
            proptest::prop_assert!(words.windows(2).all(|p| p[0].0 < p[1].0) && words.iter().all(|&(_, b)| b != 0));
            let mut buf = Vec::new();
            s.encode(&mut buf);
            proptest::prop_assert_eq!(SparseBits::decode(&mut &buf[..]), Some(s));
        }
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
