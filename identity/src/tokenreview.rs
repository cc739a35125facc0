//! Who a Kubernetes ServiceAccount token belongs to, asked of the API server
//! (`POST /apis/authentication.k8s.io/v1/tokenreviews`), as Linkerd's
//! identity controller does. The token must be bound to our audience.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

const REVIEW_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a ServiceAccount token could not be checked or was refused.
#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    /// The API server address is not usable.
    #[error("the Kubernetes API address {0:?} is not an https:// URL with a host")]
    BadUrl(String),
    /// The CA or the issuer's own token could not be read.
    #[error("reading {path}: {message}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What the read failed with.
        message: String,
    },
    /// The TLS client for the API server could not be built.
    #[error("TLS setup for the Kubernetes API: {0}")]
    Tls(String),
    /// No answer from the API server.
    #[error("the Kubernetes API could not be reached: {0}")]
    Unreachable(String),
    /// The API server refused the review (e.g. no RBAC to create TokenReviews).
    #[error("the Kubernetes API answered {status}: {body}")]
    Refused {
        /// The HTTP status.
        status: u16,
        /// The response body, for the log.
        body: String,
    },
    /// The answer is not a TokenReview status.
    #[error("the TokenReview answer could not be read: {0}")]
    BadAnswer(String),
    /// The API server did not authenticate the token.
    #[error("the token was not authenticated{0}")]
    NotAuthenticated(String),
    /// The token is not meant for the issuer.
    #[error("the token is not bound to the audience {0:?}")]
    WrongAudience(String),
    /// The token is a user's, not a ServiceAccount's.
    #[error("the token belongs to {0:?}, not to a ServiceAccount")]
    NotServiceAccount(String),
}

impl ReviewError {
    /// Whether the caller's token is at fault (rather than the API server).
    pub fn is_callers_fault(&self) -> bool {
        matches!(
            self,
            ReviewError::NotAuthenticated(_)
                | ReviewError::WrongAudience(_)
                | ReviewError::NotServiceAccount(_)
        )
    }
}

/// The namespace and name of the ServiceAccount a token proves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceAccount {
    /// The ServiceAccount's namespace.
    pub namespace: String,
    /// The ServiceAccount's name: the identity the proxy may have.
    pub name: String,
}

/// Asks the API server about tokens.
pub struct TokenReviewer {
    host: String,
    port: u16,
    server_name: ServerName<'static>,
    tls: Arc<rustls::ClientConfig>,
    /// The issuer's own credential for the API server (its ServiceAccount
    /// token, re-read on every review: projected tokens rotate).
    own_token_file: PathBuf,
    audience: String,
}

impl std::fmt::Debug for TokenReviewer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenReviewer")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("audience", &self.audience)
            .finish_non_exhaustive()
    }
}

fn read(path: &PathBuf) -> Result<Vec<u8>, ReviewError> {
    std::fs::read(path).map_err(|e| ReviewError::Read {
        path: path.clone(),
        message: e.to_string(),
    })
}

impl TokenReviewer {
    /// `api` is e.g. `https://10.96.0.1:443`; `ca_file` verifies it.
    pub fn new(
        api: &str,
        ca_file: PathBuf,
        own_token_file: PathBuf,
        audience: String,
    ) -> Result<Self, ReviewError> {
        let uri: http::Uri = api
            .parse()
            .map_err(|_| ReviewError::BadUrl(api.to_owned()))?;
        if uri.scheme_str() != Some("https") {
            return Err(ReviewError::BadUrl(api.to_owned()));
        }
        let host = uri
            .host()
            .ok_or_else(|| ReviewError::BadUrl(api.to_owned()))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = uri.port_u16().unwrap_or(443);
        let mut roots = rustls::RootCertStore::empty();
        let pem = read(&ca_file)?;
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| ReviewError::Tls(format!("{}: {e}", ca_file.display())))?;
            roots
                .add(cert)
                .map_err(|e| ReviewError::Tls(e.to_string()))?;
        }
        let tls = rustls::ClientConfig::builder_with_provider(crate::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| ReviewError::Tls(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let server_name =
            ServerName::try_from(host.clone()).map_err(|_| ReviewError::BadUrl(api.to_owned()))?;
        Ok(Self {
            host,
            port,
            server_name,
            tls: Arc::new(tls),
            own_token_file,
            audience,
        })
    }

    /// The ServiceAccount `token` belongs to.
    pub async fn review(&self, token: &str) -> Result<ServiceAccount, ReviewError> {
        tokio::time::timeout(REVIEW_TIMEOUT, self.review_once(token))
            .await
            .map_err(|_| ReviewError::Unreachable(format!("no answer within {REVIEW_TIMEOUT:?}")))?
    }

    async fn review_once(&self, token: &str) -> Result<ServiceAccount, ReviewError> {
        let own = String::from_utf8_lossy(&read(&self.own_token_file)?)
            .trim()
            .to_owned();
        let body = serde_json::json!({
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, "audiences": [self.audience]},
        });
        let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| ReviewError::Unreachable(e.to_string()))?;
        let stream = tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|e| ReviewError::Unreachable(format!("TLS: {e}")))?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| ReviewError::Unreachable(e.to_string()))?;
        tokio::spawn(connection);
        let request = http::Request::post("/apis/authentication.k8s.io/v1/tokenreviews")
            .header(http::header::HOST, self.host.as_str())
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::ACCEPT, "application/json")
            .header(http::header::AUTHORIZATION, format!("Bearer {own}"))
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|e| ReviewError::Unreachable(e.to_string()))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| ReviewError::Unreachable(e.to_string()))?;
        let status = response.status().as_u16();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| ReviewError::Unreachable(e.to_string()))?
            .to_bytes();
        if !(200..300).contains(&status) {
            let body: String = String::from_utf8_lossy(&bytes).chars().take(200).collect();
            return Err(ReviewError::Refused { status, body });
        }
        let answer: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| ReviewError::BadAnswer(e.to_string()))?;
        interpret(&answer, &self.audience)
    }
}

/// Reads a TokenReview's `status`.
fn interpret(answer: &serde_json::Value, audience: &str) -> Result<ServiceAccount, ReviewError> {
    let status = &answer["status"];
    if status["authenticated"] != true {
        let why = status["error"]
            .as_str()
            .map(|e| format!(": {e}"))
            .unwrap_or_default();
        return Err(ReviewError::NotAuthenticated(why));
    }
    // An API server that knows audiences echoes the ones the token is bound to.
    if let Some(audiences) = status["audiences"].as_array()
        && !audiences.iter().any(|a| a == audience)
    {
        return Err(ReviewError::WrongAudience(audience.to_owned()));
    }
    let username = status["user"]["username"]
        .as_str()
        .ok_or_else(|| ReviewError::BadAnswer("no status.user.username".to_owned()))?;
    match username
        .strip_prefix("system:serviceaccount:")
        .and_then(|rest| rest.split_once(':'))
    {
        Some((namespace, name)) if !namespace.is_empty() && !name.is_empty() => {
            Ok(ServiceAccount {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
            })
        }
        _ => Err(ReviewError::NotServiceAccount(username.to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_read_strictly() {
        let ok = serde_json::json!({"status": {"authenticated": true, "audiences": ["minimesh-identity"],
            "user": {"username": "system:serviceaccount:shop:order"}}});
        assert_eq!(
            interpret(&ok, "minimesh-identity").unwrap(),
            ServiceAccount {
                namespace: "shop".into(),
                name: "order".into()
            }
        );
        assert!(matches!(
            interpret(&ok, "other"),
            Err(ReviewError::WrongAudience(_))
        ));
        let denied =
            serde_json::json!({"status": {"authenticated": false, "error": "token expired"}});
        assert!(matches!(
            interpret(&denied, "minimesh-identity"),
            Err(ReviewError::NotAuthenticated(e)) if e.contains("expired")
        ));
        let user =
            serde_json::json!({"status": {"authenticated": true, "user": {"username": "alice"}}});
        assert!(matches!(
            interpret(&user, "minimesh-identity"),
            Err(ReviewError::NotServiceAccount(_))
        ));
        assert!(interpret(&serde_json::json!({}), "a").is_err());
    }
}
