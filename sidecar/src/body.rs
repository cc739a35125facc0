//! Bodies the proxy passes along, and the gRPC answers it makes itself.

use bytes::Bytes;
use http::{HeaderValue, Response};
use http_body::Body;
use http_body_util::BodyExt;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Every body the proxy sends: streamed straight through from the other side,
/// or a small one it made itself. Boxed so both directions share one type.
pub type ProxyBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

pub fn boxed<B>(body: B) -> ProxyBody
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}

pub fn empty() -> ProxyBody {
    boxed(http_body_util::Empty::<Bytes>::new())
}

/// Percent-encodes a grpc-message value (spaces and non-printables).
fn encode_message(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for byte in message.bytes() {
        if (0x20..=0x7e).contains(&byte) && byte != b'%' {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// gRPC status codes the proxy answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Code {
    InvalidArgument = 3,
    Unimplemented = 12,
    Unavailable = 14,
    DeadlineExceeded = 4,
    PermissionDenied = 7,
    Unauthenticated = 16,
    Internal = 13,
    ResourceExhausted = 8,
}

/// A trailers-only gRPC response: HTTP 200 with the status in the headers.
/// `proxy_error` marks answers the application never saw (see
/// `minimesh_traffic::retry::PROXY_ERROR_HEADER`), so a caller may retry them.
pub fn grpc_error(code: Code, message: &str, proxy_error: bool) -> Response<ProxyBody> {
    let mut response = Response::new(empty());
    let headers = response.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    headers.insert("grpc-status", HeaderValue::from((code as u8) as u32));
    if let Ok(value) = HeaderValue::from_str(&encode_message(message)) {
        headers.insert("grpc-message", value);
    }
    if proxy_error {
        headers.insert(
            minimesh_traffic::retry::PROXY_ERROR_HEADER,
            HeaderValue::from_static("1"),
        );
    }
    response
}

pub use minimesh_telemetry::status::grpc_status;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trailers_only_error_carries_status_message_and_marker() {
        let response = grpc_error(
            Code::PermissionDenied,
            "caller spiffe://x/ns/y/sa/z is not allowed",
            false,
        );
        assert_eq!(response.status(), http::StatusCode::OK);
        assert_eq!(grpc_status(response.headers()), Some(7));
        assert_eq!(
            response.headers()["grpc-message"],
            "caller spiffe://x/ns/y/sa/z is not allowed"
        );
        assert!(
            !response
                .headers()
                .contains_key(minimesh_traffic::retry::PROXY_ERROR_HEADER)
        );
        let refused = grpc_error(Code::Unavailable, "100% down\n", true);
        assert_eq!(refused.headers()["grpc-message"], "100%25 down%0A");
        assert!(
            refused
                .headers()
                .contains_key(minimesh_traffic::retry::PROXY_ERROR_HEADER)
        );
    }
}
