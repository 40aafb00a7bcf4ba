//! Alipay (支付宝) open platform, RSA2.
//!
//! * Requests are form parameters (`app_id`, `method`, `charset`, `sign_type=RSA2`,
//!   `timestamp`, `version`, `biz_content`, ...) signed with the app's private key:
//!   SHA256withRSA over every non-empty parameter but `sign`, sorted by name,
//!   joined as `k=v&k=v` (values raw, not URL-encoded).
//! * Answers are `{"<method>_response": {...}, "sign": "..."}`; the signature covers
//!   the exact text of the `_response` value and is checked with Alipay's public key.
//! * Notifications are form-encoded; the signature covers every non-empty parameter
//!   but `sign` and `sign_type`, sorted. Amounts are yuan strings (`"9.90"`), read
//!   exactly ([`crate::domain::money`]). kami answers the plain text `success` only
//!   once the outcome is durable; anything else makes Alipay retry for about 25 h.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::value::RawValue;
use serde_json::{json, Value};

use super::adapter::{exchange, trade_no, PayOrder, Verified, MAX_NOTIFY_FIELDS};
use super::client::{CallError, QueryAnswer};
use super::keys::{PrivateKey, PublicKey};
use super::notification::Refused;
use crate::domain::money;

#[derive(Debug, Clone)]
pub struct Alipay {
    /// `https://openapi.alipay.com/gateway.do` or a simulator's.
    pub gateway: String,
    pub app_id: String,
    pub private_key: PrivateKey,
    pub alipay_key: PublicKey,
    pub notify_url: String,
    pub return_url: String,
}

/// The string Alipay signs: non-empty parameters but `skip`, sorted, `k=v&k=v`.
pub fn sign_content<'a>(params: impl IntoIterator<Item = (&'a str, &'a str)>, skip: &[&str]) -> String {
    let sorted: BTreeMap<&str, &str> = params.into_iter().filter(|(k, v)| !v.is_empty() && !skip.contains(k)).collect();
    sorted.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("&")
}

/// Alipay's timestamps are Beijing time, `yyyy-MM-dd HH:mm:ss`.
pub fn beijing_time(now: DateTime<Utc>) -> String {
    (now + chrono::Duration::hours(8)).format("%Y-%m-%d %H:%M:%S").to_string()
}

impl Alipay {
    /// The common parameters of a call, `biz_content` and any `extra`, signed.
    async fn signed_params(
        &self,
        method: &str,
        biz: &Value,
        extra: &[(&str, &str)],
        now: DateTime<Utc>,
    ) -> Vec<(String, String)> {
        let mut params: Vec<(String, String)> = vec![
            ("app_id".into(), self.app_id.clone()),
            ("method".into(), method.into()),
            ("format".into(), "JSON".into()),
            ("charset".into(), "utf-8".into()),
            ("sign_type".into(), "RSA2".into()),
            ("timestamp".into(), beijing_time(now)),
            ("version".into(), "1.0".into()),
            ("biz_content".into(), biz.to_string()),
        ];
        params.extend(extra.iter().filter(|(_, v)| !v.is_empty()).map(|(k, v)| (k.to_string(), v.to_string())));
        let content = sign_content(params.iter().map(|(k, v)| (k.as_str(), v.as_str())), &["sign"]);
        params.push(("sign".into(), self.private_key.sign_off_thread(content.into_bytes()).await));
        params
    }

    /// The page the buyer pays on (`alipay.trade.page.pay`, opened with GET). Made
    /// locally: signing needs no call to Alipay.
    pub async fn page_pay_url(&self, order: &PayOrder<'_>, now: DateTime<Utc>) -> String {
        let biz = json!({
            "out_trade_no": trade_no(order.order_id),
            "total_amount": money::cents_to_yuan(order.amount_cents),
            "subject": order.subject,
            "product_code": "FAST_INSTANT_TRADE_PAY",
            "passback_params": order.order_id,
            "time_expire": super::adapter::beijing(order.expires_at_ms).format("%Y-%m-%d %H:%M:%S").to_string(),
        });
        let extra = [("notify_url", self.notify_url.as_str()), ("return_url", self.return_url.as_str())];
        let params = self.signed_params("alipay.trade.page.pay", &biz, &extra, now).await;
        format!("{}?{}", self.gateway, serde_urlencoded::to_string(&params).expect("form encoding"))
    }

    /// Verifies an asynchronous notification (the form body as received).
    pub fn verify_notification(&self, body: &[u8]) -> Result<Verified, Refused> {
        let params: Vec<(String, String)> =
            serde_urlencoded::from_bytes(body).map_err(|e| Refused::Invalid(format!("notification form: {e}")))?;
        if params.len() > MAX_NOTIFY_FIELDS {
            return Err(Refused::Invalid(format!("notification: more than {MAX_NOTIFY_FIELDS} parameters")));
        }
        let get = |name: &str| params.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str()).unwrap_or("");
        if get("sign").is_empty() {
            return Err(Refused::BadSignature);
        }
        if get("sign_type") != "RSA2" {
            return Err(Refused::Invalid("sign_type: only RSA2 is accepted".into()));
        }
        let content = sign_content(params.iter().map(|(k, v)| (k.as_str(), v.as_str())), &["sign", "sign_type"]);
        if !self.alipay_key.verifies(content.as_bytes(), get("sign")) {
            return Err(Refused::BadSignature);
        }
        if get("app_id") != self.app_id {
            return Err(Refused::Invalid("app_id: the notification is for another app".into()));
        }
        let order_id = get("passback_params");
        if order_id.is_empty() || trade_no(order_id) != get("out_trade_no") {
            return Err(Refused::Invalid("out_trade_no and passback_params do not name one kami order".into()));
        }
        let payment_id = get("trade_no");
        crate::domain::validate::token("trade_no", payment_id).map_err(Refused::Invalid)?;
        let amount_cents = money::yuan_to_cents(get("total_amount")).map_err(Refused::Invalid)?;
        let status = get("trade_status");
        let paid = match status {
            "TRADE_SUCCESS" | "TRADE_FINISHED" => true,
            "WAIT_BUYER_PAY" | "TRADE_CLOSED" => false,
            other => return Err(Refused::Invalid(format!("trade_status: unknown {other:?}"))),
        };
        Ok(Verified {
            order_id: order_id.to_string(),
            payment_id: payment_id.to_string(),
            amount_cents,
            paid,
            event: status.to_string(),
        })
    }

    /// Calls `method` and returns its verified `_response` object.
    async fn call(
        &self,
        http: &reqwest::Client,
        method: &str,
        biz: Value,
        timeout: Duration,
    ) -> Result<Value, CallError> {
        let params = self.signed_params(method, &biz, &[], Utc::now()).await;
        let request = http
            .post(&self.gateway)
            .header("content-type", "application/x-www-form-urlencoded;charset=utf-8")
            .body(serde_urlencoded::to_string(&params).expect("form encoding"));
        let (status, _, body) = exchange(request, timeout).await?;
        if status >= 300 {
            return Err(CallError::Status { status, code: String::new() });
        }
        let envelope: BTreeMap<String, Box<RawValue>> =
            serde_json::from_slice(&body).map_err(|e| CallError::BadAnswer(e.to_string()))?;
        let key = format!("{}_response", method.replace('.', "_"));
        let Some(raw) = envelope.get(&key).or_else(|| envelope.get("error_response")) else {
            return Err(CallError::BadAnswer(format!("no {key} in the answer")));
        };
        let response: Value = serde_json::from_str(raw.get()).map_err(|e| CallError::BadAnswer(e.to_string()))?;
        let code = response["code"].as_str().unwrap_or("");
        let signature = envelope.get("sign").and_then(|s| serde_json::from_str::<String>(s.get()).ok());
        let signed = signature.is_some_and(|s| self.alipay_key.verifies(raw.get().as_bytes(), &s));
        match code {
            "10000" if signed => Ok(response),
            "10000" => Err(CallError::BadSignature),
            // Business refusals: the gateway works and says no to this call.
            "40004" => {
                let sub = response["sub_code"].as_str().unwrap_or("").to_string();
                let status = if sub.ends_with("TRADE_NOT_EXIST") { 404 } else { 409 };
                Err(CallError::Status { status, code: sub })
            }
            "40001" | "40002" | "40006" => {
                Err(CallError::Status { status: 400, code: response["sub_code"].as_str().unwrap_or(code).to_string() })
            }
            // 20000 (service unavailable) and anything unknown: the channel is failing.
            other => Err(CallError::Status { status: 503, code: format!("alipay {other}") }),
        }
    }

    /// `alipay.trade.query` by merchant order number.
    pub async fn query(
        &self,
        http: &reqwest::Client,
        order_id: &str,
        timeout: Duration,
    ) -> Result<QueryAnswer, CallError> {
        let biz = json!({"out_trade_no": trade_no(order_id)});
        let r = match self.call(http, "alipay.trade.query", biz, timeout).await {
            Err(CallError::Status { status: 404, .. }) => return Ok(QueryAnswer::Unpaid),
            other => other?,
        };
        if r["out_trade_no"].as_str() != Some(trade_no(order_id).as_str()) {
            return Err(CallError::BadAnswer("the answer is about another order".into()));
        }
        match r["trade_status"].as_str().unwrap_or("") {
            "TRADE_SUCCESS" | "TRADE_FINISHED" => {
                let payment_id = r["trade_no"].as_str().unwrap_or("").to_string();
                let amount = r["total_amount"].as_str().unwrap_or("");
                let amount_cents = money::yuan_to_cents(amount).map_err(CallError::BadAnswer)?;
                if payment_id.is_empty() {
                    return Err(CallError::BadAnswer("paid without trade_no".into()));
                }
                Ok(QueryAnswer::Paid { payment_id, amount_cents })
            }
            // Waiting, or closed (unpaid and timed out, or refunded in full).
            "WAIT_BUYER_PAY" | "TRADE_CLOSED" => Ok(QueryAnswer::Unpaid),
            other => Err(CallError::BadAnswer(format!("trade_status {other:?}"))),
        }
    }

    /// `alipay.trade.refund` in full. `out_request_no` is fixed per payment, so a
    /// repeat is the same refund, never a second one.
    pub async fn refund(
        &self,
        http: &reqwest::Client,
        payment_id: &str,
        amount_cents: u64,
        timeout: Duration,
    ) -> Result<(), CallError> {
        let biz = json!({
            "trade_no": payment_id,
            "refund_amount": money::cents_to_yuan(amount_cents),
            "out_request_no": format!("kami-refund-{payment_id}"),
        });
        let r = self.call(http, "alipay.trade.refund", biz, timeout).await?;
        if r["trade_no"].as_str() != Some(payment_id) {
            return Err(CallError::BadAnswer("the refund answer is about another trade".into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signed_string_is_sorted_without_empty_values_or_the_skipped_names() {
        let params = [("b", "2"), ("sign", "x"), ("a", "1"), ("sign_type", "RSA2"), ("c", "")];
        assert_eq!(sign_content(params, &["sign", "sign_type"]), "a=1&b=2");
        assert_eq!(sign_content(params, &["sign"]), "a=1&b=2&sign_type=RSA2");
    }

    #[test]
    fn timestamps_are_beijing_time() {
        let t = DateTime::parse_from_rfc3339("2026-12-01T20:30:00Z").unwrap().with_timezone(&Utc);
        assert_eq!(beijing_time(t), "2026-12-02 04:30:00");
    }
}
