//! Plain HTTP/1.1 GETs, as a scraper asks the admin listeners.

use std::fmt::Display;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long one GET may take: a stopped process accepts but never answers.
const BOUND: Duration = Duration::from_secs(2);

/// `GET path` on `addr` (`host:port`); the status code and the whole
/// response, or `None` when nothing answered in time.
pub async fn http_get(addr: impl Display, path: &str) -> Option<(u16, String)> {
    let addr = addr.to_string();
    tokio::time::timeout(BOUND, async {
        let mut stream = tokio::net::TcpStream::connect(&addr).await.ok()?;
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
/// response head in front); an error unless it answered 200.
pub async fn metrics_text(addr: impl Display) -> anyhow::Result<String> {
    let addr = addr.to_string();
    match http_get(&addr, "/metrics").await {
        Some((200, text)) => Ok(text),
        Some((code, text)) => anyhow::bail!("{addr}/metrics answered {code}: {text}"),
        None => anyhow::bail!("{addr}/metrics did not answer"),
    }
}
