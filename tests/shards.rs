//! A product split over several stock actors (shards) behaves as one: a shard
//! that runs dry borrows keys from its siblings, so `sold_out` means the whole
//! product is empty; per-buyer limits stay exact; and keys lent when a crash
//! struck still reach their borrower, once.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use futures::future::join_all;
use kami::actors::registry::buyer_shard;
use serde_json::json;

/// `n` buyer names whose orders all go to `shard` of a `shards`-shard product.
fn buyers_on(shard: usize, shards: usize, n: usize, tag: &str) -> Vec<String> {
    (0..).map(|i| format!("{tag}-{i}")).filter(|b| buyer_shard(b, shards) == shard).take(n).collect()
}

async fn product(api: &Api, id: &str, shards: u16, keys: usize, limit: u32) {
    assert_eq!(api.create_product(id, 990, limit, shards).await.status, 201);
    let keys: Vec<String> = (0..keys).map(|i| format!("{id}-K{i}")).collect();
    assert_eq!(api.import(id, &keys).await.body["imported"], json!(keys.len()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_shard_borrows_so_sold_out_means_the_whole_product_is_empty() {
    let t = TestApp::spawn().await;
    let api = t.api();
    // A per-buyer limit (never reached here) routes each order to its buyer's home
    // shard, so all the demand lands on shard 0, which holds about a quarter of the keys.
    product(&api, "hot", 4, 200, 1000).await;
    let buyers = buyers_on(0, 4, 200, "skew");
    let replies = join_all(buyers.iter().map(|b| api.order("hot", 1, b, None))).await;
    let refused: Vec<_> = replies.iter().filter(|r| r.status != 201).map(|r| r.body.clone()).collect();
    assert!(refused.is_empty(), "{} of 200 refused while the product had 200 keys: {:?}", refused.len(), refused[0]);

    // Now the product is empty, whichever shard is asked.
    for b in [buyers_on(0, 4, 1, "late"), buyers_on(2, 4, 1, "late")].concat() {
        let r = api.order("hot", 1, &b, None).await;
        assert_eq!((r.status, r.code()), (409, "sold_out"), "{b}");
    }
    let audit = api.audit().await;
    assert_audit_ok(&audit);
    let p = &audit.body["products"][0];
    assert_eq!(
        (p["reserved"].clone(), p["available"].clone(), p["in_transit"].clone()),
        (json!(200), json!(0), json!(0))
    );
    let metrics = api.metrics().await;
    assert!(metric_value(&metrics, "kami_keys_transferred_total") >= 150.0, "shard 0 borrowed most of its keys");

    // Every order is paid: 200 distinct keys, none sold twice, and a restart
    // rebuilds the shards, transfers included, to the same accounting.
    let mut delivered = HashSet::new();
    for r in &replies {
        let id = r.body["order_id"].as_str().unwrap();
        assert_eq!(api.notify(id, &format!("pay-{id}"), 990).await.status, 200);
        let o = api.get_order(id, r.body["query_token"].as_str().unwrap()).await;
        assert!(delivered.insert(o.body["keys"][0].as_str().unwrap().to_string()));
    }
    assert_eq!(delivered.len(), 200);
    let data = t.data.clone();
    let mut t = t;
    t.app.take().unwrap().crash().await;
    let t2 = TestApp::start_on(&data, &[]).await;
    let audit = t2.api().audit().await;
    assert_audit_ok(&audit);
    assert_eq!(audit.body["products"][0]["sold"], json!(200));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_buyer_limit_is_exact_while_shards_borrow() {
    let t = TestApp::spawn().await;
    let api = t.api();
    product(&api, "lim", 4, 60, 2).await;
    // Others on the buyer's shard first drain it, so the buyer's orders need borrowed keys.
    for b in buyers_on(1, 4, 30, "other") {
        assert_eq!(api.order("lim", 1, &b, None).await.status, 201);
    }
    let buyer = &buyers_on(1, 4, 1, "greedy")[0];
    let replies = join_all((0..200).map(|_| api.order("lim", 1, buyer, None))).await;
    let created = replies.iter().filter(|r| r.status == 201).count();
    assert_eq!(created, 2, "limit 2 across 200 concurrent attempts");
    assert!(replies.iter().filter(|r| r.status != 201).all(|r| r.code() == "limit_exceeded"));
    assert_audit_ok(&api.audit().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_lent_before_a_crash_reach_the_borrower_after_restart() {
    let mut t = TestApp::spawn().await;
    let api = t.api();
    product(&api, "p", 2, 40, 0).await;
    // The first step of a transfer only, as when the process dies right after it.
    let route = t.core().registry().get("p").unwrap();
    let lent = route.shards[1].addr.send(kami::actors::shard::Lend { to: 0, max_keys: 1000 }).await.unwrap().unwrap();
    let lent = lent.expect("shard 1 has keys").keys.len() as u64;
    assert!(lent > 0);
    let audit = api.audit().await;
    assert_audit_ok(&audit);
    assert_eq!(audit.body["products"][0]["in_transit"], json!(lent));

    // Periodic settling off: only start-up recovery may deliver the keys.
    let data = t.data.clone();
    t.app.take().unwrap().crash().await;
    let t2 = TestApp::start_on(&data, &[("products.settle_interval_ms", "3600000")]).await;
    let api = t2.api();
    let settled = api
        .eventually(Duration::from_secs(30), || async {
            api.audit().await.body["products"][0]["in_transit"] == json!(0)
        })
        .await;
    assert!(settled, "keys still in transit after the restart");
    let audit = api.audit().await;
    assert_audit_ok(&audit);
    assert_eq!(audit.body["products"][0]["available"], json!(40));
    // Resending is harmless: a second settling round moves nothing.
    assert_eq!(t2.core().settle_transfers().await, 0);
    // Every key can be sold, from either shard.
    let replies = join_all(buyers_on(0, 2, 40, "after").iter().map(|b| api.order("p", 1, b, None))).await;
    assert!(replies.iter().all(|r| r.status == 201));
}

/// Without a per-buyer limit or an Idempotency-Key, an order placed from an arbiter
/// goes to the product's shard on that arbiter: every order from one arbiter lands
/// in one shard, and the two arbiters' orders in different shards (by buyer hash they
/// would spread over both).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_stays_on_the_arbiter_that_placed_it() {
    let t = TestApp::spawn_with(&[("actors.arbiters", "2")]).await;
    let api = t.api();
    product(&api, "local", 2, 100, 0).await;
    let app = t.app.as_ref().unwrap();
    let mut shards_by_arbiter = Vec::new();
    for arbiter in 0..2 {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let core = t.core().clone();
        assert!(app.spawn_on_arbiter(arbiter, async move {
            let mut shards = HashSet::new();
            for i in 0..20 {
                let req = kami::core::OrderRequest {
                    product_id: "local".into(),
                    quantity: 1,
                    buyer: format!("a{arbiter}-{i}"),
                    query_password: None,
                    coupon: None,
                    reseller: None,
                };
                let order = core.create_order(req, None).await.unwrap();
                shards.insert(order.shard);
            }
            let _ = tx.send(shards);
        }));
        shards_by_arbiter.push(rx.await.unwrap());
    }
    assert_eq!(shards_by_arbiter[0].len(), 1, "{shards_by_arbiter:?}");
    assert_eq!(shards_by_arbiter[1].len(), 1, "{shards_by_arbiter:?}");
    assert_ne!(shards_by_arbiter[0], shards_by_arbiter[1]);
}
