//! Liveness, readiness and metrics.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use serde_json::json;

use super::error::ApiError;
use super::AppState;

pub async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

/// 200 only once start-up recovery has finished.
pub async fn readyz(State(st): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    st.core()?;
    Ok(Json(json!({"status": "ready"})))
}

pub async fn metrics(State(st): State<AppState>) -> impl IntoResponse {
    if let Ok(core) = st.core() {
        for (id, route) in core.registry().all().iter() {
            let (mut available, mut reserved, mut sold) = (0, 0, 0);
            for s in &route.shards {
                let c = s.gauge.get();
                available += c.available;
                reserved += c.reserved;
                sold += c.sold;
            }
            metrics::gauge!("kami_stock_available", "product" => id.clone()).set(available as f64);
            metrics::gauge!("kami_stock_reserved", "product" => id.clone()).set(reserved as f64);
            metrics::gauge!("kami_stock_sold", "product" => id.clone()).set(sold as f64);
            let depth: usize = route.shards.iter().map(|s| s.admission.depth()).sum();
            let drain: u64 = route.shards.iter().map(|s| s.admission.drain_per_sec()).sum();
            metrics::gauge!("kami_admission_queue_depth", "product" => id.clone()).set(depth as f64);
            metrics::gauge!("kami_admission_drain_per_sec", "product" => id.clone()).set(drain as f64);
        }
        for (i, c) in core.channels().all().iter().enumerate() {
            // 0 closed, 1 half-open, 2 open.
            metrics::gauge!("kami_payment_channel_state", "channel" => c.name.clone())
                .set(core.channels().level(i) as f64);
        }
    }
    metrics::gauge!("kami_payment_conversion_ratio").set(crate::telemetry::conversion_ratio());
    let handle = crate::telemetry::metrics_handle();
    handle.run_upkeep();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], handle.render())
}

pub async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "method not allowed on this endpoint")
}
