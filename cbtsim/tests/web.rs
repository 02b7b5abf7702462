//! The live page of `cbtsim serve` in a real browser: headless Chromium
//! driven through chromedriver's WebDriver HTTP API (a tiny client below, no
//! dependency). It logs in (basic authentication), picks a VM, clicks the
//! VADP steps (snapshot, query, backup, remove) and checks what is drawn:
//! the answer's areas and the cells marked on the map. Screenshots are kept
//! in `target/web-test/`.
//!
//! Needs `chromium` and `chromedriver` (Debian: `chromium`,
//! `chromium-driver`): skipped with a printed reason when missing, and
//! failing under CI=true.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};
use service::{client, Request, Response, ServeStatus, WriteData};

const MIB: u64 = 1 << 20;
const PASSWORD: &str = "lesson-1";

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| std::env::split_paths(&p).map(|d| d.join(name)).find(|f| f.is_file()))
}

/// chromium and chromedriver, or a skip (a failure under CI=true).
fn browser() -> Option<(PathBuf, PathBuf)> {
    let chromium = on_path("chromium").or_else(|| on_path("chromium-browser"));
    let driver = on_path("chromedriver");
    match (chromium, driver) {
        (Some(c), Some(d)) => Some((c, d)),
        _ => {
            let why = "chromium and chromedriver are needed (apt-get install chromium chromium-driver)";
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("{why}: required under CI=true");
            }
            eprintln!("skipping the browser test: {why}");
            None
        }
    }
}

/// A process killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One HTTP/1.1 request to 127.0.0.1:`port`; returns (status, body).
fn http(port: u16, method: &str, path: &str, body: Option<&Value>) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    // Read the head, then as many bytes as it announces (the server may keep the connection open).
    let mut reply = Vec::new();
    let mut buf = [0u8; 16384];
    let head_end = loop {
        if let Some(i) = reply.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read(&mut buf)?;
        if n == 0 {
            break reply.len();
        }
        reply.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&reply[..head_end]).to_ascii_lowercase();
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok());
    let chunked = head.contains("transfer-encoding: chunked");
    loop {
        let body = &reply[head_end..];
        let done = match length {
            Some(n) => body.len() >= n,
            None if chunked => body.ends_with(b"0\r\n\r\n"),
            None => false,
        };
        if done {
            break;
        }
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        reply.extend_from_slice(&buf[..n]);
    }
    let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let rest = String::from_utf8_lossy(&reply[head_end..]).into_owned();
    let body = if chunked { unchunk(&rest) } else { rest };
    Ok((status, body))
}

fn unchunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// A WebDriver session of chromedriver.
struct Driver {
    port: u16,
    session: String,
    _proc: Proc,
}

impl Driver {
    fn start(chromium: &Path, driver: &Path, profile: &Path) -> Driver {
        let port = free_port();
        let proc = Proc(
            Command::new(driver)
                .arg(format!("--port={port}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("chromedriver starts"),
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        while !matches!(http(port, "GET", "/status", None), Ok((200, b)) if b.contains("\"ready\":true")) {
            assert!(Instant::now() < deadline, "chromedriver did not get ready");
            std::thread::sleep(Duration::from_millis(100));
        }
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "acceptInsecureCerts": true,
            "goog:chromeOptions": {
                "binary": chromium,
                "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                         "--disable-background-networking", "--disable-component-update", "--disable-sync",
                         "--disable-dev-shm-usage", "--window-size=1500,1500",
                         format!("--user-data-dir={}", profile.display())],
            }
        }}});
        let (code, body) = http(port, "POST", "/session", Some(&caps)).unwrap();
        assert_eq!(code, 200, "new session: {body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        let session = v["value"]["sessionId"].as_str().expect("a session ID").to_owned();
        Driver {
            port,
            session,
            _proc: proc,
        }
    }

    fn cmd(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let path = format!("/session/{}{path}", self.session);
        let (code, text) = http(self.port, method, &path, body.as_ref()).unwrap();
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        assert_eq!(code, 200, "{method} {path}: {text}");
        v["value"].clone()
    }

    fn cdp(&self, cmd: &str, params: Value) {
        self.cmd("POST", "/goog/cdp/execute", Some(json!({"cmd": cmd, "params": params})));
    }

    fn script(&self, script: &str) -> Value {
        self.cmd("POST", "/execute/sync", Some(json!({"script": script, "args": []})))
    }

    /// Waits until `script` returns something truthy; returns it.
    fn wait(&self, what: &str, script: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let v = self.script(script);
            if !(v.is_null() || v == json!(false) || v == json!(0) || v == json!("")) {
                return v;
            }
            if Instant::now() > deadline {
                let page = self.script("return document.body.innerText");
                let ui = self.script(
                    "const u = window.cbt; return JSON.stringify({point: u.point, queryAt: u.queryAt, since: u.since, \
                     maps: u.maps, queryAtShown: document.getElementById('query-at').value})",
                );
                panic!("timed out waiting for {what}; the page's state: {ui}; the page says:\n{page}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn click(&self, css: &str) {
        let e = self.cmd("POST", "/element", Some(json!({"using": "css selector", "value": css})));
        let id = e
            .as_object()
            .and_then(|o| o.values().next())
            .and_then(Value::as_str)
            .expect("an element ID")
            .to_owned();
        self.cmd("POST", &format!("/element/{id}/click"), Some(json!({})));
    }

    fn type_into(&self, css: &str, text: &str) {
        let e = self.cmd("POST", "/element", Some(json!({"using": "css selector", "value": css})));
        let id = e
            .as_object()
            .and_then(|o| o.values().next())
            .and_then(Value::as_str)
            .unwrap()
            .to_owned();
        self.cmd("POST", &format!("/element/{id}/clear"), Some(json!({})));
        self.cmd("POST", &format!("/element/{id}/value"), Some(json!({ "text": text })));
    }

    fn screenshot(&self, path: &Path) {
        let b64 = self.cmd("GET", "/screenshot", None);
        let png = base64::engine::general_purpose::STANDARD
            .decode(b64.as_str().unwrap())
            .unwrap();
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, png).unwrap();
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = http(self.port, "DELETE", &format!("/session/{}", self.session), None);
    }
}

/// `cbtsim serve` over HTTPS on free loopback ports.
fn serve(ds: &Path) -> (Proc, ServeStatus) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_cbtsim"))
        .env_remove("CBTSIM_DATASTORE")
        .env("CBTSIM_PASSWORD", PASSWORD)
        .arg("--datastore")
        .arg(ds)
        .args(["serve", "--listen", "127.0.0.1:0", "--nbd", "127.0.0.1:0", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let status: ServeStatus = serde_json::from_str(&line).unwrap_or_else(|e| panic!("serve printed {line:?}: {e}"));
    (Proc(child), status)
}

fn call(ds: &Path, r: Request) -> Response {
    client::call(ds, &r, &()).unwrap_or_else(|e| panic!("{r:?}: {e}"))
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
        .join("web-test")
}

#[test]
fn a_teacher_walks_the_vadp_steps_by_clicking() {
    let Some((chromium, driver)) = browser() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().join("ds");
    std::fs::create_dir(&ds).unwrap();
    let (_serve, status) = serve(&ds);

    // A VM: 1 MiB written, snapshot s1, then 1 MiB at 32 MiB.
    call(
        &ds,
        Request::VmCreate {
            vm: "db".into(),
            disks: vec![64 * MIB],
            granularity: 65536,
        },
    );
    let write = |offset: u64, byte: u8| {
        call(
            &ds,
            Request::DiskWrite {
                vm: "db".into(),
                disk: 0,
                offset,
                data: WriteData::Pattern { byte, length: MIB },
            },
        )
    };
    write(0, 1);
    let Response::SnapshotCreated(s1) = call(
        &ds,
        Request::SnapshotCreate {
            vm: "db".into(),
            name: "s1".into(),
        },
    ) else {
        panic!("no snapshot")
    };
    let cid1 = s1.disks[0].change_id.clone().unwrap();
    write(32 * MIB, 2);

    let profile = dir.path().join("chromium-profile");
    let d = Driver::start(&chromium, &driver, &profile);
    // The login: basic authentication for user root, sent with every request of the page.
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("root:{PASSWORD}"));
    d.cdp("Network.enable", json!({}));
    d.cdp(
        "Network.setExtraHTTPHeaders",
        json!({"headers": {"Authorization": format!("Basic {auth}")}}),
    );
    assert!(status.web.starts_with("https://"), "{}", status.web);
    d.cmd("POST", "/url", Some(json!({ "url": status.web })));
    d.wait(
        "the VM list",
        "return document.querySelector('#vm-list li[data-vm=\"db\"]') !== null",
    );
    d.wait(
        "the live event stream",
        "return document.getElementById('live').textContent === 'live'",
    );

    d.click("#vm-list li[data-vm=\"db\"]");
    d.wait(
        "a map of now",
        "return window.cbt.maps >= 1 && window.cbt.map.at === 'now'",
    );
    // Now: 1 MiB before s1 (grey), 1 MiB after it (the epoch after s1).
    let map = d.script("return window.cbt.map");
    assert_eq!(map["epochs"][0]["from"], "s1", "{map}");
    assert_eq!(map["epochs"][0]["bytes"], MIB);
    assert_eq!(map["older_bytes"], MIB);
    assert!(d.script("return document.querySelector('#map svg path.epoch[data-class=\"2\"]') !== null") == json!(true));

    // 1. Snapshot.
    d.type_into("#snap-name", "s2");
    d.click("#btn-snapshot");
    d.wait(
        "s2 in the chain",
        "return document.querySelector('#chain tr[data-snapshot=\"s2\"]') !== null && document.getElementById('query-at').value === 's2'",
    );
    // 2. QueryChangedDiskAreas at s2 since s1's change ID.
    d.click(&format!("#since option[value=\"{cid1}\"]"));
    d.click("#btn-query");
    let bytes = d.wait(
        "the answer",
        "const a = document.getElementById('answer'); return a.dataset.bytes || null",
    );
    assert_eq!(bytes, json!(MIB.to_string()));
    assert_eq!(
        d.script("return document.getElementById('answer').dataset.areas"),
        json!("1")
    );
    let text = d.script("return document.getElementById('answer').textContent");
    assert!(text.as_str().unwrap().contains("33554432"), "{text}");
    // The map at s2 marks exactly the answer's cells: 1 MiB of 64 KiB cells.
    let hits = d.wait(
        "the answer marked on the map",
        &format!(
            "const m = window.cbt.map; const p = document.querySelector('#map svg path.hits'); \
             return m && m.at === 's2' && m.since && m.since.change_id === '{cid1}' && p ? p.dataset.cells : null"
        ),
    );
    assert_eq!(hits, json!("16"));
    let cells = d.script("return window.cbt.map.since.cells");
    let want: Vec<u64> = (512..528).collect();
    assert_eq!(cells, json!(want));
    let outline = d.script("return document.querySelector('#map svg path.answer').getAttribute('d').length");
    assert!(outline.as_u64().unwrap() > 0);
    let shots = target_dir();
    d.screenshot(&shots.join("page.png"));

    // 3. Backup into a repository; its point appears with its change ID.
    let repo = dir.path().join("repo");
    d.type_into("#repo", repo.to_str().unwrap());
    d.click("#btn-backup");
    d.wait(
        "a backup point",
        "return document.querySelectorAll('#points tr[data-point]').length === 1",
    );
    let kind = d.script("return document.querySelector('#points tr[data-point] td:nth-child(3)').textContent");
    assert_eq!(kind, json!("full"));

    // 4. Remove s1: the chain follows.
    d.click("#remove-which option[value=\"s1\"]");
    d.click("#btn-remove");
    d.wait(
        "s1 gone from the chain",
        "return document.querySelector('#chain tr[data-snapshot=\"s1\"]') === null",
    );
    // The requests sent are listed, none failed.
    let log = d.script(
        "return [document.querySelectorAll('#log li.ok').length, document.querySelectorAll('#log li.err').length]",
    );
    assert_eq!(
        log,
        json!([5, 0]),
        "{}",
        d.script("return document.getElementById('log').innerText")
    );
    d.screenshot(&shots.join("page-after-remove.png"));

    // A guest workload: the map of now follows its writes, live.
    d.click("#point option[value=\"now\"]");
    d.click("#btn-guest");
    d.wait(
        "the guest running",
        "return window.cbt.state.guests.some((g) => g.vm === 'db' && g.state === 'running')",
    );
    let before = d.script("return window.cbt.maps").as_u64().unwrap();
    let written = d.wait(
        "live maps of the guest's writes",
        &format!(
            "const m = window.cbt.map; \
             return window.cbt.maps >= {} && m.at === 'now' && m.epochs.length > 0 && m.epochs[m.epochs.length - 1].bytes > 0 \
             ? m.epochs[m.epochs.length - 1].bytes : null",
            before + 2
        ),
    );
    assert!(written.as_u64().unwrap() > 0);
    d.screenshot(&shots.join("page-live.png"));
    d.click("#btn-guest-stop");
    d.wait(
        "the guest stopped",
        "return !window.cbt.state.guests.some((g) => g.vm === 'db' && g.state === 'running')",
    );
    let log = d.script("return document.querySelectorAll('#log li.err').length");
    assert_eq!(
        log,
        json!(0),
        "{}",
        d.script("return document.getElementById('log').innerText")
    );
    eprintln!("screenshots in {}", shots.display());
}
