use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// The order path allocates small, short-lived values on many threads (requests,
/// messages, replies): mimalloc serves those faster than glibc's malloc.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use kami::config::{Settings, Sources};

/// kami: a trading core for virtual goods. With no command it serves.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Extra configuration file (TOML), over config/default.toml.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Loads config/<PROFILE>.toml from the working directory.
    #[arg(long, global = true)]
    profile: Option<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the HTTP API (the default).
    Serve,
    /// Check a stopped server's data directory: no oversell, no key sold twice, stock adds up, payments accounted for, journals consistent.
    /// Changes nothing. Exit status: 0 ok, 1 violations found, 2 cannot read.
    Audit {
        /// The data directory (`storage.path` of the server).
        #[arg(long)]
        data: PathBuf,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Take an online backup of a running kami (a consistent cut; selling goes on)
    /// into a file, checked whole before it is kept. `kami backup verify FILE`
    /// checks a backup file.
    #[command(args_conflicts_with_subcommands = true)]
    Backup {
        #[command(subcommand)]
        action: Option<BackupAction>,
        /// The server, e.g. http://127.0.0.1:8080
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        url: String,
        /// The merchant's admin token.
        #[arg(long, env = "KAMI_ADMIN_TOKEN", hide_env_values = true, default_value = "")]
        admin_token: String,
        /// Where to write the backup (kept only once it verifies).
        #[arg(long)]
        to: Option<PathBuf>,
        /// Include the generated secrets (admin token, channel secrets kept in the
        /// data directory), sealed with the passphrase on this file's first line.
        #[arg(long)]
        passphrase_file: Option<PathBuf>,
    },
    /// Restore a backup into a new data directory (refused over a non-empty one);
    /// the backup is verified whole before anything is written.
    Restore {
        /// A backup file, or an archive directory (`backup.archive_dir`: full
        /// backups and increments).
        #[arg(long)]
        from: PathBuf,
        /// From an archive directory: the shop as of this time (RFC 3339), that is as
        /// of the newest cut at or before it. Default: the newest.
        #[arg(long)]
        until: Option<String>,
        /// The new data directory (`storage.path` of the server to start on it).
        #[arg(long)]
        data: PathBuf,
        /// Opens the sealed secrets (without it they are left out, and kami makes new ones).
        #[arg(long)]
        passphrase_file: Option<PathBuf>,
    },
    /// Run the sandbox payment gateway (demos and tests): buyers pay on it, it
    /// notifies kami, answers queries and refunds, and misbehaves on request.
    SandboxGateway {
        #[arg(long, default_value = "127.0.0.1:8090")]
        listen: std::net::SocketAddr,
        /// kami's notification endpoint, e.g. http://127.0.0.1:8080/api/v1/payments/sandbox/notify
        #[arg(long)]
        notify_url: String,
        /// The channel secret shared with kami (`payments.channels.sandbox.secret`;
        /// kind sandbox only).
        #[arg(long, env = "KAMI_SANDBOX_SECRET", default_value = "")]
        secret: String,
        /// Whose protocol to speak: sandbox (kami's own), alipay, wechatpay, stripe.
        #[arg(long, default_value = "sandbox")]
        kind: String,
        /// For alipay, wechatpay, stripe: where to write kami's key files (new keys are
        /// made at every start); the channel settings to paste are printed.
        #[arg(long, default_value = "sandbox-keys")]
        keys_dir: std::path::PathBuf,
        /// The channel's name in kami's configuration (for the printed settings).
        #[arg(long, default_value = "sandbox")]
        channel: String,
    },
    /// A webhook receiver for demos and tests: checks each delivery's
    /// X-Kami-Signature, keeps what it received (GET /received, GET /stats) and
    /// answers as told (POST /mode {"mode": "ok"|"fail"|"hang"|"slow", "delay_ms": N}).
    WebhookSink {
        #[arg(long, default_value = "127.0.0.1:8091")]
        listen: std::net::SocketAddr,
        /// The endpoint's secret (`webhooks.endpoints.<name>.secret`).
        #[arg(long, env = "KAMI_WEBHOOK_SECRET")]
        secret: String,
        /// Serve HTTPS with this certificate chain (PEM)...
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<std::path::PathBuf>,
        /// ...and its private key (PEM).
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<std::path::PathBuf>,
    },
    /// Flash-sale load: K keys, N buyers over C connections, each creating an order,
    /// paying it with a signed notification and reading the key. Prints throughput,
    /// latency per step and a verdict checked against the audit (exit 1 if it fails).
    Load {
        /// A running kami (needs --admin-token and --secret), or a cluster's nodes
        /// comma-separated (each buyer through one, in turn; the product is made and
        /// audited through the first); default: start one embedded in a temporary
        /// directory.
        #[arg(long)]
        url: Option<String>,
        #[arg(long, env = "KAMI_ADMIN__TOKEN", default_value = "")]
        admin_token: String,
        /// The channel notifications are signed for.
        #[arg(long, default_value = "sandbox")]
        channel: String,
        /// That channel's secret.
        #[arg(long, env = "KAMI_PAYMENTS__CHANNELS__SANDBOX__SECRET", default_value = "")]
        secret: String,
        /// Arbiters of the embedded kami (0 = one per core).
        #[arg(long, default_value_t = 0)]
        arbiters: usize,
        #[arg(long, default_value_t = 10_000)]
        keys: u64,
        #[arg(long, default_value_t = 20_000)]
        buyers: u64,
        #[arg(long, default_value_t = 256)]
        concurrency: u64,
        #[arg(long, default_value_t = 1)]
        shards: u16,
        #[arg(long, value_enum, default_value = "full")]
        mode: kami::load::Mode,
        /// Also write the results as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Also draw throughput and latency over time into this SVG file.
        #[arg(long)]
        chart: Option<PathBuf>,
        /// With --url: an API key of a rate-limit tier (`[rate_limits.tiers]`), sent as
        /// `X-Api-Key` with the buyers' requests.
        #[arg(long, env = "KAMI_LOAD_API_KEY")]
        api_key: Option<String>,
        /// Buyers refused with 503 `overloaded` wait as the answer says
        /// (`error.queue.estimated_wait_ms`) and try again (at most 20 attempts).
        #[arg(long)]
        retry_overloaded: bool,
    },
    /// The secrets kami generated and keeps in a data directory (`secrets.json`).
    Secrets {
        #[command(subcommand)]
        action: SecretsAction,
    },
    /// Print the X-Signature header value for a notification body read from stdin.
    Sign {
        /// The channel's secret.
        #[arg(long)]
        secret: String,
    },
}

#[derive(Subcommand)]
enum BackupAction {
    /// Check a backup file whole (every checksum, the digest at its end, every
    /// journal record) without writing anything. Exit status: 0 ok, 1 not valid.
    Verify { file: PathBuf },
}

#[derive(Subcommand)]
enum SecretsAction {
    /// Print them, one `key = value` a line.
    Show {
        /// The data directory (`storage.path` of the server).
        #[arg(long, default_value = "./data")]
        data: PathBuf,
    },
    /// Replace one kept secret with a fresh one and print it. A channel's old
    /// secret stays accepted on what its gateway signs for the grace period; the
    /// admin token is replaced at once. Takes effect when kami next starts.
    Rotate {
        /// The data directory (`storage.path` of the server).
        #[arg(long, default_value = "./data")]
        data: PathBuf,
        /// Rotate the merchant's admin token.
        #[arg(long, conflicts_with = "channel", required_unless_present = "channel")]
        admin_token: bool,
        /// Rotate this payment channel's shared secret.
        #[arg(long)]
        channel: Option<String>,
        /// How long the channel's old secret stays accepted, in hours (0: not at all).
        #[arg(long, default_value_t = 24)]
        grace_hours: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Serve) {
        Command::Sign { secret } => {
            let mut body = Vec::new();
            if let Err(e) = std::io::Read::read_to_end(&mut std::io::stdin(), &mut body) {
                eprintln!("kami sign: cannot read stdin: {e}");
                return ExitCode::from(2);
            }
            println!("{}", kami::domain::signature::sign(secret.as_bytes(), &body));
            ExitCode::SUCCESS
        }
        Command::Secrets { action: SecretsAction::Show { data } } => match kami::app::read_secrets(&data) {
            Err(e) => {
                eprintln!("kami secrets: {e}");
                ExitCode::from(2)
            }
            Ok(s) if s.admin_token.is_none() && s.channels.is_empty() => {
                eprintln!("kami secrets: no secrets kept in {}", kami::app::secrets_file(&data).display());
                ExitCode::from(1)
            }
            Ok(s) => {
                if let Some(token) = &s.admin_token {
                    println!("admin.token = {token}");
                }
                for (name, secret) in &s.channels {
                    println!("payments.channels.{name}.secret = {secret}");
                }
                for (name, old) in &s.retiring {
                    println!(
                        "payments.channels.{name}.secret (replaced, accepted until {}) = {}",
                        old.valid_until, old.secret
                    );
                }
                ExitCode::SUCCESS
            }
        },
        Command::Secrets { action: SecretsAction::Rotate { data, admin_token, channel, grace_hours } } => {
            let what = match (admin_token, channel) {
                (_, Some(name)) => kami::app::RotateWhat::Channel(name),
                _ => kami::app::RotateWhat::AdminToken,
            };
            let grace = std::time::Duration::from_secs(grace_hours.saturating_mul(3600));
            match kami::app::rotate_secret(&data, &what, grace, chrono::Utc::now()) {
                Err(e) => {
                    eprintln!("kami secrets rotate: {e}");
                    ExitCode::from(2)
                }
                Ok(r) => {
                    println!("{} = {}", r.key, r.new_secret);
                    match (&what, &r.old_valid_until) {
                        (kami::app::RotateWhat::AdminToken, _) => {
                            println!("the old admin token stops working when kami next starts")
                        }
                        (_, Some(until)) => println!(
                            "give the new secret to the gateway; the old one stays accepted on its notifications and answers until {until}"
                        ),
                        (_, None) => println!("the old secret stops working when kami next starts (no grace period)"),
                    }
                    println!("restart kami for the new secret to take effect");
                    ExitCode::SUCCESS
                }
            }
        }
        Command::Backup { action: Some(BackupAction::Verify { file }), .. } => {
            // Often run on the shop's own host: it yields the cores to selling.
            kami::backup::lower_priority();
            match kami::backup::verify_file(&file) {
                Ok(summary) => {
                    print!("ok: {}", kami::backup::describe(&summary));
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("kami backup verify: {}: {e}", file.display());
                    ExitCode::from(1)
                }
            }
        }
        Command::Backup { action: None, url, admin_token, to, passphrase_file } => {
            let Some(to) = to else {
                eprintln!("kami backup: --to FILE is required");
                return ExitCode::from(2);
            };
            if admin_token.is_empty() {
                eprintln!("kami backup: --admin-token (or KAMI_ADMIN_TOKEN) is required");
                return ExitCode::from(2);
            }
            let passphrase = match passphrase_file.as_deref().map(kami::backup::read_passphrase).transpose() {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("kami backup: {e}");
                    return ExitCode::from(2);
                }
            };
            // Often run on the shop's own host: it (and the check of what it
            // receives) yields the cores to selling.
            kami::backup::lower_priority();
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
            match runtime.block_on(kami::backup::download(&url, &admin_token, &to, passphrase)) {
                Ok(summary) => {
                    print!("{}: {}", to.display(), kami::backup::describe(&summary));
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("kami backup: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Restore { from, until, data, passphrase_file } => {
            let passphrase = match passphrase_file.as_deref().map(kami::backup::read_passphrase).transpose() {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("kami restore: {e}");
                    return ExitCode::from(2);
                }
            };
            let until_ms = match until.as_deref().map(chrono::DateTime::parse_from_rfc3339).transpose() {
                Ok(t) => t.map(|t| t.timestamp_millis().max(0) as u64),
                Err(e) => {
                    eprintln!("kami restore: --until: {e} (RFC 3339, e.g. 2026-12-01T10:15:00Z)");
                    return ExitCode::from(2);
                }
            };
            let restored = if from.is_dir() {
                kami::backup::restore_archive(&from, &data, until_ms, passphrase.as_deref())
            } else if until_ms.is_some() {
                eprintln!("kami restore: --until needs an archive directory in --from");
                return ExitCode::from(2);
            } else {
                kami::backup::restore(&from, &data, passphrase.as_deref())
            };
            match restored {
                Ok(summary) => {
                    print!("{} restored from {}: {}", data.display(), from.display(), kami::backup::describe(&summary));
                    if !summary.sealed.is_empty() && passphrase.is_none() {
                        println!("sealed secrets left out (no --passphrase-file): kami makes new ones at start");
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("kami restore: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Audit { data, json } => match kami::audit::audit_dir(&data) {
            Err(e) => {
                eprintln!("kami audit: {e}");
                ExitCode::from(2)
            }
            Ok(report) => {
                if json {
                    println!("{}", serde_json::to_string_pretty(&report).expect("report serialises"));
                } else {
                    print!("{report}");
                }
                if report.ok {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(1)
                }
            }
        },
        Command::WebhookSink { listen, secret, tls_cert, tls_key } => {
            kami::telemetry::init_logging(&kami::config::LogSettings {
                level: "info".into(),
                format: kami::config::LogFormat::Human,
            });
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
            let tls = match (tls_cert, tls_key) {
                (Some(cert), Some(key)) => match kami::webhooks::sink::tls_config(&cert, &key) {
                    Ok(config) => Some(config),
                    Err(e) => {
                        eprintln!("kami webhook-sink: TLS: {e}");
                        return ExitCode::from(2);
                    }
                },
                _ => None,
            };
            runtime.block_on(async move {
                match kami::webhooks::sink::start_tls(listen, secret, tls).await {
                    Ok(sink) => {
                        println!("webhook sink listening on {}", sink.url());
                        shutdown_signal().await;
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("kami webhook-sink: cannot listen on {listen}: {e}");
                        ExitCode::from(1)
                    }
                }
            })
        }
        Command::SandboxGateway { listen, notify_url, secret, kind, keys_dir, channel } => {
            kami::telemetry::init_logging(&kami::config::LogSettings {
                level: "info".into(),
                format: kami::config::LogFormat::Human,
            });
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
            let kind: kami::config::ChannelKind = match serde_json::from_value(serde_json::json!(kind)) {
                Ok(
                    k @ (kami::config::ChannelKind::Sandbox
                    | kami::config::ChannelKind::Alipay
                    | kami::config::ChannelKind::Wechatpay
                    | kami::config::ChannelKind::Stripe),
                ) => k,
                _ => {
                    eprintln!("kami sandbox-gateway: --kind must be sandbox, alipay, wechatpay or stripe");
                    return ExitCode::from(2);
                }
            };
            if kind == kami::config::ChannelKind::Sandbox && secret.is_empty() {
                eprintln!("kami sandbox-gateway: --secret (the channel's secret) is required for kind sandbox");
                return ExitCode::from(2);
            }
            let (protocol, settings) = if kind == kami::config::ChannelKind::Sandbox {
                (kami::sandbox::Protocol::Kami, Vec::new())
            } else {
                match kami::sandbox::gateways::generate(kind, &channel, &keys_dir) {
                    Ok(made) => made,
                    Err(e) => {
                        eprintln!("kami sandbox-gateway: cannot write keys into {}: {e}", keys_dir.display());
                        return ExitCode::from(1);
                    }
                }
            };
            runtime.block_on(async move {
                let config = kami::sandbox::SandboxConfig {
                    listen,
                    notify_url: notify_url.clone(),
                    secret,
                    max_payments: 1_000_000,
                    max_attempts: 8,
                    protocol,
                };
                match kami::sandbox::start(config).await {
                    Ok(gw) => {
                        println!("sandbox gateway ({}) listening on {}", kind.as_str(), gw.url());
                        if !settings.is_empty() {
                            let path = if kind == kami::config::ChannelKind::Alipay { "/gateway.do" } else { "" };
                            println!("kami's channel, as environment variables:");
                            println!(
                                "KAMI_PAYMENTS__CHANNELS__{}__ENDPOINT={}{path}",
                                channel.to_uppercase(),
                                gw.url()
                            );
                            for (key, value) in &settings {
                                let var = format!("KAMI_{}", key.replace('.', "__").to_uppercase());
                                let value = if key.ends_with(".notify_url") && !notify_url.is_empty() {
                                    &notify_url
                                } else {
                                    value
                                };
                                println!("{var}={value}");
                            }
                        }
                        shutdown_signal().await;
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("kami sandbox-gateway: cannot listen on {listen}: {e}");
                        ExitCode::from(1)
                    }
                }
            })
        }
        Command::Load {
            url,
            admin_token,
            channel,
            secret,
            arbiters,
            keys,
            buyers,
            concurrency,
            shards,
            mode,
            json,
            chart,
            retry_overloaded,
            api_key,
        } => {
            if concurrency == 0 || shards == 0 {
                eprintln!("kami load: --concurrency and --shards must be at least 1");
                return ExitCode::from(2);
            }
            let target = match url {
                Some(url) if admin_token.is_empty() || secret.is_empty() => {
                    eprintln!("kami load: --url {url} needs --admin-token and --secret");
                    return ExitCode::from(2);
                }
                Some(url) => kami::load::Target::Url { url, admin_token, channel, secret, api_key },
                None => kami::load::Target::Embedded {
                    profile: cli.profile,
                    file: cli.config,
                    arbiters: if arbiters == 0 {
                        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
                    } else {
                        arbiters
                    },
                },
            };
            let config = kami::load::LoadConfig {
                target,
                keys,
                buyers,
                concurrency,
                mode,
                shards,
                progress: true,
                retry_overloaded,
            };
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
            match runtime.block_on(kami::load::run(config)) {
                Err(e) => {
                    eprintln!("kami load: {e}");
                    ExitCode::from(2)
                }
                Ok(report) => {
                    print!("{}", report.table());
                    if let Some(path) = chart {
                        if let Err(e) = kami::load::chart::write_svg(&report, &path) {
                            eprintln!("kami load: cannot draw {}: {e}", path.display());
                            return ExitCode::from(2);
                        }
                    }
                    if let Some(path) = json {
                        let text = serde_json::to_string_pretty(&report).expect("report serialises");
                        if let Err(e) = std::fs::write(&path, text) {
                            eprintln!("kami load: cannot write {}: {e}", path.display());
                            return ExitCode::from(2);
                        }
                    }
                    if report.verdict.ok {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::from(1)
                    }
                }
            }
        }
        Command::Serve => {
            let sources = Sources { profile: cli.profile, file: cli.config, environment: true, overrides: Vec::new() };
            let settings = match Settings::load(&sources) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("kami: {e}");
                    return ExitCode::from(2);
                }
            };
            kami::telemetry::init_logging(&settings.log);
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .thread_name("kami-http")
                .build()
                .expect("tokio runtime");
            runtime.block_on(serve(settings))
        }
    }
}

async fn serve(settings: Settings) -> ExitCode {
    let app = match kami::start(settings).await {
        Ok(app) => app,
        Err(e) => {
            eprintln!("kami: {e}");
            return ExitCode::from(1);
        }
    };
    let secrets = &app.secrets;
    for key in &secrets.generated {
        let value = if key == "admin.token" {
            secrets.admin_token.clone()
        } else {
            let name = key.trim_start_matches("payments.channels.").trim_end_matches(".secret");
            secrets.channels[name].clone()
        };
        println!("{key} (generated, kept for the next starts): {value}");
    }
    for (name, old) in &secrets.retiring {
        let until = chrono::DateTime::from_timestamp_millis(old.until_ms as i64)
            .map_or_else(|| old.until_ms.to_string(), |t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
        println!("payments.channels.{name}.secret was rotated: the replaced secret is accepted until {until}");
    }
    if !secrets.kept.is_empty() {
        println!(
            "secrets not configured ({}) are kept in {} (readable by the owner only); `kami secrets show --data {}` prints them",
            secrets.kept.join(", "),
            secrets.file.display(),
            secrets.file.parent().map_or(String::new(), |p| p.display().to_string()),
        );
    }
    let r = &app.recovery;
    println!(
        "recovered {} products ({} shards, {} journal records) in {} ms",
        r.products,
        r.shards,
        r.events_replayed,
        r.elapsed.as_millis()
    );
    println!("kami listening on {} (ready)", app.url());
    shutdown_signal().await;
    tracing::info!("shutdown requested");
    app.shutdown().await;
    ExitCode::SUCCESS
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
