//! `--check-config`: the configuration as the proxy would run it.

use crate::authz::AllowList;
use crate::config::{FileConfig, TrafficArgs};
use crate::server::SidecarError;
use minimesh_traffic::discover;
use std::collections::BTreeMap;

/// Prints the resolved configuration as JSON.
pub(crate) fn print_resolved(
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
