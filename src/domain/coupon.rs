//! Coupons: codes that take an amount or a percentage off an order, with an exact
//! number of uses.
//!
//! In a flash sale a coupon with 100 uses is a second scarce resource next to the
//! stock, so one coupon shard owns each code (by a stable hash) and counts its uses
//! in one place. An order lives in a stock shard, so a use is a saga of journaled,
//! idempotent steps, as a redemption is (`domain::points`):
//! 1. `Held` here: a use is put aside for one order request (`held + used` never
//!    exceeds `max_uses`; the buyer's own count never exceeds `per_buyer_max`);
//! 2. the stock shard creates the order at the discounted amount, under the hold's
//!    idempotency key, or refuses; it refuses a hold older than its deadline, so after
//!    the deadline no order can appear for a hold that has none;
//! 3. `Used` here once the order is delivered (it can no longer give the use back),
//!    or `Released` once it expired, was cancelled, was refused or never came to be.
//!    An order whose use was given back is never delivered: a payment that arrives
//!    after it expired is owed back (`RefundReason::CouponReturned`).
//!
//! The core resolves held uses by asking the order's stock shard (by the hold's
//! idempotency key), so a crash or a lost message between the steps only delays the
//! count, never changes it.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use super::{DomainError, Millis};

/// A coupon shard's answer: its event to journal, or a repeat.
pub type Outcome<T> = super::Outcome<CouponEvent, T>;

/// Longest coupon code (ASCII letters, digits, `-` and `_`).
pub const MAX_CODE_BYTES: usize = 32;
/// Most uses one coupon may have.
pub const MAX_USES: u64 = 1_000_000;
/// Most products one coupon may be bound to.
pub const MAX_PRODUCTS: usize = 64;
/// Most coupons one coupon shard keeps (disabled ones included).
pub const MAX_COUPONS_PER_SHARD: usize = 4_096;

/// What a coupon takes off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CouponKind {
    /// `value` cents off the order.
    Amount,
    /// `value` percent (1..=100) off the order, rounded down to the cent.
    Percent,
}

/// A coupon as the merchant defines it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CouponSpec {
    pub code: String,
    pub kind: CouponKind,
    pub value: u64,
    pub max_uses: u64,
    /// Uses one buyer may hold or have used (0: no limit beyond `max_uses`).
    pub per_buyer_max: u32,
    /// The products it applies to (empty: all).
    pub products: Vec<String>,
    /// The smallest order amount (before the discount) it applies to.
    pub min_amount_cents: u64,
    pub starts_at_ms: Option<Millis>,
    pub ends_at_ms: Option<Millis>,
}

/// Whether `code` may name a coupon.
pub fn check_code(code: &str) -> Result<(), String> {
    if code.is_empty() || code.len() > MAX_CODE_BYTES {
        return Err(format!("code: 1..={MAX_CODE_BYTES} characters"));
    }
    if !code.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
        return Err("code: only letters, digits, '-' and '_'".into());
    }
    Ok(())
}

/// Whether a coupon may be defined so; the message names the field.
pub fn check_spec(spec: &CouponSpec) -> Result<(), String> {
    check_code(&spec.code)?;
    match spec.kind {
        CouponKind::Percent if !(1..=100).contains(&spec.value) => return Err("value: a percent is 1..=100".into()),
        CouponKind::Amount if spec.value == 0 => return Err("value: at least 1 cent".into()),
        _ => {}
    }
    if spec.max_uses == 0 || spec.max_uses > MAX_USES {
        return Err(format!("max_uses: 1..={MAX_USES}"));
    }
    if spec.products.len() > MAX_PRODUCTS {
        return Err(format!("products: at most {MAX_PRODUCTS}"));
    }
    if let (Some(s), Some(e)) = (spec.starts_at_ms, spec.ends_at_ms) {
        if e <= s {
            return Err("ends_at: must be after starts_at".into());
        }
    }
    Ok(())
}

/// What a coupon of `kind`/`value` takes off a `subtotal_cents` order. An order
/// always keeps at least one cent to pay (a payment channel takes no zero payment),
/// so the discount is at most `subtotal - 1`; integer cents, no overflow.
pub fn discount(kind: CouponKind, value: u64, subtotal_cents: u64) -> u64 {
    let off = match kind {
        CouponKind::Amount => value,
        // value ≤ 100, so the product fits in u128 whatever the subtotal.
        CouponKind::Percent => (subtotal_cents as u128 * value.min(100) as u128 / 100) as u64,
    };
    off.min(subtotal_cents.saturating_sub(1))
}

/// A hold's coupon terms, as the stock shard prices the order with them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CouponUse {
    pub code: String,
    pub hold: String,
    pub kind: CouponKind,
    pub value: u64,
    pub min_amount_cents: u64,
    /// After this the stock shard refuses to create an order for the hold.
    pub deadline_ms: Millis,
}

/// One use put aside for one order request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CouponHold {
    pub hold: String,
    pub code: String,
    pub buyer: String,
    pub product_id: String,
    /// The idempotency key the order is created under (the stock shard finds it by it).
    pub idempotency_key: String,
    pub at_ms: Millis,
}

/// A coupon and its counts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Coupon {
    pub spec: CouponSpec,
    pub created_at_ms: Millis,
    pub disabled_at_ms: Option<Millis>,
    /// Uses held by orders not yet delivered nor closed.
    pub held: u64,
    /// Uses of delivered orders (final).
    pub used: u64,
    /// Uses given back (orders expired, cancelled or refused).
    pub released: u64,
    /// Uses held or used per buyer (buyers at 0 are dropped).
    per_buyer: HashMap<String, u32>,
}

impl Coupon {
    pub fn remaining(&self) -> u64 {
        self.spec.max_uses - self.held - self.used
    }
}

/// A journaled change of one coupon shard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CouponEvent {
    Created {
        spec: CouponSpec,
        at_ms: Millis,
    },
    Disabled {
        code: String,
        at_ms: Millis,
    },
    /// Step 1: a use put aside.
    Held(CouponHold),
    /// Step 3: the order was delivered; the use is spent.
    Used {
        hold: String,
        order_id: String,
        at_ms: Millis,
    },
    /// Step 3: the order will never be delivered; the use comes back.
    Released {
        hold: String,
        reason: String,
        at_ms: Millis,
    },
}

/// What the audit of one coupon shard found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CouponAudit {
    pub coupons: u64,
    pub held: u64,
    pub used: u64,
    pub released: u64,
    /// Broken invariants (empty when all hold).
    pub violations: Vec<String>,
    /// Per code: (used, held), for the cross-check with delivered orders.
    #[serde(skip)]
    pub by_code: BTreeMap<String, (u64, u64)>,
}

/// One coupon shard: its coupons and the holds in flight.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CouponBook {
    /// Events applied so far: the journal sequence of the last one.
    applied: u64,
    coupons: BTreeMap<String, Coupon>,
    /// Holds neither used nor released (at most the uses of the shard's coupons).
    holds: HashMap<String, CouponHold>,
    /// The same holds by age, for the resolver's pages.
    by_age: std::collections::BTreeSet<(Millis, String)>,
}

impl CouponBook {
    pub fn new() -> CouponBook {
        CouponBook::default()
    }

    /// Sequence of the last event applied.
    pub fn len(&self) -> u64 {
        self.applied
    }

    pub fn is_empty(&self) -> bool {
        self.applied == 0
    }

    pub fn coupon(&self, code: &str) -> Option<&Coupon> {
        self.coupons.get(code)
    }

    /// Up to `limit` coupons from `after` on (by code).
    pub fn coupons(&self, after: Option<&str>, limit: usize) -> Vec<Coupon> {
        let start = after.map_or(std::ops::Bound::Unbounded, |a| std::ops::Bound::Excluded(a.to_string()));
        self.coupons.range((start, std::ops::Bound::Unbounded)).take(limit).map(|(_, c)| c.clone()).collect()
    }

    /// Holds made before `before_ms` (the resolver's work), oldest first, after
    /// `after` (the last of the previous page), at most `limit`.
    pub fn holds_before(&self, before_ms: Millis, after: Option<&(Millis, String)>, limit: usize) -> Vec<CouponHold> {
        let start = after.map_or(std::ops::Bound::Unbounded, |a| std::ops::Bound::Excluded(a.clone()));
        self.by_age
            .range((start, std::ops::Bound::Unbounded))
            .take_while(|(at, _)| *at < before_ms)
            .take(limit)
            .map(|(_, hold)| self.holds[hold].clone())
            .collect()
    }

    /// Defines a coupon; answers it and whether this call created it (the same
    /// definition again is a repeat).
    pub fn create(&mut self, spec: CouponSpec, now_ms: Millis) -> Result<Outcome<(Coupon, bool)>, DomainError> {
        if let Some(c) = self.coupons.get(&spec.code) {
            return if c.spec == spec {
                Ok(Outcome::Repeat((c.clone(), false)))
            } else {
                Err(DomainError::CouponExists)
            };
        }
        if self.coupons.len() >= MAX_COUPONS_PER_SHARD {
            return Err(DomainError::CouponsFull);
        }
        let code = spec.code.clone();
        self.change(CouponEvent::Created { spec, at_ms: now_ms }, |book| (book.coupons[&code].clone(), true))
    }

    pub fn disable(&mut self, code: &str, now_ms: Millis) -> Result<Outcome<Coupon>, DomainError> {
        let c = self.coupons.get(code).ok_or(DomainError::CouponUnknown)?;
        if c.disabled_at_ms.is_some() {
            return Ok(Outcome::Repeat(c.clone()));
        }
        self.change(CouponEvent::Disabled { code: code.to_string(), at_ms: now_ms }, |book| book.coupons[code].clone())
    }

    /// Step 1: puts a use aside for `hold`, or refuses (nothing held). A hold still
    /// in flight is a repeat.
    pub fn hold(&mut self, h: CouponHold, now_ms: Millis) -> Result<Outcome<Coupon>, DomainError> {
        if self.holds.contains_key(&h.hold) {
            return Ok(Outcome::Repeat(self.coupons[&self.holds[&h.hold].code].clone()));
        }
        let c = self.coupons.get(&h.code).ok_or(DomainError::CouponUnknown)?;
        if c.disabled_at_ms.is_some() {
            return Err(DomainError::CouponDisabled);
        }
        if c.spec.starts_at_ms.is_some_and(|s| now_ms < s) {
            return Err(DomainError::CouponNotStarted);
        }
        if c.spec.ends_at_ms.is_some_and(|e| now_ms >= e) {
            return Err(DomainError::CouponExpired);
        }
        if !c.spec.products.is_empty() && !c.spec.products.contains(&h.product_id) {
            return Err(DomainError::CouponNotApplicable);
        }
        if c.remaining() == 0 {
            return Err(DomainError::CouponExhausted);
        }
        let mine = c.per_buyer.get(&h.buyer).copied().unwrap_or(0);
        if c.spec.per_buyer_max > 0 && mine >= c.spec.per_buyer_max {
            return Err(DomainError::CouponLimitPerBuyer { limit: c.spec.per_buyer_max });
        }
        let code = h.code.clone();
        self.change(CouponEvent::Held(CouponHold { at_ms: now_ms, ..h }), |book| book.coupons[&code].clone())
    }

    /// Step 3: the hold's order was delivered (`used`) or will never be (`!used`).
    /// A hold already finished is a repeat.
    pub fn finish(&mut self, hold: &str, outcome: Finish, now_ms: Millis) -> Result<Outcome<()>, DomainError> {
        if !self.holds.contains_key(hold) {
            return Ok(Outcome::Repeat(()));
        }
        let hold = hold.to_string();
        let event = match outcome {
            Finish::Used { order_id } => CouponEvent::Used { hold, order_id, at_ms: now_ms },
            Finish::Released { reason } => CouponEvent::Released { hold, reason, at_ms: now_ms },
        };
        self.change(event, |_| ())
    }

    fn change<T>(&mut self, event: CouponEvent, answer: impl FnOnce(&Self) -> T) -> Result<Outcome<T>, DomainError> {
        self.apply(&event);
        Ok(Outcome::Changed(event, answer(self)))
    }

    /// Applies a journaled event (also on recovery). Panics on an event that
    /// contradicts the book: recovery reports it as corruption.
    pub fn apply(&mut self, event: &CouponEvent) {
        self.applied += 1;
        match event {
            CouponEvent::Created { spec, at_ms } => {
                let coupon = Coupon {
                    spec: spec.clone(),
                    created_at_ms: *at_ms,
                    disabled_at_ms: None,
                    held: 0,
                    used: 0,
                    released: 0,
                    per_buyer: HashMap::new(),
                };
                assert!(self.coupons.insert(spec.code.clone(), coupon).is_none(), "coupon created twice");
            }
            CouponEvent::Disabled { code, at_ms } => {
                self.coupons.get_mut(code).expect("disabled coupon exists").disabled_at_ms = Some(*at_ms);
            }
            CouponEvent::Held(h) => {
                let c = self.coupons.get_mut(&h.code).expect("held coupon exists");
                assert!(c.remaining() > 0, "a use held beyond max_uses");
                c.held += 1;
                *c.per_buyer.entry(h.buyer.clone()).or_default() += 1;
                assert!(self.holds.insert(h.hold.clone(), h.clone()).is_none(), "hold made twice");
                self.by_age.insert((h.at_ms, h.hold.clone()));
            }
            CouponEvent::Used { hold, .. } => {
                let h = self.holds.remove(hold).expect("used hold exists");
                self.by_age.remove(&(h.at_ms, h.hold.clone()));
                let c = self.coupons.get_mut(&h.code).expect("coupon of a hold exists");
                c.held -= 1;
                c.used += 1;
            }
            CouponEvent::Released { hold, .. } => {
                let h = self.holds.remove(hold).expect("released hold exists");
                self.by_age.remove(&(h.at_ms, h.hold.clone()));
                let c = self.coupons.get_mut(&h.code).expect("coupon of a hold exists");
                c.held -= 1;
                c.released += 1;
                let mine = c.per_buyer.get_mut(&h.buyer).expect("a held buyer is counted");
                *mine -= 1;
                if *mine == 0 {
                    c.per_buyer.remove(&h.buyer);
                }
            }
        }
    }

    /// Recounts every coupon from the holds: `held` is the number of its holds,
    /// `held + used ≤ max_uses`, and the per-buyer counts add up to `held + used`.
    pub fn audit(&self) -> CouponAudit {
        let mut a = CouponAudit::default();
        let mut held: HashMap<&str, u64> = HashMap::new();
        for h in self.holds.values() {
            *held.entry(h.code.as_str()).or_default() += 1;
        }
        for (code, c) in &self.coupons {
            a.coupons += 1;
            (a.held, a.used, a.released) = (a.held + c.held, a.used + c.used, a.released + c.released);
            a.by_code.insert(code.clone(), (c.used, c.held));
            if held.get(code.as_str()).copied().unwrap_or(0) != c.held {
                a.violations.push(format!("coupon {code}: held {} but {} holds", c.held, held[code.as_str()]));
            }
            if c.held + c.used > c.spec.max_uses {
                a.violations
                    .push(format!("coupon {code}: {} held + {} used > {} uses", c.held, c.used, c.spec.max_uses));
            }
            let buyers: u64 = c.per_buyer.values().map(|&n| n as u64).sum();
            if buyers != c.held + c.used {
                a.violations.push(format!("coupon {code}: buyers hold {buyers}, coupon {}", c.held + c.used));
            }
        }
        a
    }
}

/// How a hold ends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Finish {
    Used { order_id: String },
    Released { reason: String },
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn spec(code: &str, max_uses: u64, per_buyer_max: u32) -> CouponSpec {
        CouponSpec {
            code: code.into(),
            kind: CouponKind::Amount,
            value: 50,
            max_uses,
            per_buyer_max,
            products: vec![],
            min_amount_cents: 0,
            starts_at_ms: None,
            ends_at_ms: None,
        }
    }

    fn hold(id: &str, buyer: &str) -> CouponHold {
        CouponHold {
            hold: id.into(),
            code: "C".into(),
            buyer: buyer.into(),
            product_id: "p".into(),
            idempotency_key: format!("coupon:{id}"),
            at_ms: 0,
        }
    }

    #[test]
    fn discounts_keep_a_cent_and_never_overflow() {
        assert_eq!(discount(CouponKind::Amount, 50, 990), 50);
        assert_eq!(discount(CouponKind::Amount, 5_000, 990), 989);
        assert_eq!(discount(CouponKind::Percent, 10, 995), 99);
        assert_eq!(discount(CouponKind::Percent, 100, 990), 989);
        assert_eq!(discount(CouponKind::Percent, 50, u64::MAX), u64::MAX / 2);
        assert_eq!(discount(CouponKind::Amount, 50, 0), 0);
    }

    #[test]
    fn specs_are_checked_field_by_field() {
        assert!(check_spec(&spec("SUMMER-10", 100, 0)).is_ok());
        let bad = |f: fn(&mut CouponSpec), field: &str| {
            let mut s = spec("C", 100, 0);
            f(&mut s);
            let e = check_spec(&s).unwrap_err();
            assert!(e.starts_with(field), "{e} names {field}");
        };
        bad(|s| s.code = "has space".into(), "code");
        bad(|s| s.code = String::new(), "code");
        bad(|s| (s.kind, s.value) = (CouponKind::Percent, 101), "value");
        bad(|s| (s.kind, s.value) = (CouponKind::Percent, 0), "value");
        bad(|s| s.value = 0, "value");
        bad(|s| s.max_uses = 0, "max_uses");
        bad(|s| s.max_uses = MAX_USES + 1, "max_uses");
        bad(|s| (s.starts_at_ms, s.ends_at_ms) = (Some(10), Some(10)), "ends_at");
    }

    #[test]
    fn a_coupon_refuses_what_it_does_not_allow_and_holds_nothing() {
        let mut b = CouponBook::new();
        assert_eq!(b.hold(hold("h", "x"), 0).unwrap_err(), DomainError::CouponUnknown);
        let mut s = spec("C", 1, 0);
        (s.products, s.starts_at_ms, s.ends_at_ms) = (vec!["q".into()], Some(100), Some(200));
        b.create(s, 0).unwrap();
        assert_eq!(b.hold(hold("h", "x"), 50).unwrap_err(), DomainError::CouponNotStarted);
        assert_eq!(b.hold(hold("h", "x"), 200).unwrap_err(), DomainError::CouponExpired);
        assert_eq!(b.hold(hold("h", "x"), 150).unwrap_err(), DomainError::CouponNotApplicable);
        b.disable("C", 150).unwrap();
        assert_eq!(
            b.hold(CouponHold { product_id: "q".into(), ..hold("h", "x") }, 150).unwrap_err(),
            DomainError::CouponDisabled
        );
        assert_eq!((b.coupon("C").unwrap().held, b.len()), (0, 2), "refusals journal nothing");
    }

    #[test]
    fn uses_are_exact_per_coupon_and_per_buyer_and_come_back_when_released() {
        let mut b = CouponBook::new();
        b.create(spec("C", 2, 1), 0).unwrap();
        assert!(matches!(b.hold(hold("h1", "x"), 1), Ok(Outcome::Changed(..))));
        assert!(matches!(b.hold(hold("h1", "x"), 2), Ok(Outcome::Repeat(_))), "a hold in flight repeats");
        assert_eq!(b.hold(hold("h2", "x"), 2).unwrap_err(), DomainError::CouponLimitPerBuyer { limit: 1 });
        b.hold(hold("h3", "y"), 3).unwrap();
        assert_eq!(b.hold(hold("h4", "z"), 4).unwrap_err(), DomainError::CouponExhausted);
        b.finish("h1", Finish::Released { reason: "expired".into() }, 5).unwrap();
        assert!(matches!(b.finish("h1", Finish::Used { order_id: "o".into() }, 6), Ok(Outcome::Repeat(()))));
        b.hold(hold("h4", "z"), 7).unwrap();
        b.finish("h3", Finish::Used { order_id: "o3".into() }, 8).unwrap();
        let c = b.coupon("C").unwrap();
        assert_eq!((c.held, c.used, c.released, c.remaining()), (1, 1, 1, 0));
        assert!(b.audit().violations.is_empty());
    }

    #[derive(Debug, Clone)]
    enum Op {
        Hold(u8, u8),
        Use(u8),
        Release(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u8..12, 0u8..4).prop_map(|(h, b)| Op::Hold(h, b)),
            (0u8..12).prop_map(Op::Use),
            (0u8..12).prop_map(Op::Release),
        ]
    }

    proptest! {
        /// Whatever the interleaving: held + used never exceeds max_uses, each buyer
        /// stays within its limit, the audit finds nothing, and replaying the journal
        /// rebuilds the same book.
        #[test]
        fn counts_stay_exact_and_replay_rebuilds_the_book(
            max_uses in 1u64..6,
            per_buyer in 0u32..3,
            ops in proptest::collection::vec(op(), 0..80),
        ) {
            let mut b = CouponBook::new();
            let mut journal = Vec::new();
            let record = |o: Outcome<_>, journal: &mut Vec<CouponEvent>| if let Outcome::Changed(e, _) = o { journal.push(e) };
            record(b.create(spec("C", max_uses, per_buyer), 0).unwrap().map(|_| ()), &mut journal);
            let mut next = 0u32;
            for op in ops {
                match op {
                    Op::Hold(h, buyer) => {
                        if let Ok(o) = b.hold(hold(&format!("h{h}-{next}"), &format!("b{buyer}")), 1) {
                            record(o.map(|_| ()), &mut journal);
                        }
                        next += 1;
                    }
                    Op::Use(i) | Op::Release(i) => {
                        let Some(h) = b.holds_before(u64::MAX, None, usize::MAX).get(i as usize).map(|h| h.hold.clone()) else { continue };
                        let finish = if matches!(op, Op::Use(_)) { Finish::Used { order_id: "o".into() } } else { Finish::Released { reason: "r".into() } };
                        record(b.finish(&h, finish, 2).unwrap(), &mut journal);
                    }
                }
                let c = b.coupon("C").unwrap();
                prop_assert!(c.held + c.used <= max_uses);
                if per_buyer > 0 {
                    prop_assert!(c.per_buyer.values().all(|&n| n <= per_buyer));
                }
                prop_assert!(b.audit().violations.is_empty(), "{:?}", b.audit());
            }
            let mut replayed = CouponBook::new();
            for e in &journal {
                replayed.apply(e);
            }
            prop_assert_eq!(replayed, b);
        }

        #[test]
        fn a_discount_never_takes_the_order_below_a_cent(value in 1u64..=100, amount in any::<u64>(), subtotal in any::<u64>()) {
            for (kind, value) in [(CouponKind::Percent, value), (CouponKind::Amount, amount)] {
                let d = discount(kind, value, subtotal);
                prop_assert!(d <= value.max(subtotal));
                prop_assert!(subtotal == 0 || subtotal - d >= 1);
                if kind == CouponKind::Percent {
                    prop_assert!(d as u128 <= subtotal as u128 * value as u128 / 100);
                }
            }
        }
    }
}
