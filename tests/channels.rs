//! Real payment channels — Alipay, WeChat Pay API v3, Stripe — against the sandbox
//! playing each gateway with keys made for the run: a purchase paid end to end
//! through each, notifications forged, tampered with, malformed or of another kind
//! refused before anything changes, lost notifications found by each gateway's
//! query, refunds through each, and fail-over from Alipay to WeChat Pay.

mod common;

use std::time::Duration;

use common::*;
use kami::config::ChannelKind;
use kami::sandbox::gateways::{generate, Notice};
use kami::sandbox::{Faults, Protocol, RunningSandbox, SandboxConfig};
use serde_json::{json, Value};

const FAST: &[(&str, &str)] = &[
    ("payments.query_after_ms", "100"),
    ("payments.query_max_interval_ms", "400"),
    ("payments.sweep_interval_ms", "50"),
    ("payments.health_interval_ms", "50"),
    ("payments.breaker.max_consecutive_failures", "2"),
    ("payments.breaker.cooldown_ms", "300"),
    ("payments.channels.sandbox.priority", "9"),
];

struct Gw {
    name: &'static str,
    kind: ChannelKind,
    sim: RunningSandbox,
}

struct Shop {
    gws: Vec<Gw>,
    t: TestApp,
    _keys: tempfile::TempDir,
}

impl Shop {
    fn gw(&self, name: &str) -> &Gw {
        self.gws.iter().find(|g| g.name == name).expect("a channel of the shop")
    }
}

/// A kami with one channel per `(kind, name, priority)`, each paid through its own
/// simulator, notifications wired back; the first is the default channel.
async fn shop(channels: &[(ChannelKind, &'static str, u32)], extra: &[(&str, &str)]) -> Shop {
    let keys = tempfile::tempdir().unwrap();
    let mut settings: Vec<(String, String)> = FAST.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    settings.push(("payments.default_channel".into(), channels[0].1.into()));
    let mut gws = Vec::new();
    for &(kind, name, priority) in channels {
        let dir = keys.path().to_path_buf();
        let (protocol, channel) =
            tokio::task::spawn_blocking(move || generate(kind, name, &dir)).await.unwrap().unwrap();
        let sim = kami::sandbox::start(SandboxConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            notify_url: String::new(),
            secret: String::new(),
            max_payments: 10_000,
            max_attempts: 8,
            protocol,
        })
        .await
        .unwrap();
        let endpoint = if kind == ChannelKind::Alipay { format!("{}/gateway.do", sim.url()) } else { sim.url() };
        settings.extend(channel);
        settings.push((format!("payments.channels.{name}.endpoint"), endpoint));
        settings.push((format!("payments.channels.{name}.priority"), priority.to_string()));
        settings.push((format!("payments.channels.{name}.timeout_ms"), "1000".into()));
        gws.push(Gw { name, kind, sim });
    }
    settings.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let borrowed: Vec<(&str, &str)> = settings.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let t = TestApp::spawn_with(&borrowed).await;
    for g in &gws {
        g.sim.set_notify_url(&format!("{}/api/v1/payments/{}/notify", t.url, g.name));
    }
    Shop { gws, t, _keys: keys }
}

const ALL: &[(ChannelKind, &str, u32)] =
    &[(ChannelKind::Alipay, "ali", 0), (ChannelKind::Wechatpay, "wx", 1), (ChannelKind::Stripe, "st", 2)];

async fn pay_link(api: &Api, order: &Reply, channel: Option<&str>) -> Reply {
    let id = order.body["order_id"].as_str().unwrap();
    let body = channel.map(|c| json!({"channel": c})).unwrap_or(json!({}));
    let r = api
        .http
        .post(format!("{}/api/v1/orders/{id}/pay", api.url))
        .header("X-Order-Token", order.body["query_token"].as_str().unwrap())
        .json(&body);
    reply(r).await
}

/// Asks kami for a pay link on `g` and opens it as the buyer would: the payment
/// exists at the gateway afterwards (not paid yet). Returns the gateway's payment id.
async fn open_pay_link(api: &Api, g: &Gw, order: &Reply) -> String {
    let link = pay_link(api, order, Some(g.name)).await;
    assert_eq!(link.status, 200, "{}", link.body);
    assert_eq!((link.body["channel"].as_str(), link.body["kind"].as_str()), (Some(g.name), Some(g.kind.as_str())));
    payment_of_link(api, g, &link.body, order).await
}

async fn payment_of_link(api: &Api, g: &Gw, link: &Value, order: &Reply) -> String {
    match g.kind {
        ChannelKind::Alipay => {
            let url = link["pay_url"].as_str().expect("an Alipay page pay URL");
            assert!(url.contains("method=alipay.trade.page.pay") && url.contains("sign="), "{url}");
            let page = reply(api.http.get(url)).await;
            assert_eq!(page.status, 200, "{}", page.body);
            assert_eq!(page.body["amount_cents"], order.body["amount_cents"], "the amount went to Alipay exactly");
            page.body["payment_id"].as_str().unwrap().to_string()
        }
        ChannelKind::Wechatpay => {
            let code = link["qr_code"].as_str().expect("a WeChat Pay Native code_url");
            code.strip_prefix("weixin://wxpay/bizpayurl?pr=").expect("a weixin:// code").to_string()
        }
        ChannelKind::Stripe => {
            let url = link["pay_url"].as_str().expect("a Checkout URL");
            url.rsplit('/').next().unwrap().to_string()
        }
        _ => unreachable!(),
    }
}

/// The buyer pays at the gateway; the gateway notifies kami.
async fn pay(api: &Api, g: &Gw, payment_id: &str) {
    let paid = reply(api.http.post(format!("{}/pay/{payment_id}", g.sim.url()))).await;
    assert_eq!(paid.body["status"], "paid", "{}", paid.body);
}

fn at_gateway(g: &Gw, payment_id: &str) -> kami::sandbox::SandboxPayment {
    g.sim.payments().into_iter().find(|p| p.payment_id == payment_id).expect("payment at the gateway")
}

/// Posts a notification as the gateway would; returns status and body text.
async fn post_notice(api: &Api, channel: &str, notice: &Notice) -> (u16, String) {
    let mut r = api.http.post(format!("{}/api/v1/payments/{channel}/notify", api.url)).body(notice.body.clone());
    for (name, value) in &notice.headers {
        r = r.header(name.as_str(), value.as_str());
    }
    let resp = r.send().await.unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

fn error_code(text: &str) -> String {
    let v: Value = serde_json::from_str(text).unwrap_or(Value::Null);
    v["error"]["code"].as_str().unwrap_or("").to_string()
}

async fn reaches(api: &Api, order: &Reply, status: &str) -> Value {
    common::gateway::reaches(api, order, status, Duration::from_secs(20)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purchase_paid_through_each_kind_is_delivered_and_the_gateway_is_answered_as_it_expects() {
    let s = shop(ALL, &[]).await;
    let api = s.t.api();
    let keys = api.product_with_keys("p", 4, 0).await;
    for g in &s.gws {
        let order = api.order("p", 1, &format!("buyer-{}", g.name), None).await;
        assert_eq!(order.status, 201, "{}", order.body);
        assert!(order.body["payment"]["pay_url"].is_null(), "no gateway call on the order path: {}", order.body);
        let payment_id = open_pay_link(&api, g, &order).await;
        // Asking again answers the same payment (the gateway dedupes by merchant order).
        assert_eq!(open_pay_link(&api, g, &order).await, payment_id, "{}", g.name);
        pay(&api, g, &payment_id).await;
        let delivered = reaches(&api, &order, "delivered").await;
        assert!(keys.contains(&delivered["keys"][0].as_str().unwrap().to_string()), "{delivered}");
        let admin = api.admin_order(order.body["order_id"].as_str().unwrap()).await;
        assert_eq!(admin.body["payment_id"], payment_id.as_str(), "{}", admin.body);
        // Every notification was answered as that gateway counts handled (Alipay:
        // the exact text `success`); Stripe sends two events for one payment.
        let expected = if g.kind == ChannelKind::Stripe { 2 } else { 1 };
        let p = at_gateway(g, &payment_id);
        let acked = api
            .eventually(Duration::from_secs(10), || async {
                at_gateway(g, &payment_id).notifications_acked >= expected
            })
            .await;
        assert!(acked, "{}: {:?}", g.name, p);
        // A pay link for an order no longer pending is refused.
        let again = pay_link(&api, &order, Some(g.name)).await;
        assert_eq!((again.status, again.code()), (409, "invalid_state"), "{}", again.body);
    }
    let wrong_token =
        api.http.post(format!("{}/api/v1/orders/p.0.1/pay", api.url)).header("X-Order-Token", "nope").json(&json!({}));
    assert_eq!(reply(wrong_token).await.status, 404);
    let order = api.order("p", 1, "bad-bodies", None).await;
    let id = order.body["order_id"].as_str().unwrap();
    let token = order.body["query_token"].as_str().unwrap();
    for (body, status, code) in [("{", 400, "malformed_json"), (r#"{"chanel": "ali"}"#, 422, "invalid_request")] {
        let r = api.http.post(format!("{}/api/v1/orders/{id}/pay", api.url)).header("X-Order-Token", token).body(body);
        let r = reply(r).await;
        assert_eq!((r.status, r.code()), (status, code), "{body}: {}", r.body);
    }
    let unknown = pay_link(&api, &order, Some("nope")).await;
    assert_eq!((unknown.status, unknown.code()), (404, "unknown_channel"), "{}", unknown.body);
    api.cancel(id, token).await;
    let audit = api.audit().await;
    assert_audit_ok(&audit);
    assert_eq!(audit.body["products"][0]["sold"], json!(3));
}

/// Re-signs an Alipay notification's parameters with `key` (after `change`).
fn alipay_resigned(
    notice: &Notice,
    key: &kami::payments::keys::PrivateKey,
    change: impl Fn(&mut Vec<(String, String)>),
) -> Notice {
    let mut params: Vec<(String, String)> = serde_urlencoded::from_bytes(&notice.body).unwrap();
    change(&mut params);
    params.retain(|(k, _)| k != "sign");
    let content = kami::payments::alipay::sign_content(
        params.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        &["sign", "sign_type"],
    );
    params.push(("sign".into(), key.sign(content.as_bytes())));
    Notice {
        headers: notice.headers.clone(),
        body: serde_urlencoded::to_string(&params).unwrap().into_bytes(),
        success: None,
    }
}

fn set(params: &mut [(String, String)], name: &str, value: &str) {
    params.iter_mut().find(|(k, _)| k == name).expect("parameter present").1 = value.to_string();
}

fn header_set(notice: &Notice, name: &str, value: String) -> Notice {
    let mut headers: Vec<(String, String)> = notice.headers.iter().filter(|(k, _)| k != name).cloned().collect();
    headers.push((name.to_string(), value));
    Notice { headers, body: notice.body.clone(), success: None }
}

fn with_body(notice: &Notice, body: Vec<u8>) -> Notice {
    Notice { headers: notice.headers.clone(), body, success: None }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_tampered_malformed_or_foreign_notifications_are_refused_and_change_nothing() {
    let s = shop(ALL, &[]).await;
    let api = s.t.api();
    api.product_with_keys("p", 3, 0).await;
    let (stranger, _) = kami::payments::keys::generate_pem_pair();
    let stranger = kami::payments::keys::PrivateKey::parse(&stranger).unwrap();
    for g in &s.gws {
        let order = api.order("p", 1, &format!("buyer-{}", g.name), None).await;
        let payment_id = open_pay_link(&api, g, &order).await;
        let genuine = g.sim.notices(&payment_id).remove(0);
        let mut refusals: Vec<(&str, Notice, u16, &str)> = Vec::new();
        match g.sim.protocol() {
            Protocol::Alipay(side) => {
                let tampered = {
                    let mut params: Vec<(String, String)> = serde_urlencoded::from_bytes(&genuine.body).unwrap();
                    set(&mut params, "total_amount", "0.01");
                    with_body(&genuine, serde_urlencoded::to_string(&params).unwrap().into_bytes())
                };
                refusals.push(("amount changed", tampered, 401, "bad_signature"));
                refusals.push((
                    "signed by a stranger",
                    alipay_resigned(&genuine, &stranger, |_| {}),
                    401,
                    "bad_signature",
                ));
                for amount in ["9.999", "1e1", "-9.90", "9.9000001"] {
                    let bad = alipay_resigned(&genuine, &side.alipay_key, |p| set(p, "total_amount", amount));
                    refusals.push(("an inexact amount, genuinely signed", bad, 400, "invalid_request"));
                }
                let other_app = alipay_resigned(&genuine, &side.alipay_key, |p| set(p, "app_id", "2021999999999999"));
                refusals.push(("for another app", other_app, 400, "invalid_request"));
                refusals.push((
                    "no signature",
                    with_body(&genuine, b"trade_status=TRADE_SUCCESS".to_vec()),
                    401,
                    "bad_signature",
                ));
            }
            Protocol::Wechatpay(side) => {
                let mut body: Value = serde_json::from_slice(&genuine.body).unwrap();
                body["resource"]["associated_data"] = json!("tampered");
                refusals.push((
                    "body changed",
                    with_body(&genuine, body.to_string().into_bytes()),
                    401,
                    "bad_signature",
                ));
                let ts = genuine.headers.iter().find(|(k, _)| k == "wechatpay-timestamp").unwrap().1.clone();
                let nonce = genuine.headers.iter().find(|(k, _)| k == "wechatpay-nonce").unwrap().1.clone();
                let message = kami::payments::wechatpay::answer_message(&ts, &nonce, &genuine.body);
                let forged = header_set(&genuine, "wechatpay-signature", stranger.sign(&message));
                refusals.push(("signed by a stranger", forged, 401, "bad_signature"));
                refusals.push((
                    "another platform key id",
                    header_set(&genuine, "wechatpay-serial", "PUB_KEY_ID_OTHER".into()),
                    401,
                    "bad_signature",
                ));
                // Genuinely signed, but a resource that does not decrypt, and a stale one.
                let resign = |body: &[u8], ts: i64| {
                    let (ts, nonce) = (ts.to_string(), "N0NCE".to_string());
                    let sig = side.platform_key.sign(&kami::payments::wechatpay::answer_message(&ts, &nonce, body));
                    let n = header_set(&with_body(&genuine, body.to_vec()), "wechatpay-timestamp", ts);
                    let n = header_set(&n, "wechatpay-nonce", nonce);
                    header_set(&n, "wechatpay-signature", sig)
                };
                let mut undecryptable: Value = serde_json::from_slice(&genuine.body).unwrap();
                undecryptable["resource"]["associated_data"] = json!("tampered");
                refusals.push((
                    "a resource that does not decrypt",
                    resign(undecryptable.to_string().as_bytes(), now_secs()),
                    400,
                    "invalid_request",
                ));
                refusals.push(("not JSON", resign(b"{not json", now_secs()), 400, "invalid_request"));
                refusals.push(("six minutes old", resign(&genuine.body, now_secs() - 360), 400, "stale_request"));
            }
            Protocol::Stripe(side) => {
                let mut body: Value = serde_json::from_slice(&genuine.body).unwrap();
                body["data"]["object"]["amount_received"] = json!(1);
                refusals.push((
                    "amount changed",
                    with_body(&genuine, body.to_string().into_bytes()),
                    401,
                    "bad_signature",
                ));
                let sign = |secret: &[u8], body: &[u8], t: i64| {
                    header_set(
                        &with_body(&genuine, body.to_vec()),
                        "stripe-signature",
                        kami::payments::stripe::signature_header(secret, t, body),
                    )
                };
                refusals.push((
                    "signed with another secret",
                    sign(b"whsec_stranger", &genuine.body, now_secs()),
                    401,
                    "bad_signature",
                ));
                refusals.push((
                    "not JSON",
                    sign(&side.webhook_secret, b"{not json", now_secs()),
                    400,
                    "invalid_request",
                ));
                refusals.push((
                    "six minutes old",
                    sign(&side.webhook_secret, &genuine.body, now_secs() - 360),
                    400,
                    "stale_request",
                ));
                let mut other_currency: Value = serde_json::from_slice(&genuine.body).unwrap();
                other_currency["data"]["object"]["currency"] = json!("usd");
                let other_currency = sign(&side.webhook_secret, other_currency.to_string().as_bytes(), now_secs());
                refusals.push(("another currency", other_currency, 400, "invalid_request"));
            }
            Protocol::Kami => unreachable!(),
        }
        for (what, notice, status, code) in &refusals {
            let (got, text) = post_notice(&api, g.name, notice).await;
            assert_eq!((got, error_code(&text).as_str()), (*status, *code), "{}: {what}: {text}", g.name);
            if g.kind == ChannelKind::Wechatpay {
                assert!(text.contains("\"code\":\"FAIL\""), "WeChat Pay's failure reply: {text}");
            }
        }
        // The genuine notification sent to a channel of another kind: refused.
        for other in s.gws.iter().filter(|o| o.name != g.name) {
            let (got, text) = post_notice(&api, other.name, &genuine).await;
            assert_eq!(got, 401, "{} notification at {}: {text}", g.name, other.name);
        }
        // And kami's own protocol at a gateway channel.
        let own = api.notify_raw(g.name, br#"{"order_id":"p.0.1","payment_id":"x","amount_cents":990,"status":"paid","timestamp":0,"nonce":"n"}"#, SECRET).await;
        assert_eq!(own.status, 401, "{}", own.body);
        let o =
            api.get_order(order.body["order_id"].as_str().unwrap(), order.body["query_token"].as_str().unwrap()).await;
        assert_eq!(
            o.body["status"],
            "pending_payment",
            "{}: nothing changed after {} refusals",
            g.name,
            refusals.len()
        );
        // The genuine one is taken, and answered as the gateway expects.
        let (got, text) = post_notice(&api, g.name, &genuine).await;
        assert_eq!(got, 200, "{text}");
        match g.kind {
            ChannelKind::Alipay => assert_eq!(text, "success"),
            ChannelKind::Wechatpay => assert!(text.contains("\"code\":\"SUCCESS\""), "{text}"),
            _ => {}
        }
        reaches(&api, &order, "delivered").await;
    }
    assert_audit_ok(&api.audit().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_notifications_are_found_by_each_gateways_query() {
    let s = shop(ALL, &[]).await;
    let api = s.t.api();
    api.product_with_keys("p", 3, 0).await;
    for g in &s.gws {
        g.sim.set_faults(Faults { drop_notifications: true, ..Faults::default() });
        let order = api.order("p", 1, &format!("buyer-{}", g.name), None).await;
        let payment_id = open_pay_link(&api, g, &order).await;
        pay(&api, g, &payment_id).await;
        reaches(&api, &order, "delivered").await;
        let p = at_gateway(g, &payment_id);
        assert_eq!((p.notifications_sent, p.status.as_str()), (0, "paid"), "{}: found by query, not told", g.name);
        let admin = api.admin_order(order.body["order_id"].as_str().unwrap()).await;
        assert_eq!(admin.body["payment_id"], payment_id.as_str());
    }
    let audit = api.audit().await;
    assert_audit_ok(&audit);
    assert_eq!(audit.body["products"][0]["sold"], json!(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payment_kami_cannot_serve_is_refunded_through_each_gateway_once() {
    let s = shop(ALL, &[]).await;
    let api = s.t.api();
    for g in &s.gws {
        let product = format!("p{}", g.name);
        api.product_with_keys(&product, 1, 0).await;
        // A pays late: A's order was cancelled and B bought the only key meanwhile.
        let a = api.order(&product, 1, "a", None).await;
        let a_payment = open_pay_link(&api, g, &a).await;
        let cancelled = api.cancel(a.body["order_id"].as_str().unwrap(), a.body["query_token"].as_str().unwrap()).await;
        assert_eq!(cancelled.status, 200, "{}", cancelled.body);
        let b = api.order(&product, 1, "b", None).await;
        let b_payment = open_pay_link(&api, g, &b).await;
        pay(&api, g, &b_payment).await;
        reaches(&api, &b, "delivered").await;
        pay(&api, g, &a_payment).await;
        reaches(&api, &a, "refunded").await;
        let refunded =
            api.eventually(Duration::from_secs(10), || async { at_gateway(g, &a_payment).status == "refunded" }).await;
        assert!(refunded, "{}: {:?}", g.name, at_gateway(g, &a_payment));
        assert_eq!(at_gateway(g, &a_payment).refunds, 1, "{}: refunded once", g.name);
        assert_eq!(at_gateway(g, &b_payment).status, "paid");
    }
    let r = reply(api.admin(api.http.post(format!("{}/api/v1/admin/reconcile", api.url)))).await;
    assert_eq!(r.body["refunds_pending"], json!([]), "{}", r.body);
    assert_audit_ok(&api.audit().await);
}

async fn channel_state(api: &Api, name: &str) -> String {
    let r = reply(api.admin(api.http.get(format!("{}/api/v1/admin/payments/channels", api.url)))).await;
    let c = r.body["channels"].as_array().unwrap().iter().find(|c| c["name"] == name).expect("listed").clone();
    assert_eq!(c["kind"], if name == "ali" { "alipay" } else { "wechatpay" });
    assert!(c["endpoint"].as_str().is_some_and(|e| e.starts_with("http://127.0.0.1:")), "{c}");
    c["state"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alipay_channel_with_its_breaker_open_fails_over_to_wechat_pay_for_new_orders() {
    let s = shop(&[(ChannelKind::Alipay, "ali", 0), (ChannelKind::Wechatpay, "wx", 1)], &[]).await;
    let api = s.t.api();
    api.product_with_keys("p", 3, 0).await;
    let before = api.order("p", 1, "before", None).await;
    assert_eq!(before.body["payment"]["channel"], "ali", "{}", before.body);

    s.gw("ali").sim.set_faults(Faults { api_5xx: true, ..Faults::default() });
    let opened = api.eventually(Duration::from_secs(20), || async { channel_state(&api, "ali").await == "open" }).await;
    assert!(opened, "the Alipay channel's breaker opened on its 5xx health checks");
    let during = api.order("p", 1, "during", None).await;
    assert_eq!(during.body["payment"]["channel"], "wx", "{}", during.body);
    // With no channel named, the pay link comes from the channel routing picks.
    let link = pay_link(&api, &during, None).await;
    assert_eq!((link.status, link.body["kind"].as_str()), (200, Some("wechatpay")), "{}", link.body);
    let wx = s.gw("wx");
    let payment_id = payment_of_link(&api, wx, &link.body, &during).await;
    pay(&api, wx, &payment_id).await;
    reaches(&api, &during, "delivered").await;

    s.gw("ali").sim.set_faults(Faults::default());
    let closed =
        api.eventually(Duration::from_secs(20), || async { channel_state(&api, "ali").await == "closed" }).await;
    assert!(closed, "a probe closed the breaker again");
    let after = api.order("p", 1, "after", None).await;
    assert_eq!(after.body["payment"]["channel"], "ali", "{}", after.body);
    let ali = s.gw("ali");
    let payment_id = open_pay_link(&api, ali, &after).await;
    pay(&api, ali, &payment_id).await;
    reaches(&api, &after, "delivered").await;
    assert_audit_ok(&api.audit().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_key_file_stops_kami_at_start_naming_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let (_, mut channel) = generate(ChannelKind::Wechatpay, "wx", dir.path()).unwrap();
    for (k, v) in channel.iter_mut() {
        if k.ends_with("apiv3_key_file") {
            *v = dir.path().join("missing").display().to_string();
        }
    }
    let borrowed: Vec<(&str, &str)> = channel.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let settings = common::settings(&dir.path().join("data"), &borrowed);
    let err = kami::start(settings).await.err().expect("kami refuses to start").to_string();
    assert!(err.contains("payments.channels.wx.apiv3_key_file") && err.contains("missing"), "{err}");

    let mut missing = vec![("payments.channels.st.kind", "stripe")];
    missing.push(("payments.channels.st.secret_key_file", "/dev/null"));
    let err = kami::Settings::load(&kami::Sources {
        overrides: missing.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        ..Default::default()
    })
    .expect_err("validation refuses")
    .to_string();
    assert!(err.contains("st.webhook_secret_file"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inside_wechat_a_jsapi_payment_gets_merchant_signed_request_payment_parameters() {
    let s = shop(&[(ChannelKind::Wechatpay, "wx", 0), (ChannelKind::Alipay, "ali", 1)], &[]).await;
    let api = s.t.api();
    api.product_with_keys("p", 1, 0).await;
    let order = api.order("p", 1, "in-wechat", None).await;
    let ask = |body: Value| {
        let r = api
            .http
            .post(format!("{}/api/v1/orders/{}/pay", api.url, order.body["order_id"].as_str().unwrap()))
            .header("X-Order-Token", order.body["query_token"].as_str().unwrap())
            .json(&body);
        reply(r)
    };
    let refused = ask(json!({"channel": "ali", "openid": "oUpF8uMuAJO_M2pxb1Q9zNjWeS6o"})).await;
    assert_eq!((refused.status, refused.code()), (422, "invalid_request"), "{}", refused.body);
    let link = ask(json!({"channel": "wx", "openid": "oUpF8uMuAJO_M2pxb1Q9zNjWeS6o"})).await;
    assert_eq!(link.status, 200, "{}", link.body);
    let p = &link.body["jsapi"];
    let Protocol::Wechatpay(side) = s.gw("wx").sim.protocol() else { unreachable!() };
    assert_eq!((p["appId"].as_str(), p["signType"].as_str()), (Some(side.app_id.as_str()), Some("RSA")));
    let message = kami::payments::wechatpay::jsapi_message(
        p["appId"].as_str().unwrap(),
        p["timeStamp"].as_str().unwrap(),
        p["nonceStr"].as_str().unwrap(),
        p["package"].as_str().unwrap(),
    );
    assert!(
        side.merchant_key.verifies(message.as_bytes(), p["paySign"].as_str().unwrap()),
        "paySign by the merchant key"
    );
    let payment_id = p["package"].as_str().unwrap().strip_prefix("prepay_id=wx").expect("prepay_id").to_string();
    pay(&api, s.gw("wx"), &payment_id).await;
    reaches(&api, &order, "delivered").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alipay_and_wechat_pay_close_the_trade_when_the_order_expires_so_it_cannot_be_paid_late() {
    let s =
        shop(&[(ChannelKind::Alipay, "ali", 0), (ChannelKind::Wechatpay, "wx", 1)], &[("orders.ttl_secs", "1")]).await;
    let api = s.t.api();
    api.product_with_keys("p", 2, 0).await;
    for g in &s.gws {
        let order = api.order("p", 1, &format!("late-{}", g.name), None).await;
        let payment_id = open_pay_link(&api, g, &order).await;
        reaches(&api, &order, "expired").await;
        let late = reply(api.http.post(format!("{}/pay/{payment_id}", g.sim.url()))).await;
        assert_eq!((late.status, late.code()), (409, "invalid_state"), "{}: {}", g.name, late.body);
        let p = at_gateway(g, &payment_id);
        assert_eq!((p.status.as_str(), p.notifications_sent), ("closed", 0), "{}: {p:?}", g.name);
    }
    // Nothing was paid, so nothing is owed back; the keys went back to stock.
    let r = reply(api.admin(api.http.post(format!("{}/api/v1/admin/reconcile", api.url)))).await;
    assert_eq!(r.body["payments_found"], json!([]), "{}", r.body);
    let audit = api.audit().await;
    assert_audit_ok(&audit);
    assert_eq!(
        (audit.body["products"][0]["sold"].as_u64(), audit.body["orders"]["refund_pending"].as_u64()),
        (Some(0), Some(0))
    );
}
