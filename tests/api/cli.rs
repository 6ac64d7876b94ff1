//! The `gateway` command line: config check/print, token new, version.

use std::process::Command;

pub fn gateway(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_gateway"))
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
fn config_check_names_the_bad_key_and_its_file_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(&good, "[wal]\nretention = \"48h\"\n").unwrap();
    let (code, out, _) = gateway(&["config", "check", good.to_str().unwrap()], &[]);
    assert_eq!(code, 0);
    assert!(out.contains("ok"));
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[wal]\nretention = \"forever\"\n").unwrap();
    let (code, _, err) = gateway(&["config", "check", bad.to_str().unwrap()], &[]);
    assert_eq!(code, 2);
    assert!(
        err.contains("`wal.retention`") && err.contains("bad.toml"),
        "{err}"
    );
}

#[test]
fn an_invalid_environment_value_stops_start_up_naming_the_variable() {
    let (code, _, err) = gateway(&["run"], &[("GATEWAY_HTTP_ADDR", "not-an-address")]);
    assert_eq!(code, 2);
    assert!(
        err.contains("`http.addr`") && err.contains("GATEWAY_HTTP_ADDR"),
        "{err}"
    );
    let (code, _, err) = gateway(&["run"], &[("GATEWAY_WAL_MAX_BYTES", "lots")]);
    assert_eq!(code, 2);
    assert!(
        err.contains("environment") && err.to_lowercase().contains("wal_max_bytes"),
        "{err}"
    );
}

#[test]
fn config_print_merges_every_layer_refuses_unknown_keys_and_shows_the_default_sink() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gw.toml");
    std::fs::write(&file, "gateway_id = \"from-file\"\n[sinks.api]\nkind = \"http\"\nurl = \"http://a/b\"\ntoken = \"s3cr3t\"\n")
        .unwrap();
    // `token` is not a key of the http sink: the file is refused, naming it.
    let (code, _, err) = gateway(
        &["config", "print", "--config", file.to_str().unwrap()],
        &[],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("token"), "{err}");
    std::fs::write(
        &file,
        "gateway_id = \"from-file\"\n[http]\naddr = \"127.0.0.1:9000\"\n",
    )
    .unwrap();
    let (code, out, err) = gateway(
        &[
            "config",
            "print",
            "--config",
            file.to_str().unwrap(),
            "--http-addr",
            "127.0.0.1:9100",
        ],
        &[("GATEWAY_ID", "from-env")],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("gateway_id = \"from-env\""),
        "env beats the file: {out}"
    );
    assert!(
        out.contains("addr = \"127.0.0.1:9100\""),
        "the flag beats the file: {out}"
    );
    assert!(
        out.contains("[sinks.archive]"),
        "the default sink is shown: {out}"
    );
}

#[test]
fn token_new_prints_a_token_and_the_matching_tokens_file_line() {
    let (code, out, _) = gateway(&["token", "new", "dev-7"], &[]);
    assert_eq!(code, 0);
    let token = out.lines().find_map(|l| l.strip_prefix("token: ")).unwrap();
    let line = out
        .lines()
        .find_map(|l| l.strip_prefix("tokens-file line: "))
        .unwrap();
    let (device, hash) = line.split_once(':').unwrap();
    assert_eq!(device, "dev-7");
    assert_eq!(hash, hex::encode(gateway::auth::hash_token(token)));
    let (code, _, _) = gateway(&["token", "new", "bad id"], &[]);
    assert_eq!(code, 2);
}

#[test]
fn version_names_the_build() {
    let (code, out, _) = gateway(&["--version"], &[]);
    assert_eq!(code, 0);
    assert!(
        out.starts_with(&format!("gateway {}", env!("CARGO_PKG_VERSION"))),
        "{out}"
    );
}

/// `gateway run` with everything it needs except one thing: exits non-zero
/// with one line on stderr naming the cause, and no panic.
fn run_fails_with_one_line(
    data: &std::path::Path,
    env: &[(&str, &str)],
    config: Option<&str>,
    want: &str,
) {
    let mqtt = crate::helpers::free_port();
    let embedded = format!("127.0.0.1:{mqtt}");
    let mut args = vec!["run", "--data-dir", data.to_str().unwrap()];
    let file = data.with_extension("toml");
    if let Some(toml) = config {
        std::fs::write(&file, toml).unwrap();
        args.extend(["--config", file.to_str().unwrap()]);
    }
    let mut all = vec![
        ("GATEWAY_HTTP_ADDR", "127.0.0.1:0"),
        ("GATEWAY_MQTT_EMBEDDED_ADDR", embedded.as_str()),
    ];
    all.extend_from_slice(env);
    let (code, _, err) = gateway(&args, &all);
    assert_ne!(code, 0, "it started: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(
        lines.len() == 1 && lines[0].starts_with("error:") && lines[0].contains(want),
        "want one line naming {want:?}, got:\n{err}"
    );
}

#[test]
fn every_start_up_error_is_one_line_and_a_non_zero_exit_without_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| dir.path().join(n);
    // The HTTP port is taken (it used to panic on the way out).
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_addr = busy.local_addr().unwrap().to_string();
    run_fails_with_one_line(
        &d("http"),
        &[("GATEWAY_HTTP_ADDR", &busy_addr)],
        None,
        "http.addr",
    );
    // The embedded broker's port is taken.
    run_fails_with_one_line(
        &d("mqtt"),
        &[("GATEWAY_MQTT_EMBEDDED_ADDR", &busy_addr)],
        None,
        "mqtt.embedded_addr",
    );
    // An unreadable certificate, and an unreadable secret.
    let missing = d("missing.pem");
    let missing = missing.to_str().unwrap();
    run_fails_with_one_line(
        &d("tls"),
        &[
            ("GATEWAY_HTTP_TLS_CERT_FILE", missing),
            ("GATEWAY_HTTP_TLS_KEY_FILE", missing),
        ],
        None,
        "missing.pem",
    );
    run_fails_with_one_line(
        &d("tokens"),
        &[("GATEWAY_HTTP_DEVICE_TOKENS_FILE", missing)],
        None,
        "missing.pem",
    );
    // A bad sink configuration.
    run_fails_with_one_line(
        &d("sink"),
        &[],
        Some("[sinks.cloud]\nkind = \"kafka\"\n"),
        "sinks.cloud",
    );
    // The data dir is locked by a running gateway.
    let port = crate::helpers::free_port();
    let mqtt = crate::helpers::free_port().to_string();
    let held = d("held");
    let _running = crate::helpers::spawn_gateway_binary(
        &held,
        port,
        &[],
        &[("GATEWAY_MQTT_EMBEDDED_ADDR", &format!("127.0.0.1:{mqtt}"))],
    );
    run_fails_with_one_line(&held, &[], None, "in use");
}

#[test]
fn healthcheck_passes_against_a_running_gateway_and_fails_in_one_line_when_it_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let port = crate::helpers::free_port();
    let addr = format!("127.0.0.1:{port}");
    let gw = crate::helpers::spawn_gateway_binary(&data, port, &["--mqtt-url", "off"], &[]);
    let (code, out, err) = gateway(&["--http-addr", &addr, "healthcheck"], &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        out,
        format!("healthy: GET http://127.0.0.1:{port}/healthz -> 200\n")
    );
    drop(gw);
    let (code, out, _) = gateway(
        &["--http-addr", &addr, "healthcheck", "--timeout", "1s"],
        &[],
    );
    assert_eq!(code, 1);
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(
        out.starts_with(&format!("unhealthy: GET http://127.0.0.1:{port}/healthz: ")),
        "{out}"
    );
    let (code, out, _) = gateway(&["--http-addr", "127.0.0.1:0", "healthcheck"], &[]);
    assert_eq!(code, 1);
    assert!(out.contains("give --url"), "{out}");
}

#[test]
fn the_gateway_runs_with_lazy_arena_commit_unless_told_otherwise() {
    let environ = |env: &[(&str, &str)]| {
        let dir = tempfile::tempdir().unwrap();
        let port = crate::helpers::free_port();
        let gw = crate::helpers::spawn_gateway_binary(
            &dir.path().join("d"),
            port,
            &["--mqtt-url", "off"],
            env,
        );
        let raw = std::fs::read(format!("/proc/{}/environ", gw.0.id())).unwrap();
        drop(gw);
        raw.split(|b| *b == 0)
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .find(|v| v.starts_with("MIMALLOC_ARENA_EAGER_COMMIT="))
    };
    // Re-executed once with the variable (same process id).
    assert_eq!(
        environ(&[]).as_deref(),
        Some("MIMALLOC_ARENA_EAGER_COMMIT=0")
    );
    // An operator's own value wins.
    assert_eq!(
        environ(&[("MIMALLOC_ARENA_EAGER_COMMIT", "1")]).as_deref(),
        Some("MIMALLOC_ARENA_EAGER_COMMIT=1")
    );
}
