//! The uplink (DESIGN §6b, issue 33): compression on the wire for the
//! `http`, `mqtt` (batch payload) and `s3` sinks, read back at the far
//! side by the README's own consumers (tests/support/readme_consumers.py
//! runs the README blocks), and the bytes on the wire per record.

use std::collections::{BTreeMap, HashSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::analytics::Analytics;
use crate::broker::Mosquitto;
use crate::helpers::{free_port, python_json_lines, spawn_app, wait_until, TestApp};
use crate::s3::Moto;

fn support(script: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/support")
        .join(script)
}

fn python() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv-test/bin/python")
}

/// A Python helper process of the test; killed on drop.
struct Py(Child);

impl Py {
    fn spawn(script: &str, args: &[String], stdout: Stdio) -> Py {
        Py(Command::new(python())
            .arg(support(script))
            .args(args)
            .stdout(stdout)
            .stderr(Stdio::inherit())
            .spawn()
            .expect(".venv-test exists (scripts/deps.sh test)"))
    }

    fn wait_port(self, port: u16) -> Py {
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "server did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        self
    }
}

impl Drop for Py {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Realistic telemetry (issue 33's targets): 200 devices, 5 metrics
/// (slowly varying floats, a counter, a boolean), 2 tags. Record `i`.
fn reading(i: usize) -> (String, String) {
    let dev = i % 200;
    let round = i / 200;
    let drift = |base: f64, step: f64| {
        let x = base + ((dev * 7 + round * 3) % 11) as f64 * step;
        (x * 100.0).round() / 100.0
    };
    let body = format!(
        r#"{{"msg_id":"r{i}","ts":"2026-11-25T08:{:02}:{:02}.{:03}Z","metrics":{{"temperature_c":{},"humidity_pct":{},"pressure_hpa":{},"cycles":{},"door_open":{}}},"tags":{{"site":"north","line":"line-{}"}}}}"#,
        (round / 12) % 60,
        (round * 5) % 60,
        (dev * 37) % 1000,
        drift(21.0, 0.05),
        drift(40.0, 0.3),
        drift(1012.0, 0.1),
        1000 + round * 3 + dev,
        (dev + round) % 17 == 0,
        dev % 4
    );
    (format!("sensor-{dev:03}"), body)
}

fn send_readings(app: &TestApp, n: usize) -> HashSet<String> {
    (0..n)
        .map(|i| {
            let (dev, body) = reading(i);
            assert_eq!(app.post_json(&dev, &body).status, 202);
            format!("{dev}:r{i}")
        })
        .collect()
}

fn keys_of<'a>(records: impl IntoIterator<Item = &'a Value>) -> HashSet<String> {
    records
        .into_iter()
        .map(|r| r["idempotency_key"].as_str().unwrap().to_string())
        .collect()
}

fn read_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn http_sink(url: &str, extra: &str) -> String {
    format!(
        "gateway_id = \"edge-u\"\n[sinks.api]\nkind = \"http\"\nurl = \"{url}\"\nbatch_max_wait_ms = 20\n\
         retry_base_ms = 50\nretry_max_ms = 200\n{extra}"
    )
}

fn decode(encoding: Option<&str>, body: &[u8]) -> Vec<u8> {
    match encoding {
        None => body.to_vec(),
        Some("gzip") => {
            let mut v = Vec::new();
            flate2::read::GzDecoder::new(body)
                .read_to_end(&mut v)
                .unwrap();
            v
        }
        Some("zstd") => zstd::stream::decode_all(body).unwrap(),
        Some(other) => panic!("unexpected Content-Encoding {other}"),
    }
}

#[test]
fn the_http_sink_compresses_each_body_names_it_in_content_encoding_and_counts_the_wire_bytes() {
    for compression in ["gzip", "zstd"] {
        let api = Analytics::start();
        let app = spawn_app(&http_sink(
            &api.url(),
            &format!("compression = \"{compression}\"\n"),
        ));
        let want = send_readings(&app, 300);
        let mut got = HashSet::new();
        wait_until("every record posted", Duration::from_secs(15), || {
            got = api
                .seen()
                .iter()
                .flat_map(|s| {
                    let body = decode(
                        s.headers.get("content-encoding").map(String::as_str),
                        &s.raw,
                    );
                    String::from_utf8(body)
                        .unwrap()
                        .lines()
                        .map(|l| serde_json::from_str::<Value>(l).unwrap())
                        .collect::<Vec<_>>()
                })
                .map(|r| r["idempotency_key"].as_str().unwrap().to_string())
                .collect();
            got == want
        });
        let seen = api.seen();
        for s in &seen {
            assert_eq!(
                s.headers["content-encoding"], compression,
                "{:?}",
                s.headers
            );
        }
        // The counter is the bytes the API received; far less than the NDJSON.
        let wire: usize = seen.iter().map(|s| s.raw.len()).sum();
        wait_until("bytes counted", Duration::from_secs(5), || {
            app.metric(r#"gateway_sink_sent_bytes_total{sink="api"}"#) == wire as f64
        });
        let payload = app.metric(r#"gateway_sink_payload_bytes_total{sink="api"}"#);
        assert!(
            (wire as f64) < payload / 3.0,
            "{compression}: {wire} bytes on the wire for {payload} of NDJSON"
        );
    }
}

#[test]
fn the_readme_http_consumer_reads_every_record_the_sink_posts_with_zstd() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("records.ndjson");
    let port = free_port();
    let _server = Py::spawn(
        "readme_consumers.py",
        &["http".into(), port.to_string(), out.display().to_string()],
        Stdio::null(),
    )
    .wait_port(port);
    let app = spawn_app(&http_sink(
        &format!("http://127.0.0.1:{port}/ingest"),
        "compression = \"zstd\"\n",
    ));
    let want = send_readings(&app, 200);
    wait_until(
        "the README consumer has every record",
        Duration::from_secs(15),
        || keys_of(&read_lines(&out)) == want,
    );
}

fn mqtt_batch_sink(port: u16, version: &str, compression: &str) -> String {
    format!(
        "gateway_id = \"edge-u\"\n[sinks.cloud]\nkind = \"mqtt\"\nurl = \"mqtt://127.0.0.1:{port}\"\n\
         topic_prefix = \"cloud\"\nversion = \"{version}\"\npayload = \"batch\"\ncompression = \"{compression}\"\n\
         batch_max_records = 100\nbatch_max_wait_ms = 200\nretry_base_ms = 50\nretry_max_ms = 300\n"
    )
}

/// Starts the README's MQTT consumer on `port`; returns it and the file
/// its JSON lines go to once `count` records arrived.
fn readme_mqtt_consumer(dir: &Path, port: u16, version: &str, count: usize) -> (Py, PathBuf) {
    let out = dir.join(format!("mqtt-{version}.ndjson"));
    let ready = dir.join(format!("mqtt-{version}.ready"));
    let py = Py::spawn(
        "readme_consumers.py",
        &[
            "mqtt".into(),
            port.to_string(),
            version.into(),
            count.to_string(),
            "30".into(),
            ready.display().to_string(),
        ],
        Stdio::from(std::fs::File::create(&out).unwrap()),
    );
    wait_until("the consumer subscribed", Duration::from_secs(15), || {
        ready.exists()
    });
    (py, out)
}

#[test]
fn an_mqtt_batch_payload_is_one_compressed_publish_with_the_v5_user_properties_read_by_the_readme_consumer(
) {
    let tmp = tempfile::tempdir().unwrap();
    let cloud = Mosquitto::start(tmp.path(), "allow_anonymous true", "");
    let (mut consumer, out) = readme_mqtt_consumer(tmp.path(), cloud.port, "5", 300);
    let app = spawn_app(&mqtt_batch_sink(cloud.port, "5", "zstd"));
    let want = send_readings(&app, 300);
    wait_until("the consumer is done", Duration::from_secs(40), || {
        consumer.0.try_wait().unwrap().is_some()
    });
    let got = read_lines(&out);
    assert_eq!(keys_of(got.iter().map(|g| &g["record"])), want);
    // One PUBLISH per batch (at most 100 records), on the batch topic, with
    // properties that match what it carries.
    let mut per_msg: BTreeMap<u64, Vec<&Value>> = BTreeMap::new();
    for g in &got {
        assert_eq!(g["topic"], "cloud/edge-u/batch");
        per_msg
            .entry(g["msg"].as_u64().unwrap())
            .or_default()
            .push(g);
    }
    assert!(
        per_msg.len() >= 3 && per_msg.len() < 300,
        "{} messages",
        per_msg.len()
    );
    for msgs in per_msg.values() {
        let props = &msgs[0]["props"];
        assert_eq!(props["content-encoding"], "zstd");
        assert_eq!(props["records"], msgs.len().to_string());
        let first: u64 = props["first-seq"].as_str().unwrap().parse().unwrap();
        let last: u64 = props["last-seq"].as_str().unwrap().parse().unwrap();
        assert!(
            first <= last && last - first + 1 >= msgs.len() as u64,
            "{props}"
        );
        assert!(msgs.len() <= 100);
    }
    wait_until("acked in the WAL", Duration::from_secs(5), || {
        app.metric(r#"gateway_sink_records_total{outcome="ok",sink="cloud"}"#) >= 300.0
    });
}

#[test]
fn an_mqtt_3_batch_payload_with_gzip_is_read_by_the_readme_consumer_without_properties() {
    let tmp = tempfile::tempdir().unwrap();
    let cloud = Mosquitto::start(tmp.path(), "allow_anonymous true", "");
    let (mut consumer, out) = readme_mqtt_consumer(tmp.path(), cloud.port, "3.1.1", 200);
    let app = spawn_app(&mqtt_batch_sink(cloud.port, "3.1.1", "gzip"));
    let want = send_readings(&app, 200);
    wait_until("the consumer is done", Duration::from_secs(40), || {
        consumer.0.try_wait().unwrap().is_some()
    });
    let got = read_lines(&out);
    assert_eq!(keys_of(got.iter().map(|g| &g["record"])), want);
    assert!(got.iter().all(|g| g["topic"] == "cloud/edge-u/batch"));
}

#[test]
fn the_s3_sink_writes_zstd_objects_that_the_readme_consumer_reads() {
    let moto = Moto::start();
    moto.create_bucket("lake");
    let creds = tempfile::tempdir().unwrap();
    std::fs::write(creds.path().join("id"), "test\n").unwrap();
    std::fs::write(creds.path().join("secret"), "test\n").unwrap();
    let app = spawn_app(&format!(
        "gateway_id = \"edge-u\"\n[sinks.lake]\nkind = \"s3\"\nurl = \"s3://lake/site\"\nendpoint = \"{}\"\n\
         access_key_id_file = \"{}\"\nsecret_access_key_file = \"{}\"\n\
         compression = \"zstd\"\nbatch_max_wait_ms = 20\n",
        moto.endpoint(),
        creds.path().join("id").display(),
        creds.path().join("secret").display()
    ));
    let want = send_readings(&app, 200);
    let mut got = Vec::new();
    wait_until(
        "every record in the bucket",
        Duration::from_secs(20),
        || {
            got = python_json_lines(
                "readme_consumers.py",
                &["s3".into(), moto.endpoint(), "lake".into()],
            );
            keys_of(got.iter().map(|g| &g["record"])) == want
        },
    );
    for g in &got {
        let key = g["key"].as_str().unwrap();
        assert!(
            key.starts_with("site/dt=") && key.ends_with(".ndjson.zst"),
            "{key}"
        );
    }
}

/// Bytes on the wire per record, counted at the far side, for one sink
/// kind and compression: (raw NDJSON bytes, wire bytes, records).
fn measure_http(compression: &str, n: usize) -> (u64, u64, u64) {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let out = dir.path().join("api.ndjson");
    let _api = Py::spawn(
        "analytics_server.py",
        &[port.to_string(), out.display().to_string()],
        Stdio::null(),
    )
    .wait_port(port);
    // Full batches of the default size (500): they leave when full.
    let app = spawn_app(&format!(
        "gateway_id = \"edge-u\"\n[sinks.api]\nkind = \"http\"\nurl = \"http://127.0.0.1:{port}/ingest\"\n\
         compression = \"{compression}\"\nbatch_max_wait_ms = 600000\n"
    ));
    send_readings(&app, n);
    let stats = || -> Value {
        ureq::get(&format!("http://127.0.0.1:{port}/stats"))
            .call()
            .unwrap()
            .into_json()
            .unwrap()
    };
    wait_until("every batch at the API", Duration::from_secs(30), || {
        stats()["records"] == n as u64
    });
    let s = stats();
    (
        s["body_bytes"].as_u64().unwrap(),
        s["wire_bytes"].as_u64().unwrap(),
        s["records"].as_u64().unwrap(),
    )
}

fn measure_mqtt(compression: &str, n: usize) -> (u64, u64, u64) {
    let tmp = tempfile::tempdir().unwrap();
    let cloud = Mosquitto::start(tmp.path(), "allow_anonymous true", "");
    let (mut consumer, out) = readme_mqtt_consumer(tmp.path(), cloud.port, "5", n);
    let app = spawn_app(&format!(
        "gateway_id = \"edge-u\"\n[sinks.cloud]\nkind = \"mqtt\"\nurl = \"mqtt://127.0.0.1:{}\"\n\
         topic_prefix = \"cloud\"\nversion = \"5\"\npayload = \"batch\"\ncompression = \"{compression}\"\n\
         batch_max_wait_ms = 600000\n",
        cloud.port
    ));
    send_readings(&app, n);
    wait_until("the consumer is done", Duration::from_secs(40), || {
        consumer.0.try_wait().unwrap().is_some()
    });
    let got = read_lines(&out);
    let mut wire = BTreeMap::new();
    let mut raw = 0;
    for g in &got {
        wire.insert(g["msg"].as_u64().unwrap(), g["wire"].as_u64().unwrap());
        raw += serde_json::to_string(&g["record"]).unwrap().len() as u64 + 1;
    }
    (raw, wire.values().sum(), got.len() as u64)
}

/// Issue 33, target 1: with batches of >= 100 records, zstd sends <= 15 %
/// and gzip <= 30 % of the raw JSON, counted at the far side (the API's
/// received body bytes; the payloads the cloud subscriber received).
/// `--nocapture` prints the table of bench/results/uplink-bytes.md.
#[test]
fn bytes_on_the_wire_per_record_meet_the_targets_for_zstd_and_gzip_batches() {
    let n = 2000;
    let mut table = String::from(
        "| sink | compression | raw JSON B/record | wire B/record | wire / raw |\n|---|---|---|---|---|\n",
    );
    for (kind, measure) in [
        ("http", measure_http as fn(&str, usize) -> (u64, u64, u64)),
        ("mqtt batch", measure_mqtt),
    ] {
        for compression in ["none", "gzip", "zstd"] {
            let (raw, wire, records) = measure(compression, n);
            assert_eq!(records, n as u64);
            let ratio = wire as f64 / raw as f64;
            table.push_str(&format!(
                "| {kind} | {compression} | {:.0} | {:.1} | {:.1} % |\n",
                raw as f64 / n as f64,
                wire as f64 / n as f64,
                ratio * 100.0
            ));
            let limit = match compression {
                "zstd" => 0.15,
                "gzip" => 0.30,
                _ => 1.0,
            };
            assert!(
                ratio <= limit,
                "{kind} {compression}: {ratio:.3} of the raw JSON\n{table}"
            );
        }
    }
    println!("{table}");
}

/// The body bytes per second a series of requests arrived at, after the
/// first `burst` bytes (what a full bucket lets go at once).
fn arrival_rate(seen: &[crate::analytics::Seen], burst: f64) -> f64 {
    let (first, last) = (&seen[0], &seen[seen.len() - 1]);
    let before_last: usize = seen[..seen.len() - 1].iter().map(|s| s.raw.len()).sum();
    (before_last as f64 - burst) / last.at.duration_since(first.at).as_secs_f64()
}

#[test]
fn a_byte_budget_holds_the_sink_within_its_rate_at_the_api_and_changes_at_run_time() {
    let api = Analytics::start();
    let app = spawn_app(&http_sink(
        &api.url(),
        "batch_max_records = 25\nbudget = { bytes_per_s = 20000, burst_bytes = 20000 }\n",
    ));
    let want = send_readings(&app, 800); // ~320 kB: 16 s at 20 kB/s
    std::thread::sleep(Duration::from_secs(8));
    let seen = api.seen();
    let rate = arrival_rate(&seen, 20000.0);
    assert!(
        (17_000.0..=21_000.0).contains(&rate),
        "{rate:.0} B/s at the API over {} requests for a budget of 20000 B/s",
        seen.len()
    );
    assert!(app.metric(r#"gateway_sink_held_records{reason="budget",sink="api"}"#) > 0.0);
    let state = |app: &TestApp| app.admin("GET", "/admin/sinks", None).body;
    let budget = |v: &Value| v[0]["state"]["budget"].clone();
    assert_eq!(
        budget(&state(&app)),
        serde_json::json!({"bytes_per_s": 20000, "burst_bytes": 20000})
    );

    // Lifted at run time: the rest goes at once, and /admin/sinks says so.
    let r = app.admin(
        "POST",
        "/admin/config",
        Some(serde_json::json!({"settings": {"sinks.api.budget": null}})),
    );
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(budget(&state(&app)), Value::Null);
    wait_until("the backlog delivered", Duration::from_secs(5), || {
        api.accepted_keys() == want
    });
    assert_eq!(
        app.metric(r#"gateway_sink_held_records{reason="budget",sink="api"}"#),
        0.0
    );
}

fn alarm(i: usize) -> String {
    format!(r#"{{"msg_id":"a{i}","ts":"2026-11-25T08:00:00.123Z","metrics":{{"alarm":1}}}}"#)
}

/// Idempotency keys the API accepted that start with `prefix`.
fn accepted_with(api: &Analytics, prefix: &str) -> HashSet<String> {
    api.accepted_keys()
        .into_iter()
        .filter(|k| k.starts_with(prefix))
        .collect()
}

#[test]
fn a_spent_quota_lets_only_high_through_from_the_reserve_and_is_still_spent_after_a_restart() {
    let api = Analytics::start();
    let data = tempfile::tempdir().unwrap();
    // 12 kB a day, 6 kB of it for high only: normal stops after ~6 kB.
    let toml = format!(
        "gateway_id = \"edge-u\"\n\
         [[priority]]\nclass = \"high\"\nmatch = {{ metrics_any = [\"alarm\"] }}\n\
         [sinks.api]\nkind = \"http\"\nurl = \"{}\"\nbatch_max_records = 10\nbatch_max_wait_ms = 20\n\
         retry_base_ms = 50\nretry_max_ms = 200\n\
         quota = {{ bytes = 12000, period = \"1d\", reserve_high = 6000 }}\n",
        api.url()
    );
    let start = || {
        crate::helpers::spawn_app_at(Some(data.path()), &toml, |_, t| {
            gateway::startup::sink_factory(t)
        })
    };
    let remaining = |app: &TestApp| app.metric(r#"gateway_sink_quota_remaining_bytes{sink="api"}"#);
    let app = start();
    send_readings(&app, 60);
    wait_until(
        "normal records stop at the quota",
        Duration::from_secs(10),
        || {
            remaining(&app) <= 6000.0
                && app.metric(r#"gateway_sink_held_records{reason="quota",sink="api"}"#) > 0.0
        },
    );
    std::thread::sleep(Duration::from_millis(500));
    let normal = accepted_with(&api, "sensor-").len();
    let wire: usize = api.seen().iter().map(|s| s.raw.len()).sum();
    assert!(
        normal < 60,
        "{normal} normal records went past a spent quota"
    );
    // Stopped within one batch (10 records, ~4 kB) of the normal share.
    assert!(
        wire <= 6000 + 4500,
        "{wire} bytes for a normal share of 6000"
    );

    // High records still go, from the reserve.
    for i in 0..5 {
        assert_eq!(app.post_json("pump-1", &alarm(i)).status, 202);
    }
    wait_until("high records delivered", Duration::from_secs(5), || {
        accepted_with(&api, "pump-1:").len() == 5
    });
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        accepted_with(&api, "sensor-").len(),
        normal,
        "normal records went too"
    );
    let left = remaining(&app);
    drop(app);

    // After a restart the spent bytes are still known: normal stays held, high goes.
    let app = start();
    wait_until("the quota reloaded", Duration::from_secs(5), || {
        remaining(&app) == left
    });
    assert_eq!(app.post_json("pump-1", &alarm(5)).status, 202);
    wait_until(
        "high delivered after the restart",
        Duration::from_secs(5),
        || accepted_with(&api, "pump-1:").len() == 6,
    );
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        accepted_with(&api, "sensor-").len(),
        normal,
        "normal records flowed after a restart despite the spent quota"
    );
    assert!(app.metric(r#"gateway_sink_held_records{reason="quota",sink="api"}"#) > 0.0);
}

#[test]
fn a_backlog_in_large_batches_stops_at_the_normal_share_and_leaves_the_reserve_to_high() {
    let api = Analytics::start();
    // 100 kB, 40 kB of it for high; a paused sink's backlog of 600 records
    // (~240 kB) in batches of up to 500: one such batch would spend the
    // whole quota, reserve and all.
    let app = spawn_app(&format!(
        "{}[[priority]]\nclass = \"high\"\nmatch = {{ metrics_any = [\"alarm\"] }}\n",
        http_sink(
            &api.url(),
            "paused = true\nquota = { bytes = 100000, period = \"1d\", reserve_high = 40000 }\n"
        )
    ));
    send_readings(&app, 600);
    let r = app.admin(
        "POST",
        "/admin/config",
        Some(serde_json::json!({"key": "sinks.api.paused", "value": false})),
    );
    assert_eq!(r.status, 200, "{}", r.text);
    wait_until(
        "normal records held at the quota",
        Duration::from_secs(10),
        || app.metric(r#"gateway_sink_held_records{reason="quota",sink="api"}"#) > 0.0,
    );
    std::thread::sleep(Duration::from_millis(500));
    let wire: usize = api.seen().iter().map(|s| s.raw.len()).sum();
    assert!(
        (55_000..=61_000).contains(&wire),
        "{wire} bytes sent for a normal share of 60000"
    );
    for i in 0..5 {
        assert_eq!(app.post_json("pump-1", &alarm(i)).status, 202);
    }
    wait_until(
        "high records delivered from the reserve",
        Duration::from_secs(5),
        || accepted_with(&api, "pump-1:").len() == 5,
    );
}

/// `HH:MM-HH:MM` from `from` to `to` minutes after the local time now.
fn window_from_now(from: i64, to: i64) -> String {
    use chrono::Timelike;
    let t = chrono::Local::now();
    let now = i64::from(t.hour() * 60 + t.minute());
    let fmt = |m: i64| {
        let m = m.rem_euclid(1440);
        format!("{:02}:{:02}", m / 60, m % 60)
    };
    format!("{}-{}", fmt(now + from), fmt(now + to))
}

fn debug_record(i: usize) -> String {
    format!(r#"{{"msg_id":"d{i}","ts":"2026-11-25T08:00:00.123Z","metrics":{{"debug_level":3}}}}"#)
}

#[test]
fn a_class_outside_its_send_window_waits_in_the_wal_while_the_others_go_and_goes_when_the_window_opens(
) {
    let api = Analytics::start();
    let app = spawn_app(&format!(
        "{}[[priority]]\nclass = \"low\"\nmatch = {{ metrics_any = [\"debug_level\"] }}\n",
        http_sink(
            &api.url(),
            &format!(
                "windows = {{ low = [\"{}\"] }}\n",
                window_from_now(120, 180)
            ),
        )
    ));
    for i in 0..10 {
        assert_eq!(app.post_json("trace-1", &debug_record(i)).status, 202);
    }
    let normal = send_readings(&app, 20);
    wait_until("normal records delivered", Duration::from_secs(10), || {
        accepted_with(&api, "sensor-") == normal
    });
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        accepted_with(&api, "trace-1:").is_empty(),
        "low went outside its window"
    );
    assert!(app.metric(r#"gateway_sink_held_records{reason="window",sink="api"}"#) > 0.0);

    // The window is moved over now at run time: the low records go.
    let open = serde_json::json!({"low": [window_from_now(-60, 60)]});
    let r = app.admin(
        "POST",
        "/admin/config",
        Some(serde_json::json!({"key": "sinks.api.windows", "value": open})),
    );
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(
        app.admin("GET", "/admin/sinks", None).body[0]["state"]["windows"],
        open
    );
    wait_until(
        "low records delivered in their window",
        Duration::from_secs(10),
        || accepted_with(&api, "trace-1:").len() == 10,
    );
}

#[test]
fn with_live_share_a_draining_backlog_keeps_to_its_share_of_the_budget_while_live_records_go() {
    let api = Analytics::start();
    let app = spawn_app(&http_sink(
        &api.url(),
        "batch_max_records = 25\npaused = true\ndrain = \"live_first\"\nlive_after = \"1s\"\n\
         budget = { bytes_per_s = 20000, burst_bytes = 20000 }\nlive_share = 0.5\n",
    ));
    send_readings(&app, 600); // ~240 kB of backlog
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        app.admin("POST", "/admin/sinks/api/resume", None).status,
        200
    );
    // Live records, ~4 kB/s, for 8 s.
    let started = Instant::now();
    let mut live = HashSet::new();
    let mut i = 0;
    while started.elapsed() < Duration::from_secs(8) {
        assert_eq!(
            app.post_json("live-1", &alarm(i).replace("alarm", "flow"))
                .status,
            202
        );
        live.insert(format!("live-1:a{i}"));
        i += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_until("live records delivered", Duration::from_secs(3), || {
        accepted_with(&api, "live-1:") == live
    });
    // The backlog's bytes at the API over the run: within its half of the budget.
    let seen = api.seen();
    let span = seen
        .last()
        .unwrap()
        .at
        .duration_since(seen[0].at)
        .as_secs_f64();
    let backlog: usize = seen
        .iter()
        .flat_map(|s| s.body.lines().map(str::to_string).collect::<Vec<_>>())
        .filter(|l| l.contains(r#""device_id":"sensor-"#))
        .map(|l| l.len() + 1)
        .sum();
    let rate = (backlog as f64 - 10_000.0) / span;
    assert!(
        rate <= 11_500.0,
        "the backlog took {rate:.0} B/s of a 20000 B/s budget with live_share 0.5"
    );
    assert!(rate >= 7_000.0, "the backlog drained at only {rate:.0} B/s");
    assert_eq!(
        app.admin("GET", "/admin/sinks", None).body[0]["state"]["live_share"],
        0.5
    );
}

#[test]
fn under_a_budget_high_records_arriving_during_a_backlog_drain_are_delivered_within_2_s() {
    let api = Analytics::start();
    // Default batch size (500 records, ~200 kB: 10 s of this budget).
    let app = spawn_app(&format!(
        "{}[[priority]]\nclass = \"high\"\nmatch = {{ metrics_any = [\"alarm\"] }}\n",
        http_sink(
            &api.url(),
            "budget = { bytes_per_s = 20000, burst_bytes = 20000 }\n"
        )
    ));
    send_readings(&app, 1500); // ~600 kB: 30 s of budget
    let mut sent_at = Vec::new();
    for i in 0..8 {
        std::thread::sleep(Duration::from_secs(1));
        assert_eq!(app.post_json("pump-1", &alarm(i)).status, 202);
        sent_at.push((format!("pump-1:a{i}"), Instant::now()));
    }
    wait_until("every alarm delivered", Duration::from_secs(5), || {
        accepted_with(&api, "pump-1:").len() == 8
    });
    let seen = api.seen();
    let mut worst = Duration::ZERO;
    for (key, at) in &sent_at {
        let arrived = seen
            .iter()
            .find(|s| s.body.contains(&format!("\"{key}\"")))
            .unwrap()
            .at;
        worst = worst.max(arrived.saturating_duration_since(*at));
    }
    assert!(
        worst <= Duration::from_secs(2),
        "a high record waited {worst:?} behind the budgeted backlog"
    );
}
