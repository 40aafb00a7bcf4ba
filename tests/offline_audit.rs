//! `kami audit --data DIR`: the offline check of a stopped server's directory.

mod common;

use common::*;
use kami::domain::{Event, ShardId};
use kami::storage::codec::{decode, Kind};
use serde_json::{json, Value};

/// A stopped server's directory with two products, sales and pending orders.
async fn stopped_shop() -> (tempfile::TempDir, std::path::PathBuf, Value) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut t = TestApp::start_on(&data, &[]).await;
    let api = t.api();
    assert_eq!(api.create_product("p", 990, 0, 2).await.status, 201);
    let keys: Vec<String> = (0..30).map(|i| format!("P-{i}")).collect();
    api.import("p", &keys).await;
    api.product_with_keys("q", 5, 0).await;
    for i in 0..7 {
        assert_eq!(api.buy("p", &format!("b{i}")).await.body["status"], "delivered");
    }
    api.order("p", 2, "pending", None).await;
    api.buy("q", "x").await;
    let online = api.audit().await.body;
    t.app.take().unwrap().crash().await;
    (dir, data, online)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_audit_agrees_with_the_online_one_and_changes_nothing() {
    let (_dir, data, online) = stopped_shop().await;
    let (code, out, err) = kami_audit(&data, false);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("product p: 2 shard(s); imported 30 = available 21 + reserved 2 + sold 7"), "{out}");
    assert!(out.contains("ok: no oversell, no key sold twice, stock adds up"), "{out}");

    let (code, out, _) = kami_audit(&data, true);
    assert_eq!(code, 0);
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["ok"], json!(true));
    for (offline, online) in report["products"].as_array().unwrap().iter().zip(online["products"].as_array().unwrap()) {
        for f in ["id", "imported", "available", "reserved", "sold"] {
            assert_eq!(offline[f], online[f], "{f}");
        }
    }
    assert_eq!(report["orders"], online["orders"]);
    assert_eq!(report["orders"]["delivered"], json!(8));

    // The directory still starts and serves the same state.
    let t = TestApp::start_on(&data, &[]).await;
    assert_eq!(t.api().audit().await.body, online);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_audit_refuses_a_directory_in_use_or_not_a_data_dir() {
    let t = TestApp::spawn().await;
    let asked = std::time::Instant::now();
    let (code, _, err) = kami_audit(&t.data, false);
    assert_eq!(code, 2);
    assert!(err.contains("is a server running on it?"), "{err}");
    // Another process's lock is refused at once: the wait for a lock (10 s) is only
    // for a directory the same process opened before.
    assert!(asked.elapsed() < std::time::Duration::from_secs(10), "refused after {:?}", asked.elapsed());
    let empty = tempfile::tempdir().unwrap();
    let (code, _, err) = kami_audit(empty.path(), false);
    assert_eq!(code, 2);
    assert!(err.contains("not a kami data directory"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_audit_reports_a_torn_tail_as_repairable_without_repairing_it() {
    let (_dir, data, _) = stopped_shop().await;
    {
        let storage = open_storage(&data);
        let journal = storage.journal(&ShardId::new("q", 0)).unwrap();
        let last = (1..).take_while(|s| journal.raw(*s).unwrap().is_some()).last().unwrap();
        let bytes = journal.raw(last).unwrap().unwrap();
        journal.put_raw(last, &bytes[..bytes.len() - 5]).unwrap();
        storage.flush_now().unwrap();
    }
    for _ in 0..2 {
        let (code, out, err) = kami_audit(&data, false);
        assert_eq!(code, 0, "{out}{err}");
        assert!(out.contains("finding (repaired at next start): q#0: journal record"), "{out}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_audit_fails_on_violations() {
    let (_dir, data, _) = stopped_shop().await;
    {
        let storage = open_storage(&data);
        // 1. A well-formed record that replays a payment already applied.
        let journal = storage.journal(&ShardId::new("q", 0)).unwrap();
        let mut seq = 1;
        let mut payment = None;
        while let Some(raw) = journal.raw(seq).unwrap() {
            let e: Event = decode(Kind::Event, &raw).unwrap();
            if matches!(e, Event::PaymentApplied { .. }) {
                payment = Some(e);
            }
            seq += 1;
        }
        journal.append(seq, &payment.unwrap()).unwrap();
        // 2. A key of shard 0 of `p` imported again into shard 1.
        let s0 = storage.inspect(&ShardId::new("p", 0), &storage.load_products().unwrap()[0]).unwrap();
        let key = s0.shard.key_strings().next().unwrap().to_string();
        let j1 = storage.journal(&ShardId::new("p", 1)).unwrap();
        let next = (1..).find(|s| j1.raw(*s).unwrap().is_none()).unwrap();
        j1.append(next, &Event::KeysImported { keys: vec![key.clone()] }).unwrap();
        // 3. A journal of a product that does not exist.
        storage.journal(&ShardId::new("ghost", 0)).unwrap().append(1, &Event::KeysImported { keys: vec![] }).unwrap();
        storage.flush_now().unwrap();
    }
    let (code, out, err) = kami_audit(&data, false);
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("VIOLATION: q#0: corrupt record in journal/q#0 record"), "{out}");
    assert!(out.contains("is in shards 0 and 1"), "{out}");
    assert!(out.contains("VIOLATION: journal ghost#0 belongs to no product"), "{out}");
    assert!(out.contains("FAILED: 3 violation(s)"), "{out}");
}
