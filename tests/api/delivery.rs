//! Delivery through the dispatcher: retries with backoff, dead letters per
//! sink, supervision of a panicking sink.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use gateway::config::SinkTarget;
use gateway_actors::sink::s3::ObjectStoreSink;
use gateway_actors::sink::{PublishFuture, Sink};
use gateway_actors::wal::Batch;

use crate::helpers::{
    archive_objects, archived_keys, spawn_app, spawn_app_with, telemetry, wait_until,
};

#[test]
fn an_unwritable_archive_keeps_records_pending_with_backoff_and_delivers_them_all_once_writable() {
    let outside = tempfile::tempdir().unwrap();
    let blocker = outside.path().join("blocker");
    std::fs::write(&blocker, b"a file where a directory must go").unwrap();
    let target = blocker.join("archive");
    let app = spawn_app(&format!(
        "[sinks.archive]\nkind = \"s3\"\nurl = \"file://{}\"\nbatch_max_wait_ms = 0\nretry_base_ms = 20\nretry_max_ms = 100\nretry_budget = 100000\ncircuit_threshold = 1000\n",
        target.display()
    ));
    for i in 0..20 {
        assert_eq!(
            app.post_json("dev-1", &telemetry(&format!("m{i}"), i as f64))
                .status,
            202
        );
    }
    let retry = r#"gateway_sink_publish_total{outcome="retry",sink="archive"}"#;
    wait_until("retries", Duration::from_secs(10), || {
        app.metric(retry) >= 3.0
    });
    wait_until("pending gauge", Duration::from_secs(5), || {
        app.metric(r#"gateway_wal_records{sink="archive",state="enqueued"}"#)
            + app.metric(r#"gateway_wal_records{sink="archive",state="inflight"}"#)
            == 20.0
    });
    assert_eq!(app.metric(r#"gateway_sink_up{sink="archive"}"#), 0.0);
    // Backoff, not a spin: with delays of 10-100 ms a second holds well under 100 attempts.
    let before = app.metric(retry);
    std::thread::sleep(Duration::from_secs(1));
    let per_second = app.metric(retry) - before;
    assert!(
        (1.0..100.0).contains(&per_second),
        "{per_second} retries in one second"
    );
    assert_eq!(
        app.metric(r#"gateway_wal_records{sink="archive",state="dead"}"#),
        0.0
    );

    std::fs::remove_file(&blocker).unwrap();
    wait_until("all records delivered", Duration::from_secs(15), || {
        archived_keys(&target).len() == 20
    });
    let expected: HashSet<String> = (0..20).map(|i| format!("dev-1:m{i}")).collect();
    assert_eq!(archived_keys(&target), expected);
    wait_until("sink up", Duration::from_secs(5), || {
        app.metric(r#"gateway_sink_up{sink="archive"}"#) == 1.0
    });
}

#[test]
fn a_tiny_retry_budget_dead_letters_records_for_that_sink_only() {
    let outside = tempfile::tempdir().unwrap();
    let blocker = outside.path().join("blocker");
    std::fs::write(&blocker, b"x").unwrap();
    let good = outside.path().join("good");
    let app = spawn_app(&format!(
        "[sinks.good]\nkind = \"s3\"\nurl = \"file://{}\"\nbatch_max_wait_ms = 0\n\n\
         [sinks.bad]\nkind = \"s3\"\nurl = \"file://{}/x\"\nbatch_max_wait_ms = 0\nretry_budget = 2\nretry_base_ms = 10\nretry_max_ms = 20\n",
        good.display(),
        blocker.display()
    ));
    for i in 0..10 {
        assert_eq!(
            app.post_json("dev-1", &telemetry(&format!("m{i}"), 1.0))
                .status,
            202
        );
    }
    wait_until("good sink has all", Duration::from_secs(10), || {
        archived_keys(&good).len() == 10
    });
    wait_until(
        "bad sink dead-lettered all",
        Duration::from_secs(10),
        || app.metric(r#"gateway_sink_records_total{outcome="dead",sink="bad"}"#) == 10.0,
    );
    wait_until("dead gauge", Duration::from_secs(5), || {
        app.metric(r#"gateway_wal_records{sink="bad",state="dead"}"#) == 10.0
    });
    assert_eq!(
        app.metric(r#"gateway_wal_records{sink="good",state="dead"}"#),
        0.0
    );
    assert_eq!(
        app.metric(r#"gateway_sink_records_total{outcome="dead",sink="good"}"#),
        0.0
    );
    assert_eq!(
        app.metric(r#"gateway_wal_records{sink="bad",state="enqueued"}"#),
        0.0
    );
}

/// Panics on the first publish it ever sees (shared across restarts), then
/// behaves as the real object-store sink.
struct PanicOnce {
    inner: ObjectStoreSink,
    panicked: Arc<AtomicBool>,
}

impl Sink for PanicOnce {
    fn publish(&mut self, batch: Arc<Batch>) -> PublishFuture {
        if !self.panicked.swap(true, Ordering::SeqCst) {
            panic!("injected sink failure");
        }
        self.inner.publish(batch)
    }
}

#[test]
fn a_panicking_sink_actor_is_restarted_and_delivery_continues() {
    let panicked = Arc::new(AtomicBool::new(false));
    let flag = panicked.clone();
    let app = spawn_app_with("", move |_, target| {
        let SinkTarget::S3(cfg) = target.clone() else {
            panic!("the default sink is s3")
        };
        let flag = flag.clone();
        Arc::new(move || {
            Ok(Box::new(PanicOnce {
                inner: ObjectStoreSink::new(&cfg)?,
                panicked: flag.clone(),
            }) as Box<dyn Sink>)
        })
    });
    for i in 0..5 {
        assert_eq!(
            app.post_json("dev-1", &telemetry(&format!("p{i}"), 1.0))
                .status,
            202
        );
    }
    wait_until(
        "all delivered after the restart",
        Duration::from_secs(15),
        || archived_keys(&app.archive_dir()).len() == 5,
    );
    assert!(panicked.load(Ordering::SeqCst));
    assert!(app.metric(r#"gateway_actor_restarts_total{actor="SinkActor"}"#) >= 1.0);
    // Ingest kept working through it.
    assert_eq!(app.post_json("dev-1", &telemetry("after", 1.0)).status, 202);
}

#[test]
fn a_crashed_wal_writer_is_restarted_and_nothing_acknowledged_is_lost() {
    let app = spawn_app("");
    let mut acked = HashSet::new();
    for i in 0..10 {
        assert_eq!(
            app.post_json("dev-1", &telemetry(&format!("w{i}"), 1.0))
                .status,
            202
        );
        acked.insert(format!("dev-1:w{i}"));
    }
    app.handles
        .wal
        .store()
        .do_send(gateway_actors::wal::InjectWriterPanic);
    for i in 10..30 {
        let body = telemetry(&format!("w{i}"), 1.0);
        wait_until(
            "an accepted append after the restart",
            Duration::from_secs(10),
            || {
                let r = app.post_json("dev-1", &body);
                assert!(
                    r.status == 202 || r.status == 503,
                    "{}: {}",
                    r.status,
                    r.text
                );
                r.status == 202
            },
        );
        acked.insert(format!("dev-1:w{i}"));
    }
    wait_until("restart counted", Duration::from_secs(5), || {
        app.metric(r#"gateway_actor_restarts_total{actor="WalStore"}"#) >= 1.0
    });
    wait_until(
        "every acknowledged record delivered",
        Duration::from_secs(15),
        || archived_keys(&app.archive_dir()) == acked,
    );
}

/// A healthy gateway at its WAL size limit used to answer 503 to about a
/// fifth of its requests: delivered records kept for replay gave way too
/// slowly. Only data that a sink still needs may hold back ingest.
#[test]
fn a_gateway_at_its_wal_size_limit_with_a_healthy_sink_refuses_nothing() {
    let app = spawn_app("[wal]\nmax_bytes = 4194304\nmin_free_disk_bytes = 0\n");
    let pad = "p".repeat(240);
    let delivered = r#"gateway_sink_records_total{outcome="ok",sink="archive"}"#;
    // 16 MB in records of ~1 KB through a 4 MiB WAL. The sink keeps up: at
    // most ~1 MB is ever pending, so every byte above that is delivered
    // history, which must make room.
    let (batches, per_batch) = (320, 50);
    let mut refused = Vec::new();
    for b in 0..batches {
        let body: Vec<String> = (0..per_batch)
            .map(|i| {
                format!(
                    r#"{{"msg_id":"b{b}-{i}","ts":1764057600123,"metrics":{{"t":1.0}},"tags":{{"a":"{pad}","b":"{pad}","c":"{pad}","d":"{pad}"}}}}"#
                )
            })
            .collect();
        let r = app.post_json("dev-1", &format!("[{}]", body.join(",")));
        if r.status != 202 {
            refused.push(format!("{}: {}", r.status, r.text));
        }
        if b % 10 == 9 {
            let sent = ((b + 1) * per_batch - refused.len() * per_batch) as f64;
            wait_until("the sink keeps up", Duration::from_secs(30), || {
                app.metric(delivered) >= sent - 500.0
            });
        }
    }
    assert!(
        refused.is_empty(),
        "{} of {batches} requests refused, first: {}",
        refused.len(),
        refused[0]
    );
    // It really was at its limit: delivered records still in retention
    // (24 h) gave way.
    assert!(
        app.metric("gateway_wal_compacted_records_total") > 0.0,
        "the WAL never reached its size limit"
    );
    let want = batches * per_batch;
    wait_until("every record delivered", Duration::from_secs(30), || {
        archived_keys(&app.archive_dir()).len() == want
    });
}

/// Adaptive batching (the default of a configured sink): a sink with
/// nothing in flight sends a lone record at once. With the old fixed wait
/// every record waited for its batch (200 ms), so none of these would be
/// acknowledged within 128 ms; the margin is wide so a slow machine does not
/// fail it.
#[test]
fn a_configured_sink_sends_a_lone_record_without_waiting_for_a_batch() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app(&format!(
        "[sinks.archive]\nkind = \"s3\"\nurl = \"file://{}\"\n",
        dir.path().display()
    ));
    let sent = 10;
    for i in 0..sent {
        assert_eq!(
            app.post_json("dev-1", &telemetry(&format!("lone-{i}"), 1.0))
                .status,
            202
        );
        let want = (i + 1) as f64;
        wait_until("delivered", Duration::from_secs(10), || {
            app.metric(r#"gateway_sink_records_total{outcome="ok",sink="archive"}"#) >= want
        });
        std::thread::sleep(Duration::from_millis(30));
    }
    let fast = app.metric(r#"gateway_e2e_latency_seconds_bucket{sink="archive",le="0.128"}"#);
    assert!(
        fast >= (sent - 2) as f64,
        "only {fast} of {sent} lone records were acknowledged within 128 ms"
    );
}

/// The zero-config archive has no latency target: it gathers a second of
/// records into one object (each object costs a file, an fsync, a rename
/// and a directory fsync), so records sent 30 ms apart share objects.
#[test]
fn the_zero_config_archive_gathers_a_second_of_records_into_one_object() {
    let app = spawn_app("");
    let sent = 20;
    for i in 0..sent {
        assert_eq!(
            app.post_json("dev-1", &telemetry(&format!("calm-{i}"), 1.0))
                .status,
            202
        );
        std::thread::sleep(Duration::from_millis(30));
    }
    wait_until("every record archived", Duration::from_secs(10), || {
        archived_keys(&app.archive_dir()).len() == sent
    });
    // ~0.6 s of records: one object, or two when a batch closed mid-way.
    let objects = archive_objects(&app.archive_dir()).len();
    assert!(
        (1..=3).contains(&objects),
        "{sent} records 30 ms apart made {objects} archive objects"
    );
}
