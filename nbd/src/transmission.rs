//! The transmission phase: one [`Session`] per connection checks each
//! request, calls the export, and encodes the reply into its own buffers. No
//! I/O: the caller reads the request (and a write's payload) and sends
//! [`Session::reply`].

use std::sync::Arc;

use crate::backend::{BlockSize, Errno, Export, ExportError, Extent};
use crate::proto::{self, Command, Request};

/// Most extents sent in one block status chunk (the protocol asks for at
/// most 2^20; fewer keeps a reply small; the client asks again for the rest).
pub const MAX_EXTENTS: usize = 1 << 16;

/// What the caller does after [`Session::handle`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Send [`Session::reply`], then read the next request.
    Reply,
    /// `NBD_CMD_DISC`: close the connection without a reply.
    Disconnect,
}

/// A request that failed its checks or the backend: an error value and a
/// message for the structured error chunk.
#[derive(Debug)]
struct Failure {
    errno: Errno,
    message: String,
}

impl Failure {
    fn new(errno: Errno, message: impl Into<String>) -> Self {
        Failure {
            errno,
            message: message.into(),
        }
    }
}

impl From<ExportError> for Failure {
    fn from(e: ExportError) -> Self {
        Failure {
            errno: e.errno(),
            message: e.to_string(),
        }
    }
}

/// The transmission state of one connection with one export.
pub struct Session {
    export: Arc<dyn Export>,
    structured: bool,
    /// Selected context names; the ID of `contexts[i]` is `i + 1`.
    contexts: Vec<String>,
    size: u64,
    flags: u16,
    block: BlockSize,
    /// Reply headers and small payloads.
    head: Vec<u8>,
    /// A read's data; grows to the largest read and is reused.
    data: Vec<u8>,
    data_len: usize,
    extents: Vec<Extent>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("structured", &self.structured)
            .field("contexts", &self.contexts)
            .field("size", &self.size)
            .field("flags", &self.flags)
            .field("block", &self.block)
            .finish_non_exhaustive()
    }
}

impl Session {
    /// A session on `export`; `contexts` are the selected metadata contexts
    /// (IDs 1, 2, ... in this order); payloads are limited to `max_payload`.
    pub fn new(export: Arc<dyn Export>, structured: bool, contexts: Vec<String>, max_payload: u32) -> Self {
        let flags = Self::flags_for(export.as_ref());
        let block = Self::block_size_for(export.as_ref(), max_payload);
        Session {
            size: export.size(),
            export,
            structured,
            contexts,
            flags,
            block,
            head: Vec::with_capacity(256),
            data: Vec::new(),
            data_len: 0,
            extents: Vec::new(),
        }
    }

    /// The transmission flags for `export`.
    pub fn flags_for(export: &dyn Export) -> u16 {
        let mut flags = proto::TFLAG_HAS_FLAGS;
        if export.is_read_only() {
            flags |= proto::TFLAG_READ_ONLY;
        } else {
            flags |= proto::TFLAG_SEND_FLUSH
                | proto::TFLAG_SEND_FUA
                | proto::TFLAG_SEND_TRIM
                | proto::TFLAG_SEND_WRITE_ZEROES;
        }
        if export.can_multi_conn() {
            flags |= proto::TFLAG_CAN_MULTI_CONN;
        }
        flags
    }

    /// The block sizes advertised for `export`: its own, with the maximum
    /// payload lowered to the server's `max_payload` (never below the
    /// preferred size).
    pub fn block_size_for(export: &dyn Export, max_payload: u32) -> BlockSize {
        let bs = export.block_size();
        let max = bs.max_payload().min(max_payload).max(bs.preferred());
        BlockSize::new(bs.min(), bs.preferred(), max).unwrap_or(bs)
    }

    /// Export size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Transmission flags sent to the client.
    pub fn transmission_flags(&self) -> u16 {
        self.flags
    }

    /// Largest write payload read into memory; a larger write's payload is
    /// skipped by the caller and answered with [`Session::reject_oversized`].
    pub fn max_payload(&self) -> u32 {
        self.block.max_payload()
    }

    /// The reply to send: headers, then a read's data (possibly empty).
    pub fn reply(&self) -> (&[u8], &[u8]) {
        (&self.head, &self.data[..self.data_len])
    }

    /// Answers a write whose payload exceeded [`max_payload`](Self::max_payload)
    /// (the caller skipped the payload): `EINVAL`, nothing written.
    pub fn reject_oversized(&mut self, req: &Request) {
        self.head.clear();
        self.data_len = 0;
        let f = Failure::new(
            Errno::Inval,
            format!("payload {} over the maximum {}", req.length, self.max_payload()),
        );
        self.put_failure(req, f);
    }

    /// Handles one request. `payload` is the write data (exactly
    /// `req.length` bytes for a write, empty otherwise).
    pub fn handle(&mut self, req: &Request, payload: &[u8]) -> Outcome {
        self.head.clear();
        self.data_len = 0;
        if req.command == Command::Disc {
            return Outcome::Disconnect;
        }
        let result = self.check_flags(req).and_then(|()| self.execute(req, payload));
        if let Err(f) = result {
            self.head.clear();
            self.data_len = 0;
            self.put_failure(req, f);
        }
        Outcome::Reply
    }

    fn put_failure(&mut self, req: &Request, f: Failure) {
        if self.structured {
            proto::put_error_chunk(&mut self.head, req.cookie, f.errno.code(), &f.message);
        } else {
            proto::put_simple_reply(&mut self.head, f.errno.code(), req.cookie);
        }
    }

    fn check_flags(&self, req: &Request) -> Result<(), Failure> {
        let mut allowed = 0;
        if self.flags & proto::TFLAG_SEND_FUA != 0 {
            allowed |= proto::CMD_FLAG_FUA;
        }
        match req.command {
            Command::WriteZeroes => allowed |= proto::CMD_FLAG_NO_HOLE,
            Command::BlockStatus => allowed |= proto::CMD_FLAG_REQ_ONE,
            _ => {}
        }
        let unknown = req.flags & !allowed;
        if unknown != 0 {
            return Err(Failure::new(
                Errno::Inval,
                format!("command flags {unknown:#x} not supported here"),
            ));
        }
        Ok(())
    }

    /// Checks that `[offset, offset + length)` lies in the export (else
    /// `beyond`) and is aligned to the minimum block size.
    fn check_range(&self, req: &Request, beyond: Errno) -> Result<(), Failure> {
        let end = req.offset.checked_add(u64::from(req.length));
        if end.is_none_or(|end| end > self.size) {
            return Err(Failure::new(
                beyond,
                format!(
                    "range {}+{} beyond the export size {}",
                    req.offset, req.length, self.size
                ),
            ));
        }
        let min = u64::from(self.block.min());
        let end = req.offset + u64::from(req.length);
        if !req.offset.is_multiple_of(min) || (!end.is_multiple_of(min) && end != self.size) {
            return Err(Failure::new(Errno::Inval, format!("range not aligned to {min} bytes")));
        }
        Ok(())
    }

    fn check_writable(&self) -> Result<(), Failure> {
        if self.export.is_read_only() {
            return Err(ExportError::ReadOnly.into());
        }
        Ok(())
    }

    fn fua(&self, req: &Request) -> Result<(), Failure> {
        if req.flags & proto::CMD_FLAG_FUA != 0 {
            self.export.flush()?;
        }
        Ok(())
    }

    fn ok(&mut self, req: &Request) {
        // A simple reply is allowed for any command without a payload.
        proto::put_simple_reply(&mut self.head, 0, req.cookie);
    }

    fn execute(&mut self, req: &Request, payload: &[u8]) -> Result<(), Failure> {
        match req.command {
            Command::Read => self.read(req),
            Command::Write => {
                self.check_writable()?;
                if req.length > self.max_payload() || payload.len() != req.length as usize {
                    return Err(Failure::new(Errno::Inval, "write payload over the maximum"));
                }
                self.check_range(req, Errno::NoSpc)?;
                if !payload.is_empty() {
                    self.export.write(req.offset, payload)?;
                }
                self.fua(req)?;
                self.ok(req);
                Ok(())
            }
            Command::Flush => {
                if self.flags & proto::TFLAG_SEND_FLUSH == 0 {
                    return Err(Failure::new(Errno::Inval, "flush not supported on this export"));
                }
                self.export.flush()?;
                self.ok(req);
                Ok(())
            }
            Command::Trim => {
                self.check_writable()?;
                self.check_range(req, Errno::Inval)?;
                if req.length > 0 {
                    self.export.trim(req.offset, u64::from(req.length))?;
                }
                self.fua(req)?;
                self.ok(req);
                Ok(())
            }
            Command::WriteZeroes => {
                self.check_writable()?;
                self.check_range(req, Errno::NoSpc)?;
                if req.length > 0 {
                    let may_trim = req.flags & proto::CMD_FLAG_NO_HOLE == 0;
                    self.export.write_zeroes(req.offset, u64::from(req.length), may_trim)?;
                }
                self.fua(req)?;
                self.ok(req);
                Ok(())
            }
            Command::BlockStatus => self.block_status(req),
            Command::Disc => Ok(()),
            Command::Other(code) => Err(Failure::new(Errno::Inval, format!("command {code} not supported"))),
        }
    }

    fn read(&mut self, req: &Request) -> Result<(), Failure> {
        if req.length > self.max_payload() {
            // Structured replies may refuse a large read with EOVERFLOW; a
            // simple reply cannot carry more than the maximum payload.
            let errno = if self.structured { Errno::Overflow } else { Errno::Inval };
            return Err(Failure::new(
                errno,
                format!("read of {} over the maximum {}", req.length, self.max_payload()),
            ));
        }
        self.check_range(req, Errno::Inval)?;
        let len = req.length as usize;
        if self.data.len() < len {
            self.data.resize(len, 0);
        }
        if len > 0 {
            self.export.read(req.offset, &mut self.data[..len])?;
        }
        self.data_len = len;
        if !self.structured {
            proto::put_simple_reply(&mut self.head, 0, req.cookie);
        } else if len == 0 {
            proto::put_chunk_header(
                &mut self.head,
                proto::REPLY_FLAG_DONE,
                proto::REPLY_TYPE_NONE,
                req.cookie,
                0,
            );
        } else {
            // The data is read before anything is sent, so this one chunk can
            // be the final one.
            let length = 8 + req.length;
            proto::put_chunk_header(
                &mut self.head,
                proto::REPLY_FLAG_DONE,
                proto::REPLY_TYPE_OFFSET_DATA,
                req.cookie,
                length,
            );
            self.head.extend_from_slice(&req.offset.to_be_bytes());
        }
        Ok(())
    }

    fn block_status(&mut self, req: &Request) -> Result<(), Failure> {
        if !self.structured || self.contexts.is_empty() {
            return Err(Failure::new(Errno::Inval, "no metadata context was selected"));
        }
        if req.length == 0 {
            return Err(Failure::new(Errno::Inval, "block status of zero bytes"));
        }
        let end = req.offset.checked_add(u64::from(req.length));
        if end.is_none_or(|end| end > self.size) {
            return Err(Failure::new(
                Errno::Inval,
                format!(
                    "range {}+{} beyond the export size {}",
                    req.offset, req.length, self.size
                ),
            ));
        }
        let req_one = req.flags & proto::CMD_FLAG_REQ_ONE != 0;
        let n = self.contexts.len();
        for i in 0..n {
            self.extents.clear();
            self.export
                .block_status(&self.contexts[i], req.offset, u64::from(req.length), &mut self.extents)?;
            let clipped = clip_extents(&self.extents, req.length, req_one);
            if clipped.is_empty() {
                return Err(Failure::new(
                    Errno::Io,
                    format!("no status for offset {} in {}", req.offset, self.contexts[i]),
                ));
            }
            let flags = if i + 1 == n { proto::REPLY_FLAG_DONE } else { 0 };
            let length = 4 + 8 * clipped.len() as u32;
            proto::put_chunk_header(
                &mut self.head,
                flags,
                proto::REPLY_TYPE_BLOCK_STATUS,
                req.cookie,
                length,
            );
            self.head.extend_from_slice(&(i as u32 + 1).to_be_bytes());
            for (len, flags) in clipped {
                self.head.extend_from_slice(&len.to_be_bytes());
                self.head.extend_from_slice(&flags.to_be_bytes());
            }
        }
        Ok(())
    }
}

/// Turns the backend's extents into wire descriptors covering at most
/// `length` bytes: empty extents dropped, neighbours with equal flags
/// merged, at most [`MAX_EXTENTS`], exactly one if `req_one`.
pub fn clip_extents(extents: &[Extent], length: u32, req_one: bool) -> Vec<(u32, u32)> {
    let mut out: Vec<(u32, u32)> = Vec::new();
    let mut left = length;
    for e in extents {
        if left == 0 {
            break;
        }
        if e.length == 0 {
            continue;
        }
        let take = e.length.min(u64::from(left)) as u32;
        left -= take;
        let full = out.len() == MAX_EXTENTS || (req_one && !out.is_empty());
        match out.last_mut() {
            Some(last) if last.1 == e.flags => last.0 += take,
            _ if full => break,
            _ => out.push((take, e.flags)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(length: u64, flags: u32) -> Extent {
        Extent { length, flags }
    }

    #[test]
    fn clip_merges_drops_and_cuts() {
        let e = [ext(10, 1), ext(0, 2), ext(5, 1), ext(100, 0)];
        assert_eq!(clip_extents(&e, 20, false), vec![(15, 1), (5, 0)]);
        assert_eq!(clip_extents(&e, 20, true), vec![(15, 1)]);
        assert_eq!(clip_extents(&e, 12, false), vec![(12, 1)]);
        assert_eq!(clip_extents(&[], 12, false), vec![]);
        assert_eq!(clip_extents(&[ext(u64::MAX, 3)], u32::MAX, false), vec![(u32::MAX, 3)]);
    }
}
