//! Sinks against real servers started by the harness: S3 (moto).

#[allow(dead_code)]
#[path = "../api/helpers.rs"]
mod helpers;
mod s3;
