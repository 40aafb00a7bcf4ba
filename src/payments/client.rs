//! kami → gateway calls of the channel protocol (docs/payment-protocol.md): every
//! request is signed with the channel secret, every answer's signature is checked
//! before it is believed, and every call is bounded by the channel's timeout and
//! by the size of the answer it reads.

use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};

use super::Channel;
use crate::domain::signature;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("transport: {0}")]
    Transport(String),
    #[error("gateway answered {status} {code}")]
    Status { status: u16, code: String },
    #[error("answer signature does not verify")]
    BadSignature,
    #[error("malformed answer: {0}")]
    BadAnswer(String),
}

impl CallError {
    /// Whether this counts against the channel's breaker. A 4xx is the gateway
    /// working and refusing this one call; everything else is the channel failing.
    pub fn is_channel_failure(&self) -> bool {
        !matches!(self, CallError::Status { status, .. } if *status < 500)
    }
}

/// What a gateway knows of an order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueryAnswer {
    /// No payment for it (or one not paid yet).
    Unpaid,
    Paid {
        payment_id: String,
        amount_cents: u64,
    },
    /// Paid and refunded by the gateway itself: nothing is owed either way.
    Refunded {
        payment_id: String,
    },
}

#[derive(Deserialize)]
struct QueryReply {
    order_id: String,
    status: String,
    payment_id: Option<String>,
    amount_cents: Option<u64>,
}

#[derive(Deserialize)]
struct RefundReply {
    payment_id: String,
    status: String,
}

/// A channel's gateway, as seen from kami.
#[derive(Clone)]
pub struct Gateway {
    http: reqwest::Client,
    endpoint: String,
    /// Signs requests with its secret; verifies answers with it or the secret it
    /// replaced (in its grace period).
    channel: Channel,
    timeout: Duration,
}

impl Gateway {
    /// `None` when the channel has no endpoint (notifications only). Channels of a
    /// real gateway's kind always have one (their gateway's own protocol).
    pub fn for_channel(http: &reqwest::Client, channel: &Channel) -> Option<Gateway> {
        let endpoint = match &channel.adapter {
            Some(_) => String::new(),
            None => channel.endpoint.clone()?,
        };
        Some(Gateway { http: http.clone(), endpoint, channel: channel.clone(), timeout: channel.timeout })
    }

    pub async fn query(&self, order_id: &str) -> Result<QueryAnswer, CallError> {
        if let Some(adapter) = &self.channel.adapter {
            return adapter.query(&self.http, order_id, self.timeout).await;
        }
        let body = self.post("/api/query", json!({"order_id": order_id})).await?;
        let r: QueryReply = serde_json::from_value(body).map_err(|e| CallError::BadAnswer(e.to_string()))?;
        if r.order_id != order_id {
            return Err(CallError::BadAnswer(format!("asked about {order_id}, answered about {}", r.order_id)));
        }
        match (r.status.as_str(), r.payment_id, r.amount_cents) {
            ("none" | "created", _, _) => Ok(QueryAnswer::Unpaid),
            ("paid", Some(payment_id), Some(amount_cents)) => Ok(QueryAnswer::Paid { payment_id, amount_cents }),
            ("refunded", Some(payment_id), _) => Ok(QueryAnswer::Refunded { payment_id }),
            (status, _, _) => Err(CallError::BadAnswer(format!("query status {status:?} without its fields"))),
        }
    }

    /// Refunds a payment in full. `Ok` once the gateway says it is refunded (repeats too).
    pub async fn refund(&self, payment_id: &str, amount_cents: u64) -> Result<(), CallError> {
        if let Some(adapter) = &self.channel.adapter {
            return adapter.refund(&self.http, payment_id, amount_cents, self.timeout).await;
        }
        let body = self.post("/api/refund", json!({"payment_id": payment_id, "amount_cents": amount_cents})).await?;
        let r: RefundReply = serde_json::from_value(body).map_err(|e| CallError::BadAnswer(e.to_string()))?;
        if r.payment_id != payment_id || r.status != "refunded" {
            return Err(CallError::BadAnswer(format!("refund of {payment_id} answered {} {}", r.payment_id, r.status)));
        }
        Ok(())
    }

    pub async fn health(&self) -> Result<(), CallError> {
        if let Some(adapter) = &self.channel.adapter {
            return adapter.health(&self.http, self.timeout).await;
        }
        let request = self.http.get(format!("{}/api/health", self.endpoint));
        self.send(request).await.map(|_| ())
    }

    async fn post(&self, path: &str, mut body: Value) -> Result<Value, CallError> {
        body["timestamp"] = json!(chrono::Utc::now().timestamp());
        body["nonce"] = json!(format!("{:032x}", rand::random::<u128>()));
        let bytes = serde_json::to_vec(&body).expect("json");
        let sig = signature::sign(&self.channel.secret, &bytes);
        let request = self
            .http
            .post(format!("{}{path}", self.endpoint))
            .header("content-type", "application/json")
            .header("x-signature", sig)
            .body(bytes);
        let (sig, answer) = self.send(request).await?;
        let now_ms = chrono::Utc::now().timestamp_millis().max(0) as u64;
        if !self.channel.verifies(&answer, &sig, now_ms) {
            return Err(CallError::BadSignature);
        }
        serde_json::from_slice(&answer).map_err(|e| CallError::BadAnswer(e.to_string()))
    }

    /// Sends, reads at most `MAX_ANSWER_BYTES`, all within the timeout. Returns the
    /// answer's signature header and body; a non-2xx is a `Status` error.
    async fn send(&self, request: reqwest::RequestBuilder) -> Result<(String, Vec<u8>), CallError> {
        let (status, headers, body) = super::adapter::exchange(request, self.timeout).await?;
        if !(200..300).contains(&status) {
            let code = serde_json::from_slice::<Value>(&body)
                .ok()
                .and_then(|v| v["error"]["code"].as_str().map(str::to_string))
                .unwrap_or_default();
            return Err(CallError::Status { status, code });
        }
        let sig = headers.get("x-signature").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        Ok((sig, body))
    }
}
