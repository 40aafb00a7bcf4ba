//! The sandbox gateway as the external party: started on loopback, wired to a
//! test kami as one of its channels, and the buyer's steps at it.

use std::time::Duration;

use kami::sandbox::{RunningSandbox, SandboxConfig};
use serde_json::Value;

use super::*;

pub async fn gateway(secret: &str) -> RunningSandbox {
    kami::sandbox::start(SandboxConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        notify_url: String::new(),
        secret: secret.into(),
        max_payments: 100_000,
        max_attempts: 8,
        protocol: kami::sandbox::Protocol::Kami,
    })
    .await
    .unwrap()
}

/// A kami whose `sandbox` channel is a sandbox gateway, notifications wired back.
pub async fn shop(extra: &[(&str, &str)]) -> (RunningSandbox, TestApp) {
    let gw = gateway(SECRET).await;
    let url = gw.url();
    let mut settings = vec![("payments.channels.sandbox.endpoint", url.as_str())];
    settings.extend_from_slice(extra);
    let t = TestApp::spawn_with(&settings).await;
    gw.set_notify_url(&format!("{}/api/v1/payments/sandbox/notify", t.url));
    (gw, t)
}

/// Opens the order's pay URL (retrying while the gateway answers 5xx, bounded)
/// and pays; returns the gateway's payment id.
pub async fn pay_at_gateway(api: &Api, gw: &RunningSandbox, order: &Reply) -> String {
    let pay_url = order.body["payment"]["pay_url"].as_str().expect("pay_url in the order");
    assert!(pay_url.starts_with(&gw.url()), "{pay_url} is not on {}", gw.url());
    let mut checkout = reply(api.http.get(pay_url)).await;
    for _ in 0..100 {
        if checkout.status < 500 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        checkout = reply(api.http.get(pay_url)).await;
    }
    assert_eq!(checkout.status, 200, "{}", checkout.body);
    assert_eq!(checkout.body["amount_cents"], order.body["amount_cents"]);
    let payment_id = checkout.body["payment_id"].as_str().unwrap().to_string();
    let paid = reply(api.http.post(format!("{}/pay/{payment_id}", gw.url()))).await;
    assert_eq!(paid.body["status"], "paid");
    payment_id
}

/// Waits (bounded) until the order reaches `status`; returns the buyer's view.
pub async fn reaches(api: &Api, order: &Reply, status: &str, limit: Duration) -> Value {
    let (id, token) = (order.body["order_id"].as_str().unwrap(), order.body["query_token"].as_str().unwrap());
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let o = api.get_order(id, token).await;
        if o.body["status"] == status {
            return o.body;
        }
        assert!(tokio::time::Instant::now() < deadline, "order {id} not {status}: {}", o.body);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub async fn delivered(api: &Api, order: &Reply) -> Value {
    reaches(api, order, "delivered", Duration::from_secs(20)).await
}
