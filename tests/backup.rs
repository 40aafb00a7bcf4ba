//! Online backups: the cut is one instant across journals, selling, snapshots and
//! trims going on meanwhile; restores are exact and audited; a damaged backup is
//! refused before anything is written; secrets go in only sealed.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// Runs the `kami` binary with `args`; returns its exit code and what it printed.
fn kami(args: &[&str]) -> (i32, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kami")).args(args).output().expect("run kami");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().expect("exit code"), text)
}

async fn kami_async(args: Vec<String>) -> (i32, String) {
    tokio::task::spawn_blocking(move || kami(&args.iter().map(String::as_str).collect::<Vec<_>>())).await.unwrap()
}

fn path(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 path")
}

/// Restores `file` into `to` with the binary, then audits it with the binary.
fn restore_and_audit(file: &Path, to: &Path) {
    let (code, out) = kami(&["backup", "verify", path(file)]);
    assert_eq!(code, 0, "verify: {out}");
    let (code, out) = kami(&["restore", "--from", path(file), "--data", path(to)]);
    assert_eq!(code, 0, "restore: {out}");
    let (code, out, err) = kami_audit(to, false);
    assert_eq!(code, 0, "audit of the restored directory: {out}{err}");
}

fn product_counts(audit: &Reply, product: &str) -> Value {
    audit.body["products"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == product)
        .cloned()
        .unwrap_or_else(|| panic!("{product} in the audit: {}", audit.body))
}

/// One purchase as its buyer saw it.
#[derive(Clone, Debug)]
struct Bought {
    order_id: String,
    token: String,
    key: Value,
}

async fn buy(api: &Api, product: &str, buyer: &str) -> Bought {
    // With an Idempotency-Key an order goes to its buyer's home shard, not the one
    // on the arbiter that took the connection: purchases by several buyers reach
    // every shard whichever connections the client uses (a shard with nothing new
    // since its last snapshot would not snapshot, nor trim, again).
    let o = api.order(product, 1, buyer, Some(buyer)).await;
    assert_eq!(o.status, 201, "{:?}", o.body);
    let (id, token) = (o.body["order_id"].as_str().unwrap(), o.body["query_token"].as_str().unwrap());
    let n = api.notify(id, &format!("pay-{id}"), o.body["amount_cents"].as_u64().unwrap()).await;
    assert_eq!(n.status, 200, "{:?}", n.body);
    let read = api.get_order(id, token).await;
    assert_eq!(read.body["status"], "delivered", "{:?}", read.body);
    Bought { order_id: id.into(), token: token.into(), key: read.body["keys"].clone() }
}

/// A product of two shards with `keys` keys named `{id}-K{i}`.
async fn stocked(api: &Api, id: &str, keys: usize) {
    assert_eq!(api.create_product(id, 100, 0, 2).await.status, 201);
    let keys: Vec<String> = (0..keys).map(|i| format!("{id}-K{i}")).collect();
    assert_eq!(api.import(id, &keys).await.status, 200);
}

/// One purchase per buyer `{prefix}{i}`, one after another.
async fn buy_each(api: &Api, product: &str, prefix: &str, buyers: std::ops::Range<usize>) -> Vec<Bought> {
    let mut out = Vec::new();
    for i in buyers {
        out.push(buy(api, product, &format!("{prefix}{i}")).await);
    }
    out
}

/// Each purchase is in the restored shop, delivered with the key its buyer got.
async fn assert_delivered_as_bought<'a>(api: &Api, bought: impl IntoIterator<Item = &'a Bought>, when: &str) {
    for b in bought {
        let r = api.get_order(&b.order_id, &b.token).await;
        let seen = (r.status, &r.body["status"], &r.body["keys"]);
        assert_eq!(seen, (200, &json!("delivered"), &b.key), "{when}: {}", b.order_id);
    }
}

/// None of these purchases is in the restored shop.
async fn assert_absent<'a>(api: &Api, bought: impl IntoIterator<Item = &'a Bought>, when: &str) {
    for b in bought {
        let r = api.admin_order(&b.order_id).await;
        assert_eq!(r.status, 404, "{when}: {} came after: {:?}", b.order_id, r.body);
    }
}

async fn snapshot(api: &Api) {
    let r = reply(api.admin(api.http.post(format!("{}/api/v1/admin/snapshot", api.url)))).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
}

/// A writer that says when it is first written to (the backup has taken its cut
/// then) and waits for leave to go on.
struct Gated {
    out: Vec<u8>,
    cut: Option<std::sync::mpsc::Sender<()>>,
    go: std::sync::mpsc::Receiver<()>,
}

impl Write for Gated {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        if let Some(cut) = self.cut.take() {
            cut.send(()).unwrap();
            self.go.recv_timeout(Duration::from_secs(120)).expect("leave to go on");
        }
        self.out.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backup_holds_exactly_what_was_durable_at_its_cut_while_selling_snapshots_and_trims_go_on() {
    let app = TestApp::spawn().await;
    let api = app.api();
    stocked(&api, "flash", 400).await;

    // Before the cut: purchases, a snapshot of every shard (its trim done), more
    // purchases on top of it, and orders left unpaid.
    let mut before = buy_each(&api, "flash", "early", 0..30).await;
    snapshot(&api).await;
    before.extend(buy_each(&api, "flash", "early", 30..50).await);
    let mut unpaid = Vec::new();
    for i in 0..10 {
        let o = api.order("flash", 1, &format!("unpaid{i}"), None).await;
        assert_eq!(o.status, 201);
        unpaid.push(o.body);
    }

    // The cut: the backup stops at its first write, after it has read every journal's end.
    let (cut_tx, cut_rx) = std::sync::mpsc::channel();
    let (go_tx, go_rx) = std::sync::mpsc::channel();
    let storage = app.core().storage().clone();
    let backup = std::thread::spawn(move || {
        let mut out = Gated { out: Vec::new(), cut: Some(cut_tx), go: go_rx };
        let summary = storage.backup(&mut out, None, 0).expect("backup");
        (summary, out.out)
    });
    tokio::task::spawn_blocking(move || cut_rx.recv_timeout(Duration::from_secs(60)).expect("the cut taken"))
        .await
        .unwrap();

    // After the cut: more purchases, the payment of an order left unpaid, and a
    // snapshot of every shard, whose trim a running backup must hold back.
    let deferred = |text: &str| metric_value(text, "kami_trims_deferred_total");
    let deferred_before = deferred(&api.metrics().await);
    let after = buy_each(&api, "flash", "late", 0..40).await;
    let late_paid = unpaid[0]["order_id"].as_str().unwrap().to_string();
    let n = api.notify(&late_paid, "pay-late", 100).await;
    assert_eq!(n.status, 200, "{:?}", n.body);
    snapshot(&api).await;
    let held = api
        .eventually(Duration::from_secs(30), || {
            let api = api.clone();
            async move { deferred(&api.metrics().await) >= deferred_before + 2.0 }
        })
        .await;
    assert!(held, "both shards' trims were held back while the backup ran");
    go_tx.send(()).unwrap();
    let (summary, bytes) = tokio::task::spawn_blocking(move || backup.join().unwrap()).await.unwrap();
    assert!(summary.journal_records > 0);

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("cut.kamibak");
    std::fs::write(&file, &bytes).unwrap();
    let restored = dir.path().join("restored");
    tokio::task::spawn_blocking({
        let (file, restored) = (file.clone(), restored.clone());
        move || restore_and_audit(&file, &restored)
    })
    .await
    .unwrap();

    let again = TestApp::start_on(&restored, &[]).await;
    let rapi = again.api();
    assert_delivered_as_bought(&rapi, &before, "before the cut").await;
    for o in &unpaid {
        let r = rapi.admin_order(o["order_id"].as_str().unwrap()).await;
        // Paid after the cut: not paid in the backup.
        assert_eq!((r.status, &r.body["status"]), (200, &json!("pending_payment")), "{:?}", r.body);
    }
    assert_absent(&rapi, &after, "bought after the cut").await;
    let audit = rapi.audit().await;
    assert_audit_ok(&audit);
    let p = product_counts(&audit, "flash");
    assert_eq!((p["sold"].as_u64(), p["reserved"].as_u64()), (Some(50), Some(10)), "{p}");
    // The original sells on with everything.
    let p = product_counts(&api.audit().await, "flash");
    assert_eq!((p["sold"].as_u64(), p["reserved"].as_u64()), (Some(91), Some(9)), "{p}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_online_backup_through_the_api_during_a_sale_restores_every_purchase_acknowledged_before_it() {
    let app = TestApp::spawn().await;
    let api = app.api();
    stocked(&api, "sale", 4000).await;

    let bought: Arc<Mutex<Vec<(Instant, Bought)>>> = Default::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..16 {
        let (api, bought, stop) = (api.clone(), bought.clone(), stop.clone());
        workers.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && i < 200 {
                let b = buy(&api, "sale", &format!("w{w}-{i}")).await;
                bought.lock().unwrap().push((Instant::now(), b));
                i += 1;
            }
        }));
    }
    let count = || bought.lock().unwrap().len();
    assert!(api.eventually(Duration::from_secs(60), || async { count() >= 200 }).await, "the sale runs");

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("sale.kamibak");
    let started = Instant::now();
    let args = ["backup", "--url", &app.url, "--admin-token", ADMIN, "--to", path(&file)];
    let (code, out) = kami_async(args.iter().map(|s| s.to_string()).collect()).await;
    assert_eq!(code, 0, "kami backup: {out}");
    let at_backup = count();
    assert!(api.eventually(Duration::from_secs(60), || async { count() >= at_backup + 100 }).await, "selling goes on");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    assert!(!dir.path().join("sale.kamibak.partial").exists(), "the partial file became the backup");

    let restored = dir.path().join("restored");
    tokio::task::spawn_blocking({
        let (file, restored) = (file.clone(), restored.clone());
        move || restore_and_audit(&file, &restored)
    })
    .await
    .unwrap();
    let all = bought.lock().unwrap().clone();
    let again = TestApp::start_on(&restored, &[]).await;
    let rapi = again.api();
    let acknowledged_before: Vec<&Bought> = all.iter().filter(|(at, _)| *at < started).map(|(_, b)| b).collect();
    assert!(acknowledged_before.len() >= 200);
    assert_delivered_as_bought(&rapi, acknowledged_before.iter().copied(), "acknowledged before the backup").await;
    let audit = rapi.audit().await;
    assert_audit_ok(&audit);
    let sold = product_counts(&audit, "sale")["sold"].as_u64().unwrap() as usize;
    assert!(sold >= acknowledged_before.len() && sold < all.len(), "{sold} sold in the backup of {} in all", all.len());
}

#[tokio::test]
async fn secrets_go_in_only_sealed_and_come_back_only_with_the_passphrase() {
    let app = TestApp::spawn().await;
    let api = app.api();
    api.product_with_keys("sealed", 3, 0).await;
    buy(&api, "sealed", "alice").await;
    // What kami keeps when it generates its secrets (the file a server without
    // configured secrets writes at its first start).
    let secrets = br#"{"admin_token":"very-secret-admin-token-123"}"#;
    std::fs::write(app.data.join("secrets.json"), secrets).unwrap();

    let short = reply(
        api.admin(api.http.post(format!("{}/api/v1/admin/backup", api.url))).json(&json!({"passphrase": "short"})),
    )
    .await;
    assert_eq!((short.status, short.code()), (422, "invalid_request"), "{:?}", short.body);

    let dir = tempfile::tempdir().unwrap();
    let pass = dir.path().join("pass");
    std::fs::write(&pass, "correct horse battery staple\n").unwrap();
    let wrong = dir.path().join("wrong");
    std::fs::write(&wrong, "incorrect horse battery\n").unwrap();
    let file = dir.path().join("s.kamibak");
    let args =
        ["backup", "--url", &app.url, "--admin-token", ADMIN, "--to", path(&file), "--passphrase-file", path(&pass)];
    let (code, out) = kami_async(args.iter().map(|s| s.to_string()).collect()).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("sealed with a passphrase: secrets.json"), "{out}");
    let bytes = std::fs::read(&file).unwrap();
    assert!(!bytes.windows(14).any(|w| w == b"very-secret-ad"), "the secret is not in the clear");

    let at = |name: &str| dir.path().join(name);
    let (code, out) =
        kami(&["restore", "--from", path(&file), "--data", path(&at("w")), "--passphrase-file", path(&wrong)]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("wrong passphrase"), "{out}");
    assert!(!at("w").exists() && !at("w.restoring").exists(), "nothing left by a refused restore");

    let (code, out) = kami(&["restore", "--from", path(&file), "--data", path(&at("none"))]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("sealed secrets left out"), "{out}");
    assert!(!at("none").join("secrets.json").exists());

    let (code, out) =
        kami(&["restore", "--from", path(&file), "--data", path(&at("with")), "--passphrase-file", path(&pass)]);
    assert_eq!(code, 0, "{out}");
    let restored = at("with").join("secrets.json");
    assert_eq!(std::fs::read(&restored).unwrap(), secrets);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&restored).unwrap().permissions().mode() & 0o777, 0o600);
    }
}

#[tokio::test]
async fn a_damaged_backup_is_refused_by_verify_and_by_restore_and_nothing_is_written() {
    let app = TestApp::spawn().await;
    let api = app.api();
    api.product_with_keys("d", 50, 0).await;
    for i in 0..10 {
        buy(&api, "d", &format!("b{i}")).await;
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("good.kamibak");
    let args = ["backup", "--url", &app.url, "--admin-token", ADMIN, "--to", path(&file)];
    let (code, out) = kami_async(args.iter().map(|s| s.to_string()).collect()).await;
    assert_eq!(code, 0, "{out}");
    let good = std::fs::read(&file).unwrap();

    let damaged = |name: &str, bytes: &[u8]| -> PathBuf {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    };
    let mut flipped = good.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0x40;
    let mut trailing = good.clone();
    trailing.push(0);
    let cases = [
        ("flipped", damaged("flipped.kamibak", &flipped)),
        ("truncated", damaged("truncated.kamibak", &good[..good.len() - 10])),
        ("no end", damaged("headless.kamibak", &good[..good.len() / 3])),
        ("bytes after the end", damaged("trailing.kamibak", &trailing)),
        ("not a backup", damaged("other.kamibak", b"{\"orders\": []}")),
    ];
    for (what, p) in &cases {
        let (code, out) = kami(&["backup", "verify", path(p)]);
        assert_eq!(code, 1, "{what}: verify must refuse: {out}");
        let to = dir.path().join(format!("r-{what}"));
        let (code, out) = kami(&["restore", "--from", path(p), "--data", path(&to)]);
        assert_eq!(code, 1, "{what}: restore must refuse: {out}");
        assert!(!to.exists() && !dir.path().join(format!("r-{what}.restoring")).exists(), "{what}: nothing written");
    }

    // Never over a directory that holds something.
    let busy = dir.path().join("busy");
    std::fs::create_dir(&busy).unwrap();
    std::fs::write(busy.join("keep.txt"), "mine").unwrap();
    let (code, out) = kami(&["restore", "--from", path(&file), "--data", path(&busy)]);
    assert_eq!(code, 1);
    assert!(out.contains("not empty"), "{out}");
    assert_eq!(std::fs::read_to_string(busy.join("keep.txt")).unwrap(), "mine");
    // The good one restores into an empty directory that exists.
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    restore_and_audit(&file, &empty);
}

/// The newest archive file (full or increment) cut at or after `since_ms`: its time.
fn shipped_since(dir: &Path, since_ms: u64) -> Option<u64> {
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let stem = name.strip_suffix(".kamibak")?;
            stem.strip_prefix("inc-").or_else(|| stem.strip_prefix("full-"))?.parse::<u64>().ok()
        })
        .filter(|&ms| ms >= since_ms)
        .max()
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

/// Waits until the archive holds everything acknowledged so far; returns the time
/// of a file that does (stamped before its cut, so it holds every write
/// acknowledged before that time). If the archive shipped the last writes just
/// before this call, no later file comes by itself: each poll without one orders
/// for a new buyer (left unpaid), a change the next round must ship.
async fn archived(api: &Api, dir: &Path, product: &str) -> u64 {
    let since = now_ms();
    let nudges = std::sync::atomic::AtomicU64::new(0);
    let ok = api
        .eventually(Duration::from_secs(30), || async {
            if shipped_since(dir, since).is_some() {
                return true;
            }
            let n = nudges.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            assert_eq!(api.order(product, 1, &format!("nudge-{since}-{n}"), None).await.status, 201);
            false
        })
        .await;
    assert!(ok, "the archive shipped what was acknowledged");
    shipped_since(dir, since).unwrap()
}

fn rfc3339(ms: u64) -> String {
    chrono::DateTime::from_timestamp_millis(ms as i64).unwrap().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn continuous_archiving_restores_the_shop_as_of_a_moment_in_the_middle_of_a_sale() {
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("archive");
    let archive_str = path(&archive).to_string();
    let app = TestApp::spawn_with(&[
        ("backup.archive_dir", &archive_str),
        ("backup.archive_interval_ms", "100"),
        ("orders.archive_after_secs", "1"),
        ("payments.query_grace_secs", "0"),
    ])
    .await;
    let api = app.api();
    stocked(&api, "pitr", 300).await;

    let phase_a = buy_each(&api, "pitr", "a", 0..25).await;
    let at_a = archived(&api, &archive, "pitr").await;

    // Phase B: more sales, phase A's orders leave memory for the archive, and a
    // snapshot of every shard (whose trim must keep what is not shipped yet).
    let phase_b = buy_each(&api, "pitr", "b", 0..25).await;
    let moved = api
        .eventually(Duration::from_secs(30), || async {
            let audit = api.audit().await;
            product_counts(&audit, "pitr")["orders_archived"].as_u64().unwrap_or(0) >= 25
        })
        .await;
    assert!(moved, "phase A's orders were archived");
    snapshot(&api).await;
    let at_b = archived(&api, &archive, "pitr").await;

    let phase_c = buy_each(&api, "pitr", "c", 0..25).await;
    archived(&api, &archive, "pitr").await;
    drop(app);

    for (until, sold, kept, gone) in [
        (Some(at_a), 25, vec![&phase_a], vec![&phase_b, &phase_c]),
        (Some(at_b), 50, vec![&phase_a, &phase_b], vec![&phase_c]),
        (None, 75, vec![&phase_a, &phase_b, &phase_c], vec![]),
    ] {
        let to = dir.path().join(format!("restored-{}", until.unwrap_or(0)));
        let mut args =
            vec!["restore".to_string(), "--from".into(), archive_str.clone(), "--data".into(), path(&to).into()];
        if let Some(ms) = until {
            args.extend(["--until".to_string(), rfc3339(ms)]);
        }
        let (code, out) = kami_async(args).await;
        assert_eq!(code, 0, "restore: {out}");
        let (code, out, err) = kami_audit(&to, false);
        assert_eq!(code, 0, "audit of the restored directory: {out}{err}");
        let restored = TestApp::start_on(&to, &[]).await;
        let rapi = restored.api();
        let when = format!("{until:?}");
        assert_delivered_as_bought(&rapi, kept.iter().flat_map(|p| p.iter()), &when).await;
        assert_absent(&rapi, gone.iter().flat_map(|p| p.iter()), &when).await;
        let audit = rapi.audit().await;
        assert_audit_ok(&audit);
        assert_eq!(product_counts(&audit, "pitr")["sold"].as_u64(), Some(sold), "{until:?}");
        drop(restored);
    }
}

#[tokio::test]
async fn an_archive_keeps_its_newest_full_backups_and_the_increments_they_lead() {
    use kami::storage::backup::{Archive, Round};
    let app = TestApp::spawn().await;
    let api = app.api();
    api.product_with_keys("keep", 20, 0).await;
    let dir = tempfile::tempdir().unwrap();
    let storage = app.core().storage().clone();
    let mut a = Archive::new(dir.path().to_path_buf(), u64::MAX, 2);
    let round = |a: &mut Archive, ms: u64| storage.archive_round(a, ms).expect("round");
    assert!(matches!(round(&mut a, 1_000), Round::Full(_)));
    assert_eq!(round(&mut a, 1_500), Round::Current, "nothing new: no file");
    buy(&api, "keep", "x").await;
    let Round::Increment(increment) = round(&mut a, 2_000) else { panic!("an increment") };
    let (code, out) = kami(&["backup", "verify", path(&increment)]);
    assert_eq!(code, 0, "an increment verifies on its own: {out}");
    let (code, out) = kami(&["restore", "--from", path(&increment), "--data", path(&dir.path().join("r"))]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("an increment, not a full backup"), "{out}");
    a.full_every_ms = 0;
    assert!(matches!(round(&mut a, 3_000), Round::Full(_)));
    buy(&api, "keep", "y").await;
    assert!(matches!(round(&mut a, 4_000), Round::Full(_)));
    let mut names: Vec<String> =
        std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    assert_eq!(names, [format!("full-{:020}.kamibak", 3_000), format!("full-{:020}.kamibak", 4_000)]);
}
