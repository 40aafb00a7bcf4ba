//! Stock shards on the replicated journal: what a node does when it takes a shard
//! over (rebuild it from the stored snapshot and the journal after it) and when it
//! snapshots one (store the snapshot of an acknowledged prefix, then purge what it
//! covers). Same records, same snapshot format, same replay as the local storage
//! ([`crate::storage::Storage::recover`]).

use std::time::{Duration, Instant};

use super::{Frames, JetStream, StreamJournal};
use crate::domain::{Event, ProductInfo, Shard, ShardId};
use crate::storage::codec::{self, Kind};
use crate::storage::{Storage, StorageError};

/// A stock shard rebuilt from the stream, its journal open for appends.
pub struct StreamRecovered {
    pub shard: Shard,
    pub journal: StreamJournal,
    pub last_seq: u64,
    pub snapshot_seq: u64,
    /// Size of the snapshot it started from (0: none).
    pub snapshot_bytes: u64,
    /// Size of the records replayed after it.
    pub journal_bytes: u64,
    pub replayed: u64,
    pub elapsed: Duration,
}

/// Decodes a stored snapshot of `journal` taken at `seq`.
fn decode_snapshot(journal: &str, seq: u64, bytes: &[u8]) -> Result<Shard, StorageError> {
    let mut shard = codec::decode_snapshot(bytes).map_err(|e| StorageError::Corrupt {
        place: format!("snapshot of {journal} at {seq}"),
        error: e.to_string(),
    })?;
    shard.rebuild_indexes();
    Ok(shard)
}

/// Replays record `seq` (encoded `record`) onto `shard`, whose state is at `last`:
/// as local recovery does, a gap or a record that decodes but contradicts the state
/// is corrupt, never skipped.
fn replay(journal: &str, shard: &mut Shard, last: u64, seq: u64, record: &[u8]) -> Result<(), StorageError> {
    let place = || format!("{journal} record {seq}");
    if seq != last + 1 {
        return Err(StorageError::Corrupt {
            place: place(),
            error: format!("the journal goes on from record {seq}, the state is at {last}"),
        });
    }
    let event: Event = codec::decode(Kind::Event, record)
        .map_err(|e| StorageError::Corrupt { place: place(), error: e.to_string() })?;
    crate::domain::catch_broken_step(|| shard.apply_owned(event)).map_err(|panic| StorageError::Corrupt {
        place: place(),
        error: format!("the record decodes but contradicts the state before it: {panic}"),
    })
}

/// Refuses a journal that ends before the snapshot it was opened after (its
/// purge keeps the last message, so a whole history always reaches it).
pub(super) fn ends_after_snapshot(
    journal: &str,
    opened: &StreamJournal,
    snapshot_seq: u64,
) -> Result<(), StorageError> {
    if opened.last_seq() < snapshot_seq {
        return Err(StorageError::Corrupt {
            place: journal.to_string(),
            error: format!("the journal ends at record {}, before its snapshot at {snapshot_seq}", opened.last_seq()),
        });
    }
    Ok(())
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
        let (snapshot_seq, snapshot_bytes, mut shard) = match self.snapshot(&journal).await? {
            Some((seq, bytes)) => (seq, bytes.len() as u64, decode_snapshot(&journal, seq, &bytes)?),
            None => (0, 0, Shard::new(product.clone(), id.shard)),
        };
        let mut last = snapshot_seq;
        let (mut replayed, mut journal_bytes) = (0u64, 0u64);
        let opened = self
            .open(&journal, snapshot_seq, |seq, record| {
                replay(&journal, &mut shard, last, seq, record)?;
                last = seq;
                replayed += 1;
                journal_bytes += record.len() as u64;
                Ok(())
            })
            .await?;
        ends_after_snapshot(&journal, &opened, snapshot_seq)?;
        Ok(StreamRecovered {
            shard,
            last_seq: opened.last_seq(),
            journal: opened,
            snapshot_seq,
            snapshot_bytes,
            journal_bytes,
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
        self.store_shard_snapshot(id, journal, seq, &Storage::encode_snapshot(shard, 0)).await
    }

    /// [`JetStream::snapshot_shard`] of a snapshot already encoded (off the
    /// actor's thread).
    pub async fn store_shard_snapshot(
        &self,
        id: &ShardId,
        journal: &StreamJournal,
        seq: u64,
        bytes: &[u8],
    ) -> Result<bool, StorageError> {
        if journal.durable_seq() < seq {
            return Err(StorageError::Remote(format!(
                "a snapshot at {seq} of {id}, whose journal is acknowledged only through {}",
                journal.durable_seq()
            )));
        }
        let stored = self.put_snapshot(&shard_journal(id), seq, bytes).await?;
        if stored {
            journal.purge_through(seq).await?;
        }
        Ok(stored)
    }

    /// Shard `id` as of its journal record `seq`, for a snapshot built off its
    /// actor's thread: the stored snapshot and the journal after it through `seq`.
    /// The messages are read here; their records are decoded and replayed on a
    /// blocking thread (a journal's worth of work).
    pub async fn shard_as_of(&self, id: &ShardId, product: &ProductInfo, seq: u64) -> Result<Shard, StorageError> {
        let journal = shard_journal(id);
        let stored = self.snapshot(&journal).await?;
        let from = stored.as_ref().map_or(0, |(at, _)| *at);
        // The frames of the messages that may hold records `from+1..=seq`, end to end.
        let mut frames = Vec::new();
        if from < seq {
            self.read_subject(&self.subject(&journal)?, &mut |_, payload| {
                let first = payload.get(..8).map_or(0, |b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
                if first <= seq {
                    frames.extend_from_slice(payload);
                }
                Ok(())
            })
            .await?;
        }
        let product = product.clone();
        let shard_index = id.shard;
        let built = tokio::task::spawn_blocking(move || {
            let (mut last, mut shard) = match stored {
                Some((at, bytes)) => (at, decode_snapshot(&journal, at, &bytes)?),
                None => (0, Shard::new(product, shard_index)),
            };
            for frame in Frames(&frames) {
                let (at, record) = frame.map_err(|error| StorageError::Corrupt { place: journal.clone(), error })?;
                if at <= last || at > seq {
                    continue;
                }
                replay(&journal, &mut shard, last, at, record)?;
                last = at;
            }
            if last != seq {
                return Err(StorageError::Corrupt {
                    place: journal,
                    error: format!("the journal ends at record {last}, before record {seq}"),
                });
            }
            Ok(shard)
        });
        built.await.map_err(|e| StorageError::Remote(format!("rebuilding a snapshot failed: {e}")))?
    }
}
