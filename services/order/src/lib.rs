//! The order service: places orders (checking the user and charging through
//! the payment service), runs fulfilment, and streams status changes.

mod feed;
mod pg_store;
pub mod reconcile;
pub mod store;
mod watch;
mod worker;

pub use feed::Feed;
pub use pg_store::PgOrderStore;
pub use store::{OrderFacts, OrderStore, SqliteOrderStore, StoreError, status};

use minimesh_proto::order::v1::order_service_server::{OrderService, OrderServiceServer};
use minimesh_proto::order::v1::{
    CancelOrderRequest, CreateOrderRequest, GetOrderRequest, ListOrdersRequest, ListOrdersResponse,
    Order, OrderEvent, OrderItem, TrackRequest, WatchOrderRequest,
};
use minimesh_proto::payment::v1::payment_service_client::PaymentServiceClient;
use minimesh_proto::payment::v1::{ChargeRequest, Payment, PaymentStatus, RefundRequest};
use minimesh_proto::user::v1::GetUserRequest;
use minimesh_proto::user::v1::user_service_client::UserServiceClient;
use minimesh_runtime::metrics::ServiceMetrics;
use minimesh_runtime::store::DbTarget;
use minimesh_runtime::trace::{RpcTrace, RpcTraceLayer};
use minimesh_runtime::{grpc, page};
use sha2::{Digest, Sha256};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};
use store::{Claimed, Created, Cursor, ItemRecord, NewOrder, OrderRecord, Transition, Work};
use tokio::net::TcpListener;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Response, Status, Streaming};

/// Configuration of one order service process.
#[derive(Debug, Clone, clap::Args)]
pub struct OrderConfig {
    /// Address of the gRPC (h2c) listener.
    #[arg(long, env = "MINIMESH_LISTEN", default_value = "127.0.0.1:0")]
    pub listen: String,
    /// SQLite database file (created with its schema when missing), or a
    /// `postgres://` URL.
    #[arg(long, env = "MINIMESH_DB", default_value = "order.db")]
    pub db: DbTarget,
    /// PostgreSQL schema holding this service's tables.
    #[arg(long, env = "MINIMESH_DB_SCHEMA", default_value = "minimesh_order")]
    pub db_schema: String,
    /// Where UserService is reached (in the mesh: this instance's sidecar outbound listener).
    #[arg(
        long,
        env = "MINIMESH_USER_ADDR",
        default_value = "http://127.0.0.1:4140"
    )]
    pub user_addr: String,
    /// Where PaymentService is reached (in the mesh: this instance's sidecar outbound listener).
    #[arg(
        long,
        env = "MINIMESH_PAYMENT_ADDR",
        default_value = "http://127.0.0.1:4140"
    )]
    pub payment_addr: String,
    /// How long a paid order waits before each fulfilment step.
    #[arg(long, env = "MINIMESH_FULFILMENT_STEP", value_parser = humantime::parse_duration, default_value = "2s")]
    pub fulfilment_step: Duration,
    /// Prometheus `/metrics` listener (business counters); none when unset.
    #[arg(long, env = "MINIMESH_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    /// Deadline of each call to the user and payment services.
    #[arg(long, env = "MINIMESH_UPSTREAM_TIMEOUT", value_parser = humantime::parse_duration, default_value = "5s")]
    pub upstream_timeout: Duration,
}

const MAX_ITEMS: usize = 1000;
const MAX_FIELD_LEN: usize = 128;
/// After CreateOrder's own charge had its chance, background settlement
/// waits this much longer before it takes the order over.
const SETTLE_GRACE: Duration = Duration::from_secs(1);
/// How often each process polls the event log for other replicas' changes.
const FEED_POLL: Duration = Duration::from_millis(100);

/// The order service's state and business logic, shared by the gRPC API and
/// the fulfilment worker.
pub struct Orders {
    store: OrderStore,
    feed: Feed,
    users: UserServiceClient<Upstream>,
    payments: PaymentServiceClient<Upstream>,
    step: Duration,
    upstream_timeout: Duration,
    metrics: Arc<ServiceMetrics>,
    /// Wakes background compensation (a cancel just made some due).
    compensate_now: tokio::sync::Notify,
}

#[derive(Debug, thiserror::Error)]
pub enum OrderServiceError {
    #[error("opening database {target}: {source}")]
    Db {
        target: DbTarget,
        source: minimesh_runtime::db::DbError,
    },
    #[error("starting the change feed: {0}")]
    Feed(#[from] StoreError),
    #[error("invalid upstream address {addr:?}: {source}")]
    Upstream {
        addr: String,
        source: tonic::transport::Error,
    },
    #[error(transparent)]
    Serve(#[from] grpc::ServeError),
    #[error(transparent)]
    Metrics(#[from] minimesh_runtime::metrics::MetricsError),
}

/// A channel to a peer service whose calls carry the caller's trace context.
type Upstream = RpcTrace<Channel>;

/// `origin` (`http://user`) gives each call its `:authority`, which is how
/// the sidecar dialled at `addr` knows where the call goes.
fn upstream(
    addr: &str,
    origin: &'static str,
    timeout: Duration,
) -> Result<Upstream, OrderServiceError> {
    let endpoint = Endpoint::from_shared(addr.to_owned())
        .map_err(|source| OrderServiceError::Upstream {
            addr: addr.to_owned(),
            source,
        })?
        .origin(tonic::codegen::http::Uri::from_static(origin));
    let channel = endpoint
        .timeout(timeout)
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .connect_lazy();
    Ok(tower::Layer::layer(&RpcTraceLayer::client(), channel))
}

impl Orders {
    pub async fn new(
        store: OrderStore,
        config: &OrderConfig,
    ) -> Result<Arc<Self>, OrderServiceError> {
        let feed = Feed::start(store.clone(), FEED_POLL).await?;
        Ok(Arc::new(Self {
            store,
            feed,
            users: UserServiceClient::new(upstream(
                &config.user_addr,
                "http://user",
                config.upstream_timeout,
            )?),
            payments: PaymentServiceClient::new(upstream(
                &config.payment_addr,
                "http://payment",
                config.upstream_timeout,
            )?),
            step: config.fulfilment_step,
            upstream_timeout: config.upstream_timeout,
            compensate_now: tokio::sync::Notify::new(),
            metrics: ServiceMetrics::new(
                "minimesh_orders",
                "Orders reaching each status (paid, shipped, delivered, cancelled).",
            ),
        }))
    }

    fn store_status(&self, err: StoreError) -> Status {
        match err {
            StoreError::KeyReused(_) => Status::already_exists(err.to_string()),
            StoreError::Db(err) => grpc::store_status("order", &err),
        }
    }

    async fn check_user(&self, user_id: &str) -> Result<(), Status> {
        let request = GetUserRequest {
            id: user_id.to_owned(),
        };
        let users = self.users.clone();
        let lookup = retry_unavailable(|| {
            let mut users = users.clone();
            let request = request.clone();
            async move { users.get_user(request).await }
        });
        match lookup.await {
            Ok(_) => Ok(()),
            Err(status) if status.code() == Code::NotFound => Err(Status::failed_precondition(
                format!("user {user_id} does not exist"),
            )),
            Err(status) => Err(Status::unavailable(format!(
                "cannot check user {user_id}: {}",
                status.message()
            ))),
        }
    }

    /// Places an order. `answer_by` is when the caller's deadline makes an
    /// answer due: the charge is given until then (at most the upstream
    /// timeout), and an order whose charge outcome is still unknown is
    /// answered PENDING and settled in the background.
    async fn create(
        &self,
        req: CreateOrderRequest,
        answer_by: Option<Instant>,
    ) -> Result<OrderRecord, Status> {
        let new = validate_order(req)?;
        self.check_user(&new.user_id).await?;
        if answer_by.is_some_and(|at| Instant::now() >= at) {
            // Safe to retry: nothing was stored. Past this point an answer
            // is always the order.
            return Err(Status::deadline_exceeded(
                "the caller's deadline left no time to place the order; nothing was created",
            ));
        }
        let budget = self.charge_budget(answer_by);
        // Until the charge below has had its chance, background settlement leaves the order alone.
        let settle_at = minimesh_runtime::now_millis() + millis(budget + SETTLE_GRACE);
        let order = match self
            .store
            .create_pending(new, settle_at)
            .await
            .map_err(|e| self.store_status(e))?
        {
            Created::New(order) => {
                self.feed.nudge();
                tracing::info!(order_id = %order.id, total_cents = order.total_cents, "order created");
                order
            }
            Created::Existing(order) => order,
        };
        if order.status != status::PENDING {
            return Ok(order);
        }
        // Also taken by retries of an interrupted request: charging is
        // idempotent per order, so settling twice charges once.
        let budget = self.charge_budget(answer_by);
        match self.settle(&order, budget).await {
            Ok(Some(settled)) => Ok(settled),
            // Outcome unknown, or not recorded: never a retryable error here,
            // since the charge may still land. The order stays PENDING and
            // background settlement finishes it (PAID or CANCELLED).
            Ok(None) | Err(_) => {
                let current = self.store.get(order.id.clone()).await.ok().flatten();
                Ok(current.unwrap_or(order))
            }
        }
    }

    /// How long a CreateOrder may spend charging: the upstream timeout, or
    /// less when the caller's deadline comes sooner.
    fn charge_budget(&self, answer_by: Option<Instant>) -> Duration {
        match answer_by {
            Some(at) => self
                .upstream_timeout
                .min(at.saturating_duration_since(Instant::now())),
            None => self.upstream_timeout,
        }
    }

    /// Charges the order's payment (idempotent: the key is the order's id),
    /// repeating on UNAVAILABLE within `budget`.
    async fn charge(&self, order: &OrderRecord, budget: Duration) -> ChargeOutcome {
        let charge = ChargeRequest {
            order_id: order.id.clone(),
            user_id: order.user_id.clone(),
            amount_cents: order.total_cents,
            currency: order.currency.clone(),
            idempotency_key: charge_key(&order.id),
        };
        // The charge is idempotent per order, so an UNAVAILABLE answer (which
        // may come after the payment service acted) is safe to repeat.
        let payments = self.payments.clone();
        let charged = retry_unavailable(|| {
            let mut payments = payments.clone();
            let charge = charge.clone();
            async move { payments.charge(charge).await }
        });
        match tokio::time::timeout(budget, charged).await {
            Ok(Ok(response)) => ChargeOutcome::Payment(response.into_inner()),
            Ok(Err(status))
                if matches!(
                    status.code(),
                    Code::InvalidArgument | Code::AlreadyExists | Code::FailedPrecondition
                ) =>
            {
                ChargeOutcome::Refused(status)
            }
            Ok(Err(status)) => ChargeOutcome::Unknown(status),
            Err(_) => ChargeOutcome::Unknown(Status::deadline_exceeded(format!(
                "no charge result within {budget:?}"
            ))),
        }
    }

    /// Charges a PENDING order and records the outcome. None when the outcome
    /// is unknown (the order stays PENDING, its settlement still owed).
    async fn settle(
        &self,
        order: &OrderRecord,
        budget: Duration,
    ) -> Result<Option<OrderRecord>, Status> {
        let payment = match self.charge(order, budget).await {
            ChargeOutcome::Payment(payment) => payment,
            ChargeOutcome::Refused(status) => {
                let reason = format!("payment refused: {}", status.message());
                return self
                    .finish_settlement(&order.id, status::CANCELLED, reason, None)
                    .await
                    .map(Some);
            }
            ChargeOutcome::Unknown(status) => {
                tracing::warn!(order_id = %order.id, code = ?status.code(), message = status.message(), "charge outcome unknown; order stays pending");
                return Ok(None);
            }
        };
        let captured = payment.status == PaymentStatus::Captured as i32;
        let settled = if captured {
            self.finish_settlement(
                &order.id,
                status::PAID,
                String::new(),
                Some(payment.id.clone()),
            )
            .await?
        } else {
            let reason = format!("payment declined: {}", payment.decline_reason);
            self.finish_settlement(
                &order.id,
                status::CANCELLED,
                reason,
                Some(payment.id.clone()),
            )
            .await?
        };
        if settled.status == status::CANCELLED && settled.payment_id != payment.id {
            // Cancelled while the charge was in flight. The cancel recorded
            // that a refund may be owed; record which payment, then try the
            // refund now (background compensation retries it until it goes through).
            tracing::info!(order_id = %order.id, payment_id = %payment.id, captured, "charge landed on a cancelled order");
            let recorded = self
                .store
                .record_payment(order.id.clone(), payment.id.clone(), captured)
                .await
                .map_err(|e| self.store_status(e))?;
            if captured {
                self.refund_owed(&order.id, &payment.id, budget).await;
            }
            return Ok(recorded.or(Some(settled)));
        }
        Ok(Some(settled))
    }

    async fn finish_settlement(
        &self,
        id: &str,
        to: i32,
        reason: String,
        payment_id: Option<String>,
    ) -> Result<OrderRecord, Status> {
        let next = (to == status::PAID).then(|| minimesh_runtime::now_millis() + millis(self.step));
        let t = Transition {
            from: status::PENDING,
            to,
            reason,
            payment_id,
            next_step_at_ms: next,
            refund_pending: false,
            retry_at_ms: None,
        };
        let (order, moved) = self
            .store
            .transition(id.to_owned(), t)
            .await
            .map_err(|e| self.store_status(e))?
            .ok_or_else(|| Status::not_found(format!("order {id} not found")))?;
        if moved {
            self.feed.nudge();
            self.metrics.count(status::metric_name(order.status));
            tracing::info!(order_id = %id, status = status::name(order.status), "order settled");
        }
        Ok(order)
    }

    /// Refunds a payment the order owes back and records it when done.
    /// Returns false when the refund must be tried again later.
    async fn refund_owed(&self, order_id: &str, payment_id: &str, budget: Duration) -> bool {
        let request = RefundRequest {
            payment_id: payment_id.to_owned(),
            idempotency_key: format!("refund:{order_id}"),
        };
        let mut payments = self.payments.clone();
        let done = match tokio::time::timeout(budget, payments.refund(request)).await {
            Ok(Ok(_)) => true,
            // Declined payments hold no money: nothing to give back.
            Ok(Err(status)) if status.code() == Code::FailedPrecondition => true,
            Ok(Err(status)) => {
                tracing::warn!(order_id, payment_id, code = ?status.code(), message = status.message(), "refund failed; will retry");
                false
            }
            Err(_) => {
                tracing::warn!(order_id, payment_id, "refund timed out; will retry");
                false
            }
        };
        if !done {
            return false;
        }
        match self.store.refund_done(order_id.to_owned()).await {
            Ok(()) => {
                tracing::info!(order_id, payment_id, "refund done");
                true
            }
            Err(err) => {
                tracing::warn!(%err, order_id, "cannot record refund; will retry");
                false
            }
        }
    }

    async fn cancel(&self, id: String, answer_by: Option<Instant>) -> Result<OrderRecord, Status> {
        // A few rounds: the order may move (settle, fulfilment) between read and CAS.
        for _ in 0..5 {
            let order = self
                .store
                .get(id.clone())
                .await
                .map_err(|e| self.store_status(e))?
                .ok_or_else(|| Status::not_found(format!("order {id} not found")))?;
            let now = minimesh_runtime::now_millis();
            // The refund owed is recorded with the cancellation itself, before
            // anything is attempted, so it survives a crash right after.
            let retry_at = match order.status {
                status::CANCELLED => return Ok(order),
                status::SHIPPED | status::DELIVERED => {
                    return Err(Status::failed_precondition(format!(
                        "order {id} is already {} and can no longer be cancelled",
                        status::name(order.status)
                    )));
                }
                // Refunded just below; background compensation takes over if that fails.
                status::PAID => now + millis(self.upstream_timeout + SETTLE_GRACE),
                // Its charge may be in flight: compensation finds it (same
                // key) and refunds it, or fences the key so it never lands.
                _ => now,
            };
            let t = Transition {
                from: order.status,
                to: status::CANCELLED,
                reason: "cancelled by the customer".to_owned(),
                payment_id: None,
                next_step_at_ms: None,
                refund_pending: true,
                retry_at_ms: Some(retry_at),
            };
            let Some((cancelled, moved)) = self
                .store
                .transition(id.clone(), t)
                .await
                .map_err(|e| self.store_status(e))?
            else {
                return Err(Status::not_found(format!("order {id} not found")));
            };
            if !moved {
                continue;
            }
            self.feed.nudge();
            self.metrics.count(status::metric_name(status::CANCELLED));
            tracing::info!(order_id = %id, from = status::name(order.status), "order cancelled");
            if order.status == status::PAID {
                let budget = self.charge_budget(answer_by);
                self.refund_owed(&id, &cancelled.payment_id, budget).await;
            } else {
                self.compensate_now.notify_one();
            }
            return Ok(cancelled);
        }
        Err(Status::aborted(format!(
            "order {id} kept changing; try again"
        )))
    }

    /// One attempt at owed background work on a claimed order. Returns
    /// false when the work is still owed.
    async fn work(&self, work: Work, claimed: Claimed) -> bool {
        let order = claimed.order;
        let budget = self.upstream_timeout;
        match work {
            Work::Settle => match self.settle(&order, budget).await {
                Ok(Some(_)) => true,
                Ok(None) => false,
                Err(status) => {
                    tracing::warn!(order_id = %order.id, message = status.message(), "settlement failed");
                    false
                }
            },
            Work::Compensate => {
                let payment_id = if order.payment_id.is_empty() {
                    // Which charge, if any, landed? Charging again with the
                    // order's key returns it; if none landed, this charge
                    // takes the key, so a late one can never capture again.
                    match self.charge(&order, budget).await {
                        ChargeOutcome::Payment(payment) => {
                            let captured = payment.status == PaymentStatus::Captured as i32;
                            if let Err(err) = self
                                .store
                                .record_payment(order.id.clone(), payment.id.clone(), captured)
                                .await
                            {
                                tracing::warn!(%err, order_id = %order.id, "cannot record payment");
                                return false;
                            }
                            if !captured {
                                return true;
                            }
                            payment.id
                        }
                        ChargeOutcome::Refused(status) if status.code() != Code::AlreadyExists => {
                            // This charge can never be taken, so none was.
                            return self.store.refund_done(order.id.clone()).await.is_ok();
                        }
                        ChargeOutcome::Refused(status) | ChargeOutcome::Unknown(status) => {
                            tracing::warn!(order_id = %order.id, code = ?status.code(), message = status.message(), "cannot look up the charge of a cancelled order; will retry");
                            return false;
                        }
                    }
                } else {
                    order.payment_id.clone()
                };
                self.refund_owed(&order.id, &payment_id, budget).await
            }
        }
    }
}

enum ChargeOutcome {
    /// The payment service answered with the order's payment (captured or declined).
    Payment(Payment),
    /// The payment service refused the request: no charge was or will be taken.
    Refused(Status),
    /// No answer in time, or an answer that does not say (the charge may land).
    Unknown(Status),
}

fn charge_key(order_id: &str) -> String {
    format!("order:{order_id}")
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// When the caller's `grpc-timeout` runs out, less a margin to send the
/// answer back through the mesh.
fn answer_by(metadata: &tonic::metadata::MetadataMap) -> Option<Instant> {
    let raw = metadata.get("grpc-timeout")?.to_str().ok()?;
    let timeout = parse_grpc_timeout(raw)?;
    let margin = (timeout / 5).max(Duration::from_millis(50));
    Some(Instant::now() + timeout.saturating_sub(margin))
}

/// Parses a `grpc-timeout` value: up to 8 digits and a unit (H M S m u n).
fn parse_grpc_timeout(raw: &str) -> Option<Duration> {
    if raw.len() < 2 || raw.len() > 9 {
        return None;
    }
    let (digits, unit) = raw.split_at(raw.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Calls made by the order service that are idempotent (reads, and charges
/// keyed by order) are repeated a few times on UNAVAILABLE, which a replica
/// dying mid-call produces; the mesh itself only retries calls that never
/// reached an application.
async fn retry_unavailable<T, F, Fut>(mut call: F) -> Result<T, Status>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Status>>,
{
    const ATTEMPTS: u32 = 4;
    let mut attempt = 1;
    loop {
        match call().await {
            Err(status) if status.code() == Code::Unavailable && attempt < ATTEMPTS => {
                tracing::debug!(
                    attempt,
                    message = status.message(),
                    "idempotent call unavailable; trying again"
                );
                tokio::time::sleep(Duration::from_millis(25 * u64::from(attempt))).await;
                attempt += 1;
            }
            result => return result,
        }
    }
}

/// Checks a CreateOrder request and computes its total and fingerprint.
fn validate_order(req: CreateOrderRequest) -> Result<NewOrder, Status> {
    let invalid = |msg: String| Status::invalid_argument(msg);
    if req.user_id.is_empty() {
        return Err(invalid("user_id is required".into()));
    }
    if req.user_id.len() > MAX_FIELD_LEN || req.idempotency_key.len() > MAX_FIELD_LEN {
        return Err(invalid(format!(
            "user_id and idempotency_key must be at most {MAX_FIELD_LEN} bytes"
        )));
    }
    if !minimesh_runtime::is_currency_code(&req.currency) {
        return Err(invalid(format!(
            "currency {:?} is not an ISO 4217 code (three upper-case letters)",
            req.currency
        )));
    }
    if req.items.is_empty() {
        return Err(invalid("an order needs at least one item".into()));
    }
    if req.items.len() > MAX_ITEMS {
        return Err(invalid(format!(
            "an order may have at most {MAX_ITEMS} items"
        )));
    }
    let mut total: i64 = 0;
    let mut items = Vec::with_capacity(req.items.len());
    for (i, item) in req.items.into_iter().enumerate() {
        if item.sku.is_empty() || item.sku.len() > MAX_FIELD_LEN {
            return Err(invalid(format!(
                "items[{i}].sku must be 1 to {MAX_FIELD_LEN} bytes"
            )));
        }
        if let Some(c) = item.sku.chars().find(|c| c.is_control()) {
            return Err(invalid(format!(
                "items[{i}].sku must not contain control characters, found U+{:04X}",
                u32::from(c)
            )));
        }
        if item.quantity < 1 {
            return Err(invalid(format!(
                "items[{i}].quantity must be at least 1, got {}",
                item.quantity
            )));
        }
        if item.unit_price_cents < 0 {
            return Err(invalid(format!(
                "items[{i}].unit_price_cents must not be negative, got {}",
                item.unit_price_cents
            )));
        }
        total = item
            .unit_price_cents
            .checked_mul(i64::from(item.quantity))
            .and_then(|line| total.checked_add(line))
            .ok_or_else(|| invalid("order total overflows".into()))?;
        items.push(ItemRecord {
            sku: item.sku,
            quantity: item.quantity,
            unit_price_cents: item.unit_price_cents,
        });
    }
    if total <= 0 {
        return Err(invalid("order total must be greater than zero".into()));
    }
    Ok(NewOrder {
        request_hash: fingerprint(&req.user_id, &req.currency, &items),
        legacy_hash: Some(legacy_fingerprint(&req.user_id, &req.currency, &items)),
        user_id: req.user_id,
        items,
        total_cents: total,
        currency: req.currency,
        idempotency_key: (!req.idempotency_key.is_empty()).then_some(req.idempotency_key),
    })
}

/// What tells a retry from a reused idempotency key. Every string is
/// length-prefixed and every number fixed-width, so two different requests
/// can never feed the hash the same bytes.
fn fingerprint(user_id: &str, currency: &str, items: &[ItemRecord]) -> String {
    fn field(hasher: &mut Sha256, bytes: &[u8]) {
        hasher.update((bytes.len() as u64).to_le_bytes());
        hasher.update(bytes);
    }
    let mut hasher = Sha256::new();
    field(&mut hasher, b"shop.order.v1.CreateOrderRequest");
    field(&mut hasher, user_id.as_bytes());
    field(&mut hasher, currency.as_bytes());
    hasher.update((items.len() as u64).to_le_bytes());
    for item in items {
        field(&mut hasher, item.sku.as_bytes());
        hasher.update(item.quantity.to_le_bytes());
        hasher.update(item.unit_price_cents.to_le_bytes());
    }
    format!("v2:{}", hex(&hasher.finalize()))
}

/// The ambiguous fingerprint of earlier versions, still stored on their
/// orders: only compared against those, so their keys keep working.
fn legacy_fingerprint(user_id: &str, currency: &str, items: &[ItemRecord]) -> String {
    let mut hasher = Sha256::new();
    hasher.update(user_id.as_bytes());
    hasher.update([0]);
    hasher.update(currency.as_bytes());
    for item in items {
        hasher.update([0]);
        hasher.update(item.sku.as_bytes());
        hasher.update(item.quantity.to_le_bytes());
        hasher.update(item.unit_price_cents.to_le_bytes());
    }
    hex(&hasher.finalize())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(crate) fn to_proto(order: OrderRecord) -> Order {
    Order {
        id: order.id,
        user_id: order.user_id,
        items: order
            .items
            .into_iter()
            .map(|i| OrderItem {
                sku: i.sku,
                quantity: i.quantity,
                unit_price_cents: i.unit_price_cents,
            })
            .collect(),
        total_cents: order.total_cents,
        currency: order.currency,
        status: order.status,
        status_reason: order.status_reason,
        payment_id: order.payment_id,
        created_at: Some(minimesh_proto::timestamp_from_unix_millis(
            order.created_at_ms,
        )),
        updated_at: Some(minimesh_proto::timestamp_from_unix_millis(
            order.updated_at_ms,
        )),
    }
}

pub struct OrderApi {
    orders: Arc<Orders>,
}

#[tonic::async_trait]
impl OrderService for OrderApi {
    async fn create_order(
        &self,
        request: Request<CreateOrderRequest>,
    ) -> Result<Response<Order>, Status> {
        let answer_by = answer_by(request.metadata());
        let order = self.orders.create(request.into_inner(), answer_by).await?;
        Ok(Response::new(to_proto(order)))
    }

    async fn get_order(
        &self,
        request: Request<GetOrderRequest>,
    ) -> Result<Response<Order>, Status> {
        let id = request.into_inner().id;
        if id.is_empty() {
            return Err(Status::invalid_argument("id is required"));
        }
        match self
            .orders
            .store
            .get(id.clone())
            .await
            .map_err(|e| self.orders.store_status(e))?
        {
            Some(order) => Ok(Response::new(to_proto(order))),
            None => Err(Status::not_found(format!("order {id} not found"))),
        }
    }

    async fn list_orders(
        &self,
        request: Request<ListOrdersRequest>,
    ) -> Result<Response<ListOrdersResponse>, Status> {
        let req = request.into_inner();
        let size = page::page_size(req.page_size)?;
        let after = match page::decode_token(&req.page_token)? {
            None => Cursor::Start,
            Some(last) => match last.parse::<i64>() {
                Ok(seq) => Cursor::Seq(seq),
                Err(_) => Cursor::LegacyId(last),
            },
        };
        let user = (!req.user_id.is_empty()).then_some(req.user_id);
        let mut rows = self
            .orders
            .store
            .list(user, after, size + 1)
            .await
            .map_err(|e| self.orders.store_status(e))?;
        let next_page_token = if rows.len() > size as usize {
            rows.truncate(size as usize);
            rows.last()
                .map(|o| page::encode_token(&o.seq.to_string()))
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(ListOrdersResponse {
            orders: rows.into_iter().map(to_proto).collect(),
            next_page_token,
        }))
    }

    async fn cancel_order(
        &self,
        request: Request<CancelOrderRequest>,
    ) -> Result<Response<Order>, Status> {
        let answer_by = answer_by(request.metadata());
        let id = request.into_inner().id;
        if id.is_empty() {
            return Err(Status::invalid_argument("id is required"));
        }
        Ok(Response::new(to_proto(
            self.orders.cancel(id, answer_by).await?,
        )))
    }

    type WatchOrderStream = watch::EventStream;

    async fn watch_order(
        &self,
        request: Request<WatchOrderRequest>,
    ) -> Result<Response<Self::WatchOrderStream>, Status> {
        let id = request.into_inner().id;
        if id.is_empty() {
            return Err(Status::invalid_argument("id is required"));
        }
        Ok(Response::new(
            watch::watch_one(self.orders.clone(), id).await?,
        ))
    }

    type TrackOrdersStream = watch::EventStream;

    async fn track_orders(
        &self,
        request: Request<Streaming<TrackRequest>>,
    ) -> Result<Response<Self::TrackOrdersStream>, Status> {
        Ok(Response::new(watch::track(
            self.orders.clone(),
            request.into_inner(),
        )))
    }
}

pub(crate) fn event_to_proto(event: &store::EventRecord) -> OrderEvent {
    OrderEvent {
        order_id: event.order_id.clone(),
        status: event.status,
        status_reason: event.status_reason.clone(),
        at: Some(minimesh_proto::timestamp_from_unix_millis(event.at_ms)),
    }
}

/// The tonic service with the project's message size limits.
pub fn service(orders: Arc<Orders>) -> OrderServiceServer<OrderApi> {
    OrderServiceServer::new(OrderApi { orders })
        .max_decoding_message_size(grpc::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(grpc::MAX_MESSAGE_BYTES)
}

/// Runs the order service and its fulfilment worker until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    config: OrderConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), OrderServiceError> {
    let store = OrderStore::open_target(&config.db, &config.db_schema)
        .await
        .map_err(|source| OrderServiceError::Db {
            target: config.db.clone(),
            source,
        })?;
    let backend = store.backend();
    let orders = Orders::new(store, &config).await?;
    let _metrics =
        minimesh_runtime::metrics::listen(config.metrics_listen.as_deref(), orders.metrics.clone())
            .await?;
    let workers = worker::spawn(orders.clone(), config.fulfilment_step);
    let result = grpc::serve(listener, service(orders), backend, shutdown).await;
    for worker in workers {
        worker.abort();
    }
    result?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(sku: &str, quantity: i32, price: i64) -> OrderItem {
        OrderItem {
            sku: sku.into(),
            quantity,
            unit_price_cents: price,
        }
    }

    fn request(items: Vec<OrderItem>) -> CreateOrderRequest {
        CreateOrderRequest {
            user_id: "usr".into(),
            items,
            currency: "EUR".into(),
            idempotency_key: String::new(),
        }
    }

    #[test]
    fn totals_and_fingerprints() {
        let a = validate_order(request(vec![item("a", 2, 150), item("b", 1, 5)])).unwrap();
        assert_eq!(a.total_cents, 305);
        let b = validate_order(request(vec![item("a", 2, 150), item("b", 1, 6)])).unwrap();
        assert_ne!(a.request_hash, b.request_hash);
    }

    #[test]
    fn bad_orders_are_invalid_argument() {
        for (items, needle) in [
            (vec![], "at least one item"),
            (vec![item("a", 0, 1)], "quantity"),
            (vec![item("a", 1, -1)], "negative"),
            (vec![item("", 1, 1)], "sku"),
            (vec![item("a", i32::MAX, i64::MAX)], "overflows"),
        ] {
            let err = validate_order(request(items)).unwrap_err();
            assert_eq!(err.code(), Code::InvalidArgument);
            assert!(err.message().contains(needle), "{}", err.message());
        }
    }

    /// Issue 14, point 4: these two requests fed the old fingerprint the same bytes.
    #[test]
    fn fingerprints_of_different_requests_differ() {
        let two = [
            ItemRecord {
                sku: "a".into(),
                quantity: 1,
                unit_price_cents: 100,
            },
            ItemRecord {
                sku: "b".into(),
                quantity: 1,
                unit_price_cents: 100,
            },
        ];
        let one = [ItemRecord {
            sku: "a\x01\0\0\0d\0\0\0\0\0\0\0\0b".into(),
            quantity: 1,
            unit_price_cents: 100,
        }];
        assert_eq!(
            legacy_fingerprint("usr", "EUR", &two),
            legacy_fingerprint("usr", "EUR", &one),
            "the collision this guards against"
        );
        assert_ne!(
            fingerprint("usr", "EUR", &two),
            fingerprint("usr", "EUR", &one)
        );
        assert_ne!(
            fingerprint("usr", "EUR", &two),
            fingerprint("usrE", "UR", &two)
        );
    }

    #[test]
    fn skus_with_control_characters_are_invalid_argument() {
        for sku in ["a\0b", "tab\there", "line\n", "del\u{7f}"] {
            let err = validate_order(request(vec![item(sku, 1, 1)])).unwrap_err();
            assert_eq!(err.code(), Code::InvalidArgument);
            assert!(err.message().contains("control"), "{}", err.message());
        }
    }

    #[test]
    fn grpc_timeouts_parse() {
        assert_eq!(
            parse_grpc_timeout("1500m"),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        for bad in ["", "S", "12", "123456789S", "1x", "-1S"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }
}
