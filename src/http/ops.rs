//! Liveness, readiness and metrics.

use super::Json;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use serde_json::json;

use super::error::ApiError;
use super::AppState;

pub async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

/// 200 only once start-up recovery has finished, and (on the jetstream backend)
/// while this server holds the stream's writer lease and is connected to its
/// servers; otherwise 503 `recovering` or `unavailable`, with the reason.
pub async fn readyz(State(st): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    st.core()?;
    if let Some(why) = st.not_serving() {
        return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", why).retry_after(1));
    }
    Ok(Json(json!({"status": "ready"})))
}

pub async fn metrics(
    State(st): State<AppState>,
    headers: axum::http::HeaderMap,
    uri: axum::http::Uri,
) -> Result<impl IntoResponse, ApiError> {
    st.require_ops(&headers, uri.query())?;
    if let Ok(core) = st.core() {
        for (id, route) in core.registry().all().iter() {
            let shelf = route.shelf.get();
            metrics::gauge!("kami_product_on_sale", "product" => id.clone()).set(if shelf.sells() { 1.0 } else { 0.0 });
            if shelf == crate::domain::shelf::Shelf::Deleted {
                continue;
            }
            let c = route.counts();
            metrics::gauge!("kami_stock_available", "product" => id.clone()).set(c.available as f64);
            metrics::gauge!("kami_stock_reserved", "product" => id.clone()).set(c.reserved as f64);
            metrics::gauge!("kami_stock_sold", "product" => id.clone()).set(c.sold as f64);
            let (depth, drain) = route.line();
            metrics::gauge!("kami_admission_queue_depth", "product" => id.clone()).set(depth as f64);
            metrics::gauge!("kami_admission_drain_per_second", "product" => id.clone()).set(drain as f64);
        }
        metrics::gauge!("kami_points_queue_depth").set(core.points_queue_depth() as f64);
        for (i, c) in core.channels().all().iter().enumerate() {
            // 0 closed, 1 half-open, 2 open.
            metrics::gauge!("kami_payment_channel_state", "channel" => c.name.clone())
                .set(core.channels().level(i) as f64);
        }
    }
    metrics::gauge!("kami_payment_conversion_ratio").set(crate::telemetry::conversion_ratio());
    metrics::gauge!("kami_buffered_body_bytes").set(st.intake.buffered_body_bytes() as f64);
    // 1 while stock can be written where it is kept (always, in the data directory).
    metrics::gauge!("kami_storage_serving").set(if st.not_serving().is_none() { 1.0 } else { 0.0 });
    let handle = crate::telemetry::metrics_handle();
    handle.run_upkeep();
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], handle.render()))
}

/// The operator's live page: static HTML whose script polls `/status.json` every
/// second. Served by kami itself, no build step.
pub async fn status_page() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], include_str!("status.html"))
}

/// Most products listed by `/status.json` (the busiest first).
const MAX_STATUS_PRODUCTS: usize = 200;

/// What the status page shows: per product stock, orders and its line; payment
/// channels; refused requests. Totals since start; the page turns them into rates.
pub async fn status_json(
    State(st): State<AppState>,
    headers: axum::http::HeaderMap,
    uri: axum::http::Uri,
) -> Result<Json<serde_json::Value>, ApiError> {
    st.require_ops(&headers, uri.query())?;
    let Ok(core) = st.core() else {
        let storage = st.storage_status();
        return Ok(Json(json!({"ready": false, "uptime_secs": st.started.elapsed().as_secs(), "storage": storage})));
    };
    let routes = core.registry().all();
    // What needs attention counts every product: a deleted one can still owe a refund
    // (a payment that came after its order expired). One read of each product's counts.
    let (mut refunds_owed, mut paid_waiting) = (0, 0);
    let mut products: Vec<serde_json::Value> = Vec::with_capacity(routes.len());
    for (id, route) in routes.iter() {
        let c = route.counts();
        refunds_owed += c.refunds_owed;
        paid_waiting += c.paid_waiting;
        let shelf = route.shelf.get();
        if shelf == crate::domain::shelf::Shelf::Deleted {
            continue;
        }
        let (depth, drain) = route.line();
        products.push(json!({
            "id": id,
            "shards": route.shards.len(),
            "on_sale": shelf.sells(),
            "sold_out": c.available == 0 && c.reserved == 0 && c.imported > 0,
            "refunds_owed": c.refunds_owed,
            "paid_waiting": c.paid_waiting,
            "available": c.available,
            "reserved": c.reserved,
            "sold": c.sold,
            "orders": c.orders,
            "queue_depth": depth,
            "drain_per_sec": drain,
        }));
    }
    products.sort_by_key(|p| std::cmp::Reverse(p["orders"].as_u64()));
    products.truncate(MAX_STATUS_PRODUCTS);
    let channels: Vec<_> = core
        .channels()
        .all()
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let state = ["closed", "half_open", "open"].get(core.channels().level(i) as usize).unwrap_or(&"open");
            json!({"name": c.name, "state": state})
        })
        .collect();
    let backlog_bound = core.webhooks().settings.max_pending_records;
    let webhooks: Vec<_> = core
        .webhooks()
        .all()
        .iter()
        .map(|e| {
            use std::sync::atomic::Ordering::Relaxed;
            let pending = e.live.pending_records.load(Relaxed);
            json!({
                "name": e.name,
                "pending_records": pending,
                "over_bound": pending > backlog_bound,
                "failing": e.live.failing.lock().unwrap_or_else(|p| p.into_inner()).len(),
                "dead": e.live.dead.load(Relaxed),
                "delivered": e.live.delivered.load(Relaxed),
                "lag_seconds": e.live.lag_ms.load(Relaxed) as f64 / 1000.0,
                "breaker": if e.live.breaker_open.load(Relaxed) { "open" } else { "closed" },
            })
        })
        .collect();
    let rejected: serde_json::Map<String, serde_json::Value> =
        crate::telemetry::rejections().map(|(r, n)| (r.to_string(), json!(n))).collect();
    let (created, delivered) = crate::telemetry::order_totals();
    Ok(Json(json!({
        "ready": true,
        "uptime_secs": st.started.elapsed().as_secs(),
        "products": products,
        "channels": channels,
        "webhooks": webhooks,
        "rejected": rejected,
        "buffered_body_bytes": st.intake.buffered_body_bytes(),
        "storage": st.storage_status(),
        "cluster": st.cluster().map(|c| c.describe()),
        "orders": {"created": created, "delivered": delivered, "conversion": crate::telemetry::conversion_ratio()},
        "attention": {
            "refunds_owed": refunds_owed,
            "paid_waiting": paid_waiting,
            "amount_mismatches": crate::telemetry::amount_mismatches(),
        },
        "history": {
            "interval_ms": 1000,
            "samples": crate::telemetry::history::history(),
        },
    })))
}

pub async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "method not allowed on this endpoint")
}
