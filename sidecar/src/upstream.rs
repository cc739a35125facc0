//! One upstream service as the proxy sees it: its endpoints (from discovery),
//! the choice among them (P2C over peak-EWMA), their health (ejection), and
//! the retry loop with its budget and the call's deadline.

use crate::body::{Code, ProxyBody, boxed, grpc_error};
use crate::client::{Connection, Transport};
use crate::metrics::Metrics;
use crate::window::Windows;
use http::{HeaderMap, Method, Request, Response, Uri, Version};
use minimesh_traffic::deadline::Deadline;
use minimesh_traffic::discover::Endpoints;
use minimesh_traffic::eject::{EjectionPolicy, Transition};
use minimesh_traffic::endpoint::{EjectionCap, EndpointPolicy, EndpointState, Outcome, choose};
use minimesh_traffic::replay::ReplayBody;
use minimesh_traffic::retry::{self, RetryBudget, RetryPolicy};
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::Instrument;

/// How calls to one upstream are sent: timeouts, retries, ejection, balancing.
#[derive(Debug, Clone)]
pub struct TrafficPolicy {
    /// TCP and TLS connect timeout.
    pub connect_timeout: Duration,
    /// Longest wait for response headers from one attempt.
    pub per_try_timeout: Option<Duration>,
    /// When and how often to retry.
    pub retry: RetryPolicy,
    /// When an endpoint is ejected, and for how long.
    pub ejection: EjectionPolicy,
    /// The latency assumed of an endpoint before its first answer (P2C).
    pub default_rtt: Duration,
    /// How fast a latency peak is forgotten. Short enough that one scheduling
    /// hiccup does not sideline an endpoint for seconds (with 10 s, three equal
    /// replicas drifted up to ±15% apart over 3000 calls; with 1 s, ±5%), while
    /// a persistently slow endpoint is re-penalised by every slow sample.
    pub ewma_decay: Duration,
    /// HTTP/2 windows of the connections to its endpoints (`--stream-window`,
    /// `--connection-window`).
    pub windows: Windows,
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
            windows: Windows::default(),
        }
    }
}

/// One endpoint of an upstream: its connection and its health books.
pub struct Endpoint {
    conn: Connection,
    state: Arc<EndpointState>,
}

impl Endpoint {
    /// The endpoint's address.
    pub fn addr(&self) -> SocketAddr {
        self.conn.addr()
    }
}

/// One upstream: its endpoints, kept in step with discovery, and the traffic policy.
pub struct Upstream {
    name: String,
    direction: &'static str,
    transport: Transport,
    policy: TrafficPolicy,
    endpoint_policy: Arc<EndpointPolicy>,
    cap: Arc<EjectionCap>,
    endpoints: RwLock<Vec<Arc<Endpoint>>>,
    budget: RetryBudget,
    metrics: Arc<Metrics>,
}

/// What became of one call, for the caller's span and logs.
#[derive(Debug, Default, Clone)]
pub struct CallReport {
    /// Attempts made, the first included.
    pub attempts: u32,
    /// The endpoint of the last attempt, if one was chosen.
    pub endpoint: Option<SocketAddr>,
}

impl Upstream {
    /// Creates the upstream and keeps its endpoints in step with `endpoints`.
    pub fn new(
        name: &str,
        direction: &'static str,
        transport: Transport,
        policy: TrafficPolicy,
        mut endpoints: watch::Receiver<Endpoints>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        let upstream = Arc::new(Self {
            name: name.to_owned(),
            direction,
            transport,
            budget: policy.retry.budget(),
            endpoint_policy: Arc::new(EndpointPolicy {
                default_rtt: policy.default_rtt,
                decay: policy.ewma_decay,
                ejection: policy.ejection.clone(),
            }),
            cap: EjectionCap::new(policy.ejection.max_ejection_percent),
            policy,
            endpoints: RwLock::new(Vec::new()),
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
            let (name, direction, metrics, addr) = (
                self.name.clone(),
                self.direction,
                self.metrics.clone(),
                *addr,
            );
            let observer = move |transition: Transition| match transition {
                Transition::Ejected { backoff } => {
                    tracing::warn!(upstream = %name, endpoint = %addr, backoff_ms = backoff.as_millis() as u64, "endpoint ejected");
                    metrics.ejection(direction, &name);
                }
                Transition::ProbeCancelled { backoff } => {
                    tracing::info!(upstream = %name, endpoint = %addr, backoff_ms = backoff.as_millis() as u64, "probe cancelled; endpoint stays ejected");
                }
                Transition::Restored => {
                    tracing::info!(upstream = %name, endpoint = %addr, "endpoint back in rotation");
                }
                Transition::None => {}
            };
            let state = EndpointState::new(
                self.endpoint_policy.clone(),
                self.cap.clone(),
                Instant::now(),
            )
            .with_observer(observer);
            endpoints.push(Arc::new(Endpoint {
                conn: Connection::new(
                    addr,
                    self.transport.clone(),
                    self.policy.connect_timeout,
                    self.policy.windows,
                    self.metrics.clone(),
                ),
                state: Arc::new(state),
            }));
        }
        self.cap.set_total(endpoints.len());
    }

    /// The upstream's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// How many endpoints discovery knows now.
    pub fn endpoint_count(&self) -> usize {
        self.endpoints
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    /// Chooses an endpoint: a due probe first, else P2C, avoiding `avoid`
    /// (strictly when `strict`, else only while another is available).
    fn pick(&self, avoid: &[SocketAddr], strict: bool) -> Option<(Arc<Endpoint>, bool)> {
        let endpoints = self
            .endpoints
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let choice = choose(
            &endpoints,
            |e| &e.state,
            |e| avoid.contains(&e.addr()),
            strict,
            Instant::now(),
            &mut rand::rng(),
        )?;
        Some((endpoints[choice.index].clone(), choice.probe))
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
        // Sent as it is read, with a copy kept for a retry while one is possible.
        let (first, replay) = ReplayBody::new(body, retry::MAX_REPLAY_BYTES);
        let mut next_body = Some(first);
        let (method, uri, version, headers) =
            (parts.method, parts.uri, parts.version, parts.headers);
        let mut tried: Vec<SocketAddr> = Vec::new();
        let max_attempts = self.policy.retry.max_attempts.max(1);
        let mut last_error = String::from("no attempt made");
        let mut last_code = Code::Unavailable;
        // A retry goes to another endpoint or nowhere: hammering one that
        // just failed (or timed out) helps nobody. Only a lone endpoint is
        // tried again after a failure, since a fresh connection may work.
        let mut need_fresh = false;
        // A timed-out attempt may have reached an application: then no
        // error of this call may tell the caller it is safe to retry.
        let mut maybe_delivered = false;
        for attempt in 1..=max_attempts {
            if deadline.is_some_and(|d| d.expired()) {
                return grpc_error(
                    Code::DeadlineExceeded,
                    &format!("deadline exceeded calling {}", self.name),
                    false,
                );
            }
            let strict = need_fresh || self.endpoint_count() > 1;
            let Some((endpoint, probe)) = self.pick(&tried, strict) else {
                if !tried.is_empty() {
                    return grpc_error(
                        last_code,
                        &format!("{last_error}; no other endpoint to try"),
                        last_code == Code::Unavailable && !maybe_delivered,
                    );
                }
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
            let Some(body) = next_body.take().or_else(|| replay.replay()) else {
                break;
            };
            let body = boxed(body);
            // Each attempt is its own span, so retries show as separate tries; made only
            // when exported: unseen, one cost ~4,500 instructions a call (BENCHMARKS.md).
            let attempt_span = if minimesh_telemetry::telemetry::exporting() {
                tracing::info_span!("proxy.attempt", otel.name = %format!("{} attempt {attempt}", uri.path().trim_start_matches('/')),
                    otel.kind = "client", attempt, probe, server.address = %endpoint.addr())
            } else {
                tracing::Span::none()
            };
            let mut request = build_request(&method, &uri, version, &headers, body, deadline);
            minimesh_telemetry::trace::inject_trace(&attempt_span, request.headers_mut());
            let per_try = match (self.policy.per_try_timeout, deadline) {
                (Some(per_try), Some(d)) if per_try < d.remaining() => Some(per_try),
                (Some(per_try), None) => Some(per_try),
                _ => None,
            };
            let wait = per_try.or(deadline.map(|d| d.remaining()));
            // The guard takes the attempt off the endpoint's books however
            // it ends, also when this future is dropped (the caller left).
            let tracked = endpoint
                .state
                .start(probe, Instant::now())
                .with_deadline(deadline.map(|d| Instant::now() + d.remaining()));
            let send = endpoint.conn.send(request).instrument(attempt_span);
            let sent = match wait {
                Some(wait) => tokio::time::timeout(wait, send).await,
                None => Ok(send.await),
            };
            let retryable = match sent {
                Err(_elapsed) => {
                    tracked.finish(Outcome::Timeout);
                    let what = if per_try.is_some() {
                        "per-try timeout"
                    } else {
                        "deadline"
                    };
                    last_error = format!(
                        "{what} exceeded waiting for {} at {}",
                        self.name,
                        endpoint.addr()
                    );
                    last_code = Code::DeadlineExceeded;
                    // Only a request read whole (and kept) may go elsewhere,
                    // and only when its own deadline has time left.
                    let time_left = !deadline.is_some_and(|d| d.expired());
                    if per_try.is_none() || !time_left || !replay.is_complete() {
                        return grpc_error(Code::DeadlineExceeded, &last_error, false);
                    }
                    need_fresh = true;
                    maybe_delivered = true;
                    true
                }
                Ok(Ok(response)) => match retry::classify_response(response.headers()) {
                    Some(retry::Failure::PeerBusy) => {
                        // Full, not failing: no step towards ejection.
                        tracked.finish(Outcome::Busy);
                        let said = minimesh_telemetry::status::grpc_message(response.headers());
                        last_error = format!(
                            "{} at {}: {}",
                            self.name,
                            endpoint.addr(),
                            said.as_deref().unwrap_or("as many calls open as it allows")
                        );
                        last_code = Code::ResourceExhausted;
                        true
                    }
                    Some(_) => {
                        tracked.finish(Outcome::Failure);
                        last_error = format!(
                            "{} at {} could not reach its application",
                            self.name,
                            endpoint.addr()
                        );
                        last_code = Code::Unavailable;
                        true
                    }
                    None => {
                        tracked.finish(Outcome::Success);
                        return response.map(boxed);
                    }
                },
                Ok(Err((err, _unsent))) => {
                    tracked.finish(Outcome::Failure);
                    last_error = err.to_string();
                    last_code = Code::Unavailable;
                    if !err.never_sent() {
                        return grpc_error(Code::Unavailable, &last_error, false);
                    }
                    true
                }
            };
            tried.push(endpoint.addr());
            if !retryable || attempt == max_attempts {
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
        grpc_error(
            last_code,
            &last_error,
            last_code == Code::Unavailable && !maybe_delivered,
        )
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
