//! The synchronous WAL engine. See the module doc of [`crate::wal`] for the
//! format, the invariants and the recovery steps.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension};

use super::ranges::RangeSet;

#[path = "admin.rs"]
mod admin;
pub use admin::{
    count_dead, for_each_dead, integrity_report, list_dead, parse_time_ms, time_ms, CheckReport,
    DeadLetter, DlqFilter, Problem, ReplayOutcome,
};

const SCHEMA_VERSION: i64 = 1;
/// Records compacted per step (keeps commit latency low).
pub(crate) const COMPACT_CHUNK: usize = 5000;
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

#[derive(Debug, Default, Clone)]
struct SinkState {
    cursor: u64,
    done: RangeSet,
    inflight: RangeSet,
    dead_count: u64,
    /// The stored cursor/done rows are behind the in-memory state.
    dirty: bool,
    /// The cursor and done ranges as last committed to disk (`None`:
    /// unknown, rewrite them whole). Lets a commit write only the ranges
    /// that changed: after a requeue of scattered dead letters a sink can
    /// hold tens of thousands of ranges.
    stored: Option<(u64, RangeSet)>,
}

impl SinkState {
    fn finish(&mut self, first: u64, last: u64) {
        self.inflight.remove(first, last);
        let first = first.max(self.cursor + 1);
        if first > last {
            return;
        }
        self.done.insert(first, last);
        while let Some(end) = self.done.pop_contiguous(self.cursor + 1) {
            self.cursor = self.cursor.max(end);
        }
        self.dirty = true;
    }

    /// The state was committed as it is in memory.
    fn mark_persisted(&mut self) {
        self.dirty = false;
        self.stored = Some((self.cursor, self.done.clone()));
    }

    fn excluded(&self) -> RangeSet {
        self.done.union(&self.inflight)
    }
}

/// The WAL engine: one SQLite connection plus the in-memory delivery state.
pub struct Wal {
    conn: Connection,
    cfg: WalConfig,
    sinks: BTreeMap<String, SinkState>,
    next_seq: u64,
    stored_records: u64,
    backpressure: Option<String>,
    live_bytes: u64,
    disk_free: u64,
}

/// Epoch milliseconds now.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn free_disk_bytes(dir: &Path) -> u64 {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return u64::MAX;
    };
    // SAFETY: statvfs writes into the zeroed struct we own; the path is a
    // valid NUL-terminated string for the duration of the call.
    unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c.as_ptr(), &mut st) == 0 {
            (st.f_bavail as u64).saturating_mul(st.f_frsize as u64)
        } else {
            u64::MAX
        }
    }
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

    fn sink_mut(&mut self, sink: &str) -> Result<&mut SinkState, WalError> {
        self.sinks
            .get_mut(sink)
            .ok_or_else(|| WalError::UnknownSink(sink.to_string()))
    }

    /// Applies `ops` in one transaction with one commit (one fsync).
    ///
    /// The outer `Err` means the transaction failed and nothing of it is
    /// stored; an inner `Err` refuses that op alone (backpressure, unknown sink).
    #[allow(clippy::type_complexity)]
    pub fn write(
        &mut self,
        ops: &[WriteOp],
    ) -> Result<Vec<Result<WriteResult, WalError>>, WalError> {
        if self.backpressure.is_some()
            && self.live_bytes > self.cfg.max_bytes
            && ops.iter().any(|op| matches!(op, WriteOp::Append(_)))
        {
            // Only data that a sink still needs may refuse an append:
            // delivered records make room first.
            self.make_room(COMPACT_CHUNK)?;
        }
        let seq_before = self.next_seq;
        let stored_before = self.stored_records;
        let res = self.write_inner(ops);
        match res {
            Ok(out) => {
                // Every sink touched is now stored as it is in memory.
                for st in self.sinks.values_mut() {
                    if st.dirty {
                        st.mark_persisted();
                    }
                }
                Ok(out)
            }
            Err(e) => {
                // Rolled back: hand the seqs out again so none is skipped
                // (a gap above a cursor would never be acked).
                self.next_seq = seq_before;
                self.stored_records = stored_before;
                Err(e)
            }
        }
    }

    #[allow(clippy::type_complexity)]
    fn write_inner(
        &mut self,
        ops: &[WriteOp],
    ) -> Result<Vec<Result<WriteResult, WalError>>, WalError> {
        let window_start = now_ms() - self.cfg.dedup_window.as_millis() as i64;
        let tx = self.conn.transaction()?;
        let mut out = Vec::with_capacity(ops.len());
        {
            let mut find = tx.prepare_cached(
                "SELECT seq, correlation_id, receive_ms FROM records WHERE idem_key = ?1 ORDER BY seq DESC LIMIT 1",
            )?;
            let mut insert = tx.prepare_cached(
                "INSERT INTO records(seq, idem_key, correlation_id, device_id, receive_ms, body) VALUES(?1, ?2, ?3, ?4, ?5, ?6)",
            )?;
            let mut insert_dead = tx.prepare_cached(
                "INSERT OR REPLACE INTO dead(sink, seq, attempts, error, dead_ms) SELECT ?1, seq, ?2, ?3, ?4 FROM records WHERE seq BETWEEN ?5 AND ?6",
            )?;
            for op in ops {
                match op {
                    WriteOp::Append(records) => {
                        if let Some(why) = &self.backpressure {
                            out.push(Err(WalError::Backpressure(why.clone())));
                            continue;
                        }
                        let mut outcomes = Vec::with_capacity(records.len());
                        for rec in records {
                            let prior: Option<(u64, String, i64)> = find
                                .query_row([&rec.idempotency_key], |r| {
                                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                                })
                                .optional()?;
                            match prior {
                                Some((seq, correlation_id, ms)) if ms >= window_start => {
                                    outcomes.push(AppendOutcome::Duplicate {
                                        seq,
                                        correlation_id,
                                    });
                                }
                                _ => {
                                    let seq = self.next_seq;
                                    insert.execute(params![
                                        seq,
                                        rec.idempotency_key,
                                        rec.correlation_id,
                                        rec.device_id,
                                        rec.receive_ms,
                                        rec.body
                                    ])?;
                                    self.next_seq += 1;
                                    self.stored_records += 1;
                                    outcomes.push(AppendOutcome::Appended { seq });
                                }
                            }
                        }
                        out.push(Ok(WriteResult::Appended(outcomes)));
                    }
                    WriteOp::Ack { sink, ranges } => match self.sinks.get_mut(sink) {
                        None => out.push(Err(WalError::UnknownSink(sink.clone()))),
                        Some(st) => {
                            for &(a, b) in ranges {
                                st.finish(a, b);
                            }
                            out.push(Ok(WriteResult::Done));
                        }
                    },
                    WriteOp::Dead {
                        sink,
                        ranges,
                        error,
                        attempts,
                    } => match self.sinks.get_mut(sink) {
                        None => out.push(Err(WalError::UnknownSink(sink.clone()))),
                        Some(st) => {
                            let now = now_ms();
                            for &(a, b) in ranges {
                                // Only records still unfinished become dead letters.
                                let lo = a.max(st.cursor + 1);
                                if lo <= b {
                                    let mut open = RangeSet::new();
                                    open.insert(lo, b);
                                    for &(x, y) in st.done.ranges() {
                                        open.remove(x, y);
                                    }
                                    for &(x, y) in open.ranges() {
                                        let n = insert_dead
                                            .execute(params![sink, attempts, error, now, x, y])?;
                                        st.dead_count += n as u64;
                                    }
                                }
                                st.finish(a, b);
                            }
                            out.push(Ok(WriteResult::Done));
                        }
                    },
                }
            }
            for (name, st) in &self.sinks {
                if st.dirty {
                    persist_sink(&tx, name, st)?;
                }
            }
        }
        tx.commit()?;
        Ok(out)
    }

    /// Appends one request's records in their own transaction (tools, tests).
    pub fn append(&mut self, records: Vec<NewRecord>) -> Result<Vec<AppendOutcome>, WalError> {
        let mut res = self.write(&[WriteOp::Append(records)])?;
        match res.pop() {
            Some(Ok(WriteResult::Appended(o))) => Ok(o),
            Some(Err(e)) => Err(e),
            _ => Ok(Vec::new()),
        }
    }

    /// Marks `ranges` delivered for `sink` (tools, tests).
    pub fn ack(&mut self, sink: &str, ranges: &[(u64, u64)]) -> Result<(), WalError> {
        let op = WriteOp::Ack {
            sink: sink.to_string(),
            ranges: ranges.to_vec(),
        };
        self.write(&[op])?
            .pop()
            .unwrap_or(Ok(WriteResult::Done))
            .map(|_| ())
    }

    /// Dead-letters `ranges` for `sink` (tools, tests).
    pub fn dead(
        &mut self,
        sink: &str,
        ranges: &[(u64, u64)],
        error: &str,
        attempts: u32,
    ) -> Result<(), WalError> {
        let op = WriteOp::Dead {
            sink: sink.to_string(),
            ranges: ranges.to_vec(),
            error: error.to_string(),
            attempts,
        };
        self.write(&[op])?
            .pop()
            .unwrap_or(Ok(WriteResult::Done))
            .map(|_| ())
    }

    /// Puts InFlight `ranges` back to Enqueued (a failed or abandoned batch).
    pub fn release(&mut self, sink: &str, ranges: &[(u64, u64)]) -> Result<(), WalError> {
        let st = self.sink_mut(sink)?;
        for &(a, b) in ranges {
            st.inflight.remove(a, b);
        }
        Ok(())
    }

    /// Puts everything InFlight for `sink` back to Enqueued (its dispatcher restarted).
    pub fn release_all(&mut self, sink: &str) -> Result<(), WalError> {
        self.sink_mut(sink)?.inflight = RangeSet::new();
        Ok(())
    }

    /// The lowest seq above the cursor that is neither finished nor InFlight.
    fn first_enqueued(st: &SinkState) -> u64 {
        let mut pos = st.cursor + 1;
        for &(a, b) in st.excluded().ranges() {
            if a <= pos && pos <= b {
                pos = b + 1;
            }
        }
        pos
    }

    fn enqueued_count(&self, st: &SinkState) -> u64 {
        let head = self.head();
        if head <= st.cursor {
            return 0;
        }
        (head - st.cursor).saturating_sub(st.excluded().len())
    }

    /// Takes up to `max_records` Enqueued records for `sink` in seq order and
    /// marks them InFlight. With `max_wait`, returns `None` while fewer than
    /// `max_records` are waiting and the oldest of them is younger than
    /// `max_wait` (so batches fill up under load and still leave on time).
    pub fn fetch(
        &mut self,
        sink: &str,
        max_records: usize,
        max_wait: Duration,
    ) -> Result<Option<Batch>, WalError> {
        let max_records = max_records.max(1);
        let head = self.head();
        let st = self
            .sinks
            .get(sink)
            .ok_or_else(|| WalError::UnknownSink(sink.to_string()))?;
        let available = self.enqueued_count(st);
        if available == 0 {
            return Ok(None);
        }
        if (available as usize) < max_records && !max_wait.is_zero() {
            let first = Self::first_enqueued(st);
            let oldest: Option<i64> = self
                .conn
                .prepare_cached(
                    "SELECT receive_ms FROM records WHERE seq >= ?1 ORDER BY seq LIMIT 1",
                )?
                .query_row([first], |r| r.get(0))
                .optional()?;
            if let Some(ms) = oldest {
                if now_ms() - ms < max_wait.as_millis() as i64 {
                    return Ok(None);
                }
            }
        }
        let excluded = st.excluded();
        let mut records = Vec::with_capacity(max_records.min(available as usize));
        let mut claimed = Vec::new();
        let mut pos = st.cursor; // exclusive lower bound
        let mut q = self.conn.prepare_cached(
            "SELECT seq, device_id, idem_key, receive_ms, body, correlation_id FROM records WHERE seq > ?1 AND seq <= ?2 ORDER BY seq LIMIT ?3",
        )?;
        let mut ex_iter = excluded.ranges().iter().peekable();
        while records.len() < max_records && pos < head {
            // Skip excluded ranges at or below pos.
            while let Some(&&(_, b)) = ex_iter.peek() {
                if b <= pos {
                    ex_iter.next();
                } else {
                    break;
                }
            }
            let (upper, next_pos) = match ex_iter.peek() {
                Some(&&(a, b)) if a <= pos + 1 => {
                    pos = b;
                    ex_iter.next();
                    continue;
                }
                Some(&&(a, b)) => (a - 1, Some(b)),
                None => (head, None),
            };
            let want = max_records - records.len();
            let rows = q.query_map(params![pos, upper, want as i64], |r| {
                let seq: u64 = r.get(0)?;
                let body: String = r.get(4)?;
                Ok(StoredRecord {
                    seq,
                    device_id: r.get(1)?,
                    idempotency_key: r.get(2)?,
                    receive_ms: r.get(3)?,
                    correlation_id: r.get(5)?,
                    json: splice_record(seq, &body),
                })
            })?;
            let mut got = 0usize;
            let mut last = pos;
            for row in rows {
                let rec = row?;
                last = rec.seq;
                got += 1;
                records.push(rec);
            }
            if got == want {
                claimed.push((pos + 1, last));
                break;
            }
            // Everything in (pos, upper] was read: claim it whole, gaps included.
            if upper > pos {
                claimed.push((pos + 1, upper));
            }
            match next_pos {
                Some(b) => {
                    pos = b;
                    ex_iter.next();
                }
                None => break,
            }
        }
        drop(q);
        if records.is_empty() {
            return Ok(None);
        }
        let st = self.sink_mut(sink)?;
        for &(a, b) in &claimed {
            st.inflight.insert(a, b);
        }
        Ok(Some(Batch {
            sink: sink.to_string(),
            ranges: claimed,
            records,
        }))
    }

    /// Counts per sink and for the whole WAL.
    pub fn stats(&self) -> Result<WalStats, WalError> {
        let mut sinks = BTreeMap::new();
        let mut oldest_q = self
            .conn
            .prepare_cached("SELECT receive_ms FROM records WHERE seq > ?1 ORDER BY seq LIMIT 1")?;
        for (name, st) in &self.sinks {
            let mut pending_from = st.cursor;
            if let Some(&(a, b)) = st.done.ranges().first() {
                if a == st.cursor + 1 {
                    pending_from = b;
                }
            }
            let oldest = if self.head() > st.cursor {
                oldest_q
                    .query_row([pending_from], |r| r.get(0))
                    .optional()?
            } else {
                None
            };
            sinks.insert(
                name.clone(),
                SinkStats {
                    cursor: st.cursor,
                    enqueued: self.enqueued_count(st),
                    inflight: st.inflight.len(),
                    dead: st.dead_count,
                    oldest_pending_ms: oldest,
                },
            );
        }
        Ok(WalStats {
            head: self.head(),
            stored_records: self.stored_records,
            live_bytes: self.live_bytes,
            disk_free_bytes: self.disk_free,
            backpressure: self.backpressure.is_some(),
            sinks,
        })
    }

    /// Re-reads the database size and free disk space and re-evaluates
    /// backpressure.
    ///
    /// The size counted against `max_bytes` is the database pages that hold
    /// data (pages less the free list). SQLite's `-wal` journal is not: its
    /// pages are copies that checkpoints fold back in, and it is bounded on
    /// its own (`journal_size_limit`, periodic checkpoints).
    pub fn refresh_space(&mut self) -> Result<(), WalError> {
        let page_size: u64 = self.conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
        let pages: u64 = self.conn.query_row("PRAGMA page_count", [], |r| r.get(0))?;
        let free: u64 = self
            .conn
            .query_row("PRAGMA freelist_count", [], |r| r.get(0))?;
        self.live_bytes = pages.saturating_sub(free) * page_size;
        let dir = self
            .cfg
            .path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        self.disk_free = free_disk_bytes(dir);
        self.backpressure = if self.disk_free < self.cfg.min_free_disk_bytes {
            Some(format!(
                "free disk {} bytes is below wal.min_free_disk_bytes {}",
                self.disk_free, self.cfg.min_free_disk_bytes
            ))
        } else if self.live_bytes > self.cfg.max_bytes
            && self.cfg.policy == BackpressurePolicy::Block
        {
            Some(format!(
                "WAL holds {} bytes of records that a sink still needs, above wal.max_bytes {}",
                self.live_bytes, self.cfg.max_bytes
            ))
        } else {
            None
        };
        Ok(())
    }

    /// Above this size delivered records give way before their retention
    /// ends, so that a WAL at its limit with healthy sinks keeps headroom
    /// for new data: 90 % of `max_bytes`.
    fn room_mark(&self) -> u64 {
        self.cfg.max_bytes / 10 * 9
    }

    /// One step of housekeeping: compacts up to `chunk` records that every
    /// sink finished and that are past retention; above the room mark (90 %
    /// of `max_bytes`) also compacts delivered records still in retention,
    /// chunk by chunk, until the WAL is back under the mark or nothing
    /// delivered is left; under `drop_oldest` drops up to `chunk` of the
    /// oldest records while over `max_bytes`. Returns (compacted, dropped).
    pub fn compact(&mut self, now: i64, chunk: usize) -> Result<(u64, u64), WalError> {
        let keep = self.cfg.retention.max(self.cfg.dedup_window).as_millis() as i64;
        let mut compacted = self.compact_delivered(now - keep, chunk)?;
        // Room is made on the size as it is now: appends since the last
        // refresh may have crossed the mark.
        self.refresh_space()?;
        compacted += self.make_room(chunk)?;

        let mut dropped = 0;
        if self.cfg.policy == BackpressurePolicy::DropOldest && self.live_bytes > self.cfg.max_bytes
        {
            let upto: Option<u64> = self.conn.query_row(
                "SELECT MAX(seq) FROM (SELECT seq FROM records ORDER BY seq LIMIT ?1)",
                [chunk as i64],
                |r| r.get(0),
            )?;
            if let Some(upto) = upto {
                let tx = self.conn.transaction()?;
                dropped = tx.execute("DELETE FROM records WHERE seq <= ?1", [upto])? as u64;
                tx.execute("DELETE FROM dead WHERE seq <= ?1", [upto])?;
                tx.execute(
                    "INSERT INTO meta(key, value) VALUES('seq_floor', ?1) ON CONFLICT(key) DO UPDATE SET value = MAX(value, ?1)",
                    [upto],
                )?;
                for (name, st) in self.sinks.iter_mut() {
                    if st.cursor < upto {
                        st.cursor = upto;
                        st.done.remove_upto(upto);
                        st.inflight.remove_upto(upto);
                        while let Some(end) = st.done.pop_contiguous(st.cursor + 1) {
                            st.cursor = st.cursor.max(end);
                        }
                        tx.execute(
                            "UPDATE sinks SET cursor = ?2 WHERE name = ?1",
                            params![name, st.cursor],
                        )?;
                        tx.execute(
                            "DELETE FROM sink_done WHERE sink = ?1 AND last <= ?2",
                            params![name, st.cursor],
                        )?;
                        st.stored = None;
                    }
                }
                tx.commit()?;
                for (name, st) in self.sinks.iter_mut() {
                    st.dead_count = self.conn.query_row(
                        "SELECT COUNT(*) FROM dead WHERE sink = ?1",
                        [name],
                        |r| r.get(0),
                    )?;
                }
                self.stored_records = self.stored_records.saturating_sub(dropped);
                self.refresh_space()?;
            }
        }
        Ok((compacted, dropped))
    }

    /// Over the room mark, delivered records (finished by every sink, not
    /// dead) give way before their retention ends: replay history is worth
    /// less than accepting new data. Deletes them oldest first, `chunk` at a
    /// time, until the WAL is under the mark or nothing delivered is left.
    /// Returns how many it deleted.
    fn make_room(&mut self, chunk: usize) -> Result<u64, WalError> {
        let mut total = 0;
        while self.live_bytes > self.room_mark() {
            let n = self.compact_delivered(i64::MAX, chunk)?;
            if n == 0 {
                break;
            }
            total += n;
            self.refresh_space()?;
        }
        Ok(total)
    }

    /// Deletes up to `chunk` of the oldest records that every sink finished,
    /// that are not dead letters and that were received before `cutoff`
    /// (epoch ms); moves the seq floor up. Returns how many it deleted.
    fn compact_delivered(&mut self, cutoff: i64, chunk: usize) -> Result<u64, WalError> {
        let min_cursor = self
            .sinks
            .values()
            .map(|s| s.cursor)
            .min()
            .unwrap_or_else(|| self.head());
        // Find the highest seq that is both finished everywhere and old enough.
        let boundary: Option<u64> = self.conn.query_row(
            "SELECT MAX(seq) FROM (SELECT seq, receive_ms FROM records WHERE seq <= ?1 AND seq NOT IN (SELECT seq FROM dead) ORDER BY seq LIMIT ?2) WHERE receive_ms < ?3",
            params![min_cursor, chunk as i64, cutoff],
            |r| r.get(0),
        )?;
        let Some(upto) = boundary else {
            return Ok(0);
        };
        let tx = self.conn.transaction()?;
        let compacted = tx.execute(
            "DELETE FROM records WHERE seq <= ?1 AND seq NOT IN (SELECT seq FROM dead WHERE seq <= ?1)",
            [upto],
        )? as u64;
        tx.execute(
            "INSERT INTO meta(key, value) VALUES('seq_floor', ?1) ON CONFLICT(key) DO UPDATE SET value = MAX(value, ?1)",
            [upto],
        )?;
        tx.commit()?;
        self.stored_records = self.stored_records.saturating_sub(compacted);
        Ok(compacted)
    }

    /// Runs a passive checkpoint so the -wal file does not grow without bound.
    pub fn checkpoint(&mut self) -> Result<(), WalError> {
        self.conn
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))?;
        Ok(())
    }
}

/// Reads one sink's delivery state; a sink without a row starts at `head`
/// (documented in the module doc) and gets its row.
fn load_sink(conn: &Connection, name: &str, head: u64) -> Result<SinkState, WalError> {
    let cursor: Option<u64> = conn
        .query_row("SELECT cursor FROM sinks WHERE name = ?1", [name], |r| {
            r.get(0)
        })
        .optional()?;
    let mut st = SinkState::default();
    match cursor {
        Some(c) => st.cursor = c,
        None => {
            st.cursor = head;
            conn.execute(
                "INSERT INTO sinks(name, cursor) VALUES(?1, ?2)",
                params![name, head],
            )?;
        }
    }
    let mut q = conn.prepare("SELECT first, last FROM sink_done WHERE sink = ?1")?;
    let rows = q.query_map([name], |r| Ok((r.get::<_, u64>(0)?, r.get::<_, u64>(1)?)))?;
    for row in rows {
        let (a, b) = row?;
        if a <= b {
            st.done.insert(a, b);
        }
    }
    st.done.remove_upto(st.cursor);
    while let Some(end) = st.done.pop_contiguous(st.cursor + 1) {
        st.cursor = st.cursor.max(end);
    }
    st.dead_count = conn.query_row("SELECT COUNT(*) FROM dead WHERE sink = ?1", [name], |r| {
        r.get(0)
    })?;
    Ok(st)
}

/// Stores one sink's cursor and done ranges as they are in memory: only
/// what changed since the last commit when that is known, else everything.
/// The caller calls `mark_persisted` once the transaction committed.
fn persist_sink(conn: &Connection, name: &str, st: &SinkState) -> Result<(), WalError> {
    let Some((cursor, old)) = &st.stored else {
        conn.execute(
            "UPDATE sinks SET cursor = ?2 WHERE name = ?1",
            params![name, st.cursor],
        )?;
        conn.execute("DELETE FROM sink_done WHERE sink = ?1", [name])?;
        let mut ins =
            conn.prepare_cached("INSERT INTO sink_done(sink, first, last) VALUES(?1, ?2, ?3)")?;
        for &(a, b) in st.done.ranges() {
            ins.execute(params![name, a, b])?;
        }
        return Ok(());
    };
    if *cursor != st.cursor {
        conn.execute(
            "UPDATE sinks SET cursor = ?2 WHERE name = ?1",
            params![name, st.cursor],
        )?;
    }
    let (gone, added) = range_changes(old.ranges(), st.done.ranges());
    let mut del = conn.prepare_cached("DELETE FROM sink_done WHERE sink = ?1 AND first = ?2")?;
    for (a, _) in gone {
        del.execute(params![name, a])?;
    }
    let mut ins = conn
        .prepare_cached("INSERT OR REPLACE INTO sink_done(sink, first, last) VALUES(?1, ?2, ?3)")?;
    for (a, b) in added {
        ins.execute(params![name, a, b])?;
    }
    Ok(())
}

type Ranges = Vec<(u64, u64)>;

/// The ranges only in `old` and those only in `new` (both sorted), in one pass.
fn range_changes(old: &[(u64, u64)], new: &[(u64, u64)]) -> (Ranges, Ranges) {
    let (mut gone, mut added) = (Vec::new(), Vec::new());
    let (mut i, mut j) = (0, 0);
    while i < old.len() || j < new.len() {
        match (old.get(i), new.get(j)) {
            (Some(o), Some(n)) if o == n => {
                i += 1;
                j += 1;
            }
            (Some(o), Some(n)) if o.0 < n.0 || (o.0 == n.0 && o.1 != n.1) => {
                gone.push(*o);
                i += 1;
            }
            (Some(_), Some(n)) => {
                added.push(*n);
                j += 1;
            }
            (Some(o), None) => {
                gone.push(*o);
                i += 1;
            }
            (None, Some(n)) => {
                added.push(*n);
                j += 1;
            }
            (None, None) => break,
        }
    }
    (gone, added)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(key: &str) -> NewRecord {
        NewRecord {
            idempotency_key: key.into(),
            correlation_id: format!("c-{key}"),
            device_id: "dev-1".into(),
            receive_ms: now_ms(),
            body: format!("{{\"idempotency_key\":\"{key}\"}}"),
        }
    }

    #[test]
    fn range_changes_lists_what_to_delete_and_insert() {
        let old = [(1, 2), (5, 7), (9, 9)];
        let new = [(1, 2), (5, 8), (12, 13)];
        let (gone, added) = range_changes(&old, &new);
        assert_eq!(gone, [(5, 7), (9, 9)]);
        assert_eq!(added, [(5, 8), (12, 13)]);
        assert_eq!(range_changes(&new, &new), (vec![], vec![]));
    }

    #[test]
    fn splice_adds_version_and_seq() {
        assert_eq!(splice_record(7, "{\"a\":1}"), "{\"v\":1,\"seq\":7,\"a\":1}");
        assert_eq!(splice_record(7, "{}"), "{\"v\":1,\"seq\":7}");
    }

    #[test]
    fn fetch_ack_and_restart_keep_delivery_state() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = WalConfig::new(dir.path().join("wal.db"), &["a", "b"]);
        let mut wal = Wal::open(cfg.clone()).unwrap();
        let out = wal
            .append((0..10).map(|i| rec(&format!("k{i}"))).collect())
            .unwrap();
        assert_eq!(out[0], AppendOutcome::Appended { seq: 1 });
        let b1 = wal.fetch("a", 4, Duration::ZERO).unwrap().unwrap();
        assert_eq!(b1.ranges, vec![(1, 4)]);
        let b2 = wal.fetch("a", 4, Duration::ZERO).unwrap().unwrap();
        assert_eq!(b2.ranges, vec![(5, 8)]);
        wal.ack("a", &b2.ranges).unwrap();
        assert_eq!(wal.stats().unwrap().sinks["a"].cursor, 0);
        wal.ack("a", &b1.ranges).unwrap();
        assert_eq!(wal.stats().unwrap().sinks["a"].cursor, 8);
        let b3 = wal.fetch("a", 10, Duration::ZERO).unwrap().unwrap();
        assert_eq!(b3.ranges, vec![(9, 10)]);
        drop(wal);
        let mut wal = Wal::open(cfg).unwrap();
        let again = wal.fetch("a", 10, Duration::ZERO).unwrap().unwrap();
        assert_eq!(
            again.ranges,
            vec![(9, 10)],
            "InFlight goes back to Enqueued on restart"
        );
        assert_eq!(
            wal.fetch("b", 100, Duration::ZERO)
                .unwrap()
                .unwrap()
                .records
                .len(),
            10
        );
        let dup = wal.append(vec![rec("k3")]).unwrap();
        assert_eq!(
            dup[0],
            AppendOutcome::Duplicate {
                seq: 4,
                correlation_id: "c-k3".into()
            }
        );
    }

    #[test]
    fn compaction_removes_only_records_every_sink_finished_keeps_dead_letters_and_never_reuses_seqs(
    ) {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = WalConfig::new(dir.path().join("wal.db"), &["a", "b"]);
        cfg.retention = Duration::ZERO;
        cfg.dedup_window = Duration::ZERO;
        let mut wal = Wal::open(cfg.clone()).unwrap();
        wal.append((0..6).map(|i| rec(&format!("k{i}"))).collect())
            .unwrap();
        let later = now_ms() + 1000;
        // Nothing is finished for "b": nothing may go.
        wal.ack("a", &[(1, 6)]).unwrap();
        assert_eq!(wal.compact(later, 100).unwrap(), (0, 0));
        // "b" finishes 1..=4 (3 as a dead letter); 5 and 6 stay pending.
        wal.ack("b", &[(1, 2), (4, 4)]).unwrap();
        wal.dead("b", &[(3, 3)], "refused", 3).unwrap();
        assert_eq!(
            wal.compact(later, 100).unwrap(),
            (3, 0),
            "1, 2 and 4 go; dead letter 3 stays"
        );
        let stats = wal.stats().unwrap();
        assert_eq!(stats.stored_records, 3);
        assert_eq!(stats.sinks["b"].dead, 1);
        assert_eq!(stats.sinks["b"].enqueued, 2);
        wal.ack("b", &[(5, 6)]).unwrap();
        assert_eq!(wal.compact(later, 100).unwrap(), (2, 0));
        drop(wal);
        let mut wal = Wal::open(cfg).unwrap();
        assert_eq!(wal.stats().unwrap().stored_records, 1);
        // seq 6 was compacted and was the highest: the next record still gets 7.
        assert_eq!(
            wal.append(vec![rec("new")]).unwrap()[0],
            AppendOutcome::Appended { seq: 7 }
        );
    }

    /// A WAL at its size limit whose sink keeps up: delivered records (still
    /// in retention) make room, so no append is refused; a stalled sink does
    /// fill it, and then appends are refused.
    #[test]
    fn at_the_size_limit_delivered_records_make_room_and_only_pending_data_refuses_appends() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = WalConfig::new(dir.path().join("wal.db"), &["a"]);
        cfg.max_bytes = 512 << 10;
        cfg.min_free_disk_bytes = 0;
        let mut wal = Wal::open(cfg).unwrap();
        let blob = "x".repeat(1000);
        let big = |i: usize| {
            let mut r = rec(&format!("k{i}"));
            r.body = format!("{{\"idempotency_key\":\"k{i}\",\"blob\":\"{blob}\"}}");
            r
        };
        // 4 MB through a 512 KiB WAL, acked as it goes; housekeeping (as the
        // writer thread runs it) every 10 rounds.
        let mut n = 0;
        for round in 0..400 {
            let recs: Vec<_> = (0..10)
                .map(|_| {
                    n += 1;
                    big(n)
                })
                .collect();
            let out = wal.append(recs);
            assert!(
                out.is_ok(),
                "round {round}: {:?} (size {})",
                out,
                wal.live_bytes
            );
            let b = wal.fetch("a", 100, Duration::ZERO).unwrap().unwrap();
            wal.ack("a", &b.ranges).unwrap();
            if round % 10 == 0 {
                wal.compact(now_ms(), COMPACT_CHUNK).unwrap();
                wal.refresh_space().unwrap();
            }
        }
        assert!(
            wal.stats().unwrap().stored_records < 4000,
            "delivered records were compacted"
        );
        // Now the sink stops acking: pending data fills the WAL and refuses appends.
        let mut refused = None;
        for round in 0..400 {
            let recs: Vec<_> = (0..10)
                .map(|_| {
                    n += 1;
                    big(n)
                })
                .collect();
            if let Err(e) = wal.append(recs) {
                refused = Some(e);
                break;
            }
            if round % 10 == 0 {
                wal.compact(now_ms(), COMPACT_CHUNK).unwrap();
                wal.refresh_space().unwrap();
            }
        }
        assert!(
            matches!(refused, Some(WalError::Backpressure(_))),
            "pending data above max_bytes must refuse appends: {refused:?}"
        );
    }

    #[test]
    fn retention_keeps_delivered_records_until_they_are_old_enough() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = WalConfig::new(dir.path().join("wal.db"), &["a"]);
        cfg.retention = Duration::from_secs(3600);
        cfg.dedup_window = Duration::from_secs(60);
        let mut wal = Wal::open(cfg).unwrap();
        wal.append(vec![rec("x")]).unwrap();
        wal.ack("a", &[(1, 1)]).unwrap();
        assert_eq!(
            wal.compact(now_ms() + 120_000, 100).unwrap(),
            (0, 0),
            "inside retention"
        );
        assert_eq!(
            wal.compact(now_ms() + 3_700_000, 100).unwrap(),
            (1, 0),
            "past retention"
        );
    }

    #[test]
    fn drop_oldest_deletes_the_oldest_records_and_moves_every_cursor_past_them() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = WalConfig::new(dir.path().join("wal.db"), &["a", "b"]);
        cfg.policy = BackpressurePolicy::DropOldest;
        cfg.max_bytes = 1; // always over the limit
        let mut wal = Wal::open(cfg).unwrap();
        assert!(
            wal.backpressure().is_none(),
            "drop_oldest never refuses appends for size"
        );
        wal.append((0..10).map(|i| rec(&format!("k{i}"))).collect())
            .unwrap();
        wal.refresh_space().unwrap();
        let b = wal.fetch("a", 2, Duration::ZERO).unwrap().unwrap();
        assert_eq!(b.ranges, vec![(1, 2)]);
        let (_, dropped) = wal.compact(now_ms(), 4).unwrap();
        assert_eq!(dropped, 4);
        let stats = wal.stats().unwrap();
        for sink in ["a", "b"] {
            assert_eq!(stats.sinks[sink].cursor, 4, "sink {sink}");
            assert_eq!(
                stats.sinks[sink].enqueued + stats.sinks[sink].inflight,
                6,
                "sink {sink}"
            );
        }
        let next = wal.fetch("a", 100, Duration::ZERO).unwrap().unwrap();
        assert_eq!(next.first_seq(), 5);
        wal.ack("a", &b.ranges).unwrap(); // a late ack of dropped records is harmless
        assert_eq!(wal.stats().unwrap().sinks["a"].cursor, 4);
    }

    #[test]
    fn fetch_waits_for_a_full_batch_until_max_wait() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::open(WalConfig::new(dir.path().join("wal.db"), &["a"])).unwrap();
        wal.append(vec![rec("x")]).unwrap();
        assert!(wal
            .fetch("a", 10, Duration::from_secs(60))
            .unwrap()
            .is_none());
        assert!(wal
            .fetch("a", 1, Duration::from_secs(60))
            .unwrap()
            .is_some());
    }
}
