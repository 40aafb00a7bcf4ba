//! A shard's keys by state, for the merchant's key listing: available (in stock),
//! reserved (held by an order waiting for its payment, or a paid seat of an open
//! group) and sold (delivered, archived orders' included). Keys lent to a sibling
//! shard are in none of them here (the sibling lists them).

use super::{KeyId, OrderStatus, Shard};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyState {
    Available,
    Reserved,
    Sold,
}

impl KeyState {
    pub const ALL: [KeyState; 3] = [KeyState::Available, KeyState::Reserved, KeyState::Sold];

    pub fn as_str(self) -> &'static str {
        match self {
            KeyState::Available => "available",
            KeyState::Reserved => "reserved",
            KeyState::Sold => "sold",
        }
    }
}

impl Shard {
    /// Keys in `state` with ids after `after` (all when `None`), in id order, at
    /// most `limit`; and whether no key in that state comes after them. One pass
    /// over the shard's keys and orders in memory (a byte per key).
    pub fn keys_in(&self, state: KeyState, after: Option<KeyId>, limit: usize) -> (Vec<(KeyId, &str)>, bool) {
        let mut member = vec![false; self.keys.len()];
        let mut mark = |ids: &[KeyId]| {
            for &id in ids {
                if let Some(m) = member.get_mut(id as usize) {
                    *m = true;
                }
            }
        };
        match state {
            KeyState::Available => {
                let (front, back) = self.available.as_slices();
                mark(front);
                mark(back);
            }
            KeyState::Reserved | KeyState::Sold => {
                for order in self.orders.values() {
                    let reserved = matches!(order.status, OrderStatus::PendingPayment | OrderStatus::Paid);
                    let sold = order.status == OrderStatus::Delivered;
                    if (state == KeyState::Reserved && reserved) || (state == KeyState::Sold && sold) {
                        mark(&order.keys);
                    }
                }
                if state == KeyState::Sold {
                    mark(&self.archived.sold_keys);
                }
            }
        }
        let start = after.map_or(0, |a| a as usize).saturating_add(usize::from(after.is_some()));
        let mut page = Vec::new();
        let mut ids = (start..member.len()).filter(|&i| member[i]);
        for id in ids.by_ref() {
            page.push((id as KeyId, self.key(id as KeyId)));
            if page.len() == limit {
                break;
            }
        }
        let at_end = ids.next().is_none();
        (page, at_end)
    }
}
