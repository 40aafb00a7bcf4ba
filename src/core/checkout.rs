//! Pay links and the notifications of real gateways (Alipay, WeChat Pay, Stripe):
//! kami asks the gateway for a pay link when the buyer is ready to pay, never when
//! the order is created, so the flash-sale path makes no call to a gateway.

use super::*;
pub use crate::payments::adapter::{JsapiParams, PayLink, Reply as GatewayReply};
use crate::payments::adapter::{PayOrder, Verified};

/// Where a buyer pays for one order.
#[derive(Debug, Clone)]
pub struct PayLinkFor {
    pub channel: String,
    pub kind: crate::config::ChannelKind,
    pub link: PayLink,
}

impl Kami {
    /// A pay link for a pending order, on `channel` or on the channel routing picks
    /// (breakers and priorities, as for new orders). The order token is checked first.
    /// `openid`: pay inside WeChat (JSAPI) as this user; only for a WeChat Pay channel.
    pub async fn pay_link(
        &self,
        order_id: &str,
        token: &str,
        channel: Option<&str>,
        openid: Option<&str>,
    ) -> Result<PayLinkFor, Error> {
        if let Some(openid) = openid {
            validate::token("openid", openid).map_err(Error::Invalid)?;
        }
        let order = self.get_order(order_id, Some(token)).await?;
        if order.order.status != crate::domain::OrderStatus::PendingPayment {
            return Err(DomainError::InvalidState { status: order.order.status }.into());
        }
        let channel = match channel {
            Some(name) => self.channels.get(name).ok_or_else(|| Error::UnknownChannel(name.to_string()))?,
            None => self.channels.pick(),
        };
        let amount = order.order.amount_cents;
        if openid.is_some() && channel.kind != crate::config::ChannelKind::Wechatpay {
            return Err(Error::Invalid(format!(
                "openid: only for a wechatpay channel; {} is {}",
                channel.name,
                channel.kind.as_str()
            )));
        }
        let Some(adapter) = &channel.adapter else {
            // The channel protocol's kinds: the signed checkout URL, made locally.
            let url = self.pay_url(channel, order_id, amount).ok_or_else(|| Error::ChannelFailed {
                channel: channel.name.clone(),
                reason: "the channel has no endpoint (notifications only)".into(),
            })?;
            return Ok(PayLinkFor { channel: channel.name.clone(), kind: channel.kind, link: PayLink::Url(url) });
        };
        let failed = |reason: String| Error::ChannelFailed { channel: channel.name.clone(), reason };
        let _permit = tokio::time::timeout(self.limits.request_timeout, self.pay_calls.acquire())
            .await
            .map_err(|_| Error::Overloaded)?
            .map_err(|_| Error::Overloaded)?;
        let subject = order.product_id.clone();
        let request = PayOrder {
            order_id,
            amount_cents: amount,
            subject: &subject,
            openid,
            expires_at_ms: order.order.expires_at_ms,
        };
        let link = adapter.pay(&self.http, &request, channel.timeout).await.map_err(|e| failed(e.to_string()))?;
        Ok(PayLinkFor { channel: channel.name.clone(), kind: channel.kind, link })
    }

    /// Verifies a real gateway's notification and applies it. `Ok` means the outcome
    /// is durable (or there was nothing to apply: a status other than paid).
    pub async fn notify_gateway(
        &self,
        channel: &str,
        headers: &axum::http::HeaderMap,
        body: &[u8],
    ) -> Result<Option<PaymentOutcome>, Error> {
        let channel = self.channels.get(channel).ok_or_else(|| Error::UnknownChannel(channel.to_string()))?;
        let adapter = channel.adapter.as_ref().ok_or_else(|| Error::UnknownChannel(channel.name.clone()))?;
        let now_ms = self.clock.now_ms();
        let verified = adapter.verify(headers, body, now_ms, self.limits.max_skew_secs).map_err(|refused| {
            if refused == crate::payments::notification::Refused::BadSignature {
                crate::telemetry::count_rejection("bad_signature");
            }
            Error::from(refused)
        })?;
        let Verified { order_id, payment_id, amount_cents, paid, event } = verified;
        if !paid {
            tracing::debug!(channel = %channel.name, %order_id, %event, "gateway notification acknowledged, nothing to apply");
            return Ok(None);
        }
        crate::telemetry::record_order(&order_id);
        let (id, route) = self.locate(&order_id)?;
        let payment = Payment {
            order_seq: id.seq,
            payment_id,
            channel: channel.name.clone(),
            amount_cents,
            status: "paid".into(),
        };
        let outcome =
            apply_payment(&route.shards[id.shard.shard as usize], payment, self.limits.request_timeout).await?;
        if let PaymentOutcome::AmountMismatch { expected_cents } = outcome {
            crate::telemetry::count_amount_mismatch();
            return Err(DomainError::AmountMismatch { expected: expected_cents, got: amount_cents }.into());
        }
        Ok(Some(outcome))
    }

    /// Whether `name` is a channel of a real gateway's kind (its notifications are
    /// that gateway's own, answered in its shape).
    pub fn is_gateway_channel(&self, name: &str) -> bool {
        self.channels.get(name).is_some_and(|c| c.adapter.is_some())
    }

    /// The reply that tells a gateway channel's gateway its notification is handled,
    /// or that it is refused (`status`, kami's error `code`, `message`).
    pub fn gateway_reply(&self, name: &str, refused: Option<(u16, &str, &str)>) -> Option<GatewayReply> {
        let adapter = self.channels.get(name)?.adapter.as_ref()?;
        Some(match refused {
            None => adapter.ack(),
            Some((status, code, message)) => adapter.refusal(status, code, message),
        })
    }
}
