//! A shard's recount of itself: key accounting (I1, I2, I6), counters against a
//! recount, and the payment bookkeeping (I3). Product- and process-wide checks are in
//! [`crate::domain::audit`].

use super::*;

impl Shard {
    /// Recounts the key accounting from the state itself (I1, I2, I6) and compares it
    /// with the running counters.
    pub fn audit(&self) -> ShardAudit {
        #[derive(Clone, Copy, PartialEq)]
        enum Place {
            Nowhere,
            Available,
            Away,
            Withdrawn,
            Reserved(u64),
            Sold(u64),
        }
        let mut violations = Vec::new();
        let mut place = vec![Place::Nowhere; self.keys.len()];
        let mut mark = |id: KeyId, to: Place, violations: &mut Vec<String>| match place.get(id as usize) {
            None => violations.push(format!("key id {id} does not exist")),
            Some(Place::Nowhere) => place[id as usize] = to,
            Some(_) => violations.push(format!("key id {id} is in two places")),
        };
        for &id in &self.available {
            mark(id, Place::Available, &mut violations);
        }
        for &id in &self.transfers.away {
            mark(id, Place::Away, &mut violations);
        }
        for &id in &self.withdrawn {
            mark(id, Place::Withdrawn, &mut violations);
        }
        // (A key of an unsettled transfer may be back already: lent on by the borrower.)
        if self.transfers.unsettled.values().any(|(to, _)| *to == self.shard) {
            violations.push("a transfer lent keys to its own shard".into());
        }
        let mut audit = ShardAudit::default();
        for &id in &self.archived.sold_keys {
            mark(id, Place::Sold(0), &mut violations);
        }
        audit.sold += self.archived.sold_keys.len() as u64;
        audit.redeemed += self.archived.redeemed_keys;
        audit.coupon_delivered = self.archived_coupons.clone();
        for (&status, &n) in &self.archived.by_status {
            *audit.orders.entry(status).or_default() += n;
        }
        if self.orders.len() as u64 + self.archived.orders() != self.orders_created {
            violations.push(format!(
                "{} orders in memory and {} archived, but {} created",
                self.orders.len(),
                self.archived.orders(),
                self.orders_created
            ));
        }
        for order in self.orders.values() {
            *audit.orders.entry(order.status).or_default() += 1;
            match order.status {
                OrderStatus::PendingPayment | OrderStatus::Paid => {
                    if order.status == OrderStatus::Paid && !self.in_open_group(order.seq) {
                        violations.push(format!("order {} is paid outside an open group", order.seq));
                    }
                    for &id in &order.keys {
                        mark(id, Place::Reserved(order.seq), &mut violations);
                    }
                    audit.reserved += order.keys.len() as u64;
                }
                OrderStatus::Delivered => {
                    for &id in &order.keys {
                        mark(id, Place::Sold(order.seq), &mut violations);
                    }
                    audit.sold += order.keys.len() as u64;
                    if is_redeemed(order) {
                        audit.redeemed += order.keys.len() as u64;
                    }
                    if let Some(c) = self.pricings.get(&order.seq).and_then(|p| p.coupon.as_ref()) {
                        *audit.coupon_delivered.entry(c.code.clone()).or_default() += 1;
                    }
                }
                _ if !order.keys.is_empty() => {
                    violations.push(format!("order {} is {} but holds keys", order.seq, order.status))
                }
                _ => {}
            }
            if matches!(order.status, OrderStatus::PendingPayment | OrderStatus::Paid | OrderStatus::Delivered)
                && order.keys.len() != order.quantity as usize
            {
                violations.push(format!(
                    "order {} holds {} keys for quantity {}",
                    order.seq,
                    order.keys.len(),
                    order.quantity
                ));
            }
        }
        self.audit_payments(&mut violations);
        self.audit_groups(&mut violations);
        let lost = place.iter().filter(|p| **p == Place::Nowhere).count();
        if lost > 0 {
            violations.push(format!("{lost} keys are neither available, reserved, sold, lent nor withdrawn"));
        }
        let distinct: HashSet<&str> = self.keys.iter().map(|k| &**k).collect();
        if distinct.len() != self.keys.len() {
            violations.push("the same key was imported twice".into());
        }
        let known = self.keys.len() as u64;
        let away = self.transfers.away.len() as u64;
        audit.imported = known - self.transfers.received_new;
        audit.available = self.available.len() as u64;
        audit.withdrawn = self.withdrawn.len() as u64;
        if known != audit.available + audit.reserved + audit.sold + away + audit.withdrawn {
            violations.push(format!(
                "conservation broken: known {known} != available {} + reserved {} + sold {} + lent {away} + withdrawn {}",
                audit.available, audit.reserved, audit.sold, audit.withdrawn
            ));
        }
        audit.shard = self.shard;
        audit.unsettled = self.transfers.unsettled.iter().map(|(&t, (to, k))| (t, *to, k.len() as u64)).collect();
        audit.received = self.transfers.received.clone();
        let counts = self.counts();
        if (counts.reserved, counts.sold) != (audit.reserved, audit.sold) {
            violations.push(format!(
                "counters drifted: reserved {} and sold {} counted, {} and {} recounted",
                counts.reserved, counts.sold, audit.reserved, audit.sold
            ));
        }
        audit.violations = violations;
        audit.archived_orders = self.archived.orders();
        audit.live_orders = self.orders.len() as u64;
        audit.payment_ids = self.payments.keys().map(|k| crate::domain::audit::digest128(k)).collect();
        audit.key_digests = self.key_strings().map(key_digest).collect();
        audit
    }

    /// I3's bookkeeping: every paid order points at a recorded payment of its own,
    /// and every payment that delivered or owes a refund points back at its order.
    fn audit_payments(&self, violations: &mut Vec<String>) {
        // (order, payment id) of every payment that took its order (delivered or
        // owes/made a sold-out refund): a paid order must be taken by its own.
        let takers: std::collections::HashSet<(u64, &str)> = self
            .payments
            .values()
            .filter(|p| p.outcome.takes_order())
            .map(|p| (p.order_seq, p.payment_id.as_str()))
            .collect();
        for order in self.orders.values() {
            let needs_payment = matches!(
                order.status,
                OrderStatus::Paid | OrderStatus::Delivered | OrderStatus::RefundPending | OrderStatus::Refunded
            );
            match (&order.payment_id, needs_payment) {
                // Paid with points: the points shard's ledger holds its payment.
                (Some(_), true) if is_redeemed(order) && order.status == OrderStatus::Delivered => {}
                (None, true) => violations.push(format!("order {} is {} without a payment", order.seq, order.status)),
                (Some(id), true) if !takers.contains(&(order.seq, id.as_str())) => {
                    violations.push(format!("order {} names payment {id:?}, which is not its own", order.seq))
                }
                _ => {}
            }
        }
        for p in self.payments.values() {
            let Some(order) = self.orders.get(&p.order_seq) else {
                if !self.is_archived(p.order_seq) {
                    violations
                        .push(format!("payment {:?} is for order {}, which does not exist", p.payment_id, p.order_seq));
                }
                continue;
            };
            let owns_order = order.payment_id.as_deref() == Some(p.payment_id.as_str());
            let consistent = match p.outcome {
                PaymentOutcome::Delivered => owns_order && order.status == OrderStatus::Delivered,
                PaymentOutcome::AwaitingGroup => owns_order && order.status == OrderStatus::Paid,
                PaymentOutcome::RefundOwed(r) if r.takes_order() => {
                    owns_order && order.status == OrderStatus::RefundPending
                }
                PaymentOutcome::Refunded(r) if r.takes_order() => owns_order && order.status == OrderStatus::Refunded,
                _ => true,
            };
            if !consistent {
                violations.push(format!(
                    "payment {:?} ({:?}) disagrees with order {} ({})",
                    p.payment_id, p.outcome, order.seq, order.status
                ));
            }
        }
    }
}
