//! Sinks: where records go after the WAL. One folder per kind; every kind
//! implements [`Sink`] and runs inside a [`SinkActor`].

mod actor;
pub mod http;
pub mod kafka;
pub mod mqtt;
pub mod s3;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

pub use actor::{PublishBatch, SinkActor, SinkFactory};

use crate::wal::Batch;

/// A sink's answer to one batch.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SinkError {
    /// A transient failure (target down, timeout, 5xx): try the same batch again later.
    #[error("retryable: {0}")]
    Retryable(String),
    /// The target is unreachable (connection refused, timeout, broker down):
    /// retried, and not counted against the batch's retry budget.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// Retryable, and the target said when (`Retry-After`).
    #[error("retryable after {after:?}: {message}")]
    RetryAfter {
        /// Wait at least this long.
        after: std::time::Duration,
        /// What happened.
        message: String,
    },
    /// The target refused the batch for good (4xx, bad data): dead-letter it now.
    #[error("permanent: {0}")]
    Permanent(String),
    /// The sink's configuration is unusable.
    #[error("configuration: {0}")]
    Config(String),
}

impl SinkError {
    /// Whether the dispatcher may try again.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            SinkError::Retryable(_) | SinkError::RetryAfter { .. } | SinkError::Unavailable(_)
        )
    }
}

/// The future a sink returns for one batch.
pub type PublishFuture = Pin<Box<dyn Future<Output = Result<(), SinkError>>>>;

/// One kind of delivery target.
pub trait Sink: 'static {
    /// Delivers `batch`. `Ok` means the target has it durably: the WAL acks
    /// the batch for this sink on `Ok` and only then.
    fn publish(&mut self, batch: Arc<Batch>) -> PublishFuture;
}
