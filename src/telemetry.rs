//! Logs (tracing) and metrics (Prometheus text at `/metrics`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, LogSettings};

pub mod history;

/// Installs the log subscriber once per process. `RUST_LOG` wins over `log.level`.
pub fn init_logging(settings: &LogSettings) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&settings.level));
    // Colours only for a terminal: a log written to a file or a pipe stays plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_target(false).with_ansi(ansi);
    let _ = match settings.format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Human => builder.try_init(),
    };
}

/// Puts the order a request is about on the request's log span (one order's life
/// is then `grep <order_id>` in the logs).
pub fn record_order(order_id: &str) {
    tracing::Span::current().record("order_id", order_id);
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
pub const REJECTION_REASONS: [&str; 9] = [
    "rate_limited",
    "queue_full",
    "concurrency",
    "timeout",
    "invalid_api_key",
    "bad_signature",
    "connections",
    "slow_body",
    "hash_queue",
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

static AMOUNT_MISMATCHES: AtomicU64 = AtomicU64::new(0);

/// Counts a payment whose amount did not match its order (nothing was delivered).
pub fn count_amount_mismatch() {
    AMOUNT_MISMATCHES.fetch_add(1, Ordering::Relaxed);
}

/// Payments whose amount did not match their order, since start.
pub fn amount_mismatches() -> u64 {
    AMOUNT_MISMATCHES.load(Ordering::Relaxed)
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
        describe_metrics();
        handle
    })
}

/// Every metric kami exports, with its type, unit and help text (the `# HELP` lines
/// of `/metrics`). A metric recorded under a name not listed here has no help
/// text, which `tests/metrics.rs` catches (`promtool check metrics`).
pub const METRICS: &[(&str, Kind, &str)] = &[
    ("kami_http_requests_total", Kind::Counter, "HTTP requests answered, by method, route and status."),
    ("kami_http_request_duration_seconds", Kind::Histogram, "Time from a request's arrival to its answer, by method and route."),
    ("kami_http_errors_total", Kind::Counter, "Error answers by their stable error code."),
    ("kami_rejected_total", Kind::Counter, "Requests refused before reaching an actor, by reason (rate_limited, queue_full, concurrency, timeout, invalid_api_key, bad_signature, connections, slow_body, hash_queue)."),
    ("kami_rate_limited_total", Kind::Counter, "Requests refused by a rate limit, by tier and scope."),
    ("kami_password_hashes_waiting", Kind::Gauge, "Orders and lookups waiting for a query password hash (bounded by lookup.max_waiting_hashes)."),
    ("kami_password_hash_seconds", Kind::Histogram, "Time one query password hash took, waiting for a thread included."),
    ("kami_buffered_body_bytes", Kind::Gauge, "Bytes of request bodies held in memory now."),
    ("kami_storage_serving", Kind::Gauge, "1 while stock can be written where it is kept; 0 while a replicated stream is out of reach (no writer lease, no connection)."),
    ("kami_order_events_total", Kind::Counter, "Order events made durable, by event (created, delivered, expired, cancelled, refund_owed, refunded, ...)."),
    ("kami_group_events_total", Kind::Counter, "Group-buy events made durable, by event (opened, joined, completed, failed)."),
    ("kami_points_events_total", Kind::Counter, "Points ledger events made durable, by event."),
    ("kami_product_on_sale", Kind::Gauge, "1 while a product is on sale, 0 once off the shelf or deleted (its other gauges stop updating when deleted)."),
    ("kami_stock_available", Kind::Gauge, "Keys in stock and free to sell, by product (as last made durable)."),
    ("kami_stock_reserved", Kind::Gauge, "Keys held by orders waiting for payment, by product."),
    ("kami_stock_sold", Kind::Gauge, "Keys delivered, by product."),
    ("kami_admission_queue_depth", Kind::Gauge, "Requests waiting in the line in front of a product's actors."),
    ("kami_admission_drain_per_second", Kind::Gauge, "Requests per second the line in front of a product's actors is drained at (the estimate admission uses)."),
    ("kami_points_queue_depth", Kind::Gauge, "Requests waiting in front of the points actors."),
    ("kami_paid_to_delivered_seconds", Kind::Histogram, "Time from a payment being heard of to its order's key being durable."),
    ("kami_payment_conversion_ratio", Kind::Gauge, "Orders delivered divided by orders created since start."),
    ("kami_payment_calls_total", Kind::Counter, "Calls to payment channels, by channel, call (query, refund) and result."),
    ("kami_webhook_deliveries_total", Kind::Counter, "Webhook delivery attempts by endpoint and result (delivered, failed, dead, redelivered)."),
    ("kami_webhook_pending", Kind::Gauge, "Journal records an endpoint has not been sent yet."),
    ("kami_webhook_lag_seconds", Kind::Gauge, "Age of the oldest event an endpoint is being sent (0: none waiting)."),
    ("kami_webhook_dead", Kind::Gauge, "An endpoint's dead letters (events given up on after the retry horizon)."),
    ("kami_webhook_backlog_exceeded", Kind::Gauge, "1 while an endpoint's pending records exceed webhooks.max_pending_records (nothing is dropped)."),
    ("kami_backups_total", Kind::Counter, "Online backups written, by result (ok, failed)."),
    ("kami_backup_last_success_timestamp_seconds", Kind::Gauge, "When the last backup that was written whole was cut (unix seconds)."),
    ("kami_backup_last_bytes", Kind::Gauge, "Size of the last backup written whole."),
    ("kami_backup_lag_seconds", Kind::Gauge, "Continuous archiving: how far behind now the archive's newest cut is (what a lost disk would cost)."),
    ("kami_trims_deferred_total", Kind::Counter, "Journal trims left for the next snapshot because a backup was being written."),
    ("kami_payment_channel_state", Kind::Gauge, "A payment channel's breaker: 0 closed, 1 half-open, 2 open."),
    ("kami_payment_channel_opened_total", Kind::Counter, "Times a payment channel's breaker opened since start."),
    ("kami_payments_found_by_query_total", Kind::Counter, "Payments learnt by asking the channel (active query) rather than from its notification."),
    ("kami_refunds_completed_total", Kind::Counter, "Refunds the channel confirmed."),
    ("kami_key_transfers_total", Kind::Counter, "Key loans between sibling shards of one product, counted when the borrower records their arrival."),
    ("kami_keys_transferred_total", Kind::Counter, "Keys moved by loans between sibling shards, counted when the borrower records their arrival."),
    ("kami_commit_batch_size", Kind::Histogram, "Commit tickets completed by one group flush."),
    ("kami_commit_flush_seconds", Kind::Histogram, "Time one group flush took (journal writes, fdatasync, sled flush)."),
    ("kami_snapshot_seconds", Kind::Histogram, "Time from starting a shard snapshot to it being durable."),
    ("kami_recovery_seconds", Kind::Gauge, "How long the last start's recovery took."),
    ("kami_recovery_events_replayed", Kind::Gauge, "Journal records the last start's recovery replayed."),
    ("kami_actor_turn_seconds", Kind::Histogram, "How long one actor turn (one message or tick) held its thread, by actor (stock, points)."),
    ("kami_actor_panics_total", Kind::Counter, "Domain steps that panicked (the actor is rebuilt from storage)."),
    ("kami_actor_restarts_total", Kind::Counter, "Actors restarted by their supervisor."),
    ("kami_chaos_kills_total", Kind::Counter, "Actors killed through the chaos API."),
];

/// A metric's Prometheus type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

fn describe_metrics() {
    for &(name, kind, help) in METRICS {
        match kind {
            Kind::Counter => metrics::describe_counter!(name, help),
            Kind::Gauge => metrics::describe_gauge!(name, help),
            Kind::Histogram => metrics::describe_histogram!(name, help),
        }
    }
}
