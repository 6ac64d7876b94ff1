//! The checkpointer: copies the pages committed to the `-wal` file into the
//! database file from a connection of its own thread, so that a group
//! commit never waits for it.
//!
//! SQLite's automatic checkpoint runs inside the commit that takes the
//! `-wal` file past 1,000 pages: at 1k records/s every few seconds one group
//! commit (and every device waiting for it) also waited for megabytes copied
//! and the database file's fsync. The writer's connection moves that to
//! 4,096 pages, which only a burst reaches
//! ([`super::Wal::defer_auto_checkpoint`]), and this thread runs a passive
//! checkpoint every `checkpoint_every` ([`super::WalConfig::CHECKPOINT_EVERY`])
//! instead; a passive checkpoint takes no lock that the writer or a reader
//! waits for.
//!
//! A passive checkpoint cannot copy what is committed while it runs, and
//! SQLite starts the `-wal` file again at its beginning only when a write
//! transaction begins after one copied everything: under steady appends
//! that never happens by itself, and the file would grow without bound. So
//! after each pass the writer finishes it between two of its commits
//! ([`Request::Exec`]): only the pages committed during the pass are left
//! to copy, and its next commit starts the file again.
//!
//! Ends with the writer (when its [`Checkpointer`] is dropped). A failing
//! checkpoint (a full disk, say) is logged and tried again next time;
//! nothing is lost by it (the pages stay in the `-wal` file).

use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use rusqlite::OpenFlags;

use super::queue::{Request, WalHealth};
use crate::repeats::{self, Kind};

/// The running checkpointer thread; it stops when this is dropped.
pub(super) struct Checkpointer {
    _stop: mpsc::Sender<()>,
}

impl Checkpointer {
    /// Starts the thread for the WAL at `path`, checkpointing `every`, whose
    /// writer's queue `health` holds. `None` if the thread could not be
    /// spawned (logged: the `-wal` file then grows until the writer's
    /// connection closes).
    pub(super) fn spawn(path: PathBuf, every: Duration, health: Arc<WalHealth>) -> Option<Self> {
        let (stop, stopped) = mpsc::channel::<()>();
        let spawned = std::thread::Builder::new()
            .name("wal-checkpoint".into())
            .spawn(move || {
                while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(every) {
                    // A connection for each pass: between passes it holds
                    // no memory (an idle gateway's RSS).
                    match open(&path).and_then(|c| passive(&c)) {
                        Ok(false) => {}
                        Ok(true) => finish_on_writer(&health),
                        Err(e) => failed(&e),
                    }
                }
            });
        match spawned {
            Ok(_) => Some(Self { _stop: stop }),
            Err(e) => {
                tracing::warn!(error = %e, "cannot spawn the WAL checkpoint thread; the -wal file is copied back only when the WAL closes");
                None
            }
        }
    }
}

/// A connection of its own (it writes the database file: not query-only),
/// with a small page cache (a checkpoint copies through its own buffer).
fn open(path: &Path) -> rusqlite::Result<rusqlite::Connection> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let c = rusqlite::Connection::open_with_flags(path, flags)?;
    c.busy_timeout(Duration::from_secs(5))?;
    c.pragma_update(None, "cache_size", 16)?;
    // Never checkpoints on its own either (it commits nothing anyway).
    c.pragma_update(None, "wal_autocheckpoint", 0)?;
    Ok(c)
}

/// One passive checkpoint; whether the `-wal` file holds frames (those
/// committed while it ran are not copied yet, and the count it reports
/// does not include them).
fn passive(c: &rusqlite::Connection) -> rusqlite::Result<bool> {
    c.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
        let log: i64 = r.get(1)?;
        Ok(log > 0)
    })
}

/// The writer copies what was committed during the pass, between two of
/// its commits.
fn finish_on_writer(health: &WalHealth) {
    health.send(|| {
        Request::Exec(Box::new(|wal| {
            if let Err(e) = wal.checkpoint() {
                failed(&e);
            }
        }))
    });
}

fn failed(e: &dyn std::fmt::Display) {
    if repeats::admit(Kind::WalCommit, "checkpoint") {
        tracing::warn!(error = %e, "WAL checkpoint failed; the pages stay in the -wal file");
    }
}
