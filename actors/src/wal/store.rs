//! `WalStore`: the actor that supervises the WAL's writer thread.
//!
//! Role: starts the WAL's writer thread ([`super::writer`]) and restarts it
//! when it dies. SQLite never runs on an async arbiter: the engine lives on
//! its own OS thread, which group-commits every write waiting in its queue
//! (one transaction, one fsync) before it answers. Callers do not go
//! through this actor: they queue to the thread through a
//! [`super::WalWriter`], which reports a dead writer here.
//!
//! Handles: `WriterDied` (from a `WalWriter`), and `InjectWriterPanic`
//! (tests, `fault-injection` feature). Sends nothing.
//!
//! Restart policy: supervised. If the writer thread dies (a panic, a lost
//! database handle) the next request notices, the actor stops itself, and
//! the supervisor starts it again after a backoff, which re-opens the
//! database on a new thread. Lost on restart: the InFlight marks (by
//! design: they become Enqueued again) and requests queued to the dead
//! thread (their callers get an error; nothing they asked for was
//! acknowledged).

use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use actix::prelude::*;

use super::engine::{Wal, WalConfig};
#[cfg(feature = "fault-injection")]
use super::queue::Request;
use super::queue::{Queue, WalHealth};
use super::writer::writer_loop;
use crate::metrics::Metrics;

/// The WAL actor. Build it with [`WalStore::new`] and start it under a
/// `Supervisor`.
pub struct WalStore {
    cfg: WalConfig,
    metrics: Metrics,
    health: Arc<WalHealth>,
    /// The engine opened by the caller (so start-up errors surface early);
    /// used for the first thread, later threads open their own.
    first: Option<Wal>,
    /// Restarts without a quiet minute in between: drives the restart backoff.
    restarts_in_a_row: u32,
    /// When the current writer thread was started.
    writer_started: Option<Instant>,
}

impl WalStore {
    /// Wraps an opened engine and starts its writer thread at once, so a
    /// [`super::WalWriter`] made right after the actor is started finds
    /// the thread (requests do not wait in a mailbox for `started`).
    pub fn new(wal: Wal, metrics: Metrics, health: Arc<WalHealth>) -> Self {
        let mut store = Self {
            cfg: wal.config().clone(),
            metrics,
            health,
            first: Some(wal),
            restarts_in_a_row: 0,
            writer_started: None,
        };
        store.spawn_writer();
        store
    }

    fn spawn_writer(&mut self) {
        self.writer_started = Some(Instant::now());
        let (tx, rx) = mpsc::channel();
        let cfg = self.cfg.clone();
        let first = self.first.take();
        let metrics = self.metrics.clone();
        let health = self.health.clone();
        let spawned = std::thread::Builder::new()
            .name("wal-writer".into())
            .spawn(move || {
                let wal = match first {
                    Some(w) => Ok(w),
                    None => Wal::open(cfg),
                };
                match wal {
                    Ok(wal) => writer_loop(wal, rx, metrics, health),
                    Err(e) => {
                        tracing::error!(error = %e, "WAL cannot be opened");
                        health.alive.store(false, Ordering::SeqCst);
                        health.set_problem(Some(e.to_string()));
                    }
                }
            });
        let thread = match spawned {
            Ok(h) => Some(h.thread().clone()),
            Err(e) => {
                tracing::error!(error = %e, "cannot spawn the WAL writer thread");
                None
            }
        };
        self.set_writer(Some(Queue { tx, thread }));
    }

    /// The writer's queue, shared through [`WalHealth`] with every
    /// [`super::WalWriter`].
    fn set_writer(&self, queue: Option<Queue>) {
        if let Ok(mut g) = self.health.writer.write() {
            *g = queue;
        }
    }
}

impl Actor for WalStore {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        // The first writer thread was started by `new`; a restarted actor
        // starts a new one after its backoff.
        if self.restarts_in_a_row > 0 {
            let delay = restart_backoff(self.restarts_in_a_row);
            tracing::warn!(
                delay_ms = delay.as_millis() as u64,
                restarts = self.restarts_in_a_row,
                "WAL writer restarts after a backoff"
            );
            ctx.run_later(delay, |act, _| act.spawn_writer());
        }
    }

    fn stopped(&mut self, _ctx: &mut Context<Self>) {
        // Dropping the senders ends the writer thread after its current group.
        self.set_writer(None);
    }
}

impl Supervised for WalStore {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        self.metrics
            .actor_restarts
            .with_label_values(&["WalStore"])
            .inc();
        tracing::warn!(actor = "WalStore", "restarting the WAL writer");
        self.set_writer(None);
        let quiet = self
            .writer_started
            .is_some_and(|t| t.elapsed() >= Duration::from_secs(60));
        self.restarts_in_a_row = if quiet { 1 } else { self.restarts_in_a_row + 1 };
    }
}

/// 50 ms, doubling per restart in a row, capped at 10 s.
fn restart_backoff(restarts_in_a_row: u32) -> Duration {
    Duration::from_millis(50u64 << restarts_in_a_row.saturating_sub(1).min(8))
        .min(Duration::from_secs(10))
}

/// A caller found the writer thread gone ([`super::WalWriter`]): the actor
/// stops, and its supervisor restarts it with a new thread.
pub(super) struct WriterDied;
impl Message for WriterDied {
    type Result = ();
}
impl Handler<WriterDied> for WalStore {
    type Result = ();
    fn handle(&mut self, _: WriterDied, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}

/// Test-only fault injection: makes the writer thread panic, as a failing
/// disk or a bug would. Compiled only with the `fault-injection` feature.
#[cfg(feature = "fault-injection")]
pub struct InjectWriterPanic;
#[cfg(feature = "fault-injection")]
impl Message for InjectWriterPanic {
    type Result = ();
}
#[cfg(feature = "fault-injection")]
impl Handler<InjectWriterPanic> for WalStore {
    type Result = ();
    fn handle(&mut self, _: InjectWriterPanic, _: &mut Context<Self>) {
        if let Some(q) = self.health.writer.read().ok().and_then(|g| g.clone()) {
            let _ = q.tx.send(Request::Panic);
        }
    }
}
