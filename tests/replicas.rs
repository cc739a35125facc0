//! Replicas of the order service behave as one service: they share the
//! database, fulfilment moves each order exactly once, and a watcher on any
//! replica sees every change, whichever replica made it. Each scenario runs
//! on SQLite and on PostgreSQL.

mod common;

use common::backend::Backend;
use common::*;
use minimesh_proto::order::v1::order_service_client::OrderServiceClient;
use minimesh_proto::order::v1::{OrderStatus, WatchOrderRequest};
use minimesh_proto::user::v1::user_service_client::UserServiceClient;
use minimesh_testsupport::metrics::sum;
use minimesh_testsupport::metrics_text;
use std::time::Duration;
use tokio_stream::StreamExt;

const ORDERS: usize = 200;

#[tokio::test]
async fn two_order_replicas_deliver_every_order_exactly_once() {
    deliver_every_order_exactly_once(Backend::Sqlite).await;
}

#[tokio::test]
async fn two_order_replicas_deliver_every_order_exactly_once_on_postgres() {
    if let Some(backend) = Backend::postgres().await {
        deliver_every_order_exactly_once(backend).await;
    }
}

async fn deliver_every_order_exactly_once(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let mesh = backend
        .start_mesh(
            dir.path(),
            &[
                "--replicas",
                "order=2,payment=3",
                "--fulfilment-step",
                "300ms",
            ],
            &[],
        )
        .await;
    let replicas: Vec<String> = mesh
        .instances("order")
        .iter()
        .map(|i| format!("http://{}", i["app"].as_str().unwrap()))
        .collect();
    assert_eq!(replicas.len(), 2);
    let mut clients = Vec::new();
    for url in &replicas {
        clients.push(OrderServiceClient::connect(url.clone()).await.unwrap());
    }
    let gateway_url = format!(
        "http://{}",
        mesh.mesh_json()["gateway"]["addr"].as_str().unwrap()
    );
    let mut gateway = OrderServiceClient::connect(gateway_url.clone())
        .await
        .unwrap();
    let mut users = UserServiceClient::connect(gateway_url).await.unwrap();
    let buyer = new_user(&mut users).await;

    let mut watchers = Vec::new();
    for n in 0..ORDERS {
        // Placed through the gateway (which balances over both order
        // replicas), watched on each replica in turn.
        let order = place_order(&mut gateway, &buyer.id).await;
        let mut stream = clients[n % 2]
            .watch_order(WatchOrderRequest {
                id: order.id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        watchers.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            while let Some(event) = tokio::time::timeout(Duration::from_secs(30), stream.next())
                .await
                .expect("event in time")
            {
                seen.push(event.expect("stream ok").status);
            }
            (order.id, seen)
        }));
    }
    let full = [
        OrderStatus::Paid as i32,
        OrderStatus::Shipped as i32,
        OrderStatus::Delivered as i32,
    ];
    let mut ids = Vec::new();
    for watcher in watchers {
        let (id, seen) = watcher.await.unwrap();
        // The first event is the status at watch time; after it, nothing skipped or repeated.
        assert!(
            full.ends_with(&seen) && !seen.is_empty(),
            "order {id}: {seen:?}"
        );
        ids.push(id);
    }

    // Exactly one SHIPPED and one DELIVERED change per order, whichever replica moved it.
    for id in &ids {
        let counts = backend
            .rows(
                dir.path(),
                "order",
                "SELECT status, count(*) FROM order_events WHERE order_id = $1 \
                 AND status IN (2, 3, 4) GROUP BY status ORDER BY status",
                &[id],
            )
            .await;
        assert_eq!(
            counts,
            [["2", "1"], ["3", "1"], ["4", "1"]],
            "order {id} moved through each status once"
        );
    }
    assert!(mesh.terminate().await.success());
}

#[tokio::test]
async fn cancel_refunds_whichever_payment_replica_took_the_charge() {
    cancel_refunds_whichever_replica_charged(Backend::Sqlite).await;
}

#[tokio::test]
async fn cancel_refunds_whichever_payment_replica_took_the_charge_on_postgres() {
    if let Some(backend) = Backend::postgres().await {
        cancel_refunds_whichever_replica_charged(backend).await;
    }
}

async fn cancel_refunds_whichever_replica_charged(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let mesh = backend
        .start_mesh(
            dir.path(),
            &["--replicas", "order=2,payment=3", "--fulfilment-step", "1h"],
            &[],
        )
        .await;
    let gateway_url = format!(
        "http://{}",
        mesh.mesh_json()["gateway"]["addr"].as_str().unwrap()
    );
    let mut orders = OrderServiceClient::connect(gateway_url.clone())
        .await
        .unwrap();
    let mut users = UserServiceClient::connect(gateway_url).await.unwrap();
    let buyer = new_user(&mut users).await;
    let mut placed = Vec::new();
    for _ in 0..30 {
        placed.push(place_order(&mut orders, &buyer.id).await);
    }
    for order in &placed {
        let cancelled = orders
            .cancel_order(minimesh_proto::order::v1::CancelOrderRequest {
                id: order.id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(cancelled.status, OrderStatus::Cancelled as i32);
    }
    // Every payment is refunded, and the charges were spread over the replicas.
    for order in &placed {
        let statuses = backend
            .column_i64(
                dir.path(),
                "payment",
                "SELECT status FROM payments WHERE order_id = $1",
                &[&order.id],
            )
            .await;
        assert_eq!(statuses, [3], "payment of {} is REFUNDED", order.id);
    }
    let mut replicas_used = 0;
    for instance in mesh.instances("payment") {
        let text = metrics_text(instance["admin"].as_str().unwrap())
            .await
            .unwrap();
        let charges = sum(&text, "minimesh_requests_total", &["method=\"Charge\""]);
        if charges > 0.0 {
            replicas_used += 1;
        }
    }
    assert!(
        replicas_used >= 2,
        "charges went to {replicas_used} replica(s)"
    );
    assert!(mesh.terminate().await.success());
}
