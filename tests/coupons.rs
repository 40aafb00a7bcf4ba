//! Coupons: a coupon's uses are exact under concurrency across shards, a use comes
//! back when its order expires or is cancelled (and a late payment of such an order
//! is owed back, never delivered), refusals say which and hold nothing, and the
//! counts survive a restart. Actor kills and kill -9 in the middle of the saga
//! lose no use and count none twice: every use counted matches a delivered order.

mod common;

use std::time::Duration;

use common::*;
use futures::stream::{self, StreamExt};
use serde_json::{json, Value};

impl Api {
    async fn create_coupon(&self, body: Value) -> Reply {
        reply(self.admin(self.http.post(format!("{}/api/v1/admin/coupons", self.url))).json(&body)).await
    }

    async fn coupon(&self, code: &str) -> Reply {
        reply(self.admin(self.http.get(format!("{}/api/v1/admin/coupons/{code}", self.url)))).await
    }

    async fn disable_coupon(&self, code: &str) -> Reply {
        reply(self.admin(self.http.post(format!("{}/api/v1/admin/coupons/{code}/disable", self.url)))).await
    }

    async fn order_with_coupon(&self, product: &str, quantity: u64, buyer: &str, coupon: &str) -> Reply {
        let body = json!({"product_id": product, "quantity": quantity, "buyer": buyer, "coupon": coupon});
        reply(self.http.post(format!("{}/api/v1/orders", self.url)).json(&body)).await
    }

    /// The coupon's `uses` (held, used, released, remaining).
    async fn uses(&self, code: &str) -> (u64, u64, u64, u64) {
        let c = self.coupon(code).await;
        assert_eq!(c.status, 200, "{}", c.body);
        let u = &c.body["uses"];
        let n = |f: &str| u[f].as_u64().unwrap();
        (n("held"), n("used"), n("released"), n("remaining"))
    }
}

impl Api {
    /// Delivered orders that used coupon `code`, from the merchant's listing.
    async fn delivered_with(&self, code: &str) -> u64 {
        let (mut n, mut cursor) = (0, None::<String>);
        loop {
            let mut url = format!("{}/api/v1/admin/orders?status=delivered&limit=500", self.url);
            if let Some(c) = &cursor {
                url.push_str(&format!("&cursor={c}"));
            }
            let r = reply(self.admin(self.http.get(url))).await;
            assert_eq!(r.status, 200, "{}", r.body);
            let orders = r.body["orders"].as_array().unwrap();
            n += orders.iter().filter(|o| o["price_breakdown"]["coupon"] == code).count() as u64;
            match r.body["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_string()),
                None => return n,
            }
        }
    }
}

fn amount_coupon(code: &str, value: u64, max_uses: u64) -> Value {
    json!({"code": code, "kind": "amount", "value": value, "max_uses": max_uses})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100_use_coupon_discounts_exactly_100_of_5000_concurrent_orders_on_two_shards() {
    let t = TestApp::spawn().await;
    let api = t.api();
    api.create_product("flash", 1_000, 0, 2).await;
    let keys: Vec<String> = (0..6_000).map(|i| format!("FLASH-{i}")).collect();
    assert_eq!(api.import("flash", &keys).await.status, 200);
    let created = api.create_coupon(amount_coupon("FLASH100", 300, 100)).await;
    assert_eq!(created.status, 201, "{}", created.body);
    assert_eq!(api.create_coupon(amount_coupon("FLASH100", 300, 100)).await.status, 200, "the same definition repeats");

    let replies: Vec<Reply> = stream::iter(0..5_000)
        .map(|i| {
            let api = api.clone();
            async move { api.order_with_coupon("flash", 1, &format!("buyer-{i}"), "FLASH100").await }
        })
        .buffer_unordered(256)
        .collect()
        .await;
    let discounted: Vec<&Reply> = replies.iter().filter(|r| r.status == 201).collect();
    let refused: Vec<&Reply> = replies.iter().filter(|r| r.status != 201).collect();
    assert_eq!(discounted.len(), 100, "exactly max_uses orders got the coupon");
    assert!(refused.iter().all(|r| (r.status, r.code()) == (409, "coupon_exhausted")), "{}", refused[0].body);
    for o in &discounted {
        let b = &o.body["price_breakdown"];
        assert_eq!(o.body["amount_cents"], json!(700), "{}", o.body);
        assert_eq!(
            (b["coupon"].as_str(), b["subtotal_cents"].as_u64(), b["discount_cents"].as_u64()),
            (Some("FLASH100"), Some(1_000), Some(300))
        );
    }
    assert_eq!(api.uses("FLASH100").await, (100, 0, 0, 0));

    // Paid orders keep the discount; the payment must be the discounted amount.
    let o = discounted[0];
    let id = o.body["order_id"].as_str().unwrap();
    assert_eq!(api.notify(id, "pay-full", 1_000).await.code(), "amount_mismatch");
    assert_eq!(api.notify(id, "pay-discounted", 700).await.status, 200);
    let audit = api.audit().await;
    assert_audit_ok(&audit);
    assert_eq!(
        (audit.body["coupons"]["held"].as_u64(), audit.body["coupons"]["coupons"].as_u64()),
        (Some(100), Some(1))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uses_come_back_on_expiry_and_cancel_and_a_late_payment_is_owed_back_not_delivered() {
    let t = TestApp::spawn_with(&[
        ("orders.ttl_secs", "1"),
        ("server.request_timeout_ms", "1000"),
        ("products.settle_interval_ms", "50"),
    ])
    .await;
    let api = t.api();
    api.product_with_keys("p", 50, 0).await;
    assert_eq!(
        api.create_coupon(json!({"code": "HALF", "kind": "percent", "value": 50, "max_uses": 3})).await.status,
        201
    );
    let mut orders = Vec::new();
    for i in 0..3 {
        let o = api.order_with_coupon("p", 1, &format!("b{i}"), "HALF").await;
        assert_eq!(o.status, 201, "{}", o.body);
        orders.push(o);
    }
    assert_eq!(api.order_with_coupon("p", 1, "b3", "HALF").await.code(), "coupon_exhausted");

    // A cancel gives its use back at once.
    let token = |o: &Reply| o.body["query_token"].as_str().unwrap().to_string();
    let id = |o: &Reply| o.body["order_id"].as_str().unwrap().to_string();
    assert_eq!(api.cancel(&id(&orders[0]), &token(&orders[0])).await.status, 200);
    assert_eq!(api.uses("HALF").await, (2, 0, 1, 1));
    // One is paid (used once its hold is resolved), one expires (its use comes back).
    let price = orders[1].body["amount_cents"].as_u64().unwrap();
    assert_eq!(api.notify(&id(&orders[1]), "pay-1", price).await.status, 200);
    let settled = api.eventually(Duration::from_secs(30), || async { api.uses("HALF").await == (0, 1, 2, 2) }).await;
    assert!(settled, "uses after resolution: {:?}", api.uses("HALF").await);

    // The expired order paid late: owed back, not delivered (its use went to others).
    let late = api.notify(&id(&orders[2]), "pay-late", price).await;
    assert_eq!(late.status, 200, "{}", late.body);
    let got = api.get_order(&id(&orders[2]), &token(&orders[2])).await;
    assert_eq!(got.body["status"].as_str(), Some("refund_pending"), "{}", got.body);
    assert_eq!(api.uses("HALF").await, (0, 1, 2, 2), "a late payment spends no use");
    // The two uses that came back can be had again.
    for i in 10..12 {
        assert_eq!(api.order_with_coupon("p", 1, &format!("b{i}"), "HALF").await.status, 201);
    }
    assert_eq!(api.order_with_coupon("p", 1, "b12", "HALF").await.code(), "coupon_exhausted");
    assert_audit_ok(&api.audit().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_name_the_reason_and_hold_nothing() {
    let t = TestApp::spawn().await;
    let api = t.api();
    api.product_with_keys("p", 20, 0).await;
    api.product_with_keys("q", 20, 0).await;
    let coupon = |code: &str, extra: Value| {
        let mut c = amount_coupon(code, 100, 10);
        c.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        c
    };
    for (code, extra) in [
        ("ONLY-Q", json!({"products": ["q"]})),
        ("MIN", json!({"min_amount_cents": 5_000})),
        ("ONCE", json!({"per_buyer_max": 1})),
        ("OVER", json!({"starts_at": "2020-01-01T00:00:00Z", "ends_at": "2020-02-01T00:00:00Z"})),
        ("LATER", json!({"starts_at": "2099-01-01T00:00:00Z"})),
        ("OFF", json!({})),
    ] {
        assert_eq!(api.create_coupon(coupon(code, extra)).await.status, 201, "{code}");
    }
    assert_eq!(api.disable_coupon("OFF").await.body["enabled"], json!(false));
    assert_eq!(api.order_with_coupon("p", 1, "b", "ONCE").await.status, 201);
    for (code, expected) in [
        ("NOPE", "coupon_unknown"),
        ("ONLY-Q", "coupon_not_applicable"),
        ("MIN", "coupon_not_applicable"),
        ("ONCE", "coupon_limit_per_buyer"),
        ("OVER", "coupon_expired"),
        ("LATER", "coupon_not_started"),
        ("OFF", "coupon_disabled"),
    ] {
        let r = api.order_with_coupon("p", 1, "b", code).await;
        assert_eq!((r.status, r.code()), (409, expected), "{code}: {}", r.body);
    }
    // The minimum-amount refusal comes from the stock shard after the hold: the hold is given back.
    assert_eq!(api.uses("MIN").await, (0, 0, 1, 10));
    assert_eq!(api.uses("ONLY-Q").await, (0, 0, 0, 10));
    assert_eq!(api.coupon("NOPE").await.status, 404);
    // Other terms under a known code, and bad definitions naming the field.
    assert_eq!(api.create_coupon(amount_coupon("ONCE", 101, 10)).await.code(), "coupon_exists");
    for (body, field) in [
        (json!({"code": "P", "kind": "percent", "value": 101, "max_uses": 1}), "value"),
        (json!({"code": "P", "kind": "percent", "value": 0, "max_uses": 1}), "value"),
        (json!({"code": "P", "kind": "amount", "value": 5, "max_uses": 0}), "max_uses"),
        (json!({"code": "bad code", "kind": "amount", "value": 5, "max_uses": 1}), "code"),
        (
            json!({"code": "P", "kind": "amount", "value": 5, "max_uses": 1, "starts_at": "2030-01-02T00:00:00Z", "ends_at": "2030-01-01T00:00:00Z"}),
            "ends_at",
        ),
    ] {
        let r = api.create_coupon(body).await;
        assert_eq!(r.status, 422, "{}", r.body);
        assert!(r.body["error"]["message"].as_str().unwrap_or_default().starts_with(field), "{field}: {}", r.body);
    }
    let list = reply(api.admin(api.http.get(format!("{}/api/v1/admin/coupons?limit=3", api.url)))).await;
    let codes: Vec<&str> =
        list.body["coupons"].as_array().unwrap().iter().map(|c| c["code"].as_str().unwrap()).collect();
    assert_eq!((codes, list.body["next_after"].as_str()), (vec!["LATER", "MIN", "OFF"], Some("OFF")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coupons_and_their_counts_survive_a_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut server = Server::start(&data, &[]);
    let api = server.api();
    api.product_with_keys("p", 20, 0).await;
    assert_eq!(api.create_coupon(amount_coupon("KEEP", 50, 5)).await.status, 201);
    let o = api.order_with_coupon("p", 1, "b1", "KEEP").await;
    assert_eq!(o.status, 201, "{}", o.body);
    api.order_with_coupon("p", 1, "b2", "KEEP").await;
    server.kill9();

    let server = Server::start(&data, &[]);
    let api = server.api();
    assert_eq!(api.uses("KEEP").await, (2, 0, 0, 3), "every acknowledged hold is still held");
    let id = o.body["order_id"].as_str().unwrap();
    let got = api.get_order(id, o.body["query_token"].as_str().unwrap()).await;
    assert_eq!(got.body["price_breakdown"]["coupon"].as_str(), Some("KEEP"), "{}", got.body);
    assert_eq!(api.notify(id, "pay-1", o.body["amount_cents"].as_u64().unwrap()).await.status, 200);
    for i in 3..6 {
        assert_eq!(api.order_with_coupon("p", 1, &format!("b{i}"), "KEEP").await.status, 201);
    }
    assert_eq!(api.order_with_coupon("p", 1, "b9", "KEEP").await.code(), "coupon_exhausted");
    assert_audit_ok(&api.audit().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_coupon_saga_survives_coupon_and_stock_actors_killed_mid_way() {
    let t = TestApp::spawn_with(&[
        ("chaos.enabled", "true"),
        ("orders.ttl_secs", "2"),
        ("server.request_timeout_ms", "1000"),
        ("products.settle_interval_ms", "50"),
    ])
    .await;
    let api = t.api();
    api.create_product("hot", 1_000, 0, 2).await;
    let keys: Vec<String> = (0..2_000).map(|i| format!("HOT-{i}")).collect();
    assert_eq!(api.import("hot", &keys).await.status, 200);
    assert_eq!(api.create_coupon(amount_coupon("KILL", 300, 150)).await.status, 201);

    // Kill the coupon actors and the product's stock actors, in turn, while 1,600
    // buyers order with the coupon (and one in three pays at once when answered).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let killer = {
        let (api, stop) = (api.clone(), stop.clone());
        tokio::spawn(async move {
            let mut kills = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let actor = if kills.is_multiple_of(2) { "coupons" } else { "product:hot" };
                let url = format!("{}/api/v1/admin/chaos/kill", api.url);
                let r = reply(api.admin(api.http.post(url)).json(&json!({"actor": actor}))).await;
                assert_eq!(r.status, 200, "{}", r.body);
                kills += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            kills
        })
    };
    // Four waves a second apart: uses of unpaid orders (two in three) come back
    // and are held again by later waves, all under kills.
    let mut outcomes: Vec<(u16, bool)> = Vec::new();
    for wave in 0..4 {
        if wave > 0 {
            tokio::time::sleep(Duration::from_millis(1_000)).await;
        }
        let wave: Vec<(u16, bool)> = stream::iter(wave * 400..(wave + 1) * 400)
            .map(|i| {
                let api = api.clone();
                async move {
                    let o = api.order_with_coupon("hot", 1, &format!("buyer-{i}"), "KILL").await;
                    if o.status != 201 || i % 3 != 0 {
                        return (o.status, false);
                    }
                    let id = o.body["order_id"].as_str().unwrap();
                    (201, api.notify(id, &format!("pay-{i}"), 700).await.status == 200)
                }
            })
            .buffer_unordered(64)
            .collect()
            .await;
        outcomes.extend(wave);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let kills = killer.await.unwrap();
    assert!(kills >= 2, "the actors were killed during the run ({kills})");
    let created = outcomes.iter().filter(|o| o.0 == 201).count() as u64;
    assert!(created >= 1, "some orders got through: {outcomes:?}");

    // Every hold is resolved in the end: unpaid orders expire, lost answers are found.
    let resolved = api.eventually(Duration::from_secs(60), || async { api.uses("KILL").await.0 == 0 }).await;
    assert!(resolved, "holds never resolved: {:?}", api.uses("KILL").await);
    let (held, used, _, remaining) = api.uses("KILL").await;
    let delivered = api.delivered_with("KILL").await;
    assert_eq!(used, delivered, "a use counted for every delivered coupon order, and only for those");
    assert_eq!((held, remaining), (0, 150 - used), "no use lost");
    assert!(delivered <= 150);
    let audit = api.audit().await;
    assert_audit_ok(&audit);
    assert_eq!(audit.body["coupons"]["used"].as_u64(), Some(used));
    let mut statuses = std::collections::BTreeMap::<u16, u64>::new();
    outcomes.iter().for_each(|o| *statuses.entry(o.0).or_default() += 1);
    let paid = outcomes.iter().filter(|o| o.1).count();
    eprintln!(
        "coupon saga under kills: {kills} kills, {created} created, {paid} paid, {used} used, answers {statuses:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_in_the_middle_of_the_coupon_saga_loses_no_use_and_counts_none_twice() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // Unpaid orders expire in 2 s; holds older than the request timeout + 1 s are
    // resolved every 100 ms.
    let env = [
        ("KAMI_ORDERS__TTL_SECS", "2"),
        ("KAMI_PRODUCTS__SETTLE_INTERVAL_MS", "100"),
        ("KAMI_SERVER__REQUEST_TIMEOUT_MS", "1000"),
    ];
    let mut server = Server::start(&data, &env);
    let api = server.api();
    api.create_product("hot", 1_000, 0, 2).await;
    assert_eq!(api.import("hot", &(0..3_000).map(|i| format!("K-{i}")).collect::<Vec<_>>()).await.status, 200);
    assert_eq!(api.create_coupon(amount_coupon("NINE", 300, 2_000)).await.status, 201);
    // Coupon orders run, one in two paid at once; after the 40th acknowledged
    // delivery the process dies.
    let delivered = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(String, String)>::new()));
    let forty = std::sync::Arc::new(tokio::sync::Notify::new());
    let workers: Vec<_> = (0..16)
        .map(|w| {
            let (api, delivered, forty) = (api.clone(), delivered.clone(), forty.clone());
            tokio::spawn(async move {
                for i in 0.. {
                    let body =
                        json!({"product_id": "hot", "quantity": 1, "buyer": format!("w{w}-{i}"), "coupon": "NINE"});
                    let sent = api
                        .http
                        .post(format!("{}/api/v1/orders", api.url))
                        .header("Idempotency-Key", format!("w{w}-{i}"));
                    let Ok(resp) = sent.json(&body).send().await else { return };
                    if resp.status() != 201 {
                        return;
                    }
                    let Ok(o) = resp.json::<Value>().await else { return };
                    if i % 2 == 1 {
                        continue;
                    }
                    let id = o["order_id"].as_str().unwrap().to_string();
                    let Ok(paid) = api.notify_request(&id, &format!("pay-w{w}-{i}"), 700).send().await else { return };
                    if paid.status() != 200 {
                        return;
                    }
                    let mut d = delivered.lock().unwrap();
                    d.push((id, o["query_token"].as_str().unwrap().to_string()));
                    if d.len() == 40 {
                        forty.notify_one();
                    }
                }
            })
        })
        .collect();
    tokio::time::timeout(Duration::from_secs(60), forty.notified()).await.expect("40 deliveries acknowledged");
    server.kill9();
    for w in workers {
        tokio::time::timeout(Duration::from_secs(30), w).await.expect("worker ends").unwrap();
    }
    let delivered = std::mem::take(&mut *delivered.lock().unwrap());

    // The directory as the crash left it passes the offline audit, coupons included.
    let (code, out, err) = kami_audit(&data, true);
    assert_eq!(code, 0, "offline audit: {out}{err}");
    let offline: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(offline["coupons"]["coupons"], 1, "{offline}");

    let restarted = Server::start(&data, &env);
    let api = restarted.api();
    let resolved = api.eventually(Duration::from_secs(60), || async { api.uses("NINE").await.0 == 0 }).await;
    assert!(resolved, "holds never resolved: {:?}", api.uses("NINE").await);
    for (id, token) in &delivered {
        let o = api.get_order(id, token).await;
        assert_eq!(o.body["status"].as_str(), Some("delivered"), "acknowledged delivery lost: {}", o.body);
    }
    let (_, used, _, remaining) = api.uses("NINE").await;
    assert_eq!(used, api.delivered_with("NINE").await, "a use for every delivered coupon order, and only those");
    assert!(used >= delivered.len() as u64);
    assert_eq!(remaining, 2_000 - used, "no use lost");
    assert_audit_ok(&api.audit().await);
}
