//! The payment side against real sandbox gateways on loopback: lost notifications
//! found by query, late payments served or refunded at the gateway, a failing
//! channel's breaker and fail-over, reconciliation, and a soak with random faults.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::gateway::*;
use common::*;
use kami::sandbox::{Faults, RunningSandbox};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

/// Sweeps and health checks every 50 ms, first query 100 ms after an order, a
/// breaker that opens after 2 failures and probes after 300 ms.
const FAST: &[(&str, &str)] = &[
    ("payments.query_after_ms", "100"),
    ("payments.query_max_interval_ms", "400"),
    ("payments.sweep_interval_ms", "50"),
    ("payments.health_interval_ms", "50"),
    ("payments.breaker.max_consecutive_failures", "2"),
    ("payments.breaker.cooldown_ms", "300"),
];

fn with(extra: &[(&'static str, &str)]) -> Vec<(&'static str, String)> {
    FAST.iter().chain(extra).map(|(k, v)| (*k, v.to_string())).collect()
}

fn borrowed<'a>(v: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    v.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

async fn reconcile(api: &Api) -> Value {
    let r = reply(api.admin(api.http.post(format!("{}/api/v1/admin/reconcile", api.url)))).await;
    assert_eq!(r.status, 200, "{}", r.body);
    r.body
}

async fn channels(api: &Api) -> Value {
    let r = reply(api.admin(api.http.get(format!("{}/api/v1/admin/payments/channels", api.url)))).await;
    assert_eq!(r.status, 200, "{}", r.body);
    r.body
}

async fn channel_state(api: &Api, name: &str) -> String {
    let all = channels(api).await;
    let c = all["channels"].as_array().unwrap().iter().find(|c| c["name"] == name).expect("channel listed");
    c["state"].as_str().unwrap().to_string()
}

async fn wait_state(api: &Api, name: &str, state: &str) {
    let reached = api.eventually(Duration::from_secs(20), || async { channel_state(api, name).await == state }).await;
    assert!(reached, "channel {name} never {state}: {}", channels(api).await);
}

fn payment_of<'a>(gw: &'a [kami::sandbox::SandboxPayment], id: &str) -> &'a kami::sandbox::SandboxPayment {
    gw.iter().find(|p| p.payment_id == id).expect("payment at the gateway")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_notification_is_found_by_query() {
    let (gw, t) = shop(FAST).await;
    let api = t.api();
    let keys = api.product_with_keys("p", 3, 0).await;
    gw.set_faults(Faults { drop_notifications: true, ..Faults::default() });
    let order = api.order("p", 1, "alice", None).await;
    let payment_id = pay_at_gateway(&api, &gw, &order).await;
    let paid = Instant::now();
    let o = delivered(&api, &order).await;
    let took = paid.elapsed();
    assert_eq!(o["keys"][0], keys[0].as_str());
    let at_gateway = gw.payments();
    let p = payment_of(&at_gateway, &payment_id);
    assert_eq!((p.notifications_sent, p.status.as_str()), (0, "paid"), "no notification ever left the gateway");
    let admin = api.admin_order(order.body["order_id"].as_str().unwrap()).await;
    assert_eq!(admin.body["payment_id"], payment_id.as_str());
    println!("dropped notification → delivered by query in {} ms", took.as_millis());

    // A notification arriving after the query found the payment changes nothing.
    let late = api.notify(order.body["order_id"].as_str().unwrap(), &payment_id, 990).await;
    assert_eq!(late.status, 200);
    let audit = api.audit().await;
    assert_audit_ok(&audit);
    assert_eq!(audit.body["products"][0]["sold"], json!(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_payments_are_served_or_refunded_at_the_gateway() {
    let (gw, t) = shop(&borrowed(&with(&[("orders.ttl_secs", "1")]))).await;
    let api = t.api();
    api.product_with_keys("p", 2, 0).await;
    let expired = Duration::from_secs(10);

    // Paid after expiry, stock left: served.
    let alice = api.order("p", 1, "alice", None).await;
    reaches(&api, &alice, "expired", expired).await;
    pay_at_gateway(&api, &gw, &alice).await;
    assert_eq!(delivered(&api, &alice).await["keys"].as_array().unwrap().len(), 1);

    // Paid after expiry, sold out meanwhile: refunded at the gateway.
    let bob = api.order("p", 1, "bob", None).await;
    reaches(&api, &bob, "expired", expired).await;
    let carol = api.order("p", 1, "carol", None).await;
    pay_at_gateway(&api, &gw, &carol).await;
    delivered(&api, &carol).await;
    let bobs_payment = pay_at_gateway(&api, &gw, &bob).await;
    let refunded = reaches(&api, &bob, "refunded", Duration::from_secs(20)).await;
    assert!(refunded["keys"].as_array().is_none_or(|k| k.is_empty()), "{refunded}");
    let at_gateway = gw.payments();
    let p = payment_of(&at_gateway, &bobs_payment);
    assert_eq!((p.status.as_str(), p.refunds), ("refunded", 1), "refunded exactly once at the gateway");
    assert_eq!(at_gateway.iter().filter(|p| p.status == "refunded").count(), 1);

    let report = reconcile(&api).await;
    assert_eq!(report["refunds_pending"], json!([]), "{report}");
    assert_eq!(report["stuck_paid"], json!([]), "{report}");
    let audit = api.audit().await;
    assert_audit_ok(&audit);
    assert_eq!(audit.body["products"][0]["sold"], json!(2));
    assert_eq!(audit.body["orders"]["refunded"], json!(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_finds_what_the_gateway_knows_and_kami_does_not() {
    // Sweeps far apart: only the explicit reconcile can find the payment in time.
    let (gw, t) = shop(&[("payments.sweep_interval_ms", "600000")]).await;
    let api = t.api();
    api.product_with_keys("p", 2, 0).await;
    gw.set_faults(Faults { drop_notifications: true, ..Faults::default() });
    let order = api.order("p", 1, "alice", None).await;
    let payment_id = pay_at_gateway(&api, &gw, &order).await;
    let report = reconcile(&api).await;
    let found = report["payments_found"].as_array().unwrap();
    assert_eq!(found.len(), 1, "{report}");
    assert_eq!(found[0]["payment_id"], payment_id.as_str());
    assert_eq!(found[0]["outcome"], "delivered");
    assert_eq!(api.admin_order(order.body["order_id"].as_str().unwrap()).await.body["status"], "delivered");
    // Nothing left to find.
    let again = reconcile(&api).await;
    assert_eq!(again["payments_found"], json!([]), "{again}");
    assert_eq!(again["orders_unheard"], json!(0), "{again}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_payment_supervisor_finds_its_work_again() {
    let settings = with(&[("orders.ttl_secs", "1"), ("chaos.enabled", "true")]);
    let (gw, t) = shop(&borrowed(&settings)).await;
    let api = t.api();
    api.product_with_keys("p", 1, 0).await;
    gw.set_faults(Faults { drop_notifications: true, ..Faults::default() });
    let late = api.order("p", 1, "late", None).await;
    reaches(&api, &late, "expired", Duration::from_secs(10)).await;
    let first = api.order("p", 1, "first", None).await;
    pay_at_gateway(&api, &gw, &first).await;
    let late_payment = pay_at_gateway(&api, &gw, &late).await;
    // Killed over and over while it has a payment to find and then a refund to make.
    let killer = {
        let api = api.clone();
        tokio::spawn(async move {
            for _ in 0..20 {
                assert_eq!(api.kill("payments").await.body["killed"], "payments");
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        })
    };
    delivered(&api, &first).await;
    reaches(&api, &late, "refunded", Duration::from_secs(30)).await;
    killer.await.unwrap();
    let at_gateway = gw.payments();
    let p = payment_of(&at_gateway, &late_payment);
    assert_eq!((p.status.as_str(), p.refunds), ("refunded", 1));
    assert_eq!(channel_state(&api, "sandbox").await, "closed", "the restarted supervisor answers");
    assert_audit_ok(&api.audit().await);
}

/// Two gateways: `a` preferred (priority 0), `b` the fallback.
async fn two_channels() -> (RunningSandbox, RunningSandbox, TestApp) {
    let (ga, gb) = (gateway("secret-a").await, gateway("secret-b").await);
    let (a_url, b_url) = (ga.url(), gb.url());
    let settings = with(&[
        ("payments.default_channel", "a"),
        ("payments.channels.sandbox.priority", "9"),
        ("payments.channels.a.secret", "secret-a"),
        ("payments.channels.a.endpoint", &a_url),
        ("payments.channels.a.timeout_ms", "200"),
        ("payments.channels.b.kind", "http"),
        ("payments.channels.b.secret", "secret-b"),
        ("payments.channels.b.endpoint", &b_url),
        ("payments.channels.b.priority", "1"),
    ]);
    let t = TestApp::spawn_with(&borrowed(&settings)).await;
    ga.set_notify_url(&format!("{}/api/v1/payments/a/notify", t.url));
    gb.set_notify_url(&format!("{}/api/v1/payments/b/notify", t.url));
    (ga, gb, t)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_channel_opens_its_breaker_and_orders_fail_over() {
    let (ga, gb, t) = two_channels().await;
    let api = t.api();
    api.product_with_keys("p", 10, 0).await;
    let mut orders = Vec::new();
    let order_on = |expect: &'static str| {
        let api = &api;
        async move {
            let o = api.order("p", 1, &format!("buyer-{}", rand::random::<u32>()), None).await;
            assert_eq!(o.body["payment"]["channel"], expect, "{}", o.body);
            o
        }
    };
    let before = order_on("a").await;

    for (fault, name) in [
        (Faults { api_5xx: true, ..Faults::default() }, "5xx"),
        (Faults { api_hang_ms: 2_000, ..Faults::default() }, "hang"),
    ] {
        ga.set_faults(fault);
        wait_state(&api, "a", "open").await;
        let during = order_on("b").await;
        pay_at_gateway(&api, &gb, &during).await;
        delivered(&api, &during).await;
        orders.push((during, "b"));
        ga.set_faults(Faults::default());
        wait_state(&api, "a", "closed").await;
        let after = order_on("a").await;
        pay_at_gateway(&api, &ga, &after).await;
        delivered(&api, &after).await;
        orders.push((after, "a"));
        println!("channel a {name}: opened, orders went to b, probe closed it");
    }
    // The order taken by `a` before its outages is still payable there.
    pay_at_gateway(&api, &ga, &before).await;
    delivered(&api, &before).await;
    orders.push((before, "a"));

    let a = channels(&api).await;
    let a = a["channels"].as_array().unwrap().iter().find(|c| c["name"] == "a").unwrap().clone();
    assert!(a["opened_total"].as_u64().unwrap() >= 2, "{a}");
    // Each order paid once, at the channel it was given, and nothing refunded.
    let (pa, pb) = (ga.payments(), gb.payments());
    for (o, channel) in &orders {
        let id = o.body["order_id"].as_str().unwrap();
        let at = if *channel == "a" { &pa } else { &pb };
        let paid: Vec<_> = at.iter().filter(|p| p.order_id == id).collect();
        assert_eq!(paid.len(), 1, "order {id} paid once at {channel}");
        assert_eq!(paid[0].status, "paid");
        assert_eq!(api.admin_order(id).await.body["payment_id"], paid[0].payment_id.as_str());
    }
    assert_eq!(pa.len() + pb.len(), orders.len(), "no payment anywhere else");
    let audit = api.audit().await;
    assert_audit_ok(&audit);
    assert_eq!(audit.body["products"][0]["sold"], json!(orders.len()));
    let text = api.metrics().await;
    assert!(text.contains("kami_payment_channel_state{channel=\"a\"} 0"), "breaker state exported");
}

/// Random gateway faults while buyers order and pay, some after their order
/// expired, on a product with fewer keys than orders. Afterwards, with the faults
/// off and reconciliation run: every payment the gateway took is a delivered
/// order or a refund made at the gateway (I3), keys are distinct, audit ok.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_with_random_gateway_faults() {
    let seed = seed("soak_with_random_gateway_faults");
    let buyers = 2_500 * soak_factor();
    let keys = buyers / 2;
    let settings = with(&[
        ("orders.ttl_secs", "1"),
        ("payments.channels.sandbox.timeout_ms", "200"),
        ("payments.channels.sandbox.queries_per_sec", "2000"),
    ]);
    let (gw, t) = shop(&borrowed(&settings)).await;
    let gw = Arc::new(gw);
    let api = Arc::new(t.api());
    api.product_with_keys("p", keys, 0).await;

    let running = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let faults_injected: Arc<[AtomicU64; 5]> = Arc::new(Default::default());
    let chaos = {
        let (gw, running, injected) = (gw.clone(), running.clone(), faults_injected.clone());
        tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            while running.load(Ordering::Relaxed) {
                let f = Faults {
                    drop_notifications: rng.random_bool(0.3),
                    repeat: if rng.random_bool(0.3) { rng.random_range(2..5) } else { 0 },
                    delay_ms: if rng.random_bool(0.2) { rng.random_range(0..300) } else { 0 },
                    reorder: rng.random_bool(0.2),
                    api_5xx: rng.random_bool(0.15),
                    api_hang_ms: if rng.random_bool(0.1) { 300 } else { 0 },
                };
                let on =
                    [f.drop_notifications, f.repeat > 0, f.delay_ms > 0 || f.reorder, f.api_5xx, f.api_hang_ms > 0];
                for (counter, on) in injected.iter().zip(on) {
                    counter.fetch_add(on as u64, Ordering::Relaxed);
                }
                gw.set_faults(f);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            gw.set_faults(Faults::default());
        })
    };

    let next = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for w in 0..32u64 {
        let (api, gw, next) = (api.clone(), gw.clone(), next.clone());
        workers.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ w);
            let (mut mine, mut unpaid) = (Vec::new(), None);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                if i >= buyers {
                    return (mine, unpaid);
                }
                let o = api.order("p", 1, &format!("b{i}"), None).await;
                if o.status != 201 {
                    assert_eq!((o.status, o.code()), (409, "sold_out"), "{}", o.body);
                    continue;
                }
                mine.push(o.body["order_id"].as_str().unwrap().to_string());
                if rng.random_bool(0.85) {
                    // Some pay well after the 1 s expiry.
                    tokio::time::sleep(Duration::from_millis(rng.random_range(0..1_500))).await;
                    pay_at_gateway(&api, &gw, &o).await;
                } else if unpaid.is_none() {
                    unpaid = Some(o);
                }
            }
        }));
    }
    let (mut orders, mut unpaid) = (Vec::new(), Vec::new());
    for w in workers {
        let (mine, left) = w.await.unwrap();
        orders.extend(mine);
        unpaid.extend(left);
    }
    running.store(false, Ordering::Relaxed);
    chaos.await.unwrap();

    // Whatever the timing did, the sold-out refund happens at least once: once no
    // reservation is left, sell (and pay for) every key still available, then pay
    // for an order that expired unpaid.
    let no_reservation = || async { api.audit().await.body["products"][0]["reserved"] == json!(0) };
    assert!(api.eventually(Duration::from_secs(30), no_reservation).await, "reservations never expired");
    for i in 0.. {
        let o = api.order("p", 1, &format!("drain-{i}"), None).await;
        if o.status != 201 {
            assert_eq!(o.code(), "sold_out", "{}", o.body);
            break;
        }
        pay_at_gateway(&api, &gw, &o).await;
        orders.push(o.body["order_id"].as_str().unwrap().to_string());
    }
    let late = unpaid.first().expect("some buyers never paid");
    assert_eq!(api.admin_order(late.body["order_id"].as_str().unwrap()).await.body["status"], "expired");
    pay_at_gateway(&api, &gw, late).await;

    // Settle: reconcile until the gateway and kami agree (bounded).
    let settled_by = Instant::now() + Duration::from_secs(60);
    let mut rounds = 0;
    loop {
        rounds += 1;
        let report = reconcile(&api).await;
        assert_eq!(report["stuck_paid"], json!([]), "{report}");
        let mut unsettled = Vec::new();
        for p in gw.payments() {
            let status = api.admin_order(&p.order_id).await.body["status"].as_str().unwrap().to_string();
            let ok = match p.status.as_str() {
                "paid" => status == "delivered",
                "refunded" => status == "refunded",
                _ => status != "delivered",
            };
            if !ok {
                unsettled.push(format!("{} {} at the gateway, {status} in kami", p.order_id, p.status));
            }
        }
        if unsettled.is_empty() && report["refunds_pending"] == json!([]) {
            break;
        }
        assert!(Instant::now() < settled_by, "not settled after {rounds} rounds: {unsettled:?} {report}");
    }

    let at_gateway = gw.payments();
    let paid = at_gateway.iter().filter(|p| p.status == "paid").count();
    let refunded = at_gateway.iter().filter(|p| p.status == "refunded").count();
    assert!(at_gateway.iter().all(|p| p.refunds <= 1), "a payment refunded twice");
    let mut seen_keys = HashSet::new();
    let mut statuses: HashMap<String, usize> = HashMap::new();
    for id in &orders {
        let o = api.admin_order(id).await.body;
        *statuses.entry(o["status"].as_str().unwrap().to_string()).or_default() += 1;
        for k in o["keys"].as_array().into_iter().flatten() {
            if o["status"] == "delivered" {
                assert!(seen_keys.insert(k.as_str().unwrap().to_string()), "key {k} delivered twice");
            }
        }
    }
    let audit = api.audit().await;
    assert_audit_ok(&audit);
    assert_eq!(audit.body["products"][0]["sold"], json!(paid), "every paid payment is one delivery");
    assert_eq!(audit.body["orders"]["delivered"], json!(paid));
    assert_eq!(audit.body["orders"]["refunded"], json!(refunded));
    assert_eq!(seen_keys.len(), paid);
    assert!(refunded > 0 && paid > 0, "the soak exercised both outcomes: paid {paid}, refunded {refunded}");
    let f: Vec<u64> = faults_injected.iter().map(|c| c.load(Ordering::Relaxed)).collect();
    let acked: u32 = at_gateway.iter().map(|p| p.notifications_acked).sum();
    let metrics = api.metrics().await;
    let found = metrics.lines().find(|l| l.starts_with("kami_payments_found_by_query_total")).map(str::to_string);
    println!(
        "soak: {} orders, {} payments at the gateway: {paid} delivered, {refunded} refunded; statuses {statuses:?}; \
         fault periods drop/repeat/delay+reorder/5xx/hang = {f:?}; notifications acked {acked}; {found:?}; \
         settled in {rounds} reconcile rounds; violations 0",
        orders.len(),
        at_gateway.len()
    );
}
