//! Resolving the configuration: flags over the config file over defaults,
//! and the upstreams it names.

use crate::args::IdentityArgs;
use crate::authz::AllowList;
use crate::client::Transport;
use crate::config::{ConfigError, FileConfig, TrafficArgs};
use crate::metrics::{Metrics, OUTBOUND};
use crate::server::SidecarError;
use crate::tls::Reloader;
use crate::upstream::{TrafficPolicy, Upstream};
use minimesh_spiffe::SpiffeId;
use minimesh_traffic::discover::{self, HostsFileResolver, Resolve, SystemResolver};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

pub(crate) fn loaded_file(path: &Option<PathBuf>) -> Result<FileConfig, ConfigError> {
    match path {
        Some(path) => FileConfig::load(path),
        None => Ok(FileConfig::default()),
    }
}

/// The local service: the flag, else the file's.
pub(crate) fn service(flag: &Option<String>, file: &FileConfig) -> Result<String, ConfigError> {
    flag.clone()
        .or(file.service.clone())
        .ok_or(ConfigError::Missing("--service"))
}

/// The callers let in: the flags' list, else the file's.
pub(crate) fn allow_list(
    flags: &[String],
    file: &FileConfig,
    trust_domain: &str,
    namespace: &str,
) -> Result<AllowList, ConfigError> {
    let entries = if flags.is_empty() {
        &file.allow[..]
    } else {
        flags
    };
    AllowList::new(entries, trust_domain, namespace).map_err(ConfigError::Allow)
}

pub(crate) fn naming(identity: &IdentityArgs, file: &FileConfig) -> (String, String) {
    let trust_domain = identity
        .trust_domain
        .clone()
        .or(file.trust_domain.clone())
        .unwrap_or_else(|| minimesh_spiffe::DEFAULT_TRUST_DOMAIN.to_owned());
    let namespace = identity
        .namespace
        .clone()
        .or(file.namespace.clone())
        .unwrap_or_else(|| minimesh_spiffe::DEFAULT_NAMESPACE.to_owned());
    (trust_domain, namespace)
}

pub(crate) fn upstreams(
    traffic: &TrafficArgs,
    file: &FileConfig,
    tls: &Arc<Reloader>,
    trust_domain: &str,
    namespace: &str,
    metrics: &Arc<Metrics>,
    windows: crate::window::Windows,
) -> Result<(BTreeMap<String, Arc<Upstream>>, TrafficPolicy), SidecarError> {
    let policy = TrafficPolicy {
        windows,
        ..traffic.policy(file)
    };
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

pub(crate) fn upstream_names(
    traffic: &TrafficArgs,
    file: &FileConfig,
) -> Result<Vec<String>, SidecarError> {
    Ok(traffic.upstreams(file)?.into_keys().collect())
}

/// The windows of `limits`, refused when the connection's is below one
/// stream's; a warning when stalled readers could starve a connection.
pub(crate) fn windows(
    limits: &crate::listener::Limits,
) -> Result<crate::window::Windows, SidecarError> {
    let windows = limits.windows();
    if windows.connection < windows.stream {
        return Err(ConfigError::Windows {
            stream: windows.stream,
            connection: windows.connection,
        }
        .into());
    }
    if let Some(stalls) = windows.stalls_to_starve() {
        tracing::warn!(
            stream_window = windows.stream,
            connection_window = windows.connection,
            "{stalls} stalled readers fill a connection's window and hold up its other calls until --stall-timeout cancels them"
        );
    }
    Ok(windows)
}
