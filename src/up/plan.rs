//! Planning the topology: which processes the mesh has, the loopback ports
//! each listens on, and every child's command line and environment.

use super::child::Child;
use super::ports::Ports;
use super::probe::Probe;
use super::shop::shop;
use super::{TRUST_DOMAIN, UpArgs};
use anyhow::{Context, bail};
use minimesh_identity::bootstrap::BootstrapKey;
use minimesh_runtime::telemetry::LogFormat;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

pub(super) struct Instance {
    pub(super) service: &'static str,
    pub(super) replica: u16,
    pub(super) app: SocketAddr,
    pub(super) metrics: SocketAddr,
    pub(super) inbound: SocketAddr,
    pub(super) outbound: SocketAddr,
    pub(super) admin: SocketAddr,
    pub(super) db: String,
    pub(super) child: usize,
    pub(super) sidecar: usize,
}

pub(super) fn identity(name: &str) -> String {
    format!(
        "spiffe://{TRUST_DOMAIN}/ns/{}/sa/{name}",
        minimesh_certs::DEFAULT_NAMESPACE
    )
}

/// Creates the trust anchor once. Workload keys never touch the disk: each
/// proxy makes its own and gets its certificate from the issuer; identity
/// directories an older `up` left behind are removed.
pub(super) fn prepare_certs(certs: &Path) -> anyhow::Result<()> {
    if !certs.join(minimesh_certs::CA_CERT).exists() {
        minimesh_certs::init_ca(certs, 3650, false).context("creating the mesh CA")?;
    }
    for name in shop()?.names().chain(["gateway"]) {
        let old = certs.join(name);
        if old.is_dir() {
            std::fs::remove_dir_all(&old)
                .with_context(|| format!("removing the old workload key in {}", old.display()))?;
        }
    }
    Ok(())
}

pub(super) fn s(value: impl ToString) -> String {
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
pub(super) fn bind_gateway(addr: SocketAddr) -> anyhow::Result<std::net::TcpListener> {
    std::net::TcpListener::bind(addr).map_err(|err| match err.kind() {
        std::io::ErrorKind::AddrInUse => anyhow::anyhow!(
            "the gateway address {addr} is already in use (another mesh?); pick a free one with --gateway-addr"
        ),
        _ => anyhow::Error::new(err).context(format!("binding the gateway address {addr}")),
    })
}

/// The mesh's processes as planned: every child with its arguments and listeners.
pub(super) struct Plan {
    pub(super) children: Vec<Child>,
    pub(super) instances: Vec<Instance>,
    pub(super) issuer_child: usize,
    pub(super) issuer_addr: SocketAddr,
    pub(super) issuer_metrics: SocketAddr,
    pub(super) cert_ttl: Duration,
    pub(super) gateway_child: usize,
    pub(super) gateway_addr: SocketAddr,
    pub(super) gateway_admin: SocketAddr,
}

pub(super) fn plan(
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
    let shop = shop()?;
    let mut instances: Vec<Instance> = Vec::new();
    for service in shop.names() {
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
    let inbounds: BTreeMap<&str, String> = shop
        .names()
        .map(|service| {
            let list = instances
                .iter()
                .filter(|i| i.service == service)
                .map(|i| i.inbound.to_string())
                .collect::<Vec<_>>()
                .join(",");
            (service, list)
        })
        .collect();
    // Each upstream and the shop's route to it: the proxy knows no
    // application's protos, so the gRPC package prefix that leads to each
    // service is configuration written here (and by the chart), from shop.yaml.
    let upstream_flags = |services: &mut dyn Iterator<Item = &str>| -> Vec<String> {
        services
            .filter_map(|svc| shop.get(svc))
            .flat_map(|svc| {
                let name = &svc.name;
                let list = inbounds.get(name.as_str()).cloned().unwrap_or_default();
                [
                    s("--upstream"),
                    format!("{name}={list}"),
                    s("--route"),
                    format!("{}={name}", svc.route),
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
        let listed = shop
            .get(service)
            .context("an instance of a service the shop does not list")?;
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
        // A service reaches its upstreams only through its own sidecar.
        for upstream in &listed.upstreams {
            service_args.extend([
                format!("--{upstream}-addr"),
                format!("http://{}", instance.outbound),
            ]);
        }
        if service == "order" {
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
            listed.allow.join(","),
        ];
        sidecar_args.extend(identity_flags(certs, issuer_addr));
        sidecar_args.extend(upstream_flags(
            &mut listed.upstreams.iter().map(String::as_str),
        ));
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
    gateway_args.extend(upstream_flags(&mut shop.names()));
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
pub(super) fn validate(children: &[Child]) -> anyhow::Result<()> {
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

#[cfg(test)]
mod tests;
