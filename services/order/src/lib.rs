//! The order service: places orders (checking the user and charging through
//! the payment service), runs fulfilment, and streams status changes.
//!
//! - [`api`]: the gRPC API (the tonic service);
//! - [`validate`]: checking a new order, its total and fingerprint;
//! - [`upstream`]: the user and payment services, through the sidecar;
//! - [`orders`]: the domain logic: placing, settling, cancelling, refunding.

#![forbid(unsafe_code)]

mod api;
mod feed;
mod orders;
mod pg_store;
pub mod reconcile;
pub mod store;
mod upstream;
mod validate;
mod watch;
mod worker;

pub use api::{OrderApi, service};
pub use feed::Feed;
pub use orders::Orders;
pub use pg_store::PgOrderStore;
pub use store::{OrderFacts, OrderStore, SqliteOrderStore, StoreError, status};

pub(crate) use api::event_to_proto;

use minimesh_runtime::grpc;
use minimesh_runtime::store::DbTarget;
use std::future::Future;
use std::time::Duration;
use tokio::net::TcpListener;

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

/// Why the order service stopped or could not start.
#[derive(Debug, thiserror::Error)]
pub enum OrderServiceError {
    /// The database could not be opened or migrated.
    #[error("opening database {target}: {source}")]
    Db {
        /// The `--db` given.
        target: DbTarget,
        /// What opening failed with.
        source: minimesh_runtime::db::DbError,
    },
    /// The change feed could not read its starting position.
    #[error("starting the change feed: {0}")]
    Feed(#[from] StoreError),
    /// An upstream (user or payment) address is not a valid URI.
    #[error("invalid upstream address {addr:?}: {source}")]
    Upstream {
        /// The address given.
        addr: String,
        /// What tonic said of it.
        source: tonic::transport::Error,
    },
    /// The gRPC server failed.
    #[error(transparent)]
    Serve(#[from] grpc::ServeError),
    /// The metrics listener could not be bound.
    #[error(transparent)]
    Metrics(#[from] minimesh_runtime::metrics::AdminError),
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
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
