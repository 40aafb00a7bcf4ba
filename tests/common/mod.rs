//! Test harness: the real app on a random loopback port with a temp data dir, and
//! an HTTP client that speaks the API. Nothing here is mocked.
#![allow(dead_code)]

pub mod gateway;
pub mod nats;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

pub const ADMIN: &str = "test-admin-token";
pub const SECRET: &str = "test-sandbox-secret";

pub fn settings(data: &Path, extra: &[(&str, &str)]) -> kami::Settings {
    let mut overrides: Vec<(String, String)> = vec![
        ("server.listen".into(), "127.0.0.1:0".into()),
        ("storage.path".into(), data.display().to_string()),
        ("admin.token".into(), ADMIN.into()),
        ("payments.channels.sandbox.secret".into(), SECRET.into()),
        ("rate_limits.enabled".into(), "false".into()),
        // Tests that count exact outcomes under concurrency must not be shed; the
        // time bound has its own tests (overload.rs).
        ("actors.max_queue_wait_ms".into(), "0".into()),
        ("actors.arbiters".into(), "2".into()),
    ];
    overrides.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    kami::Settings::load(&kami::Sources { overrides, ..Default::default() }).expect("test settings")
}

pub struct TestApp {
    pub app: Option<kami::RunningApp>,
    pub url: String,
    pub http: reqwest::Client,
    pub data: PathBuf,
    _dir: Option<tempfile::TempDir>,
}

impl TestApp {
    pub async fn spawn() -> TestApp {
        Self::spawn_with(&[]).await
    }

    pub async fn spawn_with(extra: &[(&str, &str)]) -> TestApp {
        if std::env::var_os("KAMI_TEST_LOG").is_some() {
            kami::telemetry::init_logging(&kami::config::LogSettings {
                level: "debug".into(),
                format: kami::config::LogFormat::Human,
            });
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let data = dir.path().join("data");
        let mut app = Self::start_on(&data, extra).await;
        app._dir = Some(dir);
        app
    }

    /// Starts on an existing data directory (a restart).
    pub async fn start_on(data: &Path, extra: &[(&str, &str)]) -> TestApp {
        let app = kami::start(settings(data, extra)).await.expect("app starts");
        TestApp { url: app.url(), app: Some(app), http: client(), data: data.to_path_buf(), _dir: None }
    }

    pub fn core(&self) -> &std::sync::Arc<kami::core::Kami> {
        self.app.as_ref().expect("running").core()
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(30)).pool_max_idle_per_host(64).build().expect("client")
}

/// An HTTP client for one kami at `url`.
#[derive(Clone)]
pub struct Api {
    pub url: String,
    pub http: reqwest::Client,
}

pub struct Reply {
    pub status: u16,
    pub body: Value,
    pub headers: reqwest::header::HeaderMap,
}

impl Reply {
    pub fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }
}

impl TestApp {
    pub fn api(&self) -> Api {
        Api { url: self.url.clone(), http: self.http.clone() }
    }
}

pub async fn reply(r: reqwest::RequestBuilder) -> Reply {
    let resp = r.send().await.expect("request sent");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().await.expect("body");
    let body = serde_json::from_str(&text).unwrap_or_else(|_| panic!("status {status}: body is not JSON: {text:?}"));
    // Every JSON answer ends in a newline (curl's output does not run into the prompt).
    assert!(text.ends_with('\n'), "status {status}: the answer does not end in a newline: {text:?}");
    Reply { status, body, headers }
}

pub fn now_secs() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

impl Api {
    /// `/metrics` as Prometheus text.
    pub async fn metrics(&self) -> String {
        let resp = self.http.get(format!("{}/metrics", self.url)).send().await.expect("request sent");
        assert_eq!(resp.status(), 200);
        resp.text().await.expect("body")
    }

    pub fn admin(&self, r: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        r.bearer_auth(ADMIN)
    }

    pub async fn create_product(&self, id: &str, price_cents: u64, per_buyer_limit: u32, shards: u16) -> Reply {
        let body = json!({"id": id, "name": format!("Product {id}"), "price_cents": price_cents, "per_buyer_limit": per_buyer_limit, "shards": shards});
        reply(self.admin(self.http.post(format!("{}/api/v1/products", self.url))).json(&body)).await
    }

    pub async fn import(&self, id: &str, keys: &[String]) -> Reply {
        reply(
            self.admin(self.http.post(format!("{}/api/v1/products/{id}/keys", self.url))).json(&json!({"keys": keys})),
        )
        .await
    }

    /// Creates a product with `n` keys named `{id}-K{i}`.
    pub async fn product_with_keys(&self, id: &str, n: usize, per_buyer_limit: u32) -> Vec<String> {
        assert_eq!(self.create_product(id, 990, per_buyer_limit, 1).await.status, 201);
        let keys: Vec<String> = (0..n).map(|i| format!("{id}-K{i}")).collect();
        let r = self.import(id, &keys).await;
        assert_eq!((r.status, r.body["imported"].as_u64()), (200, Some(n as u64)), "{:?}", r.body);
        keys
    }

    pub async fn product(&self, id: &str) -> Reply {
        reply(self.http.get(format!("{}/api/v1/products/{id}", self.url))).await
    }

    pub async fn order(&self, product: &str, quantity: u64, buyer: &str, idempotency_key: Option<&str>) -> Reply {
        let mut r = self.order_request(product, quantity, buyer);
        if let Some(k) = idempotency_key {
            r = r.header("Idempotency-Key", k);
        }
        reply(r).await
    }

    /// The request [`Self::order`] sends, to add headers to or send by hand.
    pub fn order_request(&self, product: &str, quantity: u64, buyer: &str) -> reqwest::RequestBuilder {
        self.http
            .post(format!("{}/api/v1/orders", self.url))
            .json(&json!({"product_id": product, "quantity": quantity, "buyer": buyer}))
    }

    pub async fn get_order(&self, order_id: &str, token: &str) -> Reply {
        reply(self.http.get(format!("{}/api/v1/orders/{order_id}", self.url)).header("X-Order-Token", token)).await
    }

    pub async fn admin_order(&self, order_id: &str) -> Reply {
        reply(self.admin(self.http.get(format!("{}/api/v1/admin/orders/{order_id}", self.url)))).await
    }

    pub async fn cancel(&self, order_id: &str, token: &str) -> Reply {
        reply(self.http.post(format!("{}/api/v1/orders/{order_id}/cancel", self.url)).header("X-Order-Token", token))
            .await
    }

    pub async fn audit(&self) -> Reply {
        reply(self.admin(self.http.get(format!("{}/api/v1/admin/audit", self.url)))).await
    }

    /// A signed `paid` notification from the sandbox channel, fresh timestamp and nonce.
    pub async fn notify(&self, order_id: &str, payment_id: &str, amount_cents: u64) -> Reply {
        reply(self.notify_request(order_id, payment_id, amount_cents)).await
    }

    /// The request [`Self::notify`] sends, to add headers to or send by hand.
    pub fn notify_request(&self, order_id: &str, payment_id: &str, amount_cents: u64) -> reqwest::RequestBuilder {
        let body = json!({
            "order_id": order_id, "payment_id": payment_id, "amount_cents": amount_cents,
            "status": "paid", "timestamp": now_secs(), "nonce": format!("{:032x}", rand::random::<u128>()),
        });
        self.notify_raw_request("sandbox", &serde_json::to_vec(&body).unwrap(), SECRET)
    }

    pub async fn notify_raw(&self, channel: &str, body: &[u8], secret: &str) -> Reply {
        reply(self.notify_raw_request(channel, body, secret)).await
    }

    fn notify_raw_request(&self, channel: &str, body: &[u8], secret: &str) -> reqwest::RequestBuilder {
        let sig = kami::domain::signature::sign(secret.as_bytes(), body);
        self.http
            .post(format!("{}/api/v1/payments/{channel}/notify", self.url))
            .header("X-Signature", sig)
            .body(body.to_vec())
    }

    /// Order then pay; returns the delivered order as the buyer sees it.
    pub async fn buy(&self, product: &str, buyer: &str) -> Reply {
        let o = self.order(product, 1, buyer, None).await;
        assert_eq!(o.status, 201, "{:?}", o.body);
        let id = o.body["order_id"].as_str().unwrap();
        let n = self.notify(id, &format!("pay-{id}"), o.body["amount_cents"].as_u64().unwrap()).await;
        assert_eq!(n.status, 200, "{:?}", n.body);
        self.get_order(id, o.body["query_token"].as_str().unwrap()).await
    }

    /// Polls `check` until it holds (an observable state change), bounded by `limit`.
    pub async fn eventually<F, Fut>(&self, limit: Duration, mut check: F) -> bool
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = tokio::time::Instant::now() + limit;
        while tokio::time::Instant::now() < deadline {
            if check().await {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }
}

/// The sum of every series of metric `name` in Prometheus text (0 when absent).
/// The recorder is global to the test process: tests running alongside add to it.
pub fn metric_value(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with([' ', '{'])))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

pub fn assert_audit_ok(audit: &Reply) {
    assert_eq!(audit.status, 200);
    assert_eq!(audit.body["ok"], json!(true), "audit: {}", audit.body);
    assert_eq!(audit.body["violations"], json!([]));
    for p in audit.body["products"].as_array().unwrap() {
        let n = |f: &str| p[f].as_u64().unwrap();
        let placed = n("available") + n("reserved") + n("sold") + n("withdrawn");
        assert_eq!(n("imported"), placed + n("in_transit"), "I6 for {p}");
    }
}

/// The real `kami` binary as a child process (for crash tests: SIGKILL is real).
pub struct Server {
    pub child: std::process::Child,
    pub url: String,
    /// Start-up recovery time, as the server reported it.
    pub recovery_ms: u64,
    /// Journal records replayed at start-up, as the server reported it.
    pub recovery_records: u64,
    /// Every line the server wrote to stdout (its logs included), bounded.
    pub stdout: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Server {
    /// Starts `kami` on `data` with a random port; returns once it prints its address.
    pub fn start(data: &Path, extra_env: &[(&str, &str)]) -> Server {
        Server::spawn(data, extra_env).ready()
    }

    /// Starts `kami` on `data` with a random port and returns at once: its log can be
    /// read while it starts ([`Starting::lines_with`]), [`Starting::ready`] waits.
    pub fn spawn(data: &Path, extra_env: &[(&str, &str)]) -> Starting {
        use std::io::BufRead;
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_kami"));
        cmd.env_clear()
            .env("KAMI_SERVER__LISTEN", "127.0.0.1:0")
            .env("KAMI_STORAGE__PATH", data)
            .env("KAMI_ADMIN__TOKEN", ADMIN)
            .env("KAMI_PAYMENTS__CHANNELS__SANDBOX__SECRET", SECRET)
            .env("KAMI_RATE_LIMITS__ENABLED", "false")
            .env("KAMI_ACTORS__MAX_QUEUE_WAIT_MS", "0")
            .env("KAMI_LOG__LEVEL", "warn")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit());
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn kami");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let kept = lines.clone();
        std::thread::spawn(move || {
            let (mut recovery_ms, mut records) = (0, 0);
            for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(rest) = line.strip_prefix("recovered ") {
                    let ms = rest.rsplit(" in ").next().and_then(|t| t.strip_suffix(" ms"));
                    recovery_ms = ms.and_then(|t| t.parse().ok()).expect("recovery line ends in `in N ms`");
                    let n = rest.split(", ").nth(1).and_then(|t| t.split_whitespace().next());
                    records = n.and_then(|t| t.parse().ok()).expect("recovery line names the journal records");
                }
                if let Some(rest) = line.strip_prefix("kami listening on ") {
                    let _ = tx.send((rest.split_whitespace().next().unwrap_or("").to_string(), recovery_ms, records));
                }
                let mut kept = kept.lock().unwrap();
                if kept.len() < 100_000 {
                    kept.push(line);
                }
            }
        });
        Starting { child: Some(child), rx, stdout: lines }
    }

    /// Waits for the process to end by itself (a crash point), bounded by `limit`.
    pub async fn exited_within(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = tokio::time::Instant::now() + limit;
        while tokio::time::Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        None
    }

    pub fn api(&self) -> Api {
        Api { url: self.url.clone(), http: client() }
    }

    /// SIGKILL: no shutdown code runs.
    /// SIGTERM: asks for a graceful shutdown.
    pub fn sigterm(&self) {
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: kill(2) with a pid of our own child and a valid signal.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0, "SIGTERM sent");
    }

    /// Lines of stdout so far that contain `needle`.
    pub fn lines_with(&self, needle: &str) -> Vec<String> {
        self.stdout.lock().unwrap().iter().filter(|l| l.contains(needle)).cloned().collect()
    }

    pub fn kill9(&mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reaped");
    }
}

/// A `kami` started by [`Server::spawn`] that may not serve yet.
pub struct Starting {
    child: Option<std::process::Child>,
    rx: std::sync::mpsc::Receiver<(String, u64, u64)>,
    stdout: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Starting {
    /// Lines of stdout so far that contain `needle`.
    pub fn lines_with(&self, needle: &str) -> Vec<String> {
        self.stdout.lock().unwrap().iter().filter(|l| l.contains(needle)).cloned().collect()
    }

    /// Waits (at most 60 s) until it prints its address.
    pub fn ready(mut self) -> Server {
        let Ok((url, recovery_ms, recovery_records)) = self.rx.recv_timeout(Duration::from_secs(60)) else {
            let said = self.stdout.lock().unwrap().join("\n");
            panic!("kami did not print its address; it said:\n{said}");
        };
        let child = self.child.take().expect("not ready yet");
        Server { child, url, recovery_ms, recovery_records, stdout: self.stdout.clone() }
    }
}

impl Drop for Starting {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The seed of a randomised test: `KAMI_SEED` if set, else a fresh one. Printed so
/// that a failing run (whose output cargo shows) can be replayed exactly.
pub fn seed(test: &str) -> u64 {
    let seed = match std::env::var("KAMI_SEED") {
        Ok(s) => s.parse().expect("KAMI_SEED must be a u64"),
        Err(_) => rand::random(),
    };
    eprintln!("{test}: rerun with KAMI_SEED={seed}");
    seed
}

/// Scale of the chaos suites: 1 in CI; `KAMI_SOAK=n` multiplies the work by n.
pub fn soak_factor() -> usize {
    std::env::var("KAMI_SOAK").ok().and_then(|s| s.parse().ok()).filter(|&n| n >= 1).unwrap_or(1)
}

impl Api {
    /// `POST /api/v1/admin/chaos/kill`.
    pub async fn kill(&self, actor: &str) -> Reply {
        reply(
            self.admin(self.http.post(format!("{}/api/v1/admin/chaos/kill", self.url)))
                .json(&json!({ "actor": actor })),
        )
        .await
    }
}

/// Runs `kami audit --data DIR [--json]` (the server must be stopped); returns the
/// exit code, stdout and stderr.
pub fn kami_audit(data: &Path, json: bool) -> (i32, String, String) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_kami"));
    cmd.args(["audit", "--data"]).arg(data);
    if json {
        cmd.arg("--json");
    }
    let out = cmd.output().expect("run kami audit");
    let text = |b: Vec<u8>| String::from_utf8_lossy(&b).to_string();
    (out.status.code().expect("exit code"), text(out.stdout), text(out.stderr))
}

/// Opens a data directory's storage directly (no server), for tests that read or
/// damage records.
pub fn open_storage(data: &Path) -> std::sync::Arc<kami::storage::Storage> {
    kami::storage::Storage::open(&storage_options(data)).expect("open storage")
}

/// The options [`open_storage`] opens `data` with: small caches, no linger.
pub fn storage_options(data: &Path) -> kami::storage::StorageOptions {
    kami::storage::StorageOptions {
        path: data.to_path_buf(),
        cache_capacity_bytes: 16 << 20,
        max_pending_commits: 1024,
        max_commit_batch: 1024,
        commit_linger: Duration::ZERO,
        commit_busy_linger: Duration::ZERO,
    }
}

/// Reads one HTTP answer from `stream` until its head and Content-Length body have
/// arrived (30 s at most). Returns (status, head, body).
pub async fn read_answer(stream: &mut tokio::net::TcpStream) -> (u16, String, Vec<u8>) {
    let mut response = Vec::new();
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 8192];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(30), stream.read(&mut buf))
            .await
            .expect("an answer within 30 s")
            .unwrap_or(0);
        response.extend_from_slice(&buf[..n]);
        if let Some(split) = response.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&response[..split]).to_string();
            let len: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase().strip_prefix("content-length: ").map(|v| v.trim().parse().unwrap())
                })
                .unwrap_or(0);
            if response.len() >= split + 4 + len {
                let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
                return (status, head, response[split + 4..split + 4 + len].to_vec());
            }
        }
        if n == 0 {
            panic!("connection closed before a full answer: {:?}", String::from_utf8_lossy(&response));
        }
    }
}
