//! Workload identity end to end: short-lived certificates from the issuer,
//! rotated under load with no failed call, a mesh that outlives a stopped
//! issuer, and no way around the mesh.

mod common;

use common::process::*;
use common::*;
use minimesh_proto::order::v1::order_service_client::OrderServiceClient;
use minimesh_proto::payment::v1::payment_service_client::PaymentServiceClient;
use minimesh_proto::payment::v1::{ChargeRequest, GetPaymentRequest, RefundRequest};
use minimesh_proto::user::v1::user_service_client::UserServiceClient;
use minimesh_testsupport::tls::{mesh_peer, peer_serial};
use minimesh_testsupport::{eventually, http_get};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use rustls::pki_types::ServerName;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The serial of the certificate a sidecar's inbound listener serves now.
async fn served_serial(
    addr: &str,
    service: &str,
    config: Arc<rustls::ClientConfig>,
) -> Option<Vec<u8>> {
    let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
    let name = ServerName::try_from(service.to_owned()).ok()?;
    let stream = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .ok()?;
    peer_serial(&stream)
}

async fn metric(addr: &str, series: &str) -> Option<f64> {
    let (_, text) = http_get(addr, "/metrics").await?;
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

/// Every proxy admin address in the mesh, named.
fn proxies(mesh: &Mesh) -> Vec<(String, String)> {
    let file = mesh.mesh_json();
    let mut out: Vec<(String, String)> = file["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                format!(
                    "{}-{}-sidecar",
                    i["service"].as_str().unwrap(),
                    i["replica"]
                ),
                i["admin"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    out.push((
        "gateway".to_owned(),
        file["gateway"]["admin"].as_str().unwrap().to_owned(),
    ));
    out
}

/// Clients shopping through the gateway until stopped.
struct Traffic {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<std::sync::Mutex<Vec<String>>>,
    clients: Vec<tokio::task::JoinHandle<()>>,
}

impl Traffic {
    fn start(gateway: String) -> Self {
        let (stop, ok, failed) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(std::sync::Mutex::new(Vec::new())),
        );
        let clients = steady_traffic(gateway, stop.clone(), ok.clone(), failed.clone());
        Self {
            stop,
            ok,
            failed,
            clients,
        }
    }

    /// Stops the clients, asserts that no call failed, and returns how many succeeded.
    async fn stop_without_failures(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        for client in self.clients {
            client.await.unwrap();
        }
        let failed = self.failed.lock().unwrap().clone();
        assert!(
            failed.is_empty(),
            "{} calls failed, e.g. {:?}",
            failed.len(),
            &failed[..failed.len().min(5)]
        );
        self.ok.load(Ordering::Relaxed)
    }
}

fn steady_traffic(
    gateway: String,
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<std::sync::Mutex<Vec<String>>>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..4)
        .map(|_| {
            let (gateway, stop, ok, failed) =
                (gateway.clone(), stop.clone(), ok.clone(), failed.clone());
            tokio::spawn(async move {
                let channel = tonic::transport::Endpoint::from_shared(gateway)
                    .unwrap()
                    .timeout(Duration::from_secs(2))
                    .connect_lazy();
                let mut users = UserServiceClient::new(channel.clone());
                let mut orders = OrderServiceClient::new(channel);
                let buyer = new_user(&mut users).await;
                while !stop.load(Ordering::Relaxed) {
                    match orders
                        .create_order(order_request(&buyer.id, vec![item("pen", 1, 300)]))
                        .await
                    {
                        Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(status) => {
                            failed.lock().unwrap().push(format!(
                                "{:?}: {}",
                                status.code(),
                                status.message()
                            ));
                            0
                        }
                    };
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
            })
        })
        .collect()
}

#[tokio::test]
async fn certificates_rotate_under_load_without_a_failed_call() {
    let dir = tempfile::tempdir().unwrap();
    let mesh = start_mesh(dir.path(), &["--cert-ttl", "15s"]).await;
    let ca_dir = std::path::PathBuf::from(mesh.mesh_json()["ca_dir"].as_str().unwrap());
    // Only the trust anchor is on disk: no workload key anywhere in the data dir.
    for entry in walk(dir.path()) {
        let text = std::fs::read_to_string(&entry).unwrap_or_default();
        if text.contains("PRIVATE KEY") {
            assert_eq!(
                entry,
                ca_dir.join("ca.key"),
                "a private key on disk: {}",
                entry.display()
            );
        }
    }
    let traffic = Traffic::start(mesh.gateway_url());
    let probe = mesh_peer(&ca_dir, "order").unwrap();
    let sidecars: Vec<(String, String)> = mesh.mesh_json()["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["service"].as_str().unwrap().to_owned(),
                i["inbound"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let mut serials: BTreeMap<String, BTreeSet<Vec<u8>>> = BTreeMap::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(60) {
        for (service, inbound) in &sidecars {
            if let Some(serial) = served_serial(inbound, service, probe.clone()).await {
                serials.entry(service.clone()).or_default().insert(serial);
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let ok = traffic.stop_without_failures().await;
    assert!(ok > 500, "steady traffic: {} calls", ok);
    for (service, _) in &sidecars {
        let seen = serials.get(service).map_or(0, BTreeSet::len);
        assert!(
            seen >= 4,
            "{service}: {seen} certificates served on the wire in 60 s ({serials:?})"
        );
    }
    for (name, admin) in proxies(&mesh) {
        let renewed = metric(&admin, "minimesh_identity_renewals_total{result=\"ok\"}")
            .await
            .unwrap();
        assert!(renewed >= 3.0, "{name} renewed {renewed} times");
    }
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

#[tokio::test]
async fn the_mesh_outlives_a_stopped_issuer_and_renews_when_it_returns() {
    let dir = tempfile::tempdir().unwrap();
    let mesh = start_mesh(dir.path(), &["--cert-ttl", "20s"]).await;
    let issuer = Pid::from_raw(mesh.mesh_json()["identity"]["pid"].as_i64().unwrap() as i32);
    let pids_before = proxies_pids(&mesh);
    kill(issuer, Signal::SIGSTOP).unwrap();
    let _resume = Resume(issuer);
    let traffic = Traffic::start(mesh.gateway_url());
    // Renewals come due at about 14 s and fail: the issuer hangs.
    let admins = proxies(&mesh);
    eventually(
        Duration::from_secs(19),
        "every proxy tried and failed to renew",
        || async {
            for (_, admin) in &admins {
                if metric(admin, "minimesh_identity_renewals_total{result=\"error\"}").await? < 1.0
                {
                    return None;
                }
            }
            Some(())
        },
    )
    .await;
    kill(issuer, Signal::SIGCONT).unwrap();
    eventually(
        Duration::from_secs(15),
        "every proxy renewed once the issuer is back",
        || async {
            for (_, admin) in &admins {
                if metric(admin, "minimesh_identity_renewals_total{result=\"ok\"}").await? < 1.0 {
                    return None;
                }
            }
            Some(())
        },
    )
    .await;
    // Past the first certificates' expiry, calls still succeed on renewed ones.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let ok = traffic.stop_without_failures().await;
    assert!(ok > 100);
    assert_eq!(proxies_pids(&mesh), pids_before, "no proxy was restarted");
}

fn proxies_pids(mesh: &Mesh) -> Vec<i64> {
    let file = mesh.mesh_json();
    let mut pids: Vec<i64> = file["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["sidecar_pid"].as_i64().unwrap())
        .collect();
    pids.push(file["gateway"]["pid"].as_i64().unwrap());
    pids
}

/// Resumes a stopped process on every exit path.
struct Resume(Pid);

impl Drop for Resume {
    fn drop(&mut self) {
        let _ = kill(self.0, Signal::SIGCONT);
    }
}

#[tokio::test]
async fn nothing_outside_the_mesh_reaches_payment() {
    let dir = tempfile::tempdir().unwrap();
    let mesh = start_mesh(dir.path(), &[]).await;
    let gateway = mesh.gateway_url();
    let mut users = UserServiceClient::connect(gateway.clone()).await.unwrap();
    let mut orders = OrderServiceClient::connect(gateway.clone()).await.unwrap();
    let buyer = new_user(&mut users).await;
    let order = place_order(&mut orders, &buyer.id).await;

    // The edge refuses every payment call.
    let mut payments = PaymentServiceClient::connect(gateway).await.unwrap();
    let refund = payments
        .refund(RefundRequest {
            payment_id: order.payment_id.clone(),
            idempotency_key: "r".into(),
        })
        .await
        .unwrap_err();
    let charge = payments
        .charge(ChargeRequest {
            order_id: "ord_fake".into(),
            user_id: buyer.id.clone(),
            amount_cents: 700,
            currency: "EUR".into(),
            idempotency_key: "fake".into(),
        })
        .await
        .unwrap_err();
    let get = payments
        .get_payment(GetPaymentRequest {
            id: order.payment_id.clone(),
        })
        .await
        .unwrap_err();
    for status in [refund, charge, get] {
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    }

    // The service itself listens on its own loopback address only: the same
    // port on another address of the host is closed.
    let app: std::net::SocketAddr = mesh.instances("payment")[0]["app"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(app.ip().is_loopback());
    let elsewhere = std::net::SocketAddr::new("127.0.0.2".parse().unwrap(), app.port());
    let connected = tokio::net::TcpStream::connect(elsewhere).await;
    assert!(
        connected.is_err(),
        "payment's plaintext port answered on {elsewhere}"
    );

    // The gateway's identity is not on payment's allow-list either.
    let ca_dir = std::path::PathBuf::from(mesh.mesh_json()["ca_dir"].as_str().unwrap());
    let leaf =
        minimesh_certs::issue_leaf(&ca_dir, &minimesh_certs::LeafRequest::new("gateway")).unwrap();
    let inbound = mesh.instances("payment")[0]["inbound"]
        .as_str()
        .unwrap()
        .to_owned();
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(
            std::fs::read(ca_dir.join("ca.pem")).unwrap(),
        ))
        .identity(tonic::transport::Identity::from_pem(
            leaf.cert_pem,
            leaf.key_pem,
        ))
        .domain_name("payment");
    let channel = tonic::transport::Endpoint::from_shared(format!("https://{inbound}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let denied = PaymentServiceClient::new(channel)
        .get_payment(GetPaymentRequest {
            id: order.payment_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");
    assert!(denied.message().contains("sa/gateway"), "{denied:?}");
}
