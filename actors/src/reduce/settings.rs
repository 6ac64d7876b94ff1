//! A sink's `[sinks.NAME.reduce]` settings: [`Reduce`] parsed from the
//! key's value (the configuration's TOML as JSON, or a runtime setting),
//! with clear errors, and printed back; the metric patterns ([`glob`]) and
//! which band or window a metric falls under. The state machine that
//! applies them is in `reduce.rs`; this room only says what was asked.

use std::time::Duration;

use serde_json::{Map, Number, Value};

/// How far a metric must move before it is sent again.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Band {
    /// By at least this much.
    Abs(f64),
    /// By at least this percentage of the value last sent.
    Pct(f64),
}

/// One aggregate of a downsampled metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stat {
    /// Smallest number.
    Min,
    /// Largest number.
    Max,
    /// Mean of the numbers.
    Mean,
    /// The last value (any type).
    Last,
    /// How many values.
    Count,
}

impl Stat {
    pub(super) const ALL: [Stat; 5] = [Stat::Min, Stat::Max, Stat::Mean, Stat::Last, Stat::Count];

    pub(super) fn name(self) -> &'static str {
        match self {
            Stat::Min => "min",
            Stat::Max => "max",
            Stat::Mean => "mean",
            Stat::Last => "last",
            Stat::Count => "count",
        }
    }
}

/// `downsample = { every = "1m", stats = [...], metrics = ["vibration_*"] }`.
#[derive(Debug, Clone, PartialEq)]
pub struct Downsample {
    /// Window length.
    pub every: Duration,
    /// What each window sends per metric (default: all five).
    pub stats: Vec<Stat>,
    /// Metric names or `*` patterns.
    pub metrics: Vec<String>,
}

/// A sink's `[sinks.NAME.reduce]` settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Reduce {
    /// Metric name or pattern and its band, most specific first.
    pub deadband: Vec<(String, Band)>,
    /// A deadbanded metric is sent at least this often.
    pub heartbeat: Option<Duration>,
    /// Windowed aggregates.
    pub downsample: Option<Downsample>,
}

impl Reduce {
    /// Parses the key's value (the configuration's TOML as JSON, or a
    /// runtime setting); `null` is no reduction.
    pub fn from_value(v: &Value) -> Result<Option<Reduce>, String> {
        if v.is_null() {
            return Ok(None);
        }
        let Some(m) = v.as_object() else {
            return Err(format!(
                "expected {{ deadband = {{...}}, heartbeat = \"15m\", downsample = {{...}} }} or null, got {v}"
            ));
        };
        if let Some(k) = m
            .keys()
            .find(|k| !["deadband", "heartbeat", "downsample"].contains(&k.as_str()))
        {
            return Err(format!(
                "unknown key {k:?} (deadband, heartbeat, downsample)"
            ));
        }
        let mut deadband = Vec::new();
        if let Some(d) = m.get("deadband") {
            let Some(d) = d.as_object() else {
                return Err(format!(
                    "deadband: expected {{ metric = band, \"pattern_*\" = \"N%\" }}, got {d}"
                ));
            };
            for (name, band) in d {
                check_pattern("deadband", name)?;
                deadband.push((name.clone(), parse_band(name, band)?));
            }
        }
        // Most specific first: exact names, then longer patterns.
        deadband.sort_by(|(a, _), (b, _)| {
            (a.contains('*'), std::cmp::Reverse(a.len()), a).cmp(&(
                b.contains('*'),
                std::cmp::Reverse(b.len()),
                b,
            ))
        });
        let heartbeat = match m.get("heartbeat") {
            None | Some(Value::Null) => None,
            Some(h) => Some(parse_duration("heartbeat", h)?),
        };
        let downsample = match m.get("downsample") {
            None | Some(Value::Null) => None,
            Some(d) => Some(parse_downsample(d)?),
        };
        if deadband.is_empty() && downsample.is_none() {
            return Err(
                "nothing to reduce: give a deadband or a downsample (or null for none)".into(),
            );
        }
        if heartbeat.is_some() && deadband.is_empty() {
            return Err("heartbeat needs a deadband".into());
        }
        Ok(Some(Reduce {
            deadband,
            heartbeat,
            downsample,
        }))
    }

    /// The settings as the key's value (for `/admin/sinks` and
    /// `runtime.json`); [`Reduce::from_value`] reads it back.
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        if !self.deadband.is_empty() {
            let d: Map<String, Value> = self
                .deadband
                .iter()
                .map(|(k, b)| {
                    let v = match b {
                        Band::Abs(x) => Number::from_f64(*x).map_or(Value::Null, Value::Number),
                        Band::Pct(p) => Value::String(format!("{p}%")),
                    };
                    (k.clone(), v)
                })
                .collect();
            m.insert("deadband".into(), Value::Object(d));
        }
        if let Some(h) = self.heartbeat {
            m.insert(
                "heartbeat".into(),
                Value::String(humantime::format_duration(h).to_string()),
            );
        }
        if let Some(d) = &self.downsample {
            m.insert(
                "downsample".into(),
                serde_json::json!({
                    "every": humantime::format_duration(d.every).to_string(),
                    "stats": d.stats.iter().map(|s| s.name()).collect::<Vec<_>>(),
                    "metrics": d.metrics,
                }),
            );
        }
        Value::Object(m)
    }

    pub(super) fn band(&self, metric: &str) -> Option<Band> {
        self.deadband
            .iter()
            .find(|(p, _)| glob(p, metric))
            .map(|(_, b)| *b)
    }

    pub(super) fn downsampled(&self, metric: &str) -> bool {
        self.downsample
            .as_ref()
            .is_some_and(|d| d.metrics.iter().any(|p| glob(p, metric)))
    }
}

fn check_pattern(key: &str, p: &str) -> Result<(), String> {
    if p.is_empty() || p.len() > 128 {
        return Err(format!("{key}: {p:?} is not a metric name or pattern"));
    }
    Ok(())
}

fn parse_band(name: &str, v: &Value) -> Result<Band, String> {
    let bad = || format!("deadband.{name}: expected a number >= 0 or \"N%\", got {v}");
    match v {
        Value::Number(n) => match n.as_f64() {
            Some(x) if x >= 0.0 && x.is_finite() => Ok(Band::Abs(x)),
            _ => Err(bad()),
        },
        Value::String(s) => match s.trim().strip_suffix('%').map(|p| p.trim().parse::<f64>()) {
            Some(Ok(p)) if p >= 0.0 && p.is_finite() => Ok(Band::Pct(p)),
            _ => Err(bad()),
        },
        _ => Err(bad()),
    }
}

fn parse_duration(key: &str, v: &Value) -> Result<Duration, String> {
    let d = match v {
        Value::String(s) => humantime::parse_duration(s.trim())
            .map_err(|e| format!("{key}: {s:?} is not a duration like \"15m\": {e}"))?,
        _ => return Err(format!("{key}: expected a duration like \"15m\", got {v}")),
    };
    if d < Duration::from_secs(1) {
        return Err(format!("{key}: must be at least 1s"));
    }
    Ok(d)
}

fn parse_downsample(v: &Value) -> Result<Downsample, String> {
    let Some(m) = v.as_object() else {
        return Err(format!(
            "downsample: expected {{ every = \"1m\", metrics = [...], stats = [...] }}, got {v}"
        ));
    };
    if let Some(k) = m
        .keys()
        .find(|k| !["every", "stats", "metrics"].contains(&k.as_str()))
    {
        return Err(format!(
            "downsample: unknown key {k:?} (every, stats, metrics)"
        ));
    }
    let every = parse_duration(
        "downsample.every",
        m.get("every").ok_or("downsample.every is required")?,
    )?;
    let stats = match m.get("stats") {
        None => Stat::ALL.to_vec(),
        Some(Value::Array(a)) if !a.is_empty() => {
            let mut stats = Vec::new();
            for s in a {
                let stat = Stat::ALL
                    .into_iter()
                    .find(|x| Some(x.name()) == s.as_str())
                    .ok_or_else(|| {
                        format!("downsample.stats: {s} is not one of min, max, mean, last, count")
                    })?;
                if !stats.contains(&stat) {
                    stats.push(stat);
                }
            }
            stats
        }
        Some(s) => {
            return Err(format!(
                "downsample.stats: expected a non-empty list, got {s}"
            ))
        }
    };
    let metrics = match m.get("metrics") {
        Some(Value::Array(a)) if !a.is_empty() => a
            .iter()
            .map(|p| match p.as_str() {
                Some(p) => check_pattern("downsample.metrics", p).map(|_| p.to_string()),
                None => Err(format!("downsample.metrics: {p} is not a string")),
            })
            .collect::<Result<Vec<_>, _>>()?,
        _ => {
            return Err(
                "downsample.metrics: a non-empty list of metric names or patterns is required"
                    .into(),
            )
        }
    };
    Ok(Downsample {
        every,
        stats,
        metrics,
    })
}

/// `*` matches any run of characters; everything else matches itself.
pub fn glob(pattern: &str, s: &str) -> bool {
    let (p, s) = (pattern.as_bytes(), s.as_bytes());
    let (mut pi, mut si) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, si));
            pi += 1;
        } else if pi < p.len() && p[pi] == s[si] {
            pi += 1;
            si += 1;
        } else if let Some((sp, ss)) = star {
            pi = sp + 1;
            si = ss + 1;
            star = Some((sp, ss + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cfg(v: Value) -> Reduce {
        Reduce::from_value(&v).unwrap().unwrap()
    }

    #[test]
    fn settings_parse_with_clear_errors_and_print_back() {
        let r = cfg(json!({
            "deadband": {"temperature_c": 0.2, "pressure_*": "1%", "*": 5},
            "heartbeat": "15m",
            "downsample": {"every": "1m", "metrics": ["vibration_*"], "stats": ["max", "count"]},
        }));
        assert_eq!(r.band("temperature_c"), Some(Band::Abs(0.2)));
        assert_eq!(r.band("pressure_in"), Some(Band::Pct(1.0)));
        assert_eq!(r.band("other"), Some(Band::Abs(5.0)));
        assert!(r.downsampled("vibration_x") && !r.downsampled("temperature_c"));
        assert_eq!(Reduce::from_value(&r.to_json()).unwrap().unwrap(), r);
        assert_eq!(Reduce::from_value(&Value::Null).unwrap(), None);
        for (bad, says) in [
            (json!({}), "nothing to reduce"),
            (json!({"deadband": {"t": -1}}), "deadband.t"),
            (json!({"deadband": {"t": "x%"}}), "deadband.t"),
            (
                json!({"deadband": {"t": 1}, "heartbeat": "soon"}),
                "heartbeat",
            ),
            (
                json!({"heartbeat": "1m", "downsample": {"every": "1m", "metrics": ["a"]}}),
                "heartbeat needs",
            ),
            (json!({"downsample": {"every": "1m"}}), "downsample.metrics"),
            (
                json!({"downsample": {"metrics": ["a"]}}),
                "downsample.every",
            ),
            (
                json!({"downsample": {"every": "1m", "metrics": ["a"], "stats": ["p99"]}}),
                "p99",
            ),
            (json!({"deadbands": {}}), "unknown key"),
        ] {
            let e = Reduce::from_value(&bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn glob_matches_stars_anywhere() {
        assert!(glob("vib_*", "vib_x") && glob("*", "") && glob("a*c*e", "abcde"));
        assert!(!glob("vib_*", "vibx") && !glob("a*c", "abcd") && !glob("abc", "ab"));
    }
}
