//! Malformed, oversized, unauthenticated or forged requests: each gets its
//! 4xx JSON error, and nothing changes.

mod common;

use common::*;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_json_errors_and_change_nothing() {
    let t = TestApp::spawn().await;
    let api = t.api();
    api.product_with_keys("p", 5, 0).await;
    let o = api.order("p", 1, "alice", None).await;
    let order_id = o.body["order_id"].as_str().unwrap().to_string();
    let before = api.audit().await.body;
    let url = |path: &str| format!("{}{}", api.url, path);
    let h = &api.http;
    let long_key = "k".repeat(300);

    let order_body = |v: Value| h.post(url("/api/v1/orders")).json(&v);
    let cases: Vec<(&str, reqwest::RequestBuilder, u16, &str)> = vec![
        ("malformed JSON", h.post(url("/api/v1/orders")).body("{\"product_id\": "), 400, "malformed_json"),
        ("not an object", h.post(url("/api/v1/orders")).body("[1,2]"), 422, "invalid_request"),
        ("wrong type", order_body(json!({"product_id": "p", "quantity": "one", "buyer": "a"})), 422, "invalid_request"),
        ("missing field", order_body(json!({"product_id": "p", "buyer": "a"})), 422, "invalid_request"),
        (
            "unknown field",
            order_body(json!({"product_id": "p", "quantity": 1, "buyer": "a", "qty": 1})),
            422,
            "invalid_request",
        ),
        (
            "unknown product",
            order_body(json!({"product_id": "nope", "quantity": 1, "buyer": "a"})),
            404,
            "product_not_found",
        ),
        ("quantity 0", order_body(json!({"product_id": "p", "quantity": 0, "buyer": "a"})), 422, "invalid_request"),
        (
            "quantity 10^12",
            order_body(json!({"product_id": "p", "quantity": 1_000_000_000_000u64, "buyer": "a"})),
            422,
            "invalid_request",
        ),
        (
            "negative quantity",
            order_body(json!({"product_id": "p", "quantity": -1, "buyer": "a"})),
            422,
            "invalid_request",
        ),
        (
            "fractional quantity",
            order_body(json!({"product_id": "p", "quantity": 1.5, "buyer": "a"})),
            422,
            "invalid_request",
        ),
        ("empty buyer", order_body(json!({"product_id": "p", "quantity": 1, "buyer": ""})), 422, "invalid_request"),
        (
            "huge buyer",
            order_body(json!({"product_id": "p", "quantity": 1, "buyer": "b".repeat(10_000)})),
            422,
            "invalid_request",
        ),
        (
            "control chars in buyer",
            order_body(json!({"product_id": "p", "quantity": 1, "buyer": "a\u{0007}b"})),
            422,
            "invalid_request",
        ),
        (
            "bad idempotency key",
            order_body(json!({"product_id": "p", "quantity": 1, "buyer": "a"})).header("Idempotency-Key", "has space"),
            422,
            "invalid_request",
        ),
        (
            "no auth",
            h.post(url("/api/v1/products")).json(&json!({"id": "x", "name": "x", "price_cents": 1})),
            401,
            "unauthorized",
        ),
        (
            "wrong auth",
            h.post(url("/api/v1/products"))
                .bearer_auth("nope")
                .json(&json!({"id": "x", "name": "x", "price_cents": 1})),
            401,
            "unauthorized",
        ),
        ("no auth on audit", h.get(url("/api/v1/admin/audit")), 401, "unauthorized"),
        ("no auth on keys", h.post(url("/api/v1/products/p/keys")).json(&json!({"keys": ["z"]})), 401, "unauthorized"),
        ("no auth on admin order", h.get(url(&format!("/api/v1/admin/orders/{order_id}"))), 401, "unauthorized"),
        (
            "bad product id",
            h.post(url("/api/v1/products"))
                .bearer_auth(ADMIN)
                .json(&json!({"id": "Bad.Id", "name": "x", "price_cents": 1})),
            422,
            "invalid_request",
        ),
        (
            "negative price",
            h.post(url("/api/v1/products"))
                .bearer_auth(ADMIN)
                .json(&json!({"id": "x", "name": "x", "price_cents": -5})),
            422,
            "invalid_request",
        ),
        (
            "unknown product field",
            h.post(url("/api/v1/products"))
                .bearer_auth(ADMIN)
                .json(&json!({"id": "x", "name": "x", "price_cents": 1, "stock": 3})),
            422,
            "invalid_request",
        ),
        (
            "zero shards",
            h.post(url("/api/v1/products"))
                .bearer_auth(ADMIN)
                .json(&json!({"id": "x", "name": "x", "price_cents": 1, "shards": 0})),
            422,
            "invalid_request",
        ),
        (
            "product exists",
            h.post(url("/api/v1/products")).bearer_auth(ADMIN).json(&json!({"id": "p", "name": "x", "price_cents": 1})),
            409,
            "product_exists",
        ),
        (
            "300-byte key",
            h.post(url("/api/v1/products/p/keys")).bearer_auth(ADMIN).json(&json!({"keys": ["ok-key", long_key]})),
            422,
            "invalid_request",
        ),
        (
            "key with control char",
            h.post(url("/api/v1/products/p/keys"))
                .bearer_auth(ADMIN)
                .header("content-type", "text/plain")
                .body("good\nba\u{1}d\n"),
            422,
            "invalid_request",
        ),
        (
            "keys to unknown product",
            h.post(url("/api/v1/products/zz/keys")).bearer_auth(ADMIN).json(&json!({"keys": ["a"]})),
            404,
            "product_not_found",
        ),
        ("unknown route", h.get(url("/api/v1/nothing")), 404, "not_found"),
        ("wrong method", h.delete(url("/api/v1/orders")), 405, "method_not_allowed"),
        (
            "bad signature",
            h.post(url("/api/v1/payments/sandbox/notify")).header("X-Signature", "sha256=00").body("{}"),
            401,
            "bad_signature",
        ),
        ("missing signature", h.post(url("/api/v1/payments/sandbox/notify")).body("{}"), 401, "bad_signature"),
    ];
    for (name, request, status, code) in cases {
        let r = reply(request).await;
        assert_eq!((r.status, r.code()), (status, code), "{name}: {}", r.body);
        assert!(r.body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{name}: message");
    }
    // Oversized bodies are refused from their declared length, before they are read.
    let addr = api.url.trim_start_matches("http://").to_string();
    for (path, auth, len) in [
        ("/api/v1/orders", false, 2 << 20),
        ("/api/v1/products", true, 2 << 20),
        ("/api/v1/payments/sandbox/notify", false, 2 << 20),
        ("/api/v1/products/p/keys", true, 17 << 20),
    ] {
        let (status, body) = post_head_only(&addr, path, auth, len).await;
        assert_eq!(status, 413, "{path}: {body}");
        assert_eq!(body["error"]["code"], "payload_too_large", "{path}");
    }
    // Within the import limit, a large key file is fine (and a 1 MiB+ body is accepted there).
    let many: String = (0..80_000).map(|i| format!("bulk-key-{i:06}\n")).collect();
    assert!(many.len() > 1 << 20);
    let r = reply(
        h.post(url("/api/v1/products/p/keys")).bearer_auth(ADMIN).header("content-type", "text/plain").body(many),
    )
    .await;
    assert_eq!((r.status, r.body["imported"].as_u64()), (200, Some(80_000)));

    // A signed notification whose body is not a notification.
    let r = api.notify_raw("sandbox", b"{\"order_id\": 5}", SECRET).await;
    assert_eq!((r.status, r.code()), (422, "invalid_request"));
    // An unknown field names the field.
    let r = reply(order_body(json!({"product_id": "p", "quantity": 1, "buyer": "a", "qty": 1}))).await;
    assert!(r.body["error"]["message"].as_str().unwrap().contains("qty"));

    let mut after = api.audit().await.body;
    assert_eq!(after["products"][0]["imported"], json!(5 + 80_000));
    after["products"][0]["imported"] = json!(5);
    after["products"][0]["available"] = json!(after["products"][0]["available"].as_u64().unwrap() - 80_000);
    assert_eq!(before, after, "bad input changed state");
}

/// Sends only the request head (declaring `content_length`) and reads the answer.
async fn post_head_only(addr: &str, path: &str, auth: bool, content_length: usize) -> (u16, Value) {
    use tokio::io::AsyncWriteExt;
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let auth = if auth { format!("Authorization: Bearer {ADMIN}\r\n") } else { String::new() };
    let head = format!("POST {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Type: application/json\r\nContent-Length: {content_length}\r\n\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    let (status, _, body) = read_answer(&mut stream).await;
    (status, serde_json::from_slice(&body).unwrap())
}
