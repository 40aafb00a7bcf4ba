//! The catalogue on the jetstream backend: the server writing a stream keeps its
//! products (and their terms, shelf, points price, key mode and group deals) in the
//! stream's catalogue bucket as well as in its data directory, so that a server
//! started on the stream from another data directory (another host, after the
//! first one died) sells the same products. The secret that salts buyers' query
//! passwords is shared the same way (in the bucket's `_META` companion), so a lookup
//! by password works on whichever server writes the stream.
//!
//! A change is written to the data directory and made durable, then to the bucket,
//! before it is acknowledged; a change whose bucket write failed answers 503 and is
//! not kept by the next start (the bucket is what a start takes).

use std::sync::Arc;

use super::{Error, Kami};
use crate::cluster::catalogue::{Catalogue, CatalogueError, ProductEntry};
use crate::storage::{Storage, StorageError};

fn remote(e: CatalogueError) -> StorageError {
    StorageError::Remote(e.to_string())
}

/// Product `id` as the data directory holds it, or `None` if it holds no such product.
pub fn entry_of(storage: &Storage, id: &str) -> Result<Option<ProductEntry>, StorageError> {
    Ok(entries_of(storage, |p| p == id)?.pop())
}

/// The products of the data directory whose id `wanted` keeps, each table read once.
fn entries_of(storage: &Storage, wanted: impl Fn(&str) -> bool) -> Result<Vec<ProductEntry>, StorageError> {
    let products: Vec<_> = storage.load_products()?.into_iter().filter(|p| wanted(&p.id)).collect();
    if products.is_empty() {
        return Ok(Vec::new());
    }
    let points: std::collections::HashMap<String, u64> = storage.points_prices()?.into_iter().collect();
    let reusable: std::collections::HashSet<String> = storage.reusable_products()?.into_iter().collect();
    let mut deals = storage.group_deals()?;
    let mut entries = Vec::with_capacity(products.len());
    for product in products {
        let id = product.id.as_str();
        let (shelf, shelf_since_ms) = storage.shelf(id)?;
        let reusable = reusable.contains(id);
        entries.push(ProductEntry {
            terms: storage.terms(id)?,
            shelf,
            shelf_since_ms,
            points_price: points.get(id).copied(),
            key_mode: if reusable { crate::domain::key_mode::KeyMode::Reusable } else { Default::default() },
            deals: deals.extract_if(.., |d| d.product_id == id).collect(),
            product,
        });
    }
    Ok(entries)
}

/// Writes `entry` into the data directory (over what it held of that product).
pub(crate) fn import(storage: &Storage, entry: &ProductEntry) -> Result<(), StorageError> {
    let id = &entry.product.id;
    storage.set_points_price(id, entry.points_price)?;
    storage.set_key_mode(id, entry.key_mode)?;
    match &entry.terms {
        Some(terms) => storage.set_terms(id, terms)?,
        None => storage.remove_terms(id)?,
    }
    storage.set_shelf(id, entry.shelf, entry.shelf_since_ms)?;
    for deal in &entry.deals {
        storage.put_group_deal(deal)?;
    }
    storage.insert_product(&entry.product)?;
    Ok(())
}

/// At start, before recovery: takes every product of the bucket into the data
/// directory, and puts into the bucket the products only the data directory has (a
/// directory that kept its stock in the stream before the bucket existed); and
/// adopts the stream's lookup secret (or gives it this directory's). Returns
/// how many products came from the bucket.
pub async fn sync(storage: &Arc<Storage>, catalogue: &Catalogue) -> Result<usize, StorageError> {
    // Orders' query passwords are salted with it: a new data directory adopts the
    // stream's, so buyers' lookups work on whichever server writes the stream.
    let mine = storage.lookup_secret()?;
    let shared = catalogue.shared_secret("lookup-secret", mine).await.map_err(remote)?;
    if shared != mine {
        storage.set_lookup_secret(&shared)?;
    }
    let entries = catalogue.entries().await.map_err(remote)?;
    let known: std::collections::HashSet<String> = entries.iter().map(|e| e.product.id.clone()).collect();
    let (storage_, taken) = (storage.clone(), entries.len());
    let local = tokio::task::spawn_blocking(move || -> Result<Vec<ProductEntry>, StorageError> {
        for entry in &entries {
            import(&storage_, entry)?;
        }
        let local = entries_of(&storage_, |id| !known.contains(id))?;
        storage_.flush_now()?;
        Ok(local)
    })
    .await
    .map_err(|e| StorageError::Io(e.to_string()))??;
    for entry in &local {
        catalogue.put(entry).await.map_err(remote)?;
    }
    Ok(taken)
}

impl Kami {
    /// On the jetstream backend: writes product `id` as the data directory now holds
    /// it to the stream's catalogue (call after the change is durable locally, before
    /// answering). Nothing on the local backend.
    pub(crate) async fn mirror(&self, id: &str) -> Result<(), Error> {
        let Some(catalogue) = &self.catalogue else { return Ok(()) };
        let Some(entry) = entry_of(&self.storage, id)? else { return Ok(()) };
        catalogue.put(&entry).await.map_err(remote)?;
        Ok(())
    }
}
