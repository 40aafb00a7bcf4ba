//! Pure domain logic: no I/O, no clocks, no randomness, no actors.
//!
//! Everything that decides whether a trade may happen lives here, so it can be
//! unit- and property-tested in isolation:
//!
//! * [`shard`] — the stock of one product shard: its key pool, its orders and their
//!   state machine, payments received, and the derived indexes (per-buyer holdings,
//!   idempotency keys, the expiry heap). Commands are *decided and applied* in one
//!   call that returns the [`Event`] to journal; replaying the same events on an
//!   empty shard rebuilds the same state.
//! * [`group`] — group-buy deals and groups (the group's steps are `Shard` commands).
//! * [`points`] — the points balances and append-only ledger of one points shard,
//!   and its side of a redemption (hold, settle, release).
//! * [`breaker`] — the circuit breaker of one payment channel; [`routing`] — which
//!   channel a new order goes to.
//! * [`shelf`] — whether a product is sold: on sale, off the shelf, deleted.
//! * [`pricing`] — what an order costs: the one pricing function (quantity tiers).
//! * [`terms`] — what a merchant may change of a product while it sells: name,
//!   price, per-buyer limit, sale window.
//! * [`key_mode`] — unique keys, or a reusable key sold as units.
//! * [`lookup`] — buyer order lookup: query passwords as slow salted hashes, and
//!   the order of a lookup's answer.
//! * [`error`] — typed refusals, each with a stable code used by the HTTP layer.
//! * [`signature`] — HMAC-SHA256 signing and constant-time verification of payment
//!   notifications.
//! * [`validate`] — the input rules shared by HTTP and the library API.
//! * [`webhook`] — which merchant webhook events a journal record reports, their
//!   signature and their retry schedule.

pub mod audit;
pub mod breaker;
pub mod coupon;
pub mod error;
pub mod group;
pub mod ids;
pub mod key_mode;
pub mod lookup;
pub mod money;
pub mod points;
pub mod pricing;
pub mod routing;
pub mod shard;
pub mod shelf;
pub mod signature;
pub mod terms;
pub mod validate;
pub mod webhook;

pub use audit::ShardAudit;
pub use error::DomainError;
pub use ids::{OrderId, ShardId};
pub use shard::{Event, Order, OrderStatus, PaymentOutcome, PaymentRecord, ProductInfo, Shard};

/// The result of a command: either it changed state (and the event `E` must be
/// journaled before anyone is told), or it is a repeat answered from recorded state.
/// Returned by value and consumed at once; boxing the event would cost an
/// allocation per order for no gain.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome<E, T> {
    /// A new event to journal, already applied.
    Changed(E, T),
    /// A repeat of something already done: nothing to journal.
    Repeat(T),
}

impl<E, T> Outcome<E, T> {
    /// The same outcome answering `f(value)`.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Outcome<E, U> {
        match self {
            Outcome::Changed(event, value) => Outcome::Changed(event, f(value)),
            Outcome::Repeat(value) => Outcome::Repeat(f(value)),
        }
    }
}

/// Runs a domain step, turning a failed domain assertion (a panic) into its
/// message. Callers decide what a broken step means: a stock actor rebuilds from
/// storage, recovery refuses the journal.
pub fn catch_broken_step<T>(step: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(step)).map_err(|panic| {
        panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into())
    })
}

/// Milliseconds since the Unix epoch. The domain never reads a clock: callers pass `now_ms`.
pub type Millis = u64;
