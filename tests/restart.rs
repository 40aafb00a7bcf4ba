//! Acknowledged means durable (I4): the real binary is killed with SIGKILL in the
//! middle of traffic and restarted on the same directory; every 2xx the clients got
//! must be reflected in the recovered state.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use common::*;
use serde_json::json;

#[derive(Debug, Clone, Default)]
struct Acked {
    token: String,
    /// Keys seen by the buyer after an acknowledged payment.
    keys: Option<Vec<String>>,
    paid: bool,
}

type Ledger = Arc<Mutex<HashMap<String, Acked>>>;

/// Buyers order and pay until the server goes away; every 2xx goes in the ledger.
async fn traffic(api: Api, ledger: Ledger, worker: usize, orders_acked: Arc<AtomicUsize>) {
    for i in 0.. {
        let buyer = format!("w{worker}-b{i}");
        let Ok(resp) = api
            .http
            .post(format!("{}/api/v1/orders", api.url))
            .json(&json!({"product_id": "p", "quantity": 1, "buyer": buyer}))
            .send()
            .await
        else {
            return;
        };
        if resp.status() != 201 {
            continue;
        }
        let Ok(body) = resp.json::<serde_json::Value>().await else { return };
        let id = body["order_id"].as_str().unwrap().to_string();
        let token = body["query_token"].as_str().unwrap().to_string();
        ledger.lock().unwrap().insert(id.clone(), Acked { token: token.clone(), ..Acked::default() });
        orders_acked.fetch_add(1, Ordering::SeqCst);
        if i % 3 == 0 {
            continue; // leave some orders pending
        }
        let payload = json!({"order_id": id, "payment_id": format!("pay-{id}"), "amount_cents": 990, "status": "paid", "timestamp": now_secs(), "nonce": format!("{worker}-{i}-{}", rand::random::<u64>())});
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

async fn verify(api: &Api, ledger: &HashMap<String, Acked>) {
    assert_audit_ok(&api.audit().await);
    let mut seen_keys = HashSet::new();
    for (id, acked) in ledger {
        let o = api.get_order(id, &acked.token).await;
        assert_eq!(o.status, 200, "acknowledged order {id} lost: {}", o.body);
        let status = o.body["status"].as_str().unwrap();
        if acked.paid {
            assert_eq!(status, "delivered", "acknowledged payment of {id} lost");
            let keys: Vec<String> = serde_json::from_value(o.body["keys"].clone()).unwrap();
            if let Some(seen) = &acked.keys {
                assert_eq!(&keys, seen, "order {id} now shows different keys");
            }
            for k in keys {
                assert!(seen_keys.insert(k.clone()), "key {k} delivered twice");
            }
        } else {
            assert!(["pending_payment", "delivered"].contains(&status), "order {id} is {status}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_traffic_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // Small snapshot threshold: recovery goes through snapshots and journal tails.
    let env = [("KAMI_STORAGE__SNAPSHOT_MIN_JOURNAL_BYTES", "16384")];
    let mut server = Server::start(&data, &env);
    let api = server.api();
    assert_eq!(api.create_product("p", 990, 0, 1).await.status, 201);
    let keys: Vec<String> = (0..5000).map(|i| format!("key-{i}")).collect();
    assert_eq!(api.import("p", &keys).await.body["imported"], json!(5000));

    let ledger: Ledger = Arc::default();
    for cycle in 0..3 {
        let acked = Arc::new(AtomicUsize::new(0));
        let workers: Vec<_> = (0..16)
            .map(|w| tokio::spawn(traffic(server.api(), ledger.clone(), w + cycle * 100, acked.clone())))
            .collect();
        // Kill once this cycle has had real traffic, while workers are mid-request.
        let target = 150;
        let api_now = server.api();
        assert!(
            api_now
                .eventually(std::time::Duration::from_secs(60), || async { acked.load(Ordering::SeqCst) >= target })
                .await,
            "traffic stalled"
        );
        server.kill9();
        for w in workers {
            w.await.unwrap();
        }
        server = Server::start(&data, &env);
        let snapshot = ledger.lock().unwrap().clone();
        assert!(snapshot.values().filter(|a| a.paid).count() > 0);
        verify(&server.api(), &snapshot).await;
    }
    let final_audit = server.api().audit().await;
    assert_eq!(final_audit.body["products"][0]["imported"], json!(5000));
}
