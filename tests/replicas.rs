//! Replicas of the order service behave as one service: they share the
//! database, fulfilment moves each order exactly once, and a watcher on any
//! replica sees every change, whichever replica made it.

mod common;

use common::process::*;
use common::*;
use minimesh_proto::order::v1::order_service_client::OrderServiceClient;
use minimesh_proto::order::v1::{OrderStatus, WatchOrderRequest};
use minimesh_proto::user::v1::user_service_client::UserServiceClient;
use std::time::Duration;
use tokio_stream::StreamExt;

const ORDERS: usize = 200;

#[tokio::test]
async fn two_order_replicas_deliver_every_order_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let mesh = start_mesh(
        dir.path(),
        &["--replicas", "order=2", "--fulfilment-step", "300ms"],
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
    let mut users = UserServiceClient::connect(mesh.app_url("user"))
        .await
        .unwrap();
    let buyer = new_user(&mut users).await;

    let mut watchers = Vec::new();
    for n in 0..ORDERS {
        // Place on one replica, watch on the other.
        let order = place_order(&mut clients[n % 2], &buyer.id).await;
        let mut stream = clients[(n + 1) % 2]
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
    let conn = rusqlite::Connection::open(dir.path().join("order.db")).unwrap();
    for id in &ids {
        let counts: (i64, i64, i64) = conn
            .query_row(
                "SELECT SUM(status = 2), SUM(status = 3), SUM(status = 4) FROM order_events WHERE order_id = ?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap();
        assert_eq!(
            counts,
            (1, 1, 1),
            "order {id} moved through each status once"
        );
    }
    assert!(mesh.terminate().await.success());
}
