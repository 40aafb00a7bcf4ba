//! Group-buy through the core (see [`crate::domain::group`]): deals are merchant
//! settings kept in storage and in memory; groups live in stock shards.
//!
//! Every group of a deal lives in one shard of its product, the deal's shard
//! (`hash(deal id)`): "join any open group" then sees every open group of the deal
//! in one place and fills one group before the next, and a repeated request with
//! the same Idempotency-Key always reaches the shard that answered it first.

use super::*;
use crate::actors::shard::{GroupSeat, GroupSnapshot};
use crate::domain::group::{self, GroupDeal, GroupId};

/// Most open groups one listing returns.
pub const MAX_OPEN_GROUPS_LISTED: usize = 50;

/// Create a group-buy deal of a product.
#[derive(Debug, Clone)]
pub struct NewDeal {
    pub deal_id: String,
    pub group_size: u32,
    pub price_cents: u64,
    pub time_limit_secs: u64,
}

/// Open a group, or with `join_open` take a seat in the oldest open group of the
/// deal that has one (opening a group if none has).
#[derive(Debug, Clone)]
pub struct OpenGroupRequest {
    pub product_id: String,
    pub deal_id: String,
    pub buyer: String,
    pub join_open: bool,
}

/// Take a seat in a given group.
#[derive(Debug, Clone)]
pub struct JoinRequest {
    pub buyer: String,
}

impl Kami {
    /// Creates a deal; the same deal again (same terms) is answered `false`
    /// (not created), other terms under the same id are `deal_exists`. Durable
    /// when it returns.
    pub async fn create_group_deal(&self, product: &str, d: NewDeal) -> Result<(GroupDeal, bool), Error> {
        let info = self.listed(product)?.info.clone();
        if !validate::is_product_id(&d.deal_id) {
            return Err(Error::Invalid("deal_id: must match [a-z0-9_-]{1,64}".into()));
        }
        let (max_size, max_secs) = (self.limits.max_group_size, self.limits.max_group_time_limit_secs);
        group::validate_deal(d.group_size, d.price_cents, d.time_limit_secs, max_size, max_secs)
            .map_err(Error::Invalid)?;
        let _one_writer = self.merchant_writes.lock().await;
        let key = (product.to_string(), d.deal_id.clone());
        if let Some(old) = self.deals.get(&key) {
            let same = (old.group_size, old.price_cents, old.time_limit_secs)
                == (d.group_size, d.price_cents, d.time_limit_secs);
            return if same { Ok((old.clone(), false)) } else { Err(DomainError::DealExists.into()) };
        }
        let max_deals = self.limits.max_deals_per_product;
        if self.deals.iter().filter(|e| e.key().0 == product).count() >= max_deals {
            return Err(Error::Invalid(format!("a product carries at most {max_deals} group deals")));
        }
        let deal = GroupDeal {
            product_id: info.id,
            deal_id: d.deal_id,
            group_size: d.group_size,
            price_cents: d.price_cents,
            time_limit_secs: d.time_limit_secs,
            created_at_ms: self.clock.now_ms(),
        };
        self.storage.put_group_deal(&deal)?;
        self.storage.ticket()?.wait().await?;
        self.deals.insert(key, deal.clone());
        self.mirror(&deal.product_id).await?;
        Ok((deal, true))
    }

    /// A product's deals, by id.
    pub fn group_deals(&self, product: &str) -> Result<Vec<GroupDeal>, Error> {
        self.listed(product)?;
        let mut deals: Vec<GroupDeal> =
            self.deals.iter().filter(|e| e.key().0 == product).map(|e| e.value().clone()).collect();
        deals.sort_by(|a, b| a.deal_id.cmp(&b.deal_id));
        Ok(deals)
    }

    /// Opens a group of a deal (or joins the oldest open one, `join_open`) for the buyer.
    pub async fn open_group(&self, req: OpenGroupRequest, idempotency_key: Option<String>) -> Result<GroupSeat, Error> {
        validate::buyer(&req.buyer).map_err(Error::Invalid)?;
        let route = self.listed(&req.product_id)?;
        let deal = self
            .deals
            .get(&(req.product_id.clone(), req.deal_id.clone()))
            .map(|d| d.clone())
            .ok_or(Error::Domain(DomainError::DealNotFound))?;
        let kind: &[u8] = if req.join_open { b"group-join-open" } else { b"group-open" };
        let fp = digest(&[kind, req.product_id.as_bytes(), req.deal_id.as_bytes(), req.buyer.as_bytes()]);
        let (order, idempotency) = self.seat_request(&req.buyer, idempotency_key, fp)?;
        let home = route.shard_index_for_deal(&deal.deal_id);
        let terms = deal.terms();
        let result = if req.join_open {
            self.seat_with_borrowed_keys(&route, home, || shard::JoinAnyGroup {
                terms: terms.clone(),
                order: order.clone(),
            })
            .await
        } else {
            self.seat_with_borrowed_keys(&route, home, || shard::OpenGroup {
                terms: terms.clone(),
                order: order.clone(),
            })
            .await
        };
        self.settle_pin(idempotency.as_ref(), &result);
        result
    }

    /// Takes a seat in the group `group_id`.
    pub async fn join_group(
        &self,
        group_id: &str,
        req: JoinRequest,
        idempotency_key: Option<String>,
    ) -> Result<GroupSeat, Error> {
        validate::buyer(&req.buyer).map_err(Error::Invalid)?;
        let (id, route) = self.locate_group(group_id)?;
        let fp = digest(&[b"group-join", group_id.as_bytes(), req.buyer.as_bytes()]);
        let (order, idempotency) = self.seat_request(&req.buyer, idempotency_key, fp)?;
        let join = || shard::JoinGroup { group: id.seq, order: order.clone() };
        let result = self.seat_with_borrowed_keys(&route, id.shard.shard as usize, join).await;
        self.settle_pin(idempotency.as_ref(), &result);
        result
    }

    /// Open groups of a deal that a buyer could join now, oldest first (at most
    /// [`MAX_OPEN_GROUPS_LISTED`]).
    pub async fn open_groups(&self, product: &str, deal_id: &str, limit: usize) -> Result<Vec<GroupSnapshot>, Error> {
        let route = self.listed(product)?;
        if !self.deals.contains_key(&(product.to_string(), deal_id.to_string())) {
            return Err(DomainError::DealNotFound.into());
        }
        let msg = shard::ListOpenGroups { deal_id: deal_id.to_string(), limit: limit.min(MAX_OPEN_GROUPS_LISTED) };
        self.call(&route.shards[route.shard_index_for_deal(deal_id)], msg).await
    }

    pub async fn get_group(&self, group_id: &str) -> Result<GroupSnapshot, Error> {
        let (id, route) = self.locate_group(group_id)?;
        self.call(&route.shards[id.shard.shard as usize], shard::GetGroup(id.seq)).await
    }

    fn locate_group(&self, group_id: &str) -> Result<(GroupId, Arc<crate::actors::ProductRoute>), Error> {
        let id = GroupId::parse(group_id).ok_or(DomainError::GroupNotFound)?;
        let route = self.route_to(&id.shard, DomainError::GroupNotFound)?;
        Ok((id, route))
    }

    /// The order a seat is taken with, its Idempotency-Key pinned to `fingerprint`.
    fn seat_request(
        &self,
        buyer: &str,
        idempotency_key: Option<String>,
        fingerprint: [u8; 16],
    ) -> Result<(NewOrder, Option<Idempotency>), Error> {
        let idempotency = match idempotency_key {
            Some(key) => {
                validate::token("Idempotency-Key", &key).map_err(Error::Invalid)?;
                self.pin(&key, fingerprint)?;
                Some(Idempotency { key, fingerprint })
            }
            None => None,
        };
        let order = NewOrder {
            buyer: buyer.to_string(),
            quantity: 1,
            idempotency: idempotency.clone(),
            query_token: new_token(),
            ttl_ms: self.ttl_ms,
            password: None,
            coupon: None,
            reseller: None,
        };
        Ok((order, idempotency))
    }

    /// A seat in shard `home`; when it is dry, keys are borrowed from its siblings.
    async fn seat_with_borrowed_keys<M>(
        &self,
        route: &crate::actors::ProductRoute,
        home: usize,
        msg: impl Fn() -> M,
    ) -> Result<GroupSeat, Error>
    where
        M: Message<Result = ActorResult<GroupSeat>> + Send + 'static,
        ShardActor: Handler<M>,
    {
        match self.call_in(Lane::NewOrder, &route.shards[home], msg()).await {
            Err(Error::Domain(DomainError::SoldOut { .. })) if route.shards.len() > 1 => {
                self.order_with_borrowed_keys(route, home, 1, msg).await
            }
            other => other,
        }
    }
}
