//! Traces and logs as a user sees them in Jaeger: one CreateOrder is one
//! trace across every process, and log lines carry its trace id.

mod common;

use common::collector::*;
use common::process::*;
use common::*;
use minimesh_proto::order::v1::order_service_client::OrderServiceClient;
use minimesh_proto::user::v1::user_service_client::UserServiceClient;
use minimesh_testsupport::metrics::counter;
use minimesh_testsupport::{eventually, metrics_text};
use std::collections::{HashMap, HashSet};
use std::time::Duration;

const SERVER: i32 = 2; // SPAN_KIND_SERVER
const CLIENT: i32 = 3; // SPAN_KIND_CLIENT
const STATUS_ERROR: i32 = 2;

#[tokio::test]
async fn one_order_is_one_trace_across_services_and_logs_carry_it() {
    let (collector, url) = Collector::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mesh = start_mesh_with_env(
        dir.path(),
        &["--otlp-endpoint", &url, "--fulfilment-step", "1h"],
        &[("OTEL_BSP_SCHEDULE_DELAY", "100")],
    )
    .await;
    // Everything goes through the gateway, as a user's client would.
    let gateway = format!(
        "http://{}",
        mesh.mesh_json()["gateway"]["addr"].as_str().unwrap()
    );
    let mut users = UserServiceClient::connect(gateway.clone()).await.unwrap();
    let mut orders = OrderServiceClient::connect(gateway.clone()).await.unwrap();
    let buyer = new_user(&mut users).await;
    let order = place_order(&mut orders, &buyer.id).await;
    let declined = orders
        .create_order(order_request(&buyer.id, vec![item("yacht", 1, 50_000_000)]))
        .await
        .unwrap()
        .into_inner();
    let invalid = orders
        .create_order(order_request(&buyer.id, vec![]))
        .await
        .unwrap_err();
    assert_eq!(invalid.code(), tonic::Code::InvalidArgument);

    let create = "shop.order.v1.OrderService/CreateOrder";
    let expected = [
        ("minimesh-gateway", create, SERVER),
        ("minimesh-sidecar-order", create, SERVER),
        ("minimesh-order", create, SERVER),
        ("minimesh-order", "shop.user.v1.UserService/GetUser", CLIENT),
        (
            "minimesh-sidecar-order",
            "shop.user.v1.UserService/GetUser",
            CLIENT,
        ),
        (
            "minimesh-sidecar-user",
            "shop.user.v1.UserService/GetUser",
            SERVER,
        ),
        ("minimesh-user", "shop.user.v1.UserService/GetUser", SERVER),
        (
            "minimesh-order",
            "shop.payment.v1.PaymentService/Charge",
            CLIENT,
        ),
        (
            "minimesh-sidecar-order",
            "shop.payment.v1.PaymentService/Charge",
            CLIENT,
        ),
        (
            "minimesh-sidecar-payment",
            "shop.payment.v1.PaymentService/Charge",
            SERVER,
        ),
        (
            "minimesh-payment",
            "shop.payment.v1.PaymentService/Charge",
            SERVER,
        ),
    ];
    // The first order's trace: the one whose order-service span logged this order.
    let spans = eventually(
        Duration::from_secs(30),
        "every hop of the order exported",
        || {
            let all = collector.spans();
            let order_id = order.id.clone();
            async move {
                let mut roots = all.iter().filter(|s| {
                    s.service == "minimesh-gateway"
                        && s.name == create
                        && s.parent_span_id.is_empty()
                });
                roots.find_map(|root| {
                    let trace: Vec<SpanRecord> = all
                        .iter()
                        .filter(|s| s.trace_id == root.trace_id)
                        .cloned()
                        .collect();
                    let complete = expected.iter().all(|(svc, name, kind)| {
                        trace
                            .iter()
                            .any(|s| s.service == *svc && s.name == *name && s.kind == *kind)
                    });
                    let charged = trace.iter().any(|s| s.name.contains("Charge"));
                    (complete && charged && !order_id.is_empty()).then_some(trace)
                })
            }
        },
    )
    .await;
    // `cargo test --test tracing -- --nocapture` prints the tree shown in README.
    eprintln!("{}", render_tree(&spans));
    // One tree: every parent is a span of the same trace, and one root at the gateway.
    let ids: HashSet<&Vec<u8>> = spans.iter().map(|s| &s.span_id).collect();
    for span in &spans {
        assert!(
            span.parent_span_id.is_empty() || ids.contains(&span.parent_span_id),
            "orphan span {span:?}"
        );
    }
    let roots: Vec<&SpanRecord> = spans
        .iter()
        .filter(|s| s.parent_span_id.is_empty())
        .collect();
    assert_eq!(roots.len(), 1, "exactly one root");
    assert_eq!(roots[0].service, "minimesh-gateway");
    // Each service's server span hangs under its own sidecar's inbound span,
    // which knows the caller's identity.
    let by_id: HashMap<&Vec<u8>, &SpanRecord> = spans.iter().map(|s| (&s.span_id, s)).collect();
    for (service, sidecar) in [
        ("minimesh-user", "minimesh-sidecar-user"),
        ("minimesh-payment", "minimesh-sidecar-payment"),
    ] {
        let server = spans
            .iter()
            .find(|s| s.service == service && s.kind == SERVER)
            .unwrap();
        let parent = by_id[&server.parent_span_id];
        assert_eq!((parent.service.as_str(), parent.kind), (sidecar, SERVER));
        assert_eq!(
            parent.attr("minimesh.peer.identity"),
            Some("spiffe://minimesh.local/ns/default/sa/order")
        );
    }
    // The outbound proxy span names the upstream and the endpoint it chose.
    let outbound = spans
        .iter()
        .find(|s| {
            s.service == "minimesh-sidecar-order"
                && s.name == "shop.payment.v1.PaymentService/Charge"
        })
        .unwrap();
    assert_eq!(outbound.attr("minimesh.upstream"), Some("payment"));
    assert!(
        outbound
            .attr("server.address")
            .is_some_and(|a| a.starts_with("127.0.0.1:")),
        "{outbound:?}"
    );
    assert_eq!(outbound.attr("minimesh.attempts"), Some("1"));
    let root = spans
        .iter()
        .find(|s| s.service == "minimesh-order" && s.name == create)
        .unwrap()
        .clone();
    let trace = root.trace_id.clone();
    assert_eq!(root.attr("rpc.system"), Some("grpc"));
    assert_eq!(root.attr("rpc.service"), Some("shop.order.v1.OrderService"));
    assert_eq!(root.attr("rpc.method"), Some("CreateOrder"));
    assert_eq!(root.attr("rpc.grpc.status_code"), Some("0"));

    // An invalid request's span carries error status and its code.
    let failed = eventually(Duration::from_secs(30), "failed CreateOrder span", || {
        let spans = collector.spans();
        async move {
            spans.into_iter().find(|s| {
                s.service == "minimesh-order"
                    && s.name == "shop.order.v1.OrderService/CreateOrder"
                    && s.attr("rpc.grpc.status_code") == Some("3")
            })
        }
    })
    .await;
    assert_eq!(failed.status_code, STATUS_ERROR);

    // A stream is one span, with its message counts.
    let mut payments =
        minimesh_proto::payment::v1::payment_service_client::PaymentServiceClient::connect(
            mesh.app_url("payment"),
        )
        .await
        .unwrap();
    let batch: Vec<_> = (0..3)
        .map(|i| minimesh_proto::payment::v1::ChargeRequest {
            order_id: format!("ord_stream_{i}"),
            user_id: buyer.id.clone(),
            amount_cents: 100,
            currency: "EUR".into(),
            idempotency_key: String::new(),
        })
        .collect();
    let mut results = payments
        .charge_stream(tokio_stream::iter(batch))
        .await
        .unwrap()
        .into_inner();
    while results.message().await.unwrap().is_some() {}
    let stream_span = eventually(Duration::from_secs(30), "ChargeStream span", || {
        let spans = collector.spans();
        async move {
            spans.into_iter().find(|s| {
                s.service == "minimesh-payment"
                    && s.name == "shop.payment.v1.PaymentService/ChargeStream"
                    && s.kind == SERVER
            })
        }
    })
    .await;
    assert_eq!(stream_span.attr("rpc.request.messages"), Some("3"));
    assert_eq!(stream_span.attr("rpc.response.messages"), Some("3"));

    // A log line written while handling the call carries its trace id.
    let trace_hex: String = trace.iter().map(|b| format!("{b:02x}")).collect();
    let log = std::fs::read_to_string(dir.path().join("logs/order-0.log")).unwrap();
    let line = log
        .lines()
        .find(|l| l.contains("order created") && l.contains(&order.id))
        .expect("order created log line");
    assert!(
        line.contains(&trace_hex),
        "log line {line} lacks trace id {trace_hex}"
    );
    assert_ne!(declined.id, order.id);
    assert!(mesh.terminate().await.success());
}

#[tokio::test]
async fn collector_down_calls_unaffected_and_dropped_spans_counted() {
    // A port nobody listens on: reserve it, then close it.
    let dead = minimesh_testsupport::free_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let endpoint = format!("http://{dead}");
    let mesh = start_mesh_with_env(
        dir.path(),
        &["--otlp-endpoint", &endpoint, "--fulfilment-step", "1h"],
        &[("OTEL_BSP_SCHEDULE_DELAY", "100")],
    )
    .await;
    let mut users = UserServiceClient::connect(mesh.app_url("user"))
        .await
        .unwrap();
    let buyer = new_user(&mut users).await;
    for _ in 0..1000 {
        let fetched = users
            .get_user(minimesh_proto::user::v1::GetUserRequest {
                id: buyer.id.clone(),
            })
            .await
            .expect("calls succeed with the collector down")
            .into_inner();
        assert_eq!(fetched, buyer);
    }
    let metrics_addr = mesh.instances("user")[0]["metrics"]
        .as_str()
        .unwrap()
        .to_owned();
    let dropped = eventually(Duration::from_secs(30), "dropped spans counted", || {
        let addr = metrics_addr.clone();
        async move {
            let text = metrics_text(&addr).await.unwrap();
            let dropped = counter(&text, "minimesh_spans_dropped_total");
            (dropped > 0).then_some(dropped)
        }
    })
    .await;
    assert!(
        dropped <= 1001,
        "only this test's spans can be dropped, got {dropped}"
    );

    // Business counters: one order paid shows up on the order service.
    let mut orders = OrderServiceClient::connect(mesh.app_url("order"))
        .await
        .unwrap();
    place_order(&mut orders, &buyer.id).await;
    let order_metrics = metrics_text(mesh.instances("order")[0]["metrics"].as_str().unwrap())
        .await
        .unwrap();
    assert_eq!(
        counter(&order_metrics, "minimesh_orders_total{status=\"paid\"}"),
        1,
        "{order_metrics}"
    );
    let user_metrics = metrics_text(&metrics_addr).await.unwrap();
    assert_eq!(
        counter(&user_metrics, "minimesh_users_total{status=\"created\"}"),
        1
    );
    assert!(mesh.terminate().await.success());
}

/// Renders a trace as an indented tree, children in start order.
fn render_tree(spans: &[SpanRecord]) -> String {
    fn walk(spans: &[SpanRecord], parent: &[u8], depth: usize, out: &mut String) {
        for span in spans.iter().filter(|s| s.parent_span_id == parent) {
            let kind = if span.kind == SERVER {
                "SERVER"
            } else {
                "CLIENT"
            };
            out.push_str(&format!(
                "{}{} {kind} {}\n",
                "  ".repeat(depth),
                span.service,
                span.name
            ));
            walk(spans, &span.span_id, depth + 1, out);
        }
    }
    let mut out = String::new();
    walk(spans, &[], 0, &mut out);
    out
}
