//! Edge rate limits (governor token buckets): per client IP on every buyer route and
//! per buyer on order creation, with tiers. A request without an API key gets the
//! default tier; a trusted storefront (which sends every buyer's traffic from a few
//! addresses) sends `X-Api-Key` and gets its named tier's limits. An unknown key is
//! refused (401 `invalid_api_key`) rather than silently downgraded. A tier may
//! carry a reseller's price list (`domain::pricing::ResellerPrices`): orders sent
//! with its key are priced from it. Tiers are resolved even when the limits are
//! off (`rate_limits.enabled = false`), so that prices never depend on them.
//!
//! Memory is bounded: each keyed limiter forgets idle keys on every prune and, if
//! it still tracks more than its bound, starts afresh (everybody gets a full bucket
//! once, which errs on the side of serving).

use std::hash::Hash;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;

use arc_swap::ArcSwap;
use governor::clock::{Clock as _, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use subtle::ConstantTimeEq;

use crate::config::{RateLimitSettings, TierLimits, TierSettings};
use crate::domain::pricing::{Reseller, ResellerPrices};

/// A keyed token bucket whose number of tracked keys is bounded.
pub struct KeyedLimiter<K: Hash + Eq + Clone> {
    limiter: ArcSwap<DefaultKeyedRateLimiter<K>>,
    quota: Quota,
    max_tracked: usize,
}

impl<K: Hash + Eq + Clone> KeyedLimiter<K> {
    pub fn new(per_sec: u32, burst: u32, max_tracked: usize) -> Self {
        let quota = Quota::per_second(NonZeroU32::new(per_sec).expect("validated ≥ 1"))
            .allow_burst(NonZeroU32::new(burst).expect("validated ≥ 1"));
        KeyedLimiter { limiter: ArcSwap::from_pointee(RateLimiter::keyed(quota)), quota, max_tracked }
    }

    /// `per_min` a minute, at most `burst` at once.
    pub fn per_minute(per_min: u32, burst: u32, max_tracked: usize) -> Self {
        let quota = Quota::per_minute(NonZeroU32::new(per_min).expect("validated ≥ 1"))
            .allow_burst(NonZeroU32::new(burst).expect("validated ≥ 1"));
        KeyedLimiter { limiter: ArcSwap::from_pointee(RateLimiter::keyed(quota)), quota, max_tracked }
    }

    /// `Err(whole seconds to wait, at least 1)` when `key` is over its rate.
    pub fn check(&self, key: &K) -> Result<(), u64> {
        self.limiter.load().check_key(key).map_err(|not_until| {
            (not_until.wait_time_from(DefaultClock::default().now()).as_secs_f64().ceil() as u64).max(1)
        })
    }

    /// Forgets idle keys; if still over the bound, starts afresh.
    pub fn prune(&self) {
        let limiter = self.limiter.load();
        limiter.retain_recent();
        if limiter.len() > self.max_tracked {
            self.limiter.store(Arc::new(RateLimiter::keyed(self.quota)));
        }
    }

    pub fn tracked(&self) -> usize {
        self.limiter.load().len()
    }
}

/// One tier's limits, and its price list.
pub struct Tier {
    pub name: String,
    api_key: Option<String>,
    /// Whether the limits apply (`rate_limits.enabled`).
    limited: bool,
    per_ip: KeyedLimiter<IpAddr>,
    per_buyer: KeyedLimiter<String>,
    pub prices: Option<ResellerPrices>,
}

impl Tier {
    /// Whether this tier is a named one, chosen by a verified `X-Api-Key`.
    pub fn is_keyed(&self) -> bool {
        self.api_key.is_some()
    }

    /// `Err(seconds to wait)` when `ip` is over this tier's rate.
    pub fn check_ip(&self, ip: &IpAddr) -> Result<(), u64> {
        if self.limited {
            self.per_ip.check(ip)
        } else {
            Ok(())
        }
    }

    /// `Err(seconds to wait)` when `buyer` is over this tier's rate.
    pub fn check_buyer(&self, buyer: &String) -> Result<(), u64> {
        if self.limited {
            self.per_buyer.check(buyer)
        } else {
            Ok(())
        }
    }

    /// This tier's reseller price of `product`, if its price list has one.
    pub fn reseller_price(&self, product: &str) -> Option<Reseller> {
        self.prices.as_ref().and_then(|p| p.for_product(product))
    }

    fn new(name: &str, settings: Option<&TierSettings>, l: &TierLimits, s: &RateLimitSettings) -> Tier {
        Tier {
            name: name.to_string(),
            api_key: settings.map(|t| t.api_key.clone()),
            limited: s.enabled,
            per_ip: KeyedLimiter::new(l.per_ip_per_sec, l.per_ip_burst, s.max_tracked_ips),
            per_buyer: KeyedLimiter::new(l.per_buyer_per_sec, l.per_buyer_burst, s.max_tracked_buyers),
            prices: settings.and_then(|t| t.prices(name)),
        }
    }
}

/// Why a request was not let through.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    UnknownApiKey,
    /// Over the rate; wait this many seconds.
    Limited(u64),
}

pub struct RateLimits {
    default: Arc<Tier>,
    named: Vec<Arc<Tier>>,
}

impl RateLimits {
    pub fn new(s: &RateLimitSettings) -> RateLimits {
        let default = Arc::new(Tier::new("default", None, &s.default_tier(), s));
        let named = s.tiers.iter().map(|(name, t)| Arc::new(Tier::new(name, Some(t), &t.limits(), s))).collect();
        RateLimits { default, named }
    }

    /// The tier an `X-Api-Key` value selects (none: the default tier).
    pub fn tier(&self, api_key: Option<&str>) -> Result<Arc<Tier>, Refusal> {
        let Some(given) = api_key else { return Ok(self.default.clone()) };
        // Constant time per comparison; every tier is compared.
        let mut found = None;
        for t in &self.named {
            let key = t.api_key.as_deref().unwrap_or_default();
            if bool::from(key.as_bytes().ct_eq(given.as_bytes())) {
                found = Some(t.clone());
            }
        }
        found.ok_or(Refusal::UnknownApiKey)
    }

    pub fn prune(&self) {
        for t in std::iter::once(&self.default).chain(&self.named) {
            t.per_ip.prune();
            t.per_buyer.prune();
        }
    }
}

/// The buyer order lookup's own limits (`[lookup]`), whatever the tier and even
/// with `rate_limits.enabled = false`: a lookup costs a slow hash, and a password
/// must not be guessed at speed.
pub struct LookupLimits {
    pub per_ip: KeyedLimiter<IpAddr>,
    /// By buyer, or by order id for a lookup by order.
    pub per_subject: KeyedLimiter<String>,
}

impl LookupLimits {
    pub fn new(s: &crate::config::LookupSettings) -> LookupLimits {
        LookupLimits {
            per_ip: KeyedLimiter::per_minute(s.per_ip_per_minute, s.per_ip_burst, s.max_tracked),
            per_subject: KeyedLimiter::per_minute(s.per_buyer_per_minute, s.per_buyer_burst, s.max_tracked),
        }
    }

    pub fn prune(&self) {
        self.per_ip.prune();
        self.per_subject.prune();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_refuses_past_its_burst_and_names_a_wait() {
        let l = KeyedLimiter::<String>::new(1, 3, 10);
        let k = "b".to_string();
        for _ in 0..3 {
            assert_eq!(l.check(&k), Ok(()));
        }
        assert_eq!(l.check(&k), Err(1));
        assert_eq!(l.check(&"other".to_string()), Ok(()), "keys are independent");
    }

    #[test]
    fn memory_stays_bounded() {
        let l = KeyedLimiter::<u32>::new(1, 1, 100);
        for k in 0..1000 {
            let _ = l.check(&k);
        }
        assert_eq!(l.tracked(), 1000);
        l.prune();
        assert!(l.tracked() <= 100, "{} tracked after prune", l.tracked());
    }
}
