//! Decoders of older snapshot formats. Each older layout of a stock shard decodes
//! into its own type here and becomes a [`Shard`] through
//! [`ShardParts`](crate::domain::shard::ShardParts), the domain's format-free
//! constructor: the domain knows no storage format. See `codec::FORMAT_VERSION` for
//! what each version changed; `tests/golden.rs` decodes a record of every version.

use std::collections::{BTreeMap, HashMap, VecDeque};

use serde::Deserialize;

use crate::domain::group::Group;
use crate::domain::lookup::PasswordHash;
use crate::domain::shard::{Archived, ArchivedOrder, KeyId, ShardParts, Transfers};
use crate::domain::terms::Terms;
use crate::domain::{Order, PaymentRecord, ProductInfo, Shard};

/// A snapshot as format v1 and v2 wrote it: no transfers.
#[derive(Deserialize)]
pub struct ShardV2 {
    product: ProductInfo,
    shard: u16,
    keys: Vec<Box<str>>,
    available: VecDeque<KeyId>,
    orders: Vec<Order>,
    payments: HashMap<String, PaymentRecord>,
}

impl From<ShardV2> for Shard {
    fn from(old: ShardV2) -> Shard {
        let ShardV2 { product, shard, keys, available, orders, payments } = old;
        ShardV3 { product, shard, keys, available, orders, payments, transfers: Transfers::default() }.into()
    }
}

/// A snapshot as format v3 wrote it: no groups.
#[derive(Deserialize)]
pub struct ShardV3 {
    product: ProductInfo,
    shard: u16,
    keys: Vec<Box<str>>,
    available: VecDeque<KeyId>,
    orders: Vec<Order>,
    payments: HashMap<String, PaymentRecord>,
    transfers: Transfers,
}

impl From<ShardV3> for Shard {
    fn from(old: ShardV3) -> Shard {
        let ShardV3 { product, shard, keys, available, orders, payments, transfers } = old;
        ShardV4 { product, shard, keys, available, orders, payments, transfers, groups: Vec::new() }.into()
    }
}

/// A snapshot as format v4 wrote it: orders in a dense list, nothing archived.
#[derive(Deserialize)]
pub struct ShardV4 {
    product: ProductInfo,
    shard: u16,
    keys: Vec<Box<str>>,
    available: VecDeque<KeyId>,
    orders: Vec<Order>,
    payments: HashMap<String, PaymentRecord>,
    transfers: Transfers,
    groups: Vec<Group>,
}

impl From<ShardV4> for Shard {
    fn from(old: ShardV4) -> Shard {
        let ShardV4 { product, shard, keys, available, orders, payments, transfers, groups } = old;
        ShardParts {
            product,
            shard,
            keys,
            available,
            orders,
            payments,
            transfers,
            groups,
            orders_created: None,
            archived: Archived::default(),
            withdrawn: Vec::new(),
            passwords: BTreeMap::new(),
            pricings: BTreeMap::new(),
        }
        .into()
    }
}

/// A snapshot as format v5 wrote it: nothing withdrawn.
#[derive(Deserialize)]
pub struct ShardV5 {
    product: ProductInfo,
    shard: u16,
    keys: Vec<Box<str>>,
    available: VecDeque<KeyId>,
    orders: BTreeMap<u64, Order>,
    payments: HashMap<String, PaymentRecord>,
    transfers: Transfers,
    groups: Vec<Group>,
    orders_created: u64,
    archived: Archived,
}

impl From<ShardV5> for Shard {
    fn from(old: ShardV5) -> Shard {
        let ShardV5 { product, shard, keys, available, orders, payments, transfers, groups, orders_created, archived } =
            old;
        ShardParts {
            product,
            shard,
            keys,
            available,
            orders: orders.into_values().collect(),
            payments,
            transfers,
            groups,
            orders_created: Some(orders_created),
            archived,
            withdrawn: Vec::new(),
            passwords: BTreeMap::new(),
            pricings: BTreeMap::new(),
        }
        .into()
    }
}

/// A snapshot as format v6 wrote it: no query passwords.
#[derive(Deserialize)]
pub struct ShardV6 {
    product: ProductInfo,
    shard: u16,
    keys: Vec<Box<str>>,
    available: VecDeque<KeyId>,
    orders: BTreeMap<u64, Order>,
    payments: HashMap<String, PaymentRecord>,
    transfers: Transfers,
    groups: Vec<Group>,
    orders_created: u64,
    archived: Archived,
    withdrawn: Vec<KeyId>,
}

impl From<ShardV6> for Shard {
    fn from(old: ShardV6) -> Shard {
        let ShardV6 {
            product,
            shard,
            keys,
            available,
            orders,
            payments,
            transfers,
            groups,
            orders_created,
            archived,
            withdrawn,
        } = old;
        ShardParts {
            product,
            shard,
            keys,
            available,
            orders: orders.into_values().collect(),
            payments,
            transfers,
            groups,
            orders_created: Some(orders_created),
            archived,
            withdrawn,
            passwords: BTreeMap::new(),
            pricings: BTreeMap::new(),
        }
        .into()
    }
}

/// Terms as formats v5–v7 wrote them: no quantity tiers.
#[derive(Deserialize)]
pub struct TermsV7 {
    name: String,
    price_cents: u64,
    per_buyer_limit: u32,
    sale_starts_at_ms: Option<u64>,
    sale_ends_at_ms: Option<u64>,
}

impl From<TermsV7> for Terms {
    fn from(t: TermsV7) -> Terms {
        Terms {
            name: t.name,
            price_cents: t.price_cents,
            per_buyer_limit: t.per_buyer_limit,
            sale_starts_at_ms: t.sale_starts_at_ms,
            sale_ends_at_ms: t.sale_ends_at_ms,
            tiers: Vec::new(),
        }
    }
}

/// A snapshot as formats v7 and v8 wrote it: no order pricing records.
#[derive(Deserialize)]
pub struct ShardV8 {
    product: ProductInfo,
    shard: u16,
    keys: Vec<Box<str>>,
    available: VecDeque<KeyId>,
    orders: BTreeMap<u64, Order>,
    payments: HashMap<String, PaymentRecord>,
    transfers: Transfers,
    groups: Vec<Group>,
    orders_created: u64,
    archived: Archived,
    withdrawn: Vec<KeyId>,
    passwords: BTreeMap<u64, PasswordHash>,
}

impl ShardV8 {
    /// The shard's parts, with the pricing records a later layout adds.
    fn into_parts(self, pricings: BTreeMap<u64, crate::domain::pricing::OrderPricing>) -> ShardParts {
        let ShardV8 {
            product,
            shard,
            keys,
            available,
            orders,
            payments,
            transfers,
            groups,
            orders_created,
            archived,
            withdrawn,
            passwords,
        } = self;
        ShardParts {
            product,
            shard,
            keys,
            available,
            orders: orders.into_values().collect(),
            payments,
            transfers,
            groups,
            orders_created: Some(orders_created),
            archived,
            withdrawn,
            passwords,
            pricings,
        }
    }
}

impl From<ShardV8> for Shard {
    fn from(old: ShardV8) -> Shard {
        old.into_parts(BTreeMap::new()).into()
    }
}

/// An archived order as formats v5–v8 wrote it: no pricing record.
#[derive(Deserialize)]
pub struct ArchivedOrderV8 {
    order: Order,
    keys: Vec<String>,
}

impl From<ArchivedOrderV8> for ArchivedOrder {
    fn from(old: ArchivedOrderV8) -> ArchivedOrder {
        ArchivedOrder { order: old.order, keys: old.keys, pricing: None }
    }
}

/// A snapshot as formats v9 and v10 wrote it: v8's layout followed by the pricing
/// records (bincode puts a nested struct's fields in line, so this is the same
/// byte layout), with no archived coupon counts (storage recounts them from the
/// archive for a v10 snapshot; v9 had no coupons).
#[derive(Deserialize)]
pub struct ShardV10 {
    v8: ShardV8,
    pricings: BTreeMap<u64, crate::domain::pricing::OrderPricing>,
}

impl From<ShardV10> for Shard {
    fn from(old: ShardV10) -> Shard {
        old.v8.into_parts(old.pricings).into()
    }
}
