//! The replicated journal backend against a real `nats-server` on loopback
//! (`scripts/test.sh` installs it): what the stream acknowledged is read back by
//! the next writer, a stale writer is fenced, purges keep the fence, and
//! acknowledged records survive the server's kill -9.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kami::storage::codec::{self, Kind};
use kami::storage::jetstream::{JetStream, JetStreamOptions, StreamJournal};
use kami::storage::StorageError;

fn nats_binary() -> Option<PathBuf> {
    ["/usr/sbin/nats-server", "/usr/bin/nats-server", "/usr/local/bin/nats-server"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// Returns the server binary, or `None` (and says so) when it is missing outside CI.
fn nats_or_skip() -> Option<PathBuf> {
    let found = nats_binary();
    if found.is_none() {
        assert!(std::env::var_os("CI").is_none(), "nats-server is missing in CI (scripts/test.sh installs it)");
        eprintln!("SKIPPED: nats-server not installed (apt-get install nats-server)");
    }
    found
}

/// One nats-server with JetStream on a loopback port, its store in a temp dir.
struct Nats {
    binary: PathBuf,
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
    max_payload: Option<usize>,
}

impl Nats {
    fn start(binary: PathBuf, max_payload: Option<usize>) -> Nats {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut nats = Nats { binary, child: None, port, dir: tempfile::tempdir().unwrap(), max_payload };
        nats.restart();
        nats
    }

    fn restart(&mut self) {
        assert!(self.child.is_none());
        let config = self.dir.path().join("nats.conf");
        let mut text = format!(
            "listen: 127.0.0.1:{}\njetstream {{ store_dir: {:?} }}\n",
            self.port,
            self.dir.path().join("store")
        );
        if let Some(max) = self.max_payload {
            text.push_str(&format!("max_payload: {max}\n"));
        }
        std::fs::write(&config, text).unwrap();
        let child = Command::new(&self.binary)
            .arg("-c")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server");
        self.child = Some(child);
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    fn options(&self) -> JetStreamOptions {
        JetStreamOptions {
            urls: vec![format!("nats://127.0.0.1:{}", self.port)],
            stream: "KAMITEST".into(),
            replicas: 1,
            timeout: Duration::from_secs(3),
            ..JetStreamOptions::default()
        }
    }

    /// Connects once the server accepts JetStream requests.
    async fn connect(&self) -> JetStream {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match JetStream::connect(self.options()).await {
                Ok(js) => return js,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("nats-server on port {} never served JetStream: {e}", self.port),
            }
        }
    }

    fn store(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.kill();
    }
}

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
    nats.kill();
    assert!(nats.store().join("store").exists());
    nats.restart();
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

    nats.kill();
    let lost = append(&log, 4, &events(4..=4, "k")).await;
    assert!(matches!(lost, Err(StorageError::Remote(_))), "{lost:?}");
    assert!(log.failed().is_some());
    assert!(log.append_all(5, &events(5..=5, "k")).is_err(), "nothing is appended after an unknown outcome");

    nats.restart();
    let js = nats.connect().await;
    let (log, records) = read(&js, "stock.8.0", 0).await;
    // Whatever the stream holds is a history: the acknowledged records, maybe the
    // unacknowledged one (it was never reported durable), nothing else.
    let seqs: Vec<u64> = records.iter().map(|r| r.0).collect();
    assert!(seqs == vec![1, 2, 3] || seqs == vec![1, 2, 3, 4], "{seqs:?}");
    let next = log.last_seq() + 1;
    append(&log, next, &events(next..=next, "k")).await.unwrap();
}
