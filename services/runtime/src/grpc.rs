//! The gRPC server scaffolding every service uses: health, reflection of all
//! three shop APIs (v1 and v1alpha), message size limits and graceful drain.

use std::future::Future;
use std::time::Duration;
use tokio::net::TcpListener;
use tonic::server::NamedService;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::store::Backend;

/// Largest message a service accepts or sends; larger ones get RESOURCE_EXHAUSTED.
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// Why a service's gRPC server stopped or could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The reflection service could not read the descriptor sets.
    #[error("building reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The server failed to bind or serve.
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Serves `service` on `listener` with health and reflection until
/// `shutdown` resolves, then reports NOT_SERVING and drains in-flight calls.
/// Health also reports NOT_SERVING while `store` is down.
pub async fn serve<S>(
    listener: TcpListener,
    service: S,
    store: Backend,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError>
where
    S: tonic::codegen::Service<
            http::Request<tonic::body::Body>,
            Response = http::Response<tonic::body::Body>,
            Error = std::convert::Infallible,
        > + NamedService
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    let (reporter, health_service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status(S::NAME, ServingStatus::Serving)
        .await;
    reporter
        .set_service_status("", ServingStatus::Serving)
        .await;

    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;

    let probe_store = store.clone();
    let _probe = store.health().start_probing(move || {
        let store = probe_store.clone();
        async move { store.probe().await }
    });
    let follow = tokio::spawn(follow_store(
        store.health().subscribe(),
        reporter.clone(),
        S::NAME,
    ));
    let drain = async move {
        shutdown.await;
        follow.abort();
        drain_on(reporter, S::NAME).await;
    };
    Server::builder()
        .layer(crate::limit::MessageLimitLayer::new(MAX_MESSAGE_BYTES))
        .layer(crate::trace::RpcTraceLayer::server())
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(service)
        .serve_with_incoming_shutdown(
            // Nagle plus delayed ACKs would hold back small responses by ~40 ms.
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            drain,
        )
        .await?;
    Ok(())
}

/// What reflection describes: the shop APIs, health, and both reflection
/// services themselves. tonic-reflection's builders add only their own
/// version's descriptor, so a v1alpha client (grpcurl 1.8) would not see v1.
fn reflection() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .include_reflection_service(false)
        .register_encoded_file_descriptor_set(minimesh_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET)
}

/// Mirrors the store's state in gRPC health.
async fn follow_store(
    mut store: tokio::sync::watch::Receiver<Option<String>>,
    reporter: HealthReporter,
    name: &'static str,
) {
    loop {
        let status = if store.borrow_and_update().is_some() {
            ServingStatus::NotServing
        } else {
            ServingStatus::Serving
        };
        reporter.set_service_status(name, status).await;
        reporter.set_service_status("", status).await;
        if store.changed().await.is_err() {
            return;
        }
    }
}

async fn drain_on(reporter: HealthReporter, name: &'static str) {
    // Tell load balancers and probes first, then stop accepting.
    reporter
        .set_service_status(name, ServingStatus::NotServing)
        .await;
    reporter
        .set_service_status("", ServingStatus::NotServing)
        .await;
}

/// The status a caller gets for a store error: UNAVAILABLE saying the store
/// is down or busy (safe to retry: nothing was written), INTERNAL otherwise.
pub fn store_status(service: &str, err: &crate::db::DbError) -> tonic::Status {
    if err.is_store_down() {
        tracing::warn!(%err, "{service} store is down");
        let reason = match err {
            crate::db::DbError::Down(reason) => reason.clone(),
            other => other.to_string(),
        };
        tonic::Status::unavailable(format!("{service} store is down: {reason}"))
    } else if err.is_busy() {
        tracing::warn!(%err, "{service} store is busy");
        tonic::Status::unavailable(format!("{service} store is busy, try again"))
    } else {
        tracing::error!(%err, "{service} store failed");
        tonic::Status::internal(format!("{service} store failed: {err}"))
    }
}
