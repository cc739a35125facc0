//! The sidecar's config file (YAML or JSON): any text is an error or a
//! config, never a panic, and the traffic policy derived from it is sane.
#![no_main]

use libfuzzer_sys::fuzz_target;
use minimesh_sidecar::config::{FileConfig, TrafficArgs};

fuzz_target!(|text: &str| {
    let Ok(file) = FileConfig::parse(text) else {
        return;
    };
    let flags = TrafficArgs::default();
    let _ = flags.policy(&file);
    let _ = flags.upstreams(&file);
});
