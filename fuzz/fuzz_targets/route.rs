//! Routing by `:authority` and path, which any client chooses: no panic,
//! and a routed name is a configured upstream.
#![no_main]

use libfuzzer_sys::fuzz_target;
use minimesh_sidecar::route::Routes;

const UPSTREAMS: [&str; 3] = ["user", "order", "payment"];

fuzz_target!(|input: (&str, &str)| {
    let (authority, path) = input;
    let routes = Routes::new([
        ("shop.payment.".to_owned(), "payment".to_owned()),
        ("shop.order.".to_owned(), "order".to_owned()),
    ]);
    for default in [None, Some("user")] {
        if let Some((name, _)) =
            routes.resolve(Some(authority), path, |n| UPSTREAMS.contains(&n), default)
        {
            assert!(
                UPSTREAMS.contains(&name),
                "{authority:?} {path:?} → {name:?}"
            );
        }
    }
    let _ = minimesh_sidecar::metrics::CallName::of(path);
});
