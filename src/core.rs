//! [`Kami`]: the in-process API of the trading core. HTTP handlers, tests and
//! benchmarks all go through it. It validates input, routes each request to the
//! stock actor that owns it (through the lock-free registry), bounds admission per
//! actor, and bounds waiting with a timeout. It holds no lock across an await.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use dashmap::DashMap;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::actors::admission::Lane;
use crate::actors::call::{admit, answer, apply_payment, call_shard};
use crate::actors::payments::{ChannelView, ListChannels, PaymentSupervisor, Reconcile, ReconcileReport};
use crate::actors::points::{self as points_actor, points_shard_of, PointsActor, PointsHandle};
use crate::actors::shard::{self, OrderSnapshot, ShardActor, ShardResult};
use crate::actors::supervisor::{CreateProduct, OrderSupervisor};
use crate::actors::{Kill, Registry, ShardHandle};
use crate::chaos::Target;
use crate::clock::Clock;
use crate::config::Settings;
use crate::domain::points::{Balance, Entry, Hold, PointsAudit, RedemptionState};
use crate::domain::shard::{Idempotency, NewOrder, Payment};
use crate::domain::shelf::{OpenOrders, Shelf};
use crate::domain::{validate, DomainError, OrderId, OrderStatus, PaymentOutcome, ProductInfo, ShardAudit};
use crate::error::Error;
use crate::payments::{Channel, Channels};
use crate::storage::Storage;

mod groups;
/// What a merchant does to a product's shelf state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShelfChange {
    Retire,
    Relist,
    Delete,
}

pub use groups::{JoinRequest, NewDeal, OpenGroupRequest, MAX_OPEN_GROUPS_LISTED};

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
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewProduct {
    pub id: String,
    pub name: String,
    pub price_cents: u64,
    #[serde(default)]
    pub per_buyer_limit: u32,
    #[serde(default = "one")]
    pub shards: u16,
    /// Points per key when redeemed (`POST /api/v1/redemptions`); none: not redeemable.
    #[serde(default)]
    pub points_price: Option<u64>,
}

fn one() -> u16 {
    1
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrderRequest {
    pub product_id: String,
    pub quantity: u64,
    pub buyer: String,
}

/// A payment notification body. Unknown fields are ignored (gateways add fields).
#[derive(Debug, Clone, Deserialize)]
pub struct Notification {
    pub order_id: String,
    pub payment_id: String,
    pub amount_cents: u64,
    pub status: String,
    pub timestamp: i64,
    pub nonce: String,
}

#[derive(Debug, Clone)]
pub struct ProductView {
    pub info: ProductInfo,
    pub available: u64,
    /// Stock and orders over the product's shards, as last made durable.
    pub counts: crate::domain::shard::Counts,
    pub shelf: Shelf,
    /// When the shelf state last changed (0: on sale since creation).
    pub shelf_since_ms: u64,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ProductAudit {
    pub id: String,
    pub imported: u64,
    pub available: u64,
    pub reserved: u64,
    pub sold: u64,
    /// Keys lent by one shard to another and not yet received.
    pub in_transit: u64,
    /// Keys delivered by redemptions (paid with points).
    #[serde(skip)]
    pub redeemed: u64,
    /// Orders still in the shards' memory, and those moved to the archive.
    pub orders_in_memory: u64,
    pub orders_archived: u64,
}

impl ProductAudit {
    /// Adds one shard's recount.
    pub fn add(&mut self, shard: &ShardAudit) {
        self.orders_in_memory += shard.live_orders;
        self.orders_archived += shard.archived_orders;
        self.imported += shard.imported;
        self.available += shard.available;
        self.reserved += shard.reserved;
        self.sold += shard.sold;
        self.redeemed += shard.redeemed;
    }

    /// The product-wide check once every shard was added: returns its violation.
    pub fn finish(&mut self, shards: &[ShardAudit]) -> Option<String> {
        let (in_transit, violation) = crate::domain::shard::audit_product(shards);
        self.in_transit = in_transit;
        violation
    }
}

#[derive(Debug, Clone, Default)]
pub struct AuditReport {
    pub ok: bool,
    pub products: Vec<ProductAudit>,
    pub orders: BTreeMap<OrderStatus, u64>,
    pub violations: Vec<String>,
    pub points: PointsTotals,
}

/// Totals of the points shards' audits, their violations, and the cross-check with
/// the stock shards: keys delivered by redemptions must be at least the keys of
/// settled redemptions and at most those plus the ones held (in flight). Exact when
/// the points were audited before the stock (a redemption is settled only once its
/// order is durable) and nothing new was held in between.
pub fn check_points(audits: Vec<PointsAudit>, products: &[ProductAudit], violations: &mut Vec<String>) -> PointsTotals {
    let mut totals = PointsTotals::default();
    let (mut settled, mut held) = (BTreeMap::<String, u64>::new(), BTreeMap::<String, u64>::new());
    for (i, a) in audits.into_iter().enumerate() {
        totals.buyers += a.buyers;
        totals.total_balance += a.total_balance;
        totals.total_held += a.total_held;
        totals.redemptions_settled += a.redemptions_settled;
        violations.extend(a.violations.iter().map(|v| format!("points#{i}: {v}")));
        for (p, n) in a.settled_quantity {
            *settled.entry(p).or_default() += n;
        }
        for (p, n) in a.held_quantity {
            *held.entry(p).or_default() += n;
        }
    }
    for pa in products {
        let (s, h) = (settled.get(&pa.id).copied().unwrap_or(0), held.get(&pa.id).copied().unwrap_or(0));
        if pa.redeemed < s || pa.redeemed > s + h {
            violations.push(format!(
                "{}: {} keys delivered by redemptions, but {s} paid by settled ones ({h} in flight)",
                pa.id, pa.redeemed
            ));
        }
    }
    totals
}

/// The points ledgers, all shards together (their audit recomputes every balance).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct PointsTotals {
    pub buyers: u64,
    pub total_balance: u64,
    pub total_held: u64,
    pub redemptions_settled: u64,
}

/// An Idempotency-Key seen by this process, pinned to the body it first came with,
/// so that reuse with another product is caught too (the owning shard catches the rest).
struct Pin {
    fingerprint: [u8; 16],
    at_ms: u64,
    confirmed: bool,
}

/// `POST /api/v1/redemptions`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
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
    registry: Arc<Registry>,
    supervisor: Addr<OrderSupervisor>,
    payments: Addr<PaymentSupervisor>,
    storage: Arc<Storage>,
    clock: Arc<dyn Clock>,
    limits: CoreLimits,
    channels: Arc<Channels>,
    ttl_ms: u64,
    pins: DashMap<String, Pin>,
    nonces: DashMap<String, ([u8; 16], u64)>,
    /// One per points shard (`actors::points::POINTS_SHARDS`).
    points: Vec<PointsHandle>,
    /// Product → points price, for products that can be redeemed (durable in storage).
    points_prices: DashMap<String, u64>,
    /// (product, deal id) → group deal (durable in storage).
    deals: DashMap<(String, String), crate::domain::group::GroupDeal>,
    /// Product and deal creation are rare: one at a time, so "exists" and "same id,
    /// other terms" are exact.
    merchant_writes: tokio::sync::Mutex<()>,
}

/// The actors and shared tables a [`Kami`] routes to.
pub struct Parts {
    pub registry: Arc<Registry>,
    pub supervisor: Addr<OrderSupervisor>,
    pub payments: Addr<PaymentSupervisor>,
    pub storage: Arc<Storage>,
    pub clock: Arc<dyn Clock>,
    pub channels: Arc<Channels>,
    pub points: Vec<PointsHandle>,
    pub points_prices: Vec<(String, u64)>,
    pub group_deals: Vec<crate::domain::group::GroupDeal>,
}

impl Kami {
    pub fn new(parts: Parts, limits: CoreLimits, ttl_ms: u64) -> Kami {
        let Parts { registry, supervisor, payments, storage, clock, channels, points, points_prices, group_deals } =
            parts;
        Kami {
            registry,
            supervisor,
            payments,
            storage,
            clock,
            limits,
            channels,
            ttl_ms,
            pins: DashMap::new(),
            nonces: DashMap::new(),
            points,
            points_prices: points_prices.into_iter().collect(),
            deals: group_deals.into_iter().map(|d| ((d.product_id.clone(), d.deal_id.clone()), d)).collect(),
            merchant_writes: tokio::sync::Mutex::new(()),
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

    /// Sends to a stock actor in the `Lane::Settle` lane (see [`call_in`](Self::call_in)).
    async fn call<M, R>(&self, shard: &ShardHandle, msg: M) -> Result<R, Error>
    where
        M: Message<Result = ShardResult<R>> + Send + 'static,
        R: Send + 'static,
        ShardActor: Handler<M>,
    {
        self.call_in(Lane::Settle, shard, msg).await
    }

    /// Sends to a stock actor: admitted to its line in `lane` (else `QueueFull`),
    /// answered within the request timeout (else `Timeout`).
    async fn call_in<M, R>(&self, lane: Lane, shard: &ShardHandle, msg: M) -> Result<R, Error>
    where
        M: Message<Result = ShardResult<R>> + Send + 'static,
        R: Send + 'static,
        ShardActor: Handler<M>,
    {
        Ok(call_shard(lane, shard, msg, self.limits.request_timeout).await?)
    }

    // ---- merchant ----

    pub async fn create_product(&self, p: NewProduct) -> Result<ProductInfo, Error> {
        validate::product_id(&p.id).map_err(Error::Invalid)?;
        validate::product_name(&p.name).map_err(Error::Invalid)?;
        if p.shards == 0 || p.shards > self.limits.max_shards {
            return Err(Error::Invalid(format!("shards: must be 1..={}", self.limits.max_shards)));
        }
        if p.price_cents > validate::MAX_PRICE_CENTS {
            return Err(Error::Invalid("price_cents: must be at most 10^12".into()));
        }
        if p.points_price == Some(0) {
            return Err(Error::Invalid("points_price: must be at least 1".into()));
        }
        let points_price = p.points_price;
        // One merchant write at a time: "exists" checked here stays true below.
        let _one_writer = self.merchant_writes.lock().await;
        if let Some(existing) = self.registry.get(&p.id) {
            return Err(match existing.shelf.get() {
                // Old order ids name the product: its id is never given to another.
                Shelf::Deleted => DomainError::ProductDeleted.into(),
                Shelf::OnSale | Shelf::Retired => Error::ProductExists,
            });
        }
        // The points price is written first: it is durable with the product record
        // (one flush covers both), and a crash before the product leaves only a price
        // for no product, which the next creation of that id overwrites.
        self.storage.set_points_price(&p.id, points_price)?;
        let info = ProductInfo {
            id: p.id,
            name: p.name,
            price_cents: p.price_cents,
            per_buyer_limit: p.per_buyer_limit,
            shards: p.shards,
            created_at_ms: self.clock.now_ms(),
        };
        let sent = tokio::time::timeout(self.limits.request_timeout, self.supervisor.send(CreateProduct(info))).await;
        let info = match sent {
            Err(_) => return Err(Error::Timeout),
            Ok(Err(_)) => return Err(Error::Unavailable("the order supervisor stopped".into())),
            Ok(Ok(result)) => result?,
        };
        match points_price {
            Some(p) => self.points_prices.insert(info.id.clone(), p),
            None => self.points_prices.remove(&info.id).map(|(_, p)| p),
        };
        Ok(info)
    }

    /// A product that is not deleted (a deleted one is not found, for buyers and merchants).
    fn listed(&self, id: &str) -> Result<Arc<crate::actors::ProductRoute>, Error> {
        self.registry.get(id).filter(|r| r.shelf.get() != Shelf::Deleted).ok_or(Error::ProductNotFound)
    }

    /// Takes a product off the shelf, puts it back on sale, or deletes it (see
    /// [`crate::domain::shelf`]); returns the state, durable, and since when. A
    /// deletion counts the open orders of every shard while the product is already
    /// off the shelf, so no order can be created between the count and the deletion.
    pub async fn change_shelf(&self, id: &str, change: ShelfChange) -> Result<(Shelf, u64), Error> {
        let route = self.registry.get(id).ok_or(Error::ProductNotFound)?;
        let _one_writer = self.merchant_writes.lock().await;
        let current = route.shelf.get();
        let next = match change {
            ShelfChange::Retire => current.retire()?,
            ShelfChange::Relist => current.relist()?,
            ShelfChange::Delete => {
                let mut open = OpenOrders::default();
                if current == Shelf::Retired {
                    for s in &route.shards {
                        open.add(&self.call(s, shard::CountOpenOrders).await?);
                    }
                }
                current.delete(&open)?
            }
        };
        if next != current {
            let now = self.clock.now_ms();
            self.storage.set_shelf(id, next, now)?;
            self.storage.ticket()?.wait().await?;
            route.shelf.set(next, now);
            tracing::info!(product = id, shelf = next.as_str(), "shelf state changed");
        }
        Ok((next, route.shelf.since_ms()))
    }

    /// Imports keys (already split into lines or array items). Trims each key; empty
    /// ones are ignored; an invalid one rejects the whole batch before anything changes.
    pub async fn import_keys(&self, product: &str, raw: Vec<String>) -> Result<(u64, u64), Error> {
        let route = self.listed(product)?;
        let mut parts: Vec<Vec<String>> = vec![Vec::new(); route.shards.len()];
        for (i, key) in raw.into_iter().enumerate() {
            let key = key.trim();
            if key.is_empty() {
                continue;
            }
            validate::key(key).map_err(|m| Error::Invalid(format!("keys[{i}]: {m}")))?;
            parts[route.shard_index_for_key(key)].push(key.to_string());
        }
        let calls = parts
            .into_iter()
            .enumerate()
            .filter(|(_, keys)| !keys.is_empty())
            .map(|(i, keys)| self.call(&route.shards[i], shard::ImportKeys(keys)));
        let mut totals = (0, 0);
        for result in futures::future::join_all(calls).await {
            let (imported, duplicates) = result?;
            totals = (totals.0 + imported, totals.1 + duplicates);
        }
        Ok(totals)
    }

    pub fn product(&self, id: &str) -> Result<ProductView, Error> {
        self.listed(id)?;
        self.product_as_merchant(id)
    }

    /// A product as its merchant sees it: deleted ones too.
    pub fn product_as_merchant(&self, id: &str) -> Result<ProductView, Error> {
        let route = self.registry.get(id).ok_or(Error::ProductNotFound)?;
        let counts = route.counts();
        Ok(ProductView {
            info: route.info.clone(),
            available: counts.available,
            counts,
            shelf: route.shelf.get(),
            shelf_since_ms: route.shelf.since_ms(),
        })
    }

    pub async fn audit(&self) -> Result<AuditReport, Error> {
        let routes = self.registry.all();
        let mut ids: Vec<&String> = routes.keys().collect();
        ids.sort();
        let mut report = AuditReport { ok: true, ..AuditReport::default() };
        for status in OrderStatus::ALL {
            report.orders.insert(status, 0);
        }
        // Points first (see `check_points` for why the order matters).
        let points = self.audit_points().await?;
        let mut all_shards = Vec::new();
        for id in ids {
            let route = &routes[id];
            let mut pa = ProductAudit { id: id.clone(), ..ProductAudit::default() };
            let mut audits = Vec::with_capacity(route.shards.len());
            for (i, s) in route.shards.iter().enumerate() {
                // The audit is not admission-controlled: it must work under overload.
                let a: ShardAudit =
                    match tokio::time::timeout(self.limits.request_timeout, s.addr.send(shard::Audit)).await {
                        Ok(Ok(r)) => r?,
                        _ => return Err(Error::Unavailable(format!("shard {i} of {id} did not answer the audit"))),
                    };
                pa.add(&a);
                for (&status, &n) in &a.orders {
                    *report.orders.entry(status).or_default() += n;
                }
                report.violations.extend(a.violations.iter().map(|v| format!("{id}#{i}: {v}")));
                audits.push(a);
            }
            report.violations.extend(pa.finish(&audits).map(|v| format!("{id}: {v}")));
            report.products.push(pa);
            all_shards.extend(audits.into_iter().enumerate().map(|(i, a)| (format!("{id}#{i}"), a)));
        }
        report
            .violations
            .extend(crate::domain::shard::duplicate_payments(all_shards.iter().map(|(l, a)| (l.clone(), a))));
        report.points = check_points(points, &report.products, &mut report.violations);
        report.ok = report.violations.is_empty();
        Ok(report)
    }

    // ---- points ----

    async fn call_points<M, R>(&self, buyer: &str, msg: M) -> Result<R, Error>
    where
        M: Message<Result = ShardResult<R>> + Send + 'static,
        R: Send + 'static,
        PointsActor: Handler<M>,
    {
        let handle = &self.points[points_shard_of(buyer) as usize];
        let _ticket = admit(&handle.admission, Lane::Settle)?;
        let sent = tokio::time::timeout(self.limits.request_timeout, handle.addr.send(msg)).await;
        Ok(answer(sent, "the points actor stopped")?)
    }

    /// A merchant's credit (`delta > 0`) or debit, idempotent by `request_id`.
    pub async fn adjust_points(&self, buyer: &str, request_id: &str, delta: i64, note: &str) -> Result<Balance, Error> {
        validate::buyer(buyer).map_err(Error::Invalid)?;
        validate::token("request_id", request_id).map_err(Error::Invalid)?;
        if delta == 0 {
            return Err(Error::Invalid("delta: must not be 0".into()));
        }
        if note.len() > 256 {
            return Err(Error::Invalid("note: at most 256 bytes".into()));
        }
        let msg = points_actor::Adjust {
            request_id: request_id.to_string(),
            buyer: buyer.to_string(),
            delta,
            note: note.to_string(),
        };
        self.call_points(buyer, msg).await
    }

    /// A buyer's balance and the last `limit` lines of their ledger.
    pub async fn points_statement(&self, buyer: &str, limit: usize) -> Result<(Balance, Vec<Entry>), Error> {
        validate::buyer(buyer).map_err(Error::Invalid)?;
        self.call_points(buyer, points_actor::Statement { buyer: buyer.to_string(), limit }).await
    }

    /// Requests in line at the points actors, all shards together.
    pub fn points_queue_depth(&self) -> usize {
        self.points.iter().map(|h| h.admission.depth()).sum()
    }

    pub fn points_price(&self, product: &str) -> Option<u64> {
        self.points_prices.get(product).map(|p| *p)
    }

    /// Makes a product redeemable for `points` per key (`None`: no longer). Durable
    /// when it returns.
    pub async fn set_points_price(&self, product: &str, points: Option<u64>) -> Result<(), Error> {
        self.listed(product)?;
        if points == Some(0) {
            return Err(Error::Invalid("points_price: must be at least 1".into()));
        }
        self.storage.set_points_price(product, points)?;
        self.storage.ticket()?.wait().await?;
        match points {
            Some(p) => self.points_prices.insert(product.to_string(), p),
            None => self.points_prices.remove(product).map(|(_, p)| p),
        };
        Ok(())
    }

    /// Deducts points and delivers keys as one outcome (the saga of
    /// `domain::points`): on 201 the order is delivered and the points are spent
    /// (or held, settled at the latest by the next resolver round); on a refusal
    /// neither happened. The same `Idempotency-Key` replays the same redemption.
    pub async fn redeem(&self, req: RedeemRequest, idempotency_key: &str) -> Result<Redeemed, Error> {
        if req.quantity == 0 || req.quantity > self.limits.max_quantity as u64 {
            return Err(Error::Invalid(format!("quantity: must be 1..={}", self.limits.max_quantity)));
        }
        validate::buyer(&req.buyer).map_err(Error::Invalid)?;
        validate::token("Idempotency-Key", idempotency_key).map_err(Error::Invalid)?;
        let route = self.listed(&req.product_id)?;
        let price = self.points_price(&req.product_id).ok_or(Error::Domain(DomainError::NotRedeemable))?;
        let points = price.checked_mul(req.quantity).ok_or_else(|| Error::Invalid("points: too many".into()))?;
        let redemption =
            hex::encode(digest(&[req.buyer.as_bytes(), req.product_id.as_bytes(), idempotency_key.as_bytes()]));
        let hold = Hold {
            redemption,
            buyer: req.buyer.clone(),
            points,
            product_id: req.product_id.clone(),
            quantity: req.quantity as u32,
            at_ms: 0, // the points actor stamps the hold with its own clock
        };
        let state = self.call_points(&req.buyer, points_actor::HoldPoints(hold.clone())).await?;
        let (order, replayed, settled_balance) = match state {
            RedemptionState::Settled { order_id, .. } => (self.get_order(&order_id, None).await?, true, None),
            RedemptionState::Held(held) => {
                if (held.points, held.quantity) != (points, req.quantity as u32) {
                    return Err(Error::Domain(DomainError::IdempotencyKeyReused));
                }
                let (order, balance) = self.finish_redemption(&route, &held).await?;
                let replayed = order.replayed;
                (order, replayed, balance)
            }
        };
        // The settle step answers the balance after it; a replay (or a settle left
        // to the resolver) reads it.
        let balance = match settled_balance {
            Some(b) => b,
            None => self.points_statement(&req.buyer, 0).await?.0,
        };
        Ok(Redeemed { order: OrderSnapshot { replayed, ..order }, points_spent: points, balance })
    }

    /// Steps 2 and 3 of a held redemption: the stock shard delivers (or refuses),
    /// then the hold is settled (or released). An answer that leaves step 2's
    /// outcome unknown (timeout, actor restarting) leaves the hold for the resolver.
    /// Returns the order and, when this call settled the hold, the buyer's balance after.
    async fn finish_redemption(
        &self,
        route: &crate::actors::ProductRoute,
        hold: &Hold,
    ) -> Result<(OrderSnapshot, Option<Balance>), Error> {
        let home = route.shard_index_for_buyer(&hold.buyer);
        let redemption = shard::Redeem(crate::domain::shard::Redemption {
            redemption: hold.redemption.clone(),
            buyer: hold.buyer.clone(),
            quantity: hold.quantity,
            query_token: new_token(),
        });
        let msg = || shard::Redeem(redemption.0.clone());
        let delivered = match self.call_in(Lane::NewOrder, &route.shards[home], msg()).await {
            Err(Error::Domain(DomainError::SoldOut { .. })) if route.shards.len() > 1 => {
                self.order_with_borrowed_keys(route, home, hold.quantity, msg).await
            }
            other => other,
        };
        match delivered {
            Ok(order) => {
                let settle = points_actor::Settle {
                    redemption: hold.redemption.clone(),
                    buyer: hold.buyer.clone(),
                    order_id: order.order_id(),
                };
                // The order is durable and the points are held for it: a failed settle
                // is retried by the resolver, which can only settle it (step 2 repeats).
                match self.call_points(&hold.buyer, settle).await {
                    Ok(balance) => Ok((order, Some(balance))),
                    Err(e) => {
                        tracing::warn!(redemption = %hold.redemption, error = %e, "settle deferred to the resolver");
                        Ok((order, None))
                    }
                }
            }
            // Refused for good, or never sent: the points come back.
            Err(e @ (Error::Domain(_) | Error::Overloaded | Error::QueueFull(_) | Error::ProductNotFound)) => {
                let reason = e.code().to_string();
                let release = points_actor::Release { redemption: hold.redemption.clone(), reason };
                if let Err(release_failed) = self.call_points(&hold.buyer, release).await {
                    tracing::warn!(redemption = %hold.redemption, error = %release_failed, "release deferred to the resolver");
                }
                Err(e)
            }
            Err(e) => Err(e),
        }
    }

    /// Finishes redemptions a crash or a timeout left held: each is sent to its
    /// stock shard again (idempotent) and settled or released. Holds younger than
    /// the request timeout may still be in their own request and are left alone.
    pub async fn resolve_holds(&self) {
        let before_ms = self.clock.now_ms().saturating_sub(self.limits.request_timeout.as_millis() as u64 + 1000);
        for handle in &self.points {
            let sent = handle.addr.send(points_actor::StaleHolds { before_ms, limit: 256 });
            let Ok(Ok(Ok(holds))) = tokio::time::timeout(self.limits.request_timeout, sent).await else { continue };
            for hold in holds {
                let outcome = match self.registry.get(&hold.product_id) {
                    Some(route) => self.finish_redemption(&route, &hold).await.map(|_| ()),
                    None => Err(Error::ProductNotFound),
                };
                tracing::info!(redemption = %hold.redemption, ?outcome, "held redemption resolved");
            }
        }
    }

    /// Every points shard's audit, and the cross-check against the stock shards:
    /// keys delivered by redemptions == keys of settled redemptions, give or take
    /// the redemptions in flight.
    pub async fn audit_points(&self) -> Result<Vec<PointsAudit>, Error> {
        let mut out = Vec::with_capacity(self.points.len());
        for handle in &self.points {
            let sent =
                tokio::time::timeout(self.limits.request_timeout, handle.addr.send(points_actor::AuditPoints)).await;
            out.push(answer(sent, "the points actor stopped")?);
        }
        Ok(out)
    }

    // ---- buyer ----

    fn fingerprint(req: &OrderRequest) -> [u8; 16] {
        digest(&[req.product_id.as_bytes(), &req.quantity.to_be_bytes(), req.buyer.as_bytes()])
    }

    pub async fn create_order(
        &self,
        req: OrderRequest,
        idempotency_key: Option<String>,
    ) -> Result<OrderSnapshot, Error> {
        if req.quantity == 0 || req.quantity > self.limits.max_quantity as u64 {
            return Err(Error::Invalid(format!("quantity: must be 1..={}", self.limits.max_quantity)));
        }
        validate::buyer(&req.buyer).map_err(Error::Invalid)?;
        if let Some(k) = &idempotency_key {
            validate::token("Idempotency-Key", k).map_err(Error::Invalid)?;
        }
        let route = self.listed(&req.product_id)?;
        // Hashed only when there is a key to pin it to.
        let idempotency = match idempotency_key {
            Some(key) => {
                let fingerprint = Self::fingerprint(&req);
                self.pin(&key, fingerprint)?;
                Some(Idempotency { key, fingerprint })
            }
            None => None,
        };
        let new = NewOrder {
            buyer: req.buyer.clone(),
            quantity: req.quantity as u32,
            idempotency: idempotency.clone(),
            query_token: new_token(),
            ttl_ms: self.ttl_ms,
        };
        let home = route.shard_index_for_buyer(&req.buyer);
        let result = if route.shards.len() == 1 {
            self.call_in(Lane::NewOrder, &route.shards[home], shard::CreateOrder(new)).await
        } else {
            match self.call_in(Lane::NewOrder, &route.shards[home], shard::CreateOrder(new.clone())).await {
                Err(Error::Domain(DomainError::SoldOut { .. })) => {
                    self.order_with_borrowed_keys(&route, home, new.quantity, || shard::CreateOrder(new.clone())).await
                }
                other => other,
            }
        };
        self.settle_pin(&idempotency, &result);
        result
    }

    /// After a request that pinned its Idempotency-Key: confirmed when it created
    /// something, released when it was definitely refused (a retry runs anew), kept
    /// when the outcome is unknown.
    fn settle_pin<T>(&self, idempotency: &Option<Idempotency>, result: &Result<T, Error>) {
        if let Some(Idempotency { key, fingerprint }) = idempotency {
            match result {
                Ok(_) => self.confirm_pin(key, *fingerprint),
                Err(Error::Domain(_)) => {
                    self.pins.remove_if(key, |_, p| p.fingerprint == *fingerprint && !p.confirmed);
                }
                Err(_) => {}
            }
        }
    }

    /// The buyer's shard is dry: borrow keys from its siblings and order again. The
    /// buyer stays on its own shard, so per-buyer limits stay exact. `sold_out` is
    /// answered only when every sibling had no key to lend and no keys were in
    /// transit between shards meanwhile: the whole product was empty.
    async fn order_with_borrowed_keys<M, R>(
        &self,
        route: &crate::actors::ProductRoute,
        home: usize,
        quantity: u32,
        msg: impl Fn() -> M,
    ) -> Result<R, Error>
    where
        M: Message<Result = ShardResult<R>> + Send + 'static,
        R: Send + 'static,
        ShardActor: Handler<M>,
    {
        let track = &route.transfers;
        let siblings = || (1..route.shards.len()).map(|k| (home + k) % route.shards.len());
        let sold_out = || Error::Domain(DomainError::SoldOut { requested: quantity, available: 0 });
        // Fast answer once the sale is over: every sibling's durable stock is 0.
        let mark = track.mark();
        if siblings().all(|j| route.shards[j].gauge.get().available == 0) && track.quiet_since(&mark) {
            return Err(sold_out());
        }
        let _turn = track.borrowing[home].lock().await;
        loop {
            // A borrower ahead in line may have refilled the shard.
            match self.call_in(Lane::NewOrder, &route.shards[home], msg()).await {
                Err(Error::Domain(DomainError::SoldOut { .. })) => {}
                other => return other,
            }
            let mark = track.mark();
            let (mut moved, mut lender_failed) = (false, None);
            for j in siblings() {
                if route.shards[j].gauge.get().available == 0 {
                    continue;
                }
                match self.transfer(route, j, home, quantity as usize).await {
                    Ok(0) => {}
                    Ok(_) => {
                        moved = true;
                        break;
                    }
                    // A lender that cannot answer may still hold keys: not `sold_out`.
                    Err(e @ (Error::Overloaded | Error::QueueFull(_) | Error::Timeout | Error::Unavailable(_))) => {
                        lender_failed = Some(e)
                    }
                    Err(e) => return Err(e),
                }
            }
            if !moved {
                if let Some(e) = lender_failed {
                    return Err(e);
                }
                if track.quiet_since(&mark) {
                    return Err(sold_out());
                }
                // Keys were in transit between other shards: look again once they land.
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }

    /// Moves keys from shard `from` to its dry sibling `to` (the three steps of
    /// [`crate::domain::shard::Transfers`]). Returns how many keys moved.
    async fn transfer(
        &self,
        route: &crate::actors::ProductRoute,
        from: usize,
        to: usize,
        wanted: usize,
    ) -> Result<usize, Error> {
        let _in_transit = route.transfers.begin();
        let max_keys = wanted.max(self.limits.max_transfer_keys);
        let Some(t) = self.call(&route.shards[from], shard::Lend { to: to as u16, max_keys }).await? else {
            return Ok(0);
        };
        let (transfer, n) = (t.transfer, t.keys.len());
        // Should this fail, the lender resends it later (`settle_transfers`).
        self.call(&route.shards[to], shard::Receive(t)).await?;
        let _ = self.call(&route.shards[from], shard::Settle(transfer)).await;
        metrics::counter!("kami_key_transfers_total").increment(1);
        metrics::counter!("kami_keys_transferred_total").increment(n as u64);
        Ok(n)
    }

    /// Resends every transfer a crash left unsettled (keys lent, not known to have
    /// arrived), so keys in transit always reach their borrower, exactly once.
    /// Returns how many were settled.
    pub async fn settle_transfers(&self) -> usize {
        let mut settled = 0;
        for route in self.registry.all().values().filter(|r| r.shards.len() > 1) {
            for lender in &route.shards {
                let Ok(list) = self.call(lender, shard::ListUnsettled { limit: 64 }).await else { continue };
                for t in list {
                    let (transfer, to) = (t.transfer, t.to as usize);
                    if self.call(&route.shards[to], shard::Receive(t)).await.is_ok()
                        && self.call(lender, shard::Settle(transfer)).await.is_ok()
                    {
                        settled += 1;
                    }
                }
            }
        }
        if settled > 0 {
            tracing::info!(settled, "resent key transfers left unsettled");
        }
        settled
    }

    fn pin(&self, key: &str, fingerprint: [u8; 16]) -> Result<(), Error> {
        if let Some(p) = self.pins.get(key) {
            return if p.fingerprint == fingerprint { Ok(()) } else { Err(DomainError::IdempotencyKeyReused.into()) };
        }
        if self.pins.len() >= self.limits.max_idempotency_keys {
            self.prune();
            if self.pins.len() >= self.limits.max_idempotency_keys {
                return Err(Error::Overloaded);
            }
        }
        let entry = self.pins.entry(key.to_string()).or_insert(Pin {
            fingerprint,
            at_ms: self.clock.now_ms(),
            confirmed: false,
        });
        if entry.fingerprint == fingerprint {
            Ok(())
        } else {
            Err(DomainError::IdempotencyKeyReused.into())
        }
    }

    fn confirm_pin(&self, key: &str, fingerprint: [u8; 16]) {
        let now = self.clock.now_ms();
        self.pins.entry(key.to_string()).and_modify(|p| p.confirmed = true).or_insert(Pin {
            fingerprint,
            at_ms: now,
            confirmed: true,
        });
    }

    /// Re-pins the Idempotency-Keys recovered shards hold (start-up), so reuse of a
    /// key with another product is still caught after a restart.
    pub fn restore_pins(&self, pins: Vec<(String, [u8; 16])>) {
        let now = self.clock.now_ms();
        for (key, fingerprint) in pins {
            self.pins.insert(key, Pin { fingerprint, at_ms: now, confirmed: true });
        }
    }

    /// Drops idempotency pins and nonces past their windows. Called periodically.
    pub fn prune(&self) {
        let now = self.clock.now_ms();
        let ttl = self.limits.idempotency_ttl_ms;
        self.pins.retain(|_, p| p.at_ms.saturating_add(ttl) > now);
        let window_ms = self.limits.max_skew_secs * 2000;
        self.nonces.retain(|_, (_, at)| at.saturating_add(window_ms) > now);
    }

    fn locate(&self, order_id: &str) -> Result<(OrderId, Arc<crate::actors::ProductRoute>), Error> {
        let not_found = || Error::Domain(DomainError::OrderNotFound);
        let id = OrderId::parse(order_id).ok_or_else(not_found)?;
        let route = self.registry.get(&id.shard.product).ok_or_else(not_found)?;
        if id.shard.shard as usize >= route.shards.len() {
            return Err(not_found());
        }
        Ok((id, route))
    }

    /// `token: None` reads as the merchant (no token check).
    pub async fn get_order(&self, order_id: &str, token: Option<&str>) -> Result<OrderSnapshot, Error> {
        let (id, route) = self.locate(order_id)?;
        let msg = shard::GetOrder { seq: id.seq, token: token.map(str::to_string) };
        self.call(&route.shards[id.shard.shard as usize], msg).await
    }

    pub async fn cancel_order(&self, order_id: &str, token: &str) -> Result<OrderSnapshot, Error> {
        let (id, route) = self.locate(order_id)?;
        let msg = shard::CancelOrder { seq: id.seq, token: token.to_string() };
        self.call(&route.shards[id.shard.shard as usize], msg).await
    }

    // ---- payments ----

    /// Verifies and applies a payment notification. `Ok` means the outcome is durable.
    pub async fn notify(&self, channel: &str, body: &[u8], signature: Option<&str>) -> Result<PaymentOutcome, Error> {
        let known = self.channels.get(channel).ok_or_else(|| Error::UnknownChannel(channel.to_string()))?;
        let signature = signature.ok_or(Error::BadSignature)?;
        let now_ms = self.clock.now_ms();
        if !known.verifies(body, signature, now_ms) {
            crate::telemetry::count_rejection("bad_signature");
            return Err(Error::BadSignature);
        }
        let n: Notification = serde_json::from_slice(body).map_err(|e| Error::Invalid(format!("notification: {e}")))?;
        validate::token("payment_id", &n.payment_id).map_err(Error::Invalid)?;
        validate::token("nonce", &n.nonce).map_err(Error::Invalid)?;
        if n.status.is_empty() || n.status.len() > 32 {
            return Err(Error::Invalid("status: must be 1..=32 bytes".into()));
        }
        let skew_secs = ((now_ms / 1000) as i64).abs_diff(n.timestamp);
        if skew_secs > self.limits.max_skew_secs {
            return Err(Error::StaleRequest { skew_secs, max_secs: self.limits.max_skew_secs });
        }
        crate::telemetry::record_order(&n.order_id);
        self.check_nonce(&n.nonce, body, now_ms)?;
        let (id, route) = self.locate(&n.order_id)?;
        let payment = Payment {
            order_seq: id.seq,
            payment_id: n.payment_id,
            channel: channel.to_string(),
            amount_cents: n.amount_cents,
            status: n.status,
        };
        let outcome =
            apply_payment(&route.shards[id.shard.shard as usize], payment, self.limits.request_timeout).await?;
        if let PaymentOutcome::AmountMismatch { expected_cents } = outcome {
            crate::telemetry::count_amount_mismatch();
            return Err(DomainError::AmountMismatch { expected: expected_cents, got: n.amount_cents }.into());
        }
        Ok(outcome)
    }

    /// A nonce may come again only with the very same body (a gateway's resend).
    fn check_nonce(&self, nonce: &str, body: &[u8], now_ms: u64) -> Result<(), Error> {
        let digest: [u8; 16] = Sha256::digest(body)[..16].try_into().expect("16 bytes");
        if let Some(seen) = self.nonces.get(nonce) {
            return if seen.0 == digest { Ok(()) } else { Err(Error::Replayed) };
        }
        if self.nonces.len() >= self.limits.max_nonces {
            self.prune();
            if self.nonces.len() >= self.limits.max_nonces {
                return Err(Error::Overloaded);
            }
        }
        let entry = self.nonces.entry(nonce.to_string()).or_insert((digest, now_ms));
        if entry.0 == digest {
            Ok(())
        } else {
            Err(Error::Replayed)
        }
    }

    pub fn sign_for_channel(&self, channel: &str, body: &[u8]) -> Option<String> {
        self.channels.get(channel).map(|c| crate::domain::signature::sign(&c.secret, body))
    }

    /// Runs the payment sweep now (queries, refunds, expiry) and reports what it
    /// found and fixed. Bounded by the gateways' timeouts, not by `request_timeout`.
    pub async fn reconcile(&self) -> Result<ReconcileReport, Error> {
        self.payments.send(Reconcile).await.map_err(|_| Error::Unavailable("the payment supervisor stopped".into()))
    }

    pub async fn payment_channels(&self) -> Result<Vec<ChannelView>, Error> {
        match tokio::time::timeout(self.limits.request_timeout, self.payments.send(ListChannels)).await {
            Ok(Ok(views)) => Ok(views),
            Ok(Err(_)) => Err(Error::Unavailable("the payment supervisor stopped".into())),
            Err(_) => Err(Error::Timeout),
        }
    }

    // ---- operations ----

    /// Snapshots every shard and flushes (graceful shutdown, admin request).
    /// Returns the number of shards snapshotted.
    pub async fn snapshot_all(&self) -> Result<usize, Error> {
        let mut shards = 0;
        for route in self.registry.all().values() {
            for s in &route.shards {
                match tokio::time::timeout(self.limits.request_timeout, s.addr.send(shard::TakeSnapshot)).await {
                    Ok(Ok(r)) => r?,
                    Ok(Err(_)) => return Err(Error::Unavailable("a stock actor stopped".into())),
                    Err(_) => return Err(Error::Timeout),
                }
                shards += 1;
            }
        }
        self.storage.flush_now()?;
        Ok(shards)
    }

    // ---- chaos ----

    /// Kills the actor(s) named by `target` (see [`crate::chaos`]) and returns the
    /// name of what was killed. Each kill is answered by the actor before it stops,
    /// so when this returns the actor is down or already rebuilding.
    pub async fn chaos_kill(&self, target: &Target) -> Result<String, Error> {
        let target = match target {
            Target::Random => self.random_actor(),
            other => other.clone(),
        };
        let kill = |sent: Result<Result<(), MailboxError>, tokio::time::error::Elapsed>| match sent {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(Error::Unavailable("the actor stopped before the kill".into())),
            Err(_) => Err(Error::Timeout),
        };
        let timeout = self.limits.request_timeout;
        match target {
            Target::Random => unreachable!("resolved above"),
            Target::Orders => {
                kill(tokio::time::timeout(timeout, self.supervisor.send(Kill)).await)?;
                Ok("orders".into())
            }
            Target::Payments => {
                kill(tokio::time::timeout(timeout, self.payments.send(Kill)).await)?;
                Ok("payments".into())
            }
            Target::Points => {
                for h in &self.points {
                    kill(tokio::time::timeout(timeout, h.addr.send(Kill)).await)?;
                }
                Ok("points".into())
            }
            Target::Product { id, shard } => {
                let route = self.registry.get(&id).ok_or(Error::ProductNotFound)?;
                let shards: Vec<usize> = match shard {
                    None => (0..route.shards.len()).collect(),
                    Some(n) if (n as usize) < route.shards.len() => vec![n as usize],
                    Some(n) => return Err(Error::ActorNotFound(format!("product {id} has no shard {n}"))),
                };
                for &i in &shards {
                    kill(tokio::time::timeout(timeout, route.shards[i].addr.send(Kill)).await)?;
                }
                metrics::counter!("kami_chaos_kills_total").increment(shards.len() as u64);
                Ok(match shard {
                    None => format!("product:{id}"),
                    Some(n) => format!("product:{id}#{n}"),
                })
            }
        }
    }

    /// One actor uniformly at random: any product shard, the order supervisor or
    /// the payment supervisor.
    fn random_actor(&self) -> Target {
        use rand::Rng;
        let routes = self.registry.all();
        let shards: usize = routes.values().map(|r| r.shards.len()).sum();
        let mut pick = rand::rng().random_range(0..shards + 2);
        if pick == shards + 1 {
            return Target::Payments;
        }
        for (id, route) in routes.iter() {
            if pick < route.shards.len() {
                return Target::Product { id: id.clone(), shard: Some(pick as u16) };
            }
            pick -= route.shards.len();
        }
        Target::Orders
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

#[cfg(test)]
mod tests {
    use super::*;

    fn points(settled: u64, held: u64) -> PointsAudit {
        PointsAudit {
            buyers: 1,
            total_balance: 10,
            redemptions_settled: settled,
            settled_quantity: [("p".to_string(), settled)].into_iter().collect(),
            held_quantity: [("p".to_string(), held)].into_iter().collect(),
            ..PointsAudit::default()
        }
    }

    fn product(redeemed: u64) -> ProductAudit {
        ProductAudit { id: "p".into(), redeemed, ..ProductAudit::default() }
    }

    #[test]
    fn redeemed_keys_must_match_settled_redemptions_give_or_take_those_in_flight() {
        for (redeemed, ok) in [(2, true), (3, true), (1, false), (4, false)] {
            let mut violations = Vec::new();
            let totals = check_points(vec![points(2, 1), points(0, 0)], &[product(redeemed)], &mut violations);
            assert_eq!(violations.is_empty(), ok, "redeemed {redeemed}: {violations:?}");
            assert_eq!((totals.buyers, totals.total_balance, totals.redemptions_settled), (2, 20, 2));
        }
    }
}
