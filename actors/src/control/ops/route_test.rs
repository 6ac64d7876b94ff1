//! `route.test`: which class and sinks each record of a payload would
//! get under the rules in force, validated as ingest would validate it.
//! Shared by the running gateway ([`Operator`]) and the CLI on a stopped
//! gateway (no WAL: the sinks get bits by name, [`bits_by_name`]).

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::{OpError, Operator};
use crate::ingest::validate::{parse_payload, Enrichment};
use crate::ingest::{IngestLimits, Source};
use crate::mqtt::topics::Topics;
use crate::route::Routing;

impl Operator {
    pub(super) fn route_test(
        &self,
        device_id: String,
        payload: Value,
        source: Source,
        topic: Option<String>,
    ) -> Result<Value, OpError> {
        let p = &self.p;
        let routing = self.overrides().routing(
            &p.base_priority,
            &p.base_policies,
            &bits_by_name(&p.base_policies),
        );
        route_test(
            &RouteTestContext {
                gateway_id: &p.gateway_id,
                routing: &routing,
                topics: &p.topics,
                limits: &p.limits,
            },
            device_id,
            payload,
            source,
            topic,
        )
    }
}

/// One bit per sink in name order: enough for `route.test`, which only
/// names the sinks (the WAL's own bits matter only for stored records).
pub fn bits_by_name<V>(sinks: &BTreeMap<String, V>) -> BTreeMap<String, u64> {
    sinks
        .keys()
        .enumerate()
        .map(|(i, n)| (n.clone(), 1u64 << i))
        .collect()
}

/// What `route.test` needs.
pub struct RouteTestContext<'a> {
    /// This gateway.
    pub gateway_id: &'a str,
    /// The rules in force.
    pub routing: &'a Routing,
    /// MQTT topic templates.
    pub topics: &'a Topics,
    /// Ingest limits.
    pub limits: &'a IngestLimits,
}

/// Which class and sinks each record of `payload` would get, validated as
/// ingest would (also for a stopped gateway without a WAL).
pub fn route_test(
    cx: &RouteTestContext<'_>,
    device_id: String,
    payload: Value,
    source: Source,
    topic: Option<String>,
) -> Result<Value, OpError> {
    let mut tags = Vec::new();
    if let Some(t) = &topic {
        let m = cx.topics.read(t).ok_or_else(|| {
            OpError::BadRequest(format!(
                "route.test: topic {t:?} matches no template of mqtt.topics ({})",
                cx.topics.texts().join(", ")
            ))
        })?;
        if m.device_id != device_id {
            return Err(OpError::BadRequest(format!(
                "route.test: topic {t:?} names device {:?}, not {device_id:?}",
                m.device_id
            )));
        }
        tags = m.tags;
    }
    let bytes = serde_json::to_vec(&payload).map_err(|e| OpError::Internal(e.to_string()))?;
    let enrich = Enrichment {
        gateway_id: cx.gateway_id,
        correlation_id: "route-test",
        receive_ms: crate::wal::now_ms(),
        source,
        idempotency_key: None,
        traceparent: None,
        topic_tags: &tags,
        routing: Some(cx.routing),
    };
    let records = parse_payload(&device_id, &bytes, cx.limits, &enrich).map_err(|r| {
        OpError::BadRequest(format!("route.test: the record would be refused: {r}"))
    })?;
    let out: Vec<Value> = records
        .iter()
        .map(|r| {
            let sinks = cx.routing.sink_names(r.route.sinks);
            json!({
                "class": r.route.class,
                "unrouted": sinks.is_empty(),
                "sinks": sinks,
            })
        })
        .collect();
    Ok(json!({
        "device_id": device_id,
        "source": source.as_str(),
        "topic_tags": tags.into_iter().collect::<BTreeMap<_, _>>(),
        "records": out,
    }))
}
