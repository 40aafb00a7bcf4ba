//! A kami cluster: several nodes sharing one replicated NATS JetStream, each shard
//! owned by one node at a time.
//!
//! - [`placement`]: which live node should own a shard (rendezvous hashing, pure).
//! - [`lease`]: who does own it, as a lease in a JetStream key-value bucket with a
//!   revision and a time to live; the node that holds it renews it, and stops
//!   serving the shard before anyone else may take it.
//! - [`writer`]: the one server writing a stream on `storage.backend = "jetstream"`.
//!
//! Fencing does not rest on the leases alone: every journal append carries the
//! expected last sequence of the shard's subject (`storage::jetstream`), so a node
//! that lost its lease without knowing cannot extend the history either.

pub mod lease;
pub mod node;
pub mod placement;
pub mod writer;
