//! How a product's keys are sold: each key once (`unique`, the default), or one key
//! (or a few) delivered to every buyer who pays (`reusable`, 循环卡密), with stock
//! as a number of units the merchant sets.
//!
//! A reusable key's stock is kept as units: unit `n` of key `K` is stored as the
//! key `K\0n`. A real key never contains a control character (`validate::key`), so
//! a stored key with a `\0` is a unit and nothing else is. Every unit is a distinct
//! key to the shard, so the key accounting, transfers between shards, withdrawal,
//! the audit (imported = available + reserved + sold + in transit + withdrawn, in
//! units) and recovery are the same code for both modes; buyers and merchants see
//! the key itself ([`shown`]). A unit costs what a key costs (one stored string),
//! hence [`MAX_UNITS`].

use serde::{Deserialize, Serialize};

/// Most units one reusable key may have.
pub const MAX_UNITS: u64 = 1_000_000;

/// Separates a reusable key from its unit number in the stored form.
const UNIT_MARK: char = '\0';

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyMode {
    #[default]
    Unique,
    Reusable,
}

impl KeyMode {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyMode::Unique => "unique",
            KeyMode::Reusable => "reusable",
        }
    }
}

/// The stored form of unit `unit` of reusable key `key`.
pub fn unit(key: &str, unit: u64) -> String {
    format!("{key}{UNIT_MARK}{unit}")
}

/// Whether a stored key is a reusable key's unit.
pub fn is_unit(stored: &str) -> bool {
    stored.contains(UNIT_MARK)
}

/// What a stored key shows to buyers and merchants: a unit shows its key.
pub fn shown(stored: &str) -> &str {
    stored.split_once(UNIT_MARK).map_or(stored, |(key, _)| key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_unit_shows_its_key_and_a_plain_key_shows_itself() {
        assert_eq!(unit("ABC-123", 7), "ABC-123\u{0}7");
        assert_eq!(shown(&unit("ABC-123", 7)), "ABC-123");
        assert_eq!(shown("ABC-123"), "ABC-123");
    }

    proptest! {
        #[test]
        fn units_are_distinct_and_show_their_key(key in "[^\\p{Cc}]{1,40}", a in 0..MAX_UNITS, b in 0..MAX_UNITS) {
            prop_assume!(crate::domain::validate::key(&key).is_ok());
            let stored = unit(&key, a);
            prop_assert_eq!(shown(&stored), key.as_str());
            prop_assert!(is_unit(&stored) && !is_unit(&key));
            prop_assert_eq!(unit(&key, a) == unit(&key, b), a == b);
            prop_assert!(crate::domain::validate::key(&unit(&key, a)).is_err(), "a unit is never a key one can import");
        }
    }
}
