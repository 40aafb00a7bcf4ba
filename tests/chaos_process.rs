//! Chaos suite, process kills (I4: acknowledged means durable). The real binary
//! serves traffic and dies at a random instant, again and again, on one data
//! directory: by SIGKILL from outside, or by SIGKILL from inside at a crash point
//! (mid group flush, right after a flush, between a snapshot and its trim, in the
//! middle of a trim). After every death:
//! * `kami audit --data DIR` must pass on the directory as the crash left it;
//! * the restarted server must show every write a client was told succeeded: each
//!   acknowledged order exists, each acknowledged payment is delivered with the
//!   keys the buyer saw, no key is delivered twice, and conservation holds (with
//!   the keys restocked and withdrawn by acknowledged requests counted), and an
//!   order created with a query password is found by it.
//!
//! Seeded (rerun with `KAMI_SEED=...`); `KAMI_SOAK=n` runs n times the cycles.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use rand::{Rng, SeedableRng};
use serde_json::json;

#[derive(Debug, Clone, Default)]
struct Acked {
    token: String,
    /// Keys the buyer saw after an acknowledged payment.
    keys: Option<Vec<String>>,
    paid: bool,
    /// The cycle in which it was acknowledged.
    cycle: usize,
    /// The query password it was created with, if any (a journaled lookup index).
    password: Option<String>,
}

type Ledger = Arc<Mutex<HashMap<String, Acked>>>;

/// Keys imported by a worker that found the product sold out.
const RESTOCK_KEYS: usize = 500;
/// Keys that worker then withdraws.
const WITHDRAW_KEYS: u64 = 10;

/// Shared by the traffic workers of a run.
#[derive(Clone, Default)]
struct Counts {
    /// Orders acknowledged in the current cycle.
    acked: Arc<AtomicUsize>,
    /// Keys added by acknowledged restocks, over the whole run.
    restocked: Arc<AtomicUsize>,
    /// Keys taken out of stock by acknowledged withdrawals, over the whole run.
    withdrawn: Arc<AtomicUsize>,
}

/// Buyers order and pay until the server goes away; every 2xx goes in the ledger.
async fn traffic(api: Api, ledger: Ledger, worker: usize, cycle: usize, counts: Counts) {
    let Counts { acked, restocked, withdrawn } = counts;
    for i in 0.. {
        let buyer = format!("c{cycle}-w{worker}-b{i}");
        // Every twentieth order can be looked up with a password.
        let password = (i % 20 == 7).then(|| format!("pw-{buyer}"));
        let mut order = json!({"product_id": "p", "quantity": 1, "buyer": buyer});
        if let Some(p) = &password {
            order["query_password"] = json!(p);
        }
        let Ok(resp) = api.http.post(format!("{}/api/v1/orders", api.url)).json(&order).send().await else {
            return;
        };
        if resp.status() != 201 {
            let status = resp.status();
            assert!(status == 409 || status == 503, "order answered {status}");
            let Ok(body) = resp.json::<serde_json::Value>().await else { return };
            if body["error"]["code"] == "sold_out" {
                // How many orders a cycle acknowledges before its death depends on
                // the machine's speed (slow flushes carry more orders each): the
                // merchant restocks so traffic never stalls on an empty shelf.
                let keys: Vec<String> = (0..RESTOCK_KEYS).map(|k| format!("{buyer}-restock-{k}")).collect();
                let Ok(r) = api
                    .admin(api.http.post(format!("{}/api/v1/products/p/keys", api.url)))
                    .json(&json!({ "keys": keys }))
                    .send()
                    .await
                else {
                    return;
                };
                if r.status() == 200 || r.status() == 201 {
                    restocked.fetch_add(RESTOCK_KEYS, Ordering::SeqCst);
                }
                // And takes a few back out of stock (a journaled withdrawal).
                let Ok(w) = api
                    .admin(api.http.post(format!("{}/api/v1/admin/products/p/keys/withdraw", api.url)))
                    .json(&json!({ "count": WITHDRAW_KEYS }))
                    .send()
                    .await
                else {
                    return;
                };
                if w.status() == 200 {
                    let Ok(body) = w.json::<serde_json::Value>().await else { return };
                    withdrawn.fetch_add(body["withdrawn"].as_u64().unwrap() as usize, Ordering::SeqCst);
                }
            }
            continue;
        }
        let Ok(body) = resp.json::<serde_json::Value>().await else { return };
        let id = body["order_id"].as_str().unwrap().to_string();
        let token = body["query_token"].as_str().unwrap().to_string();
        ledger.lock().unwrap().insert(id.clone(), Acked { token: token.clone(), cycle, password, ..Acked::default() });
        acked.fetch_add(1, Ordering::SeqCst);
        if i % 3 == 0 {
            continue; // leave some orders pending
        }
        let payload = json!({"order_id": id, "payment_id": format!("pay-{id}"), "amount_cents": 990, "status": "paid", "timestamp": now_secs(), "nonce": format!("{buyer}-{}", rand::random::<u64>())});
        let raw = serde_json::to_vec(&payload).unwrap();
        let sig = kami::domain::signature::sign(SECRET.as_bytes(), &raw);
        let Ok(n) = api
            .http
            .post(format!("{}/api/v1/payments/sandbox/notify", api.url))
            .header("X-Signature", sig)
            .body(raw)
            .send()
            .await
        else {
            return;
        };
        if n.status() != 200 {
            continue;
        }
        ledger.lock().unwrap().get_mut(&id).unwrap().paid = true;
        let Ok(got) =
            api.http.get(format!("{}/api/v1/orders/{id}", api.url)).header("X-Order-Token", &token).send().await
        else {
            return;
        };
        if got.status() == 200 {
            let Ok(v) = got.json::<serde_json::Value>().await else { return };
            let keys: Vec<String> = serde_json::from_value(v["keys"].clone()).unwrap();
            ledger.lock().unwrap().get_mut(&id).unwrap().keys = Some(keys);
        }
    }
}

/// Checks `orders` of the ledger against the running server, 16 reads at a time.
/// Returns the keys the checked paid orders hold.
async fn verify(api: &Api, orders: Vec<(String, Acked)>) -> Vec<String> {
    let chunks: Vec<Vec<(String, Acked)>> =
        orders.chunks(orders.len().div_ceil(16).max(1)).map(|c| c.to_vec()).collect();
    let tasks: Vec<_> = chunks
        .into_iter()
        .map(|chunk| {
            let api = api.clone();
            tokio::spawn(async move {
                let mut keys = Vec::new();
                for (id, acked) in chunk {
                    let o = api.get_order(&id, &acked.token).await;
                    assert_eq!(o.status, 200, "acknowledged order {id} (cycle {}) lost: {}", acked.cycle, o.body);
                    let status = o.body["status"].as_str().unwrap();
                    if acked.paid {
                        assert_eq!(status, "delivered", "acknowledged payment of {id} (cycle {}) lost", acked.cycle);
                        let got: Vec<String> = serde_json::from_value(o.body["keys"].clone()).unwrap();
                        if let Some(seen) = &acked.keys {
                            assert_eq!(&got, seen, "order {id} now shows different keys");
                        }
                        keys.extend(got);
                    } else {
                        assert!(["pending_payment", "delivered"].contains(&status), "order {id} is {status}");
                    }
                    if let Some(password) = &acked.password {
                        let body = json!({"order_id": id, "query_password": password});
                        let url = format!("{}/api/v1/orders/lookup", api.url);
                        let found = reply(api.http.post(url).json(&body)).await;
                        assert_eq!(found.body["orders"][0]["order_id"], json!(id), "order {id}'s password was lost");
                    }
                }
                keys
            })
        })
        .collect();
    let mut keys = Vec::new();
    for t in tasks {
        keys.extend(t.await.expect("verifier"));
    }
    keys
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Death {
    /// SIGKILL from outside after a random number of acknowledged orders.
    Sigkill,
    /// SIGKILL from inside at a crash point, after a random number of hits.
    CrashPoint(&'static str),
}

const DEATHS: [Death; 5] = [
    Death::Sigkill,
    Death::CrashPoint("before_flush"),
    Death::CrashPoint("after_flush"),
    Death::CrashPoint("after_snapshot"),
    Death::CrashPoint("mid_trim"),
];

fn offline_audit(data: &std::path::Path) -> String {
    let (code, out, err) = kami_audit(data, false);
    assert_eq!(code, 0, "offline audit after a crash failed:\n{out}{err}");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_instants_loses_no_acknowledged_write() {
    let seed = seed("kill_9_at_random_instants_loses_no_acknowledged_write");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let cycles = 40 * soak_factor();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // Small snapshot threshold: recovery goes through snapshots and journal tails.
    let base_env = [
        ("KAMI_STORAGE__SNAPSHOT_MIN_JOURNAL_BYTES", "16384"),
        ("KAMI_CHAOS__ENABLED", "true"),
        // The verifier looks orders up by password many times from one address.
        ("KAMI_LOOKUP__PER_IP_BURST", "1000000"),
        ("KAMI_LOOKUP__PER_BUYER_BURST", "1000000"),
    ];
    let keys: Vec<String> = (0..12_000 * soak_factor()).map(|i| format!("key-{i}")).collect();
    {
        let server = Server::start(&data, &base_env);
        let api = server.api();
        assert_eq!(api.create_product("p", 990, 0, 2).await.status, 201);
        assert_eq!(api.import("p", &keys).await.body["imported"], json!(keys.len()));
    }

    let ledger: Ledger = Arc::default();
    let restocked = Arc::new(AtomicUsize::new(0));
    let withdrawn = Arc::new(AtomicUsize::new(0));
    let mut deaths: BTreeMap<String, usize> = BTreeMap::new();
    let mut recovery_ms = Vec::new();
    let mut findings = 0;
    for cycle in 0..cycles {
        // Every kind of death early on, then at random.
        let death = DEATHS.get(cycle).copied().unwrap_or_else(|| DEATHS[rng.random_range(0..DEATHS.len())]);
        let hits = match death {
            Death::Sigkill => rng.random_range(20..300u64),
            Death::CrashPoint("after_snapshot" | "mid_trim") => rng.random_range(1..=2u64),
            Death::CrashPoint(_) => rng.random_range(20..300u64),
        };
        let mut env: Vec<(&str, String)> = base_env.iter().map(|(k, v)| (*k, v.to_string())).collect();
        if let Death::CrashPoint(point) = death {
            env.push(("KAMI_CHAOS__CRASH_POINT", point.to_string()));
            env.push(("KAMI_CHAOS__CRASH_AFTER_HITS", hits.to_string()));
        }
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let mut server = Server::start(&data, &env);
        recovery_ms.push(server.recovery_ms);

        let counts = Counts { acked: Arc::default(), restocked: restocked.clone(), withdrawn: withdrawn.clone() };
        let workers: Vec<_> =
            (0..16).map(|w| tokio::spawn(traffic(server.api(), ledger.clone(), w, cycle, counts.clone()))).collect();
        let api = server.api();
        let reached = |n: usize| {
            let acked = counts.acked.clone();
            async move { acked.load(Ordering::SeqCst) >= n }
        };
        match death {
            Death::Sigkill => {
                let ok = api.eventually(Duration::from_secs(60), || reached(hits as usize)).await;
                let live = workers.iter().filter(|w| !w.is_finished()).count();
                let got = counts.acked.load(Ordering::SeqCst);
                assert!(ok, "traffic stalled at {got} of {hits} acknowledged orders; {live} of 16 workers running");
                server.kill9();
            }
            Death::CrashPoint(point) => {
                if point == "after_snapshot" || point == "mid_trim" {
                    // Snapshots also happen by themselves; asking for them makes
                    // sure the point is reached in this cycle.
                    // A snapshot taken by itself may reach the point first: then
                    // the server is gone and the workers with it.
                    let gone = || workers.iter().all(|w| w.is_finished());
                    let ok = api.eventually(Duration::from_secs(60), || async { reached(50).await || gone() }).await;
                    assert!(ok, "traffic stalled at {} of 50 acknowledged orders", counts.acked.load(Ordering::SeqCst));
                    let _ = api.admin(api.http.post(format!("{}/api/v1/admin/snapshot", api.url))).send().await;
                }
                let status = server.exited_within(Duration::from_secs(60)).await;
                assert!(status.is_some(), "crash point {point} not reached after {hits} hits");
            }
        }
        for w in workers {
            w.await.expect("traffic worker");
        }
        *deaths.entry(format!("{death:?}")).or_default() += 1;

        let report = offline_audit(&data);
        let found = report.lines().filter(|l| l.starts_with("finding")).count();
        findings += found;
        if matches!(death, Death::CrashPoint("after_snapshot" | "mid_trim")) {
            assert!(
                report.contains("a trim was interrupted"),
                "{death:?} should leave an untrimmed journal:\n{report}"
            );
        }

        // Restart: every acknowledgement of this cycle, and a sample of older ones.
        let server = Server::start(&data, &base_env);
        let api = server.api();
        assert_audit_ok(&api.audit().await);
        let snapshot: Vec<(String, Acked)> =
            ledger.lock().unwrap().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let (this_cycle, older): (Vec<_>, Vec<_>) = snapshot.into_iter().partition(|(_, a)| a.cycle == cycle);
        // (A snapshot may reach its crash point before any order is acknowledged.)
        let snapshot_death = matches!(death, Death::CrashPoint("after_snapshot" | "mid_trim"));
        assert!(!this_cycle.is_empty() || snapshot_death, "cycle {cycle} acknowledged nothing");
        // Its own generator: how many orders there are depends on timing, and the
        // seed must still replay the same deaths.
        let mut sampler = rand::rngs::StdRng::seed_from_u64(seed ^ cycle as u64);
        let sample: Vec<_> = older.into_iter().filter(|_| sampler.random_range(0..10) == 0).collect();
        verify(&api, this_cycle.into_iter().chain(sample).collect()).await;
    }

    // The whole ledger, at the end: every acknowledged write, no key twice.
    let server = Server::start(&data, &base_env);
    let api = server.api();
    let all: Vec<(String, Acked)> = ledger.lock().unwrap().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let paid = all.iter().filter(|(_, a)| a.paid).count();
    let delivered = verify(&api, all.clone()).await;
    let distinct: HashSet<&String> = delivered.iter().collect();
    assert_eq!(distinct.len(), delivered.len(), "a key was delivered twice");
    let audit = api.audit().await;
    assert_audit_ok(&audit);
    let imported = audit.body["products"][0]["imported"].as_u64().unwrap() as usize;
    assert!(imported >= keys.len() + restocked.load(Ordering::SeqCst), "an acknowledged import was lost");
    assert!(audit.body["products"][0]["sold"].as_u64().unwrap() >= paid as u64);
    let acked_withdrawn = withdrawn.load(Ordering::SeqCst) as u64;
    assert!(
        audit.body["products"][0]["withdrawn"].as_u64().unwrap() >= acked_withdrawn,
        "an acknowledged withdrawal was lost: {} acknowledged, audit {}",
        acked_withdrawn,
        audit.body
    );

    recovery_ms.sort_unstable();
    eprintln!(
        "{cycles} deaths {deaths:?}; {} acknowledged orders and {paid} acknowledged payments checked; \
         {findings} repairable findings; 0 violations; {} keys restocked, {acked_withdrawn} withdrawn; \
         recovery ms median {} max {}",
        all.len(),
        restocked.load(Ordering::SeqCst),
        recovery_ms[recovery_ms.len() / 2],
        recovery_ms.last().unwrap()
    );
}
