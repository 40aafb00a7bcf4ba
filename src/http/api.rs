//! Handlers of `/api/v1`: parse, call the core, map the answer. Nothing else.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;

use super::error::ApiError;
use super::limits::Tier;
use super::requests;
use super::{cursor, export, extract, views, AppState, Json};
use crate::core::{Catalogue, OrderPosition, ProductChange, ShelfChange};
use crate::domain::shelf::Shelf;
use crate::domain::DomainError;

pub(super) type ApiResult<T> = Result<T, ApiError>;

// ---- merchant ----

pub async fn create_product(
    State(st): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let (core, req): (_, requests::NewProduct) = st.admin_json(&headers, body).await?;
    let key_mode = req.key_mode;
    let info = core.create_product(req.into()).await?;
    let points_price = core.points_price(&info.id);
    let terms = core.product_as_merchant(&info.id)?.terms;
    Ok((StatusCode::CREATED, Json(views::product(&info, &terms, 0, points_price, Shelf::OnSale, 0, key_mode))))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StockBody {
    key: String,
    units: u64,
}

/// `PUT /api/v1/admin/products/{id}/stock`: a reusable product's units of one key.
pub async fn set_stock(
    State(st): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<Value>> {
    let (core, req): (_, StockBody) = st.admin_json(&headers, body).await?;
    let added = core.set_reusable_stock(&id, &req.key, req.units).await?;
    let p = core.product(&id)?;
    Ok(Json(json!({
        "product_id": id,
        "key_mode": p.key_mode.as_str(),
        "units": req.units,
        "added": added,
        "stock": {"imported": p.counts.imported, "available": p.counts.available, "sold": p.counts.sold},
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysBody {
    keys: Vec<String>,
}

pub async fn import_keys(
    State(st): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<Value>> {
    st.require_admin(&headers)?;
    let core = st.core()?;
    let bytes = extract::body(&headers, body, st.limits.max_import_bytes).await?;
    let plain =
        extract::header_str(&headers, "content-type")?.is_some_and(|ct| ct.trim_start().starts_with("text/plain"));
    let keys = if plain {
        let text = std::str::from_utf8(&bytes).map_err(|_| ApiError::invalid("body: keys must be UTF-8 text"))?;
        text.lines().map(str::to_string).collect()
    } else {
        extract::json::<KeysBody>(&bytes)?.keys
    };
    let ((mut imported, mut duplicates), away) = core.import_keys_here(&id, keys).await?;
    // A cluster node sends the keys of the shards other nodes serve to them.
    for (shard, keys) in away {
        let cluster = st.cluster().ok_or_else(|| ApiError::from(crate::error::Error::Elsewhere(shard.clone())))?;
        let path = format!("/api/v1/products/{id}/keys");
        let answer = super::forward::send_part(cluster, &shard, &path, &headers, json!({"keys": keys})).await?;
        imported += answer["imported"].as_u64().unwrap_or(0);
        duplicates += answer["duplicates"].as_u64().unwrap_or(0);
    }
    Ok(Json(json!({"imported": imported, "duplicates": duplicates})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WithdrawBody {
    keys: Option<Vec<String>>,
    count: Option<u64>,
}

/// Takes unsold keys out of stock: `{"keys": [...]}` or `{"count": n}`.
pub async fn withdraw_keys(
    State(st): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<Value>> {
    st.require_admin(&headers)?;
    let core = st.core()?;
    let bytes = extract::body(&headers, body, st.limits.max_import_bytes).await?;
    let what = match extract::json::<WithdrawBody>(&bytes)? {
        WithdrawBody { keys: Some(keys), count: None } => crate::core::Withdrawal::Keys(keys),
        WithdrawBody { keys: None, count: Some(n) } if n > 0 => crate::core::Withdrawal::Count(n),
        WithdrawBody { keys: None, count: Some(_) } => return Err(ApiError::invalid("count: at least 1")),
        _ => return Err(ApiError::invalid("body: either keys or count")),
    };
    let report = core.withdraw_keys(&id, what).await?;
    tracing::info!(product = %id, withdrawn = report.withdrawn, "keys withdrawn from stock");
    Ok(Json(json!({
        "product_id": id,
        "withdrawn": report.withdrawn,
        "not_in_stock": report.not_in_stock,
        "unknown": report.unknown,
    })))
}

pub async fn admin_get_order(
    State(st): State<AppState>,
    Path(order_id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Json<Value>> {
    st.require_admin(&headers)?;
    let order = st.core()?.get_order(&order_id, None).await?;
    Ok(Json(views::admin_order(&order)))
}

/// The query of the merchant's order listing and export.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrdersQuery {
    product: Option<String>,
    status: Option<String>,
    buyer: Option<String>,
    from: Option<String>,
    to: Option<String>,
    /// Orders priced by this reseller (API-key tier) only.
    reseller: Option<String>,
    cursor: Option<String>,
    limit: Option<usize>,
    include_keys: Option<bool>,
    /// Export only: `csv` (default) or `ndjson`.
    format: Option<String>,
}

type Orders = Result<axum::extract::Query<OrdersQuery>, axum::extract::rejection::QueryRejection>;

/// Orders a listing page holds unless `limit` says otherwise.
const DEFAULT_ORDER_PAGE: usize = 100;

impl OrdersQuery {
    fn parse(query: Orders) -> ApiResult<OrdersQuery> {
        query.map(|q| q.0).map_err(|e| ApiError::invalid(format!("query: {e}")))
    }

    /// What to list, checked whole.
    fn to_query(&self) -> ApiResult<crate::core::OrderQuery> {
        let status = match &self.status {
            None => None,
            Some(s) => Some(
                crate::domain::OrderStatus::ALL
                    .into_iter()
                    .find(|v| v.as_str() == s)
                    .ok_or_else(|| ApiError::invalid(format!("status: not an order status: {s}")))?,
            ),
        };
        if let Some(b) = &self.buyer {
            crate::domain::validate::buyer(b).map_err(|m| ApiError::invalid(format!("buyer: {m}")))?;
        }
        let time = |field: &str, v: &Option<String>| v.as_deref().map(|s| super::extract::time(field, s)).transpose();
        let (from_ms, to_ms) = (time("from", &self.from)?, time("to", &self.to)?);
        if let (Some(f), Some(t)) = (from_ms, to_ms) {
            if t <= f {
                return Err(ApiError::invalid("to: must be after from"));
            }
        }
        if let Some(r) = &self.reseller {
            crate::domain::validate::product_id(r).map_err(|m| ApiError::invalid(format!("reseller: {m}")))?;
        }
        let filter = crate::domain::shard::OrderFilter {
            status,
            buyer: self.buyer.clone(),
            from_ms,
            to_ms,
            reseller: self.reseller.clone(),
        };
        Ok(crate::core::OrderQuery { product: self.product.clone(), filter })
    }

    fn after(&self) -> ApiResult<Option<OrderPosition>> {
        let Some(c) = &self.cursor else { return Ok(None) };
        let position = cursor::decode("orders", c)?;
        let mut parts = position.splitn(3, '.');
        let (shard, seq, product) = (parts.next(), parts.next(), parts.next());
        match (shard.and_then(|s| s.parse().ok()), seq.and_then(|s| s.parse().ok()), product) {
            (Some(shard), Some(seq), Some(product)) => Ok(Some(OrderPosition { product: product.into(), shard, seq })),
            _ => Err(cursor::invalid()),
        }
    }
}

fn order_cursor(p: &OrderPosition) -> String {
    cursor::encode("orders", &format!("{}.{}.{}", p.shard, p.seq, p.product))
}

/// `GET /api/v1/admin/orders?product=&status=&buyer=&from=&to=&cursor=&limit=&include_keys=`
/// (merchant): orders by product, shard and sequence; `next_cursor` null at the end.
pub async fn list_orders(State(st): State<AppState>, headers: HeaderMap, query: Orders) -> ApiResult<Json<Value>> {
    st.require_admin(&headers)?;
    let q = OrdersQuery::parse(query)?;
    if q.format.is_some() {
        return Err(ApiError::invalid("format: only for /api/v1/admin/orders/export"));
    }
    let (query, after) = (q.to_query()?, q.after()?);
    let page = st.core()?.list_orders(&query, after.as_ref(), q.limit.unwrap_or(DEFAULT_ORDER_PAGE)).await?;
    let include_keys = q.include_keys.unwrap_or(false);
    let orders: Vec<Value> = page.orders.iter().map(|o| views::listed_order(o, include_keys)).collect();
    Ok(Json(json!({"orders": orders, "next_cursor": page.next.as_ref().map(order_cursor)})))
}

/// `GET /api/v1/admin/orders/export?format=csv|ndjson&include_keys=&...` (merchant):
/// every order the filters keep, streamed.
pub async fn export_orders(State(st): State<AppState>, headers: HeaderMap, query: Orders) -> ApiResult<Response> {
    st.require_admin(&headers)?;
    let q = OrdersQuery::parse(query)?;
    if q.cursor.is_some() || q.limit.is_some() {
        return Err(ApiError::invalid(
            "cursor, limit: an export has every order; list pages with /api/v1/admin/orders",
        ));
    }
    let format = match q.format.as_deref() {
        None | Some("csv") => export::Format::Csv,
        Some("ndjson") => export::Format::Ndjson,
        Some(f) => return Err(ApiError::invalid(format!("format: csv or ndjson, not {f}"))),
    };
    let query = q.to_query()?;
    let core = st.core()?;
    if let Some(p) = &query.product {
        core.product_as_merchant(p)?;
    }
    Ok(export::response(core.clone(), query, format, q.include_keys.unwrap_or(false)))
}

/// The query of the merchant's key listing.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeysQuery {
    state: Option<String>,
    cursor: Option<String>,
    limit: Option<usize>,
    reveal: Option<bool>,
}

/// Keys a listing page holds unless `limit` says otherwise.
const DEFAULT_KEY_PAGE: usize = 100;

/// `GET /api/v1/admin/products/{id}/keys?state=available|reserved|sold&cursor=&limit=&reveal=`
/// (merchant): the product's keys in one state, masked unless `reveal=true`.
pub async fn list_keys(
    State(st): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    query: Result<axum::extract::Query<KeysQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<Value>> {
    use crate::domain::shard::KeyState;
    st.require_admin(&headers)?;
    let axum::extract::Query(q) = query.map_err(|e| ApiError::invalid(format!("query: {e}")))?;
    let state = match q.state.as_deref() {
        None => KeyState::Available,
        Some(s) => KeyState::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| ApiError::invalid(format!("state: available, reserved, sold or withdrawn, not {s}")))?,
    };
    // A cursor belongs to one product and state.
    let scope = format!("keys/{id}/{}", state.as_str());
    let after = match &q.cursor {
        None => None,
        Some(c) => {
            let position = cursor::decode(&scope, c)?;
            let (shard, key) = position.split_once('.').ok_or_else(cursor::invalid)?;
            Some((shard.parse().map_err(|_| cursor::invalid())?, key.parse().map_err(|_| cursor::invalid())?))
        }
    };
    let page = st.core()?.list_keys(&id, state, after, q.limit.unwrap_or(DEFAULT_KEY_PAGE)).await?;
    let reveal = q.reveal.unwrap_or(false);
    if reveal && !page.keys.is_empty() {
        tracing::info!(product = %id, keys = page.keys.len(), state = state.as_str(), "keys revealed to the merchant");
    }
    let keys: Vec<Value> = page
        .keys
        .iter()
        .map(|(shard, key)| {
            let shown = if reveal { key.clone() } else { views::mask(key) };
            json!({"key": shown, "shard": shard})
        })
        .collect();
    let next = page.next.map(|(shard, key)| cursor::encode(&scope, &format!("{shard}.{key}")));
    Ok(Json(json!({"product_id": id, "state": state.as_str(), "keys": keys, "next_cursor": next})))
}

pub async fn audit(State(st): State<AppState>, headers: HeaderMap) -> ApiResult<Json<Value>> {
    st.require_admin(&headers)?;
    let report = st.core()?.audit().await?;
    Ok(Json(views::audit(&report)))
}

/// `POST /api/v1/admin/snapshot`: snapshots every shard now (before maintenance,
/// or to bound the next start's replay) and answers once they are durable.
pub async fn snapshot(State(st): State<AppState>, headers: HeaderMap) -> ApiResult<Json<Value>> {
    st.require_admin(&headers)?;
    let shards = st.core()?.snapshot_all().await?;
    Ok(Json(json!({"snapshots": shards})))
}

/// The body of `POST /api/v1/admin/backup` (may be empty).
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct BackupRequest {
    /// With it, the generated secrets go in too, sealed by it.
    passphrase: Option<String>,
}

/// `POST /api/v1/admin/backup`: an online, consistent backup of the data
/// directory, streamed (`storage::backup`'s format). Selling goes on meanwhile.
pub async fn backup(State(st): State<AppState>, headers: HeaderMap, body: Body) -> ApiResult<Response> {
    st.require_admin(&headers)?;
    let core = st.core()?;
    let bytes = extract::body(&headers, body, st.limits.max_body_bytes).await?;
    let req: BackupRequest =
        if bytes.iter().all(u8::is_ascii_whitespace) { BackupRequest::default() } else { extract::json(&bytes)? };
    if let Some(p) = &req.passphrase {
        if p.len() < crate::core::MIN_PASSPHRASE_BYTES || p.len() > 1024 {
            return Err(ApiError::invalid(format!("passphrase: {} to 1024 bytes", crate::core::MIN_PASSPHRASE_BYTES)));
        }
    }
    let stream = core.backup(req.passphrase)?;
    let chunks = futures::stream::unfold(stream.chunks, |mut rx| async move {
        let next = rx.recv().await?;
        Some((next.map_err(std::io::Error::other), rx))
    });
    let mut r = (StatusCode::OK, Body::from_stream(chunks)).into_response();
    let h = r.headers_mut();
    h.insert(axum::http::header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    h.insert(
        axum::http::header::CONTENT_DISPOSITION,
        HeaderValue::from_static("attachment; filename=\"kami.kamibak\""),
    );
    Ok(r)
}

/// `POST /api/v1/admin/reconcile`: one payment sweep now (query every order not
/// heard of, retry every refund owed, release expired reservations) and its report.
pub async fn reconcile(State(st): State<AppState>, headers: HeaderMap) -> ApiResult<Json<Value>> {
    st.require_admin(&headers)?;
    let report = st.core()?.reconcile().await?;
    Ok(Json(views::reconcile(&report)))
}

/// `GET /api/v1/admin/payments/channels`: each channel with its breaker state.
pub async fn payment_channels(State(st): State<AppState>, headers: HeaderMap) -> ApiResult<Json<Value>> {
    st.require_admin(&headers)?;
    let channels = st.core()?.payment_channels().await?;
    Ok(Json(json!({"channels": channels.iter().map(views::channel).collect::<Vec<_>>()})))
}

// ---- buyer ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KillBody {
    actor: String,
}

/// `POST /api/v1/admin/chaos/kill` (routed only when `chaos.enabled`).
pub async fn chaos_kill(State(st): State<AppState>, headers: HeaderMap, body: Body) -> ApiResult<Json<Value>> {
    let (core, req): (_, KillBody) = st.admin_json(&headers, body).await?;
    let target: crate::chaos::KillTarget = req.actor.parse().map_err(ApiError::invalid)?;
    let killed = core.chaos_kill(&target).await?;
    Ok(Json(json!({"killed": killed})))
}

pub async fn get_product(State(st): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let core = st.core()?;
    let p = core.product(&id)?;
    Ok(Json(views::public_product(&p, core.points_price(&id))))
}

/// `?cursor=&limit=` of a catalogue page.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PageQuery {
    cursor: Option<String>,
    limit: Option<usize>,
}

type Page = Result<axum::extract::Query<PageQuery>, axum::extract::rejection::QueryRejection>;

/// Products a catalogue page holds unless `limit` says otherwise.
const DEFAULT_CATALOGUE_PAGE: usize = 100;

/// One catalogue page: `{"products": [...], "next_cursor"}` (null on the last page).
fn catalogue_page(st: &AppState, which: Catalogue, query: Page) -> ApiResult<Json<Value>> {
    let axum::extract::Query(q) = query.map_err(|e| ApiError::invalid(format!("query: {e}")))?;
    let scope = match which {
        Catalogue::OnSale => "products",
        Catalogue::All => "admin-products",
    };
    let after = q.cursor.as_deref().map(|c| cursor::decode(scope, c)).transpose()?;
    let limit = q.limit.unwrap_or(DEFAULT_CATALOGUE_PAGE);
    let core = st.core()?;
    let (page, next) = core.catalogue(which, after.as_deref(), limit)?;
    let products: Vec<Value> = page
        .iter()
        .map(|p| match which {
            Catalogue::OnSale => views::public_product(p, core.points_price(&p.info.id)),
            Catalogue::All => views::merchant_product(p, core.points_price(&p.info.id)),
        })
        .collect();
    Ok(Json(json!({"products": products, "next_cursor": next.map(|id| cursor::encode(scope, &id))})))
}

/// `GET /api/v1/products?cursor=&limit=`: the products on sale, in id order.
pub async fn catalogue(State(st): State<AppState>, query: Page) -> ApiResult<Json<Value>> {
    catalogue_page(&st, Catalogue::OnSale, query)
}

/// `GET /api/v1/admin/products?cursor=&limit=` (merchant): every product, deleted
/// ones too, with every counter.
pub async fn admin_catalogue(State(st): State<AppState>, headers: HeaderMap, query: Page) -> ApiResult<Json<Value>> {
    st.require_admin(&headers)?;
    catalogue_page(&st, Catalogue::All, query)
}

/// `PATCH /api/v1/products/{id}` (merchant): name, price, per-buyer limit, sale
/// window, on or off the shelf. Durable when answered; orders already created keep
/// their amounts.
pub async fn change_product(
    State(st): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<Value>> {
    let (core, patch): (_, requests::ProductPatch) = st.admin_json(&headers, body).await?;
    let change = ProductChange::try_from(patch).map_err(ApiError::invalid)?;
    let p = core.change_product(&id, change).await?;
    Ok(Json(views::merchant_product(&p, core.points_price(&id))))
}

/// `GET /api/v1/admin/products/{id}` (merchant): every field of the product, its
/// points price and its stock over all shards (as last made durable).
pub async fn admin_get_product(
    State(st): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Json<Value>> {
    st.require_admin(&headers)?;
    Ok(Json(merchant_product(&st, &id)?))
}

/// A product with its stock, as the merchant routes answer it (deleted ones too).
fn merchant_product(st: &AppState, id: &str) -> ApiResult<Value> {
    let core = st.core()?;
    let p = core.product_as_merchant(id)?;
    Ok(views::merchant_product(&p, core.points_price(id)))
}

/// `POST /api/v1/admin/products/{id}/retire`: off the shelf (no new orders, seats or
/// redemptions; existing orders go on). Durable when answered.
pub async fn retire_product(
    State(st): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Json<Value>> {
    change_shelf(st, id, headers, ShelfChange::Retire).await
}

/// `POST /api/v1/admin/products/{id}/relist`: back on sale.
pub async fn relist_product(
    State(st): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Json<Value>> {
    change_shelf(st, id, headers, ShelfChange::Relist).await
}

/// `DELETE /api/v1/admin/products/{id}`: gone from the shop, for good; only off the
/// shelf and with no open order.
pub async fn delete_product(
    State(st): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Json<Value>> {
    change_shelf(st, id, headers, ShelfChange::Delete).await
}

async fn change_shelf(st: AppState, id: String, headers: HeaderMap, change: ShelfChange) -> ApiResult<Json<Value>> {
    st.require_admin(&headers)?;
    st.core()?.change_shelf(&id, change).await?;
    Ok(Json(merchant_product(&st, &id)?))
}

// ---- points ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PointsPriceBody {
    points_price: Option<u64>,
}

/// `PUT /api/v1/products/{id}/points-price` (merchant): `{"points_price": N}` or null.
pub async fn set_points_price(
    State(st): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<Value>> {
    let (core, req): (_, PointsPriceBody) = st.admin_json(&headers, body).await?;
    core.set_points_price(&id, req.points_price).await?;
    Ok(Json(json!({"id": id, "points_price": req.points_price})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AdjustBody {
    request_id: String,
    delta: i64,
    #[serde(default)]
    note: String,
}

/// `POST /api/v1/admin/buyers/{buyer}/points` (merchant): credit or debit, idempotent
/// by `request_id`.
pub async fn adjust_points(
    State(st): State<AppState>,
    Path(buyer): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<Value>> {
    let (core, req): (_, AdjustBody) = st.admin_json(&headers, body).await?;
    let balance = core.adjust_points(&buyer, &req.request_id, req.delta, &req.note).await?;
    Ok(Json(views::balance(&buyer, &balance)))
}

/// `GET /api/v1/buyers/{buyer}/points` with the buyer's `X-Buyer-Token` (or the
/// admin token): a balance is the buyer's business only.
pub async fn get_points(
    State(st): State<AppState>,
    Path(buyer): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Json<Value>> {
    st.require_buyer(&headers, &buyer)?;
    let (balance, _) = st.core()?.points_statement(&buyer, 0).await?;
    Ok(Json(views::balance(&buyer, &balance)))
}

/// `GET /api/v1/admin/buyers/{buyer}/token` (merchant): the buyer's `X-Buyer-Token`,
/// for a storefront that does not compute it itself.
pub async fn buyer_token(
    State(st): State<AppState>,
    Path(buyer): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Json<Value>> {
    st.require_admin(&headers)?;
    crate::domain::validate::buyer(&buyer).map_err(ApiError::invalid)?;
    Ok(Json(json!({"buyer": buyer, "token": st.buyer_token(&buyer)})))
}

/// `?limit=N` of a listing.
#[derive(Deserialize)]
pub struct LimitQuery {
    limit: Option<usize>,
}

type Limit = Result<axum::extract::Query<LimitQuery>, axum::extract::rejection::QueryRejection>;

/// The `limit` asked for (`default` when absent), at most `max`; a malformed query is 422.
fn limit(query: Limit, default: usize, max: usize) -> ApiResult<usize> {
    let axum::extract::Query(q) = query.map_err(|e| ApiError::invalid(format!("query: {e}")))?;
    Ok(q.limit.unwrap_or(default).min(max))
}

/// Most ledger lines one statement shows.
const MAX_LEDGER_LINES: usize = 1000;

/// `GET /api/v1/admin/buyers/{buyer}/points/ledger?limit=N` (merchant): the newest
/// `limit` (default and most 1,000) lines of the buyer's append-only ledger.
pub async fn points_ledger(
    State(st): State<AppState>,
    Path(buyer): Path<String>,
    query: Limit,
    headers: HeaderMap,
) -> ApiResult<Json<Value>> {
    st.require_admin(&headers)?;
    let limit = limit(query, MAX_LEDGER_LINES, MAX_LEDGER_LINES)?;
    let (balance, entries) = st.core()?.points_statement(&buyer, limit).await?;
    let mut v = views::balance(&buyer, &balance);
    v["entries"] = entries.iter().map(views::ledger_entry).collect();
    Ok(Json(v))
}

/// `POST /api/v1/redemptions` with `Idempotency-Key` (required): points for keys.
pub async fn redeem(
    State(st): State<AppState>,
    tier: Option<Extension<Arc<Tier>>>,
    caller: Caller,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let (core, key, req) =
        buyer_request::<requests::Redemption>(&st, &tier, &caller, &headers, body, |r| &r.buyer).await?;
    let key = key.ok_or_else(|| ApiError::invalid("Idempotency-Key: required for redemptions"))?;
    let redeemed = core.redeem(req.into(), &key).await?;
    crate::telemetry::record_order(&redeemed.order.order_id());
    let mut response = (StatusCode::CREATED, Json(views::redeemed(&redeemed))).into_response();
    if redeemed.order.replayed {
        response.headers_mut().insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    Ok(response)
}

pub async fn create_order(
    State(st): State<AppState>,
    tier: Option<Extension<Arc<Tier>>>,
    caller: Caller,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let (core, idempotency_key, req) =
        buyer_request::<requests::NewOrder>(&st, &tier, &caller, &headers, body, |r| &r.buyer).await?;
    let mut req: crate::core::OrderRequest = req.into();
    req.reseller = tier.as_ref().and_then(|Extension(t)| t.reseller_price(&req.product_id));
    // An order that may go to any shard (no per-buyer limit, no key to pin).
    let spreads = idempotency_key.is_none() && req.coupon.is_none();
    let (product, buyer) = (req.product_id.clone(), req.buyer.clone());
    let order = match core.create_order(req, idempotency_key).await {
        // Sold out on this cluster node's shards: the nodes serving the others are
        // asked in turn (see `forward`).
        Err(e @ crate::error::Error::Domain(crate::domain::DomainError::SoldOut { .. })) if spreads => {
            let mut refused = ApiError::from(e);
            refused.elsewhere = Some(Box::new(core.siblings_elsewhere(&product, &buyer)));
            return Err(refused);
        }
        // Its shard is served elsewhere: there first, then the others in turn.
        Err(e @ crate::error::Error::Elsewhere(_)) if spreads => {
            let mut refused = ApiError::from(e);
            let mut shards = refused.elsewhere.take().map(|b| *b).unwrap_or_default();
            for s in core.siblings_elsewhere(&product, &buyer) {
                if !shards.contains(&s) {
                    shards.push(s);
                }
            }
            refused.elsewhere = Some(Box::new(shards));
            return Err(refused);
        }
        other => other?,
    };
    Ok(order_created(&core, &order, |order_id, channel, pay_url| {
        views::to_json(&views::order_created(&order, order_id, channel, pay_url))
    }))
}

/// `POST /api/v1/orders/lookup` (查单): a buyer's orders that their query password
/// opens, newest first (`{"buyer", "query_password", "cursor"?, "limit"?}`), or
/// one order (`{"order_id", "query_password"}`). A wrong password, an unknown buyer
/// and an order without a password all answer `{"orders": []}`. Its own strict
/// limits per client address and per buyer (or order) come first; a storefront
/// with a verified `X-Api-Key` (many buyers behind one address) is limited per
/// buyer only.
pub async fn lookup_orders(
    State(st): State<AppState>,
    tier: Option<Extension<Arc<Tier>>>,
    caller: Caller,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<Value>> {
    let core = st.core()?;
    let bytes = extract::body(&headers, body, st.limits.max_body_bytes).await?;
    let req: requests::Lookup = extract::json(&bytes)?;
    // Checked before either limiter keys on it: keys bounded in size too.
    let subject = match (&req.buyer, &req.order_id) {
        (Some(buyer), None) => {
            crate::domain::validate::buyer(buyer).map_err(ApiError::invalid)?;
            buyer.clone()
        }
        (None, Some(order_id)) => {
            if req.cursor.is_some() || req.limit.is_some() {
                return Err(ApiError::invalid("cursor, limit: only for a lookup by buyer"));
            }
            if order_id.len() > MAX_ORDER_ID_BYTES {
                return Err(ApiError::invalid(format!("order_id: at most {MAX_ORDER_ID_BYTES} bytes")));
            }
            order_id.clone()
        }
        _ => return Err(ApiError::invalid("buyer or order_id: exactly one of them")),
    };
    let limits = &st.lookup_limits;
    let storefront = tier.as_ref().is_some_and(|Extension(t)| t.is_keyed());
    if let (Some(ip), false) = (caller.0, storefront) {
        limits.per_ip.check(&ip).map_err(|wait| super::rate_limited("lookup", "lookup_ip", wait))?;
    }
    limits.per_subject.check(&subject).map_err(|wait| super::rate_limited("lookup", "lookup_buyer", wait))?;
    let (orders, next) = match (&req.buyer, &req.order_id) {
        (Some(buyer), _) => {
            let scope = format!("lookup:{buyer}");
            let after = req.cursor.as_deref().map(|c| lookup_position(&cursor::decode(&scope, c)?)).transpose()?;
            let limit = req.limit.unwrap_or(DEFAULT_LOOKUP_PAGE);
            let page = core.lookup_orders(buyer, &req.query_password, after, limit).await?;
            let next = page
                .next
                .map(|p| cursor::encode(&scope, &format!("{}/{}/{}/{}", p.created_at_ms, p.product, p.shard, p.seq)));
            (page.orders, next)
        }
        (None, _) => (core.lookup_order(&subject, &req.query_password).await?.into_iter().collect(), None),
    };
    let orders: Vec<Value> = orders.iter().map(views::looked_up_order).collect();
    Ok(Json(json!({"orders": orders, "next_cursor": next})))
}

/// Longest order id a lookup accepts (a product id is at most 64 bytes; a shard
/// and a sequence add at most 27).
const MAX_ORDER_ID_BYTES: usize = 128;

/// Orders a lookup page holds unless `limit` says otherwise.
const DEFAULT_LOOKUP_PAGE: usize = 20;

/// The position a lookup cursor holds: `created_at_ms/product/shard/seq`.
fn lookup_position(s: &str) -> ApiResult<crate::domain::lookup::LookupPosition> {
    let mut parts = s.split('/');
    let mut next = || parts.next().ok_or_else(cursor::invalid);
    let created_at_ms = next()?.parse().map_err(|_| cursor::invalid())?;
    let product = next()?.to_string();
    let shard = next()?.parse().map_err(|_| cursor::invalid())?;
    let seq = next()?.parse().map_err(|_| cursor::invalid())?;
    if parts.next().is_some() {
        return Err(cursor::invalid());
    }
    Ok(crate::domain::lookup::LookupPosition { created_at_ms, product, shard, seq })
}

/// The 201 of a new order (or its replay): the order id recorded on the request's
/// span, the channel to pay on and its pay URL, `Idempotent-Replayed` on a replay.
fn order_created(
    core: &crate::core::Kami,
    order: &crate::actors::shard::OrderSnapshot,
    body: impl FnOnce(&str, &str, Option<String>) -> Vec<u8>,
) -> Response {
    let order_id = order.order_id();
    crate::telemetry::record_order(&order_id);
    let channel = core.pick_channel();
    let pay_url = core.pay_url(channel, &order_id, order.order.amount_cents);
    let json = [(axum::http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"))];
    let mut response = (StatusCode::CREATED, json, body(&order_id, &channel.name, pay_url)).into_response();
    if order.replayed {
        response.headers_mut().insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    response
}

// ---- group-buy ----

/// `POST /api/v1/products/{id}/group-deals`: 201 when created, 200 when the same
/// deal exists already, 409 `deal_exists` when one with other terms does.
pub async fn create_group_deal(
    State(st): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let (core, req): (_, requests::NewDeal) = st.admin_json(&headers, body).await?;
    let (deal, created) = core.create_group_deal(&id, req.into()).await?;
    let status = if created { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(views::deal(&deal))))
}

pub async fn group_deals(State(st): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let deals = st.core()?.group_deals(&id)?;
    Ok(Json(json!({"product_id": id, "deals": deals.iter().map(views::deal).collect::<Vec<_>>()})))
}

/// `POST /api/v1/groups`: open a group (or `join_open`), optional `Idempotency-Key`.
pub async fn open_group(
    State(st): State<AppState>,
    tier: Option<Extension<Arc<Tier>>>,
    caller: Caller,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let (core, idempotency_key, req) =
        buyer_request::<requests::OpenGroup>(&st, &tier, &caller, &headers, body, |r| &r.buyer).await?;
    let seat = core.open_group(req.into(), idempotency_key).await?;
    Ok(seat_created(&core, &seat))
}

/// `POST /api/v1/groups/{group_id}/join`, optional `Idempotency-Key`.
pub async fn join_group(
    State(st): State<AppState>,
    tier: Option<Extension<Arc<Tier>>>,
    caller: Caller,
    Path(group_id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let (core, idempotency_key, req) =
        buyer_request::<requests::JoinGroup>(&st, &tier, &caller, &headers, body, |r| &r.buyer).await?;
    let seat = core.join_group(&group_id, req.into(), idempotency_key).await?;
    Ok(seat_created(&core, &seat))
}

/// `GET /api/v1/products/{id}/group-deals/{deal_id}/groups?limit=` (default 20, at
/// most 50): open groups with a free seat, oldest first.
pub async fn open_groups(
    State(st): State<AppState>,
    Path((id, deal_id)): Path<(String, String)>,
    query: Limit,
) -> ApiResult<Json<Value>> {
    let limit = limit(query, 20, crate::core::MAX_OPEN_GROUPS_LISTED)?;
    let groups = st.core()?.open_groups(&id, &deal_id, limit).await?;
    Ok(Json(
        json!({"product_id": id, "deal_id": deal_id, "groups": groups.iter().map(views::group).collect::<Vec<_>>()}),
    ))
}

pub async fn get_group(State(st): State<AppState>, Path(group_id): Path<String>) -> ApiResult<Json<Value>> {
    let group = st.core()?.get_group(&group_id).await?;
    Ok(Json(views::group(&group)))
}

/// The start of a buyer's request that creates an order: the core, the optional
/// `Idempotency-Key` scoped to its caller and buyer, the body parsed strictly, and
/// the buyer's rate limit checked.
async fn buyer_request<T: serde::de::DeserializeOwned>(
    st: &AppState,
    tier: &Option<Extension<Arc<Tier>>>,
    caller: &Caller,
    headers: &HeaderMap,
    body: Body,
    buyer: fn(&T) -> &String,
) -> ApiResult<(Arc<crate::core::Kami>, Option<String>, T)> {
    let core = st.core()?;
    let raw_key = extract::header_str(headers, "idempotency-key")?;
    let bytes = extract::body(headers, body, st.limits.max_body_bytes).await?;
    let req: T = extract::json(&bytes)?;
    // A request another node of the cluster forwarded was limited there.
    let limited = if super::forward::forwarded(st, headers) { &None } else { tier };
    check_buyer_rate(limited, buyer(&req))?;
    let idempotency_key = raw_key.map(|k| scoped_key(caller, tier, buyer(&req), k)).transpose()?;
    Ok((core, idempotency_key, req))
}

/// Who sent a request, for scoping its Idempotency-Key: the address it came from.
pub struct Caller(Option<std::net::IpAddr>);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Caller {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, _: &S) -> Result<Caller, Self::Rejection> {
        let addr = parts.extensions.get::<axum::extract::ConnectInfo<std::net::SocketAddr>>();
        Ok(Caller(addr.map(|c| c.0.ip())))
    }
}

/// An Idempotency-Key means "the same request again" only from the same caller for
/// the same buyer: the API-key tier that sent it (a verified `X-Api-Key`), or else
/// the client's address. So a key another client guessed or sent first never
/// replays that client's order (or its `query_token`) to anyone else, and a key
/// reused with another body refuses only its own caller.
fn scoped_key(caller: &Caller, tier: &Option<Extension<Arc<Tier>>>, buyer: &str, key: &str) -> ApiResult<String> {
    crate::domain::validate::token("Idempotency-Key", key).map_err(ApiError::invalid)?;
    let scope = match (tier, caller.0) {
        (Some(Extension(t)), _) if t.is_keyed() => format!("key:{}", t.name),
        (_, Some(ip)) => format!("ip:{ip}"),
        (_, None) => "local".to_string(),
    };
    Ok(crate::core::scoped_idempotency_key(&scope, buyer, key))
}

/// The per-buyer rate limit of the request's tier (the rate-limit layer attaches it).
/// The buyer is checked first: a limiter's keys are bounded in number and, so, in
/// size (a buyer is at most 254 bytes; a longer one would be refused anyway).
fn check_buyer_rate(tier: &Option<Extension<Arc<Tier>>>, buyer: &String) -> ApiResult<()> {
    crate::domain::validate::buyer(buyer).map_err(ApiError::invalid)?;
    if let Some(Extension(tier)) = tier {
        tier.check_buyer(buyer).map_err(|wait_secs| super::rate_limited(&tier.name, "buyer", wait_secs))?;
    }
    Ok(())
}

fn seat_created(core: &crate::core::Kami, seat: &crate::actors::shard::GroupSeat) -> Response {
    order_created(core, &seat.order, |order_id, channel, pay_url| {
        views::to_json(&views::seat(seat, order_id, channel, pay_url))
    })
}

fn order_token(headers: &HeaderMap) -> ApiResult<&str> {
    // A missing token is indistinguishable from a wrong one.
    extract::header_str(headers, "x-order-token")
        .ok()
        .flatten()
        .ok_or_else(|| ApiError::from(crate::error::Error::Domain(DomainError::OrderNotFound)))
}

pub async fn get_order(
    State(st): State<AppState>,
    Path(order_id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Json<Value>> {
    crate::telemetry::record_order(&order_id);
    let core = st.core()?;
    let order = core.get_order(&order_id, Some(order_token(&headers)?)).await?;
    Ok(Json(views::order(&order)))
}

pub async fn cancel_order(
    State(st): State<AppState>,
    Path(order_id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Json<Value>> {
    crate::telemetry::record_order(&order_id);
    let core = st.core()?;
    let order = core.cancel_order(&order_id, order_token(&headers)?).await?;
    Ok(Json(views::order(&order)))
}

// ---- payment channels ----

pub async fn notify(
    State(st): State<AppState>,
    Path(channel): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let core = st.core()?;
    if core.is_gateway_channel(&channel) {
        return Ok(notify_gateway(&st, &core, &channel, &headers, body).await);
    }
    let bytes = extract::body(&headers, body, st.limits.max_body_bytes).await?;
    let signature = extract::header_str(&headers, "x-signature").ok().flatten();
    core.notify(&channel, &bytes, signature).await?;
    Ok(Json(json!({"result": "success"})).into_response())
}

/// A real gateway's notification, answered in the shape that gateway expects: its
/// success reply only once the outcome is durable, its failure reply (carrying
/// kami's error code) otherwise. A malformed notification is a 400 here.
async fn notify_gateway(
    st: &AppState,
    core: &crate::core::Kami,
    channel: &str,
    headers: &HeaderMap,
    body: Body,
) -> Response {
    let outcome = match extract::body(headers, body, st.limits.max_body_bytes).await {
        Ok(bytes) => core.notify_gateway(channel, headers, &bytes).await.map_err(ApiError::from),
        Err(e) => Err(e),
    };
    let reply = match &outcome {
        Ok(_) => core.gateway_reply(channel, None),
        Err(e) => {
            let status = if e.code == "invalid_request" { StatusCode::BAD_REQUEST } else { e.status };
            core.gateway_reply(channel, Some((status.as_u16(), e.code, &e.message)))
        }
    };
    let Some(reply) = reply else {
        return ApiError::from(crate::error::Error::UnknownChannel(channel.to_string())).into_response();
    };
    let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, [(axum::http::header::CONTENT_TYPE, reply.content_type)], reply.body).into_response()
}

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct PayRequest {
    /// A channel by name; absent = the one routing picks.
    #[serde(default)]
    channel: Option<String>,
    /// WeChat Pay inside WeChat (JSAPI): the paying user's openid.
    #[serde(default)]
    openid: Option<String>,
}

/// `POST /api/v1/orders/{order_id}/pay`: where the buyer pays, made by the channel's
/// gateway now (a page URL, or a QR code's content for WeChat Pay Native).
pub async fn pay(
    State(st): State<AppState>,
    Path(order_id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<Value>> {
    crate::telemetry::record_order(&order_id);
    let core = st.core()?;
    let bytes = extract::body(&headers, body, st.limits.max_body_bytes).await?;
    let request: PayRequest =
        if bytes.iter().all(u8::is_ascii_whitespace) { PayRequest::default() } else { extract::json(&bytes)? };
    let link =
        core.pay_link(&order_id, order_token(&headers)?, request.channel.as_deref(), request.openid.as_deref()).await?;
    let (field, value) = match link.link {
        crate::core::PayLink::Url(url) => ("pay_url", json!(url)),
        crate::core::PayLink::Qr(code) => ("qr_code", json!(code)),
        crate::core::PayLink::Jsapi(params) => ("jsapi", json!(params)),
    };
    Ok(Json(json!({"order_id": order_id, "channel": link.channel, "kind": link.kind.as_str(), field: value})))
}

/// `GET /api/v1/cluster/audit/{product}`: for another node of the cluster (its
/// forwarding token in `X-Kami-Forwarded`), the audits of the product's shards this
/// node serves, encoded for that node (`core::cluster::AuditWire`).
pub async fn cluster_audit(
    State(st): State<AppState>,
    Path(product): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    if !super::forward::forwarded(&st, &headers) {
        return Err(ApiError::unauthorized());
    }
    let core = st.core()?;
    let bytes = core.audit_for_node(&product).await?;
    Ok(([(axum::http::header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response())
}

/// The body of a call from another node of the cluster (its forwarding token
/// only; anyone else 401), at most `limit` bytes.
async fn node_call(st: &AppState, headers: &HeaderMap, body: Body, limit: usize) -> ApiResult<axum::body::Bytes> {
    if !super::forward::forwarded(st, headers) {
        return Err(ApiError::unauthorized());
    }
    extract::body(headers, body, limit).await
}

fn octets(bytes: Vec<u8>) -> Response {
    ([(axum::http::header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response()
}

/// `POST /api/v1/cluster/shard/{product}/{shard}`: for another node of the cluster
/// (its forwarding token), one call of a shard this node serves (a page of orders
/// or keys, a buyer's orders, open orders, a withdrawal, keys or units to add, a
/// held redemption's order, an order by idempotency key), encoded as that node
/// sent it (`core::remote`), its body up to `keys.max_import_bytes`; 503
/// `shard_elsewhere` if the shard is no longer served here.
pub async fn cluster_shard_call(
    State(st): State<AppState>,
    Path((product, shard)): Path<(String, u16)>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let call = node_call(&st, &headers, body, st.limits.max_import_bytes).await?;
    Ok(octets(st.core()?.call_for_node(&product, shard, &call).await?))
}

/// `POST /api/v1/cluster/ledger/{book}/{shard}/{call}`: for another node of the
/// cluster (its forwarding token): a message of a points or coupon shard this node
/// serves, sent to its actor (`core::remote`), its body up to
/// `server.max_body_bytes`; the answer as bincode.
pub async fn cluster_ledger_call(
    State(st): State<AppState>,
    Path((book, shard, name)): Path<(String, u16, String)>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let call = node_call(&st, &headers, body, st.limits.max_body_bytes).await?;
    Ok(octets(st.core()?.ledger_for_node(&book, shard, &name, &call).await?))
}
