//! Buyer order lookup (查单): a buyer who set a query password when ordering finds
//! their orders again with it, without the order's link.
//!
//! The password is kept only as a slow salted hash ([`hash_password`]): Argon2id
//! with fixed parameters ([`ARGON2_MEMORY_KIB`], [`ARGON2_ITERATIONS`]), salted per
//! buyer with the shop's lookup secret. One buyer's orders under one password share
//! one hash, so a lookup computes one hash however many orders it finds; two buyers
//! with the same password get different hashes, and a hash copied from one shop
//! says nothing in another. The parameters and the salt's derivation are part of
//! the stored format: changing them makes every stored hash unverifiable.
//!
//! Results come newest first across every shard that answers: [`LookupPosition`]
//! orders them and tells where a page goes on.

use argon2::{Algorithm, Argon2, Params, Version};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::Millis;

/// A query password's stored form.
pub type PasswordHash = [u8; 32];

/// Shortest query password accepted, in bytes.
pub const MIN_PASSWORD_BYTES: usize = 6;
/// Longest query password accepted, in bytes.
pub const MAX_PASSWORD_BYTES: usize = 128;
/// Argon2id memory cost (KiB). Fixed: part of the stored format.
pub const ARGON2_MEMORY_KIB: u32 = 4 * 1024;
/// Argon2id passes over that memory. Fixed: part of the stored format.
pub const ARGON2_ITERATIONS: u32 = 1;

pub fn validate_password(p: &str) -> Result<(), String> {
    if (MIN_PASSWORD_BYTES..=MAX_PASSWORD_BYTES).contains(&p.len()) && !p.chars().any(char::is_control) {
        Ok(())
    } else {
        Err(format!(
            "query_password: must be {MIN_PASSWORD_BYTES}..={MAX_PASSWORD_BYTES} bytes without control characters"
        ))
    }
}

/// The salt of `buyer`'s passwords in a shop whose lookup secret is `secret`.
fn salt(secret: &[u8], buyer: &str) -> [u8; 16] {
    let mut h = Sha256::new();
    h.update(b"kami query password salt\0");
    h.update((secret.len() as u64).to_be_bytes());
    h.update(secret);
    h.update(buyer.as_bytes());
    let digest = h.finalize();
    let mut salt = [0u8; 16];
    salt.copy_from_slice(&digest[..16]);
    salt
}

/// The stored form of `buyer`'s query `password` (CPU- and memory-heavy on
/// purpose: run it off the async threads, a bounded number at a time).
pub fn hash_password(secret: &[u8], buyer: &str, password: &str) -> PasswordHash {
    let params = Params::new(ARGON2_MEMORY_KIB, ARGON2_ITERATIONS, 1, Some(32)).expect("valid fixed parameters");
    let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, params);
    let mut out = [0u8; 32];
    argon.hash_password_into(password.as_bytes(), &salt(secret, buyer), &mut out).expect("valid fixed lengths");
    out
}

/// Whether two stored forms are the same, compared in constant time.
pub fn same(a: &PasswordHash, b: &PasswordHash) -> bool {
    bool::from(a.ct_eq(b))
}

/// A 16-byte digest of a buyer, for indexes kept outside memory (the archive's).
pub fn buyer_digest(buyer: &str) -> [u8; 16] {
    let digest = Sha256::digest([b"kami buyer\0".as_slice(), buyer.as_bytes()].concat());
    let mut out = [0u8; 16];
    out.copy_from_slice(&digest[..16]);
    out
}

/// Where an order stands in a lookup's answer: newest first (by creation time),
/// then by product and shard, then by sequence, newest first. A page goes on after
/// the last position it showed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LookupPosition {
    pub created_at_ms: Millis,
    pub product: String,
    pub shard: u16,
    pub seq: u64,
}

impl LookupPosition {
    /// The sort key: ascending order of this key is the answer's order.
    fn key(&self) -> (std::cmp::Reverse<Millis>, &str, u16, std::cmp::Reverse<u64>) {
        (std::cmp::Reverse(self.created_at_ms), self.product.as_str(), self.shard, std::cmp::Reverse(self.seq))
    }

    /// Whether `self` comes after `other` in the answer.
    pub fn is_after(&self, other: &LookupPosition) -> bool {
        self.key() > other.key()
    }
}

impl Ord for LookupPosition {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.key().cmp(&other.key())
    }
}

impl PartialOrd for LookupPosition {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_hash_depends_on_the_secret_the_buyer_and_the_password() {
        let h = hash_password(b"s", "ann", "secret-1");
        assert_eq!(h, hash_password(b"s", "ann", "secret-1"), "deterministic: one hash per lookup");
        assert_ne!(h, hash_password(b"t", "ann", "secret-1"), "another shop");
        assert_ne!(h, hash_password(b"s", "bob", "secret-1"), "another buyer");
        assert_ne!(h, hash_password(b"s", "ann", "secret-2"), "another password");
        assert!(same(&h, &h) && !same(&h, &[0; 32]));
    }

    #[test]
    fn the_hash_is_argon2id_with_the_documented_parameters() {
        // Changing the parameters or the salt makes stored hashes unverifiable:
        // this pins them (computed once with the parameters above).
        let h = hash_password(b"kami", "alice@example.com", "hunter22");
        assert_eq!(hex::encode(h), PINNED_HASH);
    }

    const PINNED_HASH: &str = "d631d96d374d6067ca91be4c85bd863c62ac38a38081d2d1105e1c918e4f99d6";

    #[test]
    fn passwords_are_bounded_and_printable() {
        assert!(validate_password("123456").is_ok());
        assert!(validate_password("12345").is_err());
        assert!(validate_password(&"x".repeat(MAX_PASSWORD_BYTES + 1)).is_err());
        assert!(validate_password("abc\ndef").is_err());
    }

    fn position() -> impl Strategy<Value = LookupPosition> {
        (0u64..4, prop::sample::select(vec!["a", "b"]), 0u16..2, 1u64..4).prop_map(|(t, p, s, q)| LookupPosition {
            created_at_ms: t,
            product: p.into(),
            shard: s,
            seq: q,
        })
    }

    proptest! {
        /// Paging through a set with `is_after` shows every position once, in order.
        #[test]
        fn pages_show_every_position_once(mut all in prop::collection::btree_set(position(), 0..20), page in 1usize..5) {
            let expected: Vec<_> = all.iter().cloned().collect();
            let mut shown = Vec::new();
            let mut after: Option<LookupPosition> = None;
            loop {
                let next: Vec<_> = all.iter().filter(|p| after.as_ref().is_none_or(|a| p.is_after(a))).take(page).cloned().collect();
                if next.is_empty() { break; }
                after = next.last().cloned();
                shown.extend(next);
            }
            prop_assert_eq!(shown, expected);
            all.clear();
        }
    }
}
