//! The actors: thin shells that own state, journal it, and reply after the flush.
//!
//! * [`shard::ShardActor`] — one per product shard; owns its keys, reservations and
//!   orders (see `domain::shard`). Started under an actix `Supervisor`.
//! * [`supervisor::ProductSupervisor`] — creates products: persists the product, starts
//!   its stock actors on the arbiters round-robin, and publishes the route.
//!   It is not on the order path.
//! * [`payments::PaymentSupervisor`] — talks to payment gateways: queries orders whose
//!   notification never came, retries refunds owed, health-checks channels and keeps
//!   their circuit breakers. Not on the order path either.
//! * [`claims::PaymentClaims`] — which order each payment id pays, across shards
//!   (in memory, rebuilt at start from the shards' payment records).
//! * [`registry::Registry`] — the immutable routing table (product id → shard
//!   addresses), swapped atomically when a product is added; readers take no lock.

//!
//! Every actor runs under an actix `Supervisor` and handles [`Kill`]: it drops its
//! memory and stops; the supervisor's `restarting` hook rebuilds it from storage
//! before it handles the next message of its (preserved) mailbox.

pub mod admission;
pub mod call;
pub mod claims;
pub mod coupons;
pub mod journaled;
pub mod ledger;
pub mod payments;
pub mod place;
pub mod points;
pub mod registry;
pub mod shard;
pub mod supervisor;

pub use journaled::{ActorError, ActorResult};
pub use registry::{ProductRoute, Registry, ShardHandle};
pub use shard::{ShardActor, ShardEnv, ShardGauge};
pub use supervisor::ProductSupervisor;

/// Room in every actor's mailbox beyond its admission permits, for the messages
/// sent without one (audit, snapshot, kill, ticks of the supervisors).
pub const UNADMITTED_MESSAGES: usize = 64;

thread_local! {
    static ARBITER: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// Marks the calling thread as the stock arbiter at `index` (called once on each
/// arbiter's thread when the actor system starts).
pub fn mark_arbiter(index: usize) {
    ARBITER.with(|a| a.set(Some(index)));
}

/// The index of the stock arbiter the caller runs on (`None` off the arbiters):
/// lets the order path pick a shard on its own thread.
pub fn current_arbiter() -> Option<usize> {
    ARBITER.with(|a| a.get())
}

/// Stops an actor abruptly, discarding its memory; its supervisor rebuilds it from
/// storage. Chaos tests send it; it is answered before the actor stops.
#[derive(actix::Message, Debug, Clone, Copy)]
#[rtype(result = "()")]
pub struct Kill;

/// Times one turn of an actor (one message handled, one tick) into
/// `kami_actor_turn_seconds{actor}`: a long turn delays every message queued behind
/// it and every request served on the same arbiter.
pub struct Turn(std::time::Instant, metrics::Histogram);

impl Turn {
    pub fn start(histogram: &metrics::Histogram) -> Turn {
        Turn(std::time::Instant::now(), histogram.clone())
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        self.1.record(self.0.elapsed().as_secs_f64());
    }
}
