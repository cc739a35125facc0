//! Whether the local application can take calls, for the sidecar's `/ready`:
//! it reports SERVING on `grpc.health.v1`, or it has no health service and
//! says so in gRPC (UNIMPLEMENTED with a gRPC content type). The latter lets
//! the proxy mesh services it did not write; a plain HTTP 404, which tonic
//! also turns into UNIMPLEMENTED, does not count.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

/// `Ok` when the application at `url` can take calls, else why not.
pub(crate) async fn serving(url: &str) -> Result<(), String> {
    let endpoint =
        tonic::transport::Endpoint::from_shared(url.to_owned()).map_err(|e| e.to_string())?;
    let channel = endpoint
        .connect_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(1))
        .connect()
        .await
        .map_err(|e| format!("local service unreachable: {e}"))?;
    let answered_in_grpc = Arc::new(AtomicBool::new(false));
    let noted = answered_in_grpc.clone();
    let channel = tower::ServiceBuilder::new()
        .map_response(move |response: http::Response<tonic::body::Body>| {
            noted.store(is_grpc(response.headers()), Ordering::Relaxed);
            response
        })
        .service(channel);
    let response = match HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
    {
        Ok(response) => response,
        Err(status)
            if status.code() == tonic::Code::Unimplemented
                && answered_in_grpc.load(Ordering::Relaxed) =>
        {
            return Ok(());
        }
        Err(status) if status.code() == tonic::Code::Unimplemented => {
            return Err(
                "the local service does not answer gRPC (HTTP without a gRPC content type)"
                    .to_owned(),
            );
        }
        Err(status) => return Err(format!("health check failed: {}", status.message())),
    };
    match ServingStatus::try_from(response.get_ref().status) {
        Ok(ServingStatus::Serving) => Ok(()),
        Ok(other) => Err(format!("local service reports {}", other.as_str_name())),
        Err(_) => Err("local service reports an unknown status".to_owned()),
    }
}

/// A gRPC server's answer, as opposed to some other HTTP server's.
fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Full;
    use hyper::body::Bytes;
    use hyper_util::rt::{TokioExecutor, TokioIo};

    /// An h2c server answering every request with `status` and `headers`.
    async fn h2c_answering(
        status: u16,
        headers: &'static [(&'static str, &'static str)],
    ) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |_request| async move {
                        let mut response = http::Response::builder().status(status);
                        for (name, value) in headers {
                            response = response.header(*name, *value);
                        }
                        response.body(Full::new(Bytes::new()))
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        format!("http://{addr}")
    }

    #[tokio::test]
    async fn a_grpc_service_without_health_is_ready() {
        let url = h2c_answering(
            200,
            &[("content-type", "application/grpc"), ("grpc-status", "12")],
        )
        .await;
        assert_eq!(serving(&url).await, Ok(()));
    }

    #[tokio::test]
    async fn an_http_server_that_is_not_grpc_is_not_ready() {
        let url = h2c_answering(404, &[("content-type", "text/plain")]).await;
        let why = serving(&url).await.unwrap_err();
        assert!(why.contains("does not answer gRPC"), "{why}");
    }

    #[tokio::test]
    async fn a_failing_health_check_is_not_ready_and_says_why() {
        let url = h2c_answering(
            200,
            &[
                ("content-type", "application/grpc"),
                ("grpc-status", "14"),
                ("grpc-message", "store is down"),
            ],
        )
        .await;
        let why = serving(&url).await.unwrap_err();
        assert!(why.contains("store is down"), "{why}");
    }
}
