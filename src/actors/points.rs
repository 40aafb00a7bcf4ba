//! `PointsActor`: the thin shell around one points shard's [`PointsBook`]. Buyers are
//! spread over [`POINTS_SHARDS`] of them by a stable hash, so no single actor sees
//! every redemption. Every change is journaled and answered only after the group
//! commit's flush; a killed actor rebuilds from its ledger, never from memory.

use std::sync::Arc;

use actix::prelude::*;

use super::admission::Admission;
use super::journaled::{fail, ActorError, ActorResult, Journaled, Machine, Shell};
use super::Kill;
use crate::clock::Clock;
use crate::domain::points::{Balance, Entry, Hold, Outcome, PointsAudit, PointsBook, PointsEvent, RedemptionState};
use crate::domain::DomainError;
use crate::storage::{PointsRecovered, Storage};

/// Points shards (fixed: the buyer → shard map must not change between starts).
pub const POINTS_SHARDS: u16 = 8;

/// The points shard that owns `buyer`'s balance.
pub fn points_shard_of(buyer: &str) -> u16 {
    (crc32fast::hash(buyer.as_bytes()) % POINTS_SHARDS as u32) as u16
}

/// How to reach one points actor.
#[derive(Clone)]
pub struct PointsHandle {
    pub addr: Addr<PointsActor>,
    pub admission: Arc<Admission>,
}

/// Rebuilds every points shard from its ledger and starts its actor (round-robin
/// over `arbiters`, under a supervisor). Returns them by shard index.
pub fn start_points(
    storage: &Arc<Storage>,
    clock: &Arc<dyn Clock>,
    arbiters: &[ArbiterHandle],
    mailbox_capacity: usize,
    snapshot_min_journal_bytes: u64,
) -> Result<Vec<PointsHandle>, ActorError> {
    (0..POINTS_SHARDS)
        .map(|shard| {
            let recovered = storage.recover_points(shard)?;
            let (storage, clock) = (storage.clone(), clock.clone());
            let arbiter = &arbiters[shard as usize % arbiters.len()];
            // Built on its arbiter: the actor's state is not shared across threads.
            let addr = Supervisor::start_in_arbiter(arbiter, move |_| {
                PointsActor::new(shard, storage, clock, snapshot_min_journal_bytes, mailbox_capacity, recovered)
            });
            Ok(PointsHandle { addr, admission: Arc::new(Admission::new(mailbox_capacity, 0)) })
        })
        .collect()
}

pub struct PointsActor {
    shard: u16,
    storage: Arc<Storage>,
    clock: Arc<dyn Clock>,
    /// A snapshot is written once the journal since the last one exceeds
    /// max(this, the last snapshot's size), as for stock shards.
    snapshot_min_journal_bytes: u64,
    /// Admission permits of its line (callers hold one per request).
    mailbox_capacity: usize,
    /// The book and its ledger (see [`super::journaled`]).
    shell: Shell<PointsBook>,
    /// `kami_actor_turn_seconds{actor="points"}`.
    turns: metrics::Histogram,
}

impl Machine for PointsBook {
    type Event = PointsEvent;

    fn journaled(&self, event: &PointsEvent, _seq: u64, _touched: &mut dyn FnMut(u64)) {
        metrics::counter!("kami_points_events_total", "event" => event_name(event)).increment(1);
    }
}

fn live(r: PointsRecovered) -> Journaled<PointsBook> {
    let seq = r.book.len();
    Journaled::recovered(r.book, r.journal, seq, 0, r.snapshot_bytes)
}

impl PointsActor {
    /// A points shard rebuilt from its snapshot and journal (`recovered`).
    pub fn new(
        shard: u16,
        storage: Arc<Storage>,
        clock: Arc<dyn Clock>,
        snapshot_min_journal_bytes: u64,
        mailbox_capacity: usize,
        recovered: PointsRecovered,
    ) -> PointsActor {
        PointsActor {
            mailbox_capacity,
            shard,
            storage,
            clock,
            snapshot_min_journal_bytes,
            shell: Shell::new(format!("points {shard}"), Some(live(recovered))),
            turns: metrics::histogram!("kami_actor_turn_seconds", "actor" => "points"),
        }
    }

    /// Snapshots the book once enough journal has grown since the last snapshot;
    /// once the snapshot is flushed, the journal it covers is trimmed (off the
    /// actor's thread). So start-up reads at most about twice the book.
    fn maybe_snapshot(&mut self) {
        let shard = self.shard;
        let Ok(live) = self.shell.live_mut() else { return };
        if !live.snapshot_due(self.snapshot_min_journal_bytes) {
            return;
        }
        let slot = match live.begin_snapshot() {
            Ok(slot) => slot,
            Err(e) => return tracing::warn!(shard, error = %e, "starting a new journal segment failed"),
        };
        match self.storage.write_points_snapshot(shard, live.state()) {
            Ok(bytes) => slot.stored(bytes),
            Err(e) => {
                return tracing::warn!(shard, error = %e, "points snapshot failed; the journal keeps growing until the next try")
            }
        }
        let storage = self.storage.clone();
        let Ok(ticket) = storage.ticket() else { return };
        actix_rt::spawn(async move {
            let flushed = ticket.wait().await.is_ok();
            let (seq, journal) = (slot.seq, slot.journal.clone());
            drop(slot);
            if flushed {
                let trimmed = tokio::task::spawn_blocking(move || storage.trim_points(shard, &journal, seq));
                if let Ok(Err(e)) = trimmed.await {
                    tracing::warn!(shard, error = %e, "trimming the points journal failed");
                }
            }
        });
    }

    /// Runs a domain command; journals its event (if any) and answers once
    /// everything the book shows is durable (a repeat too, like a change).
    fn step<T: 'static>(
        &mut self,
        ctx: &mut Context<Self>,
        command: impl FnOnce(&mut PointsBook, u64) -> Result<Outcome<T>, DomainError>,
    ) -> ResponseFuture<ActorResult<T>> {
        let now = self.clock.now_ms();
        match self.shell.change(ctx, |book| command(book, now)) {
            Ok((value, written)) => {
                if written.is_some() {
                    self.maybe_snapshot();
                }
                self.shell.reply_after_all(&self.storage, value)
            }
            Err(e) => fail(e),
        }
    }

    fn read<T: 'static>(&mut self, read: impl FnOnce(&PointsBook) -> T) -> ResponseFuture<ActorResult<T>> {
        match self.shell.live() {
            Ok(live) => {
                let value = read(live.state());
                self.shell.reply_after_all(&self.storage, value)
            }
            Err(e) => fail(e),
        }
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

impl Actor for PointsActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        // Callers hold an admission ticket per request (see `core`); this is a backstop.
        ctx.set_mailbox_capacity(self.mailbox_capacity + super::UNADMITTED_MESSAGES);
    }
}

impl Supervised for PointsActor {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        metrics::counter!("kami_actor_restarts_total").increment(1);
        self.shell.clear();
        match self.storage.recover_points(self.shard) {
            Ok(recovered) => {
                tracing::info!(shard = self.shard, records = recovered.book.len(), "points actor rebuilt from storage");
                self.shell.install(live(recovered));
            }
            Err(e) => tracing::error!(shard = self.shard, error = %e, "points actor could not rebuild"),
        }
    }
}

// ---- messages ----

#[derive(Message)]
#[rtype(result = "ActorResult<Balance>")]
pub struct Adjust {
    pub request_id: String,
    pub buyer: String,
    pub delta: i64,
    pub note: String,
}

#[derive(Message)]
#[rtype(result = "ActorResult<RedemptionState>")]
pub struct HoldPoints(pub Hold);

#[derive(Message)]
#[rtype(result = "ActorResult<Balance>")]
pub struct SettleRedemption {
    pub redemption: String,
    /// Whose balance the answer shows (the redemption's buyer).
    pub buyer: String,
    pub order_id: String,
}

#[derive(Message)]
#[rtype(result = "ActorResult<()>")]
pub struct Release {
    pub redemption: String,
    pub reason: String,
}

#[derive(Message)]
#[rtype(result = "ActorResult<(Balance, Vec<Entry>)>")]
pub struct Statement {
    pub buyer: String,
    pub limit: usize,
}

/// Holds made before `before_ms` and not yet settled or released (the resolver's work).
#[derive(Message)]
#[rtype(result = "ActorResult<Vec<Hold>>")]
pub struct StaleHolds {
    pub before_ms: u64,
    pub limit: usize,
}

#[derive(Message)]
#[rtype(result = "ActorResult<PointsAudit>")]
pub struct AuditPoints;

impl Handler<Adjust> for PointsActor {
    type Result = ResponseFuture<ActorResult<Balance>>;
    fn handle(&mut self, m: Adjust, ctx: &mut Context<Self>) -> Self::Result {
        let _turn = super::Turn::start(&self.turns);
        self.step(ctx, move |book, now| book.adjust(&m.request_id, &m.buyer, m.delta, &m.note, now))
    }
}

impl Handler<HoldPoints> for PointsActor {
    type Result = ResponseFuture<ActorResult<RedemptionState>>;
    fn handle(&mut self, HoldPoints(h): HoldPoints, ctx: &mut Context<Self>) -> Self::Result {
        let _turn = super::Turn::start(&self.turns);
        self.step(ctx, move |book, now| book.hold(&h.redemption, &h.buyer, h.points, &h.product_id, h.quantity, now))
    }
}

/// Answers the buyer's balance after the settling (saving the redeemer a read).
impl Handler<SettleRedemption> for PointsActor {
    type Result = ResponseFuture<ActorResult<Balance>>;
    fn handle(&mut self, m: SettleRedemption, ctx: &mut Context<Self>) -> Self::Result {
        let _turn = super::Turn::start(&self.turns);
        self.step(ctx, move |book, now| {
            let outcome = book.settle(&m.redemption, &m.order_id, now)?;
            Ok(outcome.map(|()| book.balance(&m.buyer)))
        })
    }
}

impl Handler<Release> for PointsActor {
    type Result = ResponseFuture<ActorResult<()>>;
    fn handle(&mut self, m: Release, ctx: &mut Context<Self>) -> Self::Result {
        let _turn = super::Turn::start(&self.turns);
        self.step(ctx, move |book, now| book.release(&m.redemption, &m.reason, now))
    }
}

impl Handler<Statement> for PointsActor {
    type Result = ResponseFuture<ActorResult<(Balance, Vec<Entry>)>>;
    fn handle(&mut self, m: Statement, _: &mut Context<Self>) -> Self::Result {
        let _turn = super::Turn::start(&self.turns);
        self.read(move |book| (book.balance(&m.buyer), book.statement(&m.buyer, m.limit)))
    }
}

impl Handler<StaleHolds> for PointsActor {
    type Result = ResponseFuture<ActorResult<Vec<Hold>>>;
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
    type Result = ResponseFuture<ActorResult<PointsAudit>>;
    fn handle(&mut self, _: AuditPoints, _: &mut Context<Self>) -> Self::Result {
        let _turn = super::Turn::start(&self.turns);
        self.read(PointsBook::audit)
    }
}

impl Handler<Kill> for PointsActor {
    type Result = ();
    fn handle(&mut self, _: Kill, ctx: &mut Context<Self>) {
        let _turn = super::Turn::start(&self.turns);
        tracing::warn!(shard = self.shard, "points actor killed on request");
        self.shell.stop(ctx);
    }
}
