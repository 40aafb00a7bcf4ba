//! Merchant webhook endpoints: the ones in the configuration and the ones added
//! through the admin API (durable), what each has been sent, and its dead letters.
//! The delivery itself (reading the journals, signing, POSTing, retrying) is
//! `crate::webhooks`; this is what it and the admin API share.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};

use super::*;
use crate::config::{EndpointSettings, WebhookSettings};
use crate::domain::webhook::EventType;
use crate::domain::ShardId;
use crate::storage::webhooks::{DeadLetter, StoredEndpoint};
use crate::storage::StorageError;

/// Most dead letters queued for redelivery at once per endpoint.
pub const MAX_REDELIVERIES: usize = 10_000;
/// Most events listed as failing per endpoint (one per journal is ever failing).
pub const MAX_FAILING_LISTED: usize = 10_000;

/// One endpoint and what its delivery worker reports about it.
pub struct Endpoint {
    pub name: String,
    pub settings: EndpointSettings,
    /// Types sent (all when the settings name none).
    pub events: Vec<EventType>,
    /// From the configuration file (not deletable through the API).
    pub from_config: bool,
    pub created_at_ms: u64,
    pub live: EndpointLive,
}

impl Endpoint {
    pub fn wants(&self, kind: EventType) -> bool {
        self.events.contains(&kind)
    }
}

/// What the delivery worker of one endpoint reports (read by the admin API, the
/// status page and the metrics).
#[derive(Default)]
pub struct EndpointLive {
    pub delivered: AtomicU64,
    pub failed_attempts: AtomicU64,
    pub dead: AtomicU64,
    /// Journal records not yet sent (or given up on), over every journal.
    pub pending_records: AtomicU64,
    /// Age of the oldest event not yet delivered (0: none).
    pub lag_ms: AtomicU64,
    pub breaker_open: AtomicBool,
    /// Deleted: its worker stops.
    pub removed: AtomicBool,
    /// Events failing now, by id (at most one per journal: a journal's events go in order).
    pub failing: Mutex<BTreeMap<String, Failing>>,
    /// Dead letters to send again (ids), oldest first.
    pub redeliver: Mutex<VecDeque<String>>,
}

/// An event whose deliveries failed so far and will be tried again.
#[derive(Debug, Clone)]
pub struct Failing {
    pub kind: EventType,
    pub attempts: u32,
    pub last_error: String,
    pub first_failed_ms: u64,
    pub next_attempt_ms: u64,
}

/// An endpoint as the admin API adds it.
#[derive(Debug, Clone)]
pub struct NewEndpoint {
    pub name: String,
    pub settings: EndpointSettings,
}

/// Which dead letters to send again.
#[derive(Debug, Clone)]
pub enum Redeliver {
    Event(String),
    /// Those whose events happened in `[from_ms, to_ms)`.
    Between {
        from_ms: u64,
        to_ms: u64,
    },
}

/// Every endpoint, by name.
pub struct Webhooks {
    endpoints: RwLock<BTreeMap<String, Arc<Endpoint>>>,
    pub settings: WebhookSettings,
    /// Why endpoints cannot be added, if they cannot: the event feed reads the
    /// local journals, which `storage.backend = "jetstream"` does not write.
    pub refused: Option<String>,
}

fn types_of(settings: &EndpointSettings) -> Vec<EventType> {
    if settings.events.is_empty() {
        return EventType::ALL.to_vec();
    }
    settings.events.iter().filter_map(|e| EventType::parse(e)).collect()
}

impl Webhooks {
    /// The endpoints of the configuration and those stored; each seen for the first
    /// time starts at the end of every journal that exists (it is sent what happens
    /// from now on), and what is stored for endpoints no longer known is forgotten.
    pub fn load(settings: &WebhookSettings, storage: &Storage, now_ms: u64) -> Result<Webhooks, StorageError> {
        let mut endpoints = BTreeMap::new();
        for (name, s) in &settings.endpoints {
            let e = Endpoint {
                name: name.clone(),
                events: types_of(s),
                settings: s.clone(),
                from_config: true,
                created_at_ms: now_ms,
                live: EndpointLive::default(),
            };
            endpoints.insert(name.clone(), Arc::new(e));
        }
        for stored in storage.webhook_endpoints()? {
            if endpoints.contains_key(&stored.name) {
                // The configuration now names it: the file wins.
                storage.delete_webhook_endpoint(&stored.name)?;
                continue;
            }
            let s = EndpointSettings {
                url: stored.url,
                secret: stored.secret,
                events: stored.events,
                include_keys: stored.include_keys,
                timeout_ms: stored.timeout_ms,
                retry_horizon_secs: stored.retry_horizon_secs,
                max_in_flight: stored.max_in_flight,
            };
            let e = Endpoint {
                name: stored.name.clone(),
                events: types_of(&s),
                settings: s,
                from_config: false,
                created_at_ms: stored.created_at_ms,
                live: EndpointLive::default(),
            };
            endpoints.insert(stored.name, Arc::new(e));
        }
        let names: Vec<String> = endpoints.keys().cloned().collect();
        storage.forget_webhook_endpoints_except(&names)?;
        for e in endpoints.values() {
            if !storage.webhook_endpoint_seen(&e.name)? {
                storage.start_webhook_endpoint_at_the_end(&e.name)?;
            }
            e.live.dead.store(storage.dead_letter_count(&e.name)? as u64, Ordering::Relaxed);
        }
        let refused = storage
            .stock_elsewhere()
            .then(|| "webhooks with storage.backend = \"jetstream\" (the event feed reads local journals)".to_string());
        Ok(Webhooks { endpoints: RwLock::new(endpoints), settings: settings.clone(), refused })
    }

    pub fn all(&self) -> Vec<Arc<Endpoint>> {
        self.endpoints.read().unwrap_or_else(|e| e.into_inner()).values().cloned().collect()
    }

    pub fn get(&self, name: &str) -> Option<Arc<Endpoint>> {
        self.endpoints.read().unwrap_or_else(|e| e.into_inner()).get(name).cloned()
    }
}

impl Kami {
    /// The shop's clock (ms since the Unix epoch).
    pub fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    pub fn webhooks(&self) -> &Arc<Webhooks> {
        &self.webhooks
    }

    pub fn webhook(&self, name: &str) -> Result<Arc<Endpoint>, Error> {
        self.webhooks.get(name).ok_or_else(|| Error::WebhookNotFound(name.to_string()))
    }

    /// Adds an endpoint (durable when this returns). It is sent what happens from
    /// now on.
    pub async fn add_webhook(&self, new: NewEndpoint) -> Result<Arc<Endpoint>, Error> {
        if !crate::config::valid_endpoint_name(&new.name) {
            return Err(Error::Invalid("name: 1..=64 of a-z, 0-9, _ and -".into()));
        }
        if let Some(problem) = new.settings.problem() {
            return Err(Error::Invalid(problem));
        }
        if let Some(why) = &self.webhooks.refused {
            return Err(Error::Unsupported(why.clone()));
        }
        let _one = self.merchant_writes.lock().await;
        if self.webhooks.get(&new.name).is_some() {
            return Err(Error::WebhookExists(new.name));
        }
        let added = self.webhooks.all().iter().filter(|e| !e.from_config).count();
        if added >= self.webhooks.settings.max_endpoints {
            return Err(Error::WebhooksFull(self.webhooks.settings.max_endpoints));
        }
        let now = self.clock.now_ms();
        let s = &new.settings;
        let stored = StoredEndpoint {
            name: new.name.clone(),
            url: s.url.clone(),
            secret: s.secret.clone(),
            events: s.events.clone(),
            include_keys: s.include_keys,
            timeout_ms: s.timeout_ms,
            retry_horizon_secs: s.retry_horizon_secs,
            max_in_flight: s.max_in_flight,
            created_at_ms: now,
        };
        self.storage.start_webhook_endpoint_at_the_end(&new.name)?;
        self.storage.put_webhook_endpoint(&stored)?;
        self.storage.ticket()?.wait().await?;
        let endpoint = Arc::new(Endpoint {
            name: new.name.clone(),
            events: types_of(&new.settings),
            settings: new.settings,
            from_config: false,
            created_at_ms: now,
            live: EndpointLive::default(),
        });
        self.webhooks.endpoints.write().unwrap_or_else(|e| e.into_inner()).insert(new.name, endpoint.clone());
        Ok(endpoint)
    }

    /// Deletes an endpoint added through the API, with its cursors and dead letters.
    pub async fn delete_webhook(&self, name: &str) -> Result<(), Error> {
        let _one = self.merchant_writes.lock().await;
        let endpoint = self.webhook(name)?;
        if endpoint.from_config {
            return Err(Error::WebhookFromConfig(name.to_string()));
        }
        self.storage.delete_webhook_endpoint(name)?;
        self.storage.ticket()?.wait().await?;
        endpoint.live.removed.store(true, Ordering::Relaxed);
        self.webhooks.endpoints.write().unwrap_or_else(|e| e.into_inner()).remove(name);
        Ok(())
    }

    /// Up to `limit` dead letters of `name` after event id `after`.
    pub fn dead_letters(&self, name: &str, after: &str, limit: usize) -> Result<Vec<DeadLetter>, Error> {
        self.webhook(name)?;
        Ok(self.storage.dead_letters(name, after, limit)?)
    }

    /// Queues dead letters of `name` to be sent again; returns how many. Each is
    /// sent once more: delivered, it leaves the dead letters; refused, it stays.
    pub fn redeliver(&self, name: &str, which: Redeliver) -> Result<usize, Error> {
        let endpoint = self.webhook(name)?;
        let ids: Vec<String> = match which {
            Redeliver::Event(id) => match self.storage.dead_letter(name, &id)? {
                Some(d) => vec![d.event_id],
                None => return Err(Error::Invalid(format!("no dead letter {id:?} for endpoint {name:?}"))),
            },
            Redeliver::Between { from_ms, to_ms } => {
                let mut ids = Vec::new();
                let mut after = String::new();
                loop {
                    let page = self.storage.dead_letters(name, &after, 1_000)?;
                    let Some(last) = page.last() else { break };
                    after = last.event_id.clone();
                    ids.extend(page.into_iter().filter(|d| (from_ms..to_ms).contains(&d.at_ms)).map(|d| d.event_id));
                    if ids.len() >= MAX_REDELIVERIES {
                        break;
                    }
                }
                ids
            }
        };
        let mut queue = endpoint.live.redeliver.lock().unwrap_or_else(|e| e.into_inner());
        let room = MAX_REDELIVERIES.saturating_sub(queue.len());
        if ids.len() > room {
            return Err(Error::Invalid(format!(
                "{} dead letters asked for, room for {room} in the redelivery queue (at most {MAX_REDELIVERIES}); ask for fewer",
                ids.len()
            )));
        }
        let n = ids.len();
        for id in ids {
            if !queue.contains(&id) {
                queue.push_back(id);
            }
        }
        Ok(n)
    }

    /// Every stock shard's journal (the outbox the webhooks read).
    pub fn journals(&self) -> Vec<ShardId> {
        let all = self.registry.all();
        let mut ids: Vec<ShardId> =
            all.values().flat_map(|r| (0..r.shards.len()).map(|i| ShardId::new(r.info.id.clone(), i as u16))).collect();
        ids.sort_by(|a, b| (&a.product, a.shard).cmp(&(&b.product, b.shard)));
        ids
    }

    /// The payment a shard recorded, by channel and id.
    pub async fn payment_record(
        &self,
        shard: &ShardId,
        channel: &str,
        payment_id: &str,
    ) -> Result<Option<crate::domain::PaymentRecord>, Error> {
        let route = self.route_to(shard, DomainError::OrderNotFound)?;
        let msg = shard::GetPayment { channel: channel.to_string(), payment_id: payment_id.to_string() };
        self.call(&route.shards[shard.shard as usize], msg).await
    }
}
