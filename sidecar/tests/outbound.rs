//! The outbound path in-process: an "order" sidecar calling a "payment"
//! sidecar over mTLS, in front of a stand-in application that records what
//! it receives. Deadlines, routing, retries on dead endpoints and DNS-style
//! discovery from a hosts file.

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use minimesh_proto::payment::v1::payment_service_client::PaymentServiceClient;
use minimesh_proto::payment::v1::{GetPaymentRequest, Payment};
use minimesh_sidecar::config::TrafficArgs;
use minimesh_testsupport::metrics::counter;
use minimesh_testsupport::sidecar::Sidecar;
use minimesh_testsupport::{TestCa, free_addr, http_get};
use prost::Message;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;

/// A gRPC stand-in for the payment service: answers GetPayment with the id
/// it was asked for, after `delay`, and records each call's grpc-timeout.
async fn start_app(addr: SocketAddr, delay: Duration, seen_timeouts: Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind(addr).await.unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let seen = seen_timeouts.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                    let seen = seen.clone();
                    async move {
                        if let Some(t) = request
                            .headers()
                            .get("grpc-timeout")
                            .and_then(|v| v.to_str().ok())
                        {
                            seen.lock().unwrap().push(t.to_owned());
                        }
                        let body = http_body_util::BodyExt::collect(request.into_body())
                            .await
                            .map(|c| c.to_bytes())
                            .unwrap_or_default();
                        let asked = GetPaymentRequest::decode(body.get(5..).unwrap_or_default())
                            .unwrap_or_default();
                        tokio::time::sleep(delay).await;
                        let reply = Payment {
                            id: asked.id,
                            ..Default::default()
                        }
                        .encode_to_vec();
                        let mut framed = vec![0u8];
                        framed.extend_from_slice(&(reply.len() as u32).to_be_bytes());
                        framed.extend_from_slice(&reply);
                        let mut trailers = http::HeaderMap::new();
                        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                        let frames = vec![
                            Ok::<_, std::convert::Infallible>(http_body::Frame::data(Bytes::from(
                                framed,
                            ))),
                            Ok(http_body::Frame::trailers(trailers)),
                        ];
                        let mut response = Response::new(http_body_util::StreamBody::new(
                            futures::stream::iter(frames),
                        ));
                        response.headers_mut().insert(
                            "content-type",
                            http::HeaderValue::from_static("application/grpc"),
                        );
                        Ok::<_, std::convert::Infallible>(response)
                    }
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
}

struct Pair {
    _ca: TestCa,
    outbound: SocketAddr,
    order_admin: SocketAddr,
    _sidecars: Vec<Sidecar>,
}

/// A payment sidecar in front of the stand-in app, and an order sidecar
/// whose payment upstream is `traffic(payment_inbounds)`.
async fn start_pair(
    delay: Duration,
    seen: Arc<Mutex<Vec<String>>>,
    traffic: impl FnOnce(&[SocketAddr]) -> TrafficArgs,
) -> Pair {
    start_replicas(&[(delay, seen)], traffic).await
}

/// One payment sidecar and stand-in app per `(delay, seen)`, and an order
/// sidecar whose payment upstream is `traffic(payment_inbounds)`.
async fn start_replicas(
    apps: &[(Duration, Arc<Mutex<Vec<String>>>)],
    traffic: impl FnOnce(&[SocketAddr]) -> TrafficArgs,
) -> Pair {
    let ca = TestCa::new().unwrap();
    let mut sidecars = Vec::new();
    let mut inbounds = Vec::new();
    for (delay, seen) in apps {
        let app = free_addr().unwrap();
        start_app(app, *delay, seen.clone()).await;
        let payment = Sidecar::start(&ca, "payment", app, &["order"], TrafficArgs::default())
            .await
            .unwrap();
        inbounds.push(payment.inbound);
        sidecars.push(payment);
    }
    let order = Sidecar::start(
        &ca,
        "order",
        free_addr().unwrap(),
        &["gateway"],
        traffic(&inbounds),
    )
    .await
    .unwrap();
    Pair {
        _ca: ca,
        outbound: order.outbound,
        order_admin: order.admin,
        _sidecars: sidecars.into_iter().chain([order]).collect(),
    }
}

fn static_upstream(inbounds: &[SocketAddr]) -> TrafficArgs {
    let list: Vec<String> = inbounds.iter().map(|a| a.to_string()).collect();
    TrafficArgs {
        upstreams: vec![format!("payment={}", list.join(","))],
        routes: vec!["shop.payment.=payment".into()],
        dns_refresh: Duration::from_millis(50),
        ..TrafficArgs::default()
    }
}

async fn client(addr: SocketAddr) -> PaymentServiceClient<tonic::transport::Channel> {
    PaymentServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
}

#[tokio::test]
async fn an_expired_deadline_answers_deadline_exceeded_and_the_upstream_sees_less_time() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let pair = start_pair(Duration::from_millis(500), seen.clone(), static_upstream).await;
    // A raw HTTP/2 client: tonic would enforce the deadline itself, and we
    // want to see the proxy's answer.
    let tcp = tokio::net::TcpStream::connect(pair.outbound).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let call = |timeout: &'static str| {
        let message = GetPaymentRequest { id: "slow".into() }.encode_to_vec();
        let mut framed = vec![0u8];
        framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
        framed.extend_from_slice(&message);
        Request::post(format!(
            "http://{}/shop.payment.v1.PaymentService/GetPayment",
            pair.outbound
        ))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", timeout)
        .body(http_body_util::Full::new(Bytes::from(framed)))
        .unwrap()
    };
    // Warm the connections so the measurement is the deadline, not the handshakes.
    let warm = sender.send_request(call("5S")).await.unwrap();
    http_body_util::BodyExt::collect(warm.into_body())
        .await
        .unwrap();

    let started = Instant::now();
    let response = sender.send_request(call("50m")).await.unwrap();
    let elapsed = started.elapsed();
    assert_eq!(
        response
            .headers()
            .get("grpc-status")
            .map(|v| v.to_str().unwrap()),
        Some("4"),
        "{response:?}"
    );
    assert!(
        elapsed < Duration::from_millis(150),
        "answered after {elapsed:?}"
    );

    let seen = seen.lock().unwrap().clone();
    let last = seen.last().expect("the app saw the call");
    let upstream = minimesh_traffic::deadline::parse(&last.parse().unwrap()).unwrap();
    assert!(
        upstream < Duration::from_millis(50) && upstream > Duration::ZERO,
        "app saw grpc-timeout {last}"
    );
}

#[tokio::test]
async fn calls_are_routed_by_service_and_unknown_services_are_unimplemented() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let pair = start_pair(Duration::ZERO, seen, static_upstream).await;
    let mut payments = client(pair.outbound).await;
    let reply = payments
        .get_payment(GetPaymentRequest { id: "pay_1".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.id, "pay_1");
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", pair.outbound))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let err = health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unimplemented);
    assert!(err.message().contains("no route"), "{}", err.message());

    // The same call with `:authority: payment` goes to payment: it is the
    // application, not the proxy, that does not know the method.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", pair.outbound))
        .unwrap()
        .origin(http::Uri::from_static(
            "http://payment.shop.svc.cluster.local:8080",
        ))
        .connect()
        .await
        .unwrap();
    let routed = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await;
    assert!(routed.is_ok(), "routed by authority to the app: {routed:?}");
}

#[tokio::test]
async fn a_dead_endpoint_is_retried_around_and_ejected() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let dead = free_addr().unwrap(); // nothing listens here
    let pair = start_pair(Duration::ZERO, seen, |live| {
        let mut args = static_upstream(&[live[0], dead]);
        args.eject_after = Some(2);
        args
    })
    .await;
    let payments = client(pair.outbound).await;
    // Concurrent calls raise the live endpoint's cost (latency × calls in
    // flight) above the untried one's, so P2C sends some to the dead one.
    for round in 0..5 {
        let calls = (0..50).map(|i| {
            let mut payments = payments.clone();
            let id = format!("pay_{round}_{i}");
            tokio::spawn(async move {
                let reply = payments
                    .get_payment(GetPaymentRequest { id: id.clone() })
                    .await
                    .expect("every call succeeds");
                assert_eq!(reply.into_inner().id, id);
            })
        });
        for call in calls.collect::<Vec<_>>() {
            call.await.unwrap();
        }
    }
    let (_, text) = http_get(pair.order_admin, "/metrics").await.unwrap();
    assert!(
        counter(
            &text,
            "minimesh_retries_total{direction=\"outbound\",service=\"payment\"}"
        ) >= 1,
        "{text}"
    );
    assert!(
        counter(
            &text,
            "minimesh_endpoint_ejections_total{direction=\"outbound\",service=\"payment\"}"
        ) >= 1,
        "{text}"
    );
}

#[tokio::test]
async fn a_per_try_timeout_moves_the_call_to_another_endpoint() {
    let slow_seen = Arc::new(Mutex::new(Vec::new()));
    let fast_seen = Arc::new(Mutex::new(Vec::new()));
    let pair = start_replicas(
        &[
            (Duration::from_secs(3), slow_seen.clone()),
            (Duration::ZERO, fast_seen.clone()),
        ],
        |inbounds| TrafficArgs {
            per_try_timeout: Some(Duration::from_millis(200)),
            ..static_upstream(inbounds)
        },
    )
    .await;
    let mut payments = client(pair.outbound).await;
    // Until the slow replica has had two calls (P2C shuns it for a while
    // after each timeout), every call must still succeed, well before the
    // slow replica would have answered.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut calls = 0;
    while slow_seen.lock().unwrap().len() < 2 {
        assert!(
            Instant::now() < deadline,
            "the slow replica was never tried"
        );
        let mut request = tonic::Request::new(GetPaymentRequest {
            id: format!("pay_{calls}"),
        });
        request.set_timeout(Duration::from_secs(5));
        let started = Instant::now();
        let reply = payments
            .get_payment(request)
            .await
            .unwrap_or_else(|e| panic!("call {calls} failed: {e:?}"));
        assert_eq!(reply.into_inner().id, format!("pay_{calls}"));
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "call {calls} took {:?}",
            started.elapsed()
        );
        calls += 1;
    }
    let (_, text) = http_get(pair.order_admin, "/metrics").await.unwrap();
    assert!(
        counter(
            &text,
            "minimesh_retries_total{direction=\"outbound\",service=\"payment\"}"
        ) >= 2,
        "{text}"
    );
    assert!(fast_seen.lock().unwrap().len() >= calls);
}

#[tokio::test]
async fn a_per_try_timeout_with_no_other_endpoint_left_answers_deadline_exceeded() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let pair = start_replicas(
        &[
            (Duration::from_secs(3), seen.clone()),
            (Duration::from_secs(3), seen.clone()),
        ],
        |inbounds| TrafficArgs {
            per_try_timeout: Some(Duration::from_millis(300)),
            ..static_upstream(inbounds)
        },
    )
    .await;
    let mut payments = client(pair.outbound).await;
    let mut request = tonic::Request::new(GetPaymentRequest { id: "x".into() });
    request.set_timeout(Duration::from_secs(5));
    let started = Instant::now();
    let err = payments.get_payment(request).await.unwrap_err();
    // Both replicas tried once each (300 ms apiece), then no other is left.
    assert_eq!(err.code(), tonic::Code::DeadlineExceeded, "{err:?}");
    assert!(
        err.message().contains("per-try timeout"),
        "{}",
        err.message()
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        seen.lock().unwrap().len(),
        2,
        "each replica got one attempt"
    );
}

#[tokio::test]
async fn dns_names_follow_endpoints_that_appear_and_vanish() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let hosts_dir = tempfile::tempdir().unwrap();
    let hosts = hosts_dir.path().join("hosts");
    // The name first points at an address where nothing listens.
    std::fs::write(&hosts, "127.0.0.9 payment-headless\n").unwrap();
    let hosts_for_args = hosts.clone();
    let pair = start_pair(Duration::ZERO, seen, move |live| {
        let port = live[0].port();
        TrafficArgs {
            upstreams: vec![format!("payment=payment-headless:{port}")],
            routes: vec!["shop.payment.=payment".into()],
            hosts_file: Some(hosts_for_args),
            dns_refresh: Duration::from_millis(50),
            retry_max_attempts: Some(1),
            ..TrafficArgs::default()
        }
    })
    .await;
    let mut payments = client(pair.outbound).await;
    let err = payments
        .get_payment(GetPaymentRequest { id: "a".into() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable);

    // The live address appears (the inbound listens on 127.0.0.1) and the dead one goes.
    std::fs::write(&hosts, "127.0.0.1 payment-headless\n").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if payments
            .get_payment(GetPaymentRequest { id: "b".into() })
            .await
            .is_ok()
        {
            break;
        }
        assert!(Instant::now() < deadline, "the new endpoint was never used");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Once only the live address is listed, every call succeeds.
    for _ in 0..20 {
        payments
            .get_payment(GetPaymentRequest { id: "c".into() })
            .await
            .expect("routed to the live endpoint");
    }
}
