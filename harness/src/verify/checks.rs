//! The checks of a run: query answers against the frozen images of snapshots and
//! baselines, or the typed error the model expects.

use std::sync::atomic::Ordering;

use vadp::VadpError;

use super::lifecycle::Lifecycle;
use super::model::{Baseline, Expect, Snap};
use super::REMEMBERED_SESSIONS;
use crate::apply::changed_areas;

/// What comparing two images against a reported answer found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Comparison {
    /// Blocks with a differing byte outside the areas.
    pub missed_blocks: u64,
    /// Differing bytes outside the areas.
    pub missed_bytes: u64,
    /// Reported bytes in blocks with no difference.
    pub extra_bytes: u64,
    /// Blocks with a difference.
    pub changed_blocks: u64,
}

/// Compares `old` (zero-extended) with `new` over `new`'s length, block by
/// block of `granularity` bytes, against the reported `areas` (sorted,
/// non-overlapping, inside `new`).
pub fn compare(old: &[u8], new: &[u8], areas: &[(u64, u64)], granularity: u64) -> Comparison {
    let g = granularity as usize;
    let len = new.len();
    let blocks = len.div_ceil(g);
    let mut covered = vec![0u64; blocks];
    for &(s, l) in areas {
        let (s, e) = (s as usize, (s + l) as usize);
        let mut p = s;
        while p < e {
            let b = p / g;
            let be = ((b + 1) * g).min(e);
            covered[b] += (be - p) as u64;
            p = be;
        }
    }
    let inside = |i: usize| {
        let k = areas.partition_point(|&(s, _)| s as usize <= i);
        k > 0 && {
            let (s, l) = areas[k - 1];
            i < (s + l) as usize
        }
    };
    let zeros = vec![0u8; g];
    let mut c = Comparison::default();
    for (b, &cov) in covered.iter().enumerate() {
        let (s, e) = (b * g, ((b + 1) * g).min(len));
        let n = &new[s..e];
        let o = if s < old.len() {
            &old[s..e.min(old.len())]
        } else {
            &[][..]
        };
        let differs = o != &n[..o.len()] || n[o.len()..] != zeros[..n.len() - o.len()];
        if !differs {
            c.extra_bytes += cov;
            continue;
        }
        c.changed_blocks += 1;
        if cov == (e - s) as u64 {
            continue;
        }
        let missed = (s..e)
            .filter(|&i| old.get(i).copied().unwrap_or(0) != new[i] && !inside(i))
            .count() as u64;
        if missed > 0 {
            c.missed_blocks += 1;
            c.missed_bytes += missed;
        }
    }
    c
}

impl Lifecycle<'_> {
    /// Every change ID of one session shares its UUID; a new session has a new one.
    pub(super) fn check_session(&mut self, snap: &str, cid: &str) {
        let uuid = cid.split('/').next().unwrap_or("").to_owned();
        match &self.model.session_uuid {
            Some(u) if *u == uuid => {}
            Some(u) => self.violation(format!("snapshot {snap}: session {uuid} where {u} was current")),
            None => {
                if !self.model.seen_uuids.insert(uuid.clone()) {
                    self.violation(format!("snapshot {snap}: a new tracking session reuses UUID {uuid}"));
                }
                self.model.session_uuid = Some(uuid);
            }
        }
    }

    pub(super) fn query(&self, snap: &str, since: &str) -> Result<Vec<(u64, u64)>, VadpError> {
        let paged = changed_areas(&self.world.vm(), snap, 0, since)?;
        let st = &self.world.stats;
        st.query_pages.fetch_add(paged.pages, Ordering::Relaxed);
        if paged.pages > 1 {
            st.multi_page_answers.fetch_add(1, Ordering::Relaxed);
        }
        Ok(paged.areas)
    }

    /// `*` at `snap` covers every non-zero byte.
    pub(super) fn check_all_allocated(&self, snap: &Snap) {
        let st = &self.world.stats;
        match (self.model.cbt, self.query(&snap.name, "*")) {
            (true, Ok(areas)) => {
                let c = compare(&[], &snap.image, &areas, self.cfg.granularity.bytes());
                st.checks.fetch_add(1, Ordering::Relaxed);
                st.missed_blocks.fetch_add(c.missed_blocks, Ordering::Relaxed);
                if c.missed_blocks > 0 {
                    self.violation(format!(
                        "`*` at {} misses {} blocks of data ({} bytes)",
                        snap.name, c.missed_blocks, c.missed_bytes
                    ));
                }
            }
            (false, Err(VadpError::TrackingDisabled)) => st.expected("tracking_disabled"),
            (cbt, r) => self.violation(format!("`*` at {} with CBT {cbt}: {r:?}", snap.name)),
        }
    }

    /// The query at `at` since `base`'s change ID: exact per the frozen
    /// views, or the typed error the model expects.
    pub(super) fn check_pair(&self, at: &Snap, base: &Baseline) {
        let m = &self.model;
        let expect = if !m.cbt {
            Expect::Disabled
        } else if base.session != m.session {
            Expect::Reset {
                sessions_ago: m.session - base.session,
            }
        } else if base.order > at.order {
            Expect::AfterSnapshot
        } else {
            Expect::Answer
        };
        let st = &self.world.stats;
        let got = self.query(&at.name, &base.cid);
        let what = || format!("query at {} since {} ({})", at.name, base.name, base.cid);
        match (expect, got) {
            (Expect::Answer, Ok(areas)) => {
                let c = compare(&base.image, &at.image, &areas, self.cfg.granularity.bytes());
                st.checks.fetch_add(1, Ordering::Relaxed);
                st.missed_blocks.fetch_add(c.missed_blocks, Ordering::Relaxed);
                st.extra_bytes.fetch_add(c.extra_bytes, Ordering::Relaxed);
                if c.missed_blocks > 0 {
                    self.violation(format!(
                        "{}: {} changed blocks ({} bytes) not reported",
                        what(),
                        c.missed_blocks,
                        c.missed_bytes
                    ));
                }
            }
            (Expect::Disabled, Err(VadpError::TrackingDisabled)) => st.expected("tracking_disabled"),
            (Expect::Reset { .. }, Err(VadpError::TrackingReset { .. })) => st.expected("tracking_reset"),
            (Expect::Reset { sessions_ago }, Err(VadpError::ForeignChangeId { .. }))
                if sessions_ago > REMEMBERED_SESSIONS =>
            {
                st.expected("foreign_change_id")
            }
            (Expect::AfterSnapshot, Err(VadpError::ChangeIdAfterSnapshot { .. })) => {
                st.expected("change_id_after_snapshot")
            }
            (e, Ok(areas)) => self.violation(format!(
                "{}: answered {} areas where the model expects {e:?}",
                what(),
                areas.len()
            )),
            (e, Err(err)) => self.violation(format!("{}: error {err:?} where the model expects {e:?}", what())),
        }
    }

    /// Re-reads a kept snapshot (it must be unchanged) and checks it against every baseline.
    pub(super) fn recheck(&mut self, i: usize) {
        let snap = self.model.snaps[i].clone();
        let vm = self.world.vm();
        match self.image(&vm, &snap.name) {
            Ok(img) => {
                self.world.stats.frozen_checks.fetch_add(1, Ordering::Relaxed);
                if img[..] != snap.image[..] {
                    self.violation(format!("snapshot {} changed after it was taken", snap.name));
                }
            }
            Err(e) => self.violation(format!("re-read of {}: {e}", snap.name)),
        }
        drop(vm);
        if self.model.cbt && snap.session == self.model.session {
            self.check_all_allocated(&snap);
        }
        let baselines: Vec<Baseline> = self.model.baselines.iter().cloned().collect();
        for b in &baselines {
            self.check_pair(&snap, b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::compare;

    #[test]
    fn compare_finds_unreported_differences_and_counts_extra() {
        let g = 16;
        let old = vec![0u8; 64];
        let mut new = old.clone();
        new[3] = 1; // block 0
        new[40] = 2; // block 2
                     // Both reported; block 1 reported without a change.
        let c = compare(&old, &new, &[(0, 48)], g);
        assert_eq!((c.missed_blocks, c.extra_bytes, c.changed_blocks), (0, 16, 2));
        // Block 2 not reported.
        let c = compare(&old, &new, &[(0, 16)], g);
        assert_eq!((c.missed_blocks, c.missed_bytes), (1, 1));
        // A partial area that covers the changed byte is enough; one that does not is not.
        assert_eq!(compare(&old, &new, &[(0, 4), (40, 1)], g).missed_blocks, 0);
        assert_eq!(compare(&old, &new, &[(0, 3), (40, 1)], g).missed_blocks, 1);
    }

    #[test]
    fn compare_zero_extends_a_shorter_old_image() {
        let old = vec![5u8; 20];
        let mut new = vec![5u8; 40];
        new[25..].fill(0);
        // Bytes 20..25 are new non-zero data past the old end: must be reported.
        assert_eq!(compare(&old, &new, &[], 16).missed_blocks, 1);
        assert_eq!(compare(&old, &new, &[(16, 16)], 16).missed_blocks, 0);
        // The new zero range past the old end is not a change.
        new[20..25].fill(0);
        assert_eq!(compare(&old, &new, &[], 16), Default::default());
        // Past the new image's end nothing is compared.
        assert_eq!(compare(&new, &old, &[], 16).missed_blocks, 0);
    }
}
