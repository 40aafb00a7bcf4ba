//! The merchant's order listing across products and shards: one stable order (by
//! product id, then shard, then sequence), a position to go on from, and a bound
//! on the orders looked at per page so that a narrow filter over a big shop costs
//! a bounded amount of work per request (the page then comes back short, with a
//! position to go on from).

use super::*;
use crate::domain::shard::{KeyId, KeyState};

/// Most orders one listing request looks at (across its shards).
pub const MAX_ORDERS_SCANNED_PER_PAGE: usize = 20_000;
/// Most orders one message to a stock actor looks at: keeps its turn short.
const MAX_ORDERS_SCANNED_PER_TURN: usize = 2_000;
/// Most orders one listing page holds.
pub const MAX_ORDER_PAGE: usize = 500;

/// Which orders a listing shows.
#[derive(Debug, Clone, Default)]
pub struct OrderQuery {
    /// One product (404 if unknown), or every product (deleted ones too).
    pub product: Option<String>,
    pub filter: OrderFilter,
}

/// Where a listing goes on: after order `seq` of shard `shard` of `product`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderPosition {
    pub product: String,
    pub shard: u16,
    pub seq: u64,
}

/// One page of orders, and where the next one starts (`None`: nothing after).
pub struct OrderPage {
    pub orders: Vec<OrderSnapshot>,
    pub next: Option<OrderPosition>,
}

/// Most keys one key listing page holds.
pub const MAX_KEY_PAGE: usize = 500;

/// One page of a product's keys in one state, and where the next starts: after key
/// id `.1` of shard `.0` (`None`: nothing after).
pub struct KeyPage {
    /// `(shard, key)`.
    pub keys: Vec<(u16, String)>,
    pub next: Option<(u16, KeyId)>,
}

impl Kami {
    /// One page of `product`'s keys in `state`, shard by shard in key id order,
    /// after `after`, at most `limit` (1..=[`MAX_KEY_PAGE`]). Deleted products too.
    pub async fn list_keys(
        &self,
        product: &str,
        state: KeyState,
        after: Option<(u16, KeyId)>,
        limit: usize,
    ) -> Result<KeyPage, Error> {
        if limit == 0 || limit > MAX_KEY_PAGE {
            return Err(Error::Invalid(format!("limit: must be 1..={MAX_KEY_PAGE}")));
        }
        let route = self.registry.get(product).ok_or(Error::ProductNotFound)?;
        let mut keys = Vec::new();
        for (index, handle) in route.shards.iter().enumerate() {
            let shard = index as u16;
            let from = match after {
                Some((s, _)) if shard < s => continue,
                Some((s, id)) if shard == s => Some(id),
                _ => None,
            };
            let listed =
                self.shard_keys(handle, shard::ListKeys { state, after: from, limit: limit - keys.len() }).await?;
            let last = listed.keys.last().map(|(id, _)| *id);
            keys.extend(listed.keys.into_iter().map(|(_, k)| (shard, k)));
            if keys.len() == limit {
                // After the shard's last key (`KeyId::MAX`): the next page starts at the next shard.
                let next = if listed.at_end { (shard, KeyId::MAX) } else { (shard, last.expect("a full page")) };
                let done = listed.at_end && index + 1 == route.shards.len();
                return Ok(KeyPage { keys, next: (!done).then_some(next) });
            }
        }
        Ok(KeyPage { keys, next: None })
    }

    /// One page of orders matching `query`, after `after`, at most `limit`
    /// (1..=[`MAX_ORDER_PAGE`]). Each shard answers once what it shows is durable.
    pub async fn list_orders(
        &self,
        query: &OrderQuery,
        after: Option<&OrderPosition>,
        limit: usize,
    ) -> Result<OrderPage, Error> {
        if limit == 0 || limit > MAX_ORDER_PAGE {
            return Err(Error::Invalid(format!("limit: must be 1..={MAX_ORDER_PAGE}")));
        }
        let routes = self.registry.all();
        let mut ids: Vec<&String> = match &query.product {
            Some(p) => vec![routes.get_key_value(p).ok_or(Error::ProductNotFound)?.0],
            None => routes.keys().collect(),
        };
        ids.sort_unstable();
        let mut orders = Vec::new();
        let mut budget = MAX_ORDERS_SCANNED_PER_PAGE;
        for id in ids {
            if after.is_some_and(|a| id.as_str() < a.product.as_str()) {
                continue;
            }
            let route = &routes[id];
            for (index, handle) in route.shards.iter().enumerate() {
                let shard = index as u16;
                let mut seq = match after {
                    Some(a) if a.product == *id && shard < a.shard => continue,
                    Some(a) if a.product == *id && shard == a.shard => a.seq,
                    _ => 0,
                };
                loop {
                    let want = limit - orders.len();
                    if want == 0 || budget == 0 {
                        return Ok(OrderPage { orders, next: Some(OrderPosition { product: id.clone(), shard, seq }) });
                    }
                    let max_scan = budget.min(MAX_ORDERS_SCANNED_PER_TURN);
                    let msg = shard::ListOrders { after: seq, filter: query.filter.clone(), limit: want, max_scan };
                    let listed = self.shard_orders(handle, msg).await?;
                    budget -= listed.scanned as usize;
                    seq = listed.last_scanned.max(seq);
                    if let Some(last) = listed.orders.last() {
                        seq = seq.max(last.order.seq);
                    }
                    orders.extend(listed.orders);
                    if listed.at_end {
                        break;
                    }
                }
            }
        }
        Ok(OrderPage { orders, next: None })
    }
}
