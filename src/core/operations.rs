//! Operations: snapshots of every shard, reconciliation, and chaos kills.

use super::*;

impl Kami {
    /// Snapshots every shard and flushes (graceful shutdown, admin request).
    /// Returns the number of shards snapshotted.
    pub async fn snapshot_all(&self) -> Result<usize, Error> {
        let mut shards = 0;
        for route in self.registry.all().values() {
            // (A cluster node snapshots the shards it serves; the others' nodes theirs.)
            for s in route.shards.iter().filter(|s| s.place.is_here()) {
                match tokio::time::timeout(self.limits.request_timeout, s.addr.send(shard::TakeSnapshot)).await {
                    Ok(Ok(r)) => r?,
                    Ok(Err(_)) => return Err(Error::Unavailable("a stock actor stopped".into())),
                    Err(_) => return Err(Error::Timeout),
                }
                shards += 1;
            }
        }
        self.storage.flush_now()?;
        Ok(shards)
    }

    // ---- chaos ----

    /// Kills the actor(s) named by `target` (see [`crate::chaos`]) and returns the
    /// name of what was killed. Each kill is answered by the actor before it stops,
    /// so when this returns the actor is down or already rebuilding.
    pub async fn chaos_kill(&self, target: &KillTarget) -> Result<String, Error> {
        let target = match target {
            KillTarget::Random => self.random_actor(),
            other => other.clone(),
        };
        let kill = |sent: Result<Result<(), MailboxError>, tokio::time::error::Elapsed>| match sent {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(Error::Unavailable("the actor stopped before the kill".into())),
            Err(_) => Err(Error::Timeout),
        };
        let timeout = self.limits.request_timeout;
        match target {
            KillTarget::Random => unreachable!("resolved above"),
            KillTarget::Orders => {
                kill(tokio::time::timeout(timeout, self.supervisor.send(Kill)).await)?;
                Ok("orders".into())
            }
            KillTarget::Payments => {
                kill(tokio::time::timeout(timeout, self.payments.send(Kill)).await)?;
                Ok("payments".into())
            }
            KillTarget::Points => {
                for h in &self.points {
                    kill(tokio::time::timeout(timeout, h.addr.send(Kill)).await)?;
                }
                Ok("points".into())
            }
            KillTarget::Coupons => {
                for h in &self.coupons {
                    kill(tokio::time::timeout(timeout, h.addr.send(Kill)).await)?;
                }
                Ok("coupons".into())
            }
            KillTarget::Product { id, shard } => {
                let route = self.registry.get(&id).ok_or(Error::ProductNotFound)?;
                let shards: Vec<usize> = match shard {
                    None => (0..route.shards.len()).collect(),
                    Some(n) if (n as usize) < route.shards.len() => vec![n as usize],
                    Some(n) => return Err(Error::ActorNotFound(format!("product {id} has no shard {n}"))),
                };
                for &i in &shards {
                    kill(tokio::time::timeout(timeout, route.shards[i].addr.send(Kill)).await)?;
                }
                metrics::counter!("kami_chaos_kills_total").increment(shards.len() as u64);
                Ok(match shard {
                    None => format!("product:{id}"),
                    Some(n) => format!("product:{id}#{n}"),
                })
            }
        }
    }

    /// One actor uniformly at random: any product shard, the product supervisor or
    /// the payment supervisor.
    fn random_actor(&self) -> KillTarget {
        use rand::Rng;
        let routes = self.registry.all();
        let shards: usize = routes.values().map(|r| r.shards.len()).sum();
        let mut pick = rand::rng().random_range(0..shards + 2);
        if pick == shards + 1 {
            return KillTarget::Payments;
        }
        for (id, route) in routes.iter() {
            if pick < route.shards.len() {
                return KillTarget::Product { id: id.clone(), shard: Some(pick as u16) };
            }
            pick -= route.shards.len();
        }
        KillTarget::Orders
    }
}
