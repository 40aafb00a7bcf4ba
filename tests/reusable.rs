//! Reusable keys (循环卡密): a product whose one key is delivered to every buyer
//! who pays, with stock as a number of units the merchant sets. A flash sale on
//! it sells exactly its units, no more; the audit counts units; the product's mode
//! and its units survive kill -9.

mod common;

use common::*;
use futures::{stream, StreamExt};
use serde_json::{json, Value};

const KEY: &str = "SHARED-ACCOUNT user:demo pass:42";

impl Api {
    async fn create_reusable(&self, id: &str, shards: u16, per_buyer_limit: u32) -> Reply {
        let body = json!({"id": id, "name": "Shared", "price_cents": 500, "per_buyer_limit": per_buyer_limit,
                          "shards": shards, "key_mode": "reusable"});
        reply(self.admin(self.http.post(format!("{}/api/v1/products", self.url))).json(&body)).await
    }

    async fn set_stock(&self, id: &str, key: &str, units: u64) -> Reply {
        let url = format!("{}/api/v1/admin/products/{id}/stock", self.url);
        reply(self.admin(self.http.put(url)).json(&json!({"key": key, "units": units}))).await
    }

    async fn merchant_product(&self, id: &str) -> Reply {
        reply(self.admin(self.http.get(format!("{}/api/v1/admin/products/{id}", self.url)))).await
    }

    /// Orders one unit for `buyer` and pays it; the delivered order, or the refusal.
    async fn buy_one(&self, product: &str, buyer: &str) -> Result<Value, Reply> {
        let o = self.order(product, 1, buyer, None).await;
        if o.status != 201 {
            return Err(o);
        }
        let id = o.body["order_id"].as_str().unwrap();
        let n = self.notify(id, &format!("pay-{id}"), 500).await;
        assert_eq!(n.status, 200, "{}", n.body);
        let got = self.get_order(id, o.body["query_token"].as_str().unwrap()).await;
        assert_eq!(got.status, 200, "{}", got.body);
        Ok(got.body)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flash_sale_of_a_reusable_key_sells_exactly_its_units_to_10000_buyers() {
    let t = TestApp::spawn().await;
    let api = t.api();
    let created = api.create_reusable("shared", 2, 1).await;
    assert_eq!((created.status, created.body["key_mode"].as_str()), (201, Some("reusable")), "{}", created.body);
    let set = api.set_stock("shared", KEY, 10_000).await;
    assert_eq!((set.status, set.body["added"].clone()), (200, json!(10_000)), "{}", set.body);
    assert_eq!((set.body["product_id"].as_str(), set.body["units"].as_u64()), (Some("shared"), Some(10_000)));

    // 10,400 buyers for 10,000 units, 128 at a time, each ordering and paying.
    let outcomes: Vec<Result<Value, Reply>> = stream::iter(0..10_400)
        .map(|i| {
            let api = api.clone();
            async move { api.buy_one("shared", &format!("buyer-{i}")).await }
        })
        .buffer_unordered(128)
        .collect()
        .await;
    let delivered: Vec<&Value> = outcomes.iter().filter_map(|o| o.as_ref().ok()).collect();
    let refused: Vec<&Reply> = outcomes.iter().filter_map(|o| o.as_ref().err()).collect();
    assert!(refused.iter().all(|r| (r.status, r.code()) == (409, "sold_out")), "{:?}", refused[0].body);
    assert_eq!(delivered.len(), 10_000, "every unit sold, none twice");
    for o in &delivered {
        assert_eq!((o["status"].as_str(), o["keys"].clone()), (Some("delivered"), json!([KEY])), "{o}");
    }

    let audit = api.audit().await;
    assert_audit_ok(&audit);
    let p = &audit.body["products"][0];
    assert_eq!(
        (p["imported"].clone(), p["sold"].clone(), p["available"].clone()),
        (json!(10_000), json!(10_000), json!(0))
    );
    let stock = &api.merchant_product("shared").await.body["stock"];
    assert_eq!((stock["imported"].clone(), stock["sold"].clone()), (json!(10_000), json!(10_000)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn units_are_set_not_added_and_each_mode_refuses_the_others_operations() {
    let t = TestApp::spawn().await;
    let api = t.api();
    assert_eq!(api.create_reusable("r", 2, 0).await.status, 201);
    assert_eq!(api.create_product("u", 100, 0, 1).await.status, 201);

    // Setting the same number again adds nothing (a retry is safe); a higher one
    // adds the difference.
    assert_eq!(api.set_stock("r", KEY, 30).await.body["added"], json!(30));
    assert_eq!(api.set_stock("r", KEY, 30).await.body["added"], json!(0));
    let more = api.set_stock("r", KEY, 40).await;
    assert_eq!((more.body["added"].clone(), more.body["stock"]["available"].clone()), (json!(10), json!(40)));
    // A second key of the same product has units of its own.
    assert_eq!(api.set_stock("r", "SECOND-KEY", 2).await.body["added"], json!(2));

    let import = api.import("r", &["K1".to_string()]).await;
    assert_eq!((import.status, import.code()), (409, "key_mode_mismatch"), "{}", import.body);
    let stock = api.set_stock("u", KEY, 5).await;
    assert_eq!((stock.status, stock.code()), (409, "key_mode_mismatch"), "{}", stock.body);
    let too_many = api.set_stock("r", KEY, 1_000_001).await;
    assert_eq!(too_many.status, 422, "{}", too_many.body);
    let bad_key = api.set_stock("r", "tab\tkey", 1).await;
    assert_eq!(bad_key.status, 422, "{}", bad_key.body);
    let bad_mode = reply(
        api.admin(api.http.post(format!("{}/api/v1/products", api.url)))
            .json(&json!({"id": "x", "name": "X", "price_cents": 1, "key_mode": "shared"})),
    )
    .await;
    assert_eq!(bad_mode.status, 422, "{}", bad_mode.body);
    assert_eq!(api.product("u").await.body["key_mode"], json!("unique"));

    // An order of 3 gets the key three times (one unit each).
    let o = api.order("r", 3, "many", None).await;
    assert_eq!(o.status, 201, "{}", o.body);
    let id = o.body["order_id"].as_str().unwrap();
    assert_eq!(api.notify(id, "pay-many", o.body["amount_cents"].as_u64().unwrap()).await.status, 200);
    let got = api.get_order(id, o.body["query_token"].as_str().unwrap()).await;
    assert_eq!(got.body["keys"].as_array().unwrap().len(), 3);
    assert!(got.body["keys"].as_array().unwrap().iter().all(|k| k == KEY || k == "SECOND-KEY"), "{}", got.body);

    // A pending order holds units; withdrawing the key by name takes every
    // available unit of it and none that are held or sold.
    let pending = api.order("r", 1, "waiting", None).await;
    assert_eq!(pending.status, 201);
    let before = api.merchant_product("r").await.body["stock"].clone();
    let w = reply(
        api.admin(api.http.post(format!("{}/api/v1/admin/products/r/keys/withdraw", api.url)))
            .json(&json!({"keys": [KEY]})),
    )
    .await;
    assert_eq!(w.status, 200, "{}", w.body);
    let after = api.merchant_product("r").await.body["stock"].clone();
    let second_left = after["available"].as_u64().unwrap();
    assert!(second_left <= 2, "only SECOND-KEY units stay available: {after}");
    assert_eq!(w.body["withdrawn"].as_u64().unwrap(), before["available"].as_u64().unwrap() - second_left);
    assert_eq!((after["reserved"].clone(), after["sold"].clone()), (before["reserved"].clone(), json!(3)));
    let listed =
        reply(api.admin(api.http.get(format!("{}/api/v1/admin/products/r/keys?state=withdrawn&reveal=true", api.url))))
            .await;
    assert_eq!(listed.status, 200, "{}", listed.body);
    assert!(listed.body["keys"].as_array().unwrap().iter().all(|k| k["key"] == KEY), "{}", listed.body);
    assert_audit_ok(&api.audit().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reusable_product_and_its_units_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut server = Server::start(&data, &[]);
    let api = server.api();
    assert_eq!(api.create_reusable("r", 2, 0).await.status, 201);
    assert_eq!(api.set_stock("r", KEY, 50).await.body["added"], json!(50));
    let mut sold = Vec::new();
    for i in 0..20 {
        sold.push(api.buy_one("r", &format!("b{i}")).await.unwrap_or_else(|r| panic!("in stock: {}", r.body)));
    }
    let pending = api.order("r", 2, "pending", None).await;
    assert_eq!(pending.status, 201);
    server.kill9();

    let server = Server::start(&data, &[]);
    let api = server.api();
    let p = api.merchant_product("r").await;
    assert_eq!(p.body["key_mode"], json!("reusable"), "{}", p.body);
    let stock = &p.body["stock"];
    assert_eq!(
        (stock["imported"].clone(), stock["sold"].clone(), stock["reserved"].clone(), stock["available"].clone()),
        (json!(50), json!(20), json!(2), json!(28))
    );
    for o in &sold {
        let got = api.admin_order(o["order_id"].as_str().unwrap()).await;
        assert_eq!(got.body["keys"], json!([KEY]), "{}", got.body);
    }
    // Still reusable after the restart: units are set, keys are not imported.
    assert_eq!(api.set_stock("r", KEY, 50).await.body["added"], json!(0));
    assert_eq!(api.import("r", &["K".to_string()]).await.code(), "key_mode_mismatch");
    let mut audit = api.audit().await;
    assert_audit_ok(&audit);
    assert_eq!(audit.body["products"][0]["sold"].take(), json!(20));
}
