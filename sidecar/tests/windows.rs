//! The HTTP/2 windows a proxy advertises are the ones it is given
//! (`--stream-window`, `--connection-window`), and windows that cannot work
//! together are refused at start.

use bytes::Bytes;
use minimesh_sidecar::config::TrafficArgs;
use minimesh_sidecar::listener::Limits;
use minimesh_testsupport::sidecar::Sidecar;
use minimesh_testsupport::{TestCa, free_addr};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpStream;

/// Opens a call on `outbound` that never ends and returns how much request
/// body the proxy lets it send before reading any: its stream window.
async fn send_window(outbound: SocketAddr, expected: u32) -> usize {
    let tcp = TcpStream::connect(outbound).await.unwrap();
    // h2 holds back more than 400 KiB of send capacity unless told otherwise.
    let (client, connection) = h2::client::Builder::new()
        .max_send_buffer_size(16 << 20)
        .handshake(tcp)
        .await
        .unwrap();
    tokio::spawn(connection);
    let mut client = client.ready().await.unwrap();
    let request = http::Request::post("/shop.payment.v1.PaymentService/GetPayment")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (_response, mut body) = client.send_request(request, false).unwrap();
    body.reserve_capacity(16 << 20);
    // The connection window may be raised a moment after the stream's:
    // wait until the grant stops short of the stream window no more.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while body.capacity() < expected as usize && tokio::time::Instant::now() < deadline {
        let more = tokio::time::timeout(
            Duration::from_millis(200),
            futures::future::poll_fn(|cx| body.poll_capacity(cx)),
        )
        .await;
        if let Ok(Some(Err(err))) = more {
            panic!("stream failed: {err}");
        }
    }
    let granted = body.capacity();
    let _ = body.send_data(Bytes::new(), false);
    granted
}

async fn order_sidecar(ca: &TestCa, payment: SocketAddr, limits: Limits) -> Sidecar {
    Sidecar::start_with_limits(
        ca,
        "order",
        free_addr().unwrap(),
        &["gateway"],
        TrafficArgs {
            upstreams: vec![format!("payment={payment}")],
            routes: vec!["shop.payment.=payment".into()],
            connect_timeout: Some(Duration::from_secs(60)),
            ..TrafficArgs::default()
        },
        limits,
    )
    .await
    .unwrap()
}

/// An endpoint that accepts TCP and never speaks: the proxy's connection to
/// it waits in its TLS handshake, so a call to it stays open (for the
/// minute of `connect_timeout` below) while the test reads its window.
async fn silent_endpoint() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = listener.accept().await {
            held.push(tcp);
        }
    });
    addr
}

#[tokio::test]
async fn a_proxy_advertises_the_stream_window_it_is_given() {
    let ca = TestCa::new().unwrap();
    let payment = silent_endpoint().await;
    let default = order_sidecar(&ca, payment, Limits::default()).await;
    assert_eq!(send_window(default.outbound, 65_536).await, 65_536);
    let wide = Limits {
        stream_window: 1 << 20,
        connection_window: 4 << 20,
        ..Limits::default()
    };
    let wide = order_sidecar(&ca, payment, wide).await;
    assert_eq!(send_window(wide.outbound, 1 << 20).await, 1 << 20);
}

#[tokio::test]
async fn a_connection_window_below_the_stream_window_is_refused() {
    let ca = TestCa::new().unwrap();
    let args = minimesh_sidecar::SidecarArgs {
        service: Some("order".into()),
        inbound: free_addr().unwrap().to_string(),
        outbound: free_addr().unwrap().to_string(),
        admin: free_addr().unwrap().to_string(),
        app: free_addr().unwrap().to_string(),
        allow: vec![],
        max_app_streams: minimesh_sidecar::args::DEFAULT_MAX_APP_STREAMS,
        config: None,
        check_config: false,
        identity: ca.identity_args("order").unwrap(),
        traffic: TrafficArgs::default(),
        limits: Limits {
            stream_window: 1 << 20,
            connection_window: 1 << 19,
            ..Limits::default()
        },
    };
    let err = minimesh_sidecar::run_sidecar(args, std::future::pending())
        .await
        .expect_err("refused");
    let message = err.to_string();
    assert!(message.contains("--connection-window 524288"), "{message}");
    assert!(message.contains("--stream-window 1048576"), "{message}");
}
