//! gRPC message framing as the proxies read it (5-byte prefixes), fed in
//! arbitrary splits: the count never depends on how the bytes were split.
#![no_main]

use libfuzzer_sys::fuzz_target;
use minimesh_telemetry::trace::GrpcFrames;

fuzz_target!(|input: (Vec<u8>, Vec<u8>)| {
    let (data, cuts) = input;
    let mut whole = GrpcFrames::default();
    whole.feed(&data);
    let mut split = GrpcFrames::default();
    let mut rest: &[u8] = &data;
    for cut in cuts {
        let at = usize::from(cut).min(rest.len());
        split.feed(&rest[..at]);
        rest = &rest[at..];
    }
    split.feed(rest);
    assert_eq!(whole.messages(), split.messages());
});
