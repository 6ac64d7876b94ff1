//! The object-store sink: one gzip (or zstd) NDJSON object per batch.

use std::sync::Arc;

use chrono::{TimeZone, Utc};
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};

use super::config::{S3SinkConfig, Target};
use crate::sink::{Compression, PublishFuture, Sent, Sink, SinkError};
use crate::wal::Batch;

/// Writes each batch as one object whose key is derived from the batch's
/// seq range, so a retried batch overwrites its earlier attempt instead of
/// duplicating it.
pub struct ObjectStoreSink {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    gateway_id: Arc<str>,
    compression: Compression,
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
                    compression: cfg.compression,
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
                    compression: cfg.compression,
                    multipart_threshold: cfg.multipart_threshold_bytes.max(5 << 20),
                })
            }
        }
    }
}

/// `{prefix}/dt=YYYY-MM-DD/hour=HH/{gateway_id}-{first_seq}-{last_seq}.ndjson.gz`,
/// dated by the first record's receive time.
pub fn object_key(prefix: &str, gateway_id: &str, batch: &Batch) -> String {
    object_key_as(prefix, gateway_id, batch, Compression::Gzip(1))
}

/// [`object_key`] ending in `.ndjson.gz` or `.ndjson.zst` as compressed.
pub fn object_key_as(
    prefix: &str,
    gateway_id: &str,
    batch: &Batch,
    compression: Compression,
) -> String {
    let ms = batch.records.first().map_or(0, |r| r.receive_ms);
    let t = Utc.timestamp_millis_opt(ms).single().unwrap_or_default();
    let name = format!(
        "dt={}/hour={}/{gateway_id}-{}-{}.ndjson{}",
        t.format("%Y-%m-%d"),
        t.format("%H"),
        batch.first_seq(),
        batch.last_seq(),
        compression.suffix()
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
    encode_batch_as(batch, Compression::Gzip(level)).map(|(body, _)| body)
}

/// Compressed NDJSON and the size of the NDJSON before compression.
fn encode_batch_as(batch: &Batch, c: Compression) -> std::io::Result<(Vec<u8>, usize)> {
    let raw: usize = batch.records.iter().map(|r| r.json.len() + 1).sum();
    let body = c.ndjson(batch.records.iter().map(|r| r.json.as_bytes()), raw)?;
    Ok((body, raw))
}

impl Sink for ObjectStoreSink {
    fn publish(&mut self, batch: Arc<Batch>) -> PublishFuture {
        let store = self.store.clone();
        let compression = self.compression;
        let key = object_key_as(&self.prefix, &self.gateway_id, &batch, compression);
        let threshold = self.multipart_threshold;
        Box::pin(async move {
            let (body, raw) =
                tokio::task::spawn_blocking(move || encode_batch_as(&batch, compression))
                    .await
                    .map_err(|e| SinkError::Retryable(format!("encoder task failed: {e}")))?
                    .map_err(|e| {
                        SinkError::Retryable(format!("{} failed: {e}", compression.encoding()))
                    })?;
            let sent = Sent::new(raw, body.len());
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
            Ok(sent)
        })
    }
}
