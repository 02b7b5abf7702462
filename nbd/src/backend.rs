//! What the server serves: a set of named exports ([`Exports`]), each a
//! block device with optional metadata contexts ([`Export`]).

use std::sync::Arc;

use thiserror::Error;

/// `base:allocation`, the allocation context of the NBD standard.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// The prefix of QEMU's dirty bitmap contexts, `qemu:dirty-bitmap:NAME`.
pub const QEMU_DIRTY_BITMAP: &str = "qemu:dirty-bitmap:";
/// `base:allocation` flag: the extent is not allocated.
pub const STATE_HOLE: u32 = 1 << 0;
/// `base:allocation` flag: the extent reads as zeroes.
pub const STATE_ZERO: u32 = 1 << 1;
/// `qemu:dirty-bitmap:` flag: the extent is dirty (changed).
pub const STATE_DIRTY: u32 = 1 << 0;

/// The named exports a server offers. Shared by all connections.
pub trait Exports: Send + Sync {
    /// The exports listed by `NBD_OPT_LIST`, each with a human-readable
    /// description (may be empty). Exports may exist without being listed.
    fn list(&self) -> Vec<ExportListing>;

    /// Opens export `name` ("" is the default export, if the backend has
    /// one). Called for each `NBD_OPT_INFO`, `NBD_OPT_GO`,
    /// `NBD_OPT_EXPORT_NAME`, `NBD_OPT_LIST_META_CONTEXT` and
    /// `NBD_OPT_SET_META_CONTEXT`, so possibly several times per connection;
    /// the export from `GO` or `EXPORT_NAME` serves the whole transmission.
    fn open(&self, name: &str) -> Result<Arc<dyn Export>, OpenError>;
}

/// One entry of `NBD_OPT_LIST`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportListing {
    /// The export name, as given to `NBD_OPT_GO`.
    pub name: String,
    /// A description for people (may be empty).
    pub description: String,
}

/// Why an export cannot be opened; each maps to an option error reply.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum OpenError {
    /// No export of that name: `NBD_REP_ERR_UNKNOWN`.
    #[error("no export named {0:?}")]
    Unknown(String),
    /// The export exists but cannot be opened now (for example its VM is
    /// gone or its snapshot is being removed): `NBD_REP_ERR_UNKNOWN`, which
    /// the protocol defines as "not available", with this message.
    #[error("export not available: {0}")]
    Unavailable(String),
    /// Refused by policy: `NBD_REP_ERR_POLICY`.
    #[error("refused by policy: {0}")]
    Policy(String),
    /// The server is shutting down: `NBD_REP_ERR_SHUTDOWN`.
    #[error("server shutting down")]
    Shutdown,
}

/// One export: a block device of [`size`](Export::size) bytes.
///
/// Offsets and lengths the server passes are always inside the export and
/// aligned to the minimum block size (except at an unaligned end): the
/// server checks them first. Writes, trims and zeroing are never called on a
/// read-only export. With `NBD_CMD_FLAG_FUA` the server calls
/// [`flush`](Export::flush) after the write before it replies.
pub trait Export: Send + Sync {
    /// Size in bytes. Constant while the export is open.
    fn size(&self) -> u64;

    /// Whether writes are refused (they then fail with `EPERM`).
    fn is_read_only(&self) -> bool;

    /// Block size constraints advertised with `NBD_INFO_BLOCK_SIZE`.
    fn block_size(&self) -> BlockSize {
        BlockSize::default()
    }

    /// A description for `NBD_INFO_DESCRIPTION` (empty: none is sent).
    fn description(&self) -> String {
        String::new()
    }

    /// Whether flushes and FUA writes on one connection are visible on all
    /// connections to the same export (sets `NBD_FLAG_CAN_MULTI_CONN`, which
    /// lets clients such as `nbdcopy` open several connections).
    fn can_multi_conn(&self) -> bool {
        false
    }

    /// Reads `buf.len()` bytes at `offset`. The whole buffer must be filled
    /// on success: a short read is an error.
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), ExportError>;

    /// Writes `data` at `offset`.
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), ExportError>;

    /// Makes completed writes durable.
    fn flush(&self) -> Result<(), ExportError>;

    /// Discards `len` bytes at `offset`: a hint; afterwards the contents of
    /// the range are unspecified until written. The default does nothing.
    fn trim(&self, offset: u64, len: u64) -> Result<(), ExportError> {
        let _ = (offset, len);
        Ok(())
    }

    /// Writes `len` zero bytes at `offset`; `may_trim` is false when the
    /// client asked for the range to stay allocated (`NBD_CMD_FLAG_NO_HOLE`).
    /// The default writes zeroes with [`write`](Export::write) in pieces of
    /// at most 1 MiB.
    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> Result<(), ExportError> {
        let _ = may_trim;
        const PIECE: u64 = 1 << 20;
        let zeroes = vec![0u8; PIECE.min(len) as usize];
        let mut done = 0;
        while done < len {
            let n = PIECE.min(len - done);
            self.write(offset + done, &zeroes[..n as usize])?;
            done += n;
        }
        Ok(())
    }

    /// The metadata contexts this export offers, by full name
    /// (`base:allocation`, `qemu:dirty-bitmap:NAME`, ...), as listed by
    /// `NBD_OPT_LIST_META_CONTEXT`. Names must be `namespace:leaf`, UTF-8,
    /// without NUL, at most 4096 bytes; others are ignored.
    fn meta_contexts(&self) -> Vec<String> {
        Vec::new()
    }

    /// Whether `NBD_OPT_SET_META_CONTEXT` may select context `name`. The
    /// default: it is one of [`meta_contexts`](Export::meta_contexts).
    /// Override it to accept contexts too many to list, such as "changes
    /// since change ID X" for every change ID of a tracking session.
    fn has_meta_context(&self, name: &str) -> bool {
        self.meta_contexts().iter().any(|c| c == name)
    }

    /// Appends to `extents` the status of `[offset, offset + length)` in
    /// context `context` (a name [`has_meta_context`](Export::has_meta_context)
    /// accepted), as consecutive extents starting at `offset`. Covering less
    /// than the whole range is allowed (the client asks again for the rest)
    /// but at least one byte must be covered; extents past the range are cut
    /// by the server. Where the status cannot be given exactly (say, a change
    /// ID that tracking can no longer answer for), return an error: never a
    /// guess that under-reports.
    fn block_status(
        &self,
        context: &str,
        offset: u64,
        length: u64,
        extents: &mut Vec<Extent>,
    ) -> Result<(), ExportError> {
        let _ = (offset, length, extents);
        Err(ExportError::Invalid(format!("no metadata context {context:?}")))
    }
}

/// A run of bytes with the same status flags in one metadata context.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes.
    pub length: u64,
    /// Status flags; their meaning depends on the context (`STATE_*`).
    pub flags: u32,
}

/// Block size constraints: minimum (alignment of every request), preferred
/// (efficient I/O size) and maximum payload. Always valid by construction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSize {
    min: u32,
    preferred: u32,
    max_payload: u32,
}

/// Invalid block size constraints.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("invalid block sizes (min {min}, preferred {preferred}, max {max_payload}): {why}")]
pub struct BlockSizeError {
    min: u32,
    preferred: u32,
    max_payload: u32,
    why: &'static str,
}

impl BlockSize {
    /// Checks the protocol's rules: `min` a power of two of at most 64 KiB,
    /// `preferred` a power of two at least `max(min, 512)`, `max_payload` at
    /// least `preferred`. A client such as QEMU refuses an export whose size
    /// is not a multiple of `min`.
    pub fn new(min: u32, preferred: u32, max_payload: u32) -> Result<Self, BlockSizeError> {
        let err = |why| {
            Err(BlockSizeError {
                min,
                preferred,
                max_payload,
                why,
            })
        };
        if !min.is_power_of_two() || min > 1 << 16 {
            return err("minimum must be a power of two of at most 65536");
        }
        if !preferred.is_power_of_two() || preferred < min.max(512) {
            return err("preferred must be a power of two, at least the minimum and 512");
        }
        if max_payload < preferred {
            return err("maximum payload must be at least the preferred size");
        }
        Ok(BlockSize {
            min,
            preferred,
            max_payload,
        })
    }

    /// Minimum block size: every offset and length must be a multiple.
    pub fn min(&self) -> u32 {
        self.min
    }

    /// Preferred block size.
    pub fn preferred(&self) -> u32 {
        self.preferred
    }

    /// Largest read or write payload the export accepts.
    pub fn max_payload(&self) -> u32 {
        self.max_payload
    }
}

impl Default for BlockSize {
    /// The protocol's defaults: 1, 4096, 32 MiB.
    fn default() -> Self {
        BlockSize {
            min: 1,
            preferred: 4096,
            max_payload: 1 << 25,
        }
    }
}

/// An error of an export operation; each maps to an NBD error value.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ExportError {
    /// The export cannot be written: `EPERM`.
    #[error("export is read-only")]
    ReadOnly,
    /// The backend failed: `EIO`.
    #[error("I/O error: {0}")]
    Io(String),
    /// Bad arguments, or a question the backend cannot answer: `EINVAL`.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// No space left: `ENOSPC`.
    #[error("no space left: {0}")]
    NoSpace(String),
    /// A length too large: `EOVERFLOW`.
    #[error("value too large: {0}")]
    Overflow(String),
    /// Not supported: `ENOTSUP`.
    #[error("not supported: {0}")]
    NotSupported(String),
    /// The backend is shutting down: `ESHUTDOWN`.
    #[error("shutting down")]
    Shutdown,
}

impl ExportError {
    /// The NBD error value for this error.
    pub fn errno(&self) -> Errno {
        match self {
            ExportError::ReadOnly => Errno::Perm,
            ExportError::Io(_) => Errno::Io,
            ExportError::Invalid(_) => Errno::Inval,
            ExportError::NoSpace(_) => Errno::NoSpc,
            ExportError::Overflow(_) => Errno::Overflow,
            ExportError::NotSupported(_) => Errno::NotSup,
            ExportError::Shutdown => Errno::Shutdown,
        }
    }
}

/// NBD error values (the protocol fixes them; they match Linux errno).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Errno {
    /// `NBD_EPERM`.
    Perm = 1,
    /// `NBD_EIO`.
    Io = 5,
    /// `NBD_ENOMEM`.
    NoMem = 12,
    /// `NBD_EINVAL`.
    Inval = 22,
    /// `NBD_ENOSPC`.
    NoSpc = 28,
    /// `NBD_EOVERFLOW`.
    Overflow = 75,
    /// `NBD_ENOTSUP`.
    NotSup = 95,
    /// `NBD_ESHUTDOWN`.
    Shutdown = 108,
}

impl Errno {
    /// The value on the wire.
    pub fn code(self) -> u32 {
        self as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_size_rules() {
        assert!(BlockSize::new(512, 4096, 1 << 25).is_ok());
        assert!(BlockSize::new(1, 512, 512).is_ok());
        assert!(BlockSize::new(3, 4096, 1 << 20).is_err());
        assert!(BlockSize::new(1 << 17, 1 << 17, 1 << 20).is_err());
        assert!(BlockSize::new(4096, 512, 1 << 20).is_err());
        assert!(BlockSize::new(512, 256, 1 << 20).is_err());
        assert!(BlockSize::new(512, 4096, 1024).is_err());
    }

    #[test]
    fn errors_map_to_nbd_values() {
        assert_eq!(ExportError::ReadOnly.errno().code(), 1);
        assert_eq!(ExportError::Io("x".into()).errno().code(), 5);
        assert_eq!(ExportError::Invalid("x".into()).errno().code(), 22);
        assert_eq!(ExportError::NoSpace("x".into()).errno().code(), 28);
        assert_eq!(ExportError::Overflow("x".into()).errno().code(), 75);
        assert_eq!(ExportError::NotSupported("x".into()).errno().code(), 95);
        assert_eq!(ExportError::Shutdown.errno().code(), 108);
    }
}
