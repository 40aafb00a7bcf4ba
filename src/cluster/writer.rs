//! One server writing a stream: a kami server on `storage.backend = "jetstream"`
//! holds the stream's writer lease while it runs, so a second server started on the
//! same stream is refused, and one that lost the lease (paused past it, cut off from
//! the servers) stops.
//!
//! The lease is not what keeps the history whole (the expected-sequence fence on
//! every append does that, whatever the leases say); it keeps two servers from
//! taking turns fencing each other, and it makes a server that is no longer the
//! writer stop instead of answering 503 for ever.

use std::time::{Duration, Instant};

use super::lease::{Lease, LeaseError, Leases};
use crate::storage::jetstream::JetStream;

/// How long the lease lives unless renewed (renewed every third of it). A server
/// killed without a word is followed by the next after at most this.
pub const TTL: Duration = Duration::from_secs(5);
/// The key of the lease in the stream's writer bucket.
const KEY: &str = "stock";

/// The writer lease of a stream, held by this server.
pub struct Writer {
    leases: Leases,
    lease: Lease,
    /// Until when the lease is this server's by its own clock, after each write.
    valid_until: tokio::sync::watch::Sender<Instant>,
}

/// The bucket of stream `stream`'s writer lease.
fn bucket(stream: &str) -> String {
    format!("{stream}_WRITER")
}

impl Writer {
    /// Takes the writer lease of `js`'s stream for node `node`. A lease held by a
    /// server that stopped renewing it (killed a moment ago) is waited out; one
    /// still held after `patience` is refused with the holder's name. Servers that
    /// do not answer (electing a leader after one of them restarted) are tried
    /// again until `patience` too.
    pub async fn take(js: &JetStream, node: &str, patience: Duration) -> Result<Writer, LeaseError> {
        let deadline = Instant::now() + patience;
        let leases = loop {
            match Leases::open(js, &bucket(&js.options().stream), node, TTL).await {
                Ok(leases) => break leases,
                Err(LeaseError::Unreachable(e)) if Instant::now() < deadline => {
                    tracing::warn!(error = %e, "the stream's servers do not answer yet; trying again");
                    tokio::time::sleep(TTL / 10).await;
                }
                Err(e) => return Err(e),
            }
        };
        let mut told = None;
        loop {
            match leases.acquire(KEY).await {
                Ok(lease) => {
                    let (valid_until, _) = tokio::sync::watch::channel(lease.valid_until());
                    return Ok(Writer { leases, lease, valid_until });
                }
                Err(LeaseError::Held(holder)) if Instant::now() < deadline => {
                    if told.as_ref() != Some(&holder) {
                        tracing::warn!(holder = %holder, "waiting for the stream's writer lease");
                        told = Some(holder);
                    }
                    tokio::time::sleep(TTL / 10).await;
                }
                Err(LeaseError::Unreachable(e)) if Instant::now() < deadline => {
                    tracing::warn!(error = %e, "the stream's servers do not answer yet; trying again");
                    tokio::time::sleep(TTL / 10).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Until when the lease is held by this server's clock, kept up to date by
    /// [`Writer::keep`] (past it, the server must not count on serving).
    pub fn validity(&self) -> tokio::sync::watch::Receiver<Instant> {
        self.valid_until.subscribe()
    }

    /// Renews the lease every third of its life until it is lost (returned): another
    /// server took it, or it expired on the servers (the next renewal finds that
    /// out). Servers out of reach are tried again meanwhile: the stream's journals
    /// refuse this server's appends then anyway (503), and a leader election of the
    /// lease's own stream does not stop a server that still holds it. Once `stop`
    /// is sent (a graceful shutdown), the lease is released, so the next server
    /// need not wait it out; if `stop` is dropped, it is left to expire.
    pub async fn keep(mut self, mut stop: tokio::sync::oneshot::Receiver<()>) -> Option<LeaseError> {
        loop {
            tokio::select! {
                () = tokio::time::sleep(TTL / 3) => {}
                stopped = &mut stop => {
                    if stopped.is_ok() {
                        if let Err(e) = self.leases.release(self.lease).await {
                            tracing::warn!(error = %e, "releasing the stream's writer lease failed; it expires by itself");
                        }
                    }
                    return None;
                }
            }
            let renewed = self.leases.renew(&mut self.lease).await;
            self.valid_until.send_replace(self.lease.valid_until());
            match renewed {
                Ok(()) => {}
                Err(LeaseError::Lost) => return Some(LeaseError::Lost),
                Err(e) => tracing::warn!(error = %e, "renewing the stream's writer lease failed; trying again"),
            }
        }
    }
}
