//! Sinks against real servers started by the harness: S3 (moto) and an
//! analytics API that can be told to fail.

mod analytics;
#[allow(dead_code)]
#[path = "../api/helpers.rs"]
mod helpers;
mod http;
mod s3;
