//! Admission control in front of one stock actor: the bounded queue a hot product's
//! buyers stand in.
//!
//! Two bounds, both checked without locks on the order path:
//! - a hard one, `mailbox_capacity` permits (a request holds one from admission to
//!   its answer), which also bounds the actor's mailbox;
//! - a soft one in time, `max_queue_wait_ms`: a request is refused when the queue in
//!   front of it would take longer than that to drain at the rate the actor has been
//!   answering. Latency of accepted requests then stays near the unloaded latency
//!   plus at most that wait, however many buyers arrive.
//!
//! The drain rate is sampled from the new-order requests themselves (every
//! `SAMPLE_MS`, by whichever one sees the sample is due), so an idle product costs
//! nothing, and the periodic housekeeping calls of an idle product (transfers, holds)
//! do not keep a stale rate alive.
//! A refusal carries the queue depth, the drain rate and the estimated wait: the
//! "you are in line, about N ms" answer storefronts show.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// How often the drain rate is re-estimated.
const SAMPLE_MS: u64 = 100;
/// Below this many requests in line a request is always admitted (when a permit is
/// free). It keeps group commit fed (a batch per flush) and keeps the actor busy:
/// a line cut shorter than what one flush drains would lower the answers per second,
/// then the measured drain rate, then the bound again — a spiral down to nothing
/// under a storm of retries.
const MIN_DEPTH: usize = 256;

/// Which bounds a request is admitted under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// New buyer work (order creation): the time bound and the hard bound. This is
    /// what a flash sale floods, and what can be refused at no cost to anybody.
    NewOrder,
    /// Work on what already exists (payments, refunds, reads, cancels, imports,
    /// transfers): only the hard bound, so money already taken is applied even while
    /// the line for new orders is full.
    Existing,
}

/// Why a request was not admitted, and what the caller can tell the buyer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueFull {
    /// Requests in line (admitted, not yet answered).
    pub depth: usize,
    /// Answers per second recently; 0 when not known yet.
    pub drain_per_sec: u64,
    /// depth ÷ drain rate; `None` when the rate is not known.
    pub estimated_wait_ms: Option<u64>,
}

pub struct Admission {
    permits: Arc<Semaphore>,
    capacity: usize,
    max_queue_wait_ms: u64,
    born: Instant,
    /// Requests answered (permits given back) since `born`.
    answered: Arc<AtomicU64>,
    /// The last sample: ms since `born` and `answered` then.
    sample_at_ms: AtomicU64,
    sample_answered: AtomicU64,
    /// Smoothed answers per second.
    drain_per_sec: AtomicU64,
}

/// Held while a request is in line or being answered; dropping it counts an answer.
#[derive(Debug)]
pub struct Ticket {
    _permit: OwnedSemaphorePermit,
    answered: Arc<AtomicU64>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.answered.fetch_add(1, Ordering::Relaxed);
    }
}

impl Admission {
    pub fn new(capacity: usize, max_queue_wait_ms: u64) -> Admission {
        assert!(capacity >= 1);
        Admission {
            permits: Arc::new(Semaphore::new(capacity)),
            capacity,
            max_queue_wait_ms,
            born: Instant::now(),
            answered: Arc::new(AtomicU64::new(0)),
            sample_at_ms: AtomicU64::new(0),
            sample_answered: AtomicU64::new(0),
            drain_per_sec: AtomicU64::new(0),
        }
    }

    /// Requests in line now.
    pub fn depth(&self) -> usize {
        self.capacity - self.permits.available_permits()
    }

    pub fn drain_per_sec(&self) -> u64 {
        self.drain_per_sec.load(Ordering::Relaxed)
    }

    /// The drain rate to show a person: 0 once no request came for a second (the
    /// estimate is only refreshed by requests, so an idle line keeps its last one).
    pub fn recent_drain_per_sec(&self) -> u64 {
        self.recent_drain_at(self.born.elapsed().as_millis() as u64)
    }

    fn recent_drain_at(&self, now_ms: u64) -> u64 {
        if now_ms.saturating_sub(self.sample_at_ms.load(Ordering::Relaxed)) > 10 * SAMPLE_MS {
            0
        } else {
            self.drain_per_sec()
        }
    }

    /// Admits one request, or says how long the line is.
    pub fn admit(&self, lane: Lane) -> Result<Ticket, QueueFull> {
        self.admit_at(lane, self.born.elapsed().as_millis() as u64)
    }

    /// [`Self::admit`] at `now_ms` after this line was made (tests choose the time).
    fn admit_at(&self, lane: Lane, now_ms: u64) -> Result<Ticket, QueueFull> {
        if lane == Lane::NewOrder {
            self.sample_at(now_ms);
        }
        let depth = self.depth();
        let drain = self.drain_per_sec();
        let full = || QueueFull {
            depth,
            drain_per_sec: drain,
            estimated_wait_ms: (drain > 0).then(|| (depth as u64 * 1000).div_ceil(drain)),
        };
        if lane == Lane::NewOrder && self.max_queue_wait_ms > 0 && drain > 0 && depth >= MIN_DEPTH {
            let bound = (drain * self.max_queue_wait_ms / 1000) as usize;
            if depth >= bound.max(MIN_DEPTH) {
                return Err(full());
            }
        }
        let permit = self.permits.clone().try_acquire_owned().map_err(|_| full())?;
        Ok(Ticket { _permit: permit, answered: self.answered.clone() })
    }

    /// Re-estimates the drain rate when a sample is due. One request wins the
    /// compare-exchange and does it; the others go on.
    fn sample_at(&self, now_ms: u64) {
        let last_ms = self.sample_at_ms.load(Ordering::Relaxed);
        let elapsed_ms = now_ms.saturating_sub(last_ms);
        if elapsed_ms < SAMPLE_MS
            || self.sample_at_ms.compare_exchange(last_ms, now_ms, Ordering::AcqRel, Ordering::Relaxed).is_err()
        {
            return;
        }
        let answered = self.answered.load(Ordering::Relaxed);
        let delta = answered.saturating_sub(self.sample_answered.swap(answered, Ordering::Relaxed));
        let fresh = delta * 1000 / elapsed_ms.max(1);
        // An idle gap (several sample periods) says nothing about the drain rate. The
        // estimate follows a rising rate at once and a falling one slowly (1/8 per
        // sample): fewer answers are as often the effect of refusing as a slower actor.
        let previous = self.drain_per_sec();
        let next = if previous == 0 || elapsed_ms > 10 * SAMPLE_MS || fresh >= previous {
            fresh
        } else {
            // Rounded up, so that the estimate reaches `fresh` (rounded down, it
            // would stay up to 7 above it for good).
            previous - (previous - fresh).div_ceil(8)
        };
        if delta > 0 || elapsed_ms > 10 * SAMPLE_MS {
            self.drain_per_sec.store(next, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hard_bound_refuses_past_capacity_and_a_returned_ticket_frees_a_place() {
        let a = Admission::new(2, 0);
        let t1 = a.admit_at(Lane::NewOrder, 0).unwrap();
        let _t2 = a.admit_at(Lane::NewOrder, 0).unwrap();
        let full = a.admit_at(Lane::NewOrder, 0).unwrap_err();
        assert_eq!(full.depth, 2);
        assert_eq!(full.estimated_wait_ms, None, "no rate known yet");
        drop(t1);
        assert!(a.admit_at(Lane::NewOrder, 0).is_ok());
    }

    #[test]
    fn the_time_bound_refuses_once_the_line_would_take_longer_than_the_wait() {
        let a = Admission::new(10_000, 50);
        // Pretend the actor answered 10,000 per second: a 50 ms line is 500 requests.
        a.drain_per_sec.store(10_000, Ordering::Relaxed);
        let tickets: Vec<_> = (0..500).map(|_| a.admit_at(Lane::NewOrder, 0).unwrap()).collect();
        let full = a.admit_at(Lane::NewOrder, 0).unwrap_err();
        assert_eq!(full, QueueFull { depth: 500, drain_per_sec: 10_000, estimated_wait_ms: Some(50) });
        let payment = a.admit_at(Lane::Existing, 0).expect("settling work is held only to the hard bound");
        drop(payment);
        drop(tickets);
        assert!(a.admit_at(Lane::NewOrder, 0).is_ok());
    }

    #[test]
    fn a_short_line_is_always_admitted_however_slow_the_actor_seems() {
        // 10 answers per second would allow a 0-request line: the floor keeps the actor fed.
        let a = Admission::new(10_000, 25);
        a.drain_per_sec.store(10, Ordering::Relaxed);
        let tickets: Vec<_> = (0..MIN_DEPTH).map(|_| a.admit_at(Lane::NewOrder, 0).unwrap()).collect();
        assert_eq!(a.admit_at(Lane::NewOrder, 0).unwrap_err().depth, MIN_DEPTH);
        drop(tickets);
    }

    #[test]
    fn the_drain_rate_is_measured_from_answers() {
        let a = Admission::new(100, 10);
        for _ in 0..40 {
            drop(a.admit_at(Lane::NewOrder, 0).unwrap());
        }
        a.sample_at(100);
        assert_eq!(a.drain_per_sec(), 400, "40 answers in 100 ms");
        for _ in 0..20 {
            drop(a.admit_at(Lane::NewOrder, 150).unwrap());
        }
        a.sample_at(200);
        assert_eq!(a.drain_per_sec(), 375, "a fall is followed by 1/8: 400 - (400 - 200) / 8");
        a.sample_at(250);
        assert_eq!(a.drain_per_sec(), 375, "not due yet");
        for _ in 0..100 {
            drop(a.admit_at(Lane::NewOrder, 250).unwrap());
        }
        a.sample_at(300);
        assert_eq!(a.drain_per_sec(), 1000, "a rise is followed at once: 100 answers in 100 ms");
        assert_eq!(a.recent_drain_at(1000), 1000, "shown while requests come");
        assert_eq!(a.recent_drain_at(1401), 0, "not shown once the line is idle for a second");
        a.sample_at(5000);
        assert_eq!(a.drain_per_sec(), 0, "after a long idle gap the line drains at an unknown rate");
    }

    #[test]
    fn a_falling_rate_is_followed_all_the_way_down() {
        let a = Admission::new(100, 10);
        a.drain_per_sec.store(16, Ordering::Relaxed);
        for t in 1..=10 {
            drop(a.admit_at(Lane::Existing, t * SAMPLE_MS).unwrap());
            a.sample_at(t * SAMPLE_MS);
        }
        assert_eq!(a.drain_per_sec(), 10, "one answer per 100 ms: the estimate falls to 10, not to a floor 7 above it");
    }

    #[test]
    fn housekeeping_calls_of_an_idle_line_do_not_keep_its_last_rate_on_show() {
        let a = Admission::new(100, 10);
        for _ in 0..100 {
            drop(a.admit_at(Lane::NewOrder, 0).unwrap());
        }
        drop(a.admit_at(Lane::NewOrder, 100).unwrap());
        assert_eq!(a.recent_drain_at(100), 1000);
        // The sale is over; a transfer settler calls every second.
        for s in 1..=5 {
            drop(a.admit_at(Lane::Existing, 100 + s * 1000).unwrap());
        }
        assert_eq!(a.recent_drain_at(5_150), 0, "an idle line shows no rate");
    }
}
