//! Merchant webhook delivery: one worker per endpoint reads every stock shard's
//! journal (the outbox: `domain::webhook::events_of` says what each record
//! reports), renders each event the endpoint takes, signs it and POSTs it.
//!
//! - Only durable records are read: a round notes where each journal ends, waits
//!   for one flush, and reads up to there. An event is therefore never sent for a
//!   change that a crash could still undo.
//! - A journal's events go out in journal order, one at a time: a failing event
//!   holds back the rest of its journal (so an order's events arrive in order),
//!   never the other journals. At most `max_in_flight` journals are sent to at once.
//! - Only a 2xx counts as delivered. A failure is retried after a backoff that
//!   doubles (with jitter) up to `webhooks.backoff_max_ms`; an event failing for
//!   longer than the endpoint's `retry_horizon_secs` becomes a dead letter (kept
//!   with its body, listed and redeliverable) and the journal goes on.
//! - `webhooks.breaker_failures` failures in a row open the endpoint's breaker:
//!   nothing is sent to it until the next retry is due.
//! - The cursor (the last record done) is written after the deliveries it covers,
//!   so a crash sends some events again (receivers deduplicate by `id`), never
//!   skips one. Journals keep every record an endpoint still needs (see
//!   `storage::webhooks`).
//! - Orders never wait for any of it: the workers run on the runtime's threads,
//!   read the journal files (not the actors) and ask the actors only for what an
//!   event shows (the order as it is now, its keys).

pub mod sink;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use crate::core::webhooks::{Endpoint, Failing};
use crate::core::Kami;
use crate::domain::webhook::{self, EventType, Reported, Subject};
use crate::domain::{Event, OrderId, ShardId};
use crate::error::Error;
use crate::http::views;
use crate::storage::webhooks::DeadLetter;

/// Largest answer body read from an endpoint (the rest is not read).
const MAX_ANSWER_BYTES: usize = 4 * 1024;

/// One event ready to send: its id, type, time and the body every attempt sends.
#[derive(Debug, Clone)]
struct Prepared {
    id: String,
    kind: EventType,
    at_ms: u64,
    body: Vec<u8>,
}

/// Where one endpoint is in one journal.
#[derive(Default)]
struct Cursor {
    /// The last record wholly done (its events delivered or dead-lettered).
    done: u64,
    /// `done` as last written to storage.
    stored: u64,
    /// Records read and not yet started.
    queue: VecDeque<(u64, Event)>,
    /// The record being sent: its events and how many are done.
    head: Option<(u64, Vec<Prepared>, usize)>,
    /// The head event's failures so far.
    failing: Option<Failing>,
}

/// How an attempt at an event ended.
enum Sent {
    Delivered,
    /// Failed; tried again later.
    Later,
    /// Failed past the retry horizon: a dead letter now.
    Dead,
}

/// Most stock events waiting for one endpoint (a product's level changes at most
/// twice between two rounds, so this is reached only while the endpoint fails).
const MAX_STOCK_QUEUED: usize = 10_000;

/// What an endpoint's worker knows of products' stock levels.
#[derive(Default)]
struct Stock {
    /// The level each product was at last round.
    seen: HashMap<String, webhook::StockLevel>,
    /// The level last announced (or found at the start).
    announced: HashMap<String, webhook::StockLevel>,
    queue: VecDeque<Prepared>,
    failing: Option<Failing>,
}

/// The client deliveries go through: HTTP and HTTPS (rustls, the public roots, and
/// the roots in `ca_file` when set). Start-up checks the file first (`app::start`),
/// so an error here is a file changed since.
pub fn client(ca_file: &str) -> Result<reqwest::Client, String> {
    let mut builder = reqwest::Client::builder().pool_max_idle_per_host(64);
    for root in extra_roots(ca_file)? {
        builder = builder.add_root_certificate(root);
    }
    builder.build().map_err(|e| e.to_string())
}

/// The certificates of `webhooks.ca_file` (none when it is empty).
pub fn extra_roots(ca_file: &str) -> Result<Vec<reqwest::Certificate>, String> {
    if ca_file.is_empty() {
        return Ok(Vec::new());
    }
    let pem = std::fs::read(ca_file).map_err(|e| format!("webhooks.ca_file: {ca_file}: {e}"))?;
    let roots = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| format!("webhooks.ca_file: {ca_file}: {e}"))?;
    if roots.is_empty() {
        return Err(format!("webhooks.ca_file: {ca_file}: no certificate in it"));
    }
    Ok(roots)
}

/// Starts the supervisor of the delivery workers: one per endpoint, started when
/// an endpoint appears, stopped when it is deleted.
pub fn spawn(core: Arc<Kami>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let http = match client(&core.webhooks().settings.ca_file) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "webhooks: no HTTP client; no webhook will be sent");
                return;
            }
        };
        let poll = Duration::from_millis(core.webhooks().settings.poll_ms);
        // Dropping the set (this task aborted) aborts every worker with it.
        let mut workers = tokio::task::JoinSet::new();
        let mut running: HashMap<String, tokio::task::AbortHandle> = HashMap::new();
        loop {
            while workers.try_join_next().is_some() {}
            running.retain(|_, h| !h.is_finished());
            for endpoint in core.webhooks().all() {
                if !running.contains_key(&endpoint.name) {
                    let worker = Worker { core: core.clone(), endpoint: endpoint.clone(), http: http.clone() };
                    running.insert(endpoint.name.clone(), workers.spawn(worker.run()));
                }
            }
            tokio::time::sleep(poll).await;
        }
    })
}

struct Worker {
    core: Arc<Kami>,
    endpoint: Arc<Endpoint>,
    http: reqwest::Client,
}

/// What the journals of one round share: the breaker.
struct Breaker {
    failures: AtomicU32,
    /// No call before this (ms since the epoch).
    open_until_ms: AtomicU64,
}

impl Worker {
    async fn run(self) {
        let settings = &self.core.webhooks().settings;
        let poll = Duration::from_millis(settings.poll_ms);
        let name = self.endpoint.name.clone();
        let mut cursors: HashMap<ShardId, Cursor> = HashMap::new();
        let mut stock = Stock::default();
        let breaker = Breaker { failures: AtomicU32::new(0), open_until_ms: AtomicU64::new(0) };
        tracing::info!(endpoint = %name, url = %self.endpoint.settings.url, "webhook worker started");
        while !self.endpoint.live.removed.load(Ordering::Relaxed) {
            self.stock(&mut stock, &breaker).await;
            if let Err(e) = self.round(&mut cursors, &breaker).await {
                tracing::warn!(endpoint = %name, error = %e, "webhook round failed; trying again");
            }
            tokio::time::sleep(poll).await;
        }
        tracing::info!(endpoint = %name, "webhook worker stopped (endpoint deleted)");
    }

    async fn round(&self, cursors: &mut HashMap<ShardId, Cursor>, breaker: &Breaker) -> Result<(), Error> {
        let storage = self.core.storage().clone();
        let name = &self.endpoint.name;
        self.redeliver(breaker).await;
        // Where each journal ends now; after one flush, everything up to there is durable.
        let mut ends = Vec::new();
        for id in self.core.journals() {
            let end = storage.journal_end(&id)?;
            if !cursors.contains_key(&id) {
                let done = storage.webhook_cursor(&id, name)?.unwrap_or(0);
                if done == 0 {
                    // A journal made after the endpoint: read from its first record;
                    // the cursor (0) holds its records back from trims meanwhile.
                    storage.set_webhook_cursor(&id, name, 0)?;
                }
                cursors.insert(id.clone(), Cursor { done, stored: done, ..Cursor::default() });
            }
            ends.push((id, end));
        }
        storage.ticket()?.wait().await?;
        // Reported before sending too: a round can take a timeout's length.
        self.report(cursors, &ends);
        let now = self.core.now_ms();
        let mut ready = Vec::new();
        for (id, end) in &ends {
            let c = cursors.get_mut(id).expect("inserted above");
            let behind = c.head.is_some() || !c.queue.is_empty() || c.done < *end;
            let due = c.failing.as_ref().is_none_or(|f| f.next_attempt_ms <= now);
            if behind && due {
                ready.push((id.clone(), *end, cursors.remove(id).expect("present")));
            }
        }
        let limit = self.endpoint.settings.max_in_flight as usize;
        let done: Vec<(ShardId, Cursor)> = futures::StreamExt::collect(futures::StreamExt::buffer_unordered(
            futures::stream::iter(ready.into_iter().map(|(id, end, mut c)| async move {
                self.journal(&id, end, &mut c, breaker).await;
                (id, c)
            })),
            limit,
        ))
        .await;
        for (id, mut c) in done {
            if c.done > c.stored {
                storage.set_webhook_cursor(&id, name, c.done)?;
                c.stored = c.done;
            }
            cursors.insert(id, c);
        }
        self.report(cursors, &ends);
        Ok(())
    }

    /// Sends what is ready in one journal, in order, until it is sent through `end`,
    /// an event fails, or a batch's worth of records is done.
    async fn journal(&self, id: &ShardId, end: u64, c: &mut Cursor, breaker: &Breaker) {
        let max_batch = self.core.webhooks().settings.max_batch;
        let mut records = 0;
        loop {
            if c.head.is_none() {
                if c.queue.is_empty() {
                    if c.done >= end || records >= max_batch {
                        return;
                    }
                    let (storage, id2, after) = (self.core.storage().clone(), id.clone(), c.done);
                    let read =
                        tokio::task::spawn_blocking(move || storage.durable_records(&id2, after, end, max_batch)).await;
                    match read {
                        Ok(Ok(batch)) if !batch.is_empty() => {
                            if batch[0].0 > c.done + 1 {
                                // Cannot happen while trims respect the cursors; said loudly if it does.
                                tracing::error!(endpoint = %self.endpoint.name, journal = %id, from = c.done + 1, to = batch[0].0 - 1,
                                    "webhooks: journal records missing (trimmed before this endpoint was sent them)");
                            }
                            c.queue.extend(batch)
                        }
                        Ok(Ok(_)) => return,
                        Ok(Err(e)) => {
                            tracing::warn!(journal = %id, error = %e, "webhooks: journal not readable; trying again");
                            return;
                        }
                        Err(_) => return,
                    }
                }
                let (seq, event) = c.queue.pop_front().expect("not empty");
                records += 1;
                match self.prepare(id, seq, &event).await {
                    Ok(events) if events.is_empty() => {
                        c.done = seq;
                        continue;
                    }
                    Ok(events) => c.head = Some((seq, events, 0)),
                    Err(e) => {
                        // The actor could not say (restarting, overloaded): later.
                        tracing::debug!(journal = %id, seq, error = %e, "webhooks: event not rendered yet");
                        c.queue.push_front((seq, event));
                        return;
                    }
                }
            }
            let (seq, events, mut sent) = c.head.take().expect("a head");
            while sent < events.len() {
                match self.attempt(&events[sent], &mut c.failing, breaker).await {
                    Sent::Delivered | Sent::Dead => sent += 1,
                    Sent::Later => {
                        c.head = Some((seq, events, sent));
                        return;
                    }
                }
            }
            c.done = seq;
        }
    }

    /// One attempt at `e` (none while the breaker is open); `failing` is its
    /// failures so far, updated.
    async fn attempt(&self, e: &Prepared, failing: &mut Option<Failing>, breaker: &Breaker) -> Sent {
        let now = self.core.now_ms();
        if breaker.open_until_ms.load(Ordering::Relaxed) > now {
            return Sent::Later;
        }
        let error = match self.post(e).await {
            Ok(()) => {
                breaker.failures.store(0, Ordering::Relaxed);
                self.endpoint.live.breaker_open.store(false, Ordering::Relaxed);
                self.count("delivered");
                self.endpoint.live.delivered.fetch_add(1, Ordering::Relaxed);
                self.forget_failing(&e.id, failing);
                return Sent::Delivered;
            }
            Err(error) => error,
        };
        self.count("failed");
        self.endpoint.live.failed_attempts.fetch_add(1, Ordering::Relaxed);
        let failures = breaker.failures.fetch_add(1, Ordering::Relaxed) + 1;
        let settings = &self.core.webhooks().settings;
        let f = failing.get_or_insert(Failing {
            kind: e.kind,
            attempts: 0,
            last_error: String::new(),
            first_failed_ms: now,
            next_attempt_ms: now,
        });
        f.attempts += 1;
        f.last_error = error;
        let wait = webhook::backoff_ms(f.attempts, settings.backoff_base_ms, settings.backoff_max_ms, rand::random());
        f.next_attempt_ms = now + wait;
        if failures >= settings.breaker_failures {
            breaker.open_until_ms.store(now + wait, Ordering::Relaxed);
            self.endpoint.live.breaker_open.store(true, Ordering::Relaxed);
        }
        if now.saturating_sub(f.first_failed_ms) >= self.endpoint.settings.retry_horizon_secs * 1000 {
            self.bury(e, f);
            self.forget_failing(&e.id, failing);
            return Sent::Dead;
        }
        let listed = f.clone();
        let mut shown = self.endpoint.live.failing.lock().unwrap_or_else(|p| p.into_inner());
        if shown.len() < crate::core::webhooks::MAX_FAILING_LISTED || shown.contains_key(&e.id) {
            shown.insert(e.id.clone(), listed);
        }
        Sent::Later
    }

    /// Announces products whose stock reached a level (`stock.low`, `stock.sold_out`)
    /// from their durable counts: a level is announced when seen in two rounds in a
    /// row (keys moving between shards are counted in neither for a moment).
    async fn stock(&self, stock: &mut Stock, breaker: &Breaker) {
        let settings = &self.core.webhooks().settings;
        let wants = self.endpoint.wants(EventType::StockLow) || self.endpoint.wants(EventType::StockSoldOut);
        if !wants {
            return;
        }
        let now = self.core.now_ms();
        for (id, route) in self.core.registry().all().iter() {
            if route.shelf.get() == crate::domain::shelf::Shelf::Deleted {
                continue;
            }
            let c = route.counts();
            let threshold = settings.low_stock.get(id).copied().unwrap_or(settings.low_stock_threshold);
            let level = webhook::stock_level(c.available, c.imported, threshold);
            let seen = stock.seen.insert(id.clone(), level);
            if seen != Some(level) {
                continue; // announced once it holds for a second round
            }
            let before = stock.announced.get(id).copied();
            let Some(kind) = webhook::stock_event(before, level) else {
                stock.announced.insert(id.clone(), level);
                continue;
            };
            stock.announced.insert(id.clone(), level);
            if !self.endpoint.wants(kind) || stock.queue.len() >= MAX_STOCK_QUEUED {
                continue;
            }
            let object = json!({
                "product_id": id,
                "available": c.available,
                "reserved": c.reserved,
                "sold": c.sold,
                "imported": c.imported,
                "low_stock_threshold": threshold,
            });
            let r = Reported { index: 0, kind, subject: Subject::Order(0), at_ms: now, payment: None };
            let event_id = format!("{id}.{}.{}.{}", kind.as_str(), c.imported, c.sold);
            stock.queue.push_back(self.render(event_id, &r, object));
        }
        while let Some(e) = stock.queue.front() {
            if stock.failing.as_ref().is_some_and(|f| f.next_attempt_ms > now) {
                return;
            }
            match self.attempt(e, &mut stock.failing, breaker).await {
                Sent::Delivered | Sent::Dead => {
                    stock.queue.pop_front();
                }
                Sent::Later => return,
            }
        }
    }

    fn forget_failing(&self, id: &str, failing: &mut Option<Failing>) {
        if failing.take().is_some() {
            self.endpoint.live.failing.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
        }
    }

    /// Gives up on `e`: a dead letter, listed and redeliverable.
    fn bury(&self, e: &Prepared, f: &Failing) {
        let dead = DeadLetter {
            event_id: e.id.clone(),
            kind: e.kind.as_str().to_string(),
            at_ms: e.at_ms,
            body: e.body.clone(),
            attempts: f.attempts,
            last_error: f.last_error.clone(),
            died_at_ms: self.core.now_ms(),
        };
        match self.core.storage().put_dead_letter(&self.endpoint.name, &dead) {
            Ok(()) => {
                self.count("dead");
                self.endpoint.live.dead.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(endpoint = %self.endpoint.name, event = %e.id, attempts = f.attempts, error = %f.last_error, "webhook event given up on (dead letter)");
            }
            Err(err) => {
                tracing::error!(endpoint = %self.endpoint.name, event = %e.id, error = %err, "dead letter not stored")
            }
        }
    }

    /// Sends the dead letters queued for redelivery (each once).
    async fn redeliver(&self, breaker: &Breaker) {
        loop {
            if breaker.open_until_ms.load(Ordering::Relaxed) > self.core.now_ms() {
                return;
            }
            let Some(id) = self.endpoint.live.redeliver.lock().unwrap_or_else(|p| p.into_inner()).pop_front() else {
                return;
            };
            let storage = self.core.storage();
            let Ok(Some(mut dead)) = storage.dead_letter(&self.endpoint.name, &id) else { continue };
            let kind = EventType::parse(&dead.kind).unwrap_or(EventType::OrderCreated);
            let e = Prepared { id: id.clone(), kind, at_ms: dead.at_ms, body: dead.body.clone() };
            match self.post(&e).await {
                Ok(()) => {
                    if storage.remove_dead_letter(&self.endpoint.name, &id).is_ok() {
                        self.endpoint.live.dead.fetch_sub(1, Ordering::Relaxed);
                    }
                    self.endpoint.live.delivered.fetch_add(1, Ordering::Relaxed);
                    self.count("redelivered");
                }
                Err(error) => {
                    self.count("failed");
                    dead.attempts += 1;
                    dead.last_error = error;
                    let _ = storage.put_dead_letter(&self.endpoint.name, &dead);
                }
            }
        }
    }

    /// One signed POST; `Err` says why it did not count as delivered.
    async fn post(&self, e: &Prepared) -> Result<(), String> {
        let s = &self.endpoint.settings;
        let signature = webhook::sign(s.secret.as_bytes(), self.core.now_ms() / 1000, &e.body);
        let sent = self
            .http
            .post(&s.url)
            .timeout(Duration::from_millis(s.timeout_ms))
            .header("content-type", "application/json")
            .header("user-agent", concat!("kami-webhooks/", env!("CARGO_PKG_VERSION")))
            .header("x-kami-signature", signature)
            .header("x-kami-event-id", &e.id)
            .header("x-kami-event-type", e.kind.as_str())
            .body(e.body.clone())
            .send()
            .await;
        match sent {
            Ok(r) if r.status().is_success() => Ok(()),
            Ok(r) => {
                let status = r.status().as_u16();
                let mut body = Vec::new();
                let mut r = r;
                while let Ok(Some(chunk)) = r.chunk().await {
                    body.extend_from_slice(&chunk[..chunk.len().min(MAX_ANSWER_BYTES - body.len())]);
                    if body.len() >= MAX_ANSWER_BYTES {
                        break;
                    }
                }
                Err(format!("answered {status}: {}", String::from_utf8_lossy(&body[..body.len().min(200)])))
            }
            Err(e) if e.is_timeout() => Err(format!("no answer within {} ms", s.timeout_ms)),
            Err(e) => Err(format!("transport: {e}")),
        }
    }

    fn count(&self, result: &'static str) {
        metrics::counter!("kami_webhook_deliveries_total", "endpoint" => self.endpoint.name.clone(), "result" => result)
            .increment(1);
    }

    /// Publishes how far behind the endpoint is.
    fn report(&self, cursors: &HashMap<ShardId, Cursor>, ends: &[(ShardId, u64)]) {
        let pending: u64 = ends.iter().map(|(id, end)| end.saturating_sub(cursors.get(id).map_or(0, |c| c.done))).sum();
        let now = self.core.now_ms();
        let oldest = cursors
            .values()
            .filter_map(|c| c.head.as_ref().and_then(|(_, events, sent)| events.get(*sent)).map(|e| e.at_ms))
            .min();
        let lag_ms = oldest.map_or(0, |at| now.saturating_sub(at));
        let live = &self.endpoint.live;
        live.pending_records.store(pending, Ordering::Relaxed);
        live.lag_ms.store(lag_ms, Ordering::Relaxed);
        let name = self.endpoint.name.clone();
        metrics::gauge!("kami_webhook_pending", "endpoint" => name.clone()).set(pending as f64);
        metrics::gauge!("kami_webhook_lag_seconds", "endpoint" => name.clone()).set(lag_ms as f64 / 1000.0);
        metrics::gauge!("kami_webhook_dead", "endpoint" => name.clone()).set(live.dead.load(Ordering::Relaxed) as f64);
        let over = pending > self.core.webhooks().settings.max_pending_records;
        metrics::gauge!("kami_webhook_backlog_exceeded", "endpoint" => name).set(if over { 1.0 } else { 0.0 });
    }

    /// The events record `seq` of journal `id` reports that this endpoint takes,
    /// rendered.
    async fn prepare(&self, id: &ShardId, seq: u64, event: &Event) -> Result<Vec<Prepared>, Error> {
        let mut out = Vec::new();
        for r in webhook::events_of(event) {
            let base = format!("{}.{}.{}.{}", id.product, id.shard, seq, r.index);
            match &r.subject {
                Subject::GroupOf(order_seq) => self.group_completed(id, &base, &r, *order_seq, &mut out).await?,
                _ if !self.endpoint.wants(r.kind) => {}
                subject => {
                    let object = match subject {
                        Subject::Order(order_seq) => self.order_object(id, *order_seq, event, r.kind).await?,
                        Subject::Group(group_seq) => self.group_object(id, *group_seq).await?,
                        Subject::Payment { channel, payment_id } => {
                            match self.core.payment_record(id, channel, payment_id).await? {
                                Some(p) => self.order_object(id, p.order_seq, event, r.kind).await?,
                                None => json!({"payment_id": payment_id, "channel": channel}),
                            }
                        }
                        Subject::GroupOf(_) => unreachable!("matched above"),
                    };
                    out.push(self.render(base, &r, object));
                }
            }
        }
        Ok(out)
    }

    /// A `Delivered` payment completes a group when its order holds a seat: then
    /// `group.completed`, and `order.delivered` for every other seat (delivered in
    /// the same record).
    async fn group_completed(
        &self,
        id: &ShardId,
        base: &str,
        r: &Reported,
        order_seq: u64,
        out: &mut Vec<Prepared>,
    ) -> Result<(), Error> {
        let order = self.order_view(id, order_seq).await?;
        let Some(group_id) = order.as_ref().and_then(|o| o.group_id()) else { return Ok(()) };
        let group = self.core.get_group(&group_id).await?;
        if self.endpoint.wants(EventType::GroupCompleted) {
            out.push(self.render(base.to_string(), r, views::group(&group)));
        }
        if self.endpoint.wants(EventType::OrderDelivered) {
            for member in group.members.iter().filter(|m| m.seq != order_seq) {
                if member.status != crate::domain::OrderStatus::Delivered {
                    continue;
                }
                let object = match self.order_view(id, member.seq).await? {
                    Some(s) => views::listed_order(&s, self.endpoint.settings.include_keys),
                    None => json!({"order_id": order_id(id, member.seq)}),
                };
                let seat = Reported { kind: EventType::OrderDelivered, ..r.clone() };
                out.push(self.render(format!("{base}.{}", member.seq), &seat, object));
            }
        }
        Ok(())
    }

    async fn order_view(&self, id: &ShardId, seq: u64) -> Result<Option<crate::actors::shard::OrderSnapshot>, Error> {
        match self.core.get_order(&order_id(id, seq), None).await {
            Ok(s) => Ok(Some(s)),
            Err(Error::Domain(crate::domain::DomainError::OrderNotFound) | Error::ProductNotFound) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The order an event is about: as created for `order.created` (from the
    /// record itself), as it is now for the others.
    async fn order_object(&self, id: &ShardId, seq: u64, event: &Event, kind: EventType) -> Result<Value, Error> {
        let include_keys = self.endpoint.settings.include_keys;
        if kind == EventType::OrderCreated {
            if let Some(s) = created_view(id, event) {
                return Ok(views::listed_order(&s, false));
            }
        }
        Ok(match self.order_view(id, seq).await? {
            Some(s) => views::listed_order(&s, include_keys),
            None => json!({"order_id": order_id(id, seq)}),
        })
    }

    async fn group_object(&self, id: &ShardId, seq: u64) -> Result<Value, Error> {
        let group_id = crate::domain::group::GroupId { shard: id.clone(), seq }.to_string();
        match self.core.get_group(&group_id).await {
            Ok(g) => Ok(views::group(&g)),
            Err(Error::Domain(crate::domain::DomainError::GroupNotFound)) => Ok(json!({"group_id": group_id})),
            Err(e) => Err(e),
        }
    }

    fn render(&self, id: String, r: &Reported, object: Value) -> Prepared {
        let mut data = json!({ "object": object });
        if let Some(p) = &r.payment {
            data["payment"] = json!({
                "channel": p.channel,
                "payment_id": p.payment_id,
                "amount_cents": p.amount_cents,
                "status": p.status,
                "outcome": serde_json::to_value(p.outcome).unwrap_or(Value::Null),
                "at": views::ts(p.at_ms),
            });
        }
        let body = json!({
            "id": id,
            "type": r.kind.as_str(),
            "created_at": views::ts(r.at_ms),
            "endpoint": self.endpoint.name,
            "data": data,
        });
        Prepared { id, kind: r.kind, at_ms: r.at_ms, body: serde_json::to_vec(&body).expect("JSON") }
    }
}

fn order_id(id: &ShardId, seq: u64) -> String {
    OrderId { shard: id.clone(), seq }.to_string()
}

/// The order of an `order.created` record, as it was created.
fn created_view(id: &ShardId, event: &Event) -> Option<crate::actors::shard::OrderSnapshot> {
    let (order, group, pricing) = match event {
        Event::OrderCreated { order } | Event::OrderCreatedWithPassword { order, .. } => (order, None, None),
        Event::OrderCreatedPriced { order, pricing, .. } => (order, None, Some(pricing.clone())),
        Event::GroupOpened { group, order } => (order, Some(group.seq), None),
        Event::GroupJoined { group, order } => (order, Some(*group), None),
        _ => return None,
    };
    Some(crate::actors::shard::OrderSnapshot {
        order: order.clone(),
        product_id: id.product.clone(),
        shard: id.shard,
        keys: Vec::new(),
        replayed: false,
        group,
        pricing,
    })
}
