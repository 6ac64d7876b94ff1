//! Report-by-exception (DESIGN §6b, `[sinks.NAME.reduce]`) against the real
//! binary: through a kill -9 loop, what the far side got equals a reference
//! reduction of the acknowledged input, computed here by an oracle written
//! apart from the gateway's reducer; and a record sent twice is sent the
//! same both times.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Map, Value};

use crate::analytics::{Analytics, Mode};
use crate::helpers::{free_port, spawn_gateway_binary, wait_until};

const EVERY_MS: i64 = 1000;
/// The reducer's grace after a window's end, at most `every` (1 s here).
const GRACE_MS: i64 = 1000;
const HEARTBEAT_MS: i64 = 3000;

/// The gateway's settings for the reduced sink, as the oracle reads them.
const REDUCE: &str = r#"deadband = { temperature_c = 0.2, "pressure_*" = "1%" }
heartbeat = "3s"
downsample = { every = "1s", metrics = ["vibration_*"] }
"#;

/// One record as the unreduced sink got it: device, receive ms,
/// idempotency key, metrics.
struct Input {
    device: String,
    rx: i64,
    key: String,
    metrics: Map<String, Value>,
}

fn receive_ms(v: &Value) -> i64 {
    let ts = v["receive_ts"].as_str().expect("receive_ts");
    chrono::DateTime::parse_from_rfc3339(ts)
        .unwrap_or_else(|e| panic!("{ts}: {e}"))
        .timestamp_millis()
}

/// Every accepted record line of `api`, by idempotency key; a key that
/// came twice must have come the same both times.
fn far_side(api: &Analytics) -> BTreeMap<String, Value> {
    let mut seen: BTreeMap<String, (String, Value)> = BTreeMap::new();
    for s in api.seen().iter().filter(|s| s.answered == Some(200)) {
        for line in s.body.lines() {
            let v: Value = serde_json::from_str(line).unwrap();
            let key = v["idempotency_key"].as_str().unwrap().to_string();
            if let Some((before, _)) = seen.get(&key) {
                assert_eq!(before, line, "{key} was sent twice, differently");
            }
            seen.insert(key, (line.to_string(), v));
        }
    }
    seen.into_iter().map(|(k, (_, v))| (k, v)).collect()
}

/// The input in seq order, from the sink that gets every record whole.
fn input(raw: &Analytics) -> Vec<Input> {
    let mut by_seq: BTreeMap<u64, Input> = BTreeMap::new();
    for (key, v) in far_side(raw) {
        let seq = v["seq"].as_u64().unwrap();
        by_seq.insert(
            seq,
            Input {
                device: v["device_id"].as_str().unwrap().to_string(),
                rx: receive_ms(&v),
                key,
                metrics: v["metrics"].as_object().unwrap().clone(),
            },
        );
    }
    by_seq.into_values().collect()
}

/// The reference reduction of `input` under [`REDUCE`], by idempotency
/// key: each record's metrics as sent (records left empty are absent), and
/// each closed window's aggregate (metrics plus `records`).
fn oracle(input: &[Input]) -> BTreeMap<String, Map<String, Value>> {
    struct Win {
        start: i64,
        values: Vec<f64>,
    }
    let mut out = BTreeMap::new();
    let mut last_sent: HashMap<(String, String), (f64, i64)> = HashMap::new();
    let mut open: BTreeMap<String, Win> = BTreeMap::new();
    let mut closed: HashMap<String, i64> = HashMap::new();
    let emit = |device: &str,
                w: Win,
                out: &mut BTreeMap<String, Map<String, Value>>,
                closed: &mut HashMap<String, i64>| {
        let n = w.values.len() as f64;
        let mut m = Map::new();
        let min = w.values.iter().cloned().fold(f64::INFINITY, f64::min);
        let max = w.values.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = w.values.iter().sum();
        m.insert("vibration_x_min".into(), min.into());
        m.insert("vibration_x_max".into(), max.into());
        m.insert("vibration_x_mean".into(), (sum / n).into());
        m.insert(
            "vibration_x_last".into(),
            (*w.values.last().unwrap()).into(),
        );
        m.insert("vibration_x_count".into(), w.values.len().into());
        m.insert("records".into(), w.values.len().into());
        closed.insert(device.to_string(), w.start);
        out.insert(format!("{device}:agg:{}", w.start), m);
    };
    for r in input {
        let stale: Vec<String> = open
            .iter()
            .filter(|(_, w)| w.start + EVERY_MS + GRACE_MS <= r.rx)
            .map(|(d, _)| d.clone())
            .collect();
        for d in stale {
            let w = open.remove(&d).unwrap();
            emit(&d, w, &mut out, &mut closed);
        }
        let mut metrics = r.metrics.clone();
        let start = r.rx - r.rx % EVERY_MS;
        if let Some(v) = metrics.remove("vibration_x") {
            if open.get(&r.device).is_some_and(|w| w.start < start) {
                let w = open.remove(&r.device).unwrap();
                emit(&r.device, w, &mut out, &mut closed);
            }
            let late = closed.get(&r.device).is_some_and(|c| start <= *c)
                || open.get(&r.device).is_some_and(|w| start < w.start);
            if late {
                metrics.insert("vibration_x".into(), v);
            } else {
                open.entry(r.device.clone())
                    .or_insert(Win {
                        start,
                        values: vec![],
                    })
                    .values
                    .push(v.as_f64().unwrap());
            }
        }
        let mut kept = Map::new();
        for (k, v) in metrics {
            if k != "temperature_c" && !k.starts_with("pressure_") {
                kept.insert(k, v);
                continue;
            }
            let x = v.as_f64().unwrap();
            let slot = (r.device.clone(), k.clone());
            let due = match last_sent.get(&slot) {
                None => true,
                Some((last, at)) => {
                    let band = if k == "temperature_c" {
                        0.2
                    } else {
                        0.01 * last.abs()
                    };
                    let d = (x - last).abs();
                    (d > 0.0 && d >= band) || r.rx - at >= HEARTBEAT_MS
                }
            };
            if due {
                last_sent.insert(slot, (x, r.rx));
                kept.insert(k, v);
            }
        }
        if !kept.is_empty() {
            out.insert(r.key.clone(), kept);
        }
    }
    out
}

/// Whether the far side's reduced records are the oracle's, numbers equal
/// to 1e-9 (a mean's last bit may differ through JSON); the differences.
fn differences(
    got: &BTreeMap<String, Value>,
    want: &BTreeMap<String, Map<String, Value>>,
) -> Vec<String> {
    let mut diffs = Vec::new();
    let close = |a: &Value, b: &Value| match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => (x - y).abs() <= 1e-9 * x.abs().max(1.0),
        _ => a == b,
    };
    for (k, w) in want {
        let Some(g) = got.get(k) else {
            diffs.push(format!("{k}: missing, want {w:?}"));
            continue;
        };
        let mut gm = g["metrics"].as_object().unwrap().clone();
        if let Some(n) = g.get("window").map(|w| w["records"].clone()) {
            gm.insert("records".into(), n);
        }
        let same = gm.len() == w.len()
            && w.iter()
                .all(|(mk, mv)| gm.get(mk).is_some_and(|x| close(x, mv)));
        if !same {
            diffs.push(format!("{k}: got {gm:?}, want {w:?}"));
        }
    }
    for k in got.keys().filter(|k| !want.contains_key(*k)) {
        diffs.push(format!("{k}: not in the reference: {}", got[k]));
    }
    diffs
}

/// A slowly varying reading of device `d`, the `i`th.
fn reading(i: usize, d: usize, walk: &mut [f64; 2]) -> String {
    // A cheap deterministic generator: drifts of ±0.05 and ±2, and a step
    // of 0.3 in temperature every 35th reading (every 7th of a device of
    // five): at any speed of the run some temperatures pass the deadband
    // between two heartbeats. (Without the steps, a run slowed to 150 ms
    // between a device's readings, as under `make test`'s load, sent every
    // temperature and pressure only with the 3 s heartbeat.)
    let r = ((i as u64)
        .wrapping_mul(6364136223846793005)
        .wrapping_add(d as u64)
        >> 33)
        % 1000;
    walk[0] += if r % 2 == 0 { 0.05 } else { -0.05 };
    if i % 35 >= 30 {
        walk[0] += 0.3;
    }
    walk[1] += (r % 5) as f64 - 2.0;
    format!(
        r#"{{"msg_id":"m{i}","ts":{ts},"metrics":{{"temperature_c":{t:.2},"pressure_hpa":{p},"vibration_x":{v}}}}}"#,
        ts = 1_764_000_000_000u64 + i as u64,
        t = 20.0 + walk[0],
        p = 1000.0 + walk[1],
        v = r as f64 / 1000.0,
    )
}

#[test]
fn through_a_kill_9_loop_the_far_side_equals_a_reference_reduction_of_the_acknowledged_input() {
    let tmp = tempfile::tempdir().unwrap();
    let raw = Analytics::start();
    let api = Analytics::start();
    // Slow enough that kills land with batches in flight.
    api.set(Mode::Slow(Duration::from_millis(20)));
    let config = tmp.path().join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[mqtt]\nurl = \"off\"\n\
             [sinks.raw]\nkind = \"http\"\nurl = \"{raw}\"\n\
             [sinks.api]\nkind = \"http\"\nurl = \"{api}\"\nbatch_max_records = 25\n\
             [sinks.api.reduce]\n{REDUCE}",
            raw = raw.url(),
            api = api.url(),
        ),
    )
    .unwrap();
    let data = tmp.path().join("data");
    let port = free_port();
    let cfg = config.display().to_string();
    let args = ["--config", cfg.as_str()];
    let mut gw = spawn_gateway_binary(&data, port, &args, &[]);

    // One sender, devices in turn, each record retried until acknowledged
    // (through the kills), so each device's records are stored in order.
    const DEVICES: usize = 5;
    const RECORDS: usize = 2500;
    let acked: Arc<Mutex<HashSet<String>>> = Arc::default();
    let done = Arc::new(AtomicBool::new(false));
    let sender = {
        let (acked, done) = (acked.clone(), done.clone());
        std::thread::spawn(move || {
            let agent = ureq::AgentBuilder::new()
                .timeout(Duration::from_secs(5))
                .build();
            let mut walks = [[0.0f64; 2]; DEVICES];
            for i in 0..RECORDS {
                let d = i % DEVICES;
                let body = reading(i, d, &mut walks[d]);
                loop {
                    let res = agent
                        .post(&format!("http://127.0.0.1:{port}/ingest/dev-{d}"))
                        .set("Content-Type", "application/json")
                        .send_string(&body);
                    // 200: a duplicate, stored before a kill cut the answer.
                    match res {
                        Ok(r) if r.status() == 202 || r.status() == 200 => break,
                        _ => std::thread::sleep(Duration::from_millis(50)),
                    }
                }
                acked.lock().unwrap().insert(format!("dev-{d}:m{i}"));
                std::thread::sleep(Duration::from_millis(3));
            }
            done.store(true, Ordering::SeqCst);
        })
    };
    let mut kills = 0;
    while !done.load(Ordering::SeqCst) && kills < 6 {
        std::thread::sleep(Duration::from_millis(1500 + 300 * kills as u64));
        gw.kill().expect("SIGKILL");
        gw.wait().unwrap();
        kills += 1;
        gw = spawn_gateway_binary(&data, port, &args, &[]);
    }
    sender.join().unwrap();
    assert!(kills >= 3, "only {kills} kills landed while sending");
    let acked = acked.lock().unwrap().clone();

    // Every acknowledged record reaches the unreduced sink: that is the
    // input. Then the reduced sink must settle on the oracle's output.
    wait_until(
        "the raw sink has every record",
        Duration::from_secs(60),
        || acked.is_subset(&raw.accepted_keys()),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let diffs = differences(&far_side(&api), &oracle(&input(&raw)));
        if diffs.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} differences from the reference, the first: {:#?}",
            diffs.len(),
            &diffs[..diffs.len().min(8)]
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    // It stays equal (no late different copy).
    std::thread::sleep(Duration::from_secs(1));
    let got = far_side(&api);
    let inp = input(&raw);
    assert_eq!(differences(&got, &oracle(&inp)), Vec::<String>::new());

    // The reduction did something of each kind.
    let aggregates = got.keys().filter(|k| k.contains(":agg:")).count();
    assert!(aggregates > 30, "{aggregates} aggregates");
    let values_in: usize = inp.iter().map(|r| r.metrics.len()).sum();
    let values_out: usize = got
        .values()
        .map(|v| v["metrics"].as_object().unwrap().len())
        .sum();
    assert!(
        values_out * 2 < values_in,
        "sent {values_out} metric values of {values_in}"
    );
    // A record sent without one of its deadbanded metrics (which one
    // depends on timing: under load the heartbeat sends more of them).
    let deadbanded = got
        .values()
        .filter(|v| v.get("window").is_none())
        .filter(|v| {
            let m = v["metrics"].as_object().unwrap();
            !m.contains_key("temperature_c") || !m.contains_key("pressure_hpa")
        })
        .count();
    assert!(
        deadbanded > 0,
        "every record went with its temperature and its pressure"
    );
    gw.kill().unwrap();
    gw.wait().unwrap();
}
