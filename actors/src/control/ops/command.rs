//! The operator's commands as data: [`Command`], built from a name and
//! JSON arguments ([`Command::parse`], the same for MQTT, HTTP and the
//! CLI) with each command's arguments checked strictly, and its name for
//! the metric label and the audit line. Running them is `ops.rs`'s job.

use serde::Deserialize;
use serde_json::{json, Value};

use super::OpError;
use crate::ingest::Source;
use crate::wal::DlqFilter;

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
