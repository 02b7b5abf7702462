//! The socket side: a thread per connection over TCP or Unix sockets, and
//! the small read/write loops around [`Handshake`] and [`Session`].

use std::collections::HashMap;
use std::io::{self, BufReader, IoSlice, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use thiserror::Error;

use crate::backend::Exports;
use crate::handshake::{Handshake, Limits, Step};
use crate::proto::{self, FrameError, OptionHeader, Request};
use crate::transmission::{Outcome, Session};

/// Why a connection ended other than by the client's choice.
#[derive(Debug, Error)]
pub enum ConnectionError {
    /// The socket failed, or the client closed it in the middle of a message.
    #[error("connection I/O: {0}")]
    Io(#[from] io::Error),
    /// The client broke the framing (bad magic, unknown client flags).
    #[error("protocol violation: {0}")]
    Frame(#[from] FrameError),
}

/// Server settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// Per-connection limits.
    pub limits: Limits,
    /// Connections served at once; more are closed at once.
    pub max_connections: usize,
    /// How long the handshake may wait for the client (`None`: forever).
    /// Transmission has no timeout: clients may idle.
    pub handshake_timeout: Option<Duration>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            limits: Limits::default(),
            max_connections: 256,
            handshake_timeout: Some(Duration::from_secs(30)),
        }
    }
}

/// Runs the handshake on one connection: the greeting, the client flags and
/// options until the client enters transmission (`Some`) or ends (`None`).
pub fn negotiate<R: Read, W: Write>(
    exports: Arc<dyn Exports>,
    limits: Limits,
    reader: &mut R,
    writer: &mut W,
) -> Result<Option<Session>, ConnectionError> {
    writer.write_all(&proto::greeting())?;
    writer.flush()?;
    let mut flags = [0u8; 4];
    reader.read_exact(&mut flags)?;
    let flags = proto::parse_client_flags(u32::from_be_bytes(flags))?;
    let mut hs = Handshake::new(exports, limits, flags);
    let mut data = Vec::new();
    let mut out = Vec::new();
    loop {
        let mut h = [0u8; proto::OPTION_HEADER_LEN];
        reader.read_exact(&mut h)?;
        let header = OptionHeader::parse(&h)?;
        out.clear();
        let step = if header.length > limits.max_option_data {
            let step = hs.too_big(header.option, &mut out);
            if matches!(step, Step::Continue) {
                skip(reader, u64::from(header.length))?;
            }
            step
        } else {
            data.resize(header.length as usize, 0);
            reader.read_exact(&mut data)?;
            hs.option(header.option, &data, &mut out)
        };
        writer.write_all(&out)?;
        writer.flush()?;
        match step {
            Step::Continue => {}
            Step::Close => return Ok(None),
            Step::Transmission(session) => return Ok(Some(*session)),
        }
    }
}

/// Serves requests until the client disconnects (`NBD_CMD_DISC` or a close
/// between requests: `Ok`) or the connection fails.
pub fn transmit<R: Read, W: Write>(
    mut session: Session,
    reader: &mut R,
    writer: &mut W,
) -> Result<(), ConnectionError> {
    let mut payload = Vec::new();
    loop {
        let mut h = [0u8; proto::REQUEST_LEN];
        if !read_exact_or_eof(reader, &mut h)? {
            return Ok(());
        }
        let req = Request::parse(&h)?;
        let len = req.payload_len();
        if len > session.max_payload() {
            skip(reader, u64::from(len))?;
            session.reject_oversized(&req);
        } else {
            let len = len as usize;
            if payload.len() < len {
                payload.resize(len, 0);
            }
            // The whole payload arrives before the export sees any of it: a
            // client that leaves mid-write changes nothing.
            reader.read_exact(&mut payload[..len])?;
            if session.handle(&req, &payload[..len]) == Outcome::Disconnect {
                return Ok(());
            }
        }
        let (head, data) = session.reply();
        write_all2(writer, head, data)?;
        writer.flush()?;
    }
}

/// Serves one connection from handshake to disconnect.
pub fn serve_connection<R: Read, W: Write>(
    exports: Arc<dyn Exports>,
    limits: Limits,
    reader: &mut R,
    writer: &mut W,
) -> Result<(), ConnectionError> {
    match negotiate(exports, limits, reader, writer)? {
        Some(session) => transmit(session, reader, writer),
        None => Ok(()),
    }
}

/// Fills `buf`, or returns `false` if the stream ended before its first byte.
fn read_exact_or_eof<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Reads and drops `n` bytes.
fn skip<R: Read>(r: &mut R, n: u64) -> io::Result<()> {
    let copied = io::copy(&mut r.take(n), &mut io::sink())?;
    if copied < n {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// Writes `a` then `b` with as few system calls as the writer allows.
fn write_all2<W: Write>(w: &mut W, a: &[u8], b: &[u8]) -> io::Result<()> {
    let mut slices = [IoSlice::new(a), IoSlice::new(b)];
    let mut bufs = &mut slices[..];
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match w.write_vectored(bufs) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Where a server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// A TCP address.
    Tcp(SocketAddr),
    /// A Unix socket path.
    Unix(PathBuf),
}

impl ListenAddr {
    /// The NBD URI of export `name` at this address (`nbd://host:port/name`
    /// or `nbd+unix:///name?socket=path`), as libnbd tools, qemu-img and fio
    /// take it.
    pub fn uri(&self, name: &str) -> String {
        match self {
            ListenAddr::Tcp(addr) => {
                let host = match addr.ip() {
                    std::net::IpAddr::V6(ip) => format!("[{ip}]"),
                    ip => ip.to_string(),
                };
                format!("nbd://{host}:{}/{}", addr.port(), percent_encode(name))
            }
            ListenAddr::Unix(path) => {
                format!(
                    "nbd+unix:///{}?socket={}",
                    percent_encode(name),
                    percent_encode(&path.to_string_lossy())
                )
            }
        }
    }
}

/// Percent-encodes all but RFC 3986 unreserved characters and `/`.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A stream a connection thread can serve.
trait Socket: Read + Write + Send + Sized + 'static {
    fn clone_socket(&self) -> io::Result<Self>;
    fn set_read_timeout_to(&self, t: Option<Duration>) -> io::Result<()>;
    fn shut(&self);
}

impl Socket for TcpStream {
    fn clone_socket(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn set_read_timeout_to(&self, t: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(t)
    }
    fn shut(&self) {
        let _ = self.shutdown(Shutdown::Both);
    }
}

impl Socket for UnixStream {
    fn clone_socket(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn set_read_timeout_to(&self, t: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(t)
    }
    fn shut(&self) {
        let _ = self.shutdown(Shutdown::Both);
    }
}

fn run_socket<S: Socket>(exports: Arc<dyn Exports>, config: Config, stream: S) -> Result<(), ConnectionError> {
    stream.set_read_timeout_to(config.handshake_timeout)?;
    let mut reader = BufReader::with_capacity(1 << 16, stream.clone_socket()?);
    let mut writer = stream;
    let Some(session) = negotiate(exports, config.limits, &mut reader, &mut writer)? else {
        return Ok(());
    };
    writer.set_read_timeout_to(None)?;
    transmit(session, &mut reader, &mut writer)
}

/// Live connections: how to cut each one, and its thread.
type Registry = Mutex<HashMap<u64, (Box<dyn Fn() + Send>, Option<JoinHandle<()>>)>>;

struct Shared {
    exports: Arc<dyn Exports>,
    config: Config,
    stop: AtomicBool,
    next_id: AtomicU64,
    conns: Registry,
}

impl Shared {
    fn accept<S: Socket>(self: &Arc<Self>, stream: S) {
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        if conns.len() >= self.config.max_connections || self.stop.load(Ordering::SeqCst) {
            return; // dropping the stream closes it
        }
        let Ok(cutter) = stream.clone_socket() else {
            return;
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let shared = Arc::clone(self);
        let spawned = std::thread::Builder::new()
            .name(format!("nbd-conn-{id}"))
            .spawn(move || {
                let _ = run_socket(Arc::clone(&shared.exports), shared.config, stream);
                let mut conns = shared.conns.lock().unwrap_or_else(|e| e.into_inner());
                conns.remove(&id);
            });
        if let Ok(handle) = spawned {
            conns.insert(id, (Box::new(move || cutter.shut()), Some(handle)));
        }
    }
}

/// An NBD server: the exports and settings, ready to listen.
pub struct Server {
    exports: Arc<dyn Exports>,
    config: Config,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// A server for `exports` with the default [`Config`].
    pub fn new(exports: Arc<dyn Exports>) -> Self {
        Server {
            exports,
            config: Config::default(),
        }
    }

    /// Replaces the settings.
    pub fn with_config(mut self, config: Config) -> Self {
        self.config = config;
        self
    }

    fn shared(self) -> Arc<Shared> {
        Arc::new(Shared {
            exports: self.exports,
            config: self.config,
            stop: AtomicBool::new(false),
            next_id: AtomicU64::new(0),
            conns: Mutex::new(HashMap::new()),
        })
    }

    /// Serves connections from a bound TCP listener on a background thread.
    pub fn serve_tcp(self, listener: TcpListener) -> io::Result<ServerHandle> {
        let addr = listener.local_addr()?;
        let shared = self.shared();
        let s = Arc::clone(&shared);
        let accept = std::thread::Builder::new().name("nbd-accept".into()).spawn(move || {
            for stream in listener.incoming() {
                if s.stop.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(stream) = stream {
                    let _ = stream.set_nodelay(true);
                    s.accept(stream);
                }
            }
        })?;
        Ok(ServerHandle {
            addr: ListenAddr::Tcp(addr),
            shared,
            accept: Some(accept),
        })
    }

    /// Serves connections from a bound Unix listener on a background thread.
    pub fn serve_unix(self, listener: UnixListener) -> io::Result<ServerHandle> {
        let path = listener
            .local_addr()?
            .as_pathname()
            .map(Path::to_path_buf)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "unnamed Unix socket"))?;
        let shared = self.shared();
        let s = Arc::clone(&shared);
        let accept = std::thread::Builder::new().name("nbd-accept".into()).spawn(move || {
            for stream in listener.incoming() {
                if s.stop.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(stream) = stream {
                    s.accept(stream);
                }
            }
        })?;
        Ok(ServerHandle {
            addr: ListenAddr::Unix(path),
            shared,
            accept: Some(accept),
        })
    }
}

/// A running server. Dropping it (or [`shutdown`](Self::shutdown)) stops
/// accepting, cuts every connection and waits for their threads.
pub struct ServerHandle {
    addr: ListenAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for ServerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerHandle")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl ServerHandle {
    /// Where the server listens.
    pub fn addr(&self) -> &ListenAddr {
        &self.addr
    }

    /// The NBD URI of export `name` on this server.
    pub fn uri(&self, name: &str) -> String {
        self.addr.uri(name)
    }

    /// Connections being served now.
    pub fn connections(&self) -> usize {
        self.shared.conns.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Stops the server (the same as dropping the handle).
    pub fn shutdown(self) {}

    fn stop(&mut self) {
        let Some(accept) = self.accept.take() else {
            return;
        };
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the blocked accept with a connection of our own.
        match &self.addr {
            ListenAddr::Tcp(addr) => {
                let mut wake = *addr;
                if wake.ip().is_unspecified() {
                    wake.set_ip(if addr.is_ipv4() {
                        Ipv4Addr::LOCALHOST.into()
                    } else {
                        Ipv6Addr::LOCALHOST.into()
                    });
                }
                let _ = TcpStream::connect_timeout(&wake, Duration::from_secs(1));
            }
            ListenAddr::Unix(path) => {
                let _ = UnixStream::connect(path);
            }
        }
        let _ = accept.join();
        let conns: Vec<_> = {
            let mut conns = self.shared.conns.lock().unwrap_or_else(|e| e.into_inner());
            conns.drain().collect()
        };
        for (_, (cut, handle)) in conns {
            cut();
            if let Some(handle) = handle {
                let _ = handle.join();
            }
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris() {
        let tcp = ListenAddr::Tcp("127.0.0.1:10809".parse().unwrap());
        assert_eq!(tcp.uri("disk"), "nbd://127.0.0.1:10809/disk");
        assert_eq!(tcp.uri("vm 1/disk@a:b"), "nbd://127.0.0.1:10809/vm%201/disk%40a%3Ab");
        let unix = ListenAddr::Unix("/tmp/x y.sock".into());
        assert_eq!(unix.uri("d"), "nbd+unix:///d?socket=/tmp/x%20y.sock");
    }
}
