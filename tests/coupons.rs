//! Coupons: a coupon's uses are exact under concurrency across shards, a use comes
//! back when its order expires or is cancelled (and a late payment of such an order
//! is owed back, never delivered), refusals say which and hold nothing, and the
//! counts survive a restart.

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
