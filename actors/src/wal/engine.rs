//! The synchronous WAL engine: its types, opening and recovery. The work is
//! in rooms of its own: `append.rs` (appends, dedup and the group write),
//! `delivery.rs` (per-sink delivery state: fetch, ack, dead, release),
//! `space.rs` (size, backpressure and compaction) and `admin.rs` (operator
//! commands). See the module doc of [`crate::wal`] for the format, the
//! invariants and the recovery steps.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension};

use super::delivery::{load_sink, SinkState};

pub(super) const SCHEMA_VERSION: i64 = 1;
/// The on-disk schema (the one copy; the module doc of [`crate::wal`] shows it).
const SCHEMA: &str = include_str!("schema.sql");

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

/// What to do when the WAL is over its size limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackpressurePolicy {
    /// Refuse ingest (HTTP 503, MQTT stops acking) until space returns.
    Block,
    /// Delete the oldest records, counted in `gateway_wal_dropped_records_total`.
    DropOldest,
}

/// Settings of one WAL.
#[derive(Debug, Clone)]
pub struct WalConfig {
    /// The SQLite database file.
    pub path: PathBuf,
    /// Names of the configured sinks.
    pub sinks: Vec<String>,
    /// Delivered records are kept this long for replay.
    pub retention: Duration,
    /// An idempotency key is a duplicate within this window.
    pub dedup_window: Duration,
    /// Backpressure above this many bytes of live data.
    pub max_bytes: u64,
    /// Backpressure below this many free bytes on the disk.
    pub min_free_disk_bytes: u64,
    /// What backpressure does.
    pub policy: BackpressurePolicy,
}

impl WalConfig {
    /// Defaults for a WAL at `path` with the given sinks (used by tests and tools).
    pub fn new(path: impl Into<PathBuf>, sinks: &[&str]) -> Self {
        Self {
            path: path.into(),
            sinks: sinks.iter().map(|s| s.to_string()).collect(),
            retention: Duration::from_secs(24 * 3600),
            dedup_window: Duration::from_secs(24 * 3600),
            max_bytes: 4 << 30,
            min_free_disk_bytes: 64 << 20,
            policy: BackpressurePolicy::Block,
        }
    }
}

/// A record to append. `body` is the canonical record JSON object without
/// its `v` and `seq` fields, e.g. `{"idempotency_key":…}`.
#[derive(Debug, Clone, PartialEq)]
pub struct NewRecord {
    /// Dedup key.
    pub idempotency_key: String,
    /// Correlation id of the request that carried it.
    pub correlation_id: String,
    /// Device id.
    pub device_id: String,
    /// Receive time, epoch ms.
    pub receive_ms: i64,
    /// Canonical JSON object without `v` and `seq`.
    pub body: String,
}

/// What became of one appended record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AppendOutcome {
    /// Stored under a new seq.
    Appended {
        /// The new seq.
        seq: u64,
    },
    /// The key was seen within the dedup window: nothing stored.
    Duplicate {
        /// Seq of the original.
        seq: u64,
        /// Correlation id of the original.
        correlation_id: String,
    },
}

/// A stored record as handed to a sink.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredRecord {
    /// Sequence number.
    pub seq: u64,
    /// Device id.
    pub device_id: String,
    /// Dedup key.
    pub idempotency_key: String,
    /// Correlation id of the request that carried it.
    pub correlation_id: String,
    /// Receive time, epoch ms.
    pub receive_ms: i64,
    /// The full canonical record JSON (one line, no newline).
    pub json: String,
}

/// A batch of records InFlight for one sink.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// The sink.
    pub sink: String,
    /// The seq ranges this batch covers (what `ack`/`dead`/`release` take back).
    pub ranges: Vec<(u64, u64)>,
    /// The records in seq order.
    pub records: Vec<StoredRecord>,
}

impl Batch {
    /// Seq of the first record.
    pub fn first_seq(&self) -> u64 {
        self.records.first().map_or(0, |r| r.seq)
    }
    /// Seq of the last record.
    pub fn last_seq(&self) -> u64 {
        self.records.last().map_or(0, |r| r.seq)
    }
}

/// One write inside a group commit.
#[derive(Debug, Clone)]
pub enum WriteOp {
    /// Append records, all or nothing.
    Append(Vec<NewRecord>),
    /// The sink delivered these ranges.
    Ack {
        /// The sink.
        sink: String,
        /// The ranges of the batch.
        ranges: Vec<(u64, u64)>,
    },
    /// The sink gave up on these ranges: dead letters.
    Dead {
        /// The sink.
        sink: String,
        /// The ranges of the batch.
        ranges: Vec<(u64, u64)>,
        /// Why.
        error: String,
        /// Attempts made.
        attempts: u32,
    },
}

/// The result of one [`WriteOp`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteResult {
    /// Outcome per appended record, in request order.
    Appended(Vec<AppendOutcome>),
    /// An ack or dead write was applied.
    Done,
}

/// Per-sink counts.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct SinkStats {
    /// Every seq at or below is finished.
    pub cursor: u64,
    /// Waiting to be fetched.
    pub enqueued: u64,
    /// Handed to the sink, not finished.
    pub inflight: u64,
    /// Dead letters.
    pub dead: u64,
    /// Receive time (epoch ms) of the oldest record not yet finished.
    pub oldest_pending_ms: Option<i64>,
}

/// WAL-wide counts.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct WalStats {
    /// Highest seq assigned.
    pub head: u64,
    /// Records stored.
    pub stored_records: u64,
    /// Bytes of live data in the database.
    pub live_bytes: u64,
    /// Free bytes on the WAL's file system.
    pub disk_free_bytes: u64,
    /// Whether appends are being refused.
    pub backpressure: bool,
    /// Per sink.
    pub sinks: BTreeMap<String, SinkStats>,
}

/// The WAL engine: one SQLite connection plus the in-memory delivery state.
pub struct Wal {
    pub(super) conn: Connection,
    pub(super) cfg: WalConfig,
    pub(super) sinks: BTreeMap<String, SinkState>,
    pub(super) next_seq: u64,
    pub(super) stored_records: u64,
    pub(super) backpressure: Option<String>,
    pub(super) live_bytes: u64,
    pub(super) disk_free: u64,
}

/// Epoch milliseconds now.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl Wal {
    /// Opens (creating if needed) the WAL and recovers its state.
    pub fn open(cfg: WalConfig) -> Result<Self, WalError> {
        if let Some(dir) = cfg.path.parent() {
            if !dir.as_os_str().is_empty() {
                std::fs::create_dir_all(dir).map_err(|source| WalError::Dir {
                    path: dir.to_path_buf(),
                    source,
                })?;
            }
        }
        let conn = Connection::open(&cfg.path)?;
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        // Keep the -wal file bounded after checkpoints.
        conn.pragma_update(None, "journal_size_limit", 64i64 << 20)?;
        conn.execute_batch(SCHEMA)?;
        conn.execute(
            "INSERT OR IGNORE INTO meta(key, value) VALUES('schema_version', ?1)",
            [SCHEMA_VERSION],
        )?;

        let max_seq: u64 =
            conn.query_row("SELECT COALESCE(MAX(seq), 0) FROM records", [], |r| {
                r.get(0)
            })?;
        let floor: u64 = conn
            .query_row("SELECT value FROM meta WHERE key = 'seq_floor'", [], |r| {
                r.get(0)
            })
            .optional()?
            .unwrap_or(0);
        let max_cursor: u64 =
            conn.query_row("SELECT COALESCE(MAX(cursor), 0) FROM sinks", [], |r| {
                r.get(0)
            })?;
        let head = max_seq.max(floor).max(max_cursor);
        let stored_records: u64 =
            conn.query_row("SELECT COUNT(*) FROM records", [], |r| r.get(0))?;

        let mut sinks = BTreeMap::new();
        for name in &cfg.sinks {
            sinks.insert(name.clone(), load_sink(&conn, name, head)?);
        }

        let mut wal = Self {
            conn,
            cfg,
            sinks,
            next_seq: head + 1,
            stored_records,
            backpressure: None,
            live_bytes: 0,
            disk_free: u64::MAX,
        };
        wal.refresh_space()?;
        Ok(wal)
    }

    /// The configuration it was opened with.
    pub fn config(&self) -> &WalConfig {
        &self.cfg
    }

    /// Highest seq assigned so far.
    pub fn head(&self) -> u64 {
        self.next_seq - 1
    }

    /// Why appends are refused right now, if they are.
    pub fn backpressure(&self) -> Option<&str> {
        self.backpressure.as_deref()
    }

    pub(super) fn sink_mut(&mut self, sink: &str) -> Result<&mut SinkState, WalError> {
        self.sinks
            .get_mut(sink)
            .ok_or_else(|| WalError::UnknownSink(sink.to_string()))
    }
}

/// Builds the full canonical record from the stored body by splicing in `v`
/// and `seq` (the body is a JSON object: `{"idempotency_key":…}`).
pub fn splice_record(seq: u64, body: &str) -> String {
    let rest = body.strip_prefix('{').unwrap_or(body);
    let mut s = String::with_capacity(rest.len() + 32);
    s.push_str("{\"v\":1,\"seq\":");
    s.push_str(&seq.to_string());
    if rest != "}" {
        s.push(',');
    }
    s.push_str(rest);
    s
}

/// A record with key `key`, received now (tests of every room).
#[cfg(test)]
pub(super) fn test_record(key: &str) -> NewRecord {
    NewRecord {
        idempotency_key: key.into(),
        correlation_id: format!("c-{key}"),
        device_id: "dev-1".into(),
        receive_ms: now_ms(),
        body: format!("{{\"idempotency_key\":\"{key}\"}}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splice_adds_version_and_seq() {
        assert_eq!(splice_record(7, "{\"a\":1}"), "{\"v\":1,\"seq\":7,\"a\":1}");
        assert_eq!(splice_record(7, "{}"), "{\"v\":1,\"seq\":7}");
    }
}
