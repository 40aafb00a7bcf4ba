//! The sandbox playing a real gateway: Alipay, WeChat Pay API v3 or Stripe, each
//! with its own requests, signatures, answers and notifications, and keys made for
//! the run. What a simulator checks is what the real gateway checks (the merchant's
//! signature or key on every call, the amount's form); what it sends is signed as
//! the real gateway signs it. Buyers pay with the sandbox's own `POST /pay/{id}`.
//!
//! | kind | create | query | refund | notification |
//! |---|---|---|---|---|
//! | alipay | `GET /gateway.do?method=alipay.trade.page.pay&...` | `POST /gateway.do` `alipay.trade.query` | `alipay.trade.refund` | form, RSA2, `success` expected |
//! | wechatpay | `POST /v3/pay/transactions/native` | `GET /v3/pay/transactions/out-trade-no/{no}` | `POST /v3/refund/domestic/refunds` | JSON, AES-256-GCM resource, signed headers |
//! | stripe | `POST /v1/checkout/sessions` | `GET /v1/payment_intents/search` | `POST /v1/refunds` | `payment_intent.succeeded` and `checkout.session.completed`, `Stripe-Signature` |

use std::path::Path;

use axum::body::Bytes;
use axum::extract::{Query, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Value};

use super::{error, NewPayment, SandboxPayment, Shared};
use crate::domain::money;
use crate::payments::adapter::header;
use crate::payments::alipay::{beijing_time, sign_content};
use crate::payments::keys::{generate_pem_pair, PrivateKey, PublicKey};
use crate::payments::wechatpay::{answer_message, request_message, ApiV3Key};

/// Whose protocol the sandbox speaks, with the gateway's side of the keys.
#[derive(Debug, Clone, Default)]
pub enum Protocol {
    /// kami's own channel protocol (docs/payment-protocol.md).
    #[default]
    Kami,
    Alipay(AlipaySide),
    Wechatpay(WechatSide),
    Stripe(StripeSide),
}

#[derive(Debug, Clone)]
pub struct AlipaySide {
    pub app_id: String,
    /// Verifies the merchant's requests.
    pub app_key: PublicKey,
    /// Signs answers and notifications.
    pub alipay_key: PrivateKey,
}

#[derive(Debug, Clone)]
pub struct WechatSide {
    pub merchant_id: String,
    pub merchant_serial: String,
    pub merchant_key: PublicKey,
    pub platform_key: PrivateKey,
    pub platform_key_id: String,
    pub apiv3_key: ApiV3Key,
    pub app_id: String,
}

#[derive(Debug, Clone)]
pub struct StripeSide {
    pub secret_key: String,
    pub webhook_secret: Vec<u8>,
}

/// One notification request: headers, body, and the exact reply text the gateway
/// needs to count it handled (`None`: any 2xx).
pub struct Notice {
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub success: Option<&'static str>,
}

/// Makes both sides' keys for a channel named `name` of `kind`: the simulator's
/// [`Protocol`], and kami's settings for the channel (`payments.channels.<name>.*`),
/// its key files written into `dir` (readable by the owner only). The endpoint is
/// not among them: it is the simulator's address, known once it listens.
pub fn generate(
    kind: crate::config::ChannelKind,
    name: &str,
    dir: &Path,
) -> std::io::Result<(Protocol, Vec<(String, String)>)> {
    use crate::config::ChannelKind;
    std::fs::create_dir_all(dir)?;
    let write = |file: &str, text: &str| -> std::io::Result<String> {
        let path = dir.join(file);
        std::fs::write(&path, text)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        }
        Ok(path.display().to_string())
    };
    let key = |field: &str| format!("payments.channels.{name}.{field}");
    let invalid = |e: String| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
    let mut settings = vec![(key("kind"), kind.as_str().to_string())];
    let protocol = match kind {
        ChannelKind::Alipay => {
            let (app_private, app_public) = generate_pem_pair();
            let (alipay_private, alipay_public) = generate_pem_pair();
            let app_id = "2021000000000001".to_string();
            settings.push((key("app_id"), app_id.clone()));
            settings.push((key("private_key_file"), write(&format!("{name}-app-private.pem"), &app_private)?));
            settings
                .push((key("platform_public_key_file"), write(&format!("{name}-alipay-public.pem"), &alipay_public)?));
            settings.push((key("notify_url"), format!("http://127.0.0.1/api/v1/payments/{name}/notify")));
            Protocol::Alipay(AlipaySide {
                app_id,
                app_key: PublicKey::parse(&app_public).map_err(invalid)?,
                alipay_key: PrivateKey::parse(&alipay_private).map_err(invalid)?,
            })
        }
        ChannelKind::Wechatpay => {
            let (merchant_private, merchant_public) = generate_pem_pair();
            let (platform_private, platform_public) = generate_pem_pair();
            let apiv3: String = (0..32).map(|_| char::from(b'a' + rand::random::<u8>() % 26)).collect();
            let side = WechatSide {
                merchant_id: "1900000109".into(),
                merchant_serial: "5157F09EFDC096DE15EBE81A47057A7232F1B8E1".into(),
                merchant_key: PublicKey::parse(&merchant_public).map_err(invalid)?,
                platform_key: PrivateKey::parse(&platform_private).map_err(invalid)?,
                platform_key_id: "PUB_KEY_ID_0119000001092025010100000000000000".into(),
                apiv3_key: ApiV3Key::new(apiv3.as_bytes()),
                app_id: "wxd678efh567hg6787".into(),
            };
            settings.push((key("app_id"), side.app_id.clone()));
            settings.push((key("merchant_id"), side.merchant_id.clone()));
            settings.push((key("merchant_serial"), side.merchant_serial.clone()));
            settings
                .push((key("private_key_file"), write(&format!("{name}-merchant-private.pem"), &merchant_private)?));
            settings.push((
                key("platform_public_key_file"),
                write(&format!("{name}-platform-public.pem"), &platform_public)?,
            ));
            settings.push((key("platform_key_id"), side.platform_key_id.clone()));
            settings.push((key("apiv3_key_file"), write(&format!("{name}-apiv3.key"), &apiv3)?));
            settings.push((key("notify_url"), format!("http://127.0.0.1/api/v1/payments/{name}/notify")));
            Protocol::Wechatpay(side)
        }
        ChannelKind::Stripe => {
            let secret_key = format!("sk_test_{:032x}", rand::random::<u128>());
            let webhook_secret = format!("whsec_{:032x}", rand::random::<u128>());
            settings.push((key("secret_key_file"), write(&format!("{name}-secret-key"), &secret_key)?));
            settings.push((key("webhook_secret_file"), write(&format!("{name}-webhook-secret"), &webhook_secret)?));
            settings.push((key("return_url"), "http://127.0.0.1/paid".into()));
            settings.push((key("currency"), "cny".into()));
            Protocol::Stripe(StripeSide { secret_key, webhook_secret: webhook_secret.into_bytes() })
        }
        ChannelKind::Sandbox | ChannelKind::Http => Protocol::Kami,
    };
    Ok((protocol, settings))
}

/// The API routes of a real gateway's protocol.
pub(super) fn routes(protocol: &Protocol) -> Router<Shared> {
    match protocol {
        Protocol::Kami => Router::new(),
        Protocol::Alipay(_) => Router::new().route("/gateway.do", get(alipay_page_pay).post(alipay_api)),
        Protocol::Wechatpay(_) => Router::new()
            .route("/v3/pay/transactions/native", post(wechat_native))
            .route("/v3/pay/transactions/jsapi", post(wechat_jsapi))
            .route("/v3/pay/transactions/out-trade-no/{no}", get(wechat_query))
            .route("/v3/refund/domestic/refunds", post(wechat_refund)),
        Protocol::Stripe(_) => Router::new()
            .route("/v1/checkout/sessions", post(stripe_checkout))
            .route("/v1/payment_intents/search", get(stripe_search))
            .route("/v1/refunds", post(stripe_refund))
            .route("/v1/balance", get(stripe_balance)),
    }
}

/// The notifications of one paid payment, signed afresh.
pub(super) fn notices(protocol: &Protocol, p: &SandboxPayment) -> Vec<Notice> {
    let now = chrono::Utc::now();
    match protocol {
        Protocol::Kami => Vec::new(),
        Protocol::Alipay(a) => {
            let notify_id = format!("{:032x}", rand::random::<u128>());
            let amount = money::cents_to_yuan(p.amount_cents);
            let time = beijing_time(now);
            let mut params: Vec<(&str, &str)> = vec![
                ("notify_time", &time),
                ("notify_type", "trade_status_sync"),
                ("notify_id", &notify_id),
                ("app_id", &a.app_id),
                ("charset", "utf-8"),
                ("version", "1.0"),
                ("trade_no", &p.payment_id),
                ("out_trade_no", &p.reference),
                ("total_amount", &amount),
                ("receipt_amount", &amount),
                ("trade_status", "TRADE_SUCCESS"),
                ("passback_params", &p.order_id),
                ("gmt_payment", &time),
            ];
            let sign = a.alipay_key.sign(sign_content(params.iter().copied(), &["sign", "sign_type"]).as_bytes());
            params.push(("sign_type", "RSA2"));
            params.push(("sign", &sign));
            let body = serde_urlencoded::to_string(&params).expect("form").into_bytes();
            let headers = vec![("content-type".into(), "application/x-www-form-urlencoded; charset=utf-8".into())];
            vec![Notice { headers, body, success: Some("success") }]
        }
        Protocol::Wechatpay(w) => {
            let transaction = json!({
                "mchid": w.merchant_id, "appid": w.app_id, "out_trade_no": p.reference,
                "transaction_id": p.payment_id, "trade_type": "NATIVE", "trade_state": "SUCCESS",
                "trade_state_desc": "支付成功", "attach": p.order_id, "success_time": now.to_rfc3339(),
                "amount": {"total": p.amount_cents, "payer_total": p.amount_cents, "currency": "CNY", "payer_currency": "CNY"},
            });
            let nonce: String = format!("{:012x}", rand::random::<u64>() & 0xffff_ffff_ffff);
            let ciphertext = w.apiv3_key.encrypt(&nonce, "transaction", transaction.to_string().as_bytes());
            let body = serde_json::to_vec(&json!({
                "id": format!("{:032x}", rand::random::<u128>()),
                "create_time": now.to_rfc3339(), "resource_type": "encrypt-resource",
                "event_type": "TRANSACTION.SUCCESS", "summary": "支付成功",
                "resource": {"original_type": "transaction", "algorithm": "AEAD_AES_256_GCM",
                             "ciphertext": ciphertext, "associated_data": "transaction", "nonce": nonce},
            }))
            .expect("json");
            let mut headers = wechat_signed_headers(w, &body);
            headers.push(("content-type".into(), "application/json".into()));
            vec![Notice { headers, body, success: None }]
        }
        Protocol::Stripe(s) => {
            let intent = json!({
                "id": p.payment_id, "object": "payment_intent", "status": "succeeded",
                "amount": p.amount_cents, "amount_received": p.amount_cents, "currency": p.currency,
                "metadata": {"order_id": p.order_id},
            });
            let session = json!({
                "id": format!("cs_{}", &p.payment_id[3..]), "object": "checkout.session",
                "payment_intent": p.payment_id, "payment_status": "paid", "status": "complete",
                "amount_total": p.amount_cents, "currency": p.currency,
                "client_reference_id": p.order_id, "metadata": {"order_id": p.order_id},
            });
            [("payment_intent.succeeded", intent), ("checkout.session.completed", session)]
                .into_iter()
                .map(|(kind, object)| {
                    let body = serde_json::to_vec(&json!({
                        "id": format!("evt_{:024x}", rand::random::<u128>() >> 32), "object": "event",
                        "type": kind, "created": now.timestamp(), "data": {"object": object},
                    }))
                    .expect("json");
                    let signature =
                        crate::payments::stripe::signature_header(&s.webhook_secret, now.timestamp(), &body);
                    Notice {
                        headers: vec![
                            ("stripe-signature".into(), signature),
                            ("content-type".into(), "application/json".into()),
                        ],
                        body,
                        success: None,
                    }
                })
                .collect()
        }
    }
}

// ---- Alipay ----

fn alipay(gw: &Shared) -> &AlipaySide {
    match &gw.config.protocol {
        Protocol::Alipay(a) => a,
        _ => unreachable!("alipay routes only on an alipay sandbox"),
    }
}

/// Checks the merchant's RSA2 signature over the parameters; returns them.
#[allow(clippy::result_large_err)]
fn alipay_params(a: &AlipaySide, params: Vec<(String, String)>) -> Result<Vec<(String, String)>, Response> {
    let get = |name: &str| params.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str()).unwrap_or("");
    let content = sign_content(params.iter().map(|(k, v)| (k.as_str(), v.as_str())), &["sign"]);
    if get("sign_type") != "RSA2" || !a.app_key.verifies(content.as_bytes(), get("sign")) {
        return Err(error(StatusCode::UNAUTHORIZED, "isv.invalid-signature", "验签出错"));
    }
    if get("app_id") != a.app_id {
        return Err(error(StatusCode::UNAUTHORIZED, "isv.invalid-app-id", "无效的AppID参数"));
    }
    Ok(params)
}

fn param<'a>(params: &'a [(String, String)], name: &str) -> &'a str {
    params.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str()).unwrap_or("")
}

/// The buyer opens the page pay URL. A real Alipay shows its cashier; the sandbox
/// answers the payment as JSON so that a test can pay it.
async fn alipay_page_pay(State(gw): State<Shared>, RawQuery(query): RawQuery) -> Response {
    let a = alipay(&gw);
    let params: Vec<(String, String)> = match serde_urlencoded::from_str(query.as_deref().unwrap_or("")) {
        Ok(p) => p,
        Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_request", &e.to_string()),
    };
    let params = match alipay_params(a, params) {
        Ok(p) => p,
        Err(r) => return r,
    };
    if param(&params, "method") != "alipay.trade.page.pay" {
        return error(StatusCode::BAD_REQUEST, "isv.invalid-method", "only alipay.trade.page.pay opens a page");
    }
    let biz: Value = serde_json::from_str(param(&params, "biz_content")).unwrap_or(Value::Null);
    let (Some(out_trade_no), Some(total), Some(passback)) =
        (biz["out_trade_no"].as_str(), biz["total_amount"].as_str(), biz["passback_params"].as_str())
    else {
        return error(
            StatusCode::BAD_REQUEST,
            "isv.missing-biz-content",
            "out_trade_no, total_amount, passback_params",
        );
    };
    let Ok(amount) = money::yuan_to_cents(total) else {
        return error(StatusCode::BAD_REQUEST, "isv.invalid-total-amount", total);
    };
    let notify = Some(param(&params, "notify_url").to_string()).filter(|u| !u.is_empty());
    let expires = biz["time_expire"].as_str().and_then(|t| {
        let t = chrono::NaiveDateTime::parse_from_str(t, "%Y-%m-%d %H:%M:%S").ok()?;
        Some((t - chrono::Duration::hours(8)).and_utc().timestamp_millis() as u64)
    });
    let new =
        NewPayment { notify_url: notify, expires_at_ms: expires, ..NewPayment::new(out_trade_no, passback, amount) };
    match gw.create_payment(new, |n| format!("2026{n:016}")) {
        Ok(p) => super::Json(p).into_response(),
        Err(full) => full,
    }
}

/// `alipay.trade.query` and `alipay.trade.refund`: signed answers.
async fn alipay_api(State(gw): State<Shared>, body: Bytes) -> Response {
    let a = alipay(&gw);
    let params: Vec<(String, String)> = match serde_urlencoded::from_bytes(&body) {
        Ok(p) => p,
        Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_request", &e.to_string()),
    };
    let params = match alipay_params(a, params) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let method = param(&params, "method").to_string();
    let biz: Value = serde_json::from_str(param(&params, "biz_content")).unwrap_or(Value::Null);
    let not_exist =
        json!({"code": "40004", "msg": "Business Failed", "sub_code": "ACQ.TRADE_NOT_EXIST", "sub_msg": "交易不存在"});
    let response = match method.as_str() {
        "alipay.trade.query" => {
            let no = biz["out_trade_no"].as_str().unwrap_or("");
            match gw.payment_for(no) {
                None => not_exist,
                Some(p) => {
                    let status = match p.status.as_str() {
                        "created" => "WAIT_BUYER_PAY",
                        "paid" => "TRADE_SUCCESS",
                        _ => "TRADE_CLOSED",
                    };
                    json!({"code": "10000", "msg": "Success", "trade_no": p.payment_id, "out_trade_no": p.reference,
                           "trade_status": status, "total_amount": money::cents_to_yuan(p.amount_cents)})
                }
            }
        }
        "alipay.trade.refund" => {
            let trade_no = biz["trade_no"].as_str().unwrap_or("");
            let amount = biz["refund_amount"].as_str().and_then(|y| money::yuan_to_cents(y).ok());
            match amount.map(|cents| gw.refund_payment(trade_no, cents)) {
                Some(Ok(p)) => json!({"code": "10000", "msg": "Success", "trade_no": p.payment_id,
                                      "out_trade_no": p.reference, "fund_change": if p.refunds == 1 { "Y" } else { "N" },
                                      "refund_fee": money::cents_to_yuan(p.amount_cents)}),
                Some(Err((StatusCode::NOT_FOUND, _))) => not_exist,
                _ => {
                    json!({"code": "40004", "msg": "Business Failed", "sub_code": "ACQ.TRADE_STATUS_ERROR", "sub_msg": "交易状态不合法"})
                }
            }
        }
        _ => json!({"code": "40004", "msg": "Business Failed", "sub_code": "isv.invalid-method"}),
    };
    let text = response.to_string();
    let sign = a.alipay_key.sign(text.as_bytes());
    let key = format!("{}_response", method.replace('.', "_"));
    let body = format!("{{{}:{text},\"sign\":{}}}", json!(key), json!(sign));
    ([("content-type", "application/json;charset=utf-8")], body).into_response()
}

// ---- WeChat Pay ----

fn wechat(gw: &Shared) -> &WechatSide {
    match &gw.config.protocol {
        Protocol::Wechatpay(w) => w,
        _ => unreachable!("wechatpay routes only on a wechatpay sandbox"),
    }
}

fn wechat_signed_headers(w: &WechatSide, body: &[u8]) -> Vec<(String, String)> {
    let timestamp = chrono::Utc::now().timestamp().to_string();
    let nonce = format!("{:032X}", rand::random::<u128>());
    let signature = w.platform_key.sign(&answer_message(&timestamp, &nonce, body));
    vec![
        ("wechatpay-timestamp".into(), timestamp),
        ("wechatpay-nonce".into(), nonce),
        ("wechatpay-signature".into(), signature),
        ("wechatpay-serial".into(), w.platform_key_id.clone()),
    ]
}

/// A signed answer, as WeChat Pay signs every answer.
fn wechat_answer(w: &WechatSide, status: StatusCode, value: Value) -> Response {
    let body = value.to_string().into_bytes();
    let mut response = (status, [("content-type", "application/json")], body.clone()).into_response();
    for (name, v) in wechat_signed_headers(w, &body) {
        response.headers_mut().insert(
            axum::http::HeaderName::from_bytes(name.as_bytes()).expect("header name"),
            v.parse().expect("header value"),
        );
    }
    response
}

/// Checks the merchant's `Authorization` over the request.
#[allow(clippy::result_large_err)]
fn wechat_authorized(
    w: &WechatSide,
    method: &str,
    path_and_query: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(), Response> {
    let refused = || wechat_answer(w, StatusCode::UNAUTHORIZED, json!({"code": "SIGN_ERROR", "message": "签名错误"}));
    let auth = header(headers, "authorization").unwrap_or("");
    let Some(fields) = auth.strip_prefix("WECHATPAY2-SHA256-RSA2048 ") else { return Err(refused()) };
    let field = |name: &str| {
        fields.split(',').find_map(|kv| {
            let (k, v) = kv.trim().split_once('=')?;
            (k == name).then(|| v.trim_matches('"').to_string())
        })
    };
    let (Some(mchid), Some(nonce), Some(ts), Some(serial), Some(sig)) =
        (field("mchid"), field("nonce_str"), field("timestamp"), field("serial_no"), field("signature"))
    else {
        return Err(refused());
    };
    let Ok(ts) = ts.parse::<i64>() else { return Err(refused()) };
    let body = std::str::from_utf8(body).unwrap_or("");
    let message = request_message(method, path_and_query, ts, &nonce, body);
    let fresh = chrono::Utc::now().timestamp().abs_diff(ts) <= 300;
    if mchid != w.merchant_id
        || serial != w.merchant_serial
        || !fresh
        || !w.merchant_key.verifies(message.as_bytes(), &sig)
    {
        return Err(refused());
    }
    Ok(())
}

async fn wechat_native(State(gw): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    wechat_create(&gw, "/v3/pay/transactions/native", &headers, &body)
}

/// JSAPI: as Native, with a payer; answers `prepay_id` (`wx` + the payment id here).
async fn wechat_jsapi(State(gw): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    wechat_create(&gw, "/v3/pay/transactions/jsapi", &headers, &body)
}

fn wechat_create(gw: &Shared, path: &str, headers: &HeaderMap, body: &[u8]) -> Response {
    let w = wechat(gw);
    let jsapi = path.ends_with("/jsapi");
    if let Err(r) = wechat_authorized(w, "POST", path, headers, body) {
        return r;
    }
    let b: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let (Some(no), Some(total), Some(attach)) =
        (b["out_trade_no"].as_str(), b["amount"]["total"].as_u64(), b["attach"].as_str())
    else {
        return wechat_answer(w, StatusCode::BAD_REQUEST, json!({"code": "PARAM_ERROR", "message": "参数错误"}));
    };
    if jsapi && b["payer"]["openid"].as_str().unwrap_or("").is_empty() {
        return wechat_answer(w, StatusCode::BAD_REQUEST, json!({"code": "PARAM_ERROR", "message": "payer.openid"}));
    }
    if b["mchid"].as_str() != Some(w.merchant_id.as_str()) || b["appid"].as_str() != Some(w.app_id.as_str()) {
        return wechat_answer(
            w,
            StatusCode::BAD_REQUEST,
            json!({"code": "APPID_MCHID_NOT_MATCH", "message": "不匹配"}),
        );
    }
    let notify = b["notify_url"].as_str().map(str::to_string);
    let expires = b["time_expire"]
        .as_str()
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.timestamp_millis() as u64);
    let new = NewPayment { notify_url: notify, expires_at_ms: expires, ..NewPayment::new(no, attach, total) };
    match gw.create_payment(new, |n| format!("42000020262026{n:014}")) {
        Ok(p) if jsapi => wechat_answer(w, StatusCode::OK, json!({"prepay_id": format!("wx{}", p.payment_id)})),
        Ok(p) => wechat_answer(
            w,
            StatusCode::OK,
            json!({"code_url": format!("weixin://wxpay/bizpayurl?pr={}", p.payment_id), "payment_id": p.payment_id}),
        ),
        Err(full) => full,
    }
}

async fn wechat_query(
    State(gw): State<Shared>,
    axum::extract::Path(no): axum::extract::Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let w = wechat(&gw);
    let path = format!("/v3/pay/transactions/out-trade-no/{no}?{}", query.unwrap_or_default());
    if let Err(r) = wechat_authorized(w, "GET", &path, &headers, b"") {
        return r;
    }
    match gw.payment_for(&no) {
        None => wechat_answer(w, StatusCode::NOT_FOUND, json!({"code": "ORDER_NOT_EXIST", "message": "订单不存在"})),
        Some(p) => {
            let state = match p.status.as_str() {
                "created" => "NOTPAY",
                "paid" => "SUCCESS",
                "closed" => "CLOSED",
                _ => "REFUND",
            };
            wechat_answer(
                w,
                StatusCode::OK,
                json!({"mchid": w.merchant_id, "appid": w.app_id, "out_trade_no": p.reference,
                       "transaction_id": p.payment_id, "trade_state": state, "attach": p.order_id,
                       "amount": {"total": p.amount_cents, "payer_total": p.amount_cents, "currency": "CNY"}}),
            )
        }
    }
}

async fn wechat_refund(State(gw): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let w = wechat(&gw);
    if let Err(r) = wechat_authorized(w, "POST", "/v3/refund/domestic/refunds", &headers, &body) {
        return r;
    }
    let b: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let (Some(id), Some(refund), Some(no)) =
        (b["transaction_id"].as_str(), b["amount"]["refund"].as_u64(), b["out_refund_no"].as_str())
    else {
        return wechat_answer(w, StatusCode::BAD_REQUEST, json!({"code": "PARAM_ERROR", "message": "参数错误"}));
    };
    match gw.refund_payment(id, refund) {
        Ok(p) => wechat_answer(
            w,
            StatusCode::OK,
            json!({"refund_id": format!("5030{}", &p.payment_id[4..]), "out_refund_no": no,
                   "transaction_id": p.payment_id, "status": "SUCCESS",
                   "amount": {"refund": refund, "total": p.amount_cents, "currency": "CNY"}}),
        ),
        Err((StatusCode::NOT_FOUND, _)) => {
            wechat_answer(w, StatusCode::NOT_FOUND, json!({"code": "RESOURCE_NOT_EXISTS", "message": "订单不存在"}))
        }
        Err(_) => wechat_answer(w, StatusCode::FORBIDDEN, json!({"code": "INVALID_REQUEST", "message": "退款不合法"})),
    }
}

// ---- Stripe ----

fn stripe(gw: &Shared) -> &StripeSide {
    match &gw.config.protocol {
        Protocol::Stripe(s) => s,
        _ => unreachable!("stripe routes only on a stripe sandbox"),
    }
}

fn stripe_error(status: StatusCode, kind: &str, message: &str) -> Response {
    (status, super::Json(json!({"error": {"type": kind, "message": message}}))).into_response()
}

#[allow(clippy::result_large_err)]
fn stripe_authorized(s: &StripeSide, headers: &HeaderMap) -> Result<(), Response> {
    if header(headers, "authorization") != Some(&format!("Bearer {}", s.secret_key)) {
        return Err(stripe_error(StatusCode::UNAUTHORIZED, "invalid_request_error", "Invalid API Key provided"));
    }
    Ok(())
}

async fn stripe_checkout(State(gw): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let s = stripe(&gw);
    if let Err(r) = stripe_authorized(s, &headers) {
        return r;
    }
    let form: Vec<(String, String)> = serde_urlencoded::from_bytes(&body).unwrap_or_default();
    let get = |name: &str| param(&form, name).to_string();
    let order_id = get("metadata[order_id]");
    let amount: Option<u64> = get("line_items[0][price_data][unit_amount]").parse().ok();
    let quantity: Option<u64> = get("line_items[0][quantity]").parse().ok();
    let currency = get("line_items[0][price_data][currency]");
    let (Some(amount), Some(quantity)) = (amount, quantity) else {
        return stripe_error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "line_items[0] needs unit_amount and quantity",
        );
    };
    if order_id.is_empty()
        || get("payment_intent_data[metadata][order_id]") != order_id
        || get("success_url").is_empty()
    {
        return stripe_error(StatusCode::BAD_REQUEST, "invalid_request_error", "metadata and success_url are required");
    }
    let base = format!("http://{}", gw.config.listen);
    match gw.create_payment(
        NewPayment { currency: &currency, ..NewPayment::new(&order_id, &order_id, amount * quantity) },
        |n| format!("pi_sbx{n:020}"),
    ) {
        Ok(p) => super::Json(json!({
            "id": format!("cs_{}", &p.payment_id[3..]), "object": "checkout.session",
            "url": format!("{base}/pay/{}", p.payment_id), "payment_intent": p.payment_id,
            "amount_total": p.amount_cents, "currency": p.currency, "payment_id": p.payment_id,
        }))
        .into_response(),
        Err(full) => full,
    }
}

async fn stripe_search(
    State(gw): State<Shared>,
    headers: HeaderMap,
    Query(q): Query<Vec<(String, String)>>,
) -> Response {
    let s = stripe(&gw);
    if let Err(r) = stripe_authorized(s, &headers) {
        return r;
    }
    // `metadata['order_id']:'<id>'`
    let query = param(&q, "query");
    let Some(order_id) = query.strip_prefix("metadata['order_id']:'").and_then(|r| r.strip_suffix('\'')) else {
        return stripe_error(StatusCode::BAD_REQUEST, "invalid_request_error", "unsupported search query");
    };
    let data: Vec<Value> = gw
        .payment_for(order_id)
        .filter(|p| p.status == "paid" || p.status == "refunded")
        .map(|p| {
            json!({"id": p.payment_id, "object": "payment_intent", "status": "succeeded",
                   "amount": p.amount_cents, "amount_received": p.amount_cents, "currency": p.currency,
                   "metadata": {"order_id": p.order_id},
                   "latest_charge": {"id": format!("ch_{}", &p.payment_id[3..]), "refunded": p.status == "refunded"}})
        })
        .into_iter()
        .collect();
    super::Json(json!({"object": "search_result", "data": data, "has_more": false})).into_response()
}

async fn stripe_refund(State(gw): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let s = stripe(&gw);
    if let Err(r) = stripe_authorized(s, &headers) {
        return r;
    }
    let form: Vec<(String, String)> = serde_urlencoded::from_bytes(&body).unwrap_or_default();
    let Ok(amount) = param(&form, "amount").parse::<u64>() else {
        return stripe_error(StatusCode::BAD_REQUEST, "invalid_request_error", "amount");
    };
    let pi = param(&form, "payment_intent");
    match gw.refund_payment(pi, amount) {
        Ok(p) => super::Json(json!({"id": format!("re_{}", &p.payment_id[3..]), "object": "refund",
                                    "payment_intent": p.payment_id, "amount": amount, "status": "succeeded"}))
        .into_response(),
        Err((StatusCode::NOT_FOUND, _)) => {
            stripe_error(StatusCode::NOT_FOUND, "invalid_request_error", "No such payment_intent")
        }
        Err(_) => stripe_error(StatusCode::BAD_REQUEST, "invalid_request_error", "charge_already_refunded or not paid"),
    }
}

async fn stripe_balance(State(gw): State<Shared>, headers: HeaderMap) -> Response {
    if let Err(r) = stripe_authorized(stripe(&gw), &headers) {
        return r;
    }
    super::Json(json!({"object": "balance", "available": [], "pending": []})).into_response()
}
