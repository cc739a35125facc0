//! Operating the local mesh: `up` that never trips over itself, metrics any
//! scraper accepts, and `stat` / `top` showing every edge.

mod common;

use common::process::*;
use common::*;
use minimesh_proto::order::v1::order_service_client::OrderServiceClient;
use minimesh_proto::user::v1::user_service_client::UserServiceClient;
use minimesh_testsupport::eventually;
use minimesh_testsupport::http::get_accepting;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Whether an external tool is here; under CI a missing tool fails the test.
fn have_tool(name: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "{name} is required under CI (.ci/run installs it)"
        );
        eprintln!("skipping: {name} is not installed");
    }
    found
}

fn minimesh() -> Command {
    Command::new(env!("CARGO_BIN_EXE_minimesh"))
}

/// Status, content type and body of `GET path`, asking for `accept`.
async fn http_get(addr: &str, path: &str, accept: Option<&str>) -> (u16, String, String) {
    let answer = get_accepting(addr, path, accept)
        .await
        .unwrap_or_else(|| panic!("{addr}{path} did not answer"));
    (answer.code, answer.content_type, answer.body)
}

/// Every metrics endpoint the mesh serves: gateway and sidecar admins, services.
fn metrics_endpoints(mesh: &Mesh) -> Vec<(String, String)> {
    let file = mesh.mesh_json();
    let mut out = vec![
        (
            "gateway".to_owned(),
            file["gateway"]["admin"].as_str().unwrap().to_owned(),
        ),
        (
            "identity issuer".to_owned(),
            file["identity"]["metrics"].as_str().unwrap().to_owned(),
        ),
    ];
    for i in file["instances"].as_array().unwrap() {
        let name = format!("{}-{}", i["service"].as_str().unwrap(), i["replica"]);
        out.push((
            format!("{name}-sidecar"),
            i["admin"].as_str().unwrap().to_owned(),
        ));
        out.push((name, i["metrics"].as_str().unwrap().to_owned()));
    }
    out
}

/// Runs `program` with `text` on its standard input.
fn run_with_input(program: &str, args: &[&str], text: &str) -> std::process::Output {
    use std::io::Write;
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn promtool_problems(text: &str) -> String {
    let out = run_with_input("promtool", &["check", "metrics"], text);
    let mut problems = String::from_utf8_lossy(&out.stdout).into_owned();
    problems.push_str(&String::from_utf8_lossy(&out.stderr));
    if !out.status.success() && problems.trim().is_empty() {
        problems = format!("promtool exited {}", out.status);
    }
    problems
}

/// Parses with Python's strict OpenMetrics parser; Err carries its complaint.
fn openmetrics_parse(text: &str) -> Result<(), String> {
    let script = "import sys\nfrom prometheus_client.openmetrics.parser import text_string_to_metric_families as p\nlist(p(sys.stdin.read()))\n";
    let out = run_with_input("python3", &["-c", script], text);
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn have_openmetrics_parser() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import prometheus_client.openmetrics.parser"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "python3 prometheus_client is required under CI (.ci/run installs it)"
        );
        eprintln!("skipping the OpenMetrics check: pip install prometheus_client");
    }
    ok
}

/// Places `orders` orders for one new user through the gateway.
async fn shop_through_gateway(mesh: &Mesh, orders: usize) {
    let gateway = mesh.gateway_url();
    let mut users = UserServiceClient::connect(gateway.clone()).await.unwrap();
    let mut order_client = OrderServiceClient::connect(gateway).await.unwrap();
    let buyer = new_user(&mut users).await;
    for _ in 0..orders {
        place_order(&mut order_client, &buyer.id).await;
    }
}

#[tokio::test]
async fn every_metrics_endpoint_passes_promtool_and_a_strict_openmetrics_parser() {
    let dir = tempfile::tempdir().unwrap();
    let mesh = start_mesh(dir.path(), &["--replicas", "payment=2"]).await;
    shop_through_gateway(&mesh, 3).await;
    let check_promtool = have_tool("promtool");
    let check_openmetrics = have_openmetrics_parser();
    for (name, addr) in metrics_endpoints(&mesh) {
        let (code, content_type, text) = http_get(&addr, "/metrics", None).await;
        assert_eq!(code, 200, "{name}");
        assert!(
            content_type.starts_with("text/plain; version=0.0.4"),
            "{name}: {content_type}"
        );
        assert!(!text.contains("# EOF"), "{name}: classic text has no EOF");
        if check_promtool {
            let problems = promtool_problems(&text);
            assert!(
                problems.trim().is_empty(),
                "{name}: promtool says:\n{problems}\n{text}"
            );
        }
        let (_, content_type, om) = http_get(
            &addr,
            "/metrics",
            Some("application/openmetrics-text;version=1.0.0;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"),
        )
        .await;
        assert!(
            content_type.starts_with("application/openmetrics-text"),
            "{name}"
        );
        assert!(om.ends_with("# EOF\n"), "{name}");
        if check_openmetrics {
            openmetrics_parse(&om).unwrap_or_else(|e| panic!("{name}: {e}\n{om}"));
        }
    }
    // Retry and ejection counters exist at zero on every proxy with upstreams.
    let gateway_admin = mesh.mesh_json()["gateway"]["admin"]
        .as_str()
        .unwrap()
        .to_owned();
    let order_admin = mesh.instances("order")[0]["admin"]
        .as_str()
        .unwrap()
        .to_owned();
    let order_upstreams = shop::services()
        .into_iter()
        .find(|s| s.name == "order")
        .expect("shop.yaml lists order")
        .upstreams;
    for (addr, upstreams) in [
        (gateway_admin, shop::names()),
        (order_admin, order_upstreams),
    ] {
        let (_, _, text) = http_get(&addr, "/metrics", None).await;
        for upstream in upstreams {
            for family in [
                "minimesh_retries_total",
                "minimesh_endpoint_ejections_total",
            ] {
                let series = format!("{family}{{direction=\"outbound\",service=\"{upstream}\"}} 0");
                assert!(text.contains(&series), "{series} in\n{text}");
            }
        }
    }
}

#[tokio::test]
async fn unrouted_paths_share_one_series_at_the_edge() {
    let dir = tempfile::tempdir().unwrap();
    let mesh = start_mesh(dir.path(), &[]).await;
    let channel = tonic::transport::Endpoint::from_shared(mesh.gateway_url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    for n in 0..20 {
        let mut client = tonic::client::Grpc::new(channel.clone());
        client.ready().await.unwrap();
        let path =
            http::uri::PathAndQuery::try_from(format!("/junk.Service{n}/Method{n}")).unwrap();
        let result: Result<tonic::Response<()>, tonic::Status> = client
            .unary(tonic::Request::new(()), path, EmptyCodec)
            .await;
        assert!(result.is_err(), "no route for junk");
    }
    let admin = mesh.mesh_json()["gateway"]["admin"]
        .as_str()
        .unwrap()
        .to_owned();
    let (_, _, text) = http_get(&admin, "/metrics", None).await;
    assert!(
        !text.contains("junk"),
        "raw paths must not become labels:\n{text}"
    );
    let unrouted: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("minimesh_requests_total{") && l.contains("service=\"unrouted\""))
        .collect();
    assert_eq!(unrouted.len(), 1, "{text}");
    assert!(unrouted[0].ends_with(" 20"), "{}", unrouted[0]);
}

/// Encodes nothing and decodes nothing: enough to send a call to any path.
#[derive(Clone, Copy)]
struct EmptyCodec;

impl tonic::codec::Codec for EmptyCodec {
    type Encode = ();
    type Decode = ();
    type Encoder = EmptyCodec;
    type Decoder = EmptyCodec;
    fn encoder(&mut self) -> Self::Encoder {
        EmptyCodec
    }
    fn decoder(&mut self) -> Self::Decoder {
        EmptyCodec
    }
}

impl tonic::codec::Encoder for EmptyCodec {
    type Item = ();
    type Error = tonic::Status;
    fn encode(&mut self, _: (), _: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), tonic::Status> {
        Ok(())
    }
}

impl tonic::codec::Decoder for EmptyCodec {
    type Item = ();
    type Error = tonic::Status;
    fn decode(&mut self, _: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<()>, tonic::Status> {
        Ok(Some(()))
    }
}

#[tokio::test]
async fn stat_shows_every_edge_with_the_calls_sent_and_top_shows_them_live() {
    let dir = tempfile::tempdir().unwrap();
    let mesh = start_mesh(dir.path(), &["--replicas", "payment=2"]).await;
    let orders = 12;
    shop_through_gateway(&mesh, orders).await;
    let out = minimesh()
        .args(["stat", "--window", "1s", "-o", "json", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stat: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let edge = |from: &str, to: &str| -> serde_json::Value {
        stat["edges"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["from"] == from && e["to"] == to)
            .cloned()
            .unwrap_or_else(|| panic!("edge {from} → {to} missing from {stat}"))
    };
    // One CreateUser, then per order: CreateOrder, GetUser, Charge.
    assert_eq!(edge("gateway", "user")["requests"], 1, "{stat}");
    for (from, to) in [
        ("gateway", "order"),
        ("order", "user"),
        ("order", "payment"),
    ] {
        let e = edge(from, to);
        assert_eq!(e["requests"], orders, "{from} → {to}: {e}");
        assert!(e["latency_ms"].is_object(), "{e}");
    }
    assert!(
        (stat["window_s"].as_f64().unwrap() - 1.0).abs() < 0.9,
        "{stat}"
    );

    // The same through --admin addresses, as after kubectl port-forward.
    let admins: Vec<String> = mesh
        .instances("payment")
        .iter()
        .map(|i| i["admin"].as_str().unwrap().to_owned())
        .collect();
    let out = minimesh()
        .args(["stat", "--window", "200ms", "--admin", &admins.join(",")])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let row = table
        .lines()
        .find(|l| l.starts_with("order"))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(
        row.split_whitespace().nth(2) == Some(&orders.to_string()),
        "{table}"
    );

    if !have_tool("tmux") {
        return;
    }
    let session = format!("minimesh-top-{}", std::process::id());
    let status = Command::new("tmux")
        .args(["new-session", "-d", "-s", &session, "-x", "150", "-y", "40"])
        .arg(format!(
            "{} top --data-dir {}",
            env!("CARGO_BIN_EXE_minimesh"),
            dir.path().display()
        ))
        .status()
        .unwrap();
    assert!(status.success());
    let _kill = KillTmux(session.clone());
    // Traffic keeps coming, so the edges have rates too.
    let traffic = {
        let gateway = mesh.gateway_url();
        tokio::spawn(async move {
            let mut users = UserServiceClient::connect(gateway).await.unwrap();
            loop {
                let _ = new_user(&mut users).await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let screen = eventually(Duration::from_secs(20), "top shows the edges", || async {
        let screen = capture(&session);
        let shows = |from: &str, to: &str| {
            screen.lines().any(|l| {
                let words: Vec<&str> = l
                    .split_whitespace()
                    .map(|w| w.trim_matches('│'))
                    .filter(|w| !w.is_empty())
                    .collect();
                words.windows(2).any(|w| w == [from, to])
            })
        };
        // Busiest first: the edge with live traffic is on top, selected,
        // and its methods are listed below.
        let busiest_first = screen
            .lines()
            .find(|l| l.contains("gateway") || l.contains("order "))
            .is_some_and(|l| l.contains("gateway") && l.contains("user"));
        (shows("gateway", "order")
            && shows("order", "user")
            && shows("order", "payment")
            && shows("gateway", "user")
            && busiest_first
            && screen.contains("shop.user.v1.UserService/CreateUser"))
        .then_some(screen)
    })
    .await;
    assert!(screen.contains("methods of the selected edge"), "{screen}");
    traffic.abort();
    Command::new("tmux")
        .args(["send-keys", "-t", &session, "q"])
        .status()
        .unwrap();
    eventually(Duration::from_secs(5), "top quits on q", || async {
        let alive = Command::new("tmux")
            .args(["has-session", "-t", &session])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        (!alive).then_some(())
    })
    .await;
}

struct KillTmux(String);

impl Drop for KillTmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["kill-session", "-t", &self.0])
            .stderr(Stdio::null())
            .status();
    }
}

fn capture(session: &str) -> String {
    let out = Command::new("tmux")
        .args(["capture-pane", "-p", "-t", session])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn a_second_up_on_a_data_dir_in_use_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mesh = start_mesh(dir.path(), &[]).await;
    let before = std::fs::read(dir.path().join("mesh.json")).unwrap();
    let started = Instant::now();
    let out = minimesh()
        .args(["up", "--gateway-addr", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let pid = mesh.child.id().unwrap();
    assert!(
        stderr.contains(&format!("pid {pid}")),
        "names the running up: {stderr}"
    );
    assert_eq!(std::fs::read(dir.path().join("mesh.json")).unwrap(), before);
    // The running mesh still serves.
    let mut users = UserServiceClient::connect(mesh.gateway_url())
        .await
        .unwrap();
    new_user(&mut users).await;
}

/// Runs `up` expecting it to fail at start; returns its stderr and how long it took.
fn failed_start(data_dir: &Path, extra: &[&str]) -> (String, Duration) {
    let started = Instant::now();
    let out = minimesh()
        .env("RUST_BACKTRACE", "1")
        .arg("up")
        .arg("--data-dir")
        .arg(data_dir)
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success(), "up must fail");
    (
        String::from_utf8_lossy(&out.stderr).into_owned(),
        started.elapsed(),
    )
}

/// The last line of `up`'s stderr: the one a user reads.
fn error_line(stderr: &str) -> &str {
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("minimesh: error: ") || l.starts_with("error: "))
        .collect();
    assert_eq!(errors.len(), 1, "one error line:\n{stderr}");
    errors[0]
}

#[tokio::test]
async fn start_up_failures_end_fast_with_one_line_naming_the_cause() {
    // The gateway's address is taken.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let (stderr, took) = failed_start(dir.path(), &["--gateway-addr", &addr]);
    assert!(took < Duration::from_secs(3), "{took:?}");
    let line = error_line(&stderr);
    assert!(
        line.contains(&addr) && line.contains("--gateway-addr"),
        "{stderr}"
    );
    assert!(!dir.path().join("mesh.json").exists());

    // A bad option meant for a child.
    let (stderr, took) = failed_start(
        dir.path(),
        &[
            "--gateway-addr",
            "127.0.0.1:0",
            "--fulfilment-step",
            "banana",
        ],
    );
    assert!(took < Duration::from_secs(3), "{took:?}");
    assert!(error_line(&stderr).contains("banana"), "{stderr}");

    // A child that cannot start: its database path is a directory.
    std::fs::create_dir_all(dir.path().join("payment.db")).unwrap();
    let (stderr, took) = failed_start(dir.path(), &["--gateway-addr", "127.0.0.1:0"]);
    assert!(took < Duration::from_secs(3), "{took:?}");
    let line = error_line(&stderr);
    assert!(
        line.contains("payment-0 failed to start") && line.contains("payment.db"),
        "{stderr}"
    );
    assert!(
        !line.contains("backtrace") && !stderr.contains("did not stop in time"),
        "{stderr}"
    );
    assert!(
        !dir.path().join("mesh.json").exists(),
        "a mesh that never started leaves no mesh.json"
    );
}

#[tokio::test]
async fn repeated_starts_with_many_replicas_all_become_ready() {
    // 50 starts in a row (about 45 s here); MINIMESH_UP_STARTS overrides.
    let starts: usize = std::env::var("MINIMESH_UP_STARTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(50);
    for start in 0..starts {
        let dir = tempfile::tempdir().unwrap();
        let mesh = start_mesh(dir.path(), &["--replicas", "user=4,order=4,payment=4"]).await;
        let file = mesh.mesh_json();
        let mut ports: Vec<&str> = Vec::new();
        for i in file["instances"].as_array().unwrap() {
            for key in ["app", "metrics", "inbound", "outbound", "admin"] {
                ports.push(i[key].as_str().unwrap());
            }
        }
        let total = ports.len();
        ports.sort();
        ports.dedup();
        assert_eq!(ports.len(), total, "start {start}: a port was given twice");
        assert!(mesh.terminate().await.success(), "start {start}");
    }
}

#[tokio::test]
async fn logs_are_for_people_and_each_restart_is_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let stderr_file = dir.path().join("up-stderr.txt");
    let data = dir.path().join("data");
    let mesh = start_mesh_logged(&data, &[], &stderr_file).await;
    let victim = mesh.instances("user")[0]["sidecar_pid"].as_i64().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(victim as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    eventually(Duration::from_secs(20), "the sidecar restarted", || async {
        let pid = mesh.instances("user")[0]["sidecar_pid"].as_i64()?;
        (pid != 0 && pid != victim).then_some(())
    })
    .await;
    assert!(mesh.terminate().await.success());
    let up_log = std::fs::read_to_string(&stderr_file).unwrap();
    let restarts = up_log
        .lines()
        .filter(|l| l.contains("user-0-sidecar exited"))
        .count();
    assert_eq!(restarts, 1, "one line per restart:\n{up_log}");
    assert!(!up_log.contains("Some("), "{up_log}");
    assert!(
        !up_log.contains('\u{1b}'),
        "no colour codes into a file:\n{up_log}"
    );
    for entry in std::fs::read_dir(data.join("logs")).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains('\u{1b}'), "{}", path.display());
        for line in text.lines().filter(|l| !l.is_empty()) {
            serde_json::from_str::<serde_json::Value>(line)
                .unwrap_or_else(|e| panic!("{}: not JSON ({e}): {line}", path.display()));
        }
    }
    assert!(
        !data.join("mesh.json").exists(),
        "a stopped mesh leaves no mesh.json naming dead pids"
    );
}

#[tokio::test]
async fn reflection_v1_is_visible_to_v1alpha_clients() {
    let dir = tempfile::tempdir().unwrap();
    let mesh = start_mesh(dir.path(), &[]).await;
    for url in [mesh.app_url("user"), mesh.gateway_url()] {
        let services = reflected_services_v1alpha(&url).await;
        for name in [
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
            "grpc.health.v1.Health",
            "shop.order.v1.OrderService",
        ] {
            assert!(
                services.iter().any(|s| s == name),
                "{url}: {name} in {services:?}"
            );
        }
    }
}

/// A tmpfs mounted for one test, unmounted on every exit path.
struct Tmpfs(std::path::PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[tokio::test]
async fn mesh_json_is_rewritten_once_a_full_disk_has_room_again() {
    use std::os::unix::fs::MetadataExt;
    let root = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
    if !root {
        assert!(std::env::var_os("CI").is_none(), "CI runs as root");
        eprintln!("skipping: mounting a small tmpfs needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=48m", "tmpfs"])
        .arg(&data)
        .status()
        .unwrap();
    assert!(mounted.success(), "mount tmpfs");
    let _umount = Tmpfs(data.clone());
    let stderr_file = dir.path().join("up-stderr.txt");
    let mesh = start_mesh_logged(&data, &["--restart-delay", "50ms"], &stderr_file).await;
    // Fill the disk.
    let filler = data.join("filler");
    let _ = Command::new("dd")
        .args(["if=/dev/zero", "bs=1M", "count=64"])
        .arg(format!("of={}", filler.display()))
        .stderr(Stdio::null())
        .status();
    let victim = mesh.instances("user")[0]["sidecar_pid"].as_i64().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(victim as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    eventually(
        Duration::from_secs(10),
        "up reports it cannot rewrite mesh.json",
        || async {
            let log = std::fs::read_to_string(&stderr_file).ok()?;
            log.contains("cannot rewrite mesh.json").then_some(())
        },
    )
    .await;
    assert!(
        !data.join("mesh.json.tmp").exists(),
        "a failed write leaves no temporary file"
    );
    std::fs::remove_file(&filler).unwrap();
    let new_pid = eventually(
        Duration::from_secs(10),
        "mesh.json names the new sidecar",
        || async {
            let text = std::fs::read_to_string(data.join("mesh.json")).ok()?;
            let file: serde_json::Value = serde_json::from_str(&text).ok()?;
            let pid = file["instances"]
                .as_array()?
                .iter()
                .find(|i| i["service"] == "user")?["sidecar_pid"]
                .as_i64()?;
            (pid != victim && pid != 0).then_some(pid)
        },
    )
    .await;
    assert!(process_alive(new_pid));
    assert!(
        !data.join("mesh.json.tmp").exists(),
        "no temporary file left behind"
    );
    assert!(mesh.terminate().await.success());
    assert!(!data.join("mesh.json").exists());
}
