//! Configuration of an `mqtt` sink.

use std::path::PathBuf;

use crate::keys::KeyError;
use crate::mqtt::client::Connection;
use crate::mqtt::{BrokerKeys, MqttVersion};
use crate::sink::compress::{Compression, GZIP_DEFAULT_LEVEL};
use crate::sink::SinkContext;

/// What one PUBLISH carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Payload {
    /// One canonical record per PUBLISH on `{topic_prefix}/{device_id}/telemetry`.
    #[default]
    Record,
    /// A whole batch as (compressed) NDJSON on `{topic_prefix}/{gateway_id}/batch`.
    Batch,
}

/// Settings of one `mqtt` sink (`[sinks.NAME]` with `kind = "mqtt"`).
#[derive(Debug, Clone)]
pub struct MqttSinkConfig {
    /// The upstream broker: client id `gateway-{gateway_id}-{sink}` unless
    /// set; 3.1.1 (default) or 5 (the idempotency key also goes as a user
    /// property); packets up to 1 MiB.
    pub conn: Connection,
    /// Records go to `{topic_prefix}/{device_id}/telemetry`.
    pub topic_prefix: String,
    /// The gateway id (the batch topic is `{topic_prefix}/{gateway_id}/batch`).
    pub gateway_id: String,
    /// One record or one batch per PUBLISH.
    pub payload: Payload,
    /// The compression of a batch payload (`record` payloads go as they are).
    pub compression: Compression,
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
    /// `record` (default): one PUBLISH per record; `batch`: one PUBLISH of
    /// NDJSON per batch on `{topic_prefix}/{gateway_id}/batch` (DESIGN §6b).
    pub payload: Option<String>,
    /// A batch payload's compression: `none`, `gzip` or `zstd` (default
    /// `zstd` with `payload = "batch"`; only `none` with `record`).
    pub compression: Option<String>,
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
        let payload = match self.payload.as_deref().unwrap_or("record") {
            "record" => Payload::Record,
            "batch" => Payload::Batch,
            other => {
                return Err(KeyError::new(
                    "payload",
                    format!("{other:?}: expected record or batch"),
                ))
            }
        };
        let compression = match payload {
            Payload::Batch => Compression::from_key(
                self.compression.as_deref(),
                Compression::Zstd,
                GZIP_DEFAULT_LEVEL,
            )?,
            Payload::Record => match self.compression.as_deref() {
                None | Some("none") => Compression::None,
                Some(_) => {
                    return Err(KeyError::new(
                        "compression",
                        "needs payload = \"batch\" (a record payload is sent as it is)",
                    ))
                }
            },
        };
        Ok(MqttSinkConfig {
            conn,
            gateway_id: ctx.gateway_id.to_string(),
            payload,
            compression,
            topic_prefix: self
                .topic_prefix
                .clone()
                .unwrap_or_else(|| ctx.gateway_id.to_string()),
        })
    }
}
