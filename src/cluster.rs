//! A kami cluster: several nodes sharing one replicated NATS JetStream, each shard
//! owned by one node at a time.
//!
//! - [`catalogue`]: the products every node knows, in a key-value bucket they
//!   share (created on one node, followed by all).
//! - [`placement`]: which live node should own a shard (rendezvous hashing, pure).
//! - [`lease`]: who does own it, as a lease in a JetStream key-value bucket with a
//!   revision and a time to live; the node that holds it renews it, and stops
//!   serving the shard before anyone else may take it.
//! - [`writer`]: the one server writing a stream on `storage.backend = "jetstream"`.
//!
//! Fencing does not rest on the leases alone: every journal append carries the
//! expected last sequence of the shard's subject (`storage::jetstream`), so a node
//! that lost its lease without knowing cannot extend the history either.

pub mod catalogue;
pub mod lease;
pub mod node;
pub mod placement;
pub mod writer;

use std::future::Future;
use std::time::{Duration, Instant};

use async_nats::jetstream::{kv, stream};

use crate::storage::jetstream::JetStream;

/// Opens (or creates) key-value bucket `bucket`, one value per key, with the
/// stream's number of copies; `max_age` (entries not written again within it are
/// removed) and `max_value_bytes` when given. Its stream is made as the key-value
/// convention has it (`KV_{bucket}` on `$KV.{bucket}.>`): the client's own bucket
/// creation asks the servers for account details a 2.9 server does not give.
pub async fn bucket(
    js: &JetStream,
    bucket: &str,
    max_age: Option<Duration>,
    max_value_bytes: Option<usize>,
) -> Result<kv::Store, String> {
    js.context()
        .get_or_create_stream(stream::Config {
            name: format!("KV_{bucket}"),
            subjects: vec![format!("$KV.{bucket}.>")],
            max_messages_per_subject: 1,
            max_age: max_age.unwrap_or_default(),
            max_message_size: max_value_bytes.map_or(-1, |b| (b + 1024).min(i32::MAX as usize) as i32),
            storage: stream::StorageType::File,
            num_replicas: js.options().replicas,
            allow_rollup: true,
            deny_delete: true,
            allow_direct: true,
            discard: stream::DiscardPolicy::New,
            ..Default::default()
        })
        .await
        .map_err(|e| format!("create bucket {bucket}: {e}"))?;
    js.context().get_key_value(bucket).await.map_err(|e| format!("open bucket {bucket}: {e}"))
}

/// Tries `attempt` until it succeeds, fails with an error `transient` does not take
/// for a passing one, or `deadline` passes (then its last error is returned), with
/// `pause` between tries. `transient` is asked only when there will be another try,
/// so it may log "trying again". For servers that time requests out while they elect
/// a leader, which a start waits for rather than exiting.
pub async fn patiently<T, E, Fut>(
    deadline: Instant,
    pause: Duration,
    mut attempt: impl FnMut() -> Fut,
    mut transient: impl FnMut(&E) -> bool,
) -> Result<T, E>
where
    Fut: Future<Output = Result<T, E>>,
{
    loop {
        match attempt().await {
            Ok(value) => return Ok(value),
            Err(e) if Instant::now() < deadline && transient(&e) => tokio::time::sleep(pause).await,
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn patiently_tries_again_only_on_passing_errors_and_only_until_its_deadline() {
        let tries = std::cell::Cell::new(0);
        let deadline = Instant::now() + Duration::from_secs(3600);
        let ok: Result<u32, &str> = patiently(
            deadline,
            Duration::from_millis(1),
            || async {
                tries.set(tries.get() + 1);
                if tries.get() < 3 {
                    Err("busy")
                } else {
                    Ok(7)
                }
            },
            |e| *e == "busy",
        )
        .await;
        assert_eq!((ok, tries.get()), (Ok(7), 3), "two passing errors, then the answer");

        tries.set(0);
        let lasting: Result<u32, &str> = patiently(
            deadline,
            Duration::from_millis(1),
            || async {
                tries.set(tries.get() + 1);
                Err("refused")
            },
            |e| *e == "busy",
        )
        .await;
        assert_eq!((lasting, tries.get()), (Err("refused"), 1), "an error that is not passing ends it at once");

        tries.set(0);
        let late: Result<u32, &str> = patiently(
            Instant::now(),
            Duration::from_millis(1),
            || async {
                tries.set(tries.get() + 1);
                Err("busy")
            },
            |_| true,
        )
        .await;
        assert_eq!((late, tries.get()), (Err("busy"), 1), "past the deadline: no second try");
    }
}
