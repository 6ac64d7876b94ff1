//! MQTT: the one connection layer ([`client::MqttClient`], used by the
//! ingest, the control plane and the upstream sink), the `MqttIngest` actor
//! and its connection settings.

pub mod client;
mod config;
mod ingest;
pub mod tls;
pub mod topics;

pub use client::MqttVersion;
pub use config::{broker_address, BrokerKeys, MqttIngestConfig};
pub use ingest::{stop_for_new_tls, MqttIngest, MqttStatus, ReloadTls};
pub use tls::{broker_tls, MqttTls, TlsFiles};
