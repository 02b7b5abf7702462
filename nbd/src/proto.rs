//! The wire format: constants, parsers for what a client sends, encoders for
//! what the server sends. No I/O and no backend: bytes in, typed values out
//! (and the reverse), so tests and fuzzers can feed it directly.
//!
//! All integers are big-endian. Names follow `doc/proto.md` of the NBD
//! project, without the `NBD_` prefix.

use thiserror::Error;

/// `NBDMAGIC`, first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: second magic of the greeting, and the magic of every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flag: the server speaks fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the server can leave out the 124 zero bytes after `EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: the client speaks fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: leave out the 124 zero bytes after `EXPORT_NAME`.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flag: always set.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag: writes will fail with `EPERM`.
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: `CMD_FLUSH` is supported.
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag: `CMD_FLAG_FUA` is supported.
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
/// Transmission flag: `CMD_TRIM` is supported.
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
/// Transmission flag: `CMD_WRITE_ZEROES` (and `CMD_FLAG_NO_HOLE`) is supported.
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Transmission flag: `CMD_FLAG_DF` is supported (never set by this server).
pub const TFLAG_SEND_DF: u16 = 1 << 7;
/// Transmission flag: flushes are visible across all connections to the export.
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

/// Option: choose an export and enter transmission (no error replies possible).
pub const OPT_EXPORT_NAME: u32 = 1;
/// Option: end the negotiation.
pub const OPT_ABORT: u32 = 2;
/// Option: list exports.
pub const OPT_LIST: u32 = 3;
/// Option: start TLS (not supported).
pub const OPT_STARTTLS: u32 = 5;
/// Option: describe an export.
pub const OPT_INFO: u32 = 6;
/// Option: describe an export and enter transmission.
pub const OPT_GO: u32 = 7;
/// Option: use structured replies.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// Option: list metadata contexts.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// Option: select metadata contexts.
pub const OPT_SET_META_CONTEXT: u32 = 10;
/// Option: extended headers (not supported).
pub const OPT_EXTENDED_HEADERS: u32 = 11;

/// Option reply: success / end of a list.
pub const REP_ACK: u32 = 1;
/// Option reply: one export of a list.
pub const REP_SERVER: u32 = 2;
/// Option reply: one item of information about an export.
pub const REP_INFO: u32 = 3;
/// Option reply: one metadata context.
pub const REP_META_CONTEXT: u32 = 4;
const REP_ERR: u32 = 1 << 31;
/// Option error: unknown option.
pub const REP_ERR_UNSUP: u32 = REP_ERR | 1;
/// Option error: forbidden by policy.
pub const REP_ERR_POLICY: u32 = REP_ERR | 2;
/// Option error: syntactically or semantically invalid.
pub const REP_ERR_INVALID: u32 = REP_ERR | 3;
/// Option error: the export is not available.
pub const REP_ERR_UNKNOWN: u32 = REP_ERR | 6;
/// Option error: the server is shutting down.
pub const REP_ERR_SHUTDOWN: u32 = REP_ERR | 7;
/// Option error: the request or reply is too large.
pub const REP_ERR_TOO_BIG: u32 = REP_ERR | 9;

/// Information type: size and transmission flags.
pub const INFO_EXPORT: u16 = 0;
/// Information type: canonical export name.
pub const INFO_NAME: u16 = 1;
/// Information type: human-readable description.
pub const INFO_DESCRIPTION: u16 = 2;
/// Information type: block size constraints.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Command: read.
pub const CMD_READ: u16 = 0;
/// Command: write (followed by its payload).
pub const CMD_WRITE: u16 = 1;
/// Command: disconnect (no reply).
pub const CMD_DISC: u16 = 2;
/// Command: flush.
pub const CMD_FLUSH: u16 = 3;
/// Command: trim (discard).
pub const CMD_TRIM: u16 = 4;
/// Command: cache (not supported).
pub const CMD_CACHE: u16 = 5;
/// Command: write zeroes.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// Command: block status.
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flag: force unit access.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag: do not punch a hole (`WRITE_ZEROES`).
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Command flag: do not fragment (`READ`; not supported).
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// Command flag: one extent per context (`BLOCK_STATUS`).
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// Command flag: fail fast if zeroing is slow (not supported).
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

/// Structured reply flag: last chunk of the reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// Structured reply type: no payload (final chunk).
pub const REPLY_TYPE_NONE: u16 = 0;
/// Structured reply type: data at an offset.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Structured reply type: zeroes at an offset.
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Structured reply type: extents of one metadata context.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Structured reply type: an error.
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;
/// Structured reply type: an error at an offset.
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) | 2;

/// Longest string (export name, context name, message) the protocol allows.
pub const MAX_STRING: usize = 4096;
/// Length of the server's greeting.
pub const GREETING_LEN: usize = 18;
/// Length of an option header (magic, option, length).
pub const OPTION_HEADER_LEN: usize = 16;
/// Length of a transmission request header.
pub const REQUEST_LEN: usize = 28;
/// Length of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Length of a structured reply chunk header.
pub const CHUNK_HEADER_LEN: usize = 20;

/// A framing error: the stream cannot be understood any further, so the
/// connection is closed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FrameError {
    /// An option did not start with `IHAVEOPT`.
    #[error("bad option magic {0:#018x}")]
    BadOptionMagic(u64),
    /// A request did not start with `NBD_REQUEST_MAGIC`.
    #[error("bad request magic {0:#010x}")]
    BadRequestMagic(u32),
    /// The client set flags this server did not offer.
    #[error("unknown client flags {0:#x}")]
    BadClientFlags(u32),
}

/// The server's greeting: `NBDMAGIC`, `IHAVEOPT`, handshake flags.
pub fn greeting() -> [u8; GREETING_LEN] {
    let mut g = [0u8; GREETING_LEN];
    g[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    g[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    g[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    g
}

/// Checks the client flags that answer the greeting.
pub fn parse_client_flags(flags: u32) -> Result<u32, FrameError> {
    if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(FrameError::BadClientFlags(flags));
    }
    Ok(flags)
}

/// The fixed part of an option: which option, and how many data bytes follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// The option code (`OPT_*`).
    pub option: u32,
    /// Length of the option data that follows.
    pub length: u32,
}

impl OptionHeader {
    /// Parses the 16-byte option header.
    pub fn parse(b: &[u8; OPTION_HEADER_LEN]) -> Result<Self, FrameError> {
        let mut r = Reader::new(b);
        let magic = r.u64().unwrap_or_default();
        if magic != IHAVEOPT {
            return Err(FrameError::BadOptionMagic(magic));
        }
        Ok(OptionHeader {
            option: r.u32().unwrap_or_default(),
            length: r.u32().unwrap_or_default(),
        })
    }
}

/// An option's data, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientOption {
    /// `NBD_OPT_EXPORT_NAME` with the export name.
    ExportName(String),
    /// `NBD_OPT_ABORT` (any data ignored).
    Abort,
    /// `NBD_OPT_LIST`.
    List,
    /// `NBD_OPT_INFO`.
    Info(InfoRequest),
    /// `NBD_OPT_GO`.
    Go(InfoRequest),
    /// `NBD_OPT_STRUCTURED_REPLY`.
    StructuredReply,
    /// `NBD_OPT_LIST_META_CONTEXT`.
    ListMetaContext(MetaRequest),
    /// `NBD_OPT_SET_META_CONTEXT`.
    SetMetaContext(MetaRequest),
    /// Any other option (including `STARTTLS` and `EXTENDED_HEADERS`): the
    /// server answers `NBD_REP_ERR_UNSUP`.
    Unsupported(u32),
}

/// The data of `NBD_OPT_INFO` and `NBD_OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    /// Export name ("" is the default export).
    pub name: String,
    /// Requested `NBD_INFO_*` types, in the client's order.
    pub requests: Vec<u16>,
}

/// The data of `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaRequest {
    /// Export name.
    pub export: String,
    /// Queries, each `namespace:rest`.
    pub queries: Vec<String>,
}

/// Why option data could not be parsed: answered with `NBD_REP_ERR_INVALID`
/// and this message (for `EXPORT_NAME`, by closing the connection).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{0}")]
pub struct InvalidOption(pub String);

impl ClientOption {
    /// Parses the data of option `option`.
    pub fn parse(option: u32, data: &[u8]) -> Result<Self, InvalidOption> {
        let mut r = Reader::new(data);
        let opt = match option {
            OPT_EXPORT_NAME => ClientOption::ExportName(string(data, "export name")?),
            OPT_ABORT => ClientOption::Abort,
            OPT_LIST => {
                no_data(data, "NBD_OPT_LIST")?;
                ClientOption::List
            }
            OPT_STRUCTURED_REPLY => {
                no_data(data, "NBD_OPT_STRUCTURED_REPLY")?;
                ClientOption::StructuredReply
            }
            OPT_INFO | OPT_GO => {
                let name = r.string("export name")?;
                let count = r.u16().ok_or_else(|| invalid("missing information request count"))?;
                let mut requests = Vec::with_capacity(usize::from(count).min(r.remaining() / 2));
                for _ in 0..count {
                    requests.push(
                        r.u16()
                            .ok_or_else(|| invalid("information requests run past the option"))?,
                    );
                }
                r.end()?;
                let req = InfoRequest { name, requests };
                if option == OPT_GO {
                    ClientOption::Go(req)
                } else {
                    ClientOption::Info(req)
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let export = r.string("export name")?;
                let count = r.u32().ok_or_else(|| invalid("missing query count"))?;
                // Each query takes at least 4 bytes: a count that cannot fit is
                // refused before allocating anything.
                if u64::from(count) * 4 > r.remaining() as u64 {
                    return Err(invalid("query count runs past the option"));
                }
                let mut queries = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    let q = r.string("query")?;
                    check_query(&q)?;
                    queries.push(q);
                }
                r.end()?;
                let req = MetaRequest { export, queries };
                if option == OPT_SET_META_CONTEXT {
                    ClientOption::SetMetaContext(req)
                } else {
                    ClientOption::ListMetaContext(req)
                }
            }
            other => ClientOption::Unsupported(other),
        };
        Ok(opt)
    }

    /// The option code.
    pub fn code(&self) -> u32 {
        match self {
            ClientOption::ExportName(_) => OPT_EXPORT_NAME,
            ClientOption::Abort => OPT_ABORT,
            ClientOption::List => OPT_LIST,
            ClientOption::Info(_) => OPT_INFO,
            ClientOption::Go(_) => OPT_GO,
            ClientOption::StructuredReply => OPT_STRUCTURED_REPLY,
            ClientOption::ListMetaContext(_) => OPT_LIST_META_CONTEXT,
            ClientOption::SetMetaContext(_) => OPT_SET_META_CONTEXT,
            ClientOption::Unsupported(code) => *code,
        }
    }

    /// Encodes the option as a client sends it (header and data). The client
    /// side, for tests and tools. `Unsupported` is sent with no data.
    pub fn encode(&self) -> Vec<u8> {
        let mut data = Vec::new();
        match self {
            ClientOption::ExportName(name) => data.extend_from_slice(name.as_bytes()),
            ClientOption::Abort | ClientOption::List | ClientOption::StructuredReply | ClientOption::Unsupported(_) => {
            }
            ClientOption::Info(req) | ClientOption::Go(req) => {
                put_str32(&mut data, &req.name);
                data.extend_from_slice(&(req.requests.len() as u16).to_be_bytes());
                for r in &req.requests {
                    data.extend_from_slice(&r.to_be_bytes());
                }
            }
            ClientOption::ListMetaContext(req) | ClientOption::SetMetaContext(req) => {
                put_str32(&mut data, &req.export);
                data.extend_from_slice(&(req.queries.len() as u32).to_be_bytes());
                for q in &req.queries {
                    put_str32(&mut data, q);
                }
            }
        }
        encode_option(self.code(), &data)
    }
}

/// Encodes an option header and raw data as a client sends it.
pub fn encode_option(option: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(OPTION_HEADER_LEN + data.len());
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    out
}

fn put_str32(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn invalid(msg: &str) -> InvalidOption {
    InvalidOption(msg.to_string())
}

fn no_data(data: &[u8], what: &str) -> Result<(), InvalidOption> {
    if data.is_empty() {
        Ok(())
    } else {
        Err(InvalidOption(format!("{what} takes no data")))
    }
}

/// Checks a protocol string: UTF-8, no NUL, at most 4096 bytes.
fn string(b: &[u8], what: &str) -> Result<String, InvalidOption> {
    if b.len() > MAX_STRING {
        return Err(InvalidOption(format!("{what} is longer than {MAX_STRING} bytes")));
    }
    if b.contains(&0) {
        return Err(InvalidOption(format!("{what} contains NUL")));
    }
    String::from_utf8(b.to_vec()).map_err(|_| InvalidOption(format!("{what} is not UTF-8")))
}

/// A metadata context query must start with a non-empty namespace and a colon.
fn check_query(q: &str) -> Result<(), InvalidOption> {
    match q.find(':') {
        Some(i) if i > 0 && !q[..i].chars().any(char::is_whitespace) => Ok(()),
        _ => Err(InvalidOption(format!("query {q:?} lacks a namespace and colon"))),
    }
}

/// Whether `name` is a valid metadata context name: `namespace:leaf`, the
/// namespace non-empty without whitespace, the whole a protocol string.
pub fn is_context_name(name: &str) -> bool {
    name.len() <= MAX_STRING && !name.contains('\0') && check_query(name).is_ok()
}

/// A transmission command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// `NBD_CMD_READ`.
    Read,
    /// `NBD_CMD_WRITE`.
    Write,
    /// `NBD_CMD_DISC`.
    Disc,
    /// `NBD_CMD_FLUSH`.
    Flush,
    /// `NBD_CMD_TRIM`.
    Trim,
    /// `NBD_CMD_WRITE_ZEROES`.
    WriteZeroes,
    /// `NBD_CMD_BLOCK_STATUS`.
    BlockStatus,
    /// Anything else (`NBD_CMD_CACHE` included): answered with `EINVAL`.
    Other(u16),
}

impl Command {
    /// Decodes a command type.
    pub fn from_code(code: u16) -> Self {
        match code {
            CMD_READ => Command::Read,
            CMD_WRITE => Command::Write,
            CMD_DISC => Command::Disc,
            CMD_FLUSH => Command::Flush,
            CMD_TRIM => Command::Trim,
            CMD_WRITE_ZEROES => Command::WriteZeroes,
            CMD_BLOCK_STATUS => Command::BlockStatus,
            other => Command::Other(other),
        }
    }

    /// The command type on the wire.
    pub fn code(self) -> u16 {
        match self {
            Command::Read => CMD_READ,
            Command::Write => CMD_WRITE,
            Command::Disc => CMD_DISC,
            Command::Flush => CMD_FLUSH,
            Command::Trim => CMD_TRIM,
            Command::WriteZeroes => CMD_WRITE_ZEROES,
            Command::BlockStatus => CMD_BLOCK_STATUS,
            Command::Other(code) => code,
        }
    }
}

/// A transmission request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags (`CMD_FLAG_*`).
    pub flags: u16,
    /// The command.
    pub command: Command,
    /// Opaque client cookie, echoed in the reply.
    pub cookie: u64,
    /// Offset in the export.
    pub offset: u64,
    /// Length of the range (and of the payload, for a write).
    pub length: u32,
}

impl Request {
    /// Parses a 28-byte request header.
    pub fn parse(b: &[u8; REQUEST_LEN]) -> Result<Self, FrameError> {
        let mut r = Reader::new(b);
        let magic = r.u32().unwrap_or_default();
        if magic != REQUEST_MAGIC {
            return Err(FrameError::BadRequestMagic(magic));
        }
        Ok(Request {
            flags: r.u16().unwrap_or_default(),
            command: Command::from_code(r.u16().unwrap_or_default()),
            cookie: r.u64().unwrap_or_default(),
            offset: r.u64().unwrap_or_default(),
            length: r.u32().unwrap_or_default(),
        })
    }

    /// How many payload bytes follow this header on the wire.
    pub fn payload_len(&self) -> u32 {
        if self.command == Command::Write {
            self.length
        } else {
            0
        }
    }

    /// Encodes the header as a client sends it (without any payload).
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.command.code().to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..].copy_from_slice(&self.length.to_be_bytes());
        b
    }
}

/// Appends an option reply.
pub fn put_option_reply(out: &mut Vec<u8>, option: u32, reply: u32, data: &[u8]) {
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// Appends a simple reply header (a read's data follows it separately).
pub fn put_simple_reply(out: &mut Vec<u8>, error: u32, cookie: u64) {
    out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
}

/// Appends a structured reply chunk header; `length` bytes of payload follow.
pub fn put_chunk_header(out: &mut Vec<u8>, flags: u16, kind: u16, cookie: u64, length: u32) {
    out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&length.to_be_bytes());
}

/// Appends a final `NBD_REPLY_TYPE_ERROR` chunk with a message (cut to at
/// most 4096 bytes on a character boundary).
pub fn put_error_chunk(out: &mut Vec<u8>, cookie: u64, error: u32, message: &str) {
    let msg = truncate(message, MAX_STRING);
    put_chunk_header(out, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, cookie, 6 + msg.len() as u32);
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(msg.as_bytes());
}

/// `s` cut to at most `max` bytes on a character boundary.
pub fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A bounds-checked big-endian reader over a byte slice.
#[derive(Debug)]
pub(crate) struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(b: &'a [u8]) -> Self {
        Reader { b }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.b.len()
    }

    pub(crate) fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.b.len() {
            return None;
        }
        let (head, tail) = self.b.split_at(n);
        self.b = tail;
        Some(head)
    }

    pub(crate) fn u16(&mut self) -> Option<u16> {
        self.bytes(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }

    pub(crate) fn u32(&mut self) -> Option<u32> {
        self.bytes(4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub(crate) fn u64(&mut self) -> Option<u64> {
        self.bytes(8).map(|b| {
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            u64::from_be_bytes(a)
        })
    }

    /// A string preceded by its 32-bit length.
    fn string(&mut self, what: &str) -> Result<String, InvalidOption> {
        let len = self
            .u32()
            .ok_or_else(|| InvalidOption(format!("missing {what} length")))?;
        let b = usize::try_from(len)
            .ok()
            .and_then(|n| self.bytes(n))
            .ok_or_else(|| InvalidOption(format!("{what} runs past the option")))?;
        string(b, what)
    }

    fn end(&self) -> Result<(), InvalidOption> {
        if self.b.is_empty() {
            Ok(())
        } else {
            Err(InvalidOption(format!("{} trailing bytes in the option", self.b.len())))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greeting_is_nbdmagic_ihaveopt_and_flags() {
        let g = greeting();
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(&g[16..], &[0, 3]);
    }

    #[test]
    fn go_round_trips() {
        let opt = ClientOption::Go(InfoRequest {
            name: "disk".into(),
            requests: vec![INFO_BLOCK_SIZE],
        });
        let bytes = opt.encode();
        let hdr = OptionHeader::parse(bytes[..16].try_into().unwrap()).unwrap();
        assert_eq!(
            hdr,
            OptionHeader {
                option: OPT_GO,
                length: 4 + 4 + 2 + 2
            }
        );
        assert_eq!(ClientOption::parse(hdr.option, &bytes[16..]).unwrap(), opt);
    }

    #[test]
    fn go_with_name_past_the_data_is_invalid() {
        let mut data = 100u32.to_be_bytes().to_vec();
        data.extend_from_slice(b"abc\0\0");
        assert!(ClientOption::parse(OPT_GO, &data).is_err());
    }

    #[test]
    fn huge_query_count_is_refused_without_allocating() {
        let mut data = 0u32.to_be_bytes().to_vec();
        data.extend_from_slice(&u32::MAX.to_be_bytes());
        let err = ClientOption::parse(OPT_SET_META_CONTEXT, &data).unwrap_err();
        assert!(err.0.contains("query count"), "{err}");
    }

    #[test]
    fn queries_need_a_namespace() {
        for q in ["", ":x", "nocolon", "a b:c"] {
            assert!(check_query(q).is_err(), "{q:?}");
        }
        for q in ["base:", "qemu:dirty-bitmap:", "qemu:dirty-bitmap:52dec0d9-b943/81 x"] {
            assert!(check_query(q).is_ok(), "{q:?}");
        }
    }

    #[test]
    fn strings_must_be_utf8_without_nul_and_short() {
        assert!(string(b"ok", "x").is_ok());
        assert!(string(b"a\0b", "x").is_err());
        assert!(string(&[0xff, 0xfe], "x").is_err());
        assert!(string(&[b'a'; MAX_STRING + 1], "x").is_err());
    }

    #[test]
    fn truncate_respects_char_boundaries() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("héllo", 3), "hé");
        assert_eq!(truncate("abc", 10), "abc");
    }

    #[test]
    fn request_round_trips() {
        let req = Request {
            flags: CMD_FLAG_FUA,
            command: Command::Write,
            cookie: 7,
            offset: 4096,
            length: 512,
        };
        assert_eq!(Request::parse(&req.encode()).unwrap(), req);
        assert_eq!(req.payload_len(), 512);
        let mut bad = req.encode();
        bad[0] = 0;
        assert!(matches!(Request::parse(&bad), Err(FrameError::BadRequestMagic(_))));
    }
}
