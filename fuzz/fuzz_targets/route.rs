//! Routing by request path, which any client chooses: no panic, and a
//! routed name is part of the path.
#![no_main]

use libfuzzer_sys::fuzz_target;
use minimesh_sidecar::route::upstream_for;

fuzz_target!(|path: &str| {
    for default in [None, Some("user")] {
        if let Some(name) = upstream_for(path, default) {
            assert!(Some(name) == default || path.contains(name), "{path:?} → {name:?}");
        }
    }
    let _ = minimesh_sidecar::metrics::CallName::of(path);
});
