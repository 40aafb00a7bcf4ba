//! The catalogue a cluster's nodes share: each product's definition, everything a
//! node needs to route and serve its orders (the product and its shard count, its
//! terms, its shelf, its points price and key mode, its group deals), as one entry
//! of a JetStream key-value bucket keyed by product id.
//!
//! - **create** refuses an id that exists (two nodes creating one product: one wins);
//! - **update** reads the entry, applies a change and writes it back on the revision
//!   it read; a write refused because another node changed the entry meanwhile is
//!   tried again on the new entry (up to [`MAX_TRIES`]), so concurrent changes from
//!   two nodes are both kept, never one lost;
//! - **watch** gives every entry (its last value), then every change, in the bucket's revision order:
//!   what a node follows to keep its routes and shard actors in step.
//!
//! Entries are JSON (readable with `nats kv get`); one that does not decode is
//! reported as [`CatalogueError::Malformed`], never applied.
//!
//! Limits: the entries listed at once ([`MAX_ENTRIES`]), the tries of one update
//! ([`MAX_TRIES`]), an entry's size ([`MAX_ENTRY_BYTES`]).

use async_nats::jetstream::kv::{self, CreateErrorKind, Operation, UpdateErrorKind};
use futures::{Stream, StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};

use crate::domain::group::GroupDeal;
use crate::domain::key_mode::KeyMode;
use crate::domain::shard::ProductInfo;
use crate::domain::shelf::Shelf;
use crate::domain::terms::Terms;
use crate::storage::jetstream::JetStream;

/// Most products one catalogue lists.
pub const MAX_ENTRIES: usize = 1 << 14;
/// Most tries of one update that other nodes' changes keep refusing (a random
/// pause of up to 5 ms times the try number between tries, so that two nodes
/// changing one product in a tight loop drift apart rather than collide forever).
pub const MAX_TRIES: usize = 16;
/// Largest entry written (a product with its terms, tiers and deals is a few KiB).
pub const MAX_ENTRY_BYTES: usize = 256 * 1024;

/// One product as the cluster knows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProductEntry {
    pub product: ProductInfo,
    /// Terms changed since creation (or tiers): `None` while the product's own are.
    #[serde(default)]
    pub terms: Option<Terms>,
    pub shelf: Shelf,
    /// When the shelf last changed (Unix ms).
    pub shelf_since_ms: u64,
    #[serde(default)]
    pub points_price: Option<u64>,
    #[serde(default)]
    pub key_mode: KeyMode,
    #[serde(default)]
    pub deals: Vec<GroupDeal>,
}

/// Why a catalogue call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CatalogueError {
    #[error("product {0} exists")]
    Exists(String),
    #[error("product {0} is not in the catalogue")]
    Unknown(String),
    /// Other nodes changed the entry at every try.
    #[error("product {0} kept changing under {MAX_TRIES} tries")]
    Contended(String),
    #[error("catalogue entry {key}: {error}")]
    Malformed { key: String, error: String },
    #[error("catalogue entry {0} is larger than {MAX_ENTRY_BYTES} bytes")]
    TooLarge(String),
    #[error("more than {MAX_ENTRIES} products in the catalogue")]
    TooMany,
    /// The servers did not answer as expected.
    #[error("catalogue store: {0}")]
    Unreachable(String),
}

fn unreachable(what: &str, e: impl std::fmt::Display) -> CatalogueError {
    CatalogueError::Unreachable(format!("{what}: {e}"))
}

/// A change seen by [`Catalogue::watch`], with the bucket's revision after it.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    Put(Box<ProductEntry>, u64),
    /// The entry was deleted or purged (by an operator: kami itself marks a deleted
    /// product on its shelf instead).
    Removed(String, u64),
}

/// The shared catalogue, as seen by one node.
pub struct Catalogue {
    kv: kv::Store,
    /// Values every node must share (`{bucket}_META`): the secret salting query
    /// passwords.
    meta: kv::Store,
}

fn encode(entry: &ProductEntry) -> Result<bytes::Bytes, CatalogueError> {
    let bytes = serde_json::to_vec(entry).expect("a product entry serialises");
    if bytes.len() > MAX_ENTRY_BYTES {
        return Err(CatalogueError::TooLarge(entry.product.id.clone()));
    }
    Ok(bytes.into())
}

fn decode(key: &str, bytes: &[u8]) -> Result<ProductEntry, CatalogueError> {
    let entry: ProductEntry = serde_json::from_slice(bytes)
        .map_err(|e| CatalogueError::Malformed { key: key.to_string(), error: e.to_string() })?;
    if entry.product.id != key {
        let error = format!("holds product {:?}", entry.product.id);
        return Err(CatalogueError::Malformed { key: key.to_string(), error });
    }
    Ok(entry)
}

impl Catalogue {
    /// Opens (or creates) bucket `bucket` (and `{bucket}_META`) with the stream's
    /// number of copies.
    pub async fn open(js: &JetStream, bucket: &str) -> Result<Catalogue, CatalogueError> {
        let meta = format!("{bucket}_META");
        Ok(Catalogue { kv: Self::bucket(js, bucket).await?, meta: Self::bucket(js, &meta).await? })
    }

    async fn bucket(js: &JetStream, bucket: &str) -> Result<kv::Store, CatalogueError> {
        super::bucket(js, bucket, None, Some(MAX_ENTRY_BYTES)).await.map_err(CatalogueError::Unreachable)
    }

    /// The 32-byte secret `name` every node shares: `mine` if none was kept yet (it
    /// is kept then), else the one kept.
    pub async fn shared_secret(&self, name: &str, mine: [u8; 32]) -> Result<[u8; 32], CatalogueError> {
        match self.meta.create(name, mine.to_vec().into()).await {
            Ok(_) => return Ok(mine),
            Err(e) if e.kind() == CreateErrorKind::AlreadyExists => {}
            Err(e) => return Err(unreachable(&format!("keep {name}"), e)),
        }
        let kept = self.meta.get(name).await.map_err(|e| unreachable(&format!("read {name}"), e))?;
        let kept = kept.ok_or_else(|| CatalogueError::Malformed { key: name.into(), error: "removed".into() })?;
        kept.as_ref()
            .try_into()
            .map_err(|_| CatalogueError::Malformed { key: name.into(), error: format!("{} bytes, not 32", kept.len()) })
    }

    /// Adds a product; refused if its id exists. Returns the entry's revision.
    pub async fn create(&self, entry: &ProductEntry) -> Result<u64, CatalogueError> {
        let id = &entry.product.id;
        match self.kv.create(id, encode(entry)?).await {
            Ok(revision) => Ok(revision),
            Err(e) if e.kind() == CreateErrorKind::AlreadyExists => Err(CatalogueError::Exists(id.clone())),
            Err(e) => Err(unreachable(&format!("create {id}"), e)),
        }
    }

    /// Writes `entry` whatever the catalogue held (the one server writing a stream
    /// mirrors its products with it). Returns the entry's revision.
    pub async fn put(&self, entry: &ProductEntry) -> Result<u64, CatalogueError> {
        let id = &entry.product.id;
        self.kv.put(id, encode(entry)?).await.map_err(|e| unreachable(&format!("put {id}"), e))
    }

    /// Product `id` and its revision, if it is in the catalogue.
    pub async fn get(&self, id: &str) -> Result<Option<(ProductEntry, u64)>, CatalogueError> {
        let entry = self.kv.entry(id).await.map_err(|e| unreachable(&format!("read {id}"), e))?;
        match entry {
            Some(e) if e.operation == Operation::Put => Ok(Some((decode(id, &e.value)?, e.revision))),
            _ => Ok(None),
        }
    }

    /// Applies `change` to product `id` and writes it back on the revision it read,
    /// again on the newer entry if another node changed it meanwhile. An error from
    /// `change` ends it (nothing written). Returns the entry written and its revision.
    pub async fn update<E>(
        &self,
        id: &str,
        mut change: impl FnMut(&mut ProductEntry) -> Result<(), E>,
    ) -> Result<Result<(ProductEntry, u64), E>, CatalogueError> {
        for tried in 0..MAX_TRIES as u64 {
            if tried > 0 {
                let pause = rand::random_range(0..=5_000 * tried);
                tokio::time::sleep(std::time::Duration::from_micros(pause)).await;
            }
            let Some((mut entry, revision)) = self.get(id).await? else {
                return Err(CatalogueError::Unknown(id.to_string()));
            };
            if let Err(refused) = change(&mut entry) {
                return Ok(Err(refused));
            }
            match self.kv.update(id, encode(&entry)?, revision).await {
                Ok(revision) => return Ok(Ok((entry, revision))),
                Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => continue,
                Err(e) => return Err(unreachable(&format!("update {id}"), e)),
            }
        }
        Err(CatalogueError::Contended(id.to_string()))
    }

    /// Every product, sorted by id.
    pub async fn entries(&self) -> Result<Vec<ProductEntry>, CatalogueError> {
        let keys = self.kv.keys().await.map_err(|e| unreachable("list the catalogue", e))?;
        let mut keys: Vec<String> =
            keys.take(MAX_ENTRIES + 1).try_collect().await.map_err(|e| unreachable("list the catalogue", e))?;
        if keys.len() > MAX_ENTRIES {
            return Err(CatalogueError::TooMany);
        }
        keys.sort();
        let mut entries = Vec::with_capacity(keys.len());
        for key in keys {
            if let Some((entry, _)) = self.get(&key).await? {
                entries.push(entry);
            }
        }
        Ok(entries)
    }

    /// Every entry as it is now, then every change after, in revision order. A
    /// malformed entry comes as an error item (the watch goes on).
    pub async fn watch(&self) -> Result<impl Stream<Item = Result<Change, CatalogueError>>, CatalogueError> {
        // `watch_all` would deliver only changes made after it is set up (a product
        // created meanwhile would be missed for good): the last value of every entry
        // first, then every change.
        let watch = self.kv.watch_with_history(">").await.map_err(|e| unreachable("watch the catalogue", e))?;
        Ok(watch.map(|item| {
            let entry = item.map_err(|e| unreachable("watch the catalogue", e))?;
            match entry.operation {
                Operation::Put => Ok(Change::Put(Box::new(decode(&entry.key, &entry.value)?), entry.revision)),
                Operation::Delete | Operation::Purge => Ok(Change::Removed(entry.key, entry.revision)),
            }
        }))
    }

    /// Writes raw bytes as entry `key` (tests: what an operator's mistake looks like).
    #[doc(hidden)]
    pub async fn put_raw(&self, key: &str, bytes: Vec<u8>) -> Result<u64, CatalogueError> {
        self.kv.put(key, bytes.into()).await.map_err(|e| unreachable(&format!("put {key}"), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn entry(id: &str) -> ProductEntry {
        ProductEntry {
            product: ProductInfo {
                id: id.into(),
                name: "P".into(),
                price_cents: 100,
                per_buyer_limit: 0,
                shards: 2,
                created_at_ms: 1,
            },
            terms: Some(Terms { name: "P".into(), price_cents: 100, ..Terms::default() }),
            shelf: Shelf::OnSale,
            shelf_since_ms: 1,
            points_price: None,
            key_mode: KeyMode::Unique,
            deals: Vec::new(),
        }
    }

    #[test]
    fn an_entry_decodes_as_it_was_written_and_one_under_another_key_is_refused() {
        let e = entry("p1");
        assert_eq!(decode("p1", &encode(&e).unwrap()), Ok(e.clone()));
        assert!(matches!(decode("p2", &encode(&e).unwrap()), Err(CatalogueError::Malformed { .. })));
        assert!(matches!(decode("p1", b"{not json"), Err(CatalogueError::Malformed { .. })));
        let mut huge = e;
        huge.product.name = "x".repeat(MAX_ENTRY_BYTES);
        assert_eq!(encode(&huge), Err(CatalogueError::TooLarge("p1".into())));
    }
}
