//! Configuration of an `mqtt` sink.

use crate::mqtt::MqttTls;
use crate::Secret;

/// Settings of one `mqtt` sink (`[sinks.NAME]` with `kind = "mqtt"`).
#[derive(Debug, Clone)]
pub struct MqttSinkConfig {
    /// Broker host.
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// TLS (`mqtts://`), or plain TCP.
    pub tls: Option<MqttTls>,
    /// Client id (default `gateway-{gateway_id}-{sink}`).
    pub client_id: String,
    /// User name.
    pub username: Option<String>,
    /// Password (from `password_file`).
    pub password: Option<Secret>,
    /// Records go to `{topic_prefix}/{device_id}/telemetry`.
    pub topic_prefix: String,
    /// Largest packet.
    pub max_packet_bytes: usize,
}
