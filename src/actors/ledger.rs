//! `LedgerActor`: the thin shell around one ledger shard's book (a points shard's
//! [`PointsBook`](crate::domain::points::PointsBook), a coupon shard's
//! [`CouponBook`](crate::domain::coupon::CouponBook)). Every change is journaled and
//! answered only after the group commit's flush; a killed actor rebuilds from its
//! journal, never from memory. Each book's own messages live with it
//! (`actors::points`, `actors::coupons`).

use std::sync::Arc;

use actix::prelude::*;

use super::admission::Admission;
use super::journaled::{fail, ActorError, ActorResult, Journaled, Machine, Shell};
use super::Kill;
use crate::clock::Clock;
use crate::domain::{DomainError, Outcome};
use crate::storage::{Ledger, LedgerRecovered, Storage};

/// A book a ledger actor can own.
pub trait LedgerBook: Ledger + Machine<Event = <Self as Ledger>::Event> + Unpin + Send + 'static {}

impl<B: Ledger + Machine<Event = <B as Ledger>::Event> + Unpin + Send + 'static> LedgerBook for B {}

/// How to reach one ledger actor.
pub struct LedgerHandle<B: LedgerBook> {
    pub addr: Addr<LedgerActor<B>>,
    pub admission: Arc<Admission>,
}

impl<B: LedgerBook> Clone for LedgerHandle<B> {
    fn clone(&self) -> Self {
        LedgerHandle { addr: self.addr.clone(), admission: self.admission.clone() }
    }
}

/// Rebuilds `shards` ledger shards of book `B` from storage and starts their actors
/// (round-robin over `arbiters`, under a supervisor). Returns them by shard index.
pub fn start_ledger<B: LedgerBook>(
    shards: u16,
    storage: &Arc<Storage>,
    clock: &Arc<dyn Clock>,
    arbiters: &[ArbiterHandle],
    mailbox_capacity: usize,
    snapshot_min_journal_bytes: u64,
) -> Result<Vec<LedgerHandle<B>>, ActorError> {
    (0..shards)
        .map(|shard| {
            let recovered = storage.recover_ledger::<B>(shard)?;
            let (storage, clock) = (storage.clone(), clock.clone());
            let arbiter = &arbiters[shard as usize % arbiters.len()];
            // Built on its arbiter: the actor's state is not shared across threads.
            let addr = Supervisor::start_in_arbiter(arbiter, move |_| {
                LedgerActor::new(shard, storage, clock, snapshot_min_journal_bytes, mailbox_capacity, recovered)
            });
            Ok(LedgerHandle { addr, admission: Arc::new(Admission::new(mailbox_capacity, 0)) })
        })
        .collect()
}

pub struct LedgerActor<B: LedgerBook> {
    shard: u16,
    storage: Arc<Storage>,
    clock: Arc<dyn Clock>,
    /// A snapshot is written once the journal since the last one exceeds
    /// max(this, the last snapshot's size), as for stock shards.
    snapshot_min_journal_bytes: u64,
    /// Admission permits of its line (callers hold one per request).
    mailbox_capacity: usize,
    /// The book and its journal (see [`super::journaled`]).
    shell: Shell<B>,
    /// `kami_actor_turn_seconds{actor="points"|"coupons"}`.
    pub(super) turns: metrics::Histogram,
}

fn live<B: LedgerBook>(r: LedgerRecovered<B>) -> Journaled<B> {
    let seq = r.book.seq();
    Journaled::recovered(r.book, Arc::new(r.journal), seq, 0, r.snapshot_bytes)
}

impl<B: LedgerBook> LedgerActor<B> {
    /// A ledger shard rebuilt from its snapshot and journal (`recovered`).
    pub fn new(
        shard: u16,
        storage: Arc<Storage>,
        clock: Arc<dyn Clock>,
        snapshot_min_journal_bytes: u64,
        mailbox_capacity: usize,
        recovered: LedgerRecovered<B>,
    ) -> Self {
        LedgerActor {
            mailbox_capacity,
            shard,
            storage,
            clock,
            snapshot_min_journal_bytes,
            shell: Shell::new(format!("{} {shard}", B::NAME), Some(live(recovered))),
            turns: metrics::histogram!("kami_actor_turn_seconds", "actor" => B::NAME),
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
            Err(e) => {
                return tracing::warn!(ledger = B::NAME, shard, error = %e, "starting a new journal segment failed")
            }
        };
        match self.storage.write_ledger_snapshot(shard, live.state()) {
            Ok(bytes) => slot.stored(bytes),
            Err(e) => {
                return tracing::warn!(ledger = B::NAME, shard, error = %e, "snapshot failed; the journal keeps growing until the next try")
            }
        }
        let storage = self.storage.clone();
        let Ok(ticket) = storage.ticket() else { return };
        actix_rt::spawn(async move {
            let flushed = ticket.wait().await.is_ok();
            let seq = slot.seq;
            drop(slot);
            if flushed {
                let trimmed = tokio::task::spawn_blocking(move || {
                    storage
                        .ledger_journal::<B>(shard)
                        .and_then(|journal| storage.trim_ledger::<B>(shard, &journal, seq))
                });
                if let Ok(Err(e)) = trimmed.await {
                    tracing::warn!(ledger = B::NAME, shard, error = %e, "trimming the journal failed");
                }
            }
        });
    }

    /// Runs a domain command; journals its event (if any) and answers once
    /// everything the book shows is durable (a repeat too, like a change).
    pub(super) fn step<T: 'static>(
        &mut self,
        ctx: &mut Context<Self>,
        command: impl FnOnce(&mut B, u64) -> Result<Outcome<<B as Ledger>::Event, T>, DomainError>,
    ) -> ResponseFuture<ActorResult<T>> {
        let now = self.clock.now_ms();
        match self.shell.change(ctx, |book| command(book, now)) {
            Ok((value, written)) => {
                if written.is_some() {
                    self.maybe_snapshot();
                }
                self.shell.reply_after_all(value)
            }
            Err(e) => fail(e),
        }
    }

    pub(super) fn read<T: 'static>(&mut self, read: impl FnOnce(&B) -> T) -> ResponseFuture<ActorResult<T>> {
        match self.shell.live() {
            Ok(live) => {
                let value = read(live.state());
                self.shell.reply_after_all(value)
            }
            Err(e) => fail(e),
        }
    }
}

impl<B: LedgerBook> Actor for LedgerActor<B> {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        // Callers hold an admission ticket per request (see `core`); this is a backstop.
        ctx.set_mailbox_capacity(self.mailbox_capacity + super::UNADMITTED_MESSAGES);
    }
}

impl<B: LedgerBook> Supervised for LedgerActor<B> {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        metrics::counter!("kami_actor_restarts_total").increment(1);
        self.shell.clear();
        match self.storage.recover_ledger::<B>(self.shard) {
            Ok(recovered) => {
                tracing::info!(
                    ledger = B::NAME,
                    shard = self.shard,
                    records = recovered.book.seq(),
                    "ledger actor rebuilt from storage"
                );
                self.shell.install(live(recovered));
            }
            Err(e) => {
                tracing::error!(ledger = B::NAME, shard = self.shard, error = %e, "ledger actor could not rebuild")
            }
        }
    }
}

impl<B: LedgerBook> Handler<Kill> for LedgerActor<B> {
    type Result = ();
    fn handle(&mut self, _: Kill, ctx: &mut Context<Self>) {
        let _turn = super::Turn::start(&self.turns);
        tracing::warn!(ledger = B::NAME, shard = self.shard, "ledger actor killed on request");
        self.shell.stop(ctx);
    }
}
