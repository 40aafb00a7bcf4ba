//! `kami load` end to end on an embedded kami: the verdict is checked against the
//! audit, answers are counted by code, and sold-out buyers are told so.

use kami::load::{run, LoadConfig, Mode, Target};

fn config(mode: Mode, keys: u64, buyers: u64) -> LoadConfig {
    LoadConfig {
        target: Target::Embedded { arbiters: 2 },
        keys,
        buyers,
        concurrency: 16,
        mode,
        shards: 1,
        progress: false,
        retry_overloaded: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_run_sells_every_key_once_and_tells_the_rest_sold_out() {
    let report = run(config(Mode::Full, 150, 200)).await.unwrap();
    assert!(report.verdict.ok, "{}", report.table());
    assert_eq!(report.verdict.audit_taken, 150);
    assert_eq!(report.verdict.distinct_keys_delivered, 150);
    assert_eq!(report.answers.get("201"), Some(&150));
    assert_eq!(report.answers.get("409 sold_out"), Some(&50));
    assert_eq!(report.answers.get("200"), Some(&300), "a notification and a read per purchase");
    let steps: Vec<(&str, u64)> = report.steps.iter().map(|s| (s.step, s.count)).collect();
    assert_eq!(steps, [("create order", 150), ("notify", 150), ("read order", 150)]);
    assert_eq!(report.timeline.iter().sum::<u64>(), 200, "every buyer on the timeline");
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["verdict"]["ok"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_only_run_reserves_and_never_oversells() {
    let mut c = config(Mode::OrderOnly, 100, 120);
    c.shards = 2;
    let report = run(c).await.unwrap();
    assert!(report.verdict.ok, "{}", report.table());
    assert_eq!(report.verdict.acknowledged, report.verdict.audit_taken);
    assert!(report.verdict.audit_taken <= 100);
    assert_eq!(report.steps.len(), 1);
    assert_eq!(report.answers.values().sum::<u64>(), 120);
}
