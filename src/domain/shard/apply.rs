//! The one mutator of a [`Shard`]: every event, live or replayed by recovery, is
//! applied here, so live state and recovered state cannot diverge.

use super::*;

impl Shard {
    /// [`Shard::apply`] of an event the caller no longer needs (a replayed
    /// record): the same step, except that a new order is moved into the shard
    /// rather than copied (recovery and snapshots replay mostly new orders).
    pub fn apply_owned(&mut self, event: Event) {
        match event {
            Event::OrderCreated { order } => self.add_pending_order_owned(order),
            event => self.apply(&event),
        }
    }

    /// Applies one event. Panics if the event does not fit the state: the journal
    /// would then be corrupt, and continuing would risk selling a key twice.
    pub fn apply(&mut self, event: &Event) {
        match event {
            Event::KeysImported { keys } => {
                assert!(keys.len() <= MAX_KEYS_PER_EVENT);
                for key in keys {
                    assert!(self.find_key(key).is_none(), "duplicate key in journal");
                    let id = KeyId::try_from(self.keys.len()).expect("at most u32::MAX keys per shard");
                    self.keys.push(key.as_str().into());
                    self.index_key(id);
                    self.available.push_back(id);
                }
            }
            Event::OrderCreated { order } => self.add_pending_order(order),
            Event::OrderCreatedWithPassword { order, password } => {
                self.add_pending_order(order);
                self.passwords.insert(order.seq, *password);
                self.index_password(order);
            }
            Event::OrderCreatedPriced { order, password, pricing } => {
                self.add_pending_order(order);
                if let Some(password) = password {
                    self.passwords.insert(order.seq, *password);
                    self.index_password(order);
                }
                self.pricings.insert(order.seq, pricing.clone());
            }
            Event::GroupOpened { .. } | Event::GroupJoined { .. } | Event::GroupFailed { .. } => {
                self.apply_group(event)
            }
            Event::PaymentApplied { record, taken_keys } => {
                let key = payment_key(&record.channel, &record.payment_id);
                assert!(
                    self.payments
                        .get(&key)
                        .is_none_or(|r| r.outcome == PaymentOutcome::Ignored && r.order_seq == record.order_seq),
                    "payment applied twice"
                );
                let at = record.at_ms;
                let idx = record.order_seq;
                if !self.orders.contains_key(&idx) {
                    assert!(self.is_archived(idx), "payment for an order that never existed");
                    assert!(
                        matches!(
                            record.outcome,
                            PaymentOutcome::RefundOwed(RefundReason::OrderArchived) | PaymentOutcome::Ignored
                        ),
                        "an archived order only takes payments owed back"
                    );
                    if matches!(record.outcome, PaymentOutcome::RefundOwed(_)) {
                        self.refunds_owed.insert(key.clone());
                    }
                    self.payments.insert(key, record.clone());
                    return;
                }
                let before = self.orders[&idx].status;
                let group = self.group_of.get(&record.order_seq).copied();
                match record.outcome {
                    // The last seat of a group paid: the whole group is delivered.
                    PaymentOutcome::Delivered if group.is_some() => {
                        assert_eq!(before, OrderStatus::PendingPayment, "a group seat is paid while pending");
                        assert!(taken_keys.is_empty());
                        let order = self.order_mut(idx);
                        order.status = OrderStatus::Paid;
                        order.paid_at_ms = Some(at);
                        order.payment_id = Some(record.payment_id.clone());
                        self.complete_group(group.expect("checked"), record.order_seq, at);
                    }
                    PaymentOutcome::AwaitingGroup => {
                        assert_eq!(before, OrderStatus::PendingPayment, "a group seat is paid while pending");
                        assert!(group.is_some_and(|g| self.groups[(g - 1) as usize].state == GroupState::Open));
                        let order = self.order_mut(idx);
                        order.status = OrderStatus::Paid;
                        order.paid_at_ms = Some(at);
                        order.payment_id = Some(record.payment_id.clone());
                        self.seat_payments.insert(record.order_seq, key.clone());
                    }
                    PaymentOutcome::Delivered => {
                        let order = &self.orders[&idx];
                        let (quantity, buyer) = (order.quantity, order.buyer.clone());
                        match before {
                            OrderStatus::PendingPayment => {
                                assert!(taken_keys.is_empty());
                                self.reserved -= quantity as u64;
                            }
                            OrderStatus::Expired | OrderStatus::Cancelled => {
                                assert_eq!(taken_keys.len(), quantity as usize);
                                self.take_available(taken_keys);
                                self.order_mut(idx).keys = taken_keys.clone();
                                self.holdings.add(&buyer, quantity);
                            }
                            other => panic!("delivery applied to a {other} order"),
                        }
                        self.sold += quantity as u64;
                        let order = self.order_mut(idx);
                        order.status = OrderStatus::Delivered;
                        order.paid_at_ms = Some(at);
                        order.delivered_at_ms = Some(at);
                        order.payment_id = Some(record.payment_id.clone());
                    }
                    PaymentOutcome::RefundOwed(reason) if reason.takes_order() => {
                        assert!(matches!(before, OrderStatus::Expired | OrderStatus::Cancelled));
                        let solo = matches!(reason, RefundReason::SoldOut | RefundReason::CouponReturned);
                        assert_eq!(group.is_some(), !solo, "refund reason fits the order");
                        let order = self.order_mut(idx);
                        order.status = OrderStatus::RefundPending;
                        order.paid_at_ms = Some(at);
                        order.payment_id = Some(record.payment_id.clone());
                    }
                    PaymentOutcome::AmountMismatch { .. } => self.order_mut(idx).amount_mismatch = true,
                    // (Reasons that take the order are matched above.)
                    PaymentOutcome::RefundOwed(_) | PaymentOutcome::Ignored => {}
                    PaymentOutcome::Refunded(_) => panic!("a payment is applied as owed, then refunded"),
                }
                if matches!(record.outcome, PaymentOutcome::RefundOwed(_)) {
                    self.refunds_owed.insert(key.clone());
                }
                self.payments.insert(key, record.clone());
            }
            Event::RefundCompleted { channel, payment_id, at_ms: _ } => {
                let key = payment_key(channel, payment_id);
                let record = self.payments.get_mut(&key).expect("refund of a recorded payment");
                let PaymentOutcome::RefundOwed(reason) = record.outcome else {
                    panic!("refund completed for a payment that owed none")
                };
                record.outcome = PaymentOutcome::Refunded(reason);
                let seq = record.order_seq;
                self.refunds_owed.remove(&key);
                if reason.takes_order() {
                    let order = self.order_mut(seq);
                    assert_eq!(order.status, OrderStatus::RefundPending);
                    order.status = OrderStatus::Refunded;
                }
            }
            Event::OrderRedeemed { order } => {
                assert_eq!(order.seq, self.orders_created + 1, "order sequence gap");
                assert_eq!(order.status, OrderStatus::Delivered);
                assert!(is_redeemed(order), "a redeemed order names its redemption");
                assert_eq!(order.keys.len(), order.quantity as usize);
                self.take_available(&order.keys);
                self.sold += order.keys.len() as u64;
                self.holdings.add(&order.buyer, order.quantity);
                let idem = order.idempotency.as_ref().expect("a redeemed order has its idempotency key");
                self.idempotency.insert(idem.key.clone(), (idem.fingerprint, order.seq));
                self.orders.insert(order.seq, order.clone());
                self.orders_created += 1;
            }
            Event::OrdersArchived { seqs, at_ms, keep_keys_ms } => self.apply_archive(seqs, *at_ms, *keep_keys_ms),
            Event::KeysWithdrawn { keys } => {
                assert!(keys.len() <= MAX_KEYS_PER_EVENT);
                let leaving: HashSet<KeyId> = keys.iter().copied().collect();
                assert_eq!(leaving.len(), keys.len(), "a key withdrawn twice in one event");
                let before = self.available.len();
                self.available.retain(|id| !leaving.contains(id));
                assert_eq!(before - self.available.len(), keys.len(), "only available keys are withdrawn");
                self.withdrawn.extend_from_slice(keys);
            }
            Event::KeysLent { .. } | Event::KeysReceived { .. } | Event::TransferSettled { .. } => {
                self.apply_transfer(event)
            }
            Event::OrderExpired { seq, at_ms } | Event::OrderCancelled { seq, at_ms } => {
                let idx = *seq;
                assert_eq!(self.order_mut(idx).status, OrderStatus::PendingPayment, "only pending orders close");
                let status = match event {
                    Event::OrderExpired { .. } => OrderStatus::Expired,
                    _ => OrderStatus::Cancelled,
                };
                self.close_order(idx, status, *at_ms);
            }
        }
    }

    /// Moves archived orders out of memory, keeping what the shard still needs:
    /// their counts, the keys they sold, what they count toward per-buyer limits,
    /// and their idempotency keys until `created_at + keep_keys_ms`.
    fn apply_archive(&mut self, seqs: &[u64], at_ms: Millis, keep_keys_ms: Millis) {
        for seq in seqs {
            let order = self.orders.remove(seq).expect("archived orders are in memory");
            if self.passwords.remove(seq).is_some() {
                self.unindex_password(&order);
            }
            let pricing = self.pricings.remove(seq);
            assert!(
                matches!(
                    order.status,
                    OrderStatus::Delivered | OrderStatus::Refunded | OrderStatus::Expired | OrderStatus::Cancelled
                ),
                "only settled orders are archived"
            );
            assert!(!self.group_of.contains_key(seq), "group seats are not archived");
            *self.archived.by_status.entry(order.status).or_default() += 1;
            if order.status == OrderStatus::Delivered {
                if let Some(c) = pricing.as_ref().and_then(|p| p.coupon.as_ref()) {
                    *self.archived_coupons.entry(c.code.clone()).or_default() += 1;
                }
                if is_redeemed(&order) {
                    self.archived.redeemed_keys += order.keys.len() as u64;
                }
                self.archived.sold_keys.extend(&order.keys);
            }
            if order.status.counts_toward_limit() {
                *self.archived.holdings.entry(order.buyer.clone()).or_default() += order.quantity;
            }
            if let Some(idem) = &order.idempotency {
                self.idempotency.remove(&idem.key);
                let forget_at = order.created_at_ms.saturating_add(keep_keys_ms);
                if forget_at > at_ms {
                    self.archived.idempotency.insert(idem.key.clone(), (idem.fingerprint, order.seq, forget_at));
                }
            }
        }
        self.archived.idempotency.retain(|_, (_, _, forget_at)| *forget_at > at_ms);
    }

    /// An order holding reserved keys closes: `status` and `closed_at` set, its keys
    /// back at the end of the available queue, its quantity off the buyer's holdings.
    pub(super) fn close_order(&mut self, idx: u64, status: OrderStatus, at_ms: Millis) {
        let order = self.order_mut(idx);
        order.status = status;
        order.closed_at_ms = Some(at_ms);
        let released = std::mem::take(&mut order.keys);
        let quantity = order.quantity;
        self.reserved -= released.len() as u64;
        self.available.extend(released);
        let buyer = &self.orders[&idx].buyer;
        self.holdings.remove(buyer, quantity);
    }

    fn apply_transfer(&mut self, event: &Event) {
        match event {
            Event::KeysLent { transfer, to, keys } => {
                assert_eq!(*transfer, self.transfers.next, "transfer sequence gap");
                assert!(keys.len() <= self.available.len(), "lent more keys than available");
                let start = self.available.len() - keys.len();
                assert!(self.available.range(start..).eq(keys.iter()), "lent keys must be the back of the queue");
                self.available.truncate(start);
                self.transfers.away.extend(keys.iter().copied());
                self.transfers.unsettled.insert(*transfer, (*to, keys.clone()));
                self.transfers.next += 1;
            }
            Event::KeysReceived { from, transfer, keys } => {
                assert!(self.transfers.received.insert((*from, *transfer)), "transfer received twice");
                for key in keys {
                    let id = match self.find_key(key) {
                        Some(id) => {
                            assert!(self.transfers.away.remove(&id), "received a key already in stock");
                            id
                        }
                        None => {
                            let id = KeyId::try_from(self.keys.len()).expect("at most u32::MAX keys per shard");
                            self.keys.push(key.as_str().into());
                            self.index_key(id);
                            self.transfers.received_new += 1;
                            id
                        }
                    };
                    self.available.push_back(id);
                }
            }
            Event::TransferSettled { transfer } => {
                self.transfers.unsettled.remove(transfer).expect("settled an unsettled transfer");
            }
            _ => unreachable!("not a transfer event"),
        }
    }

    /// Removes `ids` from the front of the available queue; they must be exactly there.
    pub(super) fn take_available(&mut self, ids: &[KeyId]) {
        for &id in ids {
            let front = self.available.pop_front();
            assert_eq!(front, Some(id), "keys must be taken from the front of the available queue");
        }
    }
}
