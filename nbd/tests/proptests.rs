//! Property tests: the parsers take any bytes without panicking and
//! round-trip what a client encodes; a session and a whole connection fed
//! arbitrary requests never panic, always answer well-formed replies with
//! the right cookie, and agree with a model of the export's contents.

use std::io::Cursor;
use std::sync::Arc;

use nbd::proto::{self, ClientOption, InfoRequest, MetaRequest, OptionHeader};
use nbd::{Command, Export, Limits, MemoryExport, MemoryExports, Outcome, Request, Session};
use proptest::prelude::*;

const SIZE: u64 = 1 << 20;
const MAX_PAYLOAD: u32 = 1 << 16;

fn name() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9 /:._-]{0,40}"
}

fn query() -> impl Strategy<Value = String> {
    ("[a-z]{1,8}", "[a-zA-Z0-9 /:._-]{0,40}").prop_map(|(ns, leaf)| format!("{ns}:{leaf}"))
}

fn option() -> impl Strategy<Value = ClientOption> {
    prop_oneof![
        name().prop_map(ClientOption::ExportName),
        Just(ClientOption::Abort),
        Just(ClientOption::List),
        Just(ClientOption::StructuredReply),
        (name(), prop::collection::vec(any::<u16>(), 0..8))
            .prop_map(|(name, requests)| ClientOption::Info(InfoRequest { name, requests })),
        (name(), prop::collection::vec(any::<u16>(), 0..8))
            .prop_map(|(name, requests)| ClientOption::Go(InfoRequest { name, requests })),
        (name(), prop::collection::vec(query(), 0..6))
            .prop_map(|(export, queries)| ClientOption::ListMetaContext(MetaRequest { export, queries })),
        (name(), prop::collection::vec(query(), 0..6))
            .prop_map(|(export, queries)| ClientOption::SetMetaContext(MetaRequest { export, queries })),
        (11u32..1000).prop_map(ClientOption::Unsupported),
    ]
}

/// Offsets and lengths biased to the interesting places: 0, the end, the
/// limits, overflow.
fn offset() -> impl Strategy<Value = u64> {
    prop_oneof![
        0..SIZE,
        Just(0),
        Just(SIZE),
        SIZE - 4096..SIZE + 4096,
        any::<u64>(),
        Just(u64::MAX)
    ]
}

fn length() -> impl Strategy<Value = u32> {
    prop_oneof![
        0u32..8192,
        Just(0),
        Just(MAX_PAYLOAD),
        Just(MAX_PAYLOAD + 1),
        any::<u32>(),
        0..SIZE as u32
    ]
}

fn request() -> impl Strategy<Value = Request> {
    let command = prop_oneof![
        (0u16..9).prop_map(Command::from_code),
        any::<u16>().prop_map(Command::from_code)
    ];
    let flags = prop_oneof![Just(0u16), 0u16..64, any::<u16>()];
    (flags, command, any::<u64>(), offset(), length()).prop_map(|(flags, command, cookie, offset, length)| Request {
        flags,
        command,
        cookie,
        offset,
        length,
    })
}

/// Checks a reply to `req` and returns (error, data read).
fn check_reply(head: &[u8], data: &[u8], req: &Request, structured: bool) -> (u32, Vec<u8>) {
    let magic = u32::from_be_bytes(head[..4].try_into().unwrap());
    if magic == proto::SIMPLE_REPLY_MAGIC {
        assert_eq!(head.len(), proto::SIMPLE_REPLY_LEN);
        let error = u32::from_be_bytes(head[4..8].try_into().unwrap());
        assert_eq!(u64::from_be_bytes(head[8..16].try_into().unwrap()), req.cookie);
        assert!(
            !(structured && req.command == Command::Read),
            "structured read got a simple reply"
        );
        if error != 0 || req.command != Command::Read {
            assert!(data.is_empty());
        } else {
            assert_eq!(data.len(), req.length as usize);
        }
        return (error, data.to_vec());
    }
    assert!(structured, "structured chunk without negotiation");
    let mut rest = head;
    let mut error = 0;
    let mut read = Vec::new();
    loop {
        assert!(rest.len() >= proto::CHUNK_HEADER_LEN);
        assert_eq!(
            u32::from_be_bytes(rest[..4].try_into().unwrap()),
            proto::STRUCTURED_REPLY_MAGIC
        );
        let flags = u16::from_be_bytes(rest[4..6].try_into().unwrap());
        let kind = u16::from_be_bytes(rest[6..8].try_into().unwrap());
        assert_eq!(u64::from_be_bytes(rest[8..16].try_into().unwrap()), req.cookie);
        let len = u32::from_be_bytes(rest[16..20].try_into().unwrap()) as usize;
        rest = &rest[proto::CHUNK_HEADER_LEN..];
        let done = flags & proto::REPLY_FLAG_DONE != 0;
        match kind {
            proto::REPLY_TYPE_OFFSET_DATA => {
                // Header then offset in `head`; the data is separate.
                assert_eq!(rest.len(), 8);
                assert_eq!(u64::from_be_bytes(rest[..8].try_into().unwrap()), req.offset);
                assert_eq!(len, 8 + data.len());
                assert!(done && !data.is_empty());
                return (0, data.to_vec());
            }
            proto::REPLY_TYPE_NONE => assert!(len == 0 && done),
            proto::REPLY_TYPE_ERROR => {
                error = u32::from_be_bytes(rest[..4].try_into().unwrap());
                assert_ne!(error, 0);
                assert_eq!(u16::from_be_bytes(rest[4..6].try_into().unwrap()) as usize + 6, len);
            }
            proto::REPLY_TYPE_BLOCK_STATUS => {
                assert_eq!(req.command, Command::BlockStatus);
                assert!(len >= 12 && (len - 4).is_multiple_of(8));
                let sum: u64 = rest[4..len]
                    .chunks(8)
                    .map(|e| {
                        let l = u32::from_be_bytes(e[..4].try_into().unwrap());
                        assert!(l > 0);
                        u64::from(l)
                    })
                    .sum();
                assert!(sum <= u64::from(req.length));
                if req.flags & proto::CMD_FLAG_REQ_ONE != 0 {
                    assert_eq!(len, 12);
                }
            }
            other => panic!("unexpected chunk type {other}"),
        }
        rest = &rest[len..];
        if done {
            assert!(rest.is_empty(), "bytes after the final chunk");
            assert!(read.is_empty());
            read.clear();
            return (error, read);
        }
    }
}

fn exports(read_only: bool) -> (Arc<MemoryExports>, Arc<MemoryExport>) {
    let e = MemoryExport::new(SIZE, 4096);
    e.write(0, &vec![0x11; 100_000]).unwrap();
    e.add_bitmap("b/1");
    e.write(200_000, &[0x22; 5000]).unwrap();
    let e = Arc::new(if read_only { e.read_only() } else { e });
    let exports = Arc::new(MemoryExports::new());
    exports.insert("d", e.clone());
    (exports, e)
}

proptest! {
    #[test]
    fn option_parser_takes_any_bytes(code in prop_oneof![0u32..12, any::<u32>()],
                                     data in prop::collection::vec(any::<u8>(), 0..200)) {
        let _ = ClientOption::parse(code, &data);
    }

    #[test]
    fn options_round_trip(opt in option()) {
        let bytes = opt.encode();
        let header = OptionHeader::parse(bytes[..16].try_into().unwrap()).unwrap();
        prop_assert_eq!(header.length as usize, bytes.len() - 16);
        prop_assert_eq!(ClientOption::parse(header.option, &bytes[16..]).unwrap(), opt);
    }

    #[test]
    fn request_parser_takes_any_bytes(b in prop::array::uniform28(any::<u8>())) {
        if let Ok(req) = Request::parse(&b) {
            prop_assert_eq!(req.encode(), b);
        }
    }

    #[test]
    fn requests_round_trip(req in request()) {
        prop_assert_eq!(Request::parse(&req.encode()).unwrap(), req);
    }

    /// A session fed arbitrary requests: well-formed replies, the right
    /// cookie, reads that match a model of the contents, and a read-only
    /// export that never changes.
    #[test]
    fn session_agrees_with_a_model(reqs in prop::collection::vec(request(), 1..40),
                                   structured in any::<bool>(), read_only in any::<bool>(),
                                   with_contexts in any::<bool>()) {
        let (_, export) = exports(read_only);
        let mut model = export.contents();
        let contexts = if with_contexts && structured {
            vec!["base:allocation".to_string(), "qemu:dirty-bitmap:b/1".to_string()]
        } else {
            vec![]
        };
        let mut s = Session::new(export.clone(), structured, contexts, MAX_PAYLOAD);
        for req in reqs {
            let len = req.payload_len();
            let payload: Vec<u8> = (0..len.min(MAX_PAYLOAD)).map(|i| (i as u8) ^ (req.cookie as u8)).collect();
            if len > s.max_payload() {
                s.reject_oversized(&req);
            } else if s.handle(&req, &payload) == Outcome::Disconnect {
                prop_assert_eq!(req.command, Command::Disc);
                continue;
            }
            let (head, data) = s.reply();
            let (error, read) = check_reply(head, data, &req, structured);
            let in_range = req.offset.checked_add(u64::from(req.length)).is_some_and(|e| e <= SIZE);
            if error == 0 {
                let r = || req.offset as usize..req.offset as usize + req.length as usize;
                match req.command {
                    Command::Read => { prop_assert!(in_range); prop_assert!(read == model[r()]); }
                    Command::Write => { prop_assert!(!read_only && in_range); model[r()].copy_from_slice(&payload); }
                    Command::WriteZeroes | Command::Trim => { prop_assert!(!read_only && in_range); model[r()].fill(0); }
                    _ => {}
                }
            }
        }
        prop_assert!(export.contents() == model);
    }

    /// A whole connection from arbitrary frames: never a panic, and a
    /// read-only export never changes.
    #[test]
    fn connection_takes_arbitrary_frames(opts in prop::collection::vec(option(), 0..6),
                                         garbage in prop::collection::vec(any::<u8>(), 0..64),
                                         reqs in prop::collection::vec(request(), 0..20),
                                         flags in prop_oneof![0u32..4, any::<u32>()]) {
        let (exports, export) = exports(true);
        let before = export.contents();
        let mut input = flags.to_be_bytes().to_vec();
        for o in &opts {
            input.extend_from_slice(&o.encode());
        }
        input.extend_from_slice(&ClientOption::StructuredReply.encode());
        input.extend_from_slice(&ClientOption::SetMetaContext(MetaRequest {
            export: "d".into(), queries: vec!["base:allocation".into()] }).encode());
        input.extend_from_slice(&ClientOption::Go(InfoRequest { name: "d".into(), requests: vec![] }).encode());
        for r in &reqs {
            input.extend_from_slice(&r.encode());
            input.extend(std::iter::repeat_n(0xab, r.payload_len().min(10_000) as usize));
        }
        input.extend_from_slice(&garbage);
        let mut reader = Cursor::new(input);
        let mut out = Vec::new();
        let limits = Limits { max_payload: MAX_PAYLOAD, max_option_data: 4096 };
        let _ = nbd::serve_connection(exports, limits, &mut reader, &mut out);
        prop_assert!(out.starts_with(b"NBDMAGICIHAVEOPT"));
        prop_assert!(export.contents() == before);
    }

    /// Pure noise after the greeting: never a panic.
    #[test]
    fn connection_takes_noise(noise in prop::collection::vec(any::<u8>(), 0..512)) {
        let (exports, _) = exports(false);
        let mut out = Vec::new();
        let _ = nbd::serve_connection(exports, Limits::default(), &mut Cursor::new(noise), &mut out);
    }
}
