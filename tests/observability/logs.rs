//! The real binary's log under a short mixed load: JSON lines only.

use std::time::Duration;

use serde_json::Value;

use crate::binary::LoggedGateway;
use crate::broker::{mosquitto_pub, Mosquitto};
use crate::helpers::{request, telemetry, wait_until, Resp};

const LEVELS: [&str; 5] = ["TRACE", "DEBUG", "INFO", "WARN", "ERROR"];

fn post(gw: &LoggedGateway, device: &str, ct: &str, corr: &str, body: &str) -> Resp {
    request(
        ureq::post(&gw.url(&format!("/ingest/{device}")))
            .set("Content-Type", ct)
            .set("X-Correlation-Id", corr),
        Some(body),
    )
}

#[test]
fn every_line_the_binary_logs_under_mixed_load_is_one_json_event_with_level_target_and_message() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path(), "allow_anonymous true", "");
    let config = format!(
        "gateway_id = \"edge-logs\"\n[log]\nlevel = \"info\"\n[mqtt]\nurl = \"mqtt://127.0.0.1:{}\"\n",
        broker.port
    );
    let mut gw = LoggedGateway::start(dir.path(), &config, &[]);

    for i in 0..20 {
        let r = post(
            &gw,
            "dev-1",
            "application/json",
            &format!("good-{i}"),
            &telemetry(&format!("m{i}"), 20.0 + f64::from(i)),
        );
        assert_eq!(r.status, 202, "{}", r.text);
    }
    let bad = [
        ("dev-1", "application/json", "bad-json", "{not json"),
        ("dev-1", "text/plain", "bad-type", "{}"),
        ("-bad", "application/json", "bad-device", "{}"),
        (
            "dev-1",
            "application/json",
            "bad-schema",
            r#"{"metrics":"x"}"#,
        ),
    ];
    for (device, ct, corr, body) in bad {
        let r = post(&gw, device, ct, corr, body);
        assert!((400..500).contains(&r.status), "{corr}: {}", r.text);
    }
    let topic = "devices/dev-mqtt/telemetry";
    let (ok, err) = mosquitto_pub(broker.port, topic, &["-m", &telemetry("mq-1", 1.0)]);
    assert!(ok, "{err}");
    let (ok, err) = mosquitto_pub(broker.port, topic, &["-m", "{broken"]);
    assert!(ok, "{err}");
    wait_until(
        "the MQTT rejection is logged",
        Duration::from_secs(20),
        || {
            std::fs::read_to_string(&gw.log)
                .unwrap_or_default()
                .contains(r#""source":"mqtt""#)
        },
    );
    gw.stop();

    let lines = gw.log_lines();
    assert!(lines.len() >= 8, "{lines:?}");
    for l in &lines {
        assert!(l.is_object(), "{l}");
        assert!(
            LEVELS.contains(&l["level"].as_str().unwrap_or_default()),
            "level: {l}"
        );
        assert!(
            l["target"].as_str().is_some_and(|t| !t.is_empty()),
            "target: {l}"
        );
        assert!(
            l["message"].as_str().is_some_and(|m| !m.is_empty()),
            "message: {l}"
        );
        assert!(l["timestamp"].as_str().is_some(), "timestamp: {l}");
    }
    let rejected = |corr: &str| -> Option<&Value> {
        lines
            .iter()
            .find(|l| l["message"] == "telemetry rejected" && l["correlation_id"] == corr)
    };
    for (device, _, corr, _) in bad {
        let l = rejected(corr).unwrap_or_else(|| panic!("no rejection logged for {corr}"));
        assert_eq!(l["device_id"], device, "{l}");
        assert_eq!(l["source"], "http", "{l}");
        assert!(l["reason"].as_str().is_some(), "{l}");
    }
    let mqtt = lines
        .iter()
        .find(|l| l["message"] == "telemetry rejected" && l["source"] == "mqtt")
        .expect("the MQTT rejection");
    assert_eq!(mqtt["device_id"], "dev-mqtt");
    assert_eq!(mqtt["reason"], "invalid_json");
    assert_eq!(
        mqtt["correlation_id"].as_str().map(str::len),
        Some(36),
        "{mqtt}"
    );
    assert!(lines.iter().any(|l| l["message"] == "gateway started"));
    assert!(lines.iter().any(|l| l["message"] == "gateway stopped"));
}

/// Correlation ids of the "telemetry rejected" lines in the log.
fn rejected(gw: &LoggedGateway) -> Vec<String> {
    gw.log_lines()
        .iter()
        .filter(|l| l["message"] == "telemetry rejected")
        .filter_map(|l| l["correlation_id"].as_str().map(str::to_string))
        .collect()
}

#[test]
fn the_log_level_changes_at_run_time_through_the_operator_and_holds_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let config = "gateway_id = \"edge-level\"\n[log]\nlevel = \"warn\"\n[mqtt]\nurl = \"off\"\n";
    let mut gw = LoggedGateway::start(dir.path(), config, &[]);
    let bad = |gw: &LoggedGateway, corr: &str| {
        let r = post(gw, "dev-1", "application/json", corr, "{not json");
        assert_eq!(r.status, 400);
    };
    bad(&gw, "quiet-1");
    // The CLI finds the running gateway (data-dir lock) and goes through its admin API.
    let set = |gw: &LoggedGateway, level: &str| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_gateway"))
            .args([
                "--config",
                dir.path().join("gateway.toml").to_str().unwrap(),
            ])
            .args(["--data-dir", dir.path().join("data").to_str().unwrap()])
            .args(["--http-addr", gw.base.trim_start_matches("http://")])
            .args(["config", "set", "log.level", level])
            .env_remove("GATEWAY_CONFIG")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let out = set(&gw, "info");
    assert!(out.contains("\"applied\": true"), "{out}");
    bad(&gw, "loud-1");
    wait_until("the info line is logged", Duration::from_secs(5), || {
        rejected(&gw).contains(&"loud-1".to_string())
    });
    // The change is in the audit log, naming who and what.
    let audit: Vec<Value> = gw
        .log_lines()
        .into_iter()
        .filter(|l| l["target"] == "audit" && l["command"] == "config.set")
        .collect();
    assert_eq!(audit.len(), 1, "{audit:?}");
    assert_eq!(audit[0]["actor"], "admin-http:token");
    assert_eq!(audit[0]["outcome"], "ok");
    assert!(audit[0]["args"].as_str().unwrap().contains("log.level"));
    assert!(
        !rejected(&gw).contains(&"quiet-1".to_string()),
        "warn hid it"
    );

    // Restarted with the same configuration (warn), the runtime setting wins.
    gw.stop();
    let gw = LoggedGateway::start(dir.path(), config, &[]);
    bad(&gw, "loud-2");
    wait_until("info after the restart", Duration::from_secs(5), || {
        rejected(&gw).contains(&"loud-2".to_string())
    });
    let out = set(&gw, "warn");
    assert!(out.contains("\"applied\": true"), "{out}");
    bad(&gw, "quiet-2");
    std::thread::sleep(Duration::from_millis(300));
    assert!(!rejected(&gw).contains(&"quiet-2".to_string()));
    // Audit lines are kept whatever the level: the switch to warn is logged too.
    let audit = gw
        .log_lines()
        .into_iter()
        .filter(|l| l["target"] == "audit" && l["command"] == "config.set")
        .count();
    assert_eq!(audit, 1, "the config.set to warn is in the audit log");
}

#[test]
fn a_garbage_flood_from_one_device_writes_a_bounded_number_of_lines_and_another_device_is_still_logged_at_once(
) {
    let dir = tempfile::tempdir().unwrap();
    let config = "gateway_id = \"edge-flood\"\n[log]\nlevel = \"info\"\nrepeat_burst = 5\nrepeat_interval = \"3s\"\n[mqtt]\nurl = \"off\"\n";
    let mut gw = LoggedGateway::start(dir.path(), config, &[]);
    let agent = ureq::AgentBuilder::new().build();
    const FLOOD: usize = 3_000;
    let started = std::time::Instant::now();
    for i in 0..FLOOD {
        let r = request(
            agent
                .post(&gw.url("/ingest/dev-flood"))
                .set("Content-Type", "application/json")
                .set("X-Correlation-Id", &format!("flood-{i}")),
            Some("{not json"),
        );
        assert_eq!(r.status, 400, "{}", r.text);
    }
    let flood_secs = started.elapsed().as_secs_f64();
    let r = post(&gw, "dev-other", "application/json", "other-1", "{not json");
    assert_eq!(r.status, 400);
    wait_until(
        "the other device's rejection is logged at once",
        Duration::from_secs(2),
        || rejected(&gw).contains(&"other-1".to_string()),
    );
    // Every rejection is counted, logged or not.
    let metrics = request(agent.get(&gw.url("/metrics")), None).text;
    let counted: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("gateway_ingest_rejected_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(counted, (FLOOD + 1) as f64, "{metrics}");

    let summaries = |gw: &LoggedGateway| -> u64 {
        gw.log_lines()
            .iter()
            .filter(|l| {
                l["message"] == "repeated log lines suppressed"
                    && l["key"] == "dev-flood/invalid_json"
            })
            .filter_map(|l| l["suppressed"].as_u64())
            .sum()
    };
    let full_lines = |gw: &LoggedGateway| -> usize {
        gw.log_lines()
            .iter()
            .filter(|l| l["message"] == "telemetry rejected" && l["device_id"] == "dev-flood")
            .count()
    };
    // The last interval's summary comes from the flusher, without any new event.
    wait_until(
        "the summaries account for every line not written",
        Duration::from_secs(10),
        || full_lines(&gw) as u64 + summaries(&gw) == FLOOD as u64,
    );
    // At most a burst per interval that the flood overlapped.
    let intervals = (flood_secs / 3.0).ceil() as usize + 1;
    let full = full_lines(&gw);
    assert!(
        (5..=5 * intervals).contains(&full),
        "{full} full lines over {flood_secs:.1}s"
    );
    let total = gw.log_lines().len();
    assert!(
        total <= 40 + 6 * intervals,
        "{total} log lines for {FLOOD} rejections over {flood_secs:.1}s"
    );
    gw.stop();
}
