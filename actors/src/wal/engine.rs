//! The synchronous WAL engine: its types, opening and recovery. The work is
//! in rooms of its own: `append.rs` (appends, dedup and the group write),
//! `delivery.rs` (per-sink delivery state: fetch, ack, dead, release),
//! `space.rs` (size, backpressure and compaction) and `admin.rs` (operator
//! commands). See the module doc of [`crate::wal`] for the format, the
//! invariants and the recovery steps.

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasher;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use rusqlite::{Connection, OptionalExtension};

use super::error::WalError;
use super::idem::{keys_above, Sweep, IDEM_STALE};
use super::sink_state::{load_sink, SinkState};
use crate::route::{Class, RecordRoute, MAX_SINKS};

/// 2: records.class, records.sinks, sinks.bit (routes and priorities).
/// 3: the dedup index is the `idem` table, merged in bulk (was an index on
/// records.idem_key).
/// 4: a deleted record leaves its `idem` row to a sweep (no trigger).
pub(super) const SCHEMA_VERSION: i64 = 4;
/// The on-disk schema (the one copy; the module doc of [`crate::wal`] shows it).
const SCHEMA: &str = include_str!("schema.sql");

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
    /// How long a sink's acknowledgements may wait in memory before they
    /// are stored (`wal.ack_flush`). They go to disk with the first commit
    /// after this long, or in a commit of their own without an fsync (the
    /// next append's fsync covers them). A crash loses at most this long of
    /// acknowledgements: those records are delivered again (at least once).
    /// Zero stores every acknowledgement in its own commit.
    pub ack_flush: Duration,
    /// How long the first append of a group commit may wait for more
    /// appends to share its commit (`wal.commit_window`): only while appends
    /// arrive faster than this, and until the group holds 28 records. Each
    /// commit writes whole pages, so a window trades acknowledgement latency
    /// for bytes written. Zero commits as soon as the writer is free.
    pub commit_window: Duration,
    /// Time between two checkpoints ([`super::checkpoint`]; not a key:
    /// [`WalConfig::CHECKPOINT_EVERY`], shorter in tests).
    pub checkpoint_every: Duration,
}

impl WalConfig {
    /// Time between two checkpoints: the pages they copy into the database
    /// file again are those changed since the last one (the b-tree's inner
    /// and last pages, the sinks' state), so rarer ones write less; the
    /// `-wal` file holds what is committed in between (~3 MB at 1k
    /// records/s).
    pub const CHECKPOINT_EVERY: Duration = Duration::from_secs(10);

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
            ack_flush: Duration::ZERO,
            commit_window: Duration::ZERO,
            checkpoint_every: Self::CHECKPOINT_EVERY,
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
    /// Its class and sink set, decided once (DESIGN §6a).
    pub route: RecordRoute,
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
    /// Its priority class.
    pub class: Class,
    /// The full canonical record JSON (one line, no newline).
    pub json: String,
}

/// A batch of records InFlight for one sink.
#[derive(Debug, Clone, PartialEq, Default)]
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

/// What [`Wal::fetch_or_wait`] found for a sink.
#[derive(Debug, Clone, PartialEq)]
pub enum Fetched {
    /// A batch, now InFlight.
    Batch(Batch),
    /// Nothing to send.
    Nothing,
    /// A partial batch whose oldest record is younger than `max_wait`:
    /// ask again after `after`, or once `missing` more records were
    /// appended (the batch may be full then).
    Wait {
        /// Until the oldest record has waited `max_wait`.
        after: std::time::Duration,
        /// Records short of a full batch.
        missing: u64,
    },
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
        /// The sink's reduction state rows this batch changed (device →
        /// JSON, `None`: delete), stored with the ack ([`crate::reduce`]).
        reduce: Vec<(String, Option<String>)>,
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
    /// Estimated WAL bytes of the Enqueued and InFlight records
    /// ([`WalStats::estimate_bytes`]).
    pub pending_bytes: u64,
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

impl WalStats {
    /// Estimated WAL bytes of `records` records: the mean stored size per
    /// record (pages include indexes and free space in use) times `records`.
    /// It costs nothing to compute. Summing the records' sizes would cost a
    /// scan of the backlog on the writer thread: with 1.3M records, seconds
    /// per sink, for every `GET /admin/wal` (found by the chaos soak).
    pub fn estimate_bytes(live_bytes: u64, stored_records: u64, records: u64) -> u64 {
        records.saturating_mul(live_bytes / stored_records.max(1))
    }
}

/// The WAL engine: one SQLite connection plus the in-memory delivery state.
pub struct Wal {
    /// The one writing connection, owned by the writer thread (readers
    /// have a pool of their own).
    pub(super) conn: Connection,
    /// Path, limits and timings it was opened with.
    pub(super) cfg: WalConfig,
    /// Each sink's delivery state, in memory and ahead of the stored one
    /// by at most `ack_flush` (fetches and acks never touch the disk).
    pub(super) sinks: BTreeMap<String, SinkState>,
    /// The seq the next appended record gets.
    pub(super) next_seq: u64,
    /// Records in the `records` table, kept so that stats and the per-record
    /// size estimate ([`WalStats::estimate_bytes`]) need no COUNT.
    pub(super) stored_records: u64,
    /// Why appends are refused now (size or disk limit), if they are.
    pub(super) backpressure: Option<String>,
    /// Bytes of the database's pages in use (free pages not counted), as of
    /// the last space check: what `wal.max_bytes` is held against.
    pub(super) live_bytes: u64,
    /// Free bytes on the data disk, as of the last space check.
    pub(super) disk_free: u64,
    /// Hash of an idempotency key (`key_hasher`) -> latest seq of the
    /// records above `idem_upto`: the dedup keys not merged into the `idem`
    /// table yet. A hit is checked against the record's key; two keys of one
    /// hash (a chance of ~1e-10 in a merge's worth) only cost a dedup miss.
    pub(super) recent_keys: HashMap<u64, u64>,
    /// The random hasher of `recent_keys`' keys.
    pub(super) key_hasher: RandomState,
    /// The `idem` table holds the keys of every record up to this seq.
    pub(super) idem_upto: u64,
    /// Records deleted since the last sweep of `idem` started, whose rows
    /// may still be there (`meta.idem_stale`).
    pub(super) idem_stale: u64,
    /// The sweep of `idem` under way, if one is.
    pub(super) idem_sweep: Option<Sweep>,
    /// When records were last appended (an idle writer merges its keys).
    pub(super) last_append: Instant,
    /// Since when some sink's delivery state in memory is ahead of the
    /// stored one (`None`: all stored); see [`WalConfig::ack_flush`].
    pub(super) unstored_since: Option<Instant>,
}

/// The page size of a new WAL database. A commit writes each page it
/// changed whole, as a frame of the page plus 24 bytes, and the filesystem
/// writes whole 4 KiB blocks at each fsync. A record row is ~330 bytes:
/// 4 KiB pages (SQLite's default) make every commit rewrite big partly
/// filled pages; 1 KiB pages hold only two rows (a third page is wasted
/// on each); 2 KiB pages hold five or six. Written by the WAL writer per
/// record at 40 / 1k records/s (issue 31, same build, same run): 1 KiB
/// 4.7 / 1.47 KB, 2 KiB 4.6 / 1.31 KB, and the database file 17 vs 13 MB
/// for 32k records (4 KiB pages wrote ~25 % more than 1 KiB ones).
const PAGE_SIZE: i64 = 2048;

/// Epoch milliseconds now.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl Wal {
    /// Opens (creating if needed) the WAL and recovers its state.
    pub fn open(cfg: WalConfig) -> Result<Self, WalError> {
        if let Some(dir) = cfg.path.parent() {
            if !dir.as_os_str().is_empty() {
                crate::durable::create_dir_all(dir).map_err(|source| WalError::Dir {
                    path: dir.to_path_buf(),
                    source,
                })?;
            }
        }
        let conn = Connection::open(&cfg.path)?;
        conn.busy_timeout(Duration::from_secs(5))?;
        // A new WAL gets small pages (an existing one keeps its own size).
        let pages: i64 = conn.query_row("PRAGMA page_count", [], |r| r.get(0))?;
        if pages == 0 {
            conn.pragma_update(None, "page_size", PAGE_SIZE)?;
        }
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        // Keep the -wal file bounded after checkpoints.
        conn.pragma_update(None, "journal_size_limit", 64i64 << 20)?;
        migrate(&conn)?;
        conn.execute_batch(SCHEMA)?;
        move_dedup_index(&conn)?;
        conn.execute(
            "INSERT OR REPLACE INTO meta(key, value) VALUES('schema_version', ?1)",
            [SCHEMA_VERSION],
        )?;
        if cfg.sinks.len() > MAX_SINKS {
            return Err(WalError::Invalid(format!(
                "at most {MAX_SINKS} sinks, {} configured",
                cfg.sinks.len()
            )));
        }

        let max_seq: u64 =
            conn.query_row("SELECT COALESCE(MAX(seq), 0) FROM records", [], |r| {
                r.get(0)
            })?;
        let floor = read_meta(&conn, "seq_floor")?;
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
        assign_bits(&conn, &cfg.sinks, &mut sinks)?;
        let idem_upto = read_meta(&conn, "idem_upto")?;
        let idem_stale = read_meta(&conn, IDEM_STALE)?;
        let key_hasher = RandomState::new();
        let mut recent_keys = HashMap::new();
        keys_above(&conn, idem_upto, |key, seq| {
            recent_keys.insert(key_hasher.hash_one(key), seq);
        })?;

        let mut wal = Self {
            conn,
            cfg,
            sinks,
            next_seq: head + 1,
            stored_records,
            backpressure: None,
            live_bytes: 0,
            disk_free: u64::MAX,
            recent_keys,
            key_hasher,
            idem_upto,
            idem_stale,
            idem_sweep: None,
            last_append: Instant::now(),
            unstored_since: None,
        };
        wal.refresh_space()?;
        Ok(wal)
    }

    /// Rows inserted, updated or deleted on the writer's connection since it
    /// opened: a commit that changed none wrote nothing (acks held in memory).
    pub fn total_changes(&self) -> u64 {
        self.conn.total_changes()
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

    /// Each configured sink's bit in a record's sink set ([`RecordRoute::sinks`]).
    pub fn sink_bits(&self) -> BTreeMap<String, u64> {
        self.sinks
            .iter()
            .map(|(n, st)| (n.clone(), 1u64 << st.bit))
            .collect()
    }

    pub(super) fn sink_mut(&mut self, sink: &str) -> Result<&mut SinkState, WalError> {
        self.sinks
            .get_mut(sink)
            .ok_or_else(|| WalError::UnknownSink(sink.to_string()))
    }
}

/// A `meta` value (0 if unset).
pub(super) fn read_meta(conn: &Connection, key: &str) -> Result<u64, WalError> {
    Ok(conn
        .prepare_cached("SELECT value FROM meta WHERE key = ?1")?
        .query_row([key], |r| r.get(0))
        .optional()?
        .unwrap_or(0))
}

/// Sets a `meta` value.
pub(super) fn write_meta(conn: &Connection, key: &str, value: u64) -> Result<(), WalError> {
    conn.prepare_cached(
        "INSERT INTO meta(key, value) VALUES(?1, ?2) ON CONFLICT(key) DO UPDATE SET value = ?2",
    )?
    .execute(rusqlite::params![key, value])?;
    Ok(())
}

/// Brings a database of an earlier schema up to this one (adds the routing
/// columns; old records are `normal` and go to every sink, as before).
fn migrate(conn: &Connection) -> Result<(), WalError> {
    let columns = |table: &str| -> Result<Vec<String>, WalError> {
        let mut q = conn.prepare("SELECT name FROM pragma_table_info(?1)")?;
        let names = q
            .query_map([table], |r| r.get::<_, String>(0))?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(names)
    };
    let records = columns("records")?;
    if !records.is_empty() && !records.iter().any(|c| c == "class") {
        conn.execute_batch(
            "ALTER TABLE records ADD COLUMN class INTEGER NOT NULL DEFAULT 1;
             ALTER TABLE records ADD COLUMN sinks INTEGER;",
        )?;
    }
    let sinks = columns("sinks")?;
    if !sinks.is_empty() && !sinks.iter().any(|c| c == "bit") {
        conn.execute_batch("ALTER TABLE sinks ADD COLUMN bit INTEGER;")?;
    }
    Ok(())
}

/// Schema 3: moves the dedup index from an index on `records.idem_key` to
/// the `idem` table (see `schema.sql`). Runs while that index exists: also
/// after a binary of schema 2 opened the WAL and re-created it.
fn move_dedup_index(conn: &Connection) -> Result<(), WalError> {
    let old: Option<String> = conn
        .query_row(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND name = 'records_idem'",
            [],
            |r| r.get(0),
        )
        .optional()?;
    if old.is_none() {
        return Ok(());
    }
    let started = Instant::now();
    // Dropped unless committed: nothing half-moved.
    let tx = conn.unchecked_transaction()?;
    tx.execute_batch(
        "INSERT OR REPLACE INTO idem(key, seq) SELECT idem_key, seq FROM records ORDER BY seq;
         INSERT INTO meta(key, value) VALUES('idem_upto', (SELECT COALESCE(MAX(seq), 0) FROM records))
             ON CONFLICT(key) DO UPDATE SET value = excluded.value;
         DROP INDEX records_idem;",
    )?;
    tx.commit()?;
    tracing::info!(
        took_ms = started.elapsed().as_millis() as u64,
        "WAL dedup index moved to the idem table (schema 3)"
    );
    Ok(())
}

/// Gives every configured sink without a bit the lowest free one. A bit held
/// by a sink no longer configured is taken back only when no other is free
/// (that sink's row goes: if it comes back, it starts at the head, so the
/// records it would have misread are never its).
fn assign_bits(
    conn: &Connection,
    names: &[String],
    sinks: &mut BTreeMap<String, SinkState>,
) -> Result<(), WalError> {
    let mut held: BTreeMap<u32, String> = BTreeMap::new();
    {
        let mut q = conn.prepare("SELECT name, bit FROM sinks WHERE bit IS NOT NULL")?;
        for row in q.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, u32>(1)?)))? {
            let (name, bit) = row?;
            held.insert(bit, name);
        }
    }
    for name in names {
        if let Some((&bit, _)) = held.iter().find(|(_, n)| *n == name) {
            sinks.get_mut(name).expect("loaded").bit = bit;
            continue;
        }
        let free = (0..MAX_SINKS as u32).find(|b| !held.contains_key(b));
        let bit = match free {
            Some(b) => b,
            None => {
                let (&b, stale) = held
                    .iter()
                    .find(|(_, n)| !names.contains(n))
                    .ok_or_else(|| WalError::Invalid(format!("at most {MAX_SINKS} sinks")))?;
                conn.execute("DELETE FROM sinks WHERE name = ?1", [stale])?;
                conn.execute("DELETE FROM sink_done WHERE sink = ?1", [stale])?;
                conn.execute("DELETE FROM sink_reduce WHERE sink = ?1", [stale])?;
                b
            }
        };
        conn.execute(
            "UPDATE sinks SET bit = ?2 WHERE name = ?1",
            rusqlite::params![name, bit],
        )?;
        held.insert(bit, name.clone());
        sinks.get_mut(name).expect("loaded").bit = bit;
    }
    Ok(())
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
        route: RecordRoute::default(),
    }
}

/// A WAL in `dir` with one sink, `a` (tests of every room).
#[cfg(test)]
pub(super) fn test_wal(dir: &tempfile::TempDir) -> Wal {
    Wal::open(WalConfig::new(dir.path().join("wal.db"), &["a"])).expect("open")
}

/// Appends [`test_record`]`(key)` alone: its outcome (tests of every room).
#[cfg(test)]
pub(super) fn test_append(wal: &mut Wal, key: &str) -> AppendOutcome {
    wal.append(vec![test_record(key)])
        .expect("append")
        .remove(0)
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
