//! `minimesh-proxy` is the proxy alone: the same flags, configuration and
//! failure line as `minimesh sidecar` and `minimesh gateway`, which `up` and
//! the chart rely on when they run it in their place.

use std::process::{Command, Output};

const MINIMESH: &str = env!("CARGO_BIN_EXE_minimesh");
const PROXY: &str = env!("CARGO_BIN_EXE_minimesh-proxy");

fn run(bin: &str, args: &[&str], envs: &[(&str, &str)]) -> Output {
    Command::new(bin)
        .args(args)
        .envs(envs.iter().copied())
        .env_remove("MINIMESH_SUPERVISED")
        .output()
        .expect("the binary runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A CA and an identity for `name`, made by `minimesh certs`.
fn credentials(dir: &std::path::Path, name: &str) -> Vec<String> {
    let ca = dir.join("ca");
    let ids = dir.join("id");
    for args in [
        vec!["certs", "init", "--out", ca.to_str().unwrap()],
        vec![
            "certs",
            "issue",
            "--ca",
            ca.to_str().unwrap(),
            "--name",
            name,
            "--out",
            ids.to_str().unwrap(),
        ],
    ] {
        let out = run(MINIMESH, &args, &[]);
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    [
        ("--ca", ca.join("ca.pem")),
        ("--cert", ids.join(format!("{name}.pem"))),
        ("--key", ids.join(format!("{name}.key"))),
    ]
    .into_iter()
    .flat_map(|(flag, path)| [flag.to_owned(), path.display().to_string()])
    .collect()
}

#[test]
fn both_binaries_resolve_the_same_configuration_from_flags_and_environment() {
    let dir = tempfile::tempdir().unwrap();
    let identity = credentials(dir.path(), "order");
    let mut args = vec![
        "sidecar",
        "--check-config",
        "--service",
        "order",
        "--upstream",
        "payment=10.0.0.7:8443,10.0.0.8:8443",
        "--route",
        "shop.payment.=payment",
        "--allow",
        "gateway",
    ];
    args.extend(identity.iter().map(String::as_str));
    let envs = [
        ("MINIMESH_STREAM_WINDOW", "131072"),
        ("MINIMESH_PROXY_THREADS", "2"),
    ];
    let from_cli = run(MINIMESH, &args, &envs);
    let from_proxy = run(PROXY, &args, &envs);
    assert!(from_cli.status.success(), "{}", text(&from_cli.stderr));
    assert!(from_proxy.status.success(), "{}", text(&from_proxy.stderr));
    let dump = text(&from_proxy.stdout);
    assert!(
        dump.contains("10.0.0.8:8443") && dump.contains("shop.payment."),
        "{dump}"
    );
    assert_eq!(dump, text(&from_cli.stdout));

    let mut gateway = vec![
        "gateway",
        "--check-config",
        "--upstream",
        "order=10.0.0.9:8443",
        "--expose",
        "order",
    ];
    let gateway_identity = credentials(&dir.path().join("gw"), "gateway");
    gateway.extend(gateway_identity.iter().map(String::as_str));
    let from_cli = run(MINIMESH, &gateway, &[]);
    let from_proxy = run(PROXY, &gateway, &[]);
    assert!(from_proxy.status.success(), "{}", text(&from_proxy.stderr));
    assert_eq!(text(&from_proxy.stdout), text(&from_cli.stdout));
}

#[test]
fn a_proxy_that_cannot_start_says_why_in_the_line_up_quotes() {
    let dir = tempfile::tempdir().unwrap();
    let identity = credentials(dir.path(), "payment");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = taken.local_addr().unwrap().to_string();
    let mut args = vec![
        "sidecar",
        "--service",
        "payment",
        "--inbound",
        &taken,
        "--outbound",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        "--app",
        "127.0.0.1:1",
    ];
    args.extend(identity.iter().map(String::as_str));
    let from_proxy = run(PROXY, &args, &[]);
    let from_cli = run(MINIMESH, &args, &[]);
    assert_eq!(from_proxy.status.code(), Some(1));
    let line = |out: &Output| {
        text(&out.stderr)
            .lines()
            .find(|l| l.starts_with("minimesh: error: "))
            .map(str::to_owned)
    };
    let said = line(&from_proxy).expect("an error line");
    assert!(said.contains(&taken), "{said}");
    assert_eq!(Some(said), line(&from_cli));
}

#[test]
fn the_proxy_binary_names_itself_and_runs_nothing_else() {
    let version = run(PROXY, &["--version"], &[]);
    let version = text(&version.stdout);
    assert!(
        version.starts_with(&format!("minimesh-proxy {}", env!("CARGO_PKG_VERSION"))),
        "{version}"
    );
    let other = run(PROXY, &["service", "user"], &[]);
    assert_eq!(other.status.code(), Some(2));
    assert!(text(&other.stderr).contains("unrecognized subcommand 'service'"));
    let missing = run(PROXY, &["sidecar", "--service", "user"], &[]);
    assert_eq!(missing.status.code(), Some(2));
    assert!(
        text(&missing.stderr).contains("--ca"),
        "{}",
        text(&missing.stderr)
    );
}
