//! Configuration of an `http` sink.

use std::time::Duration;

use crate::keys::{secret_key, KeyError};
use crate::sink::compress::{Compression, GZIP_DEFAULT_LEVEL};
use crate::sink::SinkContext;
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
    /// The body's compression, sent as `Content-Encoding`.
    pub compression: Compression,
}

/// The `[sinks.NAME]` keys of `kind = "http"` (besides the shared
/// [`DispatchKeys`](crate::dispatcher::DispatchKeys)).
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpKeys {
    /// Where batches are POSTed: `http://` or `https://` (required).
    pub url: Option<String>,
    /// File holding the bearer token.
    pub token_file: Option<std::path::PathBuf>,
    /// `ndjson` (default) or `json` (a JSON array).
    pub format: Option<String>,
    /// The request body's compression, named in `Content-Encoding`: `none`
    /// (default), `gzip` or `zstd`.
    pub compression: Option<String>,
}

impl HttpKeys {
    /// Validates the keys into the sink's settings.
    pub fn build(&self, ctx: &SinkContext<'_>) -> Result<HttpSinkConfig, KeyError> {
        let url = self
            .url
            .clone()
            .ok_or_else(|| KeyError::new("url", "is required for kind http"))?;
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(KeyError::new("url", "must start with http:// or https://"));
        }
        let format = match self.format.as_deref().unwrap_or("ndjson") {
            "ndjson" => BodyFormat::Ndjson,
            "json" | "json_array" => BodyFormat::JsonArray,
            other => {
                return Err(KeyError::new(
                    "format",
                    format!("{other:?}: expected ndjson or json"),
                ))
            }
        };
        Ok(HttpSinkConfig {
            name: ctx.name.to_string(),
            gateway_id: ctx.gateway_id.to_string(),
            url,
            token: secret_key("token_file", self.token_file.as_deref())?,
            format,
            timeout: ctx.publish_timeout,
            compression: Compression::from_key(
                self.compression.as_deref(),
                Compression::None,
                GZIP_DEFAULT_LEVEL,
            )?,
        })
    }
}
