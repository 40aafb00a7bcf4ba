//! The commit log: one append-only file that every journal's new records go
//! through, so that one group commit costs one `write(2)` and one `fdatasync`
//! however many journals it covers (a sync per journal file costs a fixed
//! ~0.3 ms each on a typical disk, and the shards of a product each have one).
//!
//! Protocol (the commit thread, [`super::commit`]): for each journal written to
//! since the last cycle, its pending frames are *staged* here (copied into the
//! log's buffer as one chunk) and written to the journal's own segment file,
//! which is not synced; then the log writes its buffer and syncs once. A record
//! is durable once the log's sync covering its chunk returned: the journal file
//! may lose it in a crash, the log may not. At open ([`redo`]), every chunk is
//! written again into its journal from the first record the journal lacks, the
//! journals are synced and the log is emptied.
//!
//! The log does not grow without bound: past [`SEGMENT_BYTES`] the next write
//! starts a new segment file, and a *checkpoint* thread syncs every journal
//! file the older segments covered, then deletes those segments. Nothing on the
//! order path waits for a checkpoint. A clean close checkpoints everything.
//!
//! Layout: `journal/log/{generation:020}.log`, each a run of chunks
//!
//! ```text
//! name length u16 LE (>= 1) | first u64 LE | last u64 LE | body length u32 LE |
//! CRC32 of everything before it and of name and body (u32 LE) | name | body
//! ```
//!
//! where `name` is the journal's directory under `journal/` (`stock/p/0`) and
//! `body` its frames `first..=last`, exactly as its segment files hold them.
//! Segments are preallocated; zeros after the last chunk are the clean end.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::journal::{self, JournalFile};
use super::StorageError;

/// A segment past this size is the last one written: the next write starts a
/// new one and a checkpoint retires the older.
pub const SEGMENT_BYTES: u64 = 64 << 20;
const HEADER: usize = 2 + 8 + 8 + 4 + 4;
/// Space allocated ahead of the writes of a segment.
const PREALLOCATE_BYTES: u64 = 8 << 20;
/// Most bytes staged and not yet written: past it (the log's writes keep failing)
/// staging is refused, so what journals append stays pending in them, where
/// their own bound refuses new appends.
const MAX_BUFFER_BYTES: usize = 256 << 20;
/// A buffer that grew past this (a key import) is not kept once written.
const KEEP_BUFFER_CAPACITY: usize = 4 << 20;

fn io_err(what: impl std::fmt::Display, e: std::io::Error) -> StorageError {
    StorageError::Io(format!("{what}: {e}"))
}

fn segment_name(generation: u64) -> String {
    format!("{generation:020}.log")
}

/// The segments in `dir`, oldest first.
fn segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, StorageError> {
    let mut found: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .map_err(|e| io_err(dir.display(), e))?
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let generation = entry.file_name().to_str()?.strip_suffix(".log")?.parse().ok()?;
            Some((generation, entry.path()))
        })
        .collect();
    found.sort_unstable();
    Ok(found)
}

fn crc(header: &[u8], name: &[u8], body: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(header);
    h.update(name);
    h.update(body);
    h.finalize()
}

/// One chunk read back.
pub(crate) struct Chunk {
    pub name: String,
    pub first: u64,
    pub last: u64,
    pub body: Vec<u8>,
}

/// Reads the chunks of one segment; `Ok(None)` at its clean end, `Err` at a
/// chunk that does not parse or check (a torn write).
struct Reader {
    file: std::io::BufReader<File>,
}

impl Reader {
    fn next(&mut self) -> Result<Option<Chunk>, String> {
        let mut header = [0u8; HEADER];
        let got = journal::read_full(&mut self.file, &mut header).map_err(|e| e.to_string())?;
        if header[..got].iter().all(|&b| b == 0) {
            return Ok(None);
        }
        if got < HEADER {
            return Err(format!("a chunk header cut short ({got} bytes)"));
        }
        let name_len = u16::from_le_bytes(header[0..2].try_into().expect("2 bytes")) as usize;
        let first = u64::from_le_bytes(header[2..10].try_into().expect("8 bytes"));
        let last = u64::from_le_bytes(header[10..18].try_into().expect("8 bytes"));
        let body_len = u32::from_le_bytes(header[18..22].try_into().expect("4 bytes")) as usize;
        let sum = u32::from_le_bytes(header[22..26].try_into().expect("4 bytes"));
        if name_len == 0 || first == 0 || last < first || body_len > journal::MAX_PENDING_BYTES * 2 {
            return Err("a chunk header that makes no sense".into());
        }
        let mut rest = vec![0u8; name_len + body_len];
        let got = journal::read_full(&mut self.file, &mut rest).map_err(|e| e.to_string())?;
        if got < rest.len() {
            return Err(format!("a chunk cut short ({got} of {} bytes)", rest.len()));
        }
        if crc(&header[..22], &rest[..name_len], &rest[name_len..]) != sum {
            return Err("a chunk that fails its checksum".into());
        }
        let body = rest.split_off(name_len);
        let name = String::from_utf8(rest).map_err(|_| "a chunk whose journal name is not UTF-8".to_string())?;
        Ok(Some(Chunk { name, first, last, body }))
    }
}

/// Hands every chunk in the log directory `dir` to `each`, oldest first, up to
/// the first torn one (only the newest segment can end torn: a segment is synced
/// whole before the next one is started), one at a time: memory holds one chunk
/// (bounded by what one journal stages per cycle) whatever the log's size.
/// Returns the segments read.
pub(crate) fn for_each_chunk(
    dir: &Path,
    mut each: impl FnMut(Chunk) -> Result<(), StorageError>,
) -> Result<Vec<PathBuf>, StorageError> {
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let found = segments(dir)?;
    let last_index = found.len().saturating_sub(1);
    for (i, (_, path)) in found.iter().enumerate() {
        let file = File::open(path).map_err(|e| io_err(path.display(), e))?;
        let mut reader = Reader { file: std::io::BufReader::with_capacity(1 << 20, file) };
        loop {
            match reader.next() {
                Ok(Some(chunk)) => each(chunk)?,
                Ok(None) => break,
                Err(error) => {
                    if i != last_index {
                        return Err(StorageError::Corrupt { place: path.display().to_string(), error });
                    }
                    tracing::info!(segment = %path.display(), %error, "commit log ends with a torn chunk (never acknowledged)");
                    break;
                }
            }
        }
    }
    Ok(found.into_iter().map(|(_, p)| p).collect())
}

/// A journal the log covers, by address (the same file is staged every cycle).
type Touched = HashMap<usize, Arc<JournalFile>>;

struct Checkpoint {
    thread: std::thread::JoinHandle<Result<(), StorageError>>,
    touched: Touched,
    retired: Vec<PathBuf>,
}

pub struct CommitLog {
    /// `journal/log` in the data directory.
    dir: PathBuf,
    /// `journal/`: journal names are their directories under it.
    base: PathBuf,
    /// The generation of the segment written now (or of the last one, if none is open).
    generation: u64,
    file: Option<File>,
    len: u64,
    allocated: u64,
    /// Chunks staged since the last write.
    buf: Vec<u8>,
    /// Journals with records in the segments not yet checkpointed.
    touched: Touched,
    /// Segments written before the current one, not yet checkpointed.
    retired: Vec<PathBuf>,
    checkpoint: Option<Checkpoint>,
    /// Why a sync failed, if one did: final, as for a journal file.
    failed: Option<String>,
}

impl CommitLog {
    /// Opens the log in `base/log` (which [`redo`] left empty), creating the directory.
    pub(crate) fn open(base: &Path) -> Result<CommitLog, StorageError> {
        let dir = base.join("log");
        if !dir.exists() {
            std::fs::create_dir_all(&dir).map_err(|e| io_err(dir.display(), e))?;
            for made in [Some(base), base.parent()].into_iter().flatten() {
                journal::sync_dir(made)?;
            }
        }
        let found = segments(&dir)?;
        let generation = found.last().map_or(0, |(g, _)| *g);
        Ok(CommitLog {
            dir,
            base: base.to_path_buf(),
            generation,
            file: None,
            len: 0,
            allocated: 0,
            buf: Vec::new(),
            touched: HashMap::new(),
            retired: found.into_iter().map(|(_, p)| p).collect(),
            checkpoint: None,
            failed: None,
        })
    }

    /// Copies the frames of records `first..=last` of `journal` into the next write.
    pub(crate) fn stage(
        &mut self,
        journal: &Arc<JournalFile>,
        first: u64,
        last: u64,
        frames: &[u8],
    ) -> Result<(), StorageError> {
        let name = journal
            .dir()
            .strip_prefix(&self.base)
            .ok()
            .and_then(|p| p.to_str())
            .filter(|n| !n.is_empty() && n.len() <= u16::MAX as usize)
            .ok_or_else(|| {
                StorageError::Io(format!("journal {} is not under the log's directory", journal.dir().display()))
            })?;
        if self.buf.len() > MAX_BUFFER_BYTES {
            return Err(StorageError::Io(format!("commit log: {} bytes wait to be written", self.buf.len())));
        }
        let name = name.as_bytes();
        let mut header = [0u8; HEADER];
        header[0..2].copy_from_slice(&(name.len() as u16).to_le_bytes());
        header[2..10].copy_from_slice(&first.to_le_bytes());
        header[10..18].copy_from_slice(&last.to_le_bytes());
        header[18..22].copy_from_slice(&(frames.len() as u32).to_le_bytes());
        let sum = crc(&header[..22], name, frames);
        header[22..26].copy_from_slice(&sum.to_le_bytes());
        self.buf.extend_from_slice(&header);
        self.buf.extend_from_slice(name);
        self.buf.extend_from_slice(frames);
        self.touched.entry(Arc::as_ptr(journal) as usize).or_insert_with(|| journal.clone());
        Ok(())
    }

    /// Writes what is staged and syncs it: every chunk staged before the call is
    /// durable when it returns `Ok`. A failed write keeps what is staged (written
    /// again next time); a failed sync is final for this log.
    pub(crate) fn sync(&mut self) -> Result<(), StorageError> {
        if let Some(e) = &self.failed {
            return Err(StorageError::Io(e.clone()));
        }
        self.finish_checkpoint(false);
        if self.buf.is_empty() {
            return Ok(());
        }
        if self.file.is_none() {
            self.start_segment()?;
        }
        let file = self.file.as_ref().expect("a segment");
        let path = self.dir.join(segment_name(self.generation));
        let io = |e| io_err(path.display(), e);
        let end = self.len + self.buf.len() as u64;
        if end > self.allocated {
            let want = (end - self.allocated).max(PREALLOCATE_BYTES);
            journal::allocate(file, self.allocated, want).map_err(io)?;
            self.allocated += want;
        }
        journal::write_at(file, &self.buf, self.len).map_err(io)?;
        if let Err(e) = file.sync_data() {
            let e = io(e);
            self.failed = Some(e.to_string());
            return Err(e);
        }
        self.len = end;
        if self.buf.capacity() > KEEP_BUFFER_CAPACITY {
            self.buf = Vec::new();
        } else {
            self.buf.clear();
        }
        if self.len >= SEGMENT_BYTES {
            self.retire_segment();
        }
        Ok(())
    }

    fn start_segment(&mut self) -> Result<(), StorageError> {
        self.generation += 1;
        let path = self.dir.join(segment_name(self.generation));
        let file = journal::create_file(&path)?;
        journal::sync_dir(&self.dir)?;
        (self.file, self.len, self.allocated) = (Some(file), 0, 0);
        Ok(())
    }

    /// Closes the current segment (the next write starts a new one) and, unless
    /// one is still running, starts a checkpoint of every segment closed so far.
    fn retire_segment(&mut self) {
        if self.file.take().is_some() {
            self.retired.push(self.dir.join(segment_name(self.generation)));
        }
        if self.checkpoint.is_some() {
            return;
        }
        let touched = std::mem::take(&mut self.touched);
        let retired = std::mem::take(&mut self.retired);
        let (journals, doomed): (Vec<_>, Vec<_>) = (touched.values().cloned().collect(), retired.clone());
        let dir = self.dir.clone();
        let spawned = std::thread::Builder::new()
            .name("kami-checkpoint".into())
            .spawn(move || checkpoint(&journals, &doomed, &dir));
        match spawned {
            Ok(thread) => self.checkpoint = Some(Checkpoint { thread, touched, retired }),
            Err(e) => {
                tracing::warn!(error = %e, "no checkpoint thread: the commit log keeps its segments for now");
                self.touched.extend(touched);
                self.retired.extend(retired);
            }
        }
    }

    /// Collects a finished checkpoint (waiting for it if `wait`): one that failed
    /// gives its journals and segments back for the next one.
    fn finish_checkpoint(&mut self, wait: bool) {
        if !wait && !self.checkpoint.as_ref().is_some_and(|c| c.thread.is_finished()) {
            return;
        }
        let Some(c) = self.checkpoint.take() else { return };
        let result = c.thread.join().unwrap_or_else(|_| Err(StorageError::Io("checkpoint thread panicked".into())));
        if let Err(e) = result {
            tracing::warn!(error = %e, "checkpoint failed: its commit log segments are kept and retried");
            for (k, j) in c.touched {
                self.touched.entry(k).or_insert(j);
            }
            self.retired.splice(0..0, c.retired);
        }
    }

    /// Makes every journal the log covers durable in its own files and deletes
    /// every segment (a clean close: the next open has nothing to redo).
    pub(crate) fn close(&mut self) -> Result<(), StorageError> {
        self.sync()?;
        self.finish_checkpoint(true);
        if self.file.take().is_some() {
            self.retired.push(self.dir.join(segment_name(self.generation)));
        }
        let journals: Vec<_> = self.touched.values().cloned().collect();
        checkpoint(&journals, &self.retired, &self.dir)?;
        self.touched.clear();
        self.retired.clear();
        Ok(())
    }

    /// Segments on disk now (tests).
    #[cfg(test)]
    fn segment_count(&self) -> usize {
        segments(&self.dir).map(|s| s.len()).unwrap_or(0)
    }
}

/// Syncs every file of `journals`, then deletes the segments `doomed`.
fn checkpoint(journals: &[Arc<JournalFile>], doomed: &[PathBuf], dir: &Path) -> Result<(), StorageError> {
    for j in journals {
        j.sync_files()?;
    }
    for path in doomed {
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(path.display(), e)),
        }
    }
    if !doomed.is_empty() {
        journal::sync_dir(dir)?;
    }
    Ok(())
}

/// Recovery of the log at open: writes every chunk's records that its journal
/// lacks (from its first missing record on; a chunk that would leave a gap ends
/// that journal's redo, as a torn tail would), syncs those journals and deletes
/// the segments. `open` opens the journal named by a chunk. Returns the records
/// written again.
pub(crate) fn redo(
    base: &Path,
    open: impl Fn(&Path) -> Result<Arc<JournalFile>, StorageError>,
) -> Result<u64, StorageError> {
    let dir = base.join("log");
    let mut journals: HashMap<String, Option<Arc<JournalFile>>> = HashMap::new();
    let mut written = 0;
    let found = for_each_chunk(&dir, |chunk| {
        if chunk.name.split('/').any(|part| part.is_empty() || part == "." || part == "..") {
            return Err(StorageError::Corrupt {
                place: dir.display().to_string(),
                error: format!("a chunk for journal {:?}", chunk.name),
            });
        }
        let entry = match journals.get(&chunk.name) {
            Some(entry) => entry.clone(),
            None => {
                let j = open(&base.join(&chunk.name))?;
                journals.insert(chunk.name.clone(), Some(j.clone()));
                Some(j)
            }
        };
        let Some(j) = entry else { return Ok(()) };
        let have = j.last_seq()?;
        if chunk.last <= have {
            return Ok(());
        }
        if chunk.first > have + 1 {
            tracing::warn!(
                journal = chunk.name,
                have,
                next = chunk.first,
                "commit log chunk after a gap in its journal: not redone"
            );
            journals.insert(chunk.name.clone(), None);
            return Ok(());
        }
        let offset =
            journal::frames_offset(&chunk.body, chunk.first, have + 1).ok_or_else(|| StorageError::Corrupt {
                place: dir.display().to_string(),
                error: format!("a chunk for {} whose frames do not parse", chunk.name),
            })?;
        j.write_raw(have + 1, chunk.last, &chunk.body[offset..])?;
        written += chunk.last - have;
        Ok(())
    })?;
    if found.is_empty() {
        return Ok(0);
    }
    for j in journals.values().flatten() {
        j.sync()?;
    }
    checkpoint(&[], &found, &dir)?;
    if written > 0 {
        tracing::info!(records = written, "journal records redone from the commit log");
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::codec::{self, Kind};
    use crate::storage::commit::TicketQueue;
    use crate::storage::journal::{DirtyJournals, Journal};
    use std::fs::OpenOptions;

    fn open_journal(path: &Path) -> Arc<JournalFile> {
        Arc::new(JournalFile::open(path.to_path_buf(), Arc::new(DirtyJournals::default())).unwrap())
    }

    fn values(file: &JournalFile) -> Vec<u64> {
        let mut out = Vec::new();
        file.read_after(0, |f| {
            out.push(codec::decode::<u64>(Kind::Event, &f.record).unwrap());
            Ok(true)
        })
        .unwrap();
        out
    }

    /// The commit thread's cycle for the journals given.
    fn commit(log: &mut CommitLog, files: &[&Arc<JournalFile>]) {
        for f in files {
            f.sync_into(log).unwrap();
        }
        log.sync().unwrap();
    }

    /// What a crash can leave of a journal file that was written and not synced:
    /// the file as it was before (here: everything after the first `keep` bytes lost).
    fn lose_tail(dir: &Path, keep: u64) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let f = OpenOptions::new().write(true).open(&path).unwrap();
            f.set_len(keep).unwrap();
        }
    }

    #[test]
    fn one_sync_covers_every_journal_and_redo_restores_what_their_files_lost() {
        let root = tempfile::tempdir().unwrap();
        let base = root.path().join("journal");
        let (a_dir, b_dir) = (base.join("stock/p/0"), base.join("stock/p/1"));
        let mut log = CommitLog::open(&base).unwrap();
        {
            let (a, b) = (open_journal(&a_dir), open_journal(&b_dir));
            let (ja, jb): (Journal<u64>, Journal<u64>) = (
                Journal::new(a.clone(), TicketQueue::none(), Arc::new(())),
                Journal::new(b.clone(), TicketQueue::none(), Arc::new(())),
            );
            ja.append_all(1, &[1, 2]).unwrap();
            jb.append(1, &10).unwrap();
            commit(&mut log, &[&a, &b]);
            assert_eq!(log.segment_count(), 1);
            ja.append(3, &3).unwrap();
            commit(&mut log, &[&a]);
            assert_eq!(values(&a), [1, 2, 3]);
            // A crash: the journal files keep only what reached their disk (here,
            // nothing of `a` after its first frame, nothing of `b`).
            std::mem::forget(log);
        }
        let frame = (8 + codec::encode(Kind::Event, &1u64).len()) as u64;
        lose_tail(&a_dir, frame);
        lose_tail(&b_dir, 0);
        assert_eq!(values(&open_journal(&a_dir)), [1]);
        let redone = redo(&base, |p| Ok(open_journal(p))).unwrap();
        assert_eq!(redone, 3, "records 2 and 3 of a, 1 of b");
        assert_eq!(values(&open_journal(&a_dir)), [1, 2, 3]);
        assert_eq!(values(&open_journal(&b_dir)), [10]);
        assert_eq!(segments(&base.join("log")).unwrap().len(), 0, "the log is emptied once redone");
        assert_eq!(redo(&base, |p| Ok(open_journal(p))).unwrap(), 0, "nothing left to redo");
    }

    #[test]
    fn a_torn_chunk_ends_the_log_and_a_gap_ends_a_journals_redo() {
        let root = tempfile::tempdir().unwrap();
        let base = root.path().join("journal");
        let a_dir = base.join("stock/p/0");
        let mut log = CommitLog::open(&base).unwrap();
        let a = open_journal(&a_dir);
        let ja: Journal<u64> = Journal::new(a.clone(), TicketQueue::none(), Arc::new(()));
        ja.append(1, &1).unwrap();
        commit(&mut log, &[&a]);
        ja.append(2, &2).unwrap();
        commit(&mut log, &[&a]);
        ja.append(3, &3).unwrap();
        commit(&mut log, &[&a]);
        std::mem::forget(log);
        drop((ja, a));
        // Tear the last chunk: flip a byte of its body.
        let (_, seg) = segments(&base.join("log")).unwrap().pop().unwrap();
        let mut bytes = std::fs::read(&seg).unwrap();
        let end = bytes.iter().rposition(|&b| b != 0).unwrap();
        bytes[end] ^= 0xff;
        std::fs::write(&seg, &bytes).unwrap();
        let mut lasts = Vec::new();
        for_each_chunk(&base.join("log"), |c| {
            lasts.push(c.last);
            Ok(())
        })
        .unwrap();
        assert_eq!(lasts, [1, 2], "the torn chunk is not read");
        // The journal lost everything: the chunks read are redone, record 3 is gone.
        lose_tail(&a_dir, 0);
        assert_eq!(redo(&base, |p| Ok(open_journal(p))).unwrap(), 2);
        assert_eq!(values(&open_journal(&a_dir)), [1, 2]);
    }

    #[test]
    fn a_chunk_after_a_gap_in_its_journal_is_not_redone() {
        let root = tempfile::tempdir().unwrap();
        let base = root.path().join("journal");
        let (a_dir, b_dir) = (base.join("stock/p/0"), base.join("stock/p/1"));
        let mut log = CommitLog::open(&base).unwrap();
        let (a, b) = (open_journal(&a_dir), open_journal(&b_dir));
        let frame = |seq: u64, v: u64| {
            let mut f = seq.to_le_bytes().to_vec();
            f.extend(codec::encode(Kind::Event, &v));
            f
        };
        // `a` has nothing, and the log holds its record 2 but not 1; `b` is whole.
        log.stage(&a, 2, 2, &frame(2, 2)).unwrap();
        log.stage(&b, 1, 2, &[frame(1, 10), frame(2, 20)].concat()).unwrap();
        log.stage(&a, 3, 3, &frame(3, 3)).unwrap();
        log.sync().unwrap();
        std::mem::forget(log);
        drop((a, b));
        assert_eq!(redo(&base, |p| Ok(open_journal(p))).unwrap(), 2, "b's two records only");
        assert_eq!(values(&open_journal(&a_dir)), Vec::<u64>::new());
        assert_eq!(values(&open_journal(&b_dir)), [10, 20]);
    }

    #[test]
    fn a_full_segment_is_retired_by_a_checkpoint_that_syncs_the_journals() {
        let root = tempfile::tempdir().unwrap();
        let base = root.path().join("journal");
        let a_dir = base.join("stock/p/0");
        let mut log = CommitLog::open(&base).unwrap();
        let a = open_journal(&a_dir);
        let ja: Journal<Vec<u8>> = Journal::new(a.clone(), TicketQueue::none(), Arc::new(()));
        let big = vec![7u8; 1 << 20];
        let mut seq = 0;
        while log.file.is_some() || log.generation == 0 {
            seq += 1;
            ja.append(seq, &big).unwrap();
            commit(&mut log, &[&a]);
        }
        log.finish_checkpoint(true);
        assert_eq!(log.segment_count(), 0, "the full segment is deleted; the next write starts one");
        ja.append(seq + 1, &big).unwrap();
        commit(&mut log, &[&a]);
        assert_eq!(log.segment_count(), 1);
        log.close().unwrap();
        assert_eq!(log.segment_count(), 0, "a clean close leaves nothing to redo");
        assert_eq!(a.last_seq().unwrap(), seq + 1);
    }
}
