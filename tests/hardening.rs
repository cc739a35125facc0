//! The proxies under abuse, through real processes: silent and idle
//! connections closed, a connection cap, an fd-exhausted gateway that backs
//! off instead of spinning, and strict gRPC over HTTP/2.

mod common;

use common::process::*;
use common::*;
use minimesh_proto::user::v1::user_service_client::UserServiceClient;
use minimesh_testsupport::tls::mesh_peer;
use minimesh_testsupport::{eventually, http_get, metrics};
use std::process::Command;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

fn gateway_addr(mesh: &Mesh) -> String {
    mesh.mesh_json()["gateway"]["addr"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Waits for the server to close `stream` (opened at `started`); returns
/// how long after its opening that happened.
async fn closed_within(
    stream: &mut TcpStream,
    started: Instant,
    limit: Duration,
) -> Option<Duration> {
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at((started + limit).into(), stream.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) => continue, // SETTINGS, GOAWAY, …
        }
    }
}

#[tokio::test]
async fn silent_and_preface_only_connections_are_closed_after_the_first_call_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let mesh = start_mesh_with_env(
        dir.path(),
        &[],
        &[
            ("MINIMESH_FIRST_CALL_TIMEOUT", "1s"),
            ("MINIMESH_IDLE_TIMEOUT", "2s"),
        ],
    )
    .await;
    let gateway = gateway_addr(&mesh);
    let mut silent = Vec::new();
    for _ in 0..50 {
        silent.push((TcpStream::connect(&gateway).await.unwrap(), Instant::now()));
    }
    let mut preface_only = TcpStream::connect(&gateway).await.unwrap();
    preface_only.write_all(PREFACE).await.unwrap();
    silent.push((preface_only, Instant::now()));
    // An mTLS connection to a sidecar that completes the handshake and then says nothing.
    let ca_dir = std::path::PathBuf::from(mesh.mesh_json()["ca_dir"].as_str().unwrap());
    let inbound = mesh.instances("user")[0]["inbound"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut tls_silent = tls_connect(&ca_dir, &inbound).await;
    for (stream, opened) in silent.iter_mut() {
        let took = closed_within(stream, *opened, Duration::from_secs(5)).await;
        let took = took.expect("closed within 5 s");
        assert!(
            took >= Duration::from_millis(900),
            "closed too early: {took:?}"
        );
    }
    let mut buf = [0u8; 1024];
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match tls_silent.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "a silent mTLS connection was kept");

    // A connection that made a call is closed once idle for the idle timeout.
    let channel = tonic::transport::Endpoint::from_shared(mesh.gateway_url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut users = UserServiceClient::new(channel.clone());
    new_user(&mut users).await;
    let admin = mesh.mesh_json()["gateway"]["admin"]
        .as_str()
        .unwrap()
        .to_owned();
    eventually(
        Duration::from_secs(8),
        "the idle connection closed",
        || async {
            let text = http_get(&admin, "/metrics").await?.1;
            text.contains("minimesh_open_connections{direction=\"inbound\"} 0")
                .then_some(())
        },
    )
    .await;
}

async fn tls_connect(
    ca_dir: &std::path::Path,
    addr: &str,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    tokio_rustls::TlsConnector::from(mesh_peer(ca_dir, "gateway").unwrap())
        .connect(
            rustls::pki_types::ServerName::try_from("user").unwrap(),
            tcp,
        )
        .await
        .unwrap()
}

#[tokio::test]
async fn the_connection_cap_holds_and_frees() {
    let dir = tempfile::tempdir().unwrap();
    let mesh = start_mesh_with_env(
        dir.path(),
        &[],
        &[
            ("MINIMESH_MAX_CONNECTIONS", "20"),
            ("MINIMESH_FIRST_CALL_TIMEOUT", "30s"),
        ],
    )
    .await;
    let gateway = gateway_addr(&mesh);
    let admin = mesh.mesh_json()["gateway"]["admin"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut held = Vec::new();
    for _ in 0..30 {
        held.push(TcpStream::connect(&gateway).await.unwrap());
    }
    let open =
        |text: &str| metrics::value(text, "minimesh_open_connections{direction=\"inbound\"}");
    eventually(Duration::from_secs(5), "20 connections served", || async {
        (open(&http_get(&admin, "/metrics").await?.1)? == 20.0).then_some(())
    })
    .await;
    // Past the cap nothing more is served while the 20 stay.
    let started = Instant::now();
    let mut late = UserServiceClient::new(
        tonic::transport::Endpoint::from_shared(mesh.gateway_url())
            .unwrap()
            .connect_lazy(),
    );
    let waiting = tokio::time::timeout(Duration::from_secs(1), new_user_result(&mut late)).await;
    assert!(waiting.is_err(), "served past the cap");
    assert_eq!(
        open(&http_get(&admin, "/metrics").await.unwrap().1),
        Some(20.0)
    );
    drop(held);
    // Freed slots serve the queued connections and the late call.
    let result = tokio::time::timeout(Duration::from_secs(10), new_user_result(&mut late)).await;
    assert!(
        matches!(result, Ok(Ok(_))),
        "{result:?} after {:?}",
        started.elapsed()
    );
}

async fn new_user_result(
    users: &mut UserServiceClient<tonic::transport::Channel>,
) -> Result<(), tonic::Status> {
    use minimesh_proto::user::v1::CreateUserRequest;
    let n = std::process::id() as u64 * 1000 + rand_u16() as u64;
    users
        .create_user(CreateUserRequest {
            email: format!("late{n}@example.com"),
            display_name: "Late".into(),
        })
        .await
        .map(|_| ())
}

fn rand_u16() -> u16 {
    (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos()
        % 60_000) as u16
}

/// CPU seconds a process has used (user + system).
fn cpu_seconds(pid: i64) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

fn soft_nofile(pid: i64) -> u64 {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3)?.parse().ok())
        .unwrap()
}

fn open_fds(pid: i64) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

#[tokio::test]
async fn an_fd_exhausted_gateway_backs_off_and_serves_again() {
    let dir = tempfile::tempdir().unwrap();
    let mesh = start_mesh(dir.path(), &[]).await;
    let gateway = gateway_addr(&mesh);
    let file = mesh.mesh_json();
    let pid = file["gateway"]["pid"].as_i64().unwrap();
    let log = std::path::PathBuf::from(file["gateway"]["log"].as_str().unwrap());
    // Leave the gateway room for 10 more descriptors only.
    let limit = open_fds(pid) + 10;
    let original = soft_nofile(pid);
    // Only the soft limit: raising it back needs no privilege.
    let status = Command::new("prlimit")
        .arg(format!("--pid={pid}"))
        .arg(format!("--nofile={limit}:"))
        .status()
        .unwrap();
    assert!(status.success(), "prlimit");
    let lines_before = std::fs::read_to_string(&log).unwrap().lines().count();
    // Both its listeners: the edge, and the plaintext admin port.
    let admin = file["gateway"]["admin"].as_str().unwrap().to_owned();
    let mut flood = Vec::new();
    for target in [&gateway, &admin] {
        for _ in 0..60 {
            if let Ok(stream) = TcpStream::connect(target).await {
                flood.push(stream);
            }
        }
    }
    let cpu_before = cpu_seconds(pid);
    let measured = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let cpu = (cpu_seconds(pid) - cpu_before) / measured.elapsed().as_secs_f64();
    assert!(
        cpu < 0.10,
        "the exhausted gateway used {:.0}% CPU",
        cpu * 100.0
    );
    let lines = std::fs::read_to_string(&log).unwrap().lines().count() - lines_before;
    assert!(lines < 30, "{lines} log lines in 3 s while exhausted");
    // Room again: the gateway serves.
    drop(flood);
    let status = Command::new("prlimit")
        .arg(format!("--pid={pid}"))
        .arg(format!("--nofile={original}:"))
        .status()
        .unwrap();
    assert!(status.success());
    let url = mesh.gateway_url();
    eventually(
        Duration::from_secs(15),
        "the gateway serves again",
        || async {
            let channel = tonic::transport::Endpoint::from_shared(url.clone())
                .ok()?
                .connect()
                .await
                .ok()?;
            let mut users = UserServiceClient::new(channel);
            new_user_result(&mut users).await.ok()
        },
    )
    .await;
    let (code, _) = http_get(&admin, "/live")
        .await
        .expect("the admin port answers");
    assert_eq!(code, 200);
}

/// Sends one raw HTTP/2 request and returns (HTTP status, grpc-status).
async fn raw_call(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, Option<String>) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut client, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let mut request = http::Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let (response, mut body) = client
        .send_request(request.body(()).unwrap(), false)
        .unwrap();
    // An empty gRPC message: 5 bytes of framing.
    body.send_data(bytes::Bytes::from_static(&[0, 0, 0, 0, 0]), true)
        .unwrap();
    let response = response.await.unwrap();
    let status = response.status().as_u16();
    let mut grpc = response
        .headers()
        .get("grpc-status")
        .map(|v| v.to_str().unwrap().to_owned());
    let mut body = response.into_body();
    while let Some(chunk) = body.data().await {
        let _ = chunk;
    }
    if grpc.is_none()
        && let Ok(Some(trailers)) = body.trailers().await
    {
        grpc = trailers
            .get("grpc-status")
            .map(|v| v.to_str().unwrap().to_owned());
    }
    (status, grpc)
}

#[tokio::test]
async fn only_well_formed_grpc_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let mesh = start_mesh(dir.path(), &[]).await;
    let gateway = gateway_addr(&mesh);
    let get_user = "/shop.user.v1.UserService/GetUser";
    let grpc = [("content-type", "application/grpc"), ("te", "trailers")];
    // A well-formed call reaches the service (NOT_FOUND for an empty id… or INVALID_ARGUMENT).
    let (status, code) = raw_call(&gateway, "POST", get_user, &grpc).await;
    assert_eq!(status, 200);
    assert!(matches!(code.as_deref(), Some("3") | Some("5")), "{code:?}");
    for method in ["PUT", "DELETE"] {
        let (status, code) = raw_call(&gateway, method, get_user, &grpc).await;
        assert_eq!((status, code.as_deref()), (405, Some("12")), "{method}");
    }
    let (status, code) = raw_call(
        &gateway,
        "POST",
        get_user,
        &[("content-type", "application/json"), ("te", "trailers")],
    )
    .await;
    assert_eq!((status, code.as_deref()), (415, Some("3")));
    let (status, code) = raw_call(
        &gateway,
        "POST",
        get_user,
        &[("content-type", "application/grpc")],
    )
    .await;
    assert_eq!(
        (status, code.as_deref()),
        (200, Some("3")),
        "te: trailers is required"
    );
    for timeout in ["abc", "-1S", "99999999999H"] {
        let mut headers = grpc.to_vec();
        headers.push(("grpc-timeout", timeout));
        let (status, code) = raw_call(&gateway, "POST", get_user, &headers).await;
        assert_eq!(
            (status, code.as_deref()),
            (200, Some("3")),
            "grpc-timeout {timeout}"
        );
    }
    // No route: UNIMPLEMENTED, a code clients do not retry.
    for path in [
        "/shop.shipping.v1.ShippingService/Ship",
        "/other.Service/Method",
    ] {
        let (status, code) = raw_call(&gateway, "POST", path, &grpc).await;
        assert_eq!((status, code.as_deref()), (200, Some("12")), "{path}");
    }
}

/// Opens `streams` calls of `path` with `message` on one HTTP/2 connection
/// that advertises a zero window and never reads: a reader that stalls.
async fn stall(
    addr: &str,
    path: &str,
    message: Vec<u8>,
    streams: usize,
) -> Vec<http::Response<h2::RecvStream>> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (client, connection) = h2::client::Builder::new()
        .initial_window_size(0)
        .handshake::<_, bytes::Bytes>(tcp)
        .await
        .unwrap();
    tokio::spawn(connection);
    let mut client = client.ready().await.unwrap();
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(&message);
    let mut pending = Vec::new();
    for _ in 0..streams {
        let request = http::Request::post(format!("http://{addr}{path}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .unwrap();
        let (response, mut body) = client.send_request(request, false).unwrap();
        body.send_data(bytes::Bytes::from(frame.clone()), true)
            .unwrap();
        pending.push(response);
        client = client.ready().await.unwrap();
    }
    // Keep the connection (and its stalled streams) open for the caller.
    std::mem::forget(client);
    // Headers are not flow-controlled: once they are here the answers are
    // under way and fill whatever windows they may.
    let mut answered = Vec::new();
    for response in pending {
        answered.push(response.await.expect("stalled call answered"));
    }
    answered
}

/// ~1 MB answers: 400 orders of 50 items for one user (its ListOrders),
/// 1000 users with long names (ListUsers). Returns the buyer.
async fn seed_large_answers(mesh: &Mesh) -> minimesh_proto::user::v1::User {
    use minimesh_proto::order::v1::order_service_client::OrderServiceClient;
    use minimesh_proto::user::v1::CreateUserRequest;
    let mut users = UserServiceClient::connect(mesh.app_url("user"))
        .await
        .unwrap();
    let buyer = new_user(&mut users).await;
    let seeders: Vec<_> = (0..8)
        .map(|worker| {
            let (orders_url, users_url, buyer) = (
                mesh.app_url("order"),
                mesh.app_url("user"),
                buyer.id.clone(),
            );
            tokio::spawn(async move {
                let mut orders = OrderServiceClient::connect(orders_url).await.unwrap();
                for _ in 0..50 {
                    let items = (0..50)
                        .map(|i| item(&format!("sku-{i:04}-with-a-longer-name"), 1, 10))
                        .collect();
                    orders
                        .create_order(order_request(&buyer, items))
                        .await
                        .unwrap();
                }
                let mut users = UserServiceClient::connect(users_url).await.unwrap();
                for n in 0..125 {
                    users
                        .create_user(CreateUserRequest {
                            email: format!("filler-{worker}-{n}-{}@example.com", "y".repeat(40)),
                            display_name: "x".repeat(200),
                        })
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for seeder in seeders {
        seeder.await.unwrap();
    }
    buyer
}

#[tokio::test]
async fn a_stalled_reader_costs_only_its_own_streams() {
    // With one connection window for all streams the other calls hang
    // rather than fail: bound the whole test.
    tokio::time::timeout(Duration::from_secs(120), stalled_reader())
        .await
        .expect("other callers were starved by a stalled reader");
}

async fn stalled_reader() {
    use minimesh_proto::order::v1::ListOrdersRequest;
    use minimesh_proto::order::v1::order_service_client::OrderServiceClient;
    use minimesh_proto::user::v1::{GetUserRequest, ListUsersRequest};
    use prost::Message;
    let dir = tempfile::tempdir().unwrap();
    let mesh = start_mesh(dir.path(), &[]).await;
    let buyer = seed_large_answers(&mesh).await;
    let gateway = gateway_addr(&mesh);
    let list_orders = ListOrdersRequest {
        user_id: buyer.id.clone(),
        page_size: 1000,
        page_token: String::new(),
    };
    let _stalled_at_gateway = stall(
        &gateway,
        "/shop.order.v1.OrderService/ListOrders",
        list_orders.encode_to_vec(),
        8,
    )
    .await;
    let outbound = mesh.instances("order")[0]["outbound"]
        .as_str()
        .unwrap()
        .to_owned();
    let list_users = ListUsersRequest {
        page_size: 1000,
        page_token: String::new(),
    };
    let _stalled_at_sidecar = stall(
        &outbound,
        "/shop.user.v1.UserService/ListUsers",
        list_users.encode_to_vec(),
        8,
    )
    .await;

    let channel = tonic::transport::Endpoint::from_shared(mesh.gateway_url())
        .unwrap()
        .timeout(Duration::from_secs(3))
        .connect()
        .await
        .unwrap();
    let mut orders = OrderServiceClient::new(channel.clone());
    let mut users = UserServiceClient::new(channel);
    for round in 0..5 {
        let page = orders
            .list_orders(list_orders.clone())
            .await
            .unwrap_or_else(|s| panic!("round {round}: ListOrders {s:?}"));
        assert!(page.get_ref().orders.len() >= 400);
        users
            .get_user(GetUserRequest {
                id: buyer.id.clone(),
            })
            .await
            .unwrap_or_else(|s| panic!("round {round}: GetUser {s:?}"));
        orders
            .create_order(order_request(&buyer.id, vec![item("pen", 1, 300)]))
            .await
            .unwrap_or_else(|s| panic!("round {round}: CreateOrder {s:?}"));
    }
}

#[tokio::test]
async fn calls_past_the_app_stream_limit_get_resource_exhausted() {
    use minimesh_proto::order::v1::order_service_client::OrderServiceClient;
    use minimesh_proto::order::v1::{GetOrderRequest, TrackRequest};
    let dir = tempfile::tempdir().unwrap();
    let mesh = start_mesh_with_env(dir.path(), &[], &[("MINIMESH_MAX_APP_STREAMS", "4")]).await;
    let admin = mesh.instances("order")[0]["admin"]
        .as_str()
        .unwrap()
        .to_owned();
    let in_flight = || async {
        metrics::value(
            &http_get(&admin, "/metrics").await?.1,
            "minimesh_app_calls_in_flight",
        )
    };
    let mut orders = OrderServiceClient::new(mesh.gateway_channel().await);
    // Four TrackOrders streams the caller keeps open hold the order service's four slots.
    let mut open = Vec::new();
    for _ in 0..4 {
        let (requests, rx) = tokio::sync::mpsc::channel::<TrackRequest>(1);
        let events = orders
            .track_orders(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .expect("a stream within the limit is served");
        open.push((requests, events));
    }
    eventually(
        Duration::from_secs(5),
        "4 calls open to the order service",
        || async { (in_flight().await? == 4.0).then_some(()) },
    )
    .await;

    let lookup = GetOrderRequest {
        id: "0190f5e2-7c4a-7000-8000-000000000000".into(),
    };
    let refused = orders.get_order(lookup.clone()).await.unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );
    assert!(
        refused.message().contains("--max-app-streams"),
        "the refusal says which limit: {refused:?}"
    );
    assert_eq!(in_flight().await, Some(4.0), "a refused call takes no slot");

    // A stream the caller ends gives its slot back.
    drop(open.pop());
    eventually(Duration::from_secs(5), "a slot given back", || async {
        (in_flight().await? == 3.0).then_some(())
    })
    .await;
    let served = orders.get_order(lookup).await.unwrap_err();
    assert_eq!(
        served.code(),
        tonic::Code::NotFound,
        "the order service answered: {served:?}"
    );
    drop(open);
    eventually(Duration::from_secs(5), "every slot given back", || async {
        (in_flight().await? == 0.0).then_some(())
    })
    .await;
}

#[tokio::test]
async fn responses_a_reader_stopped_taking_are_cancelled_and_free_their_slots() {
    use minimesh_proto::order::v1::ListOrdersRequest;
    use minimesh_proto::order::v1::order_service_client::OrderServiceClient;
    use prost::Message;
    let dir = tempfile::tempdir().unwrap();
    let mesh = start_mesh_with_env(
        dir.path(),
        &[],
        &[
            ("MINIMESH_STALL_TIMEOUT", "2s"),
            ("MINIMESH_MAX_APP_STREAMS", "8"),
        ],
    )
    .await;
    let buyer = seed_large_answers(&mesh).await;
    let list_orders = ListOrdersRequest {
        user_id: buyer.id.clone(),
        page_size: 1000,
        page_token: String::new(),
    };
    // Eight ~800 KB answers nobody reads would hold all eight of the order service's slots.
    let stalled = stall(
        &gateway_addr(&mesh),
        "/shop.order.v1.OrderService/ListOrders",
        list_orders.encode_to_vec(),
        8,
    )
    .await;
    let order_admin = mesh.instances("order")[0]["admin"]
        .as_str()
        .unwrap()
        .to_owned();
    let gateway_admin = mesh.mesh_json()["gateway"]["admin"]
        .as_str()
        .unwrap()
        .to_owned();
    let series = |admin: String, name: &'static str| async move {
        metrics::value(&http_get(&admin, "/metrics").await?.1, name)
    };
    // The gateway cancels all eight: its client gives no window, so hyper
    // never polls those bodies and nothing else can end them. The order
    // sidecar (whose reader, the gateway, stopped reading too) cancels
    // those its own 2 s run out on first; the gateway's cancel resets the
    // rest. Which proxy's sweep comes first is a race, so the sidecar's
    // count is not asserted: what must hold is that the answers end and
    // every application slot comes back.
    eventually(
        Duration::from_secs(20),
        "stalled answers cancelled and their slots free",
        || async {
            let at_gateway = series(
                gateway_admin.clone(),
                "minimesh_stalled_responses_cancelled_total",
            )
            .await?;
            let in_flight = series(order_admin.clone(), "minimesh_app_calls_in_flight").await?;
            (at_gateway >= 8.0 && in_flight == 0.0).then_some(())
        },
    )
    .await;
    let at_sidecar = series(
        order_admin.clone(),
        "minimesh_stalled_responses_cancelled_total",
    )
    .await
    .unwrap_or(0.0);
    assert!(at_sidecar <= 8.0, "the sidecar cancelled {at_sidecar} of 8");
    // The slots serve other callers again.
    let channel = tonic::transport::Endpoint::from_shared(mesh.gateway_url())
        .unwrap()
        .timeout(Duration::from_secs(3))
        .connect()
        .await
        .unwrap();
    let page = OrderServiceClient::new(channel)
        .list_orders(list_orders)
        .await
        .expect("ListOrders after the stalled answers were cancelled");
    assert!(page.get_ref().orders.len() >= 400);
    drop(stalled);
}
