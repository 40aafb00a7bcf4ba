//! Online backups through the core: one at a time, written on a blocking thread
//! into a bounded channel the caller reads (the HTTP route streams it).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc;

use super::Kami;
use crate::error::Error;
pub use crate::storage::backup::MIN_PASSPHRASE_BYTES;

/// Bytes a chunk of the stream holds before it is handed on.
const CHUNK_BYTES: usize = 256 << 10;
/// Chunks written ahead of the reader: a slow reader holds at most this much.
const CHUNKS_AHEAD: usize = 8;

/// A backup being written: its chunks in order, then `Err` if it failed (a stream
/// that ends without an error is whole; the format's end entry says so too).
pub struct BackupStream {
    pub chunks: mpsc::Receiver<Result<Bytes, String>>,
}

/// Hands what the backup writes to the channel, a chunk at a time.
struct ChannelWriter {
    tx: mpsc::Sender<Result<Bytes, String>>,
    buf: Vec<u8>,
}

impl ChannelWriter {
    fn send(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK_BYTES)));
        self.tx
            .blocking_send(Ok(chunk))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the reader of the backup went away"))
    }
}

impl std::io::Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK_BYTES {
            self.send()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.send()
    }
}

/// Clears the running flag however the backup ends.
struct Running(Arc<std::sync::atomic::AtomicBool>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

impl Kami {
    /// Starts an online backup (see `storage::backup`): a consistent cut of every
    /// journal, with the sled trees, and with `passphrase` the generated secrets
    /// sealed by it. Selling goes on. 409 `backup_running` while one is written.
    pub fn backup(&self, passphrase: Option<String>) -> Result<BackupStream, Error> {
        if self.storage.stock_elsewhere() {
            return Err(Error::Unsupported(
                "backups with storage.backend = \"jetstream\" (the stream's own copies and snapshots keep stock)"
                    .into(),
            ));
        }
        if self.backup_running.compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst).is_err() {
            return Err(Error::BackupRunning);
        }
        let running = Running(self.backup_running.clone());
        let (tx, chunks) = mpsc::channel(CHUNKS_AHEAD);
        let storage = self.storage.clone();
        let now_ms = self.clock.now_ms();
        // Off the runtime's threads, at a lower priority: the sale keeps the cores.
        let spawned = crate::storage::backup::in_background("kami-backup", move || {
            let _running = running;
            let started = std::time::Instant::now();
            let mut out = ChannelWriter { tx: tx.clone(), buf: Vec::with_capacity(CHUNK_BYTES) };
            match storage.backup(&mut out, passphrase.as_deref(), now_ms) {
                Ok(summary) => {
                    metrics::counter!("kami_backups_total", "result" => "ok").increment(1);
                    metrics::gauge!("kami_backup_last_success_timestamp_seconds").set(now_ms as f64 / 1000.0);
                    metrics::gauge!("kami_backup_last_bytes").set(summary.bytes as f64);
                    tracing::info!(
                        bytes = summary.bytes,
                        journal_records = summary.journal_records,
                        values = summary.tree_values,
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "backup written"
                    );
                }
                Err(e) => {
                    metrics::counter!("kami_backups_total", "result" => "failed").increment(1);
                    tracing::warn!(error = %e, "backup failed");
                    let _ = tx.blocking_send(Err(e.to_string()));
                }
            }
        });
        if let Err(e) = spawned {
            return Err(crate::storage::StorageError::Io(format!("starting the backup's thread: {e}")).into());
        }
        Ok(BackupStream { chunks })
    }
}
