//! `cbtsim serve`: one process owns the datastore and runs every front end
//! over one [`Service`].
//!
//! ```text
//! DATASTORE/.cbtsim/        mode 0700
//!   serve.lock              flock held while a serve runs
//!   serve.json              the running serve: pid, addresses (ServeStatus)
//!   control.sock            the control socket, mode 0600
//!   tls-cert.pem            the self-signed certificate (made once)
//!   tls-key.pem             its key, mode 0600
//! ```
//!
//! [`Daemon::shutdown`] stops in an order that leaves the datastore clean:
//! new requests are refused and guest workloads stopped, the HTTP and NBD
//! servers cut their connections, actions in flight on the control socket
//! finish, and then the VMs are closed, so their trackers close cleanly and
//! every change ID stays valid across the restart.

use std::fs::File;
use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::action::ActionError;
use crate::client::{socket_path, STATE_DIR};
use crate::control::ControlServer;
use crate::exec::Service;
use crate::export::HostExports;
use crate::http::{self, HttpServer, WebState};

/// How to serve.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// The datastore directory (created if missing).
    pub datastore: PathBuf,
    /// The HTTPS (or HTTP) address.
    pub listen: SocketAddr,
    /// Plain HTTP instead of HTTPS (for tests).
    pub plain_http: bool,
    /// The NBD address.
    pub nbd: SocketAddr,
    /// Allow addresses other than loopback.
    pub allow_remote: bool,
    /// The password of user `root`.
    pub password: String,
    /// A backup repository whose points NBD exports as `repo:POINT/DISK` (read-only).
    pub repository: Option<PathBuf>,
    /// The most changed areas in one `QueryChangedDiskAreas` answer of the
    /// vSphere API (ESXi: 2000).
    pub max_areas: usize,
}

/// A running serve, as `serve.json` and `cbtsim serve --json` describe it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServeStatus {
    /// The serving process.
    pub pid: u32,
    /// Its version.
    pub version: String,
    /// The datastore.
    pub datastore: PathBuf,
    /// Seconds since the Unix epoch.
    pub started: u64,
    /// The web front end's URL.
    pub web: String,
    /// The NBD server's address (`HOST:PORT`); exports are `VM/DISK` and `VM/DISK@SNAPSHOT`.
    pub nbd: String,
    /// The control socket.
    pub control: PathBuf,
    /// The repository whose points are exported as `repo:POINT/DISK`, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository: Option<PathBuf>,
}

impl ServeStatus {
    /// The NBD URI of export `name`.
    pub fn nbd_uri(&self, name: &str) -> String {
        format!("nbd://{}/{name}", self.nbd)
    }
}

/// Why a serve could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Another serve owns the datastore.
    #[error("datastore {} is already served by {by}", datastore.display())]
    AlreadyServed {
        /// The datastore.
        datastore: PathBuf,
        /// Who (pid and addresses, from its serve.json).
        by: String,
    },
    /// No password, or an empty one.
    #[error("no password: set CBTSIM_PASSWORD or pass --password-file FILE (the user is root)")]
    NoPassword,
    /// A non-loopback address without permission.
    #[error(
        "refusing to listen on {addr} for {what}: not a loopback address (pass --allow-remote to serve other machines)"
    )]
    NotLoopback {
        /// Which front end.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
    },
    /// An address could not be bound.
    #[error("cannot listen on {addr} for {what}: {source}")]
    Bind {
        /// Which front end.
        what: &'static str,
        /// The address.
        addr: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A file of the service's state failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The TLS certificate could not be made or loaded.
    #[error("{0}")]
    Tls(String),
    /// The datastore or one of its VMs could not be opened.
    #[error("cannot open the datastore: {0}")]
    Open(#[from] ActionError),
}

fn io_at(path: &Path) -> impl FnOnce(std::io::Error) -> ServeError + '_ {
    move |source| ServeError::Io {
        path: path.to_owned(),
        source,
    }
}

/// A running serve.
#[derive(Debug)]
pub struct Daemon {
    service: Option<Arc<Service>>,
    status: ServeStatus,
    status_path: PathBuf,
    http: Option<HttpServer>,
    nbd: Option<nbd::ServerHandle>,
    control: Option<ControlServer>,
    _lock: File,
}

/// Takes the datastore's serve lock, or says who holds it.
fn lock(datastore: &Path, dir: &Path) -> Result<File, ServeError> {
    let path = dir.join("serve.lock");
    let f = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_at(&path))?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(std::fs::TryLockError::WouldBlock) => {
            let by = std::fs::read(dir.join("serve.json"))
                .ok()
                .and_then(|b| serde_json::from_slice::<ServeStatus>(&b).ok())
                .map_or_else(
                    || "another cbtsim serve (still starting)".to_owned(),
                    |s| {
                        format!(
                            "cbtsim serve pid {} ({}, nbd {}, control socket {})",
                            s.pid,
                            s.web,
                            s.nbd,
                            s.control.display()
                        )
                    },
                );
            Err(ServeError::AlreadyServed {
                datastore: datastore.to_owned(),
                by,
            })
        }
        Err(std::fs::TryLockError::Error(e)) => Err(io_at(&path)(e)),
    }
}

fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, ServeError> {
    TcpListener::bind(addr).map_err(|source| ServeError::Bind {
        what,
        addr: addr.to_string(),
        source,
    })
}

impl Daemon {
    /// Checks the configuration, takes the datastore, opens its VMs and
    /// starts the HTTP(S), NBD and control socket servers.
    pub fn start(config: ServeConfig) -> Result<Daemon, ServeError> {
        if config.password.is_empty() {
            return Err(ServeError::NoPassword);
        }
        for (what, addr) in [("HTTP", config.listen), ("NBD", config.nbd)] {
            if !addr.ip().is_loopback() && !config.allow_remote {
                return Err(ServeError::NotLoopback { what, addr });
            }
        }
        let datastore = &config.datastore;
        std::fs::create_dir_all(datastore).map_err(io_at(datastore))?;
        let datastore = datastore.canonicalize().map_err(io_at(datastore))?;
        let dir = datastore.join(STATE_DIR);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io_at(&dir))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).map_err(io_at(&dir))?;
        let lock = lock(&datastore, &dir)?;
        let service = Arc::new(Service::open(&datastore)?);
        let repository = match &config.repository {
            Some(dir) => {
                let dir = dir.canonicalize().map_err(io_at(dir))?;
                let repo = backup::Repository::open(&dir).map_err(|e| {
                    ServeError::Open(ActionError::from(e).context(format_args!("repository {}", dir.display())))
                })?;
                Some((dir, repo))
            }
            None => None,
        };

        let nbd_listener = bind("NBD", config.nbd)?;
        let http_listener = bind("HTTP", config.listen)?;
        let tls = if config.plain_http {
            None
        } else {
            Some(http::tls_config(&dir).map_err(ServeError::Tls)?)
        };
        let nbd_addr = nbd_listener.local_addr().map_err(io_at(&dir))?;
        let mut exports = HostExports::new(service.clone());
        if let Some((_, repo)) = &repository {
            exports = exports.with_repository(repo.clone());
        }
        let nbd = nbd::Server::new(Arc::new(exports))
            .serve_tcp(nbd_listener)
            .map_err(io_at(&dir))?;
        let password: Arc<str> = config.password.as_str().into();
        let vsphere = Arc::new(crate::vsphere::Api::new(
            service.clone(),
            password.clone(),
            config.max_areas,
            !config.plain_http,
        ));
        let router = http::router(WebState {
            service: service.clone(),
            password,
            nbd: Some(nbd_addr),
            vsphere,
            repository: repository.as_ref().map(|(dir, _)| dir.clone()),
        });
        let web = HttpServer::start(http_listener, tls, router).map_err(io_at(&dir))?;
        let control_path = socket_path(&datastore);
        let control = ControlServer::start(service.clone(), &control_path).map_err(io_at(&control_path))?;

        let status = ServeStatus {
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            datastore: datastore.clone(),
            started: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            web: web.url(),
            nbd: nbd_addr.to_string(),
            control: control_path,
            repository: repository.map(|(dir, _)| dir),
        };
        let status_path = dir.join("serve.json");
        let tmp = dir.join("serve.json.tmp");
        let mut f = File::create(&tmp).map_err(io_at(&tmp))?;
        let text = serde_json::to_vec_pretty(&status).unwrap_or_default();
        f.write_all(&text).map_err(io_at(&tmp))?;
        std::fs::rename(&tmp, &status_path).map_err(io_at(&status_path))?;
        Ok(Daemon {
            service: Some(service),
            status,
            status_path,
            http: Some(web),
            nbd: Some(nbd),
            control: Some(control),
            _lock: lock,
        })
    }

    /// Where it serves.
    pub fn status(&self) -> &ServeStatus {
        &self.status
    }

    /// The service (for in-process front ends and tests).
    pub fn service(&self) -> &Arc<Service> {
        self.service.as_ref().expect("a daemon has its service until shutdown")
    }

    /// Stops everything (see the module docs) and closes the VMs. Returns a
    /// warning if something still held the host when it was closed.
    pub fn shutdown(mut self) -> Option<String> {
        let service = self.service.take()?;
        service.shut_down();
        if let Some(h) = self.http.take() {
            h.shutdown();
        }
        if let Some(n) = self.nbd.take() {
            n.shutdown();
        }
        if let Some(c) = self.control.take() {
            c.shutdown();
        }
        let _ = std::fs::remove_file(&self.status_path);
        // Dropping the last handle closes every VM (flush, clean tracker
        // close). A handler of the web runtime may still hold one briefly.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while Arc::strong_count(&service) > 1 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        match Arc::into_inner(service) {
            Some(s) => {
                drop(s);
                None
            }
            None => Some("the host was still in use at shutdown: its VMs were not closed cleanly".into()),
        }
    }
}
