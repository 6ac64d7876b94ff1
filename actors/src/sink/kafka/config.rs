//! Configuration of a `kafka` sink.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::keys::{secret_key, KeyError};
use crate::sink::SinkContext;
use crate::Secret;

/// Settings of one `kafka` sink (`[sinks.NAME]` with `kind = "kafka"`).
#[derive(Clone)]
pub struct KafkaSinkConfig {
    /// `host:port[,host:port…]`.
    pub brokers: String,
    /// Topic (must exist; the gateway does not create topics).
    pub topic: String,
    /// `none`, `gzip`, `snappy`, `lz4` (default) or `zstd`.
    pub compression: String,
    /// How long librdkafka may try one message before it reports failure.
    pub message_timeout: Duration,
    /// `PLAINTEXT`, `SSL`, `SASL_PLAINTEXT` or `SASL_SSL`.
    pub security_protocol: Option<String>,
    /// CA file for SSL.
    pub ssl_ca_file: Option<String>,
    /// Client certificate file (mutual TLS).
    pub ssl_cert_file: Option<String>,
    /// Client key file (mutual TLS).
    pub ssl_key_file: Option<String>,
    /// `PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512`.
    pub sasl_mechanism: Option<String>,
    /// SASL user name.
    pub sasl_username: Option<String>,
    /// SASL password (from `sasl_password_file`).
    pub sasl_password: Option<Secret>,
    /// Any other librdkafka producer property (`[sinks.NAME.librdkafka]`).
    pub extra: BTreeMap<String, String>,
}

impl std::fmt::Debug for KafkaSinkConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSinkConfig")
            .field("brokers", &self.brokers)
            .field("topic", &self.topic)
            .field("compression", &self.compression)
            .field("security_protocol", &self.security_protocol)
            .field("sasl_username", &self.sasl_username)
            .field("sasl_password", &self.sasl_password)
            // `extra` may hold librdkafka secrets (ssl.key.password …).
            .finish_non_exhaustive()
    }
}

/// The `[sinks.NAME]` keys of `kind = "kafka"` (besides the shared
/// [`DispatchKeys`](crate::dispatcher::DispatchKeys)).
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaKeys {
    /// `host:port[,host:port…]` (required).
    pub brokers: Option<String>,
    /// Topic (required; it must exist).
    pub topic: Option<String>,
    /// `none`, `gzip`, `snappy`, `lz4` (default) or `zstd`.
    pub compression: Option<String>,
    /// `PLAINTEXT`, `SSL`, `SASL_PLAINTEXT` or `SASL_SSL`.
    pub security_protocol: Option<String>,
    /// CA file for SSL.
    pub ssl_ca_file: Option<std::path::PathBuf>,
    /// Client certificate file (mutual TLS).
    pub ssl_cert_file: Option<std::path::PathBuf>,
    /// Client key file (mutual TLS).
    pub ssl_key_file: Option<std::path::PathBuf>,
    /// `PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512`.
    pub sasl_mechanism: Option<String>,
    /// SASL user name.
    pub sasl_username: Option<String>,
    /// File holding the SASL password.
    pub sasl_password_file: Option<std::path::PathBuf>,
    /// Any other librdkafka producer property (`[sinks.NAME.librdkafka]`).
    pub librdkafka: Option<BTreeMap<String, String>>,
}

impl KafkaKeys {
    /// Validates the keys into the sink's settings.
    pub fn build(&self, ctx: &SinkContext<'_>) -> Result<KafkaSinkConfig, KeyError> {
        let brokers = self.brokers.clone().ok_or_else(|| {
            KeyError::new(
                "brokers",
                "is required for kind kafka (host:port[,host:port])",
            )
        })?;
        let topic = self
            .topic
            .clone()
            .ok_or_else(|| KeyError::new("topic", "is required for kind kafka"))?;
        let compression = self.compression.clone().unwrap_or_else(|| "lz4".into());
        if !["none", "gzip", "snappy", "lz4", "zstd"].contains(&compression.as_str()) {
            return Err(KeyError::new(
                "compression",
                "expected none, gzip, snappy, lz4 or zstd",
            ));
        }
        let path = |p: &Option<std::path::PathBuf>| p.as_ref().map(|p| p.display().to_string());
        Ok(KafkaSinkConfig {
            brokers,
            topic,
            compression,
            message_timeout: ctx.publish_timeout,
            security_protocol: self.security_protocol.clone(),
            ssl_ca_file: path(&self.ssl_ca_file),
            ssl_cert_file: path(&self.ssl_cert_file),
            ssl_key_file: path(&self.ssl_key_file),
            sasl_mechanism: self.sasl_mechanism.clone(),
            sasl_username: self.sasl_username.clone(),
            sasl_password: secret_key("sasl_password_file", self.sasl_password_file.as_deref())?,
            extra: self.librdkafka.clone().unwrap_or_default(),
        })
    }
}
