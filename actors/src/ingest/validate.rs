//! Validation, normalisation and enrichment of device telemetry (DESIGN §3).
//!
//! Pure functions: bytes in, canonical records (or a [`Rejection`]) out. The
//! same code serves HTTP and MQTT, so both paths accept and refuse exactly
//! the same payloads.

use chrono::{DateTime, SecondsFormat, TimeZone, Utc};
use serde::Serialize;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::route::{RecordRoute, RecordView, Routing};
use crate::wal::NewRecord;

/// Longest accepted `msg_id`.
pub const MAX_MSG_ID: usize = 64;
/// Longest metric or tag name.
pub const MAX_NAME: usize = 128;
/// Longest string metric or tag value ("short strings").
pub const MAX_STRING_VALUE: usize = 256;
/// Most metrics per record.
pub const MAX_METRICS: usize = 256;
/// Most tags per record.
pub const MAX_TAGS: usize = 64;
/// Largest accepted epoch-ms timestamp (2100-01-01).
const MAX_TS_MS: i64 = 4_102_444_800_000;

/// Where a record came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// `POST /ingest/{device_id}`.
    Http,
    /// `devices/{device_id}/telemetry`.
    Mqtt,
}

impl Source {
    /// The label used in records and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Http => "http",
            Source::Mqtt => "mqtt",
        }
    }
}

/// Why a payload was refused. `reason` is a stable machine-readable code
/// (also the `reason` label of `gateway_ingest_rejected_total`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}: {message}")]
pub struct Rejection {
    /// Stable code: `invalid_json`, `invalid_schema`, `invalid_device_id`,
    /// `unsupported_schema_version`, `too_large`, `empty_batch`, `batch_too_large`.
    pub reason: &'static str,
    /// Human-readable explanation naming the offending field.
    pub message: String,
}

impl Rejection {
    fn schema(message: impl Into<String>) -> Self {
        Self {
            reason: "invalid_schema",
            message: message.into(),
        }
    }
}

/// Limits applied to every payload.
#[derive(Debug, Clone)]
pub struct IngestLimits {
    /// Largest payload in bytes.
    pub max_payload_bytes: usize,
    /// Most records in one JSON array batch.
    pub max_batch_records: usize,
}

impl Default for IngestLimits {
    fn default() -> Self {
        Self {
            max_payload_bytes: 64 * 1024,
            max_batch_records: 1000,
        }
    }
}

/// Gateway-side facts added to every record.
#[derive(Debug, Clone)]
pub struct Enrichment<'a> {
    /// This gateway.
    pub gateway_id: &'a str,
    /// Request correlation id.
    pub correlation_id: &'a str,
    /// Receive time, epoch ms.
    pub receive_ms: i64,
    /// Where it came from.
    pub source: Source,
    /// Producer-supplied idempotency key (HTTP `Idempotency-Key`).
    pub idempotency_key: Option<&'a str>,
    /// W3C traceparent of the producer, stored with the record.
    pub traceparent: Option<&'a str>,
    /// Tags taken from the MQTT topic (`{tag:NAME}` segments); they win over
    /// the payload's tags of the same name.
    pub topic_tags: &'a [(String, String)],
    /// The rules that give each record its class and sink set (`None`:
    /// `normal`, every sink).
    pub routing: Option<&'a Routing>,
}

/// True when `id` matches `^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$`.
pub fn is_valid_device_id(id: &str) -> bool {
    let b = id.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

/// Checks a device id, naming the rule on failure.
pub fn check_device_id(id: &str) -> Result<(), Rejection> {
    if is_valid_device_id(id) {
        Ok(())
    } else {
        Err(Rejection {
            reason: "invalid_device_id",
            message: format!("device id {id:?} must match ^[A-Za-z0-9][A-Za-z0-9_.-]{{0,63}}$"),
        })
    }
}

#[derive(Serialize)]
struct CanonicalBody<'a> {
    idempotency_key: &'a str,
    correlation_id: &'a str,
    gateway_id: &'a str,
    device_id: &'a str,
    source: &'static str,
    receive_ts: &'a str,
    device_ts: &'a str,
    metrics: &'a Map<String, Value>,
    tags: &'a Map<String, Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    traceparent: Option<&'a str>,
}

/// Formats epoch ms as RFC 3339 UTC with milliseconds.
pub fn format_ts(ms: i64) -> String {
    Utc.timestamp_millis_opt(ms)
        .single()
        .map(|t| t.to_rfc3339_opts(SecondsFormat::Millis, true))
        .unwrap_or_default()
}

/// Parses a payload (one JSON object or a JSON array of them) into canonical
/// records, all or nothing.
pub fn parse_payload(
    device_id: &str,
    payload: &[u8],
    limits: &IngestLimits,
    enrich: &Enrichment<'_>,
) -> Result<Vec<NewRecord>, Rejection> {
    check_device_id(device_id)?;
    if payload.len() > limits.max_payload_bytes {
        return Err(Rejection {
            reason: "too_large",
            message: format!(
                "payload is {} bytes; the limit is {}",
                payload.len(),
                limits.max_payload_bytes
            ),
        });
    }
    let value: Value = serde_json::from_slice(payload).map_err(|e| Rejection {
        reason: "invalid_json",
        message: format!("payload is not valid JSON: {e}"),
    })?;
    let receive_ts = format_ts(enrich.receive_ms);
    match value {
        Value::Object(obj) => {
            let rec = to_record(device_id, obj, None, payload, enrich, &receive_ts)?;
            Ok(vec![rec])
        }
        Value::Array(items) => {
            if items.is_empty() {
                return Err(Rejection {
                    reason: "empty_batch",
                    message: "a batch must hold at least one record".into(),
                });
            }
            if items.len() > limits.max_batch_records {
                return Err(Rejection {
                    reason: "batch_too_large",
                    message: format!(
                        "batch holds {} records; the limit is {}",
                        items.len(),
                        limits.max_batch_records
                    ),
                });
            }
            items
                .into_iter()
                .enumerate()
                .map(|(i, item)| match item {
                    Value::Object(obj) => {
                        let raw = serde_json::to_vec(&obj).unwrap_or_default();
                        to_record(device_id, obj, Some(i), &raw, enrich, &receive_ts).map_err(|r| {
                            Rejection {
                                message: format!("record {i}: {}", r.message),
                                ..r
                            }
                        })
                    }
                    _ => Err(Rejection::schema(format!(
                        "record {i}: must be a JSON object"
                    ))),
                })
                .collect()
        }
        _ => Err(Rejection::schema(
            "payload must be a JSON object or an array of objects",
        )),
    }
}

fn to_record(
    device_id: &str,
    mut obj: Map<String, Value>,
    index: Option<usize>,
    raw: &[u8],
    enrich: &Enrichment<'_>,
    receive_ts: &str,
) -> Result<NewRecord, Rejection> {
    if let Some(k) = obj.keys().find(|k| {
        !matches!(
            k.as_str(),
            "schema_version" | "msg_id" | "ts" | "metrics" | "tags"
        )
    }) {
        return Err(Rejection::schema(format!("unknown field {k:?}")));
    }
    match obj.get("schema_version") {
        None => {}
        Some(Value::Number(n)) if n.as_u64() == Some(1) => {}
        Some(Value::Number(n)) => {
            return Err(Rejection {
                reason: "unsupported_schema_version",
                message: format!("schema_version {n} is not supported (supported: 1)"),
            })
        }
        Some(_) => return Err(Rejection::schema("schema_version must be an integer")),
    }
    let msg_id = match obj.get("msg_id") {
        None => None,
        Some(Value::String(s)) if !s.is_empty() && s.chars().count() <= MAX_MSG_ID => Some(s.clone()),
        Some(Value::Number(n)) if n.is_u64() => Some(n.to_string()),
        Some(_) => {
            return Err(Rejection::schema(format!(
                "msg_id must be a non-empty string of at most {MAX_MSG_ID} characters or a non-negative integer"
            )))
        }
    };
    let device_ts = match obj.get("ts") {
        None => {
            return Err(Rejection::schema(
                "ts is required (RFC 3339 string or epoch milliseconds)",
            ))
        }
        Some(Value::String(s)) => DateTime::parse_from_rfc3339(s)
            .map_err(|e| Rejection::schema(format!("ts {s:?} is not RFC 3339: {e}")))?
            .with_timezone(&Utc)
            .to_rfc3339_opts(SecondsFormat::Millis, true),
        Some(Value::Number(n)) => match n.as_i64() {
            Some(ms) if (0..=MAX_TS_MS).contains(&ms) => format_ts(ms),
            _ => {
                return Err(Rejection::schema(
                    "ts in epoch milliseconds must be an integer between 0 and 4102444800000",
                ))
            }
        },
        Some(_) => {
            return Err(Rejection::schema(
                "ts must be an RFC 3339 string or epoch milliseconds",
            ))
        }
    };
    let metrics = match obj.remove("metrics") {
        Some(Value::Object(m)) if !m.is_empty() => m,
        Some(Value::Object(_)) => return Err(Rejection::schema("metrics must not be empty")),
        None => return Err(Rejection::schema("metrics is required")),
        Some(_) => return Err(Rejection::schema("metrics must be an object")),
    };
    if metrics.len() > MAX_METRICS {
        return Err(Rejection::schema(format!(
            "at most {MAX_METRICS} metrics per record"
        )));
    }
    for (k, v) in &metrics {
        check_name("metric", k)?;
        match v {
            Value::Number(_) | Value::Bool(_) => {}
            Value::String(s) if s.len() <= MAX_STRING_VALUE => {}
            Value::String(_) => {
                return Err(Rejection::schema(format!(
                    "metric {k:?}: strings are limited to {MAX_STRING_VALUE} bytes"
                )))
            }
            _ => {
                return Err(Rejection::schema(format!(
                    "metric {k:?} must be a number, boolean or short string"
                )))
            }
        }
    }
    let mut tags = match obj.remove("tags") {
        None => Map::new(),
        Some(Value::Object(t)) => t,
        Some(_) => return Err(Rejection::schema("tags must be an object of strings")),
    };
    for (k, v) in enrich.topic_tags {
        tags.insert(k.clone(), Value::String(v.clone()));
    }
    if tags.len() > MAX_TAGS {
        return Err(Rejection::schema(format!(
            "at most {MAX_TAGS} tags per record"
        )));
    }
    for (k, v) in &tags {
        check_name("tag", k)?;
        match v {
            Value::String(s) if s.len() <= MAX_STRING_VALUE => {}
            _ => {
                return Err(Rejection::schema(format!(
                    "tag {k:?} must be a string of at most {MAX_STRING_VALUE} bytes"
                )))
            }
        }
    }
    let idempotency_key = match (&msg_id, enrich.idempotency_key, index) {
        (Some(id), _, _) => format!("{device_id}:{id}"),
        (None, Some(h), None) => format!("{device_id}:{h}"),
        (None, Some(h), Some(i)) => format!("{device_id}:{h}:{i}"),
        (None, None, _) => {
            let mut hasher = Sha256::new();
            hasher.update(device_id.as_bytes());
            hasher.update([0]);
            hasher.update(raw);
            format!("{device_id}:h:{}", &hex::encode(hasher.finalize())[..32])
        }
    };
    let body = CanonicalBody {
        idempotency_key: &idempotency_key,
        correlation_id: enrich.correlation_id,
        gateway_id: enrich.gateway_id,
        device_id,
        source: enrich.source.as_str(),
        receive_ts,
        device_ts: &device_ts,
        metrics: &metrics,
        tags: &tags,
        traceparent: enrich.traceparent,
    };
    let body = serde_json::to_string(&body).map_err(|e| Rejection::schema(e.to_string()))?;
    let route = enrich.routing.map_or_else(RecordRoute::default, |r| {
        r.decide(&RecordView {
            device_id,
            source: enrich.source.as_str(),
            tags: &tags,
            metrics: &metrics,
        })
    });
    Ok(NewRecord {
        idempotency_key,
        correlation_id: enrich.correlation_id.to_string(),
        device_id: device_id.to_string(),
        receive_ms: enrich.receive_ms,
        body,
        route,
    })
}

fn check_name(what: &str, k: &str) -> Result<(), Rejection> {
    if k.is_empty() || k.len() > MAX_NAME || k.chars().any(char::is_control) {
        return Err(Rejection::schema(format!(
            "{what} name {k:?} must be 1 to {MAX_NAME} bytes without control characters"
        )));
    }
    // serde_json (with its raw_value or arbitrary_precision features, as
    // here and in many consumers) reads an object whose first key is one of
    // its private tokens as something else: a stored record holding one
    // would not read back as the object it is (found by fuzzing).
    if k.starts_with("$serde_json::private::") {
        return Err(Rejection::schema(format!("{what} name {k:?} is reserved")));
    }
    Ok(())
}

/// `00-{32 hex}-{16 hex}-{2 hex}` (W3C Trace Context, version 00).
pub fn is_traceparent(v: &str) -> bool {
    let parts: Vec<&str> = v.split('-').collect();
    parts.len() == 4
        && [2, 32, 16, 2]
            .iter()
            .zip(&parts)
            .all(|(n, p)| p.len() == *n && p.bytes().all(|c| c.is_ascii_hexdigit()))
}

/// Checks an HTTP `Idempotency-Key` header value.
pub fn check_idempotency_header(v: &str) -> Result<(), Rejection> {
    if v.is_empty() || v.len() > 128 || !v.bytes().all(|c| c.is_ascii_graphic()) {
        return Err(Rejection {
            reason: "invalid_idempotency_key",
            message: "Idempotency-Key must be 1 to 128 visible ASCII characters".into(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enrich() -> Enrichment<'static> {
        Enrichment {
            gateway_id: "edge-01",
            correlation_id: "c-1",
            receive_ms: 1_764_057_600_200,
            source: Source::Http,
            idempotency_key: None,
            traceparent: None,
            topic_tags: &[],
            routing: None,
        }
    }

    fn parse(p: &str) -> Result<Vec<NewRecord>, Rejection> {
        parse_payload("dev-1", p.as_bytes(), &IngestLimits::default(), &enrich())
    }

    #[test]
    fn a_valid_record_becomes_a_canonical_record() {
        let r = parse(r#"{"schema_version":1,"msg_id":"42","ts":"2026-11-25T09:00:00.123+01:00","metrics":{"t":21.5,"door":false},"tags":{"fw":"1.4.2"}}"#).unwrap();
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].idempotency_key, "dev-1:42");
        let v: Value = serde_json::from_str(&r[0].body).unwrap();
        assert_eq!(v["device_ts"], "2026-11-25T08:00:00.123Z");
        assert_eq!(v["gateway_id"], "edge-01");
        assert_eq!(v["source"], "http");
        assert_eq!(v["metrics"]["t"], 21.5);
        assert_eq!(v["receive_ts"], "2025-11-25T08:00:00.200Z");
    }

    #[test]
    fn epoch_millisecond_timestamps_are_accepted() {
        let r = parse(r#"{"ts":1764057600123,"metrics":{"t":1}}"#).unwrap();
        let v: Value = serde_json::from_str(&r[0].body).unwrap();
        assert_eq!(v["device_ts"], "2025-11-25T08:00:00.123Z");
        assert!(r[0].idempotency_key.starts_with("dev-1:h:"));
    }

    #[test]
    fn every_kind_of_bad_payload_is_rejected_with_a_reason() {
        let cases = [
            ("not json", "invalid_json"),
            ("[]", "empty_batch"),
            ("42", "invalid_schema"),
            (r#"{"metrics":{"t":1}}"#, "invalid_schema"),
            (r#"{"ts":"yesterday","metrics":{"t":1}}"#, "invalid_schema"),
            (r#"{"ts":-5,"metrics":{"t":1}}"#, "invalid_schema"),
            (r#"{"ts":1,"metrics":{}}"#, "invalid_schema"),
            (r#"{"ts":1,"metrics":{"t":null}}"#, "invalid_schema"),
            (r#"{"ts":1,"metrics":{"t":[1]}}"#, "invalid_schema"),
            (
                r#"{"ts":1,"metrics":{"t":1,"$serde_json::private::RawValue":"2"}}"#,
                "invalid_schema",
            ),
            (
                r#"{"ts":1,"metrics":{"t":1},"tags":{"$serde_json::private::Number":"2"}}"#,
                "invalid_schema",
            ),
            (
                r#"{"ts":1,"metrics":{"t":1},"tags":{"a":1}}"#,
                "invalid_schema",
            ),
            (
                r#"{"ts":1,"metrics":{"t":1},"extra":true}"#,
                "invalid_schema",
            ),
            (
                r#"{"schema_version":2,"ts":1,"metrics":{"t":1}}"#,
                "unsupported_schema_version",
            ),
            (
                r#"{"ts":1,"metrics":{"t":1},"msg_id":""}"#,
                "invalid_schema",
            ),
            (r#"[{"ts":1,"metrics":{"t":1}}, 3]"#, "invalid_schema"),
        ];
        for (payload, reason) in cases {
            assert_eq!(
                parse(payload).unwrap_err().reason,
                reason,
                "payload {payload}"
            );
        }
        let long = format!(
            r#"{{"ts":1,"metrics":{{"t":1}},"msg_id":"{}"}}"#,
            "x".repeat(65)
        );
        assert_eq!(parse(&long).unwrap_err().reason, "invalid_schema");
        assert_eq!(
            parse_payload("-bad", b"{}", &IngestLimits::default(), &enrich())
                .unwrap_err()
                .reason,
            "invalid_device_id"
        );
    }

    #[test]
    fn a_batch_is_parsed_whole_or_not_at_all() {
        let r = parse(
            r#"[{"ts":1,"metrics":{"t":1},"msg_id":"a"},{"ts":2,"metrics":{"t":2},"msg_id":"b"}]"#,
        )
        .unwrap();
        assert_eq!(r.len(), 2);
        let bad = parse(r#"[{"ts":1,"metrics":{"t":1}},{"ts":2}]"#).unwrap_err();
        assert!(bad.message.starts_with("record 1:"), "{}", bad.message);
    }

    #[test]
    fn device_ids_follow_the_contract_pattern() {
        assert!(is_valid_device_id("dev-1"));
        assert!(is_valid_device_id(&"a".repeat(64)));
        assert!(!is_valid_device_id(&"a".repeat(65)));
        assert!(!is_valid_device_id("_x"));
        assert!(!is_valid_device_id("a/b"));
        assert!(!is_valid_device_id(""));
    }
}
