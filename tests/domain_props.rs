//! Property tests of the pure domain: no sequence of operations breaks I1 (no
//! oversell), I2 (no key delivered twice) or I6 (conservation), and replaying the
//! journaled events (or a snapshot plus the rest) rebuilds the same state.

use std::collections::HashSet;

use kami::domain::group::{GroupState, GroupTerms};
use kami::domain::points::PointsBook;
use kami::domain::shard::{NewOrder, Payment, Redemption, Withdrawal};
use kami::domain::Outcome;
use kami::domain::{Event, OrderStatus, ProductInfo, Shard};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Import(Vec<u8>),
    Order {
        buyer: u8,
        quantity: u32,
    },
    Pay {
        order: usize,
        payment: u8,
        right_amount: bool,
        paid: bool,
    },
    Cancel {
        order: usize,
    },
    /// Archive what has been settled for `min_age` ms, keeping idempotency keys `keep` ms.
    Archive {
        min_age: u64,
        keep: u64,
    },
    Advance {
        ms: u64,
    },
    Refund {
        nth: usize,
    },
    Redeem {
        buyer: u8,
        quantity: u32,
        redemption: u8,
    },
    OpenGroup {
        buyer: u8,
        size: u32,
    },
    JoinGroup {
        group: usize,
        buyer: u8,
    },
    JoinAny {
        buyer: u8,
        size: u32,
    },
    /// Every pending seat of a group pays (fresh payment ids).
    PaySeats {
        group: usize,
    },
    /// The merchant withdraws these keys (by name), or `count` keys.
    Withdraw {
        ids: Vec<u8>,
        count: u64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        prop::collection::vec(0u8..40, 0..8).prop_map(Op::Import),
        (0u8..6, 1u32..4).prop_map(|(buyer, quantity)| Op::Order { buyer, quantity }),
        (0usize..64, 0u8..24, prop::bool::weighted(0.9), prop::bool::weighted(0.9))
            .prop_map(|(order, payment, right_amount, paid)| Op::Pay { order, payment, right_amount, paid }),
        (0usize..64).prop_map(|order| Op::Cancel { order }),
        (0u64..3000, 0u64..5000).prop_map(|(min_age, keep)| Op::Archive { min_age, keep }),
        (0u64..3000).prop_map(|ms| Op::Advance { ms }),
        (0usize..8).prop_map(|nth| Op::Refund { nth }),
        (0u8..6, 1u32..3, 0u8..8).prop_map(|(buyer, quantity, redemption)| Op::Redeem { buyer, quantity, redemption }),
        (0u8..6, 2u32..4).prop_map(|(buyer, size)| Op::OpenGroup { buyer, size }),
        (0usize..16, 0u8..6).prop_map(|(group, buyer)| Op::JoinGroup { group, buyer }),
        (0u8..6, 2u32..4).prop_map(|(buyer, size)| Op::JoinAny { buyer, size }),
        (0usize..16).prop_map(|group| Op::PaySeats { group }),
        (prop::collection::vec(0u8..40, 0..4), 0u64..4).prop_map(|(ids, count)| Op::Withdraw { ids, count }),
    ]
}

fn check_invariants(s: &Shard) {
    let audit = s.audit();
    assert!(audit.violations.is_empty(), "{:?}", audit.violations);
    let c = s.counts();
    assert!(c.reserved + c.sold <= c.imported, "I1");
    assert_eq!(c.imported, c.available + c.reserved + c.sold + c.withdrawn, "I6");
    // I2 by key id: a reusable key's units show the same key, each sold once.
    let mut delivered = HashSet::new();
    for o in s.orders() {
        if o.status == OrderStatus::Delivered {
            for &k in &o.keys {
                assert!(delivered.insert(k), "I2: key {} delivered twice", s.key(k));
            }
        }
    }
}

/// Key `i` of the generated ones: from 30 on, a unit of one reusable key.
fn key_name(i: u8) -> String {
    if i < 30 {
        format!("key{i}")
    } else {
        kami::domain::key_mode::unit("SHARED", i.into())
    }
}

/// How a withdrawal names key `i`: a unit by its reusable key.
fn withdrawn_name(i: u8) -> String {
    if i < 30 {
        format!("key{i}")
    } else {
        "SHARED".into()
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]

    #[test]
    fn invariants_hold_and_replay_rebuilds_the_same_state(ops in prop::collection::vec(op(), 1..80), limit in 0u32..4) {
        let product = ProductInfo { id: "p".into(), name: "P".into(), price_cents: 7, per_buyer_limit: limit, shards: 1, created_at_ms: 0 };
        let mut s = Shard::new(product.clone(), 0);
        // Two or more keys at 5 each: such orders keep how they were priced.
        let tiers = vec![kami::domain::pricing::PriceTier { min_quantity: 2, unit_price_cents: 5 }];
        s.set_terms(&kami::domain::terms::Terms { tiers, ..kami::domain::terms::Terms::of(&product) });
        let mut journal: Vec<Event> = Vec::new();
        let mut now = 0u64;
        // A group's first end (completed or failed) must be its only one.
        let mut ended: std::collections::HashMap<u64, GroupState> = Default::default();
        let seat = |buyer: u8| NewOrder { buyer: format!("b{buyer}"), quantity: 1, idempotency: None, query_token: "t".into(), ttl_ms: 1500, password: None, coupon: None, reseller: None };
        let terms = |size: u32| GroupTerms { deal_id: format!("d{size}"), size, price_cents: 5, time_limit_ms: 2000 };
        for op in ops {
            match op {
                Op::Import(ids) => {
                    let (events, imported, dups) = s.import_keys(ids.iter().map(|&i| key_name(i)).collect());
                    prop_assert_eq!(imported + dups, ids.len() as u64);
                    journal.extend(events);
                }
                Op::Order { buyer, quantity } => {
                    let before = s.counts();
                    // Even buyers set a query password (theirs: [buyer; 32]).
                    let password = (buyer % 2 == 0).then_some([buyer; 32]);
                    let req = NewOrder { buyer: format!("b{buyer}"), quantity, idempotency: None, query_token: "t".into(), ttl_ms: 1000, password, coupon: None, reseller: None };
                    match s.create_order(req, now) {
                        Ok(Outcome::Changed(e, _)) => {
                            // The tier (2 or more) prices it, and the order keeps that.
                            let priced = matches!(&e, Event::OrderCreatedPriced { pricing, .. } if pricing.tier_min_quantity == Some(2));
                            prop_assert_eq!(priced, quantity >= 2);
                            journal.push(e);
                        }
                        Ok(Outcome::Repeat(_)) => prop_assert!(false, "no idempotency key, no repeat"),
                        Err(_) => prop_assert_eq!(before, s.counts(), "a refusal changes nothing"),
                    }
                }
                Op::Pay { order, payment, right_amount, paid } => {
                    let n = s.counts().orders as usize;
                    if n == 0 { continue; }
                    let seq = (order % n) as u64 + 1;
                    // (An archived order's payment is owed back, whatever its amount.)
                    let amount = s.order(seq).map_or(7, |o| o.amount_cents) + u64::from(!right_amount);
                    let p = Payment { order_seq: seq, payment_id: format!("pay{payment}"), channel: "c".into(), amount_cents: amount, status: if paid { "paid" } else { "failed" }.into() };
                    if let Ok(Outcome::Changed(e, _)) = s.pay(p, now) {
                        journal.push(e);
                    }
                }
                Op::Cancel { order } => {
                    let n = s.counts().orders as usize;
                    if n == 0 { continue; }
                    if let Ok(e) = s.cancel((order % n) as u64 + 1, now) {
                        journal.push(e);
                    }
                }
                Op::Archive { min_age, keep } => {
                    let before = s.counts();
                    let seqs = s.archivable(now, min_age, usize::MAX);
                    let n = seqs.len();
                    if let Some(e) = s.archive(seqs, now, keep) {
                        journal.push(e);
                    }
                    prop_assert_eq!(before, s.counts(), "archiving changes no count");
                    prop_assert!(n == 0 || s.archived().orders() >= n as u64);
                }
                Op::Withdraw { ids, count } => {
                    let before = s.counts();
                    let what = if ids.is_empty() {
                        Withdrawal::Count(count)
                    } else {
                        Withdrawal::Keys(ids.iter().map(|&i| withdrawn_name(i)).collect())
                    };
                    let (events, n, _) = s.withdraw(&what);
                    let after = s.counts();
                    prop_assert_eq!(after.available + n, before.available, "only available keys leave");
                    prop_assert_eq!((after.reserved, after.sold), (before.reserved, before.sold));
                    prop_assert_eq!(after.withdrawn, before.withdrawn + n);
                    journal.extend(events);
                }
                Op::Advance { ms } => {
                    now += ms;
                    journal.extend(s.expire_due(now, usize::MAX));
                }
                Op::Refund { nth } => {
                    let due = s.refunds_due(usize::MAX);
                    if due.is_empty() { continue; }
                    let (channel, id) = (due[nth % due.len()].channel.clone(), due[nth % due.len()].payment_id.clone());
                    let Ok(Outcome::Changed(e, ())) = s.complete_refund(&channel, &id, now) else { panic!("a due refund completes") };
                    journal.push(e);
                    prop_assert_eq!(s.complete_refund(&channel, &id, now), Ok(Outcome::Repeat(())), "a repeat changes nothing");
                    prop_assert!(s.refunds_due(usize::MAX).iter().all(|d| d.payment_id != id));
                }
                Op::OpenGroup { buyer, size } | Op::JoinAny { buyer, size } => {
                    let before = s.counts();
                    let step = match op {
                        Op::OpenGroup { .. } => s.open_group(&terms(size), seat(buyer), now),
                        _ => s.join_any(&terms(size), seat(buyer), now),
                    };
                    match step {
                        Ok(Outcome::Changed(e, _)) => journal.push(e),
                        Ok(Outcome::Repeat(_)) => prop_assert!(false, "no idempotency key, no repeat"),
                        Err(_) => prop_assert_eq!(before, s.counts(), "a refusal changes nothing"),
                    }
                }
                Op::JoinGroup { group, buyer } => {
                    let n = s.groups().len();
                    if n == 0 { continue; }
                    let before = s.counts();
                    match s.join_group((group % n) as u64 + 1, seat(buyer), now) {
                        Ok(Outcome::Changed(e, _)) => journal.push(e),
                        Ok(Outcome::Repeat(_)) => prop_assert!(false, "no idempotency key, no repeat"),
                        Err(_) => prop_assert_eq!(before, s.counts(), "a refusal changes nothing"),
                    }
                }
                Op::PaySeats { group } => {
                    let n = s.groups().len();
                    if n == 0 { continue; }
                    let g = s.groups()[group % n].clone();
                    for seq in g.orders {
                        let o = s.order(seq).unwrap();
                        if o.status != OrderStatus::PendingPayment { continue; }
                        let p = Payment { order_seq: seq, payment_id: format!("seat{seq}"), channel: "c".into(), amount_cents: o.amount_cents, status: "paid".into() };
                        let Ok(Outcome::Changed(e, _)) = s.pay(p, now) else { panic!("a fresh payment is applied") };
                        journal.push(e);
                    }
                }
                Op::Redeem { buyer, quantity, redemption } => {
                    let before = s.counts();
                    let r = Redemption { redemption: format!("r{redemption}"), buyer: format!("b{buyer}"), quantity, query_token: "t".into() };
                    match s.redeem(r, now) {
                        Ok(Outcome::Changed(e, seq)) => {
                            prop_assert_eq!(s.order(seq).unwrap().status, OrderStatus::Delivered);
                            prop_assert_eq!(s.counts().sold, before.sold + quantity as u64);
                            journal.push(e);
                        }
                        // The same redemption is its first order, whatever came since
                        // (archived by now, perhaps).
                        Ok(Outcome::Repeat(seq)) => match s.order(seq) {
                            Some(o) => prop_assert_eq!(
                                o.payment_id.clone(),
                                Some(kami::domain::shard::redeemed_payment_id(&format!("r{redemption}")))
                            ),
                            None => prop_assert!(s.is_archived(seq)),
                        },
                        Err(_) => prop_assert_eq!(before, s.counts(), "a refusal changes nothing"),
                    }
                }
            }
            check_invariants(&s);
            for g in s.groups() {
                prop_assert!(s.seats(g).0 <= g.size, "a group never exceeds its size");
                if g.state != GroupState::Open {
                    prop_assert_eq!(*ended.entry(g.seq).or_insert(g.state), g.state, "a group ends once");
                }
            }
        }
        // Replay from scratch.
        let mut replayed = Shard::new(product.clone(), 0);
        for e in &journal {
            replayed.apply(e);
        }
        prop_assert_eq!(replayed.orders(), s.orders());
        prop_assert_eq!(replayed.groups(), s.groups());
        prop_assert_eq!(replayed.counts(), s.counts());
        prop_assert_eq!(replayed.archived(), s.archived());
        // Snapshot half-way, then replay the rest.
        let half = journal.len() / 2;
        let mut first = Shard::new(product, 0);
        for e in &journal[..half] {
            first.apply(e);
        }
        let bytes = kami::storage::codec::encode(kami::storage::codec::Kind::Snapshot, &first);
        let mut restored: Shard = kami::storage::codec::decode(kami::storage::codec::Kind::Snapshot, &bytes).unwrap();
        restored.rebuild_indexes();
        for e in &journal[half..] {
            restored.apply(e);
        }
        prop_assert_eq!(restored.orders(), s.orders());
        prop_assert_eq!(restored.groups(), s.groups());
        prop_assert_eq!(restored.counts(), s.counts());
        prop_assert_eq!(restored.archived(), s.archived());
        prop_assert_eq!(restored.refunds_due(usize::MAX), s.refunds_due(usize::MAX));
        // Buyer lookup: the same orders open with the same password, live, replayed
        // and restored; each is the buyer's own and in memory.
        for buyer in 0..6u8 {
            let (name, password) = (format!("b{buyer}"), [buyer; 32]);
            let opened = s.orders_opened_by(&name, &password);
            prop_assert_eq!(&replayed.orders_opened_by(&name, &password), &opened);
            prop_assert_eq!(&restored.orders_opened_by(&name, &password), &opened);
            prop_assert!(opened.iter().all(|&q| s.order(q).is_some_and(|o| o.buyer == name)));
            prop_assert!(buyer % 2 == 0 || opened.is_empty());
            prop_assert!(s.orders_opened_by(&name, &[buyer.wrapping_add(1); 32]).is_empty());
        }
        // Pricing records: the same live, replayed and restored; a priced order
        // was priced by the tier.
        for o in s.orders() {
            prop_assert_eq!(replayed.pricing(o.seq), s.pricing(o.seq));
            prop_assert_eq!(restored.pricing(o.seq), s.pricing(o.seq));
            if let Some(p) = s.pricing(o.seq) {
                prop_assert_eq!((p.list_unit_cents, p.tier_min_quantity), (7, Some(2)));
                prop_assert_eq!(o.amount_cents, 5 * o.quantity as u64);
            }
        }
        check_invariants(&restored);
    }

    #[test]
    fn per_buyer_limit_is_never_exceeded_by_new_orders(quantities in prop::collection::vec((0u8..3, 1u32..4), 1..40), limit in 1u32..5) {
        let product = ProductInfo { id: "p".into(), name: "P".into(), price_cents: 1, per_buyer_limit: limit, shards: 1, created_at_ms: 0 };
        let mut s = Shard::new(product, 0);
        s.import_keys((0..200).map(|i| format!("k{i}")).collect());
        for (buyer, quantity) in quantities {
            let _ = s.create_order(NewOrder { buyer: format!("b{buyer}"), quantity, idempotency: None, query_token: "t".into(), ttl_ms: 1000, password: None, coupon: None, reseller: None }, 0);
            for b in 0..3 {
                let held: u32 = s.orders().iter().filter(|o| o.buyer == format!("b{b}")).map(|o| o.quantity).sum();
                prop_assert!(held <= limit, "buyer b{} holds {} > {}", b, held, limit);
            }
        }
    }
}

/// What can happen to the shards of one product while keys move between them.
#[derive(Debug, Clone)]
enum MultiOp {
    Import {
        shard: usize,
        keys: Vec<u8>,
    },
    Order {
        shard: usize,
        buyer: u8,
        quantity: u32,
    },
    Pay {
        shard: usize,
        order: usize,
    },
    Advance {
        ms: u64,
    },
    /// A lend whose transfer then waits in `in_flight` (a crash may strand it there).
    Lend {
        from: usize,
        to: usize,
        max: usize,
    },
    /// The borrower receives an in-flight transfer, possibly again (a resend).
    Receive {
        nth: usize,
        settle: bool,
    },
}

fn multi_op() -> impl Strategy<Value = MultiOp> {
    prop_oneof![
        (0usize..3, prop::collection::vec(0u8..60, 0..8)).prop_map(|(shard, keys)| MultiOp::Import { shard, keys }),
        (0usize..3, 0u8..6, 1u32..3).prop_map(|(shard, buyer, quantity)| MultiOp::Order { shard, buyer, quantity }),
        (0usize..3, 0usize..32).prop_map(|(shard, order)| MultiOp::Pay { shard, order }),
        (0u64..3000).prop_map(|ms| MultiOp::Advance { ms }),
        (0usize..3, 1usize..3, 1usize..6).prop_map(|(from, k, max)| MultiOp::Lend { from, to: (from + k) % 3, max }),
        (0usize..8, prop::bool::ANY).prop_map(|(nth, settle)| MultiOp::Receive { nth, settle }),
    ]
}

fn check_product(shards: &[Shard]) -> u64 {
    let audits: Vec<_> = shards.iter().map(|s| s.audit()).collect();
    for a in &audits {
        assert!(a.violations.is_empty(), "{:?}", a.violations);
    }
    let (in_transit, violation) = kami::domain::audit::audit_product(&audits);
    assert_eq!(violation, None);
    let mut live = HashSet::new();
    for s in shards {
        for k in s.key_strings() {
            assert!(live.insert(k.to_string()), "key {k} is in the stock of two shards");
        }
    }
    in_transit
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]

    /// Keys lent between shards are in exactly one shard's stock or in transit, a
    /// resent transfer is taken once, keys can come back to their first shard, and
    /// each shard's journal (or a snapshot plus its tail) rebuilds it.
    #[test]
    fn keys_moving_between_shards_are_conserved(ops in prop::collection::vec(multi_op(), 1..100)) {
        let product = ProductInfo { id: "p".into(), name: "P".into(), price_cents: 5, per_buyer_limit: 0, shards: 3, created_at_ms: 0 };
        let mut shards: Vec<Shard> = (0..3).map(|i| Shard::new(product.clone(), i)).collect();
        let mut journals: Vec<Vec<Event>> = vec![Vec::new(); 3];
        let mut in_flight = Vec::new();
        let mut now = 0u64;
        let mut payments = 0;
        for op in ops {
            match op {
                MultiOp::Import { shard, keys } => {
                    // Imports go to the key's own shard, as the registry routes them.
                    let keys: Vec<String> = keys.iter().filter(|k| **k as usize % 3 == shard).map(|&k| key_name(k)).collect();
                    let (events, _, _) = shards[shard].import_keys(keys);
                    journals[shard].extend(events);
                }
                MultiOp::Order { shard, buyer, quantity } => {
                    let req = NewOrder { buyer: format!("b{buyer}"), quantity, idempotency: None, query_token: "t".into(), ttl_ms: 1000, password: None, coupon: None, reseller: None };
                    if let Ok(Outcome::Changed(e, _)) = shards[shard].create_order(req, now) {
                        journals[shard].push(e);
                    }
                }
                MultiOp::Pay { shard, order } => {
                    let n = shards[shard].orders().len();
                    if n == 0 { continue; }
                    let seq = (order % n) as u64 + 1;
                    payments += 1;
                    let amount = shards[shard].order(seq).unwrap().amount_cents;
                    let p = Payment { order_seq: seq, payment_id: format!("pay{payments}"), channel: "c".into(), amount_cents: amount, status: "paid".into() };
                    if let Ok(Outcome::Changed(e, _)) = shards[shard].pay(p, now) {
                        journals[shard].push(e);
                    }
                }
                MultiOp::Advance { ms } => {
                    now += ms;
                    for (s, j) in shards.iter_mut().zip(journals.iter_mut()) {
                        j.extend(s.expire_due(now, usize::MAX));
                    }
                }
                MultiOp::Lend { from, to, max } => {
                    let available = shards[from].counts().available;
                    match shards[from].lend(to as u16, max) {
                        Some((e, t)) => {
                            prop_assert_eq!(t.keys.len() as u64, available.div_ceil(2).min(max as u64));
                            journals[from].push(e);
                            in_flight.push(t);
                        }
                        None => prop_assert_eq!(available, 0),
                    }
                }
                MultiOp::Receive { nth, settle } => {
                    if in_flight.is_empty() { continue; }
                    let t = in_flight[nth % in_flight.len()].clone();
                    let (from, to, transfer) = (t.from as usize, t.to as usize, t.transfer);
                    if let Outcome::Changed(e, ()) = shards[to].receive(t) {
                        journals[to].push(e);
                    }
                    if settle {
                        if let Outcome::Changed(e, ()) = shards[from].settle(transfer) {
                            journals[from].push(e);
                        }
                        in_flight.retain(|x| (x.from, x.transfer) != (from as u16, transfer));
                    }
                }
            }
            check_product(&shards);
        }
        // Recovery resends what is unsettled: afterwards nothing is in transit.
        for from in 0..3 {
            for t in shards[from].unsettled(usize::MAX) {
                let (to, transfer) = (t.to as usize, t.transfer);
                if let Outcome::Changed(e, ()) = shards[to].receive(t) {
                    journals[to].push(e);
                }
                let Outcome::Changed(e, ()) = shards[from].settle(transfer) else { panic!("was unsettled") };
                journals[from].push(e);
            }
        }
        prop_assert_eq!(check_product(&shards), 0);
        for (i, journal) in journals.iter().enumerate() {
            let mut replayed = Shard::new(product.clone(), i as u16);
            let half = journal.len() / 2;
            for e in &journal[..half] {
                replayed.apply(e);
            }
            let bytes = kami::storage::codec::encode(kami::storage::codec::Kind::Snapshot, &replayed);
            let mut restored = kami::storage::codec::decode_snapshot(&bytes).unwrap();
            restored.rebuild_indexes();
            for e in &journal[half..] {
                restored.apply(e);
            }
            prop_assert_eq!(restored.counts(), shards[i].counts());
            prop_assert_eq!(restored.orders(), shards[i].orders());
            prop_assert!(restored.audit().violations.is_empty());
        }
    }
}

#[derive(Debug, Clone)]
enum PointsOp {
    Adjust { buyer: u8, request: u8, delta: i64 },
    Hold { buyer: u8, redemption: u8, points: u64 },
    Settle { redemption: u8 },
    Release { redemption: u8 },
}

fn points_op() -> impl Strategy<Value = PointsOp> {
    prop_oneof![
        (0u8..4, 0u8..6, -300i64..300).prop_map(|(buyer, request, delta)| PointsOp::Adjust { buyer, request, delta }),
        (0u8..4, 0u8..10, 0u64..200).prop_map(|(buyer, redemption, points)| PointsOp::Hold {
            buyer,
            redemption,
            points
        }),
        (0u8..10).prop_map(|redemption| PointsOp::Settle { redemption }),
        (0u8..10).prop_map(|redemption| PointsOp::Release { redemption }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]

    /// A balance never goes below what is held, every balance equals its buyer's
    /// credits − debits − settled redemptions (a model kept beside the book), a
    /// settled redemption is never released, and replaying the ledger rebuilds it.
    #[test]
    fn points_balances_follow_their_ledger(ops in prop::collection::vec(points_op(), 1..120)) {
        let mut book = PointsBook::new();
        let mut ledger = Vec::new();
        // Model: buyer → balance; redemption → (buyer, points, settled).
        let mut model = std::collections::HashMap::<String, i64>::new();
        let mut redemptions = std::collections::HashMap::<String, (String, u64, bool)>::new();
        for (t, op) in ops.into_iter().enumerate() {
            let now = t as u64;
            match op {
                PointsOp::Adjust { buyer, request, delta } => {
                    if delta == 0 { continue; }
                    let b = format!("b{buyer}");
                    if let Ok(Outcome::Changed(e, _)) = book.adjust(&format!("q{request}"), &b, delta, "", now) {
                        *model.entry(b).or_default() += delta;
                        ledger.push(e);
                    }
                }
                PointsOp::Hold { buyer, redemption, points } => {
                    let (b, r) = (format!("b{buyer}"), format!("r{redemption}"));
                    if let Ok(Outcome::Changed(e, _)) = book.hold(&r, &b, points, "p", 1, now) {
                        redemptions.insert(r, (b, points, false));
                        ledger.push(e);
                    }
                }
                PointsOp::Settle { redemption } => {
                    let r = format!("r{redemption}");
                    if let Ok(Outcome::Changed(e, _)) = book.settle(&r, "o", now) {
                        let (b, points, settled) = redemptions.get_mut(&r).expect("settled a held redemption");
                        prop_assert!(!*settled);
                        *settled = true;
                        *model.entry(b.clone()).or_default() -= *points as i64;
                        ledger.push(e);
                    }
                }
                PointsOp::Release { redemption } => {
                    let r = format!("r{redemption}");
                    match book.release(&r, "x", now) {
                        Ok(Outcome::Changed(e, _)) => {
                            let (_, _, settled) = redemptions.remove(&r).expect("released a held redemption");
                            prop_assert!(!settled, "a settled redemption is never released");
                            ledger.push(e);
                        }
                        Ok(Outcome::Repeat(())) => prop_assert!(!redemptions.contains_key(&r)),
                        Err(_) => prop_assert!(redemptions[&r].2, "only a settled redemption refuses release"),
                    }
                }
            }
            for buyer in 0..4 {
                let b = format!("b{buyer}");
                let balance = book.balance(&b);
                let held: u64 = redemptions.values().filter(|(x, _, s)| *x == b && !s).map(|(_, p, _)| p).sum();
                prop_assert_eq!(balance.balance as i64, model.get(&b).copied().unwrap_or(0));
                prop_assert_eq!(balance.held, held);
                prop_assert!(balance.held <= balance.balance);
            }
        }
        prop_assert!(book.audit().violations.is_empty());
        let mut replayed = PointsBook::new();
        for e in &ledger {
            replayed.apply(e);
        }
        for buyer in 0..4 {
            let b = format!("b{buyer}");
            prop_assert_eq!(replayed.balance(&b), book.balance(&b));
            prop_assert_eq!(replayed.statement(&b, 1000), book.statement(&b, 1000));
        }
        prop_assert_eq!(replayed.holds(100), book.holds(100));
    }
}
