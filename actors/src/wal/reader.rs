//! `WalReader`: a small pool of read-only SQLite connections to the WAL
//! database, for the admin API and the CLI.
//!
//! SQLite in WAL journal mode lets readers run beside the writer: a reader
//! sees the last committed state and never blocks a group commit, so listing
//! or exporting a million dead letters does not stall ingest. The
//! connections are `query_only`: nothing written through them.

use std::path::Path;
use std::time::Duration;

use r2d2_sqlite::SqliteConnectionManager;
use rusqlite::OpenFlags;

use super::dlq::{count_dead, for_each_dead, list_dead, DeadLetter, DlqFilter};

/// How a connection that only reads the WAL opens it: read-write flags, so
/// SQLite may use the `-shm` file, and then [`make_query_only`].
pub(super) const QUERY_ONLY_FLAGS: OpenFlags =
    OpenFlags::SQLITE_OPEN_READ_WRITE.union(OpenFlags::SQLITE_OPEN_NO_MUTEX);

/// Makes `c` refuse writes (`query_only`) and wait out the writer's locks.
pub(super) fn make_query_only(c: &rusqlite::Connection) -> rusqlite::Result<()> {
    c.busy_timeout(Duration::from_secs(5))?;
    c.pragma_update(None, "query_only", true)
}
use super::error::WalError;

/// A pool of read-only connections.
#[derive(Clone)]
pub struct WalReader {
    pool: r2d2::Pool<SqliteConnectionManager>,
}

impl WalReader {
    /// Opens up to `size` read-only connections to the database at `path`
    /// (which must exist).
    pub fn open(path: &Path, size: u32) -> Result<Self, WalError> {
        if !path.exists() {
            return Err(WalError::Unavailable(format!(
                "no WAL database at {}",
                path.display()
            )));
        }
        let manager = SqliteConnectionManager::file(path)
            .with_flags(QUERY_ONLY_FLAGS)
            .with_init(|c| make_query_only(c));
        let pool = r2d2::Pool::builder()
            .max_size(size.max(1))
            .min_idle(Some(0))
            .connection_timeout(Duration::from_secs(10))
            .build(manager)
            .map_err(|e| WalError::Unavailable(format!("WAL read pool: {e}")))?;
        Ok(Self { pool })
    }

    fn conn(&self) -> Result<r2d2::PooledConnection<SqliteConnectionManager>, WalError> {
        self.pool
            .get()
            .map_err(|e| WalError::Unavailable(format!("WAL read pool: {e}")))
    }

    /// See [`count_dead`].
    pub fn count_dead(&self, f: &DlqFilter) -> Result<u64, WalError> {
        count_dead(&*self.conn()?, f)
    }

    /// See [`list_dead`].
    pub fn list_dead(&self, f: &DlqFilter) -> Result<Vec<DeadLetter>, WalError> {
        list_dead(&*self.conn()?, f)
    }

    /// Writes every dead letter matching `f` to `out` as NDJSON (one
    /// [`DeadLetter`] per line), calling `progress` with the count written so
    /// far after each line; returns the count. What the admin export and
    /// `gateway dlq export` both stream.
    pub fn export_ndjson(
        &self,
        f: &DlqFilter,
        out: &mut impl std::io::Write,
        mut progress: impl FnMut(u64),
    ) -> Result<u64, WalError> {
        let io = |e: std::io::Error| WalError::Unavailable(format!("writing the export: {e}"));
        let mut n = 0u64;
        self.for_each_dead::<WalError>(f, |d| {
            serde_json::to_writer(&mut *out, &d).map_err(|e| io(e.into()))?;
            out.write_all(b"\n").map_err(io)?;
            n += 1;
            progress(n);
            Ok(())
        })?;
        out.flush().map_err(io)?;
        Ok(n)
    }

    /// See [`for_each_dead`].
    pub fn for_each_dead<E: From<WalError>>(
        &self,
        f: &DlqFilter,
        each: impl FnMut(DeadLetter) -> Result<(), E>,
    ) -> Result<(), E> {
        let conn = self.conn()?;
        for_each_dead(&conn, f, each)
    }
}
