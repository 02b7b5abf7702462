//! Shared by the integration tests: a test backend, a hand-made raw client,
//! and the rule for outside tools (skip with a reason, fail under CI=true).
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use nbd::proto::{self, ClientOption, InfoRequest, MetaRequest};
use nbd::{Command, Export, ListenAddr, MemoryExport, MemoryExports, Request, Server, ServerHandle};

pub const MIB: u64 = 1 << 20;
pub const SIZE: u64 = 16 * MIB;
pub const GRAN: u64 = 64 * 1024;
/// A change ID shaped bitmap name: a UUID, a slash, a sequence.
pub const BITMAP: &str = "52dec0d9-b943-9d10-61d5-4c1be97b6563/81";
/// A bitmap name with a space.
pub const BITMAP2: &str = "backup 1";

/// Whether outside tool `name` is on PATH. Missing: prints why the test is
/// skipped and returns false, or panics under CI=true.
pub fn tool(name: &str) -> bool {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
        .unwrap_or(false);
    if !found {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{name} is required under CI=true (apt-get install qemu-utils libnbd-bin fio)");
        }
        eprintln!("skipping: {name} is not installed (apt-get install qemu-utils libnbd-bin fio)");
    }
    found
}

/// A byte pattern that differs at every offset within a period of 251.
pub fn pattern(offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64).map(|i| ((offset + i) % 251) as u8 ^ 0x5a).collect()
}

/// Exports: `disk` (16 MiB, data in [0, 4 MiB) and [8, 9 MiB), bitmap
/// [`BITMAP`] dirty in [1 MiB, 1 MiB + 128 KiB) and [12 MiB, +64 KiB) and
/// [15 MiB, +64 KiB), bitmap [`BITMAP2`] dirty only in the last), `ro` (a
/// read-only export with data in its first MiB) and `small` (min block 512).
pub fn test_exports() -> Arc<MemoryExports> {
    let exports = Arc::new(MemoryExports::new());
    let disk = MemoryExport::new(SIZE, GRAN).with_description("test disk");
    disk.write(0, &pattern(0, 4 * MIB as usize)).unwrap();
    disk.write(8 * MIB, &pattern(8 * MIB, MIB as usize)).unwrap();
    disk.add_bitmap(BITMAP);
    disk.write(MIB, &pattern(7, 128 * 1024)).unwrap();
    disk.write(12 * MIB, &pattern(9, 64 * 1024)).unwrap();
    disk.add_bitmap(BITMAP2);
    disk.write(15 * MIB, &pattern(11, 64 * 1024)).unwrap();
    exports.insert("disk", Arc::new(disk));
    let ro = MemoryExport::new(4 * MIB, GRAN);
    ro.write(0, &pattern(3, MIB as usize)).unwrap();
    exports.insert("ro", Arc::new(ro.read_only().with_description("read-only disk")));
    let small = MemoryExport::new(MIB, GRAN).with_block_size(nbd::BlockSize::new(512, 4096, 1 << 20).unwrap());
    exports.insert("small", Arc::new(small));
    exports
}

pub fn start() -> (ServerHandle, Arc<MemoryExports>) {
    let exports = test_exports();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let server = Server::new(exports.clone()).serve_tcp(listener).unwrap();
    (server, exports)
}

pub fn tcp_addr(server: &ServerHandle) -> SocketAddr {
    match server.addr() {
        ListenAddr::Tcp(a) => *a,
        ListenAddr::Unix(_) => panic!("not TCP"),
    }
}

/// Runs of equal values in per-granule flags: (offset, length, value).
pub fn runs(bits: &[bool], gran: u64, size: u64) -> Vec<(u64, u64, bool)> {
    let mut out: Vec<(u64, u64, bool)> = Vec::new();
    for (i, &b) in bits.iter().enumerate() {
        let start = i as u64 * gran;
        let len = gran.min(size - start);
        match out.last_mut() {
            Some(last) if last.2 == b => last.1 += len,
            _ => out.push((start, len, b)),
        }
    }
    out
}

/// Per-granule flags from (offset, length, value) entries covering the export.
pub fn granules(entries: &[(u64, u64, bool)], gran: u64, size: u64) -> Vec<bool> {
    let n = size.div_ceil(gran) as usize;
    let mut out = vec![None; n];
    for &(off, len, v) in entries {
        assert!(
            off % gran == 0 && (len % gran == 0 || off + len == size),
            "unaligned entry {off}+{len}"
        );
        for g in (off / gran)..(off + len).div_ceil(gran) {
            out[g as usize] = Some(v);
        }
    }
    out.into_iter()
        .enumerate()
        .map(|(i, v)| v.unwrap_or_else(|| panic!("granule {i} not covered")))
        .collect()
}

/// A reply to an option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptReply {
    pub option: u32,
    pub kind: u32,
    pub data: Vec<u8>,
}

/// One reply in transmission: simple, or one structured chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Simple {
        error: u32,
        cookie: u64,
    },
    Chunk {
        flags: u16,
        kind: u16,
        cookie: u64,
        payload: Vec<u8>,
    },
}

impl Reply {
    /// The error value of a simple reply or an error chunk (0: none).
    pub fn error(&self) -> u32 {
        match self {
            Reply::Simple { error, .. } => *error,
            Reply::Chunk { kind, payload, .. } if kind & 0x8000 != 0 => {
                u32::from_be_bytes(payload[..4].try_into().unwrap())
            }
            Reply::Chunk { .. } => 0,
        }
    }
}

/// A block status chunk: context id and (length, flags) descriptors.
pub type StatusChunk = (u32, Vec<(u32, u32)>);

/// A hand-made client that speaks raw bytes.
pub struct Raw {
    pub s: TcpStream,
}

impl Raw {
    /// Connects and reads the greeting.
    pub fn connect(addr: SocketAddr) -> Raw {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut r = Raw { s };
        let g = r.read_n(18);
        assert_eq!(&g[..16], b"NBDMAGICIHAVEOPT");
        r
    }

    /// Connects and sends client flags (fixed newstyle, no zeroes).
    pub fn handshake(addr: SocketAddr) -> Raw {
        let mut r = Raw::connect(addr);
        r.send(&3u32.to_be_bytes());
        r
    }

    pub fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).unwrap();
    }

    /// Sends, ignoring errors (the server may already have closed).
    pub fn send_lossy(&mut self, b: &[u8]) {
        let _ = self.s.write_all(b);
    }

    pub fn read_n(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        self.s.read_exact(&mut b).unwrap();
        b
    }

    /// True if the server closed the connection (reads EOF or reset).
    pub fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        match self.s.read(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => e.kind() != std::io::ErrorKind::WouldBlock && e.kind() != std::io::ErrorKind::TimedOut,
        }
    }

    pub fn option(&mut self, opt: &ClientOption) {
        self.send(&opt.encode());
    }

    pub fn opt_reply(&mut self) -> OptReply {
        let h = self.read_n(20);
        assert_eq!(
            u64::from_be_bytes(h[..8].try_into().unwrap()),
            proto::OPTION_REPLY_MAGIC
        );
        let option = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        OptReply {
            option,
            kind,
            data: self.read_n(len),
        }
    }

    /// Replies up to and including the final one (ACK or an error).
    pub fn opt_replies(&mut self) -> Vec<OptReply> {
        let mut out = Vec::new();
        loop {
            let r = self.opt_reply();
            let last = r.kind == proto::REP_ACK || r.kind & (1 << 31) != 0;
            out.push(r);
            if last {
                return out;
            }
        }
    }

    /// Negotiates structured replies (if asked), selects `contexts` and
    /// enters transmission on `name`; returns (size, flags, selected ids).
    pub fn go(&mut self, name: &str, structured: bool, contexts: &[&str]) -> (u64, u16, Vec<(u32, String)>) {
        if structured {
            self.option(&ClientOption::StructuredReply);
            assert_eq!(self.opt_reply().kind, proto::REP_ACK);
        }
        let mut ids = Vec::new();
        if !contexts.is_empty() {
            self.option(&ClientOption::SetMetaContext(MetaRequest {
                export: name.into(),
                queries: contexts.iter().map(|c| c.to_string()).collect(),
            }));
            for r in self.opt_replies() {
                if r.kind == proto::REP_META_CONTEXT {
                    let id = u32::from_be_bytes(r.data[..4].try_into().unwrap());
                    ids.push((id, String::from_utf8(r.data[4..].to_vec()).unwrap()));
                } else {
                    assert_eq!(r.kind, proto::REP_ACK);
                }
            }
        }
        self.option(&ClientOption::Go(InfoRequest {
            name: name.into(),
            requests: vec![proto::INFO_BLOCK_SIZE],
        }));
        let mut export = None;
        for r in self.opt_replies() {
            assert!(
                r.kind == proto::REP_INFO || r.kind == proto::REP_ACK,
                "GO failed: {r:?}"
            );
            if r.kind == proto::REP_INFO && r.data[..2] == [0, 0] {
                let size = u64::from_be_bytes(r.data[2..10].try_into().unwrap());
                let flags = u16::from_be_bytes(r.data[10..12].try_into().unwrap());
                export = Some((size, flags));
            }
        }
        let (size, flags) = export.expect("NBD_INFO_EXPORT");
        (size, flags, ids)
    }

    pub fn request(&mut self, command: Command, flags: u16, cookie: u64, offset: u64, length: u32) {
        self.send(
            &Request {
                flags,
                command,
                cookie,
                offset,
                length,
            }
            .encode(),
        );
    }

    /// One simple reply or structured chunk; a simple reply to a read of
    /// `read_len` bytes carries that much data, returned with it.
    pub fn reply(&mut self, read_len: usize) -> (Reply, Vec<u8>) {
        let m = self.read_n(4);
        let magic = u32::from_be_bytes(m[..].try_into().unwrap());
        if magic == proto::SIMPLE_REPLY_MAGIC {
            let h = self.read_n(12);
            let error = u32::from_be_bytes(h[..4].try_into().unwrap());
            let cookie = u64::from_be_bytes(h[4..].try_into().unwrap());
            let data = if error == 0 { self.read_n(read_len) } else { Vec::new() };
            (Reply::Simple { error, cookie }, data)
        } else {
            assert_eq!(magic, proto::STRUCTURED_REPLY_MAGIC, "bad reply magic");
            let h = self.read_n(16);
            let flags = u16::from_be_bytes(h[..2].try_into().unwrap());
            let kind = u16::from_be_bytes(h[2..4].try_into().unwrap());
            let cookie = u64::from_be_bytes(h[4..12].try_into().unwrap());
            let len = u32::from_be_bytes(h[12..].try_into().unwrap()) as usize;
            (
                Reply::Chunk {
                    flags,
                    kind,
                    cookie,
                    payload: self.read_n(len),
                },
                Vec::new(),
            )
        }
    }

    /// All chunks of a structured reply (up to the one with DONE).
    pub fn chunks(&mut self) -> Vec<Reply> {
        let mut out = Vec::new();
        loop {
            let (r, _) = self.reply(0);
            let done = match &r {
                Reply::Simple { .. } => true,
                Reply::Chunk { flags, .. } => flags & proto::REPLY_FLAG_DONE != 0,
            };
            out.push(r);
            if done {
                return out;
            }
        }
    }

    /// The structured read reply's data, or the error value.
    pub fn structured_read(&mut self, offset: u64, len: usize) -> Result<Vec<u8>, u32> {
        let mut data = vec![0u8; len];
        let mut error = 0;
        for c in self.chunks() {
            match c {
                Reply::Chunk {
                    kind: proto::REPLY_TYPE_OFFSET_DATA,
                    payload,
                    ..
                } => {
                    let at = u64::from_be_bytes(payload[..8].try_into().unwrap()) - offset;
                    data[at as usize..at as usize + payload.len() - 8].copy_from_slice(&payload[8..]);
                }
                Reply::Chunk {
                    kind: proto::REPLY_TYPE_NONE,
                    ..
                } => {}
                other => error = other.error(),
            }
        }
        if error != 0 {
            Err(error)
        } else {
            Ok(data)
        }
    }

    /// Block status chunks: (context id, extents).
    pub fn block_status(&mut self) -> Result<Vec<StatusChunk>, u32> {
        let mut out = Vec::new();
        for c in self.chunks() {
            match c {
                Reply::Chunk {
                    kind: proto::REPLY_TYPE_BLOCK_STATUS,
                    payload,
                    ..
                } => {
                    assert_eq!((payload.len() - 4) % 8, 0);
                    let id = u32::from_be_bytes(payload[..4].try_into().unwrap());
                    let ext = payload[4..]
                        .chunks(8)
                        .map(|e| {
                            (
                                u32::from_be_bytes(e[..4].try_into().unwrap()),
                                u32::from_be_bytes(e[4..].try_into().unwrap()),
                            )
                        })
                        .collect();
                    out.push((id, ext));
                }
                Reply::Chunk {
                    kind: proto::REPLY_TYPE_NONE,
                    ..
                } => {}
                other => return Err(other.error()),
            }
        }
        Ok(out)
    }
}

/// The contents of export `name`.
pub fn contents(exports: &MemoryExports, name: &str) -> Vec<u8> {
    exports.get(name).unwrap().contents()
}

/// Reads a range of the export directly (not over NBD).
pub fn direct(exports: &MemoryExports, name: &str, offset: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0; len];
    exports.get(name).unwrap().read(offset, &mut b).unwrap();
    b
}
