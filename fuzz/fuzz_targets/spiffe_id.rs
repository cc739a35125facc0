//! SPIFFE ids from text and from certificates (DER off the wire): no panic,
//! and an id that parses prints back to the same text.
#![no_main]

use libfuzzer_sys::fuzz_target;
use minimesh_spiffe::{SpiffeId, spiffe_id_of};

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(id) = text.parse::<SpiffeId>()
    {
        assert_eq!(id.to_string(), text);
    }
    let _ = spiffe_id_of(data);
    let _ = minimesh_spiffe::not_after_unix(data);
});
