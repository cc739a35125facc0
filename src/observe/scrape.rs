//! Reading a proxy's `/metrics`: one HTTP GET and a parser for the classic
//! Prometheus text format.
//!
//! The parser is small and ours: it reads only what our proxies write
//! (samples with labels, no timestamps needed), and the Rust crates for it
//! are either unmaintained or pull in a full client library.

use anyhow::{Context, bail};
use std::collections::BTreeMap;
use std::time::Duration;

/// One sample: metric name, labels, value.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

impl Sample {
    pub(super) fn label(&self, name: &str) -> &str {
        self.labels.get(name).map(String::as_str).unwrap_or("")
    }
}

const SCRAPE_TIMEOUT: Duration = Duration::from_secs(3);

/// GET `http://<addr>/metrics` and parse it.
pub(super) async fn scrape(addr: &str) -> anyhow::Result<Vec<Sample>> {
    let body = tokio::time::timeout(SCRAPE_TIMEOUT, get(addr))
        .await
        .with_context(|| format!("scraping {addr}: no answer within {SCRAPE_TIMEOUT:?}"))??;
    parse(&body).with_context(|| format!("parsing the metrics of {addr}"))
}

async fn get(addr: &str) -> anyhow::Result<String> {
    use http_body_util::{BodyExt, Empty};
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to admin {addr}"))?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .with_context(|| format!("HTTP handshake with {addr}"))?;
    tokio::spawn(connection);
    let request = http::Request::get("/metrics")
        .header(http::header::HOST, addr)
        .header(http::header::ACCEPT, "text/plain; version=0.0.4")
        .body(Empty::<bytes::Bytes>::new())
        .context("building the request")?;
    let response = sender
        .send_request(request)
        .await
        .with_context(|| format!("GET {addr}/metrics"))?;
    if !response.status().is_success() {
        bail!("GET {addr}/metrics answered {}", response.status());
    }
    let body = response
        .into_body()
        .collect()
        .await
        .with_context(|| format!("reading {addr}/metrics"))?
        .to_bytes();
    String::from_utf8(body.to_vec()).context("metrics are not UTF-8")
}

/// Parses the classic text format (comments and blank lines skipped).
pub(super) fn parse(text: &str) -> anyhow::Result<Vec<Sample>> {
    let mut samples = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        samples.push(parse_line(line).with_context(|| format!("line {}: {line}", number + 1))?);
    }
    Ok(samples)
}

fn parse_line(line: &str) -> anyhow::Result<Sample> {
    let name_end = line
        .find(|c: char| c == '{' || c.is_whitespace())
        .context("no value")?;
    let name = line[..name_end].to_owned();
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(mut cursor) = rest.strip_prefix('{') {
        loop {
            cursor = cursor.trim_start_matches([',', ' ']);
            if let Some(after) = cursor.strip_prefix('}') {
                rest = after;
                break;
            }
            let (key, after_key) = cursor.split_once('=').context("label without '='")?;
            let mut value_text = after_key
                .strip_prefix('"')
                .with_context(|| format!("label value of {key} is not quoted"))?
                .chars();
            let mut value = String::new();
            loop {
                match value_text.next().context("unterminated label value")? {
                    '"' => break,
                    '\\' => match value_text.next().context("unterminated escape")? {
                        'n' => value.push('\n'),
                        other => value.push(other),
                    },
                    other => value.push(other),
                }
            }
            labels.insert(key.trim().to_owned(), value);
            cursor = value_text.as_str();
        }
    }
    let value_text = rest.split_whitespace().next().context("no value")?;
    Ok(Sample {
        name,
        labels,
        value: parse_value(value_text)?,
    })
}

fn parse_value(text: &str) -> anyhow::Result<f64> {
    match text {
        "+Inf" | "Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        other => other
            .parse()
            .with_context(|| format!("{other:?} is not a number")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_labels_values_and_escapes() {
        let text = "# HELP x_total X.\n# TYPE x_total counter\n\
            x_total{a=\"1\",b=\"q\\\"uote\",le=\"+Inf\"} 42\nplain 3.5\nh_bucket{le=\"+Inf\"} +Inf\n";
        let samples = parse(text).unwrap();
        assert_eq!(samples.len(), 3);
        assert_eq!(samples[0].name, "x_total");
        assert_eq!(samples[0].label("a"), "1");
        assert_eq!(samples[0].label("b"), "q\"uote");
        assert_eq!(samples[0].label("le"), "+Inf");
        assert_eq!(samples[0].value, 42.0);
        assert_eq!(samples[1].name, "plain");
        assert!(samples[1].labels.is_empty());
        assert!(samples[2].value.is_infinite());
        assert!(parse("broken{a=\"1\" 3").is_err());
        assert!(parse("novalue").is_err());
    }
}
