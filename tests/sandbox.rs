//! The sandbox gateway as the external party, on loopback: the buyer opens the
//! signed pay URL from the order, pays there, and the gateway's notification
//! delivers the key — also when every notification arrives 10 times, shuffled.

mod common;

use std::time::Duration;

use common::*;
use kami::sandbox::{Faults, RunningSandbox, SandboxConfig};
use serde_json::Value;

async fn shop() -> (RunningSandbox, TestApp) {
    let gw = kami::sandbox::start(SandboxConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        notify_url: String::new(),
        secret: SECRET.into(),
        max_payments: 100_000,
        max_attempts: 8,
    })
    .await
    .unwrap();
    let url = gw.url();
    let t = TestApp::spawn_with(&[("payments.channels.sandbox.endpoint", url.as_str())]).await;
    gw.set_notify_url(&format!("{}/api/v1/payments/sandbox/notify", t.url));
    (gw, t)
}

/// Opens the order's pay URL and pays; returns the gateway's payment id.
async fn pay_at_gateway(api: &Api, gw: &RunningSandbox, order: &Reply) -> String {
    let pay_url = order.body["payment"]["pay_url"].as_str().expect("pay_url in the order");
    assert!(pay_url.starts_with(&gw.url()), "{pay_url}");
    let checkout = reply(api.http.get(pay_url)).await;
    assert_eq!(checkout.status, 200, "{}", checkout.body);
    assert_eq!(checkout.body["amount_cents"], order.body["amount_cents"]);
    let payment_id = checkout.body["payment_id"].as_str().unwrap().to_string();
    let paid = reply(api.http.post(format!("{}/pay/{payment_id}", gw.url()))).await;
    assert_eq!(paid.body["status"], "paid");
    payment_id
}

async fn delivered(api: &Api, order: &Reply) -> Value {
    let (id, token) = (order.body["order_id"].as_str().unwrap(), order.body["query_token"].as_str().unwrap());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let o = api.get_order(id, token).await;
        if o.body["status"] == "delivered" {
            return o.body;
        }
        assert!(tokio::time::Instant::now() < deadline, "order {id} not delivered: {}", o.body);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payment_at_the_gateway_delivers_the_key() {
    let (gw, t) = shop().await;
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
    let (gw, t) = shop().await;
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
    let (gw, t) = shop().await;
    let api = t.api();
    let set = |body: serde_json::Value| reply(api.http.post(format!("{}/faults", gw.url())).json(&body));
    assert_eq!(set(serde_json::json!({"repeat": 1000})).await.status, 422);
    assert_eq!(set(serde_json::json!({"api_hang_ms": 3_600_000})).await.status, 422);
    assert_eq!(set(serde_json::json!({"nonsense": true})).await.status, 422);
    let ok = set(serde_json::json!({"repeat": 3, "drop_notifications": true})).await;
    assert_eq!((ok.status, &ok.body["repeat"]), (200, &serde_json::json!(3)));
    assert_eq!(reply(api.http.get(format!("{}/faults", gw.url()))).await.body["drop_notifications"], true);
}
