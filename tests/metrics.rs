//! `/metrics` is valid Prometheus text and its numbers match the traffic sent.
//! One test only: the metrics recorder is global to a test process.

mod common;

use std::collections::BTreeMap;

use common::*;

/// One sample line: name, labels, value.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses Prometheus text exposition format 0.0.4, failing on any malformed line.
fn parse(text: &str) -> Vec<Sample> {
    let mut samples = vec![];
    let mut typed = BTreeMap::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or_else(|| panic!("bad TYPE line {line:?}"));
            assert!(["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind), "{line:?}");
            assert!(typed.insert(name.to_string(), kind.to_string()).is_none(), "TYPE twice for {name}");
            continue;
        }
        if line.starts_with("# HELP ") || line.starts_with('#') {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("no value in {line:?}"));
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("bad value in {line:?}")),
        };
        let (name, labels) = match series.split_once('{') {
            None => (series, BTreeMap::new()),
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').unwrap_or_else(|| panic!("unclosed labels in {line:?}"));
                let mut labels = BTreeMap::new();
                for pair in split_labels(body) {
                    let (k, v) = pair.split_once('=').unwrap_or_else(|| panic!("bad label {pair:?} in {line:?}"));
                    let v = v.strip_prefix('"').and_then(|v| v.strip_suffix('"')).expect("quoted label value");
                    labels.insert(k.to_string(), v.to_string());
                }
                (name, labels)
            }
        };
        assert!(
            !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name in {line:?}"
        );
        let family = ["_bucket", "_sum", "_count"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(name);
        assert!(typed.contains_key(name) || typed.contains_key(family), "sample before its TYPE: {line:?}");
        samples.push(Sample { name: name.to_string(), labels, value });
    }
    samples
}

/// Splits `a="x",b="y,z"` at the commas outside quotes.
fn split_labels(body: &str) -> Vec<&str> {
    let (mut parts, mut start, mut quoted, mut escaped) = (vec![], 0, false, false);
    for (i, c) in body.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '"' => quoted = !quoted,
            ',' if !quoted => {
                parts.push(&body[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if start < body.len() {
        parts.push(&body[start..]);
    }
    parts
}

/// The sum over the series of `name` whose labels include `labels`.
fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name && labels.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(v)))
        .map(|s| s.value)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_as_prometheus_text_and_count_the_traffic_sent() {
    let t = TestApp::spawn().await;
    let api = t.api();
    api.product_with_keys("m", 5, 0).await;
    let mut orders = vec![];
    for i in 0..7 {
        orders.push(api.order("m", 1, &format!("b{i}"), None).await);
    }
    let created: Vec<_> = orders.iter().filter(|r| r.status == 201).collect();
    assert_eq!(created.len(), 5);
    assert_eq!(orders.iter().filter(|r| r.code() == "sold_out").count(), 2);
    for (i, o) in created.iter().take(3).enumerate() {
        let amount = o.body["amount_cents"].as_u64().unwrap();
        let r = api.notify(o.body["order_id"].as_str().unwrap(), &format!("pay{i}"), amount).await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let last = created[4];
    let r = api.cancel(last.body["order_id"].as_str().unwrap(), last.body["query_token"].as_str().unwrap()).await;
    assert_eq!(r.status, 200);

    let text = api.metrics().await;
    let m = parse(&text);
    let orders_route = [("method", "POST"), ("route", "/api/v1/orders")];
    let http = |status| value(&m, "kami_http_requests_total", &[orders_route[0], orders_route[1], ("status", status)]);
    assert_eq!(http("201"), 5.0);
    assert_eq!(http("409"), 2.0);
    assert_eq!(value(&m, "kami_http_request_duration_seconds_count", &orders_route), 7.0);
    assert_eq!(value(&m, "kami_http_errors_total", &[("code", "sold_out")]), 2.0);
    assert_eq!(value(&m, "kami_order_events_total", &[("event", "created")]), 5.0);
    assert_eq!(value(&m, "kami_order_events_total", &[("event", "delivered")]), 3.0);
    assert_eq!(value(&m, "kami_order_events_total", &[("event", "cancelled")]), 1.0);
    assert_eq!(value(&m, "kami_payment_conversion_ratio", &[]), 0.6);
    assert_eq!(value(&m, "kami_paid_to_delivered_seconds_count", &[]), 3.0);
    let stock = |name| value(&m, name, &[("product", "m")]);
    assert_eq!(
        (stock("kami_stock_available"), stock("kami_stock_reserved"), stock("kami_stock_sold")),
        (1.0, 1.0, 3.0)
    );
    assert_eq!(stock("kami_admission_queue_depth"), 0.0, "nothing in line once every answer is back");
    // Every acknowledged write went through a group commit; recovery ran once per shard.
    assert!(value(&m, "kami_commit_batch_size_count", &[]) >= 1.0);
    assert!(value(&m, "kami_commit_flush_seconds_count", &[]) >= 1.0);
    assert!(m.iter().any(|s| s.name == "kami_recovery_seconds"), "recovery duration missing");
    // Every message a stock actor handled is one timed turn: at least the 7 orders,
    // 3 notifications and 1 cancel above (imports, ticks and reads add more).
    let turns = value(&m, "kami_actor_turn_seconds_count", &[("actor", "stock")]);
    assert!(turns >= 11.0, "stock actor turns counted: {turns}");
    assert!(m.iter().any(|s| s.name == "kami_payment_channel_state"), "breaker state missing");
    let points_line: Vec<_> = m.iter().filter(|s| s.name == "kami_points_queue_depth").collect();
    assert_eq!(points_line.len(), 1, "the points actors' line is exported");
    assert_eq!(points_line[0].value, 0.0, "and empty when idle");
}
