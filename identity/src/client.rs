//! A proxy's side of identity: a private key generated in memory, a CSR to
//! the issuer, and renewal at about 70% of the certificate's life (with
//! jitter, so replicas do not renew in step). While the issuer is away the
//! proxy keeps its current certificate and retries with back-off.

use crate::pb::identity_client::IdentityClient;
use crate::pb::{CertifyRequest, certify_request};
use minimesh_spiffe::SpiffeId;
use rand::Rng;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity as TlsIdentity};

/// Renew at this share of the lifetime, ± [`JITTER`].
const RENEW_AT: f64 = 0.7;
const JITTER: f64 = 0.05;
const BACKOFF_FIRST: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// The shortest time one renewal attempt is given.
const MIN_ATTEMPT: Duration = Duration::from_secs(1);

/// Why the issuer gave no certificate.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The issuer address is not a usable URI.
    #[error("identity issuer address {addr:?}: {message}")]
    Address {
        /// The address given.
        addr: String,
        /// Why it cannot be used.
        message: String,
    },
    /// No answer: connect, TLS or transport failure, or a timeout. Worth retrying.
    #[error("identity issuer unreachable: {0}")]
    Unreachable(String),
    /// The issuer answered with an error status.
    #[error("identity issuer refused: {0}")]
    Refused(tonic::Status),
    /// The issuer's answer holds no usable certificate.
    #[error("identity issuer answered with {0}")]
    BadAnswer(String),
    /// Making the key or the CSR failed (rcgen).
    #[error("making the key and CSR: {0}")]
    Csr(#[from] rcgen::Error),
    /// The ServiceAccount token file could not be read.
    #[error("reading the ServiceAccount token {path}: {message}")]
    Token {
        /// The token file.
        path: PathBuf,
        /// What the read failed with.
        message: String,
    },
}

impl ClientError {
    /// Whether asking again with the same credential cannot help.
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            ClientError::Refused(status)
                if matches!(status.code(), tonic::Code::Unauthenticated | tonic::Code::PermissionDenied | tonic::Code::InvalidArgument)
        ) || matches!(self, ClientError::Address { .. } | ClientError::Csr(_))
    }
}

/// How this proxy proves who it is on its first request.
#[derive(Debug, Clone)]
pub enum Credential {
    /// A one-time token from `minimesh up`.
    Bootstrap(String),
    /// A projected ServiceAccount token, re-read on every request (it rotates).
    TokenFile(PathBuf),
}

/// Where the issuer is and how this proxy proves who it is.
#[derive(Debug, Clone)]
pub struct IssuerClientConfig {
    /// `https://host:port` of the issuer.
    pub addr: String,
    /// The issuer's TLS name (a DNS SAN of its serving certificate).
    pub server_name: String,
    /// The trust anchor, PEM: verifies the issuer and, later, every peer.
    pub ca_pem: String,
    /// The identity to ask a certificate for.
    pub identity: SpiffeId,
    /// What proves the identity on the first request.
    pub credential: Credential,
}

/// A certificate the issuer gave, with the key it certifies.
#[derive(Clone)]
pub struct Issued {
    /// The certificate chain, leaf first, PEM.
    pub chain_pem: String,
    /// The private key made for it, PEM; it never leaves memory.
    pub key_pem: String,
    /// When the certificate was asked for (the start of its useful life here).
    pub issued_at: SystemTime,
    /// The certificate's notAfter.
    pub expires_at: SystemTime,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued")
            .field("issued_at", &self.issued_at)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

impl Issued {
    /// When to renew: about 70% into the lifetime, with jitter.
    pub fn renew_at(&self, rng: &mut impl Rng) -> SystemTime {
        let lifetime = self
            .expires_at
            .duration_since(self.issued_at)
            .unwrap_or_default();
        let share = RENEW_AT + rng.random_range(-JITTER..=JITTER);
        self.issued_at + lifetime.mul_f64(share)
    }
}

/// A key pair and a CSR for `id`; the key stays in memory. Only the key
/// matters to the issuer, which decides the certificate's names itself.
fn new_key_and_csr(id: &SpiffeId) -> Result<(String, Vec<u8>), rcgen::Error> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    params
        .subject_alt_names
        .push(rcgen::SanType::URI(id.to_string().try_into()?));
    let csr = params.serialize_request(&key)?;
    Ok((key.serialize_pem(), csr.der().to_vec()))
}

/// Asks the issuer once, within `limit` in all (connect, TLS, answer): a
/// hung issuer must not hold a renewal past the certificate's expiry.
pub async fn certify_within(
    config: &IssuerClientConfig,
    current: Option<&Issued>,
    limit: Duration,
) -> Result<Issued, ClientError> {
    tokio::time::timeout(limit, certify(config, current))
        .await
        .map_err(|_| ClientError::Unreachable(format!("no answer within {limit:?}")))?
}

/// Asks the issuer once. With `current`, the request is made over mTLS
/// with it, which is how a certificate is renewed without a token.
pub async fn certify(
    config: &IssuerClientConfig,
    current: Option<&Issued>,
) -> Result<Issued, ClientError> {
    let address = |message: String| ClientError::Address {
        addr: config.addr.clone(),
        message,
    };
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&config.ca_pem))
        .domain_name(config.server_name.clone());
    if let Some(current) = current {
        tls = tls.identity(TlsIdentity::from_pem(&current.chain_pem, &current.key_pem));
    }
    let endpoint = Endpoint::from_shared(config.addr.clone())
        .map_err(|e| address(e.to_string()))?
        .tls_config(tls)
        .map_err(|e| address(e.to_string()))?
        .connect_timeout(Duration::from_secs(3))
        .timeout(CALL_TIMEOUT);
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| ClientError::Unreachable(error_chain(&e)))?;
    let credential = match (&config.credential, current) {
        (Credential::TokenFile(path), _) => Some(certify_request::Credential::ServiceAccountToken(
            std::fs::read_to_string(path)
                .map_err(|e| ClientError::Token {
                    path: path.clone(),
                    message: e.to_string(),
                })?
                .trim()
                .to_owned(),
        )),
        // A bootstrap token is good once: renewals use the certificate.
        (Credential::Bootstrap(token), None) => {
            Some(certify_request::Credential::BootstrapToken(token.clone()))
        }
        (Credential::Bootstrap(_), Some(_)) => None,
    };
    let (key_pem, csr) = new_key_and_csr(&config.identity)?;
    let issued_at = SystemTime::now();
    let response = IdentityClient::new(channel)
        .certify(CertifyRequest {
            identity: config.identity.to_string(),
            csr,
            credential,
        })
        .await
        .map_err(|status| match status.code() {
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => {
                ClientError::Unreachable(status.message().to_owned())
            }
            _ => ClientError::Refused(status),
        })?
        .into_inner();
    let expires = response
        .expires_at
        .ok_or_else(|| ClientError::BadAnswer("no expiry".to_owned()))?;
    let expires_at = SystemTime::UNIX_EPOCH
        + Duration::from_secs(u64::try_from(expires.seconds).unwrap_or_default());
    if expires_at <= issued_at {
        return Err(ClientError::BadAnswer(
            "a certificate that has already expired".to_owned(),
        ));
    }
    Ok(Issued {
        chain_pem: response.certificate_chain_pem,
        key_pem,
        issued_at,
        expires_at,
    })
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let message = cause.to_string();
        if !text.contains(&message) {
            text.push_str(": ");
            text.push_str(&message);
        }
        source = cause.source();
    }
    text
}

/// Exponential back-off with full jitter.
fn backoff(attempt: u32, rng: &mut impl Rng) -> Duration {
    let ceiling = BACKOFF_FIRST
        .saturating_mul(2u32.saturating_pow(attempt.min(16)))
        .min(BACKOFF_MAX);
    ceiling.mul_f64(rng.random_range(0.5..=1.0))
}

/// The first certificate: asks until the issuer answers, for at most
/// `patience`; a refusal (wrong or spent credential) ends it at once.
pub async fn obtain(
    config: &IssuerClientConfig,
    patience: Duration,
) -> Result<Issued, ClientError> {
    let deadline = tokio::time::Instant::now() + patience;
    let mut attempt = 0;
    loop {
        match certify_within(config, None, CALL_TIMEOUT).await {
            Ok(issued) => return Ok(issued),
            Err(err) if err.is_final() => return Err(err),
            Err(err) => {
                let wait = backoff(attempt, &mut rand::rng());
                if tokio::time::Instant::now() + wait > deadline {
                    return Err(err);
                }
                tracing::warn!(%err, retry_in = ?wait, "no certificate yet");
                attempt += 1;
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// Renews `current` for as long as the task runs: calls `on_issued` with
/// every new certificate and `on_failure` after every failed attempt.
pub async fn renew_forever(
    config: IssuerClientConfig,
    mut current: Issued,
    on_issued: impl Fn(&Issued) + Send,
    on_failure: impl Fn(&ClientError) + Send,
) {
    loop {
        let at = current.renew_at(&mut rand::rng());
        let wait = at.duration_since(SystemTime::now()).unwrap_or_default();
        tokio::time::sleep(wait).await;
        let mut attempt = 0;
        loop {
            let left = current
                .expires_at
                .duration_since(SystemTime::now())
                .unwrap_or_default();
            // Attempts get shorter and more frequent as expiry nears.
            let limit = CALL_TIMEOUT.min(left / 2).max(MIN_ATTEMPT);
            match certify_within(&config, Some(&current), limit).await {
                Ok(issued) => {
                    tracing::info!(identity = %config.identity, expires = %humantime::format_rfc3339_seconds(issued.expires_at), "certificate renewed");
                    on_issued(&issued);
                    current = issued;
                    break;
                }
                Err(err) => {
                    on_failure(&err);
                    let left = current
                        .expires_at
                        .duration_since(SystemTime::now())
                        .unwrap_or_default();
                    let wait = backoff(attempt, &mut rand::rng())
                        .min(left / 4)
                        .max(MIN_ATTEMPT / 2);
                    tracing::warn!(%err, retry_in = ?wait, expires_in = ?left, "renewal failed; keeping the current certificate");
                    attempt += 1;
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn renewal_falls_around_seventy_percent_of_the_life() {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let issued = Issued {
            chain_pem: String::new(),
            key_pem: String::new(),
            issued_at: start,
            expires_at: start + Duration::from_secs(100),
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut seen = Vec::new();
        for _ in 0..200 {
            let at = issued.renew_at(&mut rng).duration_since(start).unwrap();
            assert!(
                (Duration::from_secs(65)..=Duration::from_secs(75)).contains(&at),
                "{at:?}"
            );
            seen.push(at);
        }
        seen.sort();
        assert!(
            seen[199] - seen[0] > Duration::from_secs(5),
            "jitter spreads renewals"
        );
    }

    #[test]
    fn backoff_grows_to_a_ceiling() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        assert!(backoff(0, &mut rng) <= BACKOFF_FIRST);
        for attempt in 0..40 {
            assert!(backoff(attempt, &mut rng) <= BACKOFF_MAX);
        }
        assert!(backoff(20, &mut rng) >= BACKOFF_MAX / 2);
    }
}
