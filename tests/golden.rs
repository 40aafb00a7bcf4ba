//! Records written by every released format version must still decode. The files in
//! `tests/golden/v<N>/` were written by format version N: the current version's are
//! compared byte for byte with today's encoding; older ones are only decoded. Write
//! the current version's files only when adding that version
//! (`KAMI_WRITE_GOLDEN=1 cargo test --test golden`), never to make a failing test pass.

use std::path::PathBuf;

use kami::domain::group::{Group, GroupState, GroupTerms};
use kami::domain::shard::{
    ArchivedOrder, Idempotency, KeyId, NewOrder, Outcome, OutgoingTransfer, Payment, PaymentOutcome, PaymentRecord,
    RefundReason, Withdrawal,
};
use kami::domain::{Event, Order, OrderStatus, ProductInfo, Shard};
use kami::storage::codec::{decode, decode_archived, decode_snapshot, decode_terms, encode, Kind, FORMAT_VERSION};

fn product() -> ProductInfo {
    ProductInfo {
        id: "golden".into(),
        name: "金卡 Gold".into(),
        price_cents: 990,
        per_buyer_limit: 2,
        shards: 1,
        created_at_ms: 1_700_000_000_000,
    }
}

fn order() -> Order {
    Order {
        seq: 1,
        buyer: "alice@example.com".into(),
        quantity: 1,
        amount_cents: 990,
        created_at_ms: 1_700_000_000_100,
        expires_at_ms: 1_700_000_300_100,
        paid_at_ms: None,
        delivered_at_ms: None,
        closed_at_ms: None,
        status: OrderStatus::PendingPayment,
        keys: vec![0 as KeyId],
        query_token: "00112233445566778899aabbccddeeff".into(),
        idempotency: Some(Idempotency { key: "idem-1".into(), fingerprint: [7; 16] }),
        payment_id: None,
        amount_mismatch: false,
    }
}

fn events() -> Vec<Event> {
    vec![
        Event::KeysImported { keys: vec!["KEY-AAAA".into(), "KEY-BBBB".into()] },
        Event::OrderCreated { order: order() },
        Event::PaymentApplied {
            record: PaymentRecord {
                payment_id: "pay-1".into(),
                order_seq: 1,
                channel: "sandbox".into(),
                amount_cents: 990,
                status: "paid".into(),
                at_ms: 1_700_000_000_200,
                outcome: PaymentOutcome::Delivered,
            },
            taken_keys: vec![],
        },
        Event::OrderExpired { seq: 2, at_ms: 5 },
        Event::OrderCancelled { seq: 3, at_ms: 6 },
        Event::PaymentApplied {
            record: PaymentRecord {
                payment_id: "pay-2".into(),
                order_seq: 1,
                channel: "sandbox".into(),
                amount_cents: 990,
                status: "paid".into(),
                at_ms: 7,
                outcome: PaymentOutcome::RefundOwed(RefundReason::AlreadyPaid),
            },
            taken_keys: vec![1],
        },
    ]
}

/// Version 2 adds the refund of a payment (and keys payments by channel).
fn events_v2() -> Vec<Event> {
    let mut events = events();
    events.push(Event::RefundCompleted { channel: "sandbox".into(), payment_id: "pay-2".into(), at_ms: 8 });
    events
}

/// Version 3 adds keys moving between the shards of a product.
fn events_v3() -> Vec<Event> {
    let mut events = events_v2();
    events.extend([
        Event::KeysLent { transfer: 0, to: 1, keys: vec![1] },
        Event::KeysReceived { from: 1, transfer: 4, keys: vec!["KEY-CCCC".into()] },
        Event::TransferSettled { transfer: 0 },
    ]);
    events
}

/// Version 4 adds group-buy: groups in the snapshot, group events, a payment
/// awaiting its group and the refund of a failed group.
fn events_v4() -> Vec<Event> {
    let mut events = events_v3();
    let group = Group {
        seq: 1,
        deal_id: "duo".into(),
        size: 2,
        price_cents: 700,
        opened_by: "alice@example.com".into(),
        opened_at_ms: 10,
        deadline_ms: 60_010,
        orders: vec![4],
        state: GroupState::Open,
    };
    let seat = |seq: u64, buyer: &str| Order { seq, buyer: buyer.into(), amount_cents: 700, ..order() };
    events.extend([
        Event::GroupOpened { group, order: seat(4, "alice@example.com") },
        Event::GroupJoined { group: 1, order: seat(5, "bob") },
        Event::PaymentApplied {
            record: PaymentRecord {
                payment_id: "pay-3".into(),
                order_seq: 4,
                channel: "sandbox".into(),
                amount_cents: 700,
                status: "paid".into(),
                at_ms: 11,
                outcome: PaymentOutcome::AwaitingGroup,
            },
            taken_keys: vec![],
        },
        Event::PaymentApplied {
            record: PaymentRecord {
                payment_id: "pay-4".into(),
                order_seq: 6,
                channel: "sandbox".into(),
                amount_cents: 700,
                status: "paid".into(),
                at_ms: 12,
                outcome: PaymentOutcome::RefundOwed(RefundReason::LeftGroup),
            },
            taken_keys: vec![],
        },
        Event::GroupFailed { group: 1, at_ms: 60_010 },
    ]);
    events
}

/// Version 5 adds the archive: orders leave memory, and a payment for an archived
/// order is owed back.
fn events_v5() -> Vec<Event> {
    let mut events = events_v4();
    events.extend([
        Event::OrdersArchived { seqs: vec![2, 3], at_ms: 4_000_000, keep_keys_ms: 90_000_000 },
        Event::PaymentApplied {
            record: PaymentRecord {
                payment_id: "pay-5".into(),
                order_seq: 2,
                channel: "sandbox".into(),
                amount_cents: 990,
                status: "paid".into(),
                at_ms: 4_000_001,
                outcome: PaymentOutcome::RefundOwed(RefundReason::OrderArchived),
            },
            taken_keys: vec![],
        },
    ]);
    events
}

/// Version 6 adds the merchant's withdrawal of keys.
fn events_v6() -> Vec<Event> {
    let mut events = events_v5();
    events.push(Event::KeysWithdrawn { keys: vec![4, 5] });
    events
}

/// Version 7 adds orders created with a query password.
fn events_v7() -> Vec<Event> {
    let mut events = events_v6();
    events.push(Event::OrderCreatedWithPassword { order: Order { seq: 7, ..order() }, password: [5; 32] });
    events
}

/// A new order of `quantity` for `buyer`, with nothing else set (a fixed token).
fn new_order(buyer: &str, quantity: u32) -> NewOrder {
    NewOrder {
        buyer: buyer.into(),
        quantity,
        idempotency: None,
        query_token: "00112233445566778899aabbccddeeff".into(),
        ttl_ms: 300_000,
        password: None,
        coupon: None,
        reseller: None,
    }
}

/// The v6 shard with an order created with a query password (its sequence too).
fn snapshot_v7() -> (Shard, Vec<ArchivedOrder>, u64) {
    let (mut s, records) = snapshot_v6();
    let req = NewOrder { password: Some([5; 32]), ..new_order("g", 1) };
    let seq = match s.create_order(req, 4_000_100).unwrap() {
        Outcome::Changed(Event::OrderCreatedWithPassword { order, .. }, seq) if order.seq == seq => seq,
        other => panic!("expected a new order with its password: {other:?}"),
    };
    (s, records, seq)
}

/// The v5 shard with one key withdrawn.
fn snapshot_v6() -> (Shard, Vec<ArchivedOrder>) {
    let (mut s, records) = snapshot_v5();
    let (events, n, _) = s.withdraw(&Withdrawal::Count(1));
    assert_eq!((events.len(), n), (1, 1));
    (s, records)
}

/// The v4 shard, then two plain orders (one delivered, one expired) archived.
fn snapshot_v5() -> (Shard, Vec<ArchivedOrder>) {
    let mut s = snapshot_v4();
    let new = |buyer: &str, key: &str| NewOrder {
        idempotency: Some(Idempotency { key: key.into(), fingerprint: [9; 16] }),
        ..new_order(buyer, 1)
    };
    let seq = |o: Outcome<u64>| match o {
        Outcome::Changed(_, seq) => seq,
        Outcome::Repeat(_) => panic!("expected a new order"),
    };
    let paid = seq(s.create_order(new("e", "k-e"), 80_000).unwrap());
    let lapsed = seq(s.create_order(new("f", "k-f"), 80_000).unwrap());
    let payment = Payment {
        order_seq: paid,
        payment_id: "p-e".into(),
        channel: "sandbox".into(),
        amount_cents: 990,
        status: "paid".into(),
    };
    s.pay(payment, 80_001).unwrap();
    s.expire_due(380_000, 10);
    let seqs = s.archivable(4_000_000, 3_600_000, 10);
    assert_eq!(seqs, [paid, lapsed], "the two plain orders, not the group seats");
    let records = seqs.iter().map(|&q| s.archive_record(q).unwrap()).collect();
    s.archive(seqs, 4_000_000, 90_000_000);
    (s, records)
}

/// One completed group, one failed with a refund owed, one open with a paid seat.
fn snapshot_v4() -> Shard {
    let mut s = Shard::new(product(), 0);
    s.import_keys((0..6).map(|i| format!("KEY-{i}")).collect());
    let terms = GroupTerms { deal_id: "duo".into(), size: 2, price_cents: 700, time_limit_ms: 60_000 };
    let seat = |buyer: &str| new_order(buyer, 1);
    let pay = |seq: u64, id: &str| Payment {
        order_seq: seq,
        payment_id: id.into(),
        channel: "sandbox".into(),
        amount_cents: 700,
        status: "paid".into(),
    };
    let ids = |o: Outcome<(u64, u64)>| match o {
        Outcome::Changed(_, ids) => ids,
        Outcome::Repeat(_) => panic!("expected a new seat"),
    };
    let (g1, a) = ids(s.open_group(&terms, seat("a"), 0).unwrap());
    let (_, b) = ids(s.join_group(g1, seat("b"), 1).unwrap());
    s.pay(pay(a, "p-a"), 2).unwrap();
    s.pay(pay(b, "p-b"), 3).unwrap();
    let (_, d) = ids(s.open_group(&terms, seat("d"), 4).unwrap());
    s.pay(pay(d, "p-d"), 5).unwrap();
    s.expire_due(60_004, 10);
    let (_, c) = ids(s.open_group(&terms, seat("c"), 70_000).unwrap());
    s.pay(pay(c, "p-c"), 70_001).unwrap();
    s
}

fn snapshot() -> Shard {
    let mut s = Shard::new(product(), 0);
    for e in &events()[..3] {
        s.apply(e);
    }
    s
}

/// A shard of a two-shard product with a transfer out (unsettled) and one in.
fn snapshot_v3() -> Shard {
    let mut s = Shard::new(ProductInfo { shards: 2, ..product() }, 0);
    s.import_keys(vec!["KEY-AAAA".into(), "KEY-BBBB".into(), "KEY-DDDD".into()]);
    s.lend(1, 1).expect("keys to lend");
    let incoming = OutgoingTransfer { from: 1, transfer: 4, to: 0, keys: vec!["KEY-CCCC".into()] };
    assert!(matches!(s.receive(incoming), Outcome::Changed(..)));
    s
}

fn dir(version: u8) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("tests/golden/v{version}"))
}

/// The current version's file, checked against today's encoding.
fn check(name: &str, fresh: Vec<u8>) -> Vec<u8> {
    assert_eq!(FORMAT_VERSION, 11, "a new format version needs its golden files and tests");
    let path = dir(FORMAT_VERSION).join(name);
    if std::env::var_os("KAMI_WRITE_GOLDEN").is_some() {
        std::fs::create_dir_all(dir(FORMAT_VERSION)).unwrap();
        std::fs::write(&path, &fresh).unwrap();
    }
    let stored = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(
        stored, fresh,
        "{name}: today's encoding differs from format v11; bump FORMAT_VERSION and keep a decoder"
    );
    stored
}

/// As [`check`], for a snapshot with several payments: they are a hash map, so two
/// encodings of the same state may order them differently. The stored file must
/// have today's length (same layout) and decode to the same state (checked by the caller).
fn check_unordered(name: &str, fresh: Vec<u8>) -> Vec<u8> {
    let path = dir(FORMAT_VERSION).join(name);
    if std::env::var_os("KAMI_WRITE_GOLDEN").is_some() {
        std::fs::create_dir_all(dir(FORMAT_VERSION)).unwrap();
        std::fs::write(&path, &fresh).unwrap();
    }
    let stored = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(stored.len(), fresh.len(), "{name}: today's encoding differs from format v11 in length");
    stored
}

fn old(version: u8, name: &str) -> Vec<u8> {
    let path = dir(version).join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn decode_events(stored: &[u8]) -> Vec<Event> {
    let records: Vec<Vec<u8>> = serde_json::from_slice(stored).unwrap();
    records.iter().map(|r| decode(Kind::Event, r).unwrap()).collect()
}

#[test]
fn v1_events_decode() {
    assert_eq!(decode_events(&old(1, "events.bin")), events());
}

/// Versions 1 and 2 wrote the same snapshot layout (no transfers).
fn old_product_and_snapshot_decode(version: u8) {
    assert_eq!(decode::<ProductInfo>(Kind::Product, &old(version, "product.bin")).unwrap(), product());
    let mut s = decode_snapshot(&old(version, "snapshot.bin")).unwrap();
    s.rebuild_indexes();
    assert_eq!(s.orders(), snapshot().orders());
    assert_eq!(s.counts(), snapshot().counts());
    // v1 keyed payments by id alone; rebuilt, they are found by channel and id.
    assert!(s.payment("sandbox", "pay-1").is_some());
    assert!(s.audit().violations.is_empty(), "{:?}", s.audit());
}

#[test]
fn v1_product_and_snapshot_decode() {
    old_product_and_snapshot_decode(1);
}

#[test]
fn v2_events_decode() {
    assert_eq!(decode_events(&old(2, "events.bin")), events_v2());
}

#[test]
fn v2_product_and_snapshot_decode() {
    old_product_and_snapshot_decode(2);
}

#[test]
fn v3_events_decode() {
    assert_eq!(decode_events(&old(3, "events.bin")), events_v3());
}

#[test]
fn v3_product_and_snapshot_decode() {
    assert_eq!(decode::<ProductInfo>(Kind::Product, &old(3, "product.bin")).unwrap(), product());
    let stored = old(3, "snapshot.bin");
    let mut s = decode_snapshot(&stored).unwrap();
    s.rebuild_indexes();
    let want = snapshot_v3();
    assert_eq!(s.counts(), want.counts());
    assert_eq!(s.unsettled(10), want.unsettled(10));
    assert_eq!(
        s.key_strings().collect::<Vec<_>>(),
        ["KEY-AAAA", "KEY-BBBB", "KEY-CCCC"],
        "KEY-DDDD was lent from the back"
    );
    let audit = s.audit();
    assert!(audit.violations.is_empty(), "{:?}", audit.violations);
    assert_eq!((audit.imported, audit.available, audit.unsettled.len()), (3, 3, 1));
}

#[test]
fn v4_events_decode() {
    assert_eq!(decode_events(&old(4, "events.bin")), events_v4());
}

#[test]
fn v4_product_and_snapshot_decode() {
    assert_eq!(decode::<ProductInfo>(Kind::Product, &old(4, "product.bin")).unwrap(), product());
    let stored = old(4, "snapshot.bin");
    let mut s = decode_snapshot(&stored).unwrap();
    s.rebuild_indexes();
    let want = snapshot_v4();
    assert_eq!(s.groups(), want.groups());
    assert_eq!(s.orders(), want.orders());
    assert_eq!(s.counts(), want.counts());
    let mut payments: Vec<_> = s.payments().cloned().collect();
    let mut wanted: Vec<_> = want.payments().cloned().collect();
    payments.sort_by(|a, b| a.payment_id.cmp(&b.payment_id));
    wanted.sort_by(|a, b| a.payment_id.cmp(&b.payment_id));
    assert_eq!(payments, wanted);
    let states: Vec<&str> = s.groups().iter().map(|g| g.state.as_str()).collect();
    assert_eq!(states, ["completed", "failed", "open"]);
    assert_eq!(s.refunds_due(10).len(), 1, "the failed group's paid seat is owed its refund");
    assert_eq!(s.next_expiry(), want.next_expiry(), "the open group's deadline is back in the heap");
    let audit = s.audit();
    assert!(audit.violations.is_empty(), "{:?}", audit.violations);
    assert_eq!((audit.sold, audit.reserved, audit.available), (2, 1, 3));
}

#[test]
fn v5_events_decode() {
    assert_eq!(decode_events(&old(5, "events.bin")), events_v5());
}

/// A v5 snapshot (nothing withdrawn then) decodes through its own layout.
#[test]
fn v5_product_snapshot_and_archive_decode() {
    assert_eq!(decode::<ProductInfo>(Kind::Product, &old(5, "product.bin")).unwrap(), product());
    let (want, records) = snapshot_v5();
    let mut s = decode_snapshot(&old(5, "snapshot.bin")).unwrap();
    s.rebuild_indexes();
    assert_eq!(s.orders(), want.orders());
    assert_eq!(s.counts(), want.counts());
    assert_eq!(s.archived(), want.archived());
    assert_eq!(s.counts().withdrawn, 0);
    assert!(s.audit().violations.is_empty(), "{:?}", s.audit().violations);
    for (i, record) in records.iter().enumerate() {
        let stored = old(5, &format!("archived-{i}.bin"));
        assert_eq!(&decode_archived(&stored).unwrap(), record);
    }
}

/// Terms of sale (a kind added within v5: no earlier record changed).
#[test]
fn v5_terms_decode() {
    assert_eq!(decode_terms(&old(5, "terms.bin")).unwrap(), terms());
}

fn terms() -> kami::domain::terms::Terms {
    kami::domain::terms::Terms {
        name: "Renamed".into(),
        price_cents: 750,
        per_buyer_limit: 3,
        sale_starts_at_ms: Some(1_780_000_000_000),
        sale_ends_at_ms: None,
        tiers: Vec::new(),
    }
}

/// Terms with quantity tiers (v8).
fn terms_v8() -> kami::domain::terms::Terms {
    use kami::domain::pricing::PriceTier;
    kami::domain::terms::Terms {
        tiers: vec![
            PriceTier { min_quantity: 10, unit_price_cents: 700 },
            PriceTier { min_quantity: 100, unit_price_cents: 650 },
        ],
        ..terms()
    }
}

#[test]
fn v6_events_decode() {
    assert_eq!(decode_events(&old(6, "events.bin")), events_v6());
}

/// A v6 snapshot (no query passwords then) decodes through its own layout.
#[test]
fn v6_product_snapshot_archive_and_terms_decode() {
    assert_eq!(decode::<ProductInfo>(Kind::Product, &old(6, "product.bin")).unwrap(), product());
    let (want, records) = snapshot_v6();
    let mut s = decode_snapshot(&old(6, "snapshot.bin")).unwrap();
    s.rebuild_indexes();
    assert_eq!(s.orders(), want.orders());
    assert_eq!(s.counts(), want.counts());
    assert_eq!(s.archived(), want.archived());
    assert_eq!(s.counts().withdrawn, 1);
    let audit = s.audit();
    assert!(audit.violations.is_empty(), "{:?}", audit.violations);
    assert_eq!(audit.withdrawn, 1);
    for (i, record) in records.iter().enumerate() {
        assert_eq!(&decode_archived(&old(6, &format!("archived-{i}.bin"))).unwrap(), record);
    }
    assert_eq!(decode_terms(&old(6, "terms.bin")).unwrap(), terms());
}

#[test]
fn v7_events_decode() {
    assert_eq!(decode_events(&old(7, "events.bin")), events_v7());
}

#[test]
fn v8_events_decode() {
    assert_eq!(decode_events(&old(8, "events.bin")), events_v7());
}

/// v7 and v8 wrote the same snapshot and archive layouts (no pricing records),
/// decoded through their own; v7 terms have no tiers, v8 terms do.
fn v7_layout_decodes(version: u8, terms: kami::domain::terms::Terms) {
    assert_eq!(decode::<ProductInfo>(Kind::Product, &old(version, "product.bin")).unwrap(), product());
    let (want, records, seq) = snapshot_v7();
    let mut s = decode_snapshot(&old(version, "snapshot.bin")).unwrap();
    s.rebuild_indexes();
    assert_eq!(s.orders(), want.orders());
    assert_eq!(s.counts(), want.counts());
    assert_eq!(s.password(seq), Some(&[5; 32]));
    assert!(s.audit().violations.is_empty());
    for (i, record) in records.iter().enumerate() {
        assert_eq!(&decode_archived(&old(version, &format!("archived-{i}.bin"))).unwrap(), record);
    }
    assert_eq!(decode_terms(&old(version, "terms.bin")).unwrap(), terms);
}

#[test]
fn v7_product_snapshot_archive_and_terms_decode() {
    v7_layout_decodes(7, terms());
}

#[test]
fn v8_product_snapshot_archive_and_terms_decode() {
    v7_layout_decodes(8, terms_v8());
}

fn pricing_v9() -> kami::domain::pricing::OrderPricing {
    kami::domain::pricing::OrderPricing {
        list_unit_cents: 750,
        tier_min_quantity: Some(2),
        reseller: None,
        coupon: None,
        discount_cents: 0,
    }
}

fn events_v9() -> Vec<Event> {
    let mut events = events_v7();
    let order = Order { seq: 8, quantity: 2, amount_cents: 1400, keys: vec![3, 4], ..order() };
    events.push(Event::OrderCreatedPriced { order: order.clone(), password: None, pricing: pricing_v9() });
    events.push(Event::OrderCreatedPriced {
        order: Order { seq: 9, ..order },
        password: Some([6; 32]),
        pricing: pricing_v9(),
    });
    events
}

/// The v7 shard with two more keys and a tier (2 or more at 700 each), then an
/// order of 2 priced by it; and an archived order with its pricing record.
fn snapshot_v9() -> (Shard, Vec<ArchivedOrder>, u64, u64) {
    let (mut s, mut records, password_seq) = snapshot_v7();
    s.import_keys(vec!["KEY-V9-1".into(), "KEY-V9-2".into()]);
    s.set_terms(&kami::domain::terms::Terms {
        tiers: vec![kami::domain::pricing::PriceTier { min_quantity: 2, unit_price_cents: 700 }],
        sale_starts_at_ms: None,
        ..terms()
    });
    let req = new_order("h", 2);
    let seq = match s.create_order(req, 4_000_200).unwrap() {
        Outcome::Changed(Event::OrderCreatedPriced { order, pricing, .. }, seq) if order.seq == seq => {
            assert_eq!((order.amount_cents, pricing.tier_min_quantity), (1400, Some(2)));
            seq
        }
        other => panic!("expected an order priced by its tier: {other:?}"),
    };
    records.push(ArchivedOrder { pricing: Some(pricing_v9()), ..records[0].clone() });
    (s, records, password_seq, seq)
}

/// A stored file of an earlier version.
fn stored(version: u8, name: &str) -> Vec<u8> {
    let path = dir(version).join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn v9_events_decode() {
    assert_eq!(decode_events(&stored(9, "events.bin")), events_v9());
}

#[test]
fn v9_product_snapshot_archive_and_terms_decode() {
    check_product_snapshot_archive_and_terms(|name, _fresh| stored(9, name), &snapshot_v9());
}

/// The product, snapshot, archived orders and terms read by `read(name, fresh)`
/// decode to `want` (v9 and v10 share these layouts).
fn check_product_snapshot_archive_and_terms(
    read: impl Fn(&str, Vec<u8>) -> Vec<u8>,
    (want, records, password_seq, priced): &(Shard, Vec<ArchivedOrder>, u64, u64),
) {
    let stored = read("product.bin", encode(Kind::Product, &product()));
    assert_eq!(decode::<ProductInfo>(Kind::Product, &stored).unwrap(), product());
    let stored = read("snapshot.bin", encode(Kind::Snapshot, want));
    let mut s = decode_snapshot(&stored).unwrap();
    s.rebuild_indexes();
    assert_eq!(s.orders(), want.orders());
    assert_eq!(s.counts(), want.counts());
    assert_eq!(s.archived(), want.archived());
    assert_eq!(s.password(*password_seq), Some(&[5; 32]));
    assert_eq!(s.pricing(*priced), want.pricing(*priced));
    assert_eq!(s.pricing(*priced).map(|p| p.list_unit_cents), Some(750));
    let audit = s.audit();
    assert!(audit.violations.is_empty(), "{:?}", audit.violations);
    for (i, record) in records.iter().enumerate() {
        let stored = read(&format!("archived-{i}.bin"), encode(Kind::ArchivedOrder, record));
        assert_eq!(&decode_archived(&stored).unwrap(), record);
    }
    let stored = read("terms.bin", encode(Kind::Terms, &terms_v8()));
    assert_eq!(decode_terms(&stored).unwrap(), terms_v8());
}

fn coupon_ref() -> kami::domain::pricing::CouponRef {
    kami::domain::pricing::CouponRef { code: "SPRING-10".into(), hold: "0123456789abcdef".into() }
}

/// v9's events, an order priced with a coupon, and the late payment of such an
/// order owed back (`CouponReturned`).
fn events_v10() -> Vec<Event> {
    let mut events = events_v9();
    let pricing =
        kami::domain::pricing::OrderPricing { coupon: Some(coupon_ref()), discount_cents: 100, ..pricing_v9() };
    let order = Order { seq: 10, quantity: 2, amount_cents: 1300, keys: vec![], ..order() };
    events.push(Event::OrderCreatedPriced { order, password: None, pricing });
    events.push(Event::PaymentApplied {
        record: PaymentRecord {
            payment_id: "pay-late".into(),
            order_seq: 10,
            channel: "sandbox".into(),
            amount_cents: 1300,
            status: "paid".into(),
            at_ms: 4_000_900,
            outcome: PaymentOutcome::RefundOwed(RefundReason::CouponReturned),
        },
        taken_keys: vec![],
    });
    events
}

/// A coupon shard's book: one coupon with a hold in flight and a use spent.
fn coupon_book() -> kami::domain::coupon::CouponBook {
    use kami::domain::coupon::*;
    let mut b = CouponBook::new();
    let spec = CouponSpec {
        code: "SPRING-10".into(),
        kind: CouponKind::Percent,
        value: 10,
        max_uses: 100,
        per_buyer_max: 1,
        products: vec!["golden".into()],
        min_amount_cents: 500,
        starts_at_ms: Some(1_000),
        ends_at_ms: None,
    };
    b.create(spec, 2_000).unwrap();
    for (hold, buyer) in [("h1", "alice"), ("h2", "bob")] {
        let h = CouponHold {
            hold: hold.into(),
            code: "SPRING-10".into(),
            buyer: buyer.into(),
            product_id: "golden".into(),
            idempotency_key: format!("coupon:{hold}"),
            at_ms: 0,
        };
        b.hold(h, 3_000).unwrap();
    }
    b.finish("h1", Finish::Used { order_id: "golden.0-1".into() }, 4_000).unwrap();
    b
}

#[test]
fn v10_events_decode() {
    assert_eq!(decode_events(&stored(10, "events.bin")), events_v10());
}

fn coupon_pricing() -> kami::domain::pricing::OrderPricing {
    kami::domain::pricing::OrderPricing { coupon: Some(coupon_ref()), discount_cents: 100, ..pricing_v9() }
}

#[test]
fn v10_product_snapshot_archive_terms_and_coupon_book_decode() {
    let (want, mut records, password_seq, priced) = snapshot_v9();
    records.push(ArchivedOrder { pricing: Some(coupon_pricing()), ..records[0].clone() });
    let read = |name: &str, _fresh: Vec<u8>| stored(10, name);
    check_product_snapshot_archive_and_terms(read, &(want.clone(), records, password_seq, priced));
    let decoded: kami::domain::coupon::CouponBook = decode(Kind::CouponSnapshot, &stored(10, "coupons.bin")).unwrap();
    assert_eq!(decoded, coupon_book());
    assert!(decoded.audit().violations.is_empty());
}

/// A v10 snapshot did not count its archived coupon orders: storage recounts them
/// from the shard's archive (orders archived as of the snapshot only).
#[test]
fn a_v10_snapshot_has_its_archived_coupon_orders_recounted_from_the_archive() {
    let dir = tempfile::tempdir().unwrap();
    let storage = kami::storage::Storage::open(&kami::storage::StorageOptions {
        path: dir.path().join("data"),
        cache_capacity_bytes: 8 << 20,
        max_pending_commits: 1,
        max_commit_batch: 1,
        commit_linger: std::time::Duration::ZERO,
        commit_busy_linger: std::time::Duration::ZERO,
    })
    .unwrap();
    let snapshot = stored(10, "snapshot.bin");
    let shard = decode_snapshot(&snapshot).unwrap();
    let id = kami::domain::ShardId::new(product().id, 0);
    storage.write_snapshot_raw(&id, 1, &snapshot).unwrap();
    // One delivered coupon order archived before the snapshot, one order still in
    // memory (its archive record written, its archiving not journaled), one not
    // delivered.
    let archived_seq = (1..=shard.orders_created()).find(|&s| shard.order(s).is_none()).expect("an archived order");
    let live_seq = shard.orders().first().expect("an order in memory").seq;
    let delivered = |seq| ArchivedOrder {
        order: Order { seq, status: OrderStatus::Delivered, ..order() },
        keys: vec![],
        pricing: Some(coupon_pricing()),
    };
    let mut expired = delivered(archived_seq + 1_000);
    expired.order.status = OrderStatus::Expired;
    let records = [delivered(archived_seq), delivered(live_seq), expired];
    storage.archive_orders(&id, &records, &[None, None, None]).unwrap();
    let recovered = storage.inspect(&id, &product()).unwrap();
    let counted: Vec<(&str, u64)> = recovered.shard.archived_coupons().iter().map(|(c, &n)| (c.as_str(), n)).collect();
    assert_eq!(counted, [("SPRING-10", 1)]);
}

#[test]
fn v11_events_decode() {
    let fresh = serde_json::to_vec(&events_v10().iter().map(|e| encode(Kind::Event, e)).collect::<Vec<_>>()).unwrap();
    assert_eq!(decode_events(&check("events.bin", fresh)), events_v10());
}

/// The v9 shard with an order priced with a coupon, paid, delivered and archived:
/// the snapshot counts it.
fn snapshot_v11() -> (Shard, Vec<ArchivedOrder>, u64, u64) {
    let (mut s, mut records, password_seq, priced) = snapshot_v9();
    s.import_keys(vec!["KEY-V11-1".into()]);
    let coupon = kami::domain::coupon::CouponUse {
        code: "SPRING-10".into(),
        hold: "0123456789abcdef".into(),
        kind: kami::domain::coupon::CouponKind::Amount,
        value: 100,
        min_amount_cents: 0,
        deadline_ms: u64::MAX,
    };
    let req = NewOrder { coupon: Some(coupon), ..new_order("k", 1) };
    let Outcome::Changed(_, seq) = s.create_order(req, 4_000_300).unwrap() else { panic!("a new order") };
    let amount = s.order(seq).unwrap().amount_cents;
    let payment = Payment {
        order_seq: seq,
        payment_id: "pay-coupon".into(),
        channel: "sandbox".into(),
        amount_cents: amount,
        status: "paid".into(),
    };
    s.pay(payment, 4_000_400).unwrap();
    assert_eq!(s.order(seq).unwrap().status, OrderStatus::Delivered);
    s.archive(vec![seq], 4_000_500, 0).expect("archived");
    assert_eq!(s.archived_coupons().get("SPRING-10"), Some(&1));
    records.push(ArchivedOrder { pricing: Some(coupon_pricing()), ..records[0].clone() });
    (s, records, password_seq, priced)
}

#[test]
fn v11_product_snapshot_archive_terms_and_coupon_book_decode() {
    let (want, records, password_seq, priced) = snapshot_v11();
    let snapshot = check_unordered("snapshot.bin", encode(Kind::Snapshot, &want));
    let read = |name: &str, fresh: Vec<u8>| if name == "snapshot.bin" { snapshot.clone() } else { check(name, fresh) };
    check_product_snapshot_archive_and_terms(read, &(want.clone(), records, password_seq, priced));
    let decoded = decode_snapshot(&snapshot).unwrap();
    assert_eq!(decoded.archived_coupons(), want.archived_coupons());
    assert_eq!(decoded.audit().coupon_delivered.get("SPRING-10"), Some(&1));
    let book = coupon_book();
    let stored = check_unordered("coupons.bin", encode(Kind::CouponSnapshot, &book));
    let decoded: kami::domain::coupon::CouponBook = decode(Kind::CouponSnapshot, &stored).unwrap();
    assert_eq!(decoded, book);
}
