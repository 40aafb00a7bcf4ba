//! Points shards: a [`LedgerActor`] around each one's [`PointsBook`], and its
//! messages. Buyers are spread over [`POINTS_SHARDS`] of them by a stable hash, so
//! no single actor sees every redemption.

use actix::prelude::*;

use super::journaled::{ActorResult, Machine, Reply};
use super::ledger::{LedgerActor, LedgerHandle};
use crate::domain::points::{Balance, Entry, Hold, PointsAudit, PointsBook, PointsEvent, RedemptionState};

/// Points shards (fixed: the buyer → shard map must not change between starts).
pub const POINTS_SHARDS: u16 = 8;

/// The points shard that owns `buyer`'s balance.
pub fn points_shard_of(buyer: &str) -> u16 {
    (crc32fast::hash(buyer.as_bytes()) % POINTS_SHARDS as u32) as u16
}

/// How to reach one points actor.
pub type PointsHandle = LedgerHandle<PointsBook>;

/// One points shard's actor.
pub type PointsActor = LedgerActor<PointsBook>;

impl Machine for PointsBook {
    type Event = PointsEvent;

    fn journaled(&self, event: &PointsEvent, _seq: u64, _touched: &mut dyn FnMut(u64)) {
        metrics::counter!("kami_points_events_total", "event" => event_name(event)).increment(1);
    }
}

fn event_name(event: &PointsEvent) -> &'static str {
    match event {
        PointsEvent::Adjusted { .. } => "adjusted",
        PointsEvent::Held { .. } => "held",
        PointsEvent::Settled { .. } => "settled",
        PointsEvent::Released { .. } => "released",
    }
}

// ---- messages ----

#[derive(Message, serde::Serialize, serde::Deserialize)]
#[rtype(result = "ActorResult<Balance>")]
pub struct Adjust {
    pub request_id: String,
    pub buyer: String,
    pub delta: i64,
    pub note: String,
}

#[derive(Message, serde::Serialize, serde::Deserialize)]
#[rtype(result = "ActorResult<RedemptionState>")]
pub struct HoldPoints(pub Hold);

#[derive(Message, serde::Serialize, serde::Deserialize)]
#[rtype(result = "ActorResult<Balance>")]
pub struct SettleRedemption {
    pub redemption: String,
    /// Whose balance the answer shows (the redemption's buyer).
    pub buyer: String,
    pub order_id: String,
}

#[derive(Message, serde::Serialize, serde::Deserialize)]
#[rtype(result = "ActorResult<()>")]
pub struct Release {
    pub redemption: String,
    pub reason: String,
}

#[derive(Message, serde::Serialize, serde::Deserialize)]
#[rtype(result = "ActorResult<(Balance, Vec<Entry>)>")]
pub struct Statement {
    pub buyer: String,
    pub limit: usize,
}

/// Holds made before `before_ms` and not yet settled or released (the resolver's work).
#[derive(Message, serde::Serialize, serde::Deserialize)]
#[rtype(result = "ActorResult<Vec<Hold>>")]
pub struct StaleHolds {
    pub before_ms: u64,
    pub limit: usize,
}

#[derive(Message, serde::Serialize, serde::Deserialize)]
#[rtype(result = "ActorResult<PointsAudit>")]
pub struct AuditPoints;

super::ledger::ledger_calls! {
    Adjust => "adjust": Balance,
    HoldPoints => "hold": RedemptionState,
    SettleRedemption => "settle": Balance,
    Release => "release": (),
    Statement => "statement": (Balance, Vec<Entry>),
    AuditPoints => "audit": PointsAudit,
}

impl Handler<Adjust> for PointsActor {
    type Result = Reply<Balance>;
    fn handle(&mut self, m: Adjust, ctx: &mut Context<Self>) -> Self::Result {
        let _turn = super::Turn::start(&self.turns);
        self.step(ctx, move |book, now| book.adjust(&m.request_id, &m.buyer, m.delta, &m.note, now))
    }
}

impl Handler<HoldPoints> for PointsActor {
    type Result = Reply<RedemptionState>;
    fn handle(&mut self, HoldPoints(h): HoldPoints, ctx: &mut Context<Self>) -> Self::Result {
        let _turn = super::Turn::start(&self.turns);
        self.step(ctx, move |book, now| book.hold(&h.redemption, &h.buyer, h.points, &h.product_id, h.quantity, now))
    }
}

/// Answers the buyer's balance after the settling (saving the redeemer a read).
impl Handler<SettleRedemption> for PointsActor {
    type Result = Reply<Balance>;
    fn handle(&mut self, m: SettleRedemption, ctx: &mut Context<Self>) -> Self::Result {
        let _turn = super::Turn::start(&self.turns);
        self.step(ctx, move |book, now| {
            let outcome = book.settle(&m.redemption, &m.order_id, now)?;
            Ok(outcome.map(|()| book.balance(&m.buyer)))
        })
    }
}

impl Handler<Release> for PointsActor {
    type Result = Reply<()>;
    fn handle(&mut self, m: Release, ctx: &mut Context<Self>) -> Self::Result {
        let _turn = super::Turn::start(&self.turns);
        self.step(ctx, move |book, now| book.release(&m.redemption, &m.reason, now))
    }
}

impl Handler<Statement> for PointsActor {
    type Result = Reply<(Balance, Vec<Entry>)>;
    fn handle(&mut self, m: Statement, _: &mut Context<Self>) -> Self::Result {
        let _turn = super::Turn::start(&self.turns);
        self.read(move |book| (book.balance(&m.buyer), book.statement(&m.buyer, m.limit)))
    }
}

impl Handler<StaleHolds> for PointsActor {
    type Result = Reply<Vec<Hold>>;
    fn handle(&mut self, m: StaleHolds, _: &mut Context<Self>) -> Self::Result {
        let _turn = super::Turn::start(&self.turns);
        self.read(move |book| {
            let mut holds = book.holds(usize::MAX);
            holds.retain(|h| h.at_ms < m.before_ms);
            holds.truncate(m.limit);
            holds
        })
    }
}

impl Handler<AuditPoints> for PointsActor {
    type Result = Reply<PointsAudit>;
    fn handle(&mut self, _: AuditPoints, _: &mut Context<Self>) -> Self::Result {
        let _turn = super::Turn::start(&self.turns);
        self.read(PointsBook::audit)
    }
}
