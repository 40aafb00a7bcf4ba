//! The error every public operation returns, with its stable code.

use crate::actors::call::CallError;
use crate::actors::supervisor::SupervisorError;
use crate::actors::ActorError;
use crate::domain::DomainError;
use crate::payments::notification::Refused;
use crate::storage::StorageError;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Domain(#[from] DomainError),
    #[error("{0}")]
    Invalid(String),
    #[error("product not found")]
    ProductNotFound,
    #[error("a product with this id exists")]
    ProductExists,
    /// The operation does not fit how this product's keys are sold (`domain::key_mode`).
    #[error("{0}")]
    KeyMode(String),
    #[error("signature does not verify")]
    BadSignature,
    #[error("timestamp is {skew_secs} s away from now; at most {max_secs} s allowed")]
    StaleRequest { skew_secs: u64, max_secs: u64 },
    #[error("this nonce was already used with a different payload")]
    Replayed,
    #[error("no payment channel named {0:?}")]
    UnknownChannel(String),
    /// The payment gateway did not make a pay link (down, slow, or refused).
    #[error("payment channel {channel:?} failed: {reason}")]
    ChannelFailed { channel: String, reason: String },
    #[error("too many requests in flight; retry shortly")]
    Overloaded,
    /// The line in front of a stock actor is full (see `actors::admission`).
    #[error("this product's queue is full; retry shortly")]
    QueueFull(crate::actors::admission::QueueFull),
    #[error("the request took too long; its outcome may be unknown, retry with the same idempotency key")]
    Timeout,
    #[error("no such actor: {0}")]
    ActorNotFound(String),
    #[error("temporarily unavailable: {0}")]
    Unavailable(String),
    #[error("no webhook endpoint named {0:?}")]
    WebhookNotFound(String),
    /// An endpoint of this name exists (added earlier, or in the configuration).
    #[error("a webhook endpoint named {0:?} exists")]
    WebhookExists(String),
    #[error("webhook endpoint {0:?} is in the configuration file; change it there")]
    WebhookFromConfig(String),
    #[error("at most {0} webhook endpoints may be added")]
    WebhooksFull(usize),
    #[error("a backup is being written; one at a time")]
    BackupRunning,
    /// A feature this server's configuration does not offer (e.g. one that reads
    /// local journals while they are kept in a replicated stream).
    #[error("not offered by this server: {0}")]
    Unsupported(String),
    /// In a cluster: the shard is served by another node (the request is forwarded
    /// there; this is answered only when it cannot be).
    #[error("shard {0} is served by another node of the cluster; try again")]
    Elsewhere(crate::domain::ShardId),
    /// In a cluster: no node serves the shard now (its owner died and the lease has
    /// not yet passed to another node).
    #[error("no node of the cluster serves shard {0} now (it is moving); try again")]
    NoOwner(crate::domain::ShardId),
}

impl Error {
    pub fn code(&self) -> &'static str {
        match self {
            Error::Domain(d) => d.code(),
            Error::Invalid(_) => "invalid_request",
            Error::ProductNotFound => "product_not_found",
            Error::ProductExists => "product_exists",
            Error::KeyMode(_) => "key_mode_mismatch",
            Error::BadSignature => "bad_signature",
            Error::StaleRequest { .. } => "stale_request",
            Error::Replayed => "replayed",
            Error::UnknownChannel(_) => "unknown_channel",
            Error::ChannelFailed { .. } => "channel_failed",
            Error::Overloaded | Error::QueueFull(_) => "overloaded",
            Error::Timeout => "timeout",
            Error::ActorNotFound(_) => "actor_not_found",
            Error::Unavailable(_) => "unavailable",
            Error::WebhookNotFound(_) => "webhook_not_found",
            Error::WebhookExists(_) => "webhook_exists",
            Error::WebhookFromConfig(_) => "webhook_from_config",
            Error::WebhooksFull(_) => "webhooks_full",
            Error::BackupRunning => "backup_running",
            Error::Unsupported(_) => "unsupported",
            Error::Elsewhere(_) => "shard_elsewhere",
            Error::NoOwner(_) => "shard_moving",
        }
    }
}

impl From<StorageError> for Error {
    fn from(e: StorageError) -> Self {
        match e {
            StorageError::Busy => Error::Overloaded,
            other => Error::Unavailable(other.to_string()),
        }
    }
}

impl From<ActorError> for Error {
    fn from(e: ActorError) -> Self {
        match e {
            ActorError::Domain(d) => Error::Domain(d),
            ActorError::Storage(s) => s.into(),
            ActorError::Unavailable => {
                Error::Unavailable("the actor holding this state is restarting; try again".into())
            }
        }
    }
}

impl From<CallError> for Error {
    fn from(e: CallError) -> Self {
        match e {
            CallError::Actor(e) => e.into(),
            CallError::QueueFull(full) => Error::QueueFull(full),
            CallError::Timeout => Error::Timeout,
            CallError::Stopped(which) => Error::Unavailable(which.into()),
            CallError::Elsewhere(shard) => Error::Elsewhere(shard),
        }
    }
}

impl From<Refused> for Error {
    fn from(e: Refused) -> Self {
        match e {
            Refused::BadSignature => Error::BadSignature,
            Refused::Invalid(m) => Error::Invalid(m),
            Refused::Stale { skew_secs, max_secs } => Error::StaleRequest { skew_secs, max_secs },
        }
    }
}

impl From<SupervisorError> for Error {
    fn from(e: SupervisorError) -> Self {
        match e {
            SupervisorError::Exists => Error::ProductExists,
            SupervisorError::Storage(s) => s.into(),
        }
    }
}
