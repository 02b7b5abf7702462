//! The change-tracking file (the `-ctk` file's analogue): header and layout.
//!
//! ```text
//! offset 0        header page (4 KiB): two header slots of 2 KiB, little-endian, versioned
//! bitmap[0]       active/frozen marking bitmap: flat leaf, then one summary bit per leaf page
//! bitmap[1]       the other one
//! epoch map       u32 per block + max-summary levels
//! ```
//! Regions are placed for the largest capacity the file can ever grow to
//! (`MAX_CAPACITY`), so extending a disk never moves anything; the file is
//! sparse, so unused reserve costs nothing. Closed epochs that cannot be
//! folded yet (a live snapshot still needs them) live in epoch files beside
//! it (`epochs.rs`).
//!
//! # Crash safety of the header
//! The header is updated in place through the mapping, at any moment a
//! process may be killed. So it has two slots: an update writes the slot
//! *not* holding the newest generation, with the generation incremented and
//! a checksum written last; a reader takes the valid slot of the higher
//! generation. A kill in the middle of an update leaves the previous header
//! valid; a torn slot fails its checksum and is ignored.

use std::sync::atomic::{compiler_fence, Ordering};

use uuid::Uuid;

use crate::bitmap::BitmapLayout;
use crate::epochmap::EpochMapLayout;

pub(crate) const MAGIC: &[u8; 8] = b"CBTSCTK\0";
/// 3: marking bitmaps are flat with one summary bit per 4 KiB page (2 had
/// summary levels of one bit per word), and the epoch map's summary fanout is
/// 16 (2 had 64).
pub(crate) const VERSION: u32 = 3;
pub(crate) const HEADER_BYTES: u64 = 4096;
const SLOT_BYTES: usize = 2048;
pub(crate) const MAX_PAST_SESSIONS: usize = 32;
/// Most distinct live snapshot sequences a disk may pin at once.
pub(crate) const MAX_PINS: usize = 64;

pub(crate) const STATE_OPEN: u32 = 1;
pub(crate) const STATE_CLEAN: u32 = 2;

/// Why a tracking session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ResetReason {
    /// Change tracking was turned off.
    Disabled = 1,
    /// The tracker was not closed cleanly and its state could not be
    /// recovered exactly (only after a reverted-to point was lost).
    Unclean = 2,
    /// The tracker's files were damaged.
    Corrupt = 3,
}

impl ResetReason {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::Disabled,
            2 => Self::Unclean,
            _ => Self::Corrupt,
        }
    }

    /// A short human description.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Disabled => "change tracking was turned off",
            Self::Unclean => "the host did not shut down cleanly",
            Self::Corrupt => "the change-tracking state was damaged",
        }
    }
}

/// Fields of the header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Header {
    /// Bumped at every write; the slot with the higher valid one wins.
    pub generation: u64,
    pub state: u32,
    pub granularity_shift: u32,
    pub enabled: bool,
    /// `*` cannot be answered from the tracker alone until the host seeds
    /// the allocation from its layers (after the state was damaged).
    pub allocation_unknown: bool,
    /// The file was recreated after damage: a well-formed change ID of an
    /// unknown session may be from before it, so it is a reset, not foreign.
    pub recreated: bool,
    pub capacity: u64,
    pub max_blocks: u64,
    pub cur_epoch: u64,
    pub last_closed: u64,
    pub folded: u64,
    pub session_start: u64,
    /// Marks of the epochs up to and including this one may be incomplete:
    /// tracking state was damaged while this epoch was open. A revert to a
    /// point before it cannot know all it changes back.
    pub marks_lost_through: u64,
    pub active: u64,
    /// The closed epoch whose frozen bitmap (the inactive one) is not yet
    /// written to its epoch file; 0 if none.
    pub pending: u64,
    pub session: Uuid,
    pub past: Vec<(Uuid, ResetReason)>,
    /// Live snapshot sequences and how many holders each has.
    pub pins: Vec<(u64, u32)>,
}

// Slot layout (offsets inside a slot).
const O_GEN: usize = 8;
const O_VERSION: usize = 16;
const O_STATE: usize = 20;
const O_GSHIFT: usize = 24;
const O_FLAGS: usize = 28;
const O_CAPACITY: usize = 32;
const O_MAX_BLOCKS: usize = 40;
const O_CUR: usize = 48;
const O_LAST: usize = 56;
const O_FOLDED: usize = 64;
const O_SSTART: usize = 72;
const O_ACTIVE: usize = 80;
const O_PENDING: usize = 88;
const O_SESSION: usize = 96;
const O_NPAST: usize = 112;
const O_NPINS: usize = 116;
const O_LOST: usize = 120;
const O_PAST: usize = 128; // 17 bytes each
const O_PINS: usize = O_PAST + MAX_PAST_SESSIONS * 17; // 12 bytes each
const O_SUM: usize = SLOT_BYTES - 8;
const _: () = assert!(O_PINS + MAX_PINS * 12 <= O_SUM);

impl Header {
    /// Writes the header into the older slot of `page`, generation bumped,
    /// checksum last.
    pub(crate) fn write(&mut self, page: &mut [u8]) {
        self.generation += 1;
        let slot = (self.generation % 2) as usize * SLOT_BYTES;
        let out = &mut page[slot..slot + SLOT_BYTES];
        // Invalidate the slot first: a kill before the checksum leaves it torn.
        put64(out, O_SUM, 0);
        compiler_fence(Ordering::SeqCst);
        out[..O_SUM].fill(0);
        out[0..8].copy_from_slice(MAGIC);
        put64(out, O_GEN, self.generation);
        put32(out, O_VERSION, VERSION);
        put32(out, O_STATE, self.state);
        put32(out, O_GSHIFT, self.granularity_shift);
        put32(
            out,
            O_FLAGS,
            u32::from(self.enabled) | (u32::from(self.allocation_unknown) << 1) | (u32::from(self.recreated) << 2),
        );
        put64(out, O_CAPACITY, self.capacity);
        put64(out, O_MAX_BLOCKS, self.max_blocks);
        put64(out, O_CUR, self.cur_epoch);
        put64(out, O_LAST, self.last_closed);
        put64(out, O_FOLDED, self.folded);
        put64(out, O_SSTART, self.session_start);
        put64(out, O_ACTIVE, self.active);
        put64(out, O_PENDING, self.pending);
        put64(out, O_LOST, self.marks_lost_through);
        out[O_SESSION..O_SESSION + 16].copy_from_slice(self.session.as_bytes());
        put32(out, O_NPAST, self.past.len() as u32);
        put32(out, O_NPINS, self.pins.len() as u32);
        for (i, (u, r)) in self.past.iter().enumerate() {
            let at = O_PAST + i * 17;
            out[at..at + 16].copy_from_slice(u.as_bytes());
            out[at + 16] = *r as u8;
        }
        for (i, &(seq, n)) in self.pins.iter().enumerate() {
            let at = O_PINS + i * 12;
            put64(out, at, seq);
            put32(out, at + 8, n);
        }
        let sum = checksum(&out[..O_SUM]);
        // The checksum goes last: a slot is valid only once all of it is written.
        compiler_fence(Ordering::SeqCst);
        put64(out, O_SUM, sum);
    }

    /// Reads the newest valid slot of `page`.
    pub(crate) fn read(page: &[u8]) -> Result<Self, String> {
        if page.len() < HEADER_BYTES as usize {
            return Err("the header page is short".into());
        }
        let slots = [
            Self::decode(&page[..SLOT_BYTES]),
            Self::decode(&page[SLOT_BYTES..2 * SLOT_BYTES]),
        ];
        match slots {
            [Ok(a), Ok(b)] => Ok(if a.generation >= b.generation { a } else { b }),
            [Ok(a), Err(_)] => Ok(a),
            [Err(_), Ok(b)] => Ok(b),
            // Report the slot that at least looks like a header.
            [Err(a), Err(b)] if a.contains("magic") => Err(b),
            [Err(a), Err(_)] => Err(a),
        }
    }

    fn decode(b: &[u8]) -> Result<Self, String> {
        if &b[0..8] != MAGIC {
            return Err("not a cbtsim change-tracking file (bad magic)".into());
        }
        let version = get32(b, O_VERSION);
        if version != VERSION {
            return Err(format!(
                "version {version} is not supported (this build reads {VERSION})"
            ));
        }
        if checksum(&b[..O_SUM]) != get64(b, O_SUM) {
            return Err("the header fails its checksum".into());
        }
        let npast = get32(b, O_NPAST) as usize;
        let npins = get32(b, O_NPINS) as usize;
        if npast > MAX_PAST_SESSIONS || npins > MAX_PINS {
            return Err(format!("{npast} past sessions or {npins} pins recorded"));
        }
        let uuid_at = |at: usize| Uuid::from_slice(&b[at..at + 16]).expect("16 bytes");
        let past = (0..npast)
            .map(|i| (uuid_at(O_PAST + i * 17), ResetReason::from_u8(b[O_PAST + i * 17 + 16])))
            .collect();
        let pins = (0..npins)
            .map(|i| (get64(b, O_PINS + i * 12), get32(b, O_PINS + i * 12 + 8)))
            .collect();
        let flags = get32(b, O_FLAGS);
        let h = Self {
            generation: get64(b, O_GEN),
            state: get32(b, O_STATE),
            granularity_shift: get32(b, O_GSHIFT),
            enabled: flags & 1 != 0,
            allocation_unknown: flags & 2 != 0,
            recreated: flags & 4 != 0,
            capacity: get64(b, O_CAPACITY),
            max_blocks: get64(b, O_MAX_BLOCKS),
            cur_epoch: get64(b, O_CUR),
            last_closed: get64(b, O_LAST),
            folded: get64(b, O_FOLDED),
            session_start: get64(b, O_SSTART),
            active: get64(b, O_ACTIVE),
            pending: get64(b, O_PENDING),
            marks_lost_through: get64(b, O_LOST),
            session: uuid_at(O_SESSION),
            past,
            pins,
        };
        if !(9..=30).contains(&h.granularity_shift) {
            return Err(format!("granularity 2^{} is out of range", h.granularity_shift));
        }
        if h.active > 1
            || h.last_closed >= h.cur_epoch
            || h.folded > h.last_closed
            || h.pending > h.last_closed
            || (h.pending != 0 && h.pending <= h.folded)
            || h.marks_lost_through > h.cur_epoch
        {
            return Err("inconsistent epoch counters".into());
        }
        Ok(h)
    }
}

/// FNV-1a: enough to catch a torn or damaged slot or file.
pub(crate) fn checksum(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}
fn get32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn get64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Where each region lives in the file.
#[derive(Debug, Clone)]
pub(crate) struct Layout {
    pub bitmap: BitmapLayout,
    pub bitmap_offsets: [u64; 2],
    pub emap: EpochMapLayout,
    pub emap_offset: u64,
    pub file_len: u64,
}

impl Layout {
    pub(crate) fn new(max_blocks: u64) -> Self {
        let bitmap = BitmapLayout::new(max_blocks);
        let b0 = HEADER_BYTES;
        let b1 = b0 + bitmap.bytes();
        let emap_offset = b1 + bitmap.bytes();
        let emap = EpochMapLayout::new(max_blocks);
        let file_len = emap_offset + emap.bytes();
        Self {
            bitmap,
            bitmap_offsets: [b0, b1],
            emap,
            emap_offset,
            file_len,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header {
            generation: 0,
            state: STATE_CLEAN,
            granularity_shift: 16,
            enabled: true,
            allocation_unknown: false,
            recreated: true,
            capacity: 1 << 36,
            max_blocks: 1 << 30,
            cur_epoch: 9,
            last_closed: 8,
            folded: 6,
            session_start: 3,
            marks_lost_through: 2,
            active: 1,
            pending: 8,
            session: Uuid::new_v4(),
            past: vec![
                (Uuid::new_v4(), ResetReason::Disabled),
                (Uuid::new_v4(), ResetReason::Unclean),
            ],
            pins: vec![(7, 1), (8, 2)],
        }
    }

    #[test]
    fn header_roundtrip_and_validation() {
        let mut h = header();
        let mut page = vec![0u8; HEADER_BYTES as usize];
        h.write(&mut page);
        assert_eq!(Header::read(&page).unwrap(), h);
        // The one written slot holds generation 1; the other is empty.
        let slot = SLOT_BYTES;
        let mut bad = page.clone();
        bad[slot] = b'X';
        assert!(Header::read(&bad).unwrap_err().contains("magic"));
        let mut bad = page.clone();
        bad[slot + O_VERSION] = 99;
        assert!(Header::read(&bad).unwrap_err().contains("version"));
        let mut bad = page.clone();
        // A counter changed without its checksum: the slot is torn.
        bad[slot + O_LAST] ^= 1;
        assert!(Header::read(&bad).unwrap_err().contains("checksum"));
    }

    #[test]
    fn a_torn_update_leaves_the_previous_header() {
        let mut h = header();
        let mut page = vec![0u8; HEADER_BYTES as usize];
        h.write(&mut page);
        let first = h.clone();
        h.cur_epoch = 10;
        h.last_closed = 9;
        h.pending = 9;
        h.write(&mut page);
        assert_eq!(Header::read(&page).unwrap(), h);
        // Tear the newest slot (a kill in the middle of an update).
        let slot = (h.generation % 2) as usize * SLOT_BYTES;
        page[slot + O_CUR] ^= 0xff;
        assert_eq!(Header::read(&page).unwrap(), first);
    }
}
