//! The gateway's own Prometheus metrics (prefix `gateway_`).
//!
//! One [`Metrics`] value is built at start-up against the registry that the
//! HTTP layer serves on `/metrics`, and cloned into every actor: a clone is
//! one reference count (the ingest paths clone it per message), and every
//! clone shares the same series.

use prometheus::{
    exponential_buckets, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry,
};

/// `gateway_e2e_latency_seconds`'s buckets: doubling from 1 ms to ~9 min,
/// with more between 16 and 128 ms, where the sinks' latency targets lie
/// (e.g. the MQTT sink's p99 <= 50 ms at 1k records/s), so that a p99
/// read from them is not a guess across a bucket twice its size.
const E2E_BUCKETS: [f64; 25] = [
    0.001, 0.002, 0.004, 0.008, 0.016, 0.024, 0.032, 0.04, 0.05, 0.064, 0.08, 0.1, 0.128, 0.256,
    0.512, 1.024, 2.048, 4.096, 8.192, 16.384, 32.768, 65.536, 131.072, 262.144, 524.288,
];

/// A shared handle to the [`MetricSet`]; fields are read through `Deref`.
#[derive(Clone)]
pub struct Metrics(std::sync::Arc<MetricSet>);

impl std::ops::Deref for Metrics {
    type Target = MetricSet;
    fn deref(&self) -> &MetricSet {
        &self.0
    }
}

/// Every metric the actors move. Field names follow the metric names.
pub struct MetricSet {
    /// `gateway_ingest_records_total{source,outcome}`: records by outcome (accepted, duplicate, rejected).
    pub ingest_records: IntCounterVec,
    /// `gateway_ingest_rejected_total{source,reason}`: rejected messages by reason.
    pub ingest_rejected: IntCounterVec,
    /// `gateway_wal_append_seconds`: time from a group's first append request to its commit.
    pub wal_append_seconds: Histogram,
    /// `gateway_wal_group_size`: records committed per group commit (one fsync).
    pub wal_group_size: Histogram,
    /// `gateway_wal_commits_total`: group commits that wrote (each one fsync).
    pub wal_commits: IntCounter,
    /// `gateway_wal_records{sink,state}`: records per sink in state enqueued, inflight, dead.
    pub wal_records: IntGaugeVec,
    /// `gateway_wal_stored_records`: records stored in the WAL (all sinks, before compaction).
    pub wal_stored_records: IntGauge,
    /// `gateway_wal_bytes`: bytes of live data in the WAL database.
    pub wal_bytes: IntGauge,
    /// `gateway_wal_disk_free_bytes`: free bytes on the WAL's file system.
    pub wal_disk_free_bytes: IntGauge,
    /// `gateway_wal_pending_bytes{sink,state}`: estimated WAL bytes of the
    /// records a sink has not finished (enqueued, inflight) or dead-lettered.
    pub wal_pending_bytes: IntGaugeVec,
    /// `gateway_wal_oldest_pending_age_seconds{sink}`: age of the oldest record not yet delivered.
    pub wal_oldest_pending_age: IntGaugeVec,
    /// `gateway_wal_class_records{sink,class}`: records a sink has not finished, per priority class.
    pub wal_class_records: IntGaugeVec,
    /// `gateway_wal_class_oldest_pending_age_seconds{sink,class}`: age of the oldest of them.
    pub wal_class_oldest_age: IntGaugeVec,
    /// `gateway_wal_expired_total{sink,class}`: records expired for a sink (TTL), now its dead letters.
    pub wal_expired: IntCounterVec,
    /// `gateway_ingest_unrouted_total`: records stored that no sink's route took.
    pub ingest_unrouted: IntCounter,
    /// `gateway_wal_compacted_records_total`: acked records removed after retention.
    pub wal_compacted: IntCounter,
    /// `gateway_wal_dropped_records_total`: records dropped by the `drop_oldest` policy.
    pub wal_dropped: IntCounter,
    /// `gateway_backpressure_active`: 1 while ingest is refused to protect the disk.
    pub backpressure_active: IntGauge,
    /// `gateway_sink_publish_total{sink,outcome}`: batches by outcome (ok, retry, dead).
    pub sink_publish: IntCounterVec,
    /// `gateway_sink_publish_seconds{sink}`: time one publish attempt of a batch took.
    pub sink_publish_seconds: HistogramVec,
    /// `gateway_sink_records_total{sink,outcome}`: records delivered (ok) or dead-lettered (dead).
    pub sink_records: IntCounterVec,
    /// `gateway_sink_up{sink}`: 1 when the last publish succeeded, 0 after a failure.
    pub sink_up: IntGaugeVec,
    /// `gateway_sink_circuit_open{sink}`: 1 while the sink's circuit is open (target down).
    pub sink_circuit_open: IntGaugeVec,
    /// `gateway_sink_paused{sink}`: 1 while the sink is paused.
    pub sink_paused: IntGaugeVec,
    /// `gateway_e2e_latency_seconds{sink}`: receive → sink acknowledgement, per record.
    pub e2e_latency_seconds: HistogramVec,
    /// `gateway_archive_bytes{sink}`: bytes of a local (`file://`) archive's objects.
    pub archive_bytes: IntGaugeVec,
    /// `gateway_archive_objects{sink}`: objects in a local archive.
    pub archive_objects: IntGaugeVec,
    /// `gateway_archive_merged_objects_total{sink}`: objects merged into one per closed hour.
    pub archive_merged: IntCounterVec,
    /// `gateway_archive_pruned_objects_total{sink}`: oldest objects deleted to stay under `max_bytes`.
    pub archive_pruned: IntCounterVec,
    /// `gateway_mqtt_enabled`: 1 when MQTT ingest is configured (`mqtt.url` not `off`).
    pub mqtt_enabled: IntGauge,
    /// `gateway_mqtt_connected`: 1 while MQTT ingest is connected and subscribed.
    pub mqtt_connected: IntGauge,
    /// `gateway_mqtt_reconnects_total`: lost MQTT connections (each followed by a reconnect).
    pub mqtt_reconnects: IntCounter,
    /// `gateway_actor_restarts_total{actor}`: supervised restarts.
    pub actor_restarts: IntCounterVec,
    /// `gateway_control_commands_total{command,outcome}`: operator commands
    /// (MQTT control plane, admin API, CLI) by outcome (ok, error).
    pub control_commands: IntCounterVec,
    /// `gateway_fleet_commands_total{result}`: commands from the fleet
    /// broker by result: ok, error (ran and failed), or why it was refused
    /// (unsigned, bad_signature, expired, replayed, unknown_key,
    /// wrong_target, bad_request).
    pub fleet_commands: IntCounterVec,
    /// `gateway_fleet_connected`: 1 while connected to the fleet broker.
    pub fleet_connected: IntGauge,
    /// `gateway_fleet_bundle_info{version,status}`: 1 for the config
    /// bundle's current version and status (none, applying, probation,
    /// active, rolled_back); one series at a time.
    pub fleet_bundle: IntGaugeVec,
    /// Each sink's last publish error, redacted, until a publish succeeds
    /// (`/admin/sinks`, the fleet state). Not a Prometheus series: kept
    /// here because it moves where `gateway_sink_publish_total` does.
    pub sink_last_error: LastErrors,
    // --- the uplink (DESIGN §6b) ---
    /// `gateway_sink_sent_bytes_total{sink}`: bytes of the bodies a sink
    /// delivered, as sent on the wire (after compression).
    pub sink_sent_bytes: IntCounterVec,
    /// `gateway_sink_payload_bytes_total{sink}`: the same bodies before compression.
    pub sink_payload_bytes: IntCounterVec,
    /// `gateway_wal_full_in_seconds{limit}`: time until the nearer WAL limit
    /// (`max_bytes` or `disk_free`) at the current net growth; absent while
    /// the WAL does not grow ([`crate::growth`]).
    pub wal_full_in_seconds: IntGaugeVec,
    /// `gateway_sink_held_records{sink,reason}`: records a sink holds back
    /// in the WAL, by reason (`budget`, `quota`).
    pub sink_held_records: IntGaugeVec,
    /// `gateway_sink_reduced_total{sink,kind}`: what report-by-exception
    /// kept off the wire: metric values within their deadband (`deadband`),
    /// metric values folded into an aggregate (`downsample`), and records
    /// left with nothing to send (`record`).
    pub sink_reduced: IntCounterVec,
    /// `gateway_sink_quota_remaining_bytes{sink}`: bytes left of a sink's quota this period.
    pub sink_quota_remaining: IntGaugeVec,
    /// `gateway_sink_quota_period_end_timestamp_seconds{sink}`: when a sink's quota period ends.
    pub sink_quota_period_end: IntGaugeVec,
    /// The samples behind `wal_full_in_seconds`.
    pub wal_growth: crate::growth::WalGrowth,
}

/// The last error text per key (redacted with [`crate::secret::redact`]
/// when set, at most 200 characters).
#[derive(Debug, Default)]
pub struct LastErrors(std::sync::Mutex<std::collections::BTreeMap<String, String>>);

impl LastErrors {
    /// Records `key`'s error, or clears it (`None`: it worked).
    pub fn set(&self, key: &str, error: Option<&str>) {
        if let Ok(mut m) = self.0.lock() {
            match error {
                Some(e) => {
                    m.insert(key.to_string(), crate::secret::redact(e, 200));
                }
                None => {
                    m.remove(key);
                }
            }
        }
    }

    /// `key`'s last error, if any.
    pub fn get(&self, key: &str) -> Option<String> {
        self.0.lock().ok().and_then(|m| m.get(key).cloned())
    }
}

impl Metrics {
    /// Creates every metric and registers it in `registry`.
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let latency = exponential_buckets(0.0005, 2.0, 16)?;
        let m = MetricSet {
            ingest_records: IntCounterVec::new(
                Opts::new("gateway_ingest_records_total", "Telemetry records received, by source and outcome (accepted, duplicate, rejected)."),
                &["source", "outcome"],
            )?,
            ingest_rejected: IntCounterVec::new(
                Opts::new("gateway_ingest_rejected_total", "Telemetry messages rejected, by source and reason."),
                &["source", "reason"],
            )?,
            wal_append_seconds: Histogram::with_opts(
                HistogramOpts::new("gateway_wal_append_seconds", "Time from receiving a group of appends to its durable commit (fsync).")
                    .buckets(latency.clone()),
            )?,
            wal_group_size: Histogram::with_opts(
                HistogramOpts::new("gateway_wal_group_size", "Records committed per WAL group commit.")
                    .buckets(exponential_buckets(1.0, 4.0, 8)?),
            )?,
            wal_commits: IntCounter::new("gateway_wal_commits_total", "WAL group commits that wrote (one fsync each).")?,
            wal_records: IntGaugeVec::new(
                Opts::new("gateway_wal_records", "Records in the WAL per sink and delivery state (enqueued, inflight, dead)."),
                &["sink", "state"],
            )?,
            wal_stored_records: IntGauge::new("gateway_wal_stored_records", "Records stored in the WAL, delivered or not, before compaction.")?,
            wal_bytes: IntGauge::new("gateway_wal_bytes", "Bytes of live data in the WAL database.")?,
            wal_disk_free_bytes: IntGauge::new("gateway_wal_disk_free_bytes", "Free bytes on the file system that holds the WAL.")?,
            wal_pending_bytes: IntGaugeVec::new(
                Opts::new(
                    "gateway_wal_pending_bytes",
                    "Estimated WAL bytes held for a sink, by state (enqueued, inflight, dead): records times the mean stored record size.",
                ),
                &["sink", "state"],
            )?,
            wal_oldest_pending_age: IntGaugeVec::new(
                Opts::new("gateway_wal_oldest_pending_age_seconds", "Age of the oldest record not yet delivered to the sink."),
                &["sink"],
            )?,
            wal_class_records: IntGaugeVec::new(
                Opts::new("gateway_wal_class_records", "Records a sink has not finished (enqueued or inflight), per priority class."),
                &["sink", "class"],
            )?,
            wal_class_oldest_age: IntGaugeVec::new(
                Opts::new("gateway_wal_class_oldest_pending_age_seconds", "Age of the oldest record of the class not yet delivered to the sink."),
                &["sink", "class"],
            )?,
            wal_expired: IntCounterVec::new(
                Opts::new("gateway_wal_expired_total", "Records not delivered to a sink within their class's TTL: expired for that sink and kept as its dead letters (reason expired)."),
                &["sink", "class"],
            )?,
            ingest_unrouted: IntCounter::new("gateway_ingest_unrouted_total", "Records stored that no sink's route took (kept for retention and replay).")?,
            wal_compacted: IntCounter::new("gateway_wal_compacted_records_total", "Delivered records removed from the WAL after retention.")?,
            wal_dropped: IntCounter::new("gateway_wal_dropped_records_total", "Records dropped by the drop_oldest backpressure policy.")?,
            backpressure_active: IntGauge::new("gateway_backpressure_active", "1 while ingest is refused because the WAL is full or the disk is low.")?,
            sink_publish: IntCounterVec::new(
                Opts::new("gateway_sink_publish_total", "Batch publish attempts per sink, by outcome (ok, retry, dead)."),
                &["sink", "outcome"],
            )?,
            sink_publish_seconds: HistogramVec::new(
                HistogramOpts::new("gateway_sink_publish_seconds", "Duration of one publish attempt of a batch.").buckets(latency.clone()),
                &["sink"],
            )?,
            sink_records: IntCounterVec::new(
                Opts::new("gateway_sink_records_total", "Records per sink by final outcome (ok = delivered, dead = dead-lettered)."),
                &["sink", "outcome"],
            )?,
            sink_up: IntGaugeVec::new(
                Opts::new("gateway_sink_up", "1 when the sink's last publish succeeded, 0 after a failure."),
                &["sink"],
            )?,
            sink_circuit_open: IntGaugeVec::new(
                Opts::new("gateway_sink_circuit_open", "1 while the sink's circuit is open: its target looks down and attempts are spaced-out probes."),
                &["sink"],
            )?,
            sink_paused: IntGaugeVec::new(Opts::new("gateway_sink_paused", "1 while the sink is paused."), &["sink"])?,
            e2e_latency_seconds: HistogramVec::new(
                HistogramOpts::new("gateway_e2e_latency_seconds", "Per record time from receipt by the gateway to the sink's acknowledgement.")
                    .buckets(E2E_BUCKETS.to_vec()),
                &["sink"],
            )?,
            archive_bytes: IntGaugeVec::new(
                Opts::new("gateway_archive_bytes", "Bytes of the objects in a local (file://) archive, counted by its upkeep pass."),
                &["sink"],
            )?,
            archive_objects: IntGaugeVec::new(
                Opts::new("gateway_archive_objects", "Objects in a local (file://) archive, counted by its upkeep pass."),
                &["sink"],
            )?,
            archive_merged: IntCounterVec::new(
                Opts::new("gateway_archive_merged_objects_total", "Objects of a local archive merged into one object per closed hour."),
                &["sink"],
            )?,
            archive_pruned: IntCounterVec::new(
                Opts::new("gateway_archive_pruned_objects_total", "Oldest objects of a local archive deleted to keep it under its max_bytes."),
                &["sink"],
            )?,
            mqtt_enabled: IntGauge::new(
                "gateway_mqtt_enabled",
                "1 when MQTT ingest is configured (mqtt.url is not off).",
            )?,
            mqtt_connected: IntGauge::new(
                "gateway_mqtt_connected",
                "1 while MQTT ingest is connected and subscribed.",
            )?,
            mqtt_reconnects: IntCounter::new(
                "gateway_mqtt_reconnects_total",
                "MQTT ingest connections lost (each followed by a reconnect with backoff).",
            )?,
            actor_restarts: IntCounterVec::new(
                Opts::new("gateway_actor_restarts_total", "Supervised actor restarts, by actor."),
                &["actor"],
            )?,
            control_commands: IntCounterVec::new(
                Opts::new(
                    "gateway_control_commands_total",
                    "Operator commands (MQTT control plane, admin API, CLI), by command and outcome (ok, error).",
                ),
                &["command", "outcome"],
            )?,
            fleet_commands: IntCounterVec::new(
                Opts::new(
                    "gateway_fleet_commands_total",
                    "Commands from the fleet broker, by result (ok, error, or the reason it was refused).",
                ),
                &["result"],
            )?,
            fleet_connected: IntGauge::new(
                "gateway_fleet_connected",
                "1 while connected to the fleet broker.",
            )?,
            fleet_bundle: IntGaugeVec::new(
                Opts::new(
                    "gateway_fleet_bundle_info",
                    "1 for the config bundle's version and status (none, applying, probation, active, rolled_back).",
                ),
                &["version", "status"],
            )?,
            sink_last_error: LastErrors::default(),
            // --- the uplink (DESIGN §6b) ---
            sink_sent_bytes: IntCounterVec::new(
                Opts::new(
                    "gateway_sink_sent_bytes_total",
                    "Bytes a sink delivered, on the wire (after compression).",
                ),
                &["sink"],
            )?,
            sink_payload_bytes: IntCounterVec::new(
                Opts::new(
                    "gateway_sink_payload_bytes_total",
                    "Bytes a sink delivered, before compression.",
                ),
                &["sink"],
            )?,
            wal_full_in_seconds: IntGaugeVec::new(
                Opts::new(
                    "gateway_wal_full_in_seconds",
                    "Seconds until the WAL reaches its nearer limit (label limit: max_bytes or disk_free) at the current net growth; absent while it does not grow.",
                ),
                &["limit"],
            )?,
            sink_held_records: IntGaugeVec::new(
                Opts::new(
                    "gateway_sink_held_records",
                    "Records a sink holds back in the WAL, by reason (budget).",
                ),
                &["sink", "reason"],
            )?,
            sink_reduced: IntCounterVec::new(
                Opts::new(
                    "gateway_sink_reduced_total",
                    "What report-by-exception kept off a sink's wire, by kind (deadband, downsample: metric values; record: records).",
                ),
                &["sink", "kind"],
            )?,
            sink_quota_remaining: IntGaugeVec::new(
                Opts::new(
                    "gateway_sink_quota_remaining_bytes",
                    "Bytes left of a sink's quota in the current period.",
                ),
                &["sink"],
            )?,
            sink_quota_period_end: IntGaugeVec::new(
                Opts::new(
                    "gateway_sink_quota_period_end_timestamp_seconds",
                    "When the current period of a sink's quota ends (Unix time).",
                ),
                &["sink"],
            )?,
            wal_growth: Default::default(),
        };
        registry.register(Box::new(m.ingest_records.clone()))?;
        registry.register(Box::new(m.ingest_rejected.clone()))?;
        registry.register(Box::new(m.wal_append_seconds.clone()))?;
        registry.register(Box::new(m.wal_group_size.clone()))?;
        registry.register(Box::new(m.wal_commits.clone()))?;
        registry.register(Box::new(m.wal_records.clone()))?;
        registry.register(Box::new(m.wal_stored_records.clone()))?;
        registry.register(Box::new(m.wal_bytes.clone()))?;
        registry.register(Box::new(m.wal_pending_bytes.clone()))?;
        registry.register(Box::new(m.wal_disk_free_bytes.clone()))?;
        registry.register(Box::new(m.wal_oldest_pending_age.clone()))?;
        registry.register(Box::new(m.fleet_commands.clone()))?;
        registry.register(Box::new(m.fleet_connected.clone()))?;
        registry.register(Box::new(m.fleet_bundle.clone()))?;
        // Series that exist from the start (the dashboards' fleet panels
        // show them for every gateway, fleet on or off).
        m.fleet_bundle.with_label_values(&["none", "none"]).set(1);
        for result in ["ok", "error"] {
            m.fleet_commands.with_label_values(&[result]);
        }
        registry.register(Box::new(m.wal_class_records.clone()))?;
        registry.register(Box::new(m.wal_class_oldest_age.clone()))?;
        registry.register(Box::new(m.wal_expired.clone()))?;
        registry.register(Box::new(m.ingest_unrouted.clone()))?;
        registry.register(Box::new(m.wal_compacted.clone()))?;
        registry.register(Box::new(m.wal_dropped.clone()))?;
        registry.register(Box::new(m.backpressure_active.clone()))?;
        registry.register(Box::new(m.sink_publish.clone()))?;
        registry.register(Box::new(m.sink_publish_seconds.clone()))?;
        registry.register(Box::new(m.sink_records.clone()))?;
        registry.register(Box::new(m.sink_up.clone()))?;
        registry.register(Box::new(m.sink_circuit_open.clone()))?;
        registry.register(Box::new(m.sink_paused.clone()))?;
        registry.register(Box::new(m.e2e_latency_seconds.clone()))?;
        registry.register(Box::new(m.archive_bytes.clone()))?;
        registry.register(Box::new(m.archive_objects.clone()))?;
        registry.register(Box::new(m.archive_merged.clone()))?;
        registry.register(Box::new(m.archive_pruned.clone()))?;
        registry.register(Box::new(m.mqtt_enabled.clone()))?;
        registry.register(Box::new(m.mqtt_connected.clone()))?;
        registry.register(Box::new(m.mqtt_reconnects.clone()))?;
        registry.register(Box::new(m.actor_restarts.clone()))?;
        registry.register(Box::new(m.control_commands.clone()))?;
        // --- the uplink (DESIGN §6b) ---
        registry.register(Box::new(m.sink_sent_bytes.clone()))?;
        registry.register(Box::new(m.sink_payload_bytes.clone()))?;
        registry.register(Box::new(m.wal_full_in_seconds.clone()))?;
        registry.register(Box::new(m.sink_held_records.clone()))?;
        registry.register(Box::new(m.sink_reduced.clone()))?;
        registry.register(Box::new(m.sink_quota_remaining.clone()))?;
        registry.register(Box::new(m.sink_quota_period_end.clone()))?;
        // Pre-create the restart series so a dashboard sees 0, not "no data".
        for actor in [
            "WalStore",
            "IngestRouter",
            "Dispatcher",
            "SinkActor",
            "MqttIngest",
            "ControlPlane",
            "FleetClient",
        ] {
            m.actor_restarts.with_label_values(&[actor]);
        }
        for outcome in ["ok", "error"] {
            m.control_commands.with_label_values(&["ping", outcome]);
        }
        Ok(Self(std::sync::Arc::new(m)))
    }

    /// Metrics registered in a private registry: for tests and tools.
    pub fn unregistered() -> Self {
        // Registration into a fresh registry cannot collide.
        Self::new(&Registry::new()).expect("fresh registry")
    }
}
