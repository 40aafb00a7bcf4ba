//! The stock actor: one per product shard, a thin shell around [`domain::Shard`].
//!
//! Every handler goes through the journaled-actor shell ([`super::journaled`]): run
//! the pure domain step (a panic stops the actor, and its supervisor rebuilds it from
//! storage, never from the memory it had), append its events to the shard's journal,
//! and reply only once the flush covering what the answer shows has returned
//! (invariant I4: every 2xx describes durable state). What is particular to stock:
//! the shelf state checked by every step, reads of one order that wait only for that
//! order's own changes, snapshots built off the actor's thread, expiry and archiving
//! ticks.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::prelude::*;

use crate::clock::Clock;
use crate::domain::group::{Group, GroupId, GroupTerms};
use crate::domain::shard::{payment_key, Counts, NewOrder, Outcome, OutgoingTransfer, Payment, Redemption, Tally};
use crate::domain::{DomainError, Event, Order, OrderId, PaymentOutcome, ProductInfo, Shard, ShardAudit, ShardId};
use crate::storage::jetstream::{JetStream, StreamJournal, StreamRecovered};
use crate::storage::{EventLog, Recovered, Storage, StorageError};

pub use super::journaled::{ActorError, ActorResult};
use super::journaled::{Journaled, Machine, Reply, Shell};

/// What every stock actor of the process shares (immutable).
pub struct ShardEnv {
    pub storage: Arc<Storage>,
    /// Where stock shards' journals and snapshots are kept when not in `storage`:
    /// a replicated JetStream stream (`storage.backend = "jetstream"`). Archiving
    /// is then off (settled orders stay in the shard and its snapshots).
    pub stream: Option<JetStream>,
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
    /// A cluster node (`cluster.node`): shards start without state and are rebuilt
    /// from the stream when this node takes their leases ([`Own`]).
    pub clustered: bool,
}

/// Records in the claims index the payments shard `id` holds (a conflict is
/// logged; the audit names it).
pub fn claim_payments(env: &ShardEnv, id: &ShardId, shard: &Shard) {
    for p in shard.payments() {
        let order = crate::domain::OrderId { shard: id.clone(), seq: p.order_seq }.to_string();
        let key = crate::domain::shard::payment_key(&p.channel, &p.payment_id);
        if env.claims.claim(&key, &order).is_err() {
            tracing::error!(payment = %key, %order, "one payment id pays two orders");
        }
    }
}

/// Most orders archived by one tick of a stock actor, and most looked at.
const MAX_ARCHIVED_PER_TICK: usize = 1024;
const MAX_ARCHIVE_SCANNED_PER_TICK: usize = 8192;
/// Most of one buyer's orders a lookup looks at per shard, in memory and in the
/// archive each (the newest): bounds a lookup's turn.
pub const MAX_LOOKUP_ORDERS: usize = 2_000;

/// Durable stock counters of a shard, readable without a message to the actor.
/// Published only once the writes they reflect are durable.
#[derive(Default)]
pub struct ShardGauge {
    inner: Mutex<(u64, Counts)>,
}

impl ShardGauge {
    pub(super) fn publish(&self, seq: u64, counts: Counts) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if seq >= g.0 {
            *g = (seq, counts);
        }
    }

    pub fn get(&self) -> Counts {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).1
    }

    /// The counters with the journal sequence they are as of.
    pub fn read(&self) -> (u64, Counts) {
        *self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counters of the shard as its node published them (a cluster node, for a
    /// shard served elsewhere): taken unless older than what is held.
    pub fn learn(&self, seq: u64, counts: Counts) {
        self.publish(seq, counts);
    }
}

mod messages;

pub use messages::*;

/// A shard rebuilt from storage, whichever backend keeps its journal.
pub struct Rebuilt {
    pub shard: Shard,
    pub journal: Arc<dyn EventLog<Event>>,
    /// The same journal when a replicated stream keeps it (snapshots purge it).
    pub stream: Option<Arc<StreamJournal>>,
    pub last_seq: u64,
    pub journal_bytes: u64,
    pub snapshot_bytes: u64,
    /// Records replayed after the snapshot.
    pub replayed: u64,
}

/// Rebuilds shard `id` from whichever backend keeps it ([`ShardEnv::stream`] or
/// the local storage, read on a blocking thread).
pub async fn rebuild(env: &ShardEnv, id: ShardId, product: ProductInfo) -> Result<Rebuilt, StorageError> {
    match &env.stream {
        Some(js) => Ok(js.recover_shard(&id, &product).await?.into()),
        None => {
            let storage = env.storage.clone();
            let recovered = tokio::task::spawn_blocking(move || storage.recover(&id, &product));
            Ok(recovered.await.map_err(|e| StorageError::Sled(format!("recovery task failed: {e}")))??.into())
        }
    }
}

impl From<Recovered> for Rebuilt {
    fn from(r: Recovered) -> Rebuilt {
        Rebuilt {
            shard: r.shard,
            journal: Arc::new(r.journal),
            stream: None,
            last_seq: r.last_seq,
            journal_bytes: r.journal_bytes,
            snapshot_bytes: r.snapshot_bytes,
            replayed: r.replayed,
        }
    }
}

impl From<StreamRecovered> for Rebuilt {
    fn from(r: StreamRecovered) -> Rebuilt {
        let stream = Arc::new(r.journal);
        Rebuilt {
            shard: r.shard,
            journal: stream.clone(),
            stream: Some(stream),
            last_seq: r.last_seq,
            journal_bytes: r.journal_bytes,
            snapshot_bytes: r.snapshot_bytes,
            replayed: r.replayed,
        }
    }
}

// ---- the actor ----

pub struct ShardActor {
    id: ShardId,
    product: ProductInfo,
    env: Arc<ShardEnv>,
    gauge: Arc<ShardGauge>,
    /// The product's shelf state: off the shelf, the shard takes nothing new.
    shelf: Arc<super::registry::ShelfCell>,
    /// The product's terms of sale, and the version the shard sells on (0: none yet).
    terms: Arc<super::registry::TermsCell>,
    terms_seen: u64,
    /// The shard and its journal (see [`super::journaled`]).
    shell: Shell<Shard>,
    /// Its journal when a replicated stream keeps it (see [`ShardEnv::stream`]).
    stream: Option<Arc<StreamJournal>>,
    /// Where the archiving scan goes on (`Shard::archivable_after`).
    archive_cursor: u64,
    /// `kami_actor_turn_seconds{actor="stock"}`.
    turns: metrics::Histogram,
    /// The last snapshot started, at which record, and its outcome: a snapshot
    /// asked for at that same record joins it instead of writing it again.
    last_snapshot: Option<(u64, SnapshotDone)>,
    /// Whether it is served here (see [`super::place`]).
    place: Arc<super::place::Place>,
    /// Counts the hand-overs of a cluster node's shard ([`Disown`]): a rebuild
    /// begun before one installs nothing after it.
    tenure: u64,
    /// A rebuild from the stream is under way.
    rebuilding: bool,
}

/// A snapshot's outcome, awaited by everyone who asked for it.
type SnapshotDone = futures::future::Shared<futures::future::LocalBoxFuture<'static, ActorResult<()>>>;

impl Machine for Shard {
    type Event = Event;

    /// Counts the event in `kami_order_events_total` (every order it moved: a group's
    /// completion delivers all its members) and `kami_group_events_total`; one debug
    /// line per order event, with the order id, so that one order's life can be
    /// followed in the logs across requests and actors.
    fn journaled(&self, event: &Event, seq: u64, touched: &mut dyn FnMut(u64)) {
        use crate::telemetry::{count_group_event, count_order_events};
        self.tally(event, |t| match t {
            Tally::Orders { event, n } => count_order_events(event, n),
            Tally::Group { event } => count_group_event(event),
            Tally::KeysReceived { keys } => {
                metrics::counter!("kami_key_transfers_total").increment(1);
                metrics::counter!("kami_keys_transferred_total").increment(keys);
            }
        });
        let log_orders = tracing::enabled!(tracing::Level::DEBUG);
        self.orders_moved_by(event, |order| {
            touched(order);
            if log_orders {
                let order_id =
                    OrderId { shard: ShardId::new(self.product().id.clone(), self.shard_index()), seq: order };
                let name = event.order_event_name().unwrap_or("other");
                tracing::debug!(order_id = %order_id, event = name, journal_seq = seq, "order event journaled");
            }
        });
    }
}

impl ShardActor {
    pub fn new(
        env: Arc<ShardEnv>,
        product: ProductInfo,
        gauge: Arc<ShardGauge>,
        (shelf, terms): (Arc<super::registry::ShelfCell>, Arc<super::registry::TermsCell>),
        place: Arc<super::place::Place>,
        recovered: Option<Rebuilt>,
    ) -> ShardActor {
        let id = place.shard.clone();
        let mut actor = ShardActor {
            shell: Shell::new(format!("stock {id}"), None),
            stream: None,
            id,
            product,
            env,
            gauge,
            shelf,
            terms,
            terms_seen: 0,
            archive_cursor: 0,
            turns: metrics::histogram!("kami_actor_turn_seconds", "actor" => "stock"),
            last_snapshot: None,
            place,
            tenure: 0,
            rebuilding: false,
        };
        if let Some(recovered) = recovered {
            actor.install(recovered);
        }
        actor
    }

    fn install(&mut self, r: Rebuilt) {
        self.gauge.publish(r.last_seq, r.shard.counts());
        self.shell.install(Journaled::recovered(r.shard, r.journal, r.last_seq, r.journal_bytes, r.snapshot_bytes));
        self.stream = r.stream;
        self.archive_cursor = 0;
        self.terms_seen = 0;
        self.last_snapshot = None;
    }

    fn shard(&self) -> ActorResult<&Shard> {
        Ok(self.shell.live()?.state())
    }

    /// What the product sells on now, for the next step: whether it is on the shelf,
    /// and its terms if they changed since the shard last took them.
    fn listing(&mut self) -> impl FnOnce(&mut Shard) {
        let retired = !self.shelf.get().sells();
        let terms = (self.terms.version() != self.terms_seen).then(|| self.terms.get());
        if let Some(t) = &terms {
            self.terms_seen = t.version;
        }
        move |shard: &mut Shard| {
            shard.set_retired(retired);
            if let Some(t) = &terms {
                shard.set_terms(&t.terms);
            }
        }
    }

    /// Runs a domain step (see [`Shell::step`]) on the product's current listing.
    fn guarded<T>(&mut self, ctx: &mut Context<Self>, step: impl FnOnce(&mut Shard) -> T) -> ActorResult<T> {
        let listing = self.listing();
        self.shell.step(ctx, |shard| {
            listing(shard);
            step(shard)
        })
    }

    /// Runs a domain command and journals its event (see [`Shell::change`]).
    fn change<T>(
        &mut self,
        ctx: &mut Context<Self>,
        command: impl FnOnce(&mut Shard) -> Result<Outcome<T>, DomainError>,
    ) -> ActorResult<(T, Option<u64>)> {
        let listing = self.listing();
        let changed = self.shell.change(ctx, |shard| {
            listing(shard);
            command(shard)
        })?;
        if changed.1.is_some() {
            self.maybe_snapshot();
        }
        Ok(changed)
    }

    /// Journals `events` (already applied) in one write.
    fn persist(&mut self, ctx: &mut Context<Self>, events: &[Event]) -> ActorResult<()> {
        self.shell.persist(ctx, events)?;
        self.maybe_snapshot();
        Ok(())
    }

    /// Replies with `value` (which shows the journal through `needed`) once that
    /// prefix is durable, then publishes the gauge. Every 2xx thus describes durable
    /// state (I4). The answer waits in the actor's reply line (see [`Reply`]).
    fn reply<T: 'static>(&self, needed: u64, value: T) -> Reply<T> {
        match self.publish_gauge() {
            Ok(publish) => self.shell.reply(needed, value, publish),
            Err(e) => Reply::fail(e),
        }
    }

    /// Publishes the shard's counters as they are now (run once they are durable).
    fn publish_gauge(&self) -> ActorResult<impl FnOnce() + 'static> {
        let live = self.shell.live()?;
        let (seq, counts, gauge) = (live.seq(), live.state().counts(), self.gauge.clone());
        Ok(move || gauge.publish(seq, counts))
    }

    /// Replies with `value` once everything written so far is durable.
    fn reply_after_all<T: 'static>(&self, value: T) -> Reply<T> {
        let needed = self.shell.live().map_or(0, |l| l.seq());
        self.reply(needed, value)
    }

    /// Replies with `value` about order `seq`: after everything written if this step
    /// wrote (`written`), else once that order's own changes are durable.
    fn reply_for_order<T: 'static>(&mut self, seq: u64, written: bool, value: T) -> Reply<T> {
        let needed = match self.shell.live_mut() {
            Ok(live) if written => live.seq(),
            Ok(live) => live.needed_for(seq),
            Err(e) => return Reply::fail(e),
        };
        self.reply(needed, value)
    }

    /// Runs a domain step that makes (or repeats) one order, journals it, and replies
    /// with the order once durable (a repeat: once its own changes are).
    fn order_step(
        &mut self,
        ctx: &mut Context<Self>,
        command: impl FnOnce(&mut Shard) -> Result<Outcome<u64>, DomainError>,
    ) -> Reply<OrderSnapshot> {
        let (seq, written) = match self.change(ctx, command) {
            Ok(changed) => changed,
            Err(e) => return Reply::fail(e),
        };
        match self.order_snapshot(seq, written.is_none()) {
            Ok(view) => self.reply_for_order(seq, written.is_some(), view),
            Err(e) => Reply::fail(e),
        }
    }

    /// Runs a domain step that applied any number of events (none, or one per
    /// bounded batch of keys), journals them in one write, and replies with its
    /// value once everything written so far is durable.
    fn batch_step<T: 'static>(
        &mut self,
        ctx: &mut Context<Self>,
        step: impl FnOnce(&mut Shard) -> (Vec<Event>, T),
    ) -> Reply<T> {
        let (events, value) = match self.guarded(ctx, step) {
            Ok(r) => r,
            Err(e) => return Reply::fail(e),
        };
        if let Err(e) = self.persist(ctx, &events) {
            return Reply::fail(e);
        }
        self.reply_after_all(value)
    }

    /// A group step: journal its event (if any) and answer with the seat once durable.
    fn group_step(
        &mut self,
        ctx: &mut Context<Self>,
        command: impl FnOnce(&mut Shard) -> Result<Outcome<(u64, u64)>, DomainError>,
    ) -> Reply<GroupSeat> {
        let ((group, seq), written) = match self.change(ctx, command) {
            Ok(changed) => changed,
            Err(e) => return Reply::fail(e),
        };
        let seat = self
            .order_snapshot(seq, written.is_none())
            .and_then(|order| Ok(GroupSeat { group: self.group_snapshot(group)?, order }));
        match seat {
            // The group shows other members' orders: wait for everything written so far.
            Ok(seat) => self.reply_after_all(seat),
            Err(e) => Reply::fail(e),
        }
    }

    /// Runs a domain command and replies with its value once everything written so
    /// far is durable.
    fn command<T: 'static>(
        &mut self,
        ctx: &mut Context<Self>,
        command: impl FnOnce(&mut Shard) -> Result<Outcome<T>, DomainError>,
    ) -> Reply<T> {
        match self.change(ctx, command) {
            Ok((value, _)) => self.reply_after_all(value),
            Err(e) => Reply::fail(e),
        }
    }

    /// Answers a read of the shard once everything it shows is durable.
    fn read<T: 'static>(&mut self, ctx: &mut Context<Self>, read: impl FnOnce(&mut Shard) -> T) -> Reply<T> {
        match self.guarded(ctx, read) {
            Ok(value) => self.reply_after_all(value),
            Err(e) => Reply::fail(e),
        }
    }

    fn group_snapshot(&self, seq: u64) -> ActorResult<GroupSnapshot> {
        let shard = self.shard()?;
        let group = shard.group(seq).ok_or(DomainError::GroupNotFound)?;
        let members = group.orders.iter().filter_map(|&o| shard.order(o)).cloned().collect();
        let seats = shard.seats(group);
        Ok(GroupSnapshot {
            group: group.clone(),
            product_id: self.product.id.clone(),
            shard: self.id.shard,
            members,
            seats,
            seats_open: shard.seats_open(group),
        })
    }

    fn order_snapshot(&self, seq: u64, replayed: bool) -> ActorResult<OrderSnapshot> {
        let shard = self.shard()?;
        let Some(order) = shard.order(seq) else {
            if !shard.is_archived(seq) {
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
                pricing: archived.pricing,
            });
        };
        let keys = if order.status == crate::domain::OrderStatus::Delivered {
            order.keys.iter().map(|&k| shard.key(k).to_string()).collect()
        } else {
            Vec::new()
        };
        Ok(OrderSnapshot {
            order: order.clone(),
            product_id: self.product.id.clone(),
            shard: self.id.shard,
            keys,
            replayed,
            group: shard.group_of_order(seq),
            pricing: shard.pricing(seq).cloned(),
        })
    }

    /// Orders after `m.after` that the filter keeps, in sequence order: those in
    /// memory and those archived alike, looking at no more than `m.max_scan`.
    fn list_orders(&self, m: &ListOrders) -> ActorResult<ListedOrders> {
        let shard = self.shard()?;
        let end = shard.orders_created();
        let mut listed = ListedOrders { orders: Vec::new(), scanned: 0, last_scanned: m.after, at_end: false };
        let mut seq = m.after;
        while seq < end && listed.orders.len() < m.limit && (listed.scanned as usize) < m.max_scan {
            seq += 1;
            listed.scanned += 1;
            let keep = match shard.order(seq) {
                Some(order) => m.filter.matches(order, shard.pricing(seq)),
                // Archived: read it to know (it no longer changes).
                None => true,
            };
            if keep {
                let view = self.order_snapshot(seq, false)?;
                if m.filter.matches(&view.order, view.pricing.as_ref()) {
                    listed.orders.push(view);
                }
            }
        }
        listed.last_scanned = seq;
        listed.at_end = seq >= end;
        Ok(listed)
    }

    /// [`LookupOrders`]: the buyer's orders in memory from the shard's index, the
    /// archived ones from the archive's; the newest [`MAX_LOOKUP_ORDERS`] of each.
    fn lookup_orders(&self, m: &LookupOrders) -> ActorResult<Vec<OrderSnapshot>> {
        use crate::domain::lookup::{same, LookupPosition};
        let shard = self.shard()?;
        let at = |created_at_ms, seq| LookupPosition {
            created_at_ms,
            product: self.product.id.clone(),
            shard: self.id.shard,
            seq,
        };
        let mut found = Vec::new();
        for seq in shard.orders_opened_by(&m.buyer, &m.password).into_iter().take(MAX_LOOKUP_ORDERS) {
            let order = shard.order(seq).expect("indexed orders are in memory");
            found.push((at(order.created_at_ms, seq), None));
        }
        for (seq, stored) in self.env.storage.archived_lookups(&self.id, &m.buyer, MAX_LOOKUP_ORDERS)? {
            // An entry for an order still in memory was written by an archiving
            // that was not journaled: the order's own password decided above.
            if shard.order(seq).is_some() || !shard.is_archived(seq) || !same(&stored, &m.password) {
                continue;
            }
            let view = self.order_snapshot(seq, false)?;
            // (The archive's index is by a digest of the buyer.)
            if view.order.buyer == m.buyer {
                found.push((at(view.order.created_at_ms, seq), Some(view)));
            }
        }
        found.retain(|(position, _)| m.after.as_ref().is_none_or(|after| position.is_after(after)));
        found.sort_by(|a, b| a.0.cmp(&b.0));
        found.truncate(m.limit);
        found
            .into_iter()
            .map(|(position, view)| view.map_or_else(|| self.order_snapshot(position.seq, false), Ok))
            .collect()
    }

    /// [`OrderWithPassword`].
    fn order_with_password(
        &self,
        seq: u64,
    ) -> ActorResult<(OrderSnapshot, Option<crate::domain::lookup::PasswordHash>)> {
        let shard = self.shard()?;
        let view = self.order_snapshot(seq, false)?;
        let password = match shard.order(seq) {
            Some(_) => shard.password(seq).copied(),
            None => self.env.storage.archived_password(&self.id, &view.order.buyer, seq)?,
        };
        Ok((view, password))
    }

    /// Snapshots when the journal since the last snapshot outgrew the snapshot itself
    /// (and the configured minimum), so recovery reads at most about twice the state.
    /// One snapshot at a time: the next waits until the last one is stored.
    fn maybe_snapshot(&mut self) {
        let due = self.shell.live().is_ok_and(|l| l.snapshot_due(self.env.snapshot_min_journal_bytes));
        if due {
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
    ///
    /// Asked again at the record of the last snapshot (nothing journaled since),
    /// the answer is that snapshot's: while it is being stored, or once it is
    /// durable. Only a failed one is taken again.
    fn snapshot_now(&mut self) -> ActorResult<ResponseFuture<ActorResult<()>>> {
        let at = self.shell.live()?.seq();
        if let Some((last, done)) = &self.last_snapshot {
            if *last == at && !matches!(done.peek(), Some(Err(_))) {
                return Ok(Box::pin(done.clone()));
            }
        }
        let id = self.id.clone();
        let product = self.product.clone();
        let storage = self.env.storage.clone();
        let slot = self.shell.live_mut()?.begin_snapshot()?;
        let (seq, size_hint) = (slot.seq, slot.size_hint());
        let started = std::time::Instant::now();
        let (done_tx, done_rx) = futures::channel::oneshot::channel();
        let on_stream = match (&self.env.stream, &self.stream) {
            (Some(js), Some(journal)) => Some((js.clone(), journal.clone())),
            _ => None,
        };
        actix_rt::spawn(async move {
            let stored = match on_stream {
                Some((js, journal)) => snapshot_on_stream(js, journal, id.clone(), product, seq, size_hint).await,
                None => snapshot_locally(storage.clone(), id.clone(), product, seq, size_hint).await,
            };
            let local = stored.as_ref().is_ok_and(|(_, trim)| *trim);
            let size = stored.as_ref().map_or(0, |(size, _)| *size);
            if size > 0 {
                slot.stored(size);
            }
            // Durable once stored: `put_snapshot` flushes the snapshot database, a
            // stream acknowledges what it stored.
            let durable = stored.map(|_| ());
            drop(slot);
            metrics::histogram!("kami_snapshot_seconds").record(started.elapsed().as_secs_f64());
            tracing::debug!(shard = %id, seq, bytes = size, "snapshot written");
            let _ = done_tx.send(durable.map_err(ActorError::from));
            if local {
                // Removing a journal's worth of records takes long enough to stall
                // every order of this arbiter: off the actor's thread. Appends
                // meanwhile only add records above `seq`. (A stream's journal was
                // purged as the snapshot was stored.)
                let trimmed = tokio::task::spawn_blocking(move || {
                    storage.journal(&id).and_then(|journal| storage.trim(&id, &journal, seq)).map_err(|e| (id, e))
                });
                if let Ok(Err((id, e))) = trimmed.await {
                    tracing::warn!(shard = %id, error = %e, "trimming the journal failed");
                }
            }
        });
        let done: SnapshotDone =
            futures::FutureExt::shared(Box::pin(async move { done_rx.await.unwrap_or(Err(ActorError::Unavailable)) })
                as futures::future::LocalBoxFuture<'static, _>);
        self.last_snapshot = Some((seq, done.clone()));
        Ok(Box::pin(done))
    }

    /// Moves settled orders that have not changed for `archive_after_ms` out of
    /// memory, in two steps: their records are written to the archive, and once a
    /// flush has made those durable, `OrdersArchived` is journaled for the ones still
    /// unchanged ([`Shard::archive_written`]). The journal never says an order left
    /// memory before its archive record is durable; a crash in between leaves the
    /// orders in memory, archived again later.
    ///
    /// Off when a replicated stream keeps the shard: the archive is in this host's
    /// storage, which the next owner of the shard would not have.
    fn archive(&mut self, ctx: &mut Context<Self>) {
        if self.env.stream.is_some() {
            return;
        }
        let now = self.env.clock.now_ms();
        let Ok(shard) = self.shard() else { return };
        let (seqs, next) = shard.archivable_after(
            self.archive_cursor,
            now,
            self.env.archive_after_ms,
            MAX_ARCHIVE_SCANNED_PER_TICK,
            MAX_ARCHIVED_PER_TICK,
        );
        let records: Vec<_> = seqs.iter().filter_map(|&seq| shard.archive_record(seq)).collect();
        let passwords: Vec<_> = records.iter().map(|r| shard.password(r.order.seq).copied()).collect();
        self.archive_cursor = next;
        if records.is_empty() {
            return;
        }
        let ticket =
            self.env.storage.archive_orders(&self.id, &records, &passwords).and_then(|()| self.env.storage.ticket());
        let ticket = match ticket {
            Ok(ticket) => ticket,
            Err(e) => {
                return tracing::warn!(shard = %self.id, error = %e, "archiving orders failed; they stay in memory");
            }
        };
        ctx.spawn(actix::fut::wrap_future::<_, Self>(ticket.wait()).map(move |flushed, act, ctx| match flushed {
            Ok(()) => act.journal_archived(ctx, &records),
            Err(e) => tracing::warn!(shard = %act.id, error = %e, "archive not flushed; the orders stay in memory"),
        }));
    }

    /// The second step of [`ShardActor::archive`], once the records are durable.
    fn journal_archived(&mut self, ctx: &mut Context<Self>, written: &[crate::domain::shard::ArchivedOrder]) {
        let _turn = super::Turn::start(&self.turns);
        let now = self.env.clock.now_ms();
        let (min_age, keep) = (self.env.archive_after_ms, self.env.idempotency_ttl_ms);
        let Ok(Some(event)) = self.guarded(ctx, |s| s.archive_written(written, now, min_age, keep)) else {
            return;
        };
        if let Err(e) = self.persist(ctx, &[event]) {
            tracing::warn!(shard = %self.id, error = %e, "journaling archived orders failed");
        }
    }

    /// Expires due reservations (at most `max_expired_per_tick`); returns how many.
    fn expire(&mut self, ctx: &mut Context<Self>) -> usize {
        let now = self.env.clock.now_ms();
        let due = self.shard().ok().and_then(|s| s.next_expiry()).is_some_and(|at| at <= now);
        if !due {
            return 0;
        }
        let max = self.env.max_expired_per_tick;
        let Ok(events) = self.guarded(ctx, |s| s.expire_due(now, max)) else { return 0 };
        if events.is_empty() {
            return 0;
        }
        match self.persist(ctx, &events) {
            Ok(()) => {
                // Publishes the gauge once the expiries are durable.
                self.reply_after_all(()).detach();
            }
            Err(e) => tracing::warn!(shard = %self.id, error = %e, "expiry not yet flushed"),
        }
        events.len()
    }
}

/// Stores a snapshot of shard `id` as of record `seq` in the local storage: a copy
/// rebuilt from the stored snapshot and the journal, encoded and written on a
/// blocking thread. Returns its size and that the journal it covers is to be trimmed.
async fn snapshot_locally(
    storage: Arc<Storage>,
    id: ShardId,
    product: ProductInfo,
    seq: u64,
    size_hint: usize,
) -> Result<(usize, bool), StorageError> {
    // A snapshot is never durable before the records it covers: the roll wrote
    // them to the journal's file, a flush taken now syncs them. (The snapshot
    // database is flushed by `put_snapshot`, not by group commit.)
    storage.ticket()?.wait().await?;
    let put = tokio::task::spawn_blocking(move || {
        let copy = storage.shard_as_of(&id, &product, seq)?;
        let bytes = Storage::encode_snapshot(copy.shard(), size_hint);
        drop(copy);
        let size = bytes.len();
        storage.put_snapshot(&id, seq, bytes)?;
        crate::chaos::reached(crate::chaos::CrashPoint::AfterSnapshot, || {
            let _ = storage.flush_now();
        });
        Ok((size, true))
    });
    put.await.map_err(|e| StorageError::Sled(format!("snapshot task failed: {e}")))?
}

/// Stores a snapshot of shard `id` as of record `seq` in the replicated stream,
/// once the stream acknowledged the journal through it: a copy rebuilt from the
/// stream (replayed and encoded on a blocking thread), stored, then the journal
/// messages it covers purged. Returns its size (nothing left to trim).
async fn snapshot_on_stream(
    js: JetStream,
    journal: Arc<StreamJournal>,
    id: ShardId,
    product: ProductInfo,
    seq: u64,
    size_hint: usize,
) -> Result<(usize, bool), StorageError> {
    EventLog::<Event>::ticket(&*journal)?.wait().await?;
    let copy = js.shard_as_of(&id, &product, seq).await?;
    let encoded = tokio::task::spawn_blocking(move || Storage::encode_snapshot(&copy, size_hint));
    let bytes = encoded.await.map_err(|e| StorageError::Remote(format!("snapshot task failed: {e}")))?;
    js.store_shard_snapshot(&id, &journal, seq, &bytes).await?;
    Ok((bytes.len(), false))
}

impl Actor for ShardActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        // Admission permits (held by callers) keep the queue under `mailbox_capacity`;
        // the margin covers messages sent without a permit (audit, snapshot, kill).
        ctx.set_mailbox_capacity(self.env.mailbox_capacity + super::UNADMITTED_MESSAGES);
        ctx.run_interval(self.env.expiry_tick, |act, ctx| {
            let _turn = super::Turn::start(&act.turns);
            act.expire(ctx);
            act.archive(ctx);
            act.rebuild_if_stranded(ctx);
        });
    }
}

/// Longest wait between two tries to rebuild a shard from the stream.
const MAX_REBUILD_BACKOFF: Duration = Duration::from_secs(5);

/// The wait before the next try to rebuild an actor from the stream, after
/// `failures` failed tries (stock and ledger actors alike).
pub(super) fn rebuild_backoff(failures: u32) -> Duration {
    (Duration::from_millis(100) * 2u32.saturating_pow(failures.min(16))).min(MAX_REBUILD_BACKOFF)
}

impl ShardActor {
    /// Rebuilds the shard from the replicated stream (off the actor's turn: until it
    /// is installed, every request is answered unavailable). A failed try (servers
    /// unreachable, no quorum) is tried again, waiting longer each time.
    fn rebuild_from_stream(&mut self, ctx: &mut Context<Self>, failures: u32) {
        let Some(js) = self.env.stream.clone() else { return };
        let (id, product, tenure) = (self.id.clone(), self.product.clone(), self.tenure);
        self.rebuilding = true;
        let rebuild = async move { js.recover_shard(&id, &product).await };
        ctx.spawn(actix::fut::wrap_future::<_, Self>(rebuild).map(move |rebuilt, act, ctx| {
            if act.tenure != tenure {
                // Handed over meanwhile: what was read may be outdated already.
                return;
            }
            match rebuilt {
                Ok(r) => {
                    act.rebuilding = false;
                    claim_payments(&act.env, &act.id, &r.shard);
                    tracing::info!(shard = %act.id, replayed = r.replayed, elapsed_ms = r.elapsed.as_millis() as u64, "stock actor rebuilt from the stream");
                    act.install(r.into());
                }
                Err(e) => {
                    let wait =
                        rebuild_backoff(failures);
                    tracing::error!(shard = %act.id, error = %e, retry_ms = wait.as_millis() as u64, "stock actor could not rebuild from the stream; answering unavailable");
                    ctx.run_later(wait, move |act, ctx| {
                        if act.tenure == tenure {
                            act.rebuild_from_stream(ctx, failures + 1)
                        }
                    });
                }
            }
        }));
    }
}

impl ShardActor {
    /// A shard served here without state and no rebuild under way (restarted while
    /// its lease looked over, then renewed with no new [`Own`]): rebuilt now, as
    /// `Own` would.
    fn rebuild_if_stranded(&mut self, ctx: &mut Context<Self>) {
        if self.env.stream.is_some() && self.place.is_here() && self.shell.live().is_err() && !self.rebuilding {
            tracing::warn!(shard = %self.id, "served here without state: rebuilding it from the stream");
            self.rebuild_from_stream(ctx, 0);
        }
    }
}

/// A cluster node took the shard's lease: rebuild it from the stream and serve it.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Own;

/// A cluster node handed the shard's lease over (or lost it): drop its state at
/// once; every request is answered unavailable (the caller forwards it).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Disown;

impl Handler<Own> for ShardActor {
    type Result = ();

    fn handle(&mut self, _: Own, ctx: &mut Context<Self>) {
        if self.shell.live().is_err() && !self.rebuilding {
            self.rebuild_from_stream(ctx, 0);
        }
    }
}

impl Handler<Disown> for ShardActor {
    type Result = ();

    fn handle(&mut self, _: Disown, _: &mut Context<Self>) {
        self.tenure += 1;
        self.rebuilding = false;
        if self.shell.live().is_ok() {
            tracing::info!(shard = %self.id, "stock actor handed over: serving it elsewhere");
        }
        self.shell.clear();
        self.stream = None;
        self.last_snapshot = None;
    }
}

impl Supervised for ShardActor {
    /// actix hands back the same struct on restart; never trust its memory.
    fn restarting(&mut self, ctx: &mut Context<Self>) {
        metrics::counter!("kami_actor_restarts_total").increment(1);
        self.shell.clear();
        if self.env.stream.is_some() {
            self.stream = None;
            self.tenure += 1;
            self.rebuilding = false;
            if !self.place.is_here() {
                // A cluster node's shard served elsewhere stays without state.
                return;
            }
            return self.rebuild_from_stream(ctx, 0);
        }
        match self.env.storage.recover(&self.id, &self.product) {
            Ok(r) => {
                tracing::info!(shard = %self.id, replayed = r.replayed, elapsed_ms = r.elapsed.as_millis() as u64, "stock actor rebuilt from storage");
                self.install(r.into());
            }
            Err(e) => {
                tracing::error!(shard = %self.id, error = %e, "stock actor could not rebuild; answering unavailable")
            }
        }
    }
}

impl Handler<ImportKeys> for ShardActor {
    type Result = Reply<(u64, u64)>;

    fn handle(&mut self, msg: ImportKeys, ctx: &mut Context<Self>) -> Self::Result {
        let _turn = super::Turn::start(&self.turns);
        self.batch_step(ctx, |s| {
            let (events, imported, duplicates) = s.import_keys(msg.0);
            (events, (imported, duplicates))
        })
    }
}

impl Handler<WithdrawKeys> for ShardActor {
    type Result = Reply<(u64, Vec<crate::domain::shard::KeyFate>)>;

    fn handle(&mut self, msg: WithdrawKeys, ctx: &mut Context<Self>) -> Self::Result {
        let _turn = super::Turn::start(&self.turns);
        self.batch_step(ctx, |s| {
            let (events, withdrawn, fates) = s.withdraw(&msg.0);
            (events, (withdrawn, fates))
        })
    }
}

impl Handler<CreateOrder> for ShardActor {
    type Result = Reply<OrderSnapshot>;

    fn handle(&mut self, msg: CreateOrder, ctx: &mut Context<Self>) -> Self::Result {
        let _turn = super::Turn::start(&self.turns);
        let now = self.env.clock.now_ms();
        self.order_step(ctx, |s| s.create_order(msg.0, now))
    }
}

impl Handler<Redeem> for ShardActor {
    type Result = Reply<OrderSnapshot>;

    fn handle(&mut self, msg: Redeem, ctx: &mut Context<Self>) -> Self::Result {
        let _turn = super::Turn::start(&self.turns);
        let now = self.env.clock.now_ms();
        self.order_step(ctx, |s| s.redeem(msg.0, now))
    }
}

impl Handler<PayOrder> for ShardActor {
    type Result = Reply<PaymentOutcome>;

    fn handle(&mut self, msg: PayOrder, ctx: &mut Context<Self>) -> Self::Result {
        let _turn = super::Turn::start(&self.turns);
        // What fell due is settled first: a group past its deadline fails before a
        // payment could complete it, whenever the next expiry tick would have come.
        self.expire(ctx);
        let now = self.env.clock.now_ms();
        let order_seq = msg.0.order_seq;
        if let Err(e) = self.claim_payment(&msg.0) {
            return Reply::fail(e);
        }
        match self.change(ctx, |s| s.pay(msg.0, now)) {
            Ok((outcome, written)) => self.reply_for_order(order_seq, written.is_some(), outcome),
            Err(e) => Reply::fail(e),
        }
    }
}

impl ShardActor {
    /// A payment id pays one order in the whole process, not only in this shard:
    /// claimed in the process-wide index before the shard records it (see
    /// [`super::claims`]).
    fn claim_payment(&self, p: &Payment) -> Result<(), ActorError> {
        let known = self.shard().is_ok_and(|s| s.order(p.order_seq).is_some() || s.is_archived(p.order_seq));
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

impl Handler<GetOrder> for ShardActor {
    type Result = Reply<OrderSnapshot>;

    fn handle(&mut self, msg: GetOrder, _ctx: &mut Context<Self>) -> Self::Result {
        let _turn = super::Turn::start(&self.turns);
        let view = match self.order_snapshot(msg.seq, false) {
            Ok(v) => v,
            Err(e) => return Reply::fail(e),
        };
        if msg.token.is_some_and(|token| !view.order.token_matches(&token)) {
            return Reply::fail(DomainError::OrderNotFound);
        }
        self.reply_for_order(msg.seq, false, view)
    }
}

impl Handler<FindIdempotent> for ShardActor {
    type Result = Reply<Option<OrderSnapshot>>;

    fn handle(&mut self, msg: FindIdempotent, _ctx: &mut Context<Self>) -> Self::Result {
        let _turn = super::Turn::start(&self.turns);
        let seq = match self.shard() {
            Ok(s) => s.order_for_key(&msg.key),
            Err(e) => return Reply::fail(e),
        };
        let Some(seq) = seq else { return Reply::Now(Ok(None)) };
        let view = match self.order_snapshot(seq, false) {
            Ok(v) => v,
            Err(e) => return Reply::fail(e),
        };
        self.reply_for_order(seq, false, view).map(Some)
    }
}

impl Handler<CancelOrder> for ShardActor {
    type Result = Reply<OrderSnapshot>;

    fn handle(&mut self, msg: CancelOrder, ctx: &mut Context<Self>) -> Self::Result {
        let _turn = super::Turn::start(&self.turns);
        let authorised = match self.order_snapshot(msg.seq, false) {
            Ok(view) => view.order.token_matches(&msg.token).then_some(view.order.status),
            Err(e) => return Reply::fail(e),
        };
        let Some(status) = authorised else {
            return Reply::fail(DomainError::OrderNotFound);
        };
        if self.shard().is_ok_and(|s| s.is_archived(msg.seq)) {
            return Reply::fail(DomainError::InvalidState { status });
        }
        let now = self.env.clock.now_ms();
        let cancelled = self.change(ctx, |s| s.cancel(msg.seq, now).map(|event| Outcome::Changed(event, ())));
        if let Err(e) = cancelled {
            return Reply::fail(e);
        }
        match self.order_snapshot(msg.seq, false) {
            Ok(view) => self.reply_for_order(msg.seq, true, view),
            Err(e) => Reply::fail(e),
        }
    }
}

impl Handler<CountOpenOrders> for ShardActor {
    type Result = Reply<crate::domain::shelf::OpenOrders>;

    fn handle(&mut self, _: CountOpenOrders, ctx: &mut Context<Self>) -> Self::Result {
        let _turn = super::Turn::start(&self.turns);
        self.read(ctx, |s| s.open_orders())
    }
}

impl Handler<Audit> for ShardActor {
    type Result = Reply<ShardAudit>;

    fn handle(&mut self, _: Audit, ctx: &mut Context<Self>) -> Self::Result {
        let _turn = super::Turn::start(&self.turns);
        self.read(ctx, |s| s.audit())
    }
}

impl Handler<GetPaymentWork> for ShardActor {
    type Result = Reply<PaymentWork>;

    fn handle(&mut self, m: GetPaymentWork, ctx: &mut Context<Self>) -> Self::Result {
        let _turn = super::Turn::start(&self.turns);
        let expired_now = self.expire(ctx);
        let now = self.env.clock.now_ms();
        self.read(ctx, |s| PaymentWork {
            unheard: s.unheard(now, m.quiet_ms, m.grace_ms, m.max_unheard),
            refunds: s.refunds_due(m.max_refunds),
            expired_now,
            stuck_paid: if m.full { s.stuck_paid(m.max_unheard) } else { Vec::new() },
        })
    }
}

impl Handler<CompleteRefund> for ShardActor {
    type Result = Reply<()>;

    fn handle(&mut self, m: CompleteRefund, ctx: &mut Context<Self>) -> Self::Result {
        let _turn = super::Turn::start(&self.turns);
        let now = self.env.clock.now_ms();
        self.command(ctx, |s| s.complete_refund(&m.channel, &m.payment_id, now))
    }
}

impl Handler<Lend> for ShardActor {
    type Result = Reply<Option<OutgoingTransfer>>;

    fn handle(&mut self, m: Lend, ctx: &mut Context<Self>) -> Self::Result {
        let _turn = super::Turn::start(&self.turns);
        self.command(ctx, |s| {
            Ok(match s.lend(m.to, m.max_keys) {
                Some((event, transfer)) => Outcome::Changed(event, Some(transfer)),
                None => Outcome::Repeat(None),
            })
        })
    }
}

impl Handler<Receive> for ShardActor {
    type Result = Reply<()>;

    fn handle(&mut self, m: Receive, ctx: &mut Context<Self>) -> Self::Result {
        let _turn = super::Turn::start(&self.turns);
        self.command(ctx, |s| Ok(s.receive(m.0)))
    }
}

impl Handler<SettleTransfer> for ShardActor {
    type Result = Reply<()>;

    fn handle(&mut self, m: SettleTransfer, ctx: &mut Context<Self>) -> Self::Result {
        let _turn = super::Turn::start(&self.turns);
        self.command(ctx, |s| Ok(s.settle(m.0)))
    }
}

impl Handler<ListUnsettled> for ShardActor {
    type Result = Reply<Vec<OutgoingTransfer>>;

    fn handle(&mut self, m: ListUnsettled, ctx: &mut Context<Self>) -> Self::Result {
        let _turn = super::Turn::start(&self.turns);
        self.read(ctx, |s| s.unsettled(m.limit))
    }
}

impl Handler<OpenGroup> for ShardActor {
    type Result = Reply<GroupSeat>;

    fn handle(&mut self, m: OpenGroup, ctx: &mut Context<Self>) -> Self::Result {
        let _turn = super::Turn::start(&self.turns);
        let now = self.env.clock.now_ms();
        self.group_step(ctx, |s| s.open_group(&m.terms, m.order, now))
    }
}

impl Handler<JoinGroup> for ShardActor {
    type Result = Reply<GroupSeat>;

    fn handle(&mut self, m: JoinGroup, ctx: &mut Context<Self>) -> Self::Result {
        let _turn = super::Turn::start(&self.turns);
        let now = self.env.clock.now_ms();
        self.group_step(ctx, |s| s.join_group(m.group, m.order, now))
    }
}

impl Handler<JoinAnyGroup> for ShardActor {
    type Result = Reply<GroupSeat>;

    fn handle(&mut self, m: JoinAnyGroup, ctx: &mut Context<Self>) -> Self::Result {
        let _turn = super::Turn::start(&self.turns);
        let now = self.env.clock.now_ms();
        self.group_step(ctx, |s| s.join_any(&m.terms, m.order, now))
    }
}

impl Handler<GetGroup> for ShardActor {
    type Result = Reply<GroupSnapshot>;

    fn handle(&mut self, m: GetGroup, _ctx: &mut Context<Self>) -> Self::Result {
        let _turn = super::Turn::start(&self.turns);
        match self.group_snapshot(m.0) {
            Ok(view) => self.reply_after_all(view),
            Err(e) => Reply::fail(e),
        }
    }
}

impl Handler<GetPayment> for ShardActor {
    type Result = Reply<Option<crate::domain::PaymentRecord>>;

    fn handle(&mut self, m: GetPayment, _ctx: &mut Context<Self>) -> Self::Result {
        let _turn = super::Turn::start(&self.turns);
        match self.shard() {
            Ok(s) => {
                let record = s.payment(&m.channel, &m.payment_id).cloned();
                self.reply_after_all(record)
            }
            Err(e) => Reply::fail(e),
        }
    }
}

impl Handler<ListOpenGroups> for ShardActor {
    type Result = Reply<Vec<GroupSnapshot>>;

    fn handle(&mut self, m: ListOpenGroups, _ctx: &mut Context<Self>) -> Self::Result {
        let _turn = super::Turn::start(&self.turns);
        let now = self.env.clock.now_ms();
        let open = match self.shard() {
            Ok(shard) => shard.open_groups_of(&m.deal_id, now, m.limit),
            Err(e) => return Reply::fail(e),
        };
        match open.into_iter().map(|g| self.group_snapshot(g)).collect::<ActorResult<Vec<_>>>() {
            Ok(list) => self.reply_after_all(list),
            Err(e) => Reply::fail(e),
        }
    }
}

impl Handler<ListOrders> for ShardActor {
    type Result = Reply<ListedOrders>;

    fn handle(&mut self, m: ListOrders, _ctx: &mut Context<Self>) -> Self::Result {
        let _turn = super::Turn::start(&self.turns);
        match self.list_orders(&m) {
            Ok(listed) => self.reply_after_all(listed),
            Err(e) => Reply::fail(e),
        }
    }
}

impl Handler<LookupOrders> for ShardActor {
    type Result = Reply<Vec<OrderSnapshot>>;

    fn handle(&mut self, m: LookupOrders, _ctx: &mut Context<Self>) -> Self::Result {
        let _turn = super::Turn::start(&self.turns);
        match self.lookup_orders(&m) {
            Ok(found) => self.reply_after_all(found),
            Err(e) => Reply::fail(e),
        }
    }
}

impl Handler<OrderWithPassword> for ShardActor {
    type Result = Reply<(OrderSnapshot, Option<crate::domain::lookup::PasswordHash>)>;

    fn handle(&mut self, m: OrderWithPassword, _ctx: &mut Context<Self>) -> Self::Result {
        let _turn = super::Turn::start(&self.turns);
        match self.order_with_password(m.seq) {
            Ok(found) => self.reply_for_order(m.seq, false, found),
            Err(e) => Reply::fail(e),
        }
    }
}

impl Handler<ListKeys> for ShardActor {
    type Result = Reply<ListedKeys>;

    fn handle(&mut self, m: ListKeys, ctx: &mut Context<Self>) -> Self::Result {
        let _turn = super::Turn::start(&self.turns);
        self.read(ctx, |s| {
            let (keys, at_end) = s.keys_in(m.state, m.after, m.limit);
            ListedKeys { keys: keys.into_iter().map(|(id, k)| (id, k.to_string())).collect(), at_end }
        })
    }
}

impl Handler<TakeSnapshot> for ShardActor {
    type Result = Reply<()>;

    fn handle(&mut self, _: TakeSnapshot, _ctx: &mut Context<Self>) -> Self::Result {
        let _turn = super::Turn::start(&self.turns);
        match self.snapshot_now() {
            Ok(durable) => durable.into(),
            Err(e) => Reply::fail(e),
        }
    }
}

impl Handler<Kill> for ShardActor {
    type Result = ();

    fn handle(&mut self, _: Kill, ctx: &mut Context<Self>) {
        let _turn = super::Turn::start(&self.turns);
        tracing::warn!(shard = %self.id, "stock actor killed on request");
        self.shell.stop(ctx);
    }
}

impl Handler<InjectPanic> for ShardActor {
    type Result = Reply<()>;

    fn handle(&mut self, _: InjectPanic, ctx: &mut Context<Self>) -> Self::Result {
        let _turn = super::Turn::start(&self.turns);
        self.read(ctx, |_| panic!("injected panic"))
    }
}
