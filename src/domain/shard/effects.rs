//! What a journaled event did, as its owner needs to know it: which orders it moved
//! (a read of one of them waits for the flush covering the event) and what to count.

use super::{Event, OrderStatus, PaymentOutcome, Shard};

/// One thing an event did, for counting (`kami_order_events_total{event}`,
/// `kami_group_events_total{event}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tally {
    /// `n` orders went through `event`.
    Orders { event: &'static str, n: u64 },
    /// A group-buy group went through `event`.
    Group { event: &'static str },
    /// A loan of `keys` keys from a sibling shard arrived (counted once per loan,
    /// whichever path delivered it: the borrowing order, or a resend after a crash).
    KeysReceived { keys: u64 },
}

impl Shard {
    /// Calls `f` with each order `event` (already applied) changed: one, or every
    /// member of a group that completed or failed. No allocation on the path of
    /// ordinary orders.
    pub fn orders_moved_by(&self, event: &Event, mut f: impl FnMut(u64)) {
        let group = match event {
            Event::GroupFailed { group, .. } => Some(*group),
            // Only the last seat's payment (it completes the group) moves the other members.
            Event::PaymentApplied { record, .. } if record.outcome == PaymentOutcome::Delivered => {
                self.group_of_order(record.order_seq)
            }
            _ => None,
        };
        match group.and_then(|g| self.group(g)) {
            Some(g) => g.orders.iter().for_each(|&o| f(o)),
            None => self.order_moved_by(event).into_iter().for_each(f),
        }
    }

    fn order_moved_by(&self, event: &Event) -> Option<u64> {
        match event {
            Event::GroupOpened { order, .. } | Event::GroupJoined { order, .. } => Some(order.seq),
            Event::GroupFailed { .. } => None,
            Event::RefundCompleted { channel, payment_id, .. } => {
                self.payment(channel, payment_id).map(|p| p.order_seq)
            }
            Event::KeysImported { .. }
            | Event::KeysLent { .. }
            | Event::KeysReceived { .. }
            | Event::TransferSettled { .. }
            | Event::OrdersArchived { .. }
            | Event::KeysWithdrawn { .. } => None,
            Event::OrderCreated { order }
            | Event::OrderCreatedWithPassword { order, .. }
            | Event::OrderCreatedPriced { order, .. }
            | Event::OrderRedeemed { order } => Some(order.seq),
            Event::PaymentApplied { record, .. } => Some(record.order_seq),
            Event::OrderExpired { seq, .. } | Event::OrderCancelled { seq, .. } => Some(*seq),
        }
    }

    /// Calls `f` with what `event` (already applied) did, for counting: a group that
    /// completes delivers all its members; one that fails cancels the unpaid seats and
    /// owes the paid ones their money back.
    pub fn tally(&self, event: &Event, mut f: impl FnMut(Tally)) {
        let order = |event| Tally::Orders { event, n: 1 };
        match event {
            Event::GroupOpened { .. } => f(Tally::Group { event: "opened" }),
            Event::GroupJoined { .. } => f(Tally::Group { event: "joined" }),
            Event::GroupFailed { group, at_ms } => {
                f(Tally::Group { event: "failed" });
                let members = self.group(*group).map(|g| g.orders.as_slice()).unwrap_or_default();
                for o in members.iter().filter_map(|&seq| self.order(seq)).filter(|o| o.closed_at_ms == Some(*at_ms)) {
                    match o.status {
                        OrderStatus::Cancelled => f(order("cancelled")),
                        OrderStatus::RefundPending => f(order("refund_owed")),
                        _ => {}
                    }
                }
                return;
            }
            Event::KeysReceived { keys, .. } => {
                f(Tally::KeysReceived { keys: keys.len() as u64 });
                return;
            }
            Event::PaymentApplied { record, .. } if record.outcome == PaymentOutcome::Delivered => {
                if let Some(g) = self.group_of_order(record.order_seq).and_then(|g| self.group(g)) {
                    f(Tally::Group { event: "completed" });
                    f(Tally::Orders { event: "delivered", n: g.size as u64 });
                    return;
                }
            }
            _ => {}
        }
        if let Some(name) = event.order_event_name() {
            f(order(name));
        }
    }
}
