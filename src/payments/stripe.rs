//! Stripe.
//!
//! * Requests are form-encoded with `Authorization: Bearer <secret key>`; creating
//!   and refunding carry an `Idempotency-Key` fixed per order or payment.
//! * Webhooks carry `Stripe-Signature: t=<unix>,v1=<hex>[,v1=...]`: HMAC-SHA256 of
//!   `t.payload` with the endpoint's signing secret. Several `v1` (and several
//!   configured secrets, during a rotation) are accepted; `t` must be within the
//!   tolerance (300 s by default).
//! * `checkout.session.completed` with `payment_status = paid` and
//!   `payment_intent.succeeded` are payments; both name the PaymentIntent, which is
//!   the payment id, so the two events of one payment apply once. Other events are
//!   acknowledged and change nothing.

use std::time::Duration;

use axum::http::HeaderMap;
use serde_json::Value;
use subtle::ConstantTimeEq;

use super::adapter::{exchange, header, PayOrder, Verified};
use super::client::{CallError, QueryAnswer};
use super::notification::Refused;
use crate::domain::signature::hmac_sha256;

/// The secret API key. Never printed.
#[derive(Clone)]
pub struct SecretKey(String);

impl SecretKey {
    pub fn new(key: String) -> SecretKey {
        SecretKey(key)
    }
}

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretKey(..)")
    }
}

#[derive(Clone)]
pub struct Stripe {
    /// `https://api.stripe.com` or a simulator's.
    pub base: String,
    pub secret_key: SecretKey,
    /// Webhook signing secrets: the current one and, during a rotation, the old.
    pub webhook_secrets: Vec<Vec<u8>>,
    pub currency: String,
    pub success_url: String,
}

impl std::fmt::Debug for Stripe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stripe").field("base", &self.base).field("currency", &self.currency).finish_non_exhaustive()
    }
}

/// The `Stripe-Signature` header Stripe sends for `payload` at `t` (the simulator's side).
pub fn signature_header(secret: &[u8], t: i64, payload: &[u8]) -> String {
    format!("t={t},v1={}", hex::encode(hmac_sha256(secret, &signed_payload(t, payload))))
}

fn signed_payload(t: i64, payload: &[u8]) -> Vec<u8> {
    let mut m = format!("{t}.").into_bytes();
    m.extend_from_slice(payload);
    m
}

/// Whether `header` signs `payload` with one of `secrets` at a `t` within
/// `tolerance_secs` of `now_secs`.
pub fn verify_signature(
    secrets: &[Vec<u8>],
    header: &str,
    payload: &[u8],
    now_secs: i64,
    tolerance_secs: u64,
) -> Result<(), Refused> {
    let mut t = None;
    let mut v1 = Vec::new();
    for part in header.split(',').take(16) {
        match part.trim().split_once('=') {
            Some(("t", value)) => t = value.parse::<i64>().ok(),
            Some(("v1", value)) => v1.extend(hex::decode(value).ok()),
            _ => {}
        }
    }
    let t = t.ok_or(Refused::BadSignature)?;
    let message = signed_payload(t, payload);
    let matched = secrets.iter().any(|secret| {
        let expected = hmac_sha256(secret, &message);
        v1.iter().any(|given| given.len() == 32 && bool::from(given.as_slice().ct_eq(&expected)))
    });
    if !matched {
        return Err(Refused::BadSignature);
    }
    let skew_secs = now_secs.abs_diff(t);
    if skew_secs > tolerance_secs {
        return Err(Refused::Stale { skew_secs, max_secs: tolerance_secs });
    }
    Ok(())
}

impl Stripe {
    pub fn verify_webhook(
        &self,
        headers: &HeaderMap,
        body: &[u8],
        now_ms: u64,
        tolerance_secs: u64,
    ) -> Result<Verified, Refused> {
        let given = header(headers, "stripe-signature").ok_or(Refused::BadSignature)?;
        verify_signature(&self.webhook_secrets, given, body, (now_ms / 1000) as i64, tolerance_secs)?;
        let event: Value = serde_json::from_slice(body).map_err(|e| Refused::Invalid(format!("event: {e}")))?;
        let kind = event["type"].as_str().unwrap_or("").to_string();
        let object = &event["data"]["object"];
        let order_id = object["metadata"]["order_id"].as_str().unwrap_or("").to_string();
        let (paid, payment_id, amount) = match kind.as_str() {
            "payment_intent.succeeded" => (true, object["id"].as_str(), object["amount_received"].as_u64()),
            "checkout.session.completed" | "checkout.session.async_payment_succeeded" => (
                object["payment_status"].as_str() == Some("paid"),
                object["payment_intent"].as_str(),
                object["amount_total"].as_u64(),
            ),
            _ => (false, None, None),
        };
        if !paid {
            return Ok(Verified { order_id, payment_id: String::new(), amount_cents: 0, paid: false, event: kind });
        }
        if order_id.is_empty() {
            return Err(Refused::Invalid("metadata.order_id: missing (not a kami checkout)".into()));
        }
        if object["currency"].as_str() != Some(self.currency.as_str()) {
            return Err(Refused::Invalid(format!("currency: kami prices are in {}", self.currency)));
        }
        let payment_id = payment_id.unwrap_or("").to_string();
        crate::domain::validate::token("payment_intent", &payment_id).map_err(Refused::Invalid)?;
        let amount_cents = amount.ok_or_else(|| Refused::Invalid("amount: missing".into()))?;
        Ok(Verified { order_id, payment_id, amount_cents, paid, event: kind })
    }

    async fn call(&self, request: reqwest::RequestBuilder, timeout: Duration) -> Result<Value, CallError> {
        let request = request.header("authorization", format!("Bearer {}", self.secret_key.0));
        let (status, _, body) = exchange(request, timeout).await?;
        let value: Value = serde_json::from_slice(&body).map_err(|e| CallError::BadAnswer(e.to_string()))?;
        if status >= 300 {
            let code = value["error"]["code"].as_str().or(value["error"]["type"].as_str()).unwrap_or("").to_string();
            return Err(CallError::Status { status, code });
        }
        Ok(value)
    }

    /// A Checkout Session for the order: the page's URL.
    pub async fn checkout(
        &self,
        http: &reqwest::Client,
        order: &PayOrder<'_>,
        timeout: Duration,
    ) -> Result<String, CallError> {
        let amount = order.amount_cents.to_string();
        let form = [
            ("mode", "payment"),
            ("success_url", self.success_url.as_str()),
            ("client_reference_id", order.order_id),
            ("line_items[0][quantity]", "1"),
            ("line_items[0][price_data][currency]", self.currency.as_str()),
            ("line_items[0][price_data][unit_amount]", amount.as_str()),
            ("line_items[0][price_data][product_data][name]", order.subject),
            ("metadata[order_id]", order.order_id),
            ("payment_intent_data[metadata][order_id]", order.order_id),
        ];
        let request = http
            .post(format!("{}/v1/checkout/sessions", self.base))
            .header("idempotency-key", format!("kami-checkout-{}", order.order_id))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(serde_urlencoded::to_string(form).expect("form encoding"));
        let r = self.call(request, timeout).await?;
        r["url"].as_str().map(str::to_string).ok_or_else(|| CallError::BadAnswer("no url".into()))
    }

    /// The order's PaymentIntents, by the `order_id` in their metadata.
    pub async fn query(
        &self,
        http: &reqwest::Client,
        order_id: &str,
        timeout: Duration,
    ) -> Result<QueryAnswer, CallError> {
        let query = format!("metadata['order_id']:'{order_id}'");
        let request = http
            .get(format!("{}/v1/payment_intents/search", self.base))
            .query(&[("query", query.as_str()), ("expand[]", "data.latest_charge")]);
        let r = self.call(request, timeout).await?;
        let Some(intents) = r["data"].as_array() else {
            return Err(CallError::BadAnswer("no data".into()));
        };
        for pi in intents {
            if pi["metadata"]["order_id"].as_str() != Some(order_id) || pi["status"].as_str() != Some("succeeded") {
                continue;
            }
            let payment_id = pi["id"].as_str().unwrap_or("").to_string();
            if pi["latest_charge"]["refunded"].as_bool() == Some(true) {
                return Ok(QueryAnswer::Refunded { payment_id });
            }
            if pi["currency"].as_str() != Some(self.currency.as_str()) {
                return Err(CallError::BadAnswer(format!("{payment_id} is not in {}", self.currency)));
            }
            let amount_cents =
                pi["amount_received"].as_u64().ok_or_else(|| CallError::BadAnswer("amount_received".into()))?;
            return Ok(QueryAnswer::Paid { payment_id, amount_cents });
        }
        Ok(QueryAnswer::Unpaid)
    }

    /// A full refund of the PaymentIntent; `pending` counts as done (Stripe has it).
    pub async fn refund(
        &self,
        http: &reqwest::Client,
        payment_id: &str,
        amount_cents: u64,
        timeout: Duration,
    ) -> Result<(), CallError> {
        let amount = amount_cents.to_string();
        let request = http
            .post(format!("{}/v1/refunds", self.base))
            .header("idempotency-key", format!("kami-refund-{payment_id}"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(
                serde_urlencoded::to_string([("payment_intent", payment_id), ("amount", amount.as_str())])
                    .expect("form"),
            );
        let r = self.call(request, timeout).await?;
        match r["status"].as_str().unwrap_or("") {
            "succeeded" | "pending" => Ok(()),
            other => Err(CallError::BadAnswer(format!("refund status {other:?}"))),
        }
    }

    pub async fn balance(&self, http: &reqwest::Client, timeout: Duration) -> Result<(), CallError> {
        self.call(http.get(format!("{}/v1/balance", self.base)), timeout).await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn webhook_signatures_accept_any_listed_v1_and_any_configured_secret_within_the_tolerance() {
        let payload = br#"{"id":"evt_1"}"#;
        let header = signature_header(b"whsec_new", 1_000, payload);
        assert_eq!(verify_signature(&[b"whsec_new".to_vec()], &header, payload, 1_100, 300), Ok(()));
        let rotated = format!("{header},v1={}", "00".repeat(32));
        assert_eq!(
            verify_signature(&[b"whsec_old".to_vec(), b"whsec_new".to_vec()], &rotated, payload, 1_000, 300),
            Ok(())
        );
        assert_eq!(
            verify_signature(&[b"whsec_old".to_vec()], &header, payload, 1_000, 300),
            Err(Refused::BadSignature)
        );
        assert_eq!(verify_signature(&[b"whsec_new".to_vec()], &header, b"{}", 1_000, 300), Err(Refused::BadSignature));
        assert_eq!(
            verify_signature(&[b"whsec_new".to_vec()], &header, payload, 1_301, 300),
            Err(Refused::Stale { skew_secs: 301, max_secs: 300 })
        );
        assert_eq!(
            verify_signature(&[b"whsec_new".to_vec()], "v1=00", payload, 1_000, 300),
            Err(Refused::BadSignature)
        );
    }
}
