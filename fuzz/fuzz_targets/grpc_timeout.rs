//! `grpc-timeout` as any client may send it: parsing never panics, and
//! whatever parses formats back to a value that parses to at least as long.
#![no_main]

use libfuzzer_sys::fuzz_target;
use minimesh_traffic::deadline::{format, parse};

fuzz_target!(|data: &[u8]| {
    let Ok(value) = http::HeaderValue::from_bytes(data) else {
        return;
    };
    if let Some(timeout) = parse(&value) {
        let back = parse(&format(timeout)).expect("a formatted timeout parses");
        assert!(back >= timeout, "{timeout:?} came back as {back:?}");
    }
    let mut headers = http::HeaderMap::new();
    headers.insert("grpc-timeout", value);
    let _ = minimesh_traffic::deadline::Deadline::try_from_headers(&headers);
});
