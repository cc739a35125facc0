//! The user and payment services, reached through this instance's sidecar:
//! clients that carry the trace context and name their upstream, and the
//! calls the domain logic makes on them.

use crate::OrderConfig;
use crate::OrderServiceError;
use crate::store::OrderRecord;
use minimesh_proto::payment::v1::payment_service_client::PaymentServiceClient;
use minimesh_proto::payment::v1::{ChargeRequest, Payment, RefundRequest};
use minimesh_proto::user::v1::GetUserRequest;
use minimesh_proto::user::v1::user_service_client::UserServiceClient;
use minimesh_runtime::trace::{RpcTrace, RpcTraceLayer};
use std::future::Future;
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

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

/// The peer services the order service calls.
pub(crate) struct Peers {
    users: UserServiceClient<Upstream>,
    payments: PaymentServiceClient<Upstream>,
}

impl Peers {
    pub(crate) fn new(config: &OrderConfig) -> Result<Self, OrderServiceError> {
        Ok(Self {
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
        })
    }

    pub(crate) async fn check_user(&self, user_id: &str) -> Result<(), Status> {
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

    /// Charges the order's payment (idempotent: the key is the order's id),
    /// repeating on UNAVAILABLE within `budget`.
    pub(crate) async fn charge(&self, order: &OrderRecord, budget: Duration) -> ChargeOutcome {
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

    /// Refunds a payment; false when the refund must be tried again later.
    pub(crate) async fn refund(&self, order_id: &str, payment_id: &str, budget: Duration) -> bool {
        let request = RefundRequest {
            payment_id: payment_id.to_owned(),
            idempotency_key: format!("refund:{order_id}"),
        };
        let mut payments = self.payments.clone();
        match tokio::time::timeout(budget, payments.refund(request)).await {
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
        }
    }
}

pub(crate) enum ChargeOutcome {
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
