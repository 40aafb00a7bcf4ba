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
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .unwrap_or("");
    let ok = given.len() == token.len() && bool::from(given.as_bytes().ct_eq(token.as_bytes()));
    if ok {
        Ok(())
    } else {
        Err(ApiError::unauthorized())
    }
}

/// A header as text, if present; a header that is not visible ASCII is 422.
pub fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, ApiError> {
    match headers.get(name) {
        None => Ok(None),
        Some(v) => v.to_str().map(Some).map_err(|_| ApiError::invalid(format!("{name}: must be visible ASCII"))),
    }
}
