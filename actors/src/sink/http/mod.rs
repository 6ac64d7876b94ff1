//! Kind `http`: POST batches to an analytics API.

mod config;
mod sink;

pub use config::{BodyFormat, HttpKeys, HttpSinkConfig};
pub use sink::HttpSink;
