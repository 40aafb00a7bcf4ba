//! The stock of one product shard and the orders that reserved from it.
//!
//! One [`Shard`] owns everything whose consistency matters together: the keys,
//! which of them are available, the orders holding or owning them, and the payments
//! received for those orders. Every mutation goes through [`Shard::apply`], which is
//! also what recovery replays, so live state and recovered state cannot diverge.
//!
//! Key accounting (invariant I6): every imported key is in exactly one place —
//! the `available` queue, the `keys` of a `pending_payment` order (reserved), or the
//! `keys` of a `delivered` order (sold). [`Shard::audit`] recounts this from the
//! actual state rather than trusting counters.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet, VecDeque};
use std::fmt;
use std::hash::BuildHasher;

use serde::{Deserialize, Serialize};

use super::audit::{key_digest, ShardAudit};
use super::error::DomainError;
use super::group::{Group, GroupState, GroupTerms};
use super::lookup::PasswordHash;
use super::Millis;

mod apply;
mod archive;
mod audit;
mod effects;
mod event;
mod groups;
mod holdings;
mod keys;
mod listing;
mod lookup;
mod transfers;

pub use archive::{Archived, ArchivedOrder};
pub use effects::Tally;
pub use event::{Event, PaymentOutcome, PaymentRecord, RefundReason};
pub use keys::{KeyFate, KeyState, Withdrawal};
pub use listing::OrderFilter;
pub use transfers::{OutgoingTransfer, Transfers};

/// Index of a key in its shard's `keys` vector.
pub type KeyId = u32;

/// Upper bound of keys carried by one `KeysImported` event (bounds journal records).
pub const MAX_KEYS_PER_EVENT: usize = 4096;
/// Upper bound of the key bytes one `KeysImported` event carries: 4,096 keys of the
/// longest kind would make a record over 1 MiB, more than a NATS server takes in
/// one message (its default `max_payload`) on the jetstream backend.
pub const MAX_KEY_BYTES_PER_EVENT: usize = 512 << 10;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProductInfo {
    pub id: String,
    pub name: String,
    pub price_cents: u64,
    /// 0 = unlimited.
    pub per_buyer_limit: u32,
    pub shards: u16,
    pub created_at_ms: Millis,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OrderStatus {
    PendingPayment,
    Paid,
    Delivered,
    Expired,
    Cancelled,
    RefundPending,
    Refunded,
}

impl OrderStatus {
    pub const ALL: [OrderStatus; 7] = [
        OrderStatus::PendingPayment,
        OrderStatus::Paid,
        OrderStatus::Delivered,
        OrderStatus::Expired,
        OrderStatus::Cancelled,
        OrderStatus::RefundPending,
        OrderStatus::Refunded,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            OrderStatus::PendingPayment => "pending_payment",
            OrderStatus::Paid => "paid",
            OrderStatus::Delivered => "delivered",
            OrderStatus::Expired => "expired",
            OrderStatus::Cancelled => "cancelled",
            OrderStatus::RefundPending => "refund_pending",
            OrderStatus::Refunded => "refunded",
        }
    }

    /// Statuses that count against `per_buyer_limit` (docs/api.md).
    pub fn counts_toward_limit(self) -> bool {
        matches!(self, OrderStatus::PendingPayment | OrderStatus::Paid | OrderStatus::Delivered)
    }
}

impl fmt::Display for OrderStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An Idempotency-Key and the fingerprint of the request body it first came with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Idempotency {
    pub key: String,
    pub fingerprint: [u8; 16],
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    pub seq: u64,
    pub buyer: String,
    pub quantity: u32,
    pub amount_cents: u64,
    pub created_at_ms: Millis,
    pub expires_at_ms: Millis,
    pub paid_at_ms: Option<Millis>,
    pub delivered_at_ms: Option<Millis>,
    /// When it turned `expired` or `cancelled`.
    pub closed_at_ms: Option<Millis>,
    pub status: OrderStatus,
    /// Reserved keys while `pending_payment`, delivered keys once `delivered`, else empty.
    pub keys: Vec<KeyId>,
    pub query_token: String,
    pub idempotency: Option<Idempotency>,
    /// The payment that paid this order.
    pub payment_id: Option<String>,
    /// A notification with the wrong amount arrived: flagged for the merchant.
    pub amount_mismatch: bool,
}

impl Order {
    /// Whether `given` is this order's query token (compared in constant time). Who
    /// does not hold it is told the order does not exist.
    pub fn token_matches(&self, given: &str) -> bool {
        use subtle::ConstantTimeEq;
        given.len() == self.query_token.len() && bool::from(given.as_bytes().ct_eq(self.query_token.as_bytes()))
    }
}

/// How the `payment_id` of an order paid with points begins: it contains a space,
/// which no gateway's payment id may (`validate::token`), so the two never collide.
/// Journals and snapshots record redemptions this way: changing it is a format change.
const REDEEMED_PAYMENT_PREFIX: &str = "points ";

/// The `payment_id` of an order paid with points by `redemption`.
pub fn redeemed_payment_id(redemption: &str) -> String {
    format!("{REDEEMED_PAYMENT_PREFIX}{redemption}")
}

/// The redemption that paid `order`, if points paid it.
pub fn redemption_of(order: &Order) -> Option<&str> {
    order.payment_id.as_deref().and_then(|p| p.strip_prefix(REDEEMED_PAYMENT_PREFIX))
}

fn is_redeemed(order: &Order) -> bool {
    redemption_of(order).is_some()
}

/// Step 2 of a redemption, as the stock shard sees it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Redemption {
    /// The saga's id: also this order's idempotency key (`redeem:<id>`).
    pub redemption: String,
    pub buyer: String,
    pub quantity: u32,
    pub query_token: String,
}

/// Where a payment is recorded: its id is unique within its channel only. Channel
/// names cannot contain `/`, so the key is unambiguous.
pub fn payment_key(channel: &str, payment_id: &str) -> String {
    format!("{channel}/{payment_id}")
}

/// A refund the shard owes, to be made at the payment's channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefundDue {
    pub payment_id: String,
    pub channel: String,
    pub amount_cents: u64,
    pub order_seq: u64,
}

/// An order whose payment may have happened without kami hearing of it: still
/// pending, or expired/cancelled recently, and with no payment recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unheard {
    pub order_seq: u64,
    pub amount_cents: u64,
    pub created_at_ms: Millis,
}

/// A new order request, already validated by the caller (quantity ≥ 1, buyer well formed).
#[derive(Debug, Clone)]
pub struct NewOrder {
    pub buyer: String,
    pub quantity: u32,
    pub idempotency: Option<Idempotency>,
    pub query_token: String,
    pub ttl_ms: Millis,
    /// The stored form of the buyer's query password, if they set one.
    pub password: Option<PasswordHash>,
    /// The coupon use held for this order (see `domain::coupon`), if any.
    pub coupon: Option<super::coupon::CouponUse>,
    /// The reseller price the caller's API-key tier sells this product at, if any.
    pub reseller: Option<super::pricing::Reseller>,
}

/// A payment notification, signature and freshness already checked by the caller.
#[derive(Debug, Clone)]
pub struct Payment {
    pub order_seq: u64,
    pub payment_id: String,
    pub channel: String,
    pub amount_cents: u64,
    pub status: PaymentStatus,
}

/// What a channel says of a payment. Only `paid` moves an order; any other status a
/// gateway reports (`pending`, `closed`, ...) is recorded as it came.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PaymentStatus {
    Paid,
    Other(String),
}

impl PaymentStatus {
    pub fn as_str(&self) -> &str {
        match self {
            PaymentStatus::Paid => "paid",
            PaymentStatus::Other(s) => s,
        }
    }
}

impl From<&str> for PaymentStatus {
    fn from(s: &str) -> Self {
        match s {
            "paid" => PaymentStatus::Paid,
            other => PaymentStatus::Other(other.to_string()),
        }
    }
}

impl From<String> for PaymentStatus {
    fn from(s: String) -> Self {
        match s.as_str() {
            "paid" => PaymentStatus::Paid,
            _ => PaymentStatus::Other(s),
        }
    }
}

/// What a shard command did (see [`crate::domain::Outcome`]).
pub type Outcome<T> = crate::domain::Outcome<Event, T>;

/// Counters kept in step with the state; the audit checks them against a recount.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub imported: u64,
    pub available: u64,
    pub reserved: u64,
    pub sold: u64,
    /// Orders ever created on this shard (for orders/s on the status page).
    pub orders: u64,
    /// Payments owed back (orders `refund_pending`) now.
    pub refunds_owed: u64,
    /// Paid seats waiting for their group to complete (orders `paid`) now.
    pub paid_waiting: u64,
    /// Keys the merchant withdrew from stock.
    pub withdrawn: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Shard {
    product: ProductInfo,
    shard: u16,
    keys: Vec<Box<str>>,
    available: VecDeque<KeyId>,
    /// Orders in memory, by sequence (dense from 1, less those archived).
    orders: BTreeMap<u64, Order>,
    /// By [`payment_key`]: payment ids are unique per channel only.
    payments: HashMap<String, PaymentRecord>,
    /// (v3) Keys lent to and borrowed from sibling shards.
    transfers: Transfers,
    /// (v4) Group-buy groups: `groups[seq - 1]`.
    groups: Vec<Group>,
    /// (v5) Orders ever created here: the last order's sequence.
    orders_created: u64,
    /// (v5) What the shard keeps of archived orders.
    archived: Archived,
    /// (v6) Keys the merchant took out of stock, in the order they left.
    withdrawn: Vec<KeyId>,
    /// (v7) Query passwords of orders in memory (archived ones are in the
    /// archive's lookup index), by order.
    passwords: BTreeMap<u64, PasswordHash>,
    /// (v9) How orders in memory were priced, for those not at their list price
    /// (archived ones keep it in their archive record).
    pricings: BTreeMap<u64, super::pricing::OrderPricing>,
    /// (v11) Archived delivered orders that used a coupon, by code (for the audit's
    /// cross-check against the coupons' counts of uses).
    archived_coupons: BTreeMap<String, u64>,

    // Derived indexes, rebuilt by `rebuild_indexes` after a snapshot is loaded.
    #[serde(skip)]
    key_index: hashbrown::HashTable<KeyId>,
    /// Whether any key here is a reusable key's unit (`domain::key_mode`).
    #[serde(skip)]
    has_units: bool,
    #[serde(skip)]
    hasher: hashbrown::DefaultHashBuilder,
    #[serde(skip)]
    holdings: holdings::Holdings,
    /// Buyer → their orders in memory that have a query password.
    #[serde(skip)]
    password_orders: HashMap<String, std::collections::BTreeSet<u64>>,
    #[serde(skip)]
    idempotency: HashMap<String, ([u8; 16], u64)>,
    #[serde(skip)]
    expiry: BinaryHeap<Reverse<(Millis, u64)>>,
    #[serde(skip)]
    reserved: u64,
    #[serde(skip)]
    sold: u64,
    /// Payments whose outcome is `RefundOwed`, by id.
    #[serde(skip)]
    refunds_owed: std::collections::BTreeSet<String>,
    /// Order seq → the group it took a seat in.
    #[serde(skip)]
    group_of: HashMap<u64, u64>,
    /// Groups still open, oldest first (for "join any open group").
    #[serde(skip)]
    open_groups: std::collections::BTreeSet<u64>,
    /// Deadlines of open groups.
    #[serde(skip)]
    group_expiry: BinaryHeap<Reverse<(Millis, u64)>>,
    /// Paid seats of open groups → their payment's key.
    #[serde(skip)]
    seat_payments: HashMap<u64, String>,
    /// Off the shelf: nothing new is taken (orders, seats, redemptions), while
    /// repeats and everything about existing orders go on. Set by the owner of the
    /// shard from the product's durable shelf state; not part of the shard's history.
    #[serde(skip)]
    retired: bool,
    /// The product's terms of sale (its name, price and limit are also in
    /// `product`; the window only here). Set by the owner of the shard from the
    /// product's durable terms; not part of the shard's history.
    #[serde(skip)]
    terms: crate::domain::terms::Terms,
}

/// A shard's primary state with its orders in a dense list and nothing archived:
/// what older snapshot formats hold (storage's decoders of those formats build a
/// shard from it; the domain knows no format).
pub struct ShardParts {
    pub product: ProductInfo,
    pub shard: u16,
    pub keys: Vec<Box<str>>,
    pub available: VecDeque<KeyId>,
    pub orders: Vec<Order>,
    pub payments: HashMap<String, PaymentRecord>,
    pub transfers: Transfers,
    pub groups: Vec<Group>,
    /// Orders ever created (`None`: as many as `orders`, nothing archived).
    pub orders_created: Option<u64>,
    pub archived: Archived,
    pub withdrawn: Vec<KeyId>,
    pub passwords: BTreeMap<u64, PasswordHash>,
    pub pricings: BTreeMap<u64, super::pricing::OrderPricing>,
}

impl From<ShardParts> for Shard {
    fn from(old: ShardParts) -> Shard {
        let mut shard = Shard::new(old.product, old.shard);
        shard.keys = old.keys;
        shard.available = old.available;
        shard.orders_created = old.orders_created.unwrap_or(old.orders.len() as u64);
        shard.orders = old.orders.into_iter().map(|o| (o.seq, o)).collect();
        shard.archived = old.archived;
        shard.payments = old.payments;
        shard.transfers = old.transfers;
        shard.groups = old.groups;
        shard.withdrawn = old.withdrawn;
        shard.passwords = old.passwords;
        shard.pricings = old.pricings;
        shard
    }
}

impl Shard {
    pub fn new(product: ProductInfo, shard: u16) -> Shard {
        assert!(shard < product.shards, "shard {shard} out of range for {}", product.id);
        let terms = crate::domain::terms::Terms::of(&product);
        let holdings = holdings::Holdings::counting_if(product.per_buyer_limit > 0);
        Shard {
            product,
            shard,
            keys: Vec::new(),
            available: VecDeque::new(),
            orders: BTreeMap::new(),
            payments: HashMap::new(),
            transfers: Transfers::default(),
            groups: Vec::new(),
            orders_created: 0,
            archived: Archived::default(),
            withdrawn: Vec::new(),
            passwords: BTreeMap::new(),
            pricings: BTreeMap::new(),
            archived_coupons: BTreeMap::new(),
            key_index: hashbrown::HashTable::new(),
            has_units: false,
            hasher: hashbrown::DefaultHashBuilder::default(),
            holdings,
            password_orders: HashMap::new(),
            idempotency: HashMap::new(),
            expiry: BinaryHeap::new(),
            reserved: 0,
            sold: 0,
            refunds_owed: Default::default(),
            group_of: HashMap::new(),
            open_groups: Default::default(),
            group_expiry: BinaryHeap::new(),
            seat_payments: HashMap::new(),
            retired: false,
            terms,
        }
    }

    /// Rebuilds every derived index from the primary state (after deserialising a snapshot).
    pub fn rebuild_indexes(&mut self) {
        self.key_index = hashbrown::HashTable::with_capacity(self.keys.len());
        for id in 0..self.keys.len() {
            self.index_key(id as KeyId);
        }
        self.count_holdings();
        self.idempotency.clear();
        self.expiry.clear();
        self.reserved = 0;
        self.sold = self.archived.sold_keys.len() as u64;
        for order in self.orders.values() {
            if let Some(idem) = &order.idempotency {
                self.idempotency.insert(idem.key.clone(), (idem.fingerprint, order.seq));
            }
            match order.status {
                OrderStatus::PendingPayment => {
                    self.reserved += order.keys.len() as u64;
                    self.expiry.push(Reverse((order.expires_at_ms, order.seq)));
                }
                // Only a member of an open group waits in `paid`, its keys reserved.
                OrderStatus::Paid => self.reserved += order.keys.len() as u64,
                OrderStatus::Delivered => self.sold += order.keys.len() as u64,
                _ => {}
            }
        }
        self.password_orders.clear();
        for seq in self.passwords.keys() {
            let order = self.orders.get(seq).expect("a password belongs to an order in memory");
            self.password_orders.entry(order.buyer.clone()).or_default().insert(*seq);
        }
        self.group_of.clear();
        self.open_groups.clear();
        self.group_expiry.clear();
        for g in &self.groups {
            self.group_of.extend(g.orders.iter().map(|&seq| (seq, g.seq)));
            if g.state == GroupState::Open {
                self.open_groups.insert(g.seq);
                self.group_expiry.push(Reverse((g.deadline_ms, g.seq)));
            }
        }
        // Snapshots of format v1 keyed payments by id alone: re-key them all.
        let payments = std::mem::take(&mut self.payments);
        self.payments = payments.into_values().map(|p| (payment_key(&p.channel, &p.payment_id), p)).collect();
        self.refunds_owed = self
            .payments
            .iter()
            .filter(|(_, p)| matches!(p.outcome, PaymentOutcome::RefundOwed(_)))
            .map(|(key, _)| key.clone())
            .collect();
        self.seat_payments = self
            .payments
            .iter()
            .filter(|(_, p)| p.outcome == PaymentOutcome::AwaitingGroup)
            .map(|(key, p)| (p.order_seq, key.clone()))
            .collect();
    }

    pub fn product(&self) -> &ProductInfo {
        &self.product
    }

    pub fn shard_index(&self) -> u16 {
        self.shard
    }

    pub fn counts(&self) -> Counts {
        Counts {
            imported: self.keys.len() as u64 - self.transfers.received_new,
            available: self.available.len() as u64,
            reserved: self.reserved,
            sold: self.sold,
            orders: self.orders_created,
            refunds_owed: self.refunds_owed.len() as u64,
            paid_waiting: self.seat_payments.len() as u64,
            withdrawn: self.withdrawn.len() as u64,
        }
    }

    /// How many orders this shard ever created (sequences `1..=` this).
    pub fn orders_created(&self) -> u64 {
        self.orders_created
    }

    /// An order in memory (not archived).
    pub fn order(&self, seq: u64) -> Option<&Order> {
        self.orders.get(&seq)
    }

    fn order_mut(&mut self, seq: u64) -> &mut Order {
        self.orders.get_mut(&seq).expect("the order is in memory")
    }

    /// Whether order `seq` existed here and was archived.
    pub fn is_archived(&self, seq: u64) -> bool {
        (1..=self.orders_created).contains(&seq) && !self.orders.contains_key(&seq)
    }

    /// The orders in memory, oldest first (tests and tools: it collects them).
    pub fn orders(&self) -> Vec<&Order> {
        self.orders.values().collect()
    }

    pub fn archived(&self) -> &Archived {
        &self.archived
    }

    /// Key `id` as buyers and merchants see it (a reusable key's unit shows the
    /// key, see [`crate::domain::key_mode`]).
    /// How order `seq` (in memory) was priced, if not at its list price.
    pub fn pricing(&self, seq: u64) -> Option<&super::pricing::OrderPricing> {
        self.pricings.get(&seq)
    }

    pub fn key(&self, id: KeyId) -> &str {
        super::key_mode::shown(&self.keys[id as usize])
    }

    /// Key `id` as stored: what identifies it among this product's keys.
    fn stored_key(&self, id: KeyId) -> &str {
        &self.keys[id as usize]
    }

    /// Every key in this shard's stock (available, reserved or sold), in the order
    /// it arrived; keys lent to a sibling are not.
    pub fn key_strings(&self) -> impl Iterator<Item = &str> {
        let away = &self.transfers.away;
        self.keys.iter().enumerate().filter(move |(id, _)| !away.contains(&(*id as KeyId))).map(|(_, k)| &**k)
    }

    pub fn payment(&self, channel: &str, payment_id: &str) -> Option<&PaymentRecord> {
        self.payments.get(&payment_key(channel, payment_id))
    }

    pub fn payments(&self) -> impl Iterator<Item = &PaymentRecord> {
        self.payments.values()
    }

    /// The idempotency keys this shard has answered, for the shared pin index.
    pub fn idempotency_keys(&self) -> impl Iterator<Item = (&str, [u8; 16])> {
        let archived = self.archived.idempotency.iter().map(|(k, (fp, _, _))| (k.as_str(), *fp));
        self.idempotency.iter().map(|(k, (fp, _))| (k.as_str(), *fp)).chain(archived)
    }

    /// The order an idempotency key answered, and the request's fingerprint.
    /// The order created under idempotency key `key`, while the key is kept.
    pub fn order_for_key(&self, key: &str) -> Option<u64> {
        self.idempotent(key).map(|(_, seq)| seq)
    }

    fn idempotent(&self, key: &str) -> Option<([u8; 16], u64)> {
        self.idempotency.get(key).copied().or_else(|| self.archived.idempotency.get(key).map(|&(fp, seq, _)| (fp, seq)))
    }

    /// Adds `keys[id]` to the deduplication index.
    fn index_key(&mut self, id: KeyId) {
        let (keys, hasher) = (&self.keys, &self.hasher);
        self.has_units |= super::key_mode::is_unit(&keys[id as usize]);
        let hash = hasher.hash_one(&*keys[id as usize]);
        self.key_index.insert_unique(hash, id, |&k| hasher.hash_one(&*keys[k as usize]));
    }

    fn find_key(&self, key: &str) -> Option<KeyId> {
        let hash = self.hasher.hash_one(key);
        self.key_index.find(hash, |&k| &*self.keys[k as usize] == key).copied()
    }

    // ---- commands: decide, apply, and return the event to journal ----

    /// Adds keys not yet known to this shard. Returns the events (chunks of at most
    /// [`MAX_KEYS_PER_EVENT`] keys and [`MAX_KEY_BYTES_PER_EVENT`] key bytes) and
    /// `(imported, duplicates)`.
    pub fn import_keys(&mut self, keys: Vec<String>) -> (Vec<Event>, u64, u64) {
        let total = keys.len() as u64;
        let mut seen: HashSet<&str> = HashSet::with_capacity(keys.len());
        let mut fresh: Vec<usize> = Vec::with_capacity(keys.len());
        for (i, key) in keys.iter().enumerate() {
            if self.find_key(key).is_none() && seen.insert(key.as_str()) {
                fresh.push(i);
            }
        }
        drop(seen);
        let imported = fresh.len() as u64;
        let mut keys: Vec<Option<String>> = keys.into_iter().map(Some).collect();
        let mut events = Vec::new();
        let mut batch: Vec<String> = Vec::new();
        let mut bytes = 0;
        for i in fresh {
            let key = keys[i].take().expect("index used once");
            if !batch.is_empty() && (batch.len() == MAX_KEYS_PER_EVENT || bytes + key.len() > MAX_KEY_BYTES_PER_EVENT) {
                let event = Event::KeysImported { keys: std::mem::take(&mut batch) };
                self.apply(&event);
                events.push(event);
                bytes = 0;
            }
            bytes += key.len();
            batch.push(key);
        }
        if !batch.is_empty() {
            let event = Event::KeysImported { keys: batch };
            self.apply(&event);
            events.push(event);
        }
        (events, imported, total - imported)
    }

    /// Whether `buyer` may take `quantity` more keys now: within the per-buyer limit
    /// (pending, paid and delivered orders count) and within the available stock.
    fn check_can_take(&self, buyer: &str, quantity: u32, now_ms: Millis) -> Result<(), DomainError> {
        if self.retired {
            return Err(DomainError::ProductRetired);
        }
        self.terms.check_window(now_ms)?;
        let limit = self.product.per_buyer_limit;
        if limit > 0 {
            let held = self.holdings.get(buyer);
            if held.saturating_add(quantity) > limit {
                return Err(DomainError::LimitExceeded { limit, held });
            }
        }
        if (self.available.len() as u64) < quantity as u64 {
            return Err(DomainError::SoldOut { requested: quantity, available: self.available.len() as u64 });
        }
        Ok(())
    }

    /// Takes the product off the shelf (`true`) or puts it back: off the shelf, nothing new
    /// is taken (orders, seats, redemptions), while repeats and existing orders go on.
    pub fn set_retired(&mut self, retired: bool) {
        self.retired = retired;
    }

    /// Sells on `terms` from now on (price, per-buyer limit, sale window): what was
    /// created before keeps its amounts.
    pub fn set_terms(&mut self, terms: &crate::domain::terms::Terms) {
        terms.apply_to(&mut self.product);
        self.terms.clone_from(terms);
        if self.holdings.counting() != (self.product.per_buyer_limit > 0) {
            self.count_holdings();
        }
    }

    /// Counts every buyer's keys again (`holdings`) if the product has a per-buyer
    /// limit, or stops counting: orders in memory that count toward the limit and
    /// what archived orders held.
    fn count_holdings(&mut self) {
        self.holdings.restart(self.product.per_buyer_limit > 0);
        if !self.holdings.counting() {
            return;
        }
        for (buyer, &held) in &self.archived.holdings {
            self.holdings.add(buyer, held);
        }
        for order in self.orders.values() {
            if order.status.counts_toward_limit() {
                self.holdings.add(&order.buyer, order.quantity);
            }
        }
    }

    /// Orders that are not settled yet: waiting for payment, paid seats of open
    /// groups, refunds owed. (Archived orders are all settled.)
    pub fn open_orders(&self) -> crate::domain::shelf::OpenOrders {
        let mut open = crate::domain::shelf::OpenOrders::default();
        for order in self.orders.values() {
            match order.status {
                OrderStatus::PendingPayment => open.pending_payment += 1,
                OrderStatus::Paid => open.paid += 1,
                OrderStatus::RefundPending => open.refund_pending += 1,
                OrderStatus::Delivered | OrderStatus::Expired | OrderStatus::Cancelled | OrderStatus::Refunded => {}
            }
        }
        open
    }

    pub fn create_order(&mut self, mut req: NewOrder, now_ms: Millis) -> Result<Outcome<u64>, DomainError> {
        assert!(req.quantity >= 1, "quantity validated by the caller");
        if let Some(idem) = &req.idempotency {
            if let Some((fingerprint, seq)) = self.idempotent(&idem.key) {
                return if fingerprint == idem.fingerprint {
                    Ok(Outcome::Repeat(seq))
                } else {
                    Err(DomainError::IdempotencyKeyReused)
                };
            }
        }
        // After its deadline the core may have given the use back: no order for it.
        if req.coupon.as_ref().is_some_and(|c| now_ms > c.deadline_ms) {
            return Err(DomainError::CouponHoldExpired);
        }
        self.check_can_take(&req.buyer, req.quantity, now_ms)?;
        let price = super::pricing::price(
            self.product.price_cents,
            &self.terms.tiers,
            req.quantity,
            req.reseller.as_ref(),
            req.coupon.as_ref(),
        )?;
        let password = req.password.take();
        let order = self.pending_order(req, price.total_cents, now_ms);
        let seq = order.seq;
        let event = match (password, price.record()) {
            (password, Some(pricing)) => Event::OrderCreatedPriced { order, password, pricing },
            (Some(password), None) => Event::OrderCreatedWithPassword { order, password },
            (None, None) => Event::OrderCreated { order },
        };
        self.apply(&event);
        Ok(Outcome::Changed(event, seq))
    }

    /// Step 2 of a redemption: an order delivered at once, its keys taken from stock.
    /// The same redemption again is a repeat (its order), whatever became of it.
    pub fn redeem(&mut self, r: Redemption, now_ms: Millis) -> Result<Outcome<u64>, DomainError> {
        assert!(r.quantity >= 1, "quantity validated by the caller");
        let key = format!("redeem:{}", r.redemption);
        if let Some((_, seq)) = self.idempotent(&key) {
            return Ok(Outcome::Repeat(seq));
        }
        self.check_can_take(&r.buyer, r.quantity, now_ms)?;
        let seq = self.orders_created + 1;
        let order = Order {
            seq,
            amount_cents: 0,
            buyer: r.buyer,
            quantity: r.quantity,
            created_at_ms: now_ms,
            expires_at_ms: now_ms,
            paid_at_ms: Some(now_ms),
            delivered_at_ms: Some(now_ms),
            closed_at_ms: None,
            status: OrderStatus::Delivered,
            keys: self.available.iter().take(r.quantity as usize).copied().collect(),
            query_token: r.query_token,
            idempotency: Some(Idempotency { key, fingerprint: [0; 16] }),
            payment_id: Some(redeemed_payment_id(&r.redemption)),
            amount_mismatch: false,
        };
        let event = Event::OrderRedeemed { order };
        self.apply(&event);
        Ok(Outcome::Changed(event, seq))
    }

    pub fn pay(&mut self, p: Payment, now_ms: Millis) -> Result<Outcome<PaymentOutcome>, DomainError> {
        if let Some(rec) = self.payments.get(&payment_key(&p.channel, &p.payment_id)) {
            if rec.order_seq != p.order_seq {
                return Err(DomainError::PaymentIdConflict);
            }
            // Gateways report a payment's status changes under its one id. A status
            // that took nothing (`pending`, ...) does not pin the id: a later `paid`
            // is decided afresh and serves the order (a paid order is never left
            // unserved). A repeat, or a step back (`paid`, then `pending`), is the
            // recorded answer and changes nothing.
            let settles_now = rec.outcome == PaymentOutcome::Ignored && p.status == PaymentStatus::Paid;
            if !settles_now {
                return Ok(Outcome::Repeat(rec.outcome));
            }
        }
        let Some(order) = self.order(p.order_seq) else {
            return self.pay_archived(p, now_ms);
        };
        let mut taken_keys = Vec::new();
        let outcome = if p.status != PaymentStatus::Paid {
            PaymentOutcome::Ignored
        } else if p.amount_cents != order.amount_cents {
            PaymentOutcome::AmountMismatch { expected_cents: order.amount_cents }
        } else {
            let group = self.group_of.get(&p.order_seq).map(|&g| &self.groups[(g - 1) as usize]);
            match (order.status, group) {
                (OrderStatus::PendingPayment, None) => PaymentOutcome::Delivered,
                (OrderStatus::PendingPayment, Some(g)) => {
                    // Pending seats of a group are seats of an open group (failing cancels them).
                    let (taken, paid) = self.seats(g);
                    if taken == g.size && paid + 1 == g.size {
                        PaymentOutcome::Delivered
                    } else {
                        PaymentOutcome::AwaitingGroup
                    }
                }
                // A group seat is sold at the group price only within its group.
                (OrderStatus::Expired | OrderStatus::Cancelled, Some(g)) => PaymentOutcome::RefundOwed(match g.state {
                    GroupState::Failed { .. } => RefundReason::GroupFailed,
                    _ => RefundReason::LeftGroup,
                }),
                // Its coupon use was given back when it closed: it is never delivered.
                (OrderStatus::Expired | OrderStatus::Cancelled, None)
                    if self.pricings.get(&p.order_seq).is_some_and(|r| r.coupon.is_some()) =>
                {
                    PaymentOutcome::RefundOwed(RefundReason::CouponReturned)
                }
                (OrderStatus::Expired | OrderStatus::Cancelled, None) => {
                    if self.available.len() >= order.quantity as usize {
                        taken_keys = self.available.iter().take(order.quantity as usize).copied().collect();
                        PaymentOutcome::Delivered
                    } else {
                        PaymentOutcome::RefundOwed(RefundReason::SoldOut)
                    }
                }
                (
                    OrderStatus::Paid | OrderStatus::Delivered | OrderStatus::RefundPending | OrderStatus::Refunded,
                    _,
                ) => PaymentOutcome::RefundOwed(RefundReason::AlreadyPaid),
            }
        };
        Ok(self.record_payment(p, outcome, taken_keys, now_ms))
    }

    /// Journals payment `p` with the outcome decided for it (applied at once).
    fn record_payment(
        &mut self,
        p: Payment,
        outcome: PaymentOutcome,
        taken_keys: Vec<KeyId>,
        now_ms: Millis,
    ) -> Outcome<PaymentOutcome> {
        let record = PaymentRecord {
            payment_id: p.payment_id,
            order_seq: p.order_seq,
            channel: p.channel,
            amount_cents: p.amount_cents,
            status: p.status.as_str().to_string(),
            at_ms: now_ms,
            outcome,
        };
        let event = Event::PaymentApplied { record, taken_keys };
        self.apply(&event);
        Outcome::Changed(event, outcome)
    }

    /// A new payment for an archived order (closed or delivered long ago): recorded;
    /// if `paid`, owed back (the archived order does not change).
    fn pay_archived(&mut self, p: Payment, now_ms: Millis) -> Result<Outcome<PaymentOutcome>, DomainError> {
        if !self.is_archived(p.order_seq) {
            return Err(DomainError::OrderNotFound);
        }
        let outcome = if p.status == PaymentStatus::Paid {
            PaymentOutcome::RefundOwed(RefundReason::OrderArchived)
        } else {
            PaymentOutcome::Ignored
        };
        Ok(self.record_payment(p, outcome, Vec::new(), now_ms))
    }

    /// Records that `channel` refunded `payment_id`. A repeat changes nothing.
    pub fn complete_refund(
        &mut self,
        channel: &str,
        payment_id: &str,
        now_ms: Millis,
    ) -> Result<Outcome<()>, DomainError> {
        let record = self.payment(channel, payment_id).ok_or(DomainError::PaymentNotFound)?;
        match record.outcome {
            PaymentOutcome::RefundOwed(_) => {
                let event = Event::RefundCompleted {
                    channel: channel.to_string(),
                    payment_id: payment_id.to_string(),
                    at_ms: now_ms,
                };
                self.apply(&event);
                Ok(Outcome::Changed(event, ()))
            }
            PaymentOutcome::Refunded(_) => Ok(Outcome::Repeat(())),
            _ => Err(DomainError::NoRefundOwed),
        }
    }

    /// Refunds still owed, at most `limit`, in payment id order.
    pub fn refunds_due(&self, limit: usize) -> Vec<RefundDue> {
        self.refunds_owed
            .iter()
            .take(limit)
            .map(|key| {
                let p = &self.payments[key];
                RefundDue {
                    payment_id: p.payment_id.clone(),
                    channel: p.channel.clone(),
                    amount_cents: p.amount_cents,
                    order_seq: p.order_seq,
                }
            })
            .collect()
    }

    /// Orders to ask the channels about (lost notifications): no payment recorded,
    /// created at least `quiet_ms` ago, and either pending or closed less than
    /// `grace_ms` after their expiry. Scans only orders whose expiry + grace is
    /// still ahead (orders are in creation order and share one TTL), newest first.
    pub fn unheard(&self, now_ms: Millis, quiet_ms: Millis, grace_ms: Millis, limit: usize) -> Vec<Unheard> {
        let mut out = Vec::new();
        for o in self.orders.values().rev() {
            if o.expires_at_ms.saturating_add(grace_ms) <= now_ms || out.len() >= limit {
                break;
            }
            let open = matches!(o.status, OrderStatus::PendingPayment | OrderStatus::Expired | OrderStatus::Cancelled);
            // A flagged order already has the channel's (wrong) payment on record.
            let heard = o.payment_id.is_some() || o.amount_mismatch;
            if open && !heard && o.created_at_ms.saturating_add(quiet_ms) <= now_ms {
                out.push(Unheard { order_seq: o.seq, amount_cents: o.amount_cents, created_at_ms: o.created_at_ms });
            }
        }
        out
    }

    /// Orders left `paid` outside an open group (a state every other payment step
    /// leaves at once: delivered or refund owed). Any found is a bug the
    /// reconciliation report must show. O(orders).
    pub fn stuck_paid(&self, limit: usize) -> Vec<u64> {
        self.orders
            .values()
            .filter(|o| o.status == OrderStatus::Paid && !self.in_open_group(o.seq))
            .take(limit)
            .map(|o| o.seq)
            .collect()
    }

    pub fn cancel(&mut self, seq: u64, now_ms: Millis) -> Result<Event, DomainError> {
        let order = self.order(seq).ok_or(DomainError::OrderNotFound)?;
        if order.status != OrderStatus::PendingPayment {
            return Err(DomainError::InvalidState { status: order.status });
        }
        let event = Event::OrderCancelled { seq, at_ms: now_ms };
        self.apply(&event);
        Ok(event)
    }

    // ---- transfers between sibling shards (see [`Transfers`]) ----

    /// When the next pending order or open group falls due, if any.
    pub fn next_expiry(&self) -> Option<Millis> {
        let order = self.expiry.peek().map(|Reverse((at, _))| *at);
        let group = self.group_expiry.peek().map(|Reverse((at, _))| *at);
        order.into_iter().chain(group).min()
    }

    /// Expires every pending order whose `expires_at` is at or before `now_ms`.
    /// Cost is proportional to the orders due (plus stale heap entries), never to all orders.
    /// Groups past their deadline fail first (one event each, whatever their size).
    pub fn expire_due(&mut self, now_ms: Millis, max_events: usize) -> Vec<Event> {
        let mut events = self.fail_due_groups(now_ms, max_events);
        while events.len() < max_events {
            let Some(&Reverse((at, seq))) = self.expiry.peek() else { break };
            if at > now_ms {
                break;
            }
            self.expiry.pop();
            let still_pending = self.order(seq).is_some_and(|o| o.status == OrderStatus::PendingPayment);
            if still_pending {
                let event = Event::OrderExpired { seq, at_ms: now_ms };
                self.apply(&event);
                events.push(event);
            }
        }
        events
    }

    // ---- the only mutator ----

    /// A new `pending_payment` order for `req` at `amount_cents`, reserving keys from
    /// the front of the available queue (checked by the caller).
    fn pending_order(&self, req: NewOrder, amount_cents: u64, now_ms: Millis) -> Order {
        Order {
            seq: self.orders_created + 1,
            amount_cents,
            buyer: req.buyer,
            quantity: req.quantity,
            created_at_ms: now_ms,
            expires_at_ms: now_ms.saturating_add(req.ttl_ms),
            paid_at_ms: None,
            delivered_at_ms: None,
            closed_at_ms: None,
            status: OrderStatus::PendingPayment,
            keys: self.available.iter().take(req.quantity as usize).copied().collect(),
            query_token: req.query_token,
            idempotency: req.idempotency,
            payment_id: None,
            amount_mismatch: false,
        }
    }

    // ---- audit ----
}

#[cfg(test)]
mod tests {
    use super::*;

    fn product(limit: u32) -> ProductInfo {
        ProductInfo {
            id: "p1".into(),
            name: "Game key".into(),
            price_cents: 990,
            per_buyer_limit: limit,
            shards: 1,
            created_at_ms: 0,
        }
    }

    fn shard_with_keys(n: usize, limit: u32) -> Shard {
        let mut s = Shard::new(product(limit), 0);
        let (_, imported, dups) = s.import_keys((0..n).map(|i| format!("K{i}")).collect());
        assert_eq!((imported, dups), (n as u64, 0));
        s
    }

    fn new_order(buyer: &str, quantity: u32) -> NewOrder {
        NewOrder {
            buyer: buyer.into(),
            quantity,
            idempotency: None,
            query_token: "t".into(),
            ttl_ms: 1000,
            password: None,
            coupon: None,
            reseller: None,
        }
    }

    fn paid(seq: u64, payment_id: &str, amount: u64) -> Payment {
        Payment {
            order_seq: seq,
            payment_id: payment_id.into(),
            channel: "sandbox".into(),
            amount_cents: amount,
            status: "paid".into(),
        }
    }

    fn created(o: Result<Outcome<u64>, DomainError>) -> u64 {
        match o.unwrap() {
            Outcome::Changed(_, seq) => seq,
            Outcome::Repeat(_) => panic!("expected a new order"),
        }
    }

    /// Holdings are counted only while the product has a per-buyer limit; a limit
    /// set later counts the orders already taken (a delivered one too), and one
    /// lifted and set again counts afresh.
    #[test]
    fn a_per_buyer_limit_set_later_counts_the_orders_already_taken() {
        use crate::domain::terms::{Terms, TermsChange};
        let mut s = shard_with_keys(20, 0);
        let first = created(s.create_order(new_order("a", 2), 0));
        assert!(matches!(s.pay(paid(first, "pay-1", 1980), 10), Ok(Outcome::Changed(..))));
        created(s.create_order(new_order("a", 1), 20));
        created(s.create_order(new_order("b", 1), 30));
        assert_eq!(s.holdings.len(), 0, "no limit, nothing counted");
        let base = Terms::of(&s.product);
        let limit = |n| base.changed(&TermsChange { per_buyer_limit: Some(n), ..Default::default() }).unwrap();
        let three = limit(3);
        s.set_terms(&three);
        assert!(matches!(s.create_order(new_order("a", 1), 40), Err(DomainError::LimitExceeded { limit: 3, held: 3 })));
        created(s.create_order(new_order("b", 2), 40));
        let none = limit(0);
        s.set_terms(&none);
        assert_eq!(s.holdings.len(), 0, "a lifted limit empties the index");
        created(s.create_order(new_order("a", 1), 50));
        s.set_terms(&three);
        assert!(matches!(s.create_order(new_order("a", 1), 60), Err(DomainError::LimitExceeded { limit: 3, held: 4 })));
        assert!(matches!(s.create_order(new_order("b", 1), 60), Err(DomainError::LimitExceeded { limit: 3, held: 3 })));
    }

    #[test]
    fn keys_are_listed_by_state_page_by_page() {
        let mut s = shard_with_keys(6, 0);
        let sold = created(s.create_order(new_order("a", 2), 0));
        s.pay(paid(sold, "P1", 1980), 1).unwrap();
        created(s.create_order(new_order("b", 1), 2));
        let ids =
            |state, after, limit| s.keys_in(state, after, limit).0.into_iter().map(|(id, _)| id).collect::<Vec<_>>();
        assert_eq!(ids(KeyState::Sold, None, 10), [0, 1]);
        assert_eq!(ids(KeyState::Reserved, None, 10), [2]);
        assert_eq!(ids(KeyState::Available, None, 10), [3, 4, 5]);
        // Pages: after an id, at most `limit`, and whether more follow.
        assert_eq!(s.keys_in(KeyState::Available, None, 2).0, [(3, "K3"), (4, "K4")]);
        assert!(!s.keys_in(KeyState::Available, None, 2).1);
        assert_eq!(s.keys_in(KeyState::Available, Some(4), 2), (vec![(5, "K5")], true));
        assert_eq!(s.keys_in(KeyState::Available, Some(5), 2), (vec![], true));
        // Every key in exactly one state.
        let total: usize = KeyState::ALL.iter().map(|&st| s.keys_in(st, None, 100).0.len()).sum();
        assert_eq!(total, 6);
    }

    #[test]
    fn a_pending_status_does_not_pin_the_payment_id_and_a_later_paid_serves_the_order() {
        let mut s = shard_with_keys(2, 0);
        let Outcome::Changed(create, seq) = s.create_order(new_order("a", 1), 0).unwrap() else { panic!() };
        let status = |st: &str| Payment { status: st.into(), ..paid(seq, "P", 990) };
        let mut journal = vec![create];
        let Outcome::Changed(e, PaymentOutcome::Ignored) = s.pay(status("pending"), 1).unwrap() else { panic!() };
        journal.push(e);
        assert_eq!(s.pay(status("pending"), 2).unwrap(), Outcome::Repeat(PaymentOutcome::Ignored), "same status");
        assert_eq!(s.pay(status("closed"), 2).unwrap(), Outcome::Repeat(PaymentOutcome::Ignored));
        let Outcome::Changed(e, PaymentOutcome::Delivered) = s.pay(status("paid"), 3).unwrap() else { panic!() };
        journal.push(e);
        assert_eq!(s.order(seq).unwrap().status, OrderStatus::Delivered);
        assert_eq!(s.pay(status("paid"), 4).unwrap(), Outcome::Repeat(PaymentOutcome::Delivered), "a repeat");
        assert_eq!(s.pay(status("pending"), 5).unwrap(), Outcome::Repeat(PaymentOutcome::Delivered), "a step back");
        assert!(s.audit().violations.is_empty(), "{:?}", s.audit().violations);
        // The journal (pending, then paid under the same id) replays to the same state.
        let mut replayed = shard_with_keys(2, 0);
        for e in &journal {
            replayed.apply(e);
        }
        assert_eq!(replayed.order(seq).unwrap().status, OrderStatus::Delivered);
        assert_eq!(replayed.counts(), s.counts());
    }

    #[test]
    fn settled_orders_leave_memory_keeping_limits_replays_and_audit_whole() {
        let mut s = shard_with_keys(5, 2);
        let keyed = |buyer: &str, key: &str| NewOrder {
            idempotency: Some(Idempotency { key: key.into(), fingerprint: [1; 16] }),
            ..new_order(buyer, 1)
        };
        let mut journal = Vec::new();
        let take = |o: Outcome<u64>, journal: &mut Vec<Event>| match o {
            Outcome::Changed(e, seq) => {
                journal.push(e);
                seq
            }
            Outcome::Repeat(seq) => seq,
        };
        let sold = take(s.create_order(keyed("a", "k1"), 0).unwrap(), &mut journal);
        let Outcome::Changed(e, _) = s.pay(paid(sold, "P1", 990), 10).unwrap() else { panic!() };
        journal.push(e);
        let lapsed = take(s.create_order(keyed("b", "k2"), 0).unwrap(), &mut journal);
        journal.extend(s.expire_due(2_000, 10));
        let open = take(s.create_order(new_order("c", 1), 5_000).unwrap(), &mut journal);
        // Not yet old enough; then both settled ones, never the pending one.
        assert!(s.archivable(3_000, 10_000, 10).is_empty());
        let seqs = s.archivable(20_000, 10_000, 10);
        assert_eq!(seqs, [sold, lapsed]);
        journal.push(s.archive(seqs, 20_000, 60_000).unwrap());
        assert!(s.order(sold).is_none() && s.is_archived(sold) && !s.is_archived(open));
        assert_eq!(s.orders().len(), 1);
        assert!(s.audit().violations.is_empty(), "{:?}", s.audit().violations);
        assert_eq!(s.counts().sold, 1);
        // The key's replay survives archiving (within its window); the limit still counts.
        assert_eq!(s.create_order(keyed("a", "k1"), 21_000), Ok(Outcome::Repeat(sold)));
        assert_eq!(s.create_order(new_order("a", 2), 21_000), Err(DomainError::LimitExceeded { limit: 2, held: 1 }));
        // A repeat of its payment is the recorded answer; a new one is owed back.
        assert_eq!(s.pay(paid(sold, "P1", 990), 22_000), Ok(Outcome::Repeat(PaymentOutcome::Delivered)));
        let Outcome::Changed(e, late) = s.pay(paid(lapsed, "P2", 990), 22_000).unwrap() else { panic!() };
        assert_eq!(late, PaymentOutcome::RefundOwed(RefundReason::OrderArchived));
        journal.push(e);
        assert_eq!(s.refunds_due(10).len(), 1);
        assert_eq!(s.cancel(lapsed, 22_000), Err(DomainError::OrderNotFound), "the shell answers invalid_state");
        // Replay and snapshot rebuild the same state.
        let mut replayed = shard_with_keys(5, 2);
        for e in &journal {
            replayed.apply(e);
        }
        assert_eq!(replayed.archived(), s.archived());
        assert_eq!(replayed.counts(), s.counts());
        // What a snapshot keeps: the serialised fields, without the derived indexes.
        let mut restored: Shard = bincode::deserialize(&bincode::serialize(&s).unwrap()).unwrap();
        restored.rebuild_indexes();
        assert_eq!(
            restored.create_order(new_order("a", 2), 23_000),
            Err(DomainError::LimitExceeded { limit: 2, held: 1 })
        );
        assert_eq!(restored.create_order(keyed("a", "k1"), 23_000), Ok(Outcome::Repeat(sold)));
        assert!(restored.audit().violations.is_empty());
        // Past its window the key is forgotten at the next archiving.
        let none_due = s.archivable(70_000, 10_000, 10);
        assert!(none_due.is_empty(), "the pending order is not archived: {none_due:?}");
        journal.extend(s.expire_due(70_000, 10));
        let seqs = s.archivable(90_000, 10_000, 10);
        assert_eq!(seqs, [open]);
        s.archive(seqs, 90_000, 60_000);
        assert!(s.archived().idempotency.is_empty(), "keys past their window are forgotten");
        assert_eq!(s.orders().len(), 0);
        assert_eq!(s.archived().orders(), 3);
    }

    #[test]
    fn written_archive_records_are_archived_only_if_their_orders_did_not_change_meanwhile() {
        let mut s = shard_with_keys(5, 0);
        let a = created(s.create_order(new_order("a", 1), 0));
        s.pay(paid(a, "P1", 990), 10).unwrap();
        let b = created(s.create_order(new_order("b", 1), 0));
        s.pay(paid(b, "P2", 990), 10).unwrap();
        let c = created(s.create_order(new_order("c", 1), 0));
        s.expire_due(2_000, 10);
        let seqs = s.archivable(20_000, 10_000, 10);
        assert_eq!(seqs, [a, b, c]);
        let written: Vec<_> = seqs.iter().filter_map(|&seq| s.archive_record(seq)).collect();
        // While the records are being flushed: a second payment of `a` is owed back
        // (the order itself is unchanged), and `c`, expired, is paid late and served.
        let Outcome::Changed(_, owed) = s.pay(paid(a, "P1-again", 990), 20_001).unwrap() else { panic!() };
        assert!(matches!(owed, PaymentOutcome::RefundOwed(_)));
        let Outcome::Changed(_, served) = s.pay(paid(c, "P3", 990), 20_001).unwrap() else { panic!() };
        assert_eq!(served, PaymentOutcome::Delivered);
        let Some(Event::OrdersArchived { seqs, .. }) = s.archive_written(&written, 20_002, 10_000, 60_000) else {
            panic!("b is still archivable");
        };
        assert_eq!(seqs, [b], "a owes a refund, c changed since its record was written");
        assert!(s.is_archived(b) && s.order(a).is_some() && s.order(c).is_some());
        assert!(s.audit().violations.is_empty(), "{:?}", s.audit().violations);
        // Written again later, nothing is left to archive twice.
        assert_eq!(s.archive_written(&written[1..2], 20_003, 10_000, 60_000), None);
    }

    #[test]
    fn the_archiving_scan_goes_on_where_it_stopped_and_starts_over_at_young_orders() {
        let mut s = shard_with_keys(10, 0);
        // Five pending orders that stay, then two that settle.
        let stay: Vec<u64> = (0..5).map(|i| created(s.create_order(new_order(&format!("s{i}"), 1), 0))).collect();
        let go: Vec<u64> = (0..2).map(|i| created(s.create_order(new_order(&format!("g{i}"), 1), 0))).collect();
        for (i, seq) in go.iter().enumerate() {
            s.pay(paid(*seq, &format!("P{i}"), 990), 1).unwrap();
        }
        // A scan of three looks at three pending orders and says where it stopped.
        let (found, next) = s.archivable_after(0, 50_000, 10_000, 3, 10);
        assert!(found.is_empty());
        assert_eq!(next, stay[2]);
        // The next one goes on from there and reaches the settled orders.
        let (found, next) = s.archivable_after(next, 50_000, 10_000, 3, 10);
        assert_eq!(found, [go[0]]);
        assert_eq!(next, go[0]);
        // The end of the orders sends the scan back to the start.
        let (found, next) = s.archivable_after(next, 50_000, 10_000, 3, 10);
        assert_eq!((found, next), (vec![go[1]], 0));
        // So does an order too young to archive.
        let young = created(s.create_order(new_order("y", 1), 49_000));
        let (_, next) = s.archivable_after(stay[4], 50_000, 10_000, 10, 10);
        assert_eq!(next, 0, "stopped at {young}");
    }

    #[test]
    fn audit_catches_a_paid_order_whose_payment_record_is_missing_or_foreign() {
        let mut s = shard_with_keys(3, 0);
        let a = created(s.create_order(new_order("a", 1), 0));
        let b = created(s.create_order(new_order("b", 1), 0));
        s.pay(paid(a, "pa", 990), 1).unwrap();
        s.pay(paid(b, "pb", 990), 1).unwrap();
        assert!(s.audit().violations.is_empty(), "{:?}", s.audit());

        let mut lost = s.clone();
        lost.payments.remove("sandbox/pa");
        assert!(lost.audit().violations.iter().any(|v| v.contains("order 1 names payment")), "{:?}", lost.audit());

        let mut swapped = s.clone();
        swapped.order_mut(1).payment_id = Some("pb".into());
        let v = swapped.audit().violations;
        assert!(v.iter().any(|v| v.contains("not its own")) && v.iter().any(|v| v.contains("disagrees")), "{v:?}");

        let mut unpaid = s;
        unpaid.order_mut(2).payment_id = None;
        assert!(unpaid.audit().violations.iter().any(|v| v.contains("without a payment")));
    }

    #[test]
    fn refund_owed_after_a_sold_out_late_payment_completes_once() {
        let mut s = shard_with_keys(1, 0);
        let late = created(s.create_order(new_order("late", 1), 0));
        s.expire_due(5_000, 10);
        let other = created(s.create_order(new_order("other", 1), 5_000));
        s.pay(paid(other, "p-other", 990), 5_001).unwrap();
        let Outcome::Changed(_, outcome) = s.pay(paid(late, "p-late", 990), 6_000).unwrap() else { panic!() };
        assert_eq!(outcome, PaymentOutcome::RefundOwed(RefundReason::SoldOut));
        assert_eq!(s.order(late).unwrap().status, OrderStatus::RefundPending);
        let due = s.refunds_due(10);
        assert_eq!(
            due,
            vec![RefundDue {
                payment_id: "p-late".into(),
                channel: "sandbox".into(),
                amount_cents: 990,
                order_seq: late
            }]
        );

        assert!(matches!(
            s.complete_refund("sandbox", "p-late", 7_000),
            Ok(Outcome::Changed(Event::RefundCompleted { .. }, ()))
        ));
        assert_eq!(s.order(late).unwrap().status, OrderStatus::Refunded);
        assert!(s.refunds_due(10).is_empty());
        assert_eq!(s.complete_refund("sandbox", "p-late", 8_000), Ok(Outcome::Repeat(())));
        assert_eq!(s.complete_refund("sandbox", "p-other", 8_000), Err(DomainError::NoRefundOwed));
        assert_eq!(s.complete_refund("sandbox", "nope", 8_000), Err(DomainError::PaymentNotFound));
        // A repeat of the original notification still answers with the recorded payment.
        assert_eq!(
            s.pay(paid(late, "p-late", 990), 9_000),
            Ok(Outcome::Repeat(PaymentOutcome::Refunded(RefundReason::SoldOut)))
        );
        assert!(s.audit().violations.is_empty(), "{:?}", s.audit());
    }

    #[test]
    fn payment_ids_are_per_channel() {
        let mut s = shard_with_keys(2, 0);
        let a = created(s.create_order(new_order("a", 1), 0));
        let b = created(s.create_order(new_order("b", 1), 0));
        let on = |channel: &str, seq| Payment { channel: channel.into(), ..paid(seq, "pay-1", 990) };
        assert!(matches!(s.pay(on("alpha", a), 1), Ok(Outcome::Changed(_, PaymentOutcome::Delivered))));
        // Another gateway's "pay-1" is another payment.
        assert!(matches!(s.pay(on("beta", b), 1), Ok(Outcome::Changed(_, PaymentOutcome::Delivered))));
        assert_eq!(s.pay(on("alpha", a), 2), Ok(Outcome::Repeat(PaymentOutcome::Delivered)));
        assert_eq!(s.pay(on("beta", a), 2), Err(DomainError::PaymentIdConflict));
        assert_eq!(s.payment("beta", "pay-1").map(|p| p.order_seq), Some(b));
        assert!(s.audit().violations.is_empty(), "{:?}", s.audit());
    }

    #[test]
    fn a_second_payment_of_a_delivered_order_is_owed_back_and_the_order_stays_delivered() {
        let mut s = shard_with_keys(2, 0);
        let seq = created(s.create_order(new_order("a", 1), 0));
        s.pay(paid(seq, "first", 990), 1).unwrap();
        s.pay(paid(seq, "second", 990), 2).unwrap();
        assert_eq!(s.refunds_due(10).len(), 1);
        s.complete_refund("sandbox", "second", 3).unwrap();
        assert_eq!(s.order(seq).unwrap().status, OrderStatus::Delivered);
        assert!(s.audit().violations.is_empty());
    }

    #[test]
    fn unheard_lists_orders_without_payment_until_expiry_plus_grace() {
        let mut s = shard_with_keys(5, 0);
        let a = created(s.create_order(new_order("a", 1), 0)); // expires at 1000
        let b = created(s.create_order(new_order("b", 1), 500)); // expires at 1500
        let c = created(s.create_order(new_order("c", 1), 600));
        s.pay(paid(c, "pc", 990), 700).unwrap();
        let seqs = |v: Vec<Unheard>| v.into_iter().map(|u| u.order_seq).collect::<Vec<_>>();
        assert_eq!(seqs(s.unheard(800, 100, 2_000, 10)), vec![b, a], "newest first; the paid one is heard");
        assert_eq!(seqs(s.unheard(550, 100, 2_000, 10)), vec![a], "b is too fresh to ask about");
        s.expire_due(1_200, 10);
        assert_eq!(seqs(s.unheard(2_900, 100, 2_000, 10)), vec![b, a], "expired, within grace");
        assert_eq!(seqs(s.unheard(3_200, 100, 2_000, 10)), vec![b], "a is past its grace");
        assert_eq!(seqs(s.unheard(3_600, 100, 2_000, 10)), Vec::<u64>::new());
        assert_eq!(s.unheard(800, 100, 2_000, 1).len(), 1, "bounded");
    }

    #[test]
    fn import_counts_duplicates_within_batch_and_before() {
        let mut s = shard_with_keys(2, 0);
        let (events, imported, dups) = s.import_keys(vec!["K1".into(), "K2".into(), "K2".into(), "K3".into()]);
        assert_eq!((imported, dups), (2, 2));
        assert_eq!(events.len(), 1);
        assert_eq!(s.counts().imported, 4);
    }

    #[test]
    fn import_chunks_large_batches() {
        let mut s = Shard::new(product(0), 0);
        let (events, imported, _) = s.import_keys((0..MAX_KEYS_PER_EVENT + 5).map(|i| i.to_string()).collect());
        assert_eq!(events.len(), 2);
        assert_eq!(imported as usize, MAX_KEYS_PER_EVENT + 5);
    }

    #[test]
    fn import_chunks_long_keys_by_bytes() {
        // 4,096 keys of 256 bytes (1 MiB) would not fit one NATS message.
        let mut s = Shard::new(product(0), 0);
        let keys: Vec<String> = (0..MAX_KEYS_PER_EVENT).map(|i| format!("{i:0>256}")).collect();
        let (events, imported, _) = s.import_keys(keys);
        assert_eq!(imported as usize, MAX_KEYS_PER_EVENT);
        assert_eq!(events.len(), 2);
        for e in &events {
            let Event::KeysImported { keys } = e else { panic!("an import event") };
            assert!(keys.iter().map(String::len).sum::<usize>() <= MAX_KEY_BYTES_PER_EVENT);
        }
    }

    #[test]
    fn a_loan_of_long_keys_is_bounded_by_bytes() {
        let mut s = Shard::new(product(0), 0);
        s.product.shards = 2;
        let keys: Vec<String> = (0..2 * MAX_KEYS_PER_EVENT).map(|i| format!("{i:0>256}")).collect();
        let _ = s.import_keys(keys);
        let (_, lent) = s.lend(1, MAX_KEYS_PER_EVENT).expect("keys to lend");
        let bytes: usize = lent.keys.iter().map(String::len).sum();
        assert!(bytes <= MAX_KEY_BYTES_PER_EVENT && bytes > MAX_KEY_BYTES_PER_EVENT - 256, "{bytes} bytes");
        assert_eq!(lent.keys.len(), MAX_KEY_BYTES_PER_EVENT / 256);
        // Short keys go by count.
        let mut short = shard_with_keys(10, 0);
        short.product.shards = 2;
        assert_eq!(short.lend(1, 4).expect("keys").1.keys.len(), 4);
    }

    #[test]
    fn purchase_delivers_reserved_keys() {
        let mut s = shard_with_keys(3, 0);
        let seq = created(s.create_order(new_order("alice", 2), 10));
        assert_eq!(
            s.counts(),
            Counts { imported: 3, available: 1, reserved: 2, sold: 0, orders: 1, ..Counts::default() }
        );
        let out = s.pay(paid(seq, "pay1", 1980), 20).unwrap();
        assert!(matches!(out, Outcome::Changed(_, PaymentOutcome::Delivered)));
        let order = s.order(seq).unwrap();
        assert_eq!(order.status, OrderStatus::Delivered);
        assert_eq!(order.keys.iter().map(|&k| s.key(k)).collect::<Vec<_>>(), ["K0", "K1"]);
        assert_eq!(
            s.counts(),
            Counts { imported: 3, available: 1, reserved: 0, sold: 2, orders: 1, ..Counts::default() }
        );
        assert!(s.audit().violations.is_empty());
    }

    #[test]
    fn repeated_payment_is_a_repeat() {
        let mut s = shard_with_keys(1, 0);
        let seq = created(s.create_order(new_order("a", 1), 0));
        s.pay(paid(seq, "pay1", 990), 1).unwrap();
        assert_eq!(s.pay(paid(seq, "pay1", 990), 2).unwrap(), Outcome::Repeat(PaymentOutcome::Delivered));
        assert_eq!(s.pay(paid(seq + 1, "pay1", 990), 2), Err(DomainError::PaymentIdConflict));
        let second = s.pay(paid(seq, "pay2", 990), 3).unwrap();
        assert!(matches!(second, Outcome::Changed(_, PaymentOutcome::RefundOwed(RefundReason::AlreadyPaid))));
        assert_eq!(s.counts().sold, 1);
    }

    #[test]
    fn sold_out_and_limits() {
        let mut s = shard_with_keys(3, 2);
        created(s.create_order(new_order("a", 2), 0));
        assert_eq!(s.create_order(new_order("a", 1), 0), Err(DomainError::LimitExceeded { limit: 2, held: 2 }));
        assert_eq!(s.create_order(new_order("b", 2), 0), Err(DomainError::SoldOut { requested: 2, available: 1 }));
        created(s.create_order(new_order("b", 1), 0));
    }

    #[test]
    fn off_the_shelf_nothing_new_is_taken_but_repeats_and_open_orders_go_on() {
        let mut s = shard_with_keys(5, 0);
        let mut req = new_order("a", 1);
        req.idempotency = Some(Idempotency { key: "k1".into(), fingerprint: [1; 16] });
        let seq = created(s.create_order(req.clone(), 0));
        let redemption =
            Redemption { redemption: "r1".into(), buyer: "b".into(), quantity: 1, query_token: "t".into() };
        let redeemed = created(s.redeem(redemption.clone(), 0));
        let terms = GroupTerms { deal_id: "d".into(), size: 2, price_cents: 500, time_limit_ms: 10_000 };
        s.set_retired(true);
        assert_eq!(s.create_order(new_order("c", 1), 0), Err(DomainError::ProductRetired));
        let other = Redemption { redemption: "r2".into(), ..redemption.clone() };
        assert_eq!(s.redeem(other, 0), Err(DomainError::ProductRetired));
        assert_eq!(s.open_group(&terms, new_order("c", 1), 0), Err(DomainError::ProductRetired));
        assert_eq!(s.join_any(&terms, new_order("c", 1), 0), Err(DomainError::ProductRetired));
        assert_eq!(s.create_order(req, 0), Ok(Outcome::Repeat(seq)), "a repeat still answers");
        assert_eq!(s.redeem(redemption, 0), Ok(Outcome::Repeat(redeemed)));
        assert_eq!(s.open_orders(), crate::domain::shelf::OpenOrders { pending_payment: 1, ..Default::default() });
        assert!(matches!(s.pay(paid(seq, "pay-1", 990), 1), Ok(Outcome::Changed(..))), "an open order is paid");
        assert_eq!(s.open_orders().total(), 0);
        s.set_retired(false);
        created(s.create_order(new_order("c", 1), 0));
    }

    #[test]
    fn idempotency_replays_and_detects_reuse() {
        let mut s = shard_with_keys(5, 0);
        let idem = Idempotency { key: "k1".into(), fingerprint: [1; 16] };
        let mut req = new_order("a", 1);
        req.idempotency = Some(idem.clone());
        let seq = created(s.create_order(req.clone(), 0));
        assert_eq!(s.create_order(req.clone(), 0), Ok(Outcome::Repeat(seq)));
        req.idempotency = Some(Idempotency { fingerprint: [2; 16], ..idem });
        assert_eq!(s.create_order(req, 0), Err(DomainError::IdempotencyKeyReused));
        assert_eq!(s.orders().len(), 1);
    }

    #[test]
    fn expiry_releases_and_late_payment_is_served_or_refunded() {
        let mut s = shard_with_keys(1, 1);
        let seq = created(s.create_order(new_order("a", 1), 0));
        assert_eq!(s.next_expiry(), Some(1000));
        assert!(s.expire_due(999, 100).is_empty());
        assert_eq!(s.expire_due(1000, 100).len(), 1);
        assert_eq!(s.order(seq).unwrap().status, OrderStatus::Expired);
        assert_eq!(s.counts().available, 1);
        // The buyer's quota is free again; another buyer takes the last key.
        let other = created(s.create_order(new_order("b", 1), 2000));
        // The late payment finds no stock: refund owed, never dropped.
        let out = s.pay(paid(seq, "late", 990), 2001).unwrap();
        assert!(matches!(out, Outcome::Changed(_, PaymentOutcome::RefundOwed(RefundReason::SoldOut))));
        assert_eq!(s.order(seq).unwrap().status, OrderStatus::RefundPending);
        // Cancel the other order: a late payment for it is served from stock.
        s.cancel(other, 2002).unwrap();
        assert!(matches!(s.pay(paid(other, "p2", 990), 2003).unwrap(), Outcome::Changed(_, PaymentOutcome::Delivered)));
        assert_eq!(
            s.counts(),
            Counts {
                imported: 1,
                available: 0,
                reserved: 0,
                sold: 1,
                orders: 2,
                refunds_owed: 1,
                paid_waiting: 0,
                withdrawn: 0
            }
        );
        assert!(s.audit().violations.is_empty(), "{:?}", s.audit());
    }

    #[test]
    fn cancel_only_pending() {
        let mut s = shard_with_keys(1, 0);
        let seq = created(s.create_order(new_order("a", 1), 0));
        s.pay(paid(seq, "p", 990), 1).unwrap();
        assert_eq!(s.cancel(seq, 2), Err(DomainError::InvalidState { status: OrderStatus::Delivered }));
        assert_eq!(s.cancel(99, 2), Err(DomainError::OrderNotFound));
    }

    #[test]
    fn amount_mismatch_and_other_statuses_deliver_nothing() {
        let mut s = shard_with_keys(1, 0);
        let seq = created(s.create_order(new_order("a", 1), 0));
        let out = s.pay(paid(seq, "p1", 1), 1).unwrap();
        assert!(matches!(out, Outcome::Changed(_, PaymentOutcome::AmountMismatch { expected_cents: 990 })));
        assert!(s.order(seq).unwrap().amount_mismatch);
        let mut failed = paid(seq, "p2", 990);
        failed.status = "failed".into();
        assert!(matches!(s.pay(failed, 2).unwrap(), Outcome::Changed(_, PaymentOutcome::Ignored)));
        assert_eq!(s.order(seq).unwrap().status, OrderStatus::PendingPayment);
        assert_eq!(s.counts().sold, 0);
    }
}
