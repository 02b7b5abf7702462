//! Hand-made packets over a raw socket: bad and borderline inputs get the
//! error the NBD spec names or a closed connection, never a panic, never a
//! change to the export's data; the server keeps serving others.

mod common;

use std::net::SocketAddr;

use common::*;
use nbd::proto::{self, ClientOption, InfoRequest, MetaRequest};
use nbd::Command as Cmd;

const EPERM: u32 = 1;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;
const EOVERFLOW: u32 = 75;

fn meta(export: &str, queries: &[&str]) -> MetaRequest {
    MetaRequest {
        export: export.into(),
        queries: queries.iter().map(|q| q.to_string()).collect(),
    }
}

/// The final reply type of one raw option.
fn raw_option(addr: SocketAddr, option: u32, data: &[u8]) -> u32 {
    let mut c = Raw::handshake(addr);
    c.send(&proto::encode_option(option, data));
    let last = c.opt_replies().pop().unwrap();
    assert_eq!(last.option, option);
    // The connection goes on: a list still works.
    c.option(&ClientOption::List);
    assert_eq!(c.opt_replies().last().unwrap().kind, proto::REP_ACK);
    last.kind
}

/// Names in meta context replies.
fn context_names(replies: &[OptReply]) -> Vec<String> {
    replies
        .iter()
        .filter(|r| r.kind == proto::REP_META_CONTEXT)
        .map(|r| String::from_utf8(r.data[4..].to_vec()).unwrap())
        .collect()
}

/// After every test: the server still serves, and `disk` holds its data.
fn assert_alive_and_intact(addr: SocketAddr, exports: &nbd::MemoryExports, disk_before: &[u8]) {
    let mut c = Raw::handshake(addr);
    c.go("disk", true, &[]);
    c.request(Cmd::Read, 0, 9, 0, 4096);
    assert!(c.structured_read(0, 4096).unwrap() == disk_before[..4096]);
    assert!(contents(exports, "disk") == disk_before, "the export's data changed");
}

#[test]
fn handshake_framing_errors_close_the_connection() {
    let (server, exports) = start();
    let addr = tcp_addr(&server);
    let before = contents(&exports, "disk");

    // Unknown client flags.
    let mut c = Raw::connect(addr);
    c.send(&0xffu32.to_be_bytes());
    assert!(c.closed());
    // Bad option magic.
    let mut c = Raw::handshake(addr);
    let mut bad = ClientOption::List.encode();
    bad[0] ^= 1;
    c.send(&bad);
    assert!(c.closed());
    // NBD_OPT_EXPORT_NAME of an unknown export, or of a name that is not UTF-8.
    let mut c = Raw::handshake(addr);
    c.option(&ClientOption::ExportName("nope".into()));
    assert!(c.closed());
    let mut c = Raw::handshake(addr);
    c.send(&proto::encode_option(proto::OPT_EXPORT_NAME, &[0xff, 0xfe]));
    assert!(c.closed());
    // An oversized EXPORT_NAME has no error reply: closed.
    let mut c = Raw::handshake(addr);
    c.send(&proto::encode_option(proto::OPT_EXPORT_NAME, &vec![b'a'; 70_000]));
    assert!(c.closed());
    // NBD_OPT_ABORT: ACK, then closed.
    let mut c = Raw::handshake(addr);
    c.option(&ClientOption::Abort);
    assert_eq!(c.opt_reply().kind, proto::REP_ACK);
    assert!(c.closed());
    // Truncated client flags, truncated option header, truncated option data.
    for partial in [
        &[0u8, 0][..],
        &proto::IHAVEOPT.to_be_bytes()[..],
        &proto::encode_option(3, &[0; 100])[..30],
    ] {
        let mut c = Raw::connect(addr);
        if partial.len() > 2 {
            c.send(&3u32.to_be_bytes());
        }
        c.send(partial);
        c.s.shutdown(std::net::Shutdown::Write).unwrap();
        assert!(c.closed());
    }
    assert_alive_and_intact(addr, &exports, &before);
}

#[test]
fn bad_options_get_option_errors_and_the_negotiation_goes_on() {
    let (server, exports) = start();
    let addr = tcp_addr(&server);
    let before = contents(&exports, "disk");

    assert_eq!(raw_option(addr, 999, b"whatever"), proto::REP_ERR_UNSUP);
    assert_eq!(raw_option(addr, proto::OPT_EXTENDED_HEADERS, &[]), proto::REP_ERR_UNSUP);
    assert_eq!(raw_option(addr, proto::OPT_STARTTLS, &[]), proto::REP_ERR_UNSUP);
    assert_eq!(raw_option(addr, proto::OPT_LIST, b"x"), proto::REP_ERR_INVALID);
    assert_eq!(
        raw_option(addr, proto::OPT_STRUCTURED_REPLY, b"x"),
        proto::REP_ERR_INVALID
    );

    // NBD_OPT_GO / INFO: name past the data, trailing bytes, info requests
    // past the data, NUL, not UTF-8, too long, unknown export.
    let go = |name: &[u8], tail: &[u8]| {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name);
        d.extend_from_slice(tail);
        d
    };
    let mut past = 100u32.to_be_bytes().to_vec();
    past.extend_from_slice(b"disk\0\0");
    assert_eq!(raw_option(addr, proto::OPT_GO, &past), proto::REP_ERR_INVALID);
    assert_eq!(
        raw_option(addr, proto::OPT_GO, &go(b"disk", &[0, 0, 7])),
        proto::REP_ERR_INVALID
    );
    assert_eq!(
        raw_option(addr, proto::OPT_GO, &go(b"disk", &[0, 3, 0, 1])),
        proto::REP_ERR_INVALID
    );
    assert_eq!(
        raw_option(addr, proto::OPT_GO, &go(b"di\0sk", &[0, 0])),
        proto::REP_ERR_INVALID
    );
    assert_eq!(
        raw_option(addr, proto::OPT_INFO, &go(&[0xc3, 0x28], &[0, 0])),
        proto::REP_ERR_INVALID
    );
    assert_eq!(
        raw_option(addr, proto::OPT_INFO, &go(&[b'a'; 4097], &[0, 0])),
        proto::REP_ERR_INVALID
    );
    assert_eq!(
        raw_option(addr, proto::OPT_GO, &go(b"nope", &[0, 0])),
        proto::REP_ERR_UNKNOWN
    );
    assert_eq!(raw_option(addr, proto::OPT_GO, &[1, 2]), proto::REP_ERR_INVALID);

    // Option data over the limit (64 KiB): skipped unread, ERR_TOO_BIG.
    assert_eq!(
        raw_option(addr, proto::OPT_SET_META_CONTEXT, &vec![7u8; 1 << 20]),
        proto::REP_ERR_TOO_BIG
    );

    // Metadata context options.
    let mut c = Raw::handshake(addr);
    c.option(&ClientOption::SetMetaContext(meta("disk", &["base:allocation"])));
    assert_eq!(
        c.opt_reply().kind,
        proto::REP_ERR_INVALID,
        "SET_META before STRUCTURED_REPLY"
    );
    c.option(&ClientOption::StructuredReply);
    assert_eq!(c.opt_reply().kind, proto::REP_ACK);
    let mut huge = 4u32.to_be_bytes().to_vec();
    huge.extend_from_slice(b"disk");
    huge.extend_from_slice(&u32::MAX.to_be_bytes());
    c.send(&proto::encode_option(proto::OPT_SET_META_CONTEXT, &huge));
    assert_eq!(c.opt_reply().kind, proto::REP_ERR_INVALID, "query count past the data");
    c.option(&ClientOption::SetMetaContext(meta("disk", &["nocolon"])));
    assert_eq!(c.opt_reply().kind, proto::REP_ERR_INVALID, "query without namespace");
    c.option(&ClientOption::SetMetaContext(meta("nope", &["base:allocation"])));
    assert_eq!(c.opt_reply().kind, proto::REP_ERR_UNKNOWN, "unknown export");
    c.option(&ClientOption::ListMetaContext(meta("nope", &[])));
    assert_eq!(c.opt_reply().kind, proto::REP_ERR_UNKNOWN, "unknown export");
    // After all that, GO works and no context is selected.
    c.option(&ClientOption::Go(InfoRequest {
        name: "disk".into(),
        requests: vec![],
    }));
    assert_eq!(c.opt_replies().last().unwrap().kind, proto::REP_ACK);
    c.request(Cmd::BlockStatus, 0, 1, 0, 4096);
    assert_eq!(c.block_status(), Err(EINVAL));

    assert_alive_and_intact(addr, &exports, &before);
}

#[test]
fn meta_context_queries() {
    let (server, _) = start();
    let addr = tcp_addr(&server);
    let bm = format!("qemu:dirty-bitmap:{BITMAP}");
    let bm2 = format!("qemu:dirty-bitmap:{BITMAP2}");
    let mut c = Raw::handshake(addr);
    c.option(&ClientOption::StructuredReply);
    c.opt_reply();
    let mut list = |queries: &[&str]| {
        c.option(&ClientOption::ListMetaContext(meta("disk", queries)));
        context_names(&c.opt_replies())
    };
    assert_eq!(list(&[]), ["base:allocation", &bm, &bm2]);
    assert_eq!(list(&["qemu:dirty-bitmap:"]), [bm.as_str(), &bm2]);
    assert_eq!(list(&["qemu:"]), [bm.as_str(), &bm2]);
    assert_eq!(list(&["base:"]), ["base:allocation"]);
    assert_eq!(list(&["x-other:", "qemu:dirty-bitmap:nope"]), Vec::<String>::new());
    assert_eq!(list(&[&bm2, "base:allocation", &bm2]), [&bm2, "base:allocation"]);

    // SET: exact names only, duplicates once, IDs 1, 2.
    let mut c = Raw::handshake(addr);
    let (_, _, ids) = c.go(
        "disk",
        true,
        &["qemu:dirty-bitmap:", &bm, "base:allocation", &bm, "base:nope"],
    );
    assert_eq!(ids, [(1, bm.clone()), (2, "base:allocation".to_string())]);
    // A selection for another export is dropped by GO.
    let mut c = Raw::handshake(addr);
    c.option(&ClientOption::StructuredReply);
    c.opt_reply();
    c.option(&ClientOption::SetMetaContext(meta("ro", &["base:allocation"])));
    assert_eq!(c.opt_replies().len(), 2);
    let (_, _, _) = c.go("disk", false, &[]);
    c.request(Cmd::BlockStatus, 0, 1, 0, 4096);
    assert_eq!(c.block_status(), Err(EINVAL));
}

#[test]
fn export_name_enters_transmission_without_zeroes() {
    let (server, exports) = start();
    let mut c = Raw::handshake(tcp_addr(&server));
    c.option(&ClientOption::ExportName("disk".into()));
    let b = c.read_n(10); // no 124 zeroes: we asked for NO_ZEROES
    assert_eq!(u64::from_be_bytes(b[..8].try_into().unwrap()), SIZE);
    c.request(Cmd::Read, 0, 5, 4096, 512);
    let (r, data) = c.reply(512);
    assert_eq!(r, Reply::Simple { error: 0, cookie: 5 });
    assert!(data == direct(&exports, "disk", 4096, 512));
    // Without NO_ZEROES: the zeroes follow.
    let mut c = Raw::connect(tcp_addr(&server));
    c.send(&1u32.to_be_bytes());
    c.option(&ClientOption::ExportName("disk".into()));
    assert!(c.read_n(134)[10..].iter().all(|&b| b == 0));
}

#[test]
fn bad_requests_get_errors_and_change_nothing() {
    let (server, exports) = start();
    let addr = tcp_addr(&server);
    let before = contents(&exports, "disk");
    for structured in [true, false] {
        let mut c = Raw::handshake(addr);
        let (size, _, _) = c.go("disk", structured, &[]);
        let mut cookie = 100;
        let mut expect = |c: &mut Raw, cmd: Cmd, flags: u16, offset: u64, length: u32, payload: &[u8], errno: u32| {
            cookie += 1;
            c.request(cmd, flags, cookie, offset, length);
            c.send(payload);
            let (r, _) = c.reply(0);
            assert_eq!(
                r.error(),
                errno,
                "{cmd:?} flags {flags:#x} at {offset}+{length} (structured {structured})"
            );
            match r {
                // Successes without payload may be simple replies in either mode.
                Reply::Simple { cookie: got, .. } => assert!((!structured || errno == 0) && got == cookie),
                Reply::Chunk {
                    cookie: got,
                    flags,
                    kind,
                    payload,
                } => {
                    assert!(structured && got == cookie);
                    assert_eq!((flags, kind), (proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_ERROR));
                    let msg_len = u16::from_be_bytes([payload[4], payload[5]]) as usize;
                    assert_eq!(payload.len(), 6 + msg_len);
                    assert!(msg_len > 0, "errors carry a message");
                }
            }
        };
        expect(&mut c, Cmd::Other(99), 0, 0, 4096, &[], EINVAL);
        expect(&mut c, Cmd::Other(proto::CMD_CACHE), 0, 0, 4096, &[], EINVAL);
        expect(&mut c, Cmd::Read, 0, size - 100, 4096, &[], EINVAL);
        expect(&mut c, Cmd::Read, 0, u64::MAX - 10, 4096, &[], EINVAL);
        expect(
            &mut c,
            Cmd::Read,
            0,
            0,
            (1 << 25) + 1,
            &[],
            if structured { EOVERFLOW } else { EINVAL },
        );
        expect(&mut c, Cmd::Read, proto::CMD_FLAG_DF, 0, 512, &[], EINVAL);
        expect(&mut c, Cmd::Read, 1 << 15, 0, 512, &[], EINVAL);
        expect(&mut c, Cmd::Write, 0, size - 2, 4, b"abcd", ENOSPC);
        expect(&mut c, Cmd::Write, 0, u64::MAX - 1, 4, b"abcd", ENOSPC);
        expect(&mut c, Cmd::Write, proto::CMD_FLAG_REQ_ONE, 0, 4, b"abcd", EINVAL);
        expect(&mut c, Cmd::Write, proto::CMD_FLAG_NO_HOLE, 0, 4, b"abcd", EINVAL);
        expect(&mut c, Cmd::Trim, 0, size, 1, &[], EINVAL);
        expect(&mut c, Cmd::WriteZeroes, 0, size - 1, 2, &[], ENOSPC);
        expect(&mut c, Cmd::WriteZeroes, proto::CMD_FLAG_FAST_ZERO, 0, 2, &[], EINVAL);
        expect(&mut c, Cmd::BlockStatus, 0, 0, 4096, &[], EINVAL); // no context selected
                                                                   // A write over the maximum payload: the payload is skipped, EINVAL.
        let big = vec![0xeeu8; (1 << 25) + 4096];
        expect(&mut c, Cmd::Write, 0, 0, big.len() as u32, &big, EINVAL);
        // Zero-length requests succeed and do nothing.
        expect(&mut c, Cmd::Write, 0, 0, 0, &[], 0);
        expect(&mut c, Cmd::Trim, 0, 0, 0, &[], 0);
        // The connection still works.
        c.request(Cmd::Read, 0, 1, 0, 0);
        if structured {
            let chunks = c.chunks();
            assert!(
                matches!(
                    chunks[..],
                    [Reply::Chunk {
                        kind: proto::REPLY_TYPE_NONE,
                        ..
                    }]
                ),
                "{chunks:?}"
            );
        } else {
            assert_eq!(c.reply(0).0, Reply::Simple { error: 0, cookie: 1 });
        }
        c.request(Cmd::Disc, 0, 2, 0, 0);
        assert!(c.closed(), "no reply to DISC, then closed");
    }
    // Read-only export: no SEND_FLUSH or SEND_FUA, so FLUSH and FUA are EINVAL.
    let mut c = Raw::handshake(addr);
    c.go("ro", true, &[]);
    c.request(Cmd::Flush, 0, 1, 0, 0);
    assert_eq!(c.reply(0).0.error(), EINVAL);
    c.request(Cmd::Read, proto::CMD_FLAG_FUA, 2, 0, 512);
    assert_eq!(c.reply(0).0.error(), EINVAL);
    c.request(Cmd::Write, 0, 3, 0, 1);
    c.send(b"x");
    assert_eq!(c.reply(0).0.error(), EPERM);
    // Minimum block size 512: unaligned requests are EINVAL.
    let mut c = Raw::handshake(addr);
    c.go("small", true, &[]);
    c.request(Cmd::Read, 0, 1, 100, 512);
    assert_eq!(c.reply(0).0.error(), EINVAL);
    c.request(Cmd::Write, 0, 2, 512, 100);
    c.send(&[1; 100]);
    assert_eq!(c.reply(0).0.error(), EINVAL);
    c.request(Cmd::Read, 0, 3, 512, 512);
    assert!(c.structured_read(512, 512).is_ok());
    assert!(contents(&exports, "small").iter().all(|&b| b == 0));

    assert_alive_and_intact(addr, &exports, &before);
}

#[test]
fn framing_errors_and_disconnects_in_transmission() {
    let (server, exports) = start();
    let addr = tcp_addr(&server);
    let before = contents(&exports, "disk");
    // Bad request magic: closed.
    let mut c = Raw::handshake(addr);
    c.go("disk", true, &[]);
    let mut req = nbd::Request {
        flags: 0,
        command: Cmd::Read,
        cookie: 1,
        offset: 0,
        length: 512,
    }
    .encode();
    req[3] ^= 0xff;
    c.send(&req);
    assert!(c.closed());
    // A truncated request header, then the client leaves.
    let mut c = Raw::handshake(addr);
    c.go("disk", true, &[]);
    c.send(&req[..10]);
    drop(c);
    // A write whose payload is cut short: nothing of it is written.
    let mut c = Raw::handshake(addr);
    c.go("disk", false, &[]);
    c.request(Cmd::Write, 0, 1, 0, 65536);
    c.send(&[0xee; 1000]);
    c.s.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(c.closed());
    // The client leaves in the middle of a 32 MiB reply.
    for structured in [true, false] {
        let mut c = Raw::handshake(addr);
        c.go("disk", structured, &[]);
        for cookie in 0..4 {
            c.request(Cmd::Read, 0, cookie, 0, 1 << 24);
        }
        c.read_n(100);
        drop(c);
    }
    // The server let go of all those connections.
    for _ in 0..200 {
        if server.connections() == 0 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(server.connections(), 0);
    assert_alive_and_intact(addr, &exports, &before);
}

#[test]
fn block_status_replies() {
    let (server, exports) = start();
    let disk = exports.get("disk").unwrap();
    let bm = format!("qemu:dirty-bitmap:{BITMAP}");
    let mut c = Raw::handshake(tcp_addr(&server));
    let (size, _, ids) = c.go("disk", true, &["base:allocation", &bm]);
    assert_eq!(ids.len(), 2);
    // The whole export: one chunk per context, extents as the backend has them.
    c.request(Cmd::BlockStatus, 0, 1, 0, size as u32);
    let chunks = c.block_status().unwrap();
    assert_eq!(chunks.iter().map(|(id, _)| *id).collect::<Vec<_>>(), [1, 2]);
    let as_runs = |ext: &[(u32, u32)]| {
        let mut off = 0;
        ext.iter()
            .map(|&(len, flags)| {
                off += u64::from(len);
                (off - u64::from(len), u64::from(len), flags & 1 == 1)
            })
            .collect::<Vec<_>>()
    };
    let holes: Vec<bool> = disk.allocation().iter().map(|a| !a).collect();
    assert_eq!(as_runs(&chunks[0].1), runs(&holes, GRAN, SIZE));
    assert_eq!(as_runs(&chunks[1].1), runs(&disk.bitmap(BITMAP).unwrap(), GRAN, SIZE));
    // Clipped to the request: 100 bytes inside a long data extent.
    c.request(Cmd::BlockStatus, 0, 2, 1000, 100);
    let chunks = c.block_status().unwrap();
    assert_eq!(chunks[0].1, [(100, 0)]);
    // REQ_ONE: exactly one extent per context, no longer than asked.
    c.request(Cmd::BlockStatus, proto::CMD_FLAG_REQ_ONE, 3, 3 * MIB, (2 * MIB) as u32);
    let chunks = c.block_status().unwrap();
    assert_eq!(chunks[0].1, [(MIB as u32, 0)]); // data to 4 MiB, then a hole
    assert_eq!(chunks[1].1.len(), 1);
    // Up to the end of the export; past it is EINVAL, as is length 0.
    c.request(Cmd::BlockStatus, 0, 4, size - 4096, 4096);
    assert_eq!(c.block_status().unwrap()[0].1.iter().map(|e| e.0).sum::<u32>(), 4096);
    c.request(Cmd::BlockStatus, 0, 5, size - 4096, 4097);
    assert_eq!(c.block_status(), Err(EINVAL));
    c.request(Cmd::BlockStatus, 0, 6, 0, 0);
    assert_eq!(c.block_status(), Err(EINVAL));
}
