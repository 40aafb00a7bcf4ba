//! `LedgerActor`: the thin shell around one ledger shard's book (a points shard's
//! [`PointsBook`](crate::domain::points::PointsBook), a coupon shard's
//! [`CouponBook`](crate::domain::coupon::CouponBook)). Every change is journaled and
//! answered only after the group commit's flush; a killed actor rebuilds from its
//! journal, never from memory. Each book's own messages live with it
//! (`actors::points`, `actors::coupons`).
//!
//! On a cluster node (`cluster.node`) the journal and snapshots are kept in the
//! replicated stream (subject `{name}.{shard}`, which is also the shard's lease
//! key): the actor starts without a book, is rebuilt from the stream when the node
//! takes the lease ([`Own`]) and drops it when the lease goes ([`Disown`]), as a
//! stock actor does. Its [`Place`] says whether calls may go to it here.

use std::sync::Arc;

use actix::prelude::*;

use super::admission::Admission;
use super::journaled::{ActorError, ActorResult, Journaled, Machine, Reply, Shell};
use super::place::Place;
use super::shard::{Disown, Own};
use super::Kill;
use crate::clock::Clock;
use crate::domain::{DomainError, Outcome, ShardId};
use crate::storage::jetstream::{JetStream, StreamJournal, StreamLedger};
use crate::storage::{EventLog, Ledger, LedgerRecovered, Storage, StorageError};

/// A book a ledger actor can own.
pub trait LedgerBook: Ledger + Machine<Event = <Self as Ledger>::Event> + Unpin + Send + 'static {}

impl<B: Ledger + Machine<Event = <B as Ledger>::Event> + Unpin + Send + 'static> LedgerBook for B {}

/// How to reach one ledger actor.
pub struct LedgerHandle<B: LedgerBook> {
    pub addr: Addr<LedgerActor<B>>,
    pub admission: Arc<Admission>,
    /// Whether calls may go to it here (always, on one server).
    pub place: Arc<Place>,
}

impl<B: LedgerBook> Clone for LedgerHandle<B> {
    fn clone(&self) -> Self {
        LedgerHandle { addr: self.addr.clone(), admission: self.admission.clone(), place: self.place.clone() }
    }
}

/// Where ledger shards keep their journals and snapshots, and their actors' limits.
pub struct LedgerEnv {
    pub storage: Arc<Storage>,
    /// The replicated stream that keeps the shards, if one does (see
    /// [`crate::app`]): served here for good by one server, or (a cluster node)
    /// only while this node holds their leases.
    pub stream: Option<JetStream>,
    /// A cluster node: shards start without a book, served once their leases are here.
    pub clustered: bool,
    pub clock: Arc<dyn Clock>,
    pub mailbox_capacity: usize,
    /// A snapshot is written once the journal since the last one exceeds
    /// max(this, the last snapshot's size), as for stock shards.
    pub snapshot_min_journal_bytes: u64,
}

/// Starts `shards` ledger shards of book `B` (round-robin over `arbiters`, under a
/// supervisor), each rebuilt from local storage, or from the stream (one server on
/// the jetstream backend), or without a book until its lease is taken (a cluster
/// node). Returns them by shard index.
pub async fn start_ledger<B: LedgerBook>(
    shards: u16,
    env: &Arc<LedgerEnv>,
    arbiters: &[ArbiterHandle],
) -> Result<Vec<LedgerHandle<B>>, ActorError> {
    let mut out = Vec::with_capacity(shards as usize);
    for shard in 0..shards {
        let id = ShardId::new(B::NAME, shard);
        let (start, place) = match &env.stream {
            Some(_) if env.clustered => (Start::Later, Place::elsewhere(id)),
            Some(js) => (Start::Stream(Box::new(js.recover_ledger::<B>(shard).await?)), Place::here(id)),
            None => (Start::Local(env.storage.recover_ledger::<B>(shard)?), Place::here(id)),
        };
        let place = Arc::new(place);
        let admission = Arc::new(Admission::new(env.mailbox_capacity, 0));
        let (env, actor_place) = (env.clone(), place.clone());
        let arbiter = &arbiters[shard as usize % arbiters.len()];
        // Built on its arbiter: the actor's state is not shared across threads.
        let addr = Supervisor::start_in_arbiter(arbiter, move |_| LedgerActor::new(shard, env, actor_place, start));
        out.push(LedgerHandle { addr, admission, place });
    }
    Ok(out)
}

/// What a ledger actor starts from.
pub enum Start<B: Ledger> {
    /// Its book rebuilt from the data directory.
    Local(LedgerRecovered<B>),
    /// Its book rebuilt from the stream (one server on the jetstream backend).
    Stream(Box<StreamLedger<B>>),
    /// Nothing until this node takes its lease (a cluster node).
    Later,
}

pub struct LedgerActor<B: LedgerBook> {
    shard: u16,
    env: Arc<LedgerEnv>,
    /// The book and its journal (see [`super::journaled`]).
    shell: Shell<B>,
    /// Its journal when the stream keeps it (see [`LedgerEnv::stream`]).
    stream: Option<Arc<StreamJournal>>,
    /// Whether it is served here (see [`super::place`]).
    place: Arc<Place>,
    /// Counts the hand-overs of a cluster node's shard ([`Disown`]): a rebuild
    /// begun before one installs nothing after it.
    tenure: u64,
    /// A rebuild from the stream is under way.
    rebuilding: bool,
    /// `kami_actor_turn_seconds{actor="points"|"coupons"}`.
    pub(super) turns: metrics::Histogram,
}

fn live<B: LedgerBook>(r: LedgerRecovered<B>) -> Journaled<B> {
    let seq = r.book.seq();
    Journaled::recovered(r.book, Arc::new(r.journal), seq, 0, r.snapshot_bytes)
}

/// How often a stream-kept ledger shard checks it is not served here without a book.
const STRANDED_CHECK: std::time::Duration = std::time::Duration::from_millis(500);

impl<B: LedgerBook> LedgerActor<B> {
    /// A ledger shard rebuilt from local storage (`recovered`), or without a book
    /// until its lease is taken (a cluster node).
    pub fn new(shard: u16, env: Arc<LedgerEnv>, place: Arc<Place>, start: Start<B>) -> Self {
        let mut actor = LedgerActor {
            shard,
            env,
            shell: Shell::new(format!("{} {shard}", B::NAME), None),
            stream: None,
            place,
            tenure: 0,
            rebuilding: false,
            turns: metrics::histogram!("kami_actor_turn_seconds", "actor" => B::NAME),
        };
        match start {
            Start::Local(recovered) => actor.shell.install(live(recovered)),
            Start::Stream(rebuilt) => actor.install_from_stream(*rebuilt),
            Start::Later => {}
        }
        actor
    }

    /// Serves the book rebuilt from the stream, appending to its journal there.
    fn install_from_stream(&mut self, r: StreamLedger<B>) {
        let journal = Arc::new(r.journal);
        let seq = r.book.seq();
        self.stream = Some(journal.clone());
        self.shell.install(Journaled::recovered(r.book, journal, seq, r.journal_bytes, r.snapshot_bytes));
    }

    /// Snapshots the book once enough journal has grown since the last snapshot;
    /// once the snapshot is durable, the journal it covers is trimmed (off the
    /// actor's thread; on the stream, purged). So start-up reads at most about
    /// twice the book.
    fn maybe_snapshot(&mut self) {
        let shard = self.shard;
        let Ok(live) = self.shell.live_mut() else { return };
        if !live.snapshot_due(self.env.snapshot_min_journal_bytes) {
            return;
        }
        let slot = match live.begin_snapshot() {
            Ok(slot) => slot,
            Err(e) => {
                return tracing::warn!(ledger = B::NAME, shard, error = %e, "starting a new journal segment failed")
            }
        };
        if let (Some(js), Some(journal)) = (&self.env.stream, &self.stream) {
            let bytes = crate::storage::codec::encode(B::SNAPSHOT, live.state());
            slot.stored(bytes.len());
            let (js, journal) = (js.clone(), journal.clone());
            actix_rt::spawn(async move {
                let seq = slot.seq;
                let stored = async {
                    EventLog::<<B as Ledger>::Event>::ticket(&*journal)?.wait().await?;
                    js.store_ledger_snapshot::<B>(shard, &journal, seq, &bytes).await
                };
                if let Err(e) = stored.await {
                    tracing::warn!(ledger = B::NAME, shard, error = %e, "snapshot not stored; the journal keeps growing until the next try");
                }
                drop(slot);
            });
            return;
        }
        match self.env.storage.write_ledger_snapshot(shard, live.state()) {
            Ok(bytes) => slot.stored(bytes),
            Err(e) => {
                return tracing::warn!(ledger = B::NAME, shard, error = %e, "snapshot failed; the journal keeps growing until the next try")
            }
        }
        let storage = self.env.storage.clone();
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

    /// Rebuilds the book from the replicated stream (off the actor's turn: until it
    /// is installed, every request is answered unavailable). A failed try is tried
    /// again, waiting longer each time, while the lease stays here.
    fn rebuild_from_stream(&mut self, ctx: &mut Context<Self>, failures: u32) {
        let Some(js) = self.env.stream.clone() else { return };
        let (shard, tenure) = (self.shard, self.tenure);
        self.rebuilding = true;
        let rebuild = async move { js.recover_ledger::<B>(shard).await };
        ctx.spawn(actix::fut::wrap_future::<_, Self>(rebuild).map(
            move |rebuilt: Result<StreamLedger<B>, StorageError>, act, ctx| {
                if act.tenure != tenure {
                    return; // handed over meanwhile: what was read may be outdated already
                }
                match rebuilt {
                    Ok(r) => {
                        act.rebuilding = false;
                        tracing::info!(ledger = B::NAME, shard, snapshot_bytes = r.snapshot_bytes, replayed = r.replayed, elapsed_ms = r.elapsed.as_millis() as u64, "ledger actor rebuilt from the stream");
                        act.install_from_stream(r);
                    }
                    Err(e) => {
                        let wait = super::shard::rebuild_backoff(failures);
                        tracing::error!(ledger = B::NAME, shard, error = %e, retry_ms = wait.as_millis() as u64, "ledger actor could not rebuild from the stream; answering unavailable");
                        ctx.run_later(wait, move |act, ctx| {
                            if act.tenure == tenure {
                                act.rebuild_from_stream(ctx, failures + 1)
                            }
                        });
                    }
                }
            },
        ));
    }

    /// Runs a domain command; journals its event (if any) and answers once
    /// everything the book shows is durable (a repeat too, like a change).
    pub(super) fn step<T: 'static>(
        &mut self,
        ctx: &mut Context<Self>,
        command: impl FnOnce(&mut B, u64) -> Result<Outcome<<B as Ledger>::Event, T>, DomainError>,
    ) -> Reply<T> {
        let now = self.env.clock.now_ms();
        match self.shell.change(ctx, |book| command(book, now)) {
            Ok((value, written)) => {
                if written.is_some() {
                    self.maybe_snapshot();
                }
                self.shell.reply_after_all(value)
            }
            Err(e) => Reply::fail(e),
        }
    }

    pub(super) fn read<T: 'static>(&mut self, read: impl FnOnce(&B) -> T) -> Reply<T> {
        match self.shell.live() {
            Ok(live) => {
                let value = read(live.state());
                self.shell.reply_after_all(value)
            }
            Err(e) => Reply::fail(e),
        }
    }
}

impl<B: LedgerBook> Actor for LedgerActor<B> {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        // Callers hold an admission ticket per request (see `core`); this is a backstop.
        ctx.set_mailbox_capacity(self.env.mailbox_capacity + super::UNADMITTED_MESSAGES);
        if self.env.stream.is_some() {
            // Served here without a book and no rebuild under way (restarted while
            // its lease looked over, then renewed with no new `Own`): rebuilt, as
            // `Own` would.
            ctx.run_interval(STRANDED_CHECK, |act, ctx| {
                if act.place.is_here() && act.shell.live().is_err() && !act.rebuilding {
                    tracing::warn!(
                        ledger = B::NAME,
                        shard = act.shard,
                        "served here without a book: rebuilding it from the stream"
                    );
                    act.rebuild_from_stream(ctx, 0);
                }
            });
        }
    }
}

impl<B: LedgerBook> Supervised for LedgerActor<B> {
    fn restarting(&mut self, ctx: &mut Context<Self>) {
        metrics::counter!("kami_actor_restarts_total").increment(1);
        self.shell.clear();
        if self.env.stream.is_some() {
            self.stream = None;
            self.tenure += 1;
            self.rebuilding = false;
            if self.place.is_here() {
                self.rebuild_from_stream(ctx, 0);
            }
            return; // a shard served elsewhere stays without a book
        }
        match self.env.storage.recover_ledger::<B>(self.shard) {
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

impl<B: LedgerBook> Handler<Own> for LedgerActor<B> {
    type Result = ();

    /// This node took the shard's lease: rebuild it from the stream and serve it.
    fn handle(&mut self, _: Own, ctx: &mut Context<Self>) {
        if self.shell.live().is_err() && !self.rebuilding {
            self.rebuild_from_stream(ctx, 0);
        }
    }
}

impl<B: LedgerBook> Handler<Disown> for LedgerActor<B> {
    type Result = ();

    /// The lease was handed over (or lost): the book is dropped at once.
    fn handle(&mut self, _: Disown, _: &mut Context<Self>) {
        self.tenure += 1;
        self.rebuilding = false;
        if self.shell.live().is_ok() {
            tracing::info!(ledger = B::NAME, shard = self.shard, "ledger actor handed over: serving it elsewhere");
        }
        self.shell.clear();
        self.stream = None;
    }
}

/// A ledger message another cluster node may send to the node serving the shard
/// (`POST /api/v1/cluster/ledger/{name}/{shard}/{call}`): the message and its
/// answer travel as bincode, the answer as its [`LedgerCall::Wire`] form.
pub trait LedgerCall:
    Message<Result = ActorResult<Self::Answer>> + serde::Serialize + serde::de::DeserializeOwned + Send + 'static
{
    type Answer: Send + 'static;
    /// The answer as it travels (the answer itself unless it skips fields).
    type Wire: serde::Serialize + serde::de::DeserializeOwned;
    /// Its name in the call's path.
    const NAME: &'static str;
    fn to_wire(answer: Self::Answer) -> Self::Wire;
    fn from_wire(wire: Self::Wire) -> Self::Answer;
}

/// Implements [`LedgerCall`] for messages whose answers travel as they are.
macro_rules! ledger_calls {
    ($($message:ty => $name:literal: $answer:ty),* $(,)?) => {
        $(
            impl $crate::actors::ledger::LedgerCall for $message {
                type Answer = $answer;
                type Wire = $answer;
                const NAME: &'static str = $name;
                fn to_wire(answer: $answer) -> $answer {
                    answer
                }
                fn from_wire(wire: $answer) -> $answer {
                    wire
                }
            }
        )*
    };
}
pub(crate) use ledger_calls;
