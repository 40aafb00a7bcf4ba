//! The sandbox payment gateway: a separate HTTP server speaking kami's payment
//! channel protocol (`docs/payment-protocol.md`), for demos and tests. It plays the
//! external party: buyers "pay" on it, it notifies kami (signed, retried until a
//! 2xx, like real gateways), answers kami's queries and refunds, and misbehaves on
//! request (`POST /faults`): drop notifications, send each N times, delay or
//! reorder them, answer 5xx, or hang.
//!
//! With a [`Protocol`] other than `Kami` it plays a real gateway instead — Alipay,
//! WeChat Pay API v3 or Stripe — speaking that gateway's own requests, signatures,
//! notifications and retries with keys generated for the run
//! ([`gateways::generate`]): see `src/sandbox/gateways.rs`.
//!
//! Run it with `kami sandbox-gateway --listen ... --notify-url ... --secret ...`
//! (`--kind alipay|wechatpay|stripe --keys-dir DIR` for the others); tests start it
//! in-process with [`start`].

pub mod gateways;
pub use gateways::Protocol;

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
    /// Whose protocol it speaks.
    pub protocol: Protocol,
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
    /// What the merchant calls the order at this gateway (the kami order id, or the
    /// merchant order number of Alipay and WeChat Pay).
    pub reference: String,
    /// Where this payment's notifications go when no address is set for all.
    pub notify_url: Option<String>,
    pub currency: String,
    /// When the gateway closes the unpaid trade (`time_expire`), Unix ms.
    pub expires_at_ms: Option<u64>,
}

#[derive(Default)]
pub(crate) struct Book {
    payments: HashMap<String, SandboxPayment>,
    by_order: HashMap<String, String>,
    next: u64,
    faults: Faults,
    notify_url: String,
}

pub(crate) struct Gateway {
    config: SandboxConfig,
    book: Mutex<Book>,
    outbox: mpsc::Sender<String>,
}

type Shared = Arc<Gateway>;

impl Gateway {
    fn book(&self) -> std::sync::MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Creates the payment for `new.reference` (once: a second checkout answers the
    /// first payment), or refuses with the answer to send when the book is full.
    #[allow(clippy::result_large_err)] // the error is the response itself, built once
    fn create_payment(
        &self,
        new: NewPayment<'_>,
        id_of: impl FnOnce(u64) -> String,
    ) -> Result<SandboxPayment, Response> {
        let NewPayment { reference, order_id, amount_cents, notify_url, currency, expires_at_ms } = new;
        let mut book = self.book();
        if let Some(id) = book.by_order.get(reference) {
            return Ok(book.payments[id].clone());
        }
        if book.payments.len() >= self.config.max_payments {
            return Err(error(StatusCode::INSUFFICIENT_STORAGE, "full", "the sandbox holds max_payments payments"));
        }
        book.next += 1;
        let payment = SandboxPayment {
            payment_id: id_of(book.next),
            order_id: order_id.to_string(),
            amount_cents,
            status: "created".into(),
            notifications_sent: 0,
            notifications_acked: 0,
            refunds: 0,
            reference: reference.to_string(),
            notify_url,
            currency: currency.to_string(),
            expires_at_ms,
        };
        book.by_order.insert(reference.to_string(), payment.payment_id.clone());
        book.payments.insert(payment.payment_id.clone(), payment.clone());
        Ok(payment)
    }

    /// The payment the merchant knows as `reference`.
    fn payment_for(&self, reference: &str) -> Option<SandboxPayment> {
        let book = self.book();
        book.by_order.get(reference).map(|id| book.payments[id].clone())
    }

    /// Refunds a paid payment in full (a repeat answers the same); the error is the
    /// gateway-neutral reason.
    fn refund_payment(
        &self,
        payment_id: &str,
        amount_cents: u64,
    ) -> Result<SandboxPayment, (StatusCode, &'static str)> {
        let mut book = self.book();
        let Some(p) = book.payments.get_mut(payment_id) else {
            return Err((StatusCode::NOT_FOUND, "payment_not_found"));
        };
        if p.amount_cents != amount_cents {
            return Err((StatusCode::UNPROCESSABLE_ENTITY, "amount_mismatch"));
        }
        match p.status.as_str() {
            "paid" => {
                p.status = "refunded".into();
                p.refunds += 1;
            }
            "refunded" => {} // idempotent
            _ => return Err((StatusCode::CONFLICT, "invalid_state")),
        }
        Ok(p.clone())
    }
}

/// What a checkout tells the gateway about the payment to create.
struct NewPayment<'a> {
    /// What the merchant calls the order here (kami order id or merchant order number).
    reference: &'a str,
    order_id: &'a str,
    amount_cents: u64,
    notify_url: Option<String>,
    currency: &'a str,
    expires_at_ms: Option<u64>,
}

impl<'a> NewPayment<'a> {
    fn new(reference: &'a str, order_id: &'a str, amount_cents: u64) -> NewPayment<'a> {
        NewPayment { reference, order_id, amount_cents, notify_url: None, currency: "cny", expires_at_ms: None }
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

    /// Whose protocol it speaks, with the gateway's keys (tests sign with them).
    pub fn protocol(&self) -> &Protocol {
        &self.gw.config.protocol
    }

    /// The notifications the gateway would send now for a payment (as if it were
    /// paid), without sending them: for tests that forge, tamper with or replay one.
    pub fn notices(&self, payment_id: &str) -> Vec<gateways::Notice> {
        let p = self.gw.book().payments.get(payment_id).cloned().expect("a payment of this sandbox");
        notices_of(&self.gw, &p)
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
    let protocol = config.protocol.clone();
    let gw: Shared = Arc::new(Gateway { config, book: Mutex::new(book), outbox: tx });
    let api = match protocol {
        Protocol::Kami => Router::new()
            .route("/checkout/{order_id}", get(checkout))
            .route("/api/query", post(query))
            .route("/api/refund", post(refund))
            .route("/api/health", get(|| async { Json(json!({"status": "ok"})) })),
        other => gateways::routes(&other),
    }
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
    match gw.create_payment(NewPayment::new(&order_id, &order_id, p.amount_cents), |n| format!("sbx-{n:08}")) {
        Ok(payment) => Json(payment).into_response(),
        Err(full) => full,
    }
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
        let now_ms = chrono::Utc::now().timestamp_millis().max(0) as u64;
        if p.status == "created" && p.expires_at_ms.is_some_and(|at| now_ms >= at) {
            // The merchant's time_expire passed: the gateway closed the trade.
            p.status = "closed".into();
        }
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
    let value = match gw.payment_for(&q.order_id) {
        None => json!({"order_id": q.order_id, "status": "none"}),
        Some(p) => {
            json!({"order_id": q.order_id, "status": p.status, "payment_id": p.payment_id, "amount_cents": p.amount_cents})
        }
    };
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
    if let Err((status, code)) = gw.refund_payment(&r.payment_id, r.amount_cents) {
        return error(status, code, "the refund is refused");
    }
    answer(&gw, json!({"payment_id": r.payment_id, "status": "refunded"}))
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

/// The notification requests of a paid payment, signed afresh (new timestamp and
/// nonce) as the gateway's protocol signs them.
fn notices_of(gw: &Gateway, p: &SandboxPayment) -> Vec<gateways::Notice> {
    match &gw.config.protocol {
        Protocol::Kami => {
            let body = serde_json::to_vec(&json!({
                "order_id": p.order_id, "payment_id": p.payment_id, "amount_cents": p.amount_cents,
                "status": "paid", "timestamp": chrono::Utc::now().timestamp(),
                "nonce": format!("{:032x}", rand::random::<u128>()),
            }))
            .expect("json");
            let sig = signature::sign(gw.config.secret.as_bytes(), &body);
            vec![gateways::Notice { headers: vec![("x-signature".into(), sig)], body, success: None }]
        }
        other => gateways::notices(other, p),
    }
}

/// One notification, retried with backoff until a 2xx or `max_attempts`.
async fn deliver(gw: &Gateway, http: &reqwest::Client, payment_id: &str) {
    for attempt in 0..gw.config.max_attempts {
        let (p, url) = {
            let book = gw.book();
            let Some(p) = book.payments.get(payment_id).cloned() else { return };
            let url = match (&p.notify_url, book.notify_url.is_empty()) {
                (Some(own), true) => own.clone(),
                _ => book.notify_url.clone(),
            };
            (p, url)
        };
        let requests = notices_of(gw, &p);
        let mut all_acked = true;
        for notice in requests {
            let mut request = http.post(&url).body(notice.body);
            for (name, value) in notice.headers {
                request = request.header(name, value);
            }
            let acked = match request.send().await {
                Ok(r) if r.status().is_success() => match notice.success {
                    // Alipay counts only the exact text `success` as handled.
                    Some(expected) => r.text().await.is_ok_and(|t| t == expected),
                    None => true,
                },
                _ => false,
            };
            all_acked &= acked;
            if let Some(p) = gw.book().payments.get_mut(payment_id) {
                p.notifications_sent += 1;
                p.notifications_acked += u32::from(acked);
            }
        }
        if all_acked {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100u64 << attempt.min(6))).await;
    }
}
