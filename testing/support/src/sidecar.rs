//! Proxies run in-process on fresh loopback ports, stopped when dropped.

use crate::http::wait_ok;
use crate::{TestCa, free_addr};
use minimesh_sidecar::config::TrafficArgs;
use minimesh_sidecar::server::IdentityArgs;
use minimesh_sidecar::{GatewayArgs, SidecarArgs, run_gateway, run_sidecar};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::sync::oneshot;

/// How long a proxy may take to listen.
const START: Duration = Duration::from_secs(10);

impl TestCa {
    /// Identity flags for a proxy running as `name`, issued by this CA.
    pub fn identity_args(&self, name: &str) -> anyhow::Result<IdentityArgs> {
        let (cert, key) = self.issue(name)?;
        Ok(IdentityArgs::from_files(self.ca_pem(), cert, key))
    }
}

/// Stops its proxy when dropped (or sent to).
pub type Stop = oneshot::Sender<()>;

/// Runs a gateway in the background until the returned [`Stop`] goes.
pub fn spawn_gateway(args: GatewayArgs) -> Stop {
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(run_gateway(args, async move {
        let _ = stopped.await;
    }));
    stop
}

/// Runs a sidecar in the background until the returned [`Stop`] goes.
pub fn spawn_sidecar(args: SidecarArgs) -> Stop {
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(run_sidecar(args, async move {
        let _ = stopped.await;
    }));
    stop
}

/// A sidecar running in-process; stopped when dropped.
pub struct Sidecar {
    /// Its mTLS listener for calls from the mesh.
    pub inbound: SocketAddr,
    /// Its h2c listener for the local application's calls.
    pub outbound: SocketAddr,
    /// `/live`, `/ready`, `/metrics`.
    pub admin: SocketAddr,
    _stop: Stop,
}

impl Sidecar {
    /// Starts a sidecar for `name` (identity from `ca`) in front of `app`,
    /// accepting the callers in `allow`, and returns once its admin listener
    /// answers `/live` (every listener is bound by then). The app need not
    /// be up. Readiness is not probed on the inbound port: a bare TCP
    /// connection there is a failed handshake, which tests count.
    pub async fn start(
        ca: &TestCa,
        name: &str,
        app: SocketAddr,
        allow: &[&str],
        traffic: TrafficArgs,
    ) -> anyhow::Result<Self> {
        Self::start_with_limits(ca, name, app, allow, traffic, Default::default()).await
    }

    /// [`Sidecar::start`] with its listeners' `limits` (windows, timeouts).
    pub async fn start_with_limits(
        ca: &TestCa,
        name: &str,
        app: SocketAddr,
        allow: &[&str],
        traffic: TrafficArgs,
        limits: minimesh_sidecar::listener::Limits,
    ) -> anyhow::Result<Self> {
        let (inbound, outbound, admin) = (free_addr()?, free_addr()?, free_addr()?);
        let stop = spawn_sidecar(SidecarArgs {
            service: Some(name.into()),
            inbound: inbound.to_string(),
            outbound: outbound.to_string(),
            admin: admin.to_string(),
            app: app.to_string(),
            allow: allow.iter().map(|a| a.to_string()).collect(),
            max_app_streams: minimesh_sidecar::args::DEFAULT_MAX_APP_STREAMS,
            config: None,
            check_config: false,
            identity: ca.identity_args(name)?,
            traffic,
            limits,
        });
        wait_ok(admin, "/live", START).await?;
        Ok(Self {
            inbound,
            outbound,
            admin,
            _stop: stop,
        })
    }
}
