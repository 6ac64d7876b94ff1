//! The fleet channel (DESIGN §11) against a real Mosquitto as the fleet
//! broker and the real gateway binary: signed commands and their replies,
//! every forged class refused and counted (a replay also after a restart),
//! group commands, the retained state against its schema and size budget,
//! the last will after kill -9, and ingest that never waits for the fleet.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use gateway_actors::fleet::verify::SigningKey;
use serde_json::{json, Value};

use crate::broker::{mosquitto_pub, Mosquitto, Subscriber};
use crate::helpers::{
    archived_keys, free_port, metric_value, python_json_lines, request,
    spawn_gateway_binary_logged, telemetry, wait_until, GatewayProcess,
};

/// An operator's key pair: the signing key and a trusted-keys file with its
/// public line.
pub(crate) struct Keys {
    pub(crate) signer: SigningKey,
    pub(crate) trusted: PathBuf,
}

pub(crate) fn keys(dir: &Path, key_id: &str) -> Keys {
    let (private, public) = SigningKey::generate(key_id).unwrap();
    let key_file = dir.join(format!("{key_id}.key"));
    std::fs::write(&key_file, private).unwrap();
    let trusted = dir.join(format!("trusted-{key_id}"));
    std::fs::write(&trusted, format!("# test operator\n{public}\n")).unwrap();
    Keys {
        signer: SigningKey::load(&key_file).unwrap(),
        trusted,
    }
}

pub(crate) fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// A gateway binary on the fleet broker at `port` (MQTT ingest off), its
/// HTTP port and log file.
pub(crate) struct Gateway {
    pub(crate) process: GatewayProcess,
    pub(crate) http: u16,
    pub(crate) log: PathBuf,
    pub(crate) data: PathBuf,
}

fn start_gateway(dir: &Path, id: &str, fleet_url: &str, trusted: &Path, groups: &str) -> Gateway {
    start_gateway_with(dir, id, fleet_url, trusted, groups, &[])
}

pub(crate) fn start_gateway_with(
    dir: &Path,
    id: &str,
    fleet_url: &str,
    trusted: &Path,
    groups: &str,
    args: &[&str],
) -> Gateway {
    start_gateway_env(dir, id, fleet_url, trusted, groups, args, &[])
}

/// Like [`start_gateway_with`] with more environment variables.
pub(crate) fn start_gateway_env(
    dir: &Path,
    id: &str,
    fleet_url: &str,
    trusted: &Path,
    groups: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> Gateway {
    let data = dir.join(format!("data-{id}"));
    let log = dir.join(format!("{id}.log"));
    let http = free_port();
    let trusted = trusted.display().to_string();
    let process = spawn_gateway_binary_logged(
        &data,
        http,
        args,
        &[
            &[
                ("GATEWAY_ID", id),
                ("GATEWAY_MQTT_URL", "off"),
                ("GATEWAY_FLEET_URL", fleet_url),
                ("GATEWAY_FLEET_TRUSTED_KEYS_FILE", &trusted),
                ("GATEWAY_FLEET_GROUPS", groups),
            ],
            env,
        ]
        .concat(),
        Some(&log),
    );
    Gateway {
        process,
        http,
        log,
        data,
    }
}

impl Gateway {
    /// `GET /admin/status` (the status page's document), with the admin token.
    pub(crate) fn status(&self) -> Value {
        let token = std::fs::read_to_string(self.data.join("admin.token")).unwrap();
        ureq::get(&format!("http://127.0.0.1:{}/admin/status", self.http))
            .set("Authorization", &format!("Bearer {}", token.trim()))
            .call()
            .unwrap()
            .into_json()
            .unwrap()
    }

    pub(crate) fn metric(&self, series: &str) -> f64 {
        let text = ureq::get(&format!("http://127.0.0.1:{}/metrics", self.http))
            .call()
            .unwrap()
            .into_string()
            .unwrap();
        metric_value(&text, series)
    }

    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub(crate) fn post(&self, device: &str, msg_id: &str) -> (u16, Duration) {
        let started = Instant::now();
        let r = request(
            ureq::post(&format!("http://127.0.0.1:{}/ingest/{device}", self.http))
                .set("Content-Type", "application/json")
                .timeout(Duration::from_secs(10)),
            Some(&telemetry(msg_id, 21.5)),
        );
        (r.status, started.elapsed())
    }
}

/// Publishes `envelope` on `topic` and waits for the reply to its request id.
pub(crate) fn send(
    port: u16,
    sub: &Subscriber,
    gateway: &str,
    topic: &str,
    envelope: &Value,
) -> Value {
    let (ok, err) = mosquitto_pub(port, topic, &["-m", &envelope.to_string()]);
    assert!(ok, "{err}");
    let rid = envelope["request_id"].as_str().unwrap_or("invalid");
    sub.wait_json(
        &format!("fleet/{gateway}/reply/{rid}"),
        Duration::from_secs(10),
    )
}

/// Pings with signed commands until the fleet client answers (it connects
/// after start-up).
pub(crate) fn wait_fleet(port: u16, sub: &Subscriber, k: &Keys, gateway: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let rid = format!("ready-{}", uuid::Uuid::new_v4());
        let env = k.signer.sign(gateway, "ping", Value::Null, &rid, now_ms());
        mosquitto_pub(
            port,
            &format!("fleet/{gateway}/control/ping"),
            &["-m", &env.to_string()],
        );
        let topic = format!("fleet/{gateway}/reply/{rid}");
        let until = Instant::now() + Duration::from_millis(700);
        while Instant::now() < until {
            if sub.messages().iter().any(|(t, _)| *t == topic) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(
            Instant::now() < deadline,
            "the fleet client never answered a ping"
        );
    }
}

/// Waits for a message on `topic` whose JSON payload satisfies `pred`.
pub(crate) fn wait_json_where(
    sub: &Subscriber,
    topic: &str,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let found = sub
            .messages()
            .into_iter()
            .filter(|(t, _)| t == topic)
            .filter_map(|(_, p)| serde_json::from_str::<Value>(&p).ok())
            .find(|v| pred(v));
        if let Some(v) = found {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "no matching message on {topic}; got {:?}",
            sub.messages()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_signed_command_runs_is_answered_on_the_reply_and_response_topics_and_is_audit_logged() {
    let tmp = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(tmp.path(), "allow_anonymous true", "");
    let k = keys(tmp.path(), "ops-1");
    let url = format!("mqtt://127.0.0.1:{}", broker.port);
    let gw = start_gateway(tmp.path(), "gw-1", &url, &k.trusted, "north");
    let sub = Subscriber::start(broker.port, tmp.path(), &["fleet/+/reply/#"], &[]);
    wait_fleet(broker.port, &sub, &k, "gw-1");

    let env = k.signer.sign(
        "gw-1",
        "sink.pause",
        json!({"sink": "archive"}),
        "pause-1",
        now_ms(),
    );
    let reply = send(
        broker.port,
        &sub,
        "gw-1",
        "fleet/gw-1/control/sink.pause",
        &env,
    );
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(reply["request_id"], "pause-1");
    assert_eq!(
        reply["result"]["runtime"]["sinks"]["archive"]["paused"],
        true
    );
    assert_eq!(gw.metric("gateway_sink_paused{sink=\"archive\"}"), 1.0);
    assert!(gw.metric("gateway_fleet_commands_total{result=\"ok\"}") >= 1.0);
    let audit = gw
        .log()
        .lines()
        .find(|l| l.contains("\"audit\"") && l.contains("sink.pause"))
        .map(str::to_string)
        .unwrap_or_else(|| panic!("no audit line for sink.pause in {}", gw.log()));
    assert!(audit.contains("fleet:ops-1"), "{audit}");

    // MQTT 5: also on the response topic, with the correlation data.
    let v5 = Subscriber::start(
        broker.port,
        tmp.path(),
        &["ops/responses/#"],
        &["-V", "mqttv5", "-F", "%t corr=%D %p"],
    );
    let env = k
        .signer
        .sign("gw-1", "ping", Value::Null, "v5-ping", now_ms());
    let (ok, err) = mosquitto_pub(
        broker.port,
        "fleet/gw-1/control/ping",
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
            &env.to_string(),
        ],
    );
    assert!(ok, "{err}");
    sub.wait_json("fleet/gw-1/reply/v5-ping", Duration::from_secs(10));
    wait_until(
        "a reply on the response topic",
        Duration::from_secs(10),
        || {
            v5.messages().iter().any(|(t, p)| {
                t == "ops/responses/me"
                    && p.starts_with("corr=corr-42 ")
                    && p.contains("\"pong\":true")
            })
        },
    );
}

#[test]
fn forged_commands_are_refused_with_their_reason_counted_audit_logged_and_a_replay_also_after_a_restart(
) {
    let tmp = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(tmp.path(), "allow_anonymous true", "");
    let k = keys(tmp.path(), "ops-1");
    let stranger = keys(tmp.path(), "ops-9");
    let url = format!("mqtt://127.0.0.1:{}", broker.port);
    let mut gw = start_gateway(tmp.path(), "gw-1", &url, &k.trusted, "");
    let sub = Subscriber::start(broker.port, tmp.path(), &["fleet/+/reply/#"], &[]);
    wait_fleet(broker.port, &sub, &k, "gw-1");
    let topic = "fleet/gw-1/control/sink.pause";
    let pause = |rid: &str, at: i64| {
        k.signer
            .sign("gw-1", "sink.pause", json!({"sink": "archive"}), rid, at)
    };

    let mut unsigned = pause("unsigned-1", now_ms());
    unsigned.as_object_mut().unwrap().remove("signature");
    let mut tampered = pause("tampered-1", now_ms());
    tampered["args"]["sink"] = json!("other");
    let expired = pause("expired-1", now_ms() - 6 * 60 * 1000);
    let future = pause("future-1", now_ms() + 6 * 60 * 1000);
    let unknown_key = stranger.signer.sign(
        "gw-1",
        "sink.pause",
        json!({"sink": "archive"}),
        "unknown-1",
        now_ms(),
    );
    let elsewhere = k.signer.sign(
        "gw-2",
        "sink.pause",
        json!({"sink": "archive"}),
        "elsewhere-1",
        now_ms(),
    );
    let cases = [
        (unsigned, "unsigned"),
        (tampered, "bad_signature"),
        (expired, "expired"),
        (future, "expired"),
        (unknown_key, "unknown_key"),
        (elsewhere, "wrong_target"),
    ];
    for (env, reason) in &cases {
        let reply = send(broker.port, &sub, "gw-1", topic, env);
        assert_eq!(reply["ok"], false, "{reply}");
        assert_eq!(reply["error"], *reason, "{reply}");
    }
    let genuine = pause("genuine-1", now_ms());
    let first = send(broker.port, &sub, "gw-1", topic, &genuine);
    assert_eq!(first["ok"], true, "{first}");
    // The same message again: its reply is the second one on that topic.
    mosquitto_pub(broker.port, topic, &["-m", &genuine.to_string()]);
    let replayed = wait_json_where(&sub, "fleet/gw-1/reply/genuine-1", |v| v["ok"] == false);
    assert_eq!(replayed["error"], "replayed", "{replayed}");

    for (reason, n) in [
        ("unsigned", 1.0),
        ("bad_signature", 1.0),
        ("expired", 2.0),
        ("unknown_key", 1.0),
        ("wrong_target", 1.0),
        ("replayed", 1.0),
    ] {
        assert_eq!(
            gw.metric(&format!(
                "gateway_fleet_commands_total{{result=\"{reason}\"}}"
            )),
            n,
            "{reason}"
        );
    }
    let log = gw.log();
    for reason in [
        "unsigned",
        "bad_signature",
        "expired",
        "unknown_key",
        "wrong_target",
        "replayed",
    ] {
        assert!(
            log.lines().any(
                |l| l.contains("fleet command refused") && l.contains(&format!("\"{reason}\""))
            ),
            "no audit line for {reason}"
        );
    }
    assert_eq!(gw.metric("gateway_sink_paused{sink=\"archive\"}"), 1.0);

    // kill -9 and start again: the accepted request id is still known.
    gw.process.kill().unwrap();
    gw.process.wait().unwrap();
    let sub2 = Subscriber::start(broker.port, tmp.path(), &["fleet/+/reply/#"], &[]);
    let gw2 = start_gateway(tmp.path(), "gw-1", &url, &k.trusted, "");
    wait_fleet(broker.port, &sub2, &k, "gw-1");
    let again = send(broker.port, &sub2, "gw-1", topic, &genuine);
    assert_eq!(again["ok"], false, "{again}");
    assert_eq!(again["error"], "replayed", "{again}");
    assert_eq!(
        gw2.metric("gateway_fleet_commands_total{result=\"replayed\"}"),
        1.0
    );
}

#[test]
fn a_group_command_reaches_its_members_and_no_one_else() {
    let tmp = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(tmp.path(), "allow_anonymous true", "");
    let k = keys(tmp.path(), "ops-1");
    let url = format!("mqtt://127.0.0.1:{}", broker.port);
    let _a = start_gateway(tmp.path(), "gw-a", &url, &k.trusted, "north,line-3");
    let _b = start_gateway(tmp.path(), "gw-b", &url, &k.trusted, "south");
    let sub = Subscriber::start(broker.port, tmp.path(), &["fleet/+/reply/#"], &[]);
    wait_fleet(broker.port, &sub, &k, "gw-a");
    wait_fleet(broker.port, &sub, &k, "gw-b");

    let env = k
        .signer
        .sign("group/north", "ping", Value::Null, "group-1", now_ms());
    let reply = send(
        broker.port,
        &sub,
        "gw-a",
        "fleet/group/north/control/ping",
        &env,
    );
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(reply["result"]["gateway_id"], "gw-a");
    // A signature for one group does not open another.
    let (ok, _) = mosquitto_pub(
        broker.port,
        "fleet/group/south/control/ping",
        &["-m", &env.to_string()],
    );
    assert!(ok);
    let refused = sub.wait_json("fleet/gw-b/reply/group-1", Duration::from_secs(10));
    assert_eq!(refused["error"], "wrong_target", "{refused}");
    std::thread::sleep(Duration::from_millis(500));
    let from_b: Vec<_> = sub
        .messages()
        .into_iter()
        .filter(|(t, _)| t == "fleet/gw-b/reply/group-1")
        .collect();
    assert_eq!(from_b.len(), 1, "gw-b ran the north command: {from_b:?}");
}

/// Validates `docs` against `schemas/fleet-state.schema.json` with the
/// Python jsonschema package of the test virtualenv.
pub(crate) fn assert_valid_states(dir: &Path, docs: &[&Value]) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut args = vec![root
        .join("schemas/fleet-state.schema.json")
        .display()
        .to_string()];
    for (i, d) in docs.iter().enumerate() {
        let p = dir.join(format!("state-{i}.json"));
        std::fs::write(&p, d.to_string()).unwrap();
        args.push(p.display().to_string());
    }
    for (r, d) in python_json_lines("fleet_schema_check.py", &args)
        .iter()
        .zip(docs)
    {
        assert_eq!(r["ok"], true, "{d}: {}", r["errors"]);
    }
}

#[test]
fn the_retained_state_validates_against_its_schema_and_stays_under_2_kb_with_5_failing_sinks() {
    let tmp = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(tmp.path(), "allow_anonymous true", "");
    let k = keys(tmp.path(), "ops-1");
    let url = format!("mqtt://127.0.0.1:{}", broker.port);
    // Five sinks with long names whose targets refuse connections: each
    // reports a last error (with credentials in its URL to redact).
    let long = "a-long-path-segment/".repeat(10);
    let mut cfg = String::new();
    for i in 0..5 {
        cfg.push_str(&format!(
            "[sinks.warehouse-analytics-{i}]\nkind = \"http\"\n\
             url = \"http://svc-user:hunter2@127.0.0.1:1/ingest/{long}-{i}?token=s3cr3t\"\n\
             retry_budget = 1000\nretry_base_ms = 50\nretry_max_ms = 200\n"
        ));
    }
    let cfg_path = tmp.path().join("gateway.toml");
    std::fs::write(&cfg_path, cfg).unwrap();
    let sub = Subscriber::start(broker.port, tmp.path(), &["fleet/gw-big/state"], &[]);
    let gw = start_gateway_with(
        tmp.path(),
        "gw-big",
        &url,
        &k.trusted,
        "site-north-with-a-long-name,line-3",
        &["--config", &cfg_path.display().to_string()],
    );
    for i in 0..20 {
        assert_eq!(gw.post("pump-1", &format!("m{i}")).0, 202);
    }
    let state = wait_json_where(&sub, "fleet/gw-big/state", |s| {
        s["sinks"].as_object().is_some_and(|m| {
            m.len() == 5
                && m.values()
                    .all(|v| v["last_error"].is_string() && v["backlog"].as_u64() > Some(0))
        })
    });
    let size = state.to_string().len();
    assert!(size <= 2048, "{size} bytes: {state}");
    let text = state.to_string();
    for secret in ["hunter2", "s3cr3t", "svc-user"] {
        assert!(!text.contains(secret), "{secret} leaked: {text}");
    }
    assert_eq!(state["online"], true);
    assert_eq!(state["gateway_id"], "gw-big");
    assert_eq!(state["wal"]["limit"], 4294967296u64);

    // A late subscriber gets it retained; the last will validates too.
    let late = Subscriber::start(broker.port, tmp.path(), &["fleet/gw-big/state"], &[]);
    let retained = late.wait_json("fleet/gw-big/state", Duration::from_secs(10));
    drop(gw);
    let offline = wait_json_where(&late, "fleet/gw-big/state", |s| s["online"] == false);
    assert_valid_states(tmp.path(), &[&state, &retained, &offline]);
}

#[test]
fn a_gateway_killed_with_sigkill_is_reported_offline_by_its_last_will() {
    let tmp = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(tmp.path(), "allow_anonymous true", "");
    let k = keys(tmp.path(), "ops-1");
    let url = format!("mqtt://127.0.0.1:{}", broker.port);
    let sub = Subscriber::start(broker.port, tmp.path(), &["fleet/gw-1/state"], &[]);
    let mut gw = start_gateway(tmp.path(), "gw-1", &url, &k.trusted, "north");
    let online = wait_json_where(&sub, "fleet/gw-1/state", |s| s["online"] == true);
    assert_eq!(online["groups"], json!(["north"]));
    gw.process.kill().unwrap(); // SIGKILL: no DISCONNECT is sent
    gw.process.wait().unwrap();
    let offline = wait_json_where(&sub, "fleet/gw-1/state", |s| s["online"] == false);
    assert_eq!(offline["gateway_id"], "gw-1");
    // Retained: whoever asks later sees it offline.
    let late = Subscriber::start(broker.port, tmp.path(), &["fleet/gw-1/state"], &[]);
    assert_eq!(
        late.wait_json("fleet/gw-1/state", Duration::from_secs(10))["online"],
        false
    );
}

/// Posts 20 records; each must be accepted (202) within a second, and the
/// default archive sink must have them all within 5 s (its batches wait up
/// to 1 s).
fn assert_ingest_and_sinks_prompt(gw: &Gateway, archive: &Path, prefix: &str) {
    for i in 0..20 {
        let (status, took) = gw.post("pump-1", &format!("{prefix}-{i}"));
        assert_eq!(status, 202, "{prefix}-{i}");
        assert!(took < Duration::from_secs(1), "{prefix}-{i} took {took:?}");
    }
    let started = Instant::now();
    while !(0..20).all(|i| archived_keys(archive).contains(&format!("pump-1:{prefix}-{i}"))) {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the archive did not get the {prefix} records within 5 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn ingest_answers_202_and_sinks_deliver_promptly_while_the_fleet_broker_refuses_connections_or_is_stopped(
) {
    let tmp = tempfile::tempdir().unwrap();
    let k = keys(tmp.path(), "ops-1");

    // A port nobody listens on.
    let refused = format!("mqtt://127.0.0.1:{}", free_port());
    let gw = start_gateway(tmp.path(), "gw-refused", &refused, &k.trusted, "");
    let archive = tmp.path().join("data-gw-refused/archive");
    assert_ingest_and_sinks_prompt(&gw, &archive, "refused");
    std::thread::sleep(Duration::from_secs(3)); // reconnect attempts pile up
    assert_ingest_and_sinks_prompt(&gw, &archive, "refused-later");
    assert_eq!(gw.metric("gateway_fleet_connected"), 0.0);
    drop(gw);

    // A broker that accepted the connection and then froze (kill -STOP):
    // TCP stays open, nothing answers.
    let broker = Mosquitto::start(tmp.path(), "allow_anonymous true", "");
    let url = format!("mqtt://127.0.0.1:{}", broker.port);
    let sub = Subscriber::start(broker.port, tmp.path(), &["fleet/+/reply/#"], &[]);
    let gw = start_gateway(tmp.path(), "gw-stopped", &url, &k.trusted, "");
    wait_fleet(broker.port, &sub, &k, "gw-stopped");
    drop(sub);
    let pid = broker.pid().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .unwrap()
        .success());
    let archive = tmp.path().join("data-gw-stopped/archive");
    std::thread::sleep(Duration::from_secs(1));
    assert_ingest_and_sinks_prompt(&gw, &archive, "stopped");
    // Long enough for a state publish and keep-alives to hit the frozen broker.
    std::thread::sleep(Duration::from_secs(6));
    assert_ingest_and_sinks_prompt(&gw, &archive, "stopped-later");
    let _ = std::process::Command::new("kill")
        .args(["-CONT", &pid])
        .status();
}

/// `gateway ARGS…` with `env`: (exit code, stdout, stderr).
fn gateway_cli(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args(args)
        .env_remove("GATEWAY_CONFIG")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_operator_cli_makes_a_key_sends_a_signed_command_and_reads_the_fleet_status() {
    use std::os::unix::fs::PermissionsExt as _;
    let tmp = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(tmp.path(), "allow_anonymous true", "");
    let url = format!("mqtt://127.0.0.1:{}", broker.port);
    let keydir = tmp.path().join("keys");
    let keydir_s = keydir.display().to_string();
    let (code, public, err) = gateway_cli(
        &["fleet", "keygen", "--out", &keydir_s, "--key-id", "ops-1"],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    let key = keydir.join("ops-1.key");
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert!(public.starts_with("ops-1 "), "{public}");
    // Never overwrites a key.
    let (code, _, _) = gateway_cli(
        &["fleet", "keygen", "--out", &keydir_s, "--key-id", "ops-1"],
        &[],
    );
    assert_ne!(code, 0);
    let trusted = keydir.join("ops-1.pub");
    let _gw = start_gateway(tmp.path(), "gw-1", &url, &trusted, "north");
    let key_s = key.display().to_string();

    // `gateway fleet send ... sink.pause ARGS` to gw-1.
    let pause = |args: &str| {
        gateway_cli(
            &[
                "fleet",
                "send",
                "--url",
                &url,
                "--gateway",
                "gw-1",
                "--key",
                &key_s,
                "--timeout",
                "2s",
                "sink.pause",
                args,
            ],
            &[],
        )
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let reply = loop {
        let (code, out, err) = pause(r#"{"sink":"archive"}"#);
        if code == 0 {
            break out;
        }
        assert!(Instant::now() < deadline, "fleet send: {code} {out} {err}");
    };
    let reply: Value = serde_json::from_str(&reply).unwrap();
    assert_eq!(reply["ok"], true, "{reply}");
    let (code, out, err) = pause(r#"{"sink":"nope"}"#);
    assert_eq!(code, 1, "{out} {err}");
    assert!(out.contains("unknown_sink"), "{out}");

    // `sign` prints an envelope the gateway accepts when published as is.
    let sub = Subscriber::start(broker.port, tmp.path(), &["fleet/+/reply/#"], &[]);
    let (code, env, err) = gateway_cli(
        &[
            "fleet",
            "sign",
            "--gateway",
            "gw-1",
            "--key",
            &key_s,
            "ping",
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    let env: Value = serde_json::from_str(&env).unwrap();
    assert_eq!(
        send(broker.port, &sub, "gw-1", "fleet/gw-1/control/ping", &env)["ok"],
        true
    );

    wait_until(
        "the state shows the sink paused",
        Duration::from_secs(15),
        || {
            let (_, out, _) = gateway_cli(
                &[
                    "fleet", "status", "--url", &url, "--json", "--wait", "500ms",
                ],
                &[],
            );
            serde_json::from_str::<Value>(&out)
                .is_ok_and(|v| v[0]["sinks"]["archive"]["paused"] == true)
        },
    );
    let (code, table, err) = gateway_cli(
        &[
            "fleet", "status", "--url", &url, "--group", "north", "--wait", "500ms",
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    let row = table
        .lines()
        .find(|l| l.starts_with("gw-1"))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(
        row.contains("yes") && row.contains("archive paused"),
        "{table}"
    );
    let (_, other, _) = gateway_cli(
        &[
            "fleet", "status", "--url", &url, "--group", "south", "--json", "--wait", "500ms",
        ],
        &[],
    );
    assert_eq!(serde_json::from_str::<Value>(&other).unwrap(), json!([]));
}

#[test]
fn a_fleet_without_usable_trusted_keys_stops_start_up_with_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data").display().to_string();
    let bad_keys = tmp.path().join("keys");
    std::fs::write(&bad_keys, "ops-1 !!!\n").unwrap();
    let bad_keys = bad_keys.display().to_string();
    for (env, key) in [
        (
            vec![("GATEWAY_FLEET_URL", "mqtt://127.0.0.1:1")],
            "fleet.trusted_keys_file",
        ),
        (
            vec![
                ("GATEWAY_FLEET_URL", "mqtt://127.0.0.1:1"),
                ("GATEWAY_FLEET_TRUSTED_KEYS_FILE", "/nonexistent/keys"),
            ],
            "fleet.trusted_keys_file",
        ),
        (
            vec![
                ("GATEWAY_FLEET_URL", "mqtt://127.0.0.1:1"),
                ("GATEWAY_FLEET_TRUSTED_KEYS_FILE", &bad_keys),
            ],
            "fleet.trusted_keys_file",
        ),
        (
            vec![
                ("GATEWAY_FLEET_URL", "tcp://fleet:1"),
                ("GATEWAY_FLEET_TRUSTED_KEYS_FILE", &bad_keys),
            ],
            "fleet.url",
        ),
    ] {
        let mut env = env;
        env.push(("GATEWAY_MQTT_URL", "off"));
        let (code, _, err) = gateway_cli(
            &["run", "--data-dir", &data, "--http-addr", "127.0.0.1:0"],
            &env,
        );
        assert_eq!(code, 2, "{env:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(
            err.starts_with("error: configuration: invalid `") && err.contains(key),
            "{err}"
        );
    }
}
