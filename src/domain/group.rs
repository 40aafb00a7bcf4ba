//! Group-buy (拼团): buyers pay a lower price when `size` of them buy together
//! before a deadline.
//!
//! A group lives in one stock shard (the one its id names), so every step of one
//! group — joins, payments, completion, failure — is a step of one actor and one
//! journal; "never more than `size` members" and "completed or failed exactly once"
//! are then checks inside [`super::Shard`], not a protocol between actors.
//!
//! A member's order reserves its key at join time, at the group price. A payment
//! for it leaves it `paid` (keys still reserved) until the last seat is paid: that
//! payment delivers every member in the same journaled event. At the deadline an
//! unfilled group fails in one event: unpaid members are cancelled, paid members
//! are owed a refund (`RefundReason::GroupFailed`), every reservation is released.
//! A member who cancels (or whose order expires) before paying frees the seat.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::{Millis, ShardId};

/// Largest group any deal may ask for (`groups.max_group_size` is at most this).
pub const MAX_GROUP_SIZE: u32 = 1_000;
/// Longest time any group may take to fill (`groups.max_time_limit_secs` is at most this).
pub const MAX_TIME_LIMIT_SECS: u64 = 7 * 24 * 3600;

/// A merchant's group offer on a product.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupDeal {
    pub product_id: String,
    pub deal_id: String,
    /// Members needed for the group to complete (2..=[`MAX_GROUP_SIZE`]).
    pub group_size: u32,
    /// What each member pays for one key.
    pub price_cents: u64,
    /// Time from opening a group to its deadline.
    pub time_limit_secs: u64,
    pub created_at_ms: Millis,
}

impl GroupDeal {
    /// The terms a new group is opened with (copied into it: a group keeps the
    /// terms it was opened under).
    pub fn terms(&self) -> GroupTerms {
        GroupTerms {
            deal_id: self.deal_id.clone(),
            size: self.group_size,
            price_cents: self.price_cents,
            time_limit_ms: self.time_limit_secs.saturating_mul(1000),
        }
    }
}

/// Checks a deal's numbers against the configured maxima; the error names the field.
pub fn validate_deal(
    group_size: u32,
    price_cents: u64,
    time_limit_secs: u64,
    max_group_size: u32,
    max_time_limit_secs: u64,
) -> Result<(), String> {
    let max_group_size = max_group_size.min(MAX_GROUP_SIZE);
    let max_time_limit_secs = max_time_limit_secs.min(MAX_TIME_LIMIT_SECS);
    if !(2..=max_group_size).contains(&group_size) {
        return Err(format!("group_size: must be 2..={max_group_size}"));
    }
    if !(1..=super::validate::MAX_PRICE_CENTS).contains(&price_cents) {
        return Err("price_cents: must be 1..=10^12".into());
    }
    if !(1..=max_time_limit_secs).contains(&time_limit_secs) {
        return Err(format!("time_limit_secs: must be 1..={max_time_limit_secs}"));
    }
    Ok(())
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupTerms {
    pub deal_id: String,
    pub size: u32,
    pub price_cents: u64,
    pub time_limit_ms: Millis,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum GroupState {
    Open,
    Completed { at_ms: Millis },
    Failed { at_ms: Millis },
}

impl GroupState {
    pub fn as_str(self) -> &'static str {
        match self {
            GroupState::Open => "open",
            GroupState::Completed { .. } => "completed",
            GroupState::Failed { .. } => "failed",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Group {
    /// Dense per shard, from 1.
    pub seq: u64,
    pub deal_id: String,
    pub size: u32,
    pub price_cents: u64,
    pub opened_by: String,
    pub opened_at_ms: Millis,
    pub deadline_ms: Millis,
    /// Every order that took a seat, in join order, including members who left:
    /// the seats now taken are those whose order is pending or paid.
    pub orders: Vec<u64>,
    pub state: GroupState,
}

/// A parsed group id: `"{product}.{shard}.g{seq}"` (cannot be mistaken for an order id).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct GroupId {
    pub shard: ShardId,
    pub seq: u64,
}

impl GroupId {
    pub fn parse(s: &str) -> Option<GroupId> {
        let (shard, rest) = super::ids::split_routed(s)?;
        let seq: u64 = super::ids::canonical_number(rest.strip_prefix('g')?)?;
        (seq > 0).then_some(GroupId { shard, seq })
    }
}

impl fmt::Display for GroupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.g{}", self.shard.product, self.shard.shard, self.seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_id_round_trips_and_is_not_an_order_id() {
        let id = GroupId { shard: ShardId::new("hot-item", 2), seq: 17 };
        assert_eq!(id.to_string(), "hot-item.2.g17");
        assert_eq!(GroupId::parse("hot-item.2.g17"), Some(id));
        assert_eq!(super::super::OrderId::parse("hot-item.2.g17"), None);
        for bad in ["", "p1.0.17", "p1.0.g", "p1.0.g0", "p1.x.g1", "P1.0.g1", "p1.0.g-1"] {
            assert_eq!(GroupId::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn deal_limits() {
        let ok = |size, price, secs| validate_deal(size, price, secs, 10, 60);
        assert!(ok(2, 1, 1).is_ok() && ok(10, 1, 60).is_ok());
        assert!(ok(1, 1, 1).unwrap_err().starts_with("group_size"));
        assert_eq!(ok(11, 1, 1).unwrap_err(), "group_size: must be 2..=10", "the configured maximum");
        assert!(ok(3, 0, 1).unwrap_err().starts_with("price_cents"));
        assert!(ok(3, 1, 0).unwrap_err().starts_with("time_limit_secs"));
        assert!(ok(3, 1, 61).unwrap_err().starts_with("time_limit_secs"));
        let hard = validate_deal(MAX_GROUP_SIZE + 1, 1, 1, u32::MAX, u64::MAX);
        assert!(hard.unwrap_err().starts_with("group_size"), "never above the hard ceiling");
    }
}
