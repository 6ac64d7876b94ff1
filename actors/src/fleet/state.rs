//! The gateway's state as the fleet sees it: the retained
//! `fleet/{gateway_id}/state` document (schema:
//! `schemas/fleet-state.schema.json`).
//!
//! Everything in it is read where the admin API reads it: the sinks and
//! the WAL from [`Operator::sinks_report`] (`GET /admin/sinks`), ingest
//! counts from the same counters `/metrics` serves. Rates are differences
//! between two reports; `full_in_s` is [`crate::growth`]'s, as everywhere.
//!
//! Size: about 150 bytes per sink plus 300; with the 5-sink budget well
//! under 2 KB (checked by a test), because error texts are cut to 120
//! characters.

use std::sync::Arc;
use std::time::Instant;

use serde_json::{json, Value};

use super::apply::Bundles;
use crate::control::ops::sink_row_up;
use crate::control::{OpError, Operator};
use crate::metrics::Metrics;

/// The schema version of the document (its `schema` field).
pub const SCHEMA: u64 = 1;

/// Longest `last_error` in the state (the 2 KB budget).
const ERROR_CHARS: usize = 120;

/// The counters of one report, for the next one's rates.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    http: u64,
    mqtt: u64,
}

/// A state document and the part of it whose change is worth a publish.
#[derive(Debug, Clone)]
pub struct Report {
    /// The document.
    pub body: Value,
    /// What changes it "on change": online, bundle, each sink's up, paused,
    /// circuit, dead letters and error, and whether the WAL is filling or
    /// refusing. Rates, ages and counts that move all the time are left
    /// out, or an idle-but-busy gateway would publish every 5 s.
    pub significant: String,
}

/// Builds state reports.
pub struct StateSource {
    gateway_id: String,
    groups: Vec<String>,
    wal_limit: u64,
    metrics: Metrics,
    last: Option<Sample>,
    bundles: Option<Arc<Bundles>>,
}

/// The document the broker publishes for us when we vanish (the last will).
pub fn offline(gateway_id: &str, groups: &[String]) -> Value {
    json!({
        "schema": SCHEMA,
        "gateway_id": gateway_id,
        "groups": groups,
        "online": false,
    })
}

impl StateSource {
    /// A source for `gateway_id` in `groups`; `wal_limit` is `wal.max_bytes`.
    pub fn new(gateway_id: &str, groups: &[String], wal_limit: u64, metrics: Metrics) -> Self {
        Self {
            gateway_id: gateway_id.to_string(),
            groups: groups.to_vec(),
            wal_limit,
            metrics,
            last: None,
            bundles: None,
        }
    }

    /// Reports the config bundle's version and status from `bundles`.
    pub fn with_bundles(mut self, bundles: Option<Arc<Bundles>>) -> Self {
        self.bundles = bundles;
        self
    }

    fn accepted(&self, source: &str) -> u64 {
        self.metrics
            .ingest_records
            .with_label_values(&[source, "accepted"])
            .get()
    }

    /// Returns when the bundle's status changes (never without bundles).
    pub async fn bundle_changed(&self) {
        match &self.bundles {
            Some(b) => b.changed().await,
            None => std::future::pending().await,
        }
    }

    /// The state now.
    pub async fn report(&mut self, operator: &Operator) -> Result<Report, OpError> {
        let (stats, sinks) = operator.sinks_report().await?;
        let now = Sample {
            at: Instant::now(),
            http: self.accepted("http"),
            mqtt: self.accepted("mqtt"),
        };
        let (http_rate, mqtt_rate) = match self.last {
            Some(prev) if now.at > prev.at => {
                let secs = (now.at - prev.at).as_secs_f64();
                let rate =
                    |a: u64, b: u64| (a.saturating_sub(b) as f64 / secs * 10.0).round() / 10.0;
                (rate(now.http, prev.http), rate(now.mqtt, prev.mqtt))
            }
            _ => (0.0, 0.0),
        };
        self.last = Some(now);
        let full_in = self.metrics.wal_growth.full_in().map(|f| f.seconds);
        let wall_ms = crate::wal::now_ms();
        let mut by_name = serde_json::Map::new();
        let mut significant = Vec::new();
        for s in sinks.as_array().into_iter().flatten() {
            let name = s["name"].as_str().unwrap_or_default().to_string();
            let state = &s["state"];
            let wal = &s["wal"];
            let paused = state["paused"].as_bool().unwrap_or(false);
            let circuit_open = state["circuit_open"].as_bool().unwrap_or(false);
            let up = sink_row_up(s);
            let backlog =
                wal["enqueued"].as_u64().unwrap_or(0) + wal["inflight"].as_u64().unwrap_or(0);
            let oldest = wal["oldest_pending_ms"]
                .as_i64()
                .map(|ms| ((wall_ms - ms).max(0) / 1000) as u64);
            let dead = wal["dead"].as_u64().unwrap_or(0);
            let error = s["last_error"]
                .as_str()
                .map(|e| crate::secret::redact(e, ERROR_CHARS));
            let circuit = if circuit_open { "open" } else { "closed" };
            significant.push(format!("{name}:{up}:{paused}:{circuit}:{dead}:{error:?}"));
            by_name.insert(
                name,
                json!({
                    "up": up,
                    "paused": paused,
                    "circuit": circuit,
                    "backlog": backlog,
                    "oldest_pending_s": oldest,
                    "dead_letters": dead,
                    "last_error": error,
                }),
            );
        }
        significant.push(format!("wal:{}:{}", full_in.is_some(), stats.backpressure));
        let bundle = self.bundles.as_ref().map_or_else(
            || json!({"version": null, "status": "none"}),
            |b| b.report(),
        );
        significant.push(format!("bundle:{bundle}"));
        let body = json!({
            "schema": SCHEMA,
            "gateway_id": self.gateway_id,
            "groups": self.groups,
            "online": true,
            "version": env!("CARGO_PKG_VERSION"),
            "bundle": bundle,
            "uptime_s": operator.uptime().as_secs(),
            "at_ms": wall_ms,
            "ingest": {"http_per_s": http_rate, "mqtt_per_s": mqtt_rate},
            "wal": {
                "bytes": stats.live_bytes,
                "limit": self.wal_limit,
                "full_in_s": full_in,
                "backpressure": stats.backpressure,
            },
            "sinks": by_name,
        });
        Ok(Report {
            body,
            significant: significant.join("|"),
        })
    }
}
