//! Buyers' orders: creation (idempotency pins, borrowing keys from sibling shards when
//! a shard is dry), reads and cancels.

use super::*;

impl Kami {
    fn fingerprint(req: &OrderRequest) -> [u8; 16] {
        digest(&[req.product_id.as_bytes(), &req.quantity.to_be_bytes(), req.buyer.as_bytes()])
    }

    pub async fn create_order(
        &self,
        req: OrderRequest,
        idempotency_key: Option<String>,
    ) -> Result<OrderSnapshot, Error> {
        if req.quantity == 0 || req.quantity > self.limits.max_quantity as u64 {
            return Err(Error::Invalid(format!("quantity: must be 1..={}", self.limits.max_quantity)));
        }
        validate::buyer(&req.buyer).map_err(Error::Invalid)?;
        if let Some(k) = &idempotency_key {
            validate::token("Idempotency-Key", k).map_err(Error::Invalid)?;
        }
        let route = self.listed(&req.product_id)?;
        // Hashed only when there is a key to pin it to.
        let idempotency = match idempotency_key {
            Some(key) => {
                let fingerprint = Self::fingerprint(&req);
                self.pin(&key, fingerprint)?;
                Some(Idempotency { key, fingerprint })
            }
            None => None,
        };
        let new = NewOrder {
            buyer: req.buyer.clone(),
            quantity: req.quantity as u32,
            idempotency: idempotency.clone(),
            query_token: new_token(),
            ttl_ms: self.ttl_ms,
        };
        let home = route.shard_index_for_buyer(&req.buyer);
        let result = if route.shards.len() == 1 {
            self.call_in(Lane::NewOrder, &route.shards[home], shard::CreateOrder(new)).await
        } else {
            match self.call_in(Lane::NewOrder, &route.shards[home], shard::CreateOrder(new.clone())).await {
                Err(Error::Domain(DomainError::SoldOut { .. })) => {
                    self.order_with_borrowed_keys(&route, home, new.quantity, || shard::CreateOrder(new.clone())).await
                }
                other => other,
            }
        };
        self.settle_pin(&idempotency, &result);
        result
    }

    /// After a request that pinned its Idempotency-Key: confirmed when it created
    /// something, released when it was definitely refused (a retry runs anew), kept
    /// when the outcome is unknown.
    pub(super) fn settle_pin<T>(&self, idempotency: &Option<Idempotency>, result: &Result<T, Error>) {
        if let Some(Idempotency { key, fingerprint }) = idempotency {
            match result {
                Ok(_) => self.pins.confirm(key, *fingerprint, self.clock.now_ms()),
                Err(Error::Domain(_)) => {
                    self.pins.release(key, *fingerprint);
                }
                Err(_) => {}
            }
        }
    }

    /// The buyer's shard is dry: borrow keys from its siblings and order again. The
    /// buyer stays on its own shard, so per-buyer limits stay exact. `sold_out` is
    /// answered only when every sibling had no key to lend and no keys were in
    /// transit between shards meanwhile: the whole product was empty.
    pub(super) async fn order_with_borrowed_keys<M, R>(
        &self,
        route: &crate::actors::ProductRoute,
        home: usize,
        quantity: u32,
        msg: impl Fn() -> M,
    ) -> Result<R, Error>
    where
        M: Message<Result = ActorResult<R>> + Send + 'static,
        R: Send + 'static,
        ShardActor: Handler<M>,
    {
        let track = &route.transfers;
        let siblings = || (1..route.shards.len()).map(|k| (home + k) % route.shards.len());
        let sold_out = || Error::Domain(DomainError::SoldOut { requested: quantity, available: 0 });
        // Fast answer once the sale is over: every sibling's durable stock is 0.
        let mark = track.mark();
        if siblings().all(|j| route.shards[j].gauge.get().available == 0) && track.quiet_since(&mark) {
            return Err(sold_out());
        }
        let _turn = track.borrowing[home].lock().await;
        loop {
            // A borrower ahead in line may have refilled the shard.
            match self.call_in(Lane::NewOrder, &route.shards[home], msg()).await {
                Err(Error::Domain(DomainError::SoldOut { .. })) => {}
                other => return other,
            }
            let mark = track.mark();
            let (mut moved, mut lender_failed) = (false, None);
            for j in siblings() {
                if route.shards[j].gauge.get().available == 0 {
                    continue;
                }
                match self.transfer(route, j, home, quantity as usize).await {
                    Ok(0) => {}
                    Ok(_) => {
                        moved = true;
                        break;
                    }
                    // A lender that cannot answer may still hold keys: not `sold_out`.
                    Err(e @ (Error::Overloaded | Error::QueueFull(_) | Error::Timeout | Error::Unavailable(_))) => {
                        lender_failed = Some(e)
                    }
                    Err(e) => return Err(e),
                }
            }
            if !moved {
                if let Some(e) = lender_failed {
                    return Err(e);
                }
                if track.quiet_since(&mark) {
                    return Err(sold_out());
                }
                // Keys were in transit between other shards: look again once they land.
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }

    /// Moves keys from shard `from` to its dry sibling `to` (the three steps of
    /// [`crate::domain::shard::Transfers`]). Returns how many keys moved.
    async fn transfer(
        &self,
        route: &crate::actors::ProductRoute,
        from: usize,
        to: usize,
        wanted: usize,
    ) -> Result<usize, Error> {
        let _in_transit = route.transfers.begin();
        let max_keys = wanted.max(self.limits.max_transfer_keys);
        let Some(t) = self.call(&route.shards[from], shard::Lend { to: to as u16, max_keys }).await? else {
            return Ok(0);
        };
        let (transfer, n) = (t.transfer, t.keys.len());
        // Should this fail, the lender resends it later (`settle_transfers`).
        self.call(&route.shards[to], shard::Receive(t)).await?;
        let _ = self.call(&route.shards[from], shard::SettleTransfer(transfer)).await;
        metrics::counter!("kami_key_transfers_total").increment(1);
        metrics::counter!("kami_keys_transferred_total").increment(n as u64);
        Ok(n)
    }

    /// Resends every transfer a crash left unsettled (keys lent, not known to have
    /// arrived), so keys in transit always reach their borrower, exactly once.
    /// Returns how many were settled.
    pub async fn settle_transfers(&self) -> usize {
        let mut settled = 0;
        for route in self.registry.all().values().filter(|r| r.shards.len() > 1) {
            for lender in &route.shards {
                let Ok(list) = self.call(lender, shard::ListUnsettled { limit: MAX_TRANSFERS_PER_ROUND }).await else {
                    continue;
                };
                for t in list {
                    let (transfer, to) = (t.transfer, t.to as usize);
                    if self.call(&route.shards[to], shard::Receive(t)).await.is_ok()
                        && self.call(lender, shard::SettleTransfer(transfer)).await.is_ok()
                    {
                        settled += 1;
                    }
                }
            }
        }
        if settled > 0 {
            tracing::info!(settled, "resent key transfers left unsettled");
        }
        settled
    }

    pub(super) fn pin(&self, key: &str, fingerprint: [u8; 16]) -> Result<(), Error> {
        self.pins.claim(key, fingerprint, self.clock.now_ms()).map_err(|refusal| match refusal {
            Refusal::Mismatch => DomainError::IdempotencyKeyReused.into(),
            Refusal::Full => Error::Overloaded,
        })
    }

    /// Re-pins the Idempotency-Keys recovered shards hold (start-up), so reuse of a
    /// key with another product is still caught after a restart.
    pub fn restore_pins(&self, pins: Vec<(String, [u8; 16])>) {
        let now = self.clock.now_ms();
        for (key, fingerprint) in pins {
            self.pins.confirm(&key, fingerprint, now);
        }
    }

    /// Drops idempotency pins and nonces past their windows. Called periodically.
    pub fn prune(&self) {
        let now = self.clock.now_ms();
        self.pins.prune(now);
        self.nonces.prune(now);
    }

    pub(super) fn locate(&self, order_id: &str) -> Result<(OrderId, Arc<crate::actors::ProductRoute>), Error> {
        let not_found = || Error::Domain(DomainError::OrderNotFound);
        let id = OrderId::parse(order_id).ok_or_else(not_found)?;
        let route = self.registry.get(&id.shard.product).ok_or_else(not_found)?;
        if id.shard.shard as usize >= route.shards.len() {
            return Err(not_found());
        }
        Ok((id, route))
    }

    /// `token: None` reads as the merchant (no token check).
    pub async fn get_order(&self, order_id: &str, token: Option<&str>) -> Result<OrderSnapshot, Error> {
        let (id, route) = self.locate(order_id)?;
        let msg = shard::GetOrder { seq: id.seq, token: token.map(str::to_string) };
        self.call(&route.shards[id.shard.shard as usize], msg).await
    }

    pub async fn cancel_order(&self, order_id: &str, token: &str) -> Result<OrderSnapshot, Error> {
        let (id, route) = self.locate(order_id)?;
        let msg = shard::CancelOrder { seq: id.seq, token: token.to_string() };
        self.call(&route.shards[id.shard.shard as usize], msg).await
    }
}
