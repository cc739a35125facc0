//! Traffic management through real processes: balancing across payment
//! replicas, avoiding a slow one, surviving a killed one without failed or
//! duplicated orders, and failing fast within the retry budget when all are
//! down. The scenarios whose outcome depends on the store (replicas sharing
//! it, a killed replica's charges) run on SQLite and on PostgreSQL.

mod common;

use common::backend::Backend;
use common::process::*;
use common::*;
use minimesh_proto::order::v1::OrderStatus;
use minimesh_proto::order::v1::order_service_client::OrderServiceClient;
use minimesh_proto::user::v1::user_service_client::UserServiceClient;
use minimesh_testsupport::metrics::sum;
use minimesh_testsupport::{eventually, metrics_text};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tonic::transport::Channel;

const CLIENTS: usize = 16;

/// Charge calls each payment replica's sidecar received.
async fn charges_per_replica(mesh: &Mesh) -> Vec<f64> {
    let mut out = Vec::new();
    for instance in mesh.instances("payment") {
        let text = metrics_text(instance["admin"].as_str().unwrap())
            .await
            .unwrap();
        out.push(sum(
            &text,
            "minimesh_requests_total",
            &["direction=\"inbound\"", "method=\"Charge\""],
        ));
    }
    out
}

/// Places `total` orders from `CLIENTS` concurrent clients; returns the orders.
async fn place_many(
    channel: Channel,
    user_id: &str,
    total: usize,
    progress: Arc<AtomicUsize>,
) -> Vec<Result<minimesh_proto::order::v1::Order, tonic::Status>> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..CLIENTS {
        let (channel, next, progress) = (channel.clone(), next.clone(), progress.clone());
        let user_id = user_id.to_owned();
        workers.push(tokio::spawn(async move {
            let mut client = OrderServiceClient::new(channel);
            let mut results = Vec::new();
            while next.fetch_add(1, Ordering::Relaxed) < total {
                let request = order_request(&user_id, vec![item("widget", 1, 999)]);
                results.push(client.create_order(request).await.map(|r| r.into_inner()));
                progress.fetch_add(1, Ordering::Relaxed);
            }
            results
        }));
    }
    let mut all = Vec::new();
    for worker in workers {
        all.extend(worker.await.unwrap());
    }
    all
}

async fn setup(mesh: &Mesh) -> (Channel, String) {
    let channel = tonic::transport::Endpoint::from_shared(mesh.gateway_url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut users = UserServiceClient::new(channel.clone());
    let buyer = new_user(&mut users).await;
    (channel, buyer.id)
}

#[tokio::test]
async fn orders_spread_evenly_over_three_payment_replicas() {
    spread_evenly(Backend::Sqlite).await;
}

#[tokio::test]
async fn orders_spread_evenly_over_three_payment_replicas_on_postgres() {
    if let Some(backend) = Backend::postgres().await {
        spread_evenly(backend).await;
    }
}

async fn spread_evenly(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let mesh = backend
        .start_mesh(
            dir.path(),
            &["--replicas", "payment=3", "--fulfilment-step", "1h"],
            &[],
        )
        .await;
    let (channel, user) = setup(&mesh).await;
    let results = place_many(channel, &user, 3000, Arc::new(AtomicUsize::new(0))).await;
    assert!(results.iter().all(|r| r.is_ok()));
    let counts = charges_per_replica(&mesh).await;
    let total: f64 = counts.iter().sum();
    assert_eq!(total, 3000.0, "{counts:?}");
    for count in &counts {
        assert!(
            (850.0..=1150.0).contains(count),
            "each replica within ±15% of 1000: {counts:?}"
        );
    }
    assert!(mesh.terminate().await.success());
}

#[tokio::test]
async fn a_slow_replica_gets_clearly_less_traffic() {
    let dir = tempfile::tempdir().unwrap();
    let mesh = start_mesh(
        dir.path(),
        &[
            "--replicas",
            "payment=3",
            "--fulfilment-step",
            "1h",
            "--debug-delay",
            "payment-1=50ms",
        ],
    )
    .await;
    let (channel, user) = setup(&mesh).await;
    let results = place_many(channel, &user, 1000, Arc::new(AtomicUsize::new(0))).await;
    assert!(results.iter().all(|r| r.is_ok()));
    let counts = charges_per_replica(&mesh).await;
    let total: f64 = counts.iter().sum();
    let slow_share = counts[1] / total;
    eprintln!("charges per replica {counts:?}; slow replica share {slow_share:.3}");
    assert!(
        slow_share < 0.20,
        "the slow replica got {slow_share:.3} of {total} calls: {counts:?}"
    );
    assert!(mesh.terminate().await.success());
}

async fn payments_per_order(
    backend: &Backend,
    dir: &std::path::Path,
) -> std::collections::HashMap<String, i64> {
    backend
        .rows(
            dir,
            "payment",
            "SELECT order_id, count(*) FROM payments GROUP BY order_id",
            &[],
        )
        .await
        .into_iter()
        .map(|row| (row[0].clone(), row[1].parse().unwrap()))
        .collect()
}

/// 16 clients place 2000 orders; one payment replica's `victim` process is
/// killed with SIGKILL part-way through.
async fn survive_kill(backend: Backend, victim: &str) {
    let dir = tempfile::tempdir().unwrap();
    // A long restart delay keeps the dead replica dead for most of the run.
    let mesh = backend
        .start_mesh(
            dir.path(),
            &[
                "--replicas",
                "payment=3",
                "--fulfilment-step",
                "1h",
                "--restart-delay",
                "5s",
            ],
            &[],
        )
        .await;
    let (channel, user) = setup(&mesh).await;
    let pid = mesh.instances("payment")[1][victim].as_i64().unwrap();
    let progress = Arc::new(AtomicUsize::new(0));
    let counter = progress.clone();
    let orders = tokio::spawn(async move { place_many(channel, &user, 2000, counter).await });
    eventually(Duration::from_secs(60), "some orders placed", || {
        let done = progress.load(Ordering::Relaxed);
        async move { (done >= 300).then_some(()) }
    })
    .await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let results = orders.await.unwrap();

    let failed: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failed.is_empty(),
        "{} of 2000 CreateOrder calls failed, e.g. {:?}",
        failed.len(),
        failed.first()
    );
    let placed: Vec<_> = results.into_iter().map(|r| r.unwrap()).collect();
    assert!(placed.iter().all(|o| o.status == OrderStatus::Paid as i32));
    let payments = payments_per_order(&backend, dir.path()).await;
    for order in &placed {
        assert_eq!(
            payments.get(&order.id),
            Some(&1),
            "order {} must have exactly one payment",
            order.id
        );
    }
    let order_sidecar = metrics_text(mesh.instances("order")[0]["admin"].as_str().unwrap())
        .await
        .unwrap();
    let ejections = sum(
        &order_sidecar,
        "minimesh_endpoint_ejections_total",
        &["service=\"payment\""],
    );
    assert!(
        ejections >= 1.0,
        "the dead endpoint is ejected:\n{order_sidecar}"
    );
    assert!(mesh.terminate().await.success());
}

#[tokio::test]
async fn killing_a_payment_service_loses_and_duplicates_nothing() {
    survive_kill(Backend::Sqlite, "pid").await;
}

#[tokio::test]
async fn killing_a_payment_sidecar_loses_and_duplicates_nothing() {
    survive_kill(Backend::Sqlite, "sidecar_pid").await;
}

#[tokio::test]
async fn killing_a_payment_service_loses_and_duplicates_nothing_on_postgres() {
    if let Some(backend) = Backend::postgres().await {
        survive_kill(backend, "pid").await;
    }
}

#[tokio::test]
async fn killing_a_payment_sidecar_loses_and_duplicates_nothing_on_postgres() {
    if let Some(backend) = Backend::postgres().await {
        survive_kill(backend, "sidecar_pid").await;
    }
}

#[tokio::test]
async fn with_every_payment_replica_down_calls_fail_fast_within_the_budget() {
    // Stated bound: a CreateOrder whose payment cannot be reached answers within 1 s.
    const BOUND: Duration = Duration::from_secs(1);
    let dir = tempfile::tempdir().unwrap();
    let mesh = start_mesh(
        dir.path(),
        &[
            "--replicas",
            "payment=2",
            "--fulfilment-step",
            "1h",
            "--restart-delay",
            "1h",
        ],
    )
    .await;
    let (channel, user) = setup(&mesh).await;
    for instance in mesh.instances("payment") {
        let pid = instance["pid"].as_i64().unwrap();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
    }
    for instance in mesh.instances("payment") {
        let pid = instance["pid"].as_i64().unwrap();
        eventually(
            Duration::from_secs(10),
            "payment process gone",
            || async move { (!process_alive(pid)).then_some(()) },
        )
        .await;
    }
    let started = Instant::now();
    let mut orders = OrderServiceClient::new(channel);
    let mut slowest = Duration::ZERO;
    for _ in 0..50 {
        let call = Instant::now();
        // The charge outcome is unknown: the order is answered PENDING (never
        // a retryable error, CONTRACT §2) and settled once payment is back.
        let order = orders
            .create_order(order_request(&user, vec![item("widget", 1, 999)]))
            .await
            .unwrap()
            .into_inner();
        slowest = slowest.max(call.elapsed());
        assert_eq!(order.status, OrderStatus::Pending as i32, "{order:?}");
    }
    let elapsed = started.elapsed();
    assert!(slowest < BOUND, "slowest failing call took {slowest:?}");

    // Attempts that reached the payment sidecars vs the calls order made.
    let order_sidecar = metrics_text(mesh.instances("order")[0]["admin"].as_str().unwrap())
        .await
        .unwrap();
    let calls = sum(
        &order_sidecar,
        "minimesh_requests_total",
        &["direction=\"outbound\"", "method=\"Charge\""],
    );
    let retries = sum(
        &order_sidecar,
        "minimesh_retries_total",
        &["service=\"payment\""],
    );
    let attempts: f64 = charges_per_replica(&mesh).await.iter().sum();
    eprintln!(
        "charge calls {calls}, retries {retries}, attempts at payment sidecars {attempts}, over {elapsed:?}"
    );
    assert!(calls >= 50.0);
    // Budget: 20% of calls plus 10/s (with its 10 s reserve) over the run.
    let budget = 0.2 * calls + 10.0 * (elapsed.as_secs_f64() + 10.0);
    assert!(
        retries <= budget,
        "retries {retries} exceed the budget {budget}"
    );
    assert!(
        attempts <= calls + retries,
        "no attempt beyond the call and its budgeted retries"
    );
    assert!(
        attempts < 2.0 * calls,
        "no retry storm: {attempts} attempts for {calls} calls"
    );
    assert!(mesh.terminate().await.success());
}
