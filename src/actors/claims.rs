//! Which order each payment id pays, across every shard of every product: a
//! payment id (per channel) pays one order only, so a notification that presents
//! an id already paying another order is refused (`payment_id_conflict`) whichever
//! shard it reaches.
//!
//! The index lives in memory and is rebuilt at start from what the shards
//! recovered (every shard keeps each payment it recorded), so a claim costs one
//! map entry and no write of its own: a claim is durable exactly when the payment
//! record it was made for is, and the payment's answer waits for that record. A
//! claim whose payment step was refused (or never journaled before a crash) backs
//! no record and is not rebuilt, which changes nothing for the order it was made
//! for: a retry claims it again.
//!
//! Keys and orders are kept as 128-bit digests (32 bytes a claim).

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;

use crate::domain::audit::digest128 as digest;

#[derive(Default)]
pub struct PaymentClaims {
    by_payment: DashMap<u128, u128>,
}

/// The payment id pays another order.
#[derive(Debug, PartialEq, Eq)]
pub struct Conflict;

impl PaymentClaims {
    pub fn new() -> PaymentClaims {
        PaymentClaims::default()
    }

    /// Claims payment `key` ([`crate::domain::shard::payment_key`]) for `order`:
    /// `Ok` when claimed now or before by the same order.
    pub fn claim(&self, key: &str, order: &str) -> Result<(), Conflict> {
        let order = digest(order);
        match self.by_payment.entry(digest(key)) {
            Entry::Occupied(e) if *e.get() == order => Ok(()),
            Entry::Occupied(_) => Err(Conflict),
            Entry::Vacant(e) => {
                e.insert(order);
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_payment_id_pays_one_order() {
        let claims = PaymentClaims::new();
        assert_eq!(claims.claim("sandbox/P1", "a.0.1"), Ok(()));
        assert_eq!(claims.claim("sandbox/P1", "a.0.1"), Ok(()), "the same order again");
        assert_eq!(claims.claim("sandbox/P1", "b.1.7"), Err(Conflict), "another order");
        assert_eq!(claims.claim("other/P1", "b.1.7"), Ok(()), "ids are unique per channel");
        assert_eq!(claims.by_payment.len(), 2);
    }
}
