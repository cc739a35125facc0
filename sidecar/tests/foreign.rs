//! The proxy meshes a gRPC service it was not written for: `acme.echo.v1`
//! (testing/echo), served by a plain tonic server. Nothing in the proxy
//! knows that package; routes and upstreams are configuration.

use minimesh_sidecar::config::TrafficArgs;
use minimesh_testecho::v1::SayRequest;
use minimesh_testecho::v1::echo_client::EchoClient;
use minimesh_testsupport::http::wait_ok;
use minimesh_testsupport::metrics::sum;
use minimesh_testsupport::sidecar::Sidecar;
use minimesh_testsupport::{TestCa, free_addr, metrics_text};
use std::net::SocketAddr;
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};

/// The client's outbound listener, with `:authority` set to `authority`.
async fn through(outbound: SocketAddr, authority: &'static str) -> EchoClient<Channel> {
    let channel = Endpoint::from_shared(format!("http://{outbound}"))
        .unwrap()
        .origin(http::Uri::from_static(authority))
        .connect()
        .await
        .unwrap();
    EchoClient::new(channel)
}

fn say(text: &str, seq: u32) -> SayRequest {
    SayRequest {
        text: text.into(),
        seq,
    }
}

#[tokio::test]
async fn a_service_the_mesh_was_not_written_for_is_meshed() {
    let ca = TestCa::new().unwrap();
    let (echo_app, _echo_stop) = minimesh_testecho::serve("echo-0").await;
    let (mirror_app, _mirror_stop) = minimesh_testecho::serve("mirror-0").await;
    let echo = Sidecar::start(&ca, "echo", echo_app, &["client"], TrafficArgs::default())
        .await
        .unwrap();
    let mirror = Sidecar::start(
        &ca,
        "mirror",
        mirror_app,
        &["client"],
        TrafficArgs::default(),
    )
    .await
    .unwrap();
    // The echo service has no grpc.health.v1: its answering UNIMPLEMENTED is
    // enough for its sidecar to be ready, as kubelet's probe asks.
    wait_ok(echo.admin, "/ready", Duration::from_secs(10))
        .await
        .expect("a service without a health service is ready");

    // Nothing listens here: calls sent to it never reach anyone.
    let dead = free_addr().unwrap();
    let upstreams = vec![
        format!("echo={},{dead}", echo.inbound),
        format!("mirror={}", mirror.inbound),
    ];
    let client = Sidecar::start(
        &ca,
        "client",
        free_addr().unwrap(),
        &[],
        TrafficArgs {
            upstreams: upstreams.clone(),
            routes: vec!["acme.echo.=echo".into()],
            eject_after: Some(2),
            ..TrafficArgs::default()
        },
    )
    .await
    .unwrap();
    let stranger = Sidecar::start(
        &ca,
        "stranger",
        free_addr().unwrap(),
        &[],
        TrafficArgs {
            upstreams,
            routes: vec!["acme.echo.=echo".into()],
            ..TrafficArgs::default()
        },
    )
    .await
    .unwrap();

    // By route prefix (the authority is an address), over mTLS to echo; calls
    // that went to the dead endpoint first were sent again elsewhere: streams
    // (replayed from the copy the proxy keeps) as well as unary calls.
    let mut by_route = through(client.outbound, "http://127.0.0.1:4140").await;
    let streams = (0..20u32).map(|n| {
        let mut by_route = by_route.clone();
        tokio::spawn(async move {
            let sent: Vec<SayRequest> = (0..3).map(|seq| say(&format!("s{n}"), seq)).collect();
            let mut replies = by_route.chat(tokio_stream::iter(sent)).await?.into_inner();
            let mut seqs = Vec::new();
            while let Some(reply) = replies.message().await? {
                assert_eq!(reply.text, format!("s{n}"));
                seqs.push(reply.seq);
            }
            Ok::<_, tonic::Status>(seqs)
        })
    });
    for stream in streams.collect::<Vec<_>>() {
        assert_eq!(
            stream.await.unwrap().expect("every stream succeeds"),
            [0, 1, 2]
        );
    }
    let calls = (0..60u32).map(|seq| {
        let mut by_route = by_route.clone();
        tokio::spawn(async move { by_route.say(say("hello", seq)).await })
    });
    for call in calls.collect::<Vec<_>>() {
        let reply = call
            .await
            .unwrap()
            .expect("every call succeeds")
            .into_inner();
        assert_eq!(
            (reply.text.as_str(), reply.served_by.as_str()),
            ("hello", "echo-0")
        );
    }
    let text = metrics_text(client.admin).await.unwrap();
    assert!(
        sum(&text, "minimesh_retries_total", &["service=\"echo\""]) >= 1.0,
        "calls to the dead endpoint were retried:\n{text}"
    );

    // By authority: `mirror` names an upstream, so the route table is not consulted.
    let mut by_authority =
        through(client.outbound, "http://mirror.acme.svc.cluster.local:8080").await;
    let reply = by_authority.say(say("hi", 1)).await.unwrap().into_inner();
    assert_eq!(reply.served_by, "mirror-0");

    // A 200-message bidirectional stream, intact and in order, some messages large.
    let requests: Vec<SayRequest> = (0..200u32)
        .map(|seq| {
            let size = if seq % 20 == 0 {
                64 * 1024
            } else {
                10 + seq as usize
            };
            say(&"x".repeat(size), seq)
        })
        .collect();
    let mut replies = by_route
        .chat(tokio_stream::iter(requests.clone()))
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    while let Some(reply) = replies.message().await.unwrap() {
        got.push((reply.seq, reply.text));
    }
    let sent: Vec<(u32, String)> = requests.into_iter().map(|r| (r.seq, r.text)).collect();
    assert_eq!(got.len(), 200);
    assert!(got == sent, "the stream came back intact and in order");

    // The allow-list: echo accepts `client` only, and names who it refused.
    let mut refused = through(stranger.outbound, "http://127.0.0.1:4140").await;
    let err = refused.say(say("let me in", 0)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(err.message().contains("/sa/stranger"), "{}", err.message());

    // No route: neither the authority nor a prefix names an upstream.
    let channel = Endpoint::from_shared(format!("http://{}", client.outbound))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let err = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unimplemented);
}
