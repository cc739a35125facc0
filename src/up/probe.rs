//! Probing: whether a child is ready (gRPC health, or `/ready` and `/live`
//! on its admin listener), and waiting until every child is.

use super::READY_TIMEOUT;
use super::child::Child;
use anyhow::bail;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// How `up` tells that a child is ready.
#[derive(Debug, Clone, Copy)]
pub(super) enum Probe {
    /// gRPC health SERVING at this address (services).
    Grpc(SocketAddr),
    /// HTTP 200 from `/ready` at this admin address (sidecars, gateway).
    Ready(SocketAddr),
    /// HTTP 200 from `/live` (the identity issuer, live once it listens).
    Live(SocketAddr),
}

/// Whether the child answers its readiness probe now.
pub(super) async fn ready(probe: Probe) -> bool {
    match probe {
        Probe::Grpc(addr) => serving(&format!("http://{addr}")).await,
        Probe::Ready(addr) => http_ok(addr, "/ready").await,
        Probe::Live(addr) => http_ok(addr, "/live").await,
    }
}

/// GET `path` on an admin listener answers 200.
async fn http_ok(addr: SocketAddr, path: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await
            .ok()?;
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).await.ok()?;
        Some(head.starts_with(b"HTTP/1.1 200"))
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), attempt).await,
        Ok(Some(true))
    )
}

pub(super) async fn serving(url: &str) -> bool {
    let Ok(endpoint) = tonic::transport::Endpoint::from_shared(url.to_owned()) else {
        return false;
    };
    let Ok(channel) = endpoint.timeout(Duration::from_secs(1)).connect().await else {
        return false;
    };
    matches!(
        HealthClient::new(channel).check(HealthCheckRequest { service: String::new() }).await,
        Ok(response) if response.get_ref().status == ServingStatus::Serving as i32
    )
}

/// Waits until every child reports ready.
pub(super) async fn wait_ready(children: &[Child]) -> anyhow::Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    for child in children {
        while !ready(child.probe).await {
            if Instant::now() > deadline {
                bail!(
                    "{} did not become ready within {READY_TIMEOUT:?}; see {}",
                    child.name,
                    child.log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(())
}
