//! The operator's status page in a real browser: headless Chromium driven through
//! chromedriver (WebDriver over HTTP), loaded during a load run; the numbers it
//! shows must move with the traffic, and the charts must draw it (read back from
//! the browser's screenshot of them). `.ci/run` installs Chromium when missing.

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
            // The whole page in the viewport: an element screenshot shows only what is in view.
            "--window-size=1400,2400",
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

    /// Runs `script` in the page with `args`; its return value.
    async fn script(&self, script: &str, args: Value) -> Value {
        let id = self.session.as_ref().expect("open first");
        self.call(
            reqwest::Method::POST,
            &format!("/session/{id}/execute/sync"),
            json!({"script": script, "args": args}),
        )
        .await
    }

    /// The browser's picture of the first element matching `css`, decoded.
    async fn screenshot(&self, css: &str) -> Picture {
        use base64::Engine;
        let id = self.session.as_ref().expect("open first");
        let found = self
            .call(
                reqwest::Method::POST,
                &format!("/session/{id}/element"),
                json!({"using": "css selector", "value": css}),
            )
            .await;
        let element = found.as_object().and_then(|o| o.values().next()).and_then(Value::as_str).expect("element id");
        let path = format!("/session/{id}/element/{element}/screenshot");
        let shot = self.call(reqwest::Method::GET, &path, json!({})).await;
        let png = base64::engine::general_purpose::STANDARD.decode(shot.as_str().expect("base64")).unwrap();
        if let Some(dir) = std::env::var_os("KAMI_SCREENSHOTS") {
            // For a person to look at: `KAMI_SCREENSHOTS=DIR cargo test --test status_page`.
            let _ =
                std::fs::write(std::path::Path::new(&dir).join(format!("{}.png", css.trim_start_matches('#'))), &png);
        }
        Picture::decode(&png)
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

/// A screenshot as RGB pixels.
struct Picture {
    width: usize,
    rgb: Vec<[u8; 3]>,
}

impl Picture {
    fn decode(png_bytes: &[u8]) -> Picture {
        let mut reader = png::Decoder::new(png_bytes).read_info().expect("a PNG");
        let mut buf = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut buf).expect("a frame");
        let channels = info.color_type.samples();
        assert!(channels >= 3 && info.bit_depth == png::BitDepth::Eight, "{:?} {:?}", info.color_type, info.bit_depth);
        let rgb = buf[..info.buffer_size()].chunks(channels).map(|p| [p[0], p[1], p[2]]).collect();
        Picture { width: info.width as usize, rgb }
    }

    /// The rows in which some pixel has (nearly) `color`: how many pixels, and
    /// the first and last such row.
    fn drawn(&self, color: [u8; 3]) -> (usize, Option<(usize, usize)>) {
        let near = |p: &[u8; 3]| p.iter().zip(color).all(|(a, b)| a.abs_diff(b) <= 40);
        let mut count = 0;
        let mut rows: Option<(usize, usize)> = None;
        for (i, p) in self.rgb.iter().enumerate() {
            if near(p) {
                count += 1;
                let row = i / self.width;
                rows = Some(rows.map_or((row, row), |(lo, hi)| (lo.min(row), hi.max(row))));
            }
        }
        (count, rows)
    }
}

/// The orders line of the throughput chart (the page's colour for it).
const ORDERS_COLOR: [u8; 3] = [0x1f, 0x77, 0xb4];

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
    // Before the sale, the orders line lies flat on the chart's floor.
    let (_, rows) = driver.screenshot("#chart-throughput").await.drawn(ORDERS_COLOR);
    let flat = rows.map_or(0, |(lo, hi)| hi - lo);
    assert!(flat <= 4, "no orders yet, yet the orders line spans {flat} rows");

    // What needs attention: a product sold out, a refund owed, a wrong amount.
    api.product_with_keys("tiny", 1, 0).await;
    assert_eq!(api.buy("tiny", "t1").await.body["status"], "delivered");
    // Its one key went to another buyer after the order was cancelled: its payment is owed back.
    api.product_with_keys("late", 1, 0).await;
    let late = api.order("late", 1, "l1", None).await;
    let late_id = late.body["order_id"].as_str().unwrap();
    assert_eq!(api.cancel(late_id, late.body["query_token"].as_str().unwrap()).await.status, 200);
    assert_eq!(api.buy("late", "l2").await.body["status"], "delivered");
    let refund = api.notify(late_id, "pay-late", 990).await;
    assert_eq!(refund.status, 200, "{}", refund.body);
    api.product_with_keys("wrong", 1, 0).await;
    let wrong = api.order("wrong", 1, "w1", None).await;
    let mismatch = api.notify(wrong.body["order_id"].as_str().unwrap(), "pay-wrong", 1).await;
    assert_eq!((mismatch.status, mismatch.code()), (422, "amount_mismatch"));
    driver.until("#refunds-owed", |n| n >= 1).await;
    driver.until("#amount-mismatches", |n| n >= 1).await;
    let warned = "return document.getElementById('card-refunds').classList.contains('warn');";
    assert_eq!(driver.script(warned, json!([])).await, json!(true), "a refund owed is flagged");
    let row_class = "const r = document.querySelector(`#products tr[data-key=\"${arguments[0]}\"]`); return r ? r.className : null;";
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while driver.script(row_class, json!(["tiny"])).await != json!("sold-out") {
        assert!(tokio::time::Instant::now() < deadline, "the sold-out product is not highlighted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(driver.text("#products tr[data-key=\"tiny\"] td.state").await.as_deref(), Some("sold out"));
    assert_eq!(driver.script(row_class, json!(["hot"])).await, json!(""), "a product on sale is not highlighted");

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
    // The charts draw the sale: the orders line has several seconds of points and
    // climbs off the floor, as the browser renders it.
    let points =
        "return +document.querySelector('#chart-throughput path[data-series=\"orders_per_sec\"]').dataset.points;";
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let rise = loop {
        let drawn = driver.script(points, json!([])).await.as_u64().unwrap_or(0);
        let (pixels, rows) = driver.screenshot("#chart-throughput").await.drawn(ORDERS_COLOR);
        let rise = rows.map_or(0, |(lo, hi)| hi - lo);
        if drawn >= 3 && pixels >= 50 && rise >= 20 {
            break rise;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the orders line did not draw the sale: {drawn} points, {pixels} pixels over {rise} rows"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let p99 = "return +document.querySelector('#chart-latency path[data-series=\"create_p99_ms\"]').dataset.points;";
    assert!(driver.script(p99, json!([])).await.as_u64().unwrap_or(0) >= 1, "the latency chart has points");
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
    // An idle line shows no drain rate (it used to keep the last one).
    driver.until(&row("drain"), |n| n == 0).await;
    eprintln!(
        "status page: {orders} orders, {per_sec}/s, {available} available, {refused} refused, {refreshes} refreshes, orders line rises {rise} rows"
    );
}
