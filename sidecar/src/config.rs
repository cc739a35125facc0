//! Configuration: flags (each with an environment variable) over an optional
//! YAML or JSON file, which is what the Helm chart's ConfigMap holds.

use crate::upstream::TrafficPolicy;
use minimesh_traffic::discover::Target;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Why the configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("reading config file {path}: {source}")]
    Read {
        /// The config file.
        path: PathBuf,
        /// What the read failed with.
        source: std::io::Error,
    },
    /// The config file is not valid YAML/JSON of the expected shape.
    #[error("parsing config file {path}: {message}")]
    Parse {
        /// The config file.
        path: PathBuf,
        /// What the parser said.
        message: String,
    },
    /// An upstream given as a flag is not `SERVICE=HOST:PORT[,HOST:PORT…]`.
    #[error("upstream {0:?} is not SERVICE=HOST:PORT[,HOST:PORT…]")]
    Upstream(String),
    /// An upstream's endpoints are not valid.
    #[error("upstream {service}: {source}")]
    Target {
        /// The upstream's name.
        service: String,
        /// What is wrong with its endpoints.
        source: minimesh_traffic::discover::TargetError,
    },
    /// A required setting is missing (named).
    #[error("{0} is required (flag, environment variable or config file)")]
    Missing(&'static str),
    /// An allow-list entry is not a valid identity.
    #[error("allow-list: {0}")]
    Allow(#[from] minimesh_spiffe::SpiffeError),
    /// A route is not `PREFIX=UPSTREAM` or has an empty prefix.
    #[error("{0}")]
    Route(String),
    /// The HTTP/2 windows do not fit together.
    #[error(
        "--connection-window {connection} is smaller than --stream-window {stream}: one stream could never use its window"
    )]
    Windows {
        /// Bytes per stream.
        stream: u32,
        /// Bytes per connection.
        connection: u32,
    },
    /// A route names an upstream that is not configured.
    #[error("route {prefix:?} goes to {upstream:?}, which is not a configured upstream")]
    RouteTarget {
        /// The route's path prefix.
        prefix: String,
        /// The upstream it names.
        upstream: String,
    },
}

/// The file format (every key optional). `--check-config` prints the
/// resolved configuration in this format, so its output loads back.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileConfig {
    /// The local service this sidecar fronts (its identity's name).
    pub service: Option<String>,
    /// The mesh's trust domain.
    pub trust_domain: Option<String>,
    /// The namespace of this proxy's identity.
    pub namespace: Option<String>,
    /// Caller identities allowed in: short names or SPIFFE URIs.
    #[serde(default)]
    pub allow: Vec<String>,
    /// Upstreams by name: where calls to each go.
    #[serde(default)]
    pub upstreams: BTreeMap<String, FileUpstream>,
    /// gRPC path prefixes (`shop.payment.`) to upstream names.
    #[serde(default)]
    pub routes: BTreeMap<String, String>,
    /// Connect and per-try timeouts.
    #[serde(default)]
    pub timeouts: FileTimeouts,
    /// The retry budget and attempt limit.
    #[serde(default)]
    pub retries: FileRetries,
    /// When an endpoint is ejected, and for how long.
    #[serde(default)]
    pub ejection: FileEjection,
}

/// Where one upstream's endpoints are: a DNS name or a fixed list.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileUpstream {
    /// A DNS name (HOST:PORT) re-resolved on an interval.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dns: Option<String>,
    /// Fixed HOST:PORT endpoints.
    #[serde(default)]
    pub endpoints: Vec<String>,
}

/// Timeouts in the config file (milliseconds).
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileTimeouts {
    /// Longest wait for response headers from one attempt.
    pub per_try_ms: Option<u64>,
    /// TCP and TLS connect timeout.
    pub connect_ms: Option<u64>,
}

/// The retry settings in the config file.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileRetries {
    /// Retries allowed as a share of requests.
    pub budget_percent: Option<f32>,
    /// Retries allowed per second whatever the request rate.
    pub min_per_second: Option<u32>,
    /// Attempts per call, the first included.
    pub max_attempts: Option<u32>,
}

/// The ejection settings in the config file.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileEjection {
    /// Failures in a row that eject an endpoint.
    pub consecutive_failures: Option<u32>,
    /// First ejection's length (milliseconds); it grows with each ejection.
    pub base_ms: Option<u64>,
    /// Longest ejection (milliseconds).
    pub max_ms: Option<u64>,
    /// Most endpoints of one upstream ejected at once, in percent.
    pub max_percent: Option<u32>,
}

impl FileConfig {
    /// Reads a YAML or JSON config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|message| ConfigError::Parse {
            path: path.to_owned(),
            message,
        })
    }

    /// Parses a config file's text (YAML or JSON: YAML is a superset of
    /// JSON, so one parser reads both).
    pub fn parse(text: &str) -> Result<Self, String> {
        serde_yaml_ng::from_str(text).map_err(|e| e.to_string())
    }
}

/// Traffic settings shared by the sidecar and the gateway. Unset flags fall
/// back to the config file, then to the defaults in README.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TrafficArgs {
    /// Upstream endpoints: SERVICE=HOST:PORT[,HOST:PORT…]; names are re-resolved by DNS (repeatable).
    #[arg(long = "upstream", env = "MINIMESH_UPSTREAMS", value_delimiter = ';')]
    pub upstreams: Vec<String>,
    /// A call whose `:authority` names no upstream goes by the longest of
    /// these gRPC path prefixes: `PREFIX=UPSTREAM`, e.g. `shop.payment.=payment`.
    #[arg(long = "route", env = "MINIMESH_ROUTES", value_delimiter = ';')]
    pub routes: Vec<String>,
    /// Longest wait for response headers from one attempt (e.g. 2s); none by default.
    #[arg(long, env = "MINIMESH_PER_TRY_TIMEOUT", value_parser = humantime::parse_duration)]
    pub per_try_timeout: Option<Duration>,
    /// Attempts per call, the first included (default 3).
    #[arg(long, env = "MINIMESH_RETRY_MAX_ATTEMPTS")]
    pub retry_max_attempts: Option<u32>,
    /// Retries allowed as a percentage of recent calls (default 20).
    #[arg(long, env = "MINIMESH_RETRY_BUDGET_PERCENT")]
    pub retry_budget_percent: Option<f32>,
    /// Retries allowed per second regardless of traffic (default 10).
    #[arg(long, env = "MINIMESH_RETRY_MIN_PER_SECOND")]
    pub retry_min_per_second: Option<u32>,
    /// Consecutive failures that eject an endpoint (default 5).
    #[arg(long, env = "MINIMESH_EJECT_AFTER")]
    pub eject_after: Option<u32>,
    /// First ejection back-off (default 1s), doubling per ejection in a row.
    #[arg(long, env = "MINIMESH_EJECT_BASE", value_parser = humantime::parse_duration)]
    pub eject_base: Option<Duration>,
    /// Longest ejection back-off (default 60s).
    #[arg(long, env = "MINIMESH_EJECT_MAX", value_parser = humantime::parse_duration)]
    pub eject_max: Option<Duration>,
    /// Most endpoints of one upstream ejected at once, in percent (default 50; one may always be).
    #[arg(long, env = "MINIMESH_EJECT_MAX_PERCENT", value_parser = clap::value_parser!(u32).range(0..=100))]
    pub eject_max_percent: Option<u32>,
    /// How often DNS upstream names are re-resolved.
    #[arg(long, env = "MINIMESH_DNS_REFRESH", value_parser = humantime::parse_duration, default_value = "5s")]
    pub dns_refresh: Duration,
    /// Resolve upstream names from this hosts-format file instead of DNS (for tests and pinning).
    #[arg(long, env = "MINIMESH_HOSTS_FILE")]
    pub hosts_file: Option<PathBuf>,
    /// TCP and TLS connect timeout (default 1s).
    #[arg(long, env = "MINIMESH_CONNECT_TIMEOUT", value_parser = humantime::parse_duration)]
    pub connect_timeout: Option<Duration>,
}

impl TrafficArgs {
    /// The traffic policy from these flags, then the file, then the defaults.
    pub fn policy(&self, file: &FileConfig) -> TrafficPolicy {
        let mut policy = TrafficPolicy {
            per_try_timeout: self
                .per_try_timeout
                .or(file.timeouts.per_try_ms.map(Duration::from_millis)),
            ..TrafficPolicy::default()
        };
        if let Some(t) = self
            .connect_timeout
            .or(file.timeouts.connect_ms.map(Duration::from_millis))
        {
            policy.connect_timeout = t;
        }
        if let Some(n) = self.retry_max_attempts.or(file.retries.max_attempts) {
            policy.retry.max_attempts = n.max(1);
        }
        if let Some(p) = self.retry_budget_percent.or(file.retries.budget_percent) {
            policy.retry.budget_ratio = (p / 100.0).clamp(0.0, 10.0);
        }
        if let Some(n) = self.retry_min_per_second.or(file.retries.min_per_second) {
            policy.retry.budget_min_per_second = n;
        }
        if let Some(n) = self.eject_after.or(file.ejection.consecutive_failures) {
            policy.ejection.consecutive_failures = n.max(1);
        }
        if let Some(d) = self
            .eject_base
            .or(file.ejection.base_ms.map(Duration::from_millis))
        {
            policy.ejection.base = d;
        }
        if let Some(d) = self
            .eject_max
            .or(file.ejection.max_ms.map(Duration::from_millis))
        {
            policy.ejection.max = d;
        }
        if let Some(p) = self.eject_max_percent.or(file.ejection.max_percent) {
            policy.ejection.max_ejection_percent = p.min(100);
        }
        policy
    }

    /// Upstreams from flags, else from the file.
    pub fn upstreams(
        &self,
        file: &FileConfig,
    ) -> Result<BTreeMap<String, Vec<Target>>, ConfigError> {
        let mut out = BTreeMap::new();
        if !self.upstreams.is_empty() {
            for spec in &self.upstreams {
                let (service, list) = spec
                    .split_once('=')
                    .ok_or_else(|| ConfigError::Upstream(spec.clone()))?;
                let targets =
                    parse_targets(service, list.split(',').filter(|s| !s.trim().is_empty()))?;
                out.insert(service.trim().to_owned(), targets);
            }
            return Ok(out);
        }
        for (service, upstream) in &file.upstreams {
            let targets = parse_targets(
                service,
                upstream
                    .dns
                    .iter()
                    .map(String::as_str)
                    .chain(upstream.endpoints.iter().map(String::as_str)),
            )?;
            out.insert(service.clone(), targets);
        }
        Ok(out)
    }
}

impl TrafficArgs {
    /// Routes from flags, else from the file; each must name an upstream.
    pub fn routes(&self, file: &FileConfig) -> Result<crate::route::Routes, ConfigError> {
        let pairs: Vec<(String, String)> = if self.routes.is_empty() {
            file.routes.clone().into_iter().collect()
        } else {
            self.routes
                .iter()
                .map(|spec| crate::route::parse_route(spec).map_err(ConfigError::Route))
                .collect::<Result<_, _>>()?
        };
        // An empty prefix would match nothing (a prefix ends on a name boundary).
        if let Some((prefix, upstream)) = pairs
            .iter()
            .find(|(p, _)| p.trim_start_matches('/').is_empty())
        {
            return Err(ConfigError::Route(format!(
                "route {prefix:?} → {upstream} has an empty prefix: name a gRPC package or service, e.g. \"acme.echo.\""
            )));
        }
        let upstreams = self.upstreams(file)?;
        if let Some((prefix, upstream)) = pairs.iter().find(|(_, u)| !upstreams.contains_key(u)) {
            return Err(ConfigError::RouteTarget {
                prefix: prefix.clone(),
                upstream: upstream.clone(),
            });
        }
        Ok(crate::route::Routes::new(pairs))
    }
}

fn parse_targets<'a>(
    service: &str,
    items: impl Iterator<Item = &'a str>,
) -> Result<Vec<Target>, ConfigError> {
    items
        .map(|item| {
            item.parse().map_err(|source| ConfigError::Target {
                service: service.to_owned(),
                source,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_config_reads_the_chart_shape_and_flags_win() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sidecar.yaml");
        std::fs::write(
            &path,
            "service: order\ntrustDomain: minimesh.local\nnamespace: shop\nallow: [gateway]\nupstreams:\n  user: {dns: \"user-headless.shop.svc.cluster.local:4143\"}\n  payment: {endpoints: [\"127.0.0.1:1\", \"127.0.0.1:2\"]}\ntimeouts: {perTryMs: 2000}\nretries: {budgetPercent: 20, minPerSecond: 10, maxAttempts: 3}\nejection: {consecutiveFailures: 7, baseMs: 500, maxPercent: 34}\n",
        )
        .unwrap();
        let file = FileConfig::load(&path).unwrap();
        assert_eq!(file.allow, ["gateway"]);
        let args = TrafficArgs {
            eject_after: Some(2),
            ..TrafficArgs::default()
        };
        let policy = args.policy(&file);
        assert_eq!(policy.per_try_timeout, Some(Duration::from_secs(2)));
        assert_eq!(
            policy.ejection.consecutive_failures, 2,
            "the flag wins over the file"
        );
        assert_eq!(policy.ejection.base, Duration::from_millis(500));
        assert_eq!(policy.ejection.max_ejection_percent, 34);
        let upstreams = args.upstreams(&file).unwrap();
        assert_eq!(upstreams["payment"].len(), 2);
        assert!(matches!(
            &upstreams["user"][0],
            Target::Dns { port: 4143, .. }
        ));

        let flagged = TrafficArgs {
            upstreams: vec!["payment=127.0.0.1:9,127.0.0.1:10".into()],
            ..TrafficArgs::default()
        };
        assert_eq!(
            flagged.upstreams(&file).unwrap().keys().collect::<Vec<_>>(),
            ["payment"]
        );
        let bad = TrafficArgs {
            upstreams: vec!["payment".into()],
            ..TrafficArgs::default()
        };
        assert!(bad.upstreams(&file).is_err());
    }

    #[test]
    fn unknown_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.yaml");
        std::fs::write(&path, "service: order\nretrys: {}\n").unwrap();
        assert!(matches!(
            FileConfig::load(&path),
            Err(ConfigError::Parse { .. })
        ));
    }
}
