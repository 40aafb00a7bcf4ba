//! Group-buy over HTTP: deals, opening and joining groups, exact group sizes under
//! concurrent joins, delivery when the last seat pays, failure at the deadline with
//! refunds through the sandbox gateway, and groups completing through actor kills
//! and `kill -9`.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::gateway::*;
use common::*;
use futures::StreamExt;
use serde_json::{json, Value};

impl Api {
    async fn deal(&self, product: &str, deal_id: &str, size: u32, price: u64, limit_secs: u64) -> Reply {
        let url = format!("{}/api/v1/products/{product}/group-deals", self.url);
        let body = json!({"deal_id": deal_id, "group_size": size, "price_cents": price, "time_limit_secs": limit_secs});
        reply(self.admin(self.http.post(url)).json(&body)).await
    }

    async fn open_group(&self, product: &str, deal: &str, buyer: &str, join_open: bool, key: Option<&str>) -> Reply {
        let body = json!({"product_id": product, "deal_id": deal, "buyer": buyer, "join_open": join_open});
        let mut r = self.http.post(format!("{}/api/v1/groups", self.url)).json(&body);
        if let Some(k) = key {
            r = r.header("Idempotency-Key", k);
        }
        reply(r).await
    }

    async fn join(&self, group_id: &str, buyer: &str, key: Option<&str>) -> Reply {
        let mut r =
            self.http.post(format!("{}/api/v1/groups/{group_id}/join", self.url)).json(&json!({"buyer": buyer}));
        if let Some(k) = key {
            r = r.header("Idempotency-Key", k);
        }
        reply(r).await
    }

    async fn open_groups(&self, product: &str, deal: &str) -> Vec<Value> {
        let url = format!("{}/api/v1/products/{product}/group-deals/{deal}/groups", self.url);
        let r = reply(self.http.get(url)).await;
        assert_eq!(r.status, 200, "{}", r.body);
        r.body["groups"].as_array().unwrap().clone()
    }

    async fn group(&self, group_id: &str) -> Reply {
        reply(self.http.get(format!("{}/api/v1/groups/{group_id}", self.url))).await
    }

    /// The channel's notification for a seat (a seat answer's `order`), payment id `pay-<order>`.
    async fn pay_seat(&self, order: &Value) -> Reply {
        let id = order["order_id"].as_str().unwrap();
        self.notify(id, &format!("pay-{id}"), order["amount_cents"].as_u64().unwrap()).await
    }

    async fn seat_order(&self, order: &Value) -> Value {
        self.get_order(order["order_id"].as_str().unwrap(), order["query_token"].as_str().unwrap()).await.body
    }
}

fn n(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

fn created(r: &Reply) -> (String, Value) {
    assert_eq!(r.status, 201, "{}", r.body);
    (r.body["group"]["group_id"].as_str().unwrap().to_string(), r.body["order"].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_fills_to_its_size_and_every_member_is_delivered_when_the_last_one_pays() {
    let t = TestApp::spawn().await;
    let api = t.api();
    api.product_with_keys("p", 10, 0).await;

    // Deals: created once, repeated identically (200), other terms refused.
    let d = api.deal("p", "trio", 3, 500, 600).await;
    assert_eq!((d.status, n(&d.body["group_size"]), n(&d.body["price_cents"])), (201, 3, 500), "{}", d.body);
    assert_eq!(api.deal("p", "trio", 3, 500, 600).await.status, 200);
    assert_eq!(api.deal("p", "trio", 4, 500, 600).await.code(), "deal_exists");
    assert_eq!(api.deal("p", "solo", 1, 500, 600).await.status, 422);
    assert_eq!(api.deal("nope", "trio", 3, 500, 600).await.code(), "product_not_found");
    let anonymous = reply(api.http.post(format!("{}/api/v1/products/p/group-deals", api.url)).json(&json!({}))).await;
    assert_eq!(anonymous.status, 401);
    let listed = reply(api.http.get(format!("{}/api/v1/products/p/group-deals", api.url))).await;
    assert_eq!(listed.body["deals"].as_array().unwrap().len(), 1, "{}", listed.body);
    assert_eq!(api.open_group("p", "nope", "alice", false, None).await.code(), "deal_not_found");

    let (group, a) = created(&api.open_group("p", "trio", "alice", false, Some("alice-opens")).await);
    assert_eq!((n(&a["amount_cents"]), a["group_id"].as_str()), (500, Some(group.as_str())), "{a}");
    let again = api.open_group("p", "trio", "alice", false, Some("alice-opens")).await;
    assert_eq!(again.body["order"]["order_id"], a["order_id"], "a repeated Idempotency-Key replays the seat");
    assert_eq!(again.headers["idempotent-replayed"], "true");
    assert_eq!(api.join(&group, "alice", None).await.code(), "already_in_group");
    let open = api.open_groups("p", "trio").await;
    assert_eq!((open.len(), &open[0]["group_id"], n(&open[0]["seats_left"])), (1, &json!(group), 2), "{open:?}");
    let (_, b) = created(&api.join(&group, "bob", None).await);
    let (_, c) = created(&api.join(&group, "carol", None).await);
    assert!(api.open_groups("p", "trio").await.is_empty(), "a full group is not listed");
    assert_eq!(api.join(&group, "dave", None).await.code(), "group_full");
    assert_eq!(api.join("p.0.g99", "dave", None).await.code(), "group_not_found");
    assert_eq!(api.join("p.0.7", "dave", None).await.code(), "group_not_found", "an order id is not a group id");

    // Two seats paid: the group waits for the third; paid seats show no keys yet.
    for seat in [&a, &b] {
        assert_eq!(api.pay_seat(seat).await.status, 200);
        let o = api.seat_order(seat).await;
        assert_eq!((o["status"].as_str(), &o["keys"]), (Some("paid"), &json!([])), "{o}");
    }
    let g = api.group(&group).await.body;
    assert_eq!((g["state"].as_str(), n(&g["seats_taken"]), n(&g["seats_paid"])), (Some("open"), 3, 2), "{g}");
    assert_eq!(n(&api.product("p").await.body["available"]), 7, "every seat reserved its key");

    assert_eq!(api.pay_seat(&c).await.status, 200);
    let mut keys = HashSet::new();
    for seat in [&a, &b, &c] {
        let o = api.seat_order(seat).await;
        assert_eq!(o["status"], "delivered", "{o}");
        keys.insert(o["keys"][0].as_str().unwrap().to_string());
    }
    assert_eq!(keys.len(), 3, "three distinct keys, delivered together");
    let g = api.group(&group).await.body;
    assert_eq!((g["state"].as_str(), g["members"].as_array().unwrap().len()), (Some("completed"), 3), "{g}");
    assert_eq!((n(&g["seats_taken"]), n(&g["seats_paid"]), n(&g["seats_left"])), (3, 3, 0), "{g}");
    assert!(g["completed_at"].is_string());
    assert_eq!(api.join(&group, "dave", None).await.code(), "group_closed");
    // A repeated notification changes nothing.
    assert_eq!(api.pay_seat(&a).await.status, 200);
    let metrics = api.metrics().await;
    for (event, at_least) in [("opened", 1.0), ("joined", 2.0), ("completed", 1.0)] {
        let series = format!("kami_group_events_total{{event=\"{event}\"}}");
        assert!(metric_value(&metrics, &series) >= at_least, "{series} in\n{metrics}");
    }
    let audit = api.audit().await;
    assert_audit_ok(&audit);
    assert_eq!((n(&audit.body["products"][0]["sold"]), n(&audit.body["products"][0]["reserved"])), (3, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_joins_never_overfill_a_group() {
    let t = TestApp::spawn().await;
    let api = t.api();
    api.create_product("hot", 990, 0, 2).await;
    api.import("hot", &(0..3000).map(|i| format!("HOT-{i}")).collect::<Vec<_>>()).await;
    api.deal("hot", "hundred", 100, 500, 600).await;
    api.deal("hot", "ten", 10, 700, 600).await;

    // 1,000 buyers race for the 99 free seats of one group.
    let (group, _) = created(&api.open_group("hot", "hundred", "opener", false, None).await);
    let answers: Vec<Reply> = futures::stream::iter(0..1000)
        .map(|i| {
            let (api, group) = (api.clone(), group.clone());
            async move { api.join(&group, &format!("buyer{i}"), None).await }
        })
        .buffer_unordered(256)
        .collect()
        .await;
    let mut by_answer: BTreeMap<String, u32> = BTreeMap::new();
    for r in &answers {
        *by_answer.entry(format!("{} {}", r.status, r.code())).or_default() += 1;
    }
    assert_eq!(by_answer, BTreeMap::from([("201 ".into(), 99), ("409 group_full".into(), 901)]));
    let g = api.group(&group).await.body;
    assert_eq!((n(&g["seats_taken"]), g["members"].as_array().unwrap().len()), (100, 100));

    // 1,000 concurrent "join any open group" of a size-10 deal: 100 groups of exactly 10.
    let answers: Vec<Reply> = futures::stream::iter(0..1000)
        .map(|i| {
            let api = api.clone();
            async move { api.open_group("hot", "ten", &format!("buyer{i}"), true, None).await }
        })
        .buffer_unordered(256)
        .collect()
        .await;
    let mut sizes: BTreeMap<String, u32> = BTreeMap::new();
    for r in &answers {
        *sizes.entry(created(r).0).or_default() += 1;
    }
    assert_eq!(sizes.len(), 100, "groups fill one after another");
    assert!(sizes.values().all(|&s| s == 10), "{sizes:?}");
    for group in sizes.keys().take(5) {
        assert_eq!(n(&api.group(group).await.body["seats_taken"]), 10);
    }
    let audit = api.audit().await;
    assert_audit_ok(&audit);
    assert_eq!(n(&audit.body["products"][0]["reserved"]), 1100);
    eprintln!("groups: 1000 joins → 99 seats + 901 group_full; 1000 join-any → 100 groups of 10");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_not_filled_in_time_fails_and_paid_members_are_refunded_at_the_gateway() {
    let fast = [
        ("payments.query_after_ms", "100"),
        ("payments.sweep_interval_ms", "50"),
        ("payments.health_interval_ms", "50"),
    ];
    let (gw, t) = shop(&fast).await;
    let api = t.api();
    api.product_with_keys("p", 5, 0).await;
    api.deal("p", "trio", 3, 500, 2).await;
    let (group, a) = created(&api.open_group("p", "trio", "alice", false, None).await);
    let (_, b) = created(&api.join(&group, "bob", None).await);
    let a_reply = Reply { status: 201, body: a.clone(), headers: Default::default() };
    let a_payment = pay_at_gateway(&api, &gw, &a_reply).await;
    reaches(&api, &a_reply, "paid", Duration::from_secs(20)).await;

    // The deadline passes with two of three seats: the group fails, alice's money goes back.
    let failed =
        api.eventually(Duration::from_secs(20), || async { api.group(&group).await.body["state"] == "failed" }).await;
    assert!(failed, "{}", api.group(&group).await.body);
    reaches(&api, &a_reply, "refunded", Duration::from_secs(20)).await;
    let at_gateway = gw.payments();
    let p = at_gateway.iter().find(|p| p.payment_id == a_payment).unwrap();
    assert_eq!((p.status.as_str(), p.refunds), ("refunded", 1), "refunded once, at the channel that took it");
    assert_eq!(api.seat_order(&b).await["status"], "cancelled");
    let g = api.group(&group).await.body;
    assert_eq!((n(&g["seats_taken"]), g["members"].as_array().unwrap().len()), (0, 2), "{g}");
    assert_eq!(api.join(&group, "carol", None).await.code(), "group_closed");
    // Bob pays after the failure: never delivered at the group price, refunded too.
    let b_reply = Reply { status: 201, body: b.clone(), headers: Default::default() };
    pay_at_gateway(&api, &gw, &b_reply).await;
    reaches(&api, &b_reply, "refunded", Duration::from_secs(20)).await;
    let audit = api.audit().await;
    assert_audit_ok(&audit);
    assert_eq!((n(&audit.body["products"][0]["available"]), n(&audit.body["products"][0]["sold"])), (5, 0));
    assert_eq!(audit.body["orders"]["refunded"], 2);
}

/// One group's life, each step retried with the same Idempotency-Key or payment id
/// until it is answered (an actor restarting answers 503): open, fill, pay all.
/// Returns the group id and its orders once the last payment is acknowledged.
async fn fill_and_pay(api: &Api, tag: &str, size: usize) -> (String, Vec<Value>) {
    async fn retried(what: &str, mut step: impl AsyncFnMut() -> Reply) -> Reply {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while tokio::time::Instant::now() < deadline {
            let r = step().await;
            if r.status < 500 {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("{what}: never answered within 60 s");
    }
    let key = format!("{tag}-open");
    let r = retried("open", async || api.open_group("hot", "trio", &format!("{tag}-0"), false, Some(&key)).await).await;
    let (group, first) = created(&r);
    let mut orders = vec![first];
    for m in 1..size {
        let (buyer, key) = (format!("{tag}-{m}"), format!("{tag}-join-{m}"));
        let r = retried("join", async || api.join(&group, &buyer, Some(&key)).await).await;
        orders.push(created(&r).1);
    }
    for o in &orders {
        let r = retried("pay", async || api.pay_seat(o).await).await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    (group, orders)
}

async fn check_completed(api: &Api, group: &str, orders: &[Value], keys: &mut HashSet<String>) {
    let g = api.group(group).await.body;
    assert_eq!(g["state"], "completed", "acknowledged group lost its completion: {g}");
    for o in orders {
        let o = api.seat_order(o).await;
        assert_eq!(o["status"], "delivered", "{o}");
        assert!(keys.insert(o["keys"][0].as_str().unwrap().to_string()), "a key delivered twice");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_complete_exactly_once_while_stock_actors_are_killed() {
    let t = TestApp::spawn_with(&[("chaos.enabled", "true")]).await;
    let api = t.api();
    api.create_product("hot", 990, 0, 2).await;
    api.import("hot", &(0..600).map(|i| format!("K-{i}")).collect::<Vec<_>>()).await;
    api.deal("hot", "trio", 3, 500, 600).await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let killer = {
        let (api, stop) = (api.clone(), stop.clone());
        tokio::spawn(async move {
            let mut kills = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                assert_eq!(api.kill("product:hot").await.status, 200);
                kills += 1;
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
            kills
        })
    };
    let done: Vec<(String, Vec<Value>)> = futures::stream::iter(0..150)
        .map(|g| {
            let api = api.clone();
            async move { fill_and_pay(&api, &format!("g{g}"), 3).await }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let kills = killer.await.unwrap();
    assert!(kills >= 2, "the actors were killed during the run ({kills})");
    let mut keys = HashSet::new();
    for (group, orders) in &done {
        check_completed(&api, group, orders, &mut keys).await;
    }
    let audit = api.audit().await;
    assert_audit_ok(&audit);
    assert_eq!(n(&audit.body["products"][0]["sold"]), 450, "150 groups of 3, each delivered once");
    eprintln!("groups under actor kills: {kills} kills, 150 groups completed, 450 keys");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_completion_keeps_every_acknowledged_group_whole() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut server = Server::start(&data, &[]);
    let api = server.api();
    api.create_product("hot", 990, 0, 2).await;
    api.import("hot", &(0..3000).map(|i| format!("K-{i}")).collect::<Vec<_>>()).await;
    api.deal("hot", "trio", 3, 500, 600).await;
    // Workers fill and pay groups; after the 30th acknowledged completion the process dies.
    let acked = Arc::new(Mutex::new(Vec::<(String, Vec<Value>)>::new()));
    let thirty = Arc::new(tokio::sync::Notify::new());
    let workers: Vec<_> = (0..12)
        .map(|w| {
            let (api, acked, thirty) = (api.clone(), acked.clone(), thirty.clone());
            tokio::spawn(async move {
                for i in 0.. {
                    // Any failed request (the process is gone) ends the worker.
                    let Some(done) = try_fill_and_pay(&api, &format!("w{w}-{i}")).await else { return };
                    let mut acked = acked.lock().unwrap();
                    acked.push(done);
                    if acked.len() == 30 {
                        thirty.notify_one();
                    }
                }
            })
        })
        .collect();
    tokio::time::timeout(Duration::from_secs(60), thirty.notified()).await.expect("30 groups completed");
    server.kill9();
    for w in workers {
        tokio::time::timeout(Duration::from_secs(30), w).await.expect("worker ends").unwrap();
    }
    let acked = std::mem::take(&mut *acked.lock().unwrap());

    let sold = check_recovered(&data, &acked, "kill -9").await;
    assert!(sold >= 3 * acked.len() as u64, "sold {sold}");
    eprintln!("groups kill -9: {} completions acknowledged, {} keys sold after recovery", acked.len(), sold);
}

/// After a crash: the offline audit passes on the directory as it was left, and a
/// restarted server shows every acknowledged completion whole, the audit exact and
/// only whole groups of 3 sold. Returns the keys sold.
async fn check_recovered(data: &std::path::Path, acked: &[(String, Vec<Value>)], what: &str) -> u64 {
    let (code, out, err) = kami_audit(data, true);
    assert_eq!(code, 0, "{what}: offline audit of the crashed directory: {out}{err}");
    let restarted = Server::start(data, &[]);
    let api = restarted.api();
    let mut keys = HashSet::new();
    for (group, orders) in acked {
        check_completed(&api, group, orders, &mut keys).await;
    }
    let audit = api.audit().await;
    assert_audit_ok(&audit);
    let sold = n(&audit.body["products"][0]["sold"]);
    assert!(sold.is_multiple_of(3), "{what}: sold {sold}: whole groups only");
    sold
}

/// Workers fill and pay groups on `api` until a request fails (the process is
/// gone); returns every group whose last payment was acknowledged.
async fn groups_until_the_process_dies(api: &Api, tag: &str) -> Vec<(String, Vec<Value>)> {
    let workers: Vec<_> = (0..12)
        .map(|w| {
            let (api, tag) = (api.clone(), format!("{tag}-w{w}"));
            tokio::spawn(async move {
                let mut done = Vec::new();
                for i in 0.. {
                    match try_fill_and_pay(&api, &format!("{tag}-{i}")).await {
                        Some(group) => done.push(group),
                        None => return done,
                    }
                }
                done
            })
        })
        .collect();
    let mut acked = Vec::new();
    for w in workers {
        acked.extend(tokio::time::timeout(Duration::from_secs(90), w).await.expect("worker ends").unwrap());
    }
    acked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_points_during_group_completion_keep_every_acknowledged_group_whole() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    {
        let server = Server::start(&data, &[]);
        let api = server.api();
        api.create_product("hot", 990, 0, 2).await;
        api.import("hot", &(0..6000).map(|i| format!("K-{i}")).collect::<Vec<_>>()).await;
        api.deal("hot", "trio", 3, 500, 600).await;
    }
    // The process kills itself with a batch of joins and payments collected but not
    // flushed, then with one flushed but not answered; each time the groups whose
    // completion was acknowledged must come back whole, and no group half delivered.
    for point in ["before_flush", "after_flush"] {
        let env = [
            ("KAMI_CHAOS__ENABLED", "true"),
            ("KAMI_CHAOS__CRASH_POINT", point),
            ("KAMI_CHAOS__CRASH_AFTER_HITS", "80"),
        ];
        let mut server = Server::start(&data, &env);
        let acked = groups_until_the_process_dies(&server.api(), point).await;
        let exited = server.exited_within(Duration::from_secs(60)).await;
        assert!(exited.is_some(), "{point}: the process never reached its crash point");
        let sold = check_recovered(&data, &acked, point).await;
        eprintln!(
            "groups at {point}: {} completions acknowledged before the crash, {sold} keys sold in all",
            acked.len()
        );
    }
}

/// [`fill_and_pay`] without retries: `None` as soon as any step is not answered 2xx.
async fn try_fill_and_pay(api: &Api, tag: &str) -> Option<(String, Vec<Value>)> {
    let send = |r: reqwest::RequestBuilder| async move {
        let resp = r.send().await.ok()?;
        if !resp.status().is_success() {
            return None;
        }
        resp.json::<Value>().await.ok()
    };
    let body = json!({"product_id": "hot", "deal_id": "trio", "buyer": format!("{tag}-0")});
    let opened = send(api.http.post(format!("{}/api/v1/groups", api.url)).json(&body)).await?;
    let group = opened["group"]["group_id"].as_str()?.to_string();
    let mut orders = vec![opened["order"].clone()];
    for m in 1..3 {
        let url = format!("{}/api/v1/groups/{group}/join", api.url);
        let joined = send(api.http.post(url).json(&json!({"buyer": format!("{tag}-{m}")}))).await?;
        orders.push(joined["order"].clone());
    }
    for o in &orders {
        let id = o["order_id"].as_str()?;
        send(api.notify_request(id, &format!("pay-{id}"), 500)).await?;
    }
    Some((group, orders))
}

/// Time as the test sets it.
struct ManualClock(std::sync::atomic::AtomicU64);

impl kami::clock::Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payment_after_the_deadline_never_completes_the_group() {
    let dir = tempfile::tempdir().unwrap();
    // Starts at the real time: notifications carry real timestamps, checked for freshness.
    let start_ms = now_secs() as u64 * 1000;
    let clock = Arc::new(ManualClock(std::sync::atomic::AtomicU64::new(start_ms)));
    let app = kami::app::start_with_clock(settings(&dir.path().join("data"), &[]), clock.clone()).await.unwrap();
    let api = Api { url: app.url(), http: client() };
    api.product_with_keys("p", 5, 0).await;
    api.deal("p", "duo", 2, 500, 10).await;
    let (group, a) = created(&api.open_group("p", "duo", "alice", false, None).await);
    let (_, b) = created(&api.join(&group, "bob", None).await);
    assert_eq!(api.pay_seat(&a).await.status, 200);
    // The deadline passes; bob's payment arrives before any expiry tick could run.
    clock.0.fetch_add(10_000, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(api.pay_seat(&b).await.status, 200);
    let g = api.group(&group).await.body;
    assert_eq!(g["state"], "failed", "{g}");
    for seat in [&a, &b] {
        assert_eq!(api.seat_order(seat).await["status"], "refund_pending", "both payments are owed back");
    }
    assert_audit_ok(&api.audit().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deals_are_bounded_by_configuration_and_survive_a_restart() {
    let limits =
        [("groups.max_group_size", "5"), ("groups.max_time_limit_secs", "60"), ("groups.max_deals_per_product", "2")];
    let mut t = TestApp::spawn_with(&limits).await;
    let api = t.api();
    api.product_with_keys("p", 3, 0).await;
    let big = api.deal("p", "big", 6, 500, 60).await;
    assert_eq!((big.status, big.body["error"]["message"].as_str()), (422, Some("group_size: must be 2..=5")));
    assert_eq!(api.deal("p", "slow", 5, 500, 61).await.status, 422);
    assert_eq!(api.deal("p", "a", 5, 500, 60).await.status, 201);
    assert_eq!(api.deal("p", "b", 2, 400, 30).await.status, 201);
    assert_eq!(api.deal("p", "c", 2, 400, 30).await.status, 422, "two deals per product");
    let (group, _) = created(&api.open_group("p", "b", "alice", false, None).await);

    let data = t.data.clone();
    t.app.take().unwrap().crash().await;
    let t2 = TestApp::start_on(&data, &limits).await;
    let api = t2.api();
    let listed = reply(api.http.get(format!("{}/api/v1/products/p/group-deals", api.url))).await;
    let ids: Vec<&str> =
        listed.body["deals"].as_array().unwrap().iter().map(|d| d["deal_id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["a", "b"], "acknowledged deals are durable");
    let g = api.group(&group).await.body;
    assert_eq!((g["state"].as_str(), n(&g["seats_taken"])), (Some("open"), 1), "{g}");
    created(&api.join(&group, "bob", None).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_larger_than_its_shards_stock_borrows_keys_from_sibling_shards() {
    let t = TestApp::spawn().await;
    let api = t.api();
    api.create_product("p", 990, 0, 4).await;
    api.import("p", &(0..20).map(|i| format!("K-{i}")).collect::<Vec<_>>()).await;
    api.deal("p", "big", 20, 500, 600).await;
    // Every key of the product ends up in the deal's shard, one seat at a time.
    let (group, first) = created(&api.open_group("p", "big", "m0", false, None).await);
    let mut seats = vec![first];
    for m in 1..20 {
        seats.push(created(&api.join(&group, &format!("m{m}"), None).await).1);
    }
    assert_eq!(api.open_group("p", "big", "m20", true, None).await.code(), "sold_out", "the product is empty");
    for seat in &seats {
        assert_eq!(api.pay_seat(seat).await.status, 200);
    }
    assert_eq!(api.group(&group).await.body["state"], "completed");
    let audit = api.audit().await;
    assert_audit_ok(&audit);
    assert_eq!(n(&audit.body["products"][0]["sold"]), 20);
}
