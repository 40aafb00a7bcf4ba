//! Input rules. Each returns a human message naming the field on failure.

/// Longest key accepted, in bytes (the contract: 1..=256 bytes of printable text).
pub const KEY_MAX_BYTES: usize = 256;
/// Longest buyer identifier, in bytes.
pub const BUYER_MAX_BYTES: usize = 254;
/// Longest product name, in bytes.
pub const NAME_MAX_BYTES: usize = 200;
/// Highest price of anything, in cents (10^12: ten billion in the currency's unit).
pub const MAX_PRICE_CENTS: u64 = 1_000_000_000_000;
/// Longest Idempotency-Key, payment id or nonce, in bytes.
pub const TOKEN_MAX_BYTES: usize = 128;

pub fn is_product_id(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

pub fn product_id(s: &str) -> Result<(), String> {
    if is_product_id(s) {
        Ok(())
    } else {
        Err("id: must match [a-z0-9_-]{1,64}".into())
    }
}

/// No control characters, and none of the Unicode format characters that change
/// how the text around them is shown (bidirectional overrides and isolates,
/// zero-width characters, the byte-order mark): a name must read as it is stored.
fn printable(s: &str) -> bool {
    s.chars().all(|c| !c.is_control() && !is_invisible_format(c))
}

fn is_invisible_format(c: char) -> bool {
    matches!(c,
        '\u{00AD}'                     // soft hyphen
        | '\u{061C}'                   // Arabic letter mark
        | '\u{180E}'                   // Mongolian vowel separator
        | '\u{200B}'..='\u{200F}'      // zero-width space/joiners, LRM, RLM
        | '\u{202A}'..='\u{202E}'      // bidi embeddings and overrides
        | '\u{2060}'..='\u{206F}'      // word joiner, invisible operators, bidi isolates
        | '\u{FEFF}'                   // byte-order mark
        | '\u{FFF9}'..='\u{FFFB}'      // interlinear annotations
    )
}

pub fn product_name(s: &str) -> Result<(), String> {
    if s.trim().is_empty() || s.len() > NAME_MAX_BYTES || !printable(s) {
        return Err(format!("name: must be 1..={NAME_MAX_BYTES} bytes of printable text"));
    }
    Ok(())
}

pub fn buyer(s: &str) -> Result<(), String> {
    if s.trim().is_empty() || s.len() > BUYER_MAX_BYTES || !printable(s) || s.trim() != s {
        return Err(format!("buyer: must be 1..={BUYER_MAX_BYTES} bytes of printable text without surrounding spaces"));
    }
    Ok(())
}

/// A key as it will be stored: the caller has already trimmed it.
pub fn key(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > KEY_MAX_BYTES || !printable(s) {
        return Err(format!("must be 1..={KEY_MAX_BYTES} bytes of printable text"));
    }
    Ok(())
}

/// Idempotency keys, payment ids, nonces: short visible ASCII.
pub fn token(field: &str, s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > TOKEN_MAX_BYTES || !s.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!("{field}: must be 1..={TOKEN_MAX_BYTES} visible ASCII characters"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules() {
        assert!(product_id("p1").is_ok());
        assert!(product_id(&"a".repeat(64)).is_ok());
        assert!(product_id(&"a".repeat(65)).is_err());
        assert!(product_id("P1").is_err());
        assert!(product_id("p.1").is_err());
        assert!(buyer("alice@example.com").is_ok());
        assert!(buyer("买家一号").is_ok());
        assert!(buyer(" alice").is_err());
        assert!(buyer("a\u{0}b").is_err());
        assert!(key(&"k".repeat(256)).is_ok());
        assert!(key(&"k".repeat(257)).is_err());
        assert!(key("a\tb").is_err());
        assert!(product_name("ok \u{202E}gnp.exe").is_err(), "bidi override");
        assert!(product_name("a\u{2066}b").is_err(), "bidi isolate");
        assert!(buyer("a\u{200B}b").is_err(), "zero-width space");
        assert!(product_name("卡密 (月卡)").is_ok());
        assert!(token("nonce", "abc-123").is_ok());
        assert!(token("nonce", "a b").is_err());
    }
}
