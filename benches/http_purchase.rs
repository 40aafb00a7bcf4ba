//! Flash sale over real HTTP: the app in-process on a loopback port, N buyers with
//! C concurrent connections, each doing create order -> signed notification ->
//! read key. Prints throughput, latency percentiles, group-commit batch sizes, and
//! the recovery time of the journal it leaves.
//!
//! `cargo bench --bench http_purchase` (defaults: 20000 buyers, 256 connections;
//! override with BUYERS=, CONCURRENCY=, ARBITERS=). Under `cargo test --all-targets`
//! it runs a small smoke version.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::{json, Value};

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn settings(data: &std::path::Path, arbiters: u64) -> kami::Settings {
    let overrides = [
        ("server.listen", "127.0.0.1:0".to_string()),
        ("storage.path", data.display().to_string()),
        ("admin.token", "bench".into()),
        ("payments.channels.sandbox.secret", "bench".into()),
        ("rate_limits.enabled", "false".into()),
        ("actors.arbiters", arbiters.to_string()),
        ("log.level", "warn".into()),
    ];
    kami::Settings::load(&kami::Sources {
        overrides: overrides.iter().map(|(k, v)| (k.to_string(), v.clone())).collect(),
        ..Default::default()
    })
    .unwrap()
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let buyers = env_or("BUYERS", if full { 20_000 } else { 200 });
    let concurrency = env_or("CONCURRENCY", if full { 256 } else { 16 });
    let arbiters = env_or("ARBITERS", 2);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(run(buyers, concurrency, arbiters));
}

async fn run(buyers: u64, concurrency: u64, arbiters: u64) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let app = kami::start(settings(&data, arbiters)).await.unwrap();
    let url = app.url();
    let http = reqwest::Client::builder().pool_max_idle_per_host(concurrency as usize).build().unwrap();
    let r = http
        .post(format!("{url}/api/v1/products"))
        .bearer_auth("bench")
        .json(&json!({"id": "hot", "name": "Hot", "price_cents": 990}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let keys: Vec<String> = (0..buyers).map(|i| format!("KEY-{i:08}")).collect();
    for chunk in keys.chunks(50_000) {
        let r = http
            .post(format!("{url}/api/v1/products/hot/keys"))
            .bearer_auth("bench")
            .json(&json!({"keys": chunk}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }

    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (http, url, next) = (http.clone(), url.clone(), next.clone());
            tokio::spawn(async move {
                let mut hist = [new_hist(), new_hist(), new_hist()];
                let mut errors = 0u64;
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= buyers {
                        return (hist, errors);
                    }
                    if !buy(&http, &url, i, &mut hist).await {
                        errors += 1;
                    }
                }
            })
        })
        .collect();
    let mut hists = [new_hist(), new_hist(), new_hist()];
    let mut errors = 0;
    for w in workers {
        let (h, e) = w.await.unwrap();
        for (a, b) in hists.iter_mut().zip(h.iter()) {
            a.add(b).unwrap();
        }
        errors += e;
    }
    let elapsed = started.elapsed();
    let audit: Value =
        http.get(format!("{url}/api/v1/admin/audit")).bearer_auth("bench").send().await.unwrap().json().await.unwrap();
    let (batches, median_batch, p99_batch, flush_p50_us) = {
        let s = app.core().storage().committer().stats();
        (
            s.batch_sizes.len(),
            s.batch_sizes.value_at_quantile(0.5),
            s.batch_sizes.value_at_quantile(0.99),
            s.flush_micros.value_at_quantile(0.5),
        )
    };
    println!(
        "flash sale over HTTP: {buyers} buyers, {concurrency} connections, {arbiters} arbiters, 1 product (1 shard)"
    );
    println!(
        "  purchases (order + notify + read) : {:.0}/s  ({} HTTP requests/s), errors {errors}",
        buyers as f64 / elapsed.as_secs_f64(),
        (3 * buyers) as f64 / elapsed.as_secs_f64()
    );
    for (name, h) in ["create order", "notify", "read order"].iter().zip(hists.iter()) {
        println!(
            "  {name:<13} p50 {:>6.2} ms  p90 {:>6.2} ms  p99 {:>6.2} ms  max {:>7.2} ms",
            h.value_at_quantile(0.5) as f64 / 1000.0,
            h.value_at_quantile(0.9) as f64 / 1000.0,
            h.value_at_quantile(0.99) as f64 / 1000.0,
            h.max() as f64 / 1000.0
        );
    }
    println!(
        "  group commit: {batches} flushes, batch size p50 {median_batch} p99 {p99_batch}, flush p50 {flush_p50_us} us"
    );
    println!("  audit ok: {}  sold: {}", audit["ok"], audit["products"][0]["sold"]);
    assert_eq!(audit["ok"], json!(true));
    assert_eq!(audit["products"][0]["sold"], json!(buyers - errors));

    // Crash-like stop (no snapshot at shutdown), then time recovery of what it left.
    app.crash().await;
    let app = kami::start(settings(&data, arbiters)).await.unwrap();
    println!(
        "  recovery: {} events replayed ({} KiB of journal after the last snapshot) in {} ms",
        app.recovery.events_replayed,
        app.recovery.journal_bytes / 1024,
        app.recovery.elapsed.as_millis()
    );
}

fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).unwrap()
}

async fn buy(http: &reqwest::Client, url: &str, i: u64, hist: &mut [Histogram<u64>; 3]) -> bool {
    let t = Instant::now();
    let Ok(r) = http
        .post(format!("{url}/api/v1/orders"))
        .json(&json!({"product_id": "hot", "quantity": 1, "buyer": format!("buyer{i}")}))
        .send()
        .await
    else {
        return false;
    };
    if r.status() != 201 {
        return false;
    }
    let o: Value = r.json().await.unwrap();
    hist[0].record(t.elapsed().as_micros() as u64).unwrap();
    let id = o["order_id"].as_str().unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or(Duration::ZERO).as_secs();
    let body = serde_json::to_vec(&json!({"order_id": id, "payment_id": format!("pay-{id}"), "amount_cents": 990, "status": "paid", "timestamp": now, "nonce": format!("n-{id}")})).unwrap();
    let sig = kami::domain::signature::sign(b"bench", &body);
    let t = Instant::now();
    let Ok(n) =
        http.post(format!("{url}/api/v1/payments/sandbox/notify")).header("X-Signature", sig).body(body).send().await
    else {
        return false;
    };
    if n.status() != 200 {
        return false;
    }
    hist[1].record(t.elapsed().as_micros() as u64).unwrap();
    let t = Instant::now();
    let Ok(g) = http
        .get(format!("{url}/api/v1/orders/{id}"))
        .header("X-Order-Token", o["query_token"].as_str().unwrap())
        .send()
        .await
    else {
        return false;
    };
    let ok = g.status() == 200;
    hist[2].record(t.elapsed().as_micros() as u64).unwrap();
    ok
}
