//! Points: credits and debits (idempotent, never below zero), the append-only
//! ledger, and redemptions that spend points and deliver keys as one outcome, under
//! concurrency and with actors killed mid-way.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use common::*;
use futures::StreamExt;
use serde_json::{json, Value};

impl Api {
    async fn adjust(&self, buyer: &str, request_id: &str, delta: i64) -> Reply {
        let url = format!("{}/api/v1/admin/buyers/{buyer}/points", self.url);
        reply(self.admin(self.http.post(url)).json(&json!({"request_id": request_id, "delta": delta}))).await
    }

    /// A buyer's balance as the storefront reads it: with the buyer's token.
    async fn points(&self, buyer: &str) -> Reply {
        let token = reply(self.admin(self.http.get(format!("{}/api/v1/admin/buyers/{buyer}/token", self.url)))).await;
        let token = token.body["token"].as_str().expect("a buyer token").to_string();
        reply(self.http.get(format!("{}/api/v1/buyers/{buyer}/points", self.url)).header("X-Buyer-Token", token)).await
    }

    async fn ledger(&self, buyer: &str) -> Reply {
        reply(self.admin(self.http.get(format!("{}/api/v1/admin/buyers/{buyer}/points/ledger", self.url)))).await
    }

    async fn points_price(&self, product: &str, price: u64) {
        let url = format!("{}/api/v1/products/{product}/points-price", self.url);
        let r = reply(self.admin(self.http.put(url)).json(&json!({"points_price": price}))).await;
        assert_eq!(r.status, 200, "{}", r.body);
    }

    async fn redeem(&self, buyer: &str, product: &str, quantity: u64, key: &str) -> Reply {
        let body = json!({"buyer": buyer, "product_id": product, "quantity": quantity});
        let r = self.http.post(format!("{}/api/v1/redemptions", self.url)).header("Idempotency-Key", key);
        reply(r.json(&body)).await
    }
}

fn n(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credits_and_debits_are_idempotent_durable_and_never_below_zero() {
    let mut t = TestApp::spawn().await;
    let api = t.api();
    let r = api.adjust("alice", "c1", 500).await;
    assert_eq!((r.status, n(&r.body["balance"])), (200, 500), "{}", r.body);
    assert_eq!(n(&api.adjust("alice", "c1", 500).await.body["balance"]), 500, "a repeat applies once");
    assert_eq!(api.adjust("alice", "c1", 700).await.code(), "idempotency_key_reused");
    let over = api.adjust("alice", "d1", -600).await;
    assert_eq!((over.status, over.code()), (409, "insufficient_points"));
    assert_eq!(n(&api.adjust("alice", "d2", -200).await.body["balance"]), 300);
    let anonymous = reply(
        api.http
            .post(format!("{}/api/v1/admin/buyers/alice/points", api.url))
            .json(&json!({"request_id": "x", "delta": 1})),
    )
    .await;
    assert_eq!(anonymous.status, 401);
    assert_eq!(api.adjust("alice", "z", 0).await.status, 422);

    let ledger = api.ledger("alice").await;
    let lines: Vec<(String, i64, u64)> = ledger.body["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["kind"].as_str().unwrap().to_string(), e["delta"].as_i64().unwrap(), n(&e["balance_after"])))
        .collect();
    assert_eq!(lines, [("credit".to_string(), 500, 500), ("debit".to_string(), -200, 300)]);

    // Acknowledged changes survive a crash.
    let data = t.data.clone();
    t.app.take().unwrap().crash().await;
    let t2 = TestApp::start_on(&data, &[]).await;
    let b = t2.api().points("alice").await;
    assert_eq!((n(&b.body["balance"]), n(&b.body["available"])), (300, 300), "{}", b.body);
    assert_eq!(t2.api().ledger("alice").await.body["entries"].as_array().unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redemption_spends_points_and_delivers_keys_once() {
    let t = TestApp::spawn().await;
    let api = t.api();
    api.product_with_keys("gift", 5, 0).await;
    api.points_price("gift", 100).await;
    api.product_with_keys("plain", 5, 0).await;
    api.adjust("bob", "c1", 250).await;

    let r = api.redeem("bob", "gift", 2, "k1").await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body["status"], "delivered");
    assert_eq!(r.body["keys"].as_array().unwrap().len(), 2);
    assert_eq!((n(&r.body["points_spent"]), n(&r.body["points_balance"])), (200, 50));
    let again = api.redeem("bob", "gift", 2, "k1").await;
    assert_eq!(again.status, 201);
    assert_eq!(again.body["order_id"], r.body["order_id"], "the same Idempotency-Key replays the redemption");
    assert_eq!(again.headers["idempotent-replayed"], "true");
    assert_eq!(again.body["keys"], r.body["keys"]);
    assert_eq!(n(&api.points("bob").await.body["balance"]), 50, "spent once");
    let order = api.get_order(r.body["order_id"].as_str().unwrap(), r.body["query_token"].as_str().unwrap()).await;
    assert_eq!((order.status, &order.body["keys"]), (200, &r.body["keys"]));

    let poor = api.redeem("bob", "gift", 1, "k2").await;
    assert_eq!((poor.status, poor.code()), (409, "insufficient_points"));
    assert_eq!(api.redeem("bob", "plain", 1, "k3").await.code(), "not_redeemable");
    let no_key = reply(
        api.http
            .post(format!("{}/api/v1/redemptions", api.url))
            .json(&json!({"buyer": "bob", "product_id": "gift", "quantity": 1})),
    )
    .await;
    assert_eq!(no_key.status, 422);
    assert_eq!(api.product("gift").await.body["points_price"], 100);

    let audit = api.audit().await;
    assert_audit_ok(&audit);
    assert_eq!(audit.body["products"][0]["sold"], 2);
    assert_eq!(audit.body["points"]["redemptions_settled"], 1);
    assert_eq!(audit.body["points"]["total_balance"], 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sold_out_redemption_gives_the_points_back() {
    let t = TestApp::spawn().await;
    let api = t.api();
    api.product_with_keys("few", 3, 0).await;
    api.points_price("few", 10).await;
    api.adjust("carol", "c1", 100).await;
    let mut codes = vec![];
    for i in 0..5 {
        let r = api.redeem("carol", "few", 1, &format!("k{i}")).await;
        codes.push(if r.status == 201 { "201".to_string() } else { r.code().to_string() });
    }
    assert_eq!(codes, ["201", "201", "201", "sold_out", "sold_out"]);
    let b = api.points("carol").await.body;
    assert_eq!((n(&b["balance"]), n(&b["held"])), (70, 0), "{b}");
    let kinds: Vec<String> = api.ledger("carol").await.body["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap().into())
        .collect();
    // The two refusals changed nothing, so they left no line (their holds are gone too).
    assert_eq!(kinds, ["credit", "held", "redeemed", "held", "redeemed", "held", "redeemed"], "{kinds:?}");
    assert_audit_ok(&api.audit().await);
}

/// What one run of concurrent redemptions produced.
struct Run {
    created: BTreeMap<String, u64>,
    keys: Vec<String>,
    other: BTreeMap<String, u64>,
}

/// `attempts` redemptions of one key each, by `buyers` buyers in turn, `in_flight`
/// at a time; answers tallied per buyer.
async fn redeem_all(api: &Api, product: &str, buyers: usize, attempts: usize, in_flight: usize) -> Run {
    let replies: Vec<(String, Reply)> = futures::stream::iter(0..attempts)
        .map(|i| {
            let api = api.clone();
            let (buyer, product) = (format!("buyer{}", i % buyers), product.to_string());
            async move {
                let r = api.redeem(&buyer, &product, 1, &format!("attempt-{i}")).await;
                (buyer, r)
            }
        })
        .buffer_unordered(in_flight)
        .collect()
        .await;
    let mut run = Run { created: BTreeMap::new(), keys: vec![], other: BTreeMap::new() };
    for (buyer, r) in replies {
        if r.status == 201 {
            *run.created.entry(buyer).or_default() += 1;
            run.keys.extend(r.body["keys"].as_array().unwrap().iter().map(|k| k.as_str().unwrap().to_string()));
        } else {
            *run.other.entry(format!("{} {}", r.status, r.code())).or_default() += 1;
        }
    }
    run
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_thousand_concurrent_redemptions_by_a_hundred_buyers_never_overspend_or_oversell() {
    let t = TestApp::spawn().await;
    let api = t.api();
    api.create_product("hot", 990, 0, 2).await;
    api.import("hot", &(0..3000).map(|i| format!("HOT-{i}")).collect::<Vec<_>>()).await;
    api.points_price("hot", 10).await;
    for b in 0..100 {
        assert_eq!(api.adjust(&format!("buyer{b}"), "welcome", 100).await.status, 200);
    }
    // 50 attempts per buyer, each buyer can pay for 10 keys: 1,000 redemptions succeed.
    let run = redeem_all(&api, "hot", 100, 5000, 256).await;
    assert_eq!(run.other.keys().collect::<Vec<_>>(), ["409 insufficient_points"], "{:?}", run.other);
    assert_eq!(run.created.values().sum::<u64>(), 1000);
    assert!(run.created.values().all(|&k| k == 10), "every buyer got exactly what they could pay for");
    assert_eq!(run.keys.iter().collect::<HashSet<_>>().len(), 1000, "no key delivered twice");
    for b in 0..100 {
        let p = api.points(&format!("buyer{b}")).await.body;
        assert_eq!((n(&p["balance"]), n(&p["held"])), (0, 0), "buyer{b}: credits − redemptions × price");
    }
    let audit = api.audit().await;
    assert_audit_ok(&audit);
    assert_eq!(audit.body["products"][0]["sold"], 1000);
    assert_eq!(audit.body["points"]["redemptions_settled"], 1000);
    assert_eq!((n(&audit.body["points"]["total_balance"]), n(&audit.body["points"]["total_held"])), (0, 0));
    eprintln!("points: 5000 redemptions → 1000 delivered, {:?}", run.other);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redemptions_survive_actors_killed_mid_way() {
    let t = TestApp::spawn_with(&[("chaos.enabled", "true"), ("products.settle_interval_ms", "100")]).await;
    let api = t.api();
    api.create_product("hot", 990, 0, 2).await;
    api.import("hot", &(0..600).map(|i| format!("K-{i}")).collect::<Vec<_>>()).await;
    api.points_price("hot", 10).await;
    for b in 0..20 {
        api.adjust(&format!("buyer{b}"), "welcome", 500).await;
    }
    // Kill the points actors and the product's stock actors while 1,000 redemptions
    // run (each buyer could pay for 50: stock, 600, is what runs out).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let killer = {
        let (api, stop) = (api.clone(), stop.clone());
        tokio::spawn(async move {
            let mut kills = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let actor = if kills.is_multiple_of(2) { "points" } else { "product:hot" };
                let url = format!("{}/api/v1/admin/chaos/kill", api.url);
                let r = reply(api.admin(api.http.post(url)).json(&json!({"actor": actor}))).await;
                assert_eq!(r.status, 200, "{}", r.body);
                kills += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            kills
        })
    };
    let run = redeem_all(&api, "hot", 20, 1000, 64).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let kills = killer.await.unwrap();
    assert!(kills >= 2, "the actors were killed during the run ({kills})");
    let acked: u64 = run.created.values().sum();
    // Held redemptions whose answer was lost are finished by the resolver: wait for none.
    let settled = api
        .eventually(Duration::from_secs(60), || async {
            let a = api.audit().await;
            a.status == 200 && a.body["points"]["total_held"] == 0
        })
        .await;
    assert!(settled, "held redemptions were never resolved: {}", api.audit().await.body);
    let audit = api.audit().await;
    assert_audit_ok(&audit);
    let sold = n(&audit.body["products"][0]["sold"]);
    assert!(sold >= acked && sold <= 600, "sold {sold}, acknowledged {acked}");
    assert_eq!(n(&audit.body["points"]["redemptions_settled"]), sold, "a key for every settled redemption");
    // Balances: credits − settled redemptions × price, buyer by buyer.
    let mut total = 0;
    for b in 0..20 {
        let p = api.points(&format!("buyer{b}")).await.body;
        assert_eq!(n(&p["held"]), 0);
        total += n(&p["balance"]);
        assert!(n(&p["balance"]) <= 500 - 10 * run.created.get(&format!("buyer{b}")).copied().unwrap_or(0));
    }
    assert_eq!(total, 20 * 500 - 10 * sold, "every point spent paid for exactly one key");
    let distinct: HashSet<_> = run.keys.iter().collect();
    assert_eq!(distinct.len(), run.keys.len(), "no key delivered twice");
    eprintln!("points chaos: {kills} kills, {acked} acknowledged, {sold} sold, other answers {:?}", run.other);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_redemptions_loses_no_acknowledged_redemption_and_strands_no_points() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // Holds older than the request timeout + 1 s are resolved every 100 ms.
    let env = [("KAMI_PRODUCTS__SETTLE_INTERVAL_MS", "100"), ("KAMI_SERVER__REQUEST_TIMEOUT_MS", "1000")];
    let mut server = Server::start(&data, &env);
    let api = server.api();
    api.create_product("hot", 990, 0, 2).await;
    api.import("hot", &(0..2000).map(|i| format!("K-{i}")).collect::<Vec<_>>()).await;
    api.points_price("hot", 10).await;
    for b in 0..20 {
        api.adjust(&format!("buyer{b}"), "welcome", 1000).await;
    }
    // Redemptions run; after the 100th acknowledged one the process dies.
    let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::<Value>::new()));
    let hundred = std::sync::Arc::new(tokio::sync::Notify::new());
    let workers: Vec<_> = (0..16)
        .map(|w| {
            let (api, acked, hundred) = (api.clone(), acked.clone(), hundred.clone());
            tokio::spawn(async move {
                for i in 0.. {
                    let body =
                        json!({"buyer": format!("buyer{}", (w * 7 + i) % 20), "product_id": "hot", "quantity": 1});
                    let sent = api
                        .http
                        .post(format!("{}/api/v1/redemptions", api.url))
                        .header("Idempotency-Key", format!("w{w}-{i}"));
                    let Ok(resp) = sent.json(&body).send().await else { return };
                    if resp.status() != 201 {
                        return;
                    }
                    let Ok(v) = resp.json::<Value>().await else { return };
                    let mut acked = acked.lock().unwrap();
                    acked.push(v);
                    if acked.len() == 100 {
                        hundred.notify_one();
                    }
                }
            })
        })
        .collect();
    tokio::time::timeout(Duration::from_secs(60), hundred.notified()).await.expect("100 redemptions acknowledged");
    server.kill9();
    for w in workers {
        tokio::time::timeout(Duration::from_secs(30), w).await.expect("worker ends").unwrap();
    }
    let acked = std::mem::take(&mut *acked.lock().unwrap());

    // The directory as the crash left it passes the offline audit, points included.
    let (code, out, err) = kami_audit(&data, true);
    assert_eq!(code, 0, "offline audit: {out}{err}");
    let offline: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(offline["points"]["buyers"], 20, "{offline}");
    assert!(
        n(&offline["points"]["redemptions_settled"]) + n(&offline["points"]["total_held"]) / 10 >= acked.len() as u64
    );

    let restarted = Server::start(&data, &env);
    let api = restarted.api();
    let resolved = api
        .eventually(Duration::from_secs(60), || async {
            let a = api.audit().await;
            a.status == 200 && a.body["points"]["total_held"] == 0
        })
        .await;
    assert!(resolved, "held redemptions were never resolved: {}", api.audit().await.body);
    for r in &acked {
        let o = api.get_order(r["order_id"].as_str().unwrap(), r["query_token"].as_str().unwrap()).await;
        assert_eq!((o.status, &o.body["keys"]), (200, &r["keys"]), "acknowledged redemption lost: {r}");
    }
    let audit = api.audit().await;
    assert_audit_ok(&audit);
    let sold = n(&audit.body["products"][0]["sold"]);
    assert!(sold >= acked.len() as u64);
    assert_eq!(n(&audit.body["points"]["redemptions_settled"]), sold);
    assert_eq!(
        n(&audit.body["points"]["total_balance"]),
        20 * 1000 - 10 * sold,
        "points spent == keys delivered × price"
    );
    eprintln!("points kill -9: {} acknowledged before the kill, {sold} delivered after recovery", acked.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_points_price_given_at_creation_is_durable_with_the_product_and_a_stray_one_is_overwritten() {
    let mut t = TestApp::spawn().await;
    let body = json!({"id": "gift", "name": "Gift", "price_cents": 990, "points_price": 100});
    let r = reply(t.api().admin(t.api().http.post(format!("{}/api/v1/products", t.url))).json(&body)).await;
    assert_eq!((r.status, &r.body["points_price"]), (201, &json!(100)), "{}", r.body);
    let data = t.data.clone();
    t.app.take().unwrap().crash().await;
    // A crash between the price and the product record leaves a price for no product.
    {
        let storage = open_storage(&data);
        storage.set_points_price("ghost", Some(50)).unwrap();
        storage.flush_now().unwrap();
    }
    let t2 = TestApp::start_on(&data, &[]).await;
    let api = t2.api();
    assert_eq!(api.product("gift").await.body["points_price"], 100, "durable with the product");
    assert_eq!(api.create_product("ghost", 990, 0, 1).await.status, 201);
    assert_eq!(api.product("ghost").await.body["points_price"], Value::Null, "created without a price");
    api.import("ghost", &["G-1".to_string()]).await;
    api.adjust("alice", "c", 500).await;
    assert_eq!(api.redeem("alice", "ghost", 1, "r1").await.code(), "not_redeemable");
}

/// A points shard snapshots its book and trims the journal the snapshot covers, so
/// neither memory nor start-up grows with refused redemptions or old history; the
/// balances and statements survive a crash through the snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn points_snapshots_bound_the_journal_and_refusals_leave_nothing_behind() {
    let mut t = TestApp::spawn_with(&[("storage.snapshot_min_journal_bytes", "4096")]).await;
    let api = t.api();
    api.product_with_keys("none", 1, 0).await;
    api.points_price("none", 5).await;
    assert_eq!(api.redeem("dave", "none", 1, "first").await.code(), "insufficient_points");
    api.adjust("dave", "c1", 1_000).await;
    assert_eq!(api.redeem("dave", "none", 1, "r-0").await.status, 201);
    // Refused redemptions (sold out): each held and released, changing nothing.
    for i in 1..200 {
        let r = api.redeem("dave", "none", 1, &format!("r-{i}")).await;
        assert_eq!(r.code(), "sold_out", "{}", r.body);
    }
    let entries = api.ledger("dave").await.body["entries"].as_array().unwrap().len();
    assert_eq!(entries, 3, "credit, held and redeemed only");

    let data = t.data.clone();
    t.app.take().unwrap().crash().await;
    {
        let storage = open_storage(&data);
        let shard = kami::actors::points::points_shard_of("dave");
        let r = storage.inspect_ledger::<kami::domain::points::PointsBook>(shard).unwrap();
        assert!(r.snapshot_bytes > 0, "a snapshot was written");
        assert!(r.journal.raw(1).unwrap().is_none(), "the journal it covers was trimmed");
        assert_eq!(r.book.lines(), 3);
    }
    let t2 = TestApp::start_on(&data, &[]).await;
    let b = t2.api().points("dave").await;
    assert_eq!((n(&b.body["balance"]), n(&b.body["held"])), (995, 0), "{}", b.body);
    assert_eq!(t2.api().ledger("dave").await.body["entries"].as_array().unwrap().len(), 3);
    assert_audit_ok(&t2.api().audit().await);
}
