//! Logs (tracing) and metrics (Prometheus text at `/metrics`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, LogSettings};

/// Installs the log subscriber once per process. `RUST_LOG` wins over `log.level`.
pub fn init_logging(settings: &LogSettings) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&settings.level));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_target(false);
    let _ = match settings.format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Human => builder.try_init(),
    };
}

/// Orders created and delivered since start, for the conversion gauge.
static ORDERS_CREATED: AtomicU64 = AtomicU64::new(0);
static ORDERS_DELIVERED: AtomicU64 = AtomicU64::new(0);

/// Counts one journaled order event (`created`, `delivered`, `expired`, ...).
pub fn count_order_event(name: &'static str) {
    count_order_events(name, 1);
}

/// Counts `n` orders that one journaled event moved (a group completes or fails at once).
pub fn count_order_events(name: &'static str, n: u64) {
    metrics::counter!("kami_order_events_total", "event" => name).increment(n);
    match name {
        "created" => ORDERS_CREATED.fetch_add(n, Ordering::Relaxed),
        "delivered" => ORDERS_DELIVERED.fetch_add(n, Ordering::Relaxed),
        _ => 0,
    };
}

/// Counts a group-buy event: `opened`, `joined`, `completed`, `failed`.
pub fn count_group_event(name: &'static str) {
    metrics::counter!("kami_group_events_total", "event" => name).increment(1);
}

/// Why requests are refused, as counted in `kami_rejected_total{reason}`.
pub const REJECTION_REASONS: [&str; 8] = [
    "rate_limited",
    "queue_full",
    "concurrency",
    "timeout",
    "invalid_api_key",
    "bad_signature",
    "connections",
    "slow_body",
];
static REJECTED: [AtomicU64; REJECTION_REASONS.len()] = [const { AtomicU64::new(0) }; REJECTION_REASONS.len()];

/// Counts one refused request (one of [`REJECTION_REASONS`]).
pub fn count_rejection(reason: &'static str) {
    metrics::counter!("kami_rejected_total", "reason" => reason).increment(1);
    let i = REJECTION_REASONS.iter().position(|r| *r == reason);
    debug_assert!(i.is_some(), "unknown rejection reason {reason}");
    if let Some(i) = i {
        REJECTED[i].fetch_add(1, Ordering::Relaxed);
    }
}

/// Refused requests since start, by reason.
pub fn rejections() -> impl Iterator<Item = (&'static str, u64)> {
    REJECTION_REASONS.iter().zip(&REJECTED).map(|(r, n)| (*r, n.load(Ordering::Relaxed)))
}

/// Orders (created, delivered) since start.
pub fn order_totals() -> (u64, u64) {
    (ORDERS_CREATED.load(Ordering::Relaxed), ORDERS_DELIVERED.load(Ordering::Relaxed))
}

/// Delivered ÷ created since start (payment conversion); 0 before the first order.
pub fn conversion_ratio() -> f64 {
    match order_totals() {
        (0, _) => 0.0,
        (created, delivered) => delivered as f64 / created as f64,
    }
}

/// The process-wide Prometheus recorder, installed on first use.
pub fn metrics_handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let buckets =
            [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
        let sizes = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0, 16384.0];
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &buckets)
            .and_then(|b| b.set_buckets_for_metric(Matcher::Full("kami_commit_batch_size".into()), &sizes))
            .expect("non-empty buckets")
            .build_recorder();
        let handle = recorder.handle();
        // Another recorder may exist when kami is embedded; then ours only renders empty.
        let _ = metrics::set_global_recorder(recorder);
        handle
    })
}
