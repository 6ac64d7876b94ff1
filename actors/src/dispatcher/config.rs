//! A sink's delivery settings: the `[sinks.NAME]` keys every sink kind
//! shares ([`DispatchKeys`]), validated into [`DispatchConfig`] with its
//! defaults and the backoff it derives. Kept apart from the loop so that a
//! config layer can read and check them without the actor.

use std::time::Duration;

use crate::backoff::Backoff;
use crate::reduce::Reduce;
use crate::uplink::{Budget, Quota, Windows};

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
        Backoff {
            base: self.retry_base,
            max: self.retry_max,
        }
        .delay(attempt)
    }

    /// The wait before an open circuit lets one probe through: the
    /// cooldown with the same jitter (half fixed, half random).
    pub(super) fn circuit_probe_delay(&self) -> Duration {
        Backoff {
            base: self.circuit_cooldown,
            max: self.circuit_cooldown,
        }
        .delay(1)
    }

    pub(super) fn idle_poll(&self) -> Duration {
        (self.batch_max_wait / 2).clamp(Duration::from_millis(5), Duration::from_millis(100))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
