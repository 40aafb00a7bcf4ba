//! Layered configuration: compiled-in `config/default.toml` < `config/<profile>.toml`
//! < `--config FILE` < `KAMI_<SECTION>__<KEY>` environment variables < programmatic
//! overrides (tests). Unknown keys inside a section and out-of-range values stop
//! start-up with a message naming the key.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use config::{Config, Environment, File, FileFormat};
use serde::Deserialize;

pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

#[derive(Debug, Clone, Deserialize)]
pub struct Settings {
    pub server: ServerSettings,
    pub storage: StorageSettings,
    pub actors: ActorSettings,
    pub admin: AdminSettings,
    pub products: ProductSettings,
    pub groups: GroupSettings,
    pub keys: KeySettings,
    pub orders: OrderSettings,
    pub payments: PaymentSettings,
    pub rate_limits: RateLimitSettings,
    pub chaos: ChaosSettings,
    pub log: LogSettings,
    pub ops: OpsSettings,
    pub buyers: BuyerSettings,
    pub lookup: LookupSettings,
    pub webhooks: WebhookSettings,
    pub backup: BackupSettings,
    #[serde(default)]
    pub cluster: ClusterSettings,
}

/// Several servers sharing one stream (`storage.backend = "jetstream"`), each
/// serving the shards whose leases it holds (`cluster`). Off while `node` is empty.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterSettings {
    /// This server's name in the cluster (letters, digits, `-`, `_`), unique.
    pub node: String,
    /// The address other nodes send this node's requests to (`http://host:port`).
    pub advertise: String,
    /// Answer a request for a shard served elsewhere with 307 and the owner's
    /// address instead of forwarding it.
    pub redirect: bool,
    /// How long a dead node's shards wait before another node takes them over.
    pub lease_ttl_ms: u64,
}

impl Default for ClusterSettings {
    fn default() -> Self {
        ClusterSettings { node: String::new(), advertise: String::new(), redirect: false, lease_ttl_ms: 3_000 }
    }
}

impl ClusterSettings {
    pub fn enabled(&self) -> bool {
        !self.node.is_empty()
    }
}

/// Continuous archiving (`storage::backup::Archive`): off while `archive_dir` is empty.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupSettings {
    /// Where full backups and increments go (best on another disk or a mount of
    /// another machine); empty: no continuous archiving.
    pub archive_dir: PathBuf,
    /// How often what became durable is shipped (an increment).
    pub archive_interval_ms: u64,
    /// How often a full backup starts a new chain.
    pub full_every_secs: u64,
    /// Full backups kept, with the increments after the oldest of them.
    pub keep_full: usize,
}

/// Merchant webhooks: where order events are sent, and how hard to try.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSettings {
    /// How often a delivery worker looks for new journal records.
    pub poll_ms: u64,
    /// Most journal records read at once per journal.
    pub max_batch: usize,
    /// The first retry waits this long; each next one twice as long...
    pub backoff_base_ms: u64,
    /// ...up to this.
    pub backoff_max_ms: u64,
    /// Consecutive failures that open an endpoint's breaker (no calls for a backoff).
    pub breaker_failures: u32,
    /// Journal records waiting for an endpoint past which the status page and
    /// `kami_webhook_backlog_exceeded` say so (nothing pending is ever dropped).
    pub max_pending_records: u64,
    /// Most endpoints added through the admin API.
    pub max_endpoints: usize,
    /// `stock.low` is sent when a product's available keys fall to this many...
    pub low_stock_threshold: u64,
    /// ...or to its own threshold here (product id → keys).
    #[serde(default)]
    pub low_stock: BTreeMap<String, u64>,
    #[serde(default)]
    pub endpoints: BTreeMap<String, EndpointSettings>,
    /// A PEM file of extra root certificates trusted for https:// endpoints, besides
    /// the public roots (a receiver behind a private CA). Empty = none.
    #[serde(default)]
    pub ca_file: String,
}

/// One webhook endpoint from the configuration (`[webhooks.endpoints.<name>]`).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct EndpointSettings {
    pub url: String,
    pub secret: String,
    /// Event types sent; empty: all. A list, or one string of names separated by
    /// commas (what an environment variable can hold).
    #[serde(default, deserialize_with = "list_or_commas")]
    pub events: Vec<String>,
    /// Whether `order.delivered` carries the keys.
    #[serde(default)]
    pub include_keys: bool,
    #[serde(default = "default_webhook_timeout_ms")]
    pub timeout_ms: u64,
    /// An event failing for this long is given up on (dead letter).
    #[serde(default = "default_retry_horizon_secs")]
    pub retry_horizon_secs: u64,
    /// Journals sent to at once.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: u32,
}

fn list_or_commas<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        List(Vec<String>),
        Commas(String),
    }
    Ok(match Either::deserialize(d)? {
        Either::List(v) => v,
        Either::Commas(s) => s.split(',').map(str::trim).filter(|t| !t.is_empty()).map(str::to_string).collect(),
    })
}

fn default_webhook_timeout_ms() -> u64 {
    5_000
}
fn default_retry_horizon_secs() -> u64 {
    86_400
}
fn default_max_in_flight() -> u32 {
    4
}

impl EndpointSettings {
    /// What is wrong with it (`None`: nothing).
    pub fn problem(&self) -> Option<String> {
        let scheme_ok = self.url.starts_with("http://") || self.url.starts_with("https://");
        if !scheme_ok || self.url.len() > 2048 {
            return Some("url must be an http:// or https:// URL of at most 2048 bytes".into());
        }
        if self.secret.len() < 16 || self.secret.len() > 256 {
            return Some("secret must be 16..=256 bytes".into());
        }
        if let Some(bad) = self.events.iter().find(|e| crate::domain::webhook::EventType::parse(e).is_none()) {
            return Some(format!("events: unknown event type {bad:?}"));
        }
        if !(1..=60_000).contains(&self.timeout_ms) {
            return Some("timeout_ms must be 1..=60000".into());
        }
        if !(1..=30 * 86_400).contains(&self.retry_horizon_secs) {
            return Some("retry_horizon_secs must be 1..=2592000 (30 days)".into());
        }
        if !(1..=64).contains(&self.max_in_flight) {
            return Some("max_in_flight must be 1..=64".into());
        }
        None
    }
}

/// What a webhook endpoint's name may be: 1..=64 of `[a-z0-9_-]`.
pub fn valid_endpoint_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// Buyer order lookup: hashing query passwords and the route's own rate limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LookupSettings {
    /// 0: one per core.
    pub max_parallel_hashes: usize,
    pub max_waiting_hashes: usize,
    pub per_ip_per_minute: u32,
    pub per_ip_burst: u32,
    pub per_buyer_per_minute: u32,
    pub per_buyer_burst: u32,
    pub max_tracked: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpsSettings {
    /// Empty: `/metrics` and `/status.json` answer anyone.
    pub token: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuyerSettings {
    /// Key of the buyer tokens storefronts pass (`X-Buyer-Token`); empty: derived
    /// from the admin token.
    pub token_secret: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSettings {
    pub listen: SocketAddr,
    pub max_body_bytes: usize,
    pub request_timeout_ms: u64,
    pub max_concurrent_requests: usize,
    pub reserved_notify_slots: usize,
    pub max_connections: usize,
    pub max_buffered_body_bytes: u64,
    pub header_read_timeout_ms: u64,
    pub body_timeout_ms: u64,
    pub idle_timeout_secs: u64,
    pub max_header_bytes: usize,
    pub shutdown_grace_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageSettings {
    pub path: PathBuf,
    pub cache_capacity_bytes: u64,
    pub max_pending_commits: usize,
    pub max_commit_batch: usize,
    pub commit_linger_us: u64,
    /// How long a flush that follows the last one within this time waits for more
    /// writers (0 = never): under load, fewer and larger flushes.
    pub commit_busy_linger_us: u64,
    pub snapshot_min_journal_bytes: u64,
    /// Where stock shards' journals and snapshots are kept: `local` (in `path`)
    /// or `jetstream` (a replicated NATS JetStream stream, `[storage.jetstream]`).
    pub backend: StorageBackend,
    pub jetstream: JetStreamSettings,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StorageBackend {
    Local,
    Jetstream,
}

/// The replicated stream stock journals live in with `storage.backend = "jetstream"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JetStreamSettings {
    /// Servers, comma-separated (`nats://host:port`, any of the cluster's).
    pub urls: String,
    /// The stream's name (snapshots go to `{stream}_SNAP`).
    pub stream: String,
    /// Copies the servers keep of every message: 1, 3 or 5.
    pub replicas: usize,
    /// Longest a publish, read or purge may take before it counts as failed.
    pub timeout_ms: u64,
    /// Wait for the stream's writer lease as long as another server holds it
    /// (answering 503 meanwhile), and take the stream over when that server dies or
    /// stops, instead of refusing to start.
    #[serde(default)]
    pub standby: bool,
}

impl JetStreamSettings {
    pub fn options(&self) -> crate::storage::jetstream::JetStreamOptions {
        crate::storage::jetstream::JetStreamOptions {
            urls: self.urls.split(',').map(|u| u.trim().to_string()).filter(|u| !u.is_empty()).collect(),
            stream: self.stream.clone(),
            replicas: self.replicas,
            timeout: std::time::Duration::from_millis(self.timeout_ms),
            ..Default::default()
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActorSettings {
    pub arbiters: usize,
    pub mailbox_capacity: usize,
    pub max_queue_wait_ms: u64,
    pub transparent_huge_pages: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSettings {
    pub token: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProductSettings {
    pub max_shards: u16,
    /// Most keys one transfer moves from a shard to a dry sibling.
    pub max_transfer_keys: usize,
    /// How often unsettled transfers (left by a crash) are resent.
    pub settle_interval_ms: u64,
}

/// Group-buy limits (a deal's terms are set per product through the API).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupSettings {
    /// Largest `group_size` a deal may ask for (at most 1000).
    pub max_group_size: u32,
    /// Longest `time_limit_secs` a deal may give a group to fill (at most 7 days).
    pub max_time_limit_secs: u64,
    /// Deals one product may carry.
    pub max_deals_per_product: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeySettings {
    pub max_import_bytes: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrderSettings {
    pub ttl_secs: u64,
    pub max_quantity: u32,
    pub expiry_tick_ms: u64,
    pub max_expired_per_tick: usize,
    pub idempotency_ttl_secs: u64,
    pub max_idempotency_keys: usize,
    pub archive_after_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PaymentSettings {
    pub max_skew_secs: u64,
    pub default_channel: String,
    pub max_nonces: usize,
    pub query_after_ms: u64,
    pub query_max_interval_ms: u64,
    pub query_grace_secs: u64,
    pub sweep_interval_ms: u64,
    pub max_unheard_per_shard: usize,
    pub refund_max_interval_ms: u64,
    pub max_calls_in_flight: usize,
    pub health_interval_ms: u64,
    pub breaker: BreakerSettings,
    pub channels: BTreeMap<String, ChannelSettings>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerSettings {
    pub max_consecutive_failures: u32,
    pub failure_rate_percent: u32,
    pub min_calls: u32,
    pub window_ms: u64,
    pub cooldown_ms: u64,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ChannelKind {
    /// The sandbox gateway; the endpoint is optional.
    Sandbox,
    /// Any gateway speaking the channel protocol; the endpoint is required.
    Http,
    /// Alipay (支付宝) open platform: RSA2-signed page pay, notifications, query, refund.
    Alipay,
    /// WeChat Pay (微信支付) API v3: Native orders, signed and encrypted notifications.
    Wechatpay,
    /// Stripe: Checkout Sessions, signed webhooks, PaymentIntent search, refunds.
    Stripe,
}

impl ChannelKind {
    /// Whether the channel speaks a real gateway's own protocol (src/payments/adapter.rs)
    /// rather than kami's channel protocol.
    pub fn is_adapter(self) -> bool {
        matches!(self, ChannelKind::Alipay | ChannelKind::Wechatpay | ChannelKind::Stripe)
    }

    /// The gateway's production base URL, used when `endpoint` is empty.
    pub fn default_endpoint(self) -> Option<&'static str> {
        match self {
            ChannelKind::Alipay => Some("https://openapi.alipay.com/gateway.do"),
            ChannelKind::Wechatpay => Some("https://api.mch.weixin.qq.com"),
            ChannelKind::Stripe => Some("https://api.stripe.com"),
            ChannelKind::Sandbox | ChannelKind::Http => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ChannelKind::Sandbox => "sandbox",
            ChannelKind::Http => "http",
            ChannelKind::Alipay => "alipay",
            ChannelKind::Wechatpay => "wechatpay",
            ChannelKind::Stripe => "stripe",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelSettings {
    #[serde(default = "sandbox_kind")]
    pub kind: ChannelKind,
    /// The channel protocol's HMAC secret (kinds `sandbox` and `http`); empty = generated.
    #[serde(default)]
    pub secret: String,
    /// Base URL of the channel's gateway (`http://...` or `https://...`); empty = none
    /// (no pay URL), or the gateway's production URL for kinds alipay, wechatpay, stripe.
    #[serde(default)]
    pub endpoint: String,
    /// Alipay: the app's `app_id`; WeChat Pay: the `appid` the merchant is bound to.
    #[serde(default)]
    pub app_id: String,
    /// WeChat Pay: the merchant id (`mchid`).
    #[serde(default)]
    pub merchant_id: String,
    /// WeChat Pay: the serial number of the merchant's API certificate (`serial_no`).
    #[serde(default)]
    pub merchant_serial: String,
    /// Alipay, WeChat Pay: the merchant's RSA private key (PEM, PKCS#8 or PKCS#1, or
    /// the bare base64 Alipay's key tool writes). Never logged.
    #[serde(default)]
    pub private_key_file: String,
    /// Alipay: Alipay's public key; WeChat Pay: the platform public key (微信支付公钥).
    #[serde(default)]
    pub platform_public_key_file: String,
    /// WeChat Pay: the platform public key's id (`PUB_KEY_ID_...`), sent as `Wechatpay-Serial`.
    #[serde(default)]
    pub platform_key_id: String,
    /// WeChat Pay: a file holding the 32-byte APIv3 key. Never logged.
    #[serde(default)]
    pub apiv3_key_file: String,
    /// Stripe: a file holding the secret API key (`sk_...`). Never logged.
    #[serde(default)]
    pub secret_key_file: String,
    /// Stripe: a file holding the webhook signing secret(s) (`whsec_...`), one per
    /// line: during a rotation both are accepted.
    #[serde(default)]
    pub webhook_secret_file: String,
    /// Alipay, WeChat Pay: where the gateway sends its notifications (kami's public
    /// `https://.../api/v1/payments/{name}/notify`).
    #[serde(default)]
    pub notify_url: String,
    /// Alipay: where the buyer returns after paying; Stripe: `success_url` (both optional
    /// for Alipay, required for Stripe).
    #[serde(default)]
    pub return_url: String,
    /// Stripe: the currency of prices (ISO code, lowercase); WeChat Pay is always CNY.
    #[serde(default = "default_currency")]
    pub currency: String,
    /// Lower values are preferred among equally healthy channels.
    #[serde(default)]
    pub priority: u32,
    #[serde(default = "one")]
    pub weight: u32,
    #[serde(default = "two_secs")]
    pub timeout_ms: u64,
    #[serde(default = "hundred")]
    pub queries_per_sec: u32,
}

impl ChannelSettings {
    /// The first setting a channel of a real gateway's kind is missing, with why.
    /// (Whether the files can be read and hold keys is checked when kami starts.)
    pub fn adapter_problem(&self) -> Option<(&'static str, String)> {
        let need = |value: &str, field: &'static str, what: &str| {
            value
                .trim()
                .is_empty()
                .then(|| (field, format!("is required for kind = \"{}\" ({what})", self.kind.as_str())))
        };
        match self.kind {
            ChannelKind::Sandbox | ChannelKind::Http => None,
            ChannelKind::Alipay => need(&self.app_id, "app_id", "the app's id")
                .or_else(|| need(&self.private_key_file, "private_key_file", "the app's RSA private key"))
                .or_else(|| need(&self.platform_public_key_file, "platform_public_key_file", "Alipay's public key"))
                .or_else(|| need(&self.notify_url, "notify_url", "kami's public notify URL")),
            ChannelKind::Wechatpay => need(&self.app_id, "app_id", "the appid")
                .or_else(|| need(&self.merchant_id, "merchant_id", "the mchid"))
                .or_else(|| need(&self.merchant_serial, "merchant_serial", "the API certificate's serial"))
                .or_else(|| need(&self.private_key_file, "private_key_file", "the merchant's RSA private key"))
                .or_else(|| need(&self.platform_public_key_file, "platform_public_key_file", "the platform public key"))
                .or_else(|| need(&self.platform_key_id, "platform_key_id", "the platform public key's id"))
                .or_else(|| need(&self.apiv3_key_file, "apiv3_key_file", "the APIv3 key"))
                .or_else(|| need(&self.notify_url, "notify_url", "kami's public notify URL")),
            ChannelKind::Stripe => need(&self.secret_key_file, "secret_key_file", "the secret API key")
                .or_else(|| need(&self.webhook_secret_file, "webhook_secret_file", "the webhook signing secret"))
                .or_else(|| need(&self.return_url, "return_url", "Checkout's success_url"))
                .or_else(|| {
                    let ok =
                        (3..=3).contains(&self.currency.len()) && self.currency.bytes().all(|b| b.is_ascii_lowercase());
                    (!ok).then(|| ("currency", "must be a lowercase ISO 4217 code like usd".to_string()))
                }),
        }
    }
}

fn default_currency() -> String {
    "cny".into()
}

fn sandbox_kind() -> ChannelKind {
    ChannelKind::Sandbox
}
fn one() -> u32 {
    1
}
fn two_secs() -> u64 {
    2000
}
fn hundred() -> u32 {
    100
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitSettings {
    pub enabled: bool,
    pub per_ip_per_sec: u32,
    pub per_ip_burst: u32,
    pub per_buyer_per_sec: u32,
    pub per_buyer_burst: u32,
    pub max_tracked_ips: usize,
    pub max_tracked_buyers: usize,
    #[serde(default)]
    pub tiers: BTreeMap<String, TierSettings>,
}

impl RateLimitSettings {
    /// The limits of requests without an API key.
    pub fn default_tier(&self) -> TierLimits {
        TierLimits {
            per_ip_per_sec: self.per_ip_per_sec,
            per_ip_burst: self.per_ip_burst,
            per_buyer_per_sec: self.per_buyer_per_sec,
            per_buyer_burst: self.per_buyer_burst,
        }
    }
}

/// A named tier, selected by `X-Api-Key: <api_key>`. A reseller's tier carries
/// its price list: a unit price per product (`unit_prices`), and a percentage of
/// the public price for the products it does not name (`price_percent`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierSettings {
    pub api_key: String,
    pub per_ip_per_sec: u32,
    pub per_ip_burst: u32,
    pub per_buyer_per_sec: u32,
    pub per_buyer_burst: u32,
    #[serde(default)]
    pub price_percent: Option<u32>,
    #[serde(default)]
    pub unit_prices: BTreeMap<String, u64>,
}

impl TierSettings {
    /// The tier's price list, if it has one.
    pub fn prices(&self, name: &str) -> Option<crate::domain::pricing::ResellerPrices> {
        (self.price_percent.is_some() || !self.unit_prices.is_empty()).then(|| crate::domain::pricing::ResellerPrices {
            name: name.to_string(),
            percent: self.price_percent,
            unit_prices: self.unit_prices.clone(),
        })
    }

    pub fn limits(&self) -> TierLimits {
        TierLimits {
            per_ip_per_sec: self.per_ip_per_sec,
            per_ip_burst: self.per_ip_burst,
            per_buyer_per_sec: self.per_buyer_per_sec,
            per_buyer_burst: self.per_buyer_burst,
        }
    }
}

#[derive(Debug, Clone)]
pub struct TierLimits {
    pub per_ip_per_sec: u32,
    pub per_ip_burst: u32,
    pub per_buyer_per_sec: u32,
    pub per_buyer_burst: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChaosSettings {
    pub enabled: bool,
    pub crash_point: crate::chaos::CrashPoint,
    pub crash_after_hits: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    pub level: String,
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Load(#[from] config::ConfigError),
    #[error("configuration: `{key}` {problem}")]
    Invalid { key: &'static str, problem: String },
}

/// Where settings come from, lowest precedence first.
#[derive(Debug, Default, Clone)]
pub struct Sources {
    /// Loads `config/<profile>.toml` relative to the working directory (must exist).
    pub profile: Option<String>,
    pub file: Option<PathBuf>,
    /// Read `KAMI_*` environment variables (the binary does; tests usually do not).
    pub environment: bool,
    /// `("orders.ttl_secs", "1")`-style overrides, highest precedence.
    pub overrides: Vec<(String, String)>,
}

impl Settings {
    pub fn load(sources: &Sources) -> Result<Settings, ConfigError> {
        let mut b = Config::builder().add_source(File::from_str(DEFAULT_TOML, FileFormat::Toml));
        if let Some(profile) = &sources.profile {
            let path = Path::new("config").join(format!("{profile}.toml"));
            b = b.add_source(File::from(path).format(FileFormat::Toml).required(true));
        }
        if let Some(file) = &sources.file {
            b = b.add_source(File::from(file.as_path()).format(FileFormat::Toml).required(true));
        }
        if sources.environment {
            b = b.add_source(Environment::with_prefix("KAMI").prefix_separator("_").separator("__").try_parsing(true));
        }
        for (k, v) in &sources.overrides {
            b = b.set_override(k.as_str(), v.as_str())?;
        }
        let settings: Settings = b.build()?.try_deserialize()?;
        settings.validate()?;
        Ok(settings)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        fn check(ok: bool, key: &'static str, problem: &str) -> Result<(), ConfigError> {
            if ok {
                Ok(())
            } else {
                Err(ConfigError::Invalid { key, problem: problem.into() })
            }
        }
        check(self.server.max_body_bytes >= 1024, "server.max_body_bytes", "must be at least 1024")?;
        check(self.server.request_timeout_ms >= 1, "server.request_timeout_ms", "must be at least 1")?;
        check(self.server.max_concurrent_requests >= 1, "server.max_concurrent_requests", "must be at least 1")?;
        check(self.server.max_connections >= 1, "server.max_connections", "must be at least 1")?;
        check(
            self.server.max_buffered_body_bytes >= self.server.max_body_bytes as u64
                && self.server.max_buffered_body_bytes >= self.keys.max_import_bytes as u64,
            "server.max_buffered_body_bytes",
            "must be at least server.max_body_bytes and keys.max_import_bytes",
        )?;
        check(
            self.orders.archive_after_secs >= self.payments.query_grace_secs,
            "orders.archive_after_secs",
            "must be at least payments.query_grace_secs (an order is asked about until then)",
        )?;
        check(self.server.header_read_timeout_ms >= 1, "server.header_read_timeout_ms", "must be at least 1")?;
        check(self.server.body_timeout_ms >= 1, "server.body_timeout_ms", "must be at least 1")?;
        check(self.server.idle_timeout_secs >= 1, "server.idle_timeout_secs", "must be at least 1")?;
        check(
            (8192..=1 << 20).contains(&self.server.max_header_bytes),
            "server.max_header_bytes",
            "must be 8192..=1048576",
        )?;
        check(self.storage.max_pending_commits >= 1, "storage.max_pending_commits", "must be at least 1")?;
        check(self.storage.max_commit_batch >= 1, "storage.max_commit_batch", "must be at least 1")?;
        check(self.storage.commit_linger_us <= 100_000, "storage.commit_linger_us", "must be at most 100000")?;
        check(
            self.storage.commit_busy_linger_us <= 100_000,
            "storage.commit_busy_linger_us",
            "must be at most 100000",
        )?;
        if self.storage.backend == StorageBackend::Jetstream {
            let js = &self.storage.jetstream;
            check(!js.options().urls.is_empty(), "storage.jetstream.urls", "must name at least one server")?;
            check(
                !js.stream.is_empty() && js.stream.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'),
                "storage.jetstream.stream",
                "must be letters, digits, '_' or '-'",
            )?;
            check([1, 3, 5].contains(&js.replicas), "storage.jetstream.replicas", "must be 1, 3 or 5")?;
            check((100..=60_000).contains(&js.timeout_ms), "storage.jetstream.timeout_ms", "must be 100..=60000")?;
            check(
                self.webhooks.endpoints.is_empty(),
                "webhooks.endpoints",
                "the event feed reads local journals: not with storage.backend = \"jetstream\"",
            )?;
            check(
                self.backup.archive_dir.as_os_str().is_empty(),
                "backup.archive_dir",
                "continuous archiving reads local journals: not with storage.backend = \"jetstream\"",
            )?;
        }
        if self.cluster.enabled() {
            let c = &self.cluster;
            check(
                self.storage.backend == StorageBackend::Jetstream,
                "cluster.node",
                "a cluster shares a stream: set storage.backend = \"jetstream\"",
            )?;
            check(
                c.node.len() <= 64 && c.node.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'),
                "cluster.node",
                "must be at most 64 letters, digits, '_' or '-'",
            )?;
            check(
                (c.advertise.starts_with("http://") || c.advertise.starts_with("https://"))
                    && reqwest::Url::parse(&c.advertise).is_ok(),
                "cluster.advertise",
                "must be this node's address for the other nodes, like http://10.0.0.5:8080",
            )?;
            check((1_000..=60_000).contains(&c.lease_ttl_ms), "cluster.lease_ttl_ms", "must be 1000..=60000")?;
            check(
                !self.storage.jetstream.standby,
                "storage.jetstream.standby",
                "a cluster node never waits as a standby",
            )?;
        }
        check(self.actors.arbiters <= 1024, "actors.arbiters", "must be at most 1024")?;
        check(
            (1..=1_000_000).contains(&self.actors.mailbox_capacity),
            "actors.mailbox_capacity",
            "must be 1..=1000000",
        )?;
        check(self.actors.max_queue_wait_ms <= 600_000, "actors.max_queue_wait_ms", "must be at most 600000")?;
        check(!self.admin.token.contains(char::is_whitespace), "admin.token", "must not contain white space")?;
        check(
            self.ops.token.bytes().all(|b| b.is_ascii_graphic()),
            "ops.token",
            "must be visible ASCII without white space",
        )?;
        check((1..=1024).contains(&self.products.max_shards), "products.max_shards", "must be 1..=1024")?;
        check(
            (1..=crate::domain::shard::MAX_KEYS_PER_EVENT).contains(&self.products.max_transfer_keys),
            "products.max_transfer_keys",
            "must be 1..=4096",
        )?;
        check(self.products.settle_interval_ms >= 10, "products.settle_interval_ms", "must be at least 10")?;
        check(
            (2..=crate::domain::group::MAX_GROUP_SIZE).contains(&self.groups.max_group_size),
            "groups.max_group_size",
            "must be 2..=1000",
        )?;
        check(
            (1..=crate::domain::group::MAX_TIME_LIMIT_SECS).contains(&self.groups.max_time_limit_secs),
            "groups.max_time_limit_secs",
            "must be 1..=604800",
        )?;
        check(
            (1..=1024).contains(&self.groups.max_deals_per_product),
            "groups.max_deals_per_product",
            "must be 1..=1024",
        )?;
        let l = &self.lookup;
        check(l.max_parallel_hashes <= 1024, "lookup.max_parallel_hashes", "must be at most 1024")?;
        check(l.max_waiting_hashes <= 1_000_000, "lookup.max_waiting_hashes", "must be at most 1000000")?;
        for (value, key) in [
            (l.per_ip_per_minute, "lookup.per_ip_per_minute"),
            (l.per_ip_burst, "lookup.per_ip_burst"),
            (l.per_buyer_per_minute, "lookup.per_buyer_per_minute"),
            (l.per_buyer_burst, "lookup.per_buyer_burst"),
        ] {
            check(value >= 1, key, "must be at least 1")?;
        }
        check(l.max_tracked >= 1, "lookup.max_tracked", "must be at least 1")?;
        let w = &self.webhooks;
        let b = &self.backup;
        check(
            (100..=3_600_000).contains(&b.archive_interval_ms),
            "backup.archive_interval_ms",
            "must be 100..=3600000",
        )?;
        check((60..=31_536_000).contains(&b.full_every_secs), "backup.full_every_secs", "must be 60..=31536000")?;
        check((1..=1_000).contains(&b.keep_full), "backup.keep_full", "must be 1..=1000")?;
        check((10..=60_000).contains(&w.poll_ms), "webhooks.poll_ms", "must be 10..=60000")?;
        check((1..=10_000).contains(&w.max_batch), "webhooks.max_batch", "must be 1..=10000")?;
        check(w.backoff_base_ms >= 1, "webhooks.backoff_base_ms", "must be at least 1")?;
        check(w.backoff_max_ms >= w.backoff_base_ms, "webhooks.backoff_max_ms", "must be at least backoff_base_ms")?;
        check(w.breaker_failures >= 1, "webhooks.breaker_failures", "must be at least 1")?;
        check(w.max_pending_records >= 1, "webhooks.max_pending_records", "must be at least 1")?;
        check((1..=1_000).contains(&w.max_endpoints), "webhooks.max_endpoints", "must be 1..=1000")?;
        for (name, e) in &w.endpoints {
            if !valid_endpoint_name(name) {
                return Err(ConfigError::Invalid {
                    key: "webhooks.endpoints",
                    problem: format!("{name:?}: a name is 1..=64 of a-z, 0-9, _ and -"),
                });
            }
            if let Some(problem) = e.problem() {
                return Err(ConfigError::Invalid { key: "webhooks.endpoints", problem: format!("{name}.{problem}") });
            }
        }
        check(self.keys.max_import_bytes >= 1024, "keys.max_import_bytes", "must be at least 1024")?;
        check(self.orders.ttl_secs >= 1, "orders.ttl_secs", "must be at least 1")?;
        check(self.orders.ttl_secs <= 30 * 86400, "orders.ttl_secs", "must be at most 30 days")?;
        check((1..=10_000).contains(&self.orders.max_quantity), "orders.max_quantity", "must be 1..=10000")?;
        check(
            (10..=1000).contains(&self.orders.expiry_tick_ms),
            "orders.expiry_tick_ms",
            "must be 10..=1000 (orders expire within a second)",
        )?;
        check(self.orders.max_expired_per_tick >= 1, "orders.max_expired_per_tick", "must be at least 1")?;
        check(
            self.orders.idempotency_ttl_secs >= 86400,
            "orders.idempotency_ttl_secs",
            "must be at least 86400 (24 hours)",
        )?;
        check(self.orders.max_idempotency_keys >= 1, "orders.max_idempotency_keys", "must be at least 1")?;
        check(
            self.chaos.crash_point == crate::chaos::CrashPoint::None || self.chaos.enabled,
            "chaos.crash_point",
            "needs chaos.enabled = true",
        )?;
        check(self.chaos.crash_after_hits >= 1, "chaos.crash_after_hits", "must be at least 1")?;
        for (name, c) in &self.payments.channels {
            check(
                c.endpoint.is_empty() || c.endpoint.starts_with("http://") || c.endpoint.starts_with("https://"),
                "payments.channels.<name>.endpoint",
                "must be empty or an http:// or https:// URL",
            )?;
            if let Some((field, problem)) = c.adapter_problem() {
                let problem = format!("{name}.{field} {problem}");
                return Err(ConfigError::Invalid { key: "payments.channels", problem });
            }
            check(
                c.kind != ChannelKind::Http || !c.endpoint.is_empty(),
                "payments.channels.<name>.endpoint",
                "is required for kind = \"http\"",
            )?;
            check(c.weight <= 1_000_000, "payments.channels.<name>.weight", "must be at most 1000000")?;
            check((1..=600_000).contains(&c.timeout_ms), "payments.channels.<name>.timeout_ms", "must be 1..=600000")?;
            check(
                (1..=1_000_000).contains(&c.queries_per_sec),
                "payments.channels.<name>.queries_per_sec",
                "must be 1..=1000000",
            )?;
        }
        let p = &self.payments;
        check(p.query_after_ms >= 1, "payments.query_after_ms", "must be at least 1")?;
        check(
            p.query_max_interval_ms >= p.query_after_ms,
            "payments.query_max_interval_ms",
            "must be at least payments.query_after_ms",
        )?;
        check(p.query_grace_secs <= 30 * 86400, "payments.query_grace_secs", "must be at most 30 days")?;
        check((10..=600_000).contains(&p.sweep_interval_ms), "payments.sweep_interval_ms", "must be 10..=600000")?;
        check(
            (1..=1_000_000).contains(&p.max_unheard_per_shard),
            "payments.max_unheard_per_shard",
            "must be 1..=1000000",
        )?;
        check(p.refund_max_interval_ms >= 1, "payments.refund_max_interval_ms", "must be at least 1")?;
        check((1..=10_000).contains(&p.max_calls_in_flight), "payments.max_calls_in_flight", "must be 1..=10000")?;
        check((10..=3_600_000).contains(&p.health_interval_ms), "payments.health_interval_ms", "must be 10..=3600000")?;
        let b = &p.breaker;
        check(b.max_consecutive_failures >= 1, "payments.breaker.max_consecutive_failures", "must be at least 1")?;
        check((1..=100).contains(&b.failure_rate_percent), "payments.breaker.failure_rate_percent", "must be 1..=100")?;
        check((1..=10_000).contains(&b.min_calls), "payments.breaker.min_calls", "must be 1..=10000")?;
        check(b.window_ms >= 1, "payments.breaker.window_ms", "must be at least 1")?;
        check(b.cooldown_ms >= 1, "payments.breaker.cooldown_ms", "must be at least 1")?;
        check(self.payments.max_skew_secs >= 1, "payments.max_skew_secs", "must be at least 1")?;
        check(self.payments.max_nonces >= 1, "payments.max_nonces", "must be at least 1")?;
        check(
            self.payments.channels.contains_key(&self.payments.default_channel),
            "payments.default_channel",
            "must name a channel configured under payments.channels",
        )?;
        for name in self.payments.channels.keys() {
            if !crate::domain::validate::is_product_id(name) {
                return Err(ConfigError::Invalid {
                    key: "payments.channels",
                    problem: format!("channel name {name:?} must match [a-z0-9_-]{{1,64}}"),
                });
            }
        }
        let rl = &self.rate_limits;
        check(rl.max_tracked_ips >= 1, "rate_limits.max_tracked_ips", "must be at least 1")?;
        check(rl.max_tracked_buyers >= 1, "rate_limits.max_tracked_buyers", "must be at least 1")?;
        let tiers = std::iter::once(rl.default_tier()).chain(rl.tiers.values().map(TierSettings::limits));
        for t in tiers {
            check(t.per_ip_per_sec >= 1, "rate_limits.per_ip_per_sec", "must be at least 1 (in every tier)")?;
            check(t.per_ip_burst >= 1, "rate_limits.per_ip_burst", "must be at least 1 (in every tier)")?;
            check(t.per_buyer_per_sec >= 1, "rate_limits.per_buyer_per_sec", "must be at least 1 (in every tier)")?;
            check(t.per_buyer_burst >= 1, "rate_limits.per_buyer_burst", "must be at least 1 (in every tier)")?;
        }
        let mut keys = std::collections::BTreeSet::new();
        for (name, t) in &rl.tiers {
            check(t.api_key.len() >= 16, "rate_limits.tiers.<name>.api_key", "must be at least 16 characters")?;
            check(keys.insert(t.api_key.as_str()), "rate_limits.tiers.<name>.api_key", "must differ between tiers")?;
            if let Some(Err(problem)) = t.prices(name).map(|p| p.check()) {
                return Err(ConfigError::Invalid { key: "rate_limits.tiers", problem: format!("{name}.{problem}") });
            }
        }
        Ok(())
    }

    pub fn arbiters(&self) -> usize {
        match self.actors.arbiters {
            0 => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            n => n,
        }
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.server.request_timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(overrides: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        Settings::load(&Sources {
            overrides: overrides.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            ..Sources::default()
        })
    }

    #[test]
    fn defaults_match_the_contract() {
        let s = with(&[]).unwrap();
        assert_eq!(s.server.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(s.storage.path, PathBuf::from("./data"));
        assert_eq!(s.orders.ttl_secs, 300);
        assert_eq!(s.orders.max_quantity, 10);
        assert_eq!(s.payments.max_skew_secs, 300);
        assert!(!s.chaos.enabled);
        assert!(s.rate_limits.enabled);
        assert_eq!(s.server.max_body_bytes, 1 << 20);
        assert_eq!(s.keys.max_import_bytes, 16 << 20);
        assert!(s.payments.channels.contains_key("sandbox"));
    }

    #[test]
    fn invalid_values_name_the_key() {
        let e = with(&[("orders.ttl_secs", "0")]).unwrap_err().to_string();
        assert!(e.contains("orders.ttl_secs"), "{e}");
        let e = with(&[("orders.ttl_secs", "soon")]).unwrap_err().to_string();
        assert!(e.contains("ttl_secs"), "{e}");
        let e = with(&[("orders.ttl", "5")]).unwrap_err().to_string();
        assert!(e.contains("ttl"), "{e}");
        let e = with(&[("server.listen", "nowhere")]).unwrap_err().to_string();
        assert!(e.contains("listen"), "{e}");
        let tier = |extra: (&'static str, &'static str)| {
            with(&[
                ("rate_limits.tiers.acme.api_key", "a-long-random-secret"),
                ("rate_limits.tiers.acme.per_ip_per_sec", "1"),
                ("rate_limits.tiers.acme.per_ip_burst", "1"),
                ("rate_limits.tiers.acme.per_buyer_per_sec", "1"),
                ("rate_limits.tiers.acme.per_buyer_burst", "1"),
                extra,
            ])
        };
        let s = tier(("rate_limits.tiers.acme.unit_prices.vip", "800")).unwrap();
        let prices = s.rate_limits.tiers["acme"].prices("acme").expect("a price list");
        assert_eq!((prices.percent, prices.unit_prices.get("vip")), (None, Some(&800)));
        let e = tier(("rate_limits.tiers.acme.price_percent", "101")).unwrap_err().to_string();
        assert!(e.contains("rate_limits.tiers") && e.contains("acme.price_percent"), "{e}");
        let e = tier(("rate_limits.tiers.acme.unit_prices.vip", "0")).unwrap_err().to_string();
        assert!(e.contains("acme.unit_prices.vip"), "{e}");
    }
}
