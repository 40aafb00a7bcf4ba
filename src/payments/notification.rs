//! A payment channel's notification (docs/payment-protocol.md), checked: signed
//! with the channel's secret (or the one it replaced, in its grace period), its
//! fields well formed, its timestamp close to now. Pure: no I/O, the time is given.

use serde::Deserialize;

use super::Channel;
use crate::domain::validate;

/// A payment notification body. Unknown fields are ignored (gateways add fields).
#[derive(Debug, Clone, Deserialize)]
pub struct Notification {
    pub order_id: String,
    pub payment_id: String,
    pub amount_cents: u64,
    pub status: String,
    pub timestamp: i64,
    pub nonce: String,
}

/// Why a notification is not believed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("signature does not verify")]
    BadSignature,
    #[error("{0}")]
    Invalid(String),
    #[error("timestamp is {skew_secs} s away from now; at most {max_secs} s allowed")]
    Stale { skew_secs: u64, max_secs: u64 },
}

/// The notification `body` says, if `signature` signs it for `channel` and it is
/// well formed and at most `max_skew_secs` away from `now_ms`.
pub fn verify(
    channel: &Channel,
    body: &[u8],
    signature: Option<&str>,
    now_ms: u64,
    max_skew_secs: u64,
) -> Result<Notification, Refused> {
    let signature = signature.ok_or(Refused::BadSignature)?;
    if !channel.verifies(body, signature, now_ms) {
        return Err(Refused::BadSignature);
    }
    let n: Notification = serde_json::from_slice(body).map_err(|e| Refused::Invalid(format!("notification: {e}")))?;
    validate::token("payment_id", &n.payment_id).map_err(Refused::Invalid)?;
    validate::token("nonce", &n.nonce).map_err(Refused::Invalid)?;
    if n.status.is_empty() || n.status.len() > 32 {
        return Err(Refused::Invalid("status: must be 1..=32 bytes".into()));
    }
    let skew_secs = ((now_ms / 1000) as i64).abs_diff(n.timestamp);
    if skew_secs > max_skew_secs {
        return Err(Refused::Stale { skew_secs, max_secs: max_skew_secs });
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::signature::sign;

    fn channel() -> Channel {
        Channel {
            name: "c".into(),
            kind: crate::config::ChannelKind::Sandbox,
            secret: b"secret".to_vec(),
            retiring: None,
            endpoint: None,
            priority: 0,
            weight: 1,
            timeout: std::time::Duration::from_secs(1),
            queries_per_sec: 1,
            adapter: None,
        }
    }

    #[test]
    fn only_a_signed_well_formed_recent_notification_is_believed() {
        let body = br#"{"order_id":"p.0.1","payment_id":"pay-1","amount_cents":990,"status":"paid","timestamp":1000,"nonce":"n1","extra":1}"#;
        let now_ms = 1_000_000;
        let n = verify(&channel(), body, Some(&sign(b"secret", body)), now_ms, 300).unwrap();
        assert_eq!((n.order_id.as_str(), n.amount_cents, n.status.as_str()), ("p.0.1", 990, "paid"));
        assert_eq!(verify(&channel(), body, None, now_ms, 300).unwrap_err(), Refused::BadSignature);
        assert_eq!(
            verify(&channel(), body, Some(&sign(b"other", body)), now_ms, 300).unwrap_err(),
            Refused::BadSignature
        );
        let late = 1_000_000 + 301_000;
        assert_eq!(
            verify(&channel(), body, Some(&sign(b"secret", body)), late, 300).unwrap_err(),
            Refused::Stale { skew_secs: 301, max_secs: 300 }
        );
        let bad = br#"{"order_id":"p.0.1","payment_id":"pay 1","amount_cents":990,"status":"paid","timestamp":1000,"nonce":"n1"}"#;
        assert!(matches!(verify(&channel(), bad, Some(&sign(b"secret", bad)), now_ms, 300), Err(Refused::Invalid(_))));
    }
}
