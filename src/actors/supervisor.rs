use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;

use super::registry::{start_shard, ProductRoute, Registry, ShelfCell, TermsCell};
use super::shard::{rebuild, Rebuilt, ShardEnv};
use super::Kill;
use crate::domain::terms::Terms;
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
pub struct ProductSupervisor {
    env: Arc<ShardEnv>,
    arbiters: Vec<ArbiterHandle>,
    registry: Arc<Registry>,
    next_arbiter: usize,
}

#[derive(Message)]
#[rtype(result = "Result<ProductInfo, SupervisorError>")]
pub struct CreateProduct(pub ProductInfo);

/// Starts a product the data directory holds but the registry lacks (a cluster
/// node learning of a product created on another node); nothing if it runs.
#[derive(Message)]
#[rtype(result = "Result<(), SupervisorError>")]
pub struct StartProduct(pub ProductInfo);

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

/// A product's shelf state and terms, shared by its route and its actors.
type Cells = (Arc<ShelfCell>, Arc<TermsCell>);

impl ProductSupervisor {
    /// Rebuilds every product's shards from storage (in parallel, off the async
    /// threads), starts their actors, and fills the registry.
    pub async fn recover(
        env: Arc<ShardEnv>,
        arbiters: Vec<ArbiterHandle>,
        registry: Arc<Registry>,
    ) -> Result<(ProductSupervisor, RecoveryReport), StorageError> {
        assert!(!arbiters.is_empty());
        let started = Instant::now();
        let products = env.storage.load_products()?;
        let mut report = RecoveryReport { products: products.len(), ..RecoveryReport::default() };
        let mut jobs = Vec::new();
        for product in &products {
            for shard in 0..product.shards {
                let (env, product) = (env.clone(), product.clone());
                jobs.push(tokio::spawn(async move {
                    if env.clustered {
                        // A cluster node rebuilds a shard when it takes its lease.
                        return Ok::<_, StorageError>((product, shard, None));
                    }
                    let id = ShardId::new(product.id.clone(), shard);
                    let r = rebuild(&env, id.clone(), product.clone()).await?;
                    super::shard::claim_payments(&env, &id, &r.shard);
                    Ok::<_, StorageError>((product, shard, Some(r)))
                }));
            }
        }
        let shelves = env.storage.shelves()?;
        let shelf_of = |id: &str| {
            let (shelf, since) = shelves.get(id).copied().unwrap_or_default();
            Arc::new(ShelfCell::new(shelf, since))
        };
        let mut terms = env.storage.all_terms()?;
        let mut sup = ProductSupervisor { env, arbiters, registry, next_arbiter: 0 };
        let mut shards_by_product: Vec<(ProductInfo, Cells, Vec<_>)> = Vec::new();
        for job in jobs {
            let (product, index, recovered) =
                job.await.map_err(|e| StorageError::Sled(format!("recovery task failed: {e}")))??;
            report.shards += 1;
            if let Some(recovered) = &recovered {
                report.events_replayed += recovered.replayed;
                report.journal_bytes += recovered.journal_bytes;
                report.idempotency_keys.extend(recovered.shard.idempotency_keys().map(|(k, fp)| (k.to_string(), fp)));
            }
            let arbiter = sup.pick_arbiter();
            if shards_by_product.last().is_none_or(|(p, _, _)| p.id != product.id) {
                let shelf = shelf_of(&product.id);
                let terms = terms.remove(&product.id).unwrap_or_else(|| Terms::of(&product));
                shards_by_product.push((product.clone(), (shelf, Arc::new(TermsCell::new(terms))), Vec::new()));
            }
            let (_, (shelf, terms), handles) = shards_by_product.last_mut().expect("pushed above");
            handles.push(start_shard(&sup.env, (arbiter.0, &arbiter.1), (&product, index), (shelf, terms), recovered));
        }
        for (info, (shelf, terms), shards) in shards_by_product {
            assert_eq!(shards.len(), info.shards as usize);
            sup.registry.insert(ProductRoute::new(info, shards, shelf, terms));
        }
        report.elapsed = started.elapsed();
        Ok((sup, report))
    }
}

impl ProductSupervisor {
    fn pick_arbiter(&mut self) -> (usize, ArbiterHandle) {
        let index = self.next_arbiter % self.arbiters.len();
        self.next_arbiter += 1;
        (index, self.arbiters[index].clone())
    }

    /// Rebuilds every shard of `info` from storage (in parallel), then starts their
    /// actors and publishes the route. Nothing starts unless every shard was
    /// rebuilt, so a failure never leaves an unregistered actor writing to a journal.
    fn start_product(&mut self, info: ProductInfo) -> impl ActorFuture<Self, Output = Result<(), StorageError>> {
        let env = self.env.clone();
        let product = info.clone();
        let rebuilding = async move {
            if env.clustered {
                // A cluster node rebuilds a shard when it takes its lease.
                return Ok((0..product.shards).map(|_| None).collect());
            }
            let shards = (0..product.shards).map(|s| {
                let (env, product) = (env.clone(), product.clone());
                async move { rebuild(&env, ShardId::new(product.id.clone(), s), product).await.map(Some) }
            });
            futures::future::try_join_all(shards).await
        };
        fut::wrap_future::<_, Self>(rebuilding).map(move |rebuilt, act, _| act.install_product(&info, rebuilt?))
    }

    /// Starts the actors of `info`'s rebuilt shards and publishes the route.
    fn install_product(&mut self, info: &ProductInfo, rebuilt: Vec<Option<Rebuilt>>) -> Result<(), StorageError> {
        let (shelf, since) = self.env.storage.shelf(&info.id)?;
        let shelf = Arc::new(ShelfCell::new(shelf, since));
        let terms = self.env.storage.terms(&info.id)?.unwrap_or_else(|| Terms::of(info));
        let terms = Arc::new(TermsCell::new(terms));
        let shards = rebuilt
            .into_iter()
            .enumerate()
            .map(|(index, r)| {
                let arbiter = self.pick_arbiter();
                start_shard(&self.env, (arbiter.0, &arbiter.1), (info, index as u16), (&shelf, &terms), r)
            })
            .collect();
        self.registry.insert(ProductRoute::new(info.clone(), shards, shelf, terms));
        Ok(())
    }
}

impl Actor for ProductSupervisor {
    type Context = Context<Self>;
}

impl Supervised for ProductSupervisor {
    /// The supervisor's state is the registry, which lives outside the actor; a
    /// restart re-reads the product records and starts any product that storage
    /// holds but the registry lacks (a creation interrupted by the crash).
    fn restarting(&mut self, ctx: &mut Context<Self>) {
        metrics::counter!("kami_actor_restarts_total", "actor" => "orders").increment(1);
        let products = match self.env.storage.load_products() {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "product supervisor could not read the products after a restart");
                return;
            }
        };
        let registry = self.registry.clone();
        for info in products.iter().filter(|p| registry.get(&p.id).is_none()) {
            let id = info.id.clone();
            ctx.spawn(self.start_product(info.clone()).map(move |started, _, _| match started {
                Ok(()) => tracing::warn!(product = %id, "product found in storage only; started it"),
                Err(e) => tracing::error!(product = %id, error = %e, "product could not be started"),
            }));
        }
        tracing::info!(products = products.len(), "product supervisor restarted");
    }
}

impl Handler<Kill> for ProductSupervisor {
    type Result = ();

    fn handle(&mut self, _: Kill, ctx: &mut Context<Self>) {
        tracing::warn!("product supervisor killed on request");
        ctx.stop();
    }
}

impl Handler<StartProduct> for ProductSupervisor {
    type Result = ResponseActFuture<Self, Result<(), SupervisorError>>;

    fn handle(&mut self, msg: StartProduct, _ctx: &mut Context<Self>) -> Self::Result {
        if self.registry.get(&msg.0.id).is_some() {
            return Box::pin(fut::ready(Ok(())));
        }
        Box::pin(self.start_product(msg.0).map(|started, _, _| Ok(started?)))
    }
}

impl Handler<CreateProduct> for ProductSupervisor {
    type Result = ResponseActFuture<Self, Result<ProductInfo, SupervisorError>>;

    fn handle(&mut self, msg: CreateProduct, _ctx: &mut Context<Self>) -> Self::Result {
        let info = msg.0;
        let inserted = (|| {
            if self.registry.get(&info.id).is_some() || !self.env.storage.insert_product(&info)? {
                return Err(SupervisorError::Exists);
            }
            Ok(())
        })();
        if let Err(e) = inserted {
            return Box::pin(fut::ready(Err(e)));
        }
        let started = self.start_product(info.clone()).map(|started, act, _| {
            started?;
            Ok::<_, SupervisorError>(act.env.storage.ticket()?)
        });
        Box::pin(started.then(move |ticket, _, _| {
            fut::wrap_future(async move {
                // Orders on the new product can only be acknowledged after a flush
                // that also covers the product record, so publishing the route
                // first is safe.
                ticket?.wait().await?;
                Ok(info)
            })
        }))
    }
}
