//! Shard reads across cluster nodes: what reads every shard of a product or of the
//! shop (the merchant's order listing and export, the key listing, the buyer's
//! order lookup) asks each shard where it is served. A shard served here answers
//! its actor's message; one served by another node is asked over
//! `POST /api/v1/cluster/shard/{product}/{shard}` (the forwarding token only), the
//! same message sent as bincode and its answer sent back the same way. On one
//! server every shard is here and nothing leaves the process.
//!
//! Limits: one answer's bytes ([`MAX_READ_ANSWER_BYTES`]; a page is at most
//! 500 orders or keys); a read takes what is left of the request's time.

use super::*;
use crate::actors::shard::{ListKeys, ListOrders, ListedKeys, ListedOrders, LookupOrders};
use crate::domain::ShardId;

/// Most bytes of one node's answer to a shard read (a page of at most 500 orders).
pub const MAX_READ_ANSWER_BYTES: u64 = 16 << 20;
/// Most bytes of a shard read sent to a node (a buyer name, a filter, a position).
pub const MAX_READ_BYTES: u64 = 64 << 10;

/// A read of one shard, as one node sends it to another.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
pub enum ShardRead {
    Orders(ListOrders),
    Lookup(LookupOrders),
    Keys(ListKeys),
}

/// Its answer.
#[derive(serde::Serialize, serde::Deserialize)]
pub enum ShardReadAnswer {
    Orders(ListedOrders),
    Lookup(Vec<OrderSnapshot>),
    Keys(ListedKeys),
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8], limit: u64) -> Result<T, String> {
    use bincode::Options;
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .allow_trailing_bytes()
        .with_limit(limit)
        .deserialize(bytes)
        .map_err(|e| e.to_string())
}

fn encode<T: serde::Serialize>(value: &T) -> Vec<u8> {
    bincode::serialize(value).expect("a shard read serialises")
}

fn mismatch() -> Error {
    Error::Unavailable("a node answered a shard read with another kind of answer".into())
}

impl Kami {
    /// Reads `handle`'s shard where it is served: here, else (on a cluster node) on
    /// the node that serves it.
    async fn read_shard(&self, handle: &ShardHandle, read: ShardRead) -> Result<ShardReadAnswer, Error> {
        let cluster = match self.cluster.get() {
            Some(cluster) if !handle.place.is_here() => cluster,
            _ => return self.read_here(handle, read).await,
        };
        match self.read_here(handle, read.clone()).await {
            Err(Error::Elsewhere(shard)) => cluster.read_remote(&shard, &read).await,
            answered => answered,
        }
    }

    /// Reads a shard through its actor in this process.
    async fn read_here(&self, handle: &ShardHandle, read: ShardRead) -> Result<ShardReadAnswer, Error> {
        Ok(match read {
            ShardRead::Orders(msg) => ShardReadAnswer::Orders(self.call(handle, msg).await?),
            ShardRead::Lookup(msg) => ShardReadAnswer::Lookup(self.call(handle, msg).await?),
            ShardRead::Keys(msg) => ShardReadAnswer::Keys(self.call(handle, msg).await?),
        })
    }

    /// A page of a shard's orders ([`ListOrders`]), wherever it is served.
    pub(super) async fn shard_orders(&self, handle: &ShardHandle, msg: ListOrders) -> Result<ListedOrders, Error> {
        match self.read_shard(handle, ShardRead::Orders(msg)).await? {
            ShardReadAnswer::Orders(listed) => Ok(listed),
            _ => Err(mismatch()),
        }
    }

    /// A buyer's orders on a shard ([`LookupOrders`]), wherever it is served.
    pub(super) async fn shard_lookup(
        &self,
        handle: &ShardHandle,
        msg: LookupOrders,
    ) -> Result<Vec<OrderSnapshot>, Error> {
        match self.read_shard(handle, ShardRead::Lookup(msg)).await? {
            ShardReadAnswer::Lookup(found) => Ok(found),
            _ => Err(mismatch()),
        }
    }

    /// A page of a shard's keys ([`ListKeys`]), wherever it is served.
    pub(super) async fn shard_keys(&self, handle: &ShardHandle, msg: ListKeys) -> Result<ListedKeys, Error> {
        match self.read_shard(handle, ShardRead::Keys(msg)).await? {
            ShardReadAnswer::Keys(listed) => Ok(listed),
            _ => Err(mismatch()),
        }
    }

    /// For another node of the cluster: reads shard `shard` of `product`, which
    /// must be served here (else [`Error::Elsewhere`]: it moved meanwhile), from
    /// the encoded `read`; the answer encoded.
    pub async fn read_for_node(&self, product: &str, shard: u16, read: &[u8]) -> Result<Vec<u8>, Error> {
        let read: ShardRead = decode(read, MAX_READ_BYTES)
            .map_err(|e| Error::Invalid(format!("a shard read that does not decode: {e}")))?;
        let route = self.registry.get(product).ok_or(Error::ProductNotFound)?;
        let handle = route.shards.get(shard as usize).ok_or(Error::Invalid(format!("no shard {shard}")))?;
        Ok(encode(&self.read_here(handle, read).await?))
    }
}

impl super::cluster::ClusterNode {
    /// Asks the node serving `shard` to answer `read` (none now: [`Error::NoOwner`]).
    async fn read_remote(&self, shard: &ShardId, read: &ShardRead) -> Result<ShardReadAnswer, Error> {
        let (node, address) = match self.owner(shard).await.map_err(Error::Unavailable)? {
            Some((node, address)) if node != self.name => (node, address),
            // No node, or this one while it has not placed the shard yet.
            _ => return Err(Error::NoOwner(shard.clone())),
        };
        let url = format!("{address}/api/v1/cluster/shard/{}/{}", shard.product, shard.shard);
        let answer = self
            .http
            .post(url)
            .header("x-kami-forwarded", self.forward_token.as_str())
            .header("content-type", "application/octet-stream")
            .body(encode(read))
            .send()
            .await
            .map_err(|e| Error::Unavailable(format!("node {node} did not answer for {shard}: {e}")))?;
        if !answer.status().is_success() {
            return Err(Error::Unavailable(format!("node {node} answered {} for {shard}", answer.status())));
        }
        if answer.content_length().is_some_and(|n| n > MAX_READ_ANSWER_BYTES) {
            return Err(Error::Unavailable(format!("node {node}'s answer for {shard} is too large")));
        }
        let bytes = answer.bytes().await.map_err(|e| Error::Unavailable(format!("node {node}'s answer: {e}")))?;
        decode(&bytes, MAX_READ_ANSWER_BYTES)
            .map_err(|e| Error::Unavailable(format!("node {node}'s answer for {shard} does not decode: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::shard::{KeyState, OrderFilter};

    #[test]
    fn a_shard_read_and_its_answer_decode_as_they_were_sent() {
        let read = ShardRead::Orders(ListOrders {
            after: 7,
            filter: OrderFilter { buyer: Some("b@example.com".into()), from_ms: Some(5), ..OrderFilter::default() },
            limit: 50,
            max_scan: 2000,
        });
        let back: ShardRead = decode(&encode(&read), MAX_READ_BYTES).unwrap();
        match back {
            ShardRead::Orders(m) => {
                assert_eq!((m.after, m.limit, m.max_scan), (7, 50, 2000));
                assert_eq!(m.filter.buyer.as_deref(), Some("b@example.com"));
                assert_eq!(m.filter.from_ms, Some(5));
            }
            _ => panic!("another kind of read"),
        }
        let keys = ShardReadAnswer::Keys(ListedKeys { keys: vec![(3, "K-3".into())], at_end: true });
        match decode::<ShardReadAnswer>(&encode(&keys), MAX_READ_ANSWER_BYTES).unwrap() {
            ShardReadAnswer::Keys(k) => assert_eq!((k.keys, k.at_end), (vec![(3, "K-3".to_string())], true)),
            _ => panic!("another kind of answer"),
        }
        let state = ShardRead::Keys(ListKeys { state: KeyState::Sold, after: None, limit: 1 });
        assert!(matches!(
            decode(&encode(&state), MAX_READ_BYTES).unwrap(),
            ShardRead::Keys(ListKeys { state: KeyState::Sold, .. })
        ));
    }

    #[test]
    fn a_read_larger_than_its_bound_is_refused() {
        let read =
            ShardRead::Lookup(LookupOrders { buyer: "b".repeat(100_000), password: [0; 32], after: None, limit: 1 });
        assert!(decode::<ShardRead>(&encode(&read), MAX_READ_BYTES).is_err());
    }
}
