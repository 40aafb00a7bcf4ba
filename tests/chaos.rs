//! The chaos endpoint (docs/api.md): exists only with `chaos.enabled`, kills what it
//! names, and the killed actors come back from storage.

mod common;

use common::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_endpoint_does_not_exist_unless_enabled() {
    let t = TestApp::spawn().await;
    let api = t.api();
    api.product_with_keys("p", 1, 0).await;
    let r = api.kill("product:p").await;
    assert_eq!((r.status, r.code()), (404, "not_found"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_kill_names_and_validates_its_target() {
    let t = TestApp::spawn_with(&[("chaos.enabled", "true")]).await;
    let api = t.api();
    assert_eq!(api.create_product("p", 990, 0, 2).await.status, 201);

    let unauthorised =
        reply(api.http.post(format!("{}/api/v1/admin/chaos/kill", api.url)).json(&json!({"actor": "orders"}))).await;
    assert_eq!((unauthorised.status, unauthorised.code()), (401, "unauthorized"));

    for (actor, status, answer) in [
        ("product:p", 200, json!({"killed": "product:p"})),
        ("product:p#1", 200, json!({"killed": "product:p#1"})),
        ("orders", 200, json!({"killed": "orders"})),
        ("payments", 200, json!({"killed": "payments"})),
    ] {
        let r = api.kill(actor).await;
        assert_eq!((r.status, &r.body), (status, &answer), "{actor}");
    }
    for (actor, status, code) in [
        ("product:nope", 404, "product_not_found"),
        ("product:p#2", 404, "actor_not_found"),
        ("nobody", 422, "invalid_request"),
        ("product:Bad!", 422, "invalid_request"),
    ] {
        let r = api.kill(actor).await;
        assert_eq!((r.status, r.code()), (status, code), "{actor}: {}", r.body);
    }
    let random = api.kill("random").await;
    assert_eq!(random.status, 200);
    let name = random.body["killed"].as_str().unwrap();
    assert!(["orders", "payments", "product:p#0", "product:p#1"].contains(&name), "{name}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_actors_come_back_with_their_durable_state() {
    let t = TestApp::spawn_with(&[("chaos.enabled", "true")]).await;
    let api = t.api();
    assert_eq!(api.create_product("p", 990, 0, 2).await.status, 201);
    let keys: Vec<String> = (0..20).map(|i| format!("K{i}")).collect();
    assert_eq!(api.import("p", &keys).await.body["imported"], json!(20));
    let sold = api.buy("p", "alice").await;
    let pending = api.order("p", 1, "bob", None).await;

    for actor in ["product:p", "orders", "random", "product:p#0"] {
        assert_eq!(api.kill(actor).await.status, 200);
    }
    // The product supervisor serves again: a new product can be created.
    assert_eq!(api.create_product("q", 100, 0, 1).await.status, 201);
    let again = api.admin_order(sold.body["order_id"].as_str().unwrap()).await;
    assert_eq!((again.body["status"].as_str(), &again.body["keys"]), (Some("delivered"), &sold.body["keys"]));
    let p =
        api.get_order(pending.body["order_id"].as_str().unwrap(), pending.body["query_token"].as_str().unwrap()).await;
    assert_eq!(p.body["status"], "pending_payment");
    assert_eq!(api.product("p").await.body["available"], json!(18));
    assert_audit_ok(&api.audit().await);
}

/// A product whose record reached storage but whose actors were never started
/// (a creation cut short) is started by the product supervisor when it restarts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_order_supervisor_starts_products_it_finds_only_in_storage() {
    let t = TestApp::spawn_with(&[("chaos.enabled", "true")]).await;
    let api = t.api();
    let orphan = kami::domain::ProductInfo {
        id: "orphan".into(),
        name: "Orphan".into(),
        price_cents: 5,
        per_buyer_limit: 0,
        shards: 2,
        created_at_ms: 0,
    };
    assert!(t.core().storage().insert_product(&orphan).unwrap());
    assert_eq!(api.product("orphan").await.status, 404, "not started yet");

    assert_eq!(t.core().chaos_kill(&kami::chaos::KillTarget::Orders).await.unwrap(), "orders");
    // The restart happens before the supervisor's next message is handled.
    assert_eq!(api.create_product("next", 100, 0, 1).await.status, 201);
    let p = api.product("orphan").await;
    assert_eq!((p.status, &p.body["available"]), (200, &json!(0)));
    assert_eq!(api.import("orphan", &["a".to_string(), "b".to_string()]).await.body["imported"], json!(2));
    assert_eq!(api.buy("orphan", "zoe").await.body["status"], "delivered");
}
