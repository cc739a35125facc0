//! `minimesh-proxy` is the proxy alone: the same flags, configuration and
//! failure line as `minimesh sidecar` and `minimesh gateway`, which `up` and
//! the chart rely on when they run it in their place.

mod common;

use common::process::executable;
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

#[tokio::test]
async fn up_without_minimesh_proxy_beside_it_runs_the_proxies_as_minimesh_sidecar() {
    // `cargo run -- up` builds only minimesh: a directory holding just that.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let alone = dir.path().join("minimesh");
    std::fs::hard_link(MINIMESH, &alone)
        .or_else(|_| std::fs::copy(MINIMESH, &alone).map(|_| ()))
        .unwrap();
    let data = dir.path().join("data");
    let mesh = common::process::start_mesh_from(&alone, &data, &[]).await;
    let file = mesh.mesh_json();
    for instance in file["instances"].as_array().unwrap() {
        assert_eq!(executable(&instance["sidecar_pid"]), "minimesh");
    }
    assert_eq!(executable(&file["gateway"]["pid"]), "minimesh");
    // ...and it serves: a user created through the gateway and its sidecar.
    let mut users = minimesh_proto::user::v1::user_service_client::UserServiceClient::new(
        mesh.gateway_channel().await,
    );
    let user = common::new_user(&mut users).await;
    assert!(!user.id.is_empty());
}

#[test]
fn up_with_a_proxy_bin_that_is_not_there_says_so_and_starts_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-proxy");
    let out = Command::new(MINIMESH)
        .args(["up", "--gateway-addr", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("data"))
        .arg("--proxy-bin")
        .arg(&missing)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let said = text(&out.stderr);
    assert!(
        said.contains(&format!("--proxy-bin {} is not a file", missing.display())),
        "{said}"
    );
    assert!(!dir.path().join("data").join("mesh.json").exists());
}
