//! Request parsing shared by the handlers: bounded body reads, strict JSON, auth.

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, StatusCode};
use serde::de::DeserializeOwned;
use subtle::ConstantTimeEq;

use super::error::ApiError;

/// Reads at most `limit` bytes; a larger body is 413 `payload_too_large`.
pub async fn body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, ApiError> {
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(ApiError::too_large(limit));
    }
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        while let Some(err) = source {
            if err.is::<http_body_util::LengthLimitError>() {
                return ApiError::too_large(limit);
            }
            source = err.source();
        }
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", format!("could not read the request body: {e}"))
    })
}

/// Parses JSON strictly: syntax errors are 400 `malformed_json`; wrong types,
/// missing or unknown fields are 422 `invalid_request` naming the field.
pub fn json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => ApiError::invalid(e.to_string()),
        _ => ApiError::new(StatusCode::BAD_REQUEST, "malformed_json", format!("request body is not valid JSON: {e}")),
    })
}

pub fn require_admin(headers: &HeaderMap, token: &str) -> Result<(), ApiError> {
    let given = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(bearer).unwrap_or("");
    if secret_matches(given, token) {
        Ok(())
    } else {
        Err(ApiError::unauthorized())
    }
}

/// The token of `Authorization: Bearer <token>` (RFC 7235 and 6750): the scheme in
/// any case, one space, then the token (visible ASCII), with nothing around it.
pub fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    // Any visible ASCII (a configured token may hold more than RFC 6750's b64token).
    let visible = |b: u8| b.is_ascii_graphic();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty() && token.bytes().all(visible)).then_some(token)
}

/// Compares a secret given by a client with the expected one in constant time.
pub fn secret_matches(given: &str, expected: &str) -> bool {
    !expected.is_empty() && given.len() == expected.len() && bool::from(given.as_bytes().ct_eq(expected.as_bytes()))
}

/// A header as text, if present; a header that is not visible ASCII is 422.
pub fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, ApiError> {
    match headers.get(name) {
        None => Ok(None),
        Some(v) => v.to_str().map(Some).map_err(|_| ApiError::invalid(format!("{name}: must be visible ASCII"))),
    }
}

/// An RFC 3339 time in field `field`, as ms since the Unix epoch (422 naming the
/// field otherwise).
pub fn time(field: &str, value: &str) -> Result<u64, ApiError> {
    crate::domain::terms::parse_rfc3339(value)
        .ok_or_else(|| ApiError::invalid(format!("{field}: not an RFC 3339 time (e.g. 2026-12-01T10:00:00Z)")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_follows_rfc_7235() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer abc"), Some("abc"), "the scheme is case-insensitive");
        assert_eq!(bearer("BEARER abc"), Some("abc"));
        for bad in
            ["Bearer  abc", "Bearer abc ", "Bearer", "Bearer ", "Basic abc", "Bearerabc", "Bearer a b", "Bearer\tabc"]
        {
            assert_eq!(bearer(bad), None, "{bad:?}");
        }
    }
}
