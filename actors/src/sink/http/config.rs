//! Configuration of an `http` sink.

use std::time::Duration;

use crate::Secret;

/// How a batch is encoded in the request body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFormat {
    /// One canonical record per line (`application/x-ndjson`).
    Ndjson,
    /// A JSON array of canonical records (`application/json`).
    JsonArray,
}

/// Settings of one `http` sink (`[sinks.NAME]` with `kind = "http"`).
#[derive(Debug, Clone)]
pub struct HttpSinkConfig {
    /// The sink's name (part of each batch's idempotency key).
    pub name: String,
    /// Gateway id (part of each batch's idempotency key).
    pub gateway_id: String,
    /// Where batches are POSTed (`http://` or `https://`).
    pub url: String,
    /// Bearer token (read from `token_file`).
    pub token: Option<Secret>,
    /// NDJSON (default) or a JSON array.
    pub format: BodyFormat,
    /// Per-request timeout.
    pub timeout: Duration,
}
