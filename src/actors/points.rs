//! `PointsActor`: the thin shell around one points shard's [`PointsBook`]. Buyers are
//! spread over [`POINTS_SHARDS`] of them by a stable hash, so no single actor sees
//! every redemption. Every change is journaled and answered only after the group
//! commit's flush; a killed actor rebuilds from its ledger, never from memory.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use actix::prelude::*;
use futures::future;

use super::admission::Admission;
use super::shard::{ShardError, ShardResult};
use super::Kill;
use crate::clock::Clock;
use crate::domain::points::{Balance, Entry, Hold, PointsAudit, PointsBook, PointsEvent, RedemptionState, Step};
use crate::domain::DomainError;
use crate::storage::{PointsJournal, Storage};

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
) -> Result<Vec<PointsHandle>, ShardError> {
    (0..POINTS_SHARDS)
        .map(|shard| {
            let actor = PointsActor::recover(shard, storage.clone(), clock.clone(), snapshot_min_journal_bytes)?;
            let arbiter = &arbiters[shard as usize % arbiters.len()];
            let addr = Supervisor::start_in_arbiter(arbiter, move |_| actor);
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
    /// None when rebuilding failed: every request is answered `Unavailable`.
    live: Option<Live>,
    /// `kami_actor_turn_seconds{actor="points"}`.
    turns: metrics::Histogram,
}

struct Live {
    book: PointsBook,
    journal: PointsJournal,
    /// Ledger records known durable (shared with reply futures): a read waits for a
    /// flush only when the book shows more than that.
    durable: Arc<AtomicU64>,
    journal_bytes_since_snapshot: u64,
    last_snapshot_bytes: u64,
}

impl Live {
    fn new(r: crate::storage::PointsRecovered) -> Live {
        // A recovered ledger is durable as far as it goes.
        let durable = Arc::new(AtomicU64::new(r.book.len()));
        Live {
            book: r.book,
            journal: r.journal,
            durable,
            journal_bytes_since_snapshot: 0,
            last_snapshot_bytes: r.snapshot_bytes,
        }
    }
}

impl PointsActor {
    /// A points shard rebuilt from its snapshot and journal.
    pub fn recover(
        shard: u16,
        storage: Arc<Storage>,
        clock: Arc<dyn Clock>,
        snapshot_min_journal_bytes: u64,
    ) -> Result<PointsActor, ShardError> {
        let recovered = storage.recover_points(shard)?;
        Ok(PointsActor {
            shard,
            storage,
            clock,
            snapshot_min_journal_bytes,
            live: Some(Live::new(recovered)),
            turns: metrics::histogram!("kami_actor_turn_seconds", "actor" => "points"),
        })
    }

    /// Snapshots the book once enough journal has grown since the last snapshot;
    /// once the snapshot is flushed, the journal it covers is trimmed (off the
    /// actor's thread). So start-up reads at most about twice the book.
    fn maybe_snapshot(&mut self) {
        let Some(live) = self.live.as_mut() else { return };
        if live.journal_bytes_since_snapshot < self.snapshot_min_journal_bytes.max(live.last_snapshot_bytes) {
            return;
        }
        let shard = self.shard;
        match self.storage.write_points_snapshot(shard, &live.book) {
            Ok(bytes) => {
                if let Err(e) = live.journal.roll() {
                    tracing::warn!(shard, error = %e, "starting a new journal segment failed");
                }
                live.last_snapshot_bytes = bytes as u64;
                live.journal_bytes_since_snapshot = 0;
                let (seq, journal, storage) = (live.book.len(), live.journal.clone(), self.storage.clone());
                let Ok(ticket) = self.storage.ticket() else { return };
                actix_rt::spawn(async move {
                    if ticket.wait().await.is_ok() {
                        let trimmed = tokio::task::spawn_blocking(move || storage.trim_points(shard, &journal, seq));
                        if let Ok(Err(e)) = trimmed.await {
                            tracing::warn!(shard, error = %e, "trimming the points journal failed");
                        }
                    }
                });
            }
            Err(e) => {
                tracing::warn!(shard, error = %e, "points snapshot failed; the journal keeps growing until the next try")
            }
        }
    }

    fn live(&mut self) -> ShardResult<&mut Live> {
        self.live.as_mut().ok_or(ShardError::Unavailable)
    }

    /// Runs a domain step; journals its event (if any) and answers after the flush.
    fn step<T: Send + 'static>(
        &mut self,
        ctx: &mut Context<Self>,
        step: impl FnOnce(&mut PointsBook, u64) -> Result<Step<T>, DomainError>,
    ) -> ResponseFuture<ShardResult<T>> {
        let now = self.clock.now_ms();
        let live = match self.live() {
            Ok(l) => l,
            Err(e) => return Box::pin(future::ready(Err(e))),
        };
        let outcome = crate::domain::catch_broken_step(|| step(&mut live.book, now));
        let (event, value) = match outcome {
            Err(panic) => {
                tracing::error!(shard = self.shard, %panic, "points step broke; rebuilding from the ledger");
                self.live = None;
                ctx.stop();
                return Box::pin(future::ready(Err(ShardError::Unavailable)));
            }
            Ok(Err(refusal)) => return Box::pin(future::ready(Err(refusal.into()))),
            Ok(Ok(Step::Repeat(value))) => (None, value),
            Ok(Ok(Step::Changed(event, value))) => (Some(event), value),
        };
        // A repeat answers once everything before it is durable, like a change.
        if let Some(event) = &event {
            let seq = live.book.len();
            match live.journal.append(seq, event) {
                Ok(bytes) => live.journal_bytes_since_snapshot += bytes as u64,
                Err(e) => {
                    tracing::error!(shard = self.shard, error = %e, "points append failed; rebuilding from the ledger");
                    self.live = None;
                    ctx.stop();
                    return Box::pin(future::ready(Err(e.into())));
                }
            }
            metrics::counter!("kami_points_events_total", "event" => event_name(event)).increment(1);
            self.maybe_snapshot();
        }
        self.after_flush(Ok(value))
    }

    /// Answers `value` once everything the book shows is durable: at once if it is
    /// known to be, else after the next group flush.
    fn after_flush<T: 'static>(&mut self, value: ShardResult<T>) -> ResponseFuture<ShardResult<T>> {
        let Some(live) = self.live.as_ref() else { return Box::pin(future::ready(Err(ShardError::Unavailable))) };
        let (needed, durable) = (live.book.len(), live.durable.clone());
        if durable.load(Ordering::Acquire) >= needed {
            return Box::pin(future::ready(value));
        }
        let ticket = match self.storage.ticket() {
            Ok(t) => t,
            Err(e) => return Box::pin(future::ready(Err(e.into()))),
        };
        Box::pin(async move {
            ticket.wait().await?;
            durable.fetch_max(needed, Ordering::AcqRel);
            value
        })
    }

    fn read<T: 'static>(&mut self, read: impl FnOnce(&PointsBook) -> T) -> ResponseFuture<ShardResult<T>> {
        let value = self.live().map(|l| read(&l.book));
        self.after_flush(value)
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
        ctx.set_mailbox_capacity(4096 + 64);
    }
}

impl Supervised for PointsActor {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        metrics::counter!("kami_actor_restarts_total").increment(1);
        self.live = None;
        match self.storage.recover_points(self.shard) {
            Ok(recovered) => {
                tracing::info!(shard = self.shard, records = recovered.book.len(), "points actor rebuilt from storage");
                self.live = Some(Live::new(recovered));
            }
            Err(e) => tracing::error!(shard = self.shard, error = %e, "points actor could not rebuild"),
        }
    }
}

// ---- messages ----

#[derive(Message)]
#[rtype(result = "ShardResult<Balance>")]
pub struct Adjust {
    pub request_id: String,
    pub buyer: String,
    pub delta: i64,
    pub note: String,
}

#[derive(Message)]
#[rtype(result = "ShardResult<RedemptionState>")]
pub struct HoldPoints(pub Hold);

#[derive(Message)]
#[rtype(result = "ShardResult<Balance>")]
pub struct Settle {
    pub redemption: String,
    /// Whose balance the answer shows (the redemption's buyer).
    pub buyer: String,
    pub order_id: String,
}

#[derive(Message)]
#[rtype(result = "ShardResult<()>")]
pub struct Release {
    pub redemption: String,
    pub reason: String,
}

#[derive(Message)]
#[rtype(result = "ShardResult<(Balance, Vec<Entry>)>")]
pub struct Statement {
    pub buyer: String,
    pub limit: usize,
}

/// Holds made before `before_ms` and not yet settled or released (the resolver's work).
#[derive(Message)]
#[rtype(result = "ShardResult<Vec<Hold>>")]
pub struct StaleHolds {
    pub before_ms: u64,
    pub limit: usize,
}

#[derive(Message)]
#[rtype(result = "ShardResult<PointsAudit>")]
pub struct AuditPoints;

impl Handler<Adjust> for PointsActor {
    type Result = ResponseFuture<ShardResult<Balance>>;
    fn handle(&mut self, m: Adjust, ctx: &mut Context<Self>) -> Self::Result {
        let _turn = super::Turn::start(&self.turns);
        self.step(ctx, move |book, now| book.adjust(&m.request_id, &m.buyer, m.delta, &m.note, now))
    }
}

impl Handler<HoldPoints> for PointsActor {
    type Result = ResponseFuture<ShardResult<RedemptionState>>;
    fn handle(&mut self, HoldPoints(h): HoldPoints, ctx: &mut Context<Self>) -> Self::Result {
        let _turn = super::Turn::start(&self.turns);
        self.step(ctx, move |book, now| book.hold(&h.redemption, &h.buyer, h.points, &h.product_id, h.quantity, now))
    }
}

/// Answers the buyer's balance after the settling (saving the redeemer a read).
impl Handler<Settle> for PointsActor {
    type Result = ResponseFuture<ShardResult<Balance>>;
    fn handle(&mut self, m: Settle, ctx: &mut Context<Self>) -> Self::Result {
        let _turn = super::Turn::start(&self.turns);
        self.step(ctx, move |book, now| {
            let step = book.settle(&m.redemption, &m.order_id, now)?;
            let balance = book.balance(&m.buyer);
            Ok(match step {
                Step::Changed(event, ()) => Step::Changed(event, balance),
                Step::Repeat(()) => Step::Repeat(balance),
            })
        })
    }
}

impl Handler<Release> for PointsActor {
    type Result = ResponseFuture<ShardResult<()>>;
    fn handle(&mut self, m: Release, ctx: &mut Context<Self>) -> Self::Result {
        let _turn = super::Turn::start(&self.turns);
        self.step(ctx, move |book, now| book.release(&m.redemption, &m.reason, now))
    }
}

impl Handler<Statement> for PointsActor {
    type Result = ResponseFuture<ShardResult<(Balance, Vec<Entry>)>>;
    fn handle(&mut self, m: Statement, _: &mut Context<Self>) -> Self::Result {
        let _turn = super::Turn::start(&self.turns);
        self.read(move |book| (book.balance(&m.buyer), book.statement(&m.buyer, m.limit)))
    }
}

impl Handler<StaleHolds> for PointsActor {
    type Result = ResponseFuture<ShardResult<Vec<Hold>>>;
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
    type Result = ResponseFuture<ShardResult<PointsAudit>>;
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
        self.live = None;
        ctx.stop();
    }
}
