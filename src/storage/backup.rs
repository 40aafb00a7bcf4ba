//! Online backups: one consistent cut of a running data directory, written as a
//! single checksummed stream, and its restore into an empty directory.
//!
//! **The cut.** Every journal record becomes durable through the commit log, one
//! cycle at a time, under the log's lock (see [`super::commit`]). With that lock
//! held, between two cycles, each journal's durable end ([`JournalFile::durable`])
//! is what the completed cycles made durable: a prefix of the one order in which
//! the commit thread made records durable. So the ends read under the lock are
//! one instant across every stock, points and coupon journal: a record
//! acknowledged before it is below its journal's end (a reply waits for the sync
//! of its record), and a record written later is above it. A key lent by one
//! shard and received by another is therefore never received without being lent.
//!
//! **What else is copied.** Every sled tree, read after the cut, with what the cut
//! excludes taken out: snapshots newer than their journal's end (only the newest
//! snapshot at or below it is kept, with the journal's records after it through
//! the end), products whose journals did not exist at the cut (and what is keyed
//! by them), webhook cursors past their journal's end (lowered to it: an event
//! not in the backup is sent again after a restore, at least once as always).
//! Archive and lookup records read after the cut may hold orders archived after
//! it; restored, such an order is both in its shard and in the archive, as after
//! a crash between the archive's write and the journal's record, which the
//! shard's next archiving round settles the same way.
//!
//! While a backup runs, trims are held (a trim would delete the snapshot and the
//! records the cut needs); snapshots go on, and selling never waits for a backup:
//! the log's lock is held for one read of each journal's end.
//!
//! **Format** (`.kamibak`): the magic `KAMIBAK\x01`, then entries, each
//! `length (u32 LE) | CRC32 of the payload (u32 LE) | payload` where the payload
//! is a bincode [`Entry`]: one `Header` first, then trees, journals and sealed
//! files in any order, and `End` last with the number of entries before it and
//! the SHA-256 of every byte before its own frame. Values and journal records
//! are cut into parts of at most [`PART_BYTES`], so no entry is larger.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::journal::{self, JournalFile};
use super::{codec, Storage, StorageError, StorageOptions};

pub const MAGIC: &[u8; 8] = b"KAMIBAK\x01";
/// The format written today.
pub const FORMAT: u32 = 1;
/// Largest part of a value or of a journal's frames in one entry.
pub const PART_BYTES: usize = 4 << 20;
/// Largest entry accepted on read (a part, its names and framing).
const MAX_ENTRY_BYTES: usize = PART_BYTES + (1 << 20);
/// Largest value reassembled from parts on restore (a snapshot of a large shard).
const MAX_VALUE_BYTES: u64 = 4 << 30;
/// The CPU priority (nice value) backups and archives are written at: on a busy
/// host they yield the cores to selling, on an idle one they run at full speed.
pub const BACKGROUND_NICE: i32 = 10;

/// Lowers the calling thread's CPU priority to [`BACKGROUND_NICE`] (threads it
/// starts afterwards inherit it), unless it is lower already. On Linux a nice value
/// is a thread's own, so the rest of the process is untouched; where it cannot be
/// lowered, nothing changes.
pub fn lower_priority() {
    #[cfg(target_os = "linux")]
    if own_nice() < BACKGROUND_NICE {
        // SAFETY: setpriority only reads its plain integer arguments; `who` 0 is the
        // calling thread.
        unsafe {
            libc::setpriority(libc::PRIO_PROCESS as _, 0, BACKGROUND_NICE);
        }
    }
}

/// The calling thread's nice value.
#[cfg(target_os = "linux")]
fn own_nice() -> i32 {
    // SAFETY: getpriority only reads its plain integer arguments (0: the calling thread).
    unsafe { libc::getpriority(libc::PRIO_PROCESS as _, 0) }
}

/// Runs `work` on a thread of its own at the background priority (see
/// [`lower_priority`]), so a backup never shares a thread whose priority others rely on.
pub fn in_background<T: Send + 'static>(
    name: &str,
    work: impl FnOnce() -> T + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<T>> {
    std::thread::Builder::new().name(name.into()).spawn(move || {
        lower_priority();
        work()
    })
}

/// Shortest passphrase that may seal the secrets.
pub const MIN_PASSPHRASE_BYTES: usize = 12;
/// The file a data directory keeps generated secrets in (see `app`).
pub const SECRETS_FILE: &str = "secrets.json";

/// One entry of a backup stream.
#[derive(Debug, Serialize, Deserialize)]
pub enum Entry {
    Header(Manifest),
    /// A part of one sled value: `offset` into a value of `total` bytes.
    Tree {
        tree: Vec<u8>,
        key: Vec<u8>,
        total: u64,
        offset: u64,
        bytes: Vec<u8>,
    },
    /// Whole frames `first..=last` of the journal `name` (its directory under
    /// `journal/`), as its segment files hold them.
    Journal {
        name: String,
        first: u64,
        last: u64,
        frames: Vec<u8>,
    },
    /// A file of the data directory sealed with a passphrase (AES-256-GCM, the key
    /// Argon2id of the passphrase and `salt`).
    Sealed {
        name: String,
        salt: [u8; 16],
        nonce: [u8; 12],
        ciphertext: Vec<u8>,
    },
    End {
        entries: u64,
        sha256: [u8; 32],
    },
}

/// What a backup says of itself (its first entry).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub kami_version: String,
    pub taken_at_ms: u64,
    /// Each journal's last record in the backup (its durable end at the cut).
    pub cut: BTreeMap<String, u64>,
    /// An increment (continuous archiving): each journal's last record in the
    /// archive before it; its records follow on from there. `None`: a full backup.
    pub after: Option<BTreeMap<String, u64>>,
    /// Stored trees an increment holds whole (they replace what came before).
    pub trees: Vec<Vec<u8>>,
}

/// What verifying or restoring a backup found.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub manifest: Manifest,
    pub entries: u64,
    pub bytes: u64,
    pub tree_values: u64,
    pub journal_records: u64,
    /// Sealed files (secrets) in it.
    pub sealed: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("not a kami backup: {0}")]
    Invalid(String),
    #[error("{0}")]
    Io(String),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("{0}")]
    Refused(String),
}

impl From<sled::Error> for BackupError {
    fn from(e: sled::Error) -> Self {
        BackupError::Storage(e.into())
    }
}

fn io(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> BackupError {
    move |e| BackupError::Io(format!("{what}: {e}"))
}

/// Writes entries with their frames, counting and hashing every byte.
struct Writer<'a> {
    out: &'a mut dyn Write,
    hash: Sha256,
    entries: u64,
    bytes: u64,
}

impl Writer<'_> {
    fn raw(&mut self, bytes: &[u8]) -> Result<(), BackupError> {
        self.hash.update(bytes);
        self.bytes += bytes.len() as u64;
        self.out.write_all(bytes).map_err(io("writing the backup"))
    }

    fn entry(&mut self, entry: &Entry) -> Result<(), BackupError> {
        let payload = bincode::serialize(entry).expect("an entry serialises");
        let mut head = [0u8; 8];
        head[..4].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        head[4..].copy_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        self.raw(&head)?;
        self.raw(&payload)?;
        self.entries += 1;
        Ok(())
    }

    fn value(&mut self, tree: &[u8], key: &[u8], value: &[u8]) -> Result<(), BackupError> {
        let total = value.len() as u64;
        let mut offset = 0usize;
        loop {
            let end = (offset + PART_BYTES).min(value.len());
            let part = Entry::Tree {
                tree: tree.to_vec(),
                key: key.to_vec(),
                total,
                offset: offset as u64,
                bytes: value[offset..end].to_vec(),
            };
            self.entry(&part)?;
            offset = end;
            if offset >= value.len() {
                return Ok(());
            }
        }
    }

    fn finish(mut self) -> Result<(u64, u64), BackupError> {
        let sha256: [u8; 32] = self.hash.clone().finalize().into();
        let entries = self.entries;
        self.entry(&Entry::End { entries, sha256 })?;
        self.out.flush().map_err(io("writing the backup"))?;
        Ok((self.entries, self.bytes))
    }
}

/// Where a snapshot tree's key says its journal is and which record it covers.
fn snapshot_of(tree: &str, key: &[u8]) -> Option<(String, u64)> {
    if tree == "snapshots" {
        // `{product}/{shard}\0{seq BE}`
        let nul = key.len().checked_sub(9)?;
        if key[nul] != 0 {
            return None;
        }
        let seq = u64::from_be_bytes(key[nul + 1..].try_into().ok()?);
        let name = std::str::from_utf8(&key[..nul]).ok()?;
        return Some((format!("stock/{name}"), seq));
    }
    // Ledger snapshots (`points-snapshots`, `coupons-snapshots`): shard BE ++ seq BE.
    let ledger = tree.strip_suffix("-snapshots")?;
    if key.len() != 10 {
        return None;
    }
    let shard = u16::from_be_bytes(key[..2].try_into().ok()?);
    Some((format!("{ledger}/{shard}"), u64::from_be_bytes(key[2..].try_into().ok()?)))
}

/// The journal a webhook cursor's key (`{product}\0{shard BE}\0{endpoint}`) is in.
fn cursor_journal(key: &[u8]) -> Option<String> {
    let nul = key.iter().position(|&b| b == 0)?;
    let product = std::str::from_utf8(&key[..nul]).ok()?;
    let shard = u16::from_be_bytes(key.get(nul + 1..nul + 3)?.try_into().ok()?);
    Some(format!("stock/{product}/{shard}"))
}

/// The product a per-product tree's key or name belongs to, for the trees kept
/// per product.
fn product_of(tree: &str, key: &[u8]) -> Option<String> {
    let text = |b: &[u8]| std::str::from_utf8(b).ok().map(str::to_string);
    match tree {
        "products" | "shelf" | "terms" | "key-modes" | "points-prices" => text(key),
        "group-deals" => text(key.split(|&b| b == b'/').next()?),
        "webhook-cursors" => text(key.split(|&b| b == 0).next()?),
        _ => {
            let rest = tree.strip_prefix("archive/").or_else(|| tree.strip_prefix("lookup/"))?;
            Some(rest.rsplit_once('/')?.0.to_string())
        }
    }
}

/// Every journal directory under `journal/`, by name (`stock/p/0`, `points/3`).
fn journal_names(root: &Path) -> Vec<String> {
    let dirs = |p: PathBuf| super::journal_dirs(&p);
    let base = root.join("journal");
    let mut out = Vec::new();
    for kind in dirs(base.clone()) {
        match kind.as_str() {
            "log" => {}
            "stock" => {
                for product in dirs(base.join("stock")) {
                    for shard in dirs(base.join("stock").join(&product)) {
                        out.push(format!("stock/{product}/{shard}"));
                    }
                }
            }
            _ => {
                for shard in dirs(base.join(&kind)) {
                    out.push(format!("{kind}/{shard}"));
                }
            }
        }
    }
    out.sort();
    out
}

fn seal_key(passphrase: &str, salt: &[u8; 16]) -> [u8; 32] {
    use argon2::{Algorithm, Argon2, Params, Version};
    let params = Params::new(19 * 1024, 2, 1, Some(32)).expect("valid parameters");
    let mut key = [0u8; 32];
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
        .hash_password_into(passphrase.as_bytes(), salt, &mut key)
        .expect("a 32-byte key from any passphrase");
    key
}

fn seal(name: &str, plain: &[u8], passphrase: &str) -> Entry {
    use aes_gcm::aead::{Aead, KeyInit};
    let salt: [u8; 16] = rand::random();
    let nonce: [u8; 12] = rand::random();
    let cipher = aes_gcm::Aes256Gcm::new(&seal_key(passphrase, &salt).into());
    let ciphertext = cipher.encrypt(&nonce.into(), plain).expect("AES-GCM seals any length here");
    Entry::Sealed { name: name.to_string(), salt, nonce, ciphertext }
}

fn unseal(
    name: &str,
    salt: &[u8; 16],
    nonce: &[u8; 12],
    ciphertext: &[u8],
    passphrase: &str,
) -> Result<Vec<u8>, BackupError> {
    use aes_gcm::aead::{Aead, KeyInit};
    let cipher = aes_gcm::Aes256Gcm::new(&seal_key(passphrase, salt).into());
    cipher
        .decrypt(nonce.into(), ciphertext)
        .map_err(|_| BackupError::Refused(format!("{name}: wrong passphrase, or the sealed file was altered")))
}

/// A hold on trims for as long as it lives.
struct TrimHold<'a>(&'a Storage);

impl Drop for TrimHold<'_> {
    fn drop(&mut self) {
        self.0.backups.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Storage {
    /// Whether trims are held (a backup runs). Call with `trim_gate` read-locked.
    pub(super) fn trims_held(&self) -> bool {
        self.backups.load(Ordering::SeqCst) > 0
    }

    fn hold_trims(&self) -> TrimHold<'_> {
        // The write lock waits for a trim under way; later ones see the count.
        let _gate = self.trim_gate.write().unwrap_or_else(|e| e.into_inner());
        self.backups.fetch_add(1, Ordering::SeqCst);
        TrimHold(self)
    }

    /// Each journal's durable end, all at one instant (the commit log's lock held).
    fn cut(&self) -> Result<BTreeMap<String, u64>, StorageError> {
        let base = self.root.join("journal");
        let _log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        let mut cut = BTreeMap::new();
        for name in journal_names(&self.root) {
            let file = self.journal_file(base.join(&name))?;
            file.last_seq()?; // learns the end of a journal nothing has read yet
            cut.insert(name, file.durable());
        }
        Ok(cut)
    }

    /// Writes a consistent backup of this data directory to `out` (see the module
    /// documentation), selling on meanwhile. With a passphrase, the generated
    /// secrets (`secrets.json`) go in too, sealed with it.
    pub fn backup(&self, out: &mut dyn Write, passphrase: Option<&str>, now_ms: u64) -> Result<Summary, BackupError> {
        let _hold = self.hold_trims();
        let cut = self.cut()?;
        let manifest = Manifest {
            format: FORMAT,
            kami_version: env!("CARGO_PKG_VERSION").to_string(),
            taken_at_ms: now_ms,
            cut: cut.clone(),
            after: None,
            trees: Vec::new(),
        };
        let mut w = Writer { out, hash: Sha256::new(), entries: 0, bytes: 0 };
        w.raw(MAGIC)?;
        w.entry(&Entry::Header(manifest.clone()))?;

        let present: HashSet<String> = cut
            .keys()
            .filter_map(|n| n.strip_prefix("stock/"))
            .filter_map(|n| Some(n.rsplit_once('/')?.0.to_string()))
            .collect();
        let mut excluded: HashSet<String> = HashSet::new();
        for kv in self.products.iter() {
            let (k, _) = kv?;
            let product = String::from_utf8_lossy(&k).into_owned();
            if !present.contains(&product) {
                excluded.insert(product);
            }
        }
        let names = self.tree_names();
        let (mut values, mut records) = (0u64, 0u64);
        // The newest snapshot at or below the cut, per journal.
        let mut chosen: HashMap<String, u64> = HashMap::new();
        for name in &names {
            let tree_name = String::from_utf8_lossy(name).into_owned();
            if tree_name != "snapshots" && !tree_name.ends_with("-snapshots") {
                continue;
            }
            for k in self.tree(name)?.keys() {
                let k = k?;
                if let Some((journal, seq)) = snapshot_of(&tree_name, &k) {
                    if cut.get(&journal).is_some_and(|&end| seq <= end) {
                        let best = chosen.entry(journal).or_insert(seq);
                        *best = (*best).max(seq);
                    }
                }
            }
        }
        for name in &names {
            let tree_name = String::from_utf8_lossy(name).into_owned();
            if tree_name.starts_with("journal/") || tree_name == "payment-ids" {
                continue; // journals of old formats move into files at open; claims are rebuilt
            }
            let tree = self.tree(name)?;
            let snapshots = tree_name == "snapshots" || tree_name.ends_with("-snapshots");
            for kv in tree.iter() {
                let (k, v) = kv?;
                if product_of(&tree_name, &k).is_some_and(|p| excluded.contains(&p)) {
                    continue;
                }
                if snapshots {
                    match snapshot_of(&tree_name, &k) {
                        Some((journal, seq)) if chosen.get(&journal) == Some(&seq) => {}
                        _ => continue,
                    }
                }
                if tree_name == "webhook-cursors" {
                    let Some(end) = cursor_journal(&k).and_then(|j| cut.get(&j).copied()) else { continue };
                    let at = u64::from_be_bytes(v.as_ref().try_into().unwrap_or([0; 8]));
                    w.value(name, &k, &at.min(end).to_be_bytes())?;
                    values += 1;
                    continue;
                }
                w.value(name, &k, &v)?;
                values += 1;
            }
        }
        for (name, &end) in &cut {
            // From the chosen snapshot, or from the journal's first record; records a
            // webhook endpoint still needs before the snapshot come too.
            let from = chosen.get(name).copied().unwrap_or(0);
            let from = match name.strip_prefix("stock/").and_then(|n| n.rsplit_once('/')) {
                Some((product, shard)) => {
                    let id = crate::domain::ShardId::new(product, shard.parse().unwrap_or(0));
                    self.webhook_floor(&id)?.map_or(from, |floor| floor.min(from))
                }
                None => from,
            };
            records += self.ship_records(&mut w, name, from, end, |_| {})?;
        }
        let mut sealed = Vec::new();
        if let Some(passphrase) = passphrase {
            let path = self.root.join(SECRETS_FILE);
            if path.exists() {
                let plain = std::fs::read(&path).map_err(io(path.display()))?;
                w.entry(&seal(SECRETS_FILE, &plain, passphrase))?;
                sealed.push(SECRETS_FILE.to_string());
            }
        }
        let (entries, bytes) = w.finish()?;
        Ok(Summary { manifest, entries, bytes, tree_values: values, journal_records: records, sealed })
    }
}

/// Trees an increment leaves out: snapshots (a restore replays the increments'
/// records on the full backup's snapshots), the archive and lookup records (an
/// increment carries those of the orders its records archive), dead letters,
/// and what is rebuilt at start.
fn whole_in_increments(tree: &str) -> bool {
    !(tree == "snapshots"
        || tree.ends_with("-snapshots")
        || tree.starts_with("archive/")
        || tree.starts_with("lookup/")
        || tree.starts_with("journal/")
        || tree == "webhook-dead"
        || tree == "payment-ids")
}

/// Continuous archiving into a directory: a full backup now and then, and between
/// two of them increments of what became durable since the last file.
pub struct Archive {
    pub dir: PathBuf,
    pub full_every_ms: u64,
    /// Full backups kept (with the increments after the oldest of them).
    pub keep_full: usize,
    /// Each journal's last record shipped, and when that cut was taken.
    shipped: Option<(BTreeMap<String, u64>, u64)>,
    last_full_ms: u64,
    /// A digest of the stored trees the last increment held whole.
    trees_digest: [u8; 32],
}

/// What one archiving round did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Round {
    Full(PathBuf),
    Increment(PathBuf),
    /// Nothing new since the last file: the archive is current as of this round.
    Current,
}

/// A file of an archive directory: `full-{ms}.kamibak` or `inc-{ms}.kamibak`.
fn archive_files(dir: &Path) -> Result<Vec<(u64, bool, PathBuf)>, BackupError> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io(dir.display()))? {
        let entry = entry.map_err(io(dir.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(stem) = name.strip_suffix(".kamibak") else { continue };
        let (full, ms) = match (stem.strip_prefix("full-"), stem.strip_prefix("inc-")) {
            (Some(ms), _) => (true, ms),
            (_, Some(ms)) => (false, ms),
            _ => continue,
        };
        if let Ok(ms) = ms.parse() {
            out.push((ms, full, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

fn read_header(path: &Path) -> Result<Manifest, BackupError> {
    let file = std::fs::File::open(path).map_err(io(path.display()))?;
    match Reader::new(std::io::BufReader::new(file))?.next()? {
        Some(Entry::Header(m)) => Ok(m),
        _ => Err(BackupError::Invalid(format!("{}: no header", path.display()))),
    }
}

/// Writes `write`'s output to `{dir}/{name}` through a `.partial` file, synced,
/// renamed, and the directory synced: a name in the archive is a whole file.
fn write_file(
    dir: &Path,
    name: &str,
    write: impl FnOnce(&mut dyn Write) -> Result<Summary, BackupError>,
) -> Result<(PathBuf, Summary), BackupError> {
    let path = dir.join(name);
    let partial = dir.join(format!("{name}.partial"));
    let file = std::fs::File::create(&partial).map_err(io(partial.display()))?;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
    let summary = write(&mut out);
    let file = out.into_inner().map_err(|e| BackupError::Io(format!("{}: {e}", partial.display())));
    let summary = match (summary, file) {
        (Ok(s), Ok(f)) => {
            f.sync_all().map_err(io(partial.display()))?;
            s
        }
        (Err(e), _) | (_, Err(e)) => {
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
    };
    std::fs::rename(&partial, &path).map_err(io(path.display()))?;
    journal::sync_dir(dir)?;
    Ok((path, summary))
}

impl Archive {
    pub fn new(dir: PathBuf, full_every_ms: u64, keep_full: usize) -> Archive {
        Archive {
            dir,
            full_every_ms,
            keep_full: keep_full.max(1),
            shipped: None,
            last_full_ms: 0,
            trees_digest: [0; 32],
        }
    }

    /// When the newest file's cut was taken (`None` before the first).
    pub fn current_as_of_ms(&self) -> Option<u64> {
        self.shipped.as_ref().map(|(_, ms)| *ms)
    }
}

impl Storage {
    /// Turns continuous archiving on: from now on trims keep every record not yet
    /// shipped (call before recovery, which may trim).
    pub fn enable_archiving(&self) {
        let mut floor = self.archive_floor.lock().unwrap_or_else(|e| e.into_inner());
        floor.get_or_insert_with(BTreeMap::new);
    }

    /// The last record of journal `name` shipped to the archive, if archiving is on.
    pub(super) fn archive_floor(&self, name: &str) -> Option<u64> {
        let floor = self.archive_floor.lock().unwrap_or_else(|e| e.into_inner());
        floor.as_ref().map(|f| f.get(name).copied().unwrap_or(0))
    }

    fn set_archive_floor(&self, cut: &BTreeMap<String, u64>) {
        let mut floor = self.archive_floor.lock().unwrap_or_else(|e| e.into_inner());
        *floor = Some(cut.clone());
    }

    /// One round of continuous archiving (see [`Archive`]): a full backup when none
    /// is in the directory or the last is `full_every_ms` old, else an increment of
    /// what became durable since the last file (none when nothing did). Full
    /// backups past `keep_full` are pruned with the increments they lead.
    pub fn archive_round(&self, a: &mut Archive, now_ms: u64) -> Result<Round, BackupError> {
        std::fs::create_dir_all(&a.dir).map_err(io(a.dir.display()))?;
        if a.shipped.is_none() {
            // A round cut short by a crash leaves a partial file: never part of the archive.
            for entry in std::fs::read_dir(&a.dir).map_err(io(a.dir.display()))?.flatten() {
                if entry.file_name().to_string_lossy().ends_with(".kamibak.partial") {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
            // Resume from the newest file of a whole chain, if its journals can go on from it.
            let files = archive_files(&a.dir)?;
            if let (Some((_, _, newest)), Some((full_ms, _, _))) = (files.last(), files.iter().rev().find(|f| f.1)) {
                let m = read_header(newest)?;
                let base = self.cut()?;
                if m.cut.iter().all(|(name, &end)| base.get(name).is_some_and(|&now| now >= end)) {
                    self.set_archive_floor(&m.cut);
                    a.last_full_ms = *full_ms;
                    a.shipped = Some((m.cut, m.taken_at_ms));
                }
            }
        }
        let full_due = a.shipped.is_none() || now_ms.saturating_sub(a.last_full_ms) >= a.full_every_ms;
        if full_due {
            // Taken before the backup reads the trees: a change meanwhile only makes
            // the next round write an increment that holds it again.
            let digest = self.trees_digest()?;
            let (path, summary) =
                write_file(&a.dir, &format!("full-{now_ms:020}.kamibak"), |out| self.backup(out, None, now_ms))?;
            self.set_archive_floor(&summary.manifest.cut);
            a.shipped = Some((summary.manifest.cut, now_ms));
            a.last_full_ms = now_ms;
            a.trees_digest = digest;
            self.prune_archive(a)?;
            return Ok(Round::Full(path));
        }
        let (shipped, _) = a.shipped.clone().expect("a full backup came first");
        let cut = self.cut()?;
        let digest = self.trees_digest()?;
        let unchanged = cut.iter().all(|(name, end)| shipped.get(name).is_some_and(|s| s == end));
        if unchanged && digest == a.trees_digest {
            a.shipped = Some((shipped, now_ms));
            return Ok(Round::Current);
        }
        let (path, summary) = write_file(&a.dir, &format!("inc-{now_ms:020}.kamibak"), |out| {
            self.write_increment(out, &shipped, &cut, now_ms)
        })?;
        self.set_archive_floor(&summary.manifest.cut);
        a.shipped = Some((summary.manifest.cut, now_ms));
        a.trees_digest = digest;
        Ok(Round::Increment(path))
    }

    /// Writes journal `name`'s records after `from` through `end` as entries of at
    /// most [`PART_BYTES`], showing each to `each`; returns how many. Every one
    /// must still be in the journal's files (trims are held, or kept by the floor).
    fn ship_records(
        &self,
        w: &mut Writer<'_>,
        name: &str,
        from: u64,
        end: u64,
        mut each: impl FnMut(&journal::Frame),
    ) -> Result<u64, BackupError> {
        let file = self.journal_file(self.root.join("journal").join(name))?;
        let mut frames = Vec::new();
        let (mut first, mut seen, mut records) = (0u64, from, 0u64);
        let mut failed = None;
        file.read_durable(from, end, |frame| {
            each(&frame);
            seen = frame.seq;
            if frames.is_empty() {
                first = frame.seq;
            }
            frames.extend_from_slice(&frame.seq.to_le_bytes());
            frames.extend_from_slice(&frame.record);
            records += 1;
            if frames.len() >= PART_BYTES || frame.seq == end {
                let chunk = Entry::Journal {
                    name: name.to_string(),
                    first,
                    last: frame.seq,
                    frames: std::mem::take(&mut frames),
                };
                if let Err(e) = w.entry(&chunk) {
                    failed = Some(e);
                    return Ok(false);
                }
            }
            Ok(true)
        })?;
        if let Some(e) = failed {
            return Err(e);
        }
        if seen < end {
            return Err(BackupError::Storage(StorageError::Corrupt {
                place: format!("journal/{name}"),
                error: format!("records {}..={end} are no longer in the journal", seen + 1),
            }));
        }
        Ok(records)
    }

    fn trees_digest(&self) -> Result<[u8; 32], BackupError> {
        let mut h = Sha256::new();
        let names = self.tree_names();
        for name in names.iter().filter(|n| whole_in_increments(&String::from_utf8_lossy(n))) {
            h.update((name.len() as u64).to_le_bytes());
            h.update(name);
            for kv in self.tree(name)?.iter() {
                let (k, v) = kv?;
                h.update((k.len() as u64).to_le_bytes());
                h.update(&k);
                h.update((v.len() as u64).to_le_bytes());
                h.update(&v);
            }
        }
        Ok(h.finalize().into())
    }

    /// Keeps the newest `keep_full` full backups and the increments after the
    /// oldest of them; deletes the rest (partial files of a round cut short too).
    fn prune_archive(&self, a: &Archive) -> Result<(), BackupError> {
        let files = archive_files(&a.dir)?;
        let fulls: Vec<u64> = files.iter().filter(|f| f.1).map(|f| f.0).collect();
        let Some(&oldest_kept) = fulls.len().checked_sub(a.keep_full).map_or(fulls.first(), |i| fulls.get(i)) else {
            return Ok(());
        };
        for (ms, _, path) in files.iter().filter(|f| f.0 < oldest_kept) {
            std::fs::remove_file(path).map_err(io(path.display()))?;
            tracing::info!(file = %path.display(), taken_at_ms = ms, "archive: pruned");
        }
        Ok(())
    }

    /// An increment: each journal's records after `shipped` through `cut`, the
    /// trees [`whole_in_increments`] holds whole, and the archive and lookup
    /// records of the orders those records archive.
    fn write_increment(
        &self,
        out: &mut dyn Write,
        shipped: &BTreeMap<String, u64>,
        cut: &BTreeMap<String, u64>,
        now_ms: u64,
    ) -> Result<Summary, BackupError> {
        let names = self.tree_names();
        let whole: Vec<Vec<u8>> =
            names.into_iter().filter(|n| whole_in_increments(&String::from_utf8_lossy(n))).collect();
        let after: BTreeMap<String, u64> =
            cut.keys().map(|n| (n.clone(), shipped.get(n).copied().unwrap_or(0))).collect();
        let manifest = Manifest {
            format: FORMAT,
            kami_version: env!("CARGO_PKG_VERSION").to_string(),
            taken_at_ms: now_ms,
            cut: cut.clone(),
            after: Some(after.clone()),
            trees: whole.clone(),
        };
        let mut w = Writer { out, hash: Sha256::new(), entries: 0, bytes: 0 };
        w.raw(MAGIC)?;
        w.entry(&Entry::Header(manifest.clone()))?;
        let (mut values, mut records) = (0u64, 0u64);
        for name in &whole {
            let tree_name = String::from_utf8_lossy(name).into_owned();
            for kv in self.tree(name)?.iter() {
                let (k, v) = kv?;
                if tree_name == "webhook-cursors" {
                    let Some(end) = cursor_journal(&k).and_then(|j| cut.get(&j).copied()) else { continue };
                    let at = u64::from_be_bytes(v.as_ref().try_into().unwrap_or([0; 8]));
                    w.value(name, &k, &at.min(end).to_be_bytes())?;
                } else {
                    w.value(name, &k, &v)?;
                }
                values += 1;
            }
        }
        for (name, &end) in cut {
            let from = after[name];
            let shard = name
                .strip_prefix("stock/")
                .and_then(|n| n.rsplit_once('/'))
                .map(|(product, shard)| crate::domain::ShardId::new(product, shard.parse().unwrap_or(0)));
            let mut archived: Vec<u64> = Vec::new();
            records += self.ship_records(&mut w, name, from, end, |frame| {
                if shard.is_some() {
                    if let Ok(crate::domain::Event::OrdersArchived { seqs, .. }) =
                        codec::decode::<crate::domain::Event>(codec::Kind::Event, &frame.record)
                    {
                        archived.extend(seqs);
                    }
                }
            })?;
            if let Some(id) = shard.filter(|_| !archived.is_empty()) {
                let (archive, lookup) = (self.archive_tree(&id)?, self.lookup_tree(&id)?);
                for seq in archived {
                    let Some(v) = archive.get(seq.to_be_bytes())? else { continue };
                    w.value(format!("archive/{}/{}", id.product, id.shard).as_bytes(), &seq.to_be_bytes(), &v)?;
                    values += 1;
                    let Ok(order) = codec::decode_archived(&v) else { continue };
                    let key = Self::lookup_key(&order.order.buyer, seq);
                    if let Some(p) = lookup.get(key)? {
                        w.value(format!("lookup/{}/{}", id.product, id.shard).as_bytes(), &key, &p)?;
                        values += 1;
                    }
                }
            }
        }
        let (entries, bytes) = w.finish()?;
        Ok(Summary { manifest, entries, bytes, tree_values: values, journal_records: records, sealed: Vec::new() })
    }
}

/// Reads a backup stream entry by entry, checking every frame, and the end.
struct Reader<R: Read> {
    input: R,
    hash: Sha256,
    entries: u64,
    bytes: u64,
    ended: bool,
}

impl<R: Read> Reader<R> {
    fn new(mut input: R) -> Result<Self, BackupError> {
        let mut magic = [0u8; 8];
        let got = journal::read_full(&mut input, &mut magic).map_err(io("reading the backup"))?;
        if got < 8 || &magic != MAGIC {
            return Err(BackupError::Invalid("it does not start with a kami backup's mark".into()));
        }
        let mut hash = Sha256::new();
        hash.update(magic);
        Ok(Reader { input, hash, entries: 0, bytes: 8, ended: false })
    }

    /// The next entry before the end (`None` once the end checked out).
    fn next(&mut self) -> Result<Option<Entry>, BackupError> {
        if self.ended {
            return Ok(None);
        }
        let mut head = [0u8; 8];
        let got = journal::read_full(&mut self.input, &mut head).map_err(io("reading the backup"))?;
        if got < 8 {
            return Err(BackupError::Invalid(format!("cut short after {} entries (no end)", self.entries)));
        }
        let len = u32::from_le_bytes(head[..4].try_into().expect("4 bytes")) as usize;
        let sum = u32::from_le_bytes(head[4..].try_into().expect("4 bytes"));
        if len > MAX_ENTRY_BYTES {
            return Err(BackupError::Invalid(format!("entry {} claims {len} bytes", self.entries + 1)));
        }
        let mut payload = vec![0u8; len];
        let got = journal::read_full(&mut self.input, &mut payload).map_err(io("reading the backup"))?;
        if got < len {
            return Err(BackupError::Invalid(format!("entry {} cut short", self.entries + 1)));
        }
        if crc32fast::hash(&payload) != sum {
            return Err(BackupError::Invalid(format!("entry {} fails its checksum", self.entries + 1)));
        }
        let entry: Entry = bincode::deserialize(&payload)
            .map_err(|e| BackupError::Invalid(format!("entry {} does not decode: {e}", self.entries + 1)))?;
        if let Entry::End { entries, sha256 } = &entry {
            let digest: [u8; 32] = self.hash.clone().finalize().into();
            if *entries != self.entries || digest != *sha256 {
                return Err(BackupError::Invalid("its end does not match what came before it".into()));
            }
            let mut extra = [0u8; 1];
            if journal::read_full(&mut self.input, &mut extra).map_err(io("reading the backup"))? > 0 {
                return Err(BackupError::Invalid("bytes follow its end".into()));
            }
            self.ended = true;
            self.bytes += 8 + len as u64;
            return Ok(None);
        }
        self.hash.update(head);
        self.hash.update(&payload);
        self.bytes += 8 + len as u64;
        self.entries += 1;
        Ok(Some(entry))
    }
}

/// Every entry of a backup, checked; `visit` sees each in order.
fn read_all(input: impl Read, mut visit: impl FnMut(Entry) -> Result<(), BackupError>) -> Result<Summary, BackupError> {
    let mut r = Reader::new(input)?;
    let manifest = match r.next()? {
        Some(Entry::Header(m)) => m,
        _ => return Err(BackupError::Invalid("its first entry is not its header".into())),
    };
    if manifest.format != FORMAT {
        return Err(BackupError::Invalid(format!("format {} (this kami reads {FORMAT})", manifest.format)));
    }
    let (mut values, mut records, mut sealed) = (0u64, 0u64, Vec::new());
    // Each journal's next record: chunks come in order and end at the cut.
    let mut next: HashMap<String, u64> = HashMap::new();
    // Each journal's first record in the backup, and the record its snapshot covers.
    let mut firsts: HashMap<String, u64> = HashMap::new();
    let mut covered: HashMap<String, u64> = HashMap::new();
    // The value being reassembled: tree, key, bytes so far.
    let mut open: Option<(Vec<u8>, Vec<u8>, u64, u64)> = None;
    while let Some(entry) = r.next()? {
        match &entry {
            Entry::Header(_) | Entry::End { .. } => return Err(BackupError::Invalid("a second header".into())),
            Entry::Tree { tree, key, total, offset, bytes } => {
                if *total > MAX_VALUE_BYTES {
                    return Err(BackupError::Invalid(format!("a value of {total} bytes")));
                }
                let expected = match &open {
                    Some((t, k, tot, at)) if t == tree && k == key && tot == total => *at,
                    Some(_) => return Err(BackupError::Invalid("a value left unfinished".into())),
                    None => 0,
                };
                if *offset != expected || offset + bytes.len() as u64 > *total {
                    return Err(BackupError::Invalid("a value's parts out of order".into()));
                }
                if *offset == 0 {
                    if let Some((journal, seq)) = std::str::from_utf8(tree).ok().and_then(|t| snapshot_of(t, key)) {
                        let c = covered.entry(journal).or_insert(seq);
                        *c = (*c).max(seq);
                    }
                }
                let at = offset + bytes.len() as u64;
                if at == *total {
                    open = None;
                    values += 1;
                } else {
                    open = Some((tree.clone(), key.clone(), *total, at));
                }
            }
            Entry::Journal { name, first, last, frames } => {
                let Some(&end) = manifest.cut.get(name) else {
                    return Err(BackupError::Invalid(format!("journal {name} is not in its cut")));
                };
                if next.get(name).is_some_and(|&n| n != *first) || *last > end || last < first {
                    return Err(BackupError::Invalid(format!("journal {name}: records {first}..={last} out of order")));
                }
                check_frames(name, *first, *last, frames)?;
                records += last - first + 1;
                next.insert(name.clone(), last + 1);
                firsts.entry(name.clone()).or_insert(*first);
            }
            Entry::Sealed { name, .. } => sealed.push(name.clone()),
        }
        visit(entry)?;
    }
    if open.is_some() {
        return Err(BackupError::Invalid("a value left unfinished".into()));
    }
    // Every journal whole from its snapshot (or its first record, or where the
    // archive stood before an increment) to the cut.
    for (name, &end) in &manifest.cut {
        let before = manifest.after.as_ref().and_then(|a| a.get(name).copied());
        if before.is_some_and(|b| b > end) {
            return Err(BackupError::Invalid(format!("journal {name} goes back in an increment")));
        }
        if let (Some(b), Some(&f)) = (before, firsts.get(name)) {
            if f != b + 1 {
                return Err(BackupError::Invalid(format!(
                    "journal {name}: the increment starts at {f}, not {}",
                    b + 1
                )));
            }
        }
        let snapshot = covered.get(name).copied().or(before).unwrap_or(0);
        let reached = next.get(name).map_or(snapshot, |&n| n - 1);
        let from = firsts.get(name).copied().unwrap_or(snapshot + 1);
        if reached != end || from > snapshot + 1 && from > 1 {
            return Err(BackupError::Invalid(format!(
                "journal {name} is not whole up to record {end} (snapshot at {snapshot}, records {from}..={reached})"
            )));
        }
    }
    Ok(Summary { manifest, entries: r.entries, bytes: r.bytes, tree_values: values, journal_records: records, sealed })
}

/// Every frame `first..=last` whole, in sequence, each record's envelope checked.
fn check_frames(name: &str, first: u64, last: u64, frames: &[u8]) -> Result<(), BackupError> {
    let bad = |why: String| BackupError::Invalid(format!("journal {name}: {why}"));
    let mut at = 0usize;
    for seq in first..=last {
        let head = frames.get(at..at + 8 + codec::HEADER_BYTES).ok_or_else(|| bad(format!("record {seq} missing")))?;
        if u64::from_le_bytes(head[..8].try_into().expect("8 bytes")) != seq {
            return Err(bad(format!("record {seq} out of sequence")));
        }
        let declared = u32::from_le_bytes(head[14..18].try_into().expect("4 bytes")) as usize;
        let end = at + 8 + codec::HEADER_BYTES + declared;
        let record = frames.get(at + 8..end).ok_or_else(|| bad(format!("record {seq} cut short")))?;
        codec::check(record).map_err(|e| bad(format!("record {seq}: {e}")))?;
        at = end;
    }
    if at != frames.len() {
        return Err(bad(format!("bytes after record {last}")));
    }
    Ok(())
}

/// Checks a backup whole (every checksum, the end's digest, every journal record's
/// envelope and sequence) without writing anything.
pub fn verify(input: impl Read) -> Result<Summary, BackupError> {
    read_all(input, |_| Ok(()))
}

/// Restores the backup at `from` into `data`, which must not exist or be empty:
/// the backup is verified whole first, then written into `{data}.restoring` and
/// renamed into place, so a restore cut short never leaves a data directory that
/// looks whole. Sealed secrets are written only with their passphrase.
pub fn restore(from: &Path, data: &Path, passphrase: Option<&str>) -> Result<Summary, BackupError> {
    restore_chain(&[from.to_path_buf()], data, passphrase)
}

/// Restores from an archive directory (continuous archiving, [`Archive`]) as of
/// `until_ms` (the newest state when `None`): the newest full backup cut at or
/// before it, then every increment after that full backup cut at or before it.
/// The state restored is the one of the last file's cut: at most one archiving
/// interval before `until_ms`.
pub fn restore_archive(
    dir: &Path,
    data: &Path,
    until_ms: Option<u64>,
    passphrase: Option<&str>,
) -> Result<Summary, BackupError> {
    let files = archive_files(dir)?;
    let until = until_ms.unwrap_or(u64::MAX);
    let Some(&(base_ms, _, ref base)) = files.iter().rev().find(|f| f.1 && f.0 <= until) else {
        return Err(BackupError::Refused(format!("{}: no full backup cut at or before that time", dir.display())));
    };
    let mut chain = vec![base.clone()];
    chain.extend(files.iter().filter(|f| !f.1 && f.0 > base_ms && f.0 <= until).map(|f| f.2.clone()));
    restore_chain(&chain, data, passphrase)
}

fn open_file(path: &Path) -> Result<std::io::BufReader<std::fs::File>, BackupError> {
    std::fs::File::open(path).map(|f| std::io::BufReader::with_capacity(1 << 20, f)).map_err(io(path.display()))
}

/// Restores a full backup and the increments after it, in order (see [`restore`]).
fn restore_chain(files: &[PathBuf], data: &Path, passphrase: Option<&str>) -> Result<Summary, BackupError> {
    if data.exists() && std::fs::read_dir(data).map_err(io(data.display()))?.next().is_some() {
        return Err(BackupError::Refused(format!(
            "{} is not empty: restore only into a new directory",
            data.display()
        )));
    }
    // Every file whole, each increment following on from the file before it, and
    // with a passphrase the sealed files opened by it: before anything is written.
    let mut before: Option<Manifest> = None;
    for (i, path) in files.iter().enumerate() {
        let summary = read_all(open_file(path)?, |entry| match (&entry, passphrase) {
            (Entry::Sealed { name, salt, nonce, ciphertext }, Some(p)) => {
                unseal(name, salt, nonce, ciphertext, p).map(drop)
            }
            _ => Ok(()),
        })
        .map_err(|e| BackupError::Invalid(format!("{}: {e}", path.display())))?;
        let m = summary.manifest;
        match (&before, &m.after) {
            (None, None) => {}
            (Some(prev), Some(after))
                if after.iter().all(|(name, &a)| prev.cut.get(name).copied().unwrap_or(0) == a)
                    && prev.cut.keys().all(|name| after.contains_key(name)) => {}
            _ if i == 0 => {
                return Err(BackupError::Invalid(format!("{}: an increment, not a full backup", path.display())))
            }
            _ => {
                return Err(BackupError::Invalid(format!(
                    "{}: does not follow on from the file before it",
                    path.display()
                )))
            }
        }
        before = Some(m);
    }
    let staging = {
        let mut name = data.file_name().map(|n| n.to_os_string()).unwrap_or_default();
        name.push(".restoring");
        data.with_file_name(name)
    };
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(io(staging.display()))?;
    }
    let written = write_restore(files, &staging, passphrase);
    if written.is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    let summary = written?;
    if data.exists() {
        std::fs::remove_dir(data).map_err(io(data.display()))?;
    }
    std::fs::rename(&staging, data).map_err(io(data.display()))?;
    if let Some(parent) = data.parent().filter(|p| !p.as_os_str().is_empty()) {
        journal::sync_dir(parent)?;
    }
    Ok(summary)
}

/// Writes the files into the new directory `staging` (see [`restore`]); the
/// summary is the last file's, with the counts of all.
fn write_restore(files: &[PathBuf], staging: &Path, passphrase: Option<&str>) -> Result<Summary, BackupError> {
    let storage = Storage::open(&StorageOptions {
        path: staging.to_path_buf(),
        cache_capacity_bytes: 64 << 20,
        max_pending_commits: 1024,
        max_commit_batch: 1024,
        commit_linger: std::time::Duration::ZERO,
        commit_busy_linger: std::time::Duration::ZERO,
    })?;
    let base = staging.join("journal");
    let mut journals: HashMap<String, std::sync::Arc<JournalFile>> = HashMap::new();
    let mut secrets: Option<Vec<u8>> = None;
    let mut total: Option<Summary> = None;
    for path in files {
        let mut value: Vec<u8> = Vec::new();
        // An increment holds these trees whole: what came before goes.
        for tree in &read_header(path)?.trees {
            storage.tree(tree)?.clear()?;
        }
        let summary = read_all(open_file(path)?, |entry| {
            match entry {
                Entry::Tree { tree, key, total, bytes, .. } => {
                    value.extend_from_slice(&bytes);
                    if value.len() as u64 == total {
                        storage.tree(&tree)?.insert(&key, std::mem::take(&mut value))?;
                    }
                }
                Entry::Journal { name, first, last, frames } => {
                    let file = match journals.get(&name) {
                        Some(f) => f.clone(),
                        None => {
                            let f = storage.journal_file(base.join(&name))?;
                            journals.insert(name.clone(), f.clone());
                            f
                        }
                    };
                    file.write_raw(first, last, &frames)?;
                }
                Entry::Sealed { name, salt, nonce, ciphertext } if name == SECRETS_FILE => {
                    if let Some(p) = passphrase {
                        secrets = Some(unseal(&name, &salt, &nonce, &ciphertext, p)?);
                    }
                }
                Entry::Sealed { .. } | Entry::Header(_) | Entry::End { .. } => {}
            }
            Ok(())
        })?;
        total = Some(match total {
            None => summary,
            Some(t) => Summary {
                entries: t.entries + summary.entries,
                bytes: t.bytes + summary.bytes,
                tree_values: t.tree_values + summary.tree_values,
                journal_records: t.journal_records + summary.journal_records,
                sealed: t.sealed,
                manifest: summary.manifest,
            },
        });
    }
    for file in journals.values() {
        file.sync()?;
    }
    drop(journals);
    storage.flush_now()?;
    drop(storage);
    // sled's I/O threads let go of the directory's lock a moment after the handle.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !Storage::lock_released(staging) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    if let Some(plain) = secrets {
        write_private(&staging.join(SECRETS_FILE), &plain)?;
    }
    Ok(total.expect("at least one file"))
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), BackupError> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut f = options.open(path).map_err(io(path.display()))?;
    f.write_all(bytes).and_then(|_| f.sync_all()).map_err(io(path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_os = "linux")]
    #[test]
    fn background_work_runs_at_the_lower_priority_and_leaves_its_caller_as_it_was() {
        let before = own_nice();
        let theirs = in_background("test-background", own_nice).unwrap().join().unwrap();
        assert_eq!(theirs, BACKGROUND_NICE.max(before), "a background thread yields the cores");
        assert_eq!(own_nice(), before, "the caller's priority is untouched");
    }

    #[test]
    fn snapshot_and_cursor_keys_name_their_journals() {
        let mut key = b"flash/1\0".to_vec();
        key.extend_from_slice(&42u64.to_be_bytes());
        assert_eq!(snapshot_of("snapshots", &key), Some(("stock/flash/1".into(), 42)));
        let mut key = 3u16.to_be_bytes().to_vec();
        key.extend_from_slice(&7u64.to_be_bytes());
        assert_eq!(snapshot_of("points-snapshots", &key), Some(("points/3".into(), 7)));
        assert_eq!(snapshot_of("products", b"x"), None);
        let mut key = b"flash\0".to_vec();
        key.extend_from_slice(&2u16.to_be_bytes());
        key.extend_from_slice(b"\0crm");
        assert_eq!(cursor_journal(&key).as_deref(), Some("stock/flash/2"));
        assert_eq!(product_of("webhook-cursors", &key).as_deref(), Some("flash"));
        assert_eq!(product_of("archive/a/b/3", b"k").as_deref(), Some("a/b"));
        assert_eq!(product_of("group-deals", b"p/ten").as_deref(), Some("p"));
        assert_eq!(product_of("meta", b"lookup-secret"), None);
    }

    #[test]
    fn a_sealed_file_opens_only_with_its_passphrase() {
        let Entry::Sealed { name, salt, nonce, ciphertext } = seal("s", b"{\"admin\":\"t\"}", "correct horse") else {
            unreachable!()
        };
        assert_eq!(unseal(&name, &salt, &nonce, &ciphertext, "correct horse").unwrap(), b"{\"admin\":\"t\"}");
        assert!(unseal(&name, &salt, &nonce, &ciphertext, "wrong").is_err());
        assert!(!ciphertext.windows(5).any(|w| w == b"admin"));
    }
}
