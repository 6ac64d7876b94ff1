//! The writer thread's queue: the requests it takes ([`Request`], with
//! [`Fetch`] and [`Release`]) and [`WalHealth`], which holds the current
//! thread's end of the queue beside the WAL's health flags. A room of its
//! own so that the thread ([`super::writer`]), its supervisor
//! ([`super::store`]) and the callers' handle ([`super::handle`]) each
//! depend on it and none on another's caller.

use std::sync::atomic::AtomicBool;
use std::sync::{mpsc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::engine::{Fetched, Wal, WalStats, WriteOp, WriteResult};
use super::error::WalError;

/// A request to the writer thread.
pub(super) enum Request {
    Write(
        WriteOp,
        Instant,
        oneshot::Sender<Result<WriteResult, WalError>>,
    ),
    Fetch(Fetch, oneshot::Sender<Result<Fetched, WalError>>),
    Release(Release, oneshot::Sender<Result<(), WalError>>),
    ReleaseSink(String, oneshot::Sender<Result<(), WalError>>),
    Stats(oneshot::Sender<Result<WalStats, WalError>>),
    Exec(Box<dyn FnOnce(&mut Wal) + Send>),
    #[cfg(feature = "fault-injection")]
    Panic,
}

/// What a fetch asks for (see [`WalWriter::fetch`]).
#[derive(Debug)]
pub(super) struct Fetch {
    pub(super) sink: String,
    pub(super) max_records: usize,
    pub(super) max_wait: Duration,
}

/// What a release puts back (see [`WalWriter::release`]).
#[derive(Debug)]
pub(super) struct Release {
    pub(super) sink: String,
    pub(super) ranges: Vec<(u64, u64)>,
}

/// Health of the WAL, shared with `/readyz`.
#[derive(Debug, Default)]
pub struct WalHealth {
    /// The writer thread is running.
    pub alive: AtomicBool,
    /// The last commit that appended records succeeded (no commit has failed since).
    pub writable: AtomicBool,
    /// Appends are being refused.
    pub backpressure: AtomicBool,
    /// Last storage error or backpressure reason, for `/readyz`.
    pub last_problem: Mutex<Option<String>>,
    /// The head seq after each commit that appended: idle dispatchers wait
    /// on it instead of polling ([`super::WalWriter::watch_appends`]).
    pub appended: tokio::sync::watch::Sender<u64>,
    /// The current writer thread's queue; `None` while the writer restarts.
    pub(super) writer: RwLock<Option<Queue>>,
}

/// The current writer thread's end of the queue, and the thread.
#[derive(Clone, Debug)]
pub(super) struct Queue {
    pub(super) tx: mpsc::Sender<Request>,
    /// Unparked after each request that must not wait while a group commit
    /// waits out its window ([`Request::wakes_writer`]): the writer sleeps
    /// through the window instead of waking for every append.
    pub(super) thread: Option<std::thread::Thread>,
}

impl Request {
    /// Whether the writer should wake for it while a group waits for more
    /// appends: everything but an append (which only joins the group).
    pub(super) fn wakes_writer(&self) -> bool {
        !matches!(self, Request::Write(WriteOp::Append(_), ..))
    }
}

impl WalHealth {
    pub(super) fn set_problem(&self, p: Option<String>) {
        if let Ok(mut g) = self.last_problem.lock() {
            *g = p;
        }
    }

    /// Queues the request `make` builds to the current writer thread:
    /// `None` while the writer restarts (`make` is not called), `Some(false)`
    /// if the thread is gone.
    pub(super) fn send(&self, make: impl FnOnce() -> Request) -> Option<bool> {
        match self.writer.read() {
            Ok(g) => g.as_ref().map(|q| {
                let r = make();
                let wake = r.wakes_writer();
                let sent = q.tx.send(r).is_ok();
                if let (true, Some(t)) = (wake, &q.thread) {
                    t.unpark();
                }
                sent
            }),
            Err(_) => Some(false),
        }
    }
}
