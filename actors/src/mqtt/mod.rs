//! MQTT ingest: the `MqttIngest` actor and its connection settings.

mod config;
mod ingest;
pub mod tls;

pub use config::{broker_address, broker_tls, MqttIngestConfig, MqttTls, MqttVersion};
pub use ingest::{MqttIngest, MqttStatus};
