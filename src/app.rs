//! Start-up and shutdown of a whole kami: storage, the actor system (one arbiter
//! per core), recovery, and the HTTP server. Tests use [`start`] to run the real
//! app on a random port; the binary uses it with the configured address.
//!
//! Order of start-up: open storage → start arbiters → bind and serve HTTP on them
//! (only `/healthz`, and `/readyz` = 503 `recovering`) → rebuild every shard from
//! snapshot + journal → mark ready. So `/readyz` is 200 only after recovery.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use tokio::sync::oneshot;

use crate::actors::payments::{PaymentEnv, PaymentSupervisor, PaymentTuning};
use crate::actors::shard::ShardEnv;
use crate::actors::supervisor::RecoveryReport;
use crate::actors::{ProductSupervisor, Registry};
use crate::clock::{Clock, SystemClock};
use crate::config::Settings;
use crate::core::{new_token, CoreLimits, Kami, Parts};
use crate::http::{self, AppState};
use crate::payments::{Channels, RetiringSecret};
use crate::storage::{Storage, StorageOptions};

/// The exit status of a server that lost its stream's writer lease.
pub const EXIT_WRITER_LOST: i32 = 75;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("storage at {path}: {error}")]
    Storage { path: String, error: String },
    #[error("cannot listen on {addr}: {error}")]
    Bind { addr: SocketAddr, error: std::io::Error },
    #[error("recovery failed: {0}")]
    Recovery(String),
    #[error("secrets: {0}")]
    Secrets(String),
    /// A payment channel's key file, or the webhooks' CA file, is missing,
    /// unreadable or holds no key or certificate.
    #[error("key file: {0}")]
    Channel(String),
}

/// Secrets in force. Those not configured are generated once and kept in
/// [`secrets_file`] (readable by the owner only), so a restart keeps them: the
/// merchant's token and a gateway's shared secret do not change under them.
#[derive(Debug, Clone)]
pub struct Secrets {
    pub admin_token: String,
    pub channels: BTreeMap<String, String>,
    /// Kept channel secrets that were rotated out and are still in their grace period.
    pub retiring: BTreeMap<String, RetiringSecret>,
    /// Secrets kept in the file (not configured), by configuration key.
    pub kept: Vec<String>,
    /// Of those, the ones generated at this start.
    pub generated: Vec<String>,
    /// The file they are kept in.
    pub file: std::path::PathBuf,
}

/// The secrets kept in a data directory.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct StoredSecrets {
    #[serde(default)]
    pub admin_token: Option<String>,
    #[serde(default)]
    pub channels: BTreeMap<String, String>,
    /// Channel secrets replaced by `kami secrets rotate`, accepted until `valid_until`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub retiring: BTreeMap<String, StoredRetiring>,
}

/// A rotated-out channel secret and the end of its grace period (RFC 3339).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct StoredRetiring {
    pub secret: String,
    pub valid_until: String,
}

impl StoredRetiring {
    /// The end of the grace period in Unix milliseconds.
    pub fn until_ms(&self) -> Result<u64, String> {
        chrono::DateTime::parse_from_rfc3339(&self.valid_until)
            .map(|t| t.timestamp_millis().max(0) as u64)
            .map_err(|e| format!("valid_until {:?}: {e}", self.valid_until))
    }
}

/// Which kept secret `kami secrets rotate` replaces.
#[derive(Debug, Clone)]
pub enum RotateWhat {
    AdminToken,
    Channel(String),
}

/// What a rotation did.
#[derive(Debug, Clone)]
pub struct Rotated {
    /// The configuration key of the secret (`admin.token`, `payments.channels.<name>.secret`).
    pub key: String,
    pub new_secret: String,
    /// For a channel: until when the replaced secret is still accepted (RFC 3339);
    /// `None` when the grace period is zero (or for the admin token, which has none).
    pub old_valid_until: Option<String>,
}

/// Replaces a secret kept in `data` with a fresh one. A channel's replaced secret
/// stays accepted on what its gateway signs for `grace` from `now` (a secret
/// rotated earlier and still in its grace period is dropped: one previous secret
/// per channel). The admin token is replaced at once. Takes effect at the next start.
/// Only kept (generated) secrets rotate: a configured one is changed in the configuration.
pub fn rotate_secret(
    data: &std::path::Path,
    what: &RotateWhat,
    grace: Duration,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<Rotated, String> {
    let file = secrets_file(data);
    let mut stored = read_secrets(data)?;
    let new_secret = new_token();
    let rotated = match what {
        RotateWhat::AdminToken => {
            let Some(token) = stored.admin_token.as_mut() else {
                return Err(format!(
                    "no admin token is kept in {} (a configured token is changed where it is configured)",
                    file.display()
                ));
            };
            *token = new_secret.clone();
            Rotated { key: "admin.token".into(), new_secret, old_valid_until: None }
        }
        RotateWhat::Channel(name) => {
            let Some(secret) = stored.channels.get_mut(name) else {
                return Err(format!(
                    "no secret of channel {name:?} is kept in {} (kept: {}; a configured secret is changed where it is configured)",
                    file.display(),
                    if stored.channels.is_empty() {
                        "none".to_string()
                    } else {
                        stored.channels.keys().cloned().collect::<Vec<_>>().join(", ")
                    }
                ));
            };
            let old = std::mem::replace(secret, new_secret.clone());
            let grace = chrono::Duration::from_std(grace).map_err(|e| format!("grace period: {e}"))?;
            let old_valid_until = (grace > chrono::Duration::zero())
                .then(|| (now + grace).to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
            match &old_valid_until {
                Some(until) => {
                    stored.retiring.insert(name.clone(), StoredRetiring { secret: old, valid_until: until.clone() });
                }
                None => {
                    stored.retiring.remove(name);
                }
            }
            Rotated { key: format!("payments.channels.{name}.secret"), new_secret, old_valid_until }
        }
    };
    write_secrets(data, &stored)?;
    Ok(rotated)
}

/// Where kami keeps the secrets it generated: `<storage.path>/secrets.json`.
pub fn secrets_file(data: &std::path::Path) -> std::path::PathBuf {
    data.join("secrets.json")
}

/// The secrets kept in `data`'s file (none if there is no file).
pub fn read_secrets(data: &std::path::Path) -> Result<StoredSecrets, String> {
    let path = secrets_file(data);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(StoredSecrets::default()),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// Writes the file whole (a temporary file renamed over it), readable by the owner only.
fn write_secrets(data: &std::path::Path, secrets: &StoredSecrets) -> Result<(), String> {
    use std::io::Write;
    let path = secrets_file(data);
    let err = |e: std::io::Error| format!("{}: {e}", path.display());
    std::fs::create_dir_all(data).map_err(err)?;
    let tmp = data.join("secrets.json.tmp");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut f = options.open(&tmp).map_err(err)?;
    f.write_all(&serde_json::to_vec_pretty(secrets).expect("secrets serialise")).map_err(err)?;
    f.sync_all().map_err(err)?;
    std::fs::rename(&tmp, &path).map_err(err)?;
    Ok(())
}

impl Secrets {
    fn resolve(settings: &Settings) -> Result<Secrets, StartError> {
        let data = &settings.storage.path;
        let file = secrets_file(data);
        let mut stored = read_secrets(data).map_err(StartError::Secrets)?;
        let (mut kept, mut generated) = (Vec::new(), Vec::new());
        let admin_token = if settings.admin.token.is_empty() {
            kept.push("admin.token".to_string());
            stored
                .admin_token
                .get_or_insert_with(|| {
                    generated.push("admin.token".to_string());
                    new_token()
                })
                .clone()
        } else {
            settings.admin.token.clone()
        };
        let mut channels = BTreeMap::new();
        let mut retiring = BTreeMap::new();
        let now_ms = chrono::Utc::now().timestamp_millis().max(0) as u64;
        for (name, c) in &settings.payments.channels {
            let secret = if c.secret.is_empty() {
                let key = format!("payments.channels.{name}.secret");
                kept.push(key.clone());
                let secret = stored
                    .channels
                    .entry(name.clone())
                    .or_insert_with(|| {
                        generated.push(key);
                        new_token()
                    })
                    .clone();
                if let Some(old) = stored.retiring.get(name) {
                    let until_ms =
                        old.until_ms().map_err(|e| StartError::Secrets(format!("{}: {e}", file.display())))?;
                    if now_ms < until_ms {
                        retiring
                            .insert(name.clone(), RetiringSecret { secret: old.secret.clone().into_bytes(), until_ms });
                    }
                }
                secret
            } else {
                c.secret.clone()
            };
            channels.insert(name.clone(), secret);
        }
        if !generated.is_empty() {
            write_secrets(data, &stored).map_err(StartError::Secrets)?;
        }
        Ok(Secrets { admin_token, channels, retiring, kept, generated, file })
    }
}

/// The actix system on its own thread, with its arbiters.
struct ActorSystem {
    system: System,
    arbiters: Vec<ArbiterHandle>,
    threads: Vec<Arbiter>,
    /// Hosts the payment supervisor.
    payments: Arbiter,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ActorSystem {
    fn start(arbiters: usize) -> ActorSystem {
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("kami-actors".into())
            .spawn(move || {
                let runner = System::new();
                runner.block_on(async move {
                    let threads: Vec<Arbiter> = (0..arbiters).map(|_| Arbiter::new()).collect();
                    let _ = tx.send((System::current(), threads, Arbiter::new()));
                });
                let _ = runner.run();
            })
            .expect("spawn actor system thread");
        let (system, threads, payments) = rx.recv().expect("actor system starts");
        for (index, arbiter) in threads.iter().enumerate() {
            arbiter.spawn_fn(move || crate::actors::mark_arbiter(index));
        }
        let arbiters = threads.iter().map(|a| a.handle()).collect();
        ActorSystem { system, arbiters, threads, payments, thread: Some(thread) }
    }
}

impl Drop for ActorSystem {
    fn drop(&mut self) {
        for a in &self.arbiters {
            a.stop();
        }
        self.payments.stop();
        for a in self.threads.drain(..) {
            let _ = a.join();
        }
        self.system.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A running kami. Dropping it stops everything at once, without snapshots, as a
/// crash would (minus the OS killing the process); [`RunningApp::shutdown`] is graceful.
pub struct RunningApp {
    pub addr: SocketAddr,
    pub secrets: Secrets,
    pub recovery: RecoveryReport,
    core: Option<Arc<Kami>>,
    state: AppState,
    /// sled handles still open (see `Storage::open_handles`).
    storage: std::sync::Weak<()>,
    /// The data directory, whose lock sled releases a moment after its last handle.
    data_path: std::path::PathBuf,
    stop_server: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<()>>,
    background: Vec<tokio::task::JoinHandle<()>>,
    grace: Duration,
    actors: Option<ActorSystem>,
    /// With `storage.backend = "jetstream"`: stops the renewal of the stream's
    /// writer lease (releasing it) and the renewing task.
    writer_lease: Option<(oneshot::Sender<()>, tokio::task::JoinHandle<()>)>,
    /// A cluster node's place in the cluster (`cluster.node`).
    cluster: Option<Arc<crate::core::cluster::ClusterNode>>,
}

impl RunningApp {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn core(&self) -> &Arc<Kami> {
        self.core.as_ref().expect("core lives as long as the app")
    }

    /// How many stock arbiters serve the actors (`actors.arbiters`).
    pub fn arbiter_count(&self) -> usize {
        self.actors.as_ref().map_or(0, |a| a.arbiters.len())
    }

    /// Runs `future` on stock arbiter `index` (mod the count), the thread that also
    /// serves HTTP connections and hosts stock actors: an embedder calling the core
    /// from there places orders in the shard on the same thread, as HTTP requests do.
    /// `false` if the arbiter has stopped.
    pub fn spawn_on_arbiter<F>(&self, index: usize, future: F) -> bool
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        match &self.actors {
            Some(a) if !a.arbiters.is_empty() => a.arbiters[index % a.arbiters.len()].spawn(future),
            _ => false,
        }
    }

    /// Stops everything at once, without snapshots, and returns once the data
    /// directory is released (so the same process can start on it again).
    pub async fn crash(mut self) {
        self.release().await;
    }

    async fn release(&mut self) {
        drop(self.stop_server.take());
        let mut tasks: Vec<_> = self.background.drain(..).collect();
        tasks.extend(self.server.take());
        tasks.extend(self.writer_lease.take().map(|(_, kept)| kept));
        for task in &tasks {
            task.abort();
        }
        for task in tasks {
            let _ = task.await;
        }
        self.state.detach();
        drop(self.core.take());
        drop(self.actors.take());
        // The directory may be opened again once every handle is dropped and sled's
        // own background work has let go of the directory lock (it can outlive the
        // last handle by a moment).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while (self.storage.strong_count() > 0 || !Storage::lock_released(&self.data_path))
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Stops accepting, lets in-flight requests finish within the grace period,
    /// snapshots every shard and flushes.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop_server.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            if tokio::time::timeout(self.grace, server).await.is_err() {
                tracing::warn!("in-flight requests did not finish within the grace period");
            }
        }
        match self.core().snapshot_all().await {
            Ok(shards) => tracing::info!(shards, "snapshots written; shutting down"),
            Err(e) => tracing::warn!(error = %e, "snapshot at shutdown failed; the journal covers everything"),
        }
        if let Some((stop, kept)) = self.writer_lease.take() {
            let _ = stop.send(());
            let _ = tokio::time::timeout(Duration::from_secs(5), kept).await;
        }
        if let Some(cluster) = self.cluster.take() {
            // The other nodes take this node's shards at once, not after the TTL.
            let _ = tokio::time::timeout(Duration::from_secs(5), cluster.leave()).await;
        }
        self.release().await;
    }
}

impl Drop for RunningApp {
    fn drop(&mut self) {
        self.state.detach();
        if let Some(server) = self.server.take() {
            server.abort();
        }
        for task in &self.background {
            task.abort();
        }
        if let Some((_, kept)) = self.writer_lease.take() {
            kept.abort();
        }
        drop(self.actors.take());
    }
}

/// Turns transparent huge pages off for this process (`actors.transparent_huge_pages
/// = false`): from now on memory is faulted in 4 KiB pages, so no order waits for
/// the kernel to zero 2 MiB at once. Pages already huge stay so.
pub fn disable_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: prctl with integer arguments; it only sets this process's THP flag.
        if unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) } != 0 {
            let e = std::io::Error::last_os_error();
            tracing::warn!(error = %e, "could not turn transparent huge pages off");
        }
    }
}

pub async fn start(settings: Settings) -> Result<RunningApp, StartError> {
    start_with_clock(settings, Arc::new(SystemClock)).await
}

pub async fn start_with_clock(settings: Settings, clock: Arc<dyn Clock>) -> Result<RunningApp, StartError> {
    let secrets = Secrets::resolve(&settings)?;
    // Key and certificate files are read before anything else starts: a missing one
    // stops kami here.
    crate::webhooks::extra_roots(&settings.webhooks.ca_file).map_err(StartError::Channel)?;
    let channels = Arc::new(
        Channels::from_settings(&settings, &secrets.channels, &secrets.retiring).map_err(StartError::Channel)?,
    );
    crate::telemetry::history::start_sampler();
    if !settings.actors.transparent_huge_pages {
        disable_transparent_huge_pages();
    }
    if settings.chaos.enabled {
        crate::chaos::arm(settings.chaos.crash_point, settings.chaos.crash_after_hits);
    }
    let opts = StorageOptions {
        path: settings.storage.path.clone(),
        cache_capacity_bytes: settings.storage.cache_capacity_bytes,
        max_pending_commits: settings.storage.max_pending_commits,
        max_commit_batch: settings.storage.max_commit_batch,
        commit_linger: Duration::from_micros(settings.storage.commit_linger_us),
        commit_busy_linger: Duration::from_micros(settings.storage.commit_busy_linger_us),
    };
    let storage_err = |error: String| StartError::Storage { path: opts.path.display().to_string(), error };
    let storage = {
        let opts = opts.clone();
        tokio::task::spawn_blocking(move || Storage::open(&opts))
            .await
            .map_err(|e| storage_err(e.to_string()))?
            .map_err(|e| storage_err(e.to_string()))?
    };
    let stock_backend = match settings.storage.backend {
        crate::config::StorageBackend::Local => "local".to_string(),
        crate::config::StorageBackend::Jetstream => format!("jetstream:{}", settings.storage.jetstream.stream),
    };
    storage.keep_stock_in(&stock_backend).map_err(|e| storage_err(e.to_string()))?;
    let archiving = !settings.backup.archive_dir.as_os_str().is_empty();
    if archiving {
        // Before recovery, which may trim: nothing not yet shipped is trimmed.
        storage.enable_archiving();
    }

    let state = AppState::new(&settings, secrets.admin_token.clone());
    let listener = tokio::net::TcpListener::bind(settings.server.listen)
        .await
        .map_err(|error| StartError::Bind { addr: settings.server.listen, error })?;
    let addr = listener.local_addr().map_err(|error| StartError::Bind { addr: settings.server.listen, error })?;
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let app = http::router(state.clone());
    let conn_limits = http::conn_limits(&settings);
    let actors = ActorSystem::start(settings.arbiters());
    // Connections are served on the arbiters in turn: a request whose stock actor
    // lives on the same arbiter never changes thread.
    let spawners: Vec<http::server::Spawn> = actors
        .arbiters
        .iter()
        .map(|a| {
            let a = a.clone();
            Arc::new(move |f| {
                a.spawn(f);
            }) as http::server::Spawn
        })
        .collect();
    // The recorder exists before any request is counted (handles are kept per thread).
    crate::telemetry::metrics_handle();
    let server = tokio::spawn(http::server::serve(listener, app, conn_limits, spawners, async move {
        let _ = stop_rx.await;
    }));

    let mut writer_lease = None;
    let mut catalogue = None;
    let mut cluster_js = None;
    let stream = match settings.storage.backend {
        crate::config::StorageBackend::Local => None,
        crate::config::StorageBackend::Jetstream => {
            let options = settings.storage.jetstream.options();
            let urls = options.urls.join(",");
            let patience = crate::cluster::writer::TTL * 2 + Duration::from_secs(1);
            // Servers electing a leader (one of them just restarted) time requests
            // out for a few seconds: a start then waits for them, up to `patience`.
            let deadline = std::time::Instant::now() + patience;
            let js = crate::cluster::patiently(
                deadline,
                Duration::from_millis(500),
                || crate::storage::jetstream::JetStream::connect(options.clone()),
                |e| {
                    tracing::warn!(error = %e, "the stream's servers do not answer yet; trying again");
                    true
                },
            )
            .await
            .map_err(|e| StartError::Storage { path: urls.clone(), error: e.to_string() })?;
            if settings.cluster.enabled() {
                // Many nodes write the stream, each the shards whose leases it holds.
                let client = js.context().client();
                let describe = serde_json::json!({
                    "backend": "jetstream",
                    "stream": settings.storage.jetstream.stream,
                    "replicas": settings.storage.jetstream.replicas,
                    "node": settings.cluster.node,
                });
                // Ready once joined, connected and a member (set after the join).
                let joined = Arc::new(std::sync::OnceLock::<Arc<crate::core::cluster::ClusterNode>>::new());
                let member = joined.clone();
                let check = Box::new(move || {
                    if client.connection_state() != async_nats::connection::State::Connected {
                        return Some("not connected to the JetStream servers".to_string());
                    }
                    match member.get() {
                        None => Some("joining the cluster".to_string()),
                        Some(node) => node.not_member(),
                    }
                });
                state.set_serving(http::Serving { describe, check });
                cluster_js = Some((js.clone(), joined));
            } else {
                // One server writes a stream: a second one is refused here, and this one
                // stops if it ever loses the lease (another server took the stream over).
                let node = format!("kami-{}-{:08x}", std::process::id(), rand::random::<u32>());
                // A standby waits as long as the writer lives (ten years stand for "ever").
                let patience = if settings.storage.jetstream.standby {
                    tracing::info!(node = %node, "standby: taking the stream over once its writer dies or stops");
                    Duration::from_secs(10 * 365 * 24 * 3600)
                } else {
                    patience
                };
                let writer = crate::cluster::writer::Writer::take(&js, &node, patience).await.map_err(|e| {
                    StartError::Storage { path: urls.clone(), error: format!("the stream's writer lease: {e}") }
                })?;
                // Ready only while the lease is this server's and the servers are in
                // reach (appends fail meanwhile: a balancer should send buyers elsewhere).
                let validity = writer.validity();
                let client = js.context().client();
                let describe = serde_json::json!({
                    "backend": "jetstream",
                    "stream": settings.storage.jetstream.stream,
                    "replicas": settings.storage.jetstream.replicas,
                    "node": node,
                });
                let check = Box::new(move || {
                    if std::time::Instant::now() >= *validity.borrow() {
                        Some("this server does not hold the stream's writer lease now".into())
                    } else if client.connection_state() != async_nats::connection::State::Connected {
                        Some("not connected to the JetStream servers".into())
                    } else {
                        None
                    }
                });
                state.set_serving(http::Serving { describe, check });
                let (stop, stopped) = oneshot::channel();
                let kept = tokio::spawn(async move {
                    if let Some(why) = writer.keep(stopped).await {
                        tracing::error!(error = %why, "lost the stream's writer lease (another server may be writing it); stopping at once: everything acknowledged is in the stream");
                        std::process::exit(EXIT_WRITER_LOST);
                    }
                });
                writer_lease = Some((stop, kept));
            }
            storage.keep_stock_elsewhere();
            // The products too (a server on another data directory sells the same).
            let bucket = format!("{}_CATALOGUE", settings.storage.jetstream.stream);
            // Buckets just made have no leader for a moment (several servers starting
            // together on new stream servers): tried again for a while.
            let (shared, taken) = crate::cluster::patiently(
                std::time::Instant::now() + patience,
                Duration::from_millis(250),
                || async {
                    let shared =
                        crate::cluster::catalogue::Catalogue::open(&js, &bucket).await.map_err(|e| e.to_string())?;
                    let taken = crate::core::catalogue::sync(&storage, &shared)
                        .await
                        .map_err(|e| format!("the stream's catalogue: {e}"))?;
                    Ok::<_, String>((shared, taken))
                },
                |e| {
                    tracing::warn!(error = %e, "the stream's catalogue does not answer yet; trying again");
                    true
                },
            )
            .await
            .map_err(|error| StartError::Storage { path: urls.clone(), error })?;
            tracing::info!(products = taken, bucket = %bucket, "products taken from the stream's catalogue");
            catalogue = Some(Arc::new(shared));
            tracing::info!(urls = %urls, stream = %settings.storage.jetstream.stream, replicas = settings.storage.jetstream.replicas, "stock journals are kept in a JetStream stream");
            Some(js)
        }
    };
    let ledger_stream = stream.clone();
    let env = Arc::new(ShardEnv {
        storage: storage.clone(),
        stream,
        claims: Arc::new(crate::actors::claims::PaymentClaims::new()),
        clock: clock.clone(),
        ttl_ms: settings.orders.ttl_secs * 1000,
        expiry_tick: Duration::from_millis(settings.orders.expiry_tick_ms),
        max_expired_per_tick: settings.orders.max_expired_per_tick,
        snapshot_min_journal_bytes: settings.storage.snapshot_min_journal_bytes,
        mailbox_capacity: settings.actors.mailbox_capacity,
        max_queue_wait_ms: settings.actors.max_queue_wait_ms,
        archive_after_ms: settings.orders.archive_after_secs * 1000,
        idempotency_ttl_ms: settings.orders.idempotency_ttl_secs * 1000,
        clustered: settings.cluster.enabled(),
    });
    let storage_weak = storage.open_handles();
    let registry = Arc::new(Registry::default());
    let (supervisor, mut recovery) = ProductSupervisor::recover(env, actors.arbiters.clone(), registry.clone())
        .await
        .map_err(|e| StartError::Recovery(e.to_string()))?;
    let supervisor = Supervisor::start_in_arbiter(&actors.arbiters[0], move |_| supervisor);
    // Of the last start (a gauge: one value per process start).
    metrics::gauge!("kami_recovery_seconds").set(recovery.elapsed.as_secs_f64());
    metrics::gauge!("kami_recovery_events_replayed").set(recovery.events_replayed as f64);
    tracing::info!(
        products = recovery.products,
        shards = recovery.shards,
        events_replayed = recovery.events_replayed,
        journal_bytes = recovery.journal_bytes,
        elapsed_ms = recovery.elapsed.as_millis() as u64,
        "recovery finished"
    );

    let payment_env = Arc::new(PaymentEnv {
        registry: registry.clone(),
        channels: channels.clone(),
        clock: clock.clone(),
        tuning: PaymentTuning::from_settings(&settings),
        http: reqwest::Client::builder()
            .pool_max_idle_per_host(settings.payments.max_calls_in_flight)
            .build()
            .map_err(|e| StartError::Recovery(format!("payment client: {e}")))?,
    });
    let pay_http = payment_env.http.clone();
    // Its own thread: gateway calls never share an arbiter with stock actors.
    let payments =
        Supervisor::start_in_arbiter(&actors.payments.handle(), move |_| PaymentSupervisor::new(payment_env));
    use crate::actors::ledger::{start_ledger, LedgerEnv};
    // A cluster node keeps the ledgers in the stream with the stock shards (each
    // served by the node holding its lease); one server keeps them here.
    let clustered = settings.cluster.enabled();
    let ledger_stream = match ledger_stream {
        Some(js) if !clustered && !ledgers_in_stream(&storage).map_err(|e| StartError::Recovery(e.to_string()))? => {
            drop(js);
            None
        }
        other => other,
    };
    let ledger_env = Arc::new(LedgerEnv {
        storage: storage.clone(),
        stream: ledger_stream,
        clustered,
        clock: clock.clone(),
        mailbox_capacity: settings.actors.mailbox_capacity,
        snapshot_min_journal_bytes: settings.storage.snapshot_min_journal_bytes,
    });
    let points = start_ledger(crate::actors::points::POINTS_SHARDS, &ledger_env, &actors.arbiters)
        .await
        .map_err(|e| StartError::Recovery(format!("points: {e}")))?;
    let coupons = start_ledger(crate::actors::coupons::COUPON_SHARDS, &ledger_env, &actors.arbiters)
        .await
        .map_err(|e| StartError::Recovery(format!("coupons: {e}")))?;
    let points_prices = storage.points_prices().map_err(|e| StartError::Recovery(format!("points prices: {e}")))?;
    let reusable_products = storage.reusable_products().map_err(|e| StartError::Recovery(format!("key modes: {e}")))?;
    let group_deals = storage.group_deals().map_err(|e| StartError::Recovery(format!("group deals: {e}")))?;
    let lookup_secret = storage.lookup_secret().map_err(|e| StartError::Recovery(format!("lookup secret: {e}")))?;
    let webhooks = crate::core::webhooks::Webhooks::load(&settings.webhooks, &storage, clock.now_ms())
        .map_err(|e| StartError::Recovery(format!("webhooks: {e}")))?;
    let shared_catalogue = catalogue.clone();
    let parts = Parts {
        catalogue,
        registry,
        supervisor,
        payments,
        storage,
        clock: clock.clone(),
        channels,
        points,
        points_prices,
        coupons,
        reusable_products,
        group_deals,
        lookup_secret,
        webhooks: Arc::new(webhooks),
        http: pay_http,
    };
    let core = Arc::new(Kami::new(parts, CoreLimits::from_settings(&settings), settings.orders.ttl_secs * 1000));
    core.restore_pins(std::mem::take(&mut recovery.idempotency_keys));
    state.set_ready(core.clone());

    let pruner = {
        let (core, limiter_state) = (core.clone(), state.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(10));
            loop {
                tick.tick().await;
                core.prune();
                limiter_state.rate_limits.prune();
                limiter_state.lookup_limits.prune();
            }
        })
    };

    // Keys a crash left in transit between shards reach their borrower: now, then
    // periodically (a transfer interrupted while running is resent the same way).
    let settler = {
        let core = core.clone();
        let every = Duration::from_millis(settings.products.settle_interval_ms);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                core.settle_transfers().await;
                core.resolve_holds().await;
                core.resolve_coupon_holds().await;
            }
        })
    };

    // Merchant webhooks: one delivery worker per endpoint, off the order path.
    let webhook_workers = crate::webhooks::spawn(core.clone());
    let mut background = vec![pruner, settler, webhook_workers];
    let mut cluster = None;
    if let (Some((js, joined)), Some(shared)) = (cluster_js, shared_catalogue) {
        // Forwarded requests carry a token only the cluster's nodes can make.
        let secret = core.storage().lookup_secret().map_err(|e| StartError::Recovery(format!("lookup secret: {e}")))?;
        let token = crate::domain::signature::buyer_token(&secret, "kami cluster forwarding");
        let node = crate::core::cluster::ClusterNode::join(
            &js,
            &settings.cluster,
            core.clone(),
            token,
            settings.request_timeout(),
        )
        .await
        .map_err(|error| StartError::Storage { path: settings.storage.jetstream.urls.clone(), error })?;
        state.set_cluster(node.clone());
        let _ = joined.set(node.clone());
        background.push(tokio::spawn(crate::core::cluster::ClusterNode::learn(core.clone(), shared)));
        cluster = Some(node);
    }
    if archiving {
        background.push(spawn_archiver(core.storage().clone(), clock.clone(), &settings.backup));
    }

    Ok(RunningApp {
        addr,
        secrets,
        core: Some(core),
        state,
        storage: storage_weak,
        data_path: settings.storage.path.clone(),
        recovery,
        stop_server: Some(stop_tx),
        server: Some(server),
        background,
        grace: Duration::from_secs(settings.server.shutdown_grace_secs),
        actors: Some(actors),
        writer_lease,
        cluster,
    })
}

/// Continuous archiving (`backup.archive_dir`): a round every
/// `archive_interval_ms` on a blocking thread (one at a time), its lag exported.
fn spawn_archiver(
    storage: Arc<Storage>,
    clock: Arc<dyn Clock>,
    settings: &crate::config::BackupSettings,
) -> tokio::task::JoinHandle<()> {
    let interval = Duration::from_millis(settings.archive_interval_ms);
    let archive = crate::storage::backup::Archive::new(
        settings.archive_dir.clone(),
        settings.full_every_secs * 1000,
        settings.keep_full,
    );
    let started_ms = clock.now_ms();
    tokio::spawn(async move {
        let archive = Arc::new(std::sync::Mutex::new(archive));
        loop {
            let (storage, archive_ref, now_ms) = (storage.clone(), archive.clone(), clock.now_ms());
            // Each round on a thread of its own at a lower priority: the sale keeps the cores.
            let (tx, rx) = tokio::sync::oneshot::channel();
            let spawned = crate::storage::backup::in_background("kami-archive", move || {
                let mut a = archive_ref.lock().unwrap_or_else(|e| e.into_inner());
                let round = storage.archive_round(&mut a, now_ms);
                let _ = tx.send((round, a.current_as_of_ms()));
            });
            let round = match spawned {
                Ok(_) => rx.await.map_err(|_| "the round's thread ended without an answer".to_string()),
                Err(e) => Err(e.to_string()),
            };
            let as_of = match round {
                Ok((Ok(round), as_of)) => {
                    if !matches!(round, crate::storage::backup::Round::Current) {
                        tracing::debug!(?round, "archive: shipped");
                    }
                    as_of
                }
                Ok((Err(e), as_of)) => {
                    tracing::warn!(error = %e, "archive: round failed; retried next interval");
                    as_of
                }
                Err(e) => {
                    tracing::warn!(error = %e, "archive: round stopped");
                    None
                }
            };
            let lag_ms = clock.now_ms().saturating_sub(as_of.unwrap_or(started_ms));
            metrics::gauge!("kami_backup_lag_seconds").set(lag_ms as f64 / 1000.0);
            tokio::time::sleep(interval).await;
        }
    })
}

/// Whether one server on the jetstream backend keeps its points and coupon ledgers
/// in the stream (`meta/ledger-backend`). Recorded at the first start of this
/// version: in the stream, unless the data directory holds ledger records already
/// (kept here then, as before: their history cannot move to the stream).
fn ledgers_in_stream(storage: &Storage) -> Result<bool, crate::storage::StorageError> {
    use crate::domain::{coupon::CouponBook, points::PointsBook};
    use crate::storage::Ledger;
    if let Some(recorded) = storage.ledger_backend()? {
        return Ok(recorded == "stream");
    }
    let mut held_here = false;
    for shard in 0..crate::actors::points::POINTS_SHARDS {
        held_here |= storage.inspect_ledger::<PointsBook>(shard)?.book.seq() > 0;
    }
    for shard in 0..crate::actors::coupons::COUPON_SHARDS {
        held_here |= storage.inspect_ledger::<CouponBook>(shard)?.book.seq() > 0;
    }
    if held_here {
        tracing::warn!("points and coupons stay in storage.path: this data directory holds their records already");
    }
    storage.keep_ledgers_in(if held_here { "local" } else { "stream" })?;
    Ok(!held_here)
}
