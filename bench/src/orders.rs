//! The CreateOrder workload: real orders through a running mesh (usually its
//! gateway). One user per worker, then closed-loop CreateOrder calls, each
//! with its own idempotency key, for a fixed time after a warm-up that is not
//! counted. Every non-OK status is an error, counted by code; OK answers are
//! counted by the order's status too, since an order left PENDING or
//! CANCELLED did not do the work a PAID one did.

use crate::load::{self, LoadError, Report};
use anyhow::Context as _;
use hdrhistogram::Histogram;
use minimesh_proto::order::v1::order_service_client::OrderServiceClient;
use minimesh_proto::order::v1::{CreateOrderRequest, OrderItem, OrderStatus};
use minimesh_proto::user::v1::CreateUserRequest;
use minimesh_proto::user::v1::user_service_client::UserServiceClient;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;
use tokio::time::Instant;

/// Per-call deadline: far above any answer the order service gives (it
/// answers PENDING once its charge budget is spent), so it only keeps a
/// wedged target from hanging the run.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// `minimesh bench orders`: CreateOrder against a running mesh.
#[derive(Debug, clap::Args)]
pub struct OrdersArgs {
    /// The gateway (or any endpoint serving UserService and OrderService), e.g. http://127.0.0.1:50051.
    #[arg(long)]
    pub target: String,
    /// Concurrent workers; a list runs each in turn, e.g. 1,8,32.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    pub concurrency: Vec<usize>,
    /// Measured time per concurrency.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    pub duration: Duration,
    /// Calls before the measured time, not counted.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "2s")]
    pub warmup: Duration,
    /// A name for this run in the JSON (e.g. the configuration measured).
    #[arg(long, default_value = "orders")]
    pub label: String,
    /// Write the runs as JSON here (`minimesh bench orders-table` reads it).
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// What an orders run did, as recorded next to its report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OrdersWorkload {
    /// Workers, each creating orders one after another.
    pub concurrency: usize,
    /// Seconds measured.
    pub duration_s: f64,
    /// Seconds run before measuring, not counted.
    pub warmup_s: f64,
}

/// The outcome of an orders run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct OrdersReport {
    /// Calls, errors by code, latency of the OK calls (µs).
    #[serde(flatten)]
    pub report: Report,
    /// OK answers by the order's status, e.g. `ORDER_STATUS_PAID`.
    pub statuses: BTreeMap<String, u64>,
    /// The first message seen for each error code.
    pub error_samples: BTreeMap<String, String>,
    /// The latency histogram as `[value_us, count]` buckets, so runs kept in
    /// separate files can be merged without losing the percentiles.
    pub histogram_us: Vec<[u64; 2]>,
}

impl OrdersReport {
    /// The histogram, from the report or rebuilt from the stored buckets.
    pub fn histogram(&self) -> Result<Histogram<u64>, LoadError> {
        if let Some(h) = &self.report.histogram {
            return Ok(h.clone());
        }
        let mut h = load::histogram()?;
        for [value, count] in &self.histogram_us {
            h.record_n(*value, *count)
                .map_err(|e| LoadError::Histogram(e.to_string()))?;
        }
        Ok(h)
    }
}

fn buckets(h: &Histogram<u64>) -> Vec<[u64; 2]> {
    h.iter_recorded()
        .map(|v| [v.value_iterated_to(), v.count_at_value()])
        .collect()
}

/// What one call came back with: the order's status, or the error.
pub type Outcome = Result<String, tonic::Status>;

/// A token for this run, so users and idempotency keys never collide with
/// an earlier run against the same database.
pub fn run_token() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{:x}-{:x}", std::process::id(), nanos)
}

/// Two items totalling 34.99, well under the payment service's per-charge
/// limit (1000.00), so a working mesh answers PAID.
pub fn order_request(user_id: &str, key: String) -> CreateOrderRequest {
    CreateOrderRequest {
        user_id: user_id.to_owned(),
        items: vec![
            OrderItem {
                sku: "BENCH-MUG".into(),
                quantity: 2,
                unit_price_cents: 1250,
            },
            OrderItem {
                sku: "BENCH-TEA".into(),
                quantity: 1,
                unit_price_cents: 999,
            },
        ],
        currency: "EUR".into(),
        idempotency_key: key,
    }
}

/// Runs `call(worker, n)` closed-loop on `concurrency` workers: calls
/// started during `warmup` are not counted, calls started during the
/// following `duration` are; the measured time ends when the last of them
/// has answered.
pub async fn drive<F, Fut>(
    concurrency: usize,
    warmup: Duration,
    duration: Duration,
    call: F,
) -> Result<OrdersReport, LoadError>
where
    F: Fn(usize, u64) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Outcome> + Send,
{
    let measure_from = Instant::now() + warmup;
    let deadline = measure_from + duration;
    let mut tasks = Vec::new();
    for worker in 0..concurrency.max(1) {
        let call = call.clone();
        let mut mine = OrdersReport::default();
        let mut h = load::histogram()?;
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            loop {
                let started = Instant::now();
                if started >= deadline {
                    break;
                }
                let outcome = call(worker, n).await;
                n += 1;
                if started < measure_from {
                    continue;
                }
                match outcome {
                    Ok(status) => {
                        mine.report.ok += 1;
                        *mine.statuses.entry(status).or_default() += 1;
                        let _ = h.record(started.elapsed().as_micros().max(1) as u64);
                    }
                    Err(status) => {
                        let code = format!("{:?}", status.code());
                        mine.error_samples
                            .entry(code.clone())
                            .or_insert_with(|| status.message().chars().take(120).collect());
                        *mine.report.errors.entry(code).or_default() += 1;
                    }
                }
            }
            mine.report.histogram = Some(h);
            mine
        }));
    }
    let mut total = OrdersReport::default();
    let mut h = load::histogram()?;
    for task in tasks {
        let Ok(part) = task.await else { continue };
        merge_into(&mut total, &part);
        if let Some(theirs) = &part.report.histogram {
            let _ = h.add(theirs);
        }
    }
    let elapsed = Instant::now().saturating_duration_since(measure_from);
    total.histogram_us = buckets(&h);
    total.report.histogram = Some(h);
    total.report = std::mem::take(&mut total.report).finish(elapsed);
    Ok(total)
}

/// Adds `part`'s counts to `total` (not the histogram or the time).
pub fn merge_into(total: &mut OrdersReport, part: &OrdersReport) {
    total.report.ok += part.report.ok;
    for (code, n) in &part.report.errors {
        *total.report.errors.entry(code.clone()).or_default() += n;
    }
    for (status, n) in &part.statuses {
        *total.statuses.entry(status.clone()).or_default() += n;
    }
    for (code, message) in &part.error_samples {
        total
            .error_samples
            .entry(code.clone())
            .or_insert_with(|| message.clone());
    }
}

fn status_name(status: i32) -> String {
    OrderStatus::try_from(status)
        .map(|s| s.as_str_name().to_owned())
        .unwrap_or_else(|_| format!("status {status}"))
}

/// Creates the users (one per worker), then runs the workload against `target`.
pub async fn run(target: &str, workload: &OrdersWorkload) -> anyhow::Result<OrdersReport> {
    let channel = load::connect(target).await?;
    let token = run_token();
    let mut users = Vec::new();
    let mut user_client = UserServiceClient::new(channel.clone());
    for worker in 0..workload.concurrency.max(1) {
        let user = user_client
            .create_user(CreateUserRequest {
                email: format!("bench-{token}-{worker}@example.com"),
                display_name: format!("bench worker {worker}"),
            })
            .await
            .with_context(|| format!("creating the user of worker {worker} at {target}"))?;
        users.push(user.into_inner().id);
    }
    let users: std::sync::Arc<[String]> = users.into();
    let orders = OrderServiceClient::new(channel);
    let report = drive(
        workload.concurrency,
        Duration::from_secs_f64(workload.warmup_s),
        Duration::from_secs_f64(workload.duration_s),
        move |worker, n| {
            let mut orders = orders.clone();
            let mut request = tonic::Request::new(order_request(
                &users[worker],
                format!("{token}-{worker}-{n}"),
            ));
            request.set_timeout(CALL_TIMEOUT);
            async move {
                let order = orders.create_order(request).await?.into_inner();
                Ok(status_name(order.status))
            }
        },
    )
    .await?;
    Ok(report)
}

/// One line per run for people; the JSON has everything.
pub fn summary(w: &OrdersWorkload, r: &OrdersReport) -> String {
    let ms = |us: u64| us as f64 / 1000.0;
    let mut line = format!(
        "concurrency {}: {:.1} calls/s",
        w.concurrency, r.report.per_second
    );
    if let Some(l) = &r.report.latency {
        line += &format!(
            ", p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            ms(l.p50_us),
            ms(l.p90_us),
            ms(l.p99_us),
            ms(l.max_us)
        );
    }
    let errors: u64 = r.report.errors.values().sum();
    line += &format!(", {} ok, {errors} errors", r.report.ok);
    for (status, n) in &r.statuses {
        line += &format!("\n  {status}: {n}");
    }
    for (code, n) in &r.report.errors {
        let sample = r.error_samples.get(code).map_or("", String::as_str);
        line += &format!("\n  error {code}: {n} (e.g. {sample:?})");
    }
    line
}

/// `minimesh bench orders`.
pub async fn command(args: OrdersArgs) -> anyhow::Result<()> {
    let mut runs = Vec::new();
    for &concurrency in &args.concurrency {
        let workload = OrdersWorkload {
            concurrency,
            duration_s: args.duration.as_secs_f64(),
            warmup_s: args.warmup.as_secs_f64(),
        };
        let report = run(&args.target, &workload).await?;
        println!("{}: {}", args.label, summary(&workload, &report));
        runs.push(serde_json::json!({"workload": workload, "report": report}));
    }
    if let Some(path) = &args.json {
        // The client's own CPU over every run (warm-ups and users included),
        // for bench/orders.sh's PROFILE=1 CPU breakdown.
        let client_cpu_s = crate::procstat::sample(std::process::id()).map(|s| s.cpu_seconds);
        let json = serde_json::json!({"label": args.label, "target": args.target,
            "client_cpu_s": client_cpu_s, "runs": runs});
        std::fs::write(path, serde_json::to_string_pretty(&json)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[test]
    fn the_order_stays_under_the_charge_limit_and_keys_differ() {
        let a = order_request("u1", "k1".into());
        let total: i64 = a
            .items
            .iter()
            .map(|i| i64::from(i.quantity) * i.unit_price_cents)
            .sum();
        assert!(total > 0 && total < 100_000, "{total}");
        assert_ne!(run_token(), run_token());
    }

    #[tokio::test]
    async fn errors_are_counted_by_code_and_statuses_by_name() {
        let report = drive(
            2,
            Duration::ZERO,
            Duration::from_millis(100),
            |_, n| async move {
                tokio::task::yield_now().await;
                match n % 3 {
                    0 => Err(tonic::Status::unavailable("store is down")),
                    1 => Err(tonic::Status::unavailable("store is down again")),
                    _ => Ok("ORDER_STATUS_PAID".to_owned()),
                }
            },
        )
        .await
        .unwrap();
        let unavailable = report.report.errors["Unavailable"];
        let paid = report.statuses["ORDER_STATUS_PAID"];
        assert_eq!(report.report.errors.len(), 1, "{:?}", report.report.errors);
        assert_eq!(report.error_samples["Unavailable"], "store is down");
        assert_eq!(paid, report.report.ok);
        // Two failures for every success, give or take the last round of each worker.
        assert!(
            paid > 10 && unavailable.abs_diff(2 * paid) <= 4,
            "{paid} {unavailable}"
        );
        let latency = report.report.latency.unwrap();
        assert!(latency.p50_us <= latency.p99_us && latency.p99_us <= latency.max_us);
    }

    #[tokio::test]
    async fn warm_up_calls_are_not_counted() {
        let calls = Arc::new(AtomicU64::new(0));
        let seen = calls.clone();
        let report = drive(
            1,
            Duration::from_millis(300),
            Duration::from_millis(100),
            move |_, _| {
                let seen = seen.clone();
                async move {
                    seen.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    Ok("ORDER_STATUS_PAID".to_owned())
                }
            },
        )
        .await
        .unwrap();
        let made = calls.load(Ordering::Relaxed);
        // About 60 warm-up calls and 20 measured ones (5 ms each); the
        // measured time leaves the warm-up out.
        assert!(report.report.ok >= 5, "{report:?}");
        assert!(
            made >= report.report.ok + 10,
            "{made} made, {} counted",
            report.report.ok
        );
        assert!(report.report.elapsed_s >= 0.1 && report.report.elapsed_s < 0.3);
    }

    #[tokio::test]
    async fn a_report_survives_json_with_its_percentiles() {
        let report = drive(
            1,
            Duration::ZERO,
            Duration::from_millis(50),
            |_, n| async move {
                tokio::time::sleep(Duration::from_micros(200 * (n % 5 + 1))).await;
                Ok("ORDER_STATUS_PAID".to_owned())
            },
        )
        .await
        .unwrap();
        let back: OrdersReport =
            serde_json::from_str(&serde_json::to_string(&report).unwrap()).unwrap();
        let (a, b) = (report.histogram().unwrap(), back.histogram().unwrap());
        assert_eq!(a.len(), b.len());
        assert_eq!(a.value_at_quantile(0.99), b.value_at_quantile(0.99));
        assert_eq!(back.report.ok, report.report.ok);
        assert_eq!(back.statuses, report.statuses);
    }
}
