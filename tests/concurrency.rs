//! Many buyers, few keys: no oversell, no key sold twice, conservation holds.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use common::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_buyers_on_five_hundred_keys() {
    const BUYERS: usize = 2000;
    const KEYS: usize = 500;
    let t = TestApp::spawn().await;
    let api = t.api();
    let imported: HashSet<String> = api.product_with_keys("hot", KEYS, 0).await.into_iter().collect();

    // All buyers start together once every task is ready.
    let start = Arc::new(tokio::sync::Barrier::new(BUYERS));
    let tasks: Vec<_> = (0..BUYERS)
        .map(|i| {
            let (api, start) = (api.clone(), start.clone());
            tokio::spawn(async move {
                start.wait().await;
                let buyer = format!("buyer{i}@example.com");
                let o = api.order("hot", 1, &buyer, None).await;
                if o.status != 201 {
                    return (o.status, o.code().to_string(), None);
                }
                let id = o.body["order_id"].as_str().unwrap().to_string();
                let n = api.notify(&id, &format!("pay-{i}"), 990).await;
                assert_eq!(n.status, 200, "{:?}", n.body);
                let got = api.get_order(&id, o.body["query_token"].as_str().unwrap()).await;
                assert_eq!(got.body["status"], "delivered");
                let keys: Vec<String> = serde_json::from_value(got.body["keys"].clone()).unwrap();
                (201, String::new(), Some(keys))
            })
        })
        .collect();

    let mut answers: BTreeMap<(u16, String), usize> = BTreeMap::new();
    let mut delivered: Vec<String> = Vec::new();
    for task in tasks {
        let (status, code, keys) = task.await.expect("buyer task");
        *answers.entry((status, code)).or_default() += 1;
        delivered.extend(keys.unwrap_or_default());
    }
    assert_eq!(answers.get(&(201, String::new())), Some(&KEYS), "answers: {answers:?}");
    assert_eq!(answers.get(&(409, "sold_out".to_string())), Some(&(BUYERS - KEYS)), "answers: {answers:?}");
    assert_eq!(delivered.len(), KEYS);
    let distinct: HashSet<&String> = delivered.iter().collect();
    assert_eq!(distinct.len(), KEYS, "a key was delivered twice");
    assert!(distinct.iter().all(|k| imported.contains(*k)), "delivered a key that was never imported");

    let audit = api.audit().await;
    assert_audit_ok(&audit);
    assert_eq!(
        audit.body["products"][0],
        json!({"id": "hot", "imported": KEYS, "available": 0, "reserved": 0, "sold": KEYS, "in_transit": 0, "withdrawn": 0,
            "orders_in_memory": KEYS, "orders_archived": 0})
    );
    assert_eq!(audit.body["orders"]["delivered"], json!(KEYS));
}
