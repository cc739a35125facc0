//! `minimesh bench orders-table`: folds the JSON files of several
//! `minimesh bench orders` runs (one file per configuration and round) into
//! one table: every round of a configuration and concurrency merged (calls
//! summed, latency histograms added, so percentiles are over every call),
//! with ratios against a baseline configuration at the same concurrency.

use crate::orders::{self, OrdersReport, OrdersWorkload};
use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::path::PathBuf;

/// `minimesh bench orders-table`: many orders runs folded into one table.
#[derive(Debug, clap::Args)]
pub struct OrdersTableArgs {
    /// JSON files written by `minimesh bench orders --json`.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// The label ratios are taken against (default: the first label seen).
    #[arg(long)]
    pub baseline: Option<String>,
    /// Where orders.json and orders.md go.
    #[arg(long, default_value = "target/bench")]
    pub out: PathBuf,
}

/// One `orders --json` file: runs of one configuration.
#[derive(Debug, Deserialize)]
pub struct RunFile {
    /// The configuration's name (a column of the table).
    pub label: String,
    /// Its runs, one per round and concurrency.
    pub runs: Vec<Run>,
}

/// One orders run as stored.
#[derive(Debug, Deserialize)]
pub struct Run {
    /// What was run.
    pub workload: OrdersWorkload,
    /// What came of it.
    pub report: OrdersReport,
}

/// Every round of one configuration at one concurrency.
#[derive(Debug, Serialize)]
pub struct Cell {
    /// The configuration's name.
    pub label: String,
    /// Workers in each round.
    pub concurrency: usize,
    /// calls/s of each round, in the order the rounds ran.
    pub per_round: Vec<f64>,
    /// Every round's calls merged, latency included.
    pub report: OrdersReport,
}

/// Merges the runs into cells, configurations in the order first seen,
/// concurrencies ascending within each.
pub fn aggregate(files: &[RunFile]) -> anyhow::Result<Vec<Cell>> {
    let mut labels: Vec<&str> = Vec::new();
    for file in files {
        if !labels.contains(&file.label.as_str()) {
            labels.push(&file.label);
        }
    }
    let mut cells: Vec<Cell> = Vec::new();
    for file in files {
        for run in &file.runs {
            let c = run.workload.concurrency;
            let index = match cells
                .iter()
                .position(|x| x.label == file.label && x.concurrency == c)
            {
                Some(i) => i,
                None => {
                    cells.push(Cell {
                        label: file.label.clone(),
                        concurrency: c,
                        per_round: Vec::new(),
                        report: OrdersReport::default(),
                    });
                    cells.len() - 1
                }
            };
            let cell = &mut cells[index];
            cell.per_round.push(run.report.report.per_second);
            let mut h = cell.report.histogram()?;
            h.add(run.report.histogram()?)
                .context("adding latency histograms")?;
            orders::merge_into(&mut cell.report, &run.report);
            let elapsed = cell.report.report.elapsed_s + run.report.report.elapsed_s;
            cell.report.report.histogram = Some(h);
            cell.report.report = std::mem::take(&mut cell.report.report)
                .finish(std::time::Duration::from_secs_f64(elapsed));
        }
    }
    for cell in &mut cells {
        if let Some(h) = cell.report.report.histogram.take() {
            cell.report.histogram_us = h
                .iter_recorded()
                .map(|v| [v.value_iterated_to(), v.count_at_value()])
                .collect();
        }
    }
    cells.sort_by_key(|c| {
        let label = labels.iter().position(|l| *l == c.label);
        (label, c.concurrency)
    });
    Ok(cells)
}

fn ms(us: u64) -> String {
    format!("{:.2}", us as f64 / 1000.0)
}

fn ratio(mine: f64, base: Option<f64>) -> String {
    match base {
        Some(base) if base > 0.0 => format!("{:.2}", mine / base),
        _ => "-".into(),
    }
}

/// The markdown table: one row per configuration and concurrency.
pub fn markdown(cells: &[Cell], baseline: &str) -> String {
    let mut out = format!(
        "| configuration | concurrency | calls/s | × {baseline} | p50 ms | × | p99 ms | × | errors | OK but not PAID | calls/s per round |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n"
    );
    for cell in cells {
        let base = cells
            .iter()
            .find(|b| b.label == baseline && b.concurrency == cell.concurrency);
        let r = &cell.report.report;
        let latency = r.latency.clone().unwrap_or_default();
        let base_latency = base.and_then(|b| b.report.report.latency.clone());
        let errors: u64 = r.errors.values().sum();
        let not_paid: u64 = cell
            .report
            .statuses
            .iter()
            .filter(|(status, _)| status.as_str() != "ORDER_STATUS_PAID")
            .map(|(_, n)| n)
            .sum();
        let rounds: Vec<String> = cell.per_round.iter().map(|x| format!("{x:.0}")).collect();
        let _ = writeln!(
            out,
            "| {} | {} | {:.0} | {} | {} | {} | {} | {} | {errors} | {not_paid} | {} |",
            cell.label,
            cell.concurrency,
            r.per_second,
            ratio(r.per_second, base.map(|b| b.report.report.per_second)),
            ms(latency.p50_us),
            ratio(
                latency.p50_us as f64,
                base_latency.as_ref().map(|l| l.p50_us as f64)
            ),
            ms(latency.p99_us),
            ratio(
                latency.p99_us as f64,
                base_latency.as_ref().map(|l| l.p99_us as f64)
            ),
            rounds.join(", "),
        );
    }
    for cell in cells {
        for (code, n) in &cell.report.report.errors {
            let sample = cell
                .report
                .error_samples
                .get(code)
                .map_or("", String::as_str);
            let _ = writeln!(
                out,
                "\n{} at concurrency {}: {n} × {code} (e.g. {sample:?})",
                cell.label, cell.concurrency
            );
        }
    }
    out
}

/// `minimesh bench orders-table`.
pub fn command(args: OrdersTableArgs) -> anyhow::Result<()> {
    let mut files = Vec::new();
    for path in &args.files {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let file: RunFile =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        files.push(file);
    }
    let baseline = match args.baseline {
        Some(label) => label,
        None => files.first().map(|f| f.label.clone()).unwrap_or_default(),
    };
    let cells = aggregate(&files)?;
    let table = markdown(&cells, &baseline);
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let json = serde_json::json!({"baseline": baseline, "cells": cells});
    std::fs::write(
        args.out.join("orders.json"),
        serde_json::to_string_pretty(&json)?,
    )?;
    std::fs::write(args.out.join("orders.md"), &table)?;
    print!("{table}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A round of `label` at concurrency `c`, as read from its file: `ok`
    /// calls in 1 s, each taking `us`.
    fn round(label: &str, c: usize, ok: u64, us: u64) -> RunFile {
        let report = OrdersReport {
            report: crate::load::Report {
                ok,
                elapsed_s: 1.0,
                per_second: ok as f64,
                ..Default::default()
            },
            statuses: [("ORDER_STATUS_PAID".to_owned(), ok)].into(),
            histogram_us: vec![[us, ok]],
            ..Default::default()
        };
        RunFile {
            label: label.into(),
            runs: vec![Run {
                workload: OrdersWorkload {
                    concurrency: c,
                    duration_s: 1.0,
                    warmup_s: 0.0,
                },
                report,
            }],
        }
    }

    #[test]
    fn rounds_merge_and_ratios_are_against_the_baseline() {
        let files = vec![
            round("sqlite", 8, 1000, 2000),
            round("pg", 8, 500, 4000),
            round("sqlite", 8, 3000, 2000),
            round("pg", 8, 500, 8000),
            round("sqlite", 1, 100, 1000),
        ];
        let cells = aggregate(&files).unwrap();
        let order: Vec<_> = cells
            .iter()
            .map(|c| (c.label.as_str(), c.concurrency))
            .collect();
        assert_eq!(order, [("sqlite", 1), ("sqlite", 8), ("pg", 8)]);
        let sqlite = &cells[1];
        assert_eq!(sqlite.report.report.ok, 4000);
        assert_eq!(sqlite.per_round, [1000.0, 3000.0]);
        assert!((sqlite.report.report.per_second - 2000.0).abs() < 1e-6);
        // Half the pg calls took 4 ms and half 8 ms: percentiles over both rounds.
        let pg = cells[2].report.report.latency.clone().unwrap();
        assert!((3990..=4010).contains(&pg.p50_us), "{pg:?}");
        assert!((7990..=8010).contains(&pg.p99_us), "{pg:?}");

        let table = markdown(&cells, "sqlite");
        let pg_row = table.lines().find(|l| l.starts_with("| pg | 8 |")).unwrap();
        // 500 calls/s against 2000, p50 4 ms against 2 ms, p99 8 against 2.
        assert!(
            pg_row.starts_with(
                "| pg | 8 | 500 | 0.25 | 4.00 | 2.00 | 8.00 | 4.00 | 0 | 0 | 500, 500 |"
            ),
            "{pg_row}"
        );
        let lonely = table
            .lines()
            .find(|l| l.starts_with("| sqlite | 1 |"))
            .unwrap();
        assert!(lonely.contains("| 1.00 |"), "{lonely}");
    }
}
