//! The vSphere API's front door with hand-made requests: over HTTP against a
//! running daemon (malformed envelopes, unknown methods, huge bodies, no
//! session, the version document without basic authentication), and
//! property tests that the parser and the whole handler answer any bytes
//! with a value or a typed fault, never a panic.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use service::vsphere::{envelope, Api, FaultKind};
use service::{Daemon, ServeConfig, Service};

fn config(ds: &std::path::Path) -> ServeConfig {
    ServeConfig {
        datastore: ds.to_owned(),
        listen: "127.0.0.1:0".parse().unwrap(),
        plain_http: true,
        nbd: "127.0.0.1:0".parse().unwrap(),
        allow_remote: false,
        password: "secret".into(),
        repository: None,
        max_areas: 2000,
    }
}

/// One HTTP/1.1 request; returns (status, headers and body).
fn http(addr: &str, method: &str, path: &str, headers: &str, body: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n{headers}Connection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    // A server may answer (and close) before reading a huge body.
    let _ = s.write_all(body);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let out = String::from_utf8_lossy(&out).into_owned();
    let status = out.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, out)
}

fn soap(inner: &str) -> String {
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<soapenv:Envelope xmlns:soapenv=\"http://schemas.xmlsoap.org/soap/envelope/\" \
         xmlns:xsi=\"http://www.w3.org/2001/XMLSchema-instance\" xmlns:xsd=\"http://www.w3.org/2001/XMLSchema\">\
         <soapenv:Body>{inner}</soapenv:Body></soapenv:Envelope>"
    )
}

const SOAP_HEADERS: &str = "Content-Type: text/xml; charset=UTF-8\r\nSOAPAction: \"urn:vim25/8.0.3.0\"\r\n";

fn fault_type(resp: &str) -> Option<&str> {
    let at = resp.find("<detail><")? + "<detail><".len();
    let name = &resp[at..at + resp[at..].find(' ')?];
    name.strip_suffix("Fault")
}

#[test]
fn bad_requests_over_http_are_soap_faults_and_sdk_skips_basic_auth() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(config(dir.path())).unwrap();
    let addr = d
        .status()
        .web
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();

    let (st, r) = http(&addr, "GET", "/sdk/vimServiceVersions.xml", "", b"");
    assert_eq!(st, 200, "{r}");
    assert!(
        r.contains("<name>urn:vim25</name>") && r.contains("<version>8.0.3.0</version>"),
        "{r}"
    );
    // The rest of the site keeps its basic authentication.
    assert_eq!(http(&addr, "GET", "/", "", b"").0, 401);

    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("malformed XML", b"<soapenv:Envelope><unclosed>".to_vec(), "InvalidRequest"),
        ("not XML at all", b"\xff\xfe\x00garbage".to_vec(), "InvalidRequest"),
        ("an empty body", Vec::new(), "InvalidRequest"),
        ("no Body", soap("").replace("<soapenv:Body></soapenv:Body>", "").into_bytes(), "InvalidRequest"),
        (
            "a DTD with entities (billion laughs)",
            b"<?xml version=\"1.0\"?><!DOCTYPE l [<!ENTITY a \"aaaaaaaaaa\"><!ENTITY b \"&a;&a;&a;&a;&a;&a;&a;&a;\">]><l>&b;</l>".to_vec(),
            "InvalidRequest",
        ),
        (
            "no _this",
            soap("<RetrieveServiceContent xmlns=\"urn:vim25\"/>").into_bytes(),
            "InvalidRequest",
        ),
        (
            "an unknown method",
            soap("<FormatDatastore xmlns=\"urn:vim25\"><_this type=\"ServiceInstance\">ServiceInstance</_this></FormatDatastore>")
                .into_bytes(),
            "MethodNotFound",
        ),
        (
            "a method without a session",
            soap("<CreateContainerView xmlns=\"urn:vim25\"><_this type=\"ViewManager\">ViewManager</_this>\
                  <container type=\"Folder\">ha-folder-root</container><type>VirtualMachine</type><recursive>true</recursive></CreateContainerView>")
                .into_bytes(),
            "NotAuthenticated",
        ),
        (
            "a wrong password",
            soap("<Login xmlns=\"urn:vim25\"><_this type=\"SessionManager\">ha-sessionmgr</_this><userName>root</userName><password>nope</password></Login>")
                .into_bytes(),
            "InvalidLogin",
        ),
        (
            "a huge body",
            soap(&format!("<Login xmlns=\"urn:vim25\"><_this type=\"SessionManager\">ha-sessionmgr</_this><userName>{}</userName></Login>", "x".repeat(2 << 20)))
                .into_bytes(),
            "InvalidRequest",
        ),
    ];
    for (what, body, want) in cases {
        let (st, r) = http(&addr, "POST", "/sdk", SOAP_HEADERS, &body);
        assert_eq!(st, 500, "{what}: {r}");
        assert_eq!(fault_type(&r), Some(want), "{what}: {r}");
        assert!(r.contains("<faultcode>ServerFaultCode</faultcode>"), "{what}: {r}");
    }

    // A login, then the session cookie; a bogus cookie is no session.
    let login = soap(
        "<Login xmlns=\"urn:vim25\"><_this type=\"SessionManager\">ha-sessionmgr</_this><userName>root</userName><password>secret</password></Login>",
    );
    let (st, r) = http(&addr, "POST", "/sdk", SOAP_HEADERS, login.as_bytes());
    assert_eq!(st, 200, "{r}");
    let cookie = r
        .lines()
        .find_map(|l| {
            l.strip_prefix("set-cookie: ")
                .or_else(|| l.strip_prefix("Set-Cookie: "))
        })
        .unwrap_or_else(|| panic!("no cookie: {r}"))
        .to_owned();
    assert!(
        cookie.starts_with("vmware_soap_session=\"") && cookie.contains("HttpOnly"),
        "{cookie}"
    );
    let fetch = soap(
        "<Fetch xmlns=\"urn:vim25\"><_this type=\"Folder\">ha-folder-root</_this><prop>childEntity</prop></Fetch>",
    );
    let (st, r) = http(
        &addr,
        "POST",
        "/sdk",
        &format!("{SOAP_HEADERS}Cookie: {cookie}\r\n"),
        fetch.as_bytes(),
    );
    assert_eq!(st, 200, "{r}");
    assert!(
        r.contains("<returnval type=\"Datacenter\">ha-datacenter</returnval>"),
        "{r}"
    );
    let (st, r) = http(
        &addr,
        "POST",
        "/sdk",
        &format!("{SOAP_HEADERS}Cookie: vmware_soap_session=\"0000\"\r\n"),
        fetch.as_bytes(),
    );
    assert_eq!((st, fault_type(&r)), (500, Some("NotAuthenticated")), "{r}");
    let missing = soap("<Fetch xmlns=\"urn:vim25\"><_this type=\"VirtualMachine\">42</_this><prop>name</prop></Fetch>");
    let (st, r) = http(
        &addr,
        "POST",
        "/sdk",
        &format!("{SOAP_HEADERS}Cookie: {cookie}\r\n"),
        missing.as_bytes(),
    );
    assert_eq!((st, fault_type(&r)), (500, Some("ManagedObjectNotFound")), "{r}");
    assert!(r.contains("<obj type=\"VirtualMachine\">42</obj>"), "{r}");
    assert!(d.shutdown().is_none());
}

/// A valid request to start mutations from.
fn sample() -> String {
    soap(
        "<QueryChangedDiskAreas xmlns=\"urn:vim25\"><_this type=\"VirtualMachine\">1</_this>\
         <snapshot type=\"VirtualMachineSnapshot\">1-snapshot-1</snapshot><deviceKey>2000</deviceKey>\
         <startOffset>0</startOffset><changeId>*</changeId></QueryChangedDiskAreas>",
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn the_parser_takes_any_bytes(body in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = envelope::parse(&body);
    }

    #[test]
    fn the_parser_takes_mutated_envelopes(
        cut in 0usize..400,
        at in 0usize..400,
        insert in "[<>/=\"a-zA-Z0-9 :&;_-]{0,24}",
    ) {
        let s = sample();
        let mut b: Vec<u8> = s.into_bytes();
        let at = at.min(b.len());
        b.splice(at..at, insert.bytes());
        let cut = cut.min(b.len());
        b.truncate(b.len() - cut / 4);
        match envelope::parse(&b) {
            Ok(c) => prop_assert!(!c.method.name().is_empty()),
            Err(f) => prop_assert!(!f.message.is_empty()),
        }
    }
}

#[test]
fn the_handler_answers_any_bytes_with_200_or_a_fault() {
    let dir = tempfile::tempdir().unwrap();
    let svc = Arc::new(Service::open(dir.path()).unwrap());
    let api = Api::new(svc, "pw".into(), 2000, false);
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 256,
        ..ProptestConfig::default()
    });
    let bodies = prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..512),
        (0usize..300, "[<>/a-zA-Z0-9 _]{0,12}").prop_map(|(at, ins)| {
            let mut s = sample();
            let at = at.min(s.len());
            let at = (0..=at).rev().find(|i| s.is_char_boundary(*i)).unwrap_or(0);
            s.insert_str(at, &ins);
            s.into_bytes()
        }),
    ];
    runner
        .run(&bodies, |body| {
            let r = api.handle(&body, Some("vmware_soap_session=\"x\""), "proptest");
            prop_assert!(r.status == 200 || r.status == 500);
            if r.status == 500 {
                prop_assert!(r.body.contains("<detail>"));
            }
            Ok(())
        })
        .unwrap();
    // Without a session, every method but the few allowed is refused.
    let r = api.handle(sample().as_bytes(), None, "t");
    assert_eq!(r.status, 500);
    assert!(r.body.contains("NotAuthenticatedFault"), "{}", r.body);
    let kind = envelope::parse(b"<x/>").unwrap_err().kind;
    assert_eq!(kind, FaultKind::InvalidRequest);
}
