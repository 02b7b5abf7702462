//! The control socket's client: what `cbtsim` commands use while a
//! `cbtsim serve` owns the datastore.
//!
//! ```no_run
//! use service::{client, Request, Response};
//!
//! let ds = std::path::Path::new("/var/lib/cbtsim");
//! let r = client::call(ds, &Request::SnapshotList { vm: "web01".into() }, &())?;
//! if let Response::Snapshots { snapshots, .. } = r {
//!     println!("{} snapshots", snapshots.len());
//! }
//! # Ok::<(), service::ActionError>(())
//! ```

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use backup::Progress;

use crate::action::{ActionError, ErrorKind, Request, Response};
use crate::control::Event;

/// The service's files inside a datastore.
pub const STATE_DIR: &str = ".cbtsim";

/// The control socket of the service of `datastore`.
pub fn socket_path(datastore: &Path) -> PathBuf {
    datastore.join(STATE_DIR).join("control.sock")
}

/// Whether a service answers on the control socket of `datastore`. A socket
/// file that a killed serve left behind does not answer (the connection is
/// refused), nor does a missing one.
pub fn is_serving(datastore: &Path) -> bool {
    UnixStream::connect(socket_path(datastore)).is_ok()
}

/// Sends `request` to the service of `datastore`, reports its progress
/// events to `progress`, and returns its result. A service that is not
/// running, or that goes away mid-request, is [`ErrorKind::Unavailable`].
pub fn call(datastore: &Path, request: &Request, progress: &dyn Progress) -> Result<Response, ActionError> {
    let path = socket_path(datastore);
    let stream = UnixStream::connect(&path).map_err(|e| {
        ActionError::new(
            ErrorKind::Unavailable,
            format!(
                "no cbtsim serve answers on datastore {} ({}: {e})",
                datastore.display(),
                path.display()
            ),
        )
    })?;
    call_on(stream, request, progress)
}

/// [`call`] over a connected stream.
pub fn call_on(mut stream: UnixStream, request: &Request, progress: &dyn Progress) -> Result<Response, ActionError> {
    let lost = |e: std::io::Error| ActionError::new(ErrorKind::Unavailable, format!("lost the service: {e}"));
    let mut line = serde_json::to_vec(request)
        .map_err(|e| ActionError::new(ErrorKind::InvalidRequest, format!("cannot encode the request: {e}")))?;
    line.push(b'\n');
    stream.write_all(&line).map_err(lost)?;
    let mut reader = BufReader::new(stream);
    let mut buf = String::new();
    loop {
        buf.clear();
        if reader.read_line(&mut buf).map_err(lost)? == 0 {
            return Err(ActionError::new(
                ErrorKind::Unavailable,
                "the service closed the connection before answering",
            ));
        }
        let event: Event = serde_json::from_str(&buf).map_err(|e| {
            ActionError::new(
                ErrorKind::Internal,
                format!("the service sent a line that is not an event ({e})"),
            )
        })?;
        match event {
            Event::Begin { label, total } => progress.begin(&label, total),
            Event::Advance { units } => progress.advance(units),
            Event::Note { note } => progress.note(&note),
            Event::End {} => progress.end(),
            Event::Done { response } => return Ok(response),
            Event::Failed { error } => return Err(error),
        }
    }
}
