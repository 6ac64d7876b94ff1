//! The status document (DESIGN §12): what `GET /admin/status` returns, the
//! status page polls and `gateway status` prints. One document, one place.
//!
//! It is assembled at request time from what the admin API already has:
//! the sinks from [`Operator::sinks_report`] (`GET /admin/sinks`), the dead
//! letters from [`Operator::dead_letters`] (`GET /admin/dlq`), the WAL from
//! the same report, MQTT from `/readyz`'s [`MqttStatus`]. The only state of
//! its own is [`StatusSource`]'s ring of counter snapshots: every 10 s a
//! timer copies the accepted-records counters (by source) and the
//! delivered-records counters (by sink) that `/metrics` serves. Ingest never
//! touches the ring, so it costs ingest nothing; the ring is 31 snapshots of
//! a few integers (under 2 KB).
//!
//! Reading the status is not an operator action: it is not audit-logged
//! (the page polls it every second), but a refused request is, like every
//! admin request.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gateway_actors::control::{OpError, Operator};
use gateway_actors::mqtt::MqttStatus;
use gateway_actors::wal::{now_ms, DlqFilter};
use gateway_actors::Metrics;
use serde_json::{json, Value};

/// Seconds between two snapshots of the counters.
pub const INTERVAL_S: u64 = 10;
/// Intervals kept: 30 × 10 s = the last 5 minutes.
pub const POINTS: usize = 30;
/// Dead letters listed in the document (the total is counted).
const DEAD_LETTERS_SHOWN: u64 = 20;
/// Longest error text in the document.
const ERROR_CHARS: usize = 300;
/// The ingest sources, as the `source` label of `gateway_ingest_records_total`.
const SOURCES: [&str; 2] = ["http", "mqtt"];

/// The counters at one moment.
#[derive(Debug, Clone, PartialEq)]
struct Snapshot {
    at_ms: i64,
    /// Accepted records by source, in [`SOURCES`] order.
    accepted: [u64; 2],
    /// Delivered records by sink, in `sinks` order.
    delivered: Vec<u64>,
}

/// Keeps the counter ring and builds status documents.
pub struct StatusSource {
    metrics: Metrics,
    sinks: Vec<String>,
    wal_max_bytes: u64,
    mqtt: Option<Arc<MqttStatus>>,
    /// The fleet's config bundles (`None`: the fleet is off).
    bundles: Option<Arc<gateway_actors::fleet::Bundles>>,
    ring: Mutex<VecDeque<Snapshot>>,
}

impl StatusSource {
    /// A source over `metrics` for `sinks`; `wal_max_bytes` is `wal.max_bytes`,
    /// `mqtt` the MQTT ingest state (`None`: MQTT off), `bundles` the
    /// fleet's config bundles (`None`: the fleet is off). Call
    /// [`StatusSource::start`] to take snapshots.
    pub fn new(
        metrics: Metrics,
        sinks: Vec<String>,
        wal_max_bytes: u64,
        mqtt: Option<Arc<MqttStatus>>,
        bundles: Option<Arc<gateway_actors::fleet::Bundles>>,
    ) -> Arc<Self> {
        let s = Arc::new(Self {
            metrics,
            sinks,
            wal_max_bytes,
            mqtt,
            bundles,
            ring: Mutex::new(VecDeque::with_capacity(POINTS + 1)),
        });
        s.take_snapshot();
        s
    }

    /// A started source for the gateway `settings` describe (the one line
    /// of wiring in start-up).
    pub fn started(
        settings: &crate::config::Settings,
        metrics: &Metrics,
        mqtt: &Option<Arc<MqttStatus>>,
        bundles: Option<Arc<gateway_actors::fleet::Bundles>>,
    ) -> Arc<Self> {
        let s = Self::new(
            metrics.clone(),
            settings.sinks.keys().cloned().collect(),
            settings.wal_config().max_bytes,
            mqtt.clone(),
            bundles,
        );
        s.start();
        s
    }

    /// Takes a snapshot every [`INTERVAL_S`] on the current actix runtime
    /// (ends with it).
    pub fn start(self: &Arc<Self>) {
        let me = Arc::downgrade(self);
        actix_rt::spawn(async move {
            let mut tick = actix_rt::time::interval(Duration::from_secs(INTERVAL_S));
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(me) = me.upgrade() else { break };
                me.take_snapshot();
            }
        });
    }

    fn snapshot(&self) -> Snapshot {
        let accepted = SOURCES.map(|src| {
            self.metrics
                .ingest_records
                .with_label_values(&[src, "accepted"])
                .get()
        });
        let delivered = self
            .sinks
            .iter()
            .map(|s| {
                self.metrics
                    .sink_records
                    .with_label_values(&[s, "ok"])
                    .get()
            })
            .collect();
        Snapshot {
            at_ms: now_ms(),
            accepted,
            delivered,
        }
    }

    fn take_snapshot(&self) {
        let now = self.snapshot();
        if let Ok(mut ring) = self.ring.lock() {
            if ring.len() > POINTS {
                ring.pop_front();
            }
            ring.push_back(now);
        }
    }

    /// The status now (see the module doc for where each part comes from).
    pub async fn document(&self, operator: &Operator) -> Result<Value, OpError> {
        let (stats, sinks) = operator.sinks_report().await?;
        let (dead_total, dead, _) = operator.dead_letters(DlqFilter {
            limit: Some(DEAD_LETTERS_SHOWN),
            ..DlqFilter::default()
        })?;
        let now = self.snapshot();
        let ring: Vec<Snapshot> = self
            .ring
            .lock()
            .map(|r| r.iter().cloned().collect())
            .unwrap_or_default();
        let last = ring.last().cloned().unwrap_or_else(|| now.clone());
        // Records per second over the last complete interval (or since the
        // last snapshot when there is none yet).
        let prev = ring.len().checked_sub(2).map(|i| &ring[i]);
        let rate = |a: u64, b: u64, secs_ms: i64| {
            let secs = (secs_ms.max(1) as f64) / 1000.0;
            ((a.saturating_sub(b)) as f64 / secs * 10.0).round() / 10.0
        };
        let mut sources = serde_json::Map::new();
        for (i, src) in SOURCES.iter().enumerate() {
            // Counts per interval, oldest first; the last point is the
            // interval in progress, so a new record shows at once.
            let mut points: Vec<u64> = ring
                .windows(2)
                .map(|w| w[1].accepted[i].saturating_sub(w[0].accepted[i]))
                .collect();
            points.push(now.accepted[i].saturating_sub(last.accepted[i]));
            let per_s = match prev {
                Some(p) => rate(last.accepted[i], p.accepted[i], last.at_ms - p.at_ms),
                None => rate(now.accepted[i], last.accepted[i], now.at_ms - last.at_ms),
            };
            sources.insert(
                (*src).to_string(),
                json!({"total": now.accepted[i], "per_s": per_s, "points": points}),
            );
        }
        let wall = now_ms();
        let mut rows = Vec::new();
        for row in sinks.as_array().into_iter().flatten() {
            let name = row["name"].as_str().unwrap_or_default();
            let i = self.sinks.iter().position(|s| s == name);
            let delivered_per_s = i.map(|i| match prev {
                Some(p) => rate(last.delivered[i], p.delivered[i], last.at_ms - p.at_ms),
                None => rate(now.delivered[i], last.delivered[i], now.at_ms - last.at_ms),
            });
            let wal = &row["wal"];
            let mut r = row.clone();
            r["backlog"] = json!(
                wal["enqueued"].as_u64().unwrap_or(0) + wal["inflight"].as_u64().unwrap_or(0)
            );
            r["oldest_pending_age_s"] = json!(wal["oldest_pending_ms"]
                .as_i64()
                .map(|ms| (wall - ms).max(0) / 1000));
            r["dead_letters"] = json!(wal["dead"].as_u64().unwrap_or(0));
            r["delivered_per_s"] = json!(delivered_per_s);
            r["last_error"] = json!(row["last_error"]
                .as_str()
                .map(|e| gateway_actors::secret::redact(e, ERROR_CHARS)));
            rows.push(r);
        }
        let recent: Vec<Value> = dead
            .iter()
            .map(|d| {
                json!({
                    "sink": d.sink,
                    "seq": d.seq,
                    "device_id": d.device_id,
                    "dead_ms": d.dead_ms,
                    "attempts": d.attempts,
                    "reason": gateway_actors::secret::redact(&d.error, ERROR_CHARS),
                })
            })
            .collect();
        let mqtt = match &self.mqtt {
            None => json!({"state": "disabled", "detail": null}),
            Some(m) if m.connected.load(Ordering::SeqCst) => {
                json!({"state": "connected", "detail": null})
            }
            Some(m) => json!({
                "state": "disconnected",
                "detail": m.last_error.lock().ok().and_then(|g| g.clone()),
            }),
        };
        Ok(json!({
            "at_ms": wall,
            "gateway": {
                "id": operator.gateway_id(),
                "version": env!("CARGO_PKG_VERSION"),
                "uptime_s": operator.uptime().as_secs(),
                // As in the fleet state (null: the fleet is off).
                "bundle": self.bundles.as_ref().map(|b| b.report()),
                "mqtt": mqtt,
            },
            "ingest": {"interval_s": INTERVAL_S, "sources": sources},
            "wal": {
                "bytes": stats.live_bytes,
                "limit_bytes": self.wal_max_bytes,
                "disk_free_bytes": stats.disk_free_bytes,
                "backpressure": stats.backpressure,
                // `gateway_wal_full_in_seconds`, as in /readyz and the fleet
                // state (null: the WAL does not grow).
                "full_in_s": self.metrics.wal_growth.full_in().map(|f| f.seconds),
            },
            "sinks": rows,
            "dead_letters": {"total": dead_total, "recent": recent},
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_keeps_the_last_thirty_intervals() {
        let s = StatusSource::new(
            Metrics::unregistered(),
            vec!["a".into()],
            1 << 20,
            None,
            None,
        );
        for _ in 0..100 {
            s.take_snapshot();
        }
        assert_eq!(s.ring.lock().unwrap().len(), POINTS + 1);
    }
}
