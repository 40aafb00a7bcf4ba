//! What a stock actor is asked, and the views it answers with.

use super::*;

/// An order as the shard reports it, key strings resolved (serialised: a cluster
/// node sends it to another, `core::remote`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct OrderSnapshot {
    pub order: Order,
    pub product_id: String,
    pub shard: u16,
    /// Key strings; empty unless the order is delivered.
    pub keys: Vec<String>,
    /// True when this answer replays an earlier request (idempotency).
    pub replayed: bool,
    /// The group this order holds (or held) a seat in.
    pub group: Option<u64>,
    /// How it was priced, when not at its list price.
    pub pricing: Option<crate::domain::pricing::OrderPricing>,
}

impl OrderSnapshot {
    /// Its amount explained (`price_breakdown`).
    pub fn breakdown(&self) -> crate::domain::pricing::Breakdown<'_> {
        crate::domain::pricing::breakdown(self.order.quantity, self.order.amount_cents, self.pricing.as_ref())
    }
}

impl OrderSnapshot {
    /// The order's public id (`{product}.{shard}.{seq}`).
    pub fn order_id(&self) -> String {
        OrderId { shard: ShardId::new(self.product_id.clone(), self.shard), seq: self.order.seq }.to_string()
    }

    pub fn group_id(&self) -> Option<String> {
        let shard = ShardId::new(self.product_id.clone(), self.shard);
        self.group.map(|seq| GroupId { shard, seq }.to_string())
    }
}

#[derive(Message)]
#[rtype(result = "ActorResult<(u64, u64)>")]
pub struct ImportKeys(pub Vec<String>);

/// Takes keys out of stock; answers how many left and, for named keys, the fate
/// of each in the order asked.
#[derive(Message)]
#[rtype(result = "ActorResult<(u64, Vec<crate::domain::shard::KeyFate>)>")]
pub struct WithdrawKeys(pub std::sync::Arc<crate::domain::shard::Withdrawal>);

#[derive(Message)]
#[rtype(result = "ActorResult<OrderSnapshot>")]
pub struct CreateOrder(pub NewOrder);

/// Step 2 of a redemption: an order paid with points, delivered at once.
#[derive(Message)]
#[rtype(result = "ActorResult<OrderSnapshot>")]
pub struct Redeem(pub Redemption);

#[derive(Message)]
#[rtype(result = "ActorResult<PaymentOutcome>")]
pub struct PayOrder(pub Payment);

/// `token: None` is the merchant's view (no token check).
/// The order created under idempotency key `key` in this shard, if any (a coupon
/// hold's order, found by the resolver).
#[derive(Message)]
#[rtype(result = "ActorResult<Option<OrderSnapshot>>")]
pub struct FindIdempotent {
    pub key: String,
}

#[derive(Message)]
#[rtype(result = "ActorResult<OrderSnapshot>")]
pub struct GetOrder {
    pub seq: u64,
    pub token: Option<String>,
}

#[derive(Message)]
#[rtype(result = "ActorResult<OrderSnapshot>")]
pub struct CancelOrder {
    pub seq: u64,
    pub token: String,
}

#[derive(Message)]
#[rtype(result = "ActorResult<ShardAudit>")]
pub struct Audit;

/// The shard's orders not settled yet (what keeps a product from being deleted).
#[derive(Message)]
#[rtype(result = "ActorResult<crate::domain::shelf::OpenOrders>")]
pub struct CountOpenOrders;

/// What the payment supervisor should do for this shard: orders to ask the
/// channels about, and refunds owed. Expires due reservations first. Answered once
/// the state it describes is durable (a refund must never be made for a payment
/// whose outcome could still be lost).
#[derive(Message)]
#[rtype(result = "ActorResult<PaymentWork>")]
pub struct GetPaymentWork {
    pub quiet_ms: u64,
    pub grace_ms: u64,
    pub max_unheard: usize,
    pub max_refunds: usize,
    /// Also scan every order for ones stuck in `paid` (reconciliation on request).
    pub full: bool,
}

#[derive(Debug, Clone, Default)]
pub struct PaymentWork {
    pub unheard: Vec<crate::domain::shard::Unheard>,
    pub refunds: Vec<crate::domain::shard::RefundDue>,
    pub expired_now: usize,
    pub stuck_paid: Vec<u64>,
}

/// The channel confirmed the refund of this payment.
#[derive(Message)]
#[rtype(result = "ActorResult<()>")]
pub struct CompleteRefund {
    pub channel: String,
    pub payment_id: String,
}

/// Lend up to `max_keys` available keys to sibling shard `to` (see
/// [`crate::domain::shard::Transfers`]). Answered once the lending is durable;
/// `None` when this shard has nothing to lend.
#[derive(Message)]
#[rtype(result = "ActorResult<Option<OutgoingTransfer>>")]
pub struct Lend {
    pub to: u16,
    pub max_keys: usize,
}

/// Take in keys a sibling lent (a repeat is answered without a change).
#[derive(Message)]
#[rtype(result = "ActorResult<()>")]
pub struct Receive(pub OutgoingTransfer);

/// The borrower holds the keys of this transfer.
#[derive(Message)]
#[rtype(result = "ActorResult<()>")]
pub struct SettleTransfer(pub u64);

/// Outgoing transfers not yet settled (to resend), at most `limit`.
#[derive(Message)]
#[rtype(result = "ActorResult<Vec<OutgoingTransfer>>")]
pub struct ListUnsettled {
    pub limit: usize,
}

/// Opens a group with the buyer of `order` in its first seat.
#[derive(Message)]
#[rtype(result = "ActorResult<GroupSeat>")]
pub struct OpenGroup {
    pub terms: GroupTerms,
    pub order: NewOrder,
}

/// Takes a seat in group `group`.
#[derive(Message)]
#[rtype(result = "ActorResult<GroupSeat>")]
pub struct JoinGroup {
    pub group: u64,
    pub order: NewOrder,
}

/// Takes a seat in the oldest open group of the deal with one free, or opens one.
#[derive(Message)]
#[rtype(result = "ActorResult<GroupSeat>")]
pub struct JoinAnyGroup {
    pub terms: GroupTerms,
    pub order: NewOrder,
}

#[derive(Message)]
#[rtype(result = "ActorResult<GroupSnapshot>")]
pub struct GetGroup(pub u64);

/// The payment this shard recorded under `channel`/`payment_id`, if any.
#[derive(Message)]
#[rtype(result = "ActorResult<Option<crate::domain::PaymentRecord>>")]
pub struct GetPayment {
    pub channel: String,
    pub payment_id: String,
}

/// Open groups of a deal with a free seat, oldest first, at most `limit`.
#[derive(Message)]
#[rtype(result = "ActorResult<Vec<GroupSnapshot>>")]
pub struct ListOpenGroups {
    pub deal_id: String,
    pub limit: usize,
}

/// A group as the shard reports it, with its members' orders.
#[derive(Debug, Clone)]
pub struct GroupSnapshot {
    pub group: Group,
    pub product_id: String,
    pub shard: u16,
    /// Every order that took a seat (members who left included), in join order.
    pub members: Vec<Order>,
    /// `(seats taken, seats paid)` (`Shard::seats`).
    pub seats: (u32, u32),
    /// Seats that can still be taken (`Shard::seats_open`).
    pub seats_open: u32,
}

impl GroupSnapshot {
    pub fn group_id(&self) -> String {
        GroupId { shard: ShardId::new(self.product_id.clone(), self.shard), seq: self.group.seq }.to_string()
    }
}

/// A seat taken: the group and the member's order.
#[derive(Debug, Clone)]
pub struct GroupSeat {
    pub group: GroupSnapshot,
    pub order: OrderSnapshot,
}

/// Writes a snapshot now (graceful shutdown).
#[derive(Message)]
#[rtype(result = "ActorResult<()>")]
pub struct TakeSnapshot;

pub use crate::actors::Kill;

/// Test hook: panics inside the domain step, as a bug would.
#[derive(Message)]
#[rtype(result = "ActorResult<()>")]
pub struct InjectPanic;

/// The merchant's order listing: orders after sequence `after` that `filter` keeps,
/// at most `limit`, looking at no more than `max_scan` orders (one short turn).
#[derive(Message, Clone, serde::Serialize, serde::Deserialize)]
#[rtype(result = "ActorResult<ListedOrders>")]
pub struct ListOrders {
    pub after: u64,
    pub filter: crate::domain::shard::OrderFilter,
    pub limit: usize,
    pub max_scan: usize,
}

#[derive(serde::Serialize, serde::Deserialize)]
pub struct ListedOrders {
    pub orders: Vec<OrderSnapshot>,
    /// Orders looked at.
    pub scanned: u64,
    /// The last sequence looked at (where to go on from).
    pub last_scanned: u64,
    /// Whether every order of the shard after `after` was looked at.
    pub at_end: bool,
}

/// Buyer order lookup: `buyer`'s orders that the query password whose stored form
/// is `password` opens (in memory and archived), in the lookup's order
/// ([`LookupPosition`](crate::domain::lookup::LookupPosition)), after `after`, at
/// most `limit`.
#[derive(Message, Clone, serde::Serialize, serde::Deserialize)]
#[rtype(result = "ActorResult<Vec<OrderSnapshot>>")]
pub struct LookupOrders {
    pub buyer: String,
    pub password: crate::domain::lookup::PasswordHash,
    pub after: Option<crate::domain::lookup::LookupPosition>,
    pub limit: usize,
}

/// One order (the merchant's view) and the stored form of its query password, if
/// it has one.
#[derive(Message)]
#[rtype(result = "ActorResult<(OrderSnapshot, Option<crate::domain::lookup::PasswordHash>)>")]
pub struct OrderWithPassword {
    pub seq: u64,
}

/// The merchant's key listing: keys in `state` after key id `after`, at most `limit`.
#[derive(Message, Clone, serde::Serialize, serde::Deserialize)]
#[rtype(result = "ActorResult<ListedKeys>")]
pub struct ListKeys {
    pub state: crate::domain::shard::KeyState,
    pub after: Option<crate::domain::shard::KeyId>,
    pub limit: usize,
}

#[derive(serde::Serialize, serde::Deserialize)]
pub struct ListedKeys {
    pub keys: Vec<(crate::domain::shard::KeyId, String)>,
    /// Whether no key in that state follows.
    pub at_end: bool,
}
