//! The deployment files (`compose/`, `certs/`) against the real servers that
//! run here: the development certificates from `certs/gen-dev-certs.sh`, the
//! compose gateway configuration run by the real binary, Mosquitto with the
//! compose TLS listener and ACLs, and `promtool` on the compose Prometheus
//! configuration. (Docker itself has no engine on the build machine: the
//! images and `make up` are not run here.)

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::broker::{mosquitto_pub, Mosquitto, Subscriber};
use crate::helpers::{archived_keys, archived_records, free_port, wait_until, GatewayProcess};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("command runs");
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What `make certs` makes, in `out`.
fn make_certs(out: &Path) {
    run(Command::new(root().join("certs/gen-dev-certs.sh"))
        .arg(out)
        .args(["gateway", "gateway-admin", "prometheus", "dev-1", "dev-2"]));
    for device in ["dev-1", "dev-2"] {
        run(Command::new(root().join("certs/dev-device-token.sh"))
            .arg(out)
            .arg(device));
    }
}

/// `curl` over HTTPS with client certificate `client` from `certs`;
/// returns (status, body).
fn curl(certs: &Path, client: &str, args: &[&str]) -> (u16, String) {
    let c = |f: &str| certs.join(f).display().to_string();
    let out = Command::new("curl")
        .args(["-s", "-o", "-", "-w", "\n%{http_code}", "--max-time", "5"])
        .args(["--cacert", &c("ca.crt")])
        .args(["--cert", &c(&format!("{client}.crt"))])
        .args(["--key", &c(&format!("{client}.key"))])
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

#[test]
fn dev_certificates_chain_to_the_dev_ca_and_a_second_run_keeps_them() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    make_certs(&out);
    let ca = out.join("ca.crt");
    for cert in ["server", "gateway", "gateway-admin", "prometheus", "dev-1"] {
        let text = run(Command::new("openssl")
            .arg("verify")
            .arg("-CAfile")
            .arg(&ca)
            .arg(out.join(format!("{cert}.crt"))));
        assert!(text.contains(": OK"), "{text}");
    }
    let sans = run(Command::new("openssl")
        .args(["x509", "-noout", "-ext", "subjectAltName", "-in"])
        .arg(out.join("server.crt")));
    for name in ["localhost", "127.0.0.1", "mosquitto", "gateway"] {
        assert!(sans.contains(name), "{sans}");
    }
    let key_mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(out.join("ca.key")).unwrap().permissions(),
    );
    assert_eq!(key_mode & 0o777, 0o600);
    let before = std::fs::read(out.join("server.crt")).unwrap();
    let tokens = std::fs::read_to_string(out.join("device-tokens")).unwrap();
    make_certs(&out);
    assert_eq!(
        std::fs::read(out.join("server.crt")).unwrap(),
        before,
        "nothing is regenerated"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("device-tokens")).unwrap(),
        tokens
    );
    assert_eq!(tokens.lines().count(), 2);
    assert!(!tokens.contains(
        std::fs::read_to_string(out.join("dev-1.token"))
            .unwrap()
            .trim()
    ));
}

#[test]
fn the_compose_gateway_broker_and_prometheus_files_work_together() {
    let tmp = tempfile::tempdir().unwrap();
    let certs = tmp.path().join("certs");
    make_certs(&certs);
    let compose = root().join("compose");

    // Mosquitto with the compose listener (TLS, client certificates) and ACLs.
    let conf = std::fs::read_to_string(compose.join("mosquitto/mosquitto.conf")).unwrap();
    let listener: String = conf
        .split_once("listener 8883\n")
        .expect("the compose broker listens on 8883")
        .1
        .replace("/mosquitto/certs/", &format!("{}/", certs.display()))
        .replace(
            "/mosquitto/config/acl",
            compose.join("mosquitto/acl").to_str().unwrap(),
        );
    let broker = Mosquitto::start(tmp.path(), &listener, "");

    // The compose gateway configuration, its container paths mapped here.
    let http = free_port();
    let data = tmp.path().join("data");
    let toml = std::fs::read_to_string(compose.join("gateway/gateway.toml"))
        .unwrap()
        .replace("/etc/gateway/tls", certs.to_str().unwrap())
        .replace("\"/data\"", &format!("\"{}\"", data.display()))
        .replace("file:///data/", &format!("file://{}/", data.display()))
        .replace("0.0.0.0:8443", &format!("127.0.0.1:{http}"))
        .replace(
            "mqtts://mosquitto:8883",
            &format!("mqtts://localhost:{}", broker.port),
        )
        .replace("http://otel-collector:4318", "http://127.0.0.1:9");
    let cfg = tmp.path().join("gateway.toml");
    std::fs::write(&cfg, toml).unwrap();
    let check = run(Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args(["config", "check"])
        .arg(&cfg));
    assert!(check.contains("ok"), "{check}");
    let _gw = GatewayProcess(
        Command::new(env!("CARGO_BIN_EXE_gateway"))
            .arg("run")
            .arg("--config")
            .arg(&cfg)
            .env_remove("GATEWAY_CONFIG")
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let base = format!("https://localhost:{http}");
    wait_until(
        "gateway ready over mTLS to the broker",
        Duration::from_secs(30),
        || curl(&certs, "gateway-admin", &[&format!("{base}/readyz")]).0 == 200,
    );

    // The compose healthcheck, as the container runs it (GATEWAY_CONFIG from
    // compose), passes; with the gateway gone it fails, with one line.
    let healthcheck = compose_healthcheck(&certs);
    let ok = Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args(&healthcheck)
        .env("GATEWAY_CONFIG", &cfg)
        .output()
        .unwrap();
    let line = String::from_utf8_lossy(&ok.stdout).into_owned();
    assert!(
        ok.status.success(),
        "{line}{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert_eq!(
        line,
        format!("healthy: GET https://localhost:{http}/healthz -> 200\n")
    );

    // A device publishes its own telemetry (ACL pattern) with its certificate;
    // another device's topic is refused by the broker.
    let pem = |f: &str| certs.join(f).display().to_string();
    let tls = |client: &str| {
        vec![
            "--cafile".to_string(),
            pem("ca.crt"),
            "--cert".to_string(),
            pem(&format!("{client}.crt")),
            "--key".to_string(),
            pem(&format!("{client}.key")),
        ]
    };
    let publish = |client: &str, topic: &str, msg: &str| {
        let mut args = tls(client);
        args.extend(["-m".into(), msg.into()]);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        mosquitto_pub(broker.port, topic, &refs)
    };
    let record = |id: &str| {
        format!(r#"{{"msg_id":"{id}","ts":"2026-11-25T08:00:00Z","metrics":{{"t":1.5}}}}"#)
    };
    let (ok, err) = publish("dev-1", "devices/dev-1/telemetry", &record("own"));
    assert!(ok, "{err}");
    publish("dev-1", "devices/dev-2/telemetry", &record("spoofed"));

    // HTTPS ingest: the device's certificate and its token from certs/out.
    let token = std::fs::read_to_string(certs.join("dev-2.token")).unwrap();
    let (code, body) = curl(
        &certs,
        "dev-2",
        &[
            "-H",
            "Content-Type: application/json",
            "-H",
            &format!("Authorization: Bearer {}", token.trim()),
            "-d",
            &record("http"),
            &format!("{base}/ingest/dev-2"),
        ],
    );
    assert_eq!(code, 202, "{body}");
    let archive = data.join("archive");
    wait_until("both records archived", Duration::from_secs(15), || {
        archived_records(&archive).len() >= 2
    });
    std::thread::sleep(Duration::from_millis(500));
    let keys = archived_keys(&archive);
    assert!(keys.contains("dev-1:own"), "{keys:?}");
    assert!(keys.contains("dev-2:http"), "{keys:?}");
    assert!(
        !keys.iter().any(|k| k.contains("spoofed")),
        "the ACL let a device spoof another: {keys:?}"
    );

    // The admin certificate opens /admin; Prometheus' certificate scrapes /metrics.
    let (code, body) = curl(&certs, "gateway-admin", &[&format!("{base}/admin/sinks")]);
    assert_eq!(code, 200, "{body}");
    let (code, body) = curl(&certs, "prometheus", &[&format!("{base}/admin/sinks")]);
    assert_eq!(code, 403, "{body}");
    let (code, body) = curl(&certs, "prometheus", &[&format!("{base}/metrics")]);
    assert_eq!(code, 200);
    assert!(body.contains("gateway_mqtt_connected 1"), "{body}");

    // The operator's certificate may use the control plane (ACL), a device's may not.
    let sub_args = tls("gateway-admin");
    let sub_refs: Vec<&str> = sub_args.iter().map(String::as_str).collect();
    let sub = Subscriber::start(
        broker.port,
        tmp.path(),
        &["gateway/edge-compose/control/reply/#"],
        &sub_refs,
    );
    publish(
        "dev-1",
        "gateway/edge-compose/control/ping",
        r#"{"request_id":"from-device"}"#,
    );
    let (ok, err) = publish(
        "gateway-admin",
        "gateway/edge-compose/control/ping",
        r#"{"request_id":"op-1"}"#,
    );
    assert!(ok, "{err}");
    let reply: Value = sub.wait_json(
        "gateway/edge-compose/control/reply/op-1",
        Duration::from_secs(15),
    );
    assert_eq!(reply["ok"], true, "{reply}");
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !sub.messages()
            .iter()
            .any(|(t, _)| t.ends_with("from-device")),
        "a device reached the control plane"
    );

    // Prometheus: the compose configuration is valid (rule file and certificates included).
    let prom = std::fs::read_to_string(compose.join("prometheus/prometheus.yml"))
        .unwrap()
        .replace("/etc/prometheus/certs", certs.to_str().unwrap())
        .replace(
            "/etc/prometheus/alerts.yml",
            root().join("dashboards/alerts.yml").to_str().unwrap(),
        );
    let prom_file = tmp.path().join("prometheus.yml");
    std::fs::write(&prom_file, prom).unwrap();
    let text = run(Command::new("promtool")
        .arg("check")
        .arg("config")
        .arg(&prom_file));
    assert!(text.contains("SUCCESS"), "{text}");
}

/// The arguments of the compose gateway healthcheck (after the binary),
/// container paths mapped to `certs`.
fn compose_healthcheck(certs: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(root().join("compose/compose.yml")).unwrap();
    let start = text
        .find("test: [\"CMD\", \"/usr/local/bin/gateway\"")
        .expect("the gateway healthcheck uses the binary");
    let list = &text[start + 6..];
    let list = &list[..list.find(']').unwrap() + 1];
    let args: Vec<String> = serde_json::from_str(list).unwrap();
    assert_eq!(args[..3], ["CMD", "/usr/local/bin/gateway", "healthcheck"]);
    args[2..]
        .iter()
        .map(|a| a.replace("/etc/gateway/tls", certs.to_str().unwrap()))
        .collect()
}

/// `KEY=VALUE` pairs of the Dockerfile's `ENV` instructions.
fn dockerfile_env() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    let mut out = Vec::new();
    let mut in_env = false;
    for line in text.lines() {
        let l = line.trim();
        if let Some(rest) = l.strip_prefix("ENV ") {
            in_env = true;
            out.extend(pairs(rest));
        } else if in_env && !l.is_empty() && !l.starts_with('#') {
            out.extend(pairs(l));
        }
        if !l.ends_with('\\') {
            in_env = false;
        }
    }
    out
}

fn pairs(s: &str) -> Vec<(String, String)> {
    s.trim_end_matches('\\')
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn the_image_environment_does_not_override_the_compose_configuration() {
    let env = dockerfile_env();
    assert!(env.iter().any(|(k, _)| k == "GATEWAY_HTTP_ADDR"), "{env:?}");
    // The gateway service's environment in compose.yml (it wins over the image's).
    let compose = std::fs::read_to_string(root().join("compose/compose.yml")).unwrap();
    let service = compose
        .split("\n  gateway:\n")
        .nth(1)
        .unwrap()
        .split("\n  mosquitto:\n")
        .next()
        .unwrap();
    let mut merged: Vec<(String, String)> = env;
    for line in service.lines() {
        if let Some((k, v)) = line.trim().split_once(": ") {
            if k.starts_with("GATEWAY_") && k != "GATEWAY_CONFIG" {
                merged.retain(|(x, _)| x != k);
                merged.push((k.to_string(), v.trim().to_string()));
            }
        }
    }
    // The compose file's configuration with its files mapped here; its
    // address and data dir must be what the container ends up with.
    let tmp = tempfile::tempdir().unwrap();
    let certs = tmp.path().join("certs");
    make_certs(&certs);
    let toml = std::fs::read_to_string(root().join("compose/gateway/gateway.toml"))
        .unwrap()
        .replace("/etc/gateway/tls", certs.to_str().unwrap());
    let cfg = tmp.path().join("gateway.toml");
    std::fs::write(&cfg, &toml).unwrap();
    let printed = run(Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args(["config", "print", "--config"])
        .arg(&cfg)
        .env_remove("GATEWAY_CONFIG")
        .envs(merged.iter().map(|(k, v)| (k.as_str(), v.as_str()))));
    assert!(printed.contains("addr = \"0.0.0.0:8443\""), "{printed}");
    assert!(printed.contains("data_dir = \"/data\""), "{printed}");
    assert!(
        compose.contains("\"8443:8443\""),
        "compose publishes the port the gateway listens on"
    );
}

/// compose/compose.yml without an engine (tests/support/compose_check.py):
/// the compose-spec schema, every mounted file present (certs/out as
/// `make certs` makes it), every image pinned, no build+image, every host
/// the gateway configuration names defined as a service, and only the
/// device-facing ports on every interface.
#[test]
fn the_compose_file_validates_mounts_exist_images_are_pinned_and_services_are_defined() {
    let tmp = tempfile::tempdir().unwrap();
    let certs = tmp.path().join("certs-out");
    make_certs(&certs);
    let problems = crate::helpers::python_json_lines(
        "compose_check.py",
        &[
            root().join("compose/compose.yml").display().to_string(),
            certs.display().to_string(),
        ],
    );
    assert!(problems.is_empty(), "compose problems: {problems:#?}");

    // The checker catches what it is for: a broken copy of the file.
    let broken = std::fs::read_to_string(root().join("compose/compose.yml"))
        .unwrap()
        .replace("eclipse-mosquitto:2.0.18", "eclipse-mosquitto:latest")
        .replace("./otel/collector.yaml", "./otel/missing.yaml")
        .replace("\"127.0.0.1:9090:9090\"", "\"9090:9090\"")
        .replace("  otel-collector:\n", "  otel-collectr:\n");
    let copy = root().join("compose/.broken-compose-test.yml");
    std::fs::write(&copy, broken).unwrap();
    let problems = crate::helpers::python_json_lines(
        "compose_check.py",
        &[copy.display().to_string(), certs.display().to_string()],
    );
    let _ = std::fs::remove_file(&copy);
    let kinds: std::collections::BTreeSet<String> = problems
        .iter()
        .map(|p| p["kind"].as_str().unwrap().to_string())
        .collect();
    for k in [
        "unpinned_image",
        "missing_mount",
        "port_on_all_interfaces",
        "unknown_service",
    ] {
        assert!(kinds.contains(k), "{k} not caught: {problems:#?}");
    }
}
