//! Channels of a real gateway's kind: each speaks its gateway's own protocol
//! (signatures, amounts, replies, retries) and hands kami the same few things —
//! a pay link, a verified notification, a query answer, a refund.
//!
//! * [`alipay`](super::alipay) — RSA2 (SHA256withRSA) over sorted parameters.
//! * [`wechatpay`](super::wechatpay) — API v3: signed requests and answers,
//!   AES-256-GCM notification resources.
//! * [`stripe`](super::stripe) — Bearer key, `Stripe-Signature` webhooks.
//!
//! Nothing here is on the order path: a pay link is made when the buyer asks to
//! pay (`POST /api/v1/orders/{id}/pay`), not when the order is created.

use std::time::Duration;

use axum::http::HeaderMap;
use sha2::{Digest, Sha256};

use super::client::{CallError, QueryAnswer};
use super::notification::Refused;
use super::{alipay, stripe, wechatpay};
use crate::config::{ChannelKind, ChannelSettings};

/// Largest answer body read from a gateway.
pub const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// Most form parameters or JSON fields a notification may carry.
pub const MAX_NOTIFY_FIELDS: usize = 128;

/// Where the buyer pays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PayLink {
    /// A page to send the buyer to (Alipay page pay, Stripe Checkout).
    Url(String),
    /// A code to show as a QR code (WeChat Pay Native: `weixin://...`).
    Qr(String),
    /// WeChat Pay JSAPI (inside WeChat: official accounts, mini programs): the
    /// parameters the page passes to `wx.requestPayment`, signed by the merchant.
    Jsapi(JsapiParams),
}

/// `wx.requestPayment`'s parameters (WeChat Pay JSAPI), in WeChat's own names.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct JsapiParams {
    #[serde(rename = "appId")]
    pub app_id: String,
    #[serde(rename = "timeStamp")]
    pub time_stamp: String,
    #[serde(rename = "nonceStr")]
    pub nonce_str: String,
    /// `prepay_id=...`
    pub package: String,
    #[serde(rename = "signType")]
    pub sign_type: &'static str,
    /// SHA256withRSA by the merchant key over `appId\ntimeStamp\nnonceStr\npackage\n`.
    #[serde(rename = "paySign")]
    pub pay_sign: String,
}

/// What a kami order looks like to a gateway when the buyer pays.
#[derive(Debug, Clone)]
pub struct PayOrder<'a> {
    pub order_id: &'a str,
    pub amount_cents: u64,
    /// Shown to the buyer by the gateway (the product's name or id).
    pub subject: &'a str,
    /// WeChat Pay JSAPI: the paying user's `openid` under the channel's `app_id`.
    pub openid: Option<&'a str>,
    /// When the order expires (Unix ms): Alipay and WeChat Pay are told to close the
    /// trade then (`time_expire`), so a buyer cannot pay an expired order there.
    pub expires_at_ms: u64,
}

/// `expires_at_ms` as a time in Beijing (the Chinese gateways' clocks).
pub fn beijing(ms: u64) -> chrono::DateTime<chrono::FixedOffset> {
    let utc = chrono::DateTime::from_timestamp_millis(ms as i64).unwrap_or_default();
    utc.with_timezone(&chrono::FixedOffset::east_opt(8 * 3600).expect("UTC+8"))
}

/// A notification whose signature verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub order_id: String,
    pub payment_id: String,
    pub amount_cents: u64,
    /// `true` only for a completed payment; anything else (waiting, closed, an event
    /// kami does not act on) is acknowledged and changes nothing.
    pub paid: bool,
    /// The gateway's own name of what happened (`TRADE_SUCCESS`, `payment_intent.succeeded`).
    pub event: String,
}

/// A reply in the shape the gateway expects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

/// The merchant order number a gateway knows a kami order by. Alipay takes only
/// `[A-Za-z0-9_]` and both Chinese gateways at most 64 characters: `.` becomes `_`,
/// `-` becomes `X` (product ids are lowercase, so this is one-to-one), and an id
/// still too long becomes `H` and 40 hex digits of its SHA-256. The kami order id
/// itself travels beside it (`passback_params`, `attach`, `metadata`), signed.
pub fn trade_no(order_id: &str) -> String {
    let readable: String = order_id
        .chars()
        .map(|c| match c {
            '.' => '_',
            '-' => 'X',
            c => c,
        })
        .collect();
    if readable.len() <= 64 {
        readable
    } else {
        format!("H{}", &hex::encode(Sha256::digest(order_id.as_bytes()))[..40])
    }
}

/// A channel of a real gateway's kind, its keys loaded.
#[derive(Debug, Clone)]
pub enum Adapter {
    Alipay(alipay::Alipay),
    Wechatpay(wechatpay::Wechatpay),
    Stripe(stripe::Stripe),
}

impl Adapter {
    /// Reads the channel's key files. `None` for the channel protocol's own kinds.
    /// The error names the setting and the file, never what the file holds.
    pub fn load(name: &str, c: &ChannelSettings) -> Result<Option<Adapter>, String> {
        let endpoint = if c.endpoint.is_empty() { c.kind.default_endpoint().unwrap_or("") } else { &c.endpoint };
        let endpoint = endpoint.trim_end_matches('/').to_string();
        let file = |field: &str, path: &str| {
            super::keys::read_file(path).map_err(|e| format!("payments.channels.{name}.{field}: {e}"))
        };
        let private = |field: &str, path: &str| {
            super::keys::PrivateKey::parse(&file(field, path)?)
                .map_err(|e| format!("payments.channels.{name}.{field}: {path}: {e}"))
        };
        let public = |field: &str, path: &str| {
            super::keys::PublicKey::parse(&file(field, path)?)
                .map_err(|e| format!("payments.channels.{name}.{field}: {path}: {e}"))
        };
        Ok(Some(match c.kind {
            ChannelKind::Sandbox | ChannelKind::Http => return Ok(None),
            ChannelKind::Alipay => Adapter::Alipay(alipay::Alipay {
                gateway: endpoint,
                app_id: c.app_id.clone(),
                private_key: private("private_key_file", &c.private_key_file)?,
                alipay_key: public("platform_public_key_file", &c.platform_public_key_file)?,
                notify_url: c.notify_url.clone(),
                return_url: c.return_url.clone(),
            }),
            ChannelKind::Wechatpay => {
                let apiv3 = file("apiv3_key_file", &c.apiv3_key_file)?;
                let apiv3 = apiv3.trim();
                if apiv3.len() != 32 {
                    return Err(format!(
                        "payments.channels.{name}.apiv3_key_file: {}: the APIv3 key must be 32 characters",
                        c.apiv3_key_file
                    ));
                }
                Adapter::Wechatpay(wechatpay::Wechatpay {
                    base: endpoint,
                    app_id: c.app_id.clone(),
                    merchant_id: c.merchant_id.clone(),
                    merchant_serial: c.merchant_serial.clone(),
                    private_key: private("private_key_file", &c.private_key_file)?,
                    platform_key: public("platform_public_key_file", &c.platform_public_key_file)?,
                    platform_key_id: c.platform_key_id.clone(),
                    apiv3_key: wechatpay::ApiV3Key::new(apiv3.as_bytes()),
                    notify_url: c.notify_url.clone(),
                })
            }
            ChannelKind::Stripe => {
                let secret_key = file("secret_key_file", &c.secret_key_file)?.trim().to_string();
                let webhook_secrets: Vec<Vec<u8>> = file("webhook_secret_file", &c.webhook_secret_file)?
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(|l| l.as_bytes().to_vec())
                    .collect();
                if secret_key.is_empty() || webhook_secrets.is_empty() {
                    return Err(format!("payments.channels.{name}: the Stripe key or webhook secret file is empty"));
                }
                Adapter::Stripe(stripe::Stripe {
                    base: endpoint,
                    secret_key: stripe::SecretKey::new(secret_key),
                    webhook_secrets,
                    currency: c.currency.clone(),
                    success_url: c.return_url.clone(),
                })
            }
        }))
    }

    /// The gateway's base URL (Alipay: its `gateway.do`).
    pub fn endpoint(&self) -> &str {
        match self {
            Adapter::Alipay(a) => &a.gateway,
            Adapter::Wechatpay(w) => &w.base,
            Adapter::Stripe(s) => &s.base,
        }
    }

    pub fn kind(&self) -> ChannelKind {
        match self {
            Adapter::Alipay(_) => ChannelKind::Alipay,
            Adapter::Wechatpay(_) => ChannelKind::Wechatpay,
            Adapter::Stripe(_) => ChannelKind::Stripe,
        }
    }

    pub async fn pay(
        &self,
        http: &reqwest::Client,
        order: &PayOrder<'_>,
        timeout: Duration,
    ) -> Result<PayLink, CallError> {
        match self {
            Adapter::Alipay(a) => Ok(PayLink::Url(a.page_pay_url(order, chrono::Utc::now()).await)),
            Adapter::Wechatpay(w) => match order.openid {
                Some(openid) => w.jsapi(http, order, openid, timeout).await.map(PayLink::Jsapi),
                None => w.native(http, order, timeout).await.map(PayLink::Qr),
            },
            Adapter::Stripe(s) => s.checkout(http, order, timeout).await.map(PayLink::Url),
        }
    }

    pub fn verify(
        &self,
        headers: &HeaderMap,
        body: &[u8],
        now_ms: u64,
        max_skew_secs: u64,
    ) -> Result<Verified, Refused> {
        match self {
            Adapter::Alipay(a) => a.verify_notification(body),
            Adapter::Wechatpay(w) => w.verify_notification(headers, body, now_ms, max_skew_secs),
            Adapter::Stripe(s) => s.verify_webhook(headers, body, now_ms, max_skew_secs),
        }
    }

    /// The reply that tells the gateway the notification is handled (sent only once
    /// its outcome is durable): Alipay's plain `success`, WeChat Pay's `SUCCESS` JSON,
    /// Stripe's 200.
    pub fn ack(&self) -> Reply {
        match self {
            Adapter::Alipay(_) => Reply { status: 200, content_type: "text/plain", body: b"success".to_vec() },
            Adapter::Wechatpay(_) => json_reply(200, serde_json::json!({"code": "SUCCESS", "message": "成功"})),
            Adapter::Stripe(_) => json_reply(200, serde_json::json!({"received": true})),
        }
    }

    /// A refusal in the gateway's shape, carrying kami's stable error code too. Every
    /// refusal makes the gateway retry (Alipay: anything but `success`).
    pub fn refusal(&self, status: u16, code: &str, message: &str) -> Reply {
        let error = serde_json::json!({"code": code, "message": message});
        match self {
            Adapter::Wechatpay(_) => {
                json_reply(status, serde_json::json!({"code": "FAIL", "message": message, "error": error}))
            }
            Adapter::Alipay(_) | Adapter::Stripe(_) => json_reply(status, serde_json::json!({"error": error})),
        }
    }

    pub async fn query(
        &self,
        http: &reqwest::Client,
        order_id: &str,
        timeout: Duration,
    ) -> Result<QueryAnswer, CallError> {
        match self {
            Adapter::Alipay(a) => a.query(http, order_id, timeout).await,
            Adapter::Wechatpay(w) => w.query(http, order_id, timeout).await,
            Adapter::Stripe(s) => s.query(http, order_id, timeout).await,
        }
    }

    pub async fn refund(
        &self,
        http: &reqwest::Client,
        payment_id: &str,
        amount_cents: u64,
        timeout: Duration,
    ) -> Result<(), CallError> {
        match self {
            Adapter::Alipay(a) => a.refund(http, payment_id, amount_cents, timeout).await,
            Adapter::Wechatpay(w) => w.refund(http, payment_id, amount_cents, timeout).await,
            Adapter::Stripe(s) => s.refund(http, payment_id, amount_cents, timeout).await,
        }
    }

    /// A cheap authenticated call whose well-formed answer shows the gateway is up:
    /// a query for an order that does not exist (Alipay, WeChat Pay), the balance (Stripe).
    pub async fn health(&self, http: &reqwest::Client, timeout: Duration) -> Result<(), CallError> {
        match self {
            Adapter::Alipay(a) => a.query(http, HEALTH_ORDER, timeout).await.map(|_| ()),
            Adapter::Wechatpay(w) => w.query(http, HEALTH_ORDER, timeout).await.map(|_| ()),
            Adapter::Stripe(s) => s.balance(http, timeout).await,
        }
    }
}

/// The order the health check asks about (no kami order has this id: no shard number).
pub const HEALTH_ORDER: &str = "kami-health-check";

/// JSON ending in a newline, as every JSON answer of kami's.
fn json_reply(status: u16, value: serde_json::Value) -> Reply {
    let mut body = serde_json::to_vec(&value).expect("json");
    body.push(b'\n');
    Reply { status, content_type: "application/json", body }
}

/// What a gateway answered: status, headers, body (at most `MAX_ANSWER_BYTES`), all
/// within `timeout`. Transport failures and timeouts are errors; any status is not.
pub async fn exchange(
    request: reqwest::RequestBuilder,
    timeout: Duration,
) -> Result<(u16, reqwest::header::HeaderMap, Vec<u8>), CallError> {
    let exchange = async {
        let mut resp = request.send().await.map_err(|e| CallError::Transport(e.to_string()))?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| CallError::Transport(e.to_string()))? {
            if body.len() + chunk.len() > MAX_ANSWER_BYTES {
                return Err(CallError::BadAnswer(format!("answer larger than {MAX_ANSWER_BYTES} bytes")));
            }
            body.extend_from_slice(&chunk);
        }
        Ok((status, headers, body))
    };
    tokio::time::timeout(timeout, exchange).await.map_err(|_| CallError::Timeout(timeout))?
}

/// A header's value as text (absent or not text: `None`).
pub fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merchant_order_numbers_are_one_to_one_and_fit_the_gateways() {
        assert_eq!(trade_no("flash.0.17"), "flash_0_17");
        assert_eq!(trade_no("a-b.1.2"), "aXb_1_2");
        assert_ne!(trade_no("a_b.0.1"), trade_no("a.b0.1"));
        let long = format!("{}.65535.18446744073709551615", "p".repeat(64));
        let t = trade_no(&long);
        assert!(t.len() <= 64 && t.starts_with('H'), "{t}");
        for t in [trade_no("a-b_c.3.4"), t] {
            assert!(t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'), "{t}");
        }
    }
}
