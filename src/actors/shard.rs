//! The stock actor: one per product shard, a thin shell around [`domain::Shard`].
//!
//! Every handler follows the same steps:
//! 1. run the pure domain step under `catch_unwind` (a panic stops the actor, and its
//!    supervisor rebuilds it from storage — never from the memory it had);
//! 2. append the resulting events to the shard's journal;
//! 3. take a group-commit ticket and return a future that replies only when the
//!    flush covering those events has returned.
//!
//! The actor does not wait for the flush itself: it goes on with its next message,
//! so one flush serves many requests of many actors. Replies that only read state
//! still wait for a flush when the state they show includes writes not yet durable
//! (invariant I4: every 2xx describes durable state).

use std::cell::Cell;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::prelude::*;
use futures::future;

use crate::clock::Clock;
use crate::domain::group::{Group, GroupId, GroupTerms};
use crate::domain::shard::{payment_key, Counts, NewOrder, Outcome, OutgoingTransfer, Payment, Redemption};
use crate::domain::OrderStatus;
use crate::domain::{DomainError, Event, Order, OrderId, PaymentOutcome, ProductInfo, Shard, ShardAudit, ShardId};
use crate::storage::{Journal, Recovered, Storage, StorageError, Ticket};

/// What every stock actor of the process shares (immutable).
pub struct ShardEnv {
    pub storage: Arc<Storage>,
    /// Which order each payment id pays, across every shard.
    pub claims: Arc<super::claims::PaymentClaims>,
    pub clock: Arc<dyn Clock>,
    pub ttl_ms: u64,
    pub expiry_tick: Duration,
    pub max_expired_per_tick: usize,
    pub snapshot_min_journal_bytes: u64,
    pub mailbox_capacity: usize,
    pub max_queue_wait_ms: u64,
    /// Settled orders unchanged for this long leave memory for the archive.
    pub archive_after_ms: u64,
    /// An archived order's Idempotency-Key still replays it until this long after
    /// its creation (the idempotency window).
    pub idempotency_ttl_ms: u64,
}

/// Most orders archived by one tick of a stock actor, and most looked at.
const MAX_ARCHIVED_PER_TICK: usize = 1024;
const MAX_ARCHIVE_SCANNED_PER_TICK: usize = 8192;

/// Why a shard could not answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShardError {
    #[error(transparent)]
    Domain(#[from] DomainError),
    #[error("storage: {0}")]
    Storage(#[from] StorageError),
    /// The actor crashed while handling the request or could not rebuild itself.
    #[error("the stock actor is restarting")]
    Unavailable,
}

pub type ShardResult<T> = Result<T, ShardError>;

/// Durable stock counters of a shard, readable without a message to the actor.
/// Published only once the writes they reflect are durable.
#[derive(Default)]
pub struct ShardGauge {
    inner: Mutex<(u64, Counts)>,
}

impl ShardGauge {
    fn publish(&self, seq: u64, counts: Counts) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if seq >= g.0 {
            *g = (seq, counts);
        }
    }

    pub fn get(&self) -> Counts {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).1
    }
}

/// An order as the shard reports it, key strings resolved.
#[derive(Debug, Clone)]
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

// ---- messages ----

#[derive(Message)]
#[rtype(result = "ShardResult<(u64, u64)>")]
pub struct ImportKeys(pub Vec<String>);

#[derive(Message)]
#[rtype(result = "ShardResult<OrderSnapshot>")]
pub struct CreateOrder(pub NewOrder);

/// Step 2 of a redemption: an order paid with points, delivered at once.
#[derive(Message)]
#[rtype(result = "ShardResult<OrderSnapshot>")]
pub struct Redeem(pub Redemption);

#[derive(Message)]
#[rtype(result = "ShardResult<PaymentOutcome>")]
pub struct PayOrder(pub Payment);

/// `token: None` is the merchant's view (no token check).
#[derive(Message)]
#[rtype(result = "ShardResult<OrderSnapshot>")]
pub struct GetOrder {
    pub seq: u64,
    pub token: Option<String>,
}

#[derive(Message)]
#[rtype(result = "ShardResult<OrderSnapshot>")]
pub struct CancelOrder {
    pub seq: u64,
    pub token: String,
}

#[derive(Message)]
#[rtype(result = "ShardResult<ShardAudit>")]
pub struct Audit;

/// The shard's orders not settled yet (what keeps a product from being deleted).
#[derive(Message)]
#[rtype(result = "ShardResult<crate::domain::shelf::OpenOrders>")]
pub struct CountOpenOrders;

/// What the payment supervisor should do for this shard: orders to ask the
/// channels about, and refunds owed. Expires due reservations first. Answered once
/// the state it describes is durable (a refund must never be made for a payment
/// whose outcome could still be lost).
#[derive(Message)]
#[rtype(result = "ShardResult<PaymentWork>")]
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
#[rtype(result = "ShardResult<()>")]
pub struct CompleteRefund {
    pub channel: String,
    pub payment_id: String,
}

/// Lend up to `max_keys` available keys to sibling shard `to` (see
/// [`crate::domain::shard::Transfers`]). Answered once the lending is durable;
/// `None` when this shard has nothing to lend.
#[derive(Message)]
#[rtype(result = "ShardResult<Option<OutgoingTransfer>>")]
pub struct Lend {
    pub to: u16,
    pub max_keys: usize,
}

/// Take in keys a sibling lent (a repeat is answered without a change).
#[derive(Message)]
#[rtype(result = "ShardResult<()>")]
pub struct Receive(pub OutgoingTransfer);

/// The borrower holds the keys of this transfer.
#[derive(Message)]
#[rtype(result = "ShardResult<()>")]
pub struct Settle(pub u64);

/// Outgoing transfers not yet settled (to resend), at most `limit`.
#[derive(Message)]
#[rtype(result = "ShardResult<Vec<OutgoingTransfer>>")]
pub struct ListUnsettled {
    pub limit: usize,
}

/// Opens a group with the buyer of `order` in its first seat.
#[derive(Message)]
#[rtype(result = "ShardResult<GroupSeat>")]
pub struct OpenGroup {
    pub terms: GroupTerms,
    pub order: NewOrder,
}

/// Takes a seat in group `group`.
#[derive(Message)]
#[rtype(result = "ShardResult<GroupSeat>")]
pub struct JoinGroup {
    pub group: u64,
    pub order: NewOrder,
}

/// Takes a seat in the oldest open group of the deal with one free, or opens one.
#[derive(Message)]
#[rtype(result = "ShardResult<GroupSeat>")]
pub struct JoinAnyGroup {
    pub terms: GroupTerms,
    pub order: NewOrder,
}

#[derive(Message)]
#[rtype(result = "ShardResult<GroupSnapshot>")]
pub struct GetGroup(pub u64);

/// Open groups of a deal with a free seat, oldest first, at most `limit`.
#[derive(Message)]
#[rtype(result = "ShardResult<Vec<GroupSnapshot>>")]
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
#[rtype(result = "ShardResult<()>")]
pub struct TakeSnapshot;

pub use super::Kill;

/// Test hook: panics inside the domain step, as a bug would.
#[derive(Message)]
#[rtype(result = "ShardResult<()>")]
pub struct InjectPanic;

// ---- the actor ----

pub struct ShardActor {
    id: ShardId,
    product: ProductInfo,
    env: Arc<ShardEnv>,
    gauge: Arc<ShardGauge>,
    /// The product's shelf state: off the shelf, the shard takes nothing new.
    shelf: Arc<super::registry::ShelfCell>,
    /// None when rebuilding from storage failed: every request is answered `Unavailable`.
    live: Option<Live>,
    /// `kami_actor_turn_seconds{actor="stock"}`.
    turns: metrics::Histogram,
}

struct Live {
    shard: Shard,
    journal: Journal,
    /// Sequence of the last journal record written (durable or not).
    seq: u64,
    /// Highest sequence known to be durable. Shared with reply futures.
    durable: Rc<Cell<u64>>,
    journal_bytes_since_snapshot: u64,
    /// Size of the last snapshot (set once it is encoded, off this thread).
    last_snapshot_bytes: Rc<Cell<u64>>,
    /// A snapshot is being stored (at most one at a time).
    snapshot_in_flight: Rc<Cell<bool>>,
    /// Orders whose last change may not be durable yet: order seq → journal seq of
    /// that change, with a queue in journal order to forget them once durable.
    /// Bounded by the writes in flight. Lets a read of one order skip the flush wait
    /// when only other orders have unflushed changes.
    undurable: std::collections::HashMap<u64, u64>,
    undurable_queue: std::collections::VecDeque<(u64, u64)>,
    /// Where the archiving scan goes on (`Shard::archivable_after`).
    archive_cursor: u64,
}

impl Live {
    /// Forgets changes now known durable. Called on every write and read, so the
    /// map holds only writes still waiting for a flush (bounded by the commit queue).
    fn forget_durable(&mut self) {
        let durable = self.durable.get();
        while let Some(&(jseq, order)) = self.undurable_queue.front() {
            if jseq > durable {
                break;
            }
            self.undurable_queue.pop_front();
            if self.undurable.get(&order) == Some(&jseq) {
                self.undurable.remove(&order);
            }
        }
    }

    /// The journal seq that must be durable before order `order_seq` may be shown.
    fn needed_for_order(&mut self, order_seq: u64) -> u64 {
        self.forget_durable();
        self.undurable.get(&order_seq).copied().unwrap_or(0)
    }
}

/// Counts a journaled event in `kami_order_events_total` (every order it moved: a
/// group's completion delivers all its members) and `kami_group_events_total`.
fn count_events(shard: &Shard, event: &Event, name: Option<&'static str>) {
    use crate::telemetry::{count_group_event, count_order_event, count_order_events};
    match event {
        Event::GroupOpened { .. } => count_group_event("opened"),
        Event::GroupJoined { .. } => count_group_event("joined"),
        Event::GroupFailed { group, at_ms } => {
            count_group_event("failed");
            let members = shard.group(*group).map(|g| g.orders.as_slice()).unwrap_or_default();
            for o in members.iter().filter_map(|&seq| shard.order(seq)).filter(|o| o.closed_at_ms == Some(*at_ms)) {
                match o.status {
                    OrderStatus::Cancelled => count_order_event("cancelled"),
                    OrderStatus::RefundPending => count_order_event("refund_owed"),
                    _ => {}
                }
            }
            return;
        }
        Event::PaymentApplied { record, .. } if record.outcome == PaymentOutcome::Delivered => {
            if let Some(g) = shard.group_of_order(record.order_seq).and_then(|g| shard.group(g)) {
                count_group_event("completed");
                count_order_events("delivered", g.size as u64);
                return;
            }
        }
        _ => {}
    }
    if let Some(name) = name {
        count_order_event(name);
    }
}

/// The orders an event changed: one, or every member of a group that completed or failed.
/// Calls `f` with each (no allocation on the path of ordinary orders).
fn orders_of(shard: &Shard, event: &Event, mut f: impl FnMut(u64)) {
    let group = match event {
        Event::GroupFailed { group, .. } => Some(*group),
        // Only the last seat's payment (it completes the group) moves the other members.
        Event::PaymentApplied { record, .. } if record.outcome == PaymentOutcome::Delivered => {
            shard.group_of_order(record.order_seq)
        }
        _ => None,
    };
    match group.and_then(|g| shard.group(g)) {
        Some(g) => g.orders.iter().for_each(|&o| f(o)),
        None => order_of(shard, event).into_iter().for_each(f),
    }
}

fn order_of(shard: &Shard, event: &Event) -> Option<u64> {
    match event {
        Event::GroupOpened { order, .. } | Event::GroupJoined { order, .. } => Some(order.seq),
        Event::GroupFailed { .. } => None,
        Event::RefundCompleted { channel, payment_id, .. } => shard.payment(channel, payment_id).map(|p| p.order_seq),
        Event::KeysImported { .. }
        | Event::KeysLent { .. }
        | Event::KeysReceived { .. }
        | Event::TransferSettled { .. }
        | Event::OrdersArchived { .. } => None,
        Event::OrderCreated { order } | Event::OrderRedeemed { order } => Some(order.seq),
        Event::PaymentApplied { record, .. } => Some(record.order_seq),
        Event::OrderExpired { seq, .. } | Event::OrderCancelled { seq, .. } => Some(*seq),
    }
}

impl ShardActor {
    pub fn new(
        env: Arc<ShardEnv>,
        product: ProductInfo,
        gauge: Arc<ShardGauge>,
        shelf: Arc<super::registry::ShelfCell>,
        recovered: Recovered,
    ) -> ShardActor {
        let id = ShardId::new(product.id.clone(), recovered.shard.shard_index());
        let mut actor = ShardActor {
            id,
            product,
            env,
            gauge,
            shelf,
            live: None,
            turns: metrics::histogram!("kami_actor_turn_seconds", "actor" => "stock"),
        };
        actor.install(recovered);
        actor
    }

    fn install(&mut self, r: Recovered) {
        self.gauge.publish(r.last_seq, r.shard.counts());
        self.live = Some(Live {
            shard: r.shard,
            journal: r.journal,
            seq: r.last_seq,
            // Recovered state may include writes sled holds but has not flushed yet.
            durable: Rc::new(Cell::new(0)),
            journal_bytes_since_snapshot: r.journal_bytes,
            last_snapshot_bytes: Rc::new(Cell::new(r.snapshot_bytes)),
            snapshot_in_flight: Rc::default(),
            // Everything recovered counts as not yet durable: `durable` starts at 0.
            undurable: std::collections::HashMap::new(),
            undurable_queue: std::collections::VecDeque::new(),
            archive_cursor: 0,
        });
    }

    fn live(&mut self) -> ShardResult<&mut Live> {
        self.live.as_mut().ok_or(ShardError::Unavailable)
    }

    /// Runs a domain step; a panic stops the actor so its supervisor rebuilds it.
    fn guarded<T>(&mut self, ctx: &mut Context<Self>, step: impl FnOnce(&mut Shard) -> T) -> ShardResult<T> {
        let retired = !self.shelf.get().sells();
        let live = self.live()?;
        live.shard.set_retired(retired);
        match crate::domain::catch_broken_step(|| step(&mut live.shard)) {
            Ok(value) => Ok(value),
            Err(what) => {
                tracing::error!(shard = %self.id, panic = %what, "stock actor panicked; restarting it from storage");
                metrics::counter!("kami_actor_panics_total").increment(1);
                self.live = None;
                ctx.stop();
                Err(ShardError::Unavailable)
            }
        }
    }

    /// Journals `events` (already applied) and returns a ticket for their flush.
    fn persist(&mut self, ctx: &mut Context<Self>, events: &[Event]) -> ShardResult<Ticket> {
        // One debug line per order event, with the order id: one order's life can be
        // followed in the logs across requests and actors.
        let log_orders = tracing::enabled!(tracing::Level::DEBUG);
        let mut logged = Vec::new();
        let live = self.live()?;
        live.forget_durable();
        // All of the step's records in one write.
        match live.journal.append_all(live.seq + 1, events) {
            Ok(bytes) => live.journal_bytes_since_snapshot += bytes as u64,
            Err(e) => {
                // Memory is now ahead of the journal: rebuild from storage.
                tracing::error!(shard = %self.id, error = %e, "journal append failed; restarting from storage");
                self.live = None;
                ctx.stop();
                return Err(e.into());
            }
        }
        for event in events {
            let seq = live.seq + 1;
            live.seq = seq;
            let name = event.order_event_name();
            count_events(&live.shard, event, name);
            orders_of(&live.shard, event, |order| {
                live.undurable.insert(order, seq);
                live.undurable_queue.push_back((seq, order));
                if log_orders {
                    logged.push((order, name.unwrap_or("other"), seq));
                }
            });
        }
        for (order, event, journal_seq) in logged {
            let order_id = OrderId { shard: self.id.clone(), seq: order };
            tracing::debug!(order_id = %order_id, event, journal_seq, "order event journaled");
        }
        let ticket = self.env.storage.ticket()?;
        self.maybe_snapshot();
        Ok(ticket)
    }

    /// Replies with `value` once the flush behind `ticket` (taken after this step's
    /// writes) has returned.
    fn reply<T: 'static>(&mut self, ticket: Option<Ticket>, value: T) -> ResponseFuture<ShardResult<T>> {
        let needed = self.live.as_ref().map_or(0, |l| l.seq);
        self.reply_when_durable(ticket, needed, value)
    }

    /// Replies with `value` (which shows the journal through `needed`) once that
    /// prefix is durable: at once if it is known durable, else after `ticket`'s or
    /// the next flush. Every 2xx thus describes durable state (I4).
    fn reply_when_durable<T: 'static>(
        &mut self,
        ticket: Option<Ticket>,
        needed: u64,
        value: T,
    ) -> ResponseFuture<ShardResult<T>> {
        let Some(live) = self.live.as_ref() else {
            return Box::pin(future::ready(Err(ShardError::Unavailable)));
        };
        let (seq, durable, counts) = (live.seq, live.durable.clone(), live.shard.counts());
        let ticket = match ticket {
            Some(t) => t,
            None if durable.get() >= needed => return Box::pin(future::ready(Ok(value))),
            None => match self.env.storage.ticket() {
                Ok(t) => t,
                Err(e) => return Box::pin(future::ready(Err(e.into()))),
            },
        };
        let gauge = self.gauge.clone();
        Box::pin(async move {
            ticket.wait().await?;
            if durable.get() < seq {
                durable.set(seq);
            }
            gauge.publish(seq, counts);
            Ok(value)
        })
    }

    /// Runs a domain step that makes (or repeats) one order, journals it, and replies
    /// with the order once durable (a repeat: once its own changes are).
    fn order_step(
        &mut self,
        ctx: &mut Context<Self>,
        step: impl FnOnce(&mut Shard) -> Result<Outcome<u64>, DomainError>,
    ) -> ResponseFuture<ShardResult<OrderSnapshot>> {
        let (ticket, seq, replayed) = match self.guarded(ctx, step) {
            Err(e) => return fail(e),
            Ok(Err(refusal)) => return fail(refusal),
            Ok(Ok(Outcome::Repeat(seq))) => (None, seq, true),
            Ok(Ok(Outcome::Changed(event, seq))) => match self.persist(ctx, &[event]) {
                Ok(t) => (Some(t), seq, false),
                Err(e) => return fail(e),
            },
        };
        match self.order_snapshot(seq, replayed) {
            Ok(view) => self.reply_order(ticket, view),
            Err(e) => fail(e),
        }
    }

    /// Replies with an order view once that order's own changes are durable.
    fn reply_order(
        &mut self,
        ticket: Option<Ticket>,
        view: OrderSnapshot,
    ) -> ResponseFuture<ShardResult<OrderSnapshot>> {
        let needed = match self.live.as_mut() {
            Some(live) if ticket.is_none() => live.needed_for_order(view.order.seq),
            Some(live) => live.seq,
            None => 0,
        };
        self.reply_when_durable(ticket, needed, view)
    }

    /// A group step: journal its event (if any) and answer with the seat once durable.
    fn group_step(
        &mut self,
        ctx: &mut Context<Self>,
        step: impl FnOnce(&mut Shard) -> Result<Outcome<(u64, u64)>, DomainError>,
    ) -> ResponseFuture<ShardResult<GroupSeat>> {
        let (ticket, (group, seq), replayed) = match self.guarded(ctx, step) {
            Err(e) => return fail(e),
            Ok(Err(refusal)) => return fail(refusal),
            Ok(Ok(Outcome::Repeat(ids))) => (None, ids, true),
            Ok(Ok(Outcome::Changed(event, ids))) => match self.persist(ctx, &[event]) {
                Ok(t) => (Some(t), ids, false),
                Err(e) => return fail(e),
            },
        };
        let seat = self
            .order_snapshot(seq, replayed)
            .and_then(|order| Ok(GroupSeat { group: self.group_snapshot(group)?, order }));
        match seat {
            // The group shows other members' orders: wait for everything written so far.
            Ok(seat) => self.reply(ticket, seat),
            Err(e) => fail(e),
        }
    }

    fn group_snapshot(&self, seq: u64) -> ShardResult<GroupSnapshot> {
        let live = self.live.as_ref().ok_or(ShardError::Unavailable)?;
        let group = live.shard.group(seq).ok_or(DomainError::GroupNotFound)?;
        let members = group.orders.iter().filter_map(|&o| live.shard.order(o)).cloned().collect();
        let seats = live.shard.seats(group);
        Ok(GroupSnapshot {
            group: group.clone(),
            product_id: self.product.id.clone(),
            shard: self.id.shard,
            members,
            seats,
            seats_open: live.shard.seats_open(group),
        })
    }

    fn order_snapshot(&self, seq: u64, replayed: bool) -> ShardResult<OrderSnapshot> {
        let live = self.live.as_ref().ok_or(ShardError::Unavailable)?;
        let Some(order) = live.shard.order(seq) else {
            if !live.shard.is_archived(seq) {
                return Err(DomainError::OrderNotFound.into());
            }
            let archived = self.env.storage.archived_order(&self.id, seq)?.ok_or_else(|| StorageError::Corrupt {
                place: format!("archive/{}", self.id),
                error: format!("order {seq} is missing"),
            })?;
            let keys =
                if archived.order.status == crate::domain::OrderStatus::Delivered { archived.keys } else { Vec::new() };
            return Ok(OrderSnapshot {
                order: archived.order,
                product_id: self.product.id.clone(),
                shard: self.id.shard,
                keys,
                replayed,
                group: None,
            });
        };
        let keys = if order.status == crate::domain::OrderStatus::Delivered {
            order.keys.iter().map(|&k| live.shard.key(k).to_string()).collect()
        } else {
            Vec::new()
        };
        Ok(OrderSnapshot {
            order: order.clone(),
            product_id: self.product.id.clone(),
            shard: self.id.shard,
            keys,
            replayed,
            group: live.shard.group_of_order(seq),
        })
    }

    /// Snapshots when the journal since the last snapshot outgrew the snapshot itself
    /// (and the configured minimum), so recovery reads at most about twice the state.
    /// One snapshot at a time: the next waits until the last one is stored.
    fn maybe_snapshot(&mut self) {
        let Some(live) = self.live.as_ref() else { return };
        let threshold = self.env.snapshot_min_journal_bytes.max(live.last_snapshot_bytes.get());
        if live.journal_bytes_since_snapshot >= threshold && !live.snapshot_in_flight.get() {
            if let Err(e) = self.snapshot_now() {
                tracing::warn!(shard = %self.id, error = %e, "snapshot failed; the journal keeps growing until the next try");
            }
        }
    }

    /// Takes a snapshot at the current sequence without touching the shard: on the
    /// actor's thread, only the journal is rolled (what is appended is written, and
    /// records after `seq` go to a new segment, so that the trim deletes whole
    /// files). On a blocking thread, a copy of the shard as of `seq` is rebuilt from
    /// the stored snapshot and the journal, encoded, stored and dropped (memory is
    /// doubled only while a snapshot is made; rebuilding costs about what encoding
    /// does, once per journal's worth of records). The answer completes once the
    /// snapshot is durable; after that, older snapshots and the journal it covers
    /// are removed.
    fn snapshot_now(&mut self) -> ShardResult<ResponseFuture<ShardResult<()>>> {
        let id = self.id.clone();
        let product = self.product.clone();
        let storage = self.env.storage.clone();
        let live = self.live.as_mut().ok_or(ShardError::Unavailable)?;
        let seq = live.seq;
        let started = std::time::Instant::now();
        live.journal.roll()?;
        live.journal_bytes_since_snapshot = 0;
        let (in_flight, last_bytes) = (live.snapshot_in_flight.clone(), live.last_snapshot_bytes.clone());
        in_flight.set(true);
        let size_hint = last_bytes.get() as usize;
        let journal = live.journal.clone();
        let (done_tx, done_rx) = futures::channel::oneshot::channel();
        actix_rt::spawn(async move {
            let put_storage = storage.clone();
            let put_id = id.clone();
            let put = tokio::task::spawn_blocking(move || {
                let copy = put_storage.advance_shadow(&put_id, &product, None, seq)?;
                let bytes = Storage::encode_snapshot(copy.shard(), size_hint);
                drop(copy);
                let size = bytes.len();
                put_storage.put_snapshot(&put_id, seq, bytes)?;
                crate::chaos::reached(crate::chaos::CrashPoint::AfterSnapshot, || {
                    let _ = put_storage.flush_now();
                });
                Ok(size)
            });
            let stored = match put.await {
                Ok(stored) => stored,
                Err(e) => Err(StorageError::Sled(format!("snapshot task failed: {e}"))),
            };
            let size = stored.as_ref().map_or(0, |size| *size);
            if size > 0 {
                last_bytes.set(size as u64);
            }
            let durable = match stored.and_then(|_| storage.ticket()) {
                Ok(ticket) => ticket.wait().await,
                Err(e) => Err(e),
            };
            in_flight.set(false);
            metrics::histogram!("kami_snapshot_seconds").record(started.elapsed().as_secs_f64());
            tracing::debug!(shard = %id, seq, bytes = size, "snapshot written");
            let trim = durable.is_ok();
            let _ = done_tx.send(durable.map_err(ShardError::from));
            if trim {
                // Removing a journal's worth of records takes long enough to stall
                // every order of this arbiter: off the actor's thread. Appends
                // meanwhile only add records above `seq`.
                let trimmed =
                    tokio::task::spawn_blocking(move || storage.trim(&id, &journal, seq).map_err(|e| (id, e)));
                if let Ok(Err((id, e))) = trimmed.await {
                    tracing::warn!(shard = %id, error = %e, "trimming the journal failed");
                }
            }
        });
        Ok(Box::pin(async move { done_rx.await.unwrap_or(Err(ShardError::Unavailable)) }))
    }

    /// Moves settled orders that have not changed for `archive_after_ms` out of
    /// memory: written to the archive first, then journaled as archived (one flush
    /// covers both). A crash in between leaves them in memory, archived again later.
    fn archive(&mut self, ctx: &mut Context<Self>) {
        let now = self.env.clock.now_ms();
        let Some(live) = self.live.as_mut() else { return };
        let (seqs, next) = live.shard.archivable_after(
            live.archive_cursor,
            now,
            self.env.archive_after_ms,
            MAX_ARCHIVE_SCANNED_PER_TICK,
            MAX_ARCHIVED_PER_TICK,
        );
        live.archive_cursor = next;
        if seqs.is_empty() {
            return;
        }
        let records: Vec<_> = seqs.iter().filter_map(|&seq| live.shard.archive_record(seq)).collect();
        if let Err(e) = self.env.storage.archive_orders(&self.id, &records) {
            tracing::warn!(shard = %self.id, error = %e, "archiving orders failed; they stay in memory");
            return;
        }
        let keep = self.env.idempotency_ttl_ms;
        let Ok(Some(event)) = self.guarded(ctx, |s| s.archive(seqs, now, keep)) else {
            return;
        };
        if let Err(e) = self.persist(ctx, &[event]) {
            tracing::warn!(shard = %self.id, error = %e, "journaling archived orders failed");
        }
    }

    /// Expires due reservations (at most `max_expired_per_tick`); returns how many.
    fn expire(&mut self, ctx: &mut Context<Self>) -> usize {
        let now = self.env.clock.now_ms();
        let due = self.live.as_ref().and_then(|l| l.shard.next_expiry()).is_some_and(|at| at <= now);
        if !due {
            return 0;
        }
        let max = self.env.max_expired_per_tick;
        let Ok(events) = self.guarded(ctx, |s| s.expire_due(now, max)) else { return 0 };
        if events.is_empty() {
            return 0;
        }
        match self.persist(ctx, &events) {
            Ok(ticket) => {
                let done = self.reply(Some(ticket), ());
                actix_rt::spawn(async move {
                    let _ = done.await;
                });
            }
            Err(e) => tracing::warn!(shard = %self.id, error = %e, "expiry not yet flushed"),
        }
        events.len()
    }
}

fn fail<T: 'static>(e: impl Into<ShardError>) -> ResponseFuture<ShardResult<T>> {
    Box::pin(future::ready(Err(e.into())))
}

impl Actor for ShardActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        // Admission permits (held by callers) keep the queue under `mailbox_capacity`;
        // the margin covers messages sent without a permit (audit, snapshot, kill).
        ctx.set_mailbox_capacity(self.env.mailbox_capacity + 64);
        ctx.run_interval(self.env.expiry_tick, |act, ctx| {
            let _turn = super::Turn::start(&act.turns);
            act.expire(ctx);
            act.archive(ctx);
        });
    }
}

impl Supervised for ShardActor {
    /// actix hands back the same struct on restart; never trust its memory.
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        metrics::counter!("kami_actor_restarts_total").increment(1);
        self.live = None;
        match self.env.storage.recover(&self.id, &self.product) {
            Ok(r) => {
                tracing::info!(shard = %self.id, replayed = r.replayed, elapsed_ms = r.elapsed.as_millis() as u64, "stock actor rebuilt from storage");
                self.install(r);
            }
            Err(e) => {
                tracing::error!(shard = %self.id, error = %e, "stock actor could not rebuild; answering unavailable")
            }
        }
    }
}

impl Handler<ImportKeys> for ShardActor {
    type Result = ResponseFuture<ShardResult<(u64, u64)>>;

    fn handle(&mut self, msg: ImportKeys, ctx: &mut Context<Self>) -> Self::Result {
        let _turn = super::Turn::start(&self.turns);
        let (events, imported, duplicates) = match self.guarded(ctx, |s| s.import_keys(msg.0)) {
            Ok(r) => r,
            Err(e) => return fail(e),
        };
        let ticket = if events.is_empty() {
            None
        } else {
            match self.persist(ctx, &events) {
                Ok(t) => Some(t),
                Err(e) => return fail(e),
            }
        };
        self.reply(ticket, (imported, duplicates))
    }
}

impl Handler<CreateOrder> for ShardActor {
    type Result = ResponseFuture<ShardResult<OrderSnapshot>>;

    fn handle(&mut self, msg: CreateOrder, ctx: &mut Context<Self>) -> Self::Result {
        let _turn = super::Turn::start(&self.turns);
        let now = self.env.clock.now_ms();
        self.order_step(ctx, |s| s.create_order(msg.0, now))
    }
}

impl Handler<Redeem> for ShardActor {
    type Result = ResponseFuture<ShardResult<OrderSnapshot>>;

    fn handle(&mut self, msg: Redeem, ctx: &mut Context<Self>) -> Self::Result {
        let _turn = super::Turn::start(&self.turns);
        let now = self.env.clock.now_ms();
        self.order_step(ctx, |s| s.redeem(msg.0, now))
    }
}

impl Handler<PayOrder> for ShardActor {
    type Result = ResponseFuture<ShardResult<PaymentOutcome>>;

    fn handle(&mut self, msg: PayOrder, ctx: &mut Context<Self>) -> Self::Result {
        let _turn = super::Turn::start(&self.turns);
        // What fell due is settled first: a group past its deadline fails before a
        // payment could complete it, whenever the next expiry tick would have come.
        self.expire(ctx);
        let now = self.env.clock.now_ms();
        let order_seq = msg.0.order_seq;
        if let Err(e) = self.claim_payment(&msg.0) {
            return fail(e);
        }
        match self.guarded(ctx, |s| s.pay(msg.0, now)) {
            Err(e) => fail(e),
            Ok(Err(refusal)) => fail(refusal),
            Ok(Ok(Outcome::Repeat(outcome))) => {
                let needed = self.live.as_mut().map_or(0, |l| l.needed_for_order(order_seq));
                self.reply_when_durable(None, needed, outcome)
            }
            Ok(Ok(Outcome::Changed(event, outcome))) => match self.persist(ctx, &[event]) {
                Ok(t) => self.reply(Some(t), outcome),
                Err(e) => fail(e),
            },
        }
    }
}

impl ShardActor {
    /// A payment id pays one order in the whole process, not only in this shard:
    /// claimed in the process-wide index before the shard records it (see
    /// [`super::claims`]).
    fn claim_payment(&self, p: &Payment) -> Result<(), ShardError> {
        let known = self
            .live
            .as_ref()
            .is_some_and(|l| l.shard.order(p.order_seq).is_some() || l.shard.is_archived(p.order_seq));
        if !known {
            return Ok(()); // the domain step answers `order_not_found`
        }
        let order = OrderId { shard: self.id.clone(), seq: p.order_seq }.to_string();
        match self.env.claims.claim(&payment_key(&p.channel, &p.payment_id), &order) {
            Ok(()) => Ok(()),
            Err(super::claims::Conflict) => {
                tracing::warn!(order = %order, channel = %p.channel, "a payment id already paid another order");
                Err(DomainError::PaymentIdConflict.into())
            }
        }
    }
}

fn token_matches(given: &str, expected: &str) -> bool {
    use subtle::ConstantTimeEq;
    given.len() == expected.len() && bool::from(given.as_bytes().ct_eq(expected.as_bytes()))
}

impl Handler<GetOrder> for ShardActor {
    type Result = ResponseFuture<ShardResult<OrderSnapshot>>;

    fn handle(&mut self, msg: GetOrder, _ctx: &mut Context<Self>) -> Self::Result {
        let _turn = super::Turn::start(&self.turns);
        let view = match self.order_snapshot(msg.seq, false) {
            Ok(v) => v,
            Err(e) => return fail(e),
        };
        if let Some(token) = msg.token {
            if !token_matches(&token, &view.order.query_token) {
                return fail(DomainError::OrderNotFound);
            }
        }
        self.reply_order(None, view)
    }
}

impl Handler<CancelOrder> for ShardActor {
    type Result = ResponseFuture<ShardResult<OrderSnapshot>>;

    fn handle(&mut self, msg: CancelOrder, ctx: &mut Context<Self>) -> Self::Result {
        let _turn = super::Turn::start(&self.turns);
        let authorised = match self.order_snapshot(msg.seq, false) {
            Ok(view) => token_matches(&msg.token, &view.order.query_token).then_some(view.order.status),
            Err(e) => return fail(e),
        };
        let Some(status) = authorised else {
            return fail(DomainError::OrderNotFound);
        };
        if self.live.as_ref().is_some_and(|l| l.shard.is_archived(msg.seq)) {
            return fail(DomainError::InvalidState { status });
        }
        let now = self.env.clock.now_ms();
        let event = match self.guarded(ctx, |s| s.cancel(msg.seq, now)) {
            Err(e) => return fail(e),
            Ok(Err(refusal)) => return fail(refusal),
            Ok(Ok(event)) => event,
        };
        let ticket = match self.persist(ctx, &[event]) {
            Ok(t) => t,
            Err(e) => return fail(e),
        };
        match self.order_snapshot(msg.seq, false) {
            Ok(view) => self.reply_order(Some(ticket), view),
            Err(e) => fail(e),
        }
    }
}

impl Handler<CountOpenOrders> for ShardActor {
    type Result = ResponseFuture<ShardResult<crate::domain::shelf::OpenOrders>>;

    fn handle(&mut self, _: CountOpenOrders, ctx: &mut Context<Self>) -> Self::Result {
        let _turn = super::Turn::start(&self.turns);
        match self.guarded(ctx, |s| s.open_orders()) {
            Ok(open) => self.reply(None, open),
            Err(e) => fail(e),
        }
    }
}

impl Handler<Audit> for ShardActor {
    type Result = ResponseFuture<ShardResult<ShardAudit>>;

    fn handle(&mut self, _: Audit, ctx: &mut Context<Self>) -> Self::Result {
        let _turn = super::Turn::start(&self.turns);
        match self.guarded(ctx, |s| s.audit()) {
            Ok(audit) => self.reply(None, audit),
            Err(e) => fail(e),
        }
    }
}

impl Handler<GetPaymentWork> for ShardActor {
    type Result = ResponseFuture<ShardResult<PaymentWork>>;

    fn handle(&mut self, m: GetPaymentWork, ctx: &mut Context<Self>) -> Self::Result {
        let _turn = super::Turn::start(&self.turns);
        let expired_now = self.expire(ctx);
        let now = self.env.clock.now_ms();
        let work = self.guarded(ctx, |s| PaymentWork {
            unheard: s.unheard(now, m.quiet_ms, m.grace_ms, m.max_unheard),
            refunds: s.refunds_due(m.max_refunds),
            expired_now,
            stuck_paid: if m.full { s.stuck_paid(m.max_unheard) } else { Vec::new() },
        });
        match work {
            Ok(work) => self.reply(None, work),
            Err(e) => fail(e),
        }
    }
}

impl Handler<CompleteRefund> for ShardActor {
    type Result = ResponseFuture<ShardResult<()>>;

    fn handle(&mut self, m: CompleteRefund, ctx: &mut Context<Self>) -> Self::Result {
        let _turn = super::Turn::start(&self.turns);
        let now = self.env.clock.now_ms();
        let outcome = match self.guarded(ctx, |s| s.complete_refund(&m.channel, &m.payment_id, now)) {
            Ok(r) => r.map_err(ShardError::from),
            Err(e) => Err(e),
        };
        self.journal_outcome(ctx, outcome)
    }
}

impl ShardActor {
    /// Journals the event of a changed outcome and replies once it is durable.
    fn journal_outcome<T: 'static>(
        &mut self,
        ctx: &mut Context<Self>,
        outcome: ShardResult<Outcome<T>>,
    ) -> ResponseFuture<ShardResult<T>> {
        match outcome {
            Err(e) => fail(e),
            Ok(Outcome::Repeat(value)) => self.reply(None, value),
            Ok(Outcome::Changed(event, value)) => match self.persist(ctx, &[event]) {
                Ok(t) => self.reply(Some(t), value),
                Err(e) => fail(e),
            },
        }
    }
}

impl Handler<Lend> for ShardActor {
    type Result = ResponseFuture<ShardResult<Option<OutgoingTransfer>>>;

    fn handle(&mut self, m: Lend, ctx: &mut Context<Self>) -> Self::Result {
        let _turn = super::Turn::start(&self.turns);
        let outcome = self.guarded(ctx, |s| match s.lend(m.to, m.max_keys) {
            Some((event, transfer)) => Outcome::Changed(event, Some(transfer)),
            None => Outcome::Repeat(None),
        });
        self.journal_outcome(ctx, outcome)
    }
}

impl Handler<Receive> for ShardActor {
    type Result = ResponseFuture<ShardResult<()>>;

    fn handle(&mut self, m: Receive, ctx: &mut Context<Self>) -> Self::Result {
        let _turn = super::Turn::start(&self.turns);
        let outcome = self.guarded(ctx, |s| s.receive(m.0));
        self.journal_outcome(ctx, outcome)
    }
}

impl Handler<Settle> for ShardActor {
    type Result = ResponseFuture<ShardResult<()>>;

    fn handle(&mut self, m: Settle, ctx: &mut Context<Self>) -> Self::Result {
        let _turn = super::Turn::start(&self.turns);
        let outcome = self.guarded(ctx, |s| s.settle(m.0));
        self.journal_outcome(ctx, outcome)
    }
}

impl Handler<ListUnsettled> for ShardActor {
    type Result = ResponseFuture<ShardResult<Vec<OutgoingTransfer>>>;

    fn handle(&mut self, m: ListUnsettled, ctx: &mut Context<Self>) -> Self::Result {
        let _turn = super::Turn::start(&self.turns);
        match self.guarded(ctx, |s| s.unsettled(m.limit)) {
            Ok(list) => self.reply(None, list),
            Err(e) => fail(e),
        }
    }
}

impl Handler<OpenGroup> for ShardActor {
    type Result = ResponseFuture<ShardResult<GroupSeat>>;

    fn handle(&mut self, m: OpenGroup, ctx: &mut Context<Self>) -> Self::Result {
        let _turn = super::Turn::start(&self.turns);
        let now = self.env.clock.now_ms();
        self.group_step(ctx, |s| s.open_group(&m.terms, m.order, now))
    }
}

impl Handler<JoinGroup> for ShardActor {
    type Result = ResponseFuture<ShardResult<GroupSeat>>;

    fn handle(&mut self, m: JoinGroup, ctx: &mut Context<Self>) -> Self::Result {
        let _turn = super::Turn::start(&self.turns);
        let now = self.env.clock.now_ms();
        self.group_step(ctx, |s| s.join_group(m.group, m.order, now))
    }
}

impl Handler<JoinAnyGroup> for ShardActor {
    type Result = ResponseFuture<ShardResult<GroupSeat>>;

    fn handle(&mut self, m: JoinAnyGroup, ctx: &mut Context<Self>) -> Self::Result {
        let _turn = super::Turn::start(&self.turns);
        let now = self.env.clock.now_ms();
        self.group_step(ctx, |s| s.join_any(&m.terms, m.order, now))
    }
}

impl Handler<GetGroup> for ShardActor {
    type Result = ResponseFuture<ShardResult<GroupSnapshot>>;

    fn handle(&mut self, m: GetGroup, _ctx: &mut Context<Self>) -> Self::Result {
        let _turn = super::Turn::start(&self.turns);
        match self.group_snapshot(m.0) {
            Ok(view) => self.reply(None, view),
            Err(e) => fail(e),
        }
    }
}

impl Handler<ListOpenGroups> for ShardActor {
    type Result = ResponseFuture<ShardResult<Vec<GroupSnapshot>>>;

    fn handle(&mut self, m: ListOpenGroups, _ctx: &mut Context<Self>) -> Self::Result {
        let _turn = super::Turn::start(&self.turns);
        let now = self.env.clock.now_ms();
        let open = match self.live() {
            Ok(live) => live.shard.open_groups_of(&m.deal_id, now, m.limit),
            Err(e) => return fail(e),
        };
        match open.into_iter().map(|g| self.group_snapshot(g)).collect::<ShardResult<Vec<_>>>() {
            Ok(list) => self.reply(None, list),
            Err(e) => fail(e),
        }
    }
}

impl Handler<TakeSnapshot> for ShardActor {
    type Result = ResponseFuture<ShardResult<()>>;

    fn handle(&mut self, _: TakeSnapshot, _ctx: &mut Context<Self>) -> Self::Result {
        let _turn = super::Turn::start(&self.turns);
        match self.snapshot_now() {
            Ok(durable) => durable,
            Err(e) => fail(e),
        }
    }
}

impl Handler<Kill> for ShardActor {
    type Result = ();

    fn handle(&mut self, _: Kill, ctx: &mut Context<Self>) {
        let _turn = super::Turn::start(&self.turns);
        tracing::warn!(shard = %self.id, "stock actor killed on request");
        self.live = None;
        ctx.stop();
    }
}

impl Handler<InjectPanic> for ShardActor {
    type Result = ResponseFuture<ShardResult<()>>;

    fn handle(&mut self, _: InjectPanic, ctx: &mut Context<Self>) -> Self::Result {
        let _turn = super::Turn::start(&self.turns);
        match self.guarded(ctx, |_| panic!("injected panic")) {
            Ok(()) => self.reply(None, ()),
            Err(e) => fail(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn undurable_orders_are_forgotten_once_durable_even_without_reads() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(&crate::storage::StorageOptions {
            path: dir.path().to_path_buf(),
            cache_capacity_bytes: 1 << 20,
            max_pending_commits: 16,
            max_commit_batch: 16,
            commit_linger: Duration::ZERO,
        })
        .unwrap();
        let product = ProductInfo {
            id: "p".into(),
            name: "P".into(),
            price_cents: 1,
            per_buyer_limit: 0,
            shards: 1,
            created_at_ms: 0,
        };
        let mut live = Live {
            shard: Shard::new(product, 0),
            journal: storage.journal(&ShardId::new("p", 0)).unwrap(),
            seq: 0,
            durable: Rc::new(Cell::new(0)),
            journal_bytes_since_snapshot: 0,
            last_snapshot_bytes: Rc::default(),
            snapshot_in_flight: Rc::default(),
            undurable: Default::default(),
            undurable_queue: Default::default(),
            archive_cursor: 0,
        };
        for seq in 1..=1000u64 {
            live.undurable.insert(seq, seq);
            live.undurable_queue.push_back((seq, seq));
        }
        live.durable.set(990);
        live.forget_durable();
        assert_eq!((live.undurable.len(), live.undurable_queue.len()), (10, 10));
        assert_eq!(live.needed_for_order(995), 995);
        assert_eq!(live.needed_for_order(5), 0, "a durable order needs no wait");
    }
}
