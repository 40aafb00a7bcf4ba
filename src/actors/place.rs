//! Where a stock shard is served. On one server, always here. In a cluster
//! (`cluster.node`), here only while this node holds the shard's lease: each
//! [`Place`] holds the instant that lease ends by this node's clock, moved on by
//! the node's ownership loop at every renewal. A call to the shard checks it
//! first (`call::call_shard`), so a node whose loop stalls (a paused process)
//! stops sending work to the shard when its lease ends, renewed or not. Work
//! already in the actor's mailbox is fenced by the stream itself: its append
//! carries the subject's expected last sequence.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

/// The monotonic origin of [`Place`]'s instants (the first use in the process).
fn origin() -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

/// Microseconds from [`origin`] to `at` (0 for an instant before it).
fn micros(at: Instant) -> u64 {
    at.saturating_duration_since(origin()).as_micros() as u64
}

#[derive(Debug)]
pub struct Place {
    /// The shard.
    pub shard: crate::domain::ShardId,
    /// Served here until this many microseconds after [`origin`], plus one (0:
    /// not here); `u64::MAX` on one server.
    until: AtomicU64,
}

impl Place {
    /// Served here for good (one server).
    pub fn here(shard: crate::domain::ShardId) -> Place {
        Place { shard, until: AtomicU64::new(u64::MAX) }
    }

    /// Served elsewhere until [`Place::hold_until`] says otherwise (a cluster node).
    pub fn elsewhere(shard: crate::domain::ShardId) -> Place {
        origin();
        Place { shard, until: AtomicU64::new(0) }
    }

    /// Whether calls may go to the shard now.
    pub fn is_here(&self) -> bool {
        let until = self.until.load(Ordering::Acquire);
        until == u64::MAX || micros(Instant::now()) + 1 < until
    }

    /// Served here until `until` (a lease taken or renewed).
    pub fn hold_until(&self, until: Instant) {
        // One more than the microseconds (0 stays "elsewhere"): an instant at or
        // before the origin is still an end that has passed.
        self.until.store(micros(until).saturating_add(1).min(u64::MAX - 1), Ordering::Release);
    }

    /// Served elsewhere from now on (a lease handed over or lost).
    pub fn leave(&self) {
        self.until.store(0, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_shard_is_here_only_until_its_lease_ends() {
        let shard = crate::domain::ShardId::new("p", 1);
        assert!(Place::here(shard.clone()).is_here());
        let place = Place::elsewhere(shard);
        assert!(!place.is_here());
        place.hold_until(Instant::now() + Duration::from_secs(60));
        assert!(place.is_here());
        place.hold_until(Instant::now() - Duration::from_millis(1));
        assert!(!place.is_here(), "a lease that ended, though nobody said so");
        // An end at the very origin of the clock has passed too.
        place.hold_until(origin());
        assert!(!place.is_here(), "a lease that ended at the origin");
        place.hold_until(Instant::now() + Duration::from_secs(60));
        place.leave();
        assert!(!place.is_here());
    }
}
