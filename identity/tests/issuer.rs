//! The issuer in-process, over real TLS: who may get which certificate.
//! The Kubernetes TokenReview API is a local HTTPS stand-in (the one piece
//! that cannot run for real here); it answers as the API server does.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use minimesh_certs::{SigningCa, init_ca};
use minimesh_identity::bootstrap::BootstrapKey;
use minimesh_identity::client::{ClientError, Credential, IssuerClientConfig, certify};
use minimesh_identity::issuer::{Issuer, IssuerArgs, serve};
use minimesh_spiffe::{SpiffeId, spiffe_id_of};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn id(name: &str) -> SpiffeId {
    SpiffeId::new("minimesh.local", "default", name).unwrap()
}

struct StandIn {
    url: String,
    ca_file: PathBuf,
    /// Bearer tokens the stand-in saw (the issuer's own credential).
    bearers: Arc<Mutex<Vec<String>>>,
}

/// An HTTPS TokenReview endpoint: `order-token` is default/order,
/// `payment-token` is default/payment, `wrong-audience` is bound elsewhere,
/// anything else is not authenticated.
async fn token_review_stand_in(dir: &Path) -> StandIn {
    let ca_dir = dir.join("api-ca");
    init_ca(&ca_dir, 1, false).unwrap();
    let ca = SigningCa::load(&ca_dir).unwrap();
    let leaf = ca
        .issue_server(&["localhost".to_owned()], Duration::from_secs(3600))
        .unwrap();
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(leaf.cert_pem.as_bytes())
            .map(|c| c.unwrap())
            .collect();
    let key = PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let bearers = Arc::new(Mutex::new(Vec::new()));
    let seen = bearers.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (acceptor, seen) = (acceptor.clone(), seen.clone());
            tokio::spawn(async move {
                let Ok(stream) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper::service::service_fn(
                    move |request: http::Request<hyper::body::Incoming>| {
                        let seen = seen.clone();
                        async move {
                            if let Some(auth) = request.headers().get("authorization") {
                                seen.lock()
                                    .unwrap()
                                    .push(auth.to_str().unwrap_or("").to_owned());
                            }
                            assert_eq!(
                                request.uri().path(),
                                "/apis/authentication.k8s.io/v1/tokenreviews"
                            );
                            let body = request.into_body().collect().await.unwrap().to_bytes();
                            let review: serde_json::Value = serde_json::from_slice(&body).unwrap();
                            let token = review["spec"]["token"].as_str().unwrap_or("");
                            let audiences = review["spec"]["audiences"].clone();
                            let status = match token {
                                "order-token" => {
                                    serde_json::json!({"authenticated": true, "audiences": audiences,
                                "user": {"username": "system:serviceaccount:default:order"}})
                                }
                                "prefixed-order-token" => {
                                    serde_json::json!({"authenticated": true, "audiences": audiences,
                                "user": {"username": "system:serviceaccount:default:shop-minimesh-order"}})
                                }
                                "payment-token" => {
                                    serde_json::json!({"authenticated": true, "audiences": audiences,
                                "user": {"username": "system:serviceaccount:default:payment"}})
                                }
                                "wrong-audience" => {
                                    serde_json::json!({"authenticated": true, "audiences": ["kubernetes"],
                                "user": {"username": "system:serviceaccount:default:order"}})
                                }
                                _ => {
                                    serde_json::json!({"authenticated": false, "error": "invalid bearer token"})
                                }
                            };
                            let answer = serde_json::json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "status": status});
                            Ok::<_, std::convert::Infallible>(
                                http::Response::builder()
                                    .status(201)
                                    .header("content-type", "application/json")
                                    .body(Full::new(Bytes::from(answer.to_string())))
                                    .unwrap(),
                            )
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    StandIn {
        url: format!("https://localhost:{port}"),
        ca_file: ca_dir.join("ca.pem"),
        bearers,
    }
}

struct Running {
    addr: String,
    ca_pem: String,
    key: BootstrapKey,
    dir: tempfile::TempDir,
    stand_in: StandIn,
}

async fn start_issuer() -> Running {
    start_issuer_with_prefix("").await
}

async fn start_issuer_with_prefix(account_prefix: &str) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("mesh-ca");
    init_ca(&ca_dir, 1, false).unwrap();
    let stand_in = token_review_stand_in(dir.path()).await;
    let own_token = dir.path().join("issuer-token");
    std::fs::write(&own_token, "issuer-own-token\n").unwrap();
    let key = BootstrapKey::generate();
    let args = IssuerArgs {
        listen: String::new(),
        ca_cert: ca_dir.join("ca.pem"),
        ca_key: ca_dir.join("ca.key"),
        trust_domain: "minimesh.local".into(),
        cert_ttl: Duration::from_secs(60),
        server_names: vec!["localhost".into()],
        bootstrap_key: Some(key.to_hex().to_owned()),
        kubernetes_api: Some(stand_in.url.clone()),
        kubernetes_ca: stand_in.ca_file.clone(),
        kubernetes_token_file: own_token,
        token_audience: "minimesh-identity".into(),
        service_account_prefix: account_prefix.into(),
    };
    let issuer = Arc::new(Issuer::new(&args, Arc::new(|_| {})).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("https://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        serve(
            issuer,
            listener,
            &["localhost".to_owned()],
            std::future::pending(),
        )
        .await
    });
    Running {
        addr,
        ca_pem: std::fs::read_to_string(ca_dir.join("ca.pem")).unwrap(),
        key,
        dir,
        stand_in,
    }
}

impl Running {
    fn config(&self, identity: SpiffeId, credential: Credential) -> IssuerClientConfig {
        IssuerClientConfig {
            addr: self.addr.clone(),
            server_name: "localhost".into(),
            ca_pem: self.ca_pem.clone(),
            identity,
            credential,
        }
    }

    fn token_file(&self, token: &str) -> PathBuf {
        let path = self.dir.path().join(format!("{token}.jwt"));
        std::fs::write(&path, token).unwrap();
        path
    }
}

fn refused(result: Result<impl std::fmt::Debug, ClientError>) -> tonic::Code {
    match result {
        Err(ClientError::Refused(status)) => status.code(),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn leaf_id(chain_pem: &str) -> SpiffeId {
    let der = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .next()
        .unwrap()
        .unwrap();
    spiffe_id_of(&der).unwrap()
}

#[tokio::test]
async fn a_bootstrap_token_gets_its_own_identity_once_and_nothing_else() {
    let issuer = start_issuer().await;
    let order_token = issuer.key.mint(&id("order"), Duration::from_secs(60));
    // Asking for payment with order's token.
    let as_payment = issuer.config(id("payment"), Credential::Bootstrap(order_token.clone()));
    assert_eq!(
        refused(certify(&as_payment, None).await),
        tonic::Code::PermissionDenied
    );
    // A token is spent by any use: the refused request burnt it (a thief
    // cannot keep trying), so the replay is refused too.
    let as_order = issuer.config(id("order"), Credential::Bootstrap(order_token));
    assert_eq!(
        refused(certify(&as_order, None).await),
        tonic::Code::Unauthenticated
    );
    let fresh = issuer.key.mint(&id("order"), Duration::from_secs(60));
    let as_order = issuer.config(id("order"), Credential::Bootstrap(fresh));
    let issued = certify(&as_order, None).await.unwrap();
    assert_eq!(leaf_id(&issued.chain_pem), id("order"));
    let life = issued.expires_at.duration_since(issued.issued_at).unwrap();
    assert!(
        life <= Duration::from_secs(61) && life >= Duration::from_secs(55),
        "{life:?}"
    );
    assert_eq!(
        refused(certify(&as_order, None).await),
        tonic::Code::Unauthenticated
    );
    // A forged token.
    let forged = BootstrapKey::generate().mint(&id("order"), Duration::from_secs(60));
    let forged = issuer.config(id("order"), Credential::Bootstrap(forged));
    assert_eq!(
        refused(certify(&forged, None).await),
        tonic::Code::Unauthenticated
    );
    // Renewal with the current certificate: the same identity only.
    let renewed = certify(
        &issuer.config(id("order"), Credential::Bootstrap(String::new())),
        Some(&issued),
    )
    .await
    .unwrap();
    assert_eq!(leaf_id(&renewed.chain_pem), id("order"));
    assert_ne!(renewed.chain_pem, issued.chain_pem);
    let other = issuer.config(id("payment"), Credential::Bootstrap(String::new()));
    assert_eq!(
        refused(certify(&other, Some(&issued)).await),
        tonic::Code::PermissionDenied
    );
}

#[tokio::test]
async fn a_service_account_token_gets_only_the_identity_token_review_names() {
    let issuer = start_issuer().await;
    let order_jwt = issuer.token_file("order-token");
    // order's token asking for payment.
    let as_payment = issuer.config(id("payment"), Credential::TokenFile(order_jwt.clone()));
    assert_eq!(
        refused(certify(&as_payment, None).await),
        tonic::Code::PermissionDenied
    );
    let issued = certify(
        &issuer.config(id("order"), Credential::TokenFile(order_jwt)),
        None,
    )
    .await
    .unwrap();
    assert_eq!(leaf_id(&issued.chain_pem), id("order"));
    // Another namespace is another identity.
    let elsewhere = SpiffeId::new("minimesh.local", "shop", "order").unwrap();
    let in_shop = issuer.config(
        elsewhere,
        Credential::TokenFile(issuer.token_file("order-token")),
    );
    assert_eq!(
        refused(certify(&in_shop, None).await),
        tonic::Code::PermissionDenied
    );
    for token in ["garbage", "wrong-audience"] {
        let config = issuer.config(id("order"), Credential::TokenFile(issuer.token_file(token)));
        assert_eq!(
            refused(certify(&config, None).await),
            tonic::Code::Unauthenticated,
            "{token}"
        );
    }
    // The issuer authenticated itself to the API server with its own token.
    let bearers = issuer.stand_in.bearers.lock().unwrap().clone();
    assert!(
        !bearers.is_empty() && bearers.iter().all(|b| b == "Bearer issuer-own-token"),
        "{bearers:?}"
    );
}

/// Two Helm releases in one namespace: ServiceAccounts carry the release's
/// prefix, identities do not, and an account without the prefix gets none.
#[tokio::test]
async fn a_service_account_prefix_is_taken_off_and_required() {
    let issuer = start_issuer_with_prefix("shop-minimesh-").await;
    let prefixed = issuer.config(
        id("order"),
        Credential::TokenFile(issuer.token_file("prefixed-order-token")),
    );
    let issued = certify(&prefixed, None).await.unwrap();
    assert_eq!(leaf_id(&issued.chain_pem), id("order"));
    let bare = issuer.config(
        id("order"),
        Credential::TokenFile(issuer.token_file("order-token")),
    );
    assert_eq!(
        refused(certify(&bare, None).await),
        tonic::Code::PermissionDenied
    );
}

#[tokio::test]
async fn no_credential_and_bad_requests_are_refused_with_reasons() {
    let issuer = start_issuer().await;
    let token = issuer.key.mint(&id("order"), Duration::from_secs(60));
    let other_domain = SpiffeId::new("evil.local", "default", "order").unwrap();
    let config = issuer.config(other_domain, Credential::Bootstrap(token));
    assert_eq!(
        refused(certify(&config, None).await),
        tonic::Code::InvalidArgument
    );
    // The raw API: no credential and no client certificate.
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(&issuer.ca_pem))
        .domain_name("localhost");
    let channel = tonic::transport::Endpoint::from_shared(issuer.addr.clone())
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = minimesh_identity::pb::identity_client::IdentityClient::new(channel);
    let status = client
        .certify(minimesh_identity::pb::CertifyRequest {
            identity: id("order").to_string(),
            csr: vec![1, 2, 3],
            credential: None,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    let token = issuer.key.mint(&id("order"), Duration::from_secs(60));
    let status = client
        .certify(minimesh_identity::pb::CertifyRequest {
            identity: id("order").to_string(),
            csr: b"not a csr".to_vec(),
            credential: Some(
                minimesh_identity::pb::certify_request::Credential::BootstrapToken(token),
            ),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
}
