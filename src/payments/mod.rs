//! Payment channels: their configuration, their health as seen by new orders, and
//! the client that calls their gateways.
//!
//! * [`Channels`] — every configured channel, with the breaker level the payment
//!   supervisor last published for it (atomics: order creation reads them without
//!   a lock or a message) and the routing choice for a new order.
//! * [`client::Gateway`] — signed JSON calls to a gateway: query, refund, health
//!   (docs/payment-protocol.md).
//!
//! The actor that drives queries, refunds, health checks and breakers is
//! `actors::payments::PaymentSupervisor`; it is never on the order path.

pub mod adapter;
pub mod alipay;
pub mod client;
pub mod keys;
pub mod notification;
pub mod stripe;
pub mod wechatpay;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::config::{ChannelKind, Settings};
use crate::domain::breaker::BreakerState;
use crate::domain::routing::{self, Candidate};

#[derive(Debug, Clone)]
pub struct Channel {
    pub name: String,
    pub kind: ChannelKind,
    pub secret: Vec<u8>,
    /// The secret this one replaced, still accepted on what the gateway signs
    /// until its grace period ends (`kami secrets rotate`).
    pub retiring: Option<RetiringSecret>,
    /// Base URL without a trailing `/`; `None` = notifications only.
    pub endpoint: Option<String>,
    pub priority: u32,
    pub weight: u32,
    pub timeout: Duration,
    pub queries_per_sec: u32,
    /// For kinds alipay, wechatpay and stripe: the gateway's own protocol, keys loaded.
    pub adapter: Option<Arc<adapter::Adapter>>,
}

/// A channel secret that was rotated out: signatures made with it are still
/// accepted until `until_ms` (Unix milliseconds), so a gateway that has not been
/// given the new secret yet keeps working for the grace period.
#[derive(Debug, Clone)]
pub struct RetiringSecret {
    pub secret: Vec<u8>,
    pub until_ms: u64,
}

/// The signature a pay URL carries: HMAC of `"{order_id}:{amount_cents}"` with the
/// channel's secret (the gateway checks it before it takes the money).
pub fn checkout_signature(secret: &[u8], order_id: &str, amount_cents: u64) -> String {
    crate::domain::signature::sign(secret, format!("{order_id}:{amount_cents}").as_bytes())
}

impl Channel {
    /// Whether `signature` signs `body` with the channel's secret, or with the
    /// secret it replaced while that is still in its grace period at `now_ms`.
    pub fn verifies(&self, body: &[u8], signature: &str, now_ms: u64) -> bool {
        crate::domain::signature::verify(&self.secret, body, signature)
            || self
                .retiring
                .as_ref()
                .is_some_and(|r| now_ms < r.until_ms && crate::domain::signature::verify(&r.secret, body, signature))
    }
}

pub struct Channels {
    /// The default channel first, then the others by name.
    list: Vec<Channel>,
    /// Breaker level per channel (0 closed, 1 half-open, 2 open).
    levels: Vec<AtomicU8>,
}

impl Channels {
    /// `secrets`: channel name → secret in force (configured or generated);
    /// `retiring`: channel name → the secret it replaced, in its grace period.
    pub fn from_settings(
        settings: &Settings,
        secrets: &BTreeMap<String, String>,
        retiring: &BTreeMap<String, RetiringSecret>,
    ) -> Result<Channels, String> {
        let default = &settings.payments.default_channel;
        let mut list: Vec<Channel> = Vec::new();
        for (name, c) in &settings.payments.channels {
            let adapter = adapter::Adapter::load(name, c)?.map(Arc::new);
            let endpoint = if adapter.is_some() { "" } else { c.endpoint.as_str() };
            list.push(Channel {
                name: name.clone(),
                kind: c.kind,
                secret: secrets.get(name).expect("a secret per channel").clone().into_bytes(),
                retiring: retiring.get(name).cloned(),
                endpoint: (!endpoint.is_empty()).then(|| endpoint.trim_end_matches('/').to_string()),
                priority: c.priority,
                weight: c.weight,
                timeout: Duration::from_millis(c.timeout_ms),
                queries_per_sec: c.queries_per_sec,
                adapter,
            });
        }
        list.sort_by_key(|c| (&c.name != default, c.name.clone()));
        assert!(list.first().is_some_and(|c| &c.name == default), "config validation: default channel exists");
        let levels = list.iter().map(|_| AtomicU8::new(0)).collect();
        Ok(Channels { list, levels })
    }

    pub fn all(&self) -> &[Channel] {
        &self.list
    }

    pub fn get(&self, name: &str) -> Option<&Channel> {
        self.list.iter().find(|c| c.name == name)
    }

    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.list.iter().position(|c| c.name == name)
    }

    /// Publishes a channel's breaker state for routing (payment supervisor only).
    pub fn publish(&self, index: usize, state: BreakerState) {
        self.levels[index].store(state.level(), Ordering::Relaxed);
    }

    /// A channel's breaker level as last published: 0 closed, 1 half-open, 2 open.
    pub fn level(&self, index: usize) -> u8 {
        self.levels[index].load(Ordering::Relaxed)
    }

    /// The channel a new order goes to (see `domain::routing`).
    pub fn pick(&self) -> &Channel {
        let candidates = self.list.iter().zip(&self.levels).map(|(c, level)| Candidate {
            level: level.load(Ordering::Relaxed),
            priority: c.priority,
            weight: c.weight,
        });
        let index = routing::choose(candidates, rand::random()).expect("at least one channel");
        &self.list[index]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::signature::sign;

    #[test]
    fn a_replaced_secret_verifies_only_until_its_grace_period_ends() {
        let channel = Channel {
            name: "c".into(),
            kind: ChannelKind::Sandbox,
            secret: b"new".to_vec(),
            retiring: Some(RetiringSecret { secret: b"old".to_vec(), until_ms: 1_000 }),
            endpoint: None,
            priority: 0,
            weight: 1,
            timeout: Duration::from_secs(1),
            queries_per_sec: 1,
            adapter: None,
        };
        let body = b"{}";
        assert!(channel.verifies(body, &sign(b"new", body), 5_000));
        assert!(channel.verifies(body, &sign(b"old", body), 999));
        assert!(!channel.verifies(body, &sign(b"old", body), 1_000), "the grace period has ended");
        assert!(!channel.verifies(body, &sign(b"other", body), 0));
    }
}
