//! The sidecar in-process against a real gRPC application (tonic-health) on
//! loopback: the inbound listener's mTLS, authorization, readiness, metrics
//! and certificate rotation, exercised with real TLS clients.

use minimesh_certs::{LeafRequest, init_ca, issue, issue_leaf};
use minimesh_testsupport::grpc::serve_health;
use minimesh_testsupport::metrics::counter;
use minimesh_testsupport::sidecar::Sidecar;
use minimesh_testsupport::tls::{client_config, file_serial, peer_serial, tls_channel};
use minimesh_testsupport::{TestCa, free_addr, http_get};
use rustls::pki_types::ServerName;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};

const PATIENCE: Duration = Duration::from_secs(20);

struct Fixture {
    ca: TestCa,
    inbound: SocketAddr,
    admin: SocketAddr,
    app: SocketAddr,
    _sidecar: Sidecar,
}

impl Fixture {
    fn ca(&self) -> PathBuf {
        self.ca.ca_dir()
    }

    /// Issues `name` from the mesh CA into its own directory.
    fn identity(&self, name: &str) -> (PathBuf, PathBuf) {
        self.ca.issue(name).unwrap()
    }
}

/// Starts a sidecar for `payment` whose allow-list is `order`, and returns
/// once it listens. The app is not started: tests start it when they need it.
async fn start_sidecar() -> Fixture {
    let ca = TestCa::new().unwrap();
    let app = free_addr().unwrap();
    let sidecar = Sidecar::start(&ca, "payment", app, &["order"], Default::default())
        .await
        .unwrap();
    Fixture {
        inbound: sidecar.inbound,
        admin: sidecar.admin,
        app,
        ca,
        _sidecar: sidecar,
    }
}

async fn eventually<T, Fut: Future<Output = Option<T>>>(
    what: &str,
    check: impl FnMut() -> Fut,
) -> T {
    minimesh_testsupport::eventually(PATIENCE, what, check).await
}

async fn start_app(addr: SocketAddr) -> oneshot::Sender<()> {
    serve_health(TcpListener::bind(addr).await.unwrap())
}

/// A client trusting the mesh CA and presenting the certificate and key
/// in these files.
fn presenting(ca_pem: &Path, cert: &Path, key: &Path) -> Arc<rustls::ClientConfig> {
    let pair = (std::fs::read(cert).unwrap(), std::fs::read(key).unwrap());
    client_config(ca_pem, Some(pair)).unwrap()
}

/// Handshake, then (if it succeeded) the server certificate's serial.
async fn handshake(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, std::io::Error> {
    let tcp = TcpStream::connect(addr).await?;
    let connector = tokio_rustls::TlsConnector::from(config);
    let mut stream = connector
        .connect(ServerName::try_from("payment").unwrap(), tcp)
        .await?;
    // TLS 1.3 servers reject a client certificate after the client thinks the
    // handshake is done: a round trip surfaces the refusal.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await?;
    let mut byte = [0u8; 1];
    match stream.read(&mut byte).await? {
        0 => Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionAborted,
            "closed by server",
        )),
        _ => Ok(stream),
    }
}

async fn grpc_health(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> Result<ServingStatus, tonic::Status> {
    let (channel, _) = tls_channel(addr, "payment", config)
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let response = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await?;
    Ok(ServingStatus::try_from(response.get_ref().status).unwrap_or(ServingStatus::Unknown))
}

async fn tls_failures(admin: SocketAddr) -> u64 {
    let (_, text) = http_get(admin, "/metrics").await.unwrap();
    counter(
        &text,
        "minimesh_tls_handshake_failures_total{direction=\"inbound\"}",
    )
}

#[tokio::test]
async fn handshakes_without_a_valid_mesh_certificate_are_refused_and_counted() {
    let f = start_sidecar().await;
    let ca_pem = f.ca().join("ca.pem");
    let _app = start_app(f.app).await;
    let mut failures = tls_failures(f.admin).await;
    assert_eq!(failures, 0);

    // No client certificate.
    assert!(
        handshake(f.inbound, client_config(&ca_pem, None).unwrap())
            .await
            .is_err()
    );
    failures += 1;
    eventually("no-cert refusal counted", || async {
        (tls_failures(f.admin).await == failures).then_some(())
    })
    .await;

    // A certificate from another CA, for an allowed name.
    let other = f.ca.dir().join("other-ca");
    init_ca(&other, 30, false).unwrap();
    let (cert, key) = issue(
        &other,
        &LeafRequest::new("order"),
        &f.ca.dir().join("other-order"),
    )
    .unwrap();
    assert!(
        handshake(f.inbound, presenting(&ca_pem, &cert, &key))
            .await
            .is_err()
    );
    failures += 1;
    eventually("foreign-CA refusal counted", || async {
        (tls_failures(f.admin).await == failures).then_some(())
    })
    .await;

    // An expired certificate from the right CA.
    let mut expired = LeafRequest::new("order");
    let now = time::OffsetDateTime::now_utc();
    expired.window = Some((
        now - time::Duration::days(10),
        now - time::Duration::days(1),
    ));
    let leaf = issue_leaf(&f.ca(), &expired).unwrap();
    let client = client_config(
        &ca_pem,
        Some((leaf.cert_pem.into_bytes(), leaf.key_pem.into_bytes())),
    )
    .unwrap();
    assert!(handshake(f.inbound, client).await.is_err());
    failures += 1;
    eventually("expired refusal counted", || async {
        (tls_failures(f.admin).await == failures).then_some(())
    })
    .await;

    // Plaintext HTTP/2 gets no gRPC answer at all.
    let plain = tonic::transport::Endpoint::from_shared(format!("http://{}", f.inbound))
        .unwrap()
        .connect()
        .await;
    if let Ok(channel) = plain {
        let answer = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await;
        let status = answer.expect_err("plaintext must not be served");
        // A transport failure, not a status the proxy or the app sent.
        assert!(
            matches!(
                status.code(),
                tonic::Code::Unavailable | tonic::Code::Unknown
            ),
            "{status:?}"
        );
        assert!(
            status.metadata().get("grpc-status").is_none()
                && status.message().contains("transport"),
            "{status:?}"
        );
    }
    failures += 1;
    eventually("plaintext refusal counted", || async {
        (tls_failures(f.admin).await == failures).then_some(())
    })
    .await;

    // The valid identity works.
    let (cert, key) = f.identity("order");
    let status = grpc_health(f.inbound, presenting(&ca_pem, &cert, &key))
        .await
        .unwrap();
    assert_eq!(status, ServingStatus::Serving);
}

/// A leaf from the mesh CA with exactly the given URI SANs (and a DNS name).
fn leaf_with_uris(ca_dir: &Path, uris: &[&str]) -> (Vec<u8>, Vec<u8>) {
    use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, Issuer, KeyPair, SanType};
    let ca_key =
        KeyPair::from_pem(&std::fs::read_to_string(ca_dir.join("ca.key")).unwrap()).unwrap();
    let issuer = Issuer::from_ca_cert_pem(
        &std::fs::read_to_string(ca_dir.join("ca.pem")).unwrap(),
        ca_key,
    )
    .unwrap();
    let mut params = CertificateParams::new(vec!["order".to_owned()]).unwrap();
    for uri in uris {
        params
            .subject_alt_names
            .push(SanType::URI((*uri).try_into().unwrap()));
    }
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    (cert.pem().into_bytes(), key.serialize_pem().into_bytes())
}

#[tokio::test]
async fn mesh_certificates_without_exactly_one_spiffe_id_are_refused_and_counted() {
    let f = start_sidecar().await;
    let ca_pem = f.ca().join("ca.pem");
    let _app = start_app(f.app).await;
    let order = "spiffe://minimesh.local/ns/default/sa/order";
    let cases: [&[&str]; 4] = [
        &[],
        &[order, "spiffe://minimesh.local/ns/default/sa/gateway"],
        &["spiffe://minimesh.local/ns/default/sa/order?admin=1"],
        &["https://minimesh.local/ns/default/sa/order"],
    ];
    for (n, uris) in cases.iter().enumerate() {
        let client = client_config(&ca_pem, Some(leaf_with_uris(&f.ca(), uris))).unwrap();
        assert!(
            handshake(f.inbound, client).await.is_err(),
            "{uris:?} must be refused"
        );
        eventually("refusal counted", || async {
            (tls_failures(f.admin).await == n as u64 + 1).then_some(())
        })
        .await;
    }
    // Exactly one well-formed SPIFFE id from the mesh CA is an identity.
    let client = client_config(&ca_pem, Some(leaf_with_uris(&f.ca(), &[order]))).unwrap();
    let status = grpc_health(f.inbound, client).await.unwrap();
    assert_eq!(status, ServingStatus::Serving);
    assert_eq!(tls_failures(f.admin).await, cases.len() as u64);
}

#[tokio::test]
async fn callers_outside_the_allow_list_get_permission_denied_naming_them() {
    let f = start_sidecar().await;
    let ca_pem = f.ca().join("ca.pem");
    let _app = start_app(f.app).await;
    let (cert, key) = f.identity("stranger");
    let denied = grpc_health(f.inbound, presenting(&ca_pem, &cert, &key))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    assert!(
        denied
            .message()
            .contains("spiffe://minimesh.local/ns/default/sa/stranger"),
        "{}",
        denied.message()
    );
    let (cert, key) = f.identity("order");
    let ok = grpc_health(f.inbound, presenting(&ca_pem, &cert, &key))
        .await
        .unwrap();
    assert_eq!(ok, ServingStatus::Serving);

    let (_, metrics) = http_get(f.admin, "/metrics").await.unwrap();
    // A refused call is counted under one name (its path is the caller's to
    // choose), labelled with who was refused; the allowed one by its method.
    for series in [
        r#"minimesh_requests_total{direction="inbound",service="unrouted",method="unrouted",grpc_status="7",client_id="stranger"}"#,
        r#"minimesh_requests_total{direction="inbound",service="grpc.health.v1.Health",method="Check",grpc_status="0",client_id="order"}"#,
    ] {
        assert_eq!(counter(&metrics, series), 1, "{series} in\n{metrics}");
    }
}

#[tokio::test]
async fn ready_follows_the_local_service() {
    let f = start_sidecar().await;
    let (code, body) = http_get(f.admin, "/ready").await.unwrap();
    assert_eq!(code, 503, "{body}");
    assert_eq!(http_get(f.admin, "/live").await.unwrap().0, 200);
    let app = start_app(f.app).await;
    eventually("ready once the app serves", || async {
        (http_get(f.admin, "/ready").await?.0 == 200).then_some(())
    })
    .await;
    drop(app);
    eventually("not ready once the app stops", || async {
        (http_get(f.admin, "/ready").await?.0 == 503).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_new_certificate_on_disk_is_served_without_a_restart() {
    let f = start_sidecar().await;
    let ca_pem = f.ca().join("ca.pem");
    let _app = start_app(f.app).await;
    let (cert, key) = f.identity("order");
    let client = presenting(&ca_pem, &cert, &key);
    let old = handshake(f.inbound, client.clone()).await.unwrap();
    let old_serial = peer_serial(&old).expect("a served certificate");
    assert_eq!(
        old_serial,
        file_serial(&f.ca.dir().join("payment/payment.pem")).expect("the issued certificate")
    );

    // Rotate: issue a new pair over the sidecar's files.
    let (new_cert, _) = f.identity("payment");
    let new_serial = file_serial(&new_cert).expect("the new certificate");
    assert_ne!(new_serial, old_serial);
    eventually("new handshakes present the new certificate", || {
        let client = client.clone();
        let want = new_serial.clone();
        async move {
            let stream = handshake(f.inbound, client).await.ok()?;
            (peer_serial(&stream)? == want).then_some(())
        }
    })
    .await;
    // The connection made before the rotation still works.
    drop(old);
    let ok = grpc_health(f.inbound, client).await.unwrap();
    assert_eq!(ok, ServingStatus::Serving);
}
