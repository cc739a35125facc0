//! The load generator against the echo backend on a loopback port: every
//! kind of call is counted, and failures are counted by status, not hidden.

use minimesh_bench::load::{Call, Workload, run};
use minimesh_testsupport::grpc::serve_health;
use minimesh_testsupport::{free_addr, loopback_listener};
use std::time::Duration;

async fn backend() -> String {
    let (listener, url) = loopback_listener().await.unwrap();
    tokio::spawn(minimesh_bench::backend::serve(listener));
    url
}

fn workload(call: Call, concurrency: usize, rate: Option<f64>) -> Workload {
    Workload {
        call,
        payload: 100,
        concurrency,
        connections: 1,
        rate,
        duration: Duration::from_millis(300),
        count: None,
    }
}

#[tokio::test]
async fn every_call_kind_is_counted_without_errors() {
    let target = backend().await;
    for (call, concurrency, rate) in [
        (Call::Unary, 1, None),
        (Call::Unary, 8, None),
        (Call::Unary, 1, Some(200.0)),
        (Call::ServerStream, 2, None),
        (Call::Bidi, 2, None),
    ] {
        let report = run(&target, &workload(call, concurrency, rate))
            .await
            .unwrap();
        assert!(report.ok > 0, "{call:?}: nothing counted");
        assert!(report.errors.is_empty(), "{call:?}: {:?}", report.errors);
        assert!(report.per_second > 0.0);
        if call == Call::Unary {
            let latency = report.latency.expect("unary calls have latencies");
            assert!(latency.p50_us <= latency.p99_us && latency.p99_us <= latency.max_us);
        }
    }
}

#[tokio::test]
async fn an_open_loop_run_starts_calls_on_schedule() {
    let target = backend().await;
    let report = run(
        &target,
        &Workload {
            duration: Duration::from_millis(500),
            ..workload(Call::Unary, 1, Some(100.0))
        },
    )
    .await
    .unwrap();
    // 100/s for half a second: 50 calls scheduled, all of which complete.
    assert_eq!(report.ok, 50, "{report:?}");
}

#[tokio::test]
async fn failures_are_counted_by_status() {
    // A gRPC server without the shop services: every call is UNIMPLEMENTED.
    let (listener, target) = loopback_listener().await.unwrap();
    let _health = serve_health(listener);
    let report = run(&target, &workload(Call::Unary, 2, None)).await.unwrap();
    assert_eq!(report.ok, 0);
    let unimplemented: u64 = report
        .errors
        .iter()
        .filter(|(k, _)| k.starts_with("Unimplemented"))
        .map(|(_, n)| n)
        .sum();
    assert!(unimplemented > 0, "{:?}", report.errors);

    // No server at all: the run cannot start, and says so.
    let dead = free_addr().unwrap();
    let err = run(&format!("http://{dead}"), &workload(Call::Unary, 1, None))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("cannot connect"), "{err}");
}

#[tokio::test]
async fn a_count_stops_the_run_at_exactly_that_many_calls() {
    let target = backend().await;
    let long = Duration::from_secs(60);
    for (concurrency, rate) in [(4, None), (1, Some(500.0))] {
        let report = run(
            &target,
            &Workload {
                duration: long,
                count: Some(37),
                ..workload(Call::Unary, concurrency, rate)
            },
        )
        .await
        .unwrap();
        assert_eq!(report.ok, 37, "c={concurrency} rate={rate:?}: {report:?}");
        assert!(report.errors.is_empty(), "{:?}", report.errors);
    }
    // Streams stop once that many messages have arrived (a few more may be in flight).
    for call in [Call::ServerStream, Call::Bidi] {
        let report = run(
            &target,
            &Workload {
                duration: long,
                count: Some(1000),
                ..workload(call, 2, None)
            },
        )
        .await
        .unwrap();
        assert!(report.ok >= 1000, "{call:?}: {report:?}");
        assert!(
            report.elapsed_s < long.as_secs_f64(),
            "{call:?} ran to the cap"
        );
    }
}

#[tokio::test]
async fn a_run_spread_over_connections_counts_every_call() {
    let target = backend().await;
    let report = run(
        &target,
        &Workload {
            duration: Duration::from_secs(60),
            count: Some(37),
            connections: 3,
            ..workload(Call::Unary, 4, None)
        },
    )
    .await
    .unwrap();
    assert_eq!(report.ok, 37, "{report:?}");
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert!(report.latency.is_some_and(|l| l.mean_us > 0.0));
}
