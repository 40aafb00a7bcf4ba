//! The sandbox gateway as the external party, on loopback: the buyer opens the
//! signed pay URL from the order, pays there, and the gateway's notification
//! delivers the key — also when every notification arrives 10 times, shuffled.

mod common;

use std::time::Duration;

use common::gateway::*;
use common::*;
use kami::sandbox::Faults;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payment_at_the_gateway_delivers_the_key() {
    let (gw, t) = shop(&[]).await;
    let api = t.api();
    let keys = api.product_with_keys("p", 2, 0).await;
    let order = api.order("p", 1, "alice", None).await;
    assert_eq!(order.body["payment"]["channel"], "sandbox");
    let payment_id = pay_at_gateway(&api, &gw, &order).await;
    let o = delivered(&api, &order).await;
    assert_eq!(o["keys"][0], keys[0].as_str());
    let admin = api.admin_order(order.body["order_id"].as_str().unwrap()).await;
    assert_eq!(admin.body["payment_id"], payment_id.as_str());

    // A pay URL whose amount was altered is refused by the gateway.
    let tampered = order.body["payment"]["pay_url"].as_str().unwrap().replace("amount_cents=990", "amount_cents=1");
    assert_eq!(reply(api.http.get(tampered)).await.status, 401);
    let unsigned = reply(api.http.get(format!("{}/checkout/p.0.1?amount_cents=x", gw.url()))).await;
    assert_eq!((unsigned.status, unsigned.code()), (422, "invalid_request"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_notification_ten_times_shuffled_delivers_once() {
    let (gw, t) = shop(&[]).await;
    let api = t.api();
    api.product_with_keys("p", 40, 0).await;
    gw.set_faults(Faults { repeat: 10, reorder: true, ..Faults::default() });
    let mut orders = Vec::new();
    for i in 0..30 {
        let o = api.order("p", 1, &format!("b{i}"), None).await;
        pay_at_gateway(&api, &gw, &o).await;
        orders.push(o);
    }
    let mut keys = std::collections::HashSet::new();
    for o in &orders {
        let got = delivered(&api, o).await;
        assert!(keys.insert(got["keys"][0].as_str().unwrap().to_string()), "a key delivered twice");
    }
    // Every copy was answered 2xx (repeats are acknowledged, unchanged).
    let all_acked = api
        .eventually(Duration::from_secs(20), || async {
            gw.payments().iter().all(|p| p.notifications_acked == 10 && p.notifications_sent == 10)
        })
        .await;
    assert!(
        all_acked,
        "{:?}",
        gw.payments().iter().map(|p| (p.notifications_sent, p.notifications_acked)).collect::<Vec<_>>()
    );
    let audit = api.audit().await;
    assert_audit_ok(&audit);
    assert_eq!(audit.body["products"][0]["sold"], serde_json::json!(30));
    assert_eq!(audit.body["orders"]["delivered"], serde_json::json!(30));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_faults_are_bounded() {
    let (gw, t) = shop(&[]).await;
    let api = t.api();
    let set = |body: serde_json::Value| reply(api.http.post(format!("{}/faults", gw.url())).json(&body));
    assert_eq!(set(serde_json::json!({"repeat": 1000})).await.status, 422);
    assert_eq!(set(serde_json::json!({"api_hang_ms": 3_600_000})).await.status, 422);
    assert_eq!(set(serde_json::json!({"nonsense": true})).await.status, 422);
    let ok = set(serde_json::json!({"repeat": 3, "drop_notifications": true})).await;
    assert_eq!((ok.status, &ok.body["repeat"]), (200, &serde_json::json!(3)));
    assert_eq!(reply(api.http.get(format!("{}/faults", gw.url()))).await.body["drop_notifications"], true);
}
