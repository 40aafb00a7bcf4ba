//! [`Kami`]: the in-process API of the trading core. HTTP handlers, tests and
//! benchmarks all go through it. It validates input, routes each request to the
//! stock actor that owns it (through the lock-free registry), bounds admission per
//! actor, and bounds waiting with a timeout. It holds no lock across an await.

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use dashmap::DashMap;
use sha2::{Digest, Sha256};

use crate::actors::admission::Lane;
use crate::actors::call::{admit, answer, apply_payment, call_shard};
use crate::actors::payments::{ChannelStatus, ListChannels, PaymentSupervisor, Reconcile, ReconcileReport};
use crate::actors::points::{self as points_actor, points_shard_of, PointsActor, PointsHandle};
use crate::actors::shard::{self, ActorResult, OrderSnapshot, ShardActor};
use crate::actors::supervisor::{CreateProduct, ProductSupervisor};
use crate::actors::{Kill, Registry, ShardHandle};
use crate::chaos::KillTarget;
use crate::clock::Clock;
use crate::config::Settings;
use crate::domain::key_mode::{self, KeyMode};
use crate::domain::points::{Balance, Entry, Hold, PointsAudit, RedemptionState};
pub use crate::domain::shard::Withdrawal;
use crate::domain::shard::{Idempotency, KeyFate, NewOrder, OrderFilter, Payment};
use crate::domain::shelf::{OpenOrders, Shelf};
use crate::domain::{validate, DomainError, OrderId, PaymentOutcome, ProductInfo, ShardAudit};
use crate::error::Error;
use crate::payments::{Channel, Channels};
use crate::storage::Storage;
use fingerprints::{Fingerprints, Refusal};

mod fingerprints;

/// Unsettled key transfers resent per lending shard in one settling round.
const MAX_TRANSFERS_PER_ROUND: usize = 64;
/// Stale redemption holds finished per points shard in one resolving round.
const MAX_HOLDS_PER_ROUND: usize = 256;
/// Longest note on a merchant's points adjustment.
const MAX_NOTE_BYTES: usize = 256;

mod backup;
pub use backup::{BackupStream, MIN_PASSPHRASE_BYTES};
mod borrow;
pub mod catalogue;
mod checkout;
pub mod cluster;
pub use checkout::{GatewayReply, JsapiParams, PayLink, PayLinkFor};
mod coupons;
mod groups;
mod idempotency;
mod listing;
mod lookup;
mod merchant;
mod notify;
mod operations;
mod orders;
mod redemption;
mod remote;
pub use remote::read_bounded;
pub mod webhooks;

pub use coupons::MAX_COUPONS_LISTED;
pub use listing::{
    KeyPage, OrderPage, OrderPosition, OrderQuery, MAX_KEY_PAGE, MAX_ORDERS_SCANNED_PER_PAGE, MAX_ORDER_PAGE,
};
pub use lookup::{position as lookup_position, LookupPage, Passwords, MAX_LOOKUP_PAGE};

/// A merchant's change to a product: its terms, and on or off the shelf.
#[derive(Debug, Clone, Default)]
pub struct ProductChange {
    pub terms: crate::domain::terms::TermsChange,
    /// `false` takes it off the shelf ([`ShelfChange::Retire`]), `true` puts it back.
    pub on_sale: Option<bool>,
}

/// Which products a listing shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Catalogue {
    /// On the shelf (what buyers see).
    OnSale,
    /// Every product, deleted ones too (what the merchant sees).
    All,
}

/// Most products one catalogue page holds.
pub const MAX_CATALOGUE_PAGE: usize = 500;

/// What a merchant does to a product's shelf state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShelfChange {
    Retire,
    Relist,
    Delete,
}

pub use groups::{JoinRequest, NewDeal, OpenGroupRequest, MAX_OPEN_GROUPS_LISTED};

/// Most keys one withdrawal may name.
pub const MAX_WITHDRAW_KEYS: usize = 10_000;

/// What a withdrawal did: how many keys left stock, and of the keys named, those
/// that are known but not in stock (reserved, sold, or withdrawn before) and those
/// no shard of the product knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WithdrawReport {
    pub withdrawn: u64,
    pub not_in_stock: Vec<String>,
    pub unknown: Vec<String>,
}

/// The knobs the core needs, taken from [`Settings`].
#[derive(Debug, Clone)]
pub struct CoreLimits {
    pub max_quantity: u32,
    pub max_shards: u16,
    pub max_transfer_keys: usize,
    pub request_timeout: Duration,
    pub max_skew_secs: u64,
    pub max_nonces: usize,
    pub idempotency_ttl_ms: u64,
    pub max_idempotency_keys: usize,
    pub mailbox_capacity: usize,
    pub max_group_size: u32,
    pub max_group_time_limit_secs: u64,
    pub max_deals_per_product: usize,
    pub max_parallel_hashes: usize,
    pub max_waiting_hashes: usize,
}

impl CoreLimits {
    pub fn from_settings(s: &Settings) -> Self {
        CoreLimits {
            max_quantity: s.orders.max_quantity,
            max_shards: s.products.max_shards,
            max_transfer_keys: s.products.max_transfer_keys,
            request_timeout: s.request_timeout(),
            max_skew_secs: s.payments.max_skew_secs,
            max_nonces: s.payments.max_nonces,
            idempotency_ttl_ms: s.orders.idempotency_ttl_secs * 1000,
            max_idempotency_keys: s.orders.max_idempotency_keys,
            mailbox_capacity: s.actors.mailbox_capacity,
            max_group_size: s.groups.max_group_size,
            max_group_time_limit_secs: s.groups.max_time_limit_secs,
            max_deals_per_product: s.groups.max_deals_per_product,
            max_parallel_hashes: s.lookup.max_parallel_hashes,
            max_waiting_hashes: s.lookup.max_waiting_hashes,
        }
    }
}

/// Create a product.
#[derive(Debug, Clone)]
pub struct NewProduct {
    pub id: String,
    pub name: String,
    pub price_cents: u64,
    /// 0 = unlimited.
    pub per_buyer_limit: u32,
    pub shards: u16,
    /// Points per key when redeemed; none: not redeemable.
    pub points_price: Option<u64>,
    /// Unique keys, or a reusable key sold as units (`domain::key_mode`).
    pub key_mode: KeyMode,
    /// Quantity tiers (`domain::pricing`); empty: one price for any quantity.
    pub tiers: Vec<crate::domain::pricing::PriceTier>,
}

/// Order keys of a product for a buyer.
#[derive(Debug, Clone)]
pub struct OrderRequest {
    pub product_id: String,
    pub quantity: u64,
    pub buyer: String,
    /// Lets the buyer find the order again (`lookup_orders`); stored as a hash.
    pub query_password: Option<String>,
    /// A coupon code to price the order with (see `domain::coupon`).
    pub coupon: Option<String>,
    /// The reseller price of the caller's API-key tier for this product, if any.
    pub reseller: Option<crate::domain::pricing::Reseller>,
}

#[derive(Debug, Clone)]
pub struct ProductView {
    /// Its identity with the terms in force (name, price, per-buyer limit).
    pub info: ProductInfo,
    /// The terms in force, sale window included.
    pub terms: crate::domain::terms::Terms,
    pub available: u64,
    /// Stock and orders over the product's shards, as last made durable.
    pub counts: crate::domain::shard::Counts,
    pub shelf: Shelf,
    /// When the shelf state last changed (0: on sale since creation).
    pub shelf_since_ms: u64,
    pub key_mode: KeyMode,
}

pub use crate::domain::audit::{AuditReport, PointsTotals, ProductAudit};

/// Pay keys with points.
#[derive(Debug, Clone)]
pub struct RedeemRequest {
    pub buyer: String,
    pub product_id: String,
    pub quantity: u64,
}

/// A delivered redemption: the order (with its keys), what it cost, the balance after.
#[derive(Debug, Clone)]
pub struct Redeemed {
    pub order: OrderSnapshot,
    pub points_spent: u64,
    pub balance: Balance,
}

pub struct Kami {
    /// Products mirrored to the stream's catalogue (jetstream backend only).
    catalogue: Option<Arc<crate::cluster::catalogue::Catalogue>>,
    registry: Arc<Registry>,
    supervisor: Addr<ProductSupervisor>,
    payments: Addr<PaymentSupervisor>,
    storage: Arc<Storage>,
    clock: Arc<dyn Clock>,
    limits: CoreLimits,
    channels: Arc<Channels>,
    ttl_ms: u64,
    /// Idempotency-Keys across products (window: `orders.idempotency_ttl_secs`).
    pins: Fingerprints,
    /// Notification nonces (window: twice the allowed clock skew).
    nonces: Fingerprints,
    /// One per points shard (`actors::points::POINTS_SHARDS`).
    points: Vec<PointsHandle>,
    /// Product → points price, for products that can be redeemed (durable in storage).
    points_prices: DashMap<String, u64>,
    /// One per coupon shard (`actors::coupons::COUPON_SHARDS`).
    coupons: Vec<crate::actors::coupons::CouponHandle>,
    /// Where the coupon-hold resolver goes on in each coupon shard next round.
    coupon_cursors: std::sync::Mutex<Vec<Option<(u64, String)>>>,
    /// Products whose keys are reusable (durable in storage).
    reusable: dashmap::DashSet<String>,
    /// (product, deal id) → group deal (durable in storage).
    deals: DashMap<(String, String), crate::domain::group::GroupDeal>,
    /// Product and deal creation are rare: one at a time, so "exists" and "same id,
    /// other terms" are exact.
    merchant_writes: tokio::sync::Mutex<()>,
    /// Hashes query passwords (buyer order lookup).
    passwords: Passwords,
    /// Merchant webhook endpoints (see [`webhooks`]).
    webhooks: Arc<webhooks::Webhooks>,
    http: reqwest::Client,
    /// Pay-link calls to gateways in flight (bounded: [`MAX_PAY_CALLS`]).
    pay_calls: tokio::sync::Semaphore,
    /// Set while a backup is written: one at a time.
    backup_running: Arc<std::sync::atomic::AtomicBool>,
    /// This node's place in a cluster (`cluster.node`), once it joined.
    cluster: std::sync::OnceLock<Arc<cluster::ClusterNode>>,
}

/// Most pay-link calls to gateways at once; more wait (within the request timeout).
pub const MAX_PAY_CALLS: usize = 256;

/// The actors and shared tables a [`Kami`] routes to.
pub struct Parts {
    pub registry: Arc<Registry>,
    pub supervisor: Addr<ProductSupervisor>,
    pub payments: Addr<PaymentSupervisor>,
    pub storage: Arc<Storage>,
    pub clock: Arc<dyn Clock>,
    pub channels: Arc<Channels>,
    pub points: Vec<PointsHandle>,
    pub points_prices: Vec<(String, u64)>,
    pub coupons: Vec<crate::actors::coupons::CouponHandle>,
    /// Products whose keys are reusable (`Storage::reusable_products`).
    pub reusable_products: Vec<String>,
    pub group_deals: Vec<crate::domain::group::GroupDeal>,
    /// Salts query passwords (`Storage::lookup_secret`).
    pub lookup_secret: [u8; 32],
    pub webhooks: Arc<webhooks::Webhooks>,
    /// Calls to payment gateways made for a buyer (pay links), bounded by each
    /// channel's timeout.
    pub http: reqwest::Client,
    /// The stream's catalogue bucket on the jetstream backend ([`catalogue`]).
    pub catalogue: Option<Arc<crate::cluster::catalogue::Catalogue>>,
}

impl Kami {
    pub fn new(parts: Parts, limits: CoreLimits, ttl_ms: u64) -> Kami {
        // An Idempotency-Key is pinned to the body it first came with, so that reuse
        // with another product is caught too (the owning shard catches the rest).
        let pins = Fingerprints::new(limits.max_idempotency_keys, limits.idempotency_ttl_ms);
        let nonces = Fingerprints::new(limits.max_nonces, limits.max_skew_secs * 2000);
        let Parts {
            registry,
            supervisor,
            payments,
            storage,
            clock,
            channels,
            points,
            points_prices,
            coupons,
            reusable_products,
            group_deals,
            lookup_secret,
            webhooks,
            http,
            catalogue,
        } = parts;
        let passwords = Passwords::new(lookup_secret, limits.max_parallel_hashes, limits.max_waiting_hashes);
        Kami {
            registry,
            supervisor,
            payments,
            storage,
            clock,
            limits,
            channels,
            ttl_ms,
            pins,
            nonces,
            points,
            points_prices: points_prices.into_iter().collect(),
            coupon_cursors: std::sync::Mutex::new(vec![None; coupons.len()]),
            coupons,
            reusable: reusable_products.into_iter().collect(),
            deals: group_deals.into_iter().map(|d| ((d.product_id.clone(), d.deal_id.clone()), d)).collect(),
            merchant_writes: tokio::sync::Mutex::new(()),
            passwords,
            webhooks,
            http,
            catalogue,
            pay_calls: tokio::sync::Semaphore::new(MAX_PAY_CALLS),
            backup_running: Default::default(),
            cluster: Default::default(),
        }
    }

    pub fn mailbox_capacity(&self) -> usize {
        self.limits.mailbox_capacity
    }

    /// The channel a new order should be paid on: the healthiest by priority and
    /// weight (read from atomics the payment supervisor publishes; no message).
    pub fn channels(&self) -> &Channels {
        &self.channels
    }

    pub fn pick_channel(&self) -> &Channel {
        self.channels.pick()
    }

    /// Where the buyer pays `order` on `channel`: the gateway's checkout URL, signed
    /// with the channel secret over `"{order_id}:{amount_cents}"` so the amount
    /// cannot be altered. `None` when the channel has no gateway configured.
    pub fn pay_url(&self, channel: &Channel, id: &str, amount: u64) -> Option<String> {
        let base = channel.endpoint.as_ref()?;
        let sig = crate::payments::checkout_signature(&channel.secret, id, amount).replace('=', "%3D");
        Some(format!("{base}/checkout/{id}?amount_cents={amount}&sig={sig}"))
    }

    pub fn storage(&self) -> &Arc<Storage> {
        &self.storage
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// Sends to a stock actor in the `Lane::Existing` lane (see [`call_in`](Self::call_in)).
    async fn call<M, R>(&self, shard: &ShardHandle, msg: M) -> Result<R, Error>
    where
        M: Message<Result = ActorResult<R>> + Send + 'static,
        R: Send + 'static,
        ShardActor: Handler<M>,
    {
        self.call_in(Lane::Existing, shard, msg).await
    }

    /// Sends to a stock actor: admitted to its line in `lane` (else `QueueFull`),
    /// answered within the request timeout (else `Timeout`).
    async fn call_in<M, R>(&self, lane: Lane, shard: &ShardHandle, msg: M) -> Result<R, Error>
    where
        M: Message<Result = ActorResult<R>> + Send + 'static,
        R: Send + 'static,
        ShardActor: Handler<M>,
    {
        Ok(call_shard(lane, shard, msg, self.limits.request_timeout).await?)
    }
}

/// 128 bits of SHA-256 over length-prefixed `parts` (no two part lists collide by
/// concatenation): request fingerprints and redemption ids.
fn digest(parts: &[&[u8]]) -> [u8; 16] {
    let mut h = Sha256::new();
    for part in parts {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part);
    }
    h.finalize()[..16].try_into().expect("16 bytes")
}

/// The Idempotency-Key a request is remembered by: the client's key within its
/// caller's scope and for one buyer (32 hex characters, whatever their lengths).
pub fn scoped_idempotency_key(scope: &str, buyer: &str, key: &str) -> String {
    hex::encode(digest(&[scope.as_bytes(), buyer.as_bytes(), key.as_bytes()]))
}

/// A fresh 128-bit query token, hex encoded.
pub fn new_token() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}
