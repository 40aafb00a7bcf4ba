//! The actors: thin shells that own state, journal it, and reply after the flush.
//!
//! * [`shard::ShardActor`] — one per product shard; owns its keys, reservations and
//!   orders (see `domain::shard`). Started under an actix `Supervisor`.
//! * [`supervisor::OrderSupervisor`] — creates products: persists the product, starts
//!   its stock actors on the arbiters round-robin, and publishes the route.
//!   It is not on the order path.
//! * [`registry::Registry`] — the immutable routing table (product id → shard
//!   addresses), swapped atomically when a product is added; readers take no lock.

pub mod registry;
pub mod shard;
pub mod supervisor;

pub use registry::{ProductRoute, Registry, ShardHandle};
pub use shard::{ShardActor, ShardEnv, ShardError, ShardGauge};
pub use supervisor::OrderSupervisor;
