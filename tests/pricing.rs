//! Quantity tiers (批发价): an order's amount uses the tier its quantity reaches, the
//! payment must match that amount, bad tiers are refused naming the field, and a
//! change of tiers reaches only orders created after it, durably. A reseller's API
//! key prices its orders from its tier's price list, and the merchant's listing and
//! export show (and filter by) the reseller.

mod common;

use common::*;
use serde_json::{json, Value};

impl Api {
    async fn create_with(&self, body: Value) -> Reply {
        reply(self.admin(self.http.post(format!("{}/api/v1/products", self.url))).json(&body)).await
    }

    async fn patch_product(&self, id: &str, body: Value) -> Reply {
        reply(self.admin(self.http.patch(format!("{}/api/v1/products/{id}", self.url))).json(&body)).await
    }

    /// An order of `quantity` for a new buyer: its amount.
    async fn amount_of(&self, product: &str, quantity: u64, buyer: &str) -> (Reply, u64) {
        let o = self.order(product, quantity, buyer, None).await;
        assert_eq!(o.status, 201, "{}", o.body);
        let amount = o.body["amount_cents"].as_u64().unwrap();
        (o, amount)
    }
}

fn tiered(id: &str) -> Value {
    json!({"id": id, "name": "Wholesale", "price_cents": 100, "tiers": [
        {"min_quantity": 3, "unit_price_cents": 80}, {"min_quantity": 5, "unit_price_cents": 60}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_pays_the_tier_its_quantity_reaches_and_nothing_else() {
    let t = TestApp::spawn().await;
    let api = t.api();
    let created = api.create_with(tiered("w")).await;
    assert_eq!(created.status, 201, "{}", created.body);
    assert_eq!(created.body["tiers"][1], json!({"min_quantity": 5, "unit_price_cents": 60}));
    let keys: Vec<String> = (0..40).map(|i| format!("W-{i}")).collect();
    assert_eq!(api.import("w", &keys).await.status, 200);
    assert_eq!(api.product("w").await.body["tiers"].as_array().map(Vec::len), Some(2), "buyers see the tiers");

    let mut amounts = Vec::new();
    for (i, q) in [1u64, 2, 3, 4, 5, 10].into_iter().enumerate() {
        amounts.push(api.amount_of("w", q, &format!("b{i}")).await.1);
    }
    assert_eq!(amounts, [100, 200, 240, 320, 300, 600]);

    // The payment must be the tier's amount: the list amount is a mismatch.
    let (o, amount) = api.amount_of("w", 3, "payer").await;
    let id = o.body["order_id"].as_str().unwrap();
    let wrong = api.notify(id, "pay-list-price", 300).await;
    assert_eq!(wrong.code(), "amount_mismatch", "{}", wrong.body);
    let right = api.notify(id, "pay-tier-price", amount).await;
    assert_eq!(right.status, 200, "{}", right.body);
    let got = api.get_order(id, o.body["query_token"].as_str().unwrap()).await;
    assert_eq!((got.body["status"].as_str(), got.body["keys"].as_array().map(Vec::len)), (Some("delivered"), Some(3)));
    assert_audit_ok(&api.audit().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiers_that_raise_the_unit_price_or_do_not_increase_in_quantity_are_refused_naming_the_field() {
    let t = TestApp::spawn().await;
    let api = t.api();
    let cases = [
        (json!([{"min_quantity": 1, "unit_price_cents": 80}]), "tiers[0].min_quantity"),
        (
            json!([{"min_quantity": 5, "unit_price_cents": 80}, {"min_quantity": 5, "unit_price_cents": 70}]),
            "tiers[1].min_quantity",
        ),
        (
            json!([{"min_quantity": 5, "unit_price_cents": 80}, {"min_quantity": 3, "unit_price_cents": 70}]),
            "tiers[1].min_quantity",
        ),
        (json!([{"min_quantity": 5, "unit_price_cents": 101}]), "tiers[0].unit_price_cents"),
        (
            json!([{"min_quantity": 5, "unit_price_cents": 80}, {"min_quantity": 9, "unit_price_cents": 90}]),
            "tiers[1].unit_price_cents",
        ),
    ];
    for (i, (tiers, field)) in cases.iter().enumerate() {
        let r =
            api.create_with(json!({"id": format!("bad{i}"), "name": "B", "price_cents": 100, "tiers": tiers})).await;
        assert_eq!((r.status, r.code()), (422, "invalid_request"), "{}", r.body);
        assert!(r.body["error"]["message"].as_str().unwrap().starts_with(field), "{}", r.body);
        assert_eq!(api.product(&format!("bad{i}")).await.status, 404, "nothing created");
    }
    let negative = api
        .create_with(json!({"id": "neg", "name": "N", "price_cents": 100,
        "tiers": [{"min_quantity": 5, "unit_price_cents": -1}]}))
        .await;
    assert_eq!(negative.status, 422, "{}", negative.body);

    // A change is checked whole: a price below a kept tier is refused, nothing changes.
    assert_eq!(api.create_with(tiered("w")).await.status, 201);
    let below = api.patch_product("w", json!({"price_cents": 70})).await;
    assert_eq!(below.status, 422, "{}", below.body);
    assert!(
        below.body["error"]["message"].as_str().unwrap().starts_with("tiers[0].unit_price_cents"),
        "{}",
        below.body
    );
    assert_eq!(api.product("w").await.body["price_cents"], json!(100));
    let bad = api.patch_product("w", json!({"tiers": [{"min_quantity": 4, "unit_price_cents": 120}]})).await;
    assert_eq!(bad.status, 422, "{}", bad.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_tiers_price_new_orders_only_and_survive_a_crash() {
    let t = TestApp::spawn().await;
    let api = t.api();
    assert_eq!(api.create_with(tiered("w")).await.status, 201);
    let keys: Vec<String> = (0..40).map(|i| format!("W-{i}")).collect();
    assert_eq!(api.import("w", &keys).await.status, 200);
    let (before, amount) = api.amount_of("w", 5, "early").await;
    assert_eq!(amount, 300);

    let changed = api
        .patch_product("w", json!({"tiers": [{"min_quantity": 2, "unit_price_cents": 90}], "price_cents": 95}))
        .await;
    assert_eq!(changed.status, 200, "{}", changed.body);
    assert_eq!(api.amount_of("w", 5, "later").await.1, 450);
    // The earlier order keeps its amount: paid at it, it is delivered.
    let id = before.body["order_id"].as_str().unwrap();
    assert_eq!(api.notify(id, "pay-early", 300).await.status, 200);

    let data = t.data.clone();
    let mut t = t;
    t.app.take().unwrap().crash().await;
    let t2 = TestApp::start_on(&data, &[]).await;
    let api = t2.api();
    assert_eq!(api.product("w").await.body["tiers"], json!([{"min_quantity": 2, "unit_price_cents": 90}]));
    assert_eq!(api.amount_of("w", 1, "after-1").await.1, 95);
    assert_eq!(api.amount_of("w", 2, "after-2").await.1, 180);
    // Cleared: one price for any quantity again.
    assert_eq!(api.patch_product("w", json!({"tiers": null})).await.status, 200);
    assert_eq!(api.amount_of("w", 2, "cleared").await.1, 190);
    assert_audit_ok(&api.audit().await);
}

/// Every answer about an order explains its amount the same way, as it was priced:
/// on creation, on reads after the terms changed, after a crash and once archived.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_price_breakdown_stays_what_the_order_was_priced_at() {
    let settings = [("orders.archive_after_secs", "1"), ("payments.query_grace_secs", "0")];
    let t = TestApp::spawn_with(&settings).await;
    let api = t.api();
    assert_eq!(api.create_with(tiered("w")).await.status, 201);
    let keys: Vec<String> = (0..10).map(|i| format!("W-{i}")).collect();
    assert_eq!(api.import("w", &keys).await.status, 200);
    let tiered_breakdown = json!({"quantity": 3, "list_unit_price_cents": 100, "tier_min_quantity": 3, "reseller": null,
        "unit_price_cents": 80, "subtotal_cents": 240, "coupon": null, "discount_cents": 0, "total_cents": 240});
    let (o, _) = api.amount_of("w", 3, "bulk").await;
    assert_eq!(o.body["price_breakdown"], tiered_breakdown, "{}", o.body);
    let (plain, _) = api.amount_of("w", 1, "single").await;
    assert_eq!(
        plain.body["price_breakdown"],
        json!({"quantity": 1, "list_unit_price_cents": 100, "tier_min_quantity": null, "reseller": null,
               "unit_price_cents": 100, "subtotal_cents": 100, "coupon": null, "discount_cents": 0, "total_cents": 100})
    );
    let (id, token) =
        (o.body["order_id"].as_str().unwrap().to_string(), o.body["query_token"].as_str().unwrap().to_string());

    // New terms do not rewrite an order's explanation.
    assert_eq!(api.patch_product("w", json!({"price_cents": 90, "tiers": null})).await.status, 200);
    assert_eq!(api.get_order(&id, &token).await.body["price_breakdown"], tiered_breakdown);
    assert_eq!(api.admin_order(&id).await.body["price_breakdown"], tiered_breakdown);
    assert_eq!(api.notify(&id, "pay-bulk", 240).await.status, 200);

    // A crash: rebuilt from the journal.
    let data = t.data.clone();
    let mut t = t;
    t.app.take().unwrap().crash().await;
    let t2 = TestApp::start_on(&data, &settings).await;
    let api = t2.api();
    assert_eq!(api.get_order(&id, &token).await.body["price_breakdown"], tiered_breakdown);

    // Archived (delivered and settled): read from the archive record.
    let archived = |a: &Reply| a.body["products"][0]["orders_archived"].as_u64().unwrap_or(0);
    assert!(
        api.eventually(std::time::Duration::from_secs(30), || async { archived(&api.audit().await) >= 1 }).await,
        "the delivered order was not archived"
    );
    let read = api.get_order(&id, &token).await;
    assert_eq!((read.body["status"].as_str(), &read.body["price_breakdown"]), (Some("delivered"), &tiered_breakdown));
}

const ACME_KEY: &str = "acme-reseller-secret-0001";

/// A reseller tier: vip at a fixed 800, everything else at 90%.
fn with_reseller(extra: &[(&'static str, &'static str)]) -> Vec<(&'static str, &'static str)> {
    let mut s = vec![
        ("rate_limits.tiers.acme.api_key", ACME_KEY),
        ("rate_limits.tiers.acme.per_ip_per_sec", "1000"),
        ("rate_limits.tiers.acme.per_ip_burst", "1000"),
        ("rate_limits.tiers.acme.per_buyer_per_sec", "1000"),
        ("rate_limits.tiers.acme.per_buyer_burst", "1000"),
        ("rate_limits.tiers.acme.price_percent", "90"),
        ("rate_limits.tiers.acme.unit_prices.vip", "800"),
    ];
    s.extend_from_slice(extra);
    s
}

impl Api {
    async fn resold(&self, product: &str, quantity: u64, buyer: &str, extra: Value) -> Reply {
        let mut body = json!({"product_id": product, "quantity": quantity, "buyer": buyer});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        let req = self.http.post(format!("{}/api/v1/orders", self.url)).header("X-Api-Key", ACME_KEY).json(&body);
        reply(req).await
    }

    async fn listed(&self, query: &str) -> Vec<Value> {
        let r = reply(self.admin(self.http.get(format!("{}/api/v1/admin/orders?{query}", self.url)))).await;
        assert_eq!(r.status, 200, "{}", r.body);
        r.body["orders"].as_array().unwrap().clone()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resellers_key_prices_its_orders_from_its_list_and_the_merchant_sees_whose_they_are() {
    // Rate limits stay off (the tests' default): prices do not depend on them.
    let t = TestApp::spawn_with(&with_reseller(&[])).await;
    let api = t.api();
    assert_eq!(api.create_with(json!({"id": "vip", "name": "VIP", "price_cents": 1_000})).await.status, 201);
    assert_eq!(api.create_with(tiered("w")).await.status, 201);
    for p in ["vip", "w"] {
        let keys: Vec<String> = (0..20).map(|i| format!("{p}-{i}")).collect();
        assert_eq!(api.import(p, &keys).await.status, 200);
    }
    // The fixed price, the percentage of the list price and of the tier reached.
    let amount = |r: &Reply| (r.status, r.body["amount_cents"].as_u64(), r.body["price_breakdown"]["reseller"].clone());
    let vip = api.resold("vip", 1, "r1", json!({})).await;
    assert_eq!(amount(&vip), (201, Some(800), json!("acme")), "{}", vip.body);
    assert_eq!(amount(&api.resold("w", 1, "r2", json!({})).await), (201, Some(90), json!("acme")));
    let bulk = api.resold("w", 3, "r3", json!({})).await;
    assert_eq!(amount(&bulk), (201, Some(216), json!("acme")), "90% of the tier's 80, times 3");
    assert_eq!(bulk.body["price_breakdown"]["tier_min_quantity"], json!(3));
    // Without the key: the public price, no reseller.
    let public = api.order("vip", 1, "p1", None).await;
    assert_eq!(amount(&public), (201, Some(1_000), Value::Null));
    // A coupon comes off the reseller's subtotal.
    let coupon = json!({"code": "TEN", "kind": "amount", "value": 100, "max_uses": 5});
    let created = reply(api.admin(api.http.post(format!("{}/api/v1/admin/coupons", api.url))).json(&coupon)).await;
    assert_eq!(created.status, 201, "{}", created.body);
    let discounted = api.resold("vip", 1, "r4", json!({"coupon": "TEN"})).await;
    assert_eq!(amount(&discounted), (201, Some(700), json!("acme")), "{}", discounted.body);
    // An unknown key is refused, not priced publicly.
    let guess = reply(
        api.http
            .post(format!("{}/api/v1/orders", api.url))
            .header("X-Api-Key", "not-a-key-anyone-has")
            .json(&json!({"product_id": "vip", "quantity": 1, "buyer": "x"})),
    )
    .await;
    assert_eq!((guess.status, guess.code()), (401, "invalid_api_key"));

    // The payment must be the reseller's amount.
    let id = vip.body["order_id"].as_str().unwrap();
    assert_eq!(api.notify(id, "pay-list", 1_000).await.code(), "amount_mismatch");
    assert_eq!(api.notify(id, "pay-resold", 800).await.status, 200);
    let got = api.get_order(id, vip.body["query_token"].as_str().unwrap()).await;
    assert_eq!(got.body["status"].as_str(), Some("delivered"), "{}", got.body);

    // The merchant lists and exports what the reseller sold.
    let listed = api.listed("reseller=acme").await;
    assert_eq!(listed.len(), 4, "{listed:?}");
    assert!(listed.iter().all(|o| o["price_breakdown"]["reseller"] == "acme"));
    assert_eq!(api.listed("").await.len(), 5);
    let bad = reply(api.admin(api.http.get(format!("{}/api/v1/admin/orders?reseller=Not%20One", api.url)))).await;
    assert_eq!(bad.status, 422, "{}", bad.body);
    let csv = api
        .admin(api.http.get(format!("{}/api/v1/admin/orders/export?reseller=acme", api.url)))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let mut lines = csv.lines();
    assert!(lines.next().unwrap().ends_with(",group_id,reseller,coupon,discount_cents"), "{csv}");
    let rows: Vec<&str> = lines.collect();
    assert_eq!(rows.len(), 4, "{csv}");
    assert!(rows.iter().all(|r| r.contains(",acme,")), "{csv}");
    assert!(rows.iter().any(|r| r.ends_with(",acme,TEN,100")), "{csv}");

    // After a crash the orders still say whose they are.
    let data = t.data.clone();
    let mut t = t;
    t.app.take().unwrap().crash().await;
    let t2 = TestApp::start_on(&data, &with_reseller(&[])).await;
    assert_eq!(
        t2.api().get_order(id, vip.body["query_token"].as_str().unwrap()).await.body["price_breakdown"]["reseller"],
        "acme"
    );
    assert_audit_ok(&t2.api().audit().await);
}
