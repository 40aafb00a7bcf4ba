//! The audit, aggregated. Every shard recounts itself ([`Shard::audit`](super::Shard::audit))
//! and every points shard its ledger; [`Auditor`] adds what no single shard can see:
//! stock conservation over a product's shards (keys lent and not yet received are
//! "in transit"), no key in two shards of a product, no payment id recorded by two
//! shards of any products, and the keys delivered by redemptions against the
//! points ledgers. The live audit (`GET /api/v1/admin/audit`) and the offline one
//! (`kami audit --data`) both report through it, so they cannot drift apart.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use serde::Serialize;

use super::points::PointsAudit;
use super::OrderStatus;

/// One shard's recount of itself.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ShardAudit {
    pub imported: u64,
    pub available: u64,
    pub reserved: u64,
    pub sold: u64,
    /// Keys the merchant took out of stock.
    pub withdrawn: u64,
    pub orders: BTreeMap<OrderStatus, u64>,
    pub violations: Vec<String>,
    /// For the product-wide check ([`audit_product`]): this shard's index, its
    /// unsettled outgoing transfers `(transfer, to, keys)` and the transfers it received.
    #[serde(skip)]
    pub shard: u16,
    #[serde(skip)]
    pub unsettled: Vec<(u64, u16, u64)>,
    #[serde(skip)]
    pub received: BTreeSet<(u16, u64)>,
    /// Keys delivered by redemptions (paid with points), for the points cross-check.
    #[serde(skip)]
    pub redeemed: u64,
    /// Delivered orders that used a coupon, by code, for the coupons cross-check.
    #[serde(skip)]
    pub coupon_delivered: BTreeMap<String, u64>,
    /// Orders archived (out of memory) and still in memory.
    pub archived_orders: u64,
    pub live_orders: u64,
    /// A digest of every payment this shard recorded, for the process-wide check.
    #[serde(skip)]
    pub payment_ids: Vec<u128>,
    /// A digest of every key in this shard's stock (lent keys left out), for the
    /// product-wide check that no key is in two shards.
    #[serde(skip)]
    pub key_digests: Vec<u128>,
}

/// 128 bits of SHA-256 of `s` (a payment key, an order id): what the audit and the
/// process-wide payment claims compare.
pub fn digest128(s: &str) -> u128 {
    use sha2::Digest;
    u128::from_be_bytes(sha2::Sha256::digest(s.as_bytes())[..16].try_into().expect("16 bytes"))
}

/// A cheap 128-bit digest of a key string (two salted SipHash hashes), for comparing
/// every key of a product's shards without copying the keys. Stable within one
/// process, which is all one audit needs.
pub fn key_digest(key: &str) -> u128 {
    use std::hash::{Hash, Hasher};
    let half = |salt: u8| {
        let mut h = std::hash::DefaultHasher::new();
        salt.hash(&mut h);
        key.hash(&mut h);
        h.finish()
    };
    (u128::from(half(1)) << 64) | u128::from(half(2))
}

/// The product-wide half of the stock audit: a key lent by one shard is in the
/// borrower's stock once received, and "in transit" before. Returns the keys in
/// transit and a violation if Σ imported ≠ Σ (available + reserved + sold +
/// withdrawn) + in transit.
pub fn audit_product(shards: &[ShardAudit]) -> (u64, Option<String>) {
    let received: HashSet<(u16, u16, u64)> =
        shards.iter().flat_map(|a| a.received.iter().map(move |&(from, t)| (a.shard, from, t))).collect();
    let in_transit: u64 = shards
        .iter()
        .flat_map(|a| a.unsettled.iter().map(move |&(t, to, n)| (a.shard, t, to, n)))
        .filter(|&(from, t, to, _)| !received.contains(&(to, from, t)))
        .map(|(_, _, _, n)| n)
        .sum();
    let imported: u64 = shards.iter().map(|a| a.imported).sum();
    let placed: u64 = shards.iter().map(|a| a.available + a.reserved + a.sold + a.withdrawn).sum();
    let violation = (imported != placed + in_transit).then(|| {
        format!("product conservation broken: imported {imported} != in stock {placed} + in transit {in_transit}")
    });
    (in_transit, violation)
}

/// One product's stock over its shards.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ProductAudit {
    pub id: String,
    pub imported: u64,
    pub available: u64,
    pub reserved: u64,
    pub sold: u64,
    /// Keys the merchant took out of stock.
    pub withdrawn: u64,
    /// Keys lent by one shard to another and not yet received.
    pub in_transit: u64,
    /// Keys delivered by redemptions (paid with points).
    #[serde(skip)]
    pub redeemed: u64,
    /// Orders still in the shards' memory, and those moved to the archive.
    pub orders_in_memory: u64,
    pub orders_archived: u64,
    /// Orders over the product's shards (any status).
    #[serde(skip)]
    pub orders: u64,
}

impl ProductAudit {
    fn add(&mut self, shard: &ShardAudit) {
        self.orders_in_memory += shard.live_orders;
        self.orders_archived += shard.archived_orders;
        self.imported += shard.imported;
        self.available += shard.available;
        self.reserved += shard.reserved;
        self.sold += shard.sold;
        self.withdrawn += shard.withdrawn;
        self.redeemed += shard.redeemed;
        self.orders += shard.orders.values().sum::<u64>();
    }
}

/// The points ledgers, all shards together (their audit recomputes every balance).
#[derive(Debug, Clone, Default, Serialize)]
pub struct PointsTotals {
    pub buyers: u64,
    pub total_balance: u64,
    pub total_held: u64,
    pub redemptions_settled: u64,
}

#[derive(Debug, Clone, Default)]
pub struct AuditReport {
    pub ok: bool,
    pub products: Vec<ProductAudit>,
    pub orders: BTreeMap<OrderStatus, u64>,
    pub violations: Vec<String>,
    pub points: PointsTotals,
    /// Every coupon shard's counts together (and their violations, also in `violations`).
    pub coupons: crate::domain::coupon::CouponAudit,
}

/// Collects shard and points audits into one [`AuditReport`].
///
/// Audit the points before the stock: a redemption is settled only once its order is
/// durable, so keys delivered by redemptions then lie between the keys of settled
/// redemptions and those plus the ones held (in flight).
pub struct Auditor {
    report: AuditReport,
    /// Each shard's label and payment digests.
    payments: Vec<(String, Vec<u128>)>,
    /// Per coupon code: uses counted before the stock shards were audited (see
    /// [`Auditor::coupons_before`]), delivered orders that used it, and (used,
    /// held) after.
    coupon_floor: Option<BTreeMap<String, u64>>,
    coupon_delivered: BTreeMap<String, u64>,
    coupon_after: BTreeMap<String, (u64, u64)>,
}

impl Default for Auditor {
    fn default() -> Self {
        Auditor::new()
    }
}

impl Auditor {
    pub fn new() -> Auditor {
        let orders = OrderStatus::ALL.iter().map(|&s| (s, 0)).collect();
        Auditor {
            report: AuditReport { ok: true, orders, ..AuditReport::default() },
            payments: Vec::new(),
            coupon_floor: None,
            coupon_delivered: BTreeMap::new(),
            coupon_after: BTreeMap::new(),
        }
    }

    /// The coupon shards' uses as counted *before* the stock shards are audited,
    /// while the server sells. A use is counted only once its order was delivered,
    /// and the hold of a delivered order is never given back, so the delivered
    /// orders that used a code then lie between its uses counted before and its
    /// uses plus holds counted after ([`Auditor::add_coupons`]). Without this call
    /// (a stopped server's directory) the count after serves as both.
    pub fn coupons_before(&mut self, audits: &[crate::domain::coupon::CouponAudit]) {
        let floor = self.coupon_floor.get_or_insert_with(BTreeMap::new);
        for (code, &(used, _)) in audits.iter().flat_map(|a| &a.by_code) {
            *floor.entry(code.clone()).or_default() += used;
        }
    }

    /// Adds the coupon shards' audits (their totals and violations), read after the
    /// stock shards' audits.
    pub fn add_coupons(&mut self, audits: Vec<crate::domain::coupon::CouponAudit>) {
        for (code, &(used, held)) in audits.iter().flat_map(|a| &a.by_code) {
            let after = self.coupon_after.entry(code.clone()).or_default();
            (after.0, after.1) = (after.0 + used, after.1 + held);
        }
        let total = &mut self.report.coupons;
        for a in audits {
            (total.coupons, total.held, total.used, total.released) =
                (total.coupons + a.coupons, total.held + a.held, total.used + a.used, total.released + a.released);
            total.violations.extend(a.violations);
        }
    }

    /// Adds one product from the audits of its shards (each labelled `id#shard` in
    /// violations). `complete` is false when some shard could not be audited (its
    /// violation is reported by the caller): the product-wide sums are then skipped.
    pub fn add_product(&mut self, id: &str, audits: Vec<ShardAudit>, complete: bool) -> &ProductAudit {
        let mut product = ProductAudit { id: id.to_string(), ..ProductAudit::default() };
        let mut owner: HashMap<u128, u16> = HashMap::new();
        for a in &audits {
            product.add(a);
            for (code, &n) in &a.coupon_delivered {
                *self.coupon_delivered.entry(code.clone()).or_default() += n;
            }
            for (&status, &n) in &a.orders {
                *self.report.orders.entry(status).or_default() += n;
            }
            self.report.violations.extend(a.violations.iter().map(|v| format!("{id}#{}: {v}", a.shard)));
            for &key in &a.key_digests {
                if let Some(other) = owner.insert(key, a.shard) {
                    self.report.violations.push(format!("{id}: a key is in shards {other} and {}", a.shard));
                }
            }
        }
        if complete {
            let (in_transit, violation) = audit_product(&audits);
            product.in_transit = in_transit;
            self.report.violations.extend(violation.map(|v| format!("{id}: {v}")));
        }
        self.payments.extend(audits.into_iter().map(|a| (format!("{id}#{}", a.shard), a.payment_ids)));
        self.report.products.push(product);
        self.report.products.last().expect("just pushed")
    }

    /// A violation found outside the shards' audits (a shard that cannot be read).
    pub fn violation(&mut self, violation: String) {
        self.report.violations.push(violation);
    }

    /// The report, once every product was added, with the points ledgers.
    pub fn finish(mut self, points: Vec<PointsAudit>) -> AuditReport {
        self.duplicate_payments();
        self.check_points(points);
        self.report.violations.extend(self.report.coupons.violations.iter().cloned());
        self.check_coupons();
        self.report.ok = self.report.violations.is_empty();
        self.report
    }

    /// A payment id (per channel) pays one order, so no two shards (of any products)
    /// may record it: a violation per payment recorded twice, naming both shards.
    fn duplicate_payments(&mut self) {
        let mut seen: HashMap<u128, &str> = HashMap::new();
        for (label, ids) in &self.payments {
            for &id in ids {
                if let Some(other) = seen.insert(id, label) {
                    let v = format!("one payment id is recorded by orders of {other} and {label}");
                    self.report.violations.push(v);
                }
            }
        }
    }

    /// Delivered orders with each coupon against its uses (see
    /// [`Auditor::coupons_before`] for why the bounds are exact).
    fn check_coupons(&mut self) {
        let codes: BTreeSet<&String> = self.coupon_after.keys().chain(self.coupon_delivered.keys()).collect();
        for code in codes {
            let delivered = self.coupon_delivered.get(code).copied().unwrap_or(0);
            let (used, held) = self.coupon_after.get(code).copied().unwrap_or((0, 0));
            let floor = self.coupon_floor.as_ref().map_or(used, |f| f.get(code).copied().unwrap_or(0));
            if delivered < floor || delivered > used + held {
                self.report.violations.push(format!(
                    "coupon {code}: {delivered} delivered orders used it, but {floor} uses counted ({used} used and {held} held after)"
                ));
            }
        }
    }

    /// Totals of the points shards' audits, their violations, and the cross-check with
    /// the stock shards (see [`Auditor`] for why it is exact).
    fn check_points(&mut self, audits: Vec<PointsAudit>) {
        let totals = &mut self.report.points;
        let (mut settled, mut held) = (BTreeMap::<String, u64>::new(), BTreeMap::<String, u64>::new());
        for (i, a) in audits.into_iter().enumerate() {
            totals.buyers += a.buyers;
            totals.total_balance += a.total_balance;
            totals.total_held += a.total_held;
            totals.redemptions_settled += a.redemptions_settled;
            self.report.violations.extend(a.violations.iter().map(|v| format!("points#{i}: {v}")));
            for (p, n) in a.settled_quantity {
                *settled.entry(p).or_default() += n;
            }
            for (p, n) in a.held_quantity {
                *held.entry(p).or_default() += n;
            }
        }
        for pa in &self.report.products {
            let (s, h) = (settled.get(&pa.id).copied().unwrap_or(0), held.get(&pa.id).copied().unwrap_or(0));
            if pa.redeemed < s || pa.redeemed > s + h {
                self.report.violations.push(format!(
                    "{}: {} keys delivered by redemptions, but {s} paid by settled ones ({h} in flight)",
                    pa.id, pa.redeemed
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn points(settled: u64, held: u64) -> PointsAudit {
        PointsAudit {
            buyers: 1,
            total_balance: 10,
            redemptions_settled: settled,
            settled_quantity: [("p".to_string(), settled)].into_iter().collect(),
            held_quantity: [("p".to_string(), held)].into_iter().collect(),
            ..PointsAudit::default()
        }
    }

    fn shard(index: u16, keys: &[&str], payments: &[&str]) -> ShardAudit {
        ShardAudit {
            shard: index,
            imported: keys.len() as u64,
            available: keys.len() as u64,
            key_digests: keys.iter().map(|k| key_digest(k)).collect(),
            payment_ids: payments.iter().map(|p| digest128(p)).collect(),
            ..ShardAudit::default()
        }
    }

    fn coupons(used: u64, held: u64) -> crate::domain::coupon::CouponAudit {
        crate::domain::coupon::CouponAudit {
            coupons: 1,
            used,
            held,
            by_code: [("C".to_string(), (used, held))].into_iter().collect(),
            ..Default::default()
        }
    }

    #[test]
    fn delivered_coupon_orders_lie_between_uses_counted_before_and_uses_and_holds_after() {
        let delivered =
            |n| ShardAudit { coupon_delivered: [("C".to_string(), n)].into_iter().collect(), ..ShardAudit::default() };
        // Stopped: one count serves as both bounds.
        for (n, ok) in [(2, true), (3, true), (1, false), (4, false)] {
            let mut auditor = Auditor::new();
            auditor.add_product("p", vec![delivered(n)], true);
            auditor.add_coupons(vec![coupons(2, 1)]);
            assert_eq!(auditor.finish(vec![]).ok, ok, "{n} delivered, 2 used, 1 held");
        }
        // Live: 2 used before the stock was read, 3 used + 1 held after.
        for (n, ok) in [(1, false), (2, true), (4, true), (5, false)] {
            let mut auditor = Auditor::new();
            auditor.coupons_before(&[coupons(2, 2)]);
            auditor.add_product("p", vec![delivered(n)], true);
            auditor.add_coupons(vec![coupons(3, 1)]);
            assert_eq!(auditor.finish(vec![]).ok, ok, "{n} delivered");
        }
        // A delivered coupon order of a code no coupon shard knows.
        let mut auditor = Auditor::new();
        auditor.add_product("p", vec![delivered(1)], true);
        assert!(!auditor.finish(vec![]).ok);
    }

    #[test]
    fn redeemed_keys_must_match_settled_redemptions_give_or_take_those_in_flight() {
        for (redeemed, ok) in [(2, true), (3, true), (1, false), (4, false)] {
            let mut auditor = Auditor::new();
            auditor.add_product("p", vec![ShardAudit { redeemed, ..ShardAudit::default() }], true);
            let report = auditor.finish(vec![points(2, 1), points(0, 0)]);
            assert_eq!(report.ok, ok, "redeemed {redeemed}: {:?}", report.violations);
            let totals = &report.points;
            assert_eq!((totals.buyers, totals.total_balance, totals.redemptions_settled), (2, 20, 2));
        }
    }

    #[test]
    fn a_key_in_two_shards_of_a_product_and_a_payment_in_two_shards_are_violations() {
        let mut auditor = Auditor::new();
        auditor.add_product("p", vec![shard(0, &["k1", "k2"], &["pay-1"]), shard(1, &["k3"], &["pay-2"])], true);
        // The same key string in another product is no violation.
        auditor.add_product("q", vec![shard(0, &["k1"], &[])], true);
        assert!(auditor.finish(Vec::new()).ok);

        let mut auditor = Auditor::new();
        auditor.add_product("p", vec![shard(0, &["k1", "k2"], &["pay-1"]), shard(1, &["k2"], &[])], true);
        auditor.add_product("q", vec![shard(0, &[], &["pay-1"])], true);
        let report = auditor.finish(Vec::new());
        assert!(!report.ok);
        assert!(report.violations.iter().any(|v| v == "p: a key is in shards 0 and 1"), "{:?}", report.violations);
        assert!(
            report.violations.iter().any(|v| v == "one payment id is recorded by orders of p#0 and q#0"),
            "{:?}",
            report.violations
        );
        // (A key in two shards also breaks conservation here: 3 placed, 3 imported,
        // but the check above names the key.)
        assert_eq!(report.products[0].imported, 3);
    }
}
