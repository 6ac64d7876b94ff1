//! Configuration of an `s3` sink.

use std::path::PathBuf;

use crate::keys::{secret_key, KeyError};
use crate::sink::{SinkContext, SinkError};
use crate::Secret;

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
        let cfg = S3SinkConfig {
            url,
            gateway_id: ctx.gateway_id.to_string(),
            gzip_level,
            endpoint: self.endpoint.clone(),
            region: self.region.clone(),
            path_style: self.path_style,
            access_key_id: secret_key("access_key_id_file", self.access_key_id_file.as_deref())?,
            secret_access_key: secret_key(
                "secret_access_key_file",
                self.secret_access_key_file.as_deref(),
            )?,
            multipart_threshold_bytes: multipart,
        };
        cfg.target()
            .map_err(|e| KeyError::new("url", e.to_string()))?;
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
            endpoint: None,
            region: None,
            path_style: None,
            access_key_id: None,
            secret_access_key: Some(Secret::new("s3cr3t")),
            multipart_threshold_bytes: 8 << 20,
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
    fn debug_output_never_shows_the_secret() {
        assert!(!format!("{:?}", cfg("s3://b")).contains("s3cr3t"));
    }
}
