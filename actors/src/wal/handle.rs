//! `WalWriter`: the one handle to the WAL's writer thread.
//!
//! Every caller (the ingest, the dispatchers, the operator, the growth
//! sampler, start-up and the CLI) queues its request straight to the
//! writer thread ([`super::writer`]) from its own thread and awaits the
//! answer: no actor mailbox is a stop on the way. The handle holds the
//! [`WalHealth`] (which keeps the current writer's queue) and the
//! [`WalStore`]'s address, used only to report a writer that is gone so
//! its supervisor restarts it (a strong address: the store, and so its
//! writer, lives while a handle does; [`WeakWalWriter`] does not keep it).
//!
//! Handles: nothing (not an actor). Sends: `WriterDied` to `WalStore`.
//!
//! Errors: a request made while the writer restarts (between a restart and
//! the end of its backoff) or lost with a dying writer gets
//! [`WalError::Unavailable`]; nothing it asked for was acknowledged.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::{Addr, WeakAddr};
use tokio::sync::oneshot;

use crate::growth::{Sample, SAMPLE_EVERY};

use super::engine::{AppendOutcome, Fetched, NewRecord, Wal, WalStats, WriteOp, WriteResult};
use super::error::WalError;
use super::queue::{Fetch, Release, Request, WalHealth};
use super::store::{WalStore, WriterDied};

/// A cloneable handle to the WAL's writer thread. Build it with
/// [`WalWriter::new`] from the started [`WalStore`] and its health.
#[derive(Clone)]
pub struct WalWriter {
    health: Arc<WalHealth>,
    store: Addr<WalStore>,
}

/// A [`WalWriter`] that does not keep the [`WalStore`] alive.
#[derive(Clone)]
pub struct WeakWalWriter {
    health: Arc<WalHealth>,
    store: WeakAddr<WalStore>,
}

impl WeakWalWriter {
    /// Samples the WAL every [`SAMPLE_EVERY`] and hands each sample to
    /// `observe` (the gateway's: [`crate::growth::WalGrowth::observe`] of
    /// its metrics), on the current arbiter, until the WAL actor is gone.
    pub fn sample_growth(self, observe: impl Fn(Sample) + 'static) {
        let wal = self;
        actix_rt::spawn(async move {
            loop {
                let Some(writer) = wal.upgrade() else { return };
                let read = writer.with(|w| {
                    let stats = w.stats()?;
                    let cfg = w.config();
                    Ok((stats, cfg.max_bytes, cfg.min_free_disk_bytes))
                });
                match read.await {
                    Ok((stats, max_bytes, min_free_disk)) => observe(Sample {
                        at: Instant::now(),
                        live_bytes: stats.live_bytes,
                        disk_free: stats.disk_free_bytes,
                        max_bytes,
                        min_free_disk,
                    }),
                    Err(e) => tracing::debug!(error = %e, "WAL growth sample failed"),
                }
                // Not kept across the sleep: the sampler does not keep the WAL alive.
                drop(writer);
                actix_rt::time::sleep(SAMPLE_EVERY).await;
            }
        });
    }

    /// The handle, while the store lives.
    pub fn upgrade(&self) -> Option<WalWriter> {
        Some(WalWriter {
            health: self.health.clone(),
            store: self.store.upgrade()?,
        })
    }
}

impl WalWriter {
    /// The handle of the started `store`, which shares `health`.
    pub fn new(store: Addr<WalStore>, health: Arc<WalHealth>) -> Self {
        Self { health, store }
    }

    /// A handle that does not keep the store alive.
    pub fn downgrade(&self) -> WeakWalWriter {
        WeakWalWriter {
            health: self.health.clone(),
            store: self.store.downgrade(),
        }
    }

    /// The WAL's health, shared with `/readyz`.
    pub fn health(&self) -> &Arc<WalHealth> {
        &self.health
    }

    /// The supervising actor (its test hooks).
    pub fn store(&self) -> &Addr<WalStore> {
        &self.store
    }

    /// Appends `records` durably, all or nothing: answered after the group
    /// commit that holds them.
    pub fn append(
        &self,
        records: Vec<NewRecord>,
    ) -> impl Future<Output = Result<Vec<AppendOutcome>, WalError>> + 'static {
        let done = self.to_writer(move |reply| {
            Request::Write(WriteOp::Append(records), Instant::now(), reply)
        });
        async move {
            Ok(match done.await? {
                WriteResult::Appended(o) => o,
                WriteResult::Done => Vec::new(),
            })
        }
    }

    /// Takes the next batch for `sink`, at most `max_records`, and marks it
    /// InFlight; a partial batch may wait `max_wait` (see [`Wal::fetch`]).
    pub fn fetch(
        &self,
        sink: String,
        max_records: usize,
        max_wait: Duration,
    ) -> impl Future<Output = Result<Fetched, WalError>> + 'static {
        self.to_writer(move |tx| {
            Request::Fetch(
                Fetch {
                    sink,
                    max_records,
                    max_wait,
                },
                tx,
            )
        })
    }

    /// Marks a batch (its `ranges`) delivered for `sink`, storing with the
    /// ack the sink's reduction state rows it changed (see [`WriteOp::Ack`]).
    pub fn ack(
        &self,
        sink: String,
        ranges: Vec<(u64, u64)>,
        reduce: Vec<(String, Option<String>)>,
    ) -> impl Future<Output = Result<(), WalError>> + 'static {
        let op = WriteOp::Ack {
            sink,
            ranges,
            reduce,
        };
        self.write(op)
    }

    /// Dead-letters a batch (its `ranges`) for `sink` after `attempts`,
    /// with the last `error`.
    pub fn dead(
        &self,
        sink: String,
        ranges: Vec<(u64, u64)>,
        error: String,
        attempts: u32,
    ) -> impl Future<Output = Result<(), WalError>> + 'static {
        let op = WriteOp::Dead {
            sink,
            ranges,
            error,
            attempts,
        };
        self.write(op)
    }

    /// Puts an InFlight batch (its `ranges`) of `sink` back to Enqueued (it
    /// will be fetched again).
    pub fn release(
        &self,
        sink: String,
        ranges: Vec<(u64, u64)>,
    ) -> impl Future<Output = Result<(), WalError>> + 'static {
        self.to_writer(move |tx| Request::Release(Release { sink, ranges }, tx))
    }

    /// Puts everything InFlight for `sink` back to Enqueued (its dispatcher
    /// restarted).
    pub fn release_sink(
        &self,
        sink: String,
    ) -> impl Future<Output = Result<(), WalError>> + 'static {
        self.to_writer(move |tx| Request::ReleaseSink(sink, tx))
    }

    /// Reads the WAL's counts per sink.
    pub fn stats(&self) -> impl Future<Output = Result<WalStats, WalError>> + 'static {
        self.to_writer(Request::Stats)
    }

    /// Runs `f` (an operator action: [`Wal::requeue`], [`Wal::check`], …)
    /// on the writer thread, between group commits, so it sees and updates
    /// the same in-memory delivery state the dispatchers use.
    pub fn with<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Wal) -> Result<R, WalError> + Send + 'static,
    ) -> impl Future<Output = Result<R, WalError>> + 'static {
        self.to_writer(move |tx| {
            Request::Exec(Box::new(move |wal: &mut Wal| {
                let _ = tx.send(f(wal));
            }))
        })
    }

    /// A receiver that changes after every commit that appended records
    /// (to the head seq): idle dispatchers wait on it instead of polling.
    pub fn watch_appends(&self) -> tokio::sync::watch::Receiver<u64> {
        self.health.appended.subscribe()
    }

    fn write(&self, op: WriteOp) -> impl Future<Output = Result<(), WalError>> + 'static {
        let done = self.to_writer(move |tx| Request::Write(op, Instant::now(), tx));
        async move { done.await.map(|_| ()) }
    }

    /// Queues the request `make` builds to the current writer thread (at
    /// once, in call order) and awaits its answer. A writer that is gone
    /// (the queue closed, or the answer dropped) is reported to the store,
    /// whose supervisor restarts it.
    fn to_writer<T: Send + 'static>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, WalError>>) -> Request,
    ) -> impl Future<Output = Result<T, WalError>> + 'static {
        let (reply, rx) = oneshot::channel();
        let queued = self.health.send(|| make(reply));
        let store = self.store.clone();
        async move {
            match queued {
                // Between a restart and the end of its backoff.
                None => Err(WalError::Unavailable("WAL writer is restarting".into())),
                Some(true) => match rx.await {
                    Ok(r) => r,
                    // The thread died with our request.
                    Err(_) => {
                        store.do_send(WriterDied);
                        Err(WalError::Unavailable("WAL writer stopped".into()))
                    }
                },
                Some(false) => {
                    store.do_send(WriterDied);
                    Err(WalError::Unavailable("WAL writer stopped".into()))
                }
            }
        }
    }
}
