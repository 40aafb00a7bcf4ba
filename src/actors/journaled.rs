//! The one shell every journaled actor is built from (stock shards and points shards).
//!
//! A journaled actor owns a pure domain state machine `S` whose changes are events
//! `E`. Every request goes the same way:
//! 1. [`Shell::step`] runs the domain step under `catch_unwind`; a panic drops the
//!    state and stops the actor, and its supervisor rebuilds it from storage, never
//!    from the memory it had;
//! 2. [`Shell::persist`] appends the step's events to the journal in one write (a
//!    failed append also drops the state: memory would be ahead of the journal);
//! 3. [`Shell::reply`] answers once the group commit covering what the answer shows
//!    has flushed (invariant I4: every 2xx describes durable state), through the
//!    actor's reply line: one flush ticket per turn of the actor, not per answer.
//!
//! The actor does not wait for the flush itself: it goes on with its next message, so
//! one flush serves many requests of many actors. The shell also keeps the one
//! durability tracker (which prefix of the journal is known durable, and which keys,
//! e.g. orders, still have changes waiting for a flush) and the snapshot bookkeeping
//! (journal written since the last snapshot, one snapshot at a time).

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::sync::Arc;

use actix::prelude::*;

use crate::domain::{DomainError, Outcome};
use crate::storage::{EventLog, StorageError, Ticket};

/// Why a journaled actor could not answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ActorError {
    #[error(transparent)]
    Domain(#[from] DomainError),
    #[error("storage: {0}")]
    Storage(#[from] StorageError),
    /// The actor crashed while handling the request or could not rebuild itself.
    #[error("the actor is restarting")]
    Unavailable,
}

pub type ActorResult<T> = Result<T, ActorError>;

/// A domain state machine a journaled actor owns: its commands return
/// [`Outcome`]s whose events the shell journals.
pub trait Machine {
    type Event: serde::Serialize;

    /// Called once for each event just written as journal record `seq`: calls
    /// `touched` with each key (e.g. order) the event changed, so that a read of that
    /// key waits for the flush covering it, and counts the event in the metrics.
    fn journaled(&self, event: &Self::Event, seq: u64, touched: &mut dyn FnMut(u64));
}

/// What a journaled actor holds while it is live: its state, its journal (either
/// backend, see [`EventLog`]) and what is known about their durability.
pub struct Journaled<S: Machine> {
    state: S,
    journal: Arc<dyn EventLog<S::Event>>,
    /// Sequence of the last journal record written (durable or not).
    seq: u64,
    /// Highest sequence known to be durable. Shared with reply futures.
    durable: Rc<Cell<u64>>,
    /// Answers waiting for a flush (see [`Reply`]), and how their flush task takes
    /// its ticket (made once, shared by every answer).
    line: Rc<RefCell<ReplyLine>>,
    ticket: TicketSource,
    /// Keys (e.g. orders) whose last change may not be durable yet: key → journal seq
    /// of that change, with a queue in journal order to forget them once durable.
    /// Bounded by the writes in flight. Lets a read of one key skip the flush wait
    /// when only other keys have unflushed changes.
    undurable: HashMap<u64, u64>,
    undurable_queue: VecDeque<(u64, u64)>,
    journal_bytes_since_snapshot: u64,
    /// Size of the last snapshot (set once it is encoded, maybe off this thread).
    last_snapshot_bytes: Rc<Cell<u64>>,
    /// A snapshot is being stored (at most one at a time).
    snapshot_in_flight: Rc<Cell<bool>>,
}

impl<S: Machine> Journaled<S>
where
    S::Event: 'static,
{
    /// State rebuilt from storage, whose journal ends at `last_seq`.
    pub fn recovered(
        state: S,
        journal: Arc<dyn EventLog<S::Event>>,
        last_seq: u64,
        journal_bytes: u64,
        snapshot_bytes: u64,
    ) -> Self {
        Journaled {
            state,
            journal: journal.clone(),
            seq: last_seq,
            // Recovered state may include writes read back before any flush: nothing
            // counts as durable until the first flush after the start.
            durable: Rc::new(Cell::new(0)),
            line: Rc::default(),
            ticket: Rc::new(move || journal.ticket()),
            undurable: HashMap::new(),
            undurable_queue: VecDeque::new(),
            journal_bytes_since_snapshot: journal_bytes,
            last_snapshot_bytes: Rc::new(Cell::new(snapshot_bytes)),
            snapshot_in_flight: Rc::default(),
        }
    }

    pub fn state(&self) -> &S {
        &self.state
    }

    /// Sequence of the last record written.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Records that `key` changed in record `seq` (not yet known durable).
    #[cfg(test)]
    fn touched(&mut self, key: u64, seq: u64) {
        self.undurable.insert(key, seq);
        self.undurable_queue.push_back((seq, key));
    }

    /// Appends `events` (already applied) as the next records, in one write. Returns
    /// the sequence of the first.
    fn append(&mut self, events: &[S::Event]) -> Result<u64, StorageError> {
        self.forget_durable();
        let first = self.seq + 1;
        let bytes = self.journal.append_all(first, events)?;
        self.journal_bytes_since_snapshot += bytes as u64;
        self.seq += events.len() as u64;
        let Journaled { state, undurable, undurable_queue, .. } = self;
        for (seq, event) in (first..).zip(events) {
            state.journaled(event, seq, &mut |key| {
                undurable.insert(key, seq);
                undurable_queue.push_back((seq, key));
            });
        }
        Ok(first)
    }

    /// Forgets changes now known durable. Called on every write and read, so the
    /// map holds only writes still waiting for a flush (bounded by the commit queue).
    fn forget_durable(&mut self) {
        let durable = self.durable.get();
        while let Some(&(jseq, key)) = self.undurable_queue.front() {
            if jseq > durable {
                break;
            }
            self.undurable_queue.pop_front();
            if self.undurable.get(&key) == Some(&jseq) {
                self.undurable.remove(&key);
            }
        }
    }

    /// The journal seq that must be durable before `key` may be shown.
    pub fn needed_for(&mut self, key: u64) -> u64 {
        self.forget_durable();
        self.undurable.get(&key).copied().unwrap_or(0)
    }

    /// Whether the journal has outgrown the last snapshot (and `min_bytes`) and no
    /// snapshot is being stored: so recovery reads at most about twice the state.
    pub fn snapshot_due(&self, min_bytes: u64) -> bool {
        let threshold = min_bytes.max(self.last_snapshot_bytes.get());
        self.journal_bytes_since_snapshot >= threshold && !self.snapshot_in_flight.get()
    }

    /// Starts a snapshot as of the last record: rolls the journal (records after it go
    /// to a new segment, so the trim deletes whole files) and marks one in flight
    /// until the returned slot is finished or dropped.
    pub fn begin_snapshot(&mut self) -> Result<SnapshotSlot, StorageError> {
        self.journal.roll()?;
        self.journal_bytes_since_snapshot = 0;
        self.snapshot_in_flight.set(true);
        Ok(SnapshotSlot {
            seq: self.seq,
            in_flight: self.snapshot_in_flight.clone(),
            last_bytes: self.last_snapshot_bytes.clone(),
        })
    }
}

/// One snapshot being made (see [`Journaled::begin_snapshot`]).
pub struct SnapshotSlot {
    /// The snapshot covers the journal through this record.
    pub seq: u64,
    in_flight: Rc<Cell<bool>>,
    last_bytes: Rc<Cell<u64>>,
}

impl SnapshotSlot {
    /// The size of the last snapshot, a hint for the next encoding.
    pub fn size_hint(&self) -> usize {
        self.last_bytes.get() as usize
    }

    /// The snapshot was encoded at `bytes`: the next one is due after as much journal.
    pub fn stored(&self, bytes: usize) {
        self.last_bytes.set(bytes as u64);
    }
}

impl Drop for SnapshotSlot {
    fn drop(&mut self) {
        self.in_flight.set(false);
    }
}

/// The live state of a journaled actor, or nothing while it is broken or rebuilding
/// (every request is then answered [`ActorError::Unavailable`]).
pub struct Shell<S: Machine> {
    /// Names the actor in logs (`stock p1/0`, `points 3`).
    name: String,
    live: Option<Journaled<S>>,
}

impl<S: Machine> Shell<S>
where
    S::Event: 'static,
{
    pub fn new(name: String, live: Option<Journaled<S>>) -> Self {
        Shell { name, live }
    }

    pub fn live(&self) -> ActorResult<&Journaled<S>> {
        self.live.as_ref().ok_or(ActorError::Unavailable)
    }

    pub fn live_mut(&mut self) -> ActorResult<&mut Journaled<S>> {
        self.live.as_mut().ok_or(ActorError::Unavailable)
    }

    /// Installs state rebuilt from storage.
    pub fn install(&mut self, live: Journaled<S>) {
        self.live = Some(live);
    }

    /// Drops the state (before a rebuild): until then every request is answered
    /// [`ActorError::Unavailable`].
    pub fn clear(&mut self) {
        self.live = None;
    }

    /// Drops the state and stops the actor: its supervisor rebuilds it from storage.
    pub fn stop(&mut self, ctx: &mut impl ActorContext) {
        self.live = None;
        ctx.stop();
    }

    /// Runs a domain step; a panic stops the actor so its supervisor rebuilds it.
    pub fn step<T>(&mut self, ctx: &mut impl ActorContext, step: impl FnOnce(&mut S) -> T) -> ActorResult<T> {
        let live = self.live_mut()?;
        match crate::domain::catch_broken_step(|| step(&mut live.state)) {
            Ok(value) => Ok(value),
            Err(what) => {
                tracing::error!(actor = %self.name, panic = %what, "actor step panicked; restarting it from storage");
                metrics::counter!("kami_actor_panics_total").increment(1);
                self.stop(ctx);
                Err(ActorError::Unavailable)
            }
        }
    }

    /// Journals `events` (already applied) in one write. Returns the sequence of the
    /// first; on failure the actor stops (memory is ahead of the journal).
    pub fn persist(&mut self, ctx: &mut impl ActorContext, events: &[S::Event]) -> ActorResult<u64> {
        match self.live_mut()?.append(events) {
            Ok(first) => Ok(first),
            Err(e) => {
                tracing::error!(actor = %self.name, error = %e, "journal append failed; restarting from storage");
                self.stop(ctx);
                Err(e.into())
            }
        }
    }

    /// Journals the event of a changed outcome. Returns the value and the sequence a
    /// reply showing it must wait for (`None` for a repeat: its caller decides).
    pub fn journal<T>(
        &mut self,
        ctx: &mut impl ActorContext,
        outcome: Outcome<S::Event, T>,
    ) -> ActorResult<(T, Option<u64>)> {
        match outcome {
            Outcome::Repeat(value) => Ok((value, None)),
            Outcome::Changed(event, value) => {
                let seq = self.persist(ctx, std::slice::from_ref(&event))?;
                Ok((value, Some(seq)))
            }
        }
    }

    /// Runs a domain command ([`Shell::step`]) and journals its event if it changed
    /// anything ([`Shell::journal`]).
    pub fn change<T>(
        &mut self,
        ctx: &mut impl ActorContext,
        command: impl FnOnce(&mut S) -> Result<Outcome<S::Event, T>, DomainError>,
    ) -> ActorResult<(T, Option<u64>)> {
        let outcome = self.step(ctx, command)??;
        self.journal(ctx, outcome)
    }

    /// Replies with `value` (which shows the journal through `needed`) once that prefix
    /// is durable: at once if it is known durable, else in the actor's reply line (see
    /// [`Reply`]), with the other answers of this turn, after one flush, then runs
    /// `on_durable`. An answer known durable runs nothing: the answer that waited for
    /// that prefix's flush ran its own.
    pub fn reply<T: 'static>(&self, needed: u64, value: T, on_durable: impl FnOnce() + 'static) -> Reply<T> {
        let live = match self.live() {
            Ok(live) => live,
            Err(e) => return Reply::Now(Err(e)),
        };
        if live.durable.get() >= needed {
            return Reply::Now(Ok(value));
        }
        Reply::InLine(InLine {
            needed,
            value,
            on_durable: Box::new(on_durable),
            line: live.line.clone(),
            durable: live.durable.clone(),
            ticket: live.ticket.clone(),
        })
    }

    /// Replies with `value` once everything written so far is durable.
    pub fn reply_after_all<T: 'static>(&self, value: T) -> Reply<T> {
        let needed = self.live.as_ref().map_or(0, |l| l.seq);
        self.reply(needed, value, || ())
    }
}

/// An answer a journaled actor gives: known now, waiting in the actor's reply line
/// for the flush that makes what it shows durable, or any other future.
///
/// The reply line is what keeps a flash sale's answers cheap: every answer of one
/// turn of the actor's thread (the actor handles what its mailbox holds, then the
/// line's flush task runs) waits on one ticket, taken by that task *after* the
/// turn's appends, and the flush wakes one task per actor rather than one per
/// answer. Invariant I4 holds as with a ticket each: an answer is sent only after a
/// flush that started after every record it shows was appended.
pub enum Reply<T> {
    Now(ActorResult<T>),
    InLine(InLine<T>),
    Later(ResponseFuture<ActorResult<T>>),
}

/// An answer waiting for the journal to be durable through `needed`.
pub struct InLine<T> {
    needed: u64,
    value: T,
    on_durable: Box<dyn FnOnce()>,
    line: Rc<RefCell<ReplyLine>>,
    durable: Rc<Cell<u64>>,
    ticket: TicketSource,
}

/// Takes a commit ticket on a journaled actor's journal.
type TicketSource = Rc<dyn Fn() -> Result<Ticket, StorageError>>;

impl<T: 'static> Reply<T> {
    /// An answer that is already known: a refusal.
    pub fn fail(e: impl Into<ActorError>) -> Self {
        Reply::Now(Err(e.into()))
    }

    /// The same answer with its value mapped.
    pub fn map<U: 'static>(self, f: impl FnOnce(T) -> U + 'static) -> Reply<U> {
        match self {
            Reply::Now(r) => Reply::Now(r.map(f)),
            Reply::InLine(i) => Reply::InLine(InLine {
                needed: i.needed,
                value: f(i.value),
                on_durable: i.on_durable,
                line: i.line,
                durable: i.durable,
                ticket: i.ticket,
            }),
            Reply::Later(fut) => Reply::Later(Box::pin(async move { fut.await.map(f) })),
        }
    }

    /// Hands the answer to `send`: at once, after its future, or once the flush its
    /// line waits for is done.
    fn deliver(self, send: impl FnOnce(ActorResult<T>) + 'static) {
        match self {
            Reply::Now(answer) => send(answer),
            Reply::Later(fut) => {
                actix_rt::spawn(async move { send(fut.await) });
            }
            Reply::InLine(InLine { needed, value, on_durable, line, durable, ticket }) => {
                let answer = Box::new(move |flushed: Result<(), StorageError>| match flushed {
                    Ok(()) => {
                        on_durable();
                        send(Ok(value));
                    }
                    Err(e) => send(Err(e.into())),
                });
                if ReplyLine::enter(&line, needed, answer) {
                    actix_rt::spawn(answer_after_flush(line, ticket, durable));
                }
            }
        }
    }

    /// Lets the answer take its course with nobody waiting for it (what runs once it
    /// is durable still runs).
    pub fn detach(self) {
        self.deliver(|_| ());
    }
}

impl<T> From<ResponseFuture<ActorResult<T>>> for Reply<T> {
    fn from(fut: ResponseFuture<ActorResult<T>>) -> Self {
        Reply::Later(fut)
    }
}

impl<A, M, T> actix::dev::MessageResponse<A, M> for Reply<T>
where
    A: Actor,
    M: Message<Result = ActorResult<T>>,
    T: 'static,
{
    fn handle(self, _: &mut A::Context, tx: Option<actix::dev::OneshotSender<ActorResult<T>>>) {
        self.deliver(move |answer| {
            if let Some(tx) = tx {
                let _ = tx.send(answer);
            }
        });
    }
}

/// Sends one answer in line, given how the flush it waited for went.
type Answer = Box<dyn FnOnce(Result<(), StorageError>)>;

/// Answers waiting for a flush, in the order given. Bounded by the writes in
/// flight: each is the answer to a message the actor's admission line let in.
#[derive(Default)]
struct ReplyLine {
    /// Each answer with the sequence the journal must be durable through first.
    waiting: Vec<(u64, Answer)>,
    /// A flush task is spawned and has not yet taken its ticket.
    scheduled: bool,
    /// Flush tasks holding a ticket, and the highest sequence one of them covers.
    flushing: usize,
    covered: u64,
}

impl ReplyLine {
    /// Queues an answer needing the journal durable through `needed`. Returns
    /// whether a flush task must be spawned for it (none is about to take a
    /// ticket, and none holding one covers it).
    fn enter(line: &RefCell<ReplyLine>, needed: u64, answer: Answer) -> bool {
        let mut l = line.borrow_mut();
        l.waiting.push((needed, answer));
        let covered = l.flushing > 0 && needed <= l.covered;
        if covered || l.scheduled {
            return false;
        }
        l.scheduled = true;
        true
    }
}

/// The reply line's flush task: first run after the actor's turn (so after the
/// appends of every answer queued in it), it takes one ticket, and once that flush
/// is done answers every queued answer it covers.
async fn answer_after_flush(line: Rc<RefCell<ReplyLine>>, ticket: TicketSource, durable: Rc<Cell<u64>>) {
    let through = {
        let mut l = line.borrow_mut();
        l.scheduled = false;
        let through = l.waiting.iter().map(|(needed, _)| *needed).max().unwrap_or(0);
        l.flushing += 1;
        l.covered = l.covered.max(through);
        through
    };
    // Taken now: after every append the answers in line show.
    let flushed = match ticket() {
        Ok(ticket) => ticket.wait().await,
        Err(e) => Err(e),
    };
    if flushed.is_ok() && durable.get() < through {
        durable.set(through);
    }
    let answers: Vec<_> = {
        let mut l = line.borrow_mut();
        l.flushing -= 1;
        let (ready, left) = std::mem::take(&mut l.waiting).into_iter().partition(|(needed, _)| *needed <= through);
        l.waiting = left;
        // An answer left in line that no flush covers any more gets a task of its own.
        let uncovered = l.waiting.iter().any(|(needed, _)| l.flushing == 0 || *needed > l.covered);
        if uncovered && !l.scheduled {
            l.scheduled = true;
            actix_rt::spawn(answer_after_flush(line.clone(), ticket.clone(), durable.clone()));
        }
        ready
    };
    for (_, answer) in answers {
        answer(flushed.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A machine whose events change the key they carry.
    struct Keys;

    impl Machine for Keys {
        type Event = crate::domain::points::PointsEvent;
        fn journaled(&self, _: &Self::Event, seq: u64, touched: &mut dyn FnMut(u64)) {
            touched(seq)
        }
    }

    fn points_journal(dir: &std::path::Path) -> Arc<dyn EventLog<crate::domain::points::PointsEvent>> {
        let storage = crate::storage::Storage::open(&crate::storage::StorageOptions {
            path: dir.to_path_buf(),
            cache_capacity_bytes: 1 << 20,
            max_pending_commits: 16,
            max_commit_batch: 16,
            commit_linger: std::time::Duration::ZERO,
            commit_busy_linger: std::time::Duration::ZERO,
        })
        .unwrap();
        Arc::new(storage.ledger_journal::<crate::domain::points::PointsBook>(0).unwrap())
    }

    /// Yields to the thread's other tasks until `done` holds (at most 1,000 times).
    async fn until(done: impl Fn() -> bool) {
        for _ in 0..1000 {
            if done() {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("never happened");
    }

    #[test]
    fn answers_of_one_turn_share_one_ticket_and_wait_for_its_flush() {
        actix_rt::System::new().block_on(async {
            let line: Rc<RefCell<ReplyLine>> = Rc::default();
            let durable = Rc::new(Cell::new(0u64));
            let flushes = Rc::new(RefCell::new(Vec::new()));
            let ticket: TicketSource = {
                let flushes = flushes.clone();
                Rc::new(move || {
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    flushes.borrow_mut().push(tx);
                    Ok(Ticket::new(rx))
                })
            };
            let answered = Rc::new(RefCell::new(Vec::new()));
            let enter = |needed: u64| {
                let answered = answered.clone();
                let answer =
                    Box::new(move |r: Result<(), StorageError>| answered.borrow_mut().push((needed, r.is_ok())));
                if ReplyLine::enter(&line, needed, answer) {
                    actix_rt::spawn(answer_after_flush(line.clone(), ticket.clone(), durable.clone()));
                }
            };
            // One turn of the actor: three answers, one flush task, one ticket.
            for needed in [3, 1, 2] {
                enter(needed);
            }
            until(|| flushes.borrow().len() == 1).await;
            // Past the ticket's records: a ticket of its own, taken after them.
            enter(5);
            until(|| flushes.borrow().len() == 2).await;
            // Covered by a flush under way: no other ticket.
            enter(2);
            tokio::task::yield_now().await;
            assert_eq!(flushes.borrow().len(), 2);
            assert!(answered.borrow().is_empty(), "nothing is answered before its flush");
            let first = flushes.borrow_mut().remove(0);
            first.send(Ok(())).unwrap();
            until(|| answered.borrow().len() == 4).await;
            let mut got = answered.borrow().clone();
            got.sort();
            assert_eq!(got, [(1, true), (2, true), (2, true), (3, true)]);
            assert_eq!(durable.get(), 3);
            // A flush that fails answers what it covered with the error.
            let second = flushes.borrow_mut().remove(0);
            second.send(Err(StorageError::Closed)).unwrap();
            until(|| answered.borrow().len() == 5).await;
            assert_eq!(answered.borrow()[4], (5, false));
            assert_eq!(durable.get(), 3, "a failed flush makes nothing durable");
            assert!(line.borrow().waiting.is_empty());
        });
    }

    #[test]
    fn undurable_keys_are_forgotten_once_durable_even_without_reads() {
        let dir = tempfile::tempdir().unwrap();
        let journal = points_journal(dir.path());
        let mut live = Journaled::recovered(Keys, journal, 0, 0, 0);
        for seq in 1..=1000 {
            live.touched(seq, seq);
        }
        assert_eq!(live.needed_for(7), 7);
        live.durable.set(1000);
        // Writes forget what is durable, so the map stays bounded by what is in flight.
        live.forget_durable();
        assert!(live.undurable.is_empty() && live.undurable_queue.is_empty());
        assert_eq!(live.needed_for(7), 0);
        live.touched(3, 1001);
        assert_eq!(live.needed_for(3), 1001, "a newer change of a key is waited for");
    }

    #[test]
    fn a_snapshot_is_due_once_the_journal_outgrows_the_last_one_and_only_one_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let journal = points_journal(dir.path());
        let mut live = Journaled::recovered(Keys, journal, 0, 500, 1000);
        assert!(!live.snapshot_due(100), "500 bytes of journal do not outgrow a 1000-byte snapshot");
        live.journal_bytes_since_snapshot = 1000;
        assert!(live.snapshot_due(100));
        let slot = live.begin_snapshot().unwrap();
        live.journal_bytes_since_snapshot = 5000;
        assert!(!live.snapshot_due(100), "one snapshot at a time");
        slot.stored(8000);
        drop(slot);
        assert!(!live.snapshot_due(100), "the next is due after as much journal as the last snapshot");
        live.journal_bytes_since_snapshot = 8000;
        assert!(live.snapshot_due(100));
    }
}
