//! Plain HTTP/1.1 GETs, as a scraper asks the admin listeners.

use std::fmt::Display;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `GET path` on `addr` (`host:port`); the status code and the whole
/// response, or `None` when nothing answered within 2 s (a stopped process
/// accepts but never answers).
pub async fn http_get(addr: impl Display, path: &str) -> Option<(u16, String)> {
    get_within(&addr.to_string(), path, None, Duration::from_secs(2)).await
}

/// An admin listener's answer, taken apart.
#[derive(Debug)]
pub struct Answer {
    /// The HTTP status code.
    pub code: u16,
    /// The `content-type` header, lower-cased; empty when there was none.
    pub content_type: String,
    /// Everything after the head (the admin listeners never chunk).
    pub body: String,
}

/// `GET path` on `addr` asking for `accept` (as a scraper negotiates the
/// exposition format); `None` when nothing answered within 10 s.
pub async fn get_accepting(addr: impl Display, path: &str, accept: Option<&str>) -> Option<Answer> {
    let text = get_within(&addr.to_string(), path, accept, Duration::from_secs(10))
        .await?
        .1;
    let (head, body) = text.split_once("\r\n\r\n")?;
    let content_type = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-type: ")
                .map(str::to_owned)
        })
        .unwrap_or_default();
    Some(Answer {
        code: head.get(9..12)?.parse().ok()?,
        content_type,
        body: body.to_owned(),
    })
}

async fn get_within(
    addr: &str,
    path: &str,
    accept: Option<&str>,
    bound: Duration,
) -> Option<(u16, String)> {
    let accept = accept
        .map(|a| format!("accept: {a}\r\n"))
        .unwrap_or_default();
    tokio::time::timeout(bound, async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\n{accept}connection: close\r\n\r\n")
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
    match get_within(&addr, "/metrics", None, Duration::from_secs(10)).await {
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
