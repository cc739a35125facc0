//! Where a proxy's mesh credentials come from: files on disk (reloaded when
//! they change), or the identity issuer (a key made in memory, a CSR, and
//! renewal before expiry).

use crate::metrics::Metrics;
use crate::server::{IdentityArgs, SidecarError};
use crate::tls::{Reloader, TlsConfigs, TlsError, TlsFiles};
use minimesh_identity::client::{self, Credential, Issued, IssuerClientConfig};
use minimesh_spiffe::SpiffeId;
use std::sync::Arc;
use std::time::Duration;

/// How often certificate files are checked for changes.
const TLS_POLL: Duration = Duration::from_secs(1);
/// How long a starting proxy waits for its first certificate.
const FIRST_CERTIFICATE_PATIENCE: Duration = Duration::from_secs(60);

/// Why the proxy has no identity to start with.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The CA file could not be read.
    #[error("reading the trust anchor {path}: {message}")]
    TrustAnchor {
        /// The CA file.
        path: String,
        /// What the read failed with.
        message: String,
    },
    /// An issuer was given but nothing to prove who this proxy is.
    #[error(
        "--identity-addr needs a credential: --identity-token-file or MINIMESH_BOOTSTRAP_TOKEN"
    )]
    NoCredential,
    /// Neither certificate files nor an issuer were given.
    #[error("--cert and --key are needed unless --identity-addr is given")]
    NoFiles,
    /// The service, trust domain or namespace make no valid SPIFFE id.
    #[error("the identity {0}: {1}")]
    Name(String, minimesh_spiffe::SpiffeError),
    /// The issuer gave no certificate.
    #[error("no certificate from the identity issuer: {0}")]
    Issuer(#[from] client::ClientError),
}

fn configs(ca_pem: &str, issued: &Issued) -> Result<TlsConfigs, TlsError> {
    TlsConfigs::from_pem(
        ca_pem.as_bytes(),
        issued.chain_pem.as_bytes(),
        issued.key_pem.as_bytes(),
    )
}

/// The proxy's credentials, for identity `name` in `trust_domain`/`namespace`.
pub async fn credentials(
    args: &IdentityArgs,
    name: &str,
    trust_domain: &str,
    namespace: &str,
    metrics: &Arc<Metrics>,
) -> Result<Arc<Reloader>, SidecarError> {
    let Some(addr) = &args.identity_addr else {
        let (Some(cert), Some(key)) = (&args.cert, &args.key) else {
            return Err(IdentityError::NoFiles.into());
        };
        let reloader = Reloader::start(
            TlsFiles {
                ca: args.ca.clone(),
                cert: cert.clone(),
                key: key.clone(),
            },
            TLS_POLL,
        )?;
        if let Some(expiry) = reloader.current().expires_at_unix() {
            metrics.certificate_expires(expiry);
        }
        return Ok(reloader);
    };
    let ca_pem = std::fs::read_to_string(&args.ca).map_err(|e| IdentityError::TrustAnchor {
        path: args.ca.display().to_string(),
        message: e.to_string(),
    })?;
    let credential = match (&args.identity_token_file, &args.bootstrap_token) {
        (Some(path), _) => Credential::TokenFile(path.clone()),
        (None, Some(token)) => Credential::Bootstrap(token.clone()),
        (None, None) => return Err(IdentityError::NoCredential.into()),
    };
    let identity = SpiffeId::new(trust_domain, namespace, name)
        .map_err(|e| IdentityError::Name(name.to_owned(), e))?;
    let server_name = args.identity_server_name.clone().unwrap_or_else(|| {
        addr.parse::<http::Uri>()
            .ok()
            .and_then(|u| u.host().map(str::to_owned))
            .unwrap_or_default()
    });
    let config = IssuerClientConfig {
        addr: addr.clone(),
        server_name,
        ca_pem: ca_pem.clone(),
        identity,
        credential,
    };
    let first = client::obtain(&config, FIRST_CERTIFICATE_PATIENCE)
        .await
        .map_err(IdentityError::from)?;
    let reloader = Reloader::fixed(configs(&ca_pem, &first)?);
    if let Some(expiry) = reloader.current().expires_at_unix() {
        metrics.certificate_expires(expiry);
    }
    let (weak, metrics_ok, metrics_err) =
        (Arc::downgrade(&reloader), metrics.clone(), metrics.clone());
    tokio::spawn(client::renew_forever(
        config,
        first,
        move |issued| match (weak.upgrade(), configs(&ca_pem, issued)) {
            (Some(reloader), Ok(new)) => {
                if let Some(expiry) = new.expires_at_unix() {
                    metrics_ok.certificate_expires(expiry);
                }
                reloader.replace(new);
                metrics_ok.renewal(true);
            }
            (_, Err(err)) => {
                tracing::warn!(%err, "the issued certificate is unusable; keeping the current one");
                metrics_ok.renewal(false);
            }
            (None, Ok(_)) => {}
        },
        move |_| metrics_err.renewal(false),
    ));
    Ok(reloader)
}
