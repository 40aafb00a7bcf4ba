use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;

use super::registry::{start_shard, ProductRoute, Registry};
use super::shard::ShardEnv;
use crate::domain::{ProductInfo, ShardId};
use crate::storage::StorageError;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SupervisorError {
    #[error("a product with this id exists")]
    Exists,
    #[error("storage: {0}")]
    Storage(#[from] StorageError),
}

/// Registry owner and parent of the stock actors. Product creation is serialised
/// here (so two creations of one id cannot race); orders never pass through it.
pub struct OrderSupervisor {
    env: Arc<ShardEnv>,
    arbiters: Vec<ArbiterHandle>,
    registry: Arc<Registry>,
    next_arbiter: usize,
}

#[derive(Message)]
#[rtype(result = "Result<ProductInfo, SupervisorError>")]
pub struct CreateProduct(pub ProductInfo);

/// What start-up recovery did.
#[derive(Debug, Clone, Default)]
pub struct RecoveryReport {
    pub products: usize,
    pub shards: usize,
    pub events_replayed: u64,
    pub journal_bytes: u64,
    pub elapsed: Duration,
    /// Idempotency-Keys held by the recovered shards, with their fingerprints.
    pub idempotency_keys: Vec<(String, [u8; 16])>,
}

impl OrderSupervisor {
    /// Rebuilds every product's shards from storage (in parallel, off the async
    /// threads), starts their actors, and fills the registry.
    pub async fn recover(
        env: Arc<ShardEnv>,
        arbiters: Vec<ArbiterHandle>,
        registry: Arc<Registry>,
    ) -> Result<(OrderSupervisor, RecoveryReport), StorageError> {
        assert!(!arbiters.is_empty());
        let started = Instant::now();
        let products = env.storage.load_products()?;
        let mut report = RecoveryReport { products: products.len(), ..RecoveryReport::default() };
        let mut jobs = Vec::new();
        for product in &products {
            for shard in 0..product.shards {
                let (storage, product) = (env.storage.clone(), product.clone());
                jobs.push(tokio::task::spawn_blocking(move || {
                    let id = ShardId::new(product.id.clone(), shard);
                    storage.recover(&id, &product).map(|r| (product, r))
                }));
            }
        }
        let mut sup = OrderSupervisor { env, arbiters, registry, next_arbiter: 0 };
        let mut shards_by_product: Vec<(ProductInfo, Vec<_>)> = Vec::new();
        for job in jobs {
            let (product, recovered) =
                job.await.map_err(|e| StorageError::Sled(format!("recovery task failed: {e}")))??;
            report.shards += 1;
            report.events_replayed += recovered.replayed;
            report.journal_bytes += recovered.journal_bytes;
            report.idempotency_keys.extend(recovered.shard.idempotency_keys().map(|(k, fp)| (k.to_string(), fp)));
            let arbiter = sup.pick_arbiter();
            let handle = start_shard(&sup.env, &arbiter, &product, recovered);
            match shards_by_product.last_mut() {
                Some((p, handles)) if p.id == product.id => handles.push(handle),
                _ => shards_by_product.push((product, vec![handle])),
            }
        }
        for (info, shards) in shards_by_product {
            assert_eq!(shards.len(), info.shards as usize);
            sup.registry.insert(ProductRoute { info, shards });
        }
        report.elapsed = started.elapsed();
        Ok((sup, report))
    }

    fn pick_arbiter(&mut self) -> ArbiterHandle {
        let a = self.arbiters[self.next_arbiter % self.arbiters.len()].clone();
        self.next_arbiter += 1;
        a
    }
}

impl Actor for OrderSupervisor {
    type Context = Context<Self>;
}

impl Handler<CreateProduct> for OrderSupervisor {
    type Result = ResponseFuture<Result<ProductInfo, SupervisorError>>;

    fn handle(&mut self, msg: CreateProduct, _ctx: &mut Context<Self>) -> Self::Result {
        let info = msg.0;
        let result = (|| {
            if self.registry.get(&info.id).is_some() || !self.env.storage.insert_product(&info)? {
                return Err(SupervisorError::Exists);
            }
            let mut shards = Vec::with_capacity(info.shards as usize);
            for shard in 0..info.shards {
                let recovered = self.env.storage.recover(&ShardId::new(info.id.clone(), shard), &info)?;
                let arbiter = self.pick_arbiter();
                shards.push(start_shard(&self.env, &arbiter, &info, recovered));
            }
            self.registry.insert(ProductRoute { info: info.clone(), shards });
            Ok(self.env.storage.ticket()?)
        })();
        Box::pin(async move {
            // Orders on the new product can only be acknowledged after a flush that
            // also covers the product record, so publishing the route first is safe.
            result?.wait().await?;
            Ok(info)
        })
    }
}
