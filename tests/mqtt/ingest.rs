//! QoS 1 ingest, ack-after-fsync across kill -9, reconnects, mutual TLS and
//! ACLs, invalid payloads, Protobuf, the embedded broker.

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use crate::broker::{mosquitto_pub, publish_lines, Certs, Mosquitto};
use crate::helpers::{
    archived_keys, archived_records, free_port, metric_value, spawn_app, spawn_gateway_binary,
    wait_until, TestApp,
};

fn line(msg_id: &str) -> String {
    format!(
        r#"{{"msg_id":"{msg_id}","ts":1764057600123,"metrics":{{"t":21.5}},"tags":{{"fw":"1.0"}}}}"#
    )
}

fn wait_mqtt_ready(app: &TestApp) {
    wait_until("MQTT ingest connected", Duration::from_secs(20), || {
        let r = app.get("/readyz");
        r.status == 200 && r.body["checks"]["mqtt"]["detail"] == "connected"
    });
}

#[test]
fn qos1_records_from_several_devices_reach_the_archive_with_device_ids_and_enrichment() {
    for version in ["5", "3.1.1"] {
        let tmp = tempfile::tempdir().unwrap();
        let broker = Mosquitto::start(tmp.path(), "allow_anonymous true", "");
        let app = spawn_app(&format!(
            "[mqtt]\nurl = \"mqtt://127.0.0.1:{}\"\nversion = \"{version}\"\n",
            broker.port
        ));
        wait_mqtt_ready(&app);
        let mut expected = HashSet::new();
        for d in 1..=3 {
            let lines: Vec<String> = (0..20).map(|i| line(&format!("m{i}"))).collect();
            assert!(publish_lines(
                broker.port,
                &format!("devices/dev-{d}/telemetry"),
                &lines,
                &[]
            ));
            expected.extend((0..20).map(|i| format!("dev-{d}:m{i}")));
        }
        wait_until("60 records archived", Duration::from_secs(20), || {
            archived_keys(&app.archive_dir()) == expected
        });
        for r in archived_records(&app.archive_dir()) {
            assert_eq!(r["source"], "mqtt");
            let key = r["idempotency_key"].as_str().unwrap();
            assert_eq!(
                key.split(':').next().unwrap(),
                r["device_id"].as_str().unwrap()
            );
            assert_eq!(r["metrics"]["t"], 21.5);
            assert!(
                r["gateway_id"].is_string()
                    && r["receive_ts"].is_string()
                    && r["correlation_id"].is_string()
            );
        }
        assert_eq!(
            app.metric(r#"gateway_ingest_records_total{outcome="accepted",source="mqtt"}"#),
            60.0,
            "MQTT {version}"
        );
        assert_eq!(app.metric("gateway_mqtt_connected"), 1.0);
    }
}

#[test]
fn a_v5_traceparent_user_property_is_stored_with_the_record() {
    let tmp = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(tmp.path(), "allow_anonymous true", "");
    let app = spawn_app(&format!(
        "[mqtt]\nurl = \"mqtt://127.0.0.1:{}\"\nversion = \"5\"\n",
        broker.port
    ));
    wait_mqtt_ready(&app);
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let (ok, err) = mosquitto_pub(
        broker.port,
        "devices/dev-1/telemetry",
        &[
            "-V",
            "mqttv5",
            "-D",
            "publish",
            "user-property",
            "traceparent",
            tp,
            "-m",
            &line("tp"),
        ],
    );
    assert!(ok, "{err}");
    wait_until("archived", Duration::from_secs(10), || {
        !archived_records(&app.archive_dir()).is_empty()
    });
    assert_eq!(archived_records(&app.archive_dir())[0]["traceparent"], tp);
}

#[test]
fn invalid_payloads_are_acked_counted_and_never_stored_and_protobuf_is_accepted() {
    let tmp = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(tmp.path(), "allow_anonymous true", "");
    let app = spawn_app(&format!(
        "[ingest]\nmax_payload_bytes = 1024\n[mqtt]\nurl = \"mqtt://127.0.0.1:{}\"\n",
        broker.port
    ));
    wait_mqtt_ready(&app);
    let publish = |topic: &str, args: &[&str]| {
        let (ok, err) = mosquitto_pub(broker.port, topic, args);
        assert!(ok, "{err}");
    };
    let t = "devices/dev-1/telemetry";
    publish(t, &["-m", "{not json"]);
    publish(t, &["-m", r#"{"metrics":{"t":1}}"#]);
    publish(
        t,
        &[
            "-m",
            &format!(r#"{{"ts":1,"metrics":{{"t":"{}"}}}}"#, "x".repeat(2000)),
        ],
    );
    let garbage = tmp.path().join("garbage.bin");
    std::fs::write(&garbage, [0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f, 0x99]).unwrap();
    publish(t, &["-f", garbage.to_str().unwrap()]);
    publish("devices/bad$id/telemetry", &["-m", &line("x")]);

    use gateway_actors::ingest::protobuf::{
        encode, metric_value, telemetry, MetricValue, Telemetry,
    };
    let pb = Telemetry {
        schema_version: 1,
        msg_id: "pb-1".into(),
        ts: Some(telemetry::Ts::TsMs(1_764_057_600_123)),
        metrics: [(
            "t".to_string(),
            MetricValue {
                value: Some(metric_value::Value::Number(7.5)),
            },
        )]
        .into(),
        tags: Default::default(),
    };
    let pb_file = tmp.path().join("record.pb");
    std::fs::write(&pb_file, encode(&pb)).unwrap();
    publish(t, &["-f", pb_file.to_str().unwrap()]);
    publish(t, &["-m", &line("valid")]);

    let expected: HashSet<String> = ["dev-1:pb-1".to_string(), "dev-1:valid".to_string()].into();
    wait_until("the two valid records", Duration::from_secs(10), || {
        archived_keys(&app.archive_dir()) == expected
    });
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        archived_records(&app.archive_dir()).len(),
        2,
        "an invalid message was stored"
    );
    let pb_rec = archived_records(&app.archive_dir())
        .into_iter()
        .find(|r| r["idempotency_key"] == "dev-1:pb-1")
        .unwrap();
    assert_eq!(pb_rec["metrics"]["t"], 7.5);
    let text = app.get("/metrics").text;
    for reason in [
        "invalid_json",
        "invalid_schema",
        "too_large",
        "invalid_protobuf",
        "invalid_device_id",
    ] {
        let series = format!(r#"gateway_ingest_rejected_total{{reason="{reason}",source="mqtt"}}"#);
        assert_eq!(metric_value(&text, &series), 1.0, "{series}");
    }
    // Everything was acked: nothing is left for the broker to redeliver.
    assert_eq!(
        metric_value(
            &text,
            r#"gateway_ingest_records_total{outcome="rejected",source="mqtt"}"#
        ),
        5.0
    );
}

#[test]
fn the_gateway_reconnects_after_the_broker_restarts_and_loses_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let mut broker = Mosquitto::start(tmp.path(), "allow_anonymous true", "");
    let app = spawn_app(&format!(
        "[mqtt]\nurl = \"mqtt://127.0.0.1:{}\"\nreconnect_max = \"1s\"\n",
        broker.port
    ));
    wait_mqtt_ready(&app);
    let first: Vec<String> = (0..50).map(|i| line(&format!("a{i}"))).collect();
    assert!(publish_lines(
        broker.port,
        "devices/dev-1/telemetry",
        &first,
        &[]
    ));
    wait_until("first half archived", Duration::from_secs(10), || {
        archived_keys(&app.archive_dir()).len() == 50
    });

    broker.stop();
    wait_until("readyz reports MQTT down", Duration::from_secs(20), || {
        let r = app.get("/readyz");
        r.status == 503 && r.body["checks"]["mqtt"]["ok"] == false
    });
    broker.restart();
    wait_mqtt_ready(&app);
    assert!(app.metric("gateway_mqtt_reconnects_total") >= 1.0);
    let second: Vec<String> = (0..50).map(|i| line(&format!("b{i}"))).collect();
    assert!(publish_lines(
        broker.port,
        "devices/dev-1/telemetry",
        &second,
        &[]
    ));
    let expected: HashSet<String> = (0..50)
        .flat_map(|i| [format!("dev-1:a{i}"), format!("dev-1:b{i}")])
        .collect();
    wait_until("everything archived", Duration::from_secs(20), || {
        archived_keys(&app.archive_dir()) == expected
    });
}

#[test]
fn mutual_tls_connects_the_gateway_refuses_clients_without_certificates_and_acls_stop_spoofing() {
    let tmp = tempfile::tempdir().unwrap();
    let certs = Certs::generate(tmp.path(), &["gateway", "device-1", "device-2"]);
    let acl = tmp.path().join("acl");
    std::fs::write(
        &acl,
        "user gateway\ntopic read devices/+/telemetry\n\npattern write devices/%u/telemetry\n",
    )
    .unwrap();
    let broker = Mosquitto::start(
        tmp.path(),
        &certs.mtls_listener(),
        &format!("acl_file {}", acl.display()),
    );
    let app = spawn_app(&format!(
        "[mqtt]\nurl = \"mqtts://127.0.0.1:{}\"\nca_file = \"{}\"\nclient_cert_file = \"{}\"\nclient_key_file = \"{}\"\n",
        broker.port,
        certs.path("ca.crt"),
        certs.path("gateway.crt"),
        certs.path("gateway.key"),
    ));
    wait_mqtt_ready(&app);
    let pub_as = |device: &str, topic_device: &str, msg: &str, with_cert: bool| {
        let (ca, crt, key) = (
            certs.path("ca.crt"),
            certs.path(&format!("{device}.crt")),
            certs.path(&format!("{device}.key")),
        );
        let topic = format!("devices/{topic_device}/telemetry");
        let payload = line(msg);
        let mut args = vec!["-V", "mqttv5", "--cafile", &ca, "-m", &payload];
        if with_cert {
            args.extend_from_slice(&["--cert", &crt, "--key", &key]);
        }
        mosquitto_pub(broker.port, &topic, &args)
    };
    let (ok, err) = pub_as("device-1", "device-1", "own", true);
    assert!(ok, "device-1 publishing as itself: {err}");
    let (ok, _) = pub_as("device-1", "device-1", "no-cert", false);
    assert!(!ok, "a client without a certificate must be refused");
    let _ = pub_as("device-1", "device-2", "spoof", true);
    let (ok, err) = pub_as("device-2", "device-2", "own2", true);
    assert!(ok, "{err}");

    let expected: HashSet<String> =
        ["device-1:own".to_string(), "device-2:own2".to_string()].into();
    wait_until("both legitimate records", Duration::from_secs(10), || {
        archived_keys(&app.archive_dir()) == expected
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        archived_keys(&app.archive_dir()),
        expected,
        "the ACL let device-1 publish as device-2"
    );
}

#[test]
fn the_embedded_broker_accepts_mosquitto_pub_and_the_record_lands_in_the_archive() {
    let port = free_port();
    let app = spawn_app(&format!(
        "[mqtt]\nurl = \"embedded\"\nembedded_addr = \"127.0.0.1:{port}\"\n"
    ));
    wait_mqtt_ready(&app);
    let (ok, err) = mosquitto_pub(port, "devices/dev-9/telemetry", &["-m", &line("e1")]);
    assert!(ok, "{err}");
    wait_until("archived", Duration::from_secs(10), || {
        archived_keys(&app.archive_dir()).contains("dev-9:e1")
    });
}

/// MQTT records a gateway binary accepted, from its metrics at `url` (0
/// while it does not answer).
fn mqtt_accepted(url: &str) -> f64 {
    ureq::get(url)
        .call()
        .ok()
        .and_then(|r| r.into_string().ok())
        .map(|t| {
            metric_value(
                &t,
                r#"gateway_ingest_records_total{outcome="accepted",source="mqtt"}"#,
            )
        })
        .unwrap_or(0.0)
}

/// Resident memory of a process, from /proc.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status");
    kb * 1024
}

/// The zero-config default used to grow ~20 MB a minute under steady load:
/// rumqttd kept every message in its in-memory log (10 segments of 64 MB)
/// long after the gateway had it. Now the log is bounded (4 MiB): after a
/// warm-up that fills it, 40 MB more of steady traffic must not show up in
/// the gateway's resident memory.
#[test]
fn the_embedded_broker_memory_stays_flat_under_steady_load() {
    let tmp = tempfile::tempdir().unwrap();
    let (http_port, mqtt_port) = (free_port(), free_port());
    let addr = format!("127.0.0.1:{mqtt_port}");
    let gw = spawn_gateway_binary(
        &tmp.path().join("data"),
        http_port,
        &[],
        &[("GATEWAY_MQTT_EMBEDDED_ADDR", addr.as_str())],
    );
    let pad = "p".repeat(240);
    let metrics = format!("http://127.0.0.1:{http_port}/metrics");
    // Steady load: 2,000 messages of ~1 KB at a time, each chunk ingested
    // before the next (the debug build ingests slower than a publisher
    // can publish, and the broker's log is also its lag window).
    let steady = |from: usize, n: usize| {
        for chunk in (from..from + n).step_by(2000) {
            let lines: Vec<String> = (chunk..chunk + 2000)
                .map(|i| {
                    format!(
                        r#"{{"msg_id":"m{i}","ts":1764057600123,"metrics":{{"t":21.5}},"tags":{{"a":"{pad}","b":"{pad}","c":"{pad}","d":"{pad}"}}}}"#
                    )
                })
                .collect();
            assert!(publish_lines(
                mqtt_port,
                "devices/dev-1/telemetry",
                &lines,
                &[]
            ));
            wait_until("the gateway ingested them", Duration::from_secs(60), || {
                mqtt_accepted(&metrics) >= (chunk + 2000) as f64
            });
        }
    };
    // Warm-up: fills the broker's bounded log, allocator pools and the WAL
    // page cache.
    steady(0, 40_000);
    let warm = rss_bytes(gw.id());
    steady(40_000, 40_000);
    let after = rss_bytes(gw.id());
    let grown = after.saturating_sub(warm);
    assert!(
        grown < 16 << 20,
        "RSS grew by {} MB (from {} MB to {} MB) over 40 MB of steady MQTT traffic",
        grown >> 20,
        warm >> 20,
        after >> 20
    );
}

fn start_gateway(data: &Path, http_port: u16, mqtt_port: u16) -> crate::helpers::GatewayProcess {
    let url = format!("mqtt://127.0.0.1:{mqtt_port}");
    spawn_gateway_binary(
        data,
        http_port,
        &["--gateway-id", "mqtt-crash", "--mqtt-url", &url],
        &[("GATEWAY_MQTT_CLIENT_ID", "gateway-crash-test")],
    )
}

#[test]
fn ten_thousand_qos1_messages_survive_kill_9_of_the_gateway_mid_stream() {
    let tmp = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(tmp.path(), "allow_anonymous true", "");
    let data = tmp.path().join("gateway-data");
    let http_port = free_port();
    let mut gw = start_gateway(&data, http_port, broker.port);

    let publishers: Vec<_> = (0..4)
        .map(|d| {
            let port = broker.port;
            std::thread::spawn(move || {
                let lines: Vec<String> = (0..2500).map(|i| line(&format!("m{i}"))).collect();
                publish_lines(port, &format!("devices/dev-{d}/telemetry"), &lines, &[])
            })
        })
        .collect();
    let metrics = format!("http://127.0.0.1:{http_port}/metrics");
    wait_until("the gateway is ingesting", Duration::from_secs(60), || {
        mqtt_accepted(&metrics) >= 1500.0
    });
    gw.kill().expect("SIGKILL");
    gw.wait().unwrap();
    let mut gw = start_gateway(&data, http_port, broker.port);
    for p in publishers {
        assert!(p.join().unwrap(), "the broker did not accept every message");
    }
    let expected: HashSet<String> = (0..4)
        .flat_map(|d| (0..2500).map(move |i| format!("dev-{d}:m{i}")))
        .collect();
    let archive = data.join("archive");
    let mut missing = expected.len();
    for _ in 0..1200 {
        missing = expected.difference(&archived_keys(&archive)).count();
        if missing == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    gw.kill().unwrap();
    gw.wait().unwrap();
    assert_eq!(
        missing,
        0,
        "{missing} of 10000 broker-accepted messages lost; broker log: {}",
        broker.log()
    );
}

#[test]
fn under_wal_backpressure_messages_are_held_unacknowledged_and_ingested_when_space_returns() {
    assert!(
        crate::helpers::is_root(),
        "this test mounts a tmpfs and must run as root (CI does)"
    );
    let tmp = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(tmp.path(), "allow_anonymous true", "");
    let disk = crate::helpers::SmallDisk::mount("8m").expect("mount tmpfs");
    let app = crate::helpers::spawn_app_at(
        Some(&disk.path().join("wal")),
        &format!(
            "[wal]\nmin_free_disk_bytes = 2097152\n[mqtt]\nurl = \"mqtt://127.0.0.1:{}\"\n",
            broker.port
        ),
        |_, t| gateway::startup::sink_factory(t),
    );
    wait_mqtt_ready(&app);
    assert!(publish_lines(
        broker.port,
        "devices/dev-1/telemetry",
        &[line("before")],
        &[]
    ));
    wait_until("first record", Duration::from_secs(10), || {
        archived_keys(&app.archive_dir()).len() == 1
    });

    let filler = disk.fill(1 << 20);
    wait_until("backpressure on", Duration::from_secs(5), || {
        app.metric("gateway_backpressure_active") == 1.0
    });
    let held: Vec<String> = (0..20).map(|i| line(&format!("held{i}"))).collect();
    // The broker accepts them from the device; the gateway must not ack them yet.
    assert!(publish_lines(
        broker.port,
        "devices/dev-1/telemetry",
        &held,
        &[]
    ));
    wait_until(
        "the gateway saw the WAL refuse",
        Duration::from_secs(5),
        || {
            app.metric(r#"gateway_ingest_rejected_total{reason="backpressure",source="mqtt"}"#)
                >= 1.0
        },
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        archived_keys(&app.archive_dir()).len(),
        1,
        "nothing may be stored under backpressure"
    );

    std::fs::remove_file(filler).unwrap();
    let mut expected: HashSet<String> = (0..20).map(|i| format!("dev-1:held{i}")).collect();
    expected.insert("dev-1:before".into());
    wait_until(
        "held messages ingested after space returned",
        Duration::from_secs(15),
        || archived_keys(&app.archive_dir()) == expected,
    );
    drop(app);
}

#[test]
fn the_gateway_authenticates_with_a_user_name_and_a_password_from_a_file() {
    let tmp = tempfile::tempdir().unwrap();
    let passwd = tmp.path().join("passwd");
    let out = std::process::Command::new("mosquitto_passwd")
        .args(["-c", "-b"])
        .arg(&passwd)
        .args(["gateway", "s3cret-pw"])
        .output()
        .expect("mosquitto_passwd is installed with mosquitto");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let broker = Mosquitto::start(
        tmp.path(),
        "allow_anonymous false",
        &format!("password_file {}", passwd.display()),
    );
    let good = tmp.path().join("good-pw");
    std::fs::write(&good, "s3cret-pw\n").unwrap();
    let app = spawn_app(&format!(
        "[mqtt]\nurl = \"mqtt://127.0.0.1:{}\"\nusername = \"gateway\"\npassword_file = \"{}\"\n",
        broker.port,
        good.display()
    ));
    wait_mqtt_ready(&app);

    let bad = tmp.path().join("bad-pw");
    std::fs::write(&bad, "guess\n").unwrap();
    let refused = spawn_app(&format!(
        "[mqtt]\nurl = \"mqtt://127.0.0.1:{}\"\nusername = \"gateway\"\npassword_file = \"{}\"\nclient_id = \"gateway-wrong-pw\"\n",
        broker.port,
        bad.display()
    ));
    wait_until(
        "readyz reports the refused connection",
        Duration::from_secs(10),
        || {
            let r = refused.get("/readyz");
            r.status == 503 && r.body["checks"]["mqtt"]["ok"] == false
        },
    );
    assert!(
        !refused.get("/readyz").text.contains("s3cret")
            && !refused.get("/readyz").text.contains("guess")
    );
}

#[test]
fn topic_templates_give_the_device_id_and_tags_and_a_stale_topic_is_counted_as_invalid() {
    let tmp = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(tmp.path(), "allow_anonymous true", "");
    let mqtt = |topics: &str| {
        format!(
            "[mqtt]\nurl = \"mqtt://127.0.0.1:{}\"\nversion = \"3.1.1\"\nclient_id = \"gw-topics\"\ntopics = {topics}\n",
            broker.port
        )
    };
    // An earlier configuration subscribed `legacy/+` on the persistent session.
    let old = spawn_app(&mqtt(r#"["legacy/{device_id}"]"#));
    wait_mqtt_ready(&old);
    drop(old);

    let app = spawn_app(&mqtt(
        r#"["devices/{device_id}/telemetry", "site/{tag:site}/line/{tag:line}/{device_id}/data"]"#,
    ));
    wait_mqtt_ready(&app);
    let (ok, err) = mosquitto_pub(
        broker.port,
        "site/north/line/2/pump-7/data",
        &["-m", &line("t1")],
    );
    assert!(ok, "{err}");
    let (ok, err) = mosquitto_pub(broker.port, "devices/dev-9/telemetry", &["-m", &line("t2")]);
    assert!(ok, "{err}");
    // The broker still delivers the old subscription: no template reads it.
    let (ok, err) = mosquitto_pub(broker.port, "legacy/dev-1", &["-m", &line("t3")]);
    assert!(ok, "{err}");
    wait_until("two records archived", Duration::from_secs(20), || {
        archived_keys(&app.archive_dir()).len() == 2
    });
    wait_until(
        "the stale topic is counted",
        Duration::from_secs(10),
        || {
            app.metric(r#"gateway_ingest_rejected_total{reason="invalid_topic",source="mqtt"}"#)
                == 1.0
        },
    );
    let records = archived_records(&app.archive_dir());
    let pump = records.iter().find(|r| r["device_id"] == "pump-7").unwrap();
    assert_eq!(pump["tags"]["site"], "north");
    assert_eq!(pump["tags"]["line"], "2");
    assert_eq!(pump["tags"]["fw"], "1.0", "the payload's own tags stay");
    assert!(records.iter().any(|r| r["device_id"] == "dev-9"));
    assert!(!archived_keys(&app.archive_dir()).contains("dev-1:t3"));
}
