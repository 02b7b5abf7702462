//! An in-memory backend, for examples, tests and measurements: exports held
//! in a `Vec<u8>`, with allocation tracked per granule (`base:allocation`)
//! and any number of dirty bitmaps (`qemu:dirty-bitmap:NAME`) that every
//! write, trim and zeroing marks.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::backend::{
    BlockSize, Export, ExportError, ExportListing, Exports, Extent, OpenError, BASE_ALLOCATION, QEMU_DIRTY_BITMAP,
    STATE_DIRTY, STATE_HOLE, STATE_ZERO,
};

/// A set of named in-memory exports.
#[derive(Debug, Default)]
pub struct MemoryExports {
    exports: RwLock<BTreeMap<String, Arc<MemoryExport>>>,
}

impl MemoryExports {
    /// No exports.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) export `name`.
    pub fn insert(&self, name: &str, export: Arc<MemoryExport>) {
        self.exports
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string(), export);
    }

    /// Export `name`, if present.
    pub fn get(&self, name: &str) -> Option<Arc<MemoryExport>> {
        self.exports
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }
}

impl Exports for MemoryExports {
    fn list(&self) -> Vec<ExportListing> {
        let exports = self.exports.read().unwrap_or_else(|e| e.into_inner());
        exports
            .iter()
            .map(|(name, e)| ExportListing {
                name: name.clone(),
                description: e.description.clone(),
            })
            .collect()
    }

    fn open(&self, name: &str) -> Result<Arc<dyn Export>, OpenError> {
        match self.get(name) {
            Some(e) => Ok(e),
            None => Err(OpenError::Unknown(name.to_string())),
        }
    }
}

#[derive(Debug)]
struct State {
    data: Vec<u8>,
    /// One flag per granule: written since creation (or since a trim).
    allocated: Vec<bool>,
    /// Bitmap name -> one dirty flag per granule.
    bitmaps: BTreeMap<String, Vec<bool>>,
}

/// One in-memory export.
#[derive(Debug)]
pub struct MemoryExport {
    state: RwLock<State>,
    granularity: u64,
    read_only: bool,
    block_size: BlockSize,
    description: String,
}

impl MemoryExport {
    /// An export of `size` zero bytes, all unallocated, tracked in granules
    /// of `granularity` bytes (a power of two).
    ///
    /// # Panics
    /// If `granularity` is not a power of two or `size` does not fit memory.
    pub fn new(size: u64, granularity: u64) -> Self {
        assert!(granularity.is_power_of_two(), "granularity must be a power of two");
        let size = usize::try_from(size).expect("export size fits in memory");
        let granules = size.div_ceil(granularity as usize);
        MemoryExport {
            state: RwLock::new(State {
                data: vec![0; size],
                allocated: vec![false; granules],
                bitmaps: BTreeMap::new(),
            }),
            granularity,
            read_only: false,
            block_size: BlockSize::default(),
            description: String::new(),
        }
    }

    /// Makes the export read-only.
    pub fn read_only(mut self) -> Self {
        self.read_only = true;
        self
    }

    /// Sets the advertised block sizes.
    pub fn with_block_size(mut self, block_size: BlockSize) -> Self {
        self.block_size = block_size;
        self
    }

    /// Sets the description shown by `NBD_OPT_LIST` and `NBD_INFO_DESCRIPTION`.
    pub fn with_description(mut self, description: &str) -> Self {
        self.description = description.to_string();
        self
    }

    fn lock(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_mut(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a clean dirty bitmap, offered as `qemu:dirty-bitmap:NAME`.
    pub fn add_bitmap(&self, name: &str) {
        let mut s = self.lock_mut();
        let n = s.allocated.len();
        s.bitmaps.insert(name.to_string(), vec![false; n]);
    }

    /// Marks every bitmap clean.
    pub fn clear_bitmaps(&self) {
        for b in self.lock_mut().bitmaps.values_mut() {
            b.fill(false);
        }
    }

    /// A copy of the contents.
    pub fn contents(&self) -> Vec<u8> {
        self.lock().data.clone()
    }

    /// Granule size of allocation and dirty tracking.
    pub fn granularity(&self) -> u64 {
        self.granularity
    }

    /// Whether each granule is allocated.
    pub fn allocation(&self) -> Vec<bool> {
        self.lock().allocated.clone()
    }

    /// Whether each granule is dirty in bitmap `name`.
    pub fn bitmap(&self, name: &str) -> Option<Vec<bool>> {
        self.lock().bitmaps.get(name).cloned()
    }

    fn granules(&self, offset: u64, len: u64) -> std::ops::Range<usize> {
        if len == 0 {
            return 0..0;
        }
        (offset / self.granularity) as usize..(offset + len).div_ceil(self.granularity) as usize
    }

    fn range(&self, s: &State, offset: u64, len: u64) -> Result<std::ops::Range<usize>, ExportError> {
        match offset.checked_add(len) {
            Some(end) if end <= s.data.len() as u64 => Ok(offset as usize..end as usize),
            _ => Err(ExportError::Invalid(format!(
                "range {offset}+{len} beyond {}",
                s.data.len()
            ))),
        }
    }

    fn mark_dirty(&self, s: &mut State, offset: u64, len: u64) {
        let g = self.granules(offset, len);
        for b in s.bitmaps.values_mut() {
            b[g.clone()].fill(true);
        }
    }
}

impl Export for MemoryExport {
    fn size(&self) -> u64 {
        self.lock().data.len() as u64
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn block_size(&self) -> BlockSize {
        self.block_size
    }

    fn description(&self) -> String {
        self.description.clone()
    }

    fn can_multi_conn(&self) -> bool {
        true
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), ExportError> {
        let s = self.lock();
        let r = self.range(&s, offset, buf.len() as u64)?;
        buf.copy_from_slice(&s.data[r]);
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), ExportError> {
        if self.read_only {
            return Err(ExportError::ReadOnly);
        }
        let mut s = self.lock_mut();
        let r = self.range(&s, offset, data.len() as u64)?;
        s.data[r].copy_from_slice(data);
        let g = self.granules(offset, data.len() as u64);
        s.allocated[g].fill(true);
        self.mark_dirty(&mut s, offset, data.len() as u64);
        Ok(())
    }

    fn flush(&self) -> Result<(), ExportError> {
        Ok(())
    }

    /// Zeroes the range; granules wholly inside it become unallocated.
    fn trim(&self, offset: u64, len: u64) -> Result<(), ExportError> {
        self.write_zeroes(offset, len, true)
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> Result<(), ExportError> {
        if self.read_only {
            return Err(ExportError::ReadOnly);
        }
        let mut s = self.lock_mut();
        let r = self.range(&s, offset, len)?;
        s.data[r].fill(0);
        let g = self.granules(offset, len);
        if may_trim {
            // Only granules the range covers whole lose their allocation.
            let size = s.data.len() as u64;
            for i in g.clone() {
                let start = i as u64 * self.granularity;
                let end = (start + self.granularity).min(size);
                if start >= offset && end <= offset + len {
                    s.allocated[i] = false;
                }
            }
        } else {
            s.allocated[g].fill(true);
        }
        self.mark_dirty(&mut s, offset, len);
        Ok(())
    }

    fn meta_contexts(&self) -> Vec<String> {
        let s = self.lock();
        let mut names = vec![BASE_ALLOCATION.to_string()];
        names.extend(s.bitmaps.keys().map(|b| format!("{QEMU_DIRTY_BITMAP}{b}")));
        names
    }

    fn block_status(
        &self,
        context: &str,
        offset: u64,
        length: u64,
        extents: &mut Vec<Extent>,
    ) -> Result<(), ExportError> {
        let s = self.lock();
        let size = s.data.len() as u64;
        let end = offset
            .checked_add(length)
            .filter(|&e| e <= size)
            .ok_or_else(|| ExportError::Invalid(format!("range {offset}+{length} beyond {size}")))?;
        let flag_of: Box<dyn Fn(usize) -> u32 + '_> = if context == BASE_ALLOCATION {
            Box::new(|i| if s.allocated[i] { 0 } else { STATE_HOLE | STATE_ZERO })
        } else if let Some(bits) = context.strip_prefix(QEMU_DIRTY_BITMAP).and_then(|b| s.bitmaps.get(b)) {
            Box::new(move |i| if bits[i] { STATE_DIRTY } else { 0 })
        } else {
            return Err(ExportError::Invalid(format!("no metadata context {context:?}")));
        };
        let mut pos = offset;
        while pos < end {
            let i = (pos / self.granularity) as usize;
            let granule_end = ((i as u64 + 1) * self.granularity).min(end);
            let flags = flag_of(i);
            match extents.last_mut() {
                Some(last) if last.flags == flags => last.length += granule_end - pos,
                _ => extents.push(Extent {
                    length: granule_end - pos,
                    flags,
                }),
            }
            pos = granule_end;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_allocate_and_dirty_trims_free() {
        let e = MemoryExport::new(4096, 1024);
        e.add_bitmap("b");
        e.write(1500, &[1, 2, 3]).unwrap();
        assert_eq!(e.allocation(), vec![false, true, false, false]);
        assert_eq!(e.bitmap("b").unwrap(), vec![false, true, false, false]);
        let mut ext = Vec::new();
        e.block_status(BASE_ALLOCATION, 0, 4096, &mut ext).unwrap();
        assert_eq!(
            ext,
            vec![
                Extent { length: 1024, flags: 3 },
                Extent { length: 1024, flags: 0 },
                Extent { length: 2048, flags: 3 }
            ]
        );
        e.trim(1000, 2048).unwrap();
        assert_eq!(e.allocation(), vec![false, false, false, false]);
        assert_eq!(e.bitmap("b").unwrap(), vec![true, true, true, false]);
        assert!(e.contents().iter().all(|&b| b == 0));
    }

    #[test]
    fn read_only_refuses_writes() {
        let e = MemoryExport::new(4096, 1024).read_only();
        assert_eq!(e.write(0, &[1]), Err(ExportError::ReadOnly));
    }
}
