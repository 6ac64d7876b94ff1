//! The operator's commands, implemented once: the MQTT control plane, the
//! admin API and the CLI all build a [`Command`] and hand it to
//! [`Operator::execute`], which runs it, counts it
//! (`gateway_control_commands_total`) and writes an audit log line (target
//! `audit`: who, what, result).
//!
//! An `Operator` without live actors (the CLI on a stopped gateway's data
//! dir) runs the same commands: WAL actions go to the writer thread of a
//! `WalStore` the CLI started (through its [`WalWriter`]), settings are
//! persisted in `runtime.json` and apply at the next start.
//!
//! Rooms: this file runs the commands and applies runtime settings;
//! `ops/command.rs` parses them ([`Command`]), `ops/report.rs` builds what
//! an operator reads (sinks report, dead letters, settings in force, a
//! sink's [`condition`]), `ops/route_test.rs` answers `route.test`.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use actix::Addr;
use serde_json::{json, Value};

use super::runtime::{RuntimeOverrides, Setting};
use crate::dispatcher::{
    DispatchConfig, Dispatcher, SetBudget, SetLive, SetLiveShare, SetPaused, SetQuota, SetReduce,
    SetRetry, SetWindows,
};
use crate::ingest::validate::is_valid_device_id;
use crate::ingest::{IngestLimits, IngestRouters, RateLimit};
use crate::metrics::Metrics;
use crate::mqtt::topics::Topics;
use crate::route::{PriorityRule, Routing, SinkPolicy};
use crate::wal::{WalError, WalReader, WalWriter};

mod command;
mod report;
mod route_test;

pub use command::Command;
pub use report::{condition, sink_row_up, sink_up};
pub use route_test::{bits_by_name, route_test, RouteTestContext};

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
    /// The WAL's writer thread.
    pub wal: WalWriter,
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
        self.p.wal.with(f).await.map_err(OpError::from)
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

/// `Some(live_after)` when `p` drains live-first.
fn live_after(p: &SinkPolicy) -> Option<std::time::Duration> {
    (p.drain == crate::route::DrainMode::LiveFirst).then_some(p.live_after)
}
