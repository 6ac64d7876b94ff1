//! What goes where, and what goes first (DESIGN §6a): per-sink routes,
//! priority classes, per-sink TTLs and drain order.
//!
//! Pure rules. [`Routing::decide`] runs once per record when it is stored;
//! its answer (a class and the set of sinks, as [`RecordRoute`]) is kept with
//! the record in the WAL, so a restart or a rule change never re-decides an
//! old record.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Most sinks a gateway can have: each holds one bit of a record's sink set.
pub const MAX_SINKS: usize = 63;

/// A priority class. A sink with a backlog delivers `High`, then `Normal`,
/// then `Low`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Class {
    /// Delivered first.
    High = 0,
    /// The default.
    #[default]
    Normal = 1,
    /// Delivered last.
    Low = 2,
}

impl Class {
    /// Every class, in delivery order.
    pub const ALL: [Class; 3] = [Class::High, Class::Normal, Class::Low];

    /// The label used in metrics and settings.
    pub fn as_str(self) -> &'static str {
        match self {
            Class::High => "high",
            Class::Normal => "normal",
            Class::Low => "low",
        }
    }

    /// The stored form (the `class` column).
    pub fn code(self) -> u8 {
        self as u8
    }

    /// From the stored form; anything unknown is `Normal`.
    pub fn from_code(c: i64) -> Class {
        match c {
            0 => Class::High,
            2 => Class::Low,
            _ => Class::Normal,
        }
    }
}

impl fmt::Display for Class {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The decision stored with a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RecordRoute {
    /// Its priority class.
    pub class: Class,
    /// The sinks it goes to, one bit per sink (`Wal::sink_bits`); `None`:
    /// every sink (no sink has a route). `Some(0)`: no sink (unrouted).
    pub sinks: Option<u64>,
}

/// What a route or a priority rule looks at.
#[derive(Debug, Clone, Copy)]
pub struct RecordView<'a> {
    /// The device id.
    pub device_id: &'a str,
    /// `mqtt` or `http`.
    pub source: &'a str,
    /// The record's tags.
    pub tags: &'a Map<String, Value>,
    /// The record's metrics.
    pub metrics: &'a Map<String, Value>,
}

/// Conditions on a record; every one given must hold. An empty match takes
/// every record.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Match {
    /// Device id globs (`*` any run of characters, `?` one); any may match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub devices: Option<Vec<String>>,
    /// `mqtt` and/or `http`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sources: Option<Vec<String>>,
    /// Every `key = "value"` must be a tag of the record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<BTreeMap<String, String>>,
    /// The record has at least one of these metrics.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_any: Option<Vec<String>>,
}

impl Match {
    /// Refuses empty lists and unknown sources (`what` names the setting).
    pub fn validate(&self, what: &str) -> Result<(), String> {
        let nonempty = |field: &str, v: &Option<Vec<String>>| {
            match v {
            Some(l) if l.is_empty() => Err(format!(
                "{what}.{field}: an empty list matches nothing; leave the key out to match every record"
            )),
            Some(l) if l.iter().any(|s| s.is_empty()) => {
                Err(format!("{what}.{field}: empty names are not allowed"))
            }
            _ => Ok(()),
        }
        };
        nonempty("devices", &self.devices)?;
        nonempty("sources", &self.sources)?;
        nonempty("metrics_any", &self.metrics_any)?;
        if let Some(s) = &self.sources {
            if let Some(bad) = s.iter().find(|s| !matches!(s.as_str(), "mqtt" | "http")) {
                return Err(format!(
                    "{what}.sources: {bad:?} is not a source; expected mqtt or http"
                ));
            }
        }
        if let Some(t) = &self.tags {
            if t.is_empty() {
                return Err(format!(
                    "{what}.tags: an empty table; leave the key out to match every record"
                ));
            }
        }
        Ok(())
    }

    /// Does `r` meet every condition?
    pub fn matches(&self, r: &RecordView<'_>) -> bool {
        if let Some(globs) = &self.devices {
            if !globs.iter().any(|g| glob_match(g, r.device_id)) {
                return false;
            }
        }
        if let Some(s) = &self.sources {
            if !s.iter().any(|s| s == r.source) {
                return false;
            }
        }
        if let Some(t) = &self.tags {
            if !t
                .iter()
                .all(|(k, v)| r.tags.get(k).and_then(Value::as_str) == Some(v.as_str()))
            {
                return false;
            }
        }
        if let Some(m) = &self.metrics_any {
            if !m.iter().any(|m| r.metrics.contains_key(m)) {
                return false;
            }
        }
        true
    }
}

/// `*` matches any run of characters (also none), `?` exactly one; the rest
/// literally. Linear time (no backtracking blow-up on hostile patterns).
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || (p[pi] != '*' && p[pi] == t[ti])) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// One `[[priority]]` rule: records matching it get `class` (first match wins).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriorityRule {
    /// The class given.
    pub class: Class,
    /// The conditions (`match = {…}`); empty matches every record.
    #[serde(default, rename = "match")]
    pub matches: Match,
}

/// The order in which a sink drains its backlog.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DrainMode {
    /// Oldest first (within a class).
    #[default]
    Fifo,
    /// While the oldest pending record is older than `live_after`, records
    /// younger than that go first (within a class); the backlog drains in
    /// the remaining capacity.
    LiveFirst,
}

/// Default `live_after`.
pub const DEFAULT_LIVE_AFTER: Duration = Duration::from_secs(60);

/// A sink's delivery policy: route, TTL per class and drain order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SinkPolicy {
    /// `None`: every record.
    pub route: Option<Match>,
    /// A record of a class listed here not delivered within its TTL is
    /// expired for this sink (a dead letter with reason `expired`).
    pub ttl: BTreeMap<Class, Duration>,
    /// Drain order.
    pub drain: DrainMode,
    /// With `LiveFirst`: what counts as live.
    pub live_after: Duration,
}

impl SinkPolicy {
    /// The keys of `[sinks.NAME]` that make the policy (shared by every kind).
    pub const KEYS: &'static [&'static str] = &["route", "ttl", "drain", "live_after"];

    /// The default policy: every record, no TTL, fifo.
    pub fn new() -> Self {
        Self {
            live_after: DEFAULT_LIVE_AFTER,
            ..Self::default()
        }
    }

    /// Sets one of [`Self::KEYS`] from its value (the configuration file's
    /// TOML as JSON, or a runtime setting). `null` clears `route` and `ttl`.
    pub fn set(&mut self, key: &str, v: &Value) -> Result<(), crate::keys::KeyError> {
        use crate::keys::KeyError;
        // The parsers say "KEY[.SUBKEY]: what is wrong"; the caller adds the section.
        let err = |e: String| match e.split_once(": ") {
            Some((k, msg)) if k.starts_with(key) => KeyError::new(k, msg),
            _ => KeyError::new(key, e),
        };
        match key {
            "route" if v.is_null() => self.route = None,
            "route" => self.route = Some(parse_match(key, v).map_err(err)?),
            "ttl" if v.is_null() => self.ttl.clear(),
            "ttl" => self.ttl = parse_ttl(key, v).map_err(err)?,
            "drain" => {
                self.drain = serde_json::from_value(v.clone()).map_err(|_| {
                    KeyError::new(key, format!("{v}: expected \"fifo\" or \"live_first\""))
                })?
            }
            "live_after" => self.live_after = parse_duration(key, v).map_err(err)?,
            _ => {
                return Err(KeyError::new(
                    key,
                    format!("not a policy key ({})", Self::KEYS.join(", ")),
                ))
            }
        }
        Ok(())
    }
}

/// Parses a duration such as `"60s"`, `"6h"`, `"1h 30m"`, or a number of
/// seconds; zero is refused.
pub fn parse_duration(key: &str, v: &Value) -> Result<Duration, String> {
    let d = match v {
        Value::String(s) => humantime::parse_duration(s.trim())
            .map_err(|e| format!("{key}: {s:?} is not a duration like \"60s\" or \"6h\": {e}"))?,
        Value::Number(n) => match n.as_u64() {
            Some(s) => Duration::from_secs(s),
            None => {
                return Err(format!(
                    "{key}: expected whole seconds or a duration string"
                ))
            }
        },
        _ => return Err(format!("{key}: expected a duration like \"60s\" or \"6h\"")),
    };
    if d.is_zero() {
        return Err(format!("{key}: must be above zero"));
    }
    Ok(d)
}

/// Parses a `ttl` table: `{ low = "6h", normal = "72h" }`.
pub fn parse_ttl(key: &str, v: &Value) -> Result<BTreeMap<Class, Duration>, String> {
    let Value::Object(m) = v else {
        return Err(format!(
            "{key}: expected a table of class = duration, e.g. {{ low = \"6h\" }}"
        ));
    };
    let mut out = BTreeMap::new();
    for (class, d) in m {
        let c: Class = serde_json::from_value(Value::String(class.clone()))
            .map_err(|_| format!("{key}.{class}: not a class; expected high, normal or low"))?;
        out.insert(c, parse_duration(&format!("{key}.{class}"), d)?);
    }
    Ok(out)
}

/// Parses a route (`{ devices = [...], ... }`).
pub fn parse_match(key: &str, v: &Value) -> Result<Match, String> {
    let m: Match = serde_json::from_value(v.clone()).map_err(|e| format!("{key}: {e}"))?;
    m.validate(key)?;
    Ok(m)
}

/// Parses the `priority` list.
pub fn parse_priority(key: &str, v: &Value) -> Result<Vec<PriorityRule>, String> {
    let rules: Vec<PriorityRule> =
        serde_json::from_value(v.clone()).map_err(|e| format!("{key}: {e}"))?;
    for (i, r) in rules.iter().enumerate() {
        r.matches.validate(&format!("{key}[{i}].match"))?;
    }
    Ok(rules)
}

/// Every rule in force: the priority rules and, per sink, its bit and route.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Routing {
    /// `[[priority]]`, first match wins.
    pub priority: Vec<PriorityRule>,
    /// Per sink: its bit in a record's sink set and its route.
    pub sinks: BTreeMap<String, (u64, Option<Match>)>,
}

impl Routing {
    /// The class and sink set of a record.
    pub fn decide(&self, r: &RecordView<'_>) -> RecordRoute {
        let class = self
            .priority
            .iter()
            .find(|p| p.matches.matches(r))
            .map_or(Class::Normal, |p| p.class);
        let sinks = if self.sinks.values().all(|(_, route)| route.is_none()) {
            None
        } else {
            Some(
                self.sinks
                    .values()
                    .filter(|(_, route)| route.as_ref().is_none_or(|m| m.matches(r)))
                    .fold(0u64, |acc, (bit, _)| acc | bit),
            )
        };
        RecordRoute { class, sinks }
    }

    /// The names of the sinks in `set` (`None`: all).
    pub fn sink_names(&self, set: Option<u64>) -> Vec<String> {
        self.sinks
            .iter()
            .filter(|(_, (bit, _))| set.is_none_or(|s| s & bit != 0))
            .map(|(n, _)| n.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn view<'a>(
        device: &'a str,
        source: &'a str,
        tags: &'a Map<String, Value>,
        metrics: &'a Map<String, Value>,
    ) -> RecordView<'a> {
        RecordView {
            device_id: device,
            source,
            tags,
            metrics,
        }
    }

    #[test]
    fn globs_match_like_a_shell() {
        for (p, t, want) in [
            ("pump-*", "pump-7", true),
            ("pump-*", "pump-", true),
            ("pump-*", "fan-1", false),
            ("*-7", "pump-7", true),
            ("p?mp-*", "pamp-x", true),
            ("a*b*c", "aXXbYYc", true),
            ("a*b*c", "aXXbYY", false),
            ("*", "", true),
            ("", "", true),
            ("", "x", false),
            ("exact", "exact", true),
        ] {
            assert_eq!(glob_match(p, t), want, "{p} vs {t}");
        }
        // Linear, not exponential: this would take ages with naive backtracking.
        let text = "a".repeat(5000);
        assert!(!glob_match(&format!("{}b", "*a".repeat(50)), &text));
    }

    #[test]
    fn every_given_condition_must_hold() {
        let tags = json!({"site": "north", "line": "2"});
        let metrics = json!({"temp": 1, "alarm": true});
        let (t, m) = (tags.as_object().unwrap(), metrics.as_object().unwrap());
        let r = view("pump-1", "mqtt", t, m);
        let parse = |v: Value| parse_match("route", &v).unwrap();
        assert!(Match::default().matches(&r));
        assert!(parse(json!({"devices": ["fan-*", "pump-*"]})).matches(&r));
        assert!(!parse(json!({"devices": ["fan-*"]})).matches(&r));
        assert!(parse(json!({"sources": ["mqtt"]})).matches(&r));
        assert!(!parse(json!({"sources": ["http"]})).matches(&r));
        assert!(parse(json!({"tags": {"site": "north"}})).matches(&r));
        assert!(!parse(json!({"tags": {"site": "north", "line": "3"}})).matches(&r));
        assert!(parse(json!({"metrics_any": ["fault", "alarm"]})).matches(&r));
        assert!(!parse(json!({"metrics_any": ["fault"]})).matches(&r));
        assert!(!parse(json!({"devices": ["pump-*"], "sources": ["http"]})).matches(&r));
        for (bad, says) in [
            (json!({"devices": []}), "empty list"),
            (json!({"sources": ["coap"]}), "not a source"),
            (json!({"tags": {}}), "empty table"),
            (json!({"device": ["x"]}), "unknown field"),
            (json!({"tags": {"a": 1}}), "route"),
        ] {
            let e = parse_match("route", &bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn the_first_priority_rule_wins_and_routes_give_sink_sets() {
        let routing = Routing {
            priority: parse_priority(
                "priority",
                &json!([
                    {"class": "high", "match": {"metrics_any": ["alarm"]}},
                    {"class": "low", "match": {"devices": ["debug-*"]}},
                    {"class": "normal", "match": {}}
                ]),
            )
            .unwrap(),
            sinks: BTreeMap::from([
                ("all".to_string(), (1, None)),
                (
                    "pumps".to_string(),
                    (
                        2,
                        Some(parse_match("r", &json!({"devices": ["pump-*"]})).unwrap()),
                    ),
                ),
                (
                    "north".to_string(),
                    (
                        4,
                        Some(parse_match("r", &json!({"tags": {"site": "north"}})).unwrap()),
                    ),
                ),
            ]),
        };
        let none = Map::new();
        let alarm = json!({"alarm": 1});
        let a = alarm.as_object().unwrap();
        let d = routing.decide(&view("debug-pump", "http", &none, a));
        assert_eq!(d.class, Class::High, "first match wins");
        assert_eq!(d.sinks, Some(1));
        let d = routing.decide(&view("debug-1", "http", &none, &none));
        assert_eq!(d.class, Class::Low);
        let d = routing.decide(&view("pump-1", "http", &none, &none));
        assert_eq!((d.class, d.sinks), (Class::Normal, Some(3)));
        assert_eq!(routing.sink_names(d.sinks), ["all", "pumps"]);
        let no_routes = Routing {
            priority: vec![],
            sinks: BTreeMap::from([("all".to_string(), (1, None))]),
        };
        assert_eq!(
            no_routes.decide(&view("x", "mqtt", &none, &none)),
            RecordRoute::default()
        );
        assert!(parse_priority("priority", &json!([{"class": "urgent"}])).is_err());
    }

    #[test]
    fn ttls_and_durations_are_checked() {
        let t = parse_ttl("ttl", &json!({"low": "6h", "normal": "72h"})).unwrap();
        assert_eq!(t[&Class::Low], Duration::from_secs(6 * 3600));
        assert_eq!(t[&Class::Normal], Duration::from_secs(72 * 3600));
        assert!(parse_ttl("ttl", &json!({"urgent": "6h"}))
            .unwrap_err()
            .contains("not a class"));
        assert!(parse_ttl("ttl", &json!({"low": "0s"}))
            .unwrap_err()
            .contains("above zero"));
        assert!(parse_ttl("ttl", &json!({"low": "soon"})).is_err());
        assert_eq!(
            parse_duration("live_after", &json!(30)).unwrap(),
            Duration::from_secs(30)
        );
    }
}
