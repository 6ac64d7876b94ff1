//! Runtime settings changed by operators (`config.set`), persisted in the
//! data dir as `runtime.json` and re-applied over the configuration at every
//! start.
//!
//! Only settings that are safe to change while running live here: the log
//! level, the per-device rate limit, the priority rules, and per sink
//! `paused`, the retry settings, the route, the TTLs and the drain order.
//! Keys are the configuration file's own (`log.level`,
//! `ingest.rate_limit_per_device`, `priority`, `sinks.NAME.paused`,
//! `sinks.NAME.route`, …). Routes and priority rules apply to records
//! stored after the change.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::dispatcher::DispatchConfig;
use crate::ingest::RateLimit;
use crate::route::{parse_priority, PriorityRule, Routing, SinkPolicy};

/// The file name in the data dir.
pub const RUNTIME_FILE: &str = "runtime.json";

/// Per-sink runtime settings.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SinkOverrides {
    /// Delivery paused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused: Option<bool>,
    /// Attempts per batch before Dead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_budget: Option<u32>,
    /// First backoff delay, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_base_ms: Option<u64>,
    /// Largest backoff delay, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_max_ms: Option<u64>,
    /// The byte budget as set (`null`: cleared; absent: as configured).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<Value>,
    /// The quota as set (`null`: cleared; absent: as configured).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota: Option<Value>,
    /// The send windows as set (`null`: cleared; absent: as configured).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub windows: Option<Value>,
    /// `live_share` as set (`null`: cleared; absent: as configured).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live_share: Option<Value>,
    /// Report-by-exception as set (`null`: cleared; absent: as configured).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reduce: Option<Value>,
    /// `route`, `ttl`, `drain`, `live_after` as set (validated JSON values;
    /// `null` clears a route or the TTLs).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub policy: BTreeMap<String, Value>,
}

/// Everything set at run time; `None` = the configuration's value.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RuntimeOverrides {
    /// `log.level`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_level: Option<String>,
    /// `ingest.rate_limit_per_device`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit_per_device: Option<f64>,
    /// `ingest.rate_limit_burst`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit_burst: Option<f64>,
    /// `priority` (the whole list).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<Vec<PriorityRule>>,
    /// `sinks.NAME.*`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub sinks: BTreeMap<String, SinkOverrides>,
}

/// One validated `config.set` entry.
#[derive(Debug, Clone, PartialEq)]
pub enum Setting {
    /// `log.level`.
    LogLevel(String),
    /// `ingest.rate_limit_per_device`.
    RatePerDevice(f64),
    /// `ingest.rate_limit_burst`.
    RateBurst(f64),
    /// `sinks.NAME.paused`.
    Paused(String, bool),
    /// `sinks.NAME.retry_budget`.
    RetryBudget(String, u32),
    /// `sinks.NAME.retry_base_ms`.
    RetryBase(String, u64),
    /// `sinks.NAME.retry_max_ms`.
    RetryMax(String, u64),
    /// `sinks.NAME.budget` (validated; `None` clears it).
    Budget(String, Option<crate::uplink::Budget>),
    /// `sinks.NAME.quota` (validated; `None` clears it).
    Quota(String, Option<crate::uplink::Quota>),
    /// `sinks.NAME.windows` (validated; `None` clears them).
    Windows(String, Option<crate::uplink::Windows>),
    /// `sinks.NAME.live_share` (above 0 and below 1; `None` clears it).
    LiveShare(String, Option<f64>),
    /// `sinks.NAME.reduce` (validated; `None` clears it).
    Reduce(String, Option<crate::reduce::Reduce>),
    /// `sinks.NAME.route|ttl|drain|live_after` (validated).
    Policy(String, String, Value),
    /// `priority`.
    Priority(Vec<PriorityRule>),
}

/// The keys `config.set` takes.
pub const SETTABLE_KEYS: &str =
    "log.level, ingest.rate_limit_per_device, ingest.rate_limit_burst, priority, \
    sinks.NAME.paused, sinks.NAME.retry_budget, sinks.NAME.retry_base_ms, sinks.NAME.retry_max_ms, \
    sinks.NAME.route, sinks.NAME.ttl, sinks.NAME.drain, sinks.NAME.live_after, sinks.NAME.budget, sinks.NAME.quota, sinks.NAME.windows, sinks.NAME.live_share, sinks.NAME.reduce";

impl Setting {
    /// Parses `key = value`; `sinks` are the configured sink names.
    pub fn parse(key: &str, value: &Value, sinks: &[String]) -> Result<Setting, String> {
        let num = |min: f64| -> Result<f64, String> {
            match value.as_f64() {
                Some(v) if v.is_finite() && v >= min => Ok(v),
                _ => Err(format!("{key}: expected a number >= {min}, got {value}")),
            }
        };
        let int = |min: u64| -> Result<u64, String> {
            match value.as_u64() {
                Some(v) if v >= min => Ok(v),
                _ => Err(format!("{key}: expected an integer >= {min}, got {value}")),
            }
        };
        match key {
            "log.level" => match value.as_str() {
                Some(s) if !s.trim().is_empty() => Ok(Setting::LogLevel(s.trim().to_string())),
                _ => Err(format!(
                    "{key}: expected a level or filter directive string"
                )),
            },
            "ingest.rate_limit_per_device" => Ok(Setting::RatePerDevice(num(0.0)?)),
            "ingest.rate_limit_burst" => Ok(Setting::RateBurst(num(0.0)?)),
            "priority" => Ok(Setting::Priority(parse_priority(key, value)?)),
            _ => {
                let parts: Vec<&str> = key.splitn(3, '.').collect();
                let [root, sink, field] = parts[..] else {
                    return Err(format!(
                        "unknown setting {key:?}; settable: {SETTABLE_KEYS}"
                    ));
                };
                if root != "sinks" {
                    return Err(format!(
                        "unknown setting {key:?}; settable: {SETTABLE_KEYS}"
                    ));
                }
                if !sinks.iter().any(|s| s == sink) {
                    return Err(format!("{key}: no sink named {sink:?} is configured"));
                }
                let sink = sink.to_string();
                match field {
                    "paused" => match value.as_bool() {
                        Some(b) => Ok(Setting::Paused(sink, b)),
                        None => Err(format!("{key}: expected true or false, got {value}")),
                    },
                    "retry_budget" => Ok(Setting::RetryBudget(
                        sink,
                        int(1)?.min(u32::MAX as u64) as u32,
                    )),
                    "retry_base_ms" => Ok(Setting::RetryBase(sink, int(1)?)),
                    "retry_max_ms" => Ok(Setting::RetryMax(sink, int(1)?)),
                    "budget" => crate::uplink::Budget::from_value(value)
                        .map(|b| Setting::Budget(sink, b))
                        .map_err(|e| format!("{key}: {e}")),
                    "live_share" => match value.as_f64() {
                        None if value.is_null() => Ok(Setting::LiveShare(sink, None)),
                        Some(v) if v > 0.0 && v < 1.0 => Ok(Setting::LiveShare(sink, Some(v))),
                        _ => Err(format!(
                            "{key}: expected a number above 0 and below 1, or null, got {value}"
                        )),
                    },
                    "windows" => crate::uplink::Windows::from_value(value)
                        .map(|w| Setting::Windows(sink, w))
                        .map_err(|e| format!("{key}: {e}")),
                    "reduce" => crate::reduce::Reduce::from_value(value)
                        .map(|r| Setting::Reduce(sink, r))
                        .map_err(|e| format!("{key}: {e}")),
                    "quota" => crate::uplink::Quota::from_value(value)
                        .map(|q| Setting::Quota(sink, q))
                        .map_err(|e| format!("{key}: {e}")),
                    f if SinkPolicy::KEYS.contains(&f) => {
                        SinkPolicy::new()
                            .set(f, value)
                            .map_err(|e| format!("sinks.{sink}.{}: {}", e.key, e.message))?;
                        Ok(Setting::Policy(sink, f.to_string(), value.clone()))
                    }
                    _ => Err(format!(
                        "unknown setting {key:?}; settable: {SETTABLE_KEYS}"
                    )),
                }
            }
        }
    }
}

impl RuntimeOverrides {
    /// The file in `data_dir`.
    pub fn path(data_dir: &Path) -> PathBuf {
        data_dir.join(RUNTIME_FILE)
    }

    /// Reads `data_dir/runtime.json`; a missing file is no overrides.
    pub fn load(data_dir: &Path) -> Result<Self, String> {
        let path = Self::path(data_dir);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| format!("{}: not valid runtime settings: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(format!("cannot read {}: {e}", path.display())),
        }
    }

    /// Writes `data_dir/runtime.json` atomically and durably (temp file,
    /// fsync, rename, fsync of the directory).
    pub fn save(&self, data_dir: &Path) -> Result<(), String> {
        let path = Self::path(data_dir);
        let tmp = data_dir.join(format!("{RUNTIME_FILE}.tmp"));
        let text = serde_json::to_vec_pretty(self).map_err(|e| e.to_string())?;
        let write = || -> std::io::Result<()> {
            crate::durable::create_dir_all(data_dir)?;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&text)?;
            f.write_all(b"\n")?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            crate::durable::sync_dir(data_dir)
        };
        write().map_err(|e| format!("cannot write {}: {e}", path.display()))
    }

    /// Records `s`.
    pub fn set(&mut self, s: &Setting) {
        match s {
            Setting::LogLevel(l) => self.log_level = Some(l.clone()),
            Setting::RatePerDevice(v) => self.rate_limit_per_device = Some(*v),
            Setting::RateBurst(v) => self.rate_limit_burst = Some(*v),
            Setting::Paused(sink, b) => {
                self.sinks.entry(sink.clone()).or_default().paused = Some(*b)
            }
            Setting::RetryBudget(sink, v) => {
                self.sinks.entry(sink.clone()).or_default().retry_budget = Some(*v)
            }
            Setting::RetryBase(sink, v) => {
                self.sinks.entry(sink.clone()).or_default().retry_base_ms = Some(*v)
            }
            Setting::RetryMax(sink, v) => {
                self.sinks.entry(sink.clone()).or_default().retry_max_ms = Some(*v)
            }
            Setting::Budget(sink, b) => {
                self.sinks.entry(sink.clone()).or_default().budget =
                    Some(serde_json::to_value(b).unwrap_or_default())
            }
            Setting::LiveShare(sink, v) => {
                self.sinks.entry(sink.clone()).or_default().live_share =
                    Some(v.map_or(Value::Null, Value::from))
            }
            Setting::Reduce(sink, r) => {
                self.sinks.entry(sink.clone()).or_default().reduce = Some(
                    r.as_ref()
                        .map_or(Value::Null, crate::reduce::Reduce::to_json),
                )
            }
            Setting::Windows(sink, w) => {
                self.sinks.entry(sink.clone()).or_default().windows = Some(
                    w.as_ref()
                        .map_or(Value::Null, crate::uplink::Windows::to_json),
                )
            }
            Setting::Quota(sink, q) => {
                // Stored as parsed: whole bytes and seconds.
                self.sinks.entry(sink.clone()).or_default().quota = Some(match q {
                    Some(q) => serde_json::json!({
                        "bytes": q.bytes,
                        "period": format!("{}s", q.period_s),
                        "reserve_high": q.reserve_high,
                    }),
                    None => Value::Null,
                })
            }
            Setting::Policy(sink, key, v) => {
                self.sinks
                    .entry(sink.clone())
                    .or_default()
                    .policy
                    .insert(key.clone(), v.clone());
            }
            Setting::Priority(rules) => self.priority = Some(rules.clone()),
        }
    }

    /// The sink's policy in force: `base` with the overrides applied.
    pub fn policy(&self, sink: &str, base: &SinkPolicy) -> SinkPolicy {
        let mut p = base.clone();
        if let Some(o) = self.sinks.get(sink) {
            for (k, v) in &o.policy {
                // Validated when set; a hand-edited file that breaks one is
                // reported and that key left as configured.
                if let Err(e) = p.set(k, v) {
                    tracing::warn!(sink, key = %k, error = %e.message, "ignoring a runtime setting");
                }
            }
        }
        p
    }

    /// The routes and priority rules in force. `base` holds every sink's
    /// configured policy, `bits` every sink's bit (`Wal::sink_bits`).
    pub fn routing(
        &self,
        base_priority: &[PriorityRule],
        base: &BTreeMap<String, SinkPolicy>,
        bits: &BTreeMap<String, u64>,
    ) -> Routing {
        Routing {
            priority: self
                .priority
                .clone()
                .unwrap_or_else(|| base_priority.to_vec()),
            sinks: base
                .iter()
                .map(|(name, p)| {
                    let bit = bits.get(name).copied().unwrap_or(0);
                    (name.clone(), (bit, self.policy(name, p).route))
                })
                .collect(),
        }
    }

    /// The rate limit in force: `base` with the overrides applied.
    pub fn rate_limit(&self, base: RateLimit) -> RateLimit {
        let per_second = self.rate_limit_per_device.unwrap_or(base.per_second);
        let burst = self.rate_limit_burst.unwrap_or(base.burst);
        if per_second <= 0.0 {
            return RateLimit::OFF;
        }
        RateLimit {
            per_second,
            // The configuration's rule: 0 means twice the rate, at least one record.
            burst: if burst <= 0.0 {
                (per_second * 2.0).max(1.0)
            } else {
                burst
            },
        }
    }

    /// Applies the sink's overrides to its dispatch settings.
    pub fn apply_to(&self, d: &mut DispatchConfig) {
        let Some(o) = self.sinks.get(&d.sink) else {
            return;
        };
        if let Some(p) = o.paused {
            d.paused = p;
        }
        if let Some(b) = o.retry_budget {
            d.retry_budget = b.max(1);
        }
        if let Some(ms) = o.retry_base_ms {
            d.retry_base = Duration::from_millis(ms.max(1));
        }
        if let Some(ms) = o.retry_max_ms {
            d.retry_max = Duration::from_millis(ms.max(1));
        }
        d.retry_max = d.retry_max.max(d.retry_base);
        if let Some(v) = &o.budget {
            // Validated when set; a hand-edited file that breaks it is
            // reported and the budget left as configured.
            match crate::uplink::Budget::from_value(v) {
                Ok(b) => d.budget = b,
                Err(e) => tracing::warn!(sink = %d.sink, error = %e, "ignoring the runtime budget"),
            }
        }
        if let Some(v) = &o.live_share {
            d.live_share = v.as_f64().filter(|v| *v > 0.0 && *v < 1.0);
        }
        if let Some(v) = &o.windows {
            match crate::uplink::Windows::from_value(v) {
                Ok(w) => d.windows = w,
                Err(e) => {
                    tracing::warn!(sink = %d.sink, error = %e, "ignoring the runtime windows")
                }
            }
        }
        if let Some(v) = &o.reduce {
            match crate::reduce::Reduce::from_value(v) {
                Ok(r) => d.reduce = r,
                Err(e) => tracing::warn!(sink = %d.sink, error = %e, "ignoring the runtime reduce"),
            }
        }
        if let Some(v) = &o.quota {
            match crate::uplink::Quota::from_value(v) {
                Ok(q) => d.quota = q,
                Err(e) => tracing::warn!(sink = %d.sink, error = %e, "ignoring the runtime quota"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn settings_are_validated_and_survive_a_save_and_load() {
        let sinks = vec!["s3".to_string()];
        assert!(Setting::parse("sinks.nope.paused", &json!(true), &sinks).is_err());
        assert!(Setting::parse("sinks.s3.paused", &json!("yes"), &sinks).is_err());
        assert!(Setting::parse("sinks.s3.retry_budget", &json!(0), &sinks).is_err());
        assert!(Setting::parse("ingest.rate_limit_per_device", &json!(-1), &sinks).is_err());
        assert!(Setting::parse("http.addr", &json!("0.0.0.0:1"), &sinks)
            .unwrap_err()
            .contains("settable"));
        let mut o = RuntimeOverrides::default();
        for (k, v) in [
            ("log.level", json!("debug")),
            ("ingest.rate_limit_per_device", json!(2.5)),
            ("sinks.s3.paused", json!(true)),
            ("sinks.s3.retry_budget", json!(3)),
            ("sinks.s3.budget", json!({"bytes_per_s": 1000})),
        ] {
            o.set(&Setting::parse(k, &v, &sinks).unwrap());
        }
        let dir = tempfile::tempdir().unwrap();
        o.save(dir.path()).unwrap();
        let back = RuntimeOverrides::load(dir.path()).unwrap();
        assert_eq!(back, o);
        let mut d = DispatchConfig::new("s3");
        back.apply_to(&mut d);
        assert!(d.paused);
        assert_eq!(d.retry_budget, 3);
        assert_eq!(
            d.budget.map(|b| (b.bytes_per_s, b.burst_bytes)),
            Some((1000, 1000))
        );
        assert!(Setting::parse("sinks.s3.budget", &json!({"bytes_per_s": -1}), &sinks).is_err());
        // Cleared at run time over a configured budget.
        o.set(&Setting::parse("sinks.s3.budget", &Value::Null, &sinks).unwrap());
        let mut d = DispatchConfig::new("s3");
        d.budget = Some(crate::uplink::Budget {
            bytes_per_s: 5,
            burst_bytes: 5,
        });
        o.apply_to(&mut d);
        assert_eq!(d.budget, None);
        assert!(Setting::parse("sinks.s3.live_share", &json!(1.5), &sinks).is_err());
        o.set(&Setting::parse("sinks.s3.live_share", &json!(0.25), &sinks).unwrap());
        let mut d = DispatchConfig::new("s3");
        o.apply_to(&mut d);
        assert_eq!(d.live_share, Some(0.25));
        let q = json!({"bytes": "1MB", "period": "1d", "reserve_high": "25%"});
        o.set(&Setting::parse("sinks.s3.quota", &q, &sinks).unwrap());
        let mut d = DispatchConfig::new("s3");
        RuntimeOverrides::load(dir.path()).unwrap();
        o.apply_to(&mut d);
        assert_eq!(
            d.quota,
            crate::uplink::Quota::from_value(&q).unwrap(),
            "a runtime quota reads back as set"
        );
        let r = back.rate_limit(RateLimit::OFF);
        assert_eq!((r.per_second, r.burst), (2.5, 5.0));
        assert_eq!(
            RuntimeOverrides::load(&dir.path().join("none")).unwrap(),
            RuntimeOverrides::default()
        );
    }
}
