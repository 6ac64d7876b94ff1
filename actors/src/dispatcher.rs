//! `Dispatcher`: moves one sink's records from the WAL to its `SinkActor`.
//!
//! Role: the delivery loop of one sink — fetch a batch (marks it InFlight),
//! hand it to the sink, ack it in the WAL on success; on a retryable error
//! wait with exponential backoff and jitter and try the same batch again; after
//! `retry_budget` attempts, or at once on a permanent error, dead-letter the
//! batch for this sink only. Failures because the target is unreachable
//! (connection refused, timeouts) do not use up the budget: an outage must
//! not turn a backlog into dead letters. After `circuit_threshold` failures
//! in a row the circuit opens (`gateway_sink_circuit_open`): attempts become
//! probes `circuit_cooldown` apart until one succeeds. One batch is in flight at a time, so records
//! reach the sink in seq order (and so in order per device).
//!
//! Batching is adaptive by default (`batch_max_wait` zero): a dispatcher
//! with nothing in flight fetches what is there at once, and an idle one
//! waits for the WAL's next append ([`WalWriter::watch_appends`]) instead of polling;
//! batches grow only while an earlier batch is in flight, up to
//! `batch_max_records`. A `batch_max_wait` above zero brings back waiting
//! for a full batch (fewer, larger objects): the WAL says how long the
//! partial batch may still wait ([`Fetched::Wait`]), and an idle dispatcher
//! still sleeps until the next append.
//!
//! Handles: [`SetPaused`], [`SetRetry`], [`SetBudget`], [`SetQuota`], [`SetWindows`], [`SetLive`], [`SetLiveShare`], [`SetReduce`], [`GetSinkState`], [`IsRunning`]. Sends: `PublishBatch` to its `SinkActor`.
//! Calls the WAL's writer thread through its [`WalWriter`] (fetch, ack,
//! dead, release, release_sink, with, watch_appends): no actor on the way.
//!
//! Restart policy: supervised. On restart it first asks the WAL to release
//! whatever it had InFlight, then starts fetching again. Lost on restart: the
//! attempt count of the current batch (the batch itself is redelivered).
//!
//! Rooms: this file holds the loop (fetch, publish, retry, ack, dead
//! letter, the circuit); `config.rs` the settings ([`DispatchKeys`] →
//! [`DispatchConfig`]); `gate.rs` what may go now (budget, quota, send
//! windows, `live_share`) with their runtime messages; `reduction.rs` the
//! report-by-exception glue; `admin.rs` pause, retry settings, state and
//! readiness.

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use tracing::Span;

use crate::metrics::Metrics;
use crate::reduce::{Reducer, Step};
use crate::repeats::{self, Kind};
use crate::sink::{PublishBatch, SinkActor, SinkError};
use crate::trace;
use crate::uplink::{QuotaSpent, TokenBucket};
use crate::wal::{now_ms, Batch, Fetched, WalWriter};

mod admin;
mod config;
mod gate;
mod reduction;

pub use admin::{GetSinkState, IsRunning, SetPaused, SetRetry, SinkState};
pub use config::{DispatchConfig, DispatchKeys};
pub use gate::{SetBudget, SetLive, SetLiveShare, SetQuota, SetWindows};
pub use reduction::SetReduce;

/// An idle dispatcher looks again after this long
/// even without an append (records reopened by a release, a requeue or a
/// replay).
const IDLE_FALLBACK: Duration = Duration::from_millis(100);

/// The delivery loop of one sink.
pub struct Dispatcher {
    /// Batching, retries and the circuit; runtime settings change it.
    cfg: DispatchConfig,
    /// Where batches are fetched from and acks and dead letters go.
    wal: WalWriter,
    /// The one sink it feeds: a batch at a time, so a sink's failures and
    /// slowness stay with it.
    sink: Addr<SinkActor>,
    metrics: Metrics,
    /// An operator paused it: no fetch until resumed (the backlog waits in
    /// the WAL).
    paused: bool,
    /// A fetch, publish or ack is under way: `step` starts nothing else, so
    /// one batch at a time is in flight and acks keep their order.
    busy: bool,
    /// Failed attempts in a row, across batches.
    consecutive_failures: u32,
    /// The target looks down: attempts become spaced-out probes.
    circuit_open: bool,
    /// Its last batch went to the dead letters (the target refused it for
    /// good, or it used up its retry budget), and none was delivered since.
    rejecting: bool,
    /// Changes after every WAL commit that appended: what an idle
    /// dispatcher waits on (none until started: [`WalWriter::watch_appends`]).
    appends: Option<tokio::sync::watch::Receiver<u64>>,
    /// The WAL's head (its last seq) when the last fetch was sent.
    head_seen: u64,
    /// The byte budget's bucket (`cfg.budget`), charged after each batch.
    bucket: Option<TokenBucket>,
    /// Where the quota's spent bytes are kept (the WAL's directory, the
    /// data dir); `None` until the WAL said.
    quota_dir: Option<std::path::PathBuf>,
    /// The quota spent so far; `None` until loaded from `quota_dir`.
    spent: Option<QuotaSpent>,
    /// `live_after` while the sink drains live-first ([`SetLive`]).
    live_after: Option<Duration>,
    /// The backlog's bucket: the budget less `live_share`.
    backlog_bucket: Option<TokenBucket>,
    /// Bytes on the wire per record, a moving average of the batches sent
    /// (sizes batches under a budget).
    wire_per_record: Option<f64>,
    /// Report-by-exception with the state stored with this sink's acks;
    /// `None` until read from the WAL (nothing is fetched before).
    reducer: Option<Reducer>,
    /// The reduction of the batch in flight: the reducer takes its state
    /// once the batch's ack (which stores it) was accepted.
    step: Option<Step>,
}

impl Dispatcher {
    /// A dispatcher delivering from `wal` to `sink`.
    pub fn new(
        cfg: DispatchConfig,
        wal: WalWriter,
        sink: Addr<SinkActor>,
        metrics: Metrics,
    ) -> Self {
        let paused = cfg.paused;
        let bucket = cfg.budget.map(|b| TokenBucket::new(b, Instant::now()));
        Self {
            bucket,
            quota_dir: None,
            spent: None,
            live_after: None,
            backlog_bucket: None,
            wire_per_record: None,
            reducer: None,
            step: None,
            cfg,
            wal,
            sink,
            metrics,
            paused,
            busy: false,
            consecutive_failures: 0,
            circuit_open: false,
            rejecting: false,
            appends: None,
            head_seen: 0,
        }
    }

    fn step(&mut self, ctx: &mut Context<Self>) {
        if self.busy {
            return;
        }
        if self.paused {
            return;
        }
        // Over budget: the backlog waits in the WAL until the debt is paid.
        let hold = self.budget_hold();
        if !hold.is_zero() {
            self.idle(hold, ctx);
            return;
        }
        if self.reducer.is_none() {
            // The reduction state is not read yet: nothing goes before it.
            self.idle(Duration::from_millis(20), ctx);
            return;
        }
        let (allowed, live_only) = match self.gate() {
            Ok(gate) => gate,
            Err(wait) => {
                self.idle(wait, ctx);
                return;
            }
        };
        self.busy = true;
        // Appends from now on wake the wait below, if this fetch finds nothing.
        if let Some(rx) = &mut self.appends {
            self.head_seen = *rx.borrow_and_update();
        }
        let fetch = self.wal.fetch(
            self.cfg.sink.clone(),
            self.fetch_size(),
            self.cfg.batch_max_wait,
        );
        ctx.spawn(fetch.into_actor(self).map(move |res, act, ctx| match res {
            Ok(Fetched::Batch(batch)) => {
                let span = trace::dispatch_span(&act.cfg.sink, &batch);
                if allowed != [true; 3] || live_only.is_some() {
                    act.publish_classes(batch, allowed, live_only, span, ctx)
                } else {
                    act.deliver(batch, span, ctx)
                }
            }
            Ok(Fetched::Nothing) => act.wait_for_records(IDLE_FALLBACK, 1, ctx),
            // A partial batch, younger than `batch_max_wait`: it leaves when
            // its oldest record has waited that long, or when enough appends
            // may have filled it first.
            Ok(Fetched::Wait { after, missing }) => act.wait_for_records(after, missing, ctx),
            Err(e) => {
                if repeats::admit(Kind::SinkFetch, &act.cfg.sink) {
                    tracing::warn!(sink = %act.cfg.sink, error = %e, "cannot fetch a batch from the WAL");
                }
                act.idle(Duration::from_secs(1), ctx);
            }
        }));
    }

    /// Nothing to send yet: wait until `records` more records were appended
    /// since the fetch (one: nothing to send; a partial batch: what it
    /// lacks, so that appends that cannot fill it yet do not wake a fetch
    /// each), at most `at_most` (nothing at all: a short fallback, as
    /// releases, requeues and replays do not append; a partial batch: until
    /// it is due). Without the WAL's append signal (not answered yet), poll.
    fn wait_for_records(&mut self, at_most: Duration, records: u64, ctx: &mut Context<Self>) {
        match self.appends.clone() {
            Some(mut rx) => {
                self.busy = false;
                let from = self.head_seen;
                let enough = async move {
                    while rx.changed().await.is_ok() {
                        if rx.borrow_and_update().saturating_sub(from) >= records {
                            return;
                        }
                    }
                    // The WAL is gone: wait out the deadline.
                    std::future::pending::<()>().await
                };
                let wait = async move {
                    let _ = tokio::time::timeout(at_most, enough).await;
                };
                ctx.spawn(wait.into_actor(self).map(|_, act, ctx| act.step(ctx)));
            }
            None => self.idle(self.cfg.idle_poll().min(at_most), ctx),
        }
    }

    fn idle(&mut self, after: Duration, ctx: &mut Context<Self>) {
        self.busy = false;
        ctx.run_later(after, |act, ctx| act.step(ctx));
    }

    /// One attempt at `batch` (what the WAL gave), sending `wire` (it
    /// reduced, or the same); `span` is its `dispatch` span.
    fn publish(
        &mut self,
        batch: Arc<Batch>,
        wire: Arc<Batch>,
        span: Span,
        attempt: u32,
        counted: u32,
        ctx: &mut Context<Self>,
    ) {
        let started = Instant::now();
        let publish_span = trace::publish_span(&span, &self.cfg.sink, wire.records.len(), attempt);
        let send = self
            .sink
            .send(PublishBatch {
                batch: wire.clone(),
                span: publish_span.clone(),
            })
            .timeout(self.cfg.publish_timeout);
        ctx.spawn(send.into_actor(self).map(move |res, act, ctx| {
            let sink = act.cfg.sink.clone();
            act.metrics
                .sink_publish_seconds
                .with_label_values(&[&sink])
                .observe(started.elapsed().as_secs_f64());
            let res = match res {
                Ok(r) => r,
                Err(MailboxError::Timeout) => Err(SinkError::Unavailable(format!(
                    "publish timed out after {:?}",
                    act.cfg.publish_timeout
                ))),
                Err(MailboxError::Closed) => {
                    Err(SinkError::Retryable("sink actor unavailable".into()))
                }
            };
            match &res {
                Ok(_) => publish_span.record("outcome", "ok"),
                Err(e) if e.is_retryable() => publish_span.record("outcome", "retry"),
                Err(_) => publish_span.record("outcome", "dead"),
            };
            if let Err(e) = &res {
                publish_span.record("error", tracing::field::display(e));
            }
            drop(publish_span);
            match res {
                Ok(sent) => {
                    if let Some(b) = &mut act.bucket {
                        b.charge(sent.wire_bytes, Instant::now());
                    }
                    if !batch.records.is_empty() && sent.wire_bytes > 0 {
                        let per = sent.wire_bytes as f64 / batch.records.len() as f64;
                        act.wire_per_record =
                            Some(act.wire_per_record.map_or(per, |p| (p + per) / 2.0));
                    }
                    if let (Some(cutoff), Some(b)) =
                        (act.live_cutoff(), act.backlog_bucket.as_mut())
                    {
                        // The backlog's part of the bytes, by its share of the payload.
                        let (old, all) = wire.records.iter().fold((0, 0), |(o, a), r| {
                            let n = r.json.len() as u64;
                            (o + if r.receive_ms < cutoff { n } else { 0 }, a + n)
                        });
                        let part = sent.wire_bytes as f64 * old as f64 / all.max(1) as f64;
                        b.charge(part as u64, Instant::now());
                    }
                    act.spend_quota(sent.wire_bytes);
                    act.metrics.sink_up.with_label_values(&[&sink]).set(1);
                    act.rejecting = false;
                    act.close_circuit();
                    act.observe_e2e(&batch);
                    act.ack(batch, span, attempt, ctx);
                }
                Err(e) if e.is_retryable() => {
                    // A target that is down is not the batch's fault: those
                    // failures do not use up the batch's retry budget.
                    let counted = counted + u32::from(!matches!(e, SinkError::Unavailable(_)));
                    act.metrics.sink_up.with_label_values(&[&sink]).set(0);
                    if counted >= act.cfg.retry_budget {
                        act.dead(batch, span, attempt, e.to_string(), ctx);
                        return;
                    }
                    act.note_failure();
                    let mut delay = act.cfg.backoff(attempt);
                    if act.circuit_open {
                        delay = delay.max(act.cfg.circuit_probe_delay());
                    }
                    if let SinkError::RetryAfter { after, .. } = &e {
                        // The target said when: never sooner (bounded to an hour
                        // so a silly header cannot park the sink for days).
                        delay = delay.max((*after).min(Duration::from_secs(3600)));
                    }
                    act.metrics
                        .sink_publish
                        .with_label_values(&[&sink, "retry"])
                        .inc();
                    if repeats::admit(Kind::SinkRetry, &sink) {
                        tracing::warn!(
                            sink = %sink,
                            first_seq = batch.first_seq(),
                            last_seq = batch.last_seq(),
                            attempt,
                            counted,
                            circuit_open = act.circuit_open,
                            retry_in_ms = delay.as_millis() as u64,
                            error = %e,
                            "sink publish failed; will retry"
                        );
                    }
                    let retry =
                        trace::retry_span(&span, &sink, attempt, delay.as_millis() as u64, &e);
                    ctx.run_later(delay, move |act, ctx| {
                        drop(retry);
                        act.publish(batch, wire, span, attempt + 1, counted, ctx)
                    });
                }
                Err(e) => {
                    act.metrics.sink_up.with_label_values(&[&sink]).set(0);
                    act.dead(batch, span, attempt, e.to_string(), ctx);
                }
            }
        }));
    }

    /// Counts a failed attempt; enough in a row open the circuit.
    fn note_failure(&mut self) {
        self.consecutive_failures += 1;
        if !self.circuit_open && self.consecutive_failures >= self.cfg.circuit_threshold {
            self.circuit_open = true;
            self.metrics
                .sink_circuit_open
                .with_label_values(&[&self.cfg.sink])
                .set(1);
            tracing::warn!(
                sink = %self.cfg.sink,
                failures = self.consecutive_failures,
                probe_every_ms = self.cfg.circuit_cooldown.as_millis() as u64,
                "circuit open: the sink's target looks down; probing it until it answers"
            );
        }
    }

    fn close_circuit(&mut self) {
        self.consecutive_failures = 0;
        if self.circuit_open {
            self.circuit_open = false;
            self.metrics
                .sink_circuit_open
                .with_label_values(&[&self.cfg.sink])
                .set(0);
            tracing::info!(sink = %self.cfg.sink, "circuit closed: the sink's target answers again");
        }
    }

    /// `gateway_e2e_latency_seconds`: receipt -> the sink's acknowledgement
    /// of `batch` (its target acknowledged it, or the reduction sent none
    /// of it), before the WAL's ack: that is our bookkeeping, held in memory
    /// for `wal.ack_flush`, not part of the delivery.
    fn observe_e2e(&self, batch: &Batch) {
        let now = now_ms();
        let e2e = self
            .metrics
            .e2e_latency_seconds
            .with_label_values(&[&self.cfg.sink]);
        for r in &batch.records {
            e2e.observe((now - r.receive_ms).max(0) as f64 / 1000.0);
        }
    }

    fn ack(&mut self, batch: Arc<Batch>, span: Span, attempt: u32, ctx: &mut Context<Self>) {
        let ack = self.wal.ack(
            self.cfg.sink.clone(),
            batch.ranges.clone(),
            self.step.as_ref().map(Step::rows).unwrap_or_default(),
        );
        ctx.spawn(ack.into_actor(self).map(move |res, act, ctx| match res {
            Ok(()) => {
                act.commit_step();
                let sink = act.cfg.sink.as_str();
                act.metrics
                    .sink_publish
                    .with_label_values(&[sink, "ok"])
                    .inc();
                act.metrics
                    .sink_records
                    .with_label_values(&[sink, "ok"])
                    .inc_by(batch.records.len() as u64);
                tracing::debug!(
                    sink,
                    first_seq = batch.first_seq(),
                    last_seq = batch.last_seq(),
                    attempt,
                    "batch delivered"
                );
                span.record("outcome", "delivered");
                act.busy = false;
                act.step(ctx);
            }
            Err(e) => {
                let err = e.to_string();
                // The batch was delivered; only the commit of its ack failed
                // (a full disk, say). The WAL has already applied the ack in
                // memory and writes it with its next successful commit; if the
                // WAL restarts first, the batch is delivered again (at least
                // once). Either way the sink goes on with the next batch, so a
                // full WAL disk does not stop delivery, which frees space.
                // The reduction state went with the ack: taken as well.
                act.commit_step();
                if repeats::admit(Kind::SinkAck, &act.cfg.sink) {
                    tracing::warn!(
                        sink = %act.cfg.sink,
                        first_seq = batch.first_seq(),
                        last_seq = batch.last_seq(),
                        error = %err,
                        "ack of a delivered batch not persisted yet; continuing"
                    );
                }
                act.busy = false;
                ctx.run_later(Duration::from_millis(100), |act, ctx| act.step(ctx));
            }
        }));
    }

    fn dead(
        &mut self,
        batch: Arc<Batch>,
        span: Span,
        attempts: u32,
        error: String,
        ctx: &mut Context<Self>,
    ) {
        // Not delivered: the state stays as it was before the batch.
        self.step = None;
        let dead = self.wal.dead(
            self.cfg.sink.clone(),
            batch.ranges.clone(),
            error.clone(),
            attempts,
        );
        ctx.spawn(dead.into_actor(self).map(move |res, act, ctx| match res {
            Ok(()) => {
                act.rejecting = true;
                let sink = act.cfg.sink.as_str();
                act.metrics
                    .sink_publish
                    .with_label_values(&[sink, "dead"])
                    .inc();
                act.metrics
                    .sink_records
                    .with_label_values(&[sink, "dead"])
                    .inc_by(batch.records.len() as u64);
                if repeats::admit(Kind::SinkDead, sink) {
                    tracing::error!(
                        sink,
                        first_seq = batch.first_seq(),
                        last_seq = batch.last_seq(),
                        records = batch.records.len(),
                        attempts,
                        error = %error,
                        "batch dead-lettered for this sink"
                    );
                }
                span.record("outcome", "dead");
                act.busy = false;
                act.step(ctx);
            }
            Err(_) => {
                tracing::warn!(sink = %act.cfg.sink, "cannot record dead letters; retrying");
                ctx.run_later(Duration::from_secs(1), move |act, ctx| {
                    act.dead(batch, span, attempts, error, ctx)
                });
            }
        }));
    }
}

impl Actor for Dispatcher {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.busy = false;
        // The quota's spent bytes live next to the WAL (the data dir).
        let sink = self.cfg.sink.clone();
        ctx.spawn(
            self.wal
                .with(|w| Ok(w.config().path.parent().map(std::path::Path::to_path_buf)))
                .into_actor(self)
                .map(move |res, act, _| {
                    let dir = match res {
                        Ok(Some(dir)) => dir,
                        _ => std::path::PathBuf::from("."),
                    };
                    act.spent = Some(QuotaSpent::load(&dir, &sink).unwrap_or_else(|e| {
                        tracing::warn!(sink = %sink, error = %e, "quota spent unreadable; starting from zero");
                        QuotaSpent::default()
                    }));
                    act.quota_dir = Some(dir);
                }),
        );
        // The reduction state stored with this sink's acks.
        self.reducer = None;
        self.step = None;
        self.load_reducer(ctx);
        self.appends = Some(self.wal.watch_appends());
        // Up until an attempt says otherwise, as `gateway_sink_up` below.
        self.rejecting = false;
        let sink = self.cfg.sink.as_str();
        self.metrics
            .sink_paused
            .with_label_values(&[sink])
            .set(self.paused as i64);
        self.metrics.sink_up.with_label_values(&[sink]).set(1);
        self.metrics
            .sink_circuit_open
            .with_label_values(&[sink])
            .set(0);
        for outcome in ["ok", "retry", "dead"] {
            self.metrics
                .sink_publish
                .with_label_values(&[sink, outcome]);
        }
        self.step(ctx);
    }
}

impl Supervised for Dispatcher {
    fn restarting(&mut self, _: &mut Context<Self>) {
        self.metrics
            .actor_restarts
            .with_label_values(&["Dispatcher"])
            .inc();
        tracing::warn!(actor = "Dispatcher", sink = %self.cfg.sink, "restarting; releasing its in-flight batch");
        // Queued at once, before the restarted dispatcher's first fetch.
        let release = self.wal.release_sink(self.cfg.sink.clone());
        actix_rt::spawn(release);
    }
}
