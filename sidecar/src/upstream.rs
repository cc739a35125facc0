//! One upstream service as the proxy sees it: its endpoints (from discovery),
//! the choice among them (P2C over peak-EWMA), their health (ejection), and
//! the retry loop with its budget and the call's deadline.

use crate::body::{Code, ProxyBody, boxed, grpc_error};
use crate::client::{Connection, Transport};
use crate::metrics::Metrics;
use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, Uri, Version};
use http_body::Body;
use http_body_util::BodyExt;
use minimesh_traffic::balance::{PeakEwma, p2c};
use minimesh_traffic::deadline::Deadline;
use minimesh_traffic::discover::Endpoints;
use minimesh_traffic::eject::{Admission, EjectionPolicy, Health};
use minimesh_traffic::retry::{self, MethodKinds, RetryBudget, RetryPolicy};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::Instrument;

#[derive(Debug, Clone)]
pub struct TrafficPolicy {
    pub connect_timeout: Duration,
    /// Longest wait for response headers from one attempt.
    pub per_try_timeout: Option<Duration>,
    pub retry: RetryPolicy,
    pub ejection: EjectionPolicy,
    pub default_rtt: Duration,
    /// How fast a latency peak is forgotten. Short enough that one scheduling
    /// hiccup does not sideline an endpoint for seconds (with 10 s, three equal
    /// replicas drifted up to ±15% apart over 3000 calls; with 1 s, ±5%), while
    /// a persistently slow endpoint is re-penalised by every slow sample.
    pub ewma_decay: Duration,
}

impl Default for TrafficPolicy {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(1),
            per_try_timeout: None,
            retry: RetryPolicy::default(),
            ejection: EjectionPolicy::default(),
            default_rtt: Duration::from_millis(30),
            ewma_decay: Duration::from_secs(1),
        }
    }
}

struct EndpointState {
    health: Health,
    ewma: PeakEwma,
}

pub struct Endpoint {
    conn: Connection,
    state: Mutex<EndpointState>,
    in_flight: AtomicUsize,
}

impl Endpoint {
    pub fn addr(&self) -> SocketAddr {
        self.conn.addr()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, EndpointState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub struct Upstream {
    name: String,
    direction: &'static str,
    transport: Transport,
    policy: TrafficPolicy,
    endpoints: RwLock<Vec<Arc<Endpoint>>>,
    budget: RetryBudget,
    kinds: Arc<MethodKinds>,
    metrics: Arc<Metrics>,
}

/// What became of one call, for the caller's span and logs.
#[derive(Debug, Default, Clone)]
pub struct CallReport {
    pub attempts: u32,
    pub endpoint: Option<SocketAddr>,
}

enum Payload {
    /// The whole request, small enough to send again.
    Replay(Bytes),
    /// A stream (or a large message) that can be sent once.
    Once(Option<ProxyBody>),
}

impl Upstream {
    /// Creates the upstream and keeps its endpoints in step with `endpoints`.
    pub fn new(
        name: &str,
        direction: &'static str,
        transport: Transport,
        policy: TrafficPolicy,
        mut endpoints: watch::Receiver<Endpoints>,
        kinds: Arc<MethodKinds>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        let upstream = Arc::new(Self {
            name: name.to_owned(),
            direction,
            transport,
            budget: policy.retry.budget(),
            policy,
            endpoints: RwLock::new(Vec::new()),
            kinds,
            metrics,
        });
        upstream.reconcile(&endpoints.borrow_and_update());
        let weak = Arc::downgrade(&upstream);
        tokio::spawn(async move {
            while endpoints.changed().await.is_ok() {
                let Some(upstream) = weak.upgrade() else {
                    return;
                };
                upstream.reconcile(&endpoints.borrow_and_update());
            }
        });
        upstream
    }

    /// Adds new endpoints and forgets vanished ones; calls in flight on a
    /// vanished endpoint keep it (and its connection) alive until they end.
    fn reconcile(&self, wanted: &Endpoints) {
        let mut endpoints = self.endpoints.write().unwrap_or_else(|p| p.into_inner());
        endpoints.retain(|e| wanted.contains(&e.addr()));
        for addr in wanted {
            if endpoints.iter().any(|e| e.addr() == *addr) {
                continue;
            }
            let now = Instant::now();
            endpoints.push(Arc::new(Endpoint {
                conn: Connection::new(
                    *addr,
                    self.transport.clone(),
                    self.policy.connect_timeout,
                    self.metrics.clone(),
                ),
                state: Mutex::new(EndpointState {
                    health: Health::default(),
                    ewma: PeakEwma::new(self.policy.default_rtt, self.policy.ewma_decay, now),
                }),
                in_flight: AtomicUsize::new(0),
            }));
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn endpoint_count(&self) -> usize {
        self.endpoints
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    /// Chooses an endpoint, avoiding `avoid` when another is available.
    fn pick(&self, avoid: &[SocketAddr]) -> Option<Arc<Endpoint>> {
        let endpoints = self
            .endpoints
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let now = Instant::now();
        let open: Vec<usize> = (0..endpoints.len())
            .filter(|&i| endpoints[i].state().health.is_open())
            .collect();
        let fresh: Vec<usize> = open
            .iter()
            .copied()
            .filter(|&i| !avoid.contains(&endpoints[i].addr()))
            .collect();
        let candidates = if fresh.is_empty() { &open } else { &fresh };
        let mut rng = rand::rng();
        if let Some(i) = p2c(
            candidates,
            |i| {
                let e = &endpoints[i];
                e.state()
                    .ewma
                    .cost(e.in_flight.load(Ordering::Relaxed), now)
            },
            &mut rng,
        ) {
            return Some(endpoints[i].clone());
        }
        // Everything is ejected: an endpoint whose back-off is over gets this call as its probe.
        endpoints
            .iter()
            .find(|e| e.state().health.admit(now, &self.policy.ejection) == Admission::Probe)
            .cloned()
    }

    fn record(&self, endpoint: &Endpoint, outcome: Result<Duration, ()>) {
        let mut state = endpoint.state();
        let now = Instant::now();
        match outcome {
            Ok(rtt) => {
                state.health.success();
                state.ewma.observe(rtt, now);
            }
            Err(()) => {
                if state
                    .health
                    .failure(now, &self.policy.ejection, &mut rand::rng())
                {
                    tracing::warn!(upstream = %self.name, endpoint = %endpoint.addr(), until = ?state.health.ejected_until(), "endpoint ejected");
                    self.metrics.ejection(self.direction, &self.name);
                }
            }
        }
    }

    /// Sends `request` to one of the endpoints, retrying where that is safe.
    pub async fn call(
        &self,
        request: Request<ProxyBody>,
        deadline: Option<Deadline>,
        report: &mut CallReport,
    ) -> Response<ProxyBody> {
        self.budget.deposit();
        let (parts, body) = request.into_parts();
        let path = parts.uri.path().to_owned();
        let mut payload = if self.kinds.replayable(&path) {
            match buffer(body, retry::MAX_REPLAY_BYTES).await {
                Ok(Buffered::Whole(bytes)) => Payload::Replay(bytes),
                Ok(Buffered::Partial(body)) => Payload::Once(Some(body)),
                Err(err) => {
                    return grpc_error(
                        Code::Unavailable,
                        &format!("reading the request failed: {err}"),
                        false,
                    );
                }
            }
        } else {
            Payload::Once(Some(body))
        };
        let (method, uri, version, headers) =
            (parts.method, parts.uri, parts.version, parts.headers);
        let mut tried: Vec<SocketAddr> = Vec::new();
        let max_attempts = self.policy.retry.max_attempts.max(1);
        let mut last_error = String::from("no attempt made");
        for attempt in 1..=max_attempts {
            if deadline.is_some_and(|d| d.expired()) {
                return grpc_error(
                    Code::DeadlineExceeded,
                    &format!("deadline exceeded calling {}", self.name),
                    false,
                );
            }
            let Some(endpoint) = self.pick(&tried) else {
                let all = self.endpoint_count();
                let message = if all == 0 {
                    format!("no endpoints known for upstream {}", self.name)
                } else {
                    format!(
                        "all {all} endpoints of upstream {} are ejected after repeated failures",
                        self.name
                    )
                };
                return grpc_error(Code::Unavailable, &message, true);
            };
            report.attempts = attempt;
            report.endpoint = Some(endpoint.addr());
            let body = match &mut payload {
                Payload::Replay(bytes) => boxed(http_body_util::Full::new(bytes.clone())),
                Payload::Once(body) => match body.take() {
                    Some(body) => body,
                    None => break,
                },
            };
            // Each attempt is its own span, so retries show as separate tries.
            let attempt_span = tracing::info_span!("proxy.attempt", otel.name = %format!("{} attempt {attempt}", path.trim_start_matches('/')),
                otel.kind = "client", attempt, server.address = %endpoint.addr());
            let mut request = build_request(&method, &uri, version, &headers, body, deadline);
            minimesh_runtime::trace::inject_trace(&attempt_span, request.headers_mut());
            let started = Instant::now();
            endpoint.in_flight.fetch_add(1, Ordering::Relaxed);
            let wait = match (self.policy.per_try_timeout, deadline) {
                (Some(per_try), Some(d)) => Some(per_try.min(d.remaining())),
                (Some(per_try), None) => Some(per_try),
                (None, Some(d)) => Some(d.remaining()),
                (None, None) => None,
            };
            let send = endpoint.conn.send(request).instrument(attempt_span);
            let sent = match wait {
                Some(wait) => tokio::time::timeout(wait, send).await,
                None => Ok(send.await),
            };
            endpoint.in_flight.fetch_sub(1, Ordering::Relaxed);
            let retryable = match sent {
                Err(_elapsed) => {
                    let expired = deadline.is_some_and(|d| d.expired());
                    let what = if expired {
                        "deadline"
                    } else {
                        "per-try timeout"
                    };
                    return grpc_error(
                        Code::DeadlineExceeded,
                        &format!(
                            "{what} exceeded waiting for {} at {}",
                            self.name,
                            endpoint.addr()
                        ),
                        false,
                    );
                }
                Ok(Ok(response)) => {
                    if retry::classify_response(response.headers()).is_some() {
                        self.record(&endpoint, Err(()));
                        last_error = format!(
                            "{} at {} could not reach its application",
                            self.name,
                            endpoint.addr()
                        );
                        true
                    } else {
                        self.record(&endpoint, Ok(started.elapsed()));
                        return response.map(boxed);
                    }
                }
                Ok(Err((err, unsent))) => {
                    self.record(&endpoint, Err(()));
                    last_error = err.to_string();
                    if let (Some(unsent), Payload::Once(slot)) = (unsent, &mut payload) {
                        // Never sent: the stream can still go elsewhere.
                        *slot = Some(unsent.into_body());
                    }
                    if !err.never_sent() {
                        return grpc_error(Code::Unavailable, &last_error, false);
                    }
                    true
                }
            };
            tried.push(endpoint.addr());
            let can_resend = match &payload {
                Payload::Replay(_) => true,
                Payload::Once(body) => body.is_some(),
            };
            if !retryable || !can_resend || attempt == max_attempts {
                break;
            }
            if !self.budget.withdraw() {
                tracing::debug!(upstream = %self.name, "retry budget exhausted");
                last_error = format!("{last_error} (retry budget exhausted)");
                break;
            }
            self.metrics.retry(self.direction, &self.name);
            let pause = self.policy.retry.backoff(attempt, &mut rand::rng());
            tokio::time::sleep(pause).await;
        }
        grpc_error(Code::Unavailable, &last_error, true)
    }
}

fn build_request(
    method: &Method,
    uri: &Uri,
    version: Version,
    headers: &HeaderMap,
    body: ProxyBody,
    deadline: Option<Deadline>,
) -> Request<ProxyBody> {
    let mut request = Request::new(body);
    *request.method_mut() = method.clone();
    *request.uri_mut() = uri.clone();
    *request.version_mut() = version;
    *request.headers_mut() = headers.clone();
    if let Some(deadline) = deadline {
        deadline.propagate(request.headers_mut());
    }
    request
}

enum Buffered {
    Whole(Bytes),
    /// Larger than the limit: what was read, followed by the rest.
    Partial(ProxyBody),
}

/// Reads a request body whole if it ends within `limit` bytes.
async fn buffer(mut body: ProxyBody, limit: usize) -> Result<Buffered, crate::body::BoxError> {
    let mut chunks: VecDeque<Bytes> = VecDeque::new();
    let mut size = 0;
    while let Some(frame) = body.frame().await {
        let frame = frame?;
        if let Ok(data) = frame.into_data() {
            size += data.len();
            chunks.push_back(data);
            if size > limit {
                return Ok(Buffered::Partial(boxed(Prefixed {
                    prefix: chunks,
                    rest: body,
                })));
            }
        }
        // Request trailers do not occur in gRPC; anything else is dropped.
    }
    let mut whole = bytes::BytesMut::with_capacity(size);
    for chunk in chunks {
        whole.extend_from_slice(&chunk);
    }
    Ok(Buffered::Whole(whole.freeze()))
}

pin_project_lite::pin_project! {
    /// Already-read chunks, then the rest of the original body.
    struct Prefixed {
        prefix: VecDeque<Bytes>,
        #[pin]
        rest: ProxyBody,
    }
}

impl Body for Prefixed {
    type Data = Bytes;
    type Error = crate::body::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let this = self.project();
        if let Some(chunk) = this.prefix.pop_front() {
            return Poll::Ready(Some(Ok(http_body::Frame::data(chunk))));
        }
        this.rest.poll_frame(cx)
    }
}
