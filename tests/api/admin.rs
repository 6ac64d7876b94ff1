//! The admin API: authentication, dead letters (list, export, requeue,
//! purge), replay to one sink, pause/resume, WAL stats and check.

use std::collections::HashSet;
use std::time::Duration;

use gateway::auth::new_token;
use serde_json::{json, Value};

use crate::helpers::{
    archived_keys, archived_records, request, spawn_app, telemetry, wait_until, TestApp,
};

fn admin_token(app: &TestApp) -> String {
    app.admin_token()
}

fn admin(app: &TestApp, method: &str, path: &str, body: Option<Value>) -> crate::helpers::Resp {
    app.admin(method, path, body)
}

#[test]
fn admin_endpoints_answer_401_without_the_admin_token_and_403_to_a_device_token() {
    let (device_token, line) = new_token("dev-1").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens");
    std::fs::write(&file, format!("{line}\n")).unwrap();
    let app = spawn_app(&format!(
        "[http]\ndevice_tokens_file = \"{}\"\n",
        file.display()
    ));
    let token_file = app.dir.path().join("admin.token");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&token_file).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "the admin token is private");
    let routes = [
        ("GET", "/admin/wal"),
        ("GET", "/admin/wal/check"),
        ("POST", "/admin/wal/repair"),
        ("POST", "/admin/wal/compact"),
        ("GET", "/admin/sinks"),
        ("POST", "/admin/sinks/archive/pause"),
        ("POST", "/admin/sinks/archive/resume"),
        ("GET", "/admin/dlq?sink=archive"),
        ("DELETE", "/admin/dlq?sink=archive"),
        ("GET", "/admin/dlq/export?sink=archive"),
        ("POST", "/admin/dlq/requeue"),
        ("POST", "/admin/replay"),
        ("GET", "/admin/config"),
        ("POST", "/admin/config"),
        ("POST", "/admin/devices/dev-1/control"),
        ("POST", "/admin/commands/ping"),
    ];
    for (method, path) in routes {
        let none = request(ureq::request(method, &app.url(path)), Some("{}"));
        assert_eq!(none.status, 401, "{method} {path} without credentials");
        assert_eq!(none.body["error"]["code"], "unauthorized");
        let device = request(
            ureq::request(method, &app.url(path))
                .set("Authorization", &format!("Bearer {device_token}")),
            Some("{}"),
        );
        assert_eq!(device.status, 403, "{method} {path} with a device token");
        assert_eq!(device.body["error"]["code"], "forbidden");
        let wrong = request(
            ureq::request(method, &app.url(path)).set("Authorization", "Bearer not-the-token"),
            Some("{}"),
        );
        assert_eq!(wrong.status, 401, "{method} {path} with a wrong token");
    }
    // Refused requests changed nothing: the sink was never paused.
    let ok = admin(&app, "GET", "/admin/sinks", None);
    assert_eq!(ok.status, 200, "{}", ok.text);
    assert_eq!(ok.body[0]["name"], "archive");
    assert_eq!(ok.body[0]["state"]["paused"], false);
    assert_eq!(ok.body[0]["running"], true);
    assert_eq!(ok.body[0]["last_error"], serde_json::Value::Null);
    assert!(!app.dir.path().join("runtime.json").exists());
    // Denials and admin actions are counted and audit-logged.
    assert!(
        app.metric(r#"gateway_control_commands_total{command="sinks.list",outcome="ok"}"#) >= 1.0
    );
    // A device token still ingests; the admin token is not a device token.
    let ingest = request(
        ureq::post(&app.url("/ingest/dev-1"))
            .set("Content-Type", "application/json")
            .set("Authorization", &format!("Bearer {}", admin_token(&app))),
        Some(&telemetry("x", 1.0)),
    );
    assert_eq!(ingest.status, 401);
}

#[test]
fn dead_letters_are_listed_exported_requeued_after_the_fix_and_purged() {
    let outside = tempfile::tempdir().unwrap();
    let blocker = outside.path().join("blocker");
    std::fs::write(&blocker, b"a file where a directory must go").unwrap();
    let target = blocker.join("archive");
    let app = spawn_app(&format!(
        "[sinks.flaky]\nkind = \"s3\"\nurl = \"file://{}\"\nbatch_max_wait_ms = 0\nbatch_max_records = 5\n\
         retry_budget = 2\nretry_base_ms = 10\nretry_max_ms = 20\n",
        target.display()
    ));
    for i in 0..10 {
        let dev = if i < 4 { "dev-a" } else { "dev-b" };
        assert_eq!(
            app.post_json(dev, &telemetry(&format!("m{i}"), i as f64))
                .status,
            202
        );
    }
    wait_until("all dead-lettered", Duration::from_secs(15), || {
        admin(&app, "GET", "/admin/dlq?sink=flaky", None).body["total"] == 10
    });

    let list = admin(
        &app,
        "GET",
        "/admin/dlq?sink=flaky&device=dev-a&limit=3",
        None,
    );
    assert_eq!(list.status, 200, "{}", list.text);
    assert_eq!(list.body["total"], 4);
    let page = list.body["dead_letters"].as_array().unwrap();
    assert_eq!(page.len(), 3);
    assert_eq!(page[0]["device_id"], "dev-a");
    assert_eq!(page[0]["record"]["device_id"], "dev-a");
    assert!(page[0]["error"].as_str().unwrap().len() > 3);
    let next = list.body["next_after_seq"].as_u64().unwrap();
    let rest = admin(
        &app,
        "GET",
        &format!("/admin/dlq?sink=flaky&device=dev-a&after_seq={next}"),
        None,
    );
    assert_eq!(rest.body["dead_letters"].as_array().unwrap().len(), 1);
    let bad = admin(&app, "GET", "/admin/dlq?sink=nope", None);
    assert_eq!(bad.status, 404);
    assert_eq!(
        admin(&app, "GET", "/admin/dlq?since=yesterday", None).status,
        400
    );

    let export = admin(&app, "GET", "/admin/dlq/export?sink=flaky", None);
    assert_eq!(export.status, 200);
    assert_eq!(export.headers["x-total-count"], "10");
    let lines: Vec<Value> = export
        .text
        .lines()
        .map(|l| serde_json::from_str(l).expect("every export line is JSON"))
        .collect();
    assert_eq!(lines.len(), 10);
    assert!(lines
        .iter()
        .all(|d| d["sink"] == "flaky" && d["record"]["v"] == 1));

    // Fix the target, then requeue one device's dead letters.
    std::fs::remove_file(&blocker).unwrap();
    let r = admin(
        &app,
        "POST",
        "/admin/dlq/requeue",
        Some(json!({"sink": "flaky", "device": "dev-a"})),
    );
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["requeued"], 4);
    wait_until(
        "requeued records delivered",
        Duration::from_secs(10),
        || archived_records(&target).len() == 4,
    );
    assert_eq!(
        archived_keys(&target),
        (0..4)
            .map(|i| format!("dev-a:m{i}"))
            .collect::<HashSet<_>>()
    );
    let stats = admin(&app, "GET", "/admin/wal", None);
    assert_eq!(stats.body["sinks"]["flaky"]["dead"], 6);

    // Purge needs a sink; then the rest is gone for good.
    assert_eq!(admin(&app, "DELETE", "/admin/dlq", None).status, 400);
    let p = admin(&app, "DELETE", "/admin/dlq?sink=flaky", None);
    assert_eq!(p.body["purged"], 6);
    assert_eq!(
        admin(&app, "GET", "/admin/dlq?sink=flaky", None).body["total"],
        0
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        archived_records(&target).len(),
        4,
        "purged letters are not delivered"
    );
    let check = admin(&app, "GET", "/admin/wal/check", None);
    assert_eq!(check.body["ok"], true, "{}", check.text);
    assert!(
        app.metric(r#"gateway_control_commands_total{command="dlq.requeue",outcome="ok"}"#) >= 1.0
    );
}

#[test]
fn replay_redelivers_a_time_range_to_the_named_sink_only() {
    let outside = tempfile::tempdir().unwrap();
    let (one, two) = (outside.path().join("one"), outside.path().join("two"));
    let app = spawn_app(&format!(
        "[sinks.one]\nkind = \"s3\"\nurl = \"file://{}\"\nbatch_max_wait_ms = 0\n\n\
         [sinks.two]\nkind = \"s3\"\nurl = \"file://{}\"\nbatch_max_wait_ms = 0\n",
        one.display(),
        two.display()
    ));
    let early: i64 = chrono::Utc::now().timestamp_millis();
    for i in 0..5 {
        assert_eq!(
            app.post_json("dev-1", &telemetry(&format!("early{i}"), 1.0))
                .status,
            202
        );
    }
    std::thread::sleep(Duration::from_millis(50));
    let middle = chrono::Utc::now().timestamp_millis();
    for i in 0..3 {
        assert_eq!(
            app.post_json("dev-1", &telemetry(&format!("late{i}"), 1.0))
                .status,
            202
        );
    }
    wait_until("both sinks have all", Duration::from_secs(10), || {
        archived_records(&one).len() == 8 && archived_records(&two).len() == 8
    });
    let since = chrono::DateTime::from_timestamp_millis(early - 1)
        .unwrap()
        .to_rfc3339();
    let r = admin(
        &app,
        "POST",
        "/admin/replay",
        Some(json!({"sink": "one", "since": since, "until": middle})),
    );
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["replayed"], 5);
    // Objects are named by seq range, so a replayed batch may overwrite the
    // original object: count deliveries, not files.
    let delivered = |sink: &str| {
        app.metric(&format!(
            r#"gateway_sink_records_total{{outcome="ok",sink="{sink}"}}"#
        ))
    };
    wait_until(
        "replayed records delivered again",
        Duration::from_secs(10),
        || delivered("one") == 13.0,
    );
    let archived = archived_keys(&one);
    assert_eq!(archived.len(), 8, "every record is still in the archive");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(delivered("two"), 8.0, "the other sink got nothing again");
    assert_eq!(delivered("one"), 13.0, "only the time range was replayed");
    let bad = admin(
        &app,
        "POST",
        "/admin/replay",
        Some(json!({"sink": "one", "since": 5, "until": 5})),
    );
    assert_eq!(bad.status, 400);
    let unknown = admin(
        &app,
        "POST",
        "/admin/replay",
        Some(json!({"sink": "zz", "since": 0, "until": 5})),
    );
    assert_eq!(unknown.status, 404);
}

#[test]
fn a_paused_sink_holds_its_records_and_resumes_and_the_pause_is_persisted() {
    let outside = tempfile::tempdir().unwrap();
    let archive = outside.path().join("archive");
    let app = spawn_app(&format!(
        "[sinks.archive]\nkind = \"s3\"\nurl = \"file://{}\"\nbatch_max_wait_ms = 0\n",
        archive.display()
    ));
    let r = admin(&app, "POST", "/admin/sinks/archive/pause", None);
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["runtime"]["sinks"]["archive"]["paused"], true);
    for i in 0..3 {
        assert_eq!(
            app.post_json("dev-1", &telemetry(&format!("p{i}"), 1.0))
                .status,
            202
        );
    }
    std::thread::sleep(Duration::from_millis(700));
    assert!(
        archived_records(&app.archive_dir()).is_empty(),
        "paused: nothing delivered"
    );
    assert_eq!(app.metric(r#"gateway_sink_paused{sink="archive"}"#), 1.0);
    let saved: Value =
        serde_json::from_slice(&std::fs::read(app.dir.path().join("runtime.json")).unwrap())
            .unwrap();
    assert_eq!(saved["sinks"]["archive"]["paused"], true);
    let stats = admin(&app, "GET", "/admin/wal", None);
    assert_eq!(stats.body["sinks"]["archive"]["enqueued"], 3);
    assert!(
        stats.body["sinks"]["archive"]["pending_bytes"]
            .as_u64()
            .unwrap()
            > 0
    );
    wait_until(
        "bytes held for the paused sink",
        Duration::from_secs(5),
        || app.metric(r#"gateway_wal_pending_bytes{sink="archive",state="enqueued"}"#) > 0.0,
    );

    assert_eq!(
        admin(&app, "POST", "/admin/sinks/archive/resume", None).status,
        200
    );
    wait_until("delivered after resume", Duration::from_secs(10), || {
        archived_records(&archive).len() == 3
    });
    assert_eq!(
        admin(&app, "POST", "/admin/sinks/nope/pause", None).status,
        404
    );
    let set = admin(
        &app,
        "POST",
        "/admin/config",
        Some(json!({"key": "http.addr", "value": "0.0.0.0:1"})),
    );
    assert_eq!(set.status, 400);
    assert!(set.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("settable"));
}
