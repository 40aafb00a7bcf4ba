//! Operating kami as a process: request ids and order ids in the logs, and a
//! graceful shutdown on SIGTERM in the middle of a load.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ids_are_echoed_and_one_orders_life_can_be_followed_in_json_logs() {
    let dir = tempfile::tempdir().unwrap();
    let server =
        Server::start(&dir.path().join("data"), &[("KAMI_LOG__FORMAT", "json"), ("RUST_LOG", "info,kami=debug")]);
    let api = server.api();
    api.product_with_keys("p", 5, 0).await;

    // A request id sent by the client is kept and echoed; otherwise one is made.
    let o = reply(api.order_request("p", 1, "b1").header("x-request-id", "trace-order-1")).await;
    assert_eq!(o.status, 201, "{}", o.body);
    assert_eq!(o.headers["x-request-id"], "trace-order-1");
    let made = reply(api.http.get(format!("{}/healthz", api.url))).await;
    let made_id = made.headers.get("x-request-id").expect("a request id is made").to_str().unwrap();
    assert!(!made_id.is_empty());
    let other = reply(api.http.get(format!("{}/healthz", api.url))).await;
    assert_ne!(other.headers["x-request-id"], made_id, "made request ids are unique");

    let order_id = o.body["order_id"].as_str().unwrap().to_string();
    let amount = o.body["amount_cents"].as_u64().unwrap();
    let paid = reply(api.notify_request(&order_id, "pay-1", amount).header("x-request-id", "trace-pay-1")).await;
    assert_eq!(paid.status, 200, "{}", paid.body);

    // The lines about this order: the two requests (with their ids) and the stock
    // actor's journaled events (created, delivered). Logs are written as they
    // happen (a request's line after its response is sent): wait for both, bounded.
    let lines = || server.lines_with(&order_id);
    let logged = api.eventually(Duration::from_secs(20), || async {
        let lines = lines();
        let has = |needle: &str| lines.iter().any(|l| l.contains(needle));
        has("\"delivered\"") && has("trace-pay-1") && has("trace-order-1")
    });
    assert!(logged.await, "lines for {order_id} missing: {:#?}", lines());
    let parsed: Vec<Value> = lines()
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {l}")))
        .collect();
    let span_with = |request_id: &str| {
        parsed.iter().any(|v| v["span"]["request_id"] == request_id && v["span"]["order_id"] == order_id.as_str())
    };
    assert!(span_with("trace-order-1"), "order creation request not logged with its order id: {parsed:#?}");
    assert!(span_with("trace-pay-1"), "payment request not logged with its order id: {parsed:#?}");
    let event = |name: &str| {
        parsed.iter().any(|v| v["fields"]["event"] == name && v["fields"]["order_id"] == order_id.as_str())
    };
    assert!(event("created") && event("delivered"), "actor events missing: {parsed:#?}");
}

/// What a load worker was told, to check after the restart.
struct Acked {
    order_id: String,
    token: String,
    status: &'static str,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_load_loses_no_acknowledged_order_and_the_restart_replays_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut server = Server::start(&data, &[]);
    let api = server.api();
    api.product_with_keys("p", 20_000, 0).await;

    let acked = Arc::new(Mutex::new(Vec::<Acked>::new()));
    let count = Arc::new(AtomicUsize::new(0));
    let enough = Arc::new(tokio::sync::Notify::new());
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..16)
        .map(|w| {
            let (api, acked, count, enough, stop) =
                (api.clone(), acked.clone(), count.clone(), enough.clone(), stop.clone());
            tokio::spawn(async move {
                for i in 0.. {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    // Any failure to get an answer (the server is going away) ends the worker.
                    let Ok(resp) = api.order_request("p", 1, &format!("w{w}-{i}")).send().await else { return };
                    if resp.status() != 201 {
                        return;
                    }
                    let Ok(o) = resp.json::<Value>().await else { return };
                    let (order_id, token) = (o["order_id"].as_str().unwrap(), o["query_token"].as_str().unwrap());
                    let mut status = "pending_payment";
                    if i % 2 == 0 {
                        let amount = o["amount_cents"].as_u64().unwrap();
                        match api.notify_request(order_id, &format!("pay-{w}-{i}"), amount).send().await {
                            Ok(r) if r.status() == 200 => status = "delivered",
                            // An unanswered payment may or may not have been applied.
                            _ => return,
                        }
                    }
                    let acked_order = Acked { order_id: order_id.into(), token: token.into(), status };
                    acked.lock().unwrap().push(acked_order);
                    if count.fetch_add(1, Ordering::Relaxed) + 1 == 300 {
                        enough.notify_one();
                    }
                }
            })
        })
        .collect();
    tokio::time::timeout(Duration::from_secs(60), enough.notified()).await.expect("300 orders acknowledged");
    server.sigterm();
    let status = server.exited_within(Duration::from_secs(30)).await.expect("exited after SIGTERM");
    assert!(status.success(), "graceful shutdown exits 0, got {status:?}");
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        tokio::time::timeout(Duration::from_secs(30), w).await.expect("worker ends").unwrap();
    }

    let restarted = Server::start(&data, &[]);
    assert_eq!(restarted.recovery_records, 0, "the shutdown snapshot covers every journal record");
    let api = restarted.api();
    let acked = std::mem::take(&mut *acked.lock().unwrap());
    assert!(acked.len() >= 300);
    for a in &acked {
        let r = api.get_order(&a.order_id, &a.token).await;
        assert_eq!(r.status, 200, "acknowledged order {} lost: {}", a.order_id, r.body);
        assert_eq!(r.body["status"], a.status, "order {}", a.order_id);
        if a.status == "delivered" {
            assert_eq!(r.body["keys"].as_array().map(Vec::len), Some(1));
        }
    }
    assert_audit_ok(&api.audit().await);
    eprintln!("sigterm: {} acknowledged orders survived", acked.len());
}

/// Secrets that are not configured are generated once, kept in the data directory
/// (owner-only), and used again at the next start: the merchant's token and the
/// gateway's shared secret survive a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_secrets_are_kept_for_the_next_start() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let unset = [("KAMI_ADMIN__TOKEN", ""), ("KAMI_PAYMENTS__CHANNELS__SANDBOX__SECRET", "")];
    let audit = |api: &Api, token: &str| {
        let req = api.http.get(format!("{}/api/v1/admin/audit", api.url)).bearer_auth(token.to_string());
        async move { req.send().await.unwrap().status().as_u16() }
    };
    let (admin, sandbox) = {
        let server = Server::start(&data, &unset);
        let kept = kami::app::read_secrets(&data).unwrap();
        let admin = kept.admin_token.expect("the admin token is kept");
        let sandbox = kept.channels.get("sandbox").expect("the channel secret is kept").clone();
        assert_eq!(audit(&server.api(), &admin).await, 200, "the server uses the kept token");
        assert_eq!(audit(&server.api(), ADMIN).await, 401);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(kami::app::secrets_file(&data)).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "readable by the owner only");
        }
        (admin, sandbox)
    };
    let server = Server::start(&data, &unset);
    let api = server.api();
    assert_eq!(audit(&api, &admin).await, 200, "the same token after a restart");
    // The gateway's notifications still verify with the secret it was given.
    let product = json!({"id": "p", "name": "P", "price_cents": 100, "per_buyer_limit": 0});
    let r =
        api.http.post(format!("{}/api/v1/products", api.url)).bearer_auth(&admin).json(&product).send().await.unwrap();
    assert_eq!(r.status(), 201);
    let r = api
        .http
        .post(format!("{}/api/v1/products/p/keys", api.url))
        .bearer_auth(&admin)
        .json(&json!({"keys": ["K1"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let o = api.order("p", 1, "alice", None).await;
    let id = o.body["order_id"].as_str().unwrap();
    let body = serde_json::to_vec(&json!({
        "order_id": id, "payment_id": "pay-1", "amount_cents": 100, "status": "paid",
        "timestamp": now_secs(), "nonce": "n-1",
    }))
    .unwrap();
    assert_eq!(api.notify_raw("sandbox", &body, &sandbox).await.status, 200);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kami"))
        .args(["secrets", "show", "--data"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("admin.token = {admin}")));
}

/// `kami secrets rotate`: the merchant's token is replaced at once; a channel's
/// old secret stays accepted on notifications for its grace period, and not at
/// all once rotated with no grace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_channel_secret_keeps_the_old_one_for_its_grace_period() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let unset = [("KAMI_ADMIN__TOKEN", ""), ("KAMI_PAYMENTS__CHANNELS__SANDBOX__SECRET", "")];
    let rotate = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_kami"))
            .args(["secrets", "rotate", "--data"])
            .arg(&data)
            .args(args)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
        let first = stdout.lines().next().unwrap_or_default();
        (first.split(" = ").nth(1).expect("`key = new secret` first").to_string(), stdout)
    };
    // A notification for a fresh order, signed with `secret`: its status.
    let pay_with = |api: Api, admin: String, secret: String, n: u32| async move {
        let product = format!("p{n}");
        let r = api
            .http
            .post(format!("{}/api/v1/products", api.url))
            .bearer_auth(&admin)
            .json(&json!({"id": product, "name": "P", "price_cents": 100, "per_buyer_limit": 0}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        let r = api
            .http
            .post(format!("{}/api/v1/products/{product}/keys", api.url))
            .bearer_auth(&admin)
            .json(&json!({"keys": [format!("K{n}")]}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let o = api.order(&product, 1, "alice", None).await;
        let body = serde_json::to_vec(&json!({
            "order_id": o.body["order_id"], "payment_id": format!("pay-{n}"), "amount_cents": 100,
            "status": "paid", "timestamp": now_secs(), "nonce": format!("n-{n}"),
        }))
        .unwrap();
        let r = api.notify_raw("sandbox", &body, &secret).await;
        (r.status, r.code().to_string())
    };
    let admin_status = |api: Api, token: String| async move {
        let req = api.http.get(format!("{}/api/v1/admin/audit", api.url)).bearer_auth(token);
        req.send().await.unwrap().status().as_u16()
    };
    let (admin1, secret1) = {
        let _server = Server::start(&data, &unset);
        let kept = kami::app::read_secrets(&data).unwrap();
        (kept.admin_token.unwrap(), kept.channels["sandbox"].clone())
    };

    let (admin2, said) = rotate(&["--admin-token"]);
    assert!(said.contains("admin.token = "), "{said}");
    let (secret2, said) = rotate(&["--channel", "sandbox", "--grace-hours", "1"]);
    assert!(said.contains("accepted on its notifications and answers until"), "{said}");
    assert_ne!(secret2, secret1);
    {
        let server = Server::start(&data, &unset);
        assert!(!server.lines_with("the replaced secret is accepted until").is_empty(), "the start says so");
        let api = server.api();
        assert_eq!(admin_status(api.clone(), admin1.clone()).await, 401, "the old admin token no longer works");
        assert_eq!(admin_status(api.clone(), admin2.clone()).await, 200);
        assert_eq!(pay_with(api.clone(), admin2.clone(), secret1.clone(), 1).await.0, 200, "old secret, in grace");
        assert_eq!(pay_with(api.clone(), admin2.clone(), secret2.clone(), 2).await.0, 200, "new secret");
    }

    let (secret3, said) = rotate(&["--channel", "sandbox", "--grace-hours", "0"]);
    assert!(said.contains("no grace period"), "{said}");
    let server = Server::start(&data, &unset);
    let api = server.api();
    let refused = (401, "bad_signature".to_string());
    assert_eq!(pay_with(api.clone(), admin2.clone(), secret2, 3).await, refused, "rotated with no grace");
    assert_eq!(pay_with(api.clone(), admin2.clone(), secret1, 4).await, refused, "two rotations ago");
    assert_eq!(pay_with(api.clone(), admin2.clone(), secret3, 5).await.0, 200);

    let show = std::process::Command::new(env!("CARGO_BIN_EXE_kami"))
        .args(["secrets", "rotate", "--data"])
        .arg(&data)
        .args(["--channel", "nope"])
        .output()
        .unwrap();
    assert_eq!(show.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&show.stderr).contains("no secret of channel \"nope\""));
}

/// The server turns transparent huge pages off for itself by default (so that no
/// order waits for the kernel to zero 2 MiB at once), and leaves them alone when
/// `actors.transparent_huge_pages` is true. Read from the kernel's view of the process.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_runs_without_transparent_huge_pages_unless_told() {
    let thp_enabled = |server: &Server| {
        let status = std::fs::read_to_string(format!("/proc/{}/status", server.child.id())).unwrap();
        let line = status.lines().find(|l| l.starts_with("THP_enabled:"));
        line.map(|l| l.split_whitespace().nth(1).unwrap().to_string())
    };
    let dir = tempfile::tempdir().unwrap();
    let off = Server::start(&dir.path().join("off"), &[]);
    let Some(flag) = thp_enabled(&off) else {
        eprintln!("this kernel does not report THP_enabled; nothing to check");
        return;
    };
    assert_eq!(flag, "0", "huge pages are off by default");
    let on = Server::start(&dir.path().join("on"), &[("KAMI_ACTORS__TRANSPARENT_HUGE_PAGES", "true")]);
    assert_eq!(thp_enabled(&on).as_deref(), Some("1"), "and left on when asked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_asked_for_again_with_nothing_new_is_the_one_already_taken() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), &[]);
    let api = server.api();
    assert_eq!(api.create_product("one", 990, 0, 1).await.status, 201);
    let keys: Vec<String> = (0..10).map(|i| format!("snap-key-{i}")).collect();
    assert_eq!(api.import("one", &keys).await.status, 200);
    let snapshots = || async { metric_value(&api.metrics().await, "kami_snapshot_seconds_count") };
    let snapshot = || reply(api.admin(api.http.post(format!("{}/api/v1/admin/snapshot", api.url))));

    let before = snapshots().await;
    // Two asked at once (the second joins the first), then one after both.
    let (a, b) = tokio::join!(snapshot(), snapshot());
    assert_eq!((a.status, b.status), (200, 200), "{} {}", a.body, b.body);
    assert_eq!(snapshot().await.status, 200);
    assert_eq!(snapshots().await, before + 1.0, "one snapshot at the same record, however often asked");

    assert_eq!(api.order("one", 1, "buyer-1", None).await.status, 201);
    assert_eq!(snapshot().await.status, 200);
    assert_eq!(snapshots().await, before + 2.0, "a new record makes the next snapshot a new one");
}
