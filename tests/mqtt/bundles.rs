//! Fleet config bundles (DESIGN §11) with the real gateway binary and a
//! real Mosquitto as the fleet broker (and as the broker of an `mqtt`
//! sink): a good bundle is applied by re-exec and kept after its
//! probation; a bundle that takes down a sink that was up is rolled back
//! within probation + 5 s; a kill -9 during probation comes back on the
//! previous bundle; stale, secret-carrying and invalid bundles are refused
//! without a restart. Acknowledged records reach the archive throughout.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::broker::{Mosquitto, Subscriber};
use crate::fleet::{
    assert_valid_states, keys, now_ms, send, start_gateway_env, wait_fleet, Gateway, Keys,
};
use crate::helpers::{archived_keys, spawn_gateway_binary_logged, telemetry, wait_until};

/// Probation of these tests.
const PROBATION_S: u64 = 4;

struct Site {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    broker: Mosquitto,
    keys: Keys,
    sub: Subscriber,
    gw: Gateway,
    config: PathBuf,
    acked: HashSet<String>,
    posted: u32,
}

/// A gateway `gw-b` whose file has the default archive and an `mqtt` sink
/// `up` on the fleet broker (up from the start), probation 4 s.
fn site() -> Site {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let broker = Mosquitto::start(&dir, "allow_anonymous true", "");
    let keys = keys(&dir, "ops-b");
    let config = dir.join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[sinks.archive]\nkind = \"s3\"\nurl = \"file://{}\"\nbatch_max_wait_ms = 100\n\n\
             [sinks.up]\nkind = \"mqtt\"\nurl = \"mqtt://127.0.0.1:{}\"\ntopic_prefix = \"sinkdata\"\n\
             batch_max_wait_ms = 50\n",
            dir.join("archive").display(),
            broker.port
        ),
    )
    .unwrap();
    let url = format!("mqtt://127.0.0.1:{}", broker.port);
    let cfg = config.display().to_string();
    let probation = format!("{PROBATION_S}s");
    let sub = Subscriber::start(
        broker.port,
        &dir,
        &["fleet/+/reply/#", "fleet/+/state"],
        &[],
    );
    let gw = start_gateway_env(
        &dir,
        "gw-b",
        &url,
        &keys.trusted,
        "north",
        &["--config", &cfg],
        &[("GATEWAY_FLEET_PROBATION", &probation)],
    );
    wait_fleet(broker.port, &sub, &keys, "gw-b");
    let mut s = Site {
        _tmp: tmp,
        dir,
        broker,
        keys,
        sub,
        gw,
        config,
        acked: HashSet::new(),
        posted: 0,
    };
    // Traffic, so that the sinks are used (and "up" means it).
    for _ in 0..5 {
        s.post();
    }
    s
}

impl Site {
    /// Posts one record; remembers it when acknowledged.
    fn post(&mut self) {
        self.posted += 1;
        let id = format!("m{}", self.posted);
        // The gateway restarts now and then: a refused connection is
        // simply not acknowledged.
        let r = ureq::post(&format!("http://127.0.0.1:{}/ingest/dev-1", self.gw.http))
            .set("Content-Type", "application/json")
            .timeout(Duration::from_secs(5))
            .send_string(&telemetry(&id, 21.5));
        if r.map(|r| r.status() == 202).unwrap_or(false) {
            self.acked.insert(format!("dev-1:{id}"));
        }
    }

    fn apply(&self, request_id: &str, args: Value) -> Value {
        let env = self
            .keys
            .signer
            .sign("gw-b", "bundle.apply", args, request_id, now_ms());
        send(
            self.broker.port,
            &self.sub,
            "gw-b",
            "fleet/gw-b/control/bundle.apply",
            &env,
        )
    }

    fn store_state(&self) -> Value {
        let path = self.dir.join("data-gw-b/bundles/state.json");
        std::fs::read_to_string(path)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or(Value::Null)
    }

    /// Posts records until the retained state reports `status` for
    /// `version`; the state's bundle field (the whole state is checked
    /// against its schema).
    fn wait_bundle(&mut self, version: u64, status: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let found = self
                .sub
                .messages()
                .into_iter()
                .filter(|(t, _)| t == "fleet/gw-b/state")
                .filter_map(|(_, p)| serde_json::from_str::<Value>(&p).ok())
                .find(|v| v["bundle"]["version"] == version && v["bundle"]["status"] == status);
            if let Some(doc) = found {
                assert_valid_states(&self.dir, &[&doc]);
                return doc["bundle"].clone();
            }
            assert!(
                Instant::now() < deadline,
                "bundle {version} never reported {status}; store {}; log:\n{}",
                self.store_state(),
                tail(&self.gw.log())
            );
            self.post();
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn sinks(&self) -> Vec<String> {
        let text = ureq::get(&format!("http://127.0.0.1:{}/metrics", self.gw.http))
            .call()
            .map(|r| r.into_string().unwrap_or_default())
            .unwrap_or_default();
        let mut names: Vec<String> = text
            .lines()
            .filter(|l| l.starts_with("gateway_sink_paused{"))
            .filter_map(|l| l.split('"').nth(1).map(str::to_string))
            .collect();
        names.sort();
        names
    }

    /// Every acknowledged record is in the archive.
    fn assert_no_acked_record_lost(&self) {
        let archive = self.dir.join("archive");
        wait_until("acked records archived", Duration::from_secs(15), || {
            self.acked.is_subset(&archived_keys(&archive))
        });
        assert!(self.acked.len() >= 5, "{} acked", self.acked.len());
    }
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

fn pid_of(gw: &Gateway) -> u32 {
    gw.process.id()
}

fn wait_ready(http: u16) {
    let ready = format!("http://127.0.0.1:{http}/readyz");
    wait_until("gateway ready", Duration::from_secs(20), || {
        ureq::get(&ready)
            .timeout(Duration::from_secs(1))
            .call()
            .map(|r| r.status() == 200)
            .unwrap_or(false)
    });
}

#[test]
fn a_good_bundle_is_applied_by_re_exec_and_becomes_active_after_its_probation() {
    let mut s = site();
    let pid = pid_of(&s.gw);
    let extra = s.dir.join("extra");
    let reply = s.apply(
        "good-1",
        json!({"version": 1, "settings": {
            "sinks": {"extra": {"kind": "s3", "url": format!("file://{}", extra.display()),
                                "route": {"metrics_any": ["temperature_c"]}}},
            "priority": [{"class": "high", "match": {"metrics_any": ["alarm"]}}],
        }}),
    );
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(reply["result"]["status"], "applying");
    let b = s.wait_bundle(1, "active", Duration::from_secs(PROBATION_S + 20));
    assert_eq!(b["active"], 1);
    // The same process (re-exec), now with the bundle's sink.
    assert_eq!(pid_of(&s.gw), pid);
    assert_eq!(s.sinks(), ["archive", "extra", "up"]);
    assert_eq!(
        s.gw.metric("gateway_fleet_bundle_info{status=\"active\",version=\"1\"}"),
        1.0
    );
    let st = s.store_state();
    assert_eq!(
        (st["active"].clone(), st["probation"].clone()),
        (json!(1), Value::Null)
    );
    assert!(s.gw.log().contains("config bundle passed its probation"));
    // The status page shows the bundle the fleet state reports.
    let status = s.gw.status();
    assert_eq!(
        (
            &status["gateway"]["bundle"]["version"],
            &status["gateway"]["bundle"]["status"]
        ),
        (&json!(1), &json!("active")),
        "{status}"
    );
    s.assert_no_acked_record_lost();
}

#[test]
fn a_bundle_that_takes_down_a_sink_that_was_up_is_rolled_back_within_probation_plus_5s() {
    let mut s = site();
    let started = Instant::now();
    let reply = s.apply(
        "bad-1",
        json!({"version": 1, "settings": {"sinks": {"up": {"url": "mqtt://127.0.0.1:1"}}}}),
    );
    assert_eq!(reply["ok"], true, "{reply}");
    // State is published at most every 5 s on change: read the store for
    // the time, the retained state for the report.
    let deadline = Instant::now() + Duration::from_secs(PROBATION_S + 15);
    while s.store_state()["status"] != "rolled_back" {
        assert!(
            Instant::now() < deadline,
            "no rollback; log:\n{}",
            tail(&s.gw.log())
        );
        s.post();
        std::thread::sleep(Duration::from_millis(100));
    }
    let took = started.elapsed();
    assert!(
        took <= Duration::from_secs(PROBATION_S + 5),
        "rolled back after {took:?}"
    );
    let b = s.wait_bundle(1, "rolled_back", Duration::from_secs(20));
    assert!(
        b["reason"].as_str().unwrap_or_default().contains("sink up"),
        "{b}"
    );
    assert_eq!(b["active"], Value::Null);
    // Back on the file's sink, which works again.
    wait_ready(s.gw.http);
    s.post();
    wait_until("sink up delivers again", Duration::from_secs(15), || {
        s.gw.metric("gateway_sink_up{sink=\"up\"}") == 1.0
    });
    s.assert_no_acked_record_lost();
}

#[test]
fn a_gateway_killed_during_probation_comes_back_on_its_previous_bundle() {
    let mut s = site();
    let reply = s.apply(
        "v1",
        json!({"version": 1, "settings": {"log": {"level": "info"}}}),
    );
    assert_eq!(reply["ok"], true, "{reply}");
    s.wait_bundle(1, "active", Duration::from_secs(PROBATION_S + 20));
    let extra = s.dir.join("extra2");
    let reply = s.apply(
        "v2",
        json!({"version": 2, "settings": {"sinks": {"extra2": {"kind": "s3", "url": format!("file://{}", extra.display())}}}}),
    );
    assert_eq!(reply["ok"], true, "{reply}");
    wait_until("on probation", Duration::from_secs(15), || {
        s.store_state()["status"] == "probation"
    });
    s.gw.process.kill().unwrap(); // SIGKILL during probation
    let _ = s.gw.process.wait();
    let data = s.dir.join("data-gw-b");
    let cfg = s.config.display().to_string();
    let url = format!("mqtt://127.0.0.1:{}", s.broker.port);
    let trusted = s.keys.trusted.display().to_string();
    let http = s.gw.http;
    s.gw.process = spawn_gateway_binary_logged(
        &data,
        http,
        &["--config", &cfg],
        &[
            ("GATEWAY_ID", "gw-b"),
            ("GATEWAY_MQTT_URL", "off"),
            ("GATEWAY_FLEET_URL", &url),
            ("GATEWAY_FLEET_TRUSTED_KEYS_FILE", &trusted),
            ("GATEWAY_FLEET_GROUPS", "north"),
            ("GATEWAY_FLEET_PROBATION", "4s"),
        ],
        Some(&s.gw.log),
    );
    let b = s.wait_bundle(2, "rolled_back", Duration::from_secs(20));
    assert_eq!(b["reason"], "crashed during probation");
    assert_eq!(b["active"], 1);
    assert_eq!(s.sinks(), ["archive", "up"]);
    let st = s.store_state();
    assert_eq!(
        (st["active"].clone(), st["probation"].clone()),
        (json!(1), Value::Null)
    );
    s.assert_no_acked_record_lost();
}

#[test]
fn stale_inline_secret_and_invalid_bundles_are_refused_without_a_restart() {
    let mut s = site();
    let uptime_pid = pid_of(&s.gw);
    let refused = |s: &Site, rid: &str, args: Value, code: &str| {
        let reply = s.apply(rid, args);
        assert_eq!(reply["ok"], false, "{reply}");
        assert_eq!(reply["error"], code, "{reply}");
        reply
    };
    let r = refused(
        &s,
        "secret-1",
        json!({"version": 1, "settings": {"sinks": {"cloud": {"kind": "http", "url": "http://127.0.0.1:9/x", "token": "hunter2"}}}}),
        "inline_secret",
    );
    assert!(
        r["message"].as_str().unwrap().contains("sinks.cloud.token"),
        "{r}"
    );
    assert!(!r.to_string().contains("hunter2"), "{r}");
    let r = refused(
        &s,
        "invalid-1",
        json!({"version": 1, "settings": {"sinks": {"bad": {"kind": "nope"}}}}),
        "invalid_bundle",
    );
    assert!(r["message"].as_str().unwrap().contains("bundle"), "{r}");
    refused(
        &s,
        "forbidden-1",
        json!({"version": 1, "settings": {"data_dir": "/tmp/elsewhere"}}),
        "invalid_bundle",
    );
    // Nothing was stored, nothing restarted.
    assert_eq!(s.store_state()["status"], Value::Null);
    assert!(!s.gw.log().contains("re-execute"));

    let reply = s.apply(
        "v3",
        json!({"version": 3, "settings": {"log": {"level": "info"}}}),
    );
    assert_eq!(reply["ok"], true, "{reply}");
    s.wait_bundle(3, "active", Duration::from_secs(PROBATION_S + 20));
    for (rid, v) in [("same-3", 3), ("older-2", 2)] {
        let r = refused(
            &s,
            rid,
            json!({"version": v, "settings": {"log": {"level": "debug"}}}),
            "stale_version",
        );
        assert!(
            r["message"].as_str().unwrap().contains("active bundle 3"),
            "{r}"
        );
    }
    assert_eq!(s.store_state()["active"], 3);
    assert_eq!(pid_of(&s.gw), uptime_pid);
    assert!(s.gw.metric("gateway_fleet_commands_total{result=\"error\"}") >= 2.0);
    s.assert_no_acked_record_lost();
    let _: &Path = &s.dir;
}

/// `n` gateways `gw-0`… in group `north` on one fleet broker, each with its
/// own archive and an `mqtt` sink `up` on that broker, probation `probation_s`.
struct Fleet {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    broker: Mosquitto,
    gws: Vec<Gateway>,
}

fn fleet_of(n: usize, probation_s: u64) -> Fleet {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let broker = Mosquitto::start(&dir, "allow_anonymous true", "");
    let keys = keys(&dir, "ops-r");
    let url = format!("mqtt://127.0.0.1:{}", broker.port);
    let probation = format!("{probation_s}s");
    let sub = Subscriber::start(broker.port, &dir, &["fleet/+/reply/#"], &[]);
    let gws = (0..n)
        .map(|i| {
            let id = format!("gw-{i}");
            let config = dir.join(format!("{id}.toml"));
            std::fs::write(
                &config,
                format!(
                    "[sinks.archive]\nkind = \"s3\"\nurl = \"file://{}\"\nbatch_max_wait_ms = 100\n\n\
                     [sinks.up]\nkind = \"mqtt\"\nurl = \"mqtt://127.0.0.1:{}\"\ntopic_prefix = \"sinkdata\"\n\
                     batch_max_wait_ms = 50\n",
                    dir.join(format!("archive-{id}")).display(),
                    broker.port
                ),
            )
            .unwrap();
            let cfg = config.display().to_string();
            let gw = start_gateway_env(
                &dir,
                &id,
                &url,
                &keys.trusted,
                "north",
                &["--config", &cfg],
                &[("GATEWAY_FLEET_PROBATION", &probation)],
            );
            wait_fleet(broker.port, &sub, &keys, &id);
            gw
        })
        .collect();
    Fleet {
        _tmp: tmp,
        dir,
        broker,
        gws,
    }
}

/// Posts to every gateway every 100 ms until dropped; the acknowledged
/// idempotency keys per gateway.
struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<Vec<HashSet<String>>>>,
}

impl Load {
    fn start(ports: Vec<u16>) -> Load {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut acked = vec![HashSet::new(); ports.len()];
            let mut n = 0;
            while !s.load(std::sync::atomic::Ordering::SeqCst) {
                n += 1;
                for (i, port) in ports.iter().enumerate() {
                    let id = format!("l{n}");
                    let r = ureq::post(&format!("http://127.0.0.1:{port}/ingest/dev-l"))
                        .set("Content-Type", "application/json")
                        .timeout(Duration::from_secs(5))
                        .send_string(&telemetry(&id, 20.0));
                    if r.map(|r| r.status() == 202).unwrap_or(false) {
                        acked[i].insert(format!("dev-l:{id}"));
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            acked
        });
        Load {
            stop,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> Vec<HashSet<String>> {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.thread.take().unwrap().join().unwrap()
    }
}

/// Runs `gateway fleet rollout` for `bundle`; (exit ok, stdout, stderr),
/// calling `during` with the stderr so far until it returns true.
fn rollout(
    dir: &Path,
    port: u16,
    bundle: Value,
    waves: &str,
    max_failures: u32,
    mut during: impl FnMut(&str) -> bool,
) -> (bool, String, String) {
    let file = dir.join(format!("bundle-{}.json", bundle["version"]));
    std::fs::write(&file, bundle.to_string()).unwrap();
    let (out, err) = (dir.join("rollout.out"), dir.join("rollout.err"));
    let key = dir.join("ops-r.key");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args(["fleet", "rollout", "--url"])
        .arg(format!("mqtt://127.0.0.1:{}", port))
        .args(["--group", "north", "--bundle"])
        .arg(&file)
        .arg("--key")
        .arg(&key)
        .args([
            "--waves",
            waves,
            "--max-failures",
            &max_failures.to_string(),
        ])
        .args(["--timeout", "60s", "--wait", "1s"])
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut done = false;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if !done {
            done = during(&std::fs::read_to_string(&err).unwrap_or_default());
        }
        assert!(Instant::now() < deadline, "the rollout never ended");
        std::thread::sleep(Duration::from_millis(100));
    };
    (
        status.success(),
        std::fs::read_to_string(&out).unwrap(),
        std::fs::read_to_string(&err).unwrap(),
    )
}

impl Fleet {
    fn store_state(&self, i: usize) -> Value {
        let path = self.dir.join(format!("data-gw-{i}/bundles/state.json"));
        std::fs::read_to_string(path)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or(Value::Null)
    }

    fn assert_no_acked_record_lost(&self, acked: &[HashSet<String>]) {
        for (i, keys) in acked.iter().enumerate() {
            let archive = self.dir.join(format!("archive-gw-{i}"));
            wait_until("acked records archived", Duration::from_secs(15), || {
                keys.is_subset(&archived_keys(&archive))
            });
            assert!(keys.len() >= 10, "gw-{i}: {} acked", keys.len());
        }
    }
}

#[test]
fn a_rollout_converges_in_waves_and_a_bad_bundle_stops_after_wave_1_rolled_back() {
    let f = fleet_of(3, 3);
    let load = Load::start(f.gws.iter().map(|g| g.http).collect());
    let good = json!({"version": 1, "settings": {"priority": [{"class": "high", "match": {"metrics_any": ["alarm"]}}]}});
    let (ok, out, err) = rollout(&f.dir, f.broker.port, good, "1,100%", 0, |_| true);
    assert!(ok, "{out}\n{err}");
    assert!(err.contains("wave 1/2: sending to gw-0"), "{err}");
    assert!(err.contains("wave 2/2: sending to gw-1, gw-2"), "{err}");
    let rows: Vec<&str> = out.lines().collect();
    assert!(rows[0].starts_with("MEMBER"), "{out}");
    for i in 0..3 {
        assert!(
            rows.iter()
                .any(|r| r.starts_with(&format!("gw-{i} ")) && r.contains("active")),
            "{out}"
        );
        assert_eq!(f.store_state(i)["active"], 1);
    }

    let bad = json!({"version": 2, "settings": {"sinks": {"up": {"url": "mqtt://127.0.0.1:1"}}}});
    let (ok, out, err) = rollout(&f.dir, f.broker.port, bad, "1,100%", 0, |_| true);
    assert!(!ok, "the rollout must stop: {out}\n{err}");
    assert!(
        err.contains("stopping: 1 failure(s) > --max-failures 0"),
        "{err}"
    );
    assert!(
        out.lines()
            .any(|r| r.starts_with("gw-0 ") && r.contains("rolled_back (sink up")),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|r| r.starts_with("gw-1 ") && r.contains("not sent")),
        "{out}"
    );
    assert_eq!(f.store_state(0)["status"], "rolled_back");
    assert_eq!(f.store_state(0)["active"], 1);
    for i in 1..3 {
        assert_eq!(f.store_state(i)["version"], 1, "gw-{i} never got bundle 2");
    }
    let acked = load.finish();
    f.assert_no_acked_record_lost(&acked);
}

#[test]
fn a_rollout_resumes_and_finishes_when_the_fleet_broker_restarts_mid_rollout() {
    let mut f = fleet_of(2, 8);
    let load = Load::start(f.gws.iter().map(|g| g.http).collect());
    let good = json!({"version": 5, "settings": {"log": {"level": "info"}}});
    let mut restarted = false;
    let (dir, port) = (f.dir.clone(), f.broker.port);
    let (ok, out, err) = rollout(&dir, port, good, "1,100%", 0, |err| {
        if err.contains("wave 1/2: sending to gw-0") {
            // The fleet broker goes away and comes back on its port while
            // wave 1 is on probation.
            f.broker.restart();
            restarted = true;
        }
        restarted
    });
    assert!(ok, "{out}\n{err}");
    assert!(err.contains("fleet broker reconnected"), "{err}");
    for i in 0..2 {
        assert_eq!(f.store_state(i)["active"], 5, "{out}\n{err}");
    }
    let acked = load.finish();
    f.assert_no_acked_record_lost(&acked);
}
