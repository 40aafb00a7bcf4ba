//! The sandbox payment gateway: a separate HTTP server speaking kami's payment
//! channel protocol (`docs/payment-protocol.md`), for demos and tests. It plays the
//! external party: buyers "pay" on it, it notifies kami (signed, retried until a
//! 2xx, like real gateways), answers kami's queries and refunds, and misbehaves on
//! request (`POST /faults`): drop notifications, send each N times, delay or
//! reorder them, answer 5xx, or hang.
//!
//! Run it with `kami sandbox-gateway --listen ... --notify-url ... --secret ...`;
//! tests start it in-process with [`start`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;

use crate::http::Json;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::domain::signature;

#[derive(Debug, Clone)]
pub struct SandboxConfig {
    pub listen: SocketAddr,
    /// Where notifications go: kami's `/api/v1/payments/{channel}/notify`.
    pub notify_url: String,
    pub secret: String,
    /// Most payments kept; checkout beyond it answers 507.
    pub max_payments: usize,
    /// Delivery attempts per notification before giving up (a real gateway's retry budget).
    pub max_attempts: u32,
}

/// Misbehaviour on request. All off by default.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Never send notifications (kami must find payments by querying).
    pub drop_notifications: bool,
    /// Send every notification this many times (0 or 1 = once).
    pub repeat: u32,
    /// Wait this long before sending each notification.
    pub delay_ms: u64,
    /// Hold notifications for up to 50 ms and send them shuffled.
    pub reorder: bool,
    /// Answer every API call (query, refund, health, checkout) with 503.
    pub api_5xx: bool,
    /// Delay every API answer by this long (past kami's timeout = a hang).
    pub api_hang_ms: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct SandboxPayment {
    pub payment_id: String,
    pub order_id: String,
    pub amount_cents: u64,
    /// `created`, `paid` or `refunded`.
    pub status: String,
    /// Notification deliveries attempted, and how many got a 2xx.
    pub notifications_sent: u32,
    pub notifications_acked: u32,
    pub refunds: u32,
}

#[derive(Default)]
struct Book {
    payments: HashMap<String, SandboxPayment>,
    by_order: HashMap<String, String>,
    next: u64,
    faults: Faults,
    notify_url: String,
}

struct Gateway {
    config: SandboxConfig,
    book: Mutex<Book>,
    outbox: mpsc::Sender<String>,
}

type Shared = Arc<Gateway>;

impl Gateway {
    fn book(&self) -> std::sync::MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running sandbox gateway; dropping it stops the server and the notifier.
pub struct RunningSandbox {
    pub addr: SocketAddr,
    gw: Shared,
    server: tokio::task::JoinHandle<()>,
    notifier: tokio::task::JoinHandle<()>,
}

impl RunningSandbox {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Points notifications elsewhere (tests start the gateway before kami).
    pub fn set_notify_url(&self, url: &str) {
        self.gw.book().notify_url = url.to_string();
    }

    pub fn set_faults(&self, faults: Faults) {
        assert!(faults.repeat <= MAX_REPEAT && faults.delay_ms <= MAX_DELAY_MS && faults.api_hang_ms <= MAX_DELAY_MS);
        self.gw.book().faults = faults;
    }

    /// Every payment, by id.
    pub fn payments(&self) -> Vec<SandboxPayment> {
        let mut all: Vec<SandboxPayment> = self.gw.book().payments.values().cloned().collect();
        all.sort_by(|a, b| a.payment_id.cmp(&b.payment_id));
        all
    }
}

impl Drop for RunningSandbox {
    fn drop(&mut self) {
        self.server.abort();
        self.notifier.abort();
    }
}

pub async fn start(config: SandboxConfig) -> std::io::Result<RunningSandbox> {
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    let addr = listener.local_addr()?;
    let (tx, rx) = mpsc::channel(10_000);
    let book = Book { notify_url: config.notify_url.clone(), ..Book::default() };
    let gw: Shared = Arc::new(Gateway { config, book: Mutex::new(book), outbox: tx });
    let api = Router::new()
        .route("/checkout/{order_id}", get(checkout))
        .route("/api/query", post(query))
        .route("/api/refund", post(refund))
        .route("/api/health", get(|| async { Json(json!({"status": "ok"})) }))
        .route_layer(middleware::from_fn_with_state(gw.clone(), api_faults));
    let app = Router::new()
        .merge(api)
        .route("/pay/{payment_id}", post(pay))
        .route("/faults", get(get_faults).post(set_faults))
        .route("/payments", get(list))
        .with_state(gw.clone());
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let notifier = tokio::spawn(notify_loop(gw.clone(), rx));
    Ok(RunningSandbox { addr, gw, server, notifier })
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    (status, Json(json!({"error": {"code": code, "message": message}}))).into_response()
}

async fn api_faults(State(gw): State<Shared>, req: Request, next: Next) -> Response {
    let faults = gw.book().faults.clone();
    if faults.api_hang_ms > 0 {
        tokio::time::sleep(Duration::from_millis(faults.api_hang_ms)).await;
    }
    if faults.api_5xx {
        return error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "sandbox fault: api_5xx");
    }
    next.run(req).await
}

#[derive(Deserialize)]
struct CheckoutParams {
    amount_cents: u64,
    sig: String,
}

/// The buyer opens the pay URL: the payment is created (once per order).
async fn checkout(
    State(gw): State<Shared>,
    Path(order_id): Path<String>,
    query: Result<Query<CheckoutParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(p)) = query else {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
            "expected ?amount_cents=<n>&sig=<signature>",
        );
    };
    let signed = format!("{order_id}:{}", p.amount_cents);
    if !signature::verify(gw.config.secret.as_bytes(), signed.as_bytes(), &p.sig) {
        return error(StatusCode::UNAUTHORIZED, "bad_signature", "the pay URL is not signed by the merchant");
    }
    let mut book = gw.book();
    if let Some(id) = book.by_order.get(&order_id) {
        return Json(book.payments[id].clone()).into_response();
    }
    if book.payments.len() >= gw.config.max_payments {
        return error(StatusCode::INSUFFICIENT_STORAGE, "full", "the sandbox holds max_payments payments");
    }
    book.next += 1;
    let payment = SandboxPayment {
        payment_id: format!("sbx-{:08}", book.next),
        order_id: order_id.clone(),
        amount_cents: p.amount_cents,
        status: "created".into(),
        notifications_sent: 0,
        notifications_acked: 0,
        refunds: 0,
    };
    book.by_order.insert(order_id, payment.payment_id.clone());
    book.payments.insert(payment.payment_id.clone(), payment.clone());
    Json(payment).into_response()
}

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct PayBody {
    /// Pay a different amount than the order's (to test amount mismatches).
    amount_cents: Option<u64>,
}

/// The buyer pays: the payment turns `paid` and a notification is queued.
async fn pay(State(gw): State<Shared>, Path(payment_id): Path<String>, body: Bytes) -> Response {
    let body: PayBody = if body.is_empty() {
        PayBody::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(b) => b,
            Err(e) => return error(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", &e.to_string()),
        }
    };
    let payment = {
        let mut book = gw.book();
        let Some(p) = book.payments.get_mut(&payment_id) else {
            return error(StatusCode::NOT_FOUND, "payment_not_found", "no such payment");
        };
        if p.status != "created" {
            return error(StatusCode::CONFLICT, "invalid_state", &format!("payment is {}", p.status));
        }
        p.status = "paid".into();
        if let Some(amount) = body.amount_cents {
            p.amount_cents = amount;
        }
        p.clone()
    };
    if gw.outbox.try_send(payment_id).is_err() {
        tracing::warn!("sandbox notification queue full; kami will have to query");
    }
    Json(payment).into_response()
}

/// Reads a signed API request: the body's HMAC must match `X-Signature`.
#[allow(clippy::result_large_err)] // the error is the response itself, built once
fn signed<T: for<'de> Deserialize<'de>>(gw: &Gateway, headers: &HeaderMap, body: &[u8]) -> Result<T, Response> {
    let sig = headers.get("x-signature").and_then(|v| v.to_str().ok()).unwrap_or("");
    if !signature::verify(gw.config.secret.as_bytes(), body, sig) {
        return Err(error(StatusCode::UNAUTHORIZED, "bad_signature", "request signature does not verify"));
    }
    serde_json::from_slice(body).map_err(|e| error(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", &e.to_string()))
}

/// A signed JSON answer.
fn answer(gw: &Gateway, value: Value) -> Response {
    let body = serde_json::to_vec(&value).expect("json");
    let sig = signature::sign(gw.config.secret.as_bytes(), &body);
    ([("content-type", "application/json"), ("x-signature", sig.as_str())], body).into_response()
}

#[derive(Deserialize)]
struct QueryBody {
    order_id: String,
}

async fn query(State(gw): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let q: QueryBody = match signed(&gw, &headers, &body) {
        Ok(q) => q,
        Err(r) => return r,
    };
    let book = gw.book();
    let value = match book.by_order.get(&q.order_id).map(|id| &book.payments[id]) {
        None => json!({"order_id": q.order_id, "status": "none"}),
        Some(p) => {
            json!({"order_id": q.order_id, "status": p.status, "payment_id": p.payment_id, "amount_cents": p.amount_cents})
        }
    };
    drop(book);
    answer(&gw, value)
}

#[derive(Deserialize)]
struct RefundBody {
    payment_id: String,
    amount_cents: u64,
}

async fn refund(State(gw): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let r: RefundBody = match signed(&gw, &headers, &body) {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    let mut book = gw.book();
    let Some(p) = book.payments.get_mut(&r.payment_id) else {
        return error(StatusCode::NOT_FOUND, "payment_not_found", "no such payment");
    };
    if p.amount_cents != r.amount_cents {
        return error(StatusCode::UNPROCESSABLE_ENTITY, "amount_mismatch", "refund amount differs from the payment");
    }
    match p.status.as_str() {
        "paid" => {
            p.status = "refunded".into();
            p.refunds += 1;
        }
        "refunded" => {} // idempotent
        other => return error(StatusCode::CONFLICT, "invalid_state", &format!("payment is {other}")),
    }
    let value = json!({"payment_id": r.payment_id, "status": "refunded"});
    drop(book);
    answer(&gw, value)
}

async fn get_faults(State(gw): State<Shared>) -> Json<Faults> {
    Json(gw.book().faults.clone())
}

/// Limits of the fault settings: copies per notification, and delays.
const MAX_REPEAT: u32 = 100;
const MAX_DELAY_MS: u64 = 60_000;

async fn set_faults(State(gw): State<Shared>, body: Bytes) -> Response {
    let faults: Faults = match serde_json::from_slice(&body) {
        Ok(f) => f,
        Err(e) => return error(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", &e.to_string()),
    };
    if faults.repeat > MAX_REPEAT || faults.delay_ms > MAX_DELAY_MS || faults.api_hang_ms > MAX_DELAY_MS {
        let message = format!("repeat must be at most {MAX_REPEAT}, delays at most {MAX_DELAY_MS} ms");
        return error(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", &message);
    }
    gw.book().faults = faults.clone();
    Json(faults).into_response()
}

async fn list(State(gw): State<Shared>) -> Json<Vec<SandboxPayment>> {
    let mut all: Vec<SandboxPayment> = gw.book().payments.values().cloned().collect();
    all.sort_by(|a, b| a.payment_id.cmp(&b.payment_id));
    Json(all)
}

/// Sends queued notifications, applying the faults in force.
async fn notify_loop(gw: Shared, mut rx: mpsc::Receiver<String>) {
    let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().expect("http client");
    // Deliveries in flight at once (each retries on its own).
    let in_flight = Arc::new(tokio::sync::Semaphore::new(256));
    while let Some(first) = rx.recv().await {
        let faults = gw.book().faults.clone();
        let mut batch = vec![first];
        if faults.reorder {
            tokio::time::sleep(Duration::from_millis(50)).await;
            while let Ok(more) = rx.try_recv() {
                batch.push(more);
            }
            use rand::seq::SliceRandom;
            batch.shuffle(&mut rand::rng());
        }
        if faults.drop_notifications {
            continue;
        }
        let copies = faults.repeat.max(1);
        let mut sends = Vec::new();
        for _ in 0..copies {
            sends.extend(batch.iter().cloned());
        }
        if faults.reorder {
            use rand::seq::SliceRandom;
            sends.shuffle(&mut rand::rng());
        }
        for payment_id in sends {
            let Ok(permit) = in_flight.clone().acquire_owned().await else { return };
            let (gw, http) = (gw.clone(), http.clone());
            let delay = faults.delay_ms;
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(delay)).await;
                deliver(&gw, &http, &payment_id).await;
                drop(permit);
            });
        }
    }
}

/// One notification, retried with backoff until a 2xx or `max_attempts`.
async fn deliver(gw: &Gateway, http: &reqwest::Client, payment_id: &str) {
    for attempt in 0..gw.config.max_attempts {
        let (p, url) = {
            let book = gw.book();
            let Some(p) = book.payments.get(payment_id).cloned() else { return };
            (p, book.notify_url.clone())
        };
        // Signed afresh for every delivery: new timestamp and nonce.
        let body = serde_json::to_vec(&json!({
            "order_id": p.order_id, "payment_id": p.payment_id, "amount_cents": p.amount_cents,
            "status": "paid", "timestamp": chrono::Utc::now().timestamp(),
            "nonce": format!("{:032x}", rand::random::<u128>()),
        }))
        .expect("json");
        let sig = signature::sign(gw.config.secret.as_bytes(), &body);
        let sent = http.post(&url).header("x-signature", sig).body(body).send().await;
        let acked = matches!(&sent, Ok(r) if r.status().is_success());
        if let Some(p) = gw.book().payments.get_mut(payment_id) {
            p.notifications_sent += 1;
            p.notifications_acked += u32::from(acked);
        }
        if acked {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100u64 << attempt.min(6))).await;
    }
}
