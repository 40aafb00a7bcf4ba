//! `/metrics` is valid Prometheus text that Prometheus's own linter accepts, and its
//! numbers match the traffic sent (one test only: the metrics recorder is global to a
//! test process); the alert rules and dashboard in `ops/` load and name only
//! metrics kami exports.

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

/// Every family in `/metrics` has a `# HELP` line and the type `telemetry::METRICS`
/// gives it (a metric added without a description fails here).
fn every_family_is_described(text: &str) {
    let described: BTreeMap<&str, &str> = kami::telemetry::METRICS
        .iter()
        .map(|(name, kind, _)| {
            let kind = match kind {
                kami::telemetry::Kind::Counter => "counter",
                kami::telemetry::Kind::Gauge => "gauge",
                kami::telemetry::Kind::Histogram => "histogram",
            };
            (*name, kind)
        })
        .collect();
    let helped: Vec<&str> =
        text.lines().filter_map(|l| l.strip_prefix("# HELP ")).filter_map(|l| l.split(' ').next()).collect();
    let mut families = 0;
    for line in text.lines() {
        let Some((name, kind)) = line.strip_prefix("# TYPE ").and_then(|l| l.split_once(' ')) else { continue };
        families += 1;
        assert_eq!(described.get(name), Some(&kind), "{name} ({kind}) is not in telemetry::METRICS as a {kind}");
        assert!(helped.contains(&name), "{name} has no HELP line");
    }
    assert!(families >= 15, "only {families} metric families exported");
}

/// `promtool` (Debian's `prometheus` package; scripts/test.sh installs it), if here.
fn promtool() -> Option<&'static str> {
    const PROMTOOL: &str = "/usr/bin/promtool";
    if std::path::Path::new(PROMTOOL).exists() {
        return Some(PROMTOOL);
    }
    assert!(std::env::var_os("CI").is_none(), "promtool is missing in CI (scripts/test.sh installs it)");
    eprintln!("SKIPPED: {PROMTOOL} not installed (apt-get install prometheus)");
    None
}

/// Metric families named in `text`: every `kami_...` word, less histogram suffixes.
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("kami_") {
        let start = i + at;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_lowercase() || bytes[end] == b'_') {
            end += 1;
        }
        let word = &text[start..end];
        let family = ["_bucket", "_sum", "_count"].iter().find_map(|s| word.strip_suffix(s)).unwrap_or(word);
        names.insert(family.to_string());
        i = end;
    }
    names
}

/// The alert rules and the Grafana dashboard in `ops/` are what an operator plugs
/// in: they must load (`promtool check rules`; the dashboard parses, every panel
/// has a query) and name only metrics kami exports.
#[test]
fn alert_rules_and_dashboard_load_and_name_only_exported_metrics() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("ops");
    let rules_path = root.join("prometheus/kami-alerts.yml");
    let rules = std::fs::read_to_string(&rules_path).unwrap();
    let dashboard_text = std::fs::read_to_string(root.join("grafana/kami-flash-sale.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&dashboard_text).expect("the dashboard is JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 6);
    for panel in panels {
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty() && targets.iter().all(|t| t["expr"].as_str().is_some_and(|e| e.contains("kami_"))));
    }
    let exported: std::collections::BTreeSet<&str> = kami::telemetry::METRICS.iter().map(|m| m.0).collect();
    for (what, text) in [("alert rules", &rules), ("dashboard", &dashboard_text)] {
        let named = metric_names(text);
        assert!(named.len() >= 5, "{what} name only {named:?}");
        for name in named {
            assert!(exported.contains(name.as_str()), "the {what} name {name}, which kami does not export");
        }
    }
    if let Some(promtool) = promtool() {
        let out = std::process::Command::new(promtool).args(["check", "rules"]).arg(&rules_path).output().unwrap();
        assert!(
            out.status.success(),
            "promtool check rules: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
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
    every_family_is_described(&text);
    if let Some(promtool) = promtool() {
        // Prometheus's own linter: HELP texts, counter suffixes, unit names.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.txt");
        std::fs::write(&path, &text).unwrap();
        let out = std::process::Command::new(promtool)
            .args(["check", "metrics"])
            .stdin(std::fs::File::open(&path).unwrap())
            .output()
            .expect("run promtool");
        let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success() && said.trim().is_empty(), "promtool check metrics: {said}");
    }
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
