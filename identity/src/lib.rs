//! Workload identity for the mesh.
//!
//! - [`issuer`]: `minimesh identity`, which holds the signing key and turns
//!   certificate signing requests into short-lived SPIFFE certificates for
//!   callers that prove who they are;
//! - [`bootstrap`]: the one-time tokens `minimesh up` gives each proxy;
//! - [`tokenreview`]: the Kubernetes TokenReview check of ServiceAccount tokens;
//! - [`client`]: what a proxy runs: a key made in memory, a CSR, and renewal
//!   at about 70% of each certificate's life.

pub mod bootstrap;
pub mod client;
#[cfg(feature = "issuer")]
pub mod issuer;
pub mod tokenreview;

/// The generated gRPC API (`minimesh.identity.v1`).
pub mod pb {
    tonic::include_proto!("minimesh.identity.v1");
}

/// The crypto provider every TLS configuration here uses (one per process).
pub(crate) fn provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(rustls::crypto::ring::default_provider())
}
