//! JSON shapes of responses (docs/api.md). Times are RFC 3339, money in cents.

use serde_json::{json, Value};

use crate::actors::shard::{GroupSeat, GroupSnapshot, OrderSnapshot};
use crate::core::{AuditReport, ProductView, Redeemed};
use crate::domain::group::{GroupDeal, GroupState};
use crate::domain::key_mode::KeyMode;
use crate::domain::points::{Balance, Entry};
use crate::domain::shelf::Shelf;
use crate::domain::terms::Terms;
use crate::domain::OrderStatus;
use crate::domain::ProductInfo;

pub fn ts(ms: u64) -> String {
    crate::domain::terms::rfc3339(ms)
}

fn ts_opt(ms: Option<u64>) -> Value {
    ms.map(|m| Value::String(ts(m))).unwrap_or(Value::Null)
}

/// A product as its merchant sees it (`shelf`: on sale, retired or deleted; `shelf_since`:
/// when that last changed, null if never).
pub fn product(
    info: &ProductInfo,
    terms: &Terms,
    available: u64,
    points_price: Option<u64>,
    shelf: Shelf,
    since_ms: u64,
    key_mode: KeyMode,
) -> Value {
    json!({
        "key_mode": key_mode.as_str(),
        "shelf": shelf.as_str(),
        "shelf_since": (since_ms > 0).then(|| ts(since_ms)),
        "id": info.id,
        "name": info.name,
        "price_cents": info.price_cents,
        "per_buyer_limit": info.per_buyer_limit,
        "shards": info.shards,
        "available": available,
        "points_price": points_price,
        "created_at": ts(info.created_at_ms),
        "sale_starts_at": ts_opt(terms.sale_starts_at_ms),
        "sale_ends_at": ts_opt(terms.sale_ends_at_ms),
        "tiers": terms.tiers,
    })
}

/// A product as buyers see it (`GET /api/v1/products`, `/products/{id}`).
pub fn public_product(p: &ProductView, points_price: Option<u64>) -> Value {
    json!({
        "id": p.info.id, "name": p.info.name, "price_cents": p.info.price_cents, "available": p.available,
        "per_buyer_limit": p.info.per_buyer_limit, "points_price": points_price, "on_sale": p.shelf.sells(),
        "key_mode": p.key_mode.as_str(),
        "sale_starts_at": ts_opt(p.terms.sale_starts_at_ms), "sale_ends_at": ts_opt(p.terms.sale_ends_at_ms),
        "tiers": p.terms.tiers,
    })
}

/// A product with every counter, as merchant routes answer it (deleted ones too).
pub fn merchant_product(p: &ProductView, points_price: Option<u64>) -> Value {
    let c = p.counts;
    let mut v = product(&p.info, &p.terms, c.available, points_price, p.shelf, p.shelf_since_ms, p.key_mode);
    v["stock"] = json!({
        "imported": c.imported, "available": c.available, "reserved": c.reserved, "sold": c.sold,
        "withdrawn": c.withdrawn,
    });
    v["orders_created"] = json!(c.orders);
    v["refunds_owed"] = json!(c.refunds_owed);
    v["paid_waiting"] = json!(c.paid_waiting);
    v
}

pub fn balance(buyer: &str, b: &Balance) -> Value {
    json!({"buyer": buyer, "balance": b.balance, "held": b.held, "available": b.available()})
}

pub fn redeemed(r: &Redeemed) -> Value {
    let mut v = order(&r.order);
    v["points_spent"] = json!(r.points_spent);
    v["points_balance"] = json!(r.balance.available());
    v["query_token"] = json!(r.order.order.query_token);
    v
}

pub fn ledger_entry(e: &Entry) -> Value {
    json!({
        "seq": e.seq, "kind": e.kind, "delta": e.delta, "balance_after": e.balance_after,
        "held_after": e.held_after, "reference": e.reference, "order_id": e.order_id, "at": ts(e.at_ms),
    })
}

/// A view as the bytes of its JSON, ending in a newline (as every JSON answer does).
pub fn to_json(view: &impl serde::Serialize) -> Vec<u8> {
    let mut bytes = serde_json::to_vec(view).expect("views serialise");
    bytes.push(b'\n');
    bytes
}

/// The 201 answer to order creation; replays of the same Idempotency-Key get it
/// unchanged. Serialised straight from the order (the hottest answer kami writes).
#[derive(serde::Serialize)]
pub struct OrderCreated<'a> {
    order_id: &'a str,
    status: &'static str,
    product_id: &'a str,
    quantity: u32,
    amount_cents: u64,
    created_at: String,
    expires_at: String,
    query_token: &'a str,
    payment: PaymentView<'a>,
    group_id: Option<String>,
    price_breakdown: crate::domain::pricing::Breakdown<'a>,
}

#[derive(serde::Serialize)]
struct PaymentView<'a> {
    channel: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pay_url: Option<String>,
}

/// `order_id` is `s.order_id()`, formatted once by the caller (it also signs the pay URL).
pub fn order_created<'a>(
    s: &'a OrderSnapshot,
    order_id: &'a str,
    channel: &'a str,
    pay_url: Option<String>,
) -> OrderCreated<'a> {
    let o = &s.order;
    OrderCreated {
        order_id,
        status: "pending_payment",
        product_id: &s.product_id,
        quantity: o.quantity,
        amount_cents: o.amount_cents,
        created_at: ts(o.created_at_ms),
        expires_at: ts(o.expires_at_ms),
        query_token: &o.query_token,
        payment: PaymentView { channel, pay_url },
        group_id: s.group_id(),
        price_breakdown: s.breakdown(),
    }
}

/// The buyer's view. `keys` is always an array: empty until the order is delivered
/// (and after a refund), the delivered keys then.
pub fn order(s: &OrderSnapshot) -> Value {
    let o = &s.order;
    let mut v = json!({
        "order_id": s.order_id(),
        "status": o.status.as_str(),
        "product_id": s.product_id,
        "quantity": o.quantity,
        "amount_cents": o.amount_cents,
        "price_breakdown": s.breakdown(),
        "created_at": ts(o.created_at_ms),
        "expires_at": ts(o.expires_at_ms),
        "paid_at": ts_opt(o.paid_at_ms),
        "delivered_at": ts_opt(o.delivered_at_ms),
    });
    if let Some(group) = s.group_id() {
        v["group_id"] = json!(group);
    }
    v["keys"] = json!(s.keys);
    v
}

/// An order found by a buyer's lookup: what the buyer sees, with its
/// `query_token` (the password proved the buyer's claim to it).
pub fn looked_up_order(s: &OrderSnapshot) -> Value {
    let mut v = order(s);
    v["query_token"] = json!(s.order.query_token);
    v
}

/// The merchant's view: everything the buyer sees plus buyer, payment and flags.
pub fn admin_order(s: &OrderSnapshot) -> Value {
    let o = &s.order;
    let mut v = order(s);
    v["buyer"] = json!(o.buyer);
    v["closed_at"] = ts_opt(o.closed_at_ms);
    v["payment_id"] = json!(o.payment_id);
    v["amount_mismatch"] = json!(o.amount_mismatch);
    v["idempotency_key"] = json!(o.idempotency.as_ref().map(|i| &i.key));
    v
}

/// An order in the merchant's listing: the merchant's view, keys only when asked.
pub fn listed_order(s: &OrderSnapshot, include_keys: bool) -> Value {
    let mut v = admin_order(s);
    if !include_keys {
        if let Some(m) = v.as_object_mut() {
            m.remove("keys");
        }
    }
    v
}

pub fn audit(r: &AuditReport) -> Value {
    let products: Vec<Value> = r
        .products
        .iter()
        .map(|p| {
            json!({
                "id": p.id, "imported": p.imported, "available": p.available, "reserved": p.reserved,
                "sold": p.sold, "withdrawn": p.withdrawn, "in_transit": p.in_transit,
                "orders_in_memory": p.orders_in_memory, "orders_archived": p.orders_archived,
            })
        })
        .collect();
    let orders: serde_json::Map<String, Value> =
        r.orders.iter().map(|(s, n)| (s.as_str().to_string(), json!(n))).collect();
    json!({"ok": r.ok, "products": products, "orders": orders, "violations": r.violations, "points": r.points, "coupons": r.coupons})
}

pub fn deal(d: &GroupDeal) -> Value {
    json!({
        "deal_id": d.deal_id,
        "product_id": d.product_id,
        "group_size": d.group_size,
        "price_cents": d.price_cents,
        "time_limit_secs": d.time_limit_secs,
        "created_at": ts(d.created_at_ms),
    })
}

/// Other members see at most the first two characters of a buyer, and never more
/// than half of them (a buyer of one character shows nothing).
/// A key as listed without `reveal`: its first two and last two characters, the
/// rest as `*` (a key of 6 characters or fewer: all `*`).
pub fn mask(key: &str) -> String {
    let n = key.chars().count();
    if n <= 6 {
        return "*".repeat(n);
    }
    let head: String = key.chars().take(2).collect();
    let tail: String = key.chars().skip(n - 2).collect();
    format!("{head}{}{tail}", "*".repeat(n - 4))
}

pub fn masked(buyer: &str) -> String {
    let shown = (buyer.chars().count() / 2).min(2);
    buyer.chars().take(shown).chain("***".chars()).collect()
}

/// A group and its members: who holds a seat (or held one when the group ended),
/// not buyers who left before.
pub fn group(g: &GroupSnapshot) -> Value {
    let grp = &g.group;
    let (taken, paid) = g.seats;
    let (completed_at, failed_at) = match grp.state {
        GroupState::Open => (None, None),
        GroupState::Completed { at_ms } => (Some(at_ms), None),
        GroupState::Failed { at_ms } => (None, Some(at_ms)),
    };
    let members: Vec<Value> = g
        .members
        .iter()
        .filter(|o| {
            let seated = matches!(o.status, OrderStatus::PendingPayment | OrderStatus::Paid | OrderStatus::Delivered);
            // A failed group closed its members' orders at the failure itself.
            seated || (failed_at.is_some() && o.closed_at_ms == failed_at)
        })
        .map(|o| json!({"buyer": masked(&o.buyer), "status": o.status.as_str(), "joined_at": ts(o.created_at_ms)}))
        .collect();
    json!({
        "group_id": g.group_id(),
        "product_id": g.product_id,
        "deal_id": grp.deal_id,
        "state": grp.state.as_str(),
        "group_size": grp.size,
        "price_cents": grp.price_cents,
        "seats_taken": taken,
        "seats_paid": paid,
        "seats_left": g.seats_open,
        "opened_at": ts(grp.opened_at_ms),
        "deadline_at": ts(grp.deadline_ms),
        "completed_at": ts_opt(completed_at),
        "failed_at": ts_opt(failed_at),
        "members": members,
    })
}

/// The 201 answer to opening or joining a group: the group and the member's order.
pub fn seat(s: &GroupSeat, order_id: &str, channel: &str, pay_url: Option<String>) -> Value {
    json!({"group": group(&s.group), "order": order_created(&s.order, order_id, channel, pay_url)})
}

/// `POST /api/v1/admin/reconcile`: what one payment sweep did.
pub fn reconcile(r: &crate::actors::payments::ReconcileReport) -> Value {
    let refund = |f: &crate::actors::payments::RefundOwed| {
        let mut v = json!({
            "payment_id": f.payment_id,
            "order_id": f.order_id,
            "channel": f.channel,
            "amount_cents": f.amount_cents,
        });
        if let Some(error) = &f.error {
            v["error"] = json!(error);
        }
        v
    };
    json!({
        "shards": r.shards,
        "shards_unavailable": r.shards_unavailable,
        "expired": r.expired,
        "orders_unheard": r.orders_unheard,
        "queries_sent": r.queries_sent,
        "queries_deferred": r.queries_deferred,
        "payments_found": r.payments_found.iter().map(|p| json!({
            "order_id": p.order_id,
            "payment_id": p.payment_id,
            "channel": p.channel,
            "amount_cents": p.amount_cents,
            "outcome": p.outcome,
        })).collect::<Vec<_>>(),
        "refunds_completed": r.refunds_completed.iter().map(refund).collect::<Vec<_>>(),
        "refunds_pending": r.refunds_pending.iter().map(refund).collect::<Vec<_>>(),
        "stuck_paid": r.stuck_paid,
    })
}

/// One payment channel with its breaker state (`GET /api/v1/admin/payments/channels`).
pub fn channel(c: &crate::actors::payments::ChannelStatus) -> Value {
    json!({
        "name": c.name,
        "kind": c.kind,
        "endpoint": c.endpoint,
        "priority": c.priority,
        "weight": c.weight,
        "state": c.state,
        "opened_total": c.opened_total,
        "calls_total": c.calls_total,
        "failures_total": c.failures_total,
        "last_error": c.last_error,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn masking_never_shows_more_than_half() {
        assert_eq!(super::masked("a"), "***");
        assert_eq!(super::masked("ab"), "a***");
        assert_eq!(super::masked("abc"), "a***");
        assert_eq!(super::masked("alice@example.com"), "al***");
        assert_eq!(super::masked("买家一号"), "买家***");
    }
}
