//! Kind `mqtt`: publish each record at QoS 1 to an upstream (cloud) broker.

mod config;
mod sink;

pub use config::{MqttKeys, MqttSinkConfig};
pub use sink::MqttSink;
