//! Bounded mailboxes (I7): when a stock actor's admission is full, the request is
//! answered 503 `overloaded` with `Retry-After`, and nothing is half-done.

mod common;

use std::sync::Arc;

use common::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_mailbox_is_answered_overloaded_with_retry_after() {
    // One request admitted per actor at a time, and each reply held >= 100 ms by the
    // commit linger: 50 simultaneous orders cannot all be admitted.
    let t = TestApp::spawn_with(&[("actors.mailbox_capacity", "1"), ("storage.commit_linger_us", "100000")]).await;
    let api = t.api();
    api.product_with_keys("p", 100, 0).await;
    let start = Arc::new(tokio::sync::Barrier::new(50));
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let (api, start) = (api.clone(), start.clone());
            tokio::spawn(async move {
                start.wait().await;
                api.order("p", 1, &format!("buyer{i}"), None).await
            })
        })
        .collect();
    let (mut created, mut overloaded) = (0, 0);
    for task in tasks {
        let r = task.await.unwrap();
        match r.status {
            201 => created += 1,
            503 => {
                assert_eq!(r.code(), "overloaded");
                let retry: u64 = r.headers.get("retry-after").expect("Retry-After").to_str().unwrap().parse().unwrap();
                assert!(retry >= 1);
                overloaded += 1;
            }
            other => panic!("unexpected {other}: {}", r.body),
        }
    }
    assert!(created >= 1 && overloaded >= 1, "created {created}, overloaded {overloaded}");
    assert_eq!(created + overloaded, 50);
    let audit = api.audit().await;
    assert_audit_ok(&audit);
    assert_eq!(audit.body["products"][0]["reserved"], json!(created), "refused requests reserved nothing");
}
