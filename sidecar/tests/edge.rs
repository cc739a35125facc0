//! TLS at the gateway's edge (`--tls-cert`, `--tls-key`): callers outside
//! the mesh get TLS with the given certificate, plaintext is refused, and a
//! certificate replaced on disk (a renewed Secret) is served without a restart.

use minimesh_sidecar::GatewayArgs;
use minimesh_sidecar::config::TrafficArgs;
use minimesh_testsupport::sidecar::spawn_gateway;
use minimesh_testsupport::tls::{client_config, tls_channel};
use minimesh_testsupport::{TestCa, free_addr, wait_listening};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

/// A self-signed edge certificate for `edge.example`, written to `dir`.
fn write_edge_cert(dir: &Path) -> Vec<u8> {
    let certified = rcgen::generate_simple_self_signed(vec!["edge.example".to_owned()]).unwrap();
    std::fs::write(dir.join("tls.crt"), certified.cert.pem()).unwrap();
    std::fs::write(dir.join("tls.key"), certified.signing_key.serialize_pem()).unwrap();
    certified.cert.der().to_vec()
}

/// A gRPC health call over TLS trusting only `cert_pem`; returns the
/// certificate the server showed.
async fn call_over_tls(addr: SocketAddr, cert_pem: &Path) -> (Vec<u8>, Result<(), tonic::Status>) {
    let config = client_config(cert_pem, None).unwrap();
    let (channel, shown) = tls_channel(addr, "edge.example", config).await.unwrap();
    let result = HealthClient::new(channel)
        .check(HealthCheckRequest::default())
        .await
        .map(|_| ());
    let cert = shown.lock().unwrap().clone().unwrap_or_default();
    (cert, result)
}

#[tokio::test]
async fn the_gateway_serves_its_edge_over_tls_and_picks_up_a_renewed_certificate() {
    let ca = TestCa::new().unwrap();
    let edge_dir = ca.dir().join("edge");
    std::fs::create_dir_all(&edge_dir).unwrap();
    let first = write_edge_cert(&edge_dir);
    let listen = free_addr().unwrap();
    let args = GatewayArgs {
        listen: listen.to_string(),
        tls_cert: Some(edge_dir.join("tls.crt")),
        tls_key: Some(edge_dir.join("tls.key")),
        admin: free_addr().unwrap().to_string(),
        default_upstream: "user".into(),
        expose: vec!["user".into()],
        config: None,
        check_config: false,
        identity: ca.identity_args("gateway").unwrap(),
        traffic: TrafficArgs::default(),
        limits: Default::default(),
    };
    let stop = spawn_gateway(args);
    wait_listening(&[listen], Duration::from_secs(10))
        .await
        .expect("the gateway listens");

    // Over TLS, the gateway answers in gRPC (no upstream is configured, so
    // the answer is its own UNIMPLEMENTED): TLS and HTTP/2 both worked.
    let (shown, result) = call_over_tls(listen, &edge_dir.join("tls.crt")).await;
    assert_eq!(shown, first, "the configured edge certificate");
    assert_eq!(result.unwrap_err().code(), tonic::Code::Unimplemented);

    // Plaintext h2c is not served on a TLS edge.
    let plain = tonic::transport::Endpoint::from_shared(format!("http://{listen}"))
        .unwrap()
        .timeout(Duration::from_secs(5))
        .connect()
        .await;
    if let Ok(channel) = plain {
        let status = HealthClient::new(channel)
            .check(HealthCheckRequest::default())
            .await
            .unwrap_err();
        assert_ne!(status.code(), tonic::Code::Unimplemented, "{status:?}");
    }

    // A renewed certificate on disk: the next connection gets it.
    let second = write_edge_cert(&edge_dir);
    let (shown, result) = call_over_tls(listen, &edge_dir.join("tls.crt")).await;
    assert_eq!(shown, second, "the renewed certificate, with no restart");
    assert_eq!(result.unwrap_err().code(), tonic::Code::Unimplemented);
    let _ = stop.send(());
}
