//! The control plane on MQTT control topics, against a real Mosquitto:
//! commands, replies (and the MQTT 5 response topic), errors, device.send,
//! dlq.requeue, and config.set surviving a restart of the gateway binary.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::broker::{mosquitto_pub, Mosquitto, Subscriber};
use crate::helpers::{
    archived_keys, archived_records, free_port, request, spawn_app, spawn_gateway_binary,
    spawn_gateway_binary_logged, telemetry, wait_until,
};

const ID: &str = "gw-ctl";

fn reply_topic(request_id: &str) -> String {
    format!("gateway/{ID}/control/reply/{request_id}")
}

/// Publishes `body` as command `command`, waits for its reply.
fn ask(port: u16, sub: &Subscriber, command: &str, body: Value) -> Value {
    let rid = body["request_id"].as_str().unwrap().to_string();
    let (ok, err) = mosquitto_pub(
        port,
        &format!("gateway/{ID}/control/{command}"),
        &["-m", &body.to_string()],
    );
    assert!(ok, "{err}");
    sub.wait_json(&reply_topic(&rid), Duration::from_secs(10))
}

/// Pings until the control plane answers (it connects after start-up).
fn wait_control_plane(port: u16, sub: &Subscriber) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let rid = format!("ready-{}", N.fetch_add(1, Ordering::SeqCst));
        mosquitto_pub(
            port,
            &format!("gateway/{ID}/control/ping"),
            &["-m", &json!({"request_id": rid}).to_string()],
        );
        let until = Instant::now() + Duration::from_millis(700);
        while Instant::now() < until {
            if sub.messages().iter().any(|(t, _)| *t == reply_topic(&rid)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(
            Instant::now() < deadline,
            "the control plane never answered a ping"
        );
    }
}

fn subscriber(port: u16, dir: &Path) -> Subscriber {
    Subscriber::start(
        port,
        dir,
        &[
            &format!("gateway/{ID}/control/reply/#"),
            "devices/+/control",
            "ops/responses/#",
        ],
        &[],
    )
}

#[test]
fn commands_get_replies_errors_never_crash_it_and_device_send_reaches_the_device() {
    let tmp = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(tmp.path(), "allow_anonymous true", "");
    let app = spawn_app(&format!(
        "gateway_id = \"{ID}\"\n[mqtt]\nurl = \"mqtt://127.0.0.1:{}\"\nversion = \"5\"\n",
        broker.port
    ));
    let sub = subscriber(broker.port, tmp.path());
    wait_control_plane(broker.port, &sub);

    let pong = ask(broker.port, &sub, "ping", json!({"request_id": "p1"}));
    assert_eq!(pong["request_id"], "p1");
    assert_eq!(pong["ok"], true, "{pong}");
    assert_eq!(pong["result"]["pong"], true);
    assert_eq!(pong["result"]["gateway_id"], ID);

    // Errors are replies, not crashes.
    let unknown = ask(broker.port, &sub, "reboot", json!({"request_id": "u1"}));
    assert_eq!(unknown["ok"], false);
    assert_eq!(unknown["error"]["code"], "unknown_command");
    let bad_args = ask(
        broker.port,
        &sub,
        "config.set",
        json!({"request_id": "b1", "key": "log.level", "value": "no-such-level!!"}),
    );
    assert_eq!(bad_args["ok"], false);
    assert_eq!(bad_args["error"]["code"], "bad_request");
    let (ok, _) = mosquitto_pub(
        broker.port,
        &format!("gateway/{ID}/control/ping"),
        &["-m", "not json"],
    );
    assert!(ok);
    let invalid = sub.wait_json(&reply_topic("invalid"), Duration::from_secs(10));
    assert_eq!(invalid["ok"], false);
    assert_eq!(invalid["error"]["code"], "bad_request");

    // config.get shows the runtime settings.
    let cfg = ask(broker.port, &sub, "config.get", json!({"request_id": "g1"}));
    assert_eq!(cfg["ok"], true, "{cfg}");
    assert_eq!(
        cfg["result"]["runtime"]["sinks"]["archive"]["paused"],
        false
    );
    assert!(cfg["result"]["config"].as_str().unwrap().contains("[mqtt]"));

    // device.send publishes the payload at QoS 1 on the device's control topic.
    let sent = ask(
        broker.port,
        &sub,
        "device.send",
        json!({"request_id": "d1", "device_id": "dev-7", "payload": {"cmd": "blink", "times": 3}}),
    );
    assert_eq!(sent["ok"], true, "{sent}");
    let got = sub.wait_json("devices/dev-7/control", Duration::from_secs(10));
    assert_eq!(got, json!({"cmd": "blink", "times": 3}));
    let bad_device = ask(
        broker.port,
        &sub,
        "device.send",
        json!({"request_id": "d2", "device_id": "../x", "payload": 1}),
    );
    assert_eq!(bad_device["ok"], false);

    // MQTT 5: the reply also goes to the response topic, with the correlation data.
    let (ok, err) = mosquitto_pub(
        broker.port,
        &format!("gateway/{ID}/control/ping"),
        &[
            "-V",
            "mqttv5",
            "-D",
            "publish",
            "response-topic",
            "ops/responses/me",
            "-D",
            "publish",
            "correlation-data",
            "corr-42",
            "-m",
            &json!({"request_id": "v5"}).to_string(),
        ],
    );
    assert!(ok, "{err}");
    let on_response_topic = sub.wait_json("ops/responses/me", Duration::from_secs(10));
    assert_eq!(on_response_topic["request_id"], "v5");
    assert_eq!(on_response_topic["ok"], true);

    // Still alive, everything counted.
    assert_eq!(
        ask(broker.port, &sub, "ping", json!({"request_id": "p2"}))["ok"],
        true
    );
    assert!(app.metric(r#"gateway_control_commands_total{command="ping",outcome="ok"}"#) >= 3.0);
    assert!(
        app.metric(r#"gateway_control_commands_total{command="config.set",outcome="error"}"#)
            >= 1.0
    );
    assert!(
        app.metric(r#"gateway_control_commands_total{command="device.send",outcome="ok"}"#) >= 1.0
    );
}

#[test]
fn dlq_requeue_over_mqtt_delivers_the_dead_letters_once_the_sink_is_fixed() {
    let tmp = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(tmp.path(), "allow_anonymous true", "");
    let blocker = tmp.path().join("blocker");
    std::fs::write(&blocker, b"x").unwrap();
    let target = blocker.join("archive");
    let app = spawn_app(&format!(
        "gateway_id = \"{ID}\"\n[mqtt]\nurl = \"mqtt://127.0.0.1:{}\"\nversion = \"3.1.1\"\n\
         [sinks.flaky]\nkind = \"s3\"\nurl = \"file://{}\"\nbatch_max_wait_ms = 0\nretry_budget = 2\nretry_base_ms = 10\nretry_max_ms = 20\n",
        broker.port,
        target.display()
    ));
    let sub = subscriber(broker.port, tmp.path());
    wait_control_plane(broker.port, &sub);
    for i in 0..5 {
        assert_eq!(
            app.post_json("dev-1", &telemetry(&format!("q{i}"), 1.0))
                .status,
            202
        );
    }
    wait_until("dead-lettered", Duration::from_secs(15), || {
        app.metric(r#"gateway_sink_records_total{outcome="dead",sink="flaky"}"#) == 5.0
    });
    let listed = ask(
        broker.port,
        &sub,
        "dlq.list",
        json!({"request_id": "l1", "sink": "flaky"}),
    );
    assert_eq!(listed["result"]["total"], 5, "{listed}");

    std::fs::remove_file(&blocker).unwrap();
    let r = ask(
        broker.port,
        &sub,
        "dlq.requeue",
        json!({"request_id": "q1", "sink": "flaky"}),
    );
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["result"]["requeued"], 5);
    wait_until("delivered after requeue", Duration::from_secs(10), || {
        archived_records(&target).len() == 5
    });
}

#[test]
fn config_set_over_mqtt_changes_behaviour_and_survives_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(tmp.path(), "allow_anonymous true", "");
    let data = tmp.path().join("data");
    let url = format!("mqtt://127.0.0.1:{}", broker.port);
    let args = ["--gateway-id", ID, "--mqtt-url", url.as_str()];
    let http = free_port();
    let post = |msg: &str| {
        request(
            ureq::post(&format!("http://127.0.0.1:{http}/ingest/dev-1"))
                .set("Content-Type", "application/json"),
            Some(&telemetry(msg, 1.0)),
        )
        .status
    };
    let sub = subscriber(broker.port, tmp.path());
    let mut gw = spawn_gateway_binary(&data, http, &args, &[]);
    wait_control_plane(broker.port, &sub);
    assert_eq!(post("a1"), 202);
    assert_eq!(post("a2"), 202, "no rate limit configured");

    let r = ask(
        broker.port,
        &sub,
        "config.set",
        json!({"request_id": "s1", "settings": {"ingest.rate_limit_per_device": 0.01, "ingest.rate_limit_burst": 1}}),
    );
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["result"]["applied"], true);
    assert_eq!(post("b1"), 202, "the bucket starts full");
    assert_eq!(post("b2"), 429, "the new limit is in force at once");

    // Restarted (kill -9: no shutdown hook saves anything), the setting holds.
    gw.kill().unwrap();
    gw.wait().unwrap();
    drop(gw);
    let _gw = spawn_gateway_binary(&data, http, &args, &[]);
    assert_eq!(post("c1"), 202);
    assert_eq!(post("c2"), 429, "the limit survived the restart");
    wait_control_plane(broker.port, &sub);
    let got = ask(broker.port, &sub, "config.get", json!({"request_id": "g2"}));
    assert_eq!(
        got["result"]["runtime"]["ingest.rate_limit_per_device"],
        0.01
    );
    assert_eq!(got["result"]["overrides"]["rate_limit_burst"], 1.0);
}

#[test]
fn a_route_changed_over_mqtt_applies_to_the_next_records_survives_a_restart_and_is_audited() {
    let tmp = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(tmp.path(), "allow_anonymous true", "");
    let (archive, alarms) = (tmp.path().join("archive"), tmp.path().join("alarms"));
    let config = tmp.path().join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "gateway_id = \"{ID}\"\n[mqtt]\nurl = \"mqtt://127.0.0.1:{}\"\n\
             [sinks.archive]\nkind = \"s3\"\nurl = \"file://{}\"\n\
             [sinks.alarms]\nkind = \"s3\"\nurl = \"file://{}\"\n",
            broker.port,
            archive.display(),
            alarms.display()
        ),
    )
    .unwrap();
    let (data, log) = (tmp.path().join("data"), tmp.path().join("gateway.log"));
    let http = free_port();
    let cfg = config.display().to_string();
    let post = |device: &str, msg: &str| {
        let r = request(
            ureq::post(&format!("http://127.0.0.1:{http}/ingest/{device}"))
                .set("Content-Type", "application/json"),
            Some(&telemetry(msg, 1.0)),
        );
        assert_eq!(r.status, 202, "{}", r.text);
    };
    let sub = subscriber(broker.port, tmp.path());
    let mut gw = spawn_gateway_binary_logged(&data, http, &["--config", &cfg], &[], Some(&log));
    wait_control_plane(broker.port, &sub);
    post("pump-1", "a1");
    post("fan-1", "a2");

    let route = json!({"devices": ["pump-*"]});
    let r = ask(
        broker.port,
        &sub,
        "config.set",
        json!({"request_id": "r1", "key": "sinks.alarms.route", "value": route}),
    );
    assert_eq!(r["ok"], true, "{r}");
    let bad = ask(
        broker.port,
        &sub,
        "config.set",
        json!({"request_id": "r2", "key": "sinks.alarms.route", "value": {"devices": []}}),
    );
    assert_eq!(bad["ok"], false, "{bad}");
    assert!(
        bad["error"]["message"]
            .as_str()
            .unwrap()
            .contains("sinks.alarms.route"),
        "the error names the key: {bad}"
    );
    post("pump-1", "b1");
    post("fan-1", "b2");
    let keys = |v: &[&str]| {
        v.iter()
            .map(|s| s.to_string())
            .collect::<std::collections::HashSet<_>>()
    };
    wait_until("archive has all four", Duration::from_secs(10), || {
        archived_keys(&archive) == keys(&["pump-1:a1", "fan-1:a2", "pump-1:b1", "fan-1:b2"])
    });
    wait_until(
        "alarms: everything before, pumps after",
        Duration::from_secs(10),
        || archived_keys(&alarms) == keys(&["pump-1:a1", "fan-1:a2", "pump-1:b1"]),
    );

    gw.kill().unwrap();
    gw.wait().unwrap();
    drop(gw);
    let _gw = spawn_gateway_binary_logged(&data, http, &["--config", &cfg], &[], Some(&log));
    post("fan-1", "c2");
    post("pump-1", "c1");
    wait_until("archive has c1 and c2", Duration::from_secs(10), || {
        archived_keys(&archive).contains("fan-1:c2")
            && archived_keys(&archive).contains("pump-1:c1")
    });
    wait_until(
        "the route survived the restart",
        Duration::from_secs(10),
        || archived_keys(&alarms).contains("pump-1:c1"),
    );
    assert!(
        !archived_keys(&alarms).contains("fan-1:c2"),
        "fan-1 is not routed to alarms"
    );
    let text = std::fs::read_to_string(&log).unwrap();
    let audits: Vec<Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["target"] == "audit" && v["command"] == "config.set")
        .collect();
    assert_eq!(
        audits.len(),
        2,
        "both attempts are audit-logged: {audits:?}"
    );
    assert_eq!(audits[0]["outcome"], "ok");
    assert_eq!(audits[0]["actor"], "mqtt");
    assert!(audits[0]["args"]
        .as_str()
        .unwrap()
        .contains("sinks.alarms.route"));
    assert_eq!(audits[1]["outcome"], "error");
}

#[test]
fn the_control_plane_can_be_turned_off() {
    let tmp = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(tmp.path(), "allow_anonymous true", "");
    let mqtt = format!(
        "gateway_id = \"{ID}\"\n[mqtt]\nurl = \"mqtt://127.0.0.1:{}\"\n",
        broker.port
    );
    let on = spawn_app(&mqtt);
    assert!(on.handles.control.is_some());
    drop(on);
    let off = spawn_app(&format!("{mqtt}control = false\n"));
    assert!(off.handles.control.is_none());
    let sub = subscriber(broker.port, tmp.path());
    let (ok, _) = mosquitto_pub(
        broker.port,
        &format!("gateway/{ID}/control/ping"),
        &["-m", r#"{"request_id":"nobody-home"}"#],
    );
    assert!(ok);
    std::thread::sleep(Duration::from_millis(700));
    assert!(
        sub.messages().is_empty(),
        "no reply from a gateway without control plane: {:?}",
        sub.messages()
    );
}
