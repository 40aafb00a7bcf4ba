//! Buyers' orders: creation (pinned Idempotency-Keys, keys borrowed from sibling
//! shards when a shard is dry, see `borrow`), reads and cancels.

use super::*;
use crate::domain::lookup::PasswordHash;

impl Kami {
    /// (A request with a query password adds its stored form; without one, the
    /// fingerprint is what it always was: fingerprints are kept with orders.)
    /// A coupon adds its code (after the password, if any).
    fn fingerprint(req: &OrderRequest, password: Option<&PasswordHash>) -> [u8; 16] {
        let quantity = req.quantity.to_be_bytes();
        let mut parts: Vec<&[u8]> = vec![req.product_id.as_bytes(), &quantity, req.buyer.as_bytes()];
        parts.extend(password.map(|p| &p[..]));
        parts.extend(req.coupon.as_ref().map(|c| c.as_bytes()));
        digest(&parts)
    }

    pub async fn create_order(
        &self,
        req: OrderRequest,
        idempotency_key: Option<String>,
    ) -> Result<OrderSnapshot, Error> {
        if req.quantity == 0 || req.quantity > self.limits.max_quantity as u64 {
            return Err(Error::Invalid(format!("quantity: must be 1..={}", self.limits.max_quantity)));
        }
        validate::buyer(&req.buyer).map_err(Error::Invalid)?;
        if let Some(k) = &idempotency_key {
            validate::token("Idempotency-Key", k).map_err(Error::Invalid)?;
        }
        let route = self.listed(&req.product_id)?;
        // Chosen before anything is held: a cluster node sends the order on to the
        // node serving its shard when that is not this one.
        let idempotent = idempotency_key.is_some() || req.coupon.is_some();
        let home = route.shard_index_for_new_order(&req.buyer, route.terms.per_buyer_limit(), idempotent);
        if !route.shards[home].place.is_here() {
            return Err(Error::Elsewhere(route.shards[home].place.shard.clone()));
        }
        let password = match &req.query_password {
            Some(p) => Some(self.password_hash(&req.buyer, p).await?),
            None => None,
        };
        // Hashed only when there is a key to pin it to. An order with a coupon
        // always has one: the resolver finds the hold's order by it.
        let coupon_ids = req.coupon.as_ref().map(|_| Self::coupon_hold_ids(idempotency_key.as_deref()));
        let client_key = idempotency_key.is_some();
        let idempotency = match (idempotency_key, &coupon_ids) {
            (Some(key), _) => {
                let fingerprint = Self::fingerprint(&req, password.as_ref());
                self.pin(&key, fingerprint)?;
                Some(Idempotency { key, fingerprint })
            }
            (None, Some((_, key))) => {
                Some(Idempotency { key: key.clone(), fingerprint: Self::fingerprint(&req, password.as_ref()) })
            }
            (None, None) => None,
        };
        let coupon = match (&req.coupon, coupon_ids) {
            (Some(code), Some((hold, key))) => match self.hold_coupon(code, &req, &key, hold).await {
                Ok(used) => Some(used),
                Err(e) => {
                    let e = Err(e);
                    self.settle_pin(idempotency.as_ref().filter(|_| client_key), &e);
                    return e;
                }
            },
            _ => None,
        };
        let new = NewOrder {
            buyer: req.buyer.clone(),
            quantity: req.quantity as u32,
            idempotency: idempotency.clone(),
            query_token: new_token(),
            ttl_ms: self.ttl_ms,
            password,
            coupon: coupon.clone(),
            reseller: req.reseller.clone(),
        };
        let result = if route.shards.len() == 1 {
            self.call_in(Lane::NewOrder, &route.shards[home], shard::CreateOrder(new)).await
        } else {
            match self.call_in(Lane::NewOrder, &route.shards[home], shard::CreateOrder(new.clone())).await {
                Err(Error::Domain(DomainError::SoldOut { .. })) => {
                    self.order_with_borrowed_keys(&route, home, new.quantity, || shard::CreateOrder(new.clone())).await
                }
                other => other,
            }
        };
        self.settle_pin(idempotency.as_ref().filter(|_| client_key), &result);
        if let Some(used) = &coupon {
            self.after_coupon_order(used, &result).await;
        }
        result
    }

    /// In a cluster: the shards of `product` other nodes serve, for an order this
    /// node's shards could not serve (sold out here), starting at the buyer's hash
    /// among them. Empty on one server, for a product with a per-buyer limit (its
    /// orders stay on the buyer's shard), or when this node serves every shard.
    pub fn siblings_elsewhere(&self, product: &str, buyer: &str) -> Vec<crate::domain::ShardId> {
        let Some(route) = self.registry.get(product) else { return Vec::new() };
        if route.terms.per_buyer_limit() > 0 {
            return Vec::new();
        }
        let away: Vec<crate::domain::ShardId> =
            route.shards.iter().filter(|s| !s.place.is_here()).map(|s| s.place.shard.clone()).collect();
        if away.is_empty() {
            return away;
        }
        let start = crate::actors::registry::buyer_shard(buyer, away.len());
        away[start..].iter().chain(&away[..start]).cloned().collect()
    }

    pub(super) fn locate(&self, order_id: &str) -> Result<(OrderId, Arc<crate::actors::ProductRoute>), Error> {
        let id = OrderId::parse(order_id).ok_or(DomainError::OrderNotFound)?;
        let route = self.route_to(&id.shard, DomainError::OrderNotFound)?;
        Ok((id, route))
    }

    /// The route of the product that owns `shard`, or `not_found` if there is no such
    /// product or shard (order and group ids name their shard).
    pub(super) fn route_to(
        &self,
        shard: &crate::domain::ShardId,
        not_found: DomainError,
    ) -> Result<Arc<crate::actors::ProductRoute>, Error> {
        match self.registry.get(&shard.product) {
            Some(route) if (shard.shard as usize) < route.shards.len() => Ok(route),
            _ => Err(not_found.into()),
        }
    }

    /// `token: None` reads as the merchant (no token check).
    pub async fn get_order(&self, order_id: &str, token: Option<&str>) -> Result<OrderSnapshot, Error> {
        let (id, route) = self.locate(order_id)?;
        let msg = shard::GetOrder { seq: id.seq, token: token.map(str::to_string) };
        self.call(&route.shards[id.shard.shard as usize], msg).await
    }

    pub async fn cancel_order(&self, order_id: &str, token: &str) -> Result<OrderSnapshot, Error> {
        let (id, route) = self.locate(order_id)?;
        let msg = shard::CancelOrder { seq: id.seq, token: token.to_string() };
        let order: OrderSnapshot = self.call(&route.shards[id.shard.shard as usize], msg).await?;
        // Its coupon use comes back now rather than at the resolver's next round.
        if let Some(c) = order.pricing.as_ref().and_then(|p| p.coupon.as_ref()) {
            if order.order.status == crate::domain::OrderStatus::Cancelled {
                let reason = crate::domain::coupon::Finish::Released { reason: "cancelled".into() };
                self.finish_coupon(&c.code, &c.hold, reason).await;
            }
        }
        Ok(order)
    }
}
