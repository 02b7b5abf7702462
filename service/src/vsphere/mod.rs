//! The vSphere API of changed block tracking, on the HTTPS listener at
//! `/sdk`: enough of hostd's SOAP API (`urn:vim25`) that an unchanged
//! pyvmomi or govmomi backup script backs up a cbtsim VM, full and
//! incremental, with `QueryChangedDiskAreas` and change IDs in VMware's
//! shape.
//!
//! ```text
//! POST /sdk ──▶ envelope::parse (bytes ─▶ Call, or a Fault)
//!                  │
//!                  ▼
//!            methods::Api::handle ── session (cookie vmware_soap_session)
//!                  │                  objects::Registry (hostd IDs: 1, 1-snapshot-2, haTask-...)
//!                  ▼
//!            Service::execute(Request) ──▶ Response | ActionError ──▶ Val | Fault
//!                  │
//!                  ▼
//!            envelope::response / envelope::fault (HTTP 200 / 500)
//! ```
//!
//! * [`envelope`]: the parser (a pure function of the body: malformed XML,
//!   unknown methods, oversized bodies are faults) and the writers.
//! * [`value`]: values and their XML; [`faults`]: the typed faults.
//! * [`objects`]: the registry of managed objects and the data objects
//!   built from the host's answers; [`session`]: logins, views, filters.
//! * [`methods`]: [`Api`], the methods. Tasks finish before their method
//!   returns (`WaitForUpdates` sees `success` or `error` at once).
//! * [`change_id`]: the VMware shape of change IDs.
//!
//! Authentication is the API's own (`Login`, then the session cookie), so
//! `/sdk` is not behind the router's basic authentication.

pub mod change_id;
pub mod envelope;
pub mod faults;
pub mod methods;
pub mod objects;
pub mod session;
pub mod value;

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;

pub use faults::{Fault, FaultKind};
pub use methods::{Api, Reply};

/// The default most changed areas in one `QueryChangedDiskAreas` answer (as ESXi).
pub const DEFAULT_MAX_AREAS: usize = 2000;

/// The `/sdk` routes over `api`.
pub fn router(api: Arc<Api>) -> Router {
    Router::new()
        .route("/sdk/vimServiceVersions.xml", get(versions))
        .route("/sdk", post(sdk))
        .with_state(api)
}

async fn versions() -> Response {
    xml(StatusCode::OK, envelope::SERVICE_VERSIONS.to_owned())
}

fn xml(status: StatusCode, body: String) -> Response {
    (status, [(header::CONTENT_TYPE, "text/xml; charset=utf-8")], body).into_response()
}

async fn sdk(State(api): State<Arc<Api>>, headers: HeaderMap, body: Body) -> Response {
    let text = |h: header::HeaderName| headers.get(h).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let cookie = text(header::COOKIE);
    let agent = text(header::USER_AGENT).unwrap_or_default();
    let reply = match axum::body::to_bytes(body, envelope::MAX_BODY).await {
        Err(_) => Reply {
            status: 500,
            body: envelope::fault(&Fault::invalid_request(format!(
                "the request body is over the limit of {} bytes (or could not be read)",
                envelope::MAX_BODY
            ))),
            set_cookie: None,
        },
        Ok(bytes) => {
            let api = api.clone();
            // The host's work blocks (and WaitForUpdates waits): off the runtime.
            match tokio::task::spawn_blocking(move || api.handle(&bytes, cookie.as_deref(), &agent)).await {
                Ok(r) => r,
                Err(e) => Reply {
                    status: 500,
                    body: envelope::fault(&Fault::new(
                        FaultKind::SystemError { reason: e.to_string() },
                        "A general system error occurred",
                    )),
                    set_cookie: None,
                },
            }
        }
    };
    let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut resp = xml(status, reply.body);
    if let Some(c) = reply.set_cookie.and_then(|c| HeaderValue::from_str(&c).ok()) {
        resp.headers_mut().insert(header::SET_COOKIE, c);
    }
    resp
}
