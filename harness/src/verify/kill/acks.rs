//! The acknowledgement log: what the worker's writers were told was written.
//!
//! Every writer owns the disk's 1 MiB chunks `c` with `c % writers == k`, so no other
//! writer touches its bytes; only a revert changes them back. Before each write it
//! records the write as *in flight*, after it returns it records it as *acknowledged* in
//! a ring of the last [`RING`] writes. Records are written with `pwrite`, so a killed
//! worker leaves them in the page cache like the disk's own data. After a kill every
//! byte must read back as the newest acknowledged write that covers it, or as the write
//! in flight: an acknowledged write lost by a kill is a *lost byte*.
//!
//! A revert changes every byte back: the lifecycle thread pauses the writers, sets the
//! log's generation to an odd number, reverts and sets it to the next even one. Records
//! carry the generation they were written under; after a kill only the records of the
//! current, even generation are checked (an odd one means the kill hit a revert, and
//! nothing is checked).

use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::Path;

use workloads::fill_pattern;

/// Acknowledged writes kept per writer.
pub(super) const RING: u64 = 256;
/// Bytes per chunk of the disk that one writer owns.
pub(super) const CHUNK: u64 = 1 << 20;
const REC: u64 = 64;
const MAGIC: u64 = 0x6b69_6c6c_6163_6b73; // "killacks"

/// One write or unmap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Rec {
    /// 1, 2, ... per writer.
    pub(super) seq: u64,
    pub(super) offset: u64,
    pub(super) len: u64,
    /// Content seed ([`fill_pattern`]); an unmap writes zeros.
    pub(super) seed: u64,
    pub(super) unmap: bool,
    /// The log's generation when it was written.
    pub(super) gen: u64,
}

impl Rec {
    /// Fills `buf` (`len` bytes) with what this record wrote.
    pub(super) fn content(&self, buf: &mut [u8]) {
        if self.unmap {
            buf.fill(0);
        } else {
            fill_pattern(self.seed, self.offset, buf);
        }
    }

    fn encode(&self) -> [u8; REC as usize] {
        let words = [
            MAGIC,
            self.seq,
            self.offset,
            self.len,
            self.seed,
            u64::from(self.unmap),
            self.gen,
        ];
        let mut out = [0u8; REC as usize];
        for (i, w) in words.iter().chain([&checksum(&words)]).enumerate() {
            out[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
        }
        out
    }

    fn decode(b: &[u8]) -> Option<Self> {
        let w = |i: usize| u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
        let words: [u64; 7] = std::array::from_fn(w);
        (words[0] == MAGIC && w(7) == checksum(&words) && words[1] != 0 && words[5] <= 1).then_some(Self {
            seq: words[1],
            offset: words[2],
            len: words[3],
            seed: words[4],
            unmap: words[5] == 1,
            gen: words[6],
        })
    }
}

/// A torn or stale record fails this.
fn checksum(words: &[u64]) -> u64 {
    words.iter().fold(0x9e37_79b9_7f4a_7c15u64, |h, &w| {
        (h ^ w).wrapping_mul(0xff51_afd7_ed55_8ccd).rotate_left(29)
    })
}

/// Offset of writer `k`'s in-flight record; its ring follows.
fn slot(k: u64) -> u64 {
    REC + k * (1 + RING) * REC
}

/// The log, as the worker writes it.
#[derive(Debug)]
pub(super) struct AckLog {
    file: File,
}

impl AckLog {
    /// Creates the log at `path` (a previous one is replaced), generation 0.
    pub(super) fn create(path: &Path) -> std::io::Result<Self> {
        let file = File::create(path)?;
        let log = Self { file };
        log.set_gen(0)?;
        Ok(log)
    }

    /// Sets the generation (odd while a revert is under way).
    pub(super) fn set_gen(&self, gen: u64) -> std::io::Result<()> {
        let words = [MAGIC, gen];
        let mut b = [0u8; 24];
        for (i, w) in words.iter().chain([&checksum(&words)]).enumerate() {
            b[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
        }
        self.file.write_all_at(&b, 0)
    }

    /// Writer `k` is about to write `r`.
    pub(super) fn in_flight(&self, k: u64, r: &Rec) -> std::io::Result<()> {
        self.file.write_all_at(&r.encode(), slot(k))
    }

    /// Writer `k`'s write `r` returned.
    pub(super) fn acknowledged(&self, k: u64, r: &Rec) -> std::io::Result<()> {
        self.file.write_all_at(&r.encode(), slot(k) + (1 + r.seq % RING) * REC)
    }
}

/// What a killed worker's log says.
#[derive(Debug, Default)]
pub(super) struct Acks {
    /// The generation; `None` when the header is unreadable.
    pub(super) gen: Option<u64>,
    /// Per writer: the write in flight (if any) and the acknowledged ones, oldest first.
    pub(super) writers: Vec<(Option<Rec>, Vec<Rec>)>,
}

impl Acks {
    /// Reads the log of `writers` writers at `path`.
    pub(super) fn read(path: &Path, writers: u64) -> std::io::Result<Self> {
        let bytes = std::fs::read(path)?;
        let rec = |off: u64| {
            let off = off as usize;
            bytes.get(off..off + REC as usize).and_then(Rec::decode)
        };
        let gen = bytes.get(..24).and_then(|h| {
            let w = |i: usize| u64::from_le_bytes(h[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
            (w(0) == MAGIC && w(2) == checksum(&[w(0), w(1)])).then(|| w(1))
        });
        let writers = (0..writers)
            .map(|k| {
                let mut ring: Vec<Rec> = (0..RING).filter_map(|i| rec(slot(k) + (1 + i) * REC)).collect();
                ring.sort_by_key(|r| r.seq);
                (rec(slot(k)), ring)
            })
            .collect();
        Ok(Self { gen, writers })
    }
}

/// What checking a live disk against the log found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct Durability {
    /// Bytes whose content the log determines, compared.
    pub(super) checked: u64,
    /// Of those, bytes that hold neither the acknowledged content nor the write in flight.
    pub(super) lost: u64,
    /// The first such byte: its offset, what it should hold (and the write that put it
    /// there), what it holds, and the write in flight.
    pub(super) first_lost: Option<(u64, u8, Rec, u8, Option<Rec>)>,
    /// A write was in flight at the kill.
    pub(super) in_flight: bool,
}

/// Checks `live` (the disk after the kill) against the log of generation `gen`.
pub(super) fn check(acks: &Acks, gen: u64, live: &[u8]) -> Durability {
    let mut d = Durability::default();
    let (mut want, mut alt) = (Vec::new(), Vec::new());
    for (flight, ring) in &acks.writers {
        let inside = |r: &Rec| -> Option<Range<usize>> {
            let end = r.offset.checked_add(r.len)?;
            (r.gen == gen && end <= live.len() as u64).then_some(r.offset as usize..end as usize)
        };
        // A write in flight may have landed in part: its bytes may hold either.
        let acked = ring.last().map_or(0, |r| r.seq);
        let flight = flight.filter(|f| f.seq > acked);
        d.in_flight |= flight.is_some();
        let flight = flight.and_then(|f| {
            let range = inside(&f)?;
            alt.resize(range.len(), 0);
            f.content(&mut alt);
            Some((f, range))
        });
        // Newest first: a byte is checked against the newest acknowledged write that covers it.
        let mut claimed: Vec<Range<usize>> = Vec::new();
        for r in ring.iter().rev() {
            let Some(range) = inside(r) else { continue };
            want.resize(range.len(), 0);
            r.content(&mut want);
            for part in uncovered(range.clone(), &claimed) {
                d.checked += part.len() as u64;
                let w = &want[part.start - range.start..part.end - range.start];
                if live[part.clone()] == *w {
                    continue;
                }
                for (i, &b) in part.clone().zip(w) {
                    let other = flight
                        .as_ref()
                        .and_then(|(_, fr)| fr.contains(&i).then(|| alt[i - fr.start]));
                    if live[i] != b && other != Some(live[i]) {
                        d.lost += 1;
                        d.first_lost
                            .get_or_insert((i as u64, b, *r, live[i], flight.as_ref().map(|f| f.0)));
                    }
                }
            }
            claimed.push(range);
        }
    }
    d
}

/// The parts of `range` outside every range of `claimed`.
fn uncovered(range: Range<usize>, claimed: &[Range<usize>]) -> Vec<Range<usize>> {
    let mut parts = vec![range];
    for c in claimed {
        parts = parts
            .into_iter()
            .flat_map(|p| {
                if c.end <= p.start || p.end <= c.start {
                    return vec![p];
                }
                [p.start..c.start.max(p.start), c.end.min(p.end)..p.end]
                    .into_iter()
                    .filter(|q| !q.is_empty())
                    .collect()
            })
            .collect();
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(seq: u64, offset: u64, len: u64, seed: u64) -> Rec {
        Rec {
            seq,
            offset,
            len,
            seed,
            unmap: false,
            gen: 2,
        }
    }

    #[test]
    fn the_newest_acknowledged_write_or_the_one_in_flight_must_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("acks");
        let log = AckLog::create(&path).unwrap();
        log.set_gen(2).unwrap();
        let (a, b, c) = (rec(1, 100, 50, 7), rec(2, 120, 10, 8), rec(3, 0, 200, 9));
        for r in [a, b] {
            log.in_flight(0, &r).unwrap();
            log.acknowledged(0, &r).unwrap();
        }
        log.in_flight(0, &c).unwrap();
        let acks = Acks::read(&path, 1).unwrap();
        assert_eq!(acks.gen, Some(2));
        assert_eq!(acks.writers[0], (Some(c), vec![a, b]));

        let mut live = vec![0u8; 300];
        a.content(&mut live[100..150]);
        b.content(&mut live[120..130]);
        let d = check(&acks, 2, &live);
        assert_eq!((d.checked, d.lost, d.in_flight), (50, 0, true));
        // The write in flight landed in part: still fine.
        c.content(&mut live[0..200]);
        live[100..110].copy_from_slice(&{
            let mut x = vec![0; 10];
            a.content(&mut x);
            x
        });
        assert_eq!(check(&acks, 2, &live).lost, 0);
        // An acknowledged byte that holds neither is lost; b's bytes are wanted over a's.
        let mut live2 = vec![0u8; 300];
        a.content(&mut live2[100..150]);
        let d = check(&acks, 2, &live2);
        assert!(
            d.lost > 0 && d.first_lost.is_some_and(|l| l.0 >= 120 && l.2 == b),
            "{d:?}"
        );
        // Records of another generation are not checked.
        assert_eq!(check(&acks, 4, &live2).checked, 0);
    }

    #[test]
    fn uncovered_cuts_the_claimed_ranges_out() {
        assert_eq!(uncovered(10..50, &[]), vec![10..50]);
        assert_eq!(uncovered(10..50, &[20..30, 0..12, 45..60]), vec![12..20, 30..45]);
        assert_eq!(uncovered(10..50, &[0..100]), Vec::<Range<usize>>::new());
    }

    #[test]
    fn a_torn_record_is_not_read() {
        let r = rec(5, 1, 2, 3);
        let mut b = r.encode();
        assert_eq!(Rec::decode(&b), Some(r));
        b[20] ^= 1;
        assert_eq!(Rec::decode(&b), None);
    }
}
