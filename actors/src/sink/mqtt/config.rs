//! Configuration of an `mqtt` sink.

use std::path::PathBuf;

use crate::keys::KeyError;
use crate::mqtt::client::Connection;
use crate::mqtt::{BrokerKeys, MqttVersion};
use crate::sink::SinkContext;

/// Settings of one `mqtt` sink (`[sinks.NAME]` with `kind = "mqtt"`).
#[derive(Debug, Clone)]
pub struct MqttSinkConfig {
    /// The upstream broker: client id `gateway-{gateway_id}-{sink}` unless
    /// set; 3.1.1 (default) or 5 (the idempotency key also goes as a user
    /// property); packets up to 1 MiB.
    pub conn: Connection,
    /// Records go to `{topic_prefix}/{device_id}/telemetry`.
    pub topic_prefix: String,
}

/// The `[sinks.NAME]` keys of `kind = "mqtt"` (besides the shared
/// [`DispatchKeys`](crate::dispatcher::DispatchKeys)).
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttKeys {
    /// `mqtt://host:port` or `mqtts://host:port` (required).
    pub url: Option<String>,
    /// CA file (`mqtts` only).
    pub ca_file: Option<PathBuf>,
    /// Client certificate file for mutual TLS (`mqtts` only).
    pub client_cert_file: Option<PathBuf>,
    /// Client key file for mutual TLS (`mqtts` only).
    pub client_key_file: Option<PathBuf>,
    /// User name.
    pub username: Option<String>,
    /// File holding the password.
    pub password_file: Option<PathBuf>,
    /// Client id (default `gateway-{gateway_id}-{sink}`).
    pub client_id: Option<String>,
    /// Records go to `{topic_prefix}/{device_id}/telemetry` (default the gateway id).
    pub topic_prefix: Option<String>,
    /// Protocol version: `3.1.1` (default) or `5` (the idempotency key also
    /// travels as the user property `idempotency_key`).
    pub version: Option<String>,
}

impl MqttKeys {
    /// Validates the keys into the sink's settings.
    pub fn build(&self, ctx: &SinkContext<'_>) -> Result<MqttSinkConfig, KeyError> {
        let url = self.url.clone().ok_or_else(|| {
            KeyError::new(
                "url",
                "is required for kind mqtt (mqtt://host:port or mqtts://host:port)",
            )
        })?;
        let client_id = self
            .client_id
            .clone()
            .unwrap_or_else(|| format!("gateway-{}-{}", ctx.gateway_id, ctx.name));
        let conn = BrokerKeys {
            url: &url,
            ca_file: self.ca_file.as_ref(),
            client_cert_file: self.client_cert_file.as_ref(),
            client_key_file: self.client_key_file.as_ref(),
            username: self.username.as_deref(),
            password_file: self.password_file.as_ref(),
            version: self.version.as_deref(),
        }
        .connection(&client_id, MqttVersion::V311)?;
        Ok(MqttSinkConfig {
            conn,
            topic_prefix: self
                .topic_prefix
                .clone()
                .unwrap_or_else(|| ctx.gateway_id.to_string()),
        })
    }
}
