//! `Request::Map` and `Request::BackupList` through `Service::execute`, and
//! the live page's JSON endpoints over HTTP (the browser test is in
//! cbtsim/tests/web.rs).

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Duration;

use service::http::{router, HttpServer, WebState};
use service::{ErrorKind, MapRequest, Request, Response, Service, WriteData};

const MIB: u64 = 1 << 20;

fn svc() -> (tempfile::TempDir, Service) {
    let dir = tempfile::tempdir().unwrap();
    let s = Service::open(dir.path()).unwrap();
    s.execute(
        Request::VmCreate {
            vm: "db".into(),
            disks: vec![64 * MIB],
            granularity: 65536,
        },
        &(),
    )
    .unwrap();
    (dir, s)
}

fn write(s: &Service, offset: u64) {
    s.execute(
        Request::DiskWrite {
            vm: "db".into(),
            disk: 0,
            offset,
            data: WriteData::Pattern { byte: 9, length: MIB },
        },
        &(),
    )
    .unwrap();
}

fn snapshot(s: &Service, name: &str) -> String {
    match s
        .execute(
            Request::SnapshotCreate {
                vm: "db".into(),
                name: name.into(),
            },
            &(),
        )
        .unwrap()
    {
        Response::SnapshotCreated(i) => i.disks[0].change_id.clone().unwrap(),
        r => panic!("{r:?}"),
    }
}

fn map(s: &Service, m: MapRequest) -> Result<diskmap::DiskMap, service::ActionError> {
    match s.execute(Request::Map(m), &())? {
        Response::Map(m) => Ok(*m),
        r => panic!("{r:?}"),
    }
}

fn snapshot_names(s: &Service) -> Vec<String> {
    match s.execute(Request::SnapshotList { vm: "db".into() }, &()).unwrap() {
        Response::Snapshots { snapshots, .. } => snapshots.into_iter().map(|x| x.name).collect(),
        r => panic!("{r:?}"),
    }
}

#[test]
fn maps_of_now_and_of_snapshots() {
    let (_dir, s) = svc();
    write(&s, 0);
    let c1 = snapshot(&s, "s1");
    write(&s, 32 * MIB);
    // Now: a snapshot taken for the map and removed again.
    let now = map(&s, MapRequest::now("db", 0)).unwrap();
    assert_eq!(now.at, "now");
    assert_eq!(snapshot_names(&s), vec!["s1"]);
    assert_eq!(now.epochs.len(), 1);
    assert_eq!(now.epochs[0].from.as_deref(), Some("s1"));
    assert_eq!(now.epochs[0].to, "now");
    assert_eq!(now.epochs[0].bytes, MIB);
    assert_eq!(now.older_bytes, MIB);
    // At a snapshot, with the answer since c1 marked.
    let c2 = snapshot(&s, "s2");
    let m = map(
        &s,
        MapRequest {
            snapshot: Some("s2".into()),
            since: Some(c1.clone()),
            ..MapRequest::now("db", 0)
        },
    )
    .unwrap();
    assert_eq!(m.at_change_id.as_deref(), Some(c2.as_str()));
    let a = m.since.unwrap();
    assert_eq!((a.areas, a.bytes), (1, MIB));
    assert_eq!(a.cells, (512..528).collect::<Vec<u32>>());
    // After removing s1, the history still tells its epoch apart.
    s.execute(
        Request::SnapshotRemove {
            vm: "db".into(),
            name: "s1".into(),
        },
        &(),
    )
    .unwrap();
    let h = map(
        &s,
        MapRequest {
            snapshot: Some("s2".into()),
            history: Some(8),
            ..MapRequest::now("db", 0)
        },
    )
    .unwrap();
    let named: Vec<_> = h
        .epochs
        .iter()
        .filter(|e| e.bytes > 0)
        .map(|e| e.change_id.clone())
        .collect();
    assert!(named.contains(&c1), "{h:?}");

    // Bad requests are typed errors.
    let e = map(
        &s,
        MapRequest {
            snapshot: Some("nope".into()),
            ..MapRequest::now("db", 0)
        },
    )
    .unwrap_err();
    assert_eq!(e.kind, ErrorKind::NotFound, "{e}");
    let e = map(
        &s,
        MapRequest {
            since: Some("garbage".into()),
            ..MapRequest::now("db", 0)
        },
    )
    .unwrap_err();
    assert_eq!(e.kind, ErrorKind::MalformedChangeId, "{e}");
    let e = map(
        &s,
        MapRequest {
            max_cells: Some(0),
            ..MapRequest::now("db", 0)
        },
    )
    .unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidArgument, "{e}");
    assert_eq!(map(&s, MapRequest::now("db", 3)).unwrap_err().kind, ErrorKind::NotFound);
    // A failed map of now leaves no snapshot behind.
    assert_eq!(snapshot_names(&s), vec!["s2"]);

    // JSON: the request's form, and unknown fields refused.
    let r: Request = serde_json::from_str(r#"{"action":"map","vm":"db","since":"*","layout":"hilbert"}"#).unwrap();
    let Request::Map(m) = r else { panic!() };
    assert_eq!(m.layout, diskmap::Layout::Hilbert);
    assert!(serde_json::from_str::<Request>(r#"{"action":"map","vm":"db","colour":1}"#).is_err());
}

#[test]
fn backup_points_are_listed_with_their_change_ids() {
    let (dir, s) = svc();
    write(&s, 0);
    let repo = dir.path().join("repo");
    let Response::Backup(b) = s
        .execute(
            Request::BackupRun {
                vm: "db".into(),
                repository: repo.clone(),
                full: false,
                no_compress: false,
            },
            &(),
        )
        .unwrap()
    else {
        panic!()
    };
    let Response::BackupPoints(p) = s.execute(Request::BackupList { repository: repo }, &()).unwrap() else {
        panic!()
    };
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].point, b.point);
    assert_eq!(p[0].kind, "full");
    assert!(p[0].change_ids[0].is_some());
    let e = s
        .execute(
            Request::BackupList {
                repository: "relative".into(),
            },
            &(),
        )
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidArgument);
}

/// One request to the page's server; returns the status code and body.
fn http(addr: std::net::SocketAddr, method: &str, path: &str, body: &str, auth: bool) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let auth = if auth {
        "Authorization: Basic cm9vdDpzZWNyZXQ=\r\n" // root:secret
    } else {
        ""
    };
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let code = out.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (code, body)
}

#[test]
fn the_pages_endpoints_answer_json_behind_the_login() {
    let (_dir, s) = svc();
    write(&s, 0);
    snapshot(&s, "s1");
    let service = Arc::new(s);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let server = HttpServer::start(
        listener,
        None,
        router(WebState {
            service: service.clone(),
            password: "secret".into(),
            nbd: None,
            vsphere: Arc::new(service::vsphere::Api::new(
                service.clone(),
                "secret".into(),
                2000,
                false,
            )),
            repository: None,
        }),
    )
    .unwrap();
    let addr = server.addr();
    assert_eq!(http(addr, "GET", "/", "", false).0, 401);
    assert_eq!(http(addr, "GET", "/api/state", "", false).0, 401);
    let (code, page) = http(addr, "GET", "/", "", true);
    assert_eq!(code, 200);
    assert!(page.contains("cbtsim host") && page.contains("/app.js"), "{page}");
    assert_eq!(http(addr, "GET", "/app.js", "", true).0, 200);

    let (code, state) = http(addr, "GET", "/api/state", "", true);
    assert_eq!(code, 200, "{state}");
    let v: serde_json::Value = serde_json::from_str(&state).unwrap();
    assert_eq!(v["vms"][0]["name"], "db");
    assert_eq!(v["vms"][0]["chain"][0]["name"], "s1");
    assert!(v["profiles"].as_array().unwrap().iter().any(|p| p == "oltp-db"));

    let (code, body) = http(
        addr,
        "POST",
        "/api/action",
        r#"{"action":"snapshot-create","vm":"db","name":"s2"}"#,
        true,
    );
    assert_eq!(code, 200, "{body}");
    assert!(body.contains(r#""result":"snapshot-created""#), "{body}");
    let (code, body) = http(
        addr,
        "POST",
        "/api/action",
        r#"{"action":"snapshot-remove","vm":"db","name":"nope"}"#,
        true,
    );
    assert_eq!(code, 404, "{body}");
    assert!(body.contains(r#""kind":"not-found""#), "{body}");
    // Nothing that reads or writes the server's files.
    let (code, body) = http(
        addr,
        "POST",
        "/api/action",
        r#"{"action":"disk-read","vm":"db","disk":0,"offset":0,"length":512}"#,
        true,
    );
    assert_eq!(code, 400, "{body}");
    assert_eq!(http(addr, "POST", "/api/action", "not json", true).0, 400);

    let (code, body) = http(
        addr,
        "POST",
        "/api/map",
        r#"{"vm":"db","snapshot":"s2","since":"*"}"#,
        true,
    );
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["map"]["at"], "s2");
    assert_eq!(v["map"]["since"]["bytes"], MIB);
    assert!(v["svg"].as_str().unwrap().contains("class=\"hits\" data-cells=\"16\""));
    server.shutdown();
}

#[test]
fn maps_of_now_while_a_guest_writes() {
    let (_dir, s) = svc();
    snapshot(&s, "s1");
    let Response::GuestStarted { id, .. } = s
        .execute(
            Request::GuestRun(service::GuestRun {
                vm: "db".into(),
                profile: "oltp-db".into(),
                disk: 0,
                threads: 2,
                seed: 3,
                ops: None,
                seconds: None,
                verify: true,
                snapshot_every: Some(500),
                detach: true,
            }),
            &(),
        )
        .unwrap()
    else {
        panic!()
    };
    // The epoch after s1 grows as the guest writes; every map's snapshot is removed again.
    let mut last = 0;
    let mut grew = 0;
    for _ in 0..6 {
        std::thread::sleep(Duration::from_millis(150));
        let m = map(&s, MapRequest::now("db", 0)).unwrap();
        assert_eq!(m.epochs.len(), 1, "{:?}", m.epochs);
        let bytes = m.epochs[0].bytes;
        assert!(bytes >= last, "{bytes} < {last}");
        grew += usize::from(bytes > last);
        last = bytes;
    }
    let Response::Guest(report) = s.execute(Request::GuestStop { id }, &()).unwrap() else {
        panic!()
    };
    assert_eq!(report.missed_blocks, 0, "{report:?}");
    assert!(grew >= 2, "the map of now did not follow the guest");
    assert_eq!(snapshot_names(&s), vec!["s1"]);
}
