//! One bounded, time-windowed store of "this key came with this fingerprint",
//! used twice: Idempotency-Key pins across products (a key reused with another
//! request body is refused) and payment-notification nonces (a nonce may come
//! again only with the very same body). At most `capacity` keys; a key is
//! forgotten `window_ms` after it was first seen; when full, expired keys are
//! dropped first and a new key is refused only if none had expired (I7).

use dashmap::DashMap;

/// Why a key was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The key is known with another fingerprint.
    Mismatch,
    /// The store is full of keys still in their window.
    Full,
}

struct Seen {
    fingerprint: [u8; 16],
    at_ms: u64,
    /// Kept until its window ends (not released when its request is refused).
    confirmed: bool,
}

pub struct Fingerprints {
    map: DashMap<String, Seen>,
    capacity: usize,
    window_ms: u64,
}

impl Fingerprints {
    pub fn new(capacity: usize, window_ms: u64) -> Fingerprints {
        Fingerprints { map: DashMap::new(), capacity, window_ms }
    }

    /// Takes `key` with `fingerprint` (unconfirmed) unless it is known: `Ok` when it
    /// is new or known with the same fingerprint.
    pub fn claim(&self, key: &str, fingerprint: [u8; 16], now_ms: u64) -> Result<(), Refusal> {
        if let Some(seen) = self.map.get(key) {
            return if seen.fingerprint == fingerprint { Ok(()) } else { Err(Refusal::Mismatch) };
        }
        if self.map.len() >= self.capacity {
            self.prune(now_ms);
            if self.map.len() >= self.capacity {
                return Err(Refusal::Full);
            }
        }
        let seen = self.map.entry(key.to_string()).or_insert(Seen { fingerprint, at_ms: now_ms, confirmed: false });
        if seen.fingerprint == fingerprint {
            Ok(())
        } else {
            Err(Refusal::Mismatch)
        }
    }

    /// Keeps `key` for its whole window (taking it if it is not known).
    pub fn confirm(&self, key: &str, fingerprint: [u8; 16], now_ms: u64) {
        self.map.entry(key.to_string()).and_modify(|s| s.confirmed = true).or_insert(Seen {
            fingerprint,
            at_ms: now_ms,
            confirmed: true,
        });
    }

    /// Forgets `key` if it is held with `fingerprint` and not confirmed (its request
    /// was refused: a retry runs anew).
    pub fn release(&self, key: &str, fingerprint: [u8; 16]) {
        self.map.remove_if(key, |_, s| s.fingerprint == fingerprint && !s.confirmed);
    }

    /// Forgets the keys whose window has ended.
    pub fn prune(&self, now_ms: u64) {
        let window = self.window_ms;
        self.map.retain(|_, s| s.at_ms.saturating_add(window) > now_ms);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_comes_again_only_with_its_fingerprint_and_is_forgotten_after_its_window() {
        let f = Fingerprints::new(10, 1_000);
        assert_eq!(f.claim("k", [1; 16], 0), Ok(()));
        assert_eq!(f.claim("k", [1; 16], 10), Ok(()), "the same again");
        assert_eq!(f.claim("k", [2; 16], 10), Err(Refusal::Mismatch));
        f.prune(999);
        assert_eq!(f.claim("k", [2; 16], 999), Err(Refusal::Mismatch), "still in its window");
        f.prune(1_000);
        assert_eq!(f.claim("k", [2; 16], 1_000), Ok(()), "forgotten after it");
    }

    #[test]
    fn a_full_store_drops_expired_keys_first_and_refuses_only_when_none_expired() {
        let f = Fingerprints::new(2, 1_000);
        f.claim("a", [1; 16], 0).unwrap();
        f.claim("b", [1; 16], 500).unwrap();
        assert_eq!(f.claim("c", [1; 16], 900), Err(Refusal::Full));
        assert_eq!(f.claim("c", [1; 16], 1_000), Ok(()), "`a` expired and made room");
        assert_eq!(f.len(), 2);
    }

    #[test]
    fn a_refused_request_releases_its_key_unless_confirmed() {
        let f = Fingerprints::new(10, 1_000);
        f.claim("k", [1; 16], 0).unwrap();
        f.release("k", [2; 16]);
        assert_eq!(f.claim("k", [2; 16], 0), Err(Refusal::Mismatch), "released only with its own fingerprint");
        f.release("k", [1; 16]);
        assert_eq!(f.claim("k", [2; 16], 0), Ok(()), "released");
        f.confirm("k", [2; 16], 0);
        f.release("k", [2; 16]);
        assert_eq!(f.claim("k", [3; 16], 0), Err(Refusal::Mismatch), "a confirmed key stays");
    }
}
