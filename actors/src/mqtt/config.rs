//! Settings of the MQTT ingest connection.

use std::path::PathBuf;
use std::time::Duration;

use super::client::{ClientOptions, Connection, MqttVersion};
use super::tls::broker_tls;
use super::topics::Topics;
use crate::ingest::PayloadFormat;
use crate::keys::{secret_key, KeyError};

/// Everything `MqttIngest` needs to connect and subscribe (built from the
/// `[mqtt]` keys by the gateway's `config::mqtt::MqttKeys`).
#[derive(Debug, Clone)]
pub struct MqttIngestConfig {
    /// The broker connection (shared with the control plane, whose client
    /// id gets a `-control` suffix).
    pub conn: Connection,
    /// Topic templates: what to subscribe, and how a topic gives the device
    /// id and tags.
    pub topics: Topics,
    /// JSON, Protobuf or detect.
    pub payload_format: PayloadFormat,
    /// Messages the broker may send before we ack (MQTT 5 Receive Maximum).
    pub receive_maximum: u16,
    /// How long the broker keeps our session while we are away (MQTT 5).
    pub session_expiry: Duration,
    /// Run the control plane (`gateway/{id}/control/+`) on this broker.
    pub control: bool,
}

impl MqttIngestConfig {
    /// The ingest connection's options: a persistent session, manual acks,
    /// our Receive Maximum, the telemetry subscription.
    pub fn client_options(&self) -> ClientOptions {
        let mut o = ClientOptions::new(self.conn.clone());
        o.persistent = true;
        o.session_expiry = self.session_expiry;
        o.manual_acks = true;
        o.receive_maximum = Some(self.receive_maximum);
        o.request_capacity = usize::from(self.receive_maximum) * 2 + 16;
        o.subscribe = self.topics.filters();
        o
    }
}

/// `host[:port]` of an `mqtt://` or `mqtts://` URL (default ports 1883 and
/// 8883): the scheme, host and port, or what is wrong with it.
pub fn broker_address(url: &str) -> Result<(&'static str, String, u16), String> {
    let (scheme, rest) = match url.split_once("://") {
        Some(("mqtt", rest)) => ("mqtt", rest),
        Some(("mqtts", rest)) => ("mqtts", rest),
        _ => {
            return Err(format!(
                "{url:?}: expected mqtt://host:port or mqtts://host:port"
            ))
        }
    };
    let hostport = rest.trim_end_matches('/');
    let default_port = if scheme == "mqtts" { 8883 } else { 1883 };
    let (h, p) = match hostport.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => {
            let p: u16 = p.parse().map_err(|_| format!("{url:?}: bad port"))?;
            (
                h.trim_start_matches('[').trim_end_matches(']').to_string(),
                p,
            )
        }
        _ => (hostport.to_string(), default_port),
    };
    if h.is_empty() {
        return Err(format!("{url:?}: host is missing"));
    }
    Ok((scheme, h, p))
}

/// The keys of a broker connection that every MQTT client section shares
/// (the upstream sink, the fleet): where, TLS files, credentials, version.
#[derive(Debug, Clone, Copy, Default)]
pub struct BrokerKeys<'a> {
    /// `mqtt://host:port` or `mqtts://host:port`.
    pub url: &'a str,
    /// CA file (`mqtts` only).
    pub ca_file: Option<&'a PathBuf>,
    /// Client certificate file for mutual TLS (`mqtts` only).
    pub client_cert_file: Option<&'a PathBuf>,
    /// Client key file for mutual TLS (`mqtts` only).
    pub client_key_file: Option<&'a PathBuf>,
    /// User name.
    pub username: Option<&'a str>,
    /// File holding the password.
    pub password_file: Option<&'a PathBuf>,
    /// `3.1.1` or `5`; `None`: the section's default.
    pub version: Option<&'a str>,
}

impl BrokerKeys<'_> {
    /// The connection of `client_id` these keys describe (files read now);
    /// errors name the key (`url`, `ca_file`, `version`…).
    pub fn connection(
        &self,
        client_id: &str,
        default_version: MqttVersion,
    ) -> Result<Connection, KeyError> {
        let (scheme, host, port) = broker_address(self.url).map_err(|e| KeyError::new("url", e))?;
        let mut conn = Connection::new(&host, port, client_id);
        conn.tls = broker_tls(
            scheme,
            self.ca_file.map(PathBuf::as_path),
            self.client_cert_file.map(PathBuf::as_path),
            self.client_key_file.map(PathBuf::as_path),
        )?;
        conn.username = self.username.map(str::to_string);
        conn.password = secret_key("password_file", self.password_file.map(PathBuf::as_path))?;
        conn.version = match self.version {
            None => default_version,
            Some("3.1.1" | "311" | "4" | "v4") => MqttVersion::V311,
            Some("5" | "5.0" | "v5") => MqttVersion::V5,
            Some(other) => {
                return Err(KeyError::new(
                    "version",
                    format!("{other:?}: expected \"3.1.1\" or \"5\""),
                ))
            }
        };
        Ok(conn)
    }
}
