//! Buyer order lookup (查单): query passwords hashed off the async threads, a
//! bounded number at a time, and lookups by buyer (every shard of every product,
//! each answering from its own index) or by order id.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::*;
use crate::domain::lookup::{self, LookupPosition, PasswordHash};

/// Hashes query passwords: at most `parallel` at once on blocking threads, at most
/// `max_waiting` requests waiting for a turn (past it: [`Error::Overloaded`]).
pub struct Passwords {
    secret: [u8; 32],
    permits: tokio::sync::Semaphore,
    waiting: AtomicUsize,
    max_waiting: usize,
}

/// Counts a request waiting for a hash, until dropped (also when the request is).
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let now = self.0.fetch_sub(1, Ordering::Relaxed) - 1;
        metrics::gauge!("kami_password_hashes_waiting").set(now as f64);
    }
}

impl Passwords {
    /// `parallel` 0: one per core.
    pub fn new(secret: [u8; 32], parallel: usize, max_waiting: usize) -> Passwords {
        let parallel =
            if parallel == 0 { std::thread::available_parallelism().map_or(1, |n| n.get()) } else { parallel };
        Passwords { secret, permits: tokio::sync::Semaphore::new(parallel), waiting: AtomicUsize::new(0), max_waiting }
    }

    /// The stored form of `buyer`'s query `password`.
    pub async fn hash(&self, buyer: &str, password: &str) -> Result<PasswordHash, Error> {
        let started = std::time::Instant::now();
        let waiting = Waiting(&self.waiting);
        let before = self.waiting.fetch_add(1, Ordering::Relaxed);
        metrics::gauge!("kami_password_hashes_waiting").set((before + 1) as f64);
        if before >= self.max_waiting {
            crate::telemetry::count_rejection("hash_queue");
            return Err(Error::Overloaded);
        }
        let _permit = self.permits.acquire().await.map_err(|_| Error::Unavailable("shutting down".into()))?;
        drop(waiting);
        let (secret, buyer, password) = (self.secret, buyer.to_string(), password.to_string());
        let hash = tokio::task::spawn_blocking(move || lookup::hash_password(&secret, &buyer, &password))
            .await
            .map_err(|e| Error::Unavailable(format!("hashing a password failed: {e}")))?;
        metrics::histogram!("kami_password_hash_seconds").record(started.elapsed().as_secs_f64());
        Ok(hash)
    }
}

/// Most orders one lookup page holds.
pub const MAX_LOOKUP_PAGE: usize = 100;

/// One page of a buyer's orders, newest first, and where the next starts (`None`:
/// nothing after).
pub struct LookupPage {
    pub orders: Vec<OrderSnapshot>,
    pub next: Option<LookupPosition>,
}

impl Kami {
    /// The stored form of `buyer`'s query `password` (validated first).
    pub(super) async fn password_hash(&self, buyer: &str, password: &str) -> Result<PasswordHash, Error> {
        lookup::validate_password(password).map_err(Error::Invalid)?;
        self.passwords.hash(buyer, password).await
    }

    /// `buyer`'s orders that `password` opens, across every product and shard,
    /// newest first, after `after`, at most `limit` (1..=[`MAX_LOOKUP_PAGE`]). A
    /// wrong password and an unknown buyer get the same answer: no orders.
    pub async fn lookup_orders(
        &self,
        buyer: &str,
        password: &str,
        after: Option<LookupPosition>,
        limit: usize,
    ) -> Result<LookupPage, Error> {
        if limit == 0 || limit > MAX_LOOKUP_PAGE {
            return Err(Error::Invalid(format!("limit: must be 1..={MAX_LOOKUP_PAGE}")));
        }
        validate::buyer(buyer).map_err(Error::Invalid)?;
        let hash = self.password_hash(buyer, password).await?;
        let routes = self.registry.all();
        // One more than a page from each shard: if the union has more than a page,
        // what is not shown comes after the last shown.
        let calls = routes.values().flat_map(|route| route.shards.iter()).map(|handle| {
            let msg = shard::LookupOrders {
                buyer: buyer.to_string(),
                password: hash,
                after: after.clone(),
                limit: limit + 1,
            };
            self.shard_lookup(handle, msg)
        });
        let mut found: Vec<(LookupPosition, OrderSnapshot)> = Vec::new();
        for answer in futures::future::join_all(calls).await {
            found.extend(answer?.into_iter().map(|view| (position(&view), view)));
        }
        found.sort_by(|a, b| a.0.cmp(&b.0));
        let more = found.len() > limit;
        found.truncate(limit);
        let next = if more { found.last().map(|(p, _)| p.clone()) } else { None };
        Ok(LookupPage { orders: found.into_iter().map(|(_, view)| view).collect(), next })
    }

    /// Order `order_id` if `password` opens it (else `None`: an unknown order, one
    /// without a query password and a wrong password look the same).
    pub async fn lookup_order(&self, order_id: &str, password: &str) -> Result<Option<OrderSnapshot>, Error> {
        lookup::validate_password(password).map_err(Error::Invalid)?;
        let found = match self.locate(order_id) {
            Ok((id, route)) => {
                match self.call(&route.shards[id.shard.shard as usize], shard::OrderWithPassword { seq: id.seq }).await
                {
                    Ok(found) => Some(found),
                    Err(Error::Domain(DomainError::OrderNotFound)) => None,
                    Err(e) => return Err(e),
                }
            }
            Err(Error::Domain(DomainError::OrderNotFound)) => None,
            Err(e) => return Err(e),
        };
        match found {
            Some((view, Some(stored))) => {
                let given = self.password_hash(&view.order.buyer, password).await?;
                Ok(lookup::same(&given, &stored).then_some(view))
            }
            // The same work as a wrong password: the answer's time says nothing.
            _ => {
                self.password_hash(order_id, password).await?;
                Ok(None)
            }
        }
    }
}

/// Where an order stands in a lookup's answer.
pub fn position(view: &OrderSnapshot) -> LookupPosition {
    LookupPosition {
        created_at_ms: view.order.created_at_ms,
        product: view.product_id.clone(),
        shard: view.shard,
        seq: view.order.seq,
    }
}
