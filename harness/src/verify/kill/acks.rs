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
pub(super) const RING: u64 = 4096;
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

/// A byte that reads back wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Lost {
    /// Its offset.
    pub(super) at: u64,
    /// What it should hold.
    pub(super) want: u8,
    /// The acknowledged write that put that there (`None`: the byte was not
    /// written since the base image).
    pub(super) by: Option<Rec>,
    /// What it holds.
    pub(super) got: u8,
    /// The write in flight of the writer that owns it, if any.
    pub(super) flight: Option<Rec>,
}

/// What checking a live disk against the log found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct Durability {
    /// Bytes whose content the log (and the base image) determines, compared.
    pub(super) checked: u64,
    /// Of those, bytes that hold neither what they should nor the write in flight.
    pub(super) lost: u64,
    /// The first such byte.
    pub(super) first_lost: Option<Lost>,
    /// A write was in flight at the kill.
    pub(super) in_flight: bool,
}

impl Acks {
    /// Whether the log holds every write of its worker (none was pushed out of
    /// the rings): only then does it say what every byte holds, given the image
    /// the worker started from.
    pub(super) fn complete(&self) -> bool {
        self.writers
            .iter()
            .all(|(_, ring)| ring.last().is_none_or(|r| r.seq == ring.len() as u64))
    }
}

/// Checks `live` (the disk after the kill) against the log of generation `gen`.
/// Without `base`, only the bytes the log's acknowledged writes cover are checked:
/// each must hold the newest such write. With `base` (the image the worker
/// started from, when the log is [`complete`](Acks::complete) and the worker did
/// not revert), every byte is: the others must hold the base (zeros past its end:
/// the disk was extended). A byte the write in flight covers may hold that
/// write's content instead (it may have landed in part).
pub(super) fn check(acks: &Acks, gen: u64, live: &[u8], base: Option<&[u8]>) -> Durability {
    let mut d = Durability::default();
    let n = live.len();
    let inside = |r: &Rec| -> Option<Range<usize>> {
        let end = r.offset.checked_add(r.len)?;
        (r.gen == gen && end <= n as u64).then_some(r.offset as usize..end as usize)
    };
    // What every byte should hold: the base, then each acknowledged write, oldest
    // first (a writer's bytes are its own, so writers' order does not matter).
    let mut expect = vec![0u8; n];
    let mut known = Vec::new();
    if let Some(b) = base {
        let k = b.len().min(n);
        expect[..k].copy_from_slice(&b[..k]);
        known.push(0..n);
    }
    let mut by: Vec<(Range<usize>, Rec)> = Vec::new();
    let mut flights: Vec<(Rec, Range<usize>, Vec<u8>)> = Vec::new();
    for (flight, ring) in &acks.writers {
        let acked = ring.last().map_or(0, |r| r.seq);
        if let Some(f) = flight.filter(|f| f.seq > acked) {
            d.in_flight = true;
            if let Some(range) = inside(&f) {
                let mut content = vec![0u8; range.len()];
                f.content(&mut content);
                flights.push((f, range, content));
            }
        }
        for r in ring {
            if let Some(range) = inside(r) {
                r.content(&mut expect[range.clone()]);
                known.push(range.clone());
                by.push((range, *r));
            }
        }
    }
    for k in merged(known) {
        d.checked += k.len() as u64;
        if live[k.clone()] == expect[k.clone()] {
            continue;
        }
        for i in k.filter(|&i| live[i] != expect[i]) {
            let flight = flights.iter().find(|(_, fr, _)| fr.contains(&i));
            if flight.is_some_and(|(_, fr, c)| c[i - fr.start] == live[i]) {
                continue;
            }
            d.lost += 1;
            d.first_lost.get_or_insert(Lost {
                at: i as u64,
                want: expect[i],
                by: by.iter().rev().find(|(r, _)| r.contains(&i)).map(|(_, rec)| *rec),
                got: live[i],
                flight: flight.map(|f| f.0),
            });
        }
    }
    d
}

/// `ranges` sorted and merged where they overlap or touch.
fn merged(mut ranges: Vec<Range<usize>>) -> Vec<Range<usize>> {
    ranges.sort_by_key(|r| r.start);
    let mut out: Vec<Range<usize>> = Vec::new();
    for r in ranges {
        match out.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
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
        let d = check(&acks, 2, &live, None);
        assert_eq!((d.checked, d.lost, d.in_flight), (50, 0, true));
        // The write in flight landed in part: still fine.
        c.content(&mut live[0..200]);
        live[100..110].copy_from_slice(&{
            let mut x = vec![0; 10];
            a.content(&mut x);
            x
        });
        assert_eq!(check(&acks, 2, &live, None).lost, 0);
        // An acknowledged byte that holds neither is lost; b's bytes are wanted over a's.
        let mut live2 = vec![0u8; 300];
        a.content(&mut live2[100..150]);
        let d = check(&acks, 2, &live2, None);
        assert!(
            d.lost > 0 && d.first_lost.is_some_and(|l| l.at >= 120 && l.by == Some(b)),
            "{d:?}"
        );
        // Records of another generation are not checked.
        assert_eq!(check(&acks, 4, &live2, None).checked, 0);
    }

    #[test]
    fn with_a_base_image_every_byte_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("acks");
        let log = AckLog::create(&path).unwrap();
        log.set_gen(2).unwrap();
        let (a, c) = (rec(1, 100, 50, 7), rec(2, 400, 100, 9));
        log.in_flight(0, &a).unwrap();
        log.acknowledged(0, &a).unwrap();
        log.in_flight(0, &c).unwrap();
        let acks = Acks::read(&path, 1).unwrap();
        assert!(acks.complete());
        // The worker started from `base` (300 bytes; the disk was extended to 600).
        let base: Vec<u8> = (0..300).map(|i| i as u8 | 1).collect();
        let mut live = vec![0u8; 600];
        live[..300].copy_from_slice(&base);
        a.content(&mut live[100..150]);
        let d = check(&acks, 2, &live, Some(&base));
        assert_eq!((d.checked, d.lost), (600, 0));
        // The write in flight landed in part.
        let mut part = vec![0u8; 100];
        c.content(&mut part);
        live[400..430].copy_from_slice(&part[..30]);
        assert_eq!(check(&acks, 2, &live, Some(&base)).lost, 0);
        // A byte no write touched that changed is lost; so is one past the old end.
        live[10] ^= 0xff;
        live[350] = 1;
        let d = check(&acks, 2, &live, Some(&base));
        assert_eq!(d.lost, 2);
        assert_eq!(d.first_lost.map(|l| (l.at, l.by)), Some((10, None)));
        // Without the base only the acknowledged bytes are checked.
        assert_eq!(
            check(&acks, 2, &live, None),
            Durability {
                checked: 50,
                lost: 0,
                first_lost: None,
                in_flight: true
            }
        );
    }

    #[test]
    fn a_log_is_complete_until_its_ring_wraps() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("acks");
        let log = AckLog::create(&path).unwrap();
        for seq in 1..=RING {
            log.acknowledged(0, &rec(seq, 0, 1, seq)).unwrap();
        }
        assert!(Acks::read(&path, 1).unwrap().complete());
        log.acknowledged(0, &rec(RING + 1, 0, 1, 0)).unwrap();
        assert!(!Acks::read(&path, 1).unwrap().complete(), "write 1 was pushed out");
        // A record that is missing (torn) also makes it incomplete.
        let log = AckLog::create(&path).unwrap();
        log.acknowledged(0, &rec(1, 0, 1, 0)).unwrap();
        log.acknowledged(0, &rec(3, 0, 1, 0)).unwrap();
        assert!(!Acks::read(&path, 1).unwrap().complete());
    }

    #[test]
    fn merged_joins_overlapping_and_touching_ranges() {
        assert_eq!(merged(vec![]), Vec::<Range<usize>>::new());
        assert_eq!(
            merged(vec![20..30, 0..12, 10..15, 30..31, 45..60]),
            vec![0..15, 20..31, 45..60]
        );
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
