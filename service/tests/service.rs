//! The service in one process: execute, the control socket with bad input,
//! concurrent clients, guest workloads, exports of snapshots that go away,
//! and the daemon's refusals.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use nbd::{Export, Exports, Extent, BASE_ALLOCATION, QEMU_DIRTY_BITMAP};
use service::control::{Event, MAX_REQUEST};
use service::{client, ActionError, Daemon, ErrorKind, GuestRun, HostExports, Request, Response, ServeConfig, Service};
use vadp::DiskArea;

const MIB: u64 = 1 << 20;
const GRAN: u64 = 64 << 10;

fn create(svc: &Service, vm: &str, size: u64) {
    svc.execute(
        Request::VmCreate {
            vm: vm.into(),
            disks: vec![size],
            granularity: GRAN,
        },
        &(),
    )
    .unwrap();
}

fn write(svc: &Service, vm: &str, offset: u64, byte: u8, length: u64) {
    svc.execute(
        Request::DiskWrite {
            vm: vm.into(),
            disk: 0,
            offset,
            data: service::WriteData::Pattern { byte, length },
        },
        &(),
    )
    .unwrap();
}

fn snapshot(svc: &Service, vm: &str, name: &str) -> String {
    match svc
        .execute(
            Request::SnapshotCreate {
                vm: vm.into(),
                name: name.into(),
            },
            &(),
        )
        .unwrap()
    {
        Response::SnapshotCreated(s) => s.disks[0].change_id.clone().unwrap(),
        r => panic!("{r:?}"),
    }
}

fn query(svc: &Service, vm: &str, snap: &str, since: &str) -> Result<Vec<DiskArea>, ActionError> {
    match svc.execute(
        Request::Query {
            vm: vm.into(),
            snapshot: snap.into(),
            disk: 0,
            since: since.into(),
        },
        &(),
    )? {
        Response::ChangedAreas(c) => Ok(c.areas),
        r => panic!("{r:?}"),
    }
}

/// Extents as (offset, length, flags), merged.
fn status(e: &dyn Export, context: &str) -> Result<Vec<(u64, u64, u32)>, nbd::ExportError> {
    let mut out: Vec<(u64, u64, u32)> = Vec::new();
    let mut pos = 0;
    while pos < e.size() {
        let mut ext: Vec<Extent> = Vec::new();
        e.block_status(context, pos, (e.size() - pos).min(u32::MAX as u64), &mut ext)?;
        assert!(!ext.is_empty());
        for x in ext {
            let len = x.length.min(e.size() - pos);
            match out.last_mut() {
                Some(l) if l.2 == x.flags => l.1 += len,
                _ => out.push((pos, len, x.flags)),
            }
            pos += len;
        }
    }
    Ok(out)
}

fn flagged(extents: &[(u64, u64, u32)], flag: u32) -> Vec<DiskArea> {
    extents
        .iter()
        .filter(|e| e.2 & flag != 0)
        .map(|&(start, length, _)| DiskArea { start, length })
        .collect()
}

#[test]
fn errors_keep_their_kind() {
    let dir = tempfile::tempdir().unwrap();
    let svc = Service::open(dir.path()).unwrap();
    create(&svc, "a", 4 * MIB);
    let kind = |r: Request| svc.execute(r, &()).unwrap_err().kind;
    assert_eq!(kind(Request::SnapshotList { vm: "nope".into() }), ErrorKind::NotFound);
    assert_eq!(
        kind(Request::VmCreate {
            vm: "a".into(),
            disks: vec![MIB],
            granularity: GRAN
        }),
        ErrorKind::AlreadyExists
    );
    assert_eq!(
        kind(Request::VmCreate {
            vm: "b".into(),
            disks: vec![MIB],
            granularity: 3000
        }),
        ErrorKind::InvalidArgument
    );
    assert_eq!(
        kind(Request::DiskUnmap {
            vm: "a".into(),
            disk: 0,
            offset: 4 * MIB - 1,
            length: 2
        }),
        ErrorKind::OutOfRange
    );
    assert_eq!(
        kind(Request::DiskWrite {
            vm: "a".into(),
            disk: 0,
            offset: 0,
            data: service::WriteData::Base64("not base64!".into())
        }),
        ErrorKind::InvalidArgument
    );
    assert_eq!(
        kind(Request::DiskRead {
            vm: "a".into(),
            disk: 0,
            offset: 0,
            length: 8,
            snapshot: None,
            out: Some("relative.raw".into())
        }),
        ErrorKind::InvalidArgument
    );
    let cid = snapshot(&svc, "a", "s1");
    assert_eq!(
        kind(Request::Query {
            vm: "a".into(),
            snapshot: "s1".into(),
            disk: 0,
            since: "52 de c0 zz".into()
        }),
        ErrorKind::MalformedChangeId
    );
    svc.execute(
        Request::VmCbt {
            vm: "a".into(),
            on: false,
        },
        &(),
    )
    .unwrap();
    svc.execute(
        Request::VmCbt {
            vm: "a".into(),
            on: true,
        },
        &(),
    )
    .unwrap();
    snapshot(&svc, "a", "s2");
    assert_eq!(
        kind(Request::Query {
            vm: "a".into(),
            snapshot: "s2".into(),
            disk: 0,
            since: cid
        }),
        ErrorKind::TrackingReset
    );
    svc.execute(
        Request::VmPower {
            vm: "a".into(),
            on: false,
        },
        &(),
    )
    .unwrap();
    assert_eq!(
        kind(Request::DiskWrite {
            vm: "a".into(),
            disk: 0,
            offset: 0,
            data: service::WriteData::Pattern { byte: 1, length: 1 }
        }),
        ErrorKind::PoweredOff
    );
    assert_eq!(kind(Request::GuestStop { id: 99 }), ErrorKind::NotFound);
    svc.shut_down();
    assert_eq!(kind(Request::VmList {}), ErrorKind::ShuttingDown);
}

#[test]
fn reads_writes_and_a_backup_through_execute() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().join("ds");
    let svc = Service::open(&ds).unwrap();
    create(&svc, "a", 8 * MIB);
    svc.execute(
        Request::DiskWrite {
            vm: "a".into(),
            disk: 0,
            offset: 100,
            data: service::WriteData::Base64("aGVsbG8=".into()),
        },
        &(),
    )
    .unwrap();
    let src = dir.path().join("src.bin");
    std::fs::write(&src, vec![9u8; 3 * MIB as usize]).unwrap();
    svc.execute(
        Request::DiskWrite {
            vm: "a".into(),
            disk: 0,
            offset: 2 * MIB,
            data: service::WriteData::File {
                path: src.clone(),
                length: 3 * MIB,
            },
        },
        &(),
    )
    .unwrap();
    let Response::Read { data: Some(d), .. } = svc
        .execute(
            Request::DiskRead {
                vm: "a".into(),
                disk: 0,
                offset: 100,
                length: 5,
                snapshot: None,
                out: None,
            },
            &(),
        )
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(d, "aGVsbG8=");
    let repo = dir.path().join("repo");
    let Response::Backup(b) = svc
        .execute(
            Request::BackupRun {
                vm: "a".into(),
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
    assert_eq!(b.kind, "full");
    write(&svc, "a", 7 * MIB, 4, 4096);
    let Response::Backup(b2) = svc
        .execute(
            Request::BackupRun {
                vm: "a".into(),
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
    assert_eq!(b2.kind, "incremental");
    assert_eq!(b2.changed_bytes, GRAN);
    // The backup's snapshots are gone; the restored image is the live disk.
    let Response::Snapshots { snapshots, .. } = svc.execute(Request::SnapshotList { vm: "a".into() }, &()).unwrap()
    else {
        panic!()
    };
    assert!(snapshots.is_empty());
    let r = backup::Repository::open(&repo).unwrap();
    let img = dir.path().join("img.raw");
    backup::restore_to_file(&r, &b2.point, 0, &img, false, &()).unwrap();
    let live = dir.path().join("live.raw");
    svc.execute(
        Request::DiskRead {
            vm: "a".into(),
            disk: 0,
            offset: 0,
            length: 8 * MIB,
            snapshot: None,
            out: Some(live.clone()),
        },
        &(),
    )
    .unwrap();
    assert!(std::fs::read(&img).unwrap() == std::fs::read(&live).unwrap());
}

#[test]
fn snapshot_exports_answer_what_the_query_answers() {
    let dir = tempfile::tempdir().unwrap();
    let svc = Arc::new(Service::open(dir.path()).unwrap());
    create(&svc, "a", 16 * MIB);
    write(&svc, "a", 0, 1, 3 * MIB);
    let c1 = snapshot(&svc, "a", "s1");
    write(&svc, "a", MIB + 7, 2, 100_000);
    write(&svc, "a", 12 * MIB, 3, 4096);
    let c2 = snapshot(&svc, "a", "s2");
    write(&svc, "a", 15 * MIB, 4, 1);
    snapshot(&svc, "a", "s3");
    let exports = HostExports::new(svc.clone());
    let names: Vec<String> = exports.list().into_iter().map(|l| l.name).collect();
    assert_eq!(names, ["a/0", "a/0@s1", "a/0@s2", "a/0@s3"]);
    let s2 = exports.open("a/0@s2").unwrap();
    assert!(s2.is_read_only());
    assert_eq!(s2.size(), 16 * MIB);
    assert_eq!(
        s2.meta_contexts(),
        [
            BASE_ALLOCATION.to_owned(),
            format!("{QEMU_DIRTY_BITMAP}{c1}"),
            format!("{QEMU_DIRTY_BITMAP}{c2}")
        ]
    );
    let dirty = flagged(&status(s2.as_ref(), &format!("{QEMU_DIRTY_BITMAP}{c1}")).unwrap(), 1);
    assert_eq!(dirty, query(&svc, "a", "s2", &c1).unwrap());
    assert_eq!(dirty.len(), 2);
    let holes = flagged(&status(s2.as_ref(), BASE_ALLOCATION).unwrap(), 3);
    let data: Vec<DiskArea> = status(s2.as_ref(), BASE_ALLOCATION)
        .unwrap()
        .into_iter()
        .filter(|e| e.2 == 0)
        .map(|(start, length, _)| DiskArea { start, length })
        .collect();
    assert_eq!(data, query(&svc, "a", "s2", "*").unwrap());
    assert!(!holes.is_empty());
    // Block status of a range in the middle: the query's areas clipped to it.
    let ctx = format!("{QEMU_DIRTY_BITMAP}{c1}");
    for (off, len) in [
        (MIB + 100, 5000),
        (MIB + 65536 * 2 + 1, 11 * MIB),
        (12 * MIB + 4095, 2),
        (15 * MIB, MIB),
    ] {
        let mut ext = Vec::new();
        s2.block_status(&ctx, off, len, &mut ext).unwrap();
        assert_eq!(ext.iter().map(|e| e.length).sum::<u64>(), len, "covers {off}+{len}");
        let mut pos = off;
        for e in ext {
            // Every byte of the extent (sampled at 512-byte steps and its
            // last byte) has the extent's flag.
            let end = pos + e.length;
            for at in (pos..end).step_by(512).chain([end - 1]) {
                let dirty_here = dirty.iter().any(|a| a.start <= at && at < a.end());
                assert_eq!(e.flags == 1, dirty_here, "at {at}");
            }
            pos = end;
        }
    }
    // Accepted: change IDs the query accepts. Refused: malformed, `*`, newer
    // than the snapshot, foreign.
    assert!(s2.has_meta_context(&format!("{QEMU_DIRTY_BITMAP}{c1}")));
    let c3 = svc.execute(Request::SnapshotList { vm: "a".into() }, &()).unwrap();
    let Response::Snapshots { snapshots, .. } = c3 else {
        panic!()
    };
    let c3 = snapshots[2].disks[0].change_id.clone().unwrap();
    for bad in [
        "qemu:dirty-bitmap:*".to_owned(),
        "qemu:dirty-bitmap:nope".to_owned(),
        format!("{QEMU_DIRTY_BITMAP}{c3}"),
        format!("{QEMU_DIRTY_BITMAP}00000000-0000-0000-0000-000000000000/1"),
        "qemu:other".to_owned(),
    ] {
        assert!(!s2.has_meta_context(&bad), "{bad}");
    }
    // Reads are the snapshot's content.
    let mut b = vec![0u8; 4];
    s2.read(MIB + 5, &mut b).unwrap();
    assert_eq!(b, [1, 1, 2, 2]);
    assert_eq!(s2.write(0, b"x"), Err(nbd::ExportError::ReadOnly));
    // The live export writes as a guest: tracked.
    let live = exports.open("a/0").unwrap();
    live.write(5 * MIB, &[8u8; 10]).unwrap();
    live.trim(9 * MIB, GRAN).unwrap();
    live.flush().unwrap();
    snapshot(&svc, "a", "s4");
    let c3_areas = query(&svc, "a", "s4", &c3).unwrap();
    assert_eq!(
        c3_areas,
        [
            DiskArea {
                start: 5 * MIB,
                length: GRAN
            },
            DiskArea {
                start: 9 * MIB,
                length: GRAN
            }
        ]
    );
    // After a tracking reset the same context is an error, never a short answer.
    svc.execute(
        Request::VmCbt {
            vm: "a".into(),
            on: false,
        },
        &(),
    )
    .unwrap();
    svc.execute(
        Request::VmCbt {
            vm: "a".into(),
            on: true,
        },
        &(),
    )
    .unwrap();
    let err = status(s2.as_ref(), &format!("{QEMU_DIRTY_BITMAP}{c1}")).unwrap_err();
    assert_eq!(err.errno(), nbd::Errno::Inval, "{err}");
    assert!(!s2.has_meta_context(&format!("{QEMU_DIRTY_BITMAP}{c1}")));
    for bad in ["a", "a/1", "a/0@nope", "b/0", "a/0@s1/x"] {
        assert!(exports.open(bad).is_err(), "{bad}");
    }
}

#[test]
fn an_export_of_a_removed_snapshot_fails() {
    let dir = tempfile::tempdir().unwrap();
    let svc = Arc::new(Service::open(dir.path()).unwrap());
    create(&svc, "a", 4 * MIB);
    write(&svc, "a", 0, 1, MIB);
    let c1 = snapshot(&svc, "a", "s1");
    write(&svc, "a", 0, 2, MIB);
    snapshot(&svc, "a", "s2");
    let exports = HostExports::new(svc.clone());
    let s1 = exports.open("a/0@s1").unwrap();
    let s2 = exports.open("a/0@s2").unwrap();
    let mut b = [0u8; 1];
    s1.read(0, &mut b).unwrap();
    assert_eq!(b, [1]);
    svc.execute(
        Request::SnapshotRemove {
            vm: "a".into(),
            name: "s1".into(),
        },
        &(),
    )
    .unwrap();
    let e = s1.read(0, &mut b).unwrap_err();
    assert!(e.to_string().contains("removed"), "{e}");
    assert!(status(s1.as_ref(), BASE_ALLOCATION).is_err());
    // A new snapshot of the same name is not what the old export reads.
    write(&svc, "a", 0, 3, MIB);
    snapshot(&svc, "a", "s1");
    assert!(s1.read(0, &mut b).is_err());
    let new = exports.open("a/0@s1").unwrap();
    new.read(0, &mut b).unwrap();
    assert_eq!(b, [3]);
    // Revert deletes the newer snapshots: their exports fail too.
    s2.read(0, &mut b).unwrap();
    svc.execute(
        Request::SnapshotRevert {
            vm: "a".into(),
            name: "s2".into(),
        },
        &(),
    )
    .unwrap();
    assert!(new.read(0, &mut b).is_err());
    s2.read(0, &mut b).unwrap();
    assert_eq!(b, [2]);
    // The removed snapshot's change ID still answers on s2.
    assert!(s2.has_meta_context(&format!("{QEMU_DIRTY_BITMAP}{c1}")));
}

#[test]
fn guest_workloads_run_list_and_stop() {
    let dir = tempfile::tempdir().unwrap();
    let svc = Service::open(dir.path()).unwrap();
    create(&svc, "a", 64 * MIB);
    let run = |detach, ops, seconds, verify| {
        Request::GuestRun(GuestRun {
            vm: "a".into(),
            profile: "oltp-db".into(),
            disk: 0,
            threads: 2,
            seed: 1,
            ops,
            seconds,
            verify,
            snapshot_every: None,
            detach,
        })
    };
    // Attached, verified, by ops.
    let Response::Guest(r) = svc.execute(run(false, Some(3000), None, true), &()).unwrap() else {
        panic!()
    };
    assert_eq!(r.ops, 3000);
    assert_eq!(r.missed_blocks, 0);
    assert!(r.epochs_checked >= 1);
    assert_eq!(r.state, service::action::GuestState::Finished);
    // Detached, until stopped.
    let Response::GuestStarted { id, .. } = svc.execute(run(true, None, None, false), &()).unwrap() else {
        panic!()
    };
    std::thread::sleep(Duration::from_millis(300));
    let Response::Guests(list) = svc.execute(Request::GuestList {}, &()).unwrap() else {
        panic!()
    };
    assert_eq!(list[0].id, id);
    assert_eq!(list[0].state, service::action::GuestState::Running);
    // A revert is refused while it runs.
    snapshot(&svc, "a", "s1");
    let e = svc
        .execute(
            Request::SnapshotRevert {
                vm: "a".into(),
                name: "s1".into(),
            },
            &(),
        )
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::InUse);
    let Response::Guest(r) = svc.execute(Request::GuestStop { id }, &()).unwrap() else {
        panic!()
    };
    assert_eq!(r.state, service::action::GuestState::Stopped);
    assert!(r.ops > 0);
    let bad = svc
        .execute(
            Request::GuestRun(GuestRun {
                profile: "no-such-profile".into(),
                ..match run(false, Some(1), None, false) {
                    Request::GuestRun(g) => g,
                    _ => unreachable!(),
                }
            }),
            &(),
        )
        .unwrap_err();
    assert_eq!(bad.kind, ErrorKind::NotFound);
    // Shutdown stops a detached workload that has no limit.
    let Response::GuestStarted { .. } = svc.execute(run(true, None, None, false), &()).unwrap() else {
        panic!()
    };
    // Returns only once the workload has stopped.
    svc.shut_down();
}

// ---- the control socket -------------------------------------------------

struct Socket {
    _dir: tempfile::TempDir,
    ds: std::path::PathBuf,
    server: Option<service::control::ControlServer>,
    svc: Arc<Service>,
}

fn socket() -> Socket {
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().join("ds");
    let svc = Arc::new(Service::open(&ds).unwrap());
    std::fs::create_dir_all(ds.join(client::STATE_DIR)).unwrap();
    let server = service::control::ControlServer::start(svc.clone(), &client::socket_path(&ds)).unwrap();
    Socket {
        _dir: dir,
        ds,
        server: Some(server),
        svc,
    }
}

/// Sends raw bytes, returns the lines the server sent until it closed.
fn raw(ds: &Path, bytes: &[u8], close_write: bool) -> Vec<Event> {
    let mut s = UnixStream::connect(client::socket_path(ds)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let _ = s.write_all(bytes);
    if close_write {
        s.shutdown(std::net::Shutdown::Write).unwrap();
    }
    BufReader::new(s)
        .lines()
        .map_while(Result::ok)
        .map(|l| serde_json::from_str(&l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

fn failed(events: &[Event]) -> ErrorKind {
    match events {
        [Event::Failed { error }] => error.kind,
        e => panic!("{e:?}"),
    }
}

#[test]
fn the_control_socket_refuses_bad_input_with_typed_errors() {
    let s = socket();
    let mode = std::fs::metadata(client::socket_path(&s.ds)).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o600
    );
    assert_eq!(failed(&raw(&s.ds, b"{not json\n", false)), ErrorKind::InvalidRequest);
    assert_eq!(failed(&raw(&s.ds, b"[1,2]\n", false)), ErrorKind::InvalidRequest);
    assert_eq!(
        failed(&raw(&s.ds, b"{\"action\":\"vm-explode\"}\n", false)),
        ErrorKind::InvalidRequest
    );
    assert_eq!(
        failed(&raw(&s.ds, b"{\"action\":\"vm-list\",\"x\":1}\n", false)),
        ErrorKind::InvalidRequest
    );
    assert_eq!(failed(&raw(&s.ds, b"\xff\xfe\n", false)), ErrorKind::InvalidRequest);
    // Disconnect mid-request: the line never ends.
    assert_eq!(
        failed(&raw(&s.ds, b"{\"action\":\"vm-li", true)),
        ErrorKind::InvalidRequest
    );
    // Connect and leave without a byte: nothing to answer.
    assert!(raw(&s.ds, b"", true).is_empty());
    // A line over the limit: refused without reading it all.
    let mut huge = b"{\"action\":\"vm-create\",\"vm\":\"".to_vec();
    huge.resize(MAX_REQUEST as usize + 10, b'a');
    assert_eq!(failed(&raw(&s.ds, &huge, false)), ErrorKind::TooLarge);
    // A client that leaves while its action runs: the action goes on, the
    // server stays up.
    create(&s.svc, "a", 64 * MIB);
    {
        let mut c = UnixStream::connect(client::socket_path(&s.ds)).unwrap();
        let req = serde_json::json!({"action": "guest-run", "vm": "a", "profile": "os-idle", "seconds": 0.5});
        c.write_all(format!("{req}\n").as_bytes()).unwrap();
    }
    std::thread::sleep(Duration::from_millis(100));
    let r = client::call(&s.ds, &Request::GuestList {}, &()).unwrap();
    let Response::Guests(list) = r else { panic!() };
    assert_eq!(list.len(), 1);
    // Everything still works.
    let r = client::call(&s.ds, &Request::VmList {}, &()).unwrap();
    assert!(matches!(r, Response::Vms(v) if v.len() == 1));
    s.server.unwrap().shutdown();
    assert!(!client::socket_path(&s.ds).exists());
    let e = client::call(&s.ds, &Request::VmList {}, &()).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Unavailable);
}

#[derive(Default)]
struct Seen(parking_lot::Mutex<(u32, u64, u32)>);

impl backup::Progress for Seen {
    fn begin(&self, _label: &str, _total: Option<u64>) {
        self.0.lock().0 += 1;
    }
    fn advance(&self, n: u64) {
        self.0.lock().1 += n;
    }
    fn end(&self) {
        self.0.lock().2 += 1;
    }
}

#[test]
fn a_second_client_snapshots_and_queries_while_the_guest_writes() {
    let s = socket();
    let ds = s.ds.clone();
    let call = |r: Request| client::call(&ds, &r, &());
    call(Request::VmCreate {
        vm: "a".into(),
        disks: vec![64 * MIB],
        granularity: GRAN,
    })
    .unwrap();
    let Response::SnapshotCreated(s0) = call(Request::SnapshotCreate {
        vm: "a".into(),
        name: "s0".into(),
    })
    .unwrap() else {
        panic!()
    };
    let c0 = s0.disks[0].change_id.clone().unwrap();
    let Response::GuestStarted { id, .. } = call(Request::GuestRun(GuestRun {
        vm: "a".into(),
        profile: "file-server".into(),
        disk: 0,
        threads: 2,
        seed: 7,
        ops: None,
        seconds: Some(30.0),
        verify: false,
        snapshot_every: None,
        detach: true,
    }))
    .unwrap() else {
        panic!()
    };
    std::thread::sleep(Duration::from_millis(200));
    // A "second terminal": more clients at once while the guest writes.
    let threads: Vec<_> = (0..3)
        .map(|i| {
            let ds = ds.clone();
            let c0 = c0.clone();
            std::thread::spawn(move || {
                let name = format!("t{i}");
                client::call(
                    &ds,
                    &Request::SnapshotCreate {
                        vm: "a".into(),
                        name: name.clone(),
                    },
                    &(),
                )
                .unwrap();
                let r = client::call(
                    &ds,
                    &Request::Query {
                        vm: "a".into(),
                        snapshot: name,
                        disk: 0,
                        since: c0,
                    },
                    &(),
                )
                .unwrap();
                let Response::ChangedAreas(c) = r else { panic!() };
                c.changed_bytes
            })
        })
        .collect();
    for t in threads {
        assert!(t.join().unwrap() > 0, "the guest's writes show in the query");
    }
    let Response::Guest(r) = call(Request::GuestStop { id }).unwrap() else {
        panic!()
    };
    assert!(r.ops > 0 && r.writes > 0);
    // Progress events reach the client.
    let seen = Seen::default();
    client::call(
        &ds,
        &Request::DiskWrite {
            vm: "a".into(),
            disk: 0,
            offset: 0,
            data: service::WriteData::Pattern {
                byte: 1,
                length: 16 * MIB,
            },
        },
        &seen,
    )
    .unwrap();
    assert_eq!(*seen.0.lock(), (1, 16 * MIB, 1));
}

// ---- the daemon -------------------------------------------------------------

fn config(ds: &Path) -> ServeConfig {
    ServeConfig {
        datastore: ds.to_owned(),
        listen: "127.0.0.1:0".parse().unwrap(),
        plain_http: true,
        nbd: "127.0.0.1:0".parse().unwrap(),
        allow_remote: false,
        password: "secret".into(),
        repository: None,
        max_areas: service::vsphere::DEFAULT_MAX_AREAS,
    }
}

fn http_get(addr: &str, auth: Option<&str>) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let auth = auth.map_or(String::new(), |a| format!("Authorization: Basic {a}\r\n"));
    write!(s, "GET / HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn the_daemon_refuses_a_second_serve_no_password_and_remote_addresses() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(config(dir.path())).unwrap();
    let e = Daemon::start(config(dir.path())).unwrap_err().to_string();
    assert!(e.contains("already served"), "{e}");
    assert!(e.contains(&format!("pid {}", std::process::id())), "{e}");
    assert!(e.contains(&d.status().nbd), "{e}");
    let web = d
        .status()
        .web
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
    assert!(http_get(&web, None).starts_with("HTTP/1.1 401"));
    assert!(http_get(&web, Some("cm9vdDp3cm9uZw==")).starts_with("HTTP/1.1 401")); // root:wrong
    let page = http_get(&web, Some("cm9vdDpzZWNyZXQ=")); // root:secret
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    assert!(page.contains("cbtsim host"));
    assert!(d.shutdown().is_none());
    let other = tempfile::tempdir().unwrap();
    let mut c = config(other.path());
    c.password = String::new();
    assert!(matches!(Daemon::start(c), Err(service::ServeError::NoPassword)));
    let mut c = config(other.path());
    c.nbd = "0.0.0.0:0".parse().unwrap();
    assert!(matches!(Daemon::start(c), Err(service::ServeError::NotLoopback { .. })));
    // The first serve is gone: a new one starts.
    Daemon::start(config(dir.path())).unwrap().shutdown();
}

#[test]
fn https_serves_the_page_with_the_datastores_certificate() {
    use tokio_rustls::rustls;
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    c.plain_http = false;
    let d = Daemon::start(c.clone()).unwrap();
    let cert_path = dir.path().join(".cbtsim/tls-cert.pem");
    let cert = std::fs::read(&cert_path).unwrap();
    let key_mode = std::fs::metadata(dir.path().join(".cbtsim/tls-key.pem")).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&key_mode.permissions()) & 0o777,
        0o600
    );
    let addr = d
        .status()
        .web
        .trim_start_matches("https://")
        .trim_end_matches('/')
        .to_owned();
    // A rustls client that trusts only the datastore's certificate.
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(&cert) {
        roots.add(c.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let mut tcp = std::net::TcpStream::connect(&addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut tls = rustls::Stream::new(&mut conn, &mut tcp);
    write!(
        tls,
        "GET / HTTP/1.1\r\nHost: localhost\r\nAuthorization: Basic cm9vdDpzZWNyZXQ=\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = Vec::new();
    let _ = tls.read_to_end(&mut out);
    let out = String::from_utf8_lossy(&out);
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    d.shutdown();
    // The certificate is made once per datastore.
    let d = Daemon::start(c).unwrap();
    assert_eq!(std::fs::read(&cert_path).unwrap(), cert);
    d.shutdown();
}

/// A service of one command: VMs open on demand, read-only requests through read-only
/// views (which let other readers in and keep writers out), and the requests the command
/// line needs beyond the socket's first set.
#[test]
fn a_local_service_reads_through_views_and_answers_the_cli_requests() {
    let dir = tempfile::tempdir().unwrap();
    {
        let svc = Service::open(dir.path()).unwrap();
        create(&svc, "a", 4 * MIB);
        write(&svc, "a", 0, 1, MIB);
        snapshot(&svc, "a", "s1");
    }
    let svc = Service::local(dir.path()).unwrap();
    let reader = sim::Host::open(dir.path()).unwrap();
    let view = reader.view("a").unwrap();
    // Another reader holds the VM: reads still work, writes do not.
    let Response::VmDetails(d) = svc.execute(Request::VmShow { vm: "a".into() }, &()).unwrap() else {
        panic!()
    };
    assert_eq!((d.disks[0].layers, d.snapshots.len()), (2, 1));
    assert!(d.disks[0].change_id.is_some());
    assert_eq!(d.snapshots[0].created_utc.len(), 20);
    assert!(!d.consolidation_needed);
    let q = query(&svc, "a", "s1", "*").unwrap();
    assert_eq!(q, vec![DiskArea { start: 0, length: MIB }]);
    let e = svc
        .execute(
            Request::SnapshotCreate {
                vm: "a".into(),
                name: "s2".into(),
            },
            &(),
        )
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::InUse);
    drop(view);
    // Writes open the VM; a removal answers the snapshots left.
    snapshot(&svc, "a", "s2");
    let r = svc
        .execute(
            Request::SnapshotRemove {
                vm: "a".into(),
                name: "s1".into(),
            },
            &(),
        )
        .unwrap();
    assert!(matches!(r, Response::SnapshotRemoved { snapshots, .. } if snapshots == ["s2"]));
    let r = svc
        .execute(
            Request::DiskExtend {
                vm: "a".into(),
                disk: 0,
                size: 8 * MIB,
            },
            &(),
        )
        .unwrap();
    assert!(matches!(r, Response::Extended { size, old_size, .. } if (size, old_size) == (8 * MIB, 4 * MIB)));
    // Disk sizes follow the rule of scenario files.
    let e = svc
        .execute(
            Request::VmCreate {
                vm: "b".into(),
                disks: vec![512],
                granularity: GRAN,
            },
            &(),
        )
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidArgument);
    assert!(e.message.contains("from 1048576 (1 MiB)"), "{}", e.message);
    // A guest started detached, waited for; delete refuses a VM a workload drives.
    let Response::GuestStarted { id, .. } = svc
        .execute(
            Request::GuestRun(GuestRun {
                vm: "a".into(),
                profile: "os-idle".into(),
                disk: 0,
                threads: 1,
                seed: 1,
                ops: Some(2000),
                seconds: None,
                verify: false,
                snapshot_every: None,
                detach: true,
            }),
            &(),
        )
        .unwrap()
    else {
        panic!()
    };
    let e = svc.execute(Request::VmDelete { vm: "a".into() }, &());
    if let Err(e) = e {
        assert_eq!(e.kind, ErrorKind::InUse, "{e}");
    } // (or the workload was already over)
    let Response::Guest(r) = svc.execute(Request::GuestWait { id }, &()).unwrap() else {
        panic!()
    };
    assert_eq!((r.ops, r.state), (2000, service::GuestState::Finished));
    let e = svc.execute(Request::GuestWait { id: 77 }, &()).unwrap_err();
    assert_eq!(e.kind, ErrorKind::NotFound);
    // Backup, restore into a new VM, delete it.
    let repo = dir.path().join("repo");
    let Response::Backup(b) = svc
        .execute(
            Request::BackupRun {
                vm: "a".into(),
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
    let Response::Restored(r) = svc
        .execute(
            Request::RestoreToVm {
                repository: repo.clone(),
                point: b.point.clone(),
                vm: "copy".into(),
            },
            &(),
        )
        .unwrap()
    else {
        panic!()
    };
    assert_eq!((r.disks, r.capacity), (1, 8 * MIB));
    let Response::Repaired(f) = svc.execute(Request::BackupRepair { repository: repo }, &()).unwrap() else {
        panic!()
    };
    assert_eq!(f.bad_chunks, 0);
    let r = svc.execute(Request::VmDelete { vm: "copy".into() }, &()).unwrap();
    assert!(matches!(r, Response::VmDeleted { vm } if vm == "copy"));
    assert!(!dir.path().join("copy").exists());
    let e = svc.execute(Request::VmDelete { vm: "copy".into() }, &()).unwrap_err();
    assert_eq!(e.kind, ErrorKind::NotFound);
}
