//! A full disk, for real: the WAL on a small tmpfs. Needs root (mount); CI
//! runs as root.

use std::process::Command;
use std::time::Duration;

use crate::helpers::{archived_keys, is_root, spawn_app_at, telemetry, wait_until, SmallDisk};

#[test]
fn low_free_disk_turns_on_backpressure_and_ingest_resumes_by_itself_when_space_returns() {
    assert!(
        is_root(),
        "this test mounts a tmpfs and must run as root (CI does)"
    );
    let disk = SmallDisk::mount("8m").expect("mount tmpfs");
    let wal_dir = disk.path().join("wal");
    let app = spawn_app_at(
        Some(&wal_dir),
        "[wal]\nmin_free_disk_bytes = 2097152\n",
        |_, t| gateway::startup::sink_factory(t),
    );
    assert_eq!(
        app.post_json("dev-1", &telemetry("before", 1.0)).status,
        202
    );
    let filler = disk.fill(1 << 20);
    wait_until("backpressure on", Duration::from_secs(5), || {
        app.post_json("dev-1", &telemetry("x", 1.0)).status == 503
    });
    let r = app.post_json("dev-1", &telemetry("during", 1.0));
    assert_eq!(r.status, 503);
    assert_eq!(r.body["error"]["code"], "backpressure");
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("min_free_disk_bytes"),
        "{}",
        r.text
    );
    assert_eq!(app.get("/readyz").status, 503);

    std::fs::remove_file(filler).unwrap();
    wait_until("ingest resumes", Duration::from_secs(5), || {
        app.post_json("dev-1", &telemetry("after", 1.0)).status == 202
    });
    assert_eq!(app.get("/readyz").status, 200);
    // "x" may have been accepted before backpressure turned on; "during"
    // was refused and must never arrive.
    wait_until("delivered", Duration::from_secs(10), || {
        let keys = archived_keys(&app.archive_dir());
        keys.contains("dev-1:before") && keys.contains("dev-1:after")
    });
    assert!(!archived_keys(&app.archive_dir()).contains("dev-1:during"));
    drop(app);
}

#[test]
fn a_really_full_disk_fails_appends_with_503_and_loses_nothing_acknowledged() {
    assert!(
        is_root(),
        "this test mounts a tmpfs and must run as root (CI does)"
    );
    let disk = SmallDisk::mount("4m").expect("mount tmpfs");
    let wal_dir = disk.path().join("wal");
    // No free-space guard: let SQLite hit ENOSPC itself.
    let app = spawn_app_at(
        Some(&wal_dir),
        "[wal]\nmin_free_disk_bytes = 0\n",
        |_, t| gateway::startup::sink_factory(t),
    );
    let mut acked = Vec::new();
    let mut full = None;
    for i in 0..100_000 {
        let id = format!("m{i}");
        let big = format!(
            r#"{{"msg_id":"{id}","ts":1764057600123,"metrics":{{"blob":"{}"}}}}"#,
            "x".repeat(200)
        );
        let r = app.post_json("dev-1", &big);
        match r.status {
            202 => acked.push(format!("dev-1:{id}")),
            503 => {
                full = Some(r);
                break;
            }
            s => panic!("unexpected {s}: {}", r.text),
        }
    }
    let full = full.expect("the disk never filled up");
    assert_eq!(
        full.body["error"]["code"], "storage_unavailable",
        "{}",
        full.text
    );
    assert!(full.headers.contains_key("retry-after"));
    assert!(acked.len() > 100, "only {} records fit", acked.len());
    // A refusal after the append is counted like any other.
    assert_eq!(
        app.metric(r#"gateway_ingest_rejected_total{reason="storage",source="http"}"#),
        1.0
    );
    assert_eq!(
        app.metric(r#"gateway_ingest_records_total{outcome="rejected",source="http"}"#),
        1.0
    );
    assert_eq!(
        app.get("/readyz").status,
        503,
        "readyz must say the WAL is not writable"
    );

    // Every acknowledged record reaches the archive (on another disk).
    wait_until(
        "acknowledged records delivered",
        Duration::from_secs(30),
        || {
            let have = archived_keys(&app.archive_dir());
            acked.iter().all(|k| have.contains(k))
        },
    );
    // Compaction needs retention to pass, so make room by hand: grow the tmpfs.
    let ok = Command::new("mount")
        .args(["-o", "remount,size=64m"])
        .arg(disk.path())
        .status()
        .unwrap();
    assert!(ok.success());
    // Ready again before any append: a load balancer that stopped sending
    // on 503 sends nothing that could prove the disk writable.
    wait_until(
        "ready again with no append since the disk filled",
        Duration::from_secs(5),
        || app.get("/readyz").status == 200,
    );
    wait_until("ingest works again", Duration::from_secs(10), || {
        app.post_json("dev-1", &telemetry("after-full", 1.0)).status == 202
    });
    drop(app);
}
