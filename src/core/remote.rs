//! Shard calls across cluster nodes: what asks every shard of a product or of the
//! shop (the merchant's order listing and export, the key listing, the buyer's
//! order lookup, deletion's open-order count, key withdrawal, a reusable key's
//! units) asks each shard where it is served. A shard served here answers its
//! actor's message; one served by another node is asked over
//! `POST /api/v1/cluster/shard/{product}/{shard}` (the forwarding token only), the
//! same message sent as bincode and its answer sent back the same way, and that
//! node's actor journals a write before it answers, as here. On one server every
//! shard is here and nothing leaves the process.
//!
//! Limits: one call's bytes ([`MAX_CALL_BYTES`]: at most 10,000 keys to withdraw or
//! one journal event's units), one answer's ([`MAX_ANSWER_BYTES`]; a page is at
//! most 500 orders or keys); each call within the request timeout (the cluster's
//! HTTP client), and the whole request within it too (the front's timeout).

use super::*;
use crate::actors::ledger::{LedgerBook, LedgerCall};
use crate::actors::shard::{
    CountOpenOrders, FindIdempotent, ImportKeys, Lend, ListKeys, ListOrders, ListedKeys, ListedOrders, LookupOrders,
    Receive, Redeem, SettleTransfer, WithdrawKeys,
};
use crate::domain::shard::{KeyFate, OutgoingTransfer, Redemption, Withdrawal};
use crate::domain::shelf::OpenOrders;
use crate::domain::ShardId;

/// Most bytes of one node's answer to a shard call (a page of at most 500 orders).
pub const MAX_ANSWER_BYTES: u64 = 16 << 20;
/// Most bytes of a shard call sent to a node (10,000 keys to withdraw, one
/// journal event's units of a reusable key, a filter).
pub const MAX_CALL_BYTES: u64 = 16 << 20;

/// A call of one shard, as one node sends it to another.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
pub enum ShardCall {
    Orders(ListOrders),
    Lookup(LookupOrders),
    Keys(ListKeys),
    CountOpen,
    Withdraw(Arc<Withdrawal>),
    Import(Vec<String>),
    /// A held redemption's order (the points resolver of another node).
    Redeem(Redemption),
    /// The order made under an idempotency key (the coupon resolver).
    FindIdempotent(String),
    /// Keys lent to a dry sibling, received by it, the loan settled (borrowing
    /// keys across nodes, `core::borrow`).
    Lend {
        to: u16,
        max_keys: usize,
    },
    Receive(OutgoingTransfer),
    SettleTransfer(u64),
}

/// Its answer.
#[derive(serde::Serialize, serde::Deserialize)]
pub enum ShardAnswer {
    Orders(ListedOrders),
    Lookup(Vec<OrderSnapshot>),
    Keys(ListedKeys),
    Open(OpenOrders),
    Withdrawn(u64, Vec<KeyFate>),
    Imported(u64, u64),
    Order(OrderSnapshot),
    Found(Option<OrderSnapshot>),
    Lent(Option<OutgoingTransfer>),
    Done,
}

/// Decodes what another node sent, at most `limit` bytes of it. (bincode's own
/// limit is not enforced when it reads from a slice, so the length is checked
/// first; decoded from a slice, nothing takes much more memory than its bytes.)
pub(super) fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8], limit: u64) -> Result<T, String> {
    use bincode::Options;
    if bytes.len() as u64 > limit {
        return Err(format!("{} bytes, at most {limit}", bytes.len()));
    }
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .allow_trailing_bytes()
        .with_limit(limit)
        .deserialize(bytes)
        .map_err(|e| e.to_string())
}

fn encode<T: serde::Serialize>(value: &T) -> Vec<u8> {
    bincode::serialize(value).expect("a shard call serialises")
}

/// Reads an answer's body whole, refusing one past `max` bytes (whatever its
/// `Content-Length` says, or without one) as soon as it is.
pub async fn read_bounded(mut answer: reqwest::Response, max: u64) -> Result<Vec<u8>, String> {
    if answer.content_length().is_some_and(|n| n > max) {
        return Err(format!("more than {max} bytes"));
    }
    let mut out = Vec::new();
    while let Some(chunk) = answer.chunk().await.map_err(|e| e.to_string())? {
        if (out.len() + chunk.len()) as u64 > max {
            return Err(format!("more than {max} bytes"));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

fn mismatch() -> Error {
    Error::Unavailable("a node answered a shard call with another kind of answer".into())
}

/// The typed answer of `$call` on `$handle`, wherever the shard is served.
macro_rules! answer {
    ($core:expr, $handle:expr, $call:expr, $kind:pat => $value:expr) => {
        match $core.shard_call($handle, $call).await? {
            $kind => Ok($value),
            _ => Err(mismatch()),
        }
    };
}

impl Kami {
    /// Calls `handle`'s shard where it is served: here, else (on a cluster node) on
    /// the node that serves it. A call this node's actor refused as `Elsewhere`
    /// never reached it, so it is sent on as it is.
    async fn shard_call(&self, handle: &ShardHandle, call: ShardCall) -> Result<ShardAnswer, Error> {
        let cluster = match self.cluster.get() {
            Some(cluster) if !handle.place.is_here() => cluster,
            _ => return self.call_here(handle, call).await,
        };
        match self.call_here(handle, call.clone()).await {
            Err(Error::Elsewhere(shard)) => cluster.call_remote(&shard, &call).await,
            answered => answered,
        }
    }

    /// Calls a shard through its actor in this process.
    async fn call_here(&self, handle: &ShardHandle, call: ShardCall) -> Result<ShardAnswer, Error> {
        Ok(match call {
            ShardCall::Orders(msg) => ShardAnswer::Orders(self.call(handle, msg).await?),
            ShardCall::Lookup(msg) => ShardAnswer::Lookup(self.call(handle, msg).await?),
            ShardCall::Keys(msg) => ShardAnswer::Keys(self.call(handle, msg).await?),
            ShardCall::CountOpen => ShardAnswer::Open(self.call(handle, CountOpenOrders).await?),
            ShardCall::Withdraw(what) => {
                let (n, fates) = self.call(handle, WithdrawKeys(what)).await?;
                ShardAnswer::Withdrawn(n, fates)
            }
            ShardCall::Import(keys) => {
                let (imported, duplicates) = self.call(handle, ImportKeys(keys)).await?;
                ShardAnswer::Imported(imported, duplicates)
            }
            ShardCall::Redeem(redemption) => ShardAnswer::Order(self.call(handle, Redeem(redemption)).await?),
            ShardCall::FindIdempotent(key) => ShardAnswer::Found(self.call(handle, FindIdempotent { key }).await?),
            ShardCall::Lend { to, max_keys } => ShardAnswer::Lent(self.call(handle, Lend { to, max_keys }).await?),
            ShardCall::Receive(t) => {
                self.call(handle, Receive(t)).await?;
                ShardAnswer::Done
            }
            ShardCall::SettleTransfer(transfer) => {
                self.call(handle, SettleTransfer(transfer)).await?;
                ShardAnswer::Done
            }
        })
    }

    /// A page of a shard's orders ([`ListOrders`]), wherever it is served.
    pub(super) async fn shard_orders(&self, handle: &ShardHandle, msg: ListOrders) -> Result<ListedOrders, Error> {
        answer!(self, handle, ShardCall::Orders(msg), ShardAnswer::Orders(listed) => listed)
    }

    /// A buyer's orders on a shard ([`LookupOrders`]), wherever it is served.
    pub(super) async fn shard_lookup(
        &self,
        handle: &ShardHandle,
        msg: LookupOrders,
    ) -> Result<Vec<OrderSnapshot>, Error> {
        answer!(self, handle, ShardCall::Lookup(msg), ShardAnswer::Lookup(found) => found)
    }

    /// A page of a shard's keys ([`ListKeys`]), wherever it is served.
    pub(super) async fn shard_keys(&self, handle: &ShardHandle, msg: ListKeys) -> Result<ListedKeys, Error> {
        answer!(self, handle, ShardCall::Keys(msg), ShardAnswer::Keys(listed) => listed)
    }

    /// A shard's open orders ([`CountOpenOrders`]), wherever it is served.
    pub(super) async fn shard_open_orders(&self, handle: &ShardHandle) -> Result<OpenOrders, Error> {
        answer!(self, handle, ShardCall::CountOpen, ShardAnswer::Open(open) => open)
    }

    /// Withdraws keys from a shard ([`WithdrawKeys`]), wherever it is served.
    pub(super) async fn shard_withdraw(
        &self,
        handle: &ShardHandle,
        what: Arc<Withdrawal>,
    ) -> Result<(u64, Vec<KeyFate>), Error> {
        answer!(self, handle, ShardCall::Withdraw(what), ShardAnswer::Withdrawn(n, fates) => (n, fates))
    }

    /// Imports keys (or units) into a shard ([`ImportKeys`]), wherever it is served.
    pub(super) async fn shard_import(&self, handle: &ShardHandle, keys: Vec<String>) -> Result<(u64, u64), Error> {
        answer!(self, handle, ShardCall::Import(keys), ShardAnswer::Imported(i, d) => (i, d))
    }

    /// A held redemption's order on its stock shard ([`Redeem`]), wherever it is served.
    pub(super) async fn shard_redeem(
        &self,
        handle: &ShardHandle,
        redemption: Redemption,
    ) -> Result<OrderSnapshot, Error> {
        answer!(self, handle, ShardCall::Redeem(redemption), ShardAnswer::Order(order) => order)
    }

    /// The order a shard made under idempotency key `key` ([`FindIdempotent`]),
    /// wherever it is served.
    pub(super) async fn shard_find_idempotent(
        &self,
        handle: &ShardHandle,
        key: String,
    ) -> Result<Option<OrderSnapshot>, Error> {
        answer!(self, handle, ShardCall::FindIdempotent(key), ShardAnswer::Found(found) => found)
    }

    /// Lends keys of a shard to its sibling `to` ([`Lend`]), wherever it is served.
    pub(super) async fn shard_lend(
        &self,
        handle: &ShardHandle,
        to: u16,
        max_keys: usize,
    ) -> Result<Option<OutgoingTransfer>, Error> {
        answer!(self, handle, ShardCall::Lend { to, max_keys }, ShardAnswer::Lent(lent) => lent)
    }

    /// Takes keys lent by a sibling into a shard ([`Receive`]), wherever it is served.
    pub(super) async fn shard_receive(&self, handle: &ShardHandle, t: OutgoingTransfer) -> Result<(), Error> {
        answer!(self, handle, ShardCall::Receive(t), ShardAnswer::Done => ())
    }

    /// Settles a shard's loan ([`SettleTransfer`]), wherever it is served.
    pub(super) async fn shard_settle_transfer(&self, handle: &ShardHandle, transfer: u64) -> Result<(), Error> {
        answer!(self, handle, ShardCall::SettleTransfer(transfer), ShardAnswer::Done => ())
    }

    /// For another node of the cluster: calls shard `shard` of `product`, which
    /// must be served here (else [`Error::Elsewhere`]: it moved meanwhile), with
    /// the encoded `call`; the answer encoded, or the domain's refusal (the same
    /// refusal on the node that asked).
    pub async fn call_for_node(&self, product: &str, shard: u16, call: &[u8]) -> Result<Vec<u8>, Error> {
        let call: ShardCall = decode(call, MAX_CALL_BYTES)
            .map_err(|e| Error::Invalid(format!("a shard call that does not decode: {e}")))?;
        let route = self.registry.get(product).ok_or(Error::ProductNotFound)?;
        let handle = route.shards.get(shard as usize).ok_or(Error::Invalid(format!("no shard {shard}")))?;
        let answer: Answered<ShardAnswer> = match self.call_here(handle, call).await {
            Ok(answer) => Ok(answer),
            Err(Error::Domain(refused)) => Err(refused),
            Err(e) => return Err(e),
        };
        Ok(encode(&answer))
    }
}

/// An answer as it travels between nodes: the answer, or the domain's refusal
/// (the same refusal on the node that asked); anything else is the HTTP error of
/// the call itself.
type Answered<W> = Result<W, DomainError>;

impl super::cluster::ClusterNode {
    /// Sends `call` (bincode) to `path` on `node` at `address` with the forwarding
    /// token, and decodes its answer (at most `max` bytes); `what` names the shard
    /// in errors. 429 there is [`Error::Overloaded`] here, anything else but 200
    /// [`Error::Unavailable`].
    async fn ask_node<C: serde::Serialize, W: serde::de::DeserializeOwned>(
        &self,
        (node, address): (String, String),
        path: &str,
        call: &C,
        max: u64,
        what: &str,
    ) -> Result<W, Error> {
        let answer = self
            .http
            .post(format!("{address}{path}"))
            .header("x-kami-forwarded", self.forward_token.as_str())
            .header("content-type", "application/octet-stream")
            .body(encode(call))
            .send()
            .await
            .map_err(|e| Error::Unavailable(format!("node {node} did not answer for {what}: {e}")))?;
        match answer.status().as_u16() {
            200 => {}
            429 => return Err(Error::Overloaded),
            status => return Err(Error::Unavailable(format!("node {node} answered {status} for {what}"))),
        }
        let bytes = read_bounded(answer, max)
            .await
            .map_err(|e| Error::Unavailable(format!("node {node}'s answer for {what}: {e}")))?;
        let answer: Answered<W> = decode(&bytes, max)
            .map_err(|e| Error::Unavailable(format!("node {node}'s answer for {what} does not decode: {e}")))?;
        answer.map_err(Error::Domain)
    }

    /// Asks the node serving `shard` to answer `call` (none now: [`Error::NoOwner`]).
    async fn call_remote(&self, shard: &ShardId, call: &ShardCall) -> Result<ShardAnswer, Error> {
        let owner = self.owner_elsewhere(shard).await?;
        let path = format!("/api/v1/cluster/shard/{}/{}", shard.product, shard.shard);
        self.ask_node(owner, &path, call, MAX_ANSWER_BYTES, &shard.to_string()).await
    }
}

/// Most bytes of a ledger call or its answer (a statement of at most
/// 1,000 lines, a page of at most 500 coupons, an audit).
pub const MAX_LEDGER_BYTES: u64 = 16 << 20;

impl Kami {
    /// For another node of the cluster: calls ledger shard `shard` of `book`
    /// (`points`, `coupons`), which must be served here (else
    /// [`Error::Elsewhere`]: it moved meanwhile), with the message `call` named
    /// `name`, admitted to its line; the answer encoded.
    pub async fn ledger_for_node(&self, book: &str, shard: u16, name: &str, call: &[u8]) -> Result<Vec<u8>, Error> {
        use crate::actors::coupons as c;
        use crate::actors::points as p;
        /// Decodes `call` as the first of `$message` named `name` and answers it.
        macro_rules! serve {
            ($handles:expr; $($message:ty),+) => {{
                let handle = $handles.get(shard as usize).ok_or(Error::Invalid(format!("no {book} shard {shard}")))?;
                if !handle.place.is_here() {
                    return Err(Error::Elsewhere(handle.place.shard.clone()));
                }
                $(
                    if name == <$message as LedgerCall>::NAME {
                        let message: $message = decode(call, MAX_LEDGER_BYTES)
                            .map_err(|e| Error::Invalid(format!("a ledger call that does not decode: {e}")))?;
                        let _ticket = admit(&handle.admission, Lane::Existing)?;
                        let answer: Answered<<$message as LedgerCall>::Wire> =
                            match self.ask_ledger(handle, message).await {
                                Ok(answer) => Ok(<$message as LedgerCall>::to_wire(answer)),
                                Err(Error::Domain(refused)) => Err(refused),
                                Err(e) => return Err(e),
                            };
                        return Ok(encode(&answer));
                    }
                )+
                Err(Error::Invalid(format!("no {book} call {name}")))
            }};
        }
        match book {
            "points" => {
                serve!(self.points; p::Adjust, p::HoldPoints, p::SettleRedemption, p::Release, p::Statement, p::AuditPoints)
            }
            "coupons" => {
                serve!(self.coupons; c::Define, c::Disable, c::HoldUse, c::FinishHold, c::Get, c::List, c::Audit)
            }
            _ => Err(Error::Invalid(format!("no ledger {book}"))),
        }
    }
}

impl super::cluster::ClusterNode {
    /// Asks the node serving ledger shard `shard` of `B` to answer `msg` (none
    /// now: [`Error::NoOwner`]). A refusal by the domain there is the same
    /// refusal here.
    pub(super) async fn call_ledger_remote<B: LedgerBook, M: LedgerCall>(
        &self,
        shard: u16,
        msg: M,
    ) -> Result<M::Answer, Error> {
        let key = crate::storage::jetstream::ledger_journal::<B>(shard);
        let owner = self.lease_owner_elsewhere(&key, &ShardId::new(B::NAME, shard)).await?;
        let path = format!("/api/v1/cluster/ledger/{}/{shard}/{}", B::NAME, M::NAME);
        let wire: M::Wire = self.ask_node(owner, &path, &msg, MAX_LEDGER_BYTES, &key).await?;
        Ok(M::from_wire(wire))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::shard::{KeyState, OrderFilter};

    #[test]
    fn a_shard_read_and_its_answer_decode_as_they_were_sent() {
        let read = ShardCall::Orders(ListOrders {
            after: 7,
            filter: OrderFilter { buyer: Some("b@example.com".into()), from_ms: Some(5), ..OrderFilter::default() },
            limit: 50,
            max_scan: 2000,
        });
        let back: ShardCall = decode(&encode(&read), MAX_CALL_BYTES).unwrap();
        match back {
            ShardCall::Orders(m) => {
                assert_eq!((m.after, m.limit, m.max_scan), (7, 50, 2000));
                assert_eq!(m.filter.buyer.as_deref(), Some("b@example.com"));
                assert_eq!(m.filter.from_ms, Some(5));
            }
            _ => panic!("another kind of read"),
        }
        let keys = ShardAnswer::Keys(ListedKeys { keys: vec![(3, "K-3".into())], at_end: true });
        match decode::<ShardAnswer>(&encode(&keys), MAX_ANSWER_BYTES).unwrap() {
            ShardAnswer::Keys(k) => assert_eq!((k.keys, k.at_end), (vec![(3, "K-3".to_string())], true)),
            _ => panic!("another kind of answer"),
        }
        let state = ShardCall::Keys(ListKeys { state: KeyState::Sold, after: None, limit: 1 });
        assert!(matches!(
            decode(&encode(&state), MAX_CALL_BYTES).unwrap(),
            ShardCall::Keys(ListKeys { state: KeyState::Sold, .. })
        ));
    }

    /// A ledger answer after the trip: `LedgerCall::Wire` encoded, decoded, turned back.
    fn trip<M: LedgerCall>(answer: Answered<M::Answer>) -> Answered<M::Answer> {
        let wire: Answered<M::Wire> = answer.map(M::to_wire);
        let back: Answered<M::Wire> = decode(&encode(&wire), MAX_LEDGER_BYTES).unwrap();
        back.map(M::from_wire)
    }

    #[test]
    fn ledger_answers_and_refusals_arrive_as_they_were_given() {
        use crate::actors::{coupons, points};
        use crate::domain::coupon::CouponAudit;
        use crate::domain::points::{Balance, PointsBook};
        let mut book = PointsBook::default();
        let _ = book.adjust("r1", "alice", 300, "", 5).unwrap();
        let _ = book.adjust("r2", "alice", -100, "", 6).unwrap();
        let statement = (book.balance("alice"), book.statement("alice", 10));
        assert_eq!(statement.1.iter().map(|e| e.kind).collect::<Vec<_>>(), ["credit", "debit"]);
        assert_eq!(trip::<points::Statement>(Ok(statement.clone())), Ok(statement));
        let refused = DomainError::InsufficientPoints { available: 200, needed: 500 };
        assert_eq!(trip::<points::Adjust>(Err(refused.clone())), Err(refused));
        assert_eq!(trip::<points::Adjust>(Ok(Balance { balance: 7, held: 2 })), Ok(Balance { balance: 7, held: 2 }));
        // A coupon shard's audit keeps its per-code counts, which its JSON leaves out.
        let mut audit = CouponAudit { coupons: 2, used: 3, ..CouponAudit::default() };
        audit.by_code.insert("SPRING".into(), (3, 1));
        assert_eq!(trip::<coupons::Audit>(Ok(audit.clone())), Ok(audit));
        // The message itself travels as bincode too.
        let hold = points::Release { redemption: "r".into(), reason: "sold_out".into() };
        let back: points::Release = decode(&encode(&hold), MAX_LEDGER_BYTES).unwrap();
        assert_eq!((back.redemption, back.reason), (hold.redemption, hold.reason));
    }

    #[test]
    fn a_ledger_line_of_an_unknown_kind_does_not_decode() {
        let line = serde_json::json!({"seq": 1, "kind": "gift", "delta": 1, "balance_after": 1, "held_after": 0,
            "reference": "r", "order_id": null, "at_ms": 5});
        assert!(serde_json::from_value::<crate::domain::points::Entry>(line).is_err());
    }

    #[test]
    fn a_call_larger_than_its_bound_is_refused() {
        let read =
            ShardCall::Lookup(LookupOrders { buyer: "b".repeat(17 << 20), password: [0; 32], after: None, limit: 1 });
        assert!(decode::<ShardCall>(&encode(&read), MAX_CALL_BYTES).is_err());
    }
}
