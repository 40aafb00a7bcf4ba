//! The baseline of `benches/flash_sale.sh`: an axum server whose order handler
//! parses the same JSON body kami's does and answers a fixed 201, with no actor,
//! no stock and no journal. What kami costs on top of HTTP is the difference.
//!
//! `cargo run --release --example bare_axum -- 127.0.0.1:8089`

use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use serde::Deserialize;

#[derive(Deserialize)]
#[allow(dead_code)]
struct OrderRequest {
    product_id: String,
    quantity: u64,
    buyer: String,
}

async fn order(Json(req): Json<OrderRequest>) -> (StatusCode, Json<serde_json::Value>) {
    let body = serde_json::json!({"order_id": "bare.0.1", "status": "pending_payment", "buyer": req.buyer});
    (StatusCode::CREATED, Json(body))
}

#[tokio::main]
async fn main() {
    let listen = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:8089".into());
    let listener = tokio::net::TcpListener::bind(&listen).await.expect("listen");
    println!("bare axum listening on {}", listener.local_addr().expect("address"));
    axum::serve(listener, Router::new().route("/api/v1/orders", post(order))).await.expect("serve");
}
