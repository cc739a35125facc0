//! The streaming RPCs: WatchOrder, TrackOrders and ChargeStream.

mod common;

use common::*;
use minimesh_proto::order::v1::{
    CancelOrderRequest, OrderStatus, TrackRequest, WatchOrderRequest, track_request,
};
use minimesh_proto::payment::v1::{ChargeRequest, PaymentStatus, charge_result};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

const STEP: Duration = Duration::from_millis(150);
/// Bound on any single wait for a stream event, so a bug fails instead of hanging.
const PATIENCE: Duration = Duration::from_secs(20);

fn statuses(list: &[i32]) -> Vec<&'static str> {
    list.iter()
        .map(|s| {
            OrderStatus::try_from(*s)
                .map(|s| s.as_str_name())
                .unwrap_or("?")
        })
        .collect()
}

#[tokio::test]
async fn watch_order_yields_paid_shipped_delivered_then_ends() {
    let shop = start_shop(STEP).await;
    let mut users = shop.users().await;
    let mut orders = shop.orders().await;
    let buyer = new_user(&mut users).await;
    let order = place_order(&mut orders, &buyer.id).await;

    let mut stream = orders
        .watch_order(WatchOrderRequest {
            id: order.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut seen = Vec::new();
    while let Some(event) = tokio::time::timeout(PATIENCE, stream.next())
        .await
        .expect("event in time")
    {
        let event = event.unwrap();
        assert_eq!(event.order_id, order.id);
        assert!(event.at.is_some());
        seen.push(event.status);
    }
    assert_eq!(
        statuses(&seen),
        [
            "ORDER_STATUS_PAID",
            "ORDER_STATUS_SHIPPED",
            "ORDER_STATUS_DELIVERED"
        ]
    );

    // Watching a finished order yields its final status and ends.
    let mut done = orders
        .watch_order(WatchOrderRequest {
            id: order.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let only = done.next().await.unwrap().unwrap();
    assert_eq!(only.status, OrderStatus::Delivered as i32);
    assert!(done.next().await.is_none());

    let missing = orders
        .watch_order(WatchOrderRequest {
            id: "ord_nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
}

#[tokio::test]
async fn hundred_watchers_all_see_every_event() {
    let shop = start_shop(Duration::from_secs(1)).await;
    let mut users = shop.users().await;
    let mut orders = shop.orders().await;
    let buyer = new_user(&mut users).await;
    let order = place_order(&mut orders, &buyer.id).await;

    let mut streams = Vec::new();
    for _ in 0..100 {
        let stream = orders
            .watch_order(WatchOrderRequest {
                id: order.id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        streams.push(stream);
    }
    let watchers = streams.into_iter().map(|mut stream| {
        tokio::spawn(async move {
            let mut seen = Vec::new();
            while let Some(event) = tokio::time::timeout(PATIENCE, stream.next())
                .await
                .expect("event in time")
            {
                seen.push(event.expect("stream ok").status);
            }
            seen
        })
    });
    for watcher in watchers.collect::<Vec<_>>() {
        let seen = watcher.await.unwrap();
        assert_eq!(
            statuses(&seen),
            [
                "ORDER_STATUS_PAID",
                "ORDER_STATUS_SHIPPED",
                "ORDER_STATUS_DELIVERED"
            ]
        );
    }
}

fn watch(id: &str) -> TrackRequest {
    TrackRequest {
        action: Some(track_request::Action::Watch(id.into())),
    }
}

fn unwatch(id: &str) -> TrackRequest {
    TrackRequest {
        action: Some(track_request::Action::Unwatch(id.into())),
    }
}

#[tokio::test]
async fn track_orders_follows_three_orders_to_delivery() {
    let shop = start_shop(STEP).await;
    let mut users = shop.users().await;
    let mut orders = shop.orders().await;
    let buyer = new_user(&mut users).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(place_order(&mut orders, &buyer.id).await.id);
    }
    let (tx, rx) = mpsc::channel(8);
    for id in &ids {
        tx.send(watch(id)).await.unwrap();
    }
    let mut events = orders
        .track_orders(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let mut per_order: std::collections::HashMap<String, Vec<i32>> = Default::default();
    let mut delivered = 0;
    while delivered < 3 {
        let event = tokio::time::timeout(PATIENCE, events.next())
            .await
            .expect("event in time")
            .unwrap()
            .unwrap();
        if event.status == OrderStatus::Delivered as i32 {
            delivered += 1;
        }
        per_order
            .entry(event.order_id)
            .or_default()
            .push(event.status);
    }
    for id in &ids {
        assert_eq!(
            statuses(&per_order[id]),
            [
                "ORDER_STATUS_PAID",
                "ORDER_STATUS_SHIPPED",
                "ORDER_STATUS_DELIVERED"
            ],
            "order {id}"
        );
    }
    // Every watched order is finished: closing our side ends the stream.
    drop(tx);
    assert!(
        tokio::time::timeout(PATIENCE, events.next())
            .await
            .expect("end in time")
            .is_none()
    );
}

#[tokio::test]
async fn track_orders_unwatch_stops_events_for_that_order() {
    // Orders stay PAID for the whole test, so the only changes are our cancels.
    let shop = start_shop(Duration::from_secs(3600)).await;
    let mut users = shop.users().await;
    let mut orders = shop.orders().await;
    let buyer = new_user(&mut users).await;
    let a = place_order(&mut orders, &buyer.id).await.id;
    let b = place_order(&mut orders, &buyer.id).await.id;
    let c = place_order(&mut orders, &buyer.id).await.id;
    let d = place_order(&mut orders, &buyer.id).await.id;

    let (tx, rx) = mpsc::channel(8);
    let mut events = orders
        .track_orders(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let mut next = async || {
        tokio::time::timeout(PATIENCE, events.next())
            .await
            .expect("event in time")
            .unwrap()
            .unwrap()
    };
    for id in [&a, &b, &c] {
        tx.send(watch(id)).await.unwrap();
        let first = next().await;
        assert_eq!(
            (first.order_id.as_str(), first.status),
            (id.as_str(), OrderStatus::Paid as i32)
        );
    }
    tx.send(unwatch(&b)).await.unwrap();
    // Requests are handled in order, so d's answer proves the unwatch is done.
    tx.send(watch(&d)).await.unwrap();
    let proof = next().await;
    assert_eq!(
        (proof.order_id.as_str(), proof.status),
        (d.as_str(), OrderStatus::Paid as i32)
    );

    for id in [&b, &c, &a] {
        orders
            .cancel_order(CancelOrderRequest { id: id.clone() })
            .await
            .unwrap();
    }
    // Events arrive in change order; b's cancel came first but b is unwatched.
    let first = next().await;
    assert_eq!(
        (first.order_id.as_str(), first.status),
        (c.as_str(), OrderStatus::Cancelled as i32)
    );
    let second = next().await;
    assert_eq!(
        (second.order_id.as_str(), second.status),
        (a.as_str(), OrderStatus::Cancelled as i32)
    );
    // With d unwatched nothing is followed: closing our side ends the stream.
    tx.send(unwatch(&d)).await.unwrap();
    drop(tx);
    assert!(
        tokio::time::timeout(PATIENCE, events.next())
            .await
            .expect("end in time")
            .is_none()
    );
}

#[tokio::test]
async fn charge_stream_answers_a_thousand_requests_in_order() {
    let shop = start_shop(Duration::from_secs(3600)).await;
    let mut payments = shop.payments().await;
    let requests: Vec<ChargeRequest> = (0..1000)
        .map(|i| ChargeRequest {
            order_id: format!("ord_batch_{i}"),
            user_id: "usr_batch".into(),
            // Every 100th request is invalid, every 50th over the limit.
            amount_cents: if i % 100 == 7 {
                0
            } else if i % 50 == 3 {
                200_000
            } else {
                100 + i
            },
            currency: "EUR".into(),
            idempotency_key: format!("batch-{i}"),
        })
        .collect();
    let mut results = payments
        .charge_stream(tokio_stream::iter(requests.clone()))
        .await
        .unwrap()
        .into_inner();
    let mut count = 0u64;
    while let Some(result) = tokio::time::timeout(PATIENCE, results.next())
        .await
        .expect("result in time")
    {
        let result = result.unwrap();
        assert_eq!(result.index, count, "results come back in request order");
        let request = &requests[count as usize];
        match result.result.expect("result set") {
            charge_result::Result::Payment(p) => {
                assert_eq!(p.order_id, request.order_id);
                let expected = if request.amount_cents > 100_000 {
                    PaymentStatus::Declined
                } else {
                    PaymentStatus::Captured
                };
                assert_eq!(p.status, expected as i32, "request {count}");
            }
            charge_result::Result::Error(e) => {
                assert_eq!(
                    request.amount_cents, 0,
                    "only invalid requests fail: {}",
                    e.message
                );
                assert_eq!(e.code, Code::InvalidArgument as i32);
            }
        }
        count += 1;
    }
    assert_eq!(count, 1000);
}
