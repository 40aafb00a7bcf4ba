//! Buyer order lookup (查单): a query password set at order creation finds the
//! buyer's orders again, across products and shards, archived ones and after a
//! crash too; a wrong password answers like an unknown buyer; the route has its own
//! strict rate limits.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

/// Lookup limits loose enough for tests that look up many times.
const LOOSE: [(&str, &str); 4] = [
    ("lookup.per_ip_per_minute", "100000"),
    ("lookup.per_ip_burst", "100000"),
    ("lookup.per_buyer_per_minute", "100000"),
    ("lookup.per_buyer_burst", "100000"),
];

trait Lookup {
    async fn order_with_password(&self, product: &str, buyer: &str, password: &str) -> Reply;
    async fn lookup(&self, body: Value) -> Reply;
}

impl Lookup for Api {
    async fn order_with_password(&self, product: &str, buyer: &str, password: &str) -> Reply {
        let body = json!({"product_id": product, "quantity": 1, "buyer": buyer, "query_password": password});
        reply(self.http.post(format!("{}/api/v1/orders", self.url)).json(&body)).await
    }

    async fn lookup(&self, body: Value) -> Reply {
        reply(self.http.post(format!("{}/api/v1/orders/lookup", self.url)).json(&body)).await
    }
}

fn ids(r: &Reply) -> Vec<String> {
    r.body["orders"].as_array().unwrap().iter().map(|o| o["order_id"].as_str().unwrap().to_string()).collect()
}

/// Every page of `buyer`'s lookup with pages of `limit`.
async fn all_pages(api: &Api, buyer: &str, password: &str, limit: u64) -> Vec<Value> {
    let mut orders = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut body = json!({"buyer": buyer, "query_password": password, "limit": limit});
        if let Some(c) = &cursor {
            body["cursor"] = json!(c);
        }
        let page = api.lookup(body).await;
        assert_eq!(page.status, 200, "{}", page.body);
        let got = page.body["orders"].as_array().unwrap();
        assert!(got.len() as u64 <= limit);
        orders.extend(got.iter().cloned());
        match page.body["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => return orders,
        }
    }
}

fn created_at(o: &Value) -> String {
    o["created_at"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_finds_its_buyers_orders_across_products_and_shards_and_nothing_else() {
    let t = TestApp::spawn_with(&LOOSE).await;
    let api = t.api();
    assert_eq!(api.create_product("two", 500, 0, 2).await.status, 201);
    assert_eq!(api.import("two", &(0..40).map(|i| format!("T{i}")).collect::<Vec<_>>()).await.status, 200);
    api.product_with_keys("one", 20, 0).await;

    let mut mine = Vec::new();
    for i in 0..6 {
        let product = if i % 3 == 0 { "one" } else { "two" };
        let o = api.order_with_password(product, "ann", "ann-secret-1").await;
        assert_eq!(o.status, 201, "{}", o.body);
        assert!(!o.body.to_string().contains("ann-secret-1"), "the password is never returned");
        mine.push((o.body["order_id"].as_str().unwrap().to_string(), o.body["amount_cents"].as_u64().unwrap()));
    }
    // Neither an order without a password, nor one with another password, nor
    // another buyer's order with the same password is found.
    assert_eq!(api.order("two", 1, "ann", None).await.status, 201);
    let other = api.order_with_password("two", "ann", "another-secret").await;
    assert_eq!(other.status, 201);
    let bobs = api.order_with_password("one", "bob", "ann-secret-1").await;
    assert_eq!(bobs.status, 201);
    // One of ann's orders is paid: the lookup shows its key.
    let (paid, amount) = &mine[1];
    assert_eq!(api.notify(paid, "pay-ann", *amount).await.status, 200);
    assert!(!api.admin_order(paid).await.body.to_string().contains("ann-secret-1"));

    let found = api.lookup(json!({"buyer": "ann", "query_password": "ann-secret-1"})).await;
    assert_eq!(found.status, 200, "{}", found.body);
    let found_ids: HashSet<String> = ids(&found).into_iter().collect();
    assert_eq!(found_ids, mine.iter().map(|(id, _)| id.clone()).collect::<HashSet<_>>());
    let orders = found.body["orders"].as_array().unwrap();
    let times: Vec<String> = orders.iter().map(created_at).collect();
    assert!(times.windows(2).all(|w| w[0] >= w[1]), "newest first: {times:?}");
    let delivered = orders.iter().find(|o| o["order_id"] == json!(paid)).unwrap();
    assert_eq!(delivered["status"], "delivered");
    assert_eq!(delivered["keys"].as_array().unwrap().len(), 1);
    assert!(orders.iter().all(|o| o["query_token"].as_str().is_some_and(|t| !t.is_empty())));
    assert!(orders.iter().filter(|o| o["status"] == "pending_payment").all(|o| o["keys"] == json!([])));
    assert_eq!(found.body["next_cursor"], Value::Null);

    // Pages of two walk the same orders, in the same order, once each.
    let paged: Vec<String> = all_pages(&api, "ann", "ann-secret-1", 2)
        .await
        .iter()
        .map(|o| o["order_id"].as_str().unwrap().into())
        .collect();
    assert_eq!(paged, ids(&found));

    // A wrong password and an unknown buyer get the same answer.
    let wrong = api.lookup(json!({"buyer": "ann", "query_password": "not-the-one"})).await;
    let unknown = api.lookup(json!({"buyer": "nobody", "query_password": "ann-secret-1"})).await;
    assert_eq!((wrong.status, &wrong.body), (200, &json!({"orders": [], "next_cursor": null})));
    assert_eq!((unknown.status, &unknown.body), (wrong.status, &wrong.body));

    // By order id: the right password opens it; anything else answers no order.
    let one = api.lookup(json!({"order_id": paid, "query_password": "ann-secret-1"})).await;
    assert_eq!((one.status, ids(&one)), (200, vec![paid.clone()]), "{}", one.body);
    assert_eq!(one.body["orders"][0]["keys"].as_array().unwrap().len(), 1);
    let none = json!({"orders": [], "next_cursor": null});
    for (order_id, password) in [
        (paid.as_str(), "not-the-one"),
        ("one.0.999999", "ann-secret-1"),
        ("nope.0.1", "ann-secret-1"),
        (bobs.body["order_id"].as_str().unwrap(), "wrong-password"),
    ] {
        let r = api.lookup(json!({"order_id": order_id, "query_password": password})).await;
        assert_eq!((r.status, &r.body), (200, &none), "{order_id}");
    }
    let plain = api.order("one", 1, "cat", None).await;
    let r = api.lookup(json!({"order_id": plain.body["order_id"], "query_password": "whatever-1"})).await;
    assert_eq!(r.body, none, "an order without a password opens with none");

    // Bad input.
    let cursor = |buyer: &str| {
        let api = api.clone();
        let buyer = buyer.to_string();
        async move {
            let r = api.lookup(json!({"buyer": buyer, "query_password": "ann-secret-1", "limit": 1})).await;
            r.body["next_cursor"].as_str().unwrap().to_string()
        }
    };
    let anns = cursor("ann").await;
    let mut edited = anns.clone().into_bytes();
    edited[2] = if edited[2] == b'A' { b'B' } else { b'A' };
    for (body, status, code) in [
        (json!({"buyer": "ann", "order_id": paid, "query_password": "ann-secret-1"}), 422, "invalid_request"),
        (json!({"query_password": "ann-secret-1"}), 422, "invalid_request"),
        (json!({"buyer": "ann", "query_password": "short"}), 422, "invalid_request"),
        (json!({"buyer": "ann", "query_password": "x".repeat(129)}), 422, "invalid_request"),
        (json!({"buyer": "ann", "query_password": "ann-secret-1", "limit": 101}), 422, "invalid_request"),
        (json!({"buyer": "ann", "query_password": "ann-secret-1", "limit": 0}), 422, "invalid_request"),
        (json!({"buyer": "ann", "query_password": "ann-secret-1", "cursor": "abc"}), 400, "invalid_cursor"),
        (
            json!({"buyer": "ann", "query_password": "ann-secret-1", "cursor": String::from_utf8(edited).unwrap()}),
            400,
            "invalid_cursor",
        ),
        (json!({"buyer": "bob", "query_password": "ann-secret-1", "cursor": anns}), 400, "invalid_cursor"),
        (json!({"order_id": paid, "query_password": "ann-secret-1", "limit": 5}), 422, "invalid_request"),
        (json!({"buyer": "ann", "query_password": "ann-secret-1", "colour": "red"}), 422, "invalid_request"),
        // Nothing unbounded reaches the limiters' keys.
        (json!({"buyer": "b".repeat(300), "query_password": "ann-secret-1"}), 422, "invalid_request"),
        (json!({"order_id": "o".repeat(200), "query_password": "ann-secret-1"}), 422, "invalid_request"),
    ] {
        let r = api.lookup(body.clone()).await;
        assert_eq!((r.status, r.code()), (status, code), "{body}: {}", r.body);
    }
    let short = reply(api.order_request("one", 1, "dan").json(&json!({
        "product_id": "one", "quantity": 1, "buyer": "dan", "query_password": "12345"
    })))
    .await;
    assert_eq!((short.status, short.code()), (422, "invalid_request"), "{}", short.body);
}

/// Paging while the buyer keeps ordering: every order that existed when paging
/// began is shown exactly once, and nothing is shown twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_across_shards_miss_and_repeat_nothing_while_orders_arrive() {
    let t = TestApp::spawn_with(&LOOSE).await;
    let api = t.api();
    // A buyer's orders of one product may all go to one shard: two products.
    for product in ["hot", "cold"] {
        assert_eq!(api.create_product(product, 100, 0, 2).await.status, 201);
        let keys: Vec<String> = (0..200).map(|i| format!("{product}-{i}")).collect();
        assert_eq!(api.import(product, &keys).await.status, 200);
    }
    let mut before = HashSet::new();
    for i in 0..30 {
        let product = if i % 2 == 0 { "hot" } else { "cold" };
        let o = api.order_with_password(product, "eve", "eve-password").await;
        assert_eq!(o.status, 201, "{}", o.body);
        before.insert(o.body["order_id"].as_str().unwrap().to_string());
    }
    let writer = {
        let api = api.clone();
        tokio::spawn(async move {
            let mut later = Vec::new();
            for i in 0..30 {
                let product = if i % 2 == 0 { "cold" } else { "hot" };
                let o = api.order_with_password(product, "eve", "eve-password").await;
                assert_eq!(o.status, 201, "{}", o.body);
                later.push(o.body["order_id"].as_str().unwrap().to_string());
            }
            later
        })
    };
    let shown = all_pages(&api, "eve", "eve-password", 3).await;
    let later: HashSet<String> = writer.await.unwrap().into_iter().collect();
    let shown_ids: Vec<String> = shown.iter().map(|o| o["order_id"].as_str().unwrap().to_string()).collect();
    let unique: HashSet<&String> = shown_ids.iter().collect();
    assert_eq!(unique.len(), shown_ids.len(), "an order shown twice");
    assert!(before.iter().all(|id| unique.contains(id)), "an order that existed before paging was missed");
    assert!(shown_ids.iter().all(|id| before.contains(id) || later.contains(id)));
    let shards: HashSet<&str> = before.iter().map(|id| id.rsplit_once('.').unwrap().0).collect();
    assert!(shards.len() >= 2, "the orders span shards: {shards:?}");
    let all = all_pages(&api, "eve", "eve-password", 100).await;
    assert_eq!(all.len(), 60);
}

/// The lookup's own limits: per buyer, then per address (not for a storefront's
/// verified API key); 429 with Retry-After.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookups_are_rate_limited_per_buyer_and_per_address() {
    const PARTNER_KEY: &str = "partner-key-0123456789";
    // One token a minute: nothing refills while the test runs.
    let t = TestApp::spawn_with(&[
        ("lookup.per_ip_per_minute", "1"),
        ("lookup.per_ip_burst", "7"),
        ("lookup.per_buyer_per_minute", "1"),
        ("lookup.per_buyer_burst", "3"),
        ("rate_limits.enabled", "true"),
        ("rate_limits.tiers.partner.api_key", PARTNER_KEY),
        ("rate_limits.tiers.partner.per_ip_per_sec", "1000"),
        ("rate_limits.tiers.partner.per_ip_burst", "1000"),
        ("rate_limits.tiers.partner.per_buyer_per_sec", "1000"),
        ("rate_limits.tiers.partner.per_buyer_burst", "1000"),
    ])
    .await;
    let api = t.api();
    let look = |buyer: &str| api.lookup(json!({"buyer": buyer, "query_password": "a-password"}));
    for _ in 0..3 {
        assert_eq!(look("fay").await.status, 200);
    }
    let limited = look("fay").await;
    assert_eq!((limited.status, limited.code()), (429, "rate_limited"), "{}", limited.body);
    assert!(limited.headers.get("retry-after").is_some());
    assert!(limited.body["error"]["message"].as_str().unwrap().contains("buyer"), "{}", limited.body);
    // Another buyer from the same address, until the address's burst is spent.
    for _ in 0..3 {
        assert_eq!(look("gus").await.status, 200);
    }
    let limited = look("hal").await;
    assert_eq!((limited.status, limited.code()), (429, "rate_limited"));
    assert!(limited.body["error"]["message"].as_str().unwrap().contains("address"), "{}", limited.body);
    // A storefront's verified key speaks for many buyers from one address: limited
    // per buyer only.
    let keyed = |buyer: &str| {
        let body = json!({"buyer": buyer, "query_password": "a-password"});
        reply(api.http.post(format!("{}/api/v1/orders/lookup", api.url)).header("X-Api-Key", PARTNER_KEY).json(&body))
    };
    assert_eq!(keyed("hal").await.status, 200);
    assert_eq!(keyed("fay").await.status, 429, "the buyer's own limit still holds");
    // Ordering is not limited by the lookup's limits.
    api.product_with_keys("p", 1, 0).await;
    assert_eq!(api.order_with_password("p", "hal", "a-password").await.status, 201);
    let metrics = api.metrics().await;
    assert!(metric_value(&metrics, "kami_password_hash_seconds_count") > 0.0, "hashes are timed");
    assert!(metrics.contains("scope=\"lookup_buyer\"") && metrics.contains("scope=\"lookup_ip\""), "counted");
}

/// Archived orders are found through the archive's index; a crash (snapshot plus
/// journal) keeps every password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archived_orders_and_a_crash_keep_every_password() {
    let mut settings = LOOSE.to_vec();
    settings.extend([("orders.archive_after_secs", "1"), ("payments.query_grace_secs", "0")]);
    let mut t = TestApp::spawn_with(&settings).await;
    let api = t.api();
    assert_eq!(api.create_product("arc", 700, 0, 2).await.status, 201);
    assert_eq!(api.import("arc", &(0..20).map(|i| format!("A{i}")).collect::<Vec<_>>()).await.status, 200);
    let mut settled = Vec::new();
    for i in 0..6 {
        let o = api.order_with_password("arc", "ivy", "ivy-password").await;
        let (id, token) = (o.body["order_id"].as_str().unwrap(), o.body["query_token"].as_str().unwrap());
        if i % 2 == 0 {
            assert_eq!(api.cancel(id, token).await.status, 200);
        } else {
            assert_eq!(api.notify(id, &format!("pay-{i}"), 700).await.status, 200);
        }
        settled.push(id.to_string());
    }
    let archived = |a: &Reply| a.body["products"][0]["orders_archived"].as_u64().unwrap_or(0);
    assert!(
        api.eventually(Duration::from_secs(30), || async { archived(&api.audit().await) == 6 }).await,
        "orders were not archived: {}",
        api.audit().await.body
    );
    // One order stays in memory: in the snapshot, and one only in the journal.
    let pending = api.order_with_password("arc", "ivy", "ivy-password").await;
    let pending = pending.body["order_id"].as_str().unwrap().to_string();
    let snap = reply(api.admin(api.http.post(format!("{}/api/v1/admin/snapshot", api.url)))).await;
    assert_eq!(snap.status, 200, "{}", snap.body);
    let journaled = api.order_with_password("arc", "ivy", "ivy-password").await;
    let journaled = journaled.body["order_id"].as_str().unwrap().to_string();

    let check = |api: Api| {
        let mut expected: HashSet<String> = settled.iter().cloned().collect();
        expected.extend([pending.clone(), journaled.clone()]);
        let paid = settled[1].clone();
        async move {
            let found = all_pages(&api, "ivy", "ivy-password", 3).await;
            let ids: HashSet<String> = found.iter().map(|o| o["order_id"].as_str().unwrap().to_string()).collect();
            assert_eq!(ids, expected);
            let delivered = found.iter().find(|o| o["order_id"] == json!(paid)).unwrap();
            assert_eq!(delivered["keys"].as_array().unwrap().len(), 1, "an archived order shows its key");
            let by_id = api.lookup(json!({"order_id": paid, "query_password": "ivy-password"})).await;
            assert_eq!(by_id.body["orders"].as_array().unwrap().len(), 1, "{}", by_id.body);
            let wrong = api.lookup(json!({"order_id": paid, "query_password": "not-ivys"})).await;
            assert_eq!(wrong.body["orders"], json!([]));
            assert!(all_pages(&api, "ivy", "not-ivys", 3).await.is_empty());
        }
    };
    check(api.clone()).await;
    let data = t.data.clone();
    t.app.take().unwrap().crash().await;
    let t2 = TestApp::start_on(&data, &settings).await;
    check(t2.api()).await;
    assert_audit_ok(&t2.api().audit().await);
}

/// Hashing is bounded: past `lookup.max_waiting_hashes` an order with a password
/// is refused (503, counted), and orders without one go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_hash_queue_bound_orders_with_a_password_are_refused_and_others_go_on() {
    let t = TestApp::spawn_with(&[("lookup.max_waiting_hashes", "0")]).await;
    let api = t.api();
    api.product_with_keys("p", 2, 0).await;
    let refused = api.order_with_password("p", "kim", "kims-password").await;
    assert_eq!((refused.status, refused.code()), (503, "overloaded"), "{}", refused.body);
    assert!(refused.headers.get("retry-after").is_some());
    assert_eq!(api.order("p", 1, "kim", None).await.status, 201);
    let metrics = api.metrics().await;
    assert!(metrics.contains("reason=\"hash_queue\""), "the refusal is counted");
    assert_eq!(api.audit().await.body["products"][0]["reserved"], 1, "the refused order took nothing");
}
