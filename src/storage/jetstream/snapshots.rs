//! Snapshots of replicated journals, in a stream of their own (`{stream}_SNAP`).
//!
//! A snapshot of journal `j` is its bytes in chunks on subject `{stream}_SNAP.{j}.data`
//! (each chunk starts with the snapshot's random 8-byte id, as chunks of an abandoned
//! put may sit among them) and one record on `{stream}_SNAP.{j}.meta`: the journal
//! sequence it covers, its size, CRC32, chunk count and the stream sequence of its
//! first chunk.
//!
//! The meta record is the commit point and a compare-and-set: it is published with
//! the expected last sequence of the meta subject as the writer read it, and only if
//! the snapshot stored there covers less of the journal. So a slow or stale writer
//! can never put an older snapshot over a newer one, and a put cut short leaves the
//! previous snapshot whole (its chunks are only purged after a newer meta record is
//! stored: everything on the data subject before the new first chunk). A writer
//! that loses the compare-and-set publishes its chunks again before trying again:
//! every chunk it publishes after reading the winner's record comes after the
//! winner's first chunk, so the winner's purge cannot take them.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream;

use super::{remote, JetStream};
use crate::storage::StorageError;

#[derive(Debug, Serialize, Deserialize)]
struct Meta {
    seq: u64,
    bytes: u64,
    crc: u32,
    chunks: u64,
    first: u64,
    id: u64,
}

/// Most bytes one snapshot may have (its chunks are read into memory).
pub const MAX_SNAPSHOT_BYTES: u64 = 4 << 30;
/// Puts that lose the compare-and-set to another writer before one gives up.
const MAX_PUT_ATTEMPTS: usize = 8;

impl JetStream {
    fn snapshot_subjects(&self, journal: &str) -> Result<(String, String), StorageError> {
        self.subject(journal)?;
        let base = format!("{}_SNAP.{journal}", self.options.stream);
        Ok((format!("{base}.meta"), format!("{base}.data")))
    }

    async fn snapshot_meta(&self, subject: &str) -> Result<Option<(u64, Meta)>, StorageError> {
        match self.snapshots.get_last_raw_message_by_subject(subject).await {
            Ok(message) => {
                let meta: Meta = serde_json::from_slice(&message.payload)
                    .map_err(|e| StorageError::Corrupt { place: subject.to_string(), error: e.to_string() })?;
                Ok(Some((message.sequence, meta)))
            }
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(remote(&format!("read {subject}"), e)),
        }
    }

    /// Stores `bytes` as the snapshot of `journal` through record `seq`, unless the
    /// one stored covers as much or more. Returns whether it was stored. Call it only
    /// once the journal is acknowledged through `seq`.
    pub async fn put_snapshot(&self, journal: &str, seq: u64, bytes: &[u8]) -> Result<bool, StorageError> {
        let (meta_subject, data_subject) = self.snapshot_subjects(journal)?;
        if bytes.len() as u64 > MAX_SNAPSHOT_BYTES {
            return Err(StorageError::Remote(format!("a snapshot of {} bytes is over the limit", bytes.len())));
        }
        // A lost compare-and-set starts over with new chunks: the winner purges the
        // chunks published before its own first one, which may include ours.
        for _attempt in 0..MAX_PUT_ATTEMPTS {
            let Some(last) = self.newer_than_stored(&meta_subject, seq).await? else { return Ok(false) };
            let (first, chunks, id) = self.put_chunks(journal, &data_subject, bytes).await?;
            let meta = Meta { seq, bytes: bytes.len() as u64, crc: crc32fast::hash(bytes), chunks, first, id };
            let payload = Bytes::from(serde_json::to_vec(&meta).expect("meta serialises"));
            let message = PublishMessage::build().payload(payload).expected_last_subject_sequence(last);
            let ack = async { self.context.send_publish(meta_subject.clone(), message).await?.await }.await;
            match ack {
                Ok(ack) => {
                    // The older snapshots' records and chunks (and abandoned puts'
                    // chunks before ours) go.
                    for (subject, keep_from) in [(meta_subject, ack.sequence), (data_subject, first)] {
                        // A purge "up to" sequence 1 or 0 is no bound at all to the
                        // servers: it would take everything.
                        if keep_from <= 1 {
                            continue;
                        }
                        self.snapshots
                            .purge()
                            .filter(subject)
                            .sequence(keep_from)
                            .await
                            .map_err(|e| remote(&format!("purge {journal}'s old snapshots"), e))?;
                    }
                    return Ok(true);
                }
                Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => continue,
                Err(e) => return Err(remote(&format!("store {journal}'s snapshot"), e)),
            }
        }
        Err(StorageError::Remote(format!("{journal}'s snapshot lost {MAX_PUT_ATTEMPTS} races to other writers")))
    }

    /// Publishes `bytes` in chunks; returns the first chunk's stream sequence, the
    /// chunk count and the snapshot's id.
    async fn put_chunks(&self, journal: &str, subject: &str, bytes: &[u8]) -> Result<(u64, u64, u64), StorageError> {
        let id: u64 = rand::random();
        let room = self.max_message_bytes - 8;
        let mut first = 0;
        let mut chunks = 0;
        for part in bytes.chunks(room).chain(bytes.is_empty().then_some(&[][..])) {
            let mut payload = Vec::with_capacity(8 + part.len());
            payload.extend_from_slice(&id.to_le_bytes());
            payload.extend_from_slice(part);
            let ack = async {
                self.context
                    .send_publish(subject.to_string(), PublishMessage::build().payload(Bytes::from(payload)))
                    .await?
                    .await
            }
            .await
            .map_err(|e| remote(&format!("store a chunk of {journal}'s snapshot"), e))?;
            if chunks == 0 {
                first = ack.sequence;
            }
            chunks += 1;
        }
        Ok((first, chunks, id))
    }

    /// `Some(stream sequence of the stored meta record, 0 if none)` when a snapshot
    /// through `seq` would be newer than the stored one.
    async fn newer_than_stored(&self, meta_subject: &str, seq: u64) -> Result<Option<u64>, StorageError> {
        Ok(match self.snapshot_meta(meta_subject).await? {
            Some((_, stored)) if stored.seq >= seq => None,
            Some((at, _)) => Some(at),
            None => Some(0),
        })
    }

    /// The stored snapshot of `journal`: the record it covers through and its bytes.
    pub async fn snapshot(&self, journal: &str) -> Result<Option<(u64, Vec<u8>)>, StorageError> {
        let (meta_subject, data_subject) = self.snapshot_subjects(journal)?;
        let Some((_, meta)) = self.snapshot_meta(&meta_subject).await? else { return Ok(None) };
        let corrupt = |error: String| StorageError::Corrupt { place: format!("snapshot of {journal}"), error };
        if meta.bytes > MAX_SNAPSHOT_BYTES {
            return Err(corrupt(format!("declares {} bytes", meta.bytes)));
        }
        let mut bytes = Vec::with_capacity(meta.bytes as usize);
        let mut found = 0;
        let mut next = meta.first;
        while found < meta.chunks {
            let message = self
                .snapshots
                .raw_message_builder()
                .sequence(next)
                .next_by_subject(data_subject.clone())
                .send()
                .await
                .map_err(|e| match e.kind() {
                    stream::LastRawMessageErrorKind::NoMessageFound => {
                        corrupt(format!("{} of {} chunks found", found, meta.chunks))
                    }
                    _ => remote(&format!("read {journal}'s snapshot"), e),
                })?;
            next = message.sequence + 1;
            let payload = &message.payload;
            if payload.len() < 8 || payload[..8] != meta.id.to_le_bytes() {
                continue; // a chunk of another (abandoned) put
            }
            bytes.extend_from_slice(&payload[8..]);
            found += 1;
        }
        if bytes.len() as u64 != meta.bytes || crc32fast::hash(&bytes) != meta.crc {
            return Err(corrupt("its chunks do not match its size and checksum".into()));
        }
        Ok(Some((meta.seq, bytes)))
    }
}
