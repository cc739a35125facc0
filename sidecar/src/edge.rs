//! TLS at the gateway's edge, for callers outside the mesh: a server
//! certificate and key from files (in Kubernetes a Secret, e.g. the one
//! cert-manager keeps renewed), read again when they change, so a renewed
//! certificate is served without a restart. No client certificate is asked
//! for: who may call is the edge policy's business (`--expose`).

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

/// Why the edge certificate could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum EdgeTlsError {
    /// A certificate or key file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What the read failed with.
        source: std::io::Error,
    },
    /// The certificate file holds no certificate.
    #[error("{path} holds no PEM certificate")]
    NoCertificate {
        /// The certificate file.
        path: PathBuf,
    },
    /// The key file holds no usable private key.
    #[error("{path} holds no PEM private key: {message}")]
    NoKey {
        /// The key file.
        path: PathBuf,
        /// What the PEM reader said.
        message: String,
    },
    /// rustls refused the certificate or key.
    #[error("edge TLS: {0}")]
    Tls(#[from] rustls::Error),
}

/// The edge certificate, re-read when its files change.
pub struct EdgeTls {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<Loaded>,
}

struct Loaded {
    stamps: (Option<SystemTime>, Option<SystemTime>),
    config: Arc<ServerConfig>,
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

impl EdgeTls {
    /// Loads the certificate chain and key; fails at start on bad files.
    pub fn load(cert: &Path, key: &Path) -> Result<Self, EdgeTlsError> {
        let stamps = (modified(cert), modified(key));
        let config = Arc::new(build(cert, key)?);
        Ok(Self {
            cert: cert.to_owned(),
            key: key.to_owned(),
            current: RwLock::new(Loaded { stamps, config }),
        })
    }

    /// The configuration for the next handshake: reloaded if the files
    /// changed; a bad new pair is logged and the old one kept.
    pub fn config(&self) -> Arc<ServerConfig> {
        let stamps = (modified(&self.cert), modified(&self.key));
        {
            let current = self.current.read().unwrap_or_else(|p| p.into_inner());
            if current.stamps == stamps {
                return current.config.clone();
            }
        }
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        match build(&self.cert, &self.key) {
            Ok(config) => {
                tracing::info!(cert = %self.cert.display(), "edge certificate reloaded");
                current.config = Arc::new(config);
            }
            Err(err) => {
                tracing::warn!(%err, "edge certificate not reloaded; serving the previous one")
            }
        }
        current.stamps = stamps;
        current.config.clone()
    }
}

fn read(path: &Path) -> Result<Vec<u8>, EdgeTlsError> {
    std::fs::read(path).map_err(|source| EdgeTlsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn build(cert: &Path, key: &Path) -> Result<ServerConfig, EdgeTlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&read(cert)?)
        .filter_map(Result::ok)
        .collect();
    if chain.is_empty() {
        return Err(EdgeTlsError::NoCertificate {
            path: cert.to_owned(),
        });
    }
    let key_der =
        PrivateKeyDer::from_pem_slice(&read(key)?).map_err(|err| EdgeTlsError::NoKey {
            path: key.to_owned(),
            message: err.to_string(),
        })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}
