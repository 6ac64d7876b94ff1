//! The HTTP sink: one POST per batch with an `Idempotency-Key` and, when
//! there is one, a W3C `traceparent` (the `sink.publish` span's when traces
//! are on, else the records' own when the whole batch shares one).
//!
//! With `compression = "gzip" | "zstd"` the body is compressed and named
//! in `Content-Encoding` (DESIGN §6b); the `Idempotency-Key` is the same
//! whatever the encoding.
//!
//! Outcomes: 2xx = delivered; 408, 429, 5xx, timeouts and connection errors
//! are retried (honouring `Retry-After` in seconds); any other 4xx means the
//! API will never take this batch: it is dead-lettered at once.

use std::sync::Arc;
use std::time::Duration;

use super::config::{BodyFormat, HttpSinkConfig};
use crate::sink::{Compression, PublishFuture, Sent, Sink, SinkError};
use crate::wal::Batch;

/// POSTs batches to an analytics API.
pub struct HttpSink {
    client: reqwest::Client,
    cfg: Arc<HttpSinkConfig>,
}

impl HttpSink {
    /// Builds the client.
    pub fn new(cfg: &HttpSinkConfig) -> Result<Self, SinkError> {
        let client = reqwest::Client::builder()
            .timeout(cfg.timeout)
            .pool_max_idle_per_host(4)
            .user_agent(concat!("iot-gateway/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| SinkError::Config(format!("http client: {e}")))?;
        Ok(Self {
            client,
            cfg: Arc::new(cfg.clone()),
        })
    }
}

/// The batch's idempotency key: the same records always get the same key,
/// so the API can drop a retried batch it already has.
pub fn batch_key(gateway_id: &str, sink: &str, batch: &Batch) -> String {
    format!(
        "{gateway_id}-{sink}-{}-{}",
        batch.first_seq(),
        batch.last_seq()
    )
}

fn encode(batch: &Batch, format: BodyFormat) -> Vec<u8> {
    let len: usize = batch
        .records
        .iter()
        .map(|r| r.json.len() + 1)
        .sum::<usize>()
        + 2;
    let mut out = Vec::with_capacity(len);
    match format {
        BodyFormat::Ndjson => {
            for r in &batch.records {
                out.extend_from_slice(r.json.as_bytes());
                out.push(b'\n');
            }
        }
        BodyFormat::JsonArray => {
            out.push(b'[');
            for (i, r) in batch.records.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(r.json.as_bytes());
            }
            out.push(b']');
        }
    }
    out
}

/// Classifies a response status.
pub fn classify(status: u16, retry_after: Option<&str>) -> Result<(), SinkError> {
    match status {
        200..=299 => Ok(()),
        408 | 429 | 500..=599 => {
            let message = format!("analytics API answered {status}");
            match retry_after.and_then(|v| v.trim().parse::<u64>().ok()) {
                Some(secs) => Err(SinkError::RetryAfter {
                    after: Duration::from_secs(secs),
                    message,
                }),
                None => Err(SinkError::Retryable(message)),
            }
        }
        _ => Err(SinkError::Permanent(format!(
            "analytics API refused the batch with {status}"
        ))),
    }
}

impl Sink for HttpSink {
    fn publish(&mut self, batch: Arc<Batch>) -> PublishFuture {
        let client = self.client.clone();
        let cfg = self.cfg.clone();
        Box::pin(async move {
            let key = batch_key(&cfg.gateway_id, &cfg.name, &batch);
            let content_type = match cfg.format {
                BodyFormat::Ndjson => "application/x-ndjson",
                BodyFormat::JsonArray => "application/json",
            };
            let raw = encode(&batch, cfg.format);
            let payload_bytes = raw.len();
            let body = match cfg.compression {
                Compression::None => raw,
                c => c
                    .encode(&raw)
                    .map_err(|e| SinkError::Retryable(format!("{}: {e}", c.encoding())))?,
            };
            let sent = Sent::new(payload_bytes, body.len());
            let mut req = client
                .post(&cfg.url)
                .header("Content-Type", content_type)
                .header("Idempotency-Key", &key);
            if cfg.compression != Compression::None {
                req = req.header("Content-Encoding", cfg.compression.encoding());
            }
            let mut req = req.body(body);
            if let Some(t) = &cfg.token {
                req = req.bearer_auth(t.expose());
            }
            if let Some(tp) = crate::trace::outgoing_traceparent(&batch) {
                req = req.header("traceparent", tp);
            }
            let resp = req.send().await.map_err(|e| {
                if e.is_timeout() {
                    SinkError::Unavailable(format!(
                        "POST {} timed out after {:?}",
                        cfg.url, cfg.timeout
                    ))
                } else if e.is_connect() {
                    SinkError::Unavailable(format!("POST {}: {e}", cfg.url))
                } else {
                    SinkError::Retryable(format!("POST {}: {e}", cfg.url))
                }
            })?;
            let status = resp.status().as_u16();
            let retry_after = resp
                .headers()
                .get("Retry-After")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            classify(status, retry_after.as_deref()).map(|()| sent)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_delivered_retry_or_dead_letter() {
        assert!(classify(204, None).is_ok());
        assert!(matches!(classify(503, None), Err(SinkError::Retryable(_))));
        assert!(matches!(classify(408, None), Err(SinkError::Retryable(_))));
        assert_eq!(
            classify(429, Some("7")).unwrap_err(),
            SinkError::RetryAfter {
                after: Duration::from_secs(7),
                message: "analytics API answered 429".into()
            }
        );
        assert!(matches!(
            classify(400, Some("7")),
            Err(SinkError::Permanent(_))
        ));
        assert!(matches!(classify(404, None), Err(SinkError::Permanent(_))));
    }
}
