//! Start-up recovery time against history size. For N orders (each created and
//! paid: two journal records) on one shard, measures `Storage::recover`:
//! * journal only (no snapshot ever taken): replays all 2N records;
//! * snapshot at the end: decodes the snapshot, replays nothing;
//! * snapshot, then 10,000 more orders: decodes the snapshot, replays 20,000 records.
//!
//! `cargo bench --bench recovery` runs N = 100,000 and 1,000,000 (ORDERS= to
//! override, comma separated). Under `cargo test --all-targets` it runs a small
//! smoke version.

use std::time::{Duration, Instant};

use kami::domain::shard::{NewOrder, Outcome, Payment};
use kami::domain::{Event, ProductInfo, Shard, ShardId};
use kami::storage::{Storage, StorageOptions};

fn product() -> ProductInfo {
    ProductInfo { id: "p".into(), name: "P".into(), price_cents: 990, per_buyer_limit: 0, shards: 1, created_at_ms: 0 }
}

fn open(path: &std::path::Path) -> std::sync::Arc<Storage> {
    Storage::open(&StorageOptions {
        path: path.to_path_buf(),
        cache_capacity_bytes: 1 << 30,
        max_pending_commits: 16,
        max_commit_batch: 16,
        commit_linger: Duration::ZERO,
        commit_busy_linger: Duration::ZERO,
    })
    .expect("open storage")
}

/// Journals `orders` purchases (keys imported first) after `seq`; returns the last seq.
fn sell(storage: &Storage, shard: &mut Shard, seq: u64, orders: u64, tag: &str) -> u64 {
    let journal = storage.journal(&ShardId::new("p", 0)).unwrap();
    let mut seq = seq;
    let mut append = |e: &Event| {
        seq += 1;
        journal.append(seq, e).unwrap();
    };
    let (events, _, _) = shard.import_keys((0..orders).map(|i| format!("{tag}-KEY-{i:010}")).collect());
    events.iter().for_each(&mut append);
    for i in 0..orders {
        let new = NewOrder {
            buyer: format!("{tag}-buyer{i}@example.com"),
            quantity: 1,
            idempotency: None,
            query_token: format!("{:032x}", i),
            ttl_ms: 300_000,
            password: None,
            coupon: None,
            reseller: None,
        };
        let Outcome::Changed(created, order_seq) = shard.create_order(new, 1_000 + i).unwrap() else { unreachable!() };
        append(&created);
        let pay = Payment {
            order_seq,
            payment_id: format!("{tag}-pay-{i}"),
            channel: "sandbox".into(),
            amount_cents: 990,
            status: "paid".into(),
        };
        let Outcome::Changed(paid, _) = shard.pay(pay, 2_000 + i).unwrap() else { unreachable!() };
        append(&paid);
        if i % 100_000 == 99_999 {
            // A journal holds a bounded amount of pending records: sync now and then.
            storage.flush_now().unwrap();
        }
    }
    storage.flush_now().unwrap();
    seq
}

/// Best of three recoveries (the first also warms the page cache).
fn time_recovery(storage: &Storage) -> (Duration, u64) {
    let id = ShardId::new("p", 0);
    (0..3)
        .map(|_| {
            let started = Instant::now();
            let r = storage.recover(&id, &product()).unwrap();
            (started.elapsed(), r.replayed)
        })
        .min()
        .unwrap()
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let sizes: Vec<u64> = match std::env::var("ORDERS") {
        Ok(list) => list.split(',').map(|n| n.trim().parse().expect("ORDERS: numbers")).collect(),
        Err(_) if full => vec![100_000, 1_000_000],
        Err(_) => vec![2_000],
    };
    let tail = if full { 10_000 } else { 200 };
    println!("{:>10} | {:>22} | {:>22} | {:>30}", "orders", "journal only", "snapshot", "snapshot + tail");
    for n in sizes {
        let dir = tempfile::tempdir().unwrap();
        let storage = open(dir.path());
        let mut shard = Shard::new(product(), 0);
        let seq = sell(&storage, &mut shard, 0, n, "a");
        let (journal_only, replayed_all) = time_recovery(&storage);

        let bytes = storage.write_snapshot(&ShardId::new("p", 0), seq, &shard).unwrap();
        storage.flush_now().unwrap();
        let (snapshot_only, replayed_none) = time_recovery(&storage); // also trims the journal
        assert_eq!(replayed_none, 0);

        let last = sell(&storage, &mut shard, seq, tail, "b");
        let (with_tail, replayed_tail) = time_recovery(&storage);
        assert_eq!(replayed_tail, last - seq);
        println!(
            "{n:>10} | {:>9.1} ms {:>8} rec | {:>9.1} ms {:>6.1} MiB | {:>9.1} ms {:>6} rec replayed",
            journal_only.as_secs_f64() * 1e3,
            replayed_all,
            snapshot_only.as_secs_f64() * 1e3,
            bytes as f64 / (1 << 20) as f64,
            with_tail.as_secs_f64() * 1e3,
            replayed_tail
        );
    }
}
