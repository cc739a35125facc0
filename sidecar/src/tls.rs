//! Mutual TLS for the mesh: rustls configurations built from the mesh CA and
//! this proxy's identity, rebuilt when the files on disk change.
//!
//! Servers require a client certificate chaining to the mesh CA (rustls'
//! `WebPkiClientVerifier`, TLS 1.3 only, ALPN h2) and read the caller's SPIFFE
//! id from it. Clients verify the server's chain and then check that its URI
//! SAN is exactly the identity expected for the service they dialled.
//! Rotation: a new certificate and key on disk are picked up by the next
//! handshake; connections already open keep the configuration they started
//! with.

use minimesh_spiffe::{SpiffeId, spiffe_id_of};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

mod verify;
use verify::{SpiffeClientVerifier, SpiffeServerVerifier};
pub use verify::{peer_identity, server_name};

/// Why the mesh TLS configuration could not be made.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or parsed.
    #[error("reading {path}: {message}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The certificate file holds no certificate.
    #[error("{0} holds no certificate")]
    NoCertificate(PathBuf),
    /// rustls refused the certificate, key or CA.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The peer verifier could not be built from the CA.
    #[error("certificate verifier: {0}")]
    Verifier(String),
    /// Our own certificate carries no valid SPIFFE id.
    #[error("our own certificate: {0}")]
    Identity(#[from] minimesh_spiffe::SpiffeError),
}

/// Where this proxy's mesh credentials live.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The mesh CA certificate (PEM).
    pub ca: PathBuf,
    /// This proxy's certificate chain (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::Read {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(path.to_owned()));
    }
    Ok(certs)
}

/// One consistent set of credentials and the configurations built from it.
pub struct TlsConfigs {
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    identity: SpiffeId,
    server: Arc<ServerConfig>,
    clients: Mutex<HashMap<SpiffeId, Arc<ClientConfig>>>,
}

impl std::fmt::Debug for TlsConfigs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConfigs")
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

impl TlsConfigs {
    /// Loads the files and builds both configurations.
    pub fn load(files: &TlsFiles) -> Result<Self, TlsError> {
        let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| TlsError::Read {
            path: files.key.clone(),
            message: e.to_string(),
        })?;
        Self::from_parts(read_certs(&files.ca)?, read_certs(&files.cert)?, key)
    }

    /// From PEM held in memory (a certificate from the identity issuer).
    pub fn from_pem(ca_pem: &[u8], chain_pem: &[u8], key_pem: &[u8]) -> Result<Self, TlsError> {
        let parse = |what: &str, pem: &[u8]| -> Result<Vec<CertificateDer<'static>>, TlsError> {
            let certs = CertificateDer::pem_slice_iter(pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| TlsError::Read {
                    path: PathBuf::from(what),
                    message: e.to_string(),
                })?;
            if certs.is_empty() {
                return Err(TlsError::NoCertificate(PathBuf::from(what)));
            }
            Ok(certs)
        };
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| TlsError::Read {
            path: PathBuf::from("(issued key)"),
            message: e.to_string(),
        })?;
        Self::from_parts(
            parse("(trust anchor)", ca_pem)?,
            parse("(issued certificate)", chain_pem)?,
            key,
        )
    }

    fn from_parts(
        anchors: Vec<CertificateDer<'static>>,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Self, TlsError> {
        let mut roots = RootCertStore::empty();
        for ca in anchors {
            roots.add(ca)?;
        }
        let roots = Arc::new(roots);
        let identity = spiffe_id_of(&chain[0])?;
        let verifier = Arc::new(SpiffeClientVerifier {
            inner: WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
                .build()
                .map_err(|e| TlsError::Verifier(e.to_string()))?,
        });
        let mut server = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())?;
        server.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Self {
            roots,
            chain,
            key,
            identity,
            server: Arc::new(server),
            clients: Mutex::new(HashMap::new()),
        })
    }

    /// When this proxy's certificate expires, in seconds since the epoch.
    pub fn expires_at_unix(&self) -> Option<i64> {
        minimesh_spiffe::not_after_unix(&self.chain[0]).ok()
    }

    /// The identity in our own certificate.
    pub fn identity(&self) -> &SpiffeId {
        &self.identity
    }

    /// The configuration inbound listeners accept mTLS with.
    pub fn server(&self) -> Arc<ServerConfig> {
        self.server.clone()
    }

    /// A client configuration that accepts only a server presenting `expected`.
    pub fn client_for(&self, expected: &SpiffeId) -> Result<Arc<ClientConfig>, TlsError> {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(config) = clients.get(expected) {
            return Ok(config.clone());
        }
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            self.roots.clone(),
            provider(),
        )
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
        let verifier = Arc::new(SpiffeServerVerifier {
            inner,
            expected: expected.clone(),
        });
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        let config = Arc::new(config);
        clients.insert(expected.clone(), config.clone());
        Ok(config)
    }
}

/// Current credentials: re-read when any of the files changes, or replaced
/// by whoever renews them (the identity issuer's client).
pub struct Reloader {
    files: Option<TlsFiles>,
    current: RwLock<Arc<TlsConfigs>>,
}

type Stamp = Vec<Option<(SystemTime, u64)>>;

fn stamp(files: &TlsFiles) -> Stamp {
    [&files.ca, &files.cert, &files.key]
        .iter()
        .map(|p| {
            std::fs::metadata(p)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len())))
        })
        .collect()
}

impl Reloader {
    /// Loads the credentials (failing if they are unusable) and watches them
    /// every `poll` from then on.
    pub fn start(files: TlsFiles, poll: Duration) -> Result<Arc<Self>, TlsError> {
        let configs = TlsConfigs::load(&files)?;
        let mut last = stamp(&files);
        let reloader = Arc::new(Self {
            files: Some(files.clone()),
            current: RwLock::new(Arc::new(configs)),
        });
        let weak = Arc::downgrade(&reloader);
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(poll);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticker.tick().await;
                let Some(reloader) = weak.upgrade() else {
                    return;
                };
                let now = stamp(&files);
                if now == last {
                    continue;
                }
                match TlsConfigs::load(&files) {
                    Ok(configs) => {
                        tracing::info!(identity = %configs.identity(), "certificates reloaded");
                        *reloader.current.write().unwrap_or_else(|p| p.into_inner()) =
                            Arc::new(configs);
                        last = now;
                    }
                    // Half-written files: try again on the next tick.
                    Err(err) => {
                        tracing::warn!(%err, "new certificates not usable yet; keeping the current ones")
                    }
                }
            }
        });
        Ok(reloader)
    }

    /// Credentials that change only through [`Reloader::replace`].
    pub fn fixed(configs: TlsConfigs) -> Arc<Self> {
        Arc::new(Self {
            files: None,
            current: RwLock::new(Arc::new(configs)),
        })
    }

    /// New handshakes use `configs` from now on; open connections keep theirs.
    pub fn replace(&self, configs: TlsConfigs) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(configs);
    }

    /// Whether the credentials come from files.
    pub fn from_files(&self) -> bool {
        self.files.is_some()
    }

    /// The configurations in force now; a reload replaces them for new connections.
    pub fn current(&self) -> Arc<TlsConfigs> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}
