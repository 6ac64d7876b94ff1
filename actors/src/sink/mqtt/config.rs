//! Configuration of an `mqtt` sink.

use crate::mqtt::MqttTls;

/// Settings of one `mqtt` sink (`[sinks.NAME]` with `kind = "mqtt"`).
#[derive(Clone)]
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
    /// Password (from `password_file`; never logged).
    pub password: Option<String>,
    /// Records go to `{topic_prefix}/{device_id}/telemetry`.
    pub topic_prefix: String,
    /// Largest packet.
    pub max_packet_bytes: usize,
}

impl std::fmt::Debug for MqttSinkConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttSinkConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls)
            .field("client_id", &self.client_id)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("topic_prefix", &self.topic_prefix)
            .finish()
    }
}
