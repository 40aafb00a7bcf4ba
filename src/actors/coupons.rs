//! Coupon shards: a [`LedgerActor`] around each one's [`CouponBook`], and its
//! messages. Codes are spread over [`COUPON_SHARDS`] of them by a stable hash: one
//! actor counts every use of a code, whichever stock shards its orders are in.

use actix::prelude::*;

use super::journaled::{ActorResult, Machine, Reply};
use super::ledger::{LedgerActor, LedgerHandle};
use crate::domain::coupon::{Coupon, CouponAudit, CouponBook, CouponEvent, CouponHold, CouponSpec, Finish};

/// Coupon shards (fixed: the code → shard map must not change between starts).
pub const COUPON_SHARDS: u16 = 8;

/// The coupon shard that owns `code`.
pub fn coupon_shard_of(code: &str) -> u16 {
    (crc32fast::hash(code.as_bytes()) % COUPON_SHARDS as u32) as u16
}

pub type CouponHandle = LedgerHandle<CouponBook>;
pub type CouponActor = LedgerActor<CouponBook>;

impl Machine for CouponBook {
    type Event = CouponEvent;

    fn journaled(&self, event: &CouponEvent, _seq: u64, _touched: &mut dyn FnMut(u64)) {
        let name = match event {
            CouponEvent::Created { .. } => "created",
            CouponEvent::Disabled { .. } => "disabled",
            CouponEvent::Held(_) => "held",
            CouponEvent::Used { .. } => "used",
            CouponEvent::Released { .. } => "released",
        };
        metrics::counter!("kami_coupon_events_total", "event" => name).increment(1);
    }
}

/// Answers the coupon and whether this message created it.
#[derive(Message, serde::Serialize, serde::Deserialize)]
#[rtype(result = "ActorResult<(Coupon, bool)>")]
pub struct Define(pub CouponSpec);

#[derive(Message, serde::Serialize, serde::Deserialize)]
#[rtype(result = "ActorResult<Coupon>")]
pub struct Disable(pub String);

/// Saga step 1: answers the coupon (its terms) once the use is durably held.
#[derive(Message, serde::Serialize, serde::Deserialize)]
#[rtype(result = "ActorResult<Coupon>")]
pub struct HoldUse(pub CouponHold);

/// Saga step 3 (a hold already finished is a repeat).
#[derive(Message, serde::Serialize, serde::Deserialize)]
#[rtype(result = "ActorResult<()>")]
pub struct FinishHold {
    pub hold: String,
    pub finish: Finish,
}

#[derive(Message, serde::Serialize, serde::Deserialize)]
#[rtype(result = "ActorResult<Option<Coupon>>")]
pub struct Get(pub String);

#[derive(Message, serde::Serialize, serde::Deserialize)]
#[rtype(result = "ActorResult<Vec<Coupon>>")]
pub struct List {
    pub after: Option<String>,
    pub limit: usize,
}

/// Holds made before `before_ms`, oldest first (the resolver's work).
#[derive(Message, serde::Serialize, serde::Deserialize)]
#[rtype(result = "ActorResult<Vec<CouponHold>>")]
pub struct HoldsBefore {
    pub before_ms: u64,
    /// The last hold of the previous page (its age and id).
    pub after: Option<(u64, String)>,
    pub limit: usize,
}

#[derive(Message, serde::Serialize, serde::Deserialize)]
#[rtype(result = "ActorResult<CouponAudit>")]
pub struct Audit;

super::ledger::ledger_calls! {
    Define => "define": (Coupon, bool),
    Disable => "disable": Coupon,
    HoldUse => "hold": Coupon,
    FinishHold => "finish": (),
    Get => "get": Option<Coupon>,
    List => "list": Vec<Coupon>,
}

/// A coupon shard's audit travels with its per-code counts (left out of its JSON).
impl super::ledger::LedgerCall for Audit {
    type Answer = CouponAudit;
    type Wire = (CouponAudit, std::collections::BTreeMap<String, (u64, u64)>);
    const NAME: &'static str = "audit";
    fn to_wire(mut audit: CouponAudit) -> Self::Wire {
        let by_code = std::mem::take(&mut audit.by_code);
        (audit, by_code)
    }
    fn from_wire((mut audit, by_code): Self::Wire) -> CouponAudit {
        audit.by_code = by_code;
        audit
    }
}

impl Handler<Define> for CouponActor {
    type Result = Reply<(Coupon, bool)>;
    fn handle(&mut self, Define(spec): Define, ctx: &mut Context<Self>) -> Self::Result {
        let _turn = super::Turn::start(&self.turns);
        self.step(ctx, move |book, now| book.create(spec, now))
    }
}

impl Handler<Disable> for CouponActor {
    type Result = Reply<Coupon>;
    fn handle(&mut self, Disable(code): Disable, ctx: &mut Context<Self>) -> Self::Result {
        let _turn = super::Turn::start(&self.turns);
        self.step(ctx, move |book, now| book.disable(&code, now))
    }
}

impl Handler<HoldUse> for CouponActor {
    type Result = Reply<Coupon>;
    fn handle(&mut self, HoldUse(h): HoldUse, ctx: &mut Context<Self>) -> Self::Result {
        let _turn = super::Turn::start(&self.turns);
        self.step(ctx, move |book, now| book.hold(h, now))
    }
}

impl Handler<FinishHold> for CouponActor {
    type Result = Reply<()>;
    fn handle(&mut self, m: FinishHold, ctx: &mut Context<Self>) -> Self::Result {
        let _turn = super::Turn::start(&self.turns);
        self.step(ctx, move |book, now| book.finish(&m.hold, m.finish, now))
    }
}

impl Handler<Get> for CouponActor {
    type Result = Reply<Option<Coupon>>;
    fn handle(&mut self, Get(code): Get, _: &mut Context<Self>) -> Self::Result {
        let _turn = super::Turn::start(&self.turns);
        self.read(move |book| book.coupon(&code).cloned())
    }
}

impl Handler<List> for CouponActor {
    type Result = Reply<Vec<Coupon>>;
    fn handle(&mut self, m: List, _: &mut Context<Self>) -> Self::Result {
        let _turn = super::Turn::start(&self.turns);
        self.read(move |book| book.coupons(m.after.as_deref(), m.limit))
    }
}

impl Handler<HoldsBefore> for CouponActor {
    type Result = Reply<Vec<CouponHold>>;
    fn handle(&mut self, m: HoldsBefore, _: &mut Context<Self>) -> Self::Result {
        let _turn = super::Turn::start(&self.turns);
        self.read(move |book| book.holds_before(m.before_ms, m.after.as_ref(), m.limit))
    }
}

impl Handler<Audit> for CouponActor {
    type Result = Reply<CouponAudit>;
    fn handle(&mut self, _: Audit, _: &mut Context<Self>) -> Self::Result {
        let _turn = super::Turn::start(&self.turns);
        self.read(CouponBook::audit)
    }
}
