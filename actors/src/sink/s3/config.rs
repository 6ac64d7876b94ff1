//! Configuration of an `s3` sink.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::keeper::KeeperConfig;

use crate::keys::{secret_key, KeyError};
use crate::sink::{Compression, SinkContext, SinkError};
use crate::Secret;

/// The name of the zero-config archive: the one sink of a gateway that
/// configures no `[sinks.*]`.
pub const DEFAULT_ARCHIVE: &str = "archive";

/// The keys of the zero-config archive under `data_dir` (the table of
/// `[sinks.archive]` that such a gateway runs, and that `config print`
/// shows):
/// - `file://DATA_DIR/archive`;
/// - `max_bytes` 1 GiB: left alone for months, an edge host's disk must not
///   fill;
/// - `batch_max_wait_ms` 1000: a local archive has no latency target, and
///   every object costs a file creation, an fsync, a rename and a directory
///   fsync (about 12 KB written). At 40 records/s a 5 ms linger made ~21
///   objects a second and cost ~12 KB written and ~7 % of a core a record.
pub fn default_archive(data_dir: &Path) -> serde_json::Map<String, serde_json::Value> {
    let mut keys = serde_json::Map::new();
    keys.insert("kind".into(), "s3".into());
    let url = format!("file://{}", data_dir.join("archive").display());
    keys.insert("url".into(), url.into());
    keys.insert("max_bytes".into(), (1u64 << 30).into());
    keys.insert("batch_max_wait_ms".into(), 1000.into());
    keys
}

/// Settings of one `s3` sink (`[sinks.NAME]` with `kind = "s3"`).
#[derive(Debug, Clone, PartialEq)]
pub struct S3SinkConfig {
    /// Where objects go: `s3://bucket/prefix`, or `file:///dir`
    /// (`file://relative/dir`) for a local directory.
    pub url: String,
    /// Gateway id, the first part of every object name.
    pub gateway_id: String,
    /// gzip level 0-9 (default 1: fast; telemetry compresses well anyway).
    pub gzip_level: u32,
    /// The objects' compression: gzip (`.ndjson.gz`, the default) or zstd
    /// (`.ndjson.zst`, `s3://` only).
    pub compression: Compression,
    /// S3 API endpoint (MinIO, moto, …); `None` = AWS. An `http://`
    /// endpoint allows plain HTTP.
    pub endpoint: Option<String>,
    /// Region (default `us-east-1`, or `AWS_REGION`).
    pub region: Option<String>,
    /// Path-style requests (`endpoint/bucket/key`); default true with a custom endpoint.
    pub path_style: Option<bool>,
    /// Access key id (from a file); `None` = `AWS_ACCESS_KEY_ID` and the standard chain.
    pub access_key_id: Option<Secret>,
    /// Secret access key (from a file); `None` = `AWS_SECRET_ACCESS_KEY`.
    pub secret_access_key: Option<Secret>,
    /// Objects larger than this are uploaded in parts (multipart), at least 5 MiB.
    pub multipart_threshold_bytes: usize,
    /// `file://` only: merge each closed hour into one object (default true).
    pub compact: bool,
    /// `file://` only: delete the oldest objects while the archive is larger.
    pub max_bytes: Option<u64>,
    /// `file://` only: time between two passes of compaction and pruning.
    pub maintenance_interval: Duration,
}

/// A parsed target URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A local directory; objects are fsync'd with their directories.
    Local {
        /// The directory.
        dir: PathBuf,
    },
    /// An S3 bucket and key prefix.
    S3 {
        /// The bucket.
        bucket: String,
        /// Key prefix without leading or trailing `/` (may be empty).
        prefix: String,
    },
}

impl S3SinkConfig {
    /// The upkeep of a `file://` archive (compaction, `max_bytes`); none for S3.
    pub fn keeper(&self, sink: &str) -> Option<KeeperConfig> {
        match self.target() {
            Ok(Target::Local { dir }) if self.compact || self.max_bytes.is_some() => {
                Some(KeeperConfig {
                    sink: sink.to_string(),
                    dir,
                    compact: self.compact,
                    gzip_level: self.gzip_level,
                    max_bytes: self.max_bytes,
                    interval: self.maintenance_interval,
                })
            }
            _ => None,
        }
    }

    /// Parses [`Self::url`].
    pub fn target(&self) -> Result<Target, SinkError> {
        if let Some(rest) = self.url.strip_prefix("file://") {
            if rest.is_empty() {
                return Err(SinkError::Config("file:// URL needs a directory".into()));
            }
            return Ok(Target::Local {
                dir: PathBuf::from(rest),
            });
        }
        if let Some(rest) = self.url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(SinkError::Config(format!(
                    "{}: the bucket is missing",
                    self.url
                )));
            }
            return Ok(Target::S3 {
                bucket: bucket.to_string(),
                prefix: prefix.trim_matches('/').to_string(),
            });
        }
        Err(SinkError::Config(format!(
            "{}: url must start with file:// or s3://",
            self.url
        )))
    }
}

/// The `[sinks.NAME]` keys of `kind = "s3"` (besides the shared
/// [`DispatchKeys`](crate::dispatcher::DispatchKeys)).
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Keys {
    /// `s3://bucket/prefix` or `file:///dir` (required).
    pub url: Option<String>,
    /// gzip level 0-9 (default 1).
    pub gzip_level: Option<u32>,
    /// The objects' compression: `gzip` (default, `.ndjson.gz`) or `zstd`
    /// (`.ndjson.zst`; `s3://` only: a `file://` archive's hourly merge
    /// reads gzip).
    pub compression: Option<String>,
    /// S3 API endpoint (`http://` or `https://`; MinIO, moto, …); none = AWS.
    pub endpoint: Option<String>,
    /// Region (default `us-east-1`, or `AWS_REGION`).
    pub region: Option<String>,
    /// Path-style requests (default true with a custom endpoint).
    pub path_style: Option<bool>,
    /// File holding the access key id (default: the standard AWS chain).
    pub access_key_id_file: Option<PathBuf>,
    /// File holding the secret access key.
    pub secret_access_key_file: Option<PathBuf>,
    /// Objects larger than this go up in parts; at least 5 MiB (default 8 MiB).
    pub multipart_threshold_bytes: Option<usize>,
    /// `file://` only: merge each closed hour into one object (default true).
    pub compact: Option<bool>,
    /// `file://` only: the archive's size limit; the oldest objects go first
    /// (default: none for a configured sink, 1 GiB for the zero-config archive).
    pub max_bytes: Option<u64>,
    /// `file://` only: ms between two upkeep passes (default 60000).
    pub maintenance_interval_ms: Option<u64>,
}

impl S3Keys {
    /// Validates the keys into the sink's settings.
    pub fn build(&self, ctx: &SinkContext<'_>) -> Result<S3SinkConfig, KeyError> {
        let url = self.url.clone().ok_or_else(|| {
            KeyError::new(
                "url",
                "is required for kind s3 (file:///dir or s3://bucket/prefix)",
            )
        })?;
        let multipart = self.multipart_threshold_bytes.unwrap_or(8 << 20);
        if multipart < 5 << 20 {
            return Err(KeyError::new(
                "multipart_threshold_bytes",
                "must be at least 5242880 (S3's smallest part)",
            ));
        }
        if let Some(ep) = &self.endpoint {
            if !(ep.starts_with("http://") || ep.starts_with("https://")) {
                return Err(KeyError::new(
                    "endpoint",
                    "must start with http:// or https://",
                ));
            }
        }
        let gzip_level = self.gzip_level.unwrap_or(1);
        if gzip_level > 9 {
            return Err(KeyError::new("gzip_level", "must be 0 to 9"));
        }
        let compression = match Compression::from_key(
            self.compression.as_deref(),
            Compression::Gzip(gzip_level),
            gzip_level,
        )? {
            Compression::None => {
                return Err(KeyError::new(
                    "compression",
                    "\"none\": objects are gzip or zstd",
                ))
            }
            c => c,
        };
        let interval = self.maintenance_interval_ms.unwrap_or(60_000);
        if interval == 0 {
            return Err(KeyError::new("maintenance_interval_ms", "must be > 0"));
        }
        if self.max_bytes == Some(0) {
            return Err(KeyError::new(
                "max_bytes",
                "must be > 0 (leave it out for no limit)",
            ));
        }
        let cfg = S3SinkConfig {
            url,
            gateway_id: ctx.gateway_id.to_string(),
            gzip_level,
            compression,
            endpoint: self.endpoint.clone(),
            region: self.region.clone(),
            path_style: self.path_style,
            access_key_id: secret_key("access_key_id_file", self.access_key_id_file.as_deref())?,
            secret_access_key: secret_key(
                "secret_access_key_file",
                self.secret_access_key_file.as_deref(),
            )?,
            multipart_threshold_bytes: multipart,
            compact: self.compact.unwrap_or(true),
            max_bytes: self.max_bytes,
            maintenance_interval: Duration::from_millis(interval),
        };
        let target = cfg
            .target()
            .map_err(|e| KeyError::new("url", e.to_string()))?;
        if matches!(target, Target::Local { .. }) && compression == Compression::Zstd {
            return Err(KeyError::new(
                "compression",
                "\"zstd\" applies to s3:// targets only (a file:// archive's hourly merge reads gzip)",
            ));
        }
        if let Target::S3 { .. } = target {
            for (key, set) in [
                ("compact", self.compact.is_some()),
                ("max_bytes", self.max_bytes.is_some()),
                (
                    "maintenance_interval_ms",
                    self.maintenance_interval_ms.is_some(),
                ),
            ] {
                if set {
                    return Err(KeyError::new(
                        key,
                        "applies to file:// archives only (an S3 bucket has lifecycle rules)",
                    ));
                }
            }
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(url: &str) -> S3SinkConfig {
        S3SinkConfig {
            url: url.into(),
            gateway_id: "gw".into(),
            gzip_level: 1,
            compression: Compression::Gzip(1),
            endpoint: None,
            region: None,
            path_style: None,
            access_key_id: None,
            secret_access_key: Some(Secret::new("s3cr3t")),
            multipart_threshold_bytes: 8 << 20,
            compact: true,
            max_bytes: None,
            maintenance_interval: Duration::from_secs(60),
        }
    }

    #[test]
    fn urls_parse_into_targets() {
        assert_eq!(
            cfg("s3://bucket/a/b/").target().unwrap(),
            Target::S3 {
                bucket: "bucket".into(),
                prefix: "a/b".into()
            }
        );
        assert_eq!(
            cfg("s3://bucket").target().unwrap(),
            Target::S3 {
                bucket: "bucket".into(),
                prefix: "".into()
            }
        );
        assert_eq!(
            cfg("file:///x/y").target().unwrap(),
            Target::Local { dir: "/x/y".into() }
        );
        assert!(cfg("s3://").target().is_err());
        assert!(cfg("ftp://x").target().is_err());
    }

    #[test]
    fn upkeep_keys_apply_to_file_archives_only() {
        let ctx = SinkContext {
            name: "a",
            gateway_id: "gw",
            publish_timeout: Duration::from_secs(1),
        };
        let keys = |url: &str, max: Option<u64>, compact: Option<bool>| S3Keys {
            url: Some(url.into()),
            max_bytes: max,
            compact,
            ..S3Keys::default()
        };
        let c = keys("file:///a", Some(1 << 30), None).build(&ctx).unwrap();
        let k = c.keeper("a").unwrap();
        assert_eq!((k.compact, k.max_bytes), (true, Some(1 << 30)));
        assert_eq!(k.dir, PathBuf::from("/a"));
        let off = keys("file:///a", None, Some(false)).build(&ctx).unwrap();
        assert!(off.keeper("a").is_none());
        assert!(keys("s3://b", None, None)
            .build(&ctx)
            .unwrap()
            .keeper("a")
            .is_none());
        let e = keys("s3://b", Some(1), None).build(&ctx).unwrap_err();
        assert_eq!(e.key, "max_bytes");
        assert!(e.message.contains("file://"), "{}", e.message);
        assert!(keys("s3://b", None, Some(true)).build(&ctx).is_err());
        assert!(keys("file:///a", Some(0), None).build(&ctx).is_err());
    }

    #[test]
    fn debug_output_never_shows_the_secret() {
        assert!(!format!("{:?}", cfg("s3://b")).contains("s3cr3t"));
    }
}
