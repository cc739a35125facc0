//! The payment service: charges, refunds and batch settlement.

#![forbid(unsafe_code)]

pub mod store;

pub use store::{
    AnyPaymentStore, NewCharge, PaymentRecord, PaymentStore, PgPaymentStore, SqlitePaymentStore,
    StoreError,
};

use minimesh_proto::payment::v1::payment_service_server::{PaymentService, PaymentServiceServer};
use minimesh_proto::payment::v1::{
    ChargeError, ChargeRequest, ChargeResult, GetPaymentRequest, Payment, RefundRequest,
    charge_result,
};
use minimesh_runtime::grpc;
use minimesh_runtime::metrics::ServiceMetrics;
use minimesh_runtime::store::DbTarget;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

/// Configuration of one payment service process.
#[derive(Debug, Clone, clap::Args)]
pub struct PaymentConfig {
    /// Address of the gRPC (h2c) listener.
    #[arg(long, env = "MINIMESH_LISTEN", default_value = "127.0.0.1:0")]
    pub listen: String,
    /// SQLite database file (created with its schema when missing), or a
    /// `postgres://` URL.
    #[arg(long, env = "MINIMESH_DB", default_value = "payment.db")]
    pub db: DbTarget,
    /// PostgreSQL schema holding this service's tables.
    #[arg(long, env = "MINIMESH_DB_SCHEMA", default_value = "minimesh_payment")]
    pub db_schema: String,
    /// Charges above this many minor units are declined.
    #[arg(long, env = "MINIMESH_CHARGE_LIMIT_CENTS", default_value_t = 100_000)]
    pub charge_limit_cents: i64,
    /// Prometheus `/metrics` listener (business counters); none when unset.
    #[arg(long, env = "MINIMESH_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    /// Test-only: delay every Charge by this long (to exercise load balancing).
    #[arg(long, env = "MINIMESH_DEBUG_DELAY", value_parser = humantime::parse_duration, hide = true)]
    pub debug_delay: Option<Duration>,
}

const MAX_ID_LEN: usize = 128;
/// Results a ChargeStream may have computed but not yet sent.
const STREAM_BUFFER: usize = 32;

/// `shop.payment.v1.PaymentService` over a store: validation, the charge limit, idempotency.
pub struct PaymentApi<S> {
    store: Arc<S>,
    metrics: Arc<ServiceMetrics>,
    charge_limit_cents: i64,
    debug_delay: Option<Duration>,
}

impl<S: PaymentStore> PaymentApi<S> {
    /// The API over `store`, declining charges above `charge_limit_cents`.
    pub fn new(store: S, charge_limit_cents: i64) -> Self {
        Self {
            store: Arc::new(store),
            metrics: payment_metrics(),
            charge_limit_cents,
            debug_delay: None,
        }
    }

    /// Its outcome counters, for the metrics listener.
    pub fn metrics(&self) -> Arc<ServiceMetrics> {
        self.metrics.clone()
    }

    /// Holds every Charge this long before answering (tests of slow payments).
    pub fn with_debug_delay(mut self, delay: Option<Duration>) -> Self {
        self.debug_delay = delay;
        self
    }
}

fn required(field: &str, value: &str) -> Result<(), Status> {
    if value.is_empty() {
        return Err(Status::invalid_argument(format!("{field} is required")));
    }
    if value.len() > MAX_ID_LEN {
        return Err(Status::invalid_argument(format!(
            "{field} is longer than {MAX_ID_LEN} bytes"
        )));
    }
    Ok(())
}

/// Validates a charge request and decides whether it is declined.
pub fn validate_charge(req: ChargeRequest, limit_cents: i64) -> Result<NewCharge, Status> {
    required("order_id", &req.order_id)?;
    required("user_id", &req.user_id)?;
    if req.amount_cents <= 0 {
        return Err(Status::invalid_argument(format!(
            "amount_cents must be greater than zero, got {}",
            req.amount_cents
        )));
    }
    if !minimesh_runtime::is_currency_code(&req.currency) {
        return Err(Status::invalid_argument(format!(
            "currency {:?} is not an ISO 4217 code (three upper-case letters)",
            req.currency
        )));
    }
    if req.idempotency_key.len() > MAX_ID_LEN {
        return Err(Status::invalid_argument(format!(
            "idempotency_key is longer than {MAX_ID_LEN} bytes"
        )));
    }
    let decline_reason = (req.amount_cents > limit_cents).then(|| {
        format!(
            "amount {} exceeds the per-charge limit of {} {} minor units",
            req.amount_cents, limit_cents, req.currency
        )
    });
    Ok(NewCharge {
        order_id: req.order_id,
        user_id: req.user_id,
        amount_cents: req.amount_cents,
        currency: req.currency,
        idempotency_key: (!req.idempotency_key.is_empty()).then_some(req.idempotency_key),
        decline_reason,
    })
}

/// The API message for a stored payment.
pub fn to_proto(record: PaymentRecord) -> Payment {
    Payment {
        id: record.id,
        order_id: record.order_id,
        user_id: record.user_id,
        amount_cents: record.amount_cents,
        currency: record.currency,
        status: record.status,
        decline_reason: record.decline_reason,
        created_at: Some(minimesh_proto::timestamp_from_unix_millis(
            record.created_at_ms,
        )),
    }
}

/// The counter family of this service: payments by outcome.
pub fn payment_metrics() -> Arc<ServiceMetrics> {
    ServiceMetrics::new(
        "minimesh_payments",
        "Payments created, by outcome (captured or declined).",
    )
}

fn status_name(status: i32) -> &'static str {
    match status {
        store::CAPTURED => "captured",
        store::DECLINED => "declined",
        store::REFUNDED => "refunded",
        _ => "unspecified",
    }
}

fn store_status(err: StoreError) -> Status {
    match err {
        StoreError::KeyReused(_) => Status::already_exists(err.to_string()),
        StoreError::NotFound(_) => Status::not_found(err.to_string()),
        StoreError::NotRefundable(_) => Status::failed_precondition(err.to_string()),
        StoreError::Db(err) => grpc::store_status("payment", &err),
    }
}

async fn charge<S: PaymentStore>(
    store: &S,
    metrics: &ServiceMetrics,
    req: ChargeRequest,
    limit: i64,
) -> Result<Payment, Status> {
    let charge = validate_charge(req, limit)?;
    let (record, created) = store.charge(charge).await.map_err(store_status)?;
    if created {
        metrics.count(status_name(record.status));
    }
    tracing::info!(payment_id = %record.id, order_id = %record.order_id, status = record.status, "charge");
    Ok(to_proto(record))
}

type ChargeResultStream =
    Pin<Box<dyn Stream<Item = Result<ChargeResult, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl<S: PaymentStore> PaymentService for PaymentApi<S> {
    async fn charge(&self, request: Request<ChargeRequest>) -> Result<Response<Payment>, Status> {
        if let Some(delay) = self.debug_delay {
            tokio::time::sleep(delay).await;
        }
        let payment = charge(
            self.store.as_ref(),
            &self.metrics,
            request.into_inner(),
            self.charge_limit_cents,
        )
        .await?;
        Ok(Response::new(payment))
    }

    async fn refund(&self, request: Request<RefundRequest>) -> Result<Response<Payment>, Status> {
        let req = request.into_inner();
        required("payment_id", &req.payment_id)?;
        let record = self
            .store
            .refund(req.payment_id)
            .await
            .map_err(store_status)?;
        tracing::info!(payment_id = %record.id, "refund");
        Ok(Response::new(to_proto(record)))
    }

    async fn get_payment(
        &self,
        request: Request<GetPaymentRequest>,
    ) -> Result<Response<Payment>, Status> {
        let id = request.into_inner().id;
        required("id", &id)?;
        match self.store.get(id.clone()).await.map_err(store_status)? {
            Some(record) => Ok(Response::new(to_proto(record))),
            None => Err(Status::not_found(format!("payment {id} not found"))),
        }
    }

    type ChargeStreamStream = ChargeResultStream;

    async fn charge_stream(
        &self,
        request: Request<Streaming<ChargeRequest>>,
    ) -> Result<Response<Self::ChargeStreamStream>, Status> {
        let mut requests = request.into_inner();
        let store = self.store.clone();
        let metrics = self.metrics.clone();
        let limit = self.charge_limit_cents;
        let (tx, rx) = tokio::sync::mpsc::channel(STREAM_BUFFER);
        // Requests are handled one at a time so results come back in order;
        // a full channel pauses reading, which back-pressures the client.
        tokio::spawn(async move {
            let mut index = 0u64;
            while let Some(next) = requests.next().await {
                let result = match next {
                    Ok(req) => match charge(store.as_ref(), &metrics, req, limit).await {
                        Ok(payment) => charge_result::Result::Payment(payment),
                        Err(status) => charge_result::Result::Error(ChargeError {
                            code: status.code() as i32,
                            message: status.message().to_owned(),
                        }),
                    },
                    Err(status) => {
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                };
                let item = ChargeResult {
                    index,
                    result: Some(result),
                };
                if tx.send(Ok(item)).await.is_err() {
                    return; // client went away
                }
                index += 1;
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

/// The tonic service with the project's message size limits.
pub fn service<S: PaymentStore>(api: PaymentApi<S>) -> PaymentServiceServer<PaymentApi<S>> {
    PaymentServiceServer::new(api)
        .max_decoding_message_size(grpc::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(grpc::MAX_MESSAGE_BYTES)
}

/// Why the payment service stopped or could not start.
#[derive(Debug, thiserror::Error)]
pub enum PaymentServiceError {
    /// The database could not be opened or migrated.
    #[error("opening database {target}: {source}")]
    Db {
        /// The `--db` given.
        target: DbTarget,
        /// What opening failed with.
        source: minimesh_runtime::db::DbError,
    },
    /// The gRPC server failed.
    #[error(transparent)]
    Serve(#[from] grpc::ServeError),
    /// The metrics listener could not be bound.
    #[error(transparent)]
    Metrics(#[from] minimesh_runtime::metrics::AdminError),
}

/// Runs the payment service on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    config: PaymentConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), PaymentServiceError> {
    let store = AnyPaymentStore::open(&config.db, &config.db_schema)
        .await
        .map_err(|source| PaymentServiceError::Db {
            target: config.db.clone(),
            source,
        })?;
    let backend = store.backend();
    let api =
        PaymentApi::new(store, config.charge_limit_cents).with_debug_delay(config.debug_delay);
    let _metrics =
        minimesh_runtime::metrics::listen(config.metrics_listen.as_deref(), api.metrics()).await?;
    grpc::serve(listener, service(api), backend, shutdown).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(amount: i64, currency: &str) -> ChargeRequest {
        ChargeRequest {
            order_id: "ord".into(),
            user_id: "usr".into(),
            amount_cents: amount,
            currency: currency.into(),
            idempotency_key: String::new(),
        }
    }

    #[test]
    fn over_limit_is_declined_with_reason() {
        let charge = validate_charge(request(100_001, "USD"), 100_000).unwrap();
        assert!(charge.decline_reason.unwrap().contains("limit of 100000"));
        assert!(
            validate_charge(request(100_000, "USD"), 100_000)
                .unwrap()
                .decline_reason
                .is_none()
        );
    }

    #[test]
    fn bad_amount_or_currency_is_invalid_argument() {
        for (amount, currency) in [(0, "USD"), (-5, "USD"), (5, "usd"), (5, "EURO"), (5, "")] {
            let err = validate_charge(request(amount, currency), 100_000).unwrap_err();
            assert_eq!(
                err.code(),
                tonic::Code::InvalidArgument,
                "{amount} {currency}"
            );
        }
    }
}
