//! Storage protocol: journal + snapshot recovery, torn tails, corrupt snapshots.

mod common;

use common::open_storage;

use kami::domain::shard::{NewOrder, Outcome, Payment};
use kami::domain::{Event, ProductInfo, Shard, ShardId};
use kami::storage::{Finding, Storage};

fn product() -> ProductInfo {
    ProductInfo { id: "p".into(), name: "P".into(), price_cents: 100, per_buyer_limit: 0, shards: 1, created_at_ms: 0 }
}

/// An order of one key by buyer `b{i}`.
fn one_key(i: u64) -> NewOrder {
    NewOrder {
        buyer: format!("b{i}"),
        quantity: 1,
        idempotency: None,
        query_token: "t".into(),
        ttl_ms: 60_000,
        password: None,
        coupon: None,
        reseller: None,
    }
}

/// Drives a shard through imports, orders and payments, journaling every event.
fn drive(storage: &Storage, shard: &mut Shard, from_seq: u64, orders: u64) -> u64 {
    let id = ShardId::new("p", 0);
    let journal = storage.journal(&id).unwrap();
    let mut seq = from_seq;
    let mut append = |e: &Event| {
        seq += 1;
        journal.append(seq, e).unwrap();
    };
    let (events, _, _) = shard.import_keys((0..orders).map(|i| format!("k{from_seq}-{i}")).collect());
    events.iter().for_each(&mut append);
    for i in 0..orders {
        let Outcome::Changed(e, order_seq) = shard.create_order(one_key(i), 1000 + i).unwrap() else { panic!() };
        append(&e);
        if i % 2 == 0 {
            let pay = Payment {
                order_seq,
                payment_id: format!("pay{from_seq}-{i}"),
                channel: "sandbox".into(),
                amount_cents: 100,
                status: "paid".into(),
            };
            let Outcome::Changed(e, _) = shard.pay(pay, 2000 + i).unwrap() else { panic!() };
            append(&e);
        }
    }
    seq
}

fn same_state(a: &Shard, b: &Shard) {
    assert_eq!(a.orders(), b.orders());
    assert_eq!(a.counts(), b.counts());
    let mut pa: Vec<_> = a.payments().cloned().collect();
    let mut pb: Vec<_> = b.payments().cloned().collect();
    pa.sort_by(|x, y| x.payment_id.cmp(&y.payment_id));
    pb.sort_by(|x, y| x.payment_id.cmp(&y.payment_id));
    assert_eq!(pa, pb);
    assert!(b.audit().violations.is_empty(), "{:?}", b.audit());
}

#[tokio::test]
async fn recovery_is_snapshot_plus_journal_and_trim_bounds_the_journal() {
    let dir = tempfile::tempdir().unwrap();
    let storage = open_storage(dir.path());
    let id = ShardId::new("p", 0);
    storage.insert_product(&product()).unwrap();
    let mut live = Shard::new(product(), 0);
    let seq = drive(&storage, &mut live, 0, 40);
    storage.write_snapshot(&id, seq, &live).unwrap();
    let journal = storage.journal(&id).unwrap();
    storage.ticket().unwrap().wait().await.unwrap();
    storage.trim(&id, &journal, seq).unwrap();
    assert!(journal.raw(1).unwrap().is_none(), "journal before the snapshot is trimmed");
    let seq2 = drive(&storage, &mut live, seq, 10);
    storage.ticket().unwrap().wait().await.unwrap();

    let r = storage.recover(&id, &product()).unwrap();
    assert_eq!((r.snapshot_seq, r.last_seq), (seq, seq2));
    assert_eq!(r.replayed, seq2 - seq, "only the journal after the snapshot is replayed");
    same_state(&live, &r.shard);
}

/// What a machine crash (power loss, kernel panic) can do to files written and
/// not synced: lose what was written. Every segment of `dir` keeps its first `keep` bytes.
fn lose_unsynced_writes(dir: &std::path::Path, keep: u64) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let f = std::fs::OpenOptions::new().write(true).open(entry.unwrap().path()).unwrap();
        f.set_len(keep).unwrap();
    }
}

#[tokio::test]
async fn a_machine_crash_that_loses_the_journal_files_writes_loses_no_acknowledged_record() {
    let dir = tempfile::tempdir().unwrap();
    let id = ShardId::new("p", 0);
    let mut live = Shard::new(product(), 0);
    let seq = {
        let storage = open_storage(dir.path());
        storage.insert_product(&product()).unwrap();
        let seq = drive(&storage, &mut live, 0, 30);
        // Acknowledged: a ticket taken after the appends completed.
        storage.ticket().unwrap().wait().await.unwrap();
        storage.abandon();
        seq
    };
    // Nothing was checkpointed: the journal's own file was never synced, and a
    // machine crash may leave it empty. Only the commit log was synced.
    lose_unsynced_writes(&dir.path().join("journal/stock/p/0"), 0);
    let storage = open_storage(dir.path());
    assert_eq!(storage.redone_at_open(), seq, "every record comes back from the commit log");
    let r = storage.recover(&id, &product()).unwrap();
    assert_eq!(r.last_seq, seq);
    assert!(r.findings.is_empty(), "{:?}", r.findings);
    same_state(&live, &r.shard);
    drop((r, storage));
    // A clean close checkpoints: the journal's file alone holds everything.
    let storage = open_storage(dir.path());
    assert_eq!(storage.redone_at_open(), 0);
    assert!(std::fs::read_dir(dir.path().join("journal/log")).unwrap().next().is_none(), "the log is empty");
    assert_eq!(storage.recover(&id, &product()).unwrap().last_seq, seq);
}

#[tokio::test]
async fn torn_journal_tail_is_dropped_and_older_records_survive() {
    let dir = tempfile::tempdir().unwrap();
    let storage = open_storage(dir.path());
    let id = ShardId::new("p", 0);
    let mut live = Shard::new(product(), 0);
    let seq = drive(&storage, &mut live, 0, 10);
    let journal = storage.journal(&id).unwrap();
    let last = journal.raw(seq).unwrap().unwrap();
    journal.put_raw(seq, &last[..last.len() / 2]).unwrap(); // half-written record

    let seen = storage.inspect(&id, &product()).unwrap();
    assert!(
        matches!(&seen.findings[..], [Finding::TornTail { seq: s, discarded_records: 1, .. }] if *s == seq),
        "{:?}",
        seen.findings
    );
    assert_eq!(storage.inspect(&id, &product()).unwrap().findings, seen.findings, "inspecting changes nothing");

    let r = storage.recover(&id, &product()).unwrap();
    assert_eq!(r.last_seq, seq - 1);
    assert_eq!(r.findings, seen.findings, "recovery reports what it repaired");
    assert!(journal.raw(seq).unwrap().is_none(), "the torn record is removed");
    assert!(storage.recover(&id, &product()).unwrap().findings.is_empty(), "repaired for good");
    let mut expected = Shard::new(product(), 0);
    for s in 1..seq {
        let e: Event =
            kami::storage::codec::decode(kami::storage::codec::Kind::Event, &journal.raw(s).unwrap().unwrap()).unwrap();
        expected.apply(&e);
    }
    same_state(&expected, &r.shard);
}

#[tokio::test]
async fn corrupt_snapshot_falls_back_to_the_previous_one_plus_journal() {
    let dir = tempfile::tempdir().unwrap();
    let id = ShardId::new("p", 0);
    let mut live = Shard::new(product(), 0);
    {
        let storage = open_storage(dir.path());
        let seq1 = drive(&storage, &mut live, 0, 8);
        storage.write_snapshot(&id, seq1, &live).unwrap();
        let seq2 = drive(&storage, &mut live, seq1, 8);
        // The newest snapshot is garbage (as if torn); the journal was not trimmed yet.
        let mut bad = kami::storage::codec::encode(kami::storage::codec::Kind::Snapshot, &live);
        let n = bad.len();
        bad[n - 3] ^= 0xff;
        storage.write_snapshot_raw(&id, seq2, &bad).unwrap();
        storage.flush_now().unwrap();
    }
    let storage = open_storage(dir.path());
    let r = storage.recover(&id, &product()).unwrap();
    assert!(r.snapshot_seq > 0 && r.replayed > 0);
    assert!(matches!(r.findings[0], Finding::CorruptSnapshot { seq, .. } if seq > r.snapshot_seq), "{:?}", r.findings);
    same_state(&live, &r.shard);
}

#[tokio::test]
async fn a_record_that_contradicts_the_journal_stops_recovery_instead_of_being_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let storage = open_storage(dir.path());
    let id = ShardId::new("p", 0);
    let mut live = Shard::new(product(), 0);
    let seq = drive(&storage, &mut live, 0, 4);
    // A well-formed record that replays a payment already applied: a forged or
    // misplaced record, not a torn one.
    let journal = storage.journal(&id).unwrap();
    let paid = (1..=seq)
        .map(|s| {
            kami::storage::codec::decode::<Event>(kami::storage::codec::Kind::Event, &journal.raw(s).unwrap().unwrap())
                .unwrap()
        })
        .find(|e| matches!(e, Event::PaymentApplied { .. }))
        .unwrap();
    journal.append(seq + 1, &paid).unwrap();
    let err = storage.recover(&id, &product()).err().expect("recovery refuses");
    assert!(err.to_string().contains(&format!("record {}", seq + 1)), "{err}");
}

#[tokio::test]
async fn an_interrupted_trim_is_finished_at_recovery() {
    let dir = tempfile::tempdir().unwrap();
    let storage = open_storage(dir.path());
    let id = ShardId::new("p", 0);
    let mut live = Shard::new(product(), 0);
    let seq = drive(&storage, &mut live, 0, 6);
    storage.write_snapshot(&id, seq, &live).unwrap(); // crash before the trim
    let r = storage.recover(&id, &product()).unwrap();
    assert_eq!(r.findings, vec![Finding::Untrimmed { snapshot_seq: seq, journal_records: seq, older_snapshots: 0 }]);
    assert!(storage.journal(&id).unwrap().raw(1).unwrap().is_none());
    same_state(&live, &storage.recover(&id, &product()).unwrap().shard);
}

/// A snapshot this binary cannot read (written by a newer format version, say) after
/// the journal it covers was trimmed: recovery stops and names it, and deletes
/// nothing. Falling back to an empty shard would have treated the whole journal as
/// a torn tail and removed it.
#[tokio::test]
async fn an_unreadable_snapshot_over_a_trimmed_journal_stops_recovery_and_deletes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let storage = open_storage(dir.path());
    let id = ShardId::new("p", 0);
    let mut live = Shard::new(product(), 0);
    let seq1 = drive(&storage, &mut live, 0, 6);
    storage.write_snapshot(&id, seq1, &live).unwrap();
    let journal = storage.journal(&id).unwrap();
    storage.trim(&id, &journal, seq1).unwrap();
    let at_seq1 = live.clone();
    let seq2 = drive(&storage, &mut live, seq1, 4);
    // The same snapshot as a newer kami would have written it.
    let mut newer = kami::storage::codec::encode(kami::storage::codec::Kind::Snapshot, &at_seq1);
    newer[4] = kami::storage::codec::FORMAT_VERSION + 1;
    storage.write_snapshot_raw(&id, seq1, &newer).unwrap();

    let err = storage.recover(&id, &product()).err().expect("recovery refuses");
    let text = err.to_string();
    assert!(text.contains(&format!("snapshots/{id} at {seq1}")), "{text}");
    assert!(text.contains("unsupported format version"), "{text}");
    for s in seq1 + 1..=seq2 {
        assert!(journal.raw(s).unwrap().is_some(), "journal record {s} was deleted");
    }
    // With the snapshot readable again, the shard comes back whole.
    storage.write_snapshot(&id, seq1, &at_seq1).unwrap();
    let r = storage.recover(&id, &product()).unwrap();
    assert_eq!(r.last_seq, seq2);
    same_state(&live, &r.shard);
}

/// A data directory written when journals were sled trees (`journal/{product}/{shard}`
/// and `points/{shard}`, key = big-endian sequence, value = the record) opens with
/// every record: the trees are moved into segment files once, then dropped.
#[tokio::test]
async fn journals_kept_in_sled_trees_move_into_segment_files_once() {
    use kami::domain::points::{PointsBook, PointsEvent};
    use kami::storage::codec::{encode, Kind};
    let dir = tempfile::tempdir().unwrap();
    let id = ShardId::new("p", 0);
    let mut live = Shard::new(product(), 0);
    let mut book = PointsBook::new();
    let mut seq = 0u64;
    {
        // The old layout, written as the sled-tree journal wrote it.
        let db = raw_sled(dir.path());
        let products = db.open_tree("products").unwrap();
        products.insert("p", encode(Kind::Product, &product())).unwrap();
        let tree = db.open_tree("journal/p/0").unwrap();
        let (events, _, _) = live.import_keys((0..6).map(|i| format!("k{i}")).collect());
        let mut all = events;
        for i in 0..3 {
            let Outcome::Changed(e, _) = live.create_order(one_key(i), 1000).unwrap() else { panic!() };
            all.push(e);
        }
        for e in &all {
            seq += 1;
            tree.insert(seq.to_be_bytes(), encode(Kind::Event, e)).unwrap();
        }
        let points = db.open_tree("points/3").unwrap();
        let kami::domain::Outcome::Changed(credit, _) = book.adjust("grant-1", "alice", 50, "welcome", 5).unwrap()
        else {
            panic!("a new grant changes the book")
        };
        let credit: PointsEvent = credit;
        points.insert(1u64.to_be_bytes(), encode(Kind::Event, &credit)).unwrap();
        db.flush().unwrap();
    }
    wait_released(dir.path());
    for round in 0..2 {
        let storage = open_storage(dir.path());
        let r = storage.recover(&id, &product()).unwrap();
        assert!(r.findings.is_empty(), "{:?}", r.findings);
        assert_eq!(r.last_seq, seq + round, "round {round}");
        same_state(&live, &r.shard);
        let p = storage.recover_ledger::<kami::domain::points::PointsBook>(3).unwrap();
        assert_eq!(p.book.balance("alice"), book.balance("alice"));
        assert!(dir.path().join("journal/stock/p/0/00000000000000000001.log").exists());
        // Appends go on after the moved records.
        if round == 0 {
            let (events, _, _) = live.import_keys(vec!["late".into()]);
            r.journal.append(seq + 1, &events[0]).unwrap();
            storage.ticket().unwrap().wait().await.unwrap();
            live = storage.recover(&id, &product()).unwrap().shard;
        }
    }
    let db_trees: Vec<String> = {
        let db = raw_sled(dir.path());
        db.tree_names().iter().map(|n| String::from_utf8_lossy(n).into_owned()).collect()
    };
    assert!(!db_trees.iter().any(|n| n.starts_with("journal/") || n.starts_with("points/")), "{db_trees:?}");
}

/// The stock snapshot trees of a snapshot database (`snapshot-db/`): one sled tree
/// per snapshot, named `{product}/{shard}` NUL sequence (BE), its one value under
/// `shard`; as (name, value).
fn snapshot_trees(db: &sled::Db) -> Vec<(sled::IVec, sled::IVec)> {
    db.tree_names()
        .into_iter()
        .filter(|n| n.len() > 9 && n[n.len() - 9] == 0)
        .map(|n| {
            let v = db.open_tree(&n).unwrap().get(b"shard").unwrap().expect("a snapshot tree holds its snapshot");
            (n, v)
        })
        .collect()
}

/// Data directories from before each stock snapshot had a sled tree of its own
/// kept them all in one `snapshots` tree: first in the main database, then in the
/// snapshot database (`snapshot-db/`). Either opens from that snapshot (its journal
/// trimmed through it), and the old tree is moved once into a tree per snapshot.
#[tokio::test]
async fn snapshots_kept_in_one_tree_move_into_a_tree_each_once() {
    for in_main_database in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let id = ShardId::new("p", 0);
        let mut live = Shard::new(product(), 0);
        let snapshot_seq;
        {
            let storage = open_storage(dir.path());
            snapshot_seq = drive(&storage, &mut live, 0, 6);
            storage.write_snapshot(&id, snapshot_seq, &live).unwrap();
            let journal = storage.journal(&id).unwrap();
            journal.roll().unwrap();
            storage.ticket().unwrap().wait().await.unwrap();
            storage.trim(&id, &journal, snapshot_seq).unwrap();
            storage.flush_now().unwrap();
        }
        let snapshot_db = dir.path().join("snapshot-db");
        {
            // The old layout: every snapshot in one `snapshots` tree.
            let entries = snapshot_trees(&raw_sled(&snapshot_db));
            assert_eq!(entries.len(), 1);
            std::fs::remove_dir_all(&snapshot_db).unwrap();
            let db = raw_sled(if in_main_database { dir.path() } else { &snapshot_db });
            let old = db.open_tree("snapshots").unwrap();
            for (k, v) in entries {
                old.insert(k, v).unwrap();
            }
            db.flush().unwrap();
        }
        wait_released(dir.path());
        wait_released(&snapshot_db);
        for round in 0..2 {
            let storage = open_storage(dir.path());
            let r = storage.recover(&id, &product()).unwrap();
            assert!(r.findings.is_empty(), "round {round}: {:?}", r.findings);
            assert_eq!(r.last_seq, snapshot_seq, "round {round}");
            assert_eq!(r.replayed, 0, "round {round}: the journal before the snapshot is trimmed");
            same_state(&live, &r.shard);
        }
        for db in [raw_sled(dir.path()), raw_sled(&snapshot_db)] {
            assert!(!db.tree_names().iter().any(|n| n.as_ref() == b"snapshots"), "the old tree is dropped");
        }
        let moved = snapshot_trees(&raw_sled(&snapshot_db));
        assert_eq!(moved.len(), 1, "in the main database: {in_main_database}");
        assert!(moved[0].0.ends_with(&snapshot_seq.to_be_bytes()));
    }
}

/// Drives shard `p/0` in `dir`, snapshots it, drives it further and (if
/// `snapshot_again`) snapshots it again; returns the state and the two records.
fn snapshot_then_more(dir: &std::path::Path, snapshot_again: bool) -> (Shard, u64, u64) {
    let id = ShardId::new("p", 0);
    let mut live = Shard::new(product(), 0);
    let storage = open_storage(dir);
    let first = drive(&storage, &mut live, 0, 4);
    storage.write_snapshot(&id, first, &live).unwrap();
    let end = drive(&storage, &mut live, first, 4);
    if snapshot_again {
        storage.write_snapshot(&id, end, &live).unwrap();
    }
    storage.flush_now().unwrap();
    (live, first, end)
}

/// Each snapshot is a sled tree of its own, and a trim drops the older ones'
/// trees: nothing of an old snapshot stays in the snapshot database.
#[tokio::test]
async fn a_trim_drops_the_trees_of_older_snapshots() {
    let dir = tempfile::tempdir().unwrap();
    let id = ShardId::new("p", 0);
    let (_, _, second) = snapshot_then_more(dir.path(), true);
    let snapshot_db = dir.path().join("snapshot-db");
    let names = |db: &sled::Db| snapshot_trees(db).into_iter().map(|(n, _)| n).collect::<Vec<_>>();
    let before = names(&raw_sled(&snapshot_db));
    assert_eq!(before.len(), 2, "one tree per snapshot");
    wait_released(&snapshot_db);
    {
        let storage = open_storage(dir.path());
        let journal = storage.journal(&id).unwrap();
        storage.trim(&id, &journal, second).unwrap();
    }
    let after = names(&raw_sled(&snapshot_db));
    assert_eq!(after, vec![before[1].clone()], "only the newest snapshot's tree is left");
    assert!(after[0].ends_with(&second.to_be_bytes()));
}

/// A crash after a snapshot's tree was made but before its snapshot was written
/// leaves an empty tree: recovery passes over it to the snapshot before.
#[tokio::test]
async fn an_empty_snapshot_tree_left_by_a_crash_holds_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let id = ShardId::new("p", 0);
    let (live, first, end) = snapshot_then_more(dir.path(), false);
    let snapshot_db = dir.path().join("snapshot-db");
    {
        let db = raw_sled(&snapshot_db);
        let mut name = b"p/0\0".to_vec();
        name.extend_from_slice(&end.to_be_bytes());
        db.open_tree(name).unwrap();
        db.flush().unwrap();
    }
    wait_released(&snapshot_db);
    let storage = open_storage(dir.path());
    let r = storage.recover(&id, &product()).unwrap();
    assert!(r.findings.is_empty(), "{:?}", r.findings);
    assert_eq!((r.snapshot_seq, r.last_seq), (first, end));
    same_state(&live, &r.shard);
}

/// Opens a data directory's sled database directly, as an older kami left it,
/// once this test's previous handle has let go of it ([`wait_released`]).
fn raw_sled(path: &std::path::Path) -> sled::Db {
    wait_released(path);
    sled::open(path).unwrap()
}

/// Waits (at most 10 s) until no handle holds the sled locks of `path`: a dropped
/// handle keeps sled's file lock until its I/O threads finish, and storage waits
/// only for handles it opened itself, not for a [`raw_sled`] one.
fn wait_released(path: &std::path::Path) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !kami::storage::Storage::lock_released(path) {
        assert!(std::time::Instant::now() < deadline, "sled's lock on {} never released", path.display());
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// The commit thread's busy linger (`storage.commit_busy_linger_us`): a ticket that
/// comes right after a flush waits that long for more writers before the next flush.
/// Only a lower bound is asserted (a busy machine makes waits longer, never shorter);
/// a ticket that reaches the commit thread after the linger has passed (a stalled
/// test thread) rightly flushes at once, so a few tries are allowed.
#[tokio::test]
async fn a_ticket_right_after_a_flush_waits_the_busy_linger_for_more_writers() {
    let dir = tempfile::tempdir().unwrap();
    let busy_linger = std::time::Duration::from_millis(300);
    let options =
        kami::storage::StorageOptions { commit_busy_linger: busy_linger, ..common::storage_options(dir.path()) };
    let storage = Storage::open(&options).unwrap();
    let mut waits = Vec::new();
    for _ in 0..5 {
        storage.ticket().unwrap().wait().await.unwrap(); // a flush ends now
        let asked = std::time::Instant::now();
        storage.ticket().unwrap().wait().await.unwrap();
        waits.push(asked.elapsed());
        if asked.elapsed() >= busy_linger * 8 / 10 {
            return;
        }
    }
    panic!("no ticket right after a flush waited the busy linger of {busy_linger:?}: {waits:?}");
}
