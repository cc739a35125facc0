//! SPIFFE identities: `spiffe://<trust-domain>/ns/<namespace>/sa/<name>`.
//!
//! The id type, its validation, and the reading of an id and an expiry out of
//! a DER certificate (X.509-SVID). Kept apart from `minimesh-certs` so the
//! proxy can check identities without linking the certificate generator.

#![forbid(unsafe_code)]

use std::fmt;

/// The trust domain used when none is configured.
pub const DEFAULT_TRUST_DOMAIN: &str = "minimesh.local";
/// The Kubernetes-style namespace used when none is configured.
pub const DEFAULT_NAMESPACE: &str = "default";

/// A workload identity, `spiffe://<trust_domain>/ns/<namespace>/sa/<name>`;
/// every segment has passed validation (see [`SpiffeId::new`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SpiffeId {
    /// The mesh the identity belongs to, e.g. `minimesh.local`.
    pub trust_domain: String,
    /// The namespace of the workload's service account.
    pub namespace: String,
    /// The service account (in this mesh, the service) name, e.g. `order`.
    pub name: String,
}

/// Why a text or a certificate carries no valid SPIFFE id.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpiffeError {
    /// The text is not of the `spiffe://TD/ns/NS/sa/NAME` shape.
    #[error("{0:?} is not a SPIFFE id of the form spiffe://TRUST-DOMAIN/ns/NAMESPACE/sa/NAME")]
    Malformed(String),
    /// A segment is empty, too long, or holds a character outside `[a-z0-9._-]`.
    #[error("{0:?} may only hold lower-case letters, digits, '-', '.' and '_'")]
    BadSegment(String),
    /// The certificate has no URI SAN.
    #[error("the certificate carries no SPIFFE URI SAN")]
    Missing,
    /// The certificate has several URI SANs, which an X.509-SVID may not.
    #[error("the certificate carries {0} URI SANs; a SPIFFE identity has exactly one")]
    ManyUris(usize),
    /// The bytes are not a DER certificate x509-parser can read.
    #[error("the certificate could not be parsed: {0}")]
    Certificate(String),
}

fn check_segment(segment: &str) -> Result<(), SpiffeError> {
    let ok = !segment.is_empty()
        && segment.len() <= 253
        && segment
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(SpiffeError::BadSegment(segment.to_owned()))
    }
}

impl SpiffeId {
    /// Builds an id from its segments, each of which must be non-empty, at
    /// most 253 bytes, and only lower-case letters, digits, `-`, `.` or `_`.
    pub fn new(trust_domain: &str, namespace: &str, name: &str) -> Result<Self, SpiffeError> {
        for segment in [trust_domain, namespace, name] {
            check_segment(segment)?;
        }
        Ok(Self {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        })
    }
}

impl std::str::FromStr for SpiffeId {
    type Err = SpiffeError;

    fn from_str(uri: &str) -> Result<Self, SpiffeError> {
        let malformed = || SpiffeError::Malformed(uri.to_owned());
        let rest = uri.strip_prefix("spiffe://").ok_or_else(malformed)?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [td, "ns", ns, "sa", name] => Self::new(td, ns, name),
            _ => Err(malformed()),
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.name
        )
    }
}

/// The SPIFFE id of a DER certificate: its one and only URI SAN, which must
/// be a well-formed SPIFFE id (X.509-SVID). A certificate with no URI SAN,
/// several, or one that is not a SPIFFE id carries no identity.
pub fn spiffe_id_of(der: &[u8]) -> Result<SpiffeId, SpiffeError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| SpiffeError::Certificate(e.to_string()))?;
    let sans = cert
        .subject_alternative_name()
        .map_err(|e| SpiffeError::Certificate(e.to_string()))?
        .ok_or(SpiffeError::Missing)?;
    let uris: Vec<&str> = sans
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            x509_parser::extensions::GeneralName::URI(uri) => Some(*uri),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [] => Err(SpiffeError::Missing),
        [uri] => uri.parse(),
        many => Err(SpiffeError::ManyUris(many.len())),
    }
}

/// A DER certificate's notAfter, in seconds since the epoch.
pub fn not_after_unix(der: &[u8]) -> Result<i64, SpiffeError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| SpiffeError::Certificate(e.to_string()))?;
    Ok(cert.validity().not_after.timestamp())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        let id: SpiffeId = "spiffe://minimesh.local/ns/default/sa/order"
            .parse()
            .unwrap();
        assert_eq!(
            id,
            SpiffeId::new("minimesh.local", "default", "order").unwrap()
        );
        assert_eq!(
            id.to_string(),
            "spiffe://minimesh.local/ns/default/sa/order"
        );
    }

    #[test]
    fn rejects_other_shapes() {
        for bad in [
            "https://minimesh.local/ns/default/sa/order",
            "spiffe://minimesh.local/order",
            "spiffe://minimesh.local/ns/default/sa/order/extra",
            "spiffe://minimesh.local/ns//sa/order",
            "spiffe://Minimesh.local/ns/default/sa/order",
        ] {
            assert!(bad.parse::<SpiffeId>().is_err(), "{bad}");
        }
    }

    #[test]
    fn garbage_certificate_is_an_error_not_a_panic() {
        assert!(matches!(
            spiffe_id_of(&[0x30, 0x03, 0x01, 0x02]),
            Err(SpiffeError::Certificate(_))
        ));
        assert!(spiffe_id_of(&[]).is_err());
    }
}
