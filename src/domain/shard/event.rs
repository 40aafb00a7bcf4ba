//! What a shard journals: its events and the payment records they carry.

use super::*;
use crate::domain::pricing::OrderPricing;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefundReason {
    /// Paid after expiry or cancellation and no key could be had.
    SoldOut,
    /// A second, different payment for an order that was already paid.
    AlreadyPaid,
    /// A group member's payment: the group failed to fill before its deadline.
    GroupFailed,
    /// A payment for a group seat its buyer gave up (cancelled or let expire) first.
    LeftGroup,
    /// (v5) A payment for an order already archived (closed or delivered long ago):
    /// owed back, the archived order unchanged.
    OrderArchived,
    /// (v10) Paid after its order expired or was cancelled, when the order used a
    /// coupon: the coupon's use was given back then, so the order is not delivered.
    CouponReturned,
}

impl RefundReason {
    /// Whether a refund for this reason is the order's own payment (the order then
    /// goes `refund_pending` → `refunded`), rather than an extra one.
    pub fn takes_order(self) -> bool {
        !matches!(self, RefundReason::AlreadyPaid | RefundReason::OrderArchived)
    }
}

/// What a payment notification did. Recorded per `payment_id` so repeats get the same answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PaymentOutcome {
    Delivered,
    RefundOwed(RefundReason),
    /// A status other than `paid`: recorded, changes nothing.
    Ignored,
    AmountMismatch {
        expected_cents: u64,
    },
    /// A refund that was owed has been confirmed by the channel.
    Refunded(RefundReason),
    /// A group member paid; the order stays `paid`, its keys reserved, until every
    /// seat is paid (then `Delivered`) or the group fails (then `RefundOwed`).
    AwaitingGroup,
}

impl PaymentOutcome {
    /// Whether this payment is the one its order was paid with.
    pub fn takes_order(self) -> bool {
        match self {
            PaymentOutcome::Delivered | PaymentOutcome::AwaitingGroup => true,
            PaymentOutcome::RefundOwed(r) | PaymentOutcome::Refunded(r) => r.takes_order(),
            PaymentOutcome::Ignored | PaymentOutcome::AmountMismatch { .. } => false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentRecord {
    pub payment_id: String,
    pub order_seq: u64,
    pub channel: String,
    pub amount_cents: u64,
    pub status: String,
    pub at_ms: Millis,
    pub outcome: PaymentOutcome,
}

impl Event {
    /// What happened to an order, for counting (`kami_order_events_total{event}`):
    /// `None` for events that are not about one order.
    pub fn order_event_name(&self) -> Option<&'static str> {
        match self {
            Event::OrderCreated { .. } | Event::OrderCreatedWithPassword { .. } | Event::OrderCreatedPriced { .. } => {
                Some("created")
            }
            Event::PaymentApplied { record, .. } => match record.outcome {
                PaymentOutcome::Delivered => Some("delivered"),
                PaymentOutcome::RefundOwed(_) => Some("refund_owed"),
                PaymentOutcome::Ignored | PaymentOutcome::AmountMismatch { .. } => Some("payment_ignored"),
                PaymentOutcome::Refunded(_) => Some("refunded"),
                PaymentOutcome::AwaitingGroup => Some("paid_awaiting_group"),
            },
            Event::OrderExpired { .. } => Some("expired"),
            Event::OrderCancelled { .. } => Some("cancelled"),
            Event::RefundCompleted { .. } => Some("refunded"),
            Event::OrderRedeemed { .. } => Some("redeemed"),
            Event::GroupOpened { .. } | Event::GroupJoined { .. } => Some("created"),
            Event::GroupFailed { .. }
            | Event::OrdersArchived { .. }
            | Event::KeysImported { .. }
            | Event::KeysLent { .. }
            | Event::KeysReceived { .. }
            | Event::TransferSettled { .. }
            | Event::KeysWithdrawn { .. } => None,
        }
    }
}

/// A journaled state change. Applying the same events in the same order to a new
/// shard yields the same state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    KeysImported {
        keys: Vec<String>,
    },
    OrderCreated {
        order: Order,
    },
    PaymentApplied {
        record: PaymentRecord,
        taken_keys: Vec<KeyId>,
    },
    OrderExpired {
        seq: u64,
        at_ms: Millis,
    },
    OrderCancelled {
        seq: u64,
        at_ms: Millis,
    },
    /// The channel confirmed the refund of a payment whose outcome was `RefundOwed`.
    RefundCompleted {
        channel: String,
        payment_id: String,
        at_ms: Millis,
    },
    /// (v3) Available keys, taken from the back of the queue, left for sibling shard
    /// `to`. They wait in `unsettled` until the borrower is known to have them.
    KeysLent {
        transfer: u64,
        to: u16,
        keys: Vec<KeyId>,
    },
    /// (v3) Keys lent by sibling shard `from` arrived (once per `(from, transfer)`).
    KeysReceived {
        from: u16,
        transfer: u64,
        keys: Vec<String>,
    },
    /// (v3) The borrower of `transfer` is known to hold its keys.
    TransferSettled {
        transfer: u64,
    },
    /// An order paid with points, delivered in the same step (step 2 of a
    /// redemption, see `domain::points`). Its `payment_id` is [`redeemed_payment_id`].
    OrderRedeemed {
        order: Order,
    },
    /// (v4) A group opened (see `domain::group`), with its first member's order.
    GroupOpened {
        group: Group,
        order: Order,
    },
    /// (v4) A buyer took a free seat of an open group.
    GroupJoined {
        group: u64,
        order: Order,
    },
    /// (v4) The group's deadline passed before every seat was paid: unpaid members
    /// are cancelled, paid members owed a refund, reservations released. (A group
    /// completes inside the `PaymentApplied` of its last seat: one event, so a
    /// crash cannot leave a group half delivered.)
    GroupFailed {
        group: u64,
        at_ms: Millis,
    },
    /// (v5) Orders that can no longer change, already written to the archive
    /// (`storage`), leave memory; what the shard still needs of them stays in
    /// [`Archived`]. Their idempotency keys are kept until `created_at + keep_keys_ms`.
    OrdersArchived {
        seqs: Vec<u64>,
        at_ms: Millis,
        keep_keys_ms: Millis,
    },
    /// (v6) The merchant took available keys out of stock (at most
    /// [`super::MAX_KEYS_PER_EVENT`] per event). They stay known (a withdrawn key
    /// cannot be imported again) and are never sold.
    KeysWithdrawn {
        keys: Vec<KeyId>,
    },
    /// (v7) An order created with a query password (see `domain::lookup`): an
    /// `OrderCreated` that also records the password's stored form.
    OrderCreatedWithPassword {
        order: Order,
        password: PasswordHash,
    },
    /// (v9) An order created at other than its list price (a quantity tier): an
    /// `OrderCreated` that also records how it was priced, and its query password
    /// if it has one.
    OrderCreatedPriced {
        order: Order,
        password: Option<PasswordHash>,
        pricing: OrderPricing,
    },
}
