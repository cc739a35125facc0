//! The load generator: unary calls at a fixed concurrency (closed loop) or a
//! fixed rate (open loop, latency measured from each call's intended start so
//! a stall is not hidden by coordinated omission), and server or
//! bidirectional streams counted in messages per second.

use futures::StreamExt as _;
use hdrhistogram::Histogram;
use minimesh_proto::order::v1::WatchOrderRequest;
use minimesh_proto::order::v1::order_service_client::OrderServiceClient;
use minimesh_proto::payment::v1::payment_service_client::PaymentServiceClient;
use minimesh_proto::payment::v1::{ChargeRequest, GetPaymentRequest};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};

/// The kind of call a load run makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Call {
    /// PaymentService/GetPayment, the id carrying the payload.
    Unary,
    /// OrderService/WatchOrder: the server streams events as fast as it can.
    ServerStream,
    /// PaymentService/ChargeStream: requests and results flow both ways.
    Bidi,
}

/// What a load run did, as recorded next to its report.
#[derive(Debug, Clone, Serialize)]
pub struct Workload {
    /// The kind of call.
    pub call: Call,
    /// Bytes of payload per message.
    pub payload: usize,
    /// Concurrent calls (unary) or streams.
    pub concurrency: usize,
    /// HTTP/2 connections the calls or streams are spread over.
    pub connections: usize,
    /// Calls per second for an open-loop unary run; None runs closed-loop.
    pub rate: Option<f64>,
    /// How long to run: the limit, or the cap when `count` is set.
    #[serde(with = "humantime_serde_shim")]
    pub duration: Duration,
    /// Stop after this many calls (unary) or messages received (streams).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
}

mod humantime_serde_shim {
    pub(super) fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }
}

/// Latency percentiles of the OK calls, microseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Latency {
    /// Mean.
    #[serde(default)]
    pub mean_us: f64,
    /// Median.
    pub p50_us: u64,
    /// 90th percentile.
    pub p90_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// 99.9th percentile.
    pub p999_us: u64,
    /// Slowest call.
    pub max_us: u64,
}

/// The outcome of a load run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Report {
    /// Successful calls (unary) or messages received (streams).
    pub ok: u64,
    /// Failed calls by gRPC status code name.
    pub errors: BTreeMap<String, u64>,
    /// Wall-clock seconds the run took.
    pub elapsed_s: f64,
    /// ok / elapsed.
    pub per_second: f64,
    /// Unary only.
    pub latency: Option<Latency>,
    /// The full latency histogram, for merging runs (not serialised).
    #[serde(skip)]
    pub histogram: Option<Histogram<u64>>,
}

/// Why a load run could not start.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The target is not a valid URI.
    #[error("invalid target {0}: {1}")]
    Target(String, tonic::transport::Error),
    /// No connection to the target.
    #[error("cannot connect to {0}: {1}")]
    Connect(String, tonic::transport::Error),
    /// The latency histogram could not be made or recorded into.
    #[error("histogram: {0}")]
    Histogram(String),
}

pub(crate) fn histogram() -> Result<Histogram<u64>, LoadError> {
    Histogram::new_with_bounds(1, 60_000_000, 3).map_err(|e| LoadError::Histogram(e.to_string()))
}

impl Report {
    pub(crate) fn finish(mut self, elapsed: Duration) -> Self {
        self.elapsed_s = elapsed.as_secs_f64();
        self.per_second = if self.elapsed_s > 0.0 {
            self.ok as f64 / self.elapsed_s
        } else {
            0.0
        };
        if let Some(h) = &self.histogram
            && !h.is_empty()
        {
            self.latency = Some(Latency {
                mean_us: h.mean(),
                p50_us: h.value_at_quantile(0.50),
                p90_us: h.value_at_quantile(0.90),
                p99_us: h.value_at_quantile(0.99),
                p999_us: h.value_at_quantile(0.999),
                max_us: h.max(),
            });
        }
        self
    }

    /// Folds another run of the same workload into this one, run after it.
    pub fn merge(&mut self, other: &Report) {
        self.add_counts(other);
        let elapsed = self.elapsed_s + other.elapsed_s;
        *self = std::mem::take(self).finish(Duration::from_secs_f64(elapsed));
    }

    /// Adds another run's calls, errors and latencies (not its time).
    fn add_counts(&mut self, other: &Report) {
        self.ok += other.ok;
        for (code, n) in &other.errors {
            *self.errors.entry(code.clone()).or_default() += n;
        }
        match (&mut self.histogram, &other.histogram) {
            (Some(mine), Some(theirs)) => {
                let _ = mine.add(theirs);
            }
            (None, Some(theirs)) => self.histogram = Some(theirs.clone()),
            _ => {}
        }
    }
}

pub(crate) async fn connect(target: &str) -> Result<Channel, LoadError> {
    let endpoint = Endpoint::from_shared(target.to_owned())
        .map_err(|e| LoadError::Target(target.to_owned(), e))?;
    endpoint
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| LoadError::Connect(target.to_owned(), e))
}

/// The status code, with the start of its message so odd failures can be told apart.
fn code_name(status: &tonic::Status) -> String {
    let message: String = status.message().chars().take(60).collect();
    if message.is_empty() {
        format!("{:?}", status.code())
    } else {
        format!("{:?}: {message}", status.code())
    }
}

/// Runs `workload` against `target` (http://host:port), its calls or
/// streams spread evenly over `workload.connections` connections.
pub async fn run(target: &str, workload: &Workload) -> Result<Report, LoadError> {
    let connections = workload.connections.clamp(1, workload.concurrency.max(1));
    if connections == 1 {
        return run_on(connect(target).await?, workload).await;
    }
    let mut parts = Vec::new();
    for i in 0..connections {
        let share = Workload {
            concurrency: workload.concurrency / connections
                + usize::from(i < workload.concurrency % connections),
            connections: 1,
            count: workload
                .count
                .map(|n| n / connections as u64 + u64::from((i as u64) < n % connections as u64)),
            ..workload.clone()
        };
        let channel = connect(target).await?;
        parts.push(tokio::spawn(async move { run_on(channel, &share).await }));
    }
    let mut total = Report::default();
    let mut elapsed: f64 = 0.0;
    for part in parts {
        let Ok(part) = part.await else { continue };
        let part = part?;
        elapsed = elapsed.max(part.elapsed_s);
        total.add_counts(&part);
    }
    // The connections ran side by side: the run took as long as the slowest.
    Ok(total.finish(Duration::from_secs_f64(elapsed)))
}

async fn run_on(channel: Channel, workload: &Workload) -> Result<Report, LoadError> {
    match workload.call {
        Call::Unary => match workload.rate {
            Some(rate) => open_loop(channel, workload, rate).await,
            None => closed_loop(channel, workload).await,
        },
        Call::ServerStream => server_streams(channel, workload).await,
        Call::Bidi => bidi_streams(channel, workload).await,
    }
}

async fn closed_loop(channel: Channel, workload: &Workload) -> Result<Report, LoadError> {
    let request = GetPaymentRequest {
        id: "x".repeat(workload.payload),
    };
    let started = Instant::now();
    let deadline = started + workload.duration;
    let issued = Arc::new(AtomicU64::new(0));
    let count = workload.count;
    let mut tasks = Vec::new();
    for _ in 0..workload.concurrency.max(1) {
        let mut client =
            PaymentServiceClient::new(channel.clone()).max_decoding_message_size(usize::MAX);
        let request = request.clone();
        let issued = issued.clone();
        let mut report = Report {
            histogram: Some(histogram()?),
            ..Report::default()
        };
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline
                && count.is_none_or(|n| issued.fetch_add(1, Ordering::Relaxed) < n)
            {
                let call = Instant::now();
                match client.get_payment(request.clone()).await {
                    Ok(_) => {
                        report.ok += 1;
                        if let Some(h) = report.histogram.as_mut() {
                            let _ = h.record(call.elapsed().as_micros().max(1) as u64);
                        }
                    }
                    Err(status) => *report.errors.entry(code_name(&status)).or_default() += 1,
                }
            }
            report
        }));
    }
    let mut total = Report {
        histogram: Some(histogram()?),
        ..Report::default()
    };
    for task in tasks {
        if let Ok(report) = task.await {
            total.ok += report.ok;
            for (code, n) in report.errors {
                *total.errors.entry(code).or_default() += n;
            }
            if let (Some(mine), Some(theirs)) =
                (total.histogram.as_mut(), report.histogram.as_ref())
            {
                let _ = mine.add(theirs);
            }
        }
    }
    Ok(total.finish(started.elapsed()))
}

/// Calls are started on a fixed schedule whatever the responses do; each
/// call's latency counts from when it should have started.
async fn open_loop(channel: Channel, workload: &Workload, rate: f64) -> Result<Report, LoadError> {
    const MAX_IN_FLIGHT: usize = 10_000;
    let request = GetPaymentRequest {
        id: "x".repeat(workload.payload),
    };
    let period = Duration::from_secs_f64(1.0 / rate.max(0.001));
    let started = std::time::Instant::now();
    let deadline = started + workload.duration;
    let shared = Arc::new(std::sync::Mutex::new(Report {
        histogram: Some(histogram()?),
        ..Report::default()
    }));
    let in_flight = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
    let mut handles = Vec::new();
    // Tokio's timers tick in whole milliseconds, which would add up to a
    // millisecond of the generator's own lateness to every call; a thread
    // sleeping with nanosleep keeps the schedule to tens of microseconds.
    let (schedule, mut due) = tokio::sync::mpsc::unbounded_channel::<std::time::Instant>();
    let count = workload.count;
    let pacer = std::thread::spawn(move || {
        let mut n: u32 = 0;
        loop {
            let intended = started + period * n;
            if intended >= deadline || count.is_some_and(|count| u64::from(n) >= count) {
                break;
            }
            let now = std::time::Instant::now();
            if intended > now {
                std::thread::sleep(intended - now);
            }
            if schedule.send(intended).is_err() {
                break;
            }
            n += 1;
        }
    });
    while let Some(intended) = due.recv().await {
        let Ok(permit) = in_flight.clone().try_acquire_owned() else {
            // The target is so far behind that the client would only queue: count it.
            *shared
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .errors
                .entry("ClientSaturated".into())
                .or_default() += 1;
            continue;
        };
        let mut client = PaymentServiceClient::new(channel.clone());
        let request = request.clone();
        let shared = shared.clone();
        handles.push(tokio::spawn(async move {
            let result = client.get_payment(request).await;
            let latency = intended.elapsed();
            let mut report = shared.lock().unwrap_or_else(|p| p.into_inner());
            match result {
                Ok(_) => {
                    report.ok += 1;
                    if let Some(h) = report.histogram.as_mut() {
                        let _ = h.record(latency.as_micros().max(1) as u64);
                    }
                }
                Err(status) => *report.errors.entry(code_name(&status)).or_default() += 1,
            }
            drop(permit);
        }));
    }
    // The schedule has ended (its sender is gone), so this does not block.
    let _ = pacer.join();
    for handle in handles {
        let _ = handle.await;
    }
    let report = std::mem::take(&mut *shared.lock().unwrap_or_else(|p| p.into_inner()));
    Ok(report.finish(started.elapsed()))
}

/// Runs `workload.concurrency` streams made by `open_stream`, each given the
/// shared count of messages received and the workload's deadline, and
/// returning how it failed, if it did; reports the messages received.
async fn run_streams<F, Fut>(workload: &Workload, open_stream: F) -> Report
where
    F: Fn(Arc<AtomicU64>, Instant) -> Fut,
    Fut: std::future::Future<Output = Option<String>> + Send + 'static,
{
    let received = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + workload.duration;
    let tasks: Vec<_> = (0..workload.concurrency.max(1))
        .map(|_| tokio::spawn(open_stream(received.clone(), deadline)))
        .collect();
    let mut report = Report::default();
    for task in tasks {
        if let Ok(Some(error)) = task.await {
            *report.errors.entry(error).or_default() += 1;
        }
    }
    report.ok = received.load(Ordering::Relaxed);
    report.finish(started.elapsed())
}

/// How long a stream may take to finish after its workload's end.
const STREAM_GRACE: Duration = Duration::from_secs(2);

async fn server_streams(channel: Channel, workload: &Workload) -> Result<Report, LoadError> {
    let count = workload.count;
    let report = run_streams(workload, |received, deadline| {
        let mut client =
            OrderServiceClient::new(channel.clone()).max_decoding_message_size(usize::MAX);
        let id = "x".repeat(workload.payload);
        async move {
            let mut stream = match client.watch_order(WatchOrderRequest { id }).await {
                Ok(response) => response.into_inner(),
                Err(status) => return Some(code_name(&status)),
            };
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(deadline) => return None,
                    next = stream.message() => match next {
                        Ok(Some(_)) => {
                            let seen = received.fetch_add(1, Ordering::Relaxed) + 1;
                            if count.is_some_and(|n| seen >= n) {
                                return None;
                            }
                        }
                        Ok(None) => return Some("Ended".to_owned()),
                        Err(status) => return Some(code_name(&status)),
                    },
                }
            }
        }
    })
    .await;
    Ok(report)
}

async fn bidi_streams(channel: Channel, workload: &Workload) -> Result<Report, LoadError> {
    let count = workload.count;
    let report = run_streams(workload, |received, deadline| {
        let mut client =
            PaymentServiceClient::new(channel.clone()).max_decoding_message_size(usize::MAX);
        let message = ChargeRequest {
            order_id: "x".repeat(workload.payload),
            ..Default::default()
        };
        async move {
            // Requests are produced until the deadline (or until enough results
            // came back); flow control paces them.
            let produced = received.clone();
            let requests = futures::stream::repeat(message).take_while(move |_| {
                std::future::ready(
                    Instant::now() < deadline
                        && count.is_none_or(|n| produced.load(Ordering::Relaxed) < n),
                )
            });
            let mut results = match client.charge_stream(requests).await {
                Ok(response) => response.into_inner(),
                Err(status) => return Some(code_name(&status)),
            };
            // Results still in flight after the requests stop get a grace
            // period; a path that never ends the stream is reported, not waited on.
            let give_up = deadline + STREAM_GRACE;
            loop {
                match tokio::time::timeout_at(give_up, results.message()).await {
                    Ok(Ok(Some(_))) => {
                        received.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Ok(None)) => return None,
                    Ok(Err(status)) => return Some(code_name(&status)),
                    Err(_) => return Some("StreamNotEnded".to_owned()),
                }
            }
        }
    })
    .await;
    Ok(report)
}
