//! Repeated log events are rate-limited, so that one broken device (or a
//! sink that stays down) cannot flood the edge host's log.
//!
//! An event has a *kind* (`ingest.rejected`, `sink.retry`, …) and a *key*
//! inside it (a device and reason, a sink). Per key, the first `burst`
//! events of an interval are logged in full; the rest are only counted, and
//! when the key's interval ends one summary line says how many were
//! suppressed. Per kind, at most `burst × 20` events are logged in full per
//! interval across all keys, so a flood that changes its key every time
//! (a new device id per message) is bounded too; what that budget refuses
//! is summed in one summary line with key `*`.
//!
//! Lines per interval and kind are therefore at most `burst × 20` full
//! lines plus 21 summaries, whatever the traffic, while a key seen for the
//! first time is still logged at once (unless that kind's budget is spent).
//! Metrics are not touched here: callers count every event before they ask
//! [`admit`].
//!
//! Summaries are written by whichever comes first: the next event of the
//! same key after its interval, or a background thread that looks once a
//! second (so the last summary of a flood that stopped is not lost).
//!
//! Settings: `log.repeat_burst` and `log.repeat_interval` ([`configure`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// What kind of event repeats. Its name is the summary's `kind`; its
/// level is the level of its full lines, and so of its summary (a level
/// that hides the lines hides their summaries too).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// A refused record (`telemetry rejected`), keyed by device and reason.
    IngestRejected,
    /// Ingest held back because the WAL refuses appends, keyed by protocol.
    IngestUnavailable,
    /// A failed publish that will be retried, keyed by sink.
    SinkRetry,
    /// A dead-lettered batch, keyed by sink.
    SinkDead,
    /// A delivered batch whose ack could not be persisted yet, keyed by sink.
    SinkAck,
    /// A batch that could not be fetched from the WAL, keyed by sink.
    SinkFetch,
    /// An MQTT connection lost or refused, keyed by connection.
    MqttReconnect,
    /// A WAL group commit that failed (a full disk, say).
    WalCommit,
    /// Backpressure switched on or off.
    WalBackpressure,
}

impl Kind {
    /// The name in summaries.
    pub fn name(self) -> &'static str {
        match self {
            Kind::IngestRejected => "ingest.rejected",
            Kind::IngestUnavailable => "ingest.unavailable",
            Kind::SinkRetry => "sink.retry",
            Kind::SinkDead => "sink.dead",
            Kind::SinkAck => "sink.ack",
            Kind::SinkFetch => "sink.fetch",
            Kind::MqttReconnect => "mqtt.reconnect",
            Kind::WalCommit => "wal.commit",
            Kind::WalBackpressure => "wal.backpressure",
        }
    }

    fn level(self) -> tracing::Level {
        match self {
            Kind::IngestRejected => tracing::Level::INFO,
            Kind::SinkDead | Kind::WalCommit => tracing::Level::ERROR,
            _ => tracing::Level::WARN,
        }
    }
}

/// Default full lines per key and interval.
pub const DEFAULT_BURST: u32 = 5;
/// Default interval.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(60);
/// A kind's budget of full lines per interval, in bursts.
const KIND_BUDGET_BURSTS: u64 = 20;

/// One summary line: `suppressed` events of `kind`/`key` were not logged in
/// the interval that just ended. `key` is `*` for the kind's budget.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// The event kind.
    pub kind: Kind,
    /// The key inside the kind, or `*`.
    pub key: String,
    /// Events not logged.
    pub suppressed: u64,
}

#[derive(Debug)]
struct Window {
    start: Instant,
    logged: u64,
    suppressed: u64,
}

impl Window {
    fn new(now: Instant) -> Self {
        Self {
            start: now,
            logged: 0,
            suppressed: 0,
        }
    }
}

/// The limiter's state. [`admit`] uses one process-wide instance; tests
/// drive their own with an explicit clock.
#[derive(Debug, Default)]
pub struct Repeats {
    keys: HashMap<(Kind, String), Window>,
    kinds: HashMap<Kind, Window>,
}

impl Repeats {
    /// Whether an event of `kind`/`key` at `now` is logged in full, with
    /// `burst` lines per key and `interval`. Windows that ended are closed
    /// first, their summaries pushed to `out`.
    pub fn admit_at(
        &mut self,
        kind: Kind,
        key: &str,
        now: Instant,
        burst: u32,
        interval: Duration,
        out: &mut Vec<Summary>,
    ) -> bool {
        let burst = u64::from(burst.max(1));
        let id = (kind, key.to_string());
        if let Some(w) = self.keys.get(&id) {
            if now.duration_since(w.start) >= interval {
                let w = self.keys.remove(&id).expect("present");
                push_summary(out, kind, key, w.suppressed);
            }
        }
        let k = self.kinds.entry(kind).or_insert_with(|| Window::new(now));
        if now.duration_since(k.start) >= interval {
            push_summary(out, kind, "*", k.suppressed);
            *k = Window::new(now);
        }
        if let Some(w) = self.keys.get_mut(&id) {
            if w.logged >= burst {
                w.suppressed += 1;
                return false;
            }
        }
        // A key's full lines also come out of its kind's budget, and only a
        // line that is logged creates a key: the map holds at most the
        // budget's worth of keys per kind.
        if k.logged >= burst * KIND_BUDGET_BURSTS {
            k.suppressed += 1;
            return false;
        }
        k.logged += 1;
        self.keys
            .entry(id)
            .or_insert_with(|| Window::new(now))
            .logged += 1;
        true
    }

    /// Closes every window that ended by `now`; their summaries go to `out`.
    pub fn flush_at(&mut self, now: Instant, interval: Duration, out: &mut Vec<Summary>) {
        self.keys.retain(|(kind, key), w| {
            let open = now.duration_since(w.start) < interval;
            if !open {
                push_summary(out, *kind, key, w.suppressed);
            }
            open
        });
        self.kinds.retain(|kind, w| {
            let open = now.duration_since(w.start) < interval;
            if !open {
                push_summary(out, *kind, "*", w.suppressed);
            }
            open
        });
    }
}

fn push_summary(out: &mut Vec<Summary>, kind: Kind, key: &str, suppressed: u64) {
    if suppressed > 0 {
        out.push(Summary {
            kind,
            key: key.to_string(),
            suppressed,
        });
    }
}

static BURST: AtomicU32 = AtomicU32::new(DEFAULT_BURST);
static INTERVAL_MS: AtomicU64 = AtomicU64::new(DEFAULT_INTERVAL.as_millis() as u64);

/// Sets the process-wide burst and interval (`log.repeat_burst`,
/// `log.repeat_interval`). Called once at start-up.
pub fn configure(burst: u32, interval: Duration) {
    BURST.store(burst.max(1), Ordering::Relaxed);
    INTERVAL_MS.store(interval.as_millis().max(1) as u64, Ordering::Relaxed);
}

fn interval() -> Duration {
    Duration::from_millis(INTERVAL_MS.load(Ordering::Relaxed))
}

fn global() -> &'static Mutex<Repeats> {
    static STATE: OnceLock<Mutex<Repeats>> = OnceLock::new();
    STATE.get_or_init(|| {
        // The flusher writes the summaries of keys that went quiet.
        let spawned = std::thread::Builder::new()
            .name("log-repeats".into())
            .spawn(|| loop {
                std::thread::sleep(Duration::from_secs(1).min(interval()));
                let mut out = Vec::new();
                if let Ok(mut r) = global().lock() {
                    r.flush_at(Instant::now(), interval(), &mut out);
                }
                emit(&out);
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the log-repeats thread; summaries come with the next event only");
        }
        Mutex::new(Repeats::default())
    })
}

/// Whether this event of `kind`/`key` should be logged in full now. Call
/// it right before the log line (after counting the event), and log only
/// when it says so.
pub fn admit(kind: Kind, key: &str) -> bool {
    let mut out = Vec::new();
    let admitted = match global().lock() {
        Ok(mut r) => r.admit_at(
            kind,
            key,
            Instant::now(),
            BURST.load(Ordering::Relaxed),
            interval(),
            &mut out,
        ),
        Err(_) => true,
    };
    emit(&out);
    admitted
}

fn emit(summaries: &[Summary]) {
    let interval_s = interval().as_secs_f64();
    for s in summaries {
        let (kind, key, suppressed) = (s.kind.name(), s.key.as_str(), s.suppressed);
        let msg = "repeated log lines suppressed";
        match s.kind.level() {
            tracing::Level::ERROR => {
                tracing::error!(kind, key, suppressed, interval_s, "{msg}")
            }
            tracing::Level::WARN => tracing::warn!(kind, key, suppressed, interval_s, "{msg}"),
            _ => tracing::info!(kind, key, suppressed, interval_s, "{msg}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(60);

    fn flood(r: &mut Repeats, kind: Kind, key: &str, n: usize, now: Instant) -> usize {
        let mut out = Vec::new();
        let logged = (0..n)
            .filter(|_| r.admit_at(kind, key, now, 5, MIN, &mut out))
            .count();
        assert!(out.is_empty(), "{out:?}");
        logged
    }

    #[test]
    fn a_flood_from_one_key_logs_a_burst_then_one_summary_and_another_key_still_logs_at_once() {
        let mut r = Repeats::default();
        let t0 = Instant::now();
        assert_eq!(
            flood(
                &mut r,
                Kind::IngestRejected,
                "dev-a/invalid_json",
                10_000,
                t0
            ),
            5
        );
        assert_eq!(
            flood(&mut r, Kind::IngestRejected, "dev-b/invalid_json", 1, t0),
            1
        );

        let mut out = Vec::new();
        r.flush_at(t0 + MIN / 2, MIN, &mut out);
        assert!(
            out.is_empty(),
            "no summary before the interval ends: {out:?}"
        );
        r.flush_at(t0 + MIN, MIN, &mut out);
        assert_eq!(
            out,
            vec![Summary {
                kind: Kind::IngestRejected,
                key: "dev-a/invalid_json".into(),
                suppressed: 9_995
            }]
        );
        // The next interval starts with a fresh burst.
        assert_eq!(
            flood(
                &mut r,
                Kind::IngestRejected,
                "dev-a/invalid_json",
                100,
                t0 + MIN
            ),
            5
        );
    }

    #[test]
    fn the_summary_comes_with_the_next_event_when_nobody_flushed() {
        let mut r = Repeats::default();
        let t0 = Instant::now();
        flood(&mut r, Kind::SinkRetry, "cloud", 7, t0);
        let mut out = Vec::new();
        assert!(r.admit_at(Kind::SinkRetry, "cloud", t0 + MIN, 5, MIN, &mut out));
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].suppressed, 2);
    }

    #[test]
    fn a_flood_with_a_new_key_every_time_is_bounded_by_the_kind_budget() {
        let mut r = Repeats::default();
        let t0 = Instant::now();
        let mut out = Vec::new();
        let logged = (0..50_000)
            .filter(|i| {
                r.admit_at(
                    Kind::IngestRejected,
                    &format!("dev-{i}"),
                    t0,
                    5,
                    MIN,
                    &mut out,
                )
            })
            .count();
        assert_eq!(logged, 100);
        assert!(r.keys.len() <= 100, "keys tracked: {}", r.keys.len());
        // Other kinds have budgets of their own.
        assert!(r.admit_at(Kind::SinkRetry, "s3", t0, 5, MIN, &mut out));
        r.flush_at(t0 + MIN, MIN, &mut out);
        assert_eq!(
            out,
            vec![Summary {
                kind: Kind::IngestRejected,
                key: "*".into(),
                suppressed: 49_900
            }]
        );
        assert!(r.keys.is_empty() && r.kinds.is_empty());
    }
}
