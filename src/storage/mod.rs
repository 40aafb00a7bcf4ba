//! kami's storage interface. All sled use stays inside this module so that the
//! engine could be replaced without touching actors or HTTP.
//!
//! Layout: journals are segment files ([`journal`]) under `journal/` in the data
//! directory (`journal/stock/{product}/{shard}`, `journal/points/{shard}`);
//! everything else is in sled trees:
//! * `products` — product id → `ProductInfo` record.
//! * stock snapshots, in a sled database of their own (`snapshot-db/`, flushed by
//!   the snapshot task rather than by group commit): one sled tree per snapshot,
//!   named `{product}/{shard}` ++ 0x00 ++ big-endian sequence, holding the `Shard`
//!   record under one key (why: [`BackupTree`]). Backups see them as one tree,
//!   `snapshots`, whose keys are those names.
//! * `points-snapshots`, `points-prices` — product → points per key.
//! * `group-deals` — `{product}/{deal}` → `GroupDeal` record.
//! * `archive/{product}/{shard}` — archived orders; `lookup/{product}/{shard}` —
//!   their query passwords by buyer (see [`Storage::archive_orders`]).
//! * `meta` — `lookup-secret`: this shop's salt key for query passwords.
//!
//! (Before the segment files, journals were sled trees `journal/{product}/{shard}`
//! and `points/{shard}`, key = big-endian sequence; [`Storage::open`] moves them
//! into segment files once. Payment-id claims were a sled tree `payment-ids`; they
//! are now an index in memory rebuilt from the shards, and the tree is dropped at
//! open.)
//!
//! Durability: nothing written here is durable until a [`commit::Ticket`] taken
//! after it has completed (see [`commit`]), except stock snapshots, durable when
//! [`Storage::put_snapshot`] returns. Journals' new records are made
//! durable through one commit log (`journal/log/`, see [`log`]), redone into the
//! journals at open. Recovery = newest snapshot that
//! decodes + every journal record after it, stopping at the first record that
//! fails its checksum (a torn tail), which is logged and removed.
//!
//! No sled batches: kami never calls `sled::Tree::apply_batch` (nor sled
//! transactions). In sled 0.34 a batch takes a process-wide write lock, and from
//! the first batch on, every sled operation of the process, in every database,
//! goes through that one `RwLock`. A flush holds its read side while it writes, so
//! a batch waiting behind a snapshot's flush of tens of MB held up the next group
//! commit's flush of the main database, and with it every order in flight (group
//! commits of 0.3 s under load). Nothing written here needs a batch's atomicity;
//! each write that used one says why. `tests/layering.rs` keeps them out.

pub mod backup;
pub mod codec;
pub mod commit;
pub mod jetstream;
pub mod journal;
mod ledger;
mod legacy;
pub(crate) mod log;
pub mod webhooks;

pub use ledger::{Ledger, LedgerRecovered, PointsJournal, PointsRecovered};

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::domain::coupon::{CouponBook, CouponEvent};
use crate::domain::group::GroupDeal;
use crate::domain::key_mode::KeyMode;
use crate::domain::lookup::PasswordHash;
use crate::domain::points::{PointsBook, PointsEvent};
use crate::domain::shard::ArchivedOrder;
use crate::domain::shelf::Shelf;
use crate::domain::terms::Terms;
use crate::domain::{Event, ProductInfo, Shard, ShardId};
use codec::Kind;
pub use commit::{Committer, Ticket};
use journal::{DirtyJournals, End, JournalFile};
pub use journal::{EventLog, Journal};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StorageError {
    #[error("storage engine error: {0}")]
    Sled(String),
    #[error("journal file error: {0}")]
    Io(String),
    #[error("corrupt record in {place}: {error}")]
    Corrupt { place: String, error: String },
    #[error("commit queue is full")]
    Busy,
    #[error("storage is closed")]
    Closed,
    /// A replicated journal refused an append because another writer extended it.
    #[error("journal taken over by another writer: {0}")]
    Fenced(String),
    /// A replicated journal's servers failed or did not answer in time.
    #[error("replicated journal error: {0}")]
    Remote(String),
}

impl From<sled::Error> for StorageError {
    fn from(e: sled::Error) -> Self {
        StorageError::Sled(e.to_string())
    }
}

#[derive(Debug, Clone)]
pub struct StorageOptions {
    pub path: std::path::PathBuf,
    pub cache_capacity_bytes: u64,
    pub max_pending_commits: usize,
    pub max_commit_batch: usize,
    pub commit_linger: Duration,
    /// How long a flush that follows the last one within this time waits for more
    /// writers (under load: fewer, larger flushes; an idle server flushes at once).
    pub commit_busy_linger: Duration,
}

pub struct Storage {
    db: sled::Db,
    /// The data directory.
    root: std::path::PathBuf,
    /// Journals written since their last sync (synced by the commit thread).
    dirty: Arc<DirtyJournals>,
    /// The one file every journal's new records are made durable through.
    log: Arc<std::sync::Mutex<log::CommitLog>>,
    /// Journal records the commit log held that their journals lacked, written
    /// into them at open (what a crash cost the journals' own files).
    redone: std::sync::atomic::AtomicU64,
    /// Set by [`Storage::abandon`]: dropped as a crash would leave it.
    abandoned: std::sync::atomic::AtomicBool,
    /// Open journals by directory: every handle on one journal shares its file.
    journals: std::sync::Mutex<std::collections::HashMap<std::path::PathBuf, std::sync::Weak<JournalFile>>>,
    products: sled::Tree,
    /// Stock shards' snapshots live in a sled database of their own
    /// (`{path}/snapshot-db`), which group commit never flushes: writing a
    /// snapshot of tens of MB would otherwise hold every order of every product
    /// until it is on disk. A snapshot is flushed by the task that stores it.
    /// Each snapshot is a tree of its own (see [`BackupTree`]).
    snapshot_db: sled::Db,
    /// Points shard (u16 BE) ++ record (u64 BE) → snapshot of its book.
    committer: Committer,
    /// One clone per live handle on the database (this value and every `Journal`),
    /// each dropped after its sled handle: when none is left, sled's lock on the
    /// directory is released.
    handles: Arc<()>,
    /// Backups running: while any is, trims wait (see [`backup`]); a trim holds
    /// the gate's read side while it works, a backup starting its write side.
    backups: std::sync::atomic::AtomicUsize,
    /// Stock journals and snapshots are kept in a replicated stream, not here
    /// (`storage.backend = "jetstream"`): what reads them from here is off.
    stock_elsewhere: std::sync::atomic::AtomicBool,
    trim_gate: std::sync::RwLock<()>,
    /// With continuous archiving on: each journal's last record shipped to the
    /// archive (absent: none yet). Trims keep every record after it.
    archive_floor: std::sync::Mutex<Option<std::collections::BTreeMap<String, u64>>>,
}

impl Drop for Storage {
    fn drop(&mut self) {
        if self.abandoned.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        if let Err(e) = self.close_log() {
            tracing::warn!(error = %e, "commit log not closed cleanly: the next start redoes it");
        }
    }
}

/// How long an open waits for the data directory's lock held by this process's
/// previous handle: sled's I/O threads finish their last writes after the
/// handle is dropped, and keep the lock until then.
const LOCK_WAIT: Duration = Duration::from_secs(10);

/// Data directories this process has opened: only for these is a held lock one of
/// our own handles on its way out, worth waiting for.
static OPENED_HERE: std::sync::Mutex<Vec<std::path::PathBuf>> = std::sync::Mutex::new(Vec::new());

fn opened_here(path: &std::path::Path) -> bool {
    let path = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    OPENED_HERE.lock().unwrap_or_else(|e| e.into_inner()).contains(&path)
}

/// Opens sled. A lock held by a handle of this process on its way out is waited for
/// (bounded by `LOCK_WAIT`); a lock held by another process (a running server, for
/// an offline audit) is reported at once.
fn open_sled(path: &std::path::Path, cache_capacity_bytes: u64) -> Result<sled::Db, StorageError> {
    let config = sled::Config::new().path(path).cache_capacity(cache_capacity_bytes).mode(sled::Mode::HighThroughput);
    let deadline = Instant::now() + LOCK_WAIT;
    loop {
        match config.open() {
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && Instant::now() < deadline
                    && opened_here(path) =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(db) => {
                let path = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
                let mut opened = OPENED_HERE.lock().unwrap_or_else(|e| e.into_inner());
                if !opened.contains(&path) {
                    // Bounded by the directories one process opens (tests open many;
                    // a server opens one): the oldest is forgotten past 4,096.
                    if opened.len() >= 4096 {
                        opened.remove(0);
                    }
                    opened.push(path);
                }
                return Ok(db);
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// The journal directories in `dir` (products, shards, ledgers) by name: a
/// temporary one (`0.moving`) is not a journal.
pub(crate) fn journal_dirs(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| !n.contains('.'))
        .collect()
}

/// The directory, inside the data directory, of the sled database of stock snapshots.
const SNAPSHOT_DB: &str = "snapshot-db";
/// Its page cache: snapshots are written once and read at recovery, so caching
/// them buys nothing.
const SNAPSHOT_DB_CACHE_BYTES: u64 = 16 << 20;
/// What backups call the stock snapshots, and the one tree that held them all
/// before each had a tree of its own.
const SNAPSHOTS: &[u8] = b"snapshots";
/// The one key of a snapshot's tree.
const SNAPSHOT_VALUE: &[u8] = b"shard";

/// A tree as backups see it: a sled tree of the main database, or the stock
/// snapshots, one sled tree each, seen as one tree whose keys are their names.
///
/// Why a tree per snapshot: sled keeps up to 16 entries in a leaf, and writes a
/// leaf that grew past 128 KiB whole into a blob file of its own. With every
/// snapshot in one tree, removing an old snapshot rewrote the leaf holding it,
/// and with it the newer snapshots beside it (tens of MB each): a trim cost as
/// much as storing the snapshot again. A tree per snapshot is written once, and
/// dropping it frees its pages without rewriting anything.
pub(crate) enum BackupTree {
    Sled(sled::Tree),
    Snapshots(sled::Db),
}

/// The sequence a snapshot tree's name says it covers, if `name` is the name of
/// one of shard `prefix`'s snapshots (any shard's, with an empty prefix).
fn snapshot_seq(prefix: &[u8], name: &[u8]) -> Option<u64> {
    let rest = name.strip_prefix(prefix)?;
    let nul = name.len().checked_sub(9)?;
    if name[nul] != 0 || (!prefix.is_empty() && rest.len() != 8) {
        return None;
    }
    Some(u64::from_be_bytes(name[nul + 1..].try_into().ok()?))
}

/// The names of the snapshot trees of shard `prefix` (every shard's, with an
/// empty prefix), sorted: a shard's oldest first.
fn snapshot_names(db: &sled::Db, prefix: &[u8]) -> Vec<sled::IVec> {
    let mut names: Vec<sled::IVec> =
        db.tree_names().into_iter().filter(|n| snapshot_seq(prefix, n).is_some()).collect();
    names.sort();
    names
}

/// The snapshot stored in tree `name`, one [`snapshot_names`] just listed, if it
/// holds one (a crash can leave a tree made but its snapshot not written). Not
/// listed again per call (that made reading every shard's snapshots quadratic in
/// the number of trees): a tree a trim dropped since the listing is made again,
/// empty, by opening it; it reads as no snapshot, and the next trim drops it.
fn snapshot_value(db: &sled::Db, name: &[u8]) -> Result<Option<sled::IVec>, StorageError> {
    Ok(db.open_tree(name)?.get(SNAPSHOT_VALUE)?)
}

impl BackupTree {
    /// Every entry, in key order.
    pub(crate) fn iter(&self) -> Box<dyn Iterator<Item = Result<(sled::IVec, sled::IVec), StorageError>> + '_> {
        match self {
            BackupTree::Sled(t) => Box::new(t.iter().map(|kv| kv.map_err(StorageError::from))),
            BackupTree::Snapshots(db) => Box::new(
                snapshot_names(db, b"")
                    .into_iter()
                    .filter_map(|name| snapshot_value(db, &name).transpose().map(|v| v.map(|v| (name, v)))),
            ),
        }
    }

    /// Every key, in order (a snapshot tree's name only if it holds its snapshot).
    pub(crate) fn keys(&self) -> Box<dyn Iterator<Item = Result<sled::IVec, StorageError>> + '_> {
        match self {
            BackupTree::Sled(t) => Box::new(t.iter().keys().map(|k| k.map_err(StorageError::from))),
            BackupTree::Snapshots(_) => Box::new(self.iter().map(|kv| kv.map(|(k, _)| k))),
        }
    }

    pub(crate) fn insert(&self, key: &[u8], value: Vec<u8>) -> Result<(), StorageError> {
        match self {
            BackupTree::Sled(t) => {
                t.insert(key, value)?;
            }
            BackupTree::Snapshots(db) => {
                db.open_tree(key)?.insert(SNAPSHOT_VALUE, value)?;
            }
        }
        Ok(())
    }

    pub(crate) fn clear(&self) -> Result<(), StorageError> {
        match self {
            BackupTree::Sled(t) => t.clear()?,
            BackupTree::Snapshots(db) => {
                for name in snapshot_names(db, b"") {
                    db.drop_tree(name)?;
                }
            }
        }
        Ok(())
    }
}

impl Storage {
    pub fn open(opts: &StorageOptions) -> Result<Arc<Storage>, StorageError> {
        let db = open_sled(&opts.path, opts.cache_capacity_bytes)?;
        let products = db.open_tree("products")?;
        let snapshot_db = open_sled(&opts.path.join(SNAPSHOT_DB), SNAPSHOT_DB_CACHE_BYTES)?;
        // Claims are rebuilt in memory from the shards (`actors::claims`).
        db.drop_tree("payment-ids")?;
        let dirty = Arc::new(DirtyJournals::default());
        let journals_dir = opts.path.join("journal");
        let log = Arc::new(std::sync::Mutex::new(log::CommitLog::open(&journals_dir)?));
        let committer = Committer::start(
            db.clone(),
            dirty.clone(),
            log.clone(),
            opts.max_pending_commits,
            opts.max_commit_batch,
            opts.commit_linger,
            opts.commit_busy_linger,
        );
        let storage = Arc::new(Storage {
            db,
            root: opts.path.clone(),
            dirty,
            log,
            redone: Default::default(),
            abandoned: Default::default(),
            journals: Default::default(),
            products,
            snapshot_db,
            committer,
            handles: Arc::new(()),
            backups: Default::default(),
            stock_elsewhere: Default::default(),
            trim_gate: Default::default(),
            archive_floor: Default::default(),
        });
        storage.move_sled_journals()?;
        storage.move_snapshots_tree()?;
        let redone = log::redo(&journals_dir, |dir| storage.journal_file(dir.to_path_buf()))?;
        storage.redone.store(redone, std::sync::atomic::Ordering::Relaxed);
        Ok(storage)
    }

    /// Moves stock snapshots kept in one `snapshots` tree (in the main database
    /// before snapshots had a database of their own, then in the snapshot
    /// database) into a tree per snapshot, once: copied and flushed there before
    /// the old tree is dropped, so a crash in between only copies them again.
    fn move_snapshots_tree(&self) -> Result<(), StorageError> {
        for db in [&self.db, &self.snapshot_db] {
            if !db.tree_names().iter().any(|n| n.as_ref() == SNAPSHOTS) {
                continue;
            }
            let old = db.open_tree(SNAPSHOTS)?;
            if !old.is_empty() {
                for kv in old.iter() {
                    let (k, v) = kv?;
                    self.snapshot_db.open_tree(&k)?.insert(SNAPSHOT_VALUE, v)?;
                }
                self.snapshot_db.flush()?;
                tracing::info!(snapshots = old.len(), "stock snapshots moved into a tree each");
            }
            drop(old);
            db.drop_tree(SNAPSHOTS)?;
            db.flush()?;
        }
        Ok(())
    }

    /// A sled tree by name, for backups and restores: `snapshots` stands for the
    /// stock snapshots (a tree each in the snapshot database), every other name
    /// is a tree of the main database.
    pub(crate) fn tree(&self, name: &[u8]) -> Result<BackupTree, StorageError> {
        if name == SNAPSHOTS {
            return Ok(BackupTree::Snapshots(self.snapshot_db.clone()));
        }
        Ok(BackupTree::Sled(self.db.open_tree(name)?))
    }

    /// The names of every tree [`Storage::tree`] opens, sorted.
    pub(crate) fn tree_names(&self) -> Vec<Vec<u8>> {
        let mut names: Vec<Vec<u8>> = self.db.tree_names().into_iter().map(|n| n.to_vec()).collect();
        names.push(SNAPSHOTS.to_vec());
        names.sort();
        names.dedup();
        names
    }

    /// Moves journals kept in sled trees (before segment files) into segment files,
    /// once: each is written whole into a temporary directory, synced, renamed into
    /// place, and only then is its tree dropped. A crash before the rename leaves
    /// the tree (moved again at the next start); after it, the tree is dropped.
    fn move_sled_journals(&self) -> Result<(), StorageError> {
        for name in self.db.tree_names() {
            let Ok(name) = std::str::from_utf8(&name) else { continue };
            let dir = if let Some(rest) = name.strip_prefix("journal/") {
                let Some((product, shard)) = rest.rsplit_once('/') else { continue };
                self.stock_journal_dir(&ShardId::new(product, shard.parse().unwrap_or(0)))
            } else if let Some(shard) = name.strip_prefix("points/").and_then(|s| s.parse::<u16>().ok()) {
                self.ledger_journal_dir("points", shard)
            } else {
                continue;
            };
            let tree = self.db.open_tree(name)?;
            if !dir.exists() && !tree.is_empty() {
                let tmp = dir.with_extension("moving");
                let _ = std::fs::remove_dir_all(&tmp);
                let file = JournalFile::open(tmp.clone(), Arc::new(DirtyJournals::default()))?;
                let mut buf = Vec::new();
                let mut first = None;
                let mut last = 0;
                for kv in tree.iter() {
                    let (k, v) = kv?;
                    let seq = u64::from_be_bytes(k.as_ref().try_into().unwrap_or([0; 8]));
                    if first.is_some() && seq != last + 1 {
                        break; // a torn tail or gap: recovery of the tree would have stopped here too
                    }
                    first.get_or_insert(seq);
                    last = seq;
                    buf.extend_from_slice(&seq.to_le_bytes());
                    buf.extend_from_slice(&v);
                }
                if let Some(first) = first {
                    file.write_raw(first, last, &buf)?;
                }
                file.sync()?;
                drop(file);
                std::fs::rename(&tmp, &dir).map_err(|e| StorageError::Io(format!("{}: {e}", dir.display())))?;
                if let Some(parent) = dir.parent() {
                    std::fs::File::open(parent)
                        .and_then(|d| d.sync_all())
                        .map_err(|e| StorageError::Io(format!("{}: {e}", parent.display())))?;
                }
                tracing::info!(
                    journal = name,
                    records = last.saturating_sub(first.unwrap_or(1)) + 1,
                    "journal moved from sled into segment files"
                );
            }
            drop(tree);
            self.db.drop_tree(name)?;
            self.db.flush()?;
        }
        Ok(())
    }

    fn stock_journal_dir(&self, id: &ShardId) -> std::path::PathBuf {
        self.root.join("journal").join("stock").join(&id.product).join(id.shard.to_string())
    }

    fn ledger_journal_dir(&self, name: &str, shard: u16) -> std::path::PathBuf {
        self.root.join("journal").join(name).join(shard.to_string())
    }

    /// The journal in `dir`, shared with every other open handle on it.
    fn open_journal<E: serde::Serialize>(&self, dir: std::path::PathBuf) -> Result<Journal<E>, StorageError> {
        Ok(Journal::new(self.journal_file(dir)?, self.committer.queue(), self.handles.clone()))
    }

    fn journal_file(&self, dir: std::path::PathBuf) -> Result<Arc<JournalFile>, StorageError> {
        let mut open = self.journals.lock().unwrap_or_else(|e| e.into_inner());
        open.retain(|_, j| j.strong_count() > 0);
        Ok(match open.get(&dir).and_then(|j| j.upgrade()) {
            Some(file) => file,
            None => {
                let file = Arc::new(JournalFile::open(dir.clone(), self.dirty.clone())?);
                open.insert(dir, Arc::downgrade(&file));
                file
            }
        })
    }

    /// Whether no process (this one included) holds the lock sled takes on the data
    /// directory at `path`: probed by taking and dropping the same lock.
    #[cfg(unix)]
    pub fn lock_released(path: &std::path::Path) -> bool {
        use std::os::fd::AsRawFd;
        [path.join("db"), path.join(SNAPSHOT_DB).join("db")].iter().all(|db| {
            let Ok(file) = std::fs::OpenOptions::new().read(true).write(true).open(db) else {
                return true;
            };
            // SAFETY: flock on a file descriptor this closure owns; closing it drops the lock.
            unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
        })
    }

    #[cfg(not(unix))]
    pub fn lock_released(_path: &std::path::Path) -> bool {
        true
    }

    /// Watches the handles on the database: once this has no strong count left,
    /// every sled handle is dropped and the directory can be opened again.
    pub fn open_handles(&self) -> std::sync::Weak<()> {
        Arc::downgrade(&self.handles)
    }

    /// Records that stock journals and snapshots are kept in a replicated stream:
    /// features that read them from here (the webhook feed, backups) refuse.
    pub fn keep_stock_elsewhere(&self) {
        self.stock_elsewhere.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Whether [`Storage::keep_stock_elsewhere`] was called.
    pub fn stock_elsewhere(&self) -> bool {
        self.stock_elsewhere.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// A claim on the next group flush; call after the writes it must cover.
    pub fn ticket(&self) -> Result<Ticket, StorageError> {
        self.committer.ticket()
    }

    pub fn committer(&self) -> &Committer {
        &self.committer
    }

    /// Makes everything written so far durable now, on the calling thread
    /// (start-up, shutdown, crash points, tooling).
    pub fn flush_now(&self) -> Result<(), StorageError> {
        commit::make_durable(&self.db, &self.dirty, &self.log)?;
        self.snapshot_db.flush()?;
        Ok(())
    }

    /// Journal records written again from the commit log when this was opened.
    pub fn redone_at_open(&self) -> u64 {
        self.redone.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Tests and tooling: when dropped, leave the commit log as a crash would
    /// (not closed: the next open redoes it).
    #[doc(hidden)]
    pub fn abandon(&self) {
        self.abandoned.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// A clean close of the commit log: what is appended is made durable, every
    /// journal the log covers is synced in its own files and the log emptied, so
    /// the next open has nothing to redo.
    fn close_log(&self) -> Result<(), StorageError> {
        self.flush_now()?;
        self.log.lock().unwrap_or_else(|e| e.into_inner()).close()
    }

    // ---- archived orders ----

    fn archive_tree(&self, id: &ShardId) -> Result<sled::Tree, StorageError> {
        Ok(self.db.open_tree(format!("archive/{}/{}", id.product, id.shard))?)
    }

    /// (v7) Shard `id`'s lookup index of archived orders with a query password:
    /// `buyer_digest (16) ++ big-endian sequence (8)` → the password's stored form (32).
    fn lookup_tree(&self, id: &ShardId) -> Result<sled::Tree, StorageError> {
        Ok(self.db.open_tree(format!("lookup/{}/{}", id.product, id.shard))?)
    }

    /// Writes orders to shard `id`'s archive, and the query passwords of those
    /// that have one (`passwords[i]` is `orders[i]`'s) to its lookup index, before
    /// the shard journals that it archived them: the journal record's flush covers
    /// these writes too.
    pub fn archive_orders(
        &self,
        id: &ShardId,
        orders: &[ArchivedOrder],
        passwords: &[Option<PasswordHash>],
    ) -> Result<(), StorageError> {
        assert_eq!(orders.len(), passwords.len(), "one password slot per order");
        // Record by record, not in a `sled::Batch` (see the module's doc): until the
        // journal says they are archived, records written here are only extra copies
        // (readers check that the order left memory), so a part of them may survive
        // a crash.
        let tree = self.archive_tree(id)?;
        let lookups = if passwords.iter().any(Option::is_some) { Some(self.lookup_tree(id)?) } else { None };
        for (o, password) in orders.iter().zip(passwords) {
            if let (Some(lookups), Some(password)) = (&lookups, password) {
                lookups.insert(&Self::lookup_key(&o.order.buyer, o.order.seq)[..], &password[..])?;
            }
            tree.insert(o.order.seq.to_be_bytes(), codec::encode(Kind::ArchivedOrder, o))?;
        }
        Ok(())
    }

    /// Archived orders of `buyer` in shard `id` with a query password, newest
    /// first, at most `max`: their sequence and the password's stored form. (An
    /// entry may name an order that is still in memory, if archiving it was not
    /// journaled: the caller checks.)
    pub fn archived_lookups(
        &self,
        id: &ShardId,
        buyer: &str,
        max: usize,
    ) -> Result<Vec<(u64, PasswordHash)>, StorageError> {
        let digest = crate::domain::lookup::buyer_digest(buyer);
        let mut found = Vec::new();
        for kv in self.lookup_tree(id)?.scan_prefix(digest).rev().take(max) {
            let (k, v) = kv?;
            let seq = k.get(16..24).and_then(|b| b.try_into().ok()).map(u64::from_be_bytes);
            let seq = seq.ok_or_else(|| Self::malformed_lookup(id))?;
            found.push((seq, Self::lookup_value(id, &v)?));
        }
        Ok(found)
    }

    fn malformed_lookup(id: &ShardId) -> StorageError {
        StorageError::Corrupt { place: format!("lookup/{id}"), error: "malformed entry".into() }
    }

    /// A lookup index value: the password's stored form.
    fn lookup_value(id: &ShardId, v: &[u8]) -> Result<PasswordHash, StorageError> {
        v.try_into().map_err(|_| Self::malformed_lookup(id))
    }

    /// The query password of archived order `seq` of `buyer` in shard `id`, if it has one.
    pub fn archived_password(&self, id: &ShardId, buyer: &str, seq: u64) -> Result<Option<PasswordHash>, StorageError> {
        self.lookup_tree(id)?.get(Self::lookup_key(buyer, seq))?.map(|v| Self::lookup_value(id, &v)).transpose()
    }

    /// This shop's lookup secret (salts query passwords, see `domain::lookup`):
    /// random, made at first use and kept with the data. Durable before it is
    /// returned the first time.
    pub fn lookup_secret(&self) -> Result<[u8; 32], StorageError> {
        let tree = self.db.open_tree("meta")?;
        let fresh: [u8; 32] = rand::random();
        let created = tree.compare_and_swap(b"lookup-secret", None as Option<&[u8]>, Some(&fresh[..]))?.is_ok();
        let stored = tree.get(b"lookup-secret")?.expect("just set");
        if created {
            self.db.flush().map_err(StorageError::from)?;
        }
        stored.as_ref().try_into().map_err(|_| StorageError::Corrupt {
            place: "meta/lookup-secret".into(),
            error: format!("{} bytes, expected 32", stored.len()),
        })
    }

    /// Replaces the lookup secret (a server taking over a stream adopts the one the
    /// stream's earlier servers salted its orders' passwords with). Durable when it
    /// returns.
    pub fn set_lookup_secret(&self, secret: &[u8; 32]) -> Result<(), StorageError> {
        self.db.open_tree("meta")?.insert(b"lookup-secret", &secret[..])?;
        self.db.flush().map_err(StorageError::from)?;
        Ok(())
    }

    /// Where this directory's stock journals are kept (`meta/stock-backend`):
    /// `"local"`, or `"jetstream:<stream>"`. Recorded at the first start; a
    /// directory from before the record, holding products, kept them here.
    pub fn stock_backend(&self) -> Result<Option<String>, StorageError> {
        let tree = self.db.open_tree("meta")?;
        if let Some(stored) = tree.get(b"stock-backend")? {
            return Ok(Some(String::from_utf8_lossy(&stored).into_owned()));
        }
        Ok((!self.products.is_empty()).then(|| "local".to_string()))
    }

    /// Records where this directory's stock journals are kept, or refuses when it
    /// recorded another place: a shop whose stock is in one place must never start
    /// on the other (it would see no keys, or keys already sold).
    pub fn keep_stock_in(&self, backend: &str) -> Result<(), StorageError> {
        match self.stock_backend()? {
            Some(recorded) if recorded != backend => Err(StorageError::Corrupt {
                place: "meta/stock-backend".into(),
                error: format!(
                    "this data directory keeps its stock in {recorded}, and the configuration says {backend}"
                ),
            }),
            _ => {
                self.db.open_tree("meta")?.insert(b"stock-backend", backend.as_bytes())?;
                self.db.flush().map_err(StorageError::from)?;
                Ok(())
            }
        }
    }

    /// Where this directory's points and coupon ledgers are kept on the jetstream
    /// backend without a cluster (`meta/ledger-backend`: `"local"` or `"stream"`),
    /// once recorded.
    pub fn ledger_backend(&self) -> Result<Option<String>, StorageError> {
        let stored = self.db.open_tree("meta")?.get(b"ledger-backend")?;
        Ok(stored.map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// Records where this directory's ledgers are kept (durable when it returns).
    pub fn keep_ledgers_in(&self, backend: &str) -> Result<(), StorageError> {
        self.db.open_tree("meta")?.insert(b"ledger-backend", backend.as_bytes())?;
        self.db.flush().map_err(StorageError::from)?;
        Ok(())
    }

    /// An archived order of shard `id`, if there is one.
    pub fn archived_order(&self, id: &ShardId, seq: u64) -> Result<Option<ArchivedOrder>, StorageError> {
        let tree = self.archive_tree(id)?;
        let Some(bytes) = tree.get(seq.to_be_bytes())? else { return Ok(None) };
        codec::decode_archived(&bytes)
            .map(Some)
            .map_err(|e| StorageError::Corrupt { place: format!("archive/{id} order {seq}"), error: e.to_string() })
    }

    /// A lookup index key: the buyer's digest, then the order's sequence.
    fn lookup_key(buyer: &str, seq: u64) -> [u8; 24] {
        let mut key = [0u8; 24];
        key[..16].copy_from_slice(&crate::domain::lookup::buyer_digest(buyer));
        key[16..].copy_from_slice(&seq.to_be_bytes());
        key
    }

    // ---- payment ids ----

    // ---- products ----

    pub fn load_products(&self) -> Result<Vec<ProductInfo>, StorageError> {
        self.products
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                codec::decode(Kind::Product, &v).map_err(|e| StorageError::Corrupt {
                    place: format!("products/{}", String::from_utf8_lossy(&k)),
                    error: e.to_string(),
                })
            })
            .collect()
    }

    /// Writes a product record unless one exists. Returns false if it existed.
    pub fn insert_product(&self, product: &ProductInfo) -> Result<bool, StorageError> {
        let value = codec::encode(Kind::Product, product);
        let swapped = self.products.compare_and_swap(product.id.as_bytes(), None as Option<&[u8]>, Some(value))?;
        if swapped.is_ok() {
            // Every webhook endpoint is sent the new journals from their first record.
            self.start_webhook_cursors(product)?;
        }
        Ok(swapped.is_ok())
    }

    /// A product's shelf state and since when (Unix ms). Durable after a flush.
    pub fn set_shelf(&self, product: &str, shelf: Shelf, since_ms: u64) -> Result<(), StorageError> {
        let tree = self.db.open_tree("shelf")?;
        let mut value = [0u8; 9];
        value[0] = shelf.to_u8();
        value[1..].copy_from_slice(&since_ms.to_be_bytes());
        tree.insert(product.as_bytes(), &value)?;
        Ok(())
    }

    /// Every product's shelf state that is not the default (on sale since its creation).
    pub fn shelves(&self) -> Result<HashMap<String, (Shelf, u64)>, StorageError> {
        let tree = self.db.open_tree("shelf")?;
        let mut out = HashMap::new();
        for kv in tree.iter() {
            let (k, v) = kv?;
            let product = String::from_utf8_lossy(&k).into_owned();
            let state = decode_shelf(&product, &v)?;
            out.insert(product, state);
        }
        Ok(out)
    }

    /// One product's shelf state and since when (on sale since creation if none is stored).
    pub fn shelf(&self, product: &str) -> Result<(Shelf, u64), StorageError> {
        match self.db.open_tree("shelf")?.get(product.as_bytes())? {
            Some(v) => decode_shelf(product, &v),
            None => Ok(Default::default()),
        }
    }

    /// A product's terms of sale as last changed (tree `terms`). Durable after a flush.
    pub fn set_terms(&self, product: &str, terms: &Terms) -> Result<(), StorageError> {
        self.db.open_tree("terms")?.insert(product.as_bytes(), codec::encode(Kind::Terms, terms))?;
        Ok(())
    }

    /// Forgets a product's terms (before a product of that id is created anew).
    pub fn remove_terms(&self, product: &str) -> Result<(), StorageError> {
        self.db.open_tree("terms")?.remove(product.as_bytes())?;
        Ok(())
    }

    /// One product's changed terms (`None`: it sells on the terms it was created with).
    pub fn terms(&self, product: &str) -> Result<Option<Terms>, StorageError> {
        match self.db.open_tree("terms")?.get(product.as_bytes())? {
            Some(v) => Ok(Some(decode_terms(product, &v)?)),
            None => Ok(None),
        }
    }

    /// Every product's changed terms.
    pub fn all_terms(&self) -> Result<HashMap<String, Terms>, StorageError> {
        let mut out = HashMap::new();
        for kv in self.db.open_tree("terms")?.iter() {
            let (k, v) = kv?;
            let product = String::from_utf8_lossy(&k).into_owned();
            let terms = decode_terms(&product, &v)?;
            out.insert(product, terms);
        }
        Ok(out)
    }

    // ---- points ----

    /// A product's points price (`None`: not redeemable). Durable after a flush.
    pub fn set_points_price(&self, product: &str, points: Option<u64>) -> Result<(), StorageError> {
        let tree = self.db.open_tree("points-prices")?;
        match points {
            Some(p) => tree.insert(product.as_bytes(), &p.to_be_bytes())?,
            None => tree.remove(product.as_bytes())?,
        };
        Ok(())
    }

    /// Records that a product's keys are reusable (tree `key-modes`; unique
    /// products have no entry). Durable after a flush.
    pub fn set_key_mode(&self, product: &str, mode: KeyMode) -> Result<(), StorageError> {
        let tree = self.db.open_tree("key-modes")?;
        match mode {
            KeyMode::Reusable => tree.insert(product.as_bytes(), mode.as_str().as_bytes())?,
            KeyMode::Unique => tree.remove(product.as_bytes())?,
        };
        Ok(())
    }

    /// The products whose keys are reusable.
    pub fn reusable_products(&self) -> Result<Vec<String>, StorageError> {
        let mut out = Vec::new();
        for kv in self.db.open_tree("key-modes")?.iter() {
            let (k, v) = kv?;
            if v.as_ref() != KeyMode::Reusable.as_str().as_bytes() {
                return Err(StorageError::Corrupt {
                    place: "key-modes".into(),
                    error: format!("unknown key mode {:?}", String::from_utf8_lossy(&v)),
                });
            }
            out.push(String::from_utf8_lossy(&k).into_owned());
        }
        Ok(out)
    }

    pub fn points_prices(&self) -> Result<Vec<(String, u64)>, StorageError> {
        let tree = self.db.open_tree("points-prices")?;
        let mut out = Vec::new();
        for kv in tree.iter() {
            let (k, v) = kv?;
            let price = u64::from_be_bytes(v.as_ref().try_into().map_err(|_| StorageError::Corrupt {
                place: "points-prices".into(),
                error: "a price is not 8 bytes".into(),
            })?);
            out.push((String::from_utf8_lossy(&k).into_owned(), price));
        }
        Ok(out)
    }

    /// Records a group deal (tree `group-deals`, key `{product}/{deal}`). Durable after a flush.
    pub fn put_group_deal(&self, deal: &GroupDeal) -> Result<(), StorageError> {
        let tree = self.db.open_tree("group-deals")?;
        let key = format!("{}/{}", deal.product_id, deal.deal_id);
        tree.insert(key.as_bytes(), codec::encode(Kind::Deal, deal))?;
        Ok(())
    }

    pub fn group_deals(&self) -> Result<Vec<GroupDeal>, StorageError> {
        let tree = self.db.open_tree("group-deals")?;
        let mut out = Vec::new();
        for kv in tree.iter() {
            let (k, v) = kv?;
            out.push(codec::decode(Kind::Deal, &v).map_err(|e| StorageError::Corrupt {
                place: format!("group-deals/{}", String::from_utf8_lossy(&k)),
                error: e.to_string(),
            })?);
        }
        Ok(out)
    }

    // ---- journals and snapshots ----

    pub fn journal(&self, id: &ShardId) -> Result<Journal, StorageError> {
        self.open_journal(self.stock_journal_dir(id))
    }

    /// Every shard that has a journal (tooling: finds journals of unknown products).
    pub fn journal_shards(&self) -> Vec<ShardId> {
        let stock = self.root.join("journal").join("stock");
        let mut out = Vec::new();
        for product in journal_dirs(&stock) {
            for shard in journal_dirs(&stock.join(&product)) {
                if let Ok(shard) = shard.parse() {
                    out.push(ShardId::new(product.clone(), shard));
                }
            }
        }
        out
    }

    fn snapshot_prefix(id: &ShardId) -> Vec<u8> {
        let mut p = format!("{}/{}", id.product, id.shard).into_bytes();
        p.push(0);
        p
    }

    /// The name of the tree of shard `id`'s snapshot at `seq`.
    fn snapshot_name(id: &ShardId, seq: u64) -> Vec<u8> {
        let mut name = Self::snapshot_prefix(id);
        name.extend_from_slice(&seq.to_be_bytes());
        name
    }

    /// Writes a snapshot covering the journal through `seq`. Returns its size in bytes.
    pub fn write_snapshot(&self, id: &ShardId, seq: u64, shard: &Shard) -> Result<usize, StorageError> {
        let bytes = Self::encode_snapshot(shard, 0);
        let size = bytes.len();
        self.put_snapshot(id, seq, bytes)?;
        Ok(size)
    }

    /// A shard's snapshot record (`size_hint`: the last one's size, so that the
    /// buffer is allocated once). Encoding is the part of a snapshot that must see
    /// the shard; [`Storage::put_snapshot`] may run on another thread.
    pub fn encode_snapshot(shard: &Shard, size_hint: usize) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(size_hint + size_hint / 8);
        codec::encode_into(Kind::Snapshot, shard, &mut bytes);
        bytes
    }

    /// The shard as of its journal record `seq`, for a snapshot taken off its
    /// actor's thread: the newest snapshot that decodes and the journal after it.
    /// Records after `seq` (appended meanwhile) are not read. Every record through
    /// `seq` must be in the journal's files (see [`Journal::roll`]).
    pub fn shard_as_of(&self, id: &ShardId, product: &ProductInfo, seq: u64) -> Result<Shadow, StorageError> {
        let journal = self.journal(id)?;
        let Shadow { mut shard, seq: mut last } = self.newest_snapshot(id, product)?;
        let corrupt =
            |at: u64, error: String| StorageError::Corrupt { place: format!("journal/{id} record {at}"), error };
        if last < seq {
            journal.file().read_after(last, |frame| {
                if frame.seq != last + 1 {
                    return Err(corrupt(frame.seq, format!("expected record {} next", last + 1)));
                }
                let event = codec::decode::<Event>(Kind::Event, &frame.record)
                    .map_err(|e| corrupt(frame.seq, e.to_string()))?;
                crate::domain::catch_broken_step(|| shard.apply_owned(event)).map_err(|panic| {
                    corrupt(frame.seq, format!("the record contradicts the state before it: {panic}"))
                })?;
                last = frame.seq;
                Ok(last < seq)
            })?;
        }
        if last != seq {
            return Err(corrupt(last + 1, format!("the journal ends before record {seq}")));
        }
        Ok(Shadow { shard, seq })
    }

    /// Decodes a snapshot of shard `id`. One written by format v10 did not count
    /// its archived coupon orders: they are recounted from the shard's archive.
    fn decode_snapshot_of(&self, id: &ShardId, bytes: &[u8]) -> Result<Shard, String> {
        let mut shard = codec::decode_snapshot(bytes).map_err(|e| e.to_string())?;
        if bytes.get(4) == Some(&codec::SNAPSHOT_WITHOUT_COUPON_COUNTS) {
            let archive = self.archive_tree(id).map_err(|e| e.to_string())?;
            for kv in archive.iter() {
                let (k, v) = kv.map_err(|e| e.to_string())?;
                let archived = codec::decode_archived(&v).map_err(|e| format!("archive/{id} record {k:?}: {e}"))?;
                shard.recount_archived_coupon(&archived);
            }
        }
        Ok(shard)
    }

    /// The newest snapshot of shard `id` that decodes (an empty shard without one).
    fn newest_snapshot(&self, id: &ShardId, product: &ProductInfo) -> Result<Shadow, StorageError> {
        let prefix = Self::snapshot_prefix(id);
        for name in snapshot_names(&self.snapshot_db, &prefix).into_iter().rev() {
            let Some(seq) = snapshot_seq(&prefix, &name) else { continue };
            let Some(v) = snapshot_value(&self.snapshot_db, &name)? else { continue };
            if let Ok(mut shard) = self.decode_snapshot_of(id, &v) {
                shard.rebuild_indexes();
                return Ok(Shadow { shard, seq });
            }
        }
        Ok(Shadow { shard: Shard::new(product.clone(), id.shard), seq: 0 })
    }

    /// Stores an encoded snapshot taken at `seq`, durable when this returns: the
    /// snapshot database is flushed here, on the caller's thread, never by group
    /// commit (see [`Storage::snapshot_db`]).
    pub fn put_snapshot(&self, id: &ShardId, seq: u64, bytes: Vec<u8>) -> Result<(), StorageError> {
        self.snapshot_db.open_tree(Self::snapshot_name(id, seq))?.insert(SNAPSHOT_VALUE, bytes)?;
        self.snapshot_db.flush()?;
        Ok(())
    }

    /// Test and tooling access: store raw snapshot bytes (to simulate corruption).
    pub fn write_snapshot_raw(&self, id: &ShardId, seq: u64, bytes: &[u8]) -> Result<(), StorageError> {
        self.snapshot_db.open_tree(Self::snapshot_name(id, seq))?.insert(SNAPSHOT_VALUE, bytes)?;
        Ok(())
    }

    /// Removes snapshots older than `keep_from_seq` and journal records through it.
    /// Call only once the snapshot at `keep_from_seq` is durable.
    /// While a backup runs, nothing is trimmed (the next snapshot's trim does it).
    pub fn trim(&self, id: &ShardId, journal: &Journal, keep_from_seq: u64) -> Result<(), StorageError> {
        let _gate = self.trim_gate.read().unwrap_or_else(|e| e.into_inner());
        if self.trims_held() {
            metrics::counter!("kami_trims_deferred_total").increment(1);
            return Ok(());
        }
        let prefix = Self::snapshot_prefix(id);
        // One by one (a tree each, see [`BackupTree`]): any subset of older
        // snapshots may go, the newest one stays.
        for name in snapshot_names(&self.snapshot_db, &prefix) {
            if snapshot_seq(&prefix, &name).is_some_and(|seq| seq < keep_from_seq) {
                self.snapshot_db.drop_tree(name)?;
            }
        }
        // Group commit does not flush the snapshot database: without this, the old
        // snapshots would come back after a crash (harmless, but a repair at start).
        self.snapshot_db.flush()?;
        crate::chaos::reached(crate::chaos::CrashPoint::MidTrim, || {
            let _ = self.flush_now();
        });
        // Records some webhook endpoint has not been sent yet stay (`webhooks`).
        let keep = self.webhook_floor(id)?.map_or(keep_from_seq, |floor| floor.min(keep_from_seq));
        // Records not yet shipped to the archive stay too (`backup`).
        let keep = self.archive_floor(&format!("stock/{}/{}", id.product, id.shard)).map_or(keep, |f| f.min(keep));
        journal.file().trim_through(keep)
    }

    /// Reads one shard without changing anything: newest decodable snapshot, then
    /// the journal after it up to the first bad record. What is wrong on disk is
    /// returned as [`Finding`]s; a record that decodes but cannot be applied
    /// (the journal contradicts itself) is an error, never skipped.
    pub fn inspect(&self, id: &ShardId, product: &ProductInfo) -> Result<Recovered, StorageError> {
        let started = Instant::now();
        let journal = self.journal(id)?;
        let prefix = Self::snapshot_prefix(id);
        let mut findings = Vec::new();
        let mut base: Option<(u64, Shard, usize)> = None;
        let mut older_snapshots = 0u64;
        // The newest snapshot that does not decode, if newer than the one used.
        let mut newest_bad: Option<(u64, String)> = None;
        for name in snapshot_names(&self.snapshot_db, &prefix).into_iter().rev() {
            let Some(seq) = snapshot_seq(&prefix, &name) else { continue };
            if base.is_some() {
                older_snapshots += 1;
                continue;
            }
            // A tree made, its snapshot not written (a crash in between) holds nothing.
            let Some(v) = snapshot_value(&self.snapshot_db, &name)? else { continue };
            match self.decode_snapshot_of(id, &v) {
                Ok(mut shard) => {
                    shard.rebuild_indexes();
                    base = Some((seq, shard, v.len()));
                }
                Err(e) => {
                    newest_bad.get_or_insert((seq, e.to_string()));
                    findings.push(Finding::CorruptSnapshot { seq, error: e.to_string() })
                }
            }
        }
        let (snapshot_seq, mut shard, snapshot_bytes) =
            base.unwrap_or_else(|| (0, Shard::new(product.clone(), id.shard), 0));
        let mut last = snapshot_seq;
        let mut replayed = 0u64;
        let mut journal_bytes = 0u64;
        // Where the journal stops being readable, and why.
        let mut bad: Option<(u64, String)> = None;
        let end = journal.file().read_after(snapshot_seq, |frame| {
            let seq = frame.seq;
            if seq != last + 1 {
                bad = Some((seq, format!("expected record {} next", last + 1)));
                return Ok(false);
            }
            match codec::decode::<Event>(Kind::Event, &frame.record) {
                Err(e) => {
                    bad = Some((seq, e.to_string()));
                    Ok(false)
                }
                Ok(event) => {
                    // The domain asserts each event fits the state before it.
                    crate::domain::catch_broken_step(|| shard.apply_owned(event)).map_err(|panic| {
                        StorageError::Corrupt {
                            place: format!("journal/{id} record {seq}"),
                            error: format!("the record decodes but contradicts the state before it: {panic}"),
                        }
                    })?;
                    last = seq;
                    replayed += 1;
                    journal_bytes += frame.record.len() as u64;
                    Ok(true)
                }
            }
        })?;
        if let (None, End::Torn { seq, error }) = (&bad, end) {
            bad = Some((seq, error));
        }
        // Counted after reading: the read found where the journal ends.
        // Records kept for webhook endpoints not sent them yet are not a trim left undone.
        let kept_for_webhooks = self.webhook_floor(id)?.map_or(snapshot_seq, |floor| floor.min(snapshot_seq));
        let covered = journal.file().covered(kept_for_webhooks)?;
        if snapshot_seq > 0 && (covered > 0 || older_snapshots > 0) {
            let untrimmed = Finding::Untrimmed { snapshot_seq, journal_records: covered, older_snapshots };
            let after_snapshots = findings.iter().take_while(|f| matches!(f, Finding::CorruptSnapshot { .. })).count();
            findings.insert(after_snapshots, untrimmed);
        }
        if let Some((seq, error)) = bad {
            // The journal's first record after the base must follow it: a gap
            // there is a trimmed (or lost) history, not a torn tail.
            if seq > last + 1 && last == snapshot_seq {
                let journal_starts = format!("the journal starts at record {seq}, after a gap from {last}");
                return Err(match &newest_bad {
                    Some((bad_seq, error)) => StorageError::Corrupt {
                        place: format!("snapshots/{id} at {bad_seq}"),
                        error: format!(
                            "the snapshot does not decode ({error}) and {journal_starts}: written by a newer \
                             kami, or damaged? Nothing was changed"
                        ),
                    },
                    None => StorageError::Corrupt {
                        place: format!("journal/{id}"),
                        error: format!("{journal_starts} and no snapshot covers it; nothing was changed"),
                    },
                });
            }
            let discarded = journal.last_seq()?.max(seq) - seq + 1;
            findings.push(Finding::TornTail { seq, error, discarded_records: discarded });
        }
        // An older snapshot stands in for an undecodable newer one only if the
        // journal still holds every record the newer one covered. Otherwise the
        // shard's acknowledged history is not all readable: stop, delete nothing.
        if let Some((bad_seq, error)) = newest_bad {
            let torn_before = findings.iter().any(|f| matches!(f, Finding::TornTail { seq, .. } if *seq <= bad_seq));
            if last < bad_seq || torn_before {
                return Err(StorageError::Corrupt {
                    place: format!("snapshots/{id} at {bad_seq}"),
                    error: format!(
                        "the snapshot does not decode ({error}) and the journal no longer holds the records it covers \
                         (it ends at {last}); written by a newer kami, or damaged? Nothing was changed"
                    ),
                });
            }
        }
        Ok(Recovered {
            shard,
            journal,
            last_seq: last,
            snapshot_seq,
            snapshot_bytes: snapshot_bytes as u64,
            replayed,
            journal_bytes,
            elapsed: started.elapsed(),
            findings,
        })
    }

    /// Rebuilds one shard ([`Storage::inspect`]) and repairs what it found: a torn
    /// tail is removed (it was never acknowledged: replies wait for the flush of a
    /// whole record), an interrupted trim is finished. Each repair is logged.
    pub fn recover(&self, id: &ShardId, product: &ProductInfo) -> Result<Recovered, StorageError> {
        let r = self.inspect(id, product)?;
        for finding in &r.findings {
            tracing::warn!(shard = %id, %finding, "recovery repairs the shard's storage");
            match finding {
                Finding::CorruptSnapshot { .. } => {}
                Finding::TornTail { seq, .. } => r.journal.file().truncate_from(*seq)?,
                Finding::Untrimmed { snapshot_seq, .. } => self.trim(id, &r.journal, *snapshot_seq)?,
            }
        }
        Ok(r)
    }
}

/// A copy of one shard at a journal record, built off its actor's thread to encode
/// a snapshot from ([`Storage::shard_as_of`]): a snapshot costs the actor nothing
/// but a roll of its journal.
pub struct Shadow {
    shard: Shard,
    seq: u64,
}

impl Shadow {
    pub fn shard(&self) -> &Shard {
        &self.shard
    }

    /// The journal record it is at.
    pub fn seq(&self) -> u64 {
        self.seq
    }
}

/// Something wrong on disk that recovery works around (see [`Storage::recover`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    /// A snapshot that does not decode; an older one (or the journal alone) is used.
    CorruptSnapshot { seq: u64, error: String },
    /// A journal record that is missing, fails its checksum or does not decode: it
    /// and the `discarded_records` from it on are not replayed.
    TornTail { seq: u64, error: String, discarded_records: u64 },
    /// Journal records or older snapshots the newest snapshot covers: a trim was
    /// interrupted by a crash.
    Untrimmed { snapshot_seq: u64, journal_records: u64, older_snapshots: u64 },
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Finding::CorruptSnapshot { seq, error } => {
                write!(f, "snapshot at {seq} does not decode ({error}); an older state is used")
            }
            Finding::TornTail { seq, error, discarded_records } => write!(
                f,
                "journal record {seq} is torn or corrupt ({error}); it and the records after it ({discarded_records} in all) are discarded"
            ),
            Finding::Untrimmed { snapshot_seq, journal_records, older_snapshots } => write!(
                f,
                "a trim was interrupted: {journal_records} journal records and {older_snapshots} older snapshots are covered by the snapshot at {snapshot_seq}"
            ),
        }
    }
}

/// A stored shelf state: the state's byte, then since when (u64 BE).
fn decode_terms(product: &str, v: &[u8]) -> Result<Terms, StorageError> {
    codec::decode_terms(v)
        .map_err(|e| StorageError::Corrupt { place: format!("terms/{product}"), error: e.to_string() })
}

fn decode_shelf(product: &str, v: &[u8]) -> Result<(Shelf, u64), StorageError> {
    let corrupt = || StorageError::Corrupt { place: format!("shelf/{product}"), error: "not a shelf state".into() };
    let shelf = v.first().copied().and_then(Shelf::from_u8).ok_or_else(corrupt)?;
    let since = u64::from_be_bytes(v.get(1..9).and_then(|b| b.try_into().ok()).ok_or_else(corrupt)?);
    Ok((shelf, since))
}

/// A shard as rebuilt from storage, with its journal positioned after the last record.
pub struct Recovered {
    pub shard: Shard,
    pub journal: Journal,
    pub last_seq: u64,
    pub snapshot_seq: u64,
    pub snapshot_bytes: u64,
    pub replayed: u64,
    pub journal_bytes: u64,
    pub elapsed: Duration,
    /// What was wrong on disk (repaired by [`Storage::recover`], only reported by
    /// [`Storage::inspect`]).
    pub findings: Vec<Finding>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Storage in `dir` with small limits and no linger.
    fn open(dir: &std::path::Path) -> Arc<Storage> {
        Storage::open(&StorageOptions {
            path: dir.to_path_buf(),
            cache_capacity_bytes: 8 << 20,
            max_pending_commits: 16,
            max_commit_batch: 16,
            commit_linger: Duration::ZERO,
            commit_busy_linger: Duration::ZERO,
        })
        .unwrap()
    }

    /// A ticket taken after an append completes only once the commit thread has
    /// synced that journal (it is no longer listed as written since its last sync).
    #[tokio::test]
    async fn a_ticket_completes_after_the_journals_written_before_it_are_synced() {
        let dir = tempfile::tempdir().unwrap();
        let storage = open(dir.path());
        let journal = storage.journal(&ShardId::new("p", 0)).unwrap();
        journal.append(1, &Event::KeysImported { keys: vec!["k".into()] }).unwrap();
        assert!(journal.file().is_dirty(), "an append marks its journal for the next sync");
        storage.ticket().unwrap().wait().await.unwrap();
        assert!(!journal.file().is_dirty(), "the ticket's flush synced the journal");
        assert!(storage.dirty.take().is_empty());
    }

    /// A snapshot's shadow copy is the shard as of the record asked for, whether
    /// built from the stored snapshot or brought forward from an earlier copy, and
    /// never includes what was appended after that record.
    #[test]
    fn a_shadow_is_the_shard_as_of_the_record_asked_for() {
        use crate::domain::shard::{NewOrder, Outcome};
        let dir = tempfile::tempdir().unwrap();
        let storage = open(dir.path());
        let product = ProductInfo {
            id: "p".into(),
            name: "P".into(),
            price_cents: 100,
            per_buyer_limit: 0,
            shards: 1,
            created_at_ms: 0,
        };
        let id = ShardId::new("p", 0);
        let journal = storage.journal(&id).unwrap();
        let mut live = Shard::new(product.clone(), 0);
        let mut states = vec![live.counts()];
        let (events, _, _) = live.import_keys((0..10).map(|i| format!("k{i}")).collect());
        let mut seq = 0;
        for event in events {
            seq += 1;
            journal.append(seq, &event).unwrap();
        }
        states.push(live.counts());
        for i in 0..6u64 {
            let order = NewOrder {
                buyer: format!("b{i}"),
                quantity: 1,
                idempotency: None,
                query_token: String::new(),
                ttl_ms: 60_000,
                password: None,
                coupon: None,
                reseller: None,
            };
            let Ok(Outcome::Changed(event, _)) = live.create_order(order, i) else { panic!("an order") };
            seq += 1;
            journal.append(seq, &event).unwrap();
            states.push(live.counts());
            if seq == 3 {
                // A stored snapshot at record 3: a shadow built without a copy starts there.
                storage.write_snapshot(&id, 3, &live).unwrap();
            }
        }
        assert_eq!(seq, 7);
        let at = |s: &Shadow| (s.seq(), s.shard().counts());
        let first = storage.shard_as_of(&id, &product, 5).unwrap();
        assert_eq!(at(&first), (5, states[5]), "from the snapshot at 3, records 4 and 5, not 6 and 7");
        let later = storage.shard_as_of(&id, &product, 7).unwrap();
        assert_eq!(at(&later), (7, states[7]));
        assert!(storage.shard_as_of(&id, &product, 8).is_err(), "record 8 is not in the journal");
    }
}
