//! The live page at `/`: the VMs, each disk's map (updating while a guest
//! workload runs), the snapshot chain with change IDs, a "changed since"
//! picker whose answer is marked on the map, a repository's backup points,
//! and buttons for the VADP steps (snapshot, query, backup, remove).
//!
//! Plain HTML, CSS and JavaScript built into the binary (`include_str!`).
//! The page holds no host logic: it sends [`Request`]s as JSON and draws
//! what [`Service::execute`] answers.
//!
//! | route | what |
//! | --- | --- |
//! | `GET /`, `/app.js`, `/style.css` | the page |
//! | `GET /api/state` | VMs, their snapshots (with change IDs), guest workloads, workload profiles |
//! | `GET /api/events` | server-sent events: `state` (as above) whenever it changes |
//! | `POST /api/action` | one [`Request`] (JSON) → its [`Response`] (JSON), or `{kind, message}` with an HTTP error status |
//! | `POST /api/map` | a [`MapRequest`] → `{map, svg}`: the map's data and its SVG ([`diskmap::svg::render_narrow`]) |
//!
//! `/api/action` takes the actions the page uses, not those that read or
//! write files of the server's choosing (`disk-read`, `disk-write` from a file).

use std::convert::Infallible;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response as HttpResponse};
use axum::routing::{get, post};
use axum::Router;
use serde::Serialize;

use crate::action::{ActionError, ErrorKind, GuestStatus, Request, Response, SnapshotEntry, VmInfo, WriteData};
use crate::exec::Service;
use crate::http::WebState;
use crate::map::MapRequest;

/// How often the event stream looks for changes.
const TICK: Duration = Duration::from_millis(500);

/// The page's routes (authentication is the caller's layer).
pub(crate) fn router() -> Router<WebState> {
    Router::new()
        .route(
            "/",
            get(|| async { file("text/html; charset=utf-8", include_str!("index.html")) }),
        )
        .route(
            "/app.js",
            get(|| async { file("text/javascript; charset=utf-8", include_str!("app.js")) }),
        )
        .route(
            "/style.css",
            get(|| async { file("text/css; charset=utf-8", include_str!("style.css")) }),
        )
        .route("/api/state", get(state))
        .route("/api/events", get(events))
        .route("/api/action", post(action))
        .route("/api/map", post(map))
}

fn file(kind: &'static str, body: &'static str) -> HttpResponse {
    (
        [(header::CONTENT_TYPE, kind), (header::CACHE_CONTROL, "no-cache")],
        body,
    )
        .into_response()
}

fn json(status: StatusCode, value: &impl Serialize) -> HttpResponse {
    match serde_json::to_string(value) {
        Ok(text) => (status, [(header::CONTENT_TYPE, "application/json")], text).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

fn status_of(kind: ErrorKind) -> StatusCode {
    match kind {
        ErrorKind::NotFound => StatusCode::NOT_FOUND,
        ErrorKind::AlreadyExists | ErrorKind::InUse => StatusCode::CONFLICT,
        ErrorKind::InvalidRequest => StatusCode::BAD_REQUEST,
        ErrorKind::InvalidArgument
        | ErrorKind::OutOfRange
        | ErrorKind::MalformedChangeId
        | ErrorKind::ForeignChangeId
        | ErrorKind::ChangeIdAfterSnapshot
        | ErrorKind::TrackingReset
        | ErrorKind::TrackingDisabled
        | ErrorKind::PoweredOff
        | ErrorKind::LimitReached => StatusCode::UNPROCESSABLE_ENTITY,
        ErrorKind::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorKind::ShuttingDown | ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn error(e: &ActionError) -> HttpResponse {
    json(status_of(e.kind), e)
}

/// Runs a request off the async threads.
async fn execute(s: &WebState, request: Request) -> Result<Response, ActionError> {
    let service = s.service.clone();
    tokio::task::spawn_blocking(move || service.execute(request, &()))
        .await
        .unwrap_or_else(|e| Err(ActionError::new(ErrorKind::Internal, format!("the action failed: {e}"))))
}

/// What the page shows of the host.
#[derive(Debug, Serialize, PartialEq)]
struct PageState {
    datastore: String,
    /// The repository of `serve --repo`, if any.
    repository: Option<String>,
    nbd: Option<String>,
    vms: Vec<PageVm>,
    guests: Vec<GuestStatus>,
    profiles: Vec<&'static str>,
}

#[derive(Debug, Serialize, PartialEq)]
struct PageVm {
    #[serde(flatten)]
    info: VmInfo,
    /// Oldest first, with each disk's change ID (the service's own passing snapshots left out).
    chain: Vec<SnapshotEntry>,
}

fn page_state(service: &Service, nbd: Option<String>, repository: Option<String>) -> Result<PageState, ActionError> {
    let Response::Vms(vms) = service.execute(Request::VmList {}, &())? else {
        return Err(ActionError::new(ErrorKind::Internal, "vm-list answered something else"));
    };
    let mut out = Vec::new();
    for info in vms {
        let chain = match service.execute(Request::SnapshotList { vm: info.name.clone() }, &())? {
            Response::Snapshots { snapshots, .. } => snapshots
                .into_iter()
                .filter(|s| !crate::map::is_transient(&s.name))
                .collect(),
            _ => Vec::new(),
        };
        out.push(PageVm { info, chain });
    }
    let guests = match service.execute(Request::GuestList {}, &())? {
        Response::Guests(g) => g,
        _ => Vec::new(),
    };
    Ok(PageState {
        datastore: service.root().display().to_string(),
        repository,
        nbd,
        vms: out,
        guests,
        profiles: workloads::profiles().iter().map(|p| p.name).collect(),
    })
}

async fn current(s: &WebState) -> Result<PageState, ActionError> {
    let service = s.service.clone();
    let nbd = s.nbd.map(|a| a.to_string());
    let repository = s.repository.as_ref().map(|r| r.display().to_string());
    tokio::task::spawn_blocking(move || page_state(&service, nbd, repository))
        .await
        .unwrap_or_else(|e| Err(ActionError::new(ErrorKind::Internal, format!("state: {e}"))))
}

async fn state(State(s): State<WebState>) -> HttpResponse {
    match current(&s).await {
        Ok(st) => json(StatusCode::OK, &st),
        Err(e) => error(&e),
    }
}

/// `state` events: the first at once, then one whenever the state changes.
async fn events(State(s): State<WebState>) -> impl IntoResponse {
    let stream = futures_util::stream::unfold((s, String::new()), |(s, last)| async move {
        loop {
            if s.service.is_stopping() {
                return None;
            }
            let text = match current(&s).await {
                Ok(st) => serde_json::to_string(&st).unwrap_or_default(),
                Err(e) if e.kind == ErrorKind::ShuttingDown => return None,
                Err(e) => serde_json::to_string(&e).unwrap_or_default(),
            };
            if text != last {
                let event = Event::default().event("state").data(text.clone());
                return Some((Ok::<_, Infallible>(event), (s, text)));
            }
            tokio::time::sleep(TICK).await;
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(10)))
}

/// Whether the page may send `r` (nothing that names files on the server to read or write).
fn allowed(r: &Request) -> bool {
    !matches!(
        r,
        Request::DiskRead { .. }
            | Request::DiskWrite {
                data: WriteData::File { .. },
                ..
            }
    )
}

async fn action(State(s): State<WebState>, body: Bytes) -> HttpResponse {
    let request: Request = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return error(&ActionError::new(
                ErrorKind::InvalidRequest,
                format!("not a request: {e}"),
            ))
        }
    };
    if !allowed(&request) {
        return error(&ActionError::new(
            ErrorKind::InvalidRequest,
            "the page does not read or write files of the server: use the control socket",
        ));
    }
    match execute(&s, request).await {
        Ok(r) => json(StatusCode::OK, &r),
        Err(e) => error(&e),
    }
}

#[derive(Serialize)]
struct Drawn {
    map: diskmap::DiskMap,
    svg: String,
}

async fn map(State(s): State<WebState>, body: Bytes) -> HttpResponse {
    let request: MapRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return error(&ActionError::new(
                ErrorKind::InvalidRequest,
                format!("not a map request: {e}"),
            ))
        }
    };
    match execute(&s, Request::Map(request)).await {
        Ok(Response::Map(map)) => {
            let svg = diskmap::svg::render_narrow(&map);
            json(StatusCode::OK, &Drawn { map: *map, svg })
        }
        Ok(_) => error(&ActionError::new(ErrorKind::Internal, "map answered something else")),
        Err(e) => error(&e),
    }
}
