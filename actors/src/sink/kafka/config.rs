//! Configuration of a `kafka` sink.

use std::collections::BTreeMap;
use std::time::Duration;

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
