//! Flash sale over real HTTP: the app in-process on a loopback port, driven by the
//! `kami load` generator (N buyers, C connections, each doing create order ->
//! signed notification -> read key). Prints the load report, group-commit batch
//! sizes, and the recovery time of the journal it leaves.
//!
//! `cargo bench --bench http_purchase` (defaults: 20000 buyers, 256 connections;
//! override with BUYERS=, CONCURRENCY=, ARBITERS=). Under `cargo test --all-targets`
//! it runs a small smoke version.

use kami::load::{embedded_settings, LoadConfig, Mode, Target, EMBEDDED_SECRET};

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let buyers = env_or("BUYERS", if full { 20_000 } else { 200 });
    let concurrency = env_or("CONCURRENCY", if full { 256 } else { 16 });
    let arbiters = env_or("ARBITERS", 2) as usize;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(run(buyers, concurrency, arbiters));
}

async fn run(buyers: u64, concurrency: u64, arbiters: usize) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let app = kami::start(embedded_settings(&data, arbiters).unwrap()).await.unwrap();
    let target = Target::Url {
        url: app.url(),
        admin_token: EMBEDDED_SECRET.into(),
        channel: "sandbox".into(),
        secret: EMBEDDED_SECRET.into(),
        api_key: None,
    };
    let config = LoadConfig {
        target,
        keys: buyers,
        buyers,
        concurrency,
        mode: Mode::Full,
        shards: 1,
        progress: false,
        retry_overloaded: false,
    };
    let report = kami::load::run(config).await.unwrap();
    print!("{}", report.table());
    {
        let s = app.core().storage().committer().stats();
        println!(
            "  group commit: {} flushes, batch size p50 {} p99 {}, flush p50 {} us",
            s.batch_sizes.len(),
            s.batch_sizes.value_at_quantile(0.5),
            s.batch_sizes.value_at_quantile(0.99),
            s.flush_micros.value_at_quantile(0.5)
        );
    }
    assert!(report.verdict.ok, "{:?}", report.verdict.problems);

    // Crash-like stop (no snapshot at shutdown), then time recovery of what it left.
    app.crash().await;
    let app = kami::start(embedded_settings(&data, arbiters).unwrap()).await.unwrap();
    println!(
        "  recovery: {} events replayed ({} KiB of journal after the last snapshot) in {} ms",
        app.recovery.events_replayed,
        app.recovery.journal_bytes / 1024,
        app.recovery.elapsed.as_millis()
    );
}
