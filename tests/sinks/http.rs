//! The `http` sink against a real HTTP server that can fail on command.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use crate::analytics::{Analytics, Mode};
use crate::helpers::{archived_keys, spawn_app, telemetry, wait_until};

fn http_sink(api: &Analytics, extra: &str) -> String {
    format!(
        "gateway_id = \"edge-h\"\n[sinks.api]\nkind = \"http\"\nurl = \"{}\"\nbatch_max_wait_ms = 20\nretry_base_ms = 50\nretry_max_ms = 200\n{extra}",
        api.url()
    )
}

fn expected(n: usize) -> HashSet<String> {
    (0..n).map(|i| format!("dev-1:m{i}")).collect()
}

fn send(app: &crate::helpers::TestApp, n: usize) {
    for i in 0..n {
        assert_eq!(
            app.post_json("dev-1", &telemetry(&format!("m{i}"), 1.0))
                .status,
            202
        );
    }
}

#[test]
fn the_http_sink_posts_ndjson_batches_with_an_idempotency_key_and_a_bearer_token() {
    let api = Analytics::start();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), "t0ken\n").unwrap();
    let app = spawn_app(&http_sink(
        &api,
        &format!("token_file = \"{}\"\n", dir.path().join("token").display()),
    ));
    send(&app, 40);
    wait_until("all records posted", Duration::from_secs(10), || {
        api.accepted_keys() == expected(40)
    });
    for s in api.seen() {
        assert_eq!(s.headers["authorization"], "Bearer t0ken");
        assert_eq!(s.headers["content-type"], "application/x-ndjson");
        assert!(
            s.headers["idempotency-key"].starts_with("edge-h-api-"),
            "{:?}",
            s.headers
        );
    }
}

#[test]
fn server_errors_are_retried_and_every_retry_carries_the_same_idempotency_key() {
    let api = Analytics::start();
    api.set(Mode::Fail(503, None));
    let app = spawn_app(&http_sink(&api, "retry_budget = 1000\n"));
    send(&app, 30);
    wait_until("some failed attempts", Duration::from_secs(10), || {
        api.seen().len() >= 3
    });
    api.set(Mode::Accept);
    wait_until("all records delivered", Duration::from_secs(10), || {
        api.accepted_keys() == expected(30)
    });
    // The same body always came with the same key.
    let mut key_of: HashMap<String, String> = HashMap::new();
    for s in api.seen() {
        let k = s.headers["idempotency-key"].clone();
        assert_eq!(
            key_of.entry(s.body.clone()).or_insert_with(|| k.clone()),
            &k
        );
    }
    assert_eq!(
        app.metric(r#"gateway_wal_records{sink="api",state="dead"}"#),
        0.0
    );
}

#[test]
fn retry_after_is_honoured() {
    let api = Analytics::start();
    api.set(Mode::Fail(429, Some(2)));
    let app = spawn_app(&http_sink(&api, "retry_budget = 1000\n"));
    send(&app, 1);
    wait_until("first attempt", Duration::from_secs(10), || {
        !api.seen().is_empty()
    });
    api.set(Mode::Accept);
    wait_until("delivered", Duration::from_secs(10), || {
        api.accepted_record_keys().len() == 1
    });
    let seen = api.seen();
    let gap = seen[1].at.duration_since(seen[0].at);
    assert!(
        gap >= Duration::from_millis(1900),
        "retried after {gap:?} despite Retry-After: 2"
    );
}

#[test]
fn a_4xx_answer_dead_letters_the_batch_at_once() {
    let api = Analytics::start();
    api.set(Mode::Fail(400, None));
    let app = spawn_app(&http_sink(&api, "retry_budget = 1000\n"));
    send(&app, 10);
    wait_until("dead-lettered", Duration::from_secs(10), || {
        app.metric(r#"gateway_sink_records_total{outcome="dead",sink="api"}"#) == 10.0
    });
    let bodies: Vec<String> = api.seen().into_iter().map(|s| s.body).collect();
    let distinct: HashSet<&String> = bodies.iter().collect();
    assert_eq!(
        bodies.len(),
        distinct.len(),
        "a batch answered 4xx must not be retried"
    );
    wait_until("dead gauge", Duration::from_secs(5), || {
        app.metric(r#"gateway_wal_records{sink="api",state="dead"}"#) == 10.0
    });
    // The target answers, but with a refusal: the operator sees it, in the
    // admin API's condition (the status page, `gateway sink list`) as in
    // `gateway_sink_up`, until a batch is delivered again.
    let row = api_row(&app);
    assert_eq!(row["condition"], "rejecting", "{row}");
    assert!(
        row["last_error"].as_str().unwrap_or("").contains("400"),
        "{row}"
    );
    assert_eq!(app.metric(r#"gateway_sink_up{sink="api"}"#), 0.0);
    api.set(Mode::Accept);
    assert_eq!(app.post_json("dev-1", &telemetry("m10", 1.0)).status, 202);
    wait_until("up again", Duration::from_secs(10), || {
        api_row(&app)["condition"] == "up"
    });
    assert_eq!(app.metric(r#"gateway_sink_up{sink="api"}"#), 1.0);
}

/// Sink `api`'s row of `GET /admin/sinks`.
fn api_row(app: &crate::helpers::TestApp) -> serde_json::Value {
    let r = app.admin("GET", "/admin/sinks", None);
    assert_eq!(r.status, 200, "{}", r.text);
    r.body
        .as_array()
        .and_then(|a| a.iter().find(|s| s["name"] == "api"))
        .cloned()
        .unwrap_or_else(|| panic!("no sink api in {}", r.text))
}

#[test]
fn a_hanging_api_times_out_and_is_retried() {
    let api = Analytics::start();
    api.set(Mode::Hang);
    let app = spawn_app(&http_sink(
        &api,
        "retry_budget = 1000\npublish_timeout_ms = 300\n",
    ));
    send(&app, 5);
    wait_until("two timed-out attempts", Duration::from_secs(10), || {
        api.seen().len() >= 2
    });
    api.set(Mode::Accept);
    wait_until("delivered after the hang", Duration::from_secs(10), || {
        api.accepted_keys() == expected(5)
    });
}

#[test]
fn a_stuck_http_sink_does_not_stall_ingest_or_the_archive() {
    let api = Analytics::start();
    api.set(Mode::Hang);
    let outside = tempfile::tempdir().unwrap();
    let archive = outside.path().join("archive");
    let app = spawn_app(&format!(
        "{}\n[sinks.archive]\nkind = \"s3\"\nurl = \"file://{}\"\nbatch_max_wait_ms = 20\n",
        http_sink(&api, "retry_budget = 1000\npublish_timeout_ms = 60000\n"),
        archive.display()
    ));
    // While the API hangs for a minute, ingest and the archive carry on.
    for round in 0..5 {
        for i in 0..20 {
            let n = round * 20 + i;
            let r = app.post_json("dev-1", &telemetry(&format!("m{n}"), 1.0));
            assert_eq!(r.status, 202);
        }
        let want: HashSet<String> = (0..(round + 1) * 20)
            .map(|i| format!("dev-1:m{i}"))
            .collect();
        wait_until("the archive keeps up", Duration::from_secs(5), || {
            archived_keys(&archive) == want
        });
    }
    assert!(api.accepted_record_keys().is_empty());
    wait_until(
        "backlog visible for the stuck sink",
        Duration::from_secs(5),
        || {
            app.metric(r#"gateway_wal_records{sink="api",state="enqueued"}"#)
                + app.metric(r#"gateway_wal_records{sink="api",state="inflight"}"#)
                == 100.0
        },
    );
    // The archive's objects are written before its ack reaches the WAL, so its gauge may trail them briefly.
    wait_until("no backlog for the archive", Duration::from_secs(5), || {
        app.metric(r#"gateway_wal_records{sink="archive",state="enqueued"}"#)
            + app.metric(r#"gateway_wal_records{sink="archive",state="inflight"}"#)
            == 0.0
    });
}

#[test]
fn an_unreachable_api_opens_the_circuit_without_dead_lettering_and_it_closes_when_the_api_returns()
{
    let port = crate::helpers::free_port();
    let app = spawn_app(&format!(
        "[sinks.api]\nkind = \"http\"\nurl = \"http://127.0.0.1:{port}/ingest\"\nbatch_max_wait_ms = 20\n\
         retry_budget = 2\nretry_base_ms = 20\nretry_max_ms = 100\ncircuit_threshold = 3\ncircuit_cooldown_ms = 200\n"
    ));
    send(&app, 10);
    wait_until("circuit open", Duration::from_secs(10), || {
        app.metric(r#"gateway_sink_circuit_open{sink="api"}"#) == 1.0
    });
    std::thread::sleep(Duration::from_secs(1));
    // Far more failures than the budget of 2, yet nothing is dead: the target was down, not the batch bad.
    assert!(app.metric(r#"gateway_sink_publish_total{outcome="retry",sink="api"}"#) >= 3.0);
    assert_eq!(
        app.metric(r#"gateway_sink_records_total{outcome="dead",sink="api"}"#),
        0.0
    );

    let api = Analytics::start_on(port);
    wait_until(
        "delivered once the API is back",
        Duration::from_secs(10),
        || api.accepted_keys() == expected(10),
    );
    wait_until("circuit closed", Duration::from_secs(5), || {
        app.metric(r#"gateway_sink_circuit_open{sink="api"}"#) == 0.0
    });
}
