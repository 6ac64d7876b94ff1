//! Protobuf payloads (`proto/telemetry.proto`), decoded into the JSON shape
//! that [`super::validate`] checks, so both encodings obey the same rules.
//!
//! The message types are written with `prost` derives instead of generated
//! by `prost-build`, which would need `protoc` at build time; the field
//! numbers here must match the `.proto` file (a test round-trips them).

use std::collections::BTreeMap;

use prost::Message;
use serde_json::{Map, Number, Value};

use super::validate::Rejection;

/// `iot_gateway.v1.MetricValue`.
#[derive(Clone, PartialEq, Message)]
pub struct MetricValue {
    /// The value.
    #[prost(oneof = "metric_value::Value", tags = "1, 2, 3")]
    pub value: Option<metric_value::Value>,
}

/// Nested types of [`MetricValue`].
pub mod metric_value {
    /// `oneof value`.
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Value {
        /// A number.
        #[prost(double, tag = "1")]
        Number(f64),
        /// A boolean.
        #[prost(bool, tag = "2")]
        Flag(bool),
        /// A short string.
        #[prost(string, tag = "3")]
        Text(String),
    }
}

/// `iot_gateway.v1.Telemetry`.
#[derive(Clone, PartialEq, Message)]
pub struct Telemetry {
    /// 0 (unset) or 1.
    #[prost(uint32, tag = "1")]
    pub schema_version: u32,
    /// Optional message id.
    #[prost(string, tag = "2")]
    pub msg_id: String,
    /// Timestamp.
    #[prost(oneof = "telemetry::Ts", tags = "3, 4")]
    pub ts: Option<telemetry::Ts>,
    /// Metrics.
    #[prost(btree_map = "string, message", tag = "5")]
    pub metrics: BTreeMap<String, MetricValue>,
    /// Tags.
    #[prost(btree_map = "string, string", tag = "6")]
    pub tags: BTreeMap<String, String>,
}

/// Nested types of [`Telemetry`].
pub mod telemetry {
    /// `oneof ts`.
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Ts {
        /// RFC 3339.
        #[prost(string, tag = "3")]
        TsRfc3339(String),
        /// Epoch milliseconds.
        #[prost(int64, tag = "4")]
        TsMs(i64),
    }
}

/// `iot_gateway.v1.TelemetryBatch`.
#[derive(Clone, PartialEq, Message)]
pub struct TelemetryBatch {
    /// The records.
    #[prost(message, repeated, tag = "1")]
    pub records: Vec<Telemetry>,
}

fn to_json(t: Telemetry) -> Result<Value, Rejection> {
    let mut obj = Map::new();
    if t.schema_version != 0 {
        obj.insert("schema_version".into(), Value::from(t.schema_version));
    }
    if !t.msg_id.is_empty() {
        obj.insert("msg_id".into(), Value::String(t.msg_id));
    }
    match t.ts {
        Some(telemetry::Ts::TsRfc3339(s)) => obj.insert("ts".into(), Value::String(s)),
        Some(telemetry::Ts::TsMs(ms)) => obj.insert("ts".into(), Value::from(ms)),
        None => None,
    };
    let mut metrics = Map::new();
    for (k, v) in t.metrics {
        let v = match v.value {
            Some(metric_value::Value::Number(n)) => {
                Value::Number(Number::from_f64(n).ok_or_else(|| Rejection {
                    reason: "invalid_schema",
                    message: format!("metric {k:?} is not a finite number"),
                })?)
            }
            Some(metric_value::Value::Flag(b)) => Value::Bool(b),
            Some(metric_value::Value::Text(s)) => Value::String(s),
            None => Value::Null, // rejected by validation with the metric's name
        };
        metrics.insert(k, v);
    }
    obj.insert("metrics".into(), Value::Object(metrics));
    if !t.tags.is_empty() {
        let tags = t
            .tags
            .into_iter()
            .map(|(k, v)| (k, Value::String(v)))
            .collect();
        obj.insert("tags".into(), Value::Object(tags));
    }
    Ok(Value::Object(obj))
}

/// Decodes a `Telemetry` or a `TelemetryBatch` into JSON bytes. A batch is
/// recognised by its field 1 being a length-delimited message whose own
/// decoding as `Telemetry` would fail to find metrics.
pub fn decode(payload: &[u8]) -> Result<Vec<u8>, Rejection> {
    let undecodable = |e: prost::DecodeError| Rejection {
        reason: "invalid_protobuf",
        message: format!("payload is not a valid Telemetry or TelemetryBatch message: {e}"),
    };
    let single = Telemetry::decode(payload);
    let value = match single {
        Ok(t) if !t.metrics.is_empty() || t.ts.is_some() => to_json(t)?,
        _ => {
            let batch = TelemetryBatch::decode(payload).map_err(undecodable)?;
            if batch.records.is_empty() {
                // Neither shape: report it as the single message it most likely was.
                match Telemetry::decode(payload) {
                    Ok(t) => to_json(t)?,
                    Err(e) => return Err(undecodable(e)),
                }
            } else {
                Value::Array(
                    batch
                        .records
                        .into_iter()
                        .map(to_json)
                        .collect::<Result<_, _>>()?,
                )
            }
        }
    };
    serde_json::to_vec(&value).map_err(|e| Rejection {
        reason: "invalid_protobuf",
        message: e.to_string(),
    })
}

/// Encodes a single record (tests, tools, load generators).
pub fn encode(t: &Telemetry) -> Vec<u8> {
    t.encode_to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Telemetry {
        let mut metrics = BTreeMap::new();
        metrics.insert(
            "t".to_string(),
            MetricValue {
                value: Some(metric_value::Value::Number(21.5)),
            },
        );
        metrics.insert(
            "door".to_string(),
            MetricValue {
                value: Some(metric_value::Value::Flag(true)),
            },
        );
        Telemetry {
            schema_version: 1,
            msg_id: "42".into(),
            ts: Some(telemetry::Ts::TsMs(1_764_057_600_123)),
            metrics,
            tags: BTreeMap::from([("fw".to_string(), "1.4.2".to_string())]),
        }
    }

    #[test]
    fn a_protobuf_record_decodes_to_the_json_shape() {
        let json: Value = serde_json::from_slice(&decode(&encode(&sample())).unwrap()).unwrap();
        assert_eq!(json["msg_id"], "42");
        assert_eq!(json["ts"], 1_764_057_600_123i64);
        assert_eq!(json["metrics"]["t"], 21.5);
        assert_eq!(json["metrics"]["door"], true);
        assert_eq!(json["tags"]["fw"], "1.4.2");
    }

    #[test]
    fn a_protobuf_batch_decodes_to_a_json_array() {
        let batch = TelemetryBatch {
            records: vec![sample(), sample()],
        };
        let json: Value = serde_json::from_slice(&decode(&batch.encode_to_vec()).unwrap()).unwrap();
        assert_eq!(json.as_array().unwrap().len(), 2);
    }

    #[test]
    fn garbage_is_rejected_as_invalid_protobuf() {
        assert_eq!(
            decode(&[0xff, 0xff, 0xff, 0x01]).unwrap_err().reason,
            "invalid_protobuf"
        );
    }
}
