//! The HTTPS front end: an axum router behind HTTP basic authentication
//! (user `root`), served over rustls with a self-signed certificate kept in
//! the datastore (or plain HTTP for tests).
//!
//! The router is the extension point: [`router`] merges one sub-router per
//! front end (the vSphere SOAP API at `/sdk`, which authenticates itself and
//! so sits outside basic authentication; the live page at `/` and its JSON
//! API, `crate::web`), each calling [`Service::execute`] like every other
//! front end.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::Router;
use base64::Engine as _;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::exec::Service;

/// The user of basic authentication.
pub const USER: &str = "root";

/// What every handler shares.
#[derive(Debug, Clone)]
pub struct WebState {
    /// The host.
    pub service: Arc<Service>,
    /// The password of [`USER`].
    pub password: Arc<str>,
    /// The NBD server's address, for the page.
    pub nbd: Option<SocketAddr>,
    /// The vSphere API at `/sdk`.
    pub vsphere: Arc<crate::vsphere::Api>,
    /// The repository of `serve --repo`, which the page lists and backs up into.
    pub repository: Option<std::path::PathBuf>,
}

/// The whole router: every front end's routes, behind authentication,
/// except the vSphere API at `/sdk`, which authenticates itself (`Login` and
/// its session cookie, as vSphere clients expect).
pub fn router(state: WebState) -> Router {
    let sdk = crate::vsphere::router(state.vsphere.clone());
    Router::new()
        .merge(crate::web::router())
        .layer(middleware::from_fn_with_state(state.clone(), authenticate))
        .with_state(state)
        .merge(sdk)
}

/// Compares without an early exit, so timing does not tell how much matched.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn authenticate(State(s): State<WebState>, req: Request, next: Next) -> Response {
    let ok = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Basic "))
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b.trim()).ok())
        .is_some_and(|creds| {
            let expect = format!("{USER}:{}", s.password);
            same(&creds, expect.as_bytes())
        });
    if ok {
        next.run(req).await
    } else {
        (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Basic realm=\"cbtsim\", charset=\"UTF-8\"")],
            "authentication required (user root)\n",
        )
            .into_response()
    }
}

/// The TLS configuration of the datastore's self-signed certificate,
/// generated on first use into `dir` (`tls-cert.pem`, and `tls-key.pem`
/// with mode 0600) and reused after.
pub fn tls_config(dir: &Path) -> Result<Arc<rustls::ServerConfig>, String> {
    use std::os::unix::fs::OpenOptionsExt;
    let cert_path = dir.join("tls-cert.pem");
    let key_path = dir.join("tls-key.pem");
    if !cert_path.exists() || !key_path.exists() {
        let host = std::fs::read_to_string("/etc/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_default();
        let mut names = vec!["localhost".to_owned(), "127.0.0.1".to_owned(), "::1".to_owned()];
        if !host.is_empty() {
            names.push(host);
        }
        let ck = rcgen::generate_simple_self_signed(names).map_err(|e| format!("cannot make a certificate: {e}"))?;
        let write = |path: &Path, text: &str, mode: u32| -> Result<(), String> {
            let tmp = path.with_extension("tmp");
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(mode)
                .open(&tmp)
                .map_err(|e| format!("{}: {e}", tmp.display()))?;
            std::io::Write::write_all(&mut f, text.as_bytes()).map_err(|e| format!("{}: {e}", tmp.display()))?;
            f.sync_all().map_err(|e| format!("{}: {e}", tmp.display()))?;
            std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
        };
        write(&key_path, &ck.signing_key.serialize_pem(), 0o600)?;
        write(&cert_path, &ck.cert.pem(), 0o644)?;
    }
    let certs = CertificateDer::pem_file_iter(&cert_path)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: {e}", cert_path.display()))?;
    let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| format!("{}: {e}", key_path.display()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("TLS certificate {}: {e}", cert_path.display()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A running HTTP(S) server on its own small tokio runtime.
#[derive(Debug)]
pub struct HttpServer {
    addr: SocketAddr,
    tls: bool,
    stop: tokio::sync::watch::Sender<bool>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl HttpServer {
    /// Serves `router` on `listener`, over TLS when `tls` is given.
    pub fn start(
        listener: std::net::TcpListener,
        tls: Option<Arc<rustls::ServerConfig>>,
        router: Router,
    ) -> std::io::Result<HttpServer> {
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("http")
            .enable_all()
            .build()?;
        let listener = {
            let _guard = runtime.enter();
            tokio::net::TcpListener::from_std(listener)?
        };
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let is_tls = tls.is_some();
        let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
        runtime.spawn(async move {
            loop {
                let (tcp, _) = tokio::select! {
                    r = listener.accept() => match r {
                        Ok(c) => c,
                        Err(_) => continue,
                    },
                    _ = stopped.changed() => return,
                };
                let _ = tcp.set_nodelay(true);
                let router = router.clone();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let svc = TowerToHyperService::new(router);
                    let http = hyper::server::conn::http1::Builder::new();
                    match acceptor {
                        Some(a) => {
                            // A failed handshake (a plain-HTTP client, a
                            // scanner) just closes the connection.
                            if let Ok(tls) = a.accept(tcp).await {
                                let _ = http.serve_connection(TokioIo::new(tls), svc).await;
                            }
                        }
                        None => {
                            let _ = http.serve_connection(TokioIo::new(tcp), svc).await;
                        }
                    }
                });
            }
        });
        Ok(HttpServer {
            addr,
            tls: is_tls,
            stop,
            runtime: Some(runtime),
        })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `https://ADDR/` or `http://ADDR/`.
    pub fn url(&self) -> String {
        format!("{}://{}/", if self.tls { "https" } else { "http" }, self.addr)
    }

    /// Stops accepting and drops the connections.
    pub fn shutdown(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        let _ = self.stop.send(true);
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(std::time::Duration::from_secs(2));
        }
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop_now();
    }
}
