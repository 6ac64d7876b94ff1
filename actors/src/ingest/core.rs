//! [`IngestCore`]: the one door into the WAL for every ingest path.
//!
//! Validates, normalises and enriches a device payload into canonical
//! records ([`super::validate`]), applies the per-device rate limit and the
//! backpressure check, appends the records straight to the WAL writer
//! thread ([`WalWriter::append`]) and answers only after the commit. It is
//! shared (`Sync`): an HTTP worker runs it on its own thread, the MQTT
//! ingest through one of the routers ([`super::IngestRouters`]). Rate limit
//! and routes change on the core, for every path at once.
//!
//! Every refused ingest, whoever refuses it (the HTTP layer for
//! credentials, content type and size; the MQTT ingest for a topic that
//! matches no template; the core for everything else, before or after the
//! append), is counted and logged by [`IngestCore::reject`].

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tracing::Instrument as _;

use super::validate::{parse_payload, Enrichment, IngestLimits, Rejection, Source};
use crate::metrics::Metrics;
use crate::repeats::{self, Kind};
use crate::route::Routing;
use crate::trace;
use crate::wal::{now_ms, AppendOutcome, WalError, WalWriter};
use prometheus::IntCounter;

/// Per-device rate limit: a token bucket refilled at `per_second` records
/// per second up to `burst`. `per_second == 0` disables it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    /// Sustained records per second per device.
    pub per_second: f64,
    /// Bucket size.
    pub burst: f64,
}

impl RateLimit {
    /// No limit.
    pub const OFF: RateLimit = RateLimit {
        per_second: 0.0,
        burst: 0.0,
    };
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Rate-limit buckets are spread over this many locks (by a hash of the
/// device id), so that ingest threads rarely wait for each other.
const BUCKET_SHARDS: usize = 16;

/// FNV-1a of a device id: stable for a process.
pub(crate) fn device_hash(device_id: &str) -> u64 {
    device_id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Validation, rate limit, backpressure check and append: shared by every
/// ingest thread (HTTP workers and the MQTT routers).
pub struct IngestCore {
    /// The WAL writer's queue: a record is acknowledged only once it is
    /// committed there.
    wal: WalWriter,
    /// Stamped into every record (`gateway_id` of the canonical form).
    gateway_id: Arc<str>,
    /// Sizes and counts a body may have; fixed for the process's life.
    limits: IngestLimits,
    /// Per-device rate limit, a runtime setting (`ingest.rate_limit_*`).
    rate: RwLock<RateLimit>,
    /// Each device's token bucket, sharded by device id so that HTTP
    /// workers and the MQTT client rarely wait on one lock.
    buckets: [Mutex<HashMap<String, Bucket>>; BUCKET_SHARDS],
    /// Routes and priority classes in force, swapped whole when an
    /// operator changes them (a record sees one consistent set).
    routing: RwLock<Arc<Routing>>,
    /// Accepted, duplicate and rejected records, by source and reason.
    pub(super) metrics: Metrics,
    /// `gateway_ingest_records_total` accepted and duplicate, per source
    /// (HTTP, MQTT): resolved once, not per message.
    counted: Arc<[[IntCounter; 2]; 2]>,
}

impl IngestCore {
    /// A core appending to `wal`.
    pub fn new(
        wal: WalWriter,
        gateway_id: &str,
        limits: IngestLimits,
        rate: RateLimit,
        routing: Arc<Routing>,
        metrics: Metrics,
    ) -> Self {
        Self {
            wal,
            gateway_id: gateway_id.into(),
            limits,
            rate: RwLock::new(rate),
            buckets: std::array::from_fn(|_| Mutex::default()),
            routing: RwLock::new(routing),
            counted: Arc::new([Source::Http, Source::Mqtt].map(|s| {
                ["accepted", "duplicate"]
                    .map(|o| metrics.ingest_records.with_label_values(&[s.as_str(), o]))
            })),
            metrics,
        }
    }

    /// The per-device rate limit in force.
    pub fn rate_limit(&self) -> RateLimit {
        *self.rate.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Changes the per-device rate limit; every bucket starts over full.
    pub fn set_rate_limit(&self, rate: RateLimit) {
        *self.rate.write().unwrap_or_else(PoisonError::into_inner) = rate;
        self.clear_buckets();
        tracing::info!(
            per_second = rate.per_second,
            burst = rate.burst,
            "per-device rate limit changed"
        );
    }

    /// Replaces the routes and priority rules: they apply to records stored
    /// from now on.
    pub fn set_routing(&self, routing: Arc<Routing>) {
        *self.routing.write().unwrap_or_else(PoisonError::into_inner) = routing;
        tracing::info!(
            "routes and priority rules changed; they apply to records stored from now on"
        );
    }

    pub(super) fn clear_buckets(&self) {
        for shard in &self.buckets {
            shard.lock().unwrap_or_else(PoisonError::into_inner).clear();
        }
    }

    /// Forgets the buckets of devices quiet long enough to be full again.
    pub(super) fn forget_full_buckets(&self) {
        let now = Instant::now();
        let RateLimit { per_second, burst } = self.rate_limit();
        for shard in &self.buckets {
            shard
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .retain(|_, b| {
                    per_second > 0.0
                        && b.tokens + now.duration_since(b.at).as_secs_f64() * per_second < burst
                });
        }
    }

    /// Takes `n` tokens for `device`, or says how long until they exist.
    fn take_tokens(&self, device: &str, n: usize) -> Result<(), Duration> {
        let RateLimit { per_second, burst } = self.rate_limit();
        if per_second <= 0.0 {
            return Ok(());
        }
        let now = Instant::now();
        let shard = &self.buckets[(device_hash(device) % BUCKET_SHARDS as u64) as usize];
        let mut buckets = shard.lock().unwrap_or_else(PoisonError::into_inner);
        let b = match buckets.get_mut(device) {
            Some(b) => b,
            None => buckets.entry(device.to_string()).or_insert(Bucket {
                tokens: burst,
                at: now,
            }),
        };
        b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * per_second).min(burst);
        b.at = now;
        let n = n as f64;
        if b.tokens >= n {
            b.tokens -= n;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                ((n - b.tokens) / per_second).max(0.001),
            ))
        }
    }

    /// Counts and logs one refused ingest: the one place a reject is
    /// counted (`gateway_ingest_rejected_total{source,reason}` and
    /// `gateway_ingest_records_total{outcome="rejected"}`) and logged.
    pub fn reject(&self, source: Source, device_id: &str, correlation_id: &str, r: &Rejection) {
        count_and_log(&self.metrics, source, device_id, correlation_id, r);
    }
}

/// [`IngestCore::reject`], for the refusals that come after the append
/// (the future of an append outlives the borrow of its core).
fn count_and_log(
    metrics: &Metrics,
    source: Source,
    device_id: &str,
    correlation_id: &str,
    r: &Rejection,
) {
    metrics
        .ingest_rejected
        .with_label_values(&[source.as_str(), r.reason])
        .inc();
    metrics
        .ingest_records
        .with_label_values(&[source.as_str(), "rejected"])
        .inc();
    // Logged per device and reason at a bounded rate (crate::repeats): a
    // device that sends garbage all day writes a few lines a minute.
    if repeats::admit(Kind::IngestRejected, &format!("{device_id}/{}", r.reason)) {
        tracing::info!(
            source = source.as_str(),
            device_id,
            correlation_id,
            reason = r.reason,
            error = %r.message,
            "telemetry rejected"
        );
    }
}

/// Why an ingest was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The payload is invalid (HTTP 400/413, MQTT: acked and counted).
    #[error("{0}")]
    Rejected(#[from] Rejection),
    /// The device is over its rate limit (HTTP 429).
    #[error("rate limit exceeded for device {device_id}")]
    RateLimited {
        /// The device.
        device_id: String,
        /// When to try again.
        retry_after: Duration,
    },
    /// The WAL refuses appends to protect the disk (HTTP 503 + Retry-After).
    #[error("backpressure: {0}")]
    Backpressure(String),
    /// The WAL could not commit (HTTP 503): nothing was stored.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
}

/// How a payload is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadFormat {
    /// JSON object or array.
    Json,
    /// `proto/telemetry.proto`: `Telemetry` or `TelemetryBatch`.
    Protobuf,
    /// JSON when it starts with `{` or `[`, else Protobuf.
    Auto,
}

/// One accepted record.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RecordReceipt {
    /// Its seq (the original's, for a duplicate).
    pub seq: u64,
    /// Correlation id (the original's, for a duplicate).
    pub correlation_id: String,
    /// True when the idempotency key was already known.
    pub duplicate: bool,
}

/// What an accepted ingest stored.
#[derive(Debug, Clone)]
pub struct IngestReceipt {
    /// The payload was a JSON array.
    pub batch: bool,
    /// One receipt per record, in payload order.
    pub records: Vec<RecordReceipt>,
}

/// Validates a device payload and appends it durably; answers after the commit.
pub struct IngestTelemetry {
    /// HTTP or MQTT.
    pub source: Source,
    /// From the URL path or the topic.
    pub device_id: String,
    /// Raw payload.
    pub payload: Bytes,
    /// How to read it (HTTP: JSON).
    pub payload_format: PayloadFormat,
    /// Correlation id of this request.
    pub correlation_id: String,
    /// Producer idempotency key (HTTP header), if any.
    pub idempotency_key: Option<String>,
    /// W3C traceparent of the producer, if any (stored with the records
    /// when traces are off).
    pub traceparent: Option<String>,
    /// Tags from the MQTT topic template (empty for HTTP).
    pub topic_tags: Vec<(String, String)>,
    /// The `ingest` span ([`trace::ingest_span`]; `Span::none()` when traces
    /// are off). When it is on, its context is the `traceparent` stored with
    /// the records, and `wal.append` is its child.
    pub span: tracing::Span,
}

impl IngestCore {
    /// Validates `msg` and appends its records: the checks run now, on the
    /// caller's thread; the future resolves after the commit.
    pub fn ingest(
        &self,
        msg: IngestTelemetry,
    ) -> impl Future<Output = Result<IngestReceipt, IngestError>> + 'static {
        let outcome = self.check_and_append(msg);
        async move {
            match outcome {
                Err(e) => Err(e),
                Ok(appending) => appending.await,
            }
        }
    }

    fn check_and_append(
        &self,
        msg: IngestTelemetry,
    ) -> Result<impl Future<Output = Result<IngestReceipt, IngestError>> + 'static, IngestError>
    {
        let source = msg.source;
        let own_traceparent = trace::traceparent_of(&msg.span);
        // Rejections logged below become events of the ingest span.
        let span = msg.span.clone();
        let _in_span = span.enter();
        let routing = self
            .routing
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let enrich = Enrichment {
            gateway_id: &self.gateway_id,
            correlation_id: &msg.correlation_id,
            receive_ms: now_ms(),
            source,
            idempotency_key: msg.idempotency_key.as_deref(),
            traceparent: own_traceparent.as_deref().or(msg
                .traceparent
                .as_deref()
                .filter(|t| super::validate::is_traceparent(t))),
            topic_tags: &msg.topic_tags,
            routing: Some(&routing),
        };
        if let Some(key) = &msg.idempotency_key {
            if let Err(r) = super::validate::check_idempotency_header(key) {
                self.reject(source, &msg.device_id, &msg.correlation_id, &r);
                return Err(IngestError::Rejected(r));
            }
        }
        let looks_json = matches!(msg.payload.trim_ascii_start().first(), Some(b'{' | b'['));
        let protobuf = match msg.payload_format {
            PayloadFormat::Json => false,
            PayloadFormat::Protobuf => true,
            PayloadFormat::Auto => !looks_json,
        };
        let decoded = if protobuf {
            match super::protobuf::decode(&msg.payload) {
                Ok(json) => Bytes::from(json),
                Err(r) => {
                    self.reject(source, &msg.device_id, &msg.correlation_id, &r);
                    return Err(IngestError::Rejected(r));
                }
            }
        } else {
            msg.payload.clone()
        };
        let batch = decoded.trim_ascii_start().first() == Some(&b'[');
        let records = match parse_payload(&msg.device_id, &decoded, &self.limits, &enrich) {
            Ok(r) => r,
            Err(r) => {
                self.reject(source, &msg.device_id, &msg.correlation_id, &r);
                return Err(IngestError::Rejected(r));
            }
        };
        if let Err(retry_after) = self.take_tokens(&msg.device_id, records.len()) {
            let r = Rejection {
                reason: "rate_limited",
                message: "device over its rate limit".into(),
            };
            self.reject(source, &msg.device_id, &msg.correlation_id, &r);
            let device_id = msg.device_id;
            return Err(IngestError::RateLimited {
                device_id,
                retry_after,
            });
        }
        if self.wal.health().backpressure.load(Ordering::Relaxed) {
            let r = Rejection {
                reason: "backpressure",
                message: "WAL backpressure".into(),
            };
            self.reject(source, &msg.device_id, &msg.correlation_id, &r);
            let why = self
                .wal
                .health()
                .last_problem
                .lock()
                .ok()
                .and_then(|g| g.clone())
                .unwrap_or_else(|| "WAL is full".into());
            return Err(IngestError::Backpressure(why));
        }
        let (device_id, correlation_id) = (msg.device_id, msg.correlation_id);
        let metrics = self.metrics.clone();
        let counted = self.counted.clone();
        let append_span = trace::wal_append_span(&msg.span, records.len());
        let unrouted: Vec<bool> = records.iter().map(|r| r.route.sinks == Some(0)).collect();
        // Straight to the writer thread, from this thread.
        let append = self.wal.append(records);
        Ok(async move {
            let outcomes = match append.instrument(append_span).await {
                Ok(o) => o,
                Err(e) => {
                    let (reason, err) = match e {
                        WalError::Backpressure(why) => {
                            ("backpressure", IngestError::Backpressure(why))
                        }
                        e => ("storage", IngestError::Unavailable(e.to_string())),
                    };
                    let r = Rejection {
                        reason,
                        message: err.to_string(),
                    };
                    count_and_log(&metrics, source, &device_id, &correlation_id, &r);
                    return Err(err);
                }
            };
            let stored_unrouted = outcomes
                .iter()
                .zip(&unrouted)
                .filter(|(o, u)| **u && matches!(o, AppendOutcome::Appended { .. }))
                .count();
            if stored_unrouted > 0 {
                metrics.ingest_unrouted.inc_by(stored_unrouted as u64);
            }
            let receipts: Vec<RecordReceipt> = outcomes
                .into_iter()
                .map(|o| match o {
                    AppendOutcome::Appended { seq } => RecordReceipt {
                        seq,
                        correlation_id: correlation_id.clone(),
                        duplicate: false,
                    },
                    AppendOutcome::Duplicate {
                        seq,
                        correlation_id,
                    } => RecordReceipt {
                        seq,
                        correlation_id,
                        duplicate: true,
                    },
                })
                .collect();
            let dups = receipts.iter().filter(|r| r.duplicate).count() as u64;
            let [accepted, duplicate] = &counted[match source {
                Source::Http => 0,
                Source::Mqtt => 1,
            }];
            accepted.inc_by(receipts.len() as u64 - dups);
            if dups > 0 {
                duplicate.inc_by(dups);
            }
            Ok(IngestReceipt {
                batch,
                records: receipts,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_bucket_refuses_beyond_the_burst_and_says_when_to_retry() {
        let sys = actix::System::new();
        sys.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let wal = crate::wal::start_test_store(dir.path());
            let r = IngestCore::new(
                wal,
                "gw",
                IngestLimits::default(),
                RateLimit {
                    per_second: 10.0,
                    burst: 5.0,
                },
                Arc::default(),
                Metrics::unregistered(),
            );
            assert!(r.take_tokens("d", 5).is_ok());
            let wait = r.take_tokens("d", 1).unwrap_err();
            assert!(
                wait > Duration::from_millis(50) && wait <= Duration::from_millis(101),
                "{wait:?}"
            );
            assert!(r.take_tokens("other", 5).is_ok());
            // A new limit starts every bucket over full.
            r.set_rate_limit(RateLimit {
                per_second: 10.0,
                burst: 3.0,
            });
            assert!(r.take_tokens("d", 3).is_ok());
            assert!(r.take_tokens("d", 1).is_err());
        });
    }
}
