//! Borrowing keys between the shards of one product: the transfer protocol
//! ([`crate::domain::shard::Transfers`], three journaled steps) driven from the core,
//! for a buyer whose shard is dry, and resent after crashes. On a cluster node the
//! lender or the borrower may be served by another node: each step is sent where
//! its shard is (`core::remote`); the borrower is always a shard served here (the
//! order is on it), and each node resends the loans of the lenders it serves.

use super::*;

impl Kami {
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
                    Err(
                        e @ (Error::Overloaded
                        | Error::QueueFull(_)
                        | Error::Timeout
                        | Error::Unavailable(_)
                        | Error::NoOwner(_)),
                    ) => lender_failed = Some(e),
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
        // Each step where its shard is served: a cluster node borrows from the
        // shards other nodes serve too.
        let Some(t) = self.shard_lend(&route.shards[from], to as u16, max_keys).await? else {
            return Ok(0);
        };
        let (transfer, n) = (t.transfer, t.keys.len());
        // Should this fail, the lender resends it later (`settle_transfers`).
        self.shard_receive(&route.shards[to], t).await?;
        let _ = self.shard_settle_transfer(&route.shards[from], transfer).await;
        // Counted where the borrower journals the keys' arrival (`Tally::KeysReceived`).
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
                    if self.shard_receive(&route.shards[to], t).await.is_ok()
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
}
