//! The whole mesh through real processes: a client that knows only
//! mesh.json uses the gateway, and streams cross two sidecars with
//! back-pressure instead of buffering.

mod common;

use common::process::*;
use common::*;
use minimesh_proto::order::v1::order_service_client::OrderServiceClient;
use minimesh_proto::order::v1::{OrderStatus, TrackRequest, WatchOrderRequest, track_request};
use minimesh_proto::payment::v1::payment_service_client::PaymentServiceClient;
use minimesh_proto::payment::v1::{ChargeRequest, GetPaymentRequest, PaymentStatus, charge_result};
use minimesh_proto::user::v1::user_service_client::UserServiceClient;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio_stream::StreamExt;

const PATIENCE: Duration = Duration::from_secs(30);

#[tokio::test]
async fn a_client_with_only_mesh_json_shops_through_the_gateway() {
    let dir = tempfile::tempdir().unwrap();
    let mesh = start_mesh(dir.path(), &["--fulfilment-step", "200ms"]).await;
    let file = mesh.mesh_json();
    for instance in file["instances"].as_array().unwrap() {
        for key in ["sidecar_pid", "inbound", "outbound", "admin", "identity"] {
            assert!(!instance[key].is_null(), "{key} missing in {instance}");
        }
        assert!(process_alive(instance["sidecar_pid"].as_i64().unwrap()));
        // Proxies run as the proxy-only binary (a third less resident
        // memory each), services as minimesh.
        assert_eq!(executable(&instance["sidecar_pid"]), "minimesh-proxy");
        assert_eq!(executable(&instance["pid"]), "minimesh");
    }
    assert!(process_alive(file["gateway"]["pid"].as_i64().unwrap()));
    assert_eq!(executable(&file["gateway"]["pid"]), "minimesh-proxy");
    assert!(
        std::path::Path::new(file["ca_dir"].as_str().unwrap())
            .join("ca.pem")
            .exists()
    );

    let gateway = mesh.gateway_url();
    let mut users = UserServiceClient::connect(gateway.clone()).await.unwrap();
    let mut orders = OrderServiceClient::connect(gateway.clone()).await.unwrap();
    let mut payments = PaymentServiceClient::connect(gateway.clone())
        .await
        .unwrap();
    let buyer = new_user(&mut users).await;
    let order = place_order(&mut orders, &buyer.id).await;
    assert_eq!(order.status, OrderStatus::Paid as i32);

    let mut watch = orders
        .watch_order(WatchOrderRequest {
            id: order.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut seen = Vec::new();
    while let Some(event) = tokio::time::timeout(PATIENCE, watch.next())
        .await
        .expect("event in time")
    {
        seen.push(event.unwrap().status);
    }
    assert_eq!(
        seen,
        [
            OrderStatus::Paid as i32,
            OrderStatus::Shipped as i32,
            OrderStatus::Delivered as i32
        ]
    );

    // TrackOrders: two orders on one bidirectional stream, through the gateway.
    let a = place_order(&mut orders, &buyer.id).await.id;
    let b = place_order(&mut orders, &buyer.id).await.id;
    let requests = [a.clone(), b.clone()].map(|id| TrackRequest {
        action: Some(track_request::Action::Watch(id)),
    });
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    for request in requests {
        tx.send(request).await.unwrap();
    }
    let mut events = orders
        .track_orders(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let mut delivered = std::collections::BTreeSet::new();
    while delivered.len() < 2 {
        let event = tokio::time::timeout(PATIENCE, events.next())
            .await
            .expect("event in time")
            .unwrap()
            .unwrap();
        if event.status == OrderStatus::Delivered as i32 {
            delivered.insert(event.order_id);
        }
    }
    assert_eq!(delivered, [a, b].into_iter().collect());
    drop(tx);

    // Payment is internal (the gateway's --expose is user,order by default):
    // nobody outside the mesh can charge, refund or read payments.
    let denied = match payments
        .get_payment(GetPaymentRequest {
            id: order.payment_id.clone(),
        })
        .await
    {
        Ok(found) => panic!("payment readable at the edge: {found:?}"),
        Err(status) => status,
    };
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");
    assert!(denied.message().contains("not exposed"), "{denied:?}");

    // ChargeStream: results in order, through order's sidecar and payment's.
    let outbound = format!(
        "http://{}",
        mesh.instances("order")[0]["outbound"].as_str().unwrap()
    );
    let mut payments = PaymentServiceClient::connect(outbound).await.unwrap();
    let batch: Vec<ChargeRequest> = (0..50)
        .map(|i| ChargeRequest {
            order_id: format!("ord_gw_{i}"),
            user_id: buyer.id.clone(),
            amount_cents: 100 + i,
            currency: "EUR".into(),
            idempotency_key: format!("gw-{i}"),
        })
        .collect();
    let mut results = payments
        .charge_stream(tokio_stream::iter(batch))
        .await
        .unwrap()
        .into_inner();
    let mut n = 0u64;
    while let Some(result) = results.next().await {
        let result = result.unwrap();
        assert_eq!(result.index, n);
        match result.result.unwrap() {
            charge_result::Result::Payment(p) => {
                assert_eq!(p.status, PaymentStatus::Captured as i32);
                assert_eq!(p.order_id, format!("ord_gw_{n}"));
            }
            charge_result::Result::Error(e) => panic!("unexpected error result {e:?}"),
        }
        n += 1;
    }
    assert_eq!(n, 50);
    assert!(mesh.terminate().await.success());
}

/// Peak and current resident memory of a process, in KiB.
fn memory_kib(pid: i64) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
            .unwrap()
    };
    (field("VmHWM:"), field("VmRSS:"))
}

#[tokio::test]
async fn a_long_bidi_stream_crosses_two_sidecars_with_bounded_memory_and_back_pressure() {
    const MESSAGES: u64 = 100_000;
    // 1 KiB per request: 100 MiB cross each proxy, far more than either may hold.
    const PAD: usize = 1024;
    // Each proxy may hold its HTTP/2 flow-control windows (a few MiB at most,
    // with adaptive windows) plus its own baseline; buffering the stream
    // whole would need 100 MiB.
    const MAX_GROWTH_KIB: u64 = 48 * 1024;

    let dir = tempfile::tempdir().unwrap();
    let mesh = start_mesh(dir.path(), &[]).await;
    let order = &mesh.instances("order")[0];
    let payment = &mesh.instances("payment")[0];
    let sidecars = [
        order["sidecar_pid"].as_i64().unwrap(),
        payment["sidecar_pid"].as_i64().unwrap(),
    ];
    let before: Vec<u64> = sidecars.iter().map(|&pid| memory_kib(pid).1).collect();

    // Through order's outbound listener, over mTLS to payment's sidecar, to payment.
    let outbound = format!("http://{}", order["outbound"].as_str().unwrap());
    let mut payments = PaymentServiceClient::connect(outbound).await.unwrap();
    let sent = Arc::new(AtomicU64::new(0));
    let counter = sent.clone();
    // Invalid amounts: every request gets an error result, so no database
    // writes slow the stream down; the bytes still flow both ways.
    let requests = tokio_stream::iter(0..MESSAGES).map(move |i| {
        counter.fetch_add(1, Ordering::Relaxed);
        ChargeRequest {
            order_id: format!("ord_{i}"),
            user_id: "x".repeat(PAD),
            amount_cents: 0,
            currency: "EUR".into(),
            idempotency_key: String::new(),
        }
    });
    let mut results = payments.charge_stream(requests).await.unwrap().into_inner();

    // Read nothing yet: the writer must stall once the windows are full.
    let mut last = 0;
    let mut still = 0;
    let stalled_at = loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = sent.load(Ordering::Relaxed);
        still = if now == last { still + 1 } else { 0 };
        last = now;
        if still >= 5 || now >= MESSAGES {
            break now;
        }
    };
    // Responses are small, so the HTTP/2 windows (a few MiB of ~70-byte
    // results per hop) hold many of them before the writer stops; what
    // matters is that it stops and the proxies' memory does not grow.
    eprintln!("writer stalled after {stalled_at} requests");
    assert!(
        stalled_at < MESSAGES,
        "a reader that reads nothing must stall the writer, but all {stalled_at} were sent"
    );
    for (pid, before) in sidecars.iter().zip(&before) {
        let (_, now) = memory_kib(*pid);
        assert!(
            now < before + MAX_GROWTH_KIB,
            "sidecar {pid} buffers while stalled: {before} KiB -> {now} KiB"
        );
    }

    let mut received = 0u64;
    while let Some(result) = tokio::time::timeout(PATIENCE, results.next())
        .await
        .expect("result in time")
    {
        let result = result.unwrap();
        assert_eq!(result.index, received, "in order");
        assert!(
            matches!(result.result, Some(charge_result::Result::Error(ref e)) if e.code == tonic::Code::InvalidArgument as i32)
        );
        received += 1;
    }
    assert_eq!(received, MESSAGES);
    for (pid, before) in sidecars.iter().zip(&before) {
        let (peak, _) = memory_kib(*pid);
        eprintln!("sidecar {pid}: rss before {before} KiB, peak {peak} KiB");
        assert!(
            peak < before + MAX_GROWTH_KIB,
            "sidecar {pid} grew from {before} KiB to a peak of {peak} KiB"
        );
    }
    assert!(mesh.terminate().await.success());
}
