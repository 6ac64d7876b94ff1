//! The `[mqtt]` section: MQTT ingest and the broker it reads from
//! ([`MqttKeys`] → [`MqttMode`]). Defaults: `config/default.toml`; the
//! default topics are `Topics::default()`, because `topics` and the older
//! `topic` may not both be given.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use gateway_actors::ingest::PayloadFormat;
use gateway_actors::keys::{duration_key, secret_key, socket_addr_key, KeyError};
use gateway_actors::mqtt::client::{Backoff, Connection};
use gateway_actors::mqtt::topics::Topics;
use gateway_actors::mqtt::{broker_address, broker_tls, MqttIngestConfig, MqttVersion};
use serde::Deserialize;

/// The first reconnect delay (doubling, with jitter, up to `reconnect_max`).
const RECONNECT_BASE: Duration = Duration::from_millis(200);

/// The `[mqtt]` keys, as merged from every layer (defaults included).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttKeys {
    /// `off` | `embedded` (the in-process broker) | `mqtt://host:port` |
    /// `mqtts://host:port`.
    pub url: String,
    /// Where the embedded broker (MQTT 3.1.1) listens, for `url = "embedded"`.
    pub embedded_addr: String,
    /// `5` or `3.1.1` (the embedded broker always uses 3.1.1).
    pub version: String,
    /// Owns the persistent session, 1 to 64 characters (none:
    /// `gateway-{gateway_id}`).
    pub client_id: Option<String>,
    /// MQTT keep-alive, at least 5s.
    pub keep_alive: String,
    /// The older single filter whose second level is the device id
    /// (`devices/+/telemetry`); not with `topics`.
    pub topic: Option<String>,
    /// Topic templates: `{device_id}` (once) and `{tag:NAME}` name a level
    /// each, `+` and `#` as in MQTT (none: `devices/{device_id}/telemetry`).
    pub topics: Option<Vec<String>>,
    /// `json` | `protobuf` | `auto` (JSON if it starts with `{` or `[`).
    pub payload_format: String,
    /// MQTT 5: messages the broker may send before we ack, at least 1.
    pub receive_maximum: u16,
    /// MQTT 5: how long the broker keeps our session.
    pub session_expiry: String,
    /// Reconnect backoff cap (exponential with jitter from 200 ms).
    pub reconnect_max: String,
    /// `mqtts`: CA of the broker (none: the system roots).
    pub ca_file: Option<PathBuf>,
    /// `mqtts`: client certificate for mutual TLS.
    pub client_cert_file: Option<PathBuf>,
    /// `mqtts`: the client certificate's key (PKCS#8 PEM).
    pub client_key_file: Option<PathBuf>,
    /// User name.
    pub username: Option<String>,
    /// File holding the password (a secret: never printed).
    pub password_file: Option<PathBuf>,
    /// The control plane on `gateway/{gateway_id}/control/+` (protect it
    /// with broker ACLs).
    pub control: bool,
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

impl MqttKeys {
    /// Validates the keys (TLS and password files are read now).
    /// `max_payload_bytes` is `ingest.max_payload_bytes`: the largest
    /// packet the client takes is that plus room for the MQTT header.
    pub fn build(&self, gateway_id: &str, max_payload_bytes: usize) -> Result<MqttMode, KeyError> {
        if self.url == "off" {
            return Ok(MqttMode::Off);
        }
        let version = match self.version.as_str() {
            "5" | "5.0" | "v5" => MqttVersion::V5,
            "3.1.1" | "311" | "4" | "v4" => MqttVersion::V311,
            other => {
                return Err(KeyError::new(
                    "version",
                    format!("{other:?}: expected \"5\" or \"3.1.1\""),
                ))
            }
        };
        let payload_format = match self.payload_format.as_str() {
            "json" => PayloadFormat::Json,
            "protobuf" => PayloadFormat::Protobuf,
            "auto" => PayloadFormat::Auto,
            other => {
                return Err(KeyError::new(
                    "payload_format",
                    format!("{other:?}: expected json, protobuf or auto"),
                ))
            }
        };
        let client_id = self
            .client_id
            .clone()
            .unwrap_or_else(|| format!("gateway-{gateway_id}"));
        if client_id.is_empty() || client_id.len() > 64 {
            return Err(KeyError::new("client_id", "must be 1 to 64 characters"));
        }
        let topics = match (&self.topics, &self.topic) {
            (Some(_), Some(_)) => {
                return Err(KeyError::new(
                    "topic",
                    "give mqtt.topics (templates) or the older mqtt.topic, not both",
                ))
            }
            (Some(list), None) => Topics::parse(list).map_err(|e| KeyError::new("topics", e))?,
            (None, Some(filter)) => {
                Topics::from_filter(filter).map_err(|e| KeyError::new("topic", e))?
            }
            (None, None) => Topics::default(),
        };
        let embedded = (self.url == "embedded")
            .then(|| socket_addr_key("embedded_addr", &self.embedded_addr))
            .transpose()?;
        let (scheme, host, port) = match embedded {
            Some(addr) => ("embedded", addr.ip().to_string(), addr.port()),
            None => broker_address(&self.url).map_err(|e| {
                if self.url.starts_with("mqtt") {
                    KeyError::new("url", e)
                } else {
                    KeyError::new(
                        "url",
                        format!(
                            "{:?}: expected off, embedded, mqtt://host:port or mqtts://host:port",
                            self.url
                        ),
                    )
                }
            })?,
        };
        let mut conn = Connection::new(&host, port, &client_id);
        conn.version = version;
        conn.max_packet_bytes = max_payload_bytes + 4096;
        conn.keep_alive = duration_key("keep_alive", &self.keep_alive)?;
        if conn.keep_alive < Duration::from_secs(5) {
            return Err(KeyError::new("keep_alive", "must be at least 5s"));
        }
        if self.receive_maximum == 0 {
            return Err(KeyError::new("receive_maximum", "must be at least 1"));
        }
        let session_expiry = duration_key("session_expiry", &self.session_expiry)?;
        conn.reconnect = Backoff {
            base: RECONNECT_BASE,
            max: duration_key("reconnect_max", &self.reconnect_max)?.max(RECONNECT_BASE),
        };
        conn.username = self.username.clone();
        conn.password = secret_key("password_file", self.password_file.as_deref())?;
        conn.tls = broker_tls(
            scheme,
            self.ca_file.as_deref(),
            self.client_cert_file.as_deref(),
            self.client_key_file.as_deref(),
        )?;
        let mut cfg = MqttIngestConfig {
            conn,
            topics,
            payload_format,
            receive_maximum: self.receive_maximum,
            session_expiry,
            control: self.control,
        };
        let Some(addr) = embedded else {
            return Ok(MqttMode::Broker(cfg));
        };
        if !cfg!(feature = "embedded-broker") {
            return Err(KeyError::new(
                "url",
                "this build has no embedded broker (cargo feature embedded-broker)",
            ));
        }
        // The embedded broker listens for MQTT 3.1.1 (what most devices and
        // mosquitto_pub speak); the gateway's own client matches it.
        cfg.conn.version = MqttVersion::V311;
        Ok(MqttMode::Embedded { addr, ingest: cfg })
    }
}
