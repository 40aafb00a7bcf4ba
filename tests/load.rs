//! `kami load` end to end on an embedded kami: the verdict is checked against the
//! audit, answers are counted by code, and sold-out buyers are told so.

use kami::load::{run, LoadConfig, Mode, Target};

fn config(mode: Mode, keys: u64, buyers: u64) -> LoadConfig {
    LoadConfig {
        target: Target::Embedded { arbiters: 2, profile: None, file: None },
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

/// Against a server whose per-IP limits are on, buyers refused 429 are refusals,
/// not losses: the verdict holds (every paid order is sold, some unread) and the
/// report says what refused them and what to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limited_buyers_are_counted_as_refused_not_lost() {
    let dir = tempfile::tempdir().unwrap();
    let (admin, secret) = ("load-test-admin-token", "load-test-channel-secret");
    let overrides = [
        ("server.listen", "127.0.0.1:0".to_string()),
        ("storage.path", dir.path().join("data").display().to_string()),
        ("admin.token", admin.into()),
        ("payments.channels.sandbox.secret", secret.into()),
        ("rate_limits.per_ip_per_sec", "50".into()),
        ("rate_limits.per_ip_burst", "50".into()),
    ];
    let settings = kami::Settings::load(&kami::Sources {
        overrides: overrides.iter().map(|(k, v)| (k.to_string(), v.clone())).collect(),
        ..Default::default()
    })
    .unwrap();
    let app = kami::start(settings).await.unwrap();
    let mut c = config(Mode::Full, 300, 300);
    c.target = Target::Url {
        url: app.url(),
        admin_token: admin.into(),
        channel: "sandbox".into(),
        secret: secret.into(),
        api_key: None,
    };
    let report = run(c).await.unwrap();
    let table = report.table();
    assert!(report.verdict.ok, "{table}");
    assert!(report.verdict.rate_limited > 0, "{table}");
    assert_eq!(
        report.verdict.rate_limited,
        report.answers.iter().filter(|(k, _)| k.starts_with("429")).map(|(_, n)| n).sum::<u64>()
    );
    assert!(table.contains("rate limited:") && table.contains("--api-key"), "{table}");
    // The load's product does not stay in the shop: every order of it settled, so it is deleted.
    let left = report.product_left.as_deref().unwrap_or_default();
    assert!(left.ends_with("deleted from the shop"), "{table}");
    let read = reqwest::Client::new()
        .get(format!("{}/api/v1/admin/products/{}", app.url(), report.product))
        .bearer_auth(admin)
        .send()
        .await
        .unwrap();
    let read: serde_json::Value = read.json().await.unwrap();
    assert_eq!(read["shelf"], "deleted", "{read}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_run_fills_groups_of_ten_and_sells_them_whole() {
    // 205 buyers, 200 keys: 20 groups fill and are delivered; 5 buyers find no key.
    let report = run(config(Mode::Group, 200, 205)).await.unwrap();
    assert!(report.verdict.ok, "{}", report.table());
    assert_eq!((report.verdict.acknowledged, report.verdict.audit_taken), (200, 200), "{}", report.table());
    assert_eq!(report.answers.get("201"), Some(&200));
    assert_eq!(report.answers.get("409 sold_out"), Some(&5));
    let steps: Vec<(&str, u64)> = report.steps.iter().map(|s| (s.step, s.count)).collect();
    assert_eq!(steps, [("create order", 200), ("notify", 200)]);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chart_draws_throughput_and_latency_for_every_100_ms_of_the_run() {
    let report = run(config(Mode::OrderOnly, 300, 300)).await.unwrap();
    assert!(report.verdict.ok, "{}", report.table());
    assert_eq!(report.bucket_ms, 100);
    // One bucket per 100 ms of the run, up to the last completion.
    let buckets = report.timeline.len() as u64;
    assert!((report.elapsed_ms / 100).saturating_sub(1) <= buckets && buckets <= report.elapsed_ms / 100 + 1);
    assert_eq!(report.timeline.iter().sum::<u64>(), 300, "every buyer on the timeline");
    assert_eq!(report.create_latency_by_bucket.len(), report.timeline.len());
    let done = |b: usize| report.timeline.get(b).copied().unwrap_or(0) > 0;
    for (bucket, lat) in report.create_latency_by_bucket.iter().enumerate() {
        // An order's latency is taken as it is answered, its completion counted just
        // after: the two may fall on either side of a bucket's edge.
        if lat[1] > 0.0 {
            assert!(done(bucket) || done(bucket + 1), "bucket {bucket}: a latency but no order done");
        }
        assert!(lat[0] <= lat[1], "p50 <= p99 in bucket {bucket}");
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run.svg");
    kami::load::chart::write_svg(&report, &path).unwrap();
    let svg = std::fs::read_to_string(&path).unwrap();
    assert!(svg.starts_with("<svg") || svg.contains("<svg "), "not SVG: {}", &svg[..svg.len().min(200)]);
    // Three series (throughput, p50, p99), each a polyline, and their legends.
    assert!(svg.matches("<polyline").count() >= 3, "{svg}");
    for label in ["buyers done per second", "create order p50", "create order p99"] {
        assert!(svg.contains(label), "legend {label:?} missing");
    }
}
