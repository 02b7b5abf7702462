//! An NBD server (fixed newstyle handshake, structured replies, metadata
//! contexts) over a backend trait.
//!
//! The server speaks the protocol of the NBD project's `doc/proto.md` to
//! real clients: `qemu-img`/`qemu-io` (QEMU 7.2 to 10), libnbd's `nbdinfo`
//! and `nbdcopy`, and fio's `nbd` engine. Besides `base:allocation` it
//! serves QEMU's `qemu:dirty-bitmap:NAME` contexts (flag bit 0 = dirty), so
//! a backup client can ask over NBD which blocks changed. No maintained Rust
//! crate implements structured replies and metadata contexts, so the
//! protocol is written here by hand.
//!
//! # Layers
//! * [`proto`]: the wire format. Pure parsers (bytes to [`ClientOption`],
//!   [`Request`]) and encoders, no I/O: proptests feed them directly.
//! * [`Handshake`] and [`Session`]: the two phases as state machines. They
//!   call the backend but do no I/O: each takes one parsed message and
//!   leaves its reply in a buffer.
//! * [`serve_connection`] (and [`negotiate`], [`transmit`]): the small read
//!   and write loops over any `Read`/`Write` pair; [`Server`]: a thread per
//!   connection over a TCP or Unix listener, many clients at once.
//! * [`Exports`] and [`Export`]: what is served. [`MemoryExports`] is an
//!   in-memory backend for examples and tests.
//!
//! # Options (handshake)
//! | option | answer |
//! | --- | --- |
//! | `NBD_OPT_EXPORT_NAME` | size, flags, zeroes (unless `NO_ZEROES`); unknown export or bad name: connection closed |
//! | `NBD_OPT_GO`, `NBD_OPT_INFO` | `INFO_EXPORT` and `INFO_BLOCK_SIZE` always, `INFO_NAME` and `INFO_DESCRIPTION` when asked, `ACK`; unknown export: `ERR_UNKNOWN` |
//! | `NBD_OPT_LIST` | one `REP_SERVER` per export (name and description), `ACK`; data: `ERR_INVALID` |
//! | `NBD_OPT_ABORT` | `ACK`, then close |
//! | `NBD_OPT_STRUCTURED_REPLY` | `ACK`; data: `ERR_INVALID` |
//! | `NBD_OPT_LIST_META_CONTEXT` | no query: every context; `ns:` or `qemu:dirty-bitmap:` (a query ending in `:`): the contexts starting with it; other queries: themselves if the export has them; IDs 0 |
//! | `NBD_OPT_SET_META_CONTEXT` | exact names only (wildcards select nothing), IDs 1, 2, ...; before `STRUCTURED_REPLY`: `ERR_INVALID`; more than 256: `ERR_TOO_BIG` |
//! | anything else (`STARTTLS`, `EXTENDED_HEADERS`, ...) | `ERR_UNSUP` |
//!
//! Malformed option data gets `ERR_INVALID` with a message; option data over
//! [`Limits::max_option_data`] is skipped unread and gets `ERR_TOO_BIG`. A
//! bad magic or unknown client flags close the connection.
//!
//! # Commands (transmission)
//! | command | behaviour |
//! | --- | --- |
//! | `READ` | structured: one `OFFSET_DATA` chunk with `DONE` (`NONE` for length 0); simple otherwise. Holes are sent as data. Over the maximum payload: `EOVERFLOW` (structured) or `EINVAL` |
//! | `WRITE` (+`FUA`) | the payload is read whole before the export sees it; read-only: `EPERM`; past the end: `ENOSPC`; over the maximum payload: payload skipped, `EINVAL` |
//! | `WRITE_ZEROES` (+`FUA`, `NO_HOLE`) | like a write without payload |
//! | `TRIM` (+`FUA`) | read-only: `EPERM`; past the end: `EINVAL` |
//! | `FLUSH` | [`Export::flush`]; `FUA` also flushes after the write |
//! | `BLOCK_STATUS` (+`REQ_ONE`) | one `BLOCK_STATUS` chunk per selected context, extents merged and clipped to the request (at most 65536); no context selected, length 0 or past the end: `EINVAL` |
//! | `DISC` | close, no reply |
//! | anything else (`CACHE` included), or a flag the command does not take | `EINVAL` |
//!
//! Reads, writes, trims and zeroing must be aligned to the export's minimum
//! block size (`EINVAL`). With structured replies every error is an
//! `NBD_REPLY_TYPE_ERROR` chunk with a message. Transmission flags:
//! `HAS_FLAGS`, then `READ_ONLY` or `SEND_FLUSH | SEND_FUA | SEND_TRIM |
//! SEND_WRITE_ZEROES`, and `CAN_MULTI_CONN` if the export says so. Not
//! supported: TLS, extended headers, `DF`, `FAST_ZERO`, `CACHE`, oldstyle.
//!
//! Memory per connection is bounded by [`Limits`]: at most one write payload
//! and one read buffer of the maximum payload (32 MiB by default), and
//! option data of at most 64 KiB. Requests are served in order, one at a
//! time per connection; clients pipeline and, with `CAN_MULTI_CONN`, open
//! several connections.
//!
//! # Example
//! ```
//! use std::io::{Read, Write};
//! use std::sync::Arc;
//!
//! use nbd::{Export, MemoryExport, MemoryExports, Server};
//!
//! let exports = Arc::new(MemoryExports::new());
//! let disk = Arc::new(MemoryExport::new(1 << 20, 64 * 1024).with_description("a test disk"));
//! disk.add_bitmap("52dec0d9-b943-9d10-61d5-4c1be97b6563/81");
//! disk.write(4096, b"hello")?;
//! exports.insert("disk", disk);
//!
//! let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
//! let server = Server::new(exports).serve_tcp(listener)?;
//! println!("try: nbdinfo --map=qemu:dirty-bitmap:52dec0d9-b943-9d10-61d5-4c1be97b6563/81 {}", server.uri("disk"));
//!
//! // A minimal client: greeting, client flags, then NBD_OPT_LIST.
//! let nbd::ListenAddr::Tcp(addr) = server.addr().clone() else { unreachable!() };
//! let mut c = std::net::TcpStream::connect(addr)?;
//! let mut greeting = [0u8; 18];
//! c.read_exact(&mut greeting)?;
//! assert_eq!(&greeting[..16], b"NBDMAGICIHAVEOPT");
//! c.write_all(&nbd::proto::FLAG_C_FIXED_NEWSTYLE.to_be_bytes())?;
//! c.write_all(&nbd::proto::ClientOption::List.encode())?;
//! let mut reply = [0u8; 20 + 4 + 4 + 11];
//! c.read_exact(&mut reply)?;
//! assert_eq!(&reply[24..28], b"disk");
//! assert_eq!(&reply[28..], b"a test disk");
//! server.shutdown();
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod backend;
mod handshake;
mod memory;
pub mod proto;
mod server;
mod transmission;

pub use backend::{
    BlockSize, BlockSizeError, Errno, Export, ExportError, ExportListing, Exports, Extent, OpenError, BASE_ALLOCATION,
    QEMU_DIRTY_BITMAP, STATE_DIRTY, STATE_HOLE, STATE_ZERO,
};
pub use handshake::{Handshake, Limits, Step, MAX_SELECTED_CONTEXTS};
pub use memory::{MemoryExport, MemoryExports};
pub use proto::{ClientOption, Command, FrameError, InfoRequest, MetaRequest, Request};
pub use server::{negotiate, serve_connection, transmit, Config, ConnectionError, ListenAddr, Server, ServerHandle};
pub use transmission::{clip_extents, Outcome, Session, MAX_EXTENTS};
