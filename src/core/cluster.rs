//! A cluster node (`cluster.node`): several kami servers on one stream, each
//! serving the shards whose leases it holds.
//!
//! - The ownership loop ([`crate::cluster::node`]) places every shard of every
//!   product on one live node and takes, renews and hands over the leases.
//! - [`ClusterNode::follow`] turns what the loop publishes into the stock actors'
//!   state: a shard whose lease this node took is rebuilt from the stream
//!   ([`shard::Own`]); one handed over drops its state ([`shard::Disown`]); every
//!   shard's [`crate::actors::place::Place`] holds the instant its lease ends, so a
//!   call never reaches a shard past it even if the loop stalls.
//! - [`ClusterNode::learn`] follows the shared catalogue: a product created on
//!   another node starts here (its shards served elsewhere until placed here), a
//!   change made elsewhere (terms, shelf, points price, group deals) takes effect.
//! - [`ClusterNode::owner`] answers which node serves a shard and at which address,
//!   for the HTTP front, which forwards a request there (or answers 307).
//! - Stock counters: each node puts the durable counters of the shards it serves in
//!   the `{stream}_GAUGES` bucket when they change (at most every
//!   [`GAUGE_EVERY`]), and every node takes the others' into its shards' gauges,
//!   so a product's stock view, the catalogue's `available`, the status page and
//!   the stock webhooks count every shard wherever it is served (a shard served
//!   elsewhere as of its node's last put: a second or two behind). Each entry names
//!   the node that put it, so `/status.json` shows who serves what.
//!
//! Limits: the nodes whose addresses are remembered ([`MAX_NODES`]); counters put
//! at once ([`MAX_GAUGE_CALLS`]) and one entry's bytes ([`MAX_GAUGE_BYTES`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;

use super::Kami;
use crate::actors::shard;
use crate::cluster::catalogue::{Catalogue, Change, ProductEntry};
use crate::cluster::lease::Leases;
use crate::cluster::node::{Node, NodeOptions, Owned};
use crate::domain::shard::Counts;
use crate::domain::{ShardAudit, ShardId};
use crate::storage::jetstream::JetStream;

/// Most bytes of one node's shard audits (16 bytes per key and per payment).
const MAX_AUDIT_BYTES: u64 = 1 << 30;

/// Most node addresses remembered (the cluster's nodes; a cluster is a handful).
pub const MAX_NODES: usize = 256;
/// Longest an address is taken from memory before it is read again (a node that
/// restarted elsewhere).
const ADDRESS_TTL: Duration = Duration::from_secs(30);
/// How long a start waits for the stream's servers to serve the cluster's buckets.
const JOIN_PATIENCE: Duration = Duration::from_secs(30);
/// How often the loop is told of products added here (besides every pass).
const SHARDS_CHECK: Duration = Duration::from_millis(200);
/// How often a node puts the changed counters of the shards it serves.
pub const GAUGE_EVERY: Duration = Duration::from_secs(1);
/// Counters put at once.
pub const MAX_GAUGE_CALLS: usize = 64;
/// Most bytes of one shard's counters entry (a sequence and eight counters).
pub const MAX_GAUGE_BYTES: u64 = 256;

/// This node's place in the cluster.
pub struct ClusterNode {
    pub name: String,
    pub advertise: String,
    /// Answer 307 to the owner instead of forwarding (`cluster.redirect`).
    pub redirect: bool,
    /// Sent with a forwarded request (`X-Kami-Forwarded`): the node it reaches
    /// knows the request was admitted (rate limited) by a node of the cluster and
    /// does not forward it again. Derived from the secret the nodes share.
    pub forward_token: String,
    /// The ownership loop (taken by [`ClusterNode::leave`]).
    node: std::sync::Mutex<Option<Node>>,
    owned: tokio::sync::watch::Receiver<Owned>,
    owners: Leases,
    addresses: async_nats::jetstream::kv::Store,
    /// Each shard's durable counters, put by the node serving it.
    gauges: async_nats::jetstream::kv::Store,
    known: std::sync::Mutex<HashMap<String, (String, std::time::Instant)>>,
    /// The node that last put each shard's counters (the shard's owner then), as
    /// the counters watch saw it; only shards of products known here.
    seen_owners: std::sync::Mutex<BTreeMap<String, String>>,
    pub http: reqwest::Client,
}

/// The lease key of a shard: its journal's subject.
pub fn lease_key(id: &ShardId) -> String {
    crate::storage::jetstream::shard_journal(id)
}

/// The lease keys of the ledger shards (points and coupons): their journals'
/// subjects (`points.3`, `coupons.0`).
fn ledger_keys() -> impl Iterator<Item = String> {
    use crate::storage::jetstream::ledger_journal;
    let points = (0..crate::actors::points::POINTS_SHARDS).map(ledger_journal::<crate::domain::points::PointsBook>);
    let coupons = (0..crate::actors::coupons::COUPON_SHARDS).map(ledger_journal::<crate::domain::coupon::CouponBook>);
    points.chain(coupons)
}

/// Every shard the cluster places: each of every product the registry holds, and
/// every ledger shard, as lease keys.
fn shards_of(core: &Kami) -> BTreeSet<String> {
    core.registry
        .all()
        .values()
        .flat_map(|r| (0..r.shards.len()).map(|i| lease_key(&ShardId::new(r.info.id.clone(), i as u16))))
        .chain(ledger_keys())
        .collect()
}

/// How many shards [`shards_of`] has.
fn shard_count(core: &Kami) -> usize {
    core.registry.all().values().map(|r| r.shards.len()).sum::<usize>() + ledger_keys().count()
}

impl ClusterNode {
    /// Joins the cluster on `js` (buckets `{stream}_MEMBERS`, `{stream}_OWNERS` and
    /// `{stream}_NODES`, the latter holding each node's address) and starts
    /// following what it places here.
    pub async fn join(
        js: &JetStream,
        settings: &crate::config::ClusterSettings,
        core: Arc<Kami>,
        forward_token: String,
        request_timeout: Duration,
    ) -> Result<Arc<ClusterNode>, String> {
        let stream = &js.options().stream;
        let ttl = Duration::from_millis(settings.lease_ttl_ms);
        // Buckets just made have no leader for a moment (servers electing one
        // answer "no stream found"): each step is tried again for a while.
        let patience = std::time::Instant::now() + JOIN_PATIENCE;
        let again = |e: &String| {
            tracing::warn!(error = %e, "joining the cluster: the stream's servers do not answer yet; trying again");
            true
        };
        let pause = Duration::from_millis(250);
        let addresses = crate::cluster::patiently(
            patience,
            pause,
            || async {
                let addresses = crate::cluster::bucket(js, &format!("{stream}_NODES"), None, Some(1024)).await?;
                addresses
                    .put(&settings.node, settings.advertise.clone().into())
                    .await
                    .map_err(|e| format!("publish this node's address: {e}"))?;
                Ok(addresses)
            },
            again,
        )
        .await?;
        let gauges_bucket = format!("{stream}_GAUGES");
        let gauges = crate::cluster::patiently(
            patience,
            pause,
            || crate::cluster::bucket(js, &gauges_bucket, None, Some(MAX_GAUGE_BYTES as usize)),
            again,
        )
        .await?;
        let mut options = NodeOptions::new(&settings.node, ttl);
        options.members_bucket = format!("{stream}_MEMBERS");
        options.owners_bucket = format!("{stream}_OWNERS");
        let owners = crate::cluster::patiently(
            patience,
            pause,
            || async { Leases::open(js, &options.owners_bucket, &settings.node, ttl).await.map_err(|e| e.to_string()) },
            again,
        )
        .await?;
        let node = crate::cluster::patiently(
            patience,
            pause,
            || async { Node::join(js, options.clone(), shards_of(&core)).await.map_err(|e| e.to_string()) },
            again,
        )
        .await?;
        let http = reqwest::Client::builder()
            .timeout(request_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| format!("forwarding client: {e}"))?;
        let me = Arc::new(ClusterNode {
            name: settings.node.clone(),
            advertise: settings.advertise.trim_end_matches('/').to_string(),
            redirect: settings.redirect,
            forward_token,
            owned: node.owned(),
            node: std::sync::Mutex::new(Some(node)),
            owners,
            addresses,
            gauges,
            known: std::sync::Mutex::new(HashMap::new()),
            seen_owners: std::sync::Mutex::new(BTreeMap::new()),
            http,
        });
        let _ = core.cluster.set(me.clone());
        tokio::spawn(me.clone().share_gauges(core.clone()));
        tokio::spawn(me.clone().learn_gauges(core.clone()));
        tokio::spawn(me.clone().follow(core));
        tracing::info!(node = %settings.node, advertise = %settings.advertise, ttl_ms = settings.lease_ttl_ms, "joined the cluster");
        Ok(me)
    }

    /// Applies what the ownership loop publishes to the stock actors, and tells
    /// the loop of products added here, until the process ends.
    async fn follow(self: Arc<Self>, core: Arc<Kami>) {
        let mut owned = self.owned.clone();
        let mut serving: BTreeSet<String> = BTreeSet::new();
        let mut shards = shards_of(&core);
        let mut check = tokio::time::interval(SHARDS_CHECK);
        loop {
            tokio::select! {
                changed = owned.changed() => if changed.is_err() { return },
                _ = check.tick() => {
                    // Products are only ever added (a deleted one keeps its shards).
                    if shard_count(&core) == shards.len() {
                        continue;
                    }
                    let now = shards_of(&core);
                    if now != shards {
                        shards = now;
                        let node = self.node.lock().unwrap_or_else(|e| e.into_inner());
                        if let Some(Err(e)) = node.as_ref().map(|n| n.set_shards(shards.clone())) {
                            tracing::error!(error = %e, "the cluster cannot place this many shards");
                        }
                    }
                    continue;
                }
            }
            let now = owned.borrow_and_update().clone();
            apply(&core, &now, &mut serving);
        }
    }

    /// Puts the counters of the shards served here that changed since last put,
    /// every [`GAUGE_EVERY`], until the process ends. A put that fails is tried at
    /// the next round.
    async fn share_gauges(self: Arc<Self>, core: Arc<Kami>) {
        let mut put: HashMap<String, (u64, Counts)> = HashMap::new();
        let mut tick = tokio::time::interval(GAUGE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let owned = self.owned.borrow().clone();
            let now = std::time::Instant::now();
            let mut due = Vec::new();
            for route in core.registry.all().values() {
                for handle in &route.shards {
                    let key = lease_key(&handle.place.shard);
                    let gauge = handle.gauge.read();
                    if owned.serves(&key, now) && put.get(&key) != Some(&gauge) {
                        due.push((key, gauge));
                    }
                }
            }
            // A ledger shard's entry only names its node (put once per tenure).
            for key in ledger_keys() {
                if owned.serves(&key, now) && !put.contains_key(&key) {
                    due.push((key, (0, Counts::default())));
                }
            }
            put.retain(|key, _| owned.shards.contains_key(key));
            let (gauges, name) = (&self.gauges, &self.name);
            let done: Vec<(String, (u64, Counts), bool)> = futures::stream::iter(due)
                .map(|(key, gauge)| async move {
                    let value = bincode::serialize(&(gauge.0, gauge.1, name)).expect("counters serialise");
                    let stored = gauges.put(&key, value.into()).await;
                    if let Err(e) = &stored {
                        tracing::debug!(shard = %key, error = %e, "stock counters not put; next round");
                    }
                    (key, gauge, stored.is_ok())
                })
                .buffer_unordered(MAX_GAUGE_CALLS)
                .collect()
                .await;
            for (key, gauge, stored) in done {
                if stored {
                    put.insert(key, gauge);
                }
            }
        }
    }

    /// Takes one shard's counters, as a node put them under `key`
    /// (`stock.<product>.<shard>`), into its gauge here, and notes that node as the
    /// shard's owner; an entry naming no shard here or that does not decode is
    /// passed over.
    fn learn_gauge(&self, core: &Kami, key: &str, value: &[u8]) {
        if ledger_keys().any(|k| k == key) {
            // A ledger shard's entry: only who serves it.
            if let Ok((_, _, node)) = super::remote::decode::<(u64, Counts, String)>(value, MAX_GAUGE_BYTES) {
                self.seen_owners.lock().unwrap_or_else(|e| e.into_inner()).insert(key.to_string(), node);
            }
            return;
        }
        let Some((product, shard)) = key.strip_prefix("stock.").and_then(|k| k.rsplit_once('.')) else { return };
        let (Some(route), Ok(shard)) = (core.registry.get(product), shard.parse::<usize>()) else { return };
        let Some(handle) = route.shards.get(shard) else { return };
        match super::remote::decode::<(u64, Counts, String)>(value, MAX_GAUGE_BYTES) {
            Ok((seq, counts, node)) => {
                handle.gauge.learn(seq, counts);
                self.seen_owners.lock().unwrap_or_else(|e| e.into_inner()).insert(key.to_string(), node);
            }
            Err(e) => tracing::warn!(shard = %key, error = %e, "stock counters that do not decode"),
        }
    }

    /// Takes every node's counters into the gauges of the shards they name (each
    /// gauge keeps the newest by journal sequence, so a shard's own actor here is
    /// never set back), until the process ends; a broken watch is opened again.
    async fn learn_gauges(self: Arc<Self>, core: Arc<Kami>) {
        use async_nats::jetstream::kv::Operation;
        loop {
            // Every shard's last counters first (a node that starts late learns the
            // idle shards too), then every put.
            match self.gauges.watch_with_history(">").await {
                Ok(mut entries) => {
                    while let Some(Ok(entry)) = entries.next().await {
                        if entry.operation == Operation::Put {
                            self.learn_gauge(&core, &entry.key, &entry.value);
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot follow the stock counters of other nodes; trying again"),
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// The *other* node serving `shard` and its address, for a request, a shard
    /// call or an audit sent there: [`super::Error::NoOwner`] (503 `shard_moving`)
    /// when none holds its lease now, or this one does (its actor is not rebuilt
    /// yet); `Unavailable` when the owners bucket cannot be read.
    pub async fn owner_elsewhere(&self, shard: &ShardId) -> Result<(String, String), super::Error> {
        self.lease_owner_elsewhere(&lease_key(shard), shard).await
    }

    /// [`ClusterNode::owner_elsewhere`] of the shard whose lease key is `key`
    /// (`shard` names it in errors).
    pub async fn lease_owner_elsewhere(&self, key: &str, shard: &ShardId) -> Result<(String, String), super::Error> {
        match self.owner_of(key).await {
            Ok(Some((node, address))) if node != self.name => Ok((node, address)),
            Ok(_) => Err(super::Error::NoOwner(shard.clone())),
            Err(e) => {
                tracing::warn!(shard = %shard, error = %e, "cannot read who serves a shard");
                Err(super::Error::Unavailable(format!("cannot find the node serving shard {shard}: {e}")))
            }
        }
    }

    /// The node serving `shard` and its address: `None` when no node holds its
    /// lease now (it is moving).
    pub async fn owner(&self, shard: &ShardId) -> Result<Option<(String, String)>, String> {
        self.owner_of(&lease_key(shard)).await
    }

    /// The node holding lease `key` and its address (`None`: nobody now).
    async fn owner_of(&self, key: &str) -> Result<Option<(String, String)>, String> {
        let Some(holder) = self.owners.holder(key).await.map_err(|e| e.to_string())? else {
            return Ok(None);
        };
        if let Some((address, at)) = self.known.lock().unwrap_or_else(|e| e.into_inner()).get(&holder) {
            if at.elapsed() < ADDRESS_TTL {
                return Ok(Some((holder, address.clone())));
            }
        }
        let entry = self.addresses.get(&holder).await.map_err(|e| format!("read {holder}'s address: {e}"))?;
        let Some(address) = entry.map(|b| String::from_utf8_lossy(&b).trim_end_matches('/').to_string()) else {
            return Err(format!("node {holder} holds the shard but published no address"));
        };
        let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        if known.len() >= MAX_NODES {
            known.clear();
        }
        known.insert(holder.clone(), (address.clone(), std::time::Instant::now()));
        Ok(Some((holder, address)))
    }

    /// Stops serving every shard and hands their leases over at once (a clean
    /// stop: the other nodes take them without waiting for the TTL).
    pub async fn leave(&self) {
        let node = self.node.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(node) = node {
            node.leave().await;
        }
    }

    /// Why this node cannot serve now as a member of the cluster (`None`: it can).
    /// A node that is not a member (its first pass has not run yet, or it cannot
    /// renew its membership: cut off from the stream, or paused past its lease)
    /// holds no shard and cannot tell where the others are.
    pub fn not_member(&self) -> Option<String> {
        (!self.owned.borrow().member(std::time::Instant::now()))
            .then(|| "not a member of the cluster now (joining, or its membership lease lapsed)".to_string())
    }

    /// What `/status.json` shows of the cluster: this node, whether it is a member
    /// now, the shards it serves now, and who serves what (`nodes`: each node with
    /// the shards it put counters for last, this node's own as it serves them now).
    pub fn describe(&self) -> serde_json::Value {
        let owned = self.owned.borrow();
        let now = std::time::Instant::now();
        let serving: BTreeSet<&String> =
            owned.shards.iter().filter(|(_, &until)| now < until).map(|(s, _)| s).collect();
        let mut nodes: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        nodes.insert(&self.name, serving.iter().map(|s| s.as_str()).collect());
        let seen = self.seen_owners.lock().unwrap_or_else(|e| e.into_inner());
        for (shard, node) in seen.iter().filter(|(shard, node)| *node != &self.name && !serving.contains(shard)) {
            nodes.entry(node).or_default().push(shard);
        }
        serde_json::json!({
            "node": self.name,
            "advertise": self.advertise,
            "redirect": self.redirect,
            "member": owned.member(now),
            "shards_served": serving,
            "nodes": nodes,
        })
    }

    /// Follows the shared catalogue: every product and change made on any node
    /// takes effect here (this node's own changes come back too, and change
    /// nothing). Runs until the process ends; a broken watch is opened again.
    pub async fn learn(core: Arc<Kami>, catalogue: Arc<Catalogue>) {
        loop {
            match catalogue.watch().await {
                Ok(mut changes) => {
                    while let Some(change) = changes.next().await {
                        match change {
                            Ok(Change::Put(entry, _)) => {
                                if let Err(e) = core.adopt(&entry).await {
                                    tracing::error!(product = %entry.product.id, error = %e, "a product from the shared catalogue could not be taken");
                                }
                            }
                            Ok(Change::Removed(id, _)) => {
                                tracing::warn!(product = %id, "a product's entry left the shared catalogue; this node keeps it")
                            }
                            Err(e) => {
                                tracing::error!(error = %e, "the shared catalogue holds an entry that cannot be read")
                            }
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot follow the shared catalogue; trying again"),
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

/// Brings every shard's place and actor (stock and ledger) in line with `owned`:
/// `serving` holds the shards this node served after the last call.
fn apply(core: &Kami, owned: &Owned, serving: &mut BTreeSet<String>) {
    let now = std::time::Instant::now();
    let mut place = |key: String, place: &crate::actors::place::Place, own: &dyn Fn(bool)| match owned.shards.get(&key)
    {
        Some(&until) if now < until => {
            place.hold_until(until);
            if serving.insert(key) {
                tracing::info!(shard = %place.shard, "serving this shard: its lease is this node's");
                own(true);
            }
        }
        _ => {
            place.leave();
            if serving.remove(&key) {
                tracing::info!(shard = %place.shard, "no longer serving this shard");
                own(false);
            }
        }
    };
    for route in core.registry.all().values() {
        for handle in &route.shards {
            place(lease_key(&handle.place.shard), &handle.place, &|own| match own {
                true => handle.addr.do_send(shard::Own),
                false => handle.addr.do_send(shard::Disown),
            });
        }
    }
    use crate::storage::jetstream::ledger_journal;
    for (i, handle) in core.points.iter().enumerate() {
        place(ledger_journal::<crate::domain::points::PointsBook>(i as u16), &handle.place, &|own| match own {
            true => handle.addr.do_send(shard::Own),
            false => handle.addr.do_send(shard::Disown),
        });
    }
    for (i, handle) in core.coupons.iter().enumerate() {
        place(ledger_journal::<crate::domain::coupon::CouponBook>(i as u16), &handle.place, &|own| match own {
            true => handle.addr.do_send(shard::Own),
            false => handle.addr.do_send(shard::Disown),
        });
    }
}

impl Kami {
    /// Takes `entry` from the shared catalogue: into the data directory (so a
    /// restart has it) and into force here. A product this node lacks is started
    /// (its shards served elsewhere until placed here).
    pub(crate) async fn adopt(&self, entry: &ProductEntry) -> Result<(), super::Error> {
        let id = entry.product.id.clone();
        if self.in_force(entry) {
            // This node's own change coming back, or one it already took.
            return Ok(());
        }
        // Written whole (import overwrites what the directory held of it): a restart
        // has it.
        let (storage, taken) = (self.storage.clone(), entry.clone());
        tokio::task::spawn_blocking(move || -> Result<(), crate::storage::StorageError> {
            super::catalogue::import(&storage, &taken)?;
            storage.flush_now()
        })
        .await
        .map_err(|e| super::Error::Unavailable(e.to_string()))??;
        match entry.points_price {
            Some(p) => self.points_prices.insert(id.clone(), p),
            None => self.points_prices.remove(&id).map(|(_, p)| p),
        };
        match entry.key_mode {
            crate::domain::key_mode::KeyMode::Reusable => self.reusable.insert(id.clone()),
            crate::domain::key_mode::KeyMode::Unique => self.reusable.remove(&id).is_some(),
        };
        for deal in &entry.deals {
            self.deals.insert((deal.product_id.clone(), deal.deal_id.clone()), deal.clone());
        }
        match self.registry.get(&id) {
            None => {
                self.supervisor
                    .send(crate::actors::supervisor::StartProduct(entry.product.clone()))
                    .await
                    .map_err(|_| super::Error::Unavailable("the product supervisor stopped".into()))??;
                tracing::info!(product = %id, "product created on another node started here");
            }
            Some(route) => {
                let terms = entry.terms.clone().unwrap_or_else(|| crate::domain::terms::Terms::of(&entry.product));
                if route.terms.get().terms != terms {
                    route.terms.set(terms);
                }
                if route.shelf.get() != entry.shelf || route.shelf.since_ms() != entry.shelf_since_ms {
                    route.shelf.set(entry.shelf, entry.shelf_since_ms);
                }
            }
        }
        Ok(())
    }

    /// Whether `entry` is what this node has in force already (read from memory:
    /// at start every entry of the catalogue comes through the watch once).
    fn in_force(&self, entry: &ProductEntry) -> bool {
        let id = &entry.product.id;
        let Some(route) = self.registry.get(id) else { return false };
        let terms = entry.terms.clone().unwrap_or_else(|| crate::domain::terms::Terms::of(&entry.product));
        route.info == entry.product
            && route.terms.get().terms == terms
            && route.shelf.get() == entry.shelf
            && route.shelf.since_ms() == entry.shelf_since_ms
            && self.points_prices.get(id).map(|p| *p) == entry.points_price
            && self.key_mode(id) == entry.key_mode
            && entry
                .deals
                .iter()
                .all(|d| self.deals.get(&(d.product_id.clone(), d.deal_id.clone())).is_some_and(|known| *known == *d))
    }
}

/// Declares [`AuditWire`] with `fields` and its conversions from and to
/// [`ShardAudit`]: one list, so a field added to the audit and not here fails to
/// compile (the conversion back misses it).
macro_rules! audit_wire {
    ($($field:ident: $ty:ty),* $(,)?) => {
        /// A shard's audit as one node sends it to another (every field: the
        /// product-wide checks need the transfers, payments and key digests the JSON
        /// view leaves out). Key digests compare across nodes because every node runs
        /// the same build.
        #[derive(serde::Serialize, serde::Deserialize)]
        pub struct AuditWire {
            $($field: $ty),*
        }

        impl From<ShardAudit> for AuditWire {
            fn from(a: ShardAudit) -> AuditWire {
                AuditWire { $($field: a.$field),* }
            }
        }

        impl From<AuditWire> for ShardAudit {
            fn from(a: AuditWire) -> ShardAudit {
                ShardAudit { $($field: a.$field),* }
            }
        }
    };
}

audit_wire! {
    imported: u64,
    available: u64,
    reserved: u64,
    sold: u64,
    withdrawn: u64,
    orders: std::collections::BTreeMap<crate::domain::OrderStatus, u64>,
    violations: Vec<String>,
    shard: u16,
    unsettled: Vec<(u64, u16, u64)>,
    received: BTreeSet<(u16, u64)>,
    redeemed: u64,
    coupon_delivered: std::collections::BTreeMap<String, u64>,
    archived_orders: u64,
    live_orders: u64,
    payment_ids: Vec<u128>,
    key_digests: Vec<u128>,
}

/// The encoding of a node's shard audits (`GET /api/v1/cluster/audit/{product}`).
pub fn encode_audits(audits: Vec<ShardAudit>) -> Vec<u8> {
    let wire: Vec<AuditWire> = audits.into_iter().map(AuditWire::from).collect();
    bincode::serialize(&wire).expect("audits serialise")
}

impl ClusterNode {
    /// The audits of `product`'s shards `wanted` from the nodes serving them (one
    /// call per node), by shard index. A shard no node serves now, or whose node
    /// does not answer, fails the whole audit (it cannot be exact without it).
    pub async fn gather_audits(&self, product: &str, wanted: &[u16]) -> Result<Vec<ShardAudit>, super::Error> {
        let mut by_node: HashMap<String, (String, Vec<u16>)> = HashMap::new();
        for &i in wanted {
            let shard = ShardId::new(product, i);
            let (node, address) = self.owner_elsewhere(&shard).await?;
            by_node.entry(node).or_insert((address, Vec::new())).1.push(i);
        }
        let mut out = Vec::with_capacity(wanted.len());
        for (node, (address, shards)) in by_node {
            let url = format!("{address}/api/v1/cluster/audit/{product}");
            let answer = self
                .http
                .get(url)
                .header("x-kami-forwarded", self.forward_token.as_str())
                .send()
                .await
                .map_err(|e| super::Error::Unavailable(format!("node {node} did not answer the audit: {e}")))?;
            if !answer.status().is_success() {
                return Err(super::Error::Unavailable(format!("node {node} answered the audit {}", answer.status())));
            }
            let bytes = super::read_bounded(answer, MAX_AUDIT_BYTES)
                .await
                .map_err(|e| super::Error::Unavailable(format!("node {node}'s audit: {e}")))?;
            let wire: Vec<AuditWire> = super::remote::decode(&bytes, MAX_AUDIT_BYTES)
                .map_err(|e| super::Error::Unavailable(format!("node {node}'s audit does not decode: {e}")))?;
            for a in wire.into_iter().map(ShardAudit::from) {
                if shards.contains(&a.shard) {
                    out.push(a);
                }
            }
        }
        if out.len() != wanted.len() {
            return Err(super::Error::Unavailable(format!("shards of {product} moved during the audit; try again")));
        }
        Ok(out)
    }
}
