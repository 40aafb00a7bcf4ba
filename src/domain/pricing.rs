//! What an order costs: the one pricing function.
//!
//! An order's amount is the unit price of its quantity times the quantity, in
//! integer cents. The unit price is the product's price, or the price of the
//! quantity tier the order reaches (批发价: "10 or more, 80 cents each"): the tier
//! with the largest `min_quantity` not above the quantity. A reseller (an API-key
//! tier with a price list) pays its own unit price instead when that is lower: a
//! fixed price for the product, or a percentage of what anyone else would pay.
//! Tiers are checked when
//! the merchant sets them ([`check_tiers`]): strictly increasing in quantity, never
//! above the price before them, so buying more never costs more per key. No float
//! anywhere; every product is overflow-checked.

use serde::{Deserialize, Serialize};

use super::coupon::{self, CouponUse};
use super::error::DomainError;

/// Most quantity tiers a product may have.
pub const MAX_TIERS: usize = 16;

/// From `min_quantity` keys on, each costs `unit_price_cents`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceTier {
    pub min_quantity: u32,
    pub unit_price_cents: u64,
}

/// Most products one reseller price list names.
pub const MAX_RESELLER_PRICES: usize = 10_000;

/// A reseller's price for one product.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResellerRate {
    /// This share (1..=100) of the unit price anyone else would pay, rounded down
    /// (never below one cent).
    Percent(u32),
    /// This unit price, or the one anyone else would pay if that is lower.
    Unit(u64),
}

/// Who sells at a reseller price, and the price (for one product).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reseller {
    /// The API-key tier's name (kept with the order).
    pub name: String,
    pub rate: ResellerRate,
}

/// A reseller tier's price list: a unit price per product, and a percentage for
/// the products it does not name (none: those sell at the public price).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResellerPrices {
    pub name: String,
    pub percent: Option<u32>,
    pub unit_prices: std::collections::BTreeMap<String, u64>,
}

impl ResellerPrices {
    /// The reseller price of `product`, if the list has one.
    pub fn for_product(&self, product: &str) -> Option<Reseller> {
        let rate = match self.unit_prices.get(product) {
            Some(&unit) => ResellerRate::Unit(unit),
            None => ResellerRate::Percent(self.percent?),
        };
        Some(Reseller { name: self.name.clone(), rate })
    }

    /// Whether the list may be used: a percentage in 1..=100, unit prices of at
    /// least one cent, at most [`MAX_RESELLER_PRICES`] products. The message names
    /// the field.
    pub fn check(&self) -> Result<(), String> {
        if let Some(p) = self.percent {
            if !(1..=100).contains(&p) {
                return Err("price_percent: must be 1..=100 (a reseller never pays more than anyone else)".into());
            }
        }
        if self.unit_prices.len() > MAX_RESELLER_PRICES {
            return Err(format!("unit_prices: at most {MAX_RESELLER_PRICES} products"));
        }
        for (product, &cents) in &self.unit_prices {
            super::validate::product_id(product).map_err(|e| format!("unit_prices.{product}: {e}"))?;
            if cents == 0 {
                return Err(format!("unit_prices.{product}: must be at least 1 cent"));
            }
        }
        Ok(())
    }
}

/// An order's amount, line by line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Price {
    pub quantity: u32,
    /// The product's own unit price.
    pub list_unit_cents: u64,
    /// The tier the quantity reached, if any.
    pub tier: Option<PriceTier>,
    /// The reseller whose price applied (it was lower than the public one), if any.
    pub reseller: Option<String>,
    /// What each key costs in this order.
    pub unit_cents: u64,
    /// `unit_cents × quantity`.
    pub subtotal_cents: u64,
    /// The coupon applied, if any, and what it took off the subtotal.
    pub coupon: Option<CouponRef>,
    pub discount_cents: u64,
    /// `subtotal_cents − discount_cents`, never below one cent when a coupon applies.
    pub total_cents: u64,
}

impl Price {
    /// What an order priced so keeps of its pricing (`None`: the list price, which
    /// its amount alone tells).
    pub fn record(&self) -> Option<OrderPricing> {
        (self.tier.is_some() || self.coupon.is_some() || self.reseller.is_some()).then(|| OrderPricing {
            list_unit_cents: self.list_unit_cents,
            tier_min_quantity: self.tier.map(|t| t.min_quantity),
            reseller: self.reseller.clone(),
            coupon: self.coupon.clone(),
            discount_cents: self.discount_cents,
        })
    }
}

/// (v9) How an order was priced, when not simply at the list price: kept with the
/// order (journal, snapshot, archive), so that every answer about it explains its
/// amount the same way, whatever the product's terms have become since.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderPricing {
    /// The product's unit price when the order was made.
    pub list_unit_cents: u64,
    /// The quantity tier the order reached.
    pub tier_min_quantity: Option<u32>,
    /// The reseller (API-key tier) whose price list priced it.
    pub reseller: Option<String>,
    /// (v10) The coupon it used, and the use held for it.
    pub coupon: Option<CouponRef>,
    /// What the coupon took off the subtotal.
    pub discount_cents: u64,
}

/// An order's amount explained (`price_breakdown` in its answers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Breakdown<'a> {
    pub quantity: u32,
    /// The product's unit price when the order was made.
    pub list_unit_price_cents: u64,
    /// The quantity tier reached (its `min_quantity`), if any.
    pub tier_min_quantity: Option<u32>,
    /// The reseller whose price list priced it, if any.
    pub reseller: Option<&'a str>,
    /// What each key cost.
    pub unit_price_cents: u64,
    /// `unit_price_cents × quantity`.
    pub subtotal_cents: u64,
    /// The coupon applied, if any (its code).
    pub coupon: Option<&'a str>,
    /// Taken off the subtotal (by the coupon).
    pub discount_cents: u64,
    /// The order's amount.
    pub total_cents: u64,
}

/// The breakdown of an order of `quantity` for `amount_cents`, from its pricing
/// record, or at the list price when it has none.
pub fn breakdown(quantity: u32, amount_cents: u64, record: Option<&OrderPricing>) -> Breakdown<'_> {
    let subtotal_cents = amount_cents + record.map_or(0, |r| r.discount_cents);
    let unit_price_cents = subtotal_cents / u64::from(quantity.max(1));
    Breakdown {
        quantity,
        list_unit_price_cents: record.map_or(unit_price_cents, |r| r.list_unit_cents),
        tier_min_quantity: record.and_then(|r| r.tier_min_quantity),
        reseller: record.and_then(|r| r.reseller.as_deref()),
        unit_price_cents,
        subtotal_cents,
        coupon: record.and_then(|r| r.coupon.as_ref()).map(|c| c.code.as_str()),
        discount_cents: record.map_or(0, |r| r.discount_cents),
        total_cents: amount_cents,
    }
}

/// Whether `tiers` may go with unit price `price_cents`: at most [`MAX_TIERS`],
/// `min_quantity` at least 2 and strictly increasing, each unit price at most the
/// one before it (the product's price before the first). The message names the
/// field.
pub fn check_tiers(price_cents: u64, tiers: &[PriceTier]) -> Result<(), String> {
    if tiers.len() > MAX_TIERS {
        return Err(format!("tiers: at most {MAX_TIERS}"));
    }
    let (mut last_quantity, mut last_price) = (1u32, price_cents);
    for (i, t) in tiers.iter().enumerate() {
        if t.min_quantity <= last_quantity {
            return Err(format!(
                "tiers[{i}].min_quantity: must be above {last_quantity} (tiers increase in quantity, from 2)"
            ));
        }
        if t.unit_price_cents > last_price {
            return Err(format!(
                "tiers[{i}].unit_price_cents: must be at most {last_price} (more keys never cost more each)"
            ));
        }
        (last_quantity, last_price) = (t.min_quantity, t.unit_price_cents);
    }
    Ok(())
}

/// (v10) A coupon as an order keeps it: its code and the use held for the order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CouponRef {
    pub code: String,
    pub hold: String,
}

/// The price of `quantity` keys at unit price `list_unit_cents` with `tiers`
/// (checked by [`check_tiers`]), at `reseller`'s price when that is lower, less
/// `coupon`'s discount if it applies: a coupon whose minimum amount the subtotal
/// does not reach is refused (`CouponNotApplicable`).
pub fn price(
    list_unit_cents: u64,
    tiers: &[PriceTier],
    quantity: u32,
    reseller: Option<&Reseller>,
    coupon: Option<&CouponUse>,
) -> Result<Price, DomainError> {
    let tier = tiers.iter().rev().find(|t| t.min_quantity <= quantity).copied();
    let public_cents = tier.map_or(list_unit_cents, |t| t.unit_price_cents.min(list_unit_cents));
    let resold = reseller.map(|r| (r, reseller_unit(r.rate, public_cents))).filter(|&(_, u)| u < public_cents);
    let unit_cents = resold.map_or(public_cents, |(_, u)| u);
    let subtotal_cents = unit_cents.checked_mul(quantity as u64).ok_or(DomainError::AmountTooLarge)?;
    let discount_cents = match coupon {
        Some(c) if subtotal_cents < c.min_amount_cents => return Err(DomainError::CouponNotApplicable),
        Some(c) => coupon::discount(c.kind, c.value, subtotal_cents),
        None => 0,
    };
    Ok(Price {
        quantity,
        list_unit_cents,
        tier,
        reseller: resold.map(|(r, _)| r.name.clone()),
        unit_cents,
        subtotal_cents,
        coupon: coupon.map(|c| CouponRef { code: c.code.clone(), hold: c.hold.clone() }),
        discount_cents,
        total_cents: subtotal_cents - discount_cents,
    })
}

/// A reseller's unit price where anyone else pays `public_cents`: never above it,
/// never below one cent unless it is zero.
fn reseller_unit(rate: ResellerRate, public_cents: u64) -> u64 {
    match rate {
        ResellerRate::Unit(u) => u.min(public_cents),
        ResellerRate::Percent(p) => {
            let share = (u128::from(public_cents) * u128::from(p.min(100)) / 100) as u64;
            share.max(public_cents.min(1))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::coupon::CouponKind;
    use proptest::prelude::*;

    fn tier(min_quantity: u32, unit_price_cents: u64) -> PriceTier {
        PriceTier { min_quantity, unit_price_cents }
    }

    #[test]
    fn the_largest_tier_reached_sets_the_unit_price() {
        let tiers = [tier(10, 80), tier(100, 60)];
        let at = |q| price(100, &tiers, q, None, None).unwrap();
        assert_eq!((at(1).unit_cents, at(1).total_cents, at(1).tier), (100, 100, None));
        assert_eq!((at(9).total_cents, at(10).total_cents, at(10).tier), (900, 800, Some(tier(10, 80))));
        assert_eq!((at(99).unit_cents, at(100).unit_cents, at(500).total_cents), (80, 60, 30_000));
        assert_eq!((at(10).list_unit_cents - at(10).unit_cents) * 10, 200, "the tier saves 20 a key");
        assert_eq!(price(u64::MAX, &[], 2, None, None), Err(DomainError::AmountTooLarge));
    }

    #[test]
    fn tiers_must_increase_in_quantity_and_never_in_price() {
        assert_eq!(check_tiers(100, &[tier(10, 80), tier(20, 80)]), Ok(()));
        assert!(check_tiers(100, &[tier(1, 80)]).unwrap_err().starts_with("tiers[0].min_quantity"));
        assert!(check_tiers(100, &[tier(10, 80), tier(10, 70)]).unwrap_err().starts_with("tiers[1].min_quantity"));
        assert!(check_tiers(100, &[tier(10, 80), tier(5, 70)]).unwrap_err().starts_with("tiers[1].min_quantity"));
        assert!(check_tiers(100, &[tier(10, 101)]).unwrap_err().starts_with("tiers[0].unit_price_cents"));
        assert!(check_tiers(100, &[tier(10, 80), tier(20, 90)]).unwrap_err().starts_with("tiers[1].unit_price_cents"));
        let many: Vec<PriceTier> = (0..=MAX_TIERS as u32).map(|i| tier(i + 2, 50)).collect();
        assert!(check_tiers(100, &many).unwrap_err().starts_with("tiers:"));
    }

    #[test]
    fn a_reseller_pays_its_price_when_it_is_lower_than_anyone_elses() {
        let tiers = [tier(10, 80)];
        let acme = |rate| Reseller { name: "acme".into(), rate };
        let at = |q, r: &Reseller| price(100, &tiers, q, Some(r), None).unwrap();
        // A fixed price below the list price; a quantity tier lower still wins.
        let fixed = acme(ResellerRate::Unit(90));
        assert_eq!((at(1, &fixed).unit_cents, at(1, &fixed).reseller.as_deref()), (90, Some("acme")));
        assert_eq!((at(10, &fixed).unit_cents, at(10, &fixed).reseller), (80, None));
        // A percentage of what anyone else pays, tier included: rounded down, never below a cent.
        let share = acme(ResellerRate::Percent(85));
        assert_eq!((at(1, &share).unit_cents, at(10, &share).unit_cents, at(10, &share).total_cents), (85, 68, 680));
        assert_eq!(price(1, &[], 3, Some(&acme(ResellerRate::Percent(1))), None).unwrap().total_cents, 3);
        assert_eq!(at(1, &acme(ResellerRate::Percent(100))).reseller, None, "no lower: the public price");
        // What the order keeps names the reseller; the breakdown explains the amount.
        let p = at(2, &fixed);
        let record = p.record().expect("a reseller price is recorded");
        let b = breakdown(2, p.total_cents, Some(&record));
        assert_eq!(
            (b.reseller, b.list_unit_price_cents, b.unit_price_cents, b.total_cents),
            (Some("acme"), 100, 90, 180)
        );
    }

    #[test]
    fn reseller_price_lists_are_checked_naming_the_field() {
        let list = |percent, units: &[(&str, u64)]| ResellerPrices {
            name: "acme".into(),
            percent,
            unit_prices: units.iter().map(|&(p, c)| (p.to_string(), c)).collect(),
        };
        assert_eq!(list(Some(90), &[("game-card", 800)]).check(), Ok(()));
        assert!(list(Some(0), &[]).check().unwrap_err().starts_with("price_percent"));
        assert!(list(Some(101), &[]).check().unwrap_err().starts_with("price_percent"));
        assert!(list(None, &[("p", 0)]).check().unwrap_err().starts_with("unit_prices.p"));
        assert!(list(None, &[("Bad Id", 5)]).check().unwrap_err().starts_with("unit_prices.Bad Id"));
        // A product it names has its fixed price; others the percentage, or none.
        let l = list(Some(90), &[("game-card", 800)]);
        assert_eq!(l.for_product("game-card").map(|r| r.rate), Some(ResellerRate::Unit(800)));
        assert_eq!(l.for_product("other").map(|r| r.rate), Some(ResellerRate::Percent(90)));
        assert_eq!(list(None, &[]).for_product("other"), None);
    }

    fn tiers() -> impl Strategy<Value = (u64, Vec<PriceTier>)> {
        (0u64..1_000_000_000_000, proptest::collection::vec((1u32..50, 0u64..1_000), 0..MAX_TIERS)).prop_map(
            |(price, steps)| {
                let (mut q, mut p, mut out) = (1u32, price, Vec::new());
                for (dq, dp) in steps {
                    q += dq;
                    p = p.saturating_sub(dp);
                    out.push(PriceTier { min_quantity: q, unit_price_cents: p });
                }
                (price, out)
            },
        )
    }

    proptest! {
        /// The total is the unit price times the quantity, the unit price is the
        /// list price or a tier's, never above the list price, and buying more
        /// never costs more per key.
        #[test]
        fn a_price_adds_up_and_more_never_costs_more_each((list, tiers) in tiers(), q in 1u32..10_000) {
            prop_assert_eq!(check_tiers(list, &tiers), Ok(()));
            let p = price(list, &tiers, q, None, None).unwrap();
            prop_assert_eq!(p.total_cents, p.unit_cents * q as u64);
            prop_assert!(p.unit_cents <= list);
            prop_assert_eq!(p.total_cents + (list - p.unit_cents) * q as u64, list * q as u64);
            match p.tier {
                None => prop_assert!(p.unit_cents == list && tiers.iter().all(|t| t.min_quantity > q)),
                Some(t) => {
                    prop_assert!(t.min_quantity <= q && p.unit_cents == t.unit_price_cents);
                    prop_assert!(tiers.iter().all(|o| o.min_quantity <= t.min_quantity || o.min_quantity > q));
                }
            }
            let more = price(list, &tiers, q + 1, None, None).unwrap();
            prop_assert!(more.unit_cents <= p.unit_cents);
            // What an order keeps explains its amount as it was priced.
            let record = p.record();
            let b = breakdown(q, p.total_cents, record.as_ref());
            prop_assert_eq!((b.list_unit_price_cents, b.unit_price_cents, b.total_cents), (list, p.unit_cents, p.total_cents));
            prop_assert_eq!(b.tier_min_quantity, p.tier.map(|t| t.min_quantity));
        }

        /// A reseller never pays more than anyone else, and is named exactly when
        /// its price is what applied.
        #[test]
        fn a_reseller_price_is_never_above_the_public_one((list, tiers) in tiers(), q in 1u32..10_000, fixed in any::<bool>(), value in 1u64..2_000) {
            let rate = if fixed { ResellerRate::Unit(value) } else { ResellerRate::Percent((value % 100) as u32 + 1) };
            let reseller = Reseller { name: "r".into(), rate };
            let public = price(list, &tiers, q, None, None).unwrap();
            let p = price(list, &tiers, q, Some(&reseller), None).unwrap();
            prop_assert!(p.unit_cents <= public.unit_cents);
            prop_assert_eq!(p.reseller.is_some(), p.unit_cents < public.unit_cents);
            prop_assert!(public.unit_cents == 0 || p.unit_cents >= 1);
            prop_assert_eq!(p.total_cents, p.unit_cents * q as u64);
            let record = p.record();
            let b = breakdown(q, p.total_cents, record.as_ref());
            prop_assert_eq!((b.unit_price_cents, b.reseller), (p.unit_cents, p.reseller.as_deref()));
        }

        /// A coupon takes its discount off the subtotal, never leaves less than a
        /// cent, is refused below its minimum amount, and what the order keeps
        /// explains the amount line by line.
        #[test]
        fn a_coupon_discount_adds_up((list, tiers) in tiers(), q in 1u32..1_000, percent in any::<bool>(), value in 1u64..2_000, min in 0u64..5_000) {
            let (kind, value) = if percent { (CouponKind::Percent, value % 100 + 1) } else { (CouponKind::Amount, value) };
            let c = CouponUse { code: "C".into(), hold: "h".into(), kind, value, min_amount_cents: min, deadline_ms: 0 };
            let plain = price(list, &tiers, q, None, None).unwrap();
            match price(list, &tiers, q, None, Some(&c)) {
                Err(e) => prop_assert!(e == DomainError::CouponNotApplicable && plain.subtotal_cents < min),
                Ok(p) => {
                    prop_assert!(plain.subtotal_cents >= min);
                    prop_assert_eq!(p.subtotal_cents, plain.total_cents);
                    prop_assert_eq!(p.total_cents + p.discount_cents, p.subtotal_cents);
                    prop_assert!(p.subtotal_cents == 0 || p.total_cents >= 1);
                    prop_assert!(p.discount_cents <= value.max(p.subtotal_cents));
                    let record = p.record();
                    let b = breakdown(q, p.total_cents, record.as_ref());
                    prop_assert_eq!((b.subtotal_cents, b.discount_cents, b.total_cents), (p.subtotal_cents, p.discount_cents, p.total_cents));
                    prop_assert_eq!(b.coupon, Some("C"));
                }
            }
        }
    }
}
