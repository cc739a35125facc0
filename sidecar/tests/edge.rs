//! TLS at the gateway's edge (`--tls-cert`, `--tls-key`): callers outside
//! the mesh get TLS with the given certificate, plaintext is refused, and a
//! certificate replaced on disk (a renewed Secret) is served without a restart.

use minimesh_certs::{LeafRequest, init_ca, issue};
use minimesh_sidecar::config::TrafficArgs;
use minimesh_sidecar::server::IdentityArgs;
use minimesh_sidecar::{GatewayArgs, run_gateway};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind(("127.0.0.1", 0))
        .unwrap()
        .local_addr()
        .unwrap()
}

/// A self-signed edge certificate for `edge.example`, written to `dir`.
fn write_edge_cert(dir: &Path) -> Vec<u8> {
    let certified = rcgen::generate_simple_self_signed(vec!["edge.example".to_owned()]).unwrap();
    std::fs::write(dir.join("tls.crt"), certified.cert.pem()).unwrap();
    std::fs::write(dir.join("tls.key"), certified.signing_key.serialize_pem()).unwrap();
    certified.cert.der().to_vec()
}

fn trusting(cert_pem: &Path) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(cert_pem).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

/// A gRPC health call over TLS; returns the certificate the server showed.
async fn call_over_tls(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> (Vec<u8>, Result<(), tonic::Status>) {
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen_by_connector = seen.clone();
    let connector = tower::service_fn(move |_uri: http::Uri| {
        let (config, seen) = (config.clone(), seen_by_connector.clone());
        async move {
            let tcp = TcpStream::connect(addr).await?;
            let stream = tokio_rustls::TlsConnector::from(config)
                .connect(ServerName::try_from("edge.example").unwrap(), tcp)
                .await?;
            if let Some(cert) = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
            {
                *seen.lock().unwrap() = cert.to_vec();
            }
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
        }
    });
    let channel = tonic::transport::Endpoint::from_static("http://edge.example")
        .connect_with_connector(connector)
        .await
        .unwrap();
    let result = HealthClient::new(channel)
        .check(HealthCheckRequest::default())
        .await
        .map(|_| ());
    let cert = seen.lock().unwrap().clone();
    (cert, result)
}

#[tokio::test]
async fn the_gateway_serves_its_edge_over_tls_and_picks_up_a_renewed_certificate() {
    let dir = tempfile::tempdir().unwrap();
    init_ca(&dir.path().join("ca"), 30, false).unwrap();
    let (mesh_cert, mesh_key) = issue(
        &dir.path().join("ca"),
        &LeafRequest::new("gateway"),
        &dir.path().join("gateway"),
    )
    .unwrap();
    let edge_dir = dir.path().join("edge");
    std::fs::create_dir_all(&edge_dir).unwrap();
    let first = write_edge_cert(&edge_dir);
    let listen = free_addr();
    let args = GatewayArgs {
        listen: listen.to_string(),
        tls_cert: Some(edge_dir.join("tls.crt")),
        tls_key: Some(edge_dir.join("tls.key")),
        admin: free_addr().to_string(),
        default_upstream: "user".into(),
        expose: vec!["user".into()],
        config: None,
        check_config: false,
        identity: IdentityArgs::from_files(dir.path().join("ca/ca.pem"), mesh_cert, mesh_key),
        traffic: TrafficArgs::default(),
        limits: Default::default(),
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(run_gateway(args, async move {
        let _ = stopped.await;
    }));
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(listen).await.is_err() {
        assert!(Instant::now() < deadline, "the gateway never listened");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Over TLS, the gateway answers in gRPC (no upstream is configured, so
    // the answer is its own UNIMPLEMENTED): TLS and HTTP/2 both worked.
    let (shown, result) = call_over_tls(listen, trusting(&edge_dir.join("tls.crt"))).await;
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
    let (shown, result) = call_over_tls(listen, trusting(&edge_dir.join("tls.crt"))).await;
    assert_eq!(shown, second, "the renewed certificate, with no restart");
    assert_eq!(result.unwrap_err().code(), tonic::Code::Unimplemented);
    let _ = stop.send(());
}
