//! The command lines of the sidecar and the gateway (every flag with an
//! environment variable).

use crate::config::TrafficArgs;
use crate::listener::Limits;
use std::path::PathBuf;

/// The mesh identity files and naming, shared by the sidecar and the gateway.
#[derive(Debug, Clone, clap::Args)]
pub struct IdentityArgs {
    /// Mesh CA certificate (PEM).
    #[arg(long, env = "MINIMESH_CA")]
    pub ca: PathBuf,
    /// This proxy's certificate (PEM); reloaded when it changes. Not needed
    /// with --identity-addr.
    #[arg(long, env = "MINIMESH_CERT", required_unless_present = "identity_addr")]
    pub cert: Option<PathBuf>,
    /// This proxy's private key (PEM); reloaded when it changes.
    #[arg(long, env = "MINIMESH_KEY", required_unless_present = "identity_addr")]
    pub key: Option<PathBuf>,
    /// The identity issuer (`https://host:port`): the proxy makes its key in
    /// memory and gets its certificate there, renewed before it expires.
    #[arg(long, env = "MINIMESH_IDENTITY_ADDR")]
    pub identity_addr: Option<String>,
    /// The issuer's TLS name (default: the host of --identity-addr).
    #[arg(long, env = "MINIMESH_IDENTITY_SERVER_NAME")]
    pub identity_server_name: Option<String>,
    /// Kubernetes: the projected ServiceAccount token that proves this proxy's identity.
    #[arg(long, env = "MINIMESH_IDENTITY_TOKEN_FILE")]
    pub identity_token_file: Option<PathBuf>,
    /// Local: the one-time token `minimesh up` gives this proxy.
    #[arg(long, env = minimesh_identity::bootstrap::TOKEN_ENV, hide_env_values = true)]
    pub bootstrap_token: Option<String>,
    /// Trust domain of mesh identities (default minimesh.local).
    #[arg(long, env = "MINIMESH_TRUST_DOMAIN")]
    pub trust_domain: Option<String>,
    /// Namespace of mesh identities (default "default").
    #[arg(long, env = "MINIMESH_NAMESPACE")]
    pub namespace: Option<String>,
}

impl IdentityArgs {
    /// Credentials from files, default naming.
    pub fn from_files(ca: PathBuf, cert: PathBuf, key: PathBuf) -> Self {
        Self {
            ca,
            cert: Some(cert),
            key: Some(key),
            identity_addr: None,
            identity_server_name: None,
            identity_token_file: None,
            bootstrap_token: None,
            trust_domain: None,
            namespace: None,
        }
    }
}

/// `minimesh sidecar`: the proxy beside one service.
#[derive(Debug, Clone, clap::Args)]
pub struct SidecarArgs {
    /// The local service this sidecar fronts (user, order or payment).
    #[arg(long, env = "MINIMESH_SERVICE")]
    pub service: Option<String>,
    /// mTLS listener for calls from the mesh.
    #[arg(long, env = "MINIMESH_INBOUND", default_value = "0.0.0.0:4143")]
    pub inbound: String,
    /// h2c listener for calls from the local service.
    #[arg(long, env = "MINIMESH_OUTBOUND", default_value = "127.0.0.1:4140")]
    pub outbound: String,
    /// Admin listener: /live, /ready, /metrics.
    #[arg(long, env = "MINIMESH_ADMIN", default_value = "0.0.0.0:4191")]
    pub admin: String,
    /// The local service's h2c address.
    #[arg(long, env = "MINIMESH_APP", default_value = "127.0.0.1:8080")]
    pub app: String,
    /// Caller identities allowed in: short names or SPIFFE URIs (comma-separated).
    #[arg(long = "allow", env = "MINIMESH_ALLOW", value_delimiter = ',')]
    pub allow: Vec<String>,
    /// Calls open to the local service at once. Past it a call gets
    /// RESOURCE_EXHAUSTED, marked as never sent so the caller's proxy may try
    /// another replica: stalled or abandoned callers cannot pile up streams
    /// (and their buffers) in the application.
    #[arg(long, env = "MINIMESH_MAX_APP_STREAMS", default_value_t = DEFAULT_MAX_APP_STREAMS,
        value_parser = clap::value_parser!(u32).range(1..))]
    pub max_app_streams: u32,
    /// YAML or JSON file with the same settings; flags win.
    #[arg(long, env = "MINIMESH_CONFIG")]
    pub config: Option<PathBuf>,
    /// Validate the configuration, print it resolved as JSON, and exit.
    #[arg(long)]
    pub check_config: bool,
    /// How the proxy gets its certificate: files or the identity issuer.
    #[command(flatten)]
    pub identity: IdentityArgs,
    /// Timeouts, retries and ejection for every upstream.
    #[command(flatten)]
    pub traffic: TrafficArgs,
    /// Connection and stream limits of the listeners.
    #[command(flatten)]
    pub limits: Limits,
}

/// The default of `--max-app-streams`: one connection's worth of streams
/// (`window::MAX_STREAMS`).
pub const DEFAULT_MAX_APP_STREAMS: u32 = crate::window::MAX_STREAMS;

/// `minimesh gateway`: the proxy at the edge of the mesh.
#[derive(Debug, Clone, clap::Args)]
pub struct GatewayArgs {
    /// Edge listener for callers outside the mesh: h2c, or TLS with --tls-cert.
    #[arg(long, env = "MINIMESH_LISTEN", default_value = "0.0.0.0:50051")]
    pub listen: String,
    /// Serve the edge over TLS with this PEM certificate chain (re-read when it changes).
    #[arg(long, env = "MINIMESH_EDGE_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The edge certificate's PEM private key.
    #[arg(long, env = "MINIMESH_EDGE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Admin listener: /live, /ready, /metrics.
    #[arg(long, env = "MINIMESH_ADMIN", default_value = "0.0.0.0:4191")]
    pub admin: String,
    /// Upstream that answers reflection and health calls.
    #[arg(long, env = "MINIMESH_DEFAULT_UPSTREAM", default_value = "user")]
    pub default_upstream: String,
    /// Services callers outside the mesh may reach; calls to other mesh
    /// services get PERMISSION_DENIED (reflection and health stay reachable).
    #[arg(
        long,
        env = "MINIMESH_EXPOSE",
        value_delimiter = ',',
        default_value = "user,order"
    )]
    pub expose: Vec<String>,
    /// YAML or JSON file with the same settings; flags win.
    #[arg(long, env = "MINIMESH_CONFIG")]
    pub config: Option<PathBuf>,
    /// Validate the configuration, print it resolved as JSON, and exit.
    #[arg(long)]
    pub check_config: bool,
    /// How the gateway gets its certificate: files or the identity issuer.
    #[command(flatten)]
    pub identity: IdentityArgs,
    /// Timeouts, retries and ejection for every upstream.
    #[command(flatten)]
    pub traffic: TrafficArgs,
    /// Connection and stream limits of the listeners.
    #[command(flatten)]
    pub limits: Limits,
}
