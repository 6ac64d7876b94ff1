//! The `gateway` command line.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::config::FlagLayer;

/// Secure, durable IoT edge gateway: MQTT/HTTP ingest → SQLite WAL → sinks.
#[derive(Debug, Parser)]
#[command(name = "gateway", version = crate_version(), about, propagate_version = true)]
pub struct Cli {
    /// TOML configuration file (layer above the compiled defaults).
    #[arg(long, global = true, env = "GATEWAY_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Overrides `gateway_id`.
    #[arg(long, global = true, value_name = "ID")]
    pub gateway_id: Option<String>,
    /// Overrides `data_dir`.
    #[arg(long, global = true, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Overrides `http.addr`.
    #[arg(long, global = true, value_name = "HOST:PORT")]
    pub http_addr: Option<String>,
    /// Overrides `mqtt.url`.
    #[arg(long, global = true, value_name = "URL")]
    pub mqtt_url: Option<String>,
    /// Overrides `log.level`.
    #[arg(long, global = true, value_name = "LEVEL")]
    pub log_level: Option<String>,
    /// Operator commands go to the admin API at this base URL (a remote or
    /// running gateway). Without it: the local gateway's API, derived from
    /// `http.addr`, when it runs; the data dir itself when it is stopped.
    #[arg(long, global = true, env = "GATEWAY_ADMIN_URL", value_name = "URL")]
    pub admin_url: Option<String>,
    /// CA certificate (PEM) that the admin API's HTTPS certificate chains to.
    #[arg(long, global = true, value_name = "FILE")]
    pub admin_ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for an admin API that requires one (CN = `http.admin_cert_cn`).
    #[arg(long, global = true, value_name = "FILE", requires = "admin_key_file")]
    pub admin_cert_file: Option<PathBuf>,
    /// Its PKCS#8 private key (PEM).
    #[arg(long, global = true, value_name = "FILE", requires = "admin_cert_file")]
    pub admin_key_file: Option<PathBuf>,
    /// Machine-readable output: one JSON document (NDJSON for exports).
    #[arg(long, global = true)]
    pub json: bool,
    /// What to do (default: run).
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway.
    Run,
    /// Inspect configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Manage device tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Dead letters: list, export, requeue, purge.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Deliver the retained records received in a time range to one sink again.
    Replay {
        /// The sink.
        #[arg(long)]
        sink: String,
        /// From: RFC 3339, epoch ms, or a duration ago ("2h").
        #[arg(long, value_name = "TIME")]
        since: String,
        /// To (exclusive); default now.
        #[arg(long, value_name = "TIME")]
        until: Option<String>,
        /// On a running gateway: wait (with progress on a terminal) until the sink has caught up.
        #[arg(long)]
        wait: bool,
    },
    /// The WAL: statistics, consistency check, compaction.
    #[command(subcommand)]
    Wal(WalCommand),
    /// Sinks: list with state, pause, resume.
    #[command(subcommand)]
    Sink(SinkCommand),
    /// Send a control message to a device (`devices/{device}/control`, QoS 1; needs a running gateway with MQTT).
    DeviceSend {
        /// The device id.
        device: String,
        /// The message, JSON.
        payload: String,
    },
    /// Ping a running gateway through its admin API.
    Ping,
    /// A running gateway's status (GET /admin/status, what the status page
    /// at / shows): gateway, ingest rates, WAL, sinks, dead letters (--json: the document).
    Status,
    /// Routes: which class and sinks a record would get.
    #[command(subcommand)]
    Route(RouteCommand),
    /// The fleet, from the operator's desk: keys, signed commands, states (DESIGN §11).
    #[command(subcommand)]
    Fleet(FleetCommand),
    /// Is the gateway on this host alive? GET /healthz as configured; exit 0 or 1 with one line.
    Healthcheck(HealthcheckArgs),
}

/// `gateway healthcheck`: what to check and how (`healthcheck.rs` does it).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct HealthcheckArgs {
    /// The URL to GET (default: /healthz on http.addr, https when TLS is on;
    /// an unspecified address means this host: localhost).
    #[arg(long)]
    pub url: Option<String>,
    /// CA to verify the server with (default: http.client_ca_file, else the system roots).
    #[arg(long, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM) when the server requires one (mTLS).
    #[arg(long, value_name = "FILE", requires = "key_file")]
    pub cert_file: Option<PathBuf>,
    /// Its private key (PKCS#8 PEM).
    #[arg(long, value_name = "FILE", requires = "cert_file")]
    pub key_file: Option<PathBuf>,
    /// Give up after this long.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

/// `gateway route …`
#[derive(Debug, Subcommand)]
pub enum RouteCommand {
    /// Shows the class and the sinks a record would get with the rules in force now.
    Test {
        /// The device id.
        device: String,
        /// The telemetry, JSON, as the device sends it.
        payload: String,
        /// mqtt or http (default http; mqtt with --topic).
        #[arg(long)]
        source: Option<String>,
        /// The MQTT topic it arrives on (read by mqtt.topics for the device id and tags).
        #[arg(long)]
        topic: Option<String>,
    },
}

/// Dead-letter filters (all optional; all given must match).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct DlqFilterArgs {
    /// Of this sink.
    #[arg(long)]
    pub sink: Option<String>,
    /// Of this device.
    #[arg(long)]
    pub device: Option<String>,
    /// Dead-lettered at or after: RFC 3339, epoch ms, or a duration ago ("30m").
    #[arg(long, value_name = "TIME")]
    pub since: Option<String>,
    /// Dead-lettered before.
    #[arg(long, value_name = "TIME")]
    pub until: Option<String>,
    /// The error text contains this.
    #[arg(long, value_name = "TEXT")]
    pub error: Option<String>,
}

/// `gateway dlq …`
#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// List dead letters (newest filters first: see --limit and --after-seq).
    List {
        #[command(flatten)]
        filter: DlqFilterArgs,
        /// At most this many (max 10000).
        #[arg(long, default_value_t = 100)]
        limit: u64,
        /// Seqs above this (paging).
        #[arg(long)]
        after_seq: Option<u64>,
    },
    /// Export dead letters with their records as NDJSON (progress on a terminal).
    Export {
        #[command(flatten)]
        filter: DlqFilterArgs,
        /// Write here instead of stdout.
        #[arg(long, short, value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// Put dead letters back in their sink's queue.
    Requeue {
        #[command(flatten)]
        filter: DlqFilterArgs,
        /// On a running gateway: wait (with progress on a terminal) until the sink has caught up.
        #[arg(long)]
        wait: bool,
    },
    /// Delete dead letters for good (a sink must be named).
    Purge {
        #[command(flatten)]
        filter: DlqFilterArgs,
    },
}

/// `gateway wal …`
#[derive(Debug, Subcommand)]
pub enum WalCommand {
    /// Per-sink pending, in-flight, dead, oldest age and bytes.
    Stats,
    /// Check the WAL's consistency; exit status 3 when problems remain.
    Check {
        /// Repair what is safe to repair.
        #[arg(long)]
        repair: bool,
    },
    /// Compact delivered records past retention now and truncate SQLite's -wal file.
    Compact,
}

/// `gateway sink …`
#[derive(Debug, Subcommand)]
pub enum SinkCommand {
    /// Every sink with its state and WAL counts.
    List,
    /// Pause delivery (persisted: survives restarts).
    Pause {
        /// The sink.
        name: String,
    },
    /// Resume delivery.
    Resume {
        /// The sink.
        name: String,
    },
}

/// `gateway config …`
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print the effective configuration (all layers merged, secrets redacted).
    Print,
    /// Validate a configuration file on its own (defaults + FILE).
    Check {
        /// The TOML file.
        file: PathBuf,
    },
    /// Show the runtime settings in force (a running gateway's, or the data dir's).
    Get,
    /// Change a runtime setting (persisted in the data dir; applied at once
    /// on a running gateway). KEY is one of: log.level,
    /// ingest.rate_limit_per_device, ingest.rate_limit_burst,
    /// sinks.NAME.paused, sinks.NAME.retry_budget, sinks.NAME.retry_base_ms,
    /// sinks.NAME.retry_max_ms.
    Set {
        /// The setting.
        key: String,
        /// Its value (JSON: 5, true, "debug"; a bare word is a string).
        value: String,
    },
}

/// `gateway fleet …` (README "Run a fleet").
#[derive(Debug, Subcommand)]
pub enum FleetCommand {
    /// Make an Ed25519 signing key: DIR/KEY_ID.key (mode 0600, for the
    /// operator) and DIR/KEY_ID.pub; prints the public key line for the
    /// gateways' fleet.trusted_keys_file.
    Keygen {
        /// Where to write the key files.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// The key's id (in every signed command).
        #[arg(long, default_value = "operator", value_name = "ID")]
        key_id: String,
    },
    /// Print a signed command envelope (to publish yourself, e.g. with
    /// mosquitto_pub on fleet/ID/control/COMMAND).
    Sign {
        #[command(flatten)]
        target: FleetTarget,
        /// The private key file (from `gateway fleet keygen`).
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        /// The command: ping, config.get, config.set, sink.pause, sinks.list…
        command: String,
        /// Its arguments, a JSON object (e.g. '{"sink":"archive"}').
        args: Option<String>,
    },
    /// Sign and publish a command, wait for the reply and print it (exit 1
    /// when refused or failed, or when no reply came).
    Send {
        #[command(flatten)]
        broker: FleetBroker,
        #[command(flatten)]
        target: FleetTarget,
        /// The private key file (from `gateway fleet keygen`).
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        /// The command: ping, config.get, config.set, sink.pause, sinks.list…
        command: String,
        /// Its arguments, a JSON object (e.g. '{"sink":"archive"}').
        args: Option<String>,
        /// Wait this long for the reply (for a group: for all replies).
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Roll a config bundle out to a group, wave by wave: each member of a
    /// wave gets a signed bundle.apply and must report the bundle `active`
    /// (or `rolled_back`) in its retained state; the rollout stops when
    /// more than --max-failures members failed (exit 1). Prints progress
    /// lines and a final table (--json: one JSON line per member).
    Rollout {
        #[command(flatten)]
        broker: FleetBroker,
        /// The group whose members get the bundle.
        #[arg(long, value_name = "GROUP")]
        group: String,
        /// The bundle: a JSON file {"version": N, "settings": {...}}.
        #[arg(long, value_name = "FILE")]
        bundle: PathBuf,
        /// The private key file (from `gateway fleet keygen`).
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        /// Cumulative wave sizes: a count or a share of the members.
        #[arg(long, default_value = "1,10%,50%,100%", value_name = "LIST")]
        waves: String,
        /// Stop when more members than this failed (rolled back, refused, timed out).
        #[arg(long, default_value_t = 0, value_name = "N")]
        max_failures: usize,
        /// How long a member of a wave may take to report (probation included).
        #[arg(long, default_value = "3m", value_parser = humantime::parse_duration)]
        timeout: Duration,
        /// Collect retained states this long after subscribing, to find the members.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        wait: Duration,
    },
    /// The fleet as a table from the gateways' retained states (--json: the states).
    Status {
        #[command(flatten)]
        broker: FleetBroker,
        /// Only the members of this group.
        #[arg(long, value_name = "GROUP")]
        group: Option<String>,
        /// Collect retained states this long after subscribing.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        wait: Duration,
    },
}

/// Which gateway or group a command is for (it is signed for it).
#[derive(Debug, clap::Args)]
#[group(required = true, multiple = false)]
pub struct FleetTarget {
    /// One gateway.
    #[arg(long, value_name = "ID")]
    pub gateway: Option<String>,
    /// Every member of a group.
    #[arg(long, value_name = "GROUP")]
    pub group: Option<String>,
}

/// The fleet broker, as the operator reaches it.
#[derive(Debug, clap::Args)]
pub struct FleetBroker {
    /// mqtt://host:port or mqtts://host:port.
    #[arg(long, env = "GATEWAY_FLEET_URL", value_name = "URL")]
    pub url: String,
    /// CA of the broker (mqtts; default: system roots).
    #[arg(long, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    /// Client certificate for mutual TLS.
    #[arg(long, value_name = "FILE", requires = "client_key_file")]
    pub client_cert_file: Option<PathBuf>,
    /// Its PKCS#8 key.
    #[arg(long, value_name = "FILE", requires = "client_cert_file")]
    pub client_key_file: Option<PathBuf>,
    /// User name.
    #[arg(long, value_name = "NAME")]
    pub username: Option<String>,
    /// File holding the password.
    #[arg(long, value_name = "FILE")]
    pub password_file: Option<PathBuf>,
}

/// `gateway token …`
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Print a fresh random token for DEVICE and its tokens-file line.
    New {
        /// The device id.
        device: String,
    },
}

impl Cli {
    /// The flag layer of the configuration.
    pub fn flags(&self) -> FlagLayer {
        FlagLayer {
            gateway_id: self.gateway_id.clone(),
            data_dir: self.data_dir.clone(),
            http_addr: self.http_addr.clone(),
            mqtt_url: self.mqtt_url.clone(),
            log_level: self.log_level.clone(),
        }
    }
}

fn crate_version() -> &'static str {
    concat!(
        env!("CARGO_PKG_VERSION"),
        " (",
        env!("GATEWAY_GIT_COMMIT"),
        ", built ",
        env!("GATEWAY_BUILD_TIME"),
        ")"
    )
}
