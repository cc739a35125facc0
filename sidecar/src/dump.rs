//! `--check-config`: the configuration as the proxy would run it, printed
//! as a config file (JSON, which the YAML parser reads too), so the output
//! loads back with `--config` and resolves the same. Durations are whole
//! milliseconds there, as in any config file.

use crate::args::{GatewayArgs, SidecarArgs};
use crate::authz::AllowList;
use crate::config::{
    FileConfig, FileEjection, FileRetries, FileTimeouts, FileUpstream, TrafficArgs,
};
use crate::resolve::{allow_list, naming, service};
use crate::server::SidecarError;
use minimesh_traffic::discover::Target;
use std::time::Duration;

/// The sidecar's configuration, resolved from its flags and file.
pub(crate) fn sidecar(args: &SidecarArgs, file: &FileConfig) -> Result<FileConfig, SidecarError> {
    let service = service(&args.service, file)?;
    let (trust_domain, namespace) = naming(&args.identity, file);
    let allow = allow_list(&args.allow, file, &trust_domain, &namespace)?;
    resolved(
        Some(service),
        trust_domain,
        namespace,
        Some(&allow),
        &args.traffic,
        file,
    )
}

/// The gateway's configuration, resolved from its flags and file.
pub(crate) fn gateway(args: &GatewayArgs, file: &FileConfig) -> Result<FileConfig, SidecarError> {
    let (trust_domain, namespace) = naming(&args.identity, file);
    resolved(None, trust_domain, namespace, None, &args.traffic, file)
}

/// Prints a resolved configuration.
pub(crate) fn print(config: &FileConfig) -> Result<(), SidecarError> {
    println!(
        "{}",
        serde_json::to_string_pretty(config).unwrap_or_default()
    );
    Ok(())
}

fn resolved(
    service: Option<String>,
    trust_domain: String,
    namespace: String,
    allow: Option<&AllowList>,
    traffic: &TrafficArgs,
    file: &FileConfig,
) -> Result<FileConfig, SidecarError> {
    let policy = traffic.policy(file);
    let millis = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    let upstreams = traffic
        .upstreams(file)?
        .into_iter()
        .map(|(name, targets)| {
            // Every target as it was given: names are re-resolved either way.
            let endpoints = targets
                .into_iter()
                .map(|target| match target {
                    Target::Addr(addr) => addr.to_string(),
                    Target::Dns { host, port } => format!("{host}:{port}"),
                })
                .collect();
            let upstream = FileUpstream {
                dns: None,
                endpoints,
            };
            (name, upstream)
        })
        .collect();
    let routes = traffic
        .routes(file)?
        .entries()
        .map(|(prefix, upstream)| (prefix.to_owned(), upstream.to_owned()))
        .collect();
    Ok(FileConfig {
        service,
        trust_domain: Some(trust_domain),
        namespace: Some(namespace),
        allow: allow.map_or_else(Vec::new, |a| {
            a.entries().iter().map(ToString::to_string).collect()
        }),
        upstreams,
        routes,
        timeouts: FileTimeouts {
            per_try_ms: policy.per_try_timeout.map(millis),
            connect_ms: Some(millis(policy.connect_timeout)),
        },
        retries: FileRetries {
            budget_percent: Some(policy.retry.budget_ratio * 100.0),
            min_per_second: Some(policy.retry.budget_min_per_second),
            max_attempts: Some(policy.retry.max_attempts),
        },
        ejection: FileEjection {
            consecutive_failures: Some(policy.ejection.consecutive_failures),
            base_ms: Some(millis(policy.ejection.base)),
            max_ms: Some(millis(policy.ejection.max)),
            max_percent: Some(policy.ejection.max_ejection_percent),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Sidecar {
        #[command(flatten)]
        args: SidecarArgs,
    }

    #[derive(Parser)]
    struct Gateway {
        #[command(flatten)]
        args: GatewayArgs,
    }

    const IDENTITY: [&str; 6] = [
        "--ca",
        "/dev/null",
        "--cert",
        "/dev/null",
        "--key",
        "/dev/null",
    ];

    const FILE: &str = r#"
service: order
trustDomain: td.example
namespace: shop
allow: [gateway, "spiffe://other.example/ns/x/sa/y"]
upstreams:
  user: {dns: "user-headless.shop.svc.cluster.local:4143", endpoints: ["10.0.0.1:4143"]}
  payment: {endpoints: ["127.0.0.1:1", "[::1]:2"]}
routes: {"shop.payment.": payment, "/shop.user.": user}
timeouts: {perTryMs: 2000}
retries: {budgetPercent: 12.5, minPerSecond: 3, maxAttempts: 0}
ejection: {consecutiveFailures: 7, baseMs: 500, maxMs: 9000, maxPercent: 34}
"#;

    /// Writes `text` as a config file and parses `flags` with `--config` it.
    fn with_config<T: Parser>(
        dir: &tempfile::TempDir,
        name: &str,
        text: &str,
        flags: &[&str],
    ) -> T {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        let config = ["--config", path.to_str().unwrap()];
        let argv = ["minimesh"]
            .iter()
            .chain(&IDENTITY)
            .chain(&config)
            .chain(flags);
        T::try_parse_from(argv).unwrap()
    }

    fn dump(config: &FileConfig) -> String {
        serde_json::to_string_pretty(config).unwrap()
    }

    #[test]
    fn the_sidecar_dump_loads_back_and_resolves_the_same() {
        let dir = tempfile::tempdir().unwrap();
        // Flags win over the file; the dump says what won.
        let flags = [
            "--eject-after",
            "2",
            "--connect-timeout",
            "750ms",
            "--allow",
            "order",
        ];
        let first: Sidecar = with_config(&dir, "sidecar.yaml", FILE, &flags);
        let file = FileConfig::load(first.args.config.as_ref().unwrap()).unwrap();
        let dumped = dump(&sidecar(&first.args, &file).unwrap());

        let again: Sidecar = with_config(&dir, "dumped.json", &dumped, &[]);
        let loaded = FileConfig::load(again.args.config.as_ref().unwrap()).unwrap();
        assert_eq!(dump(&sidecar(&again.args, &loaded).unwrap()), dumped);
        assert_eq!(
            format!("{:?}", again.args.traffic.policy(&loaded)),
            format!("{:?}", first.args.traffic.policy(&file)),
        );
        assert_eq!(
            format!("{:?}", again.args.traffic.upstreams(&loaded).unwrap()),
            format!("{:?}", first.args.traffic.upstreams(&file).unwrap()),
        );
        assert_eq!(loaded.allow, ["spiffe://td.example/ns/shop/sa/order"]);
        assert_eq!(loaded.ejection.consecutive_failures, Some(2));
        assert_eq!(loaded.timeouts.connect_ms, Some(750));
        assert_eq!(loaded.retries.max_attempts, Some(1), "at least one attempt");
    }

    #[test]
    fn the_gateway_dump_loads_back_and_resolves_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let flags = ["--upstream", "user=user:4143", "--route", "shop.=user"];
        let first: Gateway = with_config(&dir, "gateway.yaml", FILE, &flags);
        let file = FileConfig::load(first.args.config.as_ref().unwrap()).unwrap();
        let dumped = dump(&gateway(&first.args, &file).unwrap());
        let value: serde_json::Value = serde_json::from_str(&dumped).unwrap();
        assert_eq!(value["service"], serde_json::Value::Null, "{dumped}");

        let again: Gateway = with_config(&dir, "dumped.json", &dumped, &[]);
        let loaded = FileConfig::load(again.args.config.as_ref().unwrap()).unwrap();
        assert_eq!(dump(&gateway(&again.args, &loaded).unwrap()), dumped);
        assert_eq!(
            format!("{:?}", again.args.traffic.routes(&loaded).unwrap()),
            format!("{:?}", first.args.traffic.routes(&file).unwrap()),
        );
    }

    #[test]
    fn a_route_with_an_empty_prefix_is_refused() {
        use crate::config::{FileConfig, TrafficArgs};
        let file = FileConfig::parse(
            "upstreams: {user: {endpoints: [\"127.0.0.1:1\"]}}\nroutes: {\"/\": user}\n",
        )
        .unwrap();
        let err = TrafficArgs::default()
            .routes(&file)
            .unwrap_err()
            .to_string();
        assert!(err.contains("empty prefix"), "{err}");
    }
}
