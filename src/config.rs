//! Layered configuration: compiled defaults < TOML file < fleet bundle <
//! `GATEWAY_*` environment < command-line flags, validated into one
//! [`Settings`].
//!
//! Each layer is parsed on its own (so a type error names the layer), the
//! layers are merged key by key while remembering which layer set each key,
//! and validation errors name the key and that layer. This file keeps the
//! layers, the origins and `config print`; each section owns its keys, the
//! way each sink kind does: a documented `…Keys` struct whose `build()`
//! checks them into the section's settings, next to those settings.
//!
//! Layout:
//! - `config/default.toml`: every default, and nowhere else.
//! - [`log`], [`http`], [`ingest`], [`mqtt`], [`wal`], [`otlp`]: the sections;
//!   `[fleet]` is `gateway_actors::fleet::FleetKeys`, `[sinks.NAME]` the
//!   sink kinds' keys (`gateway_actors::sink`), `[[priority]]`
//!   `gateway_actors::route`.
//! - `env`: how a `GATEWAY_*` variable names a key.
//!
//! A new key is one documented field of its section's `…Keys` plus its
//! default in `config/default.toml`; its variable, its origin and its line
//! in `config print` follow.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use gateway_actors::dispatcher::{DispatchConfig, DispatchKeys};
use gateway_actors::fleet::{FleetConfig, FleetKeys};
use gateway_actors::keys::KeyError;
use gateway_actors::route::{self, PriorityRule, SinkPolicy, MAX_SINKS};
use gateway_actors::sink::s3::{default_archive, DEFAULT_ARCHIVE};
pub use gateway_actors::sink::SinkTarget;
use gateway_actors::sink::{SinkConfig, SinkContext};
use gateway_actors::wal::WalConfig;
use serde::Deserialize;
use toml::Value;

mod env;
pub mod http;
pub mod ingest;
pub mod log;
pub mod mqtt;
pub mod otlp;
pub mod wal;

pub use http::{HttpSettings, TlsSettings};
pub use ingest::IngestSettings;
pub use log::LogRepeats;
pub use mqtt::MqttMode;
pub use wal::{WalSettings, MAX_ACK_FLUSH, MAX_COMMIT_WINDOW};

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

/// The whole tree as merged (and each layer on top of the defaults, to
/// check it): every section's keys, checked by the section's owner.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    /// This gateway's id (none: the host name).
    gateway_id: Option<String>,
    /// Where the WAL and the default archive live.
    data_dir: PathBuf,
    /// `[log]`.
    log: log::LogKeys,
    /// `[http]`: the listener.
    http: http::HttpKeys,
    /// `[ingest]`: limits on what devices send.
    ingest: ingest::IngestKeys,
    /// `[mqtt]`: MQTT ingest.
    mqtt: mqtt::MqttKeys,
    /// `[wal]`.
    wal: wal::WalKeys,
    /// `[otlp]`: traces.
    otlp: otlp::OtlpKeys,
    /// `[fleet]`, owned by `gateway_actors::fleet`.
    fleet: FleetKeys,
    /// Each `[sinks.NAME]` table as written: its keys belong to the kind
    /// (`gateway_actors::sink::SinkConfig`) and are checked in validation.
    #[serde(default)]
    sinks: BTreeMap<String, toml::Table>,
    /// `[[priority]]` rules as written (checked by `gateway_actors::route`).
    priority: Option<Value>,
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
    /// Every layer merged key by key, the highest winning; what `config
    /// print` shows.
    merged: Value,
    /// The layer that set each dotted key (`http.addr` → `env
    /// GATEWAY_HTTP_ADDR`), so that an error names it.
    origin: HashMap<String, String>,
}

/// Sets `path` in `tree` to `v`, making the tables on the way.
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

/// Merges `top` into `base` key by key, remembering `layer` as the
/// origin of every key it sets.
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

/// `layer` set `key` (and every key below it).
fn record_origin(v: &Value, key: &str, layer: &str, origin: &mut HashMap<String, String>) {
    if let Value::Table(t) = v {
        for (k, v) in t {
            record_origin(v, &format!("{key}.{k}"), layer, origin);
        }
    }
    origin.insert(key.to_string(), layer.to_string());
}

/// Whether `tree`, on top of the defaults, is a valid layer (else why).
pub(crate) fn fits(defaults: &Value, tree: &Value) -> Result<(), toml::de::Error> {
    let mut all = defaults.clone();
    merge_into(&mut all, tree.clone(), "", "", &mut HashMap::new());
    all.try_into::<RawConfig>().map(|_| ())
}

/// A layer that is not valid on its own is an error naming the layer.
fn check_layer(defaults: &Value, tree: &Value, layer: &str) -> Result<(), ConfigError> {
    fits(defaults, tree).map_err(|e| ConfigError::Layer {
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
        let env = use_env.then(|| {
            std::env::vars_os()
                .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
                .collect()
        });
        Self::from_layers(file, bundle, env, flags)
    }

    /// Validates a configuration file's text on its own (no environment,
    /// no flags), as `config check` does; `layer` names it in errors.
    pub fn check_text(layer: &str, text: &str) -> Result<Settings, ConfigError> {
        Self::from_layers(
            Some((layer.to_string(), text.to_string())),
            None,
            None,
            &FlagLayer::default(),
        )?
        .settings()
    }

    /// The compiled defaults, then the file's (layer, text), the bundle's
    /// (layer, tree), the environment's variables (name, value) and the
    /// flags.
    fn from_layers(
        file: Option<(String, String)>,
        bundle: Option<(String, Value)>,
        env: Option<Vec<(String, String)>>,
        flags: &FlagLayer,
    ) -> Result<Self, ConfigError> {
        let mut origin = HashMap::new();
        let defaults: Value = toml::from_str(DEFAULTS_TOML).map_err(|e| ConfigError::Layer {
            layer: "compiled defaults".into(),
            message: e.to_string(),
        })?;
        check_layer(
            &defaults,
            &Value::Table(Default::default()),
            "compiled defaults",
        )?;
        let mut merged = Value::Table(Default::default());
        merge_into(&mut merged, defaults.clone(), "", "default", &mut origin);

        if let Some((layer, text)) = file {
            let tree: Value = toml::from_str(&text).map_err(|e| ConfigError::Layer {
                layer: layer.clone(),
                message: e.to_string(),
            })?;
            check_layer(&defaults, &tree, &layer)?;
            merge_into(&mut merged, tree, "", &layer, &mut origin);
        }

        if let Some((layer, tree)) = bundle {
            check_layer(&defaults, &tree, &layer)?;
            merge_into(&mut merged, tree, "", &layer, &mut origin);
        }

        if let Some(vars) = env {
            let sections: Vec<String> = match &defaults {
                Value::Table(t) => t
                    .iter()
                    .filter(|(_, v)| v.is_table())
                    .map(|(k, _)| k.clone())
                    .collect(),
                _ => Vec::new(),
            };
            for (layer, tree) in env::layers(vars, &sections, |t| {
                fits(&defaults, t).map_err(|e| e.message().to_string())
            })? {
                merge_into(&mut merged, tree, "", &layer, &mut origin);
            }
        }

        let flag_values: [(&str, Option<String>, &[&str]); 5] = [
            ("--gateway-id", flags.gateway_id.clone(), &["gateway_id"]),
            (
                "--data-dir",
                flags.data_dir.as_ref().map(|p| p.display().to_string()),
                &["data_dir"],
            ),
            ("--http-addr", flags.http_addr.clone(), &["http", "addr"]),
            ("--mqtt-url", flags.mqtt_url.clone(), &["mqtt", "url"]),
            ("--log-level", flags.log_level.clone(), &["log", "level"]),
        ];
        for (flag, v, path) in flag_values {
            if let Some(v) = v {
                let path: Vec<String> = path.iter().map(|s| s.to_string()).collect();
                let tree = env::tree_at(&path, Value::String(v));
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

    /// A section's [`KeyError`] as the error that names the full key
    /// (`{prefix}.{key}`) and the layer that set it.
    fn in_section<'a>(&'a self, prefix: &'a str) -> impl Fn(KeyError) -> ConfigError + 'a {
        move |e| self.invalid(&format!("{prefix}.{}", e.key), e.message)
    }

    /// Validates the merged layers into [`Settings`]: each section by its
    /// owner, in the order the sections depend on each other.
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
        let data_dir = raw.data_dir.clone();
        if data_dir.as_os_str().is_empty() {
            return Err(self.invalid("data_dir", "must not be empty"));
        }
        let log = raw.log.build().map_err(self.in_section("log"))?;
        let otlp_endpoint = raw.otlp.build().map_err(self.in_section("otlp"))?;
        let http = raw.http.build().map_err(self.in_section("http"))?;
        let ingest = raw.ingest.build().map_err(self.in_section("ingest"))?;
        let mqtt = raw
            .mqtt
            .build(&gateway_id, ingest.limits.max_payload_bytes)
            .map_err(self.in_section("mqtt"))?;
        let wal = raw.wal.build().map_err(self.in_section("wal"))?;
        let fleet = raw
            .fleet
            .build(&gateway_id, wal.max_bytes)
            .map_err(self.in_section("fleet"))?;

        let mut raw_sinks = raw.sinks.clone();
        if raw_sinks.is_empty() {
            raw_sinks.insert(DEFAULT_ARCHIVE.into(), default_archive_table(&data_dir));
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
            log_level: log.level,
            log_repeats: log.repeats,
            http,
            ingest,
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
                let archive = default_archive_table(&settings.data_dir);
                sinks.insert(DEFAULT_ARCHIVE.into(), Value::Table(archive));
                t.insert("sinks".into(), Value::Table(sinks));
            }
        }
        redact(&mut tree);
        toml::to_string_pretty(&tree).unwrap_or_default()
    }
}

/// The zero-config archive's keys ([`default_archive`]) as a TOML table.
fn default_archive_table(data_dir: &Path) -> toml::Table {
    let keys = serde_json::Value::Object(default_archive(data_dir));
    match Value::try_from(keys) {
        Ok(Value::Table(t)) => t,
        _ => unreachable!("a JSON object of strings and integers is a TOML table"),
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
            checkpoint_every: WalConfig::CHECKPOINT_EVERY,
        }
    }

    /// Defaults plus `overrides` (a TOML snippet), without environment: for tests.
    pub fn from_toml(overrides: &str) -> Result<Settings, ConfigError> {
        Loaded::check_text("file gateway.toml", overrides)
    }
}

#[cfg(test)]
mod tests;
