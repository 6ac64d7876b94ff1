//! The object-store sink: one gzip NDJSON object per batch.

use std::io::Write;
use std::sync::Arc;

use chrono::{TimeZone, Utc};
use flate2::write::GzEncoder;
use flate2::Compression;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};

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
    /// Bodies above this go up in parts (S3 parts are at least 5 MiB).
    multipart_threshold: usize,
}

impl ObjectStoreSink {
    /// Builds the client for `cfg`.
    pub fn new(cfg: &S3SinkConfig) -> Result<Self, SinkError> {
        match cfg.target()? {
            Target::Local { dir } => {
                // Durably: object_store syncs only the directories it
                // creates below this root.
                crate::durable::create_dir_all(&dir).map_err(|e| {
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
                    multipart_threshold: usize::MAX,
                })
            }
            Target::S3 { bucket, prefix } => {
                let mut b = AmazonS3Builder::from_env().with_bucket_name(&bucket);
                b = b.with_region(
                    cfg.region
                        .clone()
                        .or_else(|| std::env::var("AWS_REGION").ok())
                        .unwrap_or_else(|| "us-east-1".into()),
                );
                if let Some(ep) = &cfg.endpoint {
                    b = b
                        .with_endpoint(ep)
                        .with_allow_http(ep.starts_with("http://"))
                        .with_virtual_hosted_style_request(!cfg.path_style.unwrap_or(true));
                } else if let Some(path_style) = cfg.path_style {
                    b = b.with_virtual_hosted_style_request(!path_style);
                }
                if let Some(k) = &cfg.access_key_id {
                    b = b.with_access_key_id(k.expose());
                }
                if let Some(s) = &cfg.secret_access_key {
                    b = b.with_secret_access_key(s.expose());
                }
                let store = b
                    .build()
                    .map_err(|e| SinkError::Config(format!("{}: {e}", cfg.url)))?;
                Ok(Self {
                    store: Arc::new(store),
                    prefix,
                    gateway_id: cfg.gateway_id.as_str().into(),
                    level: cfg.gzip_level.min(9),
                    multipart_threshold: cfg.multipart_threshold_bytes.max(5 << 20),
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
        let threshold = self.multipart_threshold;
        Box::pin(async move {
            let body = tokio::task::spawn_blocking(move || encode_batch(&batch, level))
                .await
                .map_err(|e| SinkError::Retryable(format!("encoder task failed: {e}")))?
                .map_err(|e| SinkError::Retryable(format!("gzip failed: {e}")))?;
            let path = ObjectPath::from(key.as_str());
            let failed = |e: object_store::Error| SinkError::Retryable(format!("put {key}: {e}"));
            if body.len() <= threshold {
                store
                    .put(&path, PutPayload::from(body))
                    .await
                    .map_err(failed)?;
            } else {
                let upload = store.put_multipart(&path).await.map_err(failed)?;
                let mut w = WriteMultipart::new_with_chunk_size(upload, 5 << 20);
                w.write(&body);
                w.finish().await.map_err(failed)?;
            }
            Ok(())
        })
    }
}
