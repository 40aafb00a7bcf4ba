//! [`PaymentSupervisor`]: the actor that talks to payment gateways on kami's
//! behalf. It is never on the order path: orders read channel health from the
//! atomics in [`Channels`], notifications go straight to the stock actors.
//!
//! Every `sweep_interval_ms` it asks each stock actor for its payment work
//! ([`shard::GetPaymentWork`]: orders never heard of, refunds owed), then
//!
//! * queries every channel with a gateway about each unheard order whose backoff
//!   is due (first `query_after_ms` after creation, then doubling up to
//!   `query_max_interval_ms`, within each channel's `queries_per_sec`); a `paid`
//!   answer goes through [`super::call::apply_payment`], the very path of a
//!   notification, so a payment found twice (query and late notification) is
//!   applied once;
//! * refunds each payment owed at its channel and, once the gateway says
//!   `refunded`, records it at the stock actor ([`shard::CompleteRefund`]); a
//!   failed refund backs off up to `refund_max_interval_ms` and is retried forever;
//! * checks each gateway's health every `health_interval_ms`, which is also the
//!   half-open probe of an open breaker.
//!
//! Each call's result feeds that channel's [`Breaker`]; its state is published to
//! [`Channels`] (routing of new orders) and to `/metrics`. Calls in flight are
//! bounded by `max_calls_in_flight`; one sweep runs at a time.
//!
//! Nothing here is durable, by design: everything it acts on is derived from the
//! shards' state, so a killed supervisor restarts empty (breakers closed) and
//! finds the same work on its next sweep. Gateways must make refunds idempotent
//! (the protocol requires it), since a refund may be sent again after a kill.

use std::collections::{HashMap, HashSet};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use futures::StreamExt;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use super::admission;
use super::call::{apply_payment, call_shard, CallError as ActorCallError};
use super::registry::{Registry, ShardHandle};
use super::shard::{self, PaymentWork};
use super::Kill;
use crate::clock::Clock;
use crate::config::Settings;
use crate::domain::breaker::{Breaker, BreakerConfig, BreakerState};
use crate::domain::shard::{payment_key, Payment};
use crate::domain::{Millis, OrderId, PaymentOutcome, ShardId};
use crate::payments::client::{CallError, Gateway, QueryAnswer};
use crate::payments::Channels;

/// The knobs, from `[payments]`.
#[derive(Debug, Clone)]
pub struct PaymentTuning {
    pub query_after_ms: Millis,
    pub query_max_interval_ms: Millis,
    pub query_grace_ms: Millis,
    pub sweep_interval: Duration,
    pub max_unheard_per_shard: usize,
    pub refund_max_interval_ms: Millis,
    pub max_calls_in_flight: usize,
    pub health_interval_ms: Millis,
    pub breaker: BreakerConfig,
    pub request_timeout: Duration,
}

impl PaymentTuning {
    pub fn from_settings(s: &Settings) -> PaymentTuning {
        let p = &s.payments;
        PaymentTuning {
            query_after_ms: p.query_after_ms,
            query_max_interval_ms: p.query_max_interval_ms,
            query_grace_ms: p.query_grace_secs * 1000,
            sweep_interval: Duration::from_millis(p.sweep_interval_ms),
            max_unheard_per_shard: p.max_unheard_per_shard,
            refund_max_interval_ms: p.refund_max_interval_ms,
            max_calls_in_flight: p.max_calls_in_flight,
            health_interval_ms: p.health_interval_ms,
            breaker: BreakerConfig {
                max_consecutive_failures: p.breaker.max_consecutive_failures,
                failure_rate_percent: p.breaker.failure_rate_percent,
                min_calls: p.breaker.min_calls,
                window_ms: p.breaker.window_ms,
                cooldown_ms: p.breaker.cooldown_ms,
                max_window_calls: 1024,
            },
            request_timeout: s.request_timeout(),
        }
    }
}

pub struct PaymentEnv {
    pub registry: Arc<Registry>,
    pub channels: Arc<Channels>,
    pub clock: Arc<dyn Clock>,
    pub tuning: PaymentTuning,
    pub http: reqwest::Client,
}

/// One channel as the supervisor drives it.
struct DrivenChannel {
    gateway: Option<Gateway>,
    breaker: Breaker,
    queries: DefaultDirectRateLimiter,
    calls_total: u64,
    failures_total: u64,
    last_error: Option<String>,
}

#[derive(Debug, Clone, Copy)]
struct Backoff {
    attempts: u32,
    next_at_ms: Millis,
}

impl Backoff {
    /// After an attempt at `now_ms`: the next one `first_ms × 2^attempts` later, capped.
    fn advance(&mut self, now_ms: Millis, first_ms: Millis, max_ms: Millis) {
        let delay = first_ms.saturating_mul(1u64 << self.attempts.min(32)).min(max_ms);
        self.attempts = self.attempts.saturating_add(1);
        self.next_at_ms = now_ms.saturating_add(delay);
    }
}

pub struct PaymentSupervisor {
    env: Arc<PaymentEnv>,
    lanes: Vec<DrivenChannel>,
    /// Order id → when to ask the channels next. Holds only orders of the last sweep.
    queries: HashMap<String, Backoff>,
    /// Payment key (channel/id) → when to try its refund next. Holds only refunds of the last sweep.
    refunds: HashMap<String, Backoff>,
    sweeping: bool,
    last_health_ms: Millis,
}

// ---- messages ----

/// Runs one sweep now, ignoring the backoff schedules, and reports what it found
/// and fixed (`POST /api/v1/admin/reconcile`).
#[derive(Message)]
#[rtype(result = "ReconcileReport")]
pub struct Reconcile;

/// The channels and their breakers (`GET /api/v1/admin/payments/channels`).
#[derive(Message)]
#[rtype(result = "Vec<ChannelStatus>")]
pub struct ListChannels;

/// One channel as the payment supervisor sees it.
#[derive(Debug, Clone)]
pub struct ChannelStatus {
    pub name: String,
    pub kind: crate::config::ChannelKind,
    pub endpoint: Option<String>,
    pub priority: u32,
    pub weight: u32,
    pub state: &'static str,
    pub opened_total: u64,
    pub calls_total: u64,
    pub failures_total: u64,
    pub last_error: Option<String>,
}

/// What one payment sweep did.
#[derive(Debug, Clone, Default)]
pub struct ReconcileReport {
    pub shards: usize,
    /// Stock actors that did not answer (restarting); their work waits for the next sweep.
    pub shards_unavailable: usize,
    /// Reservations found past their expiry and released now.
    pub expired: usize,
    /// Orders with no payment heard of, still within their query window.
    pub orders_unheard: usize,
    pub queries_sent: usize,
    /// Queries not sent: the channel's breaker is open or its query rate is used up.
    pub queries_deferred: usize,
    /// Payments a channel knew of and kami did not, now applied.
    pub payments_found: Vec<FoundPayment>,
    pub refunds_completed: Vec<RefundOwed>,
    /// Refunds still owed after this sweep, with why.
    pub refunds_pending: Vec<RefundOwed>,
    /// Orders left `paid` without delivery or refund (never expected; shown, not hidden).
    pub stuck_paid: Vec<String>,
}

/// A payment a channel knew of and kami did not, now applied.
#[derive(Debug, Clone)]
pub struct FoundPayment {
    pub order_id: String,
    pub payment_id: String,
    pub channel: String,
    pub amount_cents: u64,
    pub outcome: PaymentOutcome,
}

/// A payment owed back, and why it is still owed (if it is).
#[derive(Debug, Clone)]
pub struct RefundOwed {
    pub payment_id: String,
    pub order_id: String,
    pub channel: String,
    pub amount_cents: u64,
    pub error: Option<String>,
}

// ---- one sweep: collect → plan → execute → absorb ----

struct ShardWork {
    shard: ShardId,
    handle: ShardHandle,
    work: PaymentWork,
}

enum Call {
    Query { lane: usize, order_id: String, shard: ShardHandle, seq: u64 },
    Refund { lane: usize, refund: RefundOwed, shard: ShardHandle },
    Health { lane: usize },
}

enum Done {
    Query {
        lane: usize,
        order_id: String,
        result: Result<QueryAnswer, CallError>,
        applied: Option<Result<PaymentOutcome, ActorCallError>>,
    },
    Refund {
        lane: usize,
        refund: RefundOwed,
        result: Result<(), CallError>,
        recorded: Option<Result<(), ActorCallError>>,
    },
    Health {
        lane: usize,
        result: Result<(), CallError>,
    },
}

/// Asks every stock actor for its payment work. Shards that do not answer are counted.
async fn collect(env: Arc<PaymentEnv>, full: bool) -> (Vec<ShardWork>, usize) {
    let t = &env.tuning;
    let msg = || shard::GetPaymentWork {
        // On request, even an order created this millisecond is asked about.
        quiet_ms: if full { 0 } else { t.query_after_ms },
        grace_ms: t.query_grace_ms,
        max_unheard: t.max_unheard_per_shard,
        max_refunds: t.max_unheard_per_shard,
        full,
    };
    let mut asks = Vec::new();
    for (product, route) in env.registry.all().iter() {
        for (i, handle) in route.shards.iter().enumerate() {
            let shard = ShardId::new(product.clone(), i as u16);
            let handle = handle.clone();
            let msg = msg();
            asks.push(async move {
                let sent = tokio::time::timeout(t.request_timeout, handle.addr.send(msg)).await;
                match sent {
                    Ok(Ok(Ok(work))) => Some(ShardWork { shard, handle, work }),
                    _ => None,
                }
            });
        }
    }
    let total = asks.len();
    let works: Vec<ShardWork> = futures::future::join_all(asks).await.into_iter().flatten().collect();
    let unavailable = total - works.len();
    (works, unavailable)
}

async fn execute(env: Arc<PaymentEnv>, lanes: Vec<Option<Gateway>>, calls: Vec<Call>) -> Vec<Done> {
    let limit = env.tuning.max_calls_in_flight;
    let run = |call: Call| {
        let (env, lanes) = (env.clone(), &lanes);
        async move {
            match call {
                Call::Health { lane } => {
                    let result = lanes[lane].as_ref().expect("health only with a gateway").health().await;
                    Done::Health { lane, result }
                }
                Call::Query { lane, order_id, shard, seq } => {
                    let gateway = lanes[lane].as_ref().expect("queries only with a gateway");
                    let result = gateway.query(&order_id).await;
                    let applied = match &result {
                        Ok(QueryAnswer::Paid { payment_id, amount_cents }) => {
                            let payment = Payment {
                                order_seq: seq,
                                payment_id: payment_id.clone(),
                                channel: env.channels.all()[lane].name.clone(),
                                amount_cents: *amount_cents,
                                status: "paid".into(),
                            };
                            Some(apply_payment(&shard, payment, env.tuning.request_timeout).await)
                        }
                        _ => None,
                    };
                    Done::Query { lane, order_id, result, applied }
                }
                Call::Refund { lane, refund, shard } => {
                    let gateway = lanes[lane].as_ref().expect("refunds only with a gateway");
                    let result = gateway.refund(&refund.payment_id, refund.amount_cents).await;
                    let recorded = match result {
                        Ok(()) => Some(
                            call_shard(
                                admission::Lane::Existing,
                                &shard,
                                shard::CompleteRefund {
                                    channel: refund.channel.clone(),
                                    payment_id: refund.payment_id.clone(),
                                },
                                env.tuning.request_timeout,
                            )
                            .await,
                        ),
                        Err(_) => None,
                    };
                    Done::Refund { lane, refund, result, recorded }
                }
            }
        }
    };
    futures::stream::iter(calls).map(run).buffer_unordered(limit).collect().await
}

impl PaymentSupervisor {
    pub fn new(env: Arc<PaymentEnv>) -> PaymentSupervisor {
        let lanes = Self::lanes(&env);
        PaymentSupervisor {
            env,
            lanes,
            queries: HashMap::new(),
            refunds: HashMap::new(),
            sweeping: false,
            last_health_ms: 0,
        }
    }

    fn lanes(env: &PaymentEnv) -> Vec<DrivenChannel> {
        env.channels
            .all()
            .iter()
            .enumerate()
            .map(|(i, c)| {
                env.channels.publish(i, BreakerState::Closed);
                let per_sec = NonZeroU32::new(c.queries_per_sec).expect("validated: queries_per_sec >= 1");
                DrivenChannel {
                    gateway: Gateway::for_channel(&env.http, c),
                    breaker: Breaker::new(env.tuning.breaker.clone()),
                    queries: RateLimiter::direct(Quota::per_second(per_sec)),
                    calls_total: 0,
                    failures_total: 0,
                    last_error: None,
                }
            })
            .collect()
    }

    /// Decides the calls of one sweep. `force`: ignore the backoff schedules.
    fn plan(&mut self, works: &[ShardWork], now: Millis, force: bool, report: &mut ReconcileReport) -> Vec<Call> {
        let t = self.env.tuning.clone();
        let mut calls = Vec::new();
        let mut seen_orders = HashSet::new();
        let mut seen_refunds = HashSet::new();
        for w in works {
            report.expired += w.work.expired_now;
            report.stuck_paid.extend(w.work.stuck_paid.iter().map(|&seq| order_id(&w.shard, seq)));
            for u in &w.work.unheard {
                report.orders_unheard += 1;
                let id = order_id(&w.shard, u.order_seq);
                seen_orders.insert(id.clone());
                let due_at = u.created_at_ms.saturating_add(t.query_after_ms);
                let backoff = self.queries.entry(id.clone()).or_insert(Backoff { attempts: 0, next_at_ms: due_at });
                if !force && backoff.next_at_ms > now {
                    continue;
                }
                let mut sent = false;
                for (lane, l) in self.lanes.iter_mut().enumerate() {
                    if l.gateway.is_none() {
                        continue;
                    }
                    // Rate first, so a refused query never holds the half-open probe slot.
                    if l.breaker.is_available(now) && l.queries.check().is_ok() && l.breaker.try_call(now) {
                        sent = true;
                        report.queries_sent += 1;
                        let (shard, seq) = (w.handle.clone(), u.order_seq);
                        calls.push(Call::Query { lane, order_id: id.clone(), shard, seq });
                    } else {
                        report.queries_deferred += 1;
                    }
                }
                // An attempt no channel could take is retried next sweep, not backed off.
                if sent {
                    backoff.advance(now, t.query_after_ms, t.query_max_interval_ms);
                }
            }
            for r in &w.work.refunds {
                let key = payment_key(&r.channel, &r.payment_id);
                seen_refunds.insert(key.clone());
                let view = RefundOwed {
                    payment_id: r.payment_id.clone(),
                    order_id: order_id(&w.shard, r.order_seq),
                    channel: r.channel.clone(),
                    amount_cents: r.amount_cents,
                    error: None,
                };
                let Some(lane) = self.env.channels.index_of(&r.channel) else {
                    report.refunds_pending.push(RefundOwed {
                        error: Some(format!("channel {} is no longer configured", r.channel)),
                        ..view
                    });
                    continue;
                };
                let backoff = self.refunds.entry(key).or_insert(Backoff { attempts: 0, next_at_ms: now });
                let l = &mut self.lanes[lane];
                if l.gateway.is_none() {
                    let error = Some(format!("channel {} has no endpoint to refund at", r.channel));
                    report.refunds_pending.push(RefundOwed { error, ..view });
                } else if !force && backoff.next_at_ms > now {
                    report.refunds_pending.push(RefundOwed { error: Some("backing off".into()), ..view });
                } else if !l.breaker.try_call(now) {
                    report.refunds_pending.push(RefundOwed { error: Some("channel breaker open".into()), ..view });
                } else {
                    backoff.advance(now, t.sweep_interval.as_millis() as u64, t.refund_max_interval_ms);
                    calls.push(Call::Refund { lane, refund: view, shard: w.handle.clone() });
                }
            }
        }
        // Forget schedules of orders and refunds no shard reported any more.
        self.queries.retain(|id, _| seen_orders.contains(id));
        self.refunds.retain(|id, _| seen_refunds.contains(id));
        if force || now.saturating_sub(self.last_health_ms) >= t.health_interval_ms {
            self.last_health_ms = now;
            for (lane, l) in self.lanes.iter_mut().enumerate() {
                if l.gateway.is_some() && l.breaker.try_call(now) {
                    calls.push(Call::Health { lane });
                }
            }
        }
        calls
    }

    /// Feeds results to the breakers and fills the report.
    fn absorb(&mut self, dones: Vec<Done>, now: Millis, report: &mut ReconcileReport) {
        for done in dones {
            let (lane, outcome) = match &done {
                Done::Query { lane, result, .. } => (*lane, result.as_ref().map(|_| ())),
                Done::Refund { lane, result, .. } | Done::Health { lane, result } => {
                    (*lane, result.as_ref().map(|_| ()))
                }
            };
            let name = self.env.channels.all()[lane].name.clone();
            let l = &mut self.lanes[lane];
            l.calls_total += 1;
            let failed = matches!(outcome, Err(e) if e.is_channel_failure());
            if let Err(e) = outcome {
                l.last_error = Some(e.to_string());
            }
            if failed {
                l.failures_total += 1;
            }
            l.breaker.record(now, !failed);
            let kind = match &done {
                Done::Query { .. } => "query",
                Done::Refund { .. } => "refund",
                Done::Health { .. } => "health",
            };
            let result = if failed { "failed" } else { "ok" };
            metrics::counter!("kami_payment_calls_total", "channel" => name.clone(), "call" => kind, "result" => result)
                .increment(1);
            match done {
                Done::Query {
                    order_id, result: Ok(QueryAnswer::Paid { payment_id, amount_cents }), applied, ..
                } => match applied.expect("applied when paid") {
                    Ok(outcome) => {
                        tracing::info!(order_id = %order_id, payment_id = %payment_id, channel = %name, ?outcome, "payment found by query");
                        metrics::counter!("kami_payments_found_by_query_total").increment(1);
                        report.payments_found.push(FoundPayment {
                            order_id,
                            payment_id,
                            channel: name,
                            amount_cents,
                            outcome,
                        });
                    }
                    Err(e) => {
                        tracing::warn!(order_id = %order_id, error = %e, "payment found by query not applied yet")
                    }
                },
                Done::Query { .. } | Done::Health { .. } => {}
                Done::Refund { mut refund, result, recorded, .. } => {
                    refund.error = match (result, recorded) {
                        (Ok(()), Some(Ok(()))) => None,
                        (Ok(()), Some(Err(e))) => Some(format!("refunded at the channel, not yet recorded: {e}")),
                        (Ok(()), None) => unreachable!("a refund the channel made is always recorded"),
                        (Err(e), _) => Some(e.to_string()),
                    };
                    match &refund.error {
                        None => {
                            tracing::info!(payment_id = %refund.payment_id, order_id = %refund.order_id, channel = %name, "refund completed");
                            metrics::counter!("kami_refunds_completed_total").increment(1);
                            self.refunds.remove(&payment_key(&refund.channel, &refund.payment_id));
                            report.refunds_completed.push(refund);
                        }
                        Some(e) => {
                            tracing::warn!(payment_id = %refund.payment_id, channel = %name, error = %e, "refund not completed; will retry");
                            report.refunds_pending.push(refund);
                        }
                    }
                }
            }
        }
        self.publish(now);
    }

    fn publish(&self, now: Millis) {
        for (i, (c, l)) in self.env.channels.all().iter().zip(&self.lanes).enumerate() {
            let state = l.breaker.state(now);
            self.env.channels.publish(i, state);
            metrics::counter!("kami_payment_channel_opened_total", "channel" => c.name.clone())
                .absolute(l.breaker.opened_total());
        }
    }

    /// One sweep as a future on this actor.
    fn sweep(&mut self, force: bool) -> ResponseActFuture<Self, ReconcileReport> {
        let env = self.env.clone();
        Box::pin(collect(env, force).into_actor(self).then(move |(works, unavailable), act, _| {
            let now = act.env.clock.now_ms();
            let mut report = ReconcileReport {
                shards: works.len() + unavailable,
                shards_unavailable: unavailable,
                ..Default::default()
            };
            let calls = act.plan(&works, now, force, &mut report);
            act.publish(now);
            let gateways = act.lanes.iter().map(|l| l.gateway.clone()).collect();
            execute(act.env.clone(), gateways, calls).into_actor(act).map(move |dones, act, _| {
                let now = act.env.clock.now_ms();
                act.absorb(dones, now, &mut report);
                report
            })
        }))
    }

    fn tick(&mut self, ctx: &mut Context<Self>) {
        if self.sweeping {
            return;
        }
        self.sweeping = true;
        let sweep = self.sweep(false).map(|report, act, _| {
            act.sweeping = false;
            if !report.payments_found.is_empty()
                || !report.refunds_completed.is_empty()
                || !report.stuck_paid.is_empty()
            {
                tracing::info!(
                    payments_found = report.payments_found.len(),
                    refunds_completed = report.refunds_completed.len(),
                    refunds_pending = report.refunds_pending.len(),
                    stuck_paid = report.stuck_paid.len(),
                    "payment sweep repaired orders"
                );
            }
        });
        ctx.spawn(sweep);
    }
}

fn order_id(shard: &ShardId, seq: u64) -> String {
    OrderId { shard: shard.clone(), seq }.to_string()
}

impl Actor for PaymentSupervisor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(256);
        ctx.run_interval(self.env.tuning.sweep_interval, |act, ctx| act.tick(ctx));
    }
}

impl Supervised for PaymentSupervisor {
    /// Restarts empty: breakers closed, no schedules; the next sweep finds the work again.
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        metrics::counter!("kami_actor_restarts_total").increment(1);
        tracing::info!("payment supervisor restarted");
        *self = PaymentSupervisor::new(self.env.clone());
    }
}

impl Handler<Reconcile> for PaymentSupervisor {
    type Result = ResponseActFuture<Self, ReconcileReport>;

    fn handle(&mut self, _: Reconcile, _ctx: &mut Context<Self>) -> Self::Result {
        self.sweep(true)
    }
}

impl Handler<ListChannels> for PaymentSupervisor {
    type Result = MessageResult<ListChannels>;

    fn handle(&mut self, _: ListChannels, _ctx: &mut Context<Self>) -> Self::Result {
        let now = self.env.clock.now_ms();
        let views = self
            .env
            .channels
            .all()
            .iter()
            .zip(&self.lanes)
            .map(|(c, l)| ChannelStatus {
                name: c.name.clone(),
                kind: c.kind,
                endpoint: c.endpoint.clone().or_else(|| c.adapter.as_ref().map(|a| a.endpoint().to_string())),
                priority: c.priority,
                weight: c.weight,
                state: l.breaker.state(now).name(),
                opened_total: l.breaker.opened_total(),
                calls_total: l.calls_total,
                failures_total: l.failures_total,
                last_error: l.last_error.clone(),
            })
            .collect();
        MessageResult(views)
    }
}

impl Handler<Kill> for PaymentSupervisor {
    type Result = ();

    fn handle(&mut self, _: Kill, ctx: &mut Context<Self>) {
        tracing::warn!("payment supervisor killed on request");
        ctx.stop();
    }
}
