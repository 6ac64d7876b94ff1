//! Layered configuration: compiled defaults < TOML file < `GATEWAY_*`
//! environment < command-line flags, validated into one [`Settings`].
//!
//! Each layer is parsed on its own (so a type error names the layer), the
//! layers are merged key by key while remembering which layer set each key,
//! and validation errors name the key and that layer.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use gateway_actors::dispatcher::{DispatchConfig, DispatchKeys};
use gateway_actors::fleet::{FleetConfig, FleetKeys};
use gateway_actors::ingest::PayloadFormat;
use gateway_actors::ingest::{IngestLimits, RateLimit};
use gateway_actors::keys::{secret_key, KeyError};
use gateway_actors::mqtt::topics::Topics;
use gateway_actors::mqtt::{broker_address, broker_tls, MqttIngestConfig, MqttVersion};
use gateway_actors::route::{self, PriorityRule, SinkPolicy, MAX_SINKS};
pub use gateway_actors::sink::SinkTarget;
use gateway_actors::sink::{SinkConfig, SinkContext};
use gateway_actors::wal::{BackpressurePolicy, WalConfig};
use serde::{Deserialize, Serialize};
use toml::Value;

/// `max_bytes` of the zero-config archive (no `[sinks.*]`): 1 GiB.
pub const DEFAULT_ARCHIVE_MAX_BYTES: u64 = 1 << 30;
/// `batch_max_wait_ms` of the zero-config archive: a local archive has no
/// latency target, and every object costs a file creation, an fsync, a
/// rename and a directory fsync (about 12 KB written per object), so it
/// batches for a second.
pub const DEFAULT_ARCHIVE_BATCH_MAX_WAIT_MS: u64 = 1000;

/// The longest `wal.ack_flush`: what a crash may deliver again stays small.
pub const MAX_ACK_FLUSH: Duration = Duration::from_secs(10);
/// The longest `wal.commit_window`: a device's acknowledgement waits for it.
pub const MAX_COMMIT_WINDOW: Duration = Duration::from_secs(1);

/// The compiled-in defaults (also what `gateway config print` starts from).
pub const DEFAULTS_TOML: &str = include_str!("../config/default.toml");

/// A configuration error that names the key and the layer it came from.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A layer could not be parsed.
    #[error("{layer}: {message}")]
    Layer {
        /// Which layer.
        layer: String,
        /// What is wrong.
        message: String,
    },
    /// A value is invalid.
    #[error("invalid `{key}` (set by {layer}): {message}")]
    Invalid {
        /// Dotted key.
        key: String,
        /// Which layer set it.
        layer: String,
        /// What is wrong.
        message: String,
    },
}

// ---------------------------------------------------------------- raw layers

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    gateway_id: Option<String>,
    data_dir: Option<PathBuf>,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    http: RawHttp,
    #[serde(default)]
    ingest: RawIngest,
    #[serde(default)]
    mqtt: RawMqtt,
    #[serde(default)]
    wal: RawWal,
    #[serde(default)]
    otlp: RawOtlp,
    /// `[fleet]`, checked by its owner (`gateway_actors::fleet::FleetKeys`).
    #[serde(default)]
    fleet: FleetKeys,
    #[serde(default)]
    /// Each `[sinks.NAME]` table as written: its keys belong to the kind
    /// (`gateway_actors::sink::SinkConfig`) and are checked in validation.
    sinks: BTreeMap<String, toml::Table>,
    /// `[[priority]]` rules as written (checked by `gateway_actors::route`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    priority: Option<Value>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawOtlp {
    endpoint: Option<String>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    level: Option<String>,
    repeat_burst: Option<u32>,
    repeat_interval: Option<String>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    addr: Option<String>,
    workers: Option<usize>,
    request_timeout: Option<String>,
    max_connections: Option<usize>,
    device_tokens_file: Option<PathBuf>,
    admin_token_file: Option<PathBuf>,
    admin_cert_cn: Option<String>,
    tls_cert_file: Option<PathBuf>,
    tls_key_file: Option<PathBuf>,
    client_ca_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawIngest {
    max_payload_bytes: Option<usize>,
    max_batch_records: Option<usize>,
    rate_limit_per_device: Option<f64>,
    rate_limit_burst: Option<f64>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawMqtt {
    url: Option<String>,
    embedded_addr: Option<String>,
    version: Option<String>,
    client_id: Option<String>,
    keep_alive: Option<String>,
    topic: Option<String>,
    topics: Option<Vec<String>>,
    payload_format: Option<String>,
    receive_maximum: Option<u16>,
    session_expiry: Option<String>,
    reconnect_max: Option<String>,
    ca_file: Option<PathBuf>,
    client_cert_file: Option<PathBuf>,
    client_key_file: Option<PathBuf>,
    username: Option<String>,
    password_file: Option<PathBuf>,
    control: Option<bool>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawWal {
    max_bytes: Option<u64>,
    min_free_disk_bytes: Option<u64>,
    retention: Option<String>,
    dedup_window: Option<String>,
    policy: Option<String>,
    ack_flush: Option<String>,
    commit_window: Option<String>,
}

/// `GATEWAY_*` variables (read with envy). `GATEWAY_ID` is `gateway_id`;
/// every other name is `GATEWAY_{SECTION}_{KEY}` or `GATEWAY_{KEY}`.
#[derive(Debug, Default, Deserialize, Serialize)]
struct EnvLayer {
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data_dir: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    log_level: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    log_repeat_burst: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    log_repeat_interval: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    http_addr: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    http_workers: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    http_request_timeout: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    http_max_connections: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    http_device_tokens_file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    http_admin_token_file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    http_admin_cert_cn: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    http_tls_cert_file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    http_tls_key_file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    http_client_ca_file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ingest_max_payload_bytes: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ingest_max_batch_records: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ingest_rate_limit_per_device: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ingest_rate_limit_burst: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    mqtt_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    mqtt_embedded_addr: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    mqtt_version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    mqtt_client_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    mqtt_payload_format: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    mqtt_control: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    mqtt_ca_file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    mqtt_client_cert_file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    mqtt_client_key_file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    mqtt_username: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    mqtt_password_file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    wal_max_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    wal_min_free_disk_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    wal_retention: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    wal_dedup_window: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    wal_policy: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    wal_ack_flush: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    wal_commit_window: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    otlp_endpoint: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    fleet_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    fleet_groups: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    fleet_trusted_keys_file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    fleet_probation: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    fleet_state_interval: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    fleet_client_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    fleet_version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    fleet_ca_file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    fleet_client_cert_file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    fleet_client_key_file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    fleet_username: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    fleet_password_file: Option<String>,
}

const SECTIONS: [&str; 7] = ["log", "http", "ingest", "mqtt", "wal", "otlp", "fleet"];

fn env_key_path(field: &str) -> Vec<String> {
    if field == "id" {
        return vec!["gateway_id".into()];
    }
    for s in SECTIONS {
        if let Some(rest) = field.strip_prefix(s).and_then(|r| r.strip_prefix('_')) {
            return vec![s.into(), rest.into()];
        }
    }
    vec![field.into()]
}

/// Values from command-line flags (the top layer).
#[derive(Debug, Default, Clone)]
pub struct FlagLayer {
    /// `--gateway-id`
    pub gateway_id: Option<String>,
    /// `--data-dir`
    pub data_dir: Option<PathBuf>,
    /// `--http-addr`
    pub http_addr: Option<String>,
    /// `--mqtt-url`
    pub mqtt_url: Option<String>,
    /// `--log-level`
    pub log_level: Option<String>,
}

// ------------------------------------------------------------------- merging

/// The layers, read and merged; [`Loaded::settings`] validates them.
#[derive(Debug, Clone)]
pub struct Loaded {
    merged: Value,
    origin: HashMap<String, String>,
}

fn set_path(tree: &mut Value, path: &[String], v: Value) {
    let mut cur = tree;
    for (i, k) in path.iter().enumerate() {
        let Value::Table(t) = cur else { return };
        if i + 1 == path.len() {
            t.insert(k.clone(), v);
            return;
        }
        cur = t
            .entry(k.clone())
            .or_insert_with(|| Value::Table(Default::default()));
    }
}

fn merge_into(
    base: &mut Value,
    top: Value,
    prefix: &str,
    layer: &str,
    origin: &mut HashMap<String, String>,
) {
    match (base, top) {
        (Value::Table(b), Value::Table(t)) => {
            for (k, v) in t {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                match b.get_mut(&k) {
                    Some(existing @ Value::Table(_)) if v.is_table() => {
                        merge_into(existing, v, &key, layer, origin)
                    }
                    _ => {
                        record_origin(&v, &key, layer, origin);
                        b.insert(k, v);
                    }
                }
            }
        }
        (b, t) => {
            record_origin(&t, prefix, layer, origin);
            *b = t;
        }
    }
}

fn record_origin(v: &Value, key: &str, layer: &str, origin: &mut HashMap<String, String>) {
    if let Value::Table(t) = v {
        for (k, v) in t {
            record_origin(v, &format!("{key}.{k}"), layer, origin);
        }
    }
    origin.insert(key.to_string(), layer.to_string());
}

fn check_layer(tree: &Value, layer: &str) -> Result<(), ConfigError> {
    tree.clone()
        .try_into::<RawConfig>()
        .map(|_| ())
        .map_err(|e| ConfigError::Layer {
            layer: layer.to_string(),
            message: e.to_string(),
        })
}

impl Loaded {
    /// Reads every layer. `file` is the `--config`/`GATEWAY_CONFIG` path;
    /// `use_env` is false for `config check`, which judges a file alone.
    pub fn load(
        file: Option<&Path>,
        use_env: bool,
        flags: &FlagLayer,
    ) -> Result<Self, ConfigError> {
        Self::load_with_bundle(file, use_env, flags, None)
    }

    /// Like [`Loaded::load`] with a fleet config bundle's settings (its
    /// version and the JSON object) as the layer between the file and the
    /// environment.
    pub fn load_with_bundle(
        file: Option<&Path>,
        use_env: bool,
        flags: &FlagLayer,
        bundle: Option<(u64, &serde_json::Value)>,
    ) -> Result<Self, ConfigError> {
        let bundle = bundle
            .map(|(version, settings)| {
                let layer = format!("bundle {version}");
                Value::try_from(settings)
                    .map(|tree| (layer.clone(), tree))
                    .map_err(|e| ConfigError::Layer {
                        layer,
                        message: format!("not a configuration layer: {e}"),
                    })
            })
            .transpose()?;
        let file = match file {
            Some(path) => {
                let layer = format!("file {}", path.display());
                let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Layer {
                    layer: layer.clone(),
                    message: format!("cannot read: {e}"),
                })?;
                Some((layer, text))
            }
            None => None,
        };
        Self::from_layers(file, bundle, use_env, flags)
    }

    /// Validates a configuration file's text on its own (no environment,
    /// no flags), as `config check` does; `layer` names it in errors.
    pub fn check_text(layer: &str, text: &str) -> Result<Settings, ConfigError> {
        Self::from_layers(
            Some((layer.to_string(), text.to_string())),
            None,
            false,
            &FlagLayer::default(),
        )?
        .settings()
    }

    /// The compiled defaults, then the file's (layer, text), the bundle's
    /// (layer, tree), the environment and the flags.
    fn from_layers(
        file: Option<(String, String)>,
        bundle: Option<(String, Value)>,
        use_env: bool,
        flags: &FlagLayer,
    ) -> Result<Self, ConfigError> {
        let mut origin = HashMap::new();
        let defaults: Value = toml::from_str(DEFAULTS_TOML).map_err(|e| ConfigError::Layer {
            layer: "compiled defaults".into(),
            message: e.to_string(),
        })?;
        let mut merged = Value::Table(Default::default());
        merge_into(&mut merged, defaults, "", "default", &mut origin);

        if let Some((layer, text)) = file {
            let tree: Value = toml::from_str(&text).map_err(|e| ConfigError::Layer {
                layer: layer.clone(),
                message: e.to_string(),
            })?;
            check_layer(&tree, &layer)?;
            merge_into(&mut merged, tree, "", &layer, &mut origin);
        }

        if let Some((layer, tree)) = bundle {
            check_layer(&tree, &layer)?;
            merge_into(&mut merged, tree, "", &layer, &mut origin);
        }

        if use_env {
            let env: EnvLayer =
                envy::prefixed("GATEWAY_")
                    .from_env()
                    .map_err(|e| ConfigError::Layer {
                        layer: "environment".into(),
                        message: e.to_string(),
                    })?;
            let flat = Value::try_from(&env).map_err(|e| ConfigError::Layer {
                layer: "environment".into(),
                message: e.to_string(),
            })?;
            if let Value::Table(t) = flat {
                for (field, v) in t {
                    let path = env_key_path(&field);
                    let mut tree = Value::Table(Default::default());
                    set_path(&mut tree, &path, v);
                    let var = format!("env GATEWAY_{}", field.to_uppercase());
                    check_layer(&tree, &var)?;
                    merge_into(&mut merged, tree, "", &var, &mut origin);
                }
            }
        }

        let flag_values: [(&str, Option<Value>, &[&str]); 5] = [
            (
                "--gateway-id",
                flags.gateway_id.clone().map(Value::String),
                &["gateway_id"],
            ),
            (
                "--data-dir",
                flags
                    .data_dir
                    .as_ref()
                    .map(|p| Value::String(p.display().to_string())),
                &["data_dir"],
            ),
            (
                "--http-addr",
                flags.http_addr.clone().map(Value::String),
                &["http", "addr"],
            ),
            (
                "--mqtt-url",
                flags.mqtt_url.clone().map(Value::String),
                &["mqtt", "url"],
            ),
            (
                "--log-level",
                flags.log_level.clone().map(Value::String),
                &["log", "level"],
            ),
        ];
        for (flag, v, path) in flag_values {
            if let Some(v) = v {
                let mut tree = Value::Table(Default::default());
                set_path(
                    &mut tree,
                    &path.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
                    v,
                );
                merge_into(&mut merged, tree, "", &format!("flag {flag}"), &mut origin);
            }
        }
        Ok(Self { merged, origin })
    }

    fn layer_of(&self, key: &str) -> String {
        let mut k = key;
        loop {
            if let Some(l) = self.origin.get(k) {
                return l.clone();
            }
            match k.rfind('.') {
                Some(i) => k = &k[..i],
                None => return "default".into(),
            }
        }
    }

    fn invalid(&self, key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            key: key.to_string(),
            layer: self.layer_of(key),
            message: message.into(),
        }
    }

    /// Validates the merged layers into [`Settings`].
    pub fn settings(&self) -> Result<Settings, ConfigError> {
        let raw: RawConfig = self
            .merged
            .clone()
            .try_into()
            .map_err(|e| ConfigError::Layer {
                layer: "merged configuration".into(),
                message: e.to_string(),
            })?;
        let gateway_id = raw.gateway_id.clone().unwrap_or_else(default_gateway_id);
        if !gateway_actors::ingest::validate::is_valid_device_id(&gateway_id) {
            return Err(self.invalid("gateway_id", "must match ^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"));
        }
        let data_dir = raw
            .data_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("./data"));
        if data_dir.as_os_str().is_empty() {
            return Err(self.invalid("data_dir", "must not be empty"));
        }
        let log_level = raw.log.level.clone().unwrap_or_else(|| "info".into());
        if let Err(why) = crate::telemetry::check_level(&log_level) {
            return Err(self.invalid("log.level", why));
        }
        let log_repeats = LogRepeats {
            burst: match raw.log.repeat_burst {
                Some(0) => return Err(self.invalid("log.repeat_burst", "must be at least 1")),
                b => b.unwrap_or(gateway_actors::repeats::DEFAULT_BURST),
            },
            interval: self.duration(
                "log.repeat_interval",
                raw.log.repeat_interval.as_deref().unwrap_or("60s"),
            )?,
        };
        if log_repeats.interval < Duration::from_secs(1) {
            return Err(self.invalid("log.repeat_interval", "must be at least 1s"));
        }

        let otlp_endpoint = match raw.otlp.endpoint.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(e) if e.starts_with("http://") || e.starts_with("https://") => {
                Some(e.trim_end_matches('/').to_string())
            }
            Some(e) => {
                return Err(self.invalid(
                    "otlp.endpoint",
                    format!("{e:?} must be an http:// or https:// base URL (the exporter appends /v1/traces)"),
                ))
            }
        };

        let addr_text = raw.http.addr.clone().unwrap_or_default();
        let addr: SocketAddr = addr_text.parse().map_err(|e| {
            self.invalid("http.addr", format!("{addr_text:?} is not host:port ({e})"))
        })?;
        let tls = match (&raw.http.tls_cert_file, &raw.http.tls_key_file) {
            (Some(c), Some(k)) => Some(TlsSettings {
                cert_file: c.clone(),
                key_file: k.clone(),
                client_ca_file: raw.http.client_ca_file.clone(),
            }),
            (None, None) => {
                if raw.http.client_ca_file.is_some() {
                    return Err(self.invalid("http.client_ca_file", "client certificates need HTTPS: set http.tls_cert_file and http.tls_key_file"));
                }
                None
            }
            (Some(_), None) => {
                return Err(self.invalid("http.tls_cert_file", "http.tls_key_file must be set too"))
            }
            (None, Some(_)) => {
                return Err(self.invalid("http.tls_key_file", "http.tls_cert_file must be set too"))
            }
        };
        for (key, p) in [
            ("http.device_tokens_file", &raw.http.device_tokens_file),
            ("http.admin_token_file", &raw.http.admin_token_file),
        ] {
            if let Some(p) = p {
                if !p.is_file() {
                    return Err(
                        self.invalid(key, format!("{} is not a readable file", p.display()))
                    );
                }
            }
        }
        let request_timeout = self.duration(
            "http.request_timeout",
            raw.http.request_timeout.as_deref().unwrap_or("10s"),
        )?;
        if request_timeout < Duration::from_secs(1) {
            return Err(self.invalid("http.request_timeout", "must be at least 1s"));
        }
        let max_connections = raw.http.max_connections.unwrap_or(4096);
        if max_connections == 0 {
            return Err(self.invalid("http.max_connections", "must be at least 1"));
        }
        let http = HttpSettings {
            addr,
            workers: raw.http.workers.unwrap_or(0),
            request_timeout,
            max_connections,
            device_tokens_file: raw.http.device_tokens_file.clone(),
            admin_token_file: raw.http.admin_token_file.clone(),
            admin_cert_cn: raw
                .http
                .admin_cert_cn
                .clone()
                .unwrap_or_else(|| "gateway-admin".into()),
            tls,
        };

        let max_payload_bytes = raw.ingest.max_payload_bytes.unwrap_or(65536);
        if !(64..=16 << 20).contains(&max_payload_bytes) {
            return Err(self.invalid(
                "ingest.max_payload_bytes",
                "must be between 64 and 16777216",
            ));
        }
        let max_batch_records = raw.ingest.max_batch_records.unwrap_or(1000);
        if !(1..=100_000).contains(&max_batch_records) {
            return Err(self.invalid("ingest.max_batch_records", "must be between 1 and 100000"));
        }
        let per_second = raw.ingest.rate_limit_per_device.unwrap_or(0.0);
        if !per_second.is_finite() || per_second < 0.0 {
            return Err(self.invalid(
                "ingest.rate_limit_per_device",
                "must be >= 0 (0 = unlimited)",
            ));
        }
        let burst = raw.ingest.rate_limit_burst.unwrap_or(0.0);
        if !burst.is_finite() || burst < 0.0 {
            return Err(self.invalid("ingest.rate_limit_burst", "must be >= 0"));
        }
        let rate = if per_second == 0.0 {
            RateLimit::OFF
        } else {
            RateLimit {
                per_second,
                burst: if burst == 0.0 {
                    (per_second * 2.0).max(1.0)
                } else {
                    burst
                },
            }
        };

        let mqtt = self.mqtt(&raw.mqtt, &gateway_id, max_payload_bytes)?;

        let retention = self.duration(
            "wal.retention",
            raw.wal.retention.as_deref().unwrap_or("24h"),
        )?;
        let dedup_window = self.duration(
            "wal.dedup_window",
            raw.wal.dedup_window.as_deref().unwrap_or("24h"),
        )?;
        let ack_flush = self.duration_at_most(
            "wal.ack_flush",
            raw.wal.ack_flush.as_deref().unwrap_or("1s"),
            MAX_ACK_FLUSH,
            "a crash delivers this long of acknowledged records again",
        )?;
        let commit_window = self.duration_at_most(
            "wal.commit_window",
            raw.wal.commit_window.as_deref().unwrap_or("30ms"),
            MAX_COMMIT_WINDOW,
            "every acknowledgement waits up to this long",
        )?;
        let policy = match raw.wal.policy.as_deref().unwrap_or("block") {
            "block" => BackpressurePolicy::Block,
            "drop_oldest" => BackpressurePolicy::DropOldest,
            other => {
                return Err(self.invalid(
                    "wal.policy",
                    format!("{other:?}: expected block or drop_oldest"),
                ))
            }
        };
        let max_bytes = raw.wal.max_bytes.unwrap_or(4 << 30);
        if max_bytes < 1 << 20 {
            return Err(self.invalid("wal.max_bytes", "must be at least 1048576 (1 MiB)"));
        }
        let wal = WalSettings {
            max_bytes,
            min_free_disk_bytes: raw.wal.min_free_disk_bytes.unwrap_or(256 << 20),
            retention,
            dedup_window,
            policy,
            ack_flush,
            commit_window,
        };

        let fleet = raw
            .fleet
            .build(&gateway_id, wal.max_bytes)
            .map_err(|e| self.invalid(&format!("fleet.{}", e.key), e.message))?;

        let mut raw_sinks = raw.sinks.clone();
        if raw_sinks.is_empty() {
            let mut archive = toml::Table::new();
            archive.insert("kind".into(), Value::String("s3".into()));
            archive.insert(
                "url".into(),
                Value::String(format!("file://{}", data_dir.join("archive").display())),
            );
            // Bounded: left alone for months, an edge host's disk must not fill.
            archive.insert(
                "max_bytes".into(),
                Value::Integer(DEFAULT_ARCHIVE_MAX_BYTES as i64),
            );
            // A local file per batch: a second of records per object
            // (issue 31: at 40 records/s a 5 ms linger made ~21 objects a
            // second and cost ~12 KB written and ~7 % of a core a record).
            archive.insert(
                "batch_max_wait_ms".into(),
                Value::Integer(DEFAULT_ARCHIVE_BATCH_MAX_WAIT_MS as i64),
            );
            raw_sinks.insert("archive".into(), archive);
        }
        if raw_sinks.len() > MAX_SINKS {
            return Err(self.invalid(
                "sinks",
                format!("at most {MAX_SINKS} sinks ({} configured)", raw_sinks.len()),
            ));
        }
        let mut sinks = BTreeMap::new();
        for (name, s) in raw_sinks {
            sinks.insert(name.clone(), self.sink(&name, &s, &gateway_id)?);
        }
        let priority = match &raw.priority {
            None => Vec::new(),
            Some(v) => {
                let json =
                    serde_json::to_value(v).map_err(|e| self.invalid("priority", e.to_string()))?;
                route::parse_priority("priority", &json).map_err(|e| {
                    let msg = e.strip_prefix("priority: ").unwrap_or(&e).to_string();
                    self.invalid("priority", msg)
                })?
            }
        };

        let mut settings = Settings {
            gateway_id,
            data_dir,
            log_level,
            log_repeats,
            http,
            ingest: IngestSettings {
                limits: IngestLimits {
                    max_payload_bytes,
                    max_batch_records,
                },
                rate,
            },
            mqtt,
            wal,
            otlp_endpoint,
            fleet,
            sinks,
            priority,
            rendered: String::new(),
        };
        settings.rendered = self.render(&settings);
        Ok(settings)
    }

    fn mqtt(
        &self,
        m: &RawMqtt,
        gateway_id: &str,
        max_payload_bytes: usize,
    ) -> Result<MqttMode, ConfigError> {
        let url = m.url.clone().unwrap_or_else(|| "embedded".into());
        if url == "off" {
            return Ok(MqttMode::Off);
        }
        let version = match m.version.as_deref().unwrap_or("5") {
            "5" | "5.0" | "v5" => MqttVersion::V5,
            "3.1.1" | "311" | "4" | "v4" => MqttVersion::V311,
            other => {
                return Err(self.invalid(
                    "mqtt.version",
                    format!("{other:?}: expected \"5\" or \"3.1.1\""),
                ))
            }
        };
        let payload_format = match m.payload_format.as_deref().unwrap_or("auto") {
            "json" => PayloadFormat::Json,
            "protobuf" => PayloadFormat::Protobuf,
            "auto" => PayloadFormat::Auto,
            other => {
                return Err(self.invalid(
                    "mqtt.payload_format",
                    format!("{other:?}: expected json, protobuf or auto"),
                ))
            }
        };
        let client_id = m
            .client_id
            .clone()
            .unwrap_or_else(|| format!("gateway-{gateway_id}"));
        if client_id.is_empty() || client_id.len() > 64 {
            return Err(self.invalid("mqtt.client_id", "must be 1 to 64 characters"));
        }
        let topics = match (&m.topics, &m.topic) {
            (Some(_), Some(_)) => {
                return Err(self.invalid(
                    "mqtt.topic",
                    "give mqtt.topics (templates) or the older mqtt.topic, not both",
                ))
            }
            (Some(list), None) => {
                Topics::parse(list).map_err(|e| self.invalid("mqtt.topics", e))?
            }
            (None, Some(filter)) => {
                Topics::from_filter(filter).map_err(|e| self.invalid("mqtt.topic", e))?
            }
            (None, None) => Topics::default(),
        };
        let embedded = (url == "embedded")
            .then(|| {
                self.socket_addr(
                    "mqtt.embedded_addr",
                    m.embedded_addr.as_deref().unwrap_or("127.0.0.1:1883"),
                )
            })
            .transpose()?;
        let (scheme, host, port) = if let Some(addr) = embedded {
            ("embedded", addr.ip().to_string(), addr.port())
        } else {
            broker_address(&url).map_err(|e| {
                let e = if url.starts_with("mqtt") {
                    e
                } else {
                    format!(
                        "{url:?}: expected off, embedded, mqtt://host:port or mqtts://host:port"
                    )
                };
                self.invalid("mqtt.url", e)
            })?
        };
        let mut cfg = MqttIngestConfig::new(&host, port, &client_id);
        cfg.conn.version = version;
        cfg.payload_format = payload_format;
        cfg.topics = topics;
        cfg.control = m.control.unwrap_or(true);
        cfg.conn.max_packet_bytes = max_payload_bytes + 4096;
        if let Some(k) = &m.keep_alive {
            cfg.conn.keep_alive = self.duration("mqtt.keep_alive", k)?;
            if cfg.conn.keep_alive < Duration::from_secs(5) {
                return Err(self.invalid("mqtt.keep_alive", "must be at least 5s"));
            }
        }
        if let Some(r) = m.receive_maximum {
            if r == 0 {
                return Err(self.invalid("mqtt.receive_maximum", "must be at least 1"));
            }
            cfg.receive_maximum = r;
        }
        if let Some(e) = &m.session_expiry {
            cfg.session_expiry = self.duration("mqtt.session_expiry", e)?;
        }
        if let Some(r) = &m.reconnect_max {
            cfg.conn.reconnect.max = self
                .duration("mqtt.reconnect_max", r)?
                .max(cfg.conn.reconnect.base);
        }
        cfg.conn.username = m.username.clone();
        let key_error = |e: KeyError| self.invalid(&format!("mqtt.{}", e.key), e.message);
        cfg.conn.password =
            secret_key("password_file", m.password_file.as_deref()).map_err(key_error)?;
        cfg.conn.tls = broker_tls(
            scheme,
            m.ca_file.as_deref(),
            m.client_cert_file.as_deref(),
            m.client_key_file.as_deref(),
        )
        .map_err(key_error)?;
        if let Some(addr) = embedded {
            if !cfg!(feature = "embedded-broker") {
                return Err(self.invalid(
                    "mqtt.url",
                    "this build has no embedded broker (cargo feature embedded-broker)",
                ));
            }
            // The embedded broker listens for MQTT 3.1.1 (what most devices and
            // mosquitto_pub speak); the gateway's own client matches it.
            cfg.conn.version = MqttVersion::V311;
            return Ok(MqttMode::Embedded { addr, ingest: cfg });
        }
        Ok(MqttMode::Broker(cfg))
    }

    fn socket_addr(&self, key: &str, text: &str) -> Result<SocketAddr, ConfigError> {
        text.parse()
            .map_err(|e| self.invalid(key, format!("{text:?} is not host:port ({e})")))
    }

    /// A duration no longer than `max` (`why` says what a longer one would cost).
    fn duration_at_most(
        &self,
        key: &str,
        text: &str,
        max: Duration,
        why: &str,
    ) -> Result<Duration, ConfigError> {
        let d = self.duration(key, text)?;
        if d > max {
            return Err(self.invalid(
                key,
                format!("at most {} ({why})", humantime::format_duration(max)),
            ));
        }
        Ok(d)
    }

    fn duration(&self, key: &str, text: &str) -> Result<Duration, ConfigError> {
        humantime::parse_duration(text).map_err(|e| {
            self.invalid(
                key,
                format!("{text:?} is not a duration like \"24h\" or \"90s\" ({e})"),
            )
        })
    }

    /// One `[sinks.NAME]` table: the shared dispatch keys, then the kind's
    /// own keys, each validated by the code that owns them; errors name the
    /// full key and the layer that set it.
    fn sink(
        &self,
        name: &str,
        table: &toml::Table,
        gateway_id: &str,
    ) -> Result<SinkSettings, ConfigError> {
        let prefix = format!("sinks.{name}");
        if !gateway_actors::ingest::validate::is_valid_device_id(name) {
            return Err(self.invalid(
                &prefix,
                "sink names must match ^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
            ));
        }
        let key_error = |e: KeyError| self.invalid(&format!("{prefix}.{}", e.key), e.message);
        let (policy_keys, rest): (toml::Table, toml::Table) = table
            .clone()
            .into_iter()
            .partition(|(k, _)| SinkPolicy::KEYS.contains(&k.as_str()));
        let mut policy = SinkPolicy::new();
        for (k, v) in &policy_keys {
            let json = serde_json::to_value(v)
                .map_err(|e| self.invalid(&format!("{prefix}.{k}"), e.to_string()))?;
            policy.set(k, &json).map_err(key_error)?;
        }
        let (shared, own): (toml::Table, toml::Table) = rest
            .into_iter()
            .partition(|(k, _)| DispatchKeys::KEYS.contains(&k.as_str()));
        let dispatch: DispatchKeys = Value::Table(shared)
            .try_into()
            .map_err(|e| self.serde_error(&prefix, e))?;
        let dispatch = dispatch.build(name).map_err(key_error)?;
        let expected = SinkConfig::KINDS.join(", ");
        match own.get("kind").and_then(Value::as_str) {
            None => {
                return Err(key_error(KeyError::new(
                    "kind",
                    format!("is required ({expected})"),
                )))
            }
            Some(k) if !SinkConfig::KINDS.contains(&k) => {
                return Err(key_error(KeyError::new(
                    "kind",
                    format!("{k:?}: expected {expected}"),
                )))
            }
            Some(_) => {}
        }
        let kind: SinkConfig = Value::Table(own)
            .try_into()
            .map_err(|e| self.serde_error(&prefix, e))?;
        let ctx = SinkContext {
            name,
            gateway_id,
            publish_timeout: dispatch.publish_timeout,
        };
        let target = kind.build(&ctx).map_err(key_error)?;
        Ok(SinkSettings {
            dispatch,
            target,
            policy,
        })
    }

    /// A section's keys did not deserialize: names the unknown key when
    /// that is what is wrong, else the section.
    fn serde_error(&self, section: &str, e: toml::de::Error) -> ConfigError {
        let message = e.message().to_string();
        let key = message
            .strip_prefix("unknown field `")
            .and_then(|r| r.split('`').next())
            .map_or_else(|| section.to_string(), |k| format!("{section}.{k}"));
        self.invalid(&key, message)
    }

    /// The effective configuration as TOML, secrets redacted.
    pub fn render(&self, settings: &Settings) -> String {
        let mut tree = self.merged.clone();
        set_path(
            &mut tree,
            &["gateway_id".into()],
            Value::String(settings.gateway_id.clone()),
        );
        if let Value::Table(t) = &mut tree {
            // Without [sinks.*] the effective sinks are the compiled-in
            // default archive: show it.
            if !t.contains_key("sinks") {
                let mut sinks = toml::map::Map::new();
                for (name, s) in &settings.sinks {
                    if let SinkTarget::S3(c) = &s.target {
                        let mut m = toml::map::Map::new();
                        m.insert("kind".into(), Value::String("s3".into()));
                        m.insert("url".into(), Value::String(c.url.clone()));
                        if let Some(max) = c.max_bytes {
                            m.insert("max_bytes".into(), Value::Integer(max as i64));
                        }
                        m.insert(
                            "batch_max_wait_ms".into(),
                            Value::Integer(s.dispatch.batch_max_wait.as_millis() as i64),
                        );
                        sinks.insert(name.clone(), Value::Table(m));
                    }
                }
                t.insert("sinks".into(), Value::Table(sinks));
            }
        }
        redact(&mut tree);
        toml::to_string_pretty(&tree).unwrap_or_default()
    }
}

fn redact(v: &mut Value) {
    if let Value::Table(t) = v {
        for (k, v) in t.iter_mut() {
            let secret = ["secret", "password", "token"]
                .iter()
                .any(|s| k.contains(s))
                && !k.ends_with("_file");
            if secret && !v.is_table() {
                *v = Value::String("<redacted>".into());
            } else {
                redact(v);
            }
        }
    }
}

/// The host name made into a valid gateway id.
pub fn default_gateway_id() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .unwrap_or_default();
    let id: String = raw
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') {
                c
            } else {
                '-'
            }
        })
        .take(64)
        .collect();
    if gateway_actors::ingest::validate::is_valid_device_id(&id) {
        id
    } else {
        "gateway".into()
    }
}

// ------------------------------------------------------------------ settings

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    /// This gateway's id (in every record and object name).
    pub gateway_id: String,
    /// Where the WAL and the default archive live.
    pub data_dir: PathBuf,
    /// tracing EnvFilter directive.
    pub log_level: String,
    /// Rate limit of repeated log events (`log.repeat_burst`, `log.repeat_interval`).
    pub log_repeats: LogRepeats,
    /// HTTP server.
    pub http: HttpSettings,
    /// Ingest limits.
    pub ingest: IngestSettings,
    /// MQTT ingest.
    pub mqtt: MqttMode,
    /// WAL limits.
    pub wal: WalSettings,
    /// OTLP/HTTP base URL for traces (`otlp.endpoint`, without `/v1/traces`);
    /// `None` = traces off unless the standard `OTEL_EXPORTER_OTLP_*` variables say where.
    pub otlp_endpoint: Option<String>,
    /// The fleet channel (DESIGN §11); `None` without `fleet.url`.
    pub fleet: Option<FleetConfig>,
    /// Sinks by name.
    pub sinks: BTreeMap<String, SinkSettings>,
    /// `[[priority]]` rules, first match wins.
    pub priority: Vec<PriorityRule>,
    /// The effective configuration as TOML, secrets redacted (`config print`, `config.get`).
    pub rendered: String,
}

/// How often a repeated event (a device's rejections for one reason, a
/// sink's failures, reconnects) is logged in full: `burst` lines per key and
/// `interval`, then one summary line (`gateway_actors::repeats`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogRepeats {
    /// Full lines per key and interval.
    pub burst: u32,
    /// The interval.
    pub interval: Duration,
}

/// HTTP server settings.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    /// Listen address (port 0 picks a free port).
    pub addr: SocketAddr,
    /// Worker threads (0 = one per core).
    pub workers: usize,
    /// A request (headers and body) must arrive within this; else 408.
    pub request_timeout: Duration,
    /// Open connections the listener keeps at most (more wait in the backlog).
    pub max_connections: usize,
    /// Device tokens file (`device_id:sha256hex` lines).
    pub device_tokens_file: Option<PathBuf>,
    /// Admin token file.
    pub admin_token_file: Option<PathBuf>,
    /// Common name of the client certificate that may use the admin API
    /// (when HTTPS client authentication is on).
    pub admin_cert_cn: String,
    /// HTTPS.
    pub tls: Option<TlsSettings>,
}

/// HTTPS settings.
#[derive(Debug, Clone)]
pub struct TlsSettings {
    /// PEM certificate chain.
    pub cert_file: PathBuf,
    /// PEM private key.
    pub key_file: PathBuf,
    /// CA that client certificates must chain to (mTLS) when set.
    pub client_ca_file: Option<PathBuf>,
}

/// Ingest settings.
#[derive(Debug, Clone)]
pub struct IngestSettings {
    /// Size limits.
    pub limits: IngestLimits,
    /// Per-device rate limit.
    pub rate: RateLimit,
}

/// MQTT ingest mode.
#[derive(Debug, Clone)]
pub enum MqttMode {
    /// No MQTT ingest.
    Off,
    /// An in-process broker on `addr`; ingest subscribes to it.
    Embedded {
        /// Listen address of the embedded broker.
        addr: SocketAddr,
        /// The ingest client's settings (pointing at `addr`).
        ingest: MqttIngestConfig,
    },
    /// An external broker.
    Broker(MqttIngestConfig),
}

impl MqttMode {
    /// The ingest client settings, when MQTT ingest is on.
    pub fn ingest(&self) -> Option<&MqttIngestConfig> {
        match self {
            MqttMode::Off => None,
            MqttMode::Embedded { ingest, .. } | MqttMode::Broker(ingest) => Some(ingest),
        }
    }
}

/// WAL settings.
#[derive(Debug, Clone)]
pub struct WalSettings {
    /// Backpressure above this.
    pub max_bytes: u64,
    /// Backpressure below this much free disk.
    pub min_free_disk_bytes: u64,
    /// Delivered records kept this long.
    pub retention: Duration,
    /// Dedup window.
    pub dedup_window: Duration,
    /// What backpressure does.
    pub policy: BackpressurePolicy,
    /// Sink acknowledgements wait in memory at most this long before they
    /// are stored ([`WalConfig::ack_flush`]).
    pub ack_flush: Duration,
    /// The first append of a commit waits this long for others to share it
    /// ([`WalConfig::commit_window`]).
    pub commit_window: Duration,
}

/// One sink.
#[derive(Debug, Clone)]
pub struct SinkSettings {
    /// Batching, retries, pause.
    pub dispatch: DispatchConfig,
    /// Kind-specific target.
    pub target: SinkTarget,
    /// Route, TTLs and drain order (DESIGN §6a).
    pub policy: SinkPolicy,
}

impl Settings {
    /// The WAL engine configuration.
    pub fn wal_config(&self) -> WalConfig {
        WalConfig {
            path: self.data_dir.join("wal.db"),
            sinks: self.sinks.keys().cloned().collect(),
            retention: self.wal.retention,
            dedup_window: self.wal.dedup_window,
            max_bytes: self.wal.max_bytes,
            min_free_disk_bytes: self.wal.min_free_disk_bytes,
            policy: self.wal.policy,
            ack_flush: self.wal.ack_flush,
            commit_window: self.wal.commit_window,
        }
    }

    /// Defaults plus `overrides` (a TOML snippet), without environment: for tests.
    pub fn from_toml(overrides: &str) -> Result<Settings, ConfigError> {
        Loaded::check_text("file gateway.toml", overrides)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_alone_give_one_archive_sink_on_loopback() {
        let s = Settings::from_toml("").unwrap();
        assert_eq!(s.http.addr.to_string(), "127.0.0.1:8080");
        assert_eq!(s.sinks.len(), 1);
        match &s.sinks["archive"].target {
            SinkTarget::S3(c) => {
                assert_eq!(c.url, "file://./data/archive");
                // Bounded and compacted: `make run` left alone must not fill the disk.
                let k = c.keeper("archive").unwrap();
                assert_eq!((k.compact, k.max_bytes), (true, Some(1 << 30)));
                // A second of records an object (issue 31).
                assert_eq!(
                    s.sinks["archive"].dispatch.batch_max_wait,
                    Duration::from_secs(1)
                );
            }
            other => panic!("default sink is {other:?}"),
        }
        assert!(matches!(s.mqtt, MqttMode::Embedded { .. }));
        assert_eq!(s.wal.retention, Duration::from_secs(86400));
    }

    #[test]
    fn the_wal_holds_acks_a_second_and_groups_commits_within_bounds() {
        let s = Settings::from_toml("").unwrap();
        let w = s.wal_config();
        assert_eq!(w.ack_flush, Duration::from_secs(1));
        assert_eq!(w.commit_window, Duration::from_millis(30));
        let s =
            Settings::from_toml("[wal]\nack_flush = \"0s\"\ncommit_window = \"200ms\"\n").unwrap();
        assert_eq!(s.wal.ack_flush, Duration::ZERO);
        assert_eq!(s.wal.commit_window, Duration::from_millis(200));
        for (key, bad) in [
            ("ack_flush", "11s"),
            ("commit_window", "2s"),
            ("commit_window", "soon"),
        ] {
            let e = Settings::from_toml(&format!("[wal]\n{key} = \"{bad}\"\n"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(&format!("wal.{key}")), "{key} = {bad}: {e}");
        }
    }

    #[test]
    fn log_level_directives_must_end_in_a_level() {
        for ok in ["debug", "info,gateway_actors::dispatcher=debug", "WARN"] {
            assert!(
                Settings::from_toml(&format!("[log]\nlevel = \"{ok}\"\n")).is_ok(),
                "{ok}"
            );
        }
        // EnvFilter alone would take "debgu" as a target and log nothing.
        let e = Settings::from_toml("[log]\nlevel = \"debgu\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("log.level") && e.contains("debgu"), "{e}");
    }

    #[test]
    fn log_repeat_limits_default_to_five_a_minute_and_are_checked() {
        let s = Settings::from_toml("").unwrap();
        assert_eq!(
            s.log_repeats,
            LogRepeats {
                burst: 5,
                interval: Duration::from_secs(60)
            }
        );
        let s =
            Settings::from_toml("[log]\nrepeat_burst = 2\nrepeat_interval = \"10s\"\n").unwrap();
        assert_eq!(
            (s.log_repeats.burst, s.log_repeats.interval.as_secs()),
            (2, 10)
        );
        for (bad, key) in [
            ("repeat_burst = 0", "log.repeat_burst"),
            ("repeat_interval = \"500ms\"", "log.repeat_interval"),
            ("repeat_interval = \"often\"", "log.repeat_interval"),
        ] {
            let e = Settings::from_toml(&format!("[log]\n{bad}\n"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(key), "{bad}: {e}");
        }
    }

    #[test]
    fn otlp_endpoint_is_off_by_default_and_must_be_an_http_base_url() {
        assert_eq!(Settings::from_toml("").unwrap().otlp_endpoint, None);
        let s = Settings::from_toml("[otlp]\nendpoint = \"https://otel.example:4318/\"\n").unwrap();
        assert_eq!(
            s.otlp_endpoint.as_deref(),
            Some("https://otel.example:4318")
        );
        let e = Settings::from_toml("[otlp]\nendpoint = \"otel.example:4317\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("otlp.endpoint"), "{e}");
        assert_eq!(env_key_path("otlp_endpoint"), ["otlp", "endpoint"]);
    }

    #[test]
    fn an_invalid_file_value_names_the_key_and_the_file() {
        let err = Settings::from_toml("[http]\naddr = \"nonsense\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`http.addr`") && err.contains("file "),
            "{err}"
        );
        let err = Settings::from_toml("[wal]\npolicy = \"sometimes\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("`wal.policy`"), "{err}");
        let err = Settings::from_toml("[http]\nbogus = 1\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("bogus") && err.contains("file "), "{err}");
        let err = Settings::from_toml("[sinks.x]\nkind = \"s3\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("`sinks.x.url`"), "{err}");
    }

    #[test]
    fn every_sink_kind_checks_its_own_keys() {
        let cases = [
            ("[sinks.k]\nkind = \"kafka\"\nbrokers = \"b:9092\"\n", "`sinks.k.topic`"),
            ("[sinks.k]\nkind = \"kafka\"\nbrokers = \"b:9092\"\ntopic = \"t\"\ncompression = \"rar\"\n", "`sinks.k.compression`"),
            ("[sinks.h]\nkind = \"http\"\nurl = \"ftp://x\"\n", "`sinks.h.url`"),
            ("[sinks.h]\nkind = \"http\"\nurl = \"http://x\"\nformat = \"xml\"\n", "`sinks.h.format`"),
            ("[sinks.m]\nkind = \"mqtt\"\nurl = \"tcp://x\"\n", "`sinks.m.url`"),
            ("[sinks.m]\nkind = \"mqtt\"\nurl = \"mqtt://x\"\nca_file = \"/nope\"\n", "`sinks.m.url`"),
            ("[sinks.s]\nkind = \"s3\"\nurl = \"s3://b\"\nendpoint = \"minio:9000\"\n", "`sinks.s.endpoint`"),
            ("[sinks.s]\nkind = \"s3\"\nurl = \"s3://b\"\nretry_budget = 0\n", "`sinks.s.retry_budget`"),
            ("[sinks.x]\nkind = \"carrier-pigeon\"\n", "`sinks.x.kind`"),
            ("[sinks.m]\nkind = \"mqtt\"\nurl = \"mqtt://x\"\nversion = \"6\"\n", "`sinks.m.version`"),
        ];
        for (toml, key) in cases {
            let err = Settings::from_toml(toml).unwrap_err().to_string();
            assert!(err.contains(key), "{toml}: {err}");
        }
        let ok = Settings::from_toml(
            "[sinks.k]\nkind = \"kafka\"\nbrokers = \"b:9092\"\ntopic = \"t\"\n[sinks.k.librdkafka]\n\"linger.ms\" = \"20\"\n\
             [sinks.m]\nkind = \"mqtt\"\nurl = \"mqtt://cloud\"\n[sinks.h]\nkind = \"http\"\nurl = \"https://a/b\"\n",
        )
        .unwrap();
        assert_eq!(ok.sinks.len(), 3);
        match &ok.sinks["m"].target {
            SinkTarget::Mqtt(m) => assert_eq!((m.conn.host.as_str(), m.conn.port), ("cloud", 1883)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_fleet_bundle_sits_between_the_file_and_the_flags_and_is_named_in_errors() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("g.toml");
        std::fs::write(&file, "[http]\naddr = \"127.0.0.1:7001\"\nworkers = 1\n").unwrap();
        let bundle =
            serde_json::json!({"http": {"addr": "127.0.0.1:7002"}, "log": {"level": "debug"}});
        let s = Loaded::load_with_bundle(
            Some(&file),
            false,
            &FlagLayer::default(),
            Some((4, &bundle)),
        )
        .unwrap()
        .settings()
        .unwrap();
        assert_eq!((s.http.addr.port(), s.http.workers), (7002, 1));
        assert_eq!(s.log_level, "debug");
        let flags = FlagLayer {
            http_addr: Some("127.0.0.1:7003".into()),
            ..FlagLayer::default()
        };
        let s = Loaded::load_with_bundle(Some(&file), false, &flags, Some((4, &bundle)))
            .unwrap()
            .settings()
            .unwrap();
        assert_eq!(s.http.addr.port(), 7003);
        let bad = serde_json::json!({"http": {"addr": "nowhere"}});
        let err =
            Loaded::load_with_bundle(Some(&file), false, &FlagLayer::default(), Some((5, &bad)))
                .unwrap()
                .settings()
                .unwrap_err()
                .to_string();
        assert!(err.contains("set by bundle 5"), "{err}");
        let unknown = serde_json::json!({"htp": {}});
        let err = Loaded::load_with_bundle(None, false, &FlagLayer::default(), Some((6, &unknown)))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("bundle 6"), "{err}");
    }

    #[test]
    fn later_layers_override_earlier_ones_and_are_named_in_errors() {
        let flags = FlagLayer {
            http_addr: Some("bad".into()),
            ..FlagLayer::default()
        };
        let err = Loaded::load(None, false, &flags)
            .unwrap()
            .settings()
            .unwrap_err()
            .to_string();
        assert!(err.contains("flag --http-addr"), "{err}");
        let flags = FlagLayer {
            http_addr: Some("127.0.0.1:9999".into()),
            ..FlagLayer::default()
        };
        let s = Loaded::load(None, false, &flags)
            .unwrap()
            .settings()
            .unwrap();
        assert_eq!(s.http.addr.port(), 9999);
    }

    #[test]
    fn env_names_map_to_sections() {
        assert_eq!(
            env_key_path("http_device_tokens_file"),
            vec!["http", "device_tokens_file"]
        );
        assert_eq!(env_key_path("id"), vec!["gateway_id"]);
        assert_eq!(env_key_path("data_dir"), vec!["data_dir"]);
        assert_eq!(env_key_path("wal_max_bytes"), vec!["wal", "max_bytes"]);
        assert_eq!(
            env_key_path("fleet_trusted_keys_file"),
            vec!["fleet", "trusted_keys_file"]
        );
    }

    #[test]
    fn a_fleet_without_trusted_keys_or_with_a_bad_url_names_the_key() {
        assert!(Settings::from_toml("").unwrap().fleet.is_none());
        let e = Settings::from_toml("[fleet]\nurl = \"mqtt://127.0.0.1:1883\"\n").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("invalid `fleet.trusted_keys_file`"),
            "{e}"
        );
        let e = Settings::from_toml(
            "[fleet]\nurl = \"fleet.example.com\"\ntrusted_keys_file = \"/nonexistent\"\n",
        )
        .unwrap_err();
        assert!(e.to_string().starts_with("invalid `fleet.url`"), "{e}");
        let e = Settings::from_toml(
            "[fleet]\nurl = \"mqtt://h:1\"\ntrusted_keys_file = \"/nonexistent\"\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("/nonexistent"), "{e}");
    }

    #[test]
    fn printing_redacts_secrets() {
        let mut v: Value =
            toml::from_str("[sinks.h]\ntoken = \"s3cr3t\"\ntoken_file = \"/x\"\n").unwrap();
        redact(&mut v);
        let out = toml::to_string(&v).unwrap();
        assert!(!out.contains("s3cr3t") && out.contains("/x"), "{out}");
    }

    #[test]
    fn a_key_of_another_kind_or_no_kind_is_refused_naming_the_key_and_its_file() {
        let cases = [
            ("[sinks.h]\nkind = \"http\"\nurl = \"http://x\"\nbrokers = \"b:9092\"\n", "`sinks.h.brokers`"),
            ("[sinks.s]\nkind = \"s3\"\nurl = \"s3://b\"\npassword_file = \"/x\"\n", "`sinks.s.password_file`"),
            ("[sinks.k]\nkind = \"kafka\"\nbrokers = \"b\"\ntopic = \"t\"\nbatch_max_record = 5\n", "`sinks.k.batch_max_record`"),
            ("[sinks.n]\nurl = \"s3://b\"\n", "`sinks.n.kind`"),
        ];
        for (toml, key) in cases {
            let err = Settings::from_toml(toml).unwrap_err().to_string();
            assert!(
                err.contains(key) && err.contains("gateway.toml"),
                "{toml}: {err}"
            );
        }
    }

    #[test]
    fn every_shared_dispatch_key_is_a_field_of_dispatch_keys() {
        let mut t = toml::Table::new();
        for k in DispatchKeys::KEYS {
            let v = if *k == "paused" {
                Value::Boolean(true)
            } else if *k == "budget" {
                toml::toml! { bytes_per_s = 7 }.into()
            } else if *k == "quota" {
                toml::toml! { bytes = 7 }.into()
            } else if *k == "windows" {
                toml::toml! { low = ["01:00-05:00"] }.into()
            } else if *k == "live_share" {
                Value::Float(0.5)
            } else if *k == "reduce" {
                toml::toml! { deadband = { t = 1 } }.into()
            } else {
                Value::Integer(7)
            };
            t.insert(k.to_string(), v);
        }
        let keys: DispatchKeys = Value::Table(t).try_into().unwrap();
        // … and every field is listed in KEYS: serde names them all when it
        // refuses an unknown one.
        let mut t = toml::Table::new();
        t.insert("not_a_key".into(), Value::Boolean(true));
        let err = Value::Table(t)
            .try_into::<DispatchKeys>()
            .unwrap_err()
            .to_string();
        let fields: std::collections::BTreeSet<&str> = err
            .split("expected one of ")
            .nth(1)
            .unwrap_or_else(|| panic!("{err}"))
            .split(',')
            .map(|f| {
                f.trim()
                    .trim_matches(|c: char| c == '`' || c.is_whitespace())
            })
            .filter(|f| !f.is_empty())
            .collect();
        assert_eq!(
            fields,
            DispatchKeys::KEYS.iter().copied().collect(),
            "{err}"
        );
        let d = keys.build("x").unwrap();
        assert_eq!(d.batch_max_records, 7);
        assert_eq!(d.circuit_cooldown, Duration::from_millis(7));
        assert!(d.paused);
    }

    #[test]
    fn settings_never_print_a_secret_read_from_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "s3cr3t-token\n").unwrap();
        let s = Settings::from_toml(&format!(
            "[sinks.h]\nkind = \"http\"\nurl = \"http://x\"\ntoken_file = \"{}\"\n",
            token.display()
        ))
        .unwrap();
        match &s.sinks["h"].target {
            SinkTarget::Http(h) => assert_eq!(h.token.as_ref().unwrap().expose(), "s3cr3t-token"),
            other => panic!("{other:?}"),
        }
        let printed = format!("{s:?}");
        assert!(!printed.contains("s3cr3t"), "{printed}");
        assert!(!s.rendered.contains("s3cr3t"), "{}", s.rendered);
    }
}
