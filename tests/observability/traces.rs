//! Traces from the real binary to a real OTLP receiver (`oteltap`): one
//! HTTP ingest with a `traceparent` header and one MQTT v5 ingest with a
//! `traceparent` user property, delivered to two sinks (the file archive,
//! and an analytics API that fails the first attempt so a retry happens).

use std::time::Duration;

use serde_json::Value;

use crate::analytics::{Analytics, Mode};
use crate::binary::{attr, LoggedGateway, OtelTap};
use crate::broker::{mosquitto_pub, Mosquitto};
use crate::helpers::{archived_records, metric_value, request, telemetry, wait_until};

const HTTP_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const HTTP_PARENT: &str = "00f067aa0ba902b7";
const MQTT_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const MQTT_PARENT: &str = "b7ad6b7169203331";

fn int_attr(span: &Value, key: &str) -> Option<i64> {
    span["attributes"]
        .as_array()?
        .iter()
        .find(|a| a["key"] == key)
        .and_then(|a| a["value"]["intValue"].as_str()?.parse().ok())
}

fn named<'a>(spans: &'a [Value], name: &str) -> Vec<&'a Value> {
    spans.iter().filter(|s| s["name"] == name).collect()
}

fn by_id<'a>(spans: &'a [Value], id: &Value) -> Option<&'a Value> {
    spans.iter().find(|s| &s["spanId"] == id)
}

fn metric(gw: &LoggedGateway, series: &str) -> f64 {
    metric_value(&request(ureq::get(&gw.url("/metrics")), None).text, series)
}

#[test]
fn spans_of_an_http_and_an_mqtt_ingest_reach_a_real_otlp_receiver_with_parents_links_and_attributes(
) {
    let dir = tempfile::tempdir().unwrap();
    let tap = OtelTap::start(dir.path());
    let broker = Mosquitto::start(dir.path(), "allow_anonymous true", "");
    let api = Analytics::start();
    api.set(Mode::Fail(503, None));
    let archive = dir.path().join("archive");
    let config = format!(
        r#"gateway_id = "edge-trace"
[log]
level = "warn"
[otlp]
endpoint = "{endpoint}"
[mqtt]
url = "mqtt://127.0.0.1:{mqtt}"
version = "5"
[sinks.archive]
kind = "s3"
url = "file://{archive}"
batch_max_wait_ms = 300
[sinks.analytics]
kind = "http"
url = "{api}"
batch_max_wait_ms = 300
retry_base_ms = 300
"#,
        endpoint = tap.endpoint(),
        mqtt = broker.port,
        archive = archive.display(),
        api = api.url(),
    );
    let mut gw = LoggedGateway::start(dir.path(), &config, &[]);

    let resp = request(
        ureq::post(&gw.url("/ingest/dev-http"))
            .set("Content-Type", "application/json")
            .set("traceparent", &format!("00-{HTTP_TRACE}-{HTTP_PARENT}-01"))
            .set("X-Correlation-Id", "corr-http-1"),
        Some(&telemetry("m-http", 21.5)),
    );
    assert_eq!(resp.status, 202, "{}", resp.text);
    let (ok, err) = mosquitto_pub(
        broker.port,
        "devices/dev-mqtt/telemetry",
        &[
            "-V",
            "mqttv5",
            "-D",
            "publish",
            "user-property",
            "traceparent",
            &format!("00-{MQTT_TRACE}-{MQTT_PARENT}-01"),
            "-m",
            &telemetry("m-mqtt", 22.5),
        ],
    );
    assert!(ok, "mosquitto_pub: {err}");

    // The analytics API refuses the first attempt, then accepts.
    wait_until("a first analytics attempt", Duration::from_secs(20), || {
        !api.seen().is_empty()
    });
    api.set(Mode::Accept);
    wait_until(
        "both records in both sinks",
        Duration::from_secs(30),
        || {
            metric(
                &gw,
                r#"gateway_sink_records_total{outcome="ok",sink="archive"}"#,
            ) >= 2.0
                && metric(
                    &gw,
                    r#"gateway_sink_records_total{outcome="ok",sink="analytics"}"#,
                ) >= 2.0
        },
    );
    // Graceful shutdown exports what the batch processor still holds.
    gw.stop();
    wait_until(
        "the spans of both deliveries",
        Duration::from_secs(15),
        || {
            let spans = tap.spans();
            named(&spans, "sink.publish")
                .iter()
                .filter(|s| attr(s, "outcome").as_deref() == Some("ok"))
                .count()
                >= 2
                && named(&spans, "ingest").len() >= 2
        },
    );
    let spans = tap.spans();
    let dump = || {
        spans
            .iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    };

    // ingest: the incoming trace id, device, source, correlation id.
    let ingests = named(&spans, "ingest");
    assert_eq!(ingests.len(), 2, "{}", dump());
    let http = *ingests
        .iter()
        .find(|s| attr(s, "source").as_deref() == Some("http"))
        .unwrap_or_else(|| panic!("no HTTP ingest span:\n{}", dump()));
    let mqtt = *ingests
        .iter()
        .find(|s| attr(s, "source").as_deref() == Some("mqtt"))
        .unwrap_or_else(|| panic!("no MQTT ingest span:\n{}", dump()));
    assert_eq!(http["traceId"], HTTP_TRACE);
    assert_eq!(attr(http, "device_id").as_deref(), Some("dev-http"));
    assert_eq!(attr(http, "correlation_id").as_deref(), Some("corr-http-1"));
    // HTTP: ingest is the child of the request span, which continues the header.
    let request_span = by_id(&spans, &http["parentSpanId"])
        .unwrap_or_else(|| panic!("the HTTP ingest span's parent is missing:\n{}", dump()));
    assert_eq!(request_span["name"], "POST /ingest/{device_id}");
    assert_eq!(request_span["traceId"], HTTP_TRACE);
    assert_eq!(request_span["parentSpanId"], HTTP_PARENT);
    assert_eq!(
        attr(request_span, "http.status_code").as_deref(),
        Some("202")
    );
    // MQTT: ingest continues the user property directly.
    assert_eq!(mqtt["traceId"], MQTT_TRACE);
    assert_eq!(mqtt["parentSpanId"], MQTT_PARENT);
    assert_eq!(attr(mqtt, "device_id").as_deref(), Some("dev-mqtt"));
    let mqtt_corr = attr(mqtt, "correlation_id").unwrap_or_default();
    assert_eq!(mqtt_corr.len(), 36, "a UUID correlation id: {mqtt_corr:?}");

    // wal.append: a child of each ingest span.
    for ingest in [http, mqtt] {
        let append = named(&spans, "wal.append")
            .into_iter()
            .find(|s| s["parentSpanId"] == ingest["spanId"])
            .unwrap_or_else(|| panic!("no wal.append under {ingest}:\n{}", dump()));
        assert_eq!(append["traceId"], ingest["traceId"]);
        assert_eq!(int_attr(append, "records"), Some(1));
    }

    // The records carry the ingest span's own context.
    let records = archived_records(&archive);
    assert_eq!(records.len(), 2);
    for (device, ingest) in [("dev-http", http), ("dev-mqtt", mqtt)] {
        let r = records.iter().find(|r| r["device_id"] == device).unwrap();
        assert_eq!(
            r["traceparent"],
            format!(
                "00-{}-{}-01",
                ingest["traceId"].as_str().unwrap(),
                ingest["spanId"].as_str().unwrap()
            ),
            "{r}"
        );
    }

    // dispatch: a root span per batch and sink, linked to the ingest spans
    // of the records it carries; sink.publish is its child.
    for sink in ["archive", "analytics"] {
        let dispatches: Vec<&Value> = named(&spans, "dispatch")
            .into_iter()
            .filter(|s| attr(s, "sink").as_deref() == Some(sink))
            .collect();
        assert!(
            !dispatches.is_empty(),
            "no dispatch for {sink}:\n{}",
            dump()
        );
        let mut carried = 0;
        for d in &dispatches {
            assert_eq!(d["parentSpanId"], "", "dispatch is a root: {d}");
            assert_eq!(attr(d, "outcome").as_deref(), Some("delivered"), "{d}");
            let size = int_attr(d, "batch_size").unwrap_or_else(|| panic!("batch_size: {d}"));
            let links = d["links"].as_array().unwrap();
            assert_eq!(links.len() as i64, size, "one link per record: {d}");
            carried += size;
            let publishes: Vec<&Value> = named(&spans, "sink.publish")
                .into_iter()
                .filter(|p| p["parentSpanId"] == d["spanId"])
                .collect();
            assert!(!publishes.is_empty(), "no sink.publish under {d}");
            for p in &publishes {
                assert_eq!(p["traceId"], d["traceId"]);
                assert_eq!(attr(p, "sink").as_deref(), Some(sink));
                assert_eq!(int_attr(p, "batch_size"), Some(size));
            }
            assert_eq!(
                attr(publishes.last().unwrap(), "outcome").as_deref(),
                Some("ok")
            );
        }
        assert_eq!(carried, 2, "{sink}: both records dispatched once");
        for ingest in [http, mqtt] {
            assert!(
                dispatches.iter().any(|d| d["links"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|l| l["traceId"] == ingest["traceId"] && l["spanId"] == ingest["spanId"])),
                "no {sink} dispatch links to {ingest}:\n{}",
                dump()
            );
        }
    }

    // The analytics batch was retried: a failed attempt, a sink.retry, a
    // second attempt; the API saw each attempt's own traceparent.
    let failed: Vec<&Value> = named(&spans, "sink.publish")
        .into_iter()
        .filter(|p| {
            attr(p, "sink").as_deref() == Some("analytics")
                && attr(p, "outcome").as_deref() == Some("retry")
        })
        .collect();
    assert!(
        !failed.is_empty(),
        "no failed analytics attempt:\n{}",
        dump()
    );
    let dispatch_id = &failed[0]["parentSpanId"];
    let retry = named(&spans, "sink.retry")
        .into_iter()
        .find(|r| &r["parentSpanId"] == dispatch_id)
        .unwrap_or_else(|| panic!("no sink.retry under the retried dispatch:\n{}", dump()));
    assert_eq!(attr(retry, "sink").as_deref(), Some("analytics"));
    assert_eq!(int_attr(retry, "attempt"), int_attr(failed[0], "attempt"));
    assert!(
        attr(retry, "error").unwrap_or_default().contains("503"),
        "{retry}"
    );
    for seen in api.seen() {
        let tp = seen.headers.get("traceparent").expect("traceparent header");
        let parts: Vec<&str> = tp.split('-').collect();
        let publish = named(&spans, "sink.publish")
            .into_iter()
            .find(|p| p["spanId"] == parts[2])
            .unwrap_or_else(|| panic!("traceparent {tp} names no sink.publish span"));
        assert_eq!(publish["traceId"], parts[1]);
        assert_eq!(attr(publish, "sink").as_deref(), Some("analytics"));
    }

    // The log stayed JSON lines with traces on.
    assert!(!gw.log_lines().is_empty());
}

#[test]
fn the_standard_otel_endpoint_variable_turns_traces_on_with_the_gateway_resource() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = OtelTap::start_resource_printer(dir.path());
    let config = "gateway_id = \"edge-env\"\n[mqtt]\nurl = \"off\"\n";
    let mut gw = LoggedGateway::start(
        dir.path(),
        config,
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint().as_str())],
    );
    let resp = request(
        ureq::post(&gw.url("/ingest/dev-env")).set("Content-Type", "application/json"),
        Some(&telemetry("m-env", 1.0)),
    );
    assert_eq!(resp.status, 202, "{}", resp.text);
    gw.stop();
    wait_until("an export", Duration::from_secs(15), || {
        !receiver.lines().is_empty()
    });
    let exports = receiver.lines();
    let e = &exports[0];
    assert_eq!(e["path"], "/v1/traces", "{e}");
    assert_eq!(e["content_type"], "application/x-protobuf", "{e}");
    let r = &e["resource"];
    assert_eq!(r["service.name"], "iot-gateway", "{e}");
    assert_eq!(r["service.version"], env!("CARGO_PKG_VERSION"), "{e}");
    assert_eq!(r["service.instance.id"], "edge-env", "{e}");
    assert_eq!(r["gateway.id"], "edge-env", "{e}");
    let names: Vec<&str> = exports
        .iter()
        .flat_map(|e| e["spans"].as_array().unwrap())
        .filter_map(Value::as_str)
        .collect();
    for name in ["ingest", "wal.append", "POST /ingest/{device_id}"] {
        assert!(names.contains(&name), "{name} not in {names:?}");
    }
}
