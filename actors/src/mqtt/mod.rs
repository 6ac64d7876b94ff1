//! MQTT ingest: the `MqttIngest` actor and its connection settings.

mod config;
mod ingest;
pub mod tls;

pub use config::{MqttIngestConfig, MqttTls, MqttVersion};
pub use ingest::{MqttIngest, MqttStatus};
