//! `kami load`: a flash-sale load generator. Against a running kami (`--url`) or an
//! embedded one it starts in a temp dir, it creates a product with K keys and lets
//! N buyers over C connections each create an order, pay it with a signed
//! notification and read their key (or only create orders). At the end: throughput
//! and latency per step (HDR histograms), answers by status and error code, and a
//! verdict checked against kami's own audit: sold == distinct keys delivered ==
//! purchases acknowledged, never more than K.

pub mod chart;

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;
use serde_json::{json, Value};

use crate::config::{Settings, Sources};

#[derive(Debug, Clone)]
pub enum Target {
    /// Start kami in a temporary directory for the run, configured by `profile`
    /// and `file` (as the server is) under the load run's own settings.
    Embedded { arbiters: usize, profile: Option<String>, file: Option<std::path::PathBuf> },
    /// A running kami; the admin token creates the product, the channel secret
    /// signs notifications, the API key (if any) selects a rate-limit tier
    /// (`X-Api-Key`) for the buyers' requests.
    Url { url: String, admin_token: String, channel: String, secret: String, api_key: Option<String> },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// create order → signed notification → read the key
    Full,
    /// create order only (stock stays reserved until expiry)
    OrderOnly,
    /// group-buy: join any open group of a size-10 deal → signed notification for
    /// the seat (a group is delivered when its tenth seat is paid)
    Group,
}

/// Seats per group in `Mode::Group`.
pub const LOAD_GROUP_SIZE: u64 = 10;

impl Mode {
    /// What the audit counts for this mode's verdict.
    fn taken_field(self) -> &'static str {
        match self {
            Mode::Full | Mode::Group => "sold",
            Mode::OrderOnly => "reserved",
        }
    }
}

#[derive(Debug, Clone)]
pub struct LoadConfig {
    pub target: Target,
    pub keys: u64,
    pub buyers: u64,
    pub concurrency: u64,
    pub mode: Mode,
    pub shards: u16,
    /// A progress line on stderr every second.
    pub progress: bool,
    /// A buyer refused with 503 `overloaded` waits as told (`error.queue.estimated_wait_ms`,
    /// else `Retry-After`) and tries again, at most `MAX_ATTEMPTS` times in all, as a
    /// storefront showing "you are in line" does. Off: each buyer tries once.
    pub retry_overloaded: bool,
}

/// Attempts per buyer at creating the order when `retry_overloaded` is on.
pub const MAX_ATTEMPTS: u32 = 20;

#[derive(Debug, Clone, Serialize)]
pub struct StepReport {
    pub step: &'static str,
    pub count: u64,
    pub per_sec: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    pub ok: bool,
    pub audit_ok: bool,
    /// What the audit counts as sold (full mode) or reserved (order-only mode).
    pub audit_taken: u64,
    /// Acknowledged purchases (full) or created orders (order-only).
    pub acknowledged: u64,
    pub distinct_keys_delivered: u64,
    /// Purchases paid whose key the client could not read (sold, not seen).
    pub paid_unread: u64,
    /// Requests refused 429 by the server's rate limits (refusals, not losses).
    pub rate_limited: u64,
    pub problems: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    pub target: String,
    pub mode: Mode,
    pub product: String,
    pub keys: u64,
    pub buyers: u64,
    pub concurrency: u64,
    pub shards: u16,
    pub elapsed_ms: u64,
    /// Buyers served per second (a whole purchase in full mode, an order otherwise).
    pub buyers_per_sec: f64,
    pub steps: Vec<StepReport>,
    /// "201", "409 sold_out", "503 overloaded", "transport": how many of each, all steps.
    pub answers: BTreeMap<String, u64>,
    /// Width of the buckets of `timeline` and `create_latency_by_bucket` (100 ms).
    pub bucket_ms: u64,
    /// Completions per bucket of the run, one entry per `bucket_ms`.
    pub timeline: Vec<u64>,
    /// Order creation latency per bucket of the run (of the requests answered 201
    /// in that bucket): `[p50_ms, p99_ms]`, one entry per bucket like `timeline`.
    pub create_latency_by_bucket: Vec<[f64; 2]>,
    pub verdict: Verdict,
    /// Against a URL: what became of the load's product after the run (taken off
    /// the shelf, then deleted when no order of it is open). `None` when embedded.
    pub product_left: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("starting the embedded kami: {0}")]
    Start(String),
    #[error("setting up the product: {0}")]
    Setup(String),
    #[error("after the run, reading the audit: {0}")]
    Audit(String),
}

const STEPS: [&str; 3] = ["create order", "notify", "read order"];

struct Shared {
    http: reqwest::Client,
    /// The server, or a cluster's nodes (each buyer's purchase through one, in turn).
    urls: Vec<String>,
    product: String,
    channel: String,
    secret: String,
    mode: Mode,
    retry_overloaded: bool,
    max_samples_per_worker: usize,
    started: Instant,
    buyers: u64,
    next: AtomicU64,
    done: AtomicU64,
}

#[derive(Default)]
struct WorkerResult {
    hists: Vec<Histogram<u64>>,
    answers: BTreeMap<String, u64>,
    keys: Vec<String>,
    acknowledged: u64,
    /// Purchases paid (notification answered 200) whose key could not be read.
    paid_unread: u64,
    /// Completions per bucket of the run (`BUCKET_MS`).
    completions: Vec<u64>,
    /// (bucket of the run, create latency in µs) of accepted orders, at most
    /// `MAX_SAMPLES / concurrency` per worker (for the per-second latency series).
    samples: Vec<(u32, u32)>,
    max_samples: usize,
}

/// Latency samples kept for the series over time, all workers together (8 bytes each).
const MAX_SAMPLES: usize = 4_000_000;

fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000, 3).expect("valid bounds")
}

/// The admin token and `sandbox` channel secret of an embedded kami.
pub const EMBEDDED_SECRET: &str = "load";

/// Settings of an embedded kami for load runs: random loopback port, data in
/// `data`, no rate limits, quiet logs.
pub fn embedded_settings(data: &std::path::Path, arbiters: usize) -> Result<Settings, LoadError> {
    embedded_settings_over(data, arbiters, Sources::default())
}

/// [`embedded_settings`] over `base` (a profile, a file).
pub fn embedded_settings_over(data: &std::path::Path, arbiters: usize, base: Sources) -> Result<Settings, LoadError> {
    let overrides = [
        ("server.listen", "127.0.0.1:0".to_string()),
        ("storage.path", data.display().to_string()),
        ("admin.token", EMBEDDED_SECRET.into()),
        ("payments.channels.sandbox.secret", EMBEDDED_SECRET.into()),
        ("rate_limits.enabled", "false".into()),
        ("actors.arbiters", arbiters.to_string()),
        ("log.level", "warn".into()),
    ];
    Settings::load(&Sources { overrides: overrides.iter().map(|(k, v)| (k.to_string(), v.clone())).collect(), ..base })
        .map_err(|e| LoadError::Start(e.to_string()))
}

pub async fn run(config: LoadConfig) -> Result<LoadReport, LoadError> {
    assert!(config.concurrency >= 1 && config.shards >= 1);
    // Kept alive for the run: the embedded server and its directory.
    let mut _embedded = None;
    let mut headers = reqwest::header::HeaderMap::new();
    let (url, admin, channel, secret, target) = match &config.target {
        Target::Url { url, admin_token, channel, secret, api_key } => {
            if let Some(key) = api_key {
                let value = reqwest::header::HeaderValue::from_str(key)
                    .map_err(|_| LoadError::Setup("the API key is not a valid header value".into()))?;
                headers.insert("x-api-key", value);
            }
            (url.clone(), admin_token.clone(), channel.clone(), secret.clone(), url.clone())
        }
        Target::Embedded { arbiters, profile, file } => {
            let dir = tempfile::tempdir().map_err(|e| LoadError::Start(e.to_string()))?;
            let base = Sources { profile: profile.clone(), file: file.clone(), ..Default::default() };
            let app = crate::start(embedded_settings_over(&dir.path().join("data"), *arbiters, base)?)
                .await
                .map_err(|e| LoadError::Start(e.to_string()))?;
            let url = app.url();
            _embedded = Some((app, dir));
            let secret = EMBEDDED_SECRET.to_string();
            (url, secret.clone(), "sandbox".into(), secret, format!("embedded ({arbiters} arbiters)"))
        }
    };
    let http = reqwest::Client::builder()
        .default_headers(headers)
        .pool_max_idle_per_host(config.concurrency as usize)
        .timeout(Duration::from_secs(60))
        .build()
        .map_err(|e| LoadError::Setup(e.to_string()))?;
    // `--url a,b,c`: a cluster's nodes; the product is made and audited through the first.
    let urls: Vec<String> =
        url.split(',').map(|u| u.trim().trim_end_matches('/').to_string()).filter(|u| !u.is_empty()).collect();
    let url = urls.first().cloned().ok_or_else(|| LoadError::Setup("no --url given".into()))?;
    let product = format!("load-{:08x}", rand::random::<u32>());
    setup(&http, &url, &admin, &product, config.keys, config.shards).await?;
    if config.mode == Mode::Group {
        let deal =
            json!({"deal_id": "load", "group_size": LOAD_GROUP_SIZE, "price_cents": 690, "time_limit_secs": 3600});
        let r = http.post(format!("{url}/api/v1/products/{product}/group-deals")).bearer_auth(&admin).json(&deal);
        let r = r.send().await.map_err(|e| LoadError::Setup(format!("creating the deal: {e}")))?;
        if r.status() != 201 {
            return Err(LoadError::Setup(format!("creating the deal: {}", r.text().await.unwrap_or_default())));
        }
    }

    let shared = Arc::new(Shared {
        http: http.clone(),
        urls: urls.clone(),
        product: product.clone(),
        channel,
        secret,
        mode: config.mode,
        retry_overloaded: config.retry_overloaded,
        max_samples_per_worker: MAX_SAMPLES / config.concurrency as usize,
        started: Instant::now(),
        buyers: config.buyers,
        next: AtomicU64::new(0),
        done: AtomicU64::new(0),
    });
    let started = shared.started;
    let progress = config.progress.then(|| {
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            loop {
                tick.tick().await;
                let done = shared.done.load(Ordering::Relaxed);
                let secs = started.elapsed().as_secs_f64();
                eprintln!(
                    "  {done:>9} / {} buyers  {:>5.1}%  {:>8.0}/s",
                    shared.buyers,
                    100.0 * done as f64 / shared.buyers.max(1) as f64,
                    done as f64 / secs
                );
            }
        })
    });
    let workers: Vec<_> = (0..config.concurrency).map(|_| tokio::spawn(worker(shared.clone(), started))).collect();
    let mut total = WorkerResult { hists: STEPS.iter().map(|_| new_hist()).collect(), ..Default::default() };
    for w in workers {
        let r = w.await.map_err(|e| LoadError::Setup(format!("a worker failed: {e}")))?;
        for (a, b) in total.hists.iter_mut().zip(&r.hists) {
            a.add(b).expect("same bounds");
        }
        for (k, v) in r.answers {
            *total.answers.entry(k).or_default() += v;
        }
        total.keys.extend(r.keys);
        total.acknowledged += r.acknowledged;
        total.paid_unread += r.paid_unread;
        if total.completions.len() < r.completions.len() {
            total.completions.resize(r.completions.len(), 0);
        }
        for (i, n) in r.completions.into_iter().enumerate() {
            total.completions[i] += n;
        }
        total.samples.extend(r.samples);
    }
    let create_latency_by_bucket = latency_by_bucket(total.samples.split_off(0), total.completions.len());
    let elapsed = started.elapsed();
    if let Some(p) = progress {
        p.abort();
    }
    let verdict = verdict(&http, &url, &admin, &product, &config, &total).await?;
    let product_left = match &config.target {
        Target::Url { .. } => Some(clear_away(&http, &url, &admin, &product).await),
        Target::Embedded { .. } => None,
    };
    let secs = elapsed.as_secs_f64().max(1e-9);
    let steps = STEPS
        .iter()
        .zip(&total.hists)
        .filter(|(_, h)| !h.is_empty())
        .map(|(step, h)| StepReport {
            step,
            count: h.len(),
            per_sec: h.len() as f64 / secs,
            p50_ms: h.value_at_quantile(0.5) as f64 / 1000.0,
            p90_ms: h.value_at_quantile(0.9) as f64 / 1000.0,
            p99_ms: h.value_at_quantile(0.99) as f64 / 1000.0,
            max_ms: h.max() as f64 / 1000.0,
        })
        .collect();
    Ok(LoadReport {
        target,
        mode: config.mode,
        product,
        keys: config.keys,
        buyers: config.buyers,
        concurrency: config.concurrency,
        shards: config.shards,
        elapsed_ms: elapsed.as_millis() as u64,
        buyers_per_sec: config.buyers as f64 / secs,
        steps,
        answers: total.answers,
        bucket_ms: BUCKET_MS,
        timeline: total.completions,
        create_latency_by_bucket,
        verdict,
        product_left,
    })
}

/// Takes the load's product off the shelf of the shop it ran against, then deletes
/// it if no order of it is open; says what it did.
async fn clear_away(http: &reqwest::Client, url: &str, admin: &str, product: &str) -> String {
    let admin_url = format!("{url}/api/v1/admin/products/{product}");
    let retired = http.post(format!("{admin_url}/retire")).bearer_auth(admin).send().await;
    match retired {
        Ok(r) if r.status().is_success() => {}
        Ok(r) => return format!("{product} left on sale: retiring it answered {}", r.text().await.unwrap_or_default()),
        Err(e) => return format!("{product} left on sale: {e}"),
    }
    let deleted = match http.delete(&admin_url).bearer_auth(admin).send().await {
        Ok(r) => r,
        Err(e) => return format!("{product} is off the shelf; deleting it failed: {e}"),
    };
    if deleted.status().is_success() {
        return format!("{product} deleted from the shop");
    }
    let body: Value = deleted.json().await.unwrap_or_default();
    match body["error"]["code"].as_str() {
        Some("product_has_open_orders") => {
            let open = &body["error"]["open_orders"];
            let n = ["pending_payment", "paid", "refund_pending"]
                .iter()
                .map(|k| open[k].as_u64().unwrap_or(0))
                .sum::<u64>();
            format!(
                "{product} is off the shelf with {n} orders still open; delete it once they settle \
                 (DELETE {admin_url})"
            )
        }
        _ => format!("{product} is off the shelf; deleting it answered {body}"),
    }
}

async fn setup(
    http: &reqwest::Client,
    url: &str,
    admin: &str,
    product: &str,
    keys: u64,
    shards: u16,
) -> Result<(), LoadError> {
    let body = json!({"id": product, "name": "Load test", "price_cents": 990, "shards": shards});
    let r = http.post(format!("{url}/api/v1/products")).bearer_auth(admin).json(&body).send().await;
    let r = r.map_err(|e| LoadError::Setup(format!("creating the product: {e}")))?;
    if r.status() != 201 {
        let text = r.text().await.unwrap_or_default();
        return Err(LoadError::Setup(format!("creating the product: {text}")));
    }
    let all: Vec<String> = (0..keys).map(|i| format!("{product}-KEY-{i:09}")).collect();
    for chunk in all.chunks(50_000) {
        // Again after a 503 for up to 30 s (a cluster's shards just placed are still
        // being rebuilt; keys already in are counted as duplicates).
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let r = http
                .post(format!("{url}/api/v1/products/{product}/keys"))
                .bearer_auth(admin)
                .json(&json!({"keys": chunk}))
                .send()
                .await
                .map_err(|e| LoadError::Setup(format!("importing keys: {e}")))?;
            match r.status().as_u16() {
                200 => break,
                503 if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(200)).await,
                _ => return Err(LoadError::Setup(format!("importing keys: {}", r.text().await.unwrap_or_default()))),
            }
        }
    }
    Ok(())
}

/// "201", or "409 sold_out" from an error body.
fn answer_key(status: u16, body: &Value) -> String {
    match body["error"]["code"].as_str() {
        Some(code) => format!("{status} {code}"),
        None => status.to_string(),
    }
}

async fn call(r: reqwest::RequestBuilder, out: &mut WorkerResult) -> Option<(u16, Value)> {
    let sent = async {
        let resp = r.send().await?;
        let status = resp.status().as_u16();
        let body = resp.json::<Value>().await.unwrap_or(Value::Null);
        Ok::<_, reqwest::Error>((status, body))
    };
    match sent.await {
        Ok((status, body)) => {
            *out.answers.entry(answer_key(status, &body)).or_default() += 1;
            Some((status, body))
        }
        Err(_) => {
            *out.answers.entry("transport".into()).or_default() += 1;
            None
        }
    }
}

async fn worker(s: Arc<Shared>, started: Instant) -> WorkerResult {
    let mut out = WorkerResult {
        hists: STEPS.iter().map(|_| new_hist()).collect(),
        max_samples: s.max_samples_per_worker,
        ..Default::default()
    };
    loop {
        let i = s.next.fetch_add(1, Ordering::Relaxed);
        if i >= s.buyers {
            return out;
        }
        if buy(&s, i, &mut out).await {
            out.acknowledged += 1;
        }
        s.done.fetch_add(1, Ordering::Relaxed);
        let bucket = (started.elapsed().as_millis() / BUCKET_MS as u128) as usize;
        if out.completions.len() <= bucket {
            out.completions.resize(bucket + 1, 0);
        }
        out.completions[bucket] += 1;
    }
}

/// Width of the buckets the run is counted in over time (a 4 s run: 40 points).
pub const BUCKET_MS: u64 = 100;

/// `[p50, p99]` in ms per bucket of the run, from `(bucket, µs)` samples.
fn latency_by_bucket(samples: Vec<(u32, u32)>, buckets: usize) -> Vec<[f64; 2]> {
    let mut by_bucket: Vec<Vec<u32>> = vec![Vec::new(); buckets];
    for (bucket, micros) in samples {
        if let Some(v) = by_bucket.get_mut(bucket as usize) {
            v.push(micros);
        }
    }
    by_bucket
        .into_iter()
        .map(|mut v| {
            if v.is_empty() {
                return [0.0, 0.0];
            }
            v.sort_unstable();
            let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize] as f64 / 1000.0;
            [at(0.5), at(0.99)]
        })
        .collect()
}

fn record(out: &mut WorkerResult, step: usize, since: Instant) {
    let micros = (since.elapsed().as_micros() as u64).clamp(1, 120_000_000);
    out.hists[step].record(micros).expect("within bounds");
}

/// One buyer. `true` = acknowledged (order created, and in full mode paid and its
/// key read back).
async fn buy(s: &Shared, i: u64, out: &mut WorkerResult) -> bool {
    let buyer = format!("{}-buyer-{i}", s.product);
    let url = &s.urls[(i % s.urls.len() as u64) as usize];
    let (path, body) = match s.mode {
        Mode::Group => {
            ("groups", json!({"product_id": s.product, "deal_id": "load", "buyer": buyer, "join_open": true}))
        }
        _ => ("orders", json!({"product_id": s.product, "quantity": 1, "buyer": buyer})),
    };
    let mut attempts = 0;
    let order = loop {
        attempts += 1;
        let t = Instant::now();
        let Some((status, answer)) = call(s.http.post(format!("{url}/api/v1/{path}")).json(&body), out).await else {
            return false;
        };
        match status {
            201 => {
                // The latency of the accepted request itself, not of the waits before it.
                record(out, 0, t);
                if out.samples.len() < out.max_samples {
                    let bucket = (s.started.elapsed().as_millis() / BUCKET_MS as u128) as u32;
                    out.samples.push((bucket, t.elapsed().as_micros().min(u32::MAX as u128) as u32));
                }
                break if s.mode == Mode::Group { answer["order"].clone() } else { answer };
            }
            503 if s.retry_overloaded && attempts < MAX_ATTEMPTS && answer["error"]["code"] == "overloaded" => {
                let wait_ms = answer["error"]["queue"]["estimated_wait_ms"].as_u64().unwrap_or(1000);
                // Jitter (1x..2x) so refused buyers do not come back together.
                let wait_ms = wait_ms.max(1) + rand::random_range(0..=wait_ms.max(1));
                tokio::time::sleep(Duration::from_millis(wait_ms.min(10_000))).await;
            }
            _ => return false,
        }
    };
    if s.mode == Mode::OrderOnly {
        return true;
    }
    let (Some(id), Some(token), Some(amount)) =
        (order["order_id"].as_str(), order["query_token"].as_str(), order["amount_cents"].as_u64())
    else {
        return false;
    };
    let note = json!({
        "order_id": id, "payment_id": format!("load-{id}"), "amount_cents": amount, "status": "paid",
        "timestamp": chrono::Utc::now().timestamp(), "nonce": format!("{:032x}", rand::random::<u128>()),
    });
    let note = serde_json::to_vec(&note).expect("json");
    let sig = crate::domain::signature::sign(s.secret.as_bytes(), &note);
    let t = Instant::now();
    let notify = format!("{url}/api/v1/payments/{}/notify", s.channel);
    match call(s.http.post(notify).header("X-Signature", sig).body(note), out).await {
        Some((200, _)) => record(out, 1, t),
        _ => return false,
    }
    // A paid seat is delivered when its group completes, not now.
    if s.mode == Mode::Group {
        return true;
    }
    let t = Instant::now();
    let read = s.http.get(format!("{url}/api/v1/orders/{id}")).header("X-Order-Token", token);
    let Some((200, got)) = call(read, out).await else {
        // Paid, so sold, but the key was not read (refused, say, by a rate limit).
        out.paid_unread += 1;
        return false;
    };
    record(out, 2, t);
    let keys: Vec<String> =
        got["keys"].as_array().into_iter().flatten().filter_map(|k| k.as_str().map(str::to_string)).collect();
    let delivered = got["status"] == "delivered" && !keys.is_empty();
    out.keys.extend(keys);
    delivered
}

async fn verdict(
    http: &reqwest::Client,
    url: &str,
    admin: &str,
    product: &str,
    config: &LoadConfig,
    total: &WorkerResult,
) -> Result<Verdict, LoadError> {
    let audit: Value = http
        .get(format!("{url}/api/v1/admin/audit"))
        .bearer_auth(admin)
        .send()
        .await
        .map_err(|e| LoadError::Audit(e.to_string()))?
        .json()
        .await
        .map_err(|e| LoadError::Audit(e.to_string()))?;
    let audit_ok = audit["ok"] == json!(true);
    let mine = audit["products"].as_array().into_iter().flatten().find(|p| p["id"] == product);
    let field = config.mode.taken_field();
    let audit_taken = mine.and_then(|p| p[field].as_u64()).unwrap_or(0);
    let distinct: HashSet<&String> = total.keys.iter().collect();
    let mut problems = Vec::new();
    if !audit_ok {
        problems.push(format!("audit not ok: {}", audit["violations"]));
    }
    if audit_taken > config.keys {
        problems.push(format!("oversold: {audit_taken} {field} of {} keys", config.keys));
    }
    if distinct.len() != total.keys.len() {
        problems.push(format!("{} keys delivered more than once", total.keys.len() - distinct.len()));
    }
    // A request the client gave up on (transport error, client timeout) may still
    // have succeeded, and a paid order whose read was refused is sold unseen: then
    // only bounds hold, not equality.
    let unanswered = total.answers.get("transport").copied().unwrap_or(0);
    let seen = distinct.len() as u64;
    if config.mode == Mode::Full && (seen > audit_taken || audit_taken > seen + total.paid_unread + unanswered) {
        problems.push(format!(
            "{seen} distinct keys delivered and {} paid orders not read, audit counts {audit_taken} sold",
            total.paid_unread
        ));
    }
    let most = total.acknowledged + unanswered + total.paid_unread;
    if config.mode == Mode::Group {
        // Paid seats of groups still filling are not sold yet; groups sell whole.
        if audit_taken % LOAD_GROUP_SIZE != 0 || audit_taken > most {
            problems.push(format!("{audit_taken} sold for {} paid seats: not whole groups", total.acknowledged));
        }
        let every_group_filled = unanswered == 0 && total.acknowledged == config.buyers;
        if every_group_filled && config.buyers.is_multiple_of(LOAD_GROUP_SIZE) && audit_taken != total.acknowledged {
            problems.push(format!("every seat paid, yet {audit_taken} sold of {}", total.acknowledged));
        }
    } else if !(total.acknowledged..=most).contains(&audit_taken) {
        problems.push(format!(
            "{} acknowledged and {unanswered} unanswered, audit counts {audit_taken} {field}",
            total.acknowledged
        ));
    }
    let rate_limited = total.answers.iter().filter(|(k, _)| k.starts_with("429")).map(|(_, n)| *n).sum();
    Ok(Verdict {
        ok: problems.is_empty(),
        audit_ok,
        audit_taken,
        acknowledged: total.acknowledged,
        distinct_keys_delivered: distinct.len() as u64,
        paid_unread: total.paid_unread,
        rate_limited,
        problems,
    })
}

impl LoadReport {
    /// The human summary `kami load` prints.
    pub fn table(&self) -> String {
        use std::fmt::Write;
        let mut t = String::new();
        let _ = writeln!(
            t,
            "flash sale on {}: {} buyers, {} keys, {} connections, {} shard(s), mode {:?}",
            self.target, self.buyers, self.keys, self.concurrency, self.shards, self.mode
        );
        let _ = writeln!(t, "  {:.0} buyers/s over {:.2} s", self.buyers_per_sec, self.elapsed_ms as f64 / 1000.0);
        let _ = writeln!(
            t,
            "  {:<13} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "step", "count", "per s", "p50 ms", "p90 ms", "p99 ms", "max ms"
        );
        for s in &self.steps {
            let _ = writeln!(
                t,
                "  {:<13} {:>8} {:>9.0} {:>9.2} {:>9.2} {:>9.2} {:>9.2}",
                s.step, s.count, s.per_sec, s.p50_ms, s.p90_ms, s.p99_ms, s.max_ms
            );
        }
        let answers: Vec<String> = self.answers.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        let _ = writeln!(t, "  answers: {}", answers.join(", "));
        let v = &self.verdict;
        let _ = writeln!(
            t,
            "  verdict: {} (audit ok {}, acknowledged {}, audit {} {}, distinct keys delivered {})",
            if v.ok { "OK" } else { "FAILED" },
            v.audit_ok,
            v.acknowledged,
            self.mode.taken_field(),
            v.audit_taken,
            v.distinct_keys_delivered
        );
        for p in &v.problems {
            let _ = writeln!(t, "    problem: {p}");
        }
        if let Some(left) = &self.product_left {
            let _ = writeln!(t, "  product: {left}");
        }
        if v.rate_limited > 0 {
            let _ = writeln!(
                t,
                "  rate limited: {} requests refused 429 `rate_limited` (refused, not lost: {} paid orders were not \
                 read, the audit counts them sold). The server's per-IP limits are on: give the load a tier's key \
                 (`--api-key`, see `[rate_limits.tiers]`), or run against a server with `rate_limits.enabled = false`.",
                v.rate_limited, v.paid_unread
            );
        }
        t
    }
}
