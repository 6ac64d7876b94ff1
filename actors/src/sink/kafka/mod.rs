//! Kind `kafka`: an idempotent producer (`rdkafka`, librdkafka 2.12).

mod config;
mod sink;

pub use config::{KafkaKeys, KafkaSinkConfig};
pub use sink::KafkaSink;
