//! `/healthz`, `/readyz`, `/version`, `/metrics`.

use crate::helpers::{spawn_app, telemetry};

#[test]
fn health_readiness_and_version_answer_with_json() {
    let app = spawn_app("");
    assert_eq!(app.get("/healthz").status, 200);
    let ready = app.get("/readyz");
    assert_eq!(ready.status, 200, "{}", ready.text);
    assert_eq!(ready.body["status"], "ready");
    assert_eq!(ready.body["checks"]["wal"]["ok"], true);
    assert_eq!(ready.body["checks"]["mqtt"]["detail"], "disabled");
    let v = app.get("/version");
    assert_eq!(v.body["version"], env!("CARGO_PKG_VERSION"));
    assert!(v.body["git_commit"].is_string() && v.body["build_time"].is_string());
}

#[test]
fn metrics_expose_ingest_wal_sink_and_http_series() {
    let app = spawn_app("");
    assert_eq!(app.post_json("dev-1", &telemetry("1", 1.0)).status, 202);
    crate::helpers::wait_until("delivery", std::time::Duration::from_secs(10), || {
        app.metric(r#"gateway_sink_records_total{outcome="ok",sink="archive"}"#) >= 1.0
    });
    let text = app.get("/metrics").text;
    for name in [
        "gateway_ingest_records_total",
        "gateway_wal_append_seconds_bucket",
        "gateway_wal_group_size_bucket",
        "gateway_wal_records",
        "gateway_wal_bytes",
        "gateway_wal_oldest_pending_age_seconds",
        "gateway_sink_publish_total",
        "gateway_sink_publish_seconds_bucket",
        "gateway_sink_up",
        "gateway_e2e_latency_seconds_bucket",
        "gateway_actor_restarts_total",
        "gateway_backpressure_active",
        "gateway_http_requests_total",
    ] {
        assert!(text.contains(name), "missing {name} in /metrics");
    }
    assert_eq!(
        app.metric(r#"gateway_ingest_records_total{outcome="accepted",source="http"}"#),
        1.0
    );
}

#[test]
fn backpressure_answers_503_with_retry_after_and_readyz_names_it() {
    // More free disk than any machine has: backpressure from the start.
    let app = spawn_app("[wal]\nmin_free_disk_bytes = 4611686018427387904\n");
    let r = app.post_json("dev-1", &telemetry("1", 1.0));
    assert_eq!(r.status, 503, "{}", r.text);
    assert_eq!(r.body["error"]["code"], "backpressure");
    assert!(r.headers.contains_key("retry-after"));
    let ready = app.get("/readyz");
    assert_eq!(ready.status, 503);
    assert_eq!(ready.body["failing"][0], "backpressure");
    assert_eq!(app.metric("gateway_backpressure_active"), 1.0);
}
