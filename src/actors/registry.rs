use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use actix::prelude::*;
use arc_swap::ArcSwap;

use super::admission::Admission;
use super::place::Place;
use super::shard::{ShardActor, ShardEnv, ShardGauge};
use crate::domain::shard::Counts;
use crate::domain::shelf::Shelf;
use crate::domain::terms::Terms;
use crate::domain::ProductInfo;

/// How to reach one stock actor. Cheap to clone (three reference counts).
#[derive(Clone)]
pub struct ShardHandle {
    pub addr: Addr<ShardActor>,
    /// The bounded line in front of this actor (also its mailbox bound).
    pub admission: Arc<Admission>,
    pub gauge: Arc<ShardGauge>,
    /// The index of the arbiter it runs on (see [`super::current_arbiter`]).
    pub arbiter: usize,
    /// Whether it is served here now (always on one server; in a cluster, while
    /// this node holds its lease).
    pub place: Arc<Place>,
}

pub struct ProductRoute {
    pub info: ProductInfo,
    pub shards: Vec<ShardHandle>,
    /// On sale, off the shelf or deleted: read by the order path and by the
    /// product's actors (which refuse anything new off the shelf).
    pub shelf: Arc<ShelfCell>,
    /// Name, price, per-buyer limit and sale window, as last changed (durable).
    pub terms: Arc<TermsCell>,
    /// Keys moving between this product's shards (see `Kami::create_order`).
    pub transfers: TransferTrack,
}

/// What the order path needs to know about transfers between the shards of one
/// product: which dry shard is borrowing, and whether any keys are in transit.
pub struct TransferTrack {
    /// One borrower at a time per dry shard (only orders that found it dry wait here).
    pub borrowing: Vec<tokio::sync::Mutex<()>>,
    /// Transfers begun and ended; equal when no keys are in transit between shards.
    pub started: AtomicU64,
    pub finished: AtomicU64,
}

impl TransferTrack {
    pub fn new(shards: usize) -> TransferTrack {
        TransferTrack {
            borrowing: (0..shards).map(|_| tokio::sync::Mutex::new(())).collect(),
            started: AtomicU64::new(0),
            finished: AtomicU64::new(0),
        }
    }

    /// Where the transfer counters stand now, to ask later [`Self::quiet_since`].
    pub fn mark(&self) -> TransferMark {
        let started = self.started.load(Ordering::SeqCst);
        TransferMark { started, none_in_transit: self.finished.load(Ordering::SeqCst) == started }
    }

    /// True when no keys were in transit at any moment since `mark`: none were when
    /// it was taken, and no transfer has begun since.
    pub fn quiet_since(&self, mark: &TransferMark) -> bool {
        mark.none_in_transit && self.started.load(Ordering::SeqCst) == mark.started
    }

    /// Counts a transfer in transit until the returned guard is dropped (also when
    /// the request carrying it is cancelled half-way).
    pub fn begin(&self) -> InTransit<'_> {
        self.started.fetch_add(1, Ordering::SeqCst);
        InTransit(self)
    }
}

pub struct TransferMark {
    started: u64,
    none_in_transit: bool,
}

pub struct InTransit<'a>(&'a TransferTrack);

impl Drop for InTransit<'_> {
    fn drop(&mut self) {
        self.0.finished.fetch_add(1, Ordering::SeqCst);
    }
}

/// A product's shelf state as last made durable, and since when (Unix ms).
#[derive(Debug, Default)]
pub struct ShelfCell {
    state: AtomicU8,
    since_ms: AtomicU64,
}

impl ShelfCell {
    pub fn new(shelf: Shelf, since_ms: u64) -> ShelfCell {
        ShelfCell { state: AtomicU8::new(shelf.to_u8()), since_ms: AtomicU64::new(since_ms) }
    }

    pub fn get(&self) -> Shelf {
        Shelf::from_u8(self.state.load(Ordering::SeqCst)).expect("only shelf states are stored")
    }

    /// When the state last changed (0: on sale since the product was created).
    pub fn since_ms(&self) -> u64 {
        self.since_ms.load(Ordering::SeqCst)
    }

    /// Only once the state is durable.
    pub fn set(&self, shelf: Shelf, since_ms: u64) {
        self.since_ms.store(since_ms, Ordering::SeqCst);
        self.state.store(shelf.to_u8(), Ordering::SeqCst);
    }
}

/// A product's terms of sale (`domain::terms`), shared by the order path and the
/// product's actors; replaced, with the next version, once a change is durable.
pub struct TermsCell(ArcSwap<VersionedTerms>);

pub struct VersionedTerms {
    /// 1 for the terms the product started with; one more at each change.
    pub version: u64,
    pub terms: Terms,
}

impl TermsCell {
    pub fn new(terms: Terms) -> TermsCell {
        TermsCell(ArcSwap::from_pointee(VersionedTerms { version: 1, terms }))
    }

    pub fn get(&self) -> Arc<VersionedTerms> {
        self.0.load_full()
    }

    /// The version in force, without taking a reference (the actors' per-step check).
    pub fn version(&self) -> u64 {
        self.0.load().version
    }

    pub fn per_buyer_limit(&self) -> u32 {
        self.0.load().terms.per_buyer_limit
    }

    /// Only once the terms are durable, by one writer at a time.
    pub fn set(&self, terms: Terms) {
        let version = self.0.load().version + 1;
        self.0.store(Arc::new(VersionedTerms { version, terms }));
    }
}

impl ProductRoute {
    pub fn new(
        info: ProductInfo,
        shards: Vec<ShardHandle>,
        shelf: Arc<ShelfCell>,
        terms: Arc<TermsCell>,
    ) -> ProductRoute {
        let transfers = TransferTrack::new(shards.len());
        ProductRoute { info, shards, shelf, terms, transfers }
    }

    /// The product as it sells now: its identity with the terms in force.
    pub fn current_info(&self) -> (ProductInfo, Arc<VersionedTerms>) {
        let terms = self.terms.get();
        let mut info = self.info.clone();
        terms.terms.apply_to(&mut info);
        (info, terms)
    }

    /// The product's durable stock counters, all shards together.
    pub fn counts(&self) -> Counts {
        let mut c = Counts::default();
        for s in &self.shards {
            let g = s.gauge.get();
            c.imported += g.imported;
            c.available += g.available;
            c.reserved += g.reserved;
            c.sold += g.sold;
            c.orders += g.orders;
            c.refunds_owed += g.refunds_owed;
            c.paid_waiting += g.paid_waiting;
            c.withdrawn += g.withdrawn;
        }
        c
    }

    /// Requests in line in front of the product's actors, and their drain rate (0
    /// when idle for a second).
    pub fn line(&self) -> (usize, u64) {
        let depth = self.shards.iter().map(|s| s.admission.depth()).sum();
        (depth, self.shards.iter().map(|s| s.admission.recent_drain_per_sec()).sum())
    }

    pub fn shard_index_for_buyer(&self, buyer: &str) -> usize {
        buyer_shard(buyer, self.shards.len())
    }

    /// The shard a new order goes to. A buyer's home shard (its stable hash) when
    /// the product limits orders per buyer (each shard counts its buyers' holdings)
    /// or the request carries an Idempotency-Key (a retry must reach the shard that
    /// may hold the first attempt). Otherwise one of the product's shards on the
    /// caller's own arbiter (by the buyer's hash among them), so the order never
    /// changes thread; else one served by this node (a cluster node serves some);
    /// the home shard when it serves none.
    pub fn shard_index_for_new_order(&self, buyer: &str, per_buyer_limit: u32, idempotent: bool) -> usize {
        if per_buyer_limit == 0 && !idempotent {
            // Of the shards served here (all of them but on a cluster node), those
            // on the caller's arbiter if any.
            let arbiter = super::current_arbiter();
            let on = |same_arbiter: bool| {
                self.shards
                    .iter()
                    .enumerate()
                    .filter(move |(_, s)| (!same_arbiter || Some(s.arbiter) == arbiter) && s.place.is_here())
                    .map(|(i, _)| i)
            };
            for same_arbiter in [true, false] {
                let n = on(same_arbiter).count();
                // A lease may end between the count and the pick (a cluster node's
                // shard leaving): then the next choice.
                if let Some(i) = (n > 0).then(|| on(same_arbiter).nth(buyer_shard(buyer, n))).flatten() {
                    return i;
                }
            }
        }
        self.shard_index_for_buyer(buyer)
    }

    /// The shard that holds every group of a group-buy deal (so its groups can be
    /// joined without a lookup). The same stable hash as buyers', over the deal id.
    pub fn shard_index_for_deal(&self, deal_id: &str) -> usize {
        buyer_shard(deal_id, self.shards.len())
    }

    /// The shard that deduplicates and holds a key when it is imported.
    pub fn shard_index_for_key(&self, key: &str) -> usize {
        crc32fast::hash(key.as_bytes()) as usize % self.shards.len()
    }
}

/// The shard of `shards` that owns `buyer`.
pub fn buyer_shard(buyer: &str, shards: usize) -> usize {
    crc32fast::hash(buyer.as_bytes()) as usize % shards
}

/// Product id → route. Replaced wholesale (copy-on-write) when a product is added,
/// which is rare; lookups on the order path are a lock-free pointer load.
#[derive(Default)]
pub struct Registry {
    routes: ArcSwap<HashMap<String, Arc<ProductRoute>>>,
}

impl Registry {
    pub fn get(&self, product: &str) -> Option<Arc<ProductRoute>> {
        self.routes.load().get(product).cloned()
    }

    pub fn all(&self) -> Arc<HashMap<String, Arc<ProductRoute>>> {
        self.routes.load_full()
    }

    pub fn insert(&self, route: ProductRoute) {
        let route = Arc::new(route);
        self.routes.rcu(|current| {
            let mut next = HashMap::clone(current);
            next.insert(route.info.id.clone(), route.clone());
            next
        });
    }
}

/// Starts one stock actor under a supervisor on `arbiter`: from recovered state,
/// or (a cluster node) with none, served elsewhere until this node takes the
/// shard's lease ([`super::shard::Own`]).
pub fn start_shard(
    env: &Arc<ShardEnv>,
    (arbiter_index, arbiter): (usize, &ArbiterHandle),
    (product, index): (&ProductInfo, u16),
    (shelf, terms): (&Arc<ShelfCell>, &Arc<TermsCell>),
    recovered: Option<super::shard::Rebuilt>,
) -> ShardHandle {
    let id = crate::domain::ShardId::new(product.id.clone(), index);
    // The recovered counts are shown from now on, not from when the arbiter gets
    // round to building the actor: a view read right after a start is whole.
    let gauge = Arc::new(ShardGauge::default());
    let place = Arc::new(match &recovered {
        Some(r) => {
            gauge.publish(r.last_seq, r.shard.counts());
            Place::here(id)
        }
        None => Place::elsewhere(id),
    });
    let (e, p, g, at) = (env.clone(), product.clone(), gauge.clone(), place.clone());
    let (s, t) = (shelf.clone(), terms.clone());
    let addr = Supervisor::start_in_arbiter(arbiter, move |_| ShardActor::new(e, p, g, (s, t), at, recovered));
    let admission = Arc::new(Admission::new(env.mailbox_capacity, env.max_queue_wait_ms));
    ShardHandle { addr, admission, gauge, arbiter: arbiter_index, place }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transit_is_seen_while_a_transfer_runs_and_ends_when_it_is_dropped() {
        let track = TransferTrack::new(2);
        let before = track.mark();
        assert!(track.quiet_since(&before));
        let transfer = track.begin();
        assert!(!track.quiet_since(&before), "a transfer begun since the mark");
        let during = track.mark();
        assert!(!track.quiet_since(&during), "a transfer in transit when the mark was taken");
        // A cancelled request drops its transfer half-way: the count must still end.
        drop(transfer);
        assert!(track.quiet_since(&track.mark()));
    }

    /// The arbiter builds a stock actor when it gets round to it; the product's
    /// counts must be whole before then (a view read right after a start).
    #[test]
    fn a_started_shard_shows_its_recovered_counts_before_its_actor_is_built() {
        use crate::domain::{ProductInfo, ShardId};
        use crate::storage::{Storage, StorageOptions};
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(&StorageOptions {
            path: dir.path().to_path_buf(),
            cache_capacity_bytes: 1 << 20,
            max_pending_commits: 16,
            max_commit_batch: 16,
            commit_linger: std::time::Duration::ZERO,
            commit_busy_linger: std::time::Duration::ZERO,
        })
        .unwrap();
        let product = ProductInfo {
            id: "p".into(),
            name: "P".into(),
            price_cents: 1,
            per_buyer_limit: 0,
            shards: 1,
            created_at_ms: 0,
        };
        let mut recovered = storage.recover(&ShardId::new("p", 0), &product).unwrap();
        recovered.shard.import_keys((0..7).map(|i| format!("K{i}")).collect());
        let env = Arc::new(ShardEnv {
            storage,
            stream: None,
            claims: Arc::new(crate::actors::claims::PaymentClaims::new()),
            clock: Arc::new(crate::clock::SystemClock),
            ttl_ms: 1_000,
            expiry_tick: std::time::Duration::from_secs(1),
            max_expired_per_tick: 1,
            snapshot_min_journal_bytes: 1 << 20,
            mailbox_capacity: 16,
            max_queue_wait_ms: 0,
            archive_after_ms: 0,
            idempotency_ttl_ms: 0,
            clustered: false,
        });
        actix_rt::System::new().block_on(async move {
            // The arbiter is held busy: the actor cannot be built until it is let go.
            let arbiter = actix_rt::Arbiter::new();
            let (hold, held) = std::sync::mpsc::channel::<()>();
            assert!(arbiter.spawn_fn(move || held.recv().unwrap_or_default()));
            let cells = (Arc::new(ShelfCell::default()), Arc::new(TermsCell::new(Terms::of(&product))));
            let handle =
                start_shard(&env, (0, &arbiter.handle()), (&product, 0), (&cells.0, &cells.1), Some(recovered.into()));
            let counts = handle.gauge.get();
            assert_eq!((counts.imported, counts.available), (7, 7));
            hold.send(()).unwrap();
            arbiter.stop();
            arbiter.join().unwrap();
        });
    }
}
