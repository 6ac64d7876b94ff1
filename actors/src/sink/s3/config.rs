//! Configuration of an `s3` sink.

use std::path::PathBuf;

use crate::sink::SinkError;

/// Settings of one `s3` sink (`[sinks.NAME]` with `kind = "s3"`).
#[derive(Debug, Clone, PartialEq)]
pub struct S3SinkConfig {
    /// Where objects go: `file:///dir` (or `file://relative/dir`) today;
    /// `s3://bucket/prefix` arrives with the S3 client.
    pub url: String,
    /// Gateway id, the first part of every object name.
    pub gateway_id: String,
    /// gzip level 0-9 (default 1: fast; telemetry compresses well anyway).
    pub gzip_level: u32,
}

/// A parsed target URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A local directory; objects are fsync'd with their directories.
    Local {
        /// The directory.
        dir: PathBuf,
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
        if self.url.starts_with("s3://") {
            return Err(SinkError::Config(format!(
                "{}: s3:// targets are not built into this version yet (use file:///dir)",
                self.url
            )));
        }
        Err(SinkError::Config(format!(
            "{}: url must start with file:// or s3://",
            self.url
        )))
    }
}
