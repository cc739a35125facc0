//! Endpoint discovery: a fixed list, or DNS names re-resolved on an interval
//! with every A/AAAA record an endpoint (what a Kubernetes headless Service
//! gives). The current set is published on a `watch` channel; the balancer
//! adds new endpoints and stops routing to vanished ones, while calls already
//! on a vanished endpoint finish on it.

use std::collections::BTreeSet;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// The addresses of an upstream's endpoints, ordered so changes compare cheaply.
pub type Endpoints = BTreeSet<SocketAddr>;

/// One entry of an upstream's endpoint list: an address, or a name to resolve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A fixed address.
    Addr(SocketAddr),
    /// A name re-resolved on an interval (a Kubernetes headless Service).
    Dns {
        /// The name.
        host: String,
        /// The port every address gets.
        port: u16,
    },
}

/// Why an endpoint is not `HOST:PORT`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TargetError {
    /// No `:PORT`.
    #[error("endpoint {0:?} is not HOST:PORT")]
    NoPort(String),
    /// The port is not a number up to 65535.
    #[error("endpoint {0:?} has an invalid port")]
    BadPort(String),
    /// Nothing before the `:`.
    #[error("endpoint {0:?} has an empty host")]
    EmptyHost(String),
}

impl std::str::FromStr for Target {
    type Err = TargetError;

    fn from_str(raw: &str) -> Result<Self, TargetError> {
        let raw = raw.trim();
        if let Ok(addr) = raw.parse::<SocketAddr>() {
            return Ok(Target::Addr(addr));
        }
        let (host, port) = raw
            .rsplit_once(':')
            .ok_or_else(|| TargetError::NoPort(raw.to_owned()))?;
        let port = port
            .parse()
            .map_err(|_| TargetError::BadPort(raw.to_owned()))?;
        if host.is_empty() {
            return Err(TargetError::EmptyHost(raw.to_owned()));
        }
        Ok(Target::Dns {
            host: host.to_owned(),
            port,
        })
    }
}

type ResolveFuture = Pin<Box<dyn Future<Output = std::io::Result<Vec<SocketAddr>>> + Send>>;

/// Turns a name into addresses.
pub trait Resolve: Send + Sync + 'static {
    /// The addresses of `host`, each with `port`.
    fn resolve(&self, host: &str, port: u16) -> ResolveFuture;
}

/// The system resolver (getaddrinfo via Tokio): A and AAAA records.
#[derive(Debug, Clone, Default)]
pub struct SystemResolver;

impl Resolve for SystemResolver {
    fn resolve(&self, host: &str, port: u16) -> ResolveFuture {
        let host = host.to_owned();
        Box::pin(async move {
            Ok(tokio::net::lookup_host((host.as_str(), port))
                .await?
                .collect())
        })
    }
}

/// Resolves from a hosts-format file (`ADDRESS NAME…` per line), re-read on
/// every lookup. For tests and for pinning names without DNS.
#[derive(Debug, Clone)]
pub struct HostsFileResolver {
    /// The hosts file, read again on every resolution.
    pub path: PathBuf,
}

impl Resolve for HostsFileResolver {
    fn resolve(&self, host: &str, port: u16) -> ResolveFuture {
        let path = self.path.clone();
        let host = host.to_owned();
        Box::pin(async move {
            let text = tokio::fs::read_to_string(&path).await?;
            let addrs = text
                .lines()
                .map(|line| line.split('#').next().unwrap_or(""))
                .filter_map(|line| {
                    let mut words = line.split_whitespace();
                    let ip: std::net::IpAddr = words.next()?.parse().ok()?;
                    words
                        .any(|name| name == host)
                        .then_some(SocketAddr::new(ip, port))
                })
                .collect();
            Ok(addrs)
        })
    }
}

/// Publishes the endpoint set of `targets`: fixed addresses as they are,
/// names re-resolved every `interval`. A failed lookup keeps that name's last
/// known addresses, so a DNS hiccup does not empty the upstream.
pub fn spawn(
    targets: Vec<Target>,
    resolver: Arc<dyn Resolve>,
    interval: Duration,
) -> watch::Receiver<Endpoints> {
    let fixed: Endpoints = targets
        .iter()
        .filter_map(|t| match t {
            Target::Addr(a) => Some(*a),
            Target::Dns { .. } => None,
        })
        .collect();
    let names: Vec<(String, u16)> = targets
        .into_iter()
        .filter_map(|t| match t {
            Target::Dns { host, port } => Some((host, port)),
            Target::Addr(_) => None,
        })
        .collect();
    let (tx, rx) = watch::channel(fixed.clone());
    if names.is_empty() {
        // Keep the sender alive so receivers never see the set as closed.
        tokio::spawn(async move { tx.closed().await });
        return rx;
    }
    tokio::spawn(async move {
        let mut last: Vec<Endpoints> = vec![Endpoints::new(); names.len()];
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = tx.closed() => return,
            }
            for (i, (host, port)) in names.iter().enumerate() {
                match resolver.resolve(host, *port).await {
                    Ok(addrs) => last[i] = addrs.into_iter().collect(),
                    Err(err) => {
                        tracing::warn!(%host, %err, "resolving upstream failed; keeping the last known endpoints")
                    }
                }
            }
            let mut next = fixed.clone();
            for set in &last {
                next.extend(set.iter().copied());
            }
            tx.send_if_modified(|current| {
                if *current == next {
                    return false;
                }
                let added: Vec<_> = next.difference(current).collect();
                let removed: Vec<_> = current.difference(&next).collect();
                tracing::info!(?added, ?removed, "upstream endpoints changed");
                *current = next;
                true
            });
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_as_addresses_or_names() {
        assert_eq!(
            "127.0.0.1:4143".parse(),
            Ok(Target::Addr("127.0.0.1:4143".parse().unwrap()))
        );
        assert_eq!(
            "[::1]:80".parse(),
            Ok(Target::Addr("[::1]:80".parse().unwrap()))
        );
        assert_eq!(
            "payment-headless.shop.svc.cluster.local:4143".parse(),
            Ok(Target::Dns {
                host: "payment-headless.shop.svc.cluster.local".into(),
                port: 4143
            })
        );
        assert!(matches!(
            "payment".parse::<Target>(),
            Err(TargetError::NoPort(_))
        ));
        assert!(matches!(
            "payment:http".parse::<Target>(),
            Err(TargetError::BadPort(_))
        ));
        assert!(matches!(
            ":80".parse::<Target>(),
            Err(TargetError::EmptyHost(_))
        ));
    }

    #[tokio::test]
    async fn dns_names_are_re_resolved_and_changes_published() {
        let dir = tempfile::tempdir().unwrap();
        let hosts = dir.path().join("hosts");
        std::fs::write(
            &hosts,
            "127.0.0.2 payment\n127.0.0.3 payment other\n127.0.0.9 unrelated\n",
        )
        .unwrap();
        let resolver = Arc::new(HostsFileResolver {
            path: hosts.clone(),
        });
        let targets = vec![
            "payment:4143".parse().unwrap(),
            "127.0.0.1:9000".parse().unwrap(),
        ];
        let mut rx = spawn(targets, resolver, Duration::from_millis(20));
        let set =
            |addrs: &[&str]| -> Endpoints { addrs.iter().map(|a| a.parse().unwrap()).collect() };

        let first = rx.wait_for(|s| s.len() == 3).await.unwrap().clone();
        assert_eq!(
            first,
            set(&["127.0.0.1:9000", "127.0.0.2:4143", "127.0.0.3:4143"])
        );

        // One address appears and one goes away.
        std::fs::write(&hosts, "127.0.0.3 payment\n127.0.0.4 payment\n").unwrap();
        let next = rx
            .wait_for(|s| s.contains(&"127.0.0.4:4143".parse().unwrap()))
            .await
            .unwrap()
            .clone();
        assert_eq!(
            next,
            set(&["127.0.0.1:9000", "127.0.0.3:4143", "127.0.0.4:4143"])
        );

        // A failed lookup keeps the last known set.
        std::fs::remove_file(&hosts).unwrap();
        tokio::time::timeout(Duration::from_millis(200), rx.changed())
            .await
            .expect_err("no change on failure");
        assert_eq!(*rx.borrow(), next);
    }
}
