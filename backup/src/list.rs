//! The listing of a repository's points: each point's header, its chain and its sizes.

use std::collections::HashMap;

use serde::Serialize;

use crate::point::PointMeta;
use crate::repo::Repository;
use crate::BackupError;

/// One point as `backup list` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PointListing {
    /// The point's header.
    #[serde(flatten)]
    pub meta: PointMeta,
    /// The points it was built on that are still in the repository, nearest
    /// first: its parent, the parent's parent, ... down to a full point. Every
    /// point restores on its own (its index is complete): the chain says
    /// where its data came from, not what it needs.
    pub chain: Vec<String>,
    /// Whether the chain ends at a point that prune deleted (else at a full point).
    pub chain_pruned: bool,
    /// The disks' total size.
    pub disk_bytes: u64,
    /// Bytes of the non-zero chunks the point references (its data; the
    /// rest reads as zeros).
    pub data_bytes: u64,
}

/// Every point of the repository, oldest first, with its chain and sizes.
pub fn list(repo: &Repository) -> Result<Vec<PointListing>, BackupError> {
    let metas = repo.points()?;
    let by_id: HashMap<&str, &PointMeta> = metas.iter().map(|m| (m.point.as_str(), m)).collect();
    let out = metas
        .iter()
        .map(|m| {
            let mut chain = Vec::new();
            let mut pruned = false;
            let mut next = m.parent.as_deref();
            while let Some(id) = next {
                match by_id.get(id) {
                    // Parents are older: a longer chain than there are points is a loop.
                    Some(p) if chain.len() < metas.len() => {
                        chain.push(id.to_owned());
                        next = p.parent.as_deref();
                    }
                    Some(_) => break,
                    None => {
                        pruned = true;
                        break;
                    }
                }
            }
            PointListing {
                chain,
                chain_pruned: pruned,
                disk_bytes: m.disks.iter().map(|d| d.capacity).sum(),
                data_bytes: m
                    .disks
                    .iter()
                    .map(|d| d.chunks.saturating_mul(d.chunk_size).min(d.capacity))
                    .sum(),
                meta: m.clone(),
            }
        })
        .collect();
    Ok(out)
}
