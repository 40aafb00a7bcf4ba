//! Buyer order lookup on one shard: which of its orders in memory a buyer's query
//! password opens (archived ones are found through the archive's index).

use super::*;
use crate::domain::lookup;

impl Shard {
    pub(super) fn index_password(&mut self, order: &Order) {
        self.password_orders.entry(order.buyer.clone()).or_default().insert(order.seq);
    }

    pub(super) fn unindex_password(&mut self, order: &Order) {
        if let Some(seqs) = self.password_orders.get_mut(&order.buyer) {
            seqs.remove(&order.seq);
            if seqs.is_empty() {
                self.password_orders.remove(&order.buyer);
            }
        }
    }

    /// The stored query password of order `seq`, if it is in memory and has one.
    pub fn password(&self, seq: u64) -> Option<&PasswordHash> {
        self.passwords.get(&seq)
    }

    /// `buyer`'s orders in memory whose query password's stored form is
    /// `password`, newest first. Costs the buyer's orders with a password, not
    /// the shard's orders.
    pub fn orders_opened_by(&self, buyer: &str, password: &PasswordHash) -> Vec<u64> {
        let Some(seqs) = self.password_orders.get(buyer) else { return Vec::new() };
        seqs.iter().rev().copied().filter(|seq| lookup::same(&self.passwords[seq], password)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard() -> Shard {
        let product = ProductInfo {
            id: "p".into(),
            name: "P".into(),
            price_cents: 100,
            per_buyer_limit: 0,
            shards: 1,
            created_at_ms: 0,
        };
        let mut s = Shard::new(product, 0);
        s.import_keys((0..10).map(|i| format!("K{i}")).collect());
        s
    }

    fn order(s: &mut Shard, buyer: &str, password: Option<PasswordHash>, at: Millis) -> u64 {
        let req = NewOrder {
            buyer: buyer.into(),
            quantity: 1,
            idempotency: None,
            query_token: "t".into(),
            ttl_ms: 1000,
            password,
            coupon: None,
            reseller: None,
        };
        match s.create_order(req, at).expect("in stock") {
            Outcome::Changed(_, seq) => seq,
            Outcome::Repeat(_) => unreachable!(),
        }
    }

    #[test]
    fn a_password_opens_its_buyers_orders_only_and_survives_a_snapshot() {
        let mut s = shard();
        let (a, b) = ([1; 32], [2; 32]);
        let first = order(&mut s, "ann", Some(a), 10);
        order(&mut s, "ann", None, 11);
        let third = order(&mut s, "ann", Some(a), 12);
        order(&mut s, "ann", Some(b), 13);
        order(&mut s, "bob", Some(a), 14);
        assert_eq!(s.orders_opened_by("ann", &a), vec![third, first], "newest first");
        assert!(s.orders_opened_by("ann", &[3; 32]).is_empty(), "a wrong password opens nothing");
        assert!(s.orders_opened_by("cat", &a).is_empty());
        assert_eq!(s.password(first), Some(&a));

        let bytes = bincode::serialize(&s).unwrap();
        let mut copy: Shard = bincode::deserialize(&bytes).unwrap();
        copy.rebuild_indexes();
        assert_eq!(copy.orders_opened_by("ann", &a), vec![third, first], "rebuilt from the snapshot");
    }

    #[test]
    fn archiving_takes_an_order_out_of_the_index() {
        let mut s = shard();
        let a = [1; 32];
        let seq = order(&mut s, "ann", Some(a), 10);
        s.cancel(seq, 20).expect("pending");
        s.archive(vec![seq], 30, 0).expect("an event");
        assert!(s.orders_opened_by("ann", &a).is_empty());
        assert_eq!(s.password(seq), None);
    }
}
