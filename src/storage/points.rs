//! The points shards' storage: each one's journal (`journal/points/{shard}/`) and
//! snapshots (sled tree `points-snapshots`), written and trimmed like a stock
//! shard's, and their recovery.

use super::journal::End;
use super::*;

/// The journal of one points shard: the records after its newest snapshot.
pub type PointsJournal = Journal<PointsEvent>;

/// A points shard as rebuilt from storage.
pub struct PointsRecovered {
    pub book: PointsBook,
    pub journal: PointsJournal,
    /// Size of the snapshot it started from (0 without one), and its record.
    pub snapshot_bytes: u64,
    pub snapshot_seq: u64,
    /// Where a torn tail started, if one was found (removed by `recover_points`).
    pub torn: Option<(u64, String)>,
}

impl Storage {
    /// Writes the snapshot of points shard `shard` as of its record `book.len()`.
    /// Once a flush covers it, [`Storage::trim_points`] drops what it covers.
    pub fn write_points_snapshot(&self, shard: u16, book: &PointsBook) -> Result<usize, StorageError> {
        let bytes = codec::encode(Kind::PointsSnapshot, book);
        let mut key = shard.to_be_bytes().to_vec();
        key.extend_from_slice(&book.len().to_be_bytes());
        self.points_snapshots.insert(key, bytes.as_slice())?;
        Ok(bytes.len())
    }

    /// Removes points shard `shard`'s journal through `seq` and its snapshots before `seq`.
    pub fn trim_points(&self, shard: u16, journal: &PointsJournal, seq: u64) -> Result<(), StorageError> {
        let prefix = shard.to_be_bytes();
        let mut batch = sled::Batch::default();
        for k in self.points_snapshots.scan_prefix(prefix).keys() {
            let k = k?;
            if k.len() == 10 && u64::from_be_bytes(k[2..].try_into().expect("8 bytes")) < seq {
                batch.remove(k);
            }
        }
        self.points_snapshots.apply_batch(batch)?;
        journal.file().trim_through(seq)
    }

    /// Rebuilds points shard `shard`: its newest snapshot, then its journal after
    /// it. A torn tail (never acknowledged) is removed and logged; a snapshot that
    /// does not decode, or a record that contradicts the ledger, stops recovery.
    pub fn recover_points(&self, shard: u16) -> Result<PointsRecovered, StorageError> {
        let r = self.inspect_points(shard)?;
        if let Some((seq, error)) = &r.torn {
            tracing::warn!(shard, seq, %error, "points ledger: torn tail removed");
            r.journal.file().truncate_from(*seq)?;
        }
        let covered = r.snapshot_seq;
        if covered > 0 && r.journal.file().covered(covered)? > 0 {
            self.trim_points(shard, &r.journal, covered)?; // a trim a crash interrupted
        }
        Ok(r)
    }

    /// [`Storage::recover_points`] without repairing anything.
    pub fn inspect_points(&self, shard: u16) -> Result<PointsRecovered, StorageError> {
        let journal = self.points_journal(shard)?;
        let (mut book, snapshot_bytes) = match self.points_snapshots.scan_prefix(shard.to_be_bytes()).next_back() {
            None => (PointsBook::new(), 0),
            Some(kv) => {
                let (k, v) = kv?;
                let book: PointsBook = codec::decode(Kind::PointsSnapshot, &v).map_err(|e| StorageError::Corrupt {
                    place: format!(
                        "points snapshot {shard} at {}",
                        u64::from_be_bytes(k[2..].try_into().unwrap_or([0; 8]))
                    ),
                    error: format!("{e}; nothing was changed"),
                })?;
                (book, v.len() as u64)
            }
        };
        let snapshot_seq = book.len();
        let torn = journal.replay_into(shard, &mut book)?;
        Ok(PointsRecovered { book, journal, snapshot_bytes, snapshot_seq, torn })
    }
}

impl Journal<PointsEvent> {
    /// Applies the records after `book.len()` to `book`, up to the first bad one
    /// (returned: where a torn tail starts).
    fn replay_into(&self, shard: u16, book: &mut PointsBook) -> Result<Option<(u64, String)>, StorageError> {
        let start = book.len();
        let mut last = start;
        let mut torn = None;
        let end = self.file().read_after(start, |frame| {
            let seq = frame.seq;
            let event = match codec::decode::<PointsEvent>(Kind::Event, &frame.record) {
                Ok(event) if seq == last + 1 => event,
                Ok(_) => {
                    torn = Some((seq, format!("expected record {} next", last + 1)));
                    return Ok(false);
                }
                Err(e) => {
                    torn = Some((seq, e.to_string()));
                    return Ok(false);
                }
            };
            crate::domain::catch_broken_step(|| book.apply(&event)).map_err(|panic| StorageError::Corrupt {
                place: format!("points/{shard} record {seq}"),
                error: format!("the record decodes but contradicts the ledger before it: {panic}"),
            })?;
            last = seq;
            Ok(true)
        })?;
        if let (None, End::Torn { seq, error }) = (&torn, end) {
            torn = Some((seq, error));
        }
        // A journal that resumes after a gap past the snapshot lost history: stop.
        if let Some((seq, _)) = &torn {
            if last == start && *seq > start + 1 && start > 0 {
                return Err(StorageError::Corrupt {
                    place: format!("points/{shard}"),
                    error: format!(
                        "the journal resumes at record {seq} after the snapshot at {start}; nothing was changed"
                    ),
                });
            }
        }
        Ok(torn)
    }
}
