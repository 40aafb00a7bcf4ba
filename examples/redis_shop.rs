//! The peer of `benches/flash_sale.sh`: the order route of the shop kami replaces,
//! as shops build it — an axum service in front of Redis, one Lua script per order
//! (check the stock, DECR, LPOP a key, HSET the order), over one multiplexed
//! connection per worker thread. With `appendfsync always` on the Redis side each
//! 201 is durable, as kami's are.
//!
//! `cargo run --release --example redis_shop -- 127.0.0.1:8093 redis://127.0.0.1:6391/`
//! (the stock is `stock:{product}` and the keys `keys:{product}` in Redis).

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::Deserialize;

/// Reserve one key and record the order, atomically (one Lua step).
/// KEYS[1] = stock counter, KEYS[2] = list of keys; ARGV = product, buyer.
const RESERVE: &str = r#"
local left = tonumber(redis.call('GET', KEYS[1]) or '0')
if left <= 0 then return false end
redis.call('DECR', KEYS[1])
local key = redis.call('LPOP', KEYS[2])
local id = redis.call('INCR', 'order-seq')
redis.call('HSET', 'order:' .. id, 'product', ARGV[1], 'buyer', ARGV[2], 'key', key, 'status', 'pending_payment')
return id
"#;

#[derive(Deserialize)]
struct OrderRequest {
    product_id: String,
    quantity: u64,
    buyer: String,
}

#[derive(Clone)]
struct Shop {
    redis: redis::aio::MultiplexedConnection,
    reserve: std::sync::Arc<redis::Script>,
}

async fn order(State(shop): State<Shop>, Json(req): Json<OrderRequest>) -> Response {
    if req.quantity != 1 || req.buyer.is_empty() || req.product_id.is_empty() {
        return (StatusCode::UNPROCESSABLE_ENTITY, Json(serde_json::json!({"error": {"code": "invalid_request"}})))
            .into_response();
    }
    let mut conn = shop.redis.clone();
    let stock = format!("stock:{}", req.product_id);
    let keys = format!("keys:{}", req.product_id);
    let result: redis::RedisResult<Option<u64>> =
        shop.reserve.key(stock).key(keys).arg(&req.product_id).arg(&req.buyer).invoke_async(&mut conn).await;
    match result {
        Ok(Some(id)) => (
            StatusCode::CREATED,
            Json(serde_json::json!({"order_id": id, "status": "pending_payment", "product_id": req.product_id})),
        )
            .into_response(),
        Ok(None) => (StatusCode::CONFLICT, Json(serde_json::json!({"error": {"code": "sold_out"}}))).into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"error": {"code": "storage", "message": e.to_string()}})),
        )
            .into_response(),
    }
}

#[tokio::main]
async fn main() {
    let listen = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:8093".into());
    let url = std::env::args().nth(2).unwrap_or_else(|| "redis://127.0.0.1:6379/".into());
    let client = redis::Client::open(url).expect("redis url");
    let redis = client.get_multiplexed_async_connection().await.expect("connect to redis");
    let shop = Shop { redis, reserve: std::sync::Arc::new(redis::Script::new(RESERVE)) };
    let listener = tokio::net::TcpListener::bind(&listen).await.expect("listen");
    println!("redis shop listening on {}", listener.local_addr().expect("address"));
    let app = Router::new().route("/api/v1/orders", post(order)).with_state(shop);
    axum::serve(listener, app).await.expect("serve");
}
