//! What the proxy does with each call:
//!
//! - inbound (mTLS): identity → authorization → forward to the local
//!   application over h2c;
//! - outbound (h2c, loopback) and the gateway (h2c, edge): route by
//!   `:authority` or path prefix → upstream over mTLS.
//!
//! Every call gets a span (continuing the caller's W3C trace context and
//! passing its own on) and is counted in the metrics when its response ends.

use crate::authz::{AllowList, denial};
use crate::body::{Code, ProxyBody, boxed, grpc_error};
use crate::client::Connection;
use crate::listener::CallGuard;
use crate::metrics::{CallName, INBOUND, Metrics, OUTBOUND};
use crate::route::{Routes, Via};
use crate::stall::StallWatch;
use crate::upstream::{CallReport, Upstream};
use http::{Request, Response};
use hyper::body::Incoming;
use minimesh_spiffe::SpiffeId;
use minimesh_telemetry::status::{StatusBody, grpc_message, grpc_status, on_end};
use minimesh_telemetry::trace::{continue_trace, inject_trace, record_ids, record_status};
use prometheus_client::metrics::gauge::Gauge;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tracing::{Instrument, Span, field::Empty};

#[derive(Debug, Clone, Copy)]
pub(crate) enum SpanKind {
    Server,
    Client,
}

fn proxy_span(kind: SpanKind, role: &'static str, path: &str) -> Span {
    // Without an exporter a call's span would only feed log lines, at a cost
    // per call (BENCHMARKS.md); the trace headers pass through either way.
    if !minimesh_telemetry::telemetry::exporting() {
        return Span::none();
    }
    let name = path.trim_start_matches('/');
    let (service, method) = name.split_once('/').unwrap_or((name, ""));
    let kind = match kind {
        SpanKind::Server => "server",
        SpanKind::Client => "client",
    };
    tracing::info_span!("proxy", otel.name = %name, otel.kind = kind, minimesh.proxy = role,
        rpc.system = "grpc", rpc.service = %service, rpc.method = %method,
        rpc.grpc.status_code = Empty, otel.status_code = Empty, otel.status_description = Empty,
        minimesh.peer.identity = Empty, minimesh.upstream = Empty, server.address = Empty, minimesh.attempts = Empty,
        trace_id = Empty, span_id = Empty)
}

/// What a call is counted under once its response ends.
struct Record {
    metrics: Arc<Metrics>,
    direction: &'static str,
    labels: (CallName, Arc<str>),
    started: Instant,
}

/// Counts the call and closes its span when the response ends; `held`
/// (the connection's call guard, an application slot) is released then too.
/// The response is cancelled if its reader stalls.
fn finish(
    response: Response<ProxyBody>,
    span: Span,
    record: Record,
    held: impl Send + 'static,
    stalls: &StallWatch,
) -> Response<ProxyBody> {
    let (parts, body) = response.into_parts();
    if let Some(code) = grpc_status(&parts.headers) {
        let message = grpc_message(&parts.headers);
        record_status(&span, code as i32, message.as_deref());
    }
    let body = StatusBody::new(
        body,
        &parts.headers,
        on_end(move |end| {
            let code = end.code();
            record_status(&span, code as i32, None);
            let (name, client_id) = &record.labels;
            record.metrics.request_done(
                record.direction,
                name,
                client_id,
                code,
                record.started.elapsed(),
            );
            drop(span);
            drop(held);
        }),
    );
    Response::from_parts(parts, boxed(stalls.watch(body)))
}

pub(crate) struct InboundState {
    pub(crate) service: String,
    pub(crate) allow: AllowList,
    pub(crate) app: Arc<Connection>,
    pub(crate) app_slots: AppSlots,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) stalls: StallWatch,
}

/// The bound on calls open to the local service (`--max-app-streams`).
pub(crate) struct AppSlots {
    slots: Arc<Semaphore>,
    limit: u32,
    in_flight: Gauge,
}

/// One call's place toward the local service, given back when dropped.
pub(crate) struct AppSlot {
    _permit: OwnedSemaphorePermit,
    in_flight: Gauge,
}

impl AppSlots {
    pub(crate) fn new(limit: u32, in_flight: Gauge) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(limit as usize)),
            limit,
            in_flight,
        }
    }

    /// A slot now, or None when `limit` calls are open: refusing at once
    /// lets the caller's proxy try another replica within the call's deadline.
    fn try_take(&self) -> Option<AppSlot> {
        let permit = self.slots.clone().try_acquire_owned().ok()?;
        self.in_flight.inc();
        Some(AppSlot {
            _permit: permit,
            in_flight: self.in_flight.clone(),
        })
    }
}

impl Drop for AppSlot {
    fn drop(&mut self) {
        self.in_flight.dec();
    }
}

pub(crate) async fn handle_inbound(
    state: Arc<InboundState>,
    caller: Option<SpiffeId>,
    request: Request<Incoming>,
    call: CallGuard,
) -> Response<ProxyBody> {
    let started = Instant::now();
    let path = request.uri().path().to_owned();
    let span = proxy_span(SpanKind::Server, "inbound", &path);
    continue_trace(&span, request.headers());
    record_ids(&span);
    if let Some(caller) = &caller {
        span.record("minimesh.peer.identity", tracing::field::display(caller));
    }
    let mut slot = None;
    // Refused calls are counted under one name: their paths are the caller's to choose.
    let admitted = caller.as_ref().is_some_and(|c| state.allow.allows(c));
    let labels = (
        if admitted {
            CallName::of(&path)
        } else {
            CallName::unrouted()
        },
        caller
            .as_ref()
            .map_or_else(|| Arc::from(""), |c| Arc::from(c.name.as_str())),
    );
    let response = async {
        let Some(caller) = caller else {
            return grpc_error(
                Code::Unauthenticated,
                "the caller presented no mesh identity",
                false,
            );
        };
        if !state.allow.allows(&caller) {
            tracing::info!(%caller, "call refused by the allow-list");
            return grpc_error(
                Code::PermissionDenied,
                &denial(&caller, &state.service),
                false,
            );
        }
        let deadline = match crate::strict::check(&request) {
            Ok(deadline) => deadline,
            Err(refusal) => return *refusal,
        };
        if deadline.is_some_and(|d| d.expired()) {
            return grpc_error(
                Code::DeadlineExceeded,
                "deadline already exceeded on arrival",
                false,
            );
        }
        let Some(taken) = state.app_slots.try_take() else {
            tracing::debug!(limit = state.app_slots.limit, "call refused: the local service is at its stream limit");
            return grpc_error(
                Code::ResourceExhausted,
                &format!(
                    "the {} service has {} calls open through this sidecar, its limit (--max-app-streams); try again later",
                    state.service, state.app_slots.limit
                ),
                true,
            );
        };
        slot = Some(taken);
        let mut request = request.map(boxed);
        inject_trace(&Span::current(), request.headers_mut());
        if let Some(deadline) = deadline {
            deadline.propagate(request.headers_mut());
        }
        match state.app.send(request).await {
            Ok(response) => response.map(boxed),
            Err((err, _)) => {
                tracing::warn!(%err, "local service unreachable");
                // The application never saw a call it could not be sent: the caller may retry elsewhere.
                grpc_error(
                    Code::Unavailable,
                    &format!("the {} service is unavailable: {err}", state.service),
                    err.never_sent(),
                )
            }
        }
    }
    .instrument(span.clone())
    .await;
    finish(
        response,
        span,
        Record {
            metrics: state.metrics.clone(),
            direction: INBOUND,
            labels,
            started,
        },
        (call, slot),
        &state.stalls,
    )
}

pub(crate) struct OutboundState {
    pub(crate) upstreams: BTreeMap<String, Arc<Upstream>>,
    pub(crate) routes: Routes,
    pub(crate) default_upstream: Option<String>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) span_kind: SpanKind,
    /// This proxy's own identity name, the `client_id` of its outbound calls.
    pub(crate) client_id: Arc<str>,
    /// At the edge: the upstreams callers may reach by name (None: all).
    pub(crate) expose: Option<BTreeSet<String>>,
    pub(crate) stalls: StallWatch,
}

pub(crate) async fn handle_outbound(
    state: Arc<OutboundState>,
    request: Request<Incoming>,
    call: CallGuard,
) -> Response<ProxyBody> {
    let started = Instant::now();
    let path = request.uri().path().to_owned();
    let span = proxy_span(state.span_kind, "outbound", &path);
    continue_trace(&span, request.headers());
    record_ids(&span);
    let authority = request
        .uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            request
                .headers()
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        });
    let route = state
        .routes
        .resolve(
            authority.as_deref(),
            &path,
            |name| state.upstreams.contains_key(name),
            state.default_upstream.as_deref(),
        )
        .map(|(name, via)| (name.to_owned(), via));
    let routed = route
        .as_ref()
        .is_some_and(|(name, _)| state.upstreams.contains_key(name));
    let labels = (
        if routed {
            CallName::of(&path)
        } else {
            CallName::unrouted()
        },
        state.client_id.clone(),
    );
    let response = async {
        let Some((name, via)) = route else {
            return grpc_error(
                Code::Unimplemented,
                &format!(
                    "no route for {path}: :authority {} names no upstream and no --route prefix matches",
                    authority.as_deref().unwrap_or("(none)")
                ),
                false,
            );
        };
        let name = name.as_str();
        let Some(upstream) = state.upstreams.get(name) else {
            return grpc_error(
                Code::Unimplemented,
                &format!("no route for {path}: no upstream named {name} is configured"),
                false,
            );
        };
        if let Some(exposed) = &state.expose
            && !exposed.contains(name)
            && via != Via::Default
        {
            return grpc_error(
                Code::PermissionDenied,
                &format!(
                    "the {name} service is not exposed outside the mesh (exposed: {})",
                    exposed.iter().cloned().collect::<Vec<_>>().join(", ")
                ),
                false,
            );
        }
        Span::current().record("minimesh.upstream", name);
        let deadline = match crate::strict::check(&request) {
            Ok(deadline) => deadline,
            Err(refusal) => return *refusal,
        };
        if deadline.is_some_and(|d| d.expired()) {
            return grpc_error(Code::DeadlineExceeded, "deadline already exceeded", false);
        }
        let mut report = CallReport::default();
        let response = upstream
            .call(request.map(boxed), deadline, &mut report)
            .await;
        let current = Span::current();
        current.record("minimesh.attempts", report.attempts);
        if let Some(endpoint) = report.endpoint {
            current.record("server.address", tracing::field::display(endpoint));
        }
        response
    }
    .instrument(span.clone())
    .await;
    finish(
        response,
        span,
        Record {
            metrics: state.metrics.clone(),
            direction: OUTBOUND,
            labels,
            started,
        },
        call,
        &state.stalls,
    )
}
