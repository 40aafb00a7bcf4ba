//! A product's terms of sale: what the merchant may change while it sells (name,
//! unit price, quantity tiers, per-buyer limit, sale window), apart from its identity (id, shards,
//! creation time) which never changes.
//!
//! Terms apply to what is created from then on: an order keeps the `amount_cents`
//! it was created with, whatever the price becomes. The window is checked by the
//! shard with the caller's clock, like every other decision (see
//! [`Terms::check_window`]).

use serde::{Deserialize, Serialize};

use super::error::DomainError;
use super::pricing::{self, PriceTier};
use super::shard::ProductInfo;
use super::validate;
use super::Millis;

/// The changeable part of a product.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Terms {
    pub name: String,
    pub price_cents: u64,
    /// 0 = unlimited.
    pub per_buyer_limit: u32,
    /// Orders before this instant (Unix ms) are refused (`sale_not_started`).
    pub sale_starts_at_ms: Option<Millis>,
    /// Orders from this instant on (Unix ms) are refused (`sale_ended`).
    pub sale_ends_at_ms: Option<Millis>,
    /// (v8) Quantity tiers (see [`super::pricing`]), checked against `price_cents`.
    pub tiers: Vec<PriceTier>,
}

/// A change of terms: each field present replaces the current one (`Some(None)`
/// clears a window bound).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TermsChange {
    pub name: Option<String>,
    pub price_cents: Option<u64>,
    pub per_buyer_limit: Option<u32>,
    pub sale_starts_at_ms: Option<Option<Millis>>,
    pub sale_ends_at_ms: Option<Option<Millis>>,
    pub tiers: Option<Vec<PriceTier>>,
}

impl TermsChange {
    pub fn is_empty(&self) -> bool {
        *self == TermsChange::default()
    }
}

impl Terms {
    /// The terms a product was created with (no window).
    pub fn of(info: &ProductInfo) -> Terms {
        Terms {
            name: info.name.clone(),
            price_cents: info.price_cents,
            per_buyer_limit: info.per_buyer_limit,
            sale_starts_at_ms: None,
            sale_ends_at_ms: None,
            tiers: Vec::new(),
        }
    }

    /// These terms with `change` applied, or why the result is not valid (the
    /// message names the field). Nothing is changed on error.
    pub fn changed(&self, change: &TermsChange) -> Result<Terms, String> {
        let mut next = self.clone();
        if let Some(name) = &change.name {
            validate::product_name(name)?;
            next.name = name.clone();
        }
        if let Some(price) = change.price_cents {
            if price > validate::MAX_PRICE_CENTS {
                return Err(format!("price_cents: must be at most {}", validate::MAX_PRICE_CENTS));
            }
            next.price_cents = price;
        }
        if let Some(limit) = change.per_buyer_limit {
            next.per_buyer_limit = limit;
        }
        if let Some(starts) = change.sale_starts_at_ms {
            next.sale_starts_at_ms = starts;
        }
        if let Some(ends) = change.sale_ends_at_ms {
            next.sale_ends_at_ms = ends;
        }
        if let (Some(starts), Some(ends)) = (next.sale_starts_at_ms, next.sale_ends_at_ms) {
            if ends <= starts {
                return Err("sale_ends_at: must be after sale_starts_at".into());
            }
        }
        if let Some(tiers) = &change.tiers {
            next.tiers.clone_from(tiers);
        }
        // Checked whole: a new price must stay above the tiers kept, and new tiers
        // below the price.
        pricing::check_tiers(next.price_cents, &next.tiers)?;
        Ok(next)
    }

    /// Whether something new may be sold at `now_ms`: within the sale window.
    pub fn check_window(&self, now_ms: Millis) -> Result<(), DomainError> {
        if let Some(starts_at_ms) = self.sale_starts_at_ms {
            if now_ms < starts_at_ms {
                return Err(DomainError::SaleNotStarted { starts_at_ms, ends_at_ms: self.sale_ends_at_ms });
            }
        }
        if let Some(ends_at_ms) = self.sale_ends_at_ms {
            if now_ms >= ends_at_ms {
                return Err(DomainError::SaleEnded { starts_at_ms: self.sale_starts_at_ms, ends_at_ms });
            }
        }
        Ok(())
    }

    /// `info` with these terms' name, price and limit.
    pub fn apply_to(&self, info: &mut ProductInfo) {
        info.name.clone_from(&self.name);
        info.price_cents = self.price_cents;
        info.per_buyer_limit = self.per_buyer_limit;
    }
}

/// An instant (Unix ms) as RFC 3339 in UTC with milliseconds, as every answer shows times.
pub fn rfc3339(ms: Millis) -> String {
    chrono::DateTime::from_timestamp_millis(ms as i64)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// An RFC 3339 time as Unix ms (`None`: not RFC 3339, or before 1970).
pub fn parse_rfc3339(s: &str) -> Option<Millis> {
    let t = chrono::DateTime::parse_from_rfc3339(s).ok()?;
    u64::try_from(t.timestamp_millis()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn info() -> ProductInfo {
        ProductInfo {
            id: "p".into(),
            name: "P".into(),
            price_cents: 100,
            per_buyer_limit: 2,
            shards: 1,
            created_at_ms: 5,
        }
    }

    #[test]
    fn a_change_replaces_only_the_fields_it_names() {
        let t = Terms::of(&info());
        let c = TermsChange { price_cents: Some(80), ..Default::default() };
        let next = t.changed(&c).unwrap();
        assert_eq!(next, Terms { price_cents: 80, ..t.clone() });
        let c = TermsChange { name: Some("New".into()), per_buyer_limit: Some(0), ..Default::default() };
        let next = next.changed(&c).unwrap();
        assert_eq!((next.name.as_str(), next.price_cents, next.per_buyer_limit), ("New", 80, 0));
        let mut product = info();
        next.apply_to(&mut product);
        assert_eq!((product.name.as_str(), product.price_cents, product.per_buyer_limit), ("New", 80, 0));
        assert_eq!((product.id.as_str(), product.shards, product.created_at_ms), ("p", 1, 5));
    }

    #[test]
    fn invalid_changes_are_refused_and_name_the_field() {
        let t = Terms::of(&info());
        let bad_price = TermsChange { price_cents: Some(validate::MAX_PRICE_CENTS + 1), ..Default::default() };
        assert!(t.changed(&bad_price).unwrap_err().starts_with("price_cents"));
        let bad_name = TermsChange { name: Some(String::new()), ..Default::default() };
        assert!(t.changed(&bad_name).is_err());
        let backwards =
            TermsChange { sale_starts_at_ms: Some(Some(10)), sale_ends_at_ms: Some(Some(10)), ..Default::default() };
        assert!(t.changed(&backwards).unwrap_err().starts_with("sale_ends_at"));
        // A bound set against the other one already stored.
        let with_end = t.changed(&TermsChange { sale_ends_at_ms: Some(Some(50)), ..Default::default() }).unwrap();
        let late_start = TermsChange { sale_starts_at_ms: Some(Some(60)), ..Default::default() };
        assert!(with_end.changed(&late_start).is_err());
        // Clearing a bound.
        let cleared = with_end.changed(&TermsChange { sale_ends_at_ms: Some(None), ..Default::default() }).unwrap();
        assert_eq!(cleared.sale_ends_at_ms, None);
    }

    #[test]
    fn the_window_opens_at_its_start_and_closes_at_its_end() {
        let t = Terms { sale_starts_at_ms: Some(100), sale_ends_at_ms: Some(200), ..Terms::of(&info()) };
        assert_eq!(t.check_window(99), Err(DomainError::SaleNotStarted { starts_at_ms: 100, ends_at_ms: Some(200) }));
        assert_eq!(t.check_window(100), Ok(()));
        assert_eq!(t.check_window(199), Ok(()));
        assert_eq!(t.check_window(200), Err(DomainError::SaleEnded { starts_at_ms: Some(100), ends_at_ms: 200 }));
        assert_eq!(Terms::of(&info()).check_window(0), Ok(()));
    }

    proptest! {
        /// Whatever the change, valid terms stay valid (a window never ends before it
        /// starts) and an instant is refused by at most one bound.
        #[test]
        fn changes_keep_terms_valid(
            start in proptest::option::of(proptest::option::of(0u64..1000)),
            end in proptest::option::of(proptest::option::of(0u64..1000)),
            now in 0u64..1200,
        ) {
            let t = Terms::of(&info());
            let c = TermsChange { sale_starts_at_ms: start, sale_ends_at_ms: end, ..Default::default() };
            if let Ok(next) = t.changed(&c) {
                if let (Some(s), Some(e)) = (next.sale_starts_at_ms, next.sale_ends_at_ms) {
                    prop_assert!(s < e);
                }
                let open = next.sale_starts_at_ms.is_none_or(|s| now >= s) && next.sale_ends_at_ms.is_none_or(|e| now < e);
                prop_assert_eq!(next.check_window(now).is_ok(), open);
            }
        }
    }
}
