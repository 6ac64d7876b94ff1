//! Kind `s3`: gzip NDJSON objects through `object_store`, to an S3 bucket or
//! a local directory (`file://`) by the same code path.

mod config;
pub mod keeper;
mod sink;

pub use config::{default_archive, S3Keys, S3SinkConfig, Target, DEFAULT_ARCHIVE};
pub use keeper::{ArchiveKeeper, KeeperConfig};
pub use sink::{encode_batch, object_key, object_key_as, ObjectStoreSink};
