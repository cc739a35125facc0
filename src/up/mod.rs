//! `minimesh up`: the local mesh supervisor.
//!
//! Every component is a copy of this binary started with a subcommand, so a
//! plain `cargo run -- up` needs no other build step. Ports are picked once at
//! start and kept across restarts, so peers' configuration stays valid when a
//! child is restarted.

mod child;
mod lock;

use anyhow::{Context, bail};
use child::{Child, Exit, Probe};
pub use child::{ERROR_PREFIX, SUPERVISED_ENV};
use lock::{DataDirLock, MeshFile};
use minimesh_identity::bootstrap::BootstrapKey;
use minimesh_runtime::telemetry::LogFormat;
use serde::Serialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

const SERVICES: [&str; 3] = ["user", "payment", "order"];
const READY_TIMEOUT: Duration = Duration::from_secs(60);
const TRUST_DOMAIN: &str = "minimesh.local";
/// How often an owed `mesh.json` write is tried again (e.g. disk full).
const MESH_FILE_RETRY: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, clap::Args)]
pub struct UpArgs {
    /// Where SQLite files, certificates, logs and mesh.json go.
    #[arg(long, env = "MINIMESH_DATA_DIR", default_value = "./.minimesh")]
    pub data_dir: PathBuf,
    /// The gateway's listen address (h2c).
    #[arg(long, env = "MINIMESH_GATEWAY_ADDR", default_value = "127.0.0.1:50051")]
    pub gateway_addr: SocketAddr,
    /// Replicas per service, e.g. `payment=3,order=2` (others default to 1).
    #[arg(long, env = "MINIMESH_REPLICAS", value_parser = parse_replicas, default_value = "")]
    pub replicas: Replicas,
    /// How long a paid order waits before each fulfilment step.
    #[arg(long, env = "MINIMESH_FULFILMENT_STEP", value_parser = humantime::parse_duration, default_value = "2s")]
    pub fulfilment_step: Duration,
    /// Services the gateway serves to callers outside the mesh; the others
    /// answer PERMISSION_DENIED at the edge.
    #[arg(
        long,
        env = "MINIMESH_EXPOSE",
        value_delimiter = ',',
        default_value = "user,order"
    )]
    pub expose: Vec<String>,
    /// Lifetime of every workload certificate (renewed at about 70% of it).
    #[arg(long, env = "MINIMESH_CERT_TTL", value_parser = humantime::parse_duration, default_value = "24h")]
    pub cert_ttl: Duration,
    /// OTLP/gRPC endpoint every service and sidecar exports traces to.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// A PostgreSQL URL: every service keeps its data there, each in its own
    /// schema, and no SQLite file is created. Without it, SQLite files in
    /// the data dir. Handed to the services in their environment, so the
    /// password shows in no command line.
    #[arg(long, env = "MINIMESH_DATABASE_URL", value_parser = parse_database_url, hide_env_values = true)]
    pub database_url: Option<String>,
    /// Wait before restarting a child that died (doubles while it keeps dying).
    #[arg(long, env = "MINIMESH_RESTART_DELAY", value_parser = humantime::parse_duration, default_value = "100ms")]
    pub restart_delay: Duration,
    /// Log format of `up` itself and of the children's log files
    /// (default: up's own text on a terminal; the files JSON).
    #[arg(long, env = "MINIMESH_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
    /// Test-only: make one instance slow, e.g. `payment-1=50ms` (passed as its --debug-delay).
    #[arg(long, hide = true, value_delimiter = ',')]
    pub debug_delay: Vec<String>,
}

#[derive(Debug, Clone, Default)]
pub struct Replicas(BTreeMap<String, u16>);

impl Replicas {
    fn of(&self, service: &str) -> u16 {
        self.0.get(service).copied().unwrap_or(1)
    }
}

fn parse_replicas(raw: &str) -> Result<Replicas, String> {
    let mut map = BTreeMap::new();
    for part in raw.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (service, count) = part
            .split_once('=')
            .ok_or_else(|| format!("{part:?} is not SERVICE=N"))?;
        if !SERVICES.contains(&service) {
            return Err(format!(
                "unknown service {service:?}; expected one of {SERVICES:?}"
            ));
        }
        let count: u16 = count
            .parse()
            .map_err(|_| format!("replica count {count:?} of {service} is not a number"))?;
        if !(1..=16).contains(&count) {
            return Err(format!(
                "replicas of {service} must be 1 to 16, got {count}"
            ));
        }
        map.insert(service.to_owned(), count);
    }
    Ok(Replicas(map))
}

#[derive(Serialize)]
struct MeshJson {
    trust_domain: &'static str,
    ca_dir: PathBuf,
    version: &'static str,
    identity: IssuerEntry,
    gateway: GatewayEntry,
    instances: Vec<InstanceEntry>,
}

#[derive(Serialize)]
struct IssuerEntry {
    addr: String,
    metrics: String,
    pid: u32,
    cert_ttl: String,
    log: PathBuf,
}

#[derive(Serialize)]
struct GatewayEntry {
    addr: String,
    admin: String,
    pid: u32,
    identity: String,
    log: PathBuf,
}

#[derive(Serialize)]
struct InstanceEntry {
    service: &'static str,
    replica: u16,
    pid: u32,
    app: String,
    /// The service's own Prometheus `/metrics` (business counters, span export counts).
    metrics: String,
    sidecar_pid: u32,
    inbound: String,
    outbound: String,
    admin: String,
    identity: String,
    /// The SQLite file, or the PostgreSQL URL without its password.
    db: String,
    log: PathBuf,
    sidecar_log: PathBuf,
}

struct Instance {
    service: &'static str,
    replica: u16,
    app: SocketAddr,
    metrics: SocketAddr,
    inbound: SocketAddr,
    outbound: SocketAddr,
    admin: SocketAddr,
    db: String,
    child: usize,
    sidecar: usize,
}

/// Loopback listeners reserved for the children, each bound once here so no
/// port can be given twice.
///
/// Ports come from below the kernel's ephemeral range, so when a restarted
/// child's port is bound again, no outgoing connection of this machine
/// (which takes ephemeral ports) can be holding it; a random start keeps
/// several meshes on one machine apart.
struct Ports {
    next: u32,
    low: u16,
    span: u32,
}

impl Ports {
    fn new() -> Self {
        let (low, high) = reservable_range();
        let span = u32::from(high - low).max(1);
        Self {
            next: rand_below(span),
            low,
            span,
        }
    }

    fn reserve(&mut self) -> anyhow::Result<std::net::TcpListener> {
        let ip = std::net::Ipv4Addr::LOCALHOST;
        for _ in 0..self.span {
            let port = self.low + (self.next % self.span) as u16;
            self.next = self.next.wrapping_add(1);
            if let Ok(listener) = std::net::TcpListener::bind((ip, port)) {
                return Ok(listener);
            }
        }
        std::net::TcpListener::bind((ip, 0)).context("reserving a loopback port")
    }
}

/// Ports from 10000 up to the start of the ephemeral range.
fn reservable_range() -> (u16, u16) {
    let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    if ephemeral_start > 11000 {
        (10000, ephemeral_start)
    } else {
        (ephemeral_start.max(1024), 65535)
    }
}

fn rand_below(n: u32) -> u32 {
    use std::hash::{BuildHasher, Hasher};
    // RandomState is seeded randomly per process; enough to spread ports.
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    (hasher.finish() % u64::from(n.max(1))) as u32
}

/// Who may call whom (CONTRACT §3): order accepts the gateway; user accepts
/// order and the gateway; payment accepts order only (nobody outside the
/// mesh can charge or refund).
fn default_allow(service: &str) -> &'static str {
    match service {
        "order" => "gateway",
        "payment" => "order",
        _ => "order,gateway",
    }
}

fn identity(name: &str) -> String {
    format!(
        "spiffe://{TRUST_DOMAIN}/ns/{}/sa/{name}",
        minimesh_certs::DEFAULT_NAMESPACE
    )
}

/// Creates the trust anchor once. Workload keys never touch the disk: each
/// proxy makes its own and gets its certificate from the issuer; identity
/// directories an older `up` left behind are removed.
fn prepare_certs(certs: &Path) -> anyhow::Result<()> {
    if !certs.join(minimesh_certs::CA_CERT).exists() {
        minimesh_certs::init_ca(certs, 3650, false).context("creating the mesh CA")?;
    }
    for name in SERVICES.iter().copied().chain(["gateway"]) {
        let old = certs.join(name);
        if old.is_dir() {
            std::fs::remove_dir_all(&old)
                .with_context(|| format!("removing the old workload key in {}", old.display()))?;
        }
    }
    Ok(())
}

fn s(value: impl ToString) -> String {
    value.to_string()
}

/// How a proxy gets its identity: the trust anchor, and the issuer to ask.
fn identity_flags(certs: &Path, issuer: SocketAddr) -> Vec<String> {
    vec![
        s("--ca"),
        s(certs.join(minimesh_certs::CA_CERT).display()),
        s("--identity-addr"),
        format!("https://{issuer}"),
        s("--identity-server-name"),
        s("localhost"),
    ]
}

/// Binds the gateway's address here, so a taken port is reported at once.
fn bind_gateway(addr: SocketAddr) -> anyhow::Result<std::net::TcpListener> {
    std::net::TcpListener::bind(addr).map_err(|err| match err.kind() {
        std::io::ErrorKind::AddrInUse => anyhow::anyhow!(
            "the gateway address {addr} is already in use (another mesh?); pick a free one with --gateway-addr"
        ),
        _ => anyhow::Error::new(err).context(format!("binding the gateway address {addr}")),
    })
}

/// The mesh's processes as planned: every child with its arguments and listeners.
struct Plan {
    children: Vec<Child>,
    instances: Vec<Instance>,
    issuer_child: usize,
    issuer_addr: SocketAddr,
    issuer_metrics: SocketAddr,
    cert_ttl: Duration,
    gateway_child: usize,
    gateway_addr: SocketAddr,
    gateway_admin: SocketAddr,
}

fn plan(
    args: &UpArgs,
    data_dir: &Path,
    certs: &Path,
    logs: &Path,
    gateway_listener: std::net::TcpListener,
    bootstrap: &BootstrapKey,
) -> anyhow::Result<Plan> {
    let mut ports = Ports::new();
    let mut reserved: BTreeMap<SocketAddr, std::net::TcpListener> = BTreeMap::new();
    let mut reserve = || -> anyhow::Result<SocketAddr> {
        let listener = ports.reserve()?;
        let addr = listener.local_addr().context("reading a reserved port")?;
        reserved.insert(addr, listener);
        Ok(addr)
    };
    let mut instances: Vec<Instance> = Vec::new();
    for service in SERVICES {
        for replica in 0..args.replicas.of(service) {
            instances.push(Instance {
                service,
                replica,
                app: reserve()?,
                metrics: reserve()?,
                inbound: reserve()?,
                outbound: reserve()?,
                admin: reserve()?,
                db: match &args.database_url {
                    Some(url) => minimesh_runtime::store::redact(url),
                    None => data_dir.join(format!("{service}.db")).display().to_string(),
                },
                child: 0,
                sidecar: 0,
            });
        }
    }
    let gateway_admin = reserve()?;
    let issuer_addr = reserve()?;
    let issuer_metrics = reserve()?;
    let mut take = |addrs: &[SocketAddr]| -> Vec<std::net::TcpListener> {
        addrs.iter().filter_map(|a| reserved.remove(a)).collect()
    };
    let inbounds: BTreeMap<&str, String> = SERVICES
        .iter()
        .map(|service| {
            let list = instances
                .iter()
                .filter(|i| i.service == *service)
                .map(|i| i.inbound.to_string())
                .collect::<Vec<_>>()
                .join(",");
            (*service, list)
        })
        .collect();
    // Each upstream and the shop's route to it: the proxy knows no
    // application's protos, so the gRPC package prefix that leads to each
    // service is configuration written here (and by the chart).
    let upstream_flags = |services: &[&str]| -> Vec<String> {
        services
            .iter()
            .flat_map(|svc| {
                let list = inbounds.get(svc).cloned().unwrap_or_default();
                [
                    s("--upstream"),
                    format!("{svc}={list}"),
                    s("--route"),
                    format!("shop.{svc}.={svc}"),
                ]
            })
            .collect()
    };
    // Children log JSON to their files unless the user asked otherwise.
    let log_format = args.log_format.unwrap_or(LogFormat::Json);
    let child_env = |name: String, replica: u16| -> Vec<(String, String)> {
        let mut env = vec![
            (s("MINIMESH_REPLICA"), replica.to_string()),
            (s("MINIMESH_LOG_FORMAT"), s(log_format.as_str())),
        ];
        if let Some(endpoint) = &args.otlp_endpoint {
            env.push((s("OTEL_EXPORTER_OTLP_ENDPOINT"), endpoint.clone()));
            env.push((s("OTEL_SERVICE_NAME"), name));
        }
        env
    };
    let mut children = Vec::new();
    // The issuer first: every proxy asks it for a certificate at start.
    let issuer_child = children.len();
    let mut issuer_env = child_env(s("minimesh-identity"), 0);
    issuer_env.push((
        s(minimesh_identity::bootstrap::KEY_ENV),
        s(bootstrap.to_hex()),
    ));
    children.push(Child::new(
        s("identity"),
        vec![
            s("identity"),
            s("--listen"),
            s(issuer_addr),
            s("--metrics-listen"),
            s(issuer_metrics),
            s("--ca-cert"),
            s(certs.join(minimesh_certs::CA_CERT).display()),
            s("--ca-key"),
            s(certs.join(minimesh_certs::CA_KEY).display()),
            s("--trust-domain"),
            s(TRUST_DOMAIN),
            s("--cert-ttl"),
            s(humantime::format_duration(args.cert_ttl)),
            s("--server-names"),
            s("localhost"),
        ],
        issuer_env,
        logs,
        Probe::Live(issuer_metrics),
        take(&[issuer_addr, issuer_metrics]),
    )?);
    for instance in instances.iter_mut() {
        let (service, replica) = (instance.service, instance.replica);
        let mut service_args = vec![
            s("service"),
            s(service),
            s("--listen"),
            s(instance.app),
            s("--metrics-listen"),
            s(instance.metrics),
        ];
        let mut service_env = child_env(format!("minimesh-{service}"), replica);
        match &args.database_url {
            Some(url) => service_env.push((s("MINIMESH_DB"), url.clone())),
            None => service_args.extend([s("--db"), instance.db.clone()]),
        }
        let name = format!("{service}-{replica}");
        for spec in args.debug_delay.iter().filter(|_| service == "payment") {
            if let Some(delay) = spec.strip_prefix(&format!("{name}=")) {
                service_args.extend([s("--debug-delay"), s(delay)]);
            }
        }
        if service == "order" {
            // The order service reaches its peers only through its own sidecar.
            let outbound = format!("http://{}", instance.outbound);
            service_args.extend([
                s("--user-addr"),
                outbound.clone(),
                s("--payment-addr"),
                outbound,
            ]);
            service_args.extend([
                s("--fulfilment-step"),
                s(humantime::format_duration(args.fulfilment_step)),
            ]);
        }
        let mut sidecar_args = vec![
            s("sidecar"),
            s("--service"),
            s(service),
            s("--inbound"),
            s(instance.inbound),
            s("--outbound"),
            s(instance.outbound),
            s("--admin"),
            s(instance.admin),
            s("--app"),
            s(instance.app),
            s("--allow"),
            s(default_allow(service)),
        ];
        sidecar_args.extend(identity_flags(certs, issuer_addr));
        if service == "order" {
            sidecar_args.extend(upstream_flags(&["user", "payment"]));
        }
        instance.child = children.len();
        children.push(Child::new(
            name.clone(),
            service_args,
            service_env,
            logs,
            Probe::Grpc(instance.app),
            take(&[instance.app, instance.metrics]),
        )?);
        instance.sidecar = children.len();
        children.push(
            Child::new(
                format!("{name}-sidecar"),
                sidecar_args,
                child_env(format!("minimesh-sidecar-{service}"), replica),
                logs,
                Probe::Ready(instance.admin),
                take(&[instance.inbound, instance.outbound, instance.admin]),
            )?
            .with_bootstrap(identity(service)),
        );
    }
    let gateway_addr = gateway_listener
        .local_addr()
        .context("reading the gateway address")?;
    let mut gateway_args = vec![
        s("gateway"),
        s("--listen"),
        s(gateway_addr),
        s("--admin"),
        s(gateway_admin),
    ];
    gateway_args.extend(identity_flags(certs, issuer_addr));
    gateway_args.extend(upstream_flags(&SERVICES));
    gateway_args.extend([s("--expose"), args.expose.join(",")]);
    let gateway_child = children.len();
    let mut gateway_listeners = vec![gateway_listener];
    gateway_listeners.extend(take(&[gateway_admin]));
    children.push(
        Child::new(
            s("gateway"),
            gateway_args,
            child_env(s("minimesh-gateway"), 0),
            logs,
            Probe::Ready(gateway_admin),
            gateway_listeners,
        )?
        .with_bootstrap(identity("gateway")),
    );
    Ok(Plan {
        children,
        instances,
        issuer_child,
        issuer_addr,
        issuer_metrics,
        cert_ttl: args.cert_ttl,
        gateway_child,
        gateway_addr,
        gateway_admin,
    })
}

/// Checks every child's command line as the child would parse it, so a bad
/// option fails `up` before anything starts.
fn validate(children: &[Child]) -> anyhow::Result<()> {
    use clap::Parser;
    for child in children {
        let argv = std::iter::once("minimesh".to_owned()).chain(child.args.iter().cloned());
        if let Err(err) = crate::Cli::try_parse_from(argv) {
            let rendered = err.to_string();
            let first = rendered
                .lines()
                .next()
                .unwrap_or_default()
                .trim_start_matches("error: ");
            bail!("{} would not start: {first}", child.name);
        }
    }
    Ok(())
}

fn mesh_json(plan: &Plan, certs: &Path) -> anyhow::Result<Vec<u8>> {
    let children = &plan.children;
    let pid = |i: usize| children[i].pid.unwrap_or(0);
    let file = MeshJson {
        trust_domain: TRUST_DOMAIN,
        ca_dir: certs.to_owned(),
        version: crate::VERSION,
        identity: IssuerEntry {
            addr: s(plan.issuer_addr),
            metrics: s(plan.issuer_metrics),
            pid: pid(plan.issuer_child),
            cert_ttl: s(humantime::format_duration(plan.cert_ttl)),
            log: children[plan.issuer_child].log.clone(),
        },
        gateway: GatewayEntry {
            addr: s(plan.gateway_addr),
            admin: s(plan.gateway_admin),
            pid: pid(plan.gateway_child),
            identity: identity("gateway"),
            log: children[plan.gateway_child].log.clone(),
        },
        instances: plan
            .instances
            .iter()
            .map(|i| InstanceEntry {
                service: i.service,
                replica: i.replica,
                pid: pid(i.child),
                app: s(i.app),
                metrics: s(i.metrics),
                sidecar_pid: pid(i.sidecar),
                inbound: s(i.inbound),
                outbound: s(i.outbound),
                admin: s(i.admin),
                identity: identity(i.service),
                db: i.db.clone(),
                log: children[i.child].log.clone(),
                sidecar_log: children[i.sidecar].log.clone(),
            })
            .collect(),
    };
    Ok(serde_json::to_vec_pretty(&file)?)
}

pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    init_logging(args.log_format);
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating data dir {}", args.data_dir.display()))?;
    let data_dir = args
        .data_dir
        .canonicalize()
        .with_context(|| format!("resolving data dir {}", args.data_dir.display()))?;
    // Before anything in the data dir is touched: one `up` per data dir.
    let _lock = DataDirLock::acquire(&data_dir)?;
    let gateway_listener = bind_gateway(args.gateway_addr)?;
    let logs = data_dir.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let certs = data_dir.join("certs");
    // Shared with the issuer only: it checks the one-time tokens minted
    // from it for each proxy this `up` starts.
    let bootstrap = BootstrapKey::generate();
    let mut plan = plan(
        &args,
        &data_dir,
        &certs,
        &logs,
        gateway_listener,
        &bootstrap,
    )?;
    validate(&plan.children)?;
    prepare_certs(&certs)?;
    let exe = std::env::current_exe().context("finding the minimesh binary")?;

    let (exits_tx, mut exits) = mpsc::unbounded_channel::<Exit>();
    for index in 0..plan.children.len() {
        if let Err(err) = child::spawn(
            &exe,
            &mut plan.children[index],
            index,
            &exits_tx,
            &bootstrap,
        ) {
            child::stop_all(&mut plan.children, &mut exits).await;
            return Err(err);
        }
    }
    let mut mesh_file = MeshFile::new(data_dir.join("mesh.json"));
    if let Err(err) = mesh_file.write(mesh_json(&plan, &certs)?) {
        tracing::warn!("cannot write mesh.json yet ({err:#}); retrying");
    }

    let shutdown = minimesh_runtime::shutdown::signal();
    tokio::pin!(shutdown);
    tokio::select! {
        ready = wait_ready(&plan.children) => if let Err(err) = ready {
            child::stop_all(&mut plan.children, &mut exits).await;
            mesh_file.remove();
            return Err(err);
        },
        _ = &mut shutdown => {
            child::stop_all(&mut plan.children, &mut exits).await;
            mesh_file.remove();
            return Ok(());
        }
        Some((index, _, status)) = exits.recv() => {
            // That child is gone: nothing to signal or wait for.
            plan.children[index].pid = None;
            child::stop_all(&mut plan.children, &mut exits).await;
            mesh_file.remove();
            let failed = &plan.children[index];
            let why = failed.failure().unwrap_or_else(|| format!("exited ({status})"));
            bail!("{} failed to start: {why} (log: {})", failed.name, failed.log.display());
        }
    }
    println!(
        "mesh ready: gateway {} ({} instances; details in {})",
        plan.gateway_addr,
        plan.instances.len(),
        mesh_file.path().display()
    );

    loop {
        let next_restart = plan.children.iter().filter_map(|c| c.restart_at).min();
        let restart_due = async {
            match next_restart {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        let mesh_retry = async {
            if mesh_file.is_pending() {
                tokio::time::sleep(MESH_FILE_RETRY).await
            } else {
                std::future::pending().await
            }
        };
        tokio::select! {
            _ = &mut shutdown => break,
            Some((index, generation, status)) = exits.recv() => {
                let child = &mut plan.children[index];
                if generation != child.generation {
                    continue;
                }
                child.pid = None;
                // Back off when a child keeps dying right after start.
                let delay = if child.started.elapsed() > Duration::from_secs(10) {
                    child.restarts = 0;
                    args.restart_delay
                } else {
                    args.restart_delay.saturating_mul(2u32.pow(child.restarts.min(6)))
                };
                child.restarts += 1;
                tracing::warn!(
                    "{} exited ({status}); restarting in {}",
                    child.name,
                    humantime::format_duration(delay)
                );
                child.restart_at = Some(Instant::now() + delay);
            }
            _ = restart_due => {
                let now = Instant::now();
                for index in 0..plan.children.len() {
                    let child = &mut plan.children[index];
                    if child.restart_at.is_some_and(|at| at <= now) {
                        child.restart_at = None;
                        if let Err(err) = child::spawn(&exe, child, index, &exits_tx, &bootstrap) {
                            tracing::error!("cannot restart {} ({err:#}); trying again in 1s", child.name);
                            child.restart_at = Some(now + Duration::from_secs(1));
                        }
                    }
                }
                if let Err(err) = mesh_file.write(mesh_json(&plan, &certs)?) {
                    tracing::error!("cannot rewrite mesh.json ({err:#}); retrying every {}", humantime::format_duration(MESH_FILE_RETRY));
                }
            }
            _ = mesh_retry => {
                if mesh_file.retry().is_ok() {
                    tracing::info!("mesh.json rewritten");
                }
            }
        }
    }
    child::stop_all(&mut plan.children, &mut exits).await;
    mesh_file.remove();
    println!("mesh stopped");
    Ok(())
}

fn init_logging(format: Option<LogFormat>) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let terminal = std::io::stderr().is_terminal();
    let format = format.unwrap_or(if terminal {
        LogFormat::Text
    } else {
        LogFormat::Json
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(terminal);
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// Waits until every child reports ready.
async fn wait_ready(children: &[Child]) -> anyhow::Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    for child in children {
        while !child::ready(child.probe).await {
            if Instant::now() > deadline {
                bail!(
                    "{} did not become ready within {READY_TIMEOUT:?}; see {}",
                    child.name,
                    child.log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(())
}

fn parse_database_url(value: &str) -> Result<String, String> {
    if minimesh_runtime::pg::is_postgres_url(value) {
        Ok(value.to_owned())
    } else {
        Err("expected a postgres:// or postgresql:// URL".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replicas_parse_and_reject_nonsense() {
        let r = parse_replicas("payment=3, order=2").unwrap();
        assert_eq!((r.of("payment"), r.of("order"), r.of("user")), (3, 2, 1));
        assert!(parse_replicas("").unwrap().0.is_empty());
        for bad in [
            "payment",
            "payment=x",
            "shipping=2",
            "payment=0",
            "payment=99",
        ] {
            assert!(parse_replicas(bad).is_err(), "{bad}");
        }
    }
}
