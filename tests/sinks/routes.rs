//! Routes, priority classes, TTLs and live-first drain (DESIGN §6a) against
//! real servers, read back from the far side: Kafka (tansu), S3 (moto) and
//! the analytics API.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use serde_json::{json, Value};

use crate::analytics::{Analytics, Mode};
use crate::helpers::{
    free_port, record_keys, spawn_app, spawn_gateway_binary, wait_until, TestApp,
};
use crate::kafka::{keys_of, Tansu};
use crate::s3::Moto;

/// A record with `metrics` and `tags`.
fn rec(msg_id: &str, metrics: Value, tags: Value) -> String {
    json!({"msg_id": msg_id, "ts": "2026-11-25T08:00:00Z", "metrics": metrics, "tags": tags})
        .to_string()
}

fn post(app: &TestApp, device: &str, body: &str) {
    let r = app.post_json(device, body);
    assert_eq!(r.status, 202, "{}", r.text);
}

#[test]
fn three_sinks_with_different_routes_each_receive_exactly_their_subset() {
    let tmp = tempfile::tempdir().unwrap();
    let tansu = Tansu::start(tmp.path());
    tansu.create_topic("pumps");
    let moto = Moto::start();
    moto.create_bucket("north");
    let api = Analytics::start();
    std::fs::write(tmp.path().join("key"), "test").unwrap();
    let app = spawn_app(&format!(
        "[sinks.pumps]\nkind = \"kafka\"\nbrokers = \"{kafka}\"\ntopic = \"pumps\"\n\
         [sinks.pumps.route]\ndevices = [\"pump-*\"]\n\
         [sinks.north]\nkind = \"s3\"\nurl = \"s3://north/edge\"\nendpoint = \"{s3}\"\n\
         access_key_id_file = \"{key}\"\nsecret_access_key_file = \"{key}\"\n\
         route = {{ tags = {{ site = \"north\" }} }}\n\
         [sinks.alarms]\nkind = \"http\"\nurl = \"{api}\"\n\
         route = {{ metrics_any = [\"alarm\", \"fault\"], sources = [\"http\"] }}\n",
        kafka = tansu.brokers(),
        s3 = moto.endpoint(),
        key = tmp.path().join("key").display(),
        api = api.url(),
    ));
    let mut want: BTreeMap<&str, HashSet<String>> = BTreeMap::new();
    let mut unrouted = 0;
    for i in 0..40 {
        let device = if i % 2 == 0 { "pump-1" } else { "fan-1" };
        let site = if i % 3 == 0 { "north" } else { "south" };
        let metrics = if i % 5 == 0 {
            json!({"alarm": true})
        } else {
            json!({"t": i})
        };
        post(
            &app,
            device,
            &rec(&format!("m{i}"), metrics, json!({"site": site})),
        );
        let key = format!("{device}:m{i}");
        let mut any = false;
        for (sink, takes) in [
            ("pumps", device.starts_with("pump-")),
            ("north", site == "north"),
            ("alarms", i % 5 == 0),
        ] {
            if takes {
                want.entry(sink).or_default().insert(key.clone());
                any = true;
            }
        }
        if !any {
            unrouted += 1;
        }
    }
    assert!(unrouted > 0, "the mix has unrouted records");
    wait_until("every sink caught up", Duration::from_secs(30), || {
        ["pumps", "north", "alarms"].iter().all(|s| {
            app.metric(&format!(
                r#"gateway_wal_records{{sink="{s}",state="enqueued"}}"#
            )) == 0.0
                && app.metric(&format!(
                    r#"gateway_wal_records{{sink="{s}",state="inflight"}}"#
                )) == 0.0
        })
    });
    let kafka = keys_of(&tansu.dump("pumps", want["pumps"].len(), Duration::from_secs(20)));
    assert_eq!(kafka, want["pumps"], "Kafka got exactly the pumps");
    let s3: Vec<Value> = moto.dump("north").into_iter().map(|(_, _, r)| r).collect();
    assert_eq!(
        record_keys(&s3),
        want["north"],
        "S3 got exactly the north site"
    );
    assert_eq!(
        api.accepted_keys(),
        want["alarms"],
        "the API got exactly the alarms"
    );
    assert_eq!(
        app.metric("gateway_ingest_unrouted_total"),
        unrouted as f64,
        "unrouted records are counted"
    );
    // Unrouted records are stored: a replay to a named sink delivers them
    // whatever its route says.
    let before = api.accepted_record_keys().len();
    let r = app.admin(
        "POST",
        "/admin/replay",
        Some(json!({"sink": "alarms", "since": 0, "until": 4_102_444_800_000i64})),
    );
    assert_eq!(r.status, 200, "{}", r.text);
    wait_until("the replay arrived", Duration::from_secs(20), || {
        api.accepted_record_keys().len() >= before + 40
    });
    let all: HashSet<String> = api.accepted_record_keys().into_iter().collect();
    assert_eq!(all.len(), 40, "every stored record, routed or not");
}

/// The class of a record key in the priority tests: alarms are high,
/// `debug-*` devices low, the rest normal.
fn class_of(key: &str) -> u8 {
    if key.contains(":alarm") {
        0
    } else if key.starts_with("debug-") {
        2
    } else {
        1
    }
}

/// Sends a mixed backlog: 3 devices, alarms, debug records; ids start with `tag`.
fn send_mixed(port: u16, tag: &str, n: usize) -> Vec<String> {
    let mut keys = Vec::new();
    let agent = ureq::AgentBuilder::new().build();
    for i in 0..n {
        let (device, id, metrics) = match i % 6 {
            0 => ("debug-1", format!("{tag}d{i}"), json!({"t": i})),
            1 => ("pump-1", format!("alarm{tag}{i}"), json!({"alarm": true})),
            2 => ("pump-2", format!("{tag}n{i}"), json!({"t": i})),
            3 => ("debug-1", format!("{tag}d{i}"), json!({"t": i})),
            4 => ("pump-2", format!("alarm{tag}{i}"), json!({"alarm": true})),
            _ => ("pump-1", format!("{tag}n{i}"), json!({"t": i})),
        };
        let r = agent
            .post(&format!("http://127.0.0.1:{port}/ingest/{device}"))
            .set("Content-Type", "application/json")
            .send_string(&rec(&id, metrics, json!({})))
            .unwrap();
        assert_eq!(r.status(), 202);
        keys.push(format!("{device}:{id}"));
    }
    keys
}

/// Checks that `got` (in arrival order) holds classes in order and keeps
/// per-device order within a class; `sent` is the send order.
fn assert_priority_order(got: &[String], sent: &[String]) {
    let pos: BTreeMap<&str, usize> = sent
        .iter()
        .enumerate()
        .map(|(i, k)| (k.as_str(), i))
        .collect();
    for w in got.windows(2) {
        assert!(
            class_of(&w[0]) <= class_of(&w[1]),
            "{} (class {}) arrived before {} (class {})",
            w[0],
            class_of(&w[0]),
            w[1],
            class_of(&w[1])
        );
    }
    let mut last: BTreeMap<(u8, &str), usize> = BTreeMap::new();
    for k in got {
        let device = k.split(':').next().unwrap();
        let p = pos[k.as_str()];
        if let Some(&prev) = last.get(&(class_of(k), device)) {
            assert!(
                prev < p,
                "{k} arrived after a later record of its device and class"
            );
        }
        last.insert((class_of(k), device), p);
    }
}

const PRIORITY: &str = "[[priority]]\nclass = \"high\"\nmatch = { metrics_any = [\"alarm\"] }\n\
                        [[priority]]\nclass = \"low\"\nmatch = { devices = [\"debug-*\"] }\n";

#[test]
fn a_paused_sink_delivers_its_backlog_high_then_normal_then_low() {
    let api = Analytics::start();
    let app = spawn_app(&format!(
        "{PRIORITY}[sinks.api]\nkind = \"http\"\nurl = \"{}\"\nbatch_max_records = 7\npaused = true\n",
        api.url()
    ));
    let port: u16 = app.base.rsplit(':').next().unwrap().parse().unwrap();
    let sent = send_mixed(port, "b", 120);
    wait_until(
        "the backlog per class is visible",
        Duration::from_secs(10),
        || {
            app.metric(r#"gateway_wal_class_records{class="high",sink="api"}"#) == 40.0
                && app.metric(r#"gateway_wal_class_records{class="low",sink="api"}"#) == 40.0
                && app.metric(r#"gateway_wal_class_records{class="normal",sink="api"}"#) == 40.0
        },
    );
    let r = app.admin("POST", "/admin/sinks/api/resume", None);
    assert_eq!(r.status, 200, "{}", r.text);
    wait_until("everything delivered", Duration::from_secs(20), || {
        api.accepted_keys().len() == 120
    });
    let got = api.accepted_record_keys();
    assert_eq!(got.len(), 120, "each once");
    assert_priority_order(&got, &sent);
}

#[test]
fn a_record_past_its_ttl_is_expired_counted_listed_exported_then_requeued_and_delivered() {
    let api = Analytics::start();
    let app = spawn_app(&format!(
        "{PRIORITY}[sinks.api]\nkind = \"http\"\nurl = \"{}\"\npaused = true\nttl = {{ low = \"1s\" }}\n",
        api.url()
    ));
    for i in 0..5 {
        post(
            &app,
            "debug-1",
            &rec(&format!("d{i}"), json!({"t": i}), json!({})),
        );
        post(
            &app,
            "pump-1",
            &rec(&format!("n{i}"), json!({"t": i}), json!({})),
        );
    }
    wait_until("five low records expired", Duration::from_secs(10), || {
        app.metric(r#"gateway_wal_expired_total{class="low",sink="api"}"#) == 5.0
    });
    let listed = app.admin("GET", "/admin/dlq?sink=api", None);
    assert_eq!(listed.status, 200, "{}", listed.text);
    let letters = listed.body["dead_letters"].as_array().unwrap();
    assert_eq!(letters.len(), 5);
    assert!(
        letters.iter().all(|d| d["error"] == "expired"),
        "{}",
        listed.text
    );
    let export = app.admin("GET", "/admin/dlq/export?sink=api&error=expired", None);
    assert_eq!(export.status, 200);
    assert_eq!(export.text.lines().count(), 5, "{}", export.text);
    assert_eq!(
        app.metric(r#"gateway_wal_expired_total{class="normal",sink="api"}"#),
        0.0
    );

    let r = app.admin(
        "POST",
        "/admin/dlq/requeue",
        Some(json!({"sink": "api", "error": "expired"})),
    );
    assert_eq!(r.body["requeued"], 5, "{}", r.text);
    assert_eq!(
        app.admin("POST", "/admin/sinks/api/resume", None).status,
        200
    );
    wait_until("all ten delivered", Duration::from_secs(20), || {
        api.accepted_keys().len() == 10
    });
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(
        app.metric(r#"gateway_wal_expired_total{class="low",sink="api"}"#),
        5.0,
        "a requeued record does not expire again"
    );
}

#[test]
fn with_live_first_records_sent_after_an_outage_go_ahead_of_the_backlog() {
    let api = Analytics::start();
    let app = spawn_app(&format!(
        "[sinks.api]\nkind = \"http\"\nurl = \"{}\"\nbatch_max_records = 50\npaused = true\n\
         drain = \"live_first\"\nlive_after = \"1s\"\n",
        api.url()
    ));
    for b in 0..10 {
        let batch: Vec<String> = (0..100)
            .map(|i| rec(&format!("old{}", b * 100 + i), json!({"t": i}), json!({})))
            .collect();
        post(
            &app,
            &format!("dev-{}", b % 2),
            &format!("[{}]", batch.join(",")),
        );
    }
    std::thread::sleep(Duration::from_millis(1500));
    for i in 0..5 {
        post(
            &app,
            &format!("dev-{}", i % 2),
            &rec(&format!("live{i}"), json!({"t": i}), json!({})),
        );
    }
    assert_eq!(
        app.admin("POST", "/admin/sinks/api/resume", None).status,
        200
    );
    wait_until("everything delivered", Duration::from_secs(20), || {
        api.accepted_keys().len() == 1005
    });
    let got = api.accepted_record_keys();
    let first: Vec<&str> = got[..5]
        .iter()
        .map(|k| k.split(':').nth(1).unwrap())
        .collect();
    assert_eq!(
        first,
        ["live0", "live1", "live2", "live3", "live4"],
        "live records first"
    );
    let backlog: Vec<u32> = got[5..]
        .iter()
        .map(|k| k.split(":old").nth(1).unwrap().parse().unwrap())
        .collect();
    let mut sorted = backlog.clone();
    sorted.sort_unstable();
    assert_eq!(backlog, sorted, "then the backlog, in order");
    assert_eq!(backlog.len(), 1000);
}

/// kill -9 during a priority drain and a live-first drain (two sinks of one
/// gateway): after the restart nothing is lost, and what arrives after it
/// still keeps the order rules.
#[test]
fn kill_9_in_the_middle_of_a_priority_and_a_live_first_drain_loses_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let prio = Analytics::start();
    let live = Analytics::start();
    let config = tmp.path().join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[mqtt]\nurl = \"off\"\n{PRIORITY}\
             [sinks.prio]\nkind = \"http\"\nurl = \"{}\"\nbatch_max_records = 20\npaused = true\n\
             [sinks.live]\nkind = \"http\"\nurl = \"{}\"\nbatch_max_records = 20\npaused = true\n\
             drain = \"live_first\"\nlive_after = \"12s\"\n",
            prio.url(),
            live.url()
        ),
    )
    .unwrap();
    let data = tmp.path().join("data");
    let port = free_port();
    let cfg = config.display().to_string();
    let mut gw = spawn_gateway_binary(&data, port, &["--config", &cfg], &[]);
    let sent = send_mixed(port, "b", 1200);
    // Old enough to be backlog (live_after 12s), young enough to stay live
    // through the crash and the restart, also on a loaded CI machine
    // through the crash.
    std::thread::sleep(Duration::from_millis(12500));
    let live_sent = send_mixed(port, "live", 12);
    let token = std::fs::read_to_string(data.join("admin.token")).unwrap();
    let resume = |sink: &str| {
        let r = ureq::post(&format!(
            "http://127.0.0.1:{port}/admin/sinks/{sink}/resume"
        ))
        .set("Authorization", &format!("Bearer {}", token.trim()))
        .call()
        .unwrap();
        assert_eq!(r.status(), 200);
    };
    // Slow answers keep the drains in progress when the kill comes.
    prio.set(Mode::Slow(Duration::from_millis(20)));
    live.set(Mode::Slow(Duration::from_millis(20)));
    resume("prio");
    resume("live");
    wait_until("both drains under way", Duration::from_secs(20), || {
        prio.accepted_record_keys().len() >= 100 && live.accepted_record_keys().len() >= 100
    });
    gw.kill().unwrap();
    gw.wait().unwrap();
    drop(gw);
    let before_prio = prio.accepted_record_keys().len();
    let before_live = live.accepted_record_keys().len();
    assert!(before_prio < 1212 && before_live < 1212, "killed mid-drain");
    // The sinks start paused again (configuration): resume after the restart.
    prio.set(Mode::Accept);
    live.set(Mode::Accept);
    let _gw = spawn_gateway_binary(&data, port, &["--config", &cfg], &[]);
    resume("prio");
    resume("live");
    let all: HashSet<String> = sent.iter().chain(&live_sent).cloned().collect();
    wait_until(
        "everything arrived at both",
        Duration::from_secs(60),
        || prio.accepted_keys() == all && live.accepted_keys() == all,
    );
    // After the restart: still high, then normal, then low (an InFlight
    // batch of the crash may come again first: at least once).
    let got = prio.accepted_record_keys();
    let seen_before: HashSet<&String> = got[..before_prio].iter().collect();
    let prio_after: Vec<String> = got[before_prio..]
        .iter()
        .filter(|k| !seen_before.contains(k))
        .cloned()
        .collect();
    let order: Vec<String> = sent.iter().chain(&live_sent).cloned().collect();
    assert_priority_order(&prio_after, &order);
    // The live-first sink, across the crash: within each class, the live
    // records came before any of that class's backlog (first arrivals).
    let live_set: HashSet<&String> = live_sent.iter().collect();
    let mut first_seen: HashSet<&String> = HashSet::new();
    let mut backlog_started = [false; 3];
    for k in &live.accepted_record_keys() {
        if !first_seen.insert(k) {
            continue;
        }
        let c = class_of(k) as usize;
        if live_set.contains(k) {
            assert!(
                !backlog_started[c],
                "live {k} waited behind its class's backlog"
            );
        } else {
            backlog_started[c] = true;
        }
    }
}
