//! Journals kept in a replicated NATS JetStream stream instead of local files: the
//! journal backend of a kami cluster (several nodes sharing one stream), where a
//! shard's history must outlive the host that wrote it.
//!
//! Layout: one stream (file storage, `replicas` copies, Raft-replicated by the NATS
//! servers) whose subjects are `{stream}.{journal}`; each journal (e.g.
//! `stock.7.0`) is one subject. A message is a run of the local journal's frames,
//! `seq (u64 LE) | record` (see [`super::journal`]), consecutive within and across
//! messages.
//!
//! Writes are a group commit per journal, like the local one: the writer's thread
//! encodes its records into the journal's pending buffer and takes a [`Ticket`];
//! the journal's task publishes everything pending in one message, waits for the
//! stream's acknowledgement (which the servers send once a quorum stored it) and
//! completes the tickets taken before the publish. Writers arriving meanwhile share
//! the next message. One publish is in flight per journal because of fencing:
//!
//! Every publish carries `Nats-Expected-Last-Subject-Sequence`, the stream sequence
//! of the journal's last message as this writer knows it. If anyone else extended
//! the journal since (another node took the shard over), the stream refuses the
//! message and the journal is *fenced*: every ticket pending and every later
//! append fails, and the owner must reopen the journal (reading back what the other
//! writer added) before it may write again. Two writers can therefore never both
//! extend one history: the stream's order of a subject is the only history. The
//! same happens after any publish whose outcome is unknown (a timeout, a lost
//! connection): the message may or may not be stored, so nothing more is appended
//! until a reopen has read back which.
//!
//! Limits: the pending buffer (`max_pending_bytes`), the tickets waiting (bounded
//! by [`MAX_WAITERS`]), a message (the server's `max_payload`: a group larger than
//! it is sent as several messages, split between frames; one record larger than it
//! is refused), the publish timeout, and the index kept for purges
//! ([`MAX_INDEX`]).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, DeliverPolicy};
use async_nats::jetstream::{self, context::PublishErrorKind, message::PublishMessage, stream};
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::{oneshot, Notify};

mod ledgers;
mod shards;
mod snapshots;
pub use ledgers::{ledger_journal, StreamLedger};
pub use shards::{shard_journal, StreamRecovered};
pub use snapshots::MAX_SNAPSHOT_BYTES;

use super::codec;
use super::commit::Ticket;
use super::journal::{push_frame, FRAME_HEADER};
use super::StorageError;

/// Most tickets waiting on one journal's next publishes.
pub const MAX_WAITERS: usize = 1 << 16;
/// Most published messages remembered for [`StreamJournal::purge_through`]; past it
/// the oldest are forgotten (a purge then keeps a little more than it could).
pub const MAX_INDEX: usize = 1 << 16;

/// Where the stream is and how it is kept.
#[derive(Debug, Clone)]
pub struct JetStreamOptions {
    /// Server addresses (`nats://host:port`), any of the cluster's.
    pub urls: Vec<String>,
    /// Stream name (also the prefix of its subjects).
    pub stream: String,
    /// Copies the servers keep of every message (1, 3 or 5).
    pub replicas: usize,
    /// How long a publish, a read or a purge may take before it counts as failed.
    pub timeout: Duration,
    /// Most bytes appended to one journal and not yet published.
    pub max_pending_bytes: usize,
}

impl Default for JetStreamOptions {
    fn default() -> Self {
        JetStreamOptions {
            urls: vec!["nats://127.0.0.1:4222".into()],
            stream: "KAMI".into(),
            replicas: 3,
            timeout: Duration::from_secs(5),
            max_pending_bytes: super::journal::MAX_PENDING_BYTES,
        }
    }
}

fn remote(what: &str, e: impl std::fmt::Display) -> StorageError {
    StorageError::Remote(format!("{what}: {e}"))
}

/// A connection to the stream every journal lives in.
#[derive(Clone)]
pub struct JetStream {
    context: jetstream::Context,
    stream: stream::Stream,
    /// Where snapshots are kept (see [`snapshots`]).
    snapshots: stream::Stream,
    options: Arc<JetStreamOptions>,
    max_message_bytes: usize,
}

impl JetStream {
    /// Connects and creates the stream if it does not exist (an existing one is
    /// used as it is).
    pub async fn connect(options: JetStreamOptions) -> Result<JetStream, StorageError> {
        if options.stream.is_empty() || options.stream.contains(['.', ' ', '*', '>']) {
            return Err(StorageError::Remote(format!("stream name {:?} is not a NATS token", options.stream)));
        }
        let client = async_nats::ConnectOptions::new()
            .connection_timeout(options.timeout)
            .request_timeout(Some(options.timeout))
            .connect(options.urls.clone())
            .await
            .map_err(|e| remote("connect to NATS", e))?;
        // Room for the headers of a publish (the expected sequence) within max_payload.
        let max_message_bytes = client.server_info().max_payload.saturating_sub(1024).max(4096);
        let mut context = jetstream::new(client);
        context.set_timeout(options.timeout);
        let stream = context
            .get_or_create_stream(kept_stream(&options.stream, options.replicas))
            .await
            .map_err(|e| remote("create the journal stream", e))?;
        let snapshots = context
            .get_or_create_stream(kept_stream(&format!("{}_SNAP", options.stream), options.replicas))
            .await
            .map_err(|e| remote("create the snapshot stream", e))?;
        Ok(JetStream { context, stream, snapshots, options: Arc::new(options), max_message_bytes })
    }

    /// The JetStream context (for the cluster's key-value buckets).
    pub fn context(&self) -> &jetstream::Context {
        &self.context
    }

    /// The options it was connected with.
    pub fn options(&self) -> &JetStreamOptions {
        &self.options
    }

    /// Calls `each` with every message of `subject` in order (its stream sequence
    /// and payload), up to the last one stored when the read began: an ordered
    /// consumer reads ahead in batches, so a long journal is not one request per
    /// message.
    async fn read_subject(
        &self,
        subject: &str,
        each: &mut impl FnMut(u64, &[u8]) -> Result<(), StorageError>,
    ) -> Result<(), StorageError> {
        let read_err = |e: &dyn std::fmt::Display| remote(&format!("read {subject}"), e);
        let last = match self.stream.get_last_raw_message_by_subject(subject).await {
            Ok(message) => message.sequence,
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => return Ok(()),
            Err(e) => return Err(read_err(&e)),
        };
        let consumer = self
            .stream
            .create_consumer(pull::OrderedConfig {
                filter_subject: subject.to_string(),
                deliver_policy: DeliverPolicy::All,
                ..Default::default()
            })
            .await
            .map_err(|e| read_err(&e))?;
        let mut messages = consumer.messages().await.map_err(|e| read_err(&e))?;
        loop {
            let next = tokio::time::timeout(self.options.timeout, messages.next())
                .await
                .map_err(|_| read_err(&"no message in time"))?;
            let message = match next {
                Some(message) => message.map_err(|e| read_err(&e))?,
                None => return Err(read_err(&"the consumer ended early")),
            };
            let sequence = message.info().map_err(|e| read_err(&e))?.stream_sequence;
            each(sequence, &message.payload)?;
            if sequence >= last {
                return Ok(());
            }
        }
    }

    fn subject(&self, journal: &str) -> Result<String, StorageError> {
        let valid = !journal.is_empty()
            && journal.split('.').all(|t| !t.is_empty() && !t.contains([' ', '*', '>', '\t', '\r', '\n']));
        if !valid {
            return Err(StorageError::Remote(format!("journal name {journal:?} is not a NATS subject")));
        }
        Ok(format!("{}.{journal}", self.options.stream))
    }

    /// Reads journal `journal` back, calling `visit` with every record after
    /// sequence `after` in order, and returns the journal ready for appends after
    /// its last record. The one way to start writing a journal, so a writer always
    /// extends the history it has read.
    pub async fn open(
        &self,
        journal: &str,
        after: u64,
        mut visit: impl FnMut(u64, &[u8]) -> Result<(), StorageError>,
    ) -> Result<StreamJournal, StorageError> {
        let subject = self.subject(journal)?;
        let place = || format!("stream journal {subject}");
        let mut last_message = 0u64;
        let mut messages_read = 0u64;
        let mut last_seq = 0u64;
        let mut index = VecDeque::new();
        let mut each = |sequence: u64, payload: &[u8]| -> Result<(), StorageError> {
            let mut expected = (last_seq > 0).then_some(last_seq + 1);
            for frame in Frames(payload) {
                let (seq, record) = frame.map_err(|error| StorageError::Corrupt { place: place(), error })?;
                // Purges remove whole messages: the first one kept may start anywhere.
                if expected.is_some_and(|e| e != seq) {
                    return Err(StorageError::Corrupt {
                        place: place(),
                        error: format!("record {seq} follows record {last_seq}"),
                    });
                }
                if seq > after {
                    visit(seq, record)?;
                }
                last_seq = seq;
                expected = Some(seq + 1);
            }
            last_message = sequence;
            messages_read += 1;
            remember(&mut index, sequence, last_seq);
            Ok(())
        };
        self.read_subject(&subject, &mut each).await?;
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending {
                buf: Vec::new(),
                first: 0,
                next_seq: last_seq + 1,
                waiters: Vec::new(),
                failed: None,
                closed: false,
            }),
            wake: Notify::new(),
            published: Mutex::new(Published { last_message, last_seq, index, messages: 0, messages_read }),
        });
        let task = Publisher {
            context: self.context.clone(),
            subject: subject.clone(),
            shared: shared.clone(),
            max_message_bytes: self.max_message_bytes,
        };
        tokio::spawn(task.run());
        Ok(StreamJournal {
            shared,
            subject,
            stream: self.stream.clone(),
            max_pending_bytes: self.options.max_pending_bytes,
            max_message_bytes: self.max_message_bytes,
        })
    }
}

/// A stream on `{name}.>` whose messages nothing expires or drops: only purges
/// after snapshots remove them.
fn kept_stream(name: &str, replicas: usize) -> stream::Config {
    stream::Config {
        name: name.to_string(),
        subjects: vec![format!("{name}.>")],
        storage: stream::StorageType::File,
        num_replicas: replicas,
        retention: stream::RetentionPolicy::Limits,
        discard: stream::DiscardPolicy::New,
        deny_delete: true,
        ..Default::default()
    }
}

fn remember(index: &mut VecDeque<(u64, u64)>, message: u64, last_seq: u64) {
    if index.len() == MAX_INDEX {
        index.pop_front();
    }
    index.push_back((message, last_seq));
}

/// The frames of a message body: `(seq, record)`, each record's envelope checked.
struct Frames<'a>(&'a [u8]);

impl<'a> Iterator for Frames<'a> {
    type Item = Result<(u64, &'a [u8]), String>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.0.is_empty() {
            return None;
        }
        let Some(header) = self.0.get(..FRAME_HEADER) else {
            let n = self.0.len();
            self.0 = &[];
            return Some(Err(format!("a frame of {n} bytes is shorter than its header")));
        };
        let seq = u64::from_le_bytes(header[..8].try_into().expect("8 bytes"));
        let declared = u32::from_le_bytes(header[14..18].try_into().expect("4 bytes")) as usize;
        let Some(record) = self.0.get(8..FRAME_HEADER + declared) else {
            self.0 = &[];
            return Some(Err(format!("record {seq} is cut short")));
        };
        self.0 = &self.0[FRAME_HEADER + declared..];
        Some(codec::check(record).map(|()| (seq, record)).map_err(|e| format!("record {seq}: {e}")))
    }
}

type Waiter = oneshot::Sender<Result<(), StorageError>>;

struct Pending {
    /// Frames appended and not yet taken by a publish.
    buf: Vec<u8>,
    /// Sequence of the first record in `buf`.
    first: u64,
    /// Sequence the next append must start with.
    next_seq: u64,
    /// Tickets taken since the last publish was taken.
    waiters: Vec<Waiter>,
    /// Set once a publish failed: the journal is fenced or its end is unknown.
    failed: Option<StorageError>,
    closed: bool,
}

struct Published {
    /// Stream sequence of the journal's last message (the expected last subject
    /// sequence of the next publish).
    last_message: u64,
    /// Last record sequence stored.
    last_seq: u64,
    /// (stream sequence, last record in it) of the messages since the last purge.
    index: VecDeque<(u64, u64)>,
    /// Messages published by this writer.
    messages: u64,
    /// Messages read back when it was opened.
    messages_read: u64,
}

struct Shared {
    pending: Mutex<Pending>,
    wake: Notify,
    published: Mutex<Published>,
}

impl Shared {
    fn pending(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn published(&self) -> MutexGuard<'_, Published> {
        self.published.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One journal in the stream, open for appends by this writer. Dropping it stops
/// its task once what is pending is published.
pub struct StreamJournal {
    shared: Arc<Shared>,
    subject: String,
    stream: stream::Stream,
    max_pending_bytes: usize,
    max_message_bytes: usize,
}

impl StreamJournal {
    /// Appends `events` as records `first..` (the next ones), encoded on the
    /// caller's thread. Returns their size. Durable once a ticket taken after this
    /// call completes.
    pub fn append_all<E: serde::Serialize>(&self, first: u64, events: &[E]) -> Result<usize, StorageError> {
        let mut p = self.shared.pending();
        if let Some(e) = &p.failed {
            return Err(e.clone());
        }
        if p.closed {
            return Err(StorageError::Closed);
        }
        if first != p.next_seq {
            return Err(StorageError::Corrupt {
                place: format!("stream journal {}", self.subject),
                error: format!("record {first} appended after record {}", p.next_seq - 1),
            });
        }
        if p.buf.len() > self.max_pending_bytes {
            return Err(StorageError::Busy);
        }
        let before = p.buf.len();
        for (i, event) in events.iter().enumerate() {
            let start = p.buf.len();
            push_frame(&mut p.buf, first + i as u64, event);
            if p.buf.len() - start > self.max_message_bytes {
                let size = p.buf.len() - start;
                p.buf.truncate(before);
                return Err(StorageError::Remote(format!(
                    "a record of {size} bytes is over the NATS server's max_payload ({} bytes)",
                    self.max_message_bytes
                )));
            }
        }
        if before == 0 {
            p.first = first;
        }
        p.next_seq = first + events.len() as u64;
        Ok(p.buf.len() - before - 8 * events.len())
    }

    /// A claim on the publish of everything appended so far.
    pub fn ticket(&self) -> Result<Ticket, StorageError> {
        let mut p = self.shared.pending();
        if let Some(e) = &p.failed {
            return Err(e.clone());
        }
        if p.waiters.len() >= MAX_WAITERS {
            return Err(StorageError::Busy);
        }
        let (tx, rx) = oneshot::channel();
        p.waiters.push(tx);
        drop(p);
        self.shared.wake.notify_one();
        Ok(Ticket::new(rx))
    }

    /// The last record sequence appended (0: none).
    pub fn last_seq(&self) -> u64 {
        self.shared.pending().next_seq - 1
    }

    /// The last record sequence the stream acknowledged.
    pub fn durable_seq(&self) -> u64 {
        self.shared.published().last_seq
    }

    /// Messages this writer published (a group commit is one message unless it is
    /// larger than the server's `max_payload`).
    pub fn messages_published(&self) -> u64 {
        self.shared.published().messages
    }

    /// Messages read back when the journal was opened.
    pub fn messages_read(&self) -> u64 {
        self.shared.published().messages_read
    }

    /// The error that stopped this journal, if one did (a fence or an unknown
    /// publish outcome): reopen it to write again.
    pub fn failed(&self) -> Option<StorageError> {
        self.shared.pending().failed.clone()
    }

    /// Removes from the stream the messages whose records are all at or before
    /// `seq` (a snapshot covers them), keeping the journal's last message (the
    /// fence of the next publish). Returns the messages removed.
    pub async fn purge_through(&self, seq: u64) -> Result<u64, StorageError> {
        let cut = {
            let mut published = self.shared.published();
            let keep_from = {
                let last_message = published.last_message;
                let index = &mut published.index;
                let mut keep_from = None;
                while let Some(&(message, last)) = index.front() {
                    if last > seq || message == last_message {
                        break;
                    }
                    index.pop_front();
                    keep_from = Some(message + 1);
                }
                keep_from
            };
            match keep_from {
                // (A purge "up to" 0 or 1 would be no bound to the servers: everything.)
                Some(k) if k > 1 => k,
                _ => return Ok(0),
            }
        };
        let purged = self
            .stream
            .purge()
            .filter(self.subject.clone())
            .sequence(cut)
            .await
            .map_err(|e| remote(&format!("purge {}", self.subject), e))?;
        Ok(purged.purged)
    }
}

impl<E: serde::Serialize> super::EventLog<E> for StreamJournal {
    fn append_all(&self, first: u64, events: &[E]) -> Result<usize, StorageError> {
        StreamJournal::append_all(self, first, events)
    }

    fn ticket(&self) -> Result<Ticket, StorageError> {
        StreamJournal::ticket(self)
    }
}

impl Drop for StreamJournal {
    fn drop(&mut self) {
        self.shared.pending().closed = true;
        self.shared.wake.notify_one();
    }
}

/// The journal's task: publishes what is pending, one message at a time.
struct Publisher {
    context: jetstream::Context,
    subject: String,
    shared: Arc<Shared>,
    max_message_bytes: usize,
}

impl Publisher {
    async fn run(self) {
        loop {
            let (buf, first, waiters, closed) = {
                let mut p = self.shared.pending();
                let taken = (std::mem::take(&mut p.buf), p.first, std::mem::take(&mut p.waiters), p.closed);
                if taken.0.capacity() > 1 << 20 {
                    p.buf = Vec::new();
                }
                taken
            };
            if buf.is_empty() && waiters.is_empty() {
                if closed {
                    return;
                }
                self.shared.wake.notified().await;
                continue;
            }
            let result = if buf.is_empty() { Ok(()) } else { self.publish(buf, first).await };
            if let Err(e) = &result {
                tracing::error!(journal = %self.subject, error = %e, "stream journal stopped");
                let mut p = self.shared.pending();
                p.failed = Some(e.clone());
                p.buf.clear();
                for waiter in p.waiters.drain(..) {
                    let _ = waiter.send(Err(e.clone()));
                }
            }
            for waiter in waiters {
                let _ = waiter.send(result.clone());
            }
            if result.is_err() {
                // Later appends are refused; tickets taken meanwhile were failed above.
                return;
            }
        }
    }

    /// Publishes frames `buf` (records `first..`) as one message, or as several
    /// split between frames when larger than the server takes.
    async fn publish(&self, buf: Vec<u8>, first: u64) -> Result<(), StorageError> {
        let buf = Bytes::from(buf);
        let mut start = 0;
        let mut seq = first;
        while start < buf.len() {
            let (end, last) = chunk_end(&buf[start..], seq, self.max_message_bytes);
            self.publish_one(buf.slice(start..start + end), last).await?;
            start += end;
            seq = last + 1;
        }
        Ok(())
    }

    async fn publish_one(&self, payload: Bytes, last_seq: u64) -> Result<(), StorageError> {
        let expected = self.shared.published().last_message;
        let message = PublishMessage::build().payload(payload).expected_last_subject_sequence(expected);
        let ack = async { self.context.send_publish(self.subject.clone(), message).await?.await }.await;
        match ack {
            Ok(ack) => {
                let mut published = self.shared.published();
                published.last_message = ack.sequence;
                published.last_seq = last_seq;
                published.messages += 1;
                remember(&mut published.index, ack.sequence, last_seq);
                Ok(())
            }
            Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => Err(StorageError::Fenced(format!(
                "{}: another writer extended it after stream sequence {expected}",
                self.subject
            ))),
            Err(e) => Err(remote(&format!("publish to {} (outcome unknown)", self.subject), e)),
        }
    }
}

/// The length of the longest run of whole frames at the start of `buf` (records
/// `first..`) that fits in `max` bytes (at least one frame), and its last record.
fn chunk_end(buf: &[u8], first: u64, max: usize) -> (usize, u64) {
    let mut end = 0;
    let mut seq = first;
    while end < buf.len() {
        let declared = u32::from_le_bytes(buf[end + 14..end + 18].try_into().expect("4 bytes")) as usize;
        let next = end + FRAME_HEADER + declared;
        if next > max && end > 0 {
            break;
        }
        end = next;
        seq += 1;
    }
    (end, seq - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(first: u64, sizes: &[usize]) -> Vec<u8> {
        let mut buf = Vec::new();
        for (i, &n) in sizes.iter().enumerate() {
            push_frame(&mut buf, first + i as u64, &vec![7u8; n]);
        }
        buf
    }

    #[test]
    fn frames_parse_back_in_order_and_a_damaged_one_is_refused() {
        let buf = frames(5, &[1, 300, 0]);
        let seqs: Vec<u64> = Frames(&buf).map(|f| f.unwrap().0).collect();
        assert_eq!(seqs, vec![5, 6, 7]);
        let mut damaged = buf.clone();
        let last = damaged.len() - 1;
        damaged[last - 2] ^= 1;
        assert!(Frames(&damaged).any(|f| f.is_err()));
        assert!(Frames(&buf[..buf.len() - 1]).last().unwrap().is_err());
    }

    #[test]
    fn a_group_is_split_between_frames_never_inside_one() {
        let buf = frames(1, &[100, 100, 100, 5000, 10]);
        let mut start = 0;
        let mut seq = 1;
        let mut chunks = Vec::new();
        while start < buf.len() {
            let (end, last) = chunk_end(&buf[start..], seq, 400);
            let got: Vec<u64> = Frames(&buf[start..start + end]).map(|f| f.unwrap().0).collect();
            assert_eq!(got, (seq..=last).collect::<Vec<_>>());
            chunks.push(got);
            start += end;
            seq = last + 1;
        }
        // Three small frames fit in 400 bytes; the large one goes alone; the last follows.
        assert_eq!(chunks, vec![vec![1, 2, 3], vec![4], vec![5]]);
    }
}
