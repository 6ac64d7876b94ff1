//! The operator subcommands of the CLI: on a stopped gateway's data dir
//! (WAL check of a damaged WAL, a 100k dead-letter export, persisted pause)
//! and on a running gateway through its admin API (requeue after a fix).

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use gateway_actors::wal::{now_ms, NewRecord, Wal, WalConfig};
use serde_json::Value;

use crate::cli::gateway;
use crate::helpers::{
    archived_keys, archived_records, free_port, request, spawn_gateway_binary, telemetry,
    wait_until,
};

fn record(i: u64) -> NewRecord {
    NewRecord {
        idempotency_key: format!("dev-1:m{i}"),
        correlation_id: format!("c{i}"),
        device_id: "dev-1".into(),
        receive_ms: now_ms(),
        body: format!(
            "{{\"idempotency_key\":\"dev-1:m{i}\",\"device_id\":\"dev-1\",\"metrics\":{{\"n\":{i}}}}}"
        ),
        route: Default::default(),
    }
}

/// A WAL in `data` (sink "archive", as the default configuration has) with
/// `n` records, all dead letters of the archive.
fn wal_with_dead_letters(data: &Path, n: u64) {
    let mut wal = Wal::open(WalConfig::new(data.join("wal.db"), &["archive"])).unwrap();
    let mut next = 1;
    while next <= n {
        let upto = (next + 9_999).min(n);
        wal.append((next..=upto).map(record).collect()).unwrap();
        next = upto + 1;
    }
    wal.dead("archive", &[(1, n)], "HTTP 400: schema mismatch", 3)
        .unwrap();
}

fn dir_arg(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn wal_check_reports_a_damaged_wal_and_repairs_what_is_safe() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    {
        let mut wal = Wal::open(WalConfig::new(data.join("wal.db"), &["archive"])).unwrap();
        wal.append((1..=20).map(record).collect()).unwrap();
        wal.ack("archive", &[(1, 10)]).unwrap();
    }
    let (code, out, err) = gateway(&["--data-dir", dir_arg(data), "wal", "check"], &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("WAL check: ok"), "{out}");

    // Test-only damage, as a bug or a hand edit would leave it.
    {
        let wal = Wal::open(WalConfig::new(data.join("wal.db"), &["archive"])).unwrap();
        let c = wal.connection();
        c.execute("UPDATE sinks SET cursor = 500 WHERE name = 'archive'", [])
            .unwrap();
        c.execute("INSERT INTO dead VALUES('archive', 999, 1, 'gone', 0)", [])
            .unwrap();
        c.execute("UPDATE records SET body = '{broken' WHERE seq = 15", [])
            .unwrap();
    }
    let (code, out, _) = gateway(
        &["--data-dir", dir_arg(data), "--json", "wal", "check"],
        &[],
    );
    assert_eq!(code, 3, "problems give exit status 3: {out}");
    let report: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(report["ok"], false);
    let kinds: HashSet<&str> = report["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        HashSet::from(["cursor_ahead", "orphaned_dead_letter", "bad_record"]),
        "{out}"
    );

    let (code, out, _) = gateway(
        &["--data-dir", dir_arg(data), "wal", "check", "--repair"],
        &[],
    );
    assert_eq!(code, 3, "the bad record cannot be repaired: {out}");
    assert!(
        out.contains("(repaired)") && out.contains("[bad_record]"),
        "{out}"
    );
    let (_, out, _) = gateway(
        &["--data-dir", dir_arg(data), "--json", "wal", "check"],
        &[],
    );
    let report: Value = serde_json::from_str(out.trim()).unwrap();
    let left: Vec<&str> = report["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["kind"].as_str().unwrap())
        .collect();
    assert_eq!(left, ["bad_record"], "{out}");

    // Bytes overwritten in the file itself.
    let db = data.join("wal.db");
    let mut bytes = std::fs::read(&db).unwrap();
    let len = bytes.len();
    for b in &mut bytes[len / 2..len / 2 + 2048] {
        *b = 0xA5;
    }
    std::fs::write(&db, &bytes).unwrap();
    let _ = std::fs::remove_file(data.join("wal.db-wal"));
    let (code, out, err) = gateway(&["--data-dir", dir_arg(data), "wal", "check"], &[]);
    assert_eq!(code, 3, "a corrupted file is never reported ok: {out}{err}");
    assert!(
        out.contains("[integrity]"),
        "SQLite's own check names the damage: {out}"
    );
}

#[test]
fn dlq_export_of_100k_dead_letters_is_complete_valid_ndjson() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    wal_with_dead_letters(&data, 100_000);
    let out_file = dir.path().join("dead.ndjson");
    let (code, _, err) = gateway(
        &[
            "--data-dir",
            dir_arg(&data),
            "dlq",
            "export",
            "--sink",
            "archive",
            "--output",
            dir_arg(&out_file),
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        err.is_empty(),
        "no progress output when not on a terminal: {err}"
    );
    let text = std::fs::read_to_string(&out_file).unwrap();
    let mut seqs = HashSet::new();
    for (i, line) in text.lines().enumerate() {
        let d: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("line {} is not JSON ({e}): {line}", i + 1));
        let seq = d["seq"].as_u64().unwrap();
        assert_eq!(d["record"]["seq"], seq);
        assert_eq!(d["record"]["v"], 1);
        assert_eq!(d["sink"], "archive");
        assert_eq!(d["error"], "HTTP 400: schema mismatch");
        assert_eq!(d["record"]["idempotency_key"], format!("dev-1:m{seq}"));
        seqs.insert(seq);
    }
    assert_eq!(seqs.len(), 100_000);
    assert_eq!(seqs, (1..=100_000).collect::<HashSet<u64>>());

    // To stdout, filtered, the same way.
    let (code, out, _) = gateway(
        &[
            "--data-dir",
            dir_arg(&data),
            "dlq",
            "export",
            "--device",
            "nobody",
        ],
        &[],
    );
    assert_eq!(code, 0);
    assert!(out.is_empty());
}

#[test]
fn offline_commands_work_on_the_data_dir_and_the_gateway_applies_them_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    wal_with_dead_letters(&data, 5);
    let d = dir_arg(&data);
    let (code, out, err) = gateway(&["--data-dir", d, "--json", "dlq", "list"], &[]);
    assert_eq!(code, 0, "{err}");
    let list: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(list["total"], 5);
    let (code, _, err) = gateway(&["--data-dir", d, "sink", "pause", "archive"], &[]);
    assert_eq!(code, 0, "{err}");
    let (code, out, _) = gateway(
        &[
            "--data-dir",
            d,
            "--json",
            "dlq",
            "requeue",
            "--sink",
            "archive",
        ],
        &[],
    );
    assert_eq!(code, 0);
    assert_eq!(
        serde_json::from_str::<Value>(out.trim()).unwrap()["requeued"],
        5
    );
    let (_, out, _) = gateway(&["--data-dir", d, "--json", "wal", "stats"], &[]);
    let stats: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(stats["sinks"]["archive"]["enqueued"], 5);
    assert_eq!(stats["sinks"]["archive"]["dead"], 0);
    let (code, _, err) = gateway(&["--data-dir", d, "sink", "pause", "nope"], &[]);
    assert_eq!(code, 1);
    assert!(err.contains("unknown sink"), "{err}");
    // Offline actions leave an audit trail in the data dir.
    let audit: Vec<Value> = std::fs::read_to_string(data.join("audit.log"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let commands: Vec<(&str, &str)> = audit
        .iter()
        .map(|a| {
            (
                a["command"].as_str().unwrap(),
                a["outcome"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        commands,
        [
            ("dlq.list", "ok"),
            ("sink.pause", "ok"),
            ("dlq.requeue", "ok"),
            ("wal.stats", "ok"),
            ("sink.pause", "error")
        ]
    );
    assert!(audit[0]["actor"].as_str().unwrap().starts_with("cli:"));

    // The gateway starts paused (runtime.json), holds the records, and
    // delivers them when resumed through the CLI, which now goes through
    // the admin API because the gateway holds the data dir.
    let port = free_port();
    let _gw = spawn_gateway_binary(&data, port, &["--mqtt-url", "off"], &[]);
    let addr = format!("127.0.0.1:{port}");
    let (_, out, _) = gateway(
        &[
            "--data-dir",
            d,
            "--http-addr",
            &addr,
            "--json",
            "sink",
            "list",
        ],
        &[],
    );
    let sinks: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(sinks[0]["state"]["paused"], true, "{out}");
    std::thread::sleep(Duration::from_millis(500));
    assert!(archived_records(&data.join("archive")).is_empty());
    // A second gateway on the same data dir is refused.
    let (code, _, err) = gateway(
        &[
            "run",
            "--data-dir",
            d,
            "--mqtt-url",
            "off",
            "--http-addr",
            "127.0.0.1:0",
        ],
        &[],
    );
    assert_eq!(code, 1);
    assert!(err.contains("in use"), "{err}");
    let (code, _, err) = gateway(
        &[
            "--data-dir",
            d,
            "--http-addr",
            &addr,
            "sink",
            "resume",
            "archive",
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    wait_until("delivered after resume", Duration::from_secs(10), || {
        archived_records(&data.join("archive")).len() == 5
    });
}

#[test]
fn requeue_on_a_running_gateway_delivers_after_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let blocker = dir.path().join("blocker");
    std::fs::write(&blocker, b"x").unwrap();
    let target = blocker.join("archive");
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[sinks.flaky]\nkind = \"s3\"\nurl = \"file://{}\"\nbatch_max_wait_ms = 0\nretry_budget = 2\nretry_base_ms = 10\nretry_max_ms = 20\n",
            target.display()
        ),
    )
    .unwrap();
    let cfg = dir_arg(&config);
    let port = free_port();
    let _gw = spawn_gateway_binary(&data, port, &["--mqtt-url", "off", "--config", cfg], &[]);
    let addr = format!("127.0.0.1:{port}");
    for i in 0..6 {
        let r = request(
            ureq::post(&format!("http://{addr}/ingest/dev-1"))
                .set("Content-Type", "application/json"),
            Some(&telemetry(&format!("r{i}"), 1.0)),
        );
        assert_eq!(r.status, 202);
    }
    let d = dir_arg(&data);
    let cli = |args: &[&str]| {
        let mut all = vec!["--config", cfg, "--data-dir", d, "--http-addr", &addr];
        all.extend_from_slice(args);
        gateway(&all, &[])
    };
    wait_until("dead-lettered", Duration::from_secs(15), || {
        let (_, out, _) = cli(&["--json", "dlq", "list", "--sink", "flaky"]);
        serde_json::from_str::<Value>(out.trim()).is_ok_and(|v| v["total"] == 6)
    });
    let (code, out, _) = cli(&["dlq", "list", "--sink", "flaky"]);
    assert_eq!(code, 0);
    assert!(out.contains("6 dead letter(s) match"), "{out}");

    std::fs::remove_file(&blocker).unwrap();
    let (code, out, err) = cli(&["dlq", "requeue", "--sink", "flaky", "--wait"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("\"requeued\": 6"), "{out}");
    assert_eq!(
        archived_keys(&target),
        (0..6).map(|i| format!("dev-1:r{i}")).collect()
    );
    let (_, out, _) = cli(&["--json", "wal", "stats"]);
    let stats: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(stats["sinks"]["flaky"]["dead"], 0);
    let (code, out, _) = cli(&["--json", "ping"]);
    assert_eq!(code, 0);
    assert_eq!(
        serde_json::from_str::<Value>(out.trim()).unwrap()["live"],
        true
    );
}

#[test]
fn route_test_answers_which_class_and_sinks_a_record_would_get() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"{}\"\n\
             [mqtt]\nurl = \"mqtt://127.0.0.1:9\"\n\
             topics = [\"devices/{{device_id}}/telemetry\", \"site/{{tag:site}}/{{device_id}}/data\"]\n\
             [[priority]]\nclass = \"high\"\nmatch = {{ metrics_any = [\"alarm\"] }}\n\
             [sinks.all]\nkind = \"s3\"\nurl = \"file://{0}/all\"\n\
             [sinks.north]\nkind = \"s3\"\nurl = \"file://{0}/north\"\nroute = {{ tags = {{ site = \"north\" }} }}\n\
             [sinks.http_only]\nkind = \"s3\"\nurl = \"file://{0}/h\"\nroute = {{ sources = [\"http\"] }}\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let cfg = config.to_str().unwrap();
    let run = |args: &[&str]| {
        let mut all = vec!["--config", cfg, "--json", "route", "test"];
        all.extend_from_slice(args);
        let (code, out, err) = gateway(&all, &[]);
        (
            code,
            serde_json::from_str::<Value>(out.trim()).unwrap_or(Value::Null),
            err,
        )
    };
    let (code, v, err) = run(&[
        "pump-1",
        r#"{"ts":1764057600000,"metrics":{"alarm":true}}"#,
        "--topic",
        "site/north/pump-1/data",
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(v["source"], "mqtt");
    assert_eq!(v["topic_tags"]["site"], "north");
    assert_eq!(v["records"][0]["class"], "high");
    assert_eq!(
        v["records"][0]["sinks"],
        serde_json::json!(["all", "north"])
    );

    let (code, v, err) = run(&[
        "fan-1",
        r#"[{"ts":1,"metrics":{"t":1}},{"ts":2,"metrics":{"t":2},"tags":{"site":"north"}}]"#,
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(v["records"][0]["class"], "normal");
    assert_eq!(
        v["records"][0]["sinks"],
        serde_json::json!(["all", "http_only"])
    );
    assert_eq!(
        v["records"][1]["sinks"],
        serde_json::json!(["all", "http_only", "north"])
    );

    let (code, _, err) = run(&["pump-1", r#"{"metrics":{}}"#]);
    assert_ne!(code, 0);
    assert!(err.contains("would be refused"), "{err}");
    let (code, _, err) = run(&[
        "pump-1",
        r#"{"ts":1,"metrics":{"t":1}}"#,
        "--topic",
        "other/pump-1",
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("matches no template"), "{err}");
}
