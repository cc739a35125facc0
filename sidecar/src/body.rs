//! Bodies the proxy passes along, and the gRPC answers it makes itself.

use bytes::Bytes;
use http::{HeaderValue, Response};
use http_body::Body;
use http_body_util::BodyExt;

/// The error type of every body the proxy passes along.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Every body the proxy sends: streamed straight through from the other side,
/// or a small one it made itself. Boxed so both directions share one type.
pub type ProxyBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// Boxes any body into a [`ProxyBody`].
pub fn boxed<B>(body: B) -> ProxyBody
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}

/// An empty body, for answers that carry only headers.
pub fn empty() -> ProxyBody {
    boxed(http_body_util::Empty::<Bytes>::new())
}

/// The gRPC status in a header map (trailers, or a trailers-only response).
pub use minimesh_telemetry::status::grpc_status;
/// gRPC status codes, as tonic names them.
pub use tonic::Code;

/// A trailers-only gRPC response: HTTP 200 with the status in the headers,
/// as tonic writes it. `proxy_error` marks answers the application never saw
/// (see `minimesh_traffic::retry::PROXY_ERROR_HEADER`), so a caller may retry them.
pub fn grpc_error(code: Code, message: &str, proxy_error: bool) -> Response<ProxyBody> {
    let mut response = tonic::Status::new(code, message).into_http::<ProxyBody>();
    if proxy_error {
        response.headers_mut().insert(
            minimesh_traffic::retry::PROXY_ERROR_HEADER,
            HeaderValue::from_static("1"),
        );
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use minimesh_telemetry::status::grpc_message;

    #[test]
    fn trailers_only_error_carries_status_message_and_marker() {
        let response = grpc_error(
            Code::PermissionDenied,
            "caller spiffe://x/ns/y/sa/z is not allowed",
            false,
        );
        assert_eq!(response.status(), http::StatusCode::OK);
        assert_eq!(grpc_status(response.headers()), Some(7));
        assert_eq!(response.headers()["content-type"], "application/grpc");
        assert_eq!(
            grpc_message(response.headers()).as_deref(),
            Some("caller spiffe://x/ns/y/sa/z is not allowed")
        );
        assert!(
            !response
                .headers()
                .contains_key(minimesh_traffic::retry::PROXY_ERROR_HEADER)
        );
        let refused = grpc_error(Code::Unavailable, "100% down\n", true);
        assert_eq!(refused.headers()["grpc-message"], "100%25%20down%0A");
        assert_eq!(
            grpc_message(refused.headers()).as_deref(),
            Some("100% down\n")
        );
        assert!(
            refused
                .headers()
                .contains_key(minimesh_traffic::retry::PROXY_ERROR_HEADER)
        );
    }
}
