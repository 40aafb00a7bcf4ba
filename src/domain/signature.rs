//! Payment notification signatures: `X-Signature: sha256=<hex HMAC-SHA256(raw body)>`.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

type HmacSha256 = Hmac<Sha256>;

const PREFIX: &str = "sha256=";

/// HMAC-SHA256 of `body` under `secret`.
pub fn hmac_sha256(secret: &[u8], body: &[u8]) -> [u8; 32] {
    mac(secret, body)
}

fn mac(secret: &[u8], body: &[u8]) -> [u8; 32] {
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC accepts keys of any length");
    mac.update(body);
    mac.finalize().into_bytes().into()
}

/// A buyer's read token: `hex(HMAC-SHA256(secret, buyer))`, what a storefront
/// passes as `X-Buyer-Token` to read that buyer's points.
pub fn buyer_token(secret: &[u8], buyer: &str) -> String {
    hex::encode(mac(secret, buyer.as_bytes()))
}

/// Whether `given` is `buyer`'s token, compared in constant time.
pub fn verify_buyer_token(secret: &[u8], buyer: &str, given: &str) -> bool {
    let expected = buyer_token(secret, buyer);
    given.len() == expected.len() && bool::from(given.as_bytes().ct_eq(expected.as_bytes()))
}

/// The header value a channel sends for `body`.
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    format!("{PREFIX}{}", hex::encode(mac(secret, body)))
}

/// Checks a header value against `body`, comparing the MACs in constant time.
pub fn verify(secret: &[u8], body: &[u8], header: &str) -> bool {
    let Some(hex_part) = header.trim().strip_prefix(PREFIX) else {
        return false;
    };
    let mut given = [0u8; 32];
    if hex::decode_to_slice(hex_part, &mut given).is_err() {
        return false;
    }
    mac(secret, body).ct_eq(&given).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_then_verify() {
        let body = br#"{"order_id":"p1.0.1"}"#;
        let sig = sign(b"s3cret", body);
        assert!(sig.starts_with("sha256="));
        assert!(verify(b"s3cret", body, &sig));
        assert!(!verify(b"other", body, &sig));
        assert!(!verify(b"s3cret", b"{}", &sig));
        assert!(!verify(b"s3cret", body, &sig.replace("sha256=", "sha1=")));
        assert!(!verify(b"s3cret", body, "sha256=zz"));
        assert!(!verify(b"s3cret", body, &sig[..sig.len() - 2]));
    }

    #[test]
    fn known_vector() {
        // RFC 4231 test case 2.
        let sig = sign(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(sig, "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
    }
}
