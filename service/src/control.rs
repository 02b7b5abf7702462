//! The control socket: JSON lines over a Unix socket in the datastore.
//!
//! A client connects, sends one [`Request`] as one line of JSON, and reads
//! [`Event`]s, one JSON document per line: progress (`begin`, `advance`,
//! `end`) while the action runs, then exactly one `done` (with the
//! [`Response`]) or `failed` (with the [`ActionError`]), and the server
//! closes the connection. Each connection has a thread; requests run
//! concurrently.
//!
//! ```text
//! > {"action":"snapshot-create","vm":"web01","name":"s1"}
//! < {"event":"done","response":{"result":"snapshot-created","data":{"name":"s1","disks":[...]}}}
//! ```
//!
//! Bad input gets a typed error, never a panic: a line that is not JSON or
//! not a known request (`invalid-request`), a line over [`MAX_REQUEST`]
//! bytes (`too-large`, the rest is not read), no request within
//! [`REQUEST_TIMEOUT`] or a connection closed in the middle of the line
//! (`invalid-request`, if the client still listens). A client that leaves
//! while its action runs does not stop the action.

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Write};
use std::net::Shutdown;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use backup::Progress;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::action::{ActionError, ErrorKind, Request, Response};
use crate::exec::Service;

/// The longest request line accepted, newline included.
pub const MAX_REQUEST: u64 = 8 << 20;
/// How long a new connection may take to send its request line.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Progress `advance` events are sent at most this often.
const ADVANCE_EVERY: Duration = Duration::from_millis(100);

/// One line the server sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum Event {
    /// A phase of a long action starts, with `total` units to go if known.
    Begin {
        /// What runs.
        label: String,
        /// Units (bytes, or ops for a guest workload).
        total: Option<u64>,
    },
    /// `units` more are done.
    Advance {
        /// How many.
        units: u64,
    },
    /// How the phase is going, in a few words.
    Note {
        /// The words.
        note: String,
    },
    /// The phase is over.
    End {},
    /// The action succeeded (the last line).
    Done {
        /// Its result.
        response: Response,
    },
    /// The action failed (the last line).
    Failed {
        /// Why.
        error: ActionError,
    },
}

impl Event {
    /// The event as one line of JSON, newline included.
    pub fn line(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec(self).unwrap_or_else(|e| {
            // Only a non-string map key or a failing Serialize impl could do
            // this; none of ours does. Report it rather than panic.
            let err = Event::Failed {
                error: ActionError::new(ErrorKind::Internal, format!("cannot encode the answer: {e}")),
            };
            serde_json::to_vec(&err).unwrap_or_default()
        });
        v.push(b'\n');
        v
    }
}

/// Reads the request line: the bytes up to a newline, at most
/// [`MAX_REQUEST`]; parses it.
pub fn read_request<R: BufRead>(reader: R) -> Result<Option<Request>, ActionError> {
    let mut line = Vec::new();
    let mut limited = reader.take(MAX_REQUEST);
    match limited.read_until(b'\n', &mut line) {
        Ok(0) => return Ok(None),
        Ok(_) => {}
        Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
            return Err(ActionError::new(
                ErrorKind::InvalidRequest,
                format!("no request line within {} s", REQUEST_TIMEOUT.as_secs()),
            ))
        }
        Err(e) => return Err(ActionError::new(ErrorKind::Io, format!("reading the request: {e}"))),
    }
    if line.last() != Some(&b'\n') {
        if line.len() as u64 >= MAX_REQUEST {
            return Err(ActionError::new(
                ErrorKind::TooLarge,
                format!("the request line is longer than {MAX_REQUEST} bytes"),
            ));
        }
        return Err(ActionError::new(
            ErrorKind::InvalidRequest,
            "the connection closed before the request line ended (no newline)",
        ));
    }
    serde_json::from_slice(&line)
        .map(Some)
        .map_err(|e| ActionError::new(ErrorKind::InvalidRequest, format!("not a valid request: {e}")))
}

/// Sends progress as events, `advance` at most every [`ADVANCE_EVERY`].
/// Send errors (the client left) are ignored: the action goes on.
struct SocketProgress<'a> {
    out: Mutex<(&'a UnixStream, Instant)>,
    pending: AtomicU64,
    broken: AtomicBool,
}

impl SocketProgress<'_> {
    fn send(&self, out: &mut (&UnixStream, Instant), e: &Event) {
        if self.broken.load(Ordering::Relaxed) {
            return;
        }
        if out.0.write_all(&e.line()).is_err() {
            self.broken.store(true, Ordering::Relaxed);
        }
        out.1 = Instant::now();
    }

    fn flush_pending(&self, out: &mut (&UnixStream, Instant)) {
        let units = self.pending.swap(0, Ordering::Relaxed);
        if units > 0 {
            self.send(out, &Event::Advance { units });
        }
    }
}

impl Progress for SocketProgress<'_> {
    fn begin(&self, label: &str, total: Option<u64>) {
        let mut out = self.out.lock();
        self.flush_pending(&mut out);
        self.send(
            &mut out,
            &Event::Begin {
                label: label.to_owned(),
                total,
            },
        );
    }

    fn advance(&self, units: u64) {
        self.pending.fetch_add(units, Ordering::Relaxed);
        if let Some(mut out) = self.out.try_lock() {
            if out.1.elapsed() >= ADVANCE_EVERY {
                self.flush_pending(&mut out);
            }
        }
    }

    fn note(&self, note: &str) {
        let mut out = self.out.lock();
        self.flush_pending(&mut out);
        self.send(&mut out, &Event::Note { note: note.to_owned() });
    }

    fn end(&self) {
        let mut out = self.out.lock();
        self.flush_pending(&mut out);
        self.send(&mut out, &Event::End {});
    }
}

/// Serves one connection: one request, its events, the result.
fn serve_one(service: &Service, stream: &UnixStream) {
    let _ = stream.set_read_timeout(Some(REQUEST_TIMEOUT));
    let request = match read_request(BufReader::new(stream)) {
        Ok(Some(r)) => r,
        Ok(None) => return,
        Err(error) => {
            let _ = (&*stream).write_all(&Event::Failed { error }.line());
            return;
        }
    };
    let progress = SocketProgress {
        out: Mutex::new((stream, Instant::now())),
        pending: AtomicU64::new(0),
        broken: AtomicBool::new(false),
    };
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| service.execute(request, &progress)))
        .unwrap_or_else(|p| {
            let what = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            Err(ActionError::new(
                ErrorKind::Internal,
                format!("the action failed unexpectedly (a bug): {what}"),
            ))
        });
    let event = match result {
        Ok(response) => Event::Done { response },
        Err(error) => Event::Failed { error },
    };
    let mut out = progress.out.lock();
    progress.flush_pending(&mut out);
    let _ = out.0.write_all(&event.line());
}

/// Live connections: a handle to cut each one's reads, and its thread.
type Conns = Mutex<HashMap<u64, (UnixStream, Option<JoinHandle<()>>)>>;

/// A running control socket server.
#[derive(Debug)]
pub struct ControlServer {
    path: PathBuf,
    listener: Arc<UnixListener>,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
    conns: Arc<Conns>,
}

impl ControlServer {
    /// Binds the socket at `path` (an existing file there is replaced: the
    /// caller holds the datastore's serve lock), mode 0600, and serves
    /// `service` on a background thread.
    pub fn start(service: Arc<Service>, path: &Path) -> io::Result<ControlServer> {
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let listener = Arc::new(UnixListener::bind(path)?);
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Arc<Conns> = Arc::new(Mutex::new(HashMap::new()));
        let (l, s, c) = (listener.clone(), stop.clone(), conns.clone());
        let accept = std::thread::Builder::new()
            .name("control-accept".into())
            .spawn(move || accept_loop(&l, &service, &s, &c))?;
        Ok(ControlServer {
            path: path.to_owned(),
            listener,
            stop,
            accept: Some(accept),
            conns,
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops accepting, cuts connections that have not sent their request,
    /// waits for the actions in flight, and removes the socket file.
    pub fn shutdown(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        let Some(accept) = self.accept.take() else {
            return;
        };
        self.stop.store(true, Ordering::SeqCst);
        // Shutting a listening socket down wakes its blocked accept with an
        // error (Linux), whether or not the socket file is still there.
        let _ = rustix::net::shutdown(&*self.listener, rustix::net::Shutdown::Both);
        let _ = accept.join();
        let conns: Vec<_> = self.conns.lock().drain().collect();
        for (_, (stream, _)) in &conns {
            let _ = stream.shutdown(Shutdown::Read);
        }
        for (_, (_, handle)) in conns {
            if let Some(h) = handle {
                let _ = h.join();
            }
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.stop_now();
    }
}

fn accept_loop(listener: &UnixListener, service: &Arc<Service>, stop: &AtomicBool, conns: &Arc<Conns>) {
    let mut next = 0u64;
    for stream in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(stream) = stream else {
            // EMFILE and the like: do not spin.
            std::thread::sleep(Duration::from_millis(10));
            continue;
        };
        let Ok(cutter) = stream.try_clone() else {
            continue;
        };
        let id = next;
        next += 1;
        let (service, c) = (service.clone(), conns.clone());
        let mut map = conns.lock();
        let spawned = std::thread::Builder::new()
            .name(format!("control-{id}"))
            .spawn(move || {
                serve_one(&service, &stream);
                c.lock().remove(&id);
            });
        if let Ok(h) = spawned {
            map.insert(id, (cutter, Some(h)));
        }
    }
}
