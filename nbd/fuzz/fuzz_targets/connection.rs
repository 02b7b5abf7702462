//! A whole connection over an in-memory stream against an in-memory export.
//! The first byte picks raw noise, or a valid handshake into transmission
//! followed by the fuzz input as the request stream (raw, or cut into
//! 26-byte request bodies that the harness frames with the magic and a
//! write's payload). A read-only export must never change.
#![no_main]

use std::io::Cursor;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use nbd::proto::{ClientOption, InfoRequest, MetaRequest};
use nbd::{Export, Limits, MemoryExport, MemoryExports};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let export = MemoryExport::new(1 << 16, 4096);
    export.write(0, &[0x11; 10_000]).unwrap();
    export.add_bitmap("b/1");
    export.write(50_000, &[0x22; 10_000]).unwrap();
    let export = Arc::new(if mode & 2 != 0 { export.read_only() } else { export });
    let before = export.contents();
    let exports = Arc::new(MemoryExports::new());
    exports.insert("d", export.clone());
    let mut input = Vec::new();
    if mode & 1 != 0 {
        input.extend_from_slice(&3u32.to_be_bytes());
        if mode & 4 != 0 {
            input.extend_from_slice(&ClientOption::StructuredReply.encode());
            let queries = vec!["base:allocation".into(), "qemu:dirty-bitmap:b/1".into()];
            input.extend_from_slice(&ClientOption::SetMetaContext(MetaRequest { export: "d".into(), queries }).encode());
        }
        input.extend_from_slice(&ClientOption::Go(InfoRequest { name: "d".into(), requests: vec![] }).encode());
    }
    if mode & 8 != 0 {
        for body in rest.chunks_exact(26) {
            input.extend_from_slice(&nbd::proto::REQUEST_MAGIC.to_be_bytes());
            input.extend_from_slice(body);
            let len = u32::from_be_bytes([body[22], body[23], body[24], body[25]]);
            if u16::from_be_bytes([body[2], body[3]]) == nbd::proto::CMD_WRITE {
                input.extend(std::iter::repeat_n(0xab, len.min(1 << 13) as usize));
            }
        }
    } else {
        input.extend_from_slice(rest);
    }
    let limits = Limits { max_payload: 1 << 12, max_option_data: 4096 };
    let mut out = Vec::new();
    let _ = nbd::serve_connection(exports, limits, &mut Cursor::new(input), &mut out);
    if export.is_read_only() {
        assert!(export.contents() == before);
    }
});
