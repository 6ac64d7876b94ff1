//! Per-sink limits on what a sink sends (DESIGN §6b): the byte `budget`, a
//! token bucket on the bytes a sink puts on the wire, and the `quota`,
//! bytes per period.
//!
//! Quota: `quota = { bytes = "2GiB", period = "30d", reserve_high = "10%" }`.
//! Records of class normal and low may use `bytes - reserve_high`; once
//! that is spent only `high` flows, from the reserve, until `bytes` is spent
//! too; then nothing until the next period. A period starts at 00:00 UTC of
//! its first day and the next one `period` later. What was spent is kept in
//! `{data_dir}/quota-{sink}.json`, written (fsync, rename) after every
//! delivered batch, so it survives restarts and crashes (a crash between a
//! delivery and its write under-counts that one batch). A batch fetched
//! before the quota ran out still goes: the quota stops normal and low
//! within one batch.
//!
//! The bucket is charged after a batch went out, with the bytes it
//! actually took (after compression), and may go into debt: the dispatcher
//! fetches the next batch only once the debt is paid back. Over any long
//! run the bytes sent stay within `bytes_per_s` × time + `burst_bytes`,
//! whatever the batch sizes, and nothing is estimated in advance. Held
//! records wait in the WAL (`gateway_sink_held_records{reason="budget"}`);
//! a budget never drops one (a TTL still may, counted as always).
//!
//! Windows: `windows = { low = ["01:00-05:00"] }` lets a class go only
//! inside its local-time windows (a window may wrap past midnight); a class
//! without windows goes at any time. Outside, its records wait in the WAL
//! (`gateway_sink_held_records{reason="window"}`) while the other classes go.
//!
//! Lost on restart: the bucket's level (it starts full).

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::route::Class;

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

/// `quota = { bytes, period, reserve_high }`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quota {
    /// Bytes on the wire per period.
    pub bytes: u64,
    /// The period, seconds (default 30 days).
    pub period_s: u64,
    /// Bytes of `bytes` only `high` records may use (default 10 %).
    pub reserve_high: u64,
}

/// `123`, `"123"`, `"500KB"`, `"2GiB"`, … as bytes.
fn parse_bytes(v: &Value) -> Result<u64, String> {
    if let Some(n) = v.as_u64() {
        return Ok(n);
    }
    let s = v
        .as_str()
        .ok_or_else(|| format!("expected bytes, got {v}"))?
        .trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let num: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 500MB or 2GiB"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        _ => return Err(format!("{s:?} is not a size like 500MB or 2GiB")),
    };
    Ok((num * mult as f64) as u64)
}

impl Quota {
    /// Parses the key's value; `null` is no quota.
    pub fn from_value(v: &Value) -> Result<Option<Quota>, String> {
        if v.is_null() {
            return Ok(None);
        }
        let Some(m) = v.as_object() else {
            return Err(format!(
                "expected {{ bytes = \"2GiB\", period = \"30d\", reserve_high = \"10%\" }} or null, got {v}"
            ));
        };
        if let Some(k) = m
            .keys()
            .find(|k| !["bytes", "period", "reserve_high"].contains(&k.as_str()))
        {
            return Err(format!("unknown key {k:?} (bytes, period, reserve_high)"));
        }
        let bytes = parse_bytes(m.get("bytes").ok_or("bytes is required")?)
            .map_err(|e| format!("bytes: {e}"))?;
        if bytes == 0 {
            return Err("bytes: must be > 0".into());
        }
        let period = match m.get("period") {
            None => Duration::from_secs(30 * 86_400),
            Some(p) => {
                let text = p
                    .as_str()
                    .ok_or_else(|| format!("period: expected a duration like \"30d\", got {p}"))?;
                humantime::parse_duration(text).map_err(|e| format!("period: {text:?}: {e}"))?
            }
        };
        if period < Duration::from_secs(1) {
            return Err("period: must be at least 1s".into());
        }
        let reserve_high = match m.get("reserve_high") {
            None => bytes / 10,
            Some(Value::String(p)) if p.trim().ends_with('%') => {
                let pct: f64 =
                    p.trim().trim_end_matches('%').trim().parse().map_err(|_| {
                        format!("reserve_high: {p:?} is not a percentage like \"10%\"")
                    })?;
                if !(0.0..=100.0).contains(&pct) {
                    return Err("reserve_high: must be 0% to 100%".into());
                }
                (bytes as f64 * pct / 100.0) as u64
            }
            Some(r) => parse_bytes(r).map_err(|e| format!("reserve_high: {e}"))?,
        };
        if reserve_high > bytes {
            return Err("reserve_high: must not exceed bytes".into());
        }
        Ok(Some(Quota {
            bytes,
            period_s: period.as_secs(),
            reserve_high,
        }))
    }
}

/// What a sink spent of its quota (the persisted part).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct QuotaSpent {
    /// Start of the current period, epoch ms (00:00 UTC of its first day).
    pub period_start_ms: i64,
    /// Bytes sent in it.
    pub spent_bytes: u64,
}

/// What may go now under a quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allowance {
    /// Every class.
    All,
    /// Only `high` (the reserve).
    HighOnly,
    /// Nothing until the period ends.
    Nothing,
}

impl QuotaSpent {
    /// The file in `dir` for `sink`.
    pub fn path(dir: &Path, sink: &str) -> PathBuf {
        dir.join(format!("quota-{sink}.json"))
    }

    /// Reads the sink's spent quota; a missing file is nothing spent.
    pub fn load(dir: &Path, sink: &str) -> Result<Self, String> {
        let path = Self::path(dir, sink);
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| format!("{}: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(format!("cannot read {}: {e}", path.display())),
        }
    }

    /// Writes it durably (temp file, fsync, rename, fsync of the directory).
    pub fn save(&self, dir: &Path, sink: &str) -> Result<(), String> {
        let path = Self::path(dir, sink);
        let tmp = dir.join(format!("quota-{sink}.json.tmp"));
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&serde_json::to_vec(self).unwrap_or_default())?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            crate::durable::sync_dir(dir)
        };
        write().map_err(|e| format!("cannot write {}: {e}", path.display()))
    }

    /// Moves to the period that holds `now_ms` (a new one spends nothing yet).
    pub fn roll(&mut self, q: &Quota, now_ms: i64) {
        let period_ms = (q.period_s as i64).saturating_mul(1000).max(1000);
        if self.period_start_ms == 0 || now_ms < self.period_start_ms {
            // The first period starts at 00:00 UTC of today.
            *self = QuotaSpent {
                period_start_ms: now_ms - now_ms.rem_euclid(86_400_000),
                spent_bytes: 0,
            };
        }
        let elapsed = now_ms - self.period_start_ms;
        if elapsed >= period_ms {
            self.period_start_ms += elapsed / period_ms * period_ms;
            self.spent_bytes = 0;
        }
    }

    /// What may go now.
    pub fn allowance(&self, q: &Quota) -> Allowance {
        if self.spent_bytes >= q.bytes {
            Allowance::Nothing
        } else if self.spent_bytes >= q.bytes - q.reserve_high {
            Allowance::HighOnly
        } else {
            Allowance::All
        }
    }

    /// When the current period ends, epoch ms.
    pub fn period_end_ms(&self, q: &Quota) -> i64 {
        self.period_start_ms + (q.period_s as i64).saturating_mul(1000)
    }
}

/// Per class, the local-time windows it may be sent in, as minutes of the
/// day `[start, end)`; `end <= start` wraps past midnight.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Windows(BTreeMap<Class, Vec<(u16, u16)>>);

fn parse_hhmm(t: &str) -> Option<u16> {
    let (h, m) = t.trim().split_once(':')?;
    let (h, m): (u16, u16) = (h.parse().ok()?, m.parse().ok()?);
    (h <= 24 && m < 60 && h * 60 + m <= 1440).then_some(h * 60 + m)
}

impl Windows {
    /// Parses `{ class = ["HH:MM-HH:MM", …] }`; `null` is no windows.
    pub fn from_value(v: &Value) -> Result<Option<Windows>, String> {
        if v.is_null() {
            return Ok(None);
        }
        let Some(m) = v.as_object() else {
            return Err(format!(
                "expected {{ low = [\"01:00-05:00\"] }} or null, got {v}"
            ));
        };
        let mut out = BTreeMap::new();
        for (class, list) in m {
            let c: Class = serde_json::from_value(Value::String(class.clone()))
                .map_err(|_| format!("{class}: not a class; expected high, normal or low"))?;
            let Some(list) = list.as_array() else {
                return Err(format!("{class}: expected a list like [\"01:00-05:00\"]"));
            };
            let mut ws = Vec::new();
            for w in list {
                let text = w.as_str().unwrap_or_default();
                let parsed = text
                    .split_once('-')
                    .and_then(|(a, b)| Some((parse_hhmm(a)?, parse_hhmm(b)?)));
                match parsed {
                    Some((a, b)) if a != b => ws.push((a, b)),
                    _ => return Err(format!("{class}: {w} is not a window like \"01:00-05:00\"")),
                }
            }
            out.insert(c, ws);
        }
        Ok(Some(Windows(out)))
    }

    /// Whether `class` may go at `minute` of the local day.
    pub fn allows(&self, class: Class, minute: u16) -> bool {
        match self.0.get(&class) {
            None => true,
            Some(ws) => ws.iter().any(|&(a, b)| {
                if a < b {
                    (a..b).contains(&minute)
                } else {
                    minute >= a || minute < b
                }
            }),
        }
    }

    /// As written in the configuration.
    pub fn to_json(&self) -> Value {
        let fmt = |m: u16| format!("{:02}:{:02}", m / 60, m % 60);
        Value::Object(
            self.0
                .iter()
                .map(|(c, ws)| {
                    let list = ws
                        .iter()
                        .map(|&(a, b)| Value::String(format!("{}-{}", fmt(a), fmt(b))));
                    (c.as_str().to_string(), Value::Array(list.collect()))
                })
                .collect(),
        )
    }
}

/// The minute of the local day now.
pub fn local_minute() -> u16 {
    use chrono::Timelike;
    let t = chrono::Local::now();
    (t.hour() * 60 + t.minute()) as u16
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

    #[test]
    fn windows_let_a_class_go_only_inside_them_and_may_wrap_past_midnight() {
        let w = Windows::from_value(&json!({"low": ["22:00-02:00", "12:00-12:30"]}))
            .unwrap()
            .unwrap();
        assert!(w.allows(Class::Low, 23 * 60));
        assert!(w.allows(Class::Low, 60));
        assert!(!w.allows(Class::Low, 2 * 60));
        assert!(w.allows(Class::Low, 12 * 60 + 29));
        assert!(!w.allows(Class::Low, 12 * 60 + 30));
        assert!(w.allows(Class::Normal, 2 * 60), "no windows: any time");
        assert_eq!(w.to_json(), json!({"low": ["22:00-02:00", "12:00-12:30"]}));
        for bad in [
            json!({"low": ["25:00-01:00"]}),
            json!({"urgent": []}),
            json!({"low": "01:00-02:00"}),
            json!({"low": ["01:00-01:00"]}),
        ] {
            assert!(Windows::from_value(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_quota_lets_everything_then_only_high_then_nothing_and_rolls_at_period_boundaries() {
        let q = Quota::from_value(&json!({"bytes": "1MB", "period": "1d", "reserve_high": "10%"}))
            .unwrap()
            .unwrap();
        assert_eq!(
            (q.bytes, q.period_s, q.reserve_high),
            (1_000_000, 86_400, 100_000)
        );
        let day = 86_400_000i64;
        let noon = 20_000 * day + day / 2;
        let mut s = QuotaSpent::default();
        s.roll(&q, noon);
        assert_eq!(
            s.period_start_ms,
            20_000 * day,
            "00:00 UTC of the first day"
        );
        assert_eq!(s.allowance(&q), Allowance::All);
        s.spent_bytes = 900_000;
        assert_eq!(s.allowance(&q), Allowance::HighOnly);
        s.spent_bytes = 1_000_000;
        assert_eq!(s.allowance(&q), Allowance::Nothing);
        s.roll(&q, noon + day / 4);
        assert_eq!(s.allowance(&q), Allowance::Nothing);
        s.roll(&q, noon + 3 * day);
        assert_eq!((s.period_start_ms, s.spent_bytes), (20_003 * day, 0));
        let dir = tempfile::tempdir().unwrap();
        s.spent_bytes = 42;
        s.save(dir.path(), "cloud").unwrap();
        assert_eq!(QuotaSpent::load(dir.path(), "cloud").unwrap(), s);
        assert_eq!(
            QuotaSpent::load(dir.path(), "other").unwrap(),
            QuotaSpent::default()
        );
        for bad in [
            json!({"bytes": 0}),
            json!({"bytes": "1XB"}),
            json!({"bytes": 10, "reserve_high": 11}),
            json!({"period": "1d"}),
        ] {
            assert!(Quota::from_value(&bad).is_err(), "{bad}");
        }
        assert_eq!(
            Quota::from_value(&json!({"bytes": "2GiB"}))
                .unwrap()
                .unwrap()
                .bytes,
            2 << 30
        );
    }
}
