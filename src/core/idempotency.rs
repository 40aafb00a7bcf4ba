//! Idempotency-Keys pinned across products: a key reused with another request body
//! is refused here, even for another product (each shard catches reuse within
//! itself). Pins and notification nonces share one bounded store ([`Fingerprints`]).

use super::*;

impl Kami {
    /// After a request that pinned its Idempotency-Key: confirmed when it created
    /// something, released when it was definitely refused (a retry runs anew), kept
    /// when the outcome is unknown.
    pub(super) fn settle_pin<T>(&self, idempotency: Option<&Idempotency>, result: &Result<T, Error>) {
        if let Some(Idempotency { key, fingerprint }) = idempotency {
            match result {
                Ok(_) => self.pins.confirm(key, *fingerprint, self.clock.now_ms()),
                Err(Error::Domain(_)) => {
                    self.pins.release(key, *fingerprint);
                }
                Err(_) => {}
            }
        }
    }

    pub(super) fn pin(&self, key: &str, fingerprint: [u8; 16]) -> Result<(), Error> {
        self.pins.claim(key, fingerprint, self.clock.now_ms()).map_err(|refusal| match refusal {
            Refusal::Mismatch => DomainError::IdempotencyKeyReused.into(),
            Refusal::Full => Error::Overloaded,
        })
    }

    /// Re-pins the Idempotency-Keys recovered shards hold (start-up), so reuse of a
    /// key with another product is still caught after a restart.
    pub fn restore_pins(&self, pins: Vec<(String, [u8; 16])>) {
        let now = self.clock.now_ms();
        for (key, fingerprint) in pins {
            self.pins.confirm(&key, fingerprint, now);
        }
    }

    /// Drops idempotency pins and nonces past their windows. Called periodically.
    pub fn prune(&self) {
        let now = self.clock.now_ms();
        self.pins.prune(now);
        self.nonces.prune(now);
    }
}
