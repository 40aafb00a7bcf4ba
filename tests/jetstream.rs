//! The replicated journal backend against a real `nats-server` on loopback
//! (`scripts/test.sh` installs it): what the stream acknowledged is read back by
//! the next writer, a stale writer is fenced, purges keep the fence, and
//! acknowledged records survive the server's kill -9 (and, with three servers,
//! the loss of any one); leases on shards are held by one node at a time and end
//! on the holder's clock before anyone else may take them.

mod common;

use common::nats::{nats_or_skip, Nats};

use std::collections::{BTreeMap, BTreeSet};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kami::cluster::lease::{LeaseError, Leases};
use kami::cluster::node::{Node, NodeOptions, Owned};
use kami::cluster::placement;
use kami::storage::codec::{self, Kind};
use kami::storage::jetstream::{JetStream, StreamJournal};
use kami::storage::StorageError;

/// Opens `journal` and returns its records after `after`, decoded.
async fn read(js: &JetStream, journal: &str, after: u64) -> (StreamJournal, Vec<(u64, String)>) {
    let mut records = Vec::new();
    let log = js
        .open(journal, after, |seq, record| {
            records.push((seq, codec::decode::<String>(Kind::Event, record).expect("a record decodes")));
            Ok(())
        })
        .await
        .expect("open");
    (log, records)
}

fn events(range: std::ops::RangeInclusive<u64>, tag: &str) -> Vec<String> {
    range.map(|i| format!("{tag}-{i}")).collect()
}

async fn append(log: &StreamJournal, first: u64, events: &[String]) -> Result<(), StorageError> {
    log.append_all(first, events)?;
    log.ticket()?.wait().await
}

#[tokio::test(flavor = "current_thread")]
async fn acknowledged_records_are_read_back_in_order_by_the_next_writer() {
    let Some(bin) = nats_or_skip() else { return };
    let nats = Nats::start(bin, None);
    let js = nats.connect().await;

    let (log, records) = read(&js, "stock.1.0", 0).await;
    assert!(records.is_empty());
    assert_eq!(log.last_seq(), 0);
    append(&log, 1, &events(1..=3, "a")).await.unwrap();
    append(&log, 4, &events(4..=4, "a")).await.unwrap();
    assert_eq!(log.durable_seq(), 4);
    // Another journal of the same stream is a history of its own.
    let (other, _) = read(&js, "stock.1.1", 0).await;
    append(&other, 1, &events(1..=2, "b")).await.unwrap();
    drop(log);

    let (log, records) = read(&js, "stock.1.0", 0).await;
    assert_eq!(records, (1..=4).map(|i| (i, format!("a-{i}"))).collect::<Vec<_>>());
    assert_eq!(log.last_seq(), 4);
    // `after` skips what a snapshot covers.
    let (_, tail) = read(&js, "stock.1.0", 2).await;
    assert_eq!(tail.iter().map(|r| r.0).collect::<Vec<_>>(), vec![3, 4]);
    // The next writer goes on where the history ends, and only there.
    assert!(matches!(log.append_all(6, &events(6..=6, "a")), Err(StorageError::Corrupt { .. })));
    append(&log, 5, &events(5..=5, "a")).await.unwrap();
}

#[tokio::test(flavor = "current_thread")]
async fn appends_made_while_nothing_is_published_share_one_message() {
    let Some(bin) = nats_or_skip() else { return };
    let nats = Nats::start(bin, None);
    let js = nats.connect().await;
    let (log, _) = read(&js, "stock.2.0", 0).await;

    // On this one-thread runtime the journal's task cannot run before we wait: every
    // append and ticket below is taken before the first publish.
    let mut tickets = Vec::new();
    for seq in 1..=500u64 {
        log.append_all(seq, &[format!("e-{seq}")]).unwrap();
        tickets.push(log.ticket().unwrap());
    }
    for t in tickets {
        t.wait().await.unwrap();
    }
    assert_eq!(log.messages_published(), 1, "500 appends in one group commit");
    let (_, records) = read(&js, "stock.2.0", 0).await;
    assert_eq!(records.len(), 500);
}

#[tokio::test(flavor = "current_thread")]
async fn a_group_larger_than_max_payload_goes_as_several_messages_and_one_huge_record_is_refused() {
    let Some(bin) = nats_or_skip() else { return };
    let nats = Nats::start(bin, Some(64 * 1024));
    let js = nats.connect().await;
    let (log, _) = read(&js, "stock.3.0", 0).await;

    let big: Vec<String> = (1..=20).map(|i| format!("{i}-{}", "x".repeat(10_000))).collect();
    append(&log, 1, &big).await.unwrap();
    assert!(log.messages_published() >= 4, "200 kB in messages of at most 64 kB: {}", log.messages_published());
    let (log, records) = read(&js, "stock.3.0", 0).await;
    assert_eq!(records.iter().map(|r| r.1.clone()).collect::<Vec<_>>(), big);

    let huge = vec!["y".repeat(100_000)];
    let refused = log.append_all(21, &huge);
    assert!(matches!(refused, Err(StorageError::Remote(ref m)) if m.contains("max_payload")), "{refused:?}");
    // Nothing of it stays pending: the journal goes on.
    append(&log, 21, &events(21..=21, "small")).await.unwrap();
}

#[tokio::test(flavor = "current_thread")]
async fn a_stale_writer_is_fenced_and_its_records_never_appear() {
    let Some(bin) = nats_or_skip() else { return };
    let nats = Nats::start(bin, None);
    let js = nats.connect().await;
    let (old, _) = read(&js, "stock.4.0", 0).await;
    append(&old, 1, &events(1..=3, "old")).await.unwrap();

    // A new owner takes the shard over: it reads the history and extends it.
    let (new, records) = read(&js, "stock.4.0", 0).await;
    assert_eq!(records.len(), 3);
    append(&new, 4, &events(4..=4, "new")).await.unwrap();

    // The old owner does not know; its next append is refused by the stream.
    let stale = append(&old, 4, &events(4..=5, "old")).await;
    assert!(matches!(stale, Err(StorageError::Fenced(_))), "{stale:?}");
    assert!(matches!(old.failed(), Some(StorageError::Fenced(_))));
    assert!(matches!(old.append_all(6, &events(6..=6, "old")), Err(StorageError::Fenced(_))));
    assert!(old.ticket().is_err());
    // The new owner goes on as if the old one never tried.
    append(&new, 5, &events(5..=5, "new")).await.unwrap();

    let (_, records) = read(&js, "stock.4.0", 0).await;
    let tags: Vec<String> = records.into_iter().map(|r| r.1).collect();
    assert_eq!(tags, vec!["old-1", "old-2", "old-3", "new-4", "new-5"]);
}

#[tokio::test(flavor = "current_thread")]
async fn two_writers_that_opened_the_same_history_cannot_both_extend_it() {
    let Some(bin) = nats_or_skip() else { return };
    let nats = Nats::start(bin, None);
    let js = nats.connect().await;
    // Both open an empty journal (the fence is "no message yet").
    let (a, _) = read(&js, "stock.5.0", 0).await;
    let (b, _) = read(&js, "stock.5.0", 0).await;
    append(&a, 1, &events(1..=1, "a")).await.unwrap();
    let second = append(&b, 1, &events(1..=1, "b")).await;
    assert!(matches!(second, Err(StorageError::Fenced(_))), "{second:?}");
    let (_, records) = read(&js, "stock.5.0", 0).await;
    assert_eq!(records, vec![(1, "a-1".to_string())]);
}

#[tokio::test(flavor = "current_thread")]
async fn a_purge_removes_what_a_snapshot_covers_and_keeps_the_fence() {
    let Some(bin) = nats_or_skip() else { return };
    let nats = Nats::start(bin, None);
    let js = nats.connect().await;
    let (log, _) = read(&js, "stock.6.0", 0).await;
    // Ten messages of three records each: records 1..=30.
    for m in 0..10u64 {
        append(&log, m * 3 + 1, &events(m * 3 + 1..=m * 3 + 3, "r")).await.unwrap();
    }
    assert_eq!(log.purge_through(0).await.unwrap(), 0);
    // Records through 10 are in a snapshot: messages 1–3 (records 1–9) go; the one
    // holding 10–12 stays.
    assert_eq!(log.purge_through(10).await.unwrap(), 3);
    let (_, records) = read(&js, "stock.6.0", 0).await;
    assert_eq!(records.first().map(|r| r.0), Some(10));
    assert_eq!(records.len(), 21);
    let (_, tail) = read(&js, "stock.6.0", 10).await;
    assert_eq!(tail.first().map(|r| r.0), Some(11));

    // Everything covered: all but the last message go, and the writer is not fenced by its own purge.
    assert_eq!(log.purge_through(30).await.unwrap(), 6);
    append(&log, 31, &events(31..=31, "r")).await.unwrap();
    let (_, records) = read(&js, "stock.6.0", 30).await;
    assert_eq!(records, vec![(31, "r-31".to_string())]);
}

#[tokio::test(flavor = "current_thread")]
async fn acknowledged_records_survive_kill_9_of_the_server() {
    let Some(bin) = nats_or_skip() else { return };
    let mut nats = Nats::start(bin, None);
    {
        let js = nats.connect().await;
        let (log, _) = read(&js, "stock.7.0", 0).await;
        for seq in 1..=50u64 {
            append(&log, seq, &events(seq..=seq, "k")).await.unwrap();
        }
    }
    nats.kill(0);
    assert!(nats.store(0).exists());
    nats.restart(0);
    let js = nats.connect().await;
    let (log, records) = read(&js, "stock.7.0", 0).await;
    assert_eq!(records, (1..=50).map(|i| (i, format!("k-{i}"))).collect::<Vec<_>>());
    append(&log, 51, &events(51..=51, "k")).await.unwrap();
}

#[tokio::test(flavor = "current_thread")]
async fn a_publish_never_acknowledged_fails_its_ticket_and_stops_the_journal_until_reopened() {
    let Some(bin) = nats_or_skip() else { return };
    let mut nats = Nats::start(bin, None);
    let js = nats.connect().await;
    let (log, _) = read(&js, "stock.8.0", 0).await;
    append(&log, 1, &events(1..=3, "k")).await.unwrap();

    nats.kill(0);
    let lost = append(&log, 4, &events(4..=4, "k")).await;
    assert!(matches!(lost, Err(StorageError::Remote(_))), "{lost:?}");
    assert!(log.failed().is_some());
    assert!(log.append_all(5, &events(5..=5, "k")).is_err(), "nothing is appended after an unknown outcome");

    nats.restart(0);
    let js = nats.connect().await;
    let (log, records) = read(&js, "stock.8.0", 0).await;
    // Whatever the stream holds is a history: the acknowledged records, maybe the
    // unacknowledged one (it was never reported durable), nothing else.
    let seqs: Vec<u64> = records.iter().map(|r| r.0).collect();
    assert!(seqs == vec![1, 2, 3] || seqs == vec![1, 2, 3, 4], "{seqs:?}");
    let next = log.last_seq() + 1;
    append(&log, next, &events(next..=next, "k")).await.unwrap();
}

/// Reopens `journal` until it accepts an append (a new stream leader may take a few
/// seconds to be elected), as an actor's supervisor does after a failed journal.
/// Returns the journal, the history it read back and the record it wrote; every
/// attempt's record is tagged so that an unacknowledged one that landed is told
/// apart.
async fn reopen_and_write(
    js: &JetStream,
    journal: &str,
    tag: &str,
) -> (StreamJournal, Vec<(u64, String)>, (u64, String)) {
    let deadline = Instant::now() + Duration::from_secs(60);
    for attempt in 0.. {
        let mut records = Vec::new();
        let opened = js
            .open(journal, 0, |seq, record| {
                records.push((seq, codec::decode::<String>(Kind::Event, record).expect("a record decodes")));
                Ok(())
            })
            .await;
        if let Ok(log) = opened {
            let written = (log.last_seq() + 1, format!("{tag}-{attempt}"));
            if append(&log, written.0, std::slice::from_ref(&written.1)).await.is_ok() {
                return (log, records, written);
            }
        }
        assert!(Instant::now() < deadline, "{journal} never took a write again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    unreachable!()
}

#[tokio::test(flavor = "current_thread")]
async fn with_three_servers_acknowledged_records_survive_losing_any_one_and_writes_go_on() {
    let Some(bin) = nats_or_skip() else { return };
    let mut nats = Nats::start_n(bin, 3, None);
    let js = nats.connect().await;
    let journal = "stock.9.0";
    let (log, _) = read(&js, journal, 0).await;
    let mut acknowledged: Vec<(u64, String)> = Vec::new();
    for seq in 1..=20u64 {
        let e = format!("first-{seq}");
        append(&log, seq, std::slice::from_ref(&e)).await.unwrap();
        acknowledged.push((seq, e));
    }
    drop(log);

    // kill -9 the stream's leader: the two others elect a new one and keep every
    // acknowledged record.
    let leader = nats.settled("KAMITEST", &[0, 1, 2], true).await;
    nats.kill(leader);
    let live: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
    let (log, history, written) = reopen_and_write(&js, journal, "after-kill").await;
    for a in &acknowledged {
        assert!(history.contains(a), "acknowledged record {a:?} lost with server n{leader}");
    }
    let mut seq = written.0;
    acknowledged.push(written);
    for _ in 0..20 {
        seq += 1;
        let e = format!("second-{seq}");
        append(&log, seq, std::slice::from_ref(&e)).await.unwrap();
        acknowledged.push((seq, e));
    }
    drop(log);

    // The killed server comes back and catches up; then another one dies, and the
    // history is still whole (the restarted server now holds its share).
    nats.restart(leader);
    nats.settled("KAMITEST", &[0, 1, 2], true).await;
    let other = live[0];
    nats.kill(other);
    let (_, history, _) = reopen_and_write(&js, journal, "after-second-kill").await;
    for a in &acknowledged {
        assert!(history.contains(a), "acknowledged record {a:?} lost after n{other} died");
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_lease_is_held_by_one_node_at_a_time_and_a_release_hands_it_over_at_once() {
    let Some(bin) = nats_or_skip() else { return };
    let nats = Nats::start(bin, None);
    let js = nats.connect().await;
    let a = Leases::open(&js, "OWNERS", "a", Duration::from_secs(30)).await.unwrap();
    let b = Leases::open(&js, "OWNERS", "b", Duration::from_secs(30)).await.unwrap();

    let mut lease = a.acquire("stock.1.0").await.unwrap();
    assert!(lease.is_valid());
    assert_eq!(b.acquire("stock.1.0").await.unwrap_err(), LeaseError::Held("a".into()));
    let first = lease.revision();
    a.renew(&mut lease).await.unwrap();
    assert!(lease.revision() > first);
    assert_eq!(b.holder("stock.1.0").await.unwrap().as_deref(), Some("a"));
    // Another shard is another lease.
    let other = b.acquire("stock.1.1").await.unwrap();

    let stale = lease.clone();
    a.release(lease).await.unwrap();
    assert_eq!(b.holder("stock.1.0").await.unwrap(), None);
    let taken = b.acquire("stock.1.0").await.unwrap();
    // The old holder's copy of the lease renews nothing any more.
    let mut stale = stale;
    assert_eq!(a.renew(&mut stale).await.unwrap_err(), LeaseError::Lost);
    assert!(!stale.is_valid());
    assert_eq!(a.held().await.unwrap(), vec!["stock.1.0".to_string(), "stock.1.1".to_string()]);
    drop((taken, other));
}

mod catalogue {
    use futures::StreamExt;
    use kami::cluster::catalogue::{Catalogue, CatalogueError, Change, ProductEntry};
    use kami::domain::shelf::Shelf;
    use kami::domain::terms::Terms;
    use kami::domain::ProductInfo;

    use super::*;

    fn entry(id: &str, price_cents: u64) -> ProductEntry {
        let product = ProductInfo {
            id: id.into(),
            name: id.to_uppercase(),
            price_cents,
            per_buyer_limit: 0,
            shards: 2,
            created_at_ms: 1,
        };
        let terms = Some(Terms { name: product.name.clone(), price_cents, ..Terms::default() });
        ProductEntry {
            product,
            terms,
            shelf: Shelf::OnSale,
            shelf_since_ms: 1,
            points_price: None,
            key_mode: Default::default(),
            deals: Vec::new(),
        }
    }

    /// Two nodes on one catalogue: a product created on one is seen by the other's
    /// watch, and by a watch opened after it was created; one id is created once; changes made at once on both nodes are both
    /// kept; an entry that does not decode is reported, never applied.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nodes_share_one_catalogue_and_concurrent_changes_are_never_lost() {
        let Some(bin) = nats_or_skip() else { return };
        let nats = Nats::start(bin, None);
        let (a, b) = (nats.connect().await, nats.connect().await);
        let (a, b) = (Catalogue::open(&a, "CATALOGUE").await.unwrap(), Catalogue::open(&b, "CATALOGUE").await.unwrap());
        let mut watched = Box::pin(b.watch().await.unwrap());

        a.create(&entry("hot", 990)).await.unwrap();
        assert_eq!(b.create(&entry("hot", 1)).await, Err(CatalogueError::Exists("hot".into())));
        let Some(Ok(Change::Put(seen, _))) = watched.next().await else { panic!("the watch sees the new product") };
        assert_eq!(*seen, entry("hot", 990), "as node a wrote it");
        // A watch opened later starts with what was there before it (a node that
        // starts watching just after a product was made still learns of it).
        let mut late = Box::pin(a.watch().await.unwrap());
        let first = tokio::time::timeout(Duration::from_secs(10), late.next()).await;
        let Ok(Some(Ok(Change::Put(early, _)))) = first else { panic!("a later watch starts with every entry") };
        assert_eq!(*early, entry("hot", 990));
        drop(late);

        // Node a retires the product while node b changes its price, 20 times each,
        // interleaved: every change lands.
        let retire = async {
            for i in 0..20u64 {
                a.update("hot", |e| {
                    e.shelf_since_ms = i;
                    Ok::<_, ()>(())
                })
                .await
                .unwrap()
                .unwrap();
            }
        };
        let reprice = async {
            for i in 0..20u64 {
                b.update("hot", |e| {
                    e.terms.as_mut().unwrap().price_cents = 1_000 + i;
                    Ok::<_, ()>(())
                })
                .await
                .unwrap()
                .unwrap();
            }
        };
        tokio::join!(retire, reprice);
        let (now, _) = a.get("hot").await.unwrap().unwrap();
        assert_eq!(
            (now.shelf_since_ms, now.terms.as_ref().unwrap().price_cents),
            (19, 1_019),
            "both nodes' last changes"
        );
        // A change refused by its own check writes nothing.
        let refused = a.update("hot", |_| Err("no")).await.unwrap();
        assert_eq!(refused, Err("no"));
        assert_eq!(a.get("hot").await.unwrap().unwrap().0, now);
        assert_eq!(a.update("cold", |_| Ok::<_, ()>(())).await, Err(CatalogueError::Unknown("cold".into())));

        // The watch saw the changes in order, ending with the entry as it is now.
        let mut last = None;
        while last.as_ref() != Some(&now) {
            let Some(Ok(Change::Put(e, _))) = watched.next().await else { panic!("a change") };
            last = Some(*e);
        }

        b.create(&entry("cold", 5)).await.unwrap();
        let listed: Vec<String> = a.entries().await.unwrap().into_iter().map(|e| e.product.id).collect();
        assert_eq!(listed, ["cold", "hot"]);

        a.put_raw("broken", b"{not json".to_vec()).await.unwrap();
        assert!(matches!(a.get("broken").await, Err(CatalogueError::Malformed { .. })));
        loop {
            match watched.next().await {
                Some(Err(CatalogueError::Malformed { key, .. })) => break assert_eq!(key, "broken"),
                Some(Ok(_)) => continue,
                other => panic!("the malformed entry is reported: {other:?}"),
            }
        }
    }
}

/// A write stored by the servers whose answer never came back (the bucket's leader
/// died after storing it) leaves the holder a revision behind its own entry: the
/// next renewal adopts it instead of taking it for another node's (which would stop
/// a server that still holds its lease).
#[tokio::test(flavor = "current_thread")]
async fn a_lease_write_whose_answer_was_lost_is_adopted_not_taken_for_another_nodes() {
    let Some(bin) = nats_or_skip() else { return };
    let nats = Nats::start(bin, None);
    let js = nats.connect().await;
    let ttl = Duration::from_secs(30);
    let a = Leases::open(&js, "ADOPT", "a", ttl).await.unwrap();
    // The same node's writes, seen through another handle: what `a` sent and the
    // servers stored, without `a` hearing back.
    let unanswered = Leases::open(&js, "ADOPT", "a", ttl).await.unwrap();
    let b = Leases::open(&js, "ADOPT", "b", ttl).await.unwrap();

    let mut lease = a.acquire("stock.3.0").await.unwrap();
    let mut stored = lease.clone();
    unanswered.renew(&mut stored).await.unwrap();
    assert!(stored.revision() > lease.revision());
    a.renew(&mut lease).await.unwrap();
    assert!(lease.revision() > stored.revision() && lease.is_valid());
    assert_eq!(b.acquire("stock.3.0").await.unwrap_err(), LeaseError::Held("a".into()));

    // An acquire whose create was stored unanswered: the retry finds the node's own
    // entry and holds it.
    let created = unanswered.acquire("stock.3.1").await.unwrap();
    let mut retried = a.acquire("stock.3.1").await.unwrap();
    assert!(retried.revision() > created.revision() && retried.is_valid());
    a.renew(&mut retried).await.unwrap();

    // Another node's entry is never adopted.
    let mut stale = lease.clone();
    a.release(lease).await.unwrap();
    b.acquire("stock.3.0").await.unwrap();
    assert_eq!(a.renew(&mut stale).await.unwrap_err(), LeaseError::Lost);
    assert!(!stale.is_valid());
}

#[tokio::test(flavor = "current_thread")]
async fn a_lease_not_renewed_expires_and_its_holder_stopped_counting_on_it_before_another_took_it() {
    let Some(bin) = nats_or_skip() else { return };
    let nats = Nats::start(bin, None);
    let js = nats.connect().await;
    let ttl = Duration::from_secs(1);
    let a = Leases::open(&js, "EXPIRING", "a", ttl).await.unwrap();
    let b = Leases::open(&js, "EXPIRING", "b", ttl).await.unwrap();

    let mut lease = a.acquire("stock.2.0").await.unwrap();
    // `a` pauses (stops renewing); `b` tries until the servers expired the entry.
    let deadline = Instant::now() + Duration::from_secs(30);
    let taken_at = loop {
        match b.acquire("stock.2.0").await {
            Ok(_) => break Instant::now(),
            Err(LeaseError::Held(_)) => {
                assert!(Instant::now() < deadline, "the lease never expired");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("{e}"),
        }
    };
    assert!(lease.valid_until() < taken_at, "the old holder still counted on its lease when b took it");
    assert!(!lease.is_valid());
    assert_eq!(a.renew(&mut lease).await.unwrap_err(), LeaseError::Lost);
    assert_eq!(a.holder("stock.2.0").await.unwrap().as_deref(), Some("b"));
}

#[tokio::test(flavor = "current_thread")]
async fn shards_are_placed_on_the_members_that_keep_renewing() {
    let Some(bin) = nats_or_skip() else { return };
    let nats = Nats::start(bin, None);
    let js = nats.connect().await;
    let ttl = Duration::from_secs(1);
    let mut members = Vec::new();
    for node in ["a", "b", "c"] {
        let m = Leases::open(&js, "MEMBERS", node, ttl).await.unwrap();
        let lease = m.acquire(node).await.unwrap();
        members.push((m, lease));
    }
    let live = members[0].0.held().await.unwrap();
    assert_eq!(live, vec!["a", "b", "c"]);
    let shards: Vec<String> = (0..60).map(|i| format!("stock.{i}.0")).collect();
    assert!(shards.iter().any(|s| placement::owner(s, &live) == Some("c")));

    // c stops renewing; a and b go on until c is gone from the members.
    let deadline = Instant::now() + Duration::from_secs(30);
    let live = loop {
        for (m, lease) in members.iter_mut().take(2) {
            m.renew(lease).await.unwrap();
        }
        let live = members[0].0.held().await.unwrap();
        if live.len() == 2 {
            break live;
        }
        assert!(Instant::now() < deadline, "c never left: {live:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(live, vec!["a", "b"]);
    for s in &shards {
        assert_ne!(placement::owner(s, &live), Some("c"));
    }
}

/// Samples the nodes' published ownership every 20 ms until `done` holds (at most a
/// minute), checking at every sample that no shard may be served by two nodes at
/// once (by the nodes' own lease clocks).
async fn watch_ownership(
    nodes: &[(&str, tokio::sync::watch::Receiver<Owned>)],
    shards: &[String],
    mut done: impl FnMut(&BTreeMap<String, Vec<String>>) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = Instant::now();
        let mut servers: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (name, owned) in nodes {
            let owned = owned.borrow();
            for s in shards {
                if owned.serves(s, now) {
                    servers.entry(s.clone()).or_default().push(name.to_string());
                }
            }
        }
        for (s, by) in &servers {
            assert!(by.len() <= 1, "{s} served by {by:?} at once");
        }
        if done(&servers) {
            return;
        }
        assert!(Instant::now() < deadline, "ownership never settled: {servers:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every shard served by the node placement gives it among `live`.
fn placed(servers: &BTreeMap<String, Vec<String>>, shards: &[String], live: &[&str]) -> bool {
    shards
        .iter()
        .all(|s| servers.get(s).map(|by| by.as_slice()) == Some(&[placement::owner(s, live).unwrap().to_string()][..]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_fail_over_from_a_dead_node_go_to_a_new_one_and_are_never_served_by_two_at_once() {
    let Some(bin) = nats_or_skip() else { return };
    let nats = Nats::start(bin, None);
    let js = nats.connect().await;
    let ttl = Duration::from_secs(1);
    let shards: Vec<String> = (0..24).map(|i| format!("stock.{i}.0")).collect();
    let set: BTreeSet<String> = shards.iter().cloned().collect();
    let join = |name: &'static str| {
        let (js, set) = (js.clone(), set.clone());
        async move { Node::join(&js, NodeOptions::new(name, ttl), set).await.unwrap() }
    };
    let (a, b, c) = (join("a").await, join("b").await, join("c").await);
    let mut watched = vec![("a", a.owned()), ("b", b.owned()), ("c", c.owned())];
    watch_ownership(&watched, &shards, |s| placed(s, &shards, &["a", "b", "c"])).await;

    // c dies (its loop stops, nothing released): a and b take its shards once its
    // leases expire, and never while c's own clock still lets it serve them.
    drop(c);
    watch_ownership(&watched, &shards, |s| placed(s, &shards, &["a", "b"])).await;

    // d joins and takes its share, handed over by a and b.
    let d = join("d").await;
    watched.push(("d", d.owned()));
    watch_ownership(&watched, &shards, |s| placed(s, &shards, &["a", "b", "d"])).await;

    // b leaves cleanly: its shards are released at once and taken by a and d.
    b.leave().await;
    watch_ownership(&watched, &shards, |s| placed(s, &shards, &["a", "d"])).await;

    // A product comes and one goes: new shards are placed, the gone ones served by
    // nobody (their leases released).
    let now: Vec<String> = (6..30).map(|i| format!("stock.{i}.0")).collect();
    for node in [&a, &d] {
        node.set_shards(now.iter().cloned().collect()).unwrap();
    }
    let gone = &shards[..6];
    let every: BTreeSet<String> = shards.iter().chain(&now).cloned().collect();
    watch_ownership(&watched, &every.into_iter().collect::<Vec<_>>(), |s| {
        placed(s, &now, &["a", "d"]) && gone.iter().all(|g| !s.contains_key(g))
    })
    .await;
    let owners = Leases::open(&js, "KAMI_OWNERS", "observer", ttl).await.unwrap();
    for g in gone {
        assert_eq!(owners.holder(g).await.unwrap(), None, "{g} still leased");
    }
    let too_many: BTreeSet<String> = (0..=kami::cluster::node::MAX_SHARDS).map(|i| format!("stock.{i}.0")).collect();
    assert!(a.set_shards(too_many).is_err());
    drop((a, d));
}

fn noise(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8).collect()
}

/// Messages in the snapshot stream (chunks and meta records of every journal).
async fn snapshot_messages(nats: &Nats) -> u64 {
    let client = async_nats::connect(format!("nats://127.0.0.1:{}", nats.ports[0])).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let mut stream = js.get_stream("KAMITEST_SNAP").await.unwrap();
    stream.info().await.unwrap().state.messages
}

#[tokio::test(flavor = "current_thread")]
async fn a_snapshot_is_read_back_whole_from_its_chunks_and_a_newer_one_replaces_it() {
    let Some(bin) = nats_or_skip() else { return };
    let nats = Nats::start(bin, Some(64 * 1024));
    let js = nats.connect().await;
    assert_eq!(js.snapshot("stock.1.0").await.unwrap(), None);

    let first = noise(300_000, 1);
    assert!(js.put_snapshot("stock.1.0", 10, &first).await.unwrap());
    assert_eq!(js.snapshot("stock.1.0").await.unwrap(), Some((10, first)));
    let second = noise(150_000, 2);
    assert!(js.put_snapshot("stock.1.0", 20, &second).await.unwrap());
    assert_eq!(js.snapshot("stock.1.0").await.unwrap(), Some((20, second)));
    // Only the newest is kept: its three chunks of at most 64 kB and its record.
    assert_eq!(snapshot_messages(&nats).await, 3 + 1);

    // Another journal's snapshot is its own; an empty one is a snapshot too.
    assert!(js.put_snapshot("stock.1.1", 1, &[]).await.unwrap());
    assert_eq!(js.snapshot("stock.1.1").await.unwrap(), Some((1, Vec::new())));
}

#[tokio::test(flavor = "current_thread")]
async fn an_older_snapshot_never_replaces_a_newer_one_even_when_two_writers_race() {
    let Some(bin) = nats_or_skip() else { return };
    let nats = Nats::start(bin, Some(64 * 1024));
    let js = nats.connect().await;
    let newer = noise(200_000, 3);
    assert!(js.put_snapshot("stock.2.0", 20, &newer).await.unwrap());
    assert!(!js.put_snapshot("stock.2.0", 10, &noise(1_000, 4)).await.unwrap());
    assert!(!js.put_snapshot("stock.2.0", 20, &noise(1_000, 5)).await.unwrap());
    assert_eq!(js.snapshot("stock.2.0").await.unwrap(), Some((20, newer)));

    // Two writers at once (their chunks interleave on this one-thread runtime): the
    // newest wins whole, whichever finishes first. Among the rounds: the newer one
    // starts first and the older, smaller one wins the first compare-and-set and
    // purges what was published before its own first chunk (the newer one's first
    // chunks), so the newer one must publish its chunks again.
    let rounds =
        [(100_000, 150_000, false), (150_000, 100_000, false), (70_000, 70_000, false), (60_000, 200_000, true)];
    for (round, (older_size, newer_size, newer_first)) in rounds.into_iter().enumerate() {
        let base = 100 * (round as u64 + 1);
        let (older, newer) = (noise(older_size, 6 + round as u8), noise(newer_size, 9 + round as u8));
        let put_older = js.put_snapshot("stock.2.0", base + 1, &older);
        let put_newer = js.put_snapshot("stock.2.0", base + 2, &newer);
        let (stored_older, stored_newer) = if newer_first {
            let (n, o) = tokio::join!(put_newer, put_older);
            (o, n)
        } else {
            tokio::join!(put_older, put_newer)
        };
        assert!(stored_newer.unwrap(), "the newer one is stored");
        let _ = stored_older.unwrap();
        assert_eq!(js.snapshot("stock.2.0").await.unwrap(), Some((base + 2, newer)), "round {round}");
    }
}

mod takeover {
    use super::*;
    use kami::domain::shard::{NewOrder, Outcome, Payment};
    use kami::domain::{Event, ProductInfo, Shard, ShardId};

    fn product() -> ProductInfo {
        ProductInfo {
            id: "hot".into(),
            name: "Hot".into(),
            price_cents: 990,
            per_buyer_limit: 0,
            shards: 1,
            created_at_ms: 0,
        }
    }

    fn new_order(buyer: &str, i: u64) -> NewOrder {
        NewOrder {
            buyer: buyer.into(),
            quantity: 1,
            idempotency: None,
            query_token: format!("{i:032x}"),
            ttl_ms: 300_000,
            password: None,
            coupon: None,
            reseller: None,
        }
    }

    /// A shard's owner: its state and its journal, every event journaled and
    /// acknowledged before the next (as an actor replying 2xx does).
    struct Owner {
        shard: Shard,
        journal: StreamJournal,
        seq: u64,
    }

    impl Owner {
        async fn journal(&mut self, events: &[Event]) -> Result<(), StorageError> {
            self.journal.append_all(self.seq + 1, events)?;
            self.seq += events.len() as u64;
            self.journal.ticket()?.wait().await
        }

        async fn sell(&mut self, from: u64, to: u64) {
            for i in from..to {
                let new = new_order(&format!("buyer{i}@example.com"), i);
                let Outcome::Changed(created, order) = self.shard.create_order(new, 1_000 + i).unwrap() else {
                    unreachable!()
                };
                self.journal(&[created]).await.unwrap();
                if i % 2 == 0 {
                    let pay = Payment {
                        order_seq: order,
                        payment_id: format!("pay-{i}"),
                        channel: "sandbox".into(),
                        amount_cents: 990,
                        status: "paid".into(),
                    };
                    let Outcome::Changed(paid, _) = self.shard.pay(pay, 2_000 + i).unwrap() else { unreachable!() };
                    self.journal(&[paid]).await.unwrap();
                }
            }
        }
    }

    async fn take_over(js: &JetStream, id: &ShardId) -> (Owner, u64, u64) {
        let r = js.recover_shard(id, &product()).await.unwrap();
        let owner = Owner { shard: r.shard, journal: r.journal, seq: r.last_seq };
        (owner, r.snapshot_seq, r.replayed)
    }

    /// What a buyer or the audit can see of a shard.
    fn seen(shard: &Shard) -> String {
        let mut orders: Vec<String> = shard.orders().iter().map(|o| format!("{o:?}")).collect();
        orders.sort();
        let mut keys: Vec<&str> = shard.key_strings().collect();
        keys.sort();
        format!("{:?}\n{orders:?}\n{keys:?}", shard.counts())
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_node_taking_a_shard_over_rebuilds_exactly_the_acknowledged_state_and_fences_the_old_owner() {
        let Some(bin) = nats_or_skip() else { return };
        let nats = Nats::start(bin, Some(64 * 1024));
        let js = nats.connect().await;
        let id = ShardId::new("hot", 0);

        let (mut first, snapshot_seq, replayed) = take_over(&js, &id).await;
        assert_eq!((snapshot_seq, replayed, first.seq), (0, 0, 0));
        let (events, _, _) = first.shard.import_keys((0..200).map(|i| format!("KEY-{i:05}")).collect());
        first.journal(&events).await.unwrap();
        first.sell(0, 60).await;
        // A snapshot of what is acknowledged; what it covers leaves the stream.
        let at = first.seq;
        assert!(js.snapshot_shard(&id, &first.journal, at, &first.shard).await.unwrap());
        first.sell(60, 100).await;
        // A snapshot of a prefix the stream has not acknowledged is refused.
        let (pending, _, _) = first.shard.import_keys(vec!["LATE-KEY".into()]);
        first.journal.append_all(first.seq + 1, &pending).unwrap();
        first.seq += pending.len() as u64;
        assert!(js.snapshot_shard(&id, &first.journal, first.seq, &first.shard).await.is_err());
        first.journal.ticket().unwrap().wait().await.unwrap();

        // Another node takes over: the snapshot plus the journal after it.
        let (mut second, snapshot_seq, replayed) = take_over(&js, &id).await;
        assert_eq!(snapshot_seq, at);
        assert_eq!(replayed, first.seq - at);
        assert_eq!(second.seq, first.seq);
        assert_eq!(seen(&second.shard), seen(&first.shard));
        second.sell(100, 110).await;

        // The old owner, unaware, tries to sell on: the stream refuses it.
        let new = new_order("late@example.com", 999);
        let Outcome::Changed(created, _) = first.shard.create_order(new, 9_999).unwrap() else { unreachable!() };
        assert!(matches!(first.journal(&[created]).await, Err(StorageError::Fenced(_))));

        // A third takeover sees the second owner's sales and nothing of the old one's.
        let (third, _, _) = take_over(&js, &id).await;
        assert_eq!(seen(&third.shard), seen(&second.shard));
        assert!(third.shard.orders().iter().all(|o| o.buyer != "late@example.com"));
    }
}

/// Stock actors whose journal and snapshots are in the stream (`ShardEnv::stream`).
mod actors_on_the_stream {
    use std::collections::HashSet;
    use std::sync::Arc;

    use super::*;
    use kami::actors::registry::{start_shard, ShardHandle, ShelfCell, TermsCell};
    use kami::actors::shard::{CreateOrder, GetOrder, ImportKeys, PayOrder};
    use kami::actors::{ActorError, Kill, ShardEnv};
    use kami::domain::shard::{NewOrder, Payment, PaymentStatus};
    use kami::domain::terms::Terms;
    use kami::domain::{OrderStatus, PaymentOutcome, ProductInfo, Shard, ShardId};
    use kami::storage::{Storage, StorageOptions};

    fn product() -> ProductInfo {
        ProductInfo {
            id: "hot".into(),
            name: "Hot".into(),
            price_cents: 990,
            per_buyer_limit: 0,
            shards: 1,
            created_at_ms: 0,
        }
    }

    fn env(js: &JetStream, dir: &std::path::Path) -> Arc<ShardEnv> {
        let storage = Storage::open(&StorageOptions {
            path: dir.to_path_buf(),
            cache_capacity_bytes: 1 << 20,
            max_pending_commits: 1024,
            max_commit_batch: 1024,
            commit_linger: Duration::ZERO,
            commit_busy_linger: Duration::ZERO,
        })
        .unwrap();
        Arc::new(ShardEnv {
            storage,
            stream: Some(js.clone()),
            claims: Arc::new(kami::actors::claims::PaymentClaims::new()),
            clock: Arc::new(kami::clock::SystemClock),
            ttl_ms: 300_000,
            expiry_tick: Duration::from_secs(1),
            max_expired_per_tick: 100,
            // Small: snapshots are taken (and the journal purged) while it sells.
            snapshot_min_journal_bytes: 4096,
            mailbox_capacity: 1024,
            max_queue_wait_ms: 5_000,
            archive_after_ms: 0,
            idempotency_ttl_ms: 0,
            clustered: false,
        })
    }

    /// A stock actor that takes shard `id` over: rebuilt from the stream.
    async fn take_over(js: &JetStream, env: &Arc<ShardEnv>, id: &ShardId) -> ShardHandle {
        let rebuilt = js.recover_shard(id, &product()).await.unwrap();
        let cells = (Arc::new(ShelfCell::default()), Arc::new(TermsCell::new(Terms::of(&product()))));
        start_shard(
            env,
            (0, &actix_rt::Arbiter::current()),
            (&product(), 0),
            (&cells.0, &cells.1),
            Some(rebuilt.into()),
        )
    }

    fn new_order(buyer: &str) -> NewOrder {
        NewOrder {
            buyer: buyer.into(),
            quantity: 1,
            idempotency: None,
            query_token: format!("{:032x}", buyer.len()),
            ttl_ms: 300_000,
            password: None,
            coupon: None,
            reseller: None,
        }
    }

    /// One purchase through `actor`: the order and its payment. Returns the order's
    /// seq once created (acknowledged) and whether the payment was acknowledged.
    async fn buy(actor: &ShardHandle, buyer: &str) -> (Option<u64>, bool) {
        let Ok(Ok(created)) = actor.addr.send(CreateOrder(new_order(buyer))).await else { return (None, false) };
        let pay = Payment {
            order_seq: created.order.seq,
            payment_id: format!("pay-{buyer}"),
            channel: "sandbox".into(),
            amount_cents: 990,
            status: PaymentStatus::Paid,
        };
        let paid = matches!(actor.addr.send(PayOrder(pay)).await, Ok(Ok(PaymentOutcome::Delivered)));
        (Some(created.order.seq), paid)
    }

    /// Every acknowledged order is in `shard`, every acknowledged payment delivered
    /// it, and no key went to two orders.
    fn holds_everything_acknowledged(shard: &Shard, created: &[(String, u64)], paid: &HashSet<String>) {
        for (buyer, seq) in created {
            let order = shard.order(*seq).unwrap_or_else(|| panic!("acknowledged order {seq} of {buyer} lost"));
            assert_eq!(&order.buyer, buyer, "order {seq}");
            if paid.contains(buyer) {
                assert_eq!(order.status, OrderStatus::Delivered, "order {seq} of {buyer}");
            }
        }
        let mut keys = HashSet::new();
        for order in shard.orders().iter().filter(|o| o.status == OrderStatus::Delivered) {
            for key in &order.keys {
                assert!(keys.insert(*key), "key {key:?} delivered twice");
            }
        }
    }

    #[test]
    fn a_stock_actor_answers_what_the_stream_holds_snapshots_into_it_and_rebuilds_from_it_after_a_crash() {
        let Some(bin) = nats_or_skip() else { return };
        let nats = Nats::start(bin, None);
        let dir = tempfile::tempdir().unwrap();
        actix_rt::System::new().block_on(async move {
            let js = nats.connect().await;
            let env = env(&js, dir.path());
            let id = ShardId::new("hot", 0);
            let actor = take_over(&js, &env, &id).await;
            let keys: Vec<String> = (0..300).map(|i| format!("KEY-{i:05}")).collect();
            assert_eq!(actor.addr.send(ImportKeys(keys)).await.unwrap().unwrap(), (300, 0));
            let mut created = Vec::new();
            for i in 0..120 {
                let buyer = format!("buyer{i}@example.com");
                let (seq, was_paid) = buy(&actor, &buyer).await;
                created.push((buyer, seq.expect("a single owner's order is acknowledged")));
                assert!(was_paid, "a single owner's payment is acknowledged");
            }
            // Snapshots were taken as it sold: the newest covers most of the journal.
            let deadline = Instant::now() + Duration::from_secs(20);
            let snapshot_seq = loop {
                match js.snapshot("stock.hot.0").await.unwrap() {
                    Some((seq, _)) if seq > 100 => break seq,
                    _ if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(20)).await,
                    other => panic!("no snapshot past record 100 stored: {:?}", other.map(|s| s.0)),
                }
            };

            // A crash: the actor is rebuilt from the stream, never from its memory.
            actor.addr.send(Kill).await.unwrap();
            let (last_buyer, last_seq) = created.last().unwrap().clone();
            let deadline = Instant::now() + Duration::from_secs(20);
            let view = loop {
                match actor.addr.send(GetOrder { seq: last_seq, token: None }).await.unwrap() {
                    Ok(view) => break view,
                    Err(ActorError::Unavailable) if Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(20)).await
                    }
                    Err(e) => panic!("the rebuilt actor does not answer: {e}"),
                }
            };
            assert_eq!(view.order.buyer, last_buyer);
            assert_eq!(view.keys.len(), 1, "a paid order shows its key after the rebuild");
            let (seq, was_paid) = buy(&actor, "after@example.com").await;
            assert!(seq.is_some() && was_paid, "the rebuilt actor sells on");

            // Another reader of the stream sees exactly that: the snapshot plus the rest.
            let all: HashSet<String> = created.iter().map(|(b, _)| b.clone()).collect();
            let r = js.recover_shard(&id, &product()).await.unwrap();
            assert!(r.snapshot_seq >= snapshot_seq);
            assert!(r.replayed < r.last_seq, "the snapshot spared replaying the whole journal");
            holds_everything_acknowledged(&r.shard, &created, &all);
            let counts = r.shard.counts();
            assert_eq!((counts.orders, counts.sold, counts.imported), (121, 121, 300));
        });
    }

    #[test]
    fn two_actors_on_one_shard_never_both_extend_it_and_every_acknowledged_purchase_survives() {
        let Some(bin) = nats_or_skip() else { return };
        let nats = Nats::start(bin, None);
        let dir = tempfile::tempdir().unwrap();
        actix_rt::System::new().block_on(async move {
            let js = nats.connect().await;
            let env = env(&js, dir.path());
            let id = ShardId::new("hot", 0);
            let (mut created, mut paid) = (Vec::new(), HashSet::new());
            let mut record = |buyer: String, (seq, was_paid): (Option<u64>, bool)| {
                if let Some(seq) = seq {
                    created.push((buyer.clone(), seq));
                }
                if was_paid {
                    paid.insert(buyer);
                }
                seq.is_some()
            };
            let old = take_over(&js, &env, &id).await;
            let keys: Vec<String> = (0..400).map(|i| format!("KEY-{i:05}")).collect();
            old.addr.send(ImportKeys(keys)).await.unwrap().unwrap();
            for i in 0..20 {
                let buyer = format!("old{i}@example.com");
                assert!(record(buyer.clone(), buy(&old, &buyer).await));
            }
            // A second owner takes the shard over while the first is still running
            // (a paused or partitioned node): it reads the history and sells on.
            let new = take_over(&js, &env, &id).await;
            for i in 0..20 {
                let buyer = format!("new{i}@example.com");
                assert!(record(buyer.clone(), buy(&new, &buyer).await), "the new owner sells");
            }
            // The old owner's next order is refused: its append does not extend the
            // history it read.
            let refused = old.addr.send(CreateOrder(new_order("stale@example.com"))).await.unwrap();
            assert!(matches!(refused, Err(ActorError::Storage(StorageError::Fenced(_)))), "{refused:?}");
            // Both keep trying, interleaved (each rebuilds when fenced): whatever
            // either acknowledges must be in the history, and no key sold twice.
            for i in 0..60 {
                let (actor, buyer) =
                    if i % 2 == 0 { (&old, format!("o{i}@example.com")) } else { (&new, format!("n{i}@example.com")) };
                record(buyer.clone(), buy(actor, &buyer).await);
            }
            let r = js.recover_shard(&id, &product()).await.unwrap();
            holds_everything_acknowledged(&r.shard, &created, &paid);
            assert!(r.shard.orders().iter().all(|o| o.buyer != "stale@example.com"), "a refused order never appears");
            assert!(created.len() >= 40);
        });
    }
}

/// The `kami` binary with `storage.backend = "jetstream"`.
mod servers {
    use std::collections::HashSet;
    use std::panic::AssertUnwindSafe;

    use futures::FutureExt;

    use super::common::{assert_audit_ok, kami_audit, reply, Api, Server, ADMIN};
    use super::*;

    /// Polls `probe` every 20 ms until it gives a value (at most 30 s).
    async fn until<T, F: std::future::Future<Output = Option<T>>>(probe: impl Fn() -> F) -> T {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(v) = probe().await {
                return v;
            }
            assert!(Instant::now() < deadline, "never came to pass within 30 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The environment of a kami server keeping stock in `nats`' stream `stream`,
    /// once the servers serve JetStream.
    async fn on_stream(nats: &Nats, stream: &str) -> Vec<(&'static str, String)> {
        drop(nats.connect().await);
        env_for(nats, stream)
    }

    /// The environment of a kami server keeping stock in `nats`' stream `stream`.
    fn env_for(nats: &Nats, stream: &str) -> Vec<(&'static str, String)> {
        let options = nats.options();
        vec![
            ("KAMI_STORAGE__BACKEND", "jetstream".into()),
            ("KAMI_STORAGE__JETSTREAM__URLS", options.urls.join(",")),
            ("KAMI_STORAGE__JETSTREAM__STREAM", stream.into()),
            ("KAMI_STORAGE__JETSTREAM__REPLICAS", options.replicas.to_string()),
            ("KAMI_ACTORS__ARBITERS", "2".into()),
        ]
    }

    fn start(data: &std::path::Path, env: &[(&'static str, String)]) -> Server {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        Server::start(data, &env)
    }

    /// Product `hot` with `shards` shards and `keys` keys.
    async fn stock_hot(api: &Api, shards: u16, keys: usize) {
        assert_eq!(api.create_product("hot", 990, 0, shards).await.status, 201);
        let keys: Vec<String> = (0..keys).map(|i| format!("hot-K{i}")).collect();
        assert_eq!(api.import("hot", &keys).await.status, 200);
    }

    /// One purchase for `buyer`, as far as it was acknowledged: the order (id,
    /// token) once created, and whether its payment was. Anything but 201/200 must
    /// be 503 (`unavailable` while the stream's servers elect a leader).
    async fn try_buy(api: &Api, buyer: &str) -> Option<(String, String, bool)> {
        let created = api.order("hot", 1, buyer, None).await;
        if created.status != 201 {
            assert_eq!(created.status, 503, "only unavailable while the servers elect: {:?}", created.body);
            return None;
        }
        let id = created.body["order_id"].as_str().unwrap().to_string();
        let token = created.body["query_token"].as_str().unwrap().to_string();
        let paid = api.notify(&id, &format!("pay-{id}"), 990).await;
        assert!(matches!(paid.status, 200 | 503), "{:?}", paid.body);
        Some((id, token, paid.status == 200))
    }

    /// A purchase acknowledged whole (order and payment).
    async fn buy(api: &Api, buyer: &str) -> (String, String, bool) {
        let bought = try_buy(api, buyer).await.expect("the order is acknowledged");
        assert!(bought.2, "the payment is acknowledged");
        bought
    }

    /// Every purchase in `acknowledged` is served as acknowledged (a paid one
    /// delivered), no key went to two orders, and the audit holds.
    async fn serves_everything(api: &Api, acknowledged: &[(String, String, bool)]) {
        let mut keys_seen = HashSet::new();
        for (id, token, paid) in acknowledged {
            let seen = api.get_order(id, token).await;
            assert_eq!(seen.status, 200, "{id}: {:?}", seen.body);
            if *paid {
                assert_eq!(seen.body["status"], "delivered", "{id}");
                assert_eq!(seen.body["keys"].as_array().map(Vec::len), Some(1), "{id}");
                assert!(keys_seen.insert(seen.body["keys"].to_string()), "a key sold twice");
            }
        }
        assert_audit_ok(&api.audit().await);
    }

    /// Files under `dir` with any bytes in them.
    fn written_files(dir: &std::path::Path) -> Vec<PathBuf> {
        let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
        let mut out = Vec::new();
        for entry in entries.map_while(Result::ok) {
            let path = entry.path();
            if path.is_dir() {
                out.extend(written_files(&path));
            } else if entry.metadata().is_ok_and(|m| m.len() > 0) {
                out.push(path);
            }
        }
        out
    }

    /// A start whose stream servers are not up yet (a host booting them together)
    /// waits for them instead of exiting. A stand-in listener on the server's port
    /// tells when kami first tried: only then does the real server start there.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_start_waits_for_stream_servers_that_come_up_after_it() {
        let Some(bin) = nats_or_skip() else { return };
        let mut nats = Nats::unstarted(bin, 1, None);
        let env = env_for(&nats, "KAMILATE");
        let stand_in = TcpListener::bind(("127.0.0.1", nats.ports[0])).unwrap();
        stand_in.set_nonblocking(true).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let starting = std::thread::spawn(move || start(&data, &env));
        let knocked = until(|| async { stand_in.accept().ok() }).await;
        drop((knocked, stand_in)); // its first try fails: no server answered
        nats.restart(0);
        let server = tokio::task::spawn_blocking(move || starting.join().expect("kami started")).await.unwrap();
        assert!(!server.lines_with("do not answer yet; trying again").is_empty(), "kami waited for the servers");
        let api = server.api();
        stock_hot(&api, 1, 5).await;
        let bought = buy(&api, "early@example.com").await;
        serves_everything(&api, &[bought]).await;
        drop(dir);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_server_keeps_stock_in_the_stream_and_serves_every_acknowledged_purchase_after_kill_9() {
        let Some(bin) = nats_or_skip() else { return };
        let mut nats = Nats::start(bin, None);
        let env = on_stream(&nats, "KAMISERVER").await;
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let mut server = start(&data, &env);
        let api = server.api();
        stock_hot(&api, 2, 100).await;
        let mut bought = Vec::new();
        for i in 0..30 {
            bought.push(buy(&api, &format!("buyer{i}@example.com")).await);
        }
        // Stock lives in the stream: nothing of it in the data directory.
        assert_eq!(written_files(&data.join("journal").join("stock")), Vec::<PathBuf>::new());
        // Ready only while the stream's servers are in reach: a balancer's probe
        // sends buyers elsewhere while it is cut off, and back once it is not.
        let ready = || async { reply(api.http.get(format!("{}/readyz", api.url))).await };
        assert_eq!(ready().await.status, 200);
        nats.kill(0);
        let cut_off = until(|| async {
            let r = ready().await;
            (r.status == 503).then_some(r)
        })
        .await;
        assert_eq!(cut_off.code(), "unavailable", "{:?}", cut_off.body);
        assert!(cut_off.body["error"]["message"].as_str().unwrap().contains("JetStream"), "{:?}", cut_off.body);
        let status = reply(api.http.get(format!("{}/status.json", api.url))).await.body;
        let storage = &status["storage"];
        assert_eq!(storage["backend"], "jetstream", "{status}");
        assert_eq!(storage["stream"], "KAMISERVER", "{status}");
        assert_eq!(storage["serving"], false, "{status}");
        assert!(storage["not_serving"].as_str().unwrap().contains("JetStream"), "{status}");
        let metrics = api.http.get(format!("{}/metrics", api.url)).send().await.unwrap().text().await.unwrap();
        assert!(metrics.lines().any(|l| l == "kami_storage_serving 0"), "{metrics}");
        nats.restart(0);
        until(|| async { (ready().await.status == 200).then_some(()) }).await;
        let status = reply(api.http.get(format!("{}/status.json", api.url))).await.body;
        assert_eq!(status["storage"]["serving"], true, "{status}");
        bought.push(buy(&api, "back@example.com").await);
        // Cut off past the writer lease's time (servers electing a leader for that
        // long): its entry expires on the servers, and with nobody else on the
        // stream the server takes it again instead of stopping.
        nats.kill(0);
        let lapsed = until(|| async {
            let status = reply(api.http.get(format!("{}/status.json", api.url))).await.body;
            let why = status["storage"]["not_serving"].as_str().unwrap_or_default().to_string();
            why.contains("writer lease").then_some(why)
        })
        .await;
        assert!(lapsed.contains("does not hold"), "{lapsed}");
        // The servers count the entry's age from its last write, which is before the
        // server's own clock ended the lease by a tenth of its life (0.5 s).
        tokio::time::sleep(Duration::from_secs(1)).await;
        nats.restart(0);
        until(|| async { (ready().await.status == 200).then_some(()) }).await;
        assert!(!server.lines_with("nobody took it: taken again").is_empty(), "the lapsed lease was taken again");
        assert!(server.child.try_wait().unwrap().is_none(), "still running");
        bought.push(buy(&api, "lapsed@example.com").await);
        // What reads local journals says it is not offered, with a stable code.
        let webhook = serde_json::json!({"name": "crm", "url": "http://127.0.0.1:9/x", "secret": "0123456789abcdef"});
        let refused =
            reply(api.http.post(format!("{}/api/v1/admin/webhooks", api.url)).bearer_auth(ADMIN).json(&webhook)).await;
        assert_eq!((refused.status, refused.code()), (501, "unsupported"), "{:?}", refused.body);
        let refused = reply(api.http.post(format!("{}/api/v1/admin/backup", api.url)).bearer_auth(ADMIN)).await;
        assert_eq!((refused.status, refused.code()), (501, "unsupported"), "{:?}", refused.body);

        server.kill9();
        let mut server = start(&data, &env);
        assert!(!server.lines_with("waiting for the stream's writer lease").is_empty(), "the killed server's lease");
        let api = server.api();
        serves_everything(&api, &bought).await;
        let after = api.order("hot", 1, "after@example.com", None).await;
        assert_eq!(after.status, 201, "the restarted server sells on: {:?}", after.body);

        // A graceful stop releases the lease: the next start does not wait for it.
        server.sigterm();
        assert!(server.exited_within(Duration::from_secs(30)).await.is_some_and(|s| s.success()));
        // The directory remembers where its stock is: the offline audit, which
        // cannot see it, says so, and a start on the local backend is refused.
        let (code, out, err) = kami_audit(&data, false);
        assert_ne!(code, 0, "{out}");
        assert!(err.contains("keeps its stock in jetstream:KAMISERVER"), "{err}");
        let local = Command::new(env!("CARGO_BIN_EXE_kami"))
            .env_clear()
            .env("KAMI_SERVER__LISTEN", "127.0.0.1:0")
            .env("KAMI_STORAGE__PATH", &data)
            .env("KAMI_ADMIN__TOKEN", ADMIN)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let said = format!("{}{}", String::from_utf8_lossy(&local.stdout), String::from_utf8_lossy(&local.stderr));
        assert!(!local.status.success() && said.contains("keeps its stock in jetstream:KAMISERVER"), "{said}");
        let server = start(&data, &env);
        assert_eq!(server.lines_with("waiting for the stream's writer lease"), Vec::<String>::new());
        serves_everything(&server.api(), &bought).await;
    }

    fn signal(server: &Server, signal: i32) {
        // SAFETY: kill(2) with the pid of our own child and a valid signal.
        assert_eq!(unsafe { libc::kill(server.child.id() as libc::pid_t, signal) }, 0);
    }

    /// One server writes a stream (`cluster::writer`).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_second_server_on_a_stream_is_refused_and_a_paused_one_stops_once_another_took_over() {
        let Some(bin) = nats_or_skip() else { return };
        let nats = Nats::start(bin, None);
        let env = on_stream(&nats, "KAMIWRITER").await;
        let dir = tempfile::tempdir().unwrap();
        let (data_a, data_b) = (dir.path().join("a"), dir.path().join("b"));
        let mut a = start(&data_a, &env);
        let api = a.api();
        stock_hot(&api, 1, 50).await;
        let mut sold = Vec::new();
        for i in 0..10 {
            sold.push(buy(&api, &format!("buyer{i}@example.com")).await);
        }

        // While it runs, a second server on the same stream is refused.
        let refused = Command::new(env!("CARGO_BIN_EXE_kami"))
            .env_clear()
            .env("KAMI_SERVER__LISTEN", "127.0.0.1:0")
            .env("KAMI_STORAGE__PATH", &data_b)
            .env("KAMI_ADMIN__TOKEN", ADMIN)
            .env("KAMI_LOG__LEVEL", "warn")
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let said = format!("{}{}", String::from_utf8_lossy(&refused.stdout), String::from_utf8_lossy(&refused.stderr));
        assert!(!refused.status.success(), "a second writer started: {said}");
        assert!(said.contains("writer lease") && said.contains("held by node kami-"), "{said}");

        // Paused past its lease, the first loses the stream to a second server and,
        // resumed, stops at once (exit status 75) instead of writing on.
        signal(&a, libc::SIGSTOP);
        let mut b = start(&data_b, &env);
        signal(&a, libc::SIGCONT);
        let status = a.exited_within(Duration::from_secs(20)).await.expect("the paused server stops once resumed");
        assert_eq!(status.code(), Some(kami::app::EXIT_WRITER_LOST));
        assert!(!a.lines_with("lost the stream's writer lease").is_empty());

        // The second is killed: the first starts again once that lease ran out, and
        // serves every purchase it acknowledged.
        b.kill9();
        let a = start(&data_a, &env);
        serves_everything(&a.api(), &sold).await;
    }

    /// The host of the server writing a stream is lost with its data directory: a
    /// server started on the stream from an empty directory (another host) sells the
    /// same products, changed as they were, and serves every acknowledged purchase.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_server_on_a_new_data_directory_takes_over_the_stream_with_its_products() {
        let Some(bin) = nats_or_skip() else { return };
        let nats = Nats::start(bin, None);
        let env = on_stream(&nats, "KAMIHOSTS").await;
        let (first_dir, second_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let mut first = start(&first_dir.path().join("data"), &env);
        let api = first.api();
        stock_hot(&api, 2, 20).await;
        let mut bought = Vec::new();
        for i in 0..5 {
            bought.push(buy(&api, &format!("buyer{i}@example.com")).await);
        }
        let patch = serde_json::json!({"price_cents": 1290, "name": "Hot v2"});
        let changed = reply(api.admin(api.http.patch(format!("{}/api/v1/products/hot", api.url))).json(&patch)).await;
        assert_eq!(changed.status, 200, "{:?}", changed.body);
        assert_eq!(api.create_product("cold", 100, 0, 1).await.status, 201);
        let retired = reply(api.admin(api.http.post(format!("{}/api/v1/admin/products/cold/retire", api.url)))).await;
        assert_eq!(retired.status, 200, "{:?}", retired.body);
        let points = serde_json::json!({"points_price": 50});
        let priced =
            reply(api.admin(api.http.put(format!("{}/api/v1/products/hot/points-price", api.url))).json(&points)).await;
        assert_eq!(priced.status, 200, "{:?}", priced.body);
        let with_password = serde_json::json!({"product_id": "hot", "quantity": 1, "buyer": "asks@example.com", "query_password": "open sesame"});
        let asked = reply(api.http.post(format!("{}/api/v1/orders", api.url)).json(&with_password)).await;
        assert_eq!(asked.status, 201, "{:?}", asked.body);
        // Points and coupons are in the stream too.
        let points_url = |api: &Api| format!("{}/api/v1/admin/buyers/p@example.com/points", api.url);
        let grant = serde_json::json!({"request_id": "welcome", "delta": 120});
        let credited = reply(api.admin(api.http.post(points_url(&api))).json(&grant)).await;
        assert_eq!(credited.status, 200, "{:?}", credited.body);
        let coupon = serde_json::json!({"code": "HOST-1", "kind": "amount", "value": 10, "max_uses": 5});
        let defined = reply(api.admin(api.http.post(format!("{}/api/v1/admin/coupons", api.url))).json(&coupon)).await;
        assert_eq!(defined.status, 201, "{:?}", defined.body);
        let before = api.product("hot").await.body;
        first.kill9();
        drop(first_dir); // the host's disk is gone

        let second = start(&second_dir.path().join("data"), &env);
        assert!(!second.lines_with("waiting for the stream's writer lease").is_empty(), "the dead server's lease");
        let api = second.api();
        let hot = api.product("hot").await;
        assert_eq!(hot.status, 200, "{:?}", hot.body);
        for field in ["name", "price_cents", "available", "points_price"] {
            assert_eq!(hot.body[field], before[field], "{field}: {:?} against {before}", hot.body);
        }
        assert_eq!(hot.body["price_cents"], 1290);
        let cold = reply(api.admin(api.http.get(format!("{}/api/v1/admin/products/cold", api.url)))).await;
        assert_eq!(cold.body["shelf"], "retired", "{:?}", cold.body);
        serves_everything(&api, &bought).await;
        // Its query password was salted with the first server's secret, which the
        // stream kept: the lookup finds the order on the new server too.
        let lookup = serde_json::json!({"buyer": "asks@example.com", "query_password": "open sesame"});
        let found = reply(api.http.post(format!("{}/api/v1/orders/lookup", api.url)).json(&lookup)).await;
        assert_eq!(found.status, 200, "{:?}", found.body);
        assert_eq!(found.body["orders"][0]["order_id"], asked.body["order_id"], "{:?}", found.body);
        let after = api.order("hot", 1, "after@example.com", None).await;
        assert_eq!(after.status, 201, "{:?}", after.body);
        assert_eq!(after.body["amount_cents"], 1290, "{:?}", after.body);
        // The buyer's points and the coupon, as the first server acknowledged them.
        let ledger = reply(api.admin(api.http.get(format!("{}/ledger", points_url(&api))))).await;
        assert_eq!(ledger.body["balance"].as_u64(), Some(120), "{:?}", ledger.body);
        let redeem = serde_json::json!({"buyer": "p@example.com", "product_id": "hot", "quantity": 1});
        let redeemed = reply(
            api.http.post(format!("{}/api/v1/redemptions", api.url)).header("Idempotency-Key", "r1").json(&redeem),
        )
        .await;
        assert_eq!((redeemed.status, redeemed.body["points_balance"].as_u64()), (201, Some(70)), "{:?}", redeemed.body);
        let coupon = reply(api.admin(api.http.get(format!("{}/api/v1/admin/coupons/HOST-1", api.url)))).await;
        assert_eq!(coupon.status, 200, "{:?}", coupon.body);
    }

    /// A data directory whose server kept points in `storage.path` on the jetstream
    /// backend (before ledgers went to the stream) keeps them there: its balances
    /// are served as they were, not replaced by the stream's empty ledgers.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn points_a_data_directory_kept_before_ledgers_went_to_the_stream_stay_there() {
        use kami::domain::points::PointsBook;
        let Some(bin) = nats_or_skip() else { return };
        let nats = Nats::start(bin, None);
        let env = on_stream(&nats, "KAMIUPGRADE").await;
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let buyer =
            (0..).map(|i| format!("old{i}@example.com")).find(|b| kami::actors::points::points_shard_of(b) == 0);
        let buyer = buyer.unwrap();
        {
            let storage = common::open_storage(&data);
            storage.keep_stock_in("jetstream:KAMIUPGRADE").unwrap();
            let mut book = PointsBook::default();
            let kami::domain::Outcome::Changed(event, _) = book.adjust("grant", &buyer, 75, "", 1_000).unwrap() else {
                panic!("a credit")
            };
            let journal = storage.ledger_journal::<PointsBook>(0).unwrap();
            journal.append_all(1, &[event]).unwrap();
            journal.ticket().unwrap().wait().await.unwrap();
        }
        let server = start(&data, &env);
        assert!(!server.lines_with("points and coupons stay in storage.path").is_empty());
        let api = server.api();
        let url = format!("{}/api/v1/admin/buyers/{buyer}/points/ledger", api.url);
        let ledger = reply(api.admin(api.http.get(&url))).await;
        assert_eq!(ledger.body["balance"].as_u64(), Some(75), "{:?}", ledger.body);
    }

    /// A standby (`storage.jetstream.standby`) on its own data directory waits while
    /// the writer lives, then takes the stream over when it is killed: it serves
    /// every acknowledged purchase and sells on. Prints the fail-over time (kill to
    /// the standby's first answered order).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_standby_takes_the_stream_over_when_its_writer_is_killed() {
        let Some(bin) = nats_or_skip() else { return };
        let nats = Nats::start(bin, None);
        let env = on_stream(&nats, "KAMISTANDBY").await;
        let (first_dir, standby_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let mut first = start(&first_dir.path().join("data"), &env);
        let api = first.api();
        stock_hot(&api, 2, 200).await;
        let mut standby_env = env.clone();
        standby_env.push(("KAMI_STORAGE__JETSTREAM__STANDBY", "true".into()));
        let standby_env: Vec<(&str, &str)> = standby_env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let standby = Server::spawn(&standby_dir.path().join("data"), &standby_env);
        until(|| async { (!standby.lines_with("waiting for the stream's writer lease").is_empty()).then_some(()) })
            .await;
        // The writer sells on while the standby waits, past the 11 s a server that is
        // not a standby waits for a lease before it gives up.
        let waiting = Instant::now();
        let mut bought = Vec::new();
        while waiting.elapsed() < Duration::from_secs(12) {
            bought.push(buy(&api, &format!("buyer{}@example.com", bought.len())).await);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(standby.lines_with("kami listening").is_empty(), "the standby still waits");
        first.kill9();
        let killed = Instant::now();
        let standby = tokio::task::spawn_blocking(move || standby.ready()).await.unwrap();
        let api = standby.api();
        let after = until(|| async {
            let r = api.order("hot", 1, "after@example.com", None).await;
            (r.status == 201).then_some(r)
        })
        .await;
        eprintln!("fail-over: {} ms from kill -9 to the standby's first order", killed.elapsed().as_millis());
        assert_eq!(after.body["product_id"], "hot");
        serves_everything(&api, &bought).await;
    }

    /// A stream kept in three copies while its servers fail.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn purchases_go_on_when_the_stream_leader_dies_and_every_acknowledged_one_survives() {
        let Some(bin) = nats_or_skip() else { return };
        let mut nats = Nats::start_n(bin, 3, None);
        let env = on_stream(&nats, "KAMITEST").await;
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let mut server = start(&data, &env);
        let api = server.api();
        stock_hot(&api, 1, 300).await;
        let mut acknowledged = Vec::new();
        for i in 0..30 {
            acknowledged.push(buy(&api, &format!("before{i}@example.com")).await);
        }

        // kill -9 the stream's leader: after the election, purchases go on.
        let leader = nats.settled("KAMITEST", &[0, 1, 2], true).await;
        nats.kill(leader);
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut paid_after = 0;
        for i in 0.. {
            let tried = AssertUnwindSafe(try_buy(&api, &format!("after{i}@example.com"))).catch_unwind().await;
            let tried = tried.unwrap_or_else(|panic| {
                // A dropped connection: say whether the server died, and what it said.
                let exit = server.child.try_wait();
                eprintln!("kami: {exit:?}; it logged: {:#?}", server.lines_with(""));
                std::panic::resume_unwind(panic)
            });
            if let Some(bought) = tried {
                paid_after += usize::from(bought.2);
                acknowledged.push(bought);
            }
            if paid_after == 30 {
                break;
            }
            assert!(Instant::now() < deadline, "purchases never went on after n{leader} died");
        }

        // The server comes back and catches up; kami is killed and restarted: every
        // acknowledged purchase is there, no key went twice, the audit holds.
        nats.restart(leader);
        nats.settled("KAMITEST", &[0, 1, 2], true).await;
        server.kill9();
        let server = start(&data, &env);
        serves_everything(&server.api(), &acknowledged).await;
    }
}

/// Journals `n` credits of 10 points to `buyer` from `first` on, through `book`.
async fn credit(
    book: &mut kami::domain::points::PointsBook,
    journal: &StreamJournal,
    first: u64,
    n: u64,
) -> Result<(), StorageError> {
    for i in first..first + n {
        match book.adjust(&format!("grant-{i}"), "alice", 10, "", 1_000 + i).expect("a credit") {
            kami::domain::Outcome::Changed(event, _) => journal.append_all(i, &[event])?,
            kami::domain::Outcome::Repeat(_) => panic!("a new request id"),
        };
    }
    journal.ticket()?.wait().await
}

#[tokio::test(flavor = "current_thread")]
async fn a_points_ledger_is_rebuilt_from_its_snapshot_and_the_records_after_it_and_its_old_writer_is_fenced() {
    use kami::domain::points::PointsBook;
    use kami::storage::Ledger;
    let Some(bin) = nats_or_skip() else { return };
    let nats = Nats::start(bin, None);
    let js = nats.connect().await;
    let first = js.recover_ledger::<PointsBook>(3).await.unwrap();
    assert_eq!((first.book.seq(), first.replayed, first.snapshot_bytes), (0, 0, 0), "a new ledger is empty");
    let (mut book, journal) = (first.book, first.journal);
    credit(&mut book, &journal, 1, 10).await.unwrap();
    // A snapshot of more than the stream acknowledged is refused.
    let bytes = codec::encode(Kind::PointsSnapshot, &book);
    assert!(js.store_ledger_snapshot::<PointsBook>(3, &journal, 11, &bytes).await.is_err());
    assert!(js.store_ledger_snapshot::<PointsBook>(3, &journal, 10, &bytes).await.unwrap());
    credit(&mut book, &journal, 11, 5).await.unwrap();

    // The next owner starts from the snapshot and replays only what follows it.
    let next = js.recover_ledger::<PointsBook>(3).await.unwrap();
    assert_eq!((next.book.seq(), next.replayed, next.snapshot_bytes), (15, 5, bytes.len() as u64));
    assert_eq!(next.book.balance("alice").balance, 150);
    assert_eq!(next.book.statement("alice", 100), book.statement("alice", 100), "the same ledger lines");
    // Another shard of the ledger is a journal of its own.
    assert_eq!(js.recover_ledger::<PointsBook>(4).await.unwrap().book.seq(), 0);

    // The old owner can no longer extend the history the next one opened.
    let (mut next_book, next_journal) = (next.book, next.journal);
    credit(&mut next_book, &next_journal, 16, 1).await.unwrap();
    assert!(credit(&mut book, &journal, 16, 1).await.is_err(), "a stale writer is fenced");
    let last = js.recover_ledger::<PointsBook>(3).await.unwrap();
    assert_eq!((last.book.seq(), last.book.balance("alice").balance), (16, 160));
}
