//! Every failure leaves as `{"error": {"code": "...", "message": "..."}}`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use super::Json;
use crate::domain::DomainError;
use crate::error::Error;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub retry_after_secs: Option<u64>,
    /// Extra fields of the `error` object (e.g. `queue` on a full line).
    pub details: Option<(&'static str, serde_json::Value)>,
    /// Shards other cluster nodes serve: the front sends the request there (see
    /// [`super::forward`]).
    /// (Boxed: every error answer carries the field, few a value.)
    pub elsewhere: Option<Box<Vec<crate::domain::ShardId>>>,
}

/// Put on an answer whose request belongs to shards other cluster nodes serve.
#[derive(Debug, Clone)]
pub struct Elsewhere(pub Vec<crate::domain::ShardId>);

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, code, message: message.into(), retry_after_secs: None, details: None, elsewhere: None }
    }

    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after_secs = Some(secs.max(1));
        self
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", message)
    }

    pub fn unauthorized() -> Self {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or wrong `Authorization: Bearer <admin token>`",
        )
    }

    pub fn too_large(limit: usize) -> Self {
        ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", format!("request body exceeds {limit} bytes"))
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let status = match &e {
            Error::Domain(d) => match d {
                DomainError::SoldOut { .. } => StatusCode::CONFLICT,
                DomainError::LimitExceeded { .. } => StatusCode::FORBIDDEN,
                DomainError::IdempotencyKeyReused | DomainError::RequestIdReused => StatusCode::UNPROCESSABLE_ENTITY,
                DomainError::OrderNotFound => StatusCode::NOT_FOUND,
                DomainError::InvalidState { .. } => StatusCode::CONFLICT,
                DomainError::AmountMismatch { .. } => StatusCode::UNPROCESSABLE_ENTITY,
                DomainError::PaymentIdConflict => StatusCode::CONFLICT,
                DomainError::PaymentNotFound => StatusCode::NOT_FOUND,
                DomainError::NoRefundOwed => StatusCode::CONFLICT,
                DomainError::InsufficientPoints { .. } => StatusCode::CONFLICT,
                DomainError::PointsOverflow | DomainError::AmountTooLarge => StatusCode::UNPROCESSABLE_ENTITY,
                DomainError::RedemptionNotFound => StatusCode::NOT_FOUND,
                DomainError::RedemptionSettled => StatusCode::CONFLICT,
                DomainError::NotRedeemable => StatusCode::CONFLICT,
                DomainError::GroupNotFound | DomainError::DealNotFound => StatusCode::NOT_FOUND,
                DomainError::GroupFull
                | DomainError::GroupClosed { .. }
                | DomainError::AlreadyInGroup
                | DomainError::LeftTooOften
                | DomainError::DealExists
                | DomainError::ProductRetired
                | DomainError::ProductOnSale
                | DomainError::OpenOrders { .. }
                | DomainError::ProductDeleted
                | DomainError::SaleNotStarted { .. }
                | DomainError::SaleEnded { .. } => StatusCode::CONFLICT,
                DomainError::CouponUnknown
                | DomainError::CouponDisabled
                | DomainError::CouponNotStarted
                | DomainError::CouponExpired
                | DomainError::CouponNotApplicable
                | DomainError::CouponExhausted
                | DomainError::CouponLimitPerBuyer { .. }
                | DomainError::CouponHoldExpired
                | DomainError::CouponExists
                | DomainError::CouponsFull => StatusCode::CONFLICT,
            },
            Error::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Error::ProductNotFound | Error::ActorNotFound(_) => StatusCode::NOT_FOUND,
            Error::ProductExists | Error::KeyMode(_) => StatusCode::CONFLICT,
            Error::BadSignature => StatusCode::UNAUTHORIZED,
            Error::StaleRequest { .. } => StatusCode::BAD_REQUEST,
            Error::Replayed => StatusCode::CONFLICT,
            Error::UnknownChannel(_) | Error::WebhookNotFound(_) => StatusCode::NOT_FOUND,
            Error::WebhookExists(_) | Error::WebhookFromConfig(_) | Error::WebhooksFull(_) | Error::BackupRunning => {
                StatusCode::CONFLICT
            }
            Error::ChannelFailed { .. } => StatusCode::BAD_GATEWAY,
            Error::Unsupported(_) => StatusCode::NOT_IMPLEMENTED,
            Error::Overloaded
            | Error::QueueFull(_)
            | Error::Timeout
            | Error::Unavailable(_)
            | Error::Elsewhere(_)
            | Error::NoOwner(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        if let Error::Elsewhere(shard) = &e {
            let mut err = ApiError::new(status, e.code(), e.to_string()).retry_after(1);
            err.elsewhere = Some(Box::new(vec![shard.clone()]));
            return err;
        }
        if let Error::QueueFull(q) = &e {
            let mut err = ApiError::new(status, e.code(), e.to_string())
                .retry_after(q.estimated_wait_ms.map_or(1, |ms| ms.div_ceil(1000)));
            let queue = serde_json::json!({
                "depth": q.depth,
                "drain_per_sec": q.drain_per_sec,
                "estimated_wait_ms": q.estimated_wait_ms,
            });
            err.details = Some(("queue", queue));
            return err;
        }
        if let Error::Domain(DomainError::OpenOrders { open }) = &e {
            let mut err = ApiError::new(status, e.code(), e.to_string());
            err.details = Some(("open_orders", serde_json::to_value(open).expect("counts serialise")));
            return err;
        }
        let window = match &e {
            Error::Domain(DomainError::SaleNotStarted { starts_at_ms, ends_at_ms }) => {
                Some((Some(*starts_at_ms), *ends_at_ms))
            }
            Error::Domain(DomainError::SaleEnded { starts_at_ms, ends_at_ms }) => {
                Some((*starts_at_ms, Some(*ends_at_ms)))
            }
            _ => None,
        };
        if let Some((starts, ends)) = window {
            let mut err = ApiError::new(status, e.code(), e.to_string());
            let ts = |ms: Option<u64>| ms.map(crate::domain::terms::rfc3339);
            err.details = Some(("sale_window", serde_json::json!({"starts_at": ts(starts), "ends_at": ts(ends)})));
            return err;
        }
        let err = ApiError::new(status, e.code(), e.to_string());
        if status == StatusCode::SERVICE_UNAVAILABLE {
            err.retry_after(1)
        } else {
            err
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        metrics::counter!("kami_http_errors_total", "code" => self.code).increment(1);
        let mut body = serde_json::json!({"error": {"code": self.code, "message": self.message}});
        if let Some((field, value)) = self.details {
            body["error"][field] = value;
        }
        let mut response = (self.status, Json(body)).into_response();
        if let Some(secs) = self.retry_after_secs {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if let Some(shards) = self.elsewhere.filter(|s| !s.is_empty()) {
            response.extensions_mut().insert(Elsewhere(*shards));
        }
        response
    }
}

/// Every error leaves in the JSON format, including the plain-text rejections of
/// axum's extractors (a path parameter that is not UTF-8, a bad query string): an
/// error response that is not JSON is rewritten with a code for its status and its
/// text (at most 512 bytes) as the message.
pub async fn as_json_error(response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 4096).await.unwrap_or_default();
    let mut message = String::from_utf8_lossy(&text).into_owned();
    if message.len() > 512 {
        let mut end = 512;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
    }
    let code = match status {
        StatusCode::BAD_REQUEST => "bad_request",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::UNPROCESSABLE_ENTITY => "invalid_request",
        s if s.is_server_error() => "internal",
        _ => "bad_request",
    };
    if message.is_empty() {
        message = status.canonical_reason().unwrap_or("error").to_string();
    }
    let mut rewritten = ApiError::new(status, code, message).into_response();
    for (name, value) in parts.headers.iter() {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            rewritten.headers_mut().insert(name.clone(), value.clone());
        }
    }
    rewritten
}
