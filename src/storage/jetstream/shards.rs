//! Stock shards on the replicated journal: what a node does when it takes a shard
//! over (rebuild it from the stored snapshot and the journal after it) and when it
//! snapshots one (store the snapshot of an acknowledged prefix, then purge what it
//! covers). Same records, same snapshot format, same replay as the local storage
//! ([`crate::storage::Storage::recover`]).

use std::time::{Duration, Instant};

use super::{JetStream, StreamJournal};
use crate::domain::{Event, ProductInfo, Shard, ShardId};
use crate::storage::codec::{self, Kind};
use crate::storage::{Storage, StorageError};

/// A stock shard rebuilt from the stream, its journal open for appends.
pub struct StreamRecovered {
    pub shard: Shard,
    pub journal: StreamJournal,
    pub last_seq: u64,
    pub snapshot_seq: u64,
    pub replayed: u64,
    pub elapsed: Duration,
}

/// The journal name (subject) of a stock shard: `stock.{product}.{shard}` (product
/// ids are `[a-z0-9_-]`, valid subject tokens).
pub fn shard_journal(id: &ShardId) -> String {
    format!("stock.{}.{}", id.product, id.shard)
}

impl JetStream {
    /// Rebuilds shard `id` from its stored snapshot and the journal after it, and
    /// opens the journal after its last record (the fence of the next append).
    pub async fn recover_shard(&self, id: &ShardId, product: &ProductInfo) -> Result<StreamRecovered, StorageError> {
        let started = Instant::now();
        let journal = shard_journal(id);
        let (snapshot_seq, mut shard) = match self.snapshot(&journal).await? {
            Some((seq, bytes)) => {
                let mut shard = codec::decode_snapshot(&bytes).map_err(|e| StorageError::Corrupt {
                    place: format!("snapshot of {journal} at {seq}"),
                    error: e.to_string(),
                })?;
                shard.rebuild_indexes();
                (seq, shard)
            }
            None => (0, Shard::new(product.clone(), id.shard)),
        };
        let mut last = snapshot_seq;
        let mut replayed = 0u64;
        let opened = self
            .open(&journal, snapshot_seq, |seq, record| {
                let place = || format!("{journal} record {seq}");
                if seq != last + 1 {
                    return Err(StorageError::Corrupt {
                        place: place(),
                        error: format!("the journal goes on from record {seq}, the state is at {last}"),
                    });
                }
                let event: Event = codec::decode(Kind::Event, record)
                    .map_err(|e| StorageError::Corrupt { place: place(), error: e.to_string() })?;
                crate::domain::catch_broken_step(|| shard.apply_owned(event)).map_err(|panic| {
                    StorageError::Corrupt {
                        place: place(),
                        error: format!("the record decodes but contradicts the state before it: {panic}"),
                    }
                })?;
                last = seq;
                replayed += 1;
                Ok(())
            })
            .await?;
        if opened.last_seq() < snapshot_seq {
            return Err(StorageError::Corrupt {
                place: journal,
                error: format!(
                    "the journal ends at record {}, before its snapshot at {snapshot_seq}",
                    opened.last_seq()
                ),
            });
        }
        Ok(StreamRecovered {
            shard,
            last_seq: opened.last_seq(),
            journal: opened,
            snapshot_seq,
            replayed,
            elapsed: started.elapsed(),
        })
    }

    /// Stores `shard` (the state through record `seq` of `journal`) as the shard's
    /// snapshot and purges the journal messages it covers. Refused unless the stream
    /// acknowledged the journal through `seq`: a snapshot must never hold what a
    /// failed publish may not have stored. Returns whether it was stored (a newer
    /// one may be there already).
    pub async fn snapshot_shard(
        &self,
        id: &ShardId,
        journal: &StreamJournal,
        seq: u64,
        shard: &Shard,
    ) -> Result<bool, StorageError> {
        if journal.durable_seq() < seq {
            return Err(StorageError::Remote(format!(
                "a snapshot at {seq} of {id}, whose journal is acknowledged only through {}",
                journal.durable_seq()
            )));
        }
        let bytes = Storage::encode_snapshot(shard, 0);
        let stored = self.put_snapshot(&shard_journal(id), seq, &bytes).await?;
        if stored {
            journal.purge_through(seq).await?;
        }
        Ok(stored)
    }
}
