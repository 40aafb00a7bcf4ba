//! Group commit: one flush makes every write made before it durable, so writers
//! queue a ticket and one dedicated thread flushes for all of them.
//!
//! Protocol: a writer first appends its records to its journal (and writes to
//! sled), *then* calls [`Committer::ticket`]. The commit thread takes every
//! ticket queued so far, stages what every journal appended since the last cycle
//! in the commit log and syncs the log once (one `write` and one `fdatasync`
//! for all of them, see [`super::log`]), flushes sled once, and completes those
//! tickets. A ticket is therefore only
//! completed by a flush that started after the writer's insert returned, which is
//! what makes the reply that waits on it durable. Writers arriving during a flush
//! share the next one.
//!
//! This is the one component shared by every order of every product (one fsync
//! serves everybody); it holds no lock while flushing and its queue is bounded.

use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tokio::sync::oneshot;

use super::journal::DirtyJournals;
use super::log::CommitLog;
use super::StorageError;

type Waiter = oneshot::Sender<Result<(), StorageError>>;

/// A claim on the next flush. Await it with [`Ticket::wait`].
pub struct Ticket(oneshot::Receiver<Result<(), StorageError>>);

impl Ticket {
    pub(crate) fn new(rx: oneshot::Receiver<Result<(), StorageError>>) -> Ticket {
        Ticket(rx)
    }

    pub async fn wait(self) -> Result<(), StorageError> {
        self.0.await.map_err(|_| StorageError::Closed)?
    }
}

/// Batch sizes and flush latencies since start.
pub struct CommitStats {
    pub batch_sizes: Histogram<u64>,
    pub flush_micros: Histogram<u64>,
}

impl CommitStats {
    fn new() -> Self {
        CommitStats {
            batch_sizes: Histogram::new_with_bounds(1, 1 << 24, 2).expect("valid bounds"),
            flush_micros: Histogram::new_with_bounds(1, 60_000_000, 2).expect("valid bounds"),
        }
    }
}

/// Owns the commit thread; dropping it lets queued tickets complete, then joins
/// the thread (which releases its handle on the database).
pub struct Committer {
    /// The only strong handle on the queue's sender: journals hold weak ones
    /// ([`TicketQueue`]), so dropping the committer still ends its thread.
    tx: Option<Arc<SyncSender<Waiter>>>,
    stats: Arc<Mutex<CommitStats>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Committer {
    /// Starts the commit thread. `max_pending` bounds queued tickets; `linger` is how
    /// long the thread waits for more writers after the first (0 = flush at once), and
    /// `busy_linger` how long it waits when the flush follows the last one within
    /// that time (see [`linger_for`]).
    pub(crate) fn start(
        db: sled::Db,
        journals: Arc<DirtyJournals>,
        log: Arc<Mutex<CommitLog>>,
        max_pending: usize,
        max_batch: usize,
        linger: Duration,
        busy_linger: Duration,
    ) -> Committer {
        assert!(max_pending > 0 && max_batch > 0);
        let (tx, rx) = sync_channel(max_pending);
        let stats = Arc::new(Mutex::new(CommitStats::new()));
        let thread_stats = stats.clone();
        let thread = std::thread::Builder::new()
            .name("kami-commit".into())
            .spawn(move || run(db, journals, log, rx, max_batch, (linger, busy_linger), thread_stats))
            .expect("spawn commit thread");
        Committer { tx: Some(Arc::new(tx)), stats, thread: Some(thread) }
    }

    /// Queues a ticket for the next flush. Call only after the writes it must cover.
    pub fn ticket(&self) -> Result<Ticket, StorageError> {
        let Some(sender) = &self.tx else { return Err(StorageError::Closed) };
        queue(sender)
    }

    /// A handle that queues tickets on this committer without keeping it alive.
    pub(crate) fn queue(&self) -> TicketQueue {
        TicketQueue(self.tx.as_ref().map_or_else(Weak::new, Arc::downgrade))
    }

    pub fn stats(&self) -> std::sync::MutexGuard<'_, CommitStats> {
        self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn queue(sender: &SyncSender<Waiter>) -> Result<Ticket, StorageError> {
    let (tx, rx) = oneshot::channel();
    match sender.try_send(tx) {
        Ok(()) => Ok(Ticket(rx)),
        Err(TrySendError::Full(_)) => Err(StorageError::Busy),
        Err(TrySendError::Disconnected(_)) => Err(StorageError::Closed),
    }
}

/// Queues tickets on a [`Committer`] (what a local journal gives its writers);
/// [`StorageError::Closed`] once the committer is gone.
#[derive(Clone)]
pub(crate) struct TicketQueue(Weak<SyncSender<Waiter>>);

impl TicketQueue {
    /// A queue on no committer (tests that never wait for a flush).
    #[cfg(test)]
    pub(crate) fn none() -> TicketQueue {
        TicketQueue(Weak::new())
    }

    pub(crate) fn ticket(&self) -> Result<Ticket, StorageError> {
        let sender = self.0.upgrade().ok_or(StorageError::Closed)?;
        queue(&sender)
    }
}

impl Drop for Committer {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Stages what every journal appended since its last sync in the commit log and
/// syncs the log once, then flushes sled (a flush with nothing new in it returns
/// at once): everything written before the call is durable when it returns `Ok`.
pub(super) fn make_durable(
    db: &sled::Db,
    journals: &DirtyJournals,
    log: &Mutex<CommitLog>,
) -> Result<(), StorageError> {
    let mut log = log.lock().unwrap_or_else(|e| e.into_inner());
    let mut result = Ok(());
    let mut covered = Vec::new();
    for journal in journals.take() {
        match journal.sync_into(&mut log) {
            Ok(last) => covered.push((journal, last)),
            Err(e) => {
                // What it holds is still to be made durable: the next flush tries again.
                journal.relist();
                result = Err(e);
            }
        }
    }
    // What was staged is written even when a journal failed (the next cycle
    // would write it anyway); the cycle fails as a whole.
    let synced = log.sync();
    if synced.is_ok() {
        // Before the log's lock is let go: a backup's cut, taken under it, sees
        // every journal as of the end of one cycle.
        for (journal, last) in covered {
            journal.mark_durable(last);
        }
    }
    drop(log);
    result?;
    synced?;
    db.flush().map_err(|e| StorageError::Sled(e.to_string()))?;
    Ok(())
}

/// How long the commit thread waits for more writers once a ticket came in,
/// `since_last` after the last flush ended: `linger` always, and `busy_linger` when
/// the flush follows the last one that closely. Under load a ticket is waiting as
/// soon as a flush ends, and the few written just then would otherwise get an
/// `fdatasync` of their own (a quarter of the flushes of a flash sale served one
/// ticket): waiting lets the actors finish what they are doing, so one flush
/// covers all of it. A server that is not busy flushes at once.
pub(crate) fn linger_for(linger: Duration, busy_linger: Duration, since_last: Option<Duration>) -> Duration {
    match since_last {
        Some(since) if since < busy_linger => linger.max(busy_linger),
        _ => linger,
    }
}

fn run(
    db: sled::Db,
    journals: Arc<DirtyJournals>,
    log: Arc<Mutex<CommitLog>>,
    rx: Receiver<Waiter>,
    max_batch: usize,
    (linger, busy_linger): (Duration, Duration),
    stats: Arc<Mutex<CommitStats>>,
) {
    let mut batch: Vec<Waiter> = Vec::with_capacity(max_batch);
    let mut last_flush: Option<Instant> = None;
    while let Ok(first) = rx.recv() {
        batch.push(first);
        let wait = linger_for(linger, busy_linger, last_flush.map(|t| t.elapsed()));
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
        while batch.len() < max_batch {
            match rx.try_recv() {
                Ok(w) => batch.push(w),
                Err(_) => break,
            }
        }
        crate::chaos::reached(crate::chaos::CrashPoint::BeforeFlush, || {});
        let started = Instant::now();
        let result = make_durable(&db, &journals, &log);
        let elapsed = started.elapsed();
        if let Err(e) = &result {
            tracing::error!(error = %e, "group flush failed");
        }
        metrics::histogram!("kami_commit_batch_size").record(batch.len() as f64);
        metrics::histogram!("kami_commit_flush_seconds").record(elapsed.as_secs_f64());
        {
            let mut s = stats.lock().unwrap_or_else(|e| e.into_inner());
            let _ = s.batch_sizes.record(batch.len() as u64);
            let _ = s.flush_micros.record(elapsed.as_micros().max(1) as u64);
        }
        crate::chaos::reached(crate::chaos::CrashPoint::AfterFlush, || {});
        for waiter in batch.drain(..) {
            let _ = waiter.send(result.clone());
        }
        last_flush = Some(Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flush_lingers_only_when_it_follows_the_last_one_closely() {
        let (us, none) = (Duration::from_micros, Duration::ZERO);
        // Idle: the first flush, or one long after the last, goes at once.
        assert_eq!(linger_for(none, us(150), None), none);
        assert_eq!(linger_for(none, us(150), Some(us(151))), none);
        // Busy: a ticket right after a flush waits for more writers.
        assert_eq!(linger_for(none, us(150), Some(us(0))), us(150));
        assert_eq!(linger_for(none, us(150), Some(us(149))), us(150));
        // The unconditional linger holds whatever the load; the longer of the two wins.
        assert_eq!(linger_for(us(500), us(150), None), us(500));
        assert_eq!(linger_for(us(500), us(150), Some(us(10))), us(500));
        assert_eq!(linger_for(us(50), us(150), Some(us(10))), us(150));
        // Off: never waits.
        assert_eq!(linger_for(none, none, Some(none)), none);
    }
}
