//! Golden metrics per edge `caller → service`, from the callee sidecars'
//! inbound series: `client_id` names the caller, `minimesh_proxy{service}`
//! the callee, so one scrape of every sidecar gives every edge.

use super::scrape::Sample;
use serde::Serialize;
use std::collections::BTreeMap;

/// Where one proxy's counts of one edge (and method) are kept.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct SeriesKey {
    proxy: String,
    from: String,
    to: String,
    method: String,
}

#[derive(Debug, Clone, Default)]
struct Counts {
    requests: f64,
    ok: f64,
    /// Cumulative bucket counts by upper bound.
    buckets: Vec<(f64, f64)>,
}

/// Every proxy's inbound counts at one moment.
#[derive(Debug, Clone, Default)]
pub(super) struct Snapshot {
    series: BTreeMap<SeriesKey, Counts>,
}

impl Snapshot {
    /// Adds one proxy's samples (`proxy` tells proxies apart, e.g. its admin address).
    pub(super) fn add(&mut self, proxy: &str, samples: &[Sample]) {
        let Some(to) = samples
            .iter()
            .find(|s| s.name == "minimesh_proxy" && s.label("role") == "sidecar")
            .map(|s| s.label("service").to_owned())
        else {
            return; // the gateway has no inbound side
        };
        for sample in samples.iter().filter(|s| s.label("direction") == "inbound") {
            let key = || SeriesKey {
                proxy: proxy.to_owned(),
                from: sample.label("client_id").to_owned(),
                to: to.clone(),
                method: format!("{}/{}", sample.label("service"), sample.label("method")),
            };
            match sample.name.as_str() {
                "minimesh_requests_total" => {
                    let counts = self.series.entry(key()).or_default();
                    counts.requests += sample.value;
                    if sample.label("grpc_status") == "0" {
                        counts.ok += sample.value;
                    }
                }
                "minimesh_request_duration_seconds_bucket" => {
                    let Ok(le) = sample.label("le").replace("Inf", "inf").parse::<f64>() else {
                        continue;
                    };
                    let counts = self.series.entry(key()).or_default();
                    match counts.buckets.iter_mut().find(|(bound, _)| *bound == le) {
                        Some((_, count)) => *count += sample.value,
                        None => counts.buckets.push((le, sample.value)),
                    }
                }
                _ => {}
            }
        }
    }
}

/// One row of `stat` / `top`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub(super) struct Edge {
    pub from: String,
    pub to: String,
    /// Set on per-method rows.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// Calls since the proxies started.
    pub requests: u64,
    pub rps: f64,
    /// Share of the window's calls that ended OK; None without calls.
    pub success_rate: Option<f64>,
    pub latency_ms: Latency,
}

#[derive(Debug, Clone, Serialize, PartialEq, Default)]
pub(super) struct Latency {
    pub p50: Option<f64>,
    pub p95: Option<f64>,
    pub p99: Option<f64>,
}

/// Edges (or, with `by_method`, edge × method rows), busiest first, from two
/// snapshots `window_s` seconds apart.
pub(super) fn edges(
    before: &Snapshot,
    after: &Snapshot,
    window_s: f64,
    by_method: bool,
) -> Vec<Edge> {
    #[derive(Default)]
    struct Sum {
        total: f64,
        requests: f64,
        ok: f64,
        buckets: BTreeMap<u64, (f64, f64)>,
    }
    let mut sums: BTreeMap<(String, String, String), Sum> = BTreeMap::new();
    for (key, now) in &after.series {
        let then = before.series.get(key);
        let sum = sums
            .entry((
                key.from.clone(),
                key.to.clone(),
                if by_method {
                    key.method.clone()
                } else {
                    String::new()
                },
            ))
            .or_default();
        sum.total += now.requests;
        sum.requests += delta(then.map(|t| t.requests), now.requests);
        sum.ok += delta(then.map(|t| t.ok), now.ok);
        for (le, count) in &now.buckets {
            let earlier = then.and_then(|t| {
                t.buckets
                    .iter()
                    .find(|(bound, _)| bound == le)
                    .map(|(_, c)| *c)
            });
            let slot = sum.buckets.entry(le.to_bits()).or_insert((*le, 0.0));
            slot.1 += delta(earlier, *count);
        }
    }
    let mut rows: Vec<Edge> = sums
        .into_iter()
        .map(|((from, to, method), sum)| {
            let mut buckets: Vec<(f64, f64)> = sum.buckets.into_values().collect();
            buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
            let quantile = |q: f64| histogram_quantile(q, &buckets).map(|s| s * 1000.0);
            Edge {
                from,
                to,
                method: by_method.then_some(method),
                requests: sum.total.max(0.0).round() as u64,
                rps: if window_s > 0.0 {
                    sum.requests / window_s
                } else {
                    0.0
                },
                success_rate: (sum.requests > 0.0).then(|| sum.ok / sum.requests),
                latency_ms: Latency {
                    p50: quantile(0.5),
                    p95: quantile(0.95),
                    p99: quantile(0.99),
                },
            }
        })
        .collect();
    rows.sort_by(|a, b| {
        b.rps
            .total_cmp(&a.rps)
            .then(b.requests.cmp(&a.requests))
            .then_with(|| (&a.from, &a.to, &a.method).cmp(&(&b.from, &b.to, &b.method)))
    });
    rows
}

/// Growth of a counter; a counter that went down was reset (its proxy restarted).
fn delta(before: Option<f64>, now: f64) -> f64 {
    match before {
        Some(before) if now >= before => now - before,
        _ => now,
    }
}

/// The q-quantile of cumulative `buckets` (upper bound, count; sorted), by
/// linear interpolation inside the bucket that holds it, as Prometheus'
/// `histogram_quantile` does: the first bucket starts at 0, and a quantile
/// in the +Inf bucket is the largest finite bound.
pub(super) fn histogram_quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 || !(0.0..=1.0).contains(&q) {
        return None;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for &(bound, count) in buckets {
        if count >= rank {
            if bound.is_infinite() {
                return Some(lower.0);
            }
            if count == lower.1 {
                return Some(bound);
            }
            return Some(lower.0 + (bound - lower.0) * (rank - lower.1) / (count - lower.1));
        }
        lower = (bound, count);
    }
    Some(lower.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::scrape::parse;

    fn sidecar(service: &str, calls: &[(&str, &str, u32, f64)]) -> Vec<Sample> {
        let mut text = format!("minimesh_proxy{{role=\"sidecar\",service=\"{service}\"}} 1\n");
        for (client, method, status, count) in calls {
            text.push_str(&format!(
                "minimesh_requests_total{{direction=\"inbound\",service=\"shop.x.v1.X\",method=\"{method}\",grpc_status=\"{status}\",client_id=\"{client}\"}} {count}\n"
            ));
            for (le, share) in [("0.001", 0.5), ("0.01", 0.9), ("+Inf", 1.0)] {
                text.push_str(&format!(
                    "minimesh_request_duration_seconds_bucket{{direction=\"inbound\",service=\"shop.x.v1.X\",method=\"{method}\",client_id=\"{client}\",le=\"{le}\"}} {}\n",
                    count * share
                ));
            }
            text.push_str("minimesh_requests_total{direction=\"outbound\",service=\"shop.y.v1.Y\",method=\"M\",grpc_status=\"0\",client_id=\"me\"} 999\n");
        }
        parse(&text).unwrap()
    }

    #[test]
    fn edges_come_from_inbound_series_with_rates_over_the_window() {
        let mut before = Snapshot::default();
        before.add("a", &sidecar("order", &[("gateway", "Get", 0, 100.0)]));
        before.add("b", &sidecar("order", &[("gateway", "Get", 0, 50.0)]));
        let mut after = Snapshot::default();
        after.add(
            "a",
            &sidecar(
                "order",
                &[("gateway", "Get", 0, 180.0), ("gateway", "Get", 14, 20.0)],
            ),
        );
        // Proxy b restarted: its counter went down, so all of it is new.
        after.add("b", &sidecar("order", &[("gateway", "Get", 0, 10.0)]));
        let rows = edges(&before, &after, 10.0, false);
        assert_eq!(rows.len(), 1, "{rows:?}");
        let edge = &rows[0];
        assert_eq!((edge.from.as_str(), edge.to.as_str()), ("gateway", "order"));
        assert_eq!(edge.requests, 210);
        assert!((edge.rps - 11.0).abs() < 1e-9, "{edge:?}"); // (80 + 20 + 10) / 10 s
        assert!((edge.success_rate.unwrap() - 90.0 / 110.0).abs() < 1e-9);
        let p50 = edge.latency_ms.p50.unwrap();
        assert!((0.9..=1.0).contains(&p50), "{p50}");
    }

    #[test]
    fn quantiles_interpolate_like_prometheus() {
        let buckets = [(0.1, 50.0), (0.2, 100.0), (f64::INFINITY, 100.0)];
        assert_eq!(histogram_quantile(0.5, &buckets), Some(0.1));
        assert!((histogram_quantile(0.75, &buckets).unwrap() - 0.15).abs() < 1e-12);
        assert!((histogram_quantile(0.25, &buckets).unwrap() - 0.05).abs() < 1e-12);
        let tail = [(0.1, 10.0), (f64::INFINITY, 20.0)];
        assert_eq!(histogram_quantile(0.99, &tail), Some(0.1));
        assert_eq!(
            histogram_quantile(0.5, &[(0.1, 0.0), (f64::INFINITY, 0.0)]),
            None
        );
    }

    #[test]
    fn per_method_rows_split_an_edge() {
        let mut after = Snapshot::default();
        after.add(
            "a",
            &sidecar(
                "user",
                &[
                    ("order", "GetUser", 0, 30.0),
                    ("gateway", "ListUsers", 0, 5.0),
                    ("order", "ListUsers", 0, 1.0),
                ],
            ),
        );
        let rows = edges(&Snapshot::default(), &after, 1.0, true);
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[0].method.as_deref(), Some("shop.x.v1.X/GetUser"));
        assert_eq!(rows[0].from, "order");
    }
}
