//! `minimesh stat` and `minimesh top`: the golden metrics of every edge of
//! the mesh, read from the proxies' admin `/metrics`.

mod edges;
mod scrape;
mod top;

use anyhow::{Context, bail};
use edges::{Edge, Snapshot};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Which proxies to read.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct Targets {
    /// The data dir of a running `up`: its mesh.json names every proxy.
    #[arg(long, default_value = "./.minimesh", conflicts_with = "admin")]
    data_dir: PathBuf,
    /// Admin addresses (HOST:PORT) to read instead, e.g. after `kubectl port-forward`.
    #[arg(long, value_delimiter = ',')]
    admin: Vec<String>,
}

impl Targets {
    fn addrs(&self) -> anyhow::Result<Vec<String>> {
        if !self.admin.is_empty() {
            return Ok(self.admin.clone());
        }
        admins_of(&self.data_dir)
    }
}

/// Every proxy admin address in a data dir's mesh.json.
fn admins_of(data_dir: &Path) -> anyhow::Result<Vec<String>> {
    let path = data_dir.join("mesh.json");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "reading {} (is `minimesh up` running with this --data-dir? or pass --admin)",
            path.display()
        )
    })?;
    let mesh: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let mut addrs: Vec<String> = mesh["instances"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["admin"].as_str().map(str::to_owned))
        .collect();
    if let Some(gateway) = mesh["gateway"]["admin"].as_str() {
        addrs.push(gateway.to_owned());
    }
    if addrs.is_empty() {
        bail!("{} names no proxy", path.display());
    }
    Ok(addrs)
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub(crate) enum Output {
    Table,
    Json,
}

#[derive(Debug, Clone, clap::Args)]
pub(crate) struct StatArgs {
    #[command(flatten)]
    targets: Targets,
    /// Interval over which rates, success and latency are computed.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    window: Duration,
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    output: Output,
}

#[derive(Debug, Clone, clap::Args)]
pub(crate) struct TopArgs {
    #[command(flatten)]
    targets: Targets,
    /// Rates cover at most this much of the most recent history.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    window: Duration,
}

/// Scrapes every address; a proxy that does not answer is reported on
/// stderr and left out, unless none answers.
async fn snapshot(addrs: &[String]) -> anyhow::Result<(Snapshot, Vec<String>)> {
    let scrapes = futures::future::join_all(addrs.iter().map(|a| scrape::scrape(a))).await;
    let mut snapshot = Snapshot::default();
    let mut errors = Vec::new();
    for (addr, result) in addrs.iter().zip(scrapes) {
        match result {
            Ok(samples) => snapshot.add(addr, &samples),
            Err(err) => errors.push(format!("{err:#}")),
        }
    }
    if errors.len() == addrs.len() {
        bail!("no proxy answered: {}", errors.join("; "));
    }
    Ok((snapshot, errors))
}

pub(crate) async fn stat(args: StatArgs) -> anyhow::Result<()> {
    let addrs = args.targets.addrs()?;
    let started = tokio::time::Instant::now();
    let (before, _) = snapshot(&addrs).await?;
    tokio::time::sleep(args.window).await;
    let (after, errors) = snapshot(&addrs).await?;
    for error in &errors {
        eprintln!("warning: {error}");
    }
    let window_s = started.elapsed().as_secs_f64();
    let rows = edges::edges(&before, &after, window_s, false);
    match args.output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "window_s": (window_s * 10.0).round() / 10.0,
                "edges": rows,
            }))?
        ),
        Output::Table => print!("{}", table(&rows, false)),
    }
    Ok(())
}

pub(crate) async fn top(args: TopArgs) -> anyhow::Result<()> {
    let addrs = args.targets.addrs()?;
    top::run(addrs, args.window).await
}

fn ms(value: Option<f64>) -> String {
    match value {
        Some(v) if v >= 100.0 => format!("{v:.0}ms"),
        Some(v) if v >= 10.0 => format!("{v:.1}ms"),
        Some(v) => format!("{v:.2}ms"),
        None => "-".to_owned(),
    }
}

fn percent(value: Option<f64>) -> String {
    value.map_or_else(|| "-".to_owned(), |v| format!("{:.2}%", v * 100.0))
}

/// The cells of one row, in the order of [`HEADER`].
fn cells(edge: &Edge, with_method: bool) -> Vec<String> {
    let mut cells = vec![edge.from.clone(), edge.to.clone()];
    if with_method {
        cells.push(edge.method.clone().unwrap_or_default());
    }
    cells.extend([
        edge.requests.to_string(),
        format!("{:.1}", edge.rps),
        percent(edge.success_rate),
        ms(edge.latency_ms.p50),
        ms(edge.latency_ms.p95),
        ms(edge.latency_ms.p99),
    ]);
    cells
}

const HEADER: [&str; 8] = [
    "FROM", "TO", "REQUESTS", "RPS", "SUCCESS", "P50", "P95", "P99",
];

fn header(with_method: bool) -> Vec<&'static str> {
    let mut header = HEADER.to_vec();
    if with_method {
        header.insert(2, "METHOD");
    }
    header
}

fn table(rows: &[Edge], with_method: bool) -> String {
    let header = header(with_method);
    let body: Vec<Vec<String>> = rows.iter().map(|r| cells(r, with_method)).collect();
    let widths: Vec<usize> = (0..header.len())
        .map(|i| {
            body.iter()
                .map(|r| r[i].len())
                .chain([header[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: Vec<String>| -> String {
        let mut out = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ");
        out.truncate(out.trim_end().len());
        out.push('\n');
        out
    };
    let mut out = line(header.iter().map(|h| (*h).to_owned()).collect());
    if body.is_empty() {
        out.push_str("(no calls between mesh services yet)\n");
    }
    for row in body {
        out.push_str(&line(row));
    }
    out
}
