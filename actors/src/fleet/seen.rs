//! The request ids of accepted fleet commands, kept on disk until their
//! window has passed: a command is never run twice, across restarts too.
//!
//! A small SQLite database of its own (`{data_dir}/fleet.db`), apart from
//! the WAL: one row per accepted command, `(request_id, expires_ms)`, where
//! `expires_ms = issued_at + WINDOW`. After that instant the envelope is
//! refused as expired anyway, so the row can go. Each insert commits with
//! SQLite's default rollback journal and `synchronous = FULL`: when a
//! command runs, its id is already on disk, and a kill -9 right after it
//! cannot make a replay pass.

use std::path::Path;

use rusqlite::{params, Connection};

/// The accepted request ids.
pub struct SeenIds {
    conn: Connection,
}

impl SeenIds {
    /// Opens (creating) `{dir}/fleet.db`.
    pub fn open(dir: &Path) -> Result<Self, String> {
        let path = dir.join("fleet.db");
        let conn =
            Connection::open(&path).map_err(|e| format!("opening {}: {e}", path.display()))?;
        conn.execute_batch(
            "PRAGMA synchronous = FULL;
             CREATE TABLE IF NOT EXISTS seen_requests (
                 request_id TEXT PRIMARY KEY,
                 expires_ms INTEGER NOT NULL
             ) WITHOUT ROWID;",
        )
        .map_err(|e| format!("preparing {}: {e}", path.display()))?;
        Ok(Self { conn })
    }

    /// Records `request_id` until `expires_ms`; false when it was already
    /// recorded (a replay). Forgets the ids whose window has passed.
    pub fn admit(&self, request_id: &str, expires_ms: i64, now_ms: i64) -> Result<bool, String> {
        let db = |e: rusqlite::Error| format!("fleet.db: {e}");
        self.conn
            .execute(
                "DELETE FROM seen_requests WHERE expires_ms < ?1",
                params![now_ms],
            )
            .map_err(db)?;
        let inserted = self
            .conn
            .execute(
                "INSERT OR IGNORE INTO seen_requests (request_id, expires_ms) VALUES (?1, ?2)",
                params![request_id, expires_ms],
            )
            .map_err(db)?;
        Ok(inserted == 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_is_admitted_once_also_after_reopening_and_forgotten_after_its_window() {
        let dir = tempfile::tempdir().unwrap();
        let seen = SeenIds::open(dir.path()).unwrap();
        assert!(seen.admit("r1", 1_000, 0).unwrap());
        assert!(!seen.admit("r1", 1_000, 10).unwrap());
        drop(seen);
        let seen = SeenIds::open(dir.path()).unwrap();
        assert!(!seen.admit("r1", 1_000, 500).unwrap());
        assert!(seen.admit("r1", 3_000, 1_001).unwrap(), "window passed");
    }
}
