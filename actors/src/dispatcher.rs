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
//! waits for the WAL's next append ([`WatchAppends`]) instead of polling;
//! batches grow only while an earlier batch is in flight, up to
//! `batch_max_records`. A `batch_max_wait` above zero brings back waiting
//! for a full batch (fewer, larger objects): the WAL says how long the
//! partial batch may still wait ([`Fetched::Wait`]), and an idle dispatcher
//! still sleeps until the next append.
//!
//! Handles: [`SetPaused`], [`SetRetry`], [`SetBudget`], [`SetQuota`], [`SetWindows`], [`SetLive`], [`SetLiveShare`], [`SetReduce`], [`GetSinkState`], [`IsRunning`]. Sends: `FetchBatch`, `AckBatch`, `MarkDead`,
//! `ReleaseSink` to `WalStore`; `PublishBatch` to its `SinkActor`.
//!
//! Restart policy: supervised. On restart it first asks the WAL to release
//! whatever it had InFlight, then starts fetching again. Lost on restart: the
//! attempt count of the current batch (the batch itself is redelivered).

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use tracing::Span;

use crate::metrics::Metrics;
use crate::reduce::{Reduce, Reducer, Step};
use crate::repeats::{self, Kind};
use crate::route::Class;
use crate::sink::{PublishBatch, SinkActor, SinkError};
use crate::trace;
use crate::uplink::{Allowance, Budget, Quota, QuotaSpent, TokenBucket, Windows};
use crate::wal::{
    now_ms, AckBatch, Batch, FetchBatch, Fetched, MarkDead, ReleaseBatch, ReleaseSink, WalStore,
    WatchAppends, WithWal,
};

/// Delivery settings of one sink.
#[derive(Debug, Clone, PartialEq)]
pub struct DispatchConfig {
    /// The sink's name.
    pub sink: String,
    /// Most records per batch.
    pub batch_max_records: usize,
    /// How long a partial batch may wait to fill up. Zero (the default):
    /// adaptive batching — a sink with nothing in flight sends what it has
    /// at once, and batches grow only while an earlier one is in flight.
    pub batch_max_wait: Duration,
    /// Attempts per batch before it goes Dead for this sink (>= 1).
    pub retry_budget: u32,
    /// First backoff delay.
    pub retry_base: Duration,
    /// Largest backoff delay.
    pub retry_max: Duration,
    /// A publish taking longer counts as a retryable failure.
    pub publish_timeout: Duration,
    /// Start paused.
    pub paused: bool,
    /// Failed attempts in a row that open the circuit.
    pub circuit_threshold: u32,
    /// While the circuit is open, attempts are probes this far apart (with jitter).
    pub circuit_cooldown: Duration,
    /// Token bucket on the bytes sent (DESIGN §6b); `None`: no limit.
    pub budget: Option<Budget>,
    /// Bytes per period, the rest for `high` only (DESIGN §6b); `None`: no limit.
    pub quota: Option<Quota>,
    /// Per-class local-time send windows (DESIGN §6b); `None`: any time.
    pub windows: Option<Windows>,
    /// With a budget and `drain = "live_first"`: the share of the budget kept
    /// for live records while a backlog drains (0 < share < 1).
    pub live_share: Option<f64>,
    /// Report-by-exception (DESIGN §6b); `None`: every record as it is.
    pub reduce: Option<Reduce>,
}

/// The `[sinks.NAME]` keys every kind shares: batching, retries, timeout,
/// circuit breaker (defaults in [`DispatchConfig::new`]).
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DispatchKeys {
    /// Most records per batch, 1 to 100000 (default 500).
    pub batch_max_records: Option<usize>,
    /// How long a partial batch may wait to fill up, ms (default 0:
    /// adaptive — send at once what is there; a value trades latency for
    /// fewer, larger batches, e.g. fewer S3 objects).
    pub batch_max_wait_ms: Option<u64>,
    /// Attempts per batch before it goes Dead, at least 1 (default 10).
    pub retry_budget: Option<u32>,
    /// First backoff delay, ms (default 200).
    pub retry_base_ms: Option<u64>,
    /// Largest backoff delay, ms, at least `retry_base_ms` (default 60000).
    pub retry_max_ms: Option<u64>,
    /// A publish taking longer is a retryable failure, ms (default 30000).
    pub publish_timeout_ms: Option<u64>,
    /// Start paused (default false).
    pub paused: Option<bool>,
    /// Failed attempts in a row that open the circuit, at least 1 (default 5).
    pub circuit_threshold: Option<u32>,
    /// Probe interval while the circuit is open, ms (default 5000).
    pub circuit_cooldown_ms: Option<u64>,
    /// `{ bytes_per_s = N, burst_bytes = N }`: a token bucket on the bytes
    /// the sink sends (after compression); held records wait in the WAL
    /// (default: none). A runtime setting.
    pub budget: Option<serde_json::Value>,
    /// `{ bytes = "2GiB", period = "30d", reserve_high = "10%" }`: bytes
    /// per period; once `bytes - reserve_high` is spent only `high` records
    /// go, from the reserve. Spent bytes persist across restarts (default:
    /// none). A runtime setting.
    pub quota: Option<serde_json::Value>,
    /// `{ low = ["01:00-05:00"] }`: a class goes only inside its local-time
    /// windows (classes not named: any time); held records wait in the WAL
    /// (default: none). A runtime setting.
    pub windows: Option<serde_json::Value>,
    /// With a `budget` and `drain = "live_first"`: the share of the budget
    /// kept for live records while a backlog drains, above 0 and below 1
    /// (default: none, the backlog may use all of it).
    pub live_share: Option<f64>,
    /// `{ deadband = {...}, heartbeat = "15m", downsample = {...} }`:
    /// report-by-exception, what this sink sends of each record (the WAL
    /// and the other sinks keep every record; `high` is never reduced).
    /// See `actors/src/reduce.rs` (default: none). A runtime setting.
    pub reduce: Option<serde_json::Value>,
}

impl DispatchKeys {
    /// The key names, to tell them from a kind's own keys in one table.
    pub const KEYS: &'static [&'static str] = &[
        "batch_max_records",
        "batch_max_wait_ms",
        "retry_budget",
        "retry_base_ms",
        "retry_max_ms",
        "publish_timeout_ms",
        "paused",
        "circuit_threshold",
        "circuit_cooldown_ms",
        "budget",
        "quota",
        "windows",
        "live_share",
        "reduce",
    ];

    /// Validates the keys into the delivery settings of sink `name`.
    pub fn build(&self, name: &str) -> Result<DispatchConfig, crate::keys::KeyError> {
        use crate::keys::KeyError;
        let mut d = DispatchConfig::new(name);
        if let Some(v) = self.batch_max_records {
            if !(1..=100_000).contains(&v) {
                return Err(KeyError::new(
                    "batch_max_records",
                    "must be between 1 and 100000",
                ));
            }
            d.batch_max_records = v;
        }
        if let Some(v) = self.batch_max_wait_ms {
            d.batch_max_wait = Duration::from_millis(v);
        }
        if let Some(v) = self.retry_budget {
            if v == 0 {
                return Err(KeyError::new(
                    "retry_budget",
                    "must be at least 1 (attempts before Dead)",
                ));
            }
            d.retry_budget = v;
        }
        if let Some(v) = self.retry_base_ms {
            d.retry_base = Duration::from_millis(v.max(1));
        }
        if let Some(v) = self.retry_max_ms {
            d.retry_max = Duration::from_millis(v.max(1));
        }
        if d.retry_max < d.retry_base {
            return Err(KeyError::new("retry_max_ms", "must be >= retry_base_ms"));
        }
        if let Some(v) = self.publish_timeout_ms {
            if v == 0 {
                return Err(KeyError::new("publish_timeout_ms", "must be > 0"));
            }
            d.publish_timeout = Duration::from_millis(v);
        }
        d.paused = self.paused.unwrap_or(false);
        if let Some(v) = self.circuit_threshold {
            if v == 0 {
                return Err(KeyError::new("circuit_threshold", "must be at least 1"));
            }
            d.circuit_threshold = v;
        }
        if let Some(v) = self.circuit_cooldown_ms {
            d.circuit_cooldown = Duration::from_millis(v.max(1));
        }
        if let Some(v) = &self.budget {
            d.budget = Budget::from_value(v).map_err(|e| KeyError::new("budget", e))?;
        }
        if let Some(v) = &self.quota {
            d.quota = Quota::from_value(v).map_err(|e| KeyError::new("quota", e))?;
        }
        if let Some(v) = &self.windows {
            d.windows = Windows::from_value(v).map_err(|e| KeyError::new("windows", e))?;
        }
        if let Some(v) = self.live_share {
            if !(v > 0.0 && v < 1.0) {
                return Err(KeyError::new("live_share", "must be above 0 and below 1"));
            }
            d.live_share = Some(v);
        }
        if let Some(v) = &self.reduce {
            d.reduce = Reduce::from_value(v).map_err(|e| KeyError::new("reduce", e))?;
        }
        Ok(d)
    }
}

impl DispatchConfig {
    /// Defaults for `sink`.
    pub fn new(sink: &str) -> Self {
        Self {
            sink: sink.to_string(),
            batch_max_records: 500,
            batch_max_wait: Duration::ZERO,
            retry_budget: 10,
            retry_base: Duration::from_millis(200),
            retry_max: Duration::from_secs(60),
            publish_timeout: Duration::from_secs(30),
            paused: false,
            circuit_threshold: 5,
            circuit_cooldown: Duration::from_secs(5),
            budget: None,
            quota: None,
            windows: None,
            live_share: None,
            reduce: None,
        }
    }

    /// The wait before attempt `attempt + 1` after `attempt` failed:
    /// exponential, capped, with "equal jitter" (half fixed, half random) so
    /// that many gateways do not retry in lockstep yet never spin.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let exp = self
            .retry_base
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
        let d = exp.min(self.retry_max).max(Duration::from_millis(1));
        let half = d / 2;
        half + Duration::from_nanos(fastrand::u64(0..=half.as_nanos() as u64))
    }

    fn circuit_probe_delay(&self) -> Duration {
        let half = self.circuit_cooldown / 2;
        half + Duration::from_nanos(fastrand::u64(0..=half.as_nanos() as u64))
    }

    fn idle_poll(&self) -> Duration {
        (self.batch_max_wait / 2).clamp(Duration::from_millis(5), Duration::from_millis(100))
    }
}

/// An idle dispatcher looks again after this long
/// even without an append (records reopened by a release, a requeue or a
/// replay).
const IDLE_FALLBACK: Duration = Duration::from_millis(100);

/// The delivery loop of one sink.
pub struct Dispatcher {
    /// Batching, retries and the circuit; runtime settings change it.
    cfg: DispatchConfig,
    /// Where batches are fetched from and acks and dead letters go.
    wal: Addr<WalStore>,
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
    /// Changes after every WAL commit that appended: what an idle
    /// dispatcher waits on (none until the WAL answered [`WatchAppends`]).
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
        wal: Addr<WalStore>,
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
        let hold = self
            .bucket
            .as_mut()
            .map_or(Duration::ZERO, |b| b.wait(Instant::now()));
        self.set_held("budget", !hold.is_zero());
        if !hold.is_zero() {
            self.idle(hold, ctx);
            return;
        }
        if self.reducer.is_none() {
            // The reduction state is not read yet: nothing goes before it.
            self.idle(Duration::from_millis(20), ctx);
            return;
        }
        let allowance = match (self.cfg.quota, self.spent.as_mut()) {
            (None, _) => Allowance::All,
            // Not loaded yet: nothing goes before the spent bytes are known.
            (Some(_), None) => {
                self.idle(Duration::from_millis(20), ctx);
                return;
            }
            (Some(q), Some(spent)) => {
                spent.roll(&q, now_ms());
                let a = spent.allowance(&q);
                self.metrics
                    .sink_quota_period_end
                    .with_label_values(&[&self.cfg.sink])
                    .set(spent.period_end_ms(&q) / 1000);
                self.metrics
                    .sink_quota_remaining
                    .with_label_values(&[&self.cfg.sink])
                    .set(
                        q.bytes
                            .saturating_sub(spent.spent_bytes)
                            .min(i64::MAX as u64) as i64,
                    );
                a
            }
        };
        self.set_held("quota", allowance != Allowance::All);
        // The classes that may go now: the quota's, inside their windows.
        let minute = crate::uplink::local_minute();
        let mut allowed = [allowance == Allowance::All; 3];
        allowed[Class::High as usize] = allowance != Allowance::Nothing;
        let mut outside = false;
        if let Some(w) = &self.cfg.windows {
            for c in Class::ALL {
                outside |= !w.allows(c, minute);
                allowed[c as usize] &= w.allows(c, minute);
            }
        }
        self.set_held("window", outside);
        if allowance == Allowance::Nothing || allowed == [false; 3] {
            // Look again at the period's end, or when a window may open.
            let until = match (allowance, self.spent.zip(self.cfg.quota)) {
                (Allowance::Nothing, Some((s, q))) => {
                    (s.period_end_ms(&q) - now_ms()).clamp(10, 5_000)
                }
                _ => 5_000,
            };
            self.idle(Duration::from_millis(until as u64), ctx);
            return;
        }
        // With live_share, a backlog over its share of the budget waits: only
        // live records go until the backlog's bucket is paid back.
        let cutoff = self.live_cutoff();
        let backlog_waits = self
            .backlog_bucket
            .as_mut()
            .is_some_and(|b| !b.wait(Instant::now()).is_zero());
        let live_only = cutoff.filter(|_| backlog_waits);
        self.busy = true;
        // Appends from now on wake the wait below, if this fetch finds nothing.
        if let Some(rx) = &mut self.appends {
            self.head_seen = *rx.borrow_and_update();
        }
        let fetch = self.wal.send(FetchBatch {
            sink: self.cfg.sink.clone(),
            max_records: self.fetch_size(),
            max_wait: self.cfg.batch_max_wait,
        });
        ctx.spawn(fetch.into_actor(self).map(move |res, act, ctx| match res {
            Ok(Ok(Fetched::Batch(batch))) => {
                let span = trace::dispatch_span(&act.cfg.sink, &batch);
                if allowed != [true; 3] || live_only.is_some() {
                    act.publish_classes(batch, allowed, live_only, span, ctx)
                } else {
                    act.deliver(batch, span, ctx)
                }
            }
            Ok(Ok(Fetched::Nothing)) => act.wait_for_records(IDLE_FALLBACK, 1, ctx),
            // A partial batch, younger than `batch_max_wait`: it leaves when
            // its oldest record has waited that long, or when enough appends
            // may have filled it first.
            Ok(Ok(Fetched::Wait { after, missing })) => act.wait_for_records(after, missing, ctx),
            Ok(Err(e)) => {
                if repeats::admit(Kind::SinkFetch, &act.cfg.sink) {
                    tracing::warn!(sink = %act.cfg.sink, error = %e, "cannot fetch a batch from the WAL");
                }
                act.idle(Duration::from_secs(1), ctx);
            }
            Err(e) => {
                if repeats::admit(Kind::SinkFetch, &act.cfg.sink) {
                    tracing::warn!(sink = %act.cfg.sink, error = %e, "WAL mailbox unavailable");
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

    /// Delivers a fetched batch: reduces it if the sink reports by
    /// exception (once: a retry sends the same reduced batch), then
    /// publishes it. A batch reduced to nothing is acked at once.
    fn deliver(&mut self, batch: Batch, span: Span, ctx: &mut Context<Self>) {
        let batch = Arc::new(batch);
        let wire = match self.reducer.as_ref().filter(|r| r.active()) {
            Some(r) => {
                let mut step = r.reduce(&batch);
                let wire = Arc::new(std::mem::replace(
                    &mut step.wire,
                    Batch {
                        sink: String::new(),
                        ranges: Vec::new(),
                        records: Vec::new(),
                    },
                ));
                self.step = Some(step);
                wire
            }
            None => {
                self.step = None;
                batch.clone()
            }
        };
        if wire.records.is_empty() {
            self.ack(batch, span, 0, ctx);
        } else {
            self.publish(batch, wire, span, 1, 0, ctx);
        }
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
                    act.close_circuit();
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

    /// Only some classes may go now (the quota's reserve is all that is
    /// left: only `high`; a class outside its windows): the batch's records
    /// of those classes go, the others go back to the WAL and wait (they
    /// are fetched again on the next pass).
    fn publish_classes(
        &mut self,
        batch: Batch,
        allowed: [bool; 3],
        live_only: Option<i64>,
        span: Span,
        ctx: &mut Context<Self>,
    ) {
        let high: Vec<_> = batch
            .records
            .iter()
            .filter(|r| allowed[r.class as usize] && live_only.is_none_or(|c| r.receive_ms >= c))
            .cloned()
            .collect();
        let seqs: Vec<u64> = high.iter().map(|r| r.seq).collect();
        let release = ReleaseBatch {
            sink: self.cfg.sink.clone(),
            ranges: subtract(&batch.ranges, &seqs),
        };
        let high = Batch {
            sink: batch.sink,
            ranges: runs(&seqs),
            records: high,
        };
        ctx.spawn(
            self.wal
                .send(release)
                .into_actor(self)
                .map(move |_, act, ctx| {
                    if high.records.is_empty() {
                        act.wait_for_records(Duration::from_secs(1), 1, ctx);
                    } else {
                        act.deliver(high, span, ctx);
                    }
                }),
        );
    }

    /// Records per batch: `batch_max_records`, and under a budget no more
    /// than its burst holds at the recent bytes per record, so one batch's
    /// debt (and the wait of a `high` record behind it) stays near
    /// `burst_bytes / bytes_per_s`.
    fn fetch_size(&self) -> usize {
        let max = self.cfg.batch_max_records;
        match (&self.bucket, self.wire_per_record) {
            (Some(b), per) => {
                // Before the first batch: ~300 B a record (uncompressed telemetry).
                let per = per.unwrap_or(300.0).max(1.0);
                ((b.budget().burst_bytes as f64 / per) as usize).clamp(1, max)
            }
            (None, _) => max,
        }
    }

    /// Records received before this (epoch ms) are the backlog, while the
    /// sink drains live-first with a `live_share`.
    fn live_cutoff(&self) -> Option<i64> {
        self.backlog_bucket.as_ref()?;
        Some(now_ms() - self.live_after?.as_millis() as i64)
    }

    /// Builds, changes or drops the backlog's bucket after a change of the
    /// budget, `live_share` or the drain order.
    fn update_backlog_bucket(&mut self) {
        let want = match (self.cfg.budget, self.cfg.live_share, self.live_after) {
            (Some(b), Some(share), Some(_)) => Some(Budget {
                bytes_per_s: ((b.bytes_per_s as f64 * (1.0 - share)) as u64).max(1),
                burst_bytes: ((b.burst_bytes as f64 * (1.0 - share)) as u64).max(1),
            }),
            _ => None,
        };
        let now = Instant::now();
        match (want, self.backlog_bucket.as_mut()) {
            (None, _) => self.backlog_bucket = None,
            (Some(w), Some(b)) => b.set_budget(w, now),
            (Some(w), None) => self.backlog_bucket = Some(TokenBucket::new(w, now)),
        }
    }

    /// Counts `bytes` against the quota and persists what was spent.
    fn spend_quota(&mut self, bytes: u64) {
        let (Some(q), Some(spent)) = (self.cfg.quota, self.spent.as_mut()) else {
            return;
        };
        spent.roll(&q, now_ms());
        spent.spent_bytes += bytes;
        self.metrics
            .sink_quota_remaining
            .with_label_values(&[&self.cfg.sink])
            .set(
                q.bytes
                    .saturating_sub(spent.spent_bytes)
                    .min(i64::MAX as u64) as i64,
            );
        if let Some(dir) = &self.quota_dir {
            if let Err(e) = spent.save(dir, &self.cfg.sink) {
                tracing::warn!(sink = %self.cfg.sink, error = %e, "cannot persist the quota spent");
            }
        }
    }

    /// `gateway_sink_held_records{sink,reason}`: while held, the sink's
    /// whole backlog (its enqueued records) waits for `reason`.
    fn set_held(&self, reason: &str, held: bool) {
        let n = if held {
            self.metrics
                .wal_records
                .with_label_values(&[&self.cfg.sink, "enqueued"])
                .get()
        } else {
            0
        };
        self.metrics
            .sink_held_records
            .with_label_values(&[&self.cfg.sink, reason])
            .set(n);
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

    fn ack(&mut self, batch: Arc<Batch>, span: Span, attempt: u32, ctx: &mut Context<Self>) {
        let msg = AckBatch {
            sink: self.cfg.sink.clone(),
            ranges: batch.ranges.clone(),
            reduce: self.step.as_ref().map(Step::rows).unwrap_or_default(),
        };
        ctx.spawn(
            self.wal
                .send(msg)
                .into_actor(self)
                .map(move |res, act, ctx| match res {
                    Ok(Ok(())) => {
                        act.commit_step();
                        let sink = act.cfg.sink.as_str();
                        let now = now_ms();
                        let e2e = act.metrics.e2e_latency_seconds.with_label_values(&[sink]);
                        for r in &batch.records {
                            e2e.observe((now - r.receive_ms).max(0) as f64 / 1000.0);
                        }
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
                    other => {
                        let err = match other {
                            Ok(Err(e)) => e.to_string(),
                            Err(e) => e.to_string(),
                            Ok(Ok(())) => String::new(),
                        };
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
                }),
        );
    }

    /// Reads the reduction state stored with this sink's acks (at start and
    /// after a restart); fetching waits for it.
    fn load_reducer(&mut self, ctx: &mut Context<Self>) {
        let sink = self.cfg.sink.clone();
        ctx.spawn(
            self.wal
                .send(WithWal::new(move |w| w.reduce_rows(&sink)))
                .into_actor(self)
                .map(|res, act, ctx| {
                    let error = match res {
                        Ok(Ok(rows)) => {
                            let cfg = act.cfg.reduce.clone();
                            act.reducer = Some(Reducer::load(&act.cfg.sink, cfg, rows));
                            return;
                        }
                        Ok(Err(e)) => e.to_string(),
                        Err(e) => e.to_string(),
                    };
                    tracing::warn!(sink = %act.cfg.sink, error = %error, "cannot read the reduction state; trying again");
                    ctx.run_later(Duration::from_secs(1), |act, ctx| act.load_reducer(ctx));
                }),
        );
    }

    /// The batch's ack was taken by the WAL, with its reduction state rows:
    /// the reducer moves on to that state.
    fn commit_step(&mut self) {
        let (Some(step), Some(r)) = (self.step.take(), self.reducer.as_mut()) else {
            return;
        };
        let c = step.counts;
        let sink = self.cfg.sink.as_str();
        for (kind, n) in [
            ("deadband", c.deadband),
            ("downsample", c.downsample),
            ("record", c.records),
        ] {
            if n > 0 {
                self.metrics
                    .sink_reduced
                    .with_label_values(&[sink, kind])
                    .inc_by(n);
            }
        }
        r.commit(step);
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
        let msg = MarkDead {
            sink: self.cfg.sink.clone(),
            ranges: batch.ranges.clone(),
            error: error.clone(),
            attempts,
        };
        ctx.spawn(self.wal.send(msg).into_actor(self).map(move |res, act, ctx| match res {
            Ok(Ok(())) => {
                let sink = act.cfg.sink.as_str();
                act.metrics.sink_publish.with_label_values(&[sink, "dead"]).inc();
                act.metrics.sink_records.with_label_values(&[sink, "dead"]).inc_by(batch.records.len() as u64);
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
            _ => {
                tracing::warn!(sink = %act.cfg.sink, "cannot record dead letters; retrying");
                ctx.run_later(Duration::from_secs(1), move |act, ctx| act.dead(batch, span, attempts, error, ctx));
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
                .send(WithWal::new(|w| {
                    Ok(w.config().path.parent().map(std::path::Path::to_path_buf))
                }))
                .into_actor(self)
                .map(move |res, act, _| {
                    let dir = match res {
                        Ok(Ok(Some(dir))) => dir,
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
        ctx.spawn(
            self.wal
                .send(WatchAppends)
                .into_actor(self)
                .map(|res, act, _| act.appends = res.ok()),
        );
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
        self.wal.do_send(ReleaseSink {
            sink: self.cfg.sink.clone(),
        });
    }
}

/// Pauses (`true`) or resumes (`false`) delivery; a batch already being
/// published finishes first.
pub struct SetPaused(pub bool);
impl Message for SetPaused {
    type Result = ();
}
impl Handler<SetPaused> for Dispatcher {
    type Result = ();
    fn handle(&mut self, msg: SetPaused, ctx: &mut Context<Self>) {
        if self.paused != msg.0 {
            tracing::info!(sink = %self.cfg.sink, paused = msg.0, "sink delivery {}", if msg.0 { "paused" } else { "resumed" });
        }
        self.paused = msg.0;
        self.metrics
            .sink_paused
            .with_label_values(&[&self.cfg.sink])
            .set(msg.0 as i64);
        if !msg.0 {
            self.step(ctx);
        }
    }
}

/// Changes the retry settings at run time (control plane `config.set`);
/// `None` keeps a value. Applies from the next failure on.
#[derive(Debug, Clone, Copy, Default)]
pub struct SetRetry {
    /// Attempts per batch before Dead (>= 1).
    pub retry_budget: Option<u32>,
    /// First backoff delay.
    pub retry_base: Option<Duration>,
    /// Largest backoff delay.
    pub retry_max: Option<Duration>,
}
impl Message for SetRetry {
    type Result = ();
}
impl Handler<SetRetry> for Dispatcher {
    type Result = ();
    fn handle(&mut self, msg: SetRetry, _: &mut Context<Self>) {
        if let Some(b) = msg.retry_budget {
            self.cfg.retry_budget = b.max(1);
        }
        if let Some(d) = msg.retry_base {
            self.cfg.retry_base = d.max(Duration::from_millis(1));
        }
        if let Some(d) = msg.retry_max {
            self.cfg.retry_max = d.max(self.cfg.retry_base);
        }
        tracing::info!(
            sink = %self.cfg.sink,
            retry_budget = self.cfg.retry_budget,
            retry_base_ms = self.cfg.retry_base.as_millis() as u64,
            retry_max_ms = self.cfg.retry_max.as_millis() as u64,
            "sink retry settings changed"
        );
    }
}

/// What an operator sees of a sink (`GET /admin/sinks`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SinkState {
    /// Delivery is paused.
    pub paused: bool,
    /// The circuit breaker is open (the target looks down).
    pub circuit_open: bool,
    /// Failed attempts in a row.
    pub consecutive_failures: u32,
    /// A batch is being fetched or published.
    pub busy: bool,
    /// Attempts per batch before Dead.
    pub retry_budget: u32,
    /// First backoff delay, ms.
    pub retry_base_ms: u64,
    /// Largest backoff delay, ms.
    pub retry_max_ms: u64,
    /// The byte budget in force (`null`: none).
    #[serde(default)]
    pub budget: Option<Budget>,
    /// The quota in force (`null`: none).
    #[serde(default)]
    pub quota: Option<Quota>,
    /// The send windows in force (`null`: none).
    #[serde(default)]
    pub windows: Option<serde_json::Value>,
    /// The share of the budget kept for live records (`null`: none).
    #[serde(default)]
    pub live_share: Option<serde_json::Value>,
    /// Bytes spent of the quota in the current period.
    #[serde(default)]
    pub quota_spent_bytes: Option<u64>,
    /// Report-by-exception in force (`null`: none).
    #[serde(default)]
    pub reduce: Option<serde_json::Value>,
}

/// Reads the dispatcher's state.
pub struct GetSinkState;
impl Message for GetSinkState {
    type Result = SinkState;
}
impl Handler<GetSinkState> for Dispatcher {
    type Result = MessageResult<GetSinkState>;
    fn handle(&mut self, _: GetSinkState, _: &mut Context<Self>) -> Self::Result {
        MessageResult(SinkState {
            paused: self.paused,
            circuit_open: self.circuit_open,
            consecutive_failures: self.consecutive_failures,
            busy: self.busy,
            retry_budget: self.cfg.retry_budget,
            retry_base_ms: self.cfg.retry_base.as_millis() as u64,
            retry_max_ms: self.cfg.retry_max.as_millis() as u64,
            budget: self.bucket.as_ref().map(TokenBucket::budget),
            quota: self.cfg.quota,
            windows: self.cfg.windows.as_ref().map(Windows::to_json),
            live_share: self.cfg.live_share.map(serde_json::Value::from),
            quota_spent_bytes: self.cfg.quota.and(self.spent.map(|s| s.spent_bytes)),
            reduce: self.cfg.reduce.as_ref().map(Reduce::to_json),
        })
    }
}

/// Sets or clears the byte budget at run time (`config.set
/// sinks.NAME.budget`); a bucket in debt keeps its debt.
pub struct SetBudget(pub Option<Budget>);
impl Message for SetBudget {
    type Result = ();
}
impl Handler<SetBudget> for Dispatcher {
    type Result = ();
    fn handle(&mut self, msg: SetBudget, ctx: &mut Context<Self>) {
        let now = Instant::now();
        self.cfg.budget = msg.0;
        match (msg.0, &mut self.bucket) {
            (None, _) => self.bucket = None,
            (Some(b), Some(bucket)) => bucket.set_budget(b, now),
            (Some(b), None) => self.bucket = Some(TokenBucket::new(b, now)),
        }
        self.update_backlog_bucket();
        tracing::info!(sink = %self.cfg.sink, budget = ?msg.0, "sink byte budget changed");
        if msg.0.is_none() {
            self.set_held("budget", false);
            self.step(ctx);
        }
    }
}

/// Sets or clears the quota at run time (`config.set sinks.NAME.quota`);
/// what was spent in the period is kept.
pub struct SetQuota(pub Option<Quota>);
impl Message for SetQuota {
    type Result = ();
}
impl Handler<SetQuota> for Dispatcher {
    type Result = ();
    fn handle(&mut self, msg: SetQuota, ctx: &mut Context<Self>) {
        self.cfg.quota = msg.0;
        tracing::info!(sink = %self.cfg.sink, quota = ?msg.0, "sink quota changed");
        if msg.0.is_none() {
            self.set_held("quota", false);
        }
        self.step(ctx);
    }
}

/// Tells the dispatcher the sink's drain order: `Some(live_after)` while
/// it drains live-first (what `live_share` needs to tell live from backlog).
pub struct SetLive(pub Option<Duration>);
impl Message for SetLive {
    type Result = ();
}
impl Handler<SetLive> for Dispatcher {
    type Result = ();
    fn handle(&mut self, msg: SetLive, _: &mut Context<Self>) {
        self.live_after = msg.0;
        self.update_backlog_bucket();
    }
}

/// Sets or clears `live_share` at run time (`config.set sinks.NAME.live_share`).
pub struct SetLiveShare(pub Option<f64>);
impl Message for SetLiveShare {
    type Result = ();
}
impl Handler<SetLiveShare> for Dispatcher {
    type Result = ();
    fn handle(&mut self, msg: SetLiveShare, ctx: &mut Context<Self>) {
        tracing::info!(sink = %self.cfg.sink, live_share = ?msg.0, "sink live_share changed");
        self.cfg.live_share = msg.0;
        self.update_backlog_bucket();
        self.step(ctx);
    }
}

/// Sets or clears report-by-exception at run time (`config.set
/// sinks.NAME.reduce`): the windows open under the old settings are sent
/// with the next record.
pub struct SetReduce(pub Option<Reduce>);
impl Message for SetReduce {
    type Result = ();
}
impl Handler<SetReduce> for Dispatcher {
    type Result = ();
    fn handle(&mut self, msg: SetReduce, _: &mut Context<Self>) {
        tracing::info!(sink = %self.cfg.sink, reduce = ?msg.0.as_ref().map(Reduce::to_json), "sink reduction changed");
        if let Some(r) = &mut self.reducer {
            r.set_config(msg.0.clone());
        }
        self.cfg.reduce = msg.0;
    }
}

/// Sets or clears the send windows at run time (`config.set sinks.NAME.windows`).
pub struct SetWindows(pub Option<Windows>);
impl Message for SetWindows {
    type Result = ();
}
impl Handler<SetWindows> for Dispatcher {
    type Result = ();
    fn handle(&mut self, msg: SetWindows, ctx: &mut Context<Self>) {
        tracing::info!(sink = %self.cfg.sink, windows = ?msg.0, "sink send windows changed");
        self.cfg.windows = msg.0;
        self.step(ctx);
    }
}

/// `ranges` without the seqs in `seqs` (sorted).
fn subtract(ranges: &[(u64, u64)], seqs: &[u64]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for &(a, b) in ranges {
        let mut from = a;
        for &s in seqs.iter().filter(|&&s| s >= a && s <= b) {
            if s > from {
                out.push((from, s - 1));
            }
            from = s + 1;
        }
        if from <= b {
            out.push((from, b));
        }
    }
    out
}

/// Sorted seqs as runs of consecutive ones.
fn runs(seqs: &[u64]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &s in seqs {
        match out.last_mut() {
            Some((_, b)) if *b + 1 == s => *b = s,
            _ => out.push((s, s)),
        }
    }
    out
}

/// Asks whether the loop is running (for `/readyz`).
pub struct IsRunning;
impl Message for IsRunning {
    type Result = bool;
}
impl Handler<IsRunning> for Dispatcher {
    type Result = bool;
    fn handle(&mut self, _: IsRunning, _: &mut Context<Self>) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn high_only_splits_a_batch_into_the_high_runs_and_the_rest() {
        assert_eq!(runs(&[3, 4, 5, 9, 11, 12]), vec![(3, 5), (9, 9), (11, 12)]);
        assert_eq!(
            subtract(&[(1, 10), (20, 22)], &[1, 4, 5, 10, 21]),
            vec![(2, 3), (6, 9), (20, 20), (22, 22)]
        );
        assert_eq!(subtract(&[(1, 3)], &[]), vec![(1, 3)]);
    }

    #[test]
    fn backoff_grows_exponentially_with_jitter_and_is_capped() {
        let mut c = DispatchConfig::new("s");
        c.retry_base = Duration::from_millis(100);
        c.retry_max = Duration::from_secs(1);
        for _ in 0..50 {
            let d1 = c.backoff(1);
            assert!(
                d1 >= Duration::from_millis(50) && d1 <= Duration::from_millis(100),
                "{d1:?}"
            );
            let d3 = c.backoff(3);
            assert!(
                d3 >= Duration::from_millis(200) && d3 <= Duration::from_millis(400),
                "{d3:?}"
            );
            let d30 = c.backoff(30);
            assert!(
                d30 >= Duration::from_millis(500) && d30 <= Duration::from_secs(1),
                "{d30:?}"
            );
        }
    }
}
