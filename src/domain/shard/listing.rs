//! Which orders a merchant's listing keeps: a filter over an order's status, buyer
//! and creation time, checked the same on orders in memory and archived ones.

use super::{Order, OrderStatus};
use crate::domain::Millis;

/// What a merchant's order listing keeps (every field absent: everything).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OrderFilter {
    pub status: Option<OrderStatus>,
    pub buyer: Option<String>,
    /// Created at or after this instant (Unix ms).
    pub from_ms: Option<Millis>,
    /// Created before this instant (Unix ms).
    pub to_ms: Option<Millis>,
}

impl OrderFilter {
    pub fn matches(&self, order: &Order) -> bool {
        self.status.map_or(true, |s| order.status == s)
            && self.buyer.as_deref().map_or(true, |b| order.buyer == b)
            && self.from_ms.map_or(true, |t| order.created_at_ms >= t)
            && self.to_ms.map_or(true, |t| order.created_at_ms < t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(buyer: &str, status: OrderStatus, at: Millis) -> Order {
        Order {
            seq: 1,
            buyer: buyer.into(),
            quantity: 1,
            amount_cents: 100,
            created_at_ms: at,
            expires_at_ms: at + 1000,
            paid_at_ms: None,
            delivered_at_ms: None,
            closed_at_ms: None,
            status,
            keys: Vec::new(),
            query_token: "t".into(),
            idempotency: None,
            payment_id: None,
            amount_mismatch: false,
        }
    }

    #[test]
    fn every_field_narrows_and_the_range_is_half_open() {
        let o = order("ann", OrderStatus::Delivered, 100);
        assert!(OrderFilter::default().matches(&o));
        assert!(OrderFilter { status: Some(OrderStatus::Delivered), ..Default::default() }.matches(&o));
        assert!(!OrderFilter { status: Some(OrderStatus::Expired), ..Default::default() }.matches(&o));
        assert!(OrderFilter { buyer: Some("ann".into()), ..Default::default() }.matches(&o));
        assert!(!OrderFilter { buyer: Some("an".into()), ..Default::default() }.matches(&o));
        assert!(OrderFilter { from_ms: Some(100), to_ms: Some(101), ..Default::default() }.matches(&o));
        assert!(!OrderFilter { from_ms: Some(101), ..Default::default() }.matches(&o));
        assert!(!OrderFilter { to_ms: Some(100), ..Default::default() }.matches(&o));
    }
}
