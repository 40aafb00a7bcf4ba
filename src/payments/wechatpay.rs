//! WeChat Pay (微信支付) API v3.
//!
//! * Requests carry `Authorization: WECHATPAY2-SHA256-RSA2048 mchid=..,nonce_str=..,
//!   timestamp=..,serial_no=..,signature=..`: SHA256withRSA with the merchant's key over
//!   `METHOD\nPATH?QUERY\ntimestamp\nnonce\nbody\n`.
//! * Answers and notifications carry `Wechatpay-Timestamp`, `-Nonce`, `-Signature`,
//!   `-Serial`: SHA256withRSA with the platform key over `timestamp\nnonce\nbody\n`.
//!   The serial must be the configured platform key id and the timestamp within the
//!   allowed skew (5 minutes by default).
//! * A notification's `resource` is AES-256-GCM encrypted with the APIv3 key
//!   (`associated_data`, 12-byte `nonce`, base64 `ciphertext` with its tag).
//! * Amounts are integers in fen. kami answers `{"code":"SUCCESS"}` once the outcome
//!   is durable; a 4xx/5xx with `{"code":"FAIL"}` makes WeChat Pay retry.

use std::time::Duration;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use axum::http::HeaderMap;
use base64::Engine;
use serde::Deserialize;
use serde_json::{json, Value};

use super::adapter::{exchange, header, trade_no, JsapiParams, PayOrder, Verified};
use super::client::{CallError, QueryAnswer};
use super::keys::{PrivateKey, PublicKey};
use super::notification::Refused;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// The APIv3 key (32 bytes). Never printed.
#[derive(Clone)]
pub struct ApiV3Key([u8; 32]);

impl ApiV3Key {
    /// `bytes` must be 32 long (checked by the caller).
    pub fn new(bytes: &[u8]) -> ApiV3Key {
        ApiV3Key(bytes.try_into().expect("32 bytes"))
    }

    /// Decrypts a notification resource.
    pub fn decrypt(&self, nonce: &str, associated_data: &str, ciphertext_b64: &str) -> Result<Vec<u8>, String> {
        let cipher = Aes256Gcm::new_from_slice(&self.0).expect("32-byte key");
        if nonce.len() != 12 {
            return Err("resource.nonce: must be 12 bytes".into());
        }
        let ciphertext = B64.decode(ciphertext_b64).map_err(|_| "resource.ciphertext: not base64".to_string())?;
        cipher
            .decrypt(Nonce::from_slice(nonce.as_bytes()), Payload { msg: &ciphertext, aad: associated_data.as_bytes() })
            .map_err(|_| "resource: does not decrypt with the APIv3 key".to_string())
    }

    /// Encrypts a resource as WeChat Pay does (the simulator's side).
    pub fn encrypt(&self, nonce: &str, associated_data: &str, plaintext: &[u8]) -> String {
        let cipher = Aes256Gcm::new_from_slice(&self.0).expect("32-byte key");
        let sealed = cipher
            .encrypt(Nonce::from_slice(nonce.as_bytes()), Payload { msg: plaintext, aad: associated_data.as_bytes() })
            .expect("AES-GCM encryption");
        B64.encode(sealed)
    }
}

impl std::fmt::Debug for ApiV3Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiV3Key(..)")
    }
}

#[derive(Debug, Clone)]
pub struct Wechatpay {
    /// `https://api.mch.weixin.qq.com` or a simulator's.
    pub base: String,
    pub app_id: String,
    pub merchant_id: String,
    pub merchant_serial: String,
    pub private_key: PrivateKey,
    pub platform_key: PublicKey,
    pub platform_key_id: String,
    pub apiv3_key: ApiV3Key,
    pub notify_url: String,
}

/// The message a request signature covers.
pub fn request_message(method: &str, path_and_query: &str, timestamp: i64, nonce: &str, body: &str) -> String {
    format!("{method}\n{path_and_query}\n{timestamp}\n{nonce}\n{body}\n")
}

/// The message `paySign` covers.
pub fn jsapi_message(app_id: &str, time_stamp: &str, nonce_str: &str, package: &str) -> String {
    format!("{app_id}\n{time_stamp}\n{nonce_str}\n{package}\n")
}

/// The message an answer's or a notification's signature covers.
pub fn answer_message(timestamp: &str, nonce: &str, body: &[u8]) -> Vec<u8> {
    let mut m = format!("{timestamp}\n{nonce}\n").into_bytes();
    m.extend_from_slice(body);
    m.push(b'\n');
    m
}

#[derive(Deserialize)]
struct Notification {
    event_type: String,
    resource: Resource,
}

#[derive(Deserialize)]
struct Resource {
    algorithm: String,
    ciphertext: String,
    #[serde(default)]
    associated_data: String,
    nonce: String,
}

#[derive(Deserialize)]
struct Transaction {
    mchid: String,
    out_trade_no: String,
    #[serde(default)]
    transaction_id: String,
    trade_state: String,
    #[serde(default)]
    attach: String,
    amount: Option<Amount>,
}

#[derive(Deserialize)]
struct Amount {
    total: u64,
}

impl Wechatpay {
    /// Checks the platform's signature headers over `body`.
    fn verify_signed(&self, headers: &HeaderMap, body: &[u8], now_ms: u64, max_skew_secs: u64) -> Result<(), Refused> {
        let (Some(timestamp), Some(nonce), Some(signature), Some(serial)) = (
            header(headers, "wechatpay-timestamp"),
            header(headers, "wechatpay-nonce"),
            header(headers, "wechatpay-signature"),
            header(headers, "wechatpay-serial"),
        ) else {
            return Err(Refused::BadSignature);
        };
        if serial != self.platform_key_id {
            return Err(Refused::BadSignature);
        }
        if !self.platform_key.verifies(&answer_message(timestamp, nonce, body), signature) {
            return Err(Refused::BadSignature);
        }
        let ts: i64 = timestamp.parse().map_err(|_| Refused::Invalid("Wechatpay-Timestamp: not a number".into()))?;
        let skew_secs = ((now_ms / 1000) as i64).abs_diff(ts);
        if skew_secs > max_skew_secs {
            return Err(Refused::Stale { skew_secs, max_secs: max_skew_secs });
        }
        Ok(())
    }

    pub fn verify_notification(
        &self,
        headers: &HeaderMap,
        body: &[u8],
        now_ms: u64,
        max_skew_secs: u64,
    ) -> Result<Verified, Refused> {
        self.verify_signed(headers, body, now_ms, max_skew_secs)?;
        let n: Notification =
            serde_json::from_slice(body).map_err(|e| Refused::Invalid(format!("notification: {e}")))?;
        if n.resource.algorithm != "AEAD_AES_256_GCM" {
            return Err(Refused::Invalid("resource.algorithm: only AEAD_AES_256_GCM".into()));
        }
        let plain = self
            .apiv3_key
            .decrypt(&n.resource.nonce, &n.resource.associated_data, &n.resource.ciphertext)
            .map_err(Refused::Invalid)?;
        let t: Transaction = serde_json::from_slice(&plain).map_err(|e| Refused::Invalid(format!("resource: {e}")))?;
        if t.mchid != self.merchant_id {
            return Err(Refused::Invalid("mchid: the notification is for another merchant".into()));
        }
        if t.attach.is_empty() || trade_no(&t.attach) != t.out_trade_no {
            return Err(Refused::Invalid("out_trade_no and attach do not name one kami order".into()));
        }
        let paid = n.event_type == "TRANSACTION.SUCCESS" && t.trade_state == "SUCCESS";
        if paid {
            crate::domain::validate::token("transaction_id", &t.transaction_id).map_err(Refused::Invalid)?;
        }
        let amount_cents = match (&t.amount, paid) {
            (Some(a), _) => a.total,
            (None, false) => 0,
            (None, true) => return Err(Refused::Invalid("amount: missing".into())),
        };
        Ok(Verified { order_id: t.attach, payment_id: t.transaction_id, amount_cents, paid, event: t.trade_state })
    }

    /// A signed request; the answer's signature is checked (any status but 5xx).
    async fn call(
        &self,
        http: &reqwest::Client,
        method: reqwest::Method,
        path_and_query: &str,
        body: Option<Value>,
        timeout: Duration,
    ) -> Result<(u16, Value), CallError> {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let timestamp = chrono::Utc::now().timestamp();
        let nonce = format!("{:032X}", rand::random::<u128>());
        let message = request_message(method.as_str(), path_and_query, timestamp, &nonce, &body);
        let signature = self.private_key.sign_off_thread(message.into_bytes()).await;
        let authorization = format!(
            "WECHATPAY2-SHA256-RSA2048 mchid=\"{}\",nonce_str=\"{nonce}\",signature=\"{signature}\",timestamp=\"{timestamp}\",serial_no=\"{}\"",
            self.merchant_id, self.merchant_serial
        );
        let mut request = http
            .request(method, format!("{}{path_and_query}", self.base))
            .header("authorization", authorization)
            .header("accept", "application/json");
        if !body.is_empty() {
            request = request.header("content-type", "application/json").body(body);
        }
        let (status, headers, answer) = exchange(request, timeout).await?;
        if status >= 500 {
            return Err(CallError::Status { status, code: String::new() });
        }
        let now_ms = chrono::Utc::now().timestamp_millis().max(0) as u64;
        if self.verify_signed(&headers, &answer, now_ms, 300).is_err() {
            return Err(CallError::BadSignature);
        }
        let value = if answer.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&answer).map_err(|e| CallError::BadAnswer(e.to_string()))?
        };
        Ok((status, value))
    }

    /// Native order (`/v3/pay/transactions/native`): the `code_url` to show as a QR code.
    pub async fn native(
        &self,
        http: &reqwest::Client,
        order: &PayOrder<'_>,
        timeout: Duration,
    ) -> Result<String, CallError> {
        let body = json!({
            "appid": self.app_id,
            "mchid": self.merchant_id,
            "description": order.subject,
            "out_trade_no": trade_no(order.order_id),
            "attach": order.order_id,
            "notify_url": self.notify_url,
            "time_expire": super::adapter::beijing(order.expires_at_ms).format("%Y-%m-%dT%H:%M:%S%:z").to_string(),
            "amount": {"total": order.amount_cents, "currency": "CNY"},
        });
        let (status, r) =
            self.call(http, reqwest::Method::POST, "/v3/pay/transactions/native", Some(body), timeout).await?;
        if status >= 300 {
            return Err(CallError::Status { status, code: r["code"].as_str().unwrap_or("").to_string() });
        }
        r["code_url"].as_str().map(str::to_string).ok_or_else(|| CallError::BadAnswer("no code_url".into()))
    }

    /// JSAPI order (`/v3/pay/transactions/jsapi`) for the user `openid`: the signed
    /// parameters of `wx.requestPayment`.
    pub async fn jsapi(
        &self,
        http: &reqwest::Client,
        order: &PayOrder<'_>,
        openid: &str,
        timeout: Duration,
    ) -> Result<JsapiParams, CallError> {
        let body = json!({
            "appid": self.app_id,
            "mchid": self.merchant_id,
            "description": order.subject,
            "out_trade_no": trade_no(order.order_id),
            "attach": order.order_id,
            "notify_url": self.notify_url,
            "time_expire": super::adapter::beijing(order.expires_at_ms).format("%Y-%m-%dT%H:%M:%S%:z").to_string(),
            "amount": {"total": order.amount_cents, "currency": "CNY"},
            "payer": {"openid": openid},
        });
        let (status, r) =
            self.call(http, reqwest::Method::POST, "/v3/pay/transactions/jsapi", Some(body), timeout).await?;
        if status >= 300 {
            return Err(CallError::Status { status, code: r["code"].as_str().unwrap_or("").to_string() });
        }
        let prepay_id = r["prepay_id"].as_str().ok_or_else(|| CallError::BadAnswer("no prepay_id".into()))?;
        let time_stamp = chrono::Utc::now().timestamp().to_string();
        let nonce_str = format!("{:032X}", rand::random::<u128>());
        let package = format!("prepay_id={prepay_id}");
        let message = jsapi_message(&self.app_id, &time_stamp, &nonce_str, &package);
        let pay_sign = self.private_key.sign_off_thread(message.into_bytes()).await;
        Ok(JsapiParams { app_id: self.app_id.clone(), time_stamp, nonce_str, package, sign_type: "RSA", pay_sign })
    }

    /// Query by merchant order number.
    pub async fn query(
        &self,
        http: &reqwest::Client,
        order_id: &str,
        timeout: Duration,
    ) -> Result<QueryAnswer, CallError> {
        let path = format!("/v3/pay/transactions/out-trade-no/{}?mchid={}", trade_no(order_id), self.merchant_id);
        let (status, r) = self.call(http, reqwest::Method::GET, &path, None, timeout).await?;
        if status == 404 {
            return Ok(QueryAnswer::Unpaid); // ORDER_NOT_EXIST
        }
        if status >= 300 {
            return Err(CallError::Status { status, code: r["code"].as_str().unwrap_or("").to_string() });
        }
        if r["out_trade_no"].as_str() != Some(trade_no(order_id).as_str()) {
            return Err(CallError::BadAnswer("the answer is about another order".into()));
        }
        let payment_id = r["transaction_id"].as_str().unwrap_or("").to_string();
        match r["trade_state"].as_str().unwrap_or("") {
            "SUCCESS" => {
                let amount_cents =
                    r["amount"]["total"].as_u64().ok_or_else(|| CallError::BadAnswer("amount.total".into()))?;
                if payment_id.is_empty() {
                    return Err(CallError::BadAnswer("paid without transaction_id".into()));
                }
                Ok(QueryAnswer::Paid { payment_id, amount_cents })
            }
            "REFUND" => Ok(QueryAnswer::Refunded { payment_id }),
            "NOTPAY" | "CLOSED" | "REVOKED" | "USERPAYING" | "PAYERROR" => Ok(QueryAnswer::Unpaid),
            other => Err(CallError::BadAnswer(format!("trade_state {other:?}"))),
        }
    }

    /// A full refund (`/v3/refund/domestic/refunds`). `out_refund_no` is fixed per
    /// payment, so a repeat is the same refund. `PROCESSING` counts as done: WeChat
    /// Pay has taken the refund and finishes it on its own.
    pub async fn refund(
        &self,
        http: &reqwest::Client,
        payment_id: &str,
        amount_cents: u64,
        timeout: Duration,
    ) -> Result<(), CallError> {
        let body = json!({
            "transaction_id": payment_id,
            "out_refund_no": format!("kami-{}", &payment_id[..payment_id.len().min(59)]),
            "amount": {"refund": amount_cents, "total": amount_cents, "currency": "CNY"},
        });
        let (status, r) =
            self.call(http, reqwest::Method::POST, "/v3/refund/domestic/refunds", Some(body), timeout).await?;
        if status >= 300 {
            return Err(CallError::Status { status, code: r["code"].as_str().unwrap_or("").to_string() });
        }
        match r["status"].as_str().unwrap_or("") {
            "SUCCESS" | "PROCESSING" => Ok(()),
            other => Err(CallError::BadAnswer(format!("refund status {other:?}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resources_decrypt_only_with_their_key_nonce_and_associated_data() {
        let key = ApiV3Key::new(b"0123456789abcdef0123456789abcdef");
        let sealed = key.encrypt("nonce1234567", "transaction", b"{\"a\":1}");
        assert_eq!(key.decrypt("nonce1234567", "transaction", &sealed).unwrap(), b"{\"a\":1}");
        assert!(key.decrypt("nonce1234568", "transaction", &sealed).is_err());
        assert!(key.decrypt("nonce1234567", "other", &sealed).is_err());
        assert!(ApiV3Key::new(b"0123456789abcdef0123456789abcdeX")
            .decrypt("nonce1234567", "transaction", &sealed)
            .is_err());
    }

    #[test]
    fn signed_messages_end_every_line_with_a_newline() {
        assert_eq!(request_message("GET", "/v3/x?a=1", 5, "n", ""), "GET\n/v3/x?a=1\n5\nn\n\n");
        assert_eq!(answer_message("5", "n", b"{}"), b"5\nn\n{}\n");
    }
}
