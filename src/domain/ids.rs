//! Identifiers that carry routing information.
//!
//! An order id names the shard that owns the order, so any request about an order
//! goes straight to its owner without a lookup in a shared table:
//! `"{product_id}.{shard}.{seq}"`, e.g. `p1.0.42`. Product ids cannot contain `.`
//! (see [`super::validate::product_id`]), which keeps the format unambiguous.

use std::fmt;

/// One stock shard of one product: the unit of ownership (one actor each).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ShardId {
    pub product: String,
    pub shard: u16,
}

impl ShardId {
    pub fn new(product: impl Into<String>, shard: u16) -> Self {
        ShardId { product: product.into(), shard }
    }
}

impl fmt::Display for ShardId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#{}", self.product, self.shard)
    }
}

/// A parsed order id.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct OrderId {
    pub shard: ShardId,
    pub seq: u64,
}

/// Splits an id of the form `{product}.{shard}.{rest}` (at most 96 bytes, a valid
/// product id) into its shard and the rest, for the ids that route to a shard.
pub(crate) fn split_routed(s: &str) -> Option<(ShardId, &str)> {
    if s.len() > 96 {
        return None;
    }
    let mut parts = s.rsplitn(3, '.');
    let rest = parts.next()?;
    let shard: u16 = canonical_number(parts.next()?)?;
    let product = parts.next()?;
    super::validate::is_product_id(product).then(|| (ShardId::new(product, shard), rest))
}

/// A number written the one way kami writes it: digits only, no sign, no leading
/// zero (so one order has one id: `p.00.1` and `p.0.+1` are not `p.0.1`).
pub(crate) fn canonical_number<T: std::str::FromStr>(s: &str) -> Option<T> {
    let digits = !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits || (s.len() > 1 && s.starts_with('0')) {
        return None;
    }
    s.parse().ok()
}

impl OrderId {
    pub fn parse(s: &str) -> Option<OrderId> {
        let (shard, seq) = split_routed(s)?;
        Some(OrderId { shard, seq: canonical_number(seq)? })
    }
}

impl fmt::Display for OrderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.shard.product, self.shard.shard, self.seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_id_round_trips() {
        let id = OrderId { shard: ShardId::new("hot-item_2", 3), seq: 987654321 };
        assert_eq!(id.to_string(), "hot-item_2.3.987654321");
        assert_eq!(OrderId::parse(&id.to_string()), Some(id));
    }

    #[test]
    fn order_id_rejects_garbage() {
        for bad in [
            "",
            "p1",
            "p1.0",
            "p1.x.1",
            "p1.0.-1",
            ".0.1",
            "P1.0.1",
            "p.1.0.1",
            "p1.70000.1",
            "p.00.1",
            "p.0.+1",
            "p.0.01",
            "p.+0.1",
            "p.0. 1",
        ] {
            assert_eq!(OrderId::parse(bad), None, "{bad:?}");
        }
    }
}
