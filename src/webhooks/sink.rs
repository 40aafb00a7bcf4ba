//! `kami webhook-sink`: a webhook receiver for demos and tests. It checks every
//! delivery's `X-Kami-Signature` (300 s tolerance) the way a shop's receiver
//! should, keeps what it received (bounded), and misbehaves on request:
//! `POST /mode {"mode": "ok" | "fail" | "hang" | "slow", "delay_ms": N}`.
//! `GET /received` lists the deliveries (every attempt that verified, in arrival
//! order, with `duplicate` set on an id seen before); `GET /stats` counts them.
//! The receiver's own check is [`verify`]: a shop can copy it. With a certificate
//! and key ([`start_tls`], `--tls-cert`/`--tls-key`) it serves HTTPS, as most
//! receivers do.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::domain::webhook::{self, BadSignature};
use crate::http::Json;

/// Signatures older or newer than this are refused (replays).
pub const TOLERANCE_SECS: u64 = 300;
/// Most deliveries kept; older ones are forgotten (counts go on).
const MAX_KEPT: usize = 1_000_000;

/// How the sink answers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// 200 at once.
    #[default]
    Ok,
    /// 500 at once.
    Fail,
    /// Never answers (until the caller's timeout).
    Hang,
    /// 200 after `delay_ms`.
    Slow,
}

/// One verified delivery.
#[derive(Debug, Clone, Serialize)]
pub struct Received {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub body: Value,
    /// Its id arrived before (a redelivery: receivers must deduplicate).
    pub duplicate: bool,
    /// Answered 2xx (in `fail` or `hang` mode it was not).
    pub acknowledged: bool,
}

#[derive(Default)]
struct Inner {
    mode: Mode,
    delay_ms: u64,
    received: Vec<Received>,
    seen: HashSet<String>,
    verified: u64,
    refused: u64,
    duplicates: u64,
}

struct Sink {
    secret: String,
    inner: Mutex<Inner>,
}

/// A running sink.
pub struct RunningSink {
    pub addr: SocketAddr,
    tls: bool,
    sink: Arc<Sink>,
    server: tokio::task::JoinHandle<()>,
}

impl RunningSink {
    /// `http://127.0.0.1:port/`, or `https://localhost:port/` when it serves TLS (the
    /// name a test certificate is made for).
    pub fn url(&self) -> String {
        if self.tls {
            format!("https://localhost:{}/", self.addr.port())
        } else {
            format!("http://{}/", self.addr)
        }
    }

    /// Every verified delivery so far, in arrival order.
    pub fn received(&self) -> Vec<Received> {
        self.sink.inner.lock().unwrap_or_else(|e| e.into_inner()).received.clone()
    }

    /// Deliveries refused for their signature.
    pub fn refused(&self) -> u64 {
        self.sink.inner.lock().unwrap_or_else(|e| e.into_inner()).refused
    }

    pub fn set_mode(&self, mode: Mode, delay_ms: u64) {
        let mut inner = self.sink.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.mode = mode;
        inner.delay_ms = delay_ms;
    }
}

impl Drop for RunningSink {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// A receiver's check of a delivery: the signature over `t.body` with the
/// endpoint's secret, within [`TOLERANCE_SECS`] of this machine's clock.
pub fn verify(secret: &str, headers: &HeaderMap, body: &[u8]) -> Result<(), BadSignature> {
    let header = headers.get("x-kami-signature").and_then(|v| v.to_str().ok()).ok_or(BadSignature::Malformed)?;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    webhook::verify(secret.as_bytes(), header, body, now, TOLERANCE_SECS)
}

pub async fn start(listen: SocketAddr, secret: String) -> std::io::Result<RunningSink> {
    start_tls(listen, secret, None).await
}

/// Most TLS handshakes and connections served at once by a TLS sink.
const MAX_TLS_CONNECTIONS: usize = 1024;

/// A sink serving HTTPS with `tls` (see [`tls_config`]), or HTTP without.
pub async fn start_tls(
    listen: SocketAddr,
    secret: String,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> std::io::Result<RunningSink> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let sink = Arc::new(Sink { secret, inner: Mutex::new(Inner::default()) });
    let app = Router::new()
        .route("/", post(receive))
        .route("/received", get(received))
        .route("/stats", get(stats))
        .route("/mode", post(set_mode))
        .with_state(sink.clone());
    let with_tls = tls.is_some();
    let server = match tls {
        None => tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        }),
        Some(config) => tokio::spawn(serve_tls(listener, app, config)),
    };
    Ok(RunningSink { addr, tls: with_tls, sink, server })
}

async fn serve_tls(listener: tokio::net::TcpListener, app: Router, config: Arc<rustls::ServerConfig>) {
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_TLS_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else { return };
        let Ok((stream, _)) = listener.accept().await else { continue };
        let (acceptor, app) = (acceptor.clone(), app.clone());
        tokio::spawn(async move {
            let handshake = tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream)).await;
            let Ok(Ok(stream)) = handshake else { return };
            let service = hyper_util::service::TowerToHyperService::new(app);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
            drop(permit);
        });
    }
}

/// A server TLS configuration from PEM files: the certificate chain and its key.
pub fn tls_config(
    cert_file: &std::path::Path,
    key_file: &std::path::Path,
) -> Result<Arc<rustls::ServerConfig>, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_file)
        .and_then(|certs| certs.collect::<Result<_, _>>())
        .map_err(|e| format!("{}: {e}", cert_file.display()))?;
    let key = PrivateKeyDer::from_pem_file(key_file).map_err(|e| format!("{}: {e}", key_file.display()))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("{}: {e}", cert_file.display()))?;
    Ok(Arc::new(config))
}

async fn receive(State(sink): State<Arc<Sink>>, headers: HeaderMap, body: Bytes) -> Response {
    if let Err(why) = verify(&sink.secret, &headers, &body) {
        sink.inner.lock().unwrap_or_else(|e| e.into_inner()).refused += 1;
        return (StatusCode::UNAUTHORIZED, Json(json!({"error": format!("{why:?}")}))).into_response();
    }
    let parsed: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let id = parsed["id"].as_str().unwrap_or_default().to_string();
    let kind = parsed["type"].as_str().unwrap_or_default().to_string();
    let (mode, delay_ms) = {
        let mut inner = sink.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.verified += 1;
        let acknowledged = matches!(inner.mode, Mode::Ok | Mode::Slow);
        // Only an acknowledged delivery counts as seen: a failed one is sent again.
        let duplicate = acknowledged && !inner.seen.insert(id.clone());
        inner.duplicates += duplicate as u64;
        if inner.received.len() >= MAX_KEPT {
            inner.received.remove(0);
        }
        inner.received.push(Received { id, kind, body: parsed, duplicate, acknowledged });
        (inner.mode, inner.delay_ms)
    };
    match mode {
        Mode::Ok => StatusCode::OK.into_response(),
        Mode::Fail => (StatusCode::INTERNAL_SERVER_ERROR, "told to fail").into_response(),
        Mode::Hang => {
            std::future::pending::<()>().await;
            unreachable!()
        }
        Mode::Slow => {
            tokio::time::sleep(Duration::from_millis(delay_ms)).await;
            StatusCode::OK.into_response()
        }
    }
}

async fn received(State(sink): State<Arc<Sink>>) -> Json<Value> {
    let inner = sink.inner.lock().unwrap_or_else(|e| e.into_inner());
    Json(json!({"received": inner.received}))
}

async fn stats(State(sink): State<Arc<Sink>>) -> Json<Value> {
    let inner = sink.inner.lock().unwrap_or_else(|e| e.into_inner());
    Json(json!({
        "verified": inner.verified,
        "refused": inner.refused,
        "distinct": inner.seen.len(),
        "duplicates": inner.duplicates,
        "mode": inner.mode,
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ModeRequest {
    mode: Mode,
    #[serde(default)]
    delay_ms: u64,
}

async fn set_mode(State(sink): State<Arc<Sink>>, axum::Json(m): axum::Json<ModeRequest>) -> Json<Value> {
    let mut inner = sink.inner.lock().unwrap_or_else(|e| e.into_inner());
    inner.mode = m.mode;
    inner.delay_ms = m.delay_ms;
    Json(json!({"mode": inner.mode, "delay_ms": inner.delay_ms}))
}
