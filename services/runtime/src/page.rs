//! Opaque page tokens for keyset pagination.
//!
//! A token wraps the position of the last row of the previous page. Pages
//! are complete only if that position follows commit order: UUIDv7 ids do
//! within one process, but across processes (replicas) only to the
//! millisecond, so the order service pages by a commit-ordered sequence
//! (see its store) and puts that in the token instead of the id.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// Page size when the request asks for none.
pub const DEFAULT_PAGE_SIZE: u32 = 50;
/// The largest page served; larger requests get this many.
pub const MAX_PAGE_SIZE: u32 = 1000;

/// Checks a requested page size; 0 means the default.
pub fn page_size(requested: i32) -> Result<u32, tonic::Status> {
    match requested {
        n if n < 0 => Err(tonic::Status::invalid_argument(format!(
            "page_size must not be negative, got {n}"
        ))),
        0 => Ok(DEFAULT_PAGE_SIZE),
        n => Ok((n as u32).min(MAX_PAGE_SIZE)),
    }
}

/// The page token that continues after `last_id`.
pub fn encode_token(last_id: &str) -> String {
    URL_SAFE_NO_PAD.encode(format!("after:{last_id}"))
}

/// Decodes a page token; empty means the first page.
pub fn decode_token(token: &str) -> Result<Option<String>, tonic::Status> {
    if token.is_empty() {
        return Ok(None);
    }
    let invalid =
        || tonic::Status::invalid_argument("page_token is not a token this server issued");
    let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| invalid())?;
    let text = String::from_utf8(bytes).map_err(|_| invalid())?;
    text.strip_prefix("after:")
        .map(|id| Some(id.to_owned()))
        .ok_or_else(invalid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_round_trips() {
        let token = encode_token("usr_123");
        assert_eq!(decode_token(&token).unwrap().as_deref(), Some("usr_123"));
        assert_eq!(decode_token("").unwrap(), None);
    }

    #[test]
    fn garbage_token_is_invalid_argument() {
        let err = decode_token("!!!not-base64").unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        let err = decode_token(&URL_SAFE_NO_PAD.encode("before:x")).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
    }

    #[test]
    fn page_size_bounds() {
        assert_eq!(page_size(0).unwrap(), DEFAULT_PAGE_SIZE);
        assert_eq!(page_size(5000).unwrap(), MAX_PAGE_SIZE);
        assert_eq!(
            page_size(-1).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }
}
