//! Disk layers: the base disk and the delta disks snapshots create.
//!
//! ```text
//!  live top   [delta L7]  grain map: present/claimed bits, copy-on-write
//!             [delta L4]  frozen: the view of the newest snapshot ends here
//!  base       [base  L0]  flat: every grain present (sparse zeros)
//! ```
//! A layer's data lives in sparse extent files of [`EXTENT_BYTES`], created and
//! mapped on first write, so a 62 TiB disk costs nothing until written and
//! never needs one file over ext4's 16 TiB limit. A read of a grain goes to
//! the topmost layer of the view that has it.
//!
//! # Copy-on-write protocol (delta layers)
//! A write to a grain the top delta lacks first *claims* it (`claimed`
//! test-and-set, AcqRel); the winner copies the grain from the layers below
//! (unless the write covers it whole) and then publishes it (`present`,
//! Release). Losers wait for `present` (Acquire), so they never write into a
//! grain that a copy could still overwrite. Once present, a write is a plain
//! copy into the extent.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::OnceLock;

use parking_lot::Mutex;
use tracker::{AtomicBitmap, BitmapLayout, MAX_CAPACITY};

use crate::error::SimError;
use crate::mmap::Extent;

/// Bytes per extent file (16 GiB).
pub const EXTENT_BYTES: u64 = 16 << 30;
/// The largest copy-on-write grain.
pub const MAX_GRAIN: u64 = 4096;
const EXTENTS: usize = (MAX_CAPACITY / EXTENT_BYTES) as usize;

/// Where write data comes from.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Src<'a> {
    /// These bytes.
    Bytes(&'a [u8]),
    /// Zeroes (an unmap).
    Zero,
}

/// One layer of a disk chain.
#[derive(Debug)]
pub(crate) struct Layer {
    pub(crate) id: u64,
    dir: PathBuf,
    extents: Box<[OnceLock<Extent>]>,
    /// Extent files that existed when the layer was opened. Extents are
    /// created only through this `Layer` (the process holds the VM's lock,
    /// and one VM opens each layer once), which maps each one it creates, so
    /// a read of a never-written extent never asks the file system.
    on_disk: Box<[bool]>,
    create: Mutex<()>,
    grains: Option<GrainMap>,
}

#[derive(Debug)]
struct GrainMap {
    _file: File,
    shift: u32,
    present: AtomicBitmap,
    claimed: AtomicBitmap,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SimError + '_ {
    move |source| SimError::Io {
        path: path.to_owned(),
        source,
    }
}

impl Layer {
    /// Opens (or creates) layer `id` in `dir`. `grain_shift` is `Some` for a delta.
    pub(crate) fn open(dir: &Path, id: u64, grain_shift: Option<u32>) -> Result<Self, SimError> {
        let grains = match grain_shift {
            None => None,
            Some(shift) => {
                let path = dir.join(format!("L{id}.map"));
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(&path)
                    .map_err(io_err(&path))?;
                let layout = BitmapLayout::new(MAX_CAPACITY >> shift);
                let need = 2 * layout.bytes();
                if file.metadata().map_err(io_err(&path))?.len() < need {
                    file.set_len(need).map_err(io_err(&path))?;
                }
                let present = AtomicBitmap::map(&file, 0, layout.clone()).map_err(io_err(&path))?;
                let claimed = AtomicBitmap::map(&file, layout.bytes(), layout).map_err(io_err(&path))?;
                // A claim without a copy (a crash mid-copy) must not block writers:
                // rebuild `claimed` from `present`.
                claimed.drain(|_, _| {});
                present.for_each_word(0, |w, m| claimed.or_leaf_word(w, m));
                Some(GrainMap {
                    _file: file,
                    shift,
                    present,
                    claimed,
                })
            }
        };
        let extents = (0..EXTENTS).map(|_| OnceLock::new()).collect();
        let mut on_disk = vec![false; EXTENTS].into_boxed_slice();
        let prefix = format!("L{id}.");
        for entry in std::fs::read_dir(dir).map_err(io_err(dir))?.flatten() {
            let name = entry.file_name();
            let k = name
                .to_str()
                .and_then(|n| n.strip_prefix(&prefix))
                .and_then(|n| n.strip_suffix(".ext"))
                .and_then(|n| n.parse::<usize>().ok());
            if let Some(k) = k.filter(|&k| k < EXTENTS) {
                on_disk[k] = true;
            }
        }
        Ok(Self {
            id,
            dir: dir.to_owned(),
            extents,
            on_disk,
            create: Mutex::new(()),
            grains,
        })
    }

    fn extent_path(&self, k: usize) -> PathBuf {
        self.dir.join(format!("L{}.{k:04}.ext", self.id))
    }

    /// The extent `k`, mapping an existing file; `None` if never written.
    fn extent(&self, k: usize) -> Result<Option<&Extent>, SimError> {
        if let Some(e) = self.extents[k].get() {
            return Ok(Some(e));
        }
        if !self.on_disk[k] {
            return Ok(None);
        }
        self.extent_mut(k).map(Some)
    }

    /// The extent `k`, created if needed.
    fn extent_mut(&self, k: usize) -> Result<&Extent, SimError> {
        if let Some(e) = self.extents[k].get() {
            return Ok(e);
        }
        let _g = self.create.lock();
        if let Some(e) = self.extents[k].get() {
            return Ok(e);
        }
        let path = self.extent_path(k);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io_err(&path))?;
        if file.metadata().map_err(io_err(&path))?.len() < EXTENT_BYTES {
            file.set_len(EXTENT_BYTES).map_err(io_err(&path))?;
        }
        let e = Extent::map(&file, EXTENT_BYTES).map_err(io_err(&path))?;
        Ok(self.extents[k].get_or_init(|| e))
    }

    /// Whether this layer holds the grain containing byte `offset`.
    #[inline]
    pub(crate) fn has(&self, offset: u64) -> bool {
        match &self.grains {
            None => true,
            Some(g) => g.present.test(offset >> g.shift, Ordering::Acquire),
        }
    }

    /// Grain size in bytes (the whole disk for a base layer).
    pub(crate) fn grain_bytes(&self) -> Option<u64> {
        self.grains.as_ref().map(|g| 1 << g.shift)
    }

    /// Reads from this layer alone (zeros where never written).
    pub(crate) fn read_raw(&self, mut offset: u64, mut buf: &mut [u8]) -> Result<(), SimError> {
        while !buf.is_empty() {
            let k = (offset / EXTENT_BYTES) as usize;
            let within = offset % EXTENT_BYTES;
            let n = buf.len().min((EXTENT_BYTES - within) as usize);
            let (head, tail) = buf.split_at_mut(n);
            match self.extent(k)? {
                Some(e) => e.read(within, head),
                None => head.fill(0),
            }
            buf = tail;
            offset += n as u64;
        }
        Ok(())
    }

    /// Writes to this layer alone.
    pub(crate) fn write_raw(&self, mut offset: u64, len: u64, src: Src<'_>) -> Result<(), SimError> {
        let mut done = 0u64;
        while done < len {
            let k = (offset / EXTENT_BYTES) as usize;
            let within = offset % EXTENT_BYTES;
            let n = (len - done).min(EXTENT_BYTES - within);
            fault_point!(crate::fault::Point::ExtentWrite {
                layer: self.id,
                offset,
                len: n
            });
            match src {
                Src::Bytes(b) => self
                    .extent_mut(k)?
                    .write(within, &b[done as usize..(done + n) as usize]),
                // Zeroes where no extent exists are already zeros.
                Src::Zero => {
                    if let Some(e) = self.extent(k)? {
                        e.zero(within, n as usize)
                    }
                }
            }
            done += n;
            offset += n;
        }
        Ok(())
    }

    /// Whether a write of `len > 0` bytes at `offset` into this layer (the
    /// top of its chain) touches only what the layer holds already: its
    /// extents are mapped and, in a delta, every grain is present. Otherwise
    /// the write would create a file or fault in fresh pages (of the extent
    /// and of the grain map): [`prefault`](Self::prefault) does that first,
    /// outside the I/O gate. Pages written back since the layer last wrote
    /// them (write-protected again by the kernel) cannot be seen from here.
    #[inline]
    pub(crate) fn ready(&self, offset: u64, len: u64, src: Src<'_>) -> bool {
        let (first, last) = (offset / EXTENT_BYTES, (offset + len - 1) / EXTENT_BYTES);
        if matches!(src, Src::Bytes(_)) && (first..=last).any(|k| self.extents[k as usize].get().is_none()) {
            return false;
        }
        match &self.grains {
            None => true,
            Some(g) => (offset >> g.shift..=(offset + len - 1) >> g.shift)
                .all(|grain| g.present.test(grain, Ordering::Relaxed)),
        }
    }

    /// Prepares a write of `len > 0` bytes at `offset` that is not
    /// [`ready`](Self::ready), without the I/O gate: creates and maps the
    /// extents it writes to, and faults in, writable, the pages of the grains
    /// it will claim (extent data, present and claimed bits). Changes no byte
    /// that a reader sees; the write itself still takes the gate, and finds
    /// the pages in memory.
    pub(crate) fn prefault(&self, offset: u64, len: u64, src: Src<'_>) -> Result<(), SimError> {
        let (mut pos, end) = (offset, offset + len);
        while pos < end {
            let k = (pos / EXTENT_BYTES) as usize;
            let within = pos % EXTENT_BYTES;
            let n = (end - pos).min(EXTENT_BYTES - within);
            let extent = match src {
                Src::Bytes(_) => Some(self.extent_mut(k)?),
                Src::Zero => self.extent(k)?,
            };
            if let (Some(e), Some(g)) = (extent, &self.grains) {
                // Whole grains: a partial write copies the rest of the grain in.
                let gmask = (1u64 << g.shift) - 1;
                let (lo, hi) = (within & !gmask, ((within + n + gmask) & !gmask).min(EXTENT_BYTES));
                e.populate(lo, (hi - lo) as usize);
                for grain in pos >> g.shift..=(pos + n - 1) >> g.shift {
                    if !g.present.test(grain, Ordering::Relaxed) {
                        g.present.prefault(grain);
                        g.claimed.prefault(grain);
                    }
                }
            } else if let Some(e) = extent {
                e.populate(within, n as usize);
            }
            pos += n;
        }
        Ok(())
    }

    /// Faults in, writable, the pages a [`merge_into`](Self::merge_into)
    /// `parent` will write (for the grains this delta holds now), so that a
    /// merge inside a stun takes no page fault for them.
    pub(crate) fn prefault_merge(&self, parent: &Layer) -> Result<(), SimError> {
        let Some(g) = &self.grains else { return Ok(()) };
        let gb = 1u64 << g.shift;
        let mut result = Ok(());
        g.present.for_each_word(0, |w, mut bits| {
            while bits != 0 && result.is_ok() {
                let grain = w as u64 * 64 + u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                // `Zero`: extents the parent lacks are not created for this
                // (the merge skips grains of zeros where it has none).
                result = parent.prefault(grain << g.shift, gb, Src::Zero);
            }
        });
        result
    }

    /// Claims every grain of `[offset, offset+len)` in this delta: a partially
    /// covered one is copied from `below` (read through the chain) and made
    /// present; one the write covers whole stays claimed until the write's
    /// data is in it ([`publish`](Self::publish)), so a process killed in
    /// between reopens it as absent (the old content), never as a present
    /// grain that holds neither the old nor the new data.
    pub(crate) fn cow(&self, offset: u64, len: u64, below: &[std::sync::Arc<Layer>]) -> Result<(), SimError> {
        let Some(g) = &self.grains else { return Ok(()) };
        let gb = 1u64 << g.shift;
        let (first, last) = (offset >> g.shift, (offset + len - 1) >> g.shift);
        for grain in first..=last {
            if g.present.test(grain, Ordering::Acquire) {
                continue;
            }
            if g.claimed.test_and_set(grain, Ordering::AcqRel) {
                while !g.present.test(grain, Ordering::Acquire) {
                    std::thread::yield_now();
                }
                continue;
            }
            let (gs, ge) = (grain << g.shift, (grain + 1) << g.shift);
            let whole = offset <= gs && offset + len >= ge;
            if !whole {
                // Grains are at most 4 KiB: no allocation on this path.
                let mut buf = [0u8; MAX_GRAIN as usize];
                let buf = &mut buf[..gb as usize];
                read_chain(below, gs, buf)?;
                self.write_raw(gs, gb, Src::Bytes(buf))?;
                g.present.test_and_set(grain, Ordering::Release);
            }
        }
        Ok(())
    }

    /// After a write of `[offset, offset+len)` (whose grains [`cow`](Self::cow)
    /// claimed): makes the grains it covers whole present. Every one is
    /// present already or claimed by this write (a claim of another writer was
    /// waited for in `cow`). Called after a failed write too, so that no grain
    /// stays claimed: what it holds is then unspecified, as for any failed write.
    #[inline]
    pub(crate) fn publish(&self, offset: u64, len: u64) {
        let Some(g) = &self.grains else { return };
        let first = offset.div_ceil(1 << g.shift);
        let end = (offset + len) >> g.shift;
        for grain in first..end {
            if !g.present.test(grain, Ordering::Relaxed) {
                g.present.test_and_set(grain, Ordering::Release);
            }
        }
    }

    /// Copies every grain this delta holds into `parent` (consolidation).
    /// Neither layer receives guest writes while this runs.
    pub(crate) fn merge_into(&self, parent: &Layer) -> Result<u64, SimError> {
        let Some(g) = &self.grains else { return Ok(0) };
        let gb = 1u64 << g.shift;
        let mut grains = Vec::new();
        g.present.for_each_word(0, |w, mut bits| {
            while bits != 0 {
                grains.push(w as u64 * 64 + u64::from(bits.trailing_zeros()));
                bits &= bits - 1;
            }
        });
        let mut buf = vec![0u8; gb as usize];
        for &grain in &grains {
            let off = grain << g.shift;
            self.read_raw(off, &mut buf)?;
            if buf.iter().all(|&b| b == 0)
                && parent.grains.is_none()
                && parent.extent((off / EXTENT_BYTES) as usize)?.is_none()
            {
                continue;
            }
            parent.write_raw(off, gb, Src::Bytes(&buf))?;
            if let Some(pg) = &parent.grains {
                // Parent and child grain sizes are the same for one disk.
                pg.claimed.test_and_set(grain, Ordering::AcqRel);
                pg.present.test_and_set(grain, Ordering::Release);
            }
        }
        Ok(grains.len() as u64 * gb)
    }

    /// Empties this delta's grain map (in its mapping, where a killed process
    /// leaves it): opened again, the layer holds nothing and reads fall through
    /// to the layers below. For a delta whose grains were all merged into its
    /// parent inside a stun, before the guest writes into the parent.
    pub(crate) fn forget_grains(&self) {
        if let Some(g) = &self.grains {
            g.present.drain(|_, _| {});
            g.claimed.drain(|_, _| {});
        }
    }

    /// Grains this delta holds.
    pub(crate) fn grain_count(&self) -> u64 {
        self.grains.as_ref().map_or(0, |g| g.present.count())
    }

    /// Writes dirty pages back.
    pub(crate) fn flush(&self) -> Result<(), SimError> {
        for (k, e) in self.extents.iter().enumerate() {
            if let Some(e) = e.get() {
                e.flush().map_err(io_err(&self.extent_path(k)))?;
            }
        }
        if let Some(g) = &self.grains {
            let p = self.dir.join(format!("L{}.map", self.id));
            g.present.flush().map_err(io_err(&p))?;
        }
        Ok(())
    }

    /// Deletes this layer's files (after it left every chain).
    pub(crate) fn delete_files(&self) {
        for k in 0..EXTENTS {
            if self.extents[k].get().is_some() || self.on_disk[k] {
                let _ = std::fs::remove_file(self.extent_path(k));
            }
        }
        let _ = std::fs::remove_file(self.dir.join(format!("L{}.map", self.id)));
    }

    /// Calls `f(offset, len)` for the byte ranges this layer holds data for:
    /// a delta's present grains; a base layer's allocated extents, asked of
    /// the file system with `SEEK_DATA`/`SEEK_HOLE` (data still only in the
    /// page cache counts). What a rebuilt `*` answers after tracking state was
    /// damaged: a superset of what was ever written, never less.
    pub(crate) fn allocated(&self, f: &mut dyn FnMut(u64, u64)) -> Result<(), SimError> {
        if let Some(g) = &self.grains {
            g.present.for_each_word(0, |w, mut bits| {
                while bits != 0 {
                    let grain = w as u64 * 64 + u64::from(bits.trailing_zeros());
                    bits &= bits - 1;
                    f(grain << g.shift, 1 << g.shift);
                }
            });
            return Ok(());
        }
        for k in 0..EXTENTS {
            if self.extents[k].get().is_none() && !self.on_disk[k] {
                continue;
            }
            let path = self.extent_path(k);
            let file = match File::open(&path) {
                Ok(file) => file,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err(&path)(e)),
            };
            let base = k as u64 * EXTENT_BYTES;
            let mut pos = 0u64;
            while pos < EXTENT_BYTES {
                let data = match rustix::fs::seek(&file, rustix::fs::SeekFrom::Data(pos)) {
                    Ok(d) => d,
                    Err(rustix::io::Errno::NXIO) => break,
                    Err(e) => return Err(io_err(&path)(e.into())),
                };
                let hole = rustix::fs::seek(&file, rustix::fs::SeekFrom::Hole(data))
                    .map_err(|e| io_err(&path)(e.into()))?
                    .min(EXTENT_BYTES);
                if hole > data {
                    f(base + data, hole - data);
                }
                pos = hole.max(data + 1);
            }
        }
        Ok(())
    }

    /// Bytes the layer's files occupy on disk.
    pub(crate) fn allocated_bytes(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        let mut n = 0;
        for k in (0..EXTENTS).filter(|&k| self.extents[k].get().is_some() || self.on_disk[k]) {
            if let Ok(m) = std::fs::metadata(self.extent_path(k)) {
                n += m.blocks() * 512;
            }
        }
        n
    }
}

/// Reads `[offset, offset+buf.len())` through a chain (last layer on top).
pub(crate) fn read_chain(chain: &[std::sync::Arc<Layer>], offset: u64, buf: &mut [u8]) -> Result<(), SimError> {
    if let [only] = chain {
        return only.read_raw(offset, buf);
    }
    if chain.is_empty() {
        buf.fill(0);
        return Ok(());
    }
    // Walk grain by grain (grain size of the deltas; the same for one disk).
    let gb = chain.iter().find_map(|l| l.grain_bytes()).unwrap_or(EXTENT_BYTES);
    let mut pos = 0usize;
    while pos < buf.len() {
        let off = offset + pos as u64;
        let n = ((gb - off % gb) as usize).min(buf.len() - pos);
        let layer = chain
            .iter()
            .rev()
            .find(|l| l.has(off))
            .expect("the base layer has every grain");
        layer.read_raw(off, &mut buf[pos..pos + n])?;
        pos += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn prefault_maps_and_faults_in_without_changing_what_reads_see() {
        let dir = tempfile::tempdir().unwrap();
        let base = std::sync::Arc::new(Layer::open(dir.path(), 0, None).unwrap());
        base.write_raw(8192, 4, Src::Bytes(&[7, 7, 7, 7])).unwrap();
        let delta = Layer::open(dir.path(), 1, Some(12)).unwrap();
        let at = EXTENT_BYTES + 8192;
        let data = Src::Bytes(&[1]);
        // A base layer is ready once its extent is mapped.
        assert!(!base.ready(at, 1, data));
        base.prefault(at, 1, data).unwrap();
        assert!(base.ready(at, 1, data));
        assert!(dir.path().join("L0.0001.ext").exists());
        // A delta is not ready for a grain it does not hold, prefaulted or not.
        assert!(!delta.ready(8192, 1, data));
        delta.prefault(8192, 1, data).unwrap();
        assert!(!delta.ready(8192, 1, data), "prefault claims nothing");
        assert_eq!(delta.grain_count(), 0);
        // Reads through the chain still see the base.
        let chain = [base.clone(), std::sync::Arc::new(delta)];
        let mut buf = [0u8; 4];
        read_chain(&chain, 8192, &mut buf).unwrap();
        assert_eq!(buf, [7; 4]);
        // The write itself then copies the grain up and is ready afterwards.
        chain[1].cow(8192, 1, &chain[..1]).unwrap();
        chain[1].write_raw(8192, 1, data).unwrap();
        assert!(chain[1].ready(8192, 1, data));
        read_chain(&chain, 8192, &mut buf).unwrap();
        assert_eq!(buf, [1, 7, 7, 7]);
        // An unmap creates no extent to prefault.
        let far = 3 * EXTENT_BYTES;
        assert!(base.ready(far, 4096, Src::Zero));
        base.prefault(far, 4096, Src::Zero).unwrap();
        assert!(!dir.path().join("L0.0003.ext").exists());
    }

    #[test]
    fn extents_written_before_are_found_at_open_and_others_read_as_zeros() {
        let dir = tempfile::tempdir().unwrap();
        {
            let l = Layer::open(dir.path(), 3, None).unwrap();
            l.write_raw(7, 3, Src::Bytes(&[1, 2, 3])).unwrap();
            l.write_raw(2 * EXTENT_BYTES + 5, 2, Src::Bytes(&[4, 5])).unwrap();
            l.flush().unwrap();
        }
        // Another layer's files and stray names are not this layer's extents.
        std::fs::write(dir.path().join("L31.0001.ext"), b"").unwrap();
        std::fs::write(dir.path().join("L3.x.ext"), b"").unwrap();
        let l = Layer::open(dir.path(), 3, None).unwrap();
        let mut buf = [9u8; 3];
        l.read_raw(7, &mut buf).unwrap();
        assert_eq!(buf, [1, 2, 3]);
        l.read_raw(2 * EXTENT_BYTES + 5, &mut buf[..2]).unwrap();
        assert_eq!(buf[..2], [4, 5]);
        l.read_raw(EXTENT_BYTES + 5, &mut buf).unwrap();
        assert_eq!(buf, [0; 3], "a never-written extent reads as zeros");
        assert!(!dir.path().join("L3.0001.ext").exists(), "reading it created nothing");
        // An unmap of a never-written extent creates nothing either.
        l.write_raw(EXTENT_BYTES, 4096, Src::Zero).unwrap();
        assert!(!dir.path().join("L3.0001.ext").exists());
        l.delete_files();
        assert_eq!(files(dir.path()), ["L3.x.ext", "L31.0001.ext"]);
    }
}
