//! Journals as append-only segment files, made for appends: per record, one encode
//! into the journal's pending buffer on the writer's thread; per group commit, one
//! `write(2)` of that buffer and one `fdatasync` per journal that changed (both
//! done by the commit thread, so the writer never waits on the file system).
//!
//! Layout: one directory per journal (`journal/stock/{product}/{shard}`,
//! `journal/points/{shard}` under the data directory), holding segments named
//! after their first sequence (`00000000000000000001.log`). A segment is a run
//! of frames, each `seq (u64 LE) | record` where the record is the codec's
//! envelope (magic, version, kind, length, CRC32, payload). Sequences are
//! consecutive across segments. Segments are preallocated in
//! [`PREALLOCATE_BYTES`] steps (an overwrite of allocated space syncs faster than
//! an append that grows the file); the zeros after the last frame are the clean
//! end of a segment (no record has sequence 0).
//!
//! A new segment starts at every snapshot ([`Journal::roll`]), so trimming what a
//! snapshot covers deletes whole files. What does not parse, fails its checksum
//! or breaks the sequence ends the journal there (a torn tail: never
//! acknowledged, since replies wait for the sync of whole frames).

use std::fs::{File, OpenOptions};
use std::io::Read;
#[cfg(not(unix))]
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::codec::{self, Kind};
use super::commit::{Ticket, TicketQueue};
use super::StorageError;

/// Space allocated ahead of the writes of a segment.
pub const PREALLOCATE_BYTES: u64 = 8 << 20;
/// A frame's fixed part: the sequence and the record's envelope header.
pub(crate) const FRAME_HEADER: usize = 8 + codec::HEADER_BYTES;
/// Largest record accepted on read (a key import of 16 MiB, with room).
const MAX_RECORD_BYTES: usize = 64 << 20;
/// Most bytes appended and not yet written: past it (writes keep failing, or the
/// commit thread is far behind) appends are refused until a write succeeds.
pub(crate) const MAX_PENDING_BYTES: usize = 128 << 20;
/// A pending buffer that grew past this (a key import) is not kept once written.
const KEEP_PENDING_CAPACITY: usize = 1 << 20;

fn io_err(what: impl std::fmt::Display, e: std::io::Error) -> StorageError {
    StorageError::Io(format!("{what}: {e}"))
}

/// The journals with writes not yet synced, for the commit thread.
#[derive(Default)]
pub struct DirtyJournals(Mutex<Vec<Arc<JournalFile>>>);

impl DirtyJournals {
    /// Takes the journals to sync now.
    pub fn take(&self) -> Vec<Arc<JournalFile>> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn push(&self, j: Arc<JournalFile>) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(j);
    }
}

struct Segment {
    first: u64,
    /// Last sequence in it (`first - 1` while empty).
    last: u64,
    path: PathBuf,
    file: Arc<File>,
    /// End of its last frame.
    len: u64,
    /// Bytes allocated (the file's size).
    allocated: u64,
}

struct State {
    segments: Vec<Segment>,
    /// Files (rolled-over segments) whose writes are not synced yet.
    unsynced: Vec<Arc<File>>,
    /// A segment was created or removed since the directory was last synced.
    dir_unsynced: bool,
    /// Whether what follows the last frame of the last segment may not be zeros
    /// (cut off at the first append after opening).
    tail_unknown: bool,
    /// Whether the last segment's `last` and `len` are known (read when first
    /// needed: recovery reads the whole journal anyway and sets them on the way).
    end_known: bool,
    /// Frames appended and not yet written to the last segment: records
    /// `pending_first..=pending_last` (none while empty). Written by the next
    /// sync, or before anything reads or reshapes the files.
    pending: Vec<u8>,
    pending_first: u64,
    pending_last: u64,
    /// The last segment holds frames written there other than through the commit
    /// log (by a read, a roll or a trim that wrote what was pending): its own
    /// sync must make them durable.
    uncovered: bool,
}

impl State {
    /// The sequence the next append must carry (`None`: any, nothing written yet).
    fn next_seq(&self) -> Option<u64> {
        if !self.pending.is_empty() {
            return Some(self.pending_last + 1);
        }
        self.segments.last().map(|s| s.last + 1)
    }
}

/// One journal directory, shared by every handle on it.
pub struct JournalFile {
    dir: PathBuf,
    state: Mutex<State>,
    dirty: AtomicBool,
    dirty_list: Arc<DirtyJournals>,
    /// Why an `fdatasync` failed, if one did (see [`JournalFile::sync`]).
    sync_failed: Mutex<Option<String>>,
    /// The last record known durable: what was on disk when the end was first
    /// learnt (before any append), then raised by every sync that succeeded (for the
    /// commit log's syncs, only once the log's own sync returned). A backup's cut.
    durable: AtomicU64,
}

/// One frame read back: where it is, its sequence and its record.
pub(crate) struct Frame {
    pub seq: u64,
    pub record: Vec<u8>,
}

/// How reading a journal ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum End {
    /// After the last frame.
    Clean,
    /// At something that is not the next frame: where (the sequence it should
    /// have had) and why.
    Torn { seq: u64, error: String },
}

fn segment_name(first: u64) -> String {
    format!("{first:020}.log")
}

pub(crate) fn sync_dir(dir: &Path) -> Result<(), StorageError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io_err(dir.display(), e))
}

/// Creates (or empties) the file at `path` for reading and writing.
pub(crate) fn create_file(path: &Path) -> Result<File, StorageError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|e| io_err(path.display(), e))
}

/// Reads the frames of one segment file from its start.
struct SegmentReader {
    file: std::io::BufReader<File>,
    expected: u64,
    pos: u64,
}

impl SegmentReader {
    fn open(path: &Path, first: u64) -> Result<SegmentReader, StorageError> {
        let file = File::open(path).map_err(|e| io_err(path.display(), e))?;
        Ok(SegmentReader { file: std::io::BufReader::with_capacity(1 << 20, file), expected: first, pos: 0 })
    }

    /// The next frame, `Ok(None)` at the clean end, `Err` at a torn one.
    fn next(&mut self) -> Result<Option<Frame>, String> {
        let mut header = [0u8; FRAME_HEADER];
        let got = read_full(&mut self.file, &mut header).map_err(|e| e.to_string())?;
        if header[..got].iter().all(|&b| b == 0) {
            return Ok(None);
        }
        if got < FRAME_HEADER {
            return Err(format!("a frame cut short ({got} bytes)"));
        }
        let seq = u64::from_le_bytes(header[..8].try_into().expect("8 bytes"));
        let declared = u32::from_le_bytes(header[14..18].try_into().expect("4 bytes")) as usize;
        if declared > MAX_RECORD_BYTES {
            return Err(format!("a record of {declared} bytes"));
        }
        let mut record = Vec::with_capacity(codec::HEADER_BYTES + declared);
        record.extend_from_slice(&header[8..]);
        record.resize(codec::HEADER_BYTES + declared, 0);
        let got = read_full(&mut self.file, &mut record[codec::HEADER_BYTES..]).map_err(|e| e.to_string())?;
        if got < declared {
            return Err(format!("a record cut short ({got} of {declared} bytes)"));
        }
        if seq != self.expected {
            return Err(format!("expected record {} next, found {seq}", self.expected));
        }
        codec::check(&record).map_err(|e| e.to_string())?;
        self.expected += 1;
        self.pos += (FRAME_HEADER + declared) as u64;
        Ok(Some(Frame { seq, record }))
    }
}

pub(crate) fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

impl JournalFile {
    /// Opens (creating) the journal in `dir`. Reads its last segment to find where
    /// appends go on; changes nothing on disk but a missing directory.
    pub(crate) fn open(dir: PathBuf, dirty_list: Arc<DirtyJournals>) -> Result<JournalFile, StorageError> {
        if !dir.exists() {
            // The directories made here, and the one that held the first of them,
            // are synced: they must survive a crash with what is written in them.
            let existing = dir.ancestors().find(|a| a.exists()).map(Path::to_path_buf);
            std::fs::create_dir_all(&dir).map_err(|e| io_err(dir.display(), e))?;
            for made in dir.ancestors().take_while(|a| Some(*a) != existing.as_deref()) {
                sync_dir(made)?;
            }
            if let Some(existing) = existing {
                sync_dir(&existing)?;
            }
        }
        let mut firsts: Vec<u64> = std::fs::read_dir(&dir)
            .map_err(|e| io_err(dir.display(), e))?
            .filter_map(|entry| {
                let name = entry.ok()?.file_name();
                name.to_str()?.strip_suffix(".log")?.parse().ok()
            })
            .collect();
        firsts.sort_unstable();
        let mut segments = Vec::with_capacity(firsts.len());
        for (i, &first) in firsts.iter().enumerate() {
            let path = dir.join(segment_name(first));
            let file = OpenOptions::new().read(true).write(true).open(&path).map_err(|e| io_err(path.display(), e))?;
            let allocated = file.metadata().map_err(|e| io_err(path.display(), e))?.len();
            let (last, len) = match firsts.get(i + 1) {
                // Older segments end where the next begins (checked when read).
                Some(&next) => (next - 1, allocated),
                // The last one's end is found when first needed (`with_end`).
                None => (first - 1, 0),
            };
            segments.push(Segment { first, last, path, file: Arc::new(file), len, allocated });
        }
        Ok(JournalFile {
            dir,
            state: Mutex::new(State {
                segments,
                unsynced: Vec::new(),
                dir_unsynced: false,
                tail_unknown: true,
                end_known: firsts.is_empty(),
                pending: Vec::new(),
                pending_first: 0,
                pending_last: 0,
                uncovered: false,
            }),
            dirty: AtomicBool::new(false),
            dirty_list,
            sync_failed: Mutex::new(None),
            durable: AtomicU64::new(0),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The state, with the end of the last segment known (read up to its first
    /// frame that does not parse, if nothing read it yet).
    fn with_end(&self) -> Result<MutexGuard<'_, State>, StorageError> {
        let mut st = self.state();
        if !st.end_known {
            let seg = st.segments.last_mut().expect("an unknown end has a segment");
            let mut reader = SegmentReader::open(&seg.path, seg.first)?;
            while let Ok(Some(_)) = reader.next() {}
            (seg.last, seg.len) = (reader.expected - 1, reader.pos);
            // Nothing was appended before the end was known: what is on disk is
            // all there is, and the log was redone into it at open.
            self.durable.fetch_max(seg.last, Ordering::SeqCst);
            st.end_known = true;
        }
        Ok(st)
    }

    /// Records the end of the last segment (starting at `first`) found by a reader.
    fn learn_end(&self, first: u64, reader: &SegmentReader) {
        let mut st = self.state();
        if st.end_known {
            return;
        }
        if let Some(seg) = st.segments.last_mut().filter(|s| s.first == first) {
            (seg.last, seg.len) = (reader.expected - 1, reader.pos);
            self.durable.fetch_max(seg.last, Ordering::SeqCst);
            st.end_known = true;
        }
    }

    /// Makes every append made before this call durable (the commit thread): writes
    /// what is pending, then syncs. If the write fails, what is pending stays
    /// pending (nothing after it can become durable before it) and is written again
    /// at the next sync.
    ///
    /// A failed `fdatasync` is final for this handle on the files: what it should
    /// have made durable may be lost while a later one succeeds, so every later
    /// sync fails too (until the journal is opened again, from what is on disk).
    pub fn sync(&self) -> Result<(), StorageError> {
        self.check_sync_failed()?;
        self.dirty.store(false, Ordering::SeqCst);
        let (files, dir, last) = {
            let mut st = self.state();
            self.write_pending(&mut st)?;
            let mut files = std::mem::take(&mut st.unsynced);
            files.extend(st.segments.last().map(|s| s.file.clone()));
            st.uncovered = false;
            let last = st.next_seq().map_or(0, |next| next - 1);
            (files, std::mem::take(&mut st.dir_unsynced), last)
        };
        self.sync_collected(files, dir)?;
        self.mark_durable(last);
        Ok(())
    }

    /// The commit thread's sync, through the shared log: what is pending is staged
    /// in `log` (durable once the log's next sync returns) and written to the
    /// segment file without a sync of its own; what reached the files some other
    /// way since the last sync (a roll, a trim, a read that wrote what was
    /// pending) and new or removed segments are synced here directly.
    ///
    /// Returns the last record it covers: durable once the log's sync returned
    /// (then [`JournalFile::mark_durable`]).
    pub(crate) fn sync_into(self: &Arc<Self>, log: &mut super::log::CommitLog) -> Result<u64, StorageError> {
        self.check_sync_failed()?;
        self.dirty.store(false, Ordering::SeqCst);
        let (files, dir, last) = {
            let mut st = self.state();
            if !st.pending.is_empty() {
                log.stage(self, st.pending_first, st.pending_last, &st.pending)?;
                let uncovered = st.uncovered;
                self.write_pending(&mut st)?;
                st.uncovered = uncovered;
            }
            let mut files = std::mem::take(&mut st.unsynced);
            if std::mem::take(&mut st.uncovered) {
                files.extend(st.segments.last().map(|s| s.file.clone()));
            }
            let last = st.next_seq().map_or(0, |next| next - 1);
            (files, std::mem::take(&mut st.dir_unsynced), last)
        };
        self.sync_collected(files, dir)?;
        Ok(last)
    }

    /// Records that every record through `last` is durable.
    pub(crate) fn mark_durable(&self, last: u64) {
        self.durable.fetch_max(last, Ordering::SeqCst);
    }

    /// The last record known durable (see the field). Only a cut taken with the
    /// commit log's lock held is one instant across journals.
    pub(crate) fn durable(&self) -> u64 {
        self.durable.load(Ordering::SeqCst)
    }

    fn check_sync_failed(&self) -> Result<(), StorageError> {
        match self.sync_failed.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            Some(e) => Err(StorageError::Io(e.clone())),
            None => Ok(()),
        }
    }

    /// Syncs `files` (a failure is final, see [`JournalFile::sync`]), then the
    /// directory if `dir`.
    fn sync_collected(&self, files: Vec<Arc<File>>, dir: bool) -> Result<(), StorageError> {
        for f in files {
            if let Err(e) = f.sync_data() {
                let e = io_err(self.dir.display(), e);
                *self.sync_failed.lock().unwrap_or_else(|e| e.into_inner()) = Some(e.to_string());
                return Err(e);
            }
        }
        if dir {
            sync_dir(&self.dir)?;
        }
        Ok(())
    }

    /// Syncs every segment file and the directory (a checkpoint of the commit
    /// log: afterwards the journal's files hold whatever the log gave them).
    pub(crate) fn sync_files(&self) -> Result<(), StorageError> {
        let files: Vec<Arc<File>> = self.state().segments.iter().map(|s| s.file.clone()).collect();
        for f in files {
            f.sync_data().map_err(|e| io_err(self.dir.display(), e))?;
        }
        sync_dir(&self.dir)
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether it was written to since its last sync.
    #[cfg(test)]
    pub(crate) fn is_dirty(&self) -> bool {
        self.dirty.load(Ordering::SeqCst)
    }

    /// Lists it for the next sync again (after a sync that failed).
    pub fn relist(self: &Arc<Self>) {
        self.dirty.store(false, Ordering::SeqCst);
        self.mark_dirty();
    }

    fn mark_dirty(self: &Arc<Self>) {
        if !self.dirty.swap(true, Ordering::SeqCst) {
            self.dirty_list.push(self.clone());
        }
    }

    /// Starts a new segment at `first` (the state's lock held).
    fn new_segment(&self, st: &mut State, first: u64) -> Result<(), StorageError> {
        let path = self.dir.join(segment_name(first));
        let file = create_file(&path)?;
        if let Some(prev) = st.segments.last() {
            st.unsynced.push(prev.file.clone());
        }
        st.segments.push(Segment { first, last: first - 1, path, file: Arc::new(file), len: 0, allocated: 0 });
        st.dir_unsynced = true;
        st.tail_unknown = false;
        Ok(())
    }

    /// Writes what is pending at the end of the last segment (the state's lock held).
    fn write_pending(&self, st: &mut State) -> Result<(), StorageError> {
        if st.pending.is_empty() {
            return Ok(());
        }
        let bytes = std::mem::take(&mut st.pending);
        let written = self.write_frames(st, &bytes, st.pending_first, st.pending_last);
        st.pending = bytes;
        written?;
        if st.pending.capacity() > KEEP_PENDING_CAPACITY {
            st.pending = Vec::new();
        } else {
            st.pending.clear();
        }
        Ok(())
    }

    /// Writes `bytes`, the frames of records `first..=last`, at the end of the last
    /// segment, which must end at `first - 1` (the state's lock held).
    fn write_frames(&self, st: &mut State, bytes: &[u8], first: u64, last: u64) -> Result<(), StorageError> {
        match st.segments.last() {
            None => self.new_segment(st, first)?,
            Some(s) if s.last + 1 != first => {
                return Err(StorageError::Corrupt {
                    place: format!("journal {}", self.dir.display()),
                    error: format!("record {first} appended after record {}", s.last),
                })
            }
            Some(_) => {}
        }
        let tail_unknown = st.tail_unknown;
        let seg = st.segments.last_mut().expect("a segment");
        let io = |e| io_err(seg.path.display(), e);
        if tail_unknown && seg.allocated > seg.len {
            // What follows the last frame read at open may be a torn write: cut it.
            seg.file.set_len(seg.len).map_err(io)?;
            seg.allocated = seg.len;
        }
        st.tail_unknown = false;
        let seg = st.segments.last_mut().expect("a segment");
        let io = |e| io_err(seg.path.display(), e);
        let end = seg.len + bytes.len() as u64;
        if end > seg.allocated {
            let want = (end - seg.allocated).max(PREALLOCATE_BYTES);
            allocate(&seg.file, seg.allocated, want).map_err(io)?;
            seg.allocated += want;
        }
        write_at(&seg.file, bytes, seg.len).map_err(io)?;
        seg.len = end;
        seg.last = last;
        st.uncovered = true;
        Ok(())
    }

    /// The state with nothing pending (written first).
    fn written(&self) -> Result<MutexGuard<'_, State>, StorageError> {
        let mut st = self.with_end()?;
        self.write_pending(&mut st)?;
        Ok(st)
    }

    /// Writes frames already made (`bytes`, records `first..=last`) at the end.
    pub(crate) fn write_raw(&self, first: u64, last: u64, bytes: &[u8]) -> Result<(), StorageError> {
        let mut st = self.written()?;
        self.write_frames(&mut st, bytes, first, last)
    }

    /// Where the data ends: the last sequence appended (0: none).
    pub(crate) fn last_seq(&self) -> Result<u64, StorageError> {
        let st = self.with_end()?;
        Ok(st.next_seq().map_or(0, |next| next - 1))
    }

    /// Reads every frame after sequence `after`, calling `visit` on each; returns
    /// how reading ended. Whole segments before `after` are skipped unread.
    /// `visit` returns whether to go on (`Ok(false)` stops reading: `End::Clean`).
    pub(crate) fn read_after(
        &self,
        after: u64,
        mut visit: impl FnMut(Frame) -> Result<bool, StorageError>,
    ) -> Result<End, StorageError> {
        let segs: Vec<(u64, PathBuf)> = {
            let mut st = self.state();
            self.write_pending(&mut st)?;
            st.segments.iter().map(|s| (s.first, s.path.clone())).collect()
        };
        let mut expected: Option<u64> = None;
        for (i, (first, path)) in segs.iter().enumerate() {
            if segs.get(i + 1).is_some_and(|(next, _)| *next <= after + 1) {
                continue;
            }
            if let Some(e) = expected {
                if *first != e {
                    return Ok(End::Torn { seq: e, error: format!("the next segment starts at record {first}") });
                }
            }
            let mut reader = SegmentReader::open(path, *first)?;
            loop {
                match reader.next() {
                    Ok(Some(frame)) if frame.seq <= after => {}
                    Ok(Some(frame)) => {
                        if !visit(frame)? {
                            return Ok(End::Clean);
                        }
                    }
                    Ok(None) => break,
                    Err(error) => {
                        self.learn_end(*first, &reader);
                        return Ok(End::Torn { seq: reader.expected, error });
                    }
                }
            }
            self.learn_end(*first, &reader);
            expected = Some(reader.expected);
        }
        Ok(End::Clean)
    }

    /// Reads the frames after `after` up to `upto`, which must be known durable
    /// (its records are then in the segment files, written by the commit thread):
    /// nothing pending is written, so a reader never costs the commit protocol a
    /// sync. `visit` returns whether to go on. Used by readers that follow a live
    /// journal (the webhook outbox); a torn frame before `upto` is an error.
    pub(crate) fn read_durable(
        &self,
        after: u64,
        upto: u64,
        mut visit: impl FnMut(Frame) -> Result<bool, StorageError>,
    ) -> Result<(), StorageError> {
        if upto <= after {
            return Ok(());
        }
        let segs: Vec<(u64, PathBuf)> = self.state().segments.iter().map(|s| (s.first, s.path.clone())).collect();
        for (i, (first, path)) in segs.iter().enumerate() {
            if segs.get(i + 1).is_some_and(|(next, _)| *next <= after + 1) {
                continue;
            }
            if *first > upto {
                break;
            }
            let mut reader = SegmentReader::open(path, *first)?;
            loop {
                match reader.next() {
                    Ok(Some(frame)) if frame.seq <= after => {}
                    Ok(Some(frame)) => {
                        let last = frame.seq >= upto;
                        if !visit(frame)? || last {
                            return Ok(());
                        }
                    }
                    Ok(None) => break,
                    Err(error) => {
                        return Err(StorageError::Corrupt {
                            place: format!("journal {} record {}", self.dir.display(), reader.expected),
                            error,
                        })
                    }
                }
            }
        }
        Ok(())
    }

    /// Records in segments wholly at or before `seq` (what a trim through `seq` removes).
    pub(crate) fn covered(&self, seq: u64) -> Result<u64, StorageError> {
        let st = self.with_end()?;
        Ok(st.segments.iter().filter(|s| s.last <= seq && s.last >= s.first).map(|s| s.last - s.first + 1).sum())
    }

    /// Starts a new segment unless the last one is empty (after a snapshot: what
    /// it covers can then be trimmed by deleting files).
    pub(crate) fn roll(&self) -> Result<(), StorageError> {
        let mut st = self.written()?;
        match st.segments.last() {
            Some(s) if s.last >= s.first => {
                let next = s.last + 1;
                self.new_segment(&mut st, next)
            }
            _ => Ok(()),
        }
    }

    /// Deletes the segments wholly at or before `seq` (rolling first if the last
    /// one is among them).
    pub(crate) fn trim_through(&self, seq: u64) -> Result<(), StorageError> {
        let doomed: Vec<PathBuf> = {
            let mut st = self.written()?;
            if st.segments.last().is_some_and(|s| s.last >= s.first && s.last <= seq) {
                let next = st.segments.last().expect("a segment").last + 1;
                self.new_segment(&mut st, next)?;
            }
            let keep = st.segments.iter().position(|s| s.last > seq || s.last < s.first).unwrap_or(st.segments.len());
            st.segments.drain(..keep).map(|s| s.path).collect()
        };
        if doomed.is_empty() {
            return Ok(());
        }
        for path in &doomed {
            std::fs::remove_file(path).map_err(|e| io_err(path.display(), e))?;
        }
        sync_dir(&self.dir)
    }

    /// Removes record `seq` and everything after it (and whatever does not parse
    /// before it, from the first bad frame on), syncing the result.
    pub(crate) fn truncate_from(&self, seq: u64) -> Result<(), StorageError> {
        let mut st = self.state();
        self.write_pending(&mut st)?;
        let mut cut: Option<(usize, u64, u64)> = None; // segment index, offset, last kept
        for (i, s) in st.segments.iter().enumerate() {
            if s.first >= seq {
                cut = Some((i, 0, s.first - 1));
                break;
            }
            let mut reader = SegmentReader::open(&s.path, s.first)?;
            loop {
                let (pos, kept) = (reader.pos, reader.expected - 1);
                match reader.next() {
                    Ok(Some(frame)) if frame.seq < seq => {}
                    Ok(Some(_)) | Err(_) => {
                        cut = Some((i, pos, kept));
                        break;
                    }
                    Ok(None) => break,
                }
            }
            if cut.is_some() {
                break;
            }
        }
        let Some((index, offset, kept)) = cut else { return Ok(()) };
        let doomed: Vec<Segment> = st.segments.drain(index + 1..).collect();
        for s in &doomed {
            std::fs::remove_file(&s.path).map_err(|e| io_err(s.path.display(), e))?;
        }
        let seg = &mut st.segments[index];
        let io = |e| io_err(seg.path.display(), e);
        seg.file.set_len(offset).map_err(io)?;
        seg.file.sync_all().map_err(io)?;
        seg.len = offset;
        seg.allocated = offset;
        seg.last = kept;
        st.tail_unknown = false;
        st.end_known = true;
        drop(st);
        sync_dir(&self.dir)
    }
}

impl Drop for JournalFile {
    /// Writes what is pending (not synced: nothing waits on it any more).
    fn drop(&mut self) {
        let st = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        let mut st = std::mem::replace(
            st,
            State {
                segments: Vec::new(),
                unsynced: Vec::new(),
                dir_unsynced: false,
                tail_unknown: false,
                end_known: true,
                pending: Vec::new(),
                pending_first: 0,
                pending_last: 0,
                uncovered: false,
            },
        );
        if let Err(e) = self.write_pending(&mut st) {
            tracing::warn!(journal = %self.dir.display(), error = %e, "journal closed with records not written");
        }
    }
}

/// One `pwrite` (a seek and a write elsewhere).
#[cfg(unix)]
pub(crate) fn write_at(file: &File, buf: &[u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::write_all_at(file, buf, offset)
}

#[cfg(not(unix))]
pub(crate) fn write_at(mut file: &File, buf: &[u8], offset: u64) -> std::io::Result<()> {
    file.seek(SeekFrom::Start(offset))?;
    file.write_all(buf)
}

#[cfg(unix)]
pub(crate) fn allocate(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: posix_fallocate on a file descriptor owned by `file`.
    let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), offset as libc::off_t, len as libc::off_t) };
    match rc {
        0 => Ok(()),
        // Filesystems without fallocate: the writes grow the file instead.
        libc::EOPNOTSUPP | libc::EINVAL => Ok(()),
        e => Err(std::io::Error::from_raw_os_error(e)),
    }
}

#[cfg(not(unix))]
pub(crate) fn allocate(_file: &File, _offset: u64, _len: u64) -> std::io::Result<()> {
    Ok(())
}

/// Where the frame of record `want` starts in `body`, the frames of records
/// `first..` (`None`: they do not parse that far).
pub(crate) fn frames_offset(body: &[u8], first: u64, want: u64) -> Option<usize> {
    let mut offset = 0usize;
    let mut seq = first;
    while seq < want {
        let header = body.get(offset..offset + FRAME_HEADER)?;
        if u64::from_le_bytes(header[..8].try_into().ok()?) != seq {
            return None;
        }
        let declared = u32::from_le_bytes(header[14..18].try_into().ok()?) as usize;
        offset = offset.checked_add(FRAME_HEADER + declared)?;
        seq += 1;
    }
    (offset < body.len()).then_some(offset)
}

/// Appends the frame of record `seq` (`seq | envelope`) to `buf`: the one framing
/// of journal records, in segment files and in replicated journals' messages.
pub(crate) fn push_frame<E: serde::Serialize>(buf: &mut Vec<u8>, seq: u64, event: &E) {
    buf.extend_from_slice(&seq.to_le_bytes());
    codec::encode_into(Kind::Event, event, buf);
}

/// An append-only log of events `E` (a stock shard's by default, or a points
/// ledger), numbered from 1 without gaps.
pub struct Journal<E = crate::domain::Event> {
    file: Arc<JournalFile>,
    /// The group commit that makes its appends durable.
    tickets: TicketQueue,
    /// See [`super::Storage::open_handles`].
    _handle: Arc<()>,
    _events: std::marker::PhantomData<fn(&E)>,
}

impl<E> Clone for Journal<E> {
    fn clone(&self) -> Self {
        Journal {
            file: self.file.clone(),
            tickets: self.tickets.clone(),
            _handle: self._handle.clone(),
            _events: std::marker::PhantomData,
        }
    }
}

impl<E: serde::Serialize> Journal<E> {
    pub(crate) fn new(file: Arc<JournalFile>, tickets: TicketQueue, handle: Arc<()>) -> Journal<E> {
        Journal { file, tickets, _handle: handle, _events: std::marker::PhantomData }
    }

    pub(crate) fn file(&self) -> &Arc<JournalFile> {
        &self.file
    }

    /// Appends the record for `seq` (the next one). Returns the record's size.
    /// Durable once a ticket taken after this call completes.
    pub fn append(&self, seq: u64, event: &E) -> Result<usize, StorageError> {
        self.append_all(seq, std::slice::from_ref(event))
    }

    /// Appends `events` as records `first..`, in one write. Returns their size.
    pub fn append_all(&self, first: u64, events: &[E]) -> Result<usize, StorageError> {
        if events.is_empty() {
            return Ok(0);
        }
        let mut st = self.file.with_end()?;
        if let Some(next) = st.next_seq().filter(|&next| next != first) {
            return Err(StorageError::Corrupt {
                place: format!("journal {}", self.file.dir.display()),
                error: format!("record {first} appended after record {}", next - 1),
            });
        }
        if st.pending.len() > MAX_PENDING_BYTES {
            return Err(StorageError::Io(format!(
                "journal {}: {} bytes wait to be written",
                self.file.dir.display(),
                st.pending.len()
            )));
        }
        let before = st.pending.len();
        for (i, event) in events.iter().enumerate() {
            push_frame(&mut st.pending, first + i as u64, event);
        }
        let size = st.pending.len() - before - 8 * events.len();
        if before == 0 {
            st.pending_first = first;
        }
        st.pending_last = first + events.len() as u64 - 1;
        drop(st);
        self.file.mark_dirty();
        Ok(size)
    }

    /// A claim on the group flush that makes every append made so far durable.
    pub fn ticket(&self) -> Result<Ticket, StorageError> {
        self.tickets.ticket()
    }

    /// Starts a new segment (after a snapshot), see [`JournalFile::roll`].
    pub fn roll(&self) -> Result<(), StorageError> {
        self.file.roll()?;
        self.file.mark_dirty();
        Ok(())
    }

    /// The last sequence written (0: none).
    pub fn last_seq(&self) -> Result<u64, StorageError> {
        self.file.last_seq()
    }

    /// Test and tooling access: the record of `seq`, if the journal holds it.
    pub fn raw(&self, seq: u64) -> Result<Option<Vec<u8>>, StorageError> {
        let mut found = None;
        self.file.read_after(seq.saturating_sub(1), |frame| {
            if frame.seq == seq {
                found = Some(frame.record);
            }
            Ok(frame.seq < seq)
        })?;
        Ok(found)
    }

    /// Test and tooling access: replaces the last record, or adds the next one,
    /// with raw bytes (to simulate a torn or forged write); synced at once.
    pub fn put_raw(&self, seq: u64, bytes: &[u8]) -> Result<(), StorageError> {
        let last = self.last_seq()?;
        if seq < last {
            return Err(StorageError::Io(format!("only the last record can be replaced ({last}), not {seq}")));
        }
        if seq == last {
            self.file.truncate_from(seq)?;
        }
        let mut frame = seq.to_le_bytes().to_vec();
        frame.extend_from_slice(bytes);
        self.file.write_raw(seq, seq, &frame)?;
        self.file.sync()
    }
}

/// The journal of one journaled actor, whatever keeps it: an append-only log of
/// events `E` numbered from 1 without gaps, whose appends become durable together
/// (group commit). Two backends: [`Journal`] (segment files on this host, made
/// durable by the storage's commit thread) and
/// [`StreamJournal`](super::jetstream::StreamJournal) (a subject of a replicated
/// JetStream stream, durable once the stream's quorum acknowledged it).
///
/// The protocol is the same for both: append on the actor's thread (encoding
/// only, no I/O), then take a ticket; the ticket completes once every record
/// appended before it was taken is durable, or fails, and then the writer must
/// rebuild from what is durable (memory may be ahead of it).
pub trait EventLog<E>: Send + Sync {
    /// Appends `events` as records `first..` (the next ones), in one write.
    /// Returns their encoded size.
    fn append_all(&self, first: u64, events: &[E]) -> Result<usize, StorageError>;

    /// A claim on the write that makes every record appended so far durable.
    fn ticket(&self) -> Result<Ticket, StorageError>;

    /// Called as a snapshot is begun: records after it may start a new unit of
    /// removal (a segment file), so that trimming what the snapshot covers is cheap.
    fn roll(&self) -> Result<(), StorageError> {
        Ok(())
    }
}

impl<E: serde::Serialize> EventLog<E> for Journal<E> {
    fn append_all(&self, first: u64, events: &[E]) -> Result<usize, StorageError> {
        Journal::append_all(self, first, events)
    }

    fn ticket(&self) -> Result<Ticket, StorageError> {
        Journal::ticket(self)
    }

    fn roll(&self) -> Result<(), StorageError> {
        Journal::roll(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &Path) -> (Arc<JournalFile>, Arc<DirtyJournals>) {
        let dirty = Arc::new(DirtyJournals::default());
        (Arc::new(JournalFile::open(dir.join("j"), dirty.clone()).unwrap()), dirty)
    }

    fn journal(file: &Arc<JournalFile>) -> Journal<u64> {
        Journal::new(file.clone(), TicketQueue::none(), Arc::new(()))
    }

    fn seqs(file: &JournalFile, after: u64) -> (Vec<u64>, End) {
        let mut out = Vec::new();
        let end = file
            .read_after(after, |f| {
                let value: u64 = codec::decode(Kind::Event, &f.record).unwrap();
                assert_eq!(value, f.seq * 10);
                out.push(f.seq);
                Ok(true)
            })
            .unwrap();
        (out, end)
    }

    fn segment_files(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> =
            std::fs::read_dir(dir.join("j")).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        names.sort();
        names
    }

    #[test]
    fn appends_read_back_across_segments_and_reopen_where_they_ended() {
        let dir = tempfile::tempdir().unwrap();
        let (file, dirty) = open(dir.path());
        let j = journal(&file);
        j.append(1, &10).unwrap();
        j.append_all(2, &[20, 30]).unwrap();
        assert_eq!(dirty.take().len(), 1, "written once: listed once for the commit thread");
        file.sync().unwrap();
        j.roll().unwrap();
        j.append(4, &40).unwrap();
        assert_eq!(segment_files(dir.path()), ["00000000000000000001.log", "00000000000000000004.log"]);
        assert_eq!(seqs(&file, 0), (vec![1, 2, 3, 4], End::Clean));
        assert_eq!(seqs(&file, 2), (vec![3, 4], End::Clean));
        assert!(j.append(6, &60).is_err(), "a gap is refused");
        file.sync().unwrap();
        drop((j, file));
        let (file, _) = open(dir.path());
        assert_eq!(file.last_seq().unwrap(), 4);
        journal(&file).append(5, &50).unwrap();
        assert_eq!(seqs(&file, 0).0, [1, 2, 3, 4, 5]);
        file.sync().unwrap();
        drop(file);
        // Reading the journal (as recovery does) finds where appends go on.
        let (file, _) = open(dir.path());
        assert_eq!(seqs(&file, 0).0, [1, 2, 3, 4, 5]);
        journal(&file).append(6, &60).unwrap();
        assert!(journal(&file).append(6, &60).is_err(), "record 6 is written");
        assert_eq!(seqs(&file, 4).0, [5, 6]);
    }

    #[test]
    fn an_append_touches_no_file_until_the_commit_thread_syncs() {
        let dir = tempfile::tempdir().unwrap();
        let (file, dirty) = open(dir.path());
        let j = journal(&file);
        j.append_all(1, &[10, 20]).unwrap();
        j.append(3, &30).unwrap();
        assert_eq!(file.last_seq().unwrap(), 3, "pending records count");
        assert!(j.append(3, &30).is_err(), "record 3 is appended");
        assert!(segment_files(dir.path()).is_empty(), "no segment yet: the writer did no I/O");
        assert!(file.is_dirty());
        let listed = dirty.take();
        assert_eq!(listed.len(), 1);
        listed[0].sync().unwrap();
        assert!(!file.is_dirty());
        let path = dir.path().join("j/00000000000000000001.log");
        let on_disk = std::fs::read(&path).unwrap();
        let frame = FRAME_HEADER + codec::encode(Kind::Event, &10u64).len() - codec::HEADER_BYTES;
        assert!(on_disk[..3 * frame].iter().any(|&b| b != 0) && on_disk[3 * frame..].iter().all(|&b| b == 0));
        // Appended and dropped without a sync: written on the way out.
        j.append(4, &40).unwrap();
        drop((j, listed, file, dirty.take()));
        let (file, _) = open(dir.path());
        assert_eq!(seqs(&file, 0), (vec![1, 2, 3, 4], End::Clean));
    }

    #[test]
    fn a_trim_deletes_whole_segments_it_covers() {
        let dir = tempfile::tempdir().unwrap();
        let (file, _) = open(dir.path());
        let j = journal(&file);
        j.append_all(1, &[10, 20, 30]).unwrap();
        j.roll().unwrap();
        j.append_all(4, &[40, 50]).unwrap();
        assert_eq!(file.covered(3).unwrap(), 3);
        assert_eq!(file.covered(4).unwrap(), 3, "a segment partly covered stays");
        file.trim_through(3).unwrap();
        assert_eq!(segment_files(dir.path()), ["00000000000000000004.log"]);
        assert_eq!(seqs(&file, 0).0, [4, 5]);
        // Trimming the segment being written starts a new one.
        file.trim_through(5).unwrap();
        assert_eq!(segment_files(dir.path()), ["00000000000000000006.log"]);
        j.append(6, &60).unwrap();
        assert_eq!(seqs(&file, 5).0, [6]);
    }

    #[test]
    fn a_torn_frame_ends_the_journal_and_truncation_removes_it_and_what_follows() {
        let dir = tempfile::tempdir().unwrap();
        let (file, _) = open(dir.path());
        let j = journal(&file);
        j.append_all(1, &[10, 20, 30, 40]).unwrap();
        file.sync().unwrap();
        // Damage record 3 in place (preallocated zeros follow the last frame).
        let path = dir.path().join("j/00000000000000000001.log");
        let mut bytes = std::fs::read(&path).unwrap();
        let frame = FRAME_HEADER + codec::encode(Kind::Event, &10u64).len() - codec::HEADER_BYTES;
        bytes[2 * frame + FRAME_HEADER] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        let (reread, _) = open(dir.path());
        assert_eq!(reread.last_seq().unwrap(), 2);
        let (seen, end) = seqs(&reread, 0);
        assert_eq!(seen, [1, 2]);
        assert!(matches!(end, End::Torn { seq: 3, .. }), "{end:?}");
        reread.truncate_from(3).unwrap();
        assert_eq!(seqs(&reread, 0), (vec![1, 2], End::Clean));
        journal(&reread).append(3, &30).unwrap();
        assert_eq!(seqs(&reread, 0), (vec![1, 2, 3], End::Clean), "record 4 of before is gone for good");
    }
}
