//! criterion benches: the pure domain step, a storage group commit at several batch
//! sizes, one actor round trip, and the in-process core (actors + journal, no HTTP)
//! with 1 and 2 arbiters (callers on their own runtime, or on the arbiters as HTTP
//! handlers are); group-buy seats (join any open group of a size-10 deal,
//! then pay) through the core.
//! Run: `cargo bench --bench core`. Under `cargo test --all-targets` each runs once.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kami::domain::shard::{NewOrder, Outcome, Payment};
use kami::domain::{ProductInfo, Shard};
use kami::storage::{Storage, StorageOptions};

/// The allocator the server binary runs with (src/main.rs), so the core is measured as it serves.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn product() -> ProductInfo {
    ProductInfo { id: "p".into(), name: "P".into(), price_cents: 100, per_buyer_limit: 0, shards: 1, created_at_ms: 0 }
}

fn domain(c: &mut Criterion) {
    let mut g = c.benchmark_group("domain");
    g.throughput(Throughput::Elements(1));
    g.bench_function("reserve_then_pay", |b| {
        b.iter_custom(|iters| {
            let mut s = Shard::new(product(), 0);
            s.import_keys((0..iters).map(|i| format!("key-{i}")).collect());
            let started = Instant::now();
            for i in 0..iters {
                let req = NewOrder {
                    buyer: format!("b{}", i % 1000),
                    quantity: 1,
                    idempotency: None,
                    query_token: String::new(),
                    ttl_ms: 60_000,
                    password: None,
                    coupon: None,
                    reseller: None,
                };
                let Ok(Outcome::Changed(_, seq)) = s.create_order(req, i) else { panic!("reserve") };
                let pay = Payment {
                    order_seq: seq,
                    payment_id: format!("p{i}"),
                    channel: "c".into(),
                    amount_cents: 100,
                    status: "paid".into(),
                };
                s.pay(pay, i).expect("pay");
            }
            started.elapsed()
        })
    });
    g.bench_function("reserve_then_cancel", |b| {
        let mut s = Shard::new(product(), 0);
        s.import_keys((0..16).map(|i| format!("key-{i}")).collect());
        let mut now = 0;
        b.iter(|| {
            now += 1;
            let req = NewOrder {
                buyer: "b".into(),
                quantity: 1,
                idempotency: None,
                query_token: String::new(),
                ttl_ms: 60_000,
                password: None,
                coupon: None,
                reseller: None,
            };
            let Ok(Outcome::Changed(_, seq)) = s.create_order(req, now) else { panic!("reserve") };
            s.cancel(seq, now).expect("cancel");
        })
    });
    g.finish();
}

fn storage(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let storage = Storage::open(&StorageOptions {
        path: dir.path().to_path_buf(),
        cache_capacity_bytes: 64 << 20,
        max_pending_commits: 65536,
        max_commit_batch: 65536,
        commit_linger: Duration::ZERO,
        commit_busy_linger: Duration::ZERO,
    })
    .unwrap();
    let journal = storage.journal(&kami::domain::ShardId::new("p", 0)).unwrap();
    let event = kami::domain::Event::OrderExpired { seq: 1, at_ms: 1 };
    let mut seq = 0u64;
    let mut g = c.benchmark_group("storage_commit");
    for batch in [1u64, 10, 100] {
        g.throughput(Throughput::Elements(batch));
        g.bench_with_input(BenchmarkId::from_parameter(batch), &batch, |b, &batch| {
            b.iter(|| {
                for _ in 0..batch {
                    seq += 1;
                    journal.append(seq, &event).unwrap();
                }
                futures::executor::block_on(storage.ticket().unwrap().wait()).unwrap();
            })
        });
    }
    g.finish();
}

/// Purchases in flight at once in the in-process benches (`BENCH_IN_FLIGHT`, default 256).
fn in_flight() -> u64 {
    std::env::var("BENCH_IN_FLIGHT").ok().and_then(|v| v.parse().ok()).unwrap_or(256)
}

/// Orders + payments through the in-process core, `in_flight()` at a time, with 1 and 2
/// arbiters. `callers_on_arbiters`: the callers run on the stock arbiters (as HTTP
/// handlers do: an order goes to the product's shard on the caller's own thread);
/// otherwise on a separate 2-thread runtime (an embedder calling from its own).
fn core_purchases(c: &mut Criterion) {
    for (name, on_arbiters) in [("core_purchase", false), ("core_purchase_on_arbiters", true)] {
        let mut g = c.benchmark_group(name);
        g.sample_size(10);
        for arbiters in [1usize, 2] {
            g.throughput(Throughput::Elements(1));
            g.bench_with_input(BenchmarkId::new("arbiters", arbiters), &arbiters, |b, &arbiters| {
                let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
                let dir = tempfile::tempdir().unwrap();
                let app = rt.block_on(start(dir.path(), arbiters));
                let callers = on_arbiters.then_some(&app);
                b.iter_custom(|iters| {
                    rt.block_on(run_purchases(app.core().clone(), arbiters as u16, iters, in_flight(), false, callers))
                });
                drop(app);
            });
        }
        g.finish();
    }
}

/// Group-buy seats: every buyer joins any open group of a size-10 deal (one shard
/// holds every group of the deal) and pays; each tenth payment delivers a group.
fn core_group_seats(c: &mut Criterion) {
    let mut g = c.benchmark_group("core_group_seat");
    g.sample_size(10);
    g.throughput(Throughput::Elements(1));
    g.bench_function("join_any_then_pay_size_10", |b| {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let app = rt.block_on(start(dir.path(), 2));
        let core = app.core().clone();
        b.iter_custom(|iters| rt.block_on(run_purchases(core.clone(), 1, iters, in_flight(), true, None)));
        drop(app);
    });
    g.finish();
}

async fn start(dir: &std::path::Path, arbiters: usize) -> kami::RunningApp {
    let overrides = [
        ("server.listen", "127.0.0.1:0".to_string()),
        ("storage.path", dir.join("data").display().to_string()),
        ("admin.token", "bench".into()),
        ("payments.channels.sandbox.secret", "bench".into()),
        ("actors.arbiters", arbiters.to_string()),
    ];
    // BENCH_BUSY_LINGER_US: the commit thread's busy linger (the configuration's default otherwise).
    let linger = std::env::var("BENCH_BUSY_LINGER_US").ok().map(|v| ("storage.commit_busy_linger_us", v));
    let overrides: Vec<_> = overrides.into_iter().chain(linger).collect();
    let settings = kami::Settings::load(&kami::Sources {
        overrides: overrides.iter().map(|(k, v)| (k.to_string(), v.clone())).collect(),
        ..Default::default()
    })
    .unwrap();
    kami::start(settings).await.unwrap()
}

async fn run_purchases(
    core: Arc<kami::core::Kami>,
    shards: u16,
    iters: u64,
    concurrency: u64,
    group: bool,
    callers: Option<&kami::RunningApp>,
) -> Duration {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let id = format!("p{}", NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    core.create_product(kami::core::NewProduct {
        id: id.clone(),
        name: "P".into(),
        price_cents: 100,
        per_buyer_limit: 0,
        shards,
        points_price: None,
        key_mode: Default::default(),
        tiers: Vec::new(),
    })
    .await
    .unwrap();
    if group {
        let deal =
            kami::core::NewDeal { deal_id: "ten".into(), group_size: 10, price_cents: 100, time_limit_secs: 3600 };
        core.create_group_deal(&id, deal).await.unwrap();
    }
    // Exactly one key per purchase: a shard that runs dry borrows from its sibling.
    for chunk in (0..iters).collect::<Vec<_>>().chunks(4096) {
        core.import_keys(&id, chunk.iter().map(|i| format!("k{i}")).collect()).await.unwrap();
    }
    let started = Instant::now();
    let (done_tx, mut done_rx) = tokio::sync::mpsc::channel::<()>(concurrency as usize);
    let workers = concurrency.min(iters);
    for w in 0..workers {
        let (core, id, done) = (core.clone(), id.clone(), done_tx.clone());
        let worker = async move {
            let mut i = w;
            while i < iters {
                if group {
                    group_seat(&core, &id, i).await;
                } else {
                    purchase(&core, &id, i).await;
                }
                i += concurrency;
            }
            let _ = done.send(()).await;
        };
        match callers {
            Some(app) => assert!(app.spawn_on_arbiter(w as usize, worker), "arbiter running"),
            None => drop(tokio::spawn(worker)),
        }
    }
    drop(done_tx); // a worker that panicked drops its sender: recv then ends with None
    for _ in 0..workers {
        done_rx.recv().await.expect("every worker finished");
    }
    started.elapsed()
}

async fn purchase(core: &kami::core::Kami, product: &str, i: u64) {
    let req = kami::core::OrderRequest {
        product_id: product.into(),
        quantity: 1,
        buyer: format!("buyer{i}"),
        query_password: None,
        coupon: None,
        reseller: None,
    };
    let order = loop {
        match core.create_order(req.clone(), None).await {
            Ok(o) => break o,
            Err(kami::Error::Overloaded) => tokio::task::yield_now().await,
            Err(e) => panic!("order: {e}"),
        }
    };
    pay(core, &order.order_id()).await;
}

async fn group_seat(core: &kami::core::Kami, product: &str, i: u64) {
    let req = kami::core::OpenGroupRequest {
        product_id: product.into(),
        deal_id: "ten".into(),
        buyer: format!("buyer{i}"),
        join_open: true,
    };
    let seat = loop {
        match core.open_group(req.clone(), None).await {
            Ok(s) => break s,
            Err(kami::Error::Overloaded) => tokio::task::yield_now().await,
            Err(e) => panic!("seat: {e}"),
        }
    };
    pay(core, &seat.order.order_id()).await;
}

async fn pay(core: &kami::core::Kami, order_id: &str) {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let body = format!(
        r#"{{"order_id":"{order_id}","payment_id":"pay-{order_id}","amount_cents":100,"status":"paid","timestamp":{now},"nonce":"{order_id}"}}"#
    );
    let sig = core.sign_for_channel("sandbox", body.as_bytes()).unwrap();
    core.notify("sandbox", body.as_bytes(), Some(&sig)).await.expect("notify");
}

/// One message to a stock actor and its reply, no journal write: reading a durable
/// order through the core (registry lookup, admission permit, actix send, reply).
fn actor_round_trip(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let app = rt.block_on(start(dir.path(), 1));
    let core = app.core().clone();
    let order_id = rt.block_on(async {
        let new = kami::core::NewProduct {
            id: "rt".into(),
            name: "P".into(),
            price_cents: 1,
            per_buyer_limit: 0,
            shards: 1,
            points_price: None,
            key_mode: Default::default(),
            tiers: Vec::new(),
        };
        core.create_product(new).await.unwrap();
        core.import_keys("rt", vec!["k".into()]).await.unwrap();
        let req = kami::core::OrderRequest {
            product_id: "rt".into(),
            quantity: 1,
            buyer: "b".into(),
            query_password: None,
            coupon: None,
            reseller: None,
        };
        let o = core.create_order(req, None).await.unwrap();
        format!("{}.{}.{}", o.product_id, o.shard, o.order.seq)
    });
    let mut g = c.benchmark_group("actor");
    g.throughput(Throughput::Elements(1));
    g.bench_function("round_trip", |b| {
        b.iter(|| rt.block_on(core.get_order(&order_id, None)).unwrap());
    });
    g.finish();
    drop(app);
}

criterion_group!(benches, domain, storage, actor_round_trip, core_purchases, core_group_seats);
criterion_main!(benches);
