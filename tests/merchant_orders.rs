//! The merchant's orders: listed page by page across every shard and product with
//! filters, and exported whole as CSV or NDJSON, streamed; and a product's keys,
//! listed by state and withdrawn from stock.

mod common;

use std::collections::{HashMap, HashSet};

use common::*;
use serde_json::{json, Value};

impl Api {
    async fn orders_page(&self, query: &str) -> Reply {
        reply(self.admin(self.http.get(format!("{}/api/v1/admin/orders{query}", self.url)))).await
    }

    /// Every order id the listing gives for `filters`, walking pages of `limit`.
    async fn walk_orders(&self, filters: &str, limit: usize) -> Vec<Value> {
        let (mut out, mut cursor) = (Vec::new(), None::<String>);
        loop {
            let mut q = format!("?limit={limit}{filters}");
            if let Some(c) = &cursor {
                q.push_str(&format!("&cursor={c}"));
            }
            let r = self.orders_page(&q).await;
            assert_eq!(r.status, 200, "{q}: {}", r.body);
            let page = r.body["orders"].as_array().unwrap();
            assert!(page.len() <= limit);
            out.extend(page.iter().cloned());
            match r.body["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_string()),
                None => return out,
            }
        }
    }
}

fn ids(orders: &[Value]) -> Vec<String> {
    orders.iter().map(|o| o["order_id"].as_str().unwrap().to_string()).collect()
}

/// RFC 4180 records (quoted cells with doubled quotes, CRLF line ends).
fn csv_records(text: &str) -> Vec<Vec<String>> {
    let (mut records, mut record, mut cell) = (Vec::new(), Vec::new(), String::new());
    let (mut quoted, mut chars) = (false, text.chars().peekable());
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                cell.push('"');
                chars.next();
            }
            (true, '"') => quoted = false,
            (true, c) => cell.push(c),
            (false, '"') => quoted = true,
            (false, ',') => record.push(std::mem::take(&mut cell)),
            (false, '\r') => {}
            (false, '\n') => {
                record.push(std::mem::take(&mut cell));
                records.push(std::mem::take(&mut record));
            }
            (false, c) => cell.push(c),
        }
    }
    assert!(!quoted && cell.is_empty() && record.is_empty(), "the CSV ends with a whole record");
    records
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listing_pages_across_shards_and_products_without_missing_or_repeating_an_order() {
    let t = TestApp::spawn().await;
    let api = t.api();
    for (id, shards) in [("a", 3u16), ("b", 2)] {
        assert_eq!(api.create_product(id, 100, 0, shards).await.status, 201);
        let keys: Vec<String> = (0..400).map(|i| format!("{id}-K{i}")).collect();
        assert_eq!(api.import(id, &keys).await.status, 200);
    }
    let mut before = Vec::new();
    for i in 0..120 {
        let product = if i % 3 == 0 { "b" } else { "a" };
        let r = api.order(product, 1, &format!("buyer-{}", i % 10), None).await;
        assert_eq!(r.status, 201);
        before.push(r);
    }
    // Pay every fourth: they are delivered.
    let mut paid = HashSet::new();
    for o in before.iter().step_by(4) {
        let id = o.body["order_id"].as_str().unwrap();
        assert_eq!(api.notify(id, &format!("pay-{id}"), 100).await.status, 200);
        paid.insert(id.to_string());
    }

    // Walk the listing while more orders pour in: every order made before the walk
    // is listed exactly once, in product, shard, sequence order.
    let api2 = t.api();
    let more = tokio::spawn(async move {
        for i in 0..80 {
            assert_eq!(api2.order(if i % 2 == 0 { "a" } else { "b" }, 1, &format!("late-{i}"), None).await.status, 201);
        }
    });
    let listed = api.walk_orders("", 7).await;
    more.await.unwrap();
    let listed_ids = ids(&listed);
    let unique: HashSet<&String> = listed_ids.iter().collect();
    assert_eq!(unique.len(), listed_ids.len(), "no order twice");
    for o in &before {
        assert!(unique.contains(&o.body["order_id"].as_str().unwrap().to_string()), "every earlier order listed");
    }
    let position = |id: &str| {
        let mut p = id.split('.');
        let (product, shard, seq) = (p.next().unwrap(), p.next().unwrap(), p.next().unwrap());
        (product.to_string(), shard.parse::<u16>().unwrap(), seq.parse::<u64>().unwrap())
    };
    let positions: Vec<_> = listed_ids.iter().map(|id| position(id)).collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "in product, shard, sequence order");
    assert!(listed[0].get("keys").is_none(), "keys only when asked");
    assert!(listed[0]["buyer"].is_string());
    let all = api.walk_orders("", 500).await;
    assert_eq!(all.len(), 200, "the 80 made during the walk are there afterwards");

    // Filters: status, buyer, product, time range; keys when asked.
    let delivered = api.walk_orders("&status=delivered&include_keys=true", 5).await;
    assert_eq!(ids(&delivered).into_iter().collect::<HashSet<_>>(), paid);
    assert!(delivered.iter().all(|o| o["keys"].as_array().unwrap().len() == 1));
    let buyer3 = api.walk_orders("&buyer=buyer-3", 5).await;
    assert_eq!(buyer3.len(), 12);
    assert!(buyer3.iter().all(|o| o["buyer"] == "buyer-3"));
    let only_b = api.walk_orders("&product=b&status=pending_payment", 50).await;
    assert!(only_b.iter().all(|o| o["product_id"] == "b" && o["status"] == "pending_payment"));
    assert_eq!(only_b.len(), 40 + 40 - before.iter().step_by(4).filter(|o| o.body["product_id"] == "b").count());
    let cut = &all[100]["created_at"];
    let from = api.walk_orders(&format!("&from={}", cut.as_str().unwrap().replace('+', "%2B")), 50).await;
    assert!(from.iter().all(|o| o["created_at"].as_str() >= cut.as_str()));
    assert!(!from.is_empty());

    // Bad queries.
    for (q, status, code) in [
        ("?status=lost", 422, "invalid_request"),
        ("?from=yesterday", 422, "invalid_request"),
        ("?from=2026-01-02T00:00:00Z&to=2026-01-01T00:00:00Z", 422, "invalid_request"),
        ("?limit=501", 422, "invalid_request"),
        ("?limit=0", 422, "invalid_request"),
        ("?product=nope", 404, "product_not_found"),
        ("?cursor=abc", 400, "invalid_cursor"),
        ("?format=csv", 422, "invalid_request"),
        ("?colour=red", 422, "invalid_request"),
    ] {
        let r = api.orders_page(q).await;
        assert_eq!((r.status, r.code()), (status, code), "{q}: {}", r.body);
    }
    let r = reply(api.http.get(format!("{}/api/v1/admin/orders", api.url))).await;
    assert_eq!(r.status, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_streams_every_order_with_cells_escaped_and_keys_only_when_asked() {
    let t = TestApp::spawn().await;
    let api = t.api();
    let n: u64 = 100_000;
    assert_eq!(api.create_product("big", 100, 0, 2).await.status, 201);
    let core = t.core().clone();
    for chunk in (0..n).collect::<Vec<_>>().chunks(10_000) {
        core.import_keys("big", chunk.iter().map(|i| format!("K{i}")).collect()).await.unwrap();
    }
    // A buyer and a key a spreadsheet would take for formulas, with commas and quotes.
    api.product_with_keys("odd", 0, 0).await;
    assert_eq!(api.import("odd", &["=cmd|' /C calc'!A0,\"x\"".to_string()]).await.status, 200);
    let odd = api.order("odd", 1, "=HYPERLINK(\"http://evil\"),b", None).await;
    assert_eq!(odd.status, 201, "{}", odd.body);
    let odd_id = odd.body["order_id"].as_str().unwrap().to_string();
    assert_eq!(api.notify(&odd_id, "pay-odd", 990).await.status, 200);

    let workers: Vec<_> = (0..64u64)
        .map(|w| {
            let core = core.clone();
            tokio::spawn(async move {
                let mut i = w;
                while i < n {
                    let req = kami::core::OrderRequest {
                        product_id: "big".into(),
                        quantity: 1,
                        buyer: format!("buyer{i}"),
                        query_password: None,
                        coupon: None,
                        reseller: None,
                    };
                    core.create_order(req, None).await.unwrap();
                    i += 64;
                }
            })
        })
        .collect();
    for w in workers {
        w.await.unwrap();
    }

    // Read the export as it streams, a chunk at a time.
    let mut r =
        api.admin(api.http.get(format!("{}/api/v1/admin/orders/export?product=big", api.url))).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/csv; charset=utf-8");
    let (mut lines, mut rest, mut seen) = (0u64, Vec::new(), HashSet::new());
    while let Some(chunk) = r.chunk().await.expect("the export ends cleanly") {
        rest.extend_from_slice(&chunk);
        while let Some(end) = rest.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = rest.drain(..=end).collect();
            let line = String::from_utf8(line).unwrap();
            if lines > 0 {
                let id = line.split(',').next().unwrap().to_string();
                assert!(seen.insert(id), "an order exported twice");
            } else {
                assert!(line.starts_with("order_id,product_id,status,buyer,"), "{line}");
            }
            lines += 1;
        }
    }
    assert!(rest.is_empty());
    assert_eq!(lines, n + 1, "a header and every order");

    // The odd order, with its key: every cell survives, none reads as a formula.
    let csv = api.admin(api.http.get(format!("{}/api/v1/admin/orders/export?product=odd&include_keys=true", api.url)));
    let text = csv.send().await.unwrap().text().await.unwrap();
    let records = csv_records(&text);
    assert_eq!(records.len(), 2);
    let row: HashMap<&str, &str> =
        records[0].iter().map(String::as_str).zip(records[1].iter().map(String::as_str)).collect();
    assert_eq!(row["order_id"], odd_id);
    assert_eq!(row["buyer"], "'=HYPERLINK(\"http://evil\"),b");
    assert_eq!(row["keys"], "'=cmd|' /C calc'!A0,\"x\"");
    assert_eq!(row["status"], "delivered");
    assert!(row["created_at"].ends_with('Z'));
    let plain = api.admin(api.http.get(format!("{}/api/v1/admin/orders/export?product=odd", api.url)));
    let text = plain.send().await.unwrap().text().await.unwrap();
    assert!(!text.contains("calc"), "no key without include_keys: {text}");

    // NDJSON: one JSON object per line.
    let nd = api.admin(api.http.get(format!("{}/api/v1/admin/orders/export?product=odd&format=ndjson", api.url)));
    let text = nd.send().await.unwrap().text().await.unwrap();
    let objects: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(objects.len(), 1);
    assert_eq!(objects[0]["order_id"], json!(odd_id));
    assert!(objects[0].get("keys").is_none());

    for (q, status) in [("?format=xml", 422), ("?cursor=x", 422), ("?product=nope", 404)] {
        let r = reply(api.admin(api.http.get(format!("{}/api/v1/admin/orders/export{q}", api.url)))).await;
        assert_eq!(r.status, status, "{q}: {}", r.body);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_listed_by_state_masked_unless_revealed() {
    let t = TestApp::spawn().await;
    let api = t.api();
    assert_eq!(api.create_product("k", 100, 0, 2).await.status, 201);
    let all: Vec<String> = (0..30).map(|i| format!("KEY-{i:04}")).collect();
    assert_eq!(api.import("k", &all).await.status, 200);
    let mut delivered = HashSet::new();
    for i in 0..5 {
        let o = api.order("k", 1, &format!("b{i}"), None).await;
        assert_eq!(o.status, 201);
        if i < 3 {
            let id = o.body["order_id"].as_str().unwrap();
            assert_eq!(api.notify(id, &format!("pay-{id}"), 100).await.status, 200);
            let read = api.get_order(id, o.body["query_token"].as_str().unwrap()).await;
            delivered.insert(read.body["keys"][0].as_str().unwrap().to_string());
        }
    }
    let get = |q: String| {
        let api = t.api();
        async move { reply(api.admin(api.http.get(format!("{}/api/v1/admin/products/k/keys{q}", api.url)))).await }
    };
    let walk = |state: &'static str, reveal: bool| {
        let get = &get;
        async move {
            let (mut keys, mut cursor) = (Vec::new(), None::<String>);
            loop {
                let mut q = format!("?state={state}&limit=4&reveal={reveal}");
                if let Some(c) = &cursor {
                    q.push_str(&format!("&cursor={c}"));
                }
                let r = get(q).await;
                assert_eq!(r.status, 200, "{}", r.body);
                keys.extend(r.body["keys"].as_array().unwrap().iter().map(|k| k["key"].as_str().unwrap().to_string()));
                match r.body["next_cursor"].as_str() {
                    Some(c) => cursor = Some(c.to_string()),
                    None => return keys,
                }
            }
        }
    };
    let (available, reserved, sold) =
        (walk("available", true).await, walk("reserved", true).await, walk("sold", true).await);
    assert_eq!((available.len(), reserved.len(), sold.len()), (25, 2, 3));
    assert_eq!(sold.iter().cloned().collect::<HashSet<_>>(), delivered, "sold keys are the delivered ones");
    let union: HashSet<String> = available.iter().chain(&reserved).chain(&sold).cloned().collect();
    assert_eq!(union, all.iter().cloned().collect::<HashSet<_>>(), "every key in exactly one state");
    let masked = walk("available", false).await;
    assert_eq!(masked.len(), 25);
    assert!(masked.iter().all(|k| k.starts_with("KE****") && k.len() == 8), "{masked:?}");

    let other = get("?state=sold&limit=1".into()).await;
    let cursor = other.body["next_cursor"].as_str().unwrap();
    for (q, status, code) in [
        ("?state=lost".to_string(), 422, "invalid_request"),
        (format!("?state=available&cursor={cursor}"), 400, "invalid_cursor"),
        ("?limit=0".to_string(), 422, "invalid_request"),
        ("?limit=501".to_string(), 422, "invalid_request"),
    ] {
        let r = get(q.clone()).await;
        assert_eq!((r.status, r.code()), (status, code), "{q}: {}", r.body);
    }
    let r = reply(api.http.get(format!("{}/api/v1/admin/products/k/keys", api.url))).await;
    assert_eq!(r.status, 401);
    let r = reply(api.admin(api.http.get(format!("{}/api/v1/admin/products/nope/keys", api.url)))).await;
    assert_eq!((r.status, r.code()), (404, "product_not_found"));
}

impl Api {
    async fn withdraw(&self, product: &str, body: Value) -> Reply {
        let url = format!("{}/api/v1/admin/products/{product}/keys/withdraw", self.url);
        reply(self.admin(self.http.post(url)).json(&body)).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn withdrawn_keys_leave_stock_under_concurrent_orders_never_sold_and_the_audit_counts_them() {
    let t = TestApp::spawn().await;
    let api = t.api();
    assert_eq!(api.create_product("w", 100, 0, 2).await.status, 201);
    let all: Vec<String> = (0..300).map(|i| format!("WKEY-{i:04}")).collect();
    assert_eq!(api.import("w", &all).await.status, 200);

    // Buyers order (and pay one order in two) while the merchant withdraws.
    let buyers: Vec<_> = (0..8)
        .map(|w| {
            let api = t.api();
            tokio::spawn(async move {
                let mut delivered = Vec::new();
                for i in 0..15 {
                    let o = api.order("w", 1, &format!("w{w}-{i}"), None).await;
                    if o.status != 201 {
                        assert_eq!((o.status, o.code()), (409, "sold_out"), "{}", o.body);
                        continue;
                    }
                    if i % 2 == 0 {
                        let id = o.body["order_id"].as_str().unwrap();
                        assert_eq!(api.notify(id, &format!("pay-{id}"), 100).await.status, 200);
                        let read = api.get_order(id, o.body["query_token"].as_str().unwrap()).await;
                        delivered.push(read.body["keys"][0].as_str().unwrap().to_string());
                    }
                }
                delivered
            })
        })
        .collect();
    let named: Vec<String> = all[..60].to_vec();
    let by_name =
        api.withdraw("w", json!({ "keys": named.iter().chain([&"NOT-A-KEY".to_string()]).collect::<Vec<_>>() })).await;
    assert_eq!(by_name.status, 200, "{}", by_name.body);
    let by_count = api.withdraw("w", json!({"count": 100})).await;
    assert_eq!(by_count.status, 200, "{}", by_count.body);
    let mut delivered = HashSet::new();
    for b in buyers {
        delivered.extend(b.await.unwrap());
    }

    // The named keys: each either withdrawn or already with an order, never both.
    let n_named = by_name.body["withdrawn"].as_u64().unwrap();
    let not_in_stock: Vec<String> = serde_json::from_value(by_name.body["not_in_stock"].clone()).unwrap();
    assert_eq!(by_name.body["unknown"], json!(["NOT-A-KEY"]));
    assert_eq!(n_named + not_in_stock.len() as u64, 60, "{}", by_name.body);
    assert_eq!(by_count.body["withdrawn"], json!(100), "100 keys were still in stock");
    let withdrawn: HashSet<String> = {
        let r = reply(api.admin(
            api.http.get(format!("{}/api/v1/admin/products/w/keys?state=withdrawn&limit=500&reveal=true", api.url)),
        ))
        .await;
        assert_eq!(r.status, 200, "{}", r.body);
        r.body["keys"].as_array().unwrap().iter().map(|k| k["key"].as_str().unwrap().to_string()).collect()
    };
    assert_eq!(withdrawn.len() as u64, n_named + 100);
    assert!(withdrawn.is_disjoint(&delivered), "a withdrawn key was sold");
    for key in &not_in_stock {
        assert!(!withdrawn.contains(key));
    }
    let audit = api.audit().await;
    assert_audit_ok(&audit);
    let p = &audit.body["products"][0];
    assert_eq!(p["withdrawn"], json!(n_named + 100));
    let sum = ["available", "reserved", "sold", "withdrawn", "in_transit"]
        .iter()
        .map(|f| p[f].as_u64().unwrap())
        .sum::<u64>();
    assert_eq!(p["imported"].as_u64().unwrap(), sum, "imported = available + reserved + sold + withdrawn + in transit");
    let stock = reply(api.admin(api.http.get(format!("{}/api/v1/admin/products/w", api.url)))).await;
    assert_eq!(stock.body["stock"]["withdrawn"], json!(n_named + 100), "{}", stock.body);

    // Bad requests, then durability: a crash right after keeps every withdrawal.
    for body in [
        json!({}),
        json!({"count": 0}),
        json!({"count": 1, "keys": []}),
        json!({"keys": ["   "]}),
        json!({"keys": ["a\u{7}b"]}),
    ] {
        let r = api.withdraw("w", body.clone()).await;
        assert_eq!((r.status, r.code()), (422, "invalid_request"), "{body}: {}", r.body);
    }
    let r =
        reply(api.http.post(format!("{}/api/v1/admin/products/w/keys/withdraw", api.url)).json(&json!({"count": 1})))
            .await;
    assert_eq!(r.status, 401);
    assert_eq!(api.withdraw("nope", json!({"count": 1})).await.code(), "product_not_found");
    let last = api.withdraw("w", json!({"count": 1})).await;
    let expected = n_named + 100 + last.body["withdrawn"].as_u64().unwrap();
    let data = t.data.clone();
    let mut t = t;
    t.app.take().unwrap().crash().await;
    let t2 = TestApp::start_on(&data, &[]).await;
    let audit = t2.api().audit().await;
    assert_audit_ok(&audit);
    assert_eq!(audit.body["products"][0]["withdrawn"], json!(expected));
}
