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

/// Whether `e` is servers not answering (for now), said in the log when so.
fn unreachable_for_now(e: &LeaseError) -> bool {
    let unreachable = matches!(e, LeaseError::Unreachable(_));
    if unreachable {
        tracing::warn!(error = %e, "the stream's servers do not answer yet; trying again");
    }
    unreachable
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
        let bucket = bucket(&js.options().stream);
        let leases =
            super::patiently(deadline, TTL / 10, || Leases::open(js, &bucket, node, TTL), unreachable_for_now).await?;
        let mut told = None;
        let lease = super::patiently(
            deadline,
            TTL / 10,
            || leases.acquire(KEY),
            |e| match e {
                LeaseError::Held(holder) => {
                    if told.as_ref() != Some(holder) {
                        tracing::warn!(holder = %holder, "waiting for the stream's writer lease");
                        told = Some(holder.clone());
                    }
                    true
                }
                e => unreachable_for_now(e),
            },
        )
        .await?;
        let (valid_until, _) = tokio::sync::watch::channel(lease.valid_until());
        Ok(Writer { leases, lease, valid_until })
    }

    /// Until when the lease is held by this server's clock, kept up to date by
    /// [`Writer::keep`] (past it, the server must not count on serving).
    pub fn validity(&self) -> tokio::sync::watch::Receiver<Instant> {
        self.valid_until.subscribe()
    }

    /// Renews the lease every third of its life until it is lost to another server
    /// (returned), which the next renewal after it took the lease finds out. Servers
    /// out of reach are tried again meanwhile: the stream's journals refuse this
    /// server's appends then anyway (503), and a leader election of the lease's own
    /// stream does not stop a server that still holds it. If the election outlasts
    /// the lease, its entry expires on the servers: unless another server took it
    /// meanwhile, it is taken again (the validity is in the past in between). Once `stop`
    /// is sent (a graceful shutdown), the lease is released, so the next server
    /// need not wait it out; if `stop` is dropped, it is left to expire.
    pub async fn keep(mut self, mut stop: tokio::sync::oneshot::Receiver<()>) -> Option<LeaseError> {
        let mut lapsed = false;
        loop {
            tokio::select! {
                () = tokio::time::sleep(TTL / 3) => {}
                stopped = &mut stop => {
                    if stopped.is_ok() && !lapsed {
                        if let Err(e) = self.leases.release(self.lease).await {
                            tracing::warn!(error = %e, "releasing the stream's writer lease failed; it expires by itself");
                        }
                    }
                    return None;
                }
            }
            // A lease whose entry expired on the servers (they were out of reach past
            // its time, electing a leader) is taken again if nobody took it meanwhile;
            // the server answered 503 in between.
            let kept = match lapsed {
                true => self.retake().await,
                false => match self.leases.renew(&mut self.lease).await {
                    Err(LeaseError::Lost) => self.retake().await,
                    renewed => renewed,
                },
            };
            self.valid_until.send_replace(self.lease.valid_until());
            match kept {
                Ok(()) => lapsed = false,
                // Another server holds it: it may be writing the stream now.
                Err(LeaseError::Held(holder)) if !holder.is_empty() => return Some(LeaseError::Lost),
                // It expired between the two calls of the retake: the next round tries again.
                Err(LeaseError::Held(_)) => {
                    tracing::warn!("the stream's writer lease lapsed; taking it again");
                    lapsed = true;
                }
                Err(e) => tracing::warn!(error = %e, "renewing the stream's writer lease failed; trying again"),
            }
        }
    }

    /// Takes the lease again after it lapsed, if no other server holds it.
    async fn retake(&mut self) -> Result<(), LeaseError> {
        let lease = self.leases.acquire(KEY).await?;
        tracing::warn!("the stream's writer lease had lapsed and nobody took it: taken again");
        self.lease = lease;
        Ok(())
    }
}
