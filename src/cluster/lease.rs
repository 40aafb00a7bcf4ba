//! Ownership by lease, kept in a JetStream key-value bucket.
//!
//! A lease is the bucket's entry for one key (a shard, `stock.7.0`), whose value is
//! the holder's node name. The bucket's `max_age` is the lease's time to live: an
//! entry not written again within it is removed by the servers, and only then may
//! another node create it. So:
//!
//! - **acquire** creates the entry (refused while any node holds it);
//! - **renew** updates it with the revision the holder last wrote, which fails if
//!   the entry expired and someone else created it since: the lease is then
//!   [`LeaseError::Lost`];
//! - the holder counts its lease valid until `sent + ttl - margin`, where `sent` is
//!   when it sent the write that the servers acknowledged. The servers start the
//!   entry's age when they store that write, which is later than `sent`, so the
//!   holder's own clock ends the lease before the servers can expire it: a holder
//!   that cannot reach the servers (a partition, a long pause) stops serving before
//!   anyone else may start. Fencing by the journal's expected sequence covers the
//!   rest (see [`crate::cluster`]).
//! - **release** deletes the entry if it is still the holder's (a clean stop hands
//!   the shard over at once instead of after the time to live).
//! - a write whose answer was lost (the bucket's leader died after storing it, the
//!   call timed out) leaves the holder one revision behind its own entry. A renewal
//!   (or a retried acquire) that is refused reads the entry back: if it is still
//!   this node's, the holder adopts its revision and writes again, rather than
//!   taking its own write for another node's. Node names are therefore unique
//!   among the live processes of a cluster (a server's writer-lease name carries
//!   its process id and a random part).
//!
//! Live nodes are leases too: each node holds the key of its own name in a members
//! bucket, and the keys in it are the nodes [`super::placement`] places shards on.

use std::time::{Duration, Instant};

use async_nats::jetstream::kv::{self, CreateErrorKind, Operation, UpdateErrorKind};
use futures::TryStreamExt;

use crate::storage::jetstream::JetStream;

/// Why a lease could not be taken or kept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaseError {
    /// Another node holds it.
    #[error("held by node {0}")]
    Held(String),
    /// It expired and someone else took it (or it was removed).
    #[error("the lease was lost")]
    Lost,
    /// The servers did not answer as expected; the lease stays valid until its time.
    #[error("lease store: {0}")]
    Unreachable(String),
}

fn unreachable(what: &str, e: impl std::fmt::Display) -> LeaseError {
    LeaseError::Unreachable(format!("{what}: {e}"))
}

/// A lease this node holds.
#[derive(Debug, Clone)]
pub struct Lease {
    key: String,
    revision: u64,
    valid_until: Instant,
}

impl Lease {
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The revision of the holder's last write (grows with every renewal).
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// Until when the holder may act on it (by its own clock).
    pub fn valid_until(&self) -> Instant {
        self.valid_until
    }

    pub fn is_valid(&self) -> bool {
        Instant::now() < self.valid_until
    }
}

/// The leases of one bucket, as seen by one node.
pub struct Leases {
    kv: kv::Store,
    node: String,
    ttl: Duration,
    margin: Duration,
}

impl Leases {
    /// Opens (or creates) bucket `bucket`, whose entries live `ttl` unless renewed,
    /// for node `node` (a NATS key token: letters, digits, `-`, `_`).
    pub async fn open(js: &JetStream, bucket: &str, node: &str, ttl: Duration) -> Result<Leases, LeaseError> {
        if node.is_empty() || !node.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            return Err(LeaseError::Unreachable(format!("node name {node:?} is not a key token")));
        }
        let kv = super::bucket(js, bucket, Some(ttl), None).await.map_err(LeaseError::Unreachable)?;
        Ok(Leases { kv, node: node.to_string(), ttl, margin: ttl / 10 })
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    fn valid_from(&self, sent: Instant) -> Instant {
        sent + self.ttl - self.margin
    }

    /// Takes the lease of `key` if no node holds it.
    pub async fn acquire(&self, key: &str) -> Result<Lease, LeaseError> {
        let sent = Instant::now();
        match self.kv.create(key, self.node.clone().into()).await {
            Ok(revision) => Ok(Lease { key: key.to_string(), revision, valid_until: self.valid_from(sent) }),
            Err(e) if e.kind() == CreateErrorKind::AlreadyExists => match self.entry(key).await? {
                // An earlier attempt of this node's was stored, its answer lost. When
                // that was is unknown: the lease counts from the write made now.
                Some((holder, revision)) if holder == self.node => {
                    let mut lease = Lease { key: key.to_string(), revision, valid_until: Instant::now() };
                    match self.write(&mut lease).await {
                        Ok(()) => Ok(lease),
                        // Taken or expired meanwhile: the caller may try again.
                        Err(LeaseError::Lost) => Err(LeaseError::Held(String::new())),
                        Err(e) => Err(e),
                    }
                }
                Some((holder, _)) => Err(LeaseError::Held(holder)),
                // Expired between the two calls: the caller may simply try again.
                None => Err(LeaseError::Held(String::new())),
            },
            Err(e) => Err(unreachable(&format!("acquire {key}"), e)),
        }
    }

    /// Extends `lease` by the time to live from now.
    pub async fn renew(&self, lease: &mut Lease) -> Result<(), LeaseError> {
        let lost = match self.write(lease).await {
            Err(LeaseError::Lost) => LeaseError::Lost,
            done => return done,
        };
        // Refused: either another node's entry now, or this node's own write whose
        // answer was lost. Only the latter is adopted (its revision, not its time:
        // until the write below is acknowledged, the lease ends when the last
        // acknowledged one said).
        let adopted = match self.entry(&lease.key).await {
            Ok(Some((holder, revision))) if holder == self.node && revision > lease.revision => {
                lease.revision = revision;
                self.write(lease).await
            }
            Ok(_) => Err(lost),
            Err(e) => Err(e),
        };
        if adopted == Err(LeaseError::Lost) {
            lease.valid_until = Instant::now().min(lease.valid_until);
        }
        adopted
    }

    /// Writes `lease` again on its revision: extends it by the time to live from
    /// now, or `Lost` if the entry's revision moved (another node's, or removed).
    async fn write(&self, lease: &mut Lease) -> Result<(), LeaseError> {
        let sent = Instant::now();
        match self.kv.update(&lease.key, self.node.clone().into(), lease.revision).await {
            Ok(revision) => {
                lease.revision = revision;
                lease.valid_until = self.valid_from(sent);
                Ok(())
            }
            Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => Err(LeaseError::Lost),
            Err(e) => Err(unreachable(&format!("renew {}", lease.key), e)),
        }
    }

    /// Gives `lease` up at once (if it is still this node's).
    pub async fn release(&self, lease: Lease) -> Result<(), LeaseError> {
        self.kv
            .delete_expect_revision(&lease.key, Some(lease.revision))
            .await
            .map_err(|e| unreachable(&format!("release {}", lease.key), e))
    }

    /// The node holding `key`, if any.
    pub async fn holder(&self, key: &str) -> Result<Option<String>, LeaseError> {
        Ok(self.entry(key).await?.map(|(holder, _)| holder))
    }

    /// The node holding `key` and the revision of its entry, if any.
    async fn entry(&self, key: &str) -> Result<Option<(String, u64)>, LeaseError> {
        let entry = self.kv.entry(key).await.map_err(|e| unreachable(&format!("read {key}"), e))?;
        Ok(entry
            .filter(|e| e.operation == Operation::Put)
            .map(|e| (String::from_utf8_lossy(&e.value).into_owned(), e.revision)))
    }

    /// Every key held now, sorted (for a members bucket: the live nodes).
    pub async fn held(&self) -> Result<Vec<String>, LeaseError> {
        let keys = self.kv.keys().await.map_err(|e| unreachable("list leases", e))?;
        let mut keys: Vec<String> = keys.try_collect().await.map_err(|e| unreachable("list leases", e))?;
        keys.sort();
        Ok(keys)
    }
}
