//! Merchant webhooks end to end: every event type reaches a healthy receiver once,
//! signed; a receiver that fails for a while gets everything after it recovers, in
//! order per order, even across a snapshot that trims the journal; dead letters
//! are listed and redelivered; endpoints are added and deleted at run time; and
//! after `kill -9` during a sale every acknowledged delivery is sent, none invented.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use common::gateway::*;
use common::*;
use kami::webhooks::sink::{self, Mode, Received, RunningSink};
use serde_json::{json, Value};

const HOOK_SECRET: &str = "webhook-secret-for-tests";

async fn sink() -> RunningSink {
    sink::start("127.0.0.1:0".parse().unwrap(), HOOK_SECRET.into()).await.unwrap()
}

/// Waits (bounded) until `done` holds for what the sink received.
async fn until_received(s: &RunningSink, what: &str, done: impl Fn(&[Received]) -> bool) -> Vec<Received> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let got = s.received();
        if done(&got) {
            return got;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: the sink has {} deliveries: {:?}",
            got.len(),
            got.iter().map(|r| format!("{} {}", r.id, r.kind)).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn order_of(r: &Received) -> String {
    r.body["data"]["object"]["order_id"].as_str().unwrap_or_default().to_string()
}

/// Acknowledged deliveries, by order, in arrival order, without repeats.
fn by_order(got: &[Received]) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for r in got.iter().filter(|r| r.acknowledged && !r.duplicate && r.kind.starts_with("order.")) {
        out.entry(order_of(r)).or_default().push(r.kind.clone());
    }
    out
}

/// `order.created` comes first, and nothing follows `order.delivered` but a refund.
fn assert_in_order(orders: &BTreeMap<String, Vec<String>>) {
    for (order, kinds) in orders {
        if kinds.iter().any(|k| k == "order.created") {
            assert_eq!(kinds[0], "order.created", "{order}: {kinds:?}");
        }
        if let (Some(p), Some(d)) =
            (kinds.iter().position(|k| k == "order.paid"), kinds.iter().position(|k| k == "order.delivered"))
        {
            assert!(p < d, "{order}: paid after delivered: {kinds:?}");
        }
    }
}

fn endpoint(name: &str, url: &str) -> Vec<(String, String)> {
    vec![
        (format!("webhooks.endpoints.{name}.url"), url.to_string()),
        (format!("webhooks.endpoints.{name}.secret"), HOOK_SECRET.to_string()),
    ]
}

impl Api {
    async fn webhook(&self, name: &str) -> Reply {
        reply(self.admin(self.http.get(format!("{}/api/v1/admin/webhooks/{name}", self.url)))).await
    }

    async fn deliveries(&self, name: &str, status: &str) -> Reply {
        let url = format!("{}/api/v1/admin/webhooks/{name}/deliveries?status={status}", self.url);
        reply(self.admin(self.http.get(url))).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_type_reaches_a_healthy_receiver_once_signed_and_in_order() {
    let (crm, bot) = (sink().await, sink().await);
    let mut extra = endpoint("crm", &crm.url());
    extra.extend(endpoint("bot", &bot.url()));
    extra.push(("webhooks.endpoints.bot.events".into(), "order.delivered".into()));
    extra.push(("webhooks.endpoints.bot.include_keys".into(), "true".into()));
    extra.extend(
        [
            ("orders.ttl_secs", "2"),
            ("payments.query_after_ms", "100"),
            ("payments.sweep_interval_ms", "50"),
            ("webhooks.poll_ms", "20"),
            ("webhooks.low_stock.p", "18"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    let extra: Vec<(&str, &str)> = extra.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let (gw, t) = shop(&extra).await;
    let api = t.api();
    api.product_with_keys("p", 20, 0).await;

    // created, paid, delivered
    let alice = api.buy("p", "alice").await;
    assert_eq!(alice.body["status"], "delivered", "{}", alice.body);
    let alice_id = alice.body["order_id"].as_str().unwrap().to_string();
    // cancelled
    let bob = api.order("p", 1, "bob", None).await;
    let bob_id = bob.body["order_id"].as_str().unwrap().to_string();
    assert_eq!(api.cancel(&bob_id, bob.body["query_token"].as_str().unwrap()).await.status, 200);
    // expired (orders live 2 s here)
    let carol = api.order("p", 1, "carol", None).await;
    let carol_id = carol.body["order_id"].as_str().unwrap().to_string();
    // amount_mismatch
    let dave = api.order("p", 1, "dave", None).await;
    let dave_id = dave.body["order_id"].as_str().unwrap().to_string();
    assert_eq!(api.notify(&dave_id, "pay-dave", 1).await.code(), "amount_mismatch");
    // refund_pending, then refunded at the gateway: paid after its key went to another buyer.
    api.product_with_keys("late", 1, 0).await;
    let late = api.order("late", 1, "l1", None).await;
    let late_id = late.body["order_id"].as_str().unwrap().to_string();
    assert_eq!(api.cancel(&late_id, late.body["query_token"].as_str().unwrap()).await.status, 200);
    assert_eq!(api.buy("late", "l2").await.body["status"], "delivered");
    pay_at_gateway(&api, &gw, &late).await;
    reaches(&api, &late, "refunded", Duration::from_secs(30)).await;
    // group.completed (both seats delivered) and group.failed (its deadline passes)
    let deal = json!({"deal_id": "duo", "group_size": 2, "price_cents": 500, "time_limit_secs": 2});
    let r = reply(api.admin(api.http.post(format!("{}/api/v1/products/p/group-deals", api.url))).json(&deal)).await;
    assert_eq!(r.status, 201, "{}", r.body);
    let open = |buyer: &str| {
        let body = json!({"product_id": "p", "deal_id": "duo", "buyer": buyer, "join_open": false});
        reply(api.http.post(format!("{}/api/v1/groups", api.url)).json(&body))
    };
    let erin = open("erin").await;
    let group_id = erin.body["group"]["group_id"].as_str().unwrap().to_string();
    let frank =
        reply(api.http.post(format!("{}/api/v1/groups/{group_id}/join", api.url)).json(&json!({"buyer": "frank"})))
            .await;
    let seats: Vec<String> =
        [&erin, &frank].iter().map(|r| r.body["order"]["order_id"].as_str().unwrap().to_string()).collect();
    for (i, seat) in seats.iter().enumerate() {
        let amount = [&erin, &frank][i].body["order"]["amount_cents"].as_u64().unwrap();
        assert_eq!(api.notify(seat, &format!("pay-{seat}"), amount).await.status, 200);
    }
    let lonely = open("gina").await;
    let failed_group = lonely.body["group"]["group_id"].as_str().unwrap().to_string();
    // redemption.settled
    let url = format!("{}/api/v1/products/p/points-price", api.url);
    assert_eq!(reply(api.admin(api.http.put(url)).json(&json!({"points_price": 10}))).await.status, 200);
    let url = format!("{}/api/v1/admin/buyers/hana/points", api.url);
    reply(api.admin(api.http.post(url)).json(&json!({"request_id": "c1", "delta": 100}))).await;
    let body = json!({"buyer": "hana", "product_id": "p", "quantity": 1});
    let redeemed =
        reply(api.http.post(format!("{}/api/v1/redemptions", api.url)).header("Idempotency-Key", "r1").json(&body))
            .await;
    assert_eq!(redeemed.status, 201, "{}", redeemed.body);

    let all: BTreeSet<&str> = [
        "order.created",
        "order.paid",
        "order.delivered",
        "order.expired",
        "order.cancelled",
        "order.refund_pending",
        "order.refunded",
        "order.amount_mismatch",
        "group.completed",
        "group.failed",
        "redemption.settled",
        "stock.low",
        "stock.sold_out",
    ]
    .into();
    let got = until_received(&crm, "every type", |got| {
        let kinds: BTreeSet<&str> = got.iter().map(|r| r.kind.as_str()).collect();
        all.is_subset(&kinds)
    })
    .await;
    assert_eq!(crm.refused(), 0, "every delivery's signature verified");
    assert!(got.iter().all(|r| r.acknowledged && !r.duplicate), "each event once to a healthy receiver");
    let ids: BTreeSet<&str> = got.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids.len(), got.len(), "event ids are unique");
    let orders = by_order(&got);
    assert_in_order(&orders);
    let kinds_of = |id: &str| orders.get(id).cloned().unwrap_or_default();
    assert_eq!(kinds_of(&alice_id), ["order.created", "order.paid", "order.delivered"]);
    assert_eq!(kinds_of(&bob_id), ["order.created", "order.cancelled"]);
    assert_eq!(kinds_of(&carol_id), ["order.created", "order.expired"]);
    // A wrong amount pays nothing: the order then expires like any unpaid one.
    assert_eq!(kinds_of(&dave_id)[..2], ["order.created", "order.amount_mismatch"]);
    assert_eq!(
        kinds_of(&late_id),
        ["order.created", "order.cancelled", "order.paid", "order.refund_pending", "order.refunded"]
    );
    for seat in &seats {
        let k = kinds_of(seat);
        assert!(k.contains(&"order.delivered".to_string()), "seat {seat}: {k:?}");
    }
    let find = |kind: &str| got.iter().find(|r| r.kind == kind).unwrap().body.clone();
    assert_eq!(find("group.completed")["data"]["object"]["group_id"], group_id.as_str());
    assert_eq!(find("group.failed")["data"]["object"]["group_id"], failed_group.as_str());
    assert_eq!(find("stock.low")["data"]["object"]["product_id"], "p", "p's 20 keys fell to its threshold of 18");
    let sold_out = find("stock.sold_out")["data"]["object"].clone();
    assert_eq!((sold_out["product_id"].as_str(), sold_out["available"].as_u64()), (Some("late"), Some(0)));
    let paid = got.iter().find(|r| r.kind == "order.paid" && order_of(r) == alice_id).unwrap();
    assert_eq!(paid.body["data"]["payment"]["amount_cents"], 990);
    assert_eq!(paid.body["data"]["payment"]["outcome"], "delivered");
    let delivered = got.iter().find(|r| r.kind == "order.delivered" && order_of(r) == alice_id).unwrap();
    assert!(delivered.body["data"]["object"].get("keys").is_none(), "no keys unless the endpoint asks");
    assert!(delivered.id.starts_with("p.0."), "an id is its journal position: {}", delivered.id);

    // The bot takes only deliveries, with the keys the buyer got.
    let bot_got = until_received(&bot, "the bot's deliveries", |got| {
        got.iter().any(|r| order_of(r) == alice_id) && got.iter().filter(|r| r.kind == "order.delivered").count() >= 5
    })
    .await;
    assert!(bot_got.iter().all(|r| r.kind == "order.delivered"), "only the types it asked for");
    let to_alice = bot_got.iter().find(|r| order_of(r) == alice_id).unwrap();
    assert_eq!(to_alice.body["data"]["object"]["keys"], alice.body["keys"]);

    let view = api.webhook("crm").await;
    assert_eq!(view.status, 200);
    assert_eq!(view.body["source"], "config");
    assert!(view.body.get("secret").is_none(), "the secret is never shown");
    assert!(view.body["delivered"].as_u64().unwrap() >= got.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_receiver_gets_every_event_once_it_recovers_even_across_a_trim() {
    let s = sink().await;
    s.set_mode(Mode::Fail, 0);
    let mut extra = endpoint("shop", &s.url());
    extra.extend(
        [
            ("webhooks.poll_ms", "20"),
            ("webhooks.backoff_base_ms", "20"),
            ("webhooks.backoff_max_ms", "200"),
            ("storage.snapshot_min_journal_bytes", "4096"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    let extra: Vec<(&str, &str)> = extra.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let t = TestApp::spawn_with(&extra).await;
    let api = t.api();
    assert_eq!(api.create_product("p", 990, 0, 2).await.status, 201);
    api.import("p", &(0..200).map(|i| format!("K{i}")).collect::<Vec<_>>()).await;
    let mut ids = Vec::new();
    for i in 0..40 {
        let r = api.buy("p", &format!("b{i}")).await;
        assert_eq!(r.body["status"], "delivered", "{}", r.body);
        ids.push(r.body["order_id"].as_str().unwrap().to_string());
    }
    // The receiver keeps failing: the events wait, listed with their errors.
    let failing = api
        .eventually(Duration::from_secs(30), || async {
            let r = api.deliveries("shop", "failed").await;
            r.body["deliveries"].as_array().is_some_and(|d| {
                !d.is_empty() && d.iter().all(|x| x["last_error"].as_str().unwrap_or("").contains("500"))
            })
        })
        .await;
    assert!(failing, "{}", api.deliveries("shop", "failed").await.body);
    let pending = api.deliveries("shop", "pending").await;
    assert!(pending.body["pending_records"].as_u64().unwrap() > 0, "{}", pending.body);
    // Snapshots trim the journals meanwhile: what the receiver still needs stays.
    let snap = reply(api.admin(api.http.post(format!("{}/api/v1/admin/snapshot", api.url)))).await;
    assert_eq!(snap.status, 200, "{}", snap.body);

    s.set_mode(Mode::Ok, 0);
    let got = until_received(&s, "every order's three events", |got| {
        let orders = by_order(got);
        ids.iter().all(|id| orders.get(id).is_some_and(|k| k.len() == 3))
    })
    .await;
    let orders = by_order(&got);
    assert_in_order(&orders);
    for id in &ids {
        assert_eq!(orders[id], ["order.created", "order.paid", "order.delivered"], "{id}");
    }
    let drained = api
        .eventually(Duration::from_secs(30), || async {
            api.deliveries("shop", "pending").await.body["pending_records"] == 0
                && api.deliveries("shop", "failed").await.body["deliveries"].as_array().is_some_and(|d| d.is_empty())
        })
        .await;
    assert!(drained, "{}", api.webhook("shop").await.body);
    let metrics = api.metrics().await;
    assert!(metrics.contains("kami_webhook_deliveries_total{endpoint=\"shop\",result=\"failed\"}"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_come_and_go_at_run_time_and_dead_letters_are_redelivered() {
    let (s, config_sink) = (sink().await, sink().await);
    let mut extra = endpoint("fixed", &config_sink.url());
    extra.extend(
        [("webhooks.poll_ms", "20"), ("webhooks.backoff_base_ms", "20"), ("webhooks.backoff_max_ms", "100")]
            .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    let extra: Vec<(&str, &str)> = extra.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let t = TestApp::spawn_with(&extra).await;
    let api = t.api();
    api.product_with_keys("p", 10, 0).await;
    let before = api.buy("p", "early").await;
    let early_id = before.body["order_id"].as_str().unwrap().to_string();

    let add = |body: Value| reply(api.admin(api.http.post(format!("{}/api/v1/admin/webhooks", api.url))).json(&body));
    let bad = add(json!({"name": "x", "url": "ftp://nowhere", "secret": HOOK_SECRET})).await;
    assert_eq!((bad.status, bad.code()), (422, "invalid_request"), "{}", bad.body);
    let long = format!("http://shop.example/{}", "a".repeat(2048));
    let bad = add(json!({"name": "x", "url": long, "secret": HOOK_SECRET})).await;
    assert_eq!((bad.status, bad.code()), (422, "invalid_request"), "{}", bad.body);
    assert!(bad.body["error"]["message"].as_str().unwrap().contains("2048"), "{}", bad.body);
    let bad = add(json!({"name": "x", "url": s.url(), "secret": HOOK_SECRET, "events": ["order.shipped"]})).await;
    assert_eq!((bad.status, bad.code()), (422, "invalid_request"), "{}", bad.body);
    let taken = add(json!({"name": "fixed", "url": s.url(), "secret": HOOK_SECRET})).await;
    assert_eq!((taken.status, taken.code()), (409, "webhook_exists"));
    s.set_mode(Mode::Fail, 0);
    let order_events = ["order.created", "order.paid", "order.delivered"];
    let added = add(json!({"name": "erp", "url": s.url(), "secret": HOOK_SECRET, "retry_horizon_secs": 1,
                           "events": order_events}))
    .await;
    assert_eq!(added.status, 201, "{}", added.body);
    assert_eq!(added.body["source"], "api");

    // Sent from when it was added: not the order before it.
    let after = api.buy("p", "late").await;
    let late_id = after.body["order_id"].as_str().unwrap().to_string();
    let dead = api
        .eventually(Duration::from_secs(30), || async {
            api.deliveries("erp", "dead").await.body["deliveries"].as_array().is_some_and(|d| d.len() >= 3)
        })
        .await;
    assert!(dead, "{}", api.deliveries("erp", "dead").await.body);
    let listed = api.deliveries("erp", "dead").await.body;
    let dead_ids: Vec<&str> =
        listed["deliveries"].as_array().unwrap().iter().map(|d| d["event_id"].as_str().unwrap()).collect();
    assert_eq!(dead_ids.len(), 3, "{listed}");
    for d in listed["deliveries"].as_array().unwrap() {
        assert_eq!(d["body"]["data"]["object"]["order_id"], late_id.as_str(), "{d}");
        assert!(d["attempts"].as_u64().unwrap() >= 1);
    }
    assert_eq!(api.webhook("erp").await.body["dead"], 3);
    let status = reply(api.http.get(format!("{}/status.json", api.url))).await;
    let erp = status.body["webhooks"].as_array().unwrap().iter().find(|w| w["name"] == "erp").cloned().unwrap();
    assert_eq!(erp["dead"], 3, "the status page shows the dead letters: {erp}");

    // Redelivered once the receiver is back: one by id, the rest by time range.
    s.set_mode(Mode::Ok, 0);
    let url = format!("{}/api/v1/admin/webhooks/erp/redeliver", api.url);
    let one = reply(api.admin(api.http.post(&url)).json(&json!({"event_id": dead_ids[0]}))).await;
    assert_eq!((one.status, one.body["queued"].as_u64()), (202, Some(1)), "{}", one.body);
    let range = json!({"from": "2000-01-01T00:00:00Z", "to": "2100-01-01T00:00:00Z"});
    let rest = reply(api.admin(api.http.post(&url)).json(&range)).await;
    assert_eq!(rest.status, 202, "{}", rest.body);
    let got = until_received(&s, "the redelivered events", |got| {
        dead_ids.iter().all(|id| got.iter().any(|r| r.id == *id && r.acknowledged))
    })
    .await;
    assert!(!got.iter().any(|r| order_of(r) == early_id), "nothing from before the endpoint was added");
    let emptied = api
        .eventually(Duration::from_secs(10), || async {
            api.deliveries("erp", "dead").await.body["deliveries"].as_array().is_some_and(|d| d.is_empty())
        })
        .await;
    assert!(emptied, "{}", api.deliveries("erp", "dead").await.body);

    // Deleted: gone for good; the configured one cannot be deleted through the API.
    let del = |name: &str| reply(api.admin(api.http.delete(format!("{}/api/v1/admin/webhooks/{name}", api.url))));
    assert_eq!(del("erp").await.status, 200);
    assert_eq!(api.webhook("erp").await.code(), "webhook_not_found");
    assert_eq!(del("fixed").await.code(), "webhook_from_config");
    let list = reply(api.admin(api.http.get(format!("{}/api/v1/admin/webhooks", api.url)))).await;
    let names: Vec<&str> =
        list.body["webhooks"].as_array().unwrap().iter().map(|w| w["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["fixed"]);
    // The configured one saw both orders.
    until_received(&config_sink, "the configured endpoint", |got| {
        [&early_id, &late_id].iter().all(|id| got.iter().any(|r| order_of(r) == **id && r.kind == "order.delivered"))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_a_sale_loses_no_acknowledged_delivery_and_invents_none() {
    let s = sink().await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let url = s.url();
    let env = [
        ("KAMI_WEBHOOKS__ENDPOINTS__SHOP__URL", url.as_str()),
        ("KAMI_WEBHOOKS__ENDPOINTS__SHOP__SECRET", HOOK_SECRET),
        ("KAMI_WEBHOOKS__POLL_MS", "20"),
        ("KAMI_STORAGE__SNAPSHOT_MIN_JOURNAL_BYTES", "65536"),
    ];
    let mut server = Server::start(&data, &env);
    let api = server.api();
    assert_eq!(api.create_product("p", 990, 0, 2).await.status, 201);
    api.import("p", &(0..5_000).map(|i| format!("K{i}")).collect::<Vec<_>>()).await;
    // The receiver is slow for part of the sale, so the kill finds events not sent yet.
    s.set_mode(Mode::Slow, 30);
    // Acknowledged before the kill: a group completed, and a refund owed (a payment for
    // an order whose key went to another buyer after it was cancelled).
    let deal = json!({"deal_id": "duo", "group_size": 2, "price_cents": 500, "time_limit_secs": 3600});
    let r = reply(api.admin(api.http.post(format!("{}/api/v1/products/p/group-deals", api.url))).json(&deal)).await;
    assert_eq!(r.status, 201, "{}", r.body);
    let body = json!({"product_id": "p", "deal_id": "duo", "buyer": "ga", "join_open": false});
    let opened = reply(api.http.post(format!("{}/api/v1/groups", api.url)).json(&body)).await;
    let group_id = opened.body["group"]["group_id"].as_str().unwrap().to_string();
    let joined =
        reply(api.http.post(format!("{}/api/v1/groups/{group_id}/join", api.url)).json(&json!({"buyer": "gb"}))).await;
    for seat in [&opened, &joined] {
        let id = seat.body["order"]["order_id"].as_str().unwrap();
        assert_eq!(api.notify(id, &format!("pay-{id}"), 500).await.status, 200);
    }
    api.product_with_keys("late", 1, 0).await;
    let late = api.order("late", 1, "l1", None).await;
    let late_id = late.body["order_id"].as_str().unwrap().to_string();
    assert_eq!(api.cancel(&late_id, late.body["query_token"].as_str().unwrap()).await.status, 200);
    assert_eq!(api.buy("late", "l2").await.body["status"], "delivered");
    assert_eq!(api.notify(&late_id, "pay-late", 990).await.status, 200, "a refund owed, acknowledged");
    let acked: std::sync::Arc<std::sync::Mutex<Vec<String>>> = Default::default();
    let buyers: Vec<_> = (0..8)
        .map(|w| {
            let (api, acked) = (api.clone(), acked.clone());
            tokio::spawn(async move {
                for i in 0.. {
                    let buyer = format!("w{w}-{i}");
                    let Ok(r) = api.order_request("p", 1, &buyer).send().await else { return };
                    let Ok(order) = r.json::<Value>().await else { return };
                    let Some(id) = order["order_id"].as_str() else { continue };
                    let Ok(paid) = api.notify_request(id, &format!("pay-{id}"), 990).send().await else { return };
                    if paid.status() == 200 {
                        acked.lock().unwrap().push(id.to_string());
                    }
                }
            })
        })
        .collect();
    let enough = api.eventually(Duration::from_secs(60), || async { acked.lock().unwrap().len() >= 300 }).await;
    assert!(enough, "the sale went on");
    server.kill9();
    for b in buyers {
        let _ = b.await;
    }
    let acked: Vec<String> = acked.lock().unwrap().clone();
    s.set_mode(Mode::Ok, 0);

    let restarted = Server::start(&data, &env);
    let api = restarted.api();
    let got = until_received(&s, "every acknowledged delivery", |got| {
        let delivered: BTreeSet<String> =
            got.iter().filter(|r| r.kind == "order.delivered" && r.acknowledged).map(order_of).collect();
        acked.iter().all(|id| delivered.contains(id))
    })
    .await;
    let outcome = |kind: &str, object: &str| {
        got.iter().any(|r| {
            r.kind == kind
                && r.acknowledged
                && r.body["data"]["object"][if kind.starts_with("group") { "group_id" } else { "order_id" }] == object
        })
    };
    assert!(outcome("group.completed", &group_id), "the acknowledged group completion was sent");
    assert!(outcome("order.refund_pending", &late_id), "the acknowledged refund owed was sent");
    // None invented: every order the receiver was told of is, after the restart, what it was told.
    let mut told: HashMap<String, Vec<String>> = HashMap::new();
    for r in got.iter().filter(|r| r.acknowledged && r.kind.starts_with("order.")) {
        told.entry(order_of(r)).or_default().push(r.kind.clone());
    }
    for (id, kinds) in &told {
        let order = api.admin_order(id).await;
        assert_eq!(order.status, 200, "{id}: {}", order.body);
        if kinds.iter().any(|k| k == "order.delivered") {
            assert_eq!(order.body["status"], "delivered", "{id} was announced delivered: {}", order.body);
        }
    }
    let group = reply(api.http.get(format!("{}/api/v1/groups/{group_id}", api.url))).await;
    assert_eq!(group.body["state"], "completed", "announced completed: {}", group.body);
    let duplicates = got.iter().filter(|r| r.duplicate).count();
    assert_audit_ok(&api.audit().await);
    eprintln!(
        "webhooks after kill -9: {} acknowledged deliveries, {} events received, {duplicates} sent again",
        acked.len(),
        got.len()
    );
}

/// A certificate authority of the test's own, and a receiver's certificate for
/// `localhost` signed by it: (CA PEM path, certificate PEM path, key PEM path).
fn private_ca(dir: &std::path::Path) -> (String, std::path::PathBuf, std::path::PathBuf) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&leaf_key, &ca, &ca_key)
        .unwrap();
    let (ca_file, cert, key) = (dir.join("ca.pem"), dir.join("receiver.pem"), dir.join("receiver.key"));
    std::fs::write(&ca_file, ca.pem()).unwrap();
    std::fs::write(&cert, leaf.pem()).unwrap();
    std::fs::write(&key, leaf_key.serialize_pem()).unwrap();
    (ca_file.display().to_string(), cert, key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_endpoint_behind_a_private_ca_gets_its_deliveries_and_a_wrong_name_gets_none() {
    let dir = tempfile::tempdir().unwrap();
    let (ca_file, cert, key) = private_ca(dir.path());
    let tls = sink::tls_config(&cert, &key).unwrap();
    let s = sink::start_tls("127.0.0.1:0".parse().unwrap(), HOOK_SECRET.into(), Some(tls)).await.unwrap();
    assert!(s.url().starts_with("https://localhost:"), "{}", s.url());
    // The same receiver under a name its certificate does not carry.
    let wrong_name = format!("https://127.0.0.1:{}/", s.addr.port());
    let mut extra = endpoint("tls", &s.url());
    extra.extend(endpoint("wrongname", &wrong_name));
    extra.push(("webhooks.ca_file".into(), ca_file));
    extra.extend([("webhooks.poll_ms", "20"), ("webhooks.backoff_base_ms", "20")].map(|(k, v)| (k.into(), v.into())));
    let extra: Vec<(&str, &str)> = extra.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let t = TestApp::spawn_with(&extra).await;
    let api = t.api();
    api.product_with_keys("p", 2, 0).await;
    let order = api.buy("p", "alice").await;
    let id = order.body["order_id"].as_str().unwrap().to_string();
    let got = until_received(&s, "the order's events over TLS", |got| {
        by_order(got).get(&id).is_some_and(|kinds| kinds.iter().any(|k| k == "order.delivered"))
    })
    .await;
    assert_eq!(s.refused(), 0, "every delivery over TLS verified");
    assert!(got.iter().all(|r| !r.duplicate || r.acknowledged));
    // The endpoint whose name the certificate does not match: attempts, no delivery.
    let failing = api
        .eventually(Duration::from_secs(20), || async {
            let w = api.webhook("wrongname").await;
            w.body["failed_attempts"].as_u64().unwrap_or(0) > 0
        })
        .await;
    let w = api.webhook("wrongname").await;
    assert!(failing, "{}", w.body);
    assert_eq!(w.body["delivered"], json!(0), "{}", w.body);
    assert_eq!(api.webhook("tls").await.body["failed_attempts"], json!(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_file_that_holds_no_certificate_stops_kami_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("empty.pem");
    std::fs::write(&bad, "not a certificate\n").unwrap();
    let bad = bad.display().to_string();
    let settings = common::settings(&dir.path().join("data"), &[("webhooks.ca_file", bad.as_str())]);
    let err = kami::start(settings).await.err().expect("kami refuses to start").to_string();
    assert!(err.contains("webhooks.ca_file") && err.contains("empty.pem"), "{err}");
}
