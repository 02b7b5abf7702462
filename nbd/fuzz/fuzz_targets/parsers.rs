//! The pure parsers: option data under every option code, request headers.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nbd::proto::{ClientOption, OptionHeader};
use nbd::Request;

fuzz_target!(|data: &[u8]| {
    if data.len() >= 4 {
        let code = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
        if let Ok(opt) = ClientOption::parse(code % 16, &data[4..]) {
            // What parses re-encodes to the same data.
            let bytes = opt.encode();
            if !matches!(opt, ClientOption::Abort | ClientOption::Unsupported(_)) {
                assert_eq!(&bytes[16..], &data[4..]);
            }
        }
    }
    if let Ok(h) = <&[u8; 16]>::try_from(data.get(..16).unwrap_or_default()) {
        let _ = OptionHeader::parse(h);
    }
    if let Ok(h) = <&[u8; 28]>::try_from(data.get(..28).unwrap_or_default()) {
        if let Ok(req) = Request::parse(h) {
            assert_eq!(&req.encode(), h);
        }
    }
});
