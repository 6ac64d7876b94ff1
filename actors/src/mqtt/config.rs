//! Settings of the MQTT ingest connection.

use std::time::Duration;

use crate::ingest::PayloadFormat;
use crate::Secret;

/// MQTT protocol version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MqttVersion {
    /// MQTT 3.1.1.
    V311,
    /// MQTT 5.
    V5,
}

/// TLS material, already read from files (PEM).
#[derive(Clone)]
pub struct MqttTls {
    /// CA certificate(s) the broker's certificate must chain to; `None` = system roots.
    pub ca_pem: Option<Vec<u8>>,
    /// Client certificate chain and PKCS#8 key for mutual TLS.
    pub client: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for MqttTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttTls")
            .field("ca_pem", &self.ca_pem.as_ref().map(|c| c.len()))
            .field("client_cert", &self.client.is_some())
            .finish()
    }
}

/// Everything `MqttIngest` needs to connect and subscribe.
#[derive(Debug, Clone)]
pub struct MqttIngestConfig {
    /// Broker host.
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// TLS (`mqtts://`), or plain TCP when `None`.
    pub tls: Option<MqttTls>,
    /// User name, if the broker wants one.
    pub username: Option<String>,
    /// Password (read from a file).
    pub password: Option<Secret>,
    /// Client id: the persistent session belongs to it.
    pub client_id: String,
    /// Keep-alive interval.
    pub keep_alive: Duration,
    /// 3.1.1 or 5.
    pub version: MqttVersion,
    /// Subscription filter; the device id is the second topic level.
    pub topic: String,
    /// JSON, Protobuf or detect.
    pub payload_format: PayloadFormat,
    /// Messages the broker may send before we ack (MQTT 5 Receive Maximum).
    pub receive_maximum: u16,
    /// How long the broker keeps our session while we are away (MQTT 5).
    pub session_expiry: Duration,
    /// First reconnect delay.
    pub reconnect_base: Duration,
    /// Largest reconnect delay.
    pub reconnect_max: Duration,
    /// Largest incoming packet.
    pub max_packet_bytes: usize,
    /// Run the control plane (`gateway/{id}/control/+`) on this broker.
    pub control: bool,
}

impl MqttIngestConfig {
    /// Defaults for a broker at `host:port`.
    pub fn new(host: &str, port: u16, client_id: &str) -> Self {
        Self {
            host: host.to_string(),
            port,
            tls: None,
            username: None,
            password: None,
            client_id: client_id.to_string(),
            keep_alive: Duration::from_secs(30),
            version: MqttVersion::V5,
            topic: "devices/+/telemetry".into(),
            payload_format: PayloadFormat::Auto,
            receive_maximum: 1000,
            session_expiry: Duration::from_secs(7 * 24 * 3600),
            reconnect_base: Duration::from_millis(200),
            reconnect_max: Duration::from_secs(30),
            max_packet_bytes: 256 * 1024,
            control: true,
        }
    }

    /// Reconnect delay after `failures` consecutive failures: exponential,
    /// capped, with equal jitter.
    pub fn reconnect_delay(&self, failures: u32) -> Duration {
        let exp = self
            .reconnect_base
            .saturating_mul(1u32 << failures.saturating_sub(1).min(16));
        let d = exp.min(self.reconnect_max);
        let half = d / 2;
        half + Duration::from_nanos(fastrand::u64(0..=half.as_nanos() as u64))
    }
}
