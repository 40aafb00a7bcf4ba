//! The request bodies of the HTTP API, as the wire carries them: strict JSON (an
//! unknown field is refused), each turned into the core's typed command. Field names
//! and defaults are part of the API (`docs/api.md`).

use serde::Deserialize;

use crate::core;
use crate::domain::pricing::PriceTier;

/// `POST /api/v1/admin/products`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewProduct {
    pub id: String,
    pub name: String,
    pub price_cents: u64,
    #[serde(default)]
    pub per_buyer_limit: u32,
    #[serde(default = "one")]
    pub shards: u16,
    #[serde(default)]
    pub points_price: Option<u64>,
    #[serde(default)]
    pub key_mode: crate::domain::key_mode::KeyMode,
    #[serde(default)]
    pub tiers: Vec<PriceTier>,
}

/// `PATCH /api/v1/products/{id}`: each field present changes; a window bound set
/// to `null` is cleared.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProductPatch {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub price_cents: Option<u64>,
    #[serde(default)]
    pub per_buyer_limit: Option<u32>,
    #[serde(default)]
    pub on_sale: Option<bool>,
    #[serde(default, deserialize_with = "present")]
    pub sale_starts_at: Option<Option<String>>,
    #[serde(default, deserialize_with = "present")]
    pub sale_ends_at: Option<Option<String>>,
    /// `null` or `[]` clears them.
    #[serde(default, deserialize_with = "present")]
    pub tiers: Option<Option<Vec<PriceTier>>>,
}

/// A field that is present, `null` included (absent stays `None` by `default`).
fn present<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

impl TryFrom<ProductPatch> for core::ProductChange {
    type Error = String;

    fn try_from(p: ProductPatch) -> Result<Self, String> {
        let time = |field: &str, v: Option<Option<String>>| -> Result<Option<Option<u64>>, String> {
            match v {
                None => Ok(None),
                Some(None) => Ok(Some(None)),
                Some(Some(s)) => crate::domain::terms::parse_rfc3339(&s)
                    .map(|ms| Some(Some(ms)))
                    .ok_or_else(|| format!("{field}: not an RFC 3339 time (e.g. 2026-12-01T10:00:00Z)")),
            }
        };
        let terms = crate::domain::terms::TermsChange {
            sale_starts_at_ms: time("sale_starts_at", p.sale_starts_at)?,
            sale_ends_at_ms: time("sale_ends_at", p.sale_ends_at)?,
            name: p.name,
            price_cents: p.price_cents,
            per_buyer_limit: p.per_buyer_limit,
            tiers: p.tiers.map(Option::unwrap_or_default),
        };
        if terms.is_empty() && p.on_sale.is_none() {
            return Err("nothing to change: give at least one of name, price_cents, per_buyer_limit, on_sale, \
                        sale_starts_at, sale_ends_at, tiers"
                .into());
        }
        Ok(core::ProductChange { terms, on_sale: p.on_sale })
    }
}

fn one() -> u16 {
    1
}

impl From<NewProduct> for core::NewProduct {
    fn from(p: NewProduct) -> Self {
        let NewProduct { id, name, price_cents, per_buyer_limit, shards, points_price, key_mode, tiers } = p;
        core::NewProduct { id, name, price_cents, per_buyer_limit, shards, points_price, key_mode, tiers }
    }
}

/// `POST /api/v1/orders`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewOrder {
    pub product_id: String,
    pub quantity: u64,
    pub buyer: String,
    #[serde(default)]
    pub query_password: Option<String>,
    #[serde(default)]
    pub coupon: Option<String>,
}

impl From<NewOrder> for core::OrderRequest {
    fn from(o: NewOrder) -> Self {
        let NewOrder { product_id, quantity, buyer, query_password, coupon } = o;
        core::OrderRequest { product_id, quantity, buyer, query_password, coupon, reseller: None }
    }
}

/// `POST /api/v1/orders/lookup`: by `buyer` (paged) or by `order_id`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lookup {
    pub buyer: Option<String>,
    pub order_id: Option<String>,
    pub query_password: String,
    pub cursor: Option<String>,
    pub limit: Option<usize>,
}

/// `POST /api/v1/redemptions`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Redemption {
    pub buyer: String,
    pub product_id: String,
    pub quantity: u64,
}

impl From<Redemption> for core::RedeemRequest {
    fn from(r: Redemption) -> Self {
        let Redemption { buyer, product_id, quantity } = r;
        core::RedeemRequest { buyer, product_id, quantity }
    }
}

/// `POST /api/v1/admin/products/{id}/group-deals`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewDeal {
    pub deal_id: String,
    pub group_size: u32,
    pub price_cents: u64,
    pub time_limit_secs: u64,
}

impl From<NewDeal> for core::NewDeal {
    fn from(d: NewDeal) -> Self {
        let NewDeal { deal_id, group_size, price_cents, time_limit_secs } = d;
        core::NewDeal { deal_id, group_size, price_cents, time_limit_secs }
    }
}

/// `POST /api/v1/groups`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenGroup {
    pub product_id: String,
    pub deal_id: String,
    pub buyer: String,
    #[serde(default)]
    pub join_open: bool,
}

impl From<OpenGroup> for core::OpenGroupRequest {
    fn from(g: OpenGroup) -> Self {
        let OpenGroup { product_id, deal_id, buyer, join_open } = g;
        core::OpenGroupRequest { product_id, deal_id, buyer, join_open }
    }
}

/// `POST /api/v1/groups/{group_id}/join`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinGroup {
    pub buyer: String,
}

impl From<JoinGroup> for core::JoinRequest {
    fn from(j: JoinGroup) -> Self {
        core::JoinRequest { buyer: j.buyer }
    }
}
