//! The map of a disk from `QueryChangedDiskAreas` answers only.
//!
//! For a disk at snapshot `t` and the change IDs `c1 .. cn` issued before it
//! (oldest first), the blocks last written in the epoch after `ck` are those
//! changed since `ck` but not since `ck+1`. The answers since older change
//! IDs contain those since newer ones, so a cell's newest epoch is the
//! newest `k` whose answer touches it; `*` (every allocated area) marks what
//! was written before `c1` (grey). Each answer is paged to the end of the
//! disk and marks the cells its areas touch: the work is in proportion to
//! the areas answered plus the cells, never to the capacity.

use vadp::{changed_areas, DataProtection, ErrorKind, VadpError};

use crate::geometry::{Geometry, Shape};
use crate::{palette, ChangePoint, DiskMap, Epoch, MapError, SinceAnswer, OLDER, UNWRITTEN};

/// What to draw.
#[derive(Debug, Clone)]
pub struct MapQuery<'a> {
    /// The VM.
    pub vm: &'a str,
    /// The disk's index.
    pub disk: usize,
    /// The snapshot whose disk is drawn.
    pub snapshot: &'a str,
    /// What to call that point in the picture (the snapshot's name, or
    /// "now" for a snapshot taken just for the map).
    pub label: &'a str,
    /// The snapshot's own change ID for the disk, if known.
    pub change_id: Option<&'a str>,
    /// The disk's tracking granularity in bytes.
    pub granularity: u64,
    /// The change IDs whose epochs get a color, oldest first.
    pub chain: &'a [ChangePoint],
    /// Also outline the answer since this change ID (or `*`).
    pub since: Option<&'a str>,
    /// How many cells, and their layout.
    pub shape: Shape,
}

/// Whether a failed query since an old change ID only means that its epoch
/// cannot be told apart (it is then left out, with a note).
fn skippable(e: &VadpError) -> bool {
    matches!(
        e.kind(),
        ErrorKind::TrackingReset | ErrorKind::ForeignChangeId | ErrorKind::ChangeIdAfterSnapshot
    )
}

/// Pages through the answer since `change_id`, calling `each(start, end)`
/// per area; returns (areas, bytes).
fn each_area<H: DataProtection + ?Sized>(
    host: &H,
    q: &MapQuery<'_>,
    change_id: &str,
    mut each: impl FnMut(u64, u64),
) -> Result<(u64, u64), VadpError> {
    let (mut n, mut bytes) = (0u64, 0u64);
    for a in changed_areas(host, q.vm, q.snapshot, q.disk, change_id) {
        let a = a?;
        n += 1;
        bytes += a.length;
        each(a.start, a.end());
    }
    Ok((n, bytes))
}

/// Draws the map of `q` from the host's answers.
pub fn compute<H: DataProtection + ?Sized>(host: &H, q: &MapQuery<'_>) -> Result<DiskMap, MapError> {
    if !q.granularity.is_power_of_two() {
        return Err(MapError::InvalidArgument(format!(
            "granularity {} is not a power of two",
            q.granularity
        )));
    }
    let capacity = host.disk_capacity(q.vm, q.snapshot, q.disk)?;
    if capacity == 0 {
        return Err(MapError::InvalidArgument("the disk is empty".into()));
    }
    let geometry = Geometry::new(capacity, q.granularity, q.shape);
    let mut cells = vec![UNWRITTEN; geometry.cells as usize];
    let mark = |cells: &mut Vec<u8>, class: u8, s: u64, e: u64| {
        for c in geometry.cell_of(s)..=geometry.cell_of(e - 1) {
            let c = &mut cells[c as usize];
            *c = (*c).max(class);
        }
    };
    let (_, allocated_bytes) = each_area(host, q, "*", |s, e| mark(&mut cells, OLDER, s, e))?;

    let mut notes = Vec::new();
    let mut unanswered = 0;
    let mut kept: Vec<(&ChangePoint, u64)> = Vec::new();
    // The newest epochs matter most: with more change IDs than classes, the oldest are grey.
    let room = usize::from(u8::MAX - OLDER);
    let skip = q.chain.len().saturating_sub(room);
    if skip > 0 {
        notes.push(format!("{skip} more change IDs than colors: their epochs are grey"));
    }
    for p in &q.chain[skip..] {
        let class = OLDER + 1 + kept.len() as u8;
        // Marks go to a copy, so an answer that fails halfway marks nothing.
        let mut next = cells.clone();
        match each_area(host, q, &p.change_id, |s, e| mark(&mut next, class, s, e)) {
            Ok((_, bytes)) => {
                cells = next;
                kept.push((p, bytes));
            }
            Err(e) if skippable(&e) => match &p.snapshot {
                Some(s) => notes.push(format!("change ID {} ({s}) left out: {e}", p.change_id)),
                None => unanswered += 1,
            },
            Err(e) => return Err(e.into()),
        }
    }
    if unanswered > 0 {
        notes.push(format!(
            "{unanswered} change IDs of the history were left out: not answerable at {} (issued before tracking started or was reset)",
            q.label
        ));
    }

    let colors = palette(kept.len());
    let mut counts = vec![0u32; OLDER as usize + 1 + kept.len()];
    for &c in &cells {
        counts[c as usize] += 1;
    }
    let epochs: Vec<Epoch> = kept
        .iter()
        .enumerate()
        .map(|(i, (p, bytes))| {
            let newer = kept.get(i + 1).map_or(0, |k| k.1);
            Epoch {
                change_id: p.change_id.clone(),
                from: p.snapshot.clone(),
                to: kept
                    .get(i + 1)
                    .map(|k| k.0.snapshot.clone().unwrap_or_else(|| k.0.change_id.clone()))
                    .unwrap_or_else(|| q.label.to_owned()),
                bytes: bytes.saturating_sub(newer),
                cells: counts[OLDER as usize + 1 + i],
                color: colors[OLDER as usize + 1 + i].clone(),
            }
        })
        .collect();
    let older_bytes = allocated_bytes.saturating_sub(kept.first().map_or(0, |k| k.1));

    let since = match q.since {
        None => None,
        Some(cid) => {
            let cid = cid.trim();
            let mut hits: Vec<u32> = Vec::new();
            let (areas, bytes) = each_area(host, q, cid, |s, e| {
                for c in geometry.cell_of(s)..=geometry.cell_of(e - 1) {
                    if hits.last() != Some(&c) {
                        hits.push(c);
                    }
                }
            })
            .map_err(|e| MapError::Since {
                change_id: cid.to_owned(),
                source: e,
            })?;
            Some(SinceAnswer {
                change_id: cid.to_owned(),
                areas,
                bytes,
                share: bytes as f64 / capacity as f64,
                cells: hits,
            })
        }
    };

    Ok(DiskMap {
        vm: q.vm.to_owned(),
        disk: q.disk,
        at: q.label.to_owned(),
        at_change_id: q.change_id.map(str::to_owned),
        capacity,
        granularity: q.granularity,
        geometry,
        cells,
        colors,
        older_cells: counts[OLDER as usize],
        unwritten_cells: counts[UNWRITTEN as usize],
        allocated_bytes,
        older_bytes,
        epochs,
        since,
        notes,
    })
}

/// The change IDs whose epochs a map at snapshot `at` colors, oldest first,
/// and `at`'s own change ID. `snapshots` are the VM's, oldest first, each
/// with the disk's change ID (absent when CBT was off).
///
/// Without `history`, the change IDs are those of the snapshots older than
/// `at`. With `history = n`, they are the `n` change IDs issued just before
/// `at`'s, whether or not their snapshots still exist: a change ID of this
/// host is `SESSION/SEQUENCE`, one sequence number per snapshot, and every
/// one of the tracking session stays valid after its snapshot is removed.
pub fn chain(
    snapshots: &[(String, Option<String>)],
    at: &str,
    history: Option<u32>,
) -> Result<(Vec<ChangePoint>, Option<String>), MapError> {
    let pos = snapshots
        .iter()
        .position(|(n, _)| n == at)
        .ok_or_else(|| MapError::NoSnapshot(at.to_owned()))?;
    let at_cid = snapshots[pos].1.clone();
    let name_of = |cid: &str| {
        snapshots
            .iter()
            .find(|(_, c)| c.as_deref() == Some(cid))
            .map(|(n, _)| n.clone())
    };
    let Some(n) = history else {
        let points = snapshots[..pos]
            .iter()
            .filter_map(|(name, cid)| {
                cid.as_ref().map(|c| ChangePoint {
                    change_id: c.clone(),
                    snapshot: Some(name.clone()),
                })
            })
            .collect();
        return Ok((points, at_cid));
    };
    let Some(cid) = at_cid.as_deref() else {
        return Err(MapError::InvalidArgument(format!(
            "snapshot {at} has no change ID (CBT was off): no history to draw"
        )));
    };
    let (session, seq) = cid
        .rsplit_once('/')
        .and_then(|(s, n)| n.parse::<u64>().ok().map(|n| (s, n)))
        .ok_or_else(|| MapError::InvalidArgument(format!("change ID {cid} is not SESSION/SEQUENCE")))?;
    let points = (seq.saturating_sub(u64::from(n))..seq)
        .map(|k| {
            let c = format!("{session}/{k}");
            ChangePoint {
                snapshot: name_of(&c),
                change_id: c,
            }
        })
        .collect();
    Ok((points, at_cid))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snaps() -> Vec<(String, Option<String>)> {
        vec![
            ("s1".into(), Some("u/2".into())),
            ("off".into(), None),
            ("s2".into(), Some("u/5".into())),
            ("s3".into(), Some("u/6".into())),
        ]
    }

    #[test]
    fn the_chain_is_the_older_snapshots_or_the_history() {
        let (c, at) = chain(&snaps(), "s3", None).unwrap();
        assert_eq!(at.as_deref(), Some("u/6"));
        let ids: Vec<_> = c
            .iter()
            .map(|p| (p.change_id.as_str(), p.snapshot.as_deref()))
            .collect();
        assert_eq!(ids, vec![("u/2", Some("s1")), ("u/5", Some("s2"))]);
        let (c, _) = chain(&snaps(), "s3", Some(3)).unwrap();
        let ids: Vec<_> = c
            .iter()
            .map(|p| (p.change_id.as_str(), p.snapshot.as_deref()))
            .collect();
        assert_eq!(ids, vec![("u/3", None), ("u/4", None), ("u/5", Some("s2"))]);
        let (c, _) = chain(&snaps(), "s1", Some(8)).unwrap();
        assert_eq!(c.len(), 2); // u/0 and u/1
        assert!(chain(&snaps(), "off", Some(2)).is_err());
        assert!(matches!(chain(&snaps(), "nope", None), Err(MapError::NoSnapshot(_))));
    }
}
