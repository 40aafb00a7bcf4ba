//! One bounded, time-windowed store of "this key came with this fingerprint",
//! used twice: Idempotency-Key pins across products (a key reused with another
//! request body is refused) and payment-notification nonces (a nonce may come
//! again only with the very same body). At most `capacity` keys; a key is
//! forgotten `window_ms` after it was first seen; when full, expired keys are
//! dropped first and a new key is refused only if none had expired (I7). A full
//! store is scanned for expired keys at most once per expiry: until the oldest key
//! left by the last scan runs out, a new key is refused without a scan, so a client
//! that keeps a full store full costs one lookup per request, not a pass over it.

use std::sync::atomic::{AtomicU64, Ordering};

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
    /// Keyed with hashbrown's default hasher (foldhash, randomly seeded per map):
    /// SipHash was most of the cost of a lookup.
    map: DashMap<String, Seen, hashbrown::DefaultHashBuilder>,
    capacity: usize,
    window_ms: u64,
    /// No key expires before this instant (ms): the end of the window of the
    /// oldest key the last scan left. A full store is not scanned again before it.
    next_expiry_ms: AtomicU64,
    #[cfg(test)]
    scans: AtomicU64,
}

impl Fingerprints {
    pub fn new(capacity: usize, window_ms: u64) -> Fingerprints {
        Fingerprints {
            map: DashMap::with_hasher(Default::default()),
            capacity,
            window_ms,
            next_expiry_ms: AtomicU64::new(0),
            #[cfg(test)]
            scans: AtomicU64::new(0),
        }
    }

    /// Takes `key` with `fingerprint` (unconfirmed) unless it is known: `Ok` when it
    /// is new or known with the same fingerprint.
    pub fn claim(&self, key: &str, fingerprint: [u8; 16], now_ms: u64) -> Result<(), Refusal> {
        if let Some(seen) = self.map.get(key) {
            return if seen.fingerprint == fingerprint { Ok(()) } else { Err(Refusal::Mismatch) };
        }
        if self.map.len() >= self.capacity {
            if now_ms >= self.next_expiry_ms.load(Ordering::Relaxed) {
                self.prune(now_ms);
            }
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
        #[cfg(test)]
        self.scans.fetch_add(1, Ordering::Relaxed);
        let window = self.window_ms;
        let mut oldest = u64::MAX;
        self.map.retain(|_, s| {
            let keep = s.at_ms.saturating_add(window) > now_ms;
            if keep {
                oldest = oldest.min(s.at_ms);
            }
            keep
        });
        // Keys taken while this scan ran are newer than `now_ms`: they expire later.
        self.next_expiry_ms.store(oldest.min(now_ms).saturating_add(window), Ordering::Relaxed);
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
    fn a_full_store_is_not_scanned_again_before_its_oldest_key_expires() {
        let f = Fingerprints::new(2, 1_000);
        f.claim("a", [1; 16], 100).unwrap();
        f.claim("b", [1; 16], 500).unwrap();
        assert_eq!(f.claim("c", [1; 16], 600), Err(Refusal::Full));
        let scans = f.scans.load(Ordering::Relaxed);
        for t in 600..1_100 {
            assert_eq!(f.claim(&format!("x{t}"), [1; 16], t), Err(Refusal::Full), "at {t}");
        }
        assert_eq!(f.scans.load(Ordering::Relaxed), scans, "refused without a scan while nothing could expire");
        assert_eq!(f.claim("c", [1; 16], 1_100), Ok(()), "`a` expired at 1,100 and made room");
        assert_eq!(f.scans.load(Ordering::Relaxed), scans + 1);
        assert_eq!(f.claim("d", [1; 16], 1_200), Err(Refusal::Full), "`b` is still in its window");
        assert_eq!(f.claim("d", [1; 16], 1_500), Ok(()), "`b` expired at 1,500");
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
