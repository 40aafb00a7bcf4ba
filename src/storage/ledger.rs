//! Ledger shards' storage (points shards and coupon shards): each one's journal
//! (`journal/{name}/{shard}/`) and snapshots (sled tree `{name}-snapshots`), written
//! and trimmed like a stock shard's, and their recovery.

use super::journal::End;
use super::*;

/// A book a ledger shard keeps: applied event by event, snapshotted whole.
pub trait Ledger: serde::Serialize + serde::de::DeserializeOwned + Default {
    type Event: serde::Serialize + serde::de::DeserializeOwned;
    /// Its journals' directory under `journal/` and its snapshot tree's prefix.
    const NAME: &'static str;
    const SNAPSHOT: Kind;
    /// Sequence of the last event applied.
    fn seq(&self) -> u64;
    /// Applies a journaled event; panics on one that contradicts the book.
    fn apply_event(&mut self, event: &Self::Event);
}

impl Ledger for PointsBook {
    type Event = PointsEvent;
    const NAME: &'static str = "points";
    const SNAPSHOT: Kind = Kind::PointsSnapshot;
    fn seq(&self) -> u64 {
        self.len()
    }
    fn apply_event(&mut self, event: &PointsEvent) {
        self.apply(event)
    }
}

impl Ledger for CouponBook {
    type Event = CouponEvent;
    const NAME: &'static str = "coupons";
    const SNAPSHOT: Kind = Kind::CouponSnapshot;
    fn seq(&self) -> u64 {
        self.len()
    }
    fn apply_event(&mut self, event: &CouponEvent) {
        self.apply(event)
    }
}

/// The journal of one points shard: the records after its newest snapshot.
pub type PointsJournal = Journal<PointsEvent>;

/// A ledger shard as rebuilt from storage.
pub struct LedgerRecovered<B: Ledger> {
    pub book: B,
    pub journal: Journal<B::Event>,
    /// Size of the snapshot it started from (0 without one), and its record.
    pub snapshot_bytes: u64,
    pub snapshot_seq: u64,
    /// Where a torn tail started, if one was found (removed by `recover_ledger`).
    pub torn: Option<(u64, String)>,
}

/// A points shard as rebuilt from storage.
pub type PointsRecovered = LedgerRecovered<PointsBook>;

impl Storage {
    fn ledger_snapshots<B: Ledger>(&self) -> Result<sled::Tree, StorageError> {
        Ok(self.db.open_tree(format!("{}-snapshots", B::NAME))?)
    }

    /// The journal of ledger shard `shard` (`journal/<name>/<shard>`).
    pub fn ledger_journal<B: Ledger>(&self, shard: u16) -> Result<Journal<B::Event>, StorageError> {
        self.open_journal(self.ledger_journal_dir(B::NAME, shard))
    }

    /// Writes the snapshot of ledger shard `shard` as of its record `book.seq()`.
    /// Once a flush covers it, [`Storage::trim_ledger`] drops what it covers.
    pub fn write_ledger_snapshot<B: Ledger>(&self, shard: u16, book: &B) -> Result<usize, StorageError> {
        let bytes = codec::encode(B::SNAPSHOT, book);
        let mut key = shard.to_be_bytes().to_vec();
        key.extend_from_slice(&book.seq().to_be_bytes());
        self.ledger_snapshots::<B>()?.insert(key, bytes.as_slice())?;
        Ok(bytes.len())
    }

    /// Removes ledger shard `shard`'s journal through `seq` and its snapshots before `seq`.
    pub fn trim_ledger<B: Ledger>(
        &self,
        shard: u16,
        journal: &Journal<B::Event>,
        seq: u64,
    ) -> Result<(), StorageError> {
        let _gate = self.trim_gate.read().unwrap_or_else(|e| e.into_inner());
        if self.trims_held() {
            metrics::counter!("kami_trims_deferred_total").increment(1);
            return Ok(()); // a backup runs: the next snapshot's trim does it
        }
        let prefix = shard.to_be_bytes();
        let tree = self.ledger_snapshots::<B>()?;
        // One by one, not in a `sled::Batch` (see `storage`'s doc):
        // any subset of older snapshots may go, the newest one stays.
        for k in tree.scan_prefix(prefix).keys() {
            let k = k?;
            if k.len() == 10 && u64::from_be_bytes(k[2..].try_into().expect("8 bytes")) < seq {
                tree.remove(k)?;
            }
        }
        let keep = self.archive_floor(&format!("{}/{shard}", B::NAME)).map_or(seq, |f| f.min(seq));
        journal.file().trim_through(keep)
    }

    /// Rebuilds ledger shard `shard`: its newest snapshot, then its journal after
    /// it. A torn tail (never acknowledged) is removed and logged; a snapshot that
    /// does not decode, or a record that contradicts the ledger, stops recovery.
    pub fn recover_ledger<B: Ledger>(&self, shard: u16) -> Result<LedgerRecovered<B>, StorageError> {
        let r = self.inspect_ledger::<B>(shard)?;
        if let Some((seq, error)) = &r.torn {
            tracing::warn!(ledger = B::NAME, shard, seq, %error, "ledger: torn tail removed");
            r.journal.file().truncate_from(*seq)?;
        }
        let covered = r.snapshot_seq;
        if covered > 0 && r.journal.file().covered(covered)? > 0 {
            self.trim_ledger::<B>(shard, &r.journal, covered)?; // a trim a crash interrupted
        }
        Ok(r)
    }

    /// [`Storage::recover_ledger`] without repairing anything.
    pub fn inspect_ledger<B: Ledger>(&self, shard: u16) -> Result<LedgerRecovered<B>, StorageError> {
        let journal = self.ledger_journal::<B>(shard)?;
        let (mut book, snapshot_bytes) =
            match self.ledger_snapshots::<B>()?.scan_prefix(shard.to_be_bytes()).next_back() {
                None => (B::default(), 0),
                Some(kv) => {
                    let (k, v) = kv?;
                    let book: B = codec::decode(B::SNAPSHOT, &v).map_err(|e| StorageError::Corrupt {
                        place: format!(
                            "{} snapshot {shard} at {}",
                            B::NAME,
                            u64::from_be_bytes(k[2..].try_into().unwrap_or([0; 8]))
                        ),
                        error: format!("{e}; nothing was changed"),
                    })?;
                    (book, v.len() as u64)
                }
            };
        let snapshot_seq = book.seq();
        let torn = replay_into(&journal, shard, &mut book)?;
        Ok(LedgerRecovered { book, journal, snapshot_bytes, snapshot_seq, torn })
    }
}

/// Applies the records of `journal` after `book.seq()` to `book`, up to the first
/// bad one (returned: where a torn tail starts).
fn replay_into<B: Ledger>(
    journal: &Journal<B::Event>,
    shard: u16,
    book: &mut B,
) -> Result<Option<(u64, String)>, StorageError> {
    {
        let start = book.seq();
        let mut last = start;
        let mut torn = None;
        let end = journal.file().read_after(start, |frame| {
            let seq = frame.seq;
            let event = match codec::decode::<B::Event>(Kind::Event, &frame.record) {
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
            crate::domain::catch_broken_step(|| book.apply_event(&event)).map_err(|panic| StorageError::Corrupt {
                place: format!("{}/{shard} record {seq}", B::NAME),
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
                    place: format!("{}/{shard}", B::NAME),
                    error: format!(
                        "the journal resumes at record {seq} after the snapshot at {start}; nothing was changed"
                    ),
                });
            }
        }
        Ok(torn)
    }
}
