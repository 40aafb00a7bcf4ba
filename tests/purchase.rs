//! The purchase path over HTTP against the real server.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_purchase_delivers_a_key_and_audit_holds() {
    let t = TestApp::spawn().await;
    let api = t.api();
    let keys = api.product_with_keys("p1", 3, 0).await;
    assert_eq!(api.product("p1").await.body["available"], json!(3));

    let o = api.order("p1", 1, "alice@example.com", None).await;
    assert_eq!(o.status, 201, "{:?}", o.body);
    assert_eq!(o.body["status"], "pending_payment");
    assert_eq!(o.body["amount_cents"], json!(990));
    assert_eq!(o.body["payment"]["channel"], "sandbox");
    let (id, token) = (o.body["order_id"].as_str().unwrap(), o.body["query_token"].as_str().unwrap());
    let before = api.get_order(id, token).await;
    assert_eq!(before.body["status"], "pending_payment");
    assert_eq!(before.body["keys"], json!([]), "keys are shown only once delivered, in one shape");
    assert_eq!(api.product("p1").await.body["available"], json!(2), "reserved stock is not available");

    let n = api.notify(id, "pay-1", 990).await;
    assert_eq!((n.status, &n.body), (200, &json!({"result": "success"})));
    let after = api.get_order(id, token).await;
    assert_eq!(after.body["status"], "delivered");
    let delivered = after.body["keys"].as_array().unwrap();
    assert_eq!(delivered.len(), 1);
    assert!(keys.contains(&delivered[0].as_str().unwrap().to_string()));
    assert!(after.body["paid_at"].is_string() && after.body["delivered_at"].is_string());

    let audit = api.audit().await;
    assert_audit_ok(&audit);
    assert_eq!(
        audit.body["products"][0],
        json!({"id": "p1", "imported": 3, "available": 2, "reserved": 0, "sold": 1, "in_transit": 0, "withdrawn": 0,
            "orders_in_memory": 1, "orders_archived": 0})
    );
    assert_eq!(audit.body["orders"]["delivered"], json!(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sold_out_when_not_enough_keys() {
    let t = TestApp::spawn().await;
    let api = t.api();
    api.product_with_keys("p", 2, 0).await;
    assert_eq!(api.order("p", 2, "a", None).await.status, 201);
    let r = api.order("p", 1, "b", None).await;
    assert_eq!((r.status, r.code()), (409, "sold_out"));
    assert_eq!(api.order("nope", 1, "b", None).await.code(), "product_not_found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_buyer_limit_counts_live_orders_only() {
    let t = TestApp::spawn().await;
    let api = t.api();
    api.product_with_keys("p", 10, 2).await;
    let first = api.order("p", 2, "alice", None).await;
    assert_eq!(first.status, 201);
    let r = api.order("p", 1, "alice", None).await;
    assert_eq!((r.status, r.code()), (403, "limit_exceeded"));
    assert_eq!(api.order("p", 2, "bob", None).await.status, 201, "the limit is per buyer");
    // A cancelled order no longer counts.
    let c = api.cancel(first.body["order_id"].as_str().unwrap(), first.body["query_token"].as_str().unwrap()).await;
    assert_eq!(c.status, 200);
    assert_eq!(api.order("p", 2, "alice", None).await.status, 201);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_order_creation() {
    let t = TestApp::spawn().await;
    let api = t.api();
    api.product_with_keys("p", 5, 0).await;
    api.product_with_keys("q", 5, 0).await;
    let first = api.order("p", 1, "alice", Some("key-1")).await;
    assert_eq!(first.status, 201);
    for _ in 0..3 {
        let again = api.order("p", 1, "alice", Some("key-1")).await;
        assert_eq!(again.status, 201);
        assert_eq!(again.body, first.body, "a replay returns the same answer");
        assert_eq!(again.headers.get("idempotent-replayed").unwrap(), "true");
    }
    assert_eq!(api.product("p").await.body["available"], json!(4), "one reservation only");
    let reused = api.order("p", 2, "alice", Some("key-1")).await;
    assert_eq!((reused.status, reused.code()), (422, "idempotency_key_reused"));
    let other_product = api.order("q", 1, "alice", Some("key-1")).await;
    assert_eq!((other_product.status, other_product.code()), (422, "idempotency_key_reused"));
    // Only 201s are replayed: after an error, a retry with the same key runs anew.
    let invalid = api.order("p", 11, "bob", Some("key-2")).await;
    assert_eq!(invalid.code(), "invalid_request");
    let too_many = api.order("p", 5, "bob", Some("key-3")).await;
    assert_eq!(too_many.code(), "sold_out");
    assert_eq!(api.order("p", 4, "bob", Some("key-3")).await.status, 201);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_notification_delivers_once() {
    let t = TestApp::spawn().await;
    let api = t.api();
    api.product_with_keys("p", 5, 0).await;
    let o = api.order("p", 1, "alice", None).await;
    let id = o.body["order_id"].as_str().unwrap();
    let mut keys_seen = Vec::new();
    for _ in 0..10 {
        let n = api.notify(id, "pay-same", 990).await;
        assert_eq!((n.status, &n.body), (200, &json!({"result": "success"})));
        keys_seen.push(api.get_order(id, o.body["query_token"].as_str().unwrap()).await.body["keys"].clone());
    }
    assert!(keys_seen.windows(2).all(|w| w[0] == w[1]), "same key every time");
    let audit = api.audit().await;
    assert_audit_ok(&audit);
    assert_eq!(audit.body["products"][0]["sold"], json!(1));
    assert_eq!(audit.body["products"][0]["available"], json!(4));
    // A second, different payment for a paid order: acknowledged, nothing more delivered.
    assert_eq!(api.notify(id, "pay-other", 990).await.status, 200);
    assert_eq!(api.audit().await.body["products"][0]["sold"], json!(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_or_missing_token_is_not_found() {
    let t = TestApp::spawn().await;
    let api = t.api();
    api.product_with_keys("p", 1, 0).await;
    let o = api.order("p", 1, "alice", None).await;
    let id = o.body["order_id"].as_str().unwrap();
    for r in [
        api.get_order(id, "0123456789abcdef0123456789abcdef").await,
        api.get_order(id, "").await,
        reply(api.http.get(format!("{}/api/v1/orders/{id}", api.url))).await,
        api.get_order("p.0.999", o.body["query_token"].as_str().unwrap()).await,
        api.get_order("garbage", "x").await,
        api.cancel(id, "wrong").await,
    ] {
        assert_eq!((r.status, r.code()), (404, "order_not_found"));
    }
    assert_eq!(api.get_order(id, o.body["query_token"].as_str().unwrap()).await.body["status"], "pending_payment");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_releases_stock_once() {
    let t = TestApp::spawn().await;
    let api = t.api();
    api.product_with_keys("p", 1, 0).await;
    let o = api.order("p", 1, "alice", None).await;
    let (id, token) = (o.body["order_id"].as_str().unwrap(), o.body["query_token"].as_str().unwrap());
    assert_eq!(api.order("p", 1, "bob", None).await.code(), "sold_out");
    let c = api.cancel(id, token).await;
    assert_eq!((c.status, c.body["status"].as_str()), (200, Some("cancelled")));
    assert_eq!(api.product("p").await.body["available"], json!(1));
    let again = api.cancel(id, token).await;
    assert_eq!((again.status, again.code()), (409, "invalid_state"));
    assert_eq!(api.order("p", 1, "bob", None).await.status, 201);
    assert_audit_ok(&api.audit().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_releases_stock_and_a_late_payment_is_served_or_refunded() {
    let t = TestApp::spawn_with(&[("orders.ttl_secs", "1"), ("orders.expiry_tick_ms", "50")]).await;
    let api = t.api();
    api.product_with_keys("p", 1, 0).await;
    let o = api.order("p", 1, "alice", None).await;
    let (id, token) =
        (o.body["order_id"].as_str().unwrap().to_string(), o.body["query_token"].as_str().unwrap().to_string());
    assert_eq!(api.product("p").await.body["available"], json!(0));
    let expired = api
        .eventually(Duration::from_secs(10), || async { api.get_order(&id, &token).await.body["status"] == "expired" })
        .await;
    assert!(expired, "order did not expire");
    assert_eq!(api.product("p").await.body["available"], json!(1), "stock returned");

    // Paid after expiry while stock remains: served.
    assert_eq!(api.notify(&id, "late-1", 990).await.status, 200);
    assert_eq!(api.get_order(&id, &token).await.body["status"], "delivered");

    // Paid after expiry with no stock left: refund owed, never dropped.
    api.import("p", &["p-extra".to_string()]).await;
    let o2 = api.order("p", 1, "bob", None).await;
    let id2 = o2.body["order_id"].as_str().unwrap().to_string();
    let token2 = o2.body["query_token"].as_str().unwrap().to_string();
    assert!(
        api.eventually(Duration::from_secs(10), || async {
            api.get_order(&id2, &token2).await.body["status"] == "expired"
        })
        .await
    );
    assert_eq!(api.order("p", 1, "carol", None).await.status, 201, "carol takes the last key");
    assert_eq!(api.notify(&id2, "late-2", 990).await.status, 200);
    assert_eq!(api.get_order(&id2, &token2).await.body["status"], "refund_pending");
    assert_audit_ok(&api.audit().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notification_checks() {
    let t = TestApp::spawn().await;
    let api = t.api();
    api.product_with_keys("p", 2, 0).await;
    let o = api.order("p", 1, "alice", None).await;
    let id = o.body["order_id"].as_str().unwrap();
    let audit_before = api.audit().await.body;
    let body = |amount: u64, ts: i64, nonce: &str| {
        serde_json::to_vec(&json!({"order_id": id, "payment_id": "pay-x", "amount_cents": amount, "status": "paid", "timestamp": ts, "nonce": nonce, "gateway_extra": {"ignored": true}})).unwrap()
    };
    let forged = api.notify_raw("sandbox", &body(990, now_secs(), "n1"), "not-the-secret").await;
    assert_eq!((forged.status, forged.code()), (401, "bad_signature"));
    let stale = api.notify_raw("sandbox", &body(990, now_secs() - 1000, "n2"), SECRET).await;
    assert_eq!((stale.status, stale.code()), (400, "stale_request"));
    let unknown = api.notify_raw("alipay", &body(990, now_secs(), "n3"), SECRET).await;
    assert_eq!((unknown.status, unknown.code()), (404, "unknown_channel"));
    let mismatch = api.notify_raw("sandbox", &body(1, now_secs(), "n4"), SECRET).await;
    assert_eq!((mismatch.status, mismatch.code()), (422, "amount_mismatch"));
    let replay = api.notify_raw("sandbox", &body(990, now_secs() + 1, "n4"), SECRET).await;
    assert_eq!((replay.status, replay.code()), (409, "replayed"));
    let never_issued = serde_json::to_vec(&json!({"order_id": "p.0.77", "payment_id": "z", "amount_cents": 990, "status": "paid", "timestamp": now_secs(), "nonce": "n5"})).unwrap();
    assert_eq!(api.notify_raw("sandbox", &never_issued, SECRET).await.code(), "order_not_found");
    let failed = serde_json::to_vec(&json!({"order_id": id, "payment_id": "pay-f", "amount_cents": 990, "status": "failed", "timestamp": now_secs(), "nonce": "n6"})).unwrap();
    assert_eq!(api.notify_raw("sandbox", &failed, SECRET).await.status, 200);
    let admin = api.admin_order(id).await;
    assert_eq!(admin.body["status"], "pending_payment", "nothing delivered");
    assert_eq!(admin.body["amount_mismatch"], json!(true), "flagged for the merchant");
    assert_eq!(api.audit().await.body, audit_before, "the audit is unchanged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_keys_survive_a_restart_across_products() {
    let mut t = TestApp::spawn().await;
    let api = t.api();
    api.product_with_keys("p", 5, 0).await;
    api.product_with_keys("q", 5, 0).await;
    let first = api.order("p", 1, "alice", Some("restart-key")).await;
    assert_eq!(first.status, 201);
    t.app.take().unwrap().crash().await;

    let restarted = TestApp::start_on(&t.data, &[]).await;
    let api = restarted.api();
    // Ask the other product first: nothing in this process has seen the key yet.
    let other = api.order("q", 1, "alice", Some("restart-key")).await;
    assert_eq!((other.status, other.code()), (422, "idempotency_key_reused"), "the pin was restored from storage");
    let replay = api.order("p", 1, "alice", Some("restart-key")).await;
    assert_eq!((replay.status, &replay.body), (201, &first.body), "the owning shard replays");
}

/// The merchant reads a product with every field it was created with, its points
/// price and its stock over all its shards; a buyer's token or none is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_merchant_reads_a_product_with_every_field_and_its_stock() {
    let t = TestApp::spawn().await;
    let api = t.api();
    assert_eq!(api.create_product("full", 990, 3, 2).await.status, 201);
    let keys: Vec<String> = (0..6).map(|i| format!("full-K{i}")).collect();
    assert_eq!(api.import("full", &keys).await.status, 200);
    let o = api.order("full", 2, "alice", None).await;
    assert_eq!(o.status, 201, "{}", o.body);
    let url = format!("{}/api/v1/admin/products/full", api.url);
    let r = reply(api.admin(api.http.get(&url))).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let b = &r.body;
    assert_eq!((b["id"].as_str(), b["price_cents"].as_u64()), (Some("full"), Some(990)));
    assert_eq!((b["per_buyer_limit"].as_u64(), b["shards"].as_u64()), (Some(3), Some(2)));
    assert!(b["created_at"].as_str().is_some_and(|t| t.ends_with('Z')), "{b}");
    assert_eq!(b["points_price"], serde_json::Value::Null);
    let stock = &b["stock"];
    assert_eq!(
        [&stock["imported"], &stock["available"], &stock["reserved"], &stock["sold"]].map(|v| v.as_u64()),
        [Some(6), Some(4), Some(2), Some(0)],
        "{b}"
    );
    assert_eq!(b["orders_created"].as_u64(), Some(1));
    let anonymous = reply(api.http.get(&url)).await;
    assert_eq!((anonymous.status, anonymous.code()), (401, "unauthorized"), "{}", anonymous.body);
    let missing = reply(api.admin(api.http.get(format!("{}/api/v1/admin/products/nope", api.url)))).await;
    assert_eq!((missing.status, missing.code()), (404, "product_not_found"));
}

/// Off the shelf a product takes no new order (a replay of one made before still
/// answers), its existing orders go on, and it is deleted only off the shelf and
/// with no open order. Deleted, it is gone for buyers, from the status page and
/// for new products of that id, across a restart; its orders stay readable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_product_off_the_shelf_takes_no_new_orders_and_is_deleted_once_none_is_open() {
    let mut t = TestApp::spawn().await;
    let api = t.api();
    api.product_with_keys("shelf", 4, 0).await;
    let admin = |method: reqwest::Method, path: &str| {
        let req = api.http.request(method, format!("{}/api/v1/admin/products/shelf{path}", api.url));
        reply(api.admin(req))
    };
    let alice = api.order("shelf", 1, "alice", Some("alice-1")).await;
    assert_eq!(alice.status, 201, "{}", alice.body);

    let retired = admin(reqwest::Method::POST, "/retire").await;
    assert_eq!((retired.status, retired.body["shelf"].as_str()), (200, Some("retired")), "{}", retired.body);
    assert!(retired.body["shelf_since"].as_str().is_some_and(|t| t.ends_with('Z')), "{}", retired.body);
    assert_eq!(api.product("shelf").await.body["on_sale"], json!(false));
    let bob = api.order("shelf", 1, "bob", None).await;
    assert_eq!((bob.status, bob.code()), (409, "product_retired"), "{}", bob.body);
    let replay = api.order("shelf", 1, "alice", Some("alice-1")).await;
    assert_eq!(replay.body["order_id"], alice.body["order_id"], "a replay still answers: {}", replay.body);
    assert_eq!(api.import("shelf", &["shelf-extra".to_string()]).await.status, 200, "restocking off the shelf");

    let open = admin(reqwest::Method::DELETE, "").await;
    assert_eq!((open.status, open.code()), (409, "product_has_open_orders"), "{}", open.body);
    assert_eq!(open.body["error"]["open_orders"]["pending_payment"], json!(1), "{}", open.body);
    // The open order goes on: paid and delivered off the shelf.
    let id = alice.body["order_id"].as_str().unwrap();
    assert_eq!(api.notify(id, "pay-shelf-1", alice.body["amount_cents"].as_u64().unwrap()).await.status, 200);

    let relisted = admin(reqwest::Method::POST, "/relist").await;
    assert_eq!((relisted.status, relisted.body["shelf"].as_str()), (200, Some("on_sale")));
    let on_sale = admin(reqwest::Method::DELETE, "").await;
    assert_eq!((on_sale.status, on_sale.code()), (409, "product_on_sale"), "{}", on_sale.body);
    let carol = api.order("shelf", 1, "carol", None).await;
    assert_eq!(carol.status, 201, "on sale again: {}", carol.body);
    let cancelled =
        api.cancel(carol.body["order_id"].as_str().unwrap(), carol.body["query_token"].as_str().unwrap()).await;
    assert_eq!(cancelled.status, 200, "{}", cancelled.body);

    assert_eq!(admin(reqwest::Method::POST, "/retire").await.status, 200);
    let deleted = admin(reqwest::Method::DELETE, "").await;
    assert_eq!((deleted.status, deleted.body["shelf"].as_str()), (200, Some("deleted")), "{}", deleted.body);

    let check_deleted = |api: Api| async move {
        assert_eq!(api.product("shelf").await.code(), "product_not_found");
        let dave = api.order("shelf", 1, "dave", None).await;
        assert_eq!((dave.status, dave.code()), (404, "product_not_found"));
        let again = api.create_product("shelf", 100, 0, 1).await;
        assert_eq!((again.status, again.code()), (409, "product_deleted"), "an id is never reused: {}", again.body);
        let status = reply(api.http.get(format!("{}/status.json", api.url))).await;
        assert!(
            status.body["products"].as_array().unwrap().iter().all(|p| p["id"] != "shelf"),
            "not on the status page: {}",
            status.body
        );
        let storage = &status.body["storage"];
        assert_eq!(
            (storage["backend"].as_str(), storage["serving"].as_bool()),
            (Some("local"), Some(true)),
            "{storage}"
        );
        let read = reply(api.admin(api.http.get(format!("{}/api/v1/admin/products/shelf", api.url)))).await;
        assert_eq!((read.status, read.body["shelf"].as_str()), (200, Some("deleted")), "the merchant still reads it");
        let relist = reply(api.admin(api.http.post(format!("{}/api/v1/admin/products/shelf/relist", api.url)))).await;
        assert_eq!((relist.status, relist.code()), (409, "product_deleted"));
        assert_audit_ok(&api.audit().await);
    };
    check_deleted(api.clone()).await;
    let kept = api.get_order(id, alice.body["query_token"].as_str().unwrap()).await;
    assert_eq!((kept.status, kept.body["status"].as_str()), (200, Some("delivered")), "its orders stay readable");
    // A payment that comes late, after the deletion, is still served: paid means served.
    let carol_id = carol.body["order_id"].as_str().unwrap();
    let late = api.notify(carol_id, "pay-shelf-late", carol.body["amount_cents"].as_u64().unwrap()).await;
    assert_eq!(late.status, 200, "{}", late.body);
    let served = api.get_order(carol_id, carol.body["query_token"].as_str().unwrap()).await;
    assert_eq!(served.body["status"], "delivered", "{}", served.body);

    let data = t.data.clone();
    t.app.take().unwrap().crash().await;
    let t2 = TestApp::start_on(&data, &[]).await;
    check_deleted(t2.api()).await;
}
