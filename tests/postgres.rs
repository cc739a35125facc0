//! `minimesh up --database-url`: every service keeps its data in one
//! PostgreSQL database (a schema each), so replicas on any host share it.
//! Each test runs its own PostgreSQL server (testing/pg).
//!
//! - replicas of order and payment give one order and one charge per
//!   idempotency key, and an order made on one replica is read and watched
//!   on another;
//! - a store that goes away (stopped, or frozen) for 5 s under load fails
//!   calls with UNAVAILABLE "store is down", turns the sidecars' /ready to
//!   503, and recovers by itself, leaving nothing half-written;
//! - a second `up` with a new data dir finds everything the first stored.

mod common;

use common::backend::Backend;
use common::process::*;
use common::*;
use minimesh_proto::order::v1::order_service_client::OrderServiceClient;
use minimesh_proto::order::v1::{
    CancelOrderRequest, CreateOrderRequest, GetOrderRequest, ListOrdersRequest, Order, OrderStatus,
    WatchOrderRequest,
};
use minimesh_proto::payment::v1::payment_service_client::PaymentServiceClient;
use minimesh_proto::payment::v1::{ChargeRequest, GetPaymentRequest, PaymentStatus};
use minimesh_proto::user::v1::user_service_client::UserServiceClient;
use minimesh_proto::user::v1::{GetUserRequest, ListUsersRequest, User};
use minimesh_testpg::PgServer;
use minimesh_testsupport::{eventually, http_get};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic::{Code, Request};

/// h2c clients of every replica of `service`, straight to the app (not the
/// sidecar), in mesh.json's order.
async fn replica_channels(mesh: &Mesh, service: &str) -> Vec<Channel> {
    let mut channels = Vec::new();
    for instance in mesh.instances(service) {
        let url = format!("http://{}", instance["app"].as_str().expect("app addr"));
        channels.push(
            tonic::transport::Endpoint::from_shared(url)
                .unwrap()
                .connect()
                .await
                .expect("connect to a replica"),
        );
    }
    channels
}

/// SQLite files in a data dir: with a database URL there must be none.
fn sqlite_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|name| name.ends_with(".db") || name.contains(".db-"))
        .collect()
}

/// Every status a watcher sees until the stream ends.
async fn watch_all(channel: Channel, id: String) -> Vec<i32> {
    let mut stream = OrderServiceClient::new(channel)
        .watch_order(WatchOrderRequest { id })
        .await
        .expect("watch")
        .into_inner();
    let mut seen = Vec::new();
    while let Some(event) = tokio::time::timeout(Duration::from_secs(30), stream.next())
        .await
        .expect("an event within 30 s")
    {
        seen.push(event.expect("stream ok").status);
    }
    seen
}

/// Done-when 2: with `--replicas user=2,order=2,payment=3` on one database,
/// an idempotency key means one order and one charge whichever replicas the
/// calls reach, and an order made on one replica is read and followed to
/// DELIVERED on the other.
#[tokio::test]
async fn replicas_on_one_database_act_as_one_service() {
    let Some(backend) = Backend::postgres().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mesh = backend
        .start_mesh(
            dir.path(),
            &[
                "--replicas",
                "user=2,order=2,payment=3",
                "--fulfilment-step",
                "1s",
            ],
            &[],
        )
        .await;
    assert_eq!(sqlite_files(dir.path()), Vec::<String>::new());
    let gateway = mesh.gateway_channel().await;
    let buyer = new_user(&mut UserServiceClient::new(gateway.clone())).await;
    let orders = replica_channels(&mesh, "order").await;
    let payments = replica_channels(&mesh, "payment").await;
    assert_eq!((orders.len(), payments.len()), (2, 3));

    // 20 CreateOrder calls with one key, released together, alternating replicas.
    let mut request = order_request(&buyer.id, vec![item("lamp", 1, 4500)]);
    request.idempotency_key = "one-lamp".into();
    let start = Arc::new(tokio::sync::Barrier::new(20));
    let mut calls = Vec::new();
    for n in 0..20 {
        let (channel, request, start) = (orders[n % 2].clone(), request.clone(), start.clone());
        calls.push(tokio::spawn(async move {
            start.wait().await;
            OrderServiceClient::new(channel)
                .create_order(request)
                .await
                .map(|r| r.into_inner())
        }));
    }
    let mut answered = BTreeSet::new();
    for call in calls {
        let order = call
            .await
            .unwrap()
            .expect("CreateOrder with a key succeeds");
        assert_eq!(order.status, OrderStatus::Paid as i32, "{order:?}");
        answered.insert(order.id);
    }
    assert_eq!(answered.len(), 1, "one key, one order: {answered:?}");
    let order_id = answered.into_iter().next().unwrap();
    let listed = OrderServiceClient::new(gateway.clone())
        .list_orders(ListOrdersRequest {
            user_id: buyer.id.clone(),
            page_size: 100,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        listed.orders.iter().map(|o| &o.id).collect::<Vec<_>>(),
        [&order_id]
    );
    let report = backend
        .settled_and_reconciled(dir.path(), Duration::from_secs(30))
        .await;
    assert_eq!(
        (&report["orders"], &report["payments"]),
        (&1.into(), &1.into()),
        "one order and one payment: {report}"
    );

    // Charge with one key over the three payment replicas: one payment.
    // (The app port is plain h2c on loopback; the sidecar would refuse any
    // caller but order.)
    let charge = ChargeRequest {
        order_id: "charged-directly".into(),
        user_id: buyer.id.clone(),
        amount_cents: 1200,
        currency: "EUR".into(),
        idempotency_key: "one-charge".into(),
    };
    let start = Arc::new(tokio::sync::Barrier::new(30));
    let mut calls = Vec::new();
    for n in 0..30 {
        let (channel, charge, start) = (payments[n % 3].clone(), charge.clone(), start.clone());
        calls.push(tokio::spawn(async move {
            start.wait().await;
            PaymentServiceClient::new(channel)
                .charge(charge)
                .await
                .map(|r| r.into_inner())
        }));
    }
    let mut charged = BTreeSet::new();
    for call in calls {
        let payment = call.await.unwrap().expect("Charge with a key succeeds");
        assert_eq!(payment.status, PaymentStatus::Captured as i32);
        charged.insert(payment.id);
    }
    assert_eq!(charged.len(), 1, "one key, one payment: {charged:?}");
    let payment_id = charged.into_iter().next().unwrap();
    for channel in &payments {
        let got = PaymentServiceClient::new(channel.clone())
            .get_payment(GetPaymentRequest {
                id: payment_id.clone(),
            })
            .await
            .expect("every replica reads the payment")
            .into_inner();
        assert_eq!(got.order_id, "charged-directly");
    }
    let stored = backend
        .column_i64(
            dir.path(),
            "payment",
            "SELECT count(*) FROM payments WHERE order_id = $1",
            &["charged-directly"],
        )
        .await;
    assert_eq!(stored, [1], "one row for the charge");

    // Made on one replica, read and watched on the other, both ways round.
    let mut followed = Vec::new();
    for (maker, watcher) in [(0, 1), (1, 0)] {
        let order = place_order(
            &mut OrderServiceClient::new(orders[maker].clone()),
            &buyer.id,
        )
        .await;
        assert_eq!(order.status, OrderStatus::Paid as i32);
        let read = OrderServiceClient::new(orders[watcher].clone())
            .get_order(GetOrderRequest {
                id: order.id.clone(),
            })
            .await
            .expect("the other replica reads the order")
            .into_inner();
        assert_eq!(read, order);
        followed.push(tokio::spawn(watch_all(
            orders[watcher].clone(),
            order.id.clone(),
        )));
    }
    for watcher in followed {
        assert_eq!(
            watcher.await.unwrap(),
            [
                OrderStatus::Paid as i32,
                OrderStatus::Shipped as i32,
                OrderStatus::Delivered as i32
            ],
            "PAID, SHIPPED, DELIVERED, then the stream ends"
        );
    }
    assert_eq!(sqlite_files(dir.path()), Vec::<String>::new());
    assert!(mesh.terminate().await.success());
}

/// How the store goes away.
#[derive(Clone, Copy, Debug)]
enum Outage {
    /// Fast shutdown, then a start on the same port: connections refused.
    Stop,
    /// SIGSTOP of every server process: connections hang.
    Pause,
}

impl Outage {
    /// How long the store stays away. A frozen store is only noticed when
    /// a probe gets no answer in time, so it stays away longer.
    fn length(self) -> Duration {
        match self {
            Outage::Stop => Duration::from_secs(5),
            Outage::Pause => Duration::from_secs(9),
        }
    }
}
/// Calls must succeed again this soon after the store is back.
const RECOVERY: Duration = Duration::from_secs(5);
/// Each load call's deadline.
const CALL_DEADLINE: Duration = Duration::from_secs(12);

#[derive(Debug)]
enum Outcome {
    Ok(Order),
    Failed(Code, String),
    /// No answer, not even at the deadline.
    Hung,
}

#[derive(Debug)]
struct Call {
    started: Instant,
    took: Duration,
    outcome: Outcome,
}

/// Places orders through the gateway until `stop`, recording every call.
async fn shopper(
    channel: Channel,
    user_id: String,
    stop: Arc<AtomicBool>,
    calls: Arc<Mutex<Vec<Call>>>,
) {
    let mut orders = OrderServiceClient::new(channel);
    while !stop.load(Ordering::Relaxed) {
        let mut request = Request::new(order_request(&user_id, vec![item("tea", 1, 700)]));
        request.set_timeout(CALL_DEADLINE);
        let started = Instant::now();
        let outcome = match tokio::time::timeout(
            CALL_DEADLINE + Duration::from_secs(2),
            orders.create_order(request),
        )
        .await
        {
            Ok(Ok(order)) => Outcome::Ok(order.into_inner()),
            Ok(Err(status)) => Outcome::Failed(status.code(), status.message().to_owned()),
            Err(_) => Outcome::Hung,
        };
        let failed = !matches!(outcome, Outcome::Ok(_));
        calls.lock().unwrap().push(Call {
            started,
            took: started.elapsed(),
            outcome,
        });
        if failed {
            // A client backs off a little before trying again.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Every process of the mesh, by role: none may be restarted by an outage.
fn mesh_pids(mesh: &Mesh) -> BTreeMap<String, i64> {
    let json = mesh.mesh_json();
    let mut pids = BTreeMap::new();
    pids.insert(
        "gateway".to_owned(),
        json["gateway"]["pid"].as_i64().unwrap(),
    );
    for i in json["instances"].as_array().unwrap() {
        let name = format!("{}-{}", i["service"].as_str().unwrap(), i["replica"]);
        pids.insert(name.clone(), i["pid"].as_i64().unwrap());
        pids.insert(
            format!("{name} sidecar"),
            i["sidecar_pid"].as_i64().unwrap(),
        );
    }
    pids
}

/// Samples every sidecar's /ready every 100 ms until `stop`: (service, when, status).
async fn sample_ready(
    admins: Vec<(String, String)>,
    stop: Arc<AtomicBool>,
) -> Vec<(String, Instant, Option<u16>)> {
    let mut samples = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        for (service, admin) in &admins {
            let status = http_get(admin, "/ready").await.map(|(code, _)| code);
            samples.push((service.clone(), Instant::now(), status));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    samples
}

/// Done-when 4: the store is away for 5 s while four clients place orders.
async fn store_outage_under_load(outage: Outage) {
    let Some(mut backend) = Backend::postgres().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mesh = backend
        .start_mesh(dir.path(), &["--fulfilment-step", "500ms"], &[])
        .await;
    let pids = mesh_pids(&mesh);
    let channel = mesh.gateway_channel().await;
    let buyer = new_user(&mut UserServiceClient::new(channel.clone())).await;
    let calls = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut shoppers = Vec::new();
    for _ in 0..4 {
        shoppers.push(tokio::spawn(shopper(
            channel.clone(),
            buyer.id.clone(),
            stop.clone(),
            calls.clone(),
        )));
    }
    let ok_calls = || {
        calls
            .lock()
            .unwrap()
            .iter()
            .filter(|c| matches!(c.outcome, Outcome::Ok(_)))
            .count()
    };
    eventually(Duration::from_secs(30), "orders placed", || async {
        (ok_calls() >= 20).then_some(())
    })
    .await;
    let admins: Vec<(String, String)> = mesh.mesh_json()["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["service"].as_str().unwrap().to_owned(),
                i["admin"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let sampling = Arc::new(AtomicBool::new(false));
    let sampler = tokio::spawn(sample_ready(admins, sampling.clone()));

    // PgServer blocks this thread (pg_ctl); the load runs on the workers.
    let down_at = Instant::now();
    match outage {
        Outage::Stop => backend.server().stop(),
        Outage::Pause => backend.server().pause(),
    }
    // The outage itself lasts this long; nothing waits on it.
    tokio::time::sleep(outage.length()).await;
    match outage {
        Outage::Stop => backend.server().restart(),
        Outage::Pause => backend.server().resume(),
    }
    let back_at = Instant::now();
    let recovered_by = back_at + RECOVERY;
    // Load goes on past the recovery bound, where every call must succeed.
    tokio::time::sleep(RECOVERY + Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    for shopper in shoppers {
        shopper.await.unwrap();
    }
    sampling.store(true, Ordering::Relaxed);
    let samples = sampler.await.unwrap();
    let calls = std::mem::take(&mut *calls.lock().unwrap());

    let first_ok_after = calls
        .iter()
        .filter(|c| c.started >= back_at && matches!(c.outcome, Outcome::Ok(_)))
        .map(|c| c.started + c.took - back_at)
        .min();
    let failed: Vec<&Call> = calls
        .iter()
        .filter(|c| !matches!(c.outcome, Outcome::Ok(_)))
        .collect();
    let slowest = calls.iter().map(|c| c.took).max().unwrap_or_default();
    let mut why: BTreeMap<String, usize> = BTreeMap::new();
    for call in &failed {
        let what = match &call.outcome {
            Outcome::Failed(code, message) => format!("{code:?}: {message}"),
            other => format!("{other:?}"),
        };
        *why.entry(what.chars().take(90).collect()).or_default() += 1;
    }
    eprintln!(
        "{outage:?}: {} calls, {} failed {why:?}, slowest {slowest:?}, first success {first_ok_after:?} after the store was back",
        calls.len(),
        failed.len()
    );
    for service in common::shop::names() {
        let unready = samples
            .iter()
            .filter(|(s, _, status)| *s == service && *status != Some(200))
            .map(|(_, at, status)| format!("{:?}@{:.1}s", status, (*at - down_at).as_secs_f64()))
            .collect::<Vec<_>>();
        eprintln!("{service} sidecar not ready: {unready:?}");
    }
    let store_down = |c: &Call| matches!(&c.outcome, Outcome::Failed(Code::Unavailable, m) if m.contains("store is down"));
    let expected = |c: &Call| match outage {
        Outage::Stop => store_down(c),
        // A frozen store is not refused but slow: a call may also fail
        // because a service it needs timed out on it. Still UNAVAILABLE,
        // with nothing stored, so safe to retry; never a hung call.
        Outage::Pause => matches!(c.outcome, Outcome::Failed(Code::Unavailable, _)),
    };
    if let Outage::Stop = outage {
        assert!(
            failed.iter().any(|c| store_down(c)),
            "no call failed with UNAVAILABLE \"store is down\": the outage was not felt"
        );
    }
    let other: Vec<_> = failed.iter().filter(|c| !expected(c)).collect();
    assert!(
        other.is_empty(),
        "calls failed otherwise than expected for {outage:?} ({} of them): {:?}",
        other.len(),
        &other[..other.len().min(5)]
    );
    assert!(
        slowest < CALL_DEADLINE,
        "a call took {slowest:?}, past its deadline {CALL_DEADLINE:?}"
    );
    let late: Vec<_> = calls
        .iter()
        .filter(|c| c.started >= recovered_by && !matches!(c.outcome, Outcome::Ok(_)))
        .collect();
    assert!(
        late.is_empty(),
        "calls still failing {RECOVERY:?} after the store came back: {late:?}"
    );
    assert!(
        calls.iter().filter(|c| c.started >= recovered_by).count() >= 4,
        "too few calls after recovery to tell"
    );

    // Every sidecar went unready while the store was away, and is ready again.
    for service in common::shop::names() {
        let of = |from: Instant, to: Instant| -> Vec<Option<u16>> {
            samples
                .iter()
                .filter(|(s, at, _)| *s == service && *at >= from && *at <= to)
                .map(|(_, _, status)| *status)
                .collect()
        };
        let during = of(down_at, back_at);
        assert!(
            during.contains(&Some(503)),
            "{service}'s sidecar /ready never said 503 while the store was down: {during:?}"
        );
        let after = of(recovered_by, Instant::now());
        assert!(
            !after.is_empty() && after.iter().all(|s| *s == Some(200)),
            "{service}'s sidecar /ready is not 200 {RECOVERY:?} after the store came back: {after:?}"
        );
    }
    assert_eq!(mesh_pids(&mesh), pids, "no process was restarted");

    // Nothing half-written: the stored orders are exactly those answered OK,
    // each readable, and the records reconcile.
    let answered: BTreeSet<String> = calls
        .iter()
        .filter_map(|c| match &c.outcome {
            Outcome::Ok(order) => Some(order.id.clone()),
            _ => None,
        })
        .collect();
    let stored: BTreeSet<String> = backend
        .rows(dir.path(), "order", "SELECT id FROM orders", &[])
        .await
        .into_iter()
        .map(|row| row[0].clone())
        .collect();
    assert_eq!(
        stored.difference(&answered).collect::<Vec<_>>(),
        Vec::<&String>::new(),
        "orders stored for calls that failed"
    );
    let mut orders = OrderServiceClient::new(channel);
    for id in &answered {
        orders
            .get_order(GetOrderRequest { id: id.clone() })
            .await
            .unwrap_or_else(|status| panic!("order {id} answered OK is not readable: {status:?}"));
    }
    let report = backend
        .settled_and_reconciled(dir.path(), Duration::from_secs(60))
        .await;
    let twice = backend.orders_charged_twice(dir.path()).await;
    assert!(twice.is_empty(), "orders charged twice: {twice:?}");
    eprintln!("reconcile: {report}");
    assert!(mesh.terminate().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_store_fails_calls_as_unavailable_and_recovers_by_itself() {
    store_outage_under_load(Outage::Stop).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_store_fails_calls_as_unavailable_and_recovers_by_itself() {
    store_outage_under_load(Outage::Pause).await;
}

/// Every user, through ListUsers pages.
async fn all_users(users: &mut UserServiceClient<Channel>) -> Vec<User> {
    let mut all = Vec::new();
    let mut token = String::new();
    loop {
        let page = users
            .list_users(ListUsersRequest {
                page_size: 3,
                page_token: token,
            })
            .await
            .expect("list users")
            .into_inner();
        all.extend(page.users);
        if page.next_page_token.is_empty() {
            return all;
        }
        token = page.next_page_token;
    }
}

/// Done-when 5: a second `up` with a new data dir, on the same database,
/// finds every user and order the first one stored.
#[tokio::test]
async fn a_second_up_on_the_same_database_finds_every_user_and_order() {
    let Some(backend) = Backend::postgres().await else {
        return;
    };
    let first_dir = tempfile::tempdir().unwrap();
    let first = backend
        .start_mesh(first_dir.path(), &["--fulfilment-step", "1h"], &[])
        .await;
    let channel = first.gateway_channel().await;
    let mut users = UserServiceClient::new(channel.clone());
    let mut orders = OrderServiceClient::new(channel);
    let mut made_users = Vec::new();
    let mut made_orders = Vec::new();
    for n in 0..5 {
        let user = new_user(&mut users).await;
        for k in 0..3 {
            let mut request: CreateOrderRequest =
                order_request(&user.id, vec![item(&format!("sku-{n}-{k}"), k + 1, 250)]);
            request.idempotency_key = format!("second-up-{n}-{k}");
            let order = orders.create_order(request).await.unwrap().into_inner();
            assert_eq!(order.status, OrderStatus::Paid as i32);
            made_orders.push(order);
        }
        made_users.push(user);
    }
    // One of them cancelled, so more than one status is carried over.
    let cancelled = orders
        .cancel_order(CancelOrderRequest {
            id: made_orders[0].id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    made_orders[0] = cancelled;
    assert!(first.terminate().await.success());
    assert_eq!(sqlite_files(first_dir.path()), Vec::<String>::new());

    let second_dir = tempfile::tempdir().unwrap();
    let second = backend
        .start_mesh(second_dir.path(), &["--fulfilment-step", "1h"], &[])
        .await;
    let channel = second.gateway_channel().await;
    let mut users = UserServiceClient::new(channel.clone());
    let mut orders = OrderServiceClient::new(channel);
    for user in &made_users {
        let found = users
            .get_user(GetUserRequest {
                id: user.id.clone(),
            })
            .await
            .expect("the user is found")
            .into_inner();
        assert_eq!(&found, user);
    }
    let listed: BTreeSet<String> = all_users(&mut users)
        .await
        .into_iter()
        .map(|u| u.id)
        .collect();
    let made: BTreeSet<String> = made_users.iter().map(|u| u.id.clone()).collect();
    assert_eq!(listed, made, "ListUsers lists every user");
    for order in &made_orders {
        let found = orders
            .get_order(GetOrderRequest {
                id: order.id.clone(),
            })
            .await
            .expect("the order is found")
            .into_inner();
        assert_eq!(&found, order);
    }
    for user in &made_users {
        let listed = orders
            .list_orders(ListOrdersRequest {
                user_id: user.id.clone(),
                page_size: 100,
                page_token: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        let mut ids: Vec<&String> = listed.orders.iter().map(|o| &o.id).collect();
        let mut want: Vec<&String> = made_orders
            .iter()
            .filter(|o| o.user_id == user.id)
            .map(|o| &o.id)
            .collect();
        ids.sort();
        want.sort();
        assert_eq!(ids, want, "ListOrders of {}", user.id);
    }
    // A retried key on the new mesh returns the stored order, charging nothing more.
    let mut retry = order_request(&made_users[1].id, vec![item("sku-1-0", 1, 250)]);
    retry.idempotency_key = "second-up-1-0".into();
    let again = orders.create_order(retry).await.unwrap().into_inner();
    assert_eq!(again.id, made_orders[3].id);
    let report = backend
        .settled_and_reconciled(second_dir.path(), Duration::from_secs(30))
        .await;
    assert_eq!(
        (&report["orders"], &report["payments"]),
        (&15.into(), &15.into()),
        "{report}"
    );
    assert_eq!(sqlite_files(second_dir.path()), Vec::<String>::new());
    assert!(second.terminate().await.success());
}

/// The test server itself: it restarts on its port keeping its data,
/// freezes and thaws, and leaves nothing behind.
#[tokio::test]
async fn the_test_postgres_server_stops_restarts_pauses_and_cleans_up() {
    let Some(mut server) = PgServer::start() else {
        return;
    };
    let url = server.create_database("probe");
    let connect = |url: String| async move {
        let (client, connection) = tokio::time::timeout(
            Duration::from_secs(2),
            tokio_postgres::connect(&url, tokio_postgres::NoTls),
        )
        .await
        .map_err(|_| "timed out".to_owned())?
        .map_err(|err| err.to_string())?;
        tokio::spawn(connection);
        Ok::<_, String>(client)
    };
    let client = connect(url.clone()).await.expect("connect");
    client
        .batch_execute("CREATE TABLE kept (n INT); INSERT INTO kept VALUES (7);")
        .await
        .unwrap();
    let port = server.port();

    server.stop();
    assert!(connect(url.clone()).await.is_err(), "stopped: refused");
    server.restart();
    assert_eq!(server.port(), port, "same port after a restart");
    let client = connect(url.clone()).await.expect("connect after restart");
    let row = client.query_one("SELECT n FROM kept", &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 7, "data kept across the restart");

    server.pause();
    let frozen =
        tokio::time::timeout(Duration::from_secs(1), client.simple_query("SELECT 1")).await;
    assert!(frozen.is_err(), "a paused server answers nothing");
    server.resume();
    client
        .simple_query("SELECT 1")
        .await
        .expect("answers after resume");

    let (pid, dir) = (server.pid().expect("running"), server.dir().to_owned());
    drop(client);
    drop(server);
    // pg_ctl returns once the pid file is gone, a moment before the exit.
    eventually(
        Duration::from_secs(5),
        "postgres gone after drop",
        || async { (!process_alive(i64::from(pid))).then_some(()) },
    )
    .await;
    assert!(!dir.exists(), "{} is removed", dir.display());
}
