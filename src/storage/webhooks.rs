//! What merchant webhooks keep on disk. The events themselves are the stock
//! shards' journal records (see `domain::webhook`); kept here are:
//! * `webhook-endpoints` — name → [`StoredEndpoint`], endpoints added at run time;
//! * `webhook-cursors` — `{product}\0{shard BE}\0{endpoint}` → the last record of
//!   that journal delivered (or dead-lettered) to that endpoint (u64 BE). A cursor
//!   is written after the delivery, so a crash can only send an event again;
//! * `webhook-seen` — endpoint → nothing: endpoints whose start is set (their
//!   cursors were put at the end of every journal then; a journal made later has
//!   no cursor for them and is read from its first record);
//! * `webhook-dead` — `{endpoint}\0{event id}` → [`DeadLetter`], events given up on
//!   after the retry horizon, with their body, until redelivered or deleted.
//!
//! A journal keeps every record some endpoint has not been sent yet: a trim after
//! a snapshot stops at the lowest cursor of that journal ([`Storage::webhook_floor`]).

use serde::{Deserialize, Serialize};

use super::codec::{self, Kind};
use super::{Storage, StorageError};
use crate::domain::{Event, ShardId};

/// An endpoint added through the admin API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredEndpoint {
    pub name: String,
    pub url: String,
    pub secret: String,
    /// Event type names; empty: every type.
    pub events: Vec<String>,
    pub include_keys: bool,
    pub timeout_ms: u64,
    pub retry_horizon_secs: u64,
    pub max_in_flight: u32,
    pub created_at_ms: u64,
}

/// An event given up on: what was sent, how often, and why it failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub event_id: String,
    pub kind: String,
    pub at_ms: u64,
    pub body: Vec<u8>,
    pub attempts: u32,
    pub last_error: String,
    pub died_at_ms: u64,
}

fn cursor_prefix(id: &ShardId) -> Vec<u8> {
    let mut key = id.product.as_bytes().to_vec();
    key.push(0);
    key.extend_from_slice(&id.shard.to_be_bytes());
    key.push(0);
    key
}

fn dead_key(endpoint: &str, event_id: &str) -> Vec<u8> {
    let mut key = endpoint.as_bytes().to_vec();
    key.push(0);
    key.extend_from_slice(event_id.as_bytes());
    key
}

fn corrupt(place: &str, e: impl std::fmt::Display) -> StorageError {
    StorageError::Corrupt { place: place.to_string(), error: e.to_string() }
}

impl Storage {
    fn webhook_tree(&self, name: &str) -> Result<sled::Tree, StorageError> {
        Ok(self.db.open_tree(name)?)
    }

    /// Records an endpoint added at run time. Durable after a flush.
    pub fn put_webhook_endpoint(&self, e: &StoredEndpoint) -> Result<(), StorageError> {
        self.webhook_tree("webhook-endpoints")?.insert(e.name.as_bytes(), codec::encode(Kind::Webhook, e))?;
        Ok(())
    }

    /// Forgets an endpoint: its record, its cursors and its dead letters.
    pub fn delete_webhook_endpoint(&self, name: &str) -> Result<(), StorageError> {
        self.webhook_tree("webhook-endpoints")?.remove(name.as_bytes())?;
        self.webhook_tree("webhook-seen")?.remove(name.as_bytes())?;
        let cursors = self.webhook_tree("webhook-cursors")?;
        for kv in cursors.iter() {
            let (k, _) = kv?;
            if k.rsplit(|&b| b == 0).next() == Some(name.as_bytes()) {
                cursors.remove(k)?;
            }
        }
        let dead = self.webhook_tree("webhook-dead")?;
        for kv in dead.scan_prefix(dead_key(name, "")) {
            dead.remove(kv?.0)?;
        }
        Ok(())
    }

    pub fn webhook_endpoints(&self) -> Result<Vec<StoredEndpoint>, StorageError> {
        let mut out = Vec::new();
        for kv in self.webhook_tree("webhook-endpoints")?.iter() {
            let (_, v) = kv?;
            out.push(codec::decode(Kind::Webhook, &v).map_err(|e| corrupt("webhook-endpoints", e))?);
        }
        Ok(out)
    }

    /// Whether `endpoint` was given its start ([`Self::start_webhook_endpoint_at_the_end`]).
    pub fn webhook_endpoint_seen(&self, endpoint: &str) -> Result<bool, StorageError> {
        Ok(self.webhook_tree("webhook-seen")?.contains_key(endpoint.as_bytes())?)
    }

    /// Starts `endpoint` at the end of every stock journal there is: it is sent what
    /// is journaled from now on. Durable after a flush.
    pub fn start_webhook_endpoint_at_the_end(&self, endpoint: &str) -> Result<(), StorageError> {
        for product in self.load_products()? {
            for shard in 0..product.shards {
                let id = ShardId::new(product.id.clone(), shard);
                let end = self.journal(&id)?.last_seq()?;
                self.set_webhook_cursor(&id, endpoint, end)?;
            }
        }
        self.webhook_tree("webhook-seen")?.insert(endpoint.as_bytes(), &[])?;
        Ok(())
    }

    /// Cursors at 0 in a new product's journals for every endpoint with a start,
    /// so no trim takes a record before the endpoint's worker first reads it.
    pub(crate) fn start_webhook_cursors(&self, product: &crate::domain::ProductInfo) -> Result<(), StorageError> {
        for kv in self.webhook_tree("webhook-seen")?.iter() {
            let (name, _) = kv?;
            let name = String::from_utf8_lossy(&name).into_owned();
            for shard in 0..product.shards {
                let id = ShardId::new(product.id.clone(), shard);
                if self.webhook_cursor(&id, &name)?.is_none() {
                    self.set_webhook_cursor(&id, &name, 0)?;
                }
            }
        }
        Ok(())
    }

    /// Forgets whatever is kept for endpoints other than `names` (one removed from
    /// the configuration file): their cursors would hold journals back for good.
    pub fn forget_webhook_endpoints_except(&self, names: &[String]) -> Result<(), StorageError> {
        let known = |name: &[u8]| names.iter().any(|n| n.as_bytes() == name);
        let mut gone = std::collections::BTreeSet::new();
        for kv in self.webhook_tree("webhook-cursors")?.iter() {
            let (k, _) = kv?;
            let name = k.rsplit(|&b| b == 0).next().unwrap_or(&[]);
            if !known(name) {
                gone.insert(name.to_vec());
            }
        }
        for kv in self.webhook_tree("webhook-seen")?.iter() {
            let (k, _) = kv?;
            if !known(&k) {
                gone.insert(k.to_vec());
            }
        }
        for name in gone {
            self.delete_webhook_endpoint(&String::from_utf8_lossy(&name))?;
        }
        Ok(())
    }

    /// The last record of `id`'s journal sent to `endpoint` (`None`: never set).
    pub fn webhook_cursor(&self, id: &ShardId, endpoint: &str) -> Result<Option<u64>, StorageError> {
        let mut key = cursor_prefix(id);
        key.extend_from_slice(endpoint.as_bytes());
        Ok(self
            .webhook_tree("webhook-cursors")?
            .get(key)?
            .map(|v| u64::from_be_bytes(v.as_ref().try_into().unwrap_or([0; 8]))))
    }

    /// Moves the cursor (never back). Durable after a flush; a cursor lost to a
    /// crash only sends its events again.
    pub fn set_webhook_cursor(&self, id: &ShardId, endpoint: &str, seq: u64) -> Result<(), StorageError> {
        let mut key = cursor_prefix(id);
        key.extend_from_slice(endpoint.as_bytes());
        self.webhook_tree("webhook-cursors")?.fetch_and_update(key, |old| {
            let old = old.map_or(0, |v| u64::from_be_bytes(v.try_into().unwrap_or([0; 8])));
            Some(old.max(seq).to_be_bytes().to_vec())
        })?;
        Ok(())
    }

    /// The lowest cursor of `id`'s journal over the endpoints that have one: the
    /// journal's records after it are still to be sent somewhere. `None` when no
    /// endpoint has a cursor there.
    pub fn webhook_floor(&self, id: &ShardId) -> Result<Option<u64>, StorageError> {
        let mut floor: Option<u64> = None;
        for kv in self.webhook_tree("webhook-cursors")?.scan_prefix(cursor_prefix(id)) {
            let (_, v) = kv?;
            let seq = u64::from_be_bytes(v.as_ref().try_into().unwrap_or([0; 8]));
            floor = Some(floor.map_or(seq, |f| f.min(seq)));
        }
        Ok(floor)
    }

    /// The last record appended to `id`'s journal (durable or not).
    pub fn journal_end(&self, id: &ShardId) -> Result<u64, StorageError> {
        self.journal(id)?.last_seq()
    }

    /// Up to `max` records of `id`'s journal after `after`, through `upto` (which
    /// must be known durable), decoded.
    pub fn durable_records(
        &self,
        id: &ShardId,
        after: u64,
        upto: u64,
        max: usize,
    ) -> Result<Vec<(u64, Event)>, StorageError> {
        let journal = self.journal(id)?;
        let mut out = Vec::new();
        journal.file().read_durable(after, upto, |frame| {
            let event = codec::decode::<Event>(Kind::Event, &frame.record)
                .map_err(|e| corrupt(&format!("journal/{id} record {}", frame.seq), e))?;
            out.push((frame.seq, event));
            Ok(out.len() < max)
        })?;
        Ok(out)
    }

    pub fn put_dead_letter(&self, endpoint: &str, d: &DeadLetter) -> Result<(), StorageError> {
        self.webhook_tree("webhook-dead")?.insert(dead_key(endpoint, &d.event_id), codec::encode(Kind::Webhook, d))?;
        Ok(())
    }

    pub fn dead_letter(&self, endpoint: &str, event_id: &str) -> Result<Option<DeadLetter>, StorageError> {
        match self.webhook_tree("webhook-dead")?.get(dead_key(endpoint, event_id))? {
            Some(v) => Ok(Some(codec::decode(Kind::Webhook, &v).map_err(|e| corrupt("webhook-dead", e))?)),
            None => Ok(None),
        }
    }

    pub fn remove_dead_letter(&self, endpoint: &str, event_id: &str) -> Result<(), StorageError> {
        self.webhook_tree("webhook-dead")?.remove(dead_key(endpoint, event_id))?;
        Ok(())
    }

    /// Up to `limit` of `endpoint`'s dead letters after event id `after`, in id order.
    pub fn dead_letters(&self, endpoint: &str, after: &str, limit: usize) -> Result<Vec<DeadLetter>, StorageError> {
        let tree = self.webhook_tree("webhook-dead")?;
        let prefix = dead_key(endpoint, "");
        let mut out = Vec::new();
        for kv in tree.range(dead_key(endpoint, after)..) {
            let (k, v) = kv?;
            if !k.starts_with(&prefix) || out.len() >= limit {
                break;
            }
            if &k[prefix.len()..] == after.as_bytes() {
                continue;
            }
            out.push(codec::decode(Kind::Webhook, &v).map_err(|e| corrupt("webhook-dead", e))?);
        }
        Ok(out)
    }

    pub fn dead_letter_count(&self, endpoint: &str) -> Result<usize, StorageError> {
        Ok(self.webhook_tree("webhook-dead")?.scan_prefix(dead_key(endpoint, "")).count())
    }
}
