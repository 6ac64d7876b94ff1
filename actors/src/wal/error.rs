//! [`WalError`]: how a WAL operation fails.

use std::path::PathBuf;

/// Errors of the WAL engine.
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    /// SQLite failed (I/O error, disk full, corruption). Retryable by the caller.
    #[error("WAL storage error: {0}")]
    Storage(#[from] rusqlite::Error),
    /// Ingest is refused until space is freed (policy `block`).
    #[error("WAL backpressure: {0}")]
    Backpressure(String),
    /// The named sink is not configured.
    #[error("unknown sink {0:?}")]
    UnknownSink(String),
    /// An operator request makes no sense (e.g. an empty time range).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The WAL thread is gone (it is being restarted).
    #[error("WAL unavailable: {0}")]
    Unavailable(String),
    /// Creating the data directory failed.
    #[error("cannot create WAL directory {path}: {source}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}
