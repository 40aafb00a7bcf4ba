//! Points: merchants' adjustments and ledgers, and the redemption saga (hold → order →
//! settle or release, resolved after crashes).

use super::*;

impl Kami {
    async fn call_points<M>(&self, buyer: &str, msg: M) -> Result<M::Answer, Error>
    where
        M: crate::actors::ledger::LedgerCall,
        PointsActor: Handler<M>,
    {
        self.call_ledger(&self.points[points_shard_of(buyer) as usize], msg).await
    }

    /// A merchant's credit (`delta > 0`) or debit, idempotent by `request_id`.
    pub async fn adjust_points(&self, buyer: &str, request_id: &str, delta: i64, note: &str) -> Result<Balance, Error> {
        validate::buyer(buyer).map_err(Error::Invalid)?;
        validate::token("request_id", request_id).map_err(Error::Invalid)?;
        if delta == 0 {
            return Err(Error::Invalid("delta: must not be 0".into()));
        }
        if note.len() > MAX_NOTE_BYTES {
            return Err(Error::Invalid(format!("note: at most {MAX_NOTE_BYTES} bytes")));
        }
        let msg = points_actor::Adjust {
            request_id: request_id.to_string(),
            buyer: buyer.to_string(),
            delta,
            note: note.to_string(),
        };
        self.call_points(buyer, msg).await
    }

    /// A buyer's balance and the last `limit` lines of their ledger.
    pub async fn points_statement(&self, buyer: &str, limit: usize) -> Result<(Balance, Vec<Entry>), Error> {
        validate::buyer(buyer).map_err(Error::Invalid)?;
        self.call_points(buyer, points_actor::Statement { buyer: buyer.to_string(), limit }).await
    }

    /// Requests in line at the points actors, all shards together.
    pub fn points_queue_depth(&self) -> usize {
        self.points.iter().map(|h| h.admission.depth()).sum()
    }

    pub fn points_price(&self, product: &str) -> Option<u64> {
        self.points_prices.get(product).map(|p| *p)
    }

    /// Makes a product redeemable for `points` per key (`None`: no longer). Durable
    /// when it returns.
    pub async fn set_points_price(&self, product: &str, points: Option<u64>) -> Result<(), Error> {
        self.listed(product)?;
        if points == Some(0) {
            return Err(Error::Invalid("points_price: must be at least 1".into()));
        }
        self.storage.set_points_price(product, points)?;
        self.storage.ticket()?.wait().await?;
        match points {
            Some(p) => self.points_prices.insert(product.to_string(), p),
            None => self.points_prices.remove(product).map(|(_, p)| p),
        };
        self.mirror(product).await?;
        Ok(())
    }

    /// Deducts points and delivers keys as one outcome (the saga of
    /// `domain::points`): on 201 the order is delivered and the points are spent
    /// (or held, settled at the latest by the next resolver round); on a refusal
    /// neither happened. The same `Idempotency-Key` replays the same redemption.
    pub async fn redeem(&self, req: RedeemRequest, idempotency_key: &str) -> Result<Redeemed, Error> {
        if req.quantity == 0 || req.quantity > self.limits.max_quantity as u64 {
            return Err(Error::Invalid(format!("quantity: must be 1..={}", self.limits.max_quantity)));
        }
        validate::buyer(&req.buyer).map_err(Error::Invalid)?;
        validate::token("Idempotency-Key", idempotency_key).map_err(Error::Invalid)?;
        let route = self.listed(&req.product_id)?;
        // Before anything is held: a cluster node sends the redemption on to the
        // node serving the buyer's stock shard when that is not this one.
        let home = route.shard_index_for_buyer(&req.buyer);
        if !route.shards[home].place.is_here() {
            return Err(Error::Elsewhere(route.shards[home].place.shard.clone()));
        }
        let price = self.points_price(&req.product_id).ok_or(Error::Domain(DomainError::NotRedeemable))?;
        let points = price.checked_mul(req.quantity).ok_or_else(|| Error::Invalid("points: too many".into()))?;
        let redemption =
            hex::encode(digest(&[req.buyer.as_bytes(), req.product_id.as_bytes(), idempotency_key.as_bytes()]));
        let hold = Hold {
            redemption,
            buyer: req.buyer.clone(),
            points,
            product_id: req.product_id.clone(),
            quantity: req.quantity as u32,
            at_ms: 0, // the points actor stamps the hold with its own clock
        };
        let state = self.call_points(&req.buyer, points_actor::HoldPoints(hold.clone())).await?;
        let (order, replayed, settled_balance) = match state {
            RedemptionState::Settled { order_id, .. } => (self.get_order(&order_id, None).await?, true, None),
            RedemptionState::Held(held) => {
                if (held.points, held.quantity) != (points, req.quantity as u32) {
                    return Err(Error::Domain(DomainError::IdempotencyKeyReused));
                }
                let (order, balance) = self.finish_redemption(&route, &held).await?;
                let replayed = order.replayed;
                (order, replayed, balance)
            }
        };
        // The settle step answers the balance after it; a replay (or a settle left
        // to the resolver) reads it.
        let balance = match settled_balance {
            Some(b) => b,
            None => self.points_statement(&req.buyer, 0).await?.0,
        };
        Ok(Redeemed { order: OrderSnapshot { replayed, ..order }, points_spent: points, balance })
    }

    /// Steps 2 and 3 of a held redemption: the stock shard delivers (or refuses),
    /// then the hold is settled (or released). An answer that leaves step 2's
    /// outcome unknown (timeout, actor restarting) leaves the hold for the resolver.
    /// Returns the order and, when this call settled the hold, the buyer's balance after.
    async fn finish_redemption(
        &self,
        route: &crate::actors::ProductRoute,
        hold: &Hold,
    ) -> Result<(OrderSnapshot, Option<Balance>), Error> {
        let home = route.shard_index_for_buyer(&hold.buyer);
        let redemption = shard::Redeem(crate::domain::shard::Redemption {
            redemption: hold.redemption.clone(),
            buyer: hold.buyer.clone(),
            quantity: hold.quantity,
            query_token: new_token(),
        });
        let msg = || shard::Redeem(redemption.0.clone());
        let delivered = if !route.shards[home].place.is_here() && self.cluster.get().is_some() {
            // A cluster node's resolver, for a shard another node serves: there,
            // as it is (borrowing keys is for the request itself).
            self.shard_redeem(&route.shards[home], redemption.0.clone()).await
        } else {
            match self.call_in(Lane::NewOrder, &route.shards[home], msg()).await {
                Err(Error::Domain(DomainError::SoldOut { .. })) if route.shards.len() > 1 => {
                    self.order_with_borrowed_keys(route, home, hold.quantity, msg).await
                }
                other => other,
            }
        };
        match delivered {
            Ok(order) => {
                let settle = points_actor::SettleRedemption {
                    redemption: hold.redemption.clone(),
                    buyer: hold.buyer.clone(),
                    order_id: order.order_id(),
                };
                // The order is durable and the points are held for it: a failed settle
                // is retried by the resolver, which can only settle it (step 2 repeats).
                match self.call_points(&hold.buyer, settle).await {
                    Ok(balance) => Ok((order, Some(balance))),
                    Err(e) => {
                        tracing::warn!(redemption = %hold.redemption, error = %e, "settle deferred to the resolver");
                        Ok((order, None))
                    }
                }
            }
            // Refused for good, or never sent: the points come back.
            Err(e @ (Error::Domain(_) | Error::Overloaded | Error::QueueFull(_) | Error::ProductNotFound)) => {
                let reason = e.code().to_string();
                let release = points_actor::Release { redemption: hold.redemption.clone(), reason };
                if let Err(release_failed) = self.call_points(&hold.buyer, release).await {
                    tracing::warn!(redemption = %hold.redemption, error = %release_failed, "release deferred to the resolver");
                }
                Err(e)
            }
            Err(e) => Err(e),
        }
    }

    /// Finishes redemptions a crash or a timeout left held: each is sent to its
    /// stock shard again (idempotent) and settled or released. Holds younger than
    /// the request timeout may still be in their own request and are left alone.
    pub async fn resolve_holds(&self) {
        let before_ms = self.clock.now_ms().saturating_sub(self.limits.request_timeout.as_millis() as u64 + 1000);
        for handle in &self.points {
            if !handle.place.is_here() {
                continue; // its node resolves it
            }
            let sent = handle.addr.send(points_actor::StaleHolds { before_ms, limit: MAX_HOLDS_PER_ROUND });
            let Ok(Ok(Ok(holds))) = tokio::time::timeout(self.limits.request_timeout, sent).await else { continue };
            for hold in holds {
                let outcome = match self.registry.get(&hold.product_id) {
                    Some(route) => self.finish_redemption(&route, &hold).await.map(|_| ()),
                    None => Err(Error::ProductNotFound),
                };
                tracing::info!(redemption = %hold.redemption, ?outcome, "held redemption resolved");
            }
        }
    }

    /// Every points shard's audit, and the cross-check against the stock shards:
    /// keys delivered by redemptions == keys of settled redemptions, give or take
    /// the redemptions in flight.
    pub async fn audit_points(&self) -> Result<Vec<PointsAudit>, Error> {
        let mut out = Vec::with_capacity(self.points.len());
        for handle in &self.points {
            out.push(self.call_ledger(handle, points_actor::AuditPoints).await?);
        }
        Ok(out)
    }
}
