//! The HTTP surface (axum). Handlers only parse, call [`crate::core::Kami`], and map
//! errors to the JSON error format; limits live in the tower stack around them:
//! request ids and tracing, a global concurrency limit with load shedding, a
//! request timeout, per-IP rate limits on buyer routes, and body limits per route.

pub mod api;
pub mod coupons;
pub mod cursor;
pub mod error;
pub mod export;
pub mod extract;
pub mod forward;
pub mod front;
pub mod intake;
pub mod limits;
pub mod ops;
pub mod requests;
pub mod server;
pub mod views;
pub mod webhooks;

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use axum::http::{Method, StatusCode};
use axum::routing::{get, post};
use axum::Router;

use crate::config::Settings;
use crate::core::Kami;
use error::ApiError;

/// A JSON answer. Like `axum::Json`, with the body ending in a newline, so that
/// what `curl` prints does not run into the shell's prompt.
pub struct Json<T>(pub T);

impl<T: serde::Serialize> axum::response::IntoResponse for Json<T> {
    fn into_response(self) -> axum::response::Response {
        let mut body = Vec::with_capacity(256);
        match serde_json::to_writer(&mut body, &self.0) {
            Ok(()) => {
                body.push(b'\n');
                let json = axum::http::HeaderValue::from_static("application/json");
                ([(axum::http::header::CONTENT_TYPE, json)], body).into_response()
            }
            Err(e) => {
                tracing::error!(error = %e, "an answer did not serialise");
                StatusCode::INTERNAL_SERVER_ERROR.into_response()
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct HttpLimits {
    pub max_body_bytes: usize,
    pub max_import_bytes: usize,
    pub max_concurrent_requests: usize,
    pub request_timeout: Duration,
}

pub struct Shared {
    /// Set once recovery finished; cleared when the app stops, so that open
    /// keep-alive connections do not keep the storage alive.
    core: ArcSwapOption<Kami>,
    admin_token: String,
    pub limits: HttpLimits,
    /// The API-key tiers (their limits apply when `rate_limits.enabled`).
    pub rate_limits: limits::RateLimits,
    /// The buyer order lookup's own limits (always on).
    pub lookup_limits: limits::LookupLimits,
    /// `chaos.enabled`: whether the chaos endpoint exists at all.
    pub chaos: bool,
    /// Bodies read before a slot is taken; slots counted across the server.
    pub intake: Arc<intake::Intake>,
    /// `ops.token` (empty: metrics and status answer anyone).
    ops_token: String,
    /// Key of buyer tokens (`X-Buyer-Token`).
    buyer_secret: Vec<u8>,
    pub started: Instant,
    /// What else must hold for this server to serve (set once at start): on the
    /// jetstream backend, the stream's writer lease and a live connection. `Some`
    /// says why not.
    serving: std::sync::OnceLock<Serving>,
    /// This node's place in a cluster (`cluster.node`), once it joined.
    cluster: std::sync::OnceLock<Arc<crate::core::cluster::ClusterNode>>,
}

/// Where stock is kept when not in the data directory, and whether it can be
/// served from there now.
pub struct Serving {
    /// What `/status.json` shows under `storage` (e.g. the backend and stream).
    pub describe: serde_json::Value,
    /// Why this server cannot serve now (`None`: it can).
    pub check: Box<dyn Fn() -> Option<String> + Send + Sync>,
}

#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl std::ops::Deref for AppState {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

impl AppState {
    pub fn new(settings: &Settings, admin_token: String) -> AppState {
        AppState(Arc::new(Shared {
            core: ArcSwapOption::empty(),
            admin_token: admin_token.clone(),
            limits: HttpLimits {
                max_body_bytes: settings.server.max_body_bytes,
                max_import_bytes: settings.keys.max_import_bytes,
                max_concurrent_requests: settings.server.max_concurrent_requests,
                request_timeout: settings.request_timeout(),
            },
            chaos: settings.chaos.enabled,
            intake: Arc::new(intake::Intake::new(
                settings.server.max_concurrent_requests,
                settings.server.reserved_notify_slots,
                settings.server.max_buffered_body_bytes,
                settings.server.max_body_bytes,
                settings.keys.max_import_bytes,
                Duration::from_millis(settings.server.body_timeout_ms),
                admin_token.clone(),
            )),
            started: Instant::now(),
            serving: std::sync::OnceLock::new(),
            cluster: std::sync::OnceLock::new(),
            ops_token: settings.ops.token.clone(),
            buyer_secret: if settings.buyers.token_secret.is_empty() {
                // Stable as long as the admin token is.
                crate::domain::signature::buyer_token(admin_token.as_bytes(), "kami buyer tokens").into_bytes()
            } else {
                settings.buyers.token_secret.clone().into_bytes()
            },
            rate_limits: limits::RateLimits::new(&settings.rate_limits),
            lookup_limits: limits::LookupLimits::new(&settings.lookup),
        }))
    }

    /// Marks recovery as finished: from now on requests reach the core.
    pub fn set_ready(&self, core: Arc<Kami>) {
        self.core.store(Some(core));
    }

    /// Detaches the core: from now on requests are answered 503.
    pub fn detach(&self) {
        self.core.store(None);
    }

    /// Sets what `/readyz` checks beyond recovery (once; a second call is ignored).
    pub fn set_serving(&self, serving: Serving) {
        let _ = self.serving.set(serving);
    }

    /// Sets this node's place in the cluster (once; a second call is ignored).
    pub fn set_cluster(&self, node: Arc<crate::core::cluster::ClusterNode>) {
        self.intake.set_forward_token(node.forward_token.clone());
        let _ = self.cluster.set(node);
    }

    /// This node's place in the cluster, on a cluster node that joined.
    pub fn cluster(&self) -> Option<&Arc<crate::core::cluster::ClusterNode>> {
        self.cluster.get()
    }

    /// Why this server cannot serve now, beyond recovery (`None`: it can).
    pub fn not_serving(&self) -> Option<String> {
        self.serving.get().and_then(|s| (s.check)())
    }

    /// Where stock is kept and whether it can be served now (`/status.json`).
    pub fn storage_status(&self) -> serde_json::Value {
        let mut out = match self.serving.get() {
            Some(s) => s.describe.clone(),
            None => serde_json::json!({"backend": "local"}),
        };
        let why = self.not_serving();
        out["serving"] = why.is_none().into();
        out["not_serving"] = why.into();
        out
    }

    pub fn core(&self) -> Result<Arc<Kami>, ApiError> {
        self.core.load_full().ok_or_else(|| {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "recovering", "recovery from storage is still running")
                .retry_after(1)
        })
    }

    fn require_admin(&self, headers: &axum::http::HeaderMap) -> Result<(), ApiError> {
        extract::require_admin(headers, &self.admin_token)
    }

    /// The prologue of a merchant route with a JSON body: the admin token checked,
    /// the core ready, the body read within its limits and parsed strictly.
    async fn admin_json<T: serde::de::DeserializeOwned>(
        &self,
        headers: &axum::http::HeaderMap,
        body: axum::body::Body,
    ) -> Result<(Arc<Kami>, T), ApiError> {
        self.require_admin(headers)?;
        let core = self.core()?;
        let bytes = extract::body(headers, body, self.limits.max_body_bytes).await?;
        Ok((core, extract::json(&bytes)?))
    }

    /// Operations data (metrics, status): open when no `ops.token` is set, else the
    /// ops or the admin token, as `Authorization: Bearer` or `?token=`.
    fn require_ops(&self, headers: &axum::http::HeaderMap, query: Option<&str>) -> Result<(), ApiError> {
        if self.ops_token.is_empty() {
            return Ok(());
        }
        let from_query =
            query.and_then(|q| q.split('&').find_map(|pair| pair.strip_prefix("token=")).map(str::to_string));
        let from_header = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(extract::bearer)
            .map(str::to_string);
        let ok = [from_header, from_query].into_iter().flatten().any(|given| {
            extract::secret_matches(&given, &self.ops_token) || extract::secret_matches(&given, &self.admin_token)
        });
        if ok {
            Ok(())
        } else {
            Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "missing or wrong ops token (`Authorization: Bearer <ops.token>` or `?token=`)",
            ))
        }
    }

    /// A buyer's own data: their `X-Buyer-Token`, or the admin token.
    fn require_buyer(&self, headers: &axum::http::HeaderMap, buyer: &str) -> Result<(), ApiError> {
        if self.require_admin(headers).is_ok() {
            return Ok(());
        }
        let given = extract::header_str(headers, "x-buyer-token").ok().flatten().unwrap_or("");
        if crate::domain::signature::verify_buyer_token(&self.buyer_secret, buyer, given) {
            Ok(())
        } else {
            Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "missing or wrong X-Buyer-Token (or `Authorization: Bearer <admin token>`)",
            ))
        }
    }

    /// The `X-Buyer-Token` of `buyer`.
    pub fn buyer_token(&self, buyer: &str) -> String {
        crate::domain::signature::buyer_token(&self.buyer_secret, buyer)
    }
}

/// The whole application: the routes behind the front ([`front`]).
pub fn router(state: AppState) -> Arc<front::Front> {
    let mut routes = Router::new();
    if state.chaos {
        routes = routes.route("/api/v1/admin/chaos/kill", post(api::chaos_kill));
    }
    let routes = routes
        .route("/api/v1/products", post(api::create_product).get(api::catalogue))
        .route("/api/v1/products/{id}", get(api::get_product).patch(api::change_product))
        .route("/api/v1/admin/products", get(api::admin_catalogue))
        .route("/api/v1/products/{id}/keys", post(api::import_keys))
        .route("/api/v1/admin/orders", get(api::list_orders))
        .route("/api/v1/admin/orders/export", get(api::export_orders))
        .route("/api/v1/admin/orders/{order_id}", get(api::admin_get_order))
        .route("/api/v1/admin/products/{id}", get(api::admin_get_product).delete(api::delete_product))
        .route("/api/v1/admin/products/{id}/keys", get(api::list_keys))
        .route("/api/v1/admin/products/{id}/keys/withdraw", post(api::withdraw_keys))
        .route("/api/v1/admin/products/{id}/stock", axum::routing::put(api::set_stock))
        .route("/api/v1/admin/products/{id}/retire", post(api::retire_product))
        .route("/api/v1/admin/products/{id}/relist", post(api::relist_product))
        .route("/api/v1/admin/coupons", post(coupons::create).get(coupons::list))
        .route("/api/v1/admin/coupons/{code}", get(coupons::get))
        .route("/api/v1/admin/coupons/{code}/disable", post(coupons::disable))
        .route("/api/v1/admin/webhooks", post(webhooks::add).get(webhooks::list))
        .route("/api/v1/admin/webhooks/{name}", get(webhooks::get).delete(webhooks::delete))
        .route("/api/v1/admin/webhooks/{name}/deliveries", get(webhooks::deliveries))
        .route("/api/v1/admin/webhooks/{name}/redeliver", post(webhooks::redeliver))
        .route("/api/v1/admin/audit", get(api::audit))
        .route("/api/v1/cluster/audit/{product}", get(api::cluster_audit))
        .route("/api/v1/cluster/shard/{product}/{shard}", post(api::cluster_shard_call))
        .route("/api/v1/cluster/ledger/{book}/{shard}/{call}", post(api::cluster_ledger_call))
        .route("/api/v1/admin/snapshot", post(api::snapshot))
        .route("/api/v1/admin/backup", post(api::backup))
        .route("/api/v1/admin/reconcile", post(api::reconcile))
        .route("/api/v1/admin/payments/channels", get(api::payment_channels))
        .route("/api/v1/products/{id}/points-price", axum::routing::put(api::set_points_price))
        .route("/api/v1/admin/buyers/{buyer}/points", post(api::adjust_points))
        .route("/api/v1/admin/buyers/{buyer}/points/ledger", get(api::points_ledger))
        .route("/api/v1/buyers/{buyer}/points", get(api::get_points))
        .route("/api/v1/admin/buyers/{buyer}/token", get(api::buyer_token))
        .route("/api/v1/redemptions", post(api::redeem))
        .route("/api/v1/products/{id}/group-deals", post(api::create_group_deal).get(api::group_deals))
        .route("/api/v1/products/{id}/group-deals/{deal_id}/groups", get(api::open_groups))
        .route("/api/v1/groups", post(api::open_group))
        .route("/api/v1/groups/{group_id}", get(api::get_group))
        .route("/api/v1/groups/{group_id}/join", post(api::join_group))
        .route("/api/v1/orders", post(api::create_order))
        .route("/api/v1/orders/lookup", post(api::lookup_orders))
        .route("/api/v1/orders/{order_id}", get(api::get_order))
        .route("/api/v1/orders/{order_id}/cancel", post(api::cancel_order))
        .route("/api/v1/orders/{order_id}/pay", post(api::pay))
        .route("/api/v1/payments/{channel}/notify", post(api::notify))
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .route("/", get(ops::status_page))
        .route("/status", get(ops::status_page))
        .route("/status.json", get(ops::status_json))
        .fallback(ops::not_found)
        .method_not_allowed_fallback(ops::method_not_allowed)
        .layer(front::GateLayer(state.clone()))
        .with_state(state.clone());
    Arc::new(front::Front::new(routes, state))
}

/// The connection limits of the settings.
pub fn conn_limits(settings: &Settings) -> server::ConnLimits {
    server::ConnLimits {
        max_connections: settings.server.max_connections,
        header_read_timeout: Duration::from_millis(settings.server.header_read_timeout_ms),
        idle_timeout: Duration::from_secs(settings.server.idle_timeout_secs),
        max_header_bytes: settings.server.max_header_bytes,
    }
}

/// 429 `rate_limited` with `Retry-After`, counted by tier (`lookup` for the
/// lookup's own limits) and scope (`ip`, `buyer`, `lookup_ip`, `lookup_buyer`).
pub fn rate_limited(tier: &str, scope: &'static str, wait_secs: u64) -> ApiError {
    crate::telemetry::count_rejection("rate_limited");
    metrics::counter!("kami_rate_limited_total", "tier" => tier.to_string(), "scope" => scope).increment(1);
    let message = match scope {
        "ip" => "too many requests from this address",
        "lookup_ip" => "too many order lookups from this address",
        "lookup_buyer" => "too many order lookups for this buyer or order",
        _ => "too many orders from this buyer",
    };
    ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", message).retry_after(wait_secs)
}

/// Counts an answer by route template, method and status, with its latency.
/// Every label value comes from a closed set: the route's template (never the
/// path a client sent), one of the standard methods or `other`, a status code.
fn count_request(route: &str, method: &'static str, status: StatusCode, started: Instant) {
    if route == "/api/v1/orders" && method == "POST" {
        crate::telemetry::history::CREATE_LATENCY.record(started.elapsed());
    }
    ROUTE_METRICS.with(|m| {
        let mut m = m.borrow_mut();
        let (count, duration) = m.handles(route, method, status.as_u16());
        count.increment(1);
        duration.record(started.elapsed().as_secs_f64());
    });
}

thread_local! {
    /// The handles of the per-route metrics this thread has used (the registry
    /// hashes and allocates the labels on every lookup). Bounded: routes, methods
    /// and status codes are closed sets.
    static ROUTE_METRICS: std::cell::RefCell<RouteMetrics> = std::cell::RefCell::default();
}

/// A route's request counter and latency histogram, by method and status.
type ByCode = hashbrown::HashMap<(&'static str, u16), (metrics::Counter, metrics::Histogram)>;

#[derive(Default)]
struct RouteMetrics(hashbrown::HashMap<String, ByCode>);

impl RouteMetrics {
    fn handles(&mut self, route: &str, method: &'static str, status: u16) -> &(metrics::Counter, metrics::Histogram) {
        if !self.0.contains_key(route) {
            self.0.insert(route.to_string(), Default::default());
        }
        let by_code = self.0.get_mut(route).expect("inserted");
        by_code.entry((method, status)).or_insert_with(|| {
            let status = status_label(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR));
            (
                metrics::counter!("kami_http_requests_total", "method" => method, "route" => route.to_string(), "status" => status),
                metrics::histogram!("kami_http_request_duration_seconds", "method" => method, "route" => route.to_string()),
            )
        })
    }
}

/// A request method as a metrics label or log field: the standard methods by
/// name, anything else (hyper accepts any token, of any length) as `other`.
pub fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        Method::TRACE => "TRACE",
        Method::CONNECT => "CONNECT",
        _ => "other",
    }
}

/// A status code as a label: three digits, so at most 500 values.
fn status_label(status: StatusCode) -> &'static str {
    // Status codes are 100..=999 by construction (`StatusCode` refuses others).
    static LABELS: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    let labels = LABELS.get_or_init(|| (0..1000).map(|c| c.to_string()).collect());
    labels[status.as_u16() as usize % 1000].as_str()
}

/// Longest request path written into a log line.
const MAX_LOGGED_PATH: usize = 256;
/// Longest `X-Request-Id` kept from a client (longer or unprintable ones are replaced).
pub const MAX_REQUEST_ID: usize = 64;

/// `s` cut to at most `max` bytes, on a character boundary.
fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}
