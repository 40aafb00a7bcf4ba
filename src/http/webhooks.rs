//! Merchant webhook routes (`/api/v1/admin/webhooks`): endpoints added, listed and
//! deleted at run time, their deliveries (pending, failing, dead) and redelivery
//! of dead letters.

use std::sync::atomic::Ordering;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};

use serde::Deserialize;
use serde_json::{json, Value};

use super::api::ApiResult;
use super::error::ApiError;
use super::{extract, AppState, Json};
use crate::config::EndpointSettings;
use crate::core::webhooks::{Endpoint, NewEndpoint, Redeliver};

/// Most dead letters in one page.
const MAX_LISTED: usize = 1_000;

/// `POST /api/v1/admin/webhooks`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddEndpoint {
    name: String,
    url: String,
    secret: String,
    #[serde(default)]
    events: Vec<String>,
    #[serde(default)]
    include_keys: bool,
    timeout_ms: Option<u64>,
    retry_horizon_secs: Option<u64>,
    max_in_flight: Option<u32>,
}

/// What the merchant sees of an endpoint (never its secret).
pub fn view(e: &Endpoint) -> Value {
    let live = &e.live;
    json!({
        "name": e.name,
        "url": e.settings.url,
        "events": e.events.iter().map(|t| t.as_str()).collect::<Vec<_>>(),
        "include_keys": e.settings.include_keys,
        "timeout_ms": e.settings.timeout_ms,
        "retry_horizon_secs": e.settings.retry_horizon_secs,
        "max_in_flight": e.settings.max_in_flight,
        "source": if e.from_config { "config" } else { "api" },
        "created_at": super::views::ts(e.created_at_ms),
        "delivered": live.delivered.load(Ordering::Relaxed),
        "failed_attempts": live.failed_attempts.load(Ordering::Relaxed),
        "pending_records": live.pending_records.load(Ordering::Relaxed),
        "failing": live.failing.lock().unwrap_or_else(|p| p.into_inner()).len(),
        "dead": live.dead.load(Ordering::Relaxed),
        "lag_seconds": live.lag_ms.load(Ordering::Relaxed) as f64 / 1000.0,
        "breaker": if live.breaker_open.load(Ordering::Relaxed) { "open" } else { "closed" },
    })
}

/// `POST /api/v1/admin/webhooks` (merchant): 201 with the endpoint. It is sent
/// what happens from now on.
pub async fn add(State(st): State<AppState>, headers: HeaderMap, body: Body) -> ApiResult<(StatusCode, Json<Value>)> {
    let (core, req): (_, AddEndpoint) = st.admin_json(&headers, body).await?;
    let settings = EndpointSettings {
        url: req.url,
        secret: req.secret,
        events: req.events,
        include_keys: req.include_keys,
        timeout_ms: req.timeout_ms.unwrap_or(5_000),
        retry_horizon_secs: req.retry_horizon_secs.unwrap_or(86_400),
        max_in_flight: req.max_in_flight.unwrap_or(4),
    };
    let endpoint = core.add_webhook(NewEndpoint { name: req.name, settings }).await?;
    Ok((StatusCode::CREATED, Json(view(&endpoint))))
}

/// `GET /api/v1/admin/webhooks` (merchant): every endpoint, by name.
pub async fn list(State(st): State<AppState>, headers: HeaderMap) -> ApiResult<Json<Value>> {
    st.require_admin(&headers)?;
    let all = st.core()?.webhooks().all();
    Ok(Json(json!({"webhooks": all.iter().map(|e| view(e)).collect::<Vec<_>>()})))
}

/// `GET /api/v1/admin/webhooks/{name}` (merchant).
pub async fn get(State(st): State<AppState>, Path(name): Path<String>, headers: HeaderMap) -> ApiResult<Json<Value>> {
    st.require_admin(&headers)?;
    let endpoint = st.core()?.webhook(&name)?;
    Ok(Json(view(&endpoint)))
}

/// `DELETE /api/v1/admin/webhooks/{name}` (merchant): an endpoint added through
/// the API, with its cursors and dead letters; 409 `webhook_from_config` for one
/// in the configuration file.
pub async fn delete(
    State(st): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Json<Value>> {
    st.require_admin(&headers)?;
    st.core()?.delete_webhook(&name).await?;
    Ok(Json(json!({"deleted": name})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliveriesQuery {
    status: Option<String>,
    after: Option<String>,
    limit: Option<usize>,
}

type Deliveries = Result<axum::extract::Query<DeliveriesQuery>, axum::extract::rejection::QueryRejection>;

/// `GET /api/v1/admin/webhooks/{name}/deliveries?status=pending|failed|dead`
/// (merchant): `pending`, the journal records not sent yet; `failed`, events
/// being retried, with attempts and the last error; `dead`, events given up on
/// (paged by `after`, an event id).
pub async fn deliveries(
    State(st): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    query: Deliveries,
) -> ApiResult<Json<Value>> {
    st.require_admin(&headers)?;
    let axum::extract::Query(q) = query.map_err(|e| ApiError::invalid(format!("query: {e}")))?;
    let core = st.core()?;
    let endpoint = core.webhook(&name)?;
    let ts = super::views::ts;
    match q.status.as_deref().unwrap_or("failed") {
        "pending" => Ok(Json(json!({
            "status": "pending",
            "pending_records": endpoint.live.pending_records.load(Ordering::Relaxed),
            "lag_seconds": endpoint.live.lag_ms.load(Ordering::Relaxed) as f64 / 1000.0,
        }))),
        "failed" => {
            let failing = endpoint.live.failing.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let list: Vec<Value> = failing
                .iter()
                .map(|(id, f)| {
                    json!({
                        "event_id": id,
                        "type": f.kind.as_str(),
                        "attempts": f.attempts,
                        "last_error": f.last_error,
                        "first_failed_at": ts(f.first_failed_ms),
                        "next_attempt_at": ts(f.next_attempt_ms),
                    })
                })
                .collect();
            Ok(Json(json!({"status": "failed", "deliveries": list})))
        }
        "dead" => {
            let limit = q.limit.unwrap_or(100).clamp(1, MAX_LISTED);
            let dead = core.dead_letters(&name, q.after.as_deref().unwrap_or(""), limit)?;
            let next = (dead.len() == limit).then(|| dead.last().map(|d| d.event_id.clone())).flatten();
            let list: Vec<Value> = dead
                .iter()
                .map(|d| {
                    json!({
                        "event_id": d.event_id,
                        "type": d.kind,
                        "at": ts(d.at_ms),
                        "attempts": d.attempts,
                        "last_error": d.last_error,
                        "died_at": ts(d.died_at_ms),
                        "body": serde_json::from_slice::<Value>(&d.body).unwrap_or(Value::Null),
                    })
                })
                .collect();
            Ok(Json(json!({"status": "dead", "deliveries": list, "next_after": next})))
        }
        other => Err(ApiError::invalid(format!("status: {other:?} is not pending, failed or dead"))),
    }
}

/// `POST .../redeliver`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RedeliverRequest {
    event_id: Option<String>,
    from: Option<String>,
    to: Option<String>,
}

/// `POST /api/v1/admin/webhooks/{name}/redeliver` (merchant), `{"event_id": ...}`
/// or `{"from": RFC 3339, "to": RFC 3339}`: queues dead letters to be sent once
/// more; 202 with how many.
pub async fn redeliver(
    State(st): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let (core, req): (_, RedeliverRequest) = st.admin_json(&headers, body).await?;
    let which = match (req.event_id, req.from, req.to) {
        (Some(id), None, None) => Redeliver::Event(id),
        (None, Some(from), Some(to)) => {
            Redeliver::Between { from_ms: extract::time("from", &from)?, to_ms: extract::time("to", &to)? }
        }
        _ => return Err(ApiError::invalid("give either event_id, or from and to")),
    };
    let queued = core.redeliver(&name, which)?;
    Ok((StatusCode::ACCEPTED, Json(json!({"queued": queued}))))
}
