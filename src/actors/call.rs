//! Calling a stock or points actor from outside it: the call is admitted to the
//! actor's line (else [`CallError::QueueFull`]) and answered within a timeout (else
//! [`CallError::Timeout`]). The core and the payment supervisor call actors only
//! through here, so both see the same bounds and the same failures.

use std::time::Duration;

use actix::prelude::*;

use super::admission::{Admission, Lane, QueueFull, Ticket};
use super::registry::ShardHandle;
use super::shard::{self, ActorError, ActorResult, ShardActor};
use crate::domain::shard::Payment;
use crate::domain::PaymentOutcome;

/// Why a call to an actor brought no answer from its domain, or what the domain refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    #[error(transparent)]
    Actor(#[from] ActorError),
    #[error("the line in front of the actor is full")]
    QueueFull(QueueFull),
    #[error("no answer within the timeout")]
    Timeout,
    #[error("{0}")]
    Stopped(&'static str),
    /// A cluster node's call to a shard another node serves (see [`super::place`]).
    #[error("shard {0} is served by another node")]
    Elsewhere(crate::domain::ShardId),
}

/// A place in the actor's line for `lane`, counted as a `queue_full` refusal when there is none.
pub fn admit(admission: &Admission, lane: Lane) -> Result<Ticket, CallError> {
    admission.admit(lane).map_err(|full| {
        crate::telemetry::count_rejection("queue_full");
        CallError::QueueFull(full)
    })
}

/// An actor's answer within a timeout; `stopped` says which actor when its mailbox closed.
pub fn answer<R>(
    sent: Result<Result<ActorResult<R>, MailboxError>, tokio::time::error::Elapsed>,
    stopped: &'static str,
) -> Result<R, CallError> {
    match sent {
        Err(_) | Ok(Err(MailboxError::Timeout)) => Err(CallError::Timeout),
        Ok(Err(MailboxError::Closed)) => Err(CallError::Stopped(stopped)),
        Ok(Ok(result)) => Ok(result?),
    }
}

/// Sends `msg` to a stock actor in `lane`, answered within `timeout`.
pub async fn call_shard<M, R>(lane: Lane, shard: &ShardHandle, msg: M, timeout: Duration) -> Result<R, CallError>
where
    M: Message<Result = ActorResult<R>> + Send + 'static,
    R: Send + 'static,
    ShardActor: Handler<M>,
{
    if !shard.place.is_here() {
        return Err(CallError::Elsewhere(shard.place.shard.clone()));
    }
    let _ticket = admit(&shard.admission, lane)?;
    answer(tokio::time::timeout(timeout, shard.addr.send(msg)).await, "the stock actor stopped")
}

/// Applies a payment a channel reported, by notification or in answer to a query:
/// both take this one path, so the same `payment_id` is applied once however it
/// arrives. `Ok` means the outcome is durable. The time from hearing of the payment
/// to its durable delivery is `kami_paid_to_delivered_seconds`.
pub async fn apply_payment(
    shard: &ShardHandle,
    payment: Payment,
    timeout: Duration,
) -> Result<PaymentOutcome, CallError> {
    let heard = std::time::Instant::now();
    let outcome = call_shard(Lane::Existing, shard, shard::PayOrder(payment), timeout).await;
    if let Ok(PaymentOutcome::Delivered) = &outcome {
        let elapsed = heard.elapsed();
        metrics::histogram!("kami_paid_to_delivered_seconds").record(elapsed.as_secs_f64());
        crate::telemetry::history::PAID_TO_DELIVERED.record(elapsed);
    }
    outcome
}
