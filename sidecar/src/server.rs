//! The listeners and what each does with a call:
//!
//! - inbound (mTLS): identity → authorization → forward to the local
//!   application over h2c;
//! - outbound (h2c, loopback): route by gRPC service → upstream over mTLS;
//! - gateway (h2c, edge): the same as outbound, for callers outside the mesh.
//!
//! Every call gets a span (continuing the caller's W3C trace context and
//! passing its own on) and is counted in the metrics when its response ends.

use crate::admin::{self, ReadyCheck};
use crate::authz::{AllowList, denial};
use crate::body::{Code, Observed, ProxyBody, boxed, grpc_error, grpc_status};
use crate::client::{Connection, Transport};
use crate::config::{ConfigError, FileConfig, TrafficArgs};
use crate::listener::{CallGuard, Limits, accept_loop, serve_h2};
use crate::metrics::{CallName, INBOUND, Metrics, OUTBOUND};
use crate::route::{Routes, Via};
use crate::tls::{Reloader, TlsError, peer_identity};
use crate::upstream::{CallReport, TrafficPolicy, Upstream};
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use minimesh_certs::SpiffeId;
use minimesh_telemetry::trace::{continue_trace, inject_trace, record_ids, record_status};
use minimesh_traffic::discover::{self, HostsFileResolver, Resolve, SystemResolver};
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{Instrument, Span, field::Empty};

/// How long in-flight calls may run on after shutdown begins.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum SidecarError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Identity(#[from] crate::identity::IdentityError),
    #[error("binding {what} listener to {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: String,
        source: std::io::Error,
    },
    #[error("{what} address {addr:?} is not HOST:PORT: {message}")]
    Addr {
        what: &'static str,
        addr: String,
        message: String,
    },
}

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
    /// YAML or JSON file with the same settings; flags win.
    #[arg(long, env = "MINIMESH_CONFIG")]
    pub config: Option<PathBuf>,
    /// Validate the configuration, print it resolved as JSON, and exit.
    #[arg(long)]
    pub check_config: bool,
    #[command(flatten)]
    pub identity: IdentityArgs,
    #[command(flatten)]
    pub traffic: TrafficArgs,
    #[command(flatten)]
    pub limits: Limits,
}

#[derive(Debug, Clone, clap::Args)]
pub struct GatewayArgs {
    /// Edge listener (h2c) for callers outside the mesh.
    #[arg(long, env = "MINIMESH_LISTEN", default_value = "0.0.0.0:50051")]
    pub listen: String,
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
    #[command(flatten)]
    pub identity: IdentityArgs,
    #[command(flatten)]
    pub traffic: TrafficArgs,
    #[command(flatten)]
    pub limits: Limits,
}

fn loaded_file(path: &Option<PathBuf>) -> Result<FileConfig, ConfigError> {
    match path {
        Some(path) => FileConfig::load(path),
        None => Ok(FileConfig::default()),
    }
}

fn naming(identity: &IdentityArgs, file: &FileConfig) -> (String, String) {
    let trust_domain = identity
        .trust_domain
        .clone()
        .or(file.trust_domain.clone())
        .unwrap_or_else(|| minimesh_certs::DEFAULT_TRUST_DOMAIN.to_owned());
    let namespace = identity
        .namespace
        .clone()
        .or(file.namespace.clone())
        .unwrap_or_else(|| minimesh_certs::DEFAULT_NAMESPACE.to_owned());
    (trust_domain, namespace)
}

async fn bind(what: &'static str, addr: &str) -> Result<TcpListener, SidecarError> {
    let listener = minimesh_telemetry::listen::bind(addr)
        .await
        .map_err(|source| SidecarError::Bind {
            what,
            addr: addr.to_owned(),
            source,
        })?;
    let local = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    tracing::info!(listener = what, addr = %local, "listening");
    Ok(listener)
}

fn upstreams(
    traffic: &TrafficArgs,
    file: &FileConfig,
    tls: &Arc<Reloader>,
    trust_domain: &str,
    namespace: &str,
    metrics: &Arc<Metrics>,
) -> Result<(BTreeMap<String, Arc<Upstream>>, TrafficPolicy), SidecarError> {
    let policy = traffic.policy(file);
    let resolver: Arc<dyn Resolve> = match &traffic.hosts_file {
        Some(path) => Arc::new(HostsFileResolver { path: path.clone() }),
        None => Arc::new(SystemResolver),
    };
    let mut out = BTreeMap::new();
    for (service, targets) in traffic.upstreams(file)? {
        let expected =
            SpiffeId::new(trust_domain, namespace, &service).map_err(ConfigError::Allow)?;
        let endpoints = discover::spawn(targets, resolver.clone(), traffic.dns_refresh);
        let transport = Transport::Mesh {
            tls: tls.clone(),
            expected,
        };
        let upstream = Upstream::new(
            &service,
            OUTBOUND,
            transport,
            policy.clone(),
            endpoints,
            metrics.clone(),
        );
        out.insert(service, upstream);
    }
    Ok((out, policy))
}

fn upstream_names(traffic: &TrafficArgs, file: &FileConfig) -> Result<Vec<String>, SidecarError> {
    Ok(traffic.upstreams(file)?.into_keys().collect())
}

/// Runs the sidecar until `shutdown` resolves, then drains.
pub async fn run_sidecar(
    args: SidecarArgs,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), SidecarError> {
    let file = loaded_file(&args.config)?;
    let service = args
        .service
        .clone()
        .or(file.service.clone())
        .ok_or(ConfigError::Missing("--service"))?;
    let (trust_domain, namespace) = naming(&args.identity, &file);
    if args.check_config {
        let allow = if args.allow.is_empty() {
            file.allow.clone()
        } else {
            args.allow.clone()
        };
        let allow =
            AllowList::new(&allow, &trust_domain, &namespace).map_err(ConfigError::Allow)?;
        print_resolved(
            Some(&service),
            &trust_domain,
            &namespace,
            Some(&allow),
            &args.traffic,
            &file,
        )?;
        return Ok(());
    }
    let metrics = Metrics::new("sidecar", &service, &upstream_names(&args.traffic, &file)?);
    let tls = crate::identity::credentials(
        &args.identity,
        &service,
        &trust_domain,
        &namespace,
        &metrics,
    )
    .await?;
    tracing::info!(identity = %tls.current().identity(), %service, "sidecar identity loaded");
    let allow_entries = if args.allow.is_empty() {
        file.allow.clone()
    } else {
        args.allow.clone()
    };
    let allow =
        AllowList::new(&allow_entries, &trust_domain, &namespace).map_err(ConfigError::Allow)?;
    let (upstreams, policy) = upstreams(
        &args.traffic,
        &file,
        &tls,
        &trust_domain,
        &namespace,
        &metrics,
    )?;
    let app_addr: SocketAddr =
        args.app
            .parse()
            .map_err(|e: std::net::AddrParseError| SidecarError::Addr {
                what: "app",
                addr: args.app.clone(),
                message: e.to_string(),
            })?;
    let app = Arc::new(Connection::new(
        app_addr,
        Transport::Plain,
        policy.connect_timeout,
        metrics.clone(),
    ));

    let inbound_listener = bind("inbound", &args.inbound).await?;
    let outbound_listener = bind("outbound", &args.outbound).await?;
    let admin_listener = bind("admin", &args.admin).await?;

    let ready: ReadyCheck = {
        let url = format!("http://{app_addr}");
        Arc::new(move || {
            let url = url.clone();
            Box::pin(async move { app_serving(&url).await })
        })
    };
    let admin = tokio::spawn(admin::serve(admin_listener, metrics.clone(), ready));

    let inbound = Arc::new(InboundState {
        service: service.clone(),
        allow,
        app,
        metrics: metrics.clone(),
    });
    let outbound = Arc::new(OutboundState {
        upstreams,
        routes: args.traffic.routes(&file)?,
        default_upstream: None,
        metrics: metrics.clone(),
        span_kind: SpanKind::Client,
        client_id: service.clone(),
        expose: None,
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let inbound_task = tokio::spawn(serve_mesh(
        inbound_listener,
        args.limits,
        tls.clone(),
        inbound,
        stop_rx.clone(),
    ));
    let outbound_task = tokio::spawn(serve_plain(
        "outbound",
        outbound_listener,
        args.limits,
        outbound,
        metrics.clone(),
        stop_rx,
    ));
    shutdown.await;
    tracing::info!("draining");
    let _ = stop_tx.send(true);
    let _ = tokio::join!(inbound_task, outbound_task);
    admin.abort();
    Ok(())
}

/// Runs the gateway until `shutdown` resolves, then drains.
pub async fn run_gateway(
    args: GatewayArgs,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), SidecarError> {
    let file = loaded_file(&args.config)?;
    let (trust_domain, namespace) = naming(&args.identity, &file);
    if args.check_config {
        print_resolved(None, &trust_domain, &namespace, None, &args.traffic, &file)?;
        return Ok(());
    }
    let metrics = Metrics::new("gateway", "gateway", &upstream_names(&args.traffic, &file)?);
    let tls = crate::identity::credentials(
        &args.identity,
        "gateway",
        &trust_domain,
        &namespace,
        &metrics,
    )
    .await?;
    tracing::info!(identity = %tls.current().identity(), "gateway identity loaded");
    let (upstreams, _) = upstreams(
        &args.traffic,
        &file,
        &tls,
        &trust_domain,
        &namespace,
        &metrics,
    )?;
    let listener = bind("gateway", &args.listen).await?;
    let admin_listener = bind("admin", &args.admin).await?;
    let state = Arc::new(OutboundState {
        upstreams,
        routes: args.traffic.routes(&file)?,
        default_upstream: Some(args.default_upstream.clone()),
        metrics: metrics.clone(),
        span_kind: SpanKind::Server,
        client_id: "gateway".to_owned(),
        expose: Some(
            args.expose
                .iter()
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect(),
        ),
    });
    let ready: ReadyCheck = {
        let state = state.clone();
        Arc::new(move || {
            let state = state.clone();
            Box::pin(async move {
                let empty: Vec<&str> = state
                    .upstreams
                    .iter()
                    .filter(|(_, u)| u.endpoint_count() == 0)
                    .map(|(n, _)| n.as_str())
                    .collect();
                if state.upstreams.is_empty() {
                    Err("no upstreams configured".to_owned())
                } else if empty.is_empty() {
                    Ok(())
                } else {
                    Err(format!("no endpoints yet for {}", empty.join(", ")))
                }
            })
        })
    };
    let admin = tokio::spawn(admin::serve(admin_listener, metrics.clone(), ready));
    let (stop_tx, stop_rx) = watch::channel(false);
    let task = tokio::spawn(serve_plain(
        "gateway",
        listener,
        args.limits,
        state,
        metrics,
        stop_rx,
    ));
    shutdown.await;
    tracing::info!("draining");
    let _ = stop_tx.send(true);
    let _ = task.await;
    admin.abort();
    Ok(())
}

/// `--check-config`: the configuration as the proxy would run it.
fn print_resolved(
    service: Option<&str>,
    trust_domain: &str,
    namespace: &str,
    allow: Option<&AllowList>,
    traffic: &TrafficArgs,
    file: &FileConfig,
) -> Result<(), SidecarError> {
    let policy = traffic.policy(file);
    let upstreams: BTreeMap<String, Vec<String>> = traffic
        .upstreams(file)?
        .into_iter()
        .map(|(name, targets)| {
            let targets = targets
                .into_iter()
                .map(|t| match t {
                    discover::Target::Addr(a) => a.to_string(),
                    discover::Target::Dns { host, port } => format!("dns:{host}:{port}"),
                })
                .collect();
            (name, targets)
        })
        .collect();
    let resolved = serde_json::json!({
        "service": service,
        "trustDomain": trust_domain,
        "namespace": namespace,
        "allow": allow.map(|a| a.entries().iter().map(|id| id.to_string()).collect::<Vec<_>>()),
        "upstreams": upstreams,
        "routes": traffic
            .routes(file)?
            .entries()
            .map(|(prefix, upstream)| (prefix.to_owned(), upstream.to_owned()))
            .collect::<BTreeMap<_, _>>(),
        "retries": {
            "maxAttempts": policy.retry.max_attempts,
            "budgetRatio": policy.retry.budget_ratio,
            "minPerSecond": policy.retry.budget_min_per_second,
        },
        "ejection": {
            "consecutiveFailures": policy.ejection.consecutive_failures,
            "baseMs": policy.ejection.base.as_millis() as u64,
            "maxMs": policy.ejection.max.as_millis() as u64,
            "maxPercent": policy.ejection.max_ejection_percent,
        },
        "perTryTimeoutMs": policy.per_try_timeout.map(|d| d.as_millis() as u64),
    });
    println!(
        "{}",
        serde_json::to_string_pretty(&resolved).unwrap_or_default()
    );
    Ok(())
}

/// The local application's gRPC health, for `/ready`.
async fn app_serving(url: &str) -> Result<(), String> {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let endpoint =
        tonic::transport::Endpoint::from_shared(url.to_owned()).map_err(|e| e.to_string())?;
    let channel = endpoint
        .connect_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(1))
        .connect()
        .await
        .map_err(|e| format!("local service unreachable: {e}"))?;
    let response = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map_err(|s| format!("health check failed: {}", s.message()))?;
    match ServingStatus::try_from(response.get_ref().status) {
        Ok(ServingStatus::Serving) => Ok(()),
        Ok(other) => Err(format!("local service reports {}", other.as_str_name())),
        Err(_) => Err("local service reports an unknown status".to_owned()),
    }
}

#[derive(Debug, Clone, Copy)]
enum SpanKind {
    Server,
    Client,
}

fn proxy_span(kind: SpanKind, role: &'static str, path: &str) -> Span {
    // Without an exporter a call's span would only feed log lines, at a cost
    // per call (BENCHMARKS.md); the trace headers pass through either way.
    if !minimesh_telemetry::telemetry::exporting() {
        return Span::none();
    }
    let name = path.trim_start_matches('/');
    let (service, method) = name.split_once('/').unwrap_or((name, ""));
    let kind = match kind {
        SpanKind::Server => "server",
        SpanKind::Client => "client",
    };
    tracing::info_span!("proxy", otel.name = %name, otel.kind = kind, minimesh.proxy = role,
        rpc.system = "grpc", rpc.service = %service, rpc.method = %method,
        rpc.grpc.status_code = Empty, otel.status_code = Empty, otel.status_description = Empty,
        minimesh.peer.identity = Empty, minimesh.upstream = Empty, server.address = Empty, minimesh.attempts = Empty,
        trace_id = Empty, span_id = Empty)
}

/// Counts the call and closes its span when the response ends.
fn finish(
    response: Response<ProxyBody>,
    span: Span,
    metrics: Arc<Metrics>,
    direction: &'static str,
    labels: (CallName, String),
    started: Instant,
    call: CallGuard,
) -> Response<ProxyBody> {
    let known = grpc_status(response.headers());
    if let Some(code) = known {
        let message = response
            .headers()
            .get("grpc-message")
            .and_then(|m| m.to_str().ok())
            .map(str::to_owned);
        record_status(&span, code as i32, message.as_deref());
    }
    response.map(move |body| {
        boxed(Observed::new(body, known, move |code| {
            record_status(&span, code as i32, None);
            let (name, client_id) = &labels;
            metrics.request_done(direction, name, client_id, code, started.elapsed());
            drop(span);
            drop(call);
        }))
    })
}

struct InboundState {
    service: String,
    allow: AllowList,
    app: Arc<Connection>,
    metrics: Arc<Metrics>,
}

async fn handle_inbound(
    state: Arc<InboundState>,
    caller: Option<SpiffeId>,
    request: Request<Incoming>,
    call: CallGuard,
) -> Response<ProxyBody> {
    let started = Instant::now();
    let path = request.uri().path().to_owned();
    let span = proxy_span(SpanKind::Server, "inbound", &path);
    continue_trace(&span, request.headers());
    record_ids(&span);
    if let Some(caller) = &caller {
        span.record("minimesh.peer.identity", tracing::field::display(caller));
    }
    // Refused calls are counted under one name: their paths are the caller's to choose.
    let admitted = caller.as_ref().is_some_and(|c| state.allow.allows(c));
    let labels = (
        if admitted {
            CallName::of(&path)
        } else {
            CallName::unrouted()
        },
        caller.as_ref().map_or_else(String::new, |c| c.name.clone()),
    );
    let response = async {
        let Some(caller) = caller else {
            return grpc_error(
                Code::Unauthenticated,
                "the caller presented no mesh identity",
                false,
            );
        };
        if !state.allow.allows(&caller) {
            tracing::info!(%caller, "call refused by the allow-list");
            return grpc_error(
                Code::PermissionDenied,
                &denial(&caller, &state.service),
                false,
            );
        }
        let deadline = match crate::strict::check(&request) {
            Ok(deadline) => deadline,
            Err(refusal) => return *refusal,
        };
        if deadline.is_some_and(|d| d.expired()) {
            return grpc_error(
                Code::DeadlineExceeded,
                "deadline already exceeded on arrival",
                false,
            );
        }
        let mut request = request.map(boxed);
        inject_trace(&Span::current(), request.headers_mut());
        if let Some(deadline) = deadline {
            deadline.propagate(request.headers_mut());
        }
        match state.app.send(request).await {
            Ok(response) => response.map(boxed),
            Err((err, _)) => {
                tracing::warn!(%err, "local service unreachable");
                // The application never saw a call it could not be sent: the caller may retry elsewhere.
                grpc_error(
                    Code::Unavailable,
                    &format!("the {} service is unavailable: {err}", state.service),
                    err.never_sent(),
                )
            }
        }
    }
    .instrument(span.clone())
    .await;
    finish(
        response,
        span,
        state.metrics.clone(),
        INBOUND,
        labels,
        started,
        call,
    )
}

struct OutboundState {
    upstreams: BTreeMap<String, Arc<Upstream>>,
    routes: Routes,
    default_upstream: Option<String>,
    metrics: Arc<Metrics>,
    span_kind: SpanKind,
    /// This proxy's own identity name, the `client_id` of its outbound calls.
    client_id: String,
    /// At the edge: the upstreams callers may reach by name (None: all).
    expose: Option<BTreeSet<String>>,
}

async fn handle_outbound(
    state: Arc<OutboundState>,
    request: Request<Incoming>,
    call: CallGuard,
) -> Response<ProxyBody> {
    let started = Instant::now();
    let path = request.uri().path().to_owned();
    let span = proxy_span(state.span_kind, "outbound", &path);
    continue_trace(&span, request.headers());
    record_ids(&span);
    let authority = request
        .uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            request
                .headers()
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        });
    let route = state
        .routes
        .resolve(
            authority.as_deref(),
            &path,
            |name| state.upstreams.contains_key(name),
            state.default_upstream.as_deref(),
        )
        .map(|(name, via)| (name.to_owned(), via));
    let routed = route
        .as_ref()
        .is_some_and(|(name, _)| state.upstreams.contains_key(name));
    let labels = (
        if routed {
            CallName::of(&path)
        } else {
            CallName::unrouted()
        },
        state.client_id.clone(),
    );
    let response = async {
        let Some((name, via)) = route else {
            return grpc_error(
                Code::Unimplemented,
                &format!(
                    "no route for {path}: :authority {} names no upstream and no --route prefix matches",
                    authority.as_deref().unwrap_or("(none)")
                ),
                false,
            );
        };
        let name = name.as_str();
        let Some(upstream) = state.upstreams.get(name) else {
            return grpc_error(
                Code::Unimplemented,
                &format!("no route for {path}: no upstream named {name} is configured"),
                false,
            );
        };
        if let Some(exposed) = &state.expose
            && !exposed.contains(name)
            && via != Via::Default
        {
            return grpc_error(
                Code::PermissionDenied,
                &format!(
                    "the {name} service is not exposed outside the mesh (exposed: {})",
                    exposed.iter().cloned().collect::<Vec<_>>().join(", ")
                ),
                false,
            );
        }
        Span::current().record("minimesh.upstream", name);
        let deadline = match crate::strict::check(&request) {
            Ok(deadline) => deadline,
            Err(refusal) => return *refusal,
        };
        if deadline.is_some_and(|d| d.expired()) {
            return grpc_error(Code::DeadlineExceeded, "deadline already exceeded", false);
        }
        let mut report = CallReport::default();
        let response = upstream
            .call(request.map(boxed), deadline, &mut report)
            .await;
        let current = Span::current();
        current.record("minimesh.attempts", report.attempts);
        if let Some(endpoint) = report.endpoint {
            current.record("server.address", tracing::field::display(endpoint));
        }
        response
    }
    .instrument(span.clone())
    .await;
    finish(
        response,
        span,
        state.metrics.clone(),
        OUTBOUND,
        labels,
        started,
        call,
    )
}

fn h2_server() -> hyper::server::conn::http2::Builder<TokioExecutor> {
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(10))
        .initial_stream_window_size(crate::window::STREAM)
        .initial_connection_window_size(crate::window::CONNECTION)
        .max_concurrent_streams(crate::window::MAX_STREAMS);
    builder
}

async fn serve_mesh(
    listener: TcpListener,
    limits: Limits,
    tls: Arc<Reloader>,
    state: Arc<InboundState>,
    stop: watch::Receiver<bool>,
) {
    accept_loop("inbound", listener, limits, stop, move |tcp, connection| {
        let state = state.clone();
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.current().server());
        async move {
            let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(err)) => {
                    state.metrics.tls_failure(INBOUND);
                    tracing::info!(%err, "inbound TLS handshake refused");
                    return;
                }
                Err(_) => {
                    state.metrics.tls_failure(INBOUND);
                    tracing::info!("inbound TLS handshake timed out");
                    return;
                }
            };
            let _guard = state.metrics.connection(INBOUND);
            let caller = peer_identity(stream.get_ref().1);
            let activity = connection.activity.clone();
            let service = hyper::service::service_fn(move |request| {
                let (state, caller) = (state.clone(), caller.clone());
                // Boxed: hyper moves each stream's future into a task of its
                // own, and a large future costs a memcpy at every move.
                let call = Box::pin(handle_inbound(state, caller, request, activity.call()));
                async move { Ok::<_, std::convert::Infallible>(call.await) }
            });
            serve_h2(&h2_server(), TokioIo::new(stream), service, connection).await;
        }
    })
    .await;
}

async fn serve_plain(
    what: &'static str,
    listener: TcpListener,
    limits: Limits,
    state: Arc<OutboundState>,
    metrics: Arc<Metrics>,
    stop: watch::Receiver<bool>,
) {
    accept_loop(what, listener, limits, stop, move |tcp, connection| {
        let state = state.clone();
        let metrics = metrics.clone();
        async move {
            let _guard = metrics.connection(INBOUND);
            let activity = connection.activity.clone();
            let service = hyper::service::service_fn(move |request| {
                let state = state.clone();
                let call = Box::pin(handle_outbound(state, request, activity.call()));
                async move { Ok::<_, std::convert::Infallible>(call.await) }
            });
            serve_h2(&h2_server(), TokioIo::new(tcp), service, connection).await;
        }
    })
    .await;
}
