//! Payment notifications: signature, timestamp and nonce checks, then the one path a
//! payment takes.

use super::*;
use crate::payments::notification;

impl Kami {
    /// Verifies and applies a payment notification. `Ok` means the outcome is durable.
    pub async fn notify(&self, channel: &str, body: &[u8], signature: Option<&str>) -> Result<PaymentOutcome, Error> {
        let known = self.channels.get(channel).ok_or_else(|| Error::UnknownChannel(channel.to_string()))?;
        let now_ms = self.clock.now_ms();
        let n = notification::verify(known, body, signature, now_ms, self.limits.max_skew_secs).map_err(|refused| {
            if refused == notification::Refused::BadSignature {
                crate::telemetry::count_rejection("bad_signature");
            }
            Error::from(refused)
        })?;
        crate::telemetry::record_order(&n.order_id);
        self.check_nonce(&n.nonce, body, now_ms)?;
        let (id, route) = self.locate(&n.order_id)?;
        let payment = Payment {
            order_seq: id.seq,
            payment_id: n.payment_id,
            channel: channel.to_string(),
            amount_cents: n.amount_cents,
            status: n.status.into(),
        };
        let outcome =
            apply_payment(&route.shards[id.shard.shard as usize], payment, self.limits.request_timeout).await?;
        if let PaymentOutcome::AmountMismatch { expected_cents } = outcome {
            crate::telemetry::count_amount_mismatch();
            return Err(DomainError::AmountMismatch { expected: expected_cents, got: n.amount_cents }.into());
        }
        Ok(outcome)
    }

    /// A nonce may come again only with the very same body (a gateway's resend).
    fn check_nonce(&self, nonce: &str, body: &[u8], now_ms: u64) -> Result<(), Error> {
        let digest: [u8; 16] = Sha256::digest(body)[..16].try_into().expect("16 bytes");
        self.nonces.claim(nonce, digest, now_ms).map_err(|refusal| match refusal {
            Refusal::Mismatch => Error::Replayed,
            Refusal::Full => Error::Overloaded,
        })
    }

    pub fn sign_for_channel(&self, channel: &str, body: &[u8]) -> Option<String> {
        self.channels.get(channel).map(|c| crate::domain::signature::sign(&c.secret, body))
    }

    /// Runs the payment sweep now (queries, refunds, expiry) and reports what it
    /// found and fixed. Bounded by the gateways' timeouts, not by `request_timeout`.
    pub async fn reconcile(&self) -> Result<ReconcileReport, Error> {
        self.payments.send(Reconcile).await.map_err(|_| Error::Unavailable("the payment supervisor stopped".into()))
    }

    pub async fn payment_channels(&self) -> Result<Vec<ChannelStatus>, Error> {
        match tokio::time::timeout(self.limits.request_timeout, self.payments.send(ListChannels)).await {
            Ok(Ok(views)) => Ok(views),
            Ok(Err(_)) => Err(Error::Unavailable("the payment supervisor stopped".into())),
            Err(_) => Err(Error::Timeout),
        }
    }
}
