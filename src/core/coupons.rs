//! Coupons: merchants' definitions, and the use saga of an order with a coupon
//! (hold → order → used or released, resolved by asking the order's stock shard;
//! see `domain::coupon`).

use super::*;
use crate::actors::coupons::{self as coupon_actor, coupon_shard_of, CouponHandle};
use crate::actors::ledger::{LedgerActor, LedgerBook, LedgerCall, LedgerHandle};
use crate::domain::coupon::{self, Coupon, CouponAudit, CouponHold, CouponSpec, CouponUse, Finish};

/// Stale coupon holds looked at per coupon shard in one resolving round.
const MAX_COUPON_HOLDS_PER_ROUND: usize = 512;
/// Most coupons one listing page shows.
pub const MAX_COUPONS_LISTED: usize = 500;

/// The idempotency key an order made with coupon hold `hold` is created under when
/// its request carried none.
fn hold_key(hold: &str) -> String {
    format!("coupon:{hold}")
}

impl Kami {
    /// Sends to a ledger shard (points or coupons) where it is served: here,
    /// admitted to its actor's line and answered within the request timeout, or
    /// (a cluster node's shard whose lease another node holds) on that node.
    pub(super) async fn call_ledger<B, M>(&self, handle: &LedgerHandle<B>, msg: M) -> Result<M::Answer, Error>
    where
        B: LedgerBook,
        M: LedgerCall,
        LedgerActor<B>: Handler<M>,
        <LedgerActor<B> as Actor>::Context: actix::dev::ToEnvelope<LedgerActor<B>, M>,
    {
        if !handle.place.is_here() {
            if let Some(cluster) = self.cluster.get() {
                return cluster.call_ledger_remote::<B, M>(handle.place.shard.shard, msg).await;
            }
        }
        let _ticket = admit(&handle.admission, Lane::Existing)?;
        self.ask_ledger(handle, msg).await
    }

    /// Sends to a ledger actor of this process within the request timeout, past
    /// its line.
    pub(super) async fn ask_ledger<B, M, R>(&self, handle: &LedgerHandle<B>, msg: M) -> Result<R, Error>
    where
        B: LedgerBook,
        M: Message<Result = ActorResult<R>> + Send + 'static,
        R: Send + 'static,
        LedgerActor<B>: Handler<M>,
        <LedgerActor<B> as Actor>::Context: actix::dev::ToEnvelope<LedgerActor<B>, M>,
    {
        let sent = tokio::time::timeout(self.limits.request_timeout, handle.addr.send(msg)).await;
        Ok(answer(sent, "the ledger actor stopped")?)
    }

    fn coupon_shard(&self, code: &str) -> &CouponHandle {
        &self.coupons[coupon_shard_of(code) as usize]
    }

    /// Defines a coupon (the same definition again is a repeat; other terms under
    /// the same code: `coupon_exists`). Durable when it returns; answers whether
    /// this call created it.
    pub async fn create_coupon(&self, spec: CouponSpec) -> Result<(Coupon, bool), Error> {
        coupon::check_spec(&spec).map_err(Error::Invalid)?;
        for (i, p) in spec.products.iter().enumerate() {
            validate::product_id(p).map_err(|e| Error::Invalid(format!("products[{i}]: {e}")))?;
        }
        self.call_ledger(self.coupon_shard(&spec.code), coupon_actor::Define(spec.clone())).await
    }

    /// Stops a coupon from being held again (holds in flight finish as they would).
    pub async fn disable_coupon(&self, code: &str) -> Result<Coupon, Error> {
        coupon::check_code(code).map_err(Error::Invalid)?;
        self.call_ledger(self.coupon_shard(code), coupon_actor::Disable(code.to_string())).await
    }

    pub async fn coupon(&self, code: &str) -> Result<Coupon, Error> {
        coupon::check_code(code).map_err(Error::Invalid)?;
        let found = self.call_ledger(self.coupon_shard(code), coupon_actor::Get(code.to_string())).await?;
        found.ok_or(Error::Domain(DomainError::CouponUnknown))
    }

    /// Up to `limit` coupons by code, after `after`, from every coupon shard.
    pub async fn coupons(&self, after: Option<&str>, limit: usize) -> Result<Vec<Coupon>, Error> {
        let limit = limit.min(MAX_COUPONS_LISTED);
        let mut all = Vec::new();
        for handle in &self.coupons {
            let page = coupon_actor::List { after: after.map(str::to_string), limit };
            all.extend(self.call_ledger(handle, page).await?);
        }
        all.sort_by(|a, b| a.spec.code.cmp(&b.spec.code));
        all.truncate(limit);
        Ok(all)
    }

    /// Saga step 1 for an order request: holds a use of `code` (or refuses, nothing
    /// held) and answers the terms the stock shard prices the order with.
    pub(super) async fn hold_coupon(
        &self,
        code: &str,
        req: &OrderRequest,
        idempotency_key: &str,
        hold: String,
    ) -> Result<CouponUse, Error> {
        coupon::check_code(code).map_err(|e| Error::Invalid(format!("coupon: {e}")))?;
        let deadline_ms = self.clock.now_ms() + self.limits.request_timeout.as_millis() as u64;
        let h = CouponHold {
            hold: hold.clone(),
            code: code.to_string(),
            buyer: req.buyer.clone(),
            product_id: req.product_id.clone(),
            idempotency_key: idempotency_key.to_string(),
            at_ms: 0, // the coupon actor stamps it with its own clock
        };
        let c = self.call_ledger(self.coupon_shard(code), coupon_actor::HoldUse(h)).await?;
        Ok(CouponUse {
            code: code.to_string(),
            hold,
            kind: c.spec.kind,
            value: c.spec.value,
            min_amount_cents: c.spec.min_amount_cents,
            deadline_ms,
        })
    }

    /// The idempotency key an order with a coupon is created under, and its hold id.
    pub(super) fn coupon_hold_ids(idempotency_key: Option<&str>) -> (String, String) {
        let hold = new_token();
        let key = idempotency_key.map_or_else(|| hold_key(&hold), str::to_string);
        (hold, key)
    }

    /// Saga step 3 when the caller knows the outcome. A failure leaves the hold to
    /// the resolver, which reaches the same outcome.
    pub(super) async fn finish_coupon(&self, code: &str, hold: &str, finish: Finish) {
        let msg = coupon_actor::FinishHold { hold: hold.to_string(), finish };
        if let Err(e) = self.call_ledger(self.coupon_shard(code), msg).await {
            tracing::warn!(hold, error = %e, "finishing a coupon hold deferred to the resolver");
        }
    }

    /// After an order request with a coupon: gives the hold back when no order
    /// holds it (refused for good, or a replay of an order made with another hold).
    pub(super) async fn after_coupon_order(&self, used: &CouponUse, result: &Result<OrderSnapshot, Error>) {
        let reason = match result {
            Ok(order)
                if order.pricing.as_ref().and_then(|p| p.coupon.as_ref()).is_some_and(|c| c.hold == used.hold) =>
            {
                return;
            }
            Ok(_) => "replayed".to_string(),
            Err(e @ (Error::Domain(_) | Error::Overloaded | Error::QueueFull(_) | Error::ProductNotFound)) => {
                e.code().to_string()
            }
            Err(_) => return, // outcome unknown: the resolver asks the shard
        };
        self.finish_coupon(&used.code, &used.hold, Finish::Released { reason }).await;
    }

    /// Finishes coupon holds older than their deadline: each hold's order is looked
    /// up in its stock shard by the hold's idempotency key; a delivered order spends
    /// the use, a closed one (or none: none can appear after the deadline) gives it
    /// back, an open one keeps it. Pages through each shard's holds round by round.
    pub async fn resolve_coupon_holds(&self) {
        let before_ms = self.clock.now_ms().saturating_sub(self.limits.request_timeout.as_millis() as u64 + 1000);
        for (i, handle) in self.coupons.iter().enumerate() {
            if !handle.place.is_here() {
                continue; // its node resolves it
            }
            let after = self.coupon_cursors.lock().unwrap_or_else(|e| e.into_inner())[i].take();
            let page = coupon_actor::HoldsBefore { before_ms, after, limit: MAX_COUPON_HOLDS_PER_ROUND };
            let Ok(_ticket) = admit(&handle.admission, Lane::Existing) else { continue };
            let Ok(holds) = self.ask_ledger(handle, page).await else { continue };
            if holds.len() == MAX_COUPON_HOLDS_PER_ROUND {
                let last = holds.last().map(|h| (h.at_ms, h.hold.clone()));
                self.coupon_cursors.lock().unwrap_or_else(|e| e.into_inner())[i] = last;
            }
            for hold in holds {
                if let Some(finish) = self.coupon_hold_outcome(&hold).await {
                    tracing::debug!(hold = %hold.hold, ?finish, "coupon hold resolved");
                    self.finish_coupon(&hold.code, &hold.hold, finish).await;
                }
            }
        }
    }

    /// How a stale hold ends (`None`: its order is still open, or the shard did not answer).
    async fn coupon_hold_outcome(&self, hold: &CouponHold) -> Option<Finish> {
        let Some(route) = self.registry.get(&hold.product_id) else {
            return Some(Finish::Released { reason: "product_not_found".into() });
        };
        let home = route.shard_index_for_buyer(&hold.buyer);
        let order = match self.shard_find_idempotent(&route.shards[home], hold.idempotency_key.clone()).await {
            Ok(Some(order)) => order,
            Ok(None) => return Some(Finish::Released { reason: "no_order".into() }),
            Err(_) => return None,
        };
        if order.pricing.as_ref().and_then(|p| p.coupon.as_ref()).is_none_or(|c| c.hold != hold.hold) {
            return Some(Finish::Released { reason: "replayed".into() });
        }
        use crate::domain::OrderStatus::*;
        match order.order.status {
            Delivered => Some(Finish::Used { order_id: order.order_id() }),
            Expired | Cancelled | RefundPending | Refunded => {
                Some(Finish::Released { reason: order.order.status.as_str().to_string() })
            }
            PendingPayment | Paid => None,
        }
    }

    /// Every coupon shard's audit.
    pub async fn audit_coupons(&self) -> Result<Vec<CouponAudit>, Error> {
        let mut out = Vec::with_capacity(self.coupons.len());
        for handle in &self.coupons {
            out.push(self.call_ledger(handle, coupon_actor::Audit).await?);
        }
        Ok(out)
    }
}
