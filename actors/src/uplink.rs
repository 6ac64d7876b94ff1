//! Per-sink limits on what a sink sends (DESIGN §6b): the byte `budget`, a
//! token bucket on the bytes a sink puts on the wire.
//!
//! The bucket is charged after a batch went out, with the bytes it
//! actually took (after compression), and may go into debt: the dispatcher
//! fetches the next batch only once the debt is paid back. Over any long
//! run the bytes sent stay within `bytes_per_s` × time + `burst_bytes`,
//! whatever the batch sizes, and nothing is estimated in advance. Held
//! records wait in the WAL (`gateway_sink_held_records{reason="budget"}`);
//! a budget never drops one (a TTL still may, counted as always).
//!
//! Lost on restart: the bucket's level (it starts full).

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// `budget = { bytes_per_s = 20000, burst_bytes = 200000 }`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Budget {
    /// Sustained rate, bytes on the wire per second.
    pub bytes_per_s: u64,
    /// What may go at once after a quiet time (default: one second's worth).
    pub burst_bytes: u64,
}

impl Budget {
    /// Parses the key's value (the configuration's TOML as JSON, or a
    /// runtime setting); `null` is no budget.
    pub fn from_value(v: &Value) -> Result<Option<Budget>, String> {
        if v.is_null() {
            return Ok(None);
        }
        let Some(m) = v.as_object() else {
            return Err(format!(
                "expected {{ bytes_per_s = N, burst_bytes = N }} or null, got {v}"
            ));
        };
        if let Some(k) = m
            .keys()
            .find(|k| !["bytes_per_s", "burst_bytes"].contains(&k.as_str()))
        {
            return Err(format!("unknown key {k:?} (bytes_per_s, burst_bytes)"));
        }
        let positive = |k: &str| -> Result<Option<u64>, String> {
            match m.get(k) {
                None => Ok(None),
                Some(x) => match x.as_u64() {
                    Some(n) if n > 0 => Ok(Some(n)),
                    _ => Err(format!("{k}: expected an integer > 0, got {x}")),
                },
            }
        };
        let rate = positive("bytes_per_s")?.ok_or("bytes_per_s is required")?;
        Ok(Some(Budget {
            bytes_per_s: rate,
            burst_bytes: positive("burst_bytes")?.unwrap_or(rate),
        }))
    }
}

/// The bucket of one sink's budget.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    budget: Budget,
    /// Bytes that may go now; negative: the debt of the last batch.
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(budget: Budget, now: Instant) -> Self {
        Self {
            budget,
            tokens: budget.burst_bytes as f64,
            at: now,
        }
    }

    /// The budget.
    pub fn budget(&self) -> Budget {
        self.budget
    }

    /// Changes the budget, keeping the level (capped at the new burst).
    pub fn set_budget(&mut self, budget: Budget, now: Instant) {
        self.refill(now);
        self.budget = budget;
        self.tokens = self.tokens.min(budget.burst_bytes as f64);
    }

    fn refill(&mut self, now: Instant) {
        let secs = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + secs * self.budget.bytes_per_s as f64)
            .min(self.budget.burst_bytes as f64);
        self.at = now;
    }

    /// `bytes` went out.
    pub fn charge(&mut self, bytes: u64, now: Instant) {
        self.refill(now);
        self.tokens -= bytes as f64;
    }

    /// How long the next batch must wait (zero: it may go now).
    pub fn wait(&mut self, now: Instant) -> Duration {
        self.refill(now);
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.budget.bytes_per_s as f64)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_bucket_holds_the_rate_over_time_whatever_the_batch_sizes() {
        let b = Budget::from_value(&json!({"bytes_per_s": 1000, "burst_bytes": 500}))
            .unwrap()
            .unwrap();
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(b, t0);
        let mut now = t0;
        let mut sent = 0u64;
        // Batches of 300 to 2900 bytes, each sent as soon as the bucket allows.
        for i in 0..200u64 {
            now += bucket.wait(now);
            let bytes = 300 + (i * 700) % 2700;
            bucket.charge(bytes, now);
            sent += bytes;
        }
        let secs = now.duration_since(t0).as_secs_f64();
        // Everything but the last batch was paid for: within the rate plus the burst.
        assert!(
            sent as f64 <= 1000.0 * secs + 500.0 + 2900.0,
            "{sent} in {secs}"
        );
        assert!(sent as f64 >= 1000.0 * secs, "{sent} in {secs}");
        assert_eq!(Budget::from_value(&Value::Null).unwrap(), None);
        assert!(Budget::from_value(&json!({"bytes_per_s": 0})).is_err());
        assert!(Budget::from_value(&json!({"rate": 5})).is_err());
        assert_eq!(
            Budget::from_value(&json!({"bytes_per_s": 7}))
                .unwrap()
                .unwrap()
                .burst_bytes,
            7
        );
    }
}
