//! The `kafka` sink against tansu (a Kafka-API broker), consumed back with
//! confluent-kafka; and sink isolation with four real targets.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::analytics::Analytics;
use crate::helpers::{
    archived_keys, free_port, python_json_lines, request, spawn_app, telemetry, wait_until,
};

fn tansu_bin() -> PathBuf {
    let home = PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into()));
    let installed = home.join(".cargo/bin/tansu");
    if installed.exists() {
        installed
    } else {
        PathBuf::from("tansu")
    }
}

/// A tansu broker with SQLite storage (so a restart keeps topics and data).
pub struct Tansu {
    child: Option<Child>,
    pub port: u16,
    db: PathBuf,
    log: PathBuf,
}

impl Tansu {
    pub fn start(dir: &Path) -> Tansu {
        let mut t = Tansu {
            child: None,
            port: free_port(),
            db: dir.join("tansu.db"),
            log: dir.join("tansu.log"),
        };
        t.spawn();
        t
    }

    fn spawn(&mut self) {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(tansu_bin())
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            // tansu reads the path of a sqlite:// URL as relative: run it in the dir.
            .args(["--storage-engine", "sqlite://tansu.db"])
            .current_dir(self.db.parent().unwrap())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("tansu is installed (scripts/deps.sh test)");
        self.child = Some(child);
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "tansu did not start: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn create_topic(&self, name: &str) {
        let out = Command::new(tansu_bin())
            .args([
                "topic",
                "create",
                "--broker",
                &format!("tcp://127.0.0.1:{}", self.port),
                "--partitions",
                "3",
                name,
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "topic create: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Every message of `topic`, read with confluent-kafka until `expected`
    /// distinct idempotency keys or `timeout`.
    pub fn dump(&self, topic: &str, expected: usize, timeout: Duration) -> Vec<Value> {
        python_json_lines(
            "kafka_dump.py",
            &[
                self.brokers(),
                topic.to_string(),
                expected.to_string(),
                timeout.as_secs_f64().to_string(),
            ],
        )
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        self.stop();
    }
}

fn kafka_sink(t: &Tansu) -> String {
    format!(
        "[sinks.events]\nkind = \"kafka\"\nbrokers = \"{}\"\ntopic = \"telemetry\"\nbatch_max_wait_ms = 20\n\
         retry_base_ms = 100\nretry_max_ms = 500\nretry_budget = 100000\npublish_timeout_ms = 5000\n",
        t.brokers()
    )
}

/// The `idempotency-key` headers of consumed messages.
pub fn keys_of(messages: &[Value]) -> HashSet<String> {
    messages
        .iter()
        .map(|m| {
            m["headers"]["idempotency-key"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect()
}

#[test]
fn the_kafka_sink_produces_every_record_keyed_by_device_with_idempotency_headers() {
    let tmp = tempfile::tempdir().unwrap();
    let tansu = Tansu::start(tmp.path());
    tansu.create_topic("telemetry");
    let app = spawn_app(&kafka_sink(&tansu));
    let mut want = HashSet::new();
    // The first record carries a W3C trace context: a `traceparent` header.
    const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    for i in 0..60 {
        let device = format!("dev-{}", i % 4);
        let mut req = ureq::post(&app.url(&format!("/ingest/{device}")))
            .set("Content-Type", "application/json");
        if i == 0 {
            req = req.set("traceparent", TRACEPARENT);
        }
        let body = telemetry(&format!("k{i}"), i as f64);
        assert_eq!(request(req, Some(&body)).status, 202);
        want.insert(format!("{device}:k{i}"));
    }
    wait_until("delivery reports for all", Duration::from_secs(30), || {
        app.metric(r#"gateway_sink_records_total{outcome="ok",sink="events"}"#) >= 60.0
    });
    let msgs = tansu.dump("telemetry", 60, Duration::from_secs(30));
    assert_eq!(keys_of(&msgs), want);
    for m in &msgs {
        assert_eq!(m["key"], m["value"]["device_id"], "message key = device id");
        assert_eq!(
            m["headers"]["idempotency-key"],
            m["value"]["idempotency_key"]
        );
        assert_eq!(m["headers"]["correlation-id"], m["value"]["correlation_id"]);
        // A record's trace context rides as a header, and only where it has one.
        assert_eq!(
            m["headers"].get("traceparent"),
            m["value"].get("traceparent")
        );
    }
    let traced: Vec<&Value> = msgs
        .iter()
        .filter(|m| m["headers"]["traceparent"].is_string())
        .collect();
    assert_eq!(traced.len(), 1, "one record had a trace context");
    // Order per device: seqs of one device rise through the topic's partition.
    for d in 0..4 {
        let device = format!("dev-{d}");
        let seqs: Vec<u64> = msgs
            .iter()
            .filter(|m| m["key"] == device.as_str())
            .map(|m| m["value"]["seq"].as_u64().unwrap())
            .collect();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{device}: {seqs:?}");
    }
}

#[test]
fn with_kafka_down_the_other_sinks_keep_delivering_and_kafka_drains_its_backlog_after() {
    let tmp = tempfile::tempdir().unwrap();
    let mut tansu = Tansu::start(tmp.path());
    tansu.create_topic("telemetry");
    let api = Analytics::start();
    let cloud = crate::broker::Mosquitto::start(tmp.path(), "allow_anonymous true", "");
    let archive = tmp.path().join("archive");
    // No message may time out while tansu is down: librdkafka then bumps its
    // idempotent producer's epoch, and tansu 0.6 refuses every produce after
    // that ("Unknown broker error") until it is wiped. On a busy machine the
    // outage below outlasts 5 s, so the publish timeout outlasts the outage
    // (the chaos harness does the same).
    let kafka =
        kafka_sink(&tansu).replace("publish_timeout_ms = 5000", "publish_timeout_ms = 120000");
    let app = spawn_app(&format!(
        "{}\n[sinks.archive]\nkind = \"s3\"\nurl = \"file://{}\"\nbatch_max_wait_ms = 20\n\
         [sinks.api]\nkind = \"http\"\nurl = \"{}\"\nbatch_max_wait_ms = 20\n\
         [sinks.cloud]\nkind = \"mqtt\"\nurl = \"mqtt://127.0.0.1:{}\"\ntopic_prefix = \"cloud\"\nbatch_max_wait_ms = 20\n",
        kafka,
        archive.display(),
        api.url(),
        cloud.port
    ));
    for i in 0..10 {
        assert_eq!(
            app.post_json("dev-1", &telemetry(&format!("warm{i}"), 1.0))
                .status,
            202
        );
    }
    wait_until(
        "kafka works before the outage",
        Duration::from_secs(30),
        || app.metric(r#"gateway_sink_records_total{outcome="ok",sink="events"}"#) >= 10.0,
    );

    tansu.stop();
    let started = Instant::now();
    for i in 0..100 {
        assert_eq!(
            app.post_json("dev-1", &telemetry(&format!("out{i}"), 1.0))
                .status,
            202
        );
    }
    let during: HashSet<String> = (0..100).map(|i| format!("dev-1:out{i}")).collect();
    wait_until(
        "archive, API and cloud broker got everything",
        Duration::from_secs(10),
        || {
            let archived = archived_keys(&archive);
            let posted = api.accepted_keys();
            let cloud_ok =
                app.metric(r#"gateway_sink_records_total{outcome="ok",sink="cloud"}"#) >= 110.0;
            during.is_subset(&archived) && during.is_subset(&posted) && cloud_ok
        },
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the other sinks were slowed by Kafka's outage"
    );
    wait_until(
        "Kafka's backlog is in the WAL",
        Duration::from_secs(5),
        || {
            app.metric(r#"gateway_wal_records{sink="events",state="enqueued"}"#)
                + app.metric(r#"gateway_wal_records{sink="events",state="inflight"}"#)
                >= 100.0
        },
    );
    assert_eq!(
        app.metric(r#"gateway_wal_records{sink="events",state="dead"}"#),
        0.0
    );

    tansu.restart();
    wait_until("Kafka drained its backlog", Duration::from_secs(60), || {
        app.metric(r#"gateway_wal_records{sink="events",state="enqueued"}"#)
            + app.metric(r#"gateway_wal_records{sink="events",state="inflight"}"#)
            == 0.0
    });
    let msgs = tansu.dump("telemetry", 110, Duration::from_secs(30));
    let got = keys_of(&msgs);
    assert!(
        during.is_subset(&got),
        "lost {} records; tansu log: {}",
        during.difference(&got).count(),
        tansu.log()
    );
}
