//! The journal's durable append, local against replicated: the same order events
//! appended by "actors" (one task per shard, each turn appends one event and takes a
//! ticket; many turns wait at once) to
//! * the local journal (segment files, the group committer's `fdatasync`);
//! * a NATS JetStream stream with one copy (`nats-server` on loopback);
//! * a stream with three copies (three `nats-server`s clustered on loopback, all on
//!   this host's cores).
//!
//! Prints appends/s and the ticket latency (p50, p99) of each, and for the streams
//! how long a node taking one shard over takes to read its journal back. `cargo bench --bench
//! replicated_journal` runs 5 s each (SECS=, SHARDS=, INFLIGHT= to change); under
//! `cargo test --all-targets` a short smoke run. Needs `nats-server`
//! (`scripts/test.sh` installs it); without it only the local journal runs.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use kami::domain::shard::{NewOrder, Outcome};
use kami::domain::{Event, ProductInfo, Shard, ShardId};
use kami::storage::jetstream::{JetStream, JetStreamOptions, StreamJournal};
use kami::storage::{Journal, Storage, StorageError, StorageOptions, Ticket};
use tokio::sync::Mutex;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().map(|v| v.parse().expect("a number")).unwrap_or(default)
}

/// Order-creation events of a real shard, to append over and over.
fn order_events(n: u64) -> Vec<Event> {
    let product = ProductInfo {
        id: "p".into(),
        name: "P".into(),
        price_cents: 990,
        per_buyer_limit: 0,
        shards: 1,
        created_at_ms: 0,
    };
    let mut shard = Shard::new(product, 0);
    let _ = shard.import_keys((0..n).map(|i| format!("KEY-{i:010}")).collect());
    (0..n)
        .map(|i| {
            let new = NewOrder {
                buyer: format!("buyer{i}@example.com"),
                quantity: 1,
                idempotency: None,
                query_token: format!("{i:032x}"),
                ttl_ms: 300_000,
                password: None,
                coupon: None,
                reseller: None,
            };
            let Outcome::Changed(created, _) = shard.create_order(new, 1_000 + i).unwrap() else { unreachable!() };
            created
        })
        .collect()
}

/// A journal as an actor sees it: append a turn's records, take a ticket.
trait Sink: Send + Sync + 'static {
    fn append_one(&self, seq: u64, event: &Event) -> Result<Ticket, StorageError>;
}

struct Local(Journal, Arc<Storage>);
impl Sink for Local {
    fn append_one(&self, seq: u64, event: &Event) -> Result<Ticket, StorageError> {
        self.0.append(seq, event)?;
        self.1.ticket()
    }
}

impl Sink for StreamJournal {
    fn append_one(&self, seq: u64, event: &Event) -> Result<Ticket, StorageError> {
        self.append_all(seq, std::slice::from_ref(event))?;
        self.ticket()
    }
}

/// A shard's journal and the last sequence given out (the actor's turn).
type Turns = (Arc<dyn Sink>, u64);

/// Runs `inflight` turns at a time spread over the shards for `secs`; returns
/// (appends/s, latency histogram in µs).
async fn drive(
    sinks: Vec<Arc<dyn Sink>>,
    events: Arc<Vec<Event>>,
    inflight: usize,
    secs: u64,
) -> (f64, Histogram<u64>) {
    let shards: Vec<Arc<Mutex<Turns>>> = sinks.into_iter().map(|s| Arc::new(Mutex::new((s, 0u64)))).collect();
    let started = Instant::now();
    let stop = started + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for w in 0..inflight {
        let shard = shards[w % shards.len()].clone();
        let events = events.clone();
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 2).unwrap();
            let mut done = 0u64;
            while Instant::now() < stop {
                let t = Instant::now();
                let ticket = {
                    let mut s = shard.lock().await;
                    s.1 += 1;
                    let seq = s.1;
                    s.0.append_one(seq, &events[(seq as usize) % events.len()]).expect("append")
                };
                ticket.wait().await.expect("durable");
                let _ = hist.record(t.elapsed().as_micros().max(1) as u64);
                done += 1;
            }
            (done, hist)
        }));
    }
    let mut total = 0;
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 2).unwrap();
    for t in tasks {
        let (n, h) = t.await.unwrap();
        total += n;
        hist.add(h).unwrap();
    }
    (total as f64 / started.elapsed().as_secs_f64(), hist)
}

fn nats_binary() -> Option<PathBuf> {
    ["/usr/sbin/nats-server", "/usr/bin/nats-server", "/usr/local/bin/nats-server"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `n` nats-servers (clustered when more than one), killed on drop.
struct Servers(Vec<Child>, Vec<u16>, #[allow(dead_code)] tempfile::TempDir);

impl Servers {
    fn start(bin: &PathBuf, n: usize) -> Servers {
        let dir = tempfile::tempdir().unwrap();
        let ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let routes: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let mut children = Vec::new();
        for i in 0..n {
            let mut conf = format!(
                "server_name: n{i}\nlisten: 127.0.0.1:{}\njetstream {{ store_dir: {:?} }}\n",
                ports[i],
                dir.path().join(format!("n{i}"))
            );
            if n > 1 {
                let list: Vec<String> = routes.iter().map(|p| format!("nats-route://127.0.0.1:{p}")).collect();
                conf.push_str(&format!(
                    "cluster {{ name: bench, listen: 127.0.0.1:{}, routes: [{}] }}\n",
                    routes[i],
                    list.join(", ")
                ));
            }
            let path = dir.path().join(format!("n{i}.conf"));
            std::fs::write(&path, conf).unwrap();
            children.push(
                Command::new(bin).arg("-c").arg(&path).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap(),
            );
        }
        Servers(children, ports, dir)
    }

    async fn connect(&self) -> JetStream {
        let options = JetStreamOptions {
            urls: self.1.iter().map(|p| format!("nats://127.0.0.1:{p}")).collect(),
            stream: "BENCH".into(),
            replicas: self.1.len(),
            timeout: Duration::from_secs(10),
            ..JetStreamOptions::default()
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match JetStream::connect(options.clone()).await {
                Ok(js) => return js,
                Err(e) if Instant::now() > deadline => panic!("JetStream never came up: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn report(name: &str, (rate, hist): (f64, Histogram<u64>)) {
    println!(
        "{name:<28} | {rate:>10.0} appends/s | p50 {:>7.2} ms | p99 {:>7.2} ms",
        hist.value_at_quantile(0.5) as f64 / 1000.0,
        hist.value_at_quantile(0.99) as f64 / 1000.0
    );
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let secs = env_or("SECS", if full { 5 } else { 1 });
    let shards = env_or("SHARDS", 2) as usize;
    let inflight = env_or("INFLIGHT", if full { 256 } else { 16 }) as usize;
    let events = Arc::new(order_events(1_000));
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    println!("{shards} shards, {inflight} turns waiting at once, {secs} s each, one order event per turn");

    let dir = tempfile::tempdir().unwrap();
    let storage = Storage::open(&StorageOptions {
        path: dir.path().to_path_buf(),
        cache_capacity_bytes: 64 << 20,
        max_pending_commits: 1 << 16,
        max_commit_batch: 1 << 16,
        commit_linger: Duration::ZERO,
        commit_busy_linger: Duration::ZERO,
    })
    .unwrap();
    let sinks: Vec<Arc<dyn Sink>> = (0..shards)
        .map(|i| {
            Arc::new(Local(storage.journal(&ShardId::new("p", i as u16)).unwrap(), storage.clone())) as Arc<dyn Sink>
        })
        .collect();
    report("local journal (fdatasync)", rt.block_on(drive(sinks, events.clone(), inflight, secs)));

    let Some(bin) = nats_binary() else {
        println!("nats-server not installed: the replicated journal was not measured");
        return;
    };
    for (n, name) in [(1, "JetStream, 1 copy"), (3, "JetStream, 3 copies")] {
        let servers = Servers::start(&bin, n);
        let result = rt.block_on(async {
            let js = servers.connect().await;
            let mut sinks: Vec<Arc<dyn Sink>> = Vec::new();
            for i in 0..shards {
                sinks.push(Arc::new(js.open(&format!("stock.p.{i}"), 0, |_, _| Ok(())).await.unwrap()));
            }
            let result = drive(sinks, events.clone(), inflight, secs).await;
            // What a node taking shard 0 over reads back (no snapshot: all of it).
            let started = Instant::now();
            let mut records = 0u64;
            let journal = js
                .open("stock.p.0", 0, |_, _| {
                    records += 1;
                    Ok(())
                })
                .await
                .unwrap();
            (result, records, journal.messages_read(), started.elapsed())
        });
        let (result, records, messages, took) = result;
        report(name, result);
        println!(
            "{:<28} | read back {records} records in {messages} messages in {:.2} s ({:.0} records/s)",
            "  takeover of one shard",
            took.as_secs_f64(),
            records as f64 / took.as_secs_f64()
        );
    }
}
