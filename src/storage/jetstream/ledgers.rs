//! Ledger shards (points and coupons) on the replicated journal, for a cluster
//! node: each one's journal is the subject `{name}.{shard}` (`points.3`,
//! `coupons.0`), its snapshot kept like a stock shard's. Same records, same
//! snapshot encoding and same replay as the local storage
//! ([`crate::storage::Storage::recover_ledger`]), so a node taking a ledger shard
//! over rebuilds exactly the book its last owner acknowledged.

use std::time::{Duration, Instant};

use super::{JetStream, StreamJournal};
use crate::storage::codec::{self, Kind};
use crate::storage::{Ledger, StorageError};

/// The journal name (subject, and lease key) of ledger shard `shard` of book `B`.
pub fn ledger_journal<B: Ledger>(shard: u16) -> String {
    format!("{}.{shard}", B::NAME)
}

/// A ledger shard rebuilt from the stream, its journal open for appends.
pub struct StreamLedger<B: Ledger> {
    pub book: B,
    pub journal: StreamJournal,
    /// Size of the snapshot it started from (0: none).
    pub snapshot_bytes: u64,
    /// Size of the records replayed after it.
    pub journal_bytes: u64,
    pub replayed: u64,
    pub elapsed: Duration,
}

impl JetStream {
    /// Rebuilds ledger shard `shard` of `B` from its stored snapshot and the journal
    /// after it, and opens the journal after its last record (the fence of the next
    /// append). A gap, a record that does not decode or one that contradicts the
    /// book is corrupt, never skipped.
    pub async fn recover_ledger<B: Ledger>(&self, shard: u16) -> Result<StreamLedger<B>, StorageError> {
        let started = Instant::now();
        let journal = ledger_journal::<B>(shard);
        let corrupt = |place: String, error: String| StorageError::Corrupt { place, error };
        let (snapshot_seq, snapshot_bytes, mut book) = match self.snapshot(&journal).await? {
            Some((seq, bytes)) => {
                let book: B = codec::decode(B::SNAPSHOT, &bytes)
                    .map_err(|e| corrupt(format!("snapshot of {journal} at {seq}"), e.to_string()))?;
                if book.seq() != seq {
                    return Err(corrupt(
                        format!("snapshot of {journal} at {seq}"),
                        format!("it holds the book through record {}", book.seq()),
                    ));
                }
                (seq, bytes.len() as u64, book)
            }
            None => (0, 0, B::default()),
        };
        let mut last = snapshot_seq;
        let (mut replayed, mut journal_bytes) = (0u64, 0u64);
        let opened = self
            .open(&journal, snapshot_seq, |seq, record| {
                let place = || format!("{journal} record {seq}");
                if seq != last + 1 {
                    return Err(corrupt(
                        place(),
                        format!("the journal goes on from record {seq}, the book is at {last}"),
                    ));
                }
                let event: B::Event =
                    codec::decode(Kind::Event, record).map_err(|e| corrupt(place(), e.to_string()))?;
                crate::domain::catch_broken_step(|| book.apply_event(&event)).map_err(|panic| {
                    corrupt(place(), format!("the record decodes but contradicts the book before it: {panic}"))
                })?;
                last = seq;
                replayed += 1;
                journal_bytes += record.len() as u64;
                Ok(())
            })
            .await?;
        super::shards::ends_after_snapshot(&journal, &opened, snapshot_seq)?;
        Ok(StreamLedger { book, journal: opened, snapshot_bytes, journal_bytes, replayed, elapsed: started.elapsed() })
    }

    /// Stores `bytes` (the encoded book through record `seq` of `journal`) as
    /// ledger shard `shard`'s snapshot and purges the journal messages it covers.
    /// Refused unless the stream acknowledged the journal through `seq`. Returns
    /// whether it was stored (a newer one may be there already).
    pub async fn store_ledger_snapshot<B: Ledger>(
        &self,
        shard: u16,
        journal: &StreamJournal,
        seq: u64,
        bytes: &[u8],
    ) -> Result<bool, StorageError> {
        let name = ledger_journal::<B>(shard);
        if journal.durable_seq() < seq {
            return Err(StorageError::Remote(format!(
                "a snapshot at {seq} of {name}, whose journal is acknowledged only through {}",
                journal.durable_seq()
            )));
        }
        let stored = self.put_snapshot(&name, seq, bytes).await?;
        if stored {
            journal.purge_through(seq).await?;
        }
        Ok(stored)
    }
}
