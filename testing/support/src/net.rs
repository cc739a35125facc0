//! Loopback ports, and waiting until something accepts on them.

use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};

/// How often the readiness waits poll.
pub(crate) const POLL: Duration = Duration::from_millis(20);

/// A loopback address with a port nobody listens on right now (bound, then
/// released), for a component that binds it itself, or for a dead endpoint.
pub fn free_addr() -> std::io::Result<SocketAddr> {
    std::net::TcpListener::bind(("127.0.0.1", 0))?.local_addr()
}

/// A listener on an ephemeral loopback port, and its `http://` URL.
pub async fn loopback_listener() -> std::io::Result<(TcpListener, String)> {
    let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
    let url = format!("http://{}", listener.local_addr()?);
    Ok((listener, url))
}

/// Waits until every address accepts a TCP connection, each within `within`.
pub async fn wait_listening(addrs: &[SocketAddr], within: Duration) -> anyhow::Result<()> {
    for addr in addrs {
        let deadline = tokio::time::Instant::now() + within;
        while TcpStream::connect(addr).await.is_err() {
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "{addr} did not accept within {within:?}"
            );
            tokio::time::sleep(POLL).await;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn wait_listening_returns_once_accepting_and_fails_when_nothing_listens() {
        let (listener, _) = loopback_listener().await.unwrap();
        let live = listener.local_addr().unwrap();
        wait_listening(&[live], Duration::from_secs(5))
            .await
            .unwrap();
        let dead = free_addr().unwrap();
        let err = wait_listening(&[dead], Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(err.to_string().contains(&dead.to_string()), "{err}");
    }
}
