//! Merchant operations: products, their keys and shelf state, points prices, the audit.

use super::*;
use crate::domain::audit::Auditor;

impl Kami {
    pub async fn create_product(&self, p: NewProduct) -> Result<ProductInfo, Error> {
        validate::product_id(&p.id).map_err(Error::Invalid)?;
        validate::product_name(&p.name).map_err(Error::Invalid)?;
        if p.shards == 0 || p.shards > self.limits.max_shards {
            return Err(Error::Invalid(format!("shards: must be 1..={}", self.limits.max_shards)));
        }
        if p.price_cents > validate::MAX_PRICE_CENTS {
            return Err(Error::Invalid(format!("price_cents: must be at most {}", validate::MAX_PRICE_CENTS)));
        }
        if p.points_price == Some(0) {
            return Err(Error::Invalid("points_price: must be at least 1".into()));
        }
        crate::domain::pricing::check_tiers(p.price_cents, &p.tiers).map_err(Error::Invalid)?;
        let points_price = p.points_price;
        let key_mode = p.key_mode;
        // One merchant write at a time: "exists" checked here stays true below.
        let _one_writer = self.merchant_writes.lock().await;
        if let Some(existing) = self.registry.get(&p.id) {
            return Err(match existing.shelf.get() {
                // Old order ids name the product: its id is never given to another.
                Shelf::Deleted => DomainError::ProductDeleted.into(),
                Shelf::OnSale | Shelf::Retired => Error::ProductExists,
            });
        }
        // The points price, key mode and tiers are written first: they are durable
        // with the product record (one flush covers them all), and a crash before the
        // product leaves only a price, mode or terms for no product, which the next
        // creation of that id overwrites.
        self.storage.set_points_price(&p.id, points_price)?;
        self.storage.set_key_mode(&p.id, key_mode)?;
        if p.tiers.is_empty() {
            self.storage.remove_terms(&p.id)?;
        } else {
            // Read by the supervisor when it starts the product's shards.
            let terms = crate::domain::terms::Terms {
                name: p.name.clone(),
                price_cents: p.price_cents,
                per_buyer_limit: p.per_buyer_limit,
                tiers: p.tiers,
                ..Default::default()
            };
            self.storage.set_terms(&p.id, &terms)?;
        }
        let info = ProductInfo {
            id: p.id,
            name: p.name,
            price_cents: p.price_cents,
            per_buyer_limit: p.per_buyer_limit,
            shards: p.shards,
            created_at_ms: self.clock.now_ms(),
        };
        let sent = tokio::time::timeout(self.limits.request_timeout, self.supervisor.send(CreateProduct(info))).await;
        let info = match sent {
            Err(_) => return Err(Error::Timeout),
            Ok(Err(_)) => return Err(Error::Unavailable("the product supervisor stopped".into())),
            Ok(Ok(result)) => result?,
        };
        match points_price {
            Some(p) => self.points_prices.insert(info.id.clone(), p),
            None => self.points_prices.remove(&info.id).map(|(_, p)| p),
        };
        match key_mode {
            KeyMode::Reusable => self.reusable.insert(info.id.clone()),
            KeyMode::Unique => self.reusable.remove(&info.id).is_some(),
        };
        self.mirror(&info.id).await?;
        Ok(info)
    }

    /// A product that is not deleted (a deleted one is not found, for buyers and merchants).
    pub(super) fn listed(&self, id: &str) -> Result<Arc<crate::actors::ProductRoute>, Error> {
        self.registry.get(id).filter(|r| r.shelf.get() != Shelf::Deleted).ok_or(Error::ProductNotFound)
    }

    /// Takes a product off the shelf, puts it back on sale, or deletes it (see
    /// [`crate::domain::shelf`]); returns the state, durable, and since when. A
    /// deletion counts the open orders of every shard while the product is already
    /// off the shelf, so no order can be created between the count and the deletion.
    pub async fn change_shelf(&self, id: &str, change: ShelfChange) -> Result<(Shelf, u64), Error> {
        let route = self.registry.get(id).ok_or(Error::ProductNotFound)?;
        let _one_writer = self.merchant_writes.lock().await;
        let current = route.shelf.get();
        let next = match change {
            ShelfChange::Retire => current.retire()?,
            ShelfChange::Relist => current.relist()?,
            ShelfChange::Delete => {
                let mut open = OpenOrders::default();
                if current == Shelf::Retired {
                    for s in &route.shards {
                        open.add(&self.shard_open_orders(s).await?);
                    }
                }
                current.delete(&open)?
            }
        };
        if next != current {
            let now = self.clock.now_ms();
            self.storage.set_shelf(id, next, now)?;
            self.storage.ticket()?.wait().await?;
            route.shelf.set(next, now);
            self.mirror(id).await?;
            tracing::info!(product = id, shelf = next.as_str(), "shelf state changed");
        }
        Ok((next, route.shelf.since_ms()))
    }

    /// Imports keys (already split into lines or array items). Trims each key; empty
    /// ones are ignored; an invalid one rejects the whole batch before anything changes.
    pub async fn import_keys(&self, product: &str, raw: Vec<String>) -> Result<(u64, u64), Error> {
        let (totals, mut away) = self.import_keys_here(product, raw).await?;
        match away.pop() {
            Some((shard, _)) => Err(Error::Elsewhere(shard)),
            None => Ok(totals),
        }
    }

    /// [`Kami::import_keys`] into the shards served here; the keys of shards other
    /// cluster nodes serve come back, by shard, for the caller to send there.
    pub async fn import_keys_here(
        &self,
        product: &str,
        raw: Vec<String>,
    ) -> Result<((u64, u64), Vec<(crate::domain::ShardId, Vec<String>)>), Error> {
        let route = self.listed(product)?;
        if self.key_mode(product) == KeyMode::Reusable {
            return Err(Error::KeyMode(format!(
                "{product} sells a reusable key: set its units with PUT /api/v1/admin/products/{product}/stock"
            )));
        }
        let mut parts: Vec<Vec<String>> = vec![Vec::new(); route.shards.len()];
        for (i, key) in raw.into_iter().enumerate() {
            let key = key.trim();
            if key.is_empty() {
                continue;
            }
            validate::key(key).map_err(|m| Error::Invalid(format!("keys[{i}]: {m}")))?;
            parts[route.shard_index_for_key(key)].push(key.to_string());
        }
        let mut away = Vec::new();
        let mut calls = Vec::new();
        for (i, keys) in parts.into_iter().enumerate().filter(|(_, keys)| !keys.is_empty()) {
            if route.shards[i].place.is_here() {
                calls.push(self.call(&route.shards[i], shard::ImportKeys(keys)));
            } else {
                away.push((route.shards[i].place.shard.clone(), keys));
            }
        }
        let mut totals = (0, 0);
        for result in futures::future::join_all(calls).await {
            let (imported, duplicates) = result?;
            totals = (totals.0 + imported, totals.1 + duplicates);
        }
        Ok((totals, away))
    }

    /// How `product`'s keys are sold.
    pub fn key_mode(&self, product: &str) -> KeyMode {
        if self.reusable.contains(product) {
            KeyMode::Reusable
        } else {
            KeyMode::Unique
        }
    }

    /// Sets the stock of reusable key `key` of a reusable product to `units` units
    /// in all (see [`crate::domain::key_mode`]): the units it lacks are added, spread
    /// over the product's shards like keys; asking again for the same number adds
    /// nothing, so a retry is safe. Units already added are never taken back here
    /// (withdraw them). Returns how many units were added now.
    pub async fn set_reusable_stock(&self, product: &str, key: &str, units: u64) -> Result<u64, Error> {
        let route = self.listed(product)?;
        if self.key_mode(product) != KeyMode::Reusable {
            return Err(Error::KeyMode(format!(
                "{product} sells unique keys: import them with POST /api/v1/products/{product}/keys"
            )));
        }
        validate::key(key).map_err(|m| Error::Invalid(format!("key: {m}")))?;
        if units > key_mode::MAX_UNITS {
            return Err(Error::Invalid(format!("units: must be at most {}", key_mode::MAX_UNITS)));
        }
        let mut added = 0;
        // About one journal event's worth of units per shard at a time: the units of
        // one call are never all in memory, and no shard spends more than a short
        // turn on them while it sells.
        let per_batch = (crate::domain::shard::MAX_KEYS_PER_EVENT * route.shards.len()) as u64;
        let mut start = 0;
        while start < units {
            let end = (start + per_batch).min(units);
            let mut parts: Vec<Vec<String>> = vec![Vec::new(); route.shards.len()];
            for n in start..end {
                let unit = key_mode::unit(key, n);
                parts[route.shard_index_for_key(&unit)].push(unit);
            }
            let calls = parts
                .into_iter()
                .enumerate()
                .filter(|(_, units)| !units.is_empty())
                .map(|(i, units)| self.shard_import(&route.shards[i], units));
            for result in futures::future::join_all(calls).await {
                added += result?.0;
            }
            start = end;
        }
        if added > 0 {
            tracing::info!(product, units, added, "reusable key stock set");
        }
        Ok(added)
    }

    /// Takes keys out of stock (see [`crate::domain::shard::Withdrawal`]): named keys
    /// are asked of every shard (a key may have moved to a sibling), a count is
    /// taken shard by shard until it is reached or nothing is left. Only available
    /// keys leave; each shard journals what it withdrew before this answers.
    pub async fn withdraw_keys(&self, product: &str, what: Withdrawal) -> Result<WithdrawReport, Error> {
        let route = self.listed(product)?;
        match what {
            Withdrawal::Count(n) => {
                let mut left = n;
                for shard in &route.shards {
                    if left == 0 {
                        break;
                    }
                    match self.shard_withdraw(shard, Arc::new(Withdrawal::Count(left))).await {
                        Ok((got, _)) => left -= got.min(left),
                        // Keys already withdrawn (journaled) are never hidden behind
                        // an error: the answer says how many left, as when stock is short.
                        Err(e) if left < n => {
                            tracing::warn!(product, error = %e, "a shard failed part-way through a withdrawal");
                            break;
                        }
                        Err(e) => return Err(e),
                    }
                }
                Ok(WithdrawReport { withdrawn: n - left, not_in_stock: Vec::new(), unknown: Vec::new() })
            }
            Withdrawal::Keys(raw) => {
                if raw.len() > MAX_WITHDRAW_KEYS {
                    return Err(Error::Invalid(format!("at most {MAX_WITHDRAW_KEYS} keys per withdrawal")));
                }
                let mut keys = Vec::with_capacity(raw.len());
                for (i, key) in raw.into_iter().enumerate() {
                    let key = key.trim();
                    validate::key(key).map_err(|m| Error::Invalid(format!("keys[{i}]: {m}")))?;
                    keys.push(key.to_string());
                }
                let mut fates = vec![KeyFate::Unknown; keys.len()];
                let what = Arc::new(Withdrawal::Keys(keys));
                let calls = route.shards.iter().map(|s| self.shard_withdraw(s, what.clone()));
                let mut withdrawn = 0;
                // Every shard is asked even when one fails, so that the answer (an
                // error) never hides a withdrawal that was made and journaled.
                let mut failed = None;
                for result in futures::future::join_all(calls).await {
                    match result {
                        Ok((n, shard_fates)) => {
                            withdrawn += n;
                            for (fate, seen) in fates.iter_mut().zip(shard_fates) {
                                *fate = (*fate).max(seen);
                            }
                        }
                        Err(e) => failed = Some(e),
                    }
                }
                if let Some(e) = failed {
                    return Err(e);
                }
                let Withdrawal::Keys(keys) = &*what else { unreachable!("named keys") };
                let pick = |want: KeyFate| -> Vec<String> {
                    keys.iter().zip(&fates).filter(|(_, f)| **f == want).map(|(k, _)| k.clone()).collect()
                };
                Ok(WithdrawReport {
                    withdrawn,
                    not_in_stock: pick(KeyFate::NotInStock),
                    unknown: pick(KeyFate::Unknown),
                })
            }
        }
    }

    pub fn product(&self, id: &str) -> Result<ProductView, Error> {
        self.listed(id)?;
        self.product_as_merchant(id)
    }

    /// A product as its merchant sees it: deleted ones too.
    pub fn product_as_merchant(&self, id: &str) -> Result<ProductView, Error> {
        let route = self.registry.get(id).ok_or(Error::ProductNotFound)?;
        Ok(self.view(&route))
    }

    fn view(&self, route: &crate::actors::ProductRoute) -> ProductView {
        let counts = route.counts();
        let (info, terms) = route.current_info();
        ProductView {
            info,
            terms: terms.terms.clone(),
            available: counts.available,
            counts,
            shelf: route.shelf.get(),
            shelf_since_ms: route.shelf.since_ms(),
            key_mode: self.key_mode(&route.info.id),
        }
    }

    /// One page of products in id order, after the id `after` (exclusive), at most
    /// `limit` (1..=[`MAX_CATALOGUE_PAGE`]); with the id to continue after when
    /// there may be more.
    pub fn catalogue(
        &self,
        which: Catalogue,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<ProductView>, Option<String>), Error> {
        if limit == 0 || limit > MAX_CATALOGUE_PAGE {
            return Err(Error::Invalid(format!("limit: must be 1..={MAX_CATALOGUE_PAGE}")));
        }
        let routes = self.registry.all();
        let mut ids: Vec<&String> = routes
            .iter()
            .filter(|(id, r)| {
                after.is_none_or(|a| id.as_str() > a) && (which == Catalogue::All || r.shelf.get().sells())
            })
            .map(|(id, _)| id)
            .collect();
        ids.sort_unstable();
        let more = ids.len() > limit;
        let page: Vec<ProductView> = ids.into_iter().take(limit).map(|id| self.view(&routes[id])).collect();
        let next = if more { page.last().map(|p| p.info.id.clone()) } else { None };
        Ok((page, next))
    }

    /// Changes a product's terms and/or puts it on or off the shelf; each part is
    /// durable when this returns. The terms are checked whole before anything is
    /// written; orders already created keep their amounts.
    pub async fn change_product(&self, id: &str, change: ProductChange) -> Result<ProductView, Error> {
        let route = self.listed(id)?;
        if !change.terms.is_empty() {
            let _one_writer = self.merchant_writes.lock().await;
            let current = route.terms.get();
            let next = current.terms.changed(&change.terms).map_err(Error::Invalid)?;
            if next != current.terms {
                self.storage.set_terms(id, &next)?;
                self.storage.ticket()?.wait().await?;
                tracing::info!(product = id, price_cents = next.price_cents, "terms of sale changed");
                route.terms.set(next);
                self.mirror(id).await?;
            }
        }
        if let Some(on_sale) = change.on_sale {
            self.change_shelf(id, if on_sale { ShelfChange::Relist } else { ShelfChange::Retire }).await?;
        }
        Ok(self.view(&route))
    }

    pub async fn audit(&self) -> Result<AuditReport, Error> {
        let routes = self.registry.all();
        let mut ids: Vec<&String> = routes.keys().collect();
        ids.sort();
        // Points first (see `Auditor` for why the order matters).
        let points = self.audit_points().await?;
        let mut auditor = Auditor::new();
        // Coupons before and after the stock (see `Auditor::coupons_before`).
        auditor.coupons_before(&self.audit_coupons().await?);
        for id in ids {
            let route = &routes[id];
            let mut audits = self.audit_here(route).await?;
            // A cluster node asks the nodes serving the others.
            let away: Vec<u16> =
                route.shards.iter().filter(|s| !s.place.is_here()).map(|s| s.place.shard.shard).collect();
            if !away.is_empty() {
                let cluster = self
                    .cluster
                    .get()
                    .ok_or_else(|| Error::Elsewhere(crate::domain::ShardId::new(id.as_str(), away[0])))?;
                audits.extend(cluster.gather_audits(id, &away).await?);
                audits.sort_by_key(|a| a.shard);
                // A lease that ended between the two lists left a shard out of both.
                if audits.len() != route.shards.len() {
                    return Err(Error::Unavailable(format!("shards of {id} moved during the audit; try again")));
                }
            }
            auditor.add_product(id, audits, true);
        }
        auditor.add_coupons(self.audit_coupons().await?);
        Ok(auditor.finish(points))
    }

    /// The audits of `route`'s shards served here (all of them on one server).
    pub(crate) async fn audit_here(&self, route: &crate::actors::ProductRoute) -> Result<Vec<ShardAudit>, Error> {
        let mut audits = Vec::with_capacity(route.shards.len());
        for (i, s) in route.shards.iter().enumerate().filter(|(_, s)| s.place.is_here()) {
            // The audit is not admission-controlled: it must work under overload.
            let a: ShardAudit = match tokio::time::timeout(self.limits.request_timeout, s.addr.send(shard::Audit)).await
            {
                Ok(Ok(r)) => r?,
                _ => {
                    return Err(Error::Unavailable(format!("shard {i} of {} did not answer the audit", route.info.id)))
                }
            };
            audits.push(a);
        }
        Ok(audits)
    }

    /// For another cluster node's audit: the audits of `product`'s shards served
    /// here, encoded ([`cluster::encode_audits`]).
    pub async fn audit_for_node(&self, product: &str) -> Result<Vec<u8>, Error> {
        let route = self.registry.get(product).ok_or(Error::ProductNotFound)?;
        Ok(super::cluster::encode_audits(self.audit_here(&route).await?))
    }
}
