//! TLS to PostgreSQL with libpq's `sslmode` meanings, which tokio-postgres
//! only partly parses (disable, prefer, require): `require` encrypts without
//! checking the certificate, `verify-ca` checks the chain, `verify-full` the
//! chain and the host name. Roots come from `sslrootcert` or the public
//! web PKI (managed services such as Cloud SQL or RDS publish their CA).

use crate::db::DbError;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{WebPkiServerVerifier, danger};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

/// A URL as tokio-postgres accepts it, plus the TLS settings taken out of it.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub url: String,
    pub mode: SslMode,
    pub root_cert: Option<String>,
}

impl Settings {
    pub(crate) fn from_url(url: &str) -> Result<Self, DbError> {
        let (base, query) = match url.split_once('?') {
            Some((base, query)) => (base, query),
            None => (url, ""),
        };
        let mut mode = SslMode::Prefer;
        let mut root_cert = None;
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match key {
                "sslmode" => {
                    mode = match value {
                        "disable" => SslMode::Disable,
                        "allow" | "prefer" => SslMode::Prefer,
                        "require" => SslMode::Require,
                        "verify-ca" => SslMode::VerifyCa,
                        "verify-full" => SslMode::VerifyFull,
                        other => {
                            return Err(DbError::Config(format!(
                                "sslmode={other} is not one of disable, allow, prefer, require, \
                                 verify-ca, verify-full"
                            )));
                        }
                    }
                }
                "sslrootcert" => root_cert = Some(percent_decode(value)),
                _ => kept.push(pair),
            }
        }
        // What tokio-postgres understands; verification is ours (connector).
        kept.push(match mode {
            SslMode::Disable => "sslmode=disable",
            SslMode::Prefer => "sslmode=prefer",
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => "sslmode=require",
        });
        Ok(Self {
            url: format!("{base}?{}", kept.join("&")),
            mode,
            root_cert,
        })
    }

    /// The connector for the pool and the LISTEN connection.
    pub(crate) fn connector(&self) -> Result<tokio_postgres_rustls::MakeRustlsConnect, DbError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|err| DbError::Config(format!("TLS to PostgreSQL: {err}")))?;
        let verifier: Arc<dyn ServerCertVerifier> = match self.mode {
            SslMode::Disable | SslMode::Prefer | SslMode::Require => {
                Arc::new(EncryptOnly { provider })
            }
            SslMode::VerifyCa | SslMode::VerifyFull => {
                let webpki =
                    WebPkiServerVerifier::builder_with_provider(Arc::new(self.roots()?), provider)
                        .build()
                        .map_err(|err| DbError::Config(format!("TLS to PostgreSQL: {err}")))?;
                if self.mode == SslMode::VerifyCa {
                    Arc::new(ChainOnly { webpki })
                } else {
                    webpki
                }
            }
        };
        let config = builder
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
    }

    fn roots(&self) -> Result<RootCertStore, DbError> {
        let mut roots = RootCertStore::empty();
        match &self.root_cert {
            Some(path) => {
                let pem = std::fs::read(path)
                    .map_err(|err| DbError::Config(format!("reading sslrootcert {path}: {err}")))?;
                for cert in rustls_pemfile_certs(&pem, path)? {
                    roots
                        .add(cert)
                        .map_err(|err| DbError::Config(format!("sslrootcert {path}: {err}")))?;
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        Ok(roots)
    }
}

fn rustls_pemfile_certs(pem: &[u8], path: &str) -> Result<Vec<CertificateDer<'static>>, DbError> {
    use rustls::pki_types::pem::PemObject;
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| DbError::Config(format!("sslrootcert {path}: {err}")))?;
    if certs.is_empty() {
        return Err(DbError::Config(format!(
            "sslrootcert {path} holds no certificate"
        )));
    }
    Ok(certs)
}

/// `%2F` and friends in a URL value (a path in `sslrootcert`).
fn percent_decode(value: &str) -> String {
    percent_encoding::percent_decode_str(value)
        .decode_utf8_lossy()
        .into_owned()
}

/// libpq's `require`: the session is encrypted, the server not
/// authenticated. Handshake signatures are still checked.
#[derive(Debug)]
struct EncryptOnly {
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// libpq's `verify-ca`: the chain must lead to a trusted root; the name on
/// the certificate is not compared with the host.
#[derive(Debug)]
struct ChainOnly {
    webpki: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .webpki
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName
                | rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(danger::ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libpq_modes_are_mapped_and_removed_from_the_url() {
        let s = Settings::from_url("postgres://u:p@db:5432/shop?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&application_name=x").unwrap();
        assert_eq!(s.mode, SslMode::VerifyFull);
        assert_eq!(s.root_cert.as_deref(), Some("/etc/ca.pem"));
        assert_eq!(
            s.url,
            "postgres://u:p@db:5432/shop?application_name=x&sslmode=require"
        );
        let s = Settings::from_url("postgres://db/shop").unwrap();
        assert_eq!(s.mode, SslMode::Prefer);
        assert_eq!(s.url, "postgres://db/shop?sslmode=prefer");
        assert!(Settings::from_url("postgres://db/x?sslmode=sometimes").is_err());
        assert!(
            Settings::from_url("postgres://db/x?sslmode=disable")
                .unwrap()
                .connector()
                .is_ok()
        );
    }

    #[test]
    fn a_missing_root_file_is_a_config_error() {
        let s =
            Settings::from_url("postgres://db/x?sslmode=verify-ca&sslrootcert=/nonexistent.pem")
                .unwrap();
        let err = s.connector().err().expect("must fail");
        assert!(err.to_string().contains("/nonexistent.pem"), "{err}");
    }
}
