//! The domain logic: placing an order, settling its charge, cancelling and
//! refunding, and the owed background work the worker retries.

use crate::store::{Claimed, Created, OrderRecord, Transition, Work, status};
use crate::upstream::{ChargeOutcome, Peers};
use crate::validate::validate_order;
use crate::{Feed, OrderConfig, OrderServiceError, OrderStore, StoreError, millis};
use minimesh_proto::order::v1::CreateOrderRequest;
use minimesh_proto::payment::v1::PaymentStatus;
use minimesh_runtime::grpc;
use minimesh_runtime::metrics::ServiceMetrics;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::{Code, Status};

/// After CreateOrder's own charge had its chance, background settlement
/// waits this much longer before it takes the order over.
const SETTLE_GRACE: Duration = Duration::from_secs(1);
/// How often each process polls the event log for other replicas' changes.
const FEED_POLL: Duration = Duration::from_millis(100);

/// The order service's state and business logic, shared by the gRPC API and
/// the fulfilment worker.
pub struct Orders {
    pub(crate) store: OrderStore,
    pub(crate) feed: Feed,
    pub(crate) peers: Peers,
    pub(crate) step: Duration,
    pub(crate) upstream_timeout: Duration,
    pub(crate) metrics: Arc<ServiceMetrics>,
    /// Wakes background compensation (a cancel just made some due).
    pub(crate) compensate_now: tokio::sync::Notify,
}

impl Orders {
    /// The domain logic over `store`, with its change feed started and its upstream clients made.
    pub async fn new(
        store: OrderStore,
        config: &OrderConfig,
    ) -> Result<Arc<Self>, OrderServiceError> {
        let feed = Feed::start(store.clone(), FEED_POLL).await?;
        Ok(Arc::new(Self {
            store,
            feed,
            peers: Peers::new(config)?,
            step: config.fulfilment_step,
            upstream_timeout: config.upstream_timeout,
            compensate_now: tokio::sync::Notify::new(),
            metrics: ServiceMetrics::new(
                "minimesh_orders",
                "Orders reaching each status (paid, shipped, delivered, cancelled).",
            ),
        }))
    }

    pub(crate) fn store_status(&self, err: StoreError) -> Status {
        match err {
            StoreError::KeyReused(_) => Status::already_exists(err.to_string()),
            StoreError::Db(err) => grpc::store_status("order", &err),
        }
    }

    /// Places an order. `answer_by` is when the caller's deadline makes an
    /// answer due: the charge is given until then (at most the upstream
    /// timeout), and an order whose charge outcome is still unknown is
    /// answered PENDING and settled in the background.
    pub(crate) async fn create(
        &self,
        req: CreateOrderRequest,
        answer_by: Option<Instant>,
    ) -> Result<OrderRecord, Status> {
        let new = validate_order(req)?;
        self.peers.check_user(&new.user_id).await?;
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

    /// Charges a PENDING order and records the outcome. None when the outcome
    /// is unknown (the order stays PENDING, its settlement still owed).
    async fn settle(
        &self,
        order: &OrderRecord,
        budget: Duration,
    ) -> Result<Option<OrderRecord>, Status> {
        let payment = match self.peers.charge(order, budget).await {
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
        if !self.peers.refund(order_id, payment_id, budget).await {
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

    pub(crate) async fn cancel(
        &self,
        id: String,
        answer_by: Option<Instant>,
    ) -> Result<OrderRecord, Status> {
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
    pub(crate) async fn work(&self, work: Work, claimed: Claimed) -> bool {
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
                    match self.peers.charge(&order, budget).await {
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
