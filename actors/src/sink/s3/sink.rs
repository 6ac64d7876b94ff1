//! The object-store sink: one gzip NDJSON object per batch.

use std::io::Write;
use std::sync::Arc;

use chrono::{TimeZone, Utc};
use flate2::write::GzEncoder;
use flate2::Compression;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

use super::config::{S3SinkConfig, Target};
use crate::sink::{PublishFuture, Sink, SinkError};
use crate::wal::Batch;

/// Writes each batch as one object whose key is derived from the batch's
/// seq range, so a retried batch overwrites its earlier attempt instead of
/// duplicating it.
pub struct ObjectStoreSink {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    gateway_id: Arc<str>,
    level: u32,
}

impl ObjectStoreSink {
    /// Builds the client for `cfg`.
    pub fn new(cfg: &S3SinkConfig) -> Result<Self, SinkError> {
        match cfg.target()? {
            Target::Local { dir } => {
                std::fs::create_dir_all(&dir).map_err(|e| {
                    SinkError::Retryable(format!("cannot create {}: {e}", dir.display()))
                })?;
                let store = LocalFileSystem::new_with_prefix(&dir)
                    .map_err(|e| SinkError::Config(format!("{}: {e}", dir.display())))?
                    .with_fsync(true);
                Ok(Self {
                    store: Arc::new(store),
                    prefix: String::new(),
                    gateway_id: cfg.gateway_id.as_str().into(),
                    level: cfg.gzip_level.min(9),
                })
            }
        }
    }
}

/// `{prefix}/dt=YYYY-MM-DD/hour=HH/{gateway_id}-{first_seq}-{last_seq}.ndjson.gz`,
/// dated by the first record's receive time.
pub fn object_key(prefix: &str, gateway_id: &str, batch: &Batch) -> String {
    let ms = batch.records.first().map_or(0, |r| r.receive_ms);
    let t = Utc.timestamp_millis_opt(ms).single().unwrap_or_default();
    let name = format!(
        "dt={}/hour={}/{gateway_id}-{}-{}.ndjson.gz",
        t.format("%Y-%m-%d"),
        t.format("%H"),
        batch.first_seq(),
        batch.last_seq()
    );
    let prefix = prefix.trim_matches('/');
    if prefix.is_empty() {
        name
    } else {
        format!("{prefix}/{name}")
    }
}

/// gzip-compressed NDJSON: one canonical record per line.
pub fn encode_batch(batch: &Batch, level: u32) -> std::io::Result<Vec<u8>> {
    let raw: usize = batch.records.iter().map(|r| r.json.len() + 1).sum();
    let mut enc = GzEncoder::new(Vec::with_capacity(raw / 4 + 64), Compression::new(level));
    for r in &batch.records {
        enc.write_all(r.json.as_bytes())?;
        enc.write_all(b"\n")?;
    }
    enc.finish()
}

impl Sink for ObjectStoreSink {
    fn publish(&mut self, batch: Arc<Batch>) -> PublishFuture {
        let store = self.store.clone();
        let key = object_key(&self.prefix, &self.gateway_id, &batch);
        let level = self.level;
        Box::pin(async move {
            let body = tokio::task::spawn_blocking(move || encode_batch(&batch, level))
                .await
                .map_err(|e| SinkError::Retryable(format!("encoder task failed: {e}")))?
                .map_err(|e| SinkError::Retryable(format!("gzip failed: {e}")))?;
            store
                .put(&ObjectPath::from(key.as_str()), PutPayload::from(body))
                .await
                .map_err(|e| SinkError::Retryable(format!("put {key}: {e}")))?;
            Ok(())
        })
    }
}
