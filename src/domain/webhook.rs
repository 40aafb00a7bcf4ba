//! Merchant webhooks: which events a journal record reports, and how a delivery is
//! signed and retried.
//!
//! A webhook event is not written anywhere of its own: it *is* a journal record
//! seen from outside. [`events_of`] maps one stock-shard record (at its journal
//! position) to the events it reports, so the outbox holds exactly the events of
//! the changes the journal holds, after any crash, and an event's id is its
//! record's position: `{product}.{shard}.{seq}.{n}`, the `n`th event of record
//! `seq` of that shard's journal. What needs the shard's state to tell (the other
//! seats of a group that completed, the order a refund was for) is named here
//! and looked up when the event is sent.

use serde::{Deserialize, Serialize};

use super::shard::{Event, PaymentOutcome, PaymentRecord};
use super::signature::hmac_sha256;

/// What happened, as a receiver filters on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum EventType {
    OrderCreated,
    OrderPaid,
    OrderDelivered,
    OrderExpired,
    OrderCancelled,
    OrderRefundPending,
    OrderRefunded,
    OrderAmountMismatch,
    GroupCompleted,
    GroupFailed,
    RedemptionSettled,
    StockLow,
    StockSoldOut,
}

impl EventType {
    pub const ALL: [EventType; 13] = [
        EventType::OrderCreated,
        EventType::OrderPaid,
        EventType::OrderDelivered,
        EventType::OrderExpired,
        EventType::OrderCancelled,
        EventType::OrderRefundPending,
        EventType::OrderRefunded,
        EventType::OrderAmountMismatch,
        EventType::GroupCompleted,
        EventType::GroupFailed,
        EventType::RedemptionSettled,
        EventType::StockLow,
        EventType::StockSoldOut,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventType::OrderCreated => "order.created",
            EventType::OrderPaid => "order.paid",
            EventType::OrderDelivered => "order.delivered",
            EventType::OrderExpired => "order.expired",
            EventType::OrderCancelled => "order.cancelled",
            EventType::OrderRefundPending => "order.refund_pending",
            EventType::OrderRefunded => "order.refunded",
            EventType::OrderAmountMismatch => "order.amount_mismatch",
            EventType::GroupCompleted => "group.completed",
            EventType::GroupFailed => "group.failed",
            EventType::RedemptionSettled => "redemption.settled",
            EventType::StockLow => "stock.low",
            EventType::StockSoldOut => "stock.sold_out",
        }
    }

    pub fn parse(s: &str) -> Option<EventType> {
        EventType::ALL.into_iter().find(|t| t.as_str() == s)
    }
}

/// What an event is about, as the record names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    /// An order of this shard, by sequence.
    Order(u64),
    /// A group of this shard, by sequence.
    Group(u64),
    /// The order a payment (by channel and id) was recorded for: known to the shard.
    Payment { channel: String, payment_id: String },
    /// The group of this order, if the order holds a seat in one (and then its
    /// other seats, delivered in the same record).
    GroupOf(u64),
}

/// One event a record reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reported {
    /// Its place among the record's events (the `n` of its id).
    pub index: u8,
    pub kind: EventType,
    pub subject: Subject,
    /// When it happened (ms since the Unix epoch), as the record says.
    pub at_ms: u64,
    /// The payment the event is about, for payment events.
    pub payment: Option<PaymentRecord>,
}

/// The events record `event` reports. Records that change no order's or group's
/// state as a receiver sees it (imports, transfers, archiving, withdrawals) report
/// none. A group that completes does so inside its last seat's `PaymentApplied`
/// (`Delivered` for a seat is only ever that): the record reports the last seat's
/// events and a [`Subject::GroupOf`] `group.completed`, which is sent with every
/// seat.
pub fn events_of(event: &Event) -> Vec<Reported> {
    let one = |kind, subject, at_ms| vec![Reported { index: 0, kind, subject, at_ms, payment: None }];
    match event {
        Event::OrderCreated { order }
        | Event::OrderCreatedWithPassword { order, .. }
        | Event::OrderCreatedPriced { order, .. }
        | Event::GroupOpened { order, .. }
        | Event::GroupJoined { order, .. } => {
            one(EventType::OrderCreated, Subject::Order(order.seq), order.created_at_ms)
        }
        Event::OrderRedeemed { order } => {
            let mut v = one(EventType::RedemptionSettled, Subject::Order(order.seq), order.created_at_ms);
            v.push(Reported {
                index: 1,
                kind: EventType::OrderDelivered,
                subject: Subject::Order(order.seq),
                at_ms: order.created_at_ms,
                payment: None,
            });
            v
        }
        Event::OrderExpired { seq, at_ms } => one(EventType::OrderExpired, Subject::Order(*seq), *at_ms),
        Event::OrderCancelled { seq, at_ms } => one(EventType::OrderCancelled, Subject::Order(*seq), *at_ms),
        Event::GroupFailed { group, at_ms } => one(EventType::GroupFailed, Subject::Group(*group), *at_ms),
        Event::RefundCompleted { channel, payment_id, at_ms } => one(
            EventType::OrderRefunded,
            Subject::Payment { channel: channel.clone(), payment_id: payment_id.clone() },
            *at_ms,
        ),
        Event::PaymentApplied { record, .. } => {
            let kinds: &[EventType] = match record.outcome {
                PaymentOutcome::Delivered => {
                    &[EventType::OrderPaid, EventType::OrderDelivered, EventType::GroupCompleted]
                }
                PaymentOutcome::AwaitingGroup => &[EventType::OrderPaid],
                PaymentOutcome::RefundOwed(_) => &[EventType::OrderPaid, EventType::OrderRefundPending],
                PaymentOutcome::AmountMismatch { .. } => &[EventType::OrderAmountMismatch],
                PaymentOutcome::Refunded(_) => &[EventType::OrderRefunded],
                PaymentOutcome::Ignored => &[],
            };
            kinds
                .iter()
                .enumerate()
                .map(|(i, &kind)| Reported {
                    index: i as u8,
                    kind,
                    subject: if kind == EventType::GroupCompleted {
                        Subject::GroupOf(record.order_seq)
                    } else {
                        Subject::Order(record.order_seq)
                    },
                    at_ms: record.at_ms,
                    payment: Some(record.clone()),
                })
                .collect()
        }
        Event::KeysImported { .. }
        | Event::KeysLent { .. }
        | Event::KeysReceived { .. }
        | Event::TransferSettled { .. }
        | Event::OrdersArchived { .. }
        | Event::KeysWithdrawn { .. } => Vec::new(),
    }
}

/// Where a product's stock stands, for `stock.low` and `stock.sold_out`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StockLevel {
    /// Never stocked: nothing to announce.
    Empty,
    Plenty,
    /// At most the threshold left, some left.
    Low,
    /// None left to sell (keys held by unpaid orders may still come back).
    SoldOut,
}

pub fn stock_level(available: u64, imported: u64, threshold: u64) -> StockLevel {
    match (imported, available) {
        (0, _) => StockLevel::Empty,
        (_, 0) => StockLevel::SoldOut,
        (_, a) if a <= threshold => StockLevel::Low,
        _ => StockLevel::Plenty,
    }
}

/// What a move from `before` (`None`: not known, as after a start) to `now`
/// announces. Announced once per arrival at a level; after a start the level
/// found is announced again (receivers deduplicate by id).
pub fn stock_event(before: Option<StockLevel>, now: StockLevel) -> Option<EventType> {
    if before == Some(now) {
        return None;
    }
    match now {
        StockLevel::Low => Some(EventType::StockLow),
        StockLevel::SoldOut => Some(EventType::StockSoldOut),
        StockLevel::Plenty | StockLevel::Empty => None,
    }
}

/// The `X-Kami-Signature` of a delivery sent at `unix_secs`:
/// `t=<unix>,v1=<hex HMAC-SHA256(secret, "<unix>.<body>")>` (Stripe's scheme).
pub fn sign(secret: &[u8], unix_secs: u64, body: &[u8]) -> String {
    format!("t={unix_secs},v1={}", hex::encode(signed_payload_mac(secret, unix_secs, body)))
}

fn signed_payload_mac(secret: &[u8], unix_secs: u64, body: &[u8]) -> [u8; 32] {
    let mut payload = format!("{unix_secs}.").into_bytes();
    payload.extend_from_slice(body);
    hmac_sha256(secret, &payload)
}

/// Why a receiver refuses a delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BadSignature {
    Malformed,
    /// `t` is further than the tolerance from the receiver's clock (a replay).
    Stale,
    Mismatch,
}

/// A receiver's check of `header` over `body` at `now_secs`: the timestamp within
/// `tolerance_secs`, and one `v1` (several may be sent while a secret rotates) the
/// MAC of `t.body`, compared in constant time.
pub fn verify(
    secret: &[u8],
    header: &str,
    body: &[u8],
    now_secs: u64,
    tolerance_secs: u64,
) -> Result<(), BadSignature> {
    use subtle::ConstantTimeEq;
    let mut t = None;
    let mut macs = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", v)) => t = Some(v.parse::<u64>().map_err(|_| BadSignature::Malformed)?),
            Some(("v1", v)) => {
                let mut mac = [0u8; 32];
                if hex::decode_to_slice(v, &mut mac).is_ok() {
                    macs.push(mac);
                }
            }
            _ => {}
        }
    }
    let t = t.ok_or(BadSignature::Malformed)?;
    if macs.is_empty() {
        return Err(BadSignature::Malformed);
    }
    if t.abs_diff(now_secs) > tolerance_secs {
        return Err(BadSignature::Stale);
    }
    let expected = signed_payload_mac(secret, t, body);
    if macs.iter().any(|m| bool::from(m.ct_eq(&expected))) {
        Ok(())
    } else {
        Err(BadSignature::Mismatch)
    }
}

/// How long to wait before attempt `attempt + 1` (the first retry is `attempt` 1):
/// `base_ms × 2^(attempt-1)`, at most `max_ms`, less up to a quarter drawn from
/// `jitter` (a number in 0..=u32::MAX the caller draws), so that many events
/// failing together do not retry together.
pub fn backoff_ms(attempt: u32, base_ms: u64, max_ms: u64, jitter: u32) -> u64 {
    let exp = base_ms.saturating_mul(1u64 << attempt.saturating_sub(1).min(40)).min(max_ms);
    exp - exp / 4 * jitter as u64 / u32::MAX as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::shard::{Order, OrderStatus, RefundReason};

    fn order(seq: u64) -> Order {
        Order {
            seq,
            buyer: "b".into(),
            quantity: 1,
            amount_cents: 100,
            created_at_ms: 5,
            expires_at_ms: 10,
            paid_at_ms: None,
            delivered_at_ms: None,
            closed_at_ms: None,
            status: OrderStatus::PendingPayment,
            keys: vec![],
            query_token: "t".into(),
            idempotency: None,
            payment_id: None,
            amount_mismatch: false,
        }
    }

    fn paid(outcome: PaymentOutcome) -> Event {
        Event::PaymentApplied {
            record: PaymentRecord {
                payment_id: "P".into(),
                order_seq: 3,
                channel: "c".into(),
                amount_cents: 100,
                status: "paid".into(),
                at_ms: 7,
                outcome,
            },
            taken_keys: vec![],
        }
    }

    fn kinds(e: &Event) -> Vec<&'static str> {
        events_of(e).iter().map(|r| r.kind.as_str()).collect()
    }

    #[test]
    fn each_record_reports_what_a_receiver_sees_change() {
        assert_eq!(kinds(&Event::OrderCreated { order: order(3) }), ["order.created"]);
        assert_eq!(kinds(&paid(PaymentOutcome::Delivered)), ["order.paid", "order.delivered", "group.completed"]);
        assert_eq!(kinds(&paid(PaymentOutcome::AwaitingGroup)), ["order.paid"]);
        assert_eq!(
            kinds(&paid(PaymentOutcome::RefundOwed(RefundReason::SoldOut))),
            ["order.paid", "order.refund_pending"]
        );
        assert_eq!(kinds(&paid(PaymentOutcome::AmountMismatch { expected_cents: 5 })), ["order.amount_mismatch"]);
        assert!(kinds(&paid(PaymentOutcome::Ignored)).is_empty(), "a payment that changed nothing");
        assert_eq!(kinds(&Event::OrderExpired { seq: 3, at_ms: 9 }), ["order.expired"]);
        assert_eq!(kinds(&Event::OrderCancelled { seq: 3, at_ms: 9 }), ["order.cancelled"]);
        assert_eq!(kinds(&Event::GroupFailed { group: 2, at_ms: 9 }), ["group.failed"]);
        assert_eq!(kinds(&Event::OrderRedeemed { order: order(4) }), ["redemption.settled", "order.delivered"]);
        let refunded = Event::RefundCompleted { channel: "c".into(), payment_id: "P".into(), at_ms: 9 };
        assert_eq!(kinds(&refunded), ["order.refunded"]);
        assert!(kinds(&Event::KeysImported { keys: vec!["k".into()] }).is_empty());
        assert!(kinds(&Event::TransferSettled { transfer: 1 }).is_empty());
        // Indexes number a record's events, so each has its own id.
        let idx: Vec<u8> = events_of(&paid(PaymentOutcome::Delivered)).iter().map(|r| r.index).collect();
        assert_eq!(idx, [0, 1, 2]);
        assert_eq!(events_of(&paid(PaymentOutcome::Delivered))[2].subject, Subject::GroupOf(3));
    }

    #[test]
    fn stock_is_announced_once_per_arrival_at_a_level() {
        use StockLevel::*;
        assert_eq!(stock_level(0, 0, 10), Empty);
        assert_eq!(stock_level(11, 100, 10), Plenty);
        assert_eq!(stock_level(10, 100, 10), Low);
        assert_eq!(stock_level(0, 100, 10), SoldOut);
        assert_eq!(stock_event(Some(Plenty), Low), Some(EventType::StockLow));
        assert_eq!(stock_event(Some(Low), Low), None, "once per arrival");
        assert_eq!(stock_event(Some(Low), SoldOut), Some(EventType::StockSoldOut));
        assert_eq!(stock_event(Some(SoldOut), Low), Some(EventType::StockLow), "keys came back, then low again");
        assert_eq!(stock_event(Some(SoldOut), Plenty), None, "a restock is not announced");
        assert_eq!(stock_event(None, SoldOut), Some(EventType::StockSoldOut), "found after a start");
        assert_eq!(stock_event(None, Plenty), None);
    }

    #[test]
    fn every_type_has_one_name() {
        for t in EventType::ALL {
            assert_eq!(EventType::parse(t.as_str()), Some(t));
        }
        assert_eq!(EventType::parse("order.shipped"), None);
    }

    #[test]
    fn a_signature_verifies_within_the_tolerance_only() {
        let body = br#"{"id":"a.0.1.0"}"#;
        let header = sign(b"whsec", 1_000, body);
        assert!(header.starts_with("t=1000,v1="));
        assert_eq!(verify(b"whsec", &header, body, 1_200, 300), Ok(()));
        assert_eq!(verify(b"whsec", &header, body, 1_301, 300), Err(BadSignature::Stale));
        assert_eq!(verify(b"other", &header, body, 1_000, 300), Err(BadSignature::Mismatch));
        assert_eq!(verify(b"whsec", &header, b"{}", 1_000, 300), Err(BadSignature::Mismatch));
        assert_eq!(verify(b"whsec", "v1=00", body, 1_000, 300), Err(BadSignature::Malformed));
        // During a rotation, one of several v1 is enough.
        let rotated = format!("{header},v1={}", "ab".repeat(32));
        assert_eq!(verify(b"whsec", &rotated, body, 1_000, 300), Ok(()));
    }

    #[test]
    fn backoff_doubles_up_to_its_ceiling_and_jitters_down_by_a_quarter_at_most() {
        assert_eq!(backoff_ms(1, 500, 60_000, 0), 500);
        assert_eq!(backoff_ms(2, 500, 60_000, 0), 1_000);
        assert_eq!(backoff_ms(5, 500, 60_000, 0), 8_000);
        assert_eq!(backoff_ms(30, 500, 60_000, 0), 60_000);
        assert_eq!(backoff_ms(u32::MAX, 500, 60_000, 0), 60_000);
        assert_eq!(backoff_ms(1, 500, 60_000, u32::MAX), 375);
    }
}
