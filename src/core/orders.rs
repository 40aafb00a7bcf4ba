//! Buyers' orders: creation (pinned Idempotency-Keys, keys borrowed from sibling
//! shards when a shard is dry, see `borrow`), reads and cancels.

use super::*;
use crate::domain::lookup::PasswordHash;

impl Kami {
    /// (A request with a query password adds its stored form; without one, the
    /// fingerprint is what it always was: fingerprints are kept with orders.)
    fn fingerprint(req: &OrderRequest, password: Option<&PasswordHash>) -> [u8; 16] {
        let parts = [req.product_id.as_bytes(), &req.quantity.to_be_bytes(), req.buyer.as_bytes()];
        match password {
            None => digest(&parts),
            Some(p) => digest(&[&parts[..], &[&p[..]]].concat()),
        }
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
        let password = match &req.query_password {
            Some(p) => Some(self.password_hash(&req.buyer, p).await?),
            None => None,
        };
        // Hashed only when there is a key to pin it to.
        let idempotency = match idempotency_key {
            Some(key) => {
                let fingerprint = Self::fingerprint(&req, password.as_ref());
                self.pin(&key, fingerprint)?;
                Some(Idempotency { key, fingerprint })
            }
            None => None,
        };
        let new = NewOrder {
            buyer: req.buyer.clone(),
            quantity: req.quantity as u32,
            idempotency: idempotency.clone(),
            query_token: new_token(),
            ttl_ms: self.ttl_ms,
            password,
        };
        let home = route.shard_index_for_new_order(&req.buyer, route.terms.per_buyer_limit(), idempotency.is_some());
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
        self.settle_pin(&idempotency, &result);
        result
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
        self.call(&route.shards[id.shard.shard as usize], msg).await
    }
}
