//! `minimesh up`: the local mesh supervisor.
//!
//! Every component is a copy of this binary started with a subcommand, so a
//! plain `cargo run -- up` needs no other build step. Ports are picked once at
//! start and kept across restarts, so peers' configuration stays valid when a
//! child is restarted.

use anyhow::{Context, bail};
use serde::Serialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::process::Command;
use tokio::sync::mpsc;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// Set in every child's environment: the child then dies with its supervisor.
pub const SUPERVISED_ENV: &str = "MINIMESH_SUPERVISED";
const SERVICES: [&str; 3] = ["user", "payment", "order"];
const READY_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_GRACE: Duration = Duration::from_secs(10);
const TRUST_DOMAIN: &str = "minimesh.local";

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
    #[arg(long, env = "MINIMESH_FULFILMENT_STEP", default_value = "2s")]
    pub fulfilment_step: String,
    /// OTLP/gRPC endpoint every service and sidecar exports traces to.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Wait before restarting a child that died (doubles while it keeps dying).
    #[arg(long, env = "MINIMESH_RESTART_DELAY", value_parser = humantime::parse_duration, default_value = "100ms")]
    pub restart_delay: Duration,
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

/// How `up` tells that a child is ready.
#[derive(Debug, Clone, Copy)]
enum Probe {
    /// gRPC health SERVING at this address (services).
    Grpc(SocketAddr),
    /// HTTP 200 from `/ready` at this admin address (sidecars, gateway).
    Ready(SocketAddr),
}

/// One supervised process: how to start it and where it is now.
struct Child {
    name: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    log: PathBuf,
    probe: Probe,
    pid: Option<u32>,
    generation: u64,
    started: Instant,
    restarts: u32,
    /// When set, the child is down and will be started again then.
    restart_at: Option<Instant>,
}

impl Child {
    fn new(
        name: String,
        args: Vec<String>,
        env: Vec<(String, String)>,
        logs: &Path,
        probe: Probe,
    ) -> Self {
        Self {
            log: logs.join(format!("{name}.log")),
            name,
            args,
            env,
            probe,
            pid: None,
            generation: 0,
            started: Instant::now(),
            restarts: 0,
            restart_at: None,
        }
    }
}

#[derive(Serialize)]
struct MeshFile {
    trust_domain: &'static str,
    ca_dir: PathBuf,
    version: &'static str,
    gateway: GatewayEntry,
    instances: Vec<InstanceEntry>,
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
    db: PathBuf,
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
    db: PathBuf,
    child: usize,
    sidecar: usize,
}

/// Reserves a free loopback port for a child to bind a moment later.
///
/// Ports come from below the kernel's ephemeral range, so the outgoing
/// connections of this machine (which take ephemeral ports) cannot grab one
/// between this check and the child's bind; a random start keeps several
/// meshes on one machine apart.
fn free_port() -> anyhow::Result<SocketAddr> {
    free_port_on(std::net::Ipv4Addr::LOCALHOST.into())
}

fn free_port_on(ip: std::net::IpAddr) -> anyhow::Result<SocketAddr> {
    let (low, high) = reservable_range();
    let span = u32::from(high - low);
    let start = rand_below(span);
    for offset in 0..span {
        let port = low + ((start + offset) % span) as u16;
        if let Ok(listener) = std::net::TcpListener::bind((ip, port)) {
            return listener.local_addr().context("reading a reserved port");
        }
    }
    let listener = std::net::TcpListener::bind((ip, 0)).context("reserving a port")?;
    listener.local_addr().context("reading a reserved port")
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

/// Who may call whom: order accepts the gateway; user and payment accept
/// order and the gateway (CONTRACT §3).
fn default_allow(service: &str) -> &'static str {
    match service {
        "order" => "gateway",
        _ => "order,gateway",
    }
}

fn identity(name: &str) -> String {
    format!(
        "spiffe://{TRUST_DOMAIN}/ns/{}/sa/{name}",
        minimesh_certs::DEFAULT_NAMESPACE
    )
}

/// Creates the CA once and issues a fresh certificate for every identity.
fn prepare_certs(certs: &Path) -> anyhow::Result<()> {
    if !certs.join(minimesh_certs::CA_CERT).exists() {
        minimesh_certs::init_ca(certs, 3650, false).context("creating the mesh CA")?;
    }
    for name in SERVICES.iter().copied().chain(["gateway"]) {
        let request = minimesh_certs::LeafRequest::new(name);
        minimesh_certs::issue(certs, &request, &certs.join(name))
            .with_context(|| format!("issuing the {name} identity"))?;
    }
    Ok(())
}

fn s(value: impl ToString) -> String {
    value.to_string()
}

fn identity_flags(certs: &Path, name: &str) -> Vec<String> {
    let dir = certs.join(name);
    vec![
        s("--ca"),
        s(certs.join(minimesh_certs::CA_CERT).display()),
        s("--cert"),
        s(dir.join(format!("{name}.pem")).display()),
        s("--key"),
        s(dir.join(format!("{name}.key")).display()),
    ]
}

pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    init_logging();
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating data dir {}", args.data_dir.display()))?;
    let data_dir = args
        .data_dir
        .canonicalize()
        .with_context(|| format!("resolving data dir {}", args.data_dir.display()))?;
    let logs = data_dir.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let certs = data_dir.join("certs");
    prepare_certs(&certs)?;
    let exe = std::env::current_exe().context("finding the minimesh binary")?;

    let mut children: Vec<Child> = Vec::new();
    let mut instances: Vec<Instance> = Vec::new();
    for service in SERVICES {
        for replica in 0..args.replicas.of(service) {
            instances.push(Instance {
                service,
                replica,
                app: free_port()?,
                metrics: free_port()?,
                inbound: free_port()?,
                outbound: free_port()?,
                admin: free_port()?,
                db: data_dir.join(format!("{service}.db")),
                child: 0,
                sidecar: 0,
            });
        }
    }
    let inbounds = |service: &str| -> String {
        instances
            .iter()
            .filter(|i| i.service == service)
            .map(|i| i.inbound.to_string())
            .collect::<Vec<_>>()
            .join(",")
    };
    let upstream_flags = |services: &[&str]| -> Vec<String> {
        services
            .iter()
            .flat_map(|svc| [s("--upstream"), format!("{svc}={}", inbounds(svc))])
            .collect()
    };
    let telemetry_env = |name: String, replica: u16| -> Vec<(String, String)> {
        let mut env = vec![(s("MINIMESH_REPLICA"), replica.to_string())];
        if let Some(endpoint) = &args.otlp_endpoint {
            env.push((s("OTEL_EXPORTER_OTLP_ENDPOINT"), endpoint.clone()));
            env.push((s("OTEL_SERVICE_NAME"), name));
        }
        env
    };
    let mut planned: Vec<(usize, Child, Child)> = Vec::new();
    for (index, instance) in instances.iter().enumerate() {
        let (service, replica) = (instance.service, instance.replica);
        let mut service_args = vec![
            s("service"),
            s(service),
            s("--listen"),
            s(instance.app),
            s("--db"),
            s(instance.db.display()),
            s("--metrics-listen"),
            s(instance.metrics),
        ];
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
            service_args.extend([s("--fulfilment-step"), args.fulfilment_step.clone()]);
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
        sidecar_args.extend(identity_flags(&certs, service));
        if service == "order" {
            sidecar_args.extend(upstream_flags(&["user", "payment"]));
        }
        let app = Child::new(
            name.clone(),
            service_args,
            telemetry_env(format!("minimesh-{service}"), replica),
            &logs,
            Probe::Grpc(instance.app),
        );
        let sidecar = Child::new(
            format!("{name}-sidecar"),
            sidecar_args,
            telemetry_env(format!("minimesh-sidecar-{service}"), replica),
            &logs,
            Probe::Ready(instance.admin),
        );
        planned.push((index, app, sidecar));
    }
    let gateway_upstreams = upstream_flags(&SERVICES);
    let gateway_addr = if args.gateway_addr.port() == 0 {
        free_port_on(args.gateway_addr.ip())?
    } else {
        args.gateway_addr
    };
    let gateway_admin = free_port()?;
    let mut gateway_args = vec![
        s("gateway"),
        s("--listen"),
        s(gateway_addr),
        s("--admin"),
        s(gateway_admin),
    ];
    gateway_args.extend(identity_flags(&certs, "gateway"));
    gateway_args.extend(gateway_upstreams);
    for (index, app, sidecar) in planned {
        instances[index].child = children.len();
        children.push(app);
        instances[index].sidecar = children.len();
        children.push(sidecar);
    }
    let gateway_child = children.len();
    children.push(Child::new(
        s("gateway"),
        gateway_args,
        telemetry_env(s("minimesh-gateway"), 0),
        &logs,
        Probe::Ready(gateway_admin),
    ));

    let (exits_tx, mut exits) = mpsc::unbounded_channel::<(usize, u64, String)>();
    for (index, child) in children.iter_mut().enumerate() {
        spawn_child(&exe, child, index, &exits_tx)?;
    }
    let mesh_path = data_dir.join("mesh.json");
    let write_mesh = |children: &[Child]| -> anyhow::Result<()> {
        let pid = |i: usize| children[i].pid.unwrap_or(0);
        let file = MeshFile {
            trust_domain: TRUST_DOMAIN,
            ca_dir: certs.clone(),
            version: crate::VERSION,
            gateway: GatewayEntry {
                addr: s(gateway_addr),
                admin: s(gateway_admin),
                pid: pid(gateway_child),
                identity: identity("gateway"),
                log: children[gateway_child].log.clone(),
            },
            instances: instances
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
        write_atomically(&mesh_path, &serde_json::to_vec_pretty(&file)?)
    };
    write_mesh(&children)?;

    let shutdown = minimesh_runtime::shutdown::signal();
    tokio::pin!(shutdown);
    tokio::select! {
        ready = wait_ready(&children) => ready?,
        _ = &mut shutdown => {
            stop_all(&mut children, &mut exits).await;
            return Ok(());
        }
        Some((index, _, status)) = exits.recv() => {
            let name = children[index].name.clone();
            stop_all(&mut children, &mut exits).await;
            let log = &children[index].log;
            let tail = std::fs::read_to_string(log).unwrap_or_default();
            let last: Vec<&str> = tail.lines().rev().take(3).collect();
            bail!("{name} exited during start-up ({status}); see {}: {}", log.display(), last.join(" | "));
        }
    }
    println!(
        "mesh ready: gateway {gateway_addr} ({} instances; details in {})",
        instances.len(),
        mesh_path.display()
    );

    loop {
        let next_restart = children.iter().filter_map(|c| c.restart_at).min();
        let restart_due = async {
            match next_restart {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = &mut shutdown => break,
            Some((index, generation, status)) = exits.recv() => {
                let child = &mut children[index];
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
                tracing::warn!(child = %child.name, %status, ?delay, "child exited; restarting");
                eprintln!("minimesh: {} exited ({status}); restarting in {delay:?}", child.name);
                child.restart_at = Some(Instant::now() + delay);
            }
            _ = restart_due => {
                let now = Instant::now();
                for (index, child) in children.iter_mut().enumerate() {
                    if child.restart_at.is_some_and(|at| at <= now) {
                        child.restart_at = None;
                        if let Err(err) = spawn_child(&exe, child, index, &exits_tx) {
                            tracing::error!(child = %child.name, %err, "restart failed");
                            child.restart_at = Some(now + Duration::from_secs(1));
                        }
                    }
                }
                if let Err(err) = write_mesh(&children) {
                    tracing::error!(%err, "cannot rewrite mesh.json");
                }
            }
        }
    }
    stop_all(&mut children, &mut exits).await;
    println!("mesh stopped");
    Ok(())
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

fn spawn_child(
    exe: &Path,
    child: &mut Child,
    index: usize,
    exits: &mpsc::UnboundedSender<(usize, u64, String)>,
) -> anyhow::Result<()> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&child.log)
        .with_context(|| format!("opening log {}", child.log.display()))?;
    let log_err = log.try_clone().context("duplicating the log handle")?;
    let mut command = Command::new(exe);
    command
        .args(&child.args)
        .envs(child.env.iter().map(|(k, v)| (k, v)))
        .env(SUPERVISED_ENV, "1")
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .kill_on_drop(true);
    let mut process = command
        .spawn()
        .with_context(|| format!("starting {}", child.name))?;
    child.generation += 1;
    child.pid = process.id();
    child.started = Instant::now();
    tracing::info!(child = %child.name, pid = ?child.pid, "started");
    let generation = child.generation;
    let exits = exits.clone();
    tokio::spawn(async move {
        let status = match process.wait().await {
            Ok(status) => status.to_string(),
            Err(err) => format!("wait failed: {err}"),
        };
        let _ = exits.send((index, generation, status));
    });
    Ok(())
}

/// Waits until every child reports ready.
async fn wait_ready(children: &[Child]) -> anyhow::Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    for child in children {
        loop {
            let ready = match child.probe {
                Probe::Grpc(addr) => serving(&format!("http://{addr}")).await,
                Probe::Ready(addr) => http_ready(addr).await,
            };
            if ready {
                break;
            }
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

/// GET /ready on an admin listener answers 200.
async fn http_ready(addr: SocketAddr) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        stream
            .write_all(
                format!("GET /ready HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await
            .ok()?;
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).await.ok()?;
        Some(head.starts_with(b"HTTP/1.1 200"))
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), attempt).await,
        Ok(Some(true))
    )
}

pub async fn serving(url: &str) -> bool {
    let Ok(endpoint) = tonic::transport::Endpoint::from_shared(url.to_owned()) else {
        return false;
    };
    let Ok(channel) = endpoint.timeout(Duration::from_secs(1)).connect().await else {
        return false;
    };
    matches!(
        HealthClient::new(channel).check(HealthCheckRequest { service: String::new() }).await,
        Ok(response) if response.get_ref().status == ServingStatus::Serving as i32
    )
}

/// SIGTERM to every child, then SIGKILL to whatever is left after the grace period.
async fn stop_all(
    children: &mut [Child],
    exits: &mut mpsc::UnboundedReceiver<(usize, u64, String)>,
) {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    for child in children.iter_mut() {
        child.restart_at = None;
        if let Some(pid) = child.pid {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        }
    }
    let deadline = tokio::time::Instant::now() + STOP_GRACE;
    while children.iter().any(|c| c.pid.is_some()) {
        match tokio::time::timeout_at(deadline, exits.recv()).await {
            Ok(Some((index, generation, _))) => {
                if children[index].generation == generation {
                    children[index].pid = None;
                }
            }
            Ok(None) => break,
            Err(_) => {
                for child in children.iter().filter(|c| c.pid.is_some()) {
                    tracing::warn!(child = %child.name, "did not stop in time; killing");
                    if let Some(pid) = child.pid {
                        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
                    }
                }
                break;
            }
        }
    }
}

/// Replaces `path` with `contents` so readers never see a partial file.
fn write_atomically(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, contents).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
    Ok(())
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
