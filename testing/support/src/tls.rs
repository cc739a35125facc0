//! TLS clients for the mesh's listeners: trusting a CA, presenting a
//! certificate or none, speaking h2.

use anyhow::Context;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use tokio::net::TcpStream;
use tonic::transport::{Channel, Endpoint};

/// A TLS 1.3 client (ALPN h2) that trusts the certificates in `ca_pem` and
/// presents `client` (certificate chain PEM, key PEM), if any.
pub fn client_config(
    ca_pem: &Path,
    client: Option<(Vec<u8>, Vec<u8>)>,
) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_pem)
        .with_context(|| format!("read {}", ca_pem.display()))?
    {
        roots.add(cert.context("a trusted certificate")?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots);
    let mut config = match client {
        Some((cert, key)) => {
            let chain = CertificateDer::pem_slice_iter(&cert)
                .collect::<Result<Vec<_>, _>>()
                .context("client certificate")?;
            let key = PrivateKeyDer::from_pem_slice(&key).context("client key")?;
            builder.with_client_auth_cert(chain, key)?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// A client acting as the mesh peer `name`: a leaf the test issues itself
/// from the mesh CA in `ca_dir` (kept in memory), trusting that CA.
pub fn mesh_peer(ca_dir: &Path, name: &str) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let leaf = minimesh_certs::issue_leaf(ca_dir, &minimesh_certs::LeafRequest::new(name))
        .with_context(|| format!("issue a test leaf for {name}"))?;
    client_config(
        &ca_dir.join("ca.pem"),
        Some((leaf.cert_pem.into_bytes(), leaf.key_pem.into_bytes())),
    )
}

/// The certificate a server showed on the latest connection of a channel.
pub type PeerCertificate = Arc<Mutex<Option<Vec<u8>>>>;

/// A gRPC channel to `addr` over TLS with `config`, verifying the server as
/// `server_name` (also the channel's authority), and what the server showed.
pub async fn tls_channel(
    addr: SocketAddr,
    server_name: &str,
    config: Arc<rustls::ClientConfig>,
) -> anyhow::Result<(Channel, PeerCertificate)> {
    let name = ServerName::try_from(server_name.to_owned())?;
    let seen = PeerCertificate::default();
    let seen_by_connector = seen.clone();
    let connector = tower::service_fn(move |_uri: http::Uri| {
        let (config, name, seen) = (config.clone(), name.clone(), seen_by_connector.clone());
        async move {
            let tcp = TcpStream::connect(addr).await?;
            let stream = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await?;
            let shown = stream.get_ref().1.peer_certificates();
            if let (Some(cert), Ok(mut slot)) = (shown.and_then(|c| c.first()), seen.lock()) {
                *slot = Some(cert.to_vec());
            }
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
        }
    });
    let channel = Endpoint::from_shared(format!("http://{server_name}"))?
        .connect_with_connector(connector)
        .await?;
    Ok((channel, seen))
}

/// The serial of the leaf certificate the peer of `stream` presented.
pub fn peer_serial(stream: &tokio_rustls::client::TlsStream<TcpStream>) -> Option<Vec<u8>> {
    let leaf = stream.get_ref().1.peer_certificates()?.first()?;
    serial_of(leaf)
}

/// The serial of the first certificate in the PEM file at `path`.
pub fn file_serial(path: &Path) -> Option<Vec<u8>> {
    let der = CertificateDer::from_pem_file(path).ok()?;
    serial_of(&der)
}

fn serial_of(der: &CertificateDer<'_>) -> Option<Vec<u8>> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(cert.raw_serial().to_vec())
}
