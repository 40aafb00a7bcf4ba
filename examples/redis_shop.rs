//! The peer of `benches/flash_sale.sh`: the shop kami replaces, as shops build it —
//! an axum service in front of Redis, one Lua script per step, over one
//! multiplexed connection. With `appendfsync always` on the Redis side each 2xx is
//! durable, as kami's are. It speaks enough of kami's API for `kami load --url`
//! to drive it exactly as it drives kami:
//!
//! * `POST /api/v1/orders` — one Lua step: check the stock, DECR, LPOP a key, INCR
//!   the order sequence, HSET the order (buyer, key, amount, query token, status);
//! * `POST /api/v1/payments/{channel}/notify` — HMAC-SHA256 of the body checked
//!   (`X-Signature`, kami's format), then one Lua step: the nonce recorded once, the
//!   payment id recorded once per order (a repeat answers the same), the amount
//!   compared, the order marked delivered; the key is answered;
//! * `GET /api/v1/orders/{id}` with `X-Order-Token` — one HMGET;
//! * `POST /api/v1/products`, `POST /api/v1/products/{id}/keys` (JSON or one key per
//!   line) and `GET /api/v1/admin/audit` (keys sold per product) for the load client.
//!
//! `cargo run --release --example redis_shop -- 127.0.0.1:8093 redis://127.0.0.1:6391/ SECRET`
//! (the stock is `stock:{product}` and the keys `keys:{product}` in Redis).

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

/// Reserve one key and record the order, atomically (one Lua step).
/// KEYS[1] = stock counter, KEYS[2] = list of keys; ARGV = product, buyer, amount, token.
const RESERVE: &str = r#"
local left = tonumber(redis.call('GET', KEYS[1]) or '0')
if left <= 0 then return false end
redis.call('DECR', KEYS[1])
local key = redis.call('LPOP', KEYS[2])
local id = redis.call('INCR', 'order-seq')
redis.call('HSET', 'order:' .. id, 'product', ARGV[1], 'buyer', ARGV[2], 'key', key,
    'amount', ARGV[3], 'token', ARGV[4], 'status', 'pending_payment')
return id
"#;

/// Pay an order once per payment id (one Lua step). KEYS[1] = the order,
/// KEYS[2] = the payment id's record, KEYS[3] = the nonce; ARGV = order id, amount.
/// Returns the key, or an error code.
const PAY: &str = r#"
if redis.call('SET', KEYS[3], '1', 'NX', 'EX', 600) == false then return {err = 'replayed'} end
local paid_for = redis.call('GET', KEYS[2])
if paid_for then
  if paid_for ~= ARGV[1] then return {err = 'payment_conflict'} end
  return redis.call('HGET', KEYS[1], 'key')
end
local order = redis.call('HMGET', KEYS[1], 'status', 'amount', 'key', 'product')
if not order[1] then return {err = 'order_not_found'} end
if order[1] ~= 'pending_payment' then return {err = 'order_not_payable'} end
if order[2] ~= ARGV[2] then return {err = 'amount_mismatch'} end
redis.call('SET', KEYS[2], ARGV[1])
redis.call('HSET', KEYS[1], 'status', 'delivered')
redis.call('INCR', 'sold:' .. order[4])
return order[3]
"#;

/// The price of every product (the load client's products cost 9.90).
const PRICE_CENTS: u64 = 990;

#[derive(Deserialize)]
struct OrderRequest {
    product_id: String,
    quantity: u64,
    buyer: String,
}

#[derive(Deserialize)]
struct Notification {
    order_id: String,
    payment_id: String,
    amount_cents: u64,
    status: String,
    nonce: String,
}

#[derive(Clone)]
struct Shop {
    redis: redis::aio::MultiplexedConnection,
    reserve: std::sync::Arc<redis::Script>,
    pay: std::sync::Arc<redis::Script>,
    secret: std::sync::Arc<String>,
}

fn error(status: StatusCode, code: &str) -> Response {
    (status, Json(json!({"error": {"code": code}}))).into_response()
}

fn storage(e: redis::RedisError) -> Response {
    (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"error": {"code": "storage", "message": e.to_string()}})))
        .into_response()
}

async fn order(State(shop): State<Shop>, Json(req): Json<OrderRequest>) -> Response {
    if req.quantity != 1 || req.buyer.is_empty() || req.product_id.is_empty() {
        return error(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request");
    }
    let mut conn = shop.redis.clone();
    let token = format!("{:032x}", rand::random::<u128>());
    let result: redis::RedisResult<Option<u64>> = shop
        .reserve
        .key(format!("stock:{}", req.product_id))
        .key(format!("keys:{}", req.product_id))
        .arg(&req.product_id)
        .arg(&req.buyer)
        .arg(PRICE_CENTS)
        .arg(&token)
        .invoke_async(&mut conn)
        .await;
    match result {
        Ok(Some(id)) => (
            StatusCode::CREATED,
            Json(json!({
                "order_id": format!("o{id}"), "status": "pending_payment", "product_id": req.product_id,
                "amount_cents": PRICE_CENTS, "query_token": token,
            })),
        )
            .into_response(),
        Ok(None) => error(StatusCode::CONFLICT, "sold_out"),
        Err(e) => storage(e),
    }
}

async fn notify(State(shop): State<Shop>, headers: HeaderMap, body: Bytes) -> Response {
    let signature = headers.get("x-signature").and_then(|v| v.to_str().ok()).unwrap_or("");
    if !kami::domain::signature::verify(shop.secret.as_bytes(), &body, signature) {
        return error(StatusCode::UNAUTHORIZED, "bad_signature");
    }
    let Ok(note) = serde_json::from_slice::<Notification>(&body) else {
        return error(StatusCode::BAD_REQUEST, "invalid_request");
    };
    let Some(seq) = note.order_id.strip_prefix('o') else { return error(StatusCode::NOT_FOUND, "order_not_found") };
    if note.status != "paid" {
        return (StatusCode::OK, Json(json!({"order_id": note.order_id, "status": "pending_payment"}))).into_response();
    }
    let mut conn = shop.redis.clone();
    let result: redis::RedisResult<String> = shop
        .pay
        .key(format!("order:{seq}"))
        .key(format!("payment:{}", note.payment_id))
        .key(format!("nonce:{}", note.nonce))
        .arg(&note.order_id)
        .arg(note.amount_cents)
        .invoke_async(&mut conn)
        .await;
    match result {
        Ok(key) => (StatusCode::OK, Json(json!({"order_id": note.order_id, "status": "delivered", "keys": [key]})))
            .into_response(),
        Err(e) if matches!(e.kind(), redis::ErrorKind::ResponseError | redis::ErrorKind::ExtensionError) => {
            let code = e.code().unwrap_or("refused").to_string();
            let status = match code.as_str() {
                "order_not_found" => StatusCode::NOT_FOUND,
                "amount_mismatch" => StatusCode::UNPROCESSABLE_ENTITY,
                _ => StatusCode::CONFLICT,
            };
            error(status, &code)
        }
        Err(e) => storage(e),
    }
}

async fn read(State(shop): State<Shop>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    let token = headers.get("x-order-token").and_then(|v| v.to_str().ok()).unwrap_or("");
    let Some(seq) = id.strip_prefix('o') else { return error(StatusCode::NOT_FOUND, "order_not_found") };
    let mut conn = shop.redis.clone();
    let got: redis::RedisResult<(Option<String>, Option<String>, Option<String>)> = redis::cmd("HMGET")
        .arg(format!("order:{seq}"))
        .arg("token")
        .arg("status")
        .arg("key")
        .query_async(&mut conn)
        .await;
    match got {
        Ok((Some(t), Some(status), Some(key))) if t == token => {
            let keys = if status == "delivered" { vec![key] } else { vec![] };
            (StatusCode::OK, Json(json!({"order_id": id, "status": status, "keys": keys}))).into_response()
        }
        Ok(_) => error(StatusCode::NOT_FOUND, "order_not_found"),
        Err(e) => storage(e),
    }
}

#[derive(Deserialize)]
struct NewProduct {
    id: String,
}

async fn create_product(State(shop): State<Shop>, Json(p): Json<NewProduct>) -> Response {
    let mut conn = shop.redis.clone();
    let set: redis::RedisResult<()> =
        redis::cmd("SET").arg(format!("stock:{}", p.id)).arg(0).query_async(&mut conn).await;
    match set {
        Ok(()) => (StatusCode::CREATED, Json(json!({"id": p.id}))).into_response(),
        Err(e) => storage(e),
    }
}

/// Keys as `{"keys": [...]}` or one per line.
async fn import_keys(State(shop): State<Shop>, Path(id): Path<String>, body: Bytes) -> Response {
    let keys: Vec<String> = match serde_json::from_slice::<serde_json::Value>(&body) {
        Ok(v) => v["keys"].as_array().into_iter().flatten().filter_map(|k| k.as_str().map(str::to_string)).collect(),
        Err(_) => String::from_utf8_lossy(&body).lines().filter(|l| !l.is_empty()).map(str::to_string).collect(),
    };
    let mut conn = shop.redis.clone();
    let mut pipe = redis::pipe();
    pipe.atomic().cmd("RPUSH").arg(format!("keys:{id}")).arg(&keys).ignore();
    pipe.cmd("INCRBY").arg(format!("stock:{id}")).arg(keys.len()).ignore();
    match pipe.query_async::<()>(&mut conn).await {
        Ok(()) => (StatusCode::OK, Json(json!({"imported": keys.len()}))).into_response(),
        Err(e) => storage(e),
    }
}

/// Keys sold per product (no further checks: the load client checks that no key
/// was delivered twice).
async fn audit(State(shop): State<Shop>) -> Response {
    let mut conn = shop.redis.clone();
    let names: redis::RedisResult<Vec<String>> = redis::cmd("KEYS").arg("sold:*").query_async(&mut conn).await;
    let mut products = Vec::new();
    for name in names.unwrap_or_default() {
        let sold: u64 = redis::cmd("GET").arg(&name).query_async(&mut conn).await.unwrap_or(0);
        products.push(json!({"id": name.trim_start_matches("sold:"), "sold": sold}));
    }
    Json(json!({"ok": true, "products": products})).into_response()
}

#[tokio::main]
async fn main() {
    let listen = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:8093".into());
    let url = std::env::args().nth(2).unwrap_or_else(|| "redis://127.0.0.1:6379/".into());
    let secret = std::env::args().nth(3).unwrap_or_else(|| "bench".into());
    let client = redis::Client::open(url).expect("redis url");
    let redis = client.get_multiplexed_async_connection().await.expect("connect to redis");
    let shop = Shop {
        redis,
        reserve: std::sync::Arc::new(redis::Script::new(RESERVE)),
        pay: std::sync::Arc::new(redis::Script::new(PAY)),
        secret: std::sync::Arc::new(secret),
    };
    let listener = tokio::net::TcpListener::bind(&listen).await.expect("listen");
    println!("redis shop listening on {}", listener.local_addr().expect("address"));
    let app = Router::new()
        .route("/api/v1/orders", post(order))
        .route("/api/v1/orders/{id}", get(read))
        .route("/api/v1/payments/{channel}/notify", post(notify))
        .route("/api/v1/products", post(create_product))
        .route("/api/v1/products/{id}/keys", post(import_keys))
        .route("/api/v1/admin/audit", get(audit))
        .layer(axum::extract::DefaultBodyLimit::max(64 << 20))
        .with_state(shop);
    axum::serve(listener, app).await.expect("serve");
}
