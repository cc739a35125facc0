//! The mesh's certificate authority.
//!
//! `init_ca` makes an ECDSA P-256 root; `issue` makes a leaf for one identity,
//! `spiffe://<trust-domain>/ns/<namespace>/sa/<name>`, carried as a URI SAN
//! next to DNS SANs for the Kubernetes Service names (rustls checks server
//! names against DNS SANs only). Leaves serve both directions of mTLS, so they
//! carry the ServerAuth and ClientAuth usages. Private keys are written with
//! mode 0600.

#![forbid(unsafe_code)]

// The id type lives in its own crate so the proxy can use it without rcgen;
// re-exported so callers of this crate keep one import.
pub use minimesh_spiffe::{
    DEFAULT_NAMESPACE, DEFAULT_TRUST_DOMAIN, SpiffeError, SpiffeId, not_after_unix, spiffe_id_of,
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use time::{Duration, OffsetDateTime};

/// The trust anchor's certificate file in a CA directory.
pub const CA_CERT: &str = "ca.pem";
/// The trust anchor's private key file in a CA directory (mode 0600).
pub const CA_KEY: &str = "ca.key";

/// Why a CA or leaf could not be made or written.
#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    /// `init_ca` found a CA in the directory and was not told to replace it.
    #[error("a CA already exists in {0} (pass --force to replace it)")]
    CaExists(PathBuf),
    /// A CA file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file that could not be read.
        path: PathBuf,
        /// What the read failed with.
        source: std::io::Error,
    },
    /// A certificate, key or directory could not be written.
    #[error("writing {path}: {source}")]
    Write {
        /// The file or directory that could not be written.
        path: PathBuf,
        /// What the write failed with.
        source: std::io::Error,
    },
    /// rcgen refused a parameter, a key or a CSR.
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// The identity asked for is not a valid SPIFFE id.
    #[error(transparent)]
    Spiffe(#[from] SpiffeError),
    /// A validity of fewer than one day.
    #[error("validity must be at least one day, got {0}")]
    Validity(i64),
    /// A validity that ends after the last date X.509 can hold.
    #[error("a validity of {0} days ends after the year 9999, the last date X.509 can hold")]
    ValidityTooLong(i64),
}

/// Writes `contents` to `path`, readable by the owner only when `private`.
fn write_file(path: &Path, contents: &[u8], private: bool) -> Result<(), CertsError> {
    let err = |source| CertsError::Write {
        path: path.to_owned(),
        source,
    };
    let mut options = OpenOptions::new();
    options.write(true).create(true).truncate(true);
    if private {
        options.mode(0o600);
    }
    let mut file = options.open(path).map_err(err)?;
    file.write_all(contents).map_err(err)?;
    if private {
        // An existing file keeps its old mode on open; tighten it explicitly.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    }
    Ok(())
}

fn read_file(path: &Path) -> Result<String, CertsError> {
    std::fs::read_to_string(path).map_err(|source| CertsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f; // keep it positive
    SerialNumber::from_slice(&bytes)
}

/// A validity window starting a little in the past (clock skew between hosts).
fn validity(days: i64) -> Result<(OffsetDateTime, OffsetDateTime), CertsError> {
    if days < 1 {
        return Err(CertsError::Validity(days));
    }
    let now = OffsetDateTime::now_utc();
    let end = days
        .checked_mul(86_400)
        .and_then(|seconds| now.checked_add(Duration::seconds(seconds)))
        .filter(|end| end.year() <= 9999)
        .ok_or(CertsError::ValidityTooLong(days))?;
    Ok((now - Duration::minutes(5), end))
}

/// Creates the mesh CA in `out`: `ca.pem` and `ca.key`.
pub fn init_ca(out: &Path, days: i64, force: bool) -> Result<(), CertsError> {
    std::fs::create_dir_all(out).map_err(|source| CertsError::Write {
        path: out.to_owned(),
        source,
    })?;
    let cert_path = out.join(CA_CERT);
    if cert_path.exists() && !force {
        return Err(CertsError::CaExists(out.to_owned()));
    }
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, "minimesh mesh CA");
    name.push(DnType::OrganizationName, "minimesh");
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.serial_number = Some(random_serial());
    (params.not_before, params.not_after) = validity(days)?;
    let cert = params.self_signed(&key)?;
    write_file(&out.join(CA_KEY), key.serialize_pem().as_bytes(), true)?;
    write_file(&cert_path, cert.pem().as_bytes(), false)?;
    Ok(())
}

/// What to issue.
#[derive(Debug, Clone)]
pub struct LeafRequest {
    /// The service account name, the id's last segment (e.g. `order`).
    pub name: String,
    /// The namespace segment of the id.
    pub namespace: String,
    /// The trust domain of the id.
    pub trust_domain: String,
    /// Extra DNS SANs beyond the Kubernetes Service names and localhost.
    pub dns: Vec<String>,
    /// Validity window; `None` means from now for `days`.
    pub window: Option<(OffsetDateTime, OffsetDateTime)>,
    /// Days of validity from now, when `window` is `None`.
    pub days: i64,
}

impl LeafRequest {
    /// A request for `name` in the default namespace and trust domain, valid a year.
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            namespace: DEFAULT_NAMESPACE.to_owned(),
            trust_domain: DEFAULT_TRUST_DOMAIN.to_owned(),
            dns: Vec::new(),
            window: None,
            days: 365,
        }
    }

    /// The SPIFFE id the leaf will carry, validated.
    pub fn spiffe_id(&self) -> Result<SpiffeId, SpiffeError> {
        SpiffeId::new(&self.trust_domain, &self.namespace, &self.name)
    }
}

/// A leaf certificate and key, PEM-encoded.
pub struct Leaf {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// Its private key, PEM (PKCS#8): keep it out of logs and off shared disks.
    pub key_pem: String,
}

/// Issues a leaf signed by the CA in `ca_dir`, in memory.
pub fn issue_leaf(ca_dir: &Path, request: &LeafRequest) -> Result<Leaf, CertsError> {
    let id = request.spiffe_id()?;
    let ca = SigningCa::from_pem(
        &read_file(&ca_dir.join(CA_CERT))?,
        &read_file(&ca_dir.join(CA_KEY))?,
    )?;
    let window = match request.window {
        Some(window) => window,
        None => validity(request.days)?,
    };
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let params = leaf_params(Some(&id), &request.dns, window)?;
    let cert = params.signed_by(&key, &ca.issuer)?;
    Ok(Leaf {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// The DNS SANs of an identity's leaf: its name as a Kubernetes Service
/// would be called (rustls checks server names against DNS SANs), plus extras.
fn dns_names(id: &SpiffeId, extra: &[String]) -> Vec<String> {
    let (name, ns) = (&id.name, &id.namespace);
    let mut dns = vec![
        name.clone(),
        format!("{name}.{ns}"),
        format!("{name}.{ns}.svc"),
        format!("{name}.{ns}.svc.cluster.local"),
        "localhost".to_owned(),
    ];
    dns.extend(extra.iter().cloned());
    dns.dedup();
    dns
}

/// Parameters of a leaf used in both directions of mTLS; with `id`, its one
/// URI SAN is that SPIFFE id.
fn leaf_params(
    id: Option<&SpiffeId>,
    extra_dns: &[String],
    (not_before, not_after): (OffsetDateTime, OffsetDateTime),
) -> Result<CertificateParams, CertsError> {
    let dns = match id {
        Some(id) => dns_names(id, extra_dns),
        None => extra_dns.to_vec(),
    };
    let mut params = CertificateParams::new(dns)?;
    let mut subject = DistinguishedName::new();
    if let Some(id) = id {
        params
            .subject_alt_names
            .push(SanType::URI(id.to_string().try_into()?));
        subject.push(DnType::CommonName, id.to_string());
    } else {
        subject.push(DnType::CommonName, "minimesh identity issuer");
    }
    params.distinguished_name = subject;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(random_serial());
    params.not_before = not_before;
    params.not_after = not_after;
    Ok(params)
}

/// A CA that signs in memory: the trust anchor (or an issuer certificate
/// signed by it) with its key.
pub struct SigningCa {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

impl std::fmt::Debug for SigningCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningCa")
    }
}

/// How far back a new certificate's validity starts, for clocks that lag.
const BACKDATE: Duration = Duration::minutes(1);

impl SigningCa {
    /// A CA from its certificate and private key, both PEM.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CertsError> {
        let key = KeyPair::from_pem(key_pem)?;
        Ok(Self {
            issuer: Issuer::from_ca_cert_pem(cert_pem, key)?,
            cert_pem: cert_pem.to_owned(),
        })
    }

    /// Loads `ca.pem` and `ca.key` from a directory.
    pub fn load(ca_dir: &Path) -> Result<Self, CertsError> {
        Self::from_pem(
            &read_file(&ca_dir.join(CA_CERT))?,
            &read_file(&ca_dir.join(CA_KEY))?,
        )
    }

    /// This CA's own certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Signs the public key of a PKCS#10 request (whose signature proves the
    /// requester holds the key) into a leaf for `id`, valid for `ttl`. Every
    /// name in the request is ignored: the caller decided `id`.
    pub fn sign_csr(
        &self,
        csr_der: &[u8],
        id: &SpiffeId,
        ttl: std::time::Duration,
    ) -> Result<(String, OffsetDateTime), CertsError> {
        let der = rustls_pki_types::CertificateSigningRequestDer::from(csr_der);
        let mut csr = rcgen::CertificateSigningRequestParams::from_der(&der)?;
        let window = ttl_window(ttl)?;
        csr.params = leaf_params(Some(id), &[], window)?;
        let cert = csr.signed_by(&self.issuer)?;
        Ok((cert.pem(), window.1))
    }

    /// A server certificate for the issuer itself (DNS names only, no identity).
    pub fn issue_server(
        &self,
        dns: &[String],
        ttl: std::time::Duration,
    ) -> Result<Leaf, CertsError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let params = leaf_params(None, dns, ttl_window(ttl)?)?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

fn ttl_window(ttl: std::time::Duration) -> Result<(OffsetDateTime, OffsetDateTime), CertsError> {
    let now = OffsetDateTime::now_utc();
    let end = Duration::try_from(ttl)
        .ok()
        .and_then(|ttl| now.checked_add(ttl))
        .filter(|end| end.year() <= 9999)
        .ok_or(CertsError::ValidityTooLong((ttl.as_secs() / 86_400) as i64))?;
    Ok((now - BACKDATE, end))
}

/// Issues a leaf and writes `NAME.pem` and `NAME.key` (0600) into `out`.
pub fn issue(
    ca_dir: &Path,
    request: &LeafRequest,
    out: &Path,
) -> Result<(PathBuf, PathBuf), CertsError> {
    let leaf = issue_leaf(ca_dir, request)?;
    std::fs::create_dir_all(out).map_err(|source| CertsError::Write {
        path: out.to_owned(),
        source,
    })?;
    let cert_path = out.join(format!("{}.pem", request.name));
    let key_path = out.join(format!("{}.key", request.name));
    // Key first, certificate last: a watcher that reloads on the certificate
    // changing then always finds the matching key in place.
    write_file(&key_path, leaf.key_pem.as_bytes(), true)?;
    write_file(&cert_path, leaf.cert_pem.as_bytes(), false)?;
    Ok((cert_path, key_path))
}

/// `minimesh certs …`
#[derive(Debug, clap::Subcommand)]
pub enum CertsCommand {
    /// Create the mesh CA (ca.pem, ca.key) in --out.
    Init(InitArgs),
    /// Issue NAME.pem and NAME.key for spiffe://TD/ns/NS/sa/NAME, signed by the CA in --ca.
    Issue(IssueArgs),
}

/// Arguments of `minimesh certs init`.
#[derive(Debug, clap::Args)]
pub struct InitArgs {
    /// Directory to write ca.pem and ca.key into.
    #[arg(long, env = "MINIMESH_CERTS_OUT")]
    pub out: PathBuf,
    /// Days the CA is valid.
    #[arg(long, env = "MINIMESH_CA_DAYS", default_value_t = 3650)]
    pub days: i64,
    /// Replace an existing CA (every identity must then be issued again).
    #[arg(long)]
    pub force: bool,
}

/// Arguments of `minimesh certs issue`.
#[derive(Debug, clap::Args)]
pub struct IssueArgs {
    /// Directory holding ca.pem and ca.key.
    #[arg(long, env = "MINIMESH_CA_DIR")]
    pub ca: PathBuf,
    /// Identity (service account) name, e.g. order.
    #[arg(long, env = "MINIMESH_CERT_NAME")]
    pub name: String,
    /// Namespace segment of the identity.
    #[arg(long, env = "MINIMESH_NAMESPACE", default_value = DEFAULT_NAMESPACE)]
    pub namespace: String,
    /// Trust domain of the identity.
    #[arg(long, env = "MINIMESH_TRUST_DOMAIN", default_value = DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// Days the certificate is valid.
    #[arg(long, env = "MINIMESH_CERT_DAYS", default_value_t = 365)]
    pub days: i64,
    /// Extra DNS names (repeatable).
    #[arg(long = "dns", env = "MINIMESH_CERT_DNS", value_delimiter = ',')]
    pub dns: Vec<String>,
    /// Directory to write NAME.pem and NAME.key into.
    #[arg(long, env = "MINIMESH_CERTS_OUT")]
    pub out: PathBuf,
}

/// Runs a `certs` subcommand, printing what it wrote.
pub fn run(command: CertsCommand) -> Result<(), CertsError> {
    match command {
        CertsCommand::Init(args) => {
            init_ca(&args.out, args.days, args.force)?;
            println!("CA written to {}", args.out.join(CA_CERT).display());
        }
        CertsCommand::Issue(args) => {
            let request = LeafRequest {
                name: args.name,
                namespace: args.namespace,
                trust_domain: args.trust_domain,
                dns: args.dns,
                window: None,
                days: args.days,
            };
            let id = request.spiffe_id()?;
            let (cert, key) = issue(&args.ca, &request, &args.out)?;
            println!("{id}: {} {}", cert.display(), key.display());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn issued_leaf_carries_identity_chains_to_ca_and_keys_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        init_ca(&ca, 30, false).unwrap();
        assert!(matches!(
            init_ca(&ca, 30, false),
            Err(CertsError::CaExists(_))
        ));
        let mut request = LeafRequest::new("order");
        request.namespace = "shop".into();
        request.dns = vec!["order.example".into()];
        let (cert_path, key_path) = issue(&ca, &request, &dir.path().join("out")).unwrap();

        for key in [ca.join(CA_KEY), key_path] {
            let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", key.display());
        }

        let pem = std::fs::read(&cert_path).unwrap();
        let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
        let der = pem.contents;
        let id = spiffe_id_of(&der).unwrap();
        assert_eq!(id.to_string(), "spiffe://minimesh.local/ns/shop/sa/order");
        let (_, leaf) = x509_parser::parse_x509_certificate(&der).unwrap();
        let sans = leaf.subject_alternative_name().unwrap().unwrap();
        let dns: Vec<String> = sans
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
                _ => None,
            })
            .collect();
        assert!(dns.contains(&"order.shop.svc.cluster.local".to_owned()));
        assert!(dns.contains(&"order.example".to_owned()));

        let ca_pem = std::fs::read(ca.join(CA_CERT)).unwrap();
        let (_, ca_pem) = x509_parser::pem::parse_x509_pem(&ca_pem).unwrap();
        let (_, ca_cert) = x509_parser::parse_x509_certificate(&ca_pem.contents).unwrap();
        assert_eq!(leaf.issuer(), ca_cert.subject());
        leaf.verify_signature(Some(ca_cert.public_key()))
            .expect("signed by the CA");
    }

    #[test]
    fn bad_identity_and_validity_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        init_ca(dir.path(), 30, false).unwrap();
        let mut request = LeafRequest::new("bad/name");
        assert!(matches!(
            issue_leaf(dir.path(), &request),
            Err(CertsError::Spiffe(_))
        ));
        request.name = "ok".into();
        request.days = 0;
        assert!(matches!(
            issue_leaf(dir.path(), &request),
            Err(CertsError::Validity(0))
        ));
        for days in [99_999_999_999, i64::MAX, 3_000_000] {
            request.days = days;
            assert!(
                matches!(issue_leaf(dir.path(), &request), Err(CertsError::ValidityTooLong(d)) if d == days),
                "{days} days"
            );
        }
    }
}
