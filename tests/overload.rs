//! Bounded mailboxes (I7): when a stock actor's admission is full, the request is
//! answered 503 `overloaded` with `Retry-After`, and nothing is half-done.

mod common;

use std::sync::Arc;

use common::*;
use serde_json::json;

/// `n` orders of product `p` sent at the same moment (a barrier), by buyers
/// `{prefix}{i}`; their answers in order.
async fn simultaneous_orders(api: &Api, n: usize, prefix: &str) -> Vec<Reply> {
    let start = Arc::new(tokio::sync::Barrier::new(n));
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let (api, start, buyer) = (api.clone(), start.clone(), format!("{prefix}{i}"));
            tokio::spawn(async move {
                start.wait().await;
                api.order("p", 1, &buyer, None).await
            })
        })
        .collect();
    let mut replies = Vec::with_capacity(n);
    for task in tasks {
        replies.push(task.await.unwrap());
    }
    replies
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_mailbox_is_answered_overloaded_with_retry_after() {
    // One request admitted per actor at a time, and each reply held >= 100 ms by the
    // commit linger: 50 simultaneous orders cannot all be admitted.
    let t = TestApp::spawn_with(&[("actors.mailbox_capacity", "1"), ("storage.commit_linger_us", "100000")]).await;
    let api = t.api();
    api.product_with_keys("p", 100, 0).await;
    let (mut created, mut overloaded) = (0, 0);
    for r in simultaneous_orders(&api, 50, "buyer").await {
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

/// The time bound: once the actor's drain rate is known, a line longer than
/// `max_queue_wait_ms` refuses new orders with the estimate a storefront shows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_line_answers_with_its_depth_drain_rate_and_estimated_wait() {
    // Every flush lingers 100 ms, so each admitted order stays in line that long;
    // past the floor of 256 always admitted, any line exceeds a 1 ms wait.
    let t = TestApp::spawn_with(&[
        ("actors.mailbox_capacity", "10000"),
        ("actors.max_queue_wait_ms", "1"),
        ("storage.commit_linger_us", "100000"),
    ])
    .await;
    let api = t.api();
    api.product_with_keys("p", 12_000, 0).await;
    let (mut created, mut refusals) = (0u64, vec![]);
    // Waves of 512 simultaneous orders; the first teaches the line its drain rate.
    for wave in 0..20 {
        for r in simultaneous_orders(&api, 512, &format!("w{wave}b")).await {
            match r.status {
                201 => created += 1,
                503 => refusals.push(r),
                other => panic!("unexpected {other}: {}", r.body),
            }
        }
        if !refusals.is_empty() {
            break;
        }
    }
    assert!(!refusals.is_empty(), "no wave was refused ({created} created)");
    for r in &refusals {
        assert_eq!(r.code(), "overloaded", "{}", r.body);
        let q = &r.body["error"]["queue"];
        let depth = q["depth"].as_u64().expect("queue.depth");
        let drain = q["drain_per_sec"].as_u64().expect("queue.drain_per_sec");
        let wait_ms = q["estimated_wait_ms"].as_u64().expect("queue.estimated_wait_ms");
        assert!(depth >= 256 && drain > 0, "{q}");
        assert_eq!(wait_ms, (depth * 1000).div_ceil(drain), "{q}");
        let retry: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
        assert_eq!(retry, wait_ms.div_ceil(1000).max(1));
    }
    let audit = api.audit().await;
    assert_audit_ok(&audit);
    assert_eq!(audit.body["products"][0]["reserved"], json!(created), "refused orders reserved nothing");
    let metrics = api.metrics().await;
    assert!(metric_value(&metrics, "kami_admission_drain_per_second") > 0.0);
}
