//! The fuzz targets' bodies (`fuzz/`, `make fuzz`), here so that a plain
//! test replays the committed corpora in `make test` without libFuzzer
//! (`actors/tests/fuzz_corpus.rs`). Each takes arbitrary bytes, must never
//! panic, and checks what must hold for whatever it accepts.

use serde_json::Value;

use crate::ingest::validate::{parse_payload, Enrichment, IngestLimits, Source};
use crate::route::{parse_match, parse_priority, parse_ttl, RecordView, Routing};

/// JSON and Protobuf telemetry through decoding and validation: an accepted
/// record is canonical JSON for the same device.
pub fn telemetry(data: &[u8]) {
    let limits = IngestLimits::default();
    let routing = Routing {
        priority: parse_priority(
            "p",
            &serde_json::json!([{"class": "high", "match": {"metrics_any": ["alarm"]}}]),
        )
        .expect("valid rules"),
        sinks: Default::default(),
    };
    let tags = [("site".to_string(), "north".to_string())];
    let enrich = Enrichment {
        gateway_id: "fuzz",
        correlation_id: "c",
        receive_ms: 1_764_057_600_000,
        source: Source::Mqtt,
        idempotency_key: None,
        traceparent: None,
        topic_tags: &tags,
        routing: Some(&routing),
    };
    let decoded = crate::ingest::protobuf::decode(data).ok();
    for payload in [Some(data.to_vec()), decoded].into_iter().flatten() {
        if let Ok(records) = parse_payload("dev-1", &payload, &limits, &enrich) {
            for r in records {
                let v: Value = serde_json::from_str(&r.body).expect("the stored body is JSON");
                assert_eq!(v["device_id"], "dev-1");
                assert!(r.idempotency_key.starts_with("dev-1:"));
            }
        }
    }
}

/// Topic templates and topics: a template that parses yields a filter with
/// no named levels, and what it reads back has a device id.
pub fn topics(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let (template, topic) = text
        .split_once('\n')
        .unwrap_or((&text, "devices/d/telemetry"));
    if let Ok(t) = crate::mqtt::topics::Template::parse(template) {
        assert!(!t.filter().contains('{'), "{}", t.filter());
        if let Some(m) = t.read(topic) {
            assert!(topic.contains(&m.device_id));
        }
    }
    let _ = crate::mqtt::topics::Topics::from_filter(template);
}

/// Route, priority and TTL rules from JSON, then a decision on a record.
pub fn routes(data: &[u8]) {
    let Ok(v) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let _ = parse_ttl("ttl", &v);
    let route = parse_match("route", &v).ok();
    let priority = parse_priority("priority", &v).unwrap_or_default();
    let routing = Routing {
        priority,
        sinks: [
            ("a".to_string(), (1u64, route)),
            ("b".to_string(), (2u64, None)),
        ]
        .into(),
    };
    let (tags, metrics) = (serde_json::Map::new(), serde_json::Map::new());
    let d = routing.decide(&RecordView {
        device_id: "pump-1",
        source: "mqtt",
        tags: &tags,
        metrics: &metrics,
    });
    assert!(
        d.sinks.is_none_or(|s| s & 2 == 2),
        "b has no route: it takes everything"
    );
}

/// Control-plane commands: a name line, then JSON arguments.
pub fn control(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let (name, args) = text.split_once('\n').unwrap_or((&text, "null"));
    let args = serde_json::from_str(args).unwrap_or(Value::Null);
    if let Ok(cmd) = crate::control::Command::parse(name.trim(), args) {
        assert!(!cmd.name().is_empty());
    }
}
