//! Configuration of an `http` sink.

use std::time::Duration;

/// How a batch is encoded in the request body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFormat {
    /// One canonical record per line (`application/x-ndjson`).
    Ndjson,
    /// A JSON array of canonical records (`application/json`).
    JsonArray,
}

/// Settings of one `http` sink (`[sinks.NAME]` with `kind = "http"`).
#[derive(Clone)]
pub struct HttpSinkConfig {
    /// The sink's name (part of each batch's idempotency key).
    pub name: String,
    /// Gateway id (part of each batch's idempotency key).
    pub gateway_id: String,
    /// Where batches are POSTed (`http://` or `https://`).
    pub url: String,
    /// Bearer token (read from `token_file`; never logged).
    pub token: Option<String>,
    /// NDJSON (default) or a JSON array.
    pub format: BodyFormat,
    /// Per-request timeout.
    pub timeout: Duration,
}

impl std::fmt::Debug for HttpSinkConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpSinkConfig")
            .field("name", &self.name)
            .field("url", &self.url)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("format", &self.format)
            .field("timeout", &self.timeout)
            .finish()
    }
}
