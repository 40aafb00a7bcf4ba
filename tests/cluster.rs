//! A kami cluster on loopback: three nats-servers keeping a replicated stream
//! (`scripts/test.sh` installs them), three kami nodes (`cluster.node`) sharing
//! its shards by lease. Real processes, killed with SIGKILL and paused with
//! SIGSTOP: every acknowledged purchase is served afterwards, from whichever node
//! took its shard over, and no key is ever delivered twice.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use common::nats::{free_port, nats_or_skip, Nats, Relay};
use common::{assert_audit_ok, reply, Api, Server};

/// One cluster at a time: three nats-servers and up to three nodes already load two
/// cores; two clusters at once would time their leases out by starvation.
/// (tokio's lock: each test's runtime waits for it without blocking a thread, and a
/// test that failed holding it does not poison it.)
static ONE_CLUSTER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A node's environment: the stream of `nats` (through `urls`), its name and
/// fixed address.
fn node_env(nats: &Nats, urls: &[String], stream: &str, name: &str, port: u16) -> Vec<(&'static str, String)> {
    let options = nats.options();
    vec![
        ("KAMI_SERVER__LISTEN", format!("127.0.0.1:{port}")),
        ("KAMI_STORAGE__BACKEND", "jetstream".into()),
        ("KAMI_STORAGE__JETSTREAM__URLS", urls.join(",")),
        ("KAMI_STORAGE__JETSTREAM__STREAM", stream.into()),
        ("KAMI_STORAGE__JETSTREAM__REPLICAS", options.replicas.to_string()),
        ("KAMI_ACTORS__ARBITERS", "1".into()),
        ("KAMI_CLUSTER__NODE", name.into()),
        ("KAMI_CLUSTER__ADVERTISE", format!("http://127.0.0.1:{port}")),
        ("KAMI_LOG__LEVEL", "info".into()),
    ]
}

/// The nodes of one cluster, each on its own data directory.
struct Cluster {
    _dir: tempfile::TempDir,
    nodes: Vec<Option<Server>>,
    names: Vec<String>,
}

impl Cluster {
    /// The last warnings, errors and panics node `n` logged, for a failure's message.
    fn said(&self, n: usize) -> String {
        let Some(node) = self.nodes[n].as_ref() else { return format!("node{n} is stopped") };
        let said: Vec<String> = ["WARN", "ERROR", "panicked"].iter().flat_map(|w| node.lines_with(w)).collect();
        said[said.len().saturating_sub(30)..].join("\n")
    }

    async fn start(nats: &Nats, stream: &str, n: usize) -> Cluster {
        let urls = nats.options().urls;
        Cluster::start_through(nats, stream, &vec![urls; n], &[]).await
    }

    /// A node per list of server addresses (`urls[i]` for node `i`), each with
    /// `extra` settings too.
    async fn start_through(nats: &Nats, stream: &str, urls: &[Vec<String>], extra: &[(&str, &str)]) -> Cluster {
        drop(nats.connect().await);
        let dir = tempfile::tempdir().unwrap();
        let names: Vec<String> = (0..urls.len()).map(|i| format!("node{i}")).collect();
        let starting: Vec<_> = names
            .iter()
            .zip(urls)
            .map(|(name, urls)| {
                let env = node_env(nats, urls, stream, name, free_port());
                let mut env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
                env.extend_from_slice(extra);
                Server::spawn(&dir.path().join(name), &env)
            })
            .collect();
        let nodes = starting.into_iter().map(|s| Some(s.ready())).collect();
        Cluster { _dir: dir, nodes, names }
    }

    fn api(&self, i: usize) -> Api {
        self.nodes[i].as_ref().expect("a live node").api()
    }

    fn live(&self) -> Vec<usize> {
        (0..self.nodes.len()).filter(|&i| self.nodes[i].is_some()).collect()
    }

    /// Shard → the node serving it, as the live nodes' `/status.json` say.
    async fn served(&self) -> BTreeMap<String, Vec<String>> {
        let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for i in self.live() {
            let api = self.api(i);
            let status = reply(api.http.get(format!("{}/status.json", api.url))).await;
            for shard in status.body["cluster"]["shards_served"].as_array().cloned().unwrap_or_default() {
                out.entry(shard.as_str().unwrap().to_string()).or_default().push(self.names[i].clone());
            }
        }
        out
    }

    /// Waits until each of `shards` is served by exactly one live node.
    async fn placed(&self, shards: &[&str]) -> BTreeMap<String, String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let served = self.served().await;
            if shards.iter().all(|s| served.get(*s).is_some_and(|n| n.len() == 1)) {
                return served.into_iter().map(|(s, mut n)| (s, n.pop().unwrap())).collect();
            }
            assert!(Instant::now() < deadline, "shards never placed: {served:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A purchase as far as it was acknowledged.
#[derive(Debug, Clone)]
struct Bought {
    order_id: String,
    token: String,
    paid: bool,
}

/// Order and pay through `api`; anything but 201/200 must be a 503 (a shard
/// moving between nodes), and then counts as not acknowledged.
async fn try_buy(api: &Api, buyer: &str) -> Option<Bought> {
    let created = api.order("hot", 1, buyer, None).await;
    if created.status != 201 {
        assert_eq!(
            created.status,
            503,
            "only unavailable while a shard moves: {buyer} at {} via {:?}: {:?}",
            api.url,
            created.headers.get("x-kami-node"),
            created.body
        );
        return None;
    }
    let order_id = created.body["order_id"].as_str().unwrap().to_string();
    let token = created.body["query_token"].as_str().unwrap().to_string();
    let paid = api.notify(&order_id, &format!("pay-{buyer}"), 990).await;
    assert!(paid.status == 200 || paid.status == 503, "{:?}", paid.body);
    Some(Bought { order_id, token, paid: paid.status == 200 })
}

/// Every acknowledged order is served through `api`, every acknowledged payment
/// delivered it a key, and no key went to two orders.
async fn serves_everything(api: &Api, bought: &[Bought]) {
    let mut keys = HashSet::new();
    for b in bought {
        // A shard just placed on a node answers 503 while it is rebuilt: a client
        // tries again (an order that is lost would answer 404, or never 200).
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut got = api.get_order(&b.order_id, &b.token).await;
        while got.status == 503 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
            got = api.get_order(&b.order_id, &b.token).await;
        }
        assert_eq!(got.status, 200, "acknowledged order {} lost: {:?}", b.order_id, got.body);
        if b.paid {
            assert_eq!(got.body["status"], "delivered", "{:?}", got.body);
        }
        for key in got.body["keys"].as_array().cloned().unwrap_or_default() {
            assert!(keys.insert(key.as_str().unwrap().to_string()), "key {key} delivered twice");
        }
    }
}

/// Imports `keys` into `hot` through `api` as a merchant's client does: again after a 503
/// (a shard just placed is still being rebuilt; a repeat counts as duplicates).
async fn import_all(api: &Api, keys: &[String]) {
    import_into(api, "hot", keys).await;
}

/// Imports `keys` into `product` through `api`, trying again while a shard moves.
async fn import_into(api: &Api, product: &str, keys: &[String]) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = api.import(product, keys).await;
        if r.status == 200 {
            return;
        }
        assert_eq!(r.status, 503, "{:?}", r.body);
        assert!(Instant::now() < deadline, "import never went through: {:?}", r.body);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The live audit, asked of `api`, covers every shard wherever it is served: it
/// passes, and counts as sold at least every acknowledged payment and at most
/// every acknowledged order.
async fn audit_counts(api: &Api, bought: &[Bought]) {
    // A shard just placed answers 503 while it is rebuilt, as for any read.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut audit = api.audit().await;
    while audit.status == 503 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        audit = api.audit().await;
    }
    assert_eq!(audit.status, 200, "the audit: {:?}", audit.body);
    assert_audit_ok(&audit);
    let sold = audit.body["products"][0]["sold"].as_u64().unwrap();
    let paid = bought.iter().filter(|b| b.paid).count() as u64;
    assert!((paid..=bought.len() as u64).contains(&sold), "{sold} sold, {paid} paid of {}", bought.len());
}

/// Sends the request `make` builds until it is answered other than 503, as a
/// client does while a shard moves or is rebuilt (a lease renewal late on a busy
/// machine moves it too), for at most 30 s.
async fn settled(make: impl Fn() -> reqwest::RequestBuilder) -> common::Reply {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = reply(make()).await;
        if got.status != 503 || Instant::now() > deadline {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Through node `asked`: the product's stock counts every shard; the merchant's
/// order listing and export and the sold-key listing hold every order of `bought` (all paid, one key each) wherever its shard
/// is served, and a buyer's lookup finds every order they placed through any node.
async fn reads_cover_every_shard(cluster: &Cluster, asked: usize, bought: &[Bought]) {
    let api = cluster.api(asked);
    let want: HashSet<&str> = bought.iter().map(|b| b.order_id.as_str()).collect();

    // The product's stock counts every shard: each node puts its shards' counters
    // in the cluster's bucket once they change, a moment after they do.
    let sold = bought.len() as u64;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let product = settled(|| api.admin(api.http.get(format!("{}/api/v1/admin/products/hot", api.url)))).await;
        assert_eq!(product.status, 200, "{:?}", product.body);
        let stock = &product.body["stock"];
        let counts = ["imported", "available", "reserved", "sold"].map(|c| stock[c].as_u64().unwrap());
        if counts == [300, 300 - sold, 0, sold] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the stock view through {} never counted every shard: {stock}",
            cluster.names[asked]
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let public = reply(api.http.get(format!("{}/api/v1/products/hot", api.url))).await;
    assert_eq!(public.body["available"].as_u64(), Some(300 - sold), "{:?}", public.body);
    let listed =
        settled(|| api.admin(api.http.get(format!("{}/api/v1/admin/orders?product=hot&limit=500", api.url)))).await;
    assert_eq!(listed.status, 200, "{:?}", listed.body);
    let ids: HashSet<&str> =
        listed.body["orders"].as_array().unwrap().iter().map(|o| o["order_id"].as_str().unwrap()).collect();
    assert_eq!(ids, want, "the listing through {} holds every shard's orders", cluster.names[asked]);

    let export_url = format!("{}/api/v1/admin/orders/export?format=ndjson&product=hot", api.url);
    let deadline = Instant::now() + Duration::from_secs(30);
    let export = loop {
        let export = api.admin(api.http.get(&export_url)).send().await.unwrap();
        if export.status() != 503 || Instant::now() > deadline {
            break export;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(export.status(), 200);
    let text = export.text().await.unwrap();
    let exported: HashSet<String> = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["order_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(exported.len(), want.len(), "the export holds every shard's orders");
    assert!(exported.iter().all(|id| want.contains(id.as_str())));

    let keys_url = format!("{}/api/v1/admin/products/hot/keys?state=sold&limit=500&reveal=true", api.url);
    let keys = settled(|| api.admin(api.http.get(&keys_url))).await;
    assert_eq!(keys.status, 200, "{:?}", keys.body);
    assert_eq!(keys.body["keys"].as_array().unwrap().len(), bought.len(), "every shard's sold keys: {:?}", keys.body);

    // One buyer orders through every node (each node picks a shard it serves).
    let mut placed = HashSet::new();
    for i in 0..6 {
        let api = cluster.api(i % 3);
        let created = settled(|| {
            api.http.post(format!("{}/api/v1/orders", api.url)).json(&serde_json::json!({
                "product_id": "hot", "quantity": 1, "buyer": "finder@example.com", "query_password": "open-sesame-1"
            }))
        })
        .await;
        assert_eq!(created.status, 201, "{:?}", created.body);
        placed.insert(created.body["order_id"].as_str().unwrap().to_string());
    }
    let found = settled(|| {
        api.http.post(format!("{}/api/v1/orders/lookup", api.url)).json(&serde_json::json!({
            "buyer": "finder@example.com", "query_password": "open-sesame-1", "limit": 100
        }))
    })
    .await;
    assert_eq!(found.status, 200, "{:?}", found.body);
    let found: HashSet<String> =
        found.body["orders"].as_array().unwrap().iter().map(|o| o["order_id"].as_str().unwrap().to_string()).collect();
    // (An order answered 503 after a timeout may exist too: a subset, not equal.)
    assert!(
        placed.is_subset(&found),
        "the lookup through {} finds the buyer's orders on every shard: {found:?} for {placed:?}",
        cluster.names[asked]
    );
}

/// A node that serves some of `owners`' shards but not all, so that a request
/// through it that needs every shard meets shards served elsewhere *and* its own
/// (sent on whole to another node, it would meet this one's there); failing that
/// (all on one node), one that serves none.
fn partial_node(cluster: &Cluster, owners: &BTreeMap<String, String>) -> usize {
    let serves = |n: usize| owners.values().filter(|o| **o == cluster.names[n]).count();
    (0..cluster.names.len())
        .find(|&n| (1..owners.len()).contains(&serves(n)))
        .or_else(|| (0..cluster.names.len()).find(|&n| serves(n) == 0))
        .unwrap()
}

/// Through a node that does not serve every shard of a product, what writes or
/// counts every shard reaches the ones other nodes serve: withdrawals (named keys
/// and a count), a reusable key's units, and deletion's count of open orders.
async fn writes_reach_every_shard(cluster: &Cluster) {
    let api0 = cluster.api(0);
    assert_eq!(api0.create_product("spare", 500, 0, 3).await.status, 201);
    let owners = cluster.placed(&["stock.spare.0", "stock.spare.1", "stock.spare.2"]).await;
    let asked = partial_node(cluster, &owners);
    let api = cluster.api(asked);
    let keys: Vec<String> = (0..30).map(|i| format!("SPARE-{i:03}")).collect();
    import_into(&api, "spare", &keys).await;

    let url = format!("{}/api/v1/admin/products/spare/keys/withdraw", api.url);
    let withdrawn_url = format!("{}/api/v1/admin/products/spare/keys?state=withdrawn&limit=500", api.url);
    let withdrawn = || async { settled(|| api.admin(api.http.get(&withdrawn_url))).await.body["keys"].clone() };
    // Named keys: again after a 503 (one shard did not answer; a key withdrawn
    // before is then not in stock), so the listing says what was withdrawn.
    let named = settled(|| api.admin(api.http.post(&url)).json(&serde_json::json!({"keys": keys[..10]}))).await;
    assert_eq!(named.status, 200, "{:?}", named.body);
    assert_eq!(withdrawn().await.as_array().unwrap().len(), 10, "named keys on every shard");
    // A count: a 503 means nothing was taken (a shard failing after others took
    // some answers 200 with how many).
    let counted = settled(|| api.admin(api.http.post(&url)).json(&serde_json::json!({"count": 5}))).await;
    assert_eq!((counted.status, counted.body["withdrawn"].as_u64()), (200, Some(5)), "{:?}", counted.body);
    assert_eq!(withdrawn().await.as_array().unwrap().len(), 15);

    // A reusable key's units spread over every shard, wherever served.
    let body =
        serde_json::json!({"id": "reuse", "name": "Reuse", "price_cents": 100, "shards": 3, "key_mode": "reusable"});
    let created = reply(api0.admin(api0.http.post(format!("{}/api/v1/products", api0.url))).json(&body)).await;
    assert_eq!(created.status, 201, "{:?}", created.body);
    let reuse_owners = cluster.placed(&["stock.reuse.0", "stock.reuse.1", "stock.reuse.2"]).await;
    let r = cluster.api(partial_node(cluster, &reuse_owners));
    let stock_url = format!("{}/api/v1/admin/products/reuse/stock", r.url);
    // Shards just placed answer 503 while they are rebuilt: the merchant tries again
    // (a repeat adds only what is missing).
    let deadline = Instant::now() + Duration::from_secs(30);
    let set = loop {
        let set =
            reply(r.admin(r.http.put(&stock_url)).json(&serde_json::json!({"key": "SHARED-KEY", "units": 30}))).await;
        if set.status != 503 || Instant::now() > deadline {
            break set;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(set.status, 200, "{:?}", set.body);
    let units_url = format!("{}/api/v1/admin/products/reuse/keys?state=available&limit=500", r.url);
    let units = settled(|| r.admin(r.http.get(&units_url))).await;
    let shards: HashSet<u64> =
        units.body["keys"].as_array().unwrap().iter().map(|k| k["shard"].as_u64().unwrap()).collect();
    assert_eq!(units.body["keys"].as_array().unwrap().len(), 30, "every unit, on every shard: {:?}", units.body);
    assert_eq!(shards.len(), 3, "units on every shard: {:?}", units.body);
    // A shard call larger than `server.max_body_bytes` (1 MiB): a long key's units,
    // about 4,096 of ~260 bytes per shard, sent to the nodes serving the others.
    let long = serde_json::json!({"key": "L".repeat(250), "units": 12_288});
    let big = settled(|| r.admin(r.http.put(&stock_url)).json(&long)).await;
    assert_eq!(big.status, 200, "{:?}", big.body);
    let again =
        settled(|| r.admin(r.http.put(&stock_url)).json(&serde_json::json!({"key": "SHARED-KEY", "units": 30}))).await;
    assert_eq!((again.status, again.body["added"].as_u64()), (200, Some(0)), "{:?}", again.body);

    // An open order on a shard `asked` does not serve keeps the product from being
    // deleted; once cancelled, it is deleted.
    let other = (0..3).find(|&n| n != asked && owners.values().any(|o| *o == cluster.names[n])).unwrap();
    let other_api = cluster.api(other);
    let open = settled(|| other_api.order_request("spare", 1, "holder@example.com")).await;
    assert_eq!(open.status, 201, "{:?}", open.body);
    let order_id = open.body["order_id"].as_str().unwrap();
    assert_ne!(owners[&shard_of(order_id)], cluster.names[asked], "the order is on a shard served elsewhere");
    let product_url = format!("{}/api/v1/admin/products/spare", api.url);
    let retired = settled(|| api.admin(api.http.post(format!("{product_url}/retire")))).await;
    assert_eq!(retired.status, 200, "{:?}", retired.body);
    let refused = settled(|| api.admin(api.http.delete(&product_url))).await;
    assert_eq!(refused.status, 409, "{:?}", refused.body);
    assert_eq!(refused.body["error"]["code"], "product_has_open_orders");
    assert_eq!(refused.body["error"]["open_orders"]["pending_payment"].as_u64(), Some(1), "{:?}", refused.body);
    let token = open.body["query_token"].as_str().unwrap();
    let cancelled = settled(|| {
        other_api.http.post(format!("{}/api/v1/orders/{order_id}/cancel", other_api.url)).header("X-Order-Token", token)
    })
    .await;
    assert_eq!(cancelled.status, 200, "{:?}", cancelled.body);
    let deleted = settled(|| api.admin(api.http.delete(&product_url))).await;
    assert_eq!((deleted.status, deleted.body["shelf"].as_str()), (200, Some("deleted")), "{:?}", deleted.body);
}

/// The shard an order id names (`hot.2.17` → `stock.hot.2`).
fn shard_of(order_id: &str) -> String {
    let mut parts = order_id.rsplitn(2, '.');
    let _seq = parts.next();
    format!("stock.{}", parts.next().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sale_across_three_nodes_goes_on_when_one_is_killed_and_every_acknowledged_purchase_is_served() {
    let Some(bin) = nats_or_skip() else { return };
    let _one = ONE_CLUSTER.lock().await;
    let nats = Nats::start_n(bin, 3, None);
    let mut cluster = Cluster::start(&nats, "KAMICLUSTER", 3).await;
    let api0 = cluster.api(0);
    let created = api0.create_product("hot", 990, 0, 3).await;
    assert_eq!(created.status, 201, "{:?}", created.body);
    let owners = cluster.placed(&["stock.hot.0", "stock.hot.1", "stock.hot.2"]).await;
    eprintln!("placement: {owners:?}");

    // Keys imported through one node reach the shards the others serve.
    let keys: Vec<String> = (0..300).map(|i| format!("HOT-{i:04}")).collect();
    import_all(&cluster.api(1), &keys).await;
    let again = cluster.api(2).import("hot", &keys).await;
    assert_eq!(
        (again.body["imported"].as_u64(), again.body["duplicates"].as_u64()),
        (Some(0), Some(300)),
        "every key is in stock once, whichever node imported it: {:?}",
        again.body
    );

    // Buyers on every node; orders and payments reach the shard's owner.
    let mut bought = Vec::new();
    for i in 0..60 {
        let api = cluster.api(i % 3);
        bought.push(try_buy(&api, &format!("b{i}@example.com")).await.expect("all nodes up: acknowledged"));
    }
    assert!(bought.iter().all(|b| b.paid));
    // Any node reads any order (forwarded to its shard's owner), and audits them all.
    serves_everything(&cluster.api(2), &bought).await;
    audit_counts(&cluster.api(0), &bought).await;
    // Each answer comes from the node serving the order's shard, whichever was asked.
    for b in &bought[..12] {
        let got = cluster.api(0).get_order(&b.order_id, &b.token).await;
        let by = got.headers.get("x-kami-node").and_then(|v| v.to_str().ok()).unwrap_or("");
        assert_eq!(by, owners[&shard_of(&b.order_id)], "order {} answered by its shard's owner", b.order_id);
    }

    // What reads every shard (listings, export, the buyer's lookup) answers whole
    // through a node that does not serve them all.
    let asked = partial_node(&cluster, &owners);
    // Any node shows who serves what (`cluster.nodes`), its own shards and the others'.
    let api = cluster.api(asked);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = reply(api.http.get(format!("{}/status.json", api.url))).await;
        let nodes = &status.body["cluster"]["nodes"];
        let seen: BTreeMap<String, String> = owners
            .keys()
            .filter_map(|shard| {
                let node = nodes.as_object()?.iter().find(|(_, s)| s.as_array().unwrap().iter().any(|x| x == shard))?;
                Some((shard.clone(), node.0.clone()))
            })
            .collect();
        if seen == owners {
            break;
        }
        assert!(Instant::now() < deadline, "status.json never showed who serves what: {nodes} for {owners:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    reads_cover_every_shard(&cluster, asked, &bought).await;
    writes_reach_every_shard(&cluster).await;

    // kill -9 the node serving the most shards, while buyers go on on the others.
    let victim_name = {
        let mut count: BTreeMap<&str, usize> = BTreeMap::new();
        for n in owners.values() {
            *count.entry(n.as_str()).or_default() += 1;
        }
        count.into_iter().max_by_key(|(_, c)| *c).unwrap().0.to_string()
    };
    let victim = cluster.names.iter().position(|n| *n == victim_name).unwrap();
    let moved: Vec<&String> = owners.iter().filter(|(_, n)| **n == victim_name).map(|(s, _)| s).collect();
    let probe = bought.iter().find(|b| moved.contains(&&shard_of(&b.order_id))).cloned();
    cluster.nodes[victim].take().unwrap().kill9();
    let killed = Instant::now();
    let survivors = cluster.live();
    let mut failover = None;
    // Until the moved shards answer again and 50 more purchases were paid (all
    // three shards may have been on the killed node: none sells until then).
    let mut i = 60;
    while failover.is_none() || bought.iter().filter(|b| b.paid).count() < 110 {
        let api = cluster.api(survivors[i % survivors.len()]);
        match try_buy(&api, &format!("b{i}@example.com")).await {
            Some(b) => bought.push(b),
            // A shard moving: a buyer's client tries again a moment later.
            None => tokio::time::sleep(Duration::from_millis(20)).await,
        }
        if failover.is_none() {
            if let Some(p) = &probe {
                if api.get_order(&p.order_id, &p.token).await.status == 200 {
                    failover = Some(killed.elapsed());
                }
            } else {
                failover = Some(Duration::ZERO);
            }
        }
        assert!(killed.elapsed() < Duration::from_secs(60), "the killed node's shards never served again");
        i += 1;
    }
    let failover = failover.unwrap();
    eprintln!(
        "fail-over: kill -9 of {victim_name} to its shard's first answer from another node: {} ms",
        failover.as_millis()
    );
    let after = cluster.placed(&["stock.hot.0", "stock.hot.1", "stock.hot.2"]).await;
    assert!(after.values().all(|n| *n != victim_name), "{after:?}");
    for s in cluster.live() {
        serves_everything(&cluster.api(s), &bought).await;
        audit_counts(&cluster.api(s), &bought).await;
    }
    let delivered = bought.iter().filter(|b| b.paid).count();
    assert!((110..=294).contains(&delivered), "{delivered} delivered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_owner_never_answers_for_a_shard_another_node_took_over() {
    let Some(bin) = nats_or_skip() else { return };
    let _one = ONE_CLUSTER.lock().await;
    let nats = Nats::start_n(bin, 3, None);
    let cluster = Cluster::start(&nats, "KAMIPAUSE", 2).await;
    let api0 = cluster.api(0);
    assert_eq!(api0.create_product("hot", 990, 0, 2).await.status, 201);
    let owners = cluster.placed(&["stock.hot.0", "stock.hot.1"]).await;
    let keys: Vec<String> = (0..200).map(|i| format!("HOT-{i:04}")).collect();
    import_all(&api0, &keys).await;
    let mut bought = Vec::new();
    for i in 0..20 {
        bought.push(try_buy(&cluster.api(i % 2), &format!("b{i}@example.com")).await.expect("acknowledged"));
    }

    // Pause a node that serves a shard past its lease: the other takes it over.
    let paused_name = owners["stock.hot.0"].clone();
    let paused = cluster.names.iter().position(|n| *n == paused_name).unwrap();
    let other = 1 - paused;
    let pid = cluster.nodes[paused].as_ref().unwrap().child.id() as libc::pid_t;
    // SAFETY: kill(2) with the pid of our own child and a valid signal.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    let deadline = Instant::now() + Duration::from_secs(60);
    let other_api = cluster.api(other);
    let mut i = 20;
    loop {
        let served = cluster.served_by(other).await;
        if served.contains("stock.hot.0") && served.contains("stock.hot.1") {
            break;
        }
        assert!(Instant::now() < deadline, "the paused node's shards were never taken over: {served:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The new owner sells on every shard, including the paused node's.
    for _ in 0..20 {
        if let Some(b) = try_buy(&other_api, &format!("b{i}@example.com")).await {
            bought.push(b);
        }
        i += 1;
    }
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0);
    // Whatever the resumed node answers, it is never a write to a shard it lost:
    // every 2xx it gives is in the new owner's history.
    let resumed_api = cluster.api(paused);
    for _ in 0..20 {
        if let Some(b) = try_buy(&resumed_api, &format!("b{i}@example.com")).await {
            bought.push(b);
        }
        i += 1;
    }
    serves_everything(&other_api, &bought).await;
    serves_everything(&resumed_api, &bought).await;
    let said = cluster.nodes[paused].as_ref().unwrap().lines_with("no longer serving this shard");
    assert!(!said.is_empty(), "the resumed node gave its shard up");
}

impl Cluster {
    /// The stock shards node `i` says it serves.
    async fn served_by(&self, i: usize) -> HashSet<String> {
        let api = self.api(i);
        let status = reply(api.http.get(format!("{}/status.json", api.url))).await;
        status.body["cluster"]["shards_served"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .filter_map(|s| s.as_str().filter(|s| s.starts_with("stock.")).map(str::to_string))
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_off_from_the_stream_acknowledges_nothing_the_stream_does_not_hold() {
    let Some(bin) = nats_or_skip() else { return };
    let _one = ONE_CLUSTER.lock().await;
    let nats = Nats::start_n(bin, 3, None);
    // Every node reaches the servers through relays the test can cut.
    let relays: Vec<Vec<Relay>> = (0..2).map(|_| nats.ports.iter().map(|p| Relay::to(*p)).collect()).collect();
    let urls: Vec<Vec<String>> =
        relays.iter().map(|r| r.iter().map(|r| format!("nats://127.0.0.1:{}", r.port)).collect()).collect();
    let cluster = Cluster::start_through(&nats, "KAMIPARTITION", &urls, &[]).await;
    assert_eq!(cluster.api(0).create_product("hot", 990, 0, 4).await.status, 201);
    let shards = ["stock.hot.0", "stock.hot.1", "stock.hot.2", "stock.hot.3"];
    let owners = cluster.placed(&shards).await;
    let keys: Vec<String> = (0..2000).map(|i| format!("HOT-{i:04}")).collect();
    import_all(&cluster.api(1), &keys).await;
    let mut bought = Vec::new();
    for i in 0..20 {
        bought.push(try_buy(&cluster.api(i % 2), &format!("b{i}@example.com")).await.expect("acknowledged"));
    }

    // Cut off the node serving more shards; buyers go on on both nodes.
    let serves = |n: &str| owners.values().filter(|o| o.as_str() == n).count();
    let cut = if serves("node0") >= serves("node1") { 0 } else { 1 };
    let other = 1 - cut;
    for r in &relays[cut] {
        r.cut();
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut i, mut refused_while_cut) = (20, 0);
    loop {
        for n in [cut, other] {
            match try_buy(&cluster.api(n), &format!("b{i}@example.com")).await {
                Some(b) => bought.push(b),
                None if n == cut => refused_while_cut += 1,
                None => tokio::time::sleep(Duration::from_millis(20)).await,
            }
            i += 1;
        }
        if cluster.served_by(other).await.len() == shards.len() {
            break;
        }
        // Buyers at a human pace: the sale must not run out before the takeover.
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(Instant::now() < deadline, "the cut-off node's shards were never taken over");
    }
    assert!(refused_while_cut > 0, "the cut-off node stopped acknowledging");
    // Everything either node acknowledged is in the stream: the other node serves it.
    serves_everything(&cluster.api(other), &bought).await;

    // Healed, the node rejoins and takes its share again; nothing is lost.
    for r in &relays[cut] {
        r.heal();
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while cluster.served_by(cut).await.is_empty() {
        if Instant::now() > deadline {
            let status = reply(cluster.api(cut).http.get(format!("{}/status.json", cluster.api(cut).url))).await;
            panic!("the healed node never served again: {}\n{}", status.body["cluster"], cluster.said(cut));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cluster.placed(&shards).await;
    for n in [cut, other] {
        if let Some(b) = try_buy(&cluster.api(n), &format!("b{i}@example.com")).await {
            bought.push(b);
        }
        i += 1;
    }
    serves_everything(&cluster.api(cut), &bought).await;
    // Should the audit stay unavailable (a shard placed with no state), what each node said.
    let deadline = Instant::now() + Duration::from_secs(30);
    while cluster.api(cut).audit().await.status == 503 {
        if Instant::now() > deadline {
            let status = reply(cluster.api(other).http.get(format!("{}/status.json", cluster.api(other).url))).await;
            panic!(
                "the audit stayed unavailable: {}\nnode{cut} (cut off, healed):\n{}\nnode{other}:\n{}",
                status.body["cluster"],
                cluster.said(cut),
                cluster.said(other)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    audit_counts(&cluster.api(cut), &bought).await;
}

/// `/readyz` of `api`: its status and, on 503, the reason.
async fn readiness(api: &Api) -> (u16, String) {
    let r = reply(api.http.get(format!("{}/readyz", api.url))).await;
    (r.status, r.body["error"]["message"].as_str().unwrap_or("").to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sale_goes_on_when_a_nats_server_is_killed_and_stops_acknowledging_without_a_quorum() {
    let Some(bin) = nats_or_skip() else { return };
    let _one = ONE_CLUSTER.lock().await;
    let mut nats = Nats::start_n(bin, 3, None);
    let stream = "KAMINATSKILL";
    let cluster = Cluster::start(&nats, stream, 2).await;
    assert_eq!(cluster.api(0).create_product("hot", 990, 0, 2).await.status, 201);
    let shards = ["stock.hot.0", "stock.hot.1"];
    cluster.placed(&shards).await;
    let keys: Vec<String> = (0..400).map(|i| format!("HOT-{i:04}")).collect();
    import_all(&cluster.api(1), &keys).await;
    let mut bought = Vec::new();
    for i in 0..20 {
        bought.push(try_buy(&cluster.api(i % 2), &format!("b{i}@example.com")).await.expect("acknowledged"));
    }

    // kill -9 the stream's leader: the two others elect a new one and the sale goes on.
    let leader = nats.settled(stream, &[0, 1, 2], true).await;
    nats.kill(leader);
    let killed = Instant::now();
    let (mut i, mut after) = (20, 0);
    while after < 30 {
        match try_buy(&cluster.api(i % 2), &format!("b{i}@example.com")).await {
            Some(b) => {
                bought.push(b);
                after += 1;
            }
            // Servers electing a leader: a buyer's client tries again a moment later.
            None => tokio::time::sleep(Duration::from_millis(50)).await,
        }
        i += 1;
        assert!(killed.elapsed() < Duration::from_secs(60), "no sale after server n{leader} died");
    }
    eprintln!("kill -9 of nats-server n{leader}: 30 purchases acknowledged {} ms later", killed.elapsed().as_millis());

    // Restarted, it catches up; then another server dies and nothing acknowledged is
    // lost (the restarted one now holds one of the two copies left).
    nats.restart(leader);
    nats.settled(stream, &[0, 1, 2], true).await;
    let second = (leader + 1) % 3;
    nats.kill(second);
    for n in cluster.live() {
        serves_everything(&cluster.api(n), &bought).await;
    }

    // One server of three left: no quorum. Neither node acknowledges a purchase, and
    // each says on /readyz that it is not a member of the cluster now.
    let third = (leader + 2) % 3;
    nats.kill(third);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut unready: HashSet<usize> = HashSet::new();
    while unready.len() < 2 {
        for n in cluster.live() {
            let (status, why) = readiness(&cluster.api(n)).await;
            if status == 503 && why.contains("member") {
                unready.insert(n);
            }
        }
        assert!(Instant::now() < deadline, "nodes never said they cannot serve: {unready:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for n in cluster.live() {
        let refused = try_buy(&cluster.api(n), &format!("b{i}@example.com")).await;
        assert!(refused.is_none(), "acknowledged without a quorum: {refused:?}");
        i += 1;
    }

    // The servers back: both nodes are ready again, sell, and serve every purchase.
    nats.restart(second);
    nats.restart(third);
    let deadline = Instant::now() + Duration::from_secs(60);
    for n in cluster.live() {
        while readiness(&cluster.api(n)).await.0 != 200 {
            assert!(Instant::now() < deadline, "node {n} never ready again");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    cluster.placed(&shards).await;
    for n in cluster.live() {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(b) = try_buy(&cluster.api(n), &format!("b{i}@example.com")).await {
                bought.push(b);
                break;
            }
            i += 1;
            assert!(Instant::now() < deadline, "node {n} never sold again");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        i += 1;
    }
    serves_everything(&cluster.api(0), &bought).await;
    audit_counts(&cluster.api(1), &bought).await;
}

/// A buyer's points line as a node reads it: (balance, kinds of its ledger lines).
async fn points_of(api: &Api, buyer: &str) -> (u64, Vec<String>) {
    let url = format!("{}/api/v1/admin/buyers/{buyer}/points/ledger", api.url);
    let got = settled(|| api.admin(api.http.get(&url))).await;
    assert_eq!(got.status, 200, "{:?}", got.body);
    let kinds = got.body["entries"].as_array().unwrap_or_else(|| panic!("no entries: {}", got.body));
    let kinds = kinds.iter().map(|e| e["kind"].as_str().unwrap().to_string()).collect();
    (got.body["balance"].as_u64().unwrap(), kinds)
}

/// Spends 10 points of `buyer`'s for one key of `gift` (the same `key` replays).
async fn redeem(api: &Api, buyer: &str, key: &str) -> common::Reply {
    let body = serde_json::json!({"buyer": buyer, "product_id": "gift", "quantity": 1});
    settled(|| api.http.post(format!("{}/api/v1/redemptions", api.url)).header("Idempotency-Key", key).json(&body))
        .await
}

/// A coupon's uses held and used, as a node reads them.
async fn coupon_uses(api: &Api, code: &str) -> u64 {
    let got = settled(|| api.admin(api.http.get(format!("{}/api/v1/admin/coupons/{code}", api.url)))).await;
    assert_eq!(got.status, 200, "{:?}", got.body);
    got.body["uses"]["held"].as_u64().unwrap() + got.body["uses"]["used"].as_u64().unwrap()
}

/// Points and coupon ledgers are shards like stock: each is served by the node
/// holding its lease (its journal in the stream) and reached from any node. (And
/// a dry shard borrows keys from a sibling another node serves, and an
/// Idempotency-Key retried through another node replays the same order.)
/// Credits, redemptions, statements and coupons work through nodes that do not
/// serve the buyer's points shard; when the node serving it is killed, another
/// rebuilds the ledger from the stream with every acknowledged line, and the buyer
/// goes on redeeming (from the ledger's last snapshot and the records after it);
/// the audit of points and coupons passes on every survivor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn points_coupons_loans_and_retries_work_through_any_node_and_ledgers_outlive_their_node() {
    let Some(bin) = nats_or_skip() else { return };
    let _one = ONE_CLUSTER.lock().await;
    let nats = Nats::start_n(bin, 3, None);
    // Snapshots of every ledger as soon as its journal outgrows the last one: the
    // node taking a shard over starts from one and replays what follows.
    let small = [("KAMI_STORAGE__SNAPSHOT_MIN_JOURNAL_BYTES", "256")];
    let mut cluster = Cluster::start_through(&nats, "KAMILEDGERS", &vec![nats.options().urls; 3], &small).await;
    let ledgers: Vec<String> =
        (0..8).map(|i| format!("points.{i}")).chain((0..8).map(|i| format!("coupons.{i}"))).collect();
    let owners = cluster.placed(&ledgers.iter().map(String::as_str).collect::<Vec<_>>()).await;
    eprintln!("ledgers: {owners:?}");
    let api0 = cluster.api(0);
    assert_eq!(api0.create_product("gift", 500, 0, 3).await.status, 201);
    cluster.placed(&["stock.gift.0", "stock.gift.1", "stock.gift.2"]).await;
    let keys: Vec<String> = (0..60).map(|i| format!("GIFT-{i:03}")).collect();
    import_into(&api0, "gift", &keys).await;
    let priced = settled(|| {
        api0.admin(api0.http.put(format!("{}/api/v1/products/gift/points-price", api0.url)))
            .json(&serde_json::json!({"points_price": 10}))
    })
    .await;
    assert_eq!(priced.status, 200, "{:?}", priced.body);

    // Each buyer's points through a node that does not serve their points shard.
    let points_owner =
        |buyer: &str| owners[&format!("points.{}", kami::actors::points::points_shard_of(buyer))].clone();
    let away = |buyer: &str| (0..3).find(|&n| cluster.names[n] != points_owner(buyer)).unwrap();
    let buyers: Vec<String> = (0..12).map(|i| format!("p{i}@example.com")).collect();
    for (i, buyer) in buyers.iter().enumerate() {
        let api = cluster.api(away(buyer));
        let url = format!("{}/api/v1/admin/buyers/{buyer}/points", api.url);
        let body = serde_json::json!({"request_id": "welcome", "delta": 100});
        let credited = settled(|| api.admin(api.http.post(&url)).json(&body)).await;
        assert_eq!((credited.status, credited.body["balance"].as_u64()), (200, Some(100)), "{:?}", credited.body);
        // A refusal by the ledger on another node is the same refusal here.
        let over = serde_json::json!({"request_id": "too-much", "delta": -1000});
        let refused = settled(|| api.admin(api.http.post(&url)).json(&over)).await;
        assert_eq!((refused.status, refused.body["error"]["code"].as_str()), (409, Some("insufficient_points")));
        // A redemption through any node: held on the points shard's node, the key
        // delivered by the stock shard's, settled.
        let redeemed = redeem(&cluster.api(i % 3), buyer, "first").await;
        assert_eq!(redeemed.status, 201, "{:?}", redeemed.body);
        assert_eq!(redeemed.body["keys"].as_array().map(Vec::len), Some(1), "{:?}", redeemed.body);
        assert_eq!(redeemed.body["points_balance"].as_u64(), Some(90), "{:?}", redeemed.body);
        assert_eq!(
            points_of(&cluster.api((i + 1) % 3), buyer).await,
            (90, vec!["credit".into(), "held".into(), "redeemed".into()])
        );
    }

    // A coupon defined on one node, read on another, held by an order through a third.
    let coupon = serde_json::json!({"code": "GIFT-5", "kind": "amount", "value": 50, "max_uses": 10});
    let defined =
        settled(|| api0.admin(api0.http.post(format!("{}/api/v1/admin/coupons", api0.url))).json(&coupon)).await;
    assert_eq!(defined.status, 201, "{:?}", defined.body);
    let api2 = cluster.api(2);
    let body = serde_json::json!({"product_id": "gift", "quantity": 1, "buyer": "c@example.com", "coupon": "GIFT-5"});
    let ordered = settled(|| api2.http.post(format!("{}/api/v1/orders", api2.url)).json(&body)).await;
    assert_eq!(ordered.status, 201, "{:?}", ordered.body);
    assert_eq!(ordered.body["price_breakdown"]["discount_cents"].as_u64(), Some(50), "{:?}", ordered.body);
    assert_eq!(coupon_uses(&cluster.api(1), "GIFT-5").await, 1);

    // An Idempotency-Key means the same order through any node: the node serving
    // the buyer's shard scopes it by the client's own address, not by the address
    // of a node that forwarded it (the client connects from 127.0.0.2, the nodes
    // from 127.0.0.1).
    let gift = cluster.placed(&["stock.gift.0", "stock.gift.1", "stock.gift.2"]).await;
    let buyer = "k@example.com";
    let home = &gift[&format!("stock.gift.{}", kami::actors::registry::buyer_shard(buyer, 3))];
    let owner = cluster.names.iter().position(|n| n == home).unwrap();
    let other = (0..3).find(|&n| n != owner).unwrap();
    let client = reqwest::Client::builder().local_address(std::net::IpAddr::from([127, 0, 0, 2])).build().unwrap();
    let order = |n: usize| {
        let (url, client) = (format!("{}/api/v1/orders", cluster.api(n).url), client.clone());
        let body = serde_json::json!({"product_id": "gift", "quantity": 1, "buyer": buyer});
        move || client.post(&url).header("Idempotency-Key", "just-once").json(&body)
    };
    let first = settled(order(other)).await;
    assert_eq!(first.status, 201, "{:?}", first.body);
    let again = settled(order(owner)).await;
    assert_eq!(again.status, 201, "{:?}", again.body);
    assert_eq!(again.body["order_id"], first.body["order_id"], "the retry through another node is the same order");
    assert_eq!(again.headers.get("idempotent-replayed").and_then(|v| v.to_str().ok()), Some("true"));

    // A product with a per-buyer limit: each buyer's orders stay on their own
    // shard, which borrows keys from a sibling served by another node once dry.
    // Every key sells, and then every buyer hears `sold_out` (never 503).
    let mut split = None;
    for attempt in 0..6 {
        let id = format!("limited{attempt}");
        assert_eq!(api0.create_product(&id, 100, 1, 2).await.status, 201);
        let shards = [format!("stock.{id}.0"), format!("stock.{id}.1")];
        let placed = cluster.placed(&[&shards[0], &shards[1]]).await;
        if placed[&shards[0]] != placed[&shards[1]] {
            split = Some(id);
            break;
        }
    }
    let limited = split.expect("two shards on two nodes");
    let keys: Vec<String> = (0..20).map(|i| format!("LIM-{i:03}")).collect();
    import_into(&api0, &limited, &keys).await;
    // A dry shard judges its siblings elsewhere by their shared counters (a second
    // or two behind): wait until every node counts the keys of both shards.
    for n in 0..3 {
        let api = cluster.api(n);
        let url = format!("{}/api/v1/admin/products/{limited}", api.url);
        let deadline = Instant::now() + Duration::from_secs(30);
        while reply(api.admin(api.http.get(&url))).await.body["stock"]["available"].as_u64() != Some(20) {
            assert!(Instant::now() < deadline, "node {n} never counted every shard's keys");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // Buyers whose home is shard 0 only: once its own keys are gone, every key it
    // sells is borrowed from shard 1, on another node.
    let homed: Vec<String> = (0..)
        .map(|i| format!("l{i}@example.com"))
        .filter(|b| kami::actors::registry::buyer_shard(b, 2) == 0)
        .take(30)
        .collect();
    let (mut sold, mut refused) = (0, 0);
    for (i, buyer) in homed.iter().enumerate() {
        let api = cluster.api(i % 3);
        let got = settled(|| api.order_request(&limited, 1, buyer)).await;
        match (got.status, got.body["error"]["code"].as_str()) {
            (201, _) => sold += 1,
            (409, Some("sold_out")) => refused += 1,
            other => panic!("an order of a limited product: {other:?} {:?}", got.body),
        }
    }
    assert_eq!((sold, refused), (20, 10), "every key sold across the nodes, then sold out");

    // kill -9 the node serving the first buyer's points shard.
    let victim_name = points_owner(&buyers[0]);
    let victim = cluster.names.iter().position(|n| *n == victim_name).unwrap();
    cluster.nodes[victim].take().unwrap().kill9();
    let moved: Vec<&str> = owners.iter().filter(|(_, n)| **n == victim_name).map(|(s, _)| s.as_str()).collect();
    let after = cluster.placed(&moved).await;
    assert!(after.values().all(|n| *n != victim_name), "{after:?}");
    let survivor = cluster.api(cluster.live()[0]);
    // The ledgers it served were rebuilt from their snapshots (none existed when
    // the cluster placed them first, empty).
    let rebuilt: Vec<String> = cluster
        .live()
        .iter()
        .flat_map(|&n| cluster.nodes[n].as_ref().unwrap().lines_with("ledger actor rebuilt from the stream"))
        .collect();
    assert!(rebuilt.iter().any(|l| !l.contains("snapshot_bytes=0")), "{rebuilt:#?}");
    // Every acknowledged line is there, wherever each ledger is served now.
    for buyer in &buyers {
        assert_eq!(
            points_of(&survivor, buyer).await,
            (90, vec!["credit".into(), "held".into(), "redeemed".into()]),
            "{buyer}"
        );
    }
    assert_eq!(coupon_uses(&survivor, "GIFT-5").await, 1, "the coupon's use held before the kill");
    // The first buyer goes on: a replay answers the same order, a new redemption spends.
    let replay = redeem(&survivor, &buyers[0], "first").await;
    assert_eq!((replay.status, replay.body["points_balance"].as_u64()), (201, Some(90)), "{:?}", replay.body);
    let again = redeem(&survivor, &buyers[0], "second").await;
    assert_eq!((again.status, again.body["points_balance"].as_u64()), (201, Some(80)), "{:?}", again.body);
    for s in cluster.live() {
        let api = cluster.api(s);
        let audit = settled(|| api.admin(api.http.get(format!("{}/api/v1/admin/audit", api.url)))).await;
        assert_audit_ok(&audit);
        // 13 redemptions, each settled or (its settle left to the resolver) held.
        let points = &audit.body["points"];
        let n = |f: &str| points[f].as_u64().unwrap();
        assert_eq!(n("redemptions_settled") + n("total_held") / 10, 13, "{points}");
        assert_eq!(n("total_balance") - n("total_held"), 11 * 90 + 80, "{points}");
    }
}
