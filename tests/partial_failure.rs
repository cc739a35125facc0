//! Traffic management under partial failure, through real processes started
//! by `minimesh up`: a replica's sidecar that hangs (SIGSTOP) under load, a
//! replica killed and restarted, probes that time out or are cancelled, calls
//! cancelled by their clients, and a per-try timeout with one slow and one
//! fast replica. The balancer under test is the gateway's (user replicas) or
//! the order sidecar's (payment replicas).
//!
//! The tests run one at a time: each measures throughput or shares, which
//! another mesh on the same cores would disturb.

mod common;

use common::process::*;
use common::*;
use minimesh_proto::payment::v1::ChargeRequest;
use minimesh_proto::payment::v1::payment_service_client::PaymentServiceClient;
use minimesh_proto::user::v1::GetUserRequest;
use minimesh_proto::user::v1::user_service_client::UserServiceClient;
use minimesh_testsupport::metrics::sum;
use minimesh_testsupport::{eventually, http_get};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tonic::transport::Channel;

static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn signal(pid: i64, signal: Signal) {
    kill(Pid::from_raw(pid as i32), signal).expect("signal");
}

/// A stopped process, continued when this is dropped (also on a failed
/// assertion, so the mesh can be torn down).
struct Stopped(i64);

impl Stopped {
    fn new(pid: i64) -> Self {
        signal(pid, Signal::SIGSTOP);
        Self(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.0 as i32), Signal::SIGCONT);
    }
}

/// Calls of `method` each replica of `service` received (its sidecar's
/// inbound count); None while one of them does not answer.
async fn served(mesh: &Mesh, service: &str, method: &str) -> Option<Vec<f64>> {
    let mut out = Vec::new();
    let label = format!("method=\"{method}\"");
    for instance in mesh.instances(service) {
        let (_, text) = http_get(instance["admin"].as_str()?, "/metrics").await?;
        out.push(sum(
            &text,
            "minimesh_requests_total",
            &["direction=\"inbound\"", &label],
        ));
    }
    Some(out)
}

async fn gateway_ejections(mesh: &Mesh, service: &str) -> f64 {
    let admin = mesh.mesh_json()["gateway"]["admin"]
        .as_str()
        .unwrap()
        .to_owned();
    let (_, text) = http_get(&admin, "/metrics").await.expect("gateway metrics");
    sum(
        &text,
        "minimesh_endpoint_ejections_total",
        &[&format!("service=\"{service}\"")],
    )
}

/// The back-off of the last ejection of `endpoint` that `process` logged
/// (ejections and cancelled probes both log it).
fn last_backoff(mesh: &Mesh, process: &str, endpoint: &str) -> Option<Duration> {
    let log = std::fs::read_to_string(mesh.data_dir.join(format!("logs/{process}.log")))
        .unwrap_or_default();
    let ms = log
        .lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["fields"]["endpoint"] == endpoint)
        .find_map(|v| v["fields"]["backoff_ms"].as_u64())?;
    Some(Duration::from_millis(ms))
}

/// Starts `minimesh up` in a fresh data dir. A start that fails prints
/// what the children logged as errors before the test fails: a failed
/// start is a defect to find, never retried away.
async fn start(extra: &[&str], env: &[(&str, &str)]) -> (tempfile::TempDir, Mesh) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_owned();
    let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let started = tokio::spawn(async move {
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        start_mesh_with_env(&path, &extra, &env).await
    })
    .await;
    match started {
        Ok(mesh) => (dir, mesh),
        Err(err) => {
            eprintln!("minimesh up failed to start ({err}); its children's errors:");
            for entry in std::fs::read_dir(dir.path().join("logs"))
                .into_iter()
                .flatten()
            {
                let Ok(entry) = entry else { continue };
                let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
                for line in text
                    .lines()
                    .filter(|l| l.to_lowercase().contains("error"))
                    .take(5)
                {
                    eprintln!("  {}: {line}", entry.file_name().to_string_lossy());
                }
            }
            panic!("minimesh up failed to start: {err}");
        }
    }
}

/// Clients calling GetUser in a loop, as a grpcio client would: the
/// deadline goes out as `grpc-timeout` and the client gives up at it.
struct Load {
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(channel: Channel, clients: usize, user_id: &str, deadline: Option<Duration>) -> Self {
        let (ok, failed, stop) = (
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicBool::new(false)),
        );
        let tasks = (0..clients)
            .map(|_| {
                let mut client = UserServiceClient::new(channel.clone());
                let (ok, failed, stop) = (ok.clone(), failed.clone(), stop.clone());
                let id = user_id.to_owned();
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        let mut request = tonic::Request::new(GetUserRequest { id: id.clone() });
                        let result = match deadline {
                            Some(d) => {
                                request.set_timeout(d);
                                tokio::time::timeout(d, client.get_user(request))
                                    .await
                                    .unwrap_or_else(|_| {
                                        Err(tonic::Status::deadline_exceeded("client deadline"))
                                    })
                            }
                            None => client.get_user(request).await,
                        };
                        match result {
                            Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                            Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                        };
                    }
                })
            })
            .collect();
        Self {
            ok,
            failed,
            stop,
            tasks,
        }
    }

    fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }

    async fn warm_up(&self) {
        eventually(Duration::from_secs(60), "load running", || async {
            (self.ok() >= 300).then_some(())
        })
        .await;
    }

    /// OK calls per second over the next `window`.
    async fn ok_rate(&self, window: Duration) -> f64 {
        let (start, before) = (Instant::now(), self.ok());
        tokio::time::sleep(window).await;
        (self.ok() - before) as f64 / start.elapsed().as_secs_f64()
    }

    async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        }
    }
}

/// How long until replica `victim` of `service` has at least `share` of the
/// calls of `method` over a half-second window; None if not within `limit`.
/// The window's lag is counted in, so the time is an upper bound.
async fn time_to_share(
    mesh: &Mesh,
    service: &str,
    method: &str,
    victim: usize,
    share: f64,
    limit: Duration,
) -> Option<Duration> {
    const WINDOW: Duration = Duration::from_millis(500);
    let start = Instant::now();
    let mut history: VecDeque<(Instant, Vec<f64>)> = VecDeque::new();
    while start.elapsed() < limit {
        if let Some(counts) = served(mesh, service, method).await {
            let now = Instant::now();
            while history
                .get(1)
                .is_some_and(|(at, _)| now.duration_since(*at) >= WINDOW)
            {
                history.pop_front();
            }
            if let Some((at, old)) = history.front()
                && now.duration_since(*at) >= WINDOW
            {
                let delta: Vec<f64> = counts.iter().zip(old).map(|(n, o)| n - o).collect();
                let total: f64 = delta.iter().sum();
                if total >= 50.0 && delta[victim] / total >= share {
                    eprintln!("replica {victim} has {delta:?} of the last half second's calls");
                    return Some(start.elapsed());
                }
            }
            history.push_back((now, counts));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

#[tokio::test]
async fn a_hung_replica_is_ejected_and_comes_back_and_throughput_holds() {
    let _one = ONE_AT_A_TIME.lock().await;
    let (_dir, mesh) = start(&["--replicas", "user=3"], &[]).await;
    let channel = mesh.gateway_channel().await;
    let user = new_user(&mut UserServiceClient::new(channel.clone())).await;
    let load = Load::start(channel, 16, &user.id, Some(Duration::from_secs(2)));
    load.warm_up().await;
    let before = load.ok_rate(Duration::from_secs(3)).await;

    let victim = &mesh.instances("user")[1];
    let endpoint = victim["inbound"].as_str().unwrap().to_owned();
    let ejections = gateway_ejections(&mesh, "user").await;
    let stopped = Stopped::new(victim["sidecar_pid"].as_i64().unwrap());
    let (stop_at, ok_at_stop, failed_at_stop) = (Instant::now(), load.ok(), load.failed());
    let mut ejected_after = None;
    while stop_at.elapsed() < Duration::from_secs(15) {
        if ejected_after.is_none() && gateway_ejections(&mesh, "user").await > ejections {
            ejected_after = Some(stop_at.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let during = (load.ok() - ok_at_stop) as f64 / stop_at.elapsed().as_secs_f64();
    let failed = load.failed() - failed_at_stop;
    drop(stopped);

    let back = time_to_share(&mesh, "user", "GetUser", 1, 0.2, Duration::from_secs(40)).await;
    let backoff = last_backoff(&mesh, "gateway", &endpoint);
    load.stop().await;
    eprintln!(
        "OK calls/s before {before:.0}, during the stop {during:.0} (ratio {:.2}, {failed} failed); \
         ejected after {ejected_after:?}; back to its share {back:?} after SIGCONT (back-off {backoff:?})",
        during / before
    );
    assert!(
        during >= 0.6 * before,
        "throughput fell from {before:.0}/s to {during:.0}/s"
    );
    let ejected_after = ejected_after.expect("the stopped replica was never ejected");
    assert!(
        ejected_after <= Duration::from_secs(6),
        "ejected only after {ejected_after:?}"
    );
    let back = back.expect("the replica never got its share back");
    let backoff = backoff.expect("the gateway logged no ejection of it");
    assert!(
        back <= backoff + Duration::from_secs(2),
        "share back after {back:?}, back-off {backoff:?}"
    );
    assert!(mesh.terminate().await.success());
}

#[tokio::test]
async fn a_restarted_replica_gets_its_share_back_while_others_are_healthy() {
    let _one = ONE_AT_A_TIME.lock().await;
    let (_dir, mesh) = start(&["--replicas", "user=3"], &[]).await;
    let channel = mesh.gateway_channel().await;
    let user = new_user(&mut UserServiceClient::new(channel.clone())).await;
    let load = Load::start(channel, 16, &user.id, Some(Duration::from_secs(2)));
    load.warm_up().await;

    let victim = mesh.instances("user")[2].clone();
    let endpoint = victim["inbound"].as_str().unwrap().to_owned();
    let old_pid = victim["sidecar_pid"].as_i64().unwrap();
    signal(old_pid, Signal::SIGKILL);
    let killed = Instant::now();
    // Ready again: `up` restarted it and its admin says ready.
    eventually(Duration::from_secs(30), "sidecar restarted", || async {
        let now = &mesh.instances("user")[2];
        let pid = now["sidecar_pid"].as_i64()?;
        let ready = http_get(now["admin"].as_str()?, "/ready").await;
        (pid != old_pid && matches!(ready, Some((200, _)))).then_some(())
    })
    .await;
    let ready_after = killed.elapsed();
    let back = time_to_share(&mesh, "user", "GetUser", 2, 0.2, Duration::from_secs(40)).await;
    let backoff = last_backoff(&mesh, "gateway", &endpoint);
    load.stop().await;
    eprintln!(
        "restarted sidecar ready {ready_after:?} after the kill; its share back {back:?} later (back-off {backoff:?})"
    );
    let back = back.expect("the restarted replica never got its share back");
    let backoff = backoff.expect("the gateway logged no ejection of it");
    assert!(
        back <= backoff + Duration::from_secs(2),
        "share back after {back:?}, back-off {backoff:?}"
    );
    assert!(mesh.terminate().await.success());
}

/// One GetUser through the gateway: its result and how long it took. With
/// `header`, the deadline is sent as `grpc-timeout` and the proxy enforces it;
/// without, the client cancels the call at `wait`.
async fn timed_call(
    users: &mut UserServiceClient<Channel>,
    id: &str,
    wait: Duration,
    header: bool,
) -> (Result<(), tonic::Status>, Duration) {
    let started = Instant::now();
    let mut request = tonic::Request::new(GetUserRequest { id: id.to_owned() });
    if header {
        request.set_timeout(wait);
    }
    let limit = if header { wait * 10 } else { wait };
    let result = match tokio::time::timeout(limit, users.get_user(request)).await {
        Ok(r) => r.map(|_| ()),
        Err(_) => Err(tonic::Status::cancelled("cancelled by the client")),
    };
    (result, started.elapsed())
}

/// Stops the lone user sidecar until the gateway ejects it and its probe
/// ends (by the proxy's timeout with `header`, else cancelled by the client),
/// then continues it; returns when the probe ended.
async fn lose_a_probe(
    mesh: &Mesh,
    users: &mut UserServiceClient<Channel>,
    id: &str,
    header: bool,
) -> Instant {
    let sidecar = mesh.instances("user")[0]["sidecar_pid"].as_i64().unwrap();
    let _stopped = Stopped::new(sidecar);
    let wait = Duration::from_millis(300);
    // Timeouts eject it; then calls fail fast until one is the probe.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut timeouts = 0;
    while timeouts < 5 {
        assert!(
            Instant::now() < deadline,
            "the stopped sidecar never timed out"
        );
        // tonic gives up at the deadline too (CANCELLED), racing the proxy.
        let (result, took) = timed_call(users, id, wait, true).await;
        if result.is_err() && took >= wait {
            timeouts += 1;
        }
    }
    let mut ejected = false;
    loop {
        assert!(Instant::now() < deadline, "no probe was sent");
        let (result, took) = timed_call(users, id, wait, header).await;
        match result {
            Err(e) if e.code() == tonic::Code::Unavailable && e.message().contains("ejected") => {
                ejected = true;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            // The probe: it hung until its deadline or cancellation.
            Err(_) if ejected && took >= wait => return Instant::now(),
            _ => {}
        }
    }
}

#[tokio::test]
async fn a_probe_that_times_out_or_is_cancelled_keeps_the_endpoint_out_one_backoff_at_most() {
    let _one = ONE_AT_A_TIME.lock().await;
    let (_dir, mesh) = start(&[], &[]).await;
    let endpoint = mesh.instances("user")[0]["inbound"]
        .as_str()
        .unwrap()
        .to_owned();
    let channel = mesh.gateway_channel().await;
    let mut users = UserServiceClient::new(channel);
    let user = new_user(&mut users).await;

    for (how, header) in [("timed out", true), ("cancelled", false)] {
        let probe_ended = lose_a_probe(&mesh, &mut users, &user.id, header).await;
        let first_ok = loop {
            let (result, _) = timed_call(&mut users, &user.id, Duration::from_secs(2), true).await;
            if result.is_ok() {
                break probe_ended.elapsed();
            }
            assert!(
                probe_ended.elapsed() < Duration::from_secs(30),
                "never answered again"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let backoff = last_backoff(&mesh, "gateway", &endpoint);
        eprintln!("probe {how}: first OK {first_ok:?} after it, back-off {backoff:?}");
        let backoff = backoff.expect("the gateway logged no ejection of it");
        assert!(
            first_ok <= backoff + Duration::from_millis(1500),
            "probe {how}: out for {first_ok:?} with a back-off of {backoff:?}"
        );
    }
    assert!(mesh.terminate().await.success());
}

#[tokio::test]
async fn cancelled_calls_do_not_shun_a_replica() {
    let _one = ONE_AT_A_TIME.lock().await;
    let (_dir, mesh) = start(&["--replicas", "user=2"], &[]).await;
    let channel = mesh.gateway_channel().await;
    let user = new_user(&mut UserServiceClient::new(channel.clone())).await;
    let load = Load::start(channel.clone(), 8, &user.id, None);
    load.warm_up().await;

    let service = mesh.instances("user")[0]["pid"].as_i64().unwrap();
    let stopped = Stopped::new(service);
    let calls: Vec<_> = (0..200)
        .map(|_| {
            let mut client = UserServiceClient::new(channel.clone());
            let id = user.id.clone();
            tokio::spawn(async move { client.get_user(GetUserRequest { id }).await.is_ok() })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let open = calls.iter().filter(|c| !c.is_finished()).count();
    for call in &calls {
        call.abort();
    }
    drop(stopped);
    let back = time_to_share(&mesh, "user", "GetUser", 0, 0.3, Duration::from_secs(30)).await;
    load.stop().await;
    eprintln!("{open} calls cancelled; the paused replica's share back {back:?} after resuming");
    let back = back.expect("the paused replica never got its share back");
    assert!(
        back <= Duration::from_secs(8),
        "share back only after {back:?}"
    );
    assert!(mesh.terminate().await.success());
}

#[tokio::test]
async fn a_per_try_timeout_moves_the_call_to_a_fast_replica() {
    let _one = ONE_AT_A_TIME.lock().await;
    let (_dir, mesh) = start(
        &[
            "--replicas",
            "payment=2",
            "--fulfilment-step",
            "1h",
            "--debug-delay",
            "payment-1=3s",
        ],
        &[("MINIMESH_PER_TRY_TIMEOUT", "300ms")],
    )
    .await;
    // Charge straight through the order sidecar, as the order service does.
    let outbound = format!(
        "http://{}",
        mesh.instances("order")[0]["outbound"].as_str().unwrap()
    );
    let mut payments = PaymentServiceClient::connect(outbound).await.unwrap();
    // Nothing fails in this mesh, so every retry follows a per-try timeout
    // on the slow replica (whose sidecar counts no call it never finished).
    let order_admin = mesh.instances("order")[0]["admin"]
        .as_str()
        .unwrap()
        .to_owned();
    let retries = || async {
        let (_, text) = http_get(&order_admin, "/metrics").await.expect("metrics");
        sum(&text, "minimesh_retries_total", &["service=\"payment\""])
    };
    let started = Instant::now();
    let deadline = started + Duration::from_secs(60);
    let mut calls = 0;
    let mut slowest = Duration::ZERO;
    while retries().await < 2.0 {
        assert!(
            Instant::now() < deadline,
            "the slow replica was never tried"
        );
        let mut request = tonic::Request::new(ChargeRequest {
            order_id: format!("ord_{calls}"),
            user_id: "usr_1".into(),
            amount_cents: 100,
            currency: "EUR".into(),
            idempotency_key: format!("key_{calls}_{}", std::process::id()),
        });
        request.set_timeout(Duration::from_secs(5));
        let started = Instant::now();
        let result = payments.charge(request).await;
        slowest = slowest.max(started.elapsed());
        result.unwrap_or_else(|e| panic!("charge {calls} failed: {e:?}"));
        calls += 1;
    }
    eprintln!(
        "{calls} charges in {:?}, all OK, slowest {slowest:?}, {} retried after a per-try timeout",
        started.elapsed(),
        retries().await
    );
    assert!(
        slowest < Duration::from_secs(2),
        "a charge waited {slowest:?}: the slow replica answered it"
    );
    assert!(mesh.terminate().await.success());
}
