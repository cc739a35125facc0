//! Plain HTTP/1.1 GETs, as a scraper asks the admin listeners.

use std::fmt::Display;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `GET path` on `addr` (`host:port`); the status code and the whole
/// response, or `None` when nothing answered within 2 s (a stopped process
/// accepts but never answers).
pub async fn http_get(addr: impl Display, path: &str) -> Option<(u16, String)> {
    get_within(&addr.to_string(), path, Duration::from_secs(2)).await
}

async fn get_within(addr: &str, path: &str, bound: Duration) -> Option<(u16, String)> {
    tokio::time::timeout(bound, async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await
            .ok()?;
        let mut text = String::new();
        stream.read_to_string(&mut text).await.ok()?;
        Some((text.get(9..12)?.parse().ok()?, text))
    })
    .await
    .ok()
    .flatten()
}

/// The Prometheus text an admin listener serves at `/metrics` (with the
/// response head in front); an error unless it answered 200 within 10 s
/// (a scrape of a busy proxy on a loaded machine may be slow).
pub async fn metrics_text(addr: impl Display) -> anyhow::Result<String> {
    let addr = addr.to_string();
    match get_within(&addr, "/metrics", Duration::from_secs(10)).await {
        Some((200, text)) => Ok(text),
        Some((code, text)) => anyhow::bail!("{addr}/metrics answered {code}: {text}"),
        None => anyhow::bail!("{addr}/metrics did not answer"),
    }
}

/// Waits until `GET path` on `addr` answers 200, polling, for at most `within`.
pub async fn wait_ok(addr: impl Display, path: &str, within: Duration) -> anyhow::Result<()> {
    let addr = addr.to_string();
    let deadline = tokio::time::Instant::now() + within;
    while !matches!(http_get(&addr, path).await, Some((200, _))) {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "{addr}{path} did not answer 200 within {within:?}"
        );
        tokio::time::sleep(crate::net::POLL).await;
    }
    Ok(())
}
