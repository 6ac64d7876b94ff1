//! Sinks: where records go after the WAL. One folder per kind; every kind
//! implements [`Sink`] and runs inside a [`SinkActor`].
//!
//! Each kind owns its configuration: `KIND/config.rs` holds the documented
//! `[sinks.NAME]` keys of that kind (unknown keys refused) and their
//! validation. [`SinkConfig`] is the one enum tagged by `kind`, and
//! [`factory`] the one place a configured sink becomes a client. Adding a
//! kind is one folder plus one variant in each of the two.

mod actor;
pub mod compress;
pub mod http;
pub mod kafka;
pub mod mqtt;
pub mod s3;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

pub use actor::{PublishBatch, Rebuild, SinkActor, SinkFactory};
pub use compress::Compression;

use crate::wal::Batch;

/// A sink's answer to one batch.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SinkError {
    /// A transient failure (target down, timeout, 5xx): try the same batch again later.
    #[error("retryable: {0}")]
    Retryable(String),
    /// The target is unreachable (connection refused, timeout, broker down):
    /// retried, and not counted against the batch's retry budget.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// Retryable, and the target said when (`Retry-After`).
    #[error("retryable after {after:?}: {message}")]
    RetryAfter {
        /// Wait at least this long.
        after: std::time::Duration,
        /// What happened.
        message: String,
    },
    /// The target refused the batch for good (4xx, bad data): dead-letter it now.
    #[error("permanent: {0}")]
    Permanent(String),
    /// The sink's configuration is unusable.
    #[error("configuration: {0}")]
    Config(String),
}

impl SinkError {
    /// Whether the dispatcher may try again.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            SinkError::Retryable(_) | SinkError::RetryAfter { .. } | SinkError::Unavailable(_)
        )
    }
}

/// What a delivered batch cost: the bytes of its bodies (HTTP request
/// bodies, MQTT payloads, objects; headers and framing not counted).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sent {
    /// Before compression.
    pub payload_bytes: u64,
    /// On the wire, after compression.
    pub wire_bytes: u64,
}

impl Sent {
    /// A body of `payload_bytes` that went out as `wire_bytes`.
    pub fn new(payload_bytes: usize, wire_bytes: usize) -> Self {
        Self {
            payload_bytes: payload_bytes as u64,
            wire_bytes: wire_bytes as u64,
        }
    }
}

/// The future a sink returns for one batch.
pub type PublishFuture = Pin<Box<dyn Future<Output = Result<Sent, SinkError>>>>;

/// One kind of delivery target.
pub trait Sink: 'static {
    /// Delivers `batch`. `Ok` means the target has it durably: the WAL acks
    /// the batch for this sink on `Ok` and only then.
    fn publish(&mut self, batch: Arc<Batch>) -> PublishFuture;
}

/// What a kind's validation knows besides its own keys.
#[derive(Debug, Clone, Copy)]
pub struct SinkContext<'a> {
    /// The sink's name (`[sinks.NAME]`).
    pub name: &'a str,
    /// The gateway id.
    pub gateway_id: &'a str,
    /// The sink's `publish_timeout_ms` (some clients take it as their own timeout).
    pub publish_timeout: Duration,
}

/// The kind's own keys of one `[sinks.NAME]` table, tagged by `kind`.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum SinkConfig {
    /// `kind = "s3"`: an object store (S3 or a local directory).
    S3(s3::S3Keys),
    /// `kind = "http"`: an HTTP analytics API.
    Http(http::HttpKeys),
    /// `kind = "mqtt"`: an upstream MQTT broker.
    Mqtt(mqtt::MqttKeys),
    /// `kind = "kafka"`: a Kafka topic.
    Kafka(kafka::KafkaKeys),
}

impl SinkConfig {
    /// The kinds, as written in `kind = "…"`.
    pub const KINDS: &'static [&'static str] = &["s3", "kafka", "mqtt", "http"];

    /// Validates the keys into the sink's settings.
    pub fn build(&self, ctx: &SinkContext<'_>) -> Result<SinkTarget, crate::keys::KeyError> {
        Ok(match self {
            SinkConfig::S3(k) => SinkTarget::S3(k.build(ctx)?),
            SinkConfig::Http(k) => SinkTarget::Http(k.build(ctx)?),
            SinkConfig::Mqtt(k) => SinkTarget::Mqtt(k.build(ctx)?),
            SinkConfig::Kafka(k) => SinkTarget::Kafka(k.build(ctx)?),
        })
    }
}

/// A configured sink's validated settings, by kind.
#[derive(Debug, Clone)]
pub enum SinkTarget {
    /// `kind = "s3"`.
    S3(s3::S3SinkConfig),
    /// `kind = "http"`.
    Http(http::HttpSinkConfig),
    /// `kind = "mqtt"`.
    Mqtt(mqtt::MqttSinkConfig),
    /// `kind = "kafka"`.
    Kafka(kafka::KafkaSinkConfig),
}

impl SinkTarget {
    /// Whether the sink's client reads TLS files (CA, client certificate,
    /// key) when it is built: such a sink is rebuilt by `tls.reload`.
    pub fn reads_tls_files(&self) -> bool {
        match self {
            SinkTarget::Mqtt(c) => c.conn.tls.is_some(),
            SinkTarget::Kafka(c) => {
                c.ssl_ca_file.is_some() || c.ssl_cert_file.is_some() || c.ssl_key_file.is_some()
            }
            SinkTarget::S3(_) | SinkTarget::Http(_) => false,
        }
    }
}

/// The client factory of a configured sink (the [`SinkActor`] calls it at
/// start and after a restart).
pub fn factory(target: &SinkTarget) -> SinkFactory {
    fn boxed<S: Sink>(r: Result<S, SinkError>) -> Result<Box<dyn Sink>, SinkError> {
        r.map(|s| Box::new(s) as Box<dyn Sink>)
    }
    match target.clone() {
        SinkTarget::S3(cfg) => Arc::new(move || boxed(s3::ObjectStoreSink::new(&cfg))),
        SinkTarget::Http(cfg) => Arc::new(move || boxed(http::HttpSink::new(&cfg))),
        // The TLS files are read again at every build, so a rebuild
        // (`tls.reload`, SIGHUP) picks up rotated certificates.
        SinkTarget::Mqtt(cfg) => Arc::new(move || {
            let mut cfg = cfg.clone();
            cfg.conn.reload_tls().map_err(SinkError::Config)?;
            boxed(mqtt::MqttSink::new(&cfg))
        }),
        SinkTarget::Kafka(cfg) => Arc::new(move || boxed(kafka::KafkaSink::new(&cfg))),
    }
}
