//! The group-buy steps of a [`Shard`] (see [`crate::domain::group`]). A child
//! module: it keeps the shard's private state consistent like the rest of `shard`.

use super::*;

/// Open groups looked at by one "join any open group" before opening a new one.
const MAX_GROUPS_SCANNED: usize = 1024;

/// Joins a group takes over its life, per seat: members who leave free their seat,
/// but a group's member list (and the cost of reading it) stays bounded.
pub const MAX_JOINS_PER_SEAT: usize = 8;

/// Times one buyer may leave one group (cancel or let a seat expire): a buyer who
/// left this often cannot take a seat in it again, so one buyer's join-and-leave
/// churn cannot spend the group's joins.
pub const MAX_LEAVES_PER_BUYER: usize = 2;

impl Shard {
    pub fn group(&self, seq: u64) -> Option<&Group> {
        seq.checked_sub(1).and_then(|i| self.groups.get(i as usize))
    }

    pub fn groups(&self) -> &[Group] {
        &self.groups
    }

    /// The group an order took a seat in, if any.
    pub fn group_of_order(&self, order_seq: u64) -> Option<u64> {
        self.group_of.get(&order_seq).copied()
    }

    /// `(seats taken, seats paid)`: a seat is taken by a pending, paid or (in a
    /// completed group) delivered order.
    pub fn seats(&self, g: &Group) -> (u32, u32) {
        let mut taken = 0;
        let mut paid = 0;
        for &seq in &g.orders {
            match self.orders[&seq].status {
                OrderStatus::PendingPayment => taken += 1,
                OrderStatus::Paid | OrderStatus::Delivered => {
                    taken += 1;
                    paid += 1
                }
                _ => {}
            }
        }
        (taken, paid)
    }

    pub(super) fn in_open_group(&self, order_seq: u64) -> bool {
        self.group_of_order(order_seq).is_some_and(|g| self.groups[(g - 1) as usize].state == GroupState::Open)
    }

    fn has_seat(&self, g: &Group, buyer: &str) -> bool {
        g.orders.iter().any(|&seq| {
            let o = &self.orders[&seq];
            o.buyer == buyer && matches!(o.status, OrderStatus::PendingPayment | OrderStatus::Paid)
        })
    }

    /// The answer recorded for this Idempotency-Key, if it was used before.
    fn repeated_seat(&self, req: &NewOrder) -> Option<Result<Outcome<(u64, u64)>, DomainError>> {
        let idem = req.idempotency.as_ref()?;
        let (fingerprint, seq) = self.idempotent(&idem.key)?;
        Some(match self.group_of_order(seq) {
            Some(group) if fingerprint == idem.fingerprint => Ok(Outcome::Repeat((group, seq))),
            _ => Err(DomainError::IdempotencyKeyReused),
        })
    }

    /// Opens a group of `terms` with the buyer of `req` in its first seat.
    /// Returns `(group, order)`.
    pub fn open_group(
        &mut self,
        terms: &GroupTerms,
        req: NewOrder,
        now_ms: Millis,
    ) -> Result<Outcome<(u64, u64)>, DomainError> {
        assert_eq!(req.quantity, 1, "a group seat is one key");
        assert!(terms.size >= 2 && terms.time_limit_ms > 0, "deal validated by the caller");
        if let Some(repeat) = self.repeated_seat(&req) {
            return repeat;
        }
        self.check_can_take(&req.buyer, 1, now_ms)?;
        let deadline_ms = now_ms.saturating_add(terms.time_limit_ms);
        // One key at the group price, expiring at the order TTL (not capped at the
        // deadline: a failing group cancels its pending seats itself, and orders that
        // expire in creation order keep `unheard`'s early stop exact).
        let order = self.pending_order(req, terms.price_cents, now_ms);
        let group = Group {
            seq: self.groups.len() as u64 + 1,
            deal_id: terms.deal_id.clone(),
            size: terms.size,
            price_cents: terms.price_cents,
            opened_by: order.buyer.clone(),
            opened_at_ms: now_ms,
            deadline_ms,
            orders: vec![order.seq],
            state: GroupState::Open,
        };
        let ids = (group.seq, order.seq);
        let event = Event::GroupOpened { group, order };
        self.apply(&event);
        Ok(Outcome::Changed(event, ids))
    }

    /// Takes a free seat of group `group` for the buyer of `req`.
    pub fn join_group(
        &mut self,
        group: u64,
        req: NewOrder,
        now_ms: Millis,
    ) -> Result<Outcome<(u64, u64)>, DomainError> {
        assert_eq!(req.quantity, 1, "a group seat is one key");
        if let Some(repeat) = self.repeated_seat(&req) {
            return repeat;
        }
        let g = self.group(group).ok_or(DomainError::GroupNotFound)?;
        self.check_seat(g, &req.buyer, now_ms)?;
        self.check_can_take(&req.buyer, 1, now_ms)?;
        let order = self.pending_order(req, g.price_cents, now_ms);
        let seq = order.seq;
        let event = Event::GroupJoined { group, order };
        self.apply(&event);
        Ok(Outcome::Changed(event, (group, seq)))
    }

    fn check_seat(&self, g: &Group, buyer: &str, now_ms: Millis) -> Result<(), DomainError> {
        if g.state != GroupState::Open || now_ms >= g.deadline_ms {
            let state = if g.state == GroupState::Open { "past its deadline" } else { g.state.as_str() };
            return Err(DomainError::GroupClosed { state: state.into() });
        }
        if self.has_seat(g, buyer) {
            return Err(DomainError::AlreadyInGroup);
        }
        if self.leaves(g, buyer) >= MAX_LEAVES_PER_BUYER {
            return Err(DomainError::LeftTooOften);
        }
        if !self.has_room(g) {
            return Err(DomainError::GroupFull);
        }
        Ok(())
    }

    /// Seats of `g` this buyer took and gave up (cancelled or expired).
    fn leaves(&self, g: &Group, buyer: &str) -> usize {
        g.orders
            .iter()
            .map(|&seq| &self.orders[&seq])
            .filter(|o| o.buyer == buyer && matches!(o.status, OrderStatus::Cancelled | OrderStatus::Expired))
            .count()
    }

    /// A free seat, within the joins the group may take over its life.
    fn has_room(&self, g: &Group) -> bool {
        self.seats_open(g) > 0
    }

    /// Seats that can still be taken: free seats, but no more than the joins the
    /// group has left (what a group shows as `seats_left`).
    pub fn seats_open(&self, g: &Group) -> u32 {
        if g.state != GroupState::Open {
            return 0;
        }
        let free = g.size.saturating_sub(self.seats(g).0);
        let joins_left = (g.size as usize * MAX_JOINS_PER_SEAT).saturating_sub(g.orders.len());
        free.min(u32::try_from(joins_left).unwrap_or(u32::MAX))
    }

    /// The open groups of a deal, oldest first, among the oldest
    /// [`MAX_GROUPS_SCANNED`] open groups of the shard.
    fn open_of_deal<'a>(&'a self, deal_id: &'a str) -> impl Iterator<Item = &'a Group> + 'a {
        self.open_groups
            .iter()
            .take(MAX_GROUPS_SCANNED)
            .map(|&seq| &self.groups[(seq - 1) as usize])
            .filter(move |g| g.deal_id == deal_id)
    }

    /// Takes a seat in the oldest open group of the deal that has one free for this
    /// buyer, or opens a new group when none has: one step, so concurrent buyers
    /// fill one group before the next is opened.
    pub fn join_any(
        &mut self,
        terms: &GroupTerms,
        req: NewOrder,
        now_ms: Millis,
    ) -> Result<Outcome<(u64, u64)>, DomainError> {
        if let Some(repeat) = self.repeated_seat(&req) {
            return repeat;
        }
        let found =
            self.open_of_deal(&terms.deal_id).find(|g| self.check_seat(g, &req.buyer, now_ms).is_ok()).map(|g| g.seq);
        match found {
            Some(group) => self.join_group(group, req, now_ms),
            None => self.open_group(terms, req, now_ms),
        }
    }

    /// Open groups of a deal that still take members at `now_ms`, oldest first
    /// (scanning at most the 1,024 oldest open groups), at most `limit`.
    pub fn open_groups_of(&self, deal_id: &str, now_ms: Millis, limit: usize) -> Vec<u64> {
        self.open_of_deal(deal_id)
            .filter(|g| now_ms < g.deadline_ms && self.has_room(g))
            .take(limit)
            .map(|g| g.seq)
            .collect()
    }

    /// Fails every open group whose deadline is at or before `now_ms`.
    pub(super) fn fail_due_groups(&mut self, now_ms: Millis, max_events: usize) -> Vec<Event> {
        let mut events = Vec::new();
        while events.len() < max_events {
            let Some(&Reverse((at, group))) = self.group_expiry.peek() else { break };
            if at > now_ms {
                break;
            }
            self.group_expiry.pop();
            if self.groups[(group - 1) as usize].state == GroupState::Open {
                let event = Event::GroupFailed { group, at_ms: now_ms };
                self.apply(&event);
                events.push(event);
            }
        }
        events
    }

    // ---- applying (called by `Shard::apply` only) ----

    /// An order enters `pending_payment` with its keys reserved.
    pub(super) fn add_pending_order(&mut self, order: &Order) {
        self.add_pending_order_owned(order.clone());
    }

    /// [`Shard::add_pending_order`] of an order the caller no longer needs (a
    /// replayed record's): moved into the shard rather than copied.
    pub(super) fn add_pending_order_owned(&mut self, order: Order) {
        assert_eq!(order.seq, self.orders_created + 1, "order sequence gap");
        assert_eq!(order.status, OrderStatus::PendingPayment);
        assert_eq!(order.keys.len(), order.quantity as usize);
        self.take_available(&order.keys);
        self.reserved += order.keys.len() as u64;
        self.holdings.add(&order.buyer, order.quantity);
        if let Some(idem) = &order.idempotency {
            self.idempotency.insert(idem.key.clone(), (idem.fingerprint, order.seq));
        }
        self.expiry.push(Reverse((order.expires_at_ms, order.seq)));
        self.orders.insert(order.seq, order);
        self.orders_created += 1;
    }

    pub(super) fn apply_group(&mut self, event: &Event) {
        match event {
            Event::GroupOpened { group, order } => {
                assert_eq!(group.seq, self.groups.len() as u64 + 1, "group sequence gap");
                assert_eq!(group.state, GroupState::Open);
                assert_eq!(group.orders, [order.seq], "a group opens with its first member");
                assert_eq!(order.amount_cents, group.price_cents);
                self.add_pending_order(order);
                self.group_of.insert(order.seq, group.seq);
                self.open_groups.insert(group.seq);
                self.group_expiry.push(Reverse((group.deadline_ms, group.seq)));
                self.groups.push(group.clone());
            }
            Event::GroupJoined { group, order } => {
                let g = self.group(*group).expect("joined an existing group");
                assert_eq!(g.state, GroupState::Open, "joined an open group");
                assert!(self.seats(g).0 < g.size, "a group never exceeds its size");
                assert!(!self.has_seat(g, &order.buyer), "one seat per buyer");
                assert_eq!(order.amount_cents, g.price_cents);
                self.add_pending_order(order);
                self.group_of.insert(order.seq, *group);
                self.groups[(*group - 1) as usize].orders.push(order.seq);
            }
            Event::GroupFailed { group, at_ms } => {
                let idx = (*group - 1) as usize;
                assert_eq!(self.groups[idx].state, GroupState::Open, "a group fails once");
                self.groups[idx].state = GroupState::Failed { at_ms: *at_ms };
                self.open_groups.remove(group);
                for seq in self.groups[idx].orders.clone() {
                    self.release_seat(seq, *at_ms);
                }
            }
            _ => unreachable!("not a group event"),
        }
    }

    /// The group of a failing seat: a pending seat is cancelled, a paid one is owed
    /// its refund; either way its keys return to stock.
    fn release_seat(&mut self, seq: u64, at_ms: Millis) {
        let order = self.order_mut(seq);
        let status = match order.status {
            OrderStatus::PendingPayment => OrderStatus::Cancelled,
            OrderStatus::Paid => OrderStatus::RefundPending,
            _ => return,
        };
        if status == OrderStatus::RefundPending {
            let key = self.seat_payments.remove(&seq).expect("a paid seat's payment is indexed");
            let record = self.payments.get_mut(&key).expect("a paid seat has its payment recorded");
            assert_eq!(record.outcome, PaymentOutcome::AwaitingGroup);
            record.outcome = PaymentOutcome::RefundOwed(RefundReason::GroupFailed);
            self.refunds_owed.insert(key);
        }
        self.close_order(seq, status, at_ms);
    }

    /// Every seat is paid (`last` by the payment being applied, whose record is
    /// not stored yet): every member is delivered the keys reserved for it.
    pub(super) fn complete_group(&mut self, group: u64, last: u64, at_ms: Millis) {
        let idx = (group - 1) as usize;
        assert_eq!(self.groups[idx].state, GroupState::Open, "a group completes once");
        let (taken, paid) = self.seats(&self.groups[idx]);
        let size = self.groups[idx].size;
        assert!(taken == size && paid == size, "a group completes with every seat paid");
        self.groups[idx].state = GroupState::Completed { at_ms };
        self.open_groups.remove(&group);
        for seq in self.groups[idx].orders.clone() {
            let order = &self.orders[&seq];
            if order.status != OrderStatus::Paid {
                continue;
            }
            if seq != last {
                let key = self.seat_payments.remove(&seq).expect("a paid seat's payment is indexed");
                let record = self.payments.get_mut(&key).expect("a paid seat has its payment recorded");
                assert_eq!(record.outcome, PaymentOutcome::AwaitingGroup);
                record.outcome = PaymentOutcome::Delivered;
            }
            let order = self.order_mut(seq);
            order.status = OrderStatus::Delivered;
            order.delivered_at_ms = Some(at_ms);
            let n = order.keys.len() as u64;
            self.reserved -= n;
            self.sold += n;
        }
    }

    // ---- audit ----

    /// Group sizes and states against their members' orders.
    pub(super) fn audit_groups(&self, violations: &mut Vec<String>) {
        for (i, g) in self.groups.iter().enumerate() {
            if g.seq != i as u64 + 1 {
                violations.push(format!("group {} is stored at {}", g.seq, i + 1));
            }
            let mut by_status: BTreeMap<OrderStatus, u32> = BTreeMap::new();
            for &seq in &g.orders {
                match self.order(seq) {
                    None => violations.push(format!("group {} names order {seq}, which does not exist", g.seq)),
                    Some(o) => *by_status.entry(o.status).or_default() += 1,
                }
                if self.group_of_order(seq) != Some(g.seq) {
                    violations.push(format!("order {seq} of group {} is not indexed to it", g.seq));
                }
            }
            let n = |s| by_status.get(&s).copied().unwrap_or(0);
            let taken = n(OrderStatus::PendingPayment) + n(OrderStatus::Paid);
            let ok = match g.state {
                GroupState::Open => taken <= g.size && n(OrderStatus::Delivered) == 0,
                GroupState::Completed { .. } => taken == 0 && n(OrderStatus::Delivered) == g.size,
                GroupState::Failed { .. } => taken == 0 && n(OrderStatus::Delivered) == 0,
            };
            if !ok {
                violations.push(format!(
                    "group {} is {} of size {} with members {by_status:?}",
                    g.seq,
                    g.state.as_str(),
                    g.size
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard(keys: usize, limit: u32) -> Shard {
        let product = ProductInfo {
            id: "p1".into(),
            name: "Game key".into(),
            price_cents: 990,
            per_buyer_limit: limit,
            shards: 1,
            created_at_ms: 0,
        };
        let mut s = Shard::new(product, 0);
        s.import_keys((0..keys).map(|i| format!("K{i}")).collect());
        s
    }

    fn terms(size: u32) -> GroupTerms {
        GroupTerms { deal_id: "deal".into(), size, price_cents: 500, time_limit_ms: 10_000 }
    }

    fn seat(buyer: &str) -> NewOrder {
        NewOrder {
            buyer: buyer.into(),
            quantity: 1,
            idempotency: None,
            query_token: "t".into(),
            ttl_ms: 60_000,
            password: None,
            coupon: None,
            reseller: None,
        }
    }

    fn pay(seq: u64, id: &str) -> Payment {
        Payment {
            order_seq: seq,
            payment_id: id.into(),
            channel: "sandbox".into(),
            amount_cents: 500,
            status: "paid".into(),
        }
    }

    fn changed<T>(o: Result<Outcome<T>, DomainError>) -> T {
        match o.unwrap() {
            Outcome::Changed(_, v) => v,
            Outcome::Repeat(_) => panic!("expected a change"),
        }
    }

    fn paid(s: &mut Shard, seq: u64, id: &str, now: Millis) -> PaymentOutcome {
        changed(s.pay(pay(seq, id), now))
    }

    /// Replaying the journal rebuilds the same state, and a snapshot round trip too.
    fn check_rebuilds(s: &Shard, events: &[Event]) {
        let mut replayed = Shard::new(s.product().clone(), 0);
        for e in events {
            replayed.apply(e);
        }
        assert_eq!(replayed.groups(), s.groups());
        assert_eq!(replayed.orders(), s.orders());
        assert_eq!(replayed.counts(), s.counts());
        let mut restored: Shard = bincode::deserialize(&bincode::serialize(s).unwrap()).unwrap();
        restored.rebuild_indexes();
        assert_eq!(restored.counts(), s.counts());
        assert_eq!(restored.refunds_due(100), s.refunds_due(100));
        assert_eq!(restored.seat_payments, s.seat_payments);
        assert!(restored.audit().violations.is_empty(), "{:?}", restored.audit().violations);
    }

    #[test]
    fn a_group_fills_to_its_size_and_is_delivered_when_the_last_seat_pays() {
        let mut s = shard(10, 0);
        let (g, a) = changed(s.open_group(&terms(3), seat("a"), 0));
        let (_, b) = changed(s.join_group(g, seat("b"), 1));
        assert_eq!(s.join_group(g, seat("b"), 1), Err(DomainError::AlreadyInGroup));
        let (_, c) = changed(s.join_group(g, seat("c"), 2));
        assert_eq!(s.join_group(g, seat("d"), 3), Err(DomainError::GroupFull));
        assert_eq!(s.counts().reserved, 3, "every seat reserves its key at join");
        assert_eq!(paid(&mut s, a, "pa", 4), PaymentOutcome::AwaitingGroup);
        assert_eq!(paid(&mut s, c, "pc", 5), PaymentOutcome::AwaitingGroup);
        assert_eq!(s.order(a).unwrap().status, OrderStatus::Paid);
        assert!(s.stuck_paid(10).is_empty(), "paid seats of an open group are not stuck");
        assert!(s.audit().violations.is_empty(), "{:?}", s.audit().violations);
        assert_eq!(paid(&mut s, b, "pb", 6), PaymentOutcome::Delivered);
        assert_eq!(s.group(g).unwrap().state, GroupState::Completed { at_ms: 6 });
        for seq in [a, b, c] {
            let o = s.order(seq).unwrap();
            assert_eq!((o.status, o.keys.len(), o.delivered_at_ms), (OrderStatus::Delivered, 1, Some(6)));
            let id = o.payment_id.clone().unwrap();
            assert_eq!(s.payment("sandbox", &id).unwrap().outcome, PaymentOutcome::Delivered);
        }
        assert_eq!(
            s.counts(),
            Counts { imported: 10, available: 7, reserved: 0, sold: 3, orders: 3, ..Counts::default() }
        );
        assert!(matches!(s.join_group(g, seat("d"), 7), Err(DomainError::GroupClosed { .. })));
        // A repeated notification gets the recorded answer; nothing fails the group later.
        assert_eq!(s.pay(pay(a, "pa"), 8), Ok(Outcome::Repeat(PaymentOutcome::Delivered)));
        assert!(s.expire_due(1_000_000, 100).is_empty());
        assert!(s.audit().violations.is_empty(), "{:?}", s.audit().violations);
    }

    #[test]
    fn a_group_past_its_deadline_fails_once_refunding_paid_seats_and_releasing_every_key() {
        let mut s = shard(5, 0);
        // The journal from the start: the same five keys imported, then every step.
        let mut events = shard(0, 0).import_keys((0..5).map(|i| format!("K{i}")).collect()).0;
        let mut log = |o: Outcome<(u64, u64)>| match o {
            Outcome::Changed(e, ids) => {
                events.push(e);
                ids
            }
            Outcome::Repeat(_) => panic!("expected a change"),
        };
        let (g, a) = log(s.open_group(&terms(3), seat("a"), 0).unwrap());
        let (_, b) = log(s.join_group(g, seat("b"), 1).unwrap());
        let Outcome::Changed(e, PaymentOutcome::AwaitingGroup) = s.pay(pay(a, "pa"), 2).unwrap() else { panic!() };
        events.push(e);
        assert_eq!(s.next_expiry(), Some(10_000), "the deadline comes before the seats' own expiry");
        assert!(matches!(s.join_group(g, seat("c"), 10_000), Err(DomainError::GroupClosed { .. })));
        let failed = s.expire_due(10_000, 100);
        assert_eq!(failed.len(), 1, "one event fails the whole group: {failed:?}");
        events.extend(failed);
        assert_eq!(s.group(g).unwrap().state, GroupState::Failed { at_ms: 10_000 });
        assert_eq!(s.order(a).unwrap().status, OrderStatus::RefundPending);
        assert_eq!(s.order(b).unwrap().status, OrderStatus::Cancelled);
        assert_eq!(s.counts().available, 5, "every reservation released");
        let due = s.refunds_due(10);
        assert_eq!((due.len(), due[0].order_seq, due[0].amount_cents), (1, a, 500));
        // b pays after the failure: owed back too, never delivered at the group price.
        let Outcome::Changed(e, late) = s.pay(pay(b, "pb"), 10_001).unwrap() else { panic!() };
        events.push(e);
        assert_eq!(late, PaymentOutcome::RefundOwed(RefundReason::GroupFailed));
        assert_eq!(s.refunds_due(10).len(), 2);
        events.push(changed_event(s.complete_refund("sandbox", "pa", 10_002)));
        assert_eq!(s.order(a).unwrap().status, OrderStatus::Refunded);
        assert!(s.expire_due(1_000_000, 100).is_empty(), "a group fails once");
        assert!(s.audit().violations.is_empty(), "{:?}", s.audit().violations);
        check_rebuilds(&s, &events);
    }

    fn changed_event<T>(o: Result<Outcome<T>, DomainError>) -> Event {
        match o.unwrap() {
            Outcome::Changed(e, _) => e,
            Outcome::Repeat(_) => panic!("expected a change"),
        }
    }

    #[test]
    fn leaving_before_paying_frees_the_seat_and_a_late_payment_for_it_is_owed_back() {
        let mut s = shard(5, 0);
        let (g, a) = changed(s.open_group(&terms(2), seat("a"), 0));
        let (_, b) = changed(s.join_group(g, seat("b"), 1));
        assert_eq!(s.join_group(g, seat("c"), 2), Err(DomainError::GroupFull));
        s.cancel(b, 3).unwrap();
        let (_, c) = changed(s.join_group(g, seat("c"), 4));
        assert_eq!(paid(&mut s, b, "pb", 5), PaymentOutcome::RefundOwed(RefundReason::LeftGroup));
        assert_eq!(paid(&mut s, a, "pa", 6), PaymentOutcome::AwaitingGroup);
        assert_eq!(paid(&mut s, c, "pc", 7), PaymentOutcome::Delivered);
        assert_eq!(s.order(b).unwrap().status, OrderStatus::RefundPending);
        assert_eq!(s.counts().sold, 2);
        // The buyer who left may join again (another group: this one is complete).
        let (g2, _) = changed(s.open_group(&terms(2), seat("b"), 8));
        assert_ne!(g, g2);
        assert!(s.audit().violations.is_empty(), "{:?}", s.audit().violations);
    }

    #[test]
    fn a_buyer_who_left_a_group_twice_cannot_take_a_seat_in_it_again() {
        let mut s = shard(10, 0);
        let (g, _) = changed(s.open_group(&terms(4), seat("owner"), 0));
        for round in 0..MAX_LEAVES_PER_BUYER {
            let (_, taken) = changed(s.join_group(g, seat("churner"), 1));
            s.cancel(taken, 2).unwrap();
            assert_eq!(s.group(g).map(|grp| s.seats_open(grp)), Some(3), "round {round}");
        }
        assert_eq!(s.join_group(g, seat("churner"), 3), Err(DomainError::LeftTooOften));
        assert!(s.join_group(g, seat("honest"), 3).is_ok(), "others still join");
    }

    #[test]
    fn a_group_takes_a_bounded_number_of_joins_over_its_life() {
        let mut s = shard(5, 0);
        let (g, first) = changed(s.open_group(&terms(2), seat("a"), 0));
        s.cancel(first, 1).unwrap();
        for i in 1..2 * MAX_JOINS_PER_SEAT {
            let (_, seq) = changed(s.join_group(g, seat(&format!("b{i}")), 2));
            s.cancel(seq, 3).unwrap();
        }
        assert_eq!(s.seats(s.group(g).unwrap()), (0, 0), "every seat is free");
        assert_eq!(s.join_group(g, seat("late"), 4), Err(DomainError::GroupFull), "but the group took its joins");
        assert_eq!(s.open_groups_of("deal", 4, 10), Vec::<u64>::new(), "nor is it listed as open to join");
    }

    #[test]
    fn an_unpaid_seat_expires_with_the_order_ttl_and_frees_itself() {
        let mut s = shard(5, 0);
        let short = NewOrder { ttl_ms: 1_000, ..seat("a") };
        let (g, a) = changed(s.open_group(&terms(2), short, 0));
        assert_eq!(s.order(a).unwrap().expires_at_ms, 1_000);
        assert_eq!(s.expire_due(1_000, 10).len(), 1);
        assert_eq!(s.group(g).unwrap().state, GroupState::Open, "the group waits for its deadline");
        assert_eq!(s.seats(s.group(g).unwrap()), (0, 0));
        changed(s.join_group(g, seat("b"), 2_000));
        assert!(s.audit().violations.is_empty(), "{:?}", s.audit().violations);
    }

    #[test]
    fn join_any_fills_the_oldest_open_group_of_the_deal_first_then_opens_one() {
        let mut s = shard(10, 0);
        let (g1, _) = changed(s.open_group(&terms(2), seat("a"), 0));
        let other = GroupTerms { deal_id: "other".into(), ..terms(2) };
        let (g2, _) = changed(s.open_group(&other, seat("x"), 0));
        let (g3, _) = changed(s.open_group(&terms(3), seat("b"), 1));
        assert_eq!(changed(s.join_any(&terms(2), seat("c"), 2)).0, g1);
        assert_eq!(changed(s.join_any(&terms(2), seat("a"), 2)).0, g3, "g1 is full; a sits in g1 already anyway");
        let (g4, _) = changed(s.join_any(&terms(2), seat("b"), 2));
        assert!(g4 > g3, "b holds a seat in g3: a new group is opened for b");
        assert_eq!(changed(s.join_any(&other, seat("d"), 2)).0, g2);
        assert_eq!(s.group(g4).unwrap().size, 2, "opened with the terms given");
        assert_eq!(s.open_groups_of("deal", 2, 10), [g3, g4], "g1 is full, g3 has 2 of 3");
        assert_eq!(s.open_groups_of("deal", 2, 1), [g3], "oldest first, bounded");
        assert_eq!(s.open_groups_of("other", 2, 10), Vec::<u64>::new(), "g2 is full");
        assert_eq!(s.open_groups_of("deal", 20_000, 10), Vec::<u64>::new(), "past the deadline");
    }

    #[test]
    fn seats_of_a_short_lived_group_do_not_hide_older_orders_from_the_payment_sweep() {
        let mut s = shard(5, 0);
        let ordinary = NewOrder {
            buyer: "o".into(),
            quantity: 1,
            idempotency: None,
            query_token: "t".into(),
            ttl_ms: 60_000,
            password: None,
            coupon: None,
            reseller: None,
        };
        let Ok(Outcome::Changed(_, older)) = s.create_order(ordinary, 0) else { panic!() };
        let short = GroupTerms { time_limit_ms: 1_000, ..terms(2) };
        let (_, seat) = changed(s.open_group(&short, self::seat("a"), 10));
        s.expire_due(1_010, 10);
        assert_eq!(s.order(seat).unwrap().status, OrderStatus::Cancelled, "the failed group closed its seat");
        // Past the group's deadline + grace, the older order is still pending and
        // must still be asked about (as is the closed seat, within its own TTL + grace).
        let unheard: Vec<u64> = s.unheard(5_000, 100, 2_000, 10).into_iter().map(|u| u.order_seq).collect();
        assert_eq!(unheard, [seat, older]);
    }

    #[test]
    fn seats_count_toward_the_buyer_limit_and_need_stock() {
        let mut s = shard(1, 1);
        let (g, _) = changed(s.open_group(&terms(2), seat("a"), 0));
        assert!(matches!(s.join_group(g, seat("b"), 1), Err(DomainError::SoldOut { .. })));
        let mut s = shard(3, 1);
        changed(s.open_group(&terms(2), seat("a"), 0));
        assert!(matches!(s.open_group(&terms(2), seat("a"), 0), Err(DomainError::LimitExceeded { .. })));
    }

    #[test]
    fn an_idempotency_key_replays_the_same_seat() {
        let mut s = shard(5, 0);
        let idem = Idempotency { key: "k".into(), fingerprint: [1; 16] };
        let req = NewOrder { idempotency: Some(idem.clone()), ..seat("a") };
        let (g, a) = changed(s.open_group(&terms(2), req.clone(), 0));
        assert_eq!(s.open_group(&terms(2), req.clone(), 1), Ok(Outcome::Repeat((g, a))));
        assert_eq!(s.join_any(&terms(2), req, 1), Ok(Outcome::Repeat((g, a))));
        let other = NewOrder { idempotency: Some(Idempotency { fingerprint: [2; 16], ..idem }), ..seat("a") };
        assert_eq!(s.join_group(g, other, 1), Err(DomainError::IdempotencyKeyReused));
        assert_eq!(s.orders().len(), 1);
    }
}
