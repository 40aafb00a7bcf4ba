//! The server's door, in front of every route: a request is read whole (its body
//! bounded in size and in time) *before* it takes one of the server's in-flight
//! slots, so a client that trickles its body holds a connection, never a slot.
//! Slots are counted once across the server (`server.max_concurrent_requests`),
//! and payment notifications have slots of their own on top
//! (`server.reserved_notify_slots`): money already taken is heard first. Bodies
//! over 16 KiB (or of unknown length) also draw on a byte budget for the whole
//! server (`server.max_buffered_body_bytes`); smaller ones are bounded by the
//! connection limit.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::error::ApiError;

pub struct Intake {
    /// Slots every request may take.
    general: Arc<Semaphore>,
    /// Slots only payment notifications take (first; then the general ones).
    notify: Arc<Semaphore>,
    /// KiB of request bodies held in memory, all connections together.
    buffered_kib: Arc<Semaphore>,
    budget_kib: usize,
    max_body_bytes: usize,
    max_import_bytes: usize,
    body_timeout: Duration,
    admin_token: String,
    /// On a cluster node, the token other nodes send with their shard calls.
    forward_token: std::sync::OnceLock<String>,
}

impl Intake {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        max_concurrent: usize,
        reserved_notify: usize,
        max_buffered_body_bytes: u64,
        max_body_bytes: usize,
        max_import_bytes: usize,
        body_timeout: Duration,
        admin_token: String,
    ) -> Intake {
        Intake {
            general: Arc::new(Semaphore::new(max_concurrent)),
            notify: Arc::new(Semaphore::new(reserved_notify)),
            buffered_kib: Arc::new(Semaphore::new(kib(max_buffered_body_bytes) as usize)),
            budget_kib: kib(max_buffered_body_bytes) as usize,
            max_body_bytes,
            max_import_bytes,
            body_timeout,
            admin_token,
            forward_token: std::sync::OnceLock::new(),
        }
    }

    /// On a cluster node: the token other nodes' shard calls carry (once).
    pub fn set_forward_token(&self, token: String) {
        let _ = self.forward_token.set(token);
    }

    /// Bytes of large request bodies held now (what `server.max_buffered_body_bytes` bounds).
    pub fn buffered_body_bytes(&self) -> u64 {
        (self.budget_kib - self.buffered_kib.available_permits()) as u64 * 1024
    }

    /// The body limit of a request: key imports by the merchant and shard calls of
    /// other cluster nodes (keys to withdraw, units to add) may be larger (the token
    /// is checked before the body is read, so nobody else can send that much).
    fn body_limit(&self, req: &Request) -> usize {
        let post = req.method() == Method::POST;
        let node = || {
            let token = self.forward_token.get();
            req.headers()
                .get(&super::forward::FORWARDED)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|given| token.is_some_and(|t| super::extract::secret_matches(given, t)))
        };
        if post && req.uri().path().starts_with("/api/v1/cluster/shard/") && node() {
            return self.max_import_bytes;
        }
        let import = post && is_import_path(req.uri().path());
        let admin = || {
            req.headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(super::extract::bearer)
                .is_some_and(|t| super::extract::secret_matches(t, &self.admin_token))
        };
        if import && admin() {
            self.max_import_bytes
        } else {
            self.max_body_bytes
        }
    }
}

/// Bytes in whole KiB, rounded up (the unit of the body budget).
fn kib(bytes: u64) -> u32 {
    u32::try_from(bytes.div_ceil(1024)).unwrap_or(u32::MAX)
}

fn is_import_path(path: &str) -> bool {
    path.strip_prefix("/api/v1/products/")
        .and_then(|rest| rest.strip_suffix("/keys"))
        .is_some_and(|id| !id.contains('/'))
}

fn is_notify_path(path: &str) -> bool {
    path.strip_prefix("/api/v1/payments/")
        .and_then(|rest| rest.strip_suffix("/notify"))
        .is_some_and(|c| !c.contains('/'))
}

/// Bodies up to this size do not count against `server.max_buffered_body_bytes`.
pub const SMALL_BODY_BYTES: u64 = 16 << 10;

/// Most bytes read and thrown away after a 413, so that a client that writes its
/// whole body before reading sees the answer (RFC 9112 9.6: close lingeringly).
const MAX_DRAINED_BYTES: u64 = 4 << 20;

/// What an admitted request holds until its answer is made: its in-flight slot
/// and, for a large body, its share of the body budget.
pub struct Admitted {
    _slot: OwnedSemaphorePermit,
    _budget: Option<OwnedSemaphorePermit>,
}

impl Intake {
    /// The door: the request with its body read whole, and what it holds; or the
    /// answer that refuses it.
    pub async fn admit(&self, req: Request) -> Result<(Request, Admitted), Response> {
        door(self, req).await
    }
}

async fn door(intake: &Intake, req: Request) -> Result<(Request, Admitted), Response> {
    // (A request with both Transfer-Encoding and Content-Length never reaches this
    // point with both: hyper reads it by Transfer-Encoding alone, drops
    // Content-Length and closes the connection after the answer, RFC 9112 6.3.)
    let limit = intake.body_limit(&req);
    let (parts, body) = req.into_parts();
    let declared =
        parts.headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        // Answered now; what the client still writes is read and dropped meanwhile
        // (the connection closes after), at most one such task per connection.
        if declared.is_some_and(|len| len <= MAX_DRAINED_BYTES) {
            tokio::spawn(drain(body, intake.body_timeout));
        }
        return Err(closing(ApiError::too_large(limit)));
    }
    // A large body (or one of unknown length) takes its share of the server's body
    // budget until the answer is made. Small ones (every buyer's and gateway's) are
    // bounded by the connection limit instead, so a client holding the budget with
    // large trickled bodies never shuts out an order or a payment notification.
    // (A request with neither Content-Length nor Transfer-Encoding has no body:
    // its size hint says 0; only a chunked body's size is unknown.)
    let expected = http_body::Body::size_hint(&body).upper().or(declared);
    let budget = match expected {
        Some(len) if len <= SMALL_BODY_BYTES => None,
        _ => match intake.buffered_kib.clone().try_acquire_many_owned(kib(expected.unwrap_or(limit as u64))) {
            Ok(permit) => Some(permit),
            Err(_) => {
                crate::telemetry::count_rejection("concurrency");
                // As after a 413: what the client still sends is read and dropped.
                if expected.is_some_and(|len| len <= MAX_DRAINED_BYTES) {
                    tokio::spawn(drain(body, intake.body_timeout));
                }
                return Err(closing(ApiError::from(crate::error::Error::Overloaded)));
            }
        },
    };
    let bytes = match tokio::time::timeout(intake.body_timeout, axum::body::to_bytes(body, limit)).await {
        Err(_) => {
            crate::telemetry::count_rejection("slow_body");
            return Err(closing(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                format!("the request body did not arrive within {} ms", intake.body_timeout.as_millis()),
            )));
        }
        Ok(Err(e)) if is_too_large(&e) => return Err(closing(ApiError::too_large(limit))),
        Ok(Err(e)) => {
            return Err(closing(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                format!("could not read the request body: {e}"),
            )))
        }
        Ok(Ok(bytes)) => bytes,
    };
    let notify = parts.method == Method::POST && is_notify_path(parts.uri.path());
    let permit = if notify {
        intake.notify.clone().try_acquire_owned().or_else(|_| intake.general.clone().try_acquire_owned())
    } else {
        intake.general.clone().try_acquire_owned()
    };
    let Ok(slot) = permit else {
        crate::telemetry::count_rejection("concurrency");
        return Err(ApiError::from(crate::error::Error::Overloaded).into_response());
    };
    Ok((Request::from_parts(parts, Body::from(bytes)), Admitted { _slot: slot, _budget: budget }))
}

fn is_too_large(e: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if err.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = err.source();
    }
    false
}

/// Reads and drops what the client still sends, within `timeout`.
async fn drain(body: Body, timeout: Duration) {
    use http_body_util::BodyExt;
    let mut body = body;
    let _ = tokio::time::timeout(timeout, async {
        let mut seen = 0u64;
        while let Some(Ok(frame)) = body.frame().await {
            seen += frame.data_ref().map_or(0, |d| d.len() as u64);
            if seen > MAX_DRAINED_BYTES {
                break;
            }
        }
    })
    .await;
}

/// An error after which the connection is closed (the body may be unread).
fn closing(error: ApiError) -> Response {
    let mut response = error.into_response();
    response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        assert!(is_import_path("/api/v1/products/p1/keys"));
        assert!(!is_import_path("/api/v1/products/p1/x/keys"));
        assert!(!is_import_path("/api/v1/products/p1"));
        assert!(is_notify_path("/api/v1/payments/sandbox/notify"));
        assert!(!is_notify_path("/api/v1/payments/a/b/notify"));
    }
}
