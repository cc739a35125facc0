//! `minimesh identity`: the issuer. It holds the signing key and answers
//! certificate signing requests over gRPC on TLS. A caller gets a
//! certificate only for the identity it proves: with a one-time bootstrap
//! token (local), a ServiceAccount token checked by TokenReview
//! (Kubernetes), or, to renew, the mesh certificate it holds now.

use crate::bootstrap::{BootstrapKey, BootstrapVerifier};
use crate::pb::identity_server::{Identity, IdentityServer};
use crate::pb::{CertifyRequest, CertifyResponse, certify_request::Credential};
use crate::tokenreview::TokenReviewer;
use minimesh_certs::SigningCa;
use minimesh_spiffe::{SpiffeId, spiffe_id_of};
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tonic::transport::{Certificate, Identity as TlsIdentity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status};

/// The shortest certificate lifetime the issuer hands out.
pub const MIN_TTL: Duration = Duration::from_secs(10);
/// Lifetime of the issuer's own serving certificate (it is re-made at every start).
const SERVING_CERT_TTL: Duration = Duration::from_secs(397 * 24 * 3600);

/// `minimesh identity`: where to listen, the CA to sign with, and how to authenticate proxies.
#[derive(Debug, Clone, clap::Args)]
pub struct IssuerArgs {
    /// gRPC (TLS) listener for certificate requests.
    #[arg(long, env = "MINIMESH_LISTEN", default_value = "0.0.0.0:8443")]
    pub listen: String,
    /// The signing certificate: the trust anchor itself or an issuer certificate signed by it.
    #[arg(long, env = "MINIMESH_CA_CERT")]
    pub ca_cert: PathBuf,
    /// The signing certificate's private key.
    #[arg(long, env = "MINIMESH_CA_KEY")]
    pub ca_key: PathBuf,
    /// The trust domain every issued identity belongs to.
    #[arg(long, env = "MINIMESH_TRUST_DOMAIN", default_value = minimesh_spiffe::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// Lifetime of every workload certificate.
    #[arg(long, env = "MINIMESH_CERT_TTL", value_parser = humantime::parse_duration, default_value = "24h")]
    pub cert_ttl: Duration,
    /// DNS names of this issuer, for its own serving certificate.
    #[arg(
        long,
        env = "MINIMESH_SERVER_NAMES",
        value_delimiter = ',',
        default_value = "localhost"
    )]
    pub server_names: Vec<String>,
    /// Local meshes: the key bootstrap tokens are checked with (64 hex digits;
    /// `minimesh up` passes it in the environment).
    #[arg(long, env = crate::bootstrap::KEY_ENV, hide_env_values = true)]
    pub bootstrap_key: Option<String>,
    /// Kubernetes: the API server that checks ServiceAccount tokens (TokenReview).
    /// Default: from KUBERNETES_SERVICE_HOST/PORT when running in a pod.
    #[arg(long, env = "MINIMESH_KUBERNETES_API")]
    pub kubernetes_api: Option<String>,
    /// CA bundle that verifies the API server.
    #[arg(
        long,
        env = "MINIMESH_KUBERNETES_CA",
        default_value = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
    )]
    pub kubernetes_ca: PathBuf,
    /// This issuer's own token for the API server.
    #[arg(
        long,
        env = "MINIMESH_KUBERNETES_TOKEN_FILE",
        default_value = "/var/run/secrets/kubernetes.io/serviceaccount/token"
    )]
    pub kubernetes_token_file: PathBuf,
    /// The audience proxies' ServiceAccount tokens must be bound to.
    #[arg(
        long,
        env = "MINIMESH_TOKEN_AUDIENCE",
        default_value = "minimesh-identity"
    )]
    pub token_audience: String,
    /// ServiceAccounts are named `<prefix><identity>` (a Helm release's
    /// prefix, so two releases can share a namespace): the prefix is taken
    /// off to form the identity, and a ServiceAccount without it is refused.
    #[arg(long, env = "MINIMESH_SERVICE_ACCOUNT_PREFIX", default_value = "")]
    pub service_account_prefix: String,
}

/// Why the issuer could not start.
#[derive(Debug, thiserror::Error)]
pub enum IssuerError {
    /// The CA or a credential file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What the read failed with.
        source: std::io::Error,
    },
    /// The CA could not be loaded or its serving certificate made.
    #[error(transparent)]
    Certs(#[from] minimesh_certs::CertsError),
    /// The bootstrap key is not valid.
    #[error(transparent)]
    Bootstrap(#[from] crate::bootstrap::TokenError),
    /// The TokenReview client could not be set up.
    #[error(transparent)]
    Review(#[from] crate::tokenreview::ReviewError),
    /// Neither a bootstrap key nor a Kubernetes API was given.
    #[error("no way to authenticate proxies: give a bootstrap key or a Kubernetes API")]
    NoAuthenticator,
    /// The certificate lifetime is shorter than renewal can work with.
    #[error("--cert-ttl must be at least {MIN_TTL:?}")]
    TtlTooShort,
    /// The trust domain is not a valid SPIFFE segment.
    #[error("trust domain: {0}")]
    TrustDomain(String),
    /// The listener could not be bound.
    #[error("binding {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: String,
        /// What the bind failed with.
        source: std::io::Error,
    },
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Counts of what the issuer did, for its metrics.
pub type Outcome = Arc<dyn Fn(&'static str) + Send + Sync>;

/// The issuer's state: the signing key and the authenticators.
pub struct Issuer {
    ca: SigningCa,
    trust_domain: String,
    ttl: Duration,
    bootstrap: Option<BootstrapVerifier>,
    reviewer: Option<TokenReviewer>,
    account_prefix: String,
    outcome: Outcome,
}

impl std::fmt::Debug for Issuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issuer")
            .field("trust_domain", &self.trust_domain)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

fn read(path: &PathBuf) -> Result<String, IssuerError> {
    std::fs::read_to_string(path).map_err(|source| IssuerError::Read {
        path: path.clone(),
        source,
    })
}

impl Issuer {
    /// The issuer from its arguments; `outcome` is called with the result of every request (metrics).
    pub fn new(args: &IssuerArgs, outcome: Outcome) -> Result<Self, IssuerError> {
        if args.cert_ttl < MIN_TTL {
            return Err(IssuerError::TtlTooShort);
        }
        SpiffeId::new(&args.trust_domain, "ns", "sa")
            .map_err(|e| IssuerError::TrustDomain(e.to_string()))?;
        let ca = SigningCa::from_pem(&read(&args.ca_cert)?, &read(&args.ca_key)?)?;
        let bootstrap = match &args.bootstrap_key {
            Some(hex) => Some(BootstrapVerifier::new(BootstrapKey::from_hex(hex)?)),
            None => None,
        };
        let api = args.kubernetes_api.clone().or_else(|| {
            let host = std::env::var("KUBERNETES_SERVICE_HOST").ok()?;
            let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
            Some(if host.contains(':') {
                format!("https://[{host}]:{port}")
            } else {
                format!("https://{host}:{port}")
            })
        });
        let reviewer = match api {
            Some(api) => Some(TokenReviewer::new(
                &api,
                args.kubernetes_ca.clone(),
                args.kubernetes_token_file.clone(),
                args.token_audience.clone(),
            )?),
            None => None,
        };
        if bootstrap.is_none() && reviewer.is_none() {
            return Err(IssuerError::NoAuthenticator);
        }
        Ok(Self {
            ca,
            trust_domain: args.trust_domain.clone(),
            ttl: args.cert_ttl,
            bootstrap,
            reviewer,
            account_prefix: args.service_account_prefix.clone(),
            outcome,
        })
    }

    /// Who the caller proved to be.
    async fn authenticate(
        &self,
        credential: Option<&Credential>,
        peer_leaf: Option<&[u8]>,
    ) -> Result<SpiffeId, Status> {
        match credential {
            Some(Credential::BootstrapToken(token)) => {
                let verifier = self.bootstrap.as_ref().ok_or_else(|| {
                    Status::unauthenticated("this issuer takes no bootstrap tokens")
                })?;
                verifier
                    .verify(token)
                    .map_err(|e| Status::unauthenticated(e.to_string()))
            }
            Some(Credential::ServiceAccountToken(token)) => {
                let reviewer = self.reviewer.as_ref().ok_or_else(|| {
                    Status::unauthenticated("this issuer does not check ServiceAccount tokens")
                })?;
                let account = reviewer.review(token).await.map_err(|e| {
                    if e.is_callers_fault() {
                        Status::unauthenticated(e.to_string())
                    } else {
                        tracing::warn!(%e, "TokenReview failed");
                        Status::unavailable(e.to_string())
                    }
                })?;
                let name = account
                    .name
                    .strip_prefix(self.account_prefix.as_str())
                    .filter(|name| !name.is_empty())
                    .ok_or_else(|| {
                        Status::permission_denied(format!(
                            "ServiceAccount {}/{} is not one of this mesh's (their names start with {:?})",
                            account.namespace, account.name, self.account_prefix
                        ))
                    })?;
                SpiffeId::new(&self.trust_domain, &account.namespace, name)
                    .map_err(|e| Status::permission_denied(e.to_string()))
            }
            None => match peer_leaf {
                // Renewal: the TLS layer verified the chain to our anchor.
                Some(der) => spiffe_id_of(der).map_err(|e| Status::unauthenticated(e.to_string())),
                None => Err(Status::unauthenticated(
                    "no credential: send a bootstrap or ServiceAccount token, or present your current mesh certificate",
                )),
            },
        }
    }

    async fn certify(
        &self,
        request: &CertifyRequest,
        peer_leaf: Option<&[u8]>,
    ) -> Result<CertifyResponse, Status> {
        let wanted: SpiffeId = request
            .identity
            .parse()
            .map_err(|e: minimesh_spiffe::SpiffeError| Status::invalid_argument(e.to_string()))?;
        if wanted.trust_domain != self.trust_domain {
            return Err(Status::invalid_argument(format!(
                "{wanted} is outside the trust domain {}",
                self.trust_domain
            )));
        }
        let proven = self
            .authenticate(request.credential.as_ref(), peer_leaf)
            .await?;
        if proven != wanted {
            return Err(Status::permission_denied(format!(
                "the caller proved {proven}; it cannot get a certificate for {wanted}"
            )));
        }
        let (chain, not_after) = self
            .ca
            .sign_csr(&request.csr, &wanted, self.ttl)
            .map_err(|e| Status::invalid_argument(format!("certificate signing request: {e}")))?;
        tracing::info!(identity = %wanted, expires = %not_after, "certificate issued");
        Ok(CertifyResponse {
            certificate_chain_pem: chain,
            expires_at: Some(prost_types::Timestamp {
                seconds: not_after.unix_timestamp(),
                nanos: 0,
            }),
        })
    }
}

#[tonic::async_trait]
impl Identity for Arc<Issuer> {
    async fn certify(
        &self,
        request: Request<CertifyRequest>,
    ) -> Result<Response<CertifyResponse>, Status> {
        let peer = request.peer_certs();
        let leaf = peer.as_ref().and_then(|certs| certs.first());
        let result = Issuer::certify(self, request.get_ref(), leaf.map(|c| c.as_ref())).await;
        (self.outcome)(if result.is_ok() { "issued" } else { "refused" });
        if let Err(status) = &result {
            tracing::info!(identity = %request.get_ref().identity, code = ?status.code(), message = status.message(), "certificate refused");
        }
        result.map(Response::new)
    }
}

/// Serves `issuer` on `listener` (TLS, client certificates optional) until
/// `shutdown` resolves.
pub async fn serve(
    issuer: Arc<Issuer>,
    listener: tokio::net::TcpListener,
    server_names: &[String],
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), IssuerError> {
    let serving = issuer.ca.issue_server(server_names, SERVING_CERT_TTL)?;
    let tls = ServerTlsConfig::new()
        .identity(TlsIdentity::from_pem(serving.cert_pem, serving.key_pem))
        .client_ca_root(Certificate::from_pem(issuer.ca.cert_pem()))
        .client_auth_optional(true);
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    Server::builder()
        .tls_config(tls)?
        .timeout(Duration::from_secs(30))
        .add_service(IdentityServer::new(issuer))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(())
}
