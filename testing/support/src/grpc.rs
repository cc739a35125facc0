//! Stand-in gRPC applications.

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_stream::wrappers::TcpListenerStream;

/// Serves `grpc.health.v1.Health` (reporting SERVING) and nothing else on
/// `listener`, until the returned sender is dropped or sent to.
pub fn serve_health(listener: TcpListener) -> oneshot::Sender<()> {
    let (_reporter, health) = tonic_health::server::health_reporter();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health)
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
                let _ = stopped.await;
            }),
    );
    stop
}
