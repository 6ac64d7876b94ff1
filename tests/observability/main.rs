//! The dashboards and alert rules in `dashboards/` against the real tools:
//! `promtool` checks the rules and the live `/metrics` text, and a real
//! Prometheus (Debian's `prometheus` package, see scripts/deps.sh test)
//! scrapes in-process gateways and evaluates every dashboard and alert
//! expression. Grafana itself is not installable on the build machine.
//!
//! `traces`: the real binary's spans reach a real OTLP receiver (`oteltap`);
//! `logs`: the real binary's stdout is JSON lines, one event each.

#[allow(dead_code)]
#[path = "../sinks/analytics.rs"]
mod analytics;
mod binary;
#[allow(dead_code)]
#[path = "../mqtt/broker.rs"]
mod broker;
#[allow(dead_code)]
#[path = "../api/helpers.rs"]
mod helpers;
mod logs;
mod traces;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use helpers::{free_port, request, spawn_app, telemetry, wait_until, TestApp};
use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn dashboards() -> PathBuf {
    root().join("dashboards")
}

/// A Prometheus server on a free port with its own TSDB dir, killed on drop.
struct Prometheus {
    child: Child,
    dir: tempfile::TempDir,
    base: String,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    /// Starts Prometheus with `config` (prometheus.yml text) and `files`
    /// (name, text) written next to it, and waits until it is ready.
    fn start(config: &str, files: &[(&str, String)]) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("prometheus.yml");
        std::fs::write(&cfg, config).unwrap();
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("prometheus is installed (scripts/deps.sh test)");
        let prom = Prometheus {
            child,
            dir,
            base: format!("http://127.0.0.1:{port}"),
        };
        let ready = format!("{}/-/ready", prom.base);
        let start = Instant::now();
        while !ureq::get(&ready)
            .timeout(Duration::from_secs(1))
            .call()
            .map(|r| r.status() == 200)
            .unwrap_or(false)
        {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "prometheus not ready:\n{}",
                prom.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        prom
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    fn api(&self, path: &str) -> Value {
        request(ureq::get(&format!("{}{path}", self.base)), None).body
    }

    /// `/api/v1/query` of `q` at the current time (the whole JSON answer).
    fn query(&self, q: &str) -> Value {
        request(
            ureq::get(&format!("{}/api/v1/query", self.base)).query("query", q),
            None,
        )
        .body
    }
}

/// Every `expr` of every panel target (rows' nested panels included), with
/// the template variables replaced by values Prometheus accepts.
fn dashboard_exprs(file: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(file).unwrap();
    let dash: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{}: invalid JSON: {e}", file.display()));
    assert_eq!(
        dash["schemaVersion"].as_u64().map(|v| v >= 36),
        Some(true),
        "schemaVersion"
    );
    let mut out = Vec::new();
    let mut stack: Vec<&Value> = dash["panels"].as_array().unwrap().iter().collect();
    while let Some(p) = stack.pop() {
        if let Some(nested) = p["panels"].as_array() {
            stack.extend(nested);
        }
        for t in p["targets"].as_array().into_iter().flatten() {
            assert_eq!(
                t["datasource"]["uid"],
                "prometheus",
                "{}: panel {:?}",
                file.display(),
                p["title"]
            );
            let expr = t["expr"].as_str().unwrap_or_else(|| {
                panic!(
                    "{}: panel {:?} target without expr",
                    file.display(),
                    p["title"]
                )
            });
            out.push(
                expr.replace("$sink", ".*")
                    .replace("${sink}", ".*")
                    .replace("$__rate_interval", "1m"),
            );
        }
    }
    assert!(!out.is_empty(), "{}: no expressions", file.display());
    out
}

/// (alert name, expr) of every rule in a rules file: a line-based reading
/// of the simple layout `dashboards/alerts.yml` uses (one-line `expr:`).
fn alert_rules(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut name = None;
    for line in text.lines() {
        let l = line.trim();
        if let Some(n) = l.strip_prefix("- alert:") {
            name = Some(n.trim().to_string());
        } else if let Some(e) = l.strip_prefix("expr:") {
            let e = e.trim();
            assert!(
                !e.is_empty() && !e.starts_with('|') && !e.starts_with('>'),
                "alerts.yml: keep each expr on one line (this test reads it line by line)"
            );
            let n = name.take().expect("expr after `- alert:`");
            out.push((n, e.trim_matches('\'').to_string()));
        }
    }
    out
}

/// A test-only copy of the rules: every `for:` is 0s, and the group is
/// renamed so it can be loaded next to the original.
fn fast_rules(text: &str) -> String {
    text.lines()
        .map(|l| {
            let t = l.trim_start();
            let indent = &l[..l.len() - t.len()];
            if t.starts_with("for:") {
                format!("{indent}for: 0s")
            } else if let Some(n) = t.strip_prefix("- name:") {
                format!("{indent}- name: {}-fast-test", n.trim())
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn host_port(app: &TestApp) -> String {
    app.base.trim_start_matches("http://").to_string()
}

/// Some ingest load: accepted records plus one rejected payload.
fn load(app: &TestApp, prefix: &str, n: usize) {
    for i in 0..n {
        let r = app.post_json("dev-1", &telemetry(&format!("{prefix}-{i}"), i as f64));
        assert_eq!(r.status, 202, "{}", r.text);
    }
    let r = app.post_json("dev-1", r#"{"msg_id": "broken", "metrics": "#);
    assert!(
        (400..500).contains(&r.status),
        "rejected payload: {} {}",
        r.status,
        r.text
    );
}

#[test]
fn alert_rules_pass_promtool_check_rules() {
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(dashboards().join("alerts.yml"))
        .output()
        .expect("promtool is installed (scripts/deps.sh test)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    assert!(out.status.success(), "promtool check rules failed:\n{text}");
    assert!(text.contains("SUCCESS"), "{text}");
}

#[test]
fn live_metrics_pass_promtool_check_metrics() {
    let app = spawn_app("");
    load(&app, "lint", 20);
    wait_until("records delivered", Duration::from_secs(10), || {
        app.metric(r#"gateway_sink_records_total{outcome="ok",sink="archive"}"#) >= 20.0
    });
    let metrics = app.get("/metrics").text;
    assert!(
        metrics.contains("gateway_ingest_rejected_total"),
        "{metrics}"
    );
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is installed (scripts/deps.sh test)");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(metrics.as_bytes()).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !text.trim().is_empty() {
        println!("promtool check metrics says:\n{text}");
    }
    // promtool check metrics exits 0 when clean, 3 when the text parses but
    // has lint problems (naming advice, printed above) and 1 when the text
    // cannot be parsed. Lint advice is not a failure; a parse error is.
    match out.status.code() {
        Some(0) => {}
        Some(3) => println!("promtool check metrics: lint warnings only (exit 3)"),
        code => panic!("promtool check metrics on the live /metrics exited {code:?}:\n{text}"),
    }
}

#[test]
fn every_dashboard_and_alert_expression_evaluates_in_a_real_prometheus() {
    let app = spawn_app("");
    // A second gateway whose only sink cannot write (a file where a directory
    // must go): it feeds the error, dead-letter and SinkDown series (and,
    // with a quota, the quota series).
    let outside = tempfile::tempdir().unwrap();
    let blocker = outside.path().join("blocker");
    std::fs::write(&blocker, b"a file where a directory must go").unwrap();
    let broken = spawn_app(&format!(
        "[sinks.archive]\nkind = \"s3\"\nurl = \"file://{}\"\nbatch_max_wait_ms = 0\nretry_base_ms = 20\nretry_max_ms = 100\nretry_budget = 2\n\
         quota = {{ bytes = \"1GB\" }}\n",
        blocker.join("archive").display()
    ));
    // The healthy gateway's archive reduces (a deadband of 5 on the
    // temperature the load counts up): the report-by-exception series.
    let set = app.admin(
        "POST",
        "/admin/config",
        Some(serde_json::json!({"key": "sinks.archive.reduce", "value": {"deadband": {"temperature_c": 5}}})),
    );
    assert_eq!(set.status, 200, "{}", set.text);
    load(&app, "a", 30);
    load(&broken, "b", 10);

    // Steady background load on the healthy gateway so rates are non-zero.
    let stop = Arc::new(AtomicBool::new(false));
    let feeder = {
        let (stop, url) = (stop.clone(), app.url("/ingest/dev-2"));
        std::thread::spawn(move || {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let body = telemetry(&format!("bg-{i}"), i as f64);
                let _ = ureq::post(&url)
                    .set("Content-Type", "application/json")
                    .send_string(&body);
                i += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    struct StopOnDrop(Arc<AtomicBool>);
    impl Drop for StopOnDrop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
    let _stop = StopOnDrop(stop);

    let rules_text = std::fs::read_to_string(dashboards().join("alerts.yml")).unwrap();
    let rules = alert_rules(&rules_text);
    assert_eq!(rules.len(), 10, "{rules:?}");
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
         rule_files:\n  - alerts.yml\n  - alerts-fast.yml\n\
         scrape_configs:\n  - job_name: gateway\n    static_configs:\n      - targets: ['{}', '{}']\n",
        host_port(&app),
        host_port(&broken)
    );
    let started = Instant::now();
    let prom = Prometheus::start(
        &config,
        &[
            ("alerts.yml", rules_text.clone()),
            ("alerts-fast.yml", fast_rules(&rules_text)),
        ],
    );

    // (c) both targets up.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let t = prom.api("/api/v1/targets");
        let active = t["data"]["activeTargets"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if active.len() == 2 && active.iter().all(|t| t["health"] == "up") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "targets not up: {t:#}\n{}",
            prom.log()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    println!("targets up after {:?}", started.elapsed());

    // (d) every dashboard expression returns data.
    let mut exprs = dashboard_exprs(&dashboards().join("overview.json"));
    exprs.extend(dashboard_exprs(&dashboards().join("sink.json")));
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut pending = exprs.clone();
    loop {
        pending.retain(|e| {
            let r = prom.query(e);
            !(r["status"] == "success"
                && r["data"]["result"]
                    .as_array()
                    .is_some_and(|a| !a.is_empty()))
        });
        if pending.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            let detail: Vec<String> = pending
                .iter()
                .map(|e| format!("  {e}\n    -> {}", prom.query(e)))
                .collect();
            panic!(
                "{} of {} dashboard expressions returned no data:\n{}",
                pending.len(),
                exprs.len(),
                detail.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    println!(
        "all {} dashboard expressions returned data after {:?}",
        exprs.len(),
        started.elapsed()
    );

    // The sink variable's query: label_values(gateway_sink_up, sink).
    let sinks = prom.api("/api/v1/label/sink/values?match[]=gateway_sink_up");
    assert_eq!(sinks["data"], serde_json::json!(["archive"]), "{sinks}");

    // Every alert expression evaluates.
    for (name, expr) in &rules {
        let r = prom.query(expr);
        assert_eq!(r["status"], "success", "alert {name}: {expr}: {r}");
    }

    // Every rule of both groups is loaded and healthy.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = prom.api("/api/v1/rules");
        let groups = r["data"]["groups"].as_array().cloned().unwrap_or_default();
        let healthy: Vec<(String, String)> = groups
            .iter()
            .flat_map(|g| {
                let gname = g["name"].as_str().unwrap_or_default().to_string();
                g["rules"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|r| r["health"] == "ok")
                    .map(move |r| (gname.clone(), r["name"].as_str().unwrap().to_string()))
            })
            .collect();
        let want: Vec<(String, String)> = ["gateway", "gateway-fast-test"]
            .iter()
            .flat_map(|g| rules.iter().map(|(n, _)| (g.to_string(), n.clone())))
            .collect();
        if want.iter().all(|w| healthy.contains(w)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "rules not all healthy: {r:#}\n{}",
            prom.log()
        );
        std::thread::sleep(Duration::from_millis(250));
    }

    // The alert fires: SinkDown (for: 0s in the test copy) for the broken sink.
    let broken_instance = host_port(&broken);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = prom.api("/api/v1/alerts");
        let firing = r["data"]["alerts"].as_array().is_some_and(|a| {
            a.iter().any(|a| {
                a["labels"]["alertname"] == "SinkDown"
                    && a["labels"]["instance"] == broken_instance.as_str()
                    && a["labels"]["sink"] == "archive"
                    && a["state"] == "firing"
            })
        });
        if firing {
            break;
        }
        assert!(Instant::now() < deadline, "SinkDown not firing: {r:#}");
        std::thread::sleep(Duration::from_millis(250));
    }
    // …and not for the healthy gateway.
    let r = prom.api("/api/v1/alerts");
    let app_instance = host_port(&app);
    assert!(
        !r["data"]["alerts"].as_array().unwrap().iter().any(|a| {
            a["labels"]["alertname"] == "SinkDown"
                && a["labels"]["instance"] == app_instance.as_str()
        }),
        "SinkDown for the healthy gateway: {r:#}"
    );
    // MQTT ingest is off in these gateways: MqttDisconnected must stay quiet
    // even with for: 0s (it only concerns gateway_mqtt_enabled == 1).
    assert!(
        !r["data"]["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["labels"]["alertname"] == "MqttDisconnected"),
        "MqttDisconnected fired for gateways without MQTT ingest: {r:#}"
    );
    println!("done after {:?}", started.elapsed());
    drop(_stop);
    feeder.join().unwrap();
}
