//! Start-up: resolve the configuration, get an identity, bind the
//! listeners and serve them until shutdown, then drain. The sidecar serves
//! inbound (mTLS) and outbound (h2c) listeners; the gateway one edge
//! listener (h2c). See [`crate::handle`] for what each does with a call.

use crate::client::{Connection, Transport};
use crate::config::ConfigError;
use crate::dump;
use crate::handle::{
    AppSlots, InboundState, OutboundState, SpanKind, handle_inbound, handle_outbound,
};
use crate::listener::{self, Handshake};
use crate::metrics::Metrics;
use crate::resolve::{
    allow_list, loaded_file, naming, service, upstream_names, upstreams, windows,
};
use crate::stall::StallWatch;
use crate::tls::TlsError;
use minimesh_telemetry::admin::{Admin, ReadyCheck};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::watch;

pub use crate::args::{GatewayArgs, IdentityArgs, SidecarArgs};

/// Why a sidecar or gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum SidecarError {
    /// The flags or config file are not usable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The mesh certificate or CA could not be loaded.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The edge certificate could not be loaded.
    #[error(transparent)]
    EdgeTls(#[from] crate::edge::EdgeTlsError),
    /// No identity: neither files nor a certificate from the issuer.
    #[error(transparent)]
    Identity(#[from] crate::identity::IdentityError),
    /// A listener could not be bound.
    #[error("binding {what} listener to {addr}: {source}")]
    Bind {
        /// Which listener (`inbound`, `admin`, …).
        what: &'static str,
        /// The address asked for.
        addr: String,
        /// What the bind failed with.
        source: std::io::Error,
    },
    /// An address is not valid.
    #[error("{what} address {addr:?} is not HOST:PORT: {message}")]
    Addr {
        /// Which address (`--app`, …).
        what: &'static str,
        /// The address given.
        addr: String,
        /// Why it is not valid.
        message: String,
    },
    /// `--app` names one of the sidecar's own listeners.
    #[error(
        "--app {app} is this sidecar's own {what} listener ({listener}): it must be the local service's address"
    )]
    AppIsOwnListener {
        /// The `--app` address.
        app: SocketAddr,
        /// Which listener it collides with.
        what: &'static str,
        /// That listener's address.
        listener: String,
    },
}

/// `--app` must not be one of the sidecar's listeners: `/ready` would then
/// ask the proxy itself, which answers gRPC, and calls would loop.
fn app_is_not_own_listener(app: SocketAddr, args: &SidecarArgs) -> Result<(), SidecarError> {
    let listeners = [
        ("inbound", &args.inbound),
        ("outbound", &args.outbound),
        ("admin", &args.admin),
    ];
    for (what, listener) in listeners {
        let Ok(addr) = listener.parse::<SocketAddr>() else {
            continue;
        };
        let same_host =
            addr.ip() == app.ip() || addr.ip().is_unspecified() || app.ip().is_unspecified();
        if addr.port() == app.port() && same_host {
            return Err(SidecarError::AppIsOwnListener {
                app,
                what,
                listener: listener.clone(),
            });
        }
    }
    Ok(())
}

/// Serves `/live`, `/metrics` and `/ready` (answered by `ready`) on `listener`.
fn spawn_admin(
    listener: TcpListener,
    metrics: &Arc<Metrics>,
    ready: ReadyCheck,
) -> tokio::task::JoinHandle<()> {
    let metrics = metrics.clone();
    let admin = Admin::new(move |format| metrics.render(format)).with_ready(ready);
    tokio::spawn(admin.serve(listener))
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

/// Runs the sidecar until `shutdown` resolves, then drains.
pub async fn run_sidecar(
    args: SidecarArgs,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), SidecarError> {
    let file = loaded_file(&args.config)?;
    if args.check_config {
        return dump::print(&dump::sidecar(&args, &file)?);
    }
    let service = service(&args.service, &file)?;
    let (trust_domain, namespace) = naming(&args.identity, &file);
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
    let allow = allow_list(&args.allow, &file, &trust_domain, &namespace)?;
    let windows = windows(&args.limits)?;
    let (upstreams, policy) = upstreams(
        &args.traffic,
        &file,
        &tls,
        &trust_domain,
        &namespace,
        &metrics,
        windows,
    )?;
    let app_addr: SocketAddr =
        args.app
            .parse()
            .map_err(|e: std::net::AddrParseError| SidecarError::Addr {
                what: "app",
                addr: args.app.clone(),
                message: e.to_string(),
            })?;
    app_is_not_own_listener(app_addr, &args)?;
    let app = Arc::new(Connection::new(
        app_addr,
        Transport::Plain,
        policy.connect_timeout,
        windows,
        metrics.clone(),
    ));

    let inbound_listener = bind("inbound", &args.inbound).await?;
    let outbound_listener = bind("outbound", &args.outbound).await?;
    let admin_listener = bind("admin", &args.admin).await?;

    let ready: ReadyCheck = {
        let url = format!("http://{app_addr}");
        Arc::new(move || {
            let url = url.clone();
            Box::pin(async move { crate::app_health::serving(&url).await })
        })
    };
    let admin = spawn_admin(admin_listener, &metrics, ready);

    let stalls = StallWatch::start(args.limits.stall_timeout, metrics.stalls_cancelled());
    let inbound = Arc::new(InboundState {
        service: service.clone(),
        allow,
        app,
        app_slots: AppSlots::new(args.max_app_streams, metrics.app_calls()),
        metrics: metrics.clone(),
        stalls: stalls.clone(),
    });
    let outbound = Arc::new(OutboundState {
        upstreams,
        routes: args.traffic.routes(&file)?,
        default_upstream: None,
        metrics: metrics.clone(),
        span_kind: SpanKind::Client,
        client_id: Arc::from(service.as_str()),
        expose: None,
        stalls,
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let inbound_task = tokio::spawn(listener::serve(
        "inbound",
        inbound_listener,
        args.limits,
        Handshake::Mesh(tls.clone()),
        metrics.clone(),
        stop_rx.clone(),
        move |caller, request, call| handle_inbound(inbound.clone(), caller, request, call),
    ));
    let outbound_task = tokio::spawn(listener::serve(
        "outbound",
        outbound_listener,
        args.limits,
        Handshake::Plain,
        metrics.clone(),
        stop_rx,
        move |_, request, call| handle_outbound(outbound.clone(), request, call),
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
    if args.check_config {
        return dump::print(&dump::gateway(&args, &file)?);
    }
    let (trust_domain, namespace) = naming(&args.identity, &file);
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
        windows(&args.limits)?,
    )?;
    let listener = bind("gateway", &args.listen).await?;
    let admin_listener = bind("admin", &args.admin).await?;
    let state = Arc::new(OutboundState {
        upstreams,
        routes: args.traffic.routes(&file)?,
        default_upstream: Some(args.default_upstream.clone()),
        metrics: metrics.clone(),
        span_kind: SpanKind::Server,
        stalls: StallWatch::start(args.limits.stall_timeout, metrics.stalls_cancelled()),
        client_id: Arc::from("gateway"),
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
    let admin = spawn_admin(admin_listener, &metrics, ready);
    let (stop_tx, stop_rx) = watch::channel(false);
    let edge = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            Handshake::Edge(Arc::new(crate::edge::EdgeTls::load(cert, key)?))
        }
        _ => Handshake::Plain,
    };
    let task = tokio::spawn(listener::serve(
        "gateway",
        listener,
        args.limits,
        edge,
        metrics,
        stop_rx,
        move |_, request, call| handle_outbound(state.clone(), request, call),
    ));
    shutdown.await;
    tracing::info!("draining");
    let _ = stop_tx.send(true);
    let _ = task.await;
    admin.abort();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        sidecar: SidecarArgs,
    }

    #[test]
    fn an_app_address_that_is_one_of_the_sidecars_own_listeners_is_refused() {
        let argv = [
            "sidecar", "--ca", "ca.pem", "--cert", "c.pem", "--key", "k.pem",
        ];
        let args = Cli::try_parse_from(argv).unwrap().sidecar;
        let app = |addr: &str| app_is_not_own_listener(addr.parse().unwrap(), &args);
        let err = app("127.0.0.1:4140").unwrap_err().to_string();
        assert!(err.contains("own outbound listener"), "{err}");
        // The inbound listener's 0.0.0.0 covers every local address.
        assert!(app("127.0.0.1:4143").is_err());
        assert!(app("127.0.0.1:8080").is_ok());
    }
}
