//! The operator's commands, implemented once: the MQTT control plane, the
//! admin API and the CLI all build a [`Command`] and hand it to
//! [`Operator::execute`], which runs it, counts it
//! (`gateway_control_commands_total`) and writes an audit log line (target
//! `audit`: who, what, result).
//!
//! An `Operator` without live actors (the CLI on a stopped gateway's data
//! dir) runs the same commands: WAL actions go to a `WalStore` the CLI
//! started, settings are persisted in `runtime.json` and apply at the next
//! start.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use actix::Addr;
use serde::Deserialize;
use serde_json::{json, Value};

use super::runtime::{RuntimeOverrides, Setting};
use crate::dispatcher::{
    DispatchConfig, Dispatcher, GetSinkState, SetBudget, SetLive, SetLiveShare, SetPaused,
    SetQuota, SetReduce, SetRetry, SetWindows,
};
use crate::ingest::validate::is_valid_device_id;
use crate::ingest::validate::{parse_payload, Enrichment};
use crate::ingest::{IngestLimits, IngestRouters, RateLimit, Source};
use crate::metrics::Metrics;
use crate::mqtt::topics::Topics;
use crate::route::{PriorityRule, Routing, SinkPolicy};
use crate::wal::{DlqFilter, WalError, WalReader, WalStats, WalStore, WithWal};

/// Most dead letters one `dlq.list` returns.
pub const DLQ_LIST_MAX: u64 = 10_000;

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    /// The command or its arguments are wrong (HTTP 400).
    #[error("{0}")]
    BadRequest(String),
    /// No such sink (HTTP 404).
    #[error("unknown sink {0:?}")]
    UnknownSink(String),
    /// No such command (HTTP 404).
    #[error("unknown command {0:?}")]
    UnknownCommand(String),
    /// Something it needs is not running (HTTP 503).
    #[error("{0}")]
    Unavailable(String),
    /// Storage failed (HTTP 500).
    #[error("{0}")]
    Internal(String),
}

impl OpError {
    /// The machine-readable code of the error body.
    pub fn code(&self) -> &'static str {
        match self {
            OpError::BadRequest(_) => "bad_request",
            OpError::UnknownSink(_) => "unknown_sink",
            OpError::UnknownCommand(_) => "unknown_command",
            OpError::Unavailable(_) => "unavailable",
            OpError::Internal(_) => "internal",
        }
    }

    /// `{"code":…,"message":…}`.
    pub fn to_json(&self) -> Value {
        json!({"code": self.code(), "message": self.to_string()})
    }
}

impl From<WalError> for OpError {
    fn from(e: WalError) -> Self {
        match e {
            WalError::UnknownSink(s) => OpError::UnknownSink(s),
            WalError::Invalid(m) => OpError::BadRequest(m),
            WalError::Backpressure(_) | WalError::Unavailable(_) => {
                OpError::Unavailable(e.to_string())
            }
            WalError::Storage(_) | WalError::Dir { .. } => OpError::Internal(e.to_string()),
        }
    }
}

/// One operator command.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// `ping`: is the gateway there?
    Ping,
    /// `config.get`: runtime settings in force and the effective configuration.
    ConfigGet,
    /// `config.set`: change runtime settings (see `runtime::SETTABLE_KEYS`).
    ConfigSet(Vec<(String, Value)>),
    /// `device.send`: publish `payload` to `devices/{device_id}/control`, QoS 1.
    DeviceSend {
        /// The device.
        device_id: String,
        /// What to send (JSON).
        payload: Value,
    },
    /// `dlq.list`.
    DlqList(DlqFilter),
    /// `dlq.requeue`.
    DlqRequeue(DlqFilter),
    /// `dlq.purge` (a sink must be named).
    DlqPurge(DlqFilter),
    /// `replay`: re-deliver retained records received in `[since, until)` to one sink.
    Replay {
        /// The sink.
        sink: String,
        /// From (epoch ms, inclusive).
        since_ms: i64,
        /// To (epoch ms, exclusive).
        until_ms: i64,
    },
    /// `sinks.list`.
    SinksList,
    /// `sink.pause`.
    SinkPause(String),
    /// `sink.resume`.
    SinkResume(String),
    /// `wal.stats`.
    WalStats,
    /// `wal.check`.
    WalCheck {
        /// Repair what is safe to repair.
        repair: bool,
    },
    /// `wal.compact`.
    WalCompact,
    /// `tls.reload`: read every TLS file again (HTTPS, MQTT connections,
    /// sinks with TLS files).
    TlsReload,
    /// `route.test`: which class and sinks a record would get now.
    RouteTest {
        /// The device.
        device_id: String,
        /// The telemetry (a JSON object or array), as a device sends it.
        payload: Value,
        /// `mqtt` or `http` (default `http`, or `mqtt` with a topic).
        source: Source,
        /// An MQTT topic: read by the topic templates for the device id and tags.
        topic: Option<String>,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoArgs {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigSetArgs {
    #[serde(default)]
    settings: Option<serde_json::Map<String, Value>>,
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    value: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeviceSendArgs {
    device_id: String,
    payload: Value,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplayArgs {
    sink: String,
    #[serde(deserialize_with = "crate::wal::time_ms")]
    since: i64,
    #[serde(deserialize_with = "crate::wal::time_ms")]
    until: i64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteTestArgs {
    device_id: String,
    payload: Value,
    #[serde(default)]
    source: Option<String>,
    #[serde(default)]
    topic: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SinkArgs {
    sink: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckArgs {
    #[serde(default)]
    repair: bool,
}

fn args<T: for<'de> Deserialize<'de>>(command: &str, v: Value) -> Result<T, OpError> {
    let v = if v.is_null() { json!({}) } else { v };
    serde_json::from_value(v).map_err(|e| OpError::BadRequest(format!("{command}: {e}")))
}

impl Command {
    /// Builds a command from its name and JSON arguments (an object, or
    /// null for none).
    pub fn parse(name: &str, a: Value) -> Result<Command, OpError> {
        Ok(match name {
            "ping" => {
                args::<NoArgs>(name, a)?;
                Command::Ping
            }
            "config.get" => {
                args::<NoArgs>(name, a)?;
                Command::ConfigGet
            }
            "config.set" => {
                let c: ConfigSetArgs = args(name, a)?;
                let mut entries: Vec<(String, Value)> = Vec::new();
                if let Some(map) = c.settings {
                    entries.extend(map);
                }
                match (c.key, c.value) {
                    (Some(k), Some(v)) => entries.push((k, v)),
                    (None, None) => {}
                    _ => {
                        return Err(OpError::BadRequest(
                            "config.set: give both \"key\" and \"value\"".into(),
                        ))
                    }
                }
                if entries.is_empty() {
                    return Err(OpError::BadRequest(
                        "config.set: nothing to set; give {\"key\":…,\"value\":…} or {\"settings\":{…}}"
                            .into(),
                    ));
                }
                Command::ConfigSet(entries)
            }
            "device.send" => {
                let d: DeviceSendArgs = args(name, a)?;
                Command::DeviceSend {
                    device_id: d.device_id,
                    payload: d.payload,
                }
            }
            "dlq.list" => Command::DlqList(args(name, a)?),
            "dlq.requeue" => Command::DlqRequeue(args(name, a)?),
            "dlq.purge" => Command::DlqPurge(args(name, a)?),
            "replay" => {
                let r: ReplayArgs = args(name, a)?;
                Command::Replay {
                    sink: r.sink,
                    since_ms: r.since,
                    until_ms: r.until,
                }
            }
            "sinks.list" => {
                args::<NoArgs>(name, a)?;
                Command::SinksList
            }
            "sink.pause" => Command::SinkPause(args::<SinkArgs>(name, a)?.sink),
            "sink.resume" => Command::SinkResume(args::<SinkArgs>(name, a)?.sink),
            "wal.stats" => {
                args::<NoArgs>(name, a)?;
                Command::WalStats
            }
            "wal.check" => Command::WalCheck {
                repair: args::<CheckArgs>(name, a)?.repair,
            },
            "wal.compact" => {
                args::<NoArgs>(name, a)?;
                Command::WalCompact
            }
            "tls.reload" => {
                args::<NoArgs>(name, a)?;
                Command::TlsReload
            }
            "route.test" => {
                let r: RouteTestArgs = args(name, a)?;
                let source = match (r.source.as_deref(), &r.topic) {
                    (Some("mqtt"), _) | (None, Some(_)) => Source::Mqtt,
                    (Some("http"), None) | (None, None) => Source::Http,
                    (Some("http"), Some(_)) => {
                        return Err(OpError::BadRequest(
                            "route.test: a topic means source mqtt".into(),
                        ))
                    }
                    (Some(other), _) => {
                        return Err(OpError::BadRequest(format!(
                            "route.test: source {other:?}: expected mqtt or http"
                        )))
                    }
                };
                Command::RouteTest {
                    device_id: r.device_id,
                    payload: r.payload,
                    source,
                    topic: r.topic,
                }
            }
            other => return Err(OpError::UnknownCommand(other.to_string())),
        })
    }

    /// The command's name (metric label, audit log).
    pub fn name(&self) -> &'static str {
        match self {
            Command::Ping => "ping",
            Command::ConfigGet => "config.get",
            Command::ConfigSet(_) => "config.set",
            Command::DeviceSend { .. } => "device.send",
            Command::DlqList(_) => "dlq.list",
            Command::DlqRequeue(_) => "dlq.requeue",
            Command::DlqPurge(_) => "dlq.purge",
            Command::Replay { .. } => "replay",
            Command::SinksList => "sinks.list",
            Command::SinkPause(_) => "sink.pause",
            Command::SinkResume(_) => "sink.resume",
            Command::WalStats => "wal.stats",
            Command::WalCheck { .. } => "wal.check",
            Command::WalCompact => "wal.compact",
            Command::RouteTest { .. } => "route.test",
            Command::TlsReload => "tls.reload",
        }
    }
}

/// Checks and sets the process's log level (the logger lives in the
/// binary crate).
pub trait LogControl: Send + Sync {
    /// Is `level` a valid level or filter directive?
    fn check(&self, level: &str) -> Result<(), String>;
    /// Makes `level` the log level now.
    fn set(&self, level: &str) -> Result<(), String>;
}

/// Reads every TLS file again (HTTPS certificate, key and client CA; the
/// MQTT connections' CA and client certificates; sinks with TLS files) and
/// applies what loads: the parts reloaded, or why one was refused (set by
/// the running gateway; SIGHUP uses the same hook).
pub type TlsReloader =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<Vec<String>, String>>>> + Send + Sync>;

/// Publishes `payload` at QoS 1 on `topic` (set by the control plane's MQTT client).
pub type DevicePublisher =
    Arc<dyn Fn(String, Vec<u8>) -> Pin<Box<dyn Future<Output = Result<(), String>>>> + Send + Sync>;

/// What an [`Operator`] works with.
pub struct OperatorParts {
    /// This gateway's id.
    pub gateway_id: String,
    /// The data dir (`runtime.json` lives there).
    pub data_dir: PathBuf,
    /// The WAL actor.
    pub wal: Addr<WalStore>,
    /// Read-only WAL connections.
    pub reader: WalReader,
    /// The ingest routers, when the gateway runs.
    pub router: Option<IngestRouters>,
    /// The configured rate limit (before runtime overrides).
    pub base_rate: RateLimit,
    /// The configured log level (before runtime overrides).
    pub base_log_level: String,
    /// Every configured sink's dispatch settings (before overrides) and its
    /// dispatcher when the gateway runs.
    pub sinks: BTreeMap<String, (DispatchConfig, Option<Addr<Dispatcher>>)>,
    /// Runtime overrides as loaded at start.
    pub runtime: RuntimeOverrides,
    /// The log level switch.
    pub log: Arc<dyn LogControl>,
    /// The effective configuration, secrets redacted (for `config.get`).
    pub config_text: String,
    /// The configured `[[priority]]` rules (before runtime overrides).
    pub base_priority: Vec<PriorityRule>,
    /// Every sink's configured route, TTLs and drain order (before overrides).
    pub base_policies: BTreeMap<String, SinkPolicy>,
    /// MQTT topic templates (`route.test` with a topic).
    pub topics: Topics,
    /// Ingest limits (`route.test` validates like ingest).
    pub limits: IngestLimits,
    /// Metrics.
    pub metrics: Metrics,
}

/// Runs operator commands. Shared (`Arc`) by the control plane, the admin
/// API and the CLI.
pub struct Operator {
    p: OperatorParts,
    runtime: Mutex<RuntimeOverrides>,
    devices: Mutex<Option<DevicePublisher>>,
    tls: Mutex<Option<TlsReloader>>,
    started: Instant,
}

fn audit_args(cmd: &Command) -> String {
    let mut s = format!("{cmd:?}");
    if s.len() > 300 {
        let mut cut = 300;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
    s
}

impl Operator {
    /// An operator over `parts`.
    pub fn new(mut parts: OperatorParts) -> Self {
        let runtime = std::mem::take(&mut parts.runtime);
        if parts.router.is_some() {
            // The dispatchers learn the drain order (for `live_share`).
            for (name, (_, d)) in &parts.sinks {
                if let (Some(d), Some(base)) = (d, parts.base_policies.get(name)) {
                    d.do_send(SetLive(live_after(&runtime.policy(name, base))));
                }
            }
        }
        Self {
            p: parts,
            runtime: Mutex::new(runtime),
            devices: Mutex::new(None),
            tls: Mutex::new(None),
            started: Instant::now(),
        }
    }

    /// The WAL reader (for streaming exports).
    pub fn reader(&self) -> &WalReader {
        &self.p.reader
    }

    /// Sets (or clears, when the MQTT client is gone) the device publisher.
    pub fn set_device_publisher(&self, p: Option<DevicePublisher>) {
        if let Ok(mut g) = self.devices.lock() {
            *g = p;
        }
    }

    /// Sets the TLS reload hook (something has TLS on).
    pub fn set_tls_reloader(&self, r: Option<TlsReloader>) {
        if let Ok(mut g) = self.tls.lock() {
            *g = r;
        }
    }

    fn overrides(&self) -> RuntimeOverrides {
        self.runtime.lock().map(|g| g.clone()).unwrap_or_default()
    }

    /// Runs `cmd` for `actor` (who asked: `mqtt`, `admin-http`, `cli`), counts
    /// it and audit-logs it.
    pub async fn execute(&self, cmd: Command, actor: &str) -> Result<Value, OpError> {
        let name = cmd.name();
        let args = audit_args(&cmd);
        let res = self.run(cmd).await;
        let outcome = if res.is_ok() { "ok" } else { "error" };
        self.p
            .metrics
            .control_commands
            .with_label_values(&[name, outcome])
            .inc();
        match &res {
            Ok(_) => {
                tracing::info!(target: "audit", actor, command = name, args = %args, outcome, "operator command")
            }
            Err(e) => {
                tracing::warn!(target: "audit", actor, command = name, args = %args, outcome, error = %e, "operator command")
            }
        }
        res
    }

    async fn with_wal<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut crate::wal::Wal) -> Result<R, WalError> + Send + 'static,
    ) -> Result<R, OpError> {
        match self.p.wal.send(WithWal::new(f)).await {
            Ok(r) => r.map_err(OpError::from),
            Err(e) => Err(OpError::Unavailable(format!("WAL actor unavailable: {e}"))),
        }
    }

    fn known_sink(&self, sink: &str) -> Result<(), OpError> {
        if self.p.sinks.contains_key(sink) {
            Ok(())
        } else {
            Err(OpError::UnknownSink(sink.to_string()))
        }
    }

    async fn run(&self, cmd: Command) -> Result<Value, OpError> {
        match cmd {
            Command::Ping => Ok(json!({
                "pong": true,
                "gateway_id": self.p.gateway_id,
                "version": env!("CARGO_PKG_VERSION"),
                "uptime_s": self.started.elapsed().as_secs(),
                "live": self.p.router.is_some(),
            })),
            Command::ConfigGet => Ok(json!({
                "gateway_id": self.p.gateway_id,
                "runtime": self.effective().await,
                "overrides": self.overrides(),
                "config": self.p.config_text,
            })),
            Command::ConfigSet(entries) => self.config_set(entries).await,
            Command::SinkPause(sink) | Command::SinkResume(sink)
                if !self.p.sinks.contains_key(&sink) =>
            {
                Err(OpError::UnknownSink(sink))
            }
            Command::SinkPause(sink) => {
                self.config_set(vec![(format!("sinks.{sink}.paused"), Value::Bool(true))])
                    .await
            }
            Command::SinkResume(sink) => {
                self.config_set(vec![(format!("sinks.{sink}.paused"), Value::Bool(false))])
                    .await
            }
            Command::DeviceSend { device_id, payload } => {
                if !is_valid_device_id(&device_id) {
                    return Err(OpError::BadRequest(format!(
                        "device.send: {device_id:?} is not a valid device id"
                    )));
                }
                let publisher = self.devices.lock().ok().and_then(|g| g.clone());
                let Some(publish) = publisher else {
                    return Err(OpError::Unavailable(
                        "device.send needs MQTT: the control plane has no broker connection".into(),
                    ));
                };
                let topic = format!("devices/{device_id}/control");
                let bytes =
                    serde_json::to_vec(&payload).map_err(|e| OpError::Internal(e.to_string()))?;
                let size = bytes.len();
                publish(topic.clone(), bytes)
                    .await
                    .map_err(OpError::Unavailable)?;
                Ok(json!({"topic": topic, "qos": 1, "bytes": size}))
            }
            Command::DlqList(f) => {
                let (total, list, next) = self.dead_letters(f)?;
                Ok(json!({"total": total, "dead_letters": list, "next_after_seq": next}))
            }
            Command::DlqRequeue(f) => {
                let n = self.with_wal(move |w| w.requeue(&f)).await?;
                Ok(json!({"requeued": n}))
            }
            Command::DlqPurge(f) => {
                let Some(sink) = &f.sink else {
                    return Err(OpError::BadRequest(
                        "dlq.purge: name the sink whose dead letters to delete".into(),
                    ));
                };
                self.known_sink(sink)?;
                let n = self.with_wal(move |w| w.purge(&f)).await?;
                Ok(json!({"purged": n}))
            }
            Command::Replay {
                sink,
                since_ms,
                until_ms,
            } => {
                self.known_sink(&sink)?;
                let out = self
                    .with_wal(move |w| w.replay(&sink, since_ms, until_ms))
                    .await?;
                Ok(serde_json::to_value(out).unwrap_or_default())
            }
            Command::SinksList => Ok(self.sinks_report().await?.1),
            Command::WalStats => {
                let stats = self.with_wal(|w| w.stats()).await?;
                let now = crate::wal::now_ms();
                let mut v = serde_json::to_value(&stats).unwrap_or_default();
                for (name, s) in &stats.sinks {
                    v["sinks"][name]["oldest_pending_age_s"] =
                        json!(s.oldest_pending_ms.map(|ms| (now - ms).max(0) / 1000));
                }
                Ok(v)
            }
            Command::WalCheck { repair } => {
                let rep = self.with_wal(move |w| w.check(repair)).await?;
                Ok(serde_json::to_value(rep).unwrap_or_default())
            }
            Command::RouteTest {
                device_id,
                payload,
                source,
                topic,
            } => self.route_test(device_id, payload, source, topic),
            Command::TlsReload => {
                let hook = self.tls.lock().ok().and_then(|g| g.clone());
                let Some(reload) = hook else {
                    return Err(OpError::BadRequest(
                        "tls.reload: no TLS is configured (http.tls_cert_file, mqtts:// connections)"
                            .into(),
                    ));
                };
                let parts = reload().await.map_err(|e| {
                    OpError::BadRequest(format!("tls.reload: {e}; the current certificate stays"))
                })?;
                Ok(json!({"reloaded": true, "parts": parts}))
            }
            Command::WalCompact => {
                let (c, d, bytes) = self
                    .with_wal(|w| {
                        let (c, d) = w.compact_now()?;
                        Ok((c, d, w.stats()?.live_bytes))
                    })
                    .await?;
                Ok(json!({"compacted": c, "dropped": d, "live_bytes": bytes}))
            }
        }
    }

    /// The WAL's counts and every sink's state, as `sinks.list` (and so
    /// `GET /admin/sinks`) shows it: name, `running` (its dispatcher is
    /// alive; null on a stopped gateway), `state` (paused, circuit, failures
    /// in a row, settings), `condition` (one word: [`condition`]), `wal`
    /// (backlog, oldest pending, dead letters) and `last_error` (redacted). The fleet state report reads the same.
    pub async fn sinks_report(&self) -> Result<(WalStats, Value), OpError> {
        let stats = self.with_wal(|w| w.stats()).await?;
        let states = self.effective().await;
        let mut out = Vec::new();
        for (name, (_, disp)) in &self.p.sinks {
            let running = disp.as_ref().map(Addr::connected);
            out.push(json!({
                "name": name,
                "running": running,
                "condition": condition(running, &states["sinks"][name]),
                "state": states["sinks"][name],
                "wal": stats.sinks.get(name),
                "last_error": self.p.metrics.sink_last_error.get(name),
            }));
        }
        Ok((stats, Value::Array(out)))
    }

    /// The dead letters `f` selects, as `dlq.list` (and so `GET
    /// /admin/dlq`) lists them: the total matching, one page (`f.limit`,
    /// default 100) in seq order, and the seq to continue after. The status
    /// page reads the same, without an audit line per poll.
    pub fn dead_letters(
        &self,
        mut f: DlqFilter,
    ) -> Result<(u64, Vec<crate::wal::DeadLetter>, Option<u64>), OpError> {
        if let Some(s) = &f.sink {
            self.known_sink(s)?;
        }
        let limit = f.limit.unwrap_or(100).clamp(1, DLQ_LIST_MAX);
        f.limit = Some(limit);
        let reader = &self.p.reader;
        let total = reader.count_dead(&DlqFilter {
            after_seq: None,
            limit: None,
            ..f.clone()
        })?;
        let list = reader.list_dead(&f)?;
        let next = (list.len() as u64 == limit)
            .then(|| list.last().map(|d| d.seq))
            .flatten();
        Ok((total, list, next))
    }

    /// This gateway's id.
    pub fn gateway_id(&self) -> &str {
        &self.p.gateway_id
    }

    /// Time since this operator (the gateway) started.
    pub fn uptime(&self) -> std::time::Duration {
        self.started.elapsed()
    }

    /// The routes and priority rules in force.
    async fn routing(&self, o: &RuntimeOverrides) -> Result<Routing, OpError> {
        let bits = self.with_wal(|w| Ok(w.sink_bits())).await?;
        Ok(o.routing(&self.p.base_priority, &self.p.base_policies, &bits))
    }

    fn route_test(
        &self,
        device_id: String,
        payload: Value,
        source: Source,
        topic: Option<String>,
    ) -> Result<Value, OpError> {
        let p = &self.p;
        let routing = self.overrides().routing(
            &p.base_priority,
            &p.base_policies,
            &bits_by_name(&p.base_policies),
        );
        route_test(
            &RouteTestContext {
                gateway_id: &p.gateway_id,
                routing: &routing,
                topics: &p.topics,
                limits: &p.limits,
            },
            device_id,
            payload,
            source,
            topic,
        )
    }

    /// The runtime settings in force.
    async fn effective(&self) -> Value {
        let o = self.overrides();
        let rate = o.rate_limit(self.p.base_rate);
        let mut sinks = serde_json::Map::new();
        for (name, (base, disp)) in &self.p.sinks {
            let live = match disp {
                Some(d) => d.send(GetSinkState).await.ok(),
                None => None,
            };
            let v = match live {
                Some(s) => serde_json::to_value(s).unwrap_or_default(),
                None => {
                    let mut d = base.clone();
                    o.apply_to(&mut d);
                    json!({
                        "paused": d.paused,
                        "retry_budget": d.retry_budget,
                        "retry_base_ms": d.retry_base.as_millis() as u64,
                        "retry_max_ms": d.retry_max.as_millis() as u64,
                        "budget": d.budget,
                        "quota": d.quota,
                        "windows": d.windows.as_ref().map(crate::uplink::Windows::to_json),
                        "live_share": d.live_share,
                        "reduce": d.reduce.as_ref().map(crate::reduce::Reduce::to_json),
                    })
                }
            };
            let mut v = v;
            if let (Some(base), Value::Object(m)) = (self.p.base_policies.get(name), &mut v) {
                m.extend(policy_json(&o.policy(name, base)));
            }
            sinks.insert(name.clone(), v);
        }
        json!({
            "log.level": o.log_level.clone().unwrap_or_else(|| self.p.base_log_level.clone()),
            "ingest.rate_limit_per_device": rate.per_second,
            "ingest.rate_limit_burst": rate.burst,
            "priority": o.priority.clone().unwrap_or_else(|| self.p.base_priority.clone()),
            "sinks": sinks,
        })
    }

    async fn config_set(&self, entries: Vec<(String, Value)>) -> Result<Value, OpError> {
        let names: Vec<String> = self.p.sinks.keys().cloned().collect();
        let mut settings = Vec::with_capacity(entries.len());
        for (k, v) in &entries {
            let s = Setting::parse(k, v, &names).map_err(OpError::BadRequest)?;
            if let Setting::LogLevel(l) = &s {
                self.p
                    .log
                    .check(l)
                    .map_err(|e| OpError::BadRequest(format!("log.level: {e}")))?;
            }
            settings.push(s);
        }
        // Persist first: what was accepted survives a restart even if a
        // live actor is restarting right now.
        let updated = {
            let mut g = self
                .runtime
                .lock()
                .map_err(|_| OpError::Internal("runtime settings lock poisoned".into()))?;
            let mut next = g.clone();
            for s in &settings {
                next.set(s);
            }
            next.save(&self.p.data_dir).map_err(OpError::Internal)?;
            *g = next.clone();
            next
        };
        let live = self.p.router.is_some();
        if live {
            for s in &settings {
                self.apply(s, &updated).await?;
            }
        }
        Ok(json!({
            "set": entries.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>(),
            "persisted": true,
            "applied": live,
            "runtime": self.effective().await,
        }))
    }

    async fn apply(&self, s: &Setting, o: &RuntimeOverrides) -> Result<(), OpError> {
        let unavailable = |e: actix::MailboxError| OpError::Unavailable(e.to_string());
        match s {
            Setting::LogLevel(l) => self.p.log.set(l).map_err(OpError::Internal),
            Setting::RatePerDevice(_) | Setting::RateBurst(_) => {
                if let Some(r) = &self.p.router {
                    r.set_rate_limit(o.rate_limit(self.p.base_rate));
                }
                Ok(())
            }
            Setting::Paused(sink, p) => match self.p.sinks.get(sink) {
                Some((_, Some(d))) => d.send(SetPaused(*p)).await.map_err(unavailable),
                _ => Ok(()),
            },
            Setting::Budget(sink, b) => match self.p.sinks.get(sink) {
                Some((_, Some(d))) => d.send(SetBudget(*b)).await.map_err(unavailable),
                _ => Ok(()),
            },
            Setting::LiveShare(sink, v) => match self.p.sinks.get(sink) {
                Some((_, Some(d))) => d.send(SetLiveShare(*v)).await.map_err(unavailable),
                _ => Ok(()),
            },
            Setting::Windows(sink, w) => match self.p.sinks.get(sink) {
                Some((_, Some(d))) => d.send(SetWindows(w.clone())).await.map_err(unavailable),
                _ => Ok(()),
            },
            Setting::Reduce(sink, r) => match self.p.sinks.get(sink) {
                Some((_, Some(d))) => d.send(SetReduce(r.clone())).await.map_err(unavailable),
                _ => Ok(()),
            },
            Setting::Quota(sink, q) => match self.p.sinks.get(sink) {
                Some((_, Some(d))) => d.send(SetQuota(*q)).await.map_err(unavailable),
                _ => Ok(()),
            },
            Setting::Policy(..) | Setting::Priority(_) => {
                let routing = self.routing(o).await?;
                if let Some(r) = &self.p.router {
                    r.set_routing(Arc::new(routing));
                }
                if let Setting::Policy(sink, ..) = s {
                    if let Some(base) = self.p.base_policies.get(sink) {
                        if let Some((_, Some(d))) = self.p.sinks.get(sink) {
                            d.do_send(SetLive(live_after(&o.policy(sink, base))));
                        }
                        let (p, sink) = (o.policy(sink, base), sink.clone());
                        self.with_wal(move |w| w.set_policy(&sink, p)).await?;
                    }
                }
                Ok(())
            }
            Setting::RetryBudget(sink, _)
            | Setting::RetryBase(sink, _)
            | Setting::RetryMax(sink, _) => match self.p.sinks.get(sink) {
                Some((base, Some(d))) => {
                    let mut cfg = base.clone();
                    o.apply_to(&mut cfg);
                    d.send(SetRetry {
                        retry_budget: Some(cfg.retry_budget),
                        retry_base: Some(cfg.retry_base),
                        retry_max: Some(cfg.retry_max),
                    })
                    .await
                    .map_err(unavailable)
                }
                _ => Ok(()),
            },
        }
    }
}

/// A sink is up: its dispatcher runs (`running`; `None`: the gateway is
/// not running), its circuit is closed and its last attempt did not fail.
/// The one definition: the fleet state's `up`, what a bundle's probation
/// keeps, and [`condition`]'s `up`/`down`.
pub fn sink_up(running: Option<bool>, state: &Value) -> bool {
    let circuit_open = state["circuit_open"] == Value::Bool(true);
    let failing = state["consecutive_failures"].as_u64().unwrap_or(0) > 0;
    running == Some(true) && !circuit_open && !failing
}

/// A sink's condition in one word, for people (the status page, `gateway
/// sink list`): `paused`, `circuit_open`, `down` (its dispatcher is not
/// running, or its last publish failed), `up`, or `stopped` (the gateway is
/// not running: `running` is null).
pub fn condition(running: Option<bool>, state: &Value) -> &'static str {
    match running {
        None => "stopped",
        Some(_) if state["paused"] == Value::Bool(true) => "paused",
        Some(_) if state["circuit_open"] == Value::Bool(true) => "circuit_open",
        _ if sink_up(running, state) => "up",
        _ => "down",
    }
}

/// `Some(live_after)` when `p` drains live-first.
fn live_after(p: &SinkPolicy) -> Option<std::time::Duration> {
    (p.drain == crate::route::DrainMode::LiveFirst).then_some(p.live_after)
}

/// A sink's route, TTLs and drain order as settings (`config.get`).
fn policy_json(p: &SinkPolicy) -> serde_json::Map<String, Value> {
    let ttl: BTreeMap<&str, String> = p
        .ttl
        .iter()
        .map(|(c, d)| (c.as_str(), humantime::format_duration(*d).to_string()))
        .collect();
    let mut m = serde_json::Map::new();
    m.insert("route".into(), json!(p.route));
    m.insert("ttl".into(), json!(ttl));
    m.insert("drain".into(), json!(p.drain));
    m.insert(
        "live_after".into(),
        json!(humantime::format_duration(p.live_after).to_string()),
    );
    m
}

/// One bit per sink in name order: enough for `route.test`, which only
/// names the sinks (the WAL's own bits matter only for stored records).
pub fn bits_by_name<V>(sinks: &BTreeMap<String, V>) -> BTreeMap<String, u64> {
    sinks
        .keys()
        .enumerate()
        .map(|(i, n)| (n.clone(), 1u64 << i))
        .collect()
}

/// What `route.test` needs.
pub struct RouteTestContext<'a> {
    /// This gateway.
    pub gateway_id: &'a str,
    /// The rules in force.
    pub routing: &'a Routing,
    /// MQTT topic templates.
    pub topics: &'a Topics,
    /// Ingest limits.
    pub limits: &'a IngestLimits,
}

/// Which class and sinks each record of `payload` would get, validated as
/// ingest would (also for a stopped gateway without a WAL).
pub fn route_test(
    cx: &RouteTestContext<'_>,
    device_id: String,
    payload: Value,
    source: Source,
    topic: Option<String>,
) -> Result<Value, OpError> {
    let mut tags = Vec::new();
    if let Some(t) = &topic {
        let m = cx.topics.read(t).ok_or_else(|| {
            OpError::BadRequest(format!(
                "route.test: topic {t:?} matches no template of mqtt.topics ({})",
                cx.topics.texts().join(", ")
            ))
        })?;
        if m.device_id != device_id {
            return Err(OpError::BadRequest(format!(
                "route.test: topic {t:?} names device {:?}, not {device_id:?}",
                m.device_id
            )));
        }
        tags = m.tags;
    }
    let bytes = serde_json::to_vec(&payload).map_err(|e| OpError::Internal(e.to_string()))?;
    let enrich = Enrichment {
        gateway_id: cx.gateway_id,
        correlation_id: "route-test",
        receive_ms: crate::wal::now_ms(),
        source,
        idempotency_key: None,
        traceparent: None,
        topic_tags: &tags,
        routing: Some(cx.routing),
    };
    let records = parse_payload(&device_id, &bytes, cx.limits, &enrich).map_err(|r| {
        OpError::BadRequest(format!("route.test: the record would be refused: {r}"))
    })?;
    let out: Vec<Value> = records
        .iter()
        .map(|r| {
            let sinks = cx.routing.sink_names(r.route.sinks);
            json!({
                "class": r.route.class,
                "unrouted": sinks.is_empty(),
                "sinks": sinks,
            })
        })
        .collect();
    Ok(json!({
        "device_id": device_id,
        "source": source.as_str(),
        "topic_tags": tags.into_iter().collect::<BTreeMap<_, _>>(),
        "records": out,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sinks_condition_says_paused_before_circuit_before_down() {
        let st = |paused: bool, open: bool, fails: u64| json!({"paused": paused, "circuit_open": open, "consecutive_failures": fails});
        assert_eq!(condition(Some(true), &st(false, false, 0)), "up");
        assert_eq!(condition(Some(true), &st(false, false, 2)), "down");
        assert_eq!(condition(Some(false), &st(false, false, 0)), "down");
        assert_eq!(condition(Some(true), &st(false, true, 5)), "circuit_open");
        assert_eq!(condition(Some(true), &st(true, true, 5)), "paused");
        assert_eq!(condition(None, &st(true, false, 0)), "stopped");
    }
}
