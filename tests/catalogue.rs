//! The catalogue and product changes: buyers list what is on sale page by page,
//! the merchant sees every product with its counters, and `PATCH` changes a
//! product's name, price, per-buyer limit, shelf state and sale window, durably,
//! without touching orders already created.

mod common;

use std::collections::HashSet;

use common::*;
use serde_json::{json, Value};

impl Api {
    async fn patch(&self, id: &str, body: Value) -> Reply {
        reply(self.admin(self.http.patch(format!("{}/api/v1/products/{id}", self.url))).json(&body)).await
    }

    async fn page(&self, admin: bool, query: &str) -> Reply {
        let path = if admin { "/api/v1/admin/products" } else { "/api/v1/products" };
        let r = self.http.get(format!("{}{path}{query}", self.url));
        reply(if admin { self.admin(r) } else { r }).await
    }

    /// Every product id of a listing, walking its pages of `limit`.
    async fn walk(&self, admin: bool, limit: usize) -> (Vec<String>, usize) {
        let (mut ids, mut pages, mut query) = (Vec::new(), 0, format!("?limit={limit}"));
        loop {
            let r = self.page(admin, &query).await;
            assert_eq!(r.status, 200, "{}", r.body);
            pages += 1;
            let products = r.body["products"].as_array().unwrap();
            assert!(products.len() <= limit);
            ids.extend(products.iter().map(|p| p["id"].as_str().unwrap().to_string()));
            match r.body["next_cursor"].as_str() {
                Some(c) => query = format!("?limit={limit}&cursor={c}"),
                None => return (ids, pages),
            }
        }
    }
}

/// Pays an order the amount it says.
async fn pay(api: &Api, order: &Reply) -> Reply {
    let id = order.body["order_id"].as_str().unwrap();
    api.notify(id, &format!("pay-{id}"), order.body["amount_cents"].as_u64().unwrap()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_catalogue_pages_through_products_on_sale_and_the_merchant_sees_them_all() {
    let t = TestApp::spawn().await;
    let api = t.api();
    for i in 0..7 {
        api.product_with_keys(&format!("c{i}"), 2, 0).await;
    }
    // c3 off the shelf, c5 deleted: buyers see neither, the merchant sees both.
    assert_eq!(api.patch("c3", json!({"on_sale": false})).await.status, 200);
    assert_eq!(api.patch("c5", json!({"on_sale": false})).await.status, 200);
    let del = reply(api.admin(api.http.delete(format!("{}/api/v1/admin/products/c5", api.url)))).await;
    assert_eq!(del.status, 200, "{}", del.body);

    let (public, pages) = api.walk(false, 2).await;
    assert_eq!(public, ["c0", "c1", "c2", "c4", "c6"], "in id order, each once");
    assert_eq!(pages, 3);
    let (all, _) = api.walk(true, 3).await;
    assert_eq!(all, ["c0", "c1", "c2", "c3", "c4", "c5", "c6"]);

    let first = api.page(false, "?limit=10").await;
    let p = &first.body["products"][0];
    assert_eq!(
        (p["price_cents"].clone(), p["available"].clone(), p["on_sale"].clone()),
        (json!(990), json!(2), json!(true))
    );
    assert!(p.get("stock").is_none(), "buyers do not see the merchant's counters");
    let merchant = api.page(true, "?limit=10").await;
    let c3 = merchant.body["products"].as_array().unwrap().iter().find(|p| p["id"] == "c3").unwrap().clone();
    assert_eq!((c3["shelf"].clone(), c3["stock"]["imported"].clone()), (json!("retired"), json!(2)));

    // A product created between two pages appears once, in its place.
    let one = api.page(false, "?limit=1").await;
    api.product_with_keys("c00", 1, 0).await;
    let cursor = one.body["next_cursor"].as_str().unwrap();
    let (rest, _) = {
        let mut ids = vec![one.body["products"][0]["id"].as_str().unwrap().to_string()];
        let mut query = format!("?limit=2&cursor={cursor}");
        loop {
            let r = api.page(false, &query).await;
            ids.extend(r.body["products"].as_array().unwrap().iter().map(|p| p["id"].as_str().unwrap().to_string()));
            match r.body["next_cursor"].as_str() {
                Some(c) => query = format!("?limit=2&cursor={c}"),
                None => break (ids, ()),
            }
        }
    };
    assert_eq!(rest.iter().collect::<HashSet<_>>().len(), rest.len(), "no product twice: {rest:?}");
    assert!(rest.contains(&"c00".to_string()));

    // Bad pages: a cursor edited or from the other listing, limits out of range,
    // unknown parameters; the merchant listing needs the token.
    let cursor = api.page(false, "?limit=2").await.body["next_cursor"].as_str().unwrap().to_string();
    let mut edited = cursor.clone();
    edited.insert(1, 'x');
    for (query, status, code) in [
        (format!("?cursor={edited}"), 400, "invalid_cursor"),
        ("?cursor=%00%01".to_string(), 400, "invalid_cursor"),
        ("?limit=0".to_string(), 422, "invalid_request"),
        ("?limit=501".to_string(), 422, "invalid_request"),
        ("?limit=ten".to_string(), 422, "invalid_request"),
        ("?sort=price".to_string(), 422, "invalid_request"),
    ] {
        let r = api.page(false, &query).await;
        assert_eq!((r.status, r.code()), (status, code), "{query}: {}", r.body);
    }
    let r = api.page(true, &format!("?cursor={cursor}")).await;
    assert_eq!((r.status, r.code()), (400, "invalid_cursor"), "a buyer listing's cursor");
    let r = reply(api.http.get(format!("{}/api/v1/admin/products", api.url))).await;
    assert_eq!(r.status, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_price_change_applies_to_new_orders_only_and_survives_a_crash() {
    let t = TestApp::spawn().await;
    let api = t.api();
    api.product_with_keys("p", 10, 0).await;
    let before = api.order("p", 2, "old-buyer", None).await;
    assert_eq!((before.status, before.body["amount_cents"].clone()), (201, json!(1980)));

    let r = api.patch("p", json!({"price_cents": 500, "name": "Cheaper"})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!((r.body["price_cents"].clone(), r.body["name"].clone()), (json!(500), json!("Cheaper")));
    let shown = api.product("p").await;
    assert_eq!((shown.body["price_cents"].clone(), shown.body["name"].clone()), (json!(500), json!("Cheaper")));

    let after = api.order("p", 2, "new-buyer", None).await;
    assert_eq!((after.status, after.body["amount_cents"].clone()), (201, json!(1000)));
    // The order made before keeps its amount: paying the new price is a mismatch,
    // paying what it said delivers.
    let id = before.body["order_id"].as_str().unwrap();
    let read = api.get_order(id, before.body["query_token"].as_str().unwrap()).await;
    assert_eq!(read.body["amount_cents"], json!(1980));
    assert_eq!(pay(&api, &before).await.status, 200);
    assert_eq!(pay(&api, &after).await.status, 200);

    // Durable when answered: a crash right after keeps the new terms.
    let r = api.patch("p", json!({"price_cents": 700, "per_buyer_limit": 1})).await;
    assert_eq!(r.status, 200);
    let data = t.data.clone();
    let mut t = t;
    t.app.take().unwrap().crash().await;
    let t2 = TestApp::start_on(&data, &[]).await;
    let api = t2.api();
    let shown = api.product("p").await;
    assert_eq!(
        (shown.body["price_cents"].clone(), shown.body["name"].clone(), shown.body["per_buyer_limit"].clone()),
        (json!(700), json!("Cheaper"), json!(1))
    );
    let o = api.order("p", 1, "third", None).await;
    assert_eq!((o.status, o.body["amount_cents"].clone()), (201, json!(700)));
    let again = api.order("p", 1, "third", None).await;
    assert_eq!((again.status, again.code()), (403, "limit_exceeded"), "the new limit holds after the restart");
    assert_audit_ok(&api.audit().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn off_the_shelf_and_outside_the_sale_window_nothing_new_is_sold_and_existing_orders_go_on() {
    let t = TestApp::spawn().await;
    let api = t.api();
    api.product_with_keys("w", 10, 0).await;
    let open = api.order("w", 1, "early", None).await;
    assert_eq!(open.status, 201);

    // Off the shelf: new orders refused, the open order is paid and delivered.
    assert_eq!(api.patch("w", json!({"on_sale": false})).await.body["shelf"], "retired");
    let r = api.order("w", 1, "late", None).await;
    assert_eq!((r.status, r.code()), (409, "product_retired"));
    assert_eq!(pay(&api, &open).await.status, 200);
    let page = api.page(false, "").await;
    assert!(page.body["products"].as_array().unwrap().is_empty(), "{}", page.body);
    assert_eq!(api.patch("w", json!({"on_sale": true})).await.body["shelf"], "on_sale");

    // A window that opens in an hour: refused with the window in the error.
    let in_an_hour = chrono::Utc::now() + chrono::Duration::hours(1);
    let starts = in_an_hour.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let r = api.patch("w", json!({"sale_starts_at": starts})).await;
    assert_eq!((r.status, r.body["sale_starts_at"].clone()), (200, json!(starts)), "{}", r.body);
    let r = api.order("w", 1, "too-early", None).await;
    assert_eq!((r.status, r.code()), (409, "sale_not_started"), "{}", r.body);
    assert_eq!(r.body["error"]["sale_window"], json!({"starts_at": starts, "ends_at": null}));
    let deal = json!({"deal_id": "pair", "group_size": 2, "price_cents": 500, "time_limit_secs": 600});
    let r = reply(api.admin(api.http.post(format!("{}/api/v1/products/w/group-deals", api.url))).json(&deal)).await;
    assert_eq!(r.status, 201, "{}", r.body);
    let seat = json!({"product_id": "w", "deal_id": "pair", "buyer": "too-early"});
    let r = reply(api.http.post(format!("{}/api/v1/groups", api.url)).json(&seat)).await;
    assert_eq!((r.status, r.code()), (409, "sale_not_started"), "no group seat either: {}", r.body);

    // A window that closed a minute ago (the start cleared): refused as ended.
    let ended =
        (chrono::Utc::now() - chrono::Duration::minutes(1)).to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let r = api.patch("w", json!({"sale_starts_at": null, "sale_ends_at": ended})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = api.order("w", 1, "too-late", None).await;
    assert_eq!((r.status, r.code()), (409, "sale_ended"), "{}", r.body);
    assert_eq!(r.body["error"]["sale_window"]["ends_at"], json!(ended));

    // Open again.
    assert_eq!(api.patch("w", json!({"sale_ends_at": null})).await.status, 200);
    assert_eq!(api.order("w", 1, "in-time", None).await.status, 201);
    assert_audit_ok(&api.audit().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_changes_are_refused_whole() {
    let t = TestApp::spawn().await;
    let api = t.api();
    api.product_with_keys("b", 1, 0).await;
    let now = chrono::Utc::now();
    let later = (now + chrono::Duration::hours(2)).to_rfc3339();
    let sooner = (now + chrono::Duration::hours(1)).to_rfc3339();
    for (body, status, code) in [
        (json!({}), 422, "invalid_request"),
        (json!({"price": 5}), 422, "invalid_request"),
        (json!({"price_cents": -1}), 422, "invalid_request"),
        (json!({"price_cents": 1_000_000_000_001u64}), 422, "invalid_request"),
        (json!({"name": ""}), 422, "invalid_request"),
        (json!({"sale_starts_at": "tomorrow"}), 422, "invalid_request"),
        (json!({"sale_starts_at": later, "sale_ends_at": sooner}), 422, "invalid_request"),
        // A good price with a bad window: nothing changes.
        (json!({"price_cents": 1, "sale_starts_at": later, "sale_ends_at": later}), 422, "invalid_request"),
    ] {
        let r = api.patch("b", body.clone()).await;
        assert_eq!((r.status, r.code()), (status, code), "{body}: {}", r.body);
    }
    assert_eq!(api.product("b").await.body["price_cents"], json!(990), "nothing changed");
    let r = reply(api.http.patch(format!("{}/api/v1/products/b", api.url)).json(&json!({"price_cents": 1}))).await;
    assert_eq!(r.status, 401, "the merchant's token is needed");
    let r = api.patch("nope", json!({"price_cents": 1})).await;
    assert_eq!((r.status, r.code()), (404, "product_not_found"));
}
