//! Merchant coupon routes: define, list, read, disable (`/api/v1/admin/coupons`).

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};

use serde::Deserialize;
use serde_json::{json, Value};

use super::api::ApiResult;
use super::error::ApiError;
use super::{extract, AppState, Json};
use crate::domain::coupon::{Coupon, CouponKind, CouponSpec};

/// `POST /api/v1/admin/coupons`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewCoupon {
    code: String,
    kind: CouponKind,
    value: u64,
    max_uses: u64,
    #[serde(default)]
    per_buyer_max: u32,
    #[serde(default)]
    products: Vec<String>,
    #[serde(default)]
    min_amount_cents: u64,
    starts_at: Option<String>,
    ends_at: Option<String>,
}

impl NewCoupon {
    fn spec(self) -> Result<CouponSpec, ApiError> {
        let time = |field: &str, v: Option<String>| v.map(|s| extract::time(field, &s)).transpose();
        Ok(CouponSpec {
            starts_at_ms: time("starts_at", self.starts_at)?,
            ends_at_ms: time("ends_at", self.ends_at)?,
            code: self.code,
            kind: self.kind,
            value: self.value,
            max_uses: self.max_uses,
            per_buyer_max: self.per_buyer_max,
            products: self.products,
            min_amount_cents: self.min_amount_cents,
        })
    }
}

/// What the merchant sees of a coupon.
pub fn view(c: &Coupon) -> Value {
    let ts = |ms: Option<u64>| ms.map(super::views::ts);
    json!({
        "code": c.spec.code,
        "kind": c.spec.kind,
        "value": c.spec.value,
        "max_uses": c.spec.max_uses,
        "per_buyer_max": c.spec.per_buyer_max,
        "products": c.spec.products,
        "min_amount_cents": c.spec.min_amount_cents,
        "starts_at": ts(c.spec.starts_at_ms),
        "ends_at": ts(c.spec.ends_at_ms),
        "enabled": c.disabled_at_ms.is_none(),
        "disabled_at": ts(c.disabled_at_ms),
        "created_at": super::views::ts(c.created_at_ms),
        "uses": {"held": c.held, "used": c.used, "released": c.released, "remaining": c.remaining()},
    })
}

/// `POST /api/v1/admin/coupons` (merchant): 201 with the coupon; the same
/// definition again answers it with 200.
pub async fn create(
    State(st): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let (core, req): (_, NewCoupon) = st.admin_json(&headers, body).await?;
    let (coupon, created) = core.create_coupon(req.spec()?).await?;
    let status = if created { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(view(&coupon))))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    after: Option<String>,
    limit: Option<usize>,
}

type List = Result<axum::extract::Query<ListQuery>, axum::extract::rejection::QueryRejection>;

/// `GET /api/v1/admin/coupons?after=CODE&limit=N` (merchant): coupons by code.
pub async fn list(State(st): State<AppState>, headers: HeaderMap, query: List) -> ApiResult<Json<Value>> {
    st.require_admin(&headers)?;
    let axum::extract::Query(q) = query.map_err(|e| ApiError::invalid(format!("query: {e}")))?;
    let limit = q.limit.unwrap_or(100).clamp(1, crate::core::MAX_COUPONS_LISTED);
    let coupons = st.core()?.coupons(q.after.as_deref(), limit).await?;
    let next = (coupons.len() == limit).then(|| coupons.last().map(|c| c.spec.code.clone())).flatten();
    Ok(Json(json!({"coupons": coupons.iter().map(view).collect::<Vec<_>>(), "next_after": next})))
}

/// `GET /api/v1/admin/coupons/{code}` (merchant): 404 `coupon_unknown` if none.
pub async fn get(State(st): State<AppState>, Path(code): Path<String>, headers: HeaderMap) -> ApiResult<Json<Value>> {
    st.require_admin(&headers)?;
    match st.core()?.coupon(&code).await.map_err(ApiError::from) {
        Ok(c) => Ok(Json(view(&c))),
        Err(e) if e.code == "coupon_unknown" => Err(ApiError::new(StatusCode::NOT_FOUND, e.code, e.message)),
        Err(e) => Err(e),
    }
}

/// `POST /api/v1/admin/coupons/{code}/disable` (merchant): no new holds; uses in
/// flight finish as they would.
pub async fn disable(
    State(st): State<AppState>,
    Path(code): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Json<Value>> {
    st.require_admin(&headers)?;
    let coupon = st.core()?.disable_coupon(&code).await?;
    Ok(Json(view(&coupon)))
}
