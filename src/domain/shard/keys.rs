//! A shard's keys by state, for the merchant's key listing: available (in stock),
//! reserved (held by an order waiting for its payment, or a paid seat of an open
//! group), sold (delivered, archived orders' included) and withdrawn (taken out
//! of stock by the merchant). Keys lent to a sibling shard are in none of them
//! here (the sibling lists them). And the merchant's withdrawal of keys.

use std::collections::HashMap;

use super::{Event, KeyId, OrderStatus, Shard, MAX_KEYS_PER_EVENT};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum KeyState {
    Available,
    Reserved,
    Sold,
    Withdrawn,
}

impl KeyState {
    pub const ALL: [KeyState; 4] = [KeyState::Available, KeyState::Reserved, KeyState::Sold, KeyState::Withdrawn];

    pub fn as_str(self) -> &'static str {
        match self {
            KeyState::Available => "available",
            KeyState::Reserved => "reserved",
            KeyState::Sold => "sold",
            KeyState::Withdrawn => "withdrawn",
        }
    }
}

/// What a merchant takes out of stock: these keys, or any `n` available ones.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Withdrawal {
    Keys(Vec<String>),
    Count(u64),
}

/// What became of one key asked for by a [`Withdrawal::Keys`], in one shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub enum KeyFate {
    /// Not a key of this shard.
    Unknown,
    /// A key of this shard, not available (reserved, sold, lent or withdrawn before).
    NotInStock,
    /// Taken out of stock now.
    Withdrawn,
}

impl KeyFate {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyFate::Unknown => "unknown",
            KeyFate::NotInStock => "not_in_stock",
            KeyFate::Withdrawn => "withdrawn",
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
            KeyState::Withdrawn => mark(&self.withdrawn),
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

    /// Takes keys out of stock: the ones named that are available here (every
    /// available unit of a reusable key named), or up to `n` available ones (from the back of the queue, the last to be sold). Only
    /// available keys leave: a reserved key stays with its order, a sold one with
    /// its buyer. Returns the events (already applied, [`MAX_KEYS_PER_EVENT`] keys
    /// each), how many keys left, and for [`Withdrawal::Keys`] the fate of each key
    /// asked for, in the order asked.
    pub fn withdraw(&mut self, what: &Withdrawal) -> (Vec<Event>, u64, Vec<KeyFate>) {
        let (ids, fates) = match what {
            Withdrawal::Count(n) => {
                let n = (*n).min(self.available.len() as u64) as usize;
                (self.available.iter().rev().take(n).copied().collect::<Vec<KeyId>>(), Vec::new())
            }
            Withdrawal::Keys(keys) => {
                let mut asked: HashMap<KeyId, usize> = HashMap::with_capacity(keys.len());
                let mut fates = Vec::with_capacity(keys.len());
                // Names that are no stored key: perhaps a reusable key, whose units go.
                let mut reusable: HashMap<&str, usize> = HashMap::new();
                for (i, key) in keys.iter().enumerate() {
                    match self.find_key(key) {
                        None => {
                            fates.push(KeyFate::Unknown);
                            reusable.entry(key.as_str()).or_insert(i);
                        }
                        Some(id) => {
                            fates.push(KeyFate::NotInStock);
                            asked.entry(id).or_insert(i);
                        }
                    }
                }
                // One pass over the keys, only where reusable units are kept.
                if self.has_units && !reusable.is_empty() {
                    for (id, stored) in self.keys.iter().enumerate() {
                        if let Some(&i) = reusable.get(crate::domain::key_mode::shown(stored)) {
                            fates[i] = KeyFate::NotInStock;
                            asked.insert(id as KeyId, i);
                        }
                    }
                    // A reusable key named twice: the second is not in stock either.
                    for (i, key) in keys.iter().enumerate() {
                        if fates[i] == KeyFate::Unknown && fates[reusable[key.as_str()]] != KeyFate::Unknown {
                            fates[i] = KeyFate::NotInStock;
                        }
                    }
                }
                let mut ids = Vec::new();
                for id in &self.available {
                    if let Some(&i) = asked.get(id) {
                        fates[i] = KeyFate::Withdrawn;
                        ids.push(*id);
                    }
                }
                (ids, fates)
            }
        };
        let mut events = Vec::new();
        for chunk in ids.chunks(MAX_KEYS_PER_EVENT) {
            let event = Event::KeysWithdrawn { keys: chunk.to_vec() };
            self.apply(&event);
            events.push(event);
        }
        (events, ids.len() as u64, fates)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::shard::{NewOrder, Outcome, Payment};
    use crate::domain::ProductInfo;

    fn shard(keys: usize) -> Shard {
        let product = ProductInfo {
            id: "p".into(),
            name: "P".into(),
            price_cents: 100,
            per_buyer_limit: 0,
            shards: 1,
            created_at_ms: 0,
        };
        let mut s = Shard::new(product, 0);
        s.import_keys((0..keys).map(|i| format!("K{i}")).collect());
        s
    }

    fn order(s: &mut Shard, buyer: &str, quantity: u32) -> u64 {
        let new = NewOrder {
            buyer: buyer.into(),
            quantity,
            idempotency: None,
            query_token: "t".into(),
            ttl_ms: 60_000,
            password: None,
            coupon: None,
            reseller: None,
        };
        let Outcome::Changed(_, seq) = s.create_order(new, 1).unwrap() else { panic!("created") };
        seq
    }

    fn replayed(s: &Shard, events: &[Event]) -> Shard {
        let mut copy = s.clone();
        for e in events {
            copy.apply(e);
        }
        copy
    }

    #[test]
    fn only_available_keys_are_withdrawn_and_the_audit_counts_them() {
        let mut s = shard(6);
        let reserved = order(&mut s, "a", 1); // takes K0
        let sold = order(&mut s, "b", 1); // takes K1
        let pay = Payment {
            order_seq: sold,
            payment_id: "pay".into(),
            channel: "sandbox".into(),
            amount_cents: 100,
            status: "paid".into(),
        };
        s.pay(pay, 2).unwrap();
        let before = s.clone();
        let asked: Vec<String> = ["K0", "K1", "K2", "nope", "K2", "K3"].iter().map(|k| k.to_string()).collect();
        let (events, n, fates) = s.withdraw(&Withdrawal::Keys(asked));
        assert_eq!(n, 2);
        use KeyFate::*;
        assert_eq!(fates, [NotInStock, NotInStock, Withdrawn, Unknown, NotInStock, Withdrawn]);
        assert_eq!(
            s.keys_in(KeyState::Withdrawn, None, 10).0.iter().map(|(_, k)| *k).collect::<Vec<_>>(),
            ["K2", "K3"]
        );
        assert_eq!(s.order(reserved).unwrap().keys.len(), 1, "the reserved key stays with its order");
        let c = s.counts();
        assert_eq!((c.imported, c.available, c.reserved, c.sold, c.withdrawn), (6, 2, 1, 1, 2));
        let audit = s.audit();
        assert!(audit.violations.is_empty(), "{:?}", audit.violations);
        assert_eq!(audit.withdrawn, 2);
        // The journal replays to the same state.
        let again = replayed(&before, &events);
        assert_eq!(again.counts(), s.counts());
        // Withdrawn again: nothing left to take; and never sold.
        let (events, n, _) = s.withdraw(&Withdrawal::Keys(vec!["K2".into()]));
        assert!(events.is_empty() && n == 0);
        order(&mut s, "c", 2);
        assert!(
            s.create_order(
                NewOrder {
                    buyer: "d".into(),
                    quantity: 1,
                    idempotency: None,
                    query_token: "t".into(),
                    ttl_ms: 1,
                    password: None,
                    coupon: None,
                    reseller: None,
                },
                1
            )
            .is_err(),
            "K4 and K5 were the last keys in stock"
        );
    }

    #[test]
    fn a_reusable_key_is_sold_as_units_and_named_withdrawal_takes_its_available_units() {
        use crate::domain::key_mode::unit;
        let mut s = shard(1);
        let units: Vec<String> = (0..5).map(|n| unit("SHARED", n)).collect();
        let (_, imported, _) = s.import_keys(units.clone());
        assert_eq!(imported, 5);
        assert_eq!(s.import_keys(units).1, 0, "a unit is added once");
        let mut buyers = Vec::new();
        while buyers.len() < 3 {
            let seq = order(&mut s, &format!("b{}", buyers.len()), 1);
            buyers.push(seq);
        }
        // K0 went first; the two others are units, delivered as the key itself.
        let shown: Vec<&str> = buyers.iter().map(|&b| s.key(s.order(b).unwrap().keys[0])).collect();
        assert_eq!(shown, ["K0", "SHARED", "SHARED"]);
        let (events, n, fates) = s.withdraw(&Withdrawal::Keys(vec!["SHARED".into(), "SHARED".into(), "nope".into()]));
        assert_eq!(n, 3, "every available unit of the key, none of the reserved ones");
        assert_eq!(fates, [KeyFate::Withdrawn, KeyFate::NotInStock, KeyFate::Unknown]);
        assert_eq!(events.len(), 1);
        let c = s.counts();
        assert_eq!((c.imported, c.available, c.reserved, c.withdrawn), (6, 0, 3, 3));
        assert!(s.audit().violations.is_empty(), "{:?}", s.audit().violations);
        let listed: Vec<&str> = s.keys_in(KeyState::Withdrawn, None, 10).0.into_iter().map(|(_, k)| k).collect();
        assert_eq!(listed, ["SHARED"; 3]);
    }

    #[test]
    fn a_count_takes_from_the_back_of_the_queue_and_stops_at_what_is_available() {
        let mut s = shard(MAX_KEYS_PER_EVENT + 10);
        order(&mut s, "a", 1);
        let (events, n, fates) = s.withdraw(&Withdrawal::Count(u64::MAX));
        assert_eq!(n as usize, MAX_KEYS_PER_EVENT + 9);
        assert_eq!(events.len(), 2, "at most MAX_KEYS_PER_EVENT keys an event");
        assert!(fates.is_empty());
        assert_eq!(s.counts().available, 0);
        assert!(s.audit().violations.is_empty());
        let mut t = shard(5);
        t.withdraw(&Withdrawal::Count(2));
        let left: Vec<&str> = t.keys_in(KeyState::Available, None, 10).0.into_iter().map(|(_, k)| k).collect();
        assert_eq!(left, ["K0", "K1", "K2"], "the first in line are kept");
    }
}
