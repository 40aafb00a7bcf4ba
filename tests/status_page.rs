//! The operator's status page in a real browser: headless Chromium driven through
//! chromedriver (WebDriver over HTTP), loaded during a load run; the numbers it
//! shows must move with the traffic. `.ci/run` installs Chromium when missing.

mod common;

use std::io::BufRead;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// Stock of the product on sale: the paced load below takes minutes to sell it.
const KEYS: u64 = 50_000;

/// chromedriver as a child process, killed on drop.
struct Driver {
    child: std::process::Child,
    url: String,
    http: reqwest::Client,
    session: Option<String>,
    _profile: tempfile::TempDir,
}

impl Driver {
    fn start() -> Driver {
        let mut child = std::process::Command::new(CHROMEDRIVER)
            .arg("--port=0")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn chromedriver");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(port) = line.split("started successfully on port ").nth(1) {
                    let _ = tx.send(port.trim_end_matches('.').to_string());
                }
            }
        });
        let port = rx.recv_timeout(Duration::from_secs(30)).expect("chromedriver reported its port");
        Driver {
            child,
            url: format!("http://127.0.0.1:{port}"),
            http: client(),
            session: None,
            _profile: tempfile::tempdir().unwrap(),
        }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Value) -> Value {
        let resp =
            self.http.request(method, format!("{}{path}", self.url)).json(&body).send().await.expect("webdriver");
        let status = resp.status();
        let v: Value = resp.json().await.expect("webdriver JSON");
        assert!(status.is_success(), "webdriver {path}: {status} {v}");
        v["value"].clone()
    }

    async fn open(&mut self, url: &str) {
        let args = [
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ]
        .iter()
        .map(|a| a.to_string())
        .chain([format!("--user-data-dir={}", self._profile.path().display())])
        .collect::<Vec<_>>();
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": CHROMIUM, "args": args},
        }}});
        let session = self.call(reqwest::Method::POST, "/session", caps).await;
        let id = session["sessionId"].as_str().expect("session id").to_string();
        self.call(reqwest::Method::POST, &format!("/session/{id}/url"), json!({"url": url})).await;
        self.session = Some(id);
    }

    /// The text of the first element matching `css` on the page now (None: no such element).
    async fn text(&self, css: &str) -> Option<String> {
        let id = self.session.as_ref().expect("open first");
        let script = "const e = document.querySelector(arguments[0]); return e ? e.textContent : null;";
        let v = self
            .call(
                reqwest::Method::POST,
                &format!("/session/{id}/execute/sync"),
                json!({"script": script, "args": [css]}),
            )
            .await;
        v.as_str().map(str::to_string)
    }

    async fn number(&self, css: &str) -> Option<u64> {
        self.text(css).await.and_then(|t| t.trim().parse().ok())
    }

    /// Polls the page until `css` shows a number satisfying `ok` (bounded).
    async fn until(&self, css: &str, ok: impl Fn(u64) -> bool) -> u64 {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let n = self.number(css).await;
            if let Some(n) = n.filter(|n| ok(*n)) {
                return n;
            }
            assert!(tokio::time::Instant::now() < deadline, "{css} never showed the expected number (last: {n:?})");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        if let Some(id) = &self.session {
            // Best effort: closes Chromium; killing chromedriver would orphan it.
            let (http, url) = (self.http.clone(), format!("{}/session/{id}", self.url));
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                rt.block_on(async { tokio::time::timeout(Duration::from_secs(10), http.delete(url).send()).await })
            })
            .join();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_the_numbers_of_a_running_sale_and_they_move() {
    if !std::path::Path::new(CHROMIUM).exists() || !std::path::Path::new(CHROMEDRIVER).exists() {
        assert!(std::env::var_os("CI").is_none(), "Chromium is missing in CI (.ci/run installs it)");
        eprintln!("SKIPPED: {CHROMIUM} / {CHROMEDRIVER} not installed (apt-get install chromium chromium-driver)");
        return;
    }
    let t = TestApp::spawn().await;
    let api = t.api();
    api.create_product("hot", 990, 0, 2).await;
    api.import("hot", &(0..KEYS as usize).map(|i| format!("KEY-{i}")).collect::<Vec<_>>()).await;

    let mut driver = Driver::start();
    driver.open(&format!("{}/status", api.url)).await;
    let row = |class: &str| format!("#products tr[data-key=\"hot\"] td.{class}");
    assert_eq!(driver.until(&row("available"), |n| n == KEYS).await, KEYS, "the page rendered the product");
    let orders_before = driver.number(&row("orders")).await.unwrap();

    // The load: buyers ordering without pause, and forged notifications refused.
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let load: Vec<_> = (0..4)
        .map(|w| {
            let (api, stop, sent) = (api.clone(), stop.clone(), sent.clone());
            tokio::spawn(async move {
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    let r = api.order("hot", 1, &format!("w{w}-{i}"), None).await;
                    assert_eq!(r.status, 201, "{}", r.body);
                    sent.fetch_add(1, Ordering::Relaxed);
                    i += 1;
                    // Pacing (~100 orders/s per worker), so the stock outlasts a slow machine.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
        })
        .collect();
    for _ in 0..3 {
        let forged = api.notify_raw("sandbox", br#"{"order_id":"x"}"#, "not-the-secret").await;
        assert_eq!(forged.status, 401);
    }

    // The numbers move while the sale runs: orders grow, stock falls, a rate shows.
    let orders = driver.until(&row("orders"), |n| n >= orders_before + 200).await;
    let per_sec = driver.until(&row("orders-per-sec"), |n| n > 0).await;
    let available = driver.until(&row("available"), |n| n < KEYS).await;
    let refused = driver.until("#rejected tr[data-key=\"bad_signature\"] td.total", |n| n >= 3).await;
    let refreshes = driver.number("#refreshes").await.unwrap();
    assert!(refreshes >= 2, "the page refreshed by itself ({refreshes})");
    assert_eq!(driver.text("#channels tr[data-key=\"sandbox\"] td:nth-child(2)").await.as_deref(), Some("closed"));
    stop.store(true, Ordering::Relaxed);
    for l in load {
        l.await.unwrap();
    }
    // Once the sale stops, the page settles on exactly what was sold.
    let sent = sent.load(Ordering::Relaxed);
    driver.until(&row("orders"), |n| n == sent).await;
    driver.until(&row("reserved"), |n| n == sent).await;
    driver.until(&row("available"), |n| n == KEYS - sent).await;
    eprintln!(
        "status page: {orders} orders, {per_sec}/s, {available} available, {refused} refused, {refreshes} refreshes"
    );
}
