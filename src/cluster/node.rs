//! One node's ownership loop: it keeps its membership alive, works out from the
//! live members which shards it should own ([`super::placement`]), takes, renews
//! and hands over their leases ([`super::lease`]), and publishes what it may serve
//! now ([`Owned`]) for its actors to follow.
//!
//! Every `ttl / 3`, and at once when the shards change, the loop:
//! 1. renews the node's member lease (takes it again if it was lost);
//! 2. lists the live members and places every known shard on one of them;
//! 3. renews the leases of the shards still placed here, and hands over the ones
//!    placed elsewhere: first removed from [`Owned`] (its actors stop), then
//!    released, so the new owner may take it at once instead of after the TTL;
//! 4. tries to take the leases of shards placed here that it does not hold (one
//!    held by a node that died is taken once it expires);
//! 5. publishes [`Owned`]: each shard with the instant its lease ends by this
//!    node's clock. A consumer must not serve a shard past that instant even if the
//!    loop stalls and publishes nothing new.
//!
//! Limits: the shards known ([`MAX_SHARDS`]), the lease calls in flight
//! ([`MAX_LEASE_CALLS`]).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::lease::{Lease, LeaseError, Leases};
use super::placement;
use crate::storage::jetstream::JetStream;

/// Most shards one cluster places. Each pass renews every lease a node holds, 64
/// calls at a time: 2,000 took 32 ms on loopback (2-core box), so a node holding all
/// 16,384 passes in about a quarter of a second, well within the TTL/3 between passes
/// at the default 3 s.
pub const MAX_SHARDS: usize = 1 << 14;
/// Lease calls (renewals, acquisitions) a node has in flight at once.
pub const MAX_LEASE_CALLS: usize = 64;

/// The shards a node may serve now, each until its lease ends, and until when it
/// is a member of the cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Owned {
    pub shards: BTreeMap<String, Instant>,
    /// The end of this node's membership lease (`None`: not a member: joining,
    /// left, or its last renewal failed and the lease lapsed).
    pub member_until: Option<Instant>,
}

impl Owned {
    /// Whether `shard` may be served at `now`.
    pub fn serves(&self, shard: &str, now: Instant) -> bool {
        self.shards.get(shard).is_some_and(|&until| now < until)
    }

    /// Whether this node is a member of the cluster at `now` (its membership lease
    /// has not ended by its own clock).
    pub fn member(&self, now: Instant) -> bool {
        self.member_until.is_some_and(|until| now < until)
    }
}

/// The names of the buckets a cluster keeps its leases in.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// This node's name (letters, digits, `-`, `_`), unique in the cluster.
    pub name: String,
    /// Lease time to live: how long a dead node's shards wait to be taken over.
    pub ttl: Duration,
    pub members_bucket: String,
    pub owners_bucket: String,
}

impl NodeOptions {
    pub fn new(name: &str, ttl: Duration) -> NodeOptions {
        NodeOptions {
            name: name.to_string(),
            ttl,
            members_bucket: "KAMI_MEMBERS".into(),
            owners_bucket: "KAMI_OWNERS".into(),
        }
    }
}

/// A running ownership loop. Dropping it stops the loop *without* releasing
/// anything (as a crash would: the leases expire); [`Node::leave`] hands over.
pub struct Node {
    shards: watch::Sender<BTreeSet<String>>,
    owned: watch::Receiver<Owned>,
    leave: Option<tokio::sync::oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Node {
    /// Joins the cluster and starts the loop with the shards known so far.
    pub async fn join(js: &JetStream, options: NodeOptions, shards: BTreeSet<String>) -> Result<Node, LeaseError> {
        if shards.len() > MAX_SHARDS {
            return Err(LeaseError::Unreachable(format!("{} shards, at most {MAX_SHARDS}", shards.len())));
        }
        let members = Leases::open(js, &options.members_bucket, &options.name, options.ttl).await?;
        let owners = Leases::open(js, &options.owners_bucket, &options.name, options.ttl).await?;
        let (shards_tx, shards_rx) = watch::channel(shards);
        let (owned_tx, owned_rx) = watch::channel(Owned::default());
        let (leave_tx, leave_rx) = tokio::sync::oneshot::channel();
        let state = Loop { members, owners, member: None, held: BTreeMap::new(), shards: shards_rx, owned: owned_tx };
        let task = tokio::spawn(state.run(options.ttl / 3, leave_rx));
        Ok(Node { shards: shards_tx, owned: owned_rx, leave: Some(leave_tx), task })
    }

    /// What this node may serve, updated after every pass of the loop.
    pub fn owned(&self) -> watch::Receiver<Owned> {
        self.owned.clone()
    }

    /// Replaces the shards the cluster places (a product was added or removed).
    pub fn set_shards(&self, shards: BTreeSet<String>) -> Result<(), LeaseError> {
        if shards.len() > MAX_SHARDS {
            return Err(LeaseError::Unreachable(format!("{} shards, at most {MAX_SHARDS}", shards.len())));
        }
        self.shards.send_replace(shards);
        Ok(())
    }

    /// Stops serving everything, releases every lease (other nodes take the shards
    /// over at once) and leaves the members.
    pub async fn leave(mut self) {
        if let Some(tx) = self.leave.take() {
            let _ = tx.send(());
        }
        let _ = (&mut self.task).await;
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Loop {
    members: Leases,
    owners: Leases,
    member: Option<Lease>,
    held: BTreeMap<String, Lease>,
    shards: watch::Receiver<BTreeSet<String>>,
    owned: watch::Sender<Owned>,
}

impl Loop {
    async fn run(mut self, every: Duration, mut leave: tokio::sync::oneshot::Receiver<()>) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                // New shards (a product created) are placed at once, not next tick.
                Ok(()) = self.shards.changed() => {}
                _ = &mut leave => break,
            }
            self.pass().await;
        }
        self.owned.send_replace(Owned::default());
        for (_, lease) in std::mem::take(&mut self.held) {
            let _ = self.owners.release(lease).await;
        }
        if let Some(member) = self.member.take() {
            let _ = self.members.release(member).await;
        }
    }

    async fn pass(&mut self) {
        self.keep_membership().await;
        let live = match self.members.held().await {
            Ok(live) => Some(live),
            Err(e) => {
                tracing::warn!(node = %self.members.node(), error = %e, "cannot list the members; keeping what is held");
                None
            }
        };
        let shards = self.shards.borrow().clone();
        let me = self.members.node().to_string();
        let placed_here = |shard: &str| match &live {
            Some(live) if live.contains(&me) => placement::owner(shard, live) == Some(me.as_str()),
            // Not (yet) listed as a member, or the list is unknown: keep, take nothing new.
            _ => false,
        };

        // Hand over what is placed elsewhere (or no longer exists): unpublished first.
        let leaving: Vec<String> =
            self.held.keys().filter(|s| live.is_some() && (!shards.contains(*s) || !placed_here(s))).cloned().collect();
        if !leaving.is_empty() {
            self.owned.send_modify(|o| {
                for s in &leaving {
                    o.shards.remove(s);
                }
            });
            for s in leaving {
                if let Some(lease) = self.held.remove(&s) {
                    let _ = self.owners.release(lease).await;
                }
            }
        }

        // Renew what is kept, [`MAX_LEASE_CALLS`] at a time.
        let owners = &self.owners;
        let held = std::mem::take(&mut self.held);
        let renewed: Vec<(String, Lease, Result<(), LeaseError>)> = futures::stream::iter(held)
            .map(|(shard, mut lease)| async move {
                let result = owners.renew(&mut lease).await;
                (shard, lease, result)
            })
            .buffer_unordered(MAX_LEASE_CALLS)
            .collect()
            .await;
        for (shard, lease, result) in renewed {
            match result {
                Ok(()) => {}
                Err(LeaseError::Lost) => {
                    tracing::warn!(shard = %shard, "lease lost to another node");
                    continue;
                }
                // Valid until its time; the next pass tries again.
                Err(e) => tracing::warn!(shard = %shard, error = %e, "lease renewal failed"),
            }
            self.held.insert(shard, lease);
        }
        self.held.retain(|_, lease| lease.is_valid());

        // Take what is placed here and free.
        let wanted: Vec<String> =
            shards.iter().filter(|s| !self.held.contains_key(*s) && placed_here(s)).cloned().collect();
        let taken: Vec<(String, Result<Lease, LeaseError>)> = futures::stream::iter(wanted)
            .map(|shard| async move {
                let result = owners.acquire(&shard).await;
                (shard, result)
            })
            .buffer_unordered(MAX_LEASE_CALLS)
            .collect()
            .await;
        for (shard, result) in taken {
            match result {
                Ok(lease) => {
                    self.held.insert(shard, lease);
                }
                Err(LeaseError::Held(_)) => {}
                Err(e) => tracing::warn!(shard = %shard, error = %e, "lease not taken"),
            }
        }

        let owned = Owned {
            shards: self.held.iter().map(|(s, l)| (s.clone(), l.valid_until())).collect(),
            member_until: self.member.as_ref().map(Lease::valid_until),
        };
        self.owned.send_if_modified(|o| {
            let changed = *o != owned;
            *o = owned;
            changed
        });
    }

    async fn keep_membership(&mut self) {
        let me = self.members.node().to_string();
        if let Some(lease) = self.member.as_mut() {
            match self.members.renew(lease).await {
                Ok(()) => return,
                Err(LeaseError::Lost) => self.member = None,
                Err(e) => {
                    tracing::warn!(node = %me, error = %e, "membership renewal failed");
                    return;
                }
            }
        }
        match self.members.acquire(&me).await {
            Ok(lease) => self.member = Some(lease),
            Err(e) => tracing::warn!(node = %me, error = %e, "cannot join the members"),
        }
    }
}
