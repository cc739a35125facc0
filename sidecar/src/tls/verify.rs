//! The certificate checks of mesh mTLS: webpki chain verification, then the
//! SPIFFE rules for each side.

use minimesh_spiffe::{SpiffeId, spiffe_id_of};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, SignatureScheme};
use std::sync::Arc;

/// The server name to dial a peer by: its service name, which every leaf
/// carries as a DNS SAN.
pub fn server_name(expected: &SpiffeId) -> Option<ServerName<'static>> {
    ServerName::try_from(expected.name.clone()).ok()
}

/// Chain verification by webpki, then an exact check of the SPIFFE id.
#[derive(Debug)]
pub(super) struct SpiffeServerVerifier {
    pub(super) inner: Arc<rustls::client::WebPkiServerVerifier>,
    pub(super) expected: SpiffeId,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        match spiffe_id_of(end_entity) {
            Ok(id) if id == self.expected => Ok(ServerCertVerified::assertion()),
            Ok(id) => {
                tracing::warn!(expected = %self.expected, presented = %id, "peer presented the wrong identity");
                Err(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::ApplicationVerificationFailure,
                ))
            }
            Err(_) => Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Chain verification by webpki, then the SPIFFE rule: the client
/// certificate carries exactly one URI SAN and it is a well-formed SPIFFE id.
/// Anything else fails the handshake (and is counted as a TLS failure).
#[derive(Debug)]
pub(super) struct SpiffeClientVerifier {
    pub(super) inner: Arc<dyn ClientCertVerifier>,
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        match spiffe_id_of(end_entity) {
            Ok(_) => Ok(verified),
            Err(err) => {
                tracing::info!(%err, "client certificate carries no valid SPIFFE identity");
                Err(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::ApplicationVerificationFailure,
                ))
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The caller's identity, read from its client certificate after the handshake.
pub fn peer_identity(conn: &rustls::ServerConnection) -> Option<SpiffeId> {
    let certs = conn.peer_certificates()?;
    spiffe_id_of(certs.first()?).ok()
}
