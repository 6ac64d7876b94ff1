//! `gateway_wal_full_in_seconds` (DESIGN §6b, issue 33 item 4): a WAL
//! filling at a steady rate behind a blocked sink says when it will be full,
//! in `/readyz` and in the metric, and says nothing while it does not grow.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::helpers::{free_port, spawn_app, telemetry, TestApp};

const MAX_BYTES: f64 = 64.0 * 1024.0 * 1024.0;

fn full_in(app: &TestApp) -> Value {
    app.get("/readyz").body["checks"]["wal"]["full_in"].clone()
}

#[test]
fn a_wal_filling_behind_a_blocked_sink_reports_a_plausible_time_until_full() {
    // The only sink's API refuses connections: every record stays in the WAL.
    let port = free_port();
    let app = spawn_app(&format!(
        "[wal]\nmax_bytes = {}\n[sinks.api]\nkind = \"http\"\nurl = \"http://127.0.0.1:{port}/ingest\"\n\
         retry_budget = 1000\nretry_max_ms = 1000\n",
        MAX_BYTES as u64
    ));
    // Idle: no growth, no value, no series.
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(full_in(&app), Value::Null, "{}", app.get("/readyz").text);
    assert!(!app
        .get("/metrics")
        .text
        .contains("gateway_wal_full_in_seconds{"));

    // Fill at a steady rate (20 requests of 10 records a second) for 16 s,
    // measuring the growth the way an operator would: the WAL's size over time.
    let started = Instant::now();
    let first_bytes = app.metric("gateway_wal_bytes");
    let mut n = 0;
    while started.elapsed() < Duration::from_secs(16) {
        let batch: Vec<String> = (0..10)
            .map(|i| telemetry(&format!("m{n}-{i}"), i as f64))
            .collect();
        assert_eq!(
            app.post_json("dev-1", &format!("[{}]", batch.join(",")))
                .status,
            202
        );
        n += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    let secs = started.elapsed().as_secs_f64();
    let bytes = app.metric("gateway_wal_bytes");
    let growth = (bytes - first_bytes) / secs;
    assert!(growth > 0.0);
    let expected = (MAX_BYTES - bytes) / growth;

    let f = full_in(&app);
    let reported = f["seconds"]
        .as_f64()
        .unwrap_or_else(|| panic!("no full_in: {f}"));
    assert_eq!(f["limit"], "max_bytes");
    assert!(
        reported > expected / 2.0 && reported < expected * 2.0,
        "reported {reported} s, expected about {expected:.0} s (growth {growth:.0} B/s, {bytes} of {MAX_BYTES} bytes)"
    );
    let metric = app.metric(r#"gateway_wal_full_in_seconds{limit="max_bytes"}"#);
    assert!(
        metric > expected / 2.0 && metric < expected * 2.0,
        "metric {metric}"
    );
    // The status page's document says the same.
    let status = app.admin("GET", "/admin/status", None).body;
    let shown = status["wal"]["full_in_s"]
        .as_f64()
        .unwrap_or_else(|| panic!("no full_in_s in /admin/status: {status}"));
    assert!(
        shown > expected / 2.0 && shown < expected * 2.0,
        "status page {shown}"
    );
}
