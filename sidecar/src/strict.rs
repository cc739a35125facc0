//! What the proxy accepts as a gRPC call: POST, a gRPC content type,
//! `te: trailers`, and a well-formed `grpc-timeout` if any. Anything else is
//! answered here with a clear status instead of being served as if it were
//! gRPC (HTTP status codes as the gRPC-over-HTTP/2 spec asks for).

use crate::body::{Code, ProxyBody, grpc_error};
use http::{Method, Request, Response, StatusCode};
use minimesh_traffic::deadline::Deadline;

/// The call's deadline, or the response that refuses the request.
pub fn check<B>(request: &Request<B>) -> Result<Option<Deadline>, Box<Response<ProxyBody>>> {
    if request.method() != Method::POST {
        let mut refusal = grpc_error(
            Code::Unimplemented,
            &format!("gRPC calls are POST requests, not {}", request.method()),
            false,
        );
        *refusal.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
        refusal
            .headers_mut()
            .insert(http::header::ALLOW, http::HeaderValue::from_static("POST"));
        return Err(Box::new(refusal));
    }
    let content_type = request
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let grpc = content_type == "application/grpc"
        || content_type.starts_with("application/grpc+")
        || content_type.starts_with("application/grpc;");
    if !grpc {
        let mut refusal = grpc_error(
            Code::InvalidArgument,
            &format!("content-type {content_type:?} is not a gRPC content type (application/grpc)"),
            false,
        );
        *refusal.status_mut() = StatusCode::UNSUPPORTED_MEDIA_TYPE;
        return Err(Box::new(refusal));
    }
    let trailers = request
        .headers()
        .get(http::header::TE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|te| {
            te.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        });
    if !trailers {
        return Err(Box::new(grpc_error(
            Code::InvalidArgument,
            "gRPC calls carry te: trailers",
            false,
        )));
    }
    Deadline::try_from_headers(request.headers())
        .map_err(|message| Box::new(grpc_error(Code::InvalidArgument, &message, false)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::body::grpc_status;

    fn call() -> http::request::Builder {
        Request::post("/shop.user.v1.UserService/GetUser")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
    }

    fn refusal(request: Request<()>) -> (StatusCode, u32) {
        let response = check(&request).expect_err("refused");
        (
            response.status(),
            grpc_status(response.headers()).unwrap_or(0),
        )
    }

    #[test]
    fn a_well_formed_call_passes_with_its_deadline() {
        assert!(check(&call().body(()).unwrap()).unwrap().is_none());
        let with_deadline = call().header("grpc-timeout", "250m").body(()).unwrap();
        let deadline = check(&with_deadline).unwrap().unwrap();
        assert!(deadline.remaining() <= std::time::Duration::from_millis(250));
        let proto = Request::post("/x/y")
            .header("content-type", "application/grpc+proto")
            .header("te", "trailers")
            .body(())
            .unwrap();
        assert!(check(&proto).is_ok());
    }

    #[test]
    fn everything_else_is_refused_with_its_own_status() {
        for method in [Method::PUT, Method::DELETE, Method::GET] {
            let request = Request::builder()
                .method(method)
                .uri("/shop.user.v1.UserService/GetUser")
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .body(())
                .unwrap();
            assert_eq!(refusal(request), (StatusCode::METHOD_NOT_ALLOWED, 12));
        }
        for content_type in ["application/json", "text/plain", "application/grpcx", ""] {
            let request = Request::post("/x/y")
                .header("te", "trailers")
                .header("content-type", content_type)
                .body(())
                .unwrap();
            assert_eq!(
                refusal(request),
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, 3),
                "{content_type:?}"
            );
        }
        let no_te = Request::post("/x/y")
            .header("content-type", "application/grpc")
            .body(())
            .unwrap();
        assert_eq!(refusal(no_te), (StatusCode::OK, 3));
        for timeout in ["abc", "-1S", "99999999999H", "1.5S", "10"] {
            let request = call().header("grpc-timeout", timeout).body(()).unwrap();
            assert_eq!(refusal(request), (StatusCode::OK, 3), "{timeout}");
        }
    }
}
