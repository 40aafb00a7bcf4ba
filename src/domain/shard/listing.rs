//! Which orders a merchant's listing keeps: a filter over an order's status, buyer,
//! creation time and reseller, checked the same on orders in memory and archived ones.

use super::{Order, OrderStatus};
use crate::domain::pricing::OrderPricing;
use crate::domain::Millis;

/// What a merchant's order listing keeps (every field absent: everything).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OrderFilter {
    pub status: Option<OrderStatus>,
    pub buyer: Option<String>,
    /// Created at or after this instant (Unix ms).
    pub from_ms: Option<Millis>,
    /// Created before this instant (Unix ms).
    pub to_ms: Option<Millis>,
    /// Priced by this reseller's price list.
    pub reseller: Option<String>,
}

impl OrderFilter {
    /// Whether the filter keeps `order`, priced as `pricing` says.
    pub fn matches(&self, order: &Order, pricing: Option<&OrderPricing>) -> bool {
        let reseller = pricing.and_then(|p| p.reseller.as_deref());
        self.reseller.as_deref().is_none_or(|r| reseller == Some(r))
            && self.status.is_none_or(|s| order.status == s)
            && self.buyer.as_deref().is_none_or(|b| order.buyer == b)
            && self.from_ms.is_none_or(|t| order.created_at_ms >= t)
            && self.to_ms.is_none_or(|t| order.created_at_ms < t)
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
        assert!(OrderFilter::default().matches(&o, None));
        assert!(OrderFilter { status: Some(OrderStatus::Delivered), ..Default::default() }.matches(&o, None));
        assert!(!OrderFilter { status: Some(OrderStatus::Expired), ..Default::default() }.matches(&o, None));
        assert!(OrderFilter { buyer: Some("ann".into()), ..Default::default() }.matches(&o, None));
        assert!(!OrderFilter { buyer: Some("an".into()), ..Default::default() }.matches(&o, None));
        assert!(OrderFilter { from_ms: Some(100), to_ms: Some(101), ..Default::default() }.matches(&o, None));
        assert!(!OrderFilter { from_ms: Some(101), ..Default::default() }.matches(&o, None));
        assert!(!OrderFilter { to_ms: Some(100), ..Default::default() }.matches(&o, None));
        let acme = OrderFilter { reseller: Some("acme".into()), ..Default::default() };
        let priced = |reseller: Option<&str>| OrderPricing {
            list_unit_cents: 100,
            tier_min_quantity: None,
            reseller: reseller.map(String::from),
            coupon: None,
            discount_cents: 0,
        };
        assert!(acme.matches(&o, Some(&priced(Some("acme")))));
        assert!(!acme.matches(&o, Some(&priced(Some("other")))));
        assert!(!acme.matches(&o, Some(&priced(None))) && !acme.matches(&o, None));
    }
}
