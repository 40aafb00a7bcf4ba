//! A panic inside a stock actor must not leave its product without an actor, and
//! the restarted actor must rebuild from storage, not from the memory it had.

mod common;

use common::*;
use kami::actors::shard::{InjectPanic, Kill};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panicked_stock_actor_is_rebuilt_from_storage() {
    let t = TestApp::spawn().await;
    let api = t.api();
    api.product_with_keys("p", 3, 0).await;
    let first = api.buy("p", "alice").await;
    assert_eq!(first.body["status"], "delivered");
    let pending = api.order("p", 1, "bob", None).await;

    let shard = t.core().registry().get("p").unwrap();
    let answer = shard.shards[0].addr.send(InjectPanic).await.expect("the actor answers before stopping");
    assert!(answer.is_err(), "a panicking step is refused, not answered as success");

    // The same address serves again, with the state it had on disk.
    let after = api.admin_order(first.body["order_id"].as_str().unwrap()).await;
    assert_eq!(after.status, 200, "{}", after.body);
    assert_eq!(after.body["keys"], first.body["keys"]);
    let p = api.admin_order(pending.body["order_id"].as_str().unwrap()).await;
    assert_eq!(p.body["status"], "pending_payment");
    assert_eq!(api.buy("p", "carol").await.body["status"], "delivered");
    let audit = api.audit().await;
    assert_audit_ok(&audit);
    assert_eq!(
        audit.body["products"][0],
        json!({"id": "p", "imported": 3, "available": 0, "reserved": 1, "sold": 2, "in_transit": 0, "withdrawn": 0,
            "orders_in_memory": 3, "orders_archived": 0})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_stock_actor_restarts_and_keeps_serving() {
    let t = TestApp::spawn().await;
    let api = t.api();
    api.product_with_keys("p", 50, 0).await;
    let shard = t.core().registry().get("p").unwrap();
    for round in 0..5 {
        let bought = api.buy("p", &format!("buyer{round}")).await;
        assert_eq!(bought.body["status"], "delivered");
        shard.shards[0].addr.send(Kill).await.unwrap();
    }
    let audit = api.audit().await;
    assert_audit_ok(&audit);
    assert_eq!(audit.body["products"][0]["sold"], json!(5));
}
