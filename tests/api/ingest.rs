//! `POST /ingest/{device_id}`: statuses, bodies, dedup, batches.

use std::time::Duration;

use crate::helpers::{archived_records, request, spawn_app, telemetry, wait_until};

#[test]
fn a_valid_record_gets_202_and_lands_enriched_in_the_archive() {
    let app = spawn_app("");
    let r = app.post_json("dev-1", &telemetry("42", 21.5));
    assert_eq!(r.status, 202, "{}", r.text);
    assert_eq!(r.body["status"], "accepted");
    assert_eq!(r.body["seq"], 1);
    let cid = r.body["correlation_id"].as_str().unwrap().to_string();
    assert_eq!(r.headers["x-correlation-id"], cid);

    wait_until("the record in the archive", Duration::from_secs(10), || {
        !archived_records(&app.archive_dir()).is_empty()
    });
    let recs = archived_records(&app.archive_dir());
    assert_eq!(recs.len(), 1);
    let rec = &recs[0];
    assert_eq!(rec["v"], 1);
    assert_eq!(rec["seq"], 1);
    assert_eq!(rec["device_id"], "dev-1");
    assert_eq!(rec["idempotency_key"], "dev-1:42");
    assert_eq!(rec["correlation_id"], cid.as_str());
    assert_eq!(rec["source"], "http");
    assert_eq!(rec["device_ts"], "2026-11-25T08:00:00.123Z");
    assert_eq!(rec["metrics"]["temperature_c"], 21.5);
    assert_eq!(rec["tags"]["fw"], "1.4.2");
    assert!(rec["gateway_id"].is_string() && rec["receive_ts"].is_string());
}

#[test]
fn a_repeated_msg_id_is_a_duplicate_with_the_original_correlation_id() {
    let app = spawn_app("");
    let first = app.post_json("dev-1", &telemetry("7", 1.0));
    assert_eq!(first.status, 202);
    let again = app.post_json("dev-1", &telemetry("7", 2.0));
    assert_eq!(again.status, 200, "{}", again.text);
    assert_eq!(again.body["duplicate"], true);
    assert_eq!(again.body["correlation_id"], first.body["correlation_id"]);
    assert_eq!(again.body["seq"], first.body["seq"]);
    // The same msg_id from another device is a different record.
    assert_eq!(app.post_json("dev-2", &telemetry("7", 1.0)).status, 202);
    wait_until("two records archived", Duration::from_secs(10), || {
        archived_records(&app.archive_dir()).len() == 2
    });
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        archived_records(&app.archive_dir()).len(),
        2,
        "a duplicate must not be stored"
    );
}

#[test]
fn the_idempotency_key_header_dedups_records_without_msg_id() {
    let app = spawn_app("");
    let body = r#"{"ts":1764057600123,"metrics":{"t":1}}"#;
    let send = |key: &str, body: &str| {
        request(
            ureq::post(&app.url("/ingest/dev-1"))
                .set("Content-Type", "application/json")
                .set("Idempotency-Key", key),
            Some(body),
        )
    };
    assert_eq!(send("abc", body).status, 202);
    let dup = send("abc", r#"{"ts":1764057600999,"metrics":{"t":2}}"#);
    assert_eq!(dup.status, 200);
    assert_eq!(dup.body["duplicate"], true);
    // Without any key the payload hash is the key: the same payload is a duplicate.
    assert_eq!(app.post_json("dev-1", body).status, 202);
    assert_eq!(app.post_json("dev-1", body).status, 200);
}

/// The router validates the device id and the Idempotency-Key and counts
/// each reject once (it used to be the HTTP handler for these two).
#[test]
fn a_bad_idempotency_key_or_device_id_is_refused_counted_once_and_not_stored() {
    let app = spawn_app("");
    let body = r#"{"ts":1764057600123,"metrics":{"t":1}}"#;
    let r = request(
        ureq::post(&app.url("/ingest/dev-1"))
            .set("Content-Type", "application/json")
            .set("Idempotency-Key", &"k".repeat(129)),
        Some(body),
    );
    assert_eq!(r.status, 400, "{}", r.text);
    assert_eq!(r.body["error"]["code"], "invalid_idempotency_key");
    let r = app.post_json("bad%20device", body);
    assert_eq!(r.status, 400, "{}", r.text);
    assert_eq!(r.body["error"]["code"], "invalid_device_id", "{}", r.text);
    assert_eq!(
        app.metric(
            r#"gateway_ingest_rejected_total{reason="invalid_idempotency_key",source="http"}"#
        ),
        1.0
    );
    assert_eq!(
        app.metric(r#"gateway_ingest_rejected_total{reason="invalid_device_id",source="http"}"#),
        1.0
    );
    assert_eq!(
        app.metric(r#"gateway_ingest_records_total{outcome="rejected",source="http"}"#),
        2.0
    );
    let ok = app.post_json("dev-1", body);
    assert_eq!(
        ok.body["seq"], 1,
        "a refused request consumed a seq: {}",
        ok.text
    );
}

#[test]
fn a_body_cut_short_is_refused_as_bad_body_counted_and_not_stored() {
    use std::io::{Read, Write};
    let app = spawn_app("");
    let addr = app.url("").trim_start_matches("http://").to_string();
    let mut conn = std::net::TcpStream::connect(addr.trim_end_matches('/')).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    // 100 bytes announced, 30 sent, then the client stops sending.
    write!(
        conn,
        "POST /ingest/dev-1 HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"ts\":1764057600123,\"metrics\":{{"
    )
    .unwrap();
    conn.shutdown(std::net::Shutdown::Write).unwrap();
    let mut answer = String::new();
    let _ = conn.read_to_string(&mut answer);
    let series = r#"gateway_ingest_rejected_total{reason="bad_body",source="http"}"#;
    wait_until(
        "the cut body counted as bad_body",
        Duration::from_secs(5),
        || app.metric(series) == 1.0,
    );
    assert_eq!(
        app.metric(r#"gateway_ingest_records_total{outcome="rejected",source="http"}"#),
        1.0
    );
    let ok = app.post_json("dev-1", r#"{"ts":1764057600123,"metrics":{"t":1}}"#);
    assert_eq!(ok.body["seq"], 1, "the cut body was stored: {}", ok.text);
}

#[test]
fn a_json_array_is_accepted_as_one_batch() {
    let app = spawn_app("");
    let batch = format!(
        "[{},{},{}]",
        telemetry("a", 1.0),
        telemetry("b", 2.0),
        telemetry("c", 3.0)
    );
    let r = app.post_json("dev-1", &batch);
    assert_eq!(r.status, 202, "{}", r.text);
    assert_eq!(r.body["count"], 3);
    let seqs: Vec<u64> = r.body["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, vec![1, 2, 3]);
    // Resending the batch: every record is a duplicate.
    let again = app.post_json("dev-1", &batch);
    assert_eq!(again.status, 200);
    assert_eq!(again.body["duplicates"], 3);
    wait_until("batch archived", Duration::from_secs(10), || {
        archived_records(&app.archive_dir()).len() == 3
    });
}

#[test]
fn a_batch_with_one_invalid_record_is_rejected_whole_and_nothing_is_stored() {
    let app = spawn_app("");
    let batch = format!(
        "[{},{}]",
        telemetry("a", 1.0),
        r#"{"msg_id":"b","metrics":{"t":1}}"#
    );
    let r = app.post_json("dev-1", &batch);
    assert_eq!(r.status, 400, "{}", r.text);
    assert_eq!(r.body["error"]["code"], "invalid_schema");
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("record 1"),
        "{}",
        r.text
    );
    // The next accepted record gets seq 1: nothing of the batch was stored.
    let ok = app.post_json("dev-1", &telemetry("a", 1.0));
    assert_eq!(ok.status, 202);
    assert_eq!(ok.body["seq"], 1);
}

#[test]
fn every_kind_of_bad_input_gets_a_clear_json_error_and_is_never_stored() {
    let app = spawn_app("");
    let cases: Vec<(&str, &str, Option<&str>, u16, &str)> = vec![
        (
            "dev-1",
            "{not json",
            Some("application/json"),
            400,
            "invalid_json",
        ),
        (
            "dev-1",
            r#"{"metrics":{"t":1}}"#,
            Some("application/json"),
            400,
            "invalid_schema",
        ),
        (
            "dev-1",
            r#"{"ts":1,"metrics":{}}"#,
            Some("application/json"),
            400,
            "invalid_schema",
        ),
        (
            "dev-1",
            r#"{"ts":1,"metrics":{"t":{"nested":1}}}"#,
            Some("application/json"),
            400,
            "invalid_schema",
        ),
        (
            "dev-1",
            r#"{"schema_version":9,"ts":1,"metrics":{"t":1}}"#,
            Some("application/json"),
            400,
            "unsupported_schema_version",
        ),
        ("dev-1", "[]", Some("application/json"), 400, "empty_batch"),
        (
            "dev-1",
            "\"just a string\"",
            Some("application/json"),
            400,
            "invalid_schema",
        ),
        (
            "bad$device",
            r#"{"ts":1,"metrics":{"t":1}}"#,
            Some("application/json"),
            400,
            "invalid_device_id",
        ),
        (
            "dev-1",
            r#"{"ts":1,"metrics":{"t":1}}"#,
            Some("text/plain"),
            415,
            "unsupported_media_type",
        ),
        (
            "dev-1",
            r#"{"ts":1,"metrics":{"t":1}}"#,
            None,
            415,
            "unsupported_media_type",
        ),
    ];
    for (device, body, ct, status, code) in cases {
        let mut req = ureq::post(&app.url(&format!("/ingest/{device}")));
        if let Some(ct) = ct {
            req = req.set("Content-Type", ct);
        }
        let r = request(req, Some(body));
        assert_eq!(r.status, status, "body {body:?}: {}", r.text);
        assert_eq!(r.body["error"]["code"], code, "body {body:?}: {}", r.text);
        assert!(!r.body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .is_empty());
        assert!(r.headers.contains_key("x-correlation-id"));
    }
    let big = format!(r#"{{"ts":1,"metrics":{{"t":"{}"}}}}"#, "x".repeat(70_000));
    let r = app.post_json("dev-1", &big);
    assert_eq!(r.status, 413, "{}", r.text);
    assert_eq!(r.body["error"]["code"], "too_large");

    let ok = app.post_json("dev-1", &telemetry("after", 1.0));
    assert_eq!(
        ok.body["seq"], 1,
        "rejected input consumed a seq: {}",
        ok.text
    );
    assert!(
        app.metric(r#"gateway_ingest_rejected_total{reason="invalid_schema",source="http"}"#)
            >= 4.0
    );
    assert!(
        app.metric(r#"gateway_ingest_rejected_total{reason="too_large",source="http"}"#) >= 1.0
    );
}

#[test]
fn a_device_over_its_rate_limit_gets_429_with_retry_after() {
    let app = spawn_app("[ingest]\nrate_limit_per_device = 1.0\nrate_limit_burst = 2.0\n");
    assert_eq!(app.post_json("dev-1", &telemetry("1", 1.0)).status, 202);
    assert_eq!(app.post_json("dev-1", &telemetry("2", 1.0)).status, 202);
    let r = app.post_json("dev-1", &telemetry("3", 1.0));
    assert_eq!(r.status, 429, "{}", r.text);
    assert_eq!(r.body["error"]["code"], "rate_limited");
    assert!(r.headers["retry-after"].parse::<u64>().unwrap() >= 1);
    // Other devices have their own bucket.
    assert_eq!(app.post_json("dev-2", &telemetry("3", 1.0)).status, 202);
}

#[test]
fn an_incoming_correlation_id_is_kept_and_every_response_carries_one() {
    let app = spawn_app("");
    let r = request(
        ureq::post(&app.url("/ingest/dev-1"))
            .set("Content-Type", "application/json")
            .set("X-Correlation-Id", "req-123"),
        Some(&telemetry("1", 1.0)),
    );
    assert_eq!(r.status, 202);
    assert_eq!(r.body["correlation_id"], "req-123");
    assert_eq!(r.headers["x-correlation-id"], "req-123");
    let nf = app.get("/nope");
    assert_eq!(nf.status, 404);
    assert_eq!(nf.body["error"]["code"], "not_found");
    assert!(nf.headers.contains_key("x-correlation-id"));
}
