//! Points: the balances of the buyers one points shard owns, and its ledger.
//!
//! The ledger is append-only: every change is a [`PointsEvent`], journaled before it
//! is acknowledged, and a balance is nothing but the sum of its buyer's events
//! ([`PointsBook::audit`] recomputes it).
//!
//! A redemption spends points of one buyer (here) and delivers keys of one product
//! (in a stock shard): two journals, so it is a saga of three journaled steps, each
//! idempotent by its redemption id:
//! 1. `Held` here: the points leave the available balance (never below zero);
//! 2. the stock shard journals the delivered order (`OrderRedeemed`), or refuses;
//! 3. `Settled` here (the points are spent) or `Released` (they come back).
//!
//! A hold is settled only after the order is durable and released only after the
//! stock shard refused for good, so no key goes without points and no points without
//! a key. A crash between the steps leaves a hold that the core resolves by asking the
//! stock shard again (step 2 is idempotent) until it settles or releases.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use super::{DomainError, Millis};

/// A journaled change of one points shard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PointsEvent {
    /// A merchant's credit (`delta > 0`) or debit, once per `request_id`.
    Adjusted { request_id: String, buyer: String, delta: i64, note: String, at_ms: Millis },
    /// Saga step 1: `points` put aside for redemption `redemption`.
    Held { redemption: String, buyer: String, points: u64, product_id: String, quantity: u32, at_ms: Millis },
    /// Saga step 3, success: the order is durable; the held points are spent.
    Settled { redemption: String, order_id: String, at_ms: Millis },
    /// Saga step 3, failure: the stock shard refused; the held points come back.
    Released { redemption: String, reason: String, at_ms: Millis },
}

/// A redemption waiting for its stock shard's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hold {
    pub redemption: String,
    pub buyer: String,
    pub points: u64,
    pub product_id: String,
    pub quantity: u32,
    pub at_ms: Millis,
}

/// Where a redemption stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RedemptionState {
    Held(Hold),
    Settled { order_id: String, points: u64 },
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Balance {
    /// Credits − debits − points spent.
    pub balance: u64,
    /// Points put aside for redemptions in flight.
    pub held: u64,
}

impl Balance {
    /// What a debit or a new redemption may take.
    pub fn available(&self) -> u64 {
        self.balance - self.held
    }
}

/// One ledger line as a buyer's statement shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Entry {
    /// Position in this shard's ledger (journal sequence).
    pub seq: u64,
    /// One of [`ENTRY_KINDS`].
    pub kind: &'static str,
    /// Change of the balance (`held` and `released` change only what is available).
    pub delta: i64,
    pub balance_after: u64,
    pub held_after: u64,
    /// The request id (adjustments) or the redemption id.
    pub reference: String,
    pub order_id: Option<String>,
    pub at_ms: Millis,
}

/// What a ledger line can be.
pub const ENTRY_KINDS: [&str; 4] = ["credit", "debit", "held", "redeemed"];

/// An [`Entry`] as read back (from another cluster node), its kind any string.
#[derive(Deserialize)]
struct EntryRead {
    seq: u64,
    kind: String,
    delta: i64,
    balance_after: u64,
    held_after: u64,
    reference: String,
    order_id: Option<String>,
    at_ms: Millis,
}

impl<'de> Deserialize<'de> for Entry {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Entry, D::Error> {
        Entry::try_from(EntryRead::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

impl TryFrom<EntryRead> for Entry {
    type Error = String;
    fn try_from(e: EntryRead) -> Result<Entry, String> {
        let kind = ENTRY_KINDS.iter().find(|k| **k == e.kind).ok_or(format!("no ledger line kind {:?}", e.kind))?;
        Ok(Entry {
            seq: e.seq,
            kind,
            delta: e.delta,
            balance_after: e.balance_after,
            held_after: e.held_after,
            reference: e.reference,
            order_id: e.order_id,
            at_ms: e.at_ms,
        })
    }
}

/// A points shard's state; also its snapshot (bincode, in the storage envelope).
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct PointsBook {
    /// Events applied so far: the journal sequence of the last one.
    applied: u64,
    /// The ledger lines that changed something, by journal sequence. A redemption
    /// the stock shard refused changed nothing: its `held` line is dropped when it
    /// is released, and the release leaves no line (its two journal records go
    /// with the next snapshot), so refusals cannot grow a buyer's statement.
    ledger: BTreeMap<u64, PointsEvent>,
    balances: HashMap<String, Balance>,
    /// Ledger positions of each buyer's events.
    by_buyer: HashMap<String, Vec<u64>>,
    /// Adjustments by (buyer, request id): (fingerprint of the request, ledger seq).
    /// Request ids are scoped per buyer: "welcome" may credit every buyer once.
    requests: HashMap<(String, String), (AdjustFingerprint, u64)>,
    /// Redemptions held or settled (a released one is forgotten: a retry runs anew).
    redemptions: HashMap<String, RedemptionState>,
    /// Holds by redemption id, for the resolver.
    holds: BTreeMap<String, ()>,
}

type AdjustFingerprint = (i64, String);

/// What a points command did (see [`crate::domain::Outcome`]).
pub type Outcome<T> = crate::domain::Outcome<PointsEvent, T>;

impl PointsBook {
    pub fn new() -> PointsBook {
        PointsBook::default()
    }

    pub fn balance(&self, buyer: &str) -> Balance {
        self.balances.get(buyer).copied().unwrap_or_default()
    }

    /// Journal records applied (the sequence of the last one).
    pub fn len(&self) -> u64 {
        self.applied
    }

    pub fn is_empty(&self) -> bool {
        self.applied == 0
    }

    /// Ledger lines kept in memory.
    pub fn lines(&self) -> usize {
        self.ledger.len()
    }

    pub fn redemption(&self, redemption: &str) -> Option<&RedemptionState> {
        self.redemptions.get(redemption)
    }

    /// Holds still waiting for their stock shard, oldest first, at most `limit`.
    pub fn holds(&self, limit: usize) -> Vec<Hold> {
        let mut holds: Vec<Hold> = self
            .holds
            .keys()
            .filter_map(|r| match self.redemptions.get(r) {
                Some(RedemptionState::Held(h)) => Some(h.clone()),
                _ => None,
            })
            .collect();
        holds.sort_by_key(|h| h.at_ms);
        holds.truncate(limit);
        holds
    }

    // ---- commands: decide, apply, return the event to journal ----

    pub fn adjust(
        &mut self,
        request_id: &str,
        buyer: &str,
        delta: i64,
        note: &str,
        now_ms: Millis,
    ) -> Result<Outcome<Balance>, DomainError> {
        let fingerprint = (delta, note.to_string());
        if let Some((seen, _)) = self.requests.get(&(buyer.to_string(), request_id.to_string())) {
            return if *seen == fingerprint {
                Ok(Outcome::Repeat(self.balance(buyer)))
            } else {
                Err(DomainError::RequestIdReused)
            };
        }
        let b = self.balance(buyer);
        if delta < 0 && delta.unsigned_abs() > b.available() {
            return Err(DomainError::InsufficientPoints { needed: delta.unsigned_abs(), available: b.available() });
        }
        if delta > 0 && b.balance.checked_add(delta as u64).is_none() {
            return Err(DomainError::PointsOverflow);
        }
        let event = PointsEvent::Adjusted {
            request_id: request_id.to_string(),
            buyer: buyer.to_string(),
            delta,
            note: note.to_string(),
            at_ms: now_ms,
        };
        self.apply(&event);
        Ok(Outcome::Changed(event, self.balance(buyer)))
    }

    /// Saga step 1. A redemption already held or settled is a repeat.
    pub fn hold(
        &mut self,
        redemption: &str,
        buyer: &str,
        points: u64,
        product_id: &str,
        quantity: u32,
        now_ms: Millis,
    ) -> Result<Outcome<RedemptionState>, DomainError> {
        if let Some(state) = self.redemptions.get(redemption) {
            return Ok(Outcome::Repeat(state.clone()));
        }
        let available = self.balance(buyer).available();
        if points > available {
            return Err(DomainError::InsufficientPoints { needed: points, available });
        }
        let event = PointsEvent::Held {
            redemption: redemption.to_string(),
            buyer: buyer.to_string(),
            points,
            product_id: product_id.to_string(),
            quantity,
            at_ms: now_ms,
        };
        self.apply(&event);
        Ok(Outcome::Changed(event, self.redemptions[redemption].clone()))
    }

    /// Saga step 3, success. Settling a settled redemption is a repeat.
    pub fn settle(&mut self, redemption: &str, order_id: &str, now_ms: Millis) -> Result<Outcome<()>, DomainError> {
        match self.redemptions.get(redemption) {
            Some(RedemptionState::Held(_)) => {
                let event = PointsEvent::Settled {
                    redemption: redemption.to_string(),
                    order_id: order_id.to_string(),
                    at_ms: now_ms,
                };
                self.apply(&event);
                Ok(Outcome::Changed(event, ()))
            }
            Some(RedemptionState::Settled { .. }) => Ok(Outcome::Repeat(())),
            None => Err(DomainError::RedemptionNotFound),
        }
    }

    /// Saga step 3, failure: the points come back. Only a held redemption can be
    /// released; a settled one never (its key was delivered).
    pub fn release(&mut self, redemption: &str, reason: &str, now_ms: Millis) -> Result<Outcome<()>, DomainError> {
        match self.redemptions.get(redemption) {
            Some(RedemptionState::Held(_)) => {
                let event = PointsEvent::Released {
                    redemption: redemption.to_string(),
                    reason: reason.to_string(),
                    at_ms: now_ms,
                };
                self.apply(&event);
                Ok(Outcome::Changed(event, ()))
            }
            Some(RedemptionState::Settled { .. }) => Err(DomainError::RedemptionSettled),
            None => Ok(Outcome::Repeat(())),
        }
    }

    // ---- the only mutator ----

    /// Applies one event. Panics if it does not fit the state (a corrupt journal).
    pub fn apply(&mut self, event: &PointsEvent) {
        self.applied += 1;
        let seq = self.applied;
        let buyer = match event {
            PointsEvent::Adjusted { request_id, buyer, delta, note, .. } => {
                let b = self.balances.entry(buyer.clone()).or_default();
                if *delta >= 0 {
                    b.balance = b.balance.checked_add(*delta as u64).expect("balance overflow in journal");
                } else {
                    assert!(delta.unsigned_abs() <= b.available(), "debit past the available balance");
                    b.balance -= delta.unsigned_abs();
                }
                let fingerprint = (*delta, note.clone());
                let request = (buyer.clone(), request_id.clone());
                assert!(self.requests.insert(request, (fingerprint, seq)).is_none(), "request applied twice");
                buyer.clone()
            }
            PointsEvent::Held { redemption, buyer, points, product_id, quantity, at_ms } => {
                let b = self.balances.entry(buyer.clone()).or_default();
                assert!(*points <= b.available(), "hold past the available balance");
                b.held += points;
                let hold = Hold {
                    redemption: redemption.clone(),
                    buyer: buyer.clone(),
                    points: *points,
                    product_id: product_id.clone(),
                    quantity: *quantity,
                    at_ms: *at_ms,
                };
                let before = self.redemptions.insert(redemption.clone(), RedemptionState::Held(hold));
                assert!(before.is_none(), "redemption held twice");
                self.holds.insert(redemption.clone(), ());
                buyer.clone()
            }
            PointsEvent::Settled { redemption, order_id, .. }
            | PointsEvent::Released { redemption, reason: order_id, .. } => {
                let Some(RedemptionState::Held(hold)) = self.redemptions.remove(redemption) else {
                    panic!("settling or releasing a redemption that is not held")
                };
                self.holds.remove(redemption);
                let b = self.balances.get_mut(&hold.buyer).expect("held points have an account");
                b.held -= hold.points;
                if matches!(event, PointsEvent::Settled { .. }) {
                    b.balance -= hold.points;
                    let settled = RedemptionState::Settled { order_id: order_id.clone(), points: hold.points };
                    self.redemptions.insert(redemption.clone(), settled);
                } else {
                    // Released: the hold changed nothing in the end; neither line stays.
                    let seqs = self.by_buyer.get_mut(&hold.buyer).expect("a hold has its line");
                    let at = seqs
                        .iter()
                        .rposition(|s| {
                            matches!(self.ledger.get(s), Some(PointsEvent::Held { redemption: r, .. }) if r == redemption)
                        })
                        .expect("a hold has its line");
                    let held_seq = seqs.remove(at);
                    self.ledger.remove(&held_seq);
                    if seqs.is_empty() {
                        self.by_buyer.remove(&hold.buyer);
                    }
                    if self.balances.get(&hold.buyer).is_some_and(|b| *b == Balance::default())
                        && !self.by_buyer.contains_key(&hold.buyer)
                    {
                        self.balances.remove(&hold.buyer);
                    }
                    return;
                }
                hold.buyer
            }
        };
        self.by_buyer.entry(buyer).or_default().push(seq);
        self.ledger.insert(seq, event.clone());
    }

    /// A buyer's statement, newest last: at most `limit` entries ending at the newest.
    pub fn statement(&self, buyer: &str, limit: usize) -> Vec<Entry> {
        let Some(seqs) = self.by_buyer.get(buyer) else { return Vec::new() };
        let mut b = Balance::default();
        let mut held_points: HashMap<&str, u64> = HashMap::new();
        let mut out = Vec::with_capacity(seqs.len().min(limit));
        for &seq in seqs {
            let (kind, delta, reference, order_id, at_ms) = match &self.ledger[&seq] {
                PointsEvent::Adjusted { request_id, delta, at_ms, .. } => {
                    b.balance = (b.balance as i64 + delta) as u64;
                    (if *delta >= 0 { "credit" } else { "debit" }, *delta, request_id, None, *at_ms)
                }
                PointsEvent::Held { redemption, points, at_ms, .. } => {
                    b.held += points;
                    held_points.insert(redemption, *points);
                    ("held", 0, redemption, None, *at_ms)
                }
                PointsEvent::Settled { redemption, order_id, at_ms } => {
                    let points = held_points.remove(redemption.as_str()).unwrap_or(0);
                    b.held -= points;
                    b.balance -= points;
                    ("redeemed", -(points as i64), redemption, Some(order_id.clone()), *at_ms)
                }
                PointsEvent::Released { .. } => unreachable!("a release leaves no ledger line"),
            };
            out.push(Entry {
                seq,
                kind,
                delta,
                balance_after: b.balance,
                held_after: b.held,
                reference: reference.clone(),
                order_id,
                at_ms,
            });
        }
        let skip = out.len().saturating_sub(limit);
        out.drain(..skip);
        out
    }

    /// Recomputes every balance from the ledger and compares it with the one kept.
    pub fn audit(&self) -> PointsAudit {
        let mut recount = PointsBook::new();
        for event in self.ledger.values() {
            recount.apply(event);
        }
        let mut violations = Vec::new();
        for (buyer, kept) in &self.balances {
            if recount.balance(buyer) != *kept {
                violations.push(format!("points of {buyer}: kept {kept:?}, ledger says {:?}", recount.balance(buyer)));
            }
        }
        let (mut settled, mut settled_quantity) = (0u64, BTreeMap::<String, u64>::new());
        let mut held: HashMap<&str, (&str, u32)> = HashMap::new();
        for event in self.ledger.values() {
            match event {
                PointsEvent::Held { redemption, product_id, quantity, .. } => {
                    held.insert(redemption, (product_id, *quantity));
                }
                PointsEvent::Settled { redemption, .. } => {
                    settled += 1;
                    let (product, quantity) = held.remove(redemption.as_str()).expect("settled after held");
                    *settled_quantity.entry(product.to_string()).or_default() += quantity as u64;
                }
                PointsEvent::Released { redemption, .. } => {
                    held.remove(redemption.as_str());
                }
                PointsEvent::Adjusted { .. } => {}
            }
        }
        let mut held_quantity = BTreeMap::<String, u64>::new();
        for hold in self.holds(usize::MAX) {
            *held_quantity.entry(hold.product_id).or_default() += hold.quantity as u64;
        }
        PointsAudit {
            buyers: self.balances.len() as u64,
            total_balance: self.balances.values().map(|b| b.balance).sum(),
            total_held: self.balances.values().map(|b| b.held).sum(),
            redemptions_settled: settled,
            settled_quantity,
            held_quantity,
            violations,
        }
    }
}

/// The audit of one points shard.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PointsAudit {
    pub buyers: u64,
    pub total_balance: u64,
    pub total_held: u64,
    pub redemptions_settled: u64,
    /// Keys per product paid for by settled redemptions.
    pub settled_quantity: BTreeMap<String, u64>,
    /// Keys per product of redemptions still held (in flight).
    pub held_quantity: BTreeMap<String, u64>,
    pub violations: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn changed<T>(s: Result<Outcome<T>, DomainError>) -> T {
        match s.unwrap() {
            Outcome::Changed(_, v) => v,
            Outcome::Repeat(_) => panic!("expected a change"),
        }
    }

    #[test]
    fn credits_and_debits_are_idempotent_and_never_go_below_zero() {
        let mut p = PointsBook::new();
        assert_eq!(changed(p.adjust("r1", "alice", 500, "welcome", 1)).balance, 500);
        assert!(matches!(p.adjust("r1", "alice", 500, "welcome", 2), Ok(Outcome::Repeat(b)) if b.balance == 500));
        assert_eq!(p.adjust("r1", "alice", 600, "welcome", 2), Err(DomainError::RequestIdReused));
        assert_eq!(
            p.adjust("r2", "alice", -501, "", 3),
            Err(DomainError::InsufficientPoints { needed: 501, available: 500 })
        );
        assert_eq!(changed(p.adjust("r3", "alice", -200, "", 4)).balance, 300);
        assert_eq!(changed(p.adjust("r1", "bob", 70, "welcome", 5)).balance, 70, "request ids are per buyer");
        assert_eq!(p.len(), 3, "refusals and repeats journal nothing");
    }

    #[test]
    fn a_redemption_holds_then_settles_or_releases() {
        let mut p = PointsBook::new();
        changed(p.adjust("r1", "bob", 300, "", 1));
        changed(p.hold("x", "bob", 200, "game", 2, 2));
        assert_eq!(p.balance("bob"), Balance { balance: 300, held: 200 });
        assert_eq!(
            p.hold("y", "bob", 200, "game", 2, 3),
            Err(DomainError::InsufficientPoints { needed: 200, available: 100 })
        );
        assert_eq!(
            p.adjust("r2", "bob", -150, "", 3),
            Err(DomainError::InsufficientPoints { needed: 150, available: 100 })
        );
        assert!(matches!(p.hold("x", "bob", 200, "game", 2, 3), Ok(Outcome::Repeat(RedemptionState::Held(_)))));
        assert_eq!(p.holds(10).len(), 1);
        changed(p.settle("x", "game:0:1", 4));
        assert_eq!(p.balance("bob"), Balance { balance: 100, held: 0 });
        assert_eq!(p.settle("x", "game:0:1", 5), Ok(Outcome::Repeat(())));
        assert_eq!(p.release("x", "late", 5), Err(DomainError::RedemptionSettled));
        changed(p.hold("z", "bob", 100, "game", 1, 6));
        changed(p.release("z", "sold_out", 7));
        assert_eq!(p.balance("bob"), Balance { balance: 100, held: 0 });
        assert!(p.holds(10).is_empty());
        // A released redemption is forgotten: a retry under the same id runs anew.
        changed(p.hold("z", "bob", 100, "game", 1, 8));
        let kinds: Vec<_> = p.statement("bob", 100).iter().map(|e| (e.kind, e.delta, e.balance_after)).collect();
        assert_eq!(kinds, [("credit", 300, 300), ("held", 0, 300), ("redeemed", -200, 100), ("held", 0, 100)]);
        assert_eq!(p.len(), 6, "every event counts toward the journal position");
        assert_eq!(p.lines(), 4, "the released hold left no line");
        assert_eq!(p.statement("bob", 2).len(), 2);
        let audit = p.audit();
        assert!(audit.violations.is_empty(), "{:?}", audit.violations);
        assert_eq!(audit.settled_quantity.get("game"), Some(&2));
        assert_eq!(audit.held_quantity.get("game"), Some(&1));
    }

    #[test]
    fn replaying_the_ledger_rebuilds_the_book() {
        let mut p = PointsBook::new();
        changed(p.adjust("r1", "a", 1000, "", 1));
        changed(p.hold("h1", "a", 300, "g", 3, 2));
        changed(p.settle("h1", "g:0:1", 3));
        changed(p.hold("h2", "a", 100, "g", 1, 4));
        let mut replay = PointsBook::new();
        for e in p.ledger.values() {
            replay.apply(e);
        }
        assert_eq!(replay.balance("a"), p.balance("a"));
        assert_eq!(replay.holds(10), p.holds(10));
        assert_eq!(replay.statement("a", 10), p.statement("a", 10));
    }
}
