//! Amounts as payment gateways write them, converted exactly: no floats anywhere.
//!
//! Alipay writes yuan as decimal strings (`"9.90"`); kami counts cents (fen) in
//! `u64`. A string is accepted only in the plain form `digits[.d[d]]`: no sign, no
//! exponent, no more than two decimals, no spaces, at most [`MAX_YUAN_DIGITS`]
//! integer digits (so the cents always fit).

/// Integer digits accepted in a yuan amount (10^15 yuan is far past any order).
pub const MAX_YUAN_DIGITS: usize = 15;

/// `"9.90"` → 990. Refuses anything but `digits[.d[d]]`.
pub fn yuan_to_cents(s: &str) -> Result<u64, String> {
    let bad = || format!("amount {s:?}: expected yuan as digits with at most two decimals (like 9.90)");
    let (whole, frac) = match s.split_once('.') {
        Some((w, f)) => (w, Some(f)),
        None => (s, None),
    };
    if whole.is_empty() || whole.len() > MAX_YUAN_DIGITS || !whole.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let frac_cents = match frac {
        None => 0,
        Some(f) if (1..=2).contains(&f.len()) && f.bytes().all(|b| b.is_ascii_digit()) => {
            let n: u64 = f.parse().map_err(|_| bad())?;
            if f.len() == 1 {
                n * 10
            } else {
                n
            }
        }
        Some(_) => return Err(bad()),
    };
    let whole: u64 = whole.parse().map_err(|_| bad())?;
    Ok(whole * 100 + frac_cents)
}

/// 990 → `"9.90"` (always two decimals, as Alipay expects).
pub fn cents_to_yuan(cents: u64) -> String {
    format!("{}.{:02}", cents / 100, cents % 100)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn plain_yuan_strings_convert_exactly() {
        assert_eq!(yuan_to_cents("9.90"), Ok(990));
        assert_eq!(yuan_to_cents("9.9"), Ok(990));
        assert_eq!(yuan_to_cents("0.01"), Ok(1));
        assert_eq!(yuan_to_cents("12"), Ok(1200));
        assert_eq!(yuan_to_cents("0.10"), Ok(10));
        assert_eq!(cents_to_yuan(990), "9.90");
        assert_eq!(cents_to_yuan(5), "0.05");
    }

    #[test]
    fn every_other_form_is_refused() {
        for bad in [
            "",
            ".5",
            "9.",
            "9.999",
            "-1.00",
            "+1.00",
            "1e3",
            "1.0e1",
            " 1.00",
            "1.00 ",
            "1,00",
            "0x10",
            "NaN",
            "inf",
            "1.-1",
            "1234567890123456.00",
        ] {
            assert!(yuan_to_cents(bad).is_err(), "{bad:?} must be refused");
        }
    }

    proptest! {
        #[test]
        fn cents_round_trip_through_yuan(cents in 0u64..=99_999_999_999_999_999) {
            prop_assert_eq!(yuan_to_cents(&cents_to_yuan(cents)), Ok(cents));
        }
    }
}
