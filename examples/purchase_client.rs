//! The full-purchase load client of `benches/flash_sale.sh`: C keep-alive
//! connections, each buying in a loop for S seconds — create an order for a new
//! buyer, send the signed payment notification, read the order with its token —
//! over plain HTTP/1.1 written and parsed by hand, so that the client costs little
//! next to the server it measures (the same client drives kami and the Redis shop).
//!
//! `purchase_client ADDR PRODUCT SECRET CONNS SECS` prints one line:
//! `purchases N per_sec X create_p99_ms A notify_p99_ms B read_p99_ms C failed F duplicate_keys D`.
//! Exit status 1 if a purchase failed or a key was delivered twice.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Conn {
    tcp: TcpStream,
    buf: Vec<u8>,
    host: String,
}

impl Conn {
    /// Sends one request and returns the status and the body of its answer.
    async fn call(&mut self, method: &str, path: &str, headers: &str, body: &[u8]) -> std::io::Result<(u16, Vec<u8>)> {
        let mut req = Vec::with_capacity(256 + body.len());
        req.extend_from_slice(
            format!(
                "{method} {path} HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{headers}\r\n",
                self.host,
                body.len()
            )
            .as_bytes(),
        );
        req.extend_from_slice(body);
        self.tcp.write_all(&req).await?;
        loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                let head = std::str::from_utf8(&self.buf[..end]).map_err(std::io::Error::other)?;
                let status: u16 = head.get(9..12).and_then(|s| s.parse().ok()).ok_or_else(|| bad("status line"))?;
                let length = head
                    .lines()
                    .find_map(|l| {
                        let (name, value) = l.split_once(':')?;
                        name.eq_ignore_ascii_case("content-length").then(|| value.trim().parse::<usize>().ok())?
                    })
                    .ok_or_else(|| bad("content-length"))?;
                while self.buf.len() < end + 4 + length {
                    self.fill().await?;
                }
                let body = self.buf[end + 4..end + 4 + length].to_vec();
                self.buf.drain(..end + 4 + length);
                return Ok((status, body));
            }
            self.fill().await?;
        }
    }

    async fn fill(&mut self) -> std::io::Result<()> {
        let mut chunk = [0u8; 8192];
        let n = self.tcp.read(&mut chunk).await?;
        if n == 0 {
            return Err(bad("connection closed"));
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }
}

fn bad(what: &str) -> std::io::Error {
    std::io::Error::other(format!("bad answer: {what}"))
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The string value of `"name":"..."` in a JSON body (the answers are flat enough).
fn field<'a>(body: &'a str, name: &str) -> Option<&'a str> {
    let at = body.find(&format!("\"{name}\":"))? + name.len() + 3;
    let rest = body[at..].trim_start().strip_prefix('"')?;
    Some(&rest[..rest.find('"')?])
}

/// The number value of `"name":123` in a JSON body.
fn number(body: &str, name: &str) -> Option<u64> {
    let at = body.find(&format!("\"{name}\":"))? + name.len() + 3;
    let rest = body[at..].trim_start();
    rest[..rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len())].parse().ok()
}

#[derive(Default)]
struct Tally {
    purchases: u64,
    failed: u64,
    keys: Vec<String>,
    create: Option<Histogram<u64>>,
    notify: Option<Histogram<u64>>,
    read: Option<Histogram<u64>>,
    first_failure: Option<String>,
}

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds")
}

/// Buyers are `b{run}-{connection}-{n}`, `run` new for every run of the client.
async fn buyer_loop(addr: String, product: String, secret: String, worker: String, stop: Arc<AtomicBool>) -> Tally {
    let mut t = Tally { create: Some(hist()), notify: Some(hist()), read: Some(hist()), ..Tally::default() };
    let Ok(tcp) = TcpStream::connect(&addr).await else {
        t.failed += 1;
        t.first_failure = Some(format!("could not connect to {addr}"));
        return t;
    };
    let _ = tcp.set_nodelay(true);
    let mut conn = Conn { tcp, buf: Vec::with_capacity(16 << 10), host: addr };
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        match purchase(&mut conn, &product, &secret, &worker, i, &mut t).await {
            Ok(key) => {
                t.purchases += 1;
                t.keys.push(key);
            }
            Err(e) => {
                t.failed += 1;
                t.first_failure.get_or_insert(e);
                break;
            }
        }
    }
    t
}

async fn purchase(
    conn: &mut Conn,
    product: &str,
    secret: &str,
    worker: &str,
    i: u64,
    t: &mut Tally,
) -> Result<String, String> {
    let started = Instant::now();
    let body = format!(r#"{{"product_id":"{product}","quantity":1,"buyer":"{worker}-{i}"}}"#);
    let (status, answer) = conn.call("POST", "/api/v1/orders", "", body.as_bytes()).await.map_err(|e| e.to_string())?;
    let answer = String::from_utf8_lossy(&answer).into_owned();
    if status != 201 {
        return Err(format!("create: {status} {answer}"));
    }
    t.create.as_mut().expect("set").saturating_record(started.elapsed().as_micros() as u64);
    let (Some(id), Some(token), Some(amount)) =
        (field(&answer, "order_id"), field(&answer, "query_token"), number(&answer, "amount_cents"))
    else {
        return Err(format!("create: unexpected answer {answer}"));
    };
    let note = format!(
        r#"{{"order_id":"{id}","payment_id":"pay-{id}","amount_cents":{amount},"status":"paid","timestamp":{},"nonce":"{:032x}"}}"#,
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        rand::random::<u128>()
    );
    let signature = kami::domain::signature::sign(secret.as_bytes(), note.as_bytes());
    let started = Instant::now();
    let path = "/api/v1/payments/sandbox/notify";
    let (status, paid) = conn
        .call("POST", path, &format!("x-signature: {signature}\r\n"), note.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    if status != 200 {
        return Err(format!("notify: {status} {}", String::from_utf8_lossy(&paid)));
    }
    t.notify.as_mut().expect("set").saturating_record(started.elapsed().as_micros() as u64);
    let started = Instant::now();
    let (status, read) = conn
        .call("GET", &format!("/api/v1/orders/{id}"), &format!("x-order-token: {token}\r\n"), b"")
        .await
        .map_err(|e| e.to_string())?;
    let read = String::from_utf8_lossy(&read).into_owned();
    if status != 200 || field(&read, "status") != Some("delivered") {
        return Err(format!("read: {status} {read}"));
    }
    t.read.as_mut().expect("set").saturating_record(started.elapsed().as_micros() as u64);
    let at = read.find("\"keys\":[").ok_or_else(|| format!("read: no keys in {read}"))? + 8;
    let key = read[at..].trim_start().strip_prefix('"').and_then(|k| k.split('"').next());
    key.map(str::to_string).ok_or_else(|| format!("read: no key in {read}"))
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 6 {
        eprintln!("usage: purchase_client ADDR PRODUCT SECRET CONNS SECS");
        std::process::exit(2);
    }
    let (addr, product, secret) = (args[1].clone(), args[2].clone(), args[3].clone());
    let conns: usize = args[4].parse().expect("CONNS");
    let secs: u64 = args[5].parse().expect("SECS");
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let (tally, elapsed) = runtime.block_on(async move {
        let stop = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let run = rand::random::<u32>();
        let tasks: Vec<_> = (0..conns)
            .map(|w| {
                let worker = format!("b{run:08x}-{w}");
                tokio::spawn(buyer_loop(addr.clone(), product.clone(), secret.clone(), worker, stop.clone()))
            })
            .collect();
        tokio::time::sleep(Duration::from_secs(secs)).await;
        stop.store(true, Ordering::Relaxed);
        let mut all = Tally { create: Some(hist()), notify: Some(hist()), read: Some(hist()), ..Tally::default() };
        for task in tasks {
            let t = task.await.expect("buyer task");
            all.purchases += t.purchases;
            all.failed += t.failed;
            all.keys.extend(t.keys);
            for (into, from) in [(&mut all.create, t.create), (&mut all.notify, t.notify), (&mut all.read, t.read)] {
                into.as_mut().expect("set").add(from.expect("set")).expect("same bounds");
            }
            if all.first_failure.is_none() {
                all.first_failure = t.first_failure;
            }
        }
        (all, started.elapsed())
    });
    let distinct: HashSet<&String> = tally.keys.iter().collect();
    let duplicates = tally.keys.len() - distinct.len();
    let p99 = |h: &Option<Histogram<u64>>| h.as_ref().expect("set").value_at_quantile(0.99) as f64 / 1000.0;
    println!(
        "purchases {} per_sec {:.0} create_p99_ms {:.1} notify_p99_ms {:.1} read_p99_ms {:.1} failed {} duplicate_keys {}",
        tally.purchases,
        tally.purchases as f64 / elapsed.as_secs_f64(),
        p99(&tally.create),
        p99(&tally.notify),
        p99(&tally.read),
        tally.failed,
        duplicates
    );
    if let Some(failure) = &tally.first_failure {
        eprintln!("first failure: {failure}");
    }
    if tally.failed > 0 || duplicates > 0 {
        std::process::exit(1);
    }
}
