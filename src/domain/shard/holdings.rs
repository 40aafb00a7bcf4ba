//! How many keys each buyer holds in a shard (pending, paid and delivered orders in
//! memory and archived), for the per-buyer limit. Derived: rebuilt at load, never
//! stored. Counted only while the product has a limit (`counting`): with none, an
//! order pays no lookup in a table of every buyer, and the table takes no memory;
//! a limit set later counts everything again from the orders first.
//!
//! A buyer is keyed by 128 bits of a keyed hash of their name, not by the name: an
//! order then copies no string into the index, and when the table doubles (at a
//! few hundred thousand buyers, inside an order's step) it moves 32-byte entries
//! without hashing any string again. Two buyers would share one count only if
//! their 128-bit digests collided; a shared count is only ever stricter (a limit
//! reached early), never looser.

use std::hash::{BuildHasher, BuildHasherDefault, Hasher};

/// A digest used as its own hash: the table hashes nothing again.
#[derive(Default)]
struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `u128` digests are hashed here (`write_u128`); anything else still
        // spreads, if slowly.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u128(&mut self, n: u128) {
        self.0 = n as u64;
    }
}

#[derive(Debug, Clone, Default)]
pub(super) struct Holdings {
    /// Keyed at random per shard in memory, so no buyer name can be chosen to
    /// collide with another's.
    digest: hashbrown::DefaultHashBuilder,
    held: hashbrown::HashMap<u128, u32, BuildHasherDefault<Prehashed>>,
    /// Whether `add` and `remove` count (see the module's doc); `get` is asked
    /// only while they do.
    counting: bool,
}

impl Holdings {
    fn key(&self, buyer: &str) -> u128 {
        let high = self.digest.hash_one((0u8, buyer));
        let low = self.digest.hash_one((1u8, buyer));
        (u128::from(high) << 64) | u128::from(low)
    }

    pub(super) fn get(&self, buyer: &str) -> u32 {
        self.held.get(&self.key(buyer)).copied().unwrap_or(0)
    }

    /// An empty index, counting if `counting`.
    pub(super) fn counting_if(counting: bool) -> Holdings {
        Holdings { counting, ..Holdings::default() }
    }

    pub(super) fn counting(&self) -> bool {
        self.counting
    }

    /// Empties the index and counts from now on (`true`) or stops counting.
    pub(super) fn restart(&mut self, counting: bool) {
        self.held = Default::default();
        self.counting = counting;
    }

    pub(super) fn add(&mut self, buyer: &str, quantity: u32) {
        if !self.counting {
            return;
        }
        let key = self.key(buyer);
        *self.held.entry(key).or_default() += quantity;
    }

    /// Takes `quantity` off what `buyer` holds. Panics if they hold less: an order
    /// that closes was counted when it opened.
    pub(super) fn remove(&mut self, buyer: &str, quantity: u32) {
        if !self.counting {
            return;
        }
        let key = self.key(buyer);
        let held = self.held.get_mut(&key).expect("an open order counts in holdings");
        *held = held.checked_sub(quantity).expect("a buyer holds what their orders took");
        if *held == 0 {
            self.held.remove(&key);
        }
    }

    /// Buyers holding anything.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.held.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_buyer_come_and_go() {
        let mut h = Holdings::default();
        h.add("alice", 2);
        assert_eq!((h.get("alice"), h.len()), (0, 0), "nothing is counted until asked to");
        h.restart(true);
        h.add("alice", 2);
        h.add("bob", 1);
        h.add("alice", 1);
        assert_eq!((h.get("alice"), h.get("bob"), h.get("carol")), (3, 1, 0));
        h.remove("alice", 3);
        assert_eq!((h.get("alice"), h.len()), (0, 1), "a buyer holding nothing leaves the index");
        for i in 0..100_000 {
            h.add(&format!("buyer-{i}"), 1);
        }
        assert_eq!((h.len(), h.get("buyer-99999"), h.get("bob")), (100_001, 1, 1));
        h.restart(false);
        h.add("bob", 1);
        assert_eq!(h.len(), 0, "stopping empties the index");
    }
}
