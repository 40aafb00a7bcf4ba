//! Settled orders leaving memory for the archive: what the shard keeps of them
//! (counts, sold key ids, limit weight, Idempotency-Keys) and how they are chosen.

use super::*;

/// (v5) What a shard keeps of the orders it archived.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Archived {
    /// Orders archived, by status.
    pub by_status: BTreeMap<OrderStatus, u64>,
    /// Keys that archived orders sold (still this shard's keys: the audit places them).
    pub sold_keys: Vec<KeyId>,
    /// Of those, keys delivered by redemptions.
    pub redeemed_keys: u64,
    /// What archived orders still count toward per-buyer limits (delivered ones).
    pub holdings: HashMap<String, u32>,
    /// Idempotency keys of archived orders: key → (fingerprint, order, forget at).
    pub idempotency: HashMap<String, ([u8; 16], u64, Millis)>,
}

impl Archived {
    pub fn orders(&self) -> u64 {
        self.by_status.values().sum()
    }
}

/// (v5) An order as the archive keeps it: the order and its keys as text, and
/// (v9) how it was priced when not at its list price.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchivedOrder {
    pub order: Order,
    pub keys: Vec<String>,
    pub pricing: Option<crate::domain::pricing::OrderPricing>,
}

impl Shard {
    /// (v11) Archived delivered orders that used a coupon, by code.
    pub fn archived_coupons(&self) -> &BTreeMap<String, u64> {
        &self.archived_coupons
    }

    /// Counts `archived` (a record of this shard's archive) in the archived coupon
    /// uses if it is archived as of this state (not in memory, created here) and a
    /// delivered order with a coupon. For a state from a snapshot that did not keep
    /// those counts (format v10): storage recounts them from the archive.
    pub fn recount_archived_coupon(&mut self, archived: &ArchivedOrder) {
        let seq = archived.order.seq;
        let archived_here = seq <= self.orders_created && !self.orders.contains_key(&seq);
        if archived_here && archived.order.status == OrderStatus::Delivered {
            if let Some(c) = archived.pricing.as_ref().and_then(|p| p.coupon.as_ref()) {
                *self.archived_coupons.entry(c.code.clone()).or_default() += 1;
            }
        }
    }

    /// Orders that can no longer change and have not changed for `min_age_ms`:
    /// delivered, refunded, expired or cancelled, outside any group, with no refund
    /// owed. Oldest first, at most `limit`. (The caller writes them to the archive,
    /// then [`Shard::archive`]s them.)
    pub fn archivable(&self, now_ms: Millis, min_age_ms: Millis, limit: usize) -> Vec<u64> {
        self.archivable_after(0, now_ms, min_age_ms, usize::MAX, limit).0
    }

    /// [`Shard::archivable`] for orders after `after`, looking at no more than
    /// `max_scan` of them, so that orders that stay (group seats, refunds owed) are
    /// not looked at again on every call. Returns the orders and where to go on
    /// next time: the last order looked at, or 0 (from the start) once the scan
    /// reached orders too young.
    pub fn archivable_after(
        &self,
        after: u64,
        now_ms: Millis,
        min_age_ms: Millis,
        max_scan: usize,
        limit: usize,
    ) -> (Vec<u64>, u64) {
        let owing = self.orders_owing_refunds();
        let mut found = Vec::new();
        let mut next = 0;
        for o in self.orders.range(after + 1..).map(|(_, o)| o).take(max_scan) {
            if o.created_at_ms.saturating_add(min_age_ms) > now_ms {
                return (found, 0);
            }
            next = o.seq;
            if self.can_archive(o, &owing, now_ms, min_age_ms) {
                found.push(o.seq);
                if found.len() == limit {
                    return (found, next);
                }
            }
        }
        // The scan ran out of orders (from the start next time) or of its budget.
        let exhausted = self.orders.range(next + 1..).next().is_none();
        (found, if exhausted { 0 } else { next })
    }

    fn orders_owing_refunds(&self) -> HashSet<u64> {
        self.refunds_owed.iter().map(|k| self.payments[k].order_seq).collect()
    }

    /// Whether order `o` can leave memory now: settled (delivered, refunded,
    /// expired or cancelled), unchanged for `min_age_ms`, outside any group, and
    /// owed no refund (`owing`: [`Shard::orders_owing_refunds`]).
    fn can_archive(&self, o: &Order, owing: &HashSet<u64>, now_ms: Millis, min_age_ms: Millis) -> bool {
        let last = [o.paid_at_ms, o.delivered_at_ms, o.closed_at_ms].into_iter().flatten().max();
        let settled = matches!(
            o.status,
            OrderStatus::Delivered | OrderStatus::Refunded | OrderStatus::Expired | OrderStatus::Cancelled
        );
        settled
            && last.unwrap_or(o.created_at_ms).saturating_add(min_age_ms) <= now_ms
            && !self.group_of.contains_key(&o.seq)
            && !owing.contains(&o.seq)
    }

    /// Archives the orders whose records were written to the archive and made
    /// durable since they were chosen, keeping only those still archivable and
    /// unchanged: an order may have changed in between (a late payment that owes a
    /// refund), and its written record would then be stale. `None` if none is left.
    pub fn archive_written(
        &mut self,
        written: &[ArchivedOrder],
        now_ms: Millis,
        min_age_ms: Millis,
        keep_keys_ms: Millis,
    ) -> Option<Event> {
        let owing = self.orders_owing_refunds();
        let seqs = written
            .iter()
            .filter(|w| {
                self.order(w.order.seq)
                    .is_some_and(|o| *o == w.order && self.can_archive(o, &owing, now_ms, min_age_ms))
            })
            .map(|w| w.order.seq)
            .collect();
        self.archive(seqs, now_ms, keep_keys_ms)
    }

    /// What the archive keeps of order `seq` (in memory).
    pub fn archive_record(&self, seq: u64) -> Option<ArchivedOrder> {
        let order = self.order(seq)?;
        Some(ArchivedOrder {
            order: order.clone(),
            keys: order.keys.iter().map(|&k| self.key(k).to_string()).collect(),
            pricing: self.pricings.get(&seq).cloned(),
        })
    }

    /// Archives `seqs` (from [`Shard::archivable`], already written to the archive).
    pub fn archive(&mut self, seqs: Vec<u64>, now_ms: Millis, keep_keys_ms: Millis) -> Option<Event> {
        if seqs.is_empty() {
            return None;
        }
        let event = Event::OrdersArchived { seqs, at_ms: now_ms, keep_keys_ms };
        self.apply(&event);
        Some(event)
    }
}
