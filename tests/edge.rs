//! The edge: rate limits per client IP and per buyer, tiers chosen by API key.

mod common;

use common::*;
use serde_json::json;

const PARTNER_KEY: &str = "partner-key-0123456789";

fn limited(extra: &[(&'static str, &'static str)]) -> Vec<(&'static str, &'static str)> {
    let mut v = vec![
        ("rate_limits.enabled", "true"),
        ("rate_limits.per_ip_per_sec", "1"),
        ("rate_limits.per_ip_burst", "1000"),
        ("rate_limits.per_buyer_per_sec", "1"),
        ("rate_limits.per_buyer_burst", "1000"),
    ];
    v.extend_from_slice(extra);
    v
}

/// Sends `send` until it is refused (at most `tries` times); the refusal. A bucket
/// refills one token per second, so on a slow machine a request may slip through
/// after the burst: the refusal must come, not at an exact count.
async fn first_refusal<F, Fut>(tries: usize, send: F) -> Reply
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Reply>,
{
    for _ in 0..tries {
        let r = send().await;
        if r.status != 200 && r.status != 201 {
            return r;
        }
    }
    panic!("never refused in {tries} tries");
}

fn retry_after(r: &Reply) -> u64 {
    r.headers.get("retry-after").expect("Retry-After").to_str().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_past_its_rate_gets_429_with_retry_after_and_admin_routes_are_not_limited() {
    let t = TestApp::spawn_with(&limited(&[("rate_limits.per_ip_burst", "5")])).await;
    let api = t.api();
    api.product_with_keys("p", 10, 0).await;
    // A burst of 5 at 1/s: the first 5 reads pass, then they are refused.
    for i in 0..5 {
        assert_eq!(api.product("p").await.status, 200, "read {i} within the burst");
    }
    let refused = first_refusal(10, || api.product("p")).await;
    assert_eq!((refused.status, refused.code()), (429, "rate_limited"), "{}", refused.body);
    assert!(retry_after(&refused) >= 1);
    // Orders from the same address are refused too, and reserve nothing.
    let r = first_refusal(10, || api.order("p", 1, "b1", None)).await;
    assert_eq!((r.status, r.code()), (429, "rate_limited"));
    // Merchant and operations routes are never rate limited.
    for _ in 0..20 {
        assert_eq!(api.audit().await.status, 200);
    }
    let audit = api.audit().await;
    assert_audit_ok(&audit);
    let orders = audit.body["orders"]["pending_payment"].as_u64().unwrap();
    assert_eq!(audit.body["products"][0]["reserved"], json!(orders), "refused orders reserved nothing");
    assert!(metric_value(&api.metrics().await, "kami_rate_limited_total") >= 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_buyer_past_their_rate_gets_429_while_other_buyers_go_on() {
    let t = TestApp::spawn_with(&limited(&[("rate_limits.per_buyer_burst", "3")])).await;
    let api = t.api();
    api.product_with_keys("p", 20, 0).await;
    for i in 0..3 {
        assert_eq!(api.order("p", 1, "eager", None).await.status, 201, "order {i}");
    }
    let r = first_refusal(10, || api.order("p", 1, "eager", None)).await;
    assert_eq!((r.status, r.code()), (429, "rate_limited"), "{}", r.body);
    assert!(retry_after(&r) >= 1);
    assert!(r.body["error"]["message"].as_str().unwrap().contains("buyer"));
    // Same address, another buyer: served.
    assert_eq!(api.order("p", 1, "patient", None).await.status, 201);
    let audit = api.audit().await;
    assert_audit_ok(&audit);
    let orders = audit.body["orders"]["pending_payment"].as_u64().unwrap();
    assert_eq!(audit.body["products"][0]["reserved"], json!(orders), "refused orders reserved nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storefront_api_key_selects_its_tier_and_an_unknown_key_is_refused() {
    let t = TestApp::spawn_with(&limited(&[
        ("rate_limits.per_ip_burst", "2"),
        ("rate_limits.tiers.partner.api_key", PARTNER_KEY),
        ("rate_limits.tiers.partner.per_ip_per_sec", "1"),
        ("rate_limits.tiers.partner.per_ip_burst", "50"),
        ("rate_limits.tiers.partner.per_buyer_per_sec", "1"),
        ("rate_limits.tiers.partner.per_buyer_burst", "2"),
    ]))
    .await;
    let api = t.api();
    api.product_with_keys("p", 20, 0).await;
    let partner_read =
        || reply(api.http.get(format!("{}/api/v1/products/p", api.url)).header("x-api-key", PARTNER_KEY));
    // 20 reads from one address: far past the default tier's burst of 2, within the partner's 50.
    for i in 0..20 {
        assert_eq!(partner_read().await.status, 200, "partner read {i}");
    }
    // The default tier's bucket for this address is separate and small.
    assert_eq!(api.product("p").await.status, 200);
    assert_eq!(api.product("p").await.status, 200);
    assert_eq!(first_refusal(10, || api.product("p")).await.status, 429);
    // The partner tier's own per-buyer limit applies to its orders.
    let partner_order = || {
        reply(
            api.http
                .post(format!("{}/api/v1/orders", api.url))
                .header("x-api-key", PARTNER_KEY)
                .json(&json!({"product_id": "p", "quantity": 1, "buyer": "b"})),
        )
    };
    assert_eq!(partner_order().await.status, 201);
    assert_eq!(partner_order().await.status, 201);
    assert_eq!(first_refusal(10, partner_order).await.status, 429);
    let wrong = reply(api.http.get(format!("{}/api/v1/products/p", api.url)).header("x-api-key", "guess")).await;
    assert_eq!((wrong.status, wrong.code()), (401, "invalid_api_key"));
}

#[test]
fn tiers_are_validated_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let load = |extra: &[(&str, &str)]| {
        let mut overrides: Vec<(String, String)> = vec![("storage.path".into(), dir.path().display().to_string())];
        overrides.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        kami::Settings::load(&kami::Sources { overrides, ..Default::default() })
    };
    let tier = |key: &'static str| {
        vec![
            ("rate_limits.tiers.t.api_key", key),
            ("rate_limits.tiers.t.per_ip_per_sec", "1"),
            ("rate_limits.tiers.t.per_ip_burst", "1"),
            ("rate_limits.tiers.t.per_buyer_per_sec", "1"),
            ("rate_limits.tiers.t.per_buyer_burst", "1"),
        ]
    };
    assert!(load(&tier(PARTNER_KEY)).is_ok());
    let e = load(&tier("short")).unwrap_err().to_string();
    assert!(e.contains("api_key"), "{e}");
    let e = load(&[("rate_limits.per_buyer_burst", "0")]).unwrap_err().to_string();
    assert!(e.contains("per_buyer_burst"), "{e}");
}
