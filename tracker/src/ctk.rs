//! The change-tracking file (the `-ctk` file's analogue): header and layout.
//!
//! ```text
//! offset 0        header page (4 KiB), little-endian, versioned
//! bitmap[0]       active/frozen marking bitmap, all summary levels
//! bitmap[1]       the other one
//! epoch map       u32 per block + max-summary levels
//! ```
//! Regions are placed for the largest capacity the file can ever grow to
//! (`MAX_CAPACITY`), so extending a disk never moves anything; the file is
//! sparse, so unused reserve costs nothing. Closed epochs that cannot be
//! folded yet (a live snapshot still needs them) and the pins are written
//! to a sidecar `<file>.epochs` at a clean close.

use uuid::Uuid;

use crate::bitmap::BitmapLayout;
use crate::epochmap::EpochMapLayout;

pub(crate) const MAGIC: &[u8; 8] = b"CBTSCTK\0";
pub(crate) const VERSION: u32 = 1;
pub(crate) const HEADER_BYTES: u64 = 4096;
pub(crate) const MAX_PAST_SESSIONS: usize = 32;

/// Where `marks_lost_through` lives: after the largest list of past
/// sessions (104 + 32 * 17 bytes), 8-aligned. Files written before the field
/// existed hold 0 there: nothing lost.
const MARKS_LOST_AT: usize = 656;

pub(crate) const STATE_OPEN: u32 = 1;
pub(crate) const STATE_CLEAN: u32 = 2;

/// Why a tracking session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ResetReason {
    /// Change tracking was turned off.
    Disabled = 1,
    /// The tracker was not closed cleanly (crash, kill, power loss).
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

/// Fields of the header page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Header {
    pub state: u32,
    pub granularity_shift: u32,
    pub enabled: bool,
    pub allocation_unknown: bool,
    pub capacity: u64,
    pub max_blocks: u64,
    pub cur_epoch: u64,
    pub last_closed: u64,
    pub folded: u64,
    pub session_start: u64,
    /// Marks of the epochs up to and including this one may be incomplete:
    /// tracking was reset (an unclean close, damaged state) while this epoch
    /// was open. A revert to a point before it cannot know what it changes back.
    pub marks_lost_through: u64,
    pub active: u64,
    pub session: Uuid,
    pub past: Vec<(Uuid, ResetReason)>,
}

impl Header {
    pub(crate) fn encode(&self, out: &mut [u8]) {
        out[..HEADER_BYTES as usize].fill(0);
        out[0..8].copy_from_slice(MAGIC);
        put32(out, 8, VERSION);
        put32(out, 12, self.state);
        put32(out, 16, self.granularity_shift);
        put32(
            out,
            20,
            u32::from(self.enabled) | (u32::from(self.allocation_unknown) << 1),
        );
        put64(out, 24, self.capacity);
        put64(out, 32, self.max_blocks);
        put64(out, 40, self.cur_epoch);
        put64(out, 48, self.last_closed);
        put64(out, 56, self.folded);
        put64(out, 64, self.session_start);
        put64(out, 72, self.active);
        out[80..96].copy_from_slice(self.session.as_bytes());
        put32(out, 96, self.past.len() as u32);
        for (i, (u, r)) in self.past.iter().enumerate() {
            let at = 104 + i * 17;
            out[at..at + 16].copy_from_slice(u.as_bytes());
            out[at + 16] = *r as u8;
        }
        put64(out, MARKS_LOST_AT, self.marks_lost_through);
    }

    pub(crate) fn decode(b: &[u8]) -> Result<Self, String> {
        if b.len() < HEADER_BYTES as usize || &b[0..8] != MAGIC {
            return Err("not a cbtsim change-tracking file (bad magic)".into());
        }
        let version = get32(b, 8);
        if version != VERSION {
            return Err(format!(
                "version {version} is not supported (this build reads {VERSION})"
            ));
        }
        let npast = get32(b, 96) as usize;
        if npast > MAX_PAST_SESSIONS {
            return Err(format!("{npast} past sessions recorded (at most {MAX_PAST_SESSIONS})"));
        }
        let uuid_at = |at: usize| Uuid::from_slice(&b[at..at + 16]).expect("16 bytes");
        let past = (0..npast)
            .map(|i| (uuid_at(104 + i * 17), ResetReason::from_u8(b[104 + i * 17 + 16])))
            .collect();
        let flags = get32(b, 20);
        let h = Self {
            state: get32(b, 12),
            granularity_shift: get32(b, 16),
            enabled: flags & 1 != 0,
            allocation_unknown: flags & 2 != 0,
            capacity: get64(b, 24),
            max_blocks: get64(b, 32),
            cur_epoch: get64(b, 40),
            last_closed: get64(b, 48),
            folded: get64(b, 56),
            session_start: get64(b, 64),
            marks_lost_through: get64(b, MARKS_LOST_AT),
            active: get64(b, 72),
            session: uuid_at(80),
            past,
        };
        if !(9..=30).contains(&h.granularity_shift) {
            return Err(format!("granularity 2^{} is out of range", h.granularity_shift));
        }
        if h.active > 1
            || h.last_closed >= h.cur_epoch
            || h.folded > h.last_closed
            || h.marks_lost_through > h.cur_epoch
        {
            return Err("inconsistent epoch counters".into());
        }
        Ok(h)
    }
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

    #[test]
    fn header_roundtrip_and_validation() {
        let h = Header {
            state: STATE_CLEAN,
            granularity_shift: 16,
            enabled: true,
            allocation_unknown: false,
            capacity: 1 << 36,
            max_blocks: 1 << 30,
            cur_epoch: 9,
            last_closed: 8,
            folded: 7,
            session_start: 3,
            marks_lost_through: 2,
            active: 1,
            session: Uuid::new_v4(),
            past: vec![
                (Uuid::new_v4(), ResetReason::Disabled),
                (Uuid::new_v4(), ResetReason::Unclean),
            ],
        };
        let mut page = vec![0u8; HEADER_BYTES as usize];
        h.encode(&mut page);
        assert_eq!(Header::decode(&page).unwrap(), h);
        let mut bad = page.clone();
        bad[0] = b'X';
        assert!(Header::decode(&bad).unwrap_err().contains("magic"));
        let mut bad = page.clone();
        bad[8] = 99;
        assert!(Header::decode(&bad).unwrap_err().contains("version"));
        let mut bad = page.clone();
        bad[MARKS_LOST_AT..MARKS_LOST_AT + 8].copy_from_slice(&10u64.to_le_bytes());
        assert!(Header::decode(&bad).is_err(), "marks lost after the open epoch");
        let mut bad = page;
        bad[48..56].copy_from_slice(&100u64.to_le_bytes());
        assert!(Header::decode(&bad).is_err());
    }
}
