//! criterion benches of the real gateways' cryptography, per call: verifying an
//! Alipay notification (RSA2), a WeChat Pay notification (SHA256withRSA over the
//! headers + AES-256-GCM of the resource), a Stripe webhook (HMAC-SHA256), and the
//! merchant's RSA signature a pay link or a gateway call costs.
//! Run: `cargo bench --bench channels`. Under `cargo test --all-targets` each runs once.

use axum::http::{HeaderMap, HeaderValue};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kami::payments::alipay::{sign_content, Alipay};
use kami::payments::keys::{generate_pem_pair, PrivateKey, PublicKey};
use kami::payments::stripe::{signature_header, SecretKey, Stripe};
use kami::payments::wechatpay::{answer_message, ApiV3Key, Wechatpay};
use serde_json::json;

fn keys() -> (PrivateKey, PublicKey) {
    let (private, public) = generate_pem_pair();
    (PrivateKey::parse(&private).unwrap(), PublicKey::parse(&public).unwrap())
}

fn channels(c: &mut Criterion) {
    let (merchant, merchant_public) = keys();
    let (platform, platform_public) = keys();
    let _ = merchant_public;
    let now = chrono::Utc::now().timestamp();
    let mut g = c.benchmark_group("channels");
    g.throughput(Throughput::Elements(1));

    let alipay = Alipay {
        gateway: "http://127.0.0.1:1/gateway.do".into(),
        app_id: "2021000000000001".into(),
        private_key: merchant.clone(),
        alipay_key: platform_public.clone(),
        notify_url: String::new(),
        return_url: String::new(),
    };
    let mut params = vec![
        ("notify_time", "2026-12-01 10:15:00"),
        ("notify_type", "trade_status_sync"),
        ("notify_id", "ac05099524730693a8b330c5ecf72da9786"),
        ("app_id", "2021000000000001"),
        ("charset", "utf-8"),
        ("version", "1.0"),
        ("trade_no", "2026120122001404020000000001"),
        ("out_trade_no", "flash_0_17"),
        ("total_amount", "9.90"),
        ("trade_status", "TRADE_SUCCESS"),
        ("passback_params", "flash.0.17"),
    ];
    let sign = platform.sign(sign_content(params.iter().copied(), &["sign", "sign_type"]).as_bytes());
    params.push(("sign_type", "RSA2"));
    params.push(("sign", &sign));
    let body = serde_urlencoded::to_string(&params).unwrap().into_bytes();
    assert!(alipay.verify_notification(&body).unwrap().paid);
    g.bench_function("alipay_notification_verify", |b| b.iter(|| alipay.verify_notification(&body).unwrap()));

    let apiv3 = ApiV3Key::new(b"0123456789abcdef0123456789abcdef");
    let wechat = Wechatpay {
        base: "http://127.0.0.1:1".into(),
        app_id: "wxd678efh567hg6787".into(),
        merchant_id: "1900000109".into(),
        merchant_serial: "5157F09EFDC096DE15EBE81A47057A7232F1B8E1".into(),
        private_key: merchant.clone(),
        platform_key: platform_public.clone(),
        platform_key_id: "PUB_KEY_ID_1".into(),
        apiv3_key: apiv3.clone(),
        notify_url: String::new(),
    };
    let transaction = json!({"mchid": "1900000109", "appid": "wxd678efh567hg6787", "out_trade_no": "flash_0_17",
        "transaction_id": "4200002026202600000000000001", "trade_state": "SUCCESS", "attach": "flash.0.17",
        "amount": {"total": 990, "payer_total": 990, "currency": "CNY"}});
    let ciphertext = apiv3.encrypt("a1b2c3d4e5f6", "transaction", transaction.to_string().as_bytes());
    let body = serde_json::to_vec(&json!({"id": "EV-1", "event_type": "TRANSACTION.SUCCESS",
        "resource_type": "encrypt-resource", "resource": {"algorithm": "AEAD_AES_256_GCM",
        "ciphertext": ciphertext, "associated_data": "transaction", "nonce": "a1b2c3d4e5f6"}}))
    .unwrap();
    let ts = now.to_string();
    let mut headers = HeaderMap::new();
    headers.insert("wechatpay-timestamp", HeaderValue::from_str(&ts).unwrap());
    headers.insert("wechatpay-nonce", HeaderValue::from_static("N0NCE"));
    headers.insert("wechatpay-serial", HeaderValue::from_static("PUB_KEY_ID_1"));
    let signature = platform.sign(&answer_message(&ts, "N0NCE", &body));
    headers.insert("wechatpay-signature", HeaderValue::from_str(&signature).unwrap());
    let now_ms = now as u64 * 1000;
    assert!(wechat.verify_notification(&headers, &body, now_ms, 300).unwrap().paid);
    g.bench_function("wechatpay_notification_verify", |b| {
        b.iter(|| wechat.verify_notification(&headers, &body, now_ms, 300).unwrap())
    });

    let stripe = Stripe {
        base: "http://127.0.0.1:1".into(),
        secret_key: SecretKey::new("sk_test_x".into()),
        webhook_secrets: vec![b"whsec_test".to_vec()],
        currency: "usd".into(),
        success_url: String::new(),
    };
    let body = serde_json::to_vec(&json!({"id": "evt_1", "type": "payment_intent.succeeded", "data": {"object": {
        "id": "pi_1", "amount_received": 990, "currency": "usd", "metadata": {"order_id": "flash.0.17"}}}}))
    .unwrap();
    let mut headers = HeaderMap::new();
    headers.insert("stripe-signature", HeaderValue::from_str(&signature_header(b"whsec_test", now, &body)).unwrap());
    assert!(stripe.verify_webhook(&headers, &body, now_ms, 300).unwrap().paid);
    g.bench_function("stripe_webhook_verify", |b| {
        b.iter(|| stripe.verify_webhook(&headers, &body, now_ms, 300).unwrap())
    });

    let content = b"app_id=2021000000000001&biz_content={\"out_trade_no\":\"flash_0_17\",\"total_amount\":\"9.90\"}&charset=utf-8&method=alipay.trade.page.pay&sign_type=RSA2&timestamp=2026-12-01 10:15:00&version=1.0";
    g.bench_function("rsa2048_merchant_sign", |b| b.iter(|| merchant.sign(content)));
    g.finish();
}

criterion_group!(benches, channels);
criterion_main!(benches);
